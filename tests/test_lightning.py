"""Lightning's loss scaling and the implicit NLL, with the real Lightning.

Under ``Trainer(accumulate_grad_batches=k)`` Lightning divides each batch's loss by ``k``; under a GradScaler
it multiplies it by the scale before backward and divides the gradients by it again. The statistics must
get what they get in a plain loop over the same effective batch, like every other parameter: 1.0x.
"""

import copy

import pytest
import torch
from torch import nn

import batchless as bl

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from batchless.integrations.lightning import NLLWeight  # noqa: E402

# Lightning 2.6's own use of torch's pytree API, on every fit
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")

MICRO, K = 4, 4  # batches of 4, an optimizer step every 4 of them: the plain loop's batch is 16


class Classifier(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FirstStepGradients(L.Callback):
    """The gradients the optimizer's first step sees (after Lightning's unscale_)."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {name: p.grad.detach().clone() for name, p in pl_module.model.named_parameters()}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), bl.BatchlessNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def make_data():
    torch.manual_seed(1)
    return torch.randn(MICRO * K, 6) * 2 + 1, torch.randint(0, 3, (MICRO * K,))


def plain_loop_gradients(model, autocast=False):
    """One forward/backward of the whole effective batch."""
    model = copy.deepcopy(model)
    x, y = make_data()
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def lightning_gradients(model, *, callbacks=(), keep_nll_weight=True, accumulate=K, plugins=None):
    """The first optimizer step's gradients under a Trainer that steps every ``accumulate`` batches."""
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x) // accumulate)
    grads = FirstStepGradients()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[grads, *callbacks], plugins=plugins)
    if not keep_nll_weight:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, NLLWeight)]
    trainer.fit(Classifier(copy.deepcopy(model)), loader)
    return grads.grads


def ratios(got, want):
    """Per parameter, the least-squares factor got / want (1.0: the same gradient)."""
    return {name: ((got[name] * want[name]).sum() / want[name].square().sum()).item() for name in want}


STATS = ("1.raw_mean", "1.raw_std")


def test_every_trainer_has_one_nll_weight_callback():
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert sum(isinstance(cb, NLLWeight) for cb in trainer.callbacks) == 1, (
        "the lightning.pytorch.callbacks_factory entry point is missing: reinstall batchless (pip install -e .)")


@pytest.mark.parametrize("explicit_too", [False, True])
def test_accumulated_gradients_equal_the_plain_loop(explicit_too):
    model = make_model()
    want = plain_loop_gradients(model)
    got = lightning_gradients(model, callbacks=[NLLWeight()] if explicit_too else [])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_without_the_callback_the_statistics_get_k_times_their_gradient():
    """What the callback corrects: Lightning divides the loss by k, and the implicit NLL had weight 1."""
    model = make_model()
    factors = ratios(lightning_gradients(model, keep_nll_weight=False), plain_loop_gradients(model))
    assert all(factors[name] == pytest.approx(K, rel=1e-4) for name in STATS)
    assert all(factors[name] == pytest.approx(1, rel=1e-4) for name in factors if name not in STATS)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_scaler_of_16_mixed_precision(accumulate):
    """Lightning's MixedPrecision plugin with its GradScaler (on CUDA, precision="16-mixed" makes one; on the
    CPU the plugin takes it as an argument), scale 2**12: the statistics are unscaled like the rest."""
    model = make_model()
    want = plain_loop_gradients(model, autocast=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    got = lightning_gradients(model, accumulate=accumulate,
                              plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    factors = ratios(got, want)
    assert all(factor == pytest.approx(1, rel=1e-2) for factor in factors.values()), factors


def test_no_weight_is_left_in_force_after_a_skipped_batch_or_fit():
    """A module whose on_train_batch_start returns -1 ends the epoch without on_train_batch_end."""

    class Skipping(Classifier):
        weights = []

        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 1 else None

        def training_step(self, batch, batch_idx):
            self.weights.append(bl.weighting.current_nll_weight())
            return super().training_step(batch, batch_idx)

    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, accumulate_grad_batches=K, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Skipping(make_model()), loader)
    assert Skipping.weights == [(1 / K,)] * 3  # one batch per epoch, each with the weight of one block
    assert bl.weighting.current_nll_weight() == 1.0


def test_weight_decay_does_not_reach_the_batchless_parameters():
    """Lightning steps the optimizer with a closure; AdamW's decay of the batchless layers' mean,
    raw_std, weight and bias is cancelled in it as in a plain loop: they end as in a group without
    decay, the rest decayed."""

    class Decaying(Classifier):
        def __init__(self, model, groups):
            super().__init__(model)
            self.groups = groups

        def configure_optimizers(self):
            return torch.optim.AdamW(self.groups(self.model), lr=0.05, weight_decay=0.5)

    def fit(groups):
        module = Decaying(make_model(), groups)
        x, y = make_data()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=MICRO)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
        return dict(module.model.named_parameters())

    got = fit(lambda m: m.parameters())
    want = fit(lambda m: bl.param_groups(m, weight_decay=0.5))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["0.weight"], make_model()[0].weight)  # they trained (and decayed)
