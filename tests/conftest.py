"""Shared fixtures. Everything is offline: the tiny model is built here, the built-in model ships in a package."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory) -> Path:
    """The built-in model is converted once per test session into this folder, shared by every home."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def garage_home(tmp_path, monkeypatch, shared_models):
    """Point $LORA_GARAGE_HOME at a fresh folder for every test; converted models are shared across tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_GARAGE_HOME", str(home))
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    return home


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
