#!/usr/bin/env bash
# SGD (momentum 0.9) on MNIST-1D at batch 64 under the fair protocol (grid around 0.1, cosine, 20 epochs,
# 3 seeds): which rule for the statistics lets batchless train at SGD's rates. Seconds per run.
#   sgd_mnist1d.sh            the norms, batchless at std_speed 1 and 0.1, and with a natural-gradient (EMA)
#                             step on the statistics (--stats-optimizer ema, rate = the learning rate)
#   sgd_mnist1d.sh fold       batchless with its data-init statistics folded into the layer before it
#                             (fold_init.py: the same function at init, std 1, so no 1/std^2 on SGD's rate)
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=docs/experiments/probes
A=(--dataset mnist1d --optimizer sgd --lr 0.1 --lr-grid 0.333,1,3 --extend-grid 2 --seeds 3 --jobs 1 --threads 1
   --epochs 20 --schedule cosine --batch-sizes 64)
if [ "${1:-}" = fold ]; then
  for speed in 0.1 1; do
    .venv/bin/python $P/fold_init.py sweep "${A[@]}" --norms batchless --std-speed $speed --results results/sgd_fold.sqlite
  done
  exit
fi
B=.venv/bin/batchless
$B sweep "${A[@]}" --norms none,bn,gn,ln,batchless --results results/sgd_mnist1d.sqlite
$B sweep "${A[@]}" --norms batchless --std-speed 0.1 --results results/sgd_mnist1d.sqlite
$B sweep "${A[@]}" --norms batchless --std-speed 0.1 --stats-optimizer ema --results results/sgd_mnist1d.sqlite
$B sweep "${A[@]}" --norms batchless --stats-optimizer ema --results results/sgd_mnist1d.sqlite
