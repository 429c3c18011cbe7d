"""Probe: is BatchNorm's lead on MNIST-1D an optimization or a generalization lead? Trains one fair-protocol cell
(Adam, cosine, 20 epochs) and evaluates the final model (before the protocol restores its best epoch) in eval mode
on the training set as well as on the validation and test sets: a model that fits the training set better and
tests worse generalizes worse.

Usage: fit.py NORM BS LR SEED [ws]   (NORM: bn, none or default, the library's batchless layer). Prints one JSON
record."""
import json
import sys

import torch
from final_fit import run

from batchless_experiments import data

torch.set_num_threads(1)
norm, bs, lr, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ws = "ws" in sys.argv[5:]
final = run(data.load("mnist1d"), norm, bs, lr, seed, ws)["final (loss, acc), eval mode"]
print(json.dumps({"probe": "fit", "norm": norm, "ws": ws, "bs": bs, "lr": lr, "seed": seed,
                  "final (loss, acc), eval mode": final}))
