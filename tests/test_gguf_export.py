"""GGUF export (issue 18): llama.cpp's own converter fetched once, f16 / q8_0 files that transformers reloads with the
adapter's logits, a Modelfile whose TEMPLATE renders what the jinja template renders, and the bad inputs.

The converter comes from the pinned llama-cpp-python sdist on PyPI (pip download, sha256 checked), fetched once per
session into a shared tools folder. The k-quant path (llama-cpp-python compiled) runs when it is installed."""

import errno
import json
import os
from pathlib import Path

import pytest

from core.errors import DiskFull, GarageError
from tests.helpers.runs import make_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def shared_tools(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(autouse=True)
def tools(shared_tools, monkeypatch):
    monkeypatch.setenv("LORA_GARAGE_TOOLS", str(shared_tools))
    return shared_tools


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_f16_and_q8_0_reload_with_the_adapters_logits_and_a_checked_modelfile(garage_home, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    import gguf as pypi_gguf
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.gguf import export as gguf_export
    from core.gguf import read as gguf_read
    from core.gguf import tools as gguf_tools

    from core import models
    from core.runs import resolve as run_files

    run = make_run(garage_home, tiny_model_dir)
    said = []
    out = tmp_path / "gguf"
    calls = {"resolve_run": 0, "load_tokenizer": 0}
    for module, name in ((run_files, "resolve_run"), (models, "load_tokenizer")):
        def counted(*a, _real=getattr(module, name), _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, name, counted)
    report = gguf_export.export_gguf("r1", out, ["f16", "q8_0"], say=said.append)
    assert calls == {"resolve_run": 1, "load_tokenizer": 1}  # the run resolved, the tokenizer loaded, once per export
    assert any("downloading llama.cpp's converter" in s or "using llama.cpp's converter" in s for s in said) \
        or (gguf_tools.converter_dir() / "VERIFIED").is_file()
    assert "sha256" in (gguf_tools.converter_dir() / "VERIFIED").read_text()
    assert pypi_gguf.__file__.startswith(os.path.dirname(os.path.dirname(torch.__file__)))  # app env untouched
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "Modelfile.f16", "README.txt", "export.json",
                                                     "r1-f16.gguf", "r1-q8_0.gguf"]
    # bits per weight are read from the file: 16 for f16 (plus f32 norms), 8.5 for q8_0 (a scale per 32)
    assert 16 <= report["files"]["f16"]["bits_per_weight"] < 16.5
    assert 8.5 <= report["files"]["q8_0"]["bits_per_weight"] < 9.5

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                    run / "adapter").eval()
    ids = [5, 17, 42, 99, 3, 250, 7, 64]
    want = _logits(ref, ids)
    for quant, tol in (("f16", 0.02), ("q8_0", 0.1)):
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"r1-{quant}.gguf", dtype=torch.float32)
        diff = (_logits(model, ids) - want).abs().max().item()
        print(f"{quant}: max |logit diff| vs base+adapter {diff:.4f} (tolerance {tol})")
        assert diff < tol

    # the Modelfile: FROM names a GGUF beside it; stops are the template's end-of-turn marker
    text = (out / "Modelfile").read_text()
    frm = text.splitlines()[0].split(" ", 1)[1]
    assert frm == "./r1-q8_0.gguf" and (out / frm).read_bytes()[:4] == b"GGUF"
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    assert gguf_read.metadata(out / "r1-q8_0.gguf")["tokenizer.chat_template"]
    assert all(r["same"] for r in report["modelfile"]["checked_conversations"])

    info = json.loads((out / "export.json").read_text())
    assert [r["quant"] for r in info["parity"]] == ["f16", "q8_0"]
    for row in info["parity"]:
        assert row["prompt_tokens_same"] == row["prompts"] > 0     # (a) token for token
        assert row["top1_agreement"] >= row["threshold"]["top1_at_least"]   # (b)
        assert "score_gguf" in row and "score_adapter" in row      # (c) the demo checker, side by side
        assert row["passed"], row["problems"]
    readme = (out / "README.txt").read_text()
    assert "ollama create" in readme and "llama-cli -m r1-q8_0.gguf" in readme and "lms import" in readme


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_llama3"])
def test_modelfile_template_renders_like_the_jinja_template(request, fixture):
    from core import models
    from core.data import tokenize as data_tokenize
    from core.gguf import modelfile

    tok = models.load_tokenizer(request.getfixturevalue(fixture))
    renderer = data_tokenize.Renderer(tok)
    bos = tok.bos_token if tok.bos_token and "bos_token" in renderer.template else ""
    pieces = modelfile.probe(renderer.render, bos, tok.eos_token)
    template = modelfile.go_template(pieces)
    rows = modelfile.check(template, pieces, renderer.render)
    assert len(rows) == 4 and all(r["same"] for r in rows), rows
    assert pieces.stops[0] == ("<|im_end|>" if fixture == "tiny_model_dir" else "<|eot_id|>")


def test_a_default_system_prompt_goes_to_SYSTEM():
    from core.gguf import modelfile
    from core.chat import GenSettings
    from jinja2 import Template

    # shaped like SmolLM2's: a system turn of its own when the chat has none
    src = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
           "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def render(messages, gen):
        return Template(src).render(messages=messages, add_generation_prompt=gen)

    pieces = modelfile.probe(render)
    assert pieces.default_system == "Be kind."
    template = modelfile.go_template(pieces)
    assert all(r["same"] for r in modelfile.check(template, pieces, render))
    def system_line(run_system):
        text = modelfile.write("m.gguf", template, pieces, GenSettings(), modelfile.system_prompt(run_system, pieces))
        return [line for line in text.splitlines() if line.startswith("SYSTEM")]

    assert system_line("") == ['SYSTEM """Be kind."""']            # the template's default
    assert system_line("You are Garage.") == ['SYSTEM """You are Garage."""']   # the run's data.system wins
    assert system_line("none") == []                                # the run trained without one


def test_a_fallback_template_model_gets_that_template_in_the_gguf_and_the_modelfile(garage_home, tiny_model_dir,
                                                                                   tmp_path):
    import shutil

    from core.gguf import export as gguf_export
    from core.gguf import read as gguf_read

    base = tmp_path / "no-template"       # the tiny Llama with its chat template taken away
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    make_run(garage_home, base)
    report = gguf_export.export_gguf("r1", tmp_path / "out", ["f16"], parity=False)
    embedded = gguf_read.metadata(tmp_path / "out" / "r1-f16.gguf")["tokenizer.chat_template"]
    assert "<|im_start|>" in embedded
    assert report["modelfile"]["template_from"] == "LoRA Garage fallback"
    assert "<|im_start|>" in (tmp_path / "out" / "Modelfile").read_text()


def test_bad_input(garage_home, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from core.gguf import export as gguf_export
    from core.gguf import tools as gguf_tools
    from core.__main__ import main

    make_run(garage_home, tiny_model_dir)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(GarageError, match="not an empty folder"):
        gguf_export.export_gguf("r1", full, ["f16"])
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    run2 = make_run(garage_home, tiny_model_dir, run_id="r2")
    import shutil
    shutil.rmtree(run2 / "adapter")
    assert main(["export", "r2", "--gguf", str(tmp_path / "x")]) == 2
    err = capsys.readouterr()
    assert "adapter" in (err.out + err.err) and not (tmp_path / "x").exists()

    # no compiler and no llama-cpp-python: a k-quant is refused before any work, naming the fix
    monkeypatch.setattr(gguf_tools, "quantizer_installed", lambda: False)
    monkeypatch.setattr(gguf_tools.shutil, "which", lambda name: None)
    with pytest.raises(GarageError, match="C\\+\\+ compiler") as e:
        gguf_export.export_gguf("r1", tmp_path / "k", ["q4_k_m"])
    assert "f16" in e.value.hint and not (tmp_path / "k").exists()


def test_a_disk_filling_mid_export_removes_the_partial_files(garage_home, tiny_model_dir, tmp_path, monkeypatch):
    from core.gguf import export as gguf_export
    from core.gguf import tools as gguf_tools

    make_run(garage_home, tiny_model_dir)
    real = gguf_tools.run_child
    calls = []

    def filling(args, converter, say, what):
        calls.append(args[0])
        if args[3] == "q8_0":   # the second file: the first is on disk, then the disk is full
            Path(args[2]).write_bytes(b"GGUF partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(args, converter, say, what)

    monkeypatch.setattr(gguf_tools, "run_child", filling)
    out = tmp_path / "out"
    with pytest.raises(DiskFull, match="partial files .*removed"):
        gguf_export.export_gguf("r1", out, ["f16", "q8_0"])
    assert calls == ["convert", "convert"] and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiskFull):
        gguf_export.export_gguf("r1", empty, ["f16", "q8_0"])
    assert empty.is_dir() and not any(empty.iterdir())   # the user's empty folder stays, empty


def test_the_go_template_renderer_follows_go_semantics():
    from core.gguf import gotemplate

    t = '{{- range $i, $m := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}[last]{{ end }}{{ $m.Role }}\n  {{- "x\\n" }}{{ end }}'
    data = {"Messages": [{"Role": "a"}, {"Role": "b"}]}
    assert gotemplate.render(t, data) == "ax\n[last]bx\n"
    with pytest.raises(ValueError, match="unsupported"):
        gotemplate.render("{{ printf \"%s\" .X }}", {"X": 1})


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it compiles llama.cpp on install: see README, "
                    "'Run it in Ollama / llama.cpp / LM Studio')")
def test_q4_k_m_through_llama_cpp_with_honest_bits_per_weight(garage_home, tiny_model_dir, tmp_path):
    from core.gguf import export as gguf_export

    make_run(garage_home, tiny_model_dir)
    report = gguf_export.export_gguf("r1", tmp_path / "out", ["q4_k_m"])
    f = report["files"]["q4_k_m"]
    # the tiny model's 64-wide rows cannot be k-quantized (blocks of 256): llama.cpp falls back to other types,
    # and the report says which, with the bits really stored
    assert "Q4_K" not in f["types"] and 4 < f["bits_per_weight"] < 9
    row = report["parity"][0]
    assert row["runtime"] == "llama.cpp" and row["prompt_tokens_same"] == row["prompts"]
    assert row["top1_agreement"] >= row["threshold"]["top1_at_least"], row
    assert (tmp_path / "out" / "Modelfile").read_text().startswith("FROM ./r1-q4_k_m.gguf")
    assert not (tmp_path / "out" / "r1-f16.gguf").exists()   # the f16 step file is not left behind


def test_without_llama_cpp_the_parity_check_reads_the_gguf_with_transformers(garage_home, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    from core.gguf import export as gguf_export
    from core.gguf import parity as gguf_parity

    make_run(garage_home, tiny_model_dir)
    monkeypatch.setattr(gguf_parity, "_has_llama_cpp", lambda: False)
    report = gguf_export.export_gguf("r1", tmp_path / "out", ["f16"])
    row = report["parity"][0]
    assert row["runtime"] == "transformers gguf_file" and row["passed"], row
    assert row["prompt_tokens_same"] == row["prompts"] > 0


def test_a_crash_in_llama_cpps_runtime_is_a_message_not_a_dead_app(tmp_path):
    """llama.cpp runs in its own process (gguf_child.py serve): a file it cannot load, or a C++ crash, ends that
    process; the app gets a GarageError naming how it ended."""
    import signal

    from core.gguf import tools as gguf_tools

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    child = gguf_tools.LlamaChild(bad)
    with pytest.raises(GarageError, match=r"llama.cpp's runtime ended \(exit code 1\) during 'meta' on broken.gguf"):
        child.ask("meta")
    child.close()

    if __import__("importlib").util.find_spec("llama_cpp") is None:
        return
    from core.gguf import export as gguf_export

    # a real GGUF, and the child dies under it (as it did with SIGSEGV in llama.cpp's AMX kernels)
    from tests.helpers.tiny import build_tiny_model
    home = Path(os.environ["LORA_GARAGE_HOME"])
    make_run(home, build_tiny_model(tmp_path / "tiny"))
    gguf_export.export_gguf("r1", tmp_path / "out", ["q8_0"], parity=False)
    child = gguf_tools.LlamaChild(tmp_path / "out" / "r1-q8_0.gguf")
    assert child.ask("meta")["template"]
    os.kill(child.proc.pid, signal.SIGSEGV)
    with pytest.raises(GarageError, match=r"ended \(killed by SIGSEGV\) during 'tokenize'"):
        child.ask("tokenize", text="hi", add_bos=False)
    child.close()


def test_a_gpt_neox_base_without_a_template_exports_and_answers_like_its_adapter(garage_home, tmp_path):
    """The second architecture (Pythia's family), saved by transformers 5 (rotary_pct lives in rope_parameters,
    where llama.cpp's converter does not look), with no chat template of its own."""
    from core.gguf import export as gguf_export
    from core.gguf import read as gguf_read
    from tests.helpers.tiny_neox import build_tiny_neox

    make_run(garage_home, build_tiny_neox(tmp_path / "neox"))
    report = gguf_export.export_gguf("r1", tmp_path / "out", ["f16"])
    meta = gguf_read.metadata(tmp_path / "out" / "r1-f16.gguf")
    assert meta["general.architecture"] == "gptneox"
    assert int(meta["gptneox.rope.dimension_count"]) == 4        # 0.25 of a 16-wide head: partial rotary kept
    assert report["modelfile"]["template_from"] == "LoRA Garage fallback"
    row = report["parity"][0]
    assert row["passed"] and row["prompt_tokens_same"] == row["prompts"], row
