"""accumulate: micro-batches of any size (1 included) give the full batch's gradients, in both nll modes."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import batchless as bl
from variants import NLL_MODES, assert_all_close, assert_close

pytestmark = pytest.mark.usefixtures("route")  # on each route a user gets on CPU


def make_model(nll, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        bl.BatchlessNorm1d(2, nll=nll), nn.Conv1d(2, 4, 3), bl.BatchlessNorm1d(4, nll=nll, std_param="inv"),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5), bl.BatchlessNorm1d(5, nll=nll, shared=True), nn.Linear(5, 3),
    )
    with torch.no_grad():  # statistics away from the data's, so that the NLL gradients are large
        for _, layer in bl.loss.batchless_layers(model):
            layer.set_mean(torch.empty_like(layer.raw_mean).uniform_(-1, 1))
            layer.set_std(torch.rand_like(layer.raw_mean) + 0.5)
    return model


def full_batch_grads(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    (loss + bl.nll_loss(model)).backward()  # nll_loss is detached in implicit mode: no effect there
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


DATA = (torch.randn(8, 2, 8) * 3 + 1, torch.randint(0, 3, (8,)))


@pytest.mark.parametrize("nll", NLL_MODES)
@pytest.mark.parametrize("m", [1, 3, 8])  # 3: micro-batches of unequal size (3, 3, 2)
def test_micro_batch_gradients_equal_full_batch(nll, m):
    x, y = DATA
    model = make_model(nll)
    want_loss, want = full_batch_grads(model, x, y)
    assert want["0.raw_mean"].abs().max() > 1e-3  # the statistics do get an NLL gradient
    model.zero_grad()
    loss = bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=m)
    assert abs(loss.item() - want_loss.item()) <= 1e-6 and not loss.requires_grad
    assert_all_close({k: p.grad for k, p in model.named_parameters()}, want, torch.float32)


@pytest.mark.parametrize("nll", NLL_MODES)
def test_a_layer_frozen_with_eval_adds_no_nll(nll):
    """After training steps, a layer switched to eval mode contributes nothing (no stale NLL of an
    earlier forward, whose graph is gone): accumulate and the plain explicit loop both run."""
    x, y = DATA
    model = make_model(nll)
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=4)
    model[2].eval()
    model.zero_grad()
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=4)
    assert model[2].raw_mean.grad is None and model[0].raw_mean.grad.abs().max() > 0
    model.zero_grad()
    (F.cross_entropy(model(x), y) + bl.nll_loss(model)).backward()
    assert model[2].raw_mean.grad is None and model[0].raw_mean.grad.abs().max() > 0


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("weight", [0.25, torch.tensor(0.25)])
def test_activation_checkpointing_keeps_the_forward_nll_weight(reentrant, weight):
    """The checkpointed forward runs again during backward, outside the nll_weight block: it must use the
    weight of the original forward (it raised a CheckpointError for tensor weights, or took weight 1)."""
    from torch.utils.checkpoint import checkpoint

    x, y = DATA
    x = x.clone().requires_grad_(reentrant)  # (reentrant checkpointing needs an input that requires grad)
    grads = []
    for checkpointed in (False, True):
        model = make_model("implicit")
        with bl.nll_weight(weight):
            out = checkpoint(model, x, use_reentrant=reentrant) if checkpointed else model(x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert_all_close(grads[1], grads[0], torch.float32)


def test_an_nll_weight_block_removes_its_own_weight():
    """Blocks that do not nest (two threads, or context managers closed out of order) leave the right weight."""
    from batchless.weighting import current_nll_weight

    outer, inner = bl.nll_weight(0.5), bl.nll_weight(0.25)
    outer.__enter__(), inner.__enter__()
    assert current_nll_weight() == (0.5, 0.25)
    outer.__exit__(None, None, None)
    assert current_nll_weight() == (0.25,)
    inner.__exit__(None, None, None)
    assert current_nll_weight() == 1.0


def test_naive_accumulation_gets_the_statistics_wrong():
    """Without the NLL weight, k micro-batches count the implicit NLL k times: the property is not trivial."""
    x, y = DATA
    model = make_model("implicit")
    _, want = full_batch_grads(model, x, y)
    model.zero_grad()
    for xi, yi in zip(x.split(2), y.split(2), strict=True):
        (F.cross_entropy(model(xi), yi) / 4).backward()
    got = {k: p.grad for k, p in model.named_parameters()}
    assert_close(got["0.weight"], want["0.weight"], torch.float32)
    with pytest.raises(AssertionError):
        assert_all_close(got, want, torch.float32)


def test_enclosing_nll_weight_scales_both_modes():
    x, y = DATA
    grads = {}
    for nll in NLL_MODES:
        model = make_model(nll)
        with bl.nll_weight(0.25):
            bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=3)
        grads[nll] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert_all_close(grads["explicit"], grads["implicit"], torch.float32)
    model = make_model("implicit")
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=3)
    torch.testing.assert_close(grads["implicit"]["0.raw_mean"], model[0].raw_mean.grad * 0.25)


class Wrapper(nn.Module):
    """Stands for DDP: counts the micro-batches run inside no_sync()."""

    def __init__(self, module):
        super().__init__()
        self.module, self.unsynced, self.inside = module, 0, False

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        yield
        self.inside = False

    def forward(self, x):
        self.unsynced += self.inside
        return self.module(x)


def test_gradients_sync_only_on_the_last_micro_batch():
    x, y = DATA
    model = Wrapper(make_model("implicit"))
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=3)
    assert model.unsynced == 2


def test_bad_arguments():
    x, y = DATA
    model = make_model("implicit")
    with pytest.raises(bl.BatchlessError, match="micro_batch_size must be a positive int, got 0"):
        bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=0)
    with pytest.raises(bl.BatchlessError, match=r"same number.*\(8, 2, 8\).*\(7,\)"):
        bl.accumulate(model, F.cross_entropy, x, y[:7], micro_batch_size=2)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), m=st.integers(1, 7), nll=st.sampled_from(NLL_MODES))
def test_any_batch_and_micro_batch_size(n, m, nll):
    x, y = DATA[0][:n], DATA[1][:n]
    model = make_model(nll)
    _, want = full_batch_grads(model, x, y)
    model.zero_grad()
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=m)
    assert_all_close({k: p.grad for k, p in model.named_parameters()}, want, torch.float32)
