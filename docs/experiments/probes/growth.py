"""Probe: statistics lag and activation growth, for a config given as JSON overrides of TrainConfig."""
import json
import sys

import torch

from batchless_experiments import data
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, train_cell

torch.set_num_threads(1)
norm, bs = sys.argv[1], int(sys.argv[2])
over = json.loads(sys.argv[3])
log = {}
orig = T.build_model
def build(*a, **k):
    m = orig(*a, **k)
    for name, layer in m.named_modules():
        if type(layer).__name__.endswith(("Norm1d", "Norm2d")) and name not in ("0",):
            def hook(mod, inp, out, name=name):
                if not mod.training:
                    return
                x = inp[0].detach()
                dims = [0] + list(range(2, x.dim()))
                sb = x.std(dims).median().item()
                ys = out.detach().std(dims).median().item()
                log.setdefault(name, []).append((sb, ys))
            layer.register_forward_hook(hook)
    return m
T.build_model = build
splits = data.load("fashion-mnist", num_samples=12000)
cfg = TrainConfig(**{"dataset": "fashion-mnist", "num_samples": 12000, "schedule": "cosine", "epochs": 8, "lr": 3e-3,
                     **over})
r = train_cell(Cell(cfg, norm, bs, 0), splits, progress=False)
print(f"{norm} bs={bs} {over} test={r.test_acc:.4f}", {h.epoch: h.test_acc for h in r.history if h.test_acc})
n = len(next(iter(log.values())))
for name, v in log.items():
    pts = [0, 10, 50, 100, 200, 500, 1000, n - 1]
    print(f"  {name:6s} input std / output std:", " ".join(f"{p}:{v[p][0]:.2f}/{v[p][1]:.2f}" for p in pts if p < n))
