"""A lean memory allocator for a CPU run that would not fit easily, chosen before the training process loads
anything. Keep torch / transformers out of this module: it runs before them.

A CPU step allocates and frees its activations afresh, as big blocks (9-25 MiB for the built-in model at 8 x 500
tokens). glibc's malloc keeps freed blocks of that size in its heaps, and the RSS keeps the worst layout of every
step: 1.85x the estimate. Two leaner ways, measured on that shape (bench/throughput.py --memory, arms X and L;
docs/training-speed.md has the tables):
- tbbmalloc, Intel's scalable allocator (the `tbb` wheel: Linux x86-64), with huge pages: the same peak as the
  next one, and most of glibc's speed kept. It must be in the process before anything allocates, so
  `python -m core train` starts itself again (execve: the same pid, the same open files and lock) with the library
  preloaded, before any heavy import (prepare()).
- glibc handing freed blocks of 1 MiB or more back to the system (core.train.child.hand_back_freed_memory): every
  block is then a fresh mapping whose pages fault in again, 20-23% slower. The fallback where tbbmalloc is not
  there (macOS, Windows, other CPUs) or the start-up could not decide early.

A CPU run is lean when its estimate times GLIBC_PEAK_OVER_ESTIMATE (1.7) would take more than LEAN_WHEN_OVER of the RAM
available at start; $LORA_GARAGE_LEAN_MEMORY=1 or 0 decides instead. A lean run's SwiGLU MLPs also keep one
activation fewer (core/train/swiglu.py; vram.lean_swiglu_on asks lean_memory_on).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

from core import hardware
from core import models
from core.errors import GarageError
from core.estimate import vram
from core.estimate.vram import LEAN_MEMORY_ENV  # "1" lean, "0" the allocator's defaults; unset: decided per run

ALLOCATOR_ENV = "LORA_GARAGE_ALLOCATOR"       # set when prepare() has decided: "tbbmalloc" or "default"
# the defaults' peak RSS over the CPU estimate: 10.49 / 6.17 GiB with the chunked loss (bench --memory, arm Q,
# 2026-12-07, the estimate counting the process's runtime)
GLIBC_PEAK_OVER_ESTIMATE = 1.7
LEAN_WHEN_OVER = 0.5             # ... lean when that peak would take more than this share of the RAM available
TBBMALLOC_LIBS = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy replaces malloc, free, ...
# blocks of 1 MiB and more count as "huge" for tbbmalloc, so its regular clean-ups keep them for reuse; and its
# mappings ask for transparent huge pages (madvise), which cut the page faults of a fresh block
TBBMALLOC_ENV = {"TBB_MALLOC_SET_HUGE_OBJECT_THRESHOLD": str(1 << 20), "TBB_MALLOC_USE_HUGE_PAGES": "1"}


def needs_lean_memory(estimate_bytes: int | None, available_bytes: int) -> bool:
    """Whether a CPU run's step, at the allocator's defaults, would take over half the RAM available now."""
    return bool(estimate_bytes) and available_bytes > 0 and \
        estimate_bytes * GLIBC_PEAK_OVER_ESTIMATE > LEAN_WHEN_OVER * available_bytes


lean_memory_on = vram.lean_memory_on


def tbbmalloc_libs() -> list[Path] | None:
    """The tbb wheel's allocator libraries (it installs them in the environment's lib/), or None."""
    if not sys.platform.startswith("linux"):
        return None
    found = [Path(sys.prefix) / "lib" / name for name in TBBMALLOC_LIBS]
    return found if all(p.is_file() for p in found) else None


def active() -> str | None:
    """"tbbmalloc" when this process's malloc is tbbmalloc's proxy (its mappings say so), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None  # not Linux
    return "tbbmalloc" if "libtbbmalloc_proxy" in maps else None


def cpu_run(cfg) -> bool:
    """Whether the run trains on the CPU, read without torch: train.device cpu, or auto with no GPU to see."""
    if cfg.train.device == "cpu":
        return True
    return cfg.train.device == "auto" and not hardware.read().gpus and not hardware.apple_gpu()


def early_estimate(cfg) -> int | None:
    """The run's CPU estimate from the model's config.json alone, where that is a file read: the built-in model or
    a local folder; for a CPU run of several processes (train.devices=N), all of them. None otherwise (a .gguf file
    or a hub id would cost seconds here), or where it cannot be read: the training child then decides from its own
    estimate (core.train.child.lean_cpu_memory)."""
    source = (cfg.model.source or "").strip()
    if source != models.BUILTIN_ID and not (Path(source).expanduser() / "config.json").is_file():
        return None
    try:
        shape = vram.shape_from_config(models.read_config(source))
        one = vram.estimate(shape, vram.settings_from_config(cfg, device="cpu")).total_bytes
    except (GarageError, OSError, ValueError) as e:  # a damaged config.json: the child reports it in the run
        print(f"memory: no early estimate ({getattr(e, 'message', e)}); the training process decides from its own",
              flush=True)
        return None
    devices = str(cfg.train.devices).strip()
    return one * (int(devices) if devices.isdigit() and int(devices) > 1 else 1)


def prepare(cfg, argv: list[str] | None) -> None:
    """Before `python -m core train` imports anything heavy: decide whether this CPU run trains lean (into
    $LORA_GARAGE_LEAN_MEMORY, which the training child and its estimate read), and if so and tbbmalloc is
    installed, start this process again with it preloaded. `argv`: this process's command line (sys.argv[1:])
    when it is the CLI's own; None, for a caller inside another program (tests), decides nothing. A run that may
    use a GPU, or whose estimate needs more than config.json, is left to the training child (glibc's settings
    only). A user's own LD_PRELOAD or MALLOC_ settings stand: no tbbmalloc."""
    if os.environ.get(ALLOCATOR_ENV) == "tbbmalloc" and active():
        _keep_preload_to_this_process()
    if argv is None or os.environ.get(ALLOCATOR_ENV):
        return  # not the CLI, or decided already: this is the process started again, or its child
    os.environ[ALLOCATOR_ENV] = "default"  # decided here, whatever follows
    if not cpu_run(cfg):
        return
    asked = os.environ.get(LEAN_MEMORY_ENV)
    if asked in ("0", "1"):
        lean = asked == "1"
    else:
        est = early_estimate(cfg)
        if est is None:
            return
        lean = needs_lean_memory(est, int(psutil.virtual_memory().available))
        os.environ[LEAN_MEMORY_ENV] = "1" if lean else "0"
    libs = tbbmalloc_libs()
    theirs = os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ)
    if not lean or not libs or theirs or active():
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(str(p) for p in libs), **TBBMALLOC_ENV)
    env[ALLOCATOR_ENV] = "tbbmalloc"
    print("memory: CPU memory is tight for this run; starting the training process again with tbbmalloc",
          flush=True)
    sys.stderr.flush()
    try:  # the same interpreter, flags and arguments: the process as it was started, with the library in it
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:
        print(f"memory: could not start again with tbbmalloc ({e}); training with the default allocator",
              file=sys.stderr, flush=True)


_preloaded: dict[str, str] = {}


def _keep_preload_to_this_process() -> None:
    """In the process started again with tbbmalloc: the library is in; keep LD_PRELOAD and tbbmalloc's settings
    away from the programs it starts (a GRPO reward command, pip), except its own ranks (rank_preload)."""
    for key in ("LD_PRELOAD", *TBBMALLOC_ENV):
        if key in os.environ:
            _preloaded[key] = os.environ.pop(key)


def rank_preload() -> dict[str, str]:
    """What the ranks of a multi-process CPU run need to train with the same allocator as their supervisor."""
    return dict(_preloaded)
