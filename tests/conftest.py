"""Shared fixtures. Everything is offline: the tiny model is built here, the built-in model ships in a package."""

import os
from pathlib import Path

import pytest

from tests.helpers.runs import make_run

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
    from tests.helpers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_llama3(tmp_path_factory) -> Path:
    """The same tiny model with a Llama-3 style chat template (a second template for masking tests)."""
    from tests.helpers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), template="llama3")


@pytest.fixture(scope="session")
def exported_r1(tmp_path_factory, tiny_model_dir) -> Path:
    """<export folder> of run r1 (make_run's defaults on the tiny model), q8_0, made once in a home of its own."""
    from core.gguf import export as gguf_export

    home, tools = tmp_path_factory.mktemp("export-home"), tmp_path_factory.mktemp("tools")
    saved = {k: os.environ.get(k) for k in ("LORA_GARAGE_HOME", "LORA_GARAGE_TOOLS")}
    os.environ.update(LORA_GARAGE_HOME=str(home), LORA_GARAGE_TOOLS=str(tools))
    try:
        make_run(home, tiny_model_dir)
        gguf_export.export_gguf("r1", home / "exports" / "r1-gguf", ["q8_0"], parity=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return home / "exports" / "r1-gguf"
