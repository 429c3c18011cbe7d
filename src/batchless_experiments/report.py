"""``batchless report``: mean ± std over seeds per norm x batch size, JSON export, paper-style plots.

Rows are labelled by norm plus the options that differ from the base config of the dataset (the one most
cells of that dataset use, printed above its table), e.g. ``batchless [stats_lr_scale=0.1]``, so the
ablations of one store appear as rows of their own. The learning rate is not part of a label: where a cell
(dataset, label, batch size) was trained at several learning rates (``sweep --lr-grid``), only the runs at
the one :func:`.tuning.choose` picks on validation accuracy are reported, and the ``lr`` metric shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

from . import tuning
from .models import NORMS, default_model, is_batchless
from .options import int_list, make_parent, norm_list, output_file
from .store import ResultStore
from .train import BATCHLESS_OPTIONS, Cell, TrainConfig

PERCENT = ("test_acc", "test_acc_25", "test_acc_50", "val_acc_best", "test_acc_at_best_val")
METRICS = (*PERCENT, "val_acc_best_epoch", "wall_s", "act_mem_mb", "nll_last", "lr")
ABLATIONS = ("data_init", "stats_lr_scale", "stats_optimizer", "nll_mode", "nll_weight", "std_speed", "mean_speed",
             "decay_affine")
HIGHER_IS_BETTER = PERCENT


def cell_key(row: dict) -> str:
    """The key of the cell a store's row records (:attr:`.train.Cell.key`)."""
    return Cell(TrainConfig(**row["config"]), row["norm"], row["batch_size"], row["seed"]).key


def without_lr(config: dict) -> dict:
    """``config`` as labels compare it: without ``lr``, and the dataset's default model named (None and its name
    are the same model)."""
    return {**{k: v for k, v in config.items() if k != "lr"},
            "model": config.get("model") or default_model(config["dataset"])}


def base_configs(rows: list[dict]) -> dict[str, dict]:
    """Per dataset, the base config: the config of its highest-tier cells, the most common among equals. A
    cell's tier counts one each for being batchless, for running without weight standardization (a treatment
    for every norm, like an ablation) and for the paper's method (every ablation option at its default), so
    a store with the layer both with and without WS labels the one with it."""
    default = TrainConfig()
    ranks: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)  # per config: (its best tier, its cells)
    for r in rows:
        batchless = is_batchless(r["norm"])
        plain = batchless and not r["config"].get("weight_std", False)
        paper = batchless and all(r["config"][k] == getattr(default, k) for k in ABLATIONS)
        key = json.dumps(without_lr(r["config"]), sort_keys=True)
        tier, cells = ranks[r["dataset"]].get(key, (0, 0))
        ranks[r["dataset"]][key] = (max(tier, batchless + plain + paper), cells + 1)
    return {d: json.loads(max(c, key=lambda k: c[k])) for d, c in ranks.items()}


def label(row: dict, base: dict) -> str:
    """``norm`` plus the config fields that differ from ``base`` (the batchless-only ones for batchless)."""
    ignored = () if is_batchless(row["norm"]) else BATCHLESS_OPTIONS
    changes = {k: v for k, v in without_lr(row["config"]).items() if k not in ignored and base.get(k) != v}
    if not changes:
        return row["norm"]
    return f"{row['norm']} [{', '.join(f'{k}={v}' for k, v in sorted(changes.items()))}]"


def describe(config: dict) -> str:
    """The fields of ``config`` that differ from the defaults, e.g. ``epochs=8, num_samples=4000``."""
    changes = TrainConfig(**config).changes()
    changes.pop("lr", None)
    return ", ".join(f"{k}={v}" for k, v in sorted(changes.items())) or "defaults"


def load_rows(path: str | list[str], dataset: str | None = None, norms: list[str] | None = None,
              base_only: bool = False, batch_sizes: list[int] | None = None) -> list[dict]:
    """Finished cells of the store ``path`` (or of several, as one) with a ``label``, optionally filtered by
    dataset, norm, batch size and base config (labels are computed before filtering by norm or batch size;
    a cell in two stores counts once)."""
    found: dict[str, dict] = {}
    for one in [path] if isinstance(path, str) else path:
        if not os.path.exists(one):
            raise FileNotFoundError(f"no results file at {one}; run `batchless sweep --results {one} ...` first")
        with ResultStore(one, readonly=True) as store:
            found.update((cell_key(r), r) for r in store.rows() if dataset in (None, r["dataset"]))
    rows = relabel(list(found.values()))
    for r in rows:
        r["nll_last"] = r["history"][-1]["nll"]  # the gauged NLL of the last epoch (None without batchless)
        for q in (25, 50):  # time to accuracy: test accuracy after q % of the epochs (None if not measured)
            r[f"test_acc_{q}"] = r["history"][math.ceil(len(r["history"]) * q / 100) - 1].get("test_acc")
    return [r for r in rows if (not base_only or r["label"] == r["norm"]) and (not norms or r["norm"] in norms)
            and (not batch_sizes or r["batch_size"] in batch_sizes)]


def relabel(rows: list[dict]) -> list[dict]:
    """``rows`` with ``base`` (their dataset's base config among these rows), ``label`` and ``lr`` set, and
    only the runs at each cell's chosen learning rate kept (``lr_choice``: the :class:`.tuning.Choice`)."""
    bases = base_configs(rows)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        r["base"] = bases[r["dataset"]]
        r["label"] = label(r, r["base"])
        r["lr"] = r["config"]["lr"]
        cells[(r["dataset"], r["label"], r["batch_size"])].append(r)
    for runs in cells.values():
        val_acc: dict[float, dict[int, float]] = defaultdict(dict)
        for r in runs:
            val_acc[r["lr"]][r["seed"]] = r["history"][-1]["val_acc"]
        choice = tuning.choose(val_acc) if len(val_acc) > 1 else tuning.Choice(runs[0]["lr"], False, 1)
        for r in runs:
            r["lr_choice"] = choice
    return [r for r in rows if r["lr"] == r["lr_choice"].lr]


def group(rows: list[dict], metric: str) -> dict[tuple[str, str], dict[int, list[float]]]:
    """``{(dataset, label): {batch_size: [metric per seed]}}``, labels in the order of ``NORMS``."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in sorted(rows, key=lambda r: (NORMS.index(r["norm"]), r["label"])):
        if r[metric] is not None:
            out[(r["dataset"], r["label"])][r["batch_size"]].append(float(r[metric]))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for both if a seed diverged (NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], metric: str) -> str:
    m, s = mean_std(values)
    if metric == "lr":
        return f"{m:.3g}"
    k = 100.0 if metric in PERCENT else 1.0
    digits = 3 if metric == "nll_last" else 1
    return f"{m * k:.{digits}f} ± {s * k:.{digits}f}"


def protocol(rows: list[dict]) -> str:
    """How the learning rates of ``rows`` (one dataset) were set, for a table's header."""
    tried = max(r["lr_choice"].tried for r in rows)
    if tried > 1:
        return f"learning rate chosen per cell on validation accuracy from a grid of {tried}"
    rates = sorted({r["lr"] for r in rows})
    return f"one learning rate per cell, lr={', '.join(f'{v:g}' for v in rates)}"


def table(rows: list[dict], metric: str = "test_acc") -> str:
    """Markdown table(s), one per dataset: rows = norm label, columns = batch sizes, entries mean ± std,
    the best mean per column in bold (``rows`` as :func:`load_rows` or :func:`relabel` gives them). The
    ``lr`` metric shows each cell's learning rate, with ``*`` where it is an end of the cell's grid."""
    groups = group(rows, metric)
    edge = {(r["dataset"], r["label"], r["batch_size"]) for r in rows if r["lr_choice"].edge}
    out = []
    for dataset in dict.fromkeys(d for d, _ in groups):
        keys = [k for k in groups if k[0] == dataset]
        sizes = sorted({b for k in keys for b in groups[k]})
        unit = " (%)" if metric in PERCENT else ""
        mine = [r for r in rows if r["dataset"] == dataset]
        out.append(f"**{dataset}**, {metric}{unit}, mean ± std over seeds (n = seeds per cell); "
                   f"base config: {describe(mine[0]['base'])}; {protocol(mine)}\n")
        out.append("| norm | " + " | ".join(f"bs {b}" for b in sizes) + " | n |")
        out.append("|---" * (len(sizes) + 2) + "|")
        best = {}
        if metric in HIGHER_IS_BETTER:
            for b in sizes:
                means = [mean_std(groups[k][b])[0] for k in keys if b in groups[k]]
                best[b] = max((m for m in means if not math.isnan(m)), default=None)
        for key in keys:
            cells = groups[key]
            ns = sorted({len(v) for v in cells.values()})
            entries = []
            for b in sizes:
                text = _fmt(cells[b], metric) if b in cells else "—"
                if b in cells and len(cells[b]) < ns[-1]:  # a cell with fewer seeds than its row's others
                    text += f" (n={len(cells[b])})"
                if b in cells and best.get(b) is not None and mean_std(cells[b])[0] == best[b]:
                    text = f"**{text}**"
                entries.append(text + ("*" if (dataset, key[1], b) in edge and metric == "lr" else ""))
            n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
            out.append(f"| {key[1]} | " + " | ".join(entries) + f" | {n} |")
        out.append("")
    return "\n".join(out)


def json_records(rows: list[dict]) -> list[dict]:
    keep = ("dataset", "norm", "label", "batch_size", "seed", "test_acc", "test_acc_25", "test_acc_50",
            "test_loss", "val_acc_best", "val_acc_best_epoch", "val_loss_best", "test_acc_at_best_val", "wall_s",
            "act_mem_mb", "max_rss_mb", "config", "history")
    return [{k: _json_number(r[k]) for k in keep} for r in rows]


def _json_number(value):
    """``value`` with non-finite floats (a diverged cell) as None: strict JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value


def plot(rows: list[dict], path: str, metric: str = "test_acc", title: str | None = None) -> None:
    """Accuracy vs batch size (log scale), one line per norm label with ± std bars; one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows, metric)
    datasets = list(dict.fromkeys(d for d, _ in groups))
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(10 * max(len(datasets), 1), 4.5), squeeze=False)
    k = 100.0 if metric in PERCENT else 1.0
    for ax, dataset in zip(axes[0], datasets, strict=False):
        for (d, name), cells in groups.items():
            if d != dataset:
                continue
            sizes = sorted(cells)
            stats = [mean_std(cells[b]) for b in sizes]
            ax.errorbar(sizes, [m * k for m, _ in stats], yerr=[s * k for _, s in stats], marker="o",
                        capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch_size"] for r in rows if r["dataset"] == dataset})
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(metric + (" (%)" if metric in PERCENT else ""))
        ax.set_title(title or dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    make_parent(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(rows: list[dict], path: str, title: str | None = None) -> None:
    """Validation accuracy per epoch (mean over seeds, shaded ± std), one line per norm label and one panel
    per batch size: whether the runs had flattened by their last epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in rows})
    labels = list(group(rows, "test_acc"))
    legend_rows = math.ceil(len(labels) / 2)  # the legend goes under the panels, two labels a row
    height = 3.6 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, max(len(sizes), 1), figsize=(max(3.6 * len(sizes), 7.2), height), squeeze=False,
                             sharey=True)
    for ax, b in zip(axes[0], sizes, strict=False):
        for key in labels:
            runs = [r["history"] for r in rows if (r["dataset"], r["label"]) == key and r["batch_size"] == b]
            if not runs:
                continue
            epochs = min(len(h) for h in runs)
            acc = [[100 * h[e]["val_acc"] for h in runs] for e in range(epochs)]
            m = [statistics.fmean(a) for a in acc]
            sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
            x = range(1, epochs + 1)
            color = f"C{labels.index(key) % 10}"  # a label keeps its colour in panels that lack others
            ax.plot(x, m, label=key[1], color=color)
            ax.fill_between(x, [u - v for u, v in zip(m, sd, strict=True)],
                            [u + v for u, v in zip(m, sd, strict=True)], color=color, alpha=0.2)
        ax.set_title(f"bs {b}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    lo = min((100 * r["history"][-1]["val_acc"] for r in rows), default=0)
    axes[0][0].set_ylim(max(lo - 8, 0), None)
    handles = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    make_parent(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    rows = load_rows(args.results, args.dataset, args.norms, args.base_only, args.batch_sizes)
    if args.json:
        print(json.dumps(json_records(rows), indent=1, allow_nan=False))
    else:
        if not rows:
            print(f"no finished cells in {', '.join(args.results)}")
        for metric in args.metrics:
            print(table(rows, metric))
    if args.plot:
        plot(rows, args.plot, args.metrics[0])
    if args.curves:
        curves(rows, args.curves)
    for path in filter(None, (args.plot, args.curves)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _metric_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in METRICS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected metrics from {', '.join(METRICS)}; received {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="tables, JSON and plot of a results store",
                              description="Mean ± std over seeds per norm x batch size, and the paper-style plot.")
    p.add_argument("--results", required=True, nargs="+",
                   help="SQLite results file written by sweep or demo; several are reported as one")
    p.add_argument("--json", action="store_true", help="print one JSON object per finished cell instead")
    p.add_argument("--plot", type=output_file, default=None, help="write accuracy vs batch size to this PNG file")
    p.add_argument("--curves", type=output_file, default=None,
                   help="write validation accuracy per epoch (one panel per batch size) to this PNG file")
    p.add_argument("--dataset", default=None, help="only this dataset")
    p.add_argument("--norms", type=norm_list, default=None, help="only these norms (comma-separated)")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="only these batch sizes (comma-separated)")
    p.add_argument("--base-only", action="store_true",
                   help="only cells run with the base config (leave out the ablations)")
    p.add_argument("--metrics", type=_metric_list, default=["test_acc", "val_acc_best"],
                   help=f"comma-separated from {', '.join(METRICS)} (default test_acc,val_acc_best; "
                        "the plot shows the first)")
    p.set_defaults(func=run)
    return p
