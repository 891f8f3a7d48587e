"""Where LoRA Garage keeps its files: $LORA_GARAGE_HOME (default ~/lora-garage)."""

import os
from pathlib import Path


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


REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_PRESETS_DIR = REPO_ROOT / "presets"
