"""Serving speed through the OpenAI-compatible API (`core.serve`), measured by the official openai client:
first-token latency and decode tokens/s for the base and for an adapter, and the memory each adapter adds.

    .venv/bin/python bench/serve_speed.py [--source builtin:smollm2-135m] [--adapters 3] [--threads 1] [--json FILE]

A throwaway LORA_GARAGE_HOME (sharing your home's converted models/) gets runs with random LoRA adapters (r=16, all linear layers, small non-zero B);
the server runs in this process on a free loopback port; requests stream (stream_options.include_usage) and
alternate base / adapter so a machine whose load drifts slows both alike.
ttft_s: from sending the request to the first content chunk (HTTP + queue + prompt encode + prefill + one step).
tokens_per_s: (completion tokens - 1) / (last chunk - first chunk). Medians of --repeats after one warm-up each.
Memory: the process's resident set after the base, then after each adapter's first use, against the adapter's own
parameter bytes (both from GET /health).
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [{"role": "user", "content": "Write a long story about a mechanic who repairs old cars in a small garage."}]


def make_runs(source: str, count: int) -> list[str]:
    """`count` completed runs on `source`, each with its own random adapter, in $LORA_GARAGE_HOME."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core import models
    from core.config import RunConfig
    from core.runs import folder as runs

    base = AutoModelForCausalLM.from_pretrained(str(models.resolve(source)), dtype=torch.float32)
    ids = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                init_lora_weights=False))
        with torch.no_grad():   # small random B: the output changes but stays fluent enough to run long
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        cfg = RunConfig()
        cfg.model.source = source
        cfg.output.run_name = f"bench-adapter-{i}"
        run_dir = runs.create(cfg)
        model.save_pretrained(run_dir / "adapter")
        runs.write_status(run_dir, state="completed")
        base = model.unload()   # back to the plain base for the next adapter
        ids.append(run_dir.name)
    return ids


def stream_once(client, model: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, stream=True, max_tokens=max_tokens,
                                                temperature=0.7, top_p=0.9, seed=0,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            last = time.perf_counter()
    n = usage.completion_tokens
    return {"ttft_s": first - t0, "tokens": n,
            "tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="builtin:smollm2-135m")
    ap.add_argument("--adapters", type=int, default=3, help="runs with random adapters (memory per adapter)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = ap.parse_args()

    import httpx
    import torch
    from openai import OpenAI

    if args.threads:
        torch.set_num_threads(args.threads)
    home = tempfile.mkdtemp(prefix="lg-serve-bench-")
    user_models = Path(os.environ.get("LORA_GARAGE_HOME", "~/lora-garage")).expanduser() / "models"
    if user_models.is_dir():   # the built-in model converted once there: do not convert it again (minutes)
        (Path(home) / "models").symlink_to(user_models, target_is_directory=True)
    os.environ["LORA_GARAGE_HOME"] = home
    from core.runs.resolve import adapter_name
    from core.serve import Running, Server, base_name

    print(f"making {args.adapters} random adapters on {args.source} in {home} ...", file=sys.stderr, flush=True)
    run_ids = make_runs(args.source, args.adapters)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(args.source, device=args.device)
    print("loading the base ...", file=sys.stderr, flush=True)
    server.load()
    running = Running(server, "127.0.0.1", port).start()
    client = OpenAI(base_url=running.url, api_key="none", timeout=600, max_retries=0)
    health = lambda: httpx.get(running.url.replace("/v1", "/health"), timeout=60).json()  # noqa: E731
    try:
        # one base answer first: safetensors weights are memory-mapped and only count as resident once a forward
        # pass has read them, which would put the whole base on the first adapter's account
        client.chat.completions.create(model=base_name(args.source), messages=PROMPT, max_tokens=1)
        mem = [{"adapters": 0, "rss_mib": health()["memory"]["rss_bytes"] / 2**20, "adapter_mib": 0.0}]
        base_mib = health()["memory"]["base_bytes"] / 2**20
        for i, run_id in enumerate(run_ids, 1):
            client.chat.completions.create(model=run_id, messages=PROMPT, max_tokens=1)
            m = health()["memory"]
            mem.append({"adapters": i, "rss_mib": m["rss_bytes"] / 2**20,
                        "adapter_mib": m["adapters"][adapter_name(run_id)] / 2**20})

        name = base_name(args.source)
        models = {"base": name, "adapter": run_ids[0]}
        samples = {k: [] for k in models}
        for k, model in models.items():
            print(f"warm-up: {k}", file=sys.stderr, flush=True)
            stream_once(client, model, args.max_tokens)
        for r in range(args.repeats):
            for k, model in models.items():
                print(f"repeat {r + 1}/{args.repeats}: {k}", file=sys.stderr, flush=True)
                samples[k].append(stream_once(client, model, args.max_tokens))
        loads = health()["base_loads"]
    finally:
        running.stop()

    rows = [{"model": k, "name": models[k], "tokens": statistics.median(s["tokens"] for s in samples[k]),
             "ttft_s": round(statistics.median(s["ttft_s"] for s in samples[k]), 4),
             "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in samples[k]), 2)} for k in models]
    ratio = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    head = {"source": args.source, "device": server.session.device, "torch_threads": torch.get_num_threads(),
            "max_tokens": args.max_tokens, "repeats": args.repeats, "base_loads": loads,
            "base_weights_mib": round(base_mib, 1)}
    print(", ".join(f"{k}={v}" for k, v in head.items()))
    print(f"{'model':<8} {'tokens':>6} {'ttft s':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['tokens']:>6} {r['ttft_s']:>8.3f} {r['tokens_per_s']:>8.1f}")
    print(f"adapter / base tokens/s: {ratio} (target: at least 0.8)")
    print(f"{'adapters':>8} {'rss MiB':>9} {'+rss MiB':>9} {'adapter MiB':>12}")
    for prev, m in zip([None, *mem], mem):
        grow = "" if prev is None else f"{m['rss_mib'] - prev['rss_mib']:+9.1f}"
        print(f"{m['adapters']:>8} {m['rss_mib']:>9.1f} {grow:>9} {m['adapter_mib']:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**head, "rows": rows, "adapter_over_base": ratio, "memory": mem},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
