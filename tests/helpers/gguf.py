"""GGUF test helpers: a skip mark without llama-cpp-python, a home holding a copy of the shared export, a fake
export folder."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.runs import make_run

needs_llama_cpp = pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


def home_with_export(home: Path, tiny_model_dir: Path, exported: Path, **run) -> Path:
    """Run r1 in `home` (the same seed as the exported one) and its export under <home>/exports/r1-gguf."""
    make_run(home, tiny_model_dir, **run)
    out = home / "exports" / "r1-gguf"
    shutil.copytree(exported, out)
    return out / "r1-q8_0.gguf"


def fake_export(home: Path, name: str, run: str, files: dict, mtime: float) -> None:
    folder = home / "exports" / name
    folder.mkdir(parents=True)
    for quant, file in files.items():
        (folder / file).write_bytes(b"GGUF")
        os.utime(folder / file, (mtime, mtime))
    (folder / "export.json").write_text(json.dumps({"run": run, "files": {
        q: {"file": f, "bytes": 4, "bits_per_weight": 8.5} for q, f in files.items()}}))
