"""Probe: a per-instance radial projection of the input gradient of every batchless layer on (N, C, *)
inputs (convs). For each instance n and channel c the layer's input gradient g[n, c, :] loses its
component along x[n, c, :] (the layer's input, uncentred), so sum_p g * x = 0 per (n, c): the radial
gradient of the conv before the layer, (weight_c, bias_c) . grad, is zero, as under BatchNorm, and
nothing depends on the other instances (micro-batch accumulation stays exact). The growth loop of
EXPERIMENTS.md ("Why batchless trailed") needs that radial gradient. Dense (N, C) inputs are left as
they are (one element per (n, c): the projection would remove the whole gradient).
Runs `batchless sweep` in-process: `radial.py sweep ARGS...`."""
import sys

import torch

from batchless.modules import _BatchlessNorm


class _Radial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        along = (g * x).sum(dims, keepdim=True) / x.square().sum(dims, keepdim=True).clamp_min(1e-12)
        return g - along * x


def check() -> None:
    x, g = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 10)
    (gx,) = torch.autograd.grad(_Radial.apply(x), x, g.double())
    assert (gx * x).sum(2).abs().max() < 1e-12, "not orthogonal to x per (n, c)"
    rest = g.double() - gx
    assert torch.allclose(rest / x, (rest / x)[..., :1].expand_as(rest)), "removed more than x's direction"


_forward = _BatchlessNorm.forward


def forward(self, x):
    if self.training and x.dim() > 2 and torch.is_grad_enabled():
        x = _Radial.apply(x)
    return _forward(self, x)


if __name__ == "__main__":
    check()
    _BatchlessNorm.forward = forward
    from batchless_experiments.cli import main

    sys.exit(main(sys.argv[1:]))
