"""core/train/swiglu.py: the SwiGLU product that keeps (gate, up) for backward and recomputes silu gives the stock
loss and LoRA gradients, keeps one [tokens x intermediate] tensor fewer per layer, and leaves any other MLP alone."""

import pytest
import torch

from core.train import swiglu


def test_the_product_s_backward_is_silu_s_derivative():
    g = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu.SiluMul.apply, (g, u))
    frozen = torch.randn(6, 9, dtype=torch.float64)  # one side without a gradient (a frozen projection)
    out = swiglu.SiluMul.apply(g, frozen)
    out.sum().backward()
    assert torch.allclose(out, torch.nn.functional.silu(g) * frozen)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def _llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights=False))  # non-zero B: every path carries gradient
    model.train()
    return model


def _step(model, ids):
    """(loss, LoRA grads, bytes autograd saved for backward) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_swiglu_gives_the_stock_loss_and_gradients_and_keeps_less(arch, tiny_model_dir):
    model = _with_lora(_llama(tiny_model_dir) if arch == "llama" else _qwen2())
    layers = model.get_base_model().config.num_hidden_layers
    ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(2))
    loss0, grads0, kept0 = _step(model, ids)
    assert swiglu.install(model) == layers and swiglu.swiglu_mlps(model) == []  # installed once, not twice
    loss1, grads1, kept1 = _step(model, ids)
    assert abs(loss1 - loss0).item() <= 1e-6 * abs(loss0).item()
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert torch.allclose(grads1[name], g, rtol=1e-5, atol=1e-7), name
    intermediate = model.get_base_model().config.intermediate_size
    one_tensor = ids.numel() * intermediate * 4  # [tokens x intermediate] fp32
    assert kept0 - kept1 == layers * one_tensor, (kept0, kept1, one_tensor)


def test_other_mlps_keep_their_own_forward(tmp_path):
    from transformers import GPTNeoXForCausalLM

    from tests.helpers.tiny_neox import build_tiny_neox

    neox = GPTNeoXForCausalLM.from_pretrained(build_tiny_neox(tmp_path / "neox"))
    assert swiglu.install(neox) == 0  # GELU, dense_h_to_4h: not a SwiGLU MLP

    model = _qwen2()
    mlp = model.model.layers[0].mlp

    class WithDropout(type(mlp)):
        def forward(self, x):
            return self.down_proj(torch.nn.functional.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))

    mlp.__class__ = WithDropout
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert swiglu.install(model) == 0


def test_the_switch_turns_it_on_for_cpu_runs_and_the_estimate_alike(tiny_model_dir, monkeypatch, capsys):
    from core.config import RunConfig
    from core.estimate import vram
    from core.train import child

    cfg = RunConfig()
    monkeypatch.delenv(vram.LEAN_MLP_ENV, raising=False)
    assert not vram.settings_from_config(cfg, device="cpu").lean_swiglu  # opt-in
    model = _llama(tiny_model_dir)
    assert child.lean_swiglu(model, "cpu") == 0 and len(swiglu.swiglu_mlps(model)) == 2

    monkeypatch.setenv(vram.LEAN_MLP_ENV, "1")
    assert vram.settings_from_config(cfg, device="cpu").lean_swiglu
    assert not vram.settings_from_config(cfg, device="cuda").lean_swiglu
    assert child.lean_swiglu(_llama(tiny_model_dir), "cuda") == 0
    assert child.lean_swiglu(_llama(tiny_model_dir), "cpu") == 2
    assert "mlp: 2 SwiGLU layers keep gate and up for backward and recompute silu" in capsys.readouterr().out

    sizes = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 300}
    shape = vram.shape_from_config({"model_type": "llama", "hidden_act": "silu", **sizes})
    lean, stock = (vram.saved_per_token(shape, vram.Settings(device="cpu", lean_swiglu=x)) for x in (True, False))
    assert stock - lean == 2 * 160 * 4  # one fp32 [intermediate] tensor a layer, per token
    gelu = vram.shape_from_config({"model_type": "gemma", "hidden_activation": "gelu_pytorch_tanh", **sizes})
    assert vram.saved_per_token(gelu, vram.Settings(device="cpu", lean_swiglu=True)) == \
        vram.saved_per_token(gelu, vram.Settings(device="cpu", lean_swiglu=False))
