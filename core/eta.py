"""Time to finish a run, before it starts (from tokens per epoch and a measured or assumed throughput) and
while it runs (from the steps done so far)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from core import paths

# Assumed sustained training throughput when nothing was measured yet, as FLOP/s. LoRA costs about
# 4 * params FLOPs per trained token (forward 2N, backward through activations 2N; no weight gradients).
# CPU: a 2-core AVX2/AVX-512 machine sustains ~0.1 TFLOP/s in fp32 matmuls (measured here: SmolLM2-135M,
# batch 4 x ~100 tokens, ~2 s/step). GPU: 35% of the card's dense bf16 peak, a typical hobbyist MFU.
CPU_ASSUMED_FLOPS = 1.0e11
GPU_ASSUMED_MFU = 0.35
GPU_PEAK_BF16 = {  # dense (no sparsity) bf16 tensor TFLOP/s, vendor spec sheets
    "4090": 165e12, "4080": 97e12, "4070": 58e12, "4060": 30e12, "3090": 71e12, "3080": 59e12,
    "3070": 40e12, "3060": 25e12, "a100": 312e12, "h100": 989e12, "h200": 989e12, "l4": 121e12,
    "t4": 65e12, "a10": 125e12, "v100": 125e12,
}
GPU_DEFAULT_PEAK = 50e12


@dataclass
class Eta:
    seconds: float
    tokens_per_s: float
    source: str  # "measured on run X" or "assumed"

    def text(self) -> str:
        return f"~{format_duration(self.seconds)} at {self.tokens_per_s:,.0f} tokens/s ({self.source})"


def format_duration(s: float) -> str:
    s = int(max(0, s))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def peak_flops(gpu_name: str | None) -> float:
    if not gpu_name:
        return CPU_ASSUMED_FLOPS
    low = gpu_name.lower()
    for key, flops in GPU_PEAK_BF16.items():
        if key in low:
            return flops * GPU_ASSUMED_MFU
    return GPU_DEFAULT_PEAK * GPU_ASSUMED_MFU


def measured_tokens_per_s(model_source: str, method: str) -> tuple[float, str] | None:
    """Median tokens/s of the newest run on this machine with the same model and method, if any."""
    runs = sorted(paths.runs_dir().glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ev in runs:
        cfg_path = ev.parent / "config.yaml"
        if not cfg_path.exists():
            continue
        from core.config import load_yaml

        try:
            cfg = load_yaml(cfg_path)
        except Exception:  # noqa: BLE001 - an unreadable old run just does not count as a measurement
            continue
        if cfg.model.source != model_source or cfg.quant.method != method:
            continue
        rates = []
        for line in ev.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("type") == "metrics" and e.get("tokens_per_s"):
                rates.append(float(e["tokens_per_s"]))
        if len(rates) >= 3:
            rates = sorted(rates[1:])  # the first step includes warm-up
            return rates[len(rates) // 2], f"measured on run {ev.parent.name}"
    return None


def before_start(total_tokens: int, params: int, model_source: str, method: str, gpu_name: str | None) -> Eta:
    measured = measured_tokens_per_s(model_source, method)
    if measured:
        tps, source = measured
    else:
        tps = peak_flops(gpu_name) / max(1, 4 * params)
        source = f"assumed for {'the ' + gpu_name if gpu_name else 'the CPU'}; measured after your first run"
    return Eta(total_tokens / max(tps, 1e-9), tps, source)
