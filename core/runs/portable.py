"""The one place that knows which operating system we run on: file locks, starting a child in its own process group,
ending a process tree, reaping a child, and asking a run to stop. Nothing else in core/ or ui/ imports fcntl or
msvcrt, or calls killpg / setsid / start_new_session.

- Locks: `fcntl.flock` on POSIX, `msvcrt.locking` on Windows, or the `filelock` package where LORA_GARAGE_LOCK=filelock
  says so. A POSIX lock's descriptor can be handed to a child (pass_fds), which then holds it for its whole life;
  the other kinds cannot, so there the child takes the lock over itself (core.runs.procs handles both).
- Children: their own session on POSIX (start_new_session), CREATE_NEW_PROCESS_GROUP on Windows, so an app
  restart or a Ctrl-C in the terminal does not reach them.
- Ending a tree: psutil on every system. On Windows `interrupt` sends CTRL_BREAK_EVENT to the child's group first.
- A graceful stop never depends on a signal: `request_stop` writes a file in the run folder that the training
  callback polls at each step (SIGTERM on POSIX still works as well).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

WINDOWS = os.name == "nt"  # read once, at import
LOCK_ENV = "LORA_GARAGE_LOCK"  # "filelock": use the filelock package instead of the system's own lock call
STOP_FILE = "stop.request"
# the exit code a process killed outright reports to its parent (Popen.returncode): -9 on POSIX, 1 on Windows
KILLED_CODE = 1 if WINDOWS else -getattr(signal, "SIGKILL", 9)


# ---------------------------------------------------------------- locks

class PosixLock:
    """fcntl.flock on an open descriptor: dropped by the kernel when every copy of the descriptor is closed,
    including a child's inherited copy, so it can never go stale."""
    inheritable = True

    def __init__(self, path: Path):
        import fcntl  # optional: POSIX only

        self._fcntl = fcntl
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool) -> bool:
        flags = self._fcntl.LOCK_EX | (0 if blocking else self._fcntl.LOCK_NB)
        try:
            self._fcntl.flock(self.fd, flags)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self.fd)  # closing drops the lock (unless a child holds a copy)


class WindowsLock:
    """msvcrt.locking on one byte far past the content: Windows locks are mandatory, so locking byte 0 would stop
    other processes from reading the holder written there. Released when the handle closes or the process ends."""
    inheritable = False
    OFFSET = 1 << 30

    def __init__(self, path: Path):
        import msvcrt  # optional: Windows only

        self._msvcrt = msvcrt
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool) -> bool:
        while True:
            os.lseek(self.fd, self.OFFSET, os.SEEK_SET)
            try:
                self._msvcrt.locking(self.fd, self._msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(0.05)

    def close(self) -> None:
        os.close(self.fd)  # the system releases a closed handle's locks


class FileLockLock:
    """The filelock package (its OS lock where the platform has one): for systems where neither call above fits,
    and for the tests that run the runner with no POSIX calls at all."""
    inheritable = False

    def __init__(self, path: Path):
        import filelock  # optional

        self._lock = filelock.FileLock(str(path) + ".lk", thread_local=False)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # the holder's name is written here

    def acquire(self, blocking: bool) -> bool:
        import filelock  # optional

        try:
            self._lock.acquire(timeout=-1 if blocking else 0)
        except filelock.Timeout:
            return False
        return True

    def close(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)
        os.close(self.fd)


def open_lock(path: Path):
    """A lock object on `path` (not yet taken): .acquire(blocking) -> bool, .close(), .fd, .inheritable."""
    if os.environ.get(LOCK_ENV) == "filelock":
        return FileLockLock(path)
    return WindowsLock(path) if WINDOWS else PosixLock(path)


@contextmanager
def locked(path: Path):
    """Hold the lock on `path` for a with-block (waits for it); closing the lock drops it."""
    lock = open_lock(path)
    try:
        lock.acquire(blocking=True)
        yield
    finally:
        lock.close()


def lock_from_fd(fd: int):
    """The lock a parent handed over as an inherited descriptor (POSIX only: see PosixLock)."""
    lock = PosixLock.__new__(PosixLock)
    import fcntl  # optional: POSIX only

    lock._fcntl, lock.fd = fcntl, fd
    return lock


def write_at_start(fd: int, data: bytes) -> None:
    """Replace a small file's content through its descriptor (os.pwrite does not exist on Windows)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


# ---------------------------------------------------------------- children

def detached() -> dict:
    """Popen keyword arguments for a child in its own process group / session."""
    if WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def popen_passing_lock(args: list[str], lock, **kwargs) -> subprocess.Popen:
    """Start a detached child; on POSIX it inherits the lock's descriptor (the caller names it in the environment)."""
    if lock is not None and lock.inheritable:
        kwargs["pass_fds"] = (lock.fd,)
    return subprocess.Popen(args, **detached(), **kwargs)


def interrupt(pid: int) -> None:
    """Ask a detached child to end: SIGTERM on POSIX, CTRL_BREAK_EVENT to its process group on Windows."""
    try:
        os.kill(pid, signal.CTRL_BREAK_EVENT if WINDOWS else signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass  # already gone


def kill_tree(pid: int, timeout: float = 10.0) -> list[int]:
    """Kill a process and every descendant (psutil: the same on every system). Returns the pids killed.
    Descendants are listed before the root dies (a dead parent's children are re-parented and lost) and waited
    for here; the root is not, so that whoever started it reaps it and reads its exit code (Popen.wait)."""
    try:
        root = psutil.Process(pid)
        below = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in below + [root]:  # the root last: it may be this very process
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(below, timeout=timeout)
    if alive:
        raise OSError(f"processes {[p.pid for p in alive]} survived a kill")
    return [pid] + [p.pid for p in below]


def end_tree(pid: int, grace_s: float) -> None:
    """interrupt (CTRL_BREAK_EVENT on Windows, SIGTERM on POSIX), wait up to grace_s, then kill_tree."""
    interrupt(pid)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    kill_tree(pid)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap_nohang(pid: int) -> int | None:
    """Exit code of an ended child of ours that no Popen holds (POSIX waitpid); None when it runs, is not our
    child, or the system cannot reap by pid (Windows)."""
    if WINDOWS:
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None


# ---------------------------------------------------------------- a stop that needs no signal

def request_stop(run_dir: Path) -> None:
    """Ask the run in run_dir to stop after its current step (the training callback polls this file)."""
    (Path(run_dir) / STOP_FILE).write_text(str(time.time()))


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir: Path) -> None:
    """A new start or a resume forgets an old request."""
    try:
        (Path(run_dir) / STOP_FILE).unlink()
    except FileNotFoundError:
        pass
