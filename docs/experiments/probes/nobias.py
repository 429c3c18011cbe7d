"""Probe: no bias in the conv or linear layer right before each batchless layer (as before BatchNorm).

In the study's CNNs every conv and hidden linear layer has a bias, and a batchless layer after it has its
own mean and bias: under BatchNorm the bias before gets no gradient (the batch mean removes it), under
batchless it gets the same gradient as the shift after, and the learned mean follows it (EXPERIMENTS.md,
"The statistics' speeds": a likely mechanism of the mean's cost). This removes that bias; every other
layer is unchanged. Runs `batchless sweep` in-process (use --jobs 1 and a store of its own):
`nobias.py sweep ARGS...`."""
import sys

import torch
from torch import nn

import batchless as bl
import batchless_experiments.train as train

_build_model = train.build_model


def build_model(*args, **kwargs) -> nn.Module:
    model = _build_model(*args, **kwargs)
    for module in model.modules():
        children = list(module.children())
        for before, after in zip(children, children[1:], strict=False):
            if (isinstance(after, (bl.BatchlessNorm1d, bl.BatchlessNorm2d, bl.BatchlessNorm3d))
                    and isinstance(before, (nn.Conv1d, nn.Conv2d, nn.Linear)) and before.bias is not None):
                before.bias = None
    return model


def check() -> None:
    model = build_model("mnist1d", "batchless")
    biased = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear)) and m.bias is not None]
    assert len(biased) == 1 and biased[0].out_features == 10, "only the output layer keeps its bias"
    model(torch.randn(2, 1, 40)).sum().backward()


if __name__ == "__main__":
    train.build_model = build_model
    check()
    from batchless_experiments.cli import main

    sys.exit(main(sys.argv[1:]))
