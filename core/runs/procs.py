"""Process identity and the training lock: who is training, is that process still the one that wrote the run's
status, how did it end. core.runs.folder (status reads) and core.runs.runner (start / stop) both import this; it imports
neither, so there is no circle, and a status read never calls up into the runner.

The lock is on $LORA_GARAGE_HOME/train.lock (core.runs.portable picks the system's own lock call), taken without
waiting. On POSIX it is handed to the training child as an inherited file descriptor: the child holds it for its
whole life and the kernel drops it when the child exits or is killed, so a lock can never go stale. Where a lock
cannot be inherited (Windows), the runner names the new run as the holder and lets go after the spawn, and the
child takes the lock over: it waits while the holder is its own run, and anyone else who finds the lock free but
its named holder still active is told the machine is busy. The file's content (run id, pid) only names the holder.

A run's process is identified by pid plus its start time (pids are reused). The children this process spawned
are kept here so their exit codes can be read: a thread waits on each and records when it ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import psutil
from core import paths
from core.runs import portable
from core.errors import BusyError, RunError

LOCK_FD_ENV = "LORA_GARAGE_LOCK_FD"
EXIT_GRACE_S = 60.0  # how long a run that has written its final state may take to exit and let go of the lock
LAUNCHED_BY_CLI = "cli"   # status.json launched_by: a foreground `python -m core train`
LAUNCHED_BY_APP = "app"   # ... or core.runs.runner (the app, or `train --detach`)

# by pid, not run id: run ids repeat across homes (tests, two apps), pids do not while we hold the Popen
_children: dict[int, subprocess.Popen] = {}  # pid -> the child this process started
_exited_at: dict[int, str] = {}              # pid -> when that child ended (now() format)
_exit_codes: dict[int, int] = {}             # pid -> exit code of a child we started and reaped


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- the lock

def lock_path() -> Path:
    return paths.home() / "train.lock"


def acquire_lock(run_id: str, holder_ended: Callable[[str], bool] | None = None,
                 holder_active: Callable[[str], bool] | None = None):
    """Take the training lock; returns the lock (portable.open_lock's object: .fd, .close()). BusyError naming the
    holder when a run is training. A holder whose run has already ended (holder_ended(run_id): its status says
    stopped / completed / failed) is only exiting (freeing the model, joining threads), so wait for the system to
    drop its lock instead of calling the machine busy; a holder that is this very run is handing the lock over.
    Where locks are not inherited, a free lock whose named holder is still active (holder_active(run_id): its
    status and its live process say so) is being handed over to that run's child: busy too."""
    lock = portable.open_lock(lock_path())
    deadline = time.monotonic() + EXIT_GRACE_S
    while not lock.acquire(blocking=False):
        holder = lock_holder()
        ended = bool(holder and holder_ended and holder_ended(holder))
        if (ended or holder == run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        lock.close()
        if ended:
            raise BusyError(f"busy: run {holder} has ended but its process still holds the training lock "
                            f"after {EXIT_GRACE_S:.0f} s", f"end that process (pid in {lock_path()}) and try again")
        raise _busy(holder)
    if not lock.inheritable:  # free, but its holder may be a child that has not taken it over yet
        holder = lock_holder()
        if holder and holder != run_id and holder_active and holder_active(holder):
            lock.close()
            raise _busy(holder)
    _write_holder(lock, run_id)
    return lock


def _busy(holder: str | None) -> BusyError:
    holder = holder or "another run"
    return BusyError(f"busy: run {holder} is training",
                     f"one training run at a time: wait for it, or stop it (python -m core runs stop {holder})")


def hold_lock(run_id: str, lock=None, holder_ended: Callable[[str], bool] | None = None):
    """In the child: keep the lock the runner handed over (LORA_GARAGE_LOCK_FD, POSIX), or take it now."""
    if lock is None and os.environ.get(LOCK_FD_ENV):
        fd = int(os.environ.pop(LOCK_FD_ENV))
        # make sure the descriptor really is the lock on our home's lock file, held by us
        if os.fstat(fd).st_ino != os.stat(lock_path()).st_ino:
            raise RunError(f"{LOCK_FD_ENV} does not point at {lock_path()}", "start runs through core.runs.runner")
        lock = portable.lock_from_fd(fd)
        if not lock.acquire(blocking=False):  # already ours: succeeds at once
            raise RunError(f"{LOCK_FD_ENV} names a lock this process does not hold",
                           "start runs through core.runs.runner")
    if lock is None:
        lock = acquire_lock(run_id, holder_ended)
    _write_holder(lock, run_id)
    return lock


def _write_holder(lock, run_id: str) -> None:
    portable.write_at_start(lock.fd, json.dumps({"run_id": run_id, "pid": os.getpid()}).encode())


def lock_holder() -> str | None:
    """The run id written by the lock's holder (None when unknown or a run still being created)."""
    try:
        info = json.loads(lock_path().read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    rid = info.get("run_id")
    return rid if rid and not rid.startswith("(") else None


# ---------------------------------------------------------------- identity

def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_alive(pid: int, create_time: float | None) -> bool:
    """Alive, not a zombie, and the same process that wrote the status (start time matches; pids get reused).
    Without a recorded start time, a `core ... train` command line stands in for it."""

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None:
            return abs(p.create_time() - float(create_time)) < 1.0
        cmd = " ".join(p.cmdline())
        return "core" in cmd and "train" in cmd
    except psutil.Error:
        return False


def exit_words(code: int) -> str:
    """A child's return code as a user reads it: "killed by SIGSEGV" for a signal, else "exit code N"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------- children this process started

def adopt(proc: subprocess.Popen) -> None:
    """Keep a child we just spawned, and note when it ends (so a crash records its time of death)."""
    _children[proc.pid] = proc
    _exited_at.pop(proc.pid, None)   # a pid seen before belonged to an earlier child
    _exit_codes.pop(proc.pid, None)
    threading.Thread(target=_note_exit, args=(proc,), daemon=True).start()


def child(pid: int | None) -> subprocess.Popen | None:
    """The child with this pid that this process started."""
    return _children.get(pid) if pid is not None else None


def _note_exit(proc: subprocess.Popen) -> None:
    """This wait reaps the child; its exit code and time are kept by pid. While it waits, proc.poll() from another
    thread says None (Popen's wait lock), so check() treats the run as alive until both are recorded here."""
    code = proc.wait()
    _exited_at[proc.pid] = now()
    _exit_codes[proc.pid] = code


def reap(pid: int, timeout: float) -> int | None:
    """Exit code of a child we started (reaping it so it does not linger as a zombie); None if not ours."""
    if pid in _exit_codes:
        return _exit_codes[pid]
    proc = child(pid)
    if proc is not None:
        try:
            return proc.wait(timeout=timeout) if timeout else proc.poll()
        except subprocess.TimeoutExpired:
            return None
    return portable.reap_nohang(pid)


# ---------------------------------------------------------------- a run whose process is gone

@dataclass
class Death:
    """How a run's process ended, as far as this process can know."""
    how: str                  # "killed by SIGKILL (...)", "exit code 1", "exit code unknown: ...", "it never started"
    exit_code: int | None
    ended_at: str             # the child's end where we saw it, else its last sign of life
    noticed_at: str | None    # set when ended_at is only the last sign of life


def check(run_dir: Path, st: dict) -> Death | None:
    """None while the run's process lives (or may still be starting); else how it ended. `st` is its status."""
    pid = st.get("pid")
    proc = child(pid)
    if proc is not None:
        code = _exit_codes.get(pid)  # set by _note_exit once the child is reaped
        if code is None:
            return None
    elif pid is None:
        # between runs.create and the spawn (or the foreground child's first write): give it a minute
        if time.time() - os.stat(run_dir / "status.json").st_mtime < 60:
            return None
        code = None
    elif is_alive(pid, st.get("pid_create_time")):
        return None
    else:
        code = reap(pid, timeout=0)
    if code is None:
        how = f"exit code unknown: {_started_by(st)}" if pid else "it never started"
    else:
        how = exit_words(code)
        if code == portable.KILLED_CODE and not portable.WINDOWS:
            how += " (if nobody stopped it, the system may have run out of RAM)"
    ended = _exited_at.get(pid) if proc is not None else None
    if ended:
        return Death(how, code, ended, None)
    noticed, last = now(), _last_sign_of_life(run_dir)
    return Death(f"{how}; its last output was at {last}, the end was noticed at {noticed}", code, last, noticed)


def _started_by(st: dict) -> str:
    """Why this process cannot know the exit code: the run is not its child."""
    if st.get("launched_by") == LAUNCHED_BY_CLI:
        return "it was started in a terminal by python -m core train, not by this process"
    if st.get("launched_by") == LAUNCHED_BY_APP:
        return "it was started by another LoRA Garage process (an earlier app session or train --detach)"
    return "it was not started by this process"


def _last_sign_of_life(run_dir: Path) -> str:
    """When the process last wrote to its run folder: the end is at or after this (the exact time is unknown)."""
    stamps = [p.stat().st_mtime for p in (run_dir / "train.log", run_dir / "events.jsonl") if p.exists()]
    if not stamps:
        return now()
    return datetime.fromtimestamp(max(stamps)).astimezone().isoformat(timespec="seconds")
