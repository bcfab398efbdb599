"""The state store: an embedded SQLite database (WAL) in the state directory.

It holds latched trips, the event journal, the controller's whole durable state (operator
state, alarm states, supervisor memory: JSON values by key), the audit of every command and
the commissioning records (sealed by controller/commission_record.py; appended only, in seq
order, each chained to the hash of the one before).
What it holds at start-up is restored before the first scan.

Two layers. `Journal` is the store: it raises on every failure (a full disk, a failing fsync, a
read-only or corrupt file, a path that is a directory). `JournalKeeper` is what the scan uses:
it never raises after start-up. When the store cannot be opened or written it keeps the
unpersisted events and commands in bounded queues, keeps the newest latch set and the newest
state per key, reports a `problem` (the runtime turns it into a degraded state that rejects
reuse and raises an alarm) and retries with back-off, so a broken journal never crash-loops the
service. A journal that could not be read at start-up has unknown latches: when it opens later,
the latches it holds are handed back (`take_restored`) and are never deleted before the
supervisor has them.

Theory of the start-up gate (`open_checked`, the keeper's default opener):
- The schema is versioned in `PRAGMA user_version`; `MIGRATIONS` is the ordered list of steps,
  each applied in one transaction together with its version bump, so a crash mid-migration
  leaves the previous version intact. The first schema (tables `latches` and `events`) was
  written with user_version 0; such a file is version 1.
- A file that is not a database, fails `PRAGMA quick_check`, is newer than this software, or
  whose tables do not match its version is `StateCorrupt`: start-up stops with one line. It is
  never silently replaced by an empty store, because an empty store forgets latched trips.
  Stopping is safe: with no controller the PLC's watchdog drives every output to its safe
  value (DESIGN §7). `reset_state` (an engineer's `--reset-state --reason`) moves the old file
  aside, never deleting it, and journals why.
- A missing file is a first start. It is built under a temporary name and linked into place
  only when complete, so an existing `heatloop.db` always had a schema: an empty or headless
  one is damage, not an interrupted first start.
- Errors that are not damage (permissions, a directory in the way, I/O errors) propagate as
  they are; the keeper turns them into a degraded journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interlocks.engine import Event

if TYPE_CHECKING:  # the operator layer is duck-typed here: only its attributes are read
    from controller.authority import Answer, Request

SCHEMA_VERSION = 4
RESET_HINT = "start a new one with: heatloop run --site SITE --reset-state --reason TEXT"
MAX_REASON = 500  # characters, as for every operator reason
_TEXT_LIMIT = 600  # a journalled text field is cut here (refused requests may carry anything)
_MAGIC = b"SQLite format 3\x00"

# Each step: the statements that take the store from version i to i + 1 (index i). Append only:
# a released step is never edited, since old files on site were built by it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1: latched trips and the event journal (the first schema)
        "CREATE TABLE IF NOT EXISTS latches (rule_id TEXT PRIMARY KEY, wall_time REAL NOT NULL)",
        """CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            wall_time REAL NOT NULL,
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
    ),
    (  # 1 -> 2: the whole durable state by key, the command audit, indexes for the readers
        """CREATE TABLE IF NOT EXISTS state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            wall_time REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS commands (
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
        )""",
        "CREATE INDEX IF NOT EXISTS events_wall_time ON events (wall_time)",
        "CREATE INDEX IF NOT EXISTS events_kind ON events (kind)",
        "CREATE INDEX IF NOT EXISTS commands_wall_time ON commands (wall_time)",
    ),
    (  # 2 -> 3: commissioning records, sealed (hash-chained, signed) whole as JSON text
        """CREATE TABLE IF NOT EXISTS commissioning (
            seq INTEGER PRIMARY KEY,
            filed_wall REAL NOT NULL,
            hash TEXT NOT NULL,
            record TEXT NOT NULL
        )""",
    ),
    (  # 3 -> 4: metering, per interval (upserted by start) and per interruption (by id); the
        # rows are metering.py's dicts as JSON text, the columns are what the readers select on
        """CREATE TABLE IF NOT EXISTS meter_intervals (
            start_wall REAL PRIMARY KEY,
            end_wall REAL NOT NULL,
            closed INTEGER NOT NULL,
            row TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS meter_interruptions (
            id INTEGER PRIMARY KEY,
            start_wall REAL NOT NULL,
            end_wall REAL,
            cls TEXT NOT NULL,
            row TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS meter_interruptions_start ON meter_interruptions (start_wall)",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

Row = tuple[float, str, str, str]  # wall time, kind, source, detail as JSON
# wall time, request id, principal, role, via, cmd, target, old JSON, new JSON, reason,
# accepted (0/1), why
CommandRow = tuple[float, str, str, str, str, str, str, str, str, str, int, str]
COMMAND_COLUMNS = (
    "wall_time",
    "request_id",
    "principal",
    "role",
    "via",
    "cmd",
    "target",
    "old",
    "new",
    "reason",
    "accepted",
    "why",
)
MAX_READ = 100_000  # rows one reader may ask for
# start_wall, end_wall, closed (0/1), the row as JSON text
IntervalRow = tuple[float, float, int, str]
# id, start_wall, end_wall (None while open), class, the row as JSON text
InterruptionRow = tuple[int, float, float | None, str, str]
METER_STATE_KEY = "meter"  # the meter's memory in the state table (metering.state_to_json)


@dataclass(frozen=True)
class MeterWrite:
    """One scan's metering for the store: interval rows upserted by `start_wall`, interruption
    rows upserted by `id` (metering.py's dicts), and the meter's memory (stored under the state
    key "meter"; None: unchanged). Written in the same transaction as the scan's events, latch
    set and state, so the memory on disk always matches the rows on disk."""

    intervals: Sequence[Mapping[str, Any]] = ()
    interruptions: Sequence[Mapping[str, Any]] = ()
    state: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class MeterData:
    """What `read_meter` found in a range, oldest first."""

    intervals: list[dict[str, Any]] = field(default_factory=list)  # start_wall in [from, to)
    interruptions: list[dict[str, Any]] = field(default_factory=list)  # overlapping [from, to)
    events: list[dict[str, Any]] = field(default_factory=list)  # wall_time, kind, source, detail
    commands: list[dict[str, Any]] = field(default_factory=list)  # as Journal.commands()


MAX_KINDS = 100  # kind names one reader may filter on


class StateCorrupt(Exception):
    """The state store is damaged or foreign; start-up stops. `str()` is one line: the path,
    what is wrong, and how to start anew (the old file is kept)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = " ".join(what.split())[:_TEXT_LIMIT]  # one line, bounded
        super().__init__(f"state store {path}: {self.what}; {RESET_HINT} (the old file is kept)")


class StateBusy(OSError):
    """A running controller holds the store: its state is not reset under it."""


def _lock(path: Path, how: int) -> int | None:
    """An advisory lock on `<store>.lock` (a file that is never moved): every keeper holds it
    shared for its life, `reset_state` needs it alone. The fd, or None if it cannot be taken
    (a shared lock is best effort: a directory that is not writable is the journal's problem,
    reported by the keeper)."""
    try:
        fd = os.open(_side(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o660)
    except OSError:
        if how & fcntl.LOCK_EX:
            raise
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        if how & fcntl.LOCK_EX:
            raise StateBusy(
                f"{path}: a running controller holds it; stop that controller first"
            ) from None
        return None
    return fd


def event_row(e: Event, wall_time: float) -> Row:
    return (wall_time, e.kind, e.source, json.dumps(dict(e.detail), default=str))


def _cut(text: str, limit: int = _TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _json(x: object) -> str:
    """JSON text of an audit value; never raises (a value that is not JSON is shown as text)."""
    try:
        text = json.dumps(x, default=str, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(repr(x)[:_TEXT_LIMIT])
    return _cut(text)


def _text(x: object) -> str:
    return _cut(x if isinstance(x, str) else repr(x))


def _target(args: object) -> str:
    """What a command acts on, for the audit's `target` column."""
    if not isinstance(args, Mapping):
        return ""
    for key in ("tag", "rule", "alarm", "name"):
        if key in args:
            return _text(args[key])
    if args.get("all") is True:
        return "*"
    for key in ("rules", "alarms"):
        if key in args:
            v = args[key]
            if isinstance(v, list | tuple) and all(isinstance(s, str) for s in v):
                return _cut(",".join(v)) if v else "*"  # an empty list means every one
            return _text(v)
    return ""


def command_row(req: Request, ans: Answer, wall: float) -> CommandRow:
    """The audit record of one answered request: who, when, what, old and new, why.

    Never raises: a refused request may carry any value, so every field is shown bounded."""
    return (
        float(wall),
        _text(req.id),
        _text(req.principal),
        _text(req.role),
        _text(req.via),
        _text(req.cmd),
        _target(req.args),
        _json(ans.old),
        _json(ans.new),
        _text(req.reason),
        int(bool(ans.accepted)),
        _text(ans.why),
    )


def encode_state(key: str, value: object) -> str:
    """JSON text of one state value; TypeError/ValueError naming the key if it is not JSON.

    NaN and infinities are kept (`allow_nan`): the supervisor's memory holds them."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"state key {key!r}: expected a non-empty string")
    try:
        return json.dumps(value, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"state[{key!r}]: expected a JSON value ({e})") from None
    except (ValueError, RecursionError) as e:  # a cycle, or nesting too deep
        raise ValueError(f"state[{key!r}]: expected a JSON value ({e})") from None


def _finite_wall(what: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what} {_cut(repr(v), 80)}: expected a finite wall time in seconds")
    return float(v)


def _row_text(what: str, row: Mapping[str, Any]) -> str:
    # NaN is kept rather than the row refused: a billing row is never lost over one bad
    # figure (the statement shows a non-finite figure as unreadable, counted as 0)
    try:
        return json.dumps(dict(row), allow_nan=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what}: expected a JSON object ({_cut(str(e), 100)})") from None


def encode_interval(row: object) -> IntervalRow:
    """The store's form of one interval row; ValueError naming the field that is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"meter interval: expected a mapping, got {type(row).__name__}")
    start = _finite_wall("meter interval start_wall", row.get("start_wall"))
    end = _finite_wall(f"meter interval {start:.0f} end_wall", row.get("end_wall"))
    if end <= start:
        raise ValueError(f"meter interval {start:.0f} end_wall {end!r}: expected after start_wall")
    closed = row.get("closed")
    if not isinstance(closed, bool):
        raise ValueError(f"meter interval {start:.0f} closed {closed!r}: expected true or false")
    return (start, end, int(closed), _row_text(f"meter interval {start:.0f}", row))


def encode_interruption(row: object) -> InterruptionRow:
    """The store's form of one interruption row; ValueError naming the field that is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"meter interruption: expected a mapping, got {type(row).__name__}")
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or rid < 1:
        raise ValueError(f"meter interruption id {_cut(repr(rid), 80)}: expected an integer from 1")
    start = _finite_wall(f"meter interruption {rid} start_wall", row.get("start_wall"))
    end_v = row.get("end_wall")
    end = None if end_v is None else _finite_wall(f"meter interruption {rid} end_wall", end_v)
    cls = row.get("cls")
    if not isinstance(cls, str) or not cls:
        raise ValueError(f"meter interruption {rid} cls {_cut(repr(cls), 80)}: expected a class")
    return (rid, start, end, cls, _row_text(f"meter interruption {rid}", row))


def _is_damage(e: BaseException) -> bool:
    """SQLite says the file is damaged or not a database (not: locked, I/O, permissions)."""
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _shape(db: sqlite3.Connection, tables: Iterable[str]) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(r) for r in db.execute(f"PRAGMA table_info({t})")] for t in tables}


def _tables(db: sqlite3.Connection) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {r[0] for r in rows if not r[0].startswith("sqlite_")}


def _expected_shape(version: int) -> dict[str, list[tuple[Any, ...]]]:
    """The tables (and their columns) a store of `version` has, built by the migrations."""
    db = sqlite3.connect(":memory:")
    try:
        for step in MIGRATIONS[:version]:
            for sql in step:
                db.execute(sql)
        return _shape(db, _tables(db))
    finally:
        db.close()


def _on_disk_version(db: sqlite3.Connection) -> int:
    """The schema version: user_version, except that the first schema left it at 0."""
    v = int(db.execute("PRAGMA user_version").fetchone()[0])
    if v == 0 and {"latches", "events"} <= _tables(db):
        return 1
    return v


def _known_version(path: Path, v: int) -> int:
    """`v` if this software can open it (a migration brings it up to date)."""
    if v > SCHEMA_VERSION:
        raise StateCorrupt(
            path,
            f"schema version {v} is newer than this software's ({SCHEMA_VERSION}) "
            "(run the heatloop that wrote it)",
        )
    if v < 0:
        raise StateCorrupt(path, f"schema version {v} is not a heatloop schema version")
    return v


def _fsync_dir(d: Path) -> None:
    """Make a rename in `d` durable (a power loss must not undo it)."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class Journal:
    """The SQLite store. Every method raises on failure (sqlite3.Error, OSError).

    Opening migrates the schema to `SCHEMA_VERSION`. `Journal(path)` does not judge the file
    (a damaged one raises sqlite3.DatabaseError as SQLite does); `open_checked` is the
    start-up gate that does. `before_commit` runs inside each write transaction just before
    COMMIT (where SQLite fsyncs): tests and the benchmark use it to make storage slow or
    failing.
    """

    before_commit: Callable[[], None] | None = None

    def __init__(
        self,
        path: Path,
        *,
        before_commit: Callable[[], None] | None = None,
        checked: bool = False,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.before_commit = before_commit
        if checked:
            _check_header(path)
        # the keeper may call from a worker thread (one call at a time, never concurrently)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            if checked:
                self._check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate(checked)
        except sqlite3.DatabaseError as e:
            self.db.close()
            if checked and _is_damage(e):
                raise StateCorrupt(path, f"damaged ({e})") from None
            raise
        except BaseException:
            self.db.close()
            raise

    # ---- schema ----

    def _check(self) -> None:
        """Integrity and version, before anything is written to the file."""
        bad = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
        if bad != ["ok"]:
            raise StateCorrupt(self.path, f"fails the integrity check: {'; '.join(bad)}")
        self._check_tables(_known_version(self.path, _on_disk_version(self.db)))

    def _check_tables(self, version: int) -> None:
        want = _expected_shape(version)
        extra = sorted(_tables(self.db) - set(want))
        if extra:  # each version's tables are known exactly: these belong to something else
            raise StateCorrupt(
                self.path,
                f"holds tables {', '.join(extra)} that a heatloop store of schema version "
                f"{version} does not have",
            )
        have = _shape(self.db, want)
        for table, cols in want.items():
            if not have[table]:
                raise StateCorrupt(
                    self.path, f"table {table!r} is missing (schema version {version})"
                )
            if have[table] != cols:
                got = ", ".join(f"{c[1]} {c[2]}".strip() for c in have[table])
                exp = ", ".join(f"{c[1]} {c[2]}".strip() for c in cols)
                raise StateCorrupt(
                    self.path, f"table {table!r} has columns ({got}), expected ({exp})"
                )

    def _migrate(self, checked: bool) -> None:
        """Apply the missing steps, each with its version bump in one transaction."""
        while True:
            v = _known_version(self.path, _on_disk_version(self.db))
            if v == SCHEMA_VERSION:
                break
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if _on_disk_version(self.db) == v:  # nobody migrated it meanwhile
                    for sql in MIGRATIONS[v]:
                        self.db.execute(sql)
                    self.db.execute(f"PRAGMA user_version = {v + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        if checked:
            self._check_tables(SCHEMA_VERSION)

    @property
    def version(self) -> int:
        return _on_disk_version(self.db)

    # ---- writing ----

    def latched(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.db.execute("SELECT rule_id FROM latches"))

    def record(self, events: Iterable[Event], latched: frozenset[str]) -> None:
        """Journal this scan's events and make the latch table equal `latched`, atomically."""
        now = time.time()
        self.write([event_row(e, now) for e in events], latched)

    def write(
        self,
        rows: list[Row],
        latched: frozenset[str],
        state: Mapping[str, object] | None = None,
        commands: Sequence[CommandRow] = (),
        meter: MeterWrite | None = None,
    ) -> None:
        """Insert `rows`, make the latch table equal `latched`, upsert `state` (JSON values by
        key), insert the command rows and upsert the meter's rows and memory, in one
        transaction. A state value that is not JSON or a meter row that is malformed raises
        TypeError/ValueError naming it before anything is written."""
        now = time.time()
        encoded = {k: (encode_state(k, v), now) for k, v in (state or {}).items()}
        intervals: list[IntervalRow] = []
        interruptions: list[InterruptionRow] = []
        if meter is not None:
            intervals = [encode_interval(r) for r in meter.intervals]
            interruptions = [encode_interruption(r) for r in meter.interruptions]
            if meter.state is not None:
                encoded[METER_STATE_KEY] = (encode_state(METER_STATE_KEY, meter.state), now)
        self.write_encoded(rows, latched, encoded, commands, intervals, interruptions)

    def write_encoded(
        self,
        rows: Sequence[Row],
        latched: frozenset[str],
        state: Mapping[str, tuple[str, float]],
        commands: Sequence[CommandRow] = (),
        intervals: Sequence[IntervalRow] = (),
        interruptions: Sequence[InterruptionRow] = (),
    ) -> None:
        """`write` with the state already JSON text (key -> (text, wall time it was taken))
        and the meter rows encoded (`encode_interval`, `encode_interruption`)."""
        have = self.latched()
        if (
            not rows
            and have == latched
            and not state
            and not commands
            and not intervals
            and not interruptions
        ):
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
            self.db.executemany(
                "INSERT INTO state (key, value, wall_time) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = excluded.value, wall_time = excluded.wall_time",
                [(k, text, wall) for k, (text, wall) in state.items()],
            )
            self.db.executemany(
                f"INSERT INTO commands ({', '.join(COMMAND_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(COMMAND_COLUMNS))})",
                commands,
            )
            # a closed interval is final: a late or replayed open row never replaces it
            self.db.executemany(
                "INSERT INTO meter_intervals (start_wall, end_wall, closed, row)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (start_wall) DO UPDATE SET"
                " end_wall = excluded.end_wall, closed = excluded.closed, row = excluded.row"
                " WHERE meter_intervals.closed = 0 OR excluded.closed = 1",
                intervals,
            )
            self.db.executemany(
                "INSERT INTO meter_interruptions (id, start_wall, end_wall, cls, row)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " start_wall = excluded.start_wall, end_wall = excluded.end_wall,"
                " cls = excluded.cls, row = excluded.row",
                interruptions,
            )
            if self.before_commit is not None:
                self.before_commit()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # ---- reading ----

    def load_state(self) -> dict[str, object]:
        """Every state value by key. A value that is not JSON is damage: StateCorrupt."""
        out: dict[str, object] = {}
        for key, text in self.db.execute("SELECT key, value FROM state ORDER BY key"):
            try:
                out[key] = json.loads(text)
            except (TypeError, ValueError) as e:
                raise StateCorrupt(
                    self.path, f"state[{key!r}] is not JSON ({_cut(str(e), 100)})"
                ) from None
        return out

    def events(
        self,
        limit: int = 100,
        since_wall: float | None = None,
        kinds: Iterable[str] | None = None,
    ) -> list[tuple[float, str, str, dict[str, object]]]:
        """Newest first: (wall time, kind, source, detail). `since_wall` keeps rows at or after
        that wall time; `kinds` keeps those kinds (an empty list keeps none)."""
        where, params = _filters(limit, since_wall)
        if kinds is not None:
            names = _names(kinds)
            if not names:
                return []
            where.append(f"kind IN ({', '.join('?' * len(names))})")
            params += names
        sql = "SELECT wall_time, kind, source, detail FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self.db.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [(w, k, s, _detail(d)) for w, k, s, d in cur]

    def commands(self, limit: int = 100, since_wall: float | None = None) -> list[dict[str, Any]]:
        """Newest first, one dict per command with the column names; `old` and `new` decoded
        from JSON, `accepted` a bool."""
        where, params = _filters(limit, since_wall)
        sql = f"SELECT id, {', '.join(COMMAND_COLUMNS)} FROM commands"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self.db.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [_command_dict(row) for row in cur]

    # ---- commissioning records ----

    def add_commission_record(self, record: Mapping[str, Any]) -> None:
        """Append one sealed commissioning record (`commission_record.seal` made it), in one
        transaction. ValueError (one line) when its seq is not the last one + 1 or its
        prev_hash is not the last record's hash: the chain is never forked or gapped here (two
        filings that raced sealed against the same last record; the second is refused)."""
        seq, prev_hash, digest, filed_wall = _seal_fields(record)
        try:
            text = json.dumps(
                dict(record),
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            )
            text.encode("utf-8")  # a lone surrogate cannot be stored as UTF-8 text
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"commissioning record seq {seq}: expected JSON ({e})") from None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            last = self.db.execute(
                "SELECT seq, hash FROM commissioning ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            want_seq, want_prev = (1, "") if last is None else (int(last[0]) + 1, str(last[1]))
            if seq != want_seq:
                raise ValueError(
                    f"commissioning record seq {seq}: expected seq {want_seq} (the last + 1)"
                )
            if prev_hash != want_prev:
                raise ValueError(
                    f"commissioning record seq {seq}: prev_hash {_cut(prev_hash, 80)!r}, "
                    f"expected the last record's hash {want_prev!r}"
                )
            self.db.execute(
                "INSERT INTO commissioning (seq, filed_wall, hash, record) VALUES (?, ?, ?, ?)",
                (seq, filed_wall, digest, text),
            )
            if self.before_commit is not None:
                self.before_commit()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def commission_records(self) -> list[dict[str, Any]]:
        """Every commissioning record in seq order (see `read_commission_records`)."""
        rows = self.db.execute("SELECT seq, record FROM commissioning ORDER BY seq")
        return [_commission_row(seq, text) for seq, text in rows]

    def close(self) -> None:
        self.db.close()


def _command_dict(row: Sequence[Any]) -> dict[str, Any]:
    d = dict(zip(("id", *COMMAND_COLUMNS), row, strict=True))
    for k in ("old", "new"):
        with contextlib.suppress(TypeError, ValueError):
            d[k] = json.loads(d[k])
    d["accepted"] = bool(d["accepted"])
    return d


def _seal_fields(record: object) -> tuple[int, str, str, float]:
    """(seq, prev_hash, hash, filed_wall) of a sealed record; ValueError naming the field."""
    if not isinstance(record, Mapping):
        raise ValueError(
            "commissioning record: expected a sealed record (a mapping), "
            f"got {type(record).__name__}"
        )
    seq = record.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(
            f"commissioning record seq {_cut(repr(seq), 80)}: expected an integer from 1"
        )
    for key in ("prev_hash", "hash"):
        if not isinstance(record.get(key), str):
            raise ValueError(
                f"commissioning record seq {seq}: {key} {_cut(repr(record.get(key)), 80)}: "
                "expected hex text (a sealed record)"
            )
    wall = record.get("filed_wall")
    if isinstance(wall, bool) or not isinstance(wall, int | float) or not math.isfinite(wall):
        raise ValueError(
            f"commissioning record seq {seq}: filed_wall {_cut(repr(wall), 80)}: "
            "expected a finite wall time"
        )
    return seq, record["prev_hash"], record["hash"], float(wall)


def _commission_row(seq: int, text: str) -> dict[str, Any]:
    """A stored record; a row that is not a JSON object is shown as unreadable (the verifier
    reports it), never fatal to a reader."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        return {"seq": seq, "unreadable": f"not JSON ({_cut(str(e), 100)})"}
    if not isinstance(d, dict):
        return {"seq": seq, "unreadable": f"not a JSON object ({type(d).__name__})"}
    return d


class StoreUnreadable(OSError):
    """The state store cannot be read for a reader outside the controller (one line)."""


def read_commission_records(path: Path) -> list[dict[str, Any]]:
    """Every commissioning record in `path` in seq order, read-only (SQLite `mode=ro`: works
    whether a controller runs on the store or not, and never migrates or writes it).

    SQLite reads a WAL store through its `-shm` index, which it creates if missing; a reader
    who may not write the state directory (an auditor's account) is then refused. When the
    store has no write-ahead log (no controller has it open), the file alone is the whole store
    and it is read as immutable instead. A store of a schema before commissioning holds none
    ([]). StoreUnreadable (one line) when the file does not exist, is not an SQLite database
    or is not a heatloop state store."""
    rows = _read_only(path, _commissioning_rows)
    return [_commission_row(seq, text) for seq, text in rows]


def read_commission_filings(path: Path) -> list[dict[str, Any]]:
    """The command audit's accepted `commission` requests, oldest first, read-only as
    `read_commission_records`: {"wall_time", "principal", "seq", "hash"} each (the controller
    journals the seq and hash it filed), or {"wall_time", "principal", "unreadable"}. They
    show a filed record that is no longer in the table (the newest ones leave no gap)."""
    out: list[dict[str, Any]] = []
    for wall, who, new in _read_only(path, _filing_rows):
        d = _detail(new)
        if isinstance(d, dict) and "seq" in d and "hash" in d:
            out.append({"wall_time": wall, "principal": who, "seq": d["seq"], "hash": d["hash"]})
        else:
            out.append({"wall_time": wall, "principal": who, "unreadable": _cut(str(new), 100)})
    return out


def read_state_resets(path: Path) -> list[dict[str, Any]]:
    """The `state_reset` events in `path` (read-only, oldest first): when the store was
    started anew, by whom, why, and where the old one was kept (its records are there)."""
    rows = _read_only(
        path,
        lambda db, tables: db.execute(
            "SELECT wall_time, detail FROM events WHERE kind = 'state_reset' ORDER BY id"
        ).fetchall(),
    )
    return [{"wall_time": wall, **_detail(detail)} for wall, detail in rows]


def read_meter(
    path: Path, from_wall: float, to_wall: float, *, kinds: Iterable[str] | None = None
) -> MeterData:
    """The metering in [from_wall, to_wall) of the store at `path`, read-only (as
    `read_commission_records`: works beside a running controller, never migrates or writes),
    in one read transaction so the rows agree with each other: intervals starting in the
    range, interruptions overlapping it, the journal's events (only `kinds`, when given) and
    the command audit in it, each oldest first. A store of a schema before metering holds
    no intervals or interruptions. ValueError for a range that is not two finite wall times in
    order; StoreUnreadable as `read_commission_records`."""
    lo = _finite_wall("from_wall", from_wall)
    hi = _finite_wall("to_wall", to_wall)
    if hi < lo:
        raise ValueError(f"to_wall {hi!r}: expected at or after from_wall {lo!r}")
    names = None if kinds is None else _names(kinds)

    def read(db: sqlite3.Connection, tables: set[str]) -> list[Any]:
        db.execute("BEGIN")
        try:
            return [_meter_read(db, tables, lo, hi, names)]
        finally:
            db.execute("COMMIT")

    got = _read_only(path, read)[0]
    assert isinstance(got, MeterData)
    return got


def _meter_read(
    db: sqlite3.Connection, tables: set[str], lo: float, hi: float, kinds: list[str] | None
) -> MeterData:
    out = MeterData()
    if "meter_intervals" in tables:
        rows = db.execute(
            "SELECT start_wall, end_wall, closed, row FROM meter_intervals"
            " WHERE start_wall >= ? AND start_wall < ? ORDER BY start_wall",
            (lo, hi),
        ).fetchall()
        out.intervals.extend(_interval_dicts(rows))
    if "meter_interruptions" in tables:
        for rid, start, end, cls, text in db.execute(
            "SELECT id, start_wall, end_wall, cls, row FROM meter_interruptions"
            " WHERE start_wall < ? AND (end_wall IS NULL OR end_wall > ?) ORDER BY id",
            (hi, lo),
        ):
            d = _stored_row(text)
            d.update(id=rid, start_wall=start, end_wall=end, cls=cls)
            out.interruptions.append(d)
    sql = (
        "SELECT wall_time, kind, source, detail FROM events WHERE wall_time >= ? AND wall_time < ?"
    )
    params: list[object] = [lo, hi]
    if kinds is not None:
        if not kinds:
            sql += " AND 0"
        else:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += kinds
    for wall, kind, source, detail in db.execute(sql + " ORDER BY wall_time, id", params):
        out.events.append(
            {"wall_time": wall, "kind": kind, "source": source, "detail": _detail(detail)}
        )
    if "commands" in tables:
        for row in db.execute(
            f"SELECT id, {', '.join(COMMAND_COLUMNS)} FROM commands"
            " WHERE wall_time >= ? AND wall_time < ? ORDER BY wall_time, id",
            (lo, hi),
        ):
            out.commands.append(_command_dict(row))
    return out


def _interval_dicts(rows: list[tuple[float, float, int, str]]) -> list[dict[str, Any]]:
    """The stored interval rows as dicts, the columns ruling start, end and closed. A year of
    rows is decoded as one JSON array (a quarter faster than row by row); if that fails, or
    any decoded row does not carry its own column's start (a damaged row), row by row, so a
    damaged row is shown as unreadable in its place and never shifts its neighbours."""
    try:
        ds = json.loads("[" + ",".join(r[3] for r in rows) + "]")
    except (TypeError, ValueError, RecursionError):
        ds = None
    if (
        not isinstance(ds, list)
        or len(ds) != len(rows)
        or not all(
            type(d) is dict and d.get("start_wall") == r[0] for d, r in zip(ds, rows, strict=True)
        )
    ):
        ds = [_stored_row(r[3]) for r in rows]
    for d, (start, end, closed, _) in zip(ds, rows, strict=True):
        d["start_wall"], d["end_wall"], d["closed"] = start, end, bool(closed)
    return ds


def _stored_row(text: str) -> dict[str, Any]:
    """A stored meter row; one that is not a JSON object is shown as unreadable (the
    statement counts it as such), never fatal to a reader."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        return {"unreadable": f"not JSON ({_cut(str(e), 100)})"}
    if not isinstance(d, dict):
        return {"unreadable": f"not a JSON object ({type(d).__name__})"}
    return d


def _commissioning_rows(db: sqlite3.Connection, tables: set[str]) -> list[Any]:
    if "commissioning" not in tables:
        return []  # written before commissioning records existed
    return db.execute("SELECT seq, record FROM commissioning ORDER BY seq").fetchall()


def _filing_rows(db: sqlite3.Connection, tables: set[str]) -> list[Any]:
    if "commands" not in tables:
        return []
    return db.execute(
        "SELECT wall_time, principal, new FROM commands"
        " WHERE cmd = 'commission' AND accepted = 1 ORDER BY id"
    ).fetchall()


def _read_only(path: Path, read: Callable[[sqlite3.Connection, set[str]], list[Any]]) -> list[Any]:
    """`read(db, tables)` on a read-only connection to the store at `path` (see
    `read_commission_records` for when it is opened as immutable)."""
    if not path.exists():
        raise StoreUnreadable(
            f"{path}: no state store there (expected the controller's heatloop.db in the "
            "site's state directory)"
        )
    if not path.is_file():
        raise StoreUnreadable(f"{path}: expected a state store file, found a directory")
    try:
        return _read_with(path, "mode=ro", read)
    except sqlite3.OperationalError as e:
        if _side(path, "-wal").exists():
            raise StoreUnreadable(
                f"{path}: cannot read the state store ({e}); read it as the controller's user "
                "or with write access to its directory"
            ) from None
        try:
            return _read_with(path, "immutable=1", read)
        except sqlite3.Error as e2:
            raise StoreUnreadable(f"{path}: cannot read the state store ({e2})") from None
    except sqlite3.Error as e:
        raise StoreUnreadable(f"{path}: cannot read the state store ({e})") from None


def _read_with(
    path: Path, how: str, read: Callable[[sqlite3.Connection, set[str]], list[Any]]
) -> list[Any]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?{how}", uri=True)
    try:
        tables = _tables(db)
        if not {"latches", "events"} <= tables:
            raise StoreUnreadable(
                f"{path}: not a heatloop state store (its tables: "
                f"{', '.join(sorted(tables)) or 'none'})"
            )
        return read(db, tables)
    finally:
        db.close()


def _filters(limit: object, since_wall: object) -> tuple[list[str], list[object]]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_READ:
        raise ValueError(f"limit {limit!r}: expected an integer from 0 to {MAX_READ}")
    if since_wall is None:
        return [], []
    if (
        isinstance(since_wall, bool)
        or not isinstance(since_wall, int | float)
        or not math.isfinite(since_wall)
    ):
        raise ValueError(f"since_wall {since_wall!r}: expected a finite wall time in seconds")
    return ["wall_time >= ?"], [float(since_wall)]


def _detail(text: str) -> dict[str, object]:
    """An event's detail; a row that is not a JSON object is shown, never fatal to a reader."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError):
        return {"unreadable": _cut(str(text), 200)}
    return d if isinstance(d, dict) else {"value": d}


def _names(kinds: Iterable[str]) -> list[str]:
    if isinstance(kinds, str):
        raise ValueError(f"kinds {kinds!r}: expected a list of kind names, not one string")
    names = list(kinds)
    if len(names) > MAX_KINDS:
        raise ValueError(f"kinds: {len(names)} names, expected at most {MAX_KINDS}")
    for k in names:
        if not isinstance(k, str):
            raise ValueError(f"kinds: {k!r} is not a kind name (expected a string)")
    return names


def _check_header(path: Path) -> None:
    """A file that is not an SQLite database at all (text, random bytes, an empty file)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_MAGIC))
    except FileNotFoundError:
        return  # SQLite creates it
    if head == _MAGIC:
        return
    wal = _side(path, "-wal")
    if not head and wal.exists() and wal.stat().st_size > 0:
        return  # a WAL not yet checkpointed into its database: SQLite recovers it
    what = "is empty (0 bytes)" if not head else f"is not an SQLite database (it starts {head!r})"
    raise StateCorrupt(path, what)


def _create(path: Path, rows: Sequence[Row] = ()) -> None:
    """A new store at `path` holding `rows`, built under a temporary name and linked into
    place complete (never over an existing file)."""
    tmp = _side(path, ".new")
    for p in (tmp, _side(tmp, "-wal"), _side(tmp, "-shm")):
        p.unlink(missing_ok=True)  # a creation that died half way: it never held state
    j = Journal(tmp)
    try:
        j.write(list(rows), frozenset())
    finally:
        j.close()  # checkpoints the WAL into the file and removes it
    if _side(tmp, "-wal").exists():
        raise OSError(f"{tmp}: its write-ahead log was not folded in on close")
    try:
        os.link(tmp, path)  # fails if `path` exists: never replaces a store
    except FileExistsError:
        tmp.unlink()
        raise
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise
        os.rename(tmp, path)
    else:
        tmp.unlink()
    _fsync_dir(path.parent)


def open_checked(path: Path) -> Journal:
    """The store at `path`, checked: the start-up gate.

    A missing file is a first start (a new store is created). A file that is not an SQLite
    database, fails `PRAGMA quick_check`, has a newer schema or tables that do not match
    raises `StateCorrupt` (one line). Other failures (permissions, a directory in the way,
    I/O) raise as they are."""
    if not path.exists() and not path.is_symlink():
        wal = _side(path, "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            # the log of a store that is gone: a new store would replay it as its own
            raise StateCorrupt(path, f"is missing but its write-ahead log {wal.name} is there")
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            _create(path)
    return Journal(path, checked=True)


def reset_state(path: Path, reason: str, who: str, *, now_wall: float | None = None) -> Path | None:
    """An engineer's fresh start: move the store and its -wal/-shm aside, create a new one,
    and journal `state_reset` (reason, who, the old file) in it.

    The old files become `<name>.<UTC yyyymmddThhmmssZ>.bad` (its log `…bad-wal`, so SQLite
    opens the kept copy with its log); nothing is deleted. Returns the kept copy's path, or
    None when there was no store. ValueError for an empty reason or who; StateBusy (an
    OSError) while a controller runs on this store: moving its file under it would let it
    write on into the kept copy and start from the new, empty one next time."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason {reason!r}: expected why the state is reset (non-empty)")
    if len(reason) > MAX_REASON:
        raise ValueError(f"reason: {len(reason)} characters, expected at most {MAX_REASON}")
    if not isinstance(who, str) or not who.strip():
        raise ValueError(f"who {who!r}: expected the name of the person resetting the state")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path, fcntl.LOCK_EX)  # StateBusy while a controller runs on this store
    assert lock is not None
    try:
        return _reset(path, reason, who, time.time() if now_wall is None else now_wall)
    finally:
        os.close(lock)


def _reset(path: Path, reason: str, who: str, wall: float) -> Path | None:
    stamp = datetime.fromtimestamp(wall, UTC).strftime("%Y%m%dT%H%M%SZ")
    bad = _side(path, f".{stamp}.bad")
    n = 1
    while any(p.exists() for p in (bad, _side(bad, "-wal"), _side(bad, "-shm"))):
        bad, n = _side(path, f".{stamp}.{n}.bad"), n + 1
    kept: Path | None = None
    # the database first, then its log: a log left without its database is refused by
    # open_checked (never replayed into a new store), and is moved by the next reset
    for suffix in ("", "-wal", "-shm"):
        src = _side(path, suffix)
        if src.exists() or src.is_symlink():
            os.rename(src, _side(bad, suffix))
            if suffix == "":
                kept = bad
    _fsync_dir(path.parent)
    detail = {"reason": reason, "who": who, "old": str(kept) if kept else None}
    _create(path, [event_row(Event("state_reset", 0.0, "journal", detail), wall)])
    return kept


class JournalKeeper:
    """The journal as the scan sees it: never raises after start-up, queues while the store
    is down.

    `problem` is None while every event, command, state value and the current latch set are
    on disk, else one stable line saying why not (the runtime passes it to the supervisor as a
    degraded state, so reuse stays rejected while a latched trip may be unpersisted). Retries
    back off from `retry_min_s` to `retry_max_s`; at most `max_pending` events (and as many
    command rows) wait in memory (the oldest are dropped first and counted in `dropped` /
    `dropped_commands`, and a `journal_events_dropped` / `journal_commands_dropped` event says
    so). State waits as one dict: the newest value per key wins. Meter rows wait the same way:
    the newest row per interval start and per interruption id (a scan rewrites the open
    interval each time, so an outage of hours holds one row per interval, not per scan); at
    most `max_pending_meter` of each (the oldest dropped first, `journal_meter_dropped`).

    At construction the store is opened with `opener` (by default `open_checked`): a
    `StateCorrupt` there propagates (start-up stops: a damaged store is never silently
    replaced); any other failure is a degraded journal with unknown latches and state.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        opener: Callable[[Path], Journal] = open_checked,
        max_pending: int = 1000,
        max_pending_meter: int = 10_000,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.path = path
        self.clock = clock
        self.wall = wall
        self.opener = opener
        self.store: Journal | None = None
        self.pending: deque[Row] = deque(maxlen=max_pending)
        self.dropped = 0
        self.pending_commands: deque[CommandRow] = deque(maxlen=max_pending)
        self.dropped_commands = 0
        self.pending_state: dict[str, tuple[str, float]] = {}  # key -> (JSON, wall time)
        # newest row per key; 10,000 intervals are 104 days of 15-minute intervals
        self.pending_intervals: dict[float, IntervalRow] = {}
        self.pending_interruptions: dict[int, InterruptionRow] = {}
        self.max_pending_meter = max_pending_meter
        self.dropped_meter = 0
        self.latest: frozenset[str] | None = None  # the newest latch set to persist
        self.problem: str | None = None
        self.failures = 0
        self.next_try_s = -float("inf")
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._known: frozenset[str] | None = None  # the store's latches, once read
        self._restored: frozenset[str] = frozenset()
        self._state: dict[str, object] | None = None  # the store's state at start-up
        self._lock = _lock(path, fcntl.LOCK_SH)  # no reset of this store while we run
        try:
            self._open(self.clock(), first=True)
        except BaseException:
            self._unlock()
            raise

    # ---- start-up ----

    def latched(self) -> frozenset[str] | None:
        """Latches on disk at start-up; None if the journal could not be read (unknown)."""
        return self._known

    def state(self) -> dict[str, object] | None:
        """The durable state on disk at start-up ({} on a first start); None if the journal
        could not be read then. A store that opens only later does not hand its state back:
        the controller has started afresh by then (latches excepted: `take_restored`)."""
        return None if self._state is None else dict(self._state)

    def take_restored(self) -> frozenset[str]:
        """Latches found in a journal that opened only after start-up (once)."""
        r, self._restored = self._restored, frozenset()
        return r

    # ---- every scan ----

    def record(
        self,
        events: Iterable[Event],
        latched: frozenset[str],
        state: Mapping[str, object] | None = None,
        commands: Iterable[CommandRow] = (),
        meter: MeterWrite | None = None,
    ) -> None:
        """Queue this scan's events, latch set, state, command rows and meter write, then
        persist them if the store allows (all in one transaction). Never raises: a state value
        that is not JSON is stored as null (a fresh start for that part) and a
        `journal_state_refused` event names it; a malformed meter row is left out and a
        `journal_meter_refused` event names it."""
        now_wall = self.wall()
        for e in events:
            self._queue(event_row(e, now_wall))
        if meter is not None:
            state = dict(state or {})
            if meter.state is not None:
                state[METER_STATE_KEY] = meter.state
            self._queue_meter(meter, now_wall)
        for c in commands:
            if len(self.pending_commands) == self.pending_commands.maxlen:
                self.dropped_commands += 1
            self.pending_commands.append(c)
        for key, value in (state or {}).items():
            try:
                text = encode_state(key, value)
            except (TypeError, ValueError) as err:
                key, text = str(key), "null"
                refused = Event("journal_state_refused", now_wall, "journal", {"why": str(err)})
                self._queue(event_row(refused, now_wall))
            self.pending_state[key] = (text, now_wall)
        self.latest = latched
        self.flush()

    def _queue(self, row: Row) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(row)

    def _queue_meter(self, meter: MeterWrite, now_wall: float) -> None:
        def refused(err: ValueError) -> None:
            e = Event("journal_meter_refused", now_wall, "journal", {"why": str(err)})
            self._queue(event_row(e, now_wall))

        for r in meter.intervals:
            try:
                iv = encode_interval(r)
            except ValueError as err:
                refused(err)
                continue
            self.pending_intervals[iv[0]] = iv
        for r in meter.interruptions:
            try:
                ir = encode_interruption(r)
            except ValueError as err:
                refused(err)
                continue
            self.pending_interruptions[ir[0]] = ir
        for pending in (self.pending_intervals, self.pending_interruptions):
            while len(pending) > self.max_pending_meter:  # the oldest key first
                del pending[next(iter(pending))]  # type: ignore[arg-type]
                self.dropped_meter += 1

    def flush(self) -> bool:
        """Try to persist what is queued (respecting the back-off); True when all is on disk."""
        now = self.clock()
        if self.problem is not None and now < self.next_try_s:
            return False
        if self.store is None and not self._open(now):
            return False
        assert self.store is not None and self._known is not None
        rows = list(self.pending)
        for kind, n in (
            ("journal_events_dropped", self.dropped),
            ("journal_commands_dropped", self.dropped_commands),
            ("journal_meter_dropped", self.dropped_meter),
        ):
            if n:
                rows.append(event_row(Event(kind, now, "journal", {"dropped": n}), self.wall()))
        latched = self.latest if self.latest is not None else self._known
        # never delete a latch the supervisor has not been shown yet
        latched = latched | self._restored
        try:
            self.store.write_encoded(
                rows,
                latched,
                dict(self.pending_state),
                list(self.pending_commands),
                list(self.pending_intervals.values()),
                list(self.pending_interruptions.values()),
            )
        except Exception as e:  # any store failure is a degraded journal
            self._failed(now, e)
            return False
        self.pending.clear()
        self.pending_commands.clear()
        self.pending_state.clear()
        self.pending_intervals.clear()
        self.pending_interruptions.clear()
        self.dropped = self.dropped_commands = self.dropped_meter = 0
        self._known = latched
        self.problem = None
        self.failures = 0
        return True

    def _open(self, now: float, first: bool = False) -> bool:
        # A StateCorrupt at start-up propagates: start-up stops rather than run on an empty
        # store in place of a damaged one. Later (after a good start) it is a degraded
        # journal like any other failure: the controller already holds what the store held.
        try:
            store = self.opener(self.path)
        except Exception as e:
            if first and isinstance(e, StateCorrupt):
                raise
            self._failed(now, e)
            return False
        try:
            on_disk = store.latched()
            state = store.load_state() if first else None
        except Exception as e:
            store.close()
            if first and isinstance(e, StateCorrupt):
                raise
            self._failed(now, e)
            return False
        if first:
            self._state = state
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

    def events(
        self,
        limit: int = 100,
        since_wall: float | None = None,
        kinds: Iterable[str] | None = None,
    ) -> list[tuple[float, str, str, dict[str, object]]]:
        if self.store is None:
            return []
        return self.store.events(limit, since_wall, kinds)

    def commands(self, limit: int = 100, since_wall: float | None = None) -> list[dict[str, Any]]:
        if self.store is None:
            return []
        return self.store.commands(limit, since_wall)

    def add_commission_record(self, record: Mapping[str, Any]) -> None:
        """File one sealed commissioning record. Unlike the scan's methods this raises
        (OSError, sqlite3.Error, ValueError from `Journal.add_commission_record`): the caller
        refuses the filing, and the tool keeps its copy. It opens its own connection, so it
        may run in any thread beside the scan's commits (SQLite serialises the writers) and
        never touches what the scan has queued."""
        if not self.path.is_file():
            raise StoreUnreadable(f"{self.path}: no state store to file the record in")
        store = Journal(self.path)
        try:
            store.add_commission_record(record)
        finally:
            store.close()

    def commission_records(self) -> list[dict[str, Any]]:
        """Every commissioning record in seq order, read on a connection of its own (any
        thread); raises StoreUnreadable when the store cannot be read."""
        return read_commission_records(self.path)

    def close(self) -> None:
        try:
            if self.store is not None:
                self.flush()
            if self.store is not None:  # a failed last flush has already closed it
                self.store.close()
                self.store = None
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the fd releases the lock
            self._lock = None
