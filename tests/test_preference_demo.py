"""The preference demo's proof: the cpu-dpo-demo preset (DPO, from the base) on the built-in model, through the
CLI, makes replies end with the sign-off the chosen replies carry; the demo's own checker scores the adapter
far above the base on 16 held-out questions the pairs never asked.

Thresholds from the measured run on a 2-core CPU (README, Preference tuning): base 0/16, adapter 15/16 (0.94).
The base never signs off, so any score above 0.5 is the behaviour DPO taught; 0.75 leaves room for another
CPU's kernels to flip a few greedy answers."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_cpu_dpo_demo_then_eval_adapter_beats_base(garage_home):
    env = dict(os.environ, LORA_GARAGE_HOME=str(garage_home), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.time()
    train = subprocess.run([sys.executable, "-m", "core", "train", "--preset", "cpu-dpo-demo"], env=env,
                           capture_output=True, text=True, timeout=2400)
    train_s = time.time() - t0
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    run_dir = next((garage_home / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"

    t1 = time.time()
    ev = subprocess.run([sys.executable, "-m", "core", "eval", "latest", "--json"], env=env, capture_output=True,
                        text=True, timeout=1200)
    assert ev.returncode == 0, ev.stderr[-4000:]
    scores = json.loads(ev.stdout)
    print(f"\ncpu-dpo-demo: trained in {train_s:.0f} s; eval ({time.time() - t1:.0f} s) on {scores['n']} held-out "
          f"prompts: base {scores['base']:.2f}, adapter {scores['adapter']:.2f}")
    assert scores["n"] == 16
    assert scores["base"] <= 0.25, scores
    assert scores["adapter"] >= 0.75, scores
