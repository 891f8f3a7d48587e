"""Export a run's adapter: merged into its base as a normal safetensors model folder, or the adapter alone as a zip.

Merging happens on the CPU in the base's own dtype (peft does the B@A product in fp32 for 16-bit weights), so it
never competes with a training run for the GPU. A QLoRA run trained against the 4-bit base, but 4-bit weights cannot
be merged into exactly; we merge into the 16-bit base, which is what everyone does, and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from core import models
from core.config import RunConfig
from core.paths import temp_beside
from core.data import tokenize as data_tokenize
from core.errors import DiskFull, GarageError
from core.runs import folder as runs
from core.runs import resolve as run_files

EXPORT_INFO = "lora_garage_export.json"


@dataclass
class Source:
    """What an export reads, resolved once: the run folder, its settings and the adapter (final or a checkpoint's).
    Every export (merged, zip, GGUF) starts from one; the base model folder is resolved on first use."""
    run_dir: Path
    cfg: RunConfig
    adapter_dir: Path
    checkpoint: int | None = None

    @cached_property
    def base_path(self) -> Path:
        return models.resolve(self.cfg.model.source)


def source(run_id: str, checkpoint: int | None = None) -> Source:
    """The run (an id, a folder or "latest") and its adapter; refuses a run without one, naming the fix."""
    run_dir = run_files.resolve_run(run_id)
    adapter_dir = runs.adapter_path(run_dir, checkpoint)
    return Source(run_dir, runs.load_config(run_dir), adapter_dir, checkpoint)


@dataclass
class Merged:
    """A merged model folder, with the tokenizer it was written with (the run's chat template in it) and whether
    the base had no chat template of its own (the run trained with the fallback)."""
    path: Path
    tokenizer: Any
    template_is_fallback: bool


def merge(run_id: str, out_dir: str | Path, checkpoint: int | None = None,
          log: Callable[[str], None] | None = None) -> Path:
    """Write base + adapter merged into `out_dir` (must be new or empty). Loads with AutoModelForCausalLM."""
    return merge_source(source(run_id, checkpoint), out_dir, log).path


def merge_source(src: Source, out_dir: str | Path, log: Callable[[str], None] | None = None) -> Merged:
    """merge() for a Source already resolved (the GGUF export goes on with the returned tokenizer)."""
    import torch  # heavy
    from peft import PeftModel  # heavy
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy

    log = log or (lambda msg: None)
    run_dir, cfg, adapter_dir, checkpoint = src.run_dir, src.cfg, src.adapter_dir, src.checkpoint
    out = fresh_target(Path(out_dir))
    base_path = src.base_path
    models.check_safetensors(base_path)
    size = sum(f.stat().st_size for f in base_path.glob("*.safetensors"))
    _check_space(out.parent, size)

    notes = []
    if cfg.quant.method in ("qlora", "8bit"):
        notes.append(f"this run trained on a {'4' if cfg.quant.method == 'qlora' else '8'}-bit base; the adapter is "
                     "merged into the 16-bit base weights (quantized weights cannot be merged exactly), so answers "
                     "can differ slightly from chat with the quantized base")
    for n in notes:
        log(f"note: {n}")
    log(f"loading {cfg.model.source} on the CPU")
    config = AutoConfig.from_pretrained(str(base_path), trust_remote_code=cfg.model.trust_remote_code)
    if models.drop_gguf_quantization(config):  # as training did; the merged folder is plain safetensors
        log("note: the base's config.json says GGUF-quantized over plain safetensors weights; "
            "the marker is left out of the merged model")
    base = AutoModelForCausalLM.from_pretrained(str(base_path), config=config, dtype="auto", use_safetensors=True,
                                                trust_remote_code=cfg.model.trust_remote_code)
    run_files.check_adapter(base, adapter_dir, loaded_source=cfg.model.source, trained_on=cfg.model.source)
    log(f"merging {adapter_dir}")
    with torch.no_grad():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    tok = models.load_tokenizer(base_path, trust_remote_code=cfg.model.trust_remote_code)
    fallback = data_tokenize.chat_template(tok)[1]  # before the run's template is put in
    notice = run_files.ensure_chat_template(tok, adapter_dir)  # the exported model chats with the run's template
    if notice:
        log(f"note: {notice}; the merged model carries that template")

    tmp = temp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps({
        "run": run_dir.name, "checkpoint": checkpoint, "base_model": cfg.model.source, "adapter": str(adapter_dir),
        "quant_method": cfg.quant.method, "dtype": str(merged.dtype).replace("torch.", ""), "notes": notes}, indent=2))
    if out.exists():
        out.rmdir()   # fresh_target allowed only an empty folder
    os.replace(tmp, out)
    log(f"merged model written to {out}")
    return Merged(out, tok, fallback)


def zip_adapter(run_id: str, out_zip: str | Path, checkpoint: int | None = None, overwrite: bool = False) -> Path:
    """The adapter folder (plus the run's config.yaml as lora_garage_run.yaml) as a zip. Small: MBs, not GBs."""

    src = source(run_id, checkpoint)
    run_dir, adapter_dir = src.run_dir, src.adapter_dir
    out = Path(out_zip).expanduser()
    if out.suffix.lower() != ".zip":
        raise GarageError(f"{out} does not end in .zip", "name the file like my-adapter.zip")
    if out.exists() and not overwrite:
        raise GarageError(f"{out} already exists", "pick another file name, or delete the old one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in sorted(adapter_dir.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(adapter_dir).as_posix())
        if (run_dir / "config.yaml").exists():
            z.write(run_dir / "config.yaml", "lora_garage_run.yaml")
    os.replace(tmp, out)
    return out


def fresh_target(out: Path) -> Path:
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GarageError(f"{out} already exists and is not an empty folder", "pick a new folder name for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1 + 50_000_000:
        raise DiskFull(f"the merged model needs about {needed / 1e9:.1f} GB, {folder} has {free / 1e9:.1f} GB free",
                       "free some disk space or export to another drive")
