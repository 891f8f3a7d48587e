"""Padding-free batches: the flattened batch gives every row the same losses as running it alone, the kernel check
catches a model that would let rows see each other (and training then falls back to padded, length-grouped
batches, saying so), tokens/s counts only real tokens, and the MFU arithmetic. Timings are in bench/throughput.py."""

import json

import pytest
import torch

from core import events as ev
from core.train.collate import FlatCollator, PadCollator, isolation_check

LENGTHS = [23, 5, 17, 9, 31, 12]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    models = {impl: AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                         attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    return models


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        labels = [t if k >= n // 3 else -100 for k, t in enumerate(ids)]  # a masked prompt, a trained answer
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy of the batch, shaped like its labels (0 where a label is ignored)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("capacity", [None, 0])
def test_a_flattened_batch_gives_each_row_the_losses_it_has_alone(tiny, impl, capacity):
    model, data = tiny[impl], rows()
    flat = FlatCollator(pad_id=0, capacity=capacity)(data)
    assert "attention_mask" not in flat
    n_seqs = flat["input_ids"].shape[0]
    assert n_seqs < len(data)  # rows really were put together
    flat_ce = token_losses(model, flat)
    # map every row back to where the collator put it: position 0 starts a row; padding is position 0 too
    found = 0
    for b in range(n_seqs):
        pos = flat["position_ids"][b].tolist()
        starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
        for s, e in zip(starts, starts[1:]):
            length = e - s
            ids = flat["input_ids"][b, s:e].tolist()
            match = [r for r in data if r["input_ids"] == ids]
            if not match:
                assert length == 1  # a pad token alone
                continue
            found += 1
            alone = PadCollator(pad_id=0)([match[0]])
            alone_ce = token_losses(model, alone)[0]
            torch.testing.assert_close(flat_ce[b, s:e], alone_ce, atol=2e-5, rtol=1e-4)
    assert found == len(data)


def test_flat_and_padded_batches_give_the_same_model_loss(tiny):
    """What Trainer optimises: the model's mean loss over the batch, with the same tokens counted."""
    model, data = tiny["sdpa"], rows(1)
    with torch.no_grad():
        padded = model(**PadCollator(pad_id=0)(data), use_cache=False).loss
        flat = model(**FlatCollator(pad_id=0)(data), use_cache=False).loss
    torch.testing.assert_close(flat, padded, atol=2e-5, rtol=1e-5)


def test_collators_count_only_real_tokens_and_pack_tighter():
    data = rows()
    pad, flat = PadCollator(pad_id=0, multiple_of=8), FlatCollator(pad_id=0, multiple_of=8)
    a, b = pad(data), flat(data)
    assert pad.tokens == flat.tokens == sum(LENGTHS)
    assert pad.attn_sq == flat.attn_sq == sum(n * n for n in LENGTHS)
    assert b["input_ids"].numel() < a["input_ids"].numel()
    assert b["input_ids"].shape[1] == a["input_ids"].shape[1] == 32  # never longer than the longest row
    assert (b["labels"] != -100).sum() == (a["labels"] != -100).sum()


def test_the_isolation_check_catches_a_leaking_mask(tiny, monkeypatch):
    ok, detail = isolation_check(tiny["sdpa"], 256)
    assert ok, detail
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # a kernel without it
    ok, detail = isolation_check(tiny["sdpa"], 256)
    assert not ok, detail


def _prepared_and_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    return tok, model


class _Events:
    def __init__(self):
        self.lines = []

    def log(self, level, message):
        self.lines.append((level, message))


def test_training_defaults_to_padding_free_and_falls_back_with_a_log_line(tiny_model_dir, monkeypatch, capsys,
                                                                          tmp_path):
    from core.config import RunConfig
    from core.train.child import pick_collator

    tok, model = _prepared_and_model(tiny_model_dir)
    cfg = RunConfig()
    events = _Events()
    collator, group = pick_collator(cfg, model, tok, "cpu", events)
    assert isinstance(collator, FlatCollator) and group
    assert "padding-free" in capsys.readouterr().out and not events.lines

    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    # a kernel patched in memory is no file or version the stored verdict's key can see: a home without it
    monkeypatch.setenv("LORA_GARAGE_HOME", str(tmp_path / "another-home"))
    collator, group = pick_collator(cfg, model, tok, "cpu", events)
    assert type(collator) is PadCollator and group
    assert "padding-free batches are off" in capsys.readouterr().err
    assert events.lines and events.lines[0][0] == "warning"


def test_the_estimate_of_a_cpu_run_is_a_cpu_estimate(tiny_model_dir, tmp_path):
    from core.config import RunConfig
    from core.train.child import write_estimate

    cfg = RunConfig()
    cfg.model.source = str(tiny_model_dir)
    write_estimate(tmp_path, cfg, tiny_model_dir, _Events(), "cpu")
    assert json.loads((tmp_path / "estimate.json").read_text())["settings"]["device"] == "cpu"


def test_mfu_arithmetic():
    from core.train.callbacks import FlopsModel

    f = FlopsModel(params=1_000_000, layers=2, hidden=64, peak=1e12)
    # 1000 tokens in rows of 100: 4 * 1e6 * 1000 + 6 * 2 * 64 * (10 * 100**2) = 4.0768e9 FLOPs in 1 ms
    assert f.mfu(1000, 10 * 100 ** 2, 1e-3) == pytest.approx(4.0768e9 / 1e-3 / 1e12, abs=1e-4)


# ---------------------------------------------------------------- Liger kernels: on only where they can be right

@pytest.fixture
def fake_liger(monkeypatch):
    """Installs an installed-looking liger-kernel distribution (metadata + the one table liger_plan reads), so the
    decision logic can be checked on a machine without Triton. It never patches anything: nothing here runs a
    kernel. Its modules are dropped afterwards."""
    import sys

    yield lambda tmp_path, **kw: _fake_liger(tmp_path, monkeypatch, **kw)
    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        del sys.modules[name]


def _fake_liger(tmp_path, monkeypatch, version="0.6.0", types=("llama",)):
    site = tmp_path / "site"
    (site / "liger_kernel" / "transformers").mkdir(parents=True)
    (site / "liger_kernel" / "__init__.py").write_text("")
    (site / "liger_kernel" / "transformers" / "__init__.py").write_text("")
    table = "BROKEN_NAME" if types == "BROKEN" else f"{{t: None for t in {list(types)!r}}}"
    (site / "liger_kernel" / "transformers" / "monkey_patch.py").write_text(f"MODEL_TYPE_TO_APPLY_LIGER_FN = {table}\n")
    dist = site / f"liger_kernel-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: liger-kernel\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(site))
    import sys

    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)


def _plan(model, tmp_path, device="cuda", **overrides):
    from core import config
    from core.train.child import liger_plan

    cfg = config.from_dict({"model": {"liger_kernel": True}})
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = liger_plan(cfg, model, device, ev.EventLog(tmp_path))
    warnings = [e["message"] for e in ev.read(tmp_path)[0] if e.get("level") == "warning"]
    return plan, warnings


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))


def test_liger_is_off_and_says_why_on_the_cpu_or_when_not_installed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import importlib.metadata

    from transformers import AutoModelForCausalLM

    real_version = importlib.metadata.version

    def version(name):
        if name == "liger-kernel":  # as on a machine without it, even where it is installed
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    plan, warnings = _plan(model, tmp_path, device="cpu")
    assert plan is None and "need a CUDA GPU" in warnings[0]
    assert "Liger is off" in capsys.readouterr().err  # the line lands in train.log
    plan, warnings = _plan(model, tmp_path / "b", device="cuda")
    assert plan is None and "pip install liger-kernel" in warnings[0]


def test_liger_is_off_for_old_versions_and_unsupported_model_types(tiny_model_dir, tmp_path, fake_liger):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    fake_liger(tmp_path / "old", version="0.2.1")
    plan, warnings = _plan(model, tmp_path / "a")
    assert plan is None and "older than 0.3.0" in warnings[0]
    fake_liger(tmp_path / "other", types=("qwen2",))
    plan, warnings = _plan(model, tmp_path / "b")
    assert plan is None and "no kernels for model type 'llama'" in warnings[0]
    fake_liger(tmp_path / "broken", types="BROKEN")  # a release whose import fails under this transformers
    plan, warnings = _plan(model, tmp_path / "c")
    assert plan is None and "cannot be imported" in warnings[0] and "NameError" in warnings[0]


def test_liger_fuses_the_loss_only_when_lm_head_is_a_plain_float_layer(tiny_model_dir, tmp_path, monkeypatch,
                                                                      fake_liger):
    from transformers import AutoModelForCausalLM

    fake_liger(tmp_path)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))  # noqa: E731
    plan, warnings = _plan(_lora(load(), "all-linear"), tmp_path / "a")
    assert not warnings
    assert plan == {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                    "cross_entropy": False}
    # LoRA on lm_head: the fused loss reads lm_head.weight and would skip the adapter, so plain Liger CE instead
    plan, _ = _plan(_lora(load(), ["q_proj", "lm_head"]), tmp_path / "b")
    assert plan["fused_linear_cross_entropy"] is False and plan["cross_entropy"] is True
    # a 4-bit base computing in fp16 (a GPU without bf16), then in bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan, _ = _plan(_lora(load(), "all-linear"), tmp_path / "c", quant__method="qlora")
    assert plan["fused_linear_cross_entropy"] is False and plan["swiglu"] is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan, _ = _plan(_lora(load(), "all-linear"), tmp_path / "d", quant__method="qlora")
    assert plan["fused_linear_cross_entropy"] is True


def test_liger_setting_off_changes_nothing(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from core import config
    from core.train.child import liger_plan

    cfg = config.from_dict({})
    assert cfg.model.liger_kernel is False
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert liger_plan(cfg, model, "cuda", ev.EventLog(tmp_path)) is None


# ---------------------------------------------------------------- bench/throughput.py: its arithmetic and --json

def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_window_leaves_out_the_warm_up_steps():
    bench = _bench()
    # step -> (time, cumulative real tokens): 10 s and 100 tokens per step after a slow first step
    r = {"log": {1: (100.0, 100), 2: (110.0, 200), 3: (120.0, 300), 4: (130.0, 400)}}
    assert bench.window(r, warmup=1) == (300, 30.0, 3)
    assert bench.window(r, warmup=2) == (200, 20.0, 2)


def test_bench_json_mode_prints_one_object_as_its_last_line(monkeypatch, capsys, tmp_path):
    bench = _bench()
    rates = {"A": 100.0, "B": 150.0, "C": 250.0}

    def fake_arm(arm, args, workdir, k):  # a straight line: rates[arm] tokens per second, 1 s per step
        log = {s: (float(s), rates[arm] * s) for s in range(1, args.steps + 1)}
        return {"log": log, "rss_peak": 2**30, "cuda_peak": None, "log_lines": []}

    monkeypatch.setattr(bench, "run_arm", fake_arm)
    monkeypatch.setattr(bench, "resolve_model", lambda args, workdir: setattr(args, "model_path", tmp_path))
    monkeypatch.setattr(bench, "tokens_per_word", lambda args: 1.5)
    monkeypatch.setattr(bench, "data_lengths", lambda args: {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main() sets it for its arms; keep it from leaking past this test
    monkeypatch.setattr("sys.argv", ["throughput.py", "--steps", "6", "--warmup", "2", "--json",
                                     "--out", str(tmp_path / "r.json")])
    bench.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result) == {"arms", "B_over_A", "C_over_A"}
    assert result["B_over_A"] == 1.5 and result["C_over_A"] == 2.5
    assert result["arms"]["A"]["tokens_per_s"] == 100.0 and result["arms"]["A"]["s_per_step"] == 1.0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["B_over_A"] == 1.5 and "machine" in saved
