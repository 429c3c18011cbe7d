"""Probe: statistics fast early, slow after (issue 17's "Statistics dynamics": a warm-up of their speed). The
default layer's statistics learn 10x slower than the other parameters; `drift.py ... resnet` shows the ResNet's
inputs outgrowing them in the first 30 steps (with WS the last block's by 12x), when the slow statistics can
move their log by about 0.02. This multiplies the statistics' learning rate by 1 + (K - 1) (1 - t / N) over the
first N steps (then by 1; on top of the cosine decay), so they start K times as fast and slow down to the default.
The layer, the NLL and the forward are unchanged; only the optimizer's group of the statistics is scheduled.

Usage: statswarm.py BS LR SEED K N [ws] [resnet]. MNIST-1D (final_fit.run, 20 epochs) unless ``resnet``: the
Fashion-MNIST ResNet-8 of the fair protocol (12,000 images, 10 epochs). Prints one JSON record (test accuracy
at 25/50/75/100 % of the run)."""
import json
import sys

import torch
from final_fit import run

from batchless_experiments import data
from batchless_experiments import train as T

torch.set_num_threads(1)
bs, lr, seed, k, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
flags = set(sys.argv[6:])


_schedulers = T._schedulers  # the original: schedulers() below replaces it in train


def schedulers(opts, cfg, steps):
    """train._schedulers' cosine on every group; the statistics' group (the main optimizer's second) also
    boosted K-fold at the start, linearly back to 1 by step N."""
    ((main,), (cosine_scheduler,)) = opts, _schedulers(opts, cfg, steps)
    cosine = cosine_scheduler.lr_lambdas[0]
    assert len(main.param_groups) == 2, "the statistics in the main optimizer's second group"

    def boosted(t):
        return cosine(t) * (1.0 + (k - 1.0) * max(0.0, 1.0 - t / n))

    return [torch.optim.lr_scheduler.LambdaLR(main, [cosine, boosted])]


T._schedulers = schedulers
if "resnet" in flags:
    splits = data.load("fashion-mnist", num_samples=12000)
    cfg = T.TrainConfig(dataset="fashion-mnist", num_samples=12000, model="resnet", epochs=10, lr=lr,
                        schedule="cosine", weight_std="ws" in flags, std_speed=0.1, mean_speed=0.1)
    r = T.train_cell(T.Cell(cfg, "batchless", bs, seed), splits, progress=False)
    out = {"test": r.test_acc, "curve": [h.test_acc for h in r.history if h.test_acc is not None]}
else:
    out = run(data.load("mnist1d"), "default", bs, lr, seed, ws="ws" in flags)
print(json.dumps({"probe": "statswarm", "bs": bs, "lr": lr, "seed": seed, "K": k, "N": n,
                  "flags": sorted(flags), **out}))
