"""Start, stop, find and resume the training child process. One training job per LoRA Garage home at a time.

The lock and the identity of a run's process live in core.runs.procs: the runner takes the lock, hands it to the child
(an inherited file descriptor on POSIX; on Windows the child takes it over), and keeps the child so its exit code
can be read. The child is `python -m core train --run-dir DIR`, started with an argument list (never a shell), in
its own process group (core.runs.portable: an app restart does not kill it), output to DIR/train.log. Stop writes
a stop request the child polls at each step, so it needs no signal; after the grace period the tree is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from core import paths
from core.runs import access
from core.runs import portable
from core.runs import procs
from core.runs import resolve as run_files
from core.runs import folder as runs
from core.runs import stopping
from core.data import sft as data
from core.config import RunConfig, require_reward
from core.errors import BusyError, ConfigError, RunError
from core import models
from core.errors import GarageError
from core.train import distributed
from core.train.startup import SPAWNED_AT_ENV
from core.estimate import limits


# ---------------------------------------------------------------- the public API (the UI and the CLI call these)

def admit(cfg: RunConfig) -> RunConfig:
    """The one check before a run folder is made, whichever way a run starts (the Start button, `train`,
    `train --detach`, one machine of several): each setting on its own (config.validate), what a shared app may
    read (access: with --allow-dir, no dataset or model outside its folders), and the bounds that need the model's
    shape and the dataset's size (limits). Raises ConfigError / ModelError naming the field and the fix."""
    cfg.validate()
    require_reward(cfg)
    access.check_config(cfg)
    limits.check(cfg)
    data.check_fit(cfg)  # dpo on an SFT file is refused with Inspect's words, before a run folder exists
    return cfg


def start(cfg: RunConfig) -> str:
    """Admit the settings, create a run folder and start training it in the background. Returns the run id.
    BusyError if a run is already training on this machine."""
    admit(cfg)
    lock = acquire_lock("(starting)")
    try:
        run_dir = runs.create(cfg)
        procs.hold_lock(run_dir.name, lock)  # names the new run as the holder
        _spawn(run_dir, lock)
    finally:
        lock.close()  # the child holds its own copy of the lock now, or takes it over (or nobody, if the spawn failed)
    return run_dir.name


def pin_source_run(cfg: RunConfig, model_given: bool = True) -> RunConfig:
    """train.from_run, before a Start (the app's and the CLI's): record the run's id, never "latest" (which would
    name another run by the time this one resumes), and take its base model and LoRA shape, which its adapter
    fixes. A model given that differs is an error naming both; model_given=False takes the run's base."""
    if not cfg.train.from_run:
        return cfg
    src = run_files.resolve_run(cfg.train.from_run)
    if not run_files.has_adapter(src):
        raise ConfigError("train.from_run", f"run {src.name} has no final adapter (it did not complete)",
                          "continue from a completed run, or leave train.from_run empty to start from the base")
    src_cfg = runs.load_config(src)
    if model_given and not run_files.same_source(cfg.model.source, src_cfg.model.source):
        raise ConfigError("train.from_run", f"run {src.name} trained on {src_cfg.model.source}, not {cfg.model.source}",
                          f"pick {src_cfg.model.source} as the base model (on the command line, leave --model out: "
                          f"the run's base is used), or pick a run trained on {cfg.model.source}")
    cfg.train.from_run = src.name
    cfg.model.source = src_cfg.model.source
    cfg.lora = src_cfg.lora
    return cfg


def stop(run_id: str, grace_s: float | None = None, wait: bool = True) -> str:
    """Ask the run to stop (a stop request in its folder: it finishes the current step, saves a marked checkpoint
    and the adapter, and ends as `stopped`); after grace_s (None: core.runs.stopping.grace_for, from the run's step
    time) it is interrupted, then its process tree killed. With wait=False returns at once and a thread does the
    waiting. Returns the state: the final one when waiting, else "stopping"."""
    run_dir = runs.get(run_id)
    st = runs.read_status(run_dir)
    if st.get("state") not in runs.ACTIVE:
        raise RunError(f"run {run_id} is not running (it is {st.get('state')})", "nothing to stop")
    pid = st.get("pid")
    grace_s = _note_stop(run_dir, grace_s)
    portable.request_stop(run_dir)  # polled by the child; no signal, so the same on every system
    if not wait:
        threading.Thread(target=_wait_or_kill, args=(run_dir, pid, grace_s), daemon=True).start()
        return "stopping"
    return _wait_or_kill(run_dir, pid, grace_s)


def request_stop(run_id: str, grace_s: float | None = None) -> str:
    """stop() without waiting: for a UI button handler."""
    return stop(run_id, grace_s, wait=False)


def running() -> str | None:
    """The id of the run that is training now, if any; finds it again after an app restart (status.json, pid
    alive and really ours). Runs whose process died without a word are marked failed on the way."""
    holder = procs.lock_holder()
    candidates = [holder] if holder else []
    candidates += [r["id"] for r in runs.list_runs() if r.get("state") in runs.ACTIVE and r["id"] != holder]
    for run_id in candidates:
        try:
            st = runs.read_status(runs.get(run_id))  # reconciles: a dead child is marked failed here
        except RunError:
            continue
        if st.get("state") in runs.ACTIVE:
            return run_id
    return None


def resume(run_id: str) -> str:
    """Continue a stopped or failed run from its last COMPLETE checkpoint, in the background. Refuses when the
    base model, the LoRA shape or the dataset changed since the run started, saying which."""
    run_dir = runs.get(run_id)
    st = runs.read_status(run_dir)
    state = st.get("state")
    if state in runs.ACTIVE:
        raise BusyError(f"busy: run {run_id} is training", "it is still running; nothing to resume")
    if state == "completed":
        raise RunError(f"run {run_id} already completed", "start a new run (e.g. with more steps) instead")
    latest = runs.latest_checkpoint(run_dir)
    if latest is None:
        raise RunError(f"run {run_id} has no complete checkpoint to resume from",
                       "start it again as a new run; checkpoints are written every train.save_steps steps")
    access.check_config(runs.load_config(run_dir))
    problems = _changes_since_start(run_dir)
    if problems:
        raise RunError(f"cannot resume {run_id}: " + "; ".join(problems),
                       "restore what changed, or start a new run with the new settings")
    lock = acquire_lock(run_id)
    try:
        runs.write_status(run_dir, state="queued", error=None, ended_at=None, noticed_at=None,
                          resumed_from=latest.name)
        _spawn(run_dir, lock)
    finally:
        lock.close()
    return run_id


def delete(run_id: str) -> None:
    """Delete a run folder. Refused while the run is training."""
    run_dir = runs.get(run_id)
    if runs.read_status(run_dir).get("state") in runs.ACTIVE:
        raise BusyError(f"busy: run {run_id} is training", "stop it first")
    runs.delete(run_dir)


# ---------------------------------------------------------------- the lock

def acquire_lock(run_id: str):
    """Take the training lock (core.runs.procs); a holder whose run has already ended is waited for, not busy."""
    return procs.acquire_lock(run_id, holder_ended=runs.run_ended, holder_active=runs.run_active)


# ---------------------------------------------------------------- spawning and watching the child

def _spawn(run_dir: Path, lock) -> subprocess.Popen:
    portable.clear_stop(run_dir)  # a resume forgets the request that stopped the run before
    log = open(run_dir / "train.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if lock.inheritable:
        env[procs.LOCK_FD_ENV] = str(lock.fd)
    env.setdefault("LORA_GARAGE_HOME", str(paths.home()))
    env.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # Apple GPUs: an op MPS lacks runs on the CPU, not an error
    env[SPAWNED_AT_ENV] = repr(time.time())  # the start-up timeline's spawn phase (core.train.startup)
    try:
        proc = portable.popen_passing_lock([sys.executable, "-m", "core", "train", "--run-dir", str(run_dir)], lock,
                                           cwd=str(paths.REPO_ROOT), stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
    except OSError as e:
        runs.write_status(run_dir, state="failed", ended_at=runs.now(),
                          error={"kind": "run", "message": f"could not start the training process: {e}",
                                 "hint": f"check that {sys.executable} runs"})
        raise RunError(f"could not start the training process: {e}", f"check that {sys.executable} runs") from e
    finally:
        log.close()
    procs.adopt(proc)
    runs.update_status(run_dir, ("queued",), pid=proc.pid, pid_create_time=procs.process_start_time(proc.pid),
                       launched_by=procs.LAUNCHED_BY_APP)
    return proc


def _wait_or_kill(run_dir: Path, pid: int | None, grace_s: float) -> str:
    deadline = time.time() + grace_s
    while time.time() < deadline:
        st = runs.read_status(run_dir)
        if st.get("state") not in runs.ACTIVE:
            return st["state"]
        time.sleep(0.2)
    st = runs.read_status(run_dir)
    if st.get("state") in runs.ACTIVE and pid and procs.is_alive(pid, st.get("pid_create_time")):
        portable.end_tree(pid, grace_s=min(2.0, grace_s))  # the child and its helpers (psutil), not its shell
        procs.reap(pid, timeout=10)
        _kill_ranks(run_dir)
        runs.update_status(run_dir, runs.ACTIVE, state="stopped", ended_at=runs.now(),
                           error=stopping.killed_error(run_dir, grace_s, st.get("step")))
    return runs.read_status(run_dir)["state"]


def _note_stop(run_dir: Path, grace_s: float | None) -> float:
    """Mark the run stopping, with the grace it gets and the step time that grace came from (the pages say
    "stopping after the current step (about N s)" from these). Returns the grace."""
    step_s = stopping.last_step_seconds(run_dir)
    if grace_s is None:
        grace_s, step_s = stopping.grace_for(run_dir)
    runs.update_status(run_dir, ("queued", "running"), state="stopping")
    runs.update_status(run_dir, runs.ACTIVE, **{stopping.STOP_REQUESTED_AT: time.time(),
                                                stopping.STOP_GRACE_S: round(grace_s, 1), stopping.STEP_S: step_s})
    return grace_s


def _kill_ranks(run_dir: Path) -> None:
    """The ranks of a multi-process run live in their own sessions (the launcher starts them so): end them too."""

    for pid_path in distributed.ranks_dir(run_dir).glob("rank*.pid"):
        try:
            pid = int(pid_path.read_text())
        except (OSError, ValueError):
            continue
        if procs.is_alive(pid, None):  # alive and a `core ... train` process (pids are reused)
            portable.kill_tree(pid)


def _changes_since_start(run_dir: Path) -> list[str]:
    """The cheap part of the resume check (no torch): config vs fingerprint, model files, dataset files. The
    child also compares the tokenized rows before it loads a checkpoint."""

    saved = runs.read_fingerprint(run_dir)
    if saved is None:
        return []
    cfg = runs.load_config(run_dir)
    try:
        model_path = models.resolve(cfg.model.source, allow_download=False)
    except GarageError as e:  # a model that cannot be found any more is itself the answer
        return [f"the base model {cfg.model.source} cannot be found any more ({e})"]
    return runs.compare_fingerprints(saved, runs.fingerprint(cfg, model_path))
