"""A run's adapters as chat, eval and export use them: which run ("latest" = the newest completed one), which
adapter (final or checkpoint N), whether it exists, whether it fits the loaded base, and the chat template it
trained with. The folder layout itself is core.runs.folder'; this module reads it, and writes nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core import models
from core.runs import folder as runs
from core.errors import GarageError, ModelError
from core.data import tokenize as data_tokenize


def resolve_run(run: str) -> Path:
    """A run folder from a run id, or "latest" = the most recently finished completed run."""
    if run != "latest":
        return runs.get(run)
    done = [r for r in runs.list_runs() if r.get("state") == "completed"]
    if not done:
        raise GarageError("there is no completed run yet", "train one first: python -m core train --preset cpu-demo")
    newest = max(done, key=lambda r: (str(r.get("ended_at") or ""), str(r.get("started_at") or "")))
    return runs.get(newest["id"])


def adapter_name(run_id: str, checkpoint: int | None = None) -> str:
    # peft uses the name as a module key, where "." is not allowed
    name = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)
    return f"{name}-step{int(checkpoint)}" if checkpoint is not None else name


def check_adapter(base_model, adapter_dir: Path, *, loaded_source: str, trained_on: str | None) -> None:
    """Refuse an adapter made for another base: by the run's model.source, then by every adapted layer's shape."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)",
                         "pick a finished run or a checkpoint marked COMPLETE")
    claimed = trained_on or json.loads(cfg_file.read_text()).get("base_model_name_or_path") or ""
    if claimed and not same_source(claimed, loaded_source):
        raise ModelError(f"this adapter was trained on {claimed}, but the loaded base model is {loaded_source}",
                         "load the run itself (it brings its own base model), or pick an adapter trained on this base")
    from safetensors import safe_open  # heavy

    modules = dict(base_model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not m:
                continue
            mod = modules.get(m.group(1))
            if mod is None:
                raise ModelError(f"the adapter changes layer {m.group(1)}, which the loaded base model does not have",
                                 "this adapter belongs to a different base model; load its own run")
            shape = f.get_slice(key).get_shape()
            want = getattr(mod, "in_features", None) if m.group(2) == "A" else getattr(mod, "out_features", None)
            got = shape[1] if m.group(2) == "A" else shape[0]
            if want is not None and got != want:
                raise ModelError(f"the adapter's {m.group(1)} expects size {got}, the loaded base model has {want}",
                                 "this adapter belongs to a different base model; load its own run")


def same_source(a: str, b: str) -> bool:
    if a.strip() == b.strip():
        return True
    try:
        return models.resolve(a, allow_download=False).resolve() == models.resolve(b, allow_download=False).resolve()
    except ModelError:
        return False  # one of them is not on this machine, so it cannot be the loaded one


def has_adapter(run_dir: Path) -> bool:
    """Whether the run saved its final adapter (adapter/adapter_config.json)."""
    return (Path(run_dir) / "adapter" / "adapter_config.json").is_file()


def chattable(run_dir: Path) -> bool:
    """Whether the run has something to load: a final adapter or a checkpoint marked COMPLETE."""
    return has_adapter(run_dir) or runs.latest_checkpoint(run_dir) is not None


def ensure_chat_template(tokenizer, adapter_dir: Path | None = None) -> str | None:
    """Give the tokenizer the template the run trained with: the one saved with the adapter, else the model's
    own, else the fallback (so an exported model chats the same way). Returns the fallback notice for a model
    without a template of its own (data_tokenize.fallback_notice), None when it has one."""

    notice = data_tokenize.fallback_notice(tokenizer)
    saved = models.saved_chat_template(adapter_dir) if adapter_dir is not None else None
    tokenizer.chat_template = saved or data_tokenize.chat_template(tokenizer)[0]
    return notice
