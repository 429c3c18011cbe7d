"""Seed a results store for ``sweep --choose-seeds`` with an earlier single-seed study's runs, so they are reused.

    seed_store.py OLD NEW OPTIMIZER LR NORMS BATCH_SIZES [ws]

copies from OLD the runs of NORMS (comma-separated; ``batchless``: the library's default layer) at BATCH_SIZES
(comma-separated), without weight standardization (with it: ``ws``), at the rates of the fair protocol's grid
around LR (x 1/3, 1, 3, scaled with the batch size), into NEW. Runs at rates beyond a grid's end (the
single-seed study's extensions) are left out: a learning-rate choice compares the seeds that every rate of a
cell has, so a rate with seed 0 alone would turn the choice back into seed 0's.
"""

import json
import shutil
import sqlite3
import sys

from batchless_experiments import tuning

DEFAULT = {"std_speed": 0.1, "mean_speed": 0.1, "stats_lr_scale": 1.0, "stats_optimizer": "adam"}


def keep(norm: str, batch_size: int, config: dict, optimizer: str, lr: float, norms: list[str],
         batch_sizes: list[int], ws: bool) -> bool:
    if norm not in norms or batch_size not in batch_sizes:
        return False
    if config["lr"] not in tuning.grid(lr, batch_size, optimizer, [0.333, 1, 3]):
        return False
    return config.get("weight_std", False) == ws and (
        norm != "batchless" or all(config.get(k) == v for k, v in DEFAULT.items()))


def main(old: str, new: str, optimizer: str, lr: str, norms: str, batch_sizes: str, ws: str = "") -> None:
    shutil.copy(old, new)
    with sqlite3.connect(new) as db:
        drop = [(key,) for key, norm, bs, config in db.execute("SELECT key, norm, batch_size, config FROM cells")
                if not keep(norm, bs, json.loads(config), optimizer, float(lr), norms.split(","),
                            [int(b) for b in batch_sizes.split(",")], ws == "ws")]
        db.executemany("DELETE FROM cells WHERE key = ?", drop)
        print(f"{new}: {db.execute('SELECT count(*) FROM cells').fetchone()[0]} runs kept from {old}")


if __name__ == "__main__":
    main(*sys.argv[1:])
