"""The header bar on every page: GPU name, used/total VRAM, utilisation, temperature, or "CPU only"."""

import html

import gradio as gr

from core import hardware
from core.units import GiB, gb
from ui import marks

POLL_S = 5


def render() -> str:
    r = hardware.read()
    if not r.gpus and r.apple_gpu:  # an Apple Silicon Mac: the GPU (MPS) shares the RAM shown on the right
        gpu = f"<b>{html.escape(r.apple_gpu)} GPU</b> <span class='lg-dim'>(MPS, shares the RAM)</span>"
    elif not r.gpus:
        gpu = f"<b>CPU only</b> <span class='lg-dim'>({html.escape(r.nvml_error or 'no NVIDIA GPU')})</span>"
    else:
        parts = []
        for g in r.gpus:
            used = (g.total - g.free) / GiB
            extra = "".join(f" · {v}" for v in (f"{g.util}%" if g.util is not None else None,
                                                 f"{g.temp}°C" if g.temp is not None else None) if v)
            parts.append(f"<b>{html.escape(g.name)}</b> {used:.1f} / {gb(g.total)}{extra}")
        gpu = " | ".join(parts)
    ram = f"RAM {(r.ram_total - r.ram_available) / GiB:.1f} / {gb(r.ram_total)} · {r.cpu_count} CPU cores"
    return f"<div class='lg-bar'><span class='lg-brand'>{marks.BRAND}LoRA Garage</span><span>{gpu}</span><span class='lg-dim'>{ram}</span></div>"


def build() -> gr.HTML:
    bar = gr.HTML(render())
    timer = gr.Timer(POLL_S)
    timer.tick(render, outputs=bar, show_progress="hidden", queue=False)
    return bar
