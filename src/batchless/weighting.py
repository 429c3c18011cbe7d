"""``nll_weight``: how strongly the implicit NLL gradient counts, for loops that scale their loss.

In ``nll="implicit"`` mode the NLL gradient reaches ``mean``/``std`` through the backward of the
task loss, with weight 1 per training forward, whatever the loop multiplies its loss by. Two common
loops scale the loss and should scale the NLL alike:

* gradient accumulation over ``k`` micro-batches with ``(loss / k).backward()``: use
  ``nll_weight(1 / k)`` (or let :func:`batchless.accumulate` do it) so that the k forwards add up to
  one full-batch NLL gradient;
* mixed precision with ``torch.amp.GradScaler``: use ``nll_weight(scaler)``. The scaler multiplies
  the loss by its scale before backward and divides every gradient by it in ``unscale_``/``step``;
  with this the NLL gradient is multiplied by the same scale (read at backward time, no host-device
  sync), so it comes out of ``unscale_`` unchanged and inf/NaN checks see it like every other
  gradient.
"""

from __future__ import annotations

import contextlib
import math
import numbers

from torch import Tensor

from . import _compat
from ._state import STATE
from .errors import BatchlessError


@contextlib.contextmanager
def nll_weight(weight):
    """Weight the implicit NLL gradient of the training forwards run inside the block.

    Args:
        weight: a number >= 0, a 0-dim tensor, or a ``torch.amp.GradScaler`` (its current scale).
            Weights of nested blocks multiply. The weight holds process-wide, in every thread (so
            that ``nn.DataParallel``'s replica threads see it): threads must not run blocks with
            different weights at the same time.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bl.BatchlessNorm1d(8))
        >>> for chunk in torch.randn(8, 4).chunk(4):
        ...     with bl.nll_weight(1 / 4):
        ...         (model(chunk).square().mean() / 4).backward()
    """
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        if not weight >= 0:
            raise BatchlessError(f"nll_weight must be >= 0, got {weight!r}")
    elif isinstance(weight, Tensor):
        if weight.numel() != 1:
            raise BatchlessError(f"nll_weight tensor must hold one value, got shape "
                                 f"{tuple(weight.shape)}")
    elif not _compat.is_grad_scaler(weight):
        raise BatchlessError(f"nll_weight expects a number, a 0-dim tensor or a "
                             f"torch.amp.GradScaler, got {type(weight).__name__}")
    entry = [weight]  # (its own identity: a block removes its own entry, even if threads mix)
    stack = STATE.nll_weights
    stack.append(entry)
    try:
        yield
    finally:
        del stack[max(i for i, e in enumerate(stack) if e is entry)]


def current_nll_weight():
    """The weight in force: 1.0 outside any block, else the enclosing blocks' weights (a tuple,
    resolved lazily)."""
    stack = STATE.nll_weights
    return tuple(e[0] for e in stack) if stack else 1.0


def as_number(weight) -> float | None:
    """A weight as a float where it is known now (numbers, tuples of them), else None (also for
    None; a tensor or a GradScaler is read at backward time by :func:`resolve_weight`)."""
    if type(weight) is float or isinstance(weight, numbers.Real):
        return float(weight)
    if isinstance(weight, tuple) and all(isinstance(w, numbers.Real) for w in weight):
        return float(math.prod(weight))
    return None


def resolve_weight(weight) -> float | Tensor:
    """A weight as a number or tensor, at backward time.

    Accepts a number, a 0-dim tensor, a ``GradScaler`` (its scale is created lazily and updated in
    place, so it is read here, not at forward time) or a tuple of these (nested blocks: their
    product).
    """
    if type(weight) is float:  # (the common case, first)
        return weight
    if isinstance(weight, tuple):
        return math.prod(resolve_weight(w) for w in weight)
    if isinstance(weight, (numbers.Real, Tensor)):
        return weight
    return _compat.grad_scaler_scale(weight)
