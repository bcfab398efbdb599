"""The journal keeper never raises into the scan: it queues (bounded), backs off, reports a
problem, catches up exactly once, and never deletes a latch the supervisor has not seen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.journal import CommandRow, Journal, JournalKeeper, StateCorrupt
from interlocks.engine import Event


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ev(i: int) -> Event:
    return Event("point_invalid", float(i), "tank_top_temp", {"n": i})


class Switchable:
    """An opener whose stores fail to open, or to commit, while told to."""

    def __init__(self) -> None:
        self.open_fails = False
        self.commit_fails = False
        self.opens = 0

    def __call__(self, path: Path) -> Journal:
        self.opens += 1
        if self.open_fails:
            raise sqlite3.OperationalError("unable to open database file")
        return Journal(path, before_commit=self._commit)

    def _commit(self) -> None:
        if self.commit_fails:
            raise sqlite3.OperationalError("database or disk is full")


def test_a_directory_for_a_journal_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    path.mkdir()
    k = JournalKeeper(path, clock=Clock())
    assert k.latched() is None  # unknown, not "nothing latched"
    assert k.problem is not None and k.problem.startswith("journal cannot persist")
    k.record([ev(1)], frozenset({"IL-04"}))  # never raises
    assert len(k.pending) == 1


def test_retries_back_off_and_stay_bounded(tmp_path: Path) -> None:
    clock, opener = Clock(), Switchable()
    opener.open_fails = True
    k = JournalKeeper(tmp_path / "j.db", clock=clock, opener=opener, retry_min_s=1, retry_max_s=8)
    for _ in range(400):  # 40 s of scans at 0.1 s
        k.record([], frozenset())
        clock.t += 0.1
    # tries at 0, 1, 3, 7, 15, 23, 31, 39 s: doubling from 1 s, then every 8 s
    assert opener.opens == 8
    assert k.problem is not None


def test_events_wait_in_a_bounded_queue_and_land_exactly_once(tmp_path: Path) -> None:
    clock, opener = Clock(), Switchable()
    k = JournalKeeper(tmp_path / "j.db", clock=clock, opener=opener, max_pending=5, retry_max_s=1)
    k.record([ev(0)], frozenset())
    opener.commit_fails = True
    for i in range(1, 13):
        k.record([ev(i)], frozenset({"IL-04"}))
        clock.t += 0.25
    assert k.problem is not None and "disk is full" in k.problem
    assert len(k.pending) == 5 and k.dropped == 7
    on_disk = Journal(tmp_path / "j.db")
    assert on_disk.latched() == frozenset()  # a failed commit wrote nothing
    opener.commit_fails = False
    clock.t += 2.0
    k.record([], frozenset({"IL-04"}))
    assert k.problem is None and not k.pending
    rows = on_disk.events(50)
    kinds = [kind for _, kind, _, _ in rows]
    assert kinds.count("point_invalid") == 1 + 5  # the first, then the newest five, once each
    assert [d for _, kind, _, d in rows if kind == "journal_events_dropped"] == [{"dropped": 7}]
    assert on_disk.latched() == {"IL-04"}
    on_disk.close()
    k.close()


def test_a_journal_that_opens_late_hands_back_its_latches_and_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    j.write([], frozenset({"IL-05"}))
    j.close()
    clock, opener = Clock(), Switchable()
    opener.open_fails = True
    k = JournalKeeper(path, clock=clock, opener=opener)
    assert k.latched() is None
    opener.open_fails = False
    clock.t += 10.0
    k.record([ev(1)], frozenset())  # the supervisor does not know of IL-05 yet
    assert Journal(path).latched() == {"IL-05"}  # not deleted
    assert k.take_restored() == {"IL-05"} and k.take_restored() == frozenset()
    k.record([], frozenset({"IL-05"}))
    assert Journal(path).latched() == {"IL-05"}
    k.close()


def test_a_store_failure_rolls_back_the_whole_scan(tmp_path: Path) -> None:
    def boom() -> None:
        raise OSError(28, "No space left on device")

    j = Journal(tmp_path / "j.db", before_commit=boom)
    with pytest.raises(OSError, match="No space"):
        j.write([(0.0, "trip_latched", "IL-04", "{}")], frozenset({"IL-04"}))
    j.before_commit = None
    assert j.latched() == frozenset() and j.events() == []
    j.close()


# ---- the whole state and the command audit ----


def cmd_row(i: int) -> CommandRow:
    return (float(i), f"r{i}", "alice", "engineer", "cli", "ack", "*", "null", "null", "", 1, "")


def test_the_keeper_merges_state_while_the_store_is_down_and_writes_it_back(
    tmp_path: Path,
) -> None:
    clock, opener = Clock(), Switchable()
    path = tmp_path / "j.db"
    k = JournalKeeper(path, clock=clock, opener=opener, retry_max_s=1)
    assert k.state() == {}  # a first start
    opener.commit_fails = True
    k.record([ev(1)], frozenset(), {"operator": {"maintenance": True}, "alarms": {"n": 1}})
    clock.t += 2.0
    k.record([], frozenset(), {"operator": {"maintenance": False}}, [cmd_row(1), cmd_row(2)])
    assert k.problem is not None
    assert set(k.pending_state) == {"operator", "alarms"} and len(k.pending_commands) == 2
    opener.commit_fails = False
    clock.t += 2.0
    k.record([], frozenset())
    assert k.problem is None and not k.pending_state and not k.pending_commands
    k.close()
    on_disk = Journal(path)
    assert on_disk.load_state() == {"operator": {"maintenance": False}, "alarms": {"n": 1}}
    assert [c["request_id"] for c in on_disk.commands()] == ["r2", "r1"]  # once each
    on_disk.close()
    again = JournalKeeper(path, clock=clock)
    assert again.state() == {"operator": {"maintenance": False}, "alarms": {"n": 1}}
    again.close()


def test_command_rows_wait_bounded_and_drops_are_journalled(tmp_path: Path) -> None:
    clock, opener = Clock(), Switchable()
    k = JournalKeeper(tmp_path / "j.db", clock=clock, opener=opener, max_pending=3, retry_max_s=1)
    opener.commit_fails = True
    k.record([], frozenset(), commands=[cmd_row(i) for i in range(5)])
    assert len(k.pending_commands) == 3 and k.dropped_commands == 2
    opener.commit_fails = False
    clock.t += 2.0
    k.record([], frozenset())
    assert k.store is not None
    assert [c["request_id"] for c in k.commands()] == ["r4", "r3", "r2"]  # the newest three
    assert [d for _, _, _, d in k.events(kinds=["journal_commands_dropped"])] == [{"dropped": 2}]
    k.close()


def test_a_state_value_that_is_not_json_is_journalled_never_raised(tmp_path: Path) -> None:
    k = JournalKeeper(tmp_path / "j.db", clock=Clock())
    cycle: list[object] = []
    cycle.append(cycle)
    k.record([], frozenset(), {"operator": {"forces": object()}, "alarms": {"n": 2}})
    k.record([], frozenset(), {"recorder": cycle})
    assert k.problem is None
    k.close()
    on_disk = Journal(tmp_path / "j.db")
    # null: that part starts afresh on restart, never from a stale value
    assert on_disk.load_state() == {"operator": None, "alarms": {"n": 2}, "recorder": None}
    whys = [str(d["why"]) for _, kind, _, d in on_disk.events(kinds=["journal_state_refused"])]
    assert len(whys) == 2 and "recorder" in whys[0] and "operator" in whys[1]
    on_disk.close()


def test_a_damaged_store_at_start_up_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    path.write_text("not a database\n")
    with pytest.raises(StateCorrupt, match="is not an SQLite database"):
        JournalKeeper(path, clock=Clock())
    assert path.read_text() == "not a database\n"  # untouched, never replaced


def test_a_store_that_goes_bad_after_a_good_start_is_a_degraded_journal(tmp_path: Path) -> None:
    clock, opener = Clock(), Switchable()
    damaged = {"now": False}

    def checked(p: Path) -> Journal:
        if damaged["now"]:
            raise StateCorrupt(p, "damaged (database disk image is malformed)")
        return opener(p)

    k = JournalKeeper(tmp_path / "heatloop.db", clock=clock, opener=checked, retry_max_s=1)
    assert k.latched() == frozenset() and k.state() == {}
    opener.commit_fails = damaged["now"] = True
    k.record([ev(1)], frozenset({"IL-04"}))  # never raises
    clock.t += 2.0
    k.record([ev(2)], frozenset({"IL-04"}))  # the reopen finds it damaged: still degraded
    assert k.problem is not None and "StateCorrupt" in k.problem and len(k.pending) == 2


def test_a_store_unreadable_at_start_up_has_unknown_state(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    j.write([], frozenset(), state={"operator": {"maintenance": True}})
    j.close()
    clock, opener = Clock(), Switchable()
    opener.open_fails = True
    k = JournalKeeper(path, clock=clock, opener=opener)
    assert k.state() is None and k.latched() is None  # unknown, not empty
    opener.open_fails = False
    clock.t += 10.0
    k.record([], frozenset())
    assert k.problem is None and k.state() is None  # the controller started afresh by then
    k.close()
