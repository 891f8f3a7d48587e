"""Start, stop, find and resume the training child process. One training job per LoRA Garage home at a time.

The lock is an fcntl lock on $LORA_GARAGE_HOME/train.lock, taken here with LOCK_NB (so a second start fails at
once with BusyError) and handed to the child as an inherited file descriptor: the child holds it for its whole
life and the kernel drops it when the child exits or is killed, so a lock can never go stale. The file's
content (run id, pid) is only there to name the holder in the error message.

The child is `python -m core train --run-dir DIR`, started with an argument list (never a shell), in its own
session (so Stop reaches it and its helpers, and an app restart does not kill it), output to DIR/train.log.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core import access, paths, runs
from core.config import RunConfig
from core.errors import BusyError, RunError

LOCK_FD_ENV = "LORA_GARAGE_LOCK_FD"
_children: dict[str, subprocess.Popen] = {}  # the children this process started, to reap them and read exit codes
_exited_at: dict[str, str] = {}              # run id -> when that child ended (runs.now() format)
_exit_codes: dict[int, int] = {}             # pid -> exit code of a child we started and reaped


# ---------------------------------------------------------------- the public API (the UI and the CLI call these)

def start(cfg: RunConfig) -> str:
    """Create a run folder and start training it in the background. Returns the run id. BusyError if a run is
    already training on this machine."""
    cfg.validate()
    access.check_config(cfg)  # a shared app (--allow-dir) reads no dataset or model outside its folders
    fd = acquire_lock("(starting)")
    try:
        run_dir = runs.create(cfg)
        _write_holder(fd, run_dir.name)
        _spawn(run_dir, fd)
    finally:
        os.close(fd)  # the child holds its own copy of the lock now (or nobody does, if the spawn failed)
    return run_dir.name


def stop(run_id: str, grace_s: float = 30.0, wait: bool = True) -> str:
    """Ask the run to stop (SIGTERM: it finishes the current step, saves a marked checkpoint and the adapter, and
    ends as `stopped`); SIGKILL after grace_s. With wait=False returns at once and a thread does the waiting.
    Returns the state: the final one when waiting, else "stopping"."""
    run_dir = runs.get(run_id)
    st = runs.read_status(run_dir)
    if st.get("state") not in runs.ACTIVE:
        raise RunError(f"run {run_id} is not running (it is {st.get('state')})", "nothing to stop")
    pid = st.get("pid")
    runs.update_status(run_dir, ("queued", "running"), state="stopping")
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended in the meantime; reconcile below records how
    if not wait:
        threading.Thread(target=_wait_or_kill, args=(run_dir, pid, grace_s), daemon=True).start()
        return "stopping"
    return _wait_or_kill(run_dir, pid, grace_s)


def request_stop(run_id: str, grace_s: float = 30.0) -> str:
    """stop() without waiting: for a UI button handler."""
    return stop(run_id, grace_s, wait=False)


def running() -> str | None:
    """The id of the run that is training now, if any; finds it again after an app restart (status.json, pid
    alive and really ours). Runs whose process died without a word are marked failed on the way."""
    holder = _lock_holder()
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
    fd = acquire_lock(run_id)
    try:
        runs.write_status(run_dir, state="queued", error=None, ended_at=None, noticed_at=None,
                          resumed_from=latest.name)
        _spawn(run_dir, fd)
    finally:
        os.close(fd)
    return run_id


def delete(run_id: str) -> None:
    """Delete a run folder. Refused while the run is training."""
    run_dir = runs.get(run_id)
    if runs.read_status(run_dir).get("state") in runs.ACTIVE:
        raise BusyError(f"busy: run {run_id} is training", "stop it first")
    runs.delete(run_dir)


# ---------------------------------------------------------------- the lock

def lock_path() -> Path:
    return paths.home() / "train.lock"


EXIT_GRACE_S = 60.0  # how long a run that has written its final state may take to exit and let go of the lock


def acquire_lock(run_id: str) -> int:
    """Take the training lock; returns its file descriptor. BusyError naming the holder when a run is training.
    A holder whose status.json already says stopped / completed / failed is not training: its process is only
    exiting (freeing the model, joining threads), so wait for the kernel to drop its lock instead of calling the
    machine busy."""
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + EXIT_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _lock_holder()
            ended = _holder_state(holder) in runs.TERMINAL
            if ended and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            if ended:
                raise BusyError(f"busy: run {holder} has ended but its process still holds the training lock "
                                f"after {EXIT_GRACE_S:.0f} s", f"end that process (pid in {lock_path()}) and try again")
            holder = holder or "another run"
            raise BusyError(f"busy: run {holder} is training",
                            f"one training run at a time: wait for it, or stop it (python -m core runs stop {holder})")
    _write_holder(fd, run_id)
    return fd


def _holder_state(run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        return runs.read_status(runs.get(run_id), reconcile=False).get("state")
    except RunError:
        return None


def hold_lock(run_id: str, fd: int | None = None) -> int:
    """In the child: keep the lock the runner handed over (LORA_GARAGE_LOCK_FD), or take it now."""
    if fd is None and os.environ.get(LOCK_FD_ENV):
        fd = int(os.environ.pop(LOCK_FD_ENV))
        # make sure the descriptor really is the lock on our home's lock file, held by us
        if os.fstat(fd).st_ino != os.stat(lock_path()).st_ino:
            raise RunError(f"{LOCK_FD_ENV} does not point at {lock_path()}", "start runs through core.runner")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours: succeeds at once
    if fd is None:
        fd = acquire_lock(run_id)
    _write_holder(fd, run_id)
    return fd


def _write_holder(fd: int, run_id: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"run_id": run_id, "pid": os.getpid()}).encode(), 0)


def _lock_holder() -> str | None:
    try:
        info = json.loads(lock_path().read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    rid = info.get("run_id")
    return rid if rid and not rid.startswith("(") else None


# ---------------------------------------------------------------- spawning and watching the child

def _spawn(run_dir: Path, lock_fd: int) -> subprocess.Popen:
    log = open(run_dir / "train.log", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{LOCK_FD_ENV: str(lock_fd)})
    env.setdefault("LORA_GARAGE_HOME", str(paths.home()))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "core", "train", "--run-dir", str(run_dir)],
                                cwd=str(paths.REPO_ROOT), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock_fd,), env=env)
    except OSError as e:
        runs.write_status(run_dir, state="failed", ended_at=runs.now(),
                          error={"kind": "run", "message": f"could not start the training process: {e}",
                                 "hint": f"check that {sys.executable} runs"})
        raise RunError(f"could not start the training process: {e}", f"check that {sys.executable} runs") from e
    finally:
        log.close()
    _children[run_dir.name] = proc
    _exited_at.pop(run_dir.name, None)
    _exit_codes.pop(proc.pid, None)  # a pid seen before belonged to an earlier child
    threading.Thread(target=_note_exit, args=(run_dir.name, proc), daemon=True).start()
    runs.update_status(run_dir, ("queued",), pid=proc.pid, pid_create_time=process_start_time(proc.pid),
                       launched_by=runs.LAUNCHED_BY_APP)
    return proc


def _note_exit(run_id: str, proc: subprocess.Popen) -> None:
    """Remember when a child we started ended, so a crash records the time of death, not the time it was noticed.
    This wait reaps the child, so its exit code is kept by pid: run ids repeat across homes (tests, two apps)."""
    code = proc.wait()
    _exit_codes[proc.pid] = code
    _exited_at[run_id] = runs.now()


def _wait_or_kill(run_dir: Path, pid: int | None, grace_s: float) -> str:
    deadline = time.time() + grace_s
    while time.time() < deadline:
        st = runs.read_status(run_dir)
        if st.get("state") not in runs.ACTIVE:
            return st["state"]
        time.sleep(0.2)
    st = runs.read_status(run_dir)
    if st.get("state") in runs.ACTIVE and pid and _is_ours(pid, st, run_dir):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)  # a child we spawned leads its own session: this takes its helpers too
        else:
            os.kill(pid, signal.SIGKILL)  # a foreground `python -m core train` shares its shell's group
        _reap(run_dir.name, pid, timeout=10)
        runs.update_status(run_dir, runs.ACTIVE, state="stopped", ended_at=runs.now(), error={
            "kind": "run", "message": f"did not stop within {grace_s:.0f} s and was killed; the current step was lost",
            "hint": "resume continues from the last complete checkpoint"})
    return runs.read_status(run_dir)["state"]


def reconcile(run_dir: Path, st: dict) -> dict:
    """Called by runs.read_status for a run that claims to be active: if its process is gone, mark it failed with
    the exit code (when we are its parent) and the tail of train.log. Returns the (possibly new) status."""
    pid = st.get("pid")
    proc = _children.get(run_dir.name)
    if proc is not None and proc.pid == pid:
        code = proc.poll()
        if code is None:
            return st
    elif pid is None:
        # between runs.create and the spawn (or the foreground child's first write): give it a minute
        if time.time() - os.stat(run_dir / "status.json").st_mtime < 60:
            return st
        code = None
    elif _is_ours(pid, st, run_dir):
        return st
    else:
        code = _reap(run_dir.name, pid, timeout=0)
    if code is None:
        how = f"exit code unknown: {_started_by(st)}" if pid else "it never started"
    elif code < 0:
        how = f"killed by {signal.Signals(-code).name}"
        if code == -signal.SIGKILL:
            how += " (if nobody stopped it, the system may have run out of RAM)"
    else:
        how = f"exit code {code}"
    tail = runs.tail_log(run_dir, 15)
    noticed = runs.now()
    ended = _exited_at.get(run_dir.name) if proc is not None and proc.pid == pid else None
    when = {"ended_at": ended} if ended else {"ended_at": _last_sign_of_life(run_dir), "noticed_at": noticed}
    if not ended:
        how += f"; its last output was at {when['ended_at']}, the end was noticed at {noticed}"
    error = {"kind": "crash", "message": f"the training process ended without a word ({how})",
             "hint": "see the end of train.log; resume continues from the last complete checkpoint",
             "exit_code": code, "log_tail": tail}
    # asked to stop and then gone (e.g. SIGTERM before its handler was installed): stopped, with the reason kept
    state = "stopped" if st.get("state") == "stopping" else "failed"
    new = runs.update_status(run_dir, runs.ACTIVE, state=state, error=error, **when)
    return new if new is not None else runs.read_status(run_dir, reconcile=False)


def _started_by(st: dict) -> str:
    """Why this process cannot know the exit code: the run is not its child."""
    if st.get("launched_by") == runs.LAUNCHED_BY_CLI:
        return "it was started in a terminal by python -m core train, not by this process"
    if st.get("launched_by") == runs.LAUNCHED_BY_APP:
        return "it was started by another LoRA Garage process (an earlier app session or train --detach)"
    return "it was not started by this process"


def _last_sign_of_life(run_dir: Path) -> str:
    """When the process last wrote to its run folder: the end is at or after this (the exact time is unknown)."""
    from datetime import datetime

    stamps = [p.stat().st_mtime for p in (run_dir / "train.log", run_dir / "events.jsonl") if p.exists()]
    if not stamps:
        return runs.now()
    return datetime.fromtimestamp(max(stamps)).astimezone().isoformat(timespec="seconds")


def _reap(run_id: str, pid: int, timeout: float) -> int | None:
    """Exit code of a child we started (reaping it so it does not linger as a zombie); None if not ours."""
    if pid in _exit_codes:
        return _exit_codes[pid]
    proc = _children.get(run_id)
    if proc is not None and proc.pid == pid:
        try:
            return proc.wait(timeout=timeout) if timeout else proc.poll()
        except subprocess.TimeoutExpired:
            return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _is_ours(pid: int, st: dict, run_dir: Path) -> bool:
    """Alive, not a zombie, and the same process that wrote the status (start time matches; pids get reused)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        created = st.get("pid_create_time")
        if created is not None:
            return abs(p.create_time() - float(created)) < 1.0
        cmd = " ".join(p.cmdline())
        return "core" in cmd and "train" in cmd
    except psutil.Error:
        return False


def _changes_since_start(run_dir: Path) -> list[str]:
    """The cheap part of the resume check (no torch): config vs fingerprint, model files, dataset files. The
    child also compares the tokenized rows before it loads a checkpoint."""
    from core import models
    from core.errors import GarageError

    saved = runs.read_fingerprint(run_dir)
    if saved is None:
        return []
    cfg = runs.load_config(run_dir)
    try:
        model_path = models.resolve(cfg.model.source, allow_download=False)
    except GarageError as e:  # a model that cannot be found any more is itself the answer
        return [f"the base model {cfg.model.source} cannot be found any more ({e})"]
    return runs.compare_fingerprints(saved, runs.fingerprint(cfg, model_path))
