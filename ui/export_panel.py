"""The Export panel of the Runs page: a run's adapter as GGUF files with an Ollama Modelfile (core.gguf.export),
and the parity table that says whether each file answers like the adapter."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from core import paths
from core.gguf import tools as gguf_tools
from core.errors import GarageError
from core.runs import folder as runs
from core.gguf import export as gguf_export
from ui import marks, progress, run_view
from ui.refuse import refusal

COLUMNS = ["quant", "size", "bits / weight", "prompt tokens same", "top-1 agreement", "max logit diff",
           "same answer", "score GGUF vs adapter", "stops", "check"]


TITLE = "Export to GGUF (Ollama, llama.cpp, LM Studio)"
PANEL_ID = "lg-export-panel"          # on the Runs page
TRAIN_PANEL_ID = "lg-export-panel-train"   # on the Train page, opened by "Export to GGUF / Ollama"


def scroll_to(elem_id: str) -> str:
    """Browser code that brings a panel into view once it has opened."""
    return (f"() => setTimeout(() => document.getElementById('{elem_id}')"
            "?.scrollIntoView({block: 'start', behavior: 'smooth'}), 250)")


@dataclass
class ExportPanel:
    """What a page fills to open the panel on a run (the run itself is the component passed to build)."""
    accordion: gr.Accordion
    folder: gr.Textbox
    adapter: gr.Dropdown      # the final adapter or a checkpoint (runs.adapter_choices)
    elem_id: str


def default_folder(run_id: str | None, adapter: str | None = None) -> str:
    step = runs.checkpoint_of(adapter)
    return str(paths.home() / "exports" / f"{run_id or 'run'}{'' if step is None else f'-checkpoint-{step}'}-gguf")


def adapter_choices(run_id: str | None) -> list[str]:
    if not run_id:
        return [runs.FINAL_ADAPTER]
    try:
        return runs.adapter_choices(runs.get(run_id))
    except GarageError:
        return [runs.FINAL_ADAPTER]


def parity_table(report: dict) -> pd.DataFrame:
    rows = []
    for r in report.get("parity") or []:
        f = report["files"][r["quant"]]
        t = r["threshold"]
        rows.append([r["quant"], f"{f['bytes'] / 1e6:.1f} MB", f"{f['bits_per_weight']:.2f}",
                     f"{r['prompt_tokens_same']}/{r['prompts']}",
                     f"{r['top1_agreement']:.3f} (at least {t['top1_at_least']})",
                     f"{r['max_logit_diff']:.2f} (at most {t['max_logit_diff_at_most']})",
                     f"{r['same_answer']}/{r['prompts']}",
                     f"{r['score_gguf']:.2f} vs {r['score_adapter']:.2f}" if "score_gguf" in r else "no checker",
                     f"{r['stops']}/{r['prompts']}", "passed" if r["passed"] else "FAILED: " + "; ".join(r["problems"])])
    return pd.DataFrame(rows, columns=COLUMNS)


def export(run_id: str | None, adapter: str | None, folder: str, quants: list[str], check: bool):
    """The Export button (a generator: consume it): each phase of core.gguf.export on the panel's status line as it
    runs (tools, merge, f16, each quant k of n, each parity prompt k of n), then (status line, result, table).
    `adapter`: the final adapter or a checkpoint, the same path as the CLI's --checkpoint N (core.export.source)."""
    why = run_view.why_not_export(run_id)  # the panel may have been opened on the run before it failed or went
    if why:
        raise refusal(why)
    if not quants:
        raise refusal("Tick at least one GGUF type (q8_0 is a good start).")
    if not (folder or "").strip():
        raise refusal("Give a folder for the export (a new one, or an empty one).")
    try:
        report = yield from progress.stream(
            lambda say: gguf_export.export_gguf(run_id, folder.strip(), quants, runs.checkpoint_of(adapter), say=say,
                                                parity=check),
            lambda line: (line, gr.skip(), gr.skip()))
    except GarageError as e:
        yield "", gr.skip(), gr.skip()  # the phase it stopped in is not a phase any more
        raise refusal(e)  # str(e) already ends with its fix: once is enough
    out = Path(folder.strip()).expanduser()
    passed = all(r["passed"] for r in report["parity"])
    md = [f"**Written to** `{html.escape(str(out))}`: " + ", ".join(f"`{f['file']}`" for f in report["files"].values())
          + ", `Modelfile`, `README.txt`, `export.json`.",
          f"Run it: `cd {html.escape(str(out))} && ollama create {html.escape(run_id.lower())} -f Modelfile`",
          f"Steps (s): {', '.join(f'{k} {v}' for k, v in report['times_s'].items())}"]
    if report["parity"]:
        md.append("**Parity check: passed.**" if passed else "**Parity check: FAILED** (the files are kept; the "
                  "table says what differs).")
    md += [f"Note: {html.escape(n)}" for n in report["notes"]]
    yield "", "  \n".join(md), parity_table(report)


def empty_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=COLUMNS)


def follow(run_id: str | None) -> dict:
    """The panel when its run changes ({"accordion", "folder", "status", "table"}): the previous run's result goes;
    a run that cannot be exported (failed, still training, no adapter) closes the panel and says why, in its title
    (seen closed) and inside it."""
    why = run_view.why_not_export(run_id)
    cleared = {"folder": default_folder(run_id), "table": empty_table()}
    if why:
        return {"accordion": gr.Accordion(open=False, label=f"{TITLE}: not for this run"),
                "status": f"{marks.NOTE} {html.escape(why)}", **cleared}
    return {"accordion": gr.Accordion(label=TITLE), "status": "", **cleared}


def opened_on(run_id: str, adapter: str = runs.FINAL_ADAPTER) -> dict:
    """The panel opened (and shown) on a run and one of its adapters: {ExportPanel field: value}, the adapter list
    read afresh (checkpoints come while a run trains) and the folder its default for that adapter."""
    return {"accordion": gr.Accordion(open=True, visible=True, label=TITLE), "folder": default_folder(run_id, adapter),
            "adapter": gr.update(choices=adapter_choices(run_id), value=adapter)}


def build(pick: gr.Dropdown | gr.State, elem_id: str = PANEL_ID, visible: bool = True) -> ExportPanel:
    """The panel, exporting the run that `pick` holds (the Runs page's picker, the Train page's run)."""
    with gr.Accordion(TITLE, open=False, elem_id=elem_id,
                      visible=visible) as accordion:
        gr.Markdown("Merges the adapter into the 16-bit base (also for a QLoRA run), converts with llama.cpp's own "
                    "converter (downloaded once, about 77 MB), and checks the files against the adapter on the run's "
                    "eval prompts. f16 and q8_0 need nothing else; q4_k_m builds llama.cpp's quantizer the first "
                    "time (a C++ compiler and about 7 CPU-minutes)"
                    + ("" if gguf_tools.quantizer_installed() else " (not built yet on this machine)") + ".")
        with gr.Row():
            adapter = gr.Dropdown(adapter_choices(pick.value), value=runs.FINAL_ADAPTER, label="Adapter", scale=2)
            folder = gr.Textbox(default_folder(pick.value), label="Export folder (new or empty)", scale=3)
            quants = gr.CheckboxGroup(list(gguf_tools.QUANTS), value=["q8_0"], label="GGUF types", scale=3)
            check = gr.Checkbox(value=True, label="parity check", scale=1)
        go = gr.Button("Export GGUF", variant="primary")
        phase = gr.HTML()  # what the export is doing while it runs (progress.stream)
        status = gr.Markdown()
        table = gr.Dataframe(None, headers=COLUMNS, interactive=False, wrap=True, label="Parity with the adapter")
    def _follow(run_id):
        named = follow(run_id)
        return {accordion: named["accordion"], folder: named["folder"], status: named["status"],
                table: named["table"], adapter: gr.update(choices=adapter_choices(run_id), value=runs.FINAL_ADAPTER)}

    pick.change(_follow, pick, [accordion, folder, status, table, adapter], show_progress="hidden")
    adapter.focus(lambda rid, a: gr.update(choices=adapter_choices(rid), value=a), [pick, adapter], adapter,
                  show_progress="hidden")
    adapter.input(default_folder, [pick, adapter], folder, show_progress="hidden")
    # the previous result goes first: a refused export then shows its error over an empty panel, not over the
    # last export's result (which is for other settings)
    go.click(lambda: ("", empty_table()), None, [status, table], queue=False, show_progress="hidden").then(
        export, [pick, adapter, folder, quants, check], [phase, status, table], show_progress="minimal")
    return ExportPanel(accordion, folder, adapter, elem_id)
