"""Where LoRA Garage keeps its files: $LORA_GARAGE_HOME (default ~/lora-garage)."""

import os
import threading
from pathlib import Path
import hashlib


def temp_beside(path: Path) -> Path:
    """A temporary name beside `path`, this writer's own (its process and thread), to write there and then
    os.replace onto `path`: two writers of the same file at once (two threads of the app, say two tabs uploading or
    inspecting the same data) each rename their own, where with one shared name the first rename left the second
    with nothing to rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model weights and datasets can be GBs)."""

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def home() -> Path:
    """The app home. Read on every call so tests (and --home) can point it elsewhere."""
    p = Path(os.environ.get("LORA_GARAGE_HOME") or Path.home() / "lora-garage").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    d = home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def models_dir() -> Path:
    d = home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def user_presets_dir() -> Path:
    d = home() / "presets"
    d.mkdir(parents=True, exist_ok=True)
    return d


# the folder holding core/ (a checkout, or site-packages in an installed copy): the training child runs from here
REPO_ROOT = Path(__file__).resolve().parent.parent
# presets/ at the top of a checkout; an installed copy carries it inside the package (pyproject.toml maps it)
_PACKAGED_PRESETS = Path(__file__).resolve().parent / "builtin_presets"
BUILTIN_PRESETS_DIR = _PACKAGED_PRESETS if _PACKAGED_PRESETS.is_dir() else REPO_ROOT / "presets"
