"""build_app(): the header bar and the Train / Chat / Runs tabs. Each tab module builds its own widgets."""

import logging
import os
import sys
import threading

import gradio as gr
import httpx
from gradio import networking

from core import models
from ui import chat_tab, hardware_bar, marks, progress, report_view, runs_tab, train_tab

CSS = """
.lg-bar {display:flex; gap:1.5em; align-items:center; flex-wrap:wrap; padding:6px 12px; border-radius:8px;
         background:var(--block-background-fill); border:1px solid var(--border-color-primary)}
.lg-brand {font-weight:700; font-size:1.1em; display:inline-flex; align-items:center; white-space:nowrap}
.lg-dim {opacity:.7}
.lg-verdict-fits {color:#1a7f37; font-weight:700} .lg-verdict-tight {color:#b08800; font-weight:700}
.lg-verdict-no {color:#cf222e; font-weight:700}
.lg-runs td, .lg-runs th {font-size:13px}
/* a chat window's messages start below its label and icons (share, clear, copy), which float over the window's
   top: they covered the first bubble */
.lg-check {min-width:min(160px, 100%) !important}
.lg-gone {display:none !important}
.lg-chat .wrapper > .bubble-wrap {margin-top:40px; height:calc(100% - 40px)}
""" + marks.CSS + progress.CSS + report_view.CSS
MAX_UPLOAD = "200mb"


def build_app() -> gr.Blocks:
    with gr.Blocks(title="LoRA Garage") as app:
        hardware_bar.build()
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                train = train_tab.build()
            with gr.Tab("Chat", id="chat") as chat_page:
                chat = chat_tab.build()
            with gr.Tab("Runs", id="runs") as runs_page:
                runs_load = runs_tab.build(tabs=tabs, train=train, chat=chat)
        # a tab opened later lists the runs made since the page loaded (it kept its load-time list before)
        grid, pick, compare = runs_load[2][:3]
        runs_page.select(runs_tab.relist, [pick, compare], [grid, pick, compare], show_progress="hidden")
        chat_page.select(chat.refresh[0], chat.run_dd, chat.refresh[1], show_progress="hidden")
        # "Chat with this adapter" on the Train page: select the run there, then switch tabs
        train.chat_button.click(chat.refresh[0], train.run_id, chat.refresh[1]).then(
            lambda: gr.Tabs(selected="chat"), None, tabs)
        app.load(*train.on_load)
        app.load(chat.refresh[0], None, chat.refresh[1])  # runs finished since the app started
        app.load(*runs_load)
    return app


def _patient_url_ok(url: str) -> bool:
    """Gradio's start-up check that its own page answers, with 30 s instead of 3 s: on a machine busy training
    (a load average of 24 on 2 cores was seen) the first answer takes longer, and Gradio then refuses to start
    with "localhost is not accessible"."""
    for _ in range(5):
        try:
            r = httpx.head(url, timeout=30, verify=False)
        except (httpx.ConnectError, httpx.TimeoutException):
            continue
        if r.status_code in (200, 401, 301, 302, 303, 307, 308):
            return True
    return False


WARM_NICE = 10  # the background imports yield the cores to a training run and to the pages' own work (Linux)


def _warm_imports() -> None:
    """The first Inspect's and the first chat's imports (core.models.warm_imports), in the background while the
    page is served, at a lower priority where a thread can have its own (Linux). A failure is logged: the click
    that needs the library imports it again and shows the error there."""
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_NICE)
    try:
        seconds = models.warm_imports()
    except Exception:  # noqa: BLE001 - logged; the click that needs it raises it again, to the user
        logging.getLogger(__name__).warning("importing the training libraries in the background failed",
                                            exc_info=True)
        return
    logging.getLogger(__name__).info("training libraries imported in the background in %.1f s", seconds)


def launch(host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    networking.url_ok = _patient_url_ok
    app = build_app()
    app.queue(default_concurrency_limit=4)
    threading.Thread(target=_warm_imports, name="garage-warm-imports", daemon=True).start()
    return app.launch(server_name=host, server_port=port, auth=auth, max_file_size=MAX_UPLOAD, css=CSS,
                      theme=gr.themes.Soft(), show_error=False, prevent_thread_lock=not block, quiet=not block)
