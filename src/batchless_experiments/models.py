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
import torch.nn.functional as F
from torch import nn

MODELS = ("cnn", "resnet", "mlp")
NORMS = ("none", "bn", "gn", "ln", "batchless", "batchless-abs", "batchless-log", "batchless-inv")
BATCHLESS_STD = {"batchless": "log", "batchless-abs": "abs", "batchless-log": "log", "batchless-inv": "inv"}


def is_batchless(norm: str) -> bool:
    return norm in BATCHLESS_STD


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; received {norm!r}")
    return norm


def make_norm(norm: str, num_features: int, dims: int, nll: str = "implicit", std_speed: float = 1.0,
              mean_speed: float = 1.0, decay_affine: bool = True) -> nn.Module:
    """A normalization layer for inputs ``(N, C)`` (``dims=0``), ``(N, C, L)`` (1) or ``(N, C, H, W)`` (2);
    ``nll``, ``std_speed``, ``mean_speed`` and ``decay_affine`` are the batchless layers' arguments (the
    last True by default here, as the study's cells before it existed ran; the library's default is False)."""
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
    return cls(num_features, std_param=BATCHLESS_STD[norm], nll=nll, std_speed=std_speed, mean_speed=mean_speed,
               decay_affine=decay_affine)


NormFactory = Callable[[int, int], nn.Module]


def standardize_weights(model: nn.Module) -> nn.Module:
    """``batchless.standardize_weights`` on the conv or linear layer feeding each normalization layer of
    ``model`` (for ``none``: the ``nn.Identity`` in its place), whatever the norm."""
    import batchless as bl

    norms = (bl.BatchlessNorm1d, bl.BatchlessNorm2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.Identity)
    return bl.standardize_weights(model, before=norms)


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


def cnn2d(norm: NormFactory, num_classes: int = 10, dropout: float = 0.25, in_channels: int = 3,
          width: int = 64, padding: int | str = 0) -> nn.Sequential:
    """The paper's CIFAR-10 CNN: conv ``width``@7x7, 5x5, 3x3 (LeakyReLU, max-pool 2, dropout after each),
    dense 50, dense 50, dense 10, with the input normalization layer that the reference script builds but
    forgets to add. For ``(N, 3, 32, 32)`` (the paper: width 64, valid padding, dropout 0.25) and, with
    ``padding="same"``, ``(N, 1, 28, 28)`` (28 -> 14 -> 7 -> 3)."""
    convs = [conv_block(nn.Conv2d(c_in, width, k, padding=padding), width, 2, norm, dropout)
             for c_in, k in ((in_channels, 7), (width, 5), (width, 3))]
    flat = width * (9 if padding == "same" else 1)
    return nn.Sequential(norm(in_channels, 2), *convs, nn.Flatten(), dense_block(flat, 50, norm),
                         dense_block(50, 50, norm), nn.Linear(50, num_classes))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv 3x3, norm, ReLU, conv 3x3, norm, plus a (1x1 conv + norm) shortcut where
    the shape changes; a norm after every conv."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(norm: Callable[[int], nn.Module], widths=(16, 32, 64), blocks: int = 1, num_classes: int = 10,
           in_channels: int = 3) -> nn.Sequential:
    """A small CIFAR-style ResNet (He et al. 2016, section 4.2): stem conv 3x3, 3 stages of ``blocks`` basic
    blocks (stride 2 from the second stage), global average pooling, one linear layer. ``blocks=1`` is
    ResNet-8, ``blocks=3`` ResNet-20. ``norm(channels)`` makes each normalization layer."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), norm(widths[0]), nn.ReLU()]
    c_in = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(c_in, w, 2 if i > 0 and b == 0 else 1, norm))
            c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def mlp(norm: NormFactory, num_features: int = 20, num_classes: int = 4, hidden: int = 64,
        in_channels: int | None = None) -> nn.Sequential:
    """MLP: dense ``hidden`` x2, normalized input and hidden layers. For the synthetic task the input is
    ``(N, num_features)``; for images (``in_channels`` given) ``(N, in_channels, H, W)`` with
    ``num_features = in_channels * H * W``, normalized per channel as in the CNNs, then flattened."""
    head = [norm(num_features, 0)] if in_channels is None else [norm(in_channels, 2), nn.Flatten()]
    return nn.Sequential(*head, dense_block(num_features, hidden, norm), dense_block(hidden, hidden, norm),
                         nn.Linear(hidden, num_classes))


def default_model(dataset: str) -> str:
    """The model a dataset uses unless ``--model`` says otherwise."""
    return "mlp" if dataset == "synthetic" else "cnn"


def default_width(dataset: str, model: str) -> int:
    """Channels of the CNNs (MNIST-1D 32, the paper's 64 on CIFAR-10, 16 on 28x28 images, so that the fair
    protocol's sweeps fit a 2-core machine), of the ResNet's first stage (16, as in He et al.) or the MLP's
    hidden units (64 on the synthetic task, 256 on images)."""
    if model == "mlp":
        return 64 if dataset == "synthetic" else 256
    if model == "cnn":
        return {"mnist1d": 32, "cifar10": 64}.get(dataset, 16)
    return 16


def build_model(dataset: str, norm: str, *, model: str | None = None, nll: str = "implicit",
                width: int | None = None, num_classes: int = 10, std_speed: float = 1.0,
                mean_speed: float = 1.0, decay_affine: bool = True) -> nn.Module:
    """The ``model`` (default: :func:`default_model`) for ``dataset`` with normalization ``norm``.

    ``width``: channels of the CNNs, or of the ResNet's first stage (its stages have width, 2 width,
    4 width); default :func:`default_width`."""
    check_norm(norm)
    model = model or default_model(dataset)
    width = width or default_width(dataset, model)

    def factory(channels: int, dims: int) -> nn.Module:
        return make_norm(norm, channels, dims, nll, std_speed, mean_speed, decay_affine)

    channels, size = {"fashion-mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32)}.get(dataset, (None, None))
    if (dataset, model) == ("mnist1d", "cnn"):
        return cnn1d(factory, width=width, num_classes=num_classes)
    if (dataset, model) == ("synthetic", "mlp"):
        return mlp(factory, num_classes=num_classes, hidden=width)
    if channels and model == "cnn":
        # 28x28: dropout 0.1 as in the MNIST-1D CNN; 0.25 made the 16-wide net underfit (EXPERIMENTS.md)
        return cnn2d(factory, num_classes, in_channels=channels, width=width, **(
            {"padding": "same", "dropout": 0.1} if channels == 1 else {}))
    if channels and model == "resnet":
        return resnet(lambda c: factory(c, 2), (width, 2 * width, 4 * width), num_classes=num_classes,
                      in_channels=channels)
    if channels and model == "mlp":
        return mlp(factory, channels * size * size, num_classes, hidden=width, in_channels=channels)
    allowed = {"mnist1d": "cnn", "synthetic": "mlp"}.get(dataset, "cnn, resnet, mlp")
    raise ValueError(f"model {model!r} is not available for {dataset}; expected one of: {allowed}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def statistics_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The batchless mu/sigma parameters of ``model`` (empty for the other norms)."""
    if not any(type(m).__module__.startswith("batchless.") for m in model.modules()):
        return []
    import batchless as bl

    return list(bl.statistics_parameters(model))
