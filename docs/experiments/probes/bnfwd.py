"""Probe: is BatchNorm's generalization lead on MNIST-1D at batch 64 its forward? The converse of `bnback.py`:
BatchNorm's forward (each batch normalized by its own mean and std, the running statistics kept for evaluation)
with the batch statistics treated as constants in the backward (detached), so the input gradient is a batch-free
layer's, g / std, and not BatchNorm's projection. If this keeps BatchNorm's test loss, the lead lives in the
batch-dependent forward, which a batch-independent layer cannot have; if it loses it, in the backward.

Usage: bnfwd.py BS LR SEED [ws]. Prints one JSON record (test accuracy at 25/50/75/100 % of the run, the final
model's eval-mode loss and accuracy on the training, validation and test sets)."""
import json
import sys

import torch
import torch.nn.functional as F
from final_fit import run
from torch import nn

from batchless_experiments import data

torch.set_num_threads(1)
bs, lr, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ws = "ws" in sys.argv[4:]


def detached_batch_norm(layer):
    def forward(x):
        if not layer.training:
            return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0,
                                layer.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        with torch.no_grad():
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            n = x.numel() // x.shape[1]
            m = layer.momentum
            layer.running_mean.mul_(1 - m).add_(m * mean)
            layer.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
        x_hat = (x - mean.view(shape)) / (var.view(shape) + layer.eps).sqrt()
        return x_hat * layer.weight.view(shape) + layer.bias.view(shape)
    return forward


def prepare(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.forward = detached_batch_norm(m)


result = run(data.load("mnist1d"), "bn", bs, lr, seed, ws, prepare)
print(json.dumps({"probe": "bnfwd", "ws": ws, "bs": bs, "lr": lr, "seed": seed, **result}))
