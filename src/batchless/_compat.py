"""The private torch APIs batchless uses, each in one place, guarded where torch versions differ."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase  # noqa: F401 - re-exported
from torch.nn.utils._expanded_weights import ExpandedWeight  # noqa: F401 - Opacus's "ew" mode

# Where an nn.Module keeps its forward hooks (and their flags).
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called")

# C functions the router calls at every step, aliased directly
is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # a torch.func tensor (vmap, grad)?
# a gradient batched by torch.autograd.grad(..., is_grads_batched=True) (torch's legacy vmap)?
is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
transforms_active = torch._C._are_functorch_transforms_active  # a torch.func transform running?
jit_tracing = torch._C._is_tracing  # torch.jit.trace recording?
profiling = torch.autograd._profiler_enabled  # cheap (record_function is not); not traceable
_graph_task_id = torch._C._current_graph_task_id  # -1: no backward running
# one kernel launch for a list of tensors, as torch's optimizers step them (optim.py)
foreach_add_, foreach_div_ = torch._foreach_add_, torch._foreach_div_


def in_backward() -> bool:
    """Whether this runs inside an autograd backward (activation checkpointing's re-run)."""
    return _graph_task_id() != -1


def transformed(t: Tensor) -> bool:
    """Whether a torch.func transform is running, or ``t`` is one's tensor or a batched gradient:
    where ATen's batch-norm kernels have no batching rule (vmap would run them per sample)."""
    return transforms_active() or is_wrapped(t) or is_legacy_batched(t)


def forward_ad_active() -> bool:
    return forward_ad._current_level >= 0


def autocast_off(x: Tensor):
    """Autocast off on x's device where it is on (entering a context costs more than most ops)."""
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        on = True
    return torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext()


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Channel mean and biased variance of ``x`` (N, C, *), ATen's one-pass batch-norm kernel."""
    return torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)


def batch_norm_sums(gy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, inv: Tensor,
                    need_weight: bool, need_bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """``sum(gy * (x - mean) * inv)`` and ``sum(gy)`` per channel (None where not needed): the
    sums of ATen's batch-norm training backward, one pass."""
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        gy, x, weight, None, None, mean, inv, True, 0.0, [False, need_weight, need_bias])
    return gw, gb


def is_grad_scaler(obj) -> bool:
    return hasattr(obj, "is_enabled") and hasattr(obj, "_scale")


def grad_scaler_scale(scaler) -> Tensor | float:
    """A ``torch.amp.GradScaler``'s scale (a tensor it creates lazily and updates in place); 1.0
    while it is disabled or has not scaled yet."""
    return scaler._scale if scaler.is_enabled() and scaler._scale is not None else 1.0
