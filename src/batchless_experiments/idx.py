"""MNIST-style datasets (Fashion-MNIST, MNIST) from their four standard IDX files, validated before use.

An IDX file is two zero bytes, a type code (``0x08`` = unsigned byte, the only one these datasets use), the
number of dimensions, each dimension as a big-endian uint32, then the data. :func:`read_idx` refuses a file
whose header, dimensions or length do not match exactly (a truncated download, a wrong file, a damaged gzip
stream): a corrupt file is never trained on. Nothing is downloaded.

The files are looked up in a folder that holds them directly (``.gz`` or not), or in torchvision's layout
``<dir>/FashionMNIST/raw/`` (``<dir>/MNIST/raw/``), so a torchvision download can be pointed at as is.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
DEFAULT_DIR = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # Debian's dataset-fashion-mnist
PACKAGE = {"fashion-mnist": "the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"}
UBYTE = 0x08


class IdxError(ValueError):
    """An IDX file that is not what the dataset needs (corrupt, truncated, wrong shape)."""


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """The uint8 array stored in ``raw`` (the bytes of an uncompressed IDX file), after checking its header
    and that its length is exactly the header's."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{name}: not an IDX file (expected the magic bytes 00 00 at the start; received "
                       f"{raw[:4].hex(' ') or 'an empty file'})")
    if raw[2] != UBYTE:
        raise IdxError(f"{name}: expected unsigned-byte data (type code 0x08); received type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise IdxError(f"{name}: header announces {ndim} dimensions but the file has {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + math.prod(dims)  # Python ints: a damaged header cannot overflow
    if len(raw) != expected or 0 in dims:
        raise IdxError(f"{name}: dimensions {dims} need {expected} bytes; the file has {len(raw)} "
                       f"({'truncated' if len(raw) < expected else 'trailing data'}); re-fetch it")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # writable, as torch wants it


def read_idx(path: str) -> np.ndarray:
    """:func:`parse_idx` of a file, gunzipped first if its name ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IdxError(f"{path}: damaged gzip stream ({type(e).__name__}: {e}); re-fetch the file") from None
    return parse_idx(raw, path)


def find_files(dataset: str, data_dir: str | None) -> dict[str, str]:
    """Paths of the four files of ``dataset`` in ``data_dir`` (or the dataset's default folder)."""
    folder = data_dir or DEFAULT_DIR.get(dataset)
    if folder is None:
        raise ValueError(f"{dataset} has no default location: pass --data-dir, the folder holding "
                         f"{', '.join(FILES.values())} (.gz or not) or {TORCHVISION_FOLDER[dataset]}/raw/")
    candidates = [folder, os.path.join(folder, TORCHVISION_FOLDER[dataset], "raw")]
    for where in candidates:
        found = {}
        for key, stem in FILES.items():
            for name in (stem, stem + ".gz"):
                if os.path.isfile(os.path.join(where, name)):
                    found[key] = os.path.join(where, name)
                    break
        if len(found) == len(FILES):
            return found
    how = f"install {PACKAGE[dataset]}, or pass" if dataset in PACKAGE else "pass"
    raise FileNotFoundError(f"{dataset}: the four IDX files ({', '.join(FILES.values())}, .gz or not) are not in "
                            f"{' or '.join(candidates)}; {how} --data-dir DIR with DIR holding them")


def load_arrays(dataset: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 28, 28)`` and labels ``(N,)`` in 0..9,
    every file checked and the pairs checked against each other."""
    paths = find_files(dataset, data_dir)
    a = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise IdxError(f"{paths[f'x_{split}']}: expected images of shape (N, 28, 28); received {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise IdxError(f"{paths[f'y_{split}']}: expected {len(x)} labels (one per image); received shape "
                           f"{y.shape}")
        if y.max() > 9:
            raise IdxError(f"{paths[f'y_{split}']}: expected labels 0..9; received {int(y.max())}")
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"]
