"""A tiny model as a user's own .gguf file, written offline with the gguf package's GGUFWriter.

The weights are fp32 (GGUF type F32) and laid out as llama.cpp's converter lays them out (q/k rows permuted for
its rotary layout; transformers permutes them back), and the tokenizer (BPE vocab, merges, specials, chat
template) goes into the metadata, so transformers loads the file into the same model the folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path

# transformers Llama module -> llama.cpp tensor name (gguf-py's TensorNameMap, the llama subset)
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w, n_head: int):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Write the Llama folder `model_dir` (tests.helpers.tiny.build_tiny_model) as the GGUF file `out`."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, out = Path(model_dir), Path(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    c, state = model.config, model.state_dict()
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    template_file = model_dir / "chat_template.jinja"
    template = (template_file.read_text() if template_file.exists()
                else json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(template)
    for name, tensor in state.items():
        a = tensor.numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gname = f"blk.{layer}.{_BLOCK[module]}.weight"
            if module == "self_attn.q_proj":
                a = _permute(a, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = _permute(a, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
