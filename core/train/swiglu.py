"""A SwiGLU MLP that keeps two of its three intermediate tensors for backward.

`down_proj(silu(gate_proj(x)) * up_proj(x))`, as Llama, Qwen2, Mistral and their kin compute it, keeps three
[tokens x intermediate] tensors per layer for the backward pass: the gate (for silu's backward), silu(gate) and
the up projection (for the product's). silu is cheap to compute again from the gate, so this product keeps the
gate and the up projection only and recomputes silu in backward: one intermediate tensor fewer per layer, with
the same values (fp32: equal to the stock backward within rounding). On the built-in model at 8 x 500 tokens
that is 30 layers x 4,000 tokens x 1,536 floats. Liger's SwiGLU kernel does the same in Triton on a CUDA GPU;
this is the plain-torch form, for a lean CPU run or where asked (core.estimate.vram.lean_swiglu_on says where).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving (gate, up) only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # two [tokens x intermediate] temporaries besides the two gradients: each step below works in place
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_up = grad * silu if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, d_up
        # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
        one_minus = sig.neg_().add_(1)          # sig's buffer now holds 1 - sig
        deriv = silu.mul_(one_minus)            # silu * (1 - sig)
        deriv.add_(one_minus.neg_().add_(1))    # + sig (the buffer back to sig)
        return deriv.mul_(up).mul_(grad), d_up


def _is_silu(act) -> bool:
    name = type(act).__name__
    return name in ("SiLU", "SiLUActivation") or act is F.silu


STOCK = ["down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))", "return down_proj"]


@functools.lru_cache(maxsize=None)
def _stock_forward(cls) -> bool:
    """Whether the class's forward is exactly transformers' SwiGLU MLP forward (its source, line by line): a
    model whose MLP adds anything (a bias path, dropout, tensor parallel slices) keeps its own."""
    try:
        lines = [ln.strip() for ln in inspect.getsource(cls.forward).splitlines()[1:] if ln.strip()]
    except (OSError, TypeError):
        return False
    return lines == STOCK


def swiglu_mlps(model) -> list:
    """The modules of `model` that compute down_proj(silu(gate_proj(x)) * up_proj(x)) with the stock forward."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(m.act_fn)
            and "forward" not in vars(m) and _stock_forward(type(m))]


def install(model) -> int:
    """Give each stock SwiGLU MLP of `model` the lean product. -> how many MLPs now use it."""
    mlps = swiglu_mlps(model)
    for m in mlps:
        m.forward = types.MethodType(_forward, m)
    return len(mlps)


def _forward(self, x):
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))
