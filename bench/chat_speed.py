"""Chat speed on the built-in model with a random LoRA adapter: time to first token and decode tokens/s for the
base model, the adapter (unmerged: the LoRA matmuls run every step) and compare (base + adapter as a batch of 2).

    LORA_GARAGE_HOME=/tmp/lg-home .venv/bin/python bench/chat_speed.py [--threads 1] [--quant 4bit] [--json]

ttft_s: from the call to the first generated token (prompt encode + prefill + one step). tokens_per_s: decode
steps per second after the first token (for compare, per row: both rows advance together). Median of --repeats
runs after one warm-up. Sampling with a fixed seed so every mode generates comparable lengths.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [{"role": "user", "content": "Write a long story about a mechanic who repairs old cars in a small garage."}]


def random_adapter(source: str, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core import models

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(models.resolve(source)), dtype=torch.float32)
    # small random B (init_lora_weights=False) so the output changes but stays fluent enough to run long
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out)


def measure(session, mode: str, settings: dict, repeats: int) -> dict:
    def once():
        if mode == "compare":
            for _ in session.compare(PROMPT, settings, adapter="random"):
                pass
        else:
            for _ in session.stream(PROMPT, settings, adapter=None if mode == "base" else "random"):
                pass
        return dict(session.last_stats)

    once()  # warm-up: first-call allocations and kernel selection are not what a user waits for each time
    runs = [once() for _ in range(repeats)]
    return {"mode": mode, "quant": session.quant or "none", "device": session.device,
            "prompt_tokens": runs[0]["prompt_tokens"],
            "new_tokens": statistics.median(max(r["new_tokens"]) for r in runs),
            "ttft_s": round(statistics.median(r["ttft_s"] for r in runs), 4),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
            "total_s": round(statistics.median(r["seconds"] for r in runs), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="builtin:smollm2-135m")
    ap.add_argument("--quant", choices=["4bit"], default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default). On a shared, busy machine 1 is faster than 2+: "
                         "OpenMP threads spin-wait for each other when another process holds a core")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    import torch

    from core.chat import ChatSession

    if args.threads:
        torch.set_num_threads(args.threads)

    session = ChatSession(device=args.device)
    session.load_base(args.source, args.quant)
    with tempfile.TemporaryDirectory() as tmp:
        random_adapter(args.source, Path(tmp))
        session.attach(Path(tmp), "random", trained_on=args.source)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": 0.7, "top_p": 0.9, "seed": 0}
    rows = [measure(session, mode, settings, args.repeats) for mode in ("base", "adapter", "compare")]

    head = {"source": args.source, "device": session.device, "torch_threads": torch.get_num_threads(),
            "quant": args.quant or "none", "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    if args.json:
        print(json.dumps({**head, "rows": rows}))
        return 0
    print(", ".join(f"{k}={v}" for k, v in head.items()))
    print(f"{'mode':<8} {'prompt':>6} {'new':>5} {'ttft s':>8} {'tok/s':>8} {'total s':>8}")
    for r in rows:
        print(f"{r['mode']:<8} {r['prompt_tokens']:>6} {r['new_tokens']:>5} {r['ttft_s']:>8.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['total_s']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
