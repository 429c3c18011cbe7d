"""Probe: is BatchNorm's generalization lead on MNIST-1D at batch 64 (`swap.py`: it needs BatchNorm in the whole
stack) its backward? Keeps the library's default forward (the learned statistics) and replaces each layer's input
gradient by BatchNorm's backward computed on the current batch: g = the gradient at x_hat (the output's gradient
times weight), then (g - mean(g) - z mean(g z)) / std, with z the input standardized by the batch's own mean and
std and the means over the batch and positions per channel, std the learned one. Batch-dependent, so not a
candidate for the library (it breaks the per-instance forward's micro-batch equivalence); it tells which half of
BatchNorm to look for.

With ``center``, only the mean is removed (g - mean(g)); with ``project``, only the component along z
(g - z mean(g z)). With ``online``, batch-free: Online Normalization's control process (Chiley et al. 2019, as
shared/METHOD.md states it, batched: its accumulators updated once per backward with the batch's means, decay
``A``, default 0.99): g'' = g - (1 - A) e_y x_hat, e_y += mean(g'' x_hat); g' = g'' / std - (1 - A) e_1,
e_1 += mean(g'); x_hat the layer's own (learned statistics), nothing from the batch in the correction. With
``instance``, BatchNorm's backward per instance (means over each instance's positions, z standardized by them
too; batch-free), in the conv layers only (a dense layer's input has one position: left unchanged).

Usage: bnback.py BS LR SEED [ws] [center|project|online[=A]|instance]. Prints one JSON record (test accuracy at
25/50/75/100 % of the run, the final model's eval-mode loss and accuracy on the training, validation and test
sets)."""
import json
import sys

import torch
from final_fit import run

import batchless as bl
from batchless_experiments import data

torch.set_num_threads(1)
bs, lr, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ws = "ws" in sys.argv[4:]
part = next((a for a in sys.argv[4:] if a.split("=")[0] in ("center", "project", "online", "instance")), "both")
decay = float(part.split("=")[1]) if "=" in part else 0.99


def keep_input(layer, inp):
    layer._probe_x = inp[0].detach() if layer.training else None


def bn_backward(layer, grad_input, grad_output):
    x = layer._probe_x
    if x is None or grad_input[0] is None:
        return None
    dims = [0] + list(range(2, x.dim()))
    if part == "instance":
        if x.dim() < 3:
            return None
        dims = dims[1:]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    std = layer.std.detach().reshape(shape)
    g = grad_input[0] * std  # the gradient at x_hat: grad_output * weight
    if part.startswith("online"):
        x_hat = (x - layer.mean.detach().reshape(shape)) / std
        e_y, e_1 = getattr(layer, "_probe_e", (0.0, 0.0))
        g = g - (1 - decay) * e_y * x_hat
        e_y = e_y + (g * x_hat).mean(dims, keepdim=True)
        g = g / std - (1 - decay) * e_1
        layer._probe_e = (e_y, e_1 + g.mean(dims, keepdim=True))
        return (g,)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    z = (x - mean) * torch.rsqrt(var + 1e-5)
    if part != "project":
        g = g - g.mean(dims, keepdim=True)
    if part != "center":
        g = g - z * (g * z).mean(dims, keepdim=True)
    return (g / std,)


def hook(model):
    for m in model.modules():
        if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d)):
            m.register_forward_pre_hook(keep_input)
            m.register_full_backward_hook(bn_backward)


result = run(data.load("mnist1d"), "default", bs, lr, seed, ws, hook)
print(json.dumps({"probe": "bnback", "part": part, "ws": ws, "bs": bs, "lr": lr, "seed": seed, **result}))
