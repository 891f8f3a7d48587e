"""The one ETA source (core.estimate.eta): during a run from the run's own steps, before a run from similar measured runs,
a guess (with its range) when fewer than two similar runs exist, never one slow run alone. Events are written by
the real EventLog and read back through core.events."""

import os

import pytest

from core import config as C
from core.estimate import eta
from core.runs import folder as runs
from core import events as ev

PARAMS = 135_000_000


def _run(steps: int, tokens_per_s: float, tokens_per_step: float, method: str = "lora", t0: float = 1000.0):
    """A run folder with a config and `steps` metrics events at a steady rate, written by the trainer's writer."""
    cfg = C.RunConfig()
    cfg.quant.method = method
    run_dir = runs.create(cfg)
    log = ev.EventLog(run_dir)
    step_s = tokens_per_step / tokens_per_s
    for i in range(1, steps + 1):
        log.write({ev.T: t0 + i * step_s, **_metrics(i, steps, tokens_per_s, step_s)})
    log.close()
    return run_dir


def _metrics(step, total, tps, step_s):
    return {ev.TYPE: ev.METRICS, ev.STEP: step, ev.EPOCH: 0.0, ev.LOSS: 1.0, ev.LR: 1e-4, ev.GRAD_NORM: 1.0,
            ev.TOKENS_PER_S: tps, ev.ELAPSED: step * step_s, ev.ETA_S: (total - step) * step_s,
            ev.MEM: {ev.MEM_RSS: 1 << 30}}


def _measured(tps, per_step=1000.0, method="lora", device="cpu", params=PARAMS, name="r"):
    return eta.Measured(name, method, device, params, per_step, tps)


def test_measure_reads_rate_and_tokens_per_step_through_the_schema():
    run_dir = _run(6, tokens_per_s=250.0, tokens_per_step=1000.0)
    m = eta.measure(run_dir, params_of=lambda source: PARAMS)
    assert m.method == "lora" and m.device == "cpu" and m.params == PARAMS
    assert abs(m.tokens_per_s - 250.0) < 1e-6
    assert abs(m.tokens_per_step - 1000.0) < 1e-6


def test_a_run_with_too_few_steps_does_not_count():
    assert eta.measure(_run(2, 250.0, 1000.0), params_of=lambda source: PARAMS) is None


def test_nothing_measured_is_a_guess_with_a_range():
    e = eta.before_start(100_000, PARAMS, "lora", None, 1000.0, measured=[])
    assumed = eta.CPU_ASSUMED_FLOPS / (4 * PARAMS)
    assert abs(e.tokens_per_s - assumed) < 1e-6
    assert e.guess and e.low < e.seconds < e.high
    assert "a guess" in e.text() and "assumed for the CPU" in e.text()


def test_one_slow_run_alone_is_not_trusted():
    slow = 12.0
    assumed = eta.CPU_ASSUMED_FLOPS / (4 * PARAMS)
    e = eta.before_start(100_000, PARAMS, "lora", None, 1000.0, measured=[_measured(slow)])
    assert e.guess
    only_measured, only_assumed = 100_000 / slow, 100_000 / assumed
    assert min(only_measured, only_assumed) < e.seconds < max(only_measured, only_assumed)
    assert e.low <= e.seconds <= e.high
    assert "one similar run" in e.source


def test_two_similar_runs_give_a_measured_eta_from_their_median():
    runs_ = [_measured(100.0, name="a"), _measured(300.0, name="b"), _measured(200.0, name="c")]
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=runs_)
    assert not e.guess
    assert abs(e.tokens_per_s - 200.0) < 1e-6 and abs(e.seconds - 300.0) < 1e-6
    assert "3 runs of similar size" in e.source


def test_dissimilar_runs_are_left_out():
    others = [_measured(5.0, method="qlora"), _measured(5.0, device="gpu"), _measured(5.0, params=PARAMS * 10),
              _measured(5.0, per_step=100_000.0), _measured(5.0, params=0)]
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=others)
    assert "assumed" in e.source and e.guess


def test_a_rate_from_a_smaller_model_is_scaled_to_the_planned_size():
    half = [_measured(400.0, params=PARAMS // 2, name="a"), _measured(400.0, params=PARAMS // 2, name="b")]
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=half)
    assert abs(e.tokens_per_s - 200.0) < 1.0


def test_measured_runs_on_disk_feed_for_config():
    for _ in range(2):
        _run(6, tokens_per_s=250.0, tokens_per_step=1024.0)
    cfg = C.RunConfig()
    cfg.train.max_steps, cfg.train.batch_size, cfg.data.max_len = 10, 4, 512
    found = eta.measured_runs(params_of=lambda source: PARAMS)
    assert len(found) == 2
    e = eta.for_config(cfg, PARAMS, None, measured=found)
    assert not e.guess and abs(e.seconds - 10 * 4 * 1024 / 250.0) < 1e-6  # 1024 tokens a row, measured


def test_for_config_without_max_steps_waits_for_the_dataset():
    assert eta.for_config(C.RunConfig(), PARAMS, None, measured=[]) is None


def test_during_a_run_the_eta_counts_down_from_the_last_step():
    run_dir = _run(4, tokens_per_s=100.0, tokens_per_step=1000.0)  # 10 s a step, last step at t0 + 40
    events = ev.read(run_dir)[0]
    last_t = events[-1][ev.T]
    running = {"state": "running"}
    now = eta.for_run(running, events, now=last_t)
    later = eta.for_run(running, events, now=last_t + 5)
    assert now.seconds == 0.0  # 4 of 4 steps: nothing left
    events5 = ev.read(_run(10, 100.0, 1000.0))[0]
    t = events5[4][ev.T]
    mid = eta.for_run(running, events5[:5], now=t)
    assert abs(mid.seconds - 50.0) < 1e-6 and not mid.guess
    assert abs(eta.for_run(running, events5[:5], now=t + 20).seconds - 30.0) < 1e-6
    assert later.seconds == 0.0
    assert eta.for_run({"state": "completed"}, events5, now=t) is None
    assert eta.for_run(running, [], now=t) is None


def test_format_duration():
    assert eta.format_duration(29) == "29 s"
    assert eta.format_duration(213) == "3 min 33 s"
    assert eta.format_duration(7300) == "2 h 01 min"


def test_startup_is_measured_from_the_status_start_to_the_first_step():
    import datetime as dt

    run_dir = _run(5, tokens_per_s=100.0, tokens_per_step=1000.0, t0=2_000_000_000.0)
    first = ev.metrics(ev.read(run_dir)[0])[0]
    began = first[ev.T] - first[ev.ELAPSED]
    started = dt.datetime.fromtimestamp(began - 40, dt.timezone.utc).isoformat()
    runs.update_status(run_dir, None, started_at=started)
    m = eta.measure(run_dir, params_of=lambda source: PARAMS)
    assert abs(m.startup_s - 40.0) < 0.01
    runs.update_status(run_dir, None, pid_create_time=began - 55)  # the process start counts Python's imports
    assert abs(eta.measure(run_dir, params_of=lambda source: PARAMS).startup_s - 55.0) < 0.01
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=[m, m])
    assert e.startup_s == m.startup_s and "to load the model and data" in e.text()


def test_for_config_uses_the_tokens_per_row_measured_on_the_same_data():
    cfg = C.RunConfig()
    cfg.train.max_steps, cfg.train.batch_size, cfg.data.max_len = 10, 4, 512
    seen = eta.Measured("a", "lora", "cpu", PARAMS, 100.0, 50.0, data=(cfg.data.source, 512), rows_per_step=2)
    e = eta.for_config(cfg, PARAMS, None, measured=[seen, seen])
    assert abs(e.seconds - 10 * 4 * 50 / 50.0) < 1e-6  # 50 tokens a row, not 256 (half the cutoff)


def test_measured_runs_reads_again_only_the_runs_whose_events_changed(monkeypatch):
    """Every form change asks for the measured runs: an unchanged run is not parsed again, a grown one is, and a
    deleted one is gone."""
    import shutil

    a, b = _run(6, 250.0, 1024.0), _run(6, 250.0, 1024.0)
    read, real_read = [], ev.read
    monkeypatch.setattr(ev, "read", lambda run_dir, offset=0: read.append(run_dir.name) or real_read(run_dir, offset))
    params = lambda source: PARAMS  # noqa: E731 - one function for every call, as the app's default is
    assert len(eta.measured_runs(params)) == 2 and sorted(read) == sorted([a.name, b.name])
    read.clear()
    assert len(eta.measured_runs(params)) == 2 and read == []
    log = ev.EventLog(b)  # b trains on (resumed), twice as fast: read again, and its new rate counts
    for i in range(7, 13):
        log.write({ev.T: 2000.0 + i, **_metrics(i, 12, 500.0, 1024.0 / 250.0)})
    log.close()
    found = {m.run: m for m in eta.measured_runs(params)}
    assert read == [b.name] and found[b.name].tokens_per_s == 500.0 and found[a.name].tokens_per_s == 250.0
    shutil.rmtree(a)
    assert [m.run for m in eta.measured_runs(params)] == [b.name]


def test_a_busy_machine_slows_the_cpu_eta_and_says_why_and_loaded_runs_count_as_quiet_ones():
    """The same measured runs read two ways: quiet now vs 2 cores' worth of other work now; and a run measured
    under load (slowdown 2) predicts what a quiet machine does at twice its rate."""
    cores = os.cpu_count() or 1
    runs_ = [eta.Measured(f"r{i}", "lora", "cpu", 1000, 100.0, 50.0) for i in range(2)]
    quiet = eta.before_start(10_000, 1000, "lora", None, 100.0, runs_, busy=0.0)
    busy = eta.before_start(10_000, 1000, "lora", None, 100.0, runs_, busy=float(cores))
    assert busy.seconds == pytest.approx(2 * quiet.seconds)
    assert "busy" not in quiet.source and "this machine is busy" in busy.source and "2.0x slower" in busy.source
    loaded = [eta.Measured(f"r{i}", "lora", "cpu", 1000, 100.0, 50.0, slowdown=2.0) for i in range(2)]
    assert eta.before_start(10_000, 1000, "lora", None, 100.0, loaded).seconds == pytest.approx(quiet.seconds / 2)
    # one run alone names its own measured rate, and what it means at today's load beside it
    one = eta.before_start(10_000, 1000, "lora", None, 100.0, runs_[:1], busy=float(cores))
    assert "measured 50 tokens/s (25 for this plan now)" in one.source


def test_the_busy_wording_counts_the_threads_training_will_use(monkeypatch):
    """On a CPU with SMT, os.cpu_count() counts each core twice while torch trains on the physical cores (the child
    shares torch.get_num_threads()): the page names the same threads the run will use, and OMP_NUM_THREADS wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(eta.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(eta.psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    assert eta.training_cores() == 8
    runs_ = [eta.Measured(f"r{i}", "lora", "cpu", 1000, 100.0, 50.0) for i in range(2)]
    busy = eta.before_start(10_000, 1000, "lora", None, 100.0, runs_, busy=6.0)
    assert "other programs keep about 6.0 cores' worth of work running, so training uses 2 of its 8 cores" in \
        busy.source, busy.source
    assert eta.cpu_threads(6.0, eta.training_cores()) == 2  # what core.train.child.share_the_cores sets there
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert eta.training_cores() == 4


@pytest.mark.skipif(not eta.RUNNABLE.exists(), reason="the kernel's runnable count is Linux's /proc/loadavg")
def test_the_load_now_counts_a_busy_program_and_forgets_it_once_it_ends(monkeypatch):
    """others_now counts a busy loop as about one core's worth while it runs and drops it as soon as it ends, where
    the 1-minute load average still remembers it (the next run's ETA used to count a run that had just ended)."""
    import subprocess
    import sys
    import time

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        during = eta.others_now(max_age_s=0)
    finally:
        hog.kill()
        hog.wait()
    after = eta.others_now(max_age_s=0)
    assert during - after >= 0.6, (during, after)
    assert eta.others_now() == after  # kept for NOW_KEEP_S: the Train page asks on every change


def test_the_load_now_falls_back_to_the_load_average_where_there_is_no_runnable_count(monkeypatch, tmp_path):
    monkeypatch.setattr(eta, "RUNNABLE", tmp_path / "no-such-file")
    monkeypatch.setattr(eta.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    assert eta.others_now(max_age_s=0) == 3.5
    monkeypatch.delattr(eta.os, "getloadavg")
    assert eta.others_now(max_age_s=0) == 0.0  # Windows: no load average at all


def test_only_runs_of_the_same_objective_count_before_start():
    """A GRPO token costs its sampling too: SFT runs on the same model say nothing of a GRPO run's speed, and the
    reverse. The cpu-grpo-demo page once showed about 2 minutes from SFT runs for a run that took 438 s."""
    sft = [_measured(1000.0, name="s1"), _measured(1000.0, name="s2")]
    grpo = [eta.Measured(f"g{i}", "lora", "cpu", PARAMS, 1000.0, 100.0, objective="grpo") for i in range(2)]
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=sft + grpo, objective="grpo")
    assert not e.guess and e.seconds == pytest.approx(600.0)  # the GRPO runs' 100 tokens/s
    e = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=sft + grpo)
    assert not e.guess and e.seconds == pytest.approx(60.0)  # the SFT runs' 1000 tokens/s
    # no GRPO run measured yet: a guess, slower per token than SFT's on the CPU
    guess = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=sft, objective="grpo")
    plain = eta.before_start(60_000, PARAMS, "lora", None, 1000.0, measured=[])
    assert guess.guess and guess.seconds == pytest.approx(plain.seconds * eta.GRPO_CPU_SLOWER)
    on_gpu = eta.before_start(60_000, PARAMS, "lora", "NVIDIA H100 80GB HBM3", 1000.0, measured=[], objective="grpo")
    assert "sampling" in on_gpu.source


def test_a_grpo_run_is_measured_as_grpo_and_guessed_from_its_generations():
    cfg = C.RunConfig()
    cfg.train.objective = "grpo"
    run_dir = runs.create(cfg)
    log = ev.EventLog(run_dir)
    for i in range(1, 6):
        log.write({ev.T: 1000.0 + i * 9, **_metrics(i, 5, 100.0, 9.0)})
    log.close()
    m = eta.measure(run_dir, params_of=lambda source: PARAMS)
    assert m.objective == "grpo"
    # before any GRPO run on this data: generations x (half the prompt cutoff + the longest completion) a prompt
    cfg.train.max_steps, cfg.train.batch_size, cfg.data.max_len = 10, 4, 128
    cfg.train.grpo_generations, cfg.train.grpo_max_completion = 4, 32
    sft_seen = eta.Measured("a", "lora", "cpu", PARAMS, 100.0, 50.0, data=(cfg.data.source, 128), rows_per_step=2)
    e = eta.for_config(cfg, PARAMS, None, measured=[sft_seen, sft_seen])
    assert e.guess and e.tokens_per_s > 0
    assert e.seconds * e.tokens_per_s == pytest.approx(10 * 4 * 4 * (64 + 32))
    # a measured GRPO run on the same data gives its own tokens a prompt
    grpo_seen = eta.Measured("g", "lora", "cpu", PARAMS, 900.0, 120.0, data=(cfg.data.source, 128), rows_per_step=4,
                             objective="grpo")
    e = eta.for_config(cfg, PARAMS, None, measured=[sft_seen, grpo_seen, grpo_seen])
    assert not e.guess and e.seconds == pytest.approx(10 * 900 / 120.0)
