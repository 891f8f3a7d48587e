"""The settings form: one widget per RunConfig field, grouped, each with its one-line help from core.config.

`build()` returns a Form whose `.fields` pairs dotted config names with widgets (Python variables, wired by the
caller), so the form converts to a RunConfig and back without string-id lookups of components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

import yaml
from core import config as C

# group -> [(dotted field, widget kind)]; the order is the order on the page.
GROUPS = {
    "Basic": [("quant.method", "radio"), ("train.max_steps", "number"), ("train.epochs", "number"),
              ("train.batch_size", "number"), ("train.grad_accum", "number"), ("train.lr", "number"),
              ("data.max_len", "number")],
    "LoRA": [("lora.r", "number"), ("lora.alpha", "number"), ("lora.dropout", "number"), ("lora.targets", "text"),
             ("lora.use_rslora", "check"), ("lora.use_dora", "check")],
    "Quantization": [("quant.quant_type", "radio"), ("quant.double_quant", "check"), ("quant.compute_dtype", "radio")],
    "Training": [("train.optimizer", "radio"), ("train.grad_checkpointing", "check"), ("train.scheduler", "dropdown"),
                 ("train.warmup_steps", "number"), ("train.weight_decay", "number"), ("train.max_grad_norm", "number"),
                 ("train.seed", "number"), ("train.save_steps", "number"), ("train.save_total_limit", "number"),
                 ("train.eval_steps", "number"), ("train.logging_steps", "number")],
    "Devices": [("train.devices", "text"), ("train.strategy", "radio")],
    "Preference (DPO / ORPO)": [("train.objective", "radio"), ("train.dpo_beta", "number"),
                                ("train.dpo_loss", "dropdown"), ("train.orpo_lambda", "number"),
                                ("train.from_run", "text")],
    "GRPO: rewards (objective grpo)": [
        ("train.grpo_generations", "number"), ("train.grpo_max_completion", "number"), ("train.grpo_beta", "number"),
        ("train.grpo_temperature", "number"), ("train.grpo_loss", "dropdown"),
        ("rewards.format_weight", "number"), ("rewards.format_regex", "text"), ("rewards.answer_weight", "number"),
        ("rewards.answer_column", "text"), ("rewards.contains_weight", "number"), ("rewards.contains", "lines"),
        ("rewards.not_contains_weight", "number"), ("rewards.not_contains", "lines"),
        ("rewards.length_weight", "number"), ("rewards.length_min", "number"), ("rewards.length_max", "number"),
        ("rewards.file", "text"), ("rewards.file_weight", "number")],
    "Advanced": [("data.system", "text"), ("data.train_on", "radio"), ("data.overlong", "radio"), ("data.packing", "check"),
                 ("data.padding_free", "check"),
                 ("data.val_fraction", "number"), ("data.val_source", "text"), ("data.limit", "number"),
                 ("model.attn_implementation", "dropdown"), ("model.liger_kernel", "check"),
                 ("model.trust_remote_code", "check"),
                 ("train.nan_patience", "number"), ("output.run_name", "text")],
}
OPEN = {"Basic"}
LINES = {dotted for items in GROUPS.values() for dotted, kind in items if kind == "lines"}


@dataclass
class Form:
    fields: list[tuple[str, gr.components.Component]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.fields]

    @property
    def widgets(self) -> list:
        return [w for _, w in self.fields]

    def widget(self, dotted: str):
        return dict(self.fields)[dotted]


def _get(cfg: C.RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _label(dotted: str) -> str:
    return dotted.split(".")[1].replace("_", " ")


def _widget(dotted: str, kind: str, value):
    info = C.field_help(dotted)
    choices = C.field_choices(dotted)
    if kind == "radio":
        return gr.Radio(list(choices), value=value, label=_label(dotted), info=info)
    if kind == "dropdown":
        return gr.Dropdown(list(choices), value=value, label=_label(dotted), info=info)
    if kind == "check":
        # lg-check: Gradio 6 lays a Checkbox out with min-width 0 whatever its min_width, so in a full row it was
        # squeezed to 30 px (its label gone, its help one word a line); the page's CSS gives it 160 px
        return gr.Checkbox(value=value, label=_label(dotted), info=info, elem_classes=["lg-check"])
    if kind == "number":
        return gr.Number(value=value, label=_label(dotted), info=info)
    if kind == "lines":  # a list of phrases: one a line
        return gr.Textbox(value="\n".join(value or []), label=_label(dotted), info=info + " One a line.", lines=2)
    return gr.Textbox(value=value, label=_label(dotted), info=info)


def build(cfg: C.RunConfig, leading: list[tuple[str, gr.components.Component]]) -> Form:
    """Render the grouped settings. `leading` are fields rendered elsewhere (model and data pickers)."""
    form = Form(list(leading))
    for group, items in GROUPS.items():
        with gr.Accordion(group, open=group in OPEN):
            with gr.Row():
                for dotted, kind in items:
                    form.fields.append((dotted, _widget(dotted, kind, _get(cfg, dotted))))
    return form


def to_config(names: list[str], values: list) -> C.RunConfig:
    """Form values -> RunConfig (not yet validated: call .validate() before starting)."""
    d: dict = {}
    for dotted, value in zip(names, values):
        section, name = dotted.split(".")
        if isinstance(value, float) and value.is_integer() and isinstance(_get(C.RunConfig(), dotted), int):
            value = int(value)
        if dotted == "data.columns":
            value = _parse_columns(value)
        if dotted in LINES and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]
        if value is None:
            raise C.ConfigError(dotted, "is empty", f"enter a value for {_label(dotted)}")
        d.setdefault(section, {})[name] = value
    return C.from_dict(d)


def _parse_columns(text) -> dict:
    """The column-mapping box takes YAML/JSON like `{prompt: question, response: answer}`; empty means auto."""

    if isinstance(text, dict):
        return text
    if not (text or "").strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise C.ConfigError("data.columns", f"not a mapping: {e}", "write it like {prompt: question, response: answer}")
    if not isinstance(value, dict):
        raise C.ConfigError("data.columns", f"not a mapping: {text!r}", "write it like {prompt: question, response: answer}")
    return value


def values_of(names: list[str], cfg: C.RunConfig) -> list:
    out = []
    for n in names:
        v = _get(cfg, n)
        if n == "data.columns":
            v = ", ".join(f"{k}: {c}" for k, c in v.items())
            v = "{" + v + "}" if v else ""
        if n in LINES:
            v = "\n".join(v or [])
        out.append(v)
    return out
