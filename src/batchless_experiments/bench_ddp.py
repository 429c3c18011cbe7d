"""``batchless bench ddp``: step time of batchless + DDP against SyncBatchNorm + DDP on CPU processes.

``nproc`` processes on this machine (gloo, 127.0.0.1) train the small ResNet of :mod:`.bench_speed`, one
replica each, wrapped in ``DistributedDataParallel``; a step is ``zero_grad``, forward and backward of the
rank's batch, and an SGD step. Candidates are timed interleaved in the same processes (every rank runs the
same fixed sequence of steps, the order alternating per round, see :func:`.bench_speed.time_interleaved`);
rank 0 reports medians over rounds and the median of the paired per-round ratios to SyncBatchNorm.

``nn.SyncBatchNorm`` refuses CPU tensors (``SyncBatchNorm expected input tensor to be on GPU ...``) and its
kernels (``torch.batch_norm_stats`` ...) have no CPU implementation, so the ``syncbn`` candidate here is
:class:`CPUSyncBatchNorm`, a stand-in with the collectives of ``nn.SyncBatchNorm``'s gloo path: per layer
and training forward one ``all_gather`` of the per-channel statistics, per backward one ``all_reduce`` of
two per-channel gradient sums. Its arithmetic is plain tensor ops rather than fused kernels, so ``bn``
(``nn.BatchNorm2d``, per-process statistics) is reported beside it. Each candidate's collectives per step are
counted with the profiler (``c10d::*`` ops) and written to the JSON.

Run: ``batchless bench ddp`` or ``python -m batchless_experiments.bench_ddp`` (``--quick``: a smoke test
whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from .bench_speed import machine_info, resnet, time_interleaved
from .options import make_parent, output_file, positive_int

NORMS = ("batchless", "syncbn", "bn")
REFERENCE = "syncbn"


class _SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the union of every rank's batch, with ``nn.SyncBatchNorm``'s collectives (gloo path).

    Forward: one ``all_gather`` of (sum, sum of squares, count) per channel; backward: one ``all_reduce`` of
    (sum dy, sum dy * (x - mean)) per channel. ``weight``/``bias`` gradients stay local (DDP averages them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() // channels)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group)
        total = torch.stack(gathered).sum(0)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0.0)
        if running_mean is not None:
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * count / (count - 1).clamp_min(1.0), momentum)
        ctx.save_for_backward(x, weight, mean, (var + eps).rsqrt(), count)
        ctx.group = group
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        xmu = x - mean.view(shape)
        local = torch.cat([gy.sum(dims), (gy * xmu).sum(dims)])
        gw = gb = None
        if weight is not None:
            gw, gb = local[mean.numel():] * invstd, local[:mean.numel()].clone()
        dist.all_reduce(local, group=ctx.group)
        mean_dy, mean_dy_xmu = (local / count).view(2, *shape)
        scale = invstd if weight is None else invstd * weight
        gx = (gy - mean_dy - xmu * (invstd * invstd).view(shape) * mean_dy_xmu) * scale.view(shape)
        return gx, gw, gb, None, None, None, None, None


class CPUSyncBatchNorm(_BatchNorm):
    """A stand-in for ``nn.SyncBatchNorm`` that runs on CPU (gloo), for counting and timing only.

    Statistics over all ranks' batches in training, with the same per-layer collectives as
    ``nn.SyncBatchNorm`` on gloo; outside training, or without an initialized process group, it is
    ``nn.BatchNorm``. Build it with :func:`cpu_sync_batchnorm`.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            self.eps, self.momentum, dist.group.WORLD)


def cpu_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` of ``model`` (in place, state kept) with :class:`CPUSyncBatchNorm`."""
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, CPUSyncBatchNorm):
            like = next(t for t in (*child.parameters(), *child.buffers(), torch.empty(0)) if t.is_floating_point())
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=like.device, dtype=like.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            cpu_sync_batchnorm(child)
    return model


def count_collectives(step: Callable[[], object], steps: int = 2) -> dict[str, float]:
    """Collectives per call of ``step`` (every ``c10d::`` op the profiler records, averaged over ``steps``).

    Sees those issued from Python (``dist.all_reduce``, ``dist.all_gather``, ...) and from C++ (DDP's
    gradient buckets and buffer broadcasts, FSDP's all-gathers and reduce-scatters). Run a few steps before:
    DDP broadcasts its rebuilt bucket order once, in the second iteration.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    counts = collections.Counter(e.name for e in prof.events() if e.name.startswith("c10d::"))
    return {name: n / steps for name, n in sorted(counts.items())}


def build(norm: str, widths: tuple[int, ...]) -> nn.Module:
    """The ResNet with ``norm`` in {batchless, syncbn, bn} (syncbn: :class:`CPUSyncBatchNorm`)."""
    if norm == "syncbn":
        return cpu_sync_batchnorm(resnet("bn", widths))
    return resnet(norm, widths)


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"])
        y = torch.randint(0, 10, (cfg["batch"],))
        steps = {}
        for norm in NORMS:
            torch.manual_seed(0)
            model = DDP(build(norm, tuple(cfg["widths"])))
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            steps[norm] = _train_step(model, opt, x, y)
        collectives = {}
        for norm, step in steps.items():
            for _ in range(2):  # DDP rebuilds its buckets (one broadcast) in the second iteration
                step()
            collectives[norm] = count_collectives(step)
        samples = time_interleaved(steps, rounds=cfg["rounds"], inner=cfg["inner"], warmup=cfg["warmup"],
                                   device=torch.device("cpu"))
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"samples": samples, "collectives": collectives}, f)
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's teardown, in which a leftover C++ thread (profiler
    # or gloo) has now and then aborted the worker ("terminate called without an active exception").
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _train_step(model, opt, x, y) -> Callable[[], None]:
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: dict, *, nproc: int = 2, timeout: float = 600.0) -> dict:
    """Spawn ``nproc`` worker processes, wait at most ``timeout`` s (then kill them), return the results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        ctx = mp.start_processes(_worker, args=(nproc, free_port(), cfg, out), nprocs=nproc, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench ddp: workers still running after {timeout:.0f} s; killed")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(out) as f:
            raw = json.load(f)
    samples = raw["samples"]
    results = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=4)
        ratio = statistics.median(t / r for t, r in zip(ts, samples[REFERENCE], strict=True))
        results[name] = {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "ratio_to_syncbn": ratio,
                         "collectives_per_step": raw["collectives"][name]}
    return {"benchmark": "ddp", "nproc": nproc, "config": cfg, "machine": machine_info(torch.device("cpu")),
            "results": results}


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"ResNet {'-'.join(map(str, cfg['widths']))}, {result['nproc']} CPU processes (gloo), "
             f"{cfg['threads']} thread(s) each, per-rank batch {cfg['batch']}x3x{cfg['image']}x{cfg['image']}, "
             f"{cfg['rounds']} rounds x {cfg['inner']} steps",
             "",
             "| norm + DDP | median ms/step | q1-q3 | ratio to syncbn | collectives per step |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result["results"].items():
        coll = ", ".join(f"{k.removeprefix('c10d::')} {v:g}" for k, v in r["collectives_per_step"].items())
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
                     f"{r['ratio_to_syncbn']:.3f} | {coll} |")
    return "\n".join(lines)


def main_args(args: argparse.Namespace) -> int:
    make_parent(args.out)
    if args.quick:
        cfg = {"batch": 2, "image": 8, "widths": [4, 8, 8], "rounds": 3, "inner": 1, "warmup": 1}
    else:
        cfg = {"batch": args.batch, "image": args.image, "widths": [16, 32, 64], "rounds": args.rounds,
               "inner": args.inner, "warmup": args.warmup}
    cfg["threads"] = args.threads
    if not args.silent:
        print(f"bench ddp: {args.nproc} processes, {cfg}", file=sys.stderr, flush=True)
    result = run(cfg, nproc=args.nproc, timeout=args.timeout)
    result["command"] = " ".join(sys.argv)
    print(markdown_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json: {args.out}", file=sys.stderr)
    return 0


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--nproc", type=positive_int, default=2, help="processes (default 2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--batch", type=positive_int, default=32, help="per-process batch (default 32)")
    p.add_argument("--image", type=positive_int, default=32, help="image side (default 32)")
    p.add_argument("--rounds", type=positive_int, default=21, help="timed rounds (default 21)")
    p.add_argument("--inner", type=positive_int, default=3, help="steps per timed sample (default 3)")
    p.add_argument("--warmup", type=positive_int, default=3, help="warm-up rounds (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="kill the workers after this many s (default 600)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test mode (numbers meaningless)")
    p.add_argument("--out", type=output_file, default=None, help="write the results as JSON here")
    p.add_argument("--silent", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=main_args)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ddp`` to the ``batchless bench`` subcommands."""
    return _arguments(subparsers.add_parser(
        "ddp", help="DDP step time on CPU processes: batchless vs SyncBatchNorm (CPU stand-in) vs BatchNorm",
        description=__doc__.split("\n\n")[1]))


if __name__ == "__main__":
    sys.exit(main_args(_arguments(argparse.ArgumentParser(prog="python -m batchless_experiments.bench_ddp",
                                                          description=__doc__.split("\n\n")[1])).parse_args()))
