"""``batchless sweep``: the batch-size study, resumable, one SQLite row per finished cell.

Two protocols: the paper's (one learning rate, a constant step size for a fixed number of epochs) and the
fair one (``--lr-grid``: each norm and batch size at its own learning rate, chosen on validation accuracy as
:mod:`.tuning` describes, usually with ``--schedule cosine``). ``--jobs N`` trains N cells at a time in
worker processes, each writing its own result, so an interrupted sweep loses only the cells in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
from collections.abc import Iterable

import torch

from . import data, tuning
from .options import (
    add_training_options,
    apply_threads,
    config_for_norm,
    config_from_args,
    float_list,
    int_list,
    norm_list,
    output_file,
    positive_int,
)
from .store import ResultStore
from .train import Cell, TrainConfig, describe_cell, log_line, progress_bar, train_cell


def plan(config: TrainConfig, norms: Iterable[str], batch_sizes: Iterable[int], seeds: Iterable[int]) -> list[Cell]:
    """The cells of a sweep, seed-major (every norm and batch size of seed 0 first), without the ones that
    cannot run (BatchNorm at batch size 1)."""
    cells = [Cell(config_for_norm(config, n), n, b, s) for s in seeds for b in dict.fromkeys(batch_sizes)
             for n in dict.fromkeys(norms)]
    return [c for c in cells if c.runnable]


def grid_plan(config: TrainConfig, norms: Iterable[str], batch_sizes: Iterable[int], seeds: Iterable[int],
              factors: list[float]) -> list[Cell]:
    """The fair protocol's first stage: every learning rate of each cell's grid with each of ``seeds`` (the
    choice compares their mean validation accuracy)."""
    return [dataclasses.replace(c, config=dataclasses.replace(c.config, lr=lr))
            for c in plan(config, norms, batch_sizes, seeds)
            for lr in tuning.grid(config.lr, c.batch_size, config.optimizer, factors)]


def _choices(grid_cells: list[Cell], store: ResultStore) -> dict[tuple[str, int], tuple[TrainConfig, tuning.Choice,
                                                                                        list[float]]]:
    """Per (norm, batch size) of ``grid_cells`` (which must be in ``store``): a config, the choice among its
    learning rates and the rates tried."""
    groups: dict[tuple[str, int], dict[float, dict[int, float]]] = {}
    configs = {}
    for c in grid_cells:
        row = store.get(c)
        if row is None:
            raise ValueError(f"the grid run {describe_cell(c)} is not in {store.path}; rerun the sweep")
        groups.setdefault((c.norm, c.batch_size), {}).setdefault(c.config.lr, {})[c.seed] = \
            row["history"][-1]["val_acc"]
        configs[(c.norm, c.batch_size)] = c.config
    return {k: (configs[k], tuning.choose(v), sorted(v)) for k, v in groups.items()}


def edge_plan(grid_cells: list[Cell], store: ResultStore) -> list[Cell]:
    """One more learning rate, a grid step beyond the end, for each cell whose choice is an end of its grid
    (with the grid's seeds): the grid may not bracket the optimum there."""
    cells = []
    for (norm, batch_size), (config, choice, rates) in _choices(grid_cells, store).items():
        if choice.edge:
            lr = tuning.beyond(rates, choice.lr)
            log_line(f"  {norm} bs={batch_size} chose lr={choice.lr:g}, an end of {rates}: trying lr={lr:g}")
            seeds = dict.fromkeys(c.seed for c in grid_cells if (c.norm, c.batch_size) == (norm, batch_size))
            cells += [Cell(dataclasses.replace(config, lr=lr), norm, batch_size, s) for s in seeds]
    return cells


def chosen_plan(grid_cells: list[Cell], store: ResultStore, seeds: Iterable[int]) -> list[Cell]:
    """The second stage: the other ``seeds`` of each cell at the learning rate its grid chose (the grid's
    cells must be in ``store``)."""
    cells = []
    for (norm, batch_size), (config, choice, rates) in _choices(grid_cells, store).items():
        if choice.edge:
            log_line(f"  note: {norm} bs={batch_size} chose lr={choice.lr:g}, still an end of {rates}")
        cells += [Cell(dataclasses.replace(config, lr=choice.lr), norm, batch_size, s) for s in seeds]
    return cells


def run_cells(cells: list[Cell], store: ResultStore, splits: data.Splits | None = None, *, device: str = "cpu",
              jobs: int = 1, source: dict | None = None) -> int:
    """Train every cell not yet in ``store`` (small batch sizes, the slowest, first when ``jobs > 1``),
    each written when it finishes, with a line on stderr; returns how many ran. With ``jobs > 1`` worker
    processes load the data themselves from ``source`` (the keyword arguments of :func:`data.load`)."""
    todo = [c for c in dict.fromkeys(cells) if not store.has(c)]
    if len(todo) < len(cells):
        log_line(f"{len(cells) - len(todo)} of {len(cells)} cells already in {store.path}, skipped")
    if jobs > 1 and len(todo) > 1:
        todo.sort(key=lambda c: c.batch_size)
        with multiprocessing.get_context("spawn").Pool(jobs, _worker_init, (source, store.path, device)) as pool:
            for line in progress_bar(pool.imap_unordered(_worker_run, todo), len(todo), "cells", leave=True):
                log_line(line)
            pool.close()  # let the idle workers exit on their own (the with block would terminate them,
            pool.join()   # leaving the semaphores they created to Python's resource tracker)
    else:  # in this process; with jobs > 1 (one cell left) on one thread, as a worker would run it
        threads = torch.get_num_threads()
        if jobs > 1:
            torch.set_num_threads(1)
        try:
            for cell in progress_bar(todo, len(todo), "cells", leave=True):
                log_line(_train_and_store(cell, store, splits, device, progress=True))
        finally:
            torch.set_num_threads(threads)
    return len(todo)


def _train_and_store(cell: Cell, store: ResultStore, splits: data.Splits, device: str, progress: bool) -> str:
    if store.has(cell):  # another sweep on the same store finished it since this one made its plan
        return f"  {describe_cell(cell)}: stored by another process meanwhile, skipped"
    result = train_cell(cell, splits, device=device, progress=progress)
    written = store.add(cell, result)
    return (f"  {describe_cell(cell)}: test_acc={result.test_acc:.4f} val_acc={result.history[-1].val_acc:.4f} "
            f"({result.wall_s:.0f}s)" + ("" if written else " (another process stored this cell first; its "
                                                              "result is kept)"))


_worker: dict = {}


def _worker_init(source: dict, path: str, device: str) -> None:
    import torch

    torch.set_num_threads(1)
    _worker.update(splits=data.load(**source), store=ResultStore(path), device=device)


def _worker_run(cell: Cell) -> str:
    return _train_and_store(cell, _worker["store"], _worker["splits"], _worker["device"], progress=False)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args, args.dataset)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    if args.choose_seeds > args.seeds:
        raise ValueError(f"--choose-seeds must be at most --seeds ({args.seeds}), got {args.choose_seeds}")
    runnable = plan(config, args.norms, args.batch_sizes, [0])
    if len(runnable) < len(set(args.norms)) * len(set(args.batch_sizes)):
        log_line("BatchNorm is skipped at batch size 1: it cannot train on one instance")
    source = {"dataset": args.dataset, "num_samples": args.num_samples, "data_dir": args.data_dir}
    splits = data.load(**source)
    kwargs = {"device": args.device, "jobs": args.jobs, "source": source}
    with ResultStore(args.results) as store:
        if args.lr_grid:
            chooser, others = seeds[:args.choose_seeds], seeds[args.choose_seeds:]
            grid_cells = grid_plan(config, args.norms, args.batch_sizes, chooser, args.lr_grid)
            log_line(f"stage 1: {len(grid_cells)} runs, seed{'s' if len(chooser) > 1 else ''} "
                     f"{', '.join(map(str, chooser))} at each learning rate of the grids")
            run_cells(grid_cells, store, splits, **kwargs)
            for _ in range(args.extend_grid):
                extra = edge_plan(grid_cells, store)
                if not extra:
                    break
                run_cells(extra, store, splits, **kwargs)
                grid_cells += extra
            if others:
                second = chosen_plan(grid_cells, store, others)
                log_line(f"stage 2: {len(second)} runs, seeds {', '.join(map(str, others))} at each cell's "
                         "chosen learning rate")
                run_cells(second, store, splits, **kwargs)
        else:
            run_cells(plan(config, args.norms, args.batch_sizes, seeds), store, splits, **kwargs)
        log_line(f"done: {store.count()} cells in {args.results}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="the batch-size study: norms x batch sizes x seeds, resumable",
        description="Train every (norm, batch size, seed) cell not yet in the results store. Re-running the same "
                    "command skips finished cells; BatchNorm is skipped at batch size 1. With --lr-grid each "
                    "(norm, batch size) trains at its own learning rate (the fair protocol), otherwise all at "
                    "--lr (the paper's protocol).")
    p.add_argument("--dataset", choices=data.DATASETS, required=True)
    p.add_argument("--norms", type=norm_list, required=True, help="comma-separated, e.g. none,bn,gn,batchless")
    p.add_argument("--batch-sizes", type=int_list, required=True, help="comma-separated, e.g. 1,2,4,8")
    p.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--results", type=output_file, required=True, help="SQLite results file (created if missing)")
    p.add_argument("--data-dir", default=None,
                   help="fashion-mnist / mnist: the folder holding the four IDX files (or torchvision's "
                        "FashionMNIST/raw, MNIST/raw under it; fashion-mnist defaults to "
                        "/usr/share/datasets/fashion-mnist); cifar10: the parent of cifar-10-batches-py")
    p.add_argument("--lr-grid", type=float_list, default=None,
                   help="the fair protocol: factors of each cell's learning-rate grid, e.g. 0.333,1,3, around "
                        "--lr scaled from batch size 64 (square root; linear for sgd); the first seed trains at "
                        "each, the others at the value with the best final validation accuracy")
    p.add_argument("--extend-grid", type=int, default=2,
                   help="with --lr-grid: where a cell's choice is an end of its grid, try one more value a grid "
                        "step beyond it, up to this many times (default 2; 0: the grid only)")
    p.add_argument("--choose-seeds", type=positive_int, default=1,
                   help="with --lr-grid: how many of the seeds train at every learning rate of the grid, the "
                        "choice going to the best mean validation accuracy over them (default 1: the first "
                        "seed alone; more makes the choice less noisy where the validation set is small)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="cells trained at a time, each in its own process with one thread (default 1)")
    add_training_options(p, epochs=10, num_samples=None)
    p.set_defaults(func=run)
    return p
