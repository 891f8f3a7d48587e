"""The child's start-up timeline: the real writer (core.train.startup.Timeline -> events.jsonl) read by the real
reader (core.events.startup_timeline), and one real run on the tiny model whose phases add up to the wait for its
first metrics event, shown by `runs show` and the Train page's log box."""

import os
import time

import pytest

from core import events as ev
from core.__main__ import main as cli
from core.runs import folder as runs
from core.train.startup import SPAWNED_AT_ENV, Timeline
from tests.helpers.training import Launch, tiny_config, write_dataset

PHASES = ["spawn", "imports", "model files", "tokenise", "model load", "padding-free check", "trainer build",
          "first step"]


def test_marks_are_back_to_back_phases_and_stop_at_the_first_step(tmp_path):
    log = ev.EventLog(tmp_path)
    tl = Timeline(log, started_at=100.0, spawned_at=99.0)
    tl.mark("imports", now=103.0)
    tl.mark("tokenise", "from the data cache", now=103.5)
    tl.mark("first step", now=110.0)
    tl.mark("trainer build", now=120.0)  # a trainer rebuilt after the first step is not start-up
    log.close()
    rows = ev.startup_timeline(ev.read(tmp_path)[0])
    assert [r[ev.PHASE] for r in rows] == ["spawn", "imports", "tokenise", "first step"]
    assert [r[ev.DURATION_S] for r in rows] == [1.0, 3.0, 0.5, 6.5]
    assert [r[ev.START] for r in rows] == [99.0, 100.0, 103.0, 103.5]
    assert rows[2][ev.DETAIL] == "from the data cache"
    text = ev.format_timeline(rows)
    assert "tokenise" in text and "from the data cache" in text
    last = text.splitlines()[-1]
    assert last.startswith("total") and "11.00" in last and last.endswith("to the first metrics event")
    assert all(r[ev.CPU_S] is not None and r[ev.CPU_S] >= 0 for r in rows)  # CPU seconds of this process


def test_a_resumed_run_shows_its_latest_start_up(tmp_path):
    log = ev.EventLog(tmp_path)
    first = Timeline(log, started_at=10.0, spawned_at=9.0)
    first.mark("imports", now=20.0)  # this child died before its first step
    again = Timeline(log, started_at=50.0, spawned_at=49.5)
    again.mark("imports", now=52.0)
    log.close()
    rows = ev.startup_timeline(ev.read(tmp_path)[0])
    assert [(r[ev.PHASE], r[ev.DURATION_S]) for r in rows] == [("spawn", 0.5), ("imports", 2.0)]
    assert "so far" in ev.format_timeline(rows)
    assert ev.format_timeline([]) == ""


def test_an_unknown_phase_is_refused(tmp_path):
    log = ev.EventLog(tmp_path)
    with pytest.raises(ValueError, match="STARTUP_PHASES"):
        Timeline(log, started_at=1.0).mark("warming up")
    log.close()


def test_the_spawn_time_is_taken_from_the_environment_once(tmp_path, monkeypatch, capsys):
    import core

    log = ev.EventLog(tmp_path)
    monkeypatch.setenv(SPAWNED_AT_ENV, repr(core.STARTED_AT - 2.0))
    Timeline.from_env(log)
    assert SPAWNED_AT_ENV not in os.environ  # a grandchild (the report, a rank) does not read it as its own
    monkeypatch.setenv(SPAWNED_AT_ENV, "soon")
    Timeline.from_env(log)
    assert "not a time in seconds" in capsys.readouterr().err
    log.close()
    rows = ev.of_type(ev.read(tmp_path)[0], ev.STARTUP)
    assert len(rows) == 1 and abs(rows[0][ev.DURATION_S] - 2.0) < 0.01


@pytest.mark.integration
def test_a_runs_phases_add_up_to_its_wait_for_the_first_step(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "identity.jsonl"), max_steps=2, save_steps=100)
    t0 = time.time()
    run = Launch(tmp_path / "home", cfg)
    st = run.wait()
    assert st["state"] == "completed", runs.tail_log(run.run_dir, 40)
    events = ev.read(run.run_dir)[0]
    rows = ev.startup_timeline(events)
    assert [r[ev.PHASE] for r in rows] == PHASES
    for before, after in zip(rows, rows[1:]):  # back to back: no time falls between two phases
        assert abs(before[ev.START] + before[ev.DURATION_S] - after[ev.START]) < 0.01
    first = ev.metrics(events)[0][ev.T]
    measured = first - t0  # the test's own clock: from before runner.start to the first metrics event
    total = sum(r[ev.DURATION_S] for r in rows)
    print(f"start-up: phases sum to {total:.2f} s, measured {measured:.2f} s\n{ev.format_timeline(rows)}")
    assert abs(total - measured) <= 0.1 * measured, (total, measured)
    assert all(0 <= r[ev.CPU_S] for r in rows) and sum(r[ev.CPU_S] for r in rows) > 1.0  # imports alone take more
    assert rows[3][ev.DETAIL].startswith("tokenised")
    assert rows[5][ev.DETAIL] == "rows stay apart"

    with run.environ():
        assert cli(["runs", "show", run.run_id]) == 0
        from ui import run_view

        box = run_view.log_text(run.run_dir, events)
    out = capsys.readouterr().out
    assert "start-up:" in out and "padding-free check" in out and "to the first metrics event" in out
    assert box.startswith("start-up, seconds per phase:") and "train.log:" in box

    # the next start in the same home: the data and the padding-free verdict are read back, not made again
    again = Launch(tmp_path / "home", cfg)
    assert again.wait()["state"] == "completed", runs.tail_log(again.run_dir, 40)
    warm = {r[ev.PHASE]: r for r in ev.startup_timeline(ev.read(again.run_dir)[0])}
    assert list(warm) == PHASES
    assert warm["tokenise"][ev.DETAIL] == "from the data cache"
    assert warm["padding-free check"][ev.DETAIL] == "rows stay apart (stored verdict)"
