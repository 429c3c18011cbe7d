"""Fused training kernels: the layer's forward and backward in one pass over the activations each.

Batchless needs no statistics of the batch before it can normalise, so, unlike BatchNorm, its training
forward is a single pass over the input: the output ``x * scale + shift`` and the two per-channel moments of
``x_hat = (x - mean) / std`` read the same elements (BatchNorm needs one pass for its statistics and one for
the output). The backward is one pass too: the input gradient ``gy * scale`` and the weight/bias gradients
``sum(gy * x_hat)``, ``sum(gy)`` (BatchNorm's input gradient needs those sums first). Two implementations
compute exactly what the eager path of :mod:`batchless.functional` does:

* ``"native"``: C++ kernels for CPU (float32 and bfloat16), compiled once per machine by
  :func:`build_cpu_kernels` (``make install`` does it) and loaded from a cache afterwards; they also run
  evaluation forwards (one affine pass where no gradient is needed, the training node without an NLL where
  one is);
* ``"compiled"``: kernels that ``torch.compile`` generates (Triton on CUDA, C++ on CPU), each compiled once
  per canonical view, dtype and device type with dynamic sizes, so a model's many layer shapes do not
  trigger a compilation each.

When they are used is set by :func:`set_fused` (initially by the environment variable ``BATCHLESS_FUSED``,
if set); :func:`path` tells which one a tensor gets. By default
(``"auto"``): ``"compiled"`` on CUDA, where eager PyTorch would launch one kernel per operation;
``"native"`` on CPU once the kernels are built (until then, and where no C++ compiler exists, the eager
path). Whole-model ``torch.compile`` and ``torch.func`` transforms never come here: the compiler fuses the
layer with its neighbours itself. If ``torch.compile`` fails (no Triton, no C++ compiler, an unsupported
Python), batchless warns once and continues on the eager path.

Both take inputs in one of two canonical views, ``(N, C, L)`` for contiguous tensors and ``(M, C)`` for
channels-last ones (and for (N, C) inputs). Other layouts, float64 (and, on the native path, float16) and
empty inputs take the eager path, as do ``torch.jit.trace`` (which records only the dispatcher's ops) and
forward-mode AD; so do backwards that record a graph (double backward) or get batched gradients
(``is_grads_batched``), and those whose saved input a saved-tensor hook gives back in another layout.
"""

from __future__ import annotations

import math
import os
import types
import warnings

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _cpu_kernels
from .errors import BatchlessError

FUSED_MODES = ("auto", "compiled", "never")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _initial_mode() -> str:
    """The mode in ``$BATCHLESS_FUSED`` (e.g. ``never``, to run a script on the eager path), else auto."""
    mode = os.environ.get("BATCHLESS_FUSED") or "auto"
    if mode not in FUSED_MODES:
        raise BatchlessError(f"the environment variable BATCHLESS_FUSED must be one of {FUSED_MODES}, got {mode!r}")
    return mode


_mode = _initial_mode()
_failed = False  # a compilation failed: the eager path from then on
_compiled: dict = {}


def set_fused(mode: str) -> str:
    """Choose which kernels training forwards and backwards use; returns the previous mode.

    Args:
        mode: ``"auto"`` (default): the native CPU kernels on CPU once built (:func:`build_cpu_kernels`),
            ``torch.compile``'s on CUDA; ``"compiled"``: ``torch.compile``'s on every device, CPU included
            (each new input layout and dtype then compiles once, a few seconds); ``"never"``: the eager path.

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


def build_cpu_kernels(verbose: bool = False) -> bool:
    """Compile the native CPU kernels (once per machine, ~30 s; later calls and processes load the cached
    build); True when they are ready. Needs a C++ compiler and ``ninja``; on failure, warns with the
    reason and returns False (training then stays on the eager path)."""
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        return _cpu_kernels.load(build=True, verbose=verbose) is not None
    except Exception as error:  # noqa: BLE001 - a missing compiler, a compile error: report, stay eager
        lines = str(error).strip().splitlines() or [""]
        warnings.warn(f"batchless: could not build the CPU kernels ({type(error).__name__}: {lines[-1]}); "
                      "training stays on the eager path", stacklevel=2)
        return False


def path(x: Tensor) -> str:
    """Which kernels the training step of ``x`` takes: ``"native"``, ``"compiled"`` or ``"eager"`` (the native
    kernels also serve evaluation forwards)."""
    if (_mode == "never" or x.numel() == 0 or x.dtype not in _FUSED_DTYPES or torch.jit.is_tracing()
            or forward_ad._current_level >= 0):  # (a trace must record the ops; dual tensors need their rules)
        return "eager"
    if _mode == "auto" and x.is_cpu:  # plain tensors only: not fake, traced, vmapped or subclassed
        native = (x.dtype != torch.float16 and type(x) is Tensor and not torch.compiler.is_compiling()
                  and not torch._C._are_functorch_transforms_active() and _cpu_kernels.load() is not None)
        return "native" if native else "eager"  # (is_cpu, is_cuda: x.device builds an object, 5x slower)
    return "eager" if _failed or (_mode == "auto" and not x.is_cuda) else "compiled"


def _canonical(t: Tensor) -> Tensor | None:
    """``t`` (N, C, *) as a contiguous (N, C, L) view, a contiguous (M, C) view (channel fastest), or None
    (also for lazily negated views, whose sign the compiled kernels would not see)."""
    if t.is_neg() or t.is_conj():
        return None
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
    if _failed:  # (a graph recorded before the failure still comes here)
        return None
    # plain tensors only: dynamo keeps a Parameter's shape static, and C with it (a graph per channel count)
    args = [a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args]
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
        if "CUDA error" in str(error):  # a broken device (illegal address, ...), not a compiler failure:
            raise                        # the eager path would run on a corrupted context
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


def native_train(x: Tensor, mean: Tensor, raw_std: Tensor, kind: int, eps: float, weight: Tensor | None,
                 bias: Tensor | None, nll_weight: float | None):
    """``(y, a, b, finite)`` of :func:`batchless.functional.train_forward_param` with a numeric NLL weight
    (``kind``: the code of its ``std_param``), its backward one C++ autograd node, or an empty list where the
    eager path must do it."""
    return _cpu_kernels.load().train(x, mean, raw_std, kind, eps, weight, bias, nll_weight)


def native_eval(x: Tensor, mean: Tensor, raw_std: Tensor, kind: int, eps: float, weight: Tensor | None,
                bias: Tensor | None):
    """:func:`batchless.functional.eval_forward_param`'s output from the native CPU kernels, without autograd,
    or None where the eager path must do it."""
    return _cpu_kernels.load().eval(x, mean, raw_std, kind, eps, weight, bias)


def native_forward(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None):
    """``(y, a, b, finite, mean_c, inv, scale)`` as :func:`batchless.functional._train_maths` gives them
    (host-checked ``finite``), from the native CPU kernels, or None where the eager path must do it."""
    return _cpu_kernels.load().forward(x, mean, std, weight, bias) or None


def backward(gy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, scale: Tensor, kernels: str):
    """``(gx, gweight, gbias)`` in one fused pass by the ``kernels`` of :func:`path` (gweight/gbias in
    float32), or None where the eager path must do it (gy in another layout than x, or a backward that
    records a graph)."""
    if torch.is_grad_enabled() or gy.dtype != x.dtype or torch._C._functorch.is_functorch_wrapped_tensor(gy):
        return None  # (a batched gradient: is_grads_batched, torch.func)
    if kernels == "native":
        return _cpu_kernels.load().backward(gy, x, mean, inv, scale) or None
    gv, xv = _canonical(gy), _canonical(x)
    if gv is None or xv is None or gv.shape != xv.shape:
        return None
    out = _run(_backward_maths, gv, xv, mean, inv, scale)
    return None if out is None else (_uncanonical(out[0], x), out[1], out[2])
