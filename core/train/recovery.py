"""Out of memory in the middle of a run becomes a smaller step that carries on (train.oom_recovery=auto).

The remedies, in order: the micro-batch down to 1 (divided each time by its smallest factor, 2 for the usual powers
of two, with gradient accumulation multiplied by the same, so the effective batch, the number of optimizer steps
and the learning-rate schedule stay as they were), then gradient checkpointing on, then, only with
train.oom_recovery=auto+shorten (SFT only: core.config refuses it for other objectives), data.max_len halved (not
below SHORTEN_MIN_LEN), the data prepared again at that length and the rows longer than it counted as cut. With none
left, or with train.oom_recovery=off, the error goes on to fail the run as before, with the triage
(core.train.child.oom_error).

Where the run carries on from. transformers' Trainer cannot replay a half-done gradient accumulation in place, so a
retry always goes through the resume path, which restores the weights, the optimizer, the schedule, the RNG and
the data order of a checkpoint:
- out of memory in a forward/backward pass (the usual case) leaves the weights and the optimizer at the last
  completed optimizer step; the process's RNG goes back to what it was when that step's first micro-batch began,
  and a checkpoint of that step is saved (unless the last one is that step) and resumed. With no optimizer step
  done yet, the run restarts at step 1 from its untouched initial adapter;
- out of memory anywhere else (the optimizer step, an evaluation, a checkpoint save) may have left the step half
  applied: the run goes back to its last complete checkpoint, or to its initial adapter when there is none.
Each retry is a `recovered` event (core.events), a line in train.log, a field of status.json, and config.yaml is
rewritten with the settings the run now trains with, so a later resume keeps them.

After training (train(), after the loop): the final save of the adapter comes before the end-of-run evaluation, so
an out of memory there loses nothing (final_save, final_eval).

Several processes: an out of memory in the forward pass is agreed by every rank before the backward pass's
collectives (GarageTrainer.compute_loss), so every rank takes the same remedy at the same step. One in the backward
pass of one rank cannot be agreed (the others wait inside the gradient all-reduce): that rank fails and ends the
group, as any dying rank does.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import sys
from pathlib import Path

from core import events as ev
from core import hardware
from core.config import SHORTEN_MIN_LEN, dump_yaml
from core.runs import folder as runs
from core.train import distributed


@dataclasses.dataclass
class Remedy:
    what: str                 # ev.REMEDY_*
    change: str               # "micro-batch 4 -> 2, gradient accumulation 2 -> 4 (same effective batch)"
    batch_size: int
    grad_accum: int
    grad_checkpointing: bool
    factor: int = 1           # grad_accum grew by this factor (per rank too)
    max_len: int | None = None  # data.max_len after a shorten; None: unchanged


def is_oom(e: BaseException) -> bool:
    import torch  # heavy

    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


def smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)


def next_remedy(t, max_len: int | None = None) -> Remedy | None:
    """The next change for train settings `t` (a TrainConfig) with data.max_len `max_len`, or None when recovery
    is off or nothing is left."""
    if t.oom_recovery == "off":
        return None
    if t.batch_size > 1:
        f = smallest_factor(t.batch_size)
        b, a = t.batch_size // f, t.grad_accum * f
        return Remedy(ev.REMEDY_MICRO_BATCH, f"micro-batch {t.batch_size} -> {b}, gradient accumulation "
                      f"{t.grad_accum} -> {a} (same effective batch)", b, a, t.grad_checkpointing, f)
    if not t.grad_checkpointing:
        return Remedy(ev.REMEDY_CHECKPOINTING, "gradient checkpointing off -> on (activations recomputed in the "
                      "backward pass: less memory, slower steps)", t.batch_size, t.grad_accum, True)
    if t.oom_recovery == "auto+shorten" and t.objective == "sft" and max_len and max_len > SHORTEN_MIN_LEN:
        new = max(SHORTEN_MIN_LEN, max_len // 2)
        return Remedy(ev.REMEDY_SHORTEN, f"data.max_len {max_len} -> {new} tokens", t.batch_size, t.grad_accum,
                      True, max_len=new)
    return None


def nothing_left(t, max_len: int) -> str:
    """Why no remedy is left, for train.log's last word before the triage."""
    if t.oom_recovery == "off":
        return "train.oom_recovery=off"
    if t.oom_recovery == "auto+shorten":
        return f"nothing left to change: micro-batch 1, gradient checkpointing on and data.max_len {max_len} " \
               f"(auto+shorten goes no lower than {SHORTEN_MIN_LEN})"
    return ("nothing left to change: micro-batch 1 and gradient checkpointing on (train.oom_recovery=auto+shorten "
            "would also halve data.max_len, cutting the longest rows)")


def rows_over(prepared, max_len: int) -> int:
    """Training rows longer than max_len (before cutting): the rows this length cuts or drops."""
    return sum(1 for n in prepared.stats.lengths if n > max_len)


def memory_now(device: str) -> int | None:
    """What the process held when it ran out: torch's peak reserved on CUDA, the resident set size on the CPU."""
    if device == "cuda":
        import torch  # heavy

        return int(torch.cuda.max_memory_reserved())
    return hardware.process_rss_reading().get(ev.MEM_RSS)


def free_memory(device: str) -> None:
    """Hand the failed step's memory back: collect the dropped tensors, and on CUDA empty the allocator's cache and
    start its peak afresh, so what the retry measures is its own."""
    gc.collect()
    if device == "cuda":
        import torch  # heavy

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Recovery:
    """One run's recoveries. Built before the first trainer: it keeps the untouched initial adapter (on the CPU;
    the LoRA weights only) for a retry that must start again at step 1."""

    def __init__(self, run_dir: Path, cfg, model, events: ev.EventLog, device: str, plan=None, prepared=None,
                 reprepare=None):
        self.run_dir, self.cfg, self.events, self.device, self.plan = Path(run_dir), cfg, events, device, plan
        # the data the trainer is built with; reprepare(cfg) -> the data prepared again at cfg.data.max_len, for
        # auto+shorten (the child records its new fingerprint, so a later resume accepts it)
        self.prepared, self.reprepare = prepared, reprepare
        self.model = model
        self.initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        self.count = 0
        self.pending: dict | None = None   # what the last out of memory was, until recover() acts on it

    def train(self, build, resume_from: Path | None, ctx):
        """trainer.train() with recovery: build(plan, prepared) -> (trainer, callback) makes a trainer for the
        current settings and data; the pre-flight probe first where train.probe wants it. -> the (trainer, callback) that finished."""
        probed = False
        while True:
            trainer, callback = build(self.plan, self.prepared)
            ctx.timeline.mark("trainer build")
            if resume_from is not None and trained_to_the_end(resume_from):
                # transformers' resume from a checkpoint of the last step, in the middle of an epoch, runs one step
                # more (step max_steps + 1, at the schedule's end): the checkpoint's weights are the run's final ones
                # instead, loaded by the same function its resume path uses, and the final save follows
                trainer._load_from_checkpoint(str(resume_from))
                trainer.state.global_step = ctx.step = runs.checkpoint_step(resume_from)
                print(f"{resume_from.name} is the run's last step: nothing left to train, the final save follows",
                      flush=True)
                return trainer, callback
            try:
                if resume_from is None and not probed and probe_wanted(self.cfg, self.device):
                    record_probe(self.run_dir, probe(trainer, self.cfg, self.device, ctx))
                    probed = True
                ctx.phase = "first step"
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                return trainer, callback
            except BaseException as e:  # noqa: BLE001 - only an out of memory with a remedy left is kept from failing
                if not self.take(e, trainer, ctx):
                    raise
            resume_from = self.recover(trainer, self.model)  # here, the error's frames (and their tensors) are gone
            del trainer, callback
            free_memory(self.device)

    def take(self, e: BaseException, trainer, ctx) -> bool:
        """In the `except` of trainer.train(): True when this error is an out of memory the run recovers from
        (then call recover() once the except block has dropped the error's frames); False to let it fail."""
        if not is_oom(e):
            return False
        remedy = next_remedy(self.cfg.train, self.cfg.data.max_len)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if remedy is None:
            left = nothing_left(self.cfg.train, self.cfg.data.max_len)
            print(f"out of memory at step {ctx.step} ({why}); no recovery: {left}", file=sys.stderr, flush=True)
            return False
        self.pending = {"remedy": remedy, "why": why, "at_step": 0 if trainer.probing else ctx.step, "phase": ctx.phase,
                        "in_step": bool(trainer.in_micro_step), "mem": memory_now(self.device)}
        print(f"out of memory at step {ctx.step} during {ctx.phase} ({why}): recovering with {remedy.change}",
              file=sys.stderr, flush=True)
        return True

    def recover(self, trainer, model) -> Path | None:
        """Undo the failed step, choose where to carry on, change the settings. -> the checkpoint to resume from
        (None: start again at step 1). The caller builds a new trainer with self.cfg / self.plan."""
        p, self.pending = self.pending, None
        remedy: Remedy = p["remedy"]
        model.zero_grad(set_to_none=True)
        free_memory(self.device)
        step = trainer.state.global_step
        latest = runs.latest_checkpoint(self.run_dir)
        if p["in_step"]:
            restore_rng(trainer.rng_at_step_start)
            trainer.probing = trainer.in_micro_step = False
            if step == 0:
                resume, how = None, "no optimizer step had completed: restarts at step 1"
            elif latest is not None and runs.checkpoint_step(latest) == step:
                resume, how = latest, f"carries on from {latest.name}, the last completed optimizer step"
            else:
                trainer.save_now()
                resume = runs.checkpoints_dir(self.run_dir) / f"checkpoint-{step}"
                how = (f"saved {resume.name} at the last completed optimizer step and carries on from it: the "
                       f"half-done gradient accumulation of step {step + 1} is replayed from its start with the "
                       f"checkpoint's RNG and data order")
        else:
            where = f"outside a forward/backward pass ({p['phase']}), where step {step} may be half applied"
            if latest is not None:
                resume, how = latest, f"the out of memory came {where}: goes back to {latest.name}"
            else:
                self.restore_initial(model)
                resume, how = None, f"the out of memory came {where}, and no checkpoint exists yet: restarts at step 1"
        self.apply(remedy)
        change = remedy.change
        if remedy.max_len is not None:
            cut = rows_over(self.prepared, remedy.max_len)
            verb = "dropped" if self.cfg.data.overlong == "drop" else "cut"
            change += (f", {cut} of {len(self.prepared.stats.lengths)} rows longer than that {verb} "
                       f"(data.overlong={self.cfg.data.overlong})")
            if step:
                change += f"; the examples after step {step} are not those an uninterrupted run would see"
        self.count += 1
        where = "in the pre-flight probe (before step 1)" if p["phase"] == "probe" else f"at step {p['at_step']}"
        message = f"recovered from out of memory {where}: {change}; {how}"
        print(message, flush=True)
        self.events.recovered(step=runs.checkpoint_step(resume) if resume else 0, at_step=p["at_step"],
                              what=remedy.what, why=p["why"], message=message, mem_before=p["mem"],
                              batch_size=remedy.batch_size, grad_accum=remedy.grad_accum,
                              grad_checkpointing=remedy.grad_checkpointing, max_len=self.cfg.data.max_len,
                              rows_cut=rows_over(self.prepared, self.cfg.data.max_len) if self.prepared else 0,
                              from_checkpoint=resume.name if resume else None)
        if distributed.is_main():
            runs.write_status(self.run_dir, recovered=message, recoveries=self.count)
            header = (f"# run {self.run_dir.name}: the configuration it trains with. Changed by out-of-memory "
                      f"recovery ({self.count}x, see events.jsonl); edit a copy, not this file.\n")
            runs.write_atomic(self.run_dir / "config.yaml", dump_yaml(self.cfg, header))
        distributed.barrier()
        return resume

    def apply(self, remedy: Remedy) -> None:
        t = self.cfg.train
        t.batch_size, t.grad_accum, t.grad_checkpointing = remedy.batch_size, remedy.grad_accum, remedy.grad_checkpointing
        if self.plan is not None:
            self.plan = dataclasses.replace(self.plan, batch_size=remedy.batch_size,
                                            grad_accum=self.plan.grad_accum * remedy.factor)
        if remedy.max_len is not None:
            self.cfg.data.max_len = remedy.max_len
            self.prepared = self.reprepare(self.cfg)

    def restore_initial(self, model) -> None:
        import torch  # heavy

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.initial.items():
                params[name].copy_(value)


def trained_to_the_end(checkpoint: Path) -> bool:
    """Whether a checkpoint is of the run's last optimizer step (its trainer_state.json: global_step >= max_steps)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return bool(state.get("max_steps")) and state["global_step"] >= state["max_steps"]


def rng_state() -> dict:
    """Every RNG a training step draws from (Python, NumPy, torch CPU and CUDA), as the Trainer's checkpoints
    save them."""
    import numpy as np  # heavy
    import torch  # heavy

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.random.get_rng_state_all()
    return out


def restore_rng(state: dict | None) -> None:
    import numpy as np  # heavy
    import torch  # heavy

    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- after the training loop

def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def final_save(save, trainer, cfg, events: ev.EventLog, device: str) -> None:
    """save() the adapter; on an out of memory (train.oom_recovery not off), free the optimizer state, which
    nothing needs once training is over, and save again. A second out of memory fails the run with the triage."""
    why = None
    try:
        save()
        return
    except BaseException as e:  # noqa: BLE001 - only an out of memory is retried, once
        if not is_oom(e) or cfg.train.oom_recovery == "off":
            raise
        why = first_line(e)
    freed = free_optimizer(trainer)  # here, the error's frames (and their tensors) are gone
    free_memory(device)
    message = (f"out of memory in the final save ({why}): freed the optimizer state ({freed / 2**20:.1f} MB), "
               f"which training no longer needs, and saved again")
    print(message, file=sys.stderr, flush=True)
    events.log("warning", message)
    save()
    print("final save: the adapter is saved", flush=True)


def free_optimizer(trainer) -> int:
    """Drop the optimizer's state (Adam's moments: twice the trainable weights in fp32). -> bytes freed."""
    import torch  # heavy

    opt = getattr(trainer, "optimizer", None)
    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the torch optimizer
    if inner is None:
        return 0
    freed = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    inner.state.clear()
    return freed


def final_eval(trainer, cfg, events: ev.EventLog, device: str) -> None:
    """The end-of-run evaluation (train.eval_steps=0), after the adapter is saved. An out of memory halves the
    evaluation batch and tries again; at 1 row a batch, the evaluation is skipped with a message, and the run
    completes with its adapter. train.oom_recovery=off fails the run instead (the adapter is already saved)."""
    args = trainer.args
    while True:
        why = None
        try:
            trainer.evaluate()
            return
        except BaseException as e:  # noqa: BLE001 - only an out of memory is retried
            if not is_oom(e) or cfg.train.oom_recovery == "off":
                raise
            why = first_line(e)
        free_memory(device)  # here, the error's frames (and their tensors) are gone
        b = args.per_device_eval_batch_size
        if b > 1:
            message = (f"out of memory in the end-of-run evaluation ({why}): evaluation batch {b} -> {b // 2}, "
                       f"evaluating again")
            args.per_device_eval_batch_size = b // 2
        else:
            message = (f"out of memory in the end-of-run evaluation at 1 row a batch ({why}): the evaluation is "
                       f"skipped, so this run has no held-out loss. The adapter is saved; score it later with "
                       f"`python -m core eval RUN` or on a larger GPU")
        print(message, file=sys.stderr, flush=True)
        events.log("warning", message)
        if b <= 1:
            return


# ---------------------------------------------------------------- the pre-flight probe (train.probe)

def probe_wanted(cfg, device: str) -> bool:
    p = cfg.train.probe
    return cfg.train.objective == "sft" and (p == "on" or (p == "auto" and device == "cuda"))


def probe(trainer, cfg, device: str, ctx) -> dict:
    """One forward and backward pass at the longest batch the data will produce (the batch_size longest rows,
    collated as training collates them), the optimizer step skipped, gradients and RNG put back as they were.
    An out of memory here goes to the caller's recovery, before step 1. -> what it measured."""
    import torch  # heavy

    ctx.phase, ctx.step = "probe", 0
    ds = trainer.train_dataset
    lengths = [ds.length(i) if hasattr(ds, "length") else len(ds[i]["input_ids"]) for i in range(len(ds))]
    b = trainer.args.per_device_train_batch_size
    longest = sorted(range(len(ds)), key=lambda i: -lengths[i])[:b]
    batch = trainer.collator([ds[i] for i in longest])
    inputs = {k: v.to(trainer.args.device) if hasattr(v, "to") else v for k, v in batch.items()}
    model = trainer.model
    if cfg.train.grad_checkpointing:  # the Trainer turns it on only inside train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainer.rng_at_step_start = rng_state()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.in_micro_step = trainer.probing = True
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    trainer.in_micro_step = trainer.probing = False
    peak = int(torch.cuda.max_memory_reserved()) if device == "cuda" else memory_now(device)
    del loss, inputs
    model.zero_grad(set_to_none=True)
    restore_rng(trainer.rng_at_step_start)
    free_memory(device)
    out = {"peak_bytes": peak, "peak_kind": "torch_peak_reserved" if device == "cuda" else "rss",
           "batch_size": b, "longest_row_tokens": max(lengths[i] for i in longest) if longest else 0,
           "grad_checkpointing": bool(cfg.train.grad_checkpointing)}
    print(f"pre-flight probe: forward + backward at the longest batch ({b} x up to {out['longest_row_tokens']} "
          f"tokens) fits; peak {peak / 2**30:.2f} GB ({out['peak_kind']})", flush=True)
    return out


def record_probe(run_dir: Path, measured: dict) -> None:
    """The probe's peak into estimate.json, beside the estimate made at launch (main rank only)."""
    path = Path(run_dir) / "estimate.json"
    if not distributed.is_main() or not path.is_file():
        return
    body = json.loads(path.read_text(encoding="utf-8"))
    body["probe"] = measured
    runs.write_atomic(path, json.dumps(body, indent=1, default=str))
