"""Probe (research code): how many of the fair protocol's learning-rate choices are near-ties.

For every store in results/ (or those named), groups the seed-0 cells by (norm, batch size, configuration
without the rate) and compares the protocol's rule (the best validation accuracy after the last epoch) with the
mean of the last 3 epochs; prints each group where the two disagree and the count. Example:
    .venv/bin/python docs/experiments/probes/lr_choice.py
"""
import collections
import glob
import json
import sqlite3
import sys

stores = sys.argv[1:] or sorted(glob.glob("results/*.sqlite"))
changed = total = 0
for path in stores:
    groups = collections.defaultdict(dict)
    con = sqlite3.connect(path)
    for norm, bs, cfg, hist in con.execute("SELECT norm, batch_size, config, history FROM cells WHERE seed = 0"):
        cfg = json.loads(cfg)
        lr = cfg.pop("lr")
        val = [e["val_acc"] for e in json.loads(hist)]
        groups[(norm, bs, json.dumps(cfg, sort_keys=True))][lr] = (val[-1], sum(val[-3:]) / len(val[-3:]))
    for (norm, bs, _), runs in groups.items():
        if len(runs) < 2:
            continue
        total += 1
        last = max(sorted(runs), key=lambda lr: runs[lr][0])  # ties to the smaller rate, as the protocol
        mean3 = max(sorted(runs), key=lambda lr: runs[lr][1])
        if last != mean3:
            changed += 1
            rates = ", ".join(f"{lr:.3g}: {v[0]:.4f}/{v[1]:.4f}" for lr, v in sorted(runs.items()))
            print(f"{path} {norm} bs {bs}: last epoch {last:.3g}, mean of 3 {mean3:.3g} ({rates})")
print(f"{changed} of {total} choices differ")
