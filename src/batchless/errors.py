"""The one exception type of batchless, and the warnings that point at the user's line."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# Frames in these directories are not the user's: batchless and torch (Module.__call__, autograd,
# checkpointing), between a user's call and a warning raised inside a layer.
_INTERNAL = tuple(os.path.dirname(path) + os.sep for path in (__file__, torch.__file__))


class BatchlessError(ValueError):
    """Raised for invalid arguments or inputs; a ``ValueError``, so existing handlers keep working.

    Messages state what was expected, what was received and, for common mistakes, the fix.
    """


def check_module(model, where: str) -> None:
    """Raise :class:`BatchlessError` unless ``model`` is an ``nn.Module`` (the argument of every
    model tool)."""
    if not isinstance(model, torch.nn.Module):
        raise BatchlessError(f"{where} expects a torch.nn.Module, got {type(model).__name__}")


def warn(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside batchless and torch: the
    user's line that called the layer or function, however deep inside them the warning arose."""
    level, frame = 2, sys._getframe(1)  # (stacklevel 2: warn's caller)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)
