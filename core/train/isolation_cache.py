"""The padding-free check's verdict, kept on disk: the check (core.train.collate.isolation_check) runs three
forwards through the real model at every start, and its answer depends only on the model's code and shape, the
attention kernel and the libraries, never on the weights or the data. So it is stored once per key in
$LORA_GARAGE_HOME/cache/padding-free/ and read back at the next start.

    ok, detail, cached = checked(model, cfg, device)

The key is a sha256 over: this file's format, the check's own code (core/train/collate.py), the model's class and its config (shape,
attention implementation, quantization), the parameters' dtypes, cfg.quant, the device (and the GPU's name), the
versions of torch / transformers / peft / bitsandbytes, and the bytes of the model's modeling file and of
transformers' masking_utils.py (a remote-code model or a patched install misses). A file that does not parse or
does not match its key is said on stderr, checked again and replaced, never trusted. A check that raised is not
stored: it may have been out of memory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import sys
import time
from pathlib import Path

from core import hardware
from core import paths

FORMAT = "lora-garage-padding-free-1"


def cache_dir() -> Path:
    d = paths.home() / "cache" / "padding-free"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def key(model, cfg, device: str) -> str:
    """The cache key of the padding-free verdict for `model` (a peft model or a bare one) as this run uses it."""
    import transformers.masking_utils as masking  # heavy

    from core.train import collate  # heavy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = {
        "format": FORMAT,
        "check": _file_digest(collate.__file__),  # the check's own code
        "class": f"{type(base).__module__}.{type(base).__qualname__}",
        "config": base.config.to_dict(),
        "attn": getattr(base.config, "_attn_implementation", None),
        "dtypes": sorted({str(p.dtype) for p in base.parameters()}),
        "quant": [cfg.quant.method, cfg.quant.quant_type, cfg.quant.double_quant, cfg.quant.compute_dtype],
        "device": [device, hardware.device_name(device) if device != "cpu" else None],
        "versions": {n: _version(n) for n in ("torch", "transformers", "peft", "bitsandbytes", "flash-attn")},
        "code": [_file_digest(inspect.getsourcefile(type(base))), _file_digest(masking.__file__)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def checked(model, cfg, device: str) -> tuple[bool, str, bool]:
    """-> (ok, detail, cached): the stored verdict for this key, or the check run now (and stored)."""
    from core.train import collate  # heavy

    k = key(model, cfg, device)
    path = cache_dir() / f"{k}.json"
    if path.exists():
        verdict, problem = _load(path, k)
        if verdict is not None:
            return verdict["ok"], verdict["detail"] + f" (checked {verdict['checked_at']}, read back)", True
        print(f"WARNING: the padding-free cache file {path} is damaged ({problem}): checking again and replacing it",
              file=sys.stderr, flush=True)
    ok, detail = collate.isolation_check(model, model.get_input_embeddings().num_embeddings)
    body = {"key": k, "ok": bool(ok), "detail": detail, "checked_at": time.strftime("%Y-%m-%d %H:%M")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body), encoding="utf-8")
    tmp.replace(path)
    return ok, detail, False


def _load(path: Path, k: str):
    """-> (verdict, None) or (None, what is wrong)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(body, dict) or body.get("key") != k:
        return None, "it was written for another key"
    if not isinstance(body.get("ok"), bool) or not isinstance(body.get("detail"), str) \
            or not isinstance(body.get("checked_at"), str):
        return None, "its fields are not {ok, detail, checked_at}"
    return body, None
