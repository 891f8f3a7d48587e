"""Time to finish a run before it starts: the tokens it will train on, over a throughput measured on an earlier
run with the same model and method, else assumed from the device's peak FLOP/s (core.gpu_specs)."""

from __future__ import annotations

from dataclasses import dataclass

from core import gpu_specs, paths

# Assumed sustained training throughput when nothing was measured yet, as FLOP/s. LoRA costs about
# 4 * params FLOPs per trained token (forward 2N, backward through activations 2N; no weight gradients).
# CPU: a 2-core AVX2/AVX-512 machine sustains ~0.1 TFLOP/s in fp32 matmuls (measured here: SmolLM2-135M,
# batch 4 x ~100 tokens, ~2 s/step). GPU: 35% of the card's dense bf16 peak, a typical hobbyist MFU.
CPU_ASSUMED_FLOPS = 1.0e11
GPU_ASSUMED_MFU = 0.35
GPU_DEFAULT_PEAK = 50e12  # a card not in core.gpu_specs' table


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
    return (gpu_specs.peak_bf16(gpu_name) or GPU_DEFAULT_PEAK) * GPU_ASSUMED_MFU


def measured_tokens_per_s(model_source: str, method: str) -> tuple[float, str] | None:
    """Median tokens/s of the newest run on this machine with the same model and method, if any."""
    from core import events as ev

    logs = sorted(paths.runs_dir().glob(f"*/{ev.FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        cfg_path = log.parent / "config.yaml"
        if not cfg_path.exists():
            continue
        from core.config import load_yaml

        try:
            cfg = load_yaml(cfg_path)
        except Exception:  # noqa: BLE001 - an unreadable old run just does not count as a measurement
            continue
        if cfg.model.source != model_source or cfg.quant.method != method:
            continue
        rates = [float(e[ev.TOKENS_PER_S]) for e in ev.metrics(ev.read(log.parent)[0]) if e.get(ev.TOKENS_PER_S)]
        if len(rates) >= 3:
            rates = sorted(rates[1:])  # the first step includes warm-up
            return rates[len(rates) // 2], f"measured on run {log.parent.name}"
    return None


def before_start(total_tokens: int, params: int, model_source: str, method: str, gpu_name: str | None) -> Eta:
    measured = measured_tokens_per_s(model_source, method)
    if measured:
        tps, source = measured
    else:
        tps = peak_flops(gpu_name) / max(1, 4 * params)
        source = f"assumed for {'the ' + gpu_name if gpu_name else 'the CPU'}; measured after your first run"
    return Eta(total_tokens / max(tps, 1e-9), tps, source)


def for_config(cfg, params: int, gpu_name: str | None) -> Eta | None:
    """The ETA of a run's settings before its dataset was read: train.max_steps optimizer steps, each
    batch_size x grad_accum rows of about half the data.max_len cutoff (rows are rarely all at the cutoff).
    None when the step count depends on the dataset (max_steps <= 0: epochs)."""
    t = cfg.train
    if t.max_steps <= 0:
        return None
    tokens = t.max_steps * t.batch_size * t.grad_accum * cfg.data.max_len // 2
    return before_start(tokens, params, cfg.model.source, cfg.quant.method, gpu_name)
