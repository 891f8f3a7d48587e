"""Preference tuning in the training child: DPO and ORPO with TRL's own trainers, inside the same run folder,
callback, stop / resume and checkpoints as SFT (core/train/child.py calls in here when train.objective is not sft).

- DPO: trl.DPOTrainer. The reference is the policy with its LoRA adapter disabled (peft's disable_adapter): no
  second copy of the model, on a 4-bit base too. Continuing from a finished run's adapter, the reference is a
  frozen copy of that adapter (TRL's "ref" adapter, adapter-sized): the SFT model is what DPO measures against.
- ORPO: trl.experimental.orpo.ORPOTrainer (no reference; SFT loss on the chosen reply + lambda * odds-ratio term).
- Rows come tokenised from core.data.pref (prompt_ids / chosen_ids / rejected_ids), so the trainers' own
  tokenisation is skipped: what the preview showed is what trains.
- TRL's logged metrics become the events' preference fields (core.events PREFERENCE_FIELDS).

Imported only inside the child process.
"""

from __future__ import annotations

import functools
import sys

import torch

from core import events as ev
from core.train.callbacks import GarageCallback, GarageTrainer
from core.errors import ConfigError
from core.runs import folder as runs
from core.runs import resolve as run_files

# TRL's log keys (DPOTrainer.log / ORPOTrainer.store_metrics; "eval_" in front during evaluation) -> our fields
TRL_KEYS = {"rewards/chosen": ev.REWARD_CHOSEN, "rewards/rejected": ev.REWARD_REJECTED,
            "rewards/margins": ev.REWARD_MARGIN, "rewards/accuracies": ev.PREF_ACCURACY}
REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pretrained adapter


def args_class(cfg):
    """TRL's config class for the objective, with its settings bound (used like TrainingArguments)."""
    t = cfg.train
    if t.objective == "dpo":
        from trl import DPOConfig  # heavy

        # max_length=None: core.data.pref already cut every pair to data.max_len
        return functools.partial(DPOConfig, beta=t.dpo_beta, loss_type=[t.dpo_loss], max_length=None,
                                 precompute_ref_log_probs=False, dataset_num_proc=None)
    from trl.experimental.orpo import ORPOConfig  # heavy

    return functools.partial(ORPOConfig, beta=t.orpo_lambda, max_length=cfg.data.max_len)


# ---------------------------------------------------------------- the adapter to train

def continue_adapter(model, cfg):
    """The finished run's adapter (train.from_run), trainable, on the base already loaded."""
    from peft import PeftModel  # heavy

    src = run_files.resolve_run(cfg.train.from_run)
    if not run_files.has_adapter(src):
        raise ConfigError("train.from_run", f"run {src.name} has no final adapter (it did not complete)",
                          "continue from a completed run, or leave train.from_run empty to start from the base")
    trained_on = runs.load_config(src).model.source
    if not run_files.same_source(trained_on, cfg.model.source):
        raise ConfigError("train.from_run", f"run {src.name} trained an adapter for {trained_on}, not {cfg.model.source}",
                          f"set model.source={trained_on}, or pick a run trained on this model")
    run_files.check_adapter(model, src / "adapter", loaded_source=cfg.model.source, trained_on=trained_on)
    model = PeftModel.from_pretrained(model, str(src / "adapter"), is_trainable=True)
    print(f"continuing from run {src.name}'s adapter (its LoRA shape is kept; lora.* settings are not used)",
          flush=True)
    return model


# ---------------------------------------------------------------- batches

class PairCollator:
    """TRL's collator for the objective, counting real tokens (both sequences of every pair) and the sum of
    squared lengths, as core.train.collate's collators do for tokens/s and MFU."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0
        self.attn_sq = 0

    def __call__(self, rows):
        for row in rows:
            p = len(row["prompt_ids"])
            for side in ("chosen_ids", "rejected_ids"):
                n = p + len(row[side])
                self.tokens += n
                self.attn_sq += n * n
        return self.inner(rows)


def _orpo_row(feature, model=None) -> dict:
    """ORPOTrainer.tokenize_row for rows already tokenised by core.data.pref."""
    p, c, r = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
    return {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p),
            "chosen_input_ids": p + c, "chosen_attention_mask": [1] * (len(p) + len(c)),
            "chosen_labels": [-100] * len(p) + c,
            "rejected_input_ids": p + r, "rejected_attention_mask": [1] * (len(p) + len(r)),
            "rejected_labels": [-100] * len(p) + r}


# ---------------------------------------------------------------- trainers

def _dpo_class():
    from trl import DPOTrainer  # heavy

    class GarageDPOTrainer(GarageTrainer, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenised and checked by core.data.pref

    return GarageDPOTrainer


def _orpo_class():
    from trl.experimental.orpo import ORPOTrainer  # heavy

    class GarageORPOTrainer(GarageTrainer, ORPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_dpo_data_collator = True  # PairCollator wraps TRL's DPODataCollatorWithPadding

        def tokenize_row(self, feature, model=None):
            return _orpo_row(feature, model)

    return GarageORPOTrainer


class PreferenceEvents:
    """The run's EventLog, adding the preference fields of the TRL log being handled to the metrics / eval
    event GarageCallback writes for it."""

    def __init__(self, inner: ev.EventLog):
        self.inner = inner
        self.extra: dict = {}

    def metrics(self, **kw) -> dict:
        return self.inner.metrics(**kw, extra=self.extra)

    def eval(self, step, eval_loss, **kw) -> None:
        self.inner.eval(step, eval_loss, extra=self.extra)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class PreferenceCallback(GarageCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        self.events.extra = preference_fields(logs or {}, "")
        return super().on_log(args, state, control, logs=logs, **kw)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.extra = preference_fields(metrics or {}, "eval_")
        return super().on_evaluate(args, state, control, metrics=metrics, **kw)


def preference_fields(logs: dict, prefix: str) -> dict:
    out = {}
    for key, field in TRL_KEYS.items():
        value = logs.get(prefix + key)
        if value is not None:
            out[field] = float(value.item() if hasattr(value, "item") else value)
    return out


def build_trainer(run_dir, cfg, model, tokenizer, prepared, device, events, stop, ctx, faults, args, memory=None):
    """The DPO / ORPO trainer and its callback; `args` is the objective's TRL config (args_class)."""
    from datasets import Dataset  # heavy
    from transformers.trainer_callback import PrinterCallback, ProgressCallback  # heavy

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = Dataset.from_list(list(prepared.train))
    evals = Dataset.from_list(list(prepared.eval)) if prepared.eval else None
    callback = PreferenceCallback(run_dir, cfg, PreferenceEvents(events), stop, device, tokenizer, memory=memory)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    if cfg.train.objective == "dpo":
        from trl.trainer.dpo_trainer import DataCollatorForPreference  # heavy

        collator = PairCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id))
        cls = _dpo_class()
    else:
        from trl.experimental.utils import DPODataCollatorWithPadding  # heavy

        collator = PairCollator(DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id))
        cls = _orpo_class()
    trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                  callbacks=[callback], ctx=ctx, collator=collator, group_by_length=False, faults=faults)
    if cfg.train.objective == "dpo" and not cfg.train.from_run and REF_ADAPTER in model.peft_config:
        # a fresh adapter: TRL copied it as "ref"; its B is zero, so the reference is the base. Dropping the copy
        # makes TRL disable the adapter for the reference forward instead (the base itself, nothing copied).
        model.delete_adapter(REF_ADAPTER)
    for name, p in model.named_parameters():
        # TRL casts a 4-bit base's adapter to bf16; ours stays in the dtype add_lora chose (fp32 with AdamW)
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    reference = {"dpo": "the base with the adapter disabled" if not cfg.train.from_run
                 else f"a frozen copy of run {cfg.train.from_run}'s adapter", "orpo": "none (ORPO)"}
    msg = (f"objective {cfg.train.objective}: reference model {reference[cfg.train.objective]}; "
           + (f"beta {cfg.train.dpo_beta}, loss {cfg.train.dpo_loss}" if cfg.train.objective == "dpo"
              else f"lambda {cfg.train.orpo_lambda}"))
    print(msg, flush=True)
    events.log("info", msg)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    callback.trainer = trainer
    return trainer, callback


def reference_logits(trainer, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of the model DPO uses as its reference, exactly as DPOTrainer reaches it (test hook)."""
    from trl.trainer.utils import use_adapter  # heavy

    model = trainer.accelerator.unwrap_model(trainer.model)
    name = REF_ADAPTER if REF_ADAPTER in model.peft_config else None
    with torch.no_grad(), use_adapter(model, adapter_name=name):
        return model(input_ids=input_ids).logits


def drop_reference(model) -> None:
    """Before the final save: the adapter folder holds the trained adapter only."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
        print("dropped the frozen reference adapter before saving", file=sys.stderr, flush=True)
