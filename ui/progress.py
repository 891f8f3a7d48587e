"""A status line for long waits: core's progress callbacks (model conversion, tokenising, scoring prompt k of n)
shown on the page while the work runs.

Gradio runs an event handler in one thread and shows only what it yields, and core reports progress through
plain callbacks from inside the work. So `stream` runs the work in a helper thread, passes it a `report`
callback, and yields a status update each time something new was reported (and every TICK_S so the elapsed
seconds move while one long phase runs). The work's exception is raised in the handler, as if it ran there.
"""

from __future__ import annotations

import html
import queue
import threading
import time
from collections.abc import Callable, Generator

TICK_S = 1.0
_DONE = object()


class Report:
    """The callback handed to the work: report(message, done=None, total=None)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self.q.put((message, done, total))


def stream(work: Callable[[Report], object], show: Callable[[str], dict]) -> Generator[dict, None, object]:
    """Run work(report) in a thread; yield show(status html) as it reports; return its result (use with
    `result = yield from stream(...)`)."""
    report, out = Report(), {}

    def target():
        try:
            out["value"] = work(report)
        except BaseException as e:  # noqa: BLE001 - handed over and raised in the handler below
            out["error"] = e
        finally:
            report.q.put(_DONE)

    t0 = time.monotonic()
    threading.Thread(target=target, daemon=True, name="ui-progress").start()
    latest = ("Starting…", None, None)
    yield show(status_html(*latest, elapsed=0))
    while True:
        try:
            item = report.q.get(timeout=TICK_S)
        except queue.Empty:
            yield show(status_html(*latest, elapsed=time.monotonic() - t0))
            continue
        if item is _DONE:
            break
        latest = item
        while not report.q.empty():  # a fast loop reports more often than the page can show: keep the newest
            nxt = report.q.get_nowait()
            if nxt is _DONE:
                report.q.put(_DONE)
                break
            latest = nxt
        yield show(status_html(*latest, elapsed=time.monotonic() - t0))
    if "error" in out:
        raise out["error"]
    return out.get("value")


def status_html(message: str, done: int | None = None, total: int | None = None, elapsed: float = 0) -> str:
    """One line: a bar (filled to done/total, or moving when the length of the wait is unknown), the message, the
    count and the seconds so far."""
    if total:
        pct = max(0.0, min(100.0, 100 * (done or 0) / total))
        bar = f"<div class='lg-progress'><div style='width:{pct:.1f}%'></div></div>"
        count = f" · {done:,} / {total:,}"
    else:
        bar = "<div class='lg-progress lg-progress-busy'><div></div></div>"
        count = ""
    return (f"<div class='lg-status' role='status'>{bar}<span>{html.escape(message)}{count}"
            f" <span class='lg-dim'>({int(elapsed)} s)</span></span></div>")


CSS = """
.lg-status {display:flex; gap:.6em; align-items:center; margin:4px 0}
.lg-progress {position:relative; flex:0 0 160px; height:8px; border-radius:4px; background:#e5e7eb; overflow:hidden}
.lg-progress > div {height:100%; background:#4e79a7; border-radius:4px}
.lg-progress-busy > div {position:absolute; width:35%; animation:lg-busy 1.2s ease-in-out infinite alternate}
@keyframes lg-busy {from {left:0} to {left:65%}}
"""
