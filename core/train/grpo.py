"""GRPO in the training child: TRL's GRPOTrainer with the run's rewards (core.train.rewards), inside the same run
folder, callback, stop / resume and checkpoints as SFT (core/train/child.py calls in here for train.objective grpo).

- train.batch_size counts prompts; each is sampled train.grpo_generations times, so a device step holds
  batch_size x generations completions (TRL's per_device_train_batch_size).
- The prompts come rendered and checked from core.data.prompts, so what Inspect showed is what the model is given;
  they are tokenised here without special tokens added (the template holds them).
- The reference for the KL term (train.grpo_beta > 0) is the base with the adapter disabled, as for DPO; with
  beta 0 no reference forward runs at all (TRL's default).
- TRL's logged metrics become the events' GRPO fields (core.events GRPO_FIELDS); at each checkpoint the latest
  completions and their rewards become a `completions` event.

Imported only inside the child process.
"""

from __future__ import annotations

import functools

from core import events as ev
from core.train.callbacks import GarageCallback, GarageTrainer

# TRL's log keys -> our fields
TRL_KEYS = {"reward": ev.REWARD, "reward_std": ev.REWARD_STD, "completions/mean_length": ev.COMPLETION_LEN,
            "completions/clipped_ratio": ev.CLIPPED_RATIO, "kl": ev.KL, "entropy": ev.ENTROPY,
            "frac_reward_zero_std": ev.ZERO_STD_RATIO}
SAMPLES_PER_CHECKPOINT = 4
HIDDEN_COLUMNS = ("prompt_ids",)  # in the prepared rows for the stats; not a column the rewards see
REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pretrained adapter


def args_class(cfg, rewards: list):
    """TRL's GRPOConfig with the run's GRPO settings bound (used like TrainingArguments)."""
    from trl import GRPOConfig  # heavy

    t = cfg.train
    return functools.partial(GRPOConfig, num_generations=t.grpo_generations,
                             max_completion_length=t.grpo_max_completion, beta=t.grpo_beta,
                             temperature=t.grpo_temperature, loss_type=t.grpo_loss,
                             reward_weights=[r.weight for r in rewards], remove_unused_columns=False,
                             log_completions=False, shuffle_dataset=True)


def per_device_batch(cfg, batch_size: int) -> int:
    """TRL's per_device_train_batch_size: completions per device step (prompts x generations)."""
    return batch_size * cfg.train.grpo_generations


def dataset(rows):
    """The prompts as a datasets.Dataset, every reward column of one type (mixed int / text columns become text,
    which the answer reward still compares as numbers)."""
    from datasets import Dataset  # heavy

    names = sorted({k for r in rows for k in r if k not in HIDDEN_COLUMNS})
    table = {k: [r.get(k) for r in rows] for k in names}
    for k, values in table.items():
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1:
            table[k] = [None if v is None else str(v) for v in values]
    return Dataset.from_dict(table)


def _grpo_class():
    from trl import GRPOTrainer  # heavy

    class GarageGRPOTrainer(GarageTrainer, GRPOTrainer):
        """GRPOTrainer with GarageTrainer's phases, NaN bookkeeping and faults. Its batches are generation batches
        of rows (TRL's own sampler and identity collator); tokens/s counts prompt + completion tokens."""

        def __init__(self, *args, ctx, faults, **kwargs):
            GRPOTrainer.__init__(self, *args, **kwargs)  # GarageTrainer.__init__ passes a collator GRPO has none of
            self.setup_garage(ctx, None, False, faults)

        def count_batch(self) -> None:
            pass  # counted per generation in _generate_and_score_completions

        def _tokenize_prompts(self, prompts: list):
            # the prompts are rendered by core.data.prompts with every special token the template writes
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

        def _generate_and_score_completions(self, inputs):
            phase, self.ctx.phase = self.ctx.phase, "generate"
            out = super()._generate_and_score_completions(inputs)
            self.ctx.phase = phase
            n = int(out["prompt_mask"].sum().item() + out["completion_mask"].sum().item())
            self.trained_tokens += n
            lengths = out["prompt_mask"].sum(1) + out["completion_mask"].sum(1)
            self.trained_attn_sq += int((lengths * lengths).sum().item())
            return out

    return GarageGRPOTrainer


class GrpoEvents:
    """The run's EventLog, adding the GRPO fields of the TRL log being handled to the metrics event."""

    def __init__(self, inner: ev.EventLog):
        self.inner = inner
        self.extra: dict = {}

    def metrics(self, **kw) -> dict:
        return self.inner.metrics(**kw, extra=self.extra)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class GrpoCallback(GarageCallback):
    """GarageCallback plus: GRPO's metrics on each log, the latest completions at each checkpoint, and the
    first-update gradient check deferred to a step where some group's rewards differed (when every completion
    of every group scored the same, the advantages are 0 and so, rightly, is every gradient)."""

    reward_names: list[str] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.extra = grpo_fields(logs or {}, self.reward_names)
        return super().on_log(args, state, control, logs=logs, **kw)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if not self.grads_checked and zero_signal(self.trainer):
            self.grads_checked = True  # not this step: no group had a signal, so every gradient is rightly 0
            try:
                return super().on_pre_optimizer_step(args, state, control, **kw)
            finally:
                self.grads_checked = False
        return super().on_pre_optimizer_step(args, state, control, **kw)

    def on_save(self, args, state, control, **kw):
        result = super().on_save(args, state, control, **kw)
        if self.main:
            items = latest_completions(self.trainer, SAMPLES_PER_CHECKPOINT)
            if items:
                self.events.completions(state.global_step, items)
        return result


def zero_signal(trainer) -> bool:
    """True when every group of the latest generation had rewards all equal (nothing to learn from it)."""
    values = trainer._metrics["train"].get("frac_reward_zero_std") or []
    return bool(values) and values[-1] >= 1.0


def grpo_fields(logs: dict, names: list[str]) -> dict:
    out = {}
    for key, field in TRL_KEYS.items():
        value = logs.get(key)
        if value is not None:
            out[field] = float(value)
    per = {name: float(logs[f"rewards/{name}/mean"]) for name in names if logs.get(f"rewards/{name}/mean") is not None}
    if per:
        out[ev.REWARDS] = per
    return out


def latest_completions(trainer, n: int) -> list[dict]:
    """The last n completions TRL kept (its _logs, sized to one generation batch), with each reward."""
    logs = trainer._logs
    prompts, completions = list(logs["prompt"]), list(logs["completion"])
    if not completions:
        return []
    names = list(logs["rewards"])
    weights = trainer.reward_weights.tolist()
    items = []
    for i in range(max(0, len(completions) - n), len(completions)):
        parts = {name: float(logs["rewards"][name][i]) for name in names}
        total = sum(w * parts[name] for w, name in zip(weights, names))
        items.append({ev.PROMPT: str(prompts[i]), ev.COMPLETION: str(completions[i]), ev.REWARDS: parts,
                      ev.REWARD: round(total, 4)})
    return items


def build_trainer(run_dir, cfg, model, tokenizer, prepared, device, events, stop, ctx, faults, args, rewards,
                  memory=None):
    """The GRPO trainer and its callback; `args` is args_class(cfg, rewards)(...), `rewards` core.train.rewards.build."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback  # heavy

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    callback = GrpoCallback(run_dir, cfg, GrpoEvents(events), stop, device, tokenizer, memory=memory)
    callback.reward_names = [r.name for r in rewards]
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    cls = _grpo_class()
    trainer = cls(model=model, reward_funcs=list(rewards), args=args, train_dataset=dataset(prepared.train),
                  processing_class=tokenizer, callbacks=[callback], ctx=ctx, faults=faults)
    if not cfg.train.from_run and REF_ADAPTER in model.peft_config:
        # a fresh adapter: TRL copied it as "ref"; its B is zero, so the reference is the base. Without the copy TRL
        # disables the adapter for the reference forward instead (the base itself, nothing copied).
        model.delete_adapter(REF_ADAPTER)
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:  # the adapter stays in the dtype add_lora chose
            p.data = p.data.to(dtypes[name])
    t = cfg.train
    reference = "the base with the adapter disabled" if t.grpo_beta > 0 else "none (grpo_beta 0: no KL term)"
    msg = (f"objective grpo: {t.grpo_generations} completions per prompt, up to {t.grpo_max_completion} tokens, "
           f"temperature {t.grpo_temperature}, loss {t.grpo_loss}, beta {t.grpo_beta}; reference {reference}; "
           f"rewards " + ", ".join(f"{r.name} x{r.weight:g}" for r in rewards))
    print(msg, flush=True)
    events.log("info", msg)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    callback.trainer = trainer
    return trainer, callback

