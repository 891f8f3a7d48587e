#!/usr/bin/env bash
# Every GPU-only check in one command, for a lent GPU machine (no network; torch, transformers, peft and accelerate
# there; the rest from the wheels bench/gpu_wheels.sh fetched into .whl/, carried with the tree):
#   1. bench/vram_accuracy.py --quick: LoRA, QLoRA (NF4 + double quant) and 8-bit rows over seq 512/2048,
#      batch 1/4, checkpointing on/off, two model shapes (Qwen2.5 0.5B and 1.5B, random weights): the estimate
#      against the NVML process peak and torch's peak reserved
#   2. bench/throughput.py on the 0.5B shape: plain Hugging Face padded (A) vs our defaults (B) vs packing (C)
#   3. the GPU-marked tests (tests/test_training_gpu.py)
# Results go to bench/results/ (GPU name, driver and library versions in each file) and, where $OUT is set (the
# device tool), are copied there. Imports are checked first, so a missing wheel fails in seconds.
#     bash bench/gpu_wheels.sh          # here, once
#     bash bench/gpu_check.sh           # there (the device tool: carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LORA_GARAGE_HOME=${LORA_GARAGE_HOME:-/tmp/lg-gpu-home}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lg-site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/lg-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'PYEOF' || exit 2
import importlib, sys
missing = []
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "gguf", "yaml", "psutil",
             "pynvml", "safetensors", "pandas", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:  # a missing wheel: say which, at once
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing) + ". Run bench/gpu_wheels.sh here and carry .whl")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch " + torch.__version__ + " sees no CUDA GPU (torch.cuda.is_available() is False): "
             "run this on the lent GPU machine")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
fail=0
W=/tmp/lg-gpu-weights
mkdir -p "$W" bench/results
echo "== 1/3 VRAM estimate vs measured (LoRA, QLoRA, 8-bit)"
timeout 300 $PY bench/vram_accuracy.py --quick --models qwen2.5-0.5b qwen2.5-1.5b --weights-dir "$W" || fail=1
echo "== 2/3 throughput A/B/C on the 0.5B shape"
$PY - "$W" <<'PYEOF' || fail=1
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.tiny import tiny_tokenizer  # any tokenizer will do for random weights: ids stay inside the vocabulary
folder = Path(sys.argv[1]) / "qwen2.5-0.5b"
if (folder / "config.json").exists() and not (folder / "tokenizer_config.json").exists():
    tiny_tokenizer().save_pretrained(folder)
PYEOF
GPU=$($PY -c "import re,torch; print(re.sub(r'[^A-Za-z0-9]+','-',torch.cuda.get_device_name(0)).strip('-').lower())")
timeout 180 $PY bench/throughput.py --model "$W/qwen2.5-0.5b" --steps 16 --warmup 4 --batch-size 8 --max-len 512 \
  --rows 600 --out "bench/results/throughput-$GPU-qwen2.5-0.5b.json" || fail=1
echo "== 3/3 GPU-marked tests"
timeout 180 $PY -m pytest tests/test_training_gpu.py -q -ra -p no:cacheprovider 2>&1 | tee "bench/results/gpu-tests-$GPU.txt" \
  || fail=1
if [ -n "${OUT:-}" ]; then cp bench/results/*"$GPU"* "$OUT"/ 2>/dev/null; fi
exit $fail
