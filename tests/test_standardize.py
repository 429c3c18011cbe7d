"""standardize_weights: the layers feeding batchless layers stop depending on their weights' scale, and
everything the layer promises (micro-batches, folding, checkpoints) still holds."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import batchless as bl
from batchless.standardize import WeightStandardization, is_standardized
from variants import assert_all_close, assert_close

pytestmark = pytest.mark.usefixtures("route")  # on each route a user gets on CPU


class Block(nn.Module):
    """A residual block (not a Sequential): the producers are found in its fx graph."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bl.BatchlessNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bl.BatchlessNorm2d(c)
        self.shortcut = nn.Conv2d(c, c, 1)  # feeds no batchless layer: left alone

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(bl.BatchlessNorm2d(3), nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4), nn.ReLU(),
                         Block(4), nn.MaxPool2d(2), bl.BatchlessNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 6), bl.BatchlessNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


X, Y = torch.randn(8, 3, 8, 8) * 2 + 1, torch.randint(0, 3, (8,))


def standardized(model):
    return sorted(name for name, m in model.named_modules() if is_standardized(m))


def test_standardizes_exactly_the_direct_producers_of_batchless_layers():
    model = bl.standardize_weights(make_model())
    # not the input layer's (no producer), the pooled one's (MaxPool2d), the shortcut, the classifier
    assert standardized(model) == ["1", "4.conv1", "4.conv2", "8"]
    bl.standardize_weights(model)  # a second call changes nothing
    assert all(len(m.parametrizations.weight) == 1 for m in model.modules() if is_standardized(m))


def test_standardized_weight_has_zero_mean_and_unit_fan_in_scale():
    conv = bl.standardize_weights(make_model())[4].conv1
    w = conv.weight.flatten(1).double()
    assert_close(w.mean(1), torch.zeros(4, dtype=torch.float64), torch.float32)
    assert_close(w.std(1, correction=0) * w.shape[1] ** 0.5, torch.ones(4, dtype=torch.float64), torch.float32)


def test_output_does_not_depend_on_the_producers_weight_scale():
    """The property that keeps slow statistics valid: scaling a producer's weights, per output channel,
    by any positive factor (as Adam's steps grow them) leaves the model's output unchanged."""
    model = bl.standardize_weights(make_model())
    bl.init_from_data(model, [X])
    want = model(X)
    with torch.no_grad():
        for m in model.modules():
            if is_standardized(m):
                original = m.parametrizations.weight.original
                original.mul_(torch.rand(original.shape[0], *[1] * (original.dim() - 1)) * 10 + 0.1)
    assert_close(model(X), want, torch.float32)


@pytest.mark.parametrize("m", [1, 3])
def test_micro_batches_stay_exact(m):
    model = bl.standardize_weights(make_model())
    bl.init_from_data(model, [X])
    model.zero_grad()
    (F.cross_entropy(model(X), Y)).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert want["1.parametrizations.weight.original"].abs().max() > 0
    model.zero_grad()
    bl.accumulate(model, F.cross_entropy, X, Y, micro_batch_size=m)
    assert_all_close({k: p.grad for k, p in model.named_parameters()}, want, torch.float32)


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_folds_into_standardized_producers(inplace):
    model = bl.standardize_weights(make_model())
    bl.init_from_data(model, [X])
    model.eval()
    want = model(X)
    folded = bl.fold(model, inplace=inplace)
    assert_close(folded(X), want, torch.float32)
    assert isinstance(folded[2], nn.Identity) and isinstance(folded[4].bn1, nn.Identity)
    assert type(folded[1]) is nn.Conv2d and not parametrize.is_parametrized(folded[1])
    if not inplace:  # the original keeps its standardization (a deep copy shares its class)
        assert standardized(model) == ["1", "4.conv1", "4.conv2", "8"]
        assert_close(model(X), want, torch.float32)


def test_state_dict_round_trip():
    model = bl.standardize_weights(make_model(0))
    bl.init_from_data(model, [X])
    other = bl.standardize_weights(make_model(1))
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    assert torch.equal(other(X), model(X))
    assert "1.parametrizations.weight.original" in model.state_dict()


def test_other_normalization_layers_with_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3), bl.BatchlessNorm2d(4))
    bl.standardize_weights(model, before=(nn.GroupNorm,))
    assert standardized(model) == ["0"]


class OwnNorm(nn.Module):
    """A user's normalization layer that torch.fx cannot trace into (control flow on values)."""

    def forward(self, x):
        return x / x.std() if x.std() > 0 else x


def test_a_users_own_layer_in_before_is_a_leaf_of_the_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), OwnNorm(), nn.ReLU(), nn.Conv2d(4, 4, 3), OwnNorm())
    bl.standardize_weights(model, before=(OwnNorm,))
    assert standardized(model) == ["0", "3"]


def test_warns_when_the_statistics_were_already_set():
    model = make_model()
    bl.init_from_data(model, [X])
    with pytest.warns(UserWarning, match="init_from_data"):
        bl.standardize_weights(model)
    bl.init_from_data(model, [X])
    with warnings.catch_warnings(record=True) as record:  # already standardized: nothing changes
        warnings.simplefilter("always")
        bl.standardize_weights(model)
    assert record == []


def test_errors_say_what_was_expected():
    with pytest.raises(bl.BatchlessError, match="torch.nn.Module, got list"):
        bl.standardize_weights([nn.Linear(2, 2)])
    with pytest.raises(bl.BatchlessError, match="no nn.Conv1d/2d/3d or nn.Linear"):
        bl.standardize_weights(nn.Sequential(nn.ReLU(), bl.BatchlessNorm1d(3)))
    with pytest.raises(bl.BatchlessError, match="non-empty tuple of nn.Module subclasses, got"):
        bl.standardize_weights(make_model(), before=nn.GroupNorm)
    with pytest.raises(bl.BatchlessError, match="single weight"):
        bl.standardize_weights(nn.Sequential(nn.Linear(1, 3), bl.BatchlessNorm1d(3)))


def test_parametrization_dtypes():
    p = WeightStandardization()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        w = (torch.randn(5, 7, dtype=torch.float64) * 3 + 2).to(dtype)
        out = p(w)
        w64 = w.double()
        want = (w64 - w64.mean(1, keepdim=True)) / (w64.std(1, correction=0, keepdim=True) * 7 ** 0.5)
        assert out.dtype == dtype
        assert_close(out.double(), want, dtype)


def test_copies_keep_working():
    model = bl.standardize_weights(make_model())
    bl.init_from_data(model, [X])
    model.eval()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(X), model(X))


def test_an_optimizer_made_before_keeps_training_the_weights():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bl.standardize_weights(model)
    bl.init_from_data(model, [X])
    raw = model[1].parametrizations.weight.original
    before = raw.detach().clone()
    F.cross_entropy(model(X), Y).backward()
    optimizer.step()
    assert not torch.equal(raw, before)
