"""A user's own .gguf file as the model source: converted once into a safetensors folder (same logits, same
tokenizer and chat template), converted again when the file changes, its shape read without converting."""

import json
import os
import shutil
from pathlib import Path

import pytest

from core import models
from core.__main__ import main
from core.errors import ModelError
from tests.helpers.tiny_gguf import write_tiny_gguf

TEXT = "Hello, who are you? My name is Garage."


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "my-model.gguf")


@pytest.fixture
def gguf_file(tmp_path, tiny_gguf):
    """A fresh copy per test (a new mtime, so a new key): each test sees its own first conversion."""
    return Path(shutil.copy(tiny_gguf, tmp_path / "my-model.gguf"))


def _converted(garage_home):
    return sorted(p.name for p in (garage_home / "models").iterdir() if p.name.startswith("gguf-"))


def test_a_gguf_file_converts_once_into_the_same_model(gguf_file, tiny_model_dir, garage_home, capfd):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = set(_converted(garage_home))
    said = []
    path = models.resolve(str(gguf_file), progress=said.append)
    assert path.parent == garage_home / "models" and (path / "CONVERTED").exists()
    assert said[0].startswith("converting my-model.gguf (") and "to safetensors (once)" in said[0]
    assert said[-1].startswith("converted my-model.gguf in ")
    assert said[0] in capfd.readouterr().err      # the CLI user sees the same lines on stderr
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    models.check_safetensors(path)

    tok, tok0 = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok(TEXT).input_ids == tok0(TEXT).input_ids and tok.chat_template == tok0.chat_template
    ids = torch.tensor([tok0(TEXT).input_ids])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5

    again = []
    assert models.resolve(str(gguf_file), progress=again.append) == path and again == []   # no second conversion
    assert "converting" not in capfd.readouterr().err
    assert set(_converted(garage_home)) - before == {path.name}


def test_a_conversion_parses_the_file_once_and_leaves_gguf_as_it_was(gguf_file, garage_home, monkeypatch):
    """transformers opens a reader for the config, the weights and the tokenizer, and builds the tensor name map
    per module; one conversion now parses the file once and builds the map once (15 of the built-in model's 18 s).
    After it, and after a conversion that fails, the gguf module holds its own functions again."""
    import gguf

    opened, maps = [], []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            super().__init__(path, *args, **kwargs)

    def counting_map(*args):
        maps.append(args)
        return name_map(*args)

    name_map = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    path = models.resolve(str(gguf_file))
    assert (path / "CONVERTED").exists()
    assert opened == [str(gguf_file)] and len(maps) == 1
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is counting_map

    (garage_home / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ModelError, match="cannot read the model settings in broken.gguf"):
        models.resolve(str(garage_home / "broken.gguf"))  # fails inside the conversion's span
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is counting_map
    with pytest.raises(ModelError, match="cannot convert broken.gguf"):  # a truncated header: not a raw struct.error
        models.convert_gguf(garage_home / "broken.gguf", garage_home / "out")


def test_a_changed_gguf_file_converts_again(gguf_file, garage_home):
    first = models.resolve(str(gguf_file))
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # re-downloaded / rewritten in place
    said = []
    second = models.resolve(str(gguf_file), progress=said.append)
    assert second != first and (second / "CONVERTED").exists() and said[0].startswith("converting")


def test_its_shape_is_read_without_converting(gguf_file, tiny_model_dir, garage_home, capsys):
    before = _converted(garage_home)
    cfg = models.read_config(str(gguf_file))
    want = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert cfg[key] == want[key], key
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert main(["estimate", "--model", str(gguf_file), "--json", "--gpu-gb", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["params"] > 0
    assert _converted(garage_home) == before     # nothing was converted for either


def test_gguf_paths_that_cannot_be_used_say_why(tmp_path):
    with pytest.raises(ModelError, match="model file not found") as e:
        models.resolve(str(tmp_path / "missing.gguf"))
    assert "path of the .gguf file" in e.value.hint
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="is a file, not a model folder") as e:
        models.resolve(str(tmp_path / "weights.bin"))
    assert ".gguf" in e.value.hint
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    for call in (models.read_config, models.resolve):
        with pytest.raises(ModelError, match="cannot read the model settings in broken.gguf"):
            call(str(tmp_path / "broken.gguf"))


def test_a_conversion_that_would_fill_the_disk_is_refused_first(gguf_file, garage_home, monkeypatch):
    from core.errors import DiskFull

    before = sorted(p.name for p in (garage_home / "models").iterdir())
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(DiskFull, match="writes about 0.0 GB of fp32 safetensors") as e:
        models.resolve(str(gguf_file))
    assert "free some disk space" in e.value.hint
    assert [n for n in sorted(p.name for p in (garage_home / "models").iterdir()) if not n.endswith(".lock")] == \
        [n for n in before if not n.endswith(".lock")]     # no folder, not even a half-written one


@pytest.mark.integration
def test_train_from_a_gguf_file(gguf_file, tmp_path, capsys, monkeypatch):
    """`python -m core train --model X.gguf` (the Train page's model field takes the same string)."""
    from core.runs import folder as runs
    from tests.helpers.training import write_dataset

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    code = main(["train", "--model", str(gguf_file), "--dataset", str(data), "--set", "train.max_steps=2",
                 "--set", "data.max_len=64"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "converting my-model.gguf" in out.err and "to safetensors (once)" in out.err   # said while it waits
    run = max(runs.list_runs(), key=lambda r: r["id"])
    run_dir = runs.get(run["id"])
    assert runs.read_status(run_dir)["state"] == "completed", runs.tail_log(run_dir, 40)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
