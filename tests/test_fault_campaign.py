"""The randomised fault campaign (bench/fault_campaign.py) in CI: a small seeded N on the tiny model, each moment
(tokenising, model load, a step, a checkpoint save, the final save, the app during a run, one rank of a two-process
run) SIGKILLed once, then resumed; nothing may be lost. The script's own checks are the test: every run killed, readable, truthful, resumed to the uninterrupted
run's losses, no process left, the lock free."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fault_campaign.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fault_campaign", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the worker processes find the trial function by its module's name
    spec.loader.exec_module(module)
    return module


def test_the_first_trials_cover_each_moment_once_and_the_plan_is_seeded():
    fc = _bench()
    trials = fc.plan(30, seed=3)
    assert sorted(m for m, _ in trials[:7]) == sorted(fc.MOMENTS)
    assert trials == fc.plan(30, seed=3) and trials != fc.plan(30, seed=4)
    ranks = set()
    for moment, fault in trials:
        if moment == "rank":  # rank 0 or 1, killed in a step or a checkpoint save
            rank, _, fault = fault.partition(":")
            ranks.add(rank)
            moment = {"killstep": "step", "killsave": "save"}[fault.partition("@")[0]]
        kind, _, step = fault.partition("@step")
        assert kind == {"step": "killstep", "save": "killsave", "app": "app"}.get(moment, f"kill{moment}")
        if moment == "app":
            assert 0 <= int(step) < fc.MAX_STEPS
        elif moment == "save":
            assert int(step) % fc.SAVE_STEPS == 0 and 0 < int(step) <= fc.MAX_STEPS
        elif moment == "step":
            assert 1 <= int(step) <= fc.MAX_STEPS
    assert ranks == {"rank0", "rank1"}


@pytest.mark.integration
def test_a_small_seeded_campaign_loses_nothing(tmp_path, capsys):
    fc = _bench()
    out = tmp_path / "campaign.json"
    code = fc.main(["--n", "7", "--seed", "0", "--jobs", "3", "--root", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    with capsys.disabled():
        fc.print_table(result["rows"])
    rows = result["rows"]
    assert sorted(r["moment"] for r in rows) == sorted(fc.MOMENTS)
    for r in rows:
        assert r["killed"] and r["recovered"] and r["losses_equal"], r
        assert r["processes_left"] == 0 and r["lock_free"] and not r["problems"], r
    assert code == 0 and result["summary"]["all_ok"]
