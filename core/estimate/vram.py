"""VRAM estimate for full / LoRA / QLoRA / 8-bit fine-tuning, from a model's config.json alone.

Pure arithmetic: no torch, no weights, well under a millisecond per estimate, so the UI can call it on every
change. The numbers behind it, and where each comes from, are in core/estimate/constants.py. What it models is a
transformers + peft + bitsandbytes training step as core/train/child.py runs it on CUDA: weights in the compute
dtype (LoRA), or 4-/8-bit decoder linears with the rest in the compute dtype (QLoRA / 8-bit; set
upcast_non_quantized for scripts that call peft's prepare_model_for_kbit_training, which makes it fp32), fp32
adapters, Trainer mixed precision (autocast) in bf16/fp16, and transformers' fp32 loss. On the CPU
(device="cpu") everything is fp32 with no autocast and no CUDA context; the numbers are then RAM.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from core.estimate import constants as K
from core.config import ATTENTION_TARGETS, ATTN_IMPLEMENTATIONS, OBJECTIVES, OPTIMIZERS
from core.errors import ModelError
from core.units import gb

COMPONENTS = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "generation", "overhead")
METHODS = ("full", "lora", "qlora", "8bit")
# Model types whose config class ties input and output embeddings when config.json does not say.
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "gpt_neo", "phi")


# ---------------------------------------------------------------- the model's shape

@dataclass(frozen=True)
class Linear:
    """One linear layer inside a decoder layer. `group` names the tensor it reads (layers in a group share it)."""
    name: str
    d_in: int
    d_out: int
    group: str          # attn_in | attn_out | mlp_in | mlp_out
    bias: bool = False
    copies: int = 1     # experts in a mixture-of-experts MLP


@dataclass
class ModelShape:
    """What the estimator needs from config.json: sizes, not weights."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str = ""               # the checkpoint's dtype from config.json (informational)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False         # Qwen3-style per-head q/k RMSNorm
    norms: int = 2                # RMSNorms per layer (Gemma 2/3 have 4)
    fused: bool = False           # Phi-3 style qkv_proj / gate_up_proj
    experts: int = 0              # MoE: experts per layer (0 = dense)
    experts_per_tok: int = 0
    act: str = ""                 # config.json's hidden_act (silu: a SwiGLU MLP in Llama-style models)
    notes: list = field(default_factory=list)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[Linear]:
        """The linear layers of one decoder layer, with the names peft matches targets against."""
        return list(_linears(self.hidden, self.intermediate, self.q_dim, self.kv_dim, self.fused, self.experts,
                             self.qkv_bias, self.o_bias, self.mlp_bias))

    @property
    def linear_params(self) -> int:
        """Weights of all decoder-layer linears: what 4-bit / 8-bit quantization converts."""
        return self.layers * sum(m.d_in * m.d_out * m.copies for m in self.linears())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (if untied), norms, biases: what stays in 16/32-bit."""
        per_layer = self.norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        per_layer += sum(m.d_out * m.copies for m in self.linears() if m.bias)
        if self.experts:
            per_layer += self.hidden * self.experts          # the router
        lm_head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + lm_head + self.layers * per_layer + self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


@functools.lru_cache(maxsize=64)
def _linears(h, i, q_dim, kv_dim, fused, experts, qkv_bias, o_bias, mlp_bias) -> tuple:
    """Cached: the estimate asks for these many times and the UI estimates on every change."""
    n = max(experts, 1)
    if fused:
        attn = [Linear("qkv_proj", h, q_dim + 2 * kv_dim, "attn_in", qkv_bias)]
        mlp = [Linear("gate_up_proj", h, 2 * i, "mlp_in", mlp_bias, n)]
    else:
        attn = [Linear("q_proj", h, q_dim, "attn_in", qkv_bias), Linear("k_proj", h, kv_dim, "attn_in", qkv_bias),
                Linear("v_proj", h, kv_dim, "attn_in", qkv_bias)]
        mlp = [Linear("gate_proj", h, i, "mlp_in", mlp_bias, n), Linear("up_proj", h, i, "mlp_in", mlp_bias, n)]
    return tuple(attn + [Linear("o_proj", q_dim, h, "attn_out", o_bias)] + mlp
                 + [Linear("down_proj", i, h, "mlp_out", mlp_bias, n)])


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def shape_from_config(cfg: dict) -> ModelShape:
    """Read a ModelShape from a config.json dict (multimodal configs: their text_config). Raises ModelError."""
    if not isinstance(cfg, dict):
        raise ModelError("config.json is not a JSON object", "point at a model folder written by save_pretrained")
    notes = []
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type") or cfg.get("model_type")}
        notes.append("multimodal model: only the language model is estimated")
    model_type = str(cfg.get("model_type") or "")
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    vocab = _get(cfg, "vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
    if missing:
        raise ModelError(f"config.json has no {', '.join(missing)}: cannot size this model",
                         "use a decoder-only causal LM (Llama, Qwen, Mistral, Gemma, Phi, SmolLM ...)")
    hidden, layers, heads, vocab = int(hidden), int(layers), int(heads), int(vocab)
    experts = int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    inter = _get(cfg, "moe_intermediate_size") if experts else None
    inter = int(inter or _get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    if "tie_word_embeddings" in cfg:
        tied = bool(cfg["tie_word_embeddings"])
    else:
        tied = model_type in _TIED_BY_DEFAULT
        notes.append(f"config.json does not say whether embeddings are tied; assumed {tied}")
    if model_type and model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                         "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite"):
        notes.append(f"model type {model_type!r}: sized as a Llama-style decoder")
    if experts:
        notes.append("mixture-of-experts: a rough estimate (every expert counted as a linear layer)")
    return ModelShape(
        model_type=model_type, hidden=hidden, intermediate=inter, layers=layers, heads=heads,
        kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(cfg, "head_dim", default=hidden // heads)), vocab=vocab, tied=tied,
        dtype=str(_get(cfg, "torch_dtype", "dtype", default="")),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        act=str(_get(cfg, "hidden_act", "hidden_activation", default="") or ""),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "olmo2", "gemma3_text"),
        norms=4 if model_type in ("gemma2", "gemma3_text") else 2,
        fused=model_type == "phi3", experts=experts,
        experts_per_tok=int(_get(cfg, "num_experts_per_tok", "moe_topk", default=2 if experts else 0)),
        notes=notes)


# ---------------------------------------------------------------- the run's settings

@dataclass
class Settings:
    """The run settings that move memory. Names follow RunConfig; settings_from_config fills them."""
    method: str = "lora"                 # full | lora | qlora | 8bit
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"          # all-linear | attention | comma list of module names
    dropout: float = 0.05
    dora: bool = False
    quant_type: str = "nf4"              # nf4 | fp4 (same size)
    double_quant: bool = True
    compute_dtype: str = "auto"          # auto | bf16 | fp16 | fp32 (auto: 16-bit on CUDA, fp32 on CPU)
    batch_size: int = 1
    seq_len: int = 512                   # tokens of the longest example in a batch (data.max_len at worst)
    grad_accum: int = 1                  # no effect on memory; kept so suggestions keep the effective batch
    grad_checkpointing: bool = False
    optimizer: str = "adamw"             # adamw | adamw_8bit | paged_adamw_8bit
    attn: str = "sdpa"                   # sdpa | flash_attention_2 | eager
    device: str = "cuda"                 # cuda | mps | cpu
    upcast_non_quantized: bool = False   # True: peft's prepare_model_for_kbit_training ran (core/train/child.py
                                         # skips it; many HF scripts call it) and made the rest fp32
    autocast: bool | None = None         # mixed precision; None = on for CUDA, off on CPU
    objective: str = "sft"               # sft | dpo | orpo | grpo (train.objective): pairs cost two sequences per
                                         # example; GRPO samples `generations` completions per prompt
    generations: int = 4                 # GRPO: completions per prompt (train.grpo_generations)
    completion_len: int = 128            # GRPO: tokens per completion at most (train.grpo_max_completion)
    beta: float = 0.0                    # GRPO: > 0 adds the reference forward (train.grpo_beta)
    chunked_loss: bool = False           # train.chunked_loss: the SFT loss in tiles (core/train/loss.py), no full
                                         # logits. Off here: a bare Settings models a plain HF + peft script
    lean_swiglu: bool = False            # core/train/swiglu.py: a SiLU MLP keeps gate and up only (CPU runs)


LEAN_MLP_ENV = "LORA_GARAGE_LEAN_MLP"  # set (not "" or "0"): CPU runs give SwiGLU MLPs the lean product


LEAN_MEMORY_ENV = "LORA_GARAGE_LEAN_MEMORY"  # "1": this CPU run trains lean (core.train.allocator decides it)


def lean_memory_on() -> bool:
    """Whether this process was told to train lean ($LORA_GARAGE_LEAN_MEMORY=1, by the user or by
    core.train.allocator.prepare when the run's memory is tight)."""
    return os.environ.get(LEAN_MEMORY_ENV) == "1"


def lean_swiglu_on(device: str) -> bool:
    """Whether a run on `device` gives its SwiGLU MLPs the lean product (core/train/swiglu.py): on the CPU, in a
    run that trains lean (lean_memory_on) or where $LORA_GARAGE_LEAN_MLP asks for it. Not otherwise: the same loss
    and gradients within rounding, but a run's adapter is then another sample, and the cpu-demo's q4_k_m export
    missed its parity bar once with it (max logit difference 8.23 over 8.0). The training child and the estimate
    both ask here."""
    return device == "cpu" and (lean_memory_on() or os.environ.get(LEAN_MLP_ENV, "") not in ("", "0"))


def settings_from_config(run_cfg, method: str | None = None, device: str = "cuda") -> Settings:
    """Settings for a RunConfig; `method` overrides quant.method (e.g. to compare "full" / "lora" / "qlora")."""
    q, lo, t = run_cfg.quant, run_cfg.lora, run_cfg.train
    return Settings(method=method or q.method, rank=lo.r, alpha=lo.alpha, targets=lo.targets, dropout=lo.dropout,
                    dora=lo.use_dora, quant_type=q.quant_type, double_quant=q.double_quant,
                    compute_dtype=q.compute_dtype, batch_size=t.batch_size, seq_len=run_cfg.data.max_len,
                    grad_accum=t.grad_accum, grad_checkpointing=t.grad_checkpointing, optimizer=t.optimizer,
                    attn=run_cfg.model.attn_implementation, device=device, objective=t.objective,
                    chunked_loss=t.chunked_loss, generations=t.grpo_generations,
                    completion_len=t.grpo_max_completion, beta=t.grpo_beta, lean_swiglu=lean_swiglu_on(device))


def targeted(shape: ModelShape, targets: str) -> list[Linear]:
    """The decoder-layer linears peft would wrap for `targets` (all-linear excludes lm_head, as peft does)."""
    t = (targets or "").strip()
    mods = shape.linears()
    if t == "all-linear":
        return mods
    # exact names, as peft matches them: on Phi-3's fused qkv_proj, "attention" adapts o_proj only
    names = set(ATTENTION_TARGETS) if t == "attention" else {x.strip() for x in t.split(",") if x.strip()}
    return [m for m in mods if m.name in names]


# ---------------------------------------------------------------- the estimate

@dataclass
class Estimate:
    """Peak memory of one training step, split into COMPONENTS (which sum to total_bytes)."""
    shape: ModelShape
    settings: Settings
    components: dict
    details: dict            # finer parts behind the components, in bytes
    trainable_params: int
    notes: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.components.values()))

    def to_dict(self) -> dict:
        return {"method": self.settings.method, "total_bytes": self.total_bytes,
                "components": {k: int(v) for k, v in self.components.items()},
                "details": {k: int(v) for k, v in self.details.items()},
                "trainable_params": self.trainable_params, "settings": asdict(self.settings), "notes": self.notes}


@dataclass
class _Dtypes:
    compute: int      # bf16/fp16 = 2, fp32 = 4
    autocast: bool
    weights: int      # the 16/32-bit weights (all of them for LoRA / full; the non-quantized rest otherwise)
    resid: int        # the residual stream: the embedding output's dtype
    act: int          # output of a 16-bit linear (autocast: compute dtype)
    bnb: bool


def _dtypes(s: Settings) -> _Dtypes:
    cpu = s.device == "cpu"
    compute = 4 if cpu and s.compute_dtype == "auto" else K.DTYPE_BYTES.get(s.compute_dtype, 2)
    autocast = (not cpu and compute != 4) if s.autocast is None else s.autocast
    bnb = s.method in ("qlora", "8bit")
    if s.method == "full":
        weights = K.FULL_FT_WEIGHT_BYTES if autocast or compute == 4 else compute
    elif bnb and s.upcast_non_quantized:
        weights = K.KBIT_UPCAST_BYTES
    else:
        weights = compute
    return _Dtypes(compute, autocast, weights, weights, compute if autocast else weights, bnb)


def _saved_inputs(s: Settings, d: _Dtypes, n: int, width: int, x: int, kept_already: bool = False) -> float:
    """Bytes per token kept for the inputs of n LoRA (or, for full, trainable) linears that read one tensor of
    dtype size x. If nothing casts or drops it, the modules share that very tensor; `kept_already` says it is
    counted elsewhere (o_proj reads the output SDPA keeps)."""
    if n == 0:
        return 0.0
    if s.method == "full":        # the linear keeps its (autocast-cast) input for the weight gradient
        keep = d.compute if d.autocast else x
        return 0.0 if keep == x and kept_already else width * keep * (1 if keep == x else n)
    # peft casts the input to the fp32 adapter dtype (layer.py Linear.forward always; bnb.py only without
    # autocast); autocast then casts it to the compute dtype for lora_A, which keeps that copy.
    x_in = x if (d.bnb and d.autocast) else K.ADAPTER_BYTES
    keep = d.compute if d.autocast else K.ADAPTER_BYTES
    if s.dropout > 0:              # one nn.Dropout per module: a mask + the lora_A input each
        return n * width * (_dropout_mask(s, x_in) + keep)
    if x_in == x and keep == x:    # no copy anywhere: one shared tensor
        return 0.0 if kept_already else width * keep
    return n * width * keep


def _dropout_mask(s: Settings, x: int) -> int:
    """Bytes per element nn.Dropout keeps: a bool mask on CUDA (native_dropout); on CPU a noise tensor in the
    dtype of the tensor it drops (ATen _dropout_impl)."""
    return x if s.device == "cpu" else K.DROPOUT_MASK_BYTES_CUDA


def _attn_dtype(d: _Dtypes) -> int:
    """Dtype size of what attention keeps: autocast casts q, k, v to the compute dtype; without it they are
    the q/k/v projections' output after RoPE, whose q*cos promotes to the residual dtype."""
    return d.compute if d.autocast else max(d.resid if d.bnb else d.act, d.resid)


SILU = ("silu", "swish")


def _layer_bytes_per_token(shape: ModelShape, s: Settings, d: _Dtypes) -> tuple[float, float]:
    """(bytes per token, bytes per token per attended position) one decoder layer keeps for backward."""
    h, i = shape.hidden, shape.intermediate
    hits = {m.name for m in targeted(shape, s.targets)} if s.method != "full" else {m.name for m in shape.linears()}
    groups = {}
    for m in shape.linears():
        groups.setdefault(m.group, []).append(m.name in hits)
    n = {g: sum(v) for g, v in groups.items()}
    lin_out = (lambda x: x) if d.bnb else (lambda x: d.act)
    lora_r = s.rank * (d.compute if d.autocast else K.ADAPTER_BYTES) if s.method != "full" else 0
    total = shape.norms * (4 * h + K.LN_RSQRT_BYTES)            # each RMSNorm keeps its fp32 input
    if s.method == "full":
        total += shape.norms * h * d.resid                      # ... and the normalized output (weight grad)
    total += _saved_inputs(s, d, n["attn_in"], h, d.resid)
    sdpa = _attn_dtype(d)
    per_pos = 0.0
    if s.attn == "eager":                                       # q, repeated k and v, fp32 softmax and its cast
        total += 3 * shape.q_dim * sdpa
        per_pos = shape.heads * (4 + (sdpa if sdpa != 4 else 0))   # the cast back is a no-op in fp32
    else:                                                       # q, k, v (KV-head size), output, logsumexp
        total += (2 * shape.q_dim + 2 * shape.kv_dim) * sdpa + shape.heads * K.SDPA_LSE_BYTES
    # SDPA's output is laid out (B, S, H, D), so o_proj reads the very tensor SDPA keeps (eager makes a copy)
    total += _saved_inputs(s, d, n["attn_out"], shape.q_dim, sdpa, kept_already=s.attn != "eager")
    total += _saved_inputs(s, d, n["mlp_in"], h, d.resid)
    gate = lin_out(d.resid)
    # silu's input, silu's output, up; the lean product (core/train/swiglu.py) recomputes silu's output
    kept = 2 if s.lean_swiglu and shape.act.lower() in SILU and not shape.experts else 3
    mlp = kept * i * gate + _saved_inputs(s, d, n["mlp_out"], i, gate)
    total += mlp * (max(shape.experts_per_tok, 1) if shape.experts else 1)
    if s.method == "8bit":       # MatMul8bitLt keeps each input it reads (source read; not measured)
        total += 2 * h * d.resid + shape.q_dim * sdpa + i * gate
    total += lora_r * sum(n.values())
    return total, per_pos


def saved_per_token(shape: ModelShape, settings: Settings) -> float:
    """Bytes per token the forward keeps for backward without checkpointing: every layer, the final norm and
    the loss's fp32 log-softmax. (The peak adds transients on top; this is what tests hold against autograd.)"""
    d = _dtypes(settings)
    per_tok, per_pos = _layer_bytes_per_token(shape, settings, d)
    layers = shape.layers * (per_tok + per_pos * settings.seq_len) - _first_layer_saving(shape, settings, d)
    return layers + _head_bytes_per_token(shape, settings, d) + 4 * shape.vocab


def _head_bytes_per_token(shape: ModelShape, s: Settings, d: _Dtypes) -> float:
    """The final norm keeps its fp32 input; full fine-tuning also keeps its normalized output and lm_head's
    input (both have trainable weights) and the token ids for the embedding's gradient."""
    total = 4 * shape.hidden + K.LN_RSQRT_BYTES
    if s.method == "full":
        total += shape.hidden * (d.resid + (d.compute if d.autocast else d.resid)) + 8
    return total


def _first_layer_saving(shape: ModelShape, s: Settings, d: _Dtypes) -> float:
    """Per token, what layer 0 does not keep when its input (the frozen embedding's output) needs no gradient:
    its first norm's input and the dropout masks there. Checkpointing (enable_input_require_grads) and full
    fine-tuning make that input require grad, so then there is no saving."""
    if s.grad_checkpointing or s.method == "full":
        return 0.0
    saving = 4 * shape.hidden + K.LN_RSQRT_BYTES
    names = {m.name for m in targeted(shape, s.targets)}
    if not shape.fused and s.attn == "eager" and ("q_proj" in names) != ("k_proj" in names):
        saving += shape.q_dim * _attn_dtype(d)     # q @ k.T keeps only the side whose gradient is needed
    if s.dropout > 0:
        n = sum(1 for m in targeted(shape, s.targets) if m.group == "attn_in")
        saving += n * shape.hidden * _dropout_mask(s, d.resid if (d.bnb and d.autocast) else K.ADAPTER_BYTES)
    return saving


def _trainable_tensors(shape: ModelShape, s: Settings) -> Counter:
    """{element count: number of tensors} of every trainable tensor (what the optimizer keeps state for)."""
    out = Counter()
    if s.method == "full":
        for m in shape.linears():
            out[m.d_in * m.d_out] += m.copies * shape.layers
            out[m.d_out] += m.copies * shape.layers if m.bias else 0
        out[shape.hidden] += shape.norms * shape.layers + 1
        out[shape.head_dim] += 2 * shape.layers if shape.qk_norm else 0
        out[shape.hidden * shape.experts] += shape.layers if shape.experts else 0
        out[shape.vocab * shape.hidden] += 1 if shape.tied else 2
    else:
        for m in targeted(shape, s.targets):
            for numel in [s.rank * m.d_in, m.d_out * s.rank] + ([m.d_out] if s.dora else []):
                out[numel] += m.copies * shape.layers
    return +out    # drops zero counts


def _weights(shape: ModelShape, s: Settings, d: _Dtypes) -> int:
    if not d.bnb:
        return shape.total_params * d.weights
    n_linear = shape.layers * sum(m.copies for m in shape.linears())
    if s.method == "qlora":
        per_param = K.BNB4_PACKED_BYTES + (K.BNB4_DQ_ABSMAX_BYTES if s.double_quant else K.BNB4_ABSMAX_BYTES)
        per_tensor = K.BNB4_PER_TENSOR_BYTES + (K.BNB4_DQ_PER_TENSOR_BYTES if s.double_quant else 0)
        quant = shape.linear_params * per_param + n_linear * per_tensor
    else:
        rows = shape.layers * sum(m.d_out * m.copies for m in shape.linears())
        quant = shape.linear_params * K.INT8_BYTES + rows * K.INT8_ROW_SCALE_BYTES
    return int(quant + shape.other_params * d.weights)


def _optimizer(tensors: Counter, optimizer: str) -> int:
    if optimizer == "adamw":
        return sum((numel * K.ADAMW_STATE_BYTES + K.ADAMW_STEP_BYTES) * n for numel, n in tensors.items())
    total = K.ADAM8BIT_QMAP_BYTES if any(numel >= K.ADAM8BIT_MIN_SIZE for numel in tensors) else 0
    for numel, n in tensors.items():
        if numel < K.ADAM8BIT_MIN_SIZE:
            total += n * numel * K.ADAMW_STATE_BYTES
        else:
            total += n * (numel * K.ADAM8BIT_STATE_BYTES + 2 * 4 * math.ceil(numel / K.ADAM8BIT_BLOCKSIZE))
    return total


def estimate(shape: ModelShape, settings: Settings) -> Estimate:
    """Peak memory of a training step. Components sum to the peak; `details` shows the parts behind them."""
    s, d = settings, _dtypes(settings)
    for name, value, allowed in (("method", s.method, METHODS), ("optimizer", s.optimizer, tuple(OPTIMIZERS)),
                                 ("attn", s.attn, ATTN_IMPLEMENTATIONS), ("device", s.device, ("cuda", "mps", "cpu")),
                                 ("objective", s.objective, OBJECTIVES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    notes = list(shape.notes)
    # DPO / ORPO: each pair is two sequences (chosen, rejected) in one batch of 2 x batch_size; GRPO: each prompt
    # (seq_len = data.max_len at worst) is sampled `generations` times, each completion up to completion_len tokens
    grpo = s.objective == "grpo"
    sequences = s.batch_size * (s.generations if grpo else 1 if s.objective == "sft" else 2)
    seq_len = s.seq_len + s.completion_len if grpo else s.seq_len
    tokens = sequences * seq_len
    tensors = _trainable_tensors(shape, s)
    trainable = sum(numel * n for numel, n in tensors.items())
    weights = _weights(shape, s, d)
    adapter = 0 if s.method == "full" else trainable * K.ADAPTER_BYTES
    grad_bytes = K.FULL_FT_WEIGHT_BYTES if s.method == "full" else K.ADAPTER_BYTES
    gradients = trainable * grad_bytes
    optimizer = _optimizer(tensors, s.optimizer)

    per_tok, per_pos = _layer_bytes_per_token(shape, s, d)
    layer = tokens * (per_tok + per_pos * seq_len)
    final_norm = tokens * _head_bytes_per_token(shape, s, d)
    mask = sequences * seq_len ** 2 * d.resid if s.attn == "eager" else 0
    # autocast keeps a compute-dtype copy of fp32 weights that the backward needs: every weight for full
    # fine-tuning (autocast's weight cache), and the frozen fp32 lm_head after the k-bit upcast.
    if d.autocast and s.method == "full":
        casts = (shape.linear_params + shape.vocab * shape.hidden) * d.compute
    elif d.autocast and d.bnb and d.weights != d.compute:
        casts = shape.vocab * shape.hidden * d.compute
    else:
        casts = 0
    if grpo:  # TRL keeps the logits of the completion tokens only (logits_to_keep), and their fp32 log-softmax
        logits = sequences * s.completion_len * shape.vocab * K.LOGIT_PEAK_BYTES
    elif s.chunked_loss and s.objective == "sft":
        logits = chunked_loss_bytes(tokens, shape.vocab, shape.hidden)
        notes.append("loss in tiles (train.chunked_loss): no full logits; models that rescale their logits after "
                     "lm_head, or a LoRA on lm_head, fall back to the full logits")
    else:
        logits = tokens * shape.vocab * K.LOGIT_PEAK_BYTES
    gate_dtype = d.resid if d.bnb else d.act
    transient = tokens * (K.BACKWARD_TRANSIENT_INTERMEDIATE * shape.intermediate * gate_dtype
                          + K.BACKWARD_TRANSIENT_HIDDEN * shape.hidden * max(d.resid, d.compute))
    # The loss's peak comes first, while everything saved is alive; a layer's backward comes later, after
    # the logits buffers are freed. With checkpointing that layer is recomputed then, so only the larger of
    # the two phases counts on top of what is always there.
    if s.grad_checkpointing:
        kept = shape.layers * tokens * shape.hidden * d.resid + final_norm + mask + casts
        later = layer + transient
    else:
        kept = shape.layers * layer - tokens * _first_layer_saving(shape, s, d) + final_norm + mask + casts
        later = transient
    activations = kept + max(0, later - logits)
    # DPO's reference forward (adapter disabled, no grad) runs after the policy's, while its saved activations
    # are alive: one layer's working set at a time plus TRL's chunked log-probabilities. ORPO has no reference,
    # but its SFT term takes an fp32 log-softmax over the chosen half's logits on top of the pair's log-probs.
    reference = layer + tokens * 4 * 2 if s.objective == "dpo" else 0
    sft_term = (tokens // 2) * shape.vocab * 4 if s.objective == "orpo" else 0
    activations += reference
    logits += sft_term
    # GRPO's generation runs before the step, without grad: the KV cache of every completion at full length and
    # the last position's logits; with beta > 0 the reference's log-probabilities too (a no-grad forward, one layer
    # at a time, and the completions' logits). Only what that phase needs beyond the step's own peak counts.
    kv_cache = (sequences * seq_len * shape.layers * 2 * shape.kv_dim * d.compute) if grpo else 0
    gen_logits = sequences * shape.vocab * 4 * 2 if grpo else 0
    grpo_reference = (layer / max(shape.layers, 1) + sequences * s.completion_len * shape.vocab * 4
                      if grpo and s.beta > 0 else 0)
    generation_phase = max(kv_cache + gen_logits, grpo_reference)
    generation = max(0, generation_phase - (activations + logits)) if grpo else 0
    if grpo:
        notes.append(f"GRPO: {s.batch_size} prompts x {s.generations} generations = {sequences} completions of up to "
                     f"{s.seq_len} + {s.completion_len} tokens; generation first (KV cache "
                     f"{kv_cache / 2**30:.2f} GiB, no grad), then the step on the completions (activations and "
                     f"logits {(activations + logits) / 2**30:.2f} GiB): the "
                     f"{'generation' if generation_phase > activations + logits else 'step'} is the larger phase"
                     + ("; the reference log-probabilities (adapter disabled) in the generation phase"
                        if s.beta > 0 else "; no reference (grpo_beta 0)"))
    elif s.objective != "sft":
        notes.append(f"{s.objective.upper()}: two sequences per pair (batch of {sequences})"
                     + ("; the reference forward without grad (adapter disabled, no second model)"
                        if s.objective == "dpo" else "; no reference model; the SFT term on the chosen reply"))

    dequant = 0
    if s.method == "qlora":
        dequant = max(m.d_in * m.d_out for m in shape.linears()) * d.compute * K.DEQUANT_BUFFERS
    if s.device == "cpu":
        fragmentation = workspace = 0
        context = K.CPU_RUNTIME_BYTES
        notes.append(f"CPU estimate: RAM for the step and {K.CPU_RUNTIME_BYTES / 2**30:.2f} GiB for Python, torch and "
                     f"the libraries the training process imports; a data loader's workers come on top")
    elif s.device == "mps":  # the same tensors as on CUDA; Metal has no CUDA context or cuBLAS workspace
        context = workspace = 0
        fragmentation = K.ALLOCATOR_FRAGMENTATION * (activations + logits + gradients)
        notes.append("MPS estimate: the tensors as on CUDA, without a CUDA context; Metal's own overhead is not "
                     "modelled. The GPU shares the Mac's RAM (unified memory)")
    else:
        context, workspace = K.CUDA_CONTEXT_BYTES, K.CUBLAS_WORKSPACE_BYTES
        fragmentation = K.ALLOCATOR_FRAGMENTATION * (activations + logits + gradients)
    overhead = context + workspace + fragmentation + dequant
    if s.dora:
        notes.append("DoRA: rough (its weight-norm buffers are not modelled)")
    if s.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer: its states can spill to RAM under pressure instead of failing")

    components = dict(weights=weights, adapter=adapter, gradients=gradients, optimizer=optimizer,
                      activations=activations, logits=logits, generation=generation, overhead=overhead)
    if grpo:
        top = max(components, key=components.get)
        i = next(i for i, n in enumerate(notes) if n.startswith("GRPO:"))
        notes[i] += f"; the largest part is {top} ({components[top] / 2**30:.2f} GiB)"
    details = dict(layer_saved=layer, checkpoints=shape.layers * tokens * shape.hidden * d.resid
                   if s.grad_checkpointing else 0, backward_transient=transient, autocast_weight_copies=casts,
                   eager_mask=mask, cuda_context=0 if s.device == "cpu" else context,
                   cpu_runtime=context if s.device == "cpu" else 0, cublas_workspace=workspace,
                   allocator_fragmentation=fragmentation, dequant_buffer=dequant,
                   reference_forward=reference, orpo_sft_term=sft_term, generation_kv_cache=kv_cache,
                   generation_logits=gen_logits, grpo_reference_forward=grpo_reference)
    return Estimate(shape, s, {k: int(round(v)) for k, v in components.items()},
                    {k: int(round(v)) for k, v in details.items()}, trainable, notes)


def chunked_loss_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """The chunked loss's peak (core/train/loss.py) for `tokens` scored tokens: one tile at its backward peak, the
    fp32 gradient of the scored hidden states, and the per-token statistics."""
    tile = min(tokens, K.LOSS_TOKEN_TILE) * min(vocab, K.LOSS_VOCAB_TILE) * K.LOSS_TILE_PEAK_BYTES
    return tile + tokens * (hidden * 4 + K.LOSS_PER_TOKEN_STATS_BYTES)


def per_gpu(est: Estimate, strategy: str, world: int) -> Estimate:
    """The estimate for ONE of `world` GPUs under a strategy (single / ddp / fsdp); formulas and their sources in
    core.estimate.constants. DDP: every rank holds a whole replica, plus the reducer's gradient buckets; activations are
    per rank. FSDP: weights, adapter, gradients and optimizer state sharded 1/N, plus the unsharded layers being
    gathered (this one and the prefetched next) and the root unit (embeddings, lm_head) unsharded."""
    if strategy == "single" or world <= 1:
        return est
    c = dict(est.components)
    d = dict(est.details)
    notes = list(est.notes)
    if strategy == "ddp":
        bucket = int(c["gradients"] * K.DDP_GRAD_BUCKET_COPIES)
        c["overhead"] += bucket
        d["ddp_grad_buckets"] = bucket
        notes.append(f"per GPU of {world} (DDP): a whole replica on each, plus the gradient buckets")
    elif strategy == "fsdp":
        shape = est.shape
        layer_weights = c["weights"] - shape.other_params * (c["weights"] / max(shape.total_params, 1))
        per_layer = layer_weights / max(shape.layers, 1)
        root = c["weights"] - layer_weights  # embeddings, norms, lm_head: the root unit, gathered for the loss
        gathered = int(per_layer * K.FSDP_UNSHARDED_LAYERS + root)
        c["weights"] = int(c["weights"] / world) + gathered
        for k in ("adapter", "gradients", "optimizer"):
            c[k] = int(c[k] / world)
        d["fsdp_gathered_units"] = gathered
        notes.append(f"per GPU of {world} (FSDP full shard): 1/{world} of the weights and adapter state, plus "
                     f"{K.FSDP_UNSHARDED_LAYERS} layers and the root unit gathered at a time")
    else:
        raise ValueError(f"strategy must be single, ddp or fsdp, got {strategy!r}")
    return Estimate(est.shape, est.settings, c, d, est.trainable_params, notes)


# ---------------------------------------------------------------- fits / tight / does not fit

@dataclass
class Verdict:
    """How an estimate sits against a GPU: status is "fits", "tight" or "does not fit"; message gives the
    numbers behind it (without repeating the status)."""
    status: str
    needed: int          # bytes the estimate says the step peaks at
    usable: int          # bytes available: the GPU's free memory (or total, when no reading)
    margin: int          # usable - needed; negative when short
    message: str

    @property
    def fits(self) -> bool:
        return self.status != "does not fit"


def card_bytes(size_gb: float) -> int:
    """Usable bytes of a card sold as `size_gb` GB when there is no reading of it."""
    return int(size_gb * K.GiB - K.NOMINAL_CARD_RESERVE)


def verdict(estimate, gpu_total_bytes: int, gpu_free_bytes: int | None = None) -> Verdict:
    """Compare an Estimate (or a byte count) with a GPU. Free memory counts when known: other programs hold
    the rest. Within TIGHT_FRACTION of the limit is "tight": estimates are not exact."""
    needed = int(estimate.total_bytes if hasattr(estimate, "total_bytes") else estimate)
    usable = int(gpu_total_bytes if gpu_free_bytes is None else min(gpu_total_bytes, gpu_free_bytes))
    margin = usable - needed
    if needed > usable:
        return Verdict("does not fit", needed, usable, margin,
                       f"needs {gb(needed)}, {gb(usable)} available ({gb(-margin)} short)")
    if margin < K.TIGHT_FRACTION * usable:
        return Verdict("tight", needed, usable, margin,
                       f"{gb(needed)} of {gb(usable)}, only {gb(margin)} to spare: close other GPU programs "
                       "or take a suggestion")
    return Verdict("fits", needed, usable, margin, f"{gb(needed)} of {gb(usable)}, {gb(margin)} to spare")


# ---------------------------------------------------------------- make it fit

@dataclass
class Suggestion:
    """A set of changes (RunConfig dotted names -> values) and what the run then needs."""
    changes: dict
    estimate: Estimate
    summary: str
    cost: float            # how much the user gives up; lower is closer to what they asked for

    def to_dict(self) -> dict:
        return {"changes": self.changes, "total_bytes": self.estimate.total_bytes, "summary": self.summary,
                "components": dict(self.estimate.components)}


# What each trade costs the user, in rough "how much worse is the run" units (judgement): dropping tokens
# from examples changes what is learned; the rest mostly costs speed.
_COST = {"qlora": 3.0, "lora_from_full": 4.0, "checkpointing": 1.5, "optim8": 0.5, "batch_halving": 0.5,
         "seq_halving": 4.0, "rank_halving": 1.0, "sdpa": 0.2}
_MIN_SEQ, _MIN_RANK = 128, 4


def _halvings(value: int, floor: int) -> list[int]:
    out = [value]
    while out[-1] // 2 >= min(floor, value):
        out.append(out[-1] // 2)
    return out


def _candidates(s: Settings):
    """Every combination of the trades a user would make: (settings, changes, cost, words)."""
    effective = s.batch_size * s.grad_accum
    methods = dict.fromkeys([s.method, "qlora"] + (["lora"] if s.method == "full" else []))
    options = itertools.product(methods, dict.fromkeys([s.grad_checkpointing, True]),
                                dict.fromkeys([s.optimizer, "adamw_8bit" if s.optimizer == "adamw" else s.optimizer]),
                                dict.fromkeys([s.attn, "sdpa" if s.attn == "eager" else s.attn]),
                                enumerate(_halvings(s.batch_size, 1)), enumerate(_halvings(s.seq_len, _MIN_SEQ)),
                                enumerate(_halvings(s.rank, _MIN_RANK)))
    for method, ckpt, optim, attn, (bi, batch), (si, seq), (ri, rank) in options:
        if method == "full" and ri:
            continue
        accum = max(1, -(-effective // batch))
        trades = [  # (taken?, changes, cost, words)
            (method != s.method, {"quant.method": method},
             (_COST["lora_from_full"] if s.method == "full" else 0) + (_COST["qlora"] if method == "qlora" else 0),
             "4-bit base (QLoRA)" if method == "qlora" else "LoRA"),
            (ckpt != s.grad_checkpointing, {"train.grad_checkpointing": True}, _COST["checkpointing"],
             "gradient checkpointing"),
            (optim != s.optimizer, {"train.optimizer": optim}, _COST["optim8"], "8-bit AdamW"),
            (attn != s.attn, {"model.attn_implementation": attn}, _COST["sdpa"], "SDPA attention"),
            (bi > 0, {"train.batch_size": batch, "train.grad_accum": accum}, bi * _COST["batch_halving"],
             f"batch {batch} x accumulation {accum}"),
            (si > 0, {"data.max_len": seq}, si * _COST["seq_halving"], f"max length {seq}"),
            (ri > 0, {"lora.r": rank, "lora.alpha": s.alpha * rank / s.rank}, ri * _COST["rank_halving"],
             f"rank {rank}"),
        ]
        taken = [t for t in trades if t[0]]
        changes = {k: v for t in taken for k, v in t[1].items()}
        new = replace(s, method=method, grad_checkpointing=ckpt, optimizer=optim, attn=attn, batch_size=batch,
                      grad_accum=accum if bi else s.grad_accum, seq_len=seq, rank=rank, alpha=s.alpha * rank / s.rank)
        yield new, changes, sum(t[2] for t in taken), [t[3] for t in taken]


def suggest(shape: ModelShape, settings: Settings, gpu_bytes: int, limit: int = 3) -> list[Suggestion]:
    """The closest settings that fit in `gpu_bytes` (usable bytes: free memory, or card_bytes(size)), best
    first. Already fits: one Suggestion with no changes. Nothing fits: an empty list (smallest() says how
    much even the leanest settings need)."""
    current = estimate(shape, settings)
    if verdict(current, gpu_bytes).status == "fits":
        return [Suggestion({}, current, "already fits", 0.0)]
    found = []
    for new, changes, cost, words in _candidates(settings):
        if not changes:
            continue
        est = estimate(shape, new)
        status = verdict(est, gpu_bytes).status
        if status != "does not fit":
            found.append((status != "fits", cost, est.total_bytes, changes, est, words))
    found.sort(key=lambda f: f[:3])
    chosen = []
    for tight, cost, _, changes, est, words in found:
        # a superset of changes already proposed gives up more for nothing
        if any(set(c.changes.items()) <= set(changes.items()) for c in chosen):
            continue
        summary = ", ".join(words) + (" (tight)" if tight else "")
        chosen.append(Suggestion(changes, est, summary, cost))
        if len(chosen) == limit:
            break
    return chosen


def smallest(shape: ModelShape, settings: Settings) -> Estimate:
    """The leanest estimate the suggestion search can reach (for saying how far off "nothing fits" is)."""
    return min((estimate(shape, new) for new, *_ in _candidates(settings)), key=lambda e: e.total_bytes)
