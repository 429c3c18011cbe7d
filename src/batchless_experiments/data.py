"""Datasets of the experiments: Fashion-MNIST and MNIST (IDX files), MNIST-1D (generated offline), a synthetic
task, CIFAR-10 (local copy).

Every loader returns a :class:`Splits` of float32 inputs and int64 labels, with 20% of the training
data held out for validation by a seeded permutation (the same split for every norm and batch size).
No loader downloads anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

DATASETS = ("fashion-mnist", "mnist", "mnist1d", "synthetic", "cifar10")
IMAGES = ("fashion-mnist", "mnist", "cifar10")  # 2-D inputs (N, C, H, W)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors of one dataset."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def hold_out(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, num_classes: int,
             val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Split ``val_fraction`` of the training data off for validation with a seeded permutation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); received {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    if len(train) < 2 or n_val < 1 or len(y_test) < 1:
        raise ValueError(f"{len(y)} training and {len(y_test)} test samples are too few: a run needs >= 2 to train "
                         f"on, >= 1 to validate on ({val_fraction:g} of the training samples) and >= 1 test sample; "
                         "pass a larger --num-samples")

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return Splits(t(x[train], torch.float32), t(y[train], torch.int64),
                  t(x[val], torch.float32), t(y[val], torch.int64),
                  t(x_test, torch.float32), t(y_test, torch.int64), num_classes)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, ...]:
    # make_dataset re-seeds numpy's global generator (seed 42 of the package's default arguments);
    # restore the caller's state so that loading data has no side effect.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load_mnist1d(num_samples: int = 5000, val_fraction: float = 0.2) -> Splits:
    """MNIST-1D (Greydanus 2020) generated in memory: inputs ``(N, 1, 40)``, 10 classes.

    ``num_samples`` are split 80/20 into train/test by the package; 20% of train is then held out.
    """
    if num_samples < 100:
        raise ValueError(f"mnist1d needs num_samples >= 100; received {num_samples}")
    x, y, xt, yt = _mnist1d_arrays(num_samples)
    return hold_out(x[:, None, :], y, xt[:, None, :], yt, 10, val_fraction)


def make_synthetic(num_samples: int = 6000, num_features: int = 20, num_classes: int = 4,
                   seed: int = 1234) -> tuple[np.ndarray, ...]:
    """A classification task whose raw features are badly scaled and shifted.

    A latent ``z ~ N(0, I)`` of ``num_features`` dimensions is labelled by a fixed random two-layer
    teacher (tanh hidden layer, argmax over ``num_classes`` outputs). The model only sees
    ``x = offset + scale * z`` with per-feature offsets uniform in [-20, 20] and scales log-uniform in
    [1e-2, 1e2]: the information is all there, but an un-normalized network with one learning rate
    faces inputs whose scales differ by four orders of magnitude and whose means dwarf their spread.
    Returns ``(x, y, x_test, y_test)`` with a 5:1 train/test split.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_samples, num_features))
    w1 = rng.standard_normal((num_features, 32)) / np.sqrt(num_features)
    w2 = rng.standard_normal((32, num_classes)) / np.sqrt(32)
    y = np.argmax(np.tanh(2.0 * z @ w1) @ w2, axis=1)
    offset = rng.uniform(-20.0, 20.0, num_features)
    scale = 10.0 ** rng.uniform(-2.0, 2.0, num_features)
    x = (offset + scale * z).astype(np.float32)
    n_test = num_samples // 6
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def load_synthetic(num_samples: int = 6000, val_fraction: float = 0.2) -> Splits:
    """The synthetic task of :func:`make_synthetic`: inputs ``(N, 20)``, 4 classes."""
    x, y, xt, yt = make_synthetic(num_samples)
    return hold_out(x, y, xt, yt, 4, val_fraction)


def images(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, limit: int | None,
           val_fraction: float = 0.2) -> Splits:
    """uint8 images scaled to [-1, 1] (as in the paper), the first ``limit`` of train and of test kept."""
    if limit is not None:
        x, y, xt, yt = x[:limit], y[:limit], xt[:limit], yt[:limit]

    def scale(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) / 127.5 - 1.0

    return hold_out(scale(x), y, scale(xt), yt, 10, val_fraction)


def load_cifar10(data_dir: str, val_fraction: float = 0.2, limit: int | None = None) -> Splits:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``: inputs ``(N, 3, 32, 32)`` in [-1, 1]."""
    from .cifar import load_cifar10_arrays

    return images(*load_cifar10_arrays(data_dir), limit, val_fraction)


def load_idx_images(dataset: str, data_dir: str | None = None, val_fraction: float = 0.2,
                    limit: int | None = None) -> Splits:
    """Fashion-MNIST or MNIST from their IDX files (:mod:`.idx`): inputs ``(N, 1, 28, 28)`` in [-1, 1]."""
    from .idx import load_arrays

    x, y, xt, yt = load_arrays(dataset, data_dir)
    return images(x[:, None], y, xt[:, None], yt, limit, val_fraction)


def load(dataset: str, *, num_samples: int | None = None, data_dir: str | None = None) -> Splits:
    """Load ``dataset`` by name; ``num_samples`` sizes the generated datasets and caps the image datasets'
    train and test sets (the first ``num_samples`` of each)."""
    if dataset in ("fashion-mnist", "mnist"):
        return load_idx_images(dataset, data_dir, limit=num_samples)
    if dataset == "mnist1d":
        return load_mnist1d(num_samples or 5000)
    if dataset == "synthetic":
        return load_synthetic(num_samples or 6000)
    if dataset == "cifar10":
        if data_dir is None:
            raise ValueError("cifar10 needs --data-dir: the folder that contains cifar-10-batches-py")
        return load_cifar10(data_dir, limit=num_samples)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; received {dataset!r}")
