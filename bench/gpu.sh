#!/usr/bin/env bash
# The engine benchmark on a GPU machine, in one run; installs nothing (the device machine gets a
# copy of this checkout and its .venv). JSON lines and tables go to $OUT (default: bench-out/).
#   bash bench/gpu.sh            # every shipped model, float32 and bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
for model in models/*/; do
  name=$(basename "$model")
  timeout 240 "$PY" bench/engine.py --model "$model" --device cuda --n 200000 \
    --batches 1000,10000,50000 --precisions float32,bfloat16 | tee "$OUT/engine-$name.txt"
done
