"""Probe: with weight standardization, what still moves the batchless layers' inputs away from their learned
statistics? Traces, per layer, the median over channels of log(batch std / learned std) of the layer's input,
the RMS of the layer's affine weight (gamma) and of its output, at a few steps of one fair-protocol run
(MNIST-1D, Adam, cosine, seed 0), the library's default layer with and without WS, or BatchNorm (``norm=bn``);
with ``adamw``, under AdamW (weight decay 0.05 on every parameter but the statistics, the layers' weight and bias
decayed as before ``decay_affine``, or with ``exempt`` not: the library's default since).

Usage: drift.py BS LR EPOCHS [ws] [norm=bn] [adamw [exempt]]. Prints one JSON record (test accuracy at
25/50/75/100 % of the run, the traces)."""
import json
import sys

import torch

import batchless as bl
from batchless_experiments import data
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, train_cell

torch.set_num_threads(1)
bs, lr, epochs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
flags = set(sys.argv[4:])
opts = dict(f.split("=") for f in flags if "=" in f)
norm = opts.get("norm", "batchless")
trace: dict[str, list] = {}
LAYERS = (bl.BatchlessNorm1d, bl.BatchlessNorm2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


orig = T.build_model


def build(*a, **k):
    m = orig(*a, **k)
    for name, layer in m.named_modules():
        if not isinstance(layer, LAYERS):
            continue
        def hook(mod, inp, out, name=name):
            if not mod.training:
                return
            x = inp[0].detach()
            dims = [0] + list(range(2, x.dim()))
            with torch.no_grad():
                std = mod.std if hasattr(mod, "std") else torch.ones(x.shape[1])
                lag = (x.std(dims).log() - std.log()).median().item()
                gamma = mod.weight.pow(2).mean().sqrt().item()
                xs = out.detach().pow(2).mean().sqrt().item()
            trace.setdefault(name, []).append((round(lag, 3), round(gamma, 3), round(xs, 3)))
        layer.register_forward_hook(hook)
    return m


T.build_model = build
task = ({"dataset": "fashion-mnist", "num_samples": 12000, "model": "resnet"} if "resnet" in flags
        else {"dataset": "mnist1d"})
splits = data.load(task["dataset"], num_samples=task.get("num_samples"))
decay = {"optimizer": "adamw", "weight_decay": 0.05, "decay_affine": "exempt" not in flags} if "adamw" in flags else {}
speeds = {"std_speed": float(opts.get("std", 0.1)), "mean_speed": float(opts.get("mean", 0.1))}
cfg = TrainConfig(**task, epochs=epochs, lr=lr, schedule="cosine", weight_std="ws" in flags,
                  **(speeds if norm == "batchless" else {}), **decay)
r = train_cell(Cell(cfg, norm, bs, 0), splits, progress=False)
n = len(next(iter(trace.values())))
pts = [p for p in (0, 10, 30, 100, 300, n // 4, n // 2, n - 1) if p < n]
print(json.dumps({"bs": bs, "lr": lr, "epochs": epochs, "flags": sorted(flags), "test": r.test_acc,
                  "curve": [h.test_acc for h in r.history if h.test_acc is not None],
                  "steps": pts,
                  "trace (lag, gamma rms, output rms)": {k: [v[p] for p in pts] for k, v in trace.items()}}))
