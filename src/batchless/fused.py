"""Fused training kernels: the layer's forward and backward as ``torch.compile``-generated kernels.

Batchless needs no statistics of the batch before it can normalise, so, unlike BatchNorm, its training
forward is a single pass over the input: the output ``x * scale + shift`` and the two per-channel moments of
``x_hat = (x - mean) / std`` read the same elements, and a compiler fuses them into one kernel (BatchNorm
needs one pass for its statistics and one for the output). The backward is one pass too: the input gradient
``gy * scale`` and the weight/bias gradients ``sum(gy * x_hat)``, ``sum(gy)`` (BatchNorm's input gradient
needs those sums first). :func:`forward` and :func:`backward` compute exactly what the eager path of
:mod:`batchless.functional` does, through kernels that ``torch.compile`` generates (Triton on CUDA, C++ on
CPU).

When they are used is set by :func:`set_fused`: by default (``"auto"``) on CUDA, where eager PyTorch
would launch one kernel per operation; on CPU the eager path's native kernels are used (a compiled call
costs ~0.1 ms more and needs a C++ compiler). Whole-model ``torch.compile`` and ``torch.func`` transforms
never come here: the compiler fuses the layer with its neighbours itself. If compiling fails (no Triton,
no C++ compiler, an unsupported Python), batchless warns once and continues on the eager path.

Inputs are handed to the compiler in one of two canonical views, ``(N, C, L)`` for contiguous tensors and
``(M, C)`` for channels-last ones (and for (N, C) inputs), each compiled once per view, dtype and device
type with dynamic sizes, so that a model's many layer shapes do not trigger a compilation each. Other
layouts, float64 and empty inputs take the eager path.
"""

from __future__ import annotations

import math
import types
import warnings

import torch
from torch import Tensor

from .errors import BatchlessError

FUSED_MODES = ("auto", "always", "never")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_mode = "auto"
_failed = False  # a compilation failed: the eager path from then on
_compiled: dict = {}


def set_fused(mode: str) -> str:
    """Choose when training forwards and backwards use the fused (compiled) kernels; returns the old mode.

    Args:
        mode: ``"auto"`` (default): on CUDA devices; ``"always"``: on every device, CPU included (each new
            input layout and dtype then compiles once, a few seconds); ``"never"``: the eager path only.

    Example::

        >>> import batchless.fused
        >>> previous = batchless.fused.set_fused("never")
        >>> batchless.fused.set_fused(previous)
        'never'
    """
    global _mode
    if mode not in FUSED_MODES:
        raise BatchlessError(f"set_fused expects one of {FUSED_MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def usable(x: Tensor) -> bool:
    """Whether the training forward/backward of ``x`` goes through the fused kernels (eager code only)."""
    if _mode == "never" or _failed or x.dtype not in _FUSED_DTYPES or x.numel() == 0:
        return False
    return _mode == "always" or x.device.type == "cuda"


def _canonical(t: Tensor) -> Tensor | None:
    """``t`` (N, C, *) as a contiguous (N, C, L) view, a contiguous (M, C) view (channel fastest), or None."""
    if t.dim() > 2 and t.is_contiguous() and math.prod(t.shape[2:]) > 1:
        return t.view(t.shape[0], t.shape[1], -1)
    rows = t.movedim(1, -1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def _uncanonical(y: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`_canonical` for an output computed from ``like``'s canonical view."""
    if y.dim() == 3:  # (reshape: a view for the contiguous outputs the compiler gives, a copy otherwise)
        return y.reshape(like.shape)
    return y.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


def _forward_maths(x, mean, inv, scale, bias):
    view, dims = (1, -1) + (1,) * (x.dim() - 2), [0, *range(2, x.dim())]
    xf = x.to(inv.dtype)
    shift = -mean * scale if bias is None else bias.to(inv.dtype) - mean * scale
    y = (xf * scale.reshape(view) + shift.reshape(view)).to(x.dtype)
    x_hat = (xf - mean.reshape(view)) * inv.reshape(view)
    return y, x_hat.mean(dims), x_hat.square().mean(dims)


def _backward_maths(gy, x, mean, inv, scale):
    view, dims = (1, -1) + (1,) * (x.dim() - 2), [0, *range(2, x.dim())]
    g = gy.to(inv.dtype)
    x_hat = (x.to(inv.dtype) - mean.reshape(view)) * inv.reshape(view)
    return (g * scale.reshape(view)).to(gy.dtype), (g * x_hat).sum(dims), g.sum(dims)


def _run(fn, x: Tensor, *args):
    """``fn`` compiled for x's view, dtype and device type; None if compiling failed (then never again).

    Each key gets its own copy of ``fn``'s code object: torch.compile caches (and limits recompilations)
    per code object, so one copy per key keeps every key to a single dynamic-shape graph."""
    global _failed
    key = (fn.__name__, x.dim(), x.dtype, x.device.type)
    compiled = _compiled.get(key)
    if compiled is None:
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        compiled = _compiled[key] = torch.compile(fresh, dynamic=True)
    try:
        return compiled(x, *args)
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError since 2.5; the same class)
        raise
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager path
        _failed = True
        first_line = (str(error).strip().splitlines() or [""])[0]
        warnings.warn(
            f"batchless: the fused training kernels failed to compile or run ({type(error).__name__}: {first_line}); "
            "using the eager path from now on. batchless.fused.set_fused('never') skips the attempt.",
            stacklevel=4,
        )
        return None


def forward(x: Tensor, mean: Tensor, inv: Tensor, scale: Tensor, bias: Tensor | None):
    """``(y, a, b)`` of a training forward in one fused pass, or None where the eager path must do it.

    ``mean``, ``inv = 1 / std`` and ``scale = weight / std`` are (C,) float32 vectors; ``y = (x - mean) *
    scale + bias`` in x's dtype and memory format; ``a``, ``b`` the per-channel means of ``x_hat`` and
    ``x_hat ** 2`` in float32."""
    view = _canonical(x)
    if view is None:
        return None
    out = _run(_forward_maths, view, mean, inv, scale, bias)
    return None if out is None else (_uncanonical(out[0], x), out[1], out[2])


def backward(gy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, scale: Tensor):
    """``(gx, gweight, gbias)`` in one fused pass (gweight/gbias in float32), or None where the eager path
    must do it (gy in another layout than x, or a backward that records a graph)."""
    if torch.is_grad_enabled() or gy.dtype != x.dtype:
        return None
    gv, xv = _canonical(gy), _canonical(x)
    if gv is None or xv is None or gv.shape != xv.shape:
        return None
    out = _run(_backward_maths, gv, xv, mean, inv, scale)
    return None if out is None else (_uncanonical(out[0], x), out[1], out[2])
