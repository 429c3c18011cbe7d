"""`batchless bench speed|memory` in their tiny --quick modes: they run and write well-formed JSON.

No timing or memory value is asserted (2 shared CPU cores make them meaningless here); BENCHMARKS.md
holds the real numbers and the commands that produce them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchless import fused
from batchless._state import STATE
from batchless_experiments import bench_memory, bench_speed, cli


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_speed_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "created" / "speed.json"  # the folder is created before the benchmark runs
    threads = torch.get_num_threads()
    assert cli.main(["bench", "speed", "--quick", "--silent", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the benchmark's thread setting does not leak
    result = json.loads(out.read_text())
    assert result["benchmark"] == "speed" and result["machine"]["torch"] == torch.__version__
    layers = result["layers"]
    assert {(r["shape_name"], r["dtype"], r["mode"]) for r in layers} == {
        (s, d, m) for s in bench_speed.QUICK_SHAPES for d in bench_speed.DTYPES for m in ("train", "infer")}
    for rec in layers + result["models"]:
        assert set(rec["results"]) >= {"batchless", "bn", "gn", "ln"}
        for v in rec["results"].values():
            assert _finite(v["median_ms"]) and _finite(v["ratio_to_bn"]) and v["q1_ms"] <= v["q3_ms"]
        assert rec["results"]["bn"]["ratio_to_bn"] == 1.0
    assert {r["mode"] for r in result["models"]} == {"train", "infer"}
    fold = result["fold"]
    assert _finite(fold["ratio"]) and _finite(fold["ratio_biased"]) and fold["batchless_layers_left"] == 0
    table = capsys.readouterr().out
    assert table.startswith("| benchmark |") and "resnet" in table


def test_speed_fused_times_the_other_kernel_path(tmp_path):
    out = tmp_path / "speed.json"
    assert cli.main(["bench", "speed", "--quick", "--silent", "--fused", "--no-models", "--shapes", "4x6x5x5",
                     "--dtypes", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    default = result["machine"]["batchless_path"]
    assert default == fused.path(torch.ones(1)) and default in ("native", "eager")  # the CPU default
    train = next(r for r in result["layers"] if r["mode"] == "train")
    others = {"batchless+eager", "batchless+compiled"} - {f"batchless+{default}"}
    assert set(train["results"]) >= others
    assert all(_finite(train["results"][name]["median_ms"]) for name in others)
    assert STATE.mode == "auto"  # the candidate's path was set around its calls only


def test_fused_path_module_uses_its_mode_and_restores():
    seen = []
    inner = torch.nn.Identity()
    inner.register_forward_hook(lambda *args: seen.append(STATE.mode))
    bench_speed.FusedPath(inner, "compiled")(torch.ones(1))
    assert seen == ["compiled"] and STATE.mode == "auto"


def test_memory_quick_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    assert cli.main(["bench", "memory", "--quick", "--silent", "--out", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    configs = {(r["norm"], r["effective_batch"], r["micro_batch"]) for r in result["rows"]}
    assert configs == {("bn", 2, 2), ("batchless", 2, 1), ("batchless", 2, 2)}
    for r in result["rows"]:
        assert isinstance(r["extra_mb"], float) and r["resident_before_mb"] > 0
    assert set(result["summary"]["2"]) == {"bn_extra_mb", "batchless_m1_extra_mb", "ratio_m1_to_bn"}
    assert result["floor_mb"]["floor"] == pytest.approx(4 * result["floor_mb"]["params"])
    assert png.stat().st_size > 0
    assert "Model state floor" in capsys.readouterr().out


def test_memory_table_and_plot_when_batchnorm_adds_no_resident_page(tmp_path):
    """At --quick's sizes a step grows the resident set by tens of KB, which the allocator may already
    hold: BatchNorm's extra memory can be 0, and there is then no ratio to it (it divided by zero)."""
    rows = [{"norm": "bn", "effective_batch": 2, "micro_batch": 2, "extra_mb": 0.0},
            {"norm": "batchless", "effective_batch": 2, "micro_batch": 1, "extra_mb": 0.06}]
    result = {"config": {"effective_batches": [2], "image": 8}, "rows": rows,
              "summary": {"2": {"bn_extra_mb": 0.0, "batchless_m1_extra_mb": 0.06, "ratio_m1_to_bn": None}},
              "floor_mb": {"params": 0.01, "grads": 0.01, "optimizer": 0.02, "floor": 0.04}}
    assert bench_memory._ratio(0.06, 0.0) is None and bench_memory._ratio(0.06, 0.03) == pytest.approx(2.0)
    assert "| BatchNorm | 2 | 2 | 0.0 | — |" in bench_memory.markdown_table(result)
    bench_memory.plot(result, str(tmp_path / "memory.png"))


def test_microbatch_claim_is_the_same_model_for_less_memory(tmp_path, capsys):
    out = tmp_path / "mb.json"
    assert cli.main(["bench", "microbatch", "--quick", "--silent", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    same = r["equivalence"]
    assert same["dtype"] == "float64" and same["max_abs_diff"] < 1e-12 < 1e-4 < same["max_abs_change"]
    assert r["memory_mb"]["batchless micro-batch 1"] < 0.5 * r["memory_mb"]["batchless"]
    assert "micro-batch 1 / batch 64: memory" in capsys.readouterr().out


DEVICE_COMMANDS = [["bench", "speed", "--quick"], ["bench", "memory", "--quick"],
                   ["sweep", "--dataset", "synthetic", "--norms", "none", "--batch-sizes", "4", "--results", "r.db"]]


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize(("device", "message"), [
    pytest.param("cuda", "'cuda' requested but CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the message given where CUDA is absent")),
    ("gpu", "expected a torch device such as cpu, cuda or cuda:0; received 'gpu'"),
])
def test_unavailable_or_unknown_device_is_refused_cleanly(command, device, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--device", device])
    assert exit.value.code == 2
    assert f"argument --device: {message}" in capsys.readouterr().err


def test_time_interleaved_alternates_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    samples = bench_speed.time_interleaved(fns, rounds=4, inner=1, warmup=0, device=torch.device("cpu"))
    assert calls == list("abccbaabccba")
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_page_faults_are_counted_per_call_and_marked_in_tables():
    """A candidate that touches fresh memory on every call (here 4 MB from mmap) is told apart."""
    import mmap

    def fresh():
        with mmap.mmap(-1, 1 << 22) as m:
            m[:: mmap.PAGESIZE] = b"x" * len(range(0, 1 << 22, mmap.PAGESIZE))

    faults = {}
    samples = bench_speed.time_interleaved({"bn": lambda: None, "fresh": fresh}, rounds=3, inner=2, warmup=1,
                                           device=torch.device("cpu"), faults=faults)
    summary = bench_speed.summarize(samples, faults=faults)
    assert summary["fresh"]["page_faults_per_call"] >= (1 << 22) // mmap.PAGESIZE
    assert summary["bn"]["page_faults_per_call"] < bench_speed.FAULTS_MARK
    rec = {"shape_name": "s", "shape": [1], "dtype": "float32", "mode": "train", "results": summary}
    table = bench_speed.markdown_table([rec])
    row = table.splitlines()[2].split("|")
    assert row[4].strip().endswith("(1.00x)") and row[5].strip().endswith("\\*") and "page faults" in table


def test_summarize_pairs_ratios_by_round():
    summary = bench_speed.summarize({"bn": [1.0, 2.0, 4.0], "x": [0.5, 1.0, 2.0]})
    assert summary["x"]["ratio_to_bn"] == 0.5 and summary["x"]["median_ms"] == 1.0


def test_memory_configurations_cover_powers_of_two_and_the_full_batch():
    cfgs = bench_memory.MemoryConfig(effective_batches=[6]).configurations()
    assert [(c["norm"], c["micro_batch"]) for c in cfgs] == [
        ("bn", 6), ("batchless", 1), ("batchless", 2), ("batchless", 4), ("batchless", 6)]


@pytest.mark.parametrize("shape", list(bench_speed.QUICK_SHAPES.values()))
@pytest.mark.parametrize("norm", bench_speed.LAYER_NORMS)
def test_every_layer_candidate_runs_a_training_step(norm, shape):
    layer = bench_speed.make_layer(norm, shape)
    x = torch.randn(shape, requires_grad=True)
    grads = bench_speed.train_step(layer, x)()
    assert grads[0].shape == x.shape


def test_speed_takes_explicit_shapes_and_skips_models(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["bench", "speed", "--quick", "--silent", "--no-models", "--shapes", "2d,3x5", "--dtypes", "float32",
            "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["shape_name"], tuple(r["shape"])) for r in result["layers"]][::2] == [
        ("2d", bench_speed.LAYER_SHAPES["2d"]), ("3x5", (3, 5))]
    assert result["models"] == [] and result["fold"] is None


@pytest.mark.parametrize("bad", ["3", "0x4", "2x3x4x5x6x7", "2d,big", "8*16"])
def test_speed_rejects_bad_shapes(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "speed", "--shapes", bad])
    assert "expected shape names" in capsys.readouterr().err
