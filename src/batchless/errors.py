"""The one exception type of batchless."""


class BatchlessError(ValueError):
    """Raised for invalid arguments or inputs; a ``ValueError``, so existing handlers keep working.

    Messages state what was expected, what was received and, for common mistakes, the fix.
    """


def check_module(model, where: str) -> None:
    """Raise :class:`BatchlessError` unless ``model`` is an ``nn.Module`` (the argument of every
    model tool)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise BatchlessError(f"{where} expects a torch.nn.Module, got {type(model).__name__}")
