"""Memory benchmark: peak training memory against the micro-batch size, at a fixed effective batch.

A conv net on square images is trained for one step (zero_grad, forward/backward over the micro-batches,
Adam step) with batchless at micro-batches 1, 2, 4, ..., N and with BatchNorm at the full batch N. Each
configuration runs in a fresh process (``python -m batchless_experiments.bench_memory '<json>'``), after a
warm-up step that creates the optimizer state and initializes the kernels, so that configurations cannot
share freed memory:

* CPU: the increase of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` just
  before the step) over the resident set before it. The child runs with a fixed glibc mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor goes back to the system and the resident set follows
  live tensors, as the CUDA allocator's counters do; tracemalloc would not see tensor memory at all.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
  before the step.

The "extra" memory is what the training step adds to a process that already holds the parameters, the
optimizer state and the data: the gradients, the activations and the temporaries. The floor beside it is
the model state itself (parameters + gradients + Adam's two moments) computed from the parameter count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import batchless as bl

from .bench_speed import machine_info, make_layer
from .models import build_model

MMAP_THRESHOLD = 65536
ADAM_STATES = 2  # exp_avg, exp_avg_sq


@dataclasses.dataclass
class MemoryConfig:
    effective_batches: list[int] = dataclasses.field(default_factory=lambda: [128, 256])
    image: int = 64
    width: int = 32

    @classmethod
    def quick(cls) -> MemoryConfig:
        return cls(effective_batches=[2], image=8, width=4)

    def configurations(self) -> list[dict]:
        """BatchNorm at each full batch, batchless at every power-of-two micro-batch up to it."""
        out = []
        for n in self.effective_batches:
            out.append({"norm": "bn", "effective_batch": n, "micro_batch": n})
            m = 1
            while m <= n:
                out.append({"norm": "batchless", "effective_batch": n, "micro_batch": m})
                m *= 2
            if m // 2 != n:
                out.append({"norm": "batchless", "effective_batch": n, "micro_batch": n})
        return [{**c, "image": self.image, "width": self.width} for c in out]


def conv_net(norm: str, width: int = 32, num_classes: int = 10) -> nn.Sequential:
    """Five 3x3 convs (width, width, 2*width stride 2, 2*width, 4*width stride 2), each followed by the
    norm and a ReLU, global average pooling and a linear classifier."""
    plan = [(3, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
            (2 * width, 4 * width, 2)]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in plan:
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), make_layer(norm, (1, c_out, 1, 1)), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def state_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters, gradients and Adam state: the floor of any training step."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "grads": params, "optimizer": ADAM_STATES * params,
            "floor": (2 + ADAM_STATES) * params}


def _accumulate_path() -> str:
    return "batchless.accumulate" if hasattr(bl, "accumulate") else "loop with batchless.nll_weight"


def train_step(model, optimizer, x, target, micro_batch: int) -> None:
    """One optimizer step on (x, target) in micro-batches of ``micro_batch`` (the full-batch loss mean)."""
    optimizer.zero_grad()
    if hasattr(bl, "accumulate"):
        bl.accumulate(model, F.cross_entropy, x, target, micro_batch_size=micro_batch)
    else:
        n = len(x)
        for xs, ts in zip(x.split(micro_batch), target.split(micro_batch), strict=True):
            with bl.nll_weight(len(xs) / n):
                (F.cross_entropy(model(xs), ts) * (len(xs) / n)).backward()
    optimizer.step()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in /proc/self/status")


def measure(cfg: dict) -> dict:
    """Run one configuration in this process and return its memory numbers (MB = 2**20 bytes)."""
    device = torch.device(cfg.get("device", "cpu"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, m = cfg["effective_batch"], cfg["micro_batch"]
    if cfg.get("model") == "study-cnn":  # the Fashion-MNIST study's CNN (bench microbatch)
        model, shape = build_model("fashion-mnist", cfg["norm"]), (1, 28, 28)
    else:
        model, shape = conv_net(cfg["norm"], cfg["width"]), (3, cfg["image"], cfg["image"])
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(n, *shape, device=device)
    target = torch.randint(0, 10, (n,), device=device)
    train_step(model, optimizer, x[:m], target[:m], m)  # warm-up: optimizer state, kernels, autograd
    optimizer.zero_grad()
    mb = 2.0**20
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, optimizer, x, target, m)
        torch.cuda.synchronize(device)
        extra, before_mb = (torch.cuda.max_memory_allocated(device) - before) / mb, before / mb
        method = "torch.cuda.max_memory_allocated"
    else:
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        train_step(model, optimizer, x, target, m)
        extra, before_mb = (_status_kb("VmHWM") - before) / 1024, before / 1024
        method = "VmHWM increase (fresh process)"
    state = {k: v / mb for k, v in state_bytes(model).items()}
    return {**cfg, "extra_mb": extra, "resident_before_mb": before_mb, "state_mb": state, "method": method,
            "step": _accumulate_path()}


def run_child(cfg: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(cfg)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed for {cfg}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(config: MemoryConfig, *, device: torch.device, log=print) -> dict:
    rows = []
    for cfg in config.configurations():
        row = run_child({**cfg, "device": str(device)})
        log(f"{row['norm']} N={row['effective_batch']} m={row['micro_batch']}: extra {row['extra_mb']:.1f} MB")
        rows.append(row)
    summary = {}
    for n in config.effective_batches:
        bn = next(r["extra_mb"] for r in rows if r["norm"] == "bn" and r["effective_batch"] == n)
        one = next(r["extra_mb"] for r in rows if r["norm"] == "batchless" and r["effective_batch"] == n
                   and r["micro_batch"] == 1)
        summary[str(n)] = {"bn_extra_mb": bn, "batchless_m1_extra_mb": one, "ratio_m1_to_bn": _ratio(one, bn)}
    return {"benchmark": "memory", "machine": machine_info(device), "config": dataclasses.asdict(config),
            "rows": rows, "summary": summary, "floor_mb": rows[0]["state_mb"]}


def _ratio(extra_mb: float, bn_extra_mb: float) -> float | None:
    """``extra_mb / bn_extra_mb``; None where BatchNorm's step added no resident page (at --quick's sizes the
    step's growth, tens of KB, can fit in memory the allocator already holds)."""
    return extra_mb / bn_extra_mb if bn_extra_mb > 0 else None


def markdown_table(result: dict) -> str:
    rows = ["| norm | effective batch | micro-batch | extra MB | ratio to BatchNorm |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = _ratio(r["extra_mb"], result["summary"][str(r["effective_batch"])]["bn_extra_mb"])
        name = "BatchNorm" if r["norm"] == "bn" else "batchless"
        rows.append(f"| {name} | {r['effective_batch']} | {r['micro_batch']} | {r['extra_mb']:.1f} | "
                    + ("—" if ratio is None else f"{ratio:.3f}") + " |")
    f = result["floor_mb"]
    rows.append(f"\nModel state floor: parameters {f['params']:.2f} MB + gradients {f['grads']:.2f} MB + "
                f"Adam state {f['optimizer']:.2f} MB = {f['floor']:.2f} MB")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, n in enumerate(result["config"]["effective_batches"]):
        color = f"C{i}"
        pts = sorted((r["micro_batch"], r["extra_mb"]) for r in result["rows"]
                     if r["norm"] == "batchless" and r["effective_batch"] == n)
        ax.plot(*zip(*pts, strict=True), "o-", color=color, label=f"batchless, effective batch {n}")
        ax.axhline(result["summary"][str(n)]["bn_extra_mb"], color=color, ls="--",
                   label=f"BatchNorm at batch {n}")
    ax.axhline(result["floor_mb"]["grads"], color="grey", ls=":", label="gradients alone")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("micro-batch size")
    ax.set_ylabel("extra memory of a training step (MB)")
    ax.set_title(f"Peak training memory, conv net on {result['config']['image']}px inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
