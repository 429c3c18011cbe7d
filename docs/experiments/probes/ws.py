"""Probe: scaled weight standardization of the conv or linear layer right before each normalization layer.

Under Adam every weight moves about the learning rate a step, so a conv with fan-in 288 (init scale ~0.06)
can grow several-fold in its first epoch; its batchless layer, whose statistics learn slowly, then no
longer normalizes (the study's CNN at batch 64-256 ends with a gauged NLL of ~60, a normalized output of std
~4.6). Weight standardization makes the layer's output independent of its weights' scale: each output
unit's weights are used as (w - mean(w)) / (std(w) * sqrt(fan_in)) (Qiao et al. 2019; the sqrt(fan_in) of
NF-ResNets keeps the output at the input's scale), through torch.nn.utils.parametrize. It needs nothing
from other instances, so micro-batches stay exact. The same layers are standardized whatever the norm
(none: the nn.Identity in its place), so every norm can be compared with it. Runs `batchless sweep` in-process (use --jobs 1 and a
store of its own): `ws.py sweep ARGS...`."""
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

import batchless as bl
import batchless_experiments.train as train

_build_model = train.build_model
NORMS = (bl.BatchlessNorm1d, bl.BatchlessNorm2d, bl.BatchlessNorm3d, nn.BatchNorm1d, nn.BatchNorm2d,
         nn.GroupNorm, nn.Identity)


class Standardize(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.flatten(1)
        mean, std = flat.mean(1, keepdim=True), flat.std(1, unbiased=False, keepdim=True)
        return ((flat - mean) / (std.clamp_min(1e-6) * flat.shape[1] ** 0.5)).view_as(w)


def build_model(*args, **kwargs) -> nn.Module:
    model = _build_model(*args, **kwargs)
    for module in model.modules():
        children = list(module.children())
        for before, after in zip(children, children[1:]):
            if (isinstance(after, NORMS) and isinstance(before, (nn.Conv1d, nn.Conv2d, nn.Linear))):
                parametrize.register_parametrization(before, "weight", Standardize())
    return model


def check() -> None:
    for norm in ("none", "bn", "gn", "ln"):
        assert sum(parametrize.is_parametrized(m) for m in build_model("mnist1d", norm).modules()) == 5
    model = build_model("mnist1d", "batchless")
    ws = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert len(ws) == 5, len(ws)
    conv = ws[1]
    x = torch.randn(4, conv.in_channels, 20)
    y = conv(x)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0)
    assert torch.allclose(conv(x), y, atol=1e-5), "output depends on the weights' scale"
    model(torch.randn(2, 1, 40)).sum().backward()


if __name__ == "__main__":
    train.build_model = build_model
    check()
    from batchless_experiments.cli import main

    sys.exit(main(sys.argv[1:]))
