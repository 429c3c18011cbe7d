"""The fused training kernels: same results as the formula, layouts kept, a clean fallback.

Both implementations run here: the native CPU kernels (built once per machine; the tests build them where
a C++ compiler and ninja exist, and fail if that build fails), and the ``torch.compile`` ones, which CUDA
takes by default and the tests force with ``set_fused("compiled")``, so that on CPU the same graphs compile
with Inductor's C++ backend (CUDA: Triton, where a device is present).
"""

import contextlib
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import batchless as bl
from batchless import _cpu_kernels, fused
from reference import naive_forward

CAN_BUILD = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None


@pytest.fixture(scope="session")
def cpu_kernels():
    if not CAN_BUILD:
        pytest.skip("no C++ compiler or ninja: the native CPU kernels cannot be built here")
    assert fused.build_cpu_kernels(), "the native CPU kernels failed to build"
    return _cpu_kernels.load()


def _counted(calls, fn, name=None):
    """fn, recording (its direction, whether it gave a result) per call; an empty result is no result."""
    def wrapper(*args):
        out = fn(*args)
        direction = name or args[0].__name__.strip("_").split("_")[0]  # compiled: _forward_maths, ...
        calls.append((direction, out is not None and len(out) > 0))
        return out

    return wrapper


@pytest.fixture
def compiled_runs(monkeypatch):
    """Force the compiled kernels and count their calls."""
    monkeypatch.setattr(fused, "_mode", "compiled")
    monkeypatch.setattr(fused, "_failed", False)
    calls = []
    monkeypatch.setattr(fused, "_run", _counted(calls, fused._run))
    return calls


@pytest.fixture
def native_runs(monkeypatch, cpu_kernels):
    """The native kernels (what auto mode takes on CPU once they are built), their calls counted."""
    monkeypatch.setattr(fused, "_mode", "auto")
    calls = []
    counted = types.SimpleNamespace(**{name: _counted(calls, getattr(cpu_kernels, name), name)
                                       for name in ("forward", "backward", "train", "eval")})
    monkeypatch.setitem(_cpu_kernels._loaded, "module", counted)
    return calls


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
KERNELS = [("compiled", "cpu"), ("native", "cpu"), ("native-weighted", "cpu"),
           pytest.param(("compiled", "cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="no CUDA"))]


@pytest.fixture
def kernel_runs(request):
    """(the kernels' calls, device, the block to run the step in, the calls a step with affine makes) for a
    (kernels, device) parameter. "native": the one-node C++ step; "native-weighted": the native kernels
    under the Python autograd Function, which a tensor NLL weight (read at backward time) takes."""
    kernels, device = request.param
    calls = request.getfixturevalue(f"{kernels.split('-')[0]}_runs")
    if kernels == "native":
        return calls, device, contextlib.nullcontext(), lambda affine: [("train", True)]
    block = bl.nll_weight(torch.tensor(1.0)) if kernels == "native-weighted" else contextlib.nullcontext()
    return calls, device, block, lambda affine: [("forward", True)] + [("backward", True)] * affine


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


@pytest.mark.parametrize("kernel_runs", KERNELS, indirect=True, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("shape, dtype, fmt, affine, shared", CASES)
def test_fused_matches_naive_formula(kernel_runs, shape, dtype, fmt, affine, shared):
    calls, device, block, expected_calls = kernel_runs
    layer = make_layer(shape, affine, shared, device)
    x = (torch.randn(shape) * 2 + 1).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape).to(device, dtype).contiguous(memory_format=fmt)
    with block:
        y = layer(x)
        got = torch.autograd.grad(y, [x, *layer.parameters()], g)
    # the forward always fuses; the backward does when x, weight and bias all need gradients
    assert calls == expected_calls(affine)
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


@pytest.mark.parametrize("kernel_runs", KERNELS[:3], indirect=True, ids=lambda k: "-".join(k))
def test_fused_backward_takes_another_gradient_layout(kernel_runs):
    calls, _, block, expected_calls = kernel_runs
    layer = make_layer((4, 6, 5, 7))
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    with block:  # an expanded (stride 0) gradient: the Python path falls back to eager, the node copies it
        got = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    assert calls[0] in {("forward", True), ("train", True)} and ("backward", True) not in calls
    fused.set_fused("never")
    want = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture
def fresh_compiled(monkeypatch):
    """The compiled path from scratch (no failure, no compiled kernels yet); returns monkeypatch."""
    monkeypatch.setattr(fused, "_mode", "compiled")
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_compiled", {})
    return monkeypatch


def test_compiler_failure_warns_once_and_falls_back(fresh_compiled):
    monkeypatch = fresh_compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    layer = make_layer((4, 6, 5, 7))
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    with pytest.warns(UserWarning, match="fused training kernels failed to compile or run .*no C\\+\\+ compiler found"):
        y = layer(x)
    assert fused.path(x) == "eager"
    monkeypatch.setattr(fused, "_mode", "never")
    torch.testing.assert_close(y, layer(x))


def test_a_failing_backward_compilation_warns_once(fresh_compiled):
    """Graphs recorded before the failure must not try (and warn) again."""
    import warnings

    monkeypatch = fresh_compiled

    def broken(*args, **kwargs):
        raise RuntimeError("backward does not compile")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn if fn.__name__ == "_forward_maths" else broken)
    layers = [make_layer((4, 6, 5, 7)), make_layer((4, 6, 5, 7))]
    x, g = torch.randn(4, 6, 5, 7, requires_grad=True), torch.randn(4, 6, 5, 7)  # (g: both backwards try)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(layers[1](layers[0](x)), [x, layers[0].weight], g)
    assert [str(w.message).count("backward does not compile") for w in caught] == [1]
    monkeypatch.setattr(fused, "_mode", "never")
    want = torch.autograd.grad(layers[1](layers[0](x)), [x, layers[0].weight], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_one_graph_for_every_channel_count(compiled_runs):
    """dynamic=True must cover C too: a Parameter argument would pin it (a graph per width, then, past
    dynamo's recompile limit, no compilation at all)."""
    import torch._dynamo.utils as dynamo_utils

    def graphs():
        return dynamo_utils.counters["stats"]["unique_graphs"]

    layer = make_layer((8, 2, 10))
    layer(torch.randn(8, 2, 10, requires_grad=True)).sum().backward()  # C = 2, 3: dynamo specializes 0/1 only
    layer = make_layer((8, 3, 10))
    layer(torch.randn(8, 3, 10, requires_grad=True)).sum().backward()
    before = graphs()
    for c in (4, 5, 7, 9, 12):
        layer = make_layer((8, c, 10))
        layer(torch.randn(8, c, 10, requires_grad=True)).sum().backward()
    assert graphs() == before


def test_compiled_kernels_read_negative_views_as_values(compiled_runs):
    layer = make_layer((4, 3))
    x0 = torch.randn(4, 3)
    torch.testing.assert_close(layer(torch._neg_view(x0)), layer(-x0))


def test_a_device_error_is_not_taken_for_a_compiler_failure(fresh_compiled):
    monkeypatch = fresh_compiled

    def device_error(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: device_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        make_layer((4, 6, 5, 7))(torch.randn(4, 6, 5, 7, requires_grad=True))
    assert not fused._failed


def test_set_fused_checks_and_returns_previous(monkeypatch):
    monkeypatch.setattr(fused, "_mode", "auto")
    assert fused.set_fused("never") == "auto"
    assert fused.set_fused("auto") == "never"
    with pytest.raises(bl.BatchlessError, match=r"one of \('auto', 'compiled', 'never'\), got 'on'"):
        fused.set_fused("on")


def test_which_kernels_apply(monkeypatch):
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_mode", "auto")
    for built in (None, types.SimpleNamespace()):
        monkeypatch.setitem(_cpu_kernels._loaded, "module", built)
        assert fused.path(torch.ones(2, 3)) == ("eager" if built is None else "native")  # auto on CPU: once built
        assert fused.path(torch.ones(2, 3, dtype=torch.float16)) == "eager"  # no native float16
    if torch.cuda.is_available():
        assert fused.path(torch.ones(2, 3, device="cuda")) == "compiled"
    monkeypatch.setattr(fused, "_mode", "compiled")
    assert fused.path(torch.ones(2, 3)) == fused.path(torch.ones(2, 3, dtype=torch.float16)) == "compiled"
    assert fused.path(torch.ones(2, 3, dtype=torch.float64)) == "eager"  # gradcheck precision: eager
    assert fused.path(torch.ones(0, 3)) == "eager"
    monkeypatch.setattr(fused, "_mode", "never")
    assert fused.path(torch.ones(2, 3)) == "eager"


def test_native_kernels_refuse_what_they_do_not_handle(cpu_kernels):
    x, c = torch.randn(4, 6, 5), torch.ones(6)
    for unsupported in (x.double(), x.half(), x.transpose(0, 2).contiguous().transpose(0, 2), x[:0]):
        assert cpu_kernels.forward(unsupported, c, c, None, None) == []
    y, *_, inv, scale = cpu_kernels.forward(x, c, c, c, c)
    assert cpu_kernels.backward(torch.ones(1, 1, 1).expand_as(x), x, c, inv, scale) == []  # stride-0 gradient
    assert cpu_kernels.backward(x.transpose(1, 2).contiguous().transpose(1, 2), x, c, inv, scale) == []


def test_native_nonfinite_channels_add_no_nll(native_runs):
    layer = make_layer((8, 4, 3))
    x = torch.randn(8, 4, 3)
    x[2, 1, 0], x[5, 3, 1] = float("nan"), float("inf")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        layer(x)
    assert native_runs == [("train", True)]
    b_native = layer._last.b
    fused.set_fused("never")
    layer(x)
    torch.testing.assert_close(b_native, layer._last.b)
    assert b_native[1] == b_native[3] == 1.0 and layer.nonfinite_batches == 2


@pytest.mark.parametrize("shape", [(2**13, 2, 256), (2**13, 2, 16), (2**20, 2)], ids=["long-rows", "short-rows",
                                                                                  "channels-last"])
def test_native_kernels_sum_precisely_over_many_elements(native_runs, shape):
    # 2**21 elements per channel, far from the mean: one float32 running sum would be off by ~1e-3
    layer = make_layer(shape)
    with torch.no_grad():
        layer.mean.zero_(), layer.set_std(torch.ones(2))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1 + 3.0
    layer(x)
    assert native_runs == [("train", True)]
    torch.testing.assert_close(layer._last.b.double(), x.double().square().mean((0, *range(2, x.dim()))),
                               rtol=1e-6, atol=0)


def test_environment_variable_sets_the_initial_mode():
    code = "import torch, batchless.fused as f; print(f.path(torch.ones(2, 3)))"
    env = {**os.environ, "BATCHLESS_FUSED": "never"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "eager"
    env["BATCHLESS_FUSED"] = "on"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "BATCHLESS_FUSED must be one of ('auto', 'compiled', 'never'), got 'on'" in out.stderr


def test_build_failure_warns_and_stays_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHLESS_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="could not build the CPU kernels"):
        assert not fused.build_cpu_kernels()
    monkeypatch.setattr(fused, "_mode", "auto")
    assert fused.path(torch.ones(2, 3)) == "eager"


def _step(layer, x, mode, loss=lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), block=None):
    """Gradients of ``loss(layer(x))`` (+ the explicit NLL) for x (when it requires one) and the parameters,
    on the kernels of ``mode``."""
    previous = fused.set_fused(mode)
    try:
        with block or contextlib.nullcontext():
            y = layer(x)
            total = loss(y) + (bl.nll_loss(layer) if layer.nll == "explicit" else 0)
            inputs = [x] * x.requires_grad + list(layer.parameters())
            return torch.autograd.grad(total, inputs, allow_unused=True)
    finally:
        fused.set_fused(previous)


NODE_CASES = {  # name: (layer arguments, x dtype, parameter dtype, x requires grad, NLL weight block)
    "nested-float-blocks": ({}, torch.float32, torch.float32, True, lambda: _nested(0.5, 0.25)),
    "explicit": ({"nll": "explicit"}, torch.float32, torch.float32, True, None),
    "bfloat16-parameters": ({}, torch.bfloat16, torch.bfloat16, True, None),
    "input-without-gradient": ({}, torch.float32, torch.float32, False, None),
    "shared-no-affine": ({"shared": True, "affine": False}, torch.float32, torch.float32, True, None),
}


@contextlib.contextmanager
def _nested(*weights):
    with contextlib.ExitStack() as stack:
        for w in weights:
            stack.enter_context(bl.nll_weight(w))
        yield


@pytest.mark.parametrize("case", NODE_CASES)
def test_native_node_matches_the_eager_path(native_runs, case):
    kwargs, dtype, param_dtype, needs_grad, block = NODE_CASES[case]
    torch.manual_seed(0)
    layer = bl.BatchlessNorm2d(6, **kwargs).to(param_dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    x = (torch.randn(4, 6, 5, 5) * 2).to(dtype).requires_grad_(needs_grad)
    got = _step(layer, x, "auto", block=block and block())
    assert native_runs == [("train", True)]
    want = _step(layer, x, "never", block=block and block())
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


PATHS = {  # name: (fused mode, NLL weight block): the three ways an eager training step can go
    "native-node": ("auto", None),
    "native-under-python-function": ("auto", lambda: bl.nll_weight(torch.tensor(1.0))),
    "eager": ("never", None),
}


def _penalty_grads(forward, params, x):
    """A gradient penalty through a conv and the normalization, (sum of the squared input gradient of the
    output's weighted energy) differentiated again: its gradients for x and every parameter (zeros where a
    parameter does not take part)."""
    (gx,) = torch.autograd.grad((forward(x).square() * torch.linspace(0.5, 1.5, 3)).sum(), x, create_graph=True)
    grads = torch.autograd.grad(gx.square().sum(), [x, *params], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *params], strict=True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("std_param", ["log", "inv"])
def test_double_backward_matches_the_formula(cpu_kernels, path, std_param):
    """Gradient penalties (WGAN-GP, R1) differentiate the input gradient again: gx = gy * weight / std must
    carry the weight's share (mean and std are constants in the output, as in the formula)."""
    mode, block = PATHS[path]
    torch.manual_seed(0)
    conv, layer = torch.nn.Conv1d(5, 5, 1), bl.BatchlessNorm1d(5, std_param=std_param)
    with torch.no_grad():
        layer.mean.uniform_(-1, 1), layer.raw_std.uniform_(0.5, 1.5)
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    params = [*conv.parameters(), *layer.parameters()]
    x = torch.randn(8, 5, 3, requires_grad=True)
    previous = fused.set_fused(mode)
    try:
        with block() if block else contextlib.nullcontext():
            got = _penalty_grads(lambda x: layer(conv(x)), params, x)
    finally:
        fused.set_fused(previous)
    args = (layer.mean, layer.raw_std, layer.weight, layer.bias, std_param, layer.eps)
    want = _penalty_grads(lambda x: naive_forward(conv(x), *args)[0], params, x)
    assert want[-2].abs().min() > 0  # the weight's share, which a constant gx would miss
    # the penalty's backward passes the layer once, so (implicit mode) mean/std get the NLL gradient once
    want[3:5] = torch.autograd.grad(naive_forward(conv(x), *args)[1], [layer.mean, layer.raw_std])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_double_backward_under_torch_func_matches_the_formula():
    """torch.func transforms take the setup_context Function; its backward is traced, so it must be
    differentiable too."""
    torch.manual_seed(0)
    layer = make_layer((8, 5, 3))
    x = torch.randn(8, 5, 3)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def penalty(params, forward):
        gx = torch.func.grad(lambda x: forward(params, x).square().sum())(x)
        return gx.square().sum()

    def ours(params, x):
        return torch.func.functional_call(layer, params, (x,))

    def formula(params, x):
        return naive_forward(x, params["mean"], params["raw_std"], params["weight"], params["bias"], "log",
                             layer.eps)[0]

    got, want = (torch.func.grad(penalty)(params, f) for f in (ours, formula))
    assert want["weight"].abs().min() > 0
    for name in ("weight", "bias"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("std_param", ["log", "abs", "inv"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-channel", "shared"])
def test_native_node_differentiates_each_std_parametrization(native_runs, std_param, shared):
    """sigma's parametrization is part of the native node: the NLL gradient reaches raw_std through it (the
    sign of a negative raw value included), and evaluation reads it too."""
    torch.manual_seed(0)
    layer = bl.BatchlessNorm1d(5, std_param=std_param, shared=shared)
    with torch.no_grad():
        layer.mean.uniform_(-1, 1), layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
        layer.raw_std.uniform_(-0.5, 0.5) if std_param == "log" else layer.raw_std.uniform_(-1.5, -0.5)
    x = (torch.randn(8, 5, 3) * 2 + 1).requires_grad_()
    got = _step(layer, x, "auto")
    assert native_runs == [("train", True)]
    args = (layer.mean, layer.raw_std, layer.weight, layer.bias, std_param, layer.eps)
    y, nll = naive_forward(x, *args)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + nll
    want = torch.autograd.grad(loss, [x, *layer.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_forward(x, *args)[0], rtol=1e-5, atol=1e-6)
    assert native_runs[-1] == ("eval", True)


@pytest.mark.parametrize("given", ["weight", "bias"])
def test_native_node_takes_weight_or_bias_alone(native_runs, given):
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, requires_grad=True)
    mean, std, p = (torch.rand(5, requires_grad=True) + 0.5 for _ in range(3))
    args = (p, None) if given == "weight" else (None, p)

    def grads(mode):
        fused.set_fused(mode)
        y, *_ = bl.functional.train_forward(x, mean, std, *args, 1.0)
        return torch.autograd.grad((y * y).sum(), [x, mean, std, p])

    got, want = grads("auto"), grads("never")
    fused.set_fused("auto")
    assert native_runs == [("train", True)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, fmt", [
    ((63, 5, 256), torch.contiguous_format), ((64, 16, 8, 8), torch.contiguous_format),
    ((128, 64, 4, 4), torch.contiguous_format), ((4096, 16), torch.contiguous_format),
    ((32, 8, 16, 16), torch.channels_last)],
    ids=["long-rows-split-mid-batch", "rows-of-64", "short-rows", "rows", "channels-last"])
def test_native_kernels_split_across_threads_alike(native_runs, threads, shape, fmt):
    # large enough (32k elements per task at least) that the kernels give each of 2 threads a task
    layer = make_layer(shape)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape).contiguous(memory_format=fmt)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.autograd.grad(layer(x), [x, *layer.parameters()], g)
    finally:
        torch.set_num_threads(previous)
    assert native_runs == [("train", True)]
    want = _step(layer, x, "never", loss=lambda y: (y * g).sum())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_damaged_cached_build_warns_and_stays_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHLESS_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    monkeypatch.setattr(fused, "_mode", "auto")
    directory = _cpu_kernels._build_dir()
    directory.mkdir(parents=True)
    (directory / f"{directory.name}.so").write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match="cached CPU kernels .* did not load"):
        assert fused.path(torch.ones(2, 3)) == "eager"
    layer = make_layer((4, 3))
    layer(torch.randn(4, 3)).sum().backward()  # trains on the eager path


def test_native_node_without_autograd_or_with_frozen_parameters(native_runs):
    layer = make_layer((2, 4, 3, 3))
    x = torch.randn(2, 4, 3, 3)
    with torch.inference_mode():
        want = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    layer.requires_grad_(False)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(layer(x), x, torch.ones_like(x))
    torch.testing.assert_close(gx, (layer.weight / layer.std).view(1, 4, 1, 1).expand_as(x))
    assert native_runs == [("train", True)] * 3


@pytest.mark.parametrize("shape, dtype, fmt, affine, shared", CASES)
def test_native_evaluation_without_gradients_matches_eager(native_runs, shape, dtype, fmt, affine, shared):
    layer = make_layer(shape, affine, shared).eval()
    x = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        y = layer(x)
        assert native_runs == [("eval", True)]
        fused.set_fused("never")
        want = layer(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(y, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("std_param", ["log", "inv"])
def test_evaluation_with_gradients_matches_the_formula(native_runs, std_param):
    """Frozen-statistics fine-tuning: an eval-mode layer in a graph that needs gradients takes the training
    node without an NLL; x, weight and bias get the formula's gradients, mean and std none."""
    torch.manual_seed(0)
    layer = bl.BatchlessNorm1d(6, std_param=std_param).eval()
    with torch.no_grad():
        layer.mean.uniform_(-1, 1), layer.raw_std.uniform_(0.5, 1.5)
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    x = (torch.randn(4, 6, 5) * 2).requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).view_as(x)
    y = layer(x)
    got = torch.autograd.grad((y * w).sum(), [x, layer.weight, layer.bias, layer.mean, layer.raw_std],
                              allow_unused=True)
    assert native_runs == [("train", True)]
    want_y = naive_forward(x, layer.mean, layer.raw_std, layer.weight, layer.bias, std_param, layer.eps)[0]
    want = torch.autograd.grad((want_y * w).sum(), [x, layer.weight, layer.bias])
    torch.testing.assert_close(y, want_y)
    for a, b in zip(got[:3], want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[3] is None and got[4] is None


# ---------------------------------------------------------------------------------------------------------
# Where the native kernels must step aside: what they would read or record wrongly.


# torch.jit.trace is deprecated, and it warns that the layer's Python branches are recorded as constants;
# the layer supports it on purpose (existing TorchScript pipelines), so this test calls it anyway.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated")  # (Deprecation- or FutureWarning)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_records_the_real_ops(cpu_kernels, training):
    """A trace sees only what goes through the dispatcher: the kernels' own loops would leave it an
    empty_like (outputs of uninitialised memory)."""
    layer = make_layer((2, 3, 4, 4)).train(training)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x + 100), layer(x + 100))


@pytest.mark.parametrize("training", [False, True])
def test_batched_gradients(cpu_kernels, training):
    """is_grads_batched (vmap over the backward): the gradient arrives batched, without storage."""
    layer = make_layer((4, 3, 5)).train(training)
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = layer(x)
    gys = torch.randn(2, 4, 3, 5)
    (batched,) = torch.autograd.grad(y, x, gys, is_grads_batched=True, retain_graph=True)
    for gy, got in zip(gys, batched, strict=True):
        torch.testing.assert_close(got, torch.autograd.grad(y, x, gy, retain_graph=True)[0])


@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_ad_in_evaluation(cpu_kernels, frozen):
    import torch.autograd.forward_ad as fwAD

    layer = make_layer((4, 3, 5)).eval().requires_grad_(not frozen)
    x, tangent = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
    want = tangent * (layer.weight / layer.std).detach().view(1, -1, 1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 4)])
def test_saved_input_given_back_in_another_layout(cpu_kernels, shape):
    """A saved-tensor hook may return x in a layout the kernels do not read (here: transposed): the
    backward must still be right (it divided by zero: SIGFPE)."""
    def transposed(t):
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.shape == shape else t

    layer = make_layer(shape)
    x = torch.randn(shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(transposed, lambda t: t):
        y = layer(x)
    g = torch.randn(shape)
    got = torch.autograd.grad(y, [x, layer.weight, layer.mean], g)
    want = torch.autograd.grad(layer(x), [x, layer.weight, layer.mean], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_negative_views_are_read_as_values(cpu_kernels):
    layer = make_layer((4, 3))
    x0 = torch.randn(4, 3)
    x = torch._neg_view(x0).requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, layer(-x0))
    g0 = torch.randn(4, 3)
    (gx,) = torch.autograd.grad(y, x, torch._neg_view(g0))
    torch.testing.assert_close(gx, -g0 * (layer.weight / layer.std).detach())
