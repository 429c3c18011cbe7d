"""Speed benchmarks: batchless against BatchNorm, GroupNorm, LayerNorm and identity, layer and model level.

Every comparison is measured in one process with the candidates *interleaved*: after a warm-up, each round
times every candidate once (``inner`` calls, the per-call mean is the round's sample), the order reversed
every other round, so that drift, other processes and the allocator's state hit all candidates alike. We
report the median over rounds and, per candidate, the median over rounds of the paired ratio
``time / time of BatchNorm in the same round``.

A training step is ``y = layer(x)`` followed by ``torch.autograd.grad(y, [x, *params], g)``: the gradients
for the input and every parameter (batchless's mu/sigma included, their NLL gradient arrives through the
same backward), without accumulating into ``.grad``. Inference is the eval-mode forward under
``torch.no_grad()``. On CUDA, timings use CUDA events after a synchronize; ``compile=True`` adds
``torch.compile``-d batchless and BatchNorm (``batchless+compile``, ``bn+compile``): whole-layer compilation where
a compiler is available (ratios stay relative to eager BatchNorm); ``other_path=True`` adds batchless on
the kernel paths of :mod:`batchless.fused` it does not take by default on the device (``batchless+eager``
and ``batchless+compiled`` as they apply). The machine record says which path
``batchless`` itself took.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import batchless as bl
from batchless import fused

from . import models

try:
    import resource  # POSIX only: page-fault counts
except ImportError:  # pragma: no cover - Windows
    resource = None

LAYER_SHAPES = {
    "1d": (256, 512),
    "1d-seq": (32, 64, 1024),
    "2d": (32, 64, 32, 32),
    "2d-deep": (32, 256, 8, 8),
    "3d": (8, 32, 8, 32, 32),
}
QUICK_SHAPES = {"1d": (8, 16), "2d": (4, 8, 6, 6), "3d": (2, 8, 3, 4, 4)}
LAYER_NORMS = ("batchless", "bn", "gn", "ln", "identity")
MODEL_NORMS = ("batchless", "bn", "gn", "ln", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REFERENCE = "bn"
TARGET_SAMPLE_MS = 20.0
# Parameters stay float32 whatever the activations' dtype: the mixed-precision setting (bfloat16
# activations, float32 parameters and statistics). A layer converted wholesale with .to(torch.bfloat16)
# is not benchmarked: batchless 0.1.0 fails in training there (bfloat16 weight next to float32 statistics).
PARAM_DTYPE = "float32"


def make_layer(norm: str, shape: tuple[int, ...]) -> nn.Module:
    """The ``norm`` layer for inputs of ``shape`` (N, C, *).

    ``gn`` is GroupNorm with gcd(C, 32) groups; ``ln`` is ``nn.LayerNorm(C)`` for (N, C) inputs and, for
    (N, C, *) inputs, LayerNorm over channels and positions with a per-channel affine (GroupNorm(1, C)),
    as in the experiments' models.
    """
    channels, dims = shape[1], len(shape) - 2
    if norm == "batchless":
        return (bl.BatchlessNorm1d, bl.BatchlessNorm2d, bl.BatchlessNorm3d)[max(dims - 1, 0)](channels)
    if norm == "bn":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[max(dims - 1, 0)](channels)
    if norm == "gn":
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    if norm == "ln":
        return nn.LayerNorm(channels) if dims == 0 else nn.GroupNorm(1, channels)
    if norm in ("identity", "none"):
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(LAYER_NORMS)}; received {norm!r}")


def train_step(module: nn.Module, x: torch.Tensor, loss: Callable | None = None) -> Callable[[], object]:
    """One forward + backward of ``module`` on ``x`` (which must require grad): gradients for x and every
    parameter through ``torch.autograd.grad``. Without ``loss`` the output's gradient is a fixed random
    tensor; with it, ``loss(output)`` is differentiated."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    grad_out = None if loss is not None else torch.randn_like(x)

    def step():
        y = module(x)
        if loss is not None:
            return torch.autograd.grad(loss(y), [x, *params])
        return torch.autograd.grad(y, [x, *params], grad_out)

    return step


def inference_step(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    module.eval()
    x = x.detach()

    def step():
        with torch.no_grad():
            return module(x)

    return step


def _timer(device: torch.device) -> Callable[[Callable, int], float]:
    """A function timing ``inner`` calls of ``fn``, in ms per call (CUDA: events after a synchronize)."""
    if device.type == "cuda":
        def cuda_time(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / inner
        return cuda_time

    def cpu_time(fn, inner):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner
    return cpu_time


def time_interleaved(fns: dict[str, Callable], *, rounds: int, inner: int | None, warmup: int,
                     device: torch.device, faults: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """ms per call of each candidate, one sample per round; candidates interleaved, order alternating.

    ``inner`` calls make one sample; None picks it so that the slowest candidate's sample takes ~20 ms.
    ``faults``, if given, receives each sample's minor page faults per call (the process's, all threads):
    fresh memory that the kernel maps in on first touch, which the allocator's history decides (see
    BENCHMARKS.md) and which can dominate a sample.
    """
    timer = _timer(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if inner is None:  # calibrate: a round of the slowest candidate takes about TARGET_SAMPLE_MS
        slowest = max(timer(fns[name], 1) for name in names)
        inner = max(1, min(1000, round(TARGET_SAMPLE_MS / max(slowest, 1e-3))))
    samples = {name: [] for name in names}
    if resource is None:
        faults = None
    if faults is not None:
        faults.update({name: [] for name in names})
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            samples[name].append(timer(fns[name], inner))
            if faults is not None:
                faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / inner)
    return samples


def summarize(samples: dict[str, list[float]], reference: str = REFERENCE,
              faults: dict[str, list[float]] | None = None) -> dict[str, dict]:
    """Median ms, quartiles, the median paired ratio to ``reference`` (None when it is absent) and, with
    ``faults``, the median page faults per call."""
    ref = samples.get(reference)
    out = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        ratio = statistics.median(t / r for t, r in zip(ts, ref, strict=True)) if ref else None
        out[name] = {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "ratio_to_bn": ratio}
        if faults:  # (empty where time_interleaved could not count them)
            out[name]["page_faults_per_call"] = statistics.median(faults[name])
    return out


class FusedPath(nn.Module):
    """``module`` with its training forwards (and so their backwards) on the path that ``mode`` of
    :func:`batchless.fused.set_fused` selects, whatever the process-wide setting."""

    def __init__(self, module: nn.Module, mode: str):
        super().__init__()
        self.module, self.mode = module, mode

    def forward(self, x):
        previous = fused.set_fused(self.mode)
        try:
            return self.module(x)
        finally:
            fused.set_fused(previous)


def default_path(device: torch.device) -> str:
    """The kernels batchless takes on ``device`` by default: ``"native"``, ``"compiled"`` or ``"eager"``."""
    return fused.path(torch.ones(1, device=device))


# The set_fused modes that give the other paths (native is the CPU default wherever it is built)
_PATH_MODES = {"eager": "never", "compiled": "compiled"}


def _candidates(norms, build: Callable[[str], nn.Module], compile: bool, device: torch.device,
                other_path: bool = False) -> dict:
    modules = {norm: build(norm) for norm in norms}
    if other_path and "batchless" in norms:  # the kernel paths batchless does not take by default here
        default = default_path(device)
        for path, mode in _PATH_MODES.items():
            if path != default:
                modules[f"batchless+{path}"] = FusedPath(build("batchless"), mode)
    if compile:  # the fused path, against BatchNorm compiled alike
        torch._dynamo.reset()  # the previous shapes' compilations would count towards the recompile limit
        modules.update({f"{norm}+compile": torch.compile(build(norm)) for norm in ("batchless", REFERENCE)
                        if norm in norms})
    return modules


def bench_layers(shapes: dict[str, tuple[int, ...]], dtypes: list[str], *, norms=LAYER_NORMS, rounds: int,
                 inner: int | None, warmup: int, device: torch.device, compile: bool = False,
                 other_path: bool = False, log=print) -> list[dict]:
    """Training step and inference of every norm for every shape and dtype; one record per combination.
    ``other_path`` adds batchless on the kernel paths it does not take by default (``batchless+eager``,
    ``batchless+compiled``; see :func:`default_path`)."""
    records = []
    for shape_name, shape in shapes.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            x = torch.randn(shape, device=device, dtype=dtype)
            modules = _candidates(norms, lambda n, s=shape: make_layer(n, s), compile, device, other_path)
            modules = {k: m.to(device) for k, m in modules.items()}  # float32 parameters, see PARAM_DTYPE
            for mode in ("train", "infer"):
                if mode == "train":
                    xg = x.clone().requires_grad_()
                    fns = {k: train_step(m, xg) for k, m in modules.items()}
                else:
                    fns = {k: inference_step(m, x) for k, m in modules.items()}
                faults = {}
                samples = time_interleaved(fns, rounds=rounds, inner=inner, warmup=warmup, device=device,
                                           faults=faults)
                rec = {"shape_name": shape_name, "shape": list(shape), "dtype": dtype_name,
                       "param_dtype": PARAM_DTYPE, "mode": mode,
                       "results": summarize(samples, faults=faults)}
                records.append(rec)
                log(_one_line(rec))
    return records


def resnet(norm: str, widths=(16, 32, 64), blocks: int = 1, num_classes: int = 10) -> nn.Sequential:
    """:func:`models.resnet` (ResNet-8 by default) with the benchmark's layers of ``norm``."""
    return models.resnet(lambda c: make_layer(norm, (1, c, 1, 1)), widths, blocks, num_classes)


def bench_models(batch: int, image: int, *, norms=MODEL_NORMS, widths=(16, 32, 64), blocks: int = 1,
                 rounds: int, inner: int | None, warmup: int, device: torch.device, compile: bool = False,
                 other_path: bool = False, log=print) -> list[dict]:
    """Training step (cross-entropy, gradients for input and parameters) and inference of the ResNet
    (``other_path``: as in :func:`bench_layers`)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image, image, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    modules = _candidates(norms, lambda n: resnet(n, widths, blocks), compile, device, other_path)
    modules = {k: m.to(device) for k, m in modules.items()}
    records = []
    for mode in ("train", "infer"):
        if mode == "train":
            xg = x.clone().requires_grad_()
            fns = {k: train_step(m, xg, lambda y: F.cross_entropy(y, target)) for k, m in modules.items()}
        else:
            fns = {k: inference_step(m, x) for k, m in modules.items()}
        faults = {}
        samples = time_interleaved(fns, rounds=rounds, inner=inner, warmup=warmup, device=device, faults=faults)
        name = f"resnet{2 + 2 * len(widths) * blocks}-{'-'.join(map(str, widths))}"
        rec = {"model": name, "input": [batch, 3, image, image], "dtype": "float32", "mode": mode,
               "results": summarize(samples, faults=faults)}
        records.append(rec)
        log(_one_line(rec))
    return records


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "batchless": bl.__version__, "batchless_path": default_path(device), "source": source_revision(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def source_revision() -> str | None:
    """The git commit of the library's checkout (``+dirty`` when ``src/batchless`` has local changes)."""
    here = os.path.dirname(os.path.abspath(bl.__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _one_line(rec: dict) -> str:
    what = rec.get("shape_name") or rec.get("model")
    parts = [f"{k} {v['median_ms']:.3f}ms" + (f" ({v['ratio_to_bn']:.2f}x)" if v["ratio_to_bn"] else "")
             for k, v in rec["results"].items()]
    return f"{what} {rec['dtype']} {rec['mode']}: " + ", ".join(parts)


FAULTS_MARK = 64  # page faults per call (256 KB of fresh memory) from which a table cell is marked


def markdown_table(records: list[dict]) -> str:
    """One row per (what, dtype, mode): median ms of each candidate and its ratio to BatchNorm; cells whose
    calls page-faulted ``FAULTS_MARK`` times or more (median) are marked, with a note under the table."""
    if not records:
        return ""
    names = list(dict.fromkeys(name for rec in records for name in rec["results"]))
    head = "| benchmark | dtype | step | " + " | ".join(names) + " |"
    rows, marked = [head, "|" + "---|" * (3 + len(names))], False
    for rec in records:
        what = (f"{rec['shape_name']} {tuple(rec['shape'])}" if "shape" in rec
                else f"{rec['model']} {tuple(rec['input'])}")
        cells = []
        for name in names:
            v = rec["results"].get(name)
            if v is None:
                cells.append("")
                continue
            ratio = f" ({v['ratio_to_bn']:.2f}x)" if v["ratio_to_bn"] is not None else ""
            faulted = v.get("page_faults_per_call", 0) >= FAULTS_MARK
            marked = marked or faulted
            cells.append(f"{v['median_ms']:.3f}{ratio}" + " \\*" * faulted)
        rows.append(f"| {what} | {rec['dtype']} | {rec['mode']} | " + " | ".join(cells) + " |")
    if marked:
        rows.append(f"\n\\* {FAULTS_MARK} or more page faults per call (median): the time includes mapping in "
                    "fresh memory.")
    return "\n".join(rows)
