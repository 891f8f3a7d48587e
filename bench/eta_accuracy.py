"""How good is the ETA? For each run size: the ETA the Train page shows before Start (core.estimate.eta.for_config, from
the runs already measured in this home), then the real run (`python -m core train` in the foreground), its
training time (the last step's elapsed) and its wall time (with model loading). Later sizes see the earlier runs
as measurements, as a user's machine would.

    LORA_GARAGE_HOME=/tmp/eta-home python bench/eta_accuracy.py [--json results/eta.json] [--loaded]

--loaded adds the loaded case: a busy loop on one core while each run trains (started a few seconds before). The
prediction reads the other programs' load now as the Train page does (core.estimate.eta.others_now); the goal is
within 30% of the training time. Each prediction is made a few seconds after the previous run ended, as a user
starting one run after another would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, --set overrides): different tokens per step and step counts on the cpu-demo preset
SIZES = [
    ("small: 5 steps x batch 2", ["train.max_steps=5", "train.batch_size=2"]),
    ("medium: 10 steps x batch 4", ["train.max_steps=10", "train.batch_size=4"]),
    ("large: 12 steps x batch 8", ["train.max_steps=12", "train.batch_size=8"]),
    ("medium again: 10 steps x batch 4", ["train.max_steps=10", "train.batch_size=4"]),
]


def main() -> int:
    from core import config as C
    from core import presets
    from core.estimate import eta
    from core.runs import folder as runs
    from core import events as ev

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--loaded", action="store_true", help="also run each size beside a busy loop on one core")
    args = ap.parse_args()
    rows = []
    cases = [(label, sets, False) for label, sets in SIZES]
    if args.loaded:
        cases += [(f"{label}, loaded", sets, True) for label, sets in SIZES[1:3]]
    for label, sets, loaded in cases:
        hog = None
        if loaded:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(3)
        cfg = C.apply_overrides(presets.load("cpu-demo"), sets)
        params = eta.param_count(cfg.model.source)
        guess = eta.for_config(cfg, params, None, busy=eta.others_now(max_age_s=0))  # a fresh reading each time
        before = {r["id"] for r in runs.list_runs()}
        t0 = time.time()
        # no report card at the end: it is not training, and under load it took longer than the run
        cmd = [sys.executable, "-m", "core", "train", "--preset", "cpu-demo", "--set", "train.report_at_end=false"] + [
            a for s in sets for a in ("--set", s)]
        try:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        finally:
            if hog:
                hog.kill()
                hog.wait()
        wall = time.time() - t0
        new = [r for r in runs.list_runs() if r["id"] not in before]
        events = ev.read(runs.get(new[0]["id"]))[0]
        trained = ev.last_metric(events, ev.ELAPSED)
        rows.append({"size": label, "predicted_s": round(guess.seconds, 1), "low_s": guess.low, "high_s": guess.high,
                     "predicted_startup_s": guess.startup_s,
                     "source": guess.source, "training_s": trained, "wall_s": round(wall, 1),
                     "error_vs_training": round((guess.seconds - trained) / trained, 3)})
        r = rows[-1]
        rng = f" ({r['low_s']:.0f}-{r['high_s']:.0f})" if r["low_s"] is not None else ""
        load = f"+{guess.startup_s:.0f}" if guess.startup_s else "+?"
        print(f"{label:34s} predicted {r['predicted_s']:7.1f} s{rng:12s} {load:>5s} s load | training {trained:7.1f} s"
              f"  wall {wall:6.1f} s"
              f"  error {100 * r['error_vs_training']:+.0f}%   [{guess.source}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
