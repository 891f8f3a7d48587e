"""How close is the VRAM estimate to the real peak? A matrix of training steps on a CUDA GPU, each row in its own
process: models built from real configs with random weights, LoRA, QLoRA and 8-bit, seq 512/2048, batch 1/4,
checkpointing off/on. Each row loads the model the way LoRA Garage does (core.train.child.load_model + add_lora),
runs 3 optimizer steps under bf16/fp16 autocast (what Trainer's mixed precision does), and measures:

  reserved  torch.cuda.max_memory_reserved over the steps (the caching allocator's peak)
  nvml      this process's memory as NVML sees it after the steps (reserved + CUDA context: the caching
            allocator keeps its peak reserve, so this is the process peak), the number the estimate's total is
            meant to predict and the one a user sees in nvidia-smi
  context   nvml - torch.cuda.memory_reserved() at the same moment (calibrates CUDA_CONTEXT_BYTES)

    .venv/bin/python bench/vram_accuracy.py                    # the whole matrix (~48 rows)
    .venv/bin/python bench/vram_accuracy.py --models qwen2.5-0.5b --seq 512 --json
    .venv/bin/python bench/vram_accuracy.py --quick            # 8 rows

Writes bench/results/vram_accuracy-<gpu>.json. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # config.json shapes of real models; the weights are random
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True),
}
GiB = 1024 ** 3


def run_config(model_dir: str, row: dict):
    from core import config

    return config.from_dict({
        "model": {"source": model_dir, "attn_implementation": "sdpa"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"},
        "quant": {"method": row["method"]}, "data": {"max_len": row["seq"]},
        "train": {"batch_size": row["batch"], "grad_checkpointing": row["ckpt"], "optimizer": "adamw"}})


def build_model_dir(name: str, root: Path) -> Path:
    """A random-weight checkpoint of `name`, written once (built on the GPU: fast, and no CPU RAM spike)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = root / name
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    cfg = dict(MODELS[name])
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def nvml_process_bytes() -> int | None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid():
            return p.usedGpuMemory
    return None   # containers may hide pids from NVML


def one_row(row: dict) -> dict:
    """Runs in a fresh process: load, 3 steps, measure."""
    import torch

    from core.train import child as training
    from core.estimate import vram

    cfg = run_config(row["model_dir"], row)
    est = vram.estimate(vram.shape_from_config(json.loads((Path(row["model_dir"]) / "config.json").read_text())),
                        vram.settings_from_config(cfg))
    out = dict(row, estimate=est.total_bytes, components=est.components)
    try:
        model = training.add_lora(training.load_model(cfg, "cuda"), cfg)
        if row["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        dtype = training.compute_dtype(cfg, "cuda")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
        vocab = model.config.vocab_size
        for _ in range(3):
            ids = torch.randint(0, vocab, (row["batch"], row["seq"]), device="cuda")
            with torch.autocast("cuda", dtype=dtype):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        nvml = nvml_process_bytes()
        out.update(reserved=torch.cuda.max_memory_reserved(), allocated=torch.cuda.max_memory_allocated(), nvml=nvml,
                   context=None if nvml is None else nvml - torch.cuda.memory_reserved(), oom=False)
    except torch.cuda.OutOfMemoryError:
        out.update(reserved=None, allocated=None, nvml=None, context=None, oom=True)
    return out


def matrix(args) -> list[dict]:
    combos = itertools.product(args.models, args.methods, args.seq, args.batch, (False, True))
    rows = [dict(model=m, method=q, seq=s, batch=b, ckpt=c) for m, q, s, b, c in combos]
    return rows[::5] if args.quick else rows      # every 5th: a spread over every axis


def err(est: int, measured: int | None) -> str:
    return "-" if not measured else f"{100 * (est - measured) / measured:+.1f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--methods", nargs="+", default=["lora", "qlora", "8bit"], choices=["lora", "qlora", "8bit"])
    p.add_argument("--quick", action="store_true", help="every 5th row of the matrix")
    p.add_argument("--json", action="store_true")
    p.add_argument("--weights-dir", default=None, help="where the random-weight checkpoints go (default: a temp dir)")
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one row (JSON) in this process
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(one_row(json.loads(args.one))), flush=True)
        return 0

    from core import hardware

    reading = hardware.read()
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not reading.gpus or not cuda:
        msg = (f"vram_accuracy needs a CUDA GPU; this machine has none ({reading.nvml_error or 'torch sees no CUDA'}). "
               "Nothing measured.")
        print(json.dumps({"gpu": None, "rows": [], "message": msg}) if args.json else msg)
        return 0
    gpu = torch.cuda.get_device_name(0)
    weights = Path(args.weights_dir or tempfile.mkdtemp(prefix="vram-accuracy-"))
    results = []
    for row in matrix(args):
        row["model_dir"] = str(build_model_dir(row["model"], weights))
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(row)], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            results.append(dict(row, error=(proc.stderr or proc.stdout)[-2000:]))
            print(f"{row['model']} {row['method']} seq {row['seq']} batch {row['batch']} ckpt {row['ckpt']}: "
                  f"failed\n{(proc.stderr or proc.stdout)[-800:]}", file=sys.stderr)
            continue
        res = json.loads(line[4:])
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        if not args.json:
            print(format_row(res), flush=True)
    summary = {"gpu": gpu, "total": reading.gpus[0].total, "driver": reading.gpus[0].driver,
               "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": results,
               "median_abs_err_vs_reserved": _median([abs(r["estimate"] - r["reserved"]) / r["reserved"]
                                                      for r in results if r.get("reserved")]),
               "median_abs_err_vs_nvml": _median([abs(r["estimate"] - r["nvml"]) / r["nvml"] for r in results
                                                  if r.get("nvml")])}
    out = ROOT / "bench" / "results" / f"vram_accuracy-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"median |error| vs nvml: {summary['median_abs_err_vs_nvml']}\nwrote {out}")
    return 0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_row(r: dict) -> str:
    head = f"{r['model']:13} {r['method']:6} seq {r['seq']:5} batch {r['batch']} ckpt {'on ' if r['ckpt'] else 'off'}"
    if r.get("oom"):
        return f"{head}  est {r['estimate'] / GiB:6.2f} GiB   OOM"
    ctx = f"{r['context'] / GiB:.2f}" if r.get("context") is not None else "?"
    nvml = f"{r['nvml'] / GiB:6.2f}" if r.get("nvml") else "     ?"
    return (f"{head}  est {r['estimate'] / GiB:6.2f} GiB  reserved {r['reserved'] / GiB:6.2f}  nvml {nvml}"
            f"  (context {ctx})  err vs nvml {err(r['estimate'], r.get('nvml'))}"
            f"  vs reserved {err(r['estimate'], r.get('reserved'))}")


def _median(xs):
    xs = sorted(xs)
    return None if not xs else round(xs[len(xs) // 2], 4)


if __name__ == "__main__":
    sys.exit(main())
