"""Shared fixtures. Everything is offline: the tiny model is built here, the built-in model ships in a package."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The built-in model is converted once per test session into this folder, shared by every test that needs it.
_SESSION_MODELS = None


@pytest.fixture(autouse=True)
def garage_home(tmp_path, monkeypatch, tmp_path_factory):
    """Point $LORA_GARAGE_HOME at a fresh folder for every test; converted models are shared across tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_GARAGE_HOME", str(home))
    shared = _shared_models_dir(tmp_path_factory)
    (home / "models").symlink_to(shared, target_is_directory=True)
    return home


def _shared_models_dir(tmp_path_factory) -> Path:
    global _SESSION_MODELS
    if _SESSION_MODELS is None:
        _SESSION_MODELS = tmp_path_factory.mktemp("models")
    return _SESSION_MODELS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) and a byte-level BPE tokenizer with a ChatML chat template, saved to disk."""
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_llama3(tmp_path_factory) -> Path:
    """The same tiny model with a Llama-3 style chat template (a second template for masking tests)."""
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), template="llama3")
