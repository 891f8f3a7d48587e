"""What a Stop may wait for, and what it says: the grace period follows the run's own step time, and a stop that
had to kill says what was kept and what was lost, from the files on disk (status.json is the one source the
Train page, the Runs page and `runs show` read).

A Stop asks the child to finish its current step and save (core.train.callbacks); a step of a big DPO run on a
CPU can take a minute, so a fixed 30 s grace would kill a run that was about to save cleanly.
"""

from __future__ import annotations

import time
from pathlib import Path

from core import events as ev
from core.runs import folder as runs
from core.runs import resolve as run_files

DEFAULT_GRACE_S = 30.0   # the floor: model saves and a first step with no timing yet fit in it on a hobbyist's box
STEP_FACTOR = 3.0        # the current step, the checkpoint save, and room for a machine that is busy meanwhile

# status.json fields a Stop writes, for the pages that show "stopping after the current step (about N s)"
STOP_REQUESTED_AT = "stop_requested_at"
STOP_GRACE_S = "stop_grace_s"
STEP_S = "step_s"


def last_step_seconds(run_dir: Path) -> float | None:
    """Seconds per optimizer step over the last logged interval (None before the first step is logged)."""
    m = [e for e in ev.metrics(ev.read(run_dir, 0)[0]) if e.get(ev.ELAPSED) is not None]
    if len(m) >= 2 and m[-1][ev.STEP] > m[-2][ev.STEP]:
        return (m[-1][ev.ELAPSED] - m[-2][ev.ELAPSED]) / (m[-1][ev.STEP] - m[-2][ev.STEP])
    if m and m[-1][ev.STEP] > 0:
        return m[-1][ev.ELAPSED] / m[-1][ev.STEP]
    return None


def grace_for(run_dir: Path) -> tuple[float, float | None]:
    """(seconds a Stop waits before it kills, the last step time it was derived from): max(DEFAULT_GRACE_S,
    STEP_FACTOR x the last step)."""
    step_s = last_step_seconds(run_dir)
    return max(DEFAULT_GRACE_S, STEP_FACTOR * (step_s or 0.0)), step_s


def stopping_note(status: dict, now: float | None = None) -> str:
    """While a stop is pending: "stopping after the current step (about N s)", from the fields stop() wrote."""
    asked, step_s, grace = status.get(STOP_REQUESTED_AT), status.get(STEP_S), status.get(STOP_GRACE_S)
    if not asked:
        return "stopping after the current step"
    waited = (now or time.time()) - float(asked)
    left = max(1.0, float(step_s) - waited) if step_s else None
    text = "stopping after the current step" + (f" (about {left:.0f} s)" if left else "")
    if grace:
        text += f"; if it has not saved {max(0.0, float(grace) - waited):.0f} s from now, it is killed"
    return text


def killed_error(run_dir: Path, grace_s: float, step: int | None) -> dict:
    """status.json's error for a run that did not stop within its grace and was killed: what the files keep
    (the last COMPLETE checkpoint, if any) and what was lost."""
    ck = runs.latest_checkpoint(run_dir)
    at = f" at step {step}" if step else ""
    if ck is None:
        return {"kind": "killed", "message": f"did not stop within {grace_s:.0f} s and was killed{at}; no "
                f"checkpoint was saved, so every step of this run was lost",
                "hint": "start it again as a new run (checkpoints are written every train.save_steps steps)"}
    kept = runs.checkpoint_step(ck)
    lost = f"steps {kept + 1}-{step}" if step and step > kept + 1 else ("the current step" if step else "the steps after it")
    return {"kind": "killed", "message": f"did not stop within {grace_s:.0f} s and was killed{at}; kept "
            f"{ck.name} (step {kept}), lost {lost} and the final adapter",
            "hint": f"Resume continues from {ck.name} (step {kept})"}


def outcome(run_dir: Path, status: dict) -> tuple[bool, str, str]:
    """A stopped run as its files tell it: (clean, what happened, what now). "Saved" only where a checkpoint is
    on disk; a kill is never clean, whatever it kept."""
    err = status.get("error")
    if err:
        return False, str(err.get("message", "")), str(err.get("hint", ""))
    ck = runs.latest_checkpoint(run_dir)
    if ck is None:
        return (False, "stopped before its first checkpoint: nothing was saved",
                "start it again as a new run (checkpoints are written every train.save_steps steps)")
    adapter = " and the final adapter" if run_files.has_adapter(run_dir) else ""
    return (True, f"Stopped and saved: {ck.name} (step {runs.checkpoint_step(ck)}){adapter}",
            f"Resume continues from {ck.name}")
