#!/usr/bin/env bash
# MNIST-1D's CNN under the fair protocol (grid x3 apart, extended twice, cosine over 20 epochs, 3 seeds), for
# issue 17's optimizers; seconds a run at batch 64. Batch sizes: $BS (default 64). Stores in results/, tables
# by make_docs.sh.
#   mnist1d_fair.sh sgd        SGD (momentum 0.9, grid around 0.1): the norms, batchless at std_speed 1 and 0.1,
#                              and with a natural-gradient (EMA) step on the statistics (rate = learning rate)
#   mnist1d_fair.sh sgd fold   batchless with its data-init statistics folded into the layer before it
#                              (fold_init.py: the same function at init, std 1, so no 1/std^2 on SGD's rate)
#   mnist1d_fair.sh adam       Adam (grid around 3e-3): the norms and the default; `adam fold` as above;
#                              `adam speeds`: batchless at std_speed 0.03 and 0.3; `adam frozen`: the
#                              default with its statistics frozen at the data init (their lr x 1e-4);
#                              `adam radial`: the default with radial.py's per-instance gradient projection;
#                              `adam variants`: the statistics' speeds apart (Adam: a step on raw_std moves std
#                              by std_speed x stats-lr-scale x lr, on mean by stats-lr-scale x lr): std at 0.01,
#                              the mean frozen (1e-3 x) with std at the default 0.1; the mean at 0.1 and 0.01 x
#                              with std at 0.1
#   mnist1d_fair.sh OPT default   the norms $NORMS (default none,bn,gn,ln; at BS=1, where BatchNorm does not
#                              apply: NORMS=none,gn,ln) and the library's default (std and mean 10x slower)
#   mnist1d_fair.sh OPT nobias    batchless without a bias in the layer before it (nobias.py), at the previous
#                              default's speeds (std 0.1, mean 1), the library default's and the paper's
#   mnist1d_fair.sh OPT ws        weight standardization of the layer feeding each norm (--weight-std: batchless.
#                              standardize_weights): batchless at the library default's speeds and the
#                              paper's, then the norms $NORMS
#   mnist1d_fair.sh OPT faststd   std at the optimizer's pace, the mean 10x slow (std_speed 1, mean_speed 0.1),
#                              with weight standardization (into OPT_ws) and without (into OPT_variants)
#   mnist1d_fair.sh OPT choose3   the norms $NORMS and the default, each learning rate chosen on the mean of 3
#                              seeds (sweep --choose-seeds 3), into OPT_mnist1d_c3 (seed_store.py); `OPT
#                              choose3 ws`: with weight standardization, into OPT_ws_c3; `OPT choose3 norms`: the
#                              norms alone (for AdamW, whose default is now `adamw exempt`'s)
#   mnist1d_fair.sh OPT seeds10   BatchNorm (or the norms $NORMS) and the default at BS (default here 64,256) with
#                              10 seeds: seeds 3-9 at the rate `OPT choose3` chose on seeds 0-2 (run that first);
#                              `OPT seeds10 ws`: with weight standardization, in OPT_ws_c3; `OPT seeds10 norms`:
#                              the norms alone
#   mnist1d_fair.sh adamw ...  AdamW, weight decay 0.05 on every parameter (grid around 3e-3)
#   mnist1d_fair.sh adamw exempt   the default with its layers' weight and bias exempt from the decay
#                              (--no-decay-affine: the library's default since decay.py), the rate chosen on
#                              3 seeds, into adamw_mnist1d_c3; `adamw exempt seeds10`: seeds 3-9 at BS (here
#                              default 64,256) at the rate chosen there; `adamw exempt ws [seeds10]`: the same
#                              with weight standardization, into adamw_ws_c3
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=docs/experiments/probes
B=.venv/bin/batchless
opt=${1:-sgd}
wd=()
case $opt in sgd) lr=0.1 ;; adam) lr=3e-3 ;; adamw) lr=3e-3; wd=(--weight-decay 0.05) ;;
  *) echo "usage: $0 sgd|adam|adamw [MODE]" >&2; exit 2 ;; esac
A=(--dataset mnist1d --optimizer $opt --lr $lr "${wd[@]}" --lr-grid 0.333,1,3 --extend-grid 2 --seeds 3 --jobs 1 --threads 1
   --epochs 20 --schedule cosine --batch-sizes "${BS:-64}")
if [ "${2:-}" = speeds ]; then
  for speed in 0.03 0.3; do
    $B sweep "${A[@]}" --norms batchless --std-speed $speed --results "results/${opt}_mnist1d.sqlite"
  done
  exit
fi
if [ "${2:-}" = default ]; then
  S=(--results "results/${opt}_mnist1d.sqlite")
  $B sweep "${A[@]}" "${S[@]}" --norms "${NORMS:-none,bn,gn,ln}"
  $B sweep "${A[@]}" "${S[@]}" --norms batchless --std-speed 0.1 --mean-speed 0.1
  exit
fi
if [ "${2:-}" = nobias ]; then
  for speeds in "--std-speed 0.1" "--std-speed 0.1 --mean-speed 0.1" "--std-speed 1"; do
    # shellcheck disable=SC2086  # (two options in one word)
    .venv/bin/python $P/nobias.py sweep "${A[@]}" --norms batchless $speeds --results "results/${opt}_nobias.sqlite"
  done
  exit
fi
if [ "${2:-}" = ws ]; then
  for speeds in "--std-speed 0.1 --mean-speed 0.1" "--std-speed 1"; do
    # shellcheck disable=SC2086  # (two options in one word)
    $B sweep "${A[@]}" --weight-std --norms batchless $speeds --results "results/${opt}_ws.sqlite"
  done
  $B sweep "${A[@]}" --weight-std --norms "${NORMS:-none,bn,gn,ln}" --results "results/${opt}_ws.sqlite"
  exit
fi
if [ "${2:-}" = faststd ]; then
  F=(--norms batchless --std-speed 1 --mean-speed 0.1)
  $B sweep "${A[@]}" "${F[@]}" --weight-std --results "results/${opt}_ws.sqlite"
  $B sweep "${A[@]}" "${F[@]}" --results "results/${opt}_variants.sqlite"
  exit
fi
if [ "${2:-}" = frozen ]; then
  $B sweep "${A[@]}" --norms batchless --std-speed 0.1 --stats-lr-scale 1e-4 --results "results/${opt}_frozen.sqlite"
  exit
fi
if [ "${2:-}" = variants ]; then
  V=(--norms batchless --results "results/${opt}_variants.sqlite")
  $B sweep "${A[@]}" "${V[@]}" --std-speed 0.01
  $B sweep "${A[@]}" "${V[@]}" --std-speed 100 --stats-lr-scale 1e-3
  $B sweep "${A[@]}" "${V[@]}" --std-speed 1 --stats-lr-scale 0.1
  $B sweep "${A[@]}" "${V[@]}" --std-speed 10 --stats-lr-scale 0.01
  exit
fi
if [ "${2:-}" = radial ]; then
  for speed in 0.1 1; do
    .venv/bin/python $P/radial.py sweep "${A[@]}" --norms batchless --std-speed $speed \
      --results "results/${opt}_radial.sqlite"
  done
  exit
fi
if [ "${2:-}" = fold ]; then
  speeds=$([ "$opt" = sgd ] && echo "0.1 1" || echo 0.1)
  for speed in $speeds; do
    .venv/bin/python $P/fold_init.py sweep "${A[@]}" --norms batchless --std-speed "$speed" \
      --results "results/${opt}_fold.sqlite"
  done
  exit
fi
if [ "${2:-}" = choose3 ]; then
  # The norms and the default with the learning rate chosen on the mean of 3 seeds at every grid rate
  # (--choose-seeds 3), into a store seeded with the single-seed study's runs at the grids' rates (reused, not
  # re-run; its extensions beyond a grid's end are left out, so that every rate of a cell has the 3 seeds)
  # (`OPT choose3 ws`: every norm with weight standardization, into OPT_ws_c3, seeded from OPT_ws)
  old="results/${opt}_mnist1d.sqlite" store="results/${opt}_mnist1d_c3.sqlite" ws=()
  [ "${3:-}" = ws ] && old="results/${opt}_ws.sqlite" store="results/${opt}_ws_c3.sqlite" ws=(--weight-std)
  [ -f "$store" ] || .venv/bin/python $P/seed_store.py "$old" "$store" "$opt" "$lr" "${NORMS:-none,bn,gn,ln},batchless" \
    "${BS:-64}" "${3:-}"
  C=("${A[@]}" "${ws[@]}" --choose-seeds 3 --results "$store")
  $B sweep "${C[@]}" --norms "${NORMS:-none,bn,gn,ln}"
  [ "${3:-}" = norms ] || $B sweep "${C[@]}" --norms batchless --std-speed 0.1 --mean-speed 0.1
  exit
fi
if [ "${2:-}" = exempt ]; then
  store="results/${opt}_mnist1d_c3.sqlite" ws=()
  if [ "${3:-}" = ws ]; then store="results/${opt}_ws_c3.sqlite" ws=(--weight-std); shift; fi
  E=("${A[@]}" "${ws[@]}" --choose-seeds 3 --results "$store" --norms batchless --std-speed 0.1 --mean-speed 0.1
     --no-decay-affine)
  if [ "${3:-}" = seeds10 ]; then E+=(--seeds 10 --batch-sizes "${BS:-64,256}"); fi
  $B sweep "${E[@]}"
  exit
fi
if [ "${2:-}" = seeds10 ]; then
  store="results/${opt}_mnist1d_c3.sqlite" ws=()
  [ "${3:-}" = ws ] && store="results/${opt}_ws_c3.sqlite" ws=(--weight-std)
  T=("${A[@]}" "${ws[@]}" --seeds 10 --choose-seeds 3 --batch-sizes "${BS:-64,256}" --results "$store")
  $B sweep "${T[@]}" --norms "${NORMS:-bn}"
  [ "${3:-}" = norms ] || $B sweep "${T[@]}" --norms batchless --std-speed 0.1 --mean-speed 0.1
  exit
fi
S=(--results "results/${opt}_mnist1d.sqlite")
$B sweep "${A[@]}" "${S[@]}" --norms none,bn,gn,ln,batchless
$B sweep "${A[@]}" "${S[@]}" --norms batchless --std-speed 0.1
$B sweep "${A[@]}" "${S[@]}" --norms batchless --std-speed 0.1 --mean-speed 0.1  # the library's default
if [ "$opt" = sgd ]; then
  $B sweep "${A[@]}" "${S[@]}" --norms batchless --std-speed 0.1 --stats-optimizer ema
  $B sweep "${A[@]}" "${S[@]}" --norms batchless --stats-optimizer ema
fi
