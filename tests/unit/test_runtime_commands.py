"""People's requests through the scan loop, on a fake clock with a real journal (DESIGN §13).

A request is applied at the next scan, answered only once the journal has its record, bounded per
scan and in number waiting, and everything it leaves standing (forces, bypasses, requests,
setpoints, alarm states) comes back after a restart, ended by wall time when it has expired.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from controller.authority import Answer, OperatorState, Request
from controller.journal import JournalKeeper
from controller.modes import Mode
from controller.runtime import MAX_PER_SCAN, MAX_QUEUED
from tests.unit.test_runtime import FakeClock, Rig, keeper


def req(
    cmd: str, args: dict[str, Any], reason: str = "test", role: str = "engineer", n: int = 1
) -> Request:
    return Request(f"r{n}-{cmd}", "alice", role, cmd, args, reason, via="cli")


def rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM commands ORDER BY id")]
    finally:
        con.close()


async def submitted(rig: Rig, r: Request) -> asyncio.Future[Answer]:
    """Submit as the channel does; the request is queued when this returns."""
    task = asyncio.ensure_future(rig.ctl.submit(r))
    await asyncio.sleep(0)
    return task


async def ask(rig: Rig, r: Request, max_scans: int = 5) -> Answer:
    """Submit as the channel does and scan until answered."""
    task = await submitted(rig, r)
    for _ in range(max_scans):
        await rig.scans(1)
        await asyncio.sleep(0)
        if task.done():
            return task.result()
    raise AssertionError(f"{r.cmd} not answered in {max_scans} scans")


async def test_an_accepted_request_is_answered_only_once_its_record_is_on_disk(
    tmp_path: Path,
) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    seen_on_disk: list[bool] = []
    r = req("force", {"tag": "drycooler_fan_cmd", "value": 61.0, "minutes": 5})
    task = await submitted(rig, r)
    task.add_done_callback(lambda _: seen_on_disk.append(bool(rows(db))))
    await rig.scans(2)
    await asyncio.sleep(0)
    ans = task.result()
    assert ans.accepted, ans
    assert seen_on_disk == [True]  # the record was committed before the asker heard
    (row,) = rows(db)
    assert (row["principal"], row["role"], row["cmd"], row["target"]) == (
        "alice",
        "engineer",
        "force",
        "drycooler_fan_cmd",
    )
    assert row["accepted"] == 1 and row["reason"] == "test"
    assert rig.plc.commanded()["drycooler_fan_cmd"] == 61.0
    st = rig.ctl.status_view()
    assert st["outputs"]["drycooler_fan_cmd"] == {
        "value": 61.0,
        "level": "manual",
        "why": "manual by alice",
    }
    assert any(a["id"] == "FORCE:drycooler_fan_cmd" for a in st["alarms"])


async def test_a_refused_request_changes_nothing_and_is_journalled_with_why(
    tmp_path: Path,
) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    ans = await ask(rig, req("force", {"tag": "heartbeat", "value": 1.0, "minutes": 5}))
    assert not ans.accepted and "heartbeat" in ans.why
    ans = await ask(rig, req("bypass", {"rule": "IL-06", "minutes": 5}, role="operator", n=2))
    assert not ans.accepted and "engineer" in ans.why
    assert rig.ctl.core.operator == OperatorState()  # nothing stands
    assert rig.ctl.status_view()["outputs"]["drycooler_fan_cmd"]["level"] != "manual"
    assert [(r["cmd"], r["accepted"]) for r in rows(db)] == [("force", 0), ("bypass", 0)]
    assert all(r["why"] for r in rows(db))
    assert json.loads(rows(db)[0]["new"]) == {
        "requested": {"tag": "heartbeat", "value": 1.0, "minutes": 5}
    }


async def test_a_flood_is_applied_a_few_per_scan_and_beyond_the_queue_refused_busy() -> None:
    rig = Rig()
    await rig.scans(3)
    n = MAX_QUEUED + 20
    tasks = [
        await submitted(rig, req("setpoint", {"name": "supply_setpoint_c", "value": 30.0}, n=i))
        for i in range(n)
    ]
    await asyncio.sleep(0)
    busy = [t.result() for t in tasks if t.done()]
    assert len(busy) == n - MAX_QUEUED and all("busy" in a.why for a in busy)
    for k in range(1, 4):
        await rig.scans(1)
        await asyncio.sleep(0)
        answered = sum(1 for t in tasks if t.done()) - len(busy)
        assert answered <= k * MAX_PER_SCAN  # never more than MAX_PER_SCAN a scan
        assert len(rig.ctl._queue) == MAX_QUEUED - k * MAX_PER_SCAN
    await rig.scans(MAX_QUEUED // MAX_PER_SCAN + 1)
    await asyncio.sleep(0)
    rest = [t for t in tasks if t.result() not in busy]
    assert len(rest) == MAX_QUEUED and all(t.result().accepted for t in rest)


async def test_a_reset_is_answered_from_the_interlock_engines_verdict(tmp_path: Path) -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    rig.plc.set("leak_reuse", True)
    await rig.until_mode(Mode.LEAK_TRIP)
    wet = await ask(rig, req("reset", {"rules": []}))
    assert not wet.accepted and "IL-04" in wet.why and "cause" in wet.why
    assert rig.ctl.supervisor.latched == {"IL-04"}
    rig.plc.set("leak_reuse", False)
    await rig.scans(2)
    not_latched = await ask(rig, req("reset", {"rules": ["IL-05"]}, n=2))
    assert not not_latched.accepted and "IL-05" in not_latched.why
    dry = await ask(rig, req("reset", {"rules": ["IL-04"]}, n=3))
    assert dry.accepted, dry
    assert rig.ctl.supervisor.latched == frozenset()
    await rig.until_mode(Mode.DRY_COOLER_REJECT, 5)


async def test_forces_bypasses_requests_and_alarm_states_survive_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    for r in (
        req("force", {"tag": "drycooler_fan_cmd", "value": 70.0, "minutes": 30}),
        req("bypass", {"rule": "IL-06", "minutes": 60}),
        req("reject", {"on": True}),
        req("setpoint", {"name": "supply_setpoint_c", "value": 31.5}),
        req("ack", {"alarms": ["FORCE:drycooler_fan_cmd"]}),
    ):
        ans = await ask(rig, r)
        assert ans.accepted, (r, ans)
    alarms = {a["id"]: a["state"] for a in rig.ctl.status_view()["alarms"]}
    assert alarms["FORCE:drycooler_fan_cmd"] == "acknowledged"
    rig.ctl.journal.close()

    # ten minutes later, the same state directory: what stood, stands
    clock2 = FakeClock(clock.t + 600.0)
    again = Rig(clock=clock2, journal=keeper(db, clock2))
    await again.scans(2)
    st = again.ctl.status_view()
    assert [f["tag"] for f in st["forces"]] == ["drycooler_fan_cmd"]
    assert [b["rule"] for b in st["interlocks"]["bypassed"]] == ["IL-06"]
    assert st["reject_requested"] is True and st["setpoints"] == {"supply_setpoint_c": 31.5}
    alarms = {a["id"]: a["state"] for a in st["alarms"]}
    assert alarms["FORCE:drycooler_fan_cmd"] == "acknowledged"
    assert again.plc.commanded()["drycooler_fan_cmd"] == 70.0
    again.ctl.journal.close()

    # two hours later: the force (30 min) and the bypass (60 min) ended, and say so
    clock3 = FakeClock(clock.t + 7200.0)
    third = Rig(clock=clock3, journal=keeper(db, clock3))
    await third.scans(2)
    st = third.ctl.status_view()
    assert st["forces"] == [] and st["interlocks"]["bypassed"] == []
    assert third.events("force_expired") and third.events("bypass_expired")
    assert st["reject_requested"] is True  # a request has no expiry: it stands until withdrawn


async def test_a_step_that_raises_refuses_the_requests_of_its_scan() -> None:
    rig = Rig()
    await rig.scans(3)

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    rig.ctl.supervisor.step = broken  # type: ignore[method-assign]
    ans = await ask(rig, req("reject", {"on": True}))
    assert not ans.accepted and "decision step failed" in ans.why
    assert rig.ctl.core.operator.reject is False


async def test_a_journal_that_cannot_open_still_answers_but_stays_degraded(
    tmp_path: Path,
) -> None:
    """A store that fails keeps the controller in charge: the request is applied and answered
    (its record waits in memory), and reuse stays rejected until the record is on disk."""
    blocker = tmp_path / "heatloop.db"
    blocker.mkdir()  # a directory where the database should be: every open fails
    clock = FakeClock()
    k = JournalKeeper(blocker, clock=clock)
    rig = Rig(clock=clock, journal=k)
    await rig.scans(2)
    ans = await ask(rig, req("reject", {"on": True}))
    assert ans.accepted
    d = rig.ctl.status.decision
    assert d is not None and any("journal" in r for r in d.reject_reasons)
    assert rig.ctl.supervisor.mode is not Mode.NORMAL_REUSE


async def test_status_says_what_reuse_still_waits_for_when_no_cause_is_left() -> None:
    rig = Rig()
    await rig.until_mode(Mode.DRY_COOLER_REJECT)
    st = rig.ctl.status_view()
    assert st["reject_reasons"] == [] and "reuse resumes in about" in st["waiting"]
    from controller.cli import status_lines

    assert any("reuse resumes in about" in line for line in status_lines(st))
    await rig.until_mode(Mode.NORMAL_REUSE)
    assert rig.ctl.status_view()["waiting"] is None


async def test_a_commissioning_input_force_is_journalled_acts_and_expires_by_itself(
    tmp_path: Path,
) -> None:
    """A tool that forced an input and died: the force ends at its expiry all the same, the
    journal says who forced it, why and when it ended, and the real reading is back."""
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    why = "commissioning run 1f2e IL-03"
    ans = await ask(rig, req("force", {"tag": "primary_flow", "value": 2.5, "minutes": 0.05}, why))
    assert ans.accepted, ans
    await rig.scans(2)
    st = rig.ctl.status_view()
    assert st["inputs"]["primary_flow"]["value"] == 2.5
    assert st["inputs"]["primary_flow"]["quality"] == "forced"
    assert [(f["tag"], f["input"]) for f in st["forces"]] == [("primary_flow", True)]
    (row,) = [r for r in rows(db) if r["cmd"] == "force"]
    assert (row["principal"], row["reason"], row["accepted"]) == ("alice", why, 1)

    await rig.scans(int(0.05 * 60 / rig.ctl.site.scan.period_s) + 4)  # past the 3 s expiry
    st = rig.ctl.status_view()
    assert st["forces"] == []
    assert st["inputs"]["primary_flow"]["quality"] != "forced"
    assert st["inputs"]["primary_flow"]["value"] != 2.5  # the plant's own flow again
    (ended,) = rig.events("input_force_expired")
    assert (ended["source"], ended["reason"]) == ("primary_flow", why)
    rig.ctl.journal.close()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        kinds = [k for (k,) in con.execute("SELECT kind FROM events")]
    finally:
        con.close()
    assert "input_force_expired" in kinds
