"""The paper's claim on the Fashion-MNIST study's own CNN: micro-batch 1 trains the batch-64 model.

Three measurements of batchless at effective batch 64, trained with micro-batch 1
(:func:`batchless.accumulate`) against one forward/backward of the batch of 64:

* **the same model**: ``steps`` Adam steps in float64 from one initialization on the same batches, then the
  largest parameter difference, beside how far the parameters moved (dropout off: its masks are drawn per
  forward, so they differ between the two ways of slicing a batch; everything else is as in the study);
* **memory**: the extra peak memory of one training step, each configuration in a fresh process
  (:func:`.bench_memory.measure`), BatchNorm at batch 64 beside it;
* **time**: a float32 training step (dropout on), interleaved medians as in :mod:`.bench_speed`.

Real Fashion-MNIST images when the files are there; otherwise random inputs of the same shape (the claim
does not depend on the data; the result says which).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import batchless as bl

from . import bench_memory, bench_speed, idx
from .models import build_model

BATCH = 64


def study_cnn(norm: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The CNN of the Fashion-MNIST study (28x28 inputs, default width) with ``norm``."""
    return build_model("fashion-mnist", norm).to(dtype)


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` training images in [-1, 1] with labels, and where they came from."""
    try:
        x, y, _, _ = idx.load_arrays("fashion-mnist")
        source = "fashion-mnist"
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].numpy()
        xs, ys = torch.from_numpy(x[order]).float()[:, None] / 127.5 - 1, torch.from_numpy(y[order]).long()
    except FileNotFoundError:
        source = "random"
        g = torch.Generator().manual_seed(seed)
        xs, ys = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)
    return xs, ys, source


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, micro: int) -> None:
    opt.zero_grad()
    bl.accumulate(model, F.cross_entropy, x, y, micro_batch_size=micro)
    opt.step()


def equivalence(steps: int = 10, batch: int = BATCH) -> dict:
    """Largest parameter difference after ``steps`` float64 Adam steps, micro-batch 1 against the batch."""
    torch.manual_seed(0)
    x, y, source = images(batch * steps + 256)
    x = x.double()
    model = study_cnn("batchless", torch.float64)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    bl.init_from_data(model, [x[-256:]])
    start = copy.deepcopy(model)
    twins = {micro: copy.deepcopy(model) for micro in (batch, 1)}
    opts = {micro: torch.optim.Adam(m.parameters(), lr=1e-3) for micro, m in twins.items()}
    for s in range(steps):
        xs, ys = x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
        for micro, m in twins.items():
            _step(m, opts[micro], xs, ys, micro)
    pairs = list(zip(twins[batch].parameters(), twins[1].parameters(), start.parameters(), strict=True))
    return {"steps": steps, "batch": batch, "dtype": "float64", "data": source,
            "max_abs_diff": max((a - b).abs().max().item() for a, b, _ in pairs),
            "max_abs_change": max((a - s).abs().max().item() for a, _, s in pairs)}


def timing(rounds: int, warmup: int) -> dict:
    """Median ms of a float32 training step: micro-batch 1 and the batch of 64, batchless and BatchNorm."""
    torch.manual_seed(0)
    x, y, source = images(BATCH)
    steps = {}
    for name, norm, micro in (("bn", "bn", BATCH), ("batchless", "batchless", BATCH),
                              ("batchless micro-batch 1", "batchless", 1)):
        model = study_cnn(norm).train()
        if norm == "batchless":
            bl.init_from_data(model, [x])  # as a user would (and as equivalence() does)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps[name] = lambda model=model, opt=opt, micro=micro: _step(model, opt, x, y, micro)
    samples = bench_speed.time_interleaved(steps, rounds=rounds, inner=1, warmup=warmup, device=torch.device("cpu"))
    return {"data": source, **bench_speed.summarize(samples, reference="batchless")}


def memory() -> dict:
    """Extra peak memory of one step (MB), each in a fresh process: batchless at micro-batch 1 and 64,
    BatchNorm at 64."""
    rows = {}
    for name, norm, micro in (("bn", "bn", BATCH), ("batchless", "batchless", BATCH),
                              ("batchless micro-batch 1", "batchless", 1)):
        cfg = {"norm": norm, "effective_batch": BATCH, "micro_batch": micro, "model": "study-cnn", "device": "cpu"}
        rows[name] = bench_memory.run_child(cfg)["extra_mb"]
    return rows


def run(*, rounds: int = 21, warmup: int = 3, steps: int = 10, log=print) -> dict:
    same = equivalence(steps)
    log(f"same model: max |difference| {same['max_abs_diff']:.1e} after {steps} float64 steps "
        f"(parameters moved up to {same['max_abs_change']:.1e})")
    mem = memory()
    log(f"memory: {', '.join(f'{k} {v:.1f} MB' for k, v in mem.items())}")
    times = timing(rounds, warmup)
    medians = {k: v["median_ms"] for k, v in times.items() if k != "data"}
    log(f"time: {', '.join(f'{k} {v:.1f} ms' for k, v in medians.items())}")
    return {"benchmark": "microbatch", "machine": bench_speed.machine_info(torch.device("cpu")),
            "equivalence": same, "memory_mb": mem, "time": times,
            "memory_ratio": mem["batchless micro-batch 1"] / mem["batchless"],
            "time_ratio": times["batchless micro-batch 1"]["ratio_to_bn"]}


def markdown_table(result: dict) -> str:
    same, mem, t = result["equivalence"], result["memory_mb"], result["time"]
    rows = ["| training step at effective batch 64 | extra memory (MB) | time (ms, median) |", "|---|---|---|"]
    for name in mem:
        rows.append(f"| {name} | {mem[name]:.1f} | {t[name]['median_ms']:.1f} |")
    rows.append(f"\nmicro-batch 1 / batch 64: memory {result['memory_ratio']:.3f}x, time {result['time_ratio']:.2f}x; "
                f"same model: max |parameter difference| {same['max_abs_diff']:.1e} after {same['steps']} "
                f"float64 Adam steps (parameters moved up to {same['max_abs_change']:.1e}); data: {same['data']}")
    return "\n".join(rows)
