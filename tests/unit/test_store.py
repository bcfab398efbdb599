"""The state store: a store from the first schema migrates and keeps its latches and events;
a damaged or foreign store stops start-up with one line and is never replaced by an empty one;
an engineer's reset keeps the old file; state, commands, events and the latch set are written
in one transaction, and a write that returned survives a SIGKILL of its process."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from controller import journal as jmod
from controller.journal import (
    COMMAND_COLUMNS,
    SCHEMA_VERSION,
    Journal,
    JournalKeeper,
    StateBusy,
    StateCorrupt,
    command_row,
    event_row,
    open_checked,
    reset_state,
)
from interlocks.engine import Event

ROOT = Path(__file__).resolve().parents[2]
V0 = ROOT / "tests" / "data" / "state" / "v0.db"
# what make_v0.py put in the first-schema file
V0_LATCHED = {"IL-04"}
V0_KINDS = ["mode_changed", "trip_latched", "mode_changed"]  # oldest first


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def schema(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        return {name: " ".join(sql.split()) for name, sql in rows}
    finally:
        db.close()


def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "heatloop.db"
    shutil.copyfile(V0, path)
    return path


def real_store(path: Path, n_events: int = 0) -> Path:
    j = Journal(path)
    j.write(
        [(1.0 + i, "point_invalid", "tank_top_temp", "{}") for i in range(n_events)], frozenset()
    )
    j.close()
    return path


# ---- schema versions and migration ----


def test_the_committed_file_is_the_first_schema() -> None:
    assert user_version(V0) == 0
    assert set(schema(V0)) >= {"latches", "events"} and "state" not in schema(V0)


def test_a_store_from_the_first_schema_migrates_and_keeps_latches_and_events(
    tmp_path: Path,
) -> None:
    path = old_store(tmp_path)
    j = open_checked(path)
    assert j.version == SCHEMA_VERSION == 4
    assert j.latched() == V0_LATCHED
    assert [k for _, k, _, _ in reversed(j.events())] == V0_KINDS
    assert j.events(kinds=["trip_latched"])[0][3] == {"cause": "leak_reuse"}
    assert j.load_state() == {} and j.commands() == []
    j.close()
    assert user_version(path) == SCHEMA_VERSION
    # the migrated store has exactly the tables and indexes of a store built new
    assert schema(path) == schema(real_store(tmp_path / "new.db"))
    assert {"state", "commands", "events_wall_time", "events_kind", "commands_wall_time"} <= set(
        schema(path)
    )
    before = path.read_bytes()
    open_checked(path).close()  # opening a current store changes nothing
    assert path.read_bytes() == before
    keeper = JournalKeeper(path)  # what start-up sees: the old latch, no state yet
    assert keeper.latched() == V0_LATCHED and keeper.state() == {} and keeper.problem is None
    keeper.close()


def test_a_migration_step_that_fails_leaves_the_previous_version_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = old_store(tmp_path)
    broken = (jmod.MIGRATIONS[0], (*jmod.MIGRATIONS[1][:2], "CREATE TABLE half ("))
    monkeypatch.setattr(jmod, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        open_checked(path)
    assert user_version(path) == 0 and "state" not in schema(path)  # the step rolled back
    monkeypatch.undo()
    j = open_checked(path)  # and the real step applies later
    assert j.version == SCHEMA_VERSION and j.latched() == V0_LATCHED
    j.close()


def test_a_missing_store_is_a_first_start_built_complete(tmp_path: Path) -> None:
    path = tmp_path / "state" / "heatloop.db"
    leftover = path.with_name("heatloop.db.new")  # a first start that died half way
    leftover.parent.mkdir()
    leftover.write_bytes(b"half")
    j = open_checked(path)
    assert j.version == SCHEMA_VERSION and j.latched() == frozenset() and j.load_state() == {}
    j.close()
    assert not leftover.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["heatloop.db"]


# ---- damaged and foreign files ----


def random_bytes(p: Path) -> None:
    p.write_bytes(bytes((i * 97 + 13) % 256 for i in range(8192)))


def truncated(p: Path) -> None:
    real_store(p, n_events=2000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])


def page_overwritten(p: Path) -> None:
    real_store(p, n_events=2000)
    data = bytearray(p.read_bytes())
    data[4096 * 3 : 4096 * 3 + 512] = bytes(range(256)) * 2  # a b-tree page's header gone
    p.write_bytes(bytes(data))


def text_file(p: Path) -> None:
    p.write_text("latches: IL-04\n")


def empty_file(p: Path) -> None:
    p.write_bytes(b"")


def newer_version(p: Path) -> None:
    real_store(p)
    db = sqlite3.connect(p)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def negative_version(p: Path) -> None:
    real_store(p)
    db = sqlite3.connect(p)
    db.execute("PRAGMA user_version = -1")
    db.close()


def wrong_events_table(p: Path) -> None:
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE latches (rule_id TEXT PRIMARY KEY, wall_time REAL NOT NULL)")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    db.commit()
    db.close()


def missing_state_table(p: Path) -> None:
    real_store(p)
    db = sqlite3.connect(p)
    db.execute("DROP TABLE state")
    db.commit()
    db.close()


def foreign_database(p: Path) -> None:
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE customers (name TEXT)")
    db.commit()
    db.close()


def log_without_store(p: Path) -> None:
    p.with_name(p.name + "-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(60))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "random bytes": (random_bytes, "is not an SQLite database"),
    "a truncated store": (truncated, "damaged"),
    "an overwritten page": (page_overwritten, "integrity check|damaged"),
    "a text file": (text_file, "is not an SQLite database"),
    "an empty file": (empty_file, "is empty"),
    "a newer schema": (
        newer_version,
        f"schema version {SCHEMA_VERSION + 1} is newer than this software's",
    ),
    "a negative schema version": (negative_version, "schema version -1 is not a heatloop"),
    "a wrong events table": (wrong_events_table, "table 'events' has columns"),
    "a missing state table": (missing_state_table, "table 'state' is missing"),
    "another program's database": (foreign_database, "holds tables customers"),
    "a log without its store": (log_without_store, "is missing but its write-ahead log"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_or_foreign_store_stops_start_up_with_one_line(tmp_path: Path, case: str) -> None:
    make, what = DAMAGE[case]
    path = tmp_path / "heatloop.db"
    make(path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(StateCorrupt) as err:
        open_checked(path)
    line = str(err.value)
    assert "\n" not in line and len(line) < 1000
    assert str(path) in line and re.search(what, line), line
    assert "heatloop run --site SITE --reset-state --reason TEXT" in line
    assert "old file is kept" in line
    # nothing written, nothing replaced by an empty store
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    with pytest.raises(StateCorrupt):  # the keeper stops start-up too (no degraded journal)
        JournalKeeper(path)


def test_permissions_and_directories_are_not_damage(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    path.mkdir()
    with pytest.raises(OSError) as err:
        open_checked(path)
    assert not isinstance(err.value, StateCorrupt)


def test_a_state_value_that_is_not_json_is_damage(tmp_path: Path) -> None:
    path = real_store(tmp_path / "heatloop.db")
    db = sqlite3.connect(path)
    db.execute("INSERT INTO state VALUES ('operator', '{\"forces\": ', 0)")
    db.commit()
    db.close()
    j = open_checked(path)
    with pytest.raises(StateCorrupt, match=r"state\['operator'\] is not JSON"):
        j.load_state()
    j.close()
    with pytest.raises(StateCorrupt, match="operator"):
        JournalKeeper(path)


# ---- reset ----


def test_reset_state_keeps_the_old_files_and_journals_why(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    random_bytes(path)
    wal, shm = path.with_name("heatloop.db-wal"), path.with_name("heatloop.db-shm")
    wal.write_bytes(b"old log")
    shm.write_bytes(b"old index")
    old = {p: p.read_bytes() for p in (path, wal, shm)}
    wall = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
    kept = reset_state(path, "disk replaced after a power cut", "alice", now_wall=wall)
    assert kept == tmp_path / "heatloop.db.20260528T202640Z.bad"
    # the log and index are named after the kept copy, so SQLite opens the copy with its log
    assert kept.read_bytes() == old[path]
    assert Path(f"{kept}-wal").read_bytes() == old[wal]
    assert Path(f"{kept}-shm").read_bytes() == old[shm]
    j = open_checked(path)
    assert j.latched() == frozenset() and j.load_state() == {}
    (w, kind, source, detail), *rest = j.events()
    assert not rest and kind == "state_reset" and source == "journal" and w == wall
    assert detail == {"reason": "disk replaced after a power cut", "who": "alice", "old": str(kept)}
    j.close()
    # a second reset in the same second never overwrites the first kept copy
    again = reset_state(path, "again", "bob", now_wall=wall)
    assert again is not None and again != kept and kept.read_bytes() == old[path]


def test_a_kept_copy_opens_with_its_own_log(tmp_path: Path) -> None:
    """A store whose last commits are still in its log (the process died): the reset keeps
    both, and the kept copy still shows the latch that was only in the log."""
    live = Journal(tmp_path / "live.db")
    live.write([], frozenset({"IL-05"}))  # in the WAL, not yet in the file
    path = tmp_path / "heatloop.db"
    shutil.copyfile(tmp_path / "live.db", path)
    shutil.copyfile(tmp_path / "live.db-wal", tmp_path / "heatloop.db-wal")
    live.close()
    kept = reset_state(path, "test", "alice")
    assert kept is not None
    assert Journal(kept).latched() == {"IL-05"}


def test_reset_state_refuses_while_a_controller_runs_on_the_store(tmp_path: Path) -> None:
    """Moving a running controller's store would let it write on into the kept copy and
    start from the new, empty one next time (its latches forgotten)."""
    path = tmp_path / "heatloop.db"
    running = JournalKeeper(path)
    running.record([], frozenset({"IL-04"}))
    with pytest.raises(StateBusy, match="a running controller holds it"):
        reset_state(path, "wrong window", "alice")
    assert Journal(path).latched() == {"IL-04"}  # nothing moved
    assert not list(tmp_path.glob("*.bad"))
    running.close()
    kept = reset_state(path, "controller stopped", "alice")  # once it has stopped
    assert kept is not None and Journal(kept).latched() == {"IL-04"}


def test_reset_state_refuses_an_empty_reason_and_tolerates_no_store(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    for reason in ("", "   "):
        with pytest.raises(ValueError, match="reason"):
            reset_state(path, reason, "alice")
    with pytest.raises(ValueError, match="who"):
        reset_state(path, "why", "")
    assert not path.exists()  # refused: nothing touched
    assert reset_state(path, "first install", "alice") is None
    j = open_checked(path)
    assert [k for _, k, _, _ in j.events()] == ["state_reset"]
    j.close()


# ---- writing and reading ----


def test_state_is_upserted_by_key_and_loads_back(tmp_path: Path) -> None:
    j = open_checked(tmp_path / "heatloop.db")
    memory = {"valve_fault_age_s": math.nan, "limits": [-math.inf, 1.5], "failed": ["pump_fb_a"]}
    j.write([], frozenset(), state={"supervisor": memory, "operator": {"maintenance": True}})
    j.write([], frozenset(), state={"operator": {"maintenance": False}})
    j.close()
    got = open_checked(tmp_path / "heatloop.db").load_state()
    assert got["operator"] == {"maintenance": False}  # newest wins
    sup = got["supervisor"]
    assert isinstance(sup, dict) and math.isnan(sup["valve_fault_age_s"])
    assert sup["limits"] == [-math.inf, 1.5] and sup["failed"] == ["pump_fb_a"]


def test_a_state_value_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    j = open_checked(tmp_path / "heatloop.db")
    with pytest.raises(TypeError, match=r"state\['operator'\]: expected a JSON value"):
        j.write(
            [(1.0, "trip_latched", "IL-04", "{}")],
            frozenset({"IL-04"}),
            state={"operator": {1, 2}},
        )
    assert j.events() == [] and j.latched() == frozenset() and j.load_state() == {}
    j.close()


def request(cmd: str, args: dict[str, object], reason: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        id="r1", principal="alice", role="engineer", via="cli", cmd=cmd, args=args, reason=reason
    )


def answer(
    accepted: bool, old: object = None, new: object = None, why: str = ""
) -> SimpleNamespace:
    return SimpleNamespace(id="r1", accepted=accepted, why=why, old=old, new=new)


@pytest.mark.parametrize(
    ("cmd", "args", "target"),
    [
        ("force", {"tag": "reuse_valve_cmd", "value": 20.0, "minutes": 5}, "reuse_valve_cmd"),
        ("bypass", {"rule": "IL-06", "minutes": 30}, "IL-06"),
        ("shelve", {"alarm": "HUNTING", "end": True}, "HUNTING"),
        ("setpoint", {"name": "supply_setpoint_c", "value": 45.0}, "supply_setpoint_c"),
        ("reset", {"rules": ["IL-04", "IL-05"]}, "IL-04,IL-05"),
        ("reset", {"rules": []}, "*"),
        ("ack", {"all": True}, "*"),
        ("ack", {"alarms": ["PLC-LINK"]}, "PLC-LINK"),
        ("maintenance", {"on": True}, ""),
        ("force", {"tag": 7}, "7"),  # a refused request: shown as it came
    ],
)
def test_command_rows_name_their_target(cmd: str, args: dict[str, object], target: str) -> None:
    row = command_row(request(cmd, args), answer(True), 5.0)
    assert row[COMMAND_COLUMNS.index("target")] == target
    assert row[COMMAND_COLUMNS.index("cmd")] == cmd


def test_commands_are_journalled_with_who_what_old_new_and_why(tmp_path: Path) -> None:
    j = open_checked(tmp_path / "heatloop.db")
    ok = command_row(
        request("force", {"tag": "reuse_valve_cmd", "value": 20.0, "minutes": 5}, "valve test"),
        answer(True, old=None, new={"value": 20.0, "until_wall": 1300.0}),
        1000.0,
    )
    refused = command_row(
        request("bypass", {"rule": "IL-04", "minutes": 30}, "x" * 10_000),
        answer(False, why="rule 'IL-04': not bypassable (a leak trip is never bypassed)"),
        1001.0,
    )
    j.write([], frozenset(), commands=[ok, refused])
    rows = j.commands()
    j.close()
    assert [r["request_id"] for r in rows] == ["r1", "r1"] and rows[0]["id"] > rows[1]["id"]
    newest, oldest = rows
    assert oldest["principal"] == "alice" and oldest["role"] == "engineer"
    assert oldest["via"] == "cli" and oldest["cmd"] == "force"
    assert oldest["target"] == "reuse_valve_cmd" and oldest["reason"] == "valve test"
    assert oldest["old"] is None and oldest["new"] == {"value": 20.0, "until_wall": 1300.0}
    assert oldest["accepted"] is True and oldest["wall_time"] == 1000.0
    assert newest["accepted"] is False and "not bypassable" in newest["why"]
    assert len(newest["reason"]) <= jmod._TEXT_LIMIT + 1  # a huge reason is stored bounded
    assert set(newest) == {"id", *COMMAND_COLUMNS}
    since = open_checked(tmp_path / "heatloop.db")
    assert [r["cmd"] for r in since.commands(since_wall=1000.5)] == ["bypass"]
    since.close()


def test_command_rows_from_the_operator_layer(tmp_path: Path) -> None:
    authority = pytest.importorskip("controller.authority")
    req = authority.Request(
        id="7", principal="alice", role="operator", cmd="ack", args={"all": True}, reason=""
    )
    ans = authority.Answer(id="7", accepted=True, old=["PLC-LINK"], new=[])
    row = command_row(req, ans, 12.0)
    assert row == (
        12.0,
        "7",
        "alice",
        "operator",
        "cli",
        "ack",
        "*",
        '["PLC-LINK"]',
        "[]",
        "",
        1,
        "",
    )


def test_events_read_newest_first_by_time_and_kind(tmp_path: Path) -> None:
    j = open_checked(tmp_path / "heatloop.db")
    rows = [
        event_row(Event("trip_latched", 0.0, "IL-04", {"n": 1}), 100.0),
        event_row(Event("mode_changed", 0.0, "supervisor", {"n": 2}), 200.0),
        event_row(Event("trip_reset", 0.0, "IL-04", {"n": 3}), 300.0),
    ]
    j.write(rows, frozenset())
    assert [d["n"] for *_, d in j.events()] == [3, 2, 1]
    assert [d["n"] for *_, d in j.events(limit=1)] == [3]
    assert [d["n"] for *_, d in j.events(since_wall=200.0)] == [3, 2]
    assert [d["n"] for *_, d in j.events(kinds=["trip_latched", "trip_reset"])] == [3, 1]
    assert j.events(kinds=[]) == []
    j.db.execute("INSERT INTO events (wall_time, kind, source, detail) VALUES (400, 'x', '', '{')")
    assert j.events(limit=1)[0][3] == {"unreadable": "{"}  # a damaged row never breaks a read
    for bad, field in (
        ({"limit": -1}, "limit"),
        ({"limit": 10**9}, "limit"),
        ({"limit": True}, "limit"),
        ({"since_wall": math.nan}, "since_wall"),
        ({"since_wall": "yesterday"}, "since_wall"),
        ({"kinds": "trip_reset"}, "kinds"),
        ({"kinds": [3]}, "kinds"),
        ({"kinds": ["trip_reset"] * 101}, "kinds"),
    ):
        with pytest.raises(ValueError, match=field):
            j.events(**bad)  # type: ignore[arg-type]
    j.close()


def test_one_write_is_one_transaction(tmp_path: Path) -> None:
    def boom() -> None:
        raise OSError(28, "No space left on device")

    j = open_checked(tmp_path / "heatloop.db")
    j.before_commit = boom
    cmd = command_row(request("maintenance", {"on": True}, "pump swap"), answer(True), 1.0)
    with pytest.raises(OSError, match="No space"):
        j.write(
            [(0.0, "trip_latched", "IL-04", "{}")],
            frozenset({"IL-04"}),
            state={"operator": {"maintenance": True}},
            commands=[cmd],
        )
    j.before_commit = None
    assert j.events() == [] and j.latched() == frozenset()
    assert j.load_state() == {} and j.commands() == []
    j.close()


# ---- durability ----

WRITER = """
import sys
from pathlib import Path
from controller.journal import open_checked
j = open_checked(Path(sys.argv[1]))
i = 0
while True:
    latched = frozenset({"IL-04"}) if i % 2 else frozenset()
    j.write([(float(i), "seq", "test", "{}")], latched, state={"seq": i})
    print(i, flush=True)  # only after write() returned
    i += 1
"""


def kill_writer(script: str, *args: str, after: int) -> int:
    """Run `script` (it prints each write it has returned from, counting from 0) and SIGKILL it
    in the middle of later writes once `after` have returned; the last count it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        acked = -1
        while acked < after:
            line = proc.stdout.readline()
            assert line, f"the writer ended early (exit {proc.poll()})"
            acked = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_a_write_that_returned_survives_sigkill_of_its_process(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    acked = kill_writer(WRITER, str(path), after=40)
    j = open_checked(path)  # the store is whole (the log is recovered, the checks pass)
    seq = j.load_state()["seq"]
    assert isinstance(seq, int) and seq >= acked  # every acknowledged write is there
    # and each write landed whole: its event, its latch set and its state together
    assert sorted(w for w, *_ in j.events(limit=10_000)) == [float(i) for i in range(seq + 1)]
    assert j.latched() == (frozenset({"IL-04"}) if seq % 2 else frozenset())
    j.close()
