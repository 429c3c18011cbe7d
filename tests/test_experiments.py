"""Experiments package: data, CIFAR-10 loader and restricted unpickler, training, store, report."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import sqlite3
import sys

import numpy as np
import pytest
import torch

from batchless_experiments import cifar, data, report, tuning
from batchless_experiments.cli import build_parser, main
from batchless_experiments.models import NORMS, build_model, default_model, statistics_parameters
from batchless_experiments.options import config_for_norm, config_from_args
from batchless_experiments.store import ResultStore
from batchless_experiments.sweep import chosen_plan, grid_plan, plan
from batchless_experiments.train import Cell, CellResult, EMAStatistics, EpochLog, TrainConfig, batches, train_cell

torch.set_num_threads(1)


# ---------------------------------------------------------------- CIFAR-10 format and restricted unpickler


def write_cifar(root, n: int = 6, protocol: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder with ``n`` random images per batch, pickled like the original."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, cifar.FOLDER)
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_loader_reads_generated_batches(tmp_path, protocol):
    x, y = write_cifar(tmp_path, protocol=protocol)
    xtr, ytr, xte, yte = cifar.load_cifar10_arrays(str(tmp_path))
    assert xtr.shape == (30, 3, 32, 32) and xte.shape == (6, 3, 32, 32) and xtr.dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([xtr, xte]).reshape(-1, 3072), x)
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), y)
    splits = data.load("cifar10", data_dir=str(tmp_path))
    assert splits.x_train.min() >= -1 and splits.x_train.max() <= 1
    assert len(splits.y_train) + len(splits.y_val) == 30


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_rejects_code_execution():
    crafted = pickle.dumps({b"data": _Exploit(), b"labels": [1]}, protocol=2)
    with pytest.raises(cifar.UnsafePickleError, match="refusing to load global"):
        cifar.restricted_loads(crafted)


def test_restricted_unpickler_rejects_object_arrays_and_garbage(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(cifar.UnsafePickleError, match="dtype uint8"):
        cifar.load_batch(str(path))
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(cifar.UnsafePickleError, match="dtype uint8"):
        cifar.load_batch(str(path))
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(cifar.UnsafePickleError, match="not a readable"):
        cifar.load_batch(str(path))


def test_cifar_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        cifar.load_cifar10_arrays(str(tmp_path))


# ---------------------------------------------------------------- data and models


def test_synthetic_is_badly_scaled_and_deterministic():
    x, y, xt, yt = data.make_synthetic(600)
    x2, *_ = data.make_synthetic(600)
    np.testing.assert_array_equal(x, x2)
    std = x.std(0)
    assert std.max() / std.min() > 1e3 and np.abs(x.mean(0)).max() > 5
    assert len(np.unique(y)) == 4 and len(xt) == 100


def test_hold_out_keeps_everything_once():
    x = np.arange(50, dtype=np.float32)[:, None]
    s = data.hold_out(x, np.arange(50), x[:5], np.arange(5), 50)
    got = sorted(torch.cat([s.x_train, s.x_val]).flatten().tolist())
    assert got == list(range(50)) and len(s.y_val) == 10


@pytest.mark.parametrize("dataset,shape,model", [("mnist1d", (2, 1, 40), None), ("synthetic", (2, 20), None),
                                                 ("cifar10", (2, 3, 32, 32), None),
                                                 ("fashion-mnist", (2, 1, 28, 28), "mlp"),
                                                 ("cifar10", (2, 3, 32, 32), "mlp")])
@pytest.mark.parametrize("norm", NORMS)
def test_models_run_for_every_norm(dataset, shape, model, norm):
    net = build_model(dataset, norm, model=model, num_classes=10 if dataset != "synthetic" else 4)
    assert net(torch.randn(shape)).shape == (2, 10 if dataset != "synthetic" else 4)
    assert bool(statistics_parameters(net)) == norm.startswith("batchless")


def test_the_image_mlp_normalizes_each_image_channel_then_every_hidden_layer():
    import batchless as bl

    net = build_model("cifar10", "batchless", model="mlp")
    layers = [m for m in net.modules() if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d))]
    assert [(type(m).__name__, m.num_features) for m in layers] == [
        ("BatchlessNorm2d", 3), ("BatchlessNorm1d", 256), ("BatchlessNorm1d", 256)]
    assert build_model("synthetic", "none", model="mlp")[1][0].out_features == 64  # the synthetic study's MLP


def test_batches_drop_only_a_trailing_single_instance():
    g = torch.Generator().manual_seed(0)
    assert [len(b) for b in batches(9, 4, g)] == [4, 4]
    assert [len(b) for b in batches(10, 4, g)] == [4, 4, 2]
    assert len(batches(5, 1, g)) == 5


def test_plan_skips_batchnorm_at_batch_size_one_and_shares_baselines():
    ablation = TrainConfig(stats_lr_scale=0.1, data_init=False)
    cells = plan(ablation, ["bn", "gn", "batchless"], [1, 8], [0])
    assert ("bn", 1) not in {(c.norm, c.batch_size) for c in cells} and len(cells) == 5
    assert Cell(config_for_norm(ablation, "gn"), "gn", 8, 0).key == Cell(TrainConfig(), "gn", 8, 0).key
    assert Cell(ablation, "batchless", 8, 0).key != Cell(TrainConfig(), "batchless", 8, 0).key


def test_config_rejects_bad_values_with_expected_and_received():
    with pytest.raises(ValueError, match="stats_optimizer must be one of adam, sgd, ema; received 'rmsprop'"):
        TrainConfig(stats_optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs must be >= 1; received 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        Cell(TrainConfig(), "batchnorm", 4, 0)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_splits():
    return data.load("synthetic", num_samples=240)


def _cell(norm="batchless", bs=16, seed=0, **kw):
    return Cell(TrainConfig(dataset="synthetic", epochs=2, num_samples=240, init_samples=64, **kw), norm, bs, seed)


def test_training_is_deterministic_for_a_seed(tiny_splits):
    a = train_cell(_cell(), tiny_splits, progress=False)
    b = train_cell(_cell(), tiny_splits, progress=False)
    c = train_cell(_cell(seed=1), tiny_splits, progress=False)
    strip = [(e.train_loss, e.val_loss, e.val_acc, e.nll) for e in a.history]
    assert strip == [(e.train_loss, e.val_loss, e.val_acc, e.nll) for e in b.history]
    assert a.test_acc == b.test_acc
    assert strip != [(e.train_loss, e.val_loss, e.val_acc, e.nll) for e in c.history]


def test_cell_records_history_and_metrics(tiny_splits):
    r = train_cell(_cell(stats_optimizer="ema", stats_lr_scale=10.0, nll_weight=0.5), tiny_splits)
    assert len(r.history) == 2 and all(e.nll is not None for e in r.history)
    assert 0 <= r.test_acc <= 1 and 1 <= r.val_acc_best_epoch <= 2 and r.act_mem_mb > 0
    baseline = train_cell(_cell(norm="none"), tiny_splits)
    assert baseline.history[0].nll is None


def test_ema_statistics_is_an_exponential_moving_average():
    import batchless as bl

    torch.manual_seed(0)
    model = torch.nn.Sequential(bl.BatchlessNorm1d(3))
    x = torch.randn(64, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
    rate = 0.3
    opt = EMAStatistics(model, rate)
    layer = model[0]
    mu0, sigma0 = layer.mean.detach().clone(), layer.std.detach().clone()
    model(x).sum().backward()
    opt.step()
    expected_mu = mu0 + rate * (x.mean(0) - mu0)
    torch.testing.assert_close(layer.mean.detach(), expected_mu)
    # sigma moves toward the batch's RMS deviation from mu, by the EMA rate to first order
    rms = ((x - mu0) ** 2).mean(0).sqrt()
    step = layer.std.detach() - sigma0
    assert torch.all(torch.sign(step) == torch.sign(rms - sigma0))


# ---------------------------------------------------------------- store and report


def test_store_keeps_a_diverged_run(tmp_path, tiny_splits):
    path = str(tmp_path / "r.sqlite")
    cell = _cell(norm="none", bs=32)
    result = dataclasses.replace(train_cell(cell, tiny_splits), test_acc=math.nan, test_loss=math.inf)
    with ResultStore(path) as store:
        assert store.add(cell, result) and not store.add(cell, result)
        assert store.has(cell) and store.count() == 1
    row = report.load_rows(path)[0]
    assert math.isnan(row["test_acc"]) and row["test_loss"] == math.inf
    assert "| none | nan ± nan | 1 |" in report.table([row])
    other = _cell(norm="none", bs=32, seed=1)  # a second seed that converged: the cell's mean is unknown
    with ResultStore(path) as store:
        store.add(other, train_cell(other, tiny_splits))
    assert "| none | nan ± nan | 2 |" in report.table(report.load_rows(path))
    records = json.loads(json.dumps(report.json_records(report.load_rows(path)), allow_nan=False))
    assert records[0]["test_acc"] is None and records[0]["test_loss"] is None and records[1]["test_acc"] > 0


def test_report_reads_several_stores_as_one(tmp_path, tiny_splits, capsys):
    # (the second store names the dataset's default model, which the first leaves None: the same model)
    cells = [_cell(norm="none", bs=32), _cell(norm="gn", bs=32, model=default_model("synthetic"))]
    paths = [str(tmp_path / f"{c.norm}.sqlite") for c in cells]
    for cell, path in zip(cells, paths, strict=True):
        with ResultStore(path) as store:
            store.add(cell, train_cell(cell, tiny_splits))
    with ResultStore(paths[1]) as store:  # the same cell in both stores counts once
        store.add(cells[0], train_cell(cells[0], tiny_splits))
    assert sorted(r["label"] for r in report.load_rows(paths)) == ["gn", "none"]
    assert main(["report", "--results", *paths]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| gn |" in out and "| 1 |" in out and "| 2 |" not in out
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        report.load_rows([paths[0], str(tmp_path / "missing.sqlite")])


def test_plan_drops_repeated_norms_and_batch_sizes():
    assert len(plan(TrainConfig(), ["none", "none", "gn"], [4, 4, 8], range(2))) == 2 * 2 * 2


def test_too_few_samples_are_refused():
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="2 training and 2 test samples are too few"):
        data.hold_out(x, y, x, y, 2)


def test_store_writes_once_and_reports(tmp_path, tiny_splits):
    path = str(tmp_path / "r.sqlite")
    cell = _cell(norm="none", bs=32)
    result = train_cell(cell, tiny_splits)
    with ResultStore(path) as store:
        assert store.add(cell, result) and not store.add(cell, result)
        assert store.has(cell) and store.count() == 1
    rows = report.load_rows(path)
    assert rows[0]["label"] == "none"
    md = report.table(rows)
    assert "| none |" in md and f"{100 * result.test_acc:.1f} ± 0.0" in md and "epochs=2" in md
    early = result.history[0].test_acc  # time to accuracy: measured after epoch 1 of 2
    assert early is not None and rows[0]["test_acc_25"] == rows[0]["test_acc_50"] == early
    assert f"{100 * early:.1f} ± 0.0" in report.table(rows, "test_acc_50")
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_cell_another_sweep_stored_after_this_one_planned_is_not_trained_again(tmp_path, tiny_splits):
    from batchless_experiments import sweep

    cell = _cell(norm="none", bs=32)
    with ResultStore(str(tmp_path / "r.sqlite")) as store:
        store.add(cell, train_cell(cell, tiny_splits))  # by the other sweep, after this one's plan
        line = sweep._train_and_store(cell, store, tiny_splits, "cpu", progress=False)
        assert line.endswith("stored by another process meanwhile, skipped") and store.count() == 1


@pytest.mark.parametrize("jobs, threads", [(1, None), (2, 1)])
def test_the_last_cell_of_a_parallel_sweep_runs_on_one_thread(tmp_path, tiny_splits, monkeypatch, jobs, threads):
    """With --jobs 2 and one cell left the sweep trains it in its own process: on one thread, as its
    workers train theirs (several threads on 2 shared cores slow a batch-size-1 run many times over)."""
    from batchless_experiments import sweep

    seen = []
    monkeypatch.setattr(sweep, "_train_and_store", lambda *a, **k: seen.append(torch.get_num_threads()) or "")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ResultStore(str(tmp_path / "r.sqlite")) as store:
            sweep.run_cells([_cell(norm="none", bs=32)], store, tiny_splits, jobs=jobs)
        assert seen == [threads or 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_cell_with_fewer_seeds_than_its_row_says_so(tmp_path, tiny_splits):
    path = str(tmp_path / "r.sqlite")
    with ResultStore(path) as store:
        for bs, seed in ((32, 0), (32, 1), (16, 0)):
            cell = _cell(norm="none", bs=bs, seed=seed)
            store.add(cell, train_cell(cell, tiny_splits))
    (line,) = [x for x in report.table(report.load_rows(path)).splitlines() if x.startswith("| none |")]
    cells = line.split(" | ")
    assert "(n=1)" in cells[1] and "(n=" not in cells[2] and cells[-1] == "1–2 |"


def test_a_cell_written_before_a_config_field_existed_reads_with_its_default(tmp_path, tiny_splits):
    path = str(tmp_path / "r.sqlite")
    cell = _cell(norm="batchless", bs=32)
    with ResultStore(path) as store:
        store.add(cell, train_cell(cell, tiny_splits))
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as an older TrainConfig wrote it
        config = json.loads(db.execute("SELECT config FROM cells").fetchone()[0])
        del config["std_speed"]
        db.execute("UPDATE cells SET config = ?", (json.dumps(config),))
    row = report.load_rows(path)[0]
    assert row["config"]["std_speed"] == TrainConfig().std_speed and row["label"] == "batchless"
    with ResultStore(path) as store:
        assert store.has(cell)  # the same cell: its key never named the field


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_log_lines_keep_them_intact(monkeypatch):
    from batchless_experiments.train import log_line, progress_bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(range(3), 3, "x", leave=False).disable
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(range(3), 3, "cells", leave=True)
    assert not bar.disable
    for i in bar:
        log_line(f"cell {i} done")
    lines = re.split(r"[\r\n]", terminal.getvalue())
    assert {"cell 0 done", "cell 1 done", "cell 2 done"} <= set(lines)  # each on a line of its own


# ---------------------------------------------------------------- the fair protocol's learning rate


def test_lr_grid_follows_the_batch_size_by_the_scaling_rules():
    assert tuning.grid(1e-3, 64, "adam", [1 / 3, 1, 3]) == [3.33e-4, 1e-3, 3e-3]
    assert tuning.grid(1e-3, 256, "adamw", [1]) == [2e-3]  # square root for Adam(W)
    assert tuning.grid(1e-3, 1, "adam", [1]) == [1.25e-4]
    assert tuning.grid(0.1, 16, "sgd", [1]) == [0.025]  # linear for SGD


def test_beyond_steps_past_either_end():
    assert tuning.beyond([1e-3, 3e-3, 9e-3], 9e-3) == 0.027 and tuning.beyond([1e-3, 3e-3], 1e-3) == 0.000333


def test_choose_compares_common_seeds_and_flags_the_grid_ends():
    c = tuning.choose({1e-3: {0: 0.8, 1: 0.9}, 3e-3: {0: 0.85}, 1e-2: {0: 0.84}})
    assert c == tuning.Choice(3e-3, False, 3)  # seed 0 only: 0.8 < 0.85 > 0.84
    assert tuning.choose({1e-3: {0: 0.9}, 3e-3: {0: 0.85}}).edge
    assert tuning.choose({1e-3: {0: 0.9}, 3e-3: {0: 0.9}}).lr == 1e-3  # ties: the smaller rate
    assert tuning.choose({1e-3: {0: math.nan}, 3e-3: {0: 0.1}}).lr == 3e-3  # diverged: the worst
    with pytest.raises(ValueError, match="share no seed"):
        tuning.choose({1e-3: {0: 0.9}, 3e-3: {1: 0.85}})


def test_the_sweeps_choice_averages_the_choosing_seeds(tmp_path):
    # seed 0 alone would choose the smaller rate (0.9 > 0.8); the mean over seeds 0 and 1 the larger (0.7 < 0.8)
    grid = grid_plan(TrainConfig(lr=1e-3), ["none"], [64], [0, 1], [1, 3])
    val = {(1e-3, 0): 0.9, (1e-3, 1): 0.5, (3e-3, 0): 0.8, (3e-3, 1): 0.8}
    assert sorted((c.config.lr, c.seed) for c in grid) == sorted(val)
    with ResultStore(str(tmp_path / "r.sqlite")) as store:
        for c in grid:
            acc = val[(c.config.lr, c.seed)]
            store.add(c, CellResult(acc, 0.0, acc, 0, 0.0, acc, 0.0, 0.0, 0.0, [EpochLog(0, 0.0, 0.0, acc, None, 0.0)]))
        assert [(c.config.lr, c.seed) for c in chosen_plan(grid, store, [2])] == [(3e-3, 2)]
        seed0 = [c for c in grid if c.seed == 0]
        assert [(c.config.lr, c.seed) for c in chosen_plan(seed0, store, [2])] == [(1e-3, 2)]  # seed 0 alone


def test_report_keeps_only_each_cells_chosen_learning_rate():
    def row(norm, lr, seed, val_acc, test_acc):
        cfg = dataclasses.asdict(TrainConfig(lr=lr))
        return {"dataset": "mnist1d", "norm": norm, "batch_size": 8, "seed": seed, "config": cfg,
                "test_acc": test_acc, "history": [{"val_acc": val_acc}]}

    rows = [row("bn", 1e-3, 0, 0.7, 0.1), row("bn", 3e-3, 0, 0.8, 0.2), row("bn", 3e-3, 1, 0.6, 0.3),
            row("none", 1e-3, 0, 0.5, 0.4)]
    kept = report.relabel(rows)
    assert [(r["norm"], r["lr"], r["seed"]) for r in kept] == [("bn", 3e-3, 0), ("bn", 3e-3, 1), ("none", 1e-3, 0)]
    assert {r["label"] for r in kept} == {"bn", "none"}  # the learning rate is not part of a label
    text = report.table(kept, "lr")
    assert "| bn | 0.003* |" in text and "grid of 2" in text
    text = report.table(kept, "test_acc")
    assert "| none | **40.0 ± 0.0** |" in text and "| bn | 25.0 ± 7.1 |" in text  # the column's best in bold


# The experiments' adamw decays every parameter, the statistics included, on purpose (to measure the cost).
@pytest.mark.filterwarnings("ignore:AdamW is about to step with weight_decay:UserWarning")
def test_cells_record_test_accuracy_at_the_quarters(tiny_splits):
    cfg = TrainConfig(dataset="synthetic", epochs=5, init_samples=50, schedule="cosine", optimizer="adamw",
                      weight_decay=0.1)
    result = train_cell(Cell(cfg, "batchless", 32, 0), tiny_splits, progress=False)
    assert [h.epoch for h in result.history if h.test_acc is not None] == [2, 3, 4, 5]
    assert result.history[-1].test_acc == result.test_acc


@pytest.mark.parametrize("name", ["std_speed", "mean_speed"])
def test_the_speeds_reach_every_batchless_layer(name):
    import batchless as bl

    for speed in (1.0, 0.1):
        model = build_model("fashion-mnist", "batchless", **{name: speed})
        layers = [m for m in model.modules() if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d))]
        assert len(layers) == 6 and {getattr(m, name) for m in layers} == {speed}
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        TrainConfig(**{name: 0})
    args = build_parser().parse_args(["sweep", "--dataset", "mnist1d", "--norms", "batchless", "--batch-sizes", "4",
                                      "--results", "r.sqlite", f"--{name.replace('_', '-')}", "0.3"])
    assert getattr(config_from_args(args, "mnist1d"), name) == 0.3


def test_no_decay_affine_reaches_every_batchless_layer_and_the_training(tiny_splits):
    """--no-decay-affine builds the layers as the library does by default (weight and bias exempt from weight
    decay); without it they are decayed, as every stored cell ran, and the stored keys stay as they were."""
    import batchless as bl

    for exempt in (True, False):
        model = build_model("fashion-mnist", "batchless", decay_affine=not exempt)
        layers = [m for m in model.modules() if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d))]
        assert len(layers) == 6 and {m.decay_affine for m in layers} == {not exempt}
    args = build_parser().parse_args(["sweep", "--dataset", "mnist1d", "--norms", "batchless", "--batch-sizes", "4",
                                      "--results", "r.sqlite", "--no-decay-affine"])
    config = config_from_args(args, "mnist1d")
    assert not config.decay_affine and config_for_norm(config, "gn").decay_affine  # (a batchless option)
    assert "decay_affine" not in TrainConfig().changes()
    runs = [train_cell(_cell(optimizer="adamw", weight_decay=0.5, decay_affine=decay), tiny_splits, progress=False)
            for decay in (True, False)]
    assert runs[0].history[-1].train_loss != runs[1].history[-1].train_loss


def test_weight_std_standardizes_the_layer_before_every_norm(tiny_splits, monkeypatch):
    """--weight-std gives every norm (none included) the same standardized layers, leaves the keys of the
    cells stored before it existed unchanged, and is what the cell trains with."""
    from torch.nn.utils import parametrize

    from batchless_experiments import models, train

    def standardized(model):
        return [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]

    want = standardized(models.standardize_weights(build_model("fashion-mnist", "batchless", model="resnet")))
    assert len(want) == 9
    for norm in NORMS:
        got = standardized(models.standardize_weights(build_model("fashion-mnist", norm, model="resnet")))
        assert got == want, norm
    args = build_parser().parse_args(["sweep", "--dataset", "mnist1d", "--norms", "gn", "--batch-sizes", "4",
                                      "--results", "r.sqlite", "--weight-std"])
    config = config_from_args(args, "mnist1d")
    assert config.weight_std and config_for_norm(config, "gn").weight_std
    assert "weight_std" not in TrainConfig().changes()  # (so stored keys stay as they were)
    assert Cell(config, "gn", 4, 0).key != Cell(dataclasses.replace(config, weight_std=False), "gn", 4, 0).key
    built = []
    monkeypatch.setattr(train, "standardize_weights", lambda m: built.append(models.standardize_weights(m)))
    train_cell(_cell(norm="gn", weight_std=True), tiny_splits, progress=False)
    assert len(built) == 1 and standardized(built[0])
