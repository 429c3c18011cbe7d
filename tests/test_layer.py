"""The layer's semantics against the reference, on every route, and the properties that make it useful."""

import collections
import contextlib
import copy
import gc
import io
import pickle
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchless as bl
from batchless import _state, fused
from reference import naive_forward
from variants import (
    FORMULA,
    NLL_MODES,
    ROUTED,
    ROUTED_CUDA,
    STD_PARAMS,
    STD_SPEEDS,
    Variant,
    assert_all_close,
    assert_close,
    forced,
    reference_step,
    step,
    variants,
)


@pytest.mark.parametrize("v", FORMULA + ROUTED + ROUTED_CUDA, ids=str)
def test_training_step_matches_the_reference(v):
    """Output, NLL and every gradient, in the input's dtype and memory layout, on the route named."""
    layer, x = v.layer(), v.input()
    g = torch.randn(v.shape).to(v.device, v.dtype).contiguous(memory_format=v.layout)
    with forced(v.route):
        assert fused.route(x, layer).value == v.expected_route()
        y, got = step(layer, x, g)
    y_ref, nll_ref, want = reference_step(layer, x, g)
    assert y.dtype == v.dtype and y.is_contiguous(memory_format=v.layout)
    assert got["x"].dtype == v.dtype and got["x"].is_contiguous(memory_format=v.layout)
    assert_close(y, y_ref, v.dtype)
    assert_close(bl.nll_loss(layer), nll_ref.detach(), v.dtype)
    assert_all_close(got, want, v.dtype)


@pytest.mark.parametrize("v", ROUTED, ids=str)
def test_evaluation_matches_the_reference(v):
    """Without gradients (native: the affine kernel alone), and with them (frozen-statistics
    fine-tuning: x, weight and bias get the output's gradients, mean and std none)."""
    layer, x = v.layer().eval(), v.input()
    with forced(v.route), torch.no_grad():
        assert fused.route(x, layer).value == v.expected_route(training=False, needs_grad=False)
        y = layer(x)
    assert y.dtype == v.dtype and y.is_contiguous(memory_format=v.layout)
    y_ref, _, want = reference_step(layer, x, training=False)
    assert_close(y, y_ref, v.dtype)
    with forced(v.route):
        assert fused.route(x, layer).value == v.expected_route(training=False)
        assert_all_close(step(layer, x)[1], want, v.dtype)


@pytest.mark.filterwarnings("ignore:a BatchlessNorm layer")
@pytest.mark.parametrize("v", variants(route=["native", "eager"], nll=NLL_MODES, dtype=[torch.float32]),
                         ids=str)
def test_batch_output_equals_per_instance_outputs(v):
    layer, x = v.layer(), v.input(requires_grad=False)
    with forced(v.route):
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        layer.eval()
        in_eval = layer(x)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_eval, together, rtol=0, atol=1e-6)  # train and eval: one formula


@pytest.mark.parametrize("v", variants(route=["native", "native-weighted", "eager"],
                                       std_param=["log", "inv"], shape=[(8, 5, 3)],
                                       dtype=[torch.float32]), ids=str)
def test_double_backward_matches_the_reference(v):
    """Gradient penalties (WGAN-GP, R1) differentiate the input gradient again: gx = gy * weight /
    std must carry the weight's share (mean and std are constants in the output, as in the formula)."""
    torch.manual_seed(0)
    conv, layer = torch.nn.Conv1d(5, 5, 1), v.layer()
    params = [*conv.parameters(), *layer.parameters()]
    x = torch.randn(v.shape, requires_grad=True)

    def penalty_grads(forward):
        energy = (forward(x).square() * torch.linspace(0.5, 1.5, 3)).sum()
        (gx,) = torch.autograd.grad(energy, x, create_graph=True)
        got = torch.autograd.grad(gx.square().sum(), [x, *params], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(got, [x, *params], strict=True)]

    with forced(v.route):
        got = penalty_grads(lambda x: layer(conv(x)))
    args = (layer.raw_mean, layer.raw_std, layer.weight, layer.bias, v.std_param, layer.eps, layer.std_speed,
            layer.mean_speed)
    want = penalty_grads(lambda x: naive_forward(conv(x), *args)[0])
    assert want[-2].abs().min() > 0  # the weight's share, which a constant gx would miss
    # the penalty's backward passes the layer once: (implicit mode) the NLL gradient, once
    want[3:5] = torch.autograd.grad(naive_forward(conv(x), *args)[1], [layer.raw_mean, layer.raw_std])
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32)


@pytest.mark.filterwarnings("ignore:a BatchlessNorm layer")
@pytest.mark.parametrize("std_param", STD_PARAMS)
def test_gradcheck(std_param):
    layer = Variant((3, 3, 4), std_param, nll="explicit").layer()
    x = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)

    def output(x, weight, bias):  # mean/std are constants in the output path
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    def nll(raw_mean, raw_std):  # and x is a constant in the NLL
        torch.func.functional_call(layer, {"raw_mean": raw_mean, "raw_std": raw_std}, (x.detach(),))
        return bl.nll_loss(layer)

    assert torch.autograd.gradcheck(output, (x, layer.weight, layer.bias))
    assert torch.autograd.gradgradcheck(nll, (layer.raw_mean, layer.raw_std))


def test_stop_gradients_both_ways():
    v = Variant((8, 3, 5), nll="explicit")
    layer, x = v.layer(), v.input()
    y = layer(x)
    g_mean, g_std = torch.autograd.grad(y.square().sum(), [layer.raw_mean, layer.raw_std], allow_unused=True)
    assert g_mean is None and g_std is None  # the task loss never reaches the statistics
    (g_x,) = torch.autograd.grad(bl.nll_loss(layer), [x], allow_unused=True)
    assert g_x is None  # the NLL never reaches the input


def test_implicit_equals_explicit_with_weight_one():
    implicit, explicit = variants(base=Variant((6, 3, 4, 4)), nll=NLL_MODES)
    x = implicit.input()
    torch.testing.assert_close(step(implicit.layer(), x)[1], step(explicit.layer(), x)[1])


@pytest.mark.parametrize("nll", NLL_MODES)
@pytest.mark.parametrize("sizes", [[1] * 6, [2, 2, 2], [4, 1, 1]])
def test_accumulated_micro_batches_equal_full_batch(nll, sizes):
    v = Variant((6, 3, 5), nll=nll)
    x, target = v.input(requires_grad=False), v.input(seed=2, requires_grad=False)
    full_layer, micro_layer = v.layer(), v.layer()

    def loss_of(layer, xb, tb, w):
        with bl.nll_weight(w):
            task = ((layer(xb) - tb) ** 2).mean()
        return (task + (bl.nll_loss(layer) if nll == "explicit" else 0)) * w

    loss_of(full_layer, x, target, 1.0).backward()
    for xb, tb in zip(x.split(sizes), target.split(sizes), strict=True):
        loss_of(micro_layer, xb, tb, len(xb) / len(x)).backward()
    for p_full, p_micro in zip(full_layer.parameters(), micro_layer.parameters(), strict=True):
        torch.testing.assert_close(p_micro.grad, p_full.grad, rtol=1e-10, atol=1e-12)


def test_implicit_accumulation_without_weight_counts_each_forward_once(route):
    # Documented: without nll_weight each micro-batch forward adds a full weight-1 NLL gradient, so
    # k equal micro-batches give k times the full batch's NLL gradient.
    v = Variant((8, 3), dtype=torch.float32)
    x, full, micro = v.input(requires_grad=False), v.layer(), v.layer()
    (full(x) * 0).sum().backward()
    for xb in x.chunk(4):
        (micro(xb) * 0).sum().backward()
    torch.testing.assert_close(micro.raw_mean.grad, 4 * full.raw_mean.grad)


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("nll", NLL_MODES)
def test_statistics_converge_at_batch_size_one(std_param, nll, route):
    torch.manual_seed(0)
    true_mean = torch.tensor([-3.0, 0.5, 4.0])
    true_std = torch.tensor([0.5, 2.0, 6.0])
    layer = bl.BatchlessNorm1d(3, std_param=std_param, nll=nll, affine=False, std_speed=1.0,
                               mean_speed=1.0)  # the paper's
    opt = torch.optim.Adam(bl.statistics_parameters(layer), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 600, 0.3)
    for _ in range(2400):
        x = true_mean + true_std * torch.randn(1, 3)
        opt.zero_grad()
        y = layer(x)
        loss = y.sum() * 0.0 if nll == "implicit" else bl.nll_loss(layer)  # only the NLL trains
        loss.backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(layer.mean.detach(), true_mean, rtol=0, atol=0.15 * true_std.max())
    torch.testing.assert_close(layer.std.detach(), true_std, rtol=0.12, atol=0)


def test_gauged_nll_is_zero_on_matched_data_and_positive_otherwise(route):
    torch.manual_seed(0)
    layer = bl.BatchlessNorm2d(4, nll="explicit")
    with torch.no_grad():
        layer.set_mean(torch.tensor([1.0, -2.0, 0.0, 10.0]))
        layer.set_std(torch.tensor([0.1, 1.0, 3.0, 20.0]))
    x = layer.mean.view(1, -1, 1, 1) + layer.std.view(1, -1, 1, 1) * torch.randn(64, 4, 16, 16)
    layer(x.detach())
    assert abs(bl.nll_loss(layer).item()) < 0.01
    layer(x.detach() * 2)
    assert bl.nll_loss(layer).item() > 0.1


def test_nll_keeps_no_activation_alive(route):
    layer = bl.BatchlessNorm2d(3, affine=False, nll="explicit")
    x = torch.randn(4, 3, 8, 8)
    ref = weakref.ref(x)
    y = layer(x)
    del x, y
    gc.collect()
    assert ref() is None  # only per-channel moments were kept
    bl.nll_loss(layer).backward()
    assert layer.raw_mean.grad is not None and layer.raw_std.grad is not None


def test_eval_records_no_nll_and_trains_nothing(route):
    v = Variant((4, 3, 5), dtype=torch.float32)
    layer, x = v.layer().eval(), v.input()
    layer(x).sum().backward()
    assert layer.raw_mean.grad is None and layer.raw_std.grad is None
    assert layer.weight.grad is not None and x.grad is not None
    assert bl.nll_loss(layer).item() == 0.0


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("std_speed", STD_SPEEDS)
def test_init_values_and_parameter_set(std_param, std_speed):
    layer = bl.BatchlessNorm2d(5, std_param=std_param, init_mean=2.0, init_std=3.0, std_speed=std_speed)
    torch.testing.assert_close(layer.mean.detach(), torch.full((5,), 2.0))
    torch.testing.assert_close(layer.std.detach(), torch.full((5,), 3.0))
    layer.set_std(torch.tensor([0.5, 1.0, 2.0, 7.0, 100.0]))
    torch.testing.assert_close(layer.std.detach(), torch.tensor([0.5, 1.0, 2.0, 7.0, 100.0]))
    layer.set_mean(torch.tensor([-3.0, 0.0, 1.0, 2.0, 50.0]))
    torch.testing.assert_close(layer.mean.detach(), torch.tensor([-3.0, 0.0, 1.0, 2.0, 50.0]))
    torch.testing.assert_close(layer.raw_mean.detach(), layer.mean.detach() / layer.mean_speed)
    assert [n for n, _ in layer.named_parameters()] == ["raw_mean", "raw_std", "weight", "bias"]
    assert list(bl.statistics_parameters(layer)) == [layer.raw_mean, layer.raw_std]
    paper = bl.BatchlessNorm2d(5, std_speed=1.0)  # the paper's method, by one argument: the mean follows std
    assert (paper.std_speed, paper.mean_speed) == (1.0, 1.0) and paper.mean is paper.raw_mean
    assert (layer.mean_speed, bl.BatchlessNorm2d(5, std_speed=1.0, mean_speed=0.3).mean_speed) == (std_speed, 0.3)
    no_affine = bl.BatchlessNorm2d(5, affine=False)
    assert no_affine.weight is None and no_affine.bias is None
    assert bl.BatchlessNorm2d(5, shared=True).mean.shape == (1,)


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
@pytest.mark.parametrize("which", ["std_speed", "mean_speed"])
def test_a_speed_scales_the_steps_on_its_statistic_only(std_param, optimizer, which):
    """sigma is std_param's function of ``std_speed * raw_std``, mu is ``mean_speed * raw_mean``: an optimizer
    whose step does not depend on the gradient's scale (Adam) moves the speed's statistic (sigma's
    parametrization, mu) ``speed`` times as far as at 1, SGD ``speed**2`` times; the other's steps are the same."""
    x = torch.randn(16, 3, dtype=torch.float64) * 3 + 1
    moved = {}
    for speed in (1.0, 0.1):
        layer = Variant((16, 3), std_param, affine=False, **{"std_speed": 1.0, "mean_speed": 1.0, which: speed}).layer()
        before = (layer.mean.detach().clone(), layer.std_speed * layer.raw_std.detach().clone())
        opt = getattr(torch.optim, optimizer)(bl.statistics_parameters(layer), lr=1e-3)
        (layer(x) * 0).sum().backward()
        opt.step()
        after = (layer.mean.detach(), layer.std_speed * layer.raw_std.detach())
        moved[speed] = [a - b for a, b in zip(after, before, strict=True)]
    changed, same = (1, 0) if which == "std_speed" else (0, 1)
    assert moved[1.0][changed].abs().min() > 0
    torch.testing.assert_close(moved[0.1][same], moved[1.0][same], rtol=1e-12, atol=0)
    ratio = 0.1 if optimizer == "Adam" else 0.01  # (Adam: up to its eps, 1e-8 against gradients of ~1e-3)
    torch.testing.assert_close(moved[0.1][changed], ratio * moved[1.0][changed], rtol=1e-4, atol=0)


def test_repr_shows_the_options():
    assert repr(bl.BatchlessNorm2d(4, std_speed=0.5, mean_speed=0.2, shared=True)) == (
        "BatchlessNorm2d(4, eps=1e-05, affine=True, std_param='log', nll='implicit', shared=True, std_speed=0.5, "
        "mean_speed=0.2)")
    assert repr(bl.BatchlessNorm1d(2, decay_affine=True)).endswith("mean_speed=0.1, decay_affine=True)")


def test_round_trips_state_dict_deepcopy_pickle():
    v = Variant((4, 3, 5), std_param="inv", nll="explicit", shared=True)
    layer, x = v.layer(), v.input(requires_grad=False)
    layer(x)  # a recorded NLL with an autograd graph must not break copying
    layer.eval()
    want = layer(x)
    clone = v.layer(seed=1)
    clone.load_state_dict(layer.state_dict())
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (clone, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
                  torch.load(buf, weights_only=False)):
        other.eval()
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    assert list(layer.state_dict()) == ["raw_mean", "raw_std", "weight", "bias"]
    assert layer.state_dict()._metadata[""]["version"] == type(layer)._version == 3


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("metadata", [{"": {"version": 1}}, None, {"": {"version": 2}}],
                         ids=["version-1", "no-version", "version-2"])
def test_an_older_checkpoint_loads_with_its_function(std_param, metadata):
    """Versions 1 and 2 stored the mean itself as `mean` (gain 1); version 1 also sigma's parametrization itself
    in raw_std (gain 1), version 2 behind the layer's std_speed. A default layer (speeds 0.1) loads them as
    raw_mean = mean / mean_speed and (version 1) raw_std / std_speed: the same function up to float rounding."""
    std_speed = 0.1 if metadata == {"": {"version": 2}} else 1.0
    v = Variant((4, 3, 5), std_param, dtype=torch.float32, std_speed=std_speed, mean_speed=1.0)
    old_layer, x = v.layer().eval(), v.input(requires_grad=False)  # what an older layer computed
    old = collections.OrderedDict((k.replace("raw_mean", "mean"), t.detach().clone())
                                  for k, t in old_layer.state_dict().items())
    if metadata is not None:
        old._metadata = metadata
    layer = bl.BatchlessNorm1d(3, std_param=std_param).eval()
    layer.load_state_dict(old)
    assert layer.mean_speed == 0.1 and not torch.equal(layer.raw_mean, old_layer.raw_mean)
    assert torch.equal(layer.raw_std, old_layer.raw_std) == (std_speed == 0.1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), old_layer(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.std, old_layer.std, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.mean, old_layer.mean, rtol=1e-6, atol=0)
    assert torch.equal(old["raw_std"], old_layer.raw_std)  # the caller's checkpoint is left as it was
    assert torch.equal(old["mean"], old_layer.raw_mean)
    again = bl.BatchlessNorm1d(3, std_param=std_param)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.raw_std, layer.raw_std) and torch.equal(again.raw_mean, layer.raw_mean)


def test_a_layer_pickled_before_the_speeds_keeps_its_function():
    v = Variant((4, 3, 5), std_speed=1.0, mean_speed=1.0)
    layer, x = v.layer().eval(), v.input(requires_grad=False)
    old = copy.deepcopy(layer)
    del old.std_speed, old.mean_speed, old.decay_affine  # what an earlier version pickled: no speeds,
    # a parameter `mean`, no decay_affine
    old._parameters = {("mean" if k == "raw_mean" else k): p for k, p in old._parameters.items()}
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.std_speed == 1.0 and loaded.mean_speed == 1.0 and loaded.decay_affine is False
    assert [n for n, _ in loaded.named_parameters()] == ["raw_mean", "raw_std", "weight", "bias"]
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)


def test_writing_into_the_computed_mean_raises_instead_of_doing_nothing():
    layer = bl.BatchlessNorm1d(3)  # mean_speed 0.1: mean is computed from raw_mean
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))  # the habit from BatchNorm's running_mean
    with pytest.raises(ValueError, match=r"mean was written to in place.*layer.set_mean"):
        layer(torch.randn(4, 3))
    layer(torch.randn(4, 3))  # said once; set_mean is the way
    layer.set_mean(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(layer.mean.detach(), torch.tensor([1.0, 2.0, 3.0]))
    layer(torch.randn(4, 3))
    paper = bl.BatchlessNorm1d(3, std_speed=1.0)  # mean is the parameter: writing into it works
    with torch.no_grad():
        paper.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    paper(torch.randn(4, 3))
    torch.testing.assert_close(paper.raw_mean.detach(), torch.tensor([1.0, 2.0, 3.0]))


def test_loading_a_batchnorm_checkpoint_points_to_convert():
    with pytest.raises(ValueError, match="convert_batchnorm"):
        bl.BatchlessNorm2d(4).load_state_dict(torch.nn.BatchNorm2d(4).state_dict())


def test_explicit_mode_warns_when_nll_is_never_collected(route):
    layer = bl.BatchlessNorm1d(3, nll="explicit")
    x = torch.randn(4, 3)
    layer(x)
    bl.nll_loss(layer)
    layer(x)  # the previous NLL was collected: no warning
    with pytest.warns(UserWarning, match="nll_loss"):
        layer(x)


def two_layer_model() -> torch.nn.Module:
    return torch.nn.Sequential(bl.BatchlessNorm1d(3), torch.nn.Linear(3, 4), bl.BatchlessNorm1d(4, init_std=2.0))


def training_forwards(model: torch.nn.Module, x: torch.Tensor) -> list:
    """The warnings of two training forwards of ``model``, and of one of a fresh model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
        model(x)
        two_layer_model()(x)
    return caught


def test_training_from_the_initial_statistics_warns_once_with_the_fix(route):
    caught = training_forwards(two_layer_model(), torch.randn(8, 3))
    assert len(caught) == 1 and caught[0].filename == __file__  # the user's line
    message = str(caught[0].message)
    assert message.startswith("BatchlessNorm1d(3) started training with its mean and std still at init_mean=0.0 and "
                              "init_std=1.0")
    assert "std_speed=0.1" in message and "batchless.init_from_data(model, batches)" in message
    assert "batchless.convert_batchnorm(model)" in message


def test_each_layer_checks_its_first_training_forward_only():
    model, x = two_layer_model(), torch.randn(8, 3)
    model.eval()(x)  # evaluation: nothing to check
    with torch.no_grad():
        model[0].raw_mean.add_(1.0)  # set by hand: not at the initial values
    assert [str(w.message)[:18] for w in training_forwards(model.train(), x)] == ["BatchlessNorm1d(4)"]
    _state.reset()  # a process that has not warned yet: the layers checked already
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)


def set_by_set_std(model, x):
    for layer in (model[0], model[2]):
        layer.set_std(torch.full_like(layer.std, layer.init_std))  # even to the initial value: the user's choice
    return model


def set_by_a_checkpoint(model, x):
    model.load_state_dict(two_layer_model().state_dict())  # even one of the initial statistics
    return model


SETTERS = {
    "init_from_data": lambda model, x: bl.init_from_data(model, [x]),
    "convert_batchnorm": lambda model, x: bl.convert_batchnorm(bl.to_batchnorm(model)).train(),
    "set_std": set_by_set_std,
    "load_state_dict": set_by_a_checkpoint,
}


@pytest.mark.parametrize("setter", SETTERS)
def test_statistics_set_by_the_library_or_a_checkpoint_do_not_warn(setter):
    x = torch.randn(8, 3)
    model = SETTERS[setter](two_layer_model(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()


def test_torch_func_and_compile_do_not_check():
    model, x = two_layer_model(), torch.randn(8, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
        torch.compile(model, backend="eager", fullgraph=True)(x)
    assert not [w for w in caught if "started training" in str(w.message)]
    assert len(training_forwards(model, x)) == 1  # the first eager forward still does


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistics_in_float32_output_in_input_dtype(dtype, route):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), bl.BatchlessNorm1d(6, nll="explicit"))
    x = torch.randn(16, 8) * 5 + 3
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    nll = bl.nll_loss(model)
    assert nll.dtype == torch.float32
    ref_layer = copy.deepcopy(model[1])
    ref_layer(model[0](x).detach())  # float32 reference for the statistics
    torch.testing.assert_close(nll, bl.nll_loss(ref_layer), rtol=0.02, atol=0.02)
    (y.float().sum() + nll).backward()
    assert model[1].raw_mean.grad.dtype == torch.float32 and torch.isfinite(model[1].raw_mean.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_scaler_with_nll_weight_learns_like_unscaled(dtype, route):
    v = Variant((16, 3), dtype=dtype)
    x, reference, scaled = v.input(requires_grad=False), v.layer(), v.layer()
    reference(x).sum().backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    with bl.nll_weight(scaler):
        y = scaled(x)
    scaler.scale(y.sum()).backward()
    scaler.unscale_(opt)
    for a, b in zip(scaled.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_grad_scaler_training_converges(route):
    # Plain SGD: its steps scale with the gradient, so an NLL gradient left unscaled by the scaler
    # (divided by 2**16 in unscale_) would leave the statistics where they started.
    torch.manual_seed(0)
    layer = bl.BatchlessNorm1d(2, affine=False, std_speed=1.0, mean_speed=1.0)  # the paper's method
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


def test_torch_compile_matches_eager(route):
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
@given(n=st.integers(0, 4), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), max_size=3),
       std_param=st.sampled_from(STD_PARAMS), nll=st.sampled_from(NLL_MODES), affine=st.booleans(),
       shared=st.booleans(), std_speed=st.sampled_from(STD_SPEEDS))
def test_any_shape_matches_the_reference(n, c, spatial, std_param, nll, affine, shared, std_speed):
    v = Variant((n, c, *spatial), std_param, nll, shared, affine, std_speed)
    layer, x = v.layer(), v.input()
    y, got = step(layer, x)
    y_ref, nll_ref, want = reference_step(layer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref)
    if n == 0:
        assert abs(bl.nll_loss(layer).item()) < 1e-12  # an empty batch is no evidence
    else:
        torch.testing.assert_close(bl.nll_loss(layer), nll_ref.detach())
    assert_all_close(got, want, torch.float64)


def float32_and_float64(x, mean, std):
    """The layer in float32 and in float64 at ``mean``/``std``, after one explicit NLL backward."""
    layers = []
    for dtype in (torch.float32, torch.float64):
        v = Variant(tuple(x.shape), nll="explicit", dtype=dtype)
        layer = v.layer()
        with torch.no_grad():
            layer.set_mean(torch.full_like(layer.raw_mean, mean))
            layer.set_std(torch.full_like(layer.raw_mean, std))
        layer(x.to(dtype))
        bl.nll_loss(layer).backward()
        layers.append(layer)
    return layers


def test_nll_precise_for_a_large_badly_centred_channels_last_input(route):
    """2^19 elements per channel at 1000 +- 0.1: float32 sums of the raw input lose the mean by ~40
    standard deviations (ATen's statistics kernel did, on the eager route)."""
    torch.manual_seed(0)
    x = (torch.randn(32, 2, 128, 128) * 0.1 + 1000).contiguous(memory_format=torch.channels_last)
    f32, f64 = float32_and_float64(x, 1000.02, 0.1)
    torch.testing.assert_close(f32.raw_mean.grad.double(), f64.raw_mean.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(f32.raw_std.grad.double(), f64.raw_std.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(256, 4), (16, 4, 32), (8, 4, 16, 16), (8, 4, 32, 32)])
def test_nll_precise_for_badly_scaled_float32_input(shape, route):
    torch.manual_seed(0)
    x = torch.randn(shape) * 100 + 1000
    f32, f64 = float32_and_float64(x, 990.0, 90.0)
    torch.testing.assert_close(bl.nll_loss(f32).double(), bl.nll_loss(f64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f32.raw_mean.grad.double(), f64.raw_mean.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(f32.raw_std.grad.double(), f64.raw_std.grad, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def nested_weights(*weights):
    with contextlib.ExitStack() as stack:
        for w in weights:
            stack.enter_context(bl.nll_weight(w))
        yield


@pytest.mark.parametrize("v", variants(base=Variant((4, 6, 5, 5), route="native"), nll=NLL_MODES,
                                       dtype=[torch.float32, torch.bfloat16], shared=[False, True]),
                         ids=str)
def test_native_route_agrees_with_eager(v):
    """The native node (nested NLL weights, an input without gradient, bfloat16 parameters) gives
    the eager route's gradients, in the parameters' dtypes."""
    cases = [(v.layer(), v.input(), lambda: nested_weights(0.5, 0.25)),
             (v.layer(), v.input(requires_grad=False), contextlib.nullcontext)]
    if v.dtype == torch.bfloat16:
        cases.append((v.layer().to(torch.bfloat16), v.input(), contextlib.nullcontext))
    for layer, x, block in cases:
        g = torch.linspace(-1, 1, x.numel()).view_as(x).to(x.dtype)
        results = []
        for route in ("native", "eager"):
            with forced(route), block():
                results.append(step(layer, x, g)[1])
        for name, got in results[0].items():
            assert got.dtype == results[1][name].dtype
            assert_close(got, results[1][name], v.dtype, msg=name)


def test_a_layer_takes_weight_or_bias_alone(cpu_kernels):
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, requires_grad=True)
    mean, std, p = (torch.rand(5, requires_grad=True) + 0.5 for _ in range(3))
    for args in ((p, None), (None, p)):
        results = []
        for route in ("native", "eager"):
            with forced(route):
                y = bl.functional.train_forward(x, mean, std, *args, 1.0).y
                results.append(torch.autograd.grad((y * y).sum(), [x, mean, std, p]))
        torch.testing.assert_close(*results)


def test_named_results():
    out = bl.functional.train_forward(torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, None, 1.0)
    assert out._fields == ("y", "a", "b", "finite") and out.y.shape == (4, 3)
