"""``batchless demo``: the README's main job, a small batch-size study on real images in a few minutes.

The paper's CNN (adapted to 28x28) is trained on a subset of Fashion-MNIST with BatchNorm, GroupNorm and
batchless (the library's defaults) at a small and a standard batch size, batchless also at batch size 1,
where BatchNorm cannot run, and from batch 64 up also with ``standardize_weights`` (the README's advice there).
Each cell uses the centre of the fair protocol's learning-rate grid (``lr``
scaled from batch size 64, :mod:`.tuning`) with a cosine decay: one run per cell and no grid, so that it
fits a few minutes; the tuned study is ``batchless sweep --lr-grid`` (EXPERIMENTS.md). Without the
Fashion-MNIST files the demo says so in one line and runs the same study on MNIST-1D, which is generated
offline. Results go to a SQLite store (re-running resumes), a table, and two plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from . import data, idx, report
from .options import (
    add_training_options,
    apply_threads,
    config_from_args,
    int_list,
    library_speeds,
    norm_list,
    positive_int,
)
from .store import ResultStore
from .sweep import grid_plan, run_cells

DEMO_NORMS = "bn,gn,batchless"
DEMO_BATCH_SIZES = "8,64"
WS_FROM = 64  # batchless also with standardize_weights from this batch size up, as the README advises
DEMO_LR = 3e-3  # at batch size 64, scaled by the square root of the batch size (the sweeps' grid centre)
# (samples, epochs) per dataset: Fashion-MNIST 8,000 training images; MNIST-1D as in its study
DEMO_DATA = {"fashion-mnist": (10000, 6), "mnist1d": (4000, 8)}


def pick_dataset(data_dir: str | None) -> str:
    """Fashion-MNIST when its files are there, else MNIST-1D (one line on stderr says why); a ``data_dir``
    without them is an error."""
    try:
        idx.find_files("fashion-mnist", data_dir)
        return "fashion-mnist"
    except FileNotFoundError as e:
        if data_dir:
            raise
        print(f"{e} -> falling back to MNIST-1D (generated offline)", file=sys.stderr)
        return "mnist1d"


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    start = time.perf_counter()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out expects a folder (created if missing); {args.out} is a file")
    dataset = pick_dataset(args.data_dir)
    samples, epochs = DEMO_DATA[dataset]
    args.num_samples, args.epochs = args.num_samples or samples, args.epochs or epochs
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.sqlite")
    config = config_from_args(args, dataset)
    cells = grid_plan(config, args.norms, args.batch_sizes, [args.seed], [1.0])
    if "batchless" in args.norms and 1 not in args.batch_sizes:
        cells = grid_plan(config, ["batchless"], [1], [args.seed], [1.0]) + cells
    large = [bs for bs in args.batch_sizes if bs >= WS_FROM]
    if "batchless" in args.norms and large and not config.weight_std:
        cells += grid_plan(dataclasses.replace(config, weight_std=True), ["batchless"], large, [args.seed], [1.0])
    source = {"dataset": dataset, "num_samples": args.num_samples, "data_dir": args.data_dir}
    print(f"{dataset} ({args.num_samples} samples: {int(args.num_samples * 0.8)} to train on), {len(cells)} runs "
          f"of {args.epochs} epochs, {args.jobs} at a time; results in {results}", file=sys.stderr)
    splits = data.load(**source)
    with ResultStore(results) as store:
        run_cells(cells, store, splits, device=args.device, jobs=args.jobs, source=source)
        keys = {c.key for c in cells}
        rows = report.relabel([r for r in store.rows() if report.cell_key(r) in keys])
    print(report.table(rows, "test_acc"))
    print(report.table(rows, "lr"))
    print("— = not run: BatchNorm cannot train at batch size 1.\n"
          "One run per cell at the centre of the fair protocol's learning-rate grid (not tuned), cosine decay;\n"
          "the tuned, 3-seed study is in EXPERIMENTS.md.")
    png, curves_png = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo_curves.png")
    report.plot(rows, png, "test_acc", title=f"{dataset}: test accuracy after the last epoch")
    report.curves(rows, curves_png, title=f"{dataset}: validation accuracy per epoch")
    print(f"plots: {png}, {curves_png}\nresults: {results} (batchless report --results {results})\n"
          f"wall time: {time.perf_counter() - start:.0f}s")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="small batch-size study on Fashion-MNIST (a few minutes on 2 CPU cores)",
        description="Train the paper's CNN on Fashion-MNIST (MNIST-1D if its files are missing) with BatchNorm, "
                    "GroupNorm and batchless at a small and a standard batch size (batchless also at batch "
                    "size 1, and from batch 64 up also with standardize_weights); print a table, write plots.")
    p.add_argument("--out", default="batchless-demo", help="output folder (default ./batchless-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--norms", type=norm_list, default=norm_list(DEMO_NORMS), help=f"default {DEMO_NORMS}")
    p.add_argument("--batch-sizes", type=int_list, default=int_list(DEMO_BATCH_SIZES),
                   help=f"default {DEMO_BATCH_SIZES}")
    p.add_argument("--data-dir", default=None,
                   help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--jobs", type=positive_int, default=2, help="runs at a time, one thread each (default 2)")
    add_training_options(p, epochs=None, num_samples=None, threads=1)
    # the fair protocol's centre learning rate and the library's own speeds: what a user gets
    std_speed, mean_speed = library_speeds()
    p.set_defaults(func=run, schedule="cosine", lr=DEMO_LR, std_speed=std_speed, mean_speed=mean_speed)
    return p
