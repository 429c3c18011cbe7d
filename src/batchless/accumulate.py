"""Training on a batch in micro-batches: ``accumulate``.

Batchless layers have no batch statistics, so a batch can be processed in micro-batches of any size
(1 included) whose gradients add up to the full batch's. Two weights make the sum exact: the
mean-reduced task loss of a micro-batch of ``m`` instances out of ``N`` counts ``m / N``, and so
does its NLL (each layer's NLL is a mean over the elements of that forward's input). ``accumulate``
applies both, in both ``nll`` modes, so that a training loop changes by two lines::

    optimizer.zero_grad()
    # was: forward + backward
    loss = batchless.accumulate(model, loss_fn, inputs, targets, micro_batch_size=8)
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import BatchlessError, check_module
from .loss import nll_loss
from .weighting import current_nll_weight, nll_weight, resolve_weight


def accumulate(model: nn.Module, loss_fn: Callable[[object, Tensor], Tensor], inputs: Tensor,
               targets: Tensor, *, micro_batch_size: int) -> Tensor:
    """Forward and backward ``inputs`` in micro-batches, accumulating the full batch's gradients.

    For each micro-batch of ``m`` instances out of ``N``: ``loss_fn(model(x), y) * m / N`` plus, for
    layers with ``nll="explicit"``, ``batchless.nll_loss(model) * m / N`` is back-propagated, and
    the implicit NLL is weighted ``m / N`` with :func:`batchless.nll_weight`. The gradients then
    equal those of one forward/backward of the whole batch (``loss_fn(model(inputs), targets)``,
    plus ``nll_loss(model)`` in explicit mode), up to float rounding; they are added to ``.grad``
    like ``backward()`` does, so call ``optimizer.zero_grad()`` before and ``optimizer.step()``
    after. An enclosing ``nll_weight(w)`` block scales the NLL of both modes by ``w``. A model with
    ``no_sync()`` (DDP, FSDP1) or ``set_requires_gradient_sync()`` (FSDP2 ``fully_shard``)
    synchronizes gradients only on the last micro-batch. Across ranks the result equals one process
    on the global batch when every rank gets the same number of instances (e.g.
    ``DistributedSampler(..., drop_last=True)``): DDP averages over ranks.

    Args:
        model: the model, called as ``model(x)`` on slices ``x`` of ``inputs`` along dim 0.
        loss_fn: ``loss_fn(output, target) -> scalar``, reduced as a *mean* over the micro-batch's
            instances (the default reduction of ``torch.nn`` losses).
        inputs, targets: the batch, ``N`` instances along dim 0.
        micro_batch_size: instances per forward (the last micro-batch may be smaller), 1 <= m.

    Returns:
        The batch's mean task loss (detached), as ``loss_fn(model(inputs), targets)`` would report
        it.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bl.BatchlessNorm1d(8),
        ...                             torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> opt.zero_grad()
        >>> loss = bl.accumulate(model, torch.nn.functional.cross_entropy, x, y, micro_batch_size=1)
        >>> opt.step()
    """
    check_module(model, "accumulate")
    if not callable(loss_fn):
        raise BatchlessError(f"accumulate expects a callable loss_fn(output, target), got "
                             f"{type(loss_fn).__name__}")
    m = micro_batch_size
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise BatchlessError(f"micro_batch_size must be a positive int, got {m!r}")
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise BatchlessError(f"accumulate expects inputs and targets as tensors (split along dim "
                             f"0); got {type(inputs).__name__} and {type(targets).__name__}")
    n = inputs.shape[0] if inputs.dim() > 0 else 0
    if n == 0 or targets.dim() == 0 or targets.shape[0] != n:
        raise BatchlessError(
            f"accumulate expects inputs and targets with the same number N >= 1 of instances in "
            f"dim 0; got inputs of shape {tuple(inputs.shape)} and targets of shape "
            f"{tuple(targets.shape)}")
    chunks = list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True))
    losses = []
    for i, (x, y) in enumerate(chunks):
        weight = x.shape[0] / n
        with _gradient_sync(model, i == len(chunks) - 1), nll_weight(weight):
            task = loss_fn(model(x), y)
            # explicit layers' NLL needs the weight here; implicit layers' values are detached
            # (their gradient comes through the task loss's backward), so adding them changes no
            # gradient
            (task * weight + nll_loss(model) * resolve_weight(current_nll_weight())).backward()
        losses.append(task.detach() * weight)
    return torch.stack(losses).sum()


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool):
    """Skip the data-parallel gradient reduction of all but the last micro-batch (DDP/FSDP1 and
    FSDP2)."""
    if enabled or not (hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")):
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
