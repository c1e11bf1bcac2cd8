#!/usr/bin/env bash
# Issue 12's long CPU runs as two queues, one torch thread each (the machine has two cores):
#   bash scripts/cpu-runs.sh          # starts both queues in the background; logs in runs/
#   bash scripts/cpu-runs.sh 1        # queue 1 only, in the foreground (2 likewise)
# Every step resumes what an earlier session left (training from wip/<id>/train_state.pt,
# evaluations from their TSV) or finishes at once when done, so the same command carries the
# work on in each session. A trained model is shipped to models/<id> (weights, card, config)
# only when its training has finished; commit it, and the TSVs and cards, as they complete
# (`git status models/`). Needs .venv (make install) and the data: SPLITZ_DATA, as for splitz.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
SPLITZ=.venv/bin/splitz

train() {  # config batch: train into wip/<id> (resumes), then ship to models/<id> with the
           # certification batch (the architecture's fastest here: bench/engine.py --record)
  local id
  id=$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['id'])" "$1")
  $SPLITZ train --config "$1" --out "wip/$id"
  if [ ! -e "models/$id" ]; then
    mkdir -p "wip/$id.ship"
    cp "wip/$id/model.safetensors" "wip/$id/card.json" "wip/$id.ship/"
    cp "$1" "wip/$id.ship/train_config.json"
    .venv/bin/python -c "import sys; from splitz import checkpoint as c; p = sys.argv[1]
card = c.read_card(p); card.batch_size = int(sys.argv[2]); c.write_card(card, p)" "wip/$id.ship" "$2"
    mv "wip/$id.ship" "models/$id"  # whole, in one rename: the service may be watching models/
  fi
}

evaluate() {  # id every n [options]: the run's TSV, recorded in the card
  local id=$1 every=$2 n=$3
  shift 3
  $SPLITZ evaluate --model "models/$id" --out "models/$id/eval-every$every-n$n.tsv" \
    --every "$every" --n "$n" --record "$@"
}

# The issue's order: MNIST baselines (s0.5, s1.0 full protocol; s0.25), CIFAR-10 s0.5 and s0.25,
# the SPLITZ variant under the same recipe; development runs (n = 10,000) right after training.
queue1() {
  train configs/mnist/splitz-consistency-s1.0.json 200
  evaluate mnist-splitz-consistency-s1.0 100 10000
  train configs/cifar10/input-consistency-s0.5.json 50
  evaluate cifar10-input-consistency-s0.5 20 10000 --limit 100
  evaluate mnist-splitz-consistency-s1.0 10 100000 --order spread
}

queue2() {
  evaluate mnist-input-consistency-s0.5 10 100000
  evaluate mnist-input-consistency-s1.0 10 100000 --order spread
  train configs/mnist/input-consistency-s0.25.json 200
  evaluate mnist-input-consistency-s0.25 100 10000
  train configs/cifar10/input-consistency-s0.25.json 50
  evaluate cifar10-input-consistency-s0.25 20 10000 --limit 100
  evaluate mnist-input-consistency-s0.25 10 100000 --order spread
}

mkdir -p runs
case "${1:-}" in
  1) queue1 ;;
  2) queue2 ;;
  "") for q in 1 2; do
        nohup bash "$0" "$q" > "runs/queue$q.log" 2>&1 &
        echo "queue $q: pid $!, log runs/queue$q.log"
      done ;;
  *) echo "usage: $0 [1|2]" >&2; exit 2 ;;
esac
