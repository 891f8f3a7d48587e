"""Time to finish a run: the one ETA every page and command shows.

During a run it comes from the run's own recent steps (the metrics events carry eta_s, the callback's remaining
steps x the mean of the last 20 step times), counted down from the time that event was written. Before a run it
comes from runs measured on this machine that were of similar size (same method, objective and device, model size
within 2x, tokens per step within 4x), their rate scaled by model size; with fewer than two such runs it is a guess and says
so, with its range: one run alone (perhaps on a busy machine) is averaged with the rate assumed from the device's
peak FLOP/s (core.estimate.gpu_specs), never taken as it is.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import psutil

import datetime as dt
import json
from core import paths
from core.estimate import gpu_specs
from core import events as ev
from core import models
from core.config import load_yaml
from core.errors import GarageError
from core.estimate import vram

# Assumed sustained training throughput when nothing was measured yet, as FLOP/s. LoRA costs about
# 4 * params FLOPs per trained token (forward 2N, backward through activations 2N; no weight gradients).
# CPU: a 2-core AVX2/AVX-512 machine sustains ~0.1 TFLOP/s in fp32 matmuls (measured here: SmolLM2-135M,
# batch 4 x ~100 tokens, ~2 s/step). GPU: 35% of the card's dense bf16 peak, a typical hobbyist MFU.
CPU_ASSUMED_FLOPS = 1.0e11
# GRPO's tokens (prompt + completion, per generation) go through sampling one token at a time before the
# policy's forward/backward: measured here, cpu-grpo-demo ran at 111 and 137 tokens/s on 2 quiet cores where the
# assumption above gives 186, so a CPU GRPO run is assumed 1.5x slower per token. Not measured on a GPU, where
# sampling without a serving engine is latency-bound and may cost more: there the ETA says so until GRPO runs
# are measured.
GRPO_CPU_SLOWER = 1.5
GPU_ASSUMED_MFU = 0.35
GPU_DEFAULT_PEAK = 50e12  # a card not in core.estimate.gpu_specs' table

SIMILAR_PARAMS = 2.0          # a measured run counts when its model is within this factor of the planned one
SIMILAR_TOKENS_PER_STEP = 4.0  # ... and its tokens per optimizer step within this factor
ASSUMED_SPREAD = 2.0          # an assumed rate may be off by this factor either way
CPU_BUSY_FACTOR = 4.0         # ... and on the CPU up to this much slower: other programs share the cores (measured
                              # here: a 5-step cpu-demo run took 3.4x the assumed time with the load average at 8)
MIN_STEPS = 3                 # metrics events a run needs to count as measured (the first is warm-up)
BUSY_AT = 0.25                # other programs' load, in cores per core, from which the CPU ETA says it is busy
OTHERS_LOAD = "others_load"   # status.json: the load average less the run's own threads, while it trained


def others_load(own_threads: int = 0) -> float:
    """Cores' worth of runnable work from other programs over the last minute: the 1-minute load average less
    `own_threads` (the caller's own busy threads), 0 where the system has no load average (Windows). A CPU run gets
    about cores / (cores + this) of the machine. The training child records it while it trains (its own threads
    keep the average up, so a run that ended just before does not count); before Start use others_now."""
    if not hasattr(os, "getloadavg"):
        return 0.0
    return round(max(0.0, os.getloadavg()[0] - own_threads), 2)


RUNNABLE = Path("/proc/loadavg")  # Linux: its 4th field is "runnable threads now / all threads"
NOW_WINDOW_S = 0.5                # others_now averages this long, sampling every 25 ms
NOW_KEEP_S = 5.0                  # and a reading this young is used again (the Train page asks on every change)
_now_cache: tuple[float, float] | None = None


def others_now(max_age_s: float = NOW_KEEP_S) -> float:
    """Cores' worth of runnable work from other programs right now: the kernel's count of runnable threads averaged
    over NOW_WINDOW_S, less the thread reading it; a reading younger than max_age_s is used again (0: read afresh).
    The 1-minute load average remembers the last minute: right after a run ended it still counted that run's
    threads, and the ETA of the next run came out 1.9x too long on an idle machine. Where there is no such count
    (macOS, Windows), the load average (others_load)."""
    global _now_cache
    if _now_cache and time.monotonic() - _now_cache[0] < max_age_s:
        return _now_cache[1]
    try:
        counts = []
        end = time.monotonic() + NOW_WINDOW_S
        while True:
            counts.append(int(RUNNABLE.read_text().split()[3].split("/")[0]) - 1)
            if time.monotonic() >= end:
                break
            time.sleep(0.025)
        value = round(max(0.0, sum(counts) / len(counts)), 2)
    except (OSError, IndexError, ValueError):
        value = others_load()
    _now_cache = (time.monotonic(), value)
    return value


def training_cores() -> int:
    """The threads a CPU run trains with on a quiet machine, known without torch: OMP_NUM_THREADS where set, else
    the physical cores, as torch's intra-op default (the child's torch.get_num_threads(); os.cpu_count() counts
    each core's SMT siblings too). The training child shares these (core.train.child.share_the_cores)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_threads(others: float, cores: int) -> int:
    """The threads a CPU run trains with while other programs keep `others` cores' worth of work running: the cores
    they leave free, at least 1 (the training child sets it, core.train.child.share_the_cores). Its threads wait
    for each other at every operation, so one that shares its core with a busy program holds them all back:
    measured on 2 cores beside one busy loop, cpu-demo's 10 steps took 98.9 s on 2 threads and 18.1 s on 1 (10.2 s
    on 2 threads alone)."""
    return max(1, min(cores, round(cores - max(0.0, others))))


def cpu_slowdown(others: float, cores: int | None = None) -> float:
    """How much slower a CPU run trains with `others` cores' worth of other work: the scheduler shares the cores
    fairly, so 1 + others / cores."""
    return 1.0 + max(0.0, others) / max(1, cores or os.cpu_count() or 1)


@dataclass
class Eta:
    seconds: float
    tokens_per_s: float | None
    source: str                  # where the figure comes from, in words
    low: float | None = None     # the range (seconds) when it is a guess
    high: float | None = None
    startup_s: float | None = None  # before the first step (loading the model and data), measured on this machine

    @property
    def guess(self) -> bool:
        return self.low is not None

    def text(self) -> str:
        rate = f" at {self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else ""
        load = (f", plus ~{format_duration(self.startup_s)} to load the model and data"
                if self.startup_s else "")
        if self.guess:
            return (f"~{format_duration(self.seconds)} of training{rate}, a guess: between "
                    f"{format_duration(self.low)} and {format_duration(self.high)}{load} ({self.source})")
        return f"~{format_duration(self.seconds)}{rate}{load} ({self.source})"


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


# ---------------------------------------------------------------- during a run

def for_run(status: dict, events: list[dict], now: float | None = None) -> Eta | None:
    """The ETA of a run in progress, from its own recent steps; None when it is not training (or has no step yet)."""

    if status.get("state") not in ("running", "stopping"):
        return None
    m = [e for e in ev.metrics(events) if e.get(ev.ETA_S) is not None]
    if not m:
        return None
    last = m[-1]
    since = max(0.0, (now or time.time()) - float(last.get(ev.T) or 0))
    remaining = max(0.0, float(last[ev.ETA_S]) - since)
    rates = sorted(float(e[ev.TOKENS_PER_S]) for e in m[-20:] if e.get(ev.TOKENS_PER_S))
    tps = rates[len(rates) // 2] if rates else None
    n = min(len(m), 20)
    return Eta(remaining, tps, f"from this run's last {n} step{'s' if n > 1 else ''}")


def follow(run_dir: Path, tail: dict | None) -> dict:
    """A run's metrics curve read on from where `tail` stopped (core.events.read from its offset: only the bytes
    appended since are parsed), for a view that polls a running run. -> the new tail {"run_dir", "offset",
    "metrics"}; None or another run's tail starts from the beginning."""
    if not tail or tail.get("run_dir") != str(run_dir):
        tail = {"run_dir": str(run_dir), "offset": 0, "metrics": []}
    new, offset = ev.read(run_dir, tail["offset"])
    # the curve so far plus the new events is the curve of the whole file: a resume event drops the superseded steps
    return {"run_dir": str(run_dir), "offset": offset, "metrics": ev.metrics(tail["metrics"] + new)}


# ---------------------------------------------------------------- before a run

@dataclass
class Measured:
    """One earlier run on this machine, as the ETA compares it."""
    run: str
    method: str
    device: str            # "cpu" or "gpu"
    params: int            # 0 when the model's size is unknown
    tokens_per_step: float
    tokens_per_s: float    # median over its steps after the first (warm-up)
    startup_s: float | None = None  # from start to the first step: loading the model and the data
    data: tuple = ()       # (data.source, data.max_len): what its rows were
    rows_per_step: int = 0  # batch_size x grad_accum
    slowdown: float = 1.0  # cpu_slowdown of the other programs' load while it trained (1: quiet or unknown)
    objective: str = "sft"  # train.objective: sft | dpo | orpo | grpo; a GRPO token costs sampling too


def measure(run_dir: Path, params_of=None) -> Measured | None:
    """What run_dir measured, read through core.events; None when it has fewer than MIN_STEPS steps."""

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.exists():
        return None
    cfg = load_yaml(cfg_path)
    m = ev.metrics(ev.read(run_dir)[0])
    if len(m) < MIN_STEPS:
        return None
    rates, per_step = [], []
    for a, b in zip(m, m[1:]):  # pairs skip the first step: its time includes warm-up
        steps = b.get(ev.STEP, 0) - a.get(ev.STEP, 0)
        dt = (b.get(ev.ELAPSED) or 0) - (a.get(ev.ELAPSED) or 0)
        tps = b.get(ev.TOKENS_PER_S)
        if steps <= 0 or dt <= 0 or not tps:  # a resume restarts elapsed
            continue
        rates.append(float(tps))
        per_step.append(float(tps) * dt / steps)
    if not rates:
        return None
    mem = (m[-1].get(ev.MEM) or {})
    device = "cpu" if ev.MEM_RSS in mem and ev.MEM_GPU_PEAK not in mem and ev.MEM_TORCH_PEAK_RESERVED not in mem \
        else "gpu"
    return Measured(Path(run_dir).name, cfg.quant.method, device, (params_of or param_count)(cfg.model.source),
                    _median(per_step), _median(rates), _startup(run_dir, m[0]), (cfg.data.source, cfg.data.max_len),
                    cfg.train.batch_size * cfg.train.grad_accum, _slowdown_then(run_dir) if device == "cpu" else 1.0,
                    cfg.train.objective)


def _slowdown_then(run_dir: Path) -> float:
    try:
        st = json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return 1.0
    return cpu_slowdown(float(st.get(OTHERS_LOAD) or 0.0))


def _startup(run_dir: Path, first: dict) -> float | None:
    """Seconds from the training process's start (status.json pid_create_time, which counts Python's imports;
    else started_at) to its first step (the first event's t - elapsed)."""

    try:
        st = json.loads((Path(run_dir) / "status.json").read_text())
    except FileNotFoundError:
        return None
    if st.get("pid_create_time"):
        start = float(st["pid_create_time"])
    elif st.get("started_at"):
        start = dt.datetime.fromisoformat(st["started_at"]).timestamp()
    else:
        return None
    if first.get(ev.T) is None or first.get(ev.ELAPSED) is None:
        return None
    startup = float(first[ev.T]) - float(first[ev.ELAPSED]) - start
    return startup if 0 <= startup < 24 * 3600 else None


# events file -> ((mtime_ns, size, params_of), what measure() gave: Measured, None, or the exception it raised).
# Replaced whole (one assignment) by each measured_runs call, so concurrent page handlers never see it half-built.
_measured_cache: dict[Path, tuple[tuple, object]] = {}


def measured_runs(params_of=None) -> list[Measured]:
    """Every run on this machine with enough steps to count, newest first. The form asks on every change: a run is
    parsed again only when its events file changed (mtime or size; a run's config is written once, and a resume
    appends events)."""
    global _measured_cache

    logs = []
    for log in paths.runs_dir().glob(f"*/{ev.FILE}"):
        try:
            logs.append((log, log.stat()))
        except FileNotFoundError:
            continue  # deleted between the listing and now: it is no longer a run
    logs.sort(key=lambda item: item[1].st_mtime, reverse=True)
    cache, out = {}, []
    for log, st in logs:
        key = (st.st_mtime_ns, st.st_size, params_of)
        hit = _measured_cache.get(log)
        if hit is None or hit[0] != key:
            try:
                hit = (key, measure(log.parent, params_of))
            except Exception as e:  # noqa: BLE001 - an old unreadable run must not break the page: it does not count
                hit = (key, e)
        cache[log] = hit
        found = hit[1]
        if isinstance(found, Exception):
            warnings.warn(f"ETA: run {log.parent.name} not counted as a measurement: {found}", stacklevel=2)
        elif found:
            out.append(found)
    _measured_cache = cache
    return [m for m in out if m.tokens_per_s > 0]


def similar(runs: list[Measured], method: str, device: str, params: int, tokens_per_step: float,
            objective: str = "sft") -> list[Measured]:
    def near(a: float, b: float, factor: float) -> bool:
        return a > 0 and b > 0 and max(a, b) / min(a, b) <= factor

    return [r for r in runs if r.method == method and r.objective == objective and r.device == device
            and near(r.params, params, SIMILAR_PARAMS) and near(r.tokens_per_step, tokens_per_step, SIMILAR_TOKENS_PER_STEP)]


def before_start(total_tokens: int, params: int, method: str, gpu_name: str | None, tokens_per_step: float,
                 measured: list[Measured] | None = None, busy: float = 0.0, objective: str = "sft") -> Eta:
    """The ETA of `total_tokens` trained tokens before the run starts (see the module's docstring). On the CPU,
    `busy` is the other programs' load now (the Train page passes others_now()): each measured run's rate is
    first made a quiet machine's (times the slowdown it met), then slowed by today's. Only runs of the same
    objective count: a GRPO token costs its sampling too."""
    device = "gpu" if gpu_name else "cpu"
    now = cpu_slowdown(busy) if device == "cpu" else 1.0
    grpo = objective == "grpo"
    assumed = peak_flops(gpu_name) / max(1, 4 * params) / now / (GRPO_CPU_SLOWER if grpo and not gpu_name else 1.0)
    where = f"the {gpu_name}" if gpu_name else "the CPU"
    measured = measured_runs() if measured is None else measured
    runs = similar(measured, method, device, params, tokens_per_step, objective)
    # scaled: time per token ~ model size; and from the load each run met to the load now
    rates = [r.tokens_per_s * r.slowdown / now * r.params / max(params, 1) for r in runs]
    eta = _before_start(total_tokens, assumed, where, measured, runs, rates, device, params, gpu_name)
    if grpo and gpu_name and len(rates) < 2:
        eta.source += "; GRPO's sampling on a GPU is not in this guess: it is counted once GRPO runs are measured"
    if now >= 1 + BUSY_AT:
        cores = training_cores()
        threads = cpu_threads(busy, cores)
        on = f"uses {threads} of its {cores} cores and " if threads < cores else ""
        eta.source += (f"; this machine is busy: other programs keep about {busy:.1f} cores' worth of work running, "
                       f"so training {on}runs about {now:.1f}x slower")
    return eta


def _before_start(total_tokens, assumed, where, measured, runs, rates, device, params, gpu_name) -> Eta:
    total = max(total_tokens, 0)
    loads = [r.startup_s for r in measured if r.startup_s is not None and r.device == device and r.params == params]
    startup = _median(loads) if loads else None
    if len(rates) >= 2:
        tps = _median(rates)
        return Eta(total / tps, tps, f"measured on {len(rates)} runs of similar size on this machine",
                   startup_s=startup)
    if len(rates) == 1:
        tps = math.sqrt(rates[0] * assumed)  # one run may have met a busy machine: halfway to the assumption
        lo, hi = min(rates[0], assumed), max(rates[0], assumed)
        seen = runs[0].tokens_per_s
        # the run's own figure, then what it means for this plan (model size) on the machine as busy as it is now
        here = f" ({rates[0]:,.0f} for this plan now)" if abs(rates[0] - seen) >= 0.05 * seen else ""
        return Eta(total / tps, tps, f"one similar run ({runs[0].run}) measured {seen:,.0f} tokens/s{here}, "
                   f"{assumed:,.0f} assumed for {where}", total / hi, total / lo, startup)
    return Eta(total / assumed, assumed, f"assumed for {where}; measured after two runs of similar size",
               total / (assumed * ASSUMED_SPREAD), total * (ASSUMED_SPREAD if gpu_name else CPU_BUSY_FACTOR) / assumed,
               startup)


def for_config(cfg, params: int, gpu_name: str | None, measured: list[Measured] | None = None,
               busy: float = 0.0) -> Eta | None:
    """The ETA of a run's settings before its dataset was read: train.max_steps optimizer steps, each
    batch_size x grad_accum rows, of the tokens per row an earlier run of the same objective on the same data
    measured, else a guess from the cutoff: about half data.max_len a row (rows are rarely all at the cutoff), two
    replies' worth for a preference pair, and for GRPO grpo_generations x (half the prompt cutoff + the longest
    completion).
    None when the step count depends on the dataset (max_steps <= 0: epochs)."""
    t = cfg.train
    if t.max_steps <= 0:
        return None
    measured = measured_runs() if measured is None else measured
    rows = t.batch_size * t.grad_accum
    half = cfg.data.max_len // 2
    guess = {"grpo": t.grpo_generations * (half + t.grpo_max_completion), "dpo": 2 * half, "orpo": 2 * half}
    same = [m.tokens_per_step / m.rows_per_step for m in measured
            if m.data == (cfg.data.source, cfg.data.max_len) and m.objective == t.objective and m.rows_per_step > 0]
    per_step = rows * (_median(same) if same else guess.get(t.objective, half))
    return before_start(t.max_steps * per_step, params, cfg.quant.method, gpu_name, per_step, measured, busy,
                        t.objective)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


@lru_cache(maxsize=64)
def param_count(source: str) -> int:
    """A model's parameter count from its config (0 when it cannot be read: the run then compares by nothing)."""

    try:
        return int(vram.shape_from_config(models.read_config(source)).total_params)
    except (GarageError, OSError, ValueError, KeyError):
        return 0
