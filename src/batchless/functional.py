r"""The maths of Batchless Normalization as pure tensor functions, and the routes that run it.

Every channel ``c`` has a learnable Gaussian :math:`\mathcal{N}(\mu_c, \sigma_c^2)`; the output is
:math:`y = (x - \mu) / \sigma \cdot \gamma + \beta` in training and evaluation alike, and
:math:`\mu, \sigma` are trained by the negative log likelihood of the layer's input, a mean over
all its elements, gauged to be ~0 when the input really is :math:`\mathcal{N}(\mu, \sigma^2)`:

.. math::  \mathrm{NLL} = \operatorname{mean}\big[\log\sigma_c + \tfrac12 \hat x^2\big]
           - \operatorname{sg}\big[\operatorname{mean}_c \log\sigma_c + \tfrac12\big],
           \qquad \hat x = (x - \mu_c) / \sigma_c

The output treats :math:`\mu, \sigma` as constants, the NLL treats ``x`` as one, so the NLL needs
only two per-channel moments of the input, ``a = mean_c(x_hat)`` and ``b = mean_c(x_hat ** 2)``:
``dNLL/dmu_c = -a_c / (C sigma_c)``, ``dNLL/dsigma_c = (1 - b_c) / (C sigma_c)``. A layer stores
sigma as a raw parameter ``r`` behind a gain ``g`` (its ``std_speed``): :math:`\sigma = f(g\,r)`,
``f`` a parametrization of :func:`std_from_param`, so ``dNLL/dr = g f'(g r) dNLL/dsigma``; and mu
as ``m`` behind its own gain ``h`` (``mean_speed``): :math:`\mu = h\,m`, ``dNLL/dm = h dNLL/dmu``
(:func:`mean_from_param`).

Each formula exists once, here: :func:`affine_forward`, :func:`affine_backward`
(:func:`output_grads`), :func:`nll_grads`, :func:`std_from_param` (inverse: :func:`param_from_std`),
:func:`mean_from_param` (inverse: :func:`param_from_mean`);
the routes of :mod:`batchless.fused` run them, or kernels tested against them. Statistics are
computed in float32 (float64 for float64 inputs); outputs come back in the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _compat
from . import fused as _fused
from ._state import STATE
from .errors import BatchlessError
from .fused import Route
from .weighting import as_number, resolve_weight

STD_PARAMS = ("log", "abs", "inv")  # a layer's choices; the functions here also take "std"
# std_param -> (sigma from s = gain * raw, s from sigma)
_PARAMETRIZATIONS = {
    "std": (lambda s, eps: s, lambda std, eps: std),
    "log": (lambda s, eps: s.exp(), lambda std, eps: std.log()),
    "abs": (lambda s, eps: s.abs() + eps, lambda std, eps: (std - eps).clamp_min(0.0)),
    "inv": (lambda s, eps: (s.abs() + eps).reciprocal(),
            lambda std, eps: (std.reciprocal() - eps).clamp_min(0.0)),
}


class TrainOutput(NamedTuple):
    """A training forward's results."""

    y: Tensor  #: the output, in the input's dtype and memory format
    a: Tensor  #: (C,) mean of x_hat per channel (float32, or float64)
    b: Tensor  #: (C,) mean of x_hat ** 2 per channel
    finite: Tensor | None  #: (C,) False where the input held NaN/Inf (a=0, b=1); None: all finite


class Factors(NamedTuple):
    """Dense (C,) per-channel vectors in the compute dtype."""

    mean: Tensor
    inv: Tensor  #: 1 / std
    scale: Tensor  #: weight / std (``inv`` without weight)


def _parametrization(std_param: str) -> tuple:
    if std_param not in _PARAMETRIZATIONS:
        raise BatchlessError(f"std_param must be one of {tuple(_PARAMETRIZATIONS)}, got "
                             f"{std_param!r}")
    return _PARAMETRIZATIONS[std_param]


def std_from_param(raw: Tensor, std_param: str, eps: float, gain: float) -> Tensor:
    """sigma as a differentiable function of the raw parameter ``raw``, through ``s = gain * raw``.

    ``"log"``: ``exp(s)``; ``"abs"``: ``|s| + eps``; ``"inv"``: ``s`` stores ``1/sigma``, so
    ``1 / (|s| + eps)``; ``"std"``: ``s`` is sigma. ``gain`` (> 0) is a layer's ``std_speed``.
    """
    return _parametrization(std_param)[0](raw if gain == 1.0 else raw * gain, eps)


def mean_from_param(raw: Tensor, gain: float) -> Tensor:
    """mu as a differentiable function of the raw parameter ``raw``: ``gain * raw`` (``gain`` > 0,
    a layer's ``mean_speed``; ``raw`` itself at 1)."""
    return raw if gain == 1.0 else raw * gain


def param_from_mean(mean: Tensor, gain: float) -> Tensor:
    """The raw parameter whose :func:`mean_from_param` is ``mean``, up to float rounding."""
    return mean / gain


def param_from_std(std: Tensor, std_param: str, eps: float, gain: float) -> Tensor:
    """The raw parameter whose :func:`std_from_param` is ``std`` (clamped where ``eps`` makes it
    unreachable), up to float rounding."""
    s = _parametrization(std_param)[1](torch.as_tensor(std), eps)
    return s if gain == 1.0 else s / gain


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of statistics for input ``x``: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # (.to costs a dispatcher trip even as a no-op)


def channel_view(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a (C,) vector over ``x`` (N, C, *)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def channel_dims(x: Tensor) -> list[int]:
    """The dimensions of ``x`` (N, C, *) that a per-channel reduction sums over."""
    return [0, *range(2, x.dim())]


def scale_of(inv: Tensor, weight: Tensor | None) -> Tensor:
    """The per-channel factor ``weight / std`` from ``inv = 1 / std`` (``inv`` without weight)."""
    return inv if weight is None else _cast(weight, inv.dtype) * inv


def factors(mean: Tensor, std: Tensor, weight: Tensor | None, x: Tensor) -> Factors:
    """The (C,) factors of ``x``'s forward, ``mean`` and ``std`` as constants. A shared (1,)
    Gaussian is expanded *and copied*: with an expanded (stride 0) mean, CPU batch-norm kernels read
    garbage for (N, C) inputs."""
    cd, c = compute_dtype(x), x.shape[1]
    mean, std = _cast(mean.detach(), cd).reshape(-1), _cast(std.detach(), cd).reshape(-1)
    if mean.numel() != c:
        mean, std = mean.expand(c).contiguous(), std.expand(c).contiguous()
    inv = std.reciprocal()
    return Factors(mean, inv, scale_of(inv, weight))


def affine_forward(x: Tensor, mean: Tensor, inv: Tensor, scale: Tensor, bias: Tensor | None):
    """``(y, a, b)`` of a training forward: ``y = (x - mean) * scale + bias`` in x's dtype, ``a``
    and ``b`` the per-channel means of ``x_hat = (x - mean) * inv`` and ``x_hat ** 2`` in the
    compute dtype of the (C,) vectors (an empty batch: a = 0, b = 1, so NLL and gradients 0)."""
    view, dims = channel_view(x), channel_dims(x)
    xf = x.to(inv.dtype)
    shift = -mean * scale if bias is None else bias.to(inv.dtype) - mean * scale
    y = (xf * scale.reshape(view) + shift.reshape(view)).to(x.dtype)
    if x.numel() == 0:
        return y, torch.zeros_like(inv), torch.ones_like(inv)
    x_hat = (xf - mean.reshape(view)) * inv.reshape(view)
    return y, x_hat.mean(dims), x_hat.square().mean(dims)


def affine_backward(gy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, scale: Tensor):
    """``(gx, gweight, gbias)`` of ``y = (x - mean) * scale + bias``: ``gy * scale``,
    ``sum(gy * x_hat)`` and ``sum(gy)`` per channel (the last two in the compute dtype)."""
    view, dims = channel_view(x), channel_dims(x)
    g = gy.to(inv.dtype)
    x_hat = (x.to(inv.dtype) - mean.reshape(view)) * inv.reshape(view)
    return (g * scale.reshape(view)).to(gy.dtype), (g * x_hat).sum(dims), g.sum(dims)


def output_grads(gy: Tensor, x: Tensor, mean: Tensor, inv: Tensor, weight: Tensor | None):
    """:func:`affine_backward` with ``scale = weight * inv``: every route's backward where it
    records a graph (double backward) or gets batched gradients (the native node's from C++)."""
    return affine_backward(gy, x, mean, inv, scale_of(inv, weight))


def nll_grads(a: Tensor, b: Tensor, inv: Tensor, nll_weight, *, shared: bool):
    """``nll_weight * dNLL / d(mean, std)``: ``(-a, 1 - b) * inv / C`` per channel, summed over the
    channels for a ``shared`` Gaussian (then of shape (1,))."""
    k = inv * (nll_weight / a.numel())
    gmean, gstd = torch.mul(a, k).neg_(), torch.addcmul(k, b, k, value=-1.0)
    return (gmean.sum(0, keepdim=True), gstd.sum(0, keepdim=True)) if shared else (gmean, gstd)


def nll_from_moments(mean: Tensor, std: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The gauged layer NLL as a differentiable function of ``mean`` and ``std`` (x constant), from
    the moments ``a``, ``b`` of x_hat at ``mean0, std0 = mean.detach(), std.detach()``: the mean
    squared deviation from ``mean`` is ``std0**2 * b + 2 * d * std0 * a + d**2`` (``d = mean0 -
    mean``) exactly, so value, gradient and curvature are the NLL's own."""
    mean0, std0 = mean.detach(), std.detach()
    d = mean0 - mean
    sq = std0 * std0 * b + 2.0 * d * std0 * a + d * d
    per_channel = std.log() + 0.5 * sq / (std * std)
    gauge = (std0.log().expand_as(per_channel).mean() + 0.5).detach()
    return per_channel.mean() - gauge


def gauged_nll(b: Tensor) -> Tensor:
    """The gauged NLL's value from the second moments ``b``: ``0.5 * (mean(b) - 1)``."""
    return 0.5 * (b.mean() - 1.0)


def _ones_as(t: Tensor) -> Tensor:
    """A plain (C,) tensor of ones like ``t`` (never batched), cached per C, dtype and device."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # (an inference tensor
        return torch.ones_like(t)                                            # would break autograd)
    key = (t.shape[0], t.dtype, t.device)
    ones = STATE.ones.get(key)
    if ones is None:
        ones = STATE.ones[key] = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
    return ones


def affine(x: Tensor, mean: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``(x - mean) * scale + bias`` per channel, in x's dtype and memory format, by one ATen op."""
    bias = None if bias is None else _cast(bias, scale.dtype)
    if x.dim() == 2 and x.dtype == scale.dtype:  # (N, C): addcmul costs less than batch_norm
        shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias, mean, scale,
                                                                           value=-1.0)
        return torch.addcmul(shift, x, scale)
    # an eval-mode batch norm with running_var 1 and eps 0 computes exactly this
    return torch.batch_norm(x, scale, bias, mean, _ones_as(scale), False, 0.0, 0.0,
                            torch.backends.cudnn.enabled)


_ROWS_MIN_NUMEL = 16384  # from here on, CPU row sums beat ATen's statistics kernel
_SHIFT_MIN_N = 65536  # elements per channel from which that kernel's float32 sums need centring


def channel_moments(x: Tensor, mean: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``a = mean(x_hat)`` and ``b = mean(x_hat ** 2)`` of ``x_hat = (x - mean) * inv``
    from x's channel mean and variance: ATen's one-pass statistics kernel, or on CPU for large
    contiguous (N, C, *) inputs, where it is slow, float32 row sums and 2-norms added in float64
    (b then loses ~1e-7 * (mean_x / std_x)**2 relative precision). Half-precision inputs, and large
    float32 channels on CPU, are centred on ``mean`` first: the kernel rounds half-precision
    statistics, and its float32 sums lose a badly centred channel's mean. Empty: a = 0, b = 1."""
    cd = compute_dtype(x)
    n = x.numel() // x.shape[1]
    if n == 0:
        return torch.zeros_like(inv), torch.ones_like(inv)
    on_cpu = x.device.type == "cpu"
    by_rows = x.dim() > 2 and x.numel() >= _ROWS_MIN_NUMEL and x.is_contiguous() and on_cpu
    centre = not by_rows and (x.dtype in (torch.bfloat16, torch.float16) or (
        on_cpu and n >= _SHIFT_MIN_N and x.dtype == torch.float32))
    if centre:
        x = x - _cast(mean, cd).reshape(channel_view(x))  # (half precision x: in float32)
    if by_rows:
        rows = x.view(x.shape[0], x.shape[1], -1)
        m = rows.sum(-1, dtype=cd).sum(0, dtype=torch.float64) / n
        sq = torch.linalg.vector_norm(rows, dim=-1, dtype=cd).double().square().sum(0) / n
        m, var = m.to(cd), (sq - m * m).to(cd).clamp_min(0.0)
    else:
        m, var = (_cast(t, cd) for t in _compat.batch_norm_stats(x))
    a = m * inv if centre else (m - mean) * inv
    return a, torch.addcmul(a * a, var, inv * inv)  # b = (var + (m - mean)**2) / std**2


def _output_grads(route: Route, gy: Tensor, x: Tensor, f: Factors, weight: Tensor | None, needs):
    """The output's gradients for ``needs = (x, weight, bias)``: the formula's ops on the traceable
    route, where a graph is recorded, for an empty batch (ATen's kernel divides by N) and batched
    gradients (it has no vmap rule); the compiled kernels where x, weight and bias all need
    gradients and gy shares x's canonical layout and dtype; else ``gy * scale`` and the sums of
    ATen's batch-norm backward."""
    if (route is Route.TRACEABLE or torch.is_grad_enabled() or x.numel() == 0
            or _compat.transformed(gy)):
        return output_grads(gy, x, f.mean, f.inv, weight)
    if route is Route.COMPILED and all(needs) and gy.dtype == x.dtype:
        gv, xv = _fused.canonical(gy), _fused.canonical(x)
        if gv is not None and xv is not None and gv.shape == xv.shape:
            gx, gw, gb = _fused.compiled(affine_backward, gv, xv, f.mean, f.inv, f.scale)
            return _fused.uncanonical(gx, x), gw, gb
    need_x, need_weight, need_bias = needs
    # (in bfloat16/float16 the factor is rounded to gy's dtype: <= 2**-8 relative error in gx)
    gx = gy * _cast(f.scale, gy.dtype).reshape(channel_view(x)) if need_x else None
    if not (need_weight or need_bias):
        return gx, None, None
    w = None if weight is None else _cast(weight, f.inv.dtype)
    return gx, *_compat.batch_norm_sums(gy, x, w, f.mean, f.inv, need_weight, need_bias)


def _step_forward(route: Route, x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None,
                  bias: Tensor | None) -> tuple[TrainOutput, Factors]:
    """The forward of a Python route, mean/std constants. A channel whose input held NaN/Inf adds
    no NLL (a = 0, b = 1); on CPU outside transforms one host read tells that all are finite."""
    with _compat.autocast_off(x):
        f = factors(mean, std, weight, x)
        if route is Route.EAGER:
            y, (a, b) = affine(x, f.mean, f.scale, bias), channel_moments(x, f.mean, f.inv)
        elif route is Route.COMPILED:
            y, a, b = _fused.compiled(affine_forward, _fused.canonical(x), *f, bias)
            y = _fused.uncanonical(y, x)
        else:
            y, a, b = affine_forward(x, *f, bias)
    if route is not Route.TRACEABLE and x.is_cpu and math.isfinite(b.sum().item()):
        return TrainOutput(y, a, b, None), f
    finite = torch.isfinite(b)  # (b is non-finite wherever a is)
    return TrainOutput(y, a.where(finite, 0.0), b.where(finite, 1.0), finite), f


def _step_backward(ctx, route: Route, gy: Tensor | None, x: Tensor, weight: Tensor | None,
                   f: Factors, moments: tuple[Tensor, Tensor]):
    """Gradients for ``(x, mean, std, weight, bias)``: the output's (mean/std constants) by the
    route's kernels, ``ctx.nll_weight * dNLL`` for mean and std (none when it is None: explicit
    mode; a constant in double backward)."""
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5])  # x, weight, bias
    gx = gw = gb = gmean = gstd = None
    if gy is not None:  # (None: the output is unused; only the NLL gradient remains)
        out = _output_grads(route, gy, x, f, weight, needs)
        gx, gw, gb = (g if need else None for g, need in zip(out, needs, strict=True))
        if weight is not None and weight.dtype != f.inv.dtype:
            gw, gb = (None if g is None else g.to(weight.dtype) for g in (gw, gb))
    if ctx.nll_weight is not None:
        gmean, gstd = nll_grads(*moments, f.inv, resolve_weight(ctx.nll_weight), shared=ctx.shared)
    return gx, gmean, gstd, gw, gb


class _Train(torch.autograd.Function):
    """The eager and compiled routes' training step (the classic style, whose ``apply`` costs less
    than setup_context's): ``(y, a, b, finite)``; gradients by :func:`_step_backward`."""

    @staticmethod
    def forward(ctx, x, mean, std, weight, bias, nll_weight, route):
        out, f = _step_forward(route, x, mean, std, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.factors, ctx.moments, ctx.route = f, (out.a, out.b), route  # (intermediates)
        ctx.nll_weight, ctx.shared = nll_weight, mean.numel() != x.shape[1]
        ctx.mark_non_differentiable(*(t for t in out[1:] if t is not None))
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, gy, *_):
        x, weight = ctx.saved_tensors
        return *_step_backward(ctx, ctx.route, gy, x, weight, ctx.factors, ctx.moments), None, None


class _TrainTraceable(torch.autograd.Function):
    """The same step for torch.compile and torch.func (setup_context style, vmap rule generated:
    per-sample gradients), the formula as plain ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mean, std, weight, bias, nll_weight):
        return tuple(_step_forward(Route.TRACEABLE, x, mean, std, weight, bias)[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, std, weight, _, nll_weight = inputs
        _, a, b, finite = output
        ctx.save_for_backward(x, mean, std, weight, a, b)
        ctx.nll_weight, ctx.shared = nll_weight, mean.numel() != x.shape[1]
        ctx.mark_non_differentiable(a, b, finite)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy, *_):
        x, mean, std, weight, a, b = ctx.saved_tensors
        f = factors(mean, std, weight, x)
        return *_step_backward(ctx, Route.TRACEABLE, gy, x, weight, f, (a, b)), None


class _ImplicitNll(torch.autograd.Function):
    """``y`` unchanged; its backward also gives mean and std ``nll_weight * dNLL``, the weight read
    then (a tensor, a GradScaler's scale). Follows the native node, which has no such weights."""

    @staticmethod
    def forward(ctx, y, mean, std, a, b, nll_weight):
        ctx.inv = factors(mean, std, None, y).inv
        ctx.moments, ctx.nll_weight, ctx.shared = (a, b), nll_weight, mean.numel() != y.shape[1]
        ctx.set_materialize_grads(False)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        weight = resolve_weight(ctx.nll_weight)
        gmean, gstd = nll_grads(*ctx.moments, ctx.inv, weight, shared=ctx.shared)
        return gy, gmean, gstd, None, None, None


def _train_native(x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight, bias,
                  nll_weight) -> TrainOutput:
    number = as_number(nll_weight)
    if nll_weight is None or number is not None:
        return TrainOutput._make(_fused.native_kernels().train(
            x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight, bias, number))
    # a weight read at backward time (a tensor, a GradScaler): _ImplicitNll delivers the NLL
    out = _train_native(x, raw_mean.detach(), raw_std.detach(), std_param, eps, gain, mean_gain,
                        weight, bias, None)
    mean, std = mean_from_param(raw_mean, mean_gain), std_from_param(raw_std, std_param, eps, gain)
    return out._replace(y=_ImplicitNll.apply(out.y, mean, std, out.a, out.b, nll_weight))


def _train_python(route: Route, x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight,
                  bias, nll_weight) -> TrainOutput:
    mean, std = mean_from_param(raw_mean, mean_gain), std_from_param(raw_std, std_param, eps, gain)
    if route is Route.TRACEABLE:
        return TrainOutput(*_TrainTraceable.apply(x, mean, std, weight, bias, nll_weight))
    return TrainOutput(*_Train.apply(x, mean, std, weight, bias, nll_weight, route))


def _eval_native(x, raw_mean, raw_std, *args) -> Tensor:
    """The native node without an NLL (mean and std constants): frozen-statistics fine-tuning."""
    return _train_native(x, raw_mean.detach(), raw_std.detach(), *args, None).y


def _eval_python(x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight, bias) -> Tensor:
    with _compat.autocast_off(x):
        mean = mean_from_param(raw_mean, mean_gain)
        f = factors(mean, std_from_param(raw_std, std_param, eps, gain), weight, x)
        return affine(x, f.mean, f.scale, bias)


# Each route's step, by one lookup: on the native route, comparing Route members in turn costs
# a measurable share of a small step
_TRAIN = {Route.NATIVE: _train_native, **{r: functools.partial(_train_python, r)
                                          for r in (Route.COMPILED, Route.EAGER, Route.TRACEABLE)}}
_EVAL = {Route.NATIVE: _eval_native, Route.NATIVE_EVAL: lambda *a: _fused.native_kernels().eval(*a),
         Route.EAGER: _eval_python, Route.TRACEABLE: _eval_python}


def _run(table: dict, route: Route, *args):
    """``table[route](*args)``, inside ``record_function("batchless::<route>")`` when a profiler
    records (outside torch.compile and torch.func: the traceable route)."""
    if route is not Route.TRACEABLE and _compat.profiling():
        with torch.profiler.record_function(f"batchless::{route.value}"):
            return table[route](*args)
    return table[route](*args)


def eval_forward(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None,
                 bias: Tensor | None) -> Tensor:
    """Batchless normalisation of ``x`` (N, C, *) in evaluation, with per-channel (C,) or shared
    (1,) ``mean``/``std``: the affine map ``(x - mean) / std * weight + bias`` of an eval-mode
    BatchNorm, differentiable in x, weight and bias (mean and std constants)."""
    return eval_forward_param(x, mean, std, "std", 0.0, 1.0, weight, bias)


def eval_forward_param(x: Tensor, raw_mean: Tensor, raw_std: Tensor, std_param: str, eps: float,
                       gain: float, weight: Tensor | None, bias: Tensor | None, *,
                       mean_gain: float = 1.0) -> Tensor:
    """:func:`eval_forward` with sigma ``std_from_param(raw_std, std_param, eps, gain)`` and mu
    ``mean_from_param(raw_mean, mean_gain)``."""
    route = _fused.choose_route(x, raw_mean, raw_std, weight, bias, training=False)
    return _run(_EVAL, route, x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight, bias)


def train_forward(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None,
                  nll_weight) -> TrainOutput:
    """Batchless normalisation of ``x`` in training: a :class:`TrainOutput` ``(y, a, b, finite)``.

    ``y`` is :func:`eval_forward`'s output; ``a``, ``b`` the moments that give the gauged NLL
    (:func:`gauged_nll`; :func:`nll_from_moments` differentiable in mean/std); channels whose input
    held NaN/Inf add nothing to it. With ``nll_weight`` None (explicit mode) mean/std get no
    gradient through ``y`` (yet stay inputs of its autograd node: DDP's ``find_unused_parameters``
    counts them as used); else (implicit mode: a number, tensor, GradScaler or tuple of these) the
    backward of ``y`` gives them ``nll_weight * dNLL``.

    Example::

        >>> import torch, batchless.functional as BF
        >>> x, mean, std = torch.randn(8, 3) * 2 + 1, torch.zeros(3), torch.ones(3)
        >>> out = BF.train_forward(x, mean, std, None, None, nll_weight=None)
        >>> torch.allclose(out.y, x), BF.gauged_nll(out.b) > 0  # x is not N(0, 1)
        (True, tensor(True))
    """
    return train_forward_param(x, mean, std, "std", 0.0, 1.0, weight, bias, nll_weight)


def train_forward_param(x: Tensor, raw_mean: Tensor, raw_std: Tensor, std_param: str, eps: float,
                        gain: float, weight: Tensor | None, bias: Tensor | None, nll_weight, *,
                        mean_gain: float = 1.0) -> TrainOutput:
    """:func:`train_forward` with mu and sigma given by their parameters, as in
    :func:`eval_forward_param` (on the native route the parametrizations' gradients are part of the
    layer's one node)."""
    if nll_weight is None and not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raw_mean, raw_std = raw_mean.detach(), raw_std.detach()  # nothing to differentiate
    route = _fused.choose_route(x, raw_mean, raw_std, weight, bias, training=True)
    return _run(_TRAIN, route, x, raw_mean, raw_std, std_param, eps, gain, mean_gain, weight, bias,
                nll_weight)
