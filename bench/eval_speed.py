"""Batched against one-at-a-time greedy answers, in one run: the same prompts, the same texts, and the speed-up.

    python bench/eval_speed.py                      # the newest completed run (train one: --preset cpu-demo)
    python bench/eval_speed.py --run RUN --json results/eval_speed.json

One-at-a-time is how `eval` answered before: each held-out prompt through ChatSession.compare (base and adapter
as one batch of two rows). Batched is ChatSession.answer_pairs, as `eval`, the Score button and the report use it
now: every prompt in left-padded batches sized by the memory budget, base and adapter rows together. The texts must
be equal (greedy); the table prints the seconds of each way and their ratio. The 1-minute load average is recorded
before and after each arm: on a shared machine a load that changes between the arms skews the ratio (a busier
one-at-a-time arm overstates it), so read the ratio with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.chat import ChatSession, GenSettings  # noqa: E402
from core.data import sft as data  # noqa: E402
from core.runs import folder as runs  # noqa: E402
from core.runs import resolve as run_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="latest", help='run id, or "latest" (the newest completed run)')
    ap.add_argument("--checkpoint", type=int, default=None, metavar="N", help="checkpoint-N instead of the final adapter")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length (eval's default: 64)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = ap.parse_args()

    session = ChatSession()
    t = time.perf_counter()
    run_dir = run_files.resolve_run(args.run)
    name = session.load_run(run_dir.name, args.checkpoint)
    load_s = time.perf_counter() - t
    cfg = runs.load_config(run_dir)
    items = data.demo_eval_set(cfg.data.source) or []
    if not items:
        print(f"run {run_dir.name} trained on {cfg.data.source}, which has no held-out prompts: "
              "train one on a built-in demo (python -m core train --preset cpu-demo)", file=sys.stderr)
        return 2
    settings = GenSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"run {run_dir.name}: {len(items)} prompts, {args.max_new_tokens} new tokens at most, "
          f"device {session.device}, model loaded in {load_s:.1f} s")

    load = {"before_one_at_a_time": os.getloadavg()[0]}
    t = time.perf_counter()
    single = []
    for k, item in enumerate(items):
        pair = ("", "")
        for pair in session.compare(item["messages"], settings, adapter=name):
            pass
        single.append(pair)
        print(f"\r  one at a time: {k + 1}/{len(items)}", end="", flush=True)
    single_s = time.perf_counter() - t
    load["after_one_at_a_time"] = os.getloadavg()[0]
    print()

    t = time.perf_counter()
    prompts = [session.encode(item["messages"], settings) for item in items]
    base, adapted = session.answer_pairs(prompts, name, args.max_new_tokens)
    batched_s = time.perf_counter() - t
    load["after_batched"] = os.getloadavg()[0]

    batched = list(zip(base, adapted))
    same = sum(a == b for a, b in zip(single, batched))
    for (b1, a1), (b2, a2) in zip(single, batched):
        if (b1, a1) != (b2, a2):
            print(f"  DIFFERENT\n    one at a time: {b1!r} / {a1!r}\n    batched:       {b2!r} / {a2!r}")
    ratio = single_s / batched_s if batched_s > 0 else float("inf")
    print(f"\n{'way':<16}{'seconds':>10}")
    print(f"{'one at a time':<16}{single_s:>10.1f}")
    print(f"{'batched':<16}{batched_s:>10.1f}")
    print(f"speed-up: {ratio:.1f}x; same texts: {same}/{len(items)} prompts (base and adapter)")
    print("1-minute load average: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in load.items())
          + f" (on {os.cpu_count()} CPUs)")
    result = {"run": run_dir.name, "checkpoint": args.checkpoint, "device": session.device, "prompts": len(items),
              "max_new_tokens": args.max_new_tokens, "one_at_a_time_s": round(single_s, 2),
              "batched_s": round(batched_s, 2), "speedup": round(ratio, 2), "same_texts": same,
              "load_average_1m": {k: round(v, 2) for k, v in load.items()}, "cpus": os.cpu_count()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same == len(items) else 1


if __name__ == "__main__":
    sys.exit(main())
