"""The causal-LM loss without the full [tokens x vocab] logits (train.chunked_loss, default on).

transformers' ForCausalLMLoss takes the logits of every position, upcasts them to fp32 and keeps the fp32
log-softmax for backward: about 12 bytes per logit at its peak (core.estimate.constants.LOGIT_PEAK_BYTES), 2.3 GiB
for the built-in model's 49k vocabulary at 8 x 500 tokens. Here the model's forward runs the backbone only, and
the loss goes over the hidden states in tiles (tokens x a slice of the vocabulary): lm_head -> fp32 online
log-sum-exp -> the label's log-probability, recomputed tile by tile in backward. No fp32 logits of the whole batch
ever exist.

The tiles are TRL's ChunkedLogProbFunction (trl.kernels.chunked_logprob, already a dependency: the loss of its own
SFTTrainer): plain torch on the CPU, Triton on a CUDA GPU where Triton is installed, torch again where it is not.
It reads lm_head.weight directly, so like Liger's fused loss it is left off (the stock loss instead, with a line in
train.log) when lm_head carries a LoRA adapter or is quantized, and for models whose forward rescales or soft-caps
the logits after lm_head. Liger's fused linear cross-entropy, where core.train.child.liger_plan turns it on, wins:
it does the same on CUDA in one kernel.
"""

from __future__ import annotations

import sys
import types

from core.estimate.constants import LOSS_TOKEN_TILE as TOKEN_TILE, LOSS_VOCAB_TILE as VOCAB_TILE

# Logit transforms some model families apply after lm_head (config attribute names TRL's add_fused_lm_head
# reads). The stock loss keeps them right; a chunked loss here would silently drop them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def why_not(model, liger: dict | None) -> str | None:
    """None when the chunked loss can replace the stock one on this model, else the reason it cannot."""
    if liger and liger.get("fused_linear_cross_entropy"):
        return "Liger's fused linear cross-entropy computes the loss without full logits already"
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        return "lm_head carries a LoRA adapter, which a loss reading lm_head.weight would leave out"
    if weight is None or not weight.dtype.is_floating_point or type(head).__name__ != "Linear":
        return f"lm_head is a {type(head).__name__} (quantized or unusual), not a plain linear layer"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        if getattr(text, name, None) not in (None, 1.0):
            return f"this model rescales its logits after lm_head ({name}={getattr(text, name)})"
    if not hasattr(model, "base_model") or model.base_model is model:
        return f"{type(model).__name__} has no separate backbone to run without its head"
    return None


def install(model, cfg, liger: dict | None, events=None) -> bool:
    """Give the causal LM (the peft model's base) a forward that computes the loss in tiles whenever labels are
    passed. -> True when installed; else the stock loss stays and train.log (and the run page) say why."""
    if not cfg.train.chunked_loss:
        print("loss: full logits (train.chunked_loss=false)", flush=True)
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    why = why_not(base, liger)
    if why:
        if not (liger and liger.get("fused_linear_cross_entropy")):
            msg = f"loss: full logits, not chunked: {why}"
            print(msg, file=sys.stderr, flush=True)
            if events is not None:
                events.log("info", msg)
        return False
    base.forward = types.MethodType(_chunked_forward(base.forward), base)
    print(f"loss: chunked cross-entropy (tiles of up to {TOKEN_TILE} tokens x {VOCAB_TILE} vocabulary columns, "
          f"recomputed in backward; no full fp32 logits)", flush=True)
    return True


def _chunked_forward(original):
    """A forward that, given labels, returns (loss, no logits) as the stock one would return its loss: the same
    shift, the same ignore index (-100), sum over num_items_in_batch when the Trainer passes it, else the mean."""

    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast  # heavy

        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        out = self.base_model(*args, **kwargs)
        loss = chunked_nll(out.last_hidden_state, self.get_output_embeddings(), labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=None,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    return forward


def chunked_nll(hidden, head, labels, num_items_in_batch=None):
    """The mean (or sum / num_items_in_batch) next-token negative log-likelihood of `head(hidden)` against
    `labels` [batch, seq] (-100 = ignored), tile by tile. Only positions with a label are scored."""
    import torch  # heavy
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # heavy

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].to(hidden.device)
    mask = shifted != -100
    picked = hidden[mask]
    if picked.shape[0] == 0:  # nothing to learn in this batch: a zero still connected to the graph
        return hidden.sum() * 0.0
    log_probs, *_ = ChunkedLogProbFunction.apply(picked, head.weight, head.bias, shifted[mask], 1.0, VOCAB_TILE,
                                                 None, 1.0, ("log_probs",))
    total = -log_probs.sum()
    if num_items_in_batch is None:
        return total / mask.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
