"""Ecosystem fit: compilers, exporters, torch.func, inference mode, bad data, argument checks.

(Dtypes and memory layouts on every route: the property table, test_layer.py.)"""

import contextlib
import copy
import linecache
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchless as bl
import batchless.functional as BF
from batchless._state import STATE
from variants import CLASSES, NLL_MODES, STD_PARAMS


def conv_model(norm=bl.BatchlessNorm2d):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), norm(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3), bl.BatchlessNorm1d(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = conv_model()
    x = torch.randn(4, 3, 6, 6)
    gpu = copy.deepcopy(model).cuda()
    model(x).sum().backward()
    gpu(x.cuda()).sum().backward()
    for a, b in zip(model.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_eval():
    model = conv_model().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_compile_inductor_training_step():
    model = conv_model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    for m in (compiled, eager):
        m(x).square().sum().backward()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_torch_export_eval_model():
    model = conv_model().eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_onnx_export_of_folded_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = conv_model().eval()
    with torch.no_grad():
        for layer in (model[1], model[5]):
            layer.set_mean(torch.empty_like(layer.raw_mean).uniform_(-1, 1))
            layer.set_std(torch.rand_like(layer.raw_mean) + 0.5)
    folded = bl.fold(model)
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nll", NLL_MODES)
def test_vmap_per_sample_gradients(nll):
    """The layer is per-instance, so per-sample gradients (what DP-SGD needs) work; BatchNorm's do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), bl.BatchlessNorm1d(3, nll=nll), torch.nn.Linear(3, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t = torch.randn(5, 4), torch.randn(5, 1)

    def loss(p, xi, ti):
        out = torch.func.functional_call(model, p, (xi[None],))
        return ((out - ti) ** 2).mean()

    # the task loss alone: explicit layers rightly warn that their NLL is not collected
    uncollected = pytest.warns(UserWarning, match="without its NLL being collected")
    with uncollected if nll == "explicit" else contextlib.nullcontext():
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, t)
        for i in range(5):
            model.zero_grad()
            loss(dict(model.named_parameters()), x[i], t[i]).backward()
            for name, p in model.named_parameters():
                want = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(per_sample[name][i], want, msg=name)


def test_vmap_model_ensemble_matches_separate_models(route):
    """torch.func ensembling (parameters stacked, vmapped): gradients equal the separate models', and
    a plain call afterwards still works (nothing batched is kept across calls, even when the vmapped
    call is first)."""
    torch.manual_seed(0)
    models = [conv_model() for _ in range(3)]
    for m in models[1:]:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 3, 6, 6)

    def loss(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,)).square().mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        m.zero_grad()
        m(x).square().mean().backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, msg=name)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in STATE.ones.values())


@pytest.fixture
def vmap_fallback_warnings():
    """torch's "There is a performance drop because we have not yet implemented the batching rule"
    warnings on (off by default in torch.func, always on in the vmap of is_grads_batched)."""
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    yield
    torch._C._debug_only_display_vmap_fallback_warnings(False)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 6, 6), (5, 3, 64, 64)])  # the last: CPU row sums
@pytest.mark.parametrize("training", [True, False])
def test_vmap_per_sample_gradients_run_without_fallbacks(route, training, shape, vmap_fallback_warnings):
    """No op of ours lacks a batching rule under torch.func (ATen's batch_norm_update_stats, which the
    eager route's moments call, has none: vmap ran it per sample and warned) nor, in training, for batched
    gradients (in evaluation a 3-D or 4-D input's backward is torch.batch_norm's own, as for nn.BatchNorm)."""
    model = torch.nn.Sequential(CLASSES[len(shape)](3), torch.nn.Flatten(), torch.nn.LazyLinear(1)).train(training)
    x = torch.randn(shape)
    model(x)  # (LazyLinear takes its shape)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(model, p, (xi[None],)).square().sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        if training:
            y = model(x.requires_grad_())
            torch.autograd.grad(y, x, torch.randn(2, *y.shape), is_grads_batched=True)
    assert [str(w.message) for w in caught] == []


def test_expanded_weights_are_refused(route):
    """torch's ExpandedWeights (Opacus's grad_sample_mode="ew") run only the ops they know: a clear error,
    not parameters left without gradients (the native route) or a failure deep inside (the others)."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), bl.BatchlessNorm1d(4))
    with pytest.raises(bl.BatchlessError, match=r"ExpandedWeights.*grad_sample_mode=\"hooks\""):
        call_for_per_sample_grads(model)(torch.randn(5, 3))


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_with_the_layer_first(training, route):
    """A plain input and transformed parameters (functional_call under grad; an ensemble sharing the input):
    only the parameters are functorch tensors, so the layer must notice the transform from them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(bl.BatchlessNorm1d(4), torch.nn.Linear(4, 1)).train(training)
    x = torch.randn(8, 4) * 3 + 1
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], torch.zeros_like(p) if p.grad is None else p.grad, msg=name)
    stacked = {k: torch.stack([v, v * 2]) for k, v in params.items()}
    out = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(stacked)
    torch.testing.assert_close(out[0], model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_mode_then_training_with_gradients(dtype, route):
    layer = bl.BatchlessNorm2d(3, init_std=2.0, dtype=dtype).eval()
    with torch.inference_mode():
        layer(torch.randn(2, 3, 4, 4, dtype=dtype))
    x = torch.randn(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()  # nothing made under inference mode was kept for this backward
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))  # weight / std


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 4), (16, 4, 8, 8)])
def test_half_precision_statistics_are_not_rounded(dtype, shape, route):
    """At 100 +- 1, a mean rounded to bfloat16 is off by up to 0.4 standard deviations: the NLL
    gradient of the learned mean must not inherit that (the eager route subtracted the mean after
    the rounding)."""
    torch.manual_seed(0)
    x = (torch.randn(shape) + 100).to(dtype)
    grads = []
    for layer_dtype, x_in in ((torch.float32, x), (torch.float64, x.double())):
        layer = (bl.BatchlessNorm1d if len(shape) == 2 else bl.BatchlessNorm2d)(4, dtype=layer_dtype)
        with torch.no_grad():
            layer.set_mean(torch.full_like(layer.raw_mean, 100.0))
        layer(x_in).sum().backward()
        grads.append(layer.raw_mean.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_functional_api_takes_shared_statistics_as_0_dim_tensors(route):
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        y = BF.eval_forward(x, torch.tensor(0.5), torch.tensor(2.0), None, None)
    torch.testing.assert_close(y, (x - 0.5) / 2)
    mean, std = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    y = BF.train_forward(x, mean, std, None, None, 1.0).y
    torch.testing.assert_close(y, (x - 0.5) / 2)
    y.sum().backward()  # the implicit NLL gradient, in the statistics' own (0-dim) shape
    assert mean.grad.shape == std.grad.shape == ()


def test_explicit_mode_records_no_graph_when_only_the_statistics_train(route):
    """Frozen weight and bias, an input without gradient: the output has no gradient to give (the
    NLL goes through nll_loss), so nothing after the layer records a graph."""
    layer = bl.BatchlessNorm2d(3, nll="explicit")
    layer.weight.requires_grad_(False), layer.bias.requires_grad_(False)
    assert not layer(torch.randn(2, 3, 4, 4)).requires_grad
    bl.nll_loss(layer).backward()
    assert layer.raw_mean.grad is not None


def test_scalar_tensor_initial_statistics():
    layer = bl.BatchlessNorm1d(3, init_mean=torch.tensor(1.0), init_std=torch.tensor(2.0))
    torch.testing.assert_close(layer.std.detach(), torch.full((3,), 2.0))


@pytest.mark.parametrize(("bad_mean", "message"), [(torch.zeros(2), "must match the existing size"),
                                                    (torch.zeros(4, device="meta"), "device")])
def test_functional_api_refuses_statistics_of_the_wrong_size_or_device(bad_mean, message, route):
    """The native kernels read the (C,) vectors directly: any other size or device must not get
    there."""
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=message):
        BF.train_forward(x, bad_mean, torch.ones(bad_mean.shape, device=bad_mean.device), None, None, 1.0)
    with pytest.raises(RuntimeError, match=message), torch.no_grad():
        BF.eval_forward(x, bad_mean, torch.ones(bad_mean.shape, device=bad_mean.device), None, None)


@pytest.mark.filterwarnings("ignore:a BatchlessNorm layer")
@pytest.mark.parametrize("nll", NLL_MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_keeps_statistics(nll, bad, route):
    layer = bl.BatchlessNorm1d(3, nll=nll)
    x = torch.randn(8, 3)
    x[2, 1] = bad
    with pytest.warns(UserWarning, match="NaN/Inf"):
        y = layer(x)
    loss = y[:, [0, 2]].sum() + (bl.nll_loss(layer) if nll == "explicit" else 0)
    loss.backward()
    assert torch.isfinite(layer.raw_mean.grad).all() and torch.isfinite(layer.raw_std.grad).all()
    assert layer.raw_mean.grad[1] == 0 and layer.raw_std.grad[1] == 0  # the bad channel's NLL was dropped
    assert layer.raw_mean.grad[0] != 0  # the good channels still learn
    assert layer.nonfinite_batches == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, counted always
        layer(x)
    assert layer.nonfinite_batches == 2
    layer(torch.randn(8, 3))
    assert layer.nonfinite_batches == 2


def test_layer_warnings_point_at_the_callers_line(route):
    """A warning from inside a layer names the user's line (here: this file), not torch's Module.__call__,
    also through a container."""
    model = torch.nn.Sequential(torch.nn.Identity(), bl.BatchlessNorm1d(3))
    explicit = bl.BatchlessNorm1d(3, nll="explicit")
    x = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explicit(x)  # training from the initial statistics
        explicit(x)  # the explicit NLL was not collected
        x[2, 1] = float("nan")
        model(x)  # NaN input
    assert [(w.filename, linecache.getline(w.filename, w.lineno).strip()) for w in caught] == [
        (__file__, "explicit(x)  # training from the initial statistics"),
        (__file__, "explicit(x)  # the explicit NLL was not collected"), (__file__, "model(x)  # NaN input")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    std_param=st.sampled_from(STD_PARAMS),
    affine=st.booleans(),
    init_mean=st.floats(-100, 100),
    init_std=st.floats(1e-3, 1e3),
    scale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_properties(n, spatial, std_param, affine, init_mean, init_std, scale, dtype, route):
    cls = CLASSES[len(spatial) + 2]
    layer = cls(2, std_param=std_param, affine=affine, init_mean=init_mean, init_std=init_std,
                dtype=dtype)
    x = (torch.randn(n, 2, *spatial, dtype=dtype) * scale).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.raw_mean.grad).all() and torch.isfinite(layer.raw_std.grad).all()
    layer.eval()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # train and eval: one formula
    clone = cls(2, std_param=std_param, affine=affine, dtype=dtype)
    clone.load_state_dict(layer.state_dict())
    clone.eval()
    torch.testing.assert_close(clone(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: bl.BatchlessNorm2d(0), "num_features must be a positive int"),
    (lambda: bl.BatchlessNorm2d(3.0), "num_features must be a positive int"),
    (lambda: bl.BatchlessNorm2d(3, eps=-1), "eps must be a number >= 0, got -1"),
    (lambda: bl.BatchlessNorm2d(3, eps=None), "eps must be a number >= 0, got None"),
    (lambda: bl.BatchlessNorm2d(3, std_param="sqrt"), "std_param must be one of"),
    (lambda: bl.BatchlessNorm2d(3, init_std=0), "init_std must be a number > 0"),
    (lambda: bl.BatchlessNorm2d(3, init_std=None), "init_std must be a number > 0"),
    (lambda: bl.BatchlessNorm2d(3, init_mean="0"), "init_mean must be a number, got '0'"),
    (lambda: bl.BatchlessNorm2d(3, nll="auto"), "nll must be one of"),
    (lambda: bl.BatchlessNorm2d(3, std_speed=0), r"std_speed must be a finite number > 0 \(1: the paper's .*got 0$"),
    (lambda: bl.BatchlessNorm2d(3, std_speed=-0.1), "std_speed must be a finite number > 0 .*got -0.1$"),
    (lambda: bl.BatchlessNorm2d(3, std_speed=float("inf")), "std_speed must be a finite number > 0 .*got inf$"),
    (lambda: bl.BatchlessNorm2d(3, std_speed=float("nan")), "std_speed must be a finite number > 0 .*got nan$"),
    (lambda: bl.BatchlessNorm2d(3, std_speed="0.1"), "std_speed must be a finite number > 0 .*got '0.1'$"),
    (lambda: bl.BatchlessNorm2d(3, std_speed=True), "std_speed must be a finite number > 0 .*got True$"),
    (lambda: bl.BatchlessNorm2d(3, mean_speed=0), r"mean_speed must be a finite number > 0 \(1: the paper's .*got 0$"),
    (lambda: bl.BatchlessNorm2d(3, mean_speed=float("nan")), "mean_speed must be a finite number > 0 .*got nan$"),
    (lambda: bl.BatchlessNorm2d(3, mean_speed="1"), "mean_speed must be a finite number > 0 .*got '1'$"),
    (lambda: bl.BatchlessNorm2d(3, mean_speed=False), "mean_speed must be a finite number > 0 .*got False$"),
    (lambda: bl.BatchlessNorm2d(3, decay_affine=1), "decay_affine must be True or False, got 1$"),
    (lambda: bl.BatchlessNorm2d(3, decay_affine="no"), "decay_affine must be True or False, got 'no'$"),
    (lambda: bl.BatchlessNorm2d(3)(torch.randn(2, 3, 4)), "expects a 4D input.*got a 3D input"),
    (lambda: bl.BatchlessNorm1d(3)(torch.randn(2, 3, 4, 4)), "expects a 2D or 3D input.*got a 4D"),
    (lambda: bl.BatchlessNorm3d(3)(torch.randn(2, 3, 4, 4)), "expects a 5D input"),
    (lambda: bl.BatchlessNorm2d(3)(torch.randn(2, 4, 5, 5)), "expects 3 channels in dim 1, got 4"),
    (lambda: bl.BatchlessNorm1d(3)(torch.ones(2, 3, dtype=torch.long)), "floating-point input, got torch.int64"),
    (lambda: bl.nll_weight(-1.0).__enter__(), "nll_weight must be >= 0"),
    (lambda: bl.nll_weight("1").__enter__(), "nll_weight expects a number"),
    (lambda: bl.nll_loss("model"), "nll_loss expects a torch.nn.Module, got str"),
    (lambda: list(bl.statistics_parameters(3)), "statistics_parameters expects a torch.nn.Module, got int"),
    (lambda: bl.convert_batchnorm("m"), "convert_batchnorm expects a torch.nn.Module"),
    (lambda: bl.to_batchnorm(None), "to_batchnorm expects a torch.nn.Module, got NoneType"),
    (lambda: bl.fold([]), "fold expects a torch.nn.Module, got list"),
    (lambda: bl.init_from_data("m", []), "init_from_data expects a torch.nn.Module"),
    (lambda: bl.accumulate(torch.nn.Linear(2, 2), None, torch.randn(2, 2), torch.randn(2), micro_batch_size=1),
     "callable loss_fn"),
    (lambda: bl.accumulate(torch.nn.Linear(2, 2), torch.nn.functional.mse_loss, [torch.randn(2)], torch.randn(1, 2),
                           micro_batch_size=1), "inputs and targets as tensors .*got list and Tensor"),
])
def test_bad_input_says_expected_and_received(make, match):
    with pytest.raises(ValueError, match=match) as error:  # (BatchlessError is a ValueError)
        make()
    assert error.type is bl.BatchlessError
