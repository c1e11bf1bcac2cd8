#!/usr/bin/env bash
# Issue 12's long CPU runs as two queues, one torch thread each (the machine has two cores):
#   bash scripts/cpu-runs.sh          # starts both queues in the background; logs in runs/
#   bash scripts/cpu-runs.sh 1        # queue 1 only, in the foreground (2 likewise)
# Every step resumes what an earlier session left (training from wip/<id>/train_state.pt,
# evaluations from their TSV) or finishes at once when done, so the same command carries the
# work on in each session; a queue already running (runs/queue<q>.lock) is left alone. A trained
# model is shipped to models/<id> (weights, card, config) only when its training has finished;
# its full runs certify in bfloat16 where bench/precision.py qualifies it on a CPU that has
# bfloat16 (the card records it). Commit models, TSVs and cards as they complete (`git status
# models/`). Needs .venv (make install) and the data: SPLITZ_DATA, as for splitz.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
SPLITZ=.venv/bin/splitz

train() {  # config batch: train into wip/<id> (resumes), then ship to models/<id> with the
           # certification batch (the architecture's fastest here: bench/engine.py --record)
  local id
  id=$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['id'])" "$1")
  [ -e "models/$id" ] && return  # shipped: its training had finished
  $SPLITZ train --config "$1" --out "wip/$id" --precision auto  # bfloat16 where the CPU has it
  rm -rf "wip/$id.ship"
  mkdir -p "wip/$id.ship"
  cp "wip/$id/model.safetensors" "wip/$id/card.json" "wip/$id.ship/"
  cp "$1" "wip/$id.ship/train_config.json"
  .venv/bin/python -c "import sys; from splitz import checkpoint as c; p = sys.argv[1]
card = c.read_card(p); card.batch_size = int(sys.argv[2]); c.write_card(card, p)" "wip/$id.ship" "$2"
  mv "wip/$id.ship" "models/$id"  # whole, in one rename: the service may be watching models/
}

native_bf16() {  # does this CPU compute bfloat16 in hardware? (else torch emulates it, 8-10x
                 # slower than float32; the machine differs between sessions)
  .venv/bin/python -c "import sys, torch; from splitz.smoothing import native_bfloat16
sys.exit(not native_bfloat16(torch.device('cpu')))"
}

qualify() {  # id: where this CPU has bfloat16, bench/precision.py's rule on 100 test images at
             # n = 10,000 (measured here: bfloat16 f2 certifies twice as fast); the card then says
             # bfloat16 and the runs begun after it certify in it
  native_bf16 || return 0
  grep -q '"precision_check"' "models/$1/card.json" && return 0
  .venv/bin/python bench/precision.py --model "models/$1" --out-dir "runs/precision-$1" --record
}

begun_in() {  # protocol file: the precision its run began in (a run older than protocol files,
              # or none yet: float32)
  .venv/bin/python -c "import json, os, sys; p = sys.argv[1]
print(json.load(open(p))['precision'] if os.path.exists(p) else 'float32')" "$1"
}

emulated() {  # protocol file: true (and says so) for a run begun in bfloat16, on a CPU without it
  [ "$(begun_in "$1")" = bfloat16 ] && ! native_bf16 \
    && echo "$1: begun in bfloat16, which this CPU emulates: left for another session"
}

evaluate() {  # id name [splitz evaluate options]: models/<id>/<name>.tsv, recorded in the card;
              # a begun run resumes in its precision (the card's may have changed since)
  local id=$1 name=$2 proto="models/$1/$2.protocol.json" precision=()
  shift 2
  if [ -e "$proto" ] || [ -e "models/$id/$name.tsv" ]; then  # begun
    emulated "$proto" && return 0
    precision=(--precision "$(begun_in "$proto")")
  fi
  $SPLITZ evaluate --model "models/$id" --out "models/$id/$name.tsv" --record \
    "${precision[@]}" "$@"
}

dev() {  # id: the development run (n = 10,000; MNIST every 100th, CIFAR-10 the exact first 1000)
  case $1 in
    mnist-*) evaluate "$1" eval-every100-n10000 --every 100 --n 10000 ;;
    *) evaluate "$1" eval-exact1000-every10-n10000 --data cifar10-exact1000 --every 10 --n 10000 ;;
  esac
}

full() {  # id [options]: the standard protocol at n = 100,000: MNIST every 10th test image;
          # CIFAR-10 every 20th, first the 50 with exact pixels (90-150 s each here), then all
          # 500 on the JPEG copy in spread order (12-21 h: a partial run, --limit, estimates the
          # whole, and the same step without it extends the run later)
  local id=$1
  shift
  ls "models/$id"/eval-*n100000.tsv > /dev/null 2>&1 || qualify "$id"  # before the first run
  case $id in
    mnist-*) evaluate "$id" eval-every10-n100000 --every 10 --n 100000 "$@" ;;
    *) evaluate "$id" eval-exact1000-every20-n100000 --data cifar10-exact1000 --every 20 \
         --n 100000 "$@"
       evaluate "$id" eval-every20-n100000 --data cifar10 --every 20 --n 100000 --order spread \
         "$@" ;;
  esac
}

samples() {  # id run [options]: bench/samples.py on run's images, its fixed column from run
  mkdir -p docs/samples
  local id=$1 run=$2
  shift 2
  emulated "models/$id/$run.protocol.json" && return 0  # it certifies in the fixed run's
  .venv/bin/python bench/samples.py --model "models/$id" --out "docs/samples/$id.tsv" \
    --fixed "models/$id/$run.tsv" "$@"
}

# The issue's order: MNIST baselines (s0.5, s1.0 full protocol; s0.25), CIFAR-10 s0.5, s0.25, s1.0,
# the SPLITZ variant under the same recipe; development runs right after training. Issue 14's
# sample counts on 200 real images go before the rest of s0.25's full run (199 images in spread
# order already estimate it); in queue 2, which has less to do, SPLITZ under CIFAR-10's recipe
# (the quick SPLITZ models had locality there); the MNIST SPLITZ full run last, its development
# run being decisive. Queue 1 carries CIFAR-10's three full runs, so that no two queues ever
# write one TSV.
# A step that outlasts a session carries on in the next from wip/ (trainings) or its TSV.
queue1() {
  train configs/mnist/input-consistency-s0.25.json 200  # ~2.2 h: fits in one session
  dev mnist-input-consistency-s0.25
  train configs/cifar10/input-consistency-s0.5.json 50
  dev cifar10-input-consistency-s0.5
  train configs/cifar10/input-consistency-s0.25.json 50
  dev cifar10-input-consistency-s0.25
  train configs/cifar10/input-consistency-s1.0.json 50  # ~3 h: the large radii's σ
  dev cifar10-input-consistency-s1.0
  # CIFAR-10's full runs: each σ to 100 JPEG images first (the best-over-σ table sooner)
  full cifar10-input-consistency-s0.5 --limit 100
  samples cifar10-input-consistency-s0.5 eval-every20-n100000 --limit 100  # issue 14, item 4
  full cifar10-input-consistency-s0.25 --limit 100
  full cifar10-input-consistency-s1.0 --limit 100
  full cifar10-input-consistency-s0.5
  full cifar10-input-consistency-s0.25
  full cifar10-input-consistency-s1.0
}

queue2() {
  full mnist-input-consistency-s0.5  # begun in index order: it resumes so
  full mnist-input-consistency-s1.0 --order spread
  train configs/mnist/splitz-consistency-s1.0.json 200
  dev mnist-splitz-consistency-s1.0
  samples mnist-input-consistency-s0.5 eval-every10-n100000 --limit 200  # issue 14, item 4
  full mnist-input-consistency-s0.25 --order spread
  train configs/cifar10/splitz-consistency-s0.5.json 50  # ~5 h: SPLITZ under CIFAR-10's recipe
  dev cifar10-splitz-consistency-s0.5
  samples mnist-input-consistency-s0.5 eval-every10-n100000  # the rest of the 1000
  full mnist-splitz-consistency-s1.0 --order spread  # its dev run already loses by 3-66 points
}

main() {
  mkdir -p runs
  case "${1:-}" in
    1|2) exec 9>"runs/queue$1.lock"  # one copy of a queue at a time, even across sessions' starts
         flock -n 9 || { echo "queue $1 is already running"; exit 0; }
         "queue$1" ;;
    "") for q in 1 2; do
          nohup bash "$SELF" "$q" >> "runs/queue$q.log" 2>&1 &
          echo "queue $q: pid $!, log runs/queue$q.log"
        done ;;
    *) echo "usage: $0 [1|2]" >&2; exit 2 ;;
  esac
}

# One line: bash has parsed all of it before it runs, so editing this file while queues run
# (bash reads a script as it goes) cannot change what they do next.
main "$@"; exit
