"""Routes: which one a step takes, what each does at its edges, and a clean fallback.

The layer's results on every route are in test_layer.py (the property table of variants.py); here:
the router's choices, the native kernels where they must step aside, the compiled route's failures.
The compiled route runs on CPU with ``set_fused("compiled")`` (Inductor's C++ backend; CUDA: Triton).
"""

import os
import subprocess
import sys

import pytest
import torch

import batchless as bl
from batchless import _state, fused
from batchless import functional as BF
from batchless.fused import Route
from reference import naive_forward
from variants import STD_PARAMS, STD_SPEEDS, Variant, assert_all_close, assert_close, forced, reference_step, step

F32 = Variant((4, 6, 5, 7), dtype=torch.float32)


@pytest.fixture
def compiled_calls(monkeypatch):
    """The compiled route from scratch, the formulas it compiles recorded by name."""
    calls = []
    real = fused.compiled

    def counted(fn, *args):
        calls.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(fused, "compiled", counted)
    fused.set_fused("compiled")
    return calls


def test_the_router_decides_once_and_tells(cpu_kernels):
    x, layer = torch.ones(2, 3), bl.BatchlessNorm1d(3)
    assert fused.route(x) == fused.route(x, layer) == Route.NATIVE and fused.path(x) == "native"
    assert fused.path(torch.ones(3)) == "native"  # (a 1-d tensor: one instance)
    for other in (x.double(), x.half(), x[:0], torch.ones(4, 3, 5).transpose(0, 2)):
        assert fused.route(other, bl.BatchlessNorm1d(other.shape[1])) == Route.EAGER
    layer.float().eval()
    assert fused.route(x, layer) == Route.NATIVE  # evaluation with gradients: the node
    with torch.no_grad():
        assert fused.route(x, layer) == Route.NATIVE_EVAL
    fused.set_fused("compiled")
    assert fused.route(x) == fused.route(x.half()) == Route.COMPILED
    assert fused.route(x, layer) == Route.EAGER  # evaluation: nothing to fuse
    assert fused.route(x.double()) == Route.EAGER  # gradcheck precision: eager
    fused.set_fused("never")
    assert fused.route(x) == Route.EAGER and fused.path(x) == "eager"
    _state.reset(keep_kernels=False)
    _state.STATE.kernels = None  # not built: auto on CPU is eager
    assert fused.route(x) == Route.EAGER
    if torch.cuda.is_available():
        assert fused.route(x.cuda()) == Route.COMPILED


def test_a_profile_shows_the_route(route):
    layer, x = F32.layer(), F32.input()
    with torch.profiler.profile() as profile:
        layer(x).sum().backward()
    assert f"batchless::{route}" in {event.name for event in profile.events()}


def test_torch_func_takes_the_traceable_route():
    layer, x = F32.layer(), F32.input(requires_grad=False)
    seen = []
    params = dict(layer.named_parameters())

    def loss(p):
        seen.append(fused.route(x, layer))
        return torch.func.functional_call(layer, p, (x,)).sum()

    torch.func.grad(loss)(params)
    assert seen == [Route.TRACEABLE]


def test_set_fused_checks_and_returns_previous():
    assert fused.set_fused("never") == "auto"
    assert fused.set_fused("auto") == "never"
    with pytest.raises(bl.BatchlessError, match=r"one of \('auto', 'compiled', 'never'\), got 'on'"):
        fused.set_fused("on")


def test_environment_variable_sets_the_initial_mode():
    code = "import torch, batchless.fused as f; print(f.path(torch.ones(2, 3)))"
    env = {**os.environ, "BATCHLESS_FUSED": "never"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "eager"
    env["BATCHLESS_FUSED"] = "on"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "BATCHLESS_FUSED must be one of ('auto', 'compiled', 'never'), got 'on'" in out.stderr


# ---------------------------------------------------------------------------------------------------
# The compiled route


def test_the_compiled_route_fuses_both_directions(compiled_calls):
    layer, x = F32.layer(), F32.input()
    step(layer, x)
    assert compiled_calls == ["affine_forward", "affine_backward"]
    layer.weight.requires_grad_(False)  # the backward kernel gives all three gradients or none
    step(layer, x)
    assert compiled_calls[2:] == ["affine_forward"]


def test_compiler_failure_warns_once_and_falls_back(compiled_calls, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    layer, x = F32.layer(), F32.input()
    with pytest.warns(UserWarning, match="fused training kernels failed to compile or run .*no C\\+\\+ "
                                         "compiler found"):
        y = layer(x)
    assert fused.route(x) == Route.EAGER
    fused.set_fused("never")
    torch.testing.assert_close(y, layer(x))


def test_a_failing_backward_compilation_warns_once(compiled_calls, monkeypatch):
    """Graphs recorded before the failure must not try (and warn) again."""
    import warnings

    def broken(*args, **kwargs):
        raise RuntimeError("backward does not compile")

    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kwargs: fn if fn.__name__ == "affine_forward" else broken)
    layers = [F32.layer(), F32.layer()]
    x, g = F32.input(), torch.randn(F32.shape)  # (g: both backwards try)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(layers[1](layers[0](x)), [x, layers[0].weight], g)
    assert [str(w.message).count("backward does not compile") for w in caught] == [1]
    fused.set_fused("never")
    want = torch.autograd.grad(layers[1](layers[0](x)), [x, layers[0].weight], g)
    torch.testing.assert_close(got, want)


def test_a_device_error_is_not_taken_for_a_compiler_failure(compiled_calls, monkeypatch):
    def device_error(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: device_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        F32.layer()(F32.input())
    assert not _state.STATE.compile_failed


def test_one_graph_for_every_channel_count(compiled_calls):
    """dynamic=True must cover C too: a Parameter argument would pin it (a graph per width, then,
    past dynamo's recompile limit, no compilation at all)."""
    import torch._dynamo.utils as dynamo_utils

    def train_with(c):
        v = Variant((8, c, 10), dtype=torch.float32)
        v.layer()(v.input()).sum().backward()

    train_with(2), train_with(3)  # dynamo specializes sizes 0 and 1 only
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for c in (4, 5, 7, 9, 12):
        train_with(c)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("route", ["native", "eager", "compiled"])
def test_negative_views_are_read_as_values(cpu_kernels, route):
    v = Variant((4, 3), dtype=torch.float32, route=route)
    layer, x0, g0 = v.layer(), torch.randn(4, 3), torch.randn(4, 3)
    x = torch._neg_view(x0).requires_grad_()
    with forced(route):
        assert fused.route(x, layer) == Route.EAGER  # (no kernel sees the sign bit of a view)
        y = layer(x)
        torch.testing.assert_close(y, layer(-x0))
        (gx,) = torch.autograd.grad(y, x, torch._neg_view(g0))
    torch.testing.assert_close(gx, -g0 * (layer.weight / layer.std).detach())


# ---------------------------------------------------------------------------------------------------
# The native kernels


def test_native_kernels_say_what_they_support(cpu_kernels):
    x, c = torch.randn(4, 6, 5), torch.ones(6)
    assert cpu_kernels.supports(x, c, c, c, c) and cpu_kernels.supports(x, c[:1], c[:1], None, None)
    for unsupported in (x.double(), x.half(), x.transpose(0, 2).contiguous().transpose(0, 2), x[:0]):
        assert not cpu_kernels.supports(unsupported, c, c, None, None)
    for mean in (c[:2], c.double().to("meta")):
        assert not cpu_kernels.supports(x, mean, c, None, None)
    with pytest.raises(RuntimeError, match="unsupported"):
        cpu_kernels.train(x.double(), c, c, "log", 0.0, 1.0, 1.0, None, None, 1.0)


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-channel", "shared"])
@pytest.mark.parametrize("std_speed", STD_SPEEDS)
def test_native_node_against_the_python_formula(cpu_kernels, std_param, shared, std_speed):
    """The C++ node computes the Python formulas (functional.affine_forward, affine_backward,
    nll_grads, std_from_param with its gain; negative raw values included), and so the reference."""
    v = Variant((8, 5, 3), std_param=std_param, shared=shared, std_speed=std_speed, dtype=torch.float32)
    layer, x = v.layer(), v.input()
    with torch.no_grad():
        low, high = (-0.5, 0.5) if std_param == "log" else (-1.5, -0.5)
        layer.raw_std.uniform_(low / std_speed, high / std_speed)  # (std itself in the same range)
    g = torch.linspace(-1, 1, x.numel()).view_as(x)
    y, got = step(layer, x, g)
    std = BF.std_from_param(layer.raw_std, std_param, layer.eps, std_speed)
    f = BF.factors(layer.mean, std, layer.weight, x)
    y_formula, a, b = BF.affine_forward(x.detach(), *f, layer.bias.detach())
    gx, gweight, gbias = BF.affine_backward(g, x.detach(), *f)
    gmean, gstd = BF.nll_grads(a, b, f.inv, 1.0, shared=shared)
    (graw,) = torch.autograd.grad(std, layer.raw_std, gstd)
    want = {"x": gx, "raw_mean": gmean * layer.mean_speed, "raw_std": graw, "weight": gweight, "bias": gbias}
    assert_all_close(got, want, torch.float32)
    assert_close(y, y_formula, torch.float32)
    assert_close(layer._last.b, b, torch.float32)
    assert_all_close(got, reference_step(layer, x, g)[2], torch.float32)


def test_native_nonfinite_channels_add_no_nll(route):
    v = Variant((8, 4, 3), dtype=torch.float32)
    layer, x = v.layer(), v.input(requires_grad=False)
    x[2, 1, 0], x[5, 3, 1] = float("nan"), float("inf")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        layer(x)
    b = layer._last.b
    assert b[1] == b[3] == 1.0 and torch.isfinite(b).all() and layer.nonfinite_batches == 1


@pytest.mark.parametrize("shape", [(2**13, 2, 256), (2**13, 2, 16), (2**20, 2)],
                         ids=["long-rows", "short-rows", "channels-last"])
def test_native_kernels_sum_precisely_over_many_elements(cpu_kernels, shape):
    # 2**21 elements per channel, far from the mean: one float32 running sum would be off by ~1e-3
    layer = bl.BatchlessNorm1d(2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1 + 3.0
    assert fused.route(x, layer) == Route.NATIVE
    layer(x)
    want = x.double().square().mean((0, *range(2, x.dim())))
    torch.testing.assert_close(layer._last.b.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, fmt", [
    ((63, 5, 256), torch.contiguous_format), ((64, 16, 8, 8), torch.contiguous_format),
    ((128, 64, 4, 4), torch.contiguous_format), ((4096, 16), torch.contiguous_format),
    ((32, 8, 16, 16), torch.channels_last)],
    ids=["long-rows-split-mid-batch", "rows-of-64", "short-rows", "rows", "channels-last"])
def test_native_kernels_split_across_threads_alike(cpu_kernels, threads, shape, fmt):
    # large enough (32k elements per task at least) that the kernels give each of 2 threads a task
    v = Variant(shape, dtype=torch.float32, layout=fmt)
    layer, x, g = v.layer(), v.input(), v.input(seed=2, requires_grad=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = step(layer, x, g)[1]
    finally:
        torch.set_num_threads(previous)
    with forced("eager"):
        assert_all_close(got, step(layer, x, g)[1], torch.float32)


def test_native_node_without_autograd_or_with_frozen_parameters(cpu_kernels):
    layer, x = Variant((2, 4, 3, 3), dtype=torch.float32).layer(), torch.randn(2, 4, 3, 3)
    with torch.inference_mode():
        assert fused.route(x, layer) == Route.NATIVE
        want = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    layer.requires_grad_(False)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(layer(x), x, torch.ones_like(x))
    torch.testing.assert_close(gx, (layer.weight / layer.std).view(1, 4, 1, 1).expand_as(x))


# ---------------------------------------------------------------------------------------------------
# Where a kernel must step aside: what it would read or record wrongly (every route)


@pytest.mark.parametrize("route", ["native", "native-weighted", "eager", "compiled"])
def test_backward_takes_another_gradient_layout(route):
    layer, x = F32.layer(), F32.input()
    with forced(route):  # an expanded (stride 0) gradient
        got = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    with forced("eager"):
        want = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(got, want)


# torch.jit.trace is deprecated, and it warns that the layer's Python branches are recorded as constants;
# the layer supports it on purpose (existing TorchScript pipelines), so this test calls it anyway.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace(_method)?` is deprecated")  # (Deprecation- or FutureWarning)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_records_the_real_ops(route, training):
    """A trace sees only what goes through the dispatcher: a kernel's own loops would leave it an
    empty_like (outputs of uninitialised memory)."""
    layer, x = Variant((2, 3, 4, 4), dtype=torch.float32).layer().train(training), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x + 100), layer(x + 100))


@pytest.mark.parametrize("training", [False, True])
def test_batched_gradients(route, training):
    """is_grads_batched (vmap over the backward): the gradient arrives batched, without storage."""
    v = Variant((4, 3, 5), dtype=torch.float32)
    layer, x = v.layer().train(training), v.input()
    y = layer(x)
    gys = torch.randn(2, 4, 3, 5)
    (batched,) = torch.autograd.grad(y, x, gys, is_grads_batched=True, retain_graph=True)
    for gy, got in zip(gys, batched, strict=True):
        torch.testing.assert_close(got, torch.autograd.grad(y, x, gy, retain_graph=True)[0])


@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_ad_in_evaluation(route, frozen):
    import torch.autograd.forward_ad as fwAD

    layer = Variant((4, 3, 5), dtype=torch.float32).layer().eval().requires_grad_(not frozen)
    x, tangent = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, tangent * (layer.weight / layer.std).detach().view(1, -1, 1))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 4)])
def test_saved_input_given_back_in_another_layout(route, shape):
    """A saved-tensor hook may return x in a layout the kernels do not read (here: transposed): the
    backward must still be right (it divided by zero: SIGFPE)."""
    def transposed(t):
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.shape == shape else t

    layer, x = Variant(shape, dtype=torch.float32).layer(), torch.randn(shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(transposed, lambda t: t):
        y = layer(x)
    g = torch.randn(shape)
    got = torch.autograd.grad(y, [x, layer.weight, layer.raw_mean], g)
    want = torch.autograd.grad(layer(x), [x, layer.weight, layer.raw_mean], g)
    torch.testing.assert_close(got, want)


def test_double_backward_under_torch_func_matches_the_formula():
    """torch.func transforms take the traceable route; its backward is traced, so it must be
    differentiable too."""
    layer, x = Variant((8, 5, 3), dtype=torch.float32).layer(), torch.randn(8, 5, 3)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def penalty(params, forward):
        gx = torch.func.grad(lambda x: forward(params, x).square().sum())(x)
        return gx.square().sum()

    def ours(params, x):
        return torch.func.functional_call(layer, params, (x,))

    def formula(params, x):
        return naive_forward(x, params["raw_mean"], params["raw_std"], params["weight"], params["bias"],
                             "log", layer.eps, layer.std_speed, layer.mean_speed)[0]

    got, want = (torch.func.grad(penalty)(params, f) for f in (ours, formula))
    assert want["weight"].abs().min() > 0
    for name in ("weight", "bias"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
