"""Probe: where does BatchNorm's lead on MNIST-1D at batch 64 come from, the conv layers or the dense ones? Trains the
library's default layer with some of its layers swapped for BatchNorm after the data init (same affine; BatchNorm in
training mode normalizes by the batch, so the swapped model starts from the same function up to the batch's
sampling error), the rest unchanged. The CNN's normalization layers, in order: the input's, three after the convs,
two after the dense layers.

Usage: swap.py BS LR SEED PARTS [ws]   (PARTS: a comma list of input, conv, dense: the layers made BatchNorm).
Prints one JSON record (test accuracy at 25/50/75/100 % of the run, the final model's eval-mode loss and accuracy
on the training, validation and test sets)."""
import json
import sys

import torch
from final_fit import measure_before_restore
from torch import nn

import batchless as bl
from batchless_experiments import data
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, train_cell

torch.set_num_threads(1)
bs, lr, seed, parts = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
ws = "ws" in sys.argv[5:]
if not set(parts) <= {"input", "conv", "dense"}:
    raise SystemExit(f"PARTS: a comma list of input, conv, dense; got {sys.argv[4]!r}")
splits = data.load("mnist1d")
final = {}
orig_build, orig_init = T.build_model, T._data_init


def build(*a, **k):
    model = orig_build(*a, **k)
    measure_before_restore(model, splits, final)
    return model


def init_then_swap(model, *a, **k):
    orig_init(model, *a, **k)
    kinds = ["input", "conv", "conv", "conv", "dense", "dense"]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bl.BatchlessNorm1d)]
    assert len(layers) == len(kinds), [name for name, _ in layers]
    for (name, layer), kind in zip(layers, kinds, strict=True):
        if kind in parts:
            bn = nn.BatchNorm1d(layer.num_features)
            with torch.no_grad():
                bn.weight.copy_(layer.weight)
                bn.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, bn)


T.build_model, T._data_init = build, init_then_swap
cfg = TrainConfig(dataset="mnist1d", epochs=20, lr=lr, schedule="cosine", weight_std=ws, std_speed=0.1, mean_speed=0.1)
r = train_cell(Cell(cfg, "batchless", bs, seed), splits, progress=False)
print(json.dumps({"probe": "swap", "bn": parts, "ws": ws, "bs": bs, "lr": lr, "seed": seed, "test": r.test_acc,
                  "curve": [h.test_acc for h in r.history if h.test_acc is not None],
                  "final (loss, acc), eval mode": final}))
