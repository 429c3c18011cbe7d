"""Mark the cells that ran through the weight-standardization probe (ws.py, before the library's
``standardize_weights`` and ``--weight-std`` existed; the same formula, rounded differently) as
``weight_std=True``: their config gains the field and their key becomes the one ``--weight-std`` gives,
so that sweeps with the flag find them. Idempotent. Usage: ``rekey_ws.py STORE...``."""
import json
import sqlite3
import sys

from batchless_experiments.train import Cell, TrainConfig

for path in sys.argv[1:]:
    db = sqlite3.connect(path)
    rows = db.execute("SELECT key, norm, batch_size, seed, config FROM cells").fetchall()
    changed = 0
    for key, norm, batch_size, seed, config in rows:
        fields = {**json.loads(config), "weight_std": True}
        cfg = TrainConfig(**fields)
        new = Cell(cfg, norm, batch_size, seed).key
        if new != key:
            db.execute("UPDATE cells SET key = ?, config = ? WHERE key = ?", (new, cfg.to_json(), key))
            changed += 1
    db.commit()
    db.close()
    print(f"{path}: {changed} of {len(rows)} cells marked weight_std=True")
