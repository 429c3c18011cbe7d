#!/usr/bin/env bash
# The MNIST-1D experiments of EXPERIMENTS.md (run from anywhere): the headline sweep (`run_mnist1d.sh main`) and the batchless
# ablations (`run_mnist1d.sh ablations`). Both write to results/mnist1d.sqlite; re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=".venv/bin/batchless"
COMMON=(--dataset mnist1d --num-samples 4000 --epochs 8 --threads 1 --results results/mnist1d.sqlite)
case "${1:-main}" in
main)
  $B sweep "${COMMON[@]}" --seeds 3 --norms none,bn,gn,ln,batchless --batch-sizes 1,2,4,8,16,32,64,128,256 ;;
ablations)
  # seed-major: every variant of seed 0 before seed 1, so a run cut short still covers every variant
  A=(--norms batchless --batch-sizes 1,16,256)
  for seed in 0 1 2; do
    S=("${COMMON[@]}" --seeds 1 --seed-offset "$seed")
    $B sweep "${S[@]}" "${A[@]}" --no-data-init
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 0.1
    $B sweep "${S[@]}" "${A[@]}" --stats-optimizer ema --stats-lr-scale 10
    $B sweep "${S[@]}" "${A[@]}" --no-data-init --stats-lr-scale 0.1
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 10
    $B sweep "${S[@]}" --norms batchless-abs,batchless-inv --batch-sizes 1,16,256
    $B sweep "${S[@]}" "${A[@]}" --nll-weight 0.1
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 0.01
  done ;;
*) echo "usage: $0 main|ablations" >&2; exit 2 ;;
esac
