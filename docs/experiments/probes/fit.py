"""Probe: is BatchNorm's lead on MNIST-1D an optimization or a generalization lead? Trains one fair-protocol cell
(Adam, cosine, 20 epochs) and evaluates the final model (before the protocol restores its best epoch) in eval mode
on the training set as well as on the validation and test sets: a model that fits the training set better and
tests worse generalizes worse.

Usage: fit.py NORM BS LR SEED [ws]   (NORM: bn, none or default, the library's batchless layer). Prints one JSON
record."""
import json
import sys

import torch
from final_fit import measure_before_restore

from batchless_experiments import data
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, train_cell

torch.set_num_threads(1)
norm, bs, lr, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ws = "ws" in sys.argv[5:]
splits = data.load("mnist1d")
final = {}
orig = T.build_model


def build(*a, **k):
    model = orig(*a, **k)
    measure_before_restore(model, splits, final)
    return model


T.build_model = build
speeds = {"std_speed": 0.1, "mean_speed": 0.1} if norm == "default" else {}
cfg = TrainConfig(dataset="mnist1d", epochs=20, lr=lr, schedule="cosine", weight_std=ws, **speeds)
train_cell(Cell(cfg, "batchless" if norm == "default" else norm, bs, seed), splits, progress=False)
print(json.dumps({"probe": "fit", "norm": norm, "ws": ws, "bs": bs, "lr": lr, "seed": seed,
                  "final (loss, acc), eval mode": final}))
