"""Probe: why does AdamW's weight decay cost the library's default 1-2 points on MNIST-1D at batch 2 (96.6 at lr
1.6e-3, 95.2 at 4.8e-3, against Adam's 97.3 and 97.6 at the same rates), when it helps GroupNorm and LayerNorm and
leaves no normalization level? The candidate: decoupled decay shrinks the weights and bias of the layer feeding
each batchless layer by 1 - lr x wd a step, so its input shrinks too, and the learned std (10x slow) trails it,
where BatchNorm's and GroupNorm's statistics follow at once. Variants, one thing each (AdamW, weight decay 0.05
on every parameter as in the fair protocol, the library cancelling it on the statistics):

- ``plain``: as the fair protocol runs it (reproduces the store's record).
- ``nofeed``: no decay on the weight and bias of the conv / linear layers that feed a batchless layer.
- ``noaffine``: no decay on the batchless layers' own weight and bias.
- ``comove``: decay as in ``plain``, and after every step each batchless layer's mean and std are multiplied by
  the factor its feeding layer's weight and bias were (1 - lr x wd), so that the decay leaves the normalized
  output unchanged, as it does under BatchNorm.
- ``both``: ``noaffine`` and ``comove`` together (the library's default since, with its feeding layers' decay
  made invisible too).

``nofeed``, ``noaffine`` and ``plain`` also run for another norm (NORM: gn, ln or bn; the pairs are then its
layers and their feeding layers), as a control.

Usage: decay.py BS LR SEED VARIANT [NORM]. Prints one JSON record (test accuracy at 25/50/75/100 % of the run, the final
model's eval-mode loss and accuracy on the training, validation and test sets)."""
import json
import sys

import torch
from final_fit import run
from torch.optim.optimizer import register_optimizer_step_post_hook

import batchless as bl
from batchless_experiments import data
from batchless_experiments import train as T

torch.set_num_threads(1)
bs, lr, seed, variant = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
norm_name = sys.argv[5] if len(sys.argv) > 5 else "default"
if variant not in ("plain", "nofeed", "noaffine", "comove", "both") or norm_name not in ("default", "gn", "ln", "bn"):
    raise SystemExit(f"unknown variant {variant!r} or norm {norm_name!r}")
if variant in ("comove", "both") and norm_name != "default":
    raise SystemExit("comove moves batchless statistics: norm 'default' only")
NORM_TYPES = (bl.BatchlessNorm1d, torch.nn.GroupNorm, torch.nn.BatchNorm1d)
WD = 0.05
pairs: list = []  # (feeding layer, batchless layer)
no_decay: set = set()


def prepare(model):
    for block in model.modules():
        if isinstance(block, torch.nn.Sequential):
            kids = list(block.children())
            pairs.extend((a, b) for a, b in zip(kids, kids[1:], strict=False) if isinstance(b, NORM_TYPES))
    assert len(pairs) == 5, pairs  # 3 convs and 2 dense layers (the input's layer has no feeding layer)
    for feed, norm in pairs:
        group = [feed.weight, feed.bias] if variant == "nofeed" else (
            [norm.weight, norm.bias] if variant in ("noaffine", "both") else [])
        no_decay.update(id(p) for p in group)


build_optimizers = T._optimizers


def optimizers(model, cfg):
    """The protocol's optimizers, with the parameters in ``no_decay`` moved to groups of weight decay 0."""
    opts = build_optimizers(model, cfg)
    if not no_decay:
        return opts
    groups = []
    for g in opts[0].param_groups:
        options = {k: v for k, v in g.items() if k != "params"}
        groups.append(dict(options, params=[p for p in g["params"] if id(p) not in no_decay]))
        groups.append(dict(options, params=[p for p in g["params"] if id(p) in no_decay], weight_decay=0.0))
    return [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                              fused=True)] + opts[1:]


def comove(optimizer, args, kwargs):
    """After a step: each batchless layer's statistics scaled by its feeding layer's decay factor."""
    group = next(g for g in optimizer.param_groups if any(p is pairs[0][0].weight for p in g["params"]))
    factor = 1.0 - group["lr"] * group["weight_decay"]
    with torch.no_grad():
        for _, norm in pairs:
            norm.set_mean(norm.mean * factor)
            norm.set_std(norm.std * factor)


T._optimizers = optimizers
if variant in ("comove", "both"):
    register_optimizer_step_post_hook(comove)
splits = data.load("mnist1d")
record = run(splits, norm_name, bs, lr, seed, prepare=prepare, optimizer="adamw", weight_decay=WD)
print(json.dumps({"probe": "decay", "variant": variant, "norm": norm_name, "bs": bs, "lr": lr, "seed": seed,
                  **record}))
