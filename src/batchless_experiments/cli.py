"""The ``batchless`` command line: ``demo``, ``sweep``, ``report`` (and ``bench`` where installed).

Each command lives in its own module of this package, which exposes ``add_parser(subparsers)``: it adds
its subparser and sets ``func`` (called with the parsed arguments, returns the exit status). Registering a
command means adding its module name to :data:`COMMANDS` (or :data:`OPTIONAL_COMMANDS`: one that is missing
or fails to import is left out with a warning, so it cannot take the experiments down with it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import warnings
from collections.abc import Sequence

COMMANDS = ("demo", "sweep", "report")
OPTIONAL_COMMANDS = ("bench",)
RESUMABLE = ("demo", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchless",
        description="Batchless Normalization experiments: the paper's batch-size study on MNIST-1D, "
                    "a synthetic task and CIFAR-10, against no normalization, BatchNorm, GroupNorm and LayerNorm.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(subparsers)
    for name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError as e:
            if e.name != f"{__package__}.{name}":
                warnings.warn(f"`batchless {name}` is unavailable: {type(e).__name__}: {e}", stacklevel=2)
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not as "Exception ignored" at exit
        return status
    except BrokenPipeError:
        # stdout's reader went away (`batchless report --json | head -1`): stop quietly, as tools killed by
        # SIGPIPE do (status 128 + 13), with stdout on devnull so that Python's flush at exit fails no more
        # (the recipe of Python's documentation, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, sqlite3.Error) as e:  # bad input, a missing, unwritable or damaged file
        print(f"batchless {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = " (finished cells are kept: rerun the same command to resume)" if args.command in RESUMABLE else ""
        print(f"\nbatchless {args.command}: interrupted{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
