"""What does LoRA Garage's runner cost over a plain transformers Trainer + peft script? The same tiny-model LoRA
training for the same steps, (a) through `python -m core train`, (b) through a plain Trainer script with the same
settings, each in its own process, interleaved A B B A (so drift in machine load hits both arms alike).

    .venv/bin/python bench/runner_overhead.py                  # table
    .venv/bin/python bench/runner_overhead.py --json           # one object: ours/baseline tokens/s and the ratio
    .venv/bin/python bench/runner_overhead.py --hidden 256 --layers 4 --steps 200

tokens/s = (steps 2..N) x tokens per step / (wall time of step N's log - step 1's), with the time stamped at
each log step in both arms (ours: the `t` of the metrics events; baseline: a callback that only appends
time.time() to a list). Every row has the same token length, so every step trains exactly batch x length
non-padding tokens in both arms whatever the order. Step 1 (warm-up) is left out. Checkpoint saves every
--save-steps are inside the window for both arms, as are our events, status writes and COMPLETE markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402 - after the path is set


def settings(args) -> dict:
    return {"model": {"source": str(args.model_dir)},
            "data": {"source": str(args.data), "max_len": 512},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
            "quant": {"method": "lora"},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "lr": 1e-3,
                      "scheduler": "linear", "warmup_steps": 0, "save_steps": args.save_steps,
                      "save_total_limit": 2, "logging_steps": 1, "seed": 1}}


# ---------------------------------------------------------------- arm A: python -m core train

def run_ours(args, workdir: Path) -> dict:
    import yaml

    home = Path(tempfile.mkdtemp(dir=workdir, prefix="home-"))
    cfg_path = home / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(settings(args)))
    env = {**os.environ, "LORA_GARAGE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "core", "train", "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ours failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = next((home / "runs").iterdir())
    times = {e[ev.STEP]: e[ev.T] for e in ev.metrics(ev.read(run_dir)[0])}
    return {"times": times}


# ---------------------------------------------------------------- arm B: a plain Trainer + peft script

def baseline_child(cfg_path: str) -> None:
    """What someone would write by hand: AutoModel, get_peft_model, DataCollatorForSeq2Seq, Trainer."""
    import time

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from core import config
    from core.data import sft as data

    s = yaml.safe_load(Path(cfg_path).read_text())
    cfg = config.from_dict(s)
    out_dir = Path(cfg_path).parent / "out"
    tok = AutoTokenizer.from_pretrained(cfg.model.source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = list(data.prepare(cfg, tok).train)  # the same token ids as arm A; data prep is outside the timing
    set_seed(cfg.train.seed)
    # the same precision rule as ours: bf16 on a GPU that has it (else fp16), fp32 on the CPU
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.source, dtype=dtype)
    lo = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    t = cfg.train
    targs = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=t.batch_size,
                              gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
                              lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                              logging_steps=t.logging_steps, save_steps=t.save_steps,
                              save_total_limit=t.save_total_limit, seed=t.seed, use_cpu=not cuda,
                              bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                              train_sampling_strategy="group_by_length", report_to="none", disable_tqdm=True,
                              dataloader_num_workers=0, remove_unused_columns=False)
    times = {}

    class Stamp(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                times[state.global_step] = time.time()

    trainer = Trainer(model=model, args=targs, train_dataset=rows, processing_class=tok, callbacks=[Stamp()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    print("RESULT " + json.dumps({"times": times}))


def run_baseline(args, workdir: Path) -> dict:
    import yaml

    d = Path(tempfile.mkdtemp(dir=workdir, prefix="base-"))
    cfg_path = d / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(settings(args)))
    env = {**os.environ, "LORA_GARAGE_HOME": str(d / "home")}
    proc = subprocess.run([sys.executable, __file__, "--baseline-child", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"baseline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    result["times"] = {int(k): v for k, v in result["times"].items()}
    return result


# ---------------------------------------------------------------- the comparison

def tokens_per_s(times: dict, tokens_per_step: int) -> float:
    steps = sorted(times)
    first, last = steps[0], steps[-1]
    return (last - first) * tokens_per_step / (times[last] - times[first])


def median_step_ms(times: dict) -> float:
    """Robust to a neighbour's burst of CPU use (but blind to our per-save costs): a second opinion."""
    steps = sorted(times)
    return 1000 * statistics.median(times[b] - times[a] for a, b in zip(steps, steps[1:]))


def prepare_inputs(args, workdir: Path) -> int:
    """Tiny model + a dataset whose rows all have the same length. Returns tokens per step."""
    from tests.tiny import build_tiny_model

    args.model_dir = workdir / "model"
    if args.hidden == 64 and args.layers == 2:
        build_tiny_model(args.model_dir)
    else:
        build_sized_model(args.model_dir, args.hidden, args.layers)
    row = {"messages": [{"role": "user", "content": "What is your name? " * 4},
                        {"role": "assistant", "content": "My name is Garage. " * 8}]}
    args.data = workdir / "rows.jsonl"
    args.data.write_text((json.dumps(row) + "\n") * 256)
    from core import config, models
    from core.data import sft as data

    cfg = config.from_dict(settings(args))
    lengths = {len(r["input_ids"]) for r in data.prepare(cfg, models.load_tokenizer(args.model_dir)).train}
    assert len(lengths) == 1, lengths
    return args.batch * lengths.pop()


def build_sized_model(out: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import build_tiny_model

    build_tiny_model(out)  # the tokenizer; the weights are replaced below
    cfg = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=cfg["eos_token_id"],
                         pad_token_id=cfg["pad_token_id"], tie_word_embeddings=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--save-steps", type=int, default=40)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat the A B B A sequence (noisy machines)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp:
        workdir = Path(tmp)
        per_step = prepare_inputs(args, workdir)
        results = {"ours": [], "baseline": []}
        medians = {"ours": [], "baseline": []}
        for arm in ("ours", "baseline", "baseline", "ours") * args.rounds:
            r = run_ours(args, workdir) if arm == "ours" else run_baseline(args, workdir)
            results[arm].append(tokens_per_s(r["times"], per_step))
            medians[arm].append(median_step_ms(r["times"]))
            if not args.json:
                print(f"  {arm:<9} {results[arm][-1]:>10,.0f} tokens/s   median step {medians[arm][-1]:.1f} ms",
                      flush=True)
    ours, base = statistics.fmean(results["ours"]), statistics.fmean(results["baseline"])
    out = {"ours_tokens_per_s": round(ours, 1), "baseline_tokens_per_s": round(base, 1), "ratio": round(ours / base, 4)}
    if args.json:
        print(json.dumps(out))
        return
    m_ours, m_base = statistics.fmean(medians["ours"]), statistics.fmean(medians["baseline"])
    print(f"\n{'':<9} {'tokens/s':>10} {'median step':>12}   ({args.steps} steps, batch {args.batch}, "
          f"{per_step} tokens/step, hidden {args.hidden} x {args.layers} layers, {args.rounds} x ABBA)")
    print(f"{'ours':<9} {ours:>10,.0f} {m_ours:>9.1f} ms")
    print(f"{'baseline':<9} {base:>10,.0f} {m_base:>9.1f} ms")
    print(f"{'ratio':<9} {ours / base:>10.3f} {m_base / m_ours:>12.3f}   (overhead {100 * (1 - ours / base):+.1f}%; "
          f"goal < 3%)")


if __name__ == "__main__":
    main()
