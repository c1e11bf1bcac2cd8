#!/usr/bin/env bash
# The engine on a GPU against Cohen et al.'s CERTIFY applied as its users would (issue 14, item
# 5), in one run: samples/s of float32 and bfloat16 f2 per batch, then paired rounds at each
# precision's best batch, for the MNIST LeNets (ours, noise at the input and at the split, and the
# published 4.6-MFLOP lenet_small) and the CIFAR-10 ResNet-20 and ResNet-110, random weights
# (speed does not depend on them). Installs nothing (the device machine gets this checkout and its
# .venv); JSON lines and tables go to $OUT (default: bench-out/). At most 120 s per model.
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, 'cudnn tf32', torch.backends.cudnn.allow_tf32)" | tee -a "$OUT/gpu.txt"
run() {  # name, then bench/engine.py arguments
  local name=$1
  shift
  timeout 120 "$PY" bench/engine.py --device cuda --n 100000 --repeats 3 \
    --batches 1000,4000,16000 --ref-batches 400,1000,4000,16000 "$@" \
    | tee "$OUT/engine-$name.txt" || echo "$name: failed or timed out" | tee -a "$OUT/gpu.txt"
}
run lenet-input --arch lenet --dataset mnist --split input
run lenet-conv1 --arch lenet --dataset mnist --split conv1
run lenet_small-input --arch lenet_small --dataset mnist --split input
run resnet20-input --arch resnet --dataset cifar10 --depth 20 --split input
run resnet20-conv1 --arch resnet --dataset cifar10 --depth 20 --split conv1
run resnet110-input --arch resnet --dataset cifar10 --depth 110 --split input
