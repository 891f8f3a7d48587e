"""The Report section: a run's report card (core.report) on the Train page under a finished run and on the Runs
page for any run. It shows a fresh report.json at once; a missing or stale one is made on "Make the report", with
progress, in the app's one ChatSession (the Chat page's: the base model loads once).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from core import report
from core.errors import GarageError
from core.runs import folder as runs
from core.runs import resolve as run_files
from ui import chat_tab, export_panel, marks, progress

FINAL = runs.FINAL_ADAPTER
POLL_S = 3.0
VERDICT_KIND = {"learned": "ok", "no effect": "bad", "worse": "bad", "unclear": "warn", "unknown": "warn"}
CSS = """
.lg-report-text {white-space:pre-wrap; word-break:break-word; font-size:13px; line-height:1.45; margin:0;
                 padding:10px 12px; border-radius:8px; background:var(--block-background-fill);
                 border:1px solid var(--border-color-primary)}
"""


@dataclass
class ReportView:
    box: gr.Column
    checkpoint: gr.Dropdown
    make_btn: gr.Button
    best_btn: gr.Button       # "Report at checkpoint N": the kept checkpoint with the best eval loss, when it beats the end
    export_btn: gr.Button     # "Export checkpoint N": that checkpoint in the page's export panel
    status: gr.HTML
    verdict: gr.Markdown
    details: gr.HTML


def build(visible: bool = False) -> ReportView:
    with gr.Column(visible=visible) as box:
        gr.Markdown("### Report: did it work, and what did it change?")
        with gr.Row():
            checkpoint = gr.Dropdown([FINAL], value=FINAL, label="Adapter", scale=2)
            make_btn = gr.Button("Make the report", scale=1)
            best_btn = gr.Button(visible=False, scale=1)
            export_btn = gr.Button(visible=False, scale=1)
        status = gr.HTML()
        verdict = gr.Markdown(elem_classes=["lg-report-verdict"])
        with gr.Accordion("The numbers behind it", open=False):
            details = gr.HTML()
    return ReportView(box, checkpoint, make_btn, best_btn, export_btn, status, verdict, details)


def choices(run_id: str | None) -> list[str]:
    if not run_id:
        return [FINAL]
    try:
        return runs.adapter_choices(runs.get(run_id))
    except GarageError:
        return [FINAL]


def _step(choice: str | None) -> int | None:
    return runs.checkpoint_of(choice)


def peek(run_id: str | None, choice: str | None = FINAL) -> dict:
    """What the section shows without making anything: {"visible", "verdict", "details", "status", "best"}."""
    out = {"visible": False, "verdict": "", "details": "", "status": "", "best": None}
    if not run_id:
        return out
    try:
        run_dir = runs.get(run_id)
        step = _step(choice)
        if step is None and not run_files.has_adapter(run_dir):
            return out
        out["visible"] = True
        if step is None and report.being_written(run_dir):
            out["status"] = progress.status_html("The training process is writing the report")
            return out
        rep = report.load(run_dir, step)
    except GarageError as e:
        return {**out, "visible": True, "verdict": f"{marks.ERROR} {html.escape(e.message)}"}
    if rep is None:
        err = report.failed(run_dir, step)
        out["verdict"] = (f"{marks.ERROR} The report could not be made: {html.escape(err['message'])}. "
                          "Press **Make the report** to try again." if err else
                          "No report for this adapter yet (or the adapter is newer than it). Press **Make the report**.")
        return out
    return {**out, **render(rep)}


def render(rep: dict) -> dict:
    if rep.get("error"):
        e = rep["error"]
        return {"verdict": f"{marks.ERROR} The report could not be made: {html.escape(e['message'])}. "
                           f"{html.escape(e.get('hint') or '')}", "details": "", "best": None}
    v = rep["verdict"]
    head = (f"{marks.badge(v['task'], VERDICT_KIND.get(v['task'], 'warn'))} "
            f"{marks.badge('side effects ' + v['side_effects'], 'ok' if v['side_effects'] == 'small' else 'warn')}"
            f"\n\n**{html.escape(v['text'])}**")
    # offered on the final adapter's report only: a checkpoint's own report has nothing better to point to
    best = rep["health"]["overfitting"].get("better_checkpoint") if rep.get("checkpoint") is None else None
    return {"verdict": head, "details": details_html(rep), "best": best}


def details_html(rep: dict) -> str:
    """The report's text lines (core.report.outline: what `python -m core report` prints), as they are."""
    return f"<pre class='lg-report-text'>{html.escape(chr(10).join(report.outline(rep)))}</pre>"


def show(view: ReportView, shown: dict) -> dict:
    best = shown.get("best")
    return {view.box: gr.update(visible=shown["visible"]), view.verdict: shown["verdict"],
            view.details: shown["details"], view.status: shown.get("status", ""),
            view.best_btn: gr.update(visible=best is not None,
                                     value=f"Report at checkpoint {best} (best eval loss)" if best is not None else ""),
            view.export_btn: gr.update(visible=best is not None,
                                       value=f"Export checkpoint {best}" if best is not None else "")}


def _key(run_id: str | None, choice: str | None) -> tuple:
    """What the section's content depends on: when none of it changed, a poll leaves the page alone."""
    if not run_id:
        return (None,)
    try:
        run_dir = runs.get(run_id)
    except GarageError:
        return (run_id, "gone")
    path = report.report_file(run_dir, _step(choice))
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    stamp = lambda p: p.stat().st_mtime_ns if p.exists() else None  # noqa: E731
    return (run_id, choice, stamp(path), stamp(weights), report.being_written(run_dir))


def wire(view: ReportView, run_id, export: export_panel.ExportPanel | None = None) -> None:
    """run_id: the component holding the run (a gr.State on the Train page, the picker on the Runs page). A poll
    shows the report once the run's training child has written it, without redrawing an unchanged one. `export`:
    the page's export panel, which "Export checkpoint N" opens on that checkpoint."""
    outs = [view.box, view.verdict, view.details, view.status, view.best_btn, view.export_btn]
    poll, shown_key = gr.Timer(POLL_S), gr.State(None)

    def _opened(rid):
        return {view.checkpoint: gr.update(choices=choices(rid), value=FINAL), shown_key: None}

    def _poll(rid, choice, last):
        key = _key(rid, choice)
        if key == last:
            return {shown_key: last}
        return {**show(view, peek(rid, choice)), shown_key: key}

    def _make(rid, choice):
        if not rid:
            raise gr.Error("Pick a run first.")
        try:
            rep = yield from progress.stream(
                lambda say: report.get(rid, _step(choice), session=chat_tab.SESSION, progress=say, user_code=False),
                lambda line: {view.status: line})
        except GarageError as e:
            raise gr.Error(str(e))
        yield {**show(view, {"visible": True, "status": "", **render(rep)}), shown_key: _key(rid, choice)}

    def _best(rid, label):  # "Report at checkpoint N": pick N (the list refreshed: N may be newer than the page)
        return gr.update(choices=choices(rid), value=f"checkpoint {label.split()[3]}")

    run_id.change(_opened, run_id, [view.checkpoint, shown_key], show_progress="hidden")
    poll.tick(_poll, [run_id, view.checkpoint, shown_key], outs + [shown_key], show_progress="hidden")
    view.checkpoint.change(lambda: None, None, shown_key, show_progress="hidden")
    view.make_btn.click(_make, [run_id, view.checkpoint], outs + [shown_key])
    view.best_btn.click(_best, [run_id, view.best_btn], view.checkpoint).then(
        _make, [run_id, view.checkpoint], outs + [shown_key])
    if export is not None:
        def _export(rid, label):
            opened = export_panel.opened_on(rid, f"checkpoint {label.split()[2]}")
            return {getattr(export, k): v for k, v in opened.items()}

        view.export_btn.click(_export, [run_id, view.export_btn], [export.accordion, export.folder, export.adapter]
                              ).then(None, None, None, js=export_panel.scroll_to(export.elem_id))
