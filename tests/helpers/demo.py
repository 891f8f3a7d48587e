import json
import os
import subprocess
import sys
import time


def train_then_eval(home, preset: str, train_timeout: int, eval_args: list, eval_timeout: int,
                    env: dict | None = None) -> tuple[dict, float, float]:
    """`python -m core train --preset PRESET`, then `python -m core eval latest --json ...`, as a user types them.
    -> (scores, training seconds, eval seconds); the run must have completed."""
    # trained as on a machine with room to spare, whatever this one has free: a lean run (core.train.allocator)
    # trains another sample of the adapter, and the q4_k_m parity bar sits near the quantization's own noise
    env = dict(os.environ, LORA_GARAGE_HOME=str(home), LORA_GARAGE_LEAN_MEMORY="0", **(env or {}))
    t0 = time.time()
    train = subprocess.run([sys.executable, "-m", "core", "train", "--preset", preset], env=env,
                           capture_output=True, text=True, timeout=train_timeout)
    train_s = time.time() - t0
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    run_dir = next((home / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    t1 = time.time()
    ev = subprocess.run([sys.executable, "-m", "core", "eval", "latest", "--json", *eval_args], env=env,
                        capture_output=True, text=True, timeout=eval_timeout)
    assert ev.returncode == 0, ev.stderr[-4000:]
    return json.loads(ev.stdout), train_s, time.time() - t1
