"""Runs page: every run in the home folder; open one (curves, config, folder, CLI command), overlay loss curves,
resume, delete with confirmation, chat with its adapter."""

from __future__ import annotations

import datetime as dt
import html
import json
import shlex
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from core import events as ev
from core import config as C
from core.estimate import eta
from core.runs import resolve as run_files
from core.runs import runner
from core.runs import folder as runs
from core.errors import GarageError
from core.units import gb
from ui.refuse import refusal
from ui import export_panel, marks, plots, report_view, run_view, train_tab

COLUMNS = ["run", "state", "model", "dataset", "method", "objective", "steps", "loss", "duration",
           "peak mem / estimate"]
# at 1400 px: short model and dataset names (the full ones are in the open run's config); the widths fit what the cells
# hold in one line (a built-in model's run id, "7 min 38 s"), and a longer cell (a run name of your own) wraps, never cut
COLUMN_WIDTHS = ["300px", "92px", "120px", "126px", "74px", "88px", "80px", "68px", "100px", "216px"]


def table() -> pd.DataFrame:
    rows = []
    for r in runs.list_runs():
        run_dir = runs.get(r["id"])
        loss, peak = _from_events(run_dir)
        rows.append([r["id"], r.get("state"), short_source(r.get("model", "")), short_source(r.get("dataset", "")),
                     r.get("method", ""), r.get("objective", ""),
                     f"{r.get('step') or 0} / {r.get('total_steps') or '?'}", loss,
                     _duration(r.get("started_at"), r.get("ended_at")), peak])
    return pd.DataFrame(rows, columns=COLUMNS)


# run folder -> (what its cells were read from: events.jsonl's and estimate.json's size and mtime, (loss, peak))
_CELLS: dict[str, tuple] = {}
_CELLS_LOCK = threading.Lock()


def _from_events(run_dir) -> tuple[str, str]:
    """A run's loss and peak-memory cells, read from its events again only when its files changed: the Runs list
    is relisted by every open page, and an ended run's events never change."""
    key = str(run_dir)
    stamp = tuple(_stamp(Path(run_dir) / name) for name in (ev.FILE, "estimate.json"))
    with _CELLS_LOCK:
        kept = _CELLS.get(key)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    events, _ = ev.read(run_dir, 0)
    loss = ev.last_metric(events, ev.LOSS)
    cells = (f"{loss:.4f}" if loss is not None else "", peak_vs_estimate(run_dir, events))
    with _CELLS_LOCK:
        _CELLS[key] = (stamp, cells)
    return cells


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def short_source(source: str) -> str:
    """A model or dataset source as the table shows it: the built-in ones by name, a path by its last part."""
    source = str(source or "")
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    return source.rstrip("/").rsplit("/", 1)[-1] if "/" in source and not source.count("/") == 1 else source


def _duration(start: str | None, end: str | None) -> str:
    if not start:
        return ""
    try:
        t0 = dt.datetime.fromisoformat(start)
        t1 = dt.datetime.fromisoformat(end) if end else dt.datetime.now(t0.tzinfo)
    except ValueError:
        return ""
    return eta.format_duration((t1 - t0).total_seconds()) + ("" if end else " so far")


def peak_vs_estimate(run_dir, events: list[dict]) -> str:
    """The measured peak (the GPU process total on CUDA, the RSS on the CPU: core.events.peak_memory) against the
    estimate made at launch, with the error; on CUDA torch's own peak reserved beside it."""
    peak = ev.peak_memory(events)
    est = runs.estimate_bytes(run_dir)
    if peak is None:
        return f"? / {gb(est, 2)}" if est else "?"
    text = gb(peak[0], 2)
    if est:
        text += f" / {gb(est, 2)} ({100 * (peak[0] - est) / est:+.0f}%)"
    if peak[1] == ev.MEM_GPU_PEAK:
        torch_peak = max((v for _, key, v in ev.memory_points(events) if key == ev.MEM_TORCH_PEAK_RESERVED), default=0)
        if torch_peak:
            text += f" · torch {gb(torch_peak, 2)}"
    return text


def open_run(run_id: str | None):
    """-> (summary md, loss frame, config yaml, cli command)."""
    if not run_id:
        return "Pick a run.", None, "", ""
    try:
        run_dir = runs.get(run_id)
        cfg = runs.load_config(run_dir)
        status = runs.read_status(run_dir)
    except GarageError as e:
        return f"{marks.ERROR} {html.escape(str(e))}", None, "", ""
    events, _ = ev.read(run_dir, 0)
    err = status.get("error") or {}
    md = f"**{html.escape(run_id)}**: {marks.state(str(status.get('state')))} · {_steps(status)} · folder: `{run_dir}`"
    if status.get("state") in ("stopped", "stopping"):
        md += run_view.stop_md(run_id, status)  # the Train page's words: saved only where a checkpoint is
    elif err:
        md += f"  \n{marks.ERROR} {html.escape(str(err.get('message', '')))}  \n**Fix:** {html.escape(str(err.get('hint', '')))}"
    for r in ev.recoveries(events):
        md += f"  \n{marks.NOTE} {html.escape(str(r.get(ev.MESSAGE, '')))}"
    return md, curve_frame(cfg, events), C.dump_yaml(cfg), cli_command(cfg)


def curve_frame(cfg: C.RunConfig, events: list[dict]):
    """The open run's curve: the loss, and for a GRPO run (whose loss alone means little) the mean reward of each
    step's completions beside it, named as such."""
    frame = plots.loss_frame(events)
    if cfg.train.objective == "grpo":
        reward = plots.reward_frame(events)
        reward = reward[reward["series"] == "total"].assign(series="reward (GRPO, mean)").astype(frame.dtypes)
        frame = pd.concat([frame, reward], ignore_index=True).astype(frame.dtypes)
    return frame


def _steps(status: dict) -> str:
    return f"step {status.get('step') or 0} / {status.get('total_steps') or '?'}"


def follow(run_id: str | None, sent: dict) -> dict:
    """The open run as its files say now, for the page's follow timer: summary, loss curve (sent only when its
    series change: plots.live_value), the buttons, and whether to keep following (the run is still active)."""
    if not run_id:
        return {"summary": "Pick a run.", "curve": plots.hidden(), "resume": gr.update(visible=False),
                "chat": gr.update(visible=False), "active": False, "sent": sent, "relist": False}
    md, frame, _, _ = open_run(run_id)
    run_dir = runs.get(run_id)
    status = runs.read_status(run_dir)
    sent = dict(sent or {})
    active = status.get("state") in runs.ACTIVE
    curve = plots.live_value(frame, "loss", sent)
    relist = sent.get("state") != status.get("state")  # the table follows the open run's state changes
    sent["state"] = status.get("state")
    return {"summary": md, "curve": curve, "relist": relist,
            "resume": run_view.resume_button(run_dir, status),
            "chat": gr.update(visible=run_files.has_adapter(run_dir)),
            "active": active, "sent": sent}


def cli_command(cfg: C.RunConfig) -> str:
    """The command that repeats this run from a terminal, with every setting that differs from the default."""
    default, mine = C.RunConfig().to_dict(), cfg.to_dict()
    sets = []
    for section, values in mine.items():
        for key, value in values.items():
            if value != default[section][key] and not (section == "output" and key == "run_name"):
                text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
                sets.append(f"--set {shlex.quote(f'{section}.{key}={text}')}")
    return " ".join(["python -m core train"] + sets)


def overlay(run_ids: list[str] | None) -> pd.DataFrame | None:
    named = {}
    for rid in run_ids or []:
        events, _ = ev.read(runs.get(rid), 0)
        named[rid] = events
    return plots.overlay_frame(named) if named else None


def delete(run_id: str | None, confirmed: bool) -> str:
    if not run_id:
        raise refusal("Pick a run first.")
    if not confirmed:
        raise refusal("Tick “yes, delete it” first: deleting removes the run's adapter and checkpoints for good.")
    try:
        runner.delete(run_id)
    except GarageError as e:
        raise refusal(str(e))
    return f"Deleted {run_id}."


def relist(current: str | None, compared: list | None = None) -> tuple:
    """(table, open-run picker, overlay picker) as the home folder holds them now, keeping the open run and the
    overlaid ones that are still there: for the tab's select, so runs made since the page loaded are listed."""
    ids = [r["id"] for r in runs.list_runs()]
    keep = current if current in ids else (ids[0] if ids else None)
    overlaid = [i for i in compared or [] if i in ids] or ids[:3]
    # a value only where it changes: sent, a picker's own value fires its change and its chart is redrawn for
    # nothing (and a value read before another handler set the picker would undo that pick)
    pick = gr.update(choices=ids) if keep == current else gr.update(choices=ids, value=keep)
    overlay_pick = gr.update(choices=ids) if overlaid == list(compared or []) else gr.update(choices=ids, value=overlaid)
    return table(), pick, overlay_pick


def build(tabs: gr.Tabs, train, chat) -> tuple:
    """Lay out the page; returns (fn, inputs, outputs) for the app's load event, which re-lists the runs."""
    refresh_btn = gr.Button("Refresh", size="sm")
    grid = gr.Dataframe(table(), interactive=False, wrap=True, label="Runs (newest first)", max_height=320,
                        column_widths=COLUMN_WIDTHS, elem_classes=["lg-runs"])
    ids = [r["id"] for r in runs.list_runs()]
    with gr.Row():
        pick = gr.Dropdown(ids, value=ids[0] if ids else None, label="Open run", scale=3)
        compare = gr.Dropdown(ids, value=ids[:3], multiselect=True, label="Overlay loss curves of", scale=3)
    summary = gr.Markdown()
    with gr.Row():
        chat_btn = gr.Button("Chat with this adapter", variant="primary")
        resume_btn = gr.Button("Resume", visible=False)
        sure = gr.Checkbox(label="yes, delete it", value=False)
        delete_btn = gr.Button("Delete run", variant="stop")
    action_md = gr.Markdown()
    with gr.Row():
        # None until filled, then never None again: hidden when empty, rebuilt by color_map (plots.chart_update)
        curve = gr.LinePlot(None, x="step", y="value", color="series", title="Loss", height=260)
        overlay_plot = gr.LinePlot(None, x="step", y="value", color="series",
                                   title="Loss, smoothed, several runs", height=260)
    export = export_panel.build(pick)
    report_view.wire(report_view.build(), pick, export)
    with gr.Accordion("Config and CLI command", open=False):
        cli = gr.Code(language="shell", label="Repeat this run from a terminal")
        cfg_yaml = gr.Code(language="yaml", label="config.yaml")

    built_with = ids

    def _on_load():
        ids = [r["id"] for r in runs.list_runs()]
        first = ids[0] if ids else None
        # an update to the pickers fires their .change (the multiselect twice, even with the same value), which
        # reads and redraws the curves again: update them only when the runs differ from those they were built with
        same = ids == built_with
        return [table(), gr.skip() if same else gr.update(choices=ids, value=first),
                gr.skip() if same else gr.update(choices=ids, value=ids[:3]),
                plots.refill(overlay)(ids[:3])] + list(
                    plots.refill(open_run, 1, 4)(first))

    refresh_btn.click(relist, [pick, compare], [grid, pick, compare])
    pick.change(plots.refill(open_run, 1, 4), pick, [summary, curve, cfg_yaml, cli])

    # the open run follows its files like the Train page: state, curve and buttons, until it ends
    follow_timer, sent = gr.Timer(2.0, active=True), gr.State({})

    def _follow(rid, sent_before):
        r = follow(rid, sent_before)
        return {summary: r["summary"], curve: r["curve"],
                resume_btn: r["resume"], chat_btn: r["chat"], sent: r["sent"],
                grid: table() if r["relist"] else gr.skip(),
                follow_timer: gr.Timer(active=r["active"])}

    pick.change(lambda: ({}, gr.Timer(active=True)), None, [sent, follow_timer])
    follow_timer.tick(_follow, [pick, sent], [summary, curve, resume_btn, chat_btn, sent, grid, follow_timer],
                      show_progress="hidden")
    compare.change(plots.refill(overlay), compare, overlay_plot)
    def _select(evt: gr.SelectData):
        return gr.update(value=evt.row_value[0]) if evt.row_value else gr.update()

    grid.select(_select, None, pick)
    delete_btn.click(delete, [pick, sure], action_md).success(relist, [pick, compare], [grid, pick, compare]).then(
        lambda: False, None, sure)
    resume_btn.click(train_tab.resume, pick, train.run_id).success(
        lambda: (gr.Timer(active=True), gr.Tabs(selected="train")), None, [train.timer, tabs])
    chat_btn.click(chat.refresh[0], pick, chat.refresh[1]).then(lambda: gr.Tabs(selected="chat"), None, tabs)
    return _on_load, None, [grid, pick, compare, overlay_plot, summary, curve, cfg_yaml, cli]
