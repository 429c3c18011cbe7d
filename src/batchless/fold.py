"""Folding batchless layers away for inference: ``fold``.

At inference a batchless layer is a fixed per-channel affine map, ``y = x * scale + shift`` with
``scale = weight / std`` and ``shift = bias - mean * scale``. Directly after a convolution or linear
layer whose output goes nowhere else, it folds into that layer's weight and bias, exactly as an
eval-mode BatchNorm does (``torch.nn.utils.fusion``), and costs nothing; anywhere else it becomes a
:class:`ChannelAffine` module (one fused multiply-add). :func:`affine_of` and :func:`fold_into` are
the tensor-level functions; :func:`fold` is the module-level wrapper.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._compat import HOOK_DICTS
from ._graph import producer_pairs
from .convert import replace_modules
from .errors import BatchlessError, check_module
from .functional import channel_view
from .loss import batchless_layers
from .modules import BatchlessNorm1d, _BatchlessNorm
from .standardize import is_standardized


class ChannelAffine(nn.Module):
    """A fixed per-channel affine map on dim 1, ``y = x * scale + shift``: a batchless layer at
    inference.

    Args:
        scale, shift: tensors of shape ``(C,)``, stored as buffers.

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        view = channel_view(x)
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}"


@torch.no_grad()
def affine_of(layer: _BatchlessNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each ``(C,)`` in the layer's dtype, such that the layer's output is ``x *
    scale + shift``.

    Computed in float64, so that folding adds no error beyond the final rounding.
    """
    c = layer.num_features
    std = layer.std.double().expand(c)
    weight = torch.ones_like(std) if layer.weight is None else layer.weight.double()
    bias = torch.zeros_like(std) if layer.bias is None else layer.bias.double()
    scale = weight / std
    shift = bias - layer.mean.double().expand(c) * scale
    return scale.to(layer.mean.dtype), shift.to(layer.mean.dtype)


@torch.no_grad()
def fold_into(weight: Tensor, bias: Tensor | None, scale: Tensor,
              shift: Tensor) -> tuple[Tensor, Tensor]:
    """Weight and bias of a conv/linear layer followed by ``x * scale + shift`` on its output
    channels (dim 0 of ``weight``): ``(weight * scale, bias * scale + shift)``, computed in float64,
    returned in ``weight``'s dtype.
    """
    s = scale.double().reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift.double() if bias is None else bias.double() * scale.double() + shift.double()
    return (weight.double() * s).to(weight.dtype), b.to(weight.dtype)


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove every batchless layer from an eval-mode model without changing its function.

    A batchless layer is folded into the ``nn.Conv1d/2d/3d`` or ``nn.Linear`` feeding it when, in
    the ``torch.fx`` graph of the model: every call of the layer takes the direct output of such a
    producer, that output is used nowhere else, the producer is called once, the producer and the
    layer are each registered under one name only, the producer's parameters belong to it alone (no
    tied weights), neither has forward hooks, the producer has no parametrizations (but
    :func:`~batchless.standardize_weights`', whose weight it keeps) and as many
    output channels as the layer (for ``nn.Linear``: the layer normalizes its ``(N, C)`` output; a
    Linear applied to ``(N, L, features)`` followed by a layer over ``L`` with ``L == out_features``
    is the one case this cannot tell apart). The layer becomes ``nn.Identity``. Every other
    batchless layer becomes a :class:`ChannelAffine`, which keeps the layer's forward hooks. Where
    the whole model cannot be traced (data-dependent control flow), each child module is traced on
    its own, recursively, with a warning (folding a child assumes the untraceable forward reaches
    into it only by calling it); what cannot be traced at all is not folded, only replaced by
    :class:`ChannelAffine`.

    The result keeps the model's class and methods; its eval output equals the original's up to
    float rounding, and its inference cost equals the same model without normalization layers (up to
    the ``Identity`` calls and the unfoldable layers' affine maps).

    Args:
        model: an eval-mode model (training-mode batchless layers are refused: call
            ``model.eval()``).
        inplace: fold ``model`` itself instead of a deep copy. Default: False. Use the returned
            module.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bl.BatchlessNorm2d(8),
        ...                             torch.nn.ReLU()).eval()
        >>> folded = bl.fold(model)
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
    """
    check_module(model, "fold")
    training = [name or "<root>" for name, layer in batchless_layers(model) if layer.training]
    if training:
        raise BatchlessError(
            f"fold is for inference and expects eval-mode layers; these batchless layers are in "
            f"training mode: {', '.join(training)}. Call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untraceable: list[str] = []
    pairs = producer_pairs(model, (_BatchlessNorm,), _foldable, untraceable)
    if untraceable:
        warnings.warn("fold: torch.fx cannot trace " + "; ".join(untraceable) + ". Their children "
                      "were traced (and folded where possible) on their own, which assumes such a "
                      "forward reaches into a child only by calling it (not into a grandchild or a "
                      "child's parameters): compare the folded model's output with the original's",
                      stacklevel=2)
    # a layer or producer under two names, a producer's parameter used elsewhere (tied weights:
    # folding would change the others), a layer's hooks: that layer stays
    unfoldable = {id(layer) for producer, layer in pairs
                  if _hooks(layer) or names[id(layer)] != 1 or names[id(producer)] != 1
                  or any(uses[id(p)] != 1 for p in producer.parameters())}
    pairs = [(producer, layer) for producer, layer in pairs if id(layer) not in unfoldable]
    for producer, layer in pairs:
        if is_standardized(producer):  # its standardized weight becomes a plain one, in a class
            # of its own: a deep copy shares the parametrized class, whose property removal deletes
            cls = type(producer)
            producer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(producer, "weight", leave_parametrized=True)
        weight, bias = fold_into(producer.weight, producer.bias, *affine_of(layer))
        with torch.no_grad():
            producer.weight.copy_(weight)
            if producer.bias is None:
                producer.bias = nn.Parameter(bias, requires_grad=producer.weight.requires_grad)
            else:
                producer.bias.copy_(bias)
    folded_layers = {id(layer) for _, layer in pairs}

    def replace(_name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, _BatchlessNorm):
            return None
        if id(module) in folded_layers:
            return nn.Identity()
        new = ChannelAffine(*affine_of(module))
        for hooks in HOOK_DICTS:  # the same dicts: the users' hook handles still remove them
            setattr(new, hooks, getattr(module, hooks))
        return new

    return replace_modules(model, replace, inplace=True)


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _foldable(module: nn.Module, layer: _BatchlessNorm, attrs: list[str]) -> bool:
    """Whether ``layer`` can fold into its producer ``module`` (see :func:`fold`)."""
    parametrized = getattr(module, "parametrizations", {})
    return (
        layer.num_features == (module.out_features if isinstance(module, nn.Linear)
                               else module.out_channels)
        and (isinstance(layer, BatchlessNorm1d) or not isinstance(module, nn.Linear))
        and not _hooks(module) and not attrs
        and all(name == "weight" and is_standardized(module) for name in parametrized)
    )
