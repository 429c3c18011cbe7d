"""Probe: does BatchNorm's batch noise explain its generalization lead on MNIST-1D at batch 64 (`fit.py`: the
default fits the training set as well as BatchNorm and tests worse)? Gives the library's default layer a noise of
BatchNorm's size without a batch: in training, each instance's normalization uses mean + std * a and std * b, with
a ~ N(0, 1/n) and log b ~ N(0, 1/(2n)) drawn per instance and channel, n = N0 x the positions per channel (the
sampling error of the batch statistics of a batch of N0 instances). The statistics' gradients (the NLL) are
unchanged; the task gradient sees the noisy map. Per instance, so the forward stays batch-independent (as dropout's).

With ``shared``, one draw per step and channel for the whole batch (as BatchNorm's noise is shared by a batch's
instances; still batch-independent given the step: its instances' outputs do not depend on each other).

Usage: noise.py BS LR SEED N0 [ws] [shared]. Prints one JSON record (test accuracy at 25/50/75/100 % of the run, and the
final model's eval-mode loss and accuracy on the training, validation and test sets)."""
import json
import math
import sys

import torch
from final_fit import run

import batchless as bl
from batchless_experiments import data

torch.set_num_threads(1)
bs, lr, seed, n0 = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ws = "ws" in sys.argv[5:]
shared = "shared" in sys.argv[5:]


def noisy(layer, inp, out):
    if not layer.training:
        return out
    x = inp[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, std = layer.mean.detach().reshape(shape), layer.std.detach().reshape(shape)
    n = n0 * math.prod(x.shape[2:])
    a = torch.randn((1 if shared else x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)) / math.sqrt(n)
    inv_b = torch.exp(-torch.randn_like(a) / math.sqrt(2 * n))
    x_hat = (x - mean) / std
    # out + extra = weight * (x_hat - a) / b + bias, with out's own graph (and so the NLL's gradients) kept
    return out + layer.weight.reshape(shape) * (x_hat * (inv_b - 1) - a * inv_b)


def add_noise(model):
    for m in model.modules():
        if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d)):
            m.register_forward_hook(noisy)


result = run(data.load("mnist1d"), "default", bs, lr, seed, ws, add_noise)
print(json.dumps({"probe": "noise", "n0": n0, "shared": shared, "ws": ws, "bs": bs, "lr": lr, "seed": seed,
                  **result}))
