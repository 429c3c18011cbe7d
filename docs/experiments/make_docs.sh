#!/usr/bin/env bash
# Tables, plots and JSON exports of EXPERIMENTS.md and README from the stores in results/ (written by
# run_fashion.sh and run_mnist1d.sh); a store that is not there is skipped with a line saying so. Also keeps a
# snapshot of each store in docs/experiments/stores/, so that a fresh clone can resume a sweep:
#   mkdir -p results && cp docs/experiments/stores/*.sqlite results/
set -euo pipefail
cd "$(dirname "$0")/../.."
B=".venv/bin/batchless"
D=docs/experiments
mkdir -p $D/stores

have() {  # snapshots the store (snapshot_store.py); one with no cell yet counts as not there
  if [ -f "results/$1.sqlite" ] && .venv/bin/python $D/snapshot_store.py "results/$1.sqlite" "$D/stores/$1.sqlite"; then
    return 0
  fi
  echo "results/$1.sqlite is not here: skipped" >&2
  return 1
}

# the README's headline tables name the rows as the README does
NAMES=(-e 's/^| bn /| BatchNorm /' -e 's/^| gn /| GroupNorm /' -e 's/^| ln /| LayerNorm /'
       -e 's/^| batchless |/| batchless (paper) |/'
       -e 's/^| batchless \[std_speed=0.1\] |/| batchless (`std_speed=0.1`: the previous default) |/'
       -e 's/^| batchless \[mean_speed=0.1, std_speed=0.1\] |/| batchless (default) |/'
       -e 's/^| batchless \[mean_speed=0.1, std_speed=0.1, weight_std=True\] |/| batchless (default) [weight_std=True] |/'
       -e 's/ \[weight_std=True\] |/ + `standardize_weights` |/')
if have fashion; then  # the README's headline table, the lr choices, curves, JSON
  $B report --results results/fashion.sqlite --metrics test_acc,test_acc_25,test_acc_50,lr,val_acc_best,wall_s \
    --curves $D/fashion_curves.png > $D/fashion.md
  $B report --results results/fashion.sqlite --json > $D/fashion.json
  # the README's headline and the batch-size plot: test accuracy
  $B report --results results/fashion.sqlite --metrics test_acc --batch-sizes 1,2,4,8,16,64,256 \
    --plot $D/fashion_batch_size.png | sed "${NAMES[@]}" > $D/fashion_headline.md
fi
if have fashion_resnet; then
  $B report --results results/fashion_resnet.sqlite --metrics test_acc,lr --curves $D/fashion_resnet_curves.png \
    > $D/fashion_resnet.md
  $B report --results results/fashion_resnet.sqlite --json > $D/fashion_resnet.json
fi
if have fashion_resnet && have fashion_resnet_ws; then  # the README's ResNet table: test accuracy
  $B report --results results/fashion_resnet.sqlite results/fashion_resnet_ws.sqlite --metrics test_acc \
    --batch-sizes 2,4,8,16,32,64,256 | sed "${NAMES[@]}" > $D/fashion_resnet_headline.md
fi
for store in fashion_variants fashion_resnet_variants fashion_sgd fashion_sgd_ema fashion_adamw fashion_ws \
    fashion_resnet_ws fashion_mlp fashion_demo; do
  if have $store; then
    curves=()  # the other optimizers' time to accuracy (issue 17): validation accuracy per epoch
    case $store in fashion_sgd|fashion_adamw|fashion_mlp) curves=(--curves $D/${store}_curves.png) ;; esac
    $B report --results results/$store.sqlite --metrics test_acc,test_acc_25,test_acc_50,lr,nll_last "${curves[@]}" \
      > $D/$store.md
  fi
done
# time to accuracy with and without weight standardization (issue 17): the stores together, curves per epoch
if have fashion && have fashion_ws; then
  $B report --results results/fashion.sqlite results/fashion_ws.sqlite --norms bn,gn,batchless \
    --batch-sizes 4,16,64,256 --metrics test_acc,test_acc_25,test_acc_50 --curves $D/fashion_ws_curves.png \
    > $D/fashion_time_to_accuracy.md
fi
if have fashion_resnet && have fashion_resnet_ws; then
  $B report --results results/fashion_resnet.sqlite results/fashion_resnet_ws.sqlite \
    --metrics test_acc,test_acc_25,test_acc_50 --curves $D/fashion_resnet_ws_curves.png \
    > $D/fashion_resnet_time_to_accuracy.md
fi
for store in sgd_mnist1d sgd_fold adam_mnist1d adamw_mnist1d adam_fold adam_frozen adam_variants adam_radial \
    adam_nobias adam_ws sgd_ws adamw_ws adam_mnist1d_c3 adamw_mnist1d_c3 sgd_mnist1d_c3 adam_ws_c3 adamw_ws_c3 \
    sgd_ws_c3; do
  # MNIST-1D, fair protocol (probes/mnist1d_fair.sh; _c3: the rate chosen on 3 seeds)
  if have $store; then
    $B report --results results/$store.sqlite --metrics test_acc,test_acc_25,test_acc_50,lr > $D/$store.md
  fi
done
if have mnist1d; then
  $B report --results results/mnist1d.sqlite --norms none,bn,gn,ln,batchless --base-only \
    --metrics test_acc,val_acc_best --plot $D/mnist1d_batch_size.png > $D/mnist1d_headline.md
  $B report --results results/mnist1d.sqlite --norms none,bn,gn,ln,batchless \
    --metrics test_acc,val_acc_best,test_acc_at_best_val,val_acc_best_epoch,wall_s,act_mem_mb \
    --plot $D/mnist1d_batch_size_tuned.png > $D/mnist1d_all.md
  $B report --results results/mnist1d.sqlite --json > $D/mnist1d.json
fi
if have mnist1d_ablations; then
  $B report --results results/mnist1d_ablations.sqlite --metrics test_acc,val_acc_best \
    --plot $D/mnist1d_ablations.png > $D/mnist1d_ablations.md
  $B report --results results/mnist1d_ablations.sqlite --json > $D/mnist1d_ablations.json
fi
if have synthetic; then
  $B report --results results/synthetic.sqlite --metrics test_acc,val_acc_best \
    --plot $D/synthetic_batch_size.png > $D/synthetic.md
  $B report --results results/synthetic.sqlite --json > $D/synthetic.json
fi
