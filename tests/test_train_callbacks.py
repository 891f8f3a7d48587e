"""The training child's safety checks, on any CPU: 4-bit layers keep a layout that has a backward, gradients
reach every trainable tensor before the first update, and a library warning that results may be wrong ends the
run. Tiny models built here; the real bitsandbytes 4-bit path on the tiny Llama."""

import warnings

import pytest
import torch

from core import events as ev
from core import models
from core.train import child as training
from core.config import RunConfig
from core.errors import RunError
from core.train.callbacks import Context, check_gradients_flow, gradient_problems


def _qlora_cfg(model_dir) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = str(model_dir)
    cfg.quant.method, cfg.quant.quant_type, cfg.quant.double_quant = "qlora", "nf4", True
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0  # no dropout: two passes must be comparable
    return cfg


def _lora_b_nonzero(model, seed: int = 1) -> None:
    """peft starts B at zero, which makes every A gradient zero; a seeded B lets the test see them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(model) -> dict[str, torch.Tensor]:
    model.train()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every Linear4bit believes the CPU has AVX512-BF16 (the flag is read at the layer's init), so the repack
    path is taken on any CPU, with or without the instruction."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def test_4bit_lora_gradients_are_the_same_with_and_without_the_start_up_check(tiny_model_dir, avx512bf16_cpu,
                                                                               tmp_path):
    cfg = _qlora_cfg(tiny_model_dir)
    tok = models.load_tokenizer(tiny_model_dir)

    def trained_model():
        torch.manual_seed(0)
        model = training.add_lora(training.load_model(cfg, "cpu"), cfg)
        _lora_b_nonzero(model)
        return model

    plain = _grads(trained_model())

    checked = trained_model()
    events = ev.EventLog(tmp_path)
    training.pick_collator(cfg, checked, tok, "cpu", events)      # the padding-free check: eval + no_grad
    checked.eval()
    with torch.no_grad():                                           # an eval pass / a sample at a checkpoint
        checked(input_ids=torch.tensor([[5, 6, 7, 8]]))
    events.close()
    assert models.inference_packed_layers(checked) == []
    after = _grads(checked)

    assert plain.keys() == after.keys() and len(plain) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(after[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_guard_the_check_would_repack_every_4bit_layer(tiny_model_dir, avx512bf16_cpu, tmp_path):
    """The control arm: the simulated CPU really takes bitsandbytes' repack path, so the test above can fail.
    No backward is run through the repacked layers (their kernel needs the real instruction)."""
    import bitsandbytes as bnb

    from core.train.collate import isolation_check

    cfg = _qlora_cfg(tiny_model_dir)
    model = training.add_lora(training.load_model(cfg, "cpu"), cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # what the layers had before load_model switched it off
    assert models.inference_packed_layers(model) == []
    isolation_check(model, model.get_input_embeddings().num_embeddings)
    assert len(models.inference_packed_layers(model)) == 14


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 8)
        self.second = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _peft_two_linears():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(TwoLinears(), LoraConfig(r=2, lora_alpha=4, target_modules=["first", "second"]))


def _backward(model) -> None:
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()


def test_fresh_lora_gradients_pass_the_preflight():
    model = _peft_two_linears()
    _backward(model)
    # B starts at zero, so every A gradient is zero by construction and not a problem
    assert all(not p.grad.any() for n, p in model.named_parameters() if "lora_A" in n)
    assert gradient_problems(model) == []
    check_gradients_flow(model)


def test_a_base_layer_without_a_backward_fails_the_preflight_naming_the_tensors():
    """What the repacked 4-bit layer did: the base layer's output carries no gradient back to its input, so the
    LoRA weights before it learn nothing."""
    model = _peft_two_linears()
    second = model.base_model.model.second.base_layer
    second.register_forward_hook(lambda mod, inp, out: out.detach())
    _backward(model)
    problems = gradient_problems(model)
    assert problems == ["base_model.model.first.lora_B.default.weight: all zero"]
    with pytest.raises(RunError, match="gradients do not reach 1 trainable tensors.*first.lora_B") as e:
        check_gradients_flow(model)
    assert "no weight was changed" in e.value.hint


def test_missing_and_non_finite_gradients_are_named():
    model = _peft_two_linears()
    _backward(model)
    params = dict(model.named_parameters())
    params["base_model.model.second.lora_B.default.weight"].grad[0, 0] = float("nan")
    params["base_model.model.first.lora_B.default.weight"].grad = None
    assert gradient_problems(model) == ["base_model.model.first.lora_B.default.weight: no gradient",
                                        "base_model.model.second.lora_B.default.weight: not finite"]
    # with fp16 loss scaling an inf/NaN gradient only skips the step: left to the NaN bookkeeping
    assert gradient_problems(model, finite=False) == ["base_model.model.first.lora_B.default.weight: no gradient"]


def test_a_warning_that_results_may_be_wrong_fails_the_run():
    """The real warning torch gives when backward runs through an op without an autograd kernel (bitsandbytes'
    forward-only 4-bit kernel gave exactly this one) is raised, and classified as a failure with its text."""
    lib = torch.library.Library("lg_test_fwd_only", "DEF")
    lib.define("f(Tensor x) -> Tensor")
    lib.impl("f", lambda x: x * 2, "CPU")
    x = torch.ones(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=training.WRONG_RESULTS_WARNING)
        y = torch.ops.lg_test_fwd_only.f(x * 1)
        with pytest.raises(UserWarning, match="silently incorrect") as caught:
            y.sum().backward()
    ctx = Context()
    ctx.phase, ctx.step = "first step", 1
    err = training.classify(caught.value, ctx, RunConfig(), None)
    assert err.kind == "run" and "a library warned that the results would be wrong" in err.message
    assert "silently incorrect" in err.message and "no adapter was written" in err.hint
