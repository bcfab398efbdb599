"""The journal: an embedded SQLite database (WAL) in the state directory.

It holds latched trips (written in the scan that raises them, with a full fsync, so `kill -9`
cannot lose one) and the event journal. A latched trip read back at start-up is restored into
the supervisor before its first step.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from interlocks.engine import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latches (rule_id TEXT PRIMARY KEY, wall_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall_time REAL NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def latched(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.db.execute("SELECT rule_id FROM latches"))

    def record(self, events: Iterable[Event], latched: frozenset[str]) -> None:
        """Journal this scan's events and make the latch table equal `latched`, atomically."""
        now = time.time()
        rows = [(now, e.kind, e.source, json.dumps(dict(e.detail), default=str)) for e in events]
        have = self.latched()
        if not rows and have == latched:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO events (wall_time, kind, source, detail) VALUES (?, ?, ?, ?)", rows
            )
            for rid in latched - have:
                self.db.execute("INSERT INTO latches VALUES (?, ?)", (rid, now))
            for rid in have - latched:
                self.db.execute("DELETE FROM latches WHERE rule_id = ?", (rid,))

    def events(self, limit: int = 100) -> list[tuple[float, str, str, dict[str, object]]]:
        cur = self.db.execute(
            "SELECT wall_time, kind, source, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [(w, k, s, json.loads(d)) for w, k, s, d in cur]

    def close(self) -> None:
        self.db.close()
