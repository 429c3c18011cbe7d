"""Optimizers and the batchless statistics: :func:`param_groups` keeps weight decay off them, and
an optimizer about to step with weight decay on them warns, once.

Weight decay pulls a layer's ``mean`` towards 0 and its ``raw_std`` towards 0 (``std`` towards 1
with the default ``std_param="log"``), away from the statistics of its input that the NLL fits.
``torch.optim.AdamW`` decays every parameter by default (``weight_decay=0.01``), and SGD's or
Adam's ``weight_decay`` does the same through the gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._state import STATE
from .errors import BatchlessError, check_module, warn
from .loss import statistics_parameters
from .modules import _real


def param_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Optimizer parameter groups: weight decay on every trainable parameter but the batchless
    statistics, in the style of timm's ``param_groups_weight_decay``.

    The first group holds every parameter of ``model`` that requires grad, except the ``mean`` and
    ``raw_std`` of its batchless layers, with ``weight_decay``; the second holds those statistics
    with ``weight_decay=0.0``. Each parameter appears once; an empty group is left out.
    ``group_options`` (e.g. ``lr``) go into both groups. Nothing else changes from
    ``model.parameters()``: biases and norm weights keep ``weight_decay``, as they would there.

    Args:
        model: the ``nn.Module`` whose parameters the optimizer trains.
        weight_decay: the weight decay of the other parameters, a number >= 0.
        **group_options: further options of both groups, e.g. ``lr``.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bl.BatchlessNorm1d(3))
        >>> optimizer = torch.optim.AdamW(bl.param_groups(model, weight_decay=0.05), lr=1e-3)
        >>> [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
        [(4, 0.05), (2, 0.0)]
    """
    check_module(model, "param_groups")
    if not _real(weight_decay) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise BatchlessError(f"param_groups expects weight_decay to be a finite number >= 0, got "
                             f"{weight_decay!r}")
    if "params" in group_options:
        raise BatchlessError("param_groups takes the parameters from the model, got params= as "
                             "well: drop it, or build the groups yourself from "
                             "batchless.statistics_parameters(model)")
    statistics = {id(p) for p in statistics_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in statistics],
               "weight_decay": float(weight_decay), **group_options},
              {"params": [p for p in trainable if id(p) in statistics],
               "weight_decay": 0.0, **group_options}]
    return [group for group in groups if group["params"]]


def _check_weight_decay(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before any optimizer's step (a global step pre-hook): at its first step, warn if a group
    with weight decay holds a batchless statistics parameter. Later steps cost one lookup."""
    if torch.compiler.is_compiling() or optimizer in STATE.checked_optimizers:
        return
    STATE.checked_optimizers.add(optimizer)
    if not STATE.layers:  # no batchless layer in this process
        return
    statistics = {id(p) for layer in STATE.layers for name in ("mean", "raw_std")
                  if (p := layer._parameters.get(name)) is not None}
    decayed = [(group["weight_decay"], p) for group in optimizer.param_groups
               if _decays(group.get("weight_decay")) for p in group["params"]
               if id(p) in statistics]
    if not decayed:
        return
    name, weight_decay = type(optimizer).__name__, decayed[0][0]
    warn(f"{name} is about to step with weight_decay={weight_decay} on {len(decayed)} batchless "
         "statistics parameters (the mean and raw_std of BatchlessNorm layers): weight decay pulls "
         "each mean towards 0 and raw_std towards 0 (std towards 1 with the default "
         "std_param='log'), away from the statistics of the layer's input that the NLL fits, "
         "which costs accuracy (a little at the default std_speed, much with std_speed=1). Keep "
         f"weight decay off them: {name}(batchless.param_groups(model, "
         f"weight_decay={weight_decay}), lr=...)")


def _decays(weight_decay) -> bool:
    """Whether a group's ``weight_decay`` (a number, a 0-dim tensor, or None where the optimizer
    has none) decays."""
    return _real(weight_decay) and bool(weight_decay > 0)


# Registered once per import of this file: importlib.reload runs it again in the same namespace,
# where the previous run's handle is still found and removed.
_HOOK = globals().get("_HOOK")
if _HOOK is not None:
    _HOOK.remove()
_HOOK = register_optimizer_step_pre_hook(_check_weight_decay)
