"""Probe: how large is BatchNorm's batch noise really, on MNIST-1D at batch 64? `noise.py` gave the default a noise
of the size the batch statistics would have if the positions of an instance were independent samples (n = N0 x the
positions per channel); they are not, so BatchNorm's real noise may be larger. This trains BatchNorm (the cell's
protocol, `final_fit.run`) and measures, per layer, over the training steps after the first epoch, the batch's
deviation from the running statistics in units of the running std: a = (batch mean - running mean) / running std,
log b = log(batch std / running std), per channel; then the n with var(a) = 1/n, var(log b) = 1/(2n) (the
effective number of independent samples per channel and batch) and N0 = n / positions, the `noise.py` argument
that gives a noise of that size.

Usage: bnnoise_size.py BS LR SEED. Prints one JSON record."""
import json
import math
import sys

import torch
from final_fit import run
from torch import nn

from batchless_experiments import data

torch.set_num_threads(1)
bs, lr, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
seen: dict[str, list] = {}


def watch(name):
    def hook(layer, inp):
        if not layer.training:
            return
        x = inp[0].detach()
        dims = [0] + list(range(2, x.dim()))
        std = layer.running_var.sqrt()
        a = (x.mean(dims) - layer.running_mean) / std
        log_b = (x.var(dims, unbiased=False).sqrt() / std).log()
        seen.setdefault(name, []).append((a, log_b, math.prod(x.shape[2:])))
    return hook


def prepare(model):
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.register_forward_pre_hook(watch(name))


splits = data.load("mnist1d")
result = run(splits, "bn", bs, lr, seed, prepare=prepare)
skip = math.ceil(len(splits.x_train) / bs)  # the first epoch: the running statistics still settle
layers = {}
for name, rows in seen.items():
    rows = rows[skip:]
    a = torch.stack([r[0] for r in rows])
    log_b = torch.stack([r[1] for r in rows])
    var_a, var_b = a.var(0).median().item(), log_b.var(0).median().item()
    positions = rows[0][2]
    layers[name] = {"positions": positions, "n_a": round(1 / var_a, 1), "n_b": round(1 / (2 * var_b), 1),
                    "N0_a": round(1 / var_a / positions, 2), "N0_b": round(1 / (2 * var_b) / positions, 2)}
print(json.dumps({"probe": "bnnoise_size", "bs": bs, "lr": lr, "seed": seed, "layers": layers, "test": result["test"]}))
