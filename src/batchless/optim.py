"""Optimizers and the batchless layers: weight decay never moves their parameters.

Weight decay would pull a layer's ``raw_mean`` towards 0 (``mean`` with it) and its ``raw_std``
towards 0 (``std`` towards 1 with the default ``std_param="log"``), away from the statistics of its
input that the NLL fits, which costs accuracy. BatchNorm's statistics are buffers, which no
optimizer decays; batchless's are parameters (so that gradient accumulation and DDP train them),
and ``torch.optim.AdamW(model.parameters())`` decays every parameter by default. Decay on the
layer's ``weight`` and ``bias`` costs accuracy too (EXPERIMENTS.md), so they are exempted alike,
unless the layer was built with ``decay_affine=True``. So before every step of torch's own
optimizers (these classes exactly: ``Adam, AdamW, NAdam, RAdam, Adamax, SGD, RMSprop, Adagrad,
Adadelta, ASGD``) a global step pre-hook cancels what their weight decay would do to the exempt
parameters that have a gradient: coupled decay (``grad += weight_decay * param``) is taken off the
gradient in advance, decoupled decay (``param *= 1 - lr * weight_decay``: AdamW,
``decoupled_weight_decay=True``) divided out of the parameter. Their step is then the one of a
group with ``weight_decay=0``, up to float rounding; every other parameter is decayed as before.
Any other optimizer, a subclass included (its update may differ), warns once instead, with the
fix: :func:`param_groups`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _compat
from ._state import STATE
from .errors import BatchlessError, check_module, warn
from .modules import _BatchlessNorm, _real


def param_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Optimizer parameter groups: weight decay on every trainable parameter but the batchless
    layers', in the style of timm's ``param_groups_weight_decay``; for optimizers other than
    torch's own, whose decay of those the library cancels by itself.

    The first group holds every parameter of ``model`` that requires grad, except the
    ``raw_mean`` and ``raw_std`` of its batchless layers and the ``weight`` and ``bias`` of those
    built with ``decay_affine=False`` (the default), with ``weight_decay``; the second holds those
    with ``weight_decay=0.0``. Each parameter appears once; an empty group is left out.
    ``group_options`` (e.g. ``lr``) go into both groups. Nothing else changes from
    ``model.parameters()``: other biases and norm weights keep ``weight_decay``, as they would
    there.

    Args:
        model: the ``nn.Module`` whose parameters the optimizer trains.
        weight_decay: the weight decay of the other parameters, a number >= 0.
        **group_options: further options of both groups, e.g. ``lr``.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bl.BatchlessNorm1d(3))
        >>> optimizer = torch.optim.AdamW(bl.param_groups(model, weight_decay=0.05), lr=1e-3)
        >>> [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
        [(2, 0.05), (4, 0.0)]
    """
    check_module(model, "param_groups")
    if not _real(weight_decay) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise BatchlessError(f"param_groups expects weight_decay to be a finite number >= 0, got "
                             f"{weight_decay!r}")
    if "params" in group_options:
        raise BatchlessError("param_groups takes the parameters from the model, got params= as "
                             "well: drop it, or build the groups yourself from "
                             "batchless.statistics_parameters(model) and the batchless layers' "
                             "weight and bias")
    exempt = _exempt_ids(m for m in model.modules() if isinstance(m, _BatchlessNorm))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in exempt],
               "weight_decay": float(weight_decay), **group_options},
              {"params": [p for p in trainable if id(p) in exempt],
               "weight_decay": 0.0, **group_options}]
    return [group for group in groups if group["params"]]


def _exempt_ids(layers) -> set[int]:
    """The ids of the parameters of batchless ``layers`` that weight decay must not move: the
    statistics, and ``weight`` and ``bias`` unless the layer's ``decay_affine``."""
    names = ("raw_mean", "raw_std")
    return {id(p) for layer in layers
            for name in names + (() if layer.decay_affine else ("weight", "bias"))
            if (p := layer._parameters.get(name)) is not None}


def _exempt_from_decay(optimizer: torch.optim.Optimizer, args, kwargs):
    """Before any optimizer's step (a global step pre-hook): cancel its weight decay on the
    batchless layers' exempt parameters (torch's optimizers), or warn once (any other). A step
    with a closure computes the gradients inside the step: the closure is wrapped to cancel after
    it runs."""
    if torch.compiler.is_compiling() or not STATE.layers:
        return None
    known = type(optimizer) in _TORCH_OPTIMIZERS
    closure = (args[1] if len(args) > 1 else None) or kwargs.get("closure")  # (args[0]: optimizer)
    if closure is None or not known:
        _exempt_now(optimizer, known)
        return None

    def closure_then_cancel():
        loss = closure()
        _exempt_now(optimizer, known)
        return loss

    if len(args) > 1:
        return (args[0], closure_then_cancel, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure_then_cancel}


def _exempt_now(optimizer: torch.optim.Optimizer, known: bool) -> None:
    for group, exempt in _exempt_in_groups(optimizer):
        weight_decay = group.get("weight_decay")
        if not _decays(weight_decay):
            continue
        if not known:
            _warn_once(optimizer, weight_decay)
            continue
        params = [p for p in exempt if p.grad is not None]
        if params:
            with torch.no_grad():
                _cancel(optimizer, group, params, float(weight_decay))


def _cancel(optimizer, group: dict, params: list, weight_decay: float) -> None:
    """Cancel the decay that ``optimizer``'s step would give ``params`` of ``group``. A GradScaler
    stepping a fused optimizer leaves it the scale (its gradients are still scaled) and
    ``found_inf`` (a skipped step, which decays nothing either)."""
    scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW):
        decay = float(group["lr"]) * weight_decay  # the step multiplies by 1 - decay: divide first
        if decay >= 1.0:
            return
        if found_inf is None:
            _compat.foreach_div_(params, 1.0 - decay)
        else:
            kept = 1.0 - decay * (1.0 - found_inf.clamp(max=1.0))
            for p in params:
                p.div_(kept.to(p))
        return
    # coupled: the step negates the gradient under maximize, unscales it, then adds the decay
    alpha = (1.0 if group.get("maximize", False) else -1.0) * weight_decay
    grads = [p.grad for p in params]
    if scale is None:
        _compat.foreach_add_(grads, params, alpha=alpha)
    else:
        for g, p in zip(grads, params, strict=True):
            g.add_(p * scale.to(p), alpha=alpha)


_TORCH_OPTIMIZERS = frozenset(getattr(torch.optim, name) for name in (
    "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SGD", "RMSprop", "Adagrad", "Adadelta", "ASGD"))


def _exempt_in_groups(optimizer: torch.optim.Optimizer) -> list:
    """``(group, its exempt batchless parameters)`` for the groups of ``optimizer`` that hold
    any: found at its first step and again whenever its number of groups changes."""
    count, found = STATE.optimizers.get(optimizer, (None, None))
    if count != len(optimizer.param_groups):
        ids = _exempt_ids(STATE.layers)
        found = [(group, exempt) for group in optimizer.param_groups
                 if (exempt := [p for p in group["params"] if id(p) in ids])]
        STATE.optimizers[optimizer] = (len(optimizer.param_groups), found)
    return found


def _warn_once(optimizer: torch.optim.Optimizer, weight_decay) -> None:
    if optimizer in STATE.warned_optimizers:
        return
    STATE.warned_optimizers.add(optimizer)
    count = sum(len(exempt) for group, exempt in _exempt_in_groups(optimizer)
                if _decays(group.get("weight_decay")))
    name = type(optimizer).__name__
    warn(f"{name} is about to step with weight_decay={weight_decay} on {count} batchless "
         "parameters (the raw_mean and raw_std of BatchlessNorm layers, and their weight and bias "
         "unless built with decay_affine=True): weight decay pulls each mean towards 0 and "
         "raw_std towards 0 (std towards 1 with the default std_param='log'), away from the "
         "statistics of the layer's input that the NLL fits, and shrinks weight and bias, which "
         "costs accuracy. batchless cancels that for torch's own optimizers, not for "
         f"{name}. Keep weight decay off them: {name}(batchless.param_groups(model, "
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
_HOOK = register_optimizer_step_pre_hook(_exempt_from_decay)
