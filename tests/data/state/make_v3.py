"""Build `v3.db`: a state store as schema version 3 wrote it (tables `latches`, `events`,
`state`, `commands`, `commissioning` and their indexes, user_version 3, WAL mode), holding the
latched trip IL-04, three events, two state values, one audited command and one commissioning
record (a stand-in body: the migration keeps it byte for byte, nothing verifies its seal here).

The statements are copied from the journal as schema 3 stood (commit c583d57), not imported, so
the file stays what an installation of that version has on disk however the journal changes.
Run from the repository root: `.venv/bin/python tests/data/state/make_v3.py` (it refuses to
overwrite).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

OUT = Path(__file__).with_name("v3.db")

# the schema of version 3, verbatim
SCHEMA = """
CREATE TABLE IF NOT EXISTS latches (rule_id TEXT PRIMARY KEY, wall_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_time REAL NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    wall_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_time REAL,
    request_id TEXT,
    principal TEXT,
    role TEXT,
    via TEXT,
    cmd TEXT,
    target TEXT,
    old TEXT,
    new TEXT,
    reason TEXT,
    accepted INTEGER,
    why TEXT
);
CREATE INDEX IF NOT EXISTS events_wall_time ON events (wall_time);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind);
CREATE INDEX IF NOT EXISTS commands_wall_time ON commands (wall_time);
CREATE TABLE IF NOT EXISTS commissioning (
    seq INTEGER PRIMARY KEY,
    filed_wall REAL NOT NULL,
    hash TEXT NOT NULL,
    record TEXT NOT NULL
);
"""

WALL = 1_795_000_000.0  # 2026-11-18, a fixed time so the contents are known to the tests
LATCHED = ("IL-04", WALL + 2.0)
EVENTS = (
    (WALL, "mode_changed", "supervisor", {"from": "STARTUP", "to": "DRY_COOLER_REJECT"}),
    (WALL + 2.0, "trip_latched", "IL-04", {"hazard": "leak in the reuse zone"}),
    (WALL + 3.0, "alarm_raised", "IL-04", {"priority": "high", "message": "leak"}),
)
STATE = (
    ("operator", {"reject": True}, WALL + 1.0),
    ("mode", "LEAK_TRIP", WALL + 2.0),
)
COMMANDS = (
    (WALL + 1.0, "r1", "alice", "operator", "cli", "reject", "", "false", "true", "test", 1, ""),
)
RECORD = {"seq": 1, "prev_hash": "", "hash": "00" * 32, "filed_wall": WALL + 4.0, "steps": []}


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
    db.executemany(
        "INSERT INTO state (key, value, wall_time) VALUES (?, ?, ?)",
        [(k, json.dumps(v), w) for k, v, w in STATE],
    )
    db.executemany(
        "INSERT INTO commands (wall_time, request_id, principal, role, via, cmd, target, old,"
        " new, reason, accepted, why) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        COMMANDS,
    )
    db.execute(
        "INSERT INTO commissioning (seq, filed_wall, hash, record) VALUES (?, ?, ?, ?)",
        (RECORD["seq"], RECORD["filed_wall"], RECORD["hash"], json.dumps(RECORD, sort_keys=True)),
    )
    db.execute("PRAGMA user_version = 3")
    db.execute("COMMIT")
    db.close()  # folds the WAL into the file and removes it
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
