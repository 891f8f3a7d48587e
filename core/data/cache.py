"""The tokenised-dataset cache: a run whose data, tokenizer, template and data settings were prepared before reads
the prepared rows back instead of reading, rendering and tokenising the file again.

    prepared, hit = prepare(cfg, tokenizer)     # core.data.sft.prepare, through $LORA_GARAGE_HOME/cache/data/

The key is a sha256 over everything the rows depend on: the bytes of the data file (every data file of a folder,
with their names; the val_source's too), the tokenizer (its full serialised vocabulary and merges, special tokens,
class), the chat template the rows are rendered with, every data.* setting, the objective and the seed (the
hold-out split), and the source code of core/data itself (a fixed bug in rendering must not be served from an old
cache). A change to any of them misses. Hub datasets are not cached: their content cannot be hashed offline.

Each file is our own pickle behind a sha256 of its bytes; a file that does not match its digest, or does not load,
is rebuilt and replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from core import paths
from core.data import sft
from core.data.read import BUILTINS, SUPPORTED
from core.data.tokenize import chat_template

FORMAT = b"lora-garage-data-cache-1\n"
_DATA_CODE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    d = paths.home() / "cache" / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _source_files(source: str) -> list[Path] | None:
    """The files a local source reads, or None for a source that cannot be hashed here (a hub dataset)."""
    source = (source or "").strip()
    if source in BUILTINS:
        return [BUILTINS[source]]
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if path.is_file():
        return [path]
    return None


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocabulary, merges, normaliser, pre-tokeniser, added tokens
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def _code_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(_DATA_CODE.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def key(cfg, tokenizer) -> str | None:
    """The cache key of `cfg.data` prepared with `tokenizer`, or None when the data cannot be hashed here."""
    h = hashlib.sha256(FORMAT)
    for source in (cfg.data.source, cfg.data.val_source):
        if not (source or "").strip():
            h.update(b"<none>")
            continue
        files = _source_files(source)
        if files is None:
            return None
        for f in files:
            h.update(f.name.encode() + b"\0" + paths.file_sha256(f).encode())
    template = chat_template(tokenizer)[0] if hasattr(tokenizer, "apply_chat_template") else None
    h.update(json.dumps({
        "tokenizer": _tokenizer_digest(tokenizer),
        "template": template,
        "data": asdict(cfg.data),
        "objective": cfg.train.objective,
        "seed": cfg.train.seed,
        "code": _code_digest(),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def prepare(cfg, tokenizer, progress=None):
    """core.data.sft.prepare through the cache. -> (prepared, hit). A miss prepares and stores; a corrupt file is
    said on stderr, rebuilt and replaced."""
    k = key(cfg, tokenizer)
    if k is None:
        return sft.prepare(cfg, tokenizer, progress), False
    path = cache_dir() / f"{k}.pkl"
    if path.exists():
        prepared, problem = _load(path)
        if prepared is not None:
            print(f"data: tokenised rows from the cache ({path.name[:12]})", flush=True)
            return prepared, True
        print(f"WARNING: the data cache file {path} is damaged ({problem}): tokenising again and replacing it",
              file=sys.stderr, flush=True)
    prepared = sft.prepare(cfg, tokenizer, progress)
    _store(path, prepared)
    return prepared, False


def _load(path: Path):
    """-> (prepared, None) or (None, what is wrong)."""
    blob = path.read_bytes()
    if not blob.startswith(FORMAT):
        return None, "not a data cache file of this version"
    digest, payload = blob[len(FORMAT):len(FORMAT) + 32], blob[len(FORMAT) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        return None, "its contents do not match their checksum"
    try:
        return pickle.loads(payload), None  # our own file, checked against its digest above
    except Exception as e:  # noqa: BLE001 - an unreadable cache is rebuilt; the caller says so
        return None, f"{type(e).__name__}: {e}"


def _store(path: Path, prepared) -> None:
    """Written to a temporary file and renamed: a cut-short write leaves no half file under the key's name."""
    payload = pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(FORMAT + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
