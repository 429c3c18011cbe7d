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

import torch
import torch.nn.functional as F
from torch import Tensor

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
    return torch.promote_types(x.dtype, torch.float32)


def _dense_stats(mean: Tensor, std: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(C,) float32/64 mean and std; a shared (1,) Gaussian is expanded *and copied*: with an expanded
    (stride 0) running_mean, CPU batch_norm_backward reads garbage for (N, C) inputs."""
    cd, c = _compute_dtype(x), x.shape[1]
    mean, std = mean.detach().to(cd), std.detach().to(cd)
    if mean.shape[0] != c:
        mean, std = mean.expand(c).contiguous(), std.expand(c).contiguous()
    return mean, std


def _affine(x: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) / std * weight + bias`` per channel, in x's dtype, by the fastest native kernel."""
    if x.dim() == 2 and x.dtype == mean.dtype:  # (N, C): one addcmul beats batch_norm's setup by 5x
        scale = std.reciprocal() if weight is None else weight / std
        shift = -mean * scale if bias is None else bias - mean * scale
        return torch.addcmul(shift, x, scale)
    cd = mean.dtype
    return F.batch_norm(x, mean, std * std, None if weight is None else weight.to(cd),
                        None if bias is None else bias.to(cd), False, 0.0, 0.0)


def channel_moments(x: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``a = mean(x_hat)`` and ``b = mean(x_hat ** 2)`` of ``x_hat = (x - mean) / std``.

    One read of ``x`` and no activation-sized temporary (on this project's CPUs a fresh activation-sized
    buffer costs more than the arithmetic). For (N, C), channels-last and bfloat16 inputs PyTorch's
    batch-norm statistics kernel gives the channel mean and (centred, stable) variance (for bfloat16
    accumulated in float32, returned rounded to bfloat16, like the input itself). For other contiguous
    (N, C, *) inputs, where that kernel is 7x slower, float32 row sums and row 2-norms of the (N, C, rest)
    view are combined in float64; the raw second moment then loses ~1e-7 * (mean_x / std_x)**2 in relative
    precision, negligible for the NLL unless a channel's mean exceeds ~1000 of its standard deviations.
    An empty batch has no evidence: a = 0, b = 1, so its NLL and gradients are 0.
    """
    cd = _compute_dtype(x)
    n = x.numel() // x.shape[1]
    if n == 0:
        return torch.zeros_like(std), torch.ones_like(std)
    if x.dim() > 2 and x.is_contiguous() and x.dtype != torch.bfloat16:
        rows = x.view(x.shape[0], x.shape[1], -1)
        m = rows.sum(-1, dtype=cd).sum(0, dtype=torch.float64) / n
        var = torch.linalg.vector_norm(rows, dim=-1, dtype=cd).double().square().sum(0) / n - m * m
        m, var = m.to(cd), var.to(cd).clamp_min(0.0)
    elif torch.compiler.is_compiling():  # the native statistics op has no fake-tensor kernel; compilers fuse this
        var, m = torch.var_mean(x.to(cd), [0, *range(2, x.dim())], correction=0)
    else:
        m, var = (t.to(cd) for t in torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0))
    inv = std.reciprocal()
    a = (m - mean) * inv
    return a, torch.addcmul(a * a, var, inv * inv)  # b = (var + (m - mean)**2) / std**2


class _BatchlessTrain(torch.autograd.Function):
    """Training forward: the output, the per-channel moments (a, b) of x_hat and which channels were finite.

    The output and the gradients for x, weight and bias are those of an eval-mode batch norm with
    ``running_mean = mean`` and ``running_var = std**2`` (eps 0), so PyTorch's native fused kernels do
    them; mean/std are constants in this path. When ``nll_weight`` is not None (implicit mode) backward
    also gives mean/std ``nll_weight * dNLL``; otherwise mean/std get no gradient here.
    A channel whose input holds NaN/Inf contributes no NLL (a = 0, b = 1): one bad batch cannot destroy
    the learned statistics.
    """

    generate_vmap_rule = True  # per-sample gradients with torch.func (the layer is per-instance)

    @staticmethod
    def forward(x, mean, std, weight, bias, nll_weight):
        with torch.autocast(x.device.type, enabled=False):
            mean_c, std_c = _dense_stats(mean, std, x)
            y = _affine(x, mean_c, std_c, weight, bias)
            a, b = channel_moments(x, mean_c, std_c)
            finite = torch.isfinite(a + b)
            a, b = a.where(finite, 0.0), b.where(finite, 1.0)
        return y, a, b, finite, mean_c, std_c

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, _, weight, _, nll_weight = inputs
        _, a, b, finite, mean_c, std_c = output
        ctx.save_for_backward(x, mean_c, std_c, weight, a, b)
        ctx.shared = mean.shape[0] != x.shape[1]
        ctx.nll_weight = nll_weight
        ctx.mark_non_differentiable(a, b, finite, mean_c, std_c)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the five non-differentiable outputs

    @staticmethod
    def backward(ctx, gy, *_):
        x, mean_c, std_c, weight, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = None if weight is None else weight.to(std_c.dtype)
        vmapped = (gy is not None and not torch.compiler.is_compiling()
                   and torch._C._functorch.is_functorch_wrapped_tensor(gy))
        if gy is None:  # the output itself is unused: only the NLL gradient (below) remains
            gx = gw = gb = None
        elif x.numel() == 0 or vmapped:
            # The native CPU kernel divides by N (SIGFPE on an empty batch) and its vmap rule asserts
            # in eval mode: spell the same gradients out.
            view = (1, -1) + (1,) * (x.dim() - 2)
            dims = [0, *range(2, x.dim())]
            scale = std_c.reciprocal() if w is None else w / std_c
            gx = gy * scale.reshape(view)
            gw = None if w is None else (gy * (x - mean_c.reshape(view))).sum(dims) / std_c
            gb = None if w is None else gy.sum(dims)
        else:
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy, x, w, mean_c, std_c * std_c, None, None, False, 0.0, [need[0], need[3], need[4]]
            )
        if weight is not None:
            gw, gb = (None if g is None else g.to(weight.dtype) for g in (gw, gb))
        gmean = gstd = None
        if ctx.nll_weight is not None:
            k = resolve_weight(ctx.nll_weight) / (a.numel() * std_c)
            gmean, gstd = -a * k, (1.0 - b) * k
            if ctx.shared:
                gmean, gstd = gmean.sum(0, keepdim=True), gstd.sum(0, keepdim=True)
        return gx, gmean, gstd, gw, gb, None


class _BatchlessTrainEager(torch.autograd.Function):
    """The same Function in the classic style: ``apply`` of a setup_context-style Function binds its
    arguments with ``inspect`` on every call (~50 us, more than the whole layer on small inputs), so eager
    code uses this one and torch.func transforms the one above."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _BatchlessTrain.forward(*inputs)
        _BatchlessTrain.setup_context(ctx, inputs, output)
        return output

    backward = _BatchlessTrain.backward


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


def gauged_nll(a: Tensor, b: Tensor) -> Tensor:
    """The gauged NLL's value from the moments alone: ``0.5 * (mean(b) - 1)`` (0 when x ~ N(mu, sigma^2))."""
    return 0.5 * (b.mean() - 1.0)


def batchless_norm(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    nll_weight=None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batchless normalisation of ``x`` (N, C, *) with per-channel (C,) or shared (1,) ``mean``/``std``.

    Returns ``(y, nll, finite)``. In evaluation (``training=False``) ``nll`` and ``finite`` are None and the
    layer is the fixed affine map of an eval-mode BatchNorm. In training, ``nll`` is the gauged layer NLL:
    differentiable in ``mean``/``std`` when ``nll_weight`` is None (explicit mode: add it to the loss),
    detached otherwise (implicit mode: the backward of ``y`` already delivers ``nll_weight * dNLL`` to
    ``mean``/``std``); ``finite`` (C,) is False for channels whose input held NaN/Inf, which add nothing
    to the NLL.
    """
    if not training:
        with torch.autocast(x.device.type, enabled=False):
            return _affine(x, *_dense_stats(mean, std, x), weight, bias), None, None
    implicit = nll_weight is not None
    transformed = not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x)
    fn = _BatchlessTrain if transformed else _BatchlessTrainEager
    y, a, b, finite, _, _ = fn.apply(x, mean if implicit else mean.detach(), std if implicit else std.detach(),
                                     weight, bias, nll_weight)
    nll = gauged_nll(a, b).detach() if implicit else nll_from_moments(mean, std, a, b)
    return y, nll, finite
