"""The estimator's components held against real tensors on the CPU: weights as loaded (16-bit, bitsandbytes
NF4 with and without double quant, int8), LoRA parameter counts from peft, optimizer state after a step, and
the bytes autograd keeps for backward per token, across LoRA / QLoRA / full, dropout, attention kernels and
dtypes. bitsandbytes 0.50 quantizes on the CPU, so none of this needs a GPU."""

import contextlib
import json

import pytest
import torch

from core.estimate import vram

pytestmark = pytest.mark.integration  # measures real allocations of tiny forward / backward passes

# Mid-size: real enough to exercise GQA, untied embeddings and bnb's 8-bit optimizer path (tensors >= 4096).
MID = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


def _llama_config(cfg, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, **kw)


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mid-llama")
    LlamaForCausalLM(_llama_config(MID)).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(params=["tiny", "mid"])
def model_dir(request, tiny_model_dir, mid_dir):
    return tiny_model_dir if request.param == "tiny" else mid_dir


def shape_of(path):
    return vram.shape_from_config(json.loads((path / "config.json").read_text()))


def load(path, quant=None, double_quant=True, attn="sdpa", dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = None
    if quant == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=dtype)
    elif quant == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=q, device_map="cpu",
                                                attn_implementation=attn)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights and shared tables count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_tensors(model):
    for p in model.parameters():
        yield p
        qs = getattr(p, "quant_state", None)              # bnb 4-bit: absmax, code, nested absmax / code, offset
        if qs is not None:
            yield from (qs.absmax, qs.code, qs.offset)
            if qs.state2 is not None:
                yield from (qs.state2.absmax, qs.state2.code)
        yield getattr(p, "SCB", None)                     # bnb int8: one scale per row


def weights_estimate(path, method, double_quant=True, upcast=False):
    s = vram.Settings(method=method, compute_dtype="bf16", double_quant=double_quant, upcast_non_quantized=upcast)
    return vram.estimate(shape_of(path), s).components["weights"]


# ---------------------------------------------------------------- weights

def test_weights_16bit(model_dir):
    model = load(model_dir)
    assert tensor_bytes(weight_tensors(model)) == pytest.approx(weights_estimate(model_dir, "lora"), rel=0.01)


@pytest.mark.parametrize("double_quant", [False, True])
def test_weights_nf4(model_dir, double_quant):
    from peft import prepare_model_for_kbit_training

    model = load(model_dir, "nf4", double_quant)
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ == "Params4bit"
    measured = tensor_bytes(weight_tensors(model))
    assert measured == pytest.approx(weights_estimate(model_dir, "qlora", double_quant), rel=0.01)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)   # non-4-bit -> fp32
    measured = tensor_bytes(weight_tensors(model))
    assert measured == pytest.approx(weights_estimate(model_dir, "qlora", double_quant, upcast=True), rel=0.01)


def test_weights_int8(mid_dir):
    model = load(mid_dir, "int8")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert tensor_bytes(weight_tensors(model)) == pytest.approx(weights_estimate(mid_dir, "8bit"), rel=0.01)


# ---------------------------------------------------------------- parameter counts and LoRA (meta device)

ARCHS = {  # two layers at real widths: counts scale per layer, so this checks every per-layer formula
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False),
}


def meta_model(cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"},
                              num_hidden_layers=2)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_matches_transformers(arch):
    shape = vram.shape_from_config(dict(ARCHS[arch], num_hidden_layers=2))
    model = meta_model(ARCHS[arch])
    assert shape.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,targets,dora", [
    ("llama-3.1-8b", "all-linear", False), ("llama-3.1-8b", "attention", False),
    ("llama-3.1-8b", "q_proj,v_proj", False), ("llama-3.1-8b", "all-linear", True),
    ("qwen2.5-0.5b", "all-linear", False), ("phi3", "all-linear", False), ("phi3", "attention", False)])
def test_adapter_count_matches_peft(arch, targets, dora):
    from peft import LoraConfig, get_peft_model

    from core.config import target_modules

    model = get_peft_model(meta_model(ARCHS[arch]), LoraConfig(r=16, target_modules=target_modules(targets),
                                                                use_dora=dora, task_type="CAUSAL_LM"))
    trainable, _ = model.get_nb_trainable_parameters()
    shape = vram.shape_from_config(dict(ARCHS[arch], num_hidden_layers=2))
    assert vram.estimate(shape, vram.Settings(rank=16, targets=targets, dora=dora)).trainable_params == trainable


# ---------------------------------------------------------------- optimizer state after one step

@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizer_state_after_one_step(model_dir, optimizer):
    """The tiny model's LoRA tensors are all under bnb's min_8bit_size (fp32 states); the mid one's are not."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(model_dir), LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adamw": torch.optim.AdamW, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optimizer](params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.warns(UserWarning, match="Paged") if optimizer.startswith("paged") else contextlib.nullcontext():
        opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    expected = vram.estimate(shape_of(model_dir), vram.Settings(rank=16, optimizer=optimizer)).components["optimizer"]
    assert tensor_bytes(state) == pytest.approx(expected, rel=0.01)


# ---------------------------------------------------------------- what autograd keeps, per token

def saved_bytes(model, batch, seq, autocast):
    """Bytes of the distinct tensors autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("method,dtype,attn,dropout,targets,upcast,lean", [
    ("lora", "fp32", "sdpa", 0.05, "all-linear", False, False),
    ("lora", "fp32", "sdpa", 0.05, "all-linear", False, True),   # the CPU preset's regime (core/train/swiglu.py)
    ("lora", "bf16", "eager", 0.0, "q_proj,v_proj", False, False),
    ("lora", "autocast", "sdpa", 0.05, "all-linear", False, False),  # CUDA's mixed precision, emulated on the CPU
    ("qlora", "autocast", "eager", 0.0, "q_proj,v_proj", False, False),  # as core/train/child.py loads it
    ("qlora", "fp32", "sdpa", 0.05, "all-linear", False, False),
    ("qlora", "fp32", "sdpa", 0.0, "all-linear", False, True),   # QLoRA on the CPU
    ("qlora", "fp32", "sdpa", 0.05, "attention", True, False),   # after peft's prepare_model_for_kbit_training
    ("qlora", "autocast", "sdpa", 0.05, "all-linear", True, False),
    ("full", "autocast", "sdpa", 0.0, "all-linear", False, False),
])
def test_saved_activations_per_token(mid_dir, monkeypatch, method, dtype, attn, dropout, targets, upcast, lean):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

    autocast = dtype == "autocast"
    if autocast:   # peft asks torch.is_autocast_enabled() (CUDA's) to pick its CUDA path; point it at the CPU's
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: real(*a) if a else real("cpu"))
    weights = torch.float32 if dtype == "fp32" or method == "full" else torch.bfloat16
    if method == "qlora":
        model = load(mid_dir, "nf4", attn=attn, dtype=weights)
        if upcast:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = LlamaForCausalLM(_llama_config(MID, attn_implementation=attn)).to(weights)
    if method != "full":
        names = [m.name for m in vram.targeted(shape_of(mid_dir), targets)]
        lora = LoraConfig(r=16, lora_dropout=dropout, target_modules=names, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model.train()
    if lean:
        from core.train import swiglu

        assert swiglu.install(model) == shape_of(mid_dir).layers
    seq = 32   # the difference of two batch sizes leaves what scales with tokens (weight casts drop out)
    measured = (saved_bytes(model, 2, seq, autocast) - saved_bytes(model, 1, seq, autocast)) / seq
    settings = vram.Settings(method=method, dropout=dropout, targets=targets, attn=attn, seq_len=seq, device="cpu",
                             compute_dtype="fp32" if dtype == "fp32" else "bf16", autocast=autocast,
                             upcast_non_quantized=upcast, lean_swiglu=lean)
    assert vram.saved_per_token(shape_of(mid_dir), settings) == pytest.approx(measured, rel=0.01)
