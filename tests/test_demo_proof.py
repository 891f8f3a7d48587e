"""The proof the whole product works: the cpu-demo preset on the built-in model, through the CLI, teaches the
new identity; the demo dataset's own checker scores the adapter far above the base on held-out prompts."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_cpu_demo_run_then_eval_adapter_beats_base(garage_home):
    env = dict(os.environ, LORA_GARAGE_HOME=str(garage_home))
    t0 = time.time()
    train = subprocess.run([sys.executable, "-m", "core", "train", "--preset", "cpu-demo"], env=env,
                           capture_output=True, text=True, timeout=1500)
    train_s = time.time() - t0
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    run_dir = next((garage_home / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"

    t1 = time.time()
    ev = subprocess.run([sys.executable, "-m", "core", "eval", "latest", "--json", "--max-new-tokens", "40"],
                        env=env, capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, ev.stderr[-4000:]
    scores = json.loads(ev.stdout)
    print(f"\ncpu-demo: trained in {train_s:.0f} s; eval ({time.time() - t1:.0f} s) on {scores['n']} held-out "
          f"prompts: base {scores['base']:.2f}, adapter {scores['adapter']:.2f}")
    assert scores["n"] >= 10
    assert scores["adapter"] >= 0.8, scores
    assert scores["base"] <= 0.5, scores
