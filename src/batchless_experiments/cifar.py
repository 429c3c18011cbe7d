"""CIFAR-10 loader for the standard python-format folder ``cifar-10-batches-py``, without executing pickles.

The official batches are Python pickles: dicts with ``labels`` (a list of ints) and ``data`` (a numpy
``uint8`` array of shape ``(10000, 3072)``). Unpickling untrusted data can run arbitrary code, so
:class:`RestrictedUnpickler` admits only the standard containers, bytes, strings and numbers, plus the
three globals a pickled numpy array names (``_reconstruct``, ``ndarray``, ``dtype``), which it maps to
inert stand-ins: no numpy code runs while unpickling. The stand-ins are then turned into an array only if
they describe exactly a C-ordered ``uint8`` buffer of the right size. Anything else raises
:class:`UnsafePickleError`.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
IMAGE_SIZE = 3 * 32 * 32


class UnsafePickleError(ValueError):
    """A pickle asked for something the CIFAR-10 format never contains."""


class _ArrayStub:
    """What a pickled ``numpy.ndarray`` becomes: its BUILD state, recorded and never interpreted."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DtypeStub:
    """What a pickled ``numpy.dtype`` becomes: its constructor arguments, recorded."""

    def __init__(self, descr: Any, align: Any = False, copy: Any = True) -> None:
        self.descr = descr.decode("latin1") if isinstance(descr, bytes) else descr
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _ArrayStub:
        raise UnsafePickleError(f"numpy _reconstruct may only build ndarray; received {cls!r}")
    return _ArrayStub()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') under pickle protocols 0-2.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode admitted only as (str, 'latin1'); received "
                                f"({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of :data:`_ALLOWED`, to inert stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, "
                "strings, numbers and a uint8 numpy array; this file is not one (or has been tampered with)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing persistent ids: a CIFAR-10 batch has none")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings as bytes)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # a truncated or malformed stream
        raise UnsafePickleError(f"not a readable CIFAR-10 pickle: {type(e).__name__}: {e}") from None


def _to_uint8_array(stub: Any, where: str) -> np.ndarray:
    if not isinstance(stub, _ArrayStub) or not isinstance(stub.state, tuple) or len(stub.state) != 5:
        raise UnsafePickleError(f"{where}: 'data' must be a pickled numpy array; received {type(stub).__name__}")
    _, shape, dtype, fortran, raw = stub.state
    if not (isinstance(dtype, _DtypeStub) and dtype.descr in ("u1", "|u1", "uint8")):
        descr = getattr(dtype, "descr", dtype)
        raise UnsafePickleError(f"{where}: 'data' must have dtype uint8; received {descr!r}")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise UnsafePickleError(f"{where}: malformed array shape {shape!r}")
    if fortran or not isinstance(raw, bytes) or len(raw) != int(np.prod(shape)):
        raise UnsafePickleError(f"{where}: array buffer does not match shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``."""
    with open(path, "rb") as f:
        try:
            obj = restricted_loads(f.read())
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{path}: expected a dict; received {type(obj).__name__}")
    try:
        data, labels = _get(obj, "data"), _get(obj, "labels")
    except KeyError as e:
        raise UnsafePickleError(f"{path}: missing key {e}; a CIFAR-10 batch has 'data' and 'labels'") from None
    x = _to_uint8_array(data, path)
    if x.ndim != 2 or x.shape[1] != IMAGE_SIZE:
        raise UnsafePickleError(f"{path}: 'data' must have shape (N, {IMAGE_SIZE}); received {x.shape}")
    if not isinstance(labels, list) or not all(isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise UnsafePickleError(f"{path}: 'labels' must be a list of ints in [0, 10)")
    if len(labels) != len(x):
        raise UnsafePickleError(f"{path}: {len(x)} images but {len(labels)} labels")
    return x.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10_arrays(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from ``data_dir/cifar-10-batches-py``."""
    folder = os.path.join(data_dir, FOLDER)
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Point --data-dir at the folder that "
            f"contains {FOLDER} (the standard python version); nothing is downloaded."
        )
    train = [load_batch(os.path.join(folder, f)) for f in TRAIN_FILES]
    xt, yt = load_batch(os.path.join(folder, TEST_FILE))
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), xt, yt
