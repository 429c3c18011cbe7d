"""Routes: which implementation runs a batchless layer's step, chosen once, up front.

A training step reads the input once forward, the gradient and the input once backward (BatchNorm:
twice each way). The maths is :mod:`batchless.functional`'s; the routes differ in what computes it:

* ``"native"``: one C++ autograd node around the CPU kernels of :func:`build_cpu_kernels` (float32
  and bfloat16, contiguous or channels-last), also for an evaluation forward that needs gradients;
  ``"native-eval"``: their affine kernel alone, for one that does not.
* ``"compiled"``: a Python autograd Function around kernels that ``torch.compile`` generates from
  the formula, one dynamic-shape graph per layout, dtype and device type; ``"eager"``: the same
  Function on PyTorch's own kernels (evaluation: one affine op).
* ``"traceable"``: inside whole-model ``torch.compile`` and ``torch.func`` transforms, the formula
  as plain ops in a ``setup_context`` Function, which the compiler fuses with its neighbours.

:func:`choose_route` decides: by default (see :func:`set_fused`) the native kernels on CPU once
built, the compiled ones on CUDA; float64, float16 on CPU, other layouts, empty inputs,
``torch.jit.trace`` and forward-mode AD take the eager route, as does every step after
``torch.compile`` failed (which warns once). :func:`route` tells a layer's route, and a profile
shows it: ``record_function("batchless::<route>")``. A backward that records a graph (double
backward) or gets batched gradients runs the formula as differentiable ops on every route.
"""

from __future__ import annotations

import enum
import math
import types
import warnings

import torch
from torch import Tensor

from . import _compat, _cpu_kernels
from ._state import FUSED_MODES, STATE, UNLOADED
from .errors import BatchlessError, warn

__all__ = ["FUSED_MODES", "Route", "build_cpu_kernels", "path", "route", "set_fused"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Route(str, enum.Enum):
    """A route of a batchless layer's forward (and its backward); see :mod:`batchless.fused`."""

    NATIVE = "native"
    NATIVE_EVAL = "native-eval"
    COMPILED = "compiled"
    EAGER = "eager"
    TRACEABLE = "traceable"


def set_fused(mode: str) -> str:
    """Choose the kernels of the training routes; returns the previous mode.

    Args:
        mode: ``"auto"`` (default): the native kernels on CPU once built, ``torch.compile``'s on
            CUDA; ``"compiled"``: ``torch.compile``'s everywhere (a few seconds per new layout and
            dtype); ``"never"``: the eager route. Initially ``$BATCHLESS_FUSED``, if set.

    Example::

        >>> import batchless.fused
        >>> previous = batchless.fused.set_fused("never")
        >>> batchless.fused.set_fused(previous)
        'never'
    """
    if mode not in FUSED_MODES:
        raise BatchlessError(f"set_fused expects one of {FUSED_MODES}, got {mode!r}")
    previous, STATE.mode = STATE.mode, mode
    return previous


def build_cpu_kernels(verbose: bool = False) -> bool:
    """Make the native CPU kernels ready; True when they are.

    Loads the cached build for this source, torch, Python and CPU, else compiles it into the cache
    (about a minute; needs a C++ compiler and ``ninja``; ``verbose`` shows the compiler's output).
    Until then CPU layers run on the eager route, and the first one warns with the command that
    calls this. On failure, warns with the compiler's first error line and returns False.
    """
    try:
        STATE.kernels = _cpu_kernels.load(build=True, verbose=verbose)
        return True
    except Exception as error:  # noqa: BLE001 - no compiler, a compile error: report, stay eager
        STATE.kernels = None
        warnings.warn(f"batchless: could not build the CPU kernels ({type(error).__name__}: "
                      f"{_cpu_kernels.first_error(str(error))}); training stays on the eager "
                      "route. batchless.fused.build_cpu_kernels(verbose=True) shows the whole "
                      "output", stacklevel=2)
        return False


def native_kernels():
    """The native kernels' module (``supports``, ``train``, ``eval``), None where not built."""
    kernels = STATE.kernels
    if kernels is UNLOADED:
        kernels = STATE.kernels = _cpu_kernels.load()
    return kernels


def choose_route(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None,
                 *, training: bool) -> Route:
    """The route a forward of ``x`` with these per-channel tensors takes now (decided here only)."""
    if torch.compiler.is_compiling() or _compat.transforms_active() or _compat.is_wrapped(x):
        return Route.TRACEABLE
    mode = STATE.mode
    if (mode == "never" or x.dtype not in _FUSED_DTYPES or x.numel() == 0 or _compat.jit_tracing()
            or _compat.forward_ad_active()):
        return Route.EAGER  # (a trace must record the ops; dual tensors need their rules)
    if mode == "auto" and x.is_cpu:  # plain tensors only: not fake, traced or subclassed
        kernels = native_kernels() if type(x) is Tensor else None
        if kernels is None or not kernels.supports(x, mean, std, weight, bias):
            return Route.EAGER
        if training or torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias)):
            return Route.NATIVE
        return Route.NATIVE_EVAL
    if (not training or STATE.compile_failed or (mode == "auto" and not x.is_cuda)
            or canonical(x) is None):
        return Route.EAGER
    return Route.COMPILED


def route(x: Tensor, layer=None) -> Route:
    """The route ``layer(x)`` takes now; without ``layer``, a training step of a float32 layer with
    weight and bias on x's device.

    Example::

        >>> import torch, batchless as bl
        >>> bl.fused.route(torch.randn(8, 4, dtype=torch.float64), bl.BatchlessNorm1d(4))
        <Route.EAGER: 'eager'>
    """
    if layer is None:
        ones = torch.ones(x.shape[1], device=x.device)
        return choose_route(x, ones, ones, ones, ones, training=True)
    return choose_route(x, layer.raw_mean, layer.raw_std, layer.weight, layer.bias,
                        training=layer.training)


def path(x: Tensor) -> str:
    """Whose kernels a training step of ``x`` runs: ``"native"``, ``"compiled"`` or ``"eager"`` (the
    traceable route's); a 0-d or 1-d ``x`` counts as one instance of its elements."""
    step = route(x if x.dim() > 1 else x.reshape(1, -1))
    return "eager" if step is Route.TRACEABLE else step.value


def canonical(t: Tensor) -> Tensor | None:
    """``t`` (N, C, *) as a contiguous (N, C, L) view, a contiguous (M, C) view (channel fastest),
    or None (also for lazily negated views, whose sign the compiled kernels would not see)."""
    if t.is_neg():
        return None
    if t.dim() > 2 and t.is_contiguous() and math.prod(t.shape[2:]) > 1:
        return t.view(t.shape[0], t.shape[1], -1)
    rows = t.movedim(1, -1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def uncanonical(y: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`canonical` for an output computed from ``like``'s canonical view."""
    if y.dim() == 3:  # (reshape: a view for the contiguous outputs the compiler gives, else a copy)
        return y.reshape(like.shape)
    return y.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


def compiled(fn, *args):
    """``fn(*args)`` by a ``torch.compile``'d copy of ``fn`` for its first argument's dim, dtype and
    device type (its own code object: torch.compile caches, and limits recompiles, per code object);
    ``fn`` itself once compiling has failed (which warns once)."""
    if STATE.compile_failed:  # (a graph recorded before the failure still comes here)
        return fn(*args)
    # plain tensors only: dynamo keeps a Parameter's shape static, and C with it
    args = [a.detach() if isinstance(a, torch.nn.Parameter) else a for a in args]
    key = (fn.__name__, args[0].dim(), args[0].dtype, args[0].device.type)
    run = STATE.compiled.get(key)
    if run is None:
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        run = STATE.compiled[key] = torch.compile(fresh, dynamic=True)
    try:
        return run(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the formula as is
        if isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA error" in str(error):
            raise  # a full or broken device, not a compiler failure
        STATE.compile_failed = True
        first_line = (str(error).strip().splitlines() or [""])[0]
        warn(f"batchless: the fused training kernels failed to compile or run "
             f"({type(error).__name__}: {first_line}); using the eager route from now on. "
             "batchless.fused.set_fused('never') skips the attempt.")
        return fn(*args)
