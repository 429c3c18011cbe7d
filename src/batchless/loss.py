"""Collecting the NLL and the statistics parameters of a model's batchless layers."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import check_module
from .modules import _BatchlessNorm


def batchless_layers(model: nn.Module,
                     where: str = "batchless_layers") -> Iterator[tuple[str, _BatchlessNorm]]:
    """``(dotted name, layer)`` for every batchless layer in ``model`` (the root included), each
    once."""
    check_module(model, where)
    for name, module in model.named_modules():
        if isinstance(module, _BatchlessNorm):
            yield name, module


def nll_loss(model: nn.Module) -> Tensor:
    """Sum over the model's batchless layers of the gauged NLL of their last training forward.

    In ``nll="explicit"`` mode the result is differentiable in the layers' ``mean``/``std``: add it
    to the task loss (weight 1 reproduces the paper). In ``nll="implicit"`` mode the values are
    detached (the gradient is already delivered by the task loss's backward), for monitoring.
    Layers that have not run a training forward contribute nothing; a model without any gives a
    zero tensor. A layer that a forward skips (a conditional branch) still reports its previous
    NLL: in explicit mode call ``nll_loss`` once per forward and backward it with that forward's
    loss.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3),
        ...                             bl.BatchlessNorm1d(3, nll="explicit"))
        >>> loss = model(torch.randn(8, 4)).square().mean() + bl.nll_loss(model)
        >>> loss.backward()
    """
    total = None
    for _, layer in batchless_layers(model, "nll_loss"):
        if layer._last_nll is not None:
            layer._last.used = True
            total = layer._last_nll if total is None else total + layer._last_nll
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def statistics_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every ``raw_mean`` and ``raw_std`` parameter of the model's batchless layers.

    For optimizer parameter groups, e.g. a learning rate of their own (for the groups without
    weight decay, which also hold the layers' ``weight`` and ``bias`` by default, see
    :func:`batchless.param_groups`)::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bl.BatchlessNorm1d(3))
        >>> stats = set(bl.statistics_parameters(model))
        >>> rest = [p for p in model.parameters() if p not in stats]
        >>> groups = [{"params": rest}, {"params": list(stats), "lr": 1e-4}]
        >>> opt = torch.optim.Adam(groups, lr=1e-3)
    """
    for _, layer in batchless_layers(model, "statistics_parameters"):
        yield layer.raw_mean
        yield layer.raw_std
