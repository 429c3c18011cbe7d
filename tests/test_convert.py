"""convert_batchnorm / to_batchnorm: conversion leaves the eval function unchanged, refuses what it cannot keep."""

import copy
import functools

import pytest
import torch
from torch import nn

import batchless as bl
from batchless.modules import _BatchlessNorm
from variants import STD_PARAMS, STD_SPEEDS, assert_close, randomize_running_stats


def trained_bn_model():
    """A conv + linear BatchNorm model after a few training steps: non-trivial running stats and affine."""
    return copy.deepcopy(_trained_bn_model())


@functools.cache
def _trained_bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    )
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.5
    for _ in range(5):  # plain SGD by hand: torch.optim's first use imports torch._dynamo (seconds)
        x = torch.randn(16, 3, 8, 8) * 3 + 2
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return model.eval()


@pytest.mark.parametrize("std_param", STD_PARAMS)
@pytest.mark.parametrize("std_speed", STD_SPEEDS)
def test_convert_trained_model_keeps_eval_output(std_param, std_speed):
    bn_model = trained_bn_model()
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    model = bl.convert_batchnorm(bn_model, std_param=std_param, std_speed=std_speed)
    x = torch.randn(10, 3, 8, 8) * 3 + 2
    with torch.no_grad():
        assert_close(model(x), bn_model(x), torch.float32)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(bl.BatchlessNorm2d) == 2 and kinds.count(bl.BatchlessNorm1d) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(not m.training for m in model.modules())
    assert model[4].weight is None and model[1].std_param == std_param and model[8].std_speed == std_speed
    assert not model[1].decay_affine  # exempt from weight decay by default (optim.py) ...
    assert bl.convert_batchnorm(bn_model, decay_affine=True)[1].decay_affine  # ... or not, as asked
    # the original is untouched
    assert isinstance(bn_model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())


def test_convert_keeps_training_flag_dtype_and_requires_grad():
    bn = nn.BatchNorm1d(5, dtype=torch.float64)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.requires_grad_(False)
    layer = bl.convert_batchnorm(bn)  # a BatchNorm at the root
    assert type(layer) is bl.BatchlessNorm1d and layer.training
    assert layer.mean.dtype == torch.float64 and not layer.weight.requires_grad and layer.bias.requires_grad
    torch.testing.assert_close(layer.mean, bn.running_mean)
    torch.testing.assert_close(layer.std, (bn.running_var + bn.eps).sqrt())


def test_convert_inplace_and_shared_layers():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    out = bl.convert_batchnorm(model, inplace=True)
    assert out is model and type(model[1]) is bl.BatchlessNorm2d and model[1] is model[3]


def test_sync_batchnorm_conversion_and_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6))
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.1, 3)
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_(-1, 1)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    model.eval()
    converted = bl.convert_batchnorm(sync)
    assert all(isinstance(converted[i], _BatchlessNorm) for i in (1, 4))
    x = torch.randn(4, 3, 9, 9)
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float32)
        back = bl.to_batchnorm(converted)
        assert type(back[1]) is nn.SyncBatchNorm and not back[1].training
        assert_close(back(x), model(x), torch.float32)


class BatchNormAct2d(nn.BatchNorm2d):
    """A user's BatchNorm with a fused activation, which a conversion must not drop (timm's real one is tested in
    test_timm.py)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that adds no behaviour: converted like its base."""


class LeakyBatchNormAct2d(BatchNormAct2d):
    """A subclass of a taught class that changes its forward: not covered by what was taught."""

    def forward(self, x):
        return nn.functional.leaky_relu(nn.BatchNorm2d.forward(self, x))


class QuietBatchNormAct2d(BatchNormAct2d):
    """A subclass of a taught class that keeps its forward: converted like it."""


@pytest.fixture
def conversions():
    """Undo what a test registers."""
    saved = dict(bl.convert._CONVERSIONS)
    yield
    bl.convert._CONVERSIONS.clear()
    bl.convert._CONVERSIONS.update(saved)


def test_subclass_with_behaviour_is_refused_with_all_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Sequential(BatchNormAct2d(4)),
                          nn.BatchNorm2d(4))
    with pytest.raises(bl.BatchlessError, match=r"(?s)1: BatchNormAct2d.*2\.0: BatchNormAct2d") as info:
        bl.convert_batchnorm(model, inplace=True)
    assert "fused activation" in str(info.value) and "register_conversion" in str(info.value)
    assert type(model[3]) is nn.BatchNorm2d  # nothing changed before the error
    plain = bl.convert_batchnorm(nn.Sequential(RenamedBatchNorm2d(4)))
    assert type(plain[0]) is bl.BatchlessNorm2d


def test_registered_subclass_converts_folds_and_goes_back(conversions):
    bl.register_conversion(BatchNormAct2d, lambda module, layer: nn.Sequential(layer, module.act))
    torch.manual_seed(0)
    model = randomize_running_stats(nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), QuietBatchNormAct2d(4), nn.BatchNorm2d(4)))
    converted = bl.convert_batchnorm(model)
    assert [type(converted[i]) for i in (1, 3, 4)] == [nn.Sequential, nn.Sequential, bl.BatchlessNorm2d]
    assert type(converted[1][0]) is bl.BatchlessNorm2d and type(converted[1][1]) is nn.ReLU
    assert not converted[1].training and not converted[1][0].training
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
        assert_close(converted(x), want, torch.float32)
        folded = bl.fold(converted)
        assert type(folded[1][0]) is nn.Identity and type(folded[1][1]) is nn.ReLU
        assert_close(folded(x), want, torch.float32)
        back = bl.to_batchnorm(converted)
        assert type(back[1][0]) is nn.BatchNorm2d
        assert_close(back(x), want, torch.float32)


def test_registered_conversion_covers_only_what_it_was_taught(conversions):
    bl.register_conversion(BatchNormAct2d, lambda module, layer: nn.Sequential(layer, module.act))
    with pytest.raises(bl.BatchlessError, match=r"<root>: LeakyBatchNormAct2d subclasses BatchNormAct2d, whose "
                                                r"conversion is registered, but overrides its forward"):
        bl.convert_batchnorm(LeakyBatchNormAct2d(3))
    bl.register_conversion(BatchNormAct2d, None)
    with pytest.raises(bl.BatchlessError, match="adds behaviour"):
        bl.convert_batchnorm(BatchNormAct2d(3))
    bl.register_conversion(BatchNormAct2d, lambda module, layer: "not a module")
    with pytest.raises(bl.BatchlessError, match=r"registered for BatchNormAct2d .* returned str, not an nn\.Module"):
        bl.convert_batchnorm(BatchNormAct2d(3))


@pytest.mark.parametrize(("cls", "fn", "message"), [
    (nn.GroupNorm, lambda m, layer: layer, r"a subclass of a torch\.nn BatchNorm class \(cls\), got <class"),
    (nn.BatchNorm2d, lambda m, layer: layer, "converts the BatchNorm classes themselves"),
    (BatchNormAct2d, "act", r"fn\(module, layer\) -> nn\.Module or None, got 'act'"),
])
def test_register_conversion_refuses_wrong_arguments(conversions, cls, fn, message):
    with pytest.raises(bl.BatchlessError, match=message):
        bl.register_conversion(cls, fn)


def test_no_running_stats_points_to_init_from_data():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(bl.BatchlessError, match=r"1: .*track_running_stats=False.*init_from_data"):
        bl.convert_batchnorm(model)


def test_unknown_layer_kwargs_are_refused():
    with pytest.raises(bl.BatchlessError, match="std_param, nll.*got shared"):
        bl.convert_batchnorm(nn.BatchNorm1d(3), shared=True)


def test_explicit_nll_kwarg_reaches_layers():
    model = bl.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), nll="explicit")
    assert model[0].nll == "explicit"


@pytest.mark.parametrize("shared", [False, True])
def test_to_batchnorm_keeps_eval_output(shared):
    torch.manual_seed(1)
    model = nn.Sequential(bl.BatchlessNorm2d(3, shared=shared), nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5), bl.BatchlessNorm1d(5, affine=False)).eval()
    with torch.no_grad():
        for _, layer in bl.loss.batchless_layers(model):
            layer.set_mean(torch.empty_like(layer.raw_mean).uniform_(-3, 3))
            layer.set_std(torch.rand_like(layer.raw_mean) * 3 + 0.1)
            if layer.affine:
                layer.weight.uniform_(-2, 2)
                layer.bias.uniform_(-1, 1)
        model[2].set_std(torch.cat([torch.tensor([1e-3]), model[2].std[1:]]))  # std**2 = 1e-6 < eps: this
        # BatchNorm needs eps 0
    bn_model = bl.to_batchnorm(model)
    assert bn_model[2].eps == 0.0 and bn_model[5].eps == 1e-5
    assert [type(bn_model[i]) for i in (0, 2, 5)] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert not any(isinstance(m, _BatchlessNorm) for m in bn_model.modules())
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert_close(bn_model(x), model(x), torch.float32)
    again = bl.convert_batchnorm(bn_model)
    with torch.no_grad():
        assert_close(again(x), model(x), torch.float32)


@pytest.mark.parametrize(("std_param", "running_var", "message"), [
    ("abs", [1e-4, 1.0], r"goes down to 0\.01, below eps=0\.1, the smallest std that std_param='abs' represents"),
    ("inv", [1.0, 400.0], r"goes up to 20, above 1/eps=10, the largest std that std_param='inv' represents"),
])
def test_convert_refuses_std_the_parametrization_cannot_hold(std_param, running_var, message):
    bn = nn.BatchNorm1d(2, eps=0.0).eval()
    bn.running_var.copy_(torch.tensor(running_var))
    with pytest.raises(bl.BatchlessError, match=r"<root>: its std sqrt\(running_var \+ eps\) " + message):
        bl.convert_batchnorm(bn, std_param=std_param, eps=0.1)
    layer = bl.convert_batchnorm(bn, std_param=std_param, eps=1e-3).eval()  # representable: the same function
    x = torch.randn(4, 2)
    with torch.no_grad():
        assert_close(layer(x), bn(x), torch.float32)


def test_to_batchnorm_on_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4)).eval()
    bn_model = bl.to_batchnorm(model)
    assert isinstance(bn_model[1], nn.BatchNorm2d) and bn_model[1].running_var.is_meta


def test_to_batchnorm_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = bl.convert_batchnorm(trained_bn_model())
    bn_model = bl.to_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "model.onnx"
    torch.onnx.export(bn_model, (x,), str(path), input_names=["x"], verbose=False)  # the default (dynamo) exporter
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x), torch.float32)
