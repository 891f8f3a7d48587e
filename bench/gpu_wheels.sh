#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that bench/gpu_check.sh installs on a lent GPU machine that has torch,
# transformers, peft and accelerate but no network: bitsandbytes, datasets (+ dill, multiprocess) and gguf, at the
# versions requirements.txt pins, for Python 3.12 on manylinux x86-64. They land in .whl/ (git-ignored, ~45 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" requirements.txt | head -1; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(pin bitsandbytes)" "$(pin datasets)" "$(pin gguf)" dill==0.4.1 multiprocess==0.70.19
ls -la .whl
