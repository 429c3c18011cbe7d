"""fold: no batchless layer remains, the eval output is unchanged, and layers after a conv/linear cost nothing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchless as bl
from batchless.fold import ChannelAffine, affine_of
from batchless.modules import _BatchlessNorm
from variants import CLASSES, assert_close


def randomize(model):
    """Non-trivial statistics and affine parameters for every batchless layer."""
    with torch.no_grad():
        for _, layer in bl.loss.batchless_layers(model):
            layer.set_mean(torch.empty_like(layer.raw_mean).uniform_(-2, 2))
            layer.set_std(torch.rand_like(layer.raw_mean) * 2 + 0.1)
            if layer.affine:
                layer.weight.uniform_(-2, 2)
                layer.bias.uniform_(-1, 1)
    return model.eval()


def assert_same_eval_output(model, folded, x):
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32)


def kinds(model):
    return [type(m) for m in model.modules()]


class Residual(nn.Module):
    """conv -> layer (foldable); a conv whose output also feeds the skip (not foldable); shared input layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = bl.BatchlessNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = bl.BatchlessNorm2d(4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(h) + h  # h is used twice: bn2 cannot fold into conv2


def test_fold_sequential_and_residual():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        bl.BatchlessNorm2d(3), nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4, shared=True), nn.ReLU(),
        Residual(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), bl.BatchlessNorm1d(8, affine=False), nn.ReLU(),
        nn.Linear(8, 3),
    ))
    folded = bl.fold(model)
    assert not any(isinstance(m, _BatchlessNorm) for m in folded.modules())
    assert kinds(folded).count(nn.Identity) == 3  # model[2], residual.bn1, model[7]
    assert isinstance(folded[0], ChannelAffine) and isinstance(folded[4].bn2, ChannelAffine)
    assert folded[4].conv1.bias is not None
    assert_same_eval_output(model, folded, torch.randn(5, 3, 8, 8) * 10 + 3)
    assert isinstance(model[2], bl.BatchlessNorm2d)  # the original is untouched


def test_fold_refuses_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), bl.BatchlessNorm1d(4))
    with pytest.raises(bl.BatchlessError, match=r"training mode: 1\. Call model.eval\(\)"):
        bl.fold(model)


class Untraceable(nn.Module):
    """Control flow on a value defeats symbolic tracing of the whole model; its children still trace."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(2, 3, 3), bl.BatchlessNorm1d(3))
        self.norm = bl.BatchlessNorm1d(3)

    def forward(self, x):
        h = self.block(x)
        return self.norm(h) if h.sum() > 0 else -self.norm(h)


def test_untraceable_model_folds_its_traceable_children():
    torch.manual_seed(0)
    model = randomize(Untraceable())
    with pytest.warns(UserWarning, match=r"cannot trace <root> \(Untraceable: .*reaches into a child only by"):
        folded = bl.fold(model)
    assert isinstance(folded.block[1], nn.Identity) and isinstance(folded.norm, ChannelAffine)
    assert_same_eval_output(model, folded, torch.randn(4, 2, 9))


def test_not_folded_when_producer_is_shared_or_channels_differ():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 1)
    model = randomize(nn.Sequential(
        conv, bl.BatchlessNorm1d(3), conv, bl.BatchlessNorm1d(3),  # conv called twice
        nn.Linear(5, 5), bl.BatchlessNorm1d(3),  # (N, 3, 5) -> linear over the last dim, layer over dim 1
    ))
    folded = bl.fold(model)
    assert kinds(folded).count(ChannelAffine) == 3
    assert_same_eval_output(model, folded, torch.randn(4, 3, 5))


class Tied(nn.Module):
    """conv1 -> layer looks foldable, but conv2 shares conv1's weight (weight tying)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 3, 1), bl.BatchlessNorm2d(3), nn.Conv2d(3, 3, 1)
        self.conv2.weight = self.conv1.weight

    def forward(self, x):
        return self.norm(self.conv1(x)) + self.conv2(x)


def test_not_folded_into_a_producer_with_tied_weights():
    torch.manual_seed(0)
    model = randomize(Tied())
    folded = bl.fold(model)
    assert isinstance(folded.norm, ChannelAffine) and folded.conv2.weight is folded.conv1.weight
    assert_same_eval_output(model, folded, torch.randn(2, 3, 4, 4))


def test_layer_hooks_survive_fold():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 3, 1), bl.BatchlessNorm2d(3)))
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    doubling = model[1].register_forward_hook(lambda module, args, out: out * 2)
    folded = bl.fold(model)
    assert isinstance(folded[1], ChannelAffine)  # not folded: the hooks see the layer's input and output
    assert_same_eval_output(model, folded, torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(seen[1], seen[0])  # the pre-hook got the conv's output both times
    folded = bl.fold(model, inplace=True)
    doubling.remove()  # the handle of a hook on the layer reaches its replacement
    assert folded[1]._forward_pre_hooks and not folded[1]._forward_hooks


def test_inplace_and_root_layer():
    layer = randomize(bl.BatchlessNorm1d(3))
    folded = bl.fold(layer, inplace=True)
    assert isinstance(folded, ChannelAffine)
    assert_same_eval_output(layer, folded, torch.randn(6, 3))
    model = randomize(nn.Sequential(nn.Linear(2, 3), bl.BatchlessNorm1d(3)))
    assert bl.fold(model, inplace=True) is model and isinstance(model[1], nn.Identity)


def test_affine_of_matches_layer_in_float64():
    layer = randomize(bl.BatchlessNorm2d(4, dtype=torch.float64, std_param="inv"))
    scale, shift = affine_of(layer)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), rtol=1e-12,
                                   atol=1e-12)


def test_bench_fold_reports_ratio():
    from batchless_experiments.bench_fold import benchmark_fold

    result = benchmark_fold(batch=2, image=8, rounds=3, warmup=1, quick=True)
    assert result["batchless_layers_left"] == 0 and result["ratio"] > 0 and result["max_rel_diff"] <= 1e-5


@settings(max_examples=15, deadline=None)
@given(dims=st.integers(1, 3), n=st.integers(1, 3), bias=st.booleans(), shared=st.booleans(), seed=st.integers(0, 99))
def test_fold_conv_any_rank_and_batch_size(dims, n, bias, shared, seed):
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, 2, bias=bias)
    layer = CLASSES[dims + 2](3, shared=shared)
    model = randomize(nn.Sequential(conv, layer))
    folded = bl.fold(model)
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(n, 2, *[4] * dims)
    assert_same_eval_output(model, folded, x)
