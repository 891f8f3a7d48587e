"""How long does it take to read and tokenise a big dataset? Generates an Alpaca-style JSONL in a temp folder
and times core.data.sft on it with a real tokenizer (default: the built-in SmolLM2's).

    .venv/bin/python bench/data_load.py                 # 100k rows, table
    .venv/bin/python bench/data_load.py --rows 20000 --json

Peak RSS is the whole process (tokenizer and Python included), read with resource.getrusage.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a model garage train data token answer question small large fast slow cat dog river mountain "
         "python code learn adapter rank memory gpu cpu weight layer value result simple clear example test "
         "write read open close blue green red yellow house street city morning evening because although").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            row = {"instruction": sentence(rng, rng.randint(6, 20)),
                   "input": sentence(rng, rng.randint(5, 30)) if i % 3 == 0 else "",
                   "output": " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(rng.randint(2, 8)))}
            fh.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    from core.config import RunConfig
    from core.data.sft import RowReader, prepare
    from core.models import load_tokenizer

    results = {"rows": args.rows, "model": args.model, "max_len": args.max_len}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        t = time.perf_counter()
        generate(path, args.rows)
        results["generate_s"] = time.perf_counter() - t
        results["file_mb"] = path.stat().st_size / 2**20

        t = time.perf_counter()
        tokenizer = load_tokenizer(args.model)
        results["tokenizer_load_s"] = time.perf_counter() - t
        results["rss_before_mb"] = peak_rss_mb()

        t = time.perf_counter()
        n = sum(1 for _ in RowReader(str(path)))
        results["read_normalise_s"] = time.perf_counter() - t
        assert n == args.rows

        cfg = RunConfig()
        cfg.data.source, cfg.data.max_len = str(path), args.max_len
        t = time.perf_counter()
        prepared = prepare(cfg, tokenizer)
        results["prepare_s"] = time.perf_counter() - t
        results["rss_peak_mb"] = peak_rss_mb()
    s = prepared.stats
    results.update(total_tokens=s.total_tokens, trained_tokens=s.trained_tokens, truncated=s.truncated,
                   rows_per_s=args.rows / results["prepare_s"], tokens_per_s=s.total_tokens / results["prepare_s"])
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))
        return 0
    print(f"core.data.sft on a generated {args.rows:,}-row Alpaca JSONL ({results['file_mb']:.1f} MB), {args.model}")
    rows = [
        ("tokenizer load", f"{results['tokenizer_load_s']:.1f} s"),
        ("read + normalise only", f"{results['read_normalise_s']:.1f} s"),
        ("prepare (read, render, tokenise, mask)", f"{results['prepare_s']:.1f} s"),
        ("rows / s", f"{results['rows_per_s']:,.0f}"),
        ("tokens / s", f"{results['tokens_per_s']:,.0f}"),
        ("tokens (trained / total)", f"{s.trained_tokens:,} / {s.total_tokens:,}"),
        ("peak RSS before / after prepare", f"{results['rss_before_mb']:.0f} / {results['rss_peak_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
