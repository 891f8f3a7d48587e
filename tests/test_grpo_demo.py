"""The GRPO demo's proof: the cpu-grpo-demo preset on the built-in model, through the CLI, teaches the reply format
("work it out, then: The answer is N.") and the right answers more often than the base, scored by the run's own
rewards on the 40 held-out prompts of builtin:demo-arithmetic-eval.

Marked `long`: about 8 minutes on 2 quiet cores, more than the whole suite's time budget allows, so `make test`
leaves it out and `make test-long` runs it (bench/grpo_demo.py prints the same figures with the wall time).
Thresholds from the measured run (docs/grpo.md, 2-core Xeon, load 1-2): format full marks base 0.10, adapter 1.00;
answers base 0.23, adapter 0.38. The issue's goal is the bar: format at least 0.8, answers above the base."""

import os

import pytest

from tests.helpers.demo import train_then_eval

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_cpu_grpo_demo_then_eval_learns_the_format_and_beats_the_base(garage_home):
    scores, train_s, eval_s = train_then_eval(
        garage_home, "cpu-grpo-demo", 3600, [], 1200, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    fmt, ans = scores["rewards"]["format"], scores["rewards"]["answer"]
    print(f"\ncpu-grpo-demo: trained in {train_s:.0f} s; eval ({eval_s:.0f} s) on {scores['n']} held-out prompts: "
          f"format {fmt['base']['full']:.2f} -> {fmt['adapter']['full']:.2f}, "
          f"answers {ans['base']['full']:.2f} -> {ans['adapter']['full']:.2f}")
    assert scores["n"] == 40
    assert fmt["base"]["full"] <= 0.25, scores
    assert fmt["adapter"]["full"] >= 0.8, scores
    assert ans["adapter"]["full"] > ans["base"]["full"], scores
