"""A second architecture for the tests: a tiny GPT-NeoX (Pythia's family: fused query_key_value, LayerNorm,
parallel residual, partial rotary) saved like a base model from the hub: no chat template, and a vocabulary
with one <|endoftext|> for BOS, EOS and padding and no ChatML tokens, so the fallback's markers are plain text."""

from pathlib import Path

from tests.helpers.tiny import CORPUS


def build_tiny_neox(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20 + ["<|im_start|>user <|im_end|> assistant"] * 5, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token=None)
    hf_tok.save_pretrained(out)

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        # NeoX's default init (0.02) leaves a 64-wide random model with near-flat logits that LoRA cannot sharpen
        # (the untied output layer is not adapted): its loss stalls at ~4.9. Wider weights make it learnable.
        initializer_range=0.2,
    )
    GPTNeoXForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out
