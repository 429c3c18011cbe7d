"""The one exception type of batchless."""


class BatchlessError(ValueError):
    """Raised for invalid arguments or inputs; a ``ValueError``, so existing handlers keep working.

    Messages state what was expected, what was received and, for common mistakes, the fix.
    """
