"""core.runs.portable: the one module that knows the operating system. Its POSIX implementation runs the real
lock / kill-tree / start / stop / resume tests here; then the same tests (and tests/test_runner.py) run again in a
subprocess with no POSIX calls at all (tests/helpers/noposix/sitecustomize.py: fcntl unimportable, os.killpg and
os.setsid gone, Popen without sessions, core.runs.portable imported as on Windows, the lock from filelock)."""

import os
import subprocess
import sys
import time

import psutil
import pytest

from core.runs import folder as runs
from core.runs import portable
from core.runs import runner
from core.errors import BusyError
from tests.helpers.training import tiny_config, wait_until_done, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOPOSIX_DIR = os.path.join(ROOT, "tests", "helpers", "noposix")
NOPOSIX = os.environ.get("LORA_GARAGE_NOPOSIX") == "1"  # set inside the no-POSIX subprocess


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_tree_ends_a_detached_child_and_its_grandchild():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                              "print(g.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE,
                             **portable.detached())
    grandchild = int(child.stdout.readline())
    assert _alive(grandchild)
    assert sorted(portable.kill_tree(child.pid)) == sorted([child.pid, grandchild])
    child.wait(timeout=10)
    assert not _alive(grandchild)
    assert portable.kill_tree(child.pid) == []  # gone: nothing to do, no error


def test_a_stop_request_is_a_file_any_process_can_write_and_a_start_clears(tmp_path):
    assert not portable.stop_requested(tmp_path)
    portable.request_stop(tmp_path)
    assert portable.stop_requested(tmp_path)
    portable.clear_stop(tmp_path)
    assert not portable.stop_requested(tmp_path)
    portable.clear_stop(tmp_path)  # twice is fine


def test_the_status_lock_and_the_training_lock_share_one_implementation(tmp_path):
    lock = portable.open_lock(tmp_path / "x.lock")
    assert lock.acquire(blocking=False)
    other = portable.open_lock(tmp_path / "x.lock")
    try:
        # flock and filelock locks conflict between two opens in one process too
        assert not other.acquire(blocking=False)
    finally:
        other.close()
        lock.close()
    again = portable.open_lock(tmp_path / "x.lock")
    assert again.acquire(blocking=False)
    again.close()


@pytest.mark.skipif(not NOPOSIX, reason="only inside the no-POSIX subprocess")
def test_the_no_posix_environment_is_in_force():
    with pytest.raises(ImportError):
        import fcntl  # noqa: F401
    assert not hasattr(os, "killpg") and not hasattr(os, "setsid")
    assert portable.WINDOWS and isinstance(portable.open_lock(ROOT + "/.noposix-probe"), portable.FileLockLock)
    os.unlink(ROOT + "/.noposix-probe")
    with pytest.raises(ValueError, match="does not exist on Windows"):
        subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)


@pytest.mark.integration
def test_a_real_run_refuses_a_second_start_stops_on_request_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LORA_GARAGE_FAULT", "slow@step1")  # time to press Stop mid-run on a fast machine
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), max_steps=8, save_steps=2)
    run_id = runner.start(cfg)
    run_dir = runs.get(run_id)
    with pytest.raises(BusyError, match=f"busy: run {run_id} is training"):
        runner.start(cfg)  # also right after the spawn, before a child that must take the lock over has it
    deadline = time.time() + 300
    while runs.read_status(run_dir).get("step", 0) < 1:
        assert runs.read_status(run_dir)["state"] in runs.ACTIVE, runs.tail_log(run_dir, 40)
        assert time.time() < deadline, runs.tail_log(run_dir, 40)
        time.sleep(0.3)
    # an Apple GPU's missing ops fall back to the CPU in the child (the variable is harmless elsewhere)
    assert psutil.Process(runs.read_status(run_dir)["pid"]).environ().get("PYTORCH_ENABLE_MPS_FALLBACK") == "1"
    assert runner.stop(run_id, grace_s=240) == "stopped"
    st = runs.read_status(run_dir)
    assert st["error"] is None, st["error"]  # stopped by the request, not killed
    assert "stop requested" in runs.tail_log(run_dir, 200)
    assert runs.latest_checkpoint(run_dir) is not None and st["step"] < 8
    monkeypatch.setenv("LORA_GARAGE_FAULT", "")
    runner.resume(run_id)
    assert not portable.stop_requested(run_dir)  # the old request does not stop the resumed run
    st = wait_until_done(run_dir, timeout=300)
    assert st["state"] == "completed", runs.tail_log(run_dir, 40)
    assert st["step"] == 8 and (run_dir / "adapter" / "adapter_config.json").exists()
    assert runner.running() is None
    runner.acquire_lock("next").close()  # the child's lock went with it


@pytest.mark.integration
@pytest.mark.skipif(NOPOSIX, reason="this is the outer test")
def test_the_runner_tests_pass_with_no_posix_calls():
    env = dict(os.environ, LORA_GARAGE_NOPOSIX="1", **{portable.LOCK_ENV: "filelock"},
               PYTHONPATH=os.pathsep.join([NOPOSIX_DIR, ROOT]))
    env.pop("LORA_GARAGE_HOME", None)  # the inner run's fixtures make their own homes
    cmd = [sys.executable, "-m", "pytest", "tests/test_runner.py", "tests/test_portable.py", "-q", "-rA",
           "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnraisableExceptionWarning"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for must in ("test_the_no_posix_environment_is_in_force", "test_stop_asks_then_kills_the_tree",
                 "test_a_real_run_refuses_a_second_start_stops_on_request_and_resumes",
                 "test_a_lock_held_by_another_process_dies_with_it", "test_kill_tree_ends_a_detached_child"):
        assert "PASSED tests/" in out and must in out.split("short test summary info")[-1], (must, out[-3000:])
    assert "SKIPPED" in out and "only a POSIX lock is handed to a child" in out  # the POSIX-only test, skipped
