"""Differential privacy with the real Opacus: batchless layers under DP-SGD.

Opacus refuses BatchNorm (a batch's statistics mix its samples) and DP users fall back to GroupNorm;
batchless statistics are per-sample-separable parameters. Under Opacus's default ``grad_sample_mode="hooks"``
(which runs layers it does not know through ``torch.func``) the statistics get exact per-sample gradients,
are clipped with the rest of each sample's gradient and noised like every other parameter.
"""

import copy

import pytest
import torch
from torch import nn

import batchless as bl

opacus = pytest.importorskip("opacus")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),  # reproducible noise is what we need
    # Opacus's hooks on the first layer, whose input needs no gradient: PyTorch says so on every DP model
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

B, CLIP = 8, 0.05
STATS = ("1.raw_mean", "1.raw_std")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), bl.BatchlessNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def make_data():
    torch.manual_seed(1)
    return torch.randn(B, 1, 8, 8) * 2 + 1, torch.randint(0, 3, (B,))


def private_step(model, noise_multiplier, mode="hooks"):
    """One DP-SGD step (lr 0: the parameters stay) on one fixed batch; the per-sample gradients Opacus
    computed and the gradient the optimizer stepped with, by parameter name."""
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B)
    model = copy.deepcopy(model)
    module, optimizer, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode)
    nn.functional.cross_entropy(module(x), y).backward()
    per_sample = {name: p.grad_sample.clone() for name, p in module._module.named_parameters()}
    optimizer.step()
    return per_sample, {name: p.grad.clone() for name, p in module._module.named_parameters()}


def per_sample_reference(model):
    """Each sample's gradient on its own (a batch of one), the definition of a per-sample gradient."""
    x, y = make_data()
    grads = []
    for i in range(B):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}


def test_statistics_get_exact_per_sample_gradients():
    model = make_model()
    per_sample, _ = private_step(model, noise_multiplier=0.0)
    want = per_sample_reference(copy.deepcopy(model))
    for name in want:
        torch.testing.assert_close(per_sample[name], want[name], rtol=1e-4, atol=1e-6)


def test_statistics_are_clipped_with_the_rest_of_each_sample_and_noised():
    model = make_model()
    per_sample, stepped = private_step(model, noise_multiplier=0.0)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)  # whole-sample norms
    assert (norms > CLIP).all()  # every sample is clipped, and its statistics' share counts in its norm
    assert all(per_sample[name].flatten(1).norm(dim=1).max() > 0.01 * CLIP for name in STATS)
    factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    for name, g in per_sample.items():  # no noise: the mean of the clipped per-sample gradients
        want = (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / B
        torch.testing.assert_close(stepped[name], want, rtol=1e-5, atol=1e-8)

    torch.manual_seed(2)
    _, noisy = private_step(model, noise_multiplier=1.0)
    residual = {name: noisy[name] - stepped[name] for name in stepped}  # Gaussian, std noise * CLIP / B
    sigma = 1.0 * CLIP / B
    everything = torch.cat([r.flatten() for r in residual.values()])
    assert 0.8 * sigma < everything.std().item() < 1.2 * sigma
    for name in STATS:
        assert (residual[name] != 0).all() and residual[name].abs().max() < 6 * sigma


def test_expanded_weights_mode_is_refused_clearly():
    with pytest.raises(bl.BatchlessError, match="grad_sample_mode"):
        private_step(make_model(), noise_multiplier=0.0, mode="ew")
