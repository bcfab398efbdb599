"""Build `v0.db`: a state store as the first schema wrote it (tables `latches` and `events`,
user_version 0, WAL mode), holding the latched trip IL-04 and three events.

The statements are copied from the journal as it first landed (commit 9ccd150), not imported,
so the file stays what an old installation has on disk however the journal changes. Run from
the repository root: `.venv/bin/python tests/data/state/make_v0.py` (it refuses to overwrite).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

OUT = Path(__file__).with_name("v0.db")

# the landed schema, verbatim
SCHEMA = """
CREATE TABLE IF NOT EXISTS latches (rule_id TEXT PRIMARY KEY, wall_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_time REAL NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

WALL = 1_780_000_000.0  # 2026-05-28, a fixed time so the contents are known to the tests
LATCHED = ("IL-04", WALL + 2.0)
EVENTS = (
    (WALL, "mode_changed", "supervisor", {"from": "STARTUP", "to": "DRY_COOLER_REJECT"}),
    (WALL + 2.0, "trip_latched", "IL-04", {"cause": "leak_reuse"}),
    (WALL + 2.0, "mode_changed", "supervisor", {"from": "NORMAL_REUSE", "to": "LEAK_TRIP"}),
)


def main() -> int:
    if OUT.exists():
        print(f"{OUT} exists; remove it first to rebuild", file=sys.stderr)
        return 1
    db = sqlite3.connect(OUT, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT INTO events (wall_time, kind, source, detail) VALUES (?, ?, ?, ?)",
        [(w, k, s, json.dumps(d)) for w, k, s, d in EVENTS],
    )
    db.execute("INSERT INTO latches VALUES (?, ?)", LATCHED)
    db.execute("COMMIT")
    db.close()  # folds the WAL into the file and removes it
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
