"""The fused (compiled) training kernels: same results as the formula, layouts kept, a clean fallback.

CUDA takes this path by default; the tests force it with ``set_fused("always")``, so that on CPU the same
graphs compile with Inductor's C++ backend (CUDA: Triton, where a device is present).
"""

import pytest
import torch

import batchless as bl
from batchless import fused
from reference import naive_forward


@pytest.fixture
def fused_runs(monkeypatch):
    """Force the fused path and count the fused calls that ran (None results: the eager path took over)."""
    monkeypatch.setattr(fused, "_mode", "always")
    monkeypatch.setattr(fused, "_failed", False)
    calls = []
    run = fused._run

    def counting(fn, x, *args):
        out = run(fn, x, *args)
        calls.append((fn.__name__, out is not None))
        return out

    monkeypatch.setattr(fused, "_run", counting)
    return calls


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def make_layer(shape, affine=True, shared=False, device="cpu"):
    torch.manual_seed(0)
    cls = {2: bl.BatchlessNorm1d, 3: bl.BatchlessNorm1d, 4: bl.BatchlessNorm2d, 5: bl.BatchlessNorm3d}[len(shape)]
    layer = cls(shape[1], affine=affine, shared=shared, device=device)
    with torch.no_grad():
        layer.mean.uniform_(-1, 1)
        layer.set_std(torch.rand_like(layer.mean) + 0.5)
        if affine:
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    return layer


CASES = [  # (shape, dtype, memory format, affine, shared)
    ((4, 6, 5, 7), torch.float32, torch.contiguous_format, True, False),
    ((4, 6, 5, 7), torch.float32, torch.channels_last, True, False),
    ((1, 6, 3, 4, 5), torch.float32, torch.channels_last_3d, True, True),
    ((16, 6), torch.float32, torch.contiguous_format, False, False),
    ((3, 6, 9), torch.bfloat16, torch.contiguous_format, True, False),
    ((16, 6), torch.bfloat16, torch.contiguous_format, True, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dtype, fmt, affine, shared", CASES)
def test_fused_matches_naive_formula(fused_runs, shape, dtype, fmt, affine, shared, device):
    layer = make_layer(shape, affine, shared, device)
    x = (torch.randn(shape) * 2 + 1).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape).to(device, dtype).contiguous(memory_format=fmt)
    y = layer(x)
    got = torch.autograd.grad(y, [x, *layer.parameters()], g)
    # the forward always fuses; the backward does when x, weight and bias all need gradients
    assert fused_runs == [("_forward_maths", True)] + [("_backward_maths", True)] * affine
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)

    inputs = [x.detach().double().requires_grad_()] + [p.detach().double().requires_grad_()
                                                       for p in layer.parameters()]
    y_ref, nll_ref = naive_forward(*inputs[:3], *(inputs[3:] if affine else (None, None)), "log", layer.eps)
    want = torch.autograd.grad((y_ref * g.double()).sum() + nll_ref, inputs)
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(bl.nll_loss(layer).double(), nll_ref.detach(), rtol=tol, atol=tol)
    for name, a, b in zip(["x", "mean", "raw_std", "weight", "bias"], got, want, strict=False):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


def test_fused_backward_falls_back_for_another_gradient_layout(fused_runs):
    layer = make_layer((4, 6, 5, 7))
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    got = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])  # an expanded (stride 0) gradient
    assert fused_runs == [("_forward_maths", True)]
    fused.set_fused("never")
    want = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_compiler_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(fused, "_mode", "always")
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_compiled", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    layer = make_layer((4, 6, 5, 7))
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    with pytest.warns(UserWarning, match="fused training kernels failed to compile or run .*no C\\+\\+ compiler found"):
        y = layer(x)
    assert not fused.usable(x)
    monkeypatch.setattr(fused, "_mode", "never")
    torch.testing.assert_close(y, layer(x))


def test_set_fused_checks_and_returns_previous(monkeypatch):
    monkeypatch.setattr(fused, "_mode", "auto")
    assert fused.set_fused("never") == "auto"
    assert fused.set_fused("auto") == "never"
    with pytest.raises(bl.BatchlessError, match=r"one of \('auto', 'always', 'never'\), got 'on'"):
        fused.set_fused("on")


def test_where_the_fused_path_applies(monkeypatch):
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_mode", "auto")
    assert not fused.usable(torch.ones(2, 3))  # auto: CUDA only
    if torch.cuda.is_available():
        assert fused.usable(torch.ones(2, 3, device="cuda"))
    monkeypatch.setattr(fused, "_mode", "always")
    assert fused.usable(torch.ones(2, 3))
    assert not fused.usable(torch.ones(2, 3, dtype=torch.float64))  # gradcheck precision: eager
    assert not fused.usable(torch.ones(0, 3))
