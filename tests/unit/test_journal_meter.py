"""The meter's rows in the state store: schema 4 migrates from a schema-3 store, a scan's meter
write lands with its events in one transaction or not at all, rows are upserted by key (a
closed interval is final), the keeper merges pending rows by key while the store is down, and
`read_meter` reads a range read-only."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controller.journal import (
    SCHEMA_VERSION,
    Journal,
    JournalKeeper,
    MeterWrite,
    StoreUnreadable,
    open_checked,
    read_commission_records,
    read_meter,
)
from interlocks.engine import Event
from tests.unit.test_store import kill_writer

ROOT = Path(__file__).resolve().parents[2]
V3 = ROOT / "tests" / "data" / "state" / "v3.db"
V3_WALL = 1_795_000_000.0  # tests/data/state/make_v3.py
T0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z
IV = 900.0


def interval(start: float, *, closed: bool = True, kwh: float = 10.0, **extra: Any) -> dict:
    return {
        "start_wall": start,
        "end_wall": start + IV,
        "closed": closed,
        "covered_s": IV,
        "delivered_kwh": kwh,
        "class_s": {"available": IV},
        "flags": [],
        **extra,
    }


def interruption(rid: int, start: float, end: float | None, cls: str = "trip") -> dict:
    return {
        "id": rid,
        "cls": cls,
        "start_wall": start,
        "end_wall": end,
        "detail": "IL-04 latched",
        "baseline_kw": 40.0,
        "delivered_during_kwh": 0.0,
        "lost_kwh": 0.0 if end is None else 40.0 * (end - start) / 3600.0,
    }


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Switchable:
    """An opener whose stores fail to commit while told to."""

    def __init__(self) -> None:
        self.commit_fails = False

    def __call__(self, path: Path) -> Journal:
        return Journal(path, before_commit=self._commit)

    def _commit(self) -> None:
        if self.commit_fails:
            raise sqlite3.OperationalError("database or disk is full")


def schema(p: Path) -> dict[str, str]:
    db = sqlite3.connect(p)
    try:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        return {name: " ".join(sql.split()) for name, sql in rows}
    finally:
        db.close()


def table(p: Path, name: str) -> list[tuple]:
    db = sqlite3.connect(p)
    try:
        return db.execute(f"SELECT * FROM {name}").fetchall()
    finally:
        db.close()


# ---- schema 3 -> 4 ----


def test_the_committed_fixture_is_schema_3() -> None:
    db = sqlite3.connect(f"{V3.as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        db.close()
    assert "meter_intervals" not in schema(V3)


def test_a_schema_3_store_migrates_to_4_and_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    shutil.copyfile(V3, path)
    # before any migration a reader sees no metering, and does not migrate the file
    data = read_meter(path, V3_WALL - 10, V3_WALL + 10)
    assert (data.intervals, data.interruptions) == ([], [])
    assert [e["kind"] for e in data.events] == ["mode_changed", "trip_latched", "alarm_raised"]
    assert [c["cmd"] for c in data.commands] == ["reject"]
    assert "meter_intervals" not in schema(path)
    j = open_checked(path)
    assert j.version == SCHEMA_VERSION == 4
    assert j.latched() == {"IL-04"}
    assert j.load_state() == {"operator": {"reject": True}, "mode": "LEAK_TRIP"}
    assert [k for _, k, _, _ in reversed(j.events())] == [
        "mode_changed",
        "trip_latched",
        "alarm_raised",
    ]
    assert [r["seq"] for r in j.commission_records()] == [1]
    j.write([], frozenset({"IL-04"}), meter=MeterWrite([interval(T0)], [], {"v": 1}))
    j.close()
    assert schema(path) == schema(_new(tmp_path / "new.db"))
    assert {"meter_intervals", "meter_interruptions", "meter_interruptions_start"} <= set(
        schema(path)
    )
    assert read_commission_records(path)[0]["hash"] == "00" * 32
    assert [r["start_wall"] for r in read_meter(path, T0, T0 + IV).intervals] == [T0]


def _new(path: Path) -> Path:
    Journal(path).close()
    return path


# ---- one transaction ----


def test_the_meter_write_is_atomic_with_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    fail = [True]

    def before_commit() -> None:
        if fail[0]:
            raise sqlite3.OperationalError("disk I/O error")

    j = Journal(path, before_commit=before_commit)
    ev = Event("interruption_started", 1.0, "meter", {"id": 1, "cls": "trip"})
    meter = MeterWrite([interval(T0, closed=False)], [interruption(1, T0 + 5, None)], {"n": 1})
    with pytest.raises(sqlite3.OperationalError):
        j.write([(T0 + 5, ev.kind, ev.source, "{}")], frozenset({"IL-04"}), meter=meter)
    # the failure came after every row was written, before COMMIT: none of them is there
    for name in ("events", "latches", "state", "meter_intervals", "meter_interruptions"):
        assert table(path, name) == [], name
    fail[0] = False
    j.write([(T0 + 5, ev.kind, ev.source, "{}")], frozenset({"IL-04"}), meter=meter)
    assert len(table(path, "events")) == 1
    assert j.load_state() == {"meter": {"n": 1}}
    data = read_meter(path, T0, T0 + IV)
    assert [i["closed"] for i in data.intervals] == [False]
    assert [(r["id"], r["end_wall"]) for r in data.interruptions] == [(1, None)]
    j.close()


def test_a_malformed_meter_row_writes_nothing_and_names_the_field(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    bad_rows: list[tuple[MeterWrite, str]] = [
        (MeterWrite([{**interval(T0), "start_wall": float("nan")}]), "start_wall nan"),
        (MeterWrite([{**interval(T0), "end_wall": T0}]), "end_wall"),
        (MeterWrite([{**interval(T0), "closed": 1}]), "closed 1: expected true or false"),
        (MeterWrite([], [{**interruption(1, T0, None), "id": "1"}]), "id '1'"),
        (MeterWrite([], [{**interruption(1, T0, None), "cls": None}]), "cls None"),
        (MeterWrite([interval(T0, note=object())]), "expected a JSON object"),
    ]
    for mw, words in bad_rows:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            j.write([("1", "k", "s", "{}")], frozenset(), meter=mw)  # type: ignore[list-item]
    assert table(tmp_path / "j.db", "events") == []
    assert table(tmp_path / "j.db", "meter_intervals") == []
    j.close()


# ---- upsert by key ----


def test_rows_are_upserted_by_key_and_a_closed_interval_is_final(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    j.write([], frozenset(), meter=MeterWrite([interval(T0, closed=False, kwh=1.0)]))
    j.write([], frozenset(), meter=MeterWrite([interval(T0, closed=False, kwh=2.0)]))
    j.write([], frozenset(), meter=MeterWrite([interval(T0, closed=True, kwh=3.0)]))
    # an open row for a closed interval (a replay, a stale writer) never reopens it
    j.write([], frozenset(), meter=MeterWrite([interval(T0, closed=False, kwh=9.0)]))
    j.write([], frozenset(), meter=MeterWrite([], [interruption(1, T0, None)]))
    j.write([], frozenset(), meter=MeterWrite([], [interruption(1, T0, T0 + 600)]))
    j.close()
    assert [(r[0], r[2]) for r in table(path, "meter_intervals")] == [(T0, 1)]
    data = read_meter(path, T0, T0 + IV)
    assert [(i["delivered_kwh"], i["closed"]) for i in data.intervals] == [(3.0, True)]
    assert [(r["id"], r["end_wall"]) for r in data.interruptions] == [(1, T0 + 600)]


# ---- the keeper while the store is down ----


def test_the_keeper_merges_meter_rows_by_key_while_failing_and_lands_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    clock, opener = Clock(), Switchable()
    k = JournalKeeper(path, clock=clock, opener=opener, retry_max_s=1)
    opener.commit_fails = True
    # 3 intervals of scans at 1 s: the open row is rewritten every scan; an interruption
    # starts in the first and ends in the second
    scans = 0
    for n in range(3):
        start = T0 + n * IV
        for s in range(0, int(IV), 30):
            rows = [interval(start, closed=False, kwh=s / 100)]
            if s == 0 and n:
                rows.insert(0, interval(start - IV, closed=True, kwh=9.0 + n))
            irs = []
            if n == 0 and s == 300:
                irs = [interruption(7, start + s, None)]
            if n == 1 and s == 60:
                irs = [interruption(7, T0 + 300, start + s)]
            k.record([], frozenset(), meter=MeterWrite(rows, irs, {"scan": scans}))
            scans += 1
            clock.t += 30
    assert k.problem is not None and "disk is full" in k.problem
    assert sorted(k.pending_intervals) == [T0, T0 + IV, T0 + 2 * IV]  # one row per interval
    assert list(k.pending_interruptions) == [7]
    assert table(path, "meter_intervals") == []
    opener.commit_fails = False
    clock.t += 5
    assert k.flush()
    assert (k.pending_intervals, k.pending_interruptions) == ({}, {})
    k.close()
    data = read_meter(path, T0, T0 + 3 * IV)
    assert [(i["closed"], i["delivered_kwh"]) for i in data.intervals] == [
        (True, 10.0),
        (True, 11.0),
        (False, (IV - 30) / 100),
    ]
    assert [(r["id"], r["end_wall"]) for r in data.interruptions] == [(7, T0 + IV + 60)]
    j = Journal(path)
    assert j.load_state()["meter"] == {"scan": scans - 1}  # the newest memory
    j.close()


def test_the_keepers_pending_meter_rows_are_bounded(tmp_path: Path) -> None:
    clock, opener = Clock(), Switchable()
    k = JournalKeeper(tmp_path / "j.db", clock=clock, opener=opener, max_pending_meter=4)
    opener.commit_fails = True
    for n in range(10):
        k.record([], frozenset(), meter=MeterWrite([interval(T0 + n * IV)]))
        clock.t += 100
    assert sorted(k.pending_intervals) == [T0 + n * IV for n in range(6, 10)]  # the newest
    assert k.dropped_meter == 6
    opener.commit_fails = False
    clock.t += 100
    assert k.flush()
    kinds = [e[1] for e in k.events(limit=10)]
    assert "journal_meter_dropped" in kinds
    k.close()


def test_the_keeper_refuses_a_malformed_meter_row_with_an_event_never_raises(
    tmp_path: Path,
) -> None:
    k = JournalKeeper(tmp_path / "j.db", clock=Clock())
    trip = Event("trip_latched", 1.0, "IL-04", {"hazard": "leak"})
    k.record(
        [trip],
        frozenset({"IL-04"}),
        meter=MeterWrite([{"start_wall": "soon"}, interval(T0)], [], {"ok": True}),
    )
    assert k.problem is None
    ev = k.events(kinds=["journal_meter_refused"])
    assert len(ev) == 1 and "start_wall 'soon'" in str(ev[0][3]["why"])
    k.close()
    # the scan's trip and latch are on disk with the good row: a bad meter row never holds
    # back the safety record
    j = Journal(tmp_path / "j.db")
    assert j.latched() == {"IL-04"} and j.events(kinds=["trip_latched"])
    assert j.load_state() == {"meter": {"ok": True}}
    j.close()
    assert [i["start_wall"] for i in read_meter(tmp_path / "j.db", 0, 2e9).intervals] == [T0]


# ---- read_meter ----


def test_read_meter_reads_a_range(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    rows = [interval(T0 + n * IV) for n in range(8)]
    irs = [
        interruption(1, T0 - 600, T0 + 60),  # crosses the start of the range
        interruption(2, T0 + 1000, T0 + 1200),  # inside
        interruption(3, T0 - 900, T0 - 100),  # ends before
        interruption(4, T0 + 4 * IV, None),  # open, starts at the end: outside [from, to)
        interruption(5, T0 + 3 * IV, None),  # open, starts inside
    ]
    events = [
        (T0 - 1, "trip_latched", "IL-04", "{}"),
        (T0, "trip_latched", "IL-04", '{"hazard": "leak"}'),
        (T0 + 100, "alarm_raised", "IL-04", "{}"),
        (T0 + 4 * IV, "trip_latched", "IL-05", "{}"),
    ]
    j.write(events, frozenset(), meter=MeterWrite(rows, irs))
    j.close()
    data = read_meter(path, T0, T0 + 4 * IV)
    assert [i["start_wall"] for i in data.intervals] == [T0 + n * IV for n in range(4)]
    assert [r["id"] for r in data.interruptions] == [1, 2, 5]
    assert [(e["wall_time"], e["kind"]) for e in data.events] == [
        (T0, "trip_latched"),
        (T0 + 100, "alarm_raised"),
    ]
    assert data.events[0] == {
        "wall_time": T0,
        "kind": "trip_latched",
        "source": "IL-04",
        "detail": {"hazard": "leak"},
    }
    only = read_meter(path, T0, T0 + 4 * IV, kinds=["alarm_raised"])
    assert [e["kind"] for e in only.events] == ["alarm_raised"]
    assert read_meter(path, T0, T0, kinds=[]).events == []


def test_read_meter_refuses_a_bad_range_and_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"to_wall .* expected at or after from_wall"):
        read_meter(tmp_path / "x.db", 10.0, 5.0)
    with pytest.raises(ValueError, match="from_wall nan"):
        read_meter(tmp_path / "x.db", float("nan"), 5.0)
    with pytest.raises(StoreUnreadable, match="no state store there"):
        read_meter(tmp_path / "x.db", 0.0, 5.0)
    (tmp_path / "junk.db").write_text("not a database, just text\n" * 100)
    with pytest.raises(StoreUnreadable, match="cannot read the state store"):
        read_meter(tmp_path / "junk.db", 0.0, 5.0)


# ---- kill -9 ----

WRITER = """
import sys
from pathlib import Path
from controller.journal import Journal, MeterWrite
T0, IV = float(sys.argv[2]), float(sys.argv[3])
j = Journal(Path(sys.argv[1]))
for n in range(100_000):
    start = T0 + (n // 10) * IV  # ten scans per interval; the last one closes it
    row = {"start_wall": start, "end_wall": start + IV, "closed": n % 10 == 9,
           "delivered_kwh": float(n % 10 + 1), "scan": n}
    j.write([(float(n), "scan", "test", "{}")], frozenset(),
            meter=MeterWrite([row], [], {"scan": n}))
    print(n, flush=True)
"""


def test_after_kill_9_the_meters_memory_matches_its_rows_and_no_closed_interval_is_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "heatloop.db"
    acked = kill_writer(WRITER, str(path), repr(T0), repr(IV), after=45)
    j = open_checked(path)
    n = j.load_state()["meter"]["scan"]
    assert n >= acked  # every acknowledged scan is there
    assert len(j.events(limit=10_000)) == n + 1  # and its event with it, no more
    j.close()
    rows = read_meter(path, T0, T0 + 1e6).intervals
    # every interval finished before the kill is closed, whole; the newest row is the
    # memory's scan exactly (one transaction), so a restart continues from both alike
    assert [r["start_wall"] for r in rows] == [T0 + k * IV for k in range(n // 10 + 1)]
    assert all(r["closed"] and r["delivered_kwh"] == 10.0 for r in rows[:-1])
    assert rows[-1]["scan"] == n and rows[-1]["closed"] == (n % 10 == 9)


def test_a_damaged_interval_row_is_shown_in_its_place_and_its_neighbours_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    j.write(
        [], frozenset(), meter=MeterWrite([interval(T0 + n * IV, kwh=n + 1.0) for n in range(5)])
    )
    j.close()
    db = sqlite3.connect(path)
    for n, text in (
        (1, "garbage {"),  # not JSON: the one-array decode fails
        (2, '{"a": 1}, {"b": 2}'),  # two objects where one belongs: would shift the rest
        (3, '{"start_wall": 5, "delivered_kwh": NaN}'),  # not its own start; NaN kept
    ):
        db.execute("UPDATE meter_intervals SET row = ? WHERE start_wall = ?", (text, T0 + n * IV))
    db.commit()
    db.close()
    got = read_meter(path, T0, T0 + 5 * IV).intervals
    assert [r["start_wall"] for r in got] == [T0 + n * IV for n in range(5)]
    assert [r.get("delivered_kwh") for r in (got[0], got[4])] == [1.0, 5.0]
    assert "unreadable" in got[1] and "unreadable" in got[2]
    assert got[3]["delivered_kwh"] != got[3]["delivered_kwh"]  # NaN, as stored
