"""The journal: an embedded SQLite database (WAL) in the state directory.

It holds latched trips and the event journal. A latched trip read back at start-up is restored
into the supervisor before its first step.

Two layers. `Journal` is the store: it raises on every failure (a full disk, a failing fsync, a
read-only or corrupt file, a path that is a directory). `JournalKeeper` is what the scan uses:
it never raises. When the store cannot be opened or written it keeps the unpersisted events in
a bounded queue, keeps the newest latch set, reports a `problem` (the runtime turns it into a
degraded state that rejects reuse and raises an alarm) and retries with back-off, so a broken
journal never crash-loops the service. A journal that could not be read at start-up has
unknown latches: when it opens later, the latches it holds are handed back (`take_restored`)
and are never deleted before the supervisor has them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
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

Row = tuple[float, str, str, str]  # wall time, kind, source, detail as JSON


def event_row(e: Event, wall_time: float) -> Row:
    return (wall_time, e.kind, e.source, json.dumps(dict(e.detail), default=str))


class Journal:
    """The SQLite store. Every method raises on failure (sqlite3.Error, OSError).

    `before_commit` runs inside each write transaction just before COMMIT (where SQLite
    fsyncs): tests and the benchmark use it to make storage slow or failing.
    """

    def __init__(self, path: Path, *, before_commit: Callable[[], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.before_commit = before_commit
        # the keeper may call from a worker thread (one call at a time, never concurrently)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except BaseException:
            self.db.close()
            raise

    def latched(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.db.execute("SELECT rule_id FROM latches"))

    def record(self, events: Iterable[Event], latched: frozenset[str]) -> None:
        """Journal this scan's events and make the latch table equal `latched`, atomically."""
        now = time.time()
        self.write([event_row(e, now) for e in events], latched)

    def write(self, rows: list[Row], latched: frozenset[str]) -> None:
        """Insert `rows` and make the latch table equal `latched` in one transaction."""
        have = self.latched()
        if not rows and have == latched:
            return
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT INTO events (wall_time, kind, source, detail) VALUES (?, ?, ?, ?)", rows
            )
            for rid in latched - have:
                self.db.execute("INSERT INTO latches VALUES (?, ?)", (rid, now))
            for rid in have - latched:
                self.db.execute("DELETE FROM latches WHERE rule_id = ?", (rid,))
            if self.before_commit is not None:
                self.before_commit()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def events(self, limit: int = 100) -> list[tuple[float, str, str, dict[str, object]]]:
        cur = self.db.execute(
            "SELECT wall_time, kind, source, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [(w, k, s, json.loads(d)) for w, k, s, d in cur]

    def close(self) -> None:
        self.db.close()


class JournalKeeper:
    """The journal as the scan sees it: never raises, queues while the store is down.

    `problem` is None while every event and the current latch set are on disk, else one stable
    line saying why not (the runtime passes it to the supervisor as a degraded state, so reuse
    stays rejected while a latched trip may be unpersisted). Retries back off from
    `retry_min_s` to `retry_max_s`; at most `max_pending` events wait in memory (the oldest are
    dropped first and counted in `dropped`, and a `journal_events_dropped` event says so).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        opener: Callable[[Path], Journal] = Journal,
        max_pending: int = 1000,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.path = path
        self.clock = clock
        self.opener = opener
        self.store: Journal | None = None
        self.pending: deque[Row] = deque(maxlen=max_pending)
        self.dropped = 0
        self.latest: frozenset[str] | None = None  # the newest latch set to persist
        self.problem: str | None = None
        self.failures = 0
        self.next_try_s = -float("inf")
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._known: frozenset[str] | None = None  # the store's latches, once read
        self._restored: frozenset[str] = frozenset()
        self._open(self.clock())

    # ---- start-up ----

    def latched(self) -> frozenset[str] | None:
        """Latches on disk at start-up; None if the journal could not be read (unknown)."""
        return self._known

    def take_restored(self) -> frozenset[str]:
        """Latches found in a journal that opened only after start-up (once)."""
        r, self._restored = self._restored, frozenset()
        return r

    # ---- every scan ----

    def record(self, events: Iterable[Event], latched: frozenset[str]) -> None:
        """Queue this scan's events and latch set, then persist them if the store allows."""
        now_wall = time.time()
        for e in events:
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append(event_row(e, now_wall))
        self.latest = latched
        self.flush()

    def flush(self) -> bool:
        """Try to persist what is queued (respecting the back-off); True when all is on disk."""
        now = self.clock()
        if self.problem is not None and now < self.next_try_s:
            return False
        if self.store is None and not self._open(now):
            return False
        assert self.store is not None and self._known is not None
        rows = list(self.pending)
        if self.dropped:
            rows.append(
                event_row(
                    Event("journal_events_dropped", now, "journal", {"dropped": self.dropped}),
                    time.time(),
                )
            )
        latched = self.latest if self.latest is not None else self._known
        # never delete a latch the supervisor has not been shown yet
        latched = latched | self._restored
        try:
            self.store.write(rows, latched)
        except Exception as e:  # any store failure is a degraded journal
            self._failed(now, e)
            return False
        self.pending.clear()
        self.dropped = 0
        self._known = latched
        self.problem = None
        self.failures = 0
        return True

    def _open(self, now: float) -> bool:
        try:
            store = self.opener(self.path)
        except Exception as e:
            self._failed(now, e)
            return False
        try:
            on_disk = store.latched()
        except Exception as e:
            store.close()
            self._failed(now, e)
            return False
        if self._known is None and self.latest is not None:
            # opened only after start-up: whatever was latched before must reach the supervisor
            self._restored = on_disk - self.latest
        self._known = on_disk if self._known is None else self._known
        self.store = store
        self.problem = None
        return True

    def _failed(self, now: float, e: Exception) -> None:
        self.failures += 1
        self.problem = f"journal cannot persist: {type(e).__name__}: {e}"
        delay = min(self.retry_max_s, self.retry_min_s * 2 ** (self.failures - 1))
        self.next_try_s = now + delay
        if self.store is not None:
            # reopen on the next try: a connection that failed once is not trusted again
            with contextlib.suppress(Exception):
                self.store.close()
            self.store = None

    # ---- readers ----

    def events(self, limit: int = 100) -> list[tuple[float, str, str, dict[str, object]]]:
        if self.store is None:
            return []
        return self.store.events(limit)

    def close(self) -> None:
        if self.store is not None:
            self.flush()
        if self.store is not None:  # a failed last flush has already closed it
            self.store.close()
            self.store = None
