"""Weight standardization of the layers that feed batchless layers: ``standardize_weights``.

Under Adam every weight moves about the learning rate a step, whatever its scale, so the weights
and the outputs of the layers they belong to grow faster than a batchless layer's slowly learned
statistics follow; at large batches the layer then stops normalizing (EXPERIMENTS.md, "Weight
standardization"). A standardized weight is used as ``(w - mean(w)) /
(std(w) * sqrt(fan_in))`` per output channel (Qiao et al., arXiv:1903.10520; the ``sqrt(fan_in)``
of Brock et al., arXiv:2101.08692, keeps the output at its input's scale), so the producer's output
no longer depends on its weights' scale. It uses nothing but the weights: batch size 1,
micro-batch accumulation and DDP work as before.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._graph import producer_pairs
from .errors import BatchlessError, check_module, warn
from .functional import compute_dtype
from .modules import _BatchlessNorm


class WeightStandardization(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``) that uses a weight, per output channel
    (dim 0), as ``(w - mean(w)) / (std(w) * sqrt(fan_in))``, ``fan_in`` its elements per channel
    (``std`` biased, at least ``eps``); computed in float32 (float64 for float64 weights)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.flatten(1).to(compute_dtype(weight))
        var, mean = torch.var_mean(flat, 1, correction=0, keepdim=True)
        scale = torch.rsqrt(var.clamp_min(self.eps ** 2) * flat.shape[1])
        return ((flat - mean) * scale).to(weight.dtype).view_as(weight)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def is_standardized(module: nn.Module) -> bool:
    """Whether ``module``'s weight has a :class:`WeightStandardization`."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, WeightStandardization) for p in module.parametrizations.weight)


def standardize_weights(model: nn.Module, *, eps: float = 1e-6,
                        before: tuple[type, ...] = (_BatchlessNorm,)) -> nn.Module:
    """Standardize the weight of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` that feeds a batchless
    layer directly (:class:`WeightStandardization`); returns ``model``, changed in place.

    A producer is found as :func:`batchless.fold` finds it, in the model's ``torch.fx`` graph: its
    output goes to the layer and nowhere else. Others are left as they are (a layer after a
    pooling or at the model's input). Call it when building the model, before
    :func:`batchless.init_from_data` (whose statistics it would invalidate: a warning says so); a
    second call changes nothing. The raw weight, the same parameter as before (an optimizer holding
    it keeps working), is then ``module.parametrizations.weight.original`` (also in the state dict).
    :func:`batchless.fold` folds a batchless layer into its standardized producer.

    Args:
        model: the model.
        eps: the smallest ``std`` of a channel's weights. Default: 1e-6.
        before: the layer types whose producers to standardize. Default: the batchless layers;
            e.g. ``(nn.GroupNorm,)`` for the same treatment of other normalization layers.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bl.BatchlessNorm2d(8))
        >>> model = bl.standardize_weights(model)
        >>> bool(model[0].weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6)
        True
    """
    check_module(model, "standardize_weights")
    if not (isinstance(before, tuple) and before
            and all(isinstance(t, type) and issubclass(t, nn.Module) for t in before)):
        raise BatchlessError(f"standardize_weights expects `before` to be a non-empty tuple of "
                             f"nn.Module subclasses, got {before!r}")
    untraceable: list[str] = []
    pairs = producer_pairs(model, before, lambda *_: True, untraceable)
    if untraceable:
        warnings.warn("standardize_weights: torch.fx cannot trace " + "; ".join(untraceable)
                      + ". Their children were traced on their own", stacklevel=2)
    names = ", ".join(t.__name__ for t in before)
    if not pairs:
        raise BatchlessError(f"standardize_weights found no nn.Conv1d/2d/3d or nn.Linear whose "
                             f"output goes directly (and only) to a {names} in "
                             f"{type(model).__name__}")
    producers = list({id(p): p for p, _ in pairs}.values())
    for producer in producers:
        if producer.weight[0].numel() < 2:
            raise BatchlessError(f"standardize_weights cannot standardize {producer}: each of its "
                                 "output channels has a single weight (its std is 0)")
    fresh = {id(p): p for p in producers if not is_standardized(p)}
    for producer in fresh.values():
        parametrize.register_parametrization(producer, "weight", WeightStandardization(eps))
    stale = sorted({type(layer).__name__ for p, layer in pairs if id(p) in fresh
                    and isinstance(layer, _BatchlessNorm) and not layer._check_statistics})
    if stale:
        warn(f"standardize_weights changed the layers that feed {', '.join(stale)} layers whose "
             "statistics were already set (init_from_data, convert_batchnorm, set_mean/set_std, "
             "a state dict or training): their inputs are no longer what the statistics describe. "
             "Call batchless.init_from_data(model, batches) again")
    return model

