r"""The maths of Batchless Normalization as pure tensor functions.

Every channel ``c`` has a learnable Gaussian :math:`\mathcal{N}(\mu_c, \sigma_c^2)`. The output is

.. math::  y = \frac{x - \mu}{\sigma} \gamma + \beta

in training and evaluation alike, and :math:`\mu, \sigma` are trained by the negative log likelihood of
the layer's input, reduced as a mean over all its elements and gauged to be ~0 when the input really is
:math:`\mathcal{N}(\mu, \sigma^2)`:

.. math::  \mathrm{NLL} = \operatorname{mean}\Big[\log\sigma_c + \tfrac12\big(\tfrac{x-\mu_c}{\sigma_c}\big)^2\Big]
           - \operatorname{sg}\big[\operatorname{mean}_c \log\sigma_c + \tfrac12\big]

Stop-gradients both ways: the output treats :math:`\mu, \sigma` as constants, the NLL treats ``x`` as a
constant. The NLL therefore depends on the input only through two per-channel moments of the normalised
input :math:`\hat x = (x - \mu)/\sigma`, ``a = mean_c(x_hat)`` and ``b = mean_c(x_hat ** 2)``, which is all
this module keeps of the activations:

.. math::  \frac{\partial\,\mathrm{NLL}}{\partial \mu_c} = -\frac{a_c}{C\sigma_c}, \qquad
           \frac{\partial\,\mathrm{NLL}}{\partial \sigma_c} = \frac{1 - b_c}{C\sigma_c}

with ``C`` the number of channels. ``a`` and ``b`` are formed from the channel mean and variance of ``x`` and
the current ``mean``/``std`` (see :func:`channel_moments` for their precision). Statistics are computed in
float32 (float64 for float64 inputs); outputs come back in the input dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

from . import fused as _fused
from .errors import BatchlessError
from .weighting import resolve_weight

STD_PARAMS = ("log", "abs", "inv")


def std_from_param(raw: Tensor, std_param: str, eps: float) -> Tensor:
    """sigma as a differentiable function of the raw parameter ``s``.

    ``"log"``: ``exp(s)``; ``"abs"``: ``|s| + eps``; ``"inv"``: ``s`` stores ``1/sigma``, so ``1 / (|s| + eps)``.
    """
    if std_param == "log":
        return raw.exp()
    if std_param == "abs":
        return raw.abs() + eps
    if std_param == "inv":
        return (raw.abs() + eps).reciprocal()
    raise BatchlessError(f"std_param must be one of {STD_PARAMS}, got {std_param!r}")


def param_from_std(std: Tensor, std_param: str, eps: float) -> Tensor:
    """The raw parameter whose :func:`std_from_param` is ``std`` (clamped where ``eps`` makes it unreachable)."""
    std = torch.as_tensor(std)
    if std_param == "log":
        return std.log()
    if std_param == "abs":
        return (std - eps).clamp_min(0.0)
    if std_param == "inv":
        return (std.reciprocal() - eps).clamp_min(0.0)
    raise BatchlessError(f"std_param must be one of {STD_PARAMS}, got {std_param!r}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # .to is a dispatcher round trip even when it is a no-op


def _dense_stats(mean: Tensor, std: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(C,) float32/64 mean and std; a shared (1,) Gaussian is expanded *and copied*: with an expanded
    (stride 0) running_mean, CPU batch_norm_backward reads garbage for (N, C) inputs."""
    cd, c = _compute_dtype(x), x.shape[1]
    mean, std = _cast(mean.detach(), cd).reshape(-1), _cast(std.detach(), cd).reshape(-1)  # (0-dim: shared)
    if mean.numel() != c:
        mean, std = mean.expand(c).contiguous(), std.expand(c).contiguous()
    return mean, std


def _scale(inv: Tensor, weight: Tensor | None) -> Tensor:
    """The per-channel factor ``weight / std`` from ``inv = 1 / std`` (``inv`` itself without weight)."""
    return inv if weight is None else _cast(weight, inv.dtype) * inv


_ONES: dict = {}


def _ones_as(t: Tensor) -> Tensor:
    """A plain (C,) tensor of ones in t's dtype and device (never batched under vmap), kept per C, dtype and
    device so that the hot path does not allocate it (``t``: a (C,) parameter-sized vector)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # (an inference tensor in the
        return torch.ones_like(t)                                            # cache would break autograd later)
    key = (t.shape[0], t.dtype, t.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
    return ones


def _affine(x: Tensor, mean: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``(x - mean) * scale + bias`` per channel, in x's dtype, by the fastest native kernel."""
    bias = None if bias is None else _cast(bias, scale.dtype)
    if x.dim() == 2 and x.dtype == scale.dtype:  # (N, C): one addcmul beats batch_norm's setup by 5x
        shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias, mean, scale, value=-1.0)
        return torch.addcmul(shift, x, scale)
    # an eval-mode batch norm with running_var 1 and eps 0 computes exactly this (as x * a + b, like BatchNorm)
    return torch.batch_norm(x, scale, bias, mean, _ones_as(scale), False, 0.0, 0.0, torch.backends.cudnn.enabled)


_ROWS_MIN_NUMEL = 16384  # below this the statistics kernel's ~1.7 ns/element beats the row path's ~28 us of ops
_SHIFT_MIN_N = 65536  # elements per channel from which the CPU statistics kernel's float32 sums need centring


def channel_moments(x: Tensor, mean: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``a = mean(x_hat)`` and ``b = mean(x_hat ** 2)`` of ``x_hat = (x - mean) * inv``, inv = 1/std.

    Where possible one read of ``x`` and no activation-sized temporary (on this project's CPUs a fresh
    activation-sized buffer costs more than the arithmetic). PyTorch's batch-norm statistics kernel (one
    Welford pass) gives the channel mean and (centred, stable) variance on accelerators and, on CPU, for
    (N, C) and channels-last inputs. For other contiguous (N, C, *) CPU inputs of 16k elements or more, where
    that kernel is up to 10x slower (~1.7 ns/element on this project's CPUs), float32 row sums and row
    2-norms of the (N, C, rest) view are combined in float64; the raw second moment then loses ~1e-7 *
    (mean_x / std_x)**2 in relative precision, negligible for the NLL unless a channel's mean exceeds ~1000
    of its standard deviations (half-precision inputs too: summed in float32). The statistics kernel's
    half-precision inputs, and on CPU its inputs from 2^16 elements per channel, are first centred, ``x -
    mean`` in float32 (one more pass and a temporary): the kernel rounds a half-precision input's statistics
    to its dtype, and its float32 sums on CPU lose a badly centred channel's mean (1000 +- 0.1 by ~40
    standard deviations at 2^19). Under torch.compile: ``var_mean``, which the compiler fuses.
    An empty batch has no evidence: a = 0, b = 1, so its NLL and gradients are 0.
    """
    cd = _compute_dtype(x)
    n = x.numel() // x.shape[1]
    if n == 0:
        return torch.zeros_like(inv), torch.ones_like(inv)
    if torch.compiler.is_compiling():  # the native statistics op has no fake-tensor kernel; compilers fuse this
        var, m = torch.var_mean(x.to(cd), [0, *range(2, x.dim())], correction=0)
        a = (m - mean) * inv
        return a, torch.addcmul(a * a, var, inv * inv)
    by_rows = x.dim() > 2 and x.numel() >= _ROWS_MIN_NUMEL and x.is_contiguous() and x.device.type == "cpu"
    centre = not by_rows and (x.dtype in (torch.bfloat16, torch.float16) or (
        x.device.type == "cpu" and n >= _SHIFT_MIN_N and x.dtype == torch.float32))
    if centre:
        # by the learned mean first (one extra pass and a float32 temporary): the statistics kernel returns a
        # half-precision input's mean rounded to its dtype (at 100 +- 1, bfloat16: 0.4 standard deviations),
        # and on CPU its float32 sums lose a badly centred channel's mean past ~2^17 elements (1000 +- 0.1:
        # off by 40 standard deviations)
        x = x - _cast(mean, cd).reshape((1, -1) + (1,) * (x.dim() - 2))  # (half precision x: in float32)
    if by_rows:
        rows = x.view(x.shape[0], x.shape[1], -1)
        m = rows.sum(-1, dtype=cd).sum(0, dtype=torch.float64) / n
        var = torch.linalg.vector_norm(rows, dim=-1, dtype=cd).double().square().sum(0) / n - m * m
        m, var = m.to(cd), var.to(cd).clamp_min(0.0)
    else:
        m, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        m, var = _cast(m, cd), _cast(var, cd)
    a = m * inv if centre else (m - mean) * inv
    return a, torch.addcmul(a * a, var, inv * inv)  # b = (var + (m - mean)**2) / std**2


def _train_maths(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None,
                 host_check: bool, fused: bool = False):
    """``(y, a, b, finite, mean_c, inv, scale)`` of a training forward, mean/std constants (``inv = 1 / std``,
    ``scale = weight / std`` as used for the output); with ``fused``, by :func:`batchless.fused.forward`
    where it applies.

    A channel whose input holds NaN/Inf contributes no NLL (a = 0, b = 1). ``finite`` (C,) says which
    channels were finite; with ``host_check`` (CPU tensors, eager) it is None when all are, which one
    reduction and a free host read establish (b is non-finite wherever a is).
    """
    mean_c, std_c = _dense_stats(mean, std, x)
    inv = std_c.reciprocal()
    scale = _scale(inv, weight)
    out = _fused.forward(x, mean_c, inv, scale, bias) if fused else None
    if out is None:
        y, (a, b) = _affine(x, mean_c, scale, bias), channel_moments(x, mean_c, inv)
    else:
        y, a, b = out
    if host_check and math.isfinite(b.sum().item()):
        return y, a, b, None, mean_c, inv, scale
    finite = torch.isfinite(b)
    return y, a.where(finite, 0.0), b.where(finite, 1.0), finite, mean_c, inv, scale


def _train_grads(gy, x, mean_c, inv, scale, weight, a, b, needs, nll_weight, shared: bool, kernels="eager"):
    """Gradients for ``(x, mean, std, weight, bias)``: those of an eval-mode batch norm with running
    statistics ``mean_c``, ``1 / inv**2`` for x, weight and bias; ``nll_weight * dNLL`` for mean and std
    (none when ``nll_weight`` is None: explicit mode). With ``kernels`` other than ``"eager"`` (see
    :func:`batchless.fused.path`), x/weight/bias gradients by :func:`batchless.fused.backward` where it
    applies (when all three are needed).

    A backward that records a graph (double backward: gradient penalties, Hessian-vector products) gets the
    x, weight and bias gradients as differentiable functions of ``gy``, ``x`` and ``weight`` (so the
    penalty's gradient reaches ``weight`` through ``gx = gy * weight / std``); mean/std are constants there,
    as in the output, and the implicit NLL gradient is a constant too (``nll="explicit"`` differentiates the
    NLL twice)."""
    w = None if weight is None else _cast(weight, inv.dtype)
    gx = gw = gb = None
    use_fused = kernels != "eager" and gy is not None and needs[0] and needs[3] and needs[4]
    out = _fused.backward(gy, x, mean_c, inv, scale, kernels) if use_fused else None
    if out is not None:
        gx, gw, gb = out
    elif gy is not None and (torch.is_grad_enabled() or x.numel() == 0 or (
            not torch.compiler.is_compiling() and _transformed(gy))):
        # plain differentiable ops: for a backward that records a graph, an empty batch (the native CPU
        # kernel below divides by N: SIGFPE) and vmap (no batching rule for that kernel)
        view, dims = (1, -1) + (1,) * (x.dim() - 2), [0, *range(2, x.dim())]
        g = gy.to(inv.dtype)
        if needs[0]:
            gx = (g * _scale(inv, w).reshape(view)).to(gy.dtype)
        if needs[3]:
            gw = (g * ((x.to(inv.dtype) - mean_c.reshape(view)) * inv.reshape(view))).sum(dims)
        if needs[4]:
            gb = g.sum(dims)
    elif gy is not None:  # (None: the output itself is unused; only the NLL gradient below remains)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if needs[0]:  # one multiply (native eval-mode backward is 1.5-3x slower on CPU); in bfloat16/float16
            # the per-channel factor is rounded to x's dtype first: <= 2**-8 relative error, not 2**-9
            gx = gy * _cast(scale, gy.dtype).reshape(view)
        if needs[3] or needs[4]:  # the sums of batch norm's training backward, centred on mean_c, scaled by 1/std_c
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy, x, w, None, None, mean_c, inv, True, 0.0, [False, needs[3], needs[4]])
    if weight is not None and weight.dtype != inv.dtype:
        gw, gb = (None if g is None else g.to(weight.dtype) for g in (gw, gb))
    gmean = gstd = None
    if nll_weight is not None:
        weight_nll = nll_weight if type(nll_weight) is float else resolve_weight(nll_weight)
        k = inv * (weight_nll / a.numel())  # dNLL/d(mean, std) = (-a, 1 - b) k
        gmean, gstd = torch.mul(a, k).neg_(), torch.addcmul(k, b, k, value=-1.0)
        if shared:
            gmean, gstd = gmean.sum(0, keepdim=True), gstd.sum(0, keepdim=True)
    return gx, gmean, gstd, gw, gb


def _transformed(t: Tensor) -> bool:
    """Whether a torch.func transform is running (``t`` wrapped, or only the parameters, as with
    ``functional_call`` on a layer fed a plain input): such calls need the plain-ops formulation."""
    return torch._C._are_functorch_transforms_active() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _autocast_off(x: Tensor):
    """A context disabling autocast for x's device where it is on (entering one costs more than most ops)."""
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        on = True
    return torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext()


class _BatchlessTrain(torch.autograd.Function):
    """Training forward: the output, the per-channel moments (a, b) of x_hat and which channels were finite.

    The output and the gradients for x, weight and bias are those of an eval-mode batch norm with
    ``running_mean = mean`` and ``running_var = std**2`` (eps 0), computed by PyTorch's native kernels
    (the forward by eval-mode batch norm; the input gradient by one multiply, the weight/bias gradients by
    the sums of batch norm's training-mode backward); mean/std are constants in this path. When
    ``nll_weight`` is not None (implicit mode) backward also gives mean/std ``nll_weight * dNLL``;
    otherwise mean/std get no gradient here.
    This setup_context-style Function serves torch.func transforms and torch.compile; eager code uses the
    lighter :class:`_BatchlessTrainEager`, or, on CPU with the native kernels built and a numeric NLL weight,
    their one-node C++ equivalent (``Train`` in ``_cpu_kernels.cpp``); all compute the same thing.
    """

    generate_vmap_rule = True  # per-sample gradients with torch.func (the layer is per-instance)

    @staticmethod
    def forward(x, mean, std, weight, bias, nll_weight):
        with _autocast_off(x):  # (scale is not an output: without weight it is inv itself)
            return _train_maths(x, mean, std, weight, bias, host_check=False)[:6]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, _, weight, _, nll_weight = inputs
        _, a, b, finite, mean_c, inv = output
        ctx.save_for_backward(x, mean_c, inv, weight, a, b)
        ctx.shared = mean.numel() != x.shape[1]
        ctx.nll_weight = nll_weight
        ctx.mark_non_differentiable(a, b, finite, mean_c, inv)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the five non-differentiable outputs

    @staticmethod
    def backward(ctx, gy, *_):
        x, mean_c, inv, weight, a, b = ctx.saved_tensors
        return *_train_grads(gy, x, mean_c, inv, _scale(inv, weight), weight, a, b, ctx.needs_input_grad,
                             ctx.nll_weight, ctx.shared), None


class _BatchlessTrainEager(torch.autograd.Function):
    """The same computation for eager code, with the per-call overhead cut down, which on small inputs is
    most of the cost: the classic style (``apply`` of a setup_context-style Function binds its arguments
    with ``inspect`` on every call, ~50 us), one output (a, b and finite go to the ``side`` list), and
    the finiteness check read on the host for CPU tensors."""

    @staticmethod
    def forward(ctx, x, mean, std, weight, bias, nll_weight, side, kernels):
        with _autocast_off(x):
            out = _fused.native_forward(x, mean, std, weight, bias) if kernels == "native" else None
            y, a, b, finite, mean_c, inv, scale = out or _train_maths(
                x, mean, std, weight, bias, host_check=x.device.type == "cpu", fused=kernels == "compiled")
        ctx.save_for_backward(x, mean_c, weight)
        ctx.kernels = kernels
        ctx.stats = inv, scale, a, b  # intermediates: no version counter to check
        ctx.shared = mean.numel() != x.shape[1]
        ctx.nll_weight = nll_weight
        ctx.set_materialize_grads(False)
        side += (a, b, finite)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, mean_c, weight = ctx.saved_tensors
        inv, scale, a, b = ctx.stats
        return *_train_grads(gy, x, mean_c, inv, scale, weight, a, b, ctx.needs_input_grad, ctx.nll_weight,
                             ctx.shared, ctx.kernels), None, None, None


def nll_from_moments(mean: Tensor, std: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The gauged layer NLL as a differentiable function of ``mean`` and ``std`` (the input is constant).

    ``a``, ``b`` are the per-channel moments of x_hat taken at ``mean0 = mean.detach()``, ``std0 =
    std.detach()``; with ``d = mean0 - mean`` the expected squared deviation from ``mean`` is
    ``std0**2 * b + 2 * d * std0 * a + d**2`` exactly, so value, gradient and curvature are the NLL's own.
    """
    mean0, std0 = mean.detach(), std.detach()
    d = mean0 - mean
    sq = std0 * std0 * b + 2.0 * d * std0 * a + d * d
    per_channel = std.log() + 0.5 * sq / (std * std)
    gauge = (std0.log().expand_as(per_channel).mean() + 0.5).detach()
    return per_channel.mean() - gauge


def gauged_nll(b: Tensor) -> Tensor:
    """The gauged NLL's value from the second moments alone: ``0.5 * (mean(b) - 1)`` (0 when x ~ N(mu, sigma^2))."""
    return 0.5 * (b.mean() - 1.0)


def eval_forward(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Batchless normalisation of ``x`` (N, C, *) in evaluation, with per-channel (C,) or shared (1,)
    ``mean``/``std``: the fixed affine map ``(x - mean) / std * weight + bias`` of an eval-mode BatchNorm."""
    return eval_forward_param(x, mean, std, "std", 0.0, weight, bias)


def eval_forward_param(x: Tensor, mean: Tensor, raw_std: Tensor, std_param: str, eps: float, weight: Tensor | None,
                       bias: Tensor | None) -> Tensor:
    """:func:`eval_forward` with sigma given by its parameter: ``std_from_param(raw_std, std_param, eps)``
    (``std_param`` ``"std"``: ``raw_std`` is sigma itself). The native CPU kernels take the parameter
    directly: one C++ call where no gradient is needed, else the training node without an NLL (mean and
    std constants, as here; frozen-statistics fine-tuning)."""
    if _fused.path(x) == "native":
        kind = _STD_KINDS[std_param]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            out = _fused.native_train(x, mean.detach(), raw_std.detach(), kind, eps, weight, bias, None)
            y = out[0] if out else None
        else:
            y = _fused.native_eval(x, mean, raw_std, kind, eps, weight, bias)
        if y is not None:
            return y
    with _autocast_off(x):
        mean_c, std_c = _dense_stats(mean, _std(raw_std, std_param, eps), x)
        return _affine(x, mean_c, _scale(std_c.reciprocal(), weight), bias)


def train_forward(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None, nll_weight):
    """Batchless normalisation of ``x`` in training: ``(y, a, b, finite)``.

    ``y`` is :func:`eval_forward`'s output; ``a``, ``b`` are the per-channel moments of the normalised input
    (:func:`channel_moments`), from which the gauged layer NLL follows (:func:`gauged_nll`, or
    :func:`nll_from_moments` for a value differentiable in mean/std); ``finite`` (C,) is False for channels
    whose input held NaN/Inf, which add nothing to the NLL, or None when every channel is known to be
    finite. With ``nll_weight`` None (explicit mode) mean/std get no gradient through ``y`` (they stay inputs of
    its autograd node when it has one, so DDP's ``find_unused_parameters`` counts them as used); otherwise
    (implicit mode) the backward of ``y`` gives them ``nll_weight * dNLL``.
    """
    return train_forward_param(x, mean, std, "std", 0.0, weight, bias, nll_weight)


def train_forward_param(x: Tensor, mean: Tensor, raw_std: Tensor, std_param: str, eps: float, weight: Tensor | None,
                        bias: Tensor | None, nll_weight):
    """:func:`train_forward` with sigma given by its parameter, as in :func:`eval_forward_param`: on the native
    CPU path the parametrization's gradient is part of the layer's one autograd node."""
    if nll_weight is None and not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        mean, raw_std = mean.detach(), raw_std.detach()  # explicit mode, nothing else to differentiate: no graph
    eager = not torch.compiler.is_compiling() and not _transformed(x)
    kernels = _fused.path(x) if eager else "eager"
    if kernels == "native":  # one C++ autograd node for numeric NLL weights
        weight_nll = _number(nll_weight)
        out = None if weight_nll is False else _fused.native_train(
            x, mean, raw_std, _STD_KINDS[std_param], eps, weight, bias, weight_nll)
        if out:
            return tuple(out)
    std = _std(raw_std, std_param, eps)
    if not eager:
        return _BatchlessTrain.apply(x, mean, std, weight, bias, nll_weight)[:4]
    side = []
    y = _BatchlessTrainEager.apply(x, mean, std, weight, bias, nll_weight, side, kernels)
    return y, *side


_STD_KINDS = {"std": 0, "log": 1, "abs": 2, "inv": 3}  # the native kernels' codes (StdKind in the C++ source)


def _std(raw_std: Tensor, std_param: str, eps: float) -> Tensor:
    return raw_std if std_param == "std" else std_from_param(raw_std, std_param, eps)


def _number(nll_weight) -> float | None | bool:
    """An NLL weight as a float (None stays None), or False for weights read at backward time (tensors,
    GradScalers)."""
    if nll_weight is None or type(nll_weight) is float:
        return nll_weight
    if isinstance(nll_weight, tuple) and all(isinstance(w, numbers.Real) for w in nll_weight):
        return float(math.prod(nll_weight))
    return False
