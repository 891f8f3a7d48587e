import json
import time
import subprocess
import sys
from pathlib import Path

import pytest

from core import models
from core.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent


def test_local_folder_and_its_config(tiny_model_dir):
    assert models.resolve(str(tiny_model_dir)) == tiny_model_dir
    assert models.read_config(str(tiny_model_dir))["hidden_size"] == 64
    info = models.info(str(tiny_model_dir))
    assert info.architecture == "LlamaForCausalLM" and info.has_chat_template and info.params > 0


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        models.resolve(str(tmp_path / "nope"))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelError, match="offline"):
        models.resolve("someone/not-cached-model")
    assert time.time() - t < 10


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle"):
        models.check_safetensors(tmp_path)


@pytest.mark.slow
def test_builtin_converts_once_then_loads_and_answers(garage_home):
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve(models.BUILTIN_ID)
    marker = json.loads((path / "CONVERTED").read_text())
    mtime = (path / "model.safetensors").stat().st_mtime
    t = time.time()
    assert models.resolve(models.BUILTIN_ID) == path  # second call: no conversion
    assert time.time() - t < 1 and (path / "model.safetensors").stat().st_mtime == mtime
    assert marker["seconds"] > 0
    assert "quantization_config" not in json.loads((path / "config.json").read_text())  # plain fp32, trainable

    tok = models.load_tokenizer(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_threads_that_import_transformers_for_the_first_time_at_once_all_load(tiny_model_dir):
    """The app's handlers run in threads (Inspect, chat, the VRAM check): in a fresh process, eight of them loading a
    tokenizer at the same moment all get one (models.IMPORT_LOCK), none an ImportError from a half-imported module."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, threading\n"
            "from core import models\n"
            "barrier, out = threading.Barrier(8), []\n"
            "def go():\n"
            "    barrier.wait()\n"
            "    try:\n"
            "        out.append(type(models.load_tokenizer(models.Path(sys.argv[1]))).__name__)\n"
            "    except Exception as e:\n"
            "        out.append(f'{type(e).__name__}: {e}')\n"
            "ts = [threading.Thread(target=go) for _ in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(out)\n"
            "sys.exit(0 if all('Error' not in o for o in out) and len(out) == 8 else 1)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def test_warm_imports_loads_what_the_first_inspect_and_chat_need():
    """ui.layout.launch runs this in the background: the first click then finds the libraries imported."""
    code = ("import sys\nfrom core import models\nmodels.warm_imports()\n"
            "print(all(m in sys.modules for m in models.WARM_MODULES + ('transformers.models.auto.tokenization_auto',)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
