"""The layer's semantics against an independent naive implementation, and the properties that make it useful."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchless as bl
from reference import naive_forward

LAYERS = {1: bl.BatchlessNorm1d, 2: bl.BatchlessNorm2d, 3: bl.BatchlessNorm3d}
SHAPES = [(5, 3), (4, 3, 7), (3, 3, 4, 5), (2, 3, 2, 3, 4),
          (4, 3, 1400), (4, 3, 40, 40)]  # >= 16k elements: CPU statistics by row sums, not the native kernel


def make_layer(shape, std_param="log", nll="implicit", shared=False, affine=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cls = LAYERS[max(len(shape) - 2, 1)]
    layer = cls(shape[1], std_param=std_param, nll=nll, shared=shared, affine=affine, dtype=dtype)
    with torch.no_grad():  # away from the defaults so that every term of the formula matters
        layer.mean.uniform_(-1, 1)
        layer.set_std(torch.rand_like(layer.mean) + 0.5)
        if affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    return layer


def grads(layer, x, loss):
    params = [p for p in (layer.mean, layer.raw_std, layer.weight, layer.bias) if p is not None]
    return torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("std_param", ["log", "abs", "inv"])
@pytest.mark.parametrize("nll", ["implicit", "explicit"])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_naive_formula(shape, std_param, nll, shared):
    layer = make_layer(shape, std_param, nll, shared)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)

    y = layer(x)
    loss = (y * g).sum() + (bl.nll_loss(layer) if nll == "explicit" else 0)
    got = grads(layer, x, loss)

    y_ref, nll_ref = naive_forward(x, layer.mean, layer.raw_std, layer.weight, layer.bias, std_param, layer.eps)
    want = grads(layer, x, (y_ref * g).sum() + nll_ref)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bl.nll_loss(layer), nll_ref.detach())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:a BatchlessNorm layer")
@pytest.mark.parametrize("std_param", ["log", "abs", "inv"])
def test_gradcheck(std_param):
    layer = make_layer((3, 3, 4), std_param, nll="explicit")
    x = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)

    def output(x, weight, bias):  # mean/std are constants in the output path
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    def nll(mean, raw_std):  # and x is a constant in the NLL
        torch.func.functional_call(layer, {"mean": mean, "raw_std": raw_std}, (x.detach(),))
        return bl.nll_loss(layer)

    assert torch.autograd.gradcheck(output, (x, layer.weight, layer.bias))
    assert torch.autograd.gradgradcheck(nll, (layer.mean, layer.raw_std))


def test_stop_gradients_both_ways():
    layer = make_layer((8, 3, 5), nll="explicit")
    x = torch.randn(8, 3, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g_mean, g_std = torch.autograd.grad(y.square().sum(), [layer.mean, layer.raw_std], allow_unused=True)
    assert g_mean is None and g_std is None  # the task loss never reaches the statistics
    (g_x,) = torch.autograd.grad(bl.nll_loss(layer), [x], allow_unused=True)
    assert g_x is None  # the NLL never reaches the input


def test_implicit_equals_explicit_with_weight_one():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = []
    for nll in ("implicit", "explicit"):
        layer = make_layer(x.shape, nll=nll)
        y = layer(x)
        loss = y.tanh().sum() + (bl.nll_loss(layer) if nll == "explicit" else 0)
        out.append(grads(layer, x, loss))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("nll", ["implicit", "explicit"])
def test_batch_output_equals_per_instance_outputs(nll):
    layer = make_layer((5, 3, 4, 4), nll=nll)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(x), together, rtol=0, atol=1e-12)  # train and eval: the same formula


@pytest.mark.parametrize("nll", ["implicit", "explicit"])
@pytest.mark.parametrize("sizes", [[1] * 6, [2, 2, 2], [4, 1, 1]])
def test_accumulated_micro_batches_equal_full_batch(nll, sizes):
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    target = torch.randn(6, 3, 5, dtype=torch.float64)
    full_layer, micro_layer = make_layer(x.shape, nll=nll), make_layer(x.shape, nll=nll)

    def loss_of(layer, xb, tb, w):
        with bl.nll_weight(w):
            task = ((layer(xb) - tb) ** 2).mean()
        return (task + (bl.nll_loss(layer) if nll == "explicit" else 0)) * w

    loss_of(full_layer, x, target, 1.0).backward()
    for xb, tb in zip(x.split(sizes), target.split(sizes), strict=True):
        loss_of(micro_layer, xb, tb, len(xb) / len(x)).backward()
    for p_full, p_micro in zip(full_layer.parameters(), micro_layer.parameters(), strict=True):
        torch.testing.assert_close(p_micro.grad, p_full.grad, rtol=1e-10, atol=1e-12)


def test_implicit_accumulation_without_weight_counts_each_forward_once():
    # Documented behaviour: without nll_weight each micro-batch forward adds a full weight-1 NLL gradient,
    # so k equal micro-batches give k times the full batch's NLL gradient.
    x = torch.randn(8, 3, dtype=torch.float64)
    full, micro = make_layer(x.shape), make_layer(x.shape)
    (full(x) * 0).sum().backward()
    for xb in x.chunk(4):
        (micro(xb) * 0).sum().backward()
    torch.testing.assert_close(micro.mean.grad, 4 * full.mean.grad)


@pytest.mark.parametrize("std_param", ["log", "abs", "inv"])
@pytest.mark.parametrize("nll", ["implicit", "explicit"])
def test_statistics_converge_at_batch_size_one(std_param, nll):
    torch.manual_seed(0)
    true_mean = torch.tensor([-3.0, 0.5, 4.0])
    true_std = torch.tensor([0.5, 2.0, 6.0])
    layer = bl.BatchlessNorm1d(3, std_param=std_param, nll=nll, affine=False)
    opt = torch.optim.Adam(bl.statistics_parameters(layer), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 600, 0.3)
    for _ in range(2400):
        x = true_mean + true_std * torch.randn(1, 3)
        opt.zero_grad()
        y = layer(x)
        loss = y.sum() * 0.0 if nll == "implicit" else bl.nll_loss(layer)  # no task: only the NLL trains
        loss.backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(layer.mean.detach(), true_mean, rtol=0, atol=0.15 * true_std.max())
    torch.testing.assert_close(layer.std.detach(), true_std, rtol=0.12, atol=0)


def test_gauged_nll_is_zero_on_matched_data_and_positive_otherwise():
    torch.manual_seed(0)
    layer = bl.BatchlessNorm2d(4, nll="explicit")
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([1.0, -2.0, 0.0, 10.0]))
        layer.set_std(torch.tensor([0.1, 1.0, 3.0, 20.0]))
    x = layer.mean.view(1, -1, 1, 1) + layer.std.view(1, -1, 1, 1) * torch.randn(64, 4, 16, 16)
    layer(x.detach())
    assert abs(bl.nll_loss(layer).item()) < 0.01
    layer(x.detach() * 2)
    assert bl.nll_loss(layer).item() > 0.1


def test_nll_keeps_no_activation_alive():
    layer = bl.BatchlessNorm2d(3, affine=False, nll="explicit")
    x = torch.randn(4, 3, 8, 8)
    ref = weakref.ref(x)
    y = layer(x)
    del x, y
    gc.collect()
    assert ref() is None  # only per-channel moments were kept
    bl.nll_loss(layer).backward()
    assert layer.mean.grad is not None and layer.raw_std.grad is not None


def test_eval_records_no_nll_and_trains_nothing():
    layer = make_layer((4, 3, 5))
    layer.eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.mean.grad is None and layer.raw_std.grad is None
    assert layer.weight.grad is not None and x.grad is not None
    assert bl.nll_loss(layer).item() == 0.0


@pytest.mark.parametrize("std_param", ["log", "abs", "inv"])
def test_init_values_and_parameter_set(std_param):
    layer = bl.BatchlessNorm2d(5, std_param=std_param, init_mean=2.0, init_std=3.0)
    torch.testing.assert_close(layer.mean.detach(), torch.full((5,), 2.0))
    torch.testing.assert_close(layer.std.detach(), torch.full((5,), 3.0))
    assert [n for n, _ in layer.named_parameters()] == ["mean", "raw_std", "weight", "bias"]
    assert list(bl.statistics_parameters(layer)) == [layer.mean, layer.raw_std]
    no_affine = bl.BatchlessNorm2d(5, affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    assert bl.BatchlessNorm2d(5, shared=True).mean.shape == (1,)


def test_round_trips_state_dict_deepcopy_pickle():
    layer = make_layer((4, 3, 5), std_param="inv", nll="explicit", shared=True)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    layer(x)  # a recorded NLL with an autograd graph must not break copying
    layer.eval()
    want = layer(x)
    clone = make_layer((4, 3, 5), std_param="inv", nll="explicit", shared=True, seed=1)
    clone.load_state_dict(layer.state_dict())
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (clone, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
                  torch.load(buf, weights_only=False)):
        other.eval()
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    assert "raw_std" in layer.state_dict() and len(layer.state_dict()) == 4


def test_loading_a_batchnorm_checkpoint_points_to_convert():
    with pytest.raises(ValueError, match="convert_batchnorm"):
        bl.BatchlessNorm2d(4).load_state_dict(torch.nn.BatchNorm2d(4).state_dict())


def test_explicit_mode_warns_when_nll_is_never_collected(monkeypatch):
    import batchless.modules as modules

    monkeypatch.setattr(modules, "_warned_unused", False)
    layer = bl.BatchlessNorm1d(3, nll="explicit")
    x = torch.randn(4, 3)
    layer(x)
    bl.nll_loss(layer)
    layer(x)  # the previous NLL was collected: no warning
    with pytest.warns(UserWarning, match="nll_loss"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistics_in_float32_output_in_input_dtype(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), bl.BatchlessNorm1d(6, nll="explicit"))
    x = torch.randn(16, 8) * 5 + 3
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    nll = bl.nll_loss(model)
    assert nll.dtype == torch.float32
    h = model[0](x).detach()  # float32 reference for the statistics
    ref_layer = copy.deepcopy(model[1])
    ref_layer(h)
    torch.testing.assert_close(nll, bl.nll_loss(ref_layer), rtol=0.02, atol=0.02)
    (y.float().sum() + nll).backward()
    assert model[1].mean.grad.dtype == torch.float32 and torch.isfinite(model[1].mean.grad).all()


def test_grad_scaler_with_nll_weight_learns_like_unscaled():
    x = torch.randn(16, 3, dtype=torch.float64) * 3 + 1
    reference, scaled = make_layer(x.shape), make_layer(x.shape)
    reference(x).sum().backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    with bl.nll_weight(scaler):
        y = scaled(x)
    scaler.scale(y.sum()).backward()
    scaler.unscale_(opt)
    for a, b in zip(scaled.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_grad_scaler_training_converges():
    # Plain SGD: its steps scale with the gradient, so an NLL gradient left unscaled by the scaler
    # (divided by 2**16 in unscale_) would leave the statistics where they started.
    torch.manual_seed(0)
    layer = bl.BatchlessNorm1d(2, affine=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 500, 0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for _ in range(2000):
        x = torch.tensor([5.0, -1.0]) + torch.tensor([2.0, 0.3]) * torch.randn(8, 2)
        opt.zero_grad()
        with bl.nll_weight(scaler):
            y = layer(x)
        scaler.scale(y.sum() * 0.0).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    torch.testing.assert_close(layer.mean.detach(), torch.tensor([5.0, -1.0]), rtol=0, atol=0.2)
    torch.testing.assert_close(layer.std.detach(), torch.tensor([2.0, 0.3]), rtol=0.15, atol=0)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2), bl.BatchlessNorm1d(2))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 8, 8)
    for m in (eager, compiled):
        m(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(bl.nll_loss(model), bl.nll_loss(eager))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 4),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    std_param=st.sampled_from(["log", "abs", "inv"]),
    nll=st.sampled_from(["implicit", "explicit"]),
    affine=st.booleans(),
    shared=st.booleans(),
)
def test_any_shape_matches_naive(n, c, spatial, std_param, nll, affine, shared):
    shape = (n, c, *spatial)
    layer = make_layer(shape, std_param, nll, shared, affine)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y_ref, nll_ref = naive_forward(x, layer.mean, layer.raw_std, layer.weight, layer.bias, std_param, layer.eps)
    torch.testing.assert_close(y, y_ref)
    if n == 0:
        assert abs(bl.nll_loss(layer).item()) < 1e-12  # an empty batch is no evidence
    else:
        torch.testing.assert_close(bl.nll_loss(layer), nll_ref.detach())
    loss = y.sum() + (bl.nll_loss(layer) if nll == "explicit" else 0)
    loss.backward()
    # every gradient: the naive formula's, with the NLL at weight 1 in both modes (none for an empty batch)
    params = [p for p in (layer.mean, layer.raw_std, layer.weight, layer.bias) if p is not None]
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y_ref, nll_ref = naive_forward(*leaves[:3], *(leaves[3:] if affine else (None, None)), std_param, layer.eps)
    (y_ref.sum() + (nll_ref if n else 0)).backward()
    for got, want in zip((x, *params), leaves, strict=True):
        want = torch.zeros_like(want) if want.grad is None else want.grad
        torch.testing.assert_close(torch.zeros_like(want) if got.grad is None else got.grad, want)


def float32_and_float64(cls, x, mean, std):
    """The layer in float32 and in float64 at ``mean``/``std``, after one explicit NLL backward on ``x``."""
    layers = []
    for dtype in (torch.float32, torch.float64):
        layer = cls(x.shape[1], nll="explicit", dtype=dtype)
        with torch.no_grad():
            layer.mean.fill_(mean)
            layer.set_std(torch.full((x.shape[1],), std, dtype=dtype))
        layer(x.to(dtype))
        bl.nll_loss(layer).backward()
        layers.append(layer)
    return layers


def test_nll_precise_for_a_large_badly_centred_channels_last_input():
    """2^19 elements per channel at 1000 +- 0.1: float32 sums of the raw input lose the mean by ~40 standard
    deviations (the CPU statistics kernel did, on the eager path)."""
    torch.manual_seed(0)
    x = (torch.randn(32, 2, 128, 128) * 0.1 + 1000).contiguous(memory_format=torch.channels_last)
    f32, f64 = float32_and_float64(bl.BatchlessNorm2d, x, 1000.02, 0.1)
    torch.testing.assert_close(f32.mean.grad.double(), f64.mean.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(f32.raw_std.grad.double(), f64.raw_std.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(256, 4), (16, 4, 32), (8, 4, 16, 16), (8, 4, 32, 32)])
def test_nll_precise_for_badly_scaled_float32_input(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 100 + 1000
    f32, f64 = float32_and_float64(LAYERS[max(len(shape) - 2, 1)], x, 990.0, 90.0)
    torch.testing.assert_close(bl.nll_loss(f32).double(), bl.nll_loss(f64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f32.mean.grad.double(), f64.mean.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f32.raw_std.grad.double(), f64.raw_std.grad, rtol=1e-4, atol=1e-5)
