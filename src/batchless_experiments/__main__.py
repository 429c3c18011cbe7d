"""``python -m batchless_experiments ...``: the ``batchless`` command where the package is not installed
(e.g. ``PYTHONPATH=src`` on a machine whose Python already has torch)."""

import sys

from .cli import main

sys.exit(main())
