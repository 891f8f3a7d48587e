"""RunConfig: every setting of a run, with a default and a help string.

Validation raises ConfigError naming the dotted field (`lora.r`) and the fix. YAML load/save round-trips, and
`apply_overrides(cfg, ["lora.r=32"])` handles the CLI's `--set`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from core.errors import ConfigError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # lora.targets=attention
TARGET_CHOICES = ("all-linear", "attention")
METHODS = ("lora", "qlora", "8bit")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# train.optimizer -> the name transformers' TrainingArguments.optim takes. adamw is torch's fused AdamW
# (transformers' own default on torch >= 2.8): one kernel for all parameters, measured ~3 ms/step faster than the
# for-each version on the tiny model on CPU
OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
STRATEGIES = ("auto", "single", "ddp", "fsdp")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICE_KINDS = ("auto", "cuda", "mps", "cpu")  # core.hardware.pick_device's choices
OBJECTIVES = ("sft", "dpo", "orpo", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")  # trained on chosen / rejected pairs
# train.grpo_loss: TRL's GRPOConfig.loss_type values that need no extra settings
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
# train.dpo_loss: TRL's DPO loss types that need nothing beyond beta (DPOConfig.loss_type)
# train.oom_recovery: what the child may change by itself when a step runs out of memory (core.train.recovery)
OOM_RECOVERY = ("auto", "auto+shorten", "off")
SHORTEN_MIN_LEN = 32  # auto+shorten never halves data.max_len below this
PROBES = ("auto", "on", "off")  # train.probe: auto = on for a GPU, off for the CPU
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sigmoid_norm")
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # as core.data.turns.PLACEHOLDER reads them
RUN_NAME_MAX = 100


def _f(default, help: str, choices=None):
    """A dataclass field with a help string (and optional choices) in its metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    source: str = _f("builtin:smollm2-135m", "Base model: builtin:smollm2-135m, a hub id, a local folder, or a .gguf file.")
    trust_remote_code: bool = _f(False, "Run the model's own Python code. Only for models you trust.")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa (default), eager, or flash_attention_2.",
                                  ATTN_IMPLEMENTATIONS)
    liger_kernel: bool = _f(False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, linear + cross-entropy) on "
                                   "a CUDA GPU: less memory, faster steps. Needs pip install liger-kernel; off on CPU.")


@dataclass
class DataConfig:
    source: str = _f("builtin:demo-identity", "Dataset: a file, a folder, a hub id, or builtin:demo-identity.")
    format: str = _f("auto", "Row format; auto detects it.",
                     ("auto", "messages", "sharegpt", "alpaca", "pairs", "text"))
    columns: dict = _f({}, "Column mapping override, e.g. {prompt: question, response: answer}.")
    split: str = _f("train", "Split to read from a hub dataset.")
    subset: str = _f("", "Subset (config name) of a hub dataset.")
    max_len: int = _f(512, "Maximum tokens per example (the cutoff).")
    overlong: str = _f("truncate", "What to do with rows over max_len.", ("truncate", "drop"))
    train_on: str = _f("assistant", "Which tokens carry the loss.", ("assistant", "all"))
    packing: bool = _f(False, "Pack several short examples into one sequence.")
    padding_free: bool = _f(True, "Batches without padding: rows laid end to end, kept apart by position_ids "
                                  "(falls back to padded, length-grouped batches where the model cannot keep them apart).")
    val_fraction: float = _f(0.0, "Share of rows held out for evaluation (0 = none, unless val_source is set).")
    val_source: str = _f("", "A separate file for evaluation (overrides val_fraction).")
    limit: int = _f(0, "Use only the first N rows (0 = all).")
    system: str = _f("", "System prompt for rows that have none: empty keeps the chat template's default (some "
                         "templates add one, e.g. SmolLM2's \"You are a helpful AI assistant named SmolLM\"), text "
                         "replaces it, none removes it (an empty system turn). Chat uses the same.")
    fill: dict = _f({}, "Values for {{placeholders}} in the data, e.g. {name: Garage, author: Ann}: each {{name}} "
                        "is replaced before training (Inspect lists the placeholders a file has).")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank: size of the low-rank update. Higher learns more, costs more memory.")
    alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha/r.")
    dropout: float = _f(0.05, "Dropout on the LoRA input, 0 to 1.")
    targets: str = _f("all-linear", "Layers to adapt: all-linear, attention, or a comma list like q_proj,v_proj.")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (slower, sometimes better).")


@dataclass
class QuantConfig:
    method: str = _f("lora", "lora: 16-bit base; qlora: 4-bit base; 8bit: 8-bit base.", METHODS)
    quant_type: str = _f("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = _f("auto", "Compute dtype: auto = bf16 where supported, else fp16; fp32 on CPU.", DTYPES)


@dataclass
class TrainConfig:
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1 = use epochs).")
    epochs: float = _f(1.0, "Passes over the data (used when max_steps is -1).")
    batch_size: int = _f(1, "Examples per device step.")
    grad_accum: int = _f(1, "Steps accumulated per optimizer step (effective batch = batch_size * grad_accum).")
    lr: float = _f(2e-4, "Peak learning rate.")
    scheduler: str = _f("cosine", "Learning-rate schedule.", SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    optimizer: str = _f("adamw", "Optimizer; 8-bit variants need bitsandbytes and save memory.", OPTIMIZERS)
    grad_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    chunked_loss: bool = _f(True, "Compute the loss over the sequence in tiles, recomputed in backward, so the "
                             "full fp32 [tokens x vocab] logits never exist (GBs on a large vocabulary). Off: "
                             "transformers' stock loss. Liger's fused loss takes over where it runs.")
    devices: str = _f("auto", "Where to train: auto (every visible GPU, else one CPU process), a count (2: two GPUs, "
                       "or on a machine without GPUs two CPU processes over gloo), or GPU indices (0,1).")
    device: str = _f("auto", "Which kind of device: auto (a CUDA GPU, else an Apple Silicon GPU (mps), else the CPU), "
                     "cuda, mps or cpu.", DEVICE_KINDS)
    strategy: str = _f("auto", "How several devices share the work: auto (one device: single; several: ddp when the "
                        "per-GPU estimate fits, fsdp for a 16-bit LoRA that only fits sharded), single, ddp, fsdp.",
                       STRATEGIES)
    seed: int = _f(42, "Random seed for data order and LoRA init.")
    logging_steps: int = _f(1, "Write a metrics event every N steps.")
    eval_steps: int = _f(0, "Evaluate every N steps (0 = only at the end, if there is eval data).")
    save_steps: int = _f(50, "Save a checkpoint every N steps.")
    save_total_limit: int = _f(2, "Keep only the last K checkpoints.")
    nan_patience: int = _f(3, "Stop after this many consecutive NaN/inf losses.")
    oom_recovery: str = _f("auto", "Out of memory in a step: auto halves the micro-batch and doubles grad_accum (same "
                                   "effective batch and learning-rate schedule) down to 1, then turns "
                                   "grad_checkpointing on, and carries on from the last optimizer step; each change "
                                   "is recorded and the saved config keeps the final settings. auto+shorten: then "
                                   "also halves data.max_len (not below 32 tokens; SFT only), cutting the rows "
                                   "longer than that, with the count said. off fails the run with suggestions "
                                   "instead.", OOM_RECOVERY)
    probe: str = _f("auto", "Pre-flight probe: before step 1, one forward and backward pass at the longest batch "
                            "the data will produce (no optimizer step), so an out of memory is recovered before "
                            "training rather than hours in; its measured peak goes into estimate.json. auto: on "
                            "for a GPU, off for the CPU. SFT only.", PROBES)
    report_at_end: bool = _f(True, "Make the run's report card (report.json: learned? side effects? health) when "
                                   "it ends with an adapter; off: made on first open instead.")
    sample_prompts: list = _f([], "Prompts to generate from at each checkpoint (events of type sample).")
    objective: str = _f("sft", "What to learn: sft (imitate the replies), dpo (prefer the chosen reply over the "
                               "rejected one, against the base as reference), orpo (the same without a reference: "
                               "SFT on the chosen reply plus an odds-ratio penalty). dpo and orpo need "
                               "chosen / rejected pairs.", OBJECTIVES)
    dpo_beta: float = _f(0.1, "DPO beta: how far the adapter may move from the reference. Lower moves further "
                              "(0.1 is common; 0.01 to 0.5).")
    dpo_loss: str = _f("sigmoid", "DPO loss type: sigmoid (the DPO paper), ipo, hinge, robust, apo_zero, apo_down, "
                                  "sigmoid_norm (length-normalised).", DPO_LOSSES)
    orpo_lambda: float = _f(0.1, "ORPO lambda: weight of the odds-ratio (preference) term against the SFT loss on "
                                 "the chosen reply (0.1 in the ORPO paper).")
    from_run: str = _f("", "Continue from this finished run's adapter (a run id or latest) instead of a fresh "
                           "adapter on the base: DPO then uses that adapter, frozen, as the reference.")
    grpo_generations: int = _f(4, "GRPO: completions sampled per prompt; each is scored against the others of its "
                                  "group (2 to 64). With GRPO, train.batch_size counts prompts per step.")
    grpo_max_completion: int = _f(128, "GRPO: the most tokens a sampled completion may have (longer ones are cut "
                                       "and counted as clipped).")
    grpo_beta: float = _f(0.0, "GRPO: weight of the KL penalty to the reference (the base with the adapter "
                               "disabled). 0 (TRL's default) runs no reference forward at all.")
    grpo_temperature: float = _f(1.0, "GRPO: sampling temperature of the completions (higher: more varied groups).")
    grpo_loss: str = _f("dapo", "GRPO: TRL's loss type: dapo (TRL's default: normalised over the tokens of the "
                                "whole batch), grpo (per sequence), dr_grpo, bnpo, cispo, sapo.", GRPO_LOSSES)


@dataclass
class RewardsConfig:
    """GRPO's reward functions (core.train.rewards): each one with a weight (0 = off); the total is their
    weighted sum."""
    format_weight: float = _f(0.0, "Weight of the format reward: 1 when the whole reply matches format_regex, 0.5 "
                                   "when the pattern is found inside a longer reply, else 0.")
    format_regex: str = _f("think-answer", "The format: think-answer (<think>...</think><answer>...</answer>), "
                                           "answer-tags (<answer>...</answer>), or your own regular expression.")
    answer_weight: float = _f(0.0, "Weight of the answer reward: 1 when the text in <answer></answer> (else the "
                                   "reply's last number) equals the row's answer column; numbers compared as numbers.")
    answer_column: str = _f("answer", "The data column the answer reward compares against (answer, solution, or "
                                      "any column of the file).")
    contains_weight: float = _f(0.0, "Weight of the contains reward: the share of the phrases in contains that the "
                                     "reply holds (case-insensitive).")
    contains: list = _f([], "Phrases the reply should hold (contains reward).")
    not_contains_weight: float = _f(0.0, "Weight of the not_contains reward: 1 minus the share of the phrases in "
                                         "not_contains that the reply holds.")
    not_contains: list = _f([], "Phrases the reply should not hold (not_contains reward).")
    length_weight: float = _f(0.0, "Weight of the length reward: 1 inside [length_min, length_max] tokens, falling "
                                   "linearly to 0 at twice the range's distance outside it.")
    length_min: int = _f(0, "Length reward: the fewest tokens a reply should have.")
    length_max: int = _f(64, "Length reward: the most tokens a reply should have.")
    file: str = _f("", "Your own reward: a Python file with def reward(prompt, completion, **columns) -> float. "
                       "Loaded only in the training child; refused when the app is shared beyond this computer.")
    file_weight: float = _f(1.0, "Weight of the reward from rewards.file.")


@dataclass
class OutputConfig:
    run_name: str = _f("", "Run name; empty = derived from model and time.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        validate(self)
        return self


def _section_types() -> dict:
    return {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "quant": QuantConfig,
            "train": TrainConfig, "rewards": RewardsConfig, "output": OutputConfig}


def field_help(dotted: str) -> str:
    section, name = dotted.split(".", 1)
    for f in fields(_section_types()[section]):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(dotted)


def field_choices(dotted: str) -> tuple | None:
    section, name = dotted.split(".", 1)
    for f in fields(_section_types()[section]):
        if f.name == name:
            return f.metadata.get("choices")
    raise KeyError(dotted)


# ---------------------------------------------------------------- building from dicts / YAML

def _coerce(dotted: str, value, default):
    """Coerce a YAML/CLI value to the type of the field's default; errors name the field."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(dotted, f"expected true or false, got {value!r}", f"set {dotted}=true or {dotted}=false")
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                           or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise ConfigError(dotted, f"expected a whole number, got {value!r}", f"set {dotted} to an integer")
        return int(value)
    if isinstance(default, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(dotted, f"expected a number, got {value!r}", f"set {dotted} to a number like 0.5")
    if isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, bool) and ("on" if value else "off") in (field_choices(dotted) or ()):
            return "on" if value else "off"  # YAML 1.1 reads a bare on / off as true / false
        if isinstance(value, list) and dotted == "lora.targets":
            return ",".join(str(v) for v in value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(dotted, f"expected text, got {value!r}", f"set {dotted} to a string")
        return str(value)
    if isinstance(default, list):
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ConfigError(dotted, f"expected a list, got {value!r}", f"write {dotted} as a YAML list")
        return [str(v) for v in value]
    if isinstance(default, dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"expected a mapping, got {value!r}", f"write {dotted} as key: value pairs")
        return {str(k): str(v) for k, v in value.items()}
    return value


def from_dict(d: dict | None) -> RunConfig:
    """Build a RunConfig from a (possibly partial) nested dict. Unknown keys are errors, not ignored."""
    cfg = RunConfig()
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError("config", "the file must be a mapping of sections", "see presets/cpu-demo.yaml")
    types = _section_types()
    for section, values in d.items():
        if section not in types:
            raise ConfigError(section, "unknown section", f"use one of: {', '.join(types)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(section, "expected a mapping of settings", f"write {section}: followed by key: value lines")
        obj = getattr(cfg, section)
        names = {f.name for f in fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{section}.{key}", "unknown setting", f"known {section} settings: {', '.join(sorted(names))}")
            setattr(obj, key, _coerce(f"{section}.{key}", value, getattr(type(obj)(), key)))
    return cfg


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}", "check the path")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}", "fix the YAML syntax at the line shown")
    return from_dict(data)


def dump_yaml(cfg: RunConfig, header: str = "") -> str:
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    return (header.rstrip() + "\n" if header else "") + body


def save_yaml(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    Path(path).write_text(dump_yaml(cfg, header), encoding="utf-8")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (values parsed as YAML scalars). Returns a new config."""
    d = cfg.to_dict()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "override must look like section.key=value", "e.g. --set lora.r=32")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.count(".") == 2 and isinstance(_default_of(key.rsplit(".", 1)[0]), dict):
            section, name, sub = key.split(".")  # one entry of a mapping: --set data.fill.name=Garage
            entries = d.setdefault(section, {}).get(name) or {}
            d[section][name] = {**entries, sub: raw}
            continue
        if key.count(".") != 1:
            raise ConfigError(key, "override key must be section.key (or section.mapping.key for data.fill and "
                              "data.columns)", "e.g. --set train.lr=1e-4 or --set data.fill.name=Garage")
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        d.setdefault(section, {})[name] = value
    return from_dict(d)


def _default_of(dotted: str):
    section, _, name = dotted.partition(".")
    typ = _section_types().get(section)
    return getattr(typ(), name, None) if typ else None


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- validation

def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for the first bad field, naming it and the fix."""
    m, d, lo, q, t = cfg.model, cfg.data, cfg.lora, cfg.quant, cfg.train
    parse_devices(t.devices)  # raises ConfigError naming train.devices
    for section in (m, d, lo, q, t, cfg.rewards):
        for f in fields(section):
            choices = f.metadata.get("choices")
            value = getattr(section, f.name)
            if choices and value not in choices:
                name = f"{_section_name(section)}.{f.name}"
                raise ConfigError(name, f"{value!r} is not one of {', '.join(choices)}", f"set {name} to one of those")
    if not m.source.strip():
        raise ConfigError("model.source", "no model chosen", "use builtin:smollm2-135m, a hub id, a local folder or a .gguf file")
    if not d.source.strip():
        raise ConfigError("data.source", "no dataset chosen", "use builtin:demo-identity or a path to your file")
    if d.max_len < 16:
        raise ConfigError("data.max_len", f"must be at least 16 tokens, got {d.max_len}", "set data.max_len=512")
    if not 0.0 <= d.val_fraction < 0.9:
        raise ConfigError("data.val_fraction", f"must be in [0, 0.9), got {d.val_fraction}", "use 0.1 for 10%")
    if d.limit < 0:
        raise ConfigError("data.limit", "must be 0 (all rows) or positive", "set data.limit=0")
    for key, value in d.fill.items():
        if not _PLACEHOLDER_NAME.fullmatch(key):
            raise ConfigError("data.fill", f"{key!r} is not a placeholder name",
                              "names are letters, digits and _, as in {{name}} or {{author}}")
        if not str(value).strip():
            raise ConfigError("data.fill", f"no value given for {{{{{key}}}}}", f"give {key} a value, or remove it")
    if lo.r < 1:
        raise ConfigError("lora.r", f"rank must be a positive integer, got {lo.r}", "use 8, 16 or 32")
    if lo.alpha <= 0:
        raise ConfigError("lora.alpha", f"must be > 0, got {lo.alpha}", "a common choice is 2 x rank")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {lo.dropout}", "use 0.05")
    if not target_modules(lo.targets):
        raise ConfigError("lora.targets", "no target modules given", "use all-linear, attention or q_proj,v_proj")
    if t.lr <= 0:
        raise ConfigError("train.lr", f"learning rate must be > 0, got {t.lr}", "use 2e-4 for LoRA")
    if t.lr > 1:
        raise ConfigError("train.lr", f"learning rate {t.lr} is far too large", "use 2e-4 for LoRA")
    if t.batch_size < 1:
        raise ConfigError("train.batch_size", f"must be >= 1, got {t.batch_size}", "use 1 on small GPUs")
    if t.grad_accum < 1:
        raise ConfigError("train.grad_accum", f"must be >= 1, got {t.grad_accum}", "use 1, or more for a larger effective batch")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError("train.max_steps", f"must be -1 (use epochs) or positive, got {t.max_steps}", "e.g. 60")
    if t.max_steps == -1 and t.epochs <= 0:
        raise ConfigError("train.epochs", f"must be > 0 when max_steps is -1, got {t.epochs}", "use 1 or 3")
    if t.warmup_steps < 0:
        raise ConfigError("train.warmup_steps", "must be >= 0", "use 0 or a few steps")
    if t.logging_steps < 1:
        raise ConfigError("train.logging_steps", "must be >= 1", "use 1")
    if t.save_steps < 1:
        raise ConfigError("train.save_steps", "must be >= 1", "e.g. 50")
    if t.save_total_limit < 1:
        raise ConfigError("train.save_total_limit", "must keep at least 1 checkpoint", "use 2")
    if t.eval_steps < 0:
        raise ConfigError("train.eval_steps", "must be >= 0", "0 evaluates only at the end")
    if t.nan_patience < 1:
        raise ConfigError("train.nan_patience", "must be >= 1", "use 3")
    if not 0.0 < t.dpo_beta <= 10.0:
        raise ConfigError("train.dpo_beta", f"must be in (0, 10], got {t.dpo_beta}", "use 0.1")
    if not 0.0 < t.orpo_lambda <= 10.0:
        raise ConfigError("train.orpo_lambda", f"must be in (0, 10], got {t.orpo_lambda}", "use 0.1")
    if t.objective != "sft" and d.packing:
        what = "prompts for GRPO" if t.objective == "grpo" else "preference pairs"
        raise ConfigError("data.packing", f"cannot pack {what} (train.objective={t.objective})",
                          "set data.packing=false")
    if t.oom_recovery == "auto+shorten" and t.objective != "sft":
        raise ConfigError("train.oom_recovery", f"auto+shorten cuts the rows of SFT data only, and this run trains "
                          f"{t.objective} (cutting a {'prompt' if t.objective == 'grpo' else 'preference pair'} "
                          f"would change what is learned)", "set train.oom_recovery=auto")
    if t.objective == "grpo":
        validate_grpo(t, cfg.rewards)
        if "lm_head" in target_modules(lo.targets):
            raise ConfigError("lora.targets", "GRPO cannot train an adapter on lm_head: TRL computes the completions' "
                              "log-probabilities from lm_head's own weight, so that adapter would never learn",
                              "remove lm_head from lora.targets (all-linear leaves it out)")
    needs_bnb = q.method in ("qlora", "8bit") or t.optimizer != "adamw"
    if needs_bnb and not bnb_available():
        which = "quant.method" if q.method in ("qlora", "8bit") else "train.optimizer"
        raise ConfigError(which, "4-bit / 8-bit needs the bitsandbytes package, which is not installed",
                          "pip install bitsandbytes (make run installs it), or use quant.method=lora with train.optimizer=adamw")
    if len(cfg.output.run_name) > RUN_NAME_MAX:
        raise ConfigError("output.run_name", f"is {len(cfg.output.run_name)} characters long; the limit is {RUN_NAME_MAX}",
                          "pick a shorter name like my-first-run")
    if cfg.output.run_name and not _safe_name(cfg.output.run_name):
        raise ConfigError("output.run_name", f"{cfg.output.run_name!r} may only use letters, digits, - _ .",
                          "pick a simple name like my-first-run")


def validate_grpo(t: TrainConfig, r: RewardsConfig) -> None:
    """GRPO's own settings and its rewards (train.objective=grpo)."""
    if not 2 <= t.grpo_generations <= 64:
        raise ConfigError("train.grpo_generations", f"must be 2 to 64, got {t.grpo_generations}",
                          "use 4 (GRPO compares each completion with the others of its group: one alone teaches nothing)")
    if not 1 <= t.grpo_max_completion <= 8192:
        raise ConfigError("train.grpo_max_completion", f"must be 1 to 8192 tokens, got {t.grpo_max_completion}",
                          "use 128, or 256 for replies that reason first")
    if not 0.0 <= t.grpo_beta <= 10.0:
        raise ConfigError("train.grpo_beta", f"must be in [0, 10], got {t.grpo_beta}",
                          "use 0 (no reference) or a small value like 0.04")
    if not 0.0 < t.grpo_temperature <= 5.0:
        raise ConfigError("train.grpo_temperature", f"must be in (0, 5], got {t.grpo_temperature}", "use 1.0")
    weights = {f.name: getattr(r, f.name) for f in fields(r) if f.name.endswith("_weight")}
    for name, w in weights.items():
        if w != w or abs(w) > 100:
            raise ConfigError(f"rewards.{name}", f"must be a number from -100 to 100, got {w}", "use 1.0, or 0 for off")
    if r.format_weight:
        try:
            re.compile(format_pattern(r.format_regex))
        except re.error as e:
            raise ConfigError("rewards.format_regex", f"is not a valid regular expression: {e}",
                              "use think-answer, answer-tags, or a valid Python regular expression")
    if r.length_weight and not 0 <= r.length_min <= r.length_max:
        raise ConfigError("rewards.length_min", f"needs 0 <= length_min <= length_max, got {r.length_min} and "
                          f"{r.length_max}", "e.g. rewards.length_min=20 rewards.length_max=80")
    if r.contains_weight and not any(p.strip() for p in r.contains):
        raise ConfigError("rewards.contains", "the contains reward is on but has no phrase",
                          "give rewards.contains a list of phrases, or set rewards.contains_weight=0")
    if r.not_contains_weight and not any(p.strip() for p in r.not_contains):
        raise ConfigError("rewards.not_contains", "the not_contains reward is on but has no phrase",
                          "give rewards.not_contains a list of phrases, or set rewards.not_contains_weight=0")
    if r.file.strip():
        path = Path(r.file).expanduser()
        if path.suffix != ".py" or not path.is_file():
            raise ConfigError("rewards.file", f"{r.file} is not a Python file on this computer",
                              "give the path of a .py file that defines reward(prompt, completion, **columns)")


def require_reward(cfg: RunConfig) -> None:
    """A GRPO run needs a reward to learn from (checked at Start, not while the form is filled in)."""
    r = cfg.rewards
    if cfg.train.objective != "grpo":
        return
    presets = [f.name for f in fields(r) if f.name.endswith("_weight") and f.name != "file_weight"]
    if not any(getattr(r, name) for name in presets) and not (r.file.strip() and r.file_weight):
        raise ConfigError("rewards", "GRPO needs at least one reward, and every reward weight is 0",
                          "set rewards.format_weight=1 (and rewards.answer_weight=1 when the data has answers), "
                          "or give rewards.file")


# rewards.format_regex's named formats
FORMATS = {"think-answer": r"<think>.*?</think>\s*<answer>.*?</answer>",
           "answer-tags": r"<answer>.*?</answer>"}


def format_pattern(value: str) -> str:
    """rewards.format_regex as a regular expression (a named format, or the user's own)."""
    return FORMATS.get(value.strip(), value)


def _section_name(obj) -> str:
    for name, typ in _section_types().items():
        if isinstance(obj, typ):
            return name
    return "?"


def _safe_name(name: str) -> bool:
    return bool(re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{RUN_NAME_MAX - 1}}}", name)) and ".." not in name


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def target_modules(targets: str) -> list[str] | str:
    """'all-linear' stays as peft's keyword; 'attention' expands; otherwise a comma list."""
    t = (targets or "").strip()
    if t == "all-linear":
        return "all-linear"
    if t == "attention":
        return list(ATTENTION_TARGETS)
    return [x.strip() for x in t.split(",") if x.strip()]


def parse_devices(value) -> str | int | list[int]:
    """train.devices as "auto", a count (int >= 1) or a list of GPU indices; ConfigError otherwise."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "auto"):
        return "auto"
    try:
        if "," in text or text.startswith("["):
            ids = [int(x) for x in text.strip("[]").split(",") if x.strip()]
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError(text)
            return ids
        n = int(text)
    except ValueError:
        raise ConfigError("train.devices", f"{value!r} is not auto, a count or a list of GPU indices",
                          "use auto, 2, or 0,1") from None
    if not 1 <= n <= 64:
        raise ConfigError("train.devices", f"{n} devices is outside 1..64", "use auto, a count from 1, or 0,1")
    return n
