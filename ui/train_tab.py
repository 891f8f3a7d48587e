"""Train page: pick model, data and preset; see the VRAM cost; start, watch live curves, stop, resume.

Handlers are plain functions (tested directly in tests/ui) that return named results (dataclasses); `build()` lays
out widgets and wires them, turning each result into {component: value}.
"""

from __future__ import annotations

import html
import os
import time
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import gradio as gr
import pandas as pd

import json
from core import config as C
from core import hardware, models, paths, presets, units
from core.runs import access
from core.commands import rewards as rewards_cmd
from core.estimate import eta
from core.runs import runner
from core.runs import folder as runs
from core.runs import stopping
from core.estimate import vram
from core.errors import GarageError
from ui.refuse import refusal
from ui import export_panel, inspect_store, marks, plots, progress, report_view, run_view, train_form, vram_panel
from core.data import sft as data
from core.data.tokenize import NO_SYSTEM, Renderer, template_system

TICK_S = 1.0
N_SUGGESTIONS = 3
N_FILL = 4  # boxes for {{placeholders}} (identity files have two: name and author)


@dataclass
class TrainTab:
    """The widgets other tabs need to reach (the Chat button, the Runs page's Resume)."""
    run_id: gr.State
    timer: gr.Timer
    chat_button: gr.Button
    view: run_view.RunView
    on_load: tuple  # (fn, inputs, outputs) for the app's load event: reattach and draw the VRAM panel


# ---------------------------------------------------------------- handlers: model and data

def model_choices() -> list[str]:
    return [models.BUILTIN_ID] + models.list_cached_models()


def _shape(source: str):
    access.check_source("model.source", source)  # before the cache: a shared app reads no folder outside its own
    return _cached_shape(source)


@lru_cache(maxsize=32)
def _cached_shape(source: str):
    return vram.shape_from_config(models.read_config(source))


def model_info_md(source: str) -> str:
    if not isinstance(source, str):  # only a hand-made API call sends anything else
        return f"{marks.ERROR} Base model: expected builtin:smollm2-135m, a hub id or a folder, as text"
    try:
        shape = _shape(source)
        cfg = models.read_config(source)
    except GarageError as e:
        return f"{marks.ERROR} {html.escape(e.message)}  \n**Fix:** {html.escape(e.hint)}"
    arch = (cfg.get("architectures") or ["?"])[0]
    size, template = _local_facts(source)
    return (f"**{arch}** · {shape.total_params / 1e6:,.0f} M parameters · {cfg.get('num_hidden_layers', '?')} layers"
            f" · vocab {cfg.get('vocab_size', '?'):,} · {size} · {template}")


def _local_facts(source: str) -> tuple[str, str]:
    """Size on disk and chat template, where the model is already on disk (never downloads)."""
    try:
        info = models.info(source) if models.on_disk(source) else None
    except GarageError as e:
        return "size unknown", f"({e.message})"
    if info is None and source == models.BUILTIN_ID:
        return "ships with the app (converted on first use, about a minute)", "has a chat template"
    if info is None and source.lower().endswith(".gguf"):
        size = units.gb(Path(source).expanduser().stat().st_size, 2)
        return f"{size} .gguf file (converted to safetensors once, on first use)", \
            "chat template: read from the file when converted"
    if info is None:
        return "not downloaded yet", "chat template: checked when it loads"
    template = "has a chat template" if info.has_chat_template else "no chat template: a simple default is used"
    return f"{units.gb(info.size_on_disk, 2)} on disk", template


def keep_upload(file_path: str | None) -> str:
    """Copy an uploaded file into the home folder (Gradio's temp copy can vanish) and return its path:
    uploads/<content hash>/<its name>, so a later upload under the same name never replaces the file a run trained
    on (its resume checks the data did not change), and the name the user knows stays as it was."""
    if not file_path:
        return gr.update()
    src = Path(file_path)
    dest_dir = paths.home() / "uploads" / paths.file_sha256(src)[:16]
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    if not dest.exists():  # same name means same bytes: an existing copy is already this upload
        tmp = paths.temp_beside(dest)  # two tabs may upload it at once
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return str(dest)


def upload_follows(source: str | None, uploaded: str | None):
    """The upload box after the dataset box changed: emptied when the dataset is no longer the uploaded file (a
    path typed over it, a preset's dataset), so the page never shows one file while training on another."""
    if not uploaded:
        return gr.skip()
    src = Path(source or "")
    kept = src.name == Path(uploaded).name and src.parent.parent == paths.home() / "uploads"
    return gr.skip() if kept else None


@dataclass
class Inspection:
    """What Inspect shows: the summary (or the error, never a traceback), the length histogram update, the
    preview html, the {{placeholder}} names found and an update for each fill box. `rejected` is the error's text
    when the dataset was refused (Start then refuses it too, with the same words), keyed by `data_key`."""
    summary: str
    histogram: dict
    preview: str
    placeholders: list = field(default_factory=list)
    fill_boxes: list = field(default_factory=list)
    rejected: str | None = None
    data_key: str = ""
    tokens: int = 0   # tokens per epoch and training sequences, for the ETA of an epochs-based run
    rows: int = 0


def data_key(cfg: C.RunConfig) -> str:
    """What an inspection depends on: the model (its tokenizer and template), every data.* setting and the
    objective (which reads the same file as replies, pairs or prompts)."""

    return json.dumps([cfg.model.source, cfg.data.__dict__, cfg.train.objective], sort_keys=True, default=str)


def inspect_page(names: list[str], values: list, report=None) -> Inspection:
    """Read, render and tokenise the dataset as training will. `report(message, done, total)` hears each long
    phase: the one-time conversion of the built-in model, loading the tokenizer, tokenising row k of n."""
    try:
        cfg = train_form.to_config(names, values)
        access.check_config(cfg)
    except GarageError as e:
        return Inspection(_error_md(e), plots.hidden(), "", rejected=str(e))
    key = data_key(cfg)
    md, hist, preview, stats, err = _inspect(cfg, report or (lambda *a: None))
    frame = hist.get("value") if hist.get("visible") else None
    record = {"summary": md, "histogram": frame.to_dict("split")["data"] if frame is not None else None,
              "preview": preview, "placeholders": list(stats.placeholders) if stats else [], "rejected": err,
              "tokens": stats.total_tokens if stats else 0, "rows": stats.train_rows if stats else 0}
    inspect_store.save(key, cfg.data.source, record)  # a reload shows it again (stored_inspection)
    return _inspection(key, record, dict(zip(names, values)).get("data.fill") or {})


def stored_inspection(names: list[str], values: list) -> Inspection | None:
    """The inspection kept for these very settings (ui.inspect_store), if the dataset's files have not changed
    since: what the page shows after a reload, or when the settings come back to ones already inspected."""
    try:
        cfg = train_form.to_config(names, values)
    except GarageError:
        return None
    key = data_key(cfg)
    record = inspect_store.load(key, cfg.data.source)
    if record is None:
        return None
    return _inspection(key, record, cfg.data.fill or {})


def _inspection(key: str, record: dict, fill: dict) -> Inspection:
    found = record["placeholders"]
    boxes = [gr.update(visible=True, label=f"fill {{{{{found[i]}}}}}", value=fill.get(found[i], ""))
             if i < len(found) else gr.update(visible=False, value="") for i in range(N_FILL)]
    if record["histogram"]:
        hist = hist_update(pd.DataFrame(record["histogram"], columns=list(_empty_hist().columns)).astype(
            _empty_hist().dtypes))
    else:
        hist = plots.hidden()
    return Inspection(record["summary"], hist, record["preview"], found[:N_FILL], boxes, record["rejected"], key,
                      record["tokens"], record["rows"])


def fill_from_boxes(found: list[str], *texts) -> dict:
    """data.fill from the fill boxes: {placeholder: value} for the boxes that have a value."""
    return {name: text.strip() for name, text in zip(found or [], texts) if (text or "").strip()}


def _error_md(e: GarageError) -> str:
    return f"{marks.REJECTED} **{html.escape(e.message)}**  \n**Fix:** {html.escape(e.hint)}"


def _inspect(cfg: C.RunConfig, report):
    try:
        report("Loading the tokenizer")
        tok = models.load_tokenizer(cfg.model.source, trust_remote_code=cfg.model.trust_remote_code,
                                    progress=lambda msg: report(f"First use of the model: {msg}"))
        prepared = data.prepare(cfg, tok, progress=lambda done, total: report("Tokenising rows", done, total))
    except GarageError as e:
        return _error_md(e), plots.hidden(), "", None, str(e)
    s = prepared.stats
    cols = ", ".join(f"{k} ← `{v}`" for k, v in s.columns.items()) or "—"
    if s.format == "text":
        # raw text is never cut at the cutoff: it is laid end to end and split into max_len-token chunks
        counts = (f"**{s.rows:,} blocks of text** (the file is read in blocks of about 8,000 characters, cut at "
                  f"blank lines) · format **text** → **{s.train_rows:,} training chunks** of up to {s.max_len} "
                  f"tokens: text longer than a chunk continues in the next one, nothing is cut off")
    else:
        over = s.truncated + s.dropped
        counts = (f"**{s.rows:,} rows** · format **{s.format}** · columns: {cols}  \n"
                  f"{over:,} rows ({100 * over / max(1, s.rows):.1f}%) over the {s.max_len}-token cutoff "
                  f"({s.truncated} truncated, {s.dropped} dropped)")
    template = (f"  \n{marks.NOTE} This model has no chat template: a simple ChatML default "
                "is used." if s.template_is_default else "")
    md = (f"{counts} · {s.trained_tokens:,} trained tokens per epoch of {s.total_tokens:,}{template}"
          + _notes_md(s))
    hist = hist_update(histogram(s.lengths, s.max_len, text=s.format == "text"))
    return md, hist, system_note_md(cfg, tok) + data.preview_html(prepared, n=3), s, None


def system_note_md(cfg: C.RunConfig, tokenizer) -> str:
    """Above the preview: the system prompt every row without one trains with, and where it comes from (the chat
    template's default, which a user often does not know is there, or data.system)."""

    default = template_system(Renderer(tokenizer))
    how = ("Set <b>system</b> under Advanced to replace it, or to <code>none</code> to remove it.")
    if cfg.data.system == NO_SYSTEM:
        text = ("No system prompt: <b>system</b> is <code>none</code>, so rows without one get an empty system turn"
                + (" (this template still writes the empty turn's markers)." if default else "."))
    elif cfg.data.system:
        text = f"Rows without a system prompt train with yours (<b>system</b> under Advanced): “{html.escape(cfg.data.system)}”."
    elif default:
        text = (f"This model's chat template adds a system prompt to every row that has none: "
                f"“{html.escape(default.strip())}”. It is part of what the model learns. {how}")
    else:
        return ""
    return f"<div class='lg-note' style='margin:4px 0 8px'>{marks.NOTE} {text}</div>"


def _notes_md(s) -> str:
    """How the file was read: columns left out, placeholders and their fill, tool and reasoning rendering."""
    lines = [html.escape(n) for n in s.notes if not n.startswith("placeholders not filled")]
    for name, rows in s.placeholders.items():
        state = (f"filled with “{html.escape(s.filled[name])}”" if name in s.filled
                 else "**not filled**: type a value in its box below, or it is trained as literal text")
        lines.append(f"placeholder `{{{{{html.escape(name)}}}}}` in {rows:,} rows: {state}")
    if len(s.placeholders) > N_FILL:
        lines.append(f"more than {N_FILL} placeholders: fill the others with data.fill in a config file")
    return "".join(f"  \n**Note:** {line}" for line in lines)


OVER, FITS, SPLIT = "over the cutoff", "fits", "continues in the next chunk"
HIST_COLORS = {FITS: "#4e79a7", OVER: "#e15759", SPLIT: "#f28e2b"}


def histogram(lengths: list[int], cutoff: int, bins: int = 20, text: bool = False) -> pd.DataFrame:
    """Rows per token-length bin, in length order (the chart keeps this order: its x is text). For raw text,
    longer than the cutoff is not "over": it continues in the next chunk."""
    if not lengths:
        return _empty_hist()
    top = max(max(lengths), cutoff)
    width = max(1, -(-top // bins))
    counts: dict[tuple[int, str], int] = {}
    for n in lengths:
        b = (n // width) * width
        key = (b, (SPLIT if text else OVER) if n > cutoff else FITS)
        counts[key] = counts.get(key, 0) + 1
    rows = [(f"{b}-{b + width - 1}", b, c, kind) for (b, kind), c in sorted(counts.items())]
    return pd.DataFrame(rows, columns=["tokens", "start", "rows", "length"])


def hist_update(frame: pd.DataFrame) -> dict:
    """The histogram shown with `frame`: its bars in length order, and a color_map of the kinds it holds (Gradio
    keeps a chart's colour domain until its color_map changes: a kind new to the chart would draw no bar)."""
    kinds = sorted(set(frame["length"]))
    return gr.update(value=frame, visible=True, elem_classes=[], sort=list(dict.fromkeys(frame["tokens"])),
                     color_map={k: HIST_COLORS[k] for k in kinds})


def _empty_hist() -> pd.DataFrame:
    return pd.DataFrame(columns=["tokens", "start", "rows", "length"]).astype(
        {"tokens": "string", "start": "int64", "rows": "int64", "length": "string"})


# ---------------------------------------------------------------- handlers: presets and VRAM

def preset_md(name: str) -> str:
    """A preset's header comment as Markdown: who it is for in bold, the launch command as code, prose re-flowed."""
    lines = presets.header(name).splitlines()
    if not lines:
        return ""
    paragraphs, current = [f"**{html.escape(lines[0])}**"], []
    for line in lines[1:] + [""]:
        if line.startswith("python -m core") or not line.strip():
            if current:
                paragraphs.append(html.escape(" ".join(current)))
                current = []
            if line.strip():
                paragraphs.append(f"`{line}`")
        else:
            current.append(line.strip())
    return "\n\n".join(paragraphs)


def apply_preset(name: str, names: list[str], values: list) -> tuple[str, list]:
    """-> (the preset's header as Markdown, the form's values with the preset applied, in `names` order). A preset
    sets every field it names and resets the others to their defaults (a DPO preset's objective does not linger
    into the next preset); the description says which fields were put back."""
    try:
        cfg = presets.load(name)
    except GarageError as e:
        raise refusal(str(e))
    try:
        current = dict(zip(names, train_form.values_of(names, train_form.to_config(names, values))))
    except GarageError:  # a bad value in the form: the preset replaces it; the list of resets is then left out
        current = {}
    return preset_md(name) + reset_md(name, current), train_form.values_of(names, cfg)


def reset_md(name: str, current: dict) -> str:
    """Under the preset's header: that it resets what it does not name, and what that put back just now."""
    text = (f"\n\n_This preset sets the {len(presets.named_fields(name))} fields it names and resets every other "
            "field to its default._")
    back = presets.resets(name, current)
    if back:
        text += " Reset now: " + ", ".join(f"`{f}` {html.escape(str(v))} → {html.escape(str(d))}" for f, v, d in back)
    return text


def save_preset(preset_name: str, names: list[str], values: list) -> str:
    if not isinstance(preset_name, str) or not preset_name.strip():
        return f"{marks.ERROR} Type a name for the preset first (letters, digits, - _)."
    try:
        path = presets.save_user_preset(preset_name.strip(), train_form.to_config(names, values))
    except GarageError as e:
        return f"{marks.ERROR} {html.escape(e.message)} — {html.escape(e.hint)}"
    return f"Saved as **{preset_name.strip()}** ({path}). It is now in the preset list."


@dataclass
class VramView:
    """The VRAM column: the panel html, the verdict, the "make it fit" suggestions and the ETA."""
    panel: str
    verdict: str = ""
    suggestions: list = field(default_factory=list)
    eta: str = ""
    title: str = "### VRAM"


def vram_update(target: str, names: list[str], values: list, inspected: dict | None = None) -> VramView:
    """Pure arithmetic: fast, no queue."""
    try:
        cfg = train_form.to_config(names, values)
        shape = _shape(cfg.model.source)
    except GarageError as e:
        return VramView(f"<div class='lg-dim'>{html.escape(e.message)}</div>")
    chosen = cfg.quant.method if cfg.quant.method in ("lora", "qlora") else "lora"
    reading = hardware.read()
    device = "cpu" if target == "detected" and not reading.gpus else "cuda"  # a GPU size picked: plan for it
    plans = vram_panel.plans(cfg, reading, shape)  # once per update: the run's own plan (what the training child picks)
    ests = vram_panel.estimates(cfg, shape, device, plans)
    total, free, label = vram_panel.gpu_budget(target, reading)
    if device == "cpu":
        label = "this machine's RAM (no NVIDIA GPU: training runs on the CPU in fp32; pick a GPU size to plan for one)"
    panel = vram_panel.render(cfg, shape, ests, total, free, label, chosen, device, plans["run"])
    verdict = vram_panel.verdict_text(ests[chosen], total, free)
    if total is None and not reading.gpus:
        verdict = vram_panel.cpu_verdict_text(cfg, shape, chosen, reading, plans["run"])
    suggestions = []
    if total and vram.verdict(ests[chosen], total, free).status != "fits":
        suggestions = [x for x in vram.suggest(shape, vram.settings_from_config(cfg), free or total) if x.changes]
        suggestions = suggestions[:N_SUGGESTIONS]
        if not suggestions:
            verdict += "  \nNothing we can change makes this model fit this GPU: pick a smaller model."
    measured = vram_panel.measured_text(cfg)
    if measured:
        verdict += f"  \n{measured}"
    title = "### Memory (RAM, CPU only)" if device == "cpu" else "### VRAM"
    return VramView(panel, verdict, suggestions, _eta_md(cfg, shape, _gpu_name(target, reading), inspected), title)


def eta_line(target: str, names: list[str], values: list, inspected: dict | None = None) -> str:
    """The ETA line vram_update gives, without the VRAM panel's estimates and suggestions (for the 1 s timer)."""
    try:
        cfg = train_form.to_config(names, values)
        shape = _shape(cfg.model.source)
    except GarageError:
        return ""
    return _eta_md(cfg, shape, _gpu_name(target, hardware.read()), inspected)


def _gpu_name(target: str, reading) -> str | None:
    """The GPU whose measured speed the ETA may use: the detected one, not a size picked to plan for."""
    return reading.gpus[0].name if reading.gpus and target == "detected" else None


def _eta_md(cfg: C.RunConfig, shape, gpu_name: str | None, inspected: dict | None = None) -> str:
    """The ETA before Start: train.max_steps steps, or (epochs) the tokens Inspect counted for these data settings."""
    busy = eta.others_now() if gpu_name is None else 0.0  # a CPU run shares the cores with what runs now
    e = eta.for_config(cfg, shape.total_params, gpu_name, busy=busy)
    if e is not None:
        return f"**ETA** for {cfg.train.max_steps} steps: {e.text()}"
    if inspected and inspected.get("key") == data_key(cfg) and inspected.get("rows"):
        t = cfg.train
        rows_per_step = t.batch_size * t.grad_accum
        steps = -(-int(inspected["rows"] * t.epochs) // rows_per_step)
        per_step = inspected["tokens"] / inspected["rows"] * rows_per_step
        e = eta.before_start(int(inspected["tokens"] * t.epochs), shape.total_params, cfg.quant.method, gpu_name,
                             per_step, busy=busy)
        return f"**ETA** for {t.epochs:g} epoch{'s' if t.epochs != 1 else ''} ({steps} steps): {e.text()}"
    return "ETA: inspect the dataset to know the steps per epoch."


def running_eta_md(run_id: str | None) -> str | None:
    """The ETA line while run_id trains: the same figure as the run status below (core.estimate.eta.for_run, from
    the run's shared feed: run_view.feed), so the page never shows two; None when it is not training (the line then
    shows the next run's ETA)."""
    if not run_id:
        return None
    try:
        run_dir = runs.get(run_id)
        status = runs.read_status(run_dir)
    except GarageError:
        return None
    _, curve, *_ = run_view.feed(run_dir, fresh=status.get("state") in runs.TERMINAL)
    left = eta.for_run(status, curve[-run_view.RECENT_STEPS:])
    return f"**ETA** of run {html.escape(run_id)}: {left.text()}" if left else None


def suggestion_buttons(suggestions: list) -> list:
    """An update for each of the N_SUGGESTIONS buttons: the suggestion it applies, or hidden."""
    return [gr.update(value=f"Apply: {vram_panel.describe_suggestion(suggestions[i])}", visible=True)
            if i < len(suggestions) else gr.update(visible=False) for i in range(N_SUGGESTIONS)]


def apply_suggestion(i: int, suggestions: list, names: list[str], values: list) -> list:
    """The form's values (in `names` order) with suggestion i applied."""
    if i >= len(suggestions):
        return values
    d = train_form.to_config(names, values).to_dict()
    for dotted, value in suggestions[i].changes.items():
        section, name = dotted.split(".")
        d[section][name] = value
    return train_form.values_of(names, C.from_dict(d))


# ---------------------------------------------------------------- handlers: start / stop

def form_check_md(names: list[str], values: list) -> str:
    """Every field checked when it changes, by the same core.config validation Start uses: the first refusal,
    naming the field and the fix, or nothing."""
    try:
        train_form.to_config(names, values).validate()
    except GarageError as e:
        return _error_md(e)
    return ""


def start(names: list[str], values: list, rejected: dict | None = None) -> str:
    """Validate, then start the child process. Returns the run id; errors name the field. A dataset Inspect has
    refused (with these very data settings and model) is refused here too, with the same message, rather than
    failing in the child with a traceback in train.log."""
    try:
        cfg = runner.pin_source_run(train_form.to_config(names, values))  # "latest" -> its run id, as the CLI
        if rejected and rejected.get("key") == data_key(cfg):
            raise refusal(f"Inspect refused this dataset: {rejected['message']}")
        return runner.start(cfg)  # admits the settings (validate, access, limits, data fit) once, as for the CLI
    except GarageError as e:
        raise refusal(str(e))


def try_rewards(names: list[str], values: list):
    """The Try rewards button (a generator: consume it): the form's model samples a few completions for the first
    prompts, each scored by the form's rewards, in a child process (a reward file is the user's code: never imported
    by the app). Yields (phase line, result)."""
    try:
        cfg = train_form.to_config(names, values)
        if cfg.train.objective != "grpo":
            raise refusal("Try rewards is for GRPO: set objective to grpo (in Preference (DPO / ORPO)), give a "
                          "prompt file and turn on a reward in GRPO: rewards.")
        C.validate(cfg)
        C.require_reward(cfg)
    except GarageError as e:
        raise refusal(e)
    try:
        result = yield from progress.stream(lambda say: rewards_cmd.run_child(cfg, progress=say),
                                            lambda line: (line, gr.skip()))
    except GarageError as e:
        yield "", gr.skip()  # the phase it stopped in is not a phase any more
        raise refusal(e)
    yield "", rewards_html(result)


def rewards_html(result: dict) -> str:
    """Try rewards' result: each sampled completion with each reward's score and the weighted total."""
    names = list(result["weights"])
    head = "".join(f"<th>{html.escape(n)} x{result['weights'][n]:g}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(it['prompt'][:160])}</td><td>{html.escape(it['completion']) or '<i>(empty)</i>'}"
        f"</td>" + "".join(f"<td>{it['rewards'][n]:.2f}</td>" for n in names) + f"<td><b>{it['reward']:.2f}</b></td></tr>"
        for it in result["items"])
    fired = {n: sum(it["rewards"][n] > 0 for it in result["items"]) for n in names}
    never = [n for n in names if fired[n] == 0]
    note = (f"<p>{marks.NOTE} {html.escape(', '.join(never))} gave 0 to every completion: with no difference inside "
            "a group GRPO has nothing to learn from it. Loosen it, or raise the temperature.</p>" if never else "")
    return (f"<p>{html.escape(result['model'])}: {len(result['items'])} completions at temperature "
            f"{result['temperature']:g}, up to {result['max_tokens']} tokens.</p>{note}"
            f"<table><tr><th>prompt</th><th>completion</th>{head}<th>total</th></tr>{rows}</table>")


def open_export(run_id: str | None) -> dict:
    """"Export to GGUF / Ollama": the page's export panel shown and opened on the run ({"accordion", "folder"}),
    checked against the run folder first: a run that lost its adapter since the button showed is refused, named."""
    why = run_view.why_not_export(run_id)
    if why:
        raise refusal(why)
    return export_panel.opened_on(run_id)


def stop(run_id: str | None) -> str:
    if not run_id:
        return "No run to stop."
    try:
        runner.request_stop(run_id)
        note = stopping.stopping_note(runs.read_status(runs.get(run_id)))
    except GarageError as e:
        raise refusal(str(e))
    return f"{run_id}: {note}."


def resume(run_id: str | None) -> str:
    if not run_id:
        raise refusal("No run selected to resume.")
    try:
        return runner.resume(run_id)
    except GarageError as e:
        raise refusal(str(e))


def running_form(names: list[str], run_id: str | None) -> list | None:
    """The form's values (in `names` order) from the settings of run_id while it trains, else None."""
    if not run_id or runner.running() != run_id:
        return None
    try:
        return train_form.values_of(names, runs.load_config(runs.get(run_id)))
    except GarageError:
        return None


def attach() -> str | None:
    """On page load: the run that is training now (after a refresh or an app restart), else the newest run,
    so a refresh after the end still shows how it ended."""
    rid = runner.running()
    if rid:
        return rid
    newest = runs.list_runs()
    return newest[0]["id"] if newest else None


# ---------------------------------------------------------------- layout

def build() -> TrainTab:
    defaults = presets.load(presets.DEFAULT_PRESET)
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### 1 · Model")
            model_dd = gr.Dropdown(model_choices(), value=defaults.model.source, allow_custom_value=True,
                                   label="Base model", info="The built-in model, a model in your HF cache, "
                                   "a local folder, or a hub id like Qwen/Qwen2.5-0.5B-Instruct")
            model_md = gr.Markdown(model_info_md(defaults.model.source))
            gr.Markdown("### 2 · Dataset")
            # one above the other: side by side, the upload box cut file names ("alpac… .json") and the path wrapped
            data_tb = gr.Textbox(defaults.data.source, label="Dataset", max_lines=1,
                                 info="builtin:demo-identity, a file or folder path, or a hub dataset id")
            upload = gr.File(label="…or upload a file (.jsonl .json .csv .tsv .parquet .txt .md)",
                             file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"],
                             type="filepath", height=120)
            with gr.Row():
                fmt = gr.Dropdown(list(C.field_choices("data.format")), value=defaults.data.format,
                                  label="format", info=C.field_help("data.format"))
                cols = gr.Textbox("", label="column mapping", info=C.field_help("data.columns"))
                split = gr.Textbox(defaults.data.split, label="split", info=C.field_help("data.split"))
                subset = gr.Textbox(defaults.data.subset, label="subset", info=C.field_help("data.subset"))
            inspect_btn = gr.Button("Inspect dataset", size="sm")
            data_status = gr.HTML()  # what Inspect is doing while it runs (progress.stream)
            data_md = gr.Markdown()
            rejected = gr.State({})  # {key, message} of the dataset Inspect refused: Start refuses it too
            inspected = gr.State({})  # {key, tokens, rows} Inspect counted: the ETA of an epochs-based run
            with gr.Row():  # shown by Inspect, one per {{placeholder}} the file holds
                fill_boxes = [gr.Textbox(visible=False, label="fill", info=C.field_help("data.fill"))
                              for _ in range(N_FILL)]
            fill_found = gr.State([])
            fill = gr.State(dict(defaults.data.fill))
            hist = gr.BarPlot(visible=False, value=None, x="tokens", y="rows", color="length", sort=None,
                              title="Token length per row against the cutoff", height=220,
                              color_map=HIST_COLORS)
            with gr.Accordion("Preview: exactly what the model sees (green = trained, grey = masked)", open=False):
                preview = gr.HTML()
            gr.Markdown("### 3 · Preset and settings")
            with gr.Row():
                preset_dd = gr.Dropdown(presets.list_presets(), value=presets.DEFAULT_PRESET, label="Preset",
                                        info="Settings by GPU size; every setting below stays editable", scale=2)
                preset_name = gr.Textbox(label="Save current settings as", placeholder="my-setup", scale=2)
                save_btn = gr.Button("Save preset", size="sm", scale=1)
            preset_text = gr.Markdown(preset_md(presets.DEFAULT_PRESET))
            save_md = gr.Markdown()
            leading = [("model.source", model_dd), ("data.source", data_tb), ("data.format", fmt),
                       ("data.columns", cols), ("data.split", split), ("data.subset", subset), ("data.fill", fill)]
            form = train_form.build(defaults, leading)
            try_btn = gr.Button("Try rewards (GRPO): 3 prompts, 2 completions each, scored", size="sm")
            try_phase = gr.HTML()  # the child's phases while it loads, reads and samples (progress.stream)
            try_out = gr.HTML()
        with gr.Column(scale=2):
            vram_title = gr.Markdown("### VRAM")
            target = gr.Dropdown(["detected"] + [f"{g} GB" for g in vram_panel.TARGET_SIZES_GB], value="detected",
                                 label="Check against")
            vram_html = gr.HTML()
            verdict_md = gr.Markdown()
            suggestions = gr.State([])
            sugg_btns = [gr.Button(visible=False, size="sm", variant="secondary") for _ in range(N_SUGGESTIONS)]
            eta_md = gr.Markdown()
            form_check = gr.Markdown()  # the first setting config.validate refuses, as soon as it changes
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
            view = run_view.build()
            report_section = report_view.build()  # under the run: filled once it has an adapter
    run_id = gr.State(None)
    # full width under both columns, shown by the run view's "Export to GGUF / Ollama" (an ended run's adapter)
    export = export_panel.build(run_id, elem_id=export_panel.TRAIN_PANEL_ID, visible=False)
    timer = gr.Timer(TICK_S, active=False)
    names, widgets = form.names, form.widgets

    # --- wiring: model, data, presets
    model_dd.change(model_info_md, model_dd, model_md)
    upload.upload(keep_upload, upload, data_tb)
    data_tb.change(upload_follows, [data_tb, upload], upload, queue=False, show_progress="hidden")

    def _inspect_clicked(*v):
        # the chart is cleared first: it then takes its colours afresh from the new data ("over the cutoff" may
        # be new); the old results go at once, and the status line says what is happening until the new ones come
        yield {hist: plots.hidden(), data_md: "", preview: ""}  # hidden, never emptied (see plots.hidden)
        r = yield from progress.stream(lambda report: inspect_page(names, list(v), report),
                                       lambda line: {data_status: line})
        yield {data_status: "", **_shown(r)}

    def _shown(r: Inspection) -> dict:
        return {data_md: r.summary, hist: r.histogram, preview: r.preview, fill_found: r.placeholders,
                rejected: {"key": r.data_key, "message": r.rejected} if r.rejected else {},
                inspected: {"key": r.data_key, "tokens": r.tokens, "rows": r.rows} if not r.rejected else {},
                **dict(zip(fill_boxes, r.fill_boxes))}

    inspect_outputs = [data_md, hist, preview, fill_found, rejected, inspected] + fill_boxes
    inspect_btn.click(_inspect_clicked, widgets, [data_status] + inspect_outputs)
    def _try_rewards(*vals):
        yield from try_rewards(names, list(vals))

    try_btn.click(_try_rewards, widgets, [try_phase, try_out], show_progress="hidden")

    def _data_changed(*v):
        # results belong to one dataset: a new one clears them until it is inspected, unless these very settings
        # were inspected before (a reload, or settings changed back): then those results, kept on disk
        r = stored_inspection(names, list(v))
        if r is not None:
            return {data_status: "", **_shown(r)}
        return {data_md: "", hist: plots.hidden(), preview: "", data_status: ""}

    for w in (model_dd, data_tb, fmt, cols, split, subset):
        w.change(_data_changed, widgets, [data_status] + inspect_outputs, queue=False, show_progress="hidden")
    for box in fill_boxes:
        box.change(fill_from_boxes, [fill_found] + fill_boxes, fill, queue=False, show_progress="hidden")
    def _preset_picked(p, *v):
        header, new_values = apply_preset(p, names, list(v))
        return {preset_text: header, **dict(zip(widgets, new_values))}

    preset_dd.change(_preset_picked, [preset_dd] + widgets, [preset_text] + widgets)
    save_btn.click(lambda p, *v: save_preset(p, names, list(v)), [preset_name] + widgets, save_md)

    # --- wiring: VRAM panel on every settings change (no queue: it is arithmetic)
    def _vram(t, insp, *v):
        r = vram_update(t, names, list(v), insp)
        return {vram_html: r.panel, verdict_md: r.verdict, suggestions: r.suggestions, eta_md: r.eta,
                vram_title: r.title,
                **dict(zip(sugg_btns, suggestion_buttons(r.suggestions)))}

    vram_outputs = [vram_html, verdict_md, suggestions, eta_md, vram_title] + sugg_btns
    for w in [target, inspected] + widgets:
        w.change(_vram, [target, inspected] + widgets, vram_outputs, queue=False, show_progress="hidden")
    for i, b in enumerate(sugg_btns):
        b.click(lambda s, *v, i=i: dict(zip(widgets, apply_suggestion(i, s, names, list(v)))),
                [suggestions] + widgets, widgets)

    # --- wiring: start / stop / live view
    for w in widgets:
        w.change(lambda *v: form_check_md(names, list(v)), widgets, form_check, queue=False, show_progress="hidden")
    start_btn.click(lambda rej, *v: start(names, list(v), rej), [rejected] + widgets, run_id).success(
        lambda: gr.Timer(active=True), None, timer).then(None, None, None, js=run_view.SCROLL_TO_STATUS)
    stop_btn.click(stop, run_id, view.status)
    # while a run trains, the ETA line shows its ETA (the same as the run status), in the run view's own tick; the
    # tick that finds the run ended sets run_ended instead, and the line goes back to the form's next run
    run_ended = gr.State(None)

    def _eta_now(rid, named):
        line = running_eta_md(rid)
        if line is not None:
            return {eta_md: line}
        if named["keep"]:
            return {}
        # the run's line goes at once (never left standing after its end); the form's comes with run_ended's change
        return {eta_md: "", run_ended: (rid, time.time())}  # a new value each time: .change fires

    run_view.wire(view, run_id, timer, also=(_eta_now, [eta_md, run_ended]))
    report_view.wire(report_section, run_id, export)
    view.resume_btn.click(resume, run_id, run_id).success(lambda: gr.Timer(active=True), None, timer)

    run_ended.change(_vram, [target, inspected] + widgets, vram_outputs, show_progress="hidden")

    def _on_load(t, insp, *v):
        rid = attach()
        out = {run_id: rid, timer: gr.Timer(active=bool(rid)), **_vram(t, insp, *v)}
        form_values = running_form(names, rid)
        if form_values is not None:  # after a restart the form shows the run that is training, not defaults
            out.update(zip(widgets, form_values))
        kept = stored_inspection(names, form_values if form_values is not None else list(v))
        if kept is not None:  # Inspect's results outlive a reload, as the run does
            out.update(_shown(kept))
        return out

    def _export_open(rid):
        named = open_export(rid)
        return {getattr(export, k): v for k, v in named.items()}

    view.export_btn.click(_export_open, run_id, [export.accordion, export.folder, export.adapter]).success(
        None, None, None, js=export_panel.scroll_to(export_panel.TRAIN_PANEL_ID))
    return TrainTab(run_id=run_id, timer=timer, chat_button=view.chat_btn, view=view,
                    on_load=(_on_load, [target, inspected] + widgets,
                             [run_id, timer] + vram_outputs + widgets + inspect_outputs))
