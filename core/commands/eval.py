"""`python -m core eval RUN`: base model vs adapter on the run's held-out prompts (accuracy where the dataset has
a checker, the run's own rewards for a GRPO run, else perplexity on the eval split)."""

import json
import sys

from core.commands import terminal
from core.chat import ChatSession
from core.evaluate import evaluate


def add_arguments(p) -> None:
    p.add_argument("run", help='run id, or "latest" for the most recent completed run')
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="score checkpoint-N instead of the final adapter")
    p.add_argument("--quant", choices=["4bit"], default=None, help="load the base in 4-bit (less VRAM)")
    p.add_argument("--limit", type=int, default=200, metavar="N", help="score at most N examples (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="answer length for checked prompts (a GRPO run answers up to its train.grpo_max_completion)")
    p.add_argument("--json", action="store_true", help='print {"base", "adapter", "n", "metric"} as JSON')
    p.add_argument("--rows", action="store_true", help="also print each prompt with both answers")


def run(args) -> int:
    session = ChatSession()
    progress = terminal.bar(args.json)  # loading, then prompt k of n; nothing when piped or --json
    r = evaluate(args.run, args.checkpoint, session=session, quant=args.quant, max_new_tokens=args.max_new_tokens,
                 limit=args.limit, progress=progress)
    if progress:
        progress.done()
    if session.template_notice:
        print(f"note: {session.template_notice}", file=sys.stderr)
    if args.json:
        out = {"base": r["base"], "adapter": r["adapter"], "n": r["n"], "metric": r["metric"]}
        if r["metric"] == "reward":
            out.update(rewards=r["rewards"], above_zero=r["above_zero"])
        print(json.dumps(out))
        return 0
    better = "higher" if r["higher_is_better"] else "lower"
    print(f"{r['metric']} on {r['n']} {r['split']} examples ({better} is better)")
    fmt = "{:.1%}" if r["metric"] == "accuracy" else "{:.3f}"
    print(f"  base:    {fmt.format(r['base'])}")
    print(f"  adapter: {fmt.format(r['adapter'])}")
    if r["metric"] == "reward":
        print(f"  above zero: base {r['above_zero']['base']:.0%}, adapter {r['above_zero']['adapter']:.0%}")
        for name, sides in r["rewards"].items():
            b, a = sides["base"], sides["adapter"]
            print(f"  {name} (x{r['weights'][name]:g}): mean {b['mean']:.3f} -> {a['mean']:.3f}; "
                  f"full marks {b['full']:.0%} -> {a['full']:.0%}")
        if r["note"]:
            print(f"note: {r['note']}", file=sys.stderr)
    if args.rows and r["metric"] == "reward":
        for row in r["rows"]:
            print(f"\n? {row['prompt']}")
            print(f"  base    [{row['base_reward']:.2f}]: {row['base']!r}")
            print(f"  adapter [{row['adapter_reward']:.2f}]: {row['adapter']!r}")
    if args.rows and r["metric"] == "accuracy":
        for row in r["rows"]:
            print(f"\n? {row['prompt']}\n  expected: {row['expected']}")
            print(f"  base    [{'ok' if row['base_ok'] else '--'}]: {row['base']!r}")
            print(f"  adapter [{'ok' if row['adapter_ok'] else '--'}]: {row['adapter']!r}")
    return 0
