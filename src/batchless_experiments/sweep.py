"""``batchless sweep``: the paper's batch-size study, resumable, one SQLite row per finished cell."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from . import data
from .options import (
    add_training_options,
    apply_threads,
    config_for_norm,
    config_from_args,
    int_list,
    norm_list,
    output_file,
    positive_int,
)
from .store import ResultStore
from .train import Cell, TrainConfig, log_line, progress_bar, train_cell


def plan(config: TrainConfig, norms: Iterable[str], batch_sizes: Iterable[int], seeds: Iterable[int]) -> list[Cell]:
    """The cells of a sweep, seed-major (every norm and batch size of seed 0 first), without the ones that
    cannot run (BatchNorm at batch size 1)."""
    cells = [Cell(config_for_norm(config, n), n, b, s) for s in seeds for b in dict.fromkeys(batch_sizes)
             for n in dict.fromkeys(norms)]
    return [c for c in cells if c.runnable]


def run_cells(cells: list[Cell], store: ResultStore, splits: data.Splits, *, device: str = "cpu") -> int:
    """Train every cell not yet in ``store``, writing each when it finishes (a line on stderr each); returns how
    many ran."""
    todo = [c for c in cells if not store.has(c)]
    if len(todo) < len(cells):
        log_line(f"{len(cells) - len(todo)} of {len(cells)} cells already in {store.path}, skipped")
    for cell in progress_bar(todo, len(todo), "cells", leave=True):
        result = train_cell(cell, splits, device=device)
        written = store.add(cell, result)
        log_line(f"  {cell.config.dataset} {cell.norm:>14} bs={cell.batch_size:<4} seed={cell.seed} "
            f"test_acc={result.test_acc:.4f} val_acc_best={result.val_acc_best:.4f} ({result.wall_s:.1f}s)"
            + ("" if written else " (another process stored this cell first; its result is kept)"))
    return len(todo)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args, args.dataset)
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    cells = plan(config, args.norms, args.batch_sizes, seeds)
    skipped = len(set(args.norms)) * len(set(args.batch_sizes)) * args.seeds - len(cells)
    if skipped:
        log_line(f"{skipped} cell(s) skipped: BatchNorm cannot train at batch size 1")
    splits = data.load(args.dataset, num_samples=args.num_samples, data_dir=args.data_dir)
    with ResultStore(args.results) as store:
        run_cells(cells, store, splits, device=args.device)
        log_line(f"done: {store.count()} cells in {args.results}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="the paper's sweep: norms x batch sizes x seeds, resumable",
        description="Train every (norm, batch size, seed) cell not yet in the results store. Re-running the same "
                    "command skips finished cells; BatchNorm is skipped at batch size 1.")
    p.add_argument("--dataset", choices=data.DATASETS, required=True)
    p.add_argument("--norms", type=norm_list, required=True, help="comma-separated, e.g. none,bn,gn,batchless")
    p.add_argument("--batch-sizes", type=int_list, required=True, help="comma-separated, e.g. 1,2,4,8")
    p.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--results", type=output_file, required=True, help="SQLite results file (created if missing)")
    p.add_argument("--data-dir", default=None, help="parent folder of cifar-10-batches-py (cifar10 only)")
    add_training_options(p, epochs=10, num_samples=None)
    p.set_defaults(func=run)
    return p
