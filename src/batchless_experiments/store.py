"""The results store: one SQLite file, one row per finished cell.

A cell is written in a single transaction when it finishes (an insert that does nothing if the cell's key is
there), so a process killed at any moment loses at most the running cell, never leaves a half-written row and
never duplicates one; SQLite's journal makes the write atomic. WAL mode lets ``report`` read (read-only) while
a sweep writes, and lets several sweeps share one file. A diverged run's NaN results are kept as such
(SQLite would turn a NaN into NULL: they are stored as the text ``'nan'``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from urllib.parse import quote

from .options import make_parent
from .train import Cell, CellResult, TrainConfig

DEFAULT_CONFIG = dataclasses.asdict(TrainConfig())
SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    norm TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    test_acc REAL NOT NULL,
    test_loss REAL NOT NULL,
    val_acc_best REAL NOT NULL,
    val_acc_best_epoch INTEGER NOT NULL,
    val_loss_best REAL NOT NULL,
    test_acc_at_best_val REAL NOT NULL,
    wall_s REAL NOT NULL,
    act_mem_mb REAL NOT NULL,
    max_rss_mb REAL NOT NULL,
    history TEXT NOT NULL,
    finished_at REAL NOT NULL
)
"""

COLUMNS = ("dataset", "norm", "batch_size", "seed", "config", "test_acc", "test_loss", "val_acc_best",
           "val_acc_best_epoch", "val_loss_best", "test_acc_at_best_val", "wall_s", "act_mem_mb", "max_rss_mb",
           "history", "finished_at")


REALS = ("test_acc", "test_loss", "val_acc_best", "val_loss_best", "test_acc_at_best_val", "wall_s", "act_mem_mb",
         "max_rss_mb")


class ResultStore:
    """SQLite-backed store of finished cells (use as a context manager or call :meth:`close`).

    ``readonly`` opens an existing store without changing it (``report``); otherwise the file and its folder
    are created if missing. A file that is not a results store raises ``ValueError`` saying so."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no results file at {path}")
                self.db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=60.0,
                                          isolation_level=None)
                tables = self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                if ("cells",) not in tables:
                    self.db.close()
                    raise ValueError(f"{path} holds no batchless results (an SQLite file without a 'cells' table)")
            else:
                make_parent(path)
                self.db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path} is not a usable results store (SQLite: {e}); pass another --results "
                             "file") from None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def has(self, cell: Cell) -> bool:
        return self.db.execute("SELECT 1 FROM cells WHERE key = ?", (cell.key,)).fetchone() is not None

    def add(self, cell: Cell, result: CellResult) -> bool:
        """Write a finished cell in one transaction; returns False if it was already there."""
        history = json.dumps([dataclasses.asdict(e) for e in result.history])
        row = (cell.key, cell.config.dataset, cell.norm, cell.batch_size, cell.seed, cell.config.to_json(),
               result.test_acc, result.test_loss, result.val_acc_best, result.val_acc_best_epoch,
               result.val_loss_best, result.test_acc_at_best_val, result.wall_s, result.act_mem_mb,
               result.max_rss_mb, history, time.time())
        row = tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)
        with self.db:  # BEGIN ... COMMIT (ROLLBACK on error)
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(f"INSERT INTO cells (key, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * 17)}) "
                                  "ON CONFLICT (key) DO NOTHING", row)
        return cur.rowcount == 1

    def rows(self) -> Iterator[dict]:
        """Every finished cell as a dict (``config`` and ``history`` decoded), in insertion order."""
        yield from self._decode(self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM cells ORDER BY rowid"))

    def get(self, cell: Cell) -> dict | None:
        """The finished ``cell`` as :meth:`rows` gives it, or None."""
        return next(self._decode(self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM cells WHERE key = ?",
                                                 (cell.key,))), None)

    @staticmethod
    def _decode(cursor) -> Iterator[dict]:
        for values in cursor:
            row = dict(zip(COLUMNS, values, strict=True))
            row.update({k: float(row[k]) for k in REALS if isinstance(row[k], str)})  # 'nan'
            # a field added to TrainConfig after the cell was written has its default there (Cell.key)
            row["config"] = {**DEFAULT_CONFIG, **json.loads(row["config"])}
            row["history"] = json.loads(row["history"])
            yield row

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
