"""core/runs/runner.py without training: the lock, noticing dead children, attaching, resume refusals, CLI guards.
Stand-in processes are plain `python -c` sleepers, so these tests take seconds. They use no POSIX call of their
own (core.runs.portable starts the children), so test_portable.py runs them again with no POSIX calls at all."""

import json
import os
import subprocess
import sys
import time

import pytest

from core.runs import portable
from core.runs import procs
from core.runs import runner
from core.runs import folder as runs
from core.__main__ import main as cli
from core.config import RunConfig
from core.errors import BusyError, RunError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import sys, time; from core.runs import runner; lock = runner.acquire_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def _sleeper(lock=None) -> subprocess.Popen:
    return portable.popen_passing_lock([sys.executable, "-c", "import time; time.sleep(120)"], lock)


def _run(state="running", pid=None, **fields):
    cfg = RunConfig()
    cfg.model.source = "/models/tiny"
    run_dir = runs.create(cfg)
    runs.write_status(run_dir, state=state, pid=pid, pid_create_time=procs.process_start_time(pid) if pid else None,
                      **fields)
    return run_dir


def test_second_lock_is_refused_naming_the_holder():
    lock = runner.acquire_lock("run-a")
    try:
        with pytest.raises(BusyError, match="busy: run run-a is training"):
            runner.acquire_lock("run-b")
    finally:
        lock.close()
    runner.acquire_lock("run-b").close()  # free again once closed


def test_a_lock_held_by_another_process_dies_with_it():
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "run-a"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              **portable.detached())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(BusyError, match="run-a"):
        runner.acquire_lock("run-b")
    assert portable.kill_tree(holder.pid) == [holder.pid]
    holder.wait()
    runner.acquire_lock("run-b").close()  # the system dropped it: no stale lock to clean up


@pytest.mark.skipif(portable.WINDOWS or os.environ.get(portable.LOCK_ENV) == "filelock",
                    reason="only a POSIX lock is handed to a child as a descriptor")
def test_lock_handed_to_a_child_dies_with_it():
    lock = runner.acquire_lock("run-a")
    child = _sleeper(lock)
    lock.close()  # like runner.start: only the child holds it now
    with pytest.raises(BusyError):
        runner.acquire_lock("run-b")
    child.kill()
    child.wait()
    runner.acquire_lock("run-b").close()  # the kernel dropped it: no stale lock to clean up


def test_a_child_that_died_without_a_word_is_marked_failed_with_its_exit_code():
    run_dir = _run()
    (run_dir / "train.log").write_text("loading...\nSegmentation fault\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    runs.write_status(run_dir, pid=proc.pid, pid_create_time=procs.process_start_time(proc.pid))
    procs.adopt(proc)
    proc.wait()
    st = runs.read_status(run_dir)
    assert st["state"] == "failed" and st["ended_at"]
    assert st["error"]["kind"] == "crash" and "exit code 3" in st["error"]["message"]
    assert "Segmentation fault" in st["error"]["log_tail"]
    assert "no checkpoint was saved, so the run must start again" in st["error"]["hint"]  # none to resume from
    assert runs.read_status(run_dir)["state"] == "failed"  # stays so


def test_a_dead_child_with_a_checkpoint_points_to_it():
    run_dir = _run()
    ck = run_dir / "checkpoints" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    runs.write_status(run_dir, pid=proc.pid, pid_create_time=procs.process_start_time(proc.pid))
    procs.adopt(proc)
    proc.wait()
    assert "resume continues from checkpoint-4" in runs.read_status(run_dir)["error"]["hint"]


def test_a_killed_child_reports_the_signal():
    proc = _sleeper()
    run_dir = _run(pid=proc.pid)
    procs.adopt(proc)
    assert runs.read_status(run_dir)["state"] == "running"
    proc.kill()
    proc.wait()
    assert procs.exit_words(proc.returncode) in runs.read_status(run_dir)["error"]["message"]


def test_a_reused_pid_is_not_taken_for_our_child():
    run_dir = _run(pid=os.getpid())
    runs.write_status(run_dir, pid_create_time=1.0)  # same pid, another process start time
    st = runs.read_status(run_dir)
    assert st["state"] == "failed" and "exit code unknown" in st["error"]["message"]


def test_running_finds_the_live_run_after_a_restart_and_skips_dead_ones():
    dead = _run(pid=999_999_999 if sys.maxsize > 2**32 else 32767)
    live_proc = _sleeper()
    try:
        live = _run(pid=live_proc.pid)
        assert runner.running() == live.name  # no _children entry: found from status.json + pid alone
        assert runs.read_status(dead)["state"] == "failed"
    finally:
        live_proc.kill()
        live_proc.wait()
    assert runner.running() is None


def test_stop_asks_then_kills_the_tree_after_the_grace_period():
    # a process that ignores the stop request and SIGTERM, standing in for a child stuck in a long step; it has a
    # helper process of its own, which must go too
    proc = portable.popen_passing_lock([sys.executable, "-c", "import signal, subprocess, sys, time; "
                                        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                        "h = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                                        "print(h.pid, flush=True); time.sleep(120)"], None, stdout=subprocess.PIPE)
    helper = int(proc.stdout.readline())
    run_dir = _run(pid=proc.pid)
    procs.adopt(proc)
    t0 = time.time()
    assert runner.stop(run_dir.name, grace_s=1.0) == "stopped"
    assert 1.0 <= time.time() - t0 < 15
    assert proc.poll() is not None and proc.returncode != 0
    assert not procs.is_alive(helper, None) and not _running(helper)
    assert (run_dir / portable.STOP_FILE).exists()  # the request was made before the kill
    assert "did not stop within 1 s" in runs.read_status(run_dir)["error"]["message"]
    with pytest.raises(RunError, match="not running"):
        runner.stop(run_dir.name)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_resume_refusals():
    done = _run(state="completed")
    with pytest.raises(RunError, match="already completed"):
        runner.resume(done.name)
    no_ckpt = _run(state="stopped")
    with pytest.raises(RunError, match="no complete checkpoint"):
        runner.resume(no_ckpt.name)
    busy_proc = _sleeper()
    try:
        busy = _run(pid=busy_proc.pid)
        with pytest.raises(BusyError, match=f"busy: run {busy.name} is training"):
            runner.resume(busy.name)
        with pytest.raises(BusyError):
            runner.delete(busy.name)
    finally:
        busy_proc.kill()
        busy_proc.wait()


def test_resume_refuses_when_the_data_or_lora_shape_changed(tmp_path):
    model = tmp_path / "model"  # resume checks files only: a stand-in folder is enough
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"0" * 64)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    cfg = RunConfig()
    cfg.model.source = str(model)
    cfg.data.source = str(data)
    run_dir = runs.create(cfg)
    runs.write_fingerprint(run_dir, runs.fingerprint(cfg, model, "tokens"))
    runs.write_status(run_dir, state="stopped")
    ckpt = runs.checkpoints_dir(run_dir) / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / runs.COMPLETE).write_text("{}")
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}\n')
    with pytest.raises(RunError, match="the dataset changed") as e:
        runner.resume(run_dir.name)
    assert "restore" in e.value.hint
    assert runs.read_status(run_dir)["state"] == "stopped"  # a refused resume changes nothing
    (model / "model.safetensors").write_bytes(b"0" * 65)
    with pytest.raises(RunError, match="the base model changed .*weights"):
        runner.resume(run_dir.name)


def test_cli_run_dir_must_be_a_run_folder(tmp_path, capsys):
    outside = tmp_path / "evil"
    outside.mkdir()
    (outside / "config.yaml").write_text("{}")
    assert cli(["train", "--run-dir", str(outside)]) == 2
    assert "error:" in capsys.readouterr().err
    run_dir = _run(state="queued")
    assert cli(["train", "--run-dir", str(run_dir), "--set", "lora.r=4"]) == 2  # settings come from the folder


def test_cli_runs_list_and_show(capsys):
    run_dir = _run(state="stopped")
    assert cli(["runs"]) == 0
    assert run_dir.name in capsys.readouterr().out
    assert cli(["runs", "show", run_dir.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"
    assert cli(["runs", "show", "../x"]) == 2


def test_every_parameter_of_the_process_helpers_is_used():
    """A parameter nobody reads misleads the caller (procs kept run_id "for the callers' sake" while pids identify)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(procs))
    dead = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        dead += [f"{fn.name}({a.arg})" for a in fn.args.args + fn.args.kwonlyargs if a.arg not in used]
    assert dead == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_a_cpu_run_sets_glibc_to_hand_freed_memory_back_unless_the_user_chose():
    """The training child's CPU allocator settings (peak RSS 12.27 -> 8.06 GiB on the built-in model at 8 x 500):
    set through mallopt, which glibc accepts (returns 1 for each); a MALLOC_ variable of the user's stands."""
    from core.train import child

    def settings_in_a_new_process(env: dict) -> dict:  # not in the test process: it would keep them
        code = "from core.train import child; print(repr(child.hand_back_freed_memory()))"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return eval(out.stdout)  # noqa: S307 - our own repr of a dict of ints

    assert settings_in_a_new_process({}) == child.CPU_MALLOPT
    assert settings_in_a_new_process({"MALLOC_ARENA_MAX": "8"}) == {}


def test_the_lean_allocator_is_used_only_where_memory_is_tight():
    from core.train import child

    gib = 2**30
    assert child.needs_lean_memory(int(7.45 * gib), 22 * gib)       # the bench's 8 x 500 step on this 24 GiB machine
    assert not child.needs_lean_memory(int(2.29 * gib), 22 * gib)   # cpu-demo
    assert child.needs_lean_memory(int(2.29 * gib), 6 * gib)        # cpu-demo on a small machine
    assert not child.needs_lean_memory(None, 22 * gib) and not child.needs_lean_memory(gib, 0)
