"""Data-parallel training (issue 6): DDP and FSDP on 2 CPU processes (gloo, 127.0.0.1), no SyncBatchNorm.

One launch of 2 worker processes (this file run as a script, killed after ``TIMEOUT_S``) trains float64
models under DDP with per-rank micro-batches, under FSDP (``fully_shard``), and counts the collectives of a
step with the profiler; the tests compare its results with a single process training on the whole global
batch. Why the two must agree for batchless: DDP averages the ranks' gradients, each rank's loss is a mean
over its own ``N / R`` instances (``bl.accumulate`` weights micro-batches ``m / (N / R)``, the NLL too), so
the average over ``R`` ranks of local means is the mean over all ``N`` instances — the single process's loss
and NLL. Equal per-rank batches are required (as with ``DistributedSampler(drop_last=True)``). BatchNorm
normalises each micro-batch with its own statistics, so it cannot agree: its drift is measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchless as bl

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 12  # 6 per rank
MICRO = 4  # per-rank micro-batches of 4 and 2 instances
TIMEOUT_S = 120
NORMS = ("batchless", "bn", "syncbn")


def make_model(norm: str) -> nn.Module:
    """A float64 conv net with a normalization on the input and after each hidden layer (the paper's layout).

    ``norm``: ``batchless`` (one layer in explicit NLL mode, the others implicit), ``bn``, ``syncbn`` (the CPU
    stand-in for ``nn.SyncBatchNorm``), ``none``.
    """
    def norm2d(c):
        return {"batchless": lambda: bl.BatchlessNorm2d(c), "none": nn.Identity}.get(norm, lambda: nn.BatchNorm2d(c))()

    def norm1d(c):
        return {"batchless": lambda: bl.BatchlessNorm1d(c, nll="explicit"), "none": nn.Identity}.get(
            norm, lambda: nn.BatchNorm1d(c))()

    torch.manual_seed(0)
    model = nn.Sequential(norm2d(2), nn.Conv2d(2, 4, 3), norm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), norm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    if norm == "syncbn":
        from batchless_experiments.bench_ddp import cpu_sync_batchnorm
        cpu_sync_batchnorm(model)
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches: inputs (STEPS, N, 2, 6, 6) with mean 1 and std 2 (so mu/sigma must move)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 2, 6, 6, generator=g, dtype=torch.float64) * 2.0 + 1.0
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int) -> None:
    """Adam steps, one per leading index of ``x``, each accumulating its batch in micro-batches."""
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for xs, ys in zip(x, y, strict=True):
        opt.zero_grad()
        bl.accumulate(model, F.cross_entropy, xs, ys, micro_batch_size=micro_batch_size)
        opt.step()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, full tensors (FSDP's DTensor shards gathered), on CPU."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k.removeprefix("module.")] = v.detach().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = [k for k in a if a[k].is_floating_point()] if keys is None else keys
    return max((a[k] - b[k]).abs().max().item() for k in keys)


# ---------------------------------------------------------------------------------------------------------
# The worker: this file run as ``python test_distributed.py RANK WORLD PORT OUT``.


def _worker(rank: int, world: int, out: str) -> None:
    import datetime
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchless_experiments.bench_ddp import count_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x, y = make_data()
    per_rank = GLOBAL_BATCH // world
    xr, yr = x[:, rank * per_rank:(rank + 1) * per_rank], y[:, rank * per_rank:(rank + 1) * per_rank]
    result: dict = {"ddp": {}, "collectives": {}}

    # DDP, per-rank micro-batches (SyncBatchNorm: the rank's batch in one forward, as it is meant to be used)
    for norm in NORMS:
        model = DDP(make_model(norm))
        train(model, xr, yr, per_rank if norm == "syncbn" else MICRO)
        result["ddp"][norm] = state(model)
    # the flags frameworks set (Lightning's ddp_find_unused_parameters_true, ...); the explicit-mode layer's
    # statistics get their gradient from nll_loss, outside the output's graph, yet must count as used
    model = DDP(make_model("batchless"), find_unused_parameters=True, gradient_as_bucket_view=True)
    train(model, xr, yr, MICRO)
    result["ddp"]["batchless_find_unused"] = state(model)
    model = DDP(make_model("bn"))  # BatchNorm without micro-batches: per-rank statistics only
    train(model, xr, yr, per_rank)
    result["ddp"]["bn_per_rank_batch"] = state(model)

    # collectives of one step (2 micro-batches per rank), after DDP's one-off bucket rebuild
    for norm in ("none", *NORMS):
        model = DDP(make_model(norm))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)

        def step(model=model, opt=opt):
            opt.zero_grad()
            bl.accumulate(model, F.cross_entropy, xr[0], yr[0], micro_batch_size=MICRO)
            opt.step()

        for _ in range(2):
            step()
        result["collectives"][norm] = count_collectives(step)

    # nn.SyncBatchNorm itself on CPU
    try:
        nn.SyncBatchNorm(2).double().train()(xr[0])
        result["syncbn_cpu_error"] = None
    except (ValueError, RuntimeError) as e:
        result["syncbn_cpu_error"] = f"{type(e).__name__}: {e}"

    # FSDP2: every batchless layer and the root sharded; micro-batches reduce-scatter each (no no_sync())
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = make_model("batchless")
        for m in model:
            if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d, nn.Linear, nn.Conv2d)):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except Exception as e:  # this torch cannot shard on CPU: reported as a skip with the reason
        result["fsdp"] = f"{type(e).__name__}: {e}"
    else:  # (a failure while training is batchless's: the worker fails)
        train(model, xr, yr, MICRO)
        result["fsdp"] = state(model)

    if rank == 0:
        torch.save(result, out)
    # the sharded model must go before the process group: left to interpreter exit, its teardown aborted the
    # process ("terminate called without an active exception") in ~1 of 6 runs (torch 2.13, gloo, CPU)
    model = mesh = None
    gc.collect()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed():
    """Run the 2 workers once (hard timeout, killed if they overrun) and return rank 0's results."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    from batchless_experiments.bench_ddp import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), out], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(WORLD)]
        logs, deadline = [], time.monotonic() + TIMEOUT_S
        try:
            for p in procs:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s; killed")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            pytest.fail("distributed worker failed:\n" + "\n".join(log[-3000:] for log in logs))
        return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference():
    """Single process, float64: the whole global batch per step, in one forward and in micro-batches of 5."""
    x, y = make_data()
    out = {}
    for norm in ("batchless", "bn"):
        for micro in (GLOBAL_BATCH, 5):
            model = make_model(norm)
            train(model, x, y, micro)
            out[norm, micro] = state(model)
    return out


def test_batchless_ddp_equals_single_process(distributed, reference):
    ddp = distributed["ddp"]["batchless"]
    init = state(make_model("batchless"))
    stats = [k for k in ddp if k.endswith(("mean", "raw_std"))]
    assert len(stats) == 6  # mean and raw_std of 3 layers
    assert max_diff(ddp, init, stats) > 1e-2  # the statistics did move
    for micro in (GLOBAL_BATCH, 5):
        for run in ("batchless", "batchless_find_unused"):
            diff = max_diff(distributed["ddp"][run], reference["batchless", micro])
            print(f"{run} DDP vs single process (micro-batch {micro}): max |diff| {diff:.2e}")
            assert diff < 1e-12  # float64: summation order only


def test_batchnorm_ddp_drifts(distributed, reference):
    bl_diff = max_diff(distributed["ddp"]["batchless"], reference["batchless", GLOBAL_BATCH])
    ddp, ref = distributed["ddp"]["bn"], reference["bn", GLOBAL_BATCH]
    params = [k for k, _ in make_model("bn").named_parameters()]
    running = [k for k in ddp if k.endswith(("running_mean", "running_var"))]
    drift, drift_running = max_diff(ddp, ref, params), max_diff(ddp, ref, running)
    per_rank = distributed["ddp"]["bn_per_rank_batch"]
    drift_rank = max_diff(per_rank, ref, params)
    print(f"BatchNorm DDP vs single process: max |diff| parameters {drift:.2e}, running stats {drift_running:.2e} "
          f"(per-rank batch in one forward: parameters {drift_rank:.2e}; batchless: {bl_diff:.2e})")
    assert drift > 1e-4 and drift > 1e3 * bl_diff
    assert drift_rank > 1e-4 and drift_rank > 1e3 * bl_diff


def test_sync_batchnorm_standin_equals_single_process(distributed, reference):
    # the CPU stand-in computes BatchNorm over the union of the ranks' batches, like nn.SyncBatchNorm:
    # equivalent to one process on the global batch, at the price of collectives per layer (below)
    diff = max_diff(distributed["ddp"]["syncbn"], reference["bn", GLOBAL_BATCH])
    print(f"SyncBatchNorm stand-in DDP vs single process: max |diff| {diff:.2e}")
    assert diff < 1e-5


def test_nn_sync_batchnorm_refuses_cpu(distributed):
    # why the benchmark and the counts use a stand-in: nn.SyncBatchNorm has no CPU path in this torch
    err = distributed["syncbn_cpu_error"]
    if err is None:
        pytest.skip("this torch's nn.SyncBatchNorm runs on CPU")
    assert "GPU" in err


def test_collectives_per_step(distributed):
    counts = distributed["collectives"]
    print("collectives per step (2 micro-batches per rank):", counts)
    # batchless: DDP's gradient all-reduce (one bucket for this model, after the last micro-batch) and
    # nothing else, the same as the model without normalization
    assert counts["batchless"] == counts["none"] == {"c10d::allreduce_": 1.0}
    # BatchNorm: DDP also broadcasts rank 0's running statistics (coalesced per dtype) in the step's synced forward
    assert counts["bn"]["c10d::allreduce_"] == 1 and counts["bn"]["c10d::broadcast_"] >= 1
    # SyncBatchNorm (3 layers): per layer and micro-batch an all_gather forward and an all_reduce backward
    assert counts["syncbn"]["c10d::allgather_"] == 3 * 2
    assert counts["syncbn"]["c10d::allreduce_"] == 1 + 3 * 2


def test_fsdp_fully_shard_equals_single_process(distributed, reference):
    fsdp = distributed["fsdp"]
    if isinstance(fsdp, str):
        pytest.skip(f"fully_shard with gloo on CPU failed in this torch: {fsdp}")
    diff = max_diff(fsdp, reference["batchless", GLOBAL_BATCH])
    print(f"batchless FSDP (fully_shard) vs single process: max |diff| {diff:.2e}")
    assert diff < 1e-12


@pytest.mark.slow
def test_example_script_same_on_one_and_two_processes(tmp_path):
    """examples/train_ddp.py runs unchanged under torchrun; 1 and 2 processes print the same numbers."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_ddp.py")
    args = [script, "--data", "synthetic", "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from batchless_experiments.bench_ddp import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    outputs = []
    for cmd in ([sys.executable, *args], [*torchrun, *args]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append([line.split(" (")[0] for line in done.stdout.splitlines() if line.startswith("epoch")])
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


@pytest.mark.slow
def test_bench_ddp_quick(tmp_path):
    """`batchless bench ddp --quick` runs 2 processes and writes well-formed JSON (timings not asserted)."""
    import json

    from batchless_experiments import cli

    out = tmp_path / "ddp.json"
    assert cli.main(["bench", "ddp", "--quick", "--silent", "--timeout", str(TIMEOUT_S), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"batchless", "syncbn", "bn"}
    assert all(r["median_ms"] > 0 for r in results.values()) and results["syncbn"]["ratio_to_syncbn"] == 1.0
    assert results["batchless"]["collectives_per_step"] == {"c10d::allreduce_": 1.0}
    assert results["syncbn"]["collectives_per_step"]["c10d::allgather_"] == 9  # one per layer


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
