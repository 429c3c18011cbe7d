#!/usr/bin/env bash
# The probes of EXPERIMENTS.md ("Why batchless trailed, and what fixed it"), one at a time, each printing a
# JSON line (probe.py) or a text block (growth.py, lag.py); results.jsonl and results.txt hold what they printed here.
# probe.py runs its prototype layer with options '{"proj", "gain"}' and run settings '{"bs", "lr", "seed",
# "opt", "wd", "stats_scale", "slow", "stats_opt", "ws", "norm"}' (defaults: batch 64, lr 3e-3, 8 epochs).
# They patch batchless_experiments' model builder in-process: the layers are built with std_speed=1 there.
set -uo pipefail
cd "$(dirname "$0")/../../.."
P=".venv/bin/python docs/experiments/probes/probe.py"
G=".venv/bin/python docs/experiments/probes/growth.py"
# sigma's lag and the activations' growth (the library's layer; and BatchNorm)
.venv/bin/python docs/experiments/probes/lag.py 64 3e-3 8
$G batchless 64 '{}'; $G batchless 64 '{"stats_lr_scale": 10}'; $G bn 64 '{}'
# batch 64: the paper, backward projections, faster or slower statistics, weight standardization
$P '{"proj":"none"}' '{}'
$P '{"proj":"ema","rate":0.1}' '{}'
$P '{"proj":"ema","rate":0.1}' '{"stats_scale":10}'
$P '{"proj":"ema","rate":0.02}' '{}'
$P '{"proj":"ema","rate":0.1}' '{"stats_scale":20,"stats_opt":"ema"}'
$P '{"proj":"none"}' '{"stats_scale":20,"stats_opt":"ema"}'
$P '{"proj":"none"}' '{"norm":"none"}'
$P '{"proj":"none"}' '{"stats_scale":0.1}'
$P '{"proj":"none"}' '{"stats_scale":0.0001}'
$P '{"proj":"none"}' '{"ws":true}'
$P '{"proj":"none"}' '{"ws":true,"stats_scale":10}'
# seed 1 at batch 64; batches 256 and 4
for a in '{"stats_scale":1.0,"seed":1}' '{"stats_scale":0.1,"seed":1}' '{"stats_scale":0.0001,"seed":1}' \
         '{"stats_scale":1.0,"bs":256,"lr":0.006}' '{"stats_scale":0.1,"bs":256,"lr":0.006}' \
         '{"stats_scale":0.0001,"bs":256,"lr":0.006}' '{"stats_scale":1.0,"bs":4,"lr":0.00075}' \
         '{"stats_scale":0.1,"bs":4,"lr":0.00075}' '{"stats_scale":0.0001,"bs":4,"lr":0.00075}' \
         '{"stats_scale":0.1,"bs":4,"lr":0.00075,"slow":"std"}' '{"stats_scale":0.1,"bs":4,"lr":0.00075,"slow":"mean"}'; do
  $P '{"proj":"none"}' "$a"
done
# other optimizers (the library's layer for the growth.py lines)
$G batchless 64 '{"optimizer":"adamw","weight_decay":0.05}'; $G batchless 64 '{"optimizer":"adamw","weight_decay":0.5}'
$G bn 64 '{"optimizer":"adamw","weight_decay":0.05}'
for a in '{"opt":"sgd","lr":0.05,"norm":"bn"}' '{"opt":"sgd","lr":0.05}' '{"opt":"sgd","lr":0.05,"stats_scale":0.1}' \
         '{"opt":"sgd","lr":0.05,"stats_scale":0.01}' '{"opt":"sgd","lr":0.05,"norm":"none"}' \
         '{"opt":"adamw","wd":0.1}' '{"opt":"adamw","wd":0.1,"stats_scale":0.1}'; do
  $P '{"proj":"none"}' "$a"
done
# sigma slowed by its parametrization (the library's std_speed=0.1)
for a in '{}' '{"opt":"adamw","wd":0.1}' '{"opt":"adamw","wd":0.05}' '{"opt":"sgd","lr":0.01}'; do
  $P '{"proj":"none","gain":0.1}' "$a"
done
$P '{"proj":"none"}' '{"opt":"sgd","lr":0.01}'; $P '{"proj":"none"}' '{"opt":"sgd","lr":0.01,"norm":"bn"}'
for a in '{"opt":"sgd","lr":0.003}' '{"opt":"sgd","lr":0.03}' '{"seed":1}' '{"bs":4,"lr":0.00075}' \
         '{"bs":256,"lr":0.006}'; do
  $P '{"proj":"none","gain":0.1}' "$a"
done
$P '{"proj":"none"}' '{"opt":"sgd","lr":0.003}'; $P '{"proj":"none"}' '{"opt":"sgd","lr":0.003,"norm":"bn"}'
# MNIST-1D (the fair protocol's Adam cells): what WS leaves (drift.py), fit against generalization (fit.py), and
# BatchNorm-sized noise in the default's normalization (noise.py); each appends one JSON line
R=docs/experiments/probes/results.jsonl
for f in "" ws norm=bn; do .venv/bin/python docs/experiments/probes/drift.py 64 0.009 20 $f >> $R; done
for seed in 0 1 2; do
  for a in "bn 64 0.009" "default 64 0.009" "none 64 0.027" "bn 256 0.018" "default 256 0.018" "default 256 0.018 ws"; do
    set -- $a; .venv/bin/python docs/experiments/probes/fit.py $1 $2 $3 $seed ${4:-} >> $R
  done
  for a in "64" "16" "64 shared"; do
    set -- $a; .venv/bin/python docs/experiments/probes/noise.py 64 0.009 $seed $1 ${2:-} >> $R
  done
done
# where BatchNorm's lead lives: some of the default's layers swapped for BatchNorm (swap.py), seeds 0-4, and the
# two ends (fit.py) at seeds 3 and 4
for seed in 0 1 2 3 4; do
  for parts in dense conv input input,conv,dense conv,dense; do
    .venv/bin/python docs/experiments/probes/swap.py 64 0.009 $seed $parts >> $R
  done
done
for seed in 3 4; do for n in bn default; do .venv/bin/python docs/experiments/probes/fit.py $n 64 0.009 $seed >> $R; done; done
# BatchNorm's backward on the default's forward (bnback.py), with WS (and without, seeds 0-2), beside the default
# with WS (fit.py ... ws); its parts and batch-free versions
for seed in 0 1 2 3 4; do
  .venv/bin/python docs/experiments/probes/fit.py default 64 0.009 $seed ws >> $R
  for part in "" center project instance; do .venv/bin/python docs/experiments/probes/bnback.py 64 0.009 $seed ws $part >> $R; done
done
for seed in 0 1 2; do
  .venv/bin/python docs/experiments/probes/bnback.py 64 0.009 $seed >> $R
  .venv/bin/python docs/experiments/probes/bnback.py 64 0.009 $seed ws online >> $R
done
for a in 0.999 0.9999; do .venv/bin/python docs/experiments/probes/bnback.py 64 0.009 0 ws online=$a >> $R; done
# BatchNorm by population statistics with the gradient through them (popnorm.py), seed 0
for a in "0.009 decay=0.9" "0.009 decay=0.99" "0.003 decay=0.9" "0.027 decay=0.9"; do
  set -- $a; .venv/bin/python docs/experiments/probes/popnorm.py 64 $1 0 $2 >> $R
done
# AdamW at batch 2 (decay.py): which parameters' weight decay costs the default its accuracy (plain reproduces the
# store's record; the default's rates 4.8e-3 and 1.6e-3; GroupNorm's noaffine as the control)
for seed in 0 1 2; do
  for v in comove nofeed noaffine; do .venv/bin/python docs/experiments/probes/decay.py 2 0.00476 $seed $v >> $R; done
  .venv/bin/python docs/experiments/probes/decay.py 2 0.00159 $seed noaffine >> $R
  .venv/bin/python docs/experiments/probes/decay.py 2 0.00159 $seed noaffine gn >> $R
done
.venv/bin/python docs/experiments/probes/decay.py 2 0.00476 0 plain >> $R
for seed in 0 1 2; do .venv/bin/python docs/experiments/probes/decay.py 2 0.00476 $seed both >> $R; done
# AdamW at batch 2: the layers' gamma and output scale with weight and bias decayed (as before) and exempt (now)
for f in adamw "adamw exempt"; do .venv/bin/python docs/experiments/probes/drift.py 2 0.00476 20 $f >> $R; done
# BatchNorm's real batch noise on MNIST-1D at 64 (bnnoise_size.py), then a noise of that size, shared by the batch,
# in the default (noise.py, N0 = 12: the std's noise of BatchNorm's conv layers)
for seed in 0 1 2; do .venv/bin/python docs/experiments/probes/bnnoise_size.py 64 0.009 $seed >> $R; done
for seed in 0 1 2 3 4; do .venv/bin/python docs/experiments/probes/noise.py 64 0.009 $seed 12 shared >> $R; done
# BatchNorm's forward without its backward (bnfwd.py: batch statistics detached), with and without WS
for seed in 0 1 2; do for f in "" ws; do .venv/bin/python docs/experiments/probes/bnfwd.py 64 0.009 $seed $f >> $R; done; done
# The ResNet-8 at batch 256 (Fashion-MNIST, 10 epochs, seed 0): the default with WS, and BatchNorm (drift.py resnet)
.venv/bin/python docs/experiments/probes/drift.py 256 0.006 10 ws resnet >> $R
.venv/bin/python docs/experiments/probes/drift.py 256 0.006 10 norm=bn resnet >> $R
# The statistics fast early, slow after (statswarm.py: their rate K-fold at the start, back to 1x by step N):
# MNIST-1D at batch 256 (the default's rate, 0.018; with WS too), then the ResNet-8 at 256 with WS (seed 0)
for k in 1 10 100; do for seed in 0 1 2; do .venv/bin/python docs/experiments/probes/statswarm.py 256 0.018 $seed $k 50 >> $R; done; done
for k in 1 30 100; do for seed in 0 1 2; do .venv/bin/python docs/experiments/probes/statswarm.py 256 0.018 $seed $k 50 ws >> $R; done; done
.venv/bin/python docs/experiments/probes/statswarm.py 256 0.006 0 30 100 ws resnet >> $R
