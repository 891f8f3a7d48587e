"""The live view of one run: status, progress, charts, train.log tail, samples, and the end-of-run buttons.

It only reads the run folder (status.json, events.jsonl, estimate.json, train.log) through core.runs.folder, so a
refresh, a second tab or an app restart shows the same run from its files. The pages watching one run share one
reading of its events and one build of its charts (Feed): twenty open pages cost about what one does.
"""

from __future__ import annotations

import html
import re
import threading
import time
from dataclasses import dataclass, field

import gradio as gr

from core import events as ev
from core.estimate import eta
from core.runs import resolve as run_files
from core.runs import folder as runs
from core.runs import stopping
from core.errors import GarageError
from ui import marks, plots



@dataclass
class RunView:
    status: gr.Markdown
    progress: gr.HTML
    loss: gr.LinePlot
    lr: gr.LinePlot
    grad: gr.LinePlot
    tps: gr.LinePlot
    mem: gr.LinePlot
    rewards: gr.LinePlot     # DPO / ORPO only (in `pref`, hidden for SFT runs)
    accuracy: gr.LinePlot
    pref: gr.Column
    reward: gr.LinePlot      # GRPO only (in `grpo`, above the loss: the loss alone means little in GRPO)
    completion: gr.LinePlot
    policy: gr.LinePlot
    grpo: gr.Column
    log: gr.Code
    samples: gr.Markdown
    chat_btn: gr.Button
    resume_btn: gr.Button
    cache: gr.State
    charts: gr.Column
    export_btn: gr.Button    # opens the Train page's GGUF export panel, once the run has its final adapter

    @property
    def outputs(self) -> list:
        """Every component refresh() gives a value for (the order does not matter: values are named)."""
        return [getattr(self, name) for name in FIELDS]

    def values(self, named: dict) -> dict:
        """refresh()'s named values as {component: value}, for a Gradio handler."""
        return {getattr(self, name): named[name] for name in FIELDS}


# what refresh() fills, by the RunView field it goes to
FIELDS = ("status", "progress", "loss", "lr", "grad", "tps", "mem", "rewards", "accuracy", "reward", "completion",
          "policy", "log", "samples", "chat_btn", "resume_btn", "cache", "charts", "pref", "grpo", "export_btn")
CHARTS = ("loss", "lr", "grad", "tps", "mem", "rewards", "accuracy", "reward", "completion", "policy")


STATUS_ID = "lg-run-status"
# run in the browser after Start: an expanded VRAM breakdown pushes the run status below the fold
RECENT_STEPS = 50  # the progress line's ETA reads the last 20 steps that carry one (eta.for_run)

SCROLL_TO_STATUS = f"() => document.getElementById('{STATUS_ID}')?.scrollIntoView({{block: 'center', behavior: 'smooth'}})"


def _plot(title: str, y_title: str, height: int = 220) -> gr.LinePlot:
    return gr.LinePlot(None, x="step", y="value", color="series", title=title, y_title=y_title,
                       height=height, x_title="step")


def build() -> RunView:
    status = gr.Markdown("No run yet. Press **Start training**.", elem_id=STATUS_ID)
    progress = gr.HTML()
    with gr.Row():
        chat_btn = gr.Button("Chat with this adapter", visible=False, variant="primary")
        resume_btn = gr.Button("Resume", visible=False)
    # a row of its own: beside the Chat button, in the page's right column, one of the two labels wrapped
    export_btn = gr.Button("Export to GGUF / Ollama", visible=False)
    with gr.Column(visible=False) as charts:  # shown once a run is attached: empty charts say nothing
        # one chart a line: side by side in this column their titles and legends were cut at 1400 px
        with gr.Column(visible=False) as grpo:  # a GRPO run's own charts, first
            # a short title: the longer "Reward: the completions' mean, per reward function, and spread (GRPO)" was
            # cut at both ends in this column at 1400 px
            reward = _plot("Reward (GRPO): mean, per function, spread", "reward", 260)
            completion = _plot("Completions: mean length and share cut at the limit", "tokens / %", 170)
            policy = _plot("KL to the reference and entropy", "nats", 170)
        loss = _plot("Loss", "loss", 260)
        lr = _plot("Learning rate", "lr", 170)
        grad = _plot("Grad norm", "norm", 170)
        tps = _plot("Tokens/s (non-padding)", "tokens/s", 170)
        mem = _plot("Memory (GB) vs estimate", "GB", 170)
        with gr.Column(visible=False) as pref:  # a DPO / ORPO run's own charts
            rewards = _plot("Rewards: chosen, rejected, margin (DPO / ORPO)", "reward", 220)
            accuracy = _plot("Preference accuracy (chosen out-scores rejected)", "share of pairs", 170)
        with gr.Accordion("start-up timeline and train.log (the end; library warnings hidden, kept in the file)",
                          open=False):
            log = gr.Textbox(lines=12, max_lines=20, autoscroll=True, interactive=False, show_label=False)
        samples = gr.Markdown()
    return RunView(status, progress, loss, lr, grad, tps, mem, rewards, accuracy, pref, reward, completion, policy,
                   grpo, log, samples, chat_btn, resume_btn, gr.State({}), charts, export_btn)


# How old the charts of a running run may be when a page ticks (every second): one read of the new events and one
# build of the charts serve every page that ticks within this. A run that has ended is read at once, to its end.
FEED_S = 0.5
FEEDS_KEPT = 16  # runs whose feed the app keeps (a page opens one run at a time; others come back from disk)


@dataclass
class Feed:
    """One run's events as its pages draw them, shared by every page (and thread) of this app that shows the run."""
    offset: int = 0           # how far events.jsonl has been read
    curve: list = field(default_factory=list)  # the metrics as one curve: a resume event has dropped what it supersedes
    other: list = field(default_factory=list)  # the other events (few: phases, samples, evals, recoveries)
    version: int = 0          # grows with each read that found new events
    read_at: float = float("-inf")
    frames: dict | None = None  # the charts' frames of this version, built on first use
    log: tuple = (None, "")   # (train.log's size, the log box's text) last built
    lock: threading.Lock = field(default_factory=threading.Lock)


_FEEDS: dict[str, Feed] = {}
_FEEDS_LOCK = threading.Lock()


def feed(run_dir, fresh: bool = False) -> tuple[int, list, list, dict, str]:
    """The run's shared feed, read on if FEED_S has passed (or `fresh`) -> (version, curve, other events, chart
    frames, log box text). The lists and frames are the feed's own: read them, never change them."""
    key = str(run_dir)
    with _FEEDS_LOCK:
        f = _FEEDS.pop(key, None) or Feed()
        _FEEDS[key] = f  # the most recent last
        while len(_FEEDS) > FEEDS_KEPT:
            _FEEDS.pop(next(iter(_FEEDS)))
    with f.lock:
        now = time.monotonic()
        if fresh or now - f.read_at >= FEED_S:
            f.read_at = now
            if f.offset > runs.events_size(run_dir):  # the file was replaced (a run deleted, one made under its id)
                f.offset, f.curve, f.other = 0, [], []
            new, f.offset = ev.read(run_dir, f.offset)
            if new:
                f.curve = ev.metrics(f.curve + new)
                f.other = f.other + [e for e in new if e.get(ev.TYPE) != ev.METRICS]
                f.version, f.frames = f.version + 1, None
            size = runs.log_size(run_dir)
            if new or size != f.log[0]:
                f.log = (size, log_text(run_dir, f.other))
        if f.frames is None:
            f.frames = _frames(f.curve, f.other, runs.estimate_bytes(run_dir))
        return f.version, f.curve, f.other, f.frames, f.log[1]


def _frames(curve: list, other: list, est: int | None) -> dict:
    """Each chart's frame: at most plots.CHART_POINTS points a series. The resume events stay out: they are
    applied to the curve already, and given again they would drop the resumed steps."""
    drawn = plots.thin(curve) + [e for e in other if e.get(ev.TYPE) != ev.RESUME]
    return {"loss": plots.loss_frame(drawn), "lr": plots.series_frame(drawn, ev.LR, "learning rate"),
            "grad": plots.series_frame(drawn, ev.GRAD_NORM, "grad norm"),
            "tps": plots.series_frame(drawn, ev.TOKENS_PER_S, "tokens/s"), "mem": plots.memory_frame(drawn, est),
            "rewards": plots.rewards_frame(drawn), "accuracy": plots.accuracy_frame(drawn),
            "reward": plots.reward_frame(drawn), "completion": plots.completion_frame(drawn),
            "policy": plots.policy_frame(drawn)}


def refresh(run_id: str | None, cache: dict) -> dict:
    """What is new in the run folder for this page: {RunView field: value} for every name in FIELDS, plus "keep"
    (whether the timer is still needed). `cache` is the page's: which run and feed version it was last sent."""
    if not run_id:
        return {**_blank(cache), "keep": False}
    try:
        run_dir = runs.get(run_id)
        status = runs.read_status(run_dir)
    except GarageError as e:
        return {**_blank(cache), "status": f"{marks.ERROR} {html.escape(e.message)}", "keep": False}
    sent = dict(cache.get("sent") or {})  # per chart: the series it was last built with (see plots.live_value)
    state = status.get("state", "?")
    done = state in runs.TERMINAL
    version, curve, other, frames, log = feed(run_dir, fresh=done)  # an ended run: its last events, now
    # this page has this version of the run already: the charts, samples and log stay as they are
    same = cache.get("run_id") == run_id and cache.get("version") == version
    if same:
        charts = {k: gr.skip() for k in CHARTS}
        samples, pref, grpo, log = gr.skip(), gr.skip(), gr.skip(), gr.skip()
    else:
        charts = {k: plots.live_value(f, k, sent) for k, f in frames.items()}
        samples = samples_md(other)
        pref = gr.update(visible=len(frames["accuracy"]) > 0)
        grpo = gr.update(visible=len(frames["reward"]) > 0)
    return {"status": status_md(run_id, status),
            # the progress line reads the last steps only (eta.for_run: the last 20)
            "progress": progress_html(status, curve[-RECENT_STEPS:]) + template_html(other),
            **charts,
            "log": log,
            "samples": samples,
            "chat_btn": gr.update(visible=run_files.has_adapter(run_dir)),
            "resume_btn": resume_button(run_dir, status),
            "export_btn": export_button(run_dir, status),
            "cache": {"run_id": run_id, "version": version, "sent": sent},
            "charts": gr.update(visible=True),
            "pref": pref,
            "grpo": grpo,
            "keep": not done}


def log_text(run_dir, events: list[dict]) -> str:
    """The log box: the start-up timeline (core.events.startup_timeline) once the child has written a phase,
    then the end of train.log."""
    tail = runs.tail_log(run_dir, lines=60, hide_noise=True)
    timeline = ev.format_timeline(ev.startup_timeline(events))
    return f"start-up, seconds per phase:\n{timeline}\n\ntrain.log:\n{tail}" if timeline else tail


def _blank(cache) -> dict:
    # no run's data kept: charts hidden here are sent in full when a run is shown again (refresh's `same`)
    cache = {}
    hidden = gr.update(visible=False)
    return {"status": "No run yet. Press **Start training**.", "progress": "",
            **{name: plots.hidden() for name in CHARTS},  # hidden by class, never None: see plots.hidden
            "log": "", "samples": "", "chat_btn": hidden, "resume_btn": hidden, "export_btn": hidden, "cache": cache,
            "charts": hidden, "pref": hidden, "grpo": hidden}


def resume_button(run_dir, status: dict) -> dict:
    """Resume only where it can do something: a stopped or failed run with a complete checkpoint, labelled with
    what it does."""
    ck = runs.latest_checkpoint(run_dir) if status.get("state") in ("stopped", "failed") else None
    if ck is None:
        return gr.update(visible=False)
    return gr.update(visible=True, value=f"Resume: continue training from step {runs.checkpoint_step(ck)}")


def can_export(run_dir, status: dict) -> bool:
    """Whether the GGUF export has what it exports: an ended run (never one still training, whose adapter/ may be
    a previous one being replaced) with the final adapter that core.runs.folder.adapter_path finds."""
    return export_refusal(run_dir, status) is None


def export_refusal(run_dir, status: dict) -> str | None:
    """Why this run cannot be exported, with what to do, or None when it can (can_export)."""
    state = status.get("state")
    rid = run_dir.name
    if state in runs.ACTIVE:
        return f"Run {rid} is still {state}: export it once it has ended."
    if state not in runs.TERMINAL:
        return f"Run {rid} has not started ({state}): nothing to export yet."
    try:
        runs.adapter_path(run_dir)
    except GarageError:
        how = ("it failed before saving one: fix the cause its page names and start it again"
               if state == "failed" else "train it to the end, or stop it (stopping saves the adapter)")
        return f"Run {rid} has no final adapter to export ({state}): {how}."
    return None


def why_not_export(run_id: str | None) -> str | None:
    """export_refusal for a run id (the pages' pickers): None when the run can be exported."""
    if not run_id:
        return "No run to export: start one, or pick one on the Runs page."
    try:
        run_dir = runs.get(run_id)
        return export_refusal(run_dir, runs.read_status(run_dir))
    except GarageError as e:
        return str(e)


def export_button(run_dir, status: dict) -> dict:
    """"Export to GGUF / Ollama" after a run that ended with its adapter: completed, or stopped (stopping saves it);
    a failed run only where it has one."""
    return gr.update(visible=can_export(run_dir, status))


def status_md(run_id: str, status: dict) -> str:
    state = status.get("state", "?")
    text = f"Run **{html.escape(run_id)}**: {marks.state(state)}"
    err = status.get("error")
    if state == "failed" and err:
        text += f"  \n**{html.escape(str(err.get('message', '')))}**"
        if err.get("hint"):
            text += f"  \n**Fix:** {html.escape(str(err['hint']))}"
    elif state == "completed":
        text += "  \nThe adapter is saved. Chat with it, or compare it with the base model on the Chat tab."
    elif state in ("stopped", "stopping"):
        text += stop_md(run_id, status)
    elif state in ("queued", "running") and not status.get("step") and status.get("phase"):
        text += f"  \nStarting, {html.escape(str(status['phase']))}…"  # the child's start-up phase, k of n
    if status.get("recovered"):  # core.train.recovery: the latest change, the count when there were several
        n = status.get("recoveries") or 1
        text += f"  \n{marks.NOTE} {html.escape(str(status['recovered']))}" + (f" ({n} recoveries)" if n > 1 else "")
    return text


def stop_md(run_id: str, status: dict) -> str:
    """What the Stop did, from status.json and the checkpoints on disk: a countdown while stopping, a kill in red
    with what was kept and lost, "saved" only where a checkpoint was written."""
    if status.get("state") == "stopping":
        note = stopping.stopping_note(status)
        return f"  \n{html.escape(note[:1].upper() + note[1:])}…"
    try:
        clean, what, fix = stopping.outcome(runs.get(run_id), status)
    except GarageError as e:
        return f"  \n{marks.ERROR} {html.escape(e.message)}"
    if clean:
        return f"  \n{html.escape(what)}. {html.escape(fix)}."
    mark = marks.badge("killed", "bad") if status.get("error") else marks.NOTE
    return (f"  \n{mark} <span class='lg-bad'>{html.escape(what[:1].upper() + what[1:])}</span>"
            f"  \n**Fix:** {html.escape(fix)}")


def progress_html(status: dict, events: list[dict]) -> str:
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    m = ev.metrics(events)
    last = m[-1] if m else {}
    step = max(step, last.get(ev.STEP) or 0)
    pct = 100 * step / total if total else 0
    bits = [f"step {step} / {total or '?'}"]
    if last.get(ev.EPOCH) is not None:
        bits.append(f"epoch {last[ev.EPOCH]:.2f}")
    left = eta.for_run(status, events)
    if left is not None:
        bits.append(f"ETA {eta.format_duration(left.seconds)} <span class='lg-dim'>({left.source})</span>")
    if last.get(ev.LOSS) is not None:
        bits.append(f"loss {last[ev.LOSS]:.4f}")
    return (f"<div style='background:#eee;border-radius:4px;height:14px'><div style='width:{pct:.1f}%;height:100%;"
            f"background:#4e79a7;border-radius:4px'></div></div><div>{' · '.join(bits)}</div>")


def template_html(events: list[dict]) -> str:
    """The run's fallback-template notice under the progress bar, where the model has no chat template."""
    notice = ev.template_notice(events)
    return f"<div style='margin-top:4px;color:#8a5a00'>Note: {html.escape(notice)}</div>" if notice else ""


def samples_md(events: list[dict]) -> str:
    """The latest sample generations (SFT), or a GRPO run's latest completions with their rewards."""
    shown = ev.of_type(events, ev.COMPLETIONS)
    if shown:
        return completions_md(shown[-1])
    samples = ev.of_type(events, ev.SAMPLE)[-3:]
    if not samples:
        return ""
    parts = [f"**step {e.get(ev.STEP)}** · _{html.escape(str(e.get(ev.PROMPT, '')))}_  \n"
             f"{html.escape(str(e.get(ev.TEXT, '')))}" for e in samples]
    return "#### Sample generations\n" + "\n\n".join(parts)


def completions_md(event: dict) -> str:
    """A GRPO checkpoint's sampled completions, each with its total reward and each reward function's score.
    The prompt is shown without the chat template's markers (<|im_start|> and the like filled its cell and squeezed
    the completion to a few letters a line), once per group of completions that share it."""
    rows, last = [], None
    for it in event.get(ev.ITEMS) or []:
        prompt = _plain_prompt(str(it.get(ev.PROMPT, "")))
        shown = html.escape(prompt[-160:]) if prompt != last else '<i>(same prompt)</i>'
        last = prompt
        parts = "<br>".join(f"{html.escape(k)} {v:.2f}" for k, v in (it.get(ev.REWARDS) or {}).items())
        rows.append(f"<tr><td>{shown}</td>"
                    f"<td>{html.escape(str(it.get(ev.COMPLETION, ''))) or '<i>(empty)</i>'}</td>"
                    f"<td><b>{it.get(ev.REWARD, 0):.2f}</b><br><small>{parts}</small></td></tr>")
    return (f"#### Sampled completions at step {event.get(ev.STEP)}, with their rewards\n\n"
            '<table style="table-layout: fixed; width: 100%"><tr><th style="width: 38%">prompt</th>'
            f'<th style="width: 38%">completion</th><th style="width: 24%">reward</th></tr>{"".join(rows)}</table>')


_TEMPLATE_MARK = re.compile(r"<\|[^|<>]{1,40}\|>|<(?:/?s|start_of_turn|end_of_turn)>")


def _plain_prompt(text: str) -> str:
    """A rendered prompt as a person reads it: the template's special markers dropped, whitespace collapsed."""
    return " ".join(_TEMPLATE_MARK.sub(" ", text).split())


def wire(view: RunView, run_id: gr.State, timer: gr.Timer, also=None) -> None:
    """The timer's one event a tick: the run view, and `also` = (fn(run_id) -> {component: value}, its components)
    for what else the page shows of the run (the Train page's ETA line). One event, not one each: every event
    costs the app its queue, its messages and its copy of the page's inputs, and twenty open pages tick each
    second (bench/app_load.py)."""
    fn, extra = also or (None, [])

    def _tick(rid, cache):
        named = refresh(rid, cache)
        return {**view.values(named), timer: gr.Timer(active=named["keep"]), **(fn(rid, named) if fn else {})}

    timer.tick(_tick, [run_id, view.cache], view.outputs + [timer] + list(extra), show_progress="hidden")
