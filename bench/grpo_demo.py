"""The GRPO demo as a user runs it: `train --preset cpu-grpo-demo`, then `eval latest --json`, timed, with the
format and answer rewards of base and adapter on the 40 held-out prompts.

    python bench/grpo_demo.py                                   # in a fresh home under /tmp
    python bench/grpo_demo.py --home DIR --json bench/results/grpo_demo-cpu-smollm2-135m.json

The issue's goal (on 2 quiet cores, within 15 minutes): the base near 0 on format (full marks: the reply ends with
"The answer is N."), the adapter at least 0.8, and the adapter beating the base on the answers. The load average is recorded at
the start and end: on a shared machine the wall time says little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="LORA_GARAGE_HOME for the run (default: a fresh folder in /tmp)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = ap.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="lg-grpo-demo-"))
    env = dict(os.environ, LORA_GARAGE_HOME=str(home))
    load = {"start": os.getloadavg()[0]}
    t0 = time.time()
    train = subprocess.run([sys.executable, "-m", "core", "train", "--preset", "cpu-grpo-demo"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    train_s = time.time() - t0
    if train.returncode != 0:
        print((train.stdout + train.stderr)[-3000:], file=sys.stderr)
        return 1
    load["after_train"] = os.getloadavg()[0]
    t1 = time.time()
    ev = subprocess.run([sys.executable, "-m", "core", "eval", "latest", "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
    eval_s = time.time() - t1
    if ev.returncode != 0:
        print(ev.stderr[-3000:], file=sys.stderr)
        return 1
    load["end"] = os.getloadavg()[0]
    scores = json.loads(ev.stdout)
    r = scores["rewards"]
    print(f"cpu-grpo-demo: trained in {train_s:.0f} s, eval {eval_s:.0f} s on {scores['n']} held-out prompts; "
          f"load average {load['start']:.1f} -> {load['after_train']:.1f} -> {load['end']:.1f}")
    print(f"{'':24}{'base':>10}{'adapter':>10}")
    for name, sides in r.items():
        print(f"{name + ' full marks':24}{sides['base']['full']:>10.2f}{sides['adapter']['full']:>10.2f}")
        print(f"{name + ' mean':24}{sides['base']['mean']:>10.2f}{sides['adapter']['mean']:>10.2f}")
    print(f"{'total reward':24}{scores['base']:>10.2f}{scores['adapter']:>10.2f}")
    fmt = r["format"]["adapter"]["full"]
    met = fmt >= 0.8 and r["answer"]["adapter"]["mean"] > r["answer"]["base"]["mean"] and train_s <= 900
    print(f"goal (format >= 0.80, answers above the base, <= 15 min): {'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "load": load,
                                               "cpus": os.cpu_count(), "scores": scores, "goal_met": met}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
