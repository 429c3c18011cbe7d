"""init_from_data: after it, every layer's normalized output has mean 0 and std 1 on the data it saw."""

import weakref

import pytest
import torch
from torch import nn

import batchless as bl
from variants import STD_PARAMS


def normalized_outputs(model, batches):
    """Per layer: the per-channel (shared layers: pooled) mean and std of (x - mean) / std over all batches."""
    seen = {}

    def hook(layer, args, out):
        x = args[0]
        xhat = (x - layer.mean.view(1, -1, *[1] * (x.dim() - 2))) / layer.std.view(1, -1, *[1] * (x.dim() - 2))
        rows = xhat.transpose(0, 1).flatten(1).double()
        seen.setdefault(layer, []).append(rows.flatten()[None] if layer.shared else rows)

    handles = [layer.register_forward_hook(hook) for _, layer in bl.loss.batchless_layers(model)]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {layer: (torch.cat(v, 1).mean(1), torch.cat(v, 1).std(1, correction=0)) for layer, v in seen.items()}


def assert_standardized(model, batches, tol=0.05):
    stats = normalized_outputs(model, batches)
    assert len(stats) == len(list(bl.loss.batchless_layers(model)))
    for mean, std in stats.values():
        assert mean.abs().max() <= tol and (std - 1).abs().max() <= tol, (mean, std)


class Block(nn.Module):
    """A residual block with a branch: bn3 depends on bn1 (through the skip) and on bn2."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = bl.BatchlessNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = bl.BatchlessNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.side = bl.BatchlessNorm2d(c)  # parallel to bn1: same stratum
        self.bn3 = bl.BatchlessNorm2d(c)

    def forward(self, x):
        h = self.bn1(x)
        h = h + self.conv2(torch.relu(self.bn2(self.conv1(h)))) * 5 + 3
        return self.bn3(h + self.side(x))


class CountingBatches:
    """A re-iterable that counts its passes and checks that no earlier batch is kept alive (streaming)."""

    def __init__(self, tensors):
        self.tensors, self.passes = tensors, 0

    def __iter__(self):
        self.passes += 1
        refs = []
        for x in self.tensors:  # CPython frees on the last reference: no gc.collect() needed
            assert sum(r() is not None for r in refs[:-1]) == 0, "init_from_data kept an earlier batch alive"
            fresh = x.clone()
            refs.append(weakref.ref(fresh))
            yield (fresh, torch.zeros(len(fresh)))  # (input, target) tuples
            del fresh


def test_badly_scaled_data_in_micro_batches_of_one():
    torch.manual_seed(0)
    model = nn.Sequential(bl.BatchlessNorm1d(3), nn.Linear(3, 8), bl.BatchlessNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 4), bl.BatchlessNorm1d(4, shared=True), nn.Dropout(0.5))
    data = [torch.randn(1, 3) * 100 + 1000 for _ in range(64)]
    model.train()
    with torch.no_grad():
        model[1].weight.mul_(50)
    bl.init_from_data(model, data)
    assert model.training and model[0].training
    assert model[0].raw_mean.grad is None and model[0]._last_nll is None
    assert (model[0].mean - 1000).abs().max() < 50
    assert_standardized(model, data)


@pytest.mark.parametrize("std_param", STD_PARAMS)
def test_residual_network_in_dependency_order(std_param):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), Block(4), Block(4))
    for _, layer in bl.loss.batchless_layers(model):
        layer.std_param = std_param
    model[1].eval()
    tensors = [torch.randn(3, 2, 7, 7) * 10 - 4 for _ in range(4)]
    batches = CountingBatches(tensors)
    bl.init_from_data(model, batches)
    assert model.training and not model[1].training and model[2].bn2.training
    # one probe batch + one pass per stratum: {bn1, side}, bn2, bn3 per block -> 6 strata
    assert batches.passes == 1 + 6
    assert_standardized(model, tensors)


def test_measuring_all_layers_in_one_pass_would_fail():
    """The dependency order matters: the same network with every layer measured at once is not standardized."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), Block(4))
    tensors = [torch.randn(3, 2, 7, 7) * 10 - 4 for _ in range(2)]
    stats = {}
    for layer, (mean, std) in normalized_outputs(model, tensors).items():  # inputs at the initial mean/std
        stats[layer] = (mean * layer.std.detach() + layer.mean.detach(), std * layer.std.detach())
    for layer, (mean, std) in stats.items():
        with torch.no_grad():
            layer.set_mean(mean)
            layer.set_std(std)
    with pytest.raises(AssertionError):
        assert_standardized(model, tensors)


def test_max_batches_and_errors():
    model = nn.Sequential(nn.Linear(2, 3), bl.BatchlessNorm1d(3))
    tensors = [torch.randn(4, 2) for _ in range(5)]
    bl.init_from_data(model, tensors, max_batches=2)
    assert_standardized(model, tensors[:2], tol=1e-4)
    with pytest.raises(bl.BatchlessError, match="re-iterable.*generator"):
        bl.init_from_data(model, (t for t in tensors))
    with pytest.raises(bl.BatchlessError, match=r"got one tensor of shape \(4, 2\): pass \[x\]"):
        bl.init_from_data(model, tensors[0])
    with pytest.raises(bl.BatchlessError, match="no batches"):
        bl.init_from_data(model, [])
    with pytest.raises(bl.BatchlessError, match="max_batches"):
        bl.init_from_data(model, tensors, max_batches=0)


def test_constant_channel_is_only_centred_and_unused_layer_warns():
    model = nn.ModuleList([bl.BatchlessNorm1d(2), bl.BatchlessNorm1d(2)])
    model.forward = lambda x: model[0](x)  # model[1] is never called
    data = [torch.tensor([[5.0, 1.0], [5.0, 3.0]])]
    with pytest.warns(UserWarning, match="not called.*: 1$"):
        bl.init_from_data(model, data)
    torch.testing.assert_close(model[0].mean.detach(), torch.tensor([5.0, 2.0]))
    torch.testing.assert_close(model[0].std.detach(), torch.tensor([1.0, 1.0]))
