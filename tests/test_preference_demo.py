"""The preference demo's proof: the cpu-dpo-demo preset (DPO, from the base) on the built-in model, through the
CLI, makes replies end with the sign-off the chosen replies carry; the demo's own checker scores the adapter
far above the base on 16 held-out questions the pairs never asked.

Thresholds from the measured run on a 2-core CPU (README, Preference tuning): base 0/16, adapter 15/16 (0.94).
The base never signs off, so any score above 0.5 is the behaviour DPO taught; 0.75 leaves room for another
CPU's kernels to flip a few greedy answers."""

import os

import pytest

from tests.helpers.demo import train_then_eval

pytestmark = pytest.mark.slow


def test_cpu_dpo_demo_then_eval_adapter_beats_base(garage_home):
    scores, train_s, eval_s = train_then_eval(
        garage_home, "cpu-dpo-demo", 2400, [], 1200, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    print(f"\ncpu-dpo-demo: trained in {train_s:.0f} s; eval ({eval_s:.0f} s) on {scores['n']} held-out "
          f"prompts: base {scores['base']:.2f}, adapter {scores['adapter']:.2f}")
    assert scores["n"] == 16
    assert scores["base"] <= 0.25, scores
    assert scores["adapter"] >= 0.75, scores
