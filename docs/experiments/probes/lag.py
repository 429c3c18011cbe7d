"""Probe: how far do the learned statistics lag behind the batch statistics during training?"""
import sys

import torch

import batchless as bl
from batchless_experiments import data
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, train_cell

torch.set_num_threads(1)
bs, lr, epochs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
log = {}
step = [0]
orig = T.build_model
def build(*a, **k):
    m = orig(*a, **k)
    for name, layer in m.named_modules():
        if isinstance(layer, bl.BatchlessNorm2d) or isinstance(layer, bl.BatchlessNorm1d):
            def hook(mod, inp, out, name=name):
                if not mod.training:
                    return
                x = inp[0].detach()
                dims = [0] + list(range(2, x.dim()))
                mb, sb = x.mean(dims), x.std(dims) if x.numel() // x.shape[1] > 1 else None
                with torch.no_grad():
                    s = mod.std
                    dm = ((mb - mod.mean) / s).abs().median().item()
                    ds = (sb.log() - s.log()).median().item() if sb is not None else float("nan")
                log.setdefault(name, []).append((dm, ds))
            layer.register_forward_hook(hook)
    return m
T.build_model = build
splits = data.load("fashion-mnist", num_samples=12000)
cfg = TrainConfig(dataset="fashion-mnist", epochs=epochs, lr=lr, num_samples=12000, schedule="cosine",
                  stats_lr_scale=scale)
r = train_cell(Cell(cfg, "batchless", bs, 0), splits, progress=False)
print(f"bs={bs} lr={lr} scale={scale} test={r.test_acc:.4f}", {h.epoch: h.test_acc for h in r.history if h.test_acc})
n = len(next(iter(log.values())))
for name, v in log.items():
    pts = [0, 10, 50, 100, 200, 500, 1000, 2000, n - 1]
    print(f"{name:12s}", " ".join(f"{p}:{v[p][0]:.2f}/{v[p][1]:+.2f}" for p in pts if p < n))
