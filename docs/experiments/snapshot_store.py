"""Snapshot a results store for make_docs.sh: ``snapshot_store.py STORE SNAPSHOT``.

Exits 1 when STORE has no ``cells`` table yet (a sweep created it but has not finished a cell). Otherwise
copies it to SNAPSHOT with SQLite's online backup (safe while a sweep writes to it), unless SNAPSHOT already
holds the same cells (their count and the last finish time), so that an unchanged store adds no new binary to
commit.
"""
import contextlib
import os
import sqlite3
import sys

CELLS = "SELECT count(*), max(finished_at) FROM cells"

store, snapshot = sys.argv[1:]
with contextlib.closing(sqlite3.connect(store)) as src:
    if not src.execute("SELECT 1 FROM sqlite_master WHERE name = 'cells'").fetchone():
        sys.exit(1)
    if os.path.exists(snapshot):
        with contextlib.closing(sqlite3.connect(snapshot)) as old:
            if old.execute(CELLS).fetchone() == src.execute(CELLS).fetchone():
                sys.exit(0)
    with contextlib.closing(sqlite3.connect(snapshot)) as dst:
        src.backup(dst)
