"""The pieces core/train/child.py plugs into transformers' Trainer (the collators are in core/train/collate.py): a seeded length-grouped
sampler, a thin Trainer subclass (phase tracking, NaN bookkeeping, test-only fault hooks) and the callback that
talks to the UI through the run folder (events.jsonl, status.json, COMPLETE markers, stop requests).

Imported only inside the child process, after torch and transformers are already loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from core import hardware
from core.train import distributed
from core.train import recovery
from core.runs import folder as runs
from core.runs import portable
from core import events as ev
from core.train.collate import PadCollator
from core.train.startup import Timeline
from core.errors import RunError
from core.estimate.gpu_specs import peak_bf16
from core.estimate import eta as run_eta  # `eta` is a local name in on_log

# test-only: "oom@step3" (once: the retry at that step fits), "oomall@step3" (every time step 3 is tried),
# "oomprobe@step0" (once, in the pre-flight probe), "oomlong@tokens48" (every training batch longer than 48 tokens
# a row: an out of memory that only a shorter data.max_len cures), "oomeval@rows1" (every evaluation batch of more
# than 1 row; rows0: every one), "oomsave@step0" (once, in the final save of the adapter),
# "nan@step2", "disk@step4", "killsave@step4", "slow@step1" (every step from 1 on takes at least SLOW_STEP_S more,
# or $LORA_GARAGE_SLOW_STEP_S: time for a test to act mid-run on a fast machine, or to see a Stop wait for a long
# step; the numbers are untouched). SIGKILL at a moment, for the fault campaign (bench/fault_campaign.py):
# "killdata@step0" (tokenised, before the data event and the resume point), "killload@step0" (base model loaded,
# before LoRA), "killstep@step3" (step 3's backward done, its optimizer step not), "killsave@step4" (checkpoint-4
# half written), "killfinal@step0" (final adapter written to its temporary folder, not yet renamed).
# FAULT_RANK_ENV=N: in a multi-process run the faults fire in rank N alone.
FAULT_ENV = "LORA_GARAGE_FAULT"
FAULT_RANK_ENV = "LORA_GARAGE_FAULT_RANK"
FAULT_KINDS = ("oom", "oomall", "oomprobe", "oomlong", "oomeval", "oomsave", "nan", "disk", "killsave", "slow", "killdata", "killload", "killstep", "killfinal")
FAULT_UNITS = {"oomlong": "tokens", "oomeval": "rows"}  # what their number counts; the others' is a step
SLOW_STEP_S = float(os.environ.get("LORA_GARAGE_SLOW_STEP_S", "0.5"))


def parse_faults(text: str | None) -> dict[str, int]:
    """LORA_GARAGE_FAULT="nan@step2,oom@step3" -> {"nan": 2, "oom": 3}; "oomlong@tokens48" -> {"oomlong": 48}.
    Unknown kinds are an error, not ignored."""
    out = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, _, where = item.partition("@" + FAULT_UNITS.get(item.partition("@")[0], "step"))
        if kind not in FAULT_KINDS or not where.isdigit():
            raise ValueError(f"{FAULT_ENV}: cannot parse {item!r} (use e.g. oom@step3)")
        out[kind] = int(where)
    return out


def kill_point(faults: dict, kind: str, step: int = 0) -> None:
    """Test-only: SIGKILL this process here when LORA_GARAGE_FAULT names this moment (kind@stepN)."""
    if faults.get(kind) == step:
        print(f"{FAULT_ENV}: SIGKILL at {kind}@step{step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def oom_point(faults: dict, kind: str) -> None:
    """Test-only: an out of memory here, once, when LORA_GARAGE_FAULT names this moment (e.g. oomsave@step0)."""
    if faults.pop(kind, None) is not None:
        import torch  # heavy

        raise torch.OutOfMemoryError(f"CUDA out of memory. (injected by {FAULT_ENV} at {kind})")


class Context:
    """What the child is doing right now, so an error can say in which phase it happened."""

    def __init__(self):
        self.phase = "setup"
        self.step = 0
        self.faults: dict = {}   # test-only (LORA_GARAGE_FAULT), for the kill points outside the trainer
        self.timeline = Timeline.off()  # the start-up timeline (core.train.startup): the child's main sets it


class StopFlag:
    """A stop request (the runner's Stop writes one into the run folder: core.runs.portable), SIGTERM (or
    CTRL_BREAK on Windows) or a first Ctrl-C: finish the current step, save, exit as stopped. The file needs no
    signal, so Stop works the same on every system. A second Ctrl-C falls through to KeyboardInterrupt for
    someone who really wants out now."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self._requested = False

    @property
    def requested(self) -> bool:
        if not self._requested and self.run_dir is not None and portable.stop_requested(self.run_dir):
            self._requested = True
            print("stop requested: stopping after the current step", file=sys.stderr, flush=True)
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = bool(value)

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        if hasattr(signal, "SIGBREAK"):  # Windows: CTRL_BREAK_EVENT sent to the child's process group
            signal.signal(signal.SIGBREAK, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = True
        print(f"received {signal.Signals(signum).name}: stopping after the current step", file=sys.stderr, flush=True)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """group_by_length whose order depends only on (seed, epoch). The stock sampler draws from the global RNG,
    which a resumed run restores only after the first batches are drawn, so the resumed run would see other
    batches. The epoch is read from the trainer state because set_epoch does not reach a sampler behind
    accelerate's skip-batches wrapper."""

    def __init__(self, batch_size: int, dataset, seed: int, trainer: Trainer):
        # core.data.sft's token rows know their lengths without building every row
        lengths = [dataset.length(i) for i in range(len(dataset))] if hasattr(dataset, "length") else None
        super().__init__(batch_size, dataset=dataset, lengths=lengths)
        self.seed = seed
        self.trainer = trainer

    def __iter__(self):
        epoch = int(self.trainer.state.epoch or 0)
        self.generator = torch.Generator().manual_seed(self.seed + epoch)
        return super().__iter__()


class GarageTrainer(Trainer):
    """Trainer plus: phase tracking for error messages, per-step NaN bookkeeping, grouping by length, and the
    test-only fault hooks (LORA_GARAGE_FAULT). The training loop itself is the stock one."""

    def __init__(self, *args, ctx: Context, collator: PadCollator, group_by_length: bool,
                 faults: dict[str, int], **kwargs):
        super().__init__(*args, data_collator=self._collate, **kwargs)
        self.setup_garage(ctx, collator, group_by_length, faults)

    def setup_garage(self, ctx: Context, collator, group_by_length: bool, faults: dict[str, int]) -> None:
        """Our state beside the Trainer's (a subclass whose Trainer takes no collator calls this itself)."""
        self.ctx, self.collator, self.group_by_length, self.faults = ctx, collator, group_by_length, faults
        # tokens/s counts the batches trained, not those collated: accelerate's loader collates one batch ahead
        # of the one it yields (to know which is last), except at the end of an epoch. Counted at collation, an
        # epoch's last step showed 0 tokens/s and the next epoch's first step twice its share. So each batch's
        # (tokens, attn_sq) waits here, in order, until training_step takes that batch.
        self.collated: deque = deque()
        self.trained_tokens = 0        # real tokens of the batches trained so far (tokens/s, MFU)
        self.trained_attn_sq = 0
        self.nonfinite = None          # device bool tensor: any non-finite loss since the last optimizer step
        self.pause_seconds = 0.0       # time spent evaluating and saving, left out of tokens/s and the ETA
        # out-of-memory recovery (core.train.recovery): inside a forward/backward pass right now, and the RNG as
        # the current optimizer step's first micro-batch found it
        self.in_micro_step = False
        self.probing = False           # the pre-flight probe's forward/backward (core.train.recovery.probe)
        self.rng_at_step_start: dict | None = None
        self._rng_step = -1
        self.group = distributed.is_rank_process()

    def _get_train_sampler(self, train_dataset=None):
        if self.group_by_length:
            return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                              train_dataset or self.train_dataset, self.args.seed, self)
        return super()._get_train_sampler(train_dataset)

    def _collate(self, rows):
        tokens, attn_sq = self.collator.tokens, self.collator.attn_sq
        batch = self.collator(rows)
        self.collated.append((self.collator.tokens - tokens, self.collator.attn_sq - attn_sq))
        return batch

    def count_batch(self) -> None:
        """The batch about to train, counted for tokens/s and MFU."""
        tokens, attn_sq = self.collated.popleft()  # this batch's counts: batches are trained in collation order
        self.trained_tokens += tokens
        self.trained_attn_sq += attn_sq

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.count_batch()
        step = self.state.global_step + 1
        self.ctx.step = step
        self.ctx.phase = "first step" if step == self._initial_global_step + 1 else "train"
        if self._rng_step != step:  # the first micro-batch of this optimizer step
            self._rng_step, self.rng_at_step_start = step, recovery.rng_state()
        if "slow" in self.faults and step >= self.faults["slow"]:
            time.sleep(SLOW_STEP_S)
        self.in_micro_step = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.in_micro_step = False
        kill_point(self.faults, "killstep", step)
        bad = ~torch.isfinite(loss)  # no .item() here: one sync per optimizer step is enough
        self.nonfinite = bad if self.nonfinite is None else (self.nonfinite | bad)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            rows = inputs["input_ids"].shape[0] if "input_ids" in inputs else 0
            if "oomeval" in self.faults and rows > self.faults["oomeval"]:
                raise torch.OutOfMemoryError(f"CUDA out of memory. (injected by {FAULT_ENV}: an evaluation batch of "
                                             f"{rows} rows, over {self.faults['oomeval']})")
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        oom = None
        try:
            out = self._loss(model, inputs, return_outputs, num_items_in_batch)
        except (torch.OutOfMemoryError, MemoryError) as e:
            oom = e
        # several processes: one decision before the backward pass's all-reduce, so every rank retries together
        # with the same smaller settings instead of the others waiting in a collective the failed rank never joins
        if self.group and distributed.stop_agreed(oom is not None) and oom is None:
            raise torch.OutOfMemoryError(f"another rank ran out of memory at step {self.state.global_step + 1}")
        if oom is not None:
            raise oom
        return out

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        step = self.state.global_step + 1
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # the injected out of memory comes at the end of the forward pass, as a real one in the forward would:
        # after DDP's own collectives of the forward (its buffer broadcast), which every rank must have joined
        if self.probing and self.faults.get("oomprobe") == 0:
            self.faults.pop("oomprobe")  # fires once: the probe at the smaller settings fits
            raise torch.OutOfMemoryError(f"CUDA out of memory. (injected by {FAULT_ENV} in the pre-flight probe)")
        if model.training and not self.probing and (self.faults.get("oom") == step or self.faults.get("oomall") == step):
            self.faults.pop("oom", None)  # "oom" fires once: the retry of that step fits
            raise torch.OutOfMemoryError(f"CUDA out of memory. (injected by {FAULT_ENV} at step {step})")
        width = inputs["input_ids"].shape[-1] if "input_ids" in inputs else 0
        if model.training and "oomlong" in self.faults and width > self.faults["oomlong"]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. (injected by {FAULT_ENV}: a batch of {width} tokens "
                                         f"a row, over {self.faults['oomlong']}, at step {step})")
        if "nan" in self.faults and self.state.global_step + 1 >= self.faults["nan"] and model.training:
            if return_outputs:
                return out[0] * float("nan"), out[1]
            return out * float("nan")
        return out

    def evaluate(self, *args, **kwargs):
        phase = self.ctx.phase
        self.ctx.phase = phase if phase == "final eval" else "eval"
        t0 = time.time()
        waiting = len(self.collated)   # the train batch collated ahead stays; the eval batches' counts go
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            while len(self.collated) > waiting:
                self.collated.pop()
            self.pause_seconds += time.time() - t0
            self.ctx.phase = phase

    def _save_checkpoint(self, model, trial):
        phase, self.ctx.phase, t0 = self.ctx.phase, "save", time.time()
        super()._save_checkpoint(model, trial)
        self.ctx.phase = phase
        self.pause_seconds += time.time() - t0

    def save_now(self) -> None:
        """A checkpoint of the last completed optimizer step from outside the training loop (out-of-memory
        recovery): the same files, and the same COMPLETE marker through the callback, as a scheduled save."""
        self._save_checkpoint(self.model, trial=None)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _save_optimizer_and_scheduler(self, output_dir):
        # runs after the adapter weights are written: the right moment to leave a partial checkpoint behind
        step = self.state.global_step
        if self.faults.get("killsave") == step:
            print(f"{FAULT_ENV}: SIGKILL in the middle of saving checkpoint-{step}", file=sys.stderr, flush=True)
            portable.kill_tree(os.getpid())
        if self.faults.get("disk") == step:
            raise OSError(28, f"No space left on device (injected by {FAULT_ENV})", output_dir)
        super()._save_optimizer_and_scheduler(output_dir)


class GarageCallback(TrainerCallback):
    """Writes one metrics event per log step, eval and sample events, status updates; marks checkpoints
    COMPLETE and rotates them; honours stop requests; stops after nan_patience non-finite losses in a row."""

    def __init__(self, run_dir: Path, cfg, events: ev.EventLog, stop: StopFlag, device: str, tokenizer,
                 memory=None):
        self.run_dir, self.cfg, self.events, self.stop, self.device = Path(run_dir), cfg, events, stop, device
        self.tokenizer = tokenizer
        self.trainer: GarageTrainer | None = None   # set by the builder right after the trainer exists
        self.nan_steps: list[int] = []              # the current run of consecutive non-finite steps
        self.diverged_at: list[int] | None = None
        self.stop_announced = False
        self.step_times: deque = deque(maxlen=20)
        self._status_t = 0.0
        # the metrics events' "mem": hardware.GpuProcessMemory.reading on CUDA, the process RSS on the CPU
        self.memory = memory or hardware.process_rss_reading
        self.flops: FlopsModel | None = None      # set by the builder on CUDA: adds "mfu" to the metrics events
        self.grads_checked = False
        # several processes: rank 0 alone writes the run folder; stop, NaN skips and saves are agreed by all ranks
        self.main = distributed.is_main()
        self.group = distributed.is_rank_process()

    def _status(self, only_from=None, **fields):
        if self.main:
            runs.update_status(self.run_dir, only_from, **fields)

    # ---------------------------------------------------------------- start
    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last_t = time.time()
        self.last_tokens = self.trainer.trained_tokens
        self.last_attn_sq = self.trainer.trained_attn_sq
        self.last_pause = self.trainer.pause_seconds
        self.last_step = state.global_step
        if state.global_step > 0:
            self.events.resume(state.global_step)
        self._status(step=state.global_step, total_steps=state.max_steps)
        checkpointing = "on" if getattr(kw.get("model"), "is_activation_checkpointing", False) else "off"
        print(f"training steps {state.global_step + 1}-{state.max_steps}, activation checkpointing {checkpointing}",
              flush=True)

    # ---------------------------------------------------------------- every optimizer step
    def on_pre_optimizer_step(self, args, state, control, **kw):
        bad = self.trainer.nonfinite is not None and bool(self.trainer.nonfinite)
        if self.group:  # every rank skips the same update, or the replicas drift apart
            bad = distributed.stop_agreed(bad)
        self.trainer.nonfinite = None
        if not bad:
            self.nan_steps = []
            if not self.grads_checked:  # the first update of this process, before it touches any weight
                self.grads_checked = True
                check_gradients_flow(kw["model"], finite=not args.fp16)
            return
        # skip the update: Adam would turn the weights into NaN, and the last good weights are worth keeping
        kw["optimizer"].zero_grad(set_to_none=True)
        self.nan_steps.append(state.global_step + 1)
        msg = f"step {state.global_step + 1}: the loss is NaN/inf; update skipped ({len(self.nan_steps)}/{self.cfg.train.nan_patience})"
        print(msg, file=sys.stderr, flush=True)
        self.events.log("warning", msg)
        if len(self.nan_steps) >= self.cfg.train.nan_patience:
            self.diverged_at = list(self.nan_steps)

    def on_step_end(self, args, state, control, **kw):
        if self.diverged_at is not None:
            control.should_training_stop = True
            control.should_save = False
            return control
        if self.nan_steps:
            control.should_save = False  # never store a checkpoint on a step whose loss was not finite
        if self.group:  # rank 0 heard the Stop; every rank stops at this same step, so none waits in a collective
            self.stop.requested = distributed.stop_agreed(self.stop.requested)
        if self.stop.requested:
            if not self.stop_announced:
                self.stop_announced = True
                self._status(("running", "queued"), state="stopping")
                self.events.log("info", f"stop requested: saving a checkpoint at step {state.global_step}")
            control.should_save = True
            control.should_training_stop = True
        return control

    # ---------------------------------------------------------------- logging
    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.time()
        paused = self.trainer.pause_seconds - self.last_pause
        dt = max(now - self.last_t - paused, 1e-9)
        steps = max(state.global_step - self.last_step, 1)
        tokens = self.trainer.trained_tokens - self.last_tokens
        self.step_times.extend([dt / steps] * min(steps, 20))
        remaining = max(state.max_steps - state.global_step, 0)
        eta = remaining * (sum(self.step_times) / len(self.step_times))
        mem = self.memory()
        if self.group:  # every rank's memory and tokens, on rank 0: tokens/s is the whole group's
            per_rank = distributed.gather((mem, tokens))
            if not self.main:
                self._logged(now, state)
                return
            mem = {**mem, ev.MEM_RANKS: [m for m, _ in per_rank]}
            tokens = sum(n for _, n in per_rank)
        event = self.events.metrics(
            step=state.global_step, epoch=round(state.epoch or 0.0, 4), loss=_num(logs.get("loss")),
            lr=_num(logs.get("learning_rate")), grad_norm=_num(logs.get("grad_norm")),
            tokens_per_s=round(tokens / dt, 1), elapsed=round(now - self.t0, 2), eta_s=round(eta, 1),
            mem=mem,
            mfu=None if self.flops is None else self.flops.mfu(tokens, self.trainer.trained_attn_sq - self.last_attn_sq, dt))
        self._logged(now, state)
        self.trainer.ctx.timeline.mark("first step")  # the first chart point ends the start-up timeline
        print(f"step {state.global_step}/{state.max_steps}  loss {event[ev.LOSS]:.4f}  lr {event[ev.LR] or 0:.2e}  "
              f"{event[ev.TOKENS_PER_S]:.0f} tok/s  eta {eta:.0f} s", flush=True)
        if (now - self._status_t > 2.0 or remaining == 0) and self.main:  # for the runs list: not needed per step
            self._status_t = now
            runs.write_status(self.run_dir, step=state.global_step, durable=False,
                              **{run_eta.OTHERS_LOAD: run_eta.others_load(torch.get_num_threads())})

    def _logged(self, now: float, state) -> None:
        self.last_t, self.last_tokens, self.last_step = now, self.trainer.trained_tokens, state.global_step
        self.last_attn_sq = self.trainer.trained_attn_sq
        self.last_pause = self.trainer.pause_seconds

    def on_train_end(self, args, state, control, **kw):
        self._status(step=state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics = metrics or {}
        self.events.eval(state.global_step, _num(metrics.get("eval_loss")))

    # ---------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kw):
        t0 = time.time()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.barrier()  # every rank has written its part (its RNG state) before the marker says complete
        if self.main:
            mark_complete(ckpt, {"step": state.global_step, "epoch": state.epoch, "t": t0})
            runs.write_status(self.run_dir, last_checkpoint=ckpt.name)
            self._rotate()
            if self.cfg.train.sample_prompts:
                self._samples(kw["model"], state.global_step)
        distributed.barrier()  # no rank reads the checkpoints folder while rank 0 rotates it
        self.trainer.pause_seconds += time.time() - t0

    def _rotate(self):
        """Keep the last save_total_limit marked checkpoints. Only marked ones count, and the newest is marked
        before anything older is deleted, so a crash here never leaves zero good checkpoints."""
        for old in runs.checkpoints(self.run_dir)[:-self.cfg.train.save_total_limit]:
            try:
                shutil.rmtree(old)
            except OSError as e:
                msg = f"could not delete old checkpoint {old.name}: {e}"
                print(msg, file=sys.stderr, flush=True)
                self.events.log("warning", msg)

    def _samples(self, model, step):
        was_training = model.training
        model.eval()
        try:
            for prompt in self.cfg.train.sample_prompts:
                text = generate_sample(model, self.tokenizer, prompt)
                self.events.sample(step, prompt, text)
        finally:
            model.train(was_training)


def gradient_problems(model, finite: bool = True) -> list[str]:
    """What is wrong with the gradients of the trainable tensors right after a backward pass: "name: no gradient",
    "name: all zero", "name: not finite". A LoRA A matrix whose B is still all zero (peft's initialisation) gets
    a zero gradient by construction, so it is not a problem. With fp16 loss scaling an inf gradient only makes the
    scaler skip the step, so `finite=False` leaves that to the NaN bookkeeping."""
    params = dict(model.named_parameters())
    out = []
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if p.grad is None:
            out.append(f"{name}: no gradient")
        elif finite and not bool(torch.isfinite(p.grad).all()):
            out.append(f"{name}: not finite")
        elif not bool(p.grad.any()):
            partner = params.get(name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B"))
            if partner is None or partner is p or bool(partner.detach().any()):
                out.append(f"{name}: all zero")
    return out


def check_gradients_flow(model, finite: bool = True) -> None:
    """The preflight before the first update: every trainable tensor got a finite, non-zero gradient. A base that
    passes no gradient back through some layers (a wrong kernel, a detached input) fails here, naming them, before
    a single weight has moved, instead of training a useless adapter for hours."""

    problems = gradient_problems(model, finite)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RunError(f"gradients do not reach {len(problems)} trainable tensors at the first step: {shown}",
                       "no weight was changed. This is a bug in a kernel or in the model code: see train.log and "
                       "report it with `python -m core doctor`; a different quant.method may train meanwhile")
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    print(f"gradients flow: all {trainable} trainable tensors got a finite, non-zero gradient at the first step",
          flush=True)


class FlopsModel:
    """Model FLOPs utilisation: the FLOPs a step must do (not what recomputation adds) over the GPU's peak.
    LoRA trains no base weights, so a token costs ~4N FLOPs in the base linears (2N forward, 2N for the gradient
    w.r.t. the activations; no weight gradients), N = base parameters excluding the input embedding lookup.
    Causal attention adds, per example of length L and per layer, 2*d*L^2 forward (QK^T and AV, half the square)
    and twice that backward: 6*d*L^2. peak: dense bf16 tensor FLOP/s from core.estimate.gpu_specs (vendor spec
    sheets); an unknown GPU gets no MFU rather than a made-up one."""

    def __init__(self, params: int, layers: int, hidden: int, peak: float):
        self.params, self.layers, self.hidden, self.peak = params, layers, hidden, peak

    @classmethod
    def for_model(cls, model, gpu_name: str) -> "FlopsModel | None":
        peak = peak_bf16(gpu_name)
        if peak is None:
            return None
        config = model.config
        embed = model.get_input_embeddings().weight
        tied = bool(getattr(config, "tie_word_embeddings", False))
        n = 0
        for p in model.parameters():
            if p is embed and not tied:
                continue  # a lookup, not a matmul (when tied it is also the lm_head, which is one)
            # bitsandbytes 4-bit weights are stored two to a byte: numel() is half the real count
            n += p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        return cls(n, int(config.num_hidden_layers), int(config.hidden_size), peak)

    def mfu(self, tokens: int, attn_sq: int, seconds: float) -> float:
        flops = 4 * self.params * tokens + 6 * self.layers * self.hidden * attn_sq
        return round(flops / max(seconds, 1e-9) / self.peak, 4)


def mark_complete(ckpt: Path, info: dict) -> None:
    """fsync every file of the checkpoint, then write COMPLETE (tmp + rename), then fsync the folder: after a
    crash, COMPLETE exists only if everything before it is on disk."""
    for f in ckpt.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    tmp = ckpt / f".{runs.COMPLETE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(info))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / runs.COMPLETE)
    fd = os.open(ckpt, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _num(x):
    if x is None:
        return None
    x = float(x.item() if hasattr(x, "item") else x)
    return x  # NaN/inf are kept as such: json writes NaN, and the UI must see them
