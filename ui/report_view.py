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
from ui import chat_tab, marks, progress

FINAL = "final adapter"
POLL_S = 3.0
VERDICT_KIND = {"learned": "ok", "no effect": "bad", "worse": "bad", "unclear": "warn", "unknown": "warn"}


@dataclass
class ReportView:
    box: gr.Column
    checkpoint: gr.Dropdown
    make_btn: gr.Button
    best_btn: gr.Button       # "Report at checkpoint N": the checkpoint with the best eval loss, when overfitting
    status: gr.HTML
    verdict: gr.Markdown
    details: gr.Markdown


def build(visible: bool = False) -> ReportView:
    with gr.Column(visible=visible) as box:
        gr.Markdown("### Report: did it work, and what did it change?")
        with gr.Row():
            checkpoint = gr.Dropdown([FINAL], value=FINAL, label="Adapter", scale=2)
            make_btn = gr.Button("Make the report", scale=1)
            best_btn = gr.Button(visible=False, scale=1)
        status = gr.HTML()
        verdict = gr.Markdown(elem_classes=["lg-report-verdict"])
        with gr.Accordion("The numbers behind it", open=False):
            details = gr.Markdown()
    return ReportView(box, checkpoint, make_btn, best_btn, status, verdict, details)


def choices(run_id: str | None) -> list[str]:
    if not run_id:
        return [FINAL]
    try:
        run_dir = runs.get(run_id)
    except GarageError:
        return [FINAL]
    return [FINAL] + [str(runs.checkpoint_step(p)) for p in runs.checkpoints(run_dir)]


def _step(choice: str | None) -> int | None:
    return None if choice in (None, "", FINAL) else int(choice)


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
    of = rep["health"]["overfitting"]
    best = of.get("best_checkpoint") if of.get("flag") else None
    return {"verdict": head, "details": details_md(rep), "best": best}


def details_md(rep: dict) -> str:
    esc = lambda s: html.escape(_cut(str(s))).replace("|", "&#124;").replace("$", "&#36;").replace("\n", " ")  # noqa: E731
    which = f"checkpoint {rep['checkpoint']}" if rep.get("checkpoint") is not None else "final adapter"
    lines = [f"{which} of **{esc(rep['run'])}** on {esc(rep['base_model'])}, made {esc(rep['created_at'])} "
             f"in {rep['seconds']} s on {esc(rep['device'])}", "", "#### Task"]
    t = rep["task"]
    if t.get("error"):
        lines.append(f"{marks.ERROR} not scored: {esc(t['error']['message'])}. {esc(t['error'].get('hint') or '')}")
    if t.get("loss"):
        lo = t["loss"]
        lines.append(f"- loss on {lo['rows']} rows ({esc(lo['split'])}): base **{lo['base']:.3f}** (perplexity "
                     f"{lo['base_ppl']:.1f}) -> adapter **{lo['adapter']:.3f}** ({lo['adapter_ppl']:.1f})")
    if t.get("checker"):
        c = t["checker"]
        lines.append(f"- the dataset's checker on {c['n']} held-out prompts: base **{c['base']:.0%}** -> "
                     f"adapter **{c['adapter']:.0%}**")
    if t.get("rewards"):
        rw = t["rewards"]
        lines.append(f"- the run's rewards on {rw['n']} prompts ({esc(rw['split'])}): mean total base **{rw['base']:.2f}** "
                     f"-> adapter **{rw['adapter']:.2f}**; above zero {rw['above_zero']['base']:.0%} -> "
                     f"{rw['above_zero']['adapter']:.0%}")
        for k, v in rw["rewards"].items():
            lines.append(f"- {esc(k)} x{rw['weights'][k]:g}: mean {v['base']['mean']:.2f} -> {v['adapter']['mean']:.2f}, "
                         f"full marks {v['base']['full']:.0%} -> {v['adapter']['full']:.0%}")
        if rw["note"]:
            lines.append(f"- note: {esc(rw['note'])}")
    if t.get("rouge_l"):
        lines.append(f"- ROUGE-L to the data's reply: base {t['rouge_l']['base']:.2f} -> adapter "
                     f"{t['rouge_l']['adapter']:.2f}")
    if t.get("answers"):
        ok = lambda a, side: ("" if f"{side}_ok" not in a else (marks.PASS if a[f"{side}_ok"] else marks.FAIL) + " ")  # noqa: E731
        said = lambda text: esc(text) or "<i>(empty)</i>"  # noqa: E731
        if "base_reward" in t["answers"][0]:
            lines += ["", table(["prompt", "base (reward)", "adapter (reward)"],
                                [[esc(a["prompt"]), f"{a['base_reward']:.2f} " + said(a["base"]),
                                  f"{a['adapter_reward']:.2f} " + said(a["adapter"])] for a in t["answers"]])]
        else:
            lines += ["", table(["prompt", "the data's reply", "base", "adapter"],
                                [[esc(a["prompt"]), esc(a["reference"]), ok(a, "base") + said(a["base"]),
                                  ok(a, "adapter") + said(a["adapter"])] for a in t["answers"]])]
    d = rep["drift"]
    lines += ["", "#### Drift: neutral prompts", f"- KL(base &#124;&#124; adapter) **{d['kl']:.4f}** nats/token on "
              f"{d['prompts']} prompts; **{d['changed']}/{d['prompts']}** answers changed within {d['tokens']} tokens"]
    if d["most_changed"]:
        lines += ["", table(["most changed", "base", "adapter"],
                            [[esc(m["prompt"]), esc(m["base"]), esc(m["adapter"])] for m in d["most_changed"]])]
    h = rep["health"]
    un, of, dv = h["update_norm"], h["overfitting"], h["divergence"]
    lines += ["", "#### Health"]
    if un["max"] is not None:
        lines.append(f"- update size ||BA|| / ||W||: median {un['median']:.2e}, largest {un['max']:.2e} "
                     f"({len(un['modules'])} modules)")
    lines.append(f"- no effect: {esc(h['no_effect']['why'] or 'no')}")
    lines.append(f"- overfitting: {esc(of['note'] or 'no')}")
    lines.append(f"- divergence: {dv['nan_skips']} NaN steps skipped, {len(dv['spikes'])} loss spikes")
    return "\n".join(lines)


def _cut(text: str, n: int = 240) -> str:
    return text if len(text) <= n else text[:n] + "..."


def table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table of already escaped cells: a Markdown table breaks on a cell's own | or newline."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c or '<i>(empty)</i>'}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def show(view: ReportView, shown: dict) -> dict:
    best = shown.get("best")
    return {view.box: gr.update(visible=shown["visible"]), view.verdict: shown["verdict"],
            view.details: shown["details"], view.status: shown.get("status", ""),
            view.best_btn: gr.update(visible=best is not None,
                                     value=f"Report at checkpoint {best} (best eval loss)" if best is not None else "")}


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


def wire(view: ReportView, run_id) -> None:
    """run_id: the component holding the run (a gr.State on the Train page, the picker on the Runs page). A poll
    shows the report once the run's training child has written it, without redrawing an unchanged one."""
    outs = [view.box, view.verdict, view.details, view.status, view.best_btn]
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

    run_id.change(_opened, run_id, [view.checkpoint, shown_key], show_progress="hidden")
    poll.tick(_poll, [run_id, view.checkpoint, shown_key], outs + [shown_key], show_progress="hidden")
    view.checkpoint.change(lambda: None, None, shown_key, show_progress="hidden")
    view.make_btn.click(_make, [run_id, view.checkpoint], outs + [shown_key])
    view.best_btn.click(lambda b: gr.update(value=b.split()[3]), view.best_btn, view.checkpoint).then(
        _make, [run_id, view.checkpoint], outs + [shown_key])
