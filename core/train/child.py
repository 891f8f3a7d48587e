"""The training child: `python -m core train --run-dir DIR` (spawned by core.runs.runner) or, without --run-dir, the
same code in the foreground. It reads DIR/config.yaml, trains with transformers' Trainer + peft (+ bitsandbytes
for 4-bit / 8-bit), and reports only through the run folder: status.json, events.jsonl, train.log,
checkpoints/ (each COMPLETE-marked) and adapter/.

`main(run_dir)` reads top to bottom: lock, status, then `train()`'s straight-line steps. Every failure ends as
status `failed` with {kind, message, hint}; the traceback goes to train.log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import psutil
import shutil
import sys
import traceback
import warnings
from pathlib import Path

from array import array
import dataclasses
import hashlib
import importlib.metadata
import pickle
import subprocess
import threading
import time
from core import events as ev
from core import models
from core.runs import portable
from core.runs import procs
from core.runs import folder as runs
from core.config import OPTIMIZERS
from core.errors import DiskFull, Diverged, GarageError, OutOfMemory, RunError
from core import hardware
from core import paths
from core.config import target_modules
from core.data import cache as data_cache
from core.data import tokenize as data_tokenize
from core.errors import ConfigError
from core.errors import disk_full_cause
from core.estimate import eta as run_eta
from core.estimate import vram
from core.train import allocator
from core.train import distributed
from core.train import rewards as reward_fns
from core import report as core_report
from core.train import loss as train_loss
from core.train import isolation_cache
from core.train import recovery
from core.train.startup import Timeline

PROBE_ENV = "LORA_GARAGE_TEST_PROBE"  # test-only: save the final logits on one example to probe.pt
# A library warning that says results may be wrong ends the run: training on would waste the user's time on
# weights nobody can trust (bitsandbytes' forward-only 4-bit kernel under backward warns exactly like this).
WRONG_RESULTS_WARNING = r"(?s).*(silently incorrect|incorrect results|results may be (wrong|incorrect))"


def main(run_dir: Path, lock=None) -> int:
    """The child entry. Returns the process exit code (0 completed or stopped, 1 failed). A process started by the
    launcher for a multi-process run is a rank (rank_main); the child itself then supervises (supervise)."""
    from core.train.callbacks import Context, StopFlag  # heavy

    if distributed.is_rank_process():
        return rank_main(Path(run_dir))
    run_dir = Path(run_dir)
    stop = StopFlag(run_dir).install()
    warnings.filterwarnings("error", message=WRONG_RESULTS_WARNING)
    lock = procs.hold_lock(run_dir.name, lock, runs.run_ended)  # BusyError (exit 2) if another run trains
    ctx = Context()
    events = ev.EventLog(run_dir)
    ctx.timeline = Timeline.from_env(events)  # the spawn phase; "imports" runs on to the first mark in train()
    if runs.read_status(run_dir, reconcile=False).get("state") == "stopping":
        stop.requested = True  # Stop was pressed while this process was still starting
    runs.write_status(run_dir, state="stopping" if stop.requested else "running", pid=os.getpid(),
                      pid_create_time=procs.process_start_time(os.getpid()), started_at=runs.now(), ended_at=None,
                      error=None)
    cfg = None
    try:
        cfg = runs.load_config(run_dir)
        plan = distributed.machine_plan(cfg)
        if plan.distributed:
            outcome, error = supervise(run_dir, cfg, plan, events, stop, ctx)
            if error is not None:
                events.log("error", error.message, hint=error.hint)
                runs.write_status(run_dir, state="failed", ended_at=runs.now(), error=error.to_dict())
                return 1
        else:
            outcome = train(run_dir, cfg, events, stop, ctx, plan)
    except BaseException as e:  # noqa: BLE001 - every failure is logged, classified and written to status.json
        traceback.print_exc()
        error = classify(e, ctx, cfg, run_dir)
        print(f"error: {error.message}\nfix:   {error.hint}", file=sys.stderr, flush=True)
        events.log("error", error.message, hint=error.hint)
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        runs.write_status(run_dir, state=state, ended_at=runs.now(), error=error.to_dict())
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        events.close()
    reporting = cfg.train.report_at_end and core_report.announce(run_dir)  # before the state: no second maker
    runs.write_status(run_dir, state=outcome, ended_at=runs.now(), error=None)
    print(f"{outcome}: {run_dir}", flush=True)
    if reporting:
        # the run's report card, once the adapter is saved and the run marked completed or stopped; a failure is
        # recorded in report.json and events.jsonl by make_at_run_end, and the run's state stays what it is
        core_report.make_at_run_end(run_dir)
    return 0  # the lock goes with the process


def train(run_dir: Path, cfg, events: ev.EventLog, stop, ctx, plan, handoff: dict | None = None) -> str:
    """Straight-line: device, model files, data, model + LoRA, trainer, train, adapter. -> completed|stopped.
    `plan` is the run's one plan (distributed.machine_plan, made once per run). In a rank of a multi-process run
    (handoff given), the model files, the data and the resume point come from the supervisor, and rank 0 alone
    writes the run folder."""
    from transformers import set_seed  # heavy

    from core.train.callbacks import FAULT_ENV, FAULT_RANK_ENV, kill_point, oom_point, parse_faults  # heavy

    faults = parse_faults(os.environ.get(FAULT_ENV))
    if os.environ.get(FAULT_RANK_ENV, "") not in ("", str(distributed.rank())):
        faults = {}  # test-only: the faults fire in one rank of a multi-process run
    ctx.faults = faults
    if handoff is not None and plan.gpus:
        import torch  # heavy

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(events, cfg.train.device, cfg)
    if device == "cpu" and handoff is None:
        share_the_cores(events)
    memory = None
    if device == "cuda":  # before the model loads: creates the CUDA context and measures it
        memory = hardware.GpuProcessMemory()
    set_seed(cfg.train.seed)
    ctx.timeline.mark("imports")

    if handoff is not None:
        model_path, tokenizer, prepared, resume_from = rank_handoff(handoff, cfg)
    else:
        model_path, tokenizer, prepared, resume_from = prepare_run(run_dir, cfg, events, ctx, device, memory, plan=plan)
        if stop.requested:
            return "stopped"

    ctx.phase = "load"
    startup_phase(run_dir, 3)
    model = load_model(cfg, device, model_path)
    kill_point(faults, "killload")
    model = add_lora(model, cfg)
    check_disk(run_dir, model, cfg)
    ctx.timeline.mark("model load")
    startup_phase(run_dir, 4)  # recovery's train sets ctx.phase "first step" and trains
    # train.oom_recovery, train.probe; auto+shorten prepares the data again at a smaller data.max_len
    retry = recovery.Recovery(run_dir, cfg, model, events, device, plan, prepared,
                              reprepare=lambda c: shorten_data(run_dir, c, tokenizer))
    trainer, callback = retry.train(
        lambda p, data: build_trainer(run_dir, cfg, model, tokenizer, data, device, events, stop, ctx, faults,
                                      memory=memory.reading if memory else None, plan=p), resume_from, ctx)
    prepared = retry.prepared
    if callback.diverged_at:
        raise diverged_error(run_dir, cfg, callback.diverged_at)

    # the adapter first: an out of memory in the end-of-run evaluation then loses nothing
    ctx.phase = "final save"
    if distributed.is_main():
        def save():
            oom_point(faults, "oomsave")
            save_adapter(trainer.model, tokenizer, run_dir, before_rename=lambda: kill_point(faults, "killfinal"))

        recovery.final_save(save, trainer, cfg, events, device)
        if os.environ.get(PROBE_ENV) == "1":
            save_probe(trainer.model, prepared.train[0], run_dir)
    distributed.barrier()  # no rank ends (and tears the group down) before rank 0 has written the adapter
    if prepared.eval and not cfg.train.eval_steps and not stop.requested and cfg.train.objective != "grpo":
        ctx.phase = "final eval"  # eval_steps=0 means: once, at the end
        recovery.final_eval(trainer, cfg, events, device)
    return "stopped" if stop.requested else "completed"


# what the child does before its first chart point, in order: status.json's `phase`, shown while step is 0
STARTUP = ("finding the model files and loading the tokenizer", "tokenising the data", "loading the model and adding LoRA",
           "the first step")


def startup_phase(run_dir: Path, k: int, detail: str = "") -> None:
    """Record start-up phase k (of STARTUP) in status.json, for the Train page (rank 0 alone writes the folder)."""
    if distributed.is_main():
        runs.write_status(run_dir, durable=False, phase=f"{k} of {len(STARTUP)}: {STARTUP[k - 1]}{detail}")


def _rows_progress(run_dir: Path):
    """data.prepare's progress as phase 2's row k of n, written at most once a second."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 1.0 or done == total:
            last[0] = time.monotonic()
            startup_phase(run_dir, 2, f" (row {done:,} of {total:,})")

    return report


def prepare_run(run_dir: Path, cfg, events: ev.EventLog, ctx, device: str, memory=None, *, plan):
    """Model files, the estimate, the tokenizer with the run's template, the tokenised data and the resume point.
    -> (model_path, tokenizer, prepared, resume_from)."""

    ctx.phase = "load"
    startup_phase(run_dir, 1)
    model_path = models.resolve(cfg.model.source)
    models.check_safetensors(model_path)
    write_estimate(run_dir, cfg, model_path, events, device, memory.context_bytes if memory else None, plan)
    if device == "cpu":
        lean_cpu_memory(run_dir, events)
    tokenizer = models.load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    ctx.timeline.mark("model files")

    ctx.phase = "data"
    startup_phase(run_dir, 2)
    # data.prepare, unless the same rows were prepared before
    prepared, cached = data_cache.prepare(cfg, tokenizer, progress=_rows_progress(run_dir))
    if ctx.faults:  # test-only
        from core.train.callbacks import kill_point  # heavy

        kill_point(ctx.faults, "killdata")
    if not prepared.train:
        raise RunError("the dataset has no training rows left after preparation",
                       "check data.source, data.max_len and data.overlong (drop may have removed every row)")
    stats = prepared.stats.to_dict()
    stats.pop("lengths", None)
    events.data(stats)
    use_run_template(tokenizer, events)
    resume_from = prepare_resume(run_dir, cfg, model_path, prepared, events, plan)
    ctx.timeline.mark("tokenise", "from the data cache" if cached else f"tokenised {len(prepared.train):,} rows")
    return model_path, tokenizer, prepared, resume_from


# ---------------------------------------------------------------- several processes

def supervise(run_dir: Path, cfg, plan, events: ev.EventLog, stop, ctx):
    """A multi-process run, from the child the runner started: prepare once (model files, data, resume point),
    start torch.distributed.run with an argument list, forward Stop to rank 0, and read the ranks' outcome.
    -> (completed|stopped|failed, GarageError or None)."""

    print(f"devices: {plan.describe()}", flush=True)
    events.log("info", f"training on {plan.describe()}")
    for note in plan.notes:
        print(f"WARNING: {note}" if note.startswith("experimental") else note, flush=True)
        events.log("warning" if note.startswith("experimental") else "info", note)
    if plan.gpus and plan.world_size > 1 and distributed.nccl_p2p_broken():
        print(f"WARNING: {distributed.NCCL_NOTE}", flush=True)
        events.log("warning", distributed.NCCL_NOTE)
    device = "cuda" if plan.gpus else "cpu"
    model_path, tokenizer, prepared, resume_from = prepare_run(run_dir, cfg, events, ctx, device, plan=plan)
    if stop.requested:
        return "stopped", None
    rdir = distributed.ranks_dir(run_dir)
    rdir.mkdir(exist_ok=True)
    for old in list(rdir.glob("rank*.pid")) + list(rdir.glob("result-*.json")):
        old.unlink()
    with open(rdir / distributed.PREPARED_FILE, "wb") as fh:  # our own data, read back by our own ranks
        pickle.dump({"model_path": str(model_path), "prepared": prepared, "chat_template": tokenizer.chat_template,
                     "resume_from": str(resume_from) if resume_from else None, "plan": plan}, fh)
    nnodes, node_rank, rdzv = distributed.nodes_from_env() or (1, 0, None)
    cmd = distributed.launch_command(run_dir, plan, nnodes, node_rank, rdzv)
    print("launch: " + " ".join(cmd), flush=True)
    ctx.phase = "first step"
    proc = subprocess.Popen(cmd, env=distributed.rank_env(plan), cwd=str(paths.REPO_ROOT), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # the ranks' output (prefixed with their rank by the launcher) through this process's own stdout, which is
    # train.log under the runner and the terminal + train.log in the foreground
    pump = threading.Thread(target=_relay, args=(proc.stdout,), daemon=True)
    pump.start()
    forwarded = False
    while proc.poll() is None:
        if stop.requested and not forwarded:  # Stop's request file, or a signal to this process: rank 0 polls the file
            portable.request_stop(run_dir)
            forwarded = True
        time.sleep(0.2)
    pump.join(timeout=10)
    if node_rank > 0:  # rank 0 and the run's events, checkpoints and adapter live on node 0
        return ("completed", None) if proc.returncode == 0 else _ranks_outcome(run_dir, proc.returncode)
    return _ranks_outcome(run_dir, proc.returncode)


def _relay(stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(line.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def _ranks_outcome(run_dir: Path, code: int):
    """What rank 0 recorded, unless another rank died first: then the run failed, naming that rank."""

    result_path = distributed.ranks_dir(run_dir) / "result-0.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    cause = distributed.failed_rank(runs.tail_log(run_dir, 400)) if code != 0 else None
    if cause is not None and (cause[0] != 0 or result is None):
        r, exit_code = cause
        how = procs.exit_words(exit_code)
        tail = distributed.rank_log_tail(run_dir, r)
        err = RunError(f"rank {r} ended ({how}); the launcher ended the other ranks",
                       "see ranks/ for each rank's log" + (f"; rank {r} last wrote:\n{tail}" if tail else "")
                       + ". Resume continues from the last complete checkpoint")
        err.kind = "crash"
        return "failed", err
    if result is None:
        err = RunError(f"the launcher ended with exit code {code} before rank 0 reported",
                       "see train.log and ranks/ for each rank's log")
        return "failed", err
    if result["state"] == "failed":
        e = result.get("error") or {}
        err = GarageError(e.get("message", "rank 0 failed"), e.get("hint", "see train.log"))
        err.kind = e.get("kind", "run")
        return "failed", err
    return result["state"], None


def read_handoff(run_dir: Path) -> dict:
    """In a rank: what the supervisor prepared and pickled into ranks/ (its plan included: the run plans once)."""
    with open(distributed.ranks_dir(run_dir) / distributed.PREPARED_FILE, "rb") as fh:
        return pickle.load(fh)


def rank_handoff(handoff: dict, cfg):
    """In a rank: the supervisor's handoff as train() uses it. -> (model_path, tokenizer, prepared, resume_from)."""
    model_path = Path(handoff["model_path"])
    tokenizer = models.load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.chat_template = handoff["chat_template"]  # what the rows were rendered with (saved with the adapter)
    resume = handoff["resume_from"]
    return model_path, tokenizer, handoff["prepared"], Path(resume) if resume else None


def rank_main(run_dir: Path) -> int:
    """One rank of a multi-process run. Rank 0 writes events; the outcome goes to ranks/result-0.json for the
    supervisor, which alone writes the final status."""
    from core.train.callbacks import Context, StopFlag  # heavy

    r = distributed.rank()
    stop = StopFlag(run_dir if r == 0 else None).install()  # rank 0 hears Stop and tells the others at a step boundary
    warnings.filterwarnings("error", message=WRONG_RESULTS_WARNING)
    distributed.pid_file(run_dir, r).write_text(str(os.getpid()))
    events = ev.EventLog(run_dir) if r == 0 else ev.NoEvents()
    ctx, cfg = Context(), None
    result: dict
    try:
        cfg = runs.load_config(run_dir)
        handoff = read_handoff(run_dir)
        result = {"state": train(run_dir, cfg, events, stop, ctx, handoff["plan"], handoff)}
        code = 0
    except BaseException as e:  # noqa: BLE001 - classified like a one-process failure, handed to the supervisor
        traceback.print_exc()
        error = classify(e, ctx, cfg, run_dir)
        print(f"error (rank {r}): {error.message}\nfix:   {error.hint}", file=sys.stderr, flush=True)
        result, code = {"state": "failed", "error": error.to_dict()}, 1
    finally:
        events.close()
    if r == 0:
        runs.write_atomic(distributed.ranks_dir(run_dir) / "result-0.json", json.dumps(result))
    return code


def use_run_template(tokenizer, events: ev.EventLog) -> None:
    """Give the tokenizer the chat template the rows were rendered with, so every checkpoint and the adapter carry
    it (Trainer saves the tokenizer into each checkpoint) and chat, eval and export use the same one. A model
    without a template of its own gets the fallback, and train.log and the run page say so."""

    notice = data_tokenize.fallback_notice(tokenizer)
    if notice:  # a model with a template of its own saves it already (named templates included)
        tokenizer.chat_template = data_tokenize.chat_template(tokenizer)[0]
        print(f"template: {notice}", flush=True)
        events.log("info", notice, topic=ev.TOPIC_TEMPLATE)


# ---------------------------------------------------------------- device, model, LoRA

def pick_device(events: ev.EventLog, requested: str = "auto", cfg=None) -> str:
    """hardware.pick_device (cuda, then mps, then cpu; train.device overrides), said in train.log and the events;
    on mps, a 4-/8-bit setting bitsandbytes cannot run there is refused (models.check_device_support)."""
    device = hardware.pick_device(requested)
    if cfg is not None:
        models.check_device_support(device, cfg.quant.method, cfg.train.optimizer)
    if device != "cpu":
        name = hardware.device_name(device)
        print(f"device: {name}", flush=True)
        events.log("info", f"training on {name}")
        return device
    msg = ("no CUDA or Apple GPU found: training on the CPU. That is slow: fine for the cpu-demo preset and tiny "
           "models, hours for anything bigger") if requested == "auto" else "training on the CPU (train.device=cpu)"
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    events.log("warning", msg)
    return "cpu"


# glibc's malloc for CPU training where memory is tight and tbbmalloc is not in the process (core.train.allocator):
# at most 2 arenas, and every block of 1 MiB or more mmapped and handed back to the system when freed. A step's
# activations are 9-25 MB tensors; by default glibc raises its mmap threshold (up to 32 MB) as they are freed,
# keeps them in its heaps, and the RSS holds the worst layout of every step. Measured on the built-in model at
# 8 x ~500 tokens on 2 quiet cores (bench/throughput.py --memory, twice each arm, interleaved): peak RSS 12.34 ->
# 8.06 GiB against an estimate of 7.45, but tokens/s 235 -> 197 (-16%: every big block is a fresh mapping).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
CPU_MALLOPT = {M_ARENA_MAX: 2, M_MMAP_THRESHOLD: 1 << 20, M_TRIM_THRESHOLD: 1 << 20}
needs_lean_memory = allocator.needs_lean_memory


def lean_cpu_memory(run_dir: Path, events: ev.EventLog) -> bool:
    """A CPU run that allocator.prepare (or $LORA_GARAGE_LEAN_MEMORY) made lean, or whose own estimate says memory is
    tight: tbbmalloc where the process runs with it, else CPU_MALLOPT. Said in train.log and the events."""
    est, avail = runs.estimate_bytes(run_dir), int(psutil.virtual_memory().available)  # RAM only: no NVML read
    decided = os.environ.get(allocator.LEAN_MEMORY_ENV)
    if decided == "0" or (decided != "1" and not needs_lean_memory(est, avail)):
        return False
    if needs_lean_memory(est, avail):
        why = (f"CPU memory is tight: a step may hold about {est * allocator.GLIBC_PEAK_OVER_ESTIMATE / 2**30:.1f} "
               f"GiB with the allocator's defaults, of {avail / 2**30:.1f} GiB available")
    else:
        why = f"lean CPU memory, as {allocator.LEAN_MEMORY_ENV}=1 asks"
    if allocator.active() == "tbbmalloc":
        msg = (f"{why}: the training process runs with tbbmalloc, which keeps a step's freed blocks for the next one "
               f"in less memory (about a third less than the defaults, up to 11% slower)")
    elif hand_back_freed_memory():
        msg = (f"{why}: freed blocks of 1 MiB or more now go back to the system (about a third less memory, up to "
               f"23% slower)")
    elif vram.lean_swiglu_on("cpu"):
        msg = f"{why}: the allocator stays as it is (no tbbmalloc here, and glibc's settings are yours or absent)"
    else:
        return False
    if vram.lean_swiglu_on("cpu"):
        msg += "; SwiGLU MLPs keep one activation fewer"
    print(msg, flush=True)
    events.log("info", msg)
    return True


def hand_back_freed_memory() -> dict[int, int]:
    """CPU_MALLOPT through glibc's mallopt, at run time (it also reaches `python -m core train` in the foreground,
    whose allocator started long before the device was known). Nothing where the C library is not glibc (macOS,
    Windows, musl) or where the user set a MALLOC_ variable: theirs stands. Returns what it set."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}  # not glibc: its allocator has no such knobs
    done = {k: v for k, v in CPU_MALLOPT.items() if mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1}
    return done


def share_the_cores(events: ev.EventLog) -> None:
    """On a CPU that other programs already keep busy, train on the cores they leave free (eta.cpu_threads): beside
    one busy loop on 2 cores, 2 threads ran 5.5x slower than 1. A thread count the user set (OMP_NUM_THREADS)
    stands. Said in train.log and the events."""
    import torch  # heavy

    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = torch.get_num_threads()
    others = run_eta.others_now(max_age_s=0)
    threads = run_eta.cpu_threads(others, cores)
    if threads < cores:
        torch.set_num_threads(threads)
        msg = (f"this machine is busy: other programs keep about {others:.1f} cores' worth of work running, so "
               f"training uses {threads} of its {cores} cores (threads that share a core with another program hold "
               f"the others back); set OMP_NUM_THREADS to choose")
        print(msg, flush=True)
        events.log("info", msg)


def lean_swiglu(model, device: str) -> int:
    """With $LORA_GARAGE_LEAN_MLP on the CPU (vram.lean_swiglu_on), each stock SwiGLU MLP keeps gate and up for
    backward and recomputes silu (core/train/swiglu.py): one [tokens x intermediate] tensor fewer per layer, as
    the estimate then counts (vram.Settings.lean_swiglu). Not on a GPU: there Liger's kernel does it where
    installed, and the plain form is unmeasured. Said in train.log. -> how many MLPs use it."""
    if not vram.lean_swiglu_on(device):
        return 0
    from core.train import swiglu  # heavy: torch

    n = swiglu.install(model)
    if n:
        print(f"mlp: {n} SwiGLU layers keep gate and up for backward and recompute silu (one activation fewer "
              f"per layer)", flush=True)
    return n


def compute_dtype(cfg, device: str):
    """The run's compute dtype (models.dtype_for owns the choice)."""
    return models.dtype_for(device, cfg.quant.compute_dtype, cfg.quant.method)


LIGER_MIN_VERSION = "0.3.0"  # transformers' own floor for use_liger_kernel (utils/import_utils.py)


def liger_plan(cfg, model, device: str, events: ev.EventLog) -> dict | None:
    """Which Liger kernels to apply (kwargs for liger's _apply_liger_kernel_to_instance, which Trainer calls on the
    base model under peft), or None with a train.log line saying why not. Liger only runs where it can be right:
    - a CUDA GPU (Triton), liger-kernel installed, and kernels for this model type;
    - the fused linear + cross-entropy reads lm_head.weight directly, so it is off (plain Liger cross-entropy
      instead) when lm_head carries a LoRA adapter (the fused loss would silently train without it), when lm_head
      is itself quantized, and on a 4-/8-bit base computing in fp16 (dtype mismatch in the fused loss:
      linkedin/Liger-Kernel#235). RMSNorm, RoPE and SwiGLU call the peft-wrapped layers, so LoRA and 4-bit
      linears keep working under them."""
    if not cfg.model.liger_kernel:
        return None

    import torch  # heavy
    from packaging.version import Version  # optional

    why = None
    if device != "cuda":
        why = "its Triton kernels need a CUDA GPU"
    else:
        try:
            have = importlib.metadata.version("liger-kernel")
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None:
            why = "the liger-kernel package is not installed (pip install liger-kernel)"
        elif Version(have) < Version(LIGER_MIN_VERSION):
            why = f"liger-kernel {have} is older than {LIGER_MIN_VERSION} (pip install -U liger-kernel)"
        else:
            try:
                from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN  # optional
            except Exception as e:  # noqa: BLE001 - e.g. a liger release written for transformers 4 fails here
                why = (f"liger-kernel {have} cannot be imported with transformers "
                       f"{importlib.metadata.version('transformers')} ({type(e).__name__}: {e}); "
                       f"pip install -U liger-kernel")
            else:
                model_type = getattr(model.config, "model_type", "?")
                if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                    why = f"liger-kernel {have} has no kernels for model type {model_type!r}"
    if why:
        msg = f"model.liger_kernel is on but Liger is off: {why}"
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        events.log("warning", msg)
        return None
    plan = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True, "cross_entropy": False}
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    no_fused = None
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        no_fused = "lm_head carries a LoRA adapter, which the fused loss would leave out"
    elif weight is None or not weight.dtype.is_floating_point:
        no_fused = "lm_head is quantized"
    elif cfg.quant.method in ("qlora", "8bit") and compute_dtype(cfg, device) == torch.float16:
        no_fused = "a 4-/8-bit base computing in fp16 trips a dtype mismatch in it (Liger-Kernel#235)"
    if no_fused:
        plan.update(fused_linear_cross_entropy=False, cross_entropy=True)
    kernels = [k.replace("_", " ") for k, on in plan.items() if on]
    print(f"kernels: Liger {', '.join(kernels)}"
          + (f" (fused linear cross-entropy off: {no_fused})" if no_fused else ""), flush=True)
    return plan


def load_model(cfg, device: str, model_path: Path | None = None):
    """The base model for training: 16-bit (lora), 4-bit NF4/FP4 (qlora) or 8-bit, from safetensors only
    (models.load_base does the loading; this says what was loaded)."""
    model_path = model_path or models.resolve(cfg.model.source)
    q = cfg.quant
    dtype = compute_dtype(cfg, device)
    model = models.load_base(model_path, method=q.method, quant_type=q.quant_type, double_quant=q.double_quant,
                             compute_dtype=q.compute_dtype, device=device, attn=cfg.model.attn_implementation,
                             trust_remote_code=cfg.model.trust_remote_code, for_training=True)
    how = {"lora": f"{str(dtype).removeprefix('torch.')} base", "8bit": "8-bit base",
           "qlora": f"4-bit {q.quant_type} base{' + double quant' if q.double_quant else ''}"}[q.method]
    print(f"loaded {model_path.name}: {how}, compute in {str(dtype).removeprefix('torch.')}, on {device}, "
          f"attention {model.config._attn_implementation}", flush=True)
    return model


def add_lora(model, cfg):
    """Wrap in a peft LoRA model. peft keeps the adapter weights in fp32 on a 16-bit base (autocast_adapter_dtype),
    which is what mixed-precision training needs. We skip peft's prepare_model_for_kbit_training on purpose: it
    makes fp32 copies of the embeddings and lm_head (GBs on a 7B model) and its only other job, making inputs
    require grad for reentrant checkpointing, is not needed with non-reentrant checkpointing."""
    from peft import LoraConfig, get_peft_model  # heavy

    if cfg.train.from_run:  # preference tuning on top of a finished run's adapter
        from core.train import preference  # heavy

        return preference.continue_adapter(model, cfg)
    lo = cfg.lora
    lora_cfg = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                          target_modules=target_modules(lo.targets), use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                          bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora_cfg)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m).__name__.endswith("Linear")})

            raise ConfigError("lora.targets", f"{lo.targets!r} matches no layer of this model ({e})",
                              f"use all-linear, attention, or names from: {', '.join(names[:20])}") from e
        raise
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    return model


def build_trainer(run_dir, cfg, model, tokenizer, prepared, device, events, stop, ctx, faults, memory=None,
                  plan=None):
    import torch  # heavy
    from transformers import TrainingArguments  # heavy
    from transformers.trainer_callback import PrinterCallback, ProgressCallback  # heavy

    from core.train.callbacks import FlopsModel, GarageCallback, GarageTrainer  # heavy

    t = cfg.train
    if t.objective == "sft":  # first: the start-up timeline times it as a phase of its own
        collator, group = pick_collator(cfg, model, tokenizer, device, events, ctx.timeline)
    dtype = compute_dtype(cfg, device)
    has_eval = bool(prepared.eval)
    liger = liger_plan(cfg, model, device, events)
    group_kwargs = {}
    if plan is not None and plan.distributed:
        # one process per device; grad_accum per process keeps the configured global batch (core.train.distributed.plan)
        group_kwargs = dict(ddp_backend=plan.backend, ddp_find_unused_parameters=False)
        if plan.strategy == "fsdp":
            group_kwargs.update(fsdp="full_shard auto_wrap", fsdp_config={"version": 2})
    args_class, per_device, rewards = TrainingArguments, t.batch_size, None
    if t.objective == "grpo":  # TRL's GRPOConfig; a device step holds batch_size prompts x grpo_generations
        from core.train import grpo  # heavy

        rewards = reward_fns.build(cfg)  # the user's reward file is imported here, in the child, never in the app
        args_class, per_device = grpo.args_class(cfg, rewards), grpo.per_device_batch(cfg, t.batch_size)
        has_eval = False  # held-out prompts are for eval and the report: TRL's evaluation would sample them all
    elif t.objective != "sft":  # TRL's DPOConfig / ORPOConfig: TrainingArguments plus the objective's settings
        from core.train import preference  # heavy

        args_class = preference.args_class(cfg)
    args = args_class(
        output_dir=str(runs.checkpoints_dir(run_dir)),
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=plan.grad_accum if plan is not None else t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[t.optimizer], max_steps=t.max_steps, num_train_epochs=t.epochs, seed=t.seed,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
        activation_checkpointing=t.grad_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.grad_checkpointing else None,
        logging_steps=t.logging_steps, logging_nan_inf_filter=False,  # the filter would hide a diverging loss
        save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=None,  # we rotate ourselves, counting only COMPLETE-marked checkpoints
        eval_strategy="steps" if has_eval and t.eval_steps else "no", eval_steps=t.eval_steps or None,
        dataloader_num_workers=0, dataloader_pin_memory=device == "cuda", remove_unused_columns=False,
        report_to="none", disable_tqdm=True, skip_memory_metrics=True,
        use_liger_kernel=liger is not None, liger_kernel_config=liger, **group_kwargs)
    lean_swiglu(model, device)
    if t.objective == "grpo":
        return grpo.build_trainer(run_dir, cfg, model, tokenizer, prepared, device, events, stop, ctx, faults, args,
                                  rewards, memory=memory)
    if t.objective != "sft":
        return preference.build_trainer(run_dir, cfg, model, tokenizer, prepared, device, events, stop, ctx, faults,
                                        args, memory=memory)
    train_loss.install(model, cfg, liger, events)  # before the Trainer reads the forward's signature
    callback = GarageCallback(run_dir, cfg, events, stop, device, tokenizer, memory=memory)
    if device == "cuda":
        callback.flops = FlopsModel.for_model(model, torch.cuda.get_device_name(0))
    trainer = GarageTrainer(model=model, args=args, train_dataset=prepared.train,
                            eval_dataset=prepared.eval if has_eval else None, processing_class=tokenizer,
                            callbacks=[callback], ctx=ctx, collator=collator,
                            group_by_length=group and t.batch_size * t.grad_accum > 1, faults=faults)
    for cb in (PrinterCallback, ProgressCallback):  # our callback prints one line per step instead
        trainer.remove_callback(cb)
    callback.trainer = trainer
    return trainer, callback


def pick_collator(cfg, model, tokenizer, device: str, events: ev.EventLog, timeline: Timeline | None = None):
    """-> (collator, group_by_length). Padding-free batches (data.padding_free, default on) when a check on the
    real model shows flattened rows stay apart; else padded batches, grouped by length so little padding is
    left, and a line in train.log saying why. flash_attention_2 takes the whole batch as one varlen sequence;
    sdpa/eager get sequences no longer than the batch's longest row (their mask is computed in full), still
    grouped by length so those sequences come out nearly full. The check's verdict is stored and read back at
    the next start with the same model, kernel and libraries (core.train.isolation_cache). `timeline`: the
    check's start-up phase."""
    from core.train.collate import FlatCollator, PadCollator  # heavy

    timeline = timeline or Timeline.off()
    multiple_of = 8 if device == "cuda" else 1
    if not cfg.data.padding_free:
        print("batches: padded to the longest row, grouped by length (data.padding_free=false)", flush=True)
        timeline.mark("padding-free check", "off (data.padding_free=false)")
        return PadCollator(tokenizer.pad_token_id, multiple_of), True
    attn = getattr(model.config, "_attn_implementation", "?")
    cached = False
    try:
        ok, detail, cached = isolation_cache.checked(model, cfg, device)
    except Exception as e:  # noqa: BLE001 - a model that cannot take position_ids this way just gets padded batches
        ok, detail = False, f"{type(e).__name__}: {e}"
    timeline.mark("padding-free check", ("rows stay apart" if ok else "rows leak: padded batches")
                  + (" (stored verdict)" if cached else ""))
    if not ok:
        msg = (f"padding-free batches are off: with attention {attn} this model lets flattened rows see each other "
               f"({detail}); using padded batches grouped by length instead")
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        events.log("warning", msg)
        return PadCollator(tokenizer.pad_token_id, multiple_of), True
    flash = attn == "flash_attention_2"
    print(f"batches: padding-free ({'one varlen sequence per batch' if flash else 'rows laid end to end'}, "
          f"attention {attn} keeps them apart: {detail})", flush=True)
    return FlatCollator(tokenizer.pad_token_id, multiple_of, capacity=0 if flash else None), not flash


# ---------------------------------------------------------------- before training: estimate, resume, disk

def write_estimate(run_dir: Path, cfg, model_path: Path, events: ev.EventLog, device: str = "cuda",
                   context_bytes: int | None = None, plan=None) -> None:
    """estimate.json: the VRAM estimate at launch, to hold against the measured peak in the metrics events; with
    the run's plan (None: one device) of several devices, the estimate for one of them. On CUDA it also records
    the context measured in this process before the model loaded (context_bytes), which the estimate can only
    assume (its cuda_context component): runs.estimate_bytes swaps one for the other."""

    try:  # only the estimate itself is guarded: a missing core.estimate.vram is a broken install and fails loudly
        shape = vram.shape_from_config(json.loads((model_path / "config.json").read_text()))
        est = vram.estimate(shape, vram.settings_from_config(cfg, device=device))  # CPU runs: a RAM estimate
        if plan is not None and plan.distributed:  # the estimate for ONE device (one process) of the group
            est = vram.per_gpu(est, plan.strategy, plan.world_size)
        body = est.to_dict() if hasattr(est, "to_dict") else dataclasses.asdict(est)
    except Exception as e:  # noqa: BLE001 - the estimate is advice, not a reason to refuse training; say why it is missing
        msg = f"no VRAM estimate for this model: {type(e).__name__}: {e}"
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        events.log("warning", msg)
        return
    if context_bytes is not None:
        body["measured_context_bytes"] = int(context_bytes)
    runs.write_atomic(run_dir / "estimate.json", json.dumps(body, indent=1, default=str))


def prepare_resume(run_dir: Path, cfg, model_path: Path, prepared, events: ev.EventLog, plan) -> Path | None:
    """On a fresh run, record the fingerprint. On a resume, set partial checkpoints aside and refuse to continue
    if the model, LoRA shape or data differ from what the checkpoints were trained with."""
    for p in runs.set_aside_partial(run_dir):
        msg = f"set aside an incomplete checkpoint (a save was cut short): {p.name}; it is never loaded"
        print(msg, file=sys.stderr, flush=True)
        events.log("warning", msg)
    fp = runs.fingerprint(cfg, model_path, tokens_digest(prepared.train))
    latest = runs.latest_checkpoint(run_dir)
    saved = runs.read_fingerprint(run_dir)
    if latest is None:
        runs.write_fingerprint(run_dir, fp)
        distributed.record_plan(run_dir, plan)
        return None
    problems = runs.compare_fingerprints(saved, fp) if saved else []
    if problems:
        raise RunError("cannot resume: " + "; ".join(problems),
                       "restore what changed, or start a new run with the new settings")
    print(f"resuming from {latest.name}", flush=True)
    events.log("info", f"resuming from {latest.name}")
    _note_world_change(run_dir, plan, events)
    return latest


def _note_world_change(run_dir: Path, now, events: ev.EventLog) -> None:
    """A resume on another number of processes keeps the global batch (core.train.distributed.plan divides grad_accum)
    but not the data order or every RNG stream of an uninterrupted run: say so."""

    path = distributed.ranks_dir(run_dir) / "plan.json"
    before = json.loads(path.read_text()) if path.exists() else {"world_size": 1, "effective_batch": None}
    if before["world_size"] != now.world_size:
        msg = (f"resuming on {now.world_size} process(es), the run started on {before['world_size']}: the effective "
               f"batch is {now.effective_batch} (was {before['effective_batch'] or 'the same'}), but the order of the "
               f"examples after the checkpoint differs from an uninterrupted run")
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        events.log("warning", msg)
    distributed.record_plan(run_dir, now)


def shorten_data(run_dir: Path, cfg, tokenizer):
    """The data prepared again at cfg.data.max_len (out-of-memory recovery's auto+shorten), and the run's fingerprint
    made to say so (main rank), so a later resume, which prepares the data from the rewritten config.yaml, accepts
    the checkpoints trained on it."""
    prepared, _ = data_cache.prepare(cfg, tokenizer)
    if not prepared.train:
        raise RunError(f"no training rows are left at data.max_len={cfg.data.max_len} (out-of-memory recovery "
                       "shortened the rows)", "set train.oom_recovery=auto, or data.overlong=truncate")
    if distributed.is_main():
        fp = runs.read_fingerprint(run_dir) or {}
        fp.setdefault("data", {}).update(max_len=cfg.data.max_len, tokens_sha256=tokens_digest(prepared.train))
        runs.write_fingerprint(run_dir, fp)
    return prepared


def tokens_digest(rows) -> str:
    """sha256 of the training examples exactly as the model sees them (ids and loss mask)."""

    h = hashlib.sha256()
    for row in rows:
        if "input_ids" in row or "chosen_ids" in row:
            for key in ("input_ids", "labels") if "input_ids" in row else ("prompt_ids", "chosen_ids", "rejected_ids"):
                h.update(array("q", row[key]).tobytes())
        else:  # a GRPO prompt: its tokens and the columns its rewards read
            h.update(array("q", row["prompt_ids"]).tobytes())
            h.update(json.dumps({k: v for k, v in row.items() if k != "prompt_ids"}, sort_keys=True,
                                default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def check_disk(run_dir: Path, model, cfg) -> None:
    """Refuse to start when the checkpoints would not fit: failing at the first save wastes the user's time."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim_bytes = 2 if "8bit" in cfg.train.optimizer else 8
    per_ckpt = trainable * (4 + optim_bytes) + (1 << 20)
    need = per_ckpt * (cfg.train.save_total_limit + 1) + trainable * 4 + (32 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DiskFull(f"only {free / 2**20:,.0f} MB free on the disk holding {run_dir}; checkpoints and the adapter "
                       f"need about {need / 2**20:,.0f} MB",
                       "free up space, lower train.save_total_limit, or point LORA_GARAGE_HOME at a bigger disk")


# ---------------------------------------------------------------- after training

def save_adapter(model, tokenizer, run_dir: Path, before_rename=None) -> Path:
    """adapter/ in PEFT format (adapter_model.safetensors + adapter_config.json) plus the tokenizer the run used.
    Written to a temporary folder and renamed, so adapter/ is either the old complete one or the new one.
    before_rename: test-only (the fault campaign's kill in the middle of the final save)."""
    final = run_dir / "adapter"
    tmp = run_dir / ".adapter.tmp"
    if len(getattr(model, "peft_config", {})) > 1:  # DPO from a run's adapter: its frozen reference copy stays out
        from core.train.preference import drop_reference  # heavy

        drop_reference(model)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if before_rename is not None:
        before_rename()
    old = run_dir / ".adapter.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_probe(model, row: dict, run_dir: Path) -> None:
    """Test-only: the trained model's logits on one example, so a test can check the saved adapter reproduces
    them."""
    import torch  # heavy

    model.eval()
    ids = torch.tensor([row["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    torch.save({"input_ids": ids.cpu(), "logits": logits}, run_dir / "probe.pt")


# ---------------------------------------------------------------- failures

def classify(e: BaseException, ctx, cfg, run_dir: Path) -> GarageError:
    """Turn any exception into a GarageError with a message and a concrete hint."""
    import torch  # heavy

    if isinstance(e, GarageError):
        return e
    if isinstance(e, torch.OutOfMemoryError):
        return oom_error(ctx, cfg, gpu=True)
    if isinstance(e, MemoryError):
        return oom_error(ctx, cfg, gpu=False)

    if disk_full_cause(e) is not None:  # also when a library wraps it (safetensors' SafetensorError)
        return runs.disk_full_error(run_dir, disk_full_cause(e), ctx.phase, ctx.step)
    if isinstance(e, KeyboardInterrupt):
        err = RunError("interrupted twice: stopped without saving", "resume continues from the last complete checkpoint")
        err.kind = "interrupted"
        return err
    if isinstance(e, Warning):
        return RunError(f"stopped during {ctx.phase} at step {ctx.step}: a library warned that the results would be "
                        f"wrong ({type(e).__name__}: {str(e)[:300]})",
                        "no adapter was written from it; see train.log, and report it with `python -m core doctor`")
    return RunError(f"{type(e).__name__} during {ctx.phase}: {e}", "see train.log for the full traceback")


def oom_error(ctx, cfg, gpu: bool) -> OutOfMemory:
    where = "GPU memory" if gpu else "RAM"
    at = (f" at step {ctx.step}" if ctx.phase in ("first step", "train", "save", "eval", "final save", "final eval")
          and ctx.step else "")
    tips = []
    if cfg is not None:
        t, d, q = cfg.train, cfg.data, cfg.quant
        if ctx.phase == "load":
            if q.method == "lora":
                tips.append("quant.method=qlora (4-bit base, ~4x smaller weights)")
            tips.append("a smaller model")
        else:
            if t.batch_size > 1:
                tips.append(f"train.batch_size=1 with train.grad_accum={t.batch_size * t.grad_accum} (same effective batch)")
            if d.max_len > 256:
                tips.append(f"data.max_len={max(256, d.max_len // 2)}")
            if not t.grad_checkpointing:
                tips.append("train.grad_checkpointing=true")
            if q.method == "lora":
                tips.append("quant.method=qlora")
            if t.optimizer == "adamw":
                tips.append("train.optimizer=adamw_8bit")
            if ctx.phase == "save" and t.sample_prompts:
                tips.append("no train.sample_prompts (generating samples at each checkpoint needs memory too)")
    hint = ("try " + "; ".join(tips) if tips else "use smaller settings") + ". The VRAM estimate shows what fits."
    return OutOfMemory(f"out of {where} during {ctx.phase}{at}", hint)


def diverged_error(run_dir: Path, cfg, steps: list[int]) -> Diverged:
    latest = runs.latest_checkpoint(run_dir)
    kept = (f"the last good checkpoint is {latest.name}" if latest
            else "no checkpoint was saved before the loss diverged")
    return Diverged(f"the loss was NaN/inf for {len(steps)} steps in a row (steps {steps[0]}-{steps[-1]}); "
                    f"training stopped and no final adapter was written",
                    f"{kept}. Lower train.lr (e.g. {cfg.train.lr / 4:g}), add train.warmup_steps, keep "
                    f"train.max_grad_norm=1.0, and check the data for empty or broken rows")
