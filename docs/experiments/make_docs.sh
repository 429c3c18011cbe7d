#!/usr/bin/env bash
# Tables, plots and JSON exports of EXPERIMENTS.md from the stores written by run_mnist1d.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=".venv/bin/batchless"
D=docs/experiments
$B report --results results/mnist1d.sqlite --norms none,bn,gn,ln,batchless --base-only \
  --metrics test_acc,val_acc_best --plot $D/mnist1d_batch_size.png > $D/mnist1d_headline.md
$B report --results results/mnist1d.sqlite --norms none,bn,gn,ln,batchless \
  --metrics test_acc,val_acc_best,test_acc_at_best_val,val_acc_best_epoch,wall_s,act_mem_mb \
  --plot $D/mnist1d_batch_size_tuned.png > $D/mnist1d_all.md
$B report --results results/mnist1d_ablations.sqlite --metrics test_acc,val_acc_best \
  --plot $D/mnist1d_ablations.png > $D/mnist1d_ablations.md
$B report --results results/mnist1d.sqlite --json > $D/mnist1d.json
$B report --results results/mnist1d_ablations.sqlite --json > $D/mnist1d_ablations.json
$B report --results results/synthetic.sqlite --metrics test_acc,val_acc_best \
  --plot $D/synthetic_batch_size.png > $D/synthetic.md
$B report --results results/synthetic.sqlite --json > $D/synthetic.json
# Fashion-MNIST (run_fashion.sh): the README's headline table, the lr choices, curves, JSON
if [ -f results/fashion.sqlite ]; then
  $B report --results results/fashion.sqlite --metrics test_acc,lr,val_acc_best,wall_s \
    --plot $D/fashion_batch_size.png --curves $D/fashion_curves.png > $D/fashion.md
  $B report --results results/fashion.sqlite --json > $D/fashion.json
fi
if [ -f results/fashion_resnet.sqlite ]; then
  $B report --results results/fashion_resnet.sqlite --metrics test_acc,lr --curves $D/fashion_resnet_curves.png \
    > $D/fashion_resnet.md
  $B report --results results/fashion_resnet.sqlite --json > $D/fashion_resnet.json
fi
