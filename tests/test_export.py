"""Export: merged model = base + adapter (same logits), QLoRA runs merge into the 16-bit base, adapter zip."""

import json
import zipfile

import pytest

from core.errors import GarageError
from tests.helpers.runs import make_run


def _ids():
    import torch

    return torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


def test_merged_model_gives_the_same_logits_as_base_plus_adapter(garage_home, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import export

    run = make_run(garage_home, tiny_model_dir)
    messages = []
    out = export.merge("r1", tmp_path / "merged", log=messages.append)
    assert sorted(p.suffix for p in out.glob("model*")) == [".safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        a, b, c = (m(input_ids=_ids()).logits for m in (merged, with_adapter, plain))
    diff = (a - b).abs().max().item()
    print(f"merged vs base+adapter: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    assert (a - c).abs().max() > 1e-3                     # the merge did change the model
    assert AutoTokenizer.from_pretrained(out).chat_template  # chats like the run trained
    info = json.loads((out / export.EXPORT_INFO).read_text())
    assert info["run"] == "r1" and info["notes"] == [] and not any("16-bit" in m for m in messages)


def test_a_qlora_run_merges_into_the_16bit_base_and_says_so(garage_home, tiny_model_dir, tmp_path, capsys):
    from core.__main__ import main

    make_run(garage_home, tiny_model_dir, quant="qlora", checkpoints={3: True})
    assert main(["export", "r1", "--merged", str(tmp_path / "m"), "--checkpoint", "3"]) == 0
    assert "16-bit" in capsys.readouterr().out
    info = json.loads((tmp_path / "m" / "lora_garage_export.json").read_text())
    assert info["checkpoint"] == 3 and "16-bit" in info["notes"][0]
    # never overwrite: a second export into the same (now full) folder is refused
    assert main(["export", "r1", "--merged", str(tmp_path / "m")]) == 2


def test_adapter_zip(garage_home, tiny_model_dir, tmp_path, capsys):
    from core import export
    from core.__main__ import main

    make_run(garage_home, tiny_model_dir)
    target = tmp_path / "out" / "adapter.zip"
    assert main(["export", "latest", "--zip", str(target)]) == 0
    names = zipfile.ZipFile(target).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_garage_run.yaml"} <= set(names)
    with pytest.raises(GarageError, match="already exists"):
        export.zip_adapter("r1", target)
    with pytest.raises(GarageError, match=".zip"):
        export.zip_adapter("r1", tmp_path / "adapter.tar")


def test_merged_export_of_a_base_folder_still_marked_gguf_quantized(garage_home, tiny_model_dir, tmp_path, capsys):
    # a folder saved from a GGUF-loaded model keeps quantization_config {"quant_method": "gguf"} over plain
    # float weights; training ignores the marker, so export must too, and must not pass it on
    import shutil

    from transformers import AutoModelForCausalLM

    from core.__main__ import main

    base = tmp_path / "from-gguf"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gguf"}}))
    make_run(garage_home, base, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert main(["export", "r1", "--merged", str(tmp_path / "m")]) == 0, capsys.readouterr()
    assert "GGUF-quantized over plain safetensors" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=_ids()).logits.isfinite().all()
