"""The VRAM estimator as arithmetic: shapes from config.json, sanity tables, published measurements, the
fit verdict, "make it fit" suggestions, and the `python -m core estimate` command. No torch here; the checks
against real tensors are in test_vram_real.py."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import config
from core.estimate import vram
from core.commands import estimate as estimate_cmd
from core.errors import ModelError
from tests.helpers.shapes import LLAMA31_8B

GIB = 1024 ** 3

LLAMA33_70B = dict(LLAMA31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
MISTRAL_7B = dict(LLAMA31_8B, model_type="mistral", vocab_size=32768)
LLAMA32_3B = dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                  head_dim=128)
QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def est(cfg, **kw):
    return vram.estimate(vram.shape_from_config(cfg), vram.Settings(**kw))


# ---------------------------------------------------------------- shapes

def test_parameter_counts_match_the_published_sizes():
    assert vram.shape_from_config(LLAMA31_8B).total_params == 8_030_261_248          # "8.03B"
    assert vram.shape_from_config(estimate_cmd.BUILTIN_CONFIG).total_params == 134_515_008  # SmolLM2-135M
    assert vram.shape_from_config(QWEN25_05B).total_params == 494_032_768            # Qwen2.5-0.5B, with qkv bias


def test_a_folder_with_only_config_json_is_enough(tmp_path):
    from core.models import read_config

    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    shape = vram.shape_from_config(read_config(str(tmp_path)))
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.head_dim, shape.tied) == (4096, 32, 8, 128, False)


def test_multimodal_configs_use_their_text_config():
    shape = vram.shape_from_config({"model_type": "llava", "text_config": LLAMA31_8B})
    assert shape.total_params == 8_030_261_248 and any("language model" in n for n in shape.notes)


def test_a_config_without_sizes_is_a_user_error():
    with pytest.raises(ModelError, match="hidden_size"):
        vram.shape_from_config({"model_type": "bert", "vocab_size": 10})


# ---------------------------------------------------------------- sanity tables

@pytest.mark.parametrize("cfg", [QWEN25_05B, LLAMA32_3B, MISTRAL_7B, LLAMA31_8B], ids=["0.5B", "3B", "7B", "8B"])
def test_qlora_below_lora_below_full(cfg):
    for seq, batch, ckpt in [(s, b, c) for s in (512, 2048) for b in (1, 4) for c in (False, True)]:
        t = {m: est(cfg, method=m, seq_len=seq, batch_size=batch, grad_checkpointing=ckpt).total_bytes
             for m in ("full", "lora", "qlora")}
        assert t["qlora"] < t["lora"] < t["full"], (seq, batch, ckpt, t)


def test_peft_kbit_upcast_can_make_qlora_cost_more_than_lora():
    """peft's prepare_model_for_kbit_training makes embeddings fp32, so the residual stream and the MLP (bnb
    returns its input's dtype) run in fp32: more activations. For a small model with a big vocabulary, or long
    sequences without checkpointing, that outweighs the 4-bit weights. core/train/child.py skips the upcast, and
    then QLoRA is always the lighter one."""
    lora = est(QWEN25_05B, method="lora", seq_len=512)
    upcast = est(QWEN25_05B, method="qlora", seq_len=512, upcast_non_quantized=True)
    assert upcast.total_bytes > lora.total_bytes
    assert upcast.components["weights"] < lora.components["weights"]
    assert upcast.components["activations"] > lora.components["activations"]
    assert est(QWEN25_05B, method="qlora", seq_len=512).total_bytes < lora.total_bytes
    long = dict(seq_len=2048, batch_size=4)
    assert est(LLAMA31_8B, method="qlora", upcast_non_quantized=True, **long).total_bytes > \
        est(LLAMA31_8B, method="lora", **long).total_bytes


@pytest.mark.parametrize("method", vram.METHODS)
def test_memory_grows_with_batch_and_sequence(method):
    for ckpt in (False, True):
        run = dict(method=method, grad_checkpointing=ckpt)
        by_batch = [est(LLAMA31_8B, **run, batch_size=b).total_bytes for b in (1, 2, 4, 8)]
        by_seq = [est(LLAMA31_8B, **run, seq_len=s).total_bytes for s in (256, 512, 1024, 4096)]
        assert by_batch == sorted(set(by_batch)) and by_seq == sorted(set(by_seq))


@pytest.mark.parametrize("method", vram.METHODS)
def test_checkpointing_lowers_activations(method):
    for seq in (256, 2048):
        off = est(LLAMA31_8B, method=method, seq_len=seq)
        on = est(LLAMA31_8B, method=method, seq_len=seq, grad_checkpointing=True)
        assert on.components["activations"] < off.components["activations"]
        assert on.total_bytes < off.total_bytes


def test_other_knobs_move_memory_the_right_way():
    base = dict(method="qlora", seq_len=1024, batch_size=2)
    assert est(LLAMA31_8B, **base, attn="eager").total_bytes > est(LLAMA31_8B, **base).total_bytes
    assert est(LLAMA31_8B, **base, optimizer="adamw_8bit").components["optimizer"] < \
        est(LLAMA31_8B, **base).components["optimizer"] / 3
    assert est(LLAMA31_8B, **base, double_quant=False).components["weights"] > \
        est(LLAMA31_8B, **base).components["weights"]
    assert est(LLAMA31_8B, **base, rank=64).components["adapter"] == 4 * est(LLAMA31_8B, **base).components["adapter"]
    cpu = est(LLAMA31_8B, **base, device="cpu")
    # no CUDA context, no allocator slack: the process's own runtime (Python, torch, the libraries) instead
    assert cpu.components["overhead"] == cpu.details["dequant_buffer"] + vram.K.CPU_RUNTIME_BYTES
    assert cpu.details["cpu_runtime"] == vram.K.CPU_RUNTIME_BYTES and cpu.details["cuda_context"] == 0


def test_components_sum_to_the_total_and_serialise():
    e = est(LLAMA31_8B, method="qlora", seq_len=2048, grad_checkpointing=True)
    assert set(e.components) == set(vram.COMPONENTS)
    assert sum(e.components.values()) == e.total_bytes
    assert all(isinstance(v, int) and v >= 0 for v in e.components.values())
    assert json.loads(json.dumps(e.to_dict()))["total_bytes"] == e.total_bytes


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="optimizer"):
        est(LLAMA31_8B, optimizer="sgd")


# ---------------------------------------------------------------- published measurements

# Unsloth's "context length benchmarks" (docs.unsloth.ai/basics/unsloth-benchmarks, checked 2026): Llama 3.1 8B
# Instruct, 4-bit QLoRA on all linear layers, rank 32, batch 1, sequences padded to the length; the longest
# context "Hugging Face + FA2" trained without running out of memory, per GPU size. 8 GB: OOM. We assume their
# HF script called peft's prepare_model_for_kbit_training (the common recipe): upcast_non_quantized=True.
UNSLOTH_HF_FA2_8B = {12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454}


@pytest.mark.parametrize("gpu_gb,context", UNSLOTH_HF_FA2_8B.items())
def test_llama31_8b_qlora_matches_published_max_context(gpu_gb, context):
    e = est(LLAMA31_8B, method="qlora", rank=32, alpha=32, dropout=0.0, seq_len=context,
            grad_checkpointing=True, attn="flash_attention_2", upcast_non_quantized=True)
    ratio = e.total_bytes / (gpu_gb * GIB)
    # At the longest context that fitted, the peak was at most the card: our estimate reads 0.88-1.02 of it.
    assert 0.85 <= ratio <= 1.05, ratio


def test_llama31_8b_qlora_does_not_fit_8gb_and_llama33_70b_fits_80_not_48():
    small = est(LLAMA31_8B, method="qlora", rank=32, seq_len=256, grad_checkpointing=True, optimizer="adamw_8bit",
                upcast_non_quantized=True)
    assert small.total_bytes > 8 * GIB                                        # HF + FA2: OOM on 8 GB
    at_max = est(LLAMA33_70B, method="qlora", rank=32, alpha=32, dropout=0.0, seq_len=6916,
                 grad_checkpointing=True, attn="flash_attention_2", upcast_non_quantized=True)
    assert 0.9 <= at_max.total_bytes / (80 * GIB) <= 1.05                      # 6,916 tokens on 80 GB
    assert est(LLAMA33_70B, method="qlora", rank=32, seq_len=256, grad_checkpointing=True,
               upcast_non_quantized=True).total_bytes > 48 * GIB


def test_qlora_paper_65b_in_48gb():
    """QLoRA (Dettmers et al. 2023): LLaMA-65B finetunes on one 48 GB GPU (r=64, 512 tokens, checkpointing;
    their qlora.py keeps embeddings in bf16, so no fp32 upcast)."""
    llama65 = dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                   num_attention_heads=64, vocab_size=32000, tie_word_embeddings=False)
    e = est(llama65, method="qlora", rank=64, alpha=16, seq_len=512, grad_checkpointing=True)
    assert 40 * GIB < e.total_bytes < 48 * GIB


# ---------------------------------------------------------------- verdict and suggestions

def test_verdict_bands():
    assert vram.verdict(10 * GIB, 24 * GIB).status == "fits"
    tight = vram.verdict(23 * GIB, 24 * GIB)
    assert tight.status == "tight" and tight.margin == GIB and tight.fits
    short = vram.verdict(25 * GIB, 24 * GIB, gpu_free_bytes=20 * GIB)
    assert short.status == "does not fit" and short.margin == -5 * GIB and not short.fits
    assert "5.0 GB short" in short.message
    assert vram.verdict(21 * GIB, 24 * GIB, gpu_free_bytes=20 * GIB).status == "does not fit"   # others hold memory


def test_suggestions_fit_and_apply_to_a_run_config():
    cfg = config.apply_overrides(config.RunConfig(), ["data.max_len=2048", "train.batch_size=4", "train.grad_accum=2"])
    shape = vram.shape_from_config(LLAMA31_8B)
    settings = vram.settings_from_config(cfg)
    usable = vram.card_bytes(16)
    assert vram.verdict(vram.estimate(shape, settings), usable).status == "does not fit"
    found = vram.suggest(shape, settings, usable)
    assert found and found[0].changes["quant.method"] == "qlora"
    for s in found:
        assert vram.verdict(s.estimate, usable).fits
        new = config.apply_overrides(cfg, [f"{k}={v}" for k, v in s.changes.items()]).validate()
        assert vram.estimate(shape, vram.settings_from_config(new)).total_bytes == s.estimate.total_bytes
        assert new.train.batch_size * new.train.grad_accum >= 8       # the effective batch is kept


def test_suggestions_when_it_already_fits_and_when_nothing_does():
    shape = vram.shape_from_config(LLAMA31_8B)
    assert vram.suggest(shape, vram.Settings(method="qlora"), vram.card_bytes(80))[0].changes == {}
    assert vram.suggest(shape, vram.Settings(method="lora"), vram.card_bytes(6)) == []
    assert vram.smallest(shape, vram.Settings(method="lora")).total_bytes > vram.card_bytes(6)


def test_settings_from_config_reads_every_memory_field():
    cfg = config.apply_overrides(config.RunConfig(), [
        "quant.method=qlora", "quant.double_quant=false", "lora.r=8", "lora.targets=q_proj,v_proj",
        "train.batch_size=3", "data.max_len=1024", "train.grad_checkpointing=true", "train.optimizer=adamw_8bit",
        "model.attn_implementation=eager"])
    s = vram.settings_from_config(cfg)
    assert (s.method, s.double_quant, s.rank, s.targets, s.batch_size, s.seq_len, s.grad_checkpointing,
            s.optimizer, s.attn) == ("qlora", False, 8, "q_proj,v_proj", 3, 1024, True, "adamw_8bit", "eager")
    assert vram.settings_from_config(cfg, method="full").method == "full"


# ---------------------------------------------------------------- the command

def _run_cli(capsys, *argv):
    parser = argparse.ArgumentParser()
    estimate_cmd.add_arguments(parser)
    assert estimate_cmd.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    return tmp_path


def test_cli_json(capsys, llama_dir):
    out = json.loads(_run_cli(capsys, "--model", str(llama_dir), "--method", "qlora", "--seq-len", "2048",
                              "--grad-checkpointing", "--json", "--gpu-gb", "24"))
    assert out["method"] == "qlora" and out["fits"] is True and out["gpu"]["source"] == "chosen"
    assert sum(out["components"].values()) == out["total_bytes"] and set(out["components"]) == set(vram.COMPONENTS)
    short = json.loads(_run_cli(capsys, "--model", str(llama_dir), "--method", "lora", "--seq-len", "2048",
                                "--json", "--gpu-gb", "16"))
    assert short["fits"] is False and short["suggestions"][0]["changes"]["quant.method"] == "qlora"


def test_cli_without_a_gpu_reading(capsys):
    out = json.loads(_run_cli(capsys, "--json"))           # the built-in model; this machine has no GPU
    assert out["gpu"] is None and out["fits"] is None and out["total_bytes"] > 0


def test_cli_table_and_nothing_fits(capsys, llama_dir):
    text = _run_cli(capsys, "--model", str(llama_dir), "--gpu-gb", "6", "--method", "qlora")
    assert "full" in text and "LoRA" in text and "QLoRA" in text and "does not fit" in text
    assert "Nothing fits in 5.5 GB" in text


def test_cli_stays_light(llama_dir):
    """The estimate path must not import torch / transformers (the UI and CLI need it fast)."""
    code = ("import sys, argparse; from core.commands import estimate as e; p = argparse.ArgumentParser(); "
            f"e.add_arguments(p); e.run(p.parse_args(['--model', {str(llama_dir)!r}, '--json'])); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- GRPO (issue 30)

def test_grpo_counts_every_completion_and_only_their_logits():
    from tests.helpers.shapes import LLAMA31_8B

    shape = vram.shape_from_config(LLAMA31_8B)
    grpo = vram.estimate(shape, vram.Settings(method="qlora", batch_size=2, seq_len=200, objective="grpo",
                                              generations=4, completion_len=56))
    sft = vram.estimate(shape, vram.Settings(method="qlora", batch_size=8, seq_len=256))
    # the policy's step runs on 2 x 4 sequences of 200 + 56 tokens, as an SFT batch of 8 x 256 would ...
    assert grpo.details["layer_saved"] == sft.details["layer_saved"]
    # ... but TRL keeps the logits of the 56 completion tokens only
    assert grpo.components["logits"] == pytest.approx(sft.components["logits"] * 56 / 256, rel=1e-6)
    assert grpo.details["generation_kv_cache"] == 8 * 256 * shape.layers * 2 * shape.kv_dim * 2
    assert sum(grpo.components.values()) == grpo.total_bytes
    note = next(n for n in grpo.notes if n.startswith("GRPO:"))
    assert "2 prompts x 4 generations = 8 completions" in note and "the largest part is" in note


def test_grpo_reference_only_with_beta_and_generation_counts_when_it_is_the_larger_phase():
    from tests.helpers.shapes import LLAMA31_8B

    # a deep full-head (no GQA) model with a small vocabulary: there the KV cache (4 x layers x hidden bytes a
    # token) outgrows what a checkpointed step keeps (2 x layers x hidden, plus one layer's activations)
    shape = vram.shape_from_config({**LLAMA31_8B, "num_key_value_heads": 32, "vocab_size": 32000,
                                    "num_hidden_layers": 80})
    base = dict(method="qlora", batch_size=1, seq_len=2048, objective="grpo", generations=16, completion_len=64,
                grad_checkpointing=True)
    no_ref = vram.estimate(shape, vram.Settings(**base))
    ref = vram.estimate(shape, vram.Settings(**base, beta=0.04))
    assert no_ref.details["grpo_reference_forward"] == 0 and ref.details["grpo_reference_forward"] > 0
    assert "no reference (grpo_beta 0)" in " ".join(no_ref.notes)
    # checkpointing keeps the step small; 16 x 2112 tokens of full-head KV cache are not
    step = no_ref.components["activations"] + no_ref.components["logits"]
    assert ref.components["generation"] == max(0, max(ref.details["generation_kv_cache"] +
                                                      ref.details["generation_logits"],
                                                      ref.details["grpo_reference_forward"]) - step)
    assert ref.components["generation"] > 0 and "the generation is the larger phase" in " ".join(ref.notes)
    sft = vram.estimate(shape, vram.Settings(method="qlora"))
    assert sft.components["generation"] == 0 and sft.details["generation_kv_cache"] == 0


def test_settings_from_config_carry_grpo():
    from core.config import RunConfig

    cfg = RunConfig()
    cfg.train.objective, cfg.train.grpo_generations, cfg.train.grpo_max_completion, cfg.train.grpo_beta = \
        "grpo", 6, 99, 0.1
    s = vram.settings_from_config(cfg)
    assert (s.objective, s.generations, s.completion_len, s.beta) == ("grpo", 6, 99, 0.1)
