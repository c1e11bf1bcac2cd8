#!/usr/bin/env bash
# Issue 12's CIFAR-10 models on one borrowed GPU, in one command: ResNet-20 with consistency
# regularization at sigma 0.25, 0.5 and 1.0 (configs/cifar10/gpu-input-consistency-s*.json),
# the three trained at once on the one GPU, each into $OUT/<id> with its per-epoch
# train_state.pt, so that what a kill leaves resumes later, on a CPU or a GPU.
#
# Here, first (copies the data, downloads the Python packages the device lacks, checks the size):
#   SPLITZ_DATA=... bash scripts/gpu-train.sh --prepare   # -> gpu-carry/{data,wheels}/ (ignored)
# On the device machine, from the repository root, with gpu-carry carried:
#   bash scripts/gpu-train.sh                      # device tool: run(command=..., carry=
#                                                  #   ["gpu-carry"], timeout_s=600)
# What comes back in $OUT (at most 8 files; default gpu-out/): gpu-train.log (GPU, versions,
# timings, summary), <id>.log per run, and <id>.tar per run as soon as it ends (finished or
# stopped): <id>/{train_state.pt, model.safetensors, card.json}, the last two if it finished.
# A run still going when the command itself is killed leaves <id>/train_state.pt instead.
#
# Environment (defaults):
#   SPLITZ_DATA   gpu-carry/data      folder holding cifar10-jpeg.tar.xz (18 MB)
#   WHEELS        gpu-carry/wheels    pydantic's wheels, installed when python3 lacks pydantic
#   SPLITZ_CACHE  /tmp/splitz-cache   where the JPEGs are extracted (once, before the runs)
#   DEVICE        cuda                or cpu, for a check of the plumbing
#   BUDGET_S      510                 the whole script ends by then: each run gets a timeout of
#                                     what is left after the extraction, less PACK_S (20)
#   PY            .venv/bin/python if there, else python3
#   EPOCHS, TRAIN_LIMIT, WORKERS      override the configs' epochs, train_limit, loader_workers
#                                     (the first two change the config: resume with the same)
#   CONFIGS       the three gpu-input-consistency configs
#   OMP_NUM_THREADS 1                 threads of each training process (the loaders have theirs)
# Resume a run: tar -xf <id>.tar -C wip/ && splitz train --config <its config> --out wip/<id>
# (any device; the same EPOCHS / TRAIN_LIMIT overrides if any were given).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "${1:-}" = "--prepare" ]; then
  set -e
  CARRY=gpu-carry
  mkdir -p "$CARRY/data" "$CARRY/wheels"
  : "${SPLITZ_DATA:?set SPLITZ_DATA to the data root holding cifar10-jpeg.tar.xz}"
  cp -u "$SPLITZ_DATA/cifar10-jpeg.tar.xz" "$CARRY/data/"
  PYV=${PY:-.venv/bin/python}
  pins=$("$PYV" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in
    ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'typing-extensions')))")
  # the device's python3 is CPython 3.12 on x86-64 (see the device tool's README)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" $pins
  ls -l "$CARRY/data" "$CARRY/wheels"
  # the device tool refuses a working tree (tracked + untracked-not-ignored + carried) > 64 MiB
  size=$( { git ls-files -z --cached --others --exclude-standard; find "$CARRY" -type f -print0; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  echo "travels: $((size / 1048576)) MiB (tracked and untracked files + $CARRY); the limit is 64"
  [ "$size" -le $((64 * 1048576)) ] || echo "WARNING: over the device tool's 64 MiB: it would refuse the run"
  exit 0
fi

START=$SECONDS
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-train.log
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-510}
PACK_S=${PACK_S:-20}
export SPLITZ_DATA=${SPLITZ_DATA:-gpu-carry/data}
export SPLITZ_CACHE=${SPLITZ_CACHE:-/tmp/splitz-cache}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
CONFIGS=${CONFIGS:-configs/cifar10/gpu-input-consistency-s0.25.json configs/cifar10/gpu-input-consistency-s0.5.json configs/cifar10/gpu-input-consistency-s1.0.json}
say() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }
fail() { say "FAILED: $*"; exit 1; }

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  WHEELS=${WHEELS:-gpu-carry/wheels}
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail "$PY has no pydantic and $WHEELS holds no wheels (run --prepare here, carry gpu-carry)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/splitz-site "$WHEELS"/*.whl >>"$LOG" 2>&1 || fail "installing $WHEELS"
  export PYTHONPATH=$PYTHONPATH:/tmp/splitz-site
fi

say "device $DEVICE, python $PY, data $SPLITZ_DATA, budget ${BUDGET_S}s"
if [[ $DEVICE == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import os, sys, torch, torchvision, pydantic
dev = sys.argv[1]
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"pydantic {pydantic.VERSION}, {os.cpu_count()} cores")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    print("GPU:", torch.cuda.get_device_name(dev))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "the device check"
[ -f "$SPLITZ_DATA/cifar10-jpeg.tar.xz" ] || fail "no $SPLITZ_DATA/cifar10-jpeg.tar.xz"

# Extract the JPEGs once, before the runs (data.py also serializes concurrent extractions)
"$PY" -c "from splitz import data; print(len(data.load('cifar10', True)), len(data.load('cifar10', False)), 'images')" \
  2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "extracting the data"
say "data ready in $SPLITZ_CACHE"

over=()
[ -n "${EPOCHS:-}" ] && over+=(--epochs "$EPOCHS")
[ -n "${TRAIN_LIMIT:-}" ] && over+=(--train-limit "$TRAIN_LIMIT")
[ -n "${WORKERS:-}" ] && over+=(--loader-workers "$WORKERS")
limit=$((BUDGET_S - (SECONDS - START) - PACK_S))
[ "$limit" -gt 30 ] || fail "only ${limit}s left for training"
say "training ${over[*]:-as configured}, each run stopped after ${limit}s"

summary() {  # one line for the run in folder $1
  "$PY" - "$1" <<'EOF'
import json, sys, torch
from pathlib import Path
d = Path(sys.argv[1])
state = d / "train_state.pt"
if not state.exists():
    sys.exit(print(f"{d.name}: no epoch finished"))
s = torch.load(state, weights_only=True, map_location="cpu")
epochs = json.loads(s["config"])["epochs"]
line = (f"{d.name}: {s['epoch']}/{epochs} epochs, {s['elapsed']:.0f} s training "
        f"({s['elapsed'] / max(1, s['epoch']):.1f} s/epoch)")
card = d / "card.json"
if card.exists():
    acc = json.loads(card.read_text())["metrics"]["clean_accuracy_noisy"]
    line += f", finished: clean accuracy under noise {acc}"
else:
    line += ", unfinished: resume with the same config and --out"
print(line)
EOF
}

run() {  # config: train, then pack the run's folder into $OUT/<id>.tar
  local cfg=$1 id t0=$SECONDS rc
  id=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['id'])" "$cfg")
  timeout -k 15 "$limit" "$PY" -m splitz train --config "$cfg" --device "$DEVICE" \
    --precision auto --out "$OUT/$id" "${over[@]}" >"$OUT/$id.log" 2>&1
  rc=$?
  echo "exit status $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (timed out)')" >>"$OUT/$id.log"
  echo "SUMMARY $(summary "$OUT/$id" 2>&1 | tail -1), exit status $rc, $((SECONDS - t0)) s wall" >>"$OUT/$id.log"
  if [ -d "$OUT/$id" ]; then
    rm -f "$OUT/$id"/*.tmp "$OUT/$id"/.*.tmp
    tar -C "$OUT" -cf "$OUT/$id.tar.part" "$id" && mv "$OUT/$id.tar.part" "$OUT/$id.tar" \
      && rm -rf "${OUT:?}/$id"
  fi
}

pids=()
for cfg in $CONFIGS; do
  run "$cfg" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

say "done; per run:"
grep -h '^SUMMARY' "$OUT"/*.log | sed 's/^SUMMARY /  /' | tee -a "$LOG"
ls -l "$OUT" >>"$LOG"
