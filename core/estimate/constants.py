"""Every number the VRAM estimator uses, in one place, each with where it comes from.

"Source read" means the installed library's code was read (versions pinned in requirements.txt: torch 2.13,
transformers 5.23, peft 0.21.2, bitsandbytes 0.50.2). "Measured" means a test in tests/test_vram_real.py
checks it against tensors on the CPU. "Judgement" means nobody has measured it for this app yet: the bench
(bench/vram_accuracy.py, run on a GPU) is how to correct it.
"""

from core import units

GiB = units.GiB  # the estimator reads its units as K.GiB / K.MiB
MiB = units.MiB

# ---------------------------------------------------------------- bytes per element of each dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ---------------------------------------------------------------- frozen base weights
# bitsandbytes 4-bit (NF4 / FP4). Source read: bitsandbytes/functional.py quantize_4bit. Two 4-bit values
# pack into one uint8 (0.5 B/param); one fp32 absmax per block of 64 values (4/64 = 0.0625 B/param):
# 0.5625 B/param. Measured (within 1%).
BNB4_BLOCKSIZE = 64
BNB4_PACKED_BYTES = 0.5
BNB4_ABSMAX_BYTES = 4.0 / BNB4_BLOCKSIZE
# Double quant (compress_statistics=True): the absmax values are themselves quantized to uint8 in blocks of
# 256 (quantize_blockwise(..., blocksize=256)) with one fp32 absmax per 256 blocks:
# 0.5 + 1/64 + 4/(64*256) = 0.5159 B/param. Measured (within 1%).
BNB4_DQ_ABSMAX_BYTES = 1.0 / BNB4_BLOCKSIZE + 4.0 / (BNB4_BLOCKSIZE * 256)
# Per quantized tensor: the 16-entry fp32 4-bit code table (get_4bit_type makes one per tensor) and, with double
# quant, a copy of the 256-entry fp32 table of the nested quantization (quantize_blockwise: code.to(device,
# copy=True)), the fp32 offset and the rounding of the second-level absmax. Measured (tiny model, within 1%).
BNB4_PER_TENSOR_BYTES = 16 * 4
BNB4_DQ_PER_TENSOR_BYTES = 256 * 4 + 4 + 4
# LLM.int8 (load_in_8bit): int8 weights (1 B/param) plus one fp32 scale per output row (SCB).
# Source read: bitsandbytes/nn/modules.py Int8Params.
INT8_BYTES = 1.0
INT8_ROW_SCALE_BYTES = 4

# Mixed-precision full fine-tuning keeps fp32 master weights (autocast computes in bf16/fp16).
FULL_FT_WEIGHT_BYTES = 4
# peft's prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not Params4bit / int8 to fp32
# (source read: peft/utils/other.py, "cast all non INT8 parameters to fp32"): embeddings, lm_head, norms and
# biases of a QLoRA / 8-bit model end up in fp32. For Llama-3-8B that is 1.05 B params x 4 B = 4.2 GB, and the
# fp32 embeddings make the residual stream and the MLP run in fp32 too (more activations). core/train/child.py
# skips that call; Settings.upcast_non_quantized models scripts that make it. Measured both ways.
KBIT_UPCAST_BYTES = 4

# ---------------------------------------------------------------- trainable parameters
# peft keeps LoRA weights in fp32 even on a bf16 base (get_peft_model(autocast_adapter_dtype=True) upcasts
# fp16/bf16 adapters; source read: peft/tuners/tuners_utils.py cast_adapter_dtype). Measured.
ADAPTER_BYTES = 4
# Gradients have the dtype of their parameter.
# torch.optim.AdamW: exp_avg + exp_avg_sq in the parameter's dtype (2 x 4 B for fp32) plus a 0-dim fp32 `step`
# tensor per parameter tensor (source read: torch/optim/adamw.py _init_group). Measured.
ADAMW_STATE_BYTES = 8
ADAMW_STEP_BYTES = 4
# bitsandbytes 8-bit AdamW: two uint8 states (2 B/param) and two fp32 absmax per block of 256 values; tensors
# under min_8bit_size=4096 elements keep fp32 states (8 B/param). Paged variants put states of tensors with
# >= 1e5 elements in unified memory that the driver can evict to RAM under pressure; we still count them.
# Source read: bitsandbytes/optim/optimizer.py Optimizer2State.init_state / get_state_buffer. Measured on CPU.
ADAM8BIT_STATE_BYTES = 2
ADAM8BIT_BLOCKSIZE = 256
ADAM8BIT_MIN_SIZE = 4096
ADAM8BIT_QMAP_BYTES = 2 * 256 * 4      # the two shared 256-entry fp32 quantization maps

# ---------------------------------------------------------------- activations (saved for backward)
# Bytes per token are built from an enumeration of what autograd keeps for one Llama-style decoder layer
# (core/estimate/vram.py `_layer_bytes_per_token`). The structural facts it rests on (source read):
# - A frozen linear saves nothing for its input (autograd only saves what the gradients that are needed use);
#   bnb MatMul4Bit saves only the packed weight (bitsandbytes/autograd/_functions.py).
# - bnb Linear4bit returns its output in the dtype of its input (`.to(inp_dtype)`), so with the fp32
#   embeddings of prepare_model_for_kbit_training the residual stream, q/k/v and the MLP run in fp32.
# - LlamaRMSNorm upcasts its input to fp32 and keeps it: 4 B x hidden + 4 B (rsqrt) per token.
# - SwiGLU keeps gate (silu input), silu output and up: 3 x intermediate per token.
# - peft LoRA keeps the (dropout) input of lora_A and the rank-r output of lora_A. nn.Dropout on CUDA keeps a
#   1-byte bool mask; on CPU it keeps a noise tensor of the input's dtype (ATen _dropout_impl).
# - SDPA (flash / memory-efficient / CPU flash) keeps q, k, v, the output and an fp32 logsumexp per head.
#   transformers passes enable_gqa when there is no padding mask, so k and v stay at KV-head size.
# - Eager attention keeps the fp32 softmax and its cast (heads x seq x (4 + 2) per token) plus repeated k, v.
# Measured on CPU (fp32 and bf16, dropout on and off, SDPA and eager) in tests/test_vram_real.py.
LN_RSQRT_BYTES = 4
SDPA_LSE_BYTES = 4
DROPOUT_MASK_BYTES_CUDA = 1
# Backward of one layer holds a few gradient buffers at once; judgement: three intermediate-size tensors
# (grad of down's input, of silu's output and of up) and two hidden-size ones.
BACKWARD_TRANSIENT_INTERMEDIATE = 3
BACKWARD_TRANSIENT_HIDDEN = 2

# ---------------------------------------------------------------- logits and loss
# transformers' ForCausalLMLoss upcasts logits to fp32 (`logits = logits.float()`, loss/loss_utils.py) and
# cross_entropy keeps the fp32 log-softmax. Forward peak per logit: logits (2) + fp32 copy (4) + log-softmax (4);
# backward peak: log-softmax (4) + grad of nll (4) + grad of log-softmax input (4) = 12 B per logit.
# Llama-3 (vocab 128256) at 2048 tokens: 3.2 GB. Measured: the saved part (4 B per logit) on CPU.
LOGIT_PEAK_BYTES = 12
# train.chunked_loss (core/train/loss.py, on by default): the loss runs over tiles of LOSS_TOKEN_TILE scored tokens
# x LOSS_VOCAB_TILE vocabulary columns (TRL's ChunkedLogProbFunction; its TOKEN_CHUNK_SIZE is 4096), recomputed
# in backward. The backward's peak per tile cell (trl/kernels/chunked_logprob.py _backward_tile): the recomputed
# logits tile, its fp32 scaled copy, p = exp(log p) and the gradient = 4 fp32 = 16 B. On top of the tile: the
# fp32 gradient of the scored hidden states (4 B x hidden per token) and a few fp32 per-token statistics.
LOSS_TOKEN_TILE = 4096
LOSS_VOCAB_TILE = 8192
LOSS_TILE_PEAK_BYTES = 16
LOSS_PER_TOKEN_STATS_BYTES = 4 * 8

# ---------------------------------------------------------------- fixed overhead (CUDA)
# CUDA context + cuBLAS/cuDNN handles + kernel images, visible in nvidia-smi but not in
# torch.cuda.memory_reserved. Judgement from common reports (300-600 MB with lazy module loading on
# CUDA 12); bench/vram_accuracy.py prints the measured value (nvml used - torch reserved) to refine it.
CUDA_CONTEXT_BYTES = 500 * MiB
# A CPU run's process before its model: Python, torch, transformers (its Trainer), peft, trl, datasets, bitsandbytes
# and our training modules imported. Measured RSS 0.475 GiB (torch 2.13.0+cpu, 2026-12-07); it is RAM the run
# needs like any tensor, so the CPU estimate counts it in its overhead line.
CPU_RUNTIME_BYTES = 475 * MiB
# The caching allocator reserves more than it hands out (block rounding, fragmentation between step shapes).
# Judgement: 10% of the memory that changes during a step (activations, logits, gradients), plus 64 MiB for
# cuBLAS workspaces.
ALLOCATOR_FRAGMENTATION = 0.10
CUBLAS_WORKSPACE_BYTES = 64 * MiB
# bitsandbytes dequantizes one 4-bit weight at a time to the compute dtype for the matmul in forward and
# backward (backends/default/ops.py _gemm_4bit_default_impl, MatMul4Bit.backward): one buffer the size of
# the largest linear weight.
DEQUANT_BUFFERS = 1

# ---------------------------------------------------------------- verdict
# Estimates are +-10-15% at best, so a run within 8% of the usable memory is "tight", not "fits".
TIGHT_FRACTION = 0.08
# A card sold as "G GB" has G GiB; the driver keeps some (nvml v2 "reserved", ~0.3-0.5 GiB) and a desktop
# uses some more. For a chosen size with no reading, we take G GiB minus this.
NOMINAL_CARD_RESERVE = 512 * MiB
GPU_SIZES_GB = (6, 8, 12, 16, 24, 48, 80)

# ---------------------------------------------------------------- several GPUs (core.estimate.vram.per_gpu)
# DDP (torch.nn.parallel.DistributedDataParallel): every rank holds the whole model, its adapter, gradients and
# optimizer state, and the reducer copies the gradients into flat buckets for the all-reduce (bucket_cap_mb=25
# per bucket; with gradient_as_bucket_view off, a full second copy of the trainable gradients: PyTorch docs,
# "DistributedDataParallel", gradient_as_bucket_view). Activations are per rank (its own micro-batch).
DDP_GRAD_BUCKET_COPIES = 1
# FSDP2 (torch.distributed.fsdp.fully_shard, transformer-layer wrap): parameters, gradients and optimizer state
# are sharded 1/N; a layer is all-gathered unsharded just before its forward/backward and the next one is
# prefetched (forward_prefetch / backward prefetch of one unit: PyTorch FSDP docs), so two layers' full weights are
# resident at once; the root unit (embeddings, final norm, lm_head) stays unsharded while the loss is computed.
FSDP_UNSHARDED_LAYERS = 2
