#!/usr/bin/env bash
# The MNIST-1D experiments of EXPERIMENTS.md (run from anywhere; re-running resumes, finished cells are skipped).
#   run_mnist1d.sh main       the headline sweep: 5 norms x batch sizes 1..256 x 3 seeds, 8 epochs
#   run_mnist1d.sh tuned      batchless with a 10x smaller learning rate for mu/sigma, same sweep
#   run_mnist1d.sh more       the remaining batch sizes of both (2, 8, 32, 128)
#   run_mnist1d.sh ablations  batchless ablations at batch sizes 1, 16, 256, 3 epochs, 3 seeds, own store
#   run_mnist1d.sh synthetic  the synthetic task (badly scaled, shifted features), 5 norms x 1, 16, 256
set -euo pipefail
cd "$(dirname "$0")/../.."
B=".venv/bin/batchless"
DATA=(--dataset mnist1d --num-samples 4000 --threads 1)
MAIN=("${DATA[@]}" --epochs 8 --seeds 3 --results results/mnist1d.sqlite --norms none,bn,gn,ln,batchless)
case "${1:-main}" in
main) $B sweep "${MAIN[@]}" --batch-sizes 1,4,16,64,256 ;;
tuned) $B sweep "${MAIN[@]/none,bn,gn,ln,batchless/batchless}" --stats-lr-scale 0.1 --batch-sizes 1,4,16,64,256 ;;
more)
  $B sweep "${MAIN[@]}" --batch-sizes 2,8,32,128
  $B sweep "${MAIN[@]/none,bn,gn,ln,batchless/batchless}" --stats-lr-scale 0.1 --batch-sizes 2,8,32,128 ;;
ablations)
  # seed-major: every variant of seed 0 before seed 1, so a run cut short still covers every variant
  A=(--norms batchless --batch-sizes 1,16,256)
  for seed in 0 1 2; do
    S=("${DATA[@]}" --epochs 3 --seeds 1 --seed-offset "$seed" --results results/mnist1d_ablations.sqlite)
    $B sweep "${S[@]}" --norms none,bn,gn,batchless --batch-sizes 1,16,256
    $B sweep "${S[@]}" "${A[@]}" --no-data-init
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 0.1
    $B sweep "${S[@]}" "${A[@]}" --stats-optimizer ema --stats-lr-scale 10
    $B sweep "${S[@]}" "${A[@]}" --no-data-init --stats-lr-scale 0.1
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 10
  done
  for seed in 0 1 2; do
    S=("${DATA[@]}" --epochs 3 --seeds 1 --seed-offset "$seed" --results results/mnist1d_ablations.sqlite)
    $B sweep "${S[@]}" "${A[@]}" --stats-lr-scale 0.01
    $B sweep "${S[@]}" "${A[@]}" --stats-optimizer ema --stats-lr-scale 1
    $B sweep "${S[@]}" --norms batchless-abs,batchless-inv --batch-sizes 1,16,256
    $B sweep "${S[@]}" "${A[@]}" --nll-weight 0.1
  done ;;
synthetic)
  SYN=(--dataset synthetic --epochs 5 --seeds 3 --threads 1 --batch-sizes 1,16,256 --results results/synthetic.sqlite)
  $B sweep "${SYN[@]}" --norms none,bn,gn,ln,batchless
  $B sweep "${SYN[@]}" --norms batchless --stats-lr-scale 0.1 ;;
*) echo "usage: $0 main|tuned|more|ablations|synthetic" >&2; exit 2 ;;
esac
