"""The adaptive stop grace (core.runs.stopping): a Stop waits for the run's own step, however long, and a stop
that had to kill says what the files kept and lost. The child is a stand-in process that trains "steps" of a
chosen length and honours SIGTERM the way core.train.callbacks does: finish the step, save a COMPLETE checkpoint,
mark the run stopped."""

import subprocess
import sys
import time

from core import events as ev
from core import paths
from core.config import RunConfig
from core.runs import folder as runs
from core.runs import procs, runner, stopping

FAKE_CHILD = r"""
import signal, sys, time
from pathlib import Path
from core import events as ev
from core.runs import folder as runs
run_dir, step_s = Path(sys.argv[1]), float(sys.argv[2])
asked = []
signal.signal(signal.SIGTERM, lambda *a: asked.append(True))
log, t0, step = ev.EventLog(run_dir), time.time(), 0
while True:
    time.sleep(step_s)  # one step; a SIGTERM does not cut it short (PEP 475: the sleep goes on after the handler)
    step += 1
    log.metrics(step=step, epoch=0.0, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0,
                elapsed=round(time.time() - t0, 3), eta_s=0.0, mem={})
    runs.write_status(run_dir, step=step)
    if asked:
        ck = runs.checkpoints_dir(run_dir) / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / runs.COMPLETE).write_text("")
        runs.update_status(run_dir, runs.ACTIVE, state="stopped", ended_at=runs.now())
        sys.exit(0)
"""


def _start_fake(step_s: float):
    cfg = RunConfig()
    cfg.model.source = "/models/tiny"
    run_dir = runs.create(cfg)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_CHILD, str(run_dir), str(step_s)], cwd=str(paths.REPO_ROOT),
                            start_new_session=True)
    runs.write_status(run_dir, state="running", pid=proc.pid, pid_create_time=procs.process_start_time(proc.pid))
    procs.adopt(proc)
    return run_dir, proc


def _wait_for_steps(run_dir, n: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while len(ev.metrics(ev.read(run_dir, 0)[0])) < n:
        assert time.time() < deadline, f"the stand-in child logged fewer than {n} steps in {timeout:.0f} s"
        time.sleep(0.1)


def test_a_step_three_times_the_default_grace_stops_cleanly_with_a_checkpoint(monkeypatch):
    monkeypatch.setattr(stopping, "DEFAULT_GRACE_S", 0.6)
    step_s = 3 * stopping.DEFAULT_GRACE_S
    run_dir, proc = _start_fake(step_s)
    try:
        _wait_for_steps(run_dir, 2)
        grace, measured = stopping.grace_for(run_dir)
        assert measured >= step_s * 0.9 and grace == stopping.STEP_FACTOR * measured
        assert runner.stop(run_dir.name) == "stopped"
        st = runs.read_status(run_dir)
        assert not st.get("error"), st.get("error")
        assert proc.wait(timeout=30) == 0  # it exited by itself: no SIGKILL
        ck = runs.latest_checkpoint(run_dir)
        assert ck is not None and runs.checkpoint_step(ck) == st["step"]
        assert st[stopping.STOP_GRACE_S] >= 3 * step_s * 0.9  # what the pages read while it was stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_fixed_default_grace_would_have_killed_that_step(monkeypatch):
    """The same stand-in under the old rule (a fixed grace): the kill, and its message naming what was lost."""
    monkeypatch.setattr(stopping, "DEFAULT_GRACE_S", 0.6)
    run_dir, proc = _start_fake(3 * stopping.DEFAULT_GRACE_S)
    try:
        _wait_for_steps(run_dir, 2)
        assert runner.stop(run_dir.name, grace_s=stopping.DEFAULT_GRACE_S) == "stopped"
        err = runs.read_status(run_dir)["error"]
        assert err["kind"] == "killed"
        assert "no checkpoint was saved, so every step of this run was lost" in err["message"]
        assert "start it again" in err["hint"] and "Resume" not in err["hint"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_kill_names_the_checkpoint_it_kept_and_the_steps_it_lost(tmp_path):
    ck = runs.checkpoints_dir(tmp_path) / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / runs.COMPLETE).write_text("")
    err = stopping.killed_error(tmp_path, 90.0, step=7)
    assert "did not stop within 90 s and was killed at step 7" in err["message"]
    assert "kept checkpoint-4 (step 4), lost steps 5-7 and the final adapter" in err["message"]
    assert err["hint"] == "Resume continues from checkpoint-4 (step 4)"


def test_grace_is_the_default_until_a_step_is_timed_then_three_steps(tmp_path):
    assert stopping.grace_for(tmp_path) == (stopping.DEFAULT_GRACE_S, None)
    log = ev.EventLog(tmp_path)
    for step, elapsed in ((1, 50.0), (2, 90.0)):
        log.metrics(step=step, epoch=0.0, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=1.0, elapsed=elapsed,
                    eta_s=0.0, mem={})
    assert stopping.grace_for(tmp_path) == (120.0, 40.0)


def test_the_stopping_note_counts_down_the_current_step():
    st = {stopping.STOP_REQUESTED_AT: 1000.0, stopping.STEP_S: 40.0, stopping.STOP_GRACE_S: 120.0}
    note = stopping.stopping_note(st, now=1010.0)
    assert note.startswith("stopping after the current step (about 30 s)")
    assert "110 s from now, it is killed" in note
