"""VRAM panel: full / LoRA / QLoRA side by side as stacked bars, the GPU's total and free memory as lines,
a verdict, and "make it fit" suggestions. Pure formatting over core.estimate.vram; fast enough to run on every change."""

from __future__ import annotations

import copy
import functools
import html

from core import hardware, units
from core.estimate import vram
from core.estimate.vram import COMPONENTS
from core import events as ev
from core.errors import ConfigError
from core.runs import folder as runs
from core.train import distributed
COLORS = {"weights": "#4e79a7", "adapter": "#f28e2b", "gradients": "#e15759", "optimizer": "#76b7b2",
          "activations": "#59a14f", "logits": "#edc948", "generation": "#ff9da7", "overhead": "#b07aa1"}
METHODS = [("full", "Full fine-tune"), ("lora", "LoRA (16-bit base)"), ("qlora", "QLoRA (4-bit base)")]
TARGET_SIZES_GB = [6, 8, 12, 16, 24, 48, 80]


gb = functools.partial(units.gb, digits=2)  # the panel compares close sizes: two decimals


def estimates(cfg, shape, device: str = "cuda", plans: dict | None = None) -> dict:
    """method -> Estimate for the current settings, with only the method swapped (on `device`: cpu is fp32 RAM).
    With several devices (train.devices) each is the estimate for ONE of them under its plan's strategy (`plans`,
    from plans(); None: one device)."""
    ests = {m: vram.estimate(shape, vram.settings_from_config(cfg, method=m, device=device)) for m, _ in METHODS}
    if device == "cuda":
        for m, e in ests.items():
            p = (plans or {}).get(m)
            if p is not None and p.distributed:
                ests[m] = vram.per_gpu(e, p.strategy, p.world_size)
    return ests


def plans(cfg, reading, shape=None) -> dict:
    """The plans of one panel update, from one hardware reading and the model's shape the panel read: "run" is the
    plan a run of these settings makes (core.train.distributed.machine_plan, the training child's own, fits checks
    included), and each method of the panel's rows has the plan with only the method swapped (auto shards only a
    16-bit LoRA that no card holds). All None when train.devices cannot be planned (the form shows that error at
    Start)."""
    try:
        run = distributed.machine_plan(cfg, reading, shape)
        out = {"run": run}
        for m, _ in METHODS:
            swapped = copy.deepcopy(cfg)
            swapped.quant.method = m
            out[m] = run if m == cfg.quant.method else distributed.machine_plan(swapped, reading, shape)
        return out
    except ConfigError:
        return {"run": None, **{m: None for m, _ in METHODS}}


def plan_html(p) -> str:
    """One line under the panel's title: how many processes, the strategy, the effective batch (p: the run's plan,
    or None)."""
    if p is None or not p.distributed:
        return ""
    per = "per GPU" if p.gpus else "per process"
    notes = "".join(f"<div class='lg-dim'>{html.escape(n)}</div>" for n in p.notes)
    return f"<div><b>{per} x {p.world_size}</b> ({html.escape(p.describe())})</div>{notes}"


def method_label(method: str, cfg, device: str) -> str:
    """The row's label in the dtype the run will really use: on the CPU everything trains in fp32."""
    if device == "cpu":
        return {"full": "Full fine-tune (fp32, CPU)", "lora": "LoRA (fp32 base, CPU)",
                "qlora": "QLoRA (4-bit base, fp32 compute, CPU)"}[method]
    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}.get(cfg.quant.compute_dtype, "16-bit")
    return {"full": f"Full fine-tune ({dtype})", "lora": f"LoRA ({dtype} base)", "qlora": "QLoRA (4-bit base)"}[method]


def measured_text(cfg) -> str:
    """The newest run with this model, method and objective: its measured peak beside its estimate (the CPU RAM
    estimate is known to run low: the measured figure says by how much). A GRPO or preference run holds more
    sequences a step than SFT: its peak says nothing of another objective's."""

    for r in runs.list_runs():
        if (r.get("model"), r.get("method"), r.get("objective") or "sft") != \
                (cfg.model.source, cfg.quant.method, cfg.train.objective):
            continue
        run_dir = runs.get(r["id"])
        peak = ev.peak_memory(ev.read(run_dir)[0])
        est = runs.estimate_bytes(run_dir)
        if peak and est:
            kind = "RAM (RSS)" if peak[1] == ev.MEM_RSS else "GPU"
            return (f"Measured on run {html.escape(r['id'])}: peak {gb(peak[0])} {kind} against its estimate of "
                    f"{gb(est)} ({100 * (peak[0] - est) / est:+.0f}%)")
    return ""


def gpu_budget(target: str, reading=None) -> tuple[int | None, int | None, str]:
    """(total, free, label) of the detected GPU or a chosen size like '8 GB'."""
    if target and target != "detected":
        total = vram.card_bytes(float(target.split()[0]))
        return total, total, f"a {target} GPU (usable {gb(total)} after the driver's share)"
    reading = reading or hardware.read()
    if reading.gpus:
        g = reading.gpus[0]
        return g.total, g.free, f"{g.name} ({gb(g.free)} free now)"
    return None, None, "no NVIDIA GPU detected: pick a GPU size to check against"


def render(cfg, shape, ests: dict, total: int | None, free: int | None, gpu_label: str, chosen: str,
           device: str = "cuda", plan=None) -> str:
    scale = max([e.total_bytes for e in ests.values()] + [total or 0]) * 1.05 or 1
    rows = []
    for method, _ in METHODS:
        label = method_label(method, cfg, device)
        e = ests[method]
        segs = "".join(
            f"<div title='{c}: {gb(e.components.get(c, 0))}' style='width:{100 * e.components.get(c, 0) / scale:.3f}%;"
            f"background:{COLORS[c]};height:100%'></div>" for c in COMPONENTS)
        lines = ""
        if total:
            lines += f"<div class='lg-line' title='GPU total {gb(total)}' style='left:{100 * total / scale:.2f}%;border-color:#222'></div>"
        if free and free != total:
            lines += f"<div class='lg-line' title='free now {gb(free)}' style='left:{100 * free / scale:.2f}%;border-color:#cf222e'></div>"
        mark = " <span class='lg-dim'>(selected)</span>" if method == chosen else ""
        v = _verdict_html(e, total, free)
        rows.append(
            f"<div style='margin:6px 0'><div style='display:flex;justify-content:space-between'>"
            f"<span><b>{label}</b>{mark}</span><span>{gb(e.total_bytes)} {v}</span></div>"
            f"<div style='position:relative;display:flex;height:18px;background:#eee;border-radius:3px'>{segs}{lines}</div></div>")
    legend = " ".join(f"<span style='white-space:nowrap'><span style='display:inline-block;width:10px;height:10px;"
                      f"background:{COLORS[c]}'></span> {c}</span>" for c in COMPONENTS)
    line_legend = ("<span style='white-space:nowrap'><span style=\"display:inline-block;width:0;height:10px;border-left:2px dashed #222\"></span> GPU total</span> <span style='color:#cf222e;white-space:nowrap'>"
                   "<span style=\"display:inline-block;width:0;height:10px;border-left:2px dashed #cf222e\"></span> free now</span>") if total else ""
    style = "<style>.lg-line{position:absolute;top:-3px;bottom:-3px;border-left:2px dashed}</style>"
    return (f"{style}<div><div class='lg-dim'>Checked against {html.escape(gpu_label)}</div>{plan_html(plan)}"
            f"{''.join(rows)}"
            f"<div style='font-size:.85em'>{legend} {line_legend}</div>{_table(ests[chosen])}</div>")


def _verdict_html(e, total, free) -> str:
    if not total:
        return ""
    v = vram.verdict(e, total, free)
    cls = {"fits": "lg-verdict-fits", "tight": "lg-verdict-tight"}.get(v.status, "lg-verdict-no")
    return f"<span class='{cls}'>{html.escape(v.status)}</span>"


def _table(e) -> str:
    cells = "".join(f"<tr><td>{c}</td><td style='text-align:right'>{gb(e.components.get(c, 0))}</td></tr>"
                    for c in COMPONENTS)
    return (f"<details><summary>Breakdown of the selected method</summary><table>{cells}"
            f"<tr><td><b>total</b></td><td style='text-align:right'><b>{gb(e.total_bytes)}</b></td></tr></table></details>")


def verdict_text(e, total, free) -> str:
    if not total:
        return "No GPU to check against. Pick a GPU size above to plan."
    v = vram.verdict(e, total, free)
    return f"**{v.status}**: {v.message}" if v.message else f"**{v.status}**"


def cpu_verdict_text(cfg, shape, method: str, reading, p=None) -> str:
    """No GPU: training runs on the CPU in fp32, so hold the CPU estimate against the RAM, as the GPU verdict
    holds the VRAM estimate against the card (p: the run's plan; None: one process)."""
    e = vram.estimate(shape, vram.settings_from_config(cfg, method=method, device="cpu"))
    procs = p.world_size if p is not None and p.distributed and not p.gpus else 1
    v = vram.verdict(e.total_bytes * procs, reading.ram_total, reading.ram_available)  # every process holds a replica
    where = "in RAM (no GPU: training runs on the CPU, slowly)" + (f", {procs} processes" if procs > 1 else "")
    if v.status == "does not fit":
        return (f"**does not fit** {where}: needs {gb(v.needed)}, {gb(v.usable)} of RAM available "
                f"({gb(-v.margin)} short). Lower train.batch_size, data.max_len or lora.r, or pick a smaller model")
    if v.status == "tight":
        return (f"**tight** {where}: {gb(v.needed)} of {gb(v.usable)} available, only {gb(v.margin)} to spare: "
                "close other programs or lower train.batch_size")
    return f"**fits** {where}: {gb(v.needed)} of {gb(v.usable)} available"


def describe_suggestion(s) -> str:
    if s.summary:
        return f"{s.summary} → {gb(s.estimate.total_bytes)}"
    changes = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in s.changes.items())
    return f"{changes} → {gb(s.estimate.total_bytes)}"
