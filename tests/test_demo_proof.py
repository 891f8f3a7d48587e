"""The proof the whole product works: the cpu-demo preset on the built-in model, through the CLI, teaches the
new identity; the demo dataset's own checker scores the adapter far above the base on held-out prompts; and the
adapter exported to a Q4_K_M GGUF still passes that checker in llama.cpp."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from tests.helpers.demo import train_then_eval

pytestmark = pytest.mark.slow


def test_cpu_demo_run_then_eval_adapter_beats_base(garage_home):
    scores, train_s, eval_s = train_then_eval(garage_home, "cpu-demo", 1500, ["--max-new-tokens", "40"], 900)
    print(f"\ncpu-demo: trained in {train_s:.0f} s; eval ({eval_s:.0f} s) on {scores['n']} held-out "
          f"prompts: base {scores['base']:.2f}, adapter {scores['adapter']:.2f}")
    assert scores["n"] >= 10
    assert scores["adapter"] >= 0.8, scores
    assert scores["base"] <= 0.5, scores

    # take it home: the Q4_K_M GGUF, through the CLI, answers the eval prompts like the adapter did
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (requirements-test.txt installs it): the q4_k_m export "
                    "needs llama.cpp's quantizer")
    out = garage_home / "exports" / "demo-gguf"
    t0 = time.time()
    export = subprocess.run([sys.executable, "-m", "core", "export", "latest", "--gguf", str(out), "--quant", "q4_k_m"],
                            env=dict(os.environ, LORA_GARAGE_HOME=str(garage_home)), capture_output=True, text=True,
                            timeout=1200)
    assert export.returncode == 0, (export.stdout + export.stderr)[-4000:]
    row = json.loads((out / "export.json").read_text())["parity"][0]
    print(f"q4_k_m export + parity check in {time.time() - t0:.0f} s: score {row['score_gguf']:.2f} vs adapter "
          f"{row['score_adapter']:.2f}, top-1 agreement {row['top1_agreement']:.3f}, stops {row['stops']}/{row['prompts']}")
    assert row["quant"] == "q4_k_m" and row["runtime"] == "llama.cpp" and row["passed"], row
    assert row["score_gguf"] >= row["score_adapter"] - 0.1, row
