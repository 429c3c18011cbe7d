"""Probe: after init_from_data, fold each batchless layer's data mean/std into the conv/linear right
before it (W/std, (b-mean)/std) and reset the layer to mean 0, std 1: the same function at init,
but SGD no longer sees the 1/std^2 amplification. Runs `batchless sweep` in-process (jobs 1)."""
import sys

import torch
from torch import nn

import batchless as bl
from batchless.modules import _BatchlessNorm

_orig = bl.init_from_data
FOLD = (nn.Conv1d, nn.Conv2d, nn.Linear)


@torch.no_grad()
def init_and_fold(model, batches, **kw):
    out = _orig(model, batches, **kw)
    n = 0
    for seq in model.modules():
        kids = list(seq.children())
        for prev, layer in zip(kids, kids[1:], strict=False):
            if isinstance(prev, FOLD) and isinstance(layer, _BatchlessNorm) and not layer.shared:
                std, mean = layer.std.detach(), layer.mean.detach()
                view = (-1,) + (1,) * (prev.weight.dim() - 1)
                prev.weight.div_(std.view(view))
                if prev.bias is not None:
                    prev.bias.sub_(mean).div_(std)
                    layer.mean.zero_()
                else:
                    layer.mean.div_(std)
                layer.set_std(torch.ones_like(std))
                n += 1
    print(f"fold_init: folded {n} layers", file=sys.stderr)
    return out


bl.init_from_data = init_and_fold
from batchless_experiments.cli import main  # noqa: E402 (after the patch)

sys.exit(main(sys.argv[1:]))
