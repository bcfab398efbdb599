"""The controller's side of commissioning, on a fake clock with a real journal: the heartbeat hold
of a watchdog proof test, filing commissioning records, the proof-test schedule and its PROOF
alarms, the status additions, and the site keys and channel limit they need.

Expected values come from the parameters (the hold's bound from plc.watchdog_s, due times from
the intervals in days); time is the fake clock's.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import sqlite3
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from controller import commission_record as cr
from controller.alarms import catalogue
from controller.authority import Answer, Request, max_heartbeat_hold_s
from controller.channel import ChannelServer, call, socket_path
from controller.core import DAY_S, PROOF_STEPS, Core, ScanInput
from controller.journal import Journal, read_commission_records
from controller.runtime import CHANNEL_MAX_BYTES
from controller.sitecheck import checked
from interlocks.rules import RULES, RULES_BY_ID
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.site import Site, SiteError, demo_site_text, loads_site
from plc_io.transport import HEARTBEAT
from tests.unit.core_helpers import live
from tests.unit.test_runtime import QUICK, FakeClock, Rig, keeper

WAIT_S = 20.0  # generous bound for real sockets, never a speed assertion


def site_in(tmp_path: Path, base: Site = QUICK) -> Site:
    """The quick test site with its state directory (key, socket) under tmp_path."""
    return base.model_copy(update={"folder": tmp_path})


def req(
    cmd: str, args: Mapping[str, Any], role: str = "engineer", n: int = 1, reason: str = "test"
) -> Request:
    return Request(f"r{n}-{cmd}", "alice", role, cmd, dict(args), reason, via="cli")


async def ask(rig: Rig, r: Request, max_scans: int = 8) -> Answer:
    """Submit as the channel does and scan until answered."""
    task = asyncio.ensure_future(rig.ctl.submit(r))
    await asyncio.sleep(0)
    for _ in range(max_scans):
        await rig.scans(1)
        for _ in range(5):
            await asyncio.sleep(0)
        if task.done():
            return task.result()
    raise AssertionError(f"{r.cmd} not answered in {max_scans} scans")


def command_rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM commands ORDER BY id")]
    finally:
        con.close()


def events(db: Path, kind: str) -> list[dict[str, Any]]:
    store = Journal(db)
    try:
        return [{"source": src, **det} for _w, k, src, det in store.events(1000) if k == kind]
    finally:
        store.close()


def beat(rig: Rig) -> float:
    return float(rig.plc.commanded()[HEARTBEAT])


def step(sid: str, result: str = "passed", method: str = "forced") -> dict[str, Any]:
    return {"id": sid, "kind": "rule", "method": method, "result": result}


def body(target: str = "live", steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A record body as the commissioning tool builds it (docs/commissioning.md)."""
    return {
        "format": cr.FORMAT,
        "run_id": os.urandom(16).hex(),
        "purpose": "proof test",
        "target": target,
        "site": {"name": "demo", "file": "/abs/site.toml", "sha256": "00" * 32},
        "software": {"version": "0.1.0", "python": "3.11"},
        "rule_table_sha256": "11" * 32,
        "engineer": "Alice",
        "os_user": "alice",
        "started_wall": 1.0,
        "ended_wall": 2.0,
        "steps": steps if steps is not None else [step("IL-04")],
        "bypasses_at_start": [],
        "bypasses_at_end": [],
        "bypasses_removed": [],
        "bypass_signoff_reason": None,
        "forces_used": [],
        "outcome": "passed",
        "summary": {"passed": 1, "failed": 0, "aborted": 0, "skipped": 0, "not_testable": 0},
        "comments": "",
        "signoff": {"engineer": "Alice", "statement": "tested", "wall": 2.0},
    }


def alarm_ids(rig: Rig) -> set[str]:
    """The alarms whose condition holds now (a cleared one may stand until acknowledged)."""
    active = {"unacknowledged", "acknowledged"}
    return {a["id"] for a in rig.ctl.status_view()["alarms"] if a["state"] in active}


# ---- the heartbeat hold (watchdog_test) ----


async def test_a_hold_freezes_the_heartbeat_writes_the_rest_and_ends_by_itself(
    tmp_path: Path,
) -> None:
    """The tool that asked may die: the hold ends at its wall-clock expiry all the same."""
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(site_in(tmp_path), clock=clock, journal=keeper(db, clock))
    await rig.scans(4)
    moving = beat(rig)
    await rig.scans(1)
    assert beat(rig) != moving, "the heartbeat counts while no hold stands"
    ans = await ask(rig, req("watchdog_test", {"seconds": 5}))
    assert ans.accepted, ans.why
    assert ans.new == {"seconds": 5.0, "until_wall": pytest.approx(rig.wall() + 5, abs=1.0)}
    until = rig.ctl.status_view()["heartbeat_hold_until_wall"]
    assert until == ans.new["until_wall"]  # type: ignore[index]
    frozen = beat(rig)
    # everything else is written as usual meanwhile: a force lands at the PLC
    force = req("force", {"tag": "drycooler_fan_cmd", "value": 61.0, "minutes": 5}, n=2)
    assert (await ask(rig, force)).accepted
    assert rig.plc.commanded()["drycooler_fan_cmd"] == 61.0
    while rig.wall() < until - 0.5:
        await rig.scans(1)
        assert beat(rig) == frozen, "the heartbeat moved during the hold"
    sent: list[tuple[float, frozenset[str]]] = []  # (heartbeat at the PLC, outputs sent)
    write = rig.transport.write_outputs

    async def noted(values: Mapping[str, Any]) -> Any:
        result = await write(values)
        sent.append((beat(rig), frozenset(result.written)))
        return result

    rig.transport.write_outputs = noted  # type: ignore[method-assign]
    await rig.scans(int(1.0 / QUICK.scan.period_s) + 2)  # past the expiry, nobody asked
    assert beat(rig) != frozen, "the hold did not end by itself"
    assert rig.ctl.status_view()["heartbeat_hold_until_wall"] is None
    assert rig.ctl.core.operator.heartbeat_hold is None
    assert rig.events("heartbeat_resumed")
    # the PLC is given fresh commands through its hold-off, as after any watchdog trip: every
    # output in every pass from the first free beat for watchdog_holdoff_s + watchdog_s
    p = QUICK.plc
    window = int((p.watchdog_holdoff_s + p.watchdog_s) / QUICK.scan.period_s) - 1
    await rig.scans(window)
    every = frozenset(t.name for t in QUICK.outputs)
    resumed = next(i for i, (hb, _) in enumerate(sent) if hb != frozen)
    after = [names for _, names in sent[resumed : resumed + window]]
    assert len(after) == window and all(names == every for names in after), after
    await rig.ctl.close_journal()
    (row,) = [r for r in command_rows(db) if r["cmd"] == "watchdog_test"]
    assert row["accepted"] == 1 and row["principal"] == "alice"
    assert json.loads(row["new"])["seconds"] == 5.0
    (ended,) = events(db, "heartbeat_hold_expired")
    assert ended["who"] == "alice"


async def test_zero_seconds_ends_a_hold_early(tmp_path: Path) -> None:
    rig = Rig(site_in(tmp_path))
    await rig.scans(3)
    assert (await ask(rig, req("watchdog_test", {"seconds": 20}))).accepted
    frozen = beat(rig)
    await rig.scans(2)
    assert beat(rig) == frozen
    ans = await ask(rig, req("watchdog_test", {"seconds": 0}, n=2, reason=""))
    assert ans.accepted and ans.new is None
    await rig.scans(2)
    assert beat(rig) != frozen
    # ending a hold that is not there is no error (a tool cleaning up after an abort)
    assert (await ask(rig, req("watchdog_test", {"seconds": 0}, n=3))).accepted


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_only_an_engineer_may_hold_the_heartbeat(tmp_path: Path, role: str) -> None:
    rig = Rig(site_in(tmp_path))
    await rig.scans(3)
    ans = await ask(rig, req("watchdog_test", {"seconds": 5}, role=role))
    assert not ans.accepted and ans.kind == "denied" and "engineer" in ans.why
    frozen = beat(rig)
    await rig.scans(1)
    assert beat(rig) != frozen


@pytest.mark.parametrize("watchdog_s", [3.0, 12.0])
async def test_a_hold_beyond_the_bound_is_refused_naming_it(
    tmp_path: Path, watchdog_s: float
) -> None:
    site = site_in(tmp_path).model_copy(
        update={"plc": QUICK.plc.model_copy(update={"watchdog_s": watchdog_s})}
    )
    bound = max(30.0, 4 * watchdog_s)
    assert max_heartbeat_hold_s(watchdog_s) == bound
    rig = Rig(site)
    await rig.scans(3)
    for n, bad in enumerate((bound + 0.5, 0.5, -1, "10", True, float("nan")), start=1):
        ans = await ask(rig, req("watchdog_test", {"seconds": bad}, n=n))
        assert not ans.accepted, bad
        assert f"{bound:g}" in ans.why and "args.seconds" in ans.why, ans.why
    assert rig.ctl.core.operator.heartbeat_hold is None
    assert (await ask(rig, req("watchdog_test", {"seconds": bound}, n=9))).accepted


async def test_a_hold_is_refused_while_the_plc_link_is_down(tmp_path: Path) -> None:
    rig = Rig(site_in(tmp_path))
    await rig.scans(3)
    rig.plc.stop()
    await rig.scans(3)
    ans = await ask(rig, req("watchdog_test", {"seconds": 5}))
    assert not ans.accepted and ans.kind == "state" and "link" in ans.why
    assert rig.ctl.core.operator.heartbeat_hold is None


async def test_a_hold_requires_a_reason(tmp_path: Path) -> None:
    rig = Rig(site_in(tmp_path))
    await rig.scans(3)
    ans = await ask(rig, req("watchdog_test", {"seconds": 5}, reason=""))
    assert not ans.accepted and "reason" in ans.why


async def test_a_restarted_controller_beats_even_if_a_hold_stood(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    site = site_in(tmp_path)
    rig = Rig(site, clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    assert (await ask(rig, req("watchdog_test", {"seconds": 30}))).accepted
    await rig.scans(2)
    assert "heartbeat_hold" not in rig.ctl.core.durable(clock(), rig.wall())["operator"]
    assert "heartbeat_hold" in rig.ctl.core.snapshot()["operator"]  # replay does see it
    await rig.ctl.close_journal()
    again = Rig(site, clock=clock, journal=keeper(db, clock), plc=rig.plc)
    assert again.ctl.core.operator.heartbeat_hold is None
    first = beat(again)
    await again.scans(2)
    assert beat(again) != first
    await again.ctl.close_journal()


def test_the_transport_holds_the_heartbeat_only_while_told() -> None:
    clock = FakeClock()
    plc = MemoryPlc(QUICK, clock=clock)
    tx = MemoryTransport(QUICK, plc, clock=clock, sleep=clock.sleep)

    async def passes(n: int) -> list[float]:
        await tx.connect()
        seen = []
        for _ in range(n):
            result = await tx.write_outputs({"drycooler_fan_cmd": 50.0})
            assert HEARTBEAT in result.written
            seen.append(float(plc.commanded()[HEARTBEAT]))
        return seen

    loop = asyncio.new_event_loop()
    try:
        free = loop.run_until_complete(passes(3))
        assert len(set(free)) == 3
        tx.hold_heartbeat(True)
        held = loop.run_until_complete(passes(3))
        assert held == [free[-1]] * 3  # written each pass, unchanged
        tx.hold_heartbeat(False)
        again = loop.run_until_complete(passes(2))
        assert len({free[-1], *again}) == 3
    finally:
        loop.close()


# ---- filing records (commission) ----


async def test_a_record_is_sealed_chained_stored_and_journalled_small(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    site = site_in(tmp_path)
    rig = Rig(site, clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    first = body()
    ans = await ask(rig, req("commission", {"record": first}))
    assert ans.accepted, ans.why
    rec = ans.new
    assert isinstance(rec, dict)
    assert rec["seq"] == 1 and rec["prev_hash"] == "" and rec["filed_by"] == "alice"
    assert rec["controller"]["site_sha256"] == site.source_sha256
    assert rec["controller"]["version"] == rig.ctl.status_view()["version"]
    assert {k: rec[k] for k in first} == first  # the body as sent
    key = cr.public_key_hex(cr.load_or_create_key(site.state_dir))
    assert rec["public_key"] == key
    assert cr.verify_record(rec, key) == []
    ans2 = await ask(rig, req("commission", {"record": body()}, n=2))
    assert ans2.accepted, ans2.why
    assert ans2.new["seq"] == 2 and ans2.new["prev_hash"] == rec["hash"]  # type: ignore[index]
    await rig.ctl.close_journal()
    stored = read_commission_records(db)
    assert [r["hash"] for r in stored] == [rec["hash"], ans2.new["hash"]]  # type: ignore[index]
    assert cr.verify_chain(stored, key) == []
    rows = [r for r in command_rows(db) if r["cmd"] == "commission"]
    assert [r["target"] for r in rows] == [first["run_id"], ans2.new["run_id"]]  # type: ignore[index]
    assert json.loads(rows[0]["new"]) == {"seq": 1, "hash": rec["hash"]}
    assert all(len(r["new"]) < 200 for r in rows)  # never the whole record


async def test_malformed_records_are_refused_invalid_and_nothing_is_filed(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(site_in(tmp_path), clock=clock, journal=keeper(db, clock))
    await rig.scans(3)
    no_steps = body()
    del no_steps["steps"]
    nan = body()
    nan["started_wall"] = float("nan")
    sealed_already = {**body(), "seq": 7}
    huge = body()
    huge["comments"] = "x" * (cr.MAX_BYTES + 1)
    bad: list[object] = [
        "not an object",
        [1, 2],
        {**body(), "format": "heatloop-commissioning/0"},
        no_steps,
        nan,
        sealed_already,
        huge,
    ]
    for n, b in enumerate(bad, start=1):
        ans = await ask(rig, req("commission", {"record": b}, n=n))
        assert not ans.accepted and ans.kind == "invalid", (n, ans)
        assert "\n" not in ans.why and len(ans.why) <= 600
    ans = await ask(rig, req("commission", {"record": body(), "extra": 1}, n=20))
    assert not ans.accepted and "record" in ans.why
    await rig.ctl.close_journal()
    assert read_commission_records(db) == []
    assert len([r for r in command_rows(db) if r["cmd"] == "commission"]) == len(bad) + 1


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_only_an_engineer_may_file_a_record(tmp_path: Path, role: str) -> None:
    rig = Rig(site_in(tmp_path), journal=keeper(tmp_path / "heatloop.db", FakeClock()))
    await rig.scans(2)
    ans = await ask(rig, req("commission", {"record": body()}, role=role))
    assert not ans.accepted and ans.kind == "denied" and "engineer" in ans.why


async def test_a_journal_that_cannot_write_refuses_the_record_saying_so(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    k = keeper(db, clock)
    rig = Rig(site_in(tmp_path), clock=clock, journal=k)
    await rig.scans(2)
    k.problem = "journal cannot persist: OSError: disk full"
    ans = await ask(rig, req("commission", {"record": body()}))
    assert not ans.accepted and ans.kind == "state"
    assert "journal" in ans.why and "not filed" in ans.why and "copy" in ans.why


async def test_filing_does_not_hold_up_the_scan_and_the_scan_answers_meanwhile(
    tmp_path: Path,
) -> None:
    """The seal and the store run in the offload (a worker thread in service); a scan with a
    filing in flight still writes outputs."""
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(site_in(tmp_path), clock=clock, journal=keeper(db, clock))
    gate = asyncio.Event()
    calls: list[str] = []

    async def slow(fn: Any) -> Any:
        calls.append(getattr(fn, "func", fn).__name__)
        if getattr(fn, "func", None) is not None and fn.func.__name__ == "_seal_and_store":
            await gate.wait()
        return fn()

    rig.ctl.offload = slow
    await rig.scans(2)
    task = asyncio.ensure_future(rig.ctl.submit(req("commission", {"record": body()})))
    await asyncio.sleep(0)
    before = beat(rig)
    await rig.scans(3)
    assert beat(rig) != before and not task.done()
    gate.set()
    for _ in range(5):
        await rig.scans(1)
        await asyncio.sleep(0)
    assert task.result().accepted
    assert "_seal_and_store" in calls


# ---- the proof-test schedule ----


def old_store(db: Path, created_wall: float) -> None:
    """A state store created at `created_wall` (as the controller writes it at first open)."""
    store = Journal(db)
    try:
        store.write([], frozenset(), {"created_wall": created_wall})
    finally:
        store.close()


async def test_created_wall_is_written_once_at_first_open(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    site = site_in(tmp_path)
    rig = Rig(site, clock=clock, journal=keeper(db, clock))
    created = rig.ctl.created_wall
    assert created == pytest.approx(rig.wall())
    await rig.scans(2)
    await rig.ctl.close_journal()
    clock.t += 1000.0
    again = Rig(site, clock=clock, journal=keeper(db, clock))
    assert again.ctl.created_wall == created
    await again.ctl.close_journal()


async def test_overdue_proof_tests_alarm_and_a_live_pass_clears_one_a_sim_pass_does_not(
    tmp_path: Path,
) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    site = site_in(tmp_path)
    first_days = site.commissioning.first_test_days
    rig_wall0 = 1.8e9
    old_store(db, rig_wall0 - (first_days + 1) * DAY_S)  # the first tests fell due a day ago
    rig = Rig(site, clock=clock, journal=keeper(db, clock))
    await rig.scans(2)
    proof = {f"PROOF:{s}" for s in PROOF_STEPS}
    assert proof <= alarm_ids(rig)
    st = rig.ctl.status_view()["proof_tests"]
    assert set(st) == set(PROOF_STEPS)
    assert st["IL-04"]["overdue"] is True and st["IL-04"]["last_passed_wall"] is None
    assert st["IL-04"]["interval_days"] == site.commissioning.proof_test_days
    alarm = next(a for a in rig.ctl.status_view()["alarms"] if a["id"] == "PROOF:IL-04")
    assert alarm["priority"] == "low" and "never passed live" in alarm["detail"]

    sim = body("sim", [step("IL-04", method="sim"), step("WD", method="heartbeat_hold")])
    assert (await ask(rig, req("commission", {"record": sim}))).accepted
    await rig.scans(2)
    assert "PROOF:IL-04" in alarm_ids(rig) and "PROOF:WD" in alarm_ids(rig)

    failed = body("live", [step("IL-05", result="failed")])
    live = body("live", [step("IL-04", method="physical"), step("WD", method="heartbeat_hold")])
    assert (await ask(rig, req("commission", {"record": failed}, n=2))).accepted
    ans = await ask(rig, req("commission", {"record": live}, n=3))
    assert ans.accepted
    await rig.scans(2)
    ids = alarm_ids(rig)
    assert "PROOF:IL-04" not in ids and "PROOF:WD" not in ids
    assert proof - {"PROOF:IL-04", "PROOF:WD"} <= ids  # IL-05 failed: still overdue
    st = rig.ctl.status_view()["proof_tests"]
    filed = ans.new["filed_wall"]  # type: ignore[index]
    assert st["IL-04"]["last_passed_wall"] == filed
    assert st["IL-04"]["due_wall"] == filed + site.commissioning.proof_test_days * DAY_S
    assert st["IL-04"]["overdue"] is False
    await rig.ctl.close_journal()

    # a restart reads the schedule back from the journal's records
    again = Rig(site, clock=clock, journal=keeper(db, clock))
    await again.scans(2)
    ids = alarm_ids(again)
    assert "PROOF:IL-04" not in ids and "PROOF:IL-05" in ids
    await again.ctl.close_journal()


async def test_a_pass_falls_due_again_after_its_interval(tmp_path: Path) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    days = 2
    site = loads_site(
        demo_site_text()
        + f'\n[commissioning]\n[commissioning.proof_test_days_by_rule]\n"IL-04" = {days}\n',
        "<test>",
        tmp_path,
    )
    site = site.model_copy(update={"control": QUICK.control})
    rig = Rig(site, clock=clock, journal=keeper(db, clock))
    await rig.scans(2)
    assert not {a for a in alarm_ids(rig) if a.startswith("PROOF:")}  # a new store: not due
    ans = await ask(rig, req("commission", {"record": body()}))
    assert ans.accepted
    filed = ans.new["filed_wall"]  # type: ignore[index]
    st = rig.ctl.status_view()["proof_tests"]
    assert st["IL-04"]["interval_days"] == days
    assert st["IL-04"]["due_wall"] == filed + days * DAY_S
    rig.wall0 += days * DAY_S + 60.0  # the wall clock moves two days on
    await rig.scans(int(6.0 / site.scan.period_s))  # the schedule is looked at every few s
    ids = alarm_ids(rig)
    assert "PROOF:IL-04" in ids
    # every other step never passed live; the store is 2 days old, first tests due at 30
    assert ids & {f"PROOF:{s}" for s in PROOF_STEPS} == {"PROOF:IL-04"}
    await rig.ctl.close_journal()


def test_proof_alarms_are_in_the_catalogue_low_in_their_own_group() -> None:
    site = QUICK
    defs = catalogue(RULES, site.inputs, site.outputs)
    for s in PROOF_STEPS:
        d = defs[f"PROOF:{s}"]
        assert d.priority.name == "LOW" and d.group == "proof test"
    assert (*(r.id for r in RULES), "WD") == PROOF_STEPS


def test_a_replayed_core_sees_the_same_proof_alarms_from_its_snapshot() -> None:
    core = Core(QUICK)
    core.proof_overdue = {"IL-04": "never passed live"}
    back = Core.from_snapshot(QUICK, json.loads(json.dumps(core.snapshot())))
    assert back.proof_overdue == core.proof_overdue
    assert Core.from_snapshot(QUICK, Core(QUICK).snapshot()).proof_overdue == {}


# ---- the site keys ----


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("proof_test_days = 0", "commissioning.proof_test_days"),
        ('proof_test_days = "365"', "commissioning.proof_test_days"),
        ("proof_test_days = 3651", "commissioning.proof_test_days"),
        ("first_test_days = -1", "commissioning.first_test_days"),
        ("proof_test_days = 1.5", "commissioning.proof_test_days"),
        ("typo_days = 3", "commissioning.typo_days"),
        ('proof_test_days_by_rule = {"IL-04" = 0}', "commissioning.proof_test_days_by_rule"),
        ('proof_test_days_by_rule = {"IL-04" = "x"}', "commissioning.proof_test_days_by_rule"),
    ],
)
def test_bad_schedule_values_are_refused_naming_the_key(toml: str, key: str) -> None:
    with pytest.raises(SiteError) as e:
        loads_site(demo_site_text() + f"\n[commissioning]\n{toml}\n")
    assert len(e.value.problems) == 1
    assert str(e.value.problems[0]).startswith(key), str(e.value)


def test_an_unknown_step_id_in_the_schedule_stops_start_up() -> None:
    site = loads_site(
        demo_site_text() + '\n[commissioning.proof_test_days_by_rule]\n"IL-99" = 10\n"WD" = 90\n'
    )
    with pytest.raises(SiteError) as e:
        checked(site, "<test>")
    (p,) = e.value.problems
    assert "IL-99" in str(p) and "WD" in str(p) and "IL-01" in str(p)
    ok = loads_site(demo_site_text() + '\n[commissioning.proof_test_days_by_rule]\n"WD" = 90\n')
    assert checked(ok, "<test>").commissioning.interval_days("WD") == 90


# ---- status additions ----


async def test_status_shows_inputs_site_hash_version_and_hold(tmp_path: Path) -> None:
    text = demo_site_text()
    site = loads_site(text, "<test>", tmp_path).model_copy(update={"control": QUICK.control})
    assert site.source_sha256 == hashlib.sha256(text.encode()).hexdigest()
    rig = Rig(site)
    st = rig.ctl.status_view()
    assert all(v["valid"] is False for v in st["inputs"].values())  # no scan yet
    await rig.scans(3)
    rig.plc.set("tank_top_temp", float("nan"))
    await rig.scans(2)
    st = rig.ctl.status_view()
    assert st["site_sha256"] == site.source_sha256
    assert isinstance(st["version"], str) and st["version"]
    assert st["heartbeat_hold_until_wall"] is None
    assert set(st["inputs"]) == {t.name for t in site.inputs}
    sup = st["inputs"]["tank_top_temp"]
    assert sup["valid"] is False and sup["reason"] and sup["value"] != sup["value"]  # NaN
    ret = st["inputs"]["it_return_temp"]
    assert ret == {"value": ret["value"], "quality": "good", "valid": True, "reason": ""}
    json.dumps(st, default=str)


# ---- the channel's limit ----


async def test_only_a_record_may_use_the_large_message_limit(tmp_path: Path) -> None:
    got: list[Request] = []

    async def submit(r: Request) -> Answer:
        got.append(r)
        return Answer(r.id, True, "", None, {"seq": 1})

    async def read(cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        return {"cmd": cmd}

    srv = ChannelServer(
        socket_path(tmp_path),
        {"alice": "engineer"},
        submit,
        read,
        peer=lambda _s: (1001, "alice"),
        max_bytes=CHANNEL_MAX_BYTES,
    )
    await srv.start()
    try:
        big = body()
        big["comments"] = "x" * (900 * 1024)
        reply = await asyncio.to_thread(call, srv.path, "commission", {"record": big}, "", WAIT_S)
        assert reply["ok"] is True and len(got) == 1
        assert got[0].args["record"] == big
        for cmd in ("force", "status"):
            reply = await asyncio.to_thread(call, srv.path, cmd, {"pad": "y" * 20_000}, "", WAIT_S)
            assert reply["ok"] is False and "16384" in reply["why"] and "commission" in reply["why"]
        assert len(got) == 1
        over = copy.deepcopy(big)
        over["comments"] = "x" * CHANNEL_MAX_BYTES
        reply = await asyncio.to_thread(call, srv.path, "commission", {"record": over}, "", WAIT_S)
        assert reply["ok"] is False and "larger than" in reply["why"]
    finally:
        await srv.close()
    assert len(got) == 1


async def test_a_record_with_an_overlong_reason_is_refused_and_journalled_bounded(
    tmp_path: Path,
) -> None:
    db = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(site_in(tmp_path), clock=clock, journal=keeper(db, clock))
    await rig.scans(2)
    ans = await ask(rig, req("commission", {"record": body()}, reason="r" * 100_000))
    assert not ans.accepted and ans.kind == "invalid" and "reason" in ans.why
    await rig.ctl.close_journal()
    (row,) = [r for r in command_rows(db) if r["cmd"] == "commission"]
    assert len(row["reason"]) <= 500
    assert all(len(json.dumps(d)) < 2000 for d in rig.events("command_refused"))


def _steps(core: Core, seconds: float, **changes: Any) -> float:
    period = QUICK.scan.period_s
    t = 0.0
    for i in range(int(seconds / period)):
        t = i * period
        core.step(ScanInput(live(t, **changes), t, 1.8e9 + t, True))
    return t + period


def _hold(core: Core, t: float, seconds: float = 5, **changes: Any) -> Answer:
    r = req("watchdog_test", {"seconds": seconds})
    result = core.step(ScanInput(live(t, **changes), t, 1.8e9 + t, True, requests=(r,)))
    return result.answers[0]


def test_a_hold_during_a_leak_trip_is_allowed_the_safe_values_isolate_as_the_trip_does() -> None:
    core = Core(QUICK, 0.0, 1.8e9)
    t = _steps(core, 5.0, leak_reuse=True)
    assert core.last is not None and "IL-04" in core.last.active
    ans = _hold(core, t, leak_reuse=True)
    assert ans.accepted, ans.why
    safe = core.cfg.safe
    for rule in ("IL-04",):
        for effect in RULES_BY_ID[rule].forces:  # each of the trip's outputs is its safe value
            assert effect.value == safe[effect.output], effect


def test_a_hold_is_refused_while_an_interlock_holds_an_output_off_its_safe_value() -> None:
    """IL-09 holds the fans at minimum against a freeze; the PLC's safe value is full speed."""
    freeze = {"ambient_temp": -10.0, "drycooler_out_temp": 3.0, "it_power": 10.0}
    core = Core(QUICK, 0.0, 1.8e9)
    t = _steps(core, RULES_BY_ID["IL-09"].delay_s + 5.0, **freeze)
    assert core.last is not None and "IL-09" in core.last.active
    ans = _hold(core, t, **freeze)
    assert not ans.accepted and ans.kind == "state"
    assert "drycooler_fan_cmd" in ans.why and "safe values" in ans.why
    assert core.operator.heartbeat_hold is None
    # ending a hold is never refused
    end = req("watchdog_test", {"seconds": 0}, n=2)
    result = core.step(ScanInput(live(t, **freeze), t, 1.8e9 + t, True, requests=(end,)))
    assert result.answers[0].accepted


def test_a_hold_ends_at_once_when_such_an_interlock_starts_during_it() -> None:
    freeze = {"ambient_temp": -10.0, "drycooler_out_temp": 3.0, "it_power": 10.0}
    core = Core(QUICK, 0.0, 1.8e9)
    delay = RULES_BY_ID["IL-09"].delay_s
    t = _steps(core, delay - 10.0, **freeze)  # freezing, IL-09 not yet past its delay
    assert core.last is not None and "IL-09" not in core.last.active
    assert _hold(core, t, max_heartbeat_hold_s(QUICK.plc.watchdog_s), **freeze).accepted
    period = QUICK.scan.period_s
    ended = []
    for _ in range(int(20.0 / period)):
        t += period
        result = core.step(ScanInput(live(t, **freeze), t, 1.8e9 + t, True))
        ended += [e for e in result.events if e.kind == "heartbeat_hold_ended"]
        if core.operator.heartbeat_hold is None:
            break
    assert core.last is not None and "IL-09" in core.last.active
    assert core.operator.heartbeat_hold is None
    (e,) = ended
    assert e.detail["who"] == "alice" and "drycooler_fan_cmd" in e.detail["why"]


async def test_a_controller_without_a_journal_refuses_a_record_at_once(tmp_path: Path) -> None:
    rig = Rig(site_in(tmp_path))
    await rig.scans(2)
    ans = await ask(rig, req("commission", {"record": body()}))
    assert not ans.accepted and ans.kind == "state" and "journal" in ans.why


async def test_a_flood_of_large_messages_is_refused_and_the_channel_goes_on(
    tmp_path: Path,
) -> None:
    """Every client sends a line just under the 2 MiB limit for a command that may not be
    large: each is refused in one line, none reaches the controller, and the channel answers
    afterwards. At most max_clients lines of max_bytes are buffered at once, and one is parsed
    at a time (the parse is synchronous), so the memory a flood can take is bounded."""
    got: list[Request] = []

    async def submit(r: Request) -> Answer:
        got.append(r)
        return Answer(r.id, True)

    async def read(cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        return {"cmd": cmd}

    srv = ChannelServer(
        socket_path(tmp_path),
        {"alice": "engineer"},
        submit,
        read,
        peer=lambda _s: (1001, "alice"),
        max_bytes=CHANNEL_MAX_BYTES,
        rate_per_s=1000.0,
        burst=1000.0,
        user_rate_per_s=1000.0,
        user_burst=1000.0,
    )
    await srv.start()
    pad = "z" * (CHANNEL_MAX_BYTES - 200)
    loop = asyncio.get_running_loop()
    # the clients in threads of their own: the server's peer lookups use the default executor
    pool = ThreadPoolExecutor(srv.max_clients)
    try:
        replies = await asyncio.gather(
            *(
                loop.run_in_executor(pool, call, srv.path, "force", {"pad": pad}, "", WAIT_S)
                for _ in range(srv.max_clients)
            )
        )
        assert all(r["ok"] is False for r in replies), [r["why"][:80] for r in replies]
        assert all("16384" in r["why"] or r["why"].startswith("busy") for r in replies), replies
        assert got == []
        reply = await asyncio.to_thread(call, srv.path, "status", {}, "", WAIT_S)
        assert reply["ok"] is True
    finally:
        pool.shutdown()
        await srv.close()
