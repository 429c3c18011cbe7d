"""timm models through convert_batchnorm, fold and to_batchnorm, with the real timm package.

timm's CNNs normalise with ``BatchNormAct2d``, a BatchNorm2d subclass that applies its own dropout and
activation: the conversion must keep both (same eval function), and the converted model must fold and go
back to BatchNorm. timm imports torchvision, and PyPI's torchvision for the CPU torch of ``make install``
cannot load beside it, so ``make test-timm`` runs this file in a venv of its own (see the Makefile).
"""

import functools
import pathlib
import re

import pytest
import torch
from torch import nn

import batchless as bl
import variants

try:
    import timm
    from timm.layers import BatchNormAct2d
except Exception as error:  # ImportError, or torchvision's RuntimeError when its build does not match torch's
    pytest.skip(f"timm cannot be imported here ({type(error).__name__}: {error}); `make test-timm` runs these "
                "tests in a venv of their own", allow_module_level=True)

# name: the number of BatchNormAct2d layers (all of the model's BatchNorms)
MODELS = {"efficientnet_b0": 49, "regnetx_002": 44, "mobilenetv3_small_100": 34}


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def randomize_running_stats(model):
    """Statistics as after training, in ranges deep timm models stay finite with."""
    return variants.randomize_running_stats(model, mean=(-0.5, 0.5), var=(0.5, 2), weight=(0.5, 1.5),
                                            bias=(-0.2, 0.2))


@functools.cache
def timm_model(name):
    torch.manual_seed(0)
    return randomize_running_stats(timm.create_model(name, pretrained=False, num_classes=10))


def activations(model):
    return sorted(type(m.act).__name__ for m in model.modules() if isinstance(m, BatchNormAct2d))


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_converts_folds_and_goes_back(name):
    model = timm_model(name)
    assert sum(isinstance(m, BatchNormAct2d) for m in model.modules()) == MODELS[name]
    acts = activations(model)
    converted = bl.convert_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    norm_acts = [m for m in converted.modules() if isinstance(getattr(m, "norm", None), bl.BatchlessNorm2d)]
    assert len(norm_acts) == MODELS[name]
    assert sorted(type(m.act).__name__ for m in norm_acts) == acts  # every layer keeps its own activation
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        assert max_rel_diff(converted(x), want) <= 1e-5
        folded = bl.fold(converted)
        assert not any(isinstance(m, bl.modules._BatchlessNorm) for m in folded.modules())
        assert sum(isinstance(m.norm, nn.Identity) for m in folded.modules() if hasattr(m, "norm")) == MODELS[name]
        assert max_rel_diff(folded(x), want) <= 1e-5
        back = bl.to_batchnorm(converted)
        assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == MODELS[name]
        assert max_rel_diff(back(x), want) <= 1e-5
        assert max_rel_diff(bl.convert_batchnorm(back)(x), want) <= 1e-5


def test_dropout_of_the_layer_is_kept():
    torch.manual_seed(0)
    bn = BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=functools.partial(nn.Dropout2d, p=0.5))
    layer = bl.convert_batchnorm(bn)
    assert list(dict(layer.named_children())) == ["norm", "drop", "act"]
    assert layer.training and layer.drop.training and type(layer.drop) is nn.Dropout2d
    x = torch.randn(4, 6, 5, 5)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    want = nn.functional.silu(nn.functional.dropout2d(layer.norm(x), 0.5))
    torch.testing.assert_close(got, want)
    assert (got == 0).all(dim=(2, 3)).any()  # whole channels dropped: the dropout ran in training
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.silu(layer.norm(x)))


def test_sync_batchnorm_act_converts():
    model = timm_model("mobilenetv3_small_100")
    sync = timm.layers.convert_sync_batchnorm(model)
    assert any(type(m).__name__ == "SyncBatchNormAct" for m in sync.modules())
    converted = bl.convert_batchnorm(sync)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_diff(converted(x), model(x)) <= 1e-5


def test_converted_timm_model_trains():
    converted = bl.convert_batchnorm(timm_model("regnetx_002")).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    nn.functional.cross_entropy(converted(x), y).backward()
    stats = list(bl.statistics_parameters(converted))
    assert len(stats) == 2 * MODELS["regnetx_002"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stats)
    assert torch.isfinite(bl.nll_loss(converted))


def test_teaching_replaces_the_builtin_conversion():
    model = nn.Sequential(BatchNormAct2d(3, act_layer=nn.ReLU)).eval()
    bl.register_conversion(BatchNormAct2d, lambda module, layer: layer)  # drops the activation, on purpose
    try:
        assert type(bl.convert_batchnorm(model)[0]) is bl.BatchlessNorm2d
    finally:
        bl.register_conversion(BatchNormAct2d, None)
    assert type(bl.convert_batchnorm(model)[0]) is nn.Sequential


def test_readme_timm_snippet_runs():
    """The README's ```python timm blocks (test_readme.py runs the others, in a venv without timm)."""
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python timm\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
