"""Training throughput against plain Hugging Face: the same tokenised data (lengths long-tailed between 16 and the
cutoff), model, LoRA settings, seed and step count, three arms, each in its own process, interleaved A B C C B A:

    A  a plain transformers Trainer + peft script with a padding collator (DataCollatorForSeq2Seq) and the default
       random sampler: what a user would write
    B  `python -m core train` with its defaults (padding-free batches grouped by length, where the model allows)
    C  the same with data.packing=true (rows packed into max_len sequences before batching)

    .venv/bin/python bench/throughput.py                                # tiny model (tests/helpers/tiny.py), table
    .venv/bin/python bench/throughput.py --model builtin:smollm2-135m --steps 12 --json
    .venv/bin/python bench/throughput.py --out bench/results/throughput-cpu-tiny.json
    .venv/bin/python bench/throughput.py --memory --model builtin:smollm2-135m --steps 3 --warmup 1

--memory is the CPU memory bench: every row ~max_len tokens (8 x ~500 by default), our runner only, each arm in
its own process, in the order --order gives (interleave them: F P K K P F by default). The arms:
    F  the stock loss over full logits (train.chunked_loss=false) as a run on this machine decides its memory
    P  F with glibc's own defaults and no lean run ($LORA_GARAGE_LEAN_MEMORY=0; MALLOC_PERTURB_=0, which changes
       nothing, stands for a user's MALLOC_ variable, which keeps our allocator settings off): the default before
       the chunked loss, "today's" speed for the goal
    K  the chunked loss (the default), as a run on this machine decides its memory
    Q  K with glibc's defaults, not lean
    L  Q with freed blocks handed back (core.train.child.CPU_MALLOPT, through the environment)
    H  L with glibc's transparent huge pages
    R  Q with the lean MLP ($LORA_GARAGE_LEAN_MLP: silu recomputed in backward)
    V  L with the lean MLP: a lean run where there is no tbbmalloc
    T  Q with tbbmalloc preloaded; U  T keeping blocks of 1 MiB+; X  U with huge pages; W  T with the lean MLP
    Z  a lean run as the product starts one ($LORA_GARAGE_LEAN_MEMORY=1: core.train.allocator starts the process
       again with tbbmalloc, and the MLPs are lean)
Each arm prints its peak RSS against the CPU estimate the run wrote (estimate.json) and its tokens/s; a probe
process prints the RSS of Python + torch + the model + LoRA before any step (what the estimate leaves out by
design).

tokens/s counts only non-padding tokens, over the steady-state steps (after --warmup steps) of each arm: tokens
those steps trained / wall time between the log of the last warm-up step and the last step. s/step is that time
over those steps. Packing (C) puts several rows in a step, so its s/step is not comparable; its tokens/s is.
Peak memory is the arm's process peak RSS on the CPU (getrusage of the child), torch's max_memory_allocated on
CUDA. Data preparation and model loading happen before the window in every arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402 - after the path is set

WORDS = ("the model learns to answer short questions about data training memory speed tokens batch padding "
         "sequence attention layer weight adapter rank alpha loss gradient step epoch sample prompt reply user "
         "assistant system garage home card python file folder run stop start chat base quick brown fox jumps "
         "over lazy dog hello who are you name is what two plus four sky blue cheese french").split()


# The P and Q arms keep glibc's malloc defaults where the child would set core.train.child.CPU_MALLOPT: a MALLOC_
# variable that changes nothing (0: no perturbing, glibc's default) makes the child leave malloc as it is.
# Not MALLOC_TOP_PAD_ at its default value: setting it (as any of the top pad, trim or mmap thresholds) also turns
# off glibc's dynamic mmap threshold, the very thing that holds the memory (measured: 8.04 GiB, as with ours).
NOT_LEAN = {"LORA_GARAGE_LEAN_MEMORY": "0"}
GLIBC_DEFAULTS = {"MALLOC_PERTURB_": "0", **NOT_LEAN}
CHUNKED, FULL = {"train": {"chunked_loss": True}}, {"train": {"chunked_loss": False}}
# L: the chunked loss with freed blocks handed back whatever the RAM (the child's CPU_MALLOPT, through the
# environment); H: L with glibc's tunable that asks for transparent huge pages on its mappings, to see whether
# cheaper page faults buy back the speed L loses (measured on an AMD EPYC VM: a little, not enough).
HAND_BACK = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20),
             **NOT_LEAN}
# R and V: Q and L with the lean MLP (core/train/swiglu.py: silu recomputed in backward).
LEAN_MLP = {"LORA_GARAGE_LEAN_MLP": "1"}
# T, U, X, W: Intel's scalable allocator (the tbb wheel's tbbmalloc) in place of glibc's malloc, through LD_PRELOAD
# (a user's LD_PRELOAD: the run itself then decides nothing about its allocator)
_TBB = " ".join(str(Path(sys.prefix) / "lib" / n) for n in ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2"))
TBBMALLOC = {**NOT_LEAN, "LD_PRELOAD": _TBB}
TBB_KEEP = {**TBBMALLOC, "TBB_MALLOC_SET_HUGE_OBJECT_THRESHOLD": str(1 << 20)}
MEMORY_ARMS = {"F": (FULL, {}), "P": (FULL, GLIBC_DEFAULTS), "K": (CHUNKED, {}), "Q": (CHUNKED, GLIBC_DEFAULTS),
               "L": (CHUNKED, HAND_BACK), "H": (CHUNKED, {**HAND_BACK, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
               "R": (CHUNKED, {**GLIBC_DEFAULTS, **LEAN_MLP}), "V": (CHUNKED, {**HAND_BACK, **LEAN_MLP}),
               "T": (CHUNKED, TBBMALLOC), "U": (CHUNKED, TBB_KEEP), "W": (CHUNKED, {**TBBMALLOC, **LEAN_MLP}),
               "X": (CHUNKED, {**TBB_KEEP, "TBB_MALLOC_USE_HUGE_PAGES": "1"}),
               "Z": (CHUNKED, {"LORA_GARAGE_LEAN_MEMORY": "1"})}


def settings(args, packing: bool, overrides: dict | None = None) -> dict:
    s = _settings(args, packing)
    for section, values in (overrides or {}).items():
        s[section].update(values)
    return s


def _settings(args, packing: bool) -> dict:
    return {"model": {"source": str(args.model_path)},
            "data": {"source": str(args.data), "max_len": args.max_len, "packing": packing},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
            "quant": {"method": "lora"},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1, "lr": 1e-4,
                      "scheduler": "linear", "warmup_steps": 0, "save_steps": 1_000_000, "save_total_limit": 1,
                      "logging_steps": 1, "seed": 1,
                      "report_at_end": False}}  # the report card after the last step is no part of training


def write_dataset(path: Path, rows: int, max_len: int, tokens_per_word: float, seed: int = 0,
                  full: bool = False) -> None:
    """Conversations whose token lengths follow a log-normal (median ~max_len/6, long right tail), drawn within
    [16, max_len]: many short rows, a few long ones, as in real chat data. full: every row ~max_len - 12 tokens."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            n = int(min(max_len - 12, max(16, rng.lognormvariate(math.log(max_len / 6), 0.8))))
            if full:
                n = max_len - 12
            n_words = max(4, int((n - 12) / tokens_per_word))  # ~12 tokens of template around the two turns
            prompt_words = max(2, n_words // 4)
            reply_words = max(2, n_words - prompt_words)
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=prompt_words)) + "?"},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=reply_words)) + "."}]}) + "\n")


# ---------------------------------------------------------------- arm A: plain Trainer + peft

def baseline_child(spec_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from core import config, models
    from core.data import sft as data

    spec = json.loads(Path(spec_path).read_text())
    cfg = config.from_dict(spec["settings"])
    cfg.model.source = str(models.resolve(cfg.model.source))  # builtin:... -> its converted folder
    tok = AutoTokenizer.from_pretrained(cfg.model.source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = list(data.prepare(cfg, tok).train)  # the same token ids as ours
    set_seed(cfg.train.seed)
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.source, dtype=dtype)
    model.config.use_cache = False
    lo = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    t = cfg.train
    targs = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=t.batch_size,
                              learning_rate=t.lr, lr_scheduler_type=t.scheduler, max_steps=t.max_steps,
                              logging_steps=1, save_strategy="no", seed=t.seed, use_cpu=not cuda,
                              bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, report_to="none",
                              disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0}

    def collate(batch):
        counted["tokens"] += sum(len(r["input_ids"]) for r in batch)
        return pad(batch)

    log = {}

    class Stamp(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log[state.global_step] = (time.time(), counted["tokens"])

    trainer = Trainer(model=model, args=targs, train_dataset=rows, processing_class=tok, callbacks=[Stamp()],
                      data_collator=collate)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    Path(spec["result"]).write_text(json.dumps({"log": log, "cuda_peak": peak}))


# ---------------------------------------------------------------- arms B and C: python -m core train

def ours_result(run_dir: Path) -> dict:
    """Tokens per step from the metrics events: tokens_per_s x the callback's interval (t between events)."""
    events = ev.read(run_dir)[0]
    metrics = ev.metrics(events)
    log, total, prev_t = {}, 0.0, None
    for e in metrics:
        if prev_t is not None:
            total += e[ev.TOKENS_PER_S] * (e[ev.T] - prev_t)
        log[e[ev.STEP]] = (e[ev.T], total)
        prev_t = e[ev.T]
    peak = ev.peak_memory(events)
    return {"log": log, "cuda_peak": peak[0] if peak and peak[1] == ev.MEM_GPU_PEAK else None}


# ---------------------------------------------------------------- running the arms

def run_arm(arm: str, args, workdir: Path, k: int, overrides: dict | None = None, extra_env: dict | None = None) -> dict:
    import yaml

    d = workdir / f"{arm}{k}"
    d.mkdir()
    env = {**os.environ, "LORA_GARAGE_HOME": str(d / "home"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(extra_env or {})}
    (d / "home").mkdir()
    if args.models_home:
        (d / "home" / "models").symlink_to(args.models_home, target_is_directory=True)
    if arm == "A":
        spec = {"settings": settings(args, False), "out": str(d / "out"), "result": str(d / "result.json")}
        (d / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--baseline-child", str(d / "spec.json")]
    else:
        (d / "cfg.yaml").write_text(yaml.safe_dump(settings(args, packing=arm == "C", overrides=overrides)))
        cmd = [sys.executable, "-m", "core", "train", "--config", str(d / "cfg.yaml")]
    with open(d / "out.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{(d / 'out.log').read_text()[-4000:]}")
    if arm == "A":
        r = json.loads((d / "result.json").read_text())
    else:
        run_dir = next((d / "home" / "runs").iterdir())
        r = ours_result(run_dir)
        r["log_lines"] = [x for x in (run_dir / "train.log").read_text().splitlines()
                          if x.startswith(("batches:", "WARNING: padding-free", "loaded ", "loss:", "mlp:", "CPU memory", "memory:"))]
        est = run_dir / "estimate.json"
        r["estimate"] = json.loads(est.read_text()) if est.exists() else None
    r["log"] = {int(s): v for s, v in r["log"].items()}
    r["rss_peak"] = usage.ru_maxrss * 1024  # Linux reports KiB
    r["minor_faults"] = usage.ru_minflt  # pages the arm's processes touched afresh (a lean allocator's price)
    return r


def window(r: dict, warmup: int) -> tuple[float, float, int]:
    """(non-padding tokens, seconds, steps) from the end of step `warmup` to the last step."""
    steps = sorted(r["log"])
    first, last = steps[min(warmup, len(steps) - 1) - 1] if warmup else steps[0], steps[-1]
    (t0, n0), (t1, n1) = r["log"][first], r["log"][last]
    return n1 - n0, t1 - t0, last - first


def machine() -> dict:
    import peft
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}  # other work on the machine skews timings


def resolve_model(args, workdir: Path) -> None:
    args.models_home = None
    if args.model == "tiny":
        from tests.helpers.tiny import build_tiny_model

        args.model_path = build_tiny_model(workdir / "tiny-model")
        return
    if args.model.startswith("builtin:"):
        os.environ.setdefault("LORA_GARAGE_HOME", "/tmp/lg-home")
        from core import models, paths

        args.model_path = models.resolve(args.model)  # converted once under $LORA_GARAGE_HOME/models
        args.models_home = paths.models_dir()
        args.model_path = args.model  # every arm resolves it through its own home, linked to the same models
        return
    args.model_path = Path(args.model).resolve()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (tests/helpers/tiny.py, built in a temp dir), builtin:smollm2-135m, "
                                                    "or a model folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--out", help="also write the JSON result (with machine info) to this file")
    p.add_argument("--memory", action="store_true",
                   help="CPU memory bench: rows of ~max_len tokens, arms F P K K P F (see the module docstring)")
    p.add_argument("--order", default="FPKKPF", help="--memory: the arms in the order they run (interleave them: "
                                                     "other work on the machine shifts timings over time)")
    p.add_argument("--baseline-child", help=argparse.SUPPRESS)
    p.add_argument("--probe-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child)
    if args.probe_child:
        return probe_child(args.probe_child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        return memory_main(args)
    with tempfile.TemporaryDirectory(prefix="lg-throughput-") as tmp:
        workdir = Path(tmp)
        resolve_model(args, workdir)
        args.data = workdir / "rows.jsonl"
        write_dataset(args.data, args.rows, args.max_len, tokens_per_word(args))
        lengths = data_lengths(args)
        runs: dict[str, list] = {"A": [], "B": [], "C": []}
        for k, arm in enumerate("ABCCBA"):
            r = run_arm(arm, args, workdir, k)
            runs[arm].append(r)
            tokens, secs, steps = window(r, args.warmup)
            if not args.json:
                print(f"  run {k + 1}/{len(args.order)}  arm {arm}: {tokens / secs:>9,.0f} tokens/s  {secs / steps:.3f} s/step", flush=True)
    arms = {}
    for arm, rs in runs.items():
        w = [window(r, args.warmup) for r in rs]
        tokens, secs, steps = (sum(x[i] for x in w) for i in range(3))
        arms[arm] = {"tokens_per_s": round(tokens / secs, 1), "s_per_step": round(secs / steps, 4),
                     "peak_rss_mb": round(max(r["rss_peak"] for r in rs) / 2**20, 1),
                     "cuda_peak_mb": (round(max(r["cuda_peak"] for r in rs) / 2**20, 1)
                                      if all(r.get("cuda_peak") for r in rs) else None),
                     "runs_tokens_per_s": [round(x[0] / x[1], 1) for x in w],
                     "notes": rs[0].get("log_lines", [])}
    result = {"arms": arms, "B_over_A": round(arms["B"]["tokens_per_s"] / arms["A"]["tokens_per_s"], 3),
              "C_over_A": round(arms["C"]["tokens_per_s"] / arms["A"]["tokens_per_s"], 3),
              "model": args.model, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
              "max_len": args.max_len, "rows": args.rows, "lengths": lengths, "machine": machine(),
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.json:
        print_table(result)
    else:
        print(json.dumps({"arms": arms, "B_over_A": result["B_over_A"], "C_over_A": result["C_over_A"]}))


# ---------------------------------------------------------------- --memory

def probe_child(spec_path: str) -> None:
    """RSS of what every CPU run holds before its first step: Python, torch, transformers, peft, the model, LoRA."""
    import psutil
    import torch

    from core import config, models
    from core.train import child

    spec = json.loads(Path(spec_path).read_text())
    cfg = config.from_dict(spec["settings"])
    rss = {"imports": psutil.Process().memory_info().rss}
    model = child.add_lora(child.load_model(cfg, "cpu", models.resolve(cfg.model.source)), cfg)
    rss["model_lora"] = psutil.Process().memory_info().rss
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    Path(spec["result"]).write_text(json.dumps({"rss": rss, "param_bytes": weights, "threads": torch.get_num_threads()}))


def memory_main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="lg-memory-") as tmp:
        workdir = Path(tmp)
        resolve_model(args, workdir)
        args.data = workdir / "rows.jsonl"
        write_dataset(args.data, max(args.rows // 10, args.batch_size * (args.steps + 1)), args.max_len,
                      tokens_per_word(args), full=True)
        lengths = data_lengths(args)
        spec = {"settings": settings(args, False), "result": str(workdir / "probe.json")}
        (workdir / "probe.json.spec").write_text(json.dumps(spec))
        env = {**os.environ, "LORA_GARAGE_HOME": os.environ.get("LORA_GARAGE_HOME", str(workdir / "home"))}
        subprocess.run([sys.executable, __file__, "--probe-child", str(workdir / "probe.json.spec")], cwd=ROOT,
                       env=env, check=True)
        probe = json.loads((workdir / "probe.json").read_text())
        runs: dict[str, list] = {a: [] for a in dict.fromkeys(args.order)}
        for k, arm in enumerate(args.order):
            overrides, extra_env = MEMORY_ARMS[arm]
            r = run_arm(arm, args, workdir, k, overrides, extra_env)
            runs[arm].append(r)
            tokens, secs, steps = window(r, args.warmup)
            est = r["estimate"]["total_bytes"] if r.get("estimate") else None
            print(f"  run {k + 1}/{len(args.order)}  arm {arm}: {tokens / secs:>9,.1f} tokens/s  peak RSS "
                  f"{r['rss_peak'] / 2**30:.2f} GiB  estimate {est / 2**30 if est else float('nan'):.2f} GiB",
                  flush=True)
    arms = {}
    for arm, rs in runs.items():
        w = [window(r, args.warmup) for r in rs]
        tokens, secs, steps = (sum(x[i] for x in w) for i in range(3))
        est = rs[0]["estimate"]
        peak = max(r["rss_peak"] for r in rs)
        arms[arm] = {"tokens_per_s": round(tokens / secs, 1), "s_per_step": round(secs / steps, 3),
                     "peak_rss_gib": round(peak / 2**30, 3), "runs_peak_rss_gib": [round(r["rss_peak"] / 2**30, 3) for r in rs],
                     "estimate_gib": round(est["total_bytes"] / 2**30, 3) if est else None,
                     "estimate_components_mib": {k: round(v / 2**20) for k, v in est["components"].items()} if est else None,
                     "peak_over_estimate": round(peak / est["total_bytes"], 3) if est else None,
                     "runs_tokens_per_s": [round(x[0] / x[1], 1) for x in w], "env": MEMORY_ARMS[arm][1],
                     "runs_minor_faults": [r.get("minor_faults") for r in rs],
                     "runs_estimate_gib": [round(r["estimate"]["total_bytes"] / 2**30, 3) if r.get("estimate") else None
                                           for r in rs],
                     "settings": MEMORY_ARMS[arm][0], "notes": rs[0].get("log_lines", [])}
    result = {"mode": "memory", "arms": arms, "probe_rss_gib": {k: round(v / 2**30, 3) for k, v in probe["rss"].items()},
              "probe_param_gib": round(probe["param_bytes"] / 2**30, 3), "model": args.model, "steps": args.steps,
              "warmup": args.warmup, "batch_size": args.batch_size, "max_len": args.max_len, "lengths": lengths,
              "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    L = result["lengths"]
    print(f"\nmodel {args.model}, batch {args.batch_size} x rows of median {L['median']} tokens (max {L['max']}), "
          f"{args.steps} steps (first {args.warmup} left out); before any step (imports + model + LoRA): "
          f"{result['probe_rss_gib']['model_lora']:.2f} GiB RSS")
    print(f"{'arm':<48} {'tokens/s':>9} {'peak RSS GiB':>13} {'estimate GiB':>13} {'peak/est':>9}")
    names = {"F": "F full logits", "P": "P full logits, glibc's defaults (before)",
             "K": "K chunked loss (the default)", "Q": "Q chunked loss, glibc's malloc defaults",
             "L": "L chunked loss, freed blocks handed back", "H": "H as L, with transparent huge pages",
             "R": "R as Q, with the lean MLP", "V": "V as L, with the lean MLP",
             "T": "T chunked loss, tbbmalloc", "W": "W as T, with the lean MLP",
             "U": "U as T, blocks of 1 MiB+ kept", "X": "X as U, with huge pages",
             "Z": "Z a lean run (tbbmalloc, lean MLP)"}
    for arm, a in sorted(arms.items()):
        print(f"{names[arm]:<48} {a['tokens_per_s']:>9,.1f} {a['peak_rss_gib']:>13.2f} {a['estimate_gib'] or 0:>13.2f} "
              f"{a['peak_over_estimate'] or 0:>9.2f}")
    if args.json:
        print(json.dumps(result))


def tokens_per_word(args) -> float:
    from core import models

    tok = models.load_tokenizer(models.resolve(str(args.model_path)))
    sample = " ".join(random.Random(1).choices(WORDS, k=2000))
    return len(tok(sample, add_special_tokens=False)["input_ids"]) / 2000


def data_lengths(args) -> dict:
    from core import config, models
    from core.data import sft as data

    cfg = config.from_dict(settings(args, False))
    stats = data.prepare(cfg, models.load_tokenizer(models.resolve(cfg.model.source))).stats.tokens()
    return {k: stats[k] for k in ("min", "median", "mean", "p95", "max", "max_len")}


def print_table(r: dict) -> None:
    L = r["lengths"]
    print(f"\nmodel {r['model']}, {r['steps']} steps (first {r['warmup']} left out), batch {r['batch_size']}, "
          f"max_len {r['max_len']}; row lengths min {L['min']} median {L['median']} mean {L['mean']} "
          f"p95 {L['p95']} max {L['max']}; {r['machine']['cpu_count']} CPUs, torch {r['machine']['torch']}")
    print(f"{'arm':<44} {'tokens/s':>10} {'s/step':>8} {'peak MB':>9}")
    names = {"A": "A plain Trainer + peft, padding, random", "B": "B ours, defaults", "C": "C ours, data.packing=true"}
    for arm, a in r["arms"].items():
        mem = a["cuda_peak_mb"] if a["cuda_peak_mb"] is not None else a["peak_rss_mb"]
        print(f"{names[arm]:<44} {a['tokens_per_s']:>10,.1f} {a['s_per_step']:>8.3f} {mem:>9,.0f}")
    print(f"B/A {r['B_over_A']:.3f}   C/A {r['C_over_A']:.3f}   (goal B/A >= 1.3)")


if __name__ == "__main__":
    main()
