"""The IDX reader (Fashion-MNIST, MNIST): generated files in every layout, and every kind of damage refused."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from batchless_experiments import data, idx
from batchless_experiments.cli import main


def idx_bytes(a: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_dataset(folder, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """The four IDX files of a tiny MNIST-like dataset in ``folder``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28)), "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.integers(0, 256, (n_test, 28, 28)), "y_test": rng.integers(0, 10, n_test)}
    for key, stem in idx.FILES.items():
        raw = idx_bytes(arrays[key])
        path = os.path.join(folder, stem + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_what_was_written(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path, gz=gz)
    got = idx.load_arrays("fashion-mnist", str(tmp_path))
    for key, value in zip(idx.FILES, got, strict=True):
        np.testing.assert_array_equal(value, arrays[key])
        assert value.dtype == np.uint8 and value.flags.writeable


def test_torchvision_layout_and_mnist(tmp_path):
    arrays = write_idx_dataset(tmp_path / "MNIST" / "raw", gz=False)
    x, *_ = idx.load_arrays("mnist", str(tmp_path))
    np.testing.assert_array_equal(x, arrays["x_train"])
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", seed=1)
    splits = data.load("fashion-mnist", data_dir=str(tmp_path), num_samples=20)
    assert splits.x_train.shape[1:] == (1, 28, 28) and len(splits.y_train) + len(splits.y_val) == 20
    assert len(splits.y_test) == 10  # --num-samples caps train and test, as for cifar10
    assert splits.x_train.min() >= -1 and splits.x_train.max() <= 1 and splits.x_train.dtype.is_floating_point


def test_missing_files_name_the_package_and_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*--data-dir"):
        idx.find_files("fashion-mnist", str(tmp_path))
    with pytest.raises(ValueError, match="mnist has no default location: pass --data-dir"):
        idx.find_files("mnist", None)
    write_idx_dataset(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        idx.find_files("fashion-mnist", str(tmp_path))


def _damage(raw: bytes, how: str) -> bytes:
    return {"truncated": raw[:-5], "trailing": raw + b"\0", "magic": b"\1" + raw[1:],
            "type": raw[:2] + b"\x0d" + raw[3:], "ndim": raw[:3] + b"\x09" + raw[4:], "empty": b""}[how]


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"), ("trailing", "trailing data"), ("magic", "magic bytes 00 00"),
    ("type", "type code 0x0d"), ("ndim", r"dimensions \(30, 28, 28, \d+.*truncated"), ("empty", "an empty file")])
def test_corrupt_files_are_refused(tmp_path, how, message):
    write_idx_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(idx.IdxError, match=message):
        idx.load_arrays("fashion-mnist", str(tmp_path))


def test_damaged_gzip_and_mismatched_files_are_refused(tmp_path):
    write_idx_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(idx.IdxError, match="damaged gzip stream"):
        idx.load_arrays("fashion-mnist", str(tmp_path))
    write_idx_dataset(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros(29)))
    with pytest.raises(idx.IdxError, match="expected 30 labels"):
        idx.load_arrays("fashion-mnist", str(tmp_path))
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.full(30, 10)))
    with pytest.raises(idx.IdxError, match="labels 0..9; received 10"):
        idx.load_arrays("fashion-mnist", str(tmp_path))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((30, 32, 32))))
    with pytest.raises(idx.IdxError, match=r"\(N, 28, 28\); received \(30, 32, 32\)"):
        idx.load_arrays("fashion-mnist", str(tmp_path))


def test_cli_refuses_a_corrupt_file_before_training(tmp_path, capsys):
    write_idx_dataset(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    results = tmp_path / "r.sqlite"
    assert main(["sweep", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--norms", "none",
                 "--batch-sizes", "4", "--seeds", "1", "--epochs", "1", "--results", str(results)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not results.exists() or os.path.getsize(results) < 50_000


def test_the_installed_fashion_mnist_is_read_whole():
    """The real files of Debian's dataset-fashion-mnist (make install puts them there; CI must have them)."""
    if not os.path.exists(idx.DEFAULT_DIR["fashion-mnist"]) and not os.environ.get("CI"):
        pytest.skip("dataset-fashion-mnist is not installed here (make data installs it)")
    x, y, xt, yt = idx.load_arrays("fashion-mnist")
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
