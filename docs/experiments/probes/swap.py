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
from final_fit import run
from torch import nn

import batchless as bl
from batchless_experiments import data
from batchless_experiments import train as T

torch.set_num_threads(1)
bs, lr, seed, parts = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
ws = "ws" in sys.argv[5:]
if not set(parts) <= {"input", "conv", "dense"}:
    raise SystemExit(f"PARTS: a comma list of input, conv, dense; got {sys.argv[4]!r}")
orig_init = T._data_init


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


T._data_init = init_then_swap
result = run(data.load("mnist1d"), "default", bs, lr, seed, ws)
print(json.dumps({"probe": "swap", "bn": parts, "ws": ws, "bs": bs, "lr": lr, "seed": seed, **result}))
