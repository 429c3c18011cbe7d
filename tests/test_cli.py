"""The `batchless` command line on tiny settings: sweep, resume (also after SIGKILL), report, demo, errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from batchless_experiments import idx, tuning
from batchless_experiments.cli import build_parser, main
from batchless_experiments.store import ResultStore
from test_experiments import write_cifar
from test_idx import write_idx_dataset

TINY = ["--epochs", "1", "--num-samples", "200", "--init-samples", "50", "--threads", "1"]
REQUIRED_JSON_KEYS = {"dataset", "norm", "batch_size", "seed", "test_acc", "val_acc_best", "val_acc_best_epoch",
                      "test_acc_at_best_val", "wall_s", "act_mem_mb", "config", "history"}


def _count(path: str) -> int:
    """The rows of a results store; 0 while it is still being created."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_commands_are_registered():
    text = build_parser().format_help()
    for name in ("demo", "sweep", "report"):
        assert name in text


def test_sweep_resume_and_report_json(tmp_path, capsys):
    results = str(tmp_path / "r.sqlite")
    argv = ["sweep", "--dataset", "synthetic", "--norms", "none,bn,batchless", "--batch-sizes", "1,64",
            "--seeds", "1", "--results", results, *TINY]
    assert main(argv) == 0
    assert _count(results) == 5  # bn at batch size 1 skipped
    capsys.readouterr()
    assert main(argv) == 0
    assert "5 of 5 cells already in" in capsys.readouterr().err
    assert _count(results) == 5

    assert main(["report", "--results", results, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 5
    for r in records:
        assert REQUIRED_JSON_KEYS <= set(r)
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc_best"] <= 1.0
        assert r["dataset"] == "synthetic" and len(r["history"]) == 1
        assert {"train_loss", "val_loss", "val_acc", "nll"} <= set(r["history"][0])
    assert {(r["norm"], r["batch_size"]) for r in records} == {
        ("none", 1), ("none", 64), ("bn", 64), ("batchless", 1), ("batchless", 64)}

    png = tmp_path / "plot.png"
    assert main(["report", "--results", results, "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "| batchless |" in out and "bs 64" in out and f"wrote {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigkill_loses_at_most_the_running_cell(tmp_path):
    results = str(tmp_path / "r.sqlite")
    argv = ["sweep", "--dataset", "synthetic", "--norms", "none,gn,batchless", "--batch-sizes", "4,8",
            "--seeds", "2", "--results", results, *TINY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from batchless_experiments.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600  # generous: a loaded machine imports torch slowly
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(results) and _count(results) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed; enlarge it"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 2 <= _count(results) < 12
    assert main(argv) == 0
    assert _count(results) == 12
    with contextlib.closing(sqlite3.connect(results)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_demo_smoke(tmp_path, capsys):
    write_idx_dataset(tmp_path / "data", n_train=200, n_test=50)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--batch-sizes", "64",
                 "--jobs", "1", *TINY]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("fashion-mnist (200 samples: 160 to train on), 5 runs")
    # each run named completely; batchless as users get it (the library's speeds), lr 3e-3 scaled to bs 1
    assert ("fashion-mnist cnn batchless [init_samples=50, mean_speed=0.1, std_speed=0.1] bs=1 lr=0.000375 seed=0"
            in captured.err)
    assert "| gn |" in captured.out and "| batchless |" in captured.out and "bs 1 " in captured.out
    # at batch 64 also with weight standardization, as the README advises there
    assert "batchless [init_samples=50, mean_speed=0.1, std_speed=0.1] ws bs=64" in captured.err
    assert "| batchless [weight_std=True] |" in captured.out
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG" and (out / "demo_curves.png").exists()
    assert _count(str(out / "results.sqlite")) == 5  # bn, gn, batchless (also with WS) at 64; batchless at 1


def test_demo_falls_back_to_mnist1d_without_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(idx.DEFAULT_DIR, "fashion-mnist", str(tmp_path / "nothing"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--batch-sizes", "64", "--norms", "gn", "--jobs", "1", *TINY]) == 0
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "-> falling back to MNIST-1D (generated offline)" in err
    assert "mnist1d cnn gn bs=64" in err
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "nothing"), *TINY]) == 2  # asked for


def test_cifar10_sweep_on_generated_files(tmp_path, capsys):
    write_cifar(tmp_path, n=8)
    results = str(tmp_path / "r.sqlite")
    assert main(["sweep", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--norms", "batchless,gn",
                 "--batch-sizes", "16", "--seeds", "1", "--results", results, "--epochs", "1",
                 "--init-samples", "16", "--threads", "1"]) == 0
    assert _count(results) == 2


def test_crafted_cifar_file_exits_nonzero_with_clear_error(tmp_path):
    write_cifar(tmp_path, n=2)
    crafted = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(crafted)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from batchless_experiments.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "sweep", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--norms", "none", "--batch-sizes", "4", "--seeds", "1",
                           "--results", str(tmp_path / "r.sqlite")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "refusing to load global posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--norms", "none,batchnorm"], "unknown: batchnorm"),
    (["--batch-sizes", "0,4"], "expected integers >= 1"),
    (["--batch-sizes", "a"], "expected comma-separated integers"),
    (["--epochs", "0"], "expected an integer >= 1"),
    (["--stats-optimizer", "rmsprop"], "invalid choice"),
    (["--dataset", "imagenet"], "invalid choice"),
])
def test_bad_cli_input_is_rejected_with_expected_and_received(tmp_path, capsys, argv, message):
    base = {"--dataset": "synthetic", "--norms": "none", "--batch-sizes": "4", "--results": str(tmp_path / "r")}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    with pytest.raises(SystemExit) as e:
        main(["sweep", *[x for kv in base.items() for x in kv]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("records", [0, 3000])
def test_report_into_a_closed_pipe_stops_quietly(tmp_path, records):
    """`batchless report --json | head -1`: the reader leaves before the output ends (a short one is still in
    the buffer at exit, a long one fills the pipe): no error message, the status of a tool killed by SIGPIPE."""
    results = str(tmp_path / "r.sqlite")
    ResultStore(results).close()  # no cells: `[]`; the long output replaces the records
    code = ("import sys; from batchless_experiments import cli, report; "
            f"report.json_records = lambda rows: [{{'cell': 'x' * 100}}] * {records}; sys.exit(cli.main())")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-c", code, "report", "--results", results, "--json"], stdout=write,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                              timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")


def test_report_on_missing_file_fails_cleanly(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "nope.sqlite")]) == 2
    assert "run `batchless sweep" in capsys.readouterr().err


def test_results_folder_is_created_and_a_non_store_is_refused_unchanged(tmp_path, capsys):
    results = tmp_path / "new" / "folder" / "r.sqlite"
    assert main(["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "64", "--seeds", "1",
                 "--results", str(results), *TINY]) == 0
    assert _count(str(results)) == 1
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    before = other.read_bytes()
    capsys.readouterr()
    assert main(["report", "--results", str(other)]) == 2  # read-only: no cells table created, no WAL switch
    assert "holds no batchless results (an SQLite file without a 'cells' table)" in capsys.readouterr().err
    assert other.read_bytes() == before
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database " * 100)
    for command in (["report"], ["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "4"]):
        assert main([*command, "--results", str(garbage)]) == 2
        assert "is not a usable results store (SQLite: file is not a database)" in capsys.readouterr().err


def test_argument_errors_leave_no_folders_behind(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "4", "--results",
              str(tmp_path / "new" / "r.sqlite"), "--epochs", "0"])
    assert not (tmp_path / "new").exists()
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit):
        main(["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "4", "--results",
              str(tmp_path / "notes.txt" / "r.sqlite")])  # (a file where a folder would have to be)
    assert "is not a writable folder" in capsys.readouterr().err


def test_devices_other_than_cuda_pass_through():
    from batchless_experiments.options import device_name

    assert [device_name(d) for d in ("cpu", "cpu:0", "mps", "xpu")] == ["cpu", "cpu:0", "mps", "xpu"]


def test_interrupt_says_what_is_kept(monkeypatch, capsys):
    from batchless_experiments import sweep

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run", interrupted)
    assert main(["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "4", "--results",
                 os.devnull]) == 130
    assert "interrupted (finished cells are kept: rerun the same command to resume)" in capsys.readouterr().err


def test_report_header_names_the_base_its_labels_use(tmp_path, capsys):
    results = str(tmp_path / "r.sqlite")
    base = ["sweep", "--dataset", "synthetic", "--norms", "batchless", "--results", results, *TINY]
    assert main([*base, "--batch-sizes", "16,32,64", "--seeds", "1"]) == 0
    assert main([*base, "--batch-sizes", "64", "--seeds", "3", "--epochs", "2"]) == 0  # most cells at bs 64
    capsys.readouterr()
    assert main(["report", "--results", results, "--batch-sizes", "64", "--metrics", "test_acc"]) == 0
    out = capsys.readouterr().out
    assert "base config: epochs=1," in out and "| batchless |" in out and "| batchless [epochs=2] |" in out


def test_weight_standardization_is_the_labelled_row_even_with_more_cells(tmp_path, capsys):
    results = str(tmp_path / "r.sqlite")
    base = ["sweep", "--dataset", "synthetic", "--norms", "none,batchless", "--batch-sizes", "64", "--results",
            results, *TINY]
    assert main([*base, "--seeds", "1"]) == 0
    assert main([*base, "--seeds", "2", "--weight-std"]) == 0  # more cells with it than without
    capsys.readouterr()
    assert main(["report", "--results", results, "--metrics", "test_acc"]) == 0
    out = capsys.readouterr().out
    assert "| batchless |" in out and "| batchless [weight_std=True] |" in out
    assert "| none |" in out and "| none [weight_std=True] |" in out and "weight_std=False" not in out
    only_ws = str(tmp_path / "ws.sqlite")  # a store of WS cells alone: batchless's config is still the base
    assert main(["sweep", "--dataset", "synthetic", "--norms", "none,batchless", "--batch-sizes", "64", "--results",
                 only_ws, "--seeds", "1", "--weight-std", "--std-speed", "0.1", *TINY]) == 0
    capsys.readouterr()
    assert main(["report", "--results", only_ws, "--metrics", "test_acc"]) == 0
    out = capsys.readouterr().out
    assert "| batchless |" in out and "std_speed=0.1, weight_std=True" in out


def test_ablation_rows_are_labelled_and_filtered(tmp_path, capsys):
    results = str(tmp_path / "r.sqlite")
    base = ["sweep", "--dataset", "synthetic", "--batch-sizes", "64", "--seeds", "1", "--results", results, *TINY]
    assert main([*base, "--norms", "none,batchless"]) == 0
    assert main([*base, "--norms", "none,batchless", "--stats-lr-scale", "0.1", "--no-data-init"]) == 0
    assert _count(results) == 3  # the `none` cell is shared: the ablation options do not apply to it
    capsys.readouterr()
    assert main(["report", "--results", results, "--metrics", "test_acc"]) == 0
    out = capsys.readouterr().out
    assert "| batchless [data_init=False, stats_lr_scale=0.1] |" in out and "| none |" in out
    assert main(["report", "--results", results, "--metrics", "nll_last"]) == 0
    out = capsys.readouterr().out
    assert "| batchless |" in out and "| none |" not in out  # the NLL exists for batchless only
    assert main(["report", "--results", results, "--base-only", "--json"]) == 0
    assert {r["label"] for r in json.loads(capsys.readouterr().out)} == {"none", "batchless"}


def test_fair_protocol_sweep_in_two_processes_then_report(tmp_path, capsys):
    write_idx_dataset(tmp_path / "data", n_train=60, n_test=20)
    results = str(tmp_path / "r.sqlite")
    argv = ["sweep", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--norms", "none,batchless",
            "--batch-sizes", "8", "--seeds", "2", "--lr-grid", "0.5,2", "--schedule", "cosine", "--jobs", "2",
            "--results", results, "--epochs", "2", "--init-samples", "20", "--extend-grid", "0"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "stage 1: 4 runs" in err and "stage 2: 2 runs" in err
    assert "fashion-mnist cnn batchless [init_samples=20] bs=8 lr=0.000177 seed=0" in err  # each run named completely
    assert _count(results) == 6
    assert main(argv) == 0
    assert "4 of 4 cells already in" in capsys.readouterr().err and _count(results) == 6
    assert main(["report", "--results", results, "--metrics", "lr,test_acc"]) == 0
    out = capsys.readouterr().out
    assert "learning rate chosen per cell on validation accuracy from a grid of 2" in out
    assert re.search(r"\| none \| 0\.000(177|707)\* \| 2 \|", out)  # both runs at the chosen rate, an end


def test_a_choice_at_an_end_of_the_grid_extends_it(tmp_path, capsys):
    write_idx_dataset(tmp_path / "data", n_train=60, n_test=20)
    results = str(tmp_path / "r.sqlite")
    argv = ["sweep", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--norms", "gn",
            "--batch-sizes", "8", "--seeds", "2", "--lr-grid", "0.5,2", "--extend-grid", "1",
            "--results", results, "--epochs", "1"]
    assert main(argv) == 0  # a grid of two: the choice is an end, whichever it is
    err = capsys.readouterr().err
    assert re.search(r"gn bs=8 chose lr=0\.000(177|707), an end of \[0\.000177, 0\.000707\]: trying "
                     r"lr=(4\.43e-05|0\.00283)", err)  # a grid step: x4 here
    with contextlib.closing(sqlite3.connect(results)) as db:
        rates = sorted(json.loads(c)["lr"] for (c,) in db.execute("SELECT config FROM cells WHERE seed = 0"))
    assert len(rates) == 3 and {0.000177, 0.000707} < set(rates)
    assert _count(results) == 4  # 2 grid + 1 beyond its end + seed 1 at the choice


def test_choose_seeds_trains_every_rate_with_them_and_chooses_on_their_mean(tmp_path, capsys):
    write_idx_dataset(tmp_path / "data", n_train=60, n_test=20)
    results = str(tmp_path / "r.sqlite")
    argv = ["sweep", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--norms", "none",
            "--batch-sizes", "8", "--seeds", "3", "--lr-grid", "0.5,2", "--extend-grid", "1", "--choose-seeds", "2",
            "--results", results, "--epochs", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "stage 1: 4 runs, seeds 0, 1 at each learning rate" in err and "stage 2: 1 runs, seeds 2 at" in err
    with contextlib.closing(sqlite3.connect(results)) as db:
        runs = [(json.loads(c)["lr"], s, json.loads(h)[-1]["val_acc"])
                for c, s, h in db.execute("SELECT config, seed, history FROM cells")]
    val = {}
    for lr, seed, acc in runs:
        val.setdefault(lr, {})[seed] = acc
    assert len(val) == 3 and all({0, 1} <= set(v) for v in val.values())  # the grid and its extension, 2 seeds
    chosen = tuning.choose(val).lr  # on the seeds every rate has: 0 and 1
    assert set(val[chosen]) == {0, 1, 2} and _count(results) == 7  # seed 2 at the rate the 2-seed mean chose
    assert main([*argv, "--choose-seeds", "4"]) == 2  # the last value given counts
    assert "--choose-seeds must be at most --seeds (3), got 4" in capsys.readouterr().err
