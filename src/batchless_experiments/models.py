"""The experiments' models and normalization layers, selected by name.

Norm names: ``none``, ``bn`` (BatchNorm), ``gn`` (GroupNorm, up to 8 groups), ``ln`` (LayerNorm over
channels and positions, i.e. GroupNorm with one group, per-channel affine), ``batchless`` (= ``batchless-log``),
``batchless-abs``, ``batchless-log``, ``batchless-inv`` (the std parametrizations). Every model has a
normalization layer on its input and after each hidden layer, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

NORMS = ("none", "bn", "gn", "ln", "batchless", "batchless-abs", "batchless-log", "batchless-inv")
BATCHLESS_STD = {"batchless": "log", "batchless-abs": "abs", "batchless-log": "log", "batchless-inv": "inv"}


def is_batchless(norm: str) -> bool:
    return norm in BATCHLESS_STD


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; received {norm!r}")
    return norm


def make_norm(norm: str, num_features: int, dims: int, nll: str = "implicit") -> nn.Module:
    """A normalization layer for inputs ``(N, C)`` (``dims=0``), ``(N, C, L)`` (1) or ``(N, C, H, W)`` (2)."""
    check_norm(norm)
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return (nn.BatchNorm1d if dims < 2 else nn.BatchNorm2d)(num_features)
    if norm in ("gn", "ln"):
        groups = 1 if norm == "ln" else math.gcd(num_features, 8)
        return nn.GroupNorm(groups, num_features)
    import batchless as bl

    cls = bl.BatchlessNorm1d if dims < 2 else bl.BatchlessNorm2d
    return cls(num_features, std_param=BATCHLESS_STD[norm], nll=nll)


NormFactory = Callable[[int, int], nn.Module]


def conv_block(conv: nn.Module, channels: int, dims: int, norm: NormFactory, dropout: float) -> nn.Sequential:
    pool = nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)
    return nn.Sequential(conv, norm(channels, dims), nn.LeakyReLU(0.2), pool, nn.Dropout(dropout))


def dense_block(n_in: int, n_out: int, norm: NormFactory) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), norm(n_out, 0), nn.LeakyReLU(0.2))


def cnn1d(norm: NormFactory, width: int = 32, num_classes: int = 10, length: int = 40,
          dropout: float = 0.1) -> nn.Sequential:
    """The MNIST-1D analogue of the paper's CNN: conv 5/3/3 (``width`` channels, same padding, max-pool 2
    after each), dense 50, dense 50, dense ``num_classes``; input ``(N, 1, length)``."""
    convs = [conv_block(nn.Conv1d(c_in, width, k, padding=k // 2), width, 1, norm, dropout)
             for c_in, k in ((1, 5), (width, 3), (width, 3))]
    flat = width * (length // 8)
    return nn.Sequential(norm(1, 1), *convs, nn.Flatten(), dense_block(flat, 50, norm),
                         dense_block(50, 50, norm), nn.Linear(50, num_classes))


def cnn2d(norm: NormFactory, num_classes: int = 10, dropout: float = 0.25) -> nn.Sequential:
    """The paper's CIFAR-10 CNN: conv 64@7x7, 64@5x5, 64@3x3 (valid padding, LeakyReLU, max-pool 2, dropout
    0.25 after each), dense 50, dense 50, dense 10; input ``(N, 3, 32, 32)`` with the input normalization
    layer that the reference script builds but forgets to add."""
    convs = [conv_block(nn.Conv2d(c_in, 64, k), 64, 2, norm, dropout) for c_in, k in ((3, 7), (64, 5), (64, 3))]
    return nn.Sequential(norm(3, 2), *convs, nn.Flatten(), dense_block(64, 50, norm),
                         dense_block(50, 50, norm), nn.Linear(50, num_classes))


def mlp(norm: NormFactory, num_features: int = 20, num_classes: int = 4, hidden: int = 64) -> nn.Sequential:
    """MLP for the synthetic task: dense ``hidden`` x2, normalized input and hidden layers."""
    return nn.Sequential(norm(num_features, 0), dense_block(num_features, hidden, norm),
                         dense_block(hidden, hidden, norm), nn.Linear(hidden, num_classes))


def build_model(dataset: str, norm: str, *, nll: str = "implicit", width: int = 32,
                num_classes: int = 10) -> nn.Module:
    """The model the experiments use for ``dataset`` with normalization ``norm``."""
    check_norm(norm)

    def factory(channels: int, dims: int) -> nn.Module:
        return make_norm(norm, channels, dims, nll)

    if dataset == "mnist1d":
        return cnn1d(factory, width=width, num_classes=num_classes)
    if dataset == "cifar10":
        return cnn2d(factory, num_classes=num_classes)
    if dataset == "synthetic":
        return mlp(factory, num_classes=num_classes)
    raise ValueError(f"dataset must be one of mnist1d, synthetic, cifar10; received {dataset!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def statistics_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The batchless mu/sigma parameters of ``model`` (empty for the other norms)."""
    if not any(type(m).__module__.startswith("batchless.") for m in model.modules()):
        return []
    import batchless as bl

    return list(bl.statistics_parameters(model))
