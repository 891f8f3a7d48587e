"""Inspect's results kept across a page reload: $LORA_GARAGE_HOME/inspections/<hash of the data key>.json.

A run lives in its folder and a reload reattaches to it; an inspection lived only in the page. Each finished
inspection is written here under its data key (the model, every data.* setting, the objective) with the size and
modification time of the dataset's files, and a page that loads (or comes back to those settings) shows it again.
A dataset file changed since is not shown from here: it has to be inspected again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core import paths
from core.runs import folder as runs

MAX_FILES = 1000  # a dataset folder's signature stats at most this many files


def _folder() -> Path:
    d = paths.home() / "inspections"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _file(key: str) -> Path:
    return _folder() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def signature(source: str) -> list:
    """What a local dataset is now: [name, size, mtime_ns] of the file, or of each file in the folder (a built-in or
    hub dataset: [], nothing on disk to go stale)."""
    p = Path(str(source or "")).expanduser()
    try:
        if p.is_file():
            st = p.stat()
            return [[p.name, st.st_size, st.st_mtime_ns]]
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())[:MAX_FILES]
            return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return [["unreadable"]]
    return []


def save(key: str, source: str, record: dict) -> None:
    """Keep `record` (JSON values only) for `key`, with the dataset's signature now."""
    text = json.dumps({"key": key, "signature": signature(source), "record": record})
    runs.write_atomic(_file(key), text, durable=False)


def load(key: str, source: str) -> dict | None:
    """The record kept for `key` if the dataset's files are still as they were, else None."""
    path = _file(key)
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if kept.get("key") != key or kept.get("signature") != signature(source):
        return None
    return kept.get("record")
