"""``batchless demo``: the README's main job, a small batch-size study on MNIST-1D in a few minutes.

The same 1-D CNN is trained with no normalization, BatchNorm, GroupNorm and batchless at a small and a
large batch size, and batchless also at batch size 1 (where BatchNorm cannot run); batchless with a 10x
smaller learning rate for its statistics (the fix of EXPERIMENTS.md) also runs at 1 and the small size.
MNIST-1D is generated offline by the ``mnist1d`` package. Results go to a SQLite store (re-running
resumes), a PNG plot and a printed table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from . import data, report
from .options import add_training_options, apply_threads, config_from_args, int_list, norm_list
from .store import ResultStore
from .sweep import plan, run_cells

DEMO_NORMS = "none,bn,gn,batchless"
DEMO_BATCH_SIZES = "8,128"
DEMO_EPOCHS = 4
DEMO_SAMPLES = 4000
DEMO_TUNED = 0.1


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    start = time.perf_counter()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out expects a folder (created if missing); {args.out} is a file")
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.sqlite")
    png = os.path.join(args.out, "demo.png")
    config = config_from_args(args, "mnist1d")
    cells = plan(config, args.norms, args.batch_sizes, [args.seed])
    if "batchless" in args.norms:
        small = [1, min(args.batch_sizes)]
        cells = plan(config, ["batchless"], [1], [args.seed]) + cells
        if args.tuned_stats_lr_scale:  # what EXPERIMENTS.md found to work at small batches
            tuned = dataclasses.replace(config, stats_lr_scale=args.tuned_stats_lr_scale)
            cells += plan(tuned, ["batchless"], small, [args.seed])
    cells = list({c.key: c for c in cells}.values())
    print(f"MNIST-1D ({args.num_samples} samples, generated offline), {len(cells)} runs of {args.epochs} epochs; "
          f"results in {results}", file=sys.stderr)
    splits = data.load("mnist1d", num_samples=args.num_samples)
    with ResultStore(results) as store:
        run_cells(cells, store, splits, device=args.device)
        keys = {c.key for c in cells}
        rows = report.relabel([r for r in report.load_rows(results) if _key(r) in keys])  # this run's base
    print(report.table(rows, "test_acc"))
    print(report.table(rows, "val_acc_best"))
    print("— = not run: BatchNorm cannot train at batch size 1; the demo runs batchless alone there, and the\n"
          "tuned batchless only at the small batch sizes.\n"
          "Fixed epochs (the paper's protocol): larger batches take fewer steps, so every norm drops with them.")
    report.plot(rows, png, "test_acc", title="MNIST-1D: test accuracy after the last epoch")
    print(f"plot: {png}\nresults: {results} (batchless report --results {results})\n"
          f"wall time: {time.perf_counter() - start:.0f}s")
    return 0


def _key(row: dict) -> str:
    from .train import Cell, TrainConfig

    return Cell(TrainConfig(**row["config"]), row["norm"], row["batch_size"], row["seed"]).key


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="small batch-size study on MNIST-1D (a few minutes on 2 CPU cores)",
        description="Train one 1-D CNN on MNIST-1D with none, BatchNorm, GroupNorm and batchless at a small and "
                    "a large batch size (batchless also at batch size 1); print a table, write a plot.")
    p.add_argument("--out", default="batchless-demo", help="output folder (default ./batchless-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--norms", type=norm_list, default=norm_list(DEMO_NORMS), help=f"default {DEMO_NORMS}")
    p.add_argument("--batch-sizes", type=int_list, default=int_list(DEMO_BATCH_SIZES),
                   help=f"default {DEMO_BATCH_SIZES}")
    # one thread: faster than two for these small models
    p.add_argument("--tuned-stats-lr-scale", type=float, default=DEMO_TUNED,
                   help=f"also run batchless at batch size 1 and the smallest batch size with this learning-rate "
                        f"multiplier for mu/sigma (default {DEMO_TUNED}, the fix found in EXPERIMENTS.md; 0 = skip)")
    add_training_options(p, epochs=DEMO_EPOCHS, num_samples=DEMO_SAMPLES, threads=1)
    p.set_defaults(func=run)
    return p
