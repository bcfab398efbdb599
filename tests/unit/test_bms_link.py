"""The controller's side of the BMS server process (controller/bms_link.py), in-process.

A real Controller on the in-memory PLC and a fake clock, a real journal, a real socketpair; the
child is the test, holding the other end. What the snapshot says (qualities with staleness
applied, wall read times, output levels, setpoints, standing alarms, each event once), how the
child's requests are decided (the role from the users file, never the child; the one command
path; journalled as `bms:<user>` via `bms`), what is refused before any submit (unknown users,
malformed lines, more than MAX_OUTSTANDING waiting), and the supervision of the child (restart
with back-off, a silent child killed, a spawn that fails) without the scan ever waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller import bms_link
from controller.bms_link import (
    MAX_CHILD_LINE,
    MAX_LINE,
    MAX_OUTSTANDING,
    BmsLink,
    encode,
    snapshot,
)
from controller.bms_users import add_user, users_path
from controller.modes import Mode
from controller.runtime import start_bms_link
from plc_io.site import Site
from tests.unit.test_runtime import QUICK, WALL0, FakeClock, Rig, Trace, TraceLog, keeper
from tests.unit.test_runtime_commands import rows

PASSWORD = "correct horse battery"


def site_in(tmp_path: Path, site: Site = QUICK) -> Site:
    return site.model_copy(update={"state": site.state.model_copy(update={"dir": str(tmp_path)})})


class FakeChild:
    """A child process that is the test: it holds its own copy of the child end."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock.dup()
        self.pid = pid
        self.returncode: int | None = None
        self.killed = False
        self._done = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.exit(-9)

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._done.set()
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=2 * MAX_LINE)

    def send(self, msg: Any) -> None:
        assert self.writer is not None
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        self.writer.write(data)

    async def line(self, timeout_s: float = 5.0) -> dict[str, Any]:
        assert self.reader is not None
        async with asyncio.timeout(timeout_s):
            raw = await self.reader.readline()
        assert raw, "the link closed the channel"
        return json.loads(raw)


class Spawner:
    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.fail: BaseException | None = None

    async def __call__(self, sock: socket.socket) -> FakeChild:
        if self.fail is not None:
            raise self.fail
        c = FakeChild(sock, 1000 + len(self.children))
        self.children.append(c)
        return c

    async def next_child(self, n: int, timeout_s: float = 5.0) -> FakeChild:
        async with asyncio.timeout(timeout_s):
            while len(self.children) < n:
                await asyncio.sleep(0.005)
        c = self.children[n - 1]
        await c.open()
        return c


class LinkRig:
    """Controller (fake clock, real journal) + link + the test as the child."""

    def __init__(self, tmp_path: Path, **link_kw: Any) -> None:
        self.site = site_in(tmp_path)
        add_user(users_path(self.site), "olga", "operator", PASSWORD)
        add_user(users_path(self.site), "vic", "viewer", PASSWORD)
        self.db = tmp_path / "heatloop.db"
        clock = FakeClock()
        self.rig = Rig(self.site, clock=clock, journal=keeper(self.db, clock))
        self.ctl = self.rig.ctl
        self.trace = Trace()
        self.spawner = Spawner()
        kw = {
            "alive_timeout_s": 1e6,
            "start_grace_s": 1e6,
            "resend_s": 1e6,
            "stop_wait_s": 0.05,
            **link_kw,
        }
        self.link = BmsLink(self.site, self.ctl, log=TraceLog(self.trace), spawn=self.spawner, **kw)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> FakeChild:
        self.task = asyncio.create_task(self.link.run(self.stop))
        child = await self.spawner.next_child(1)
        hello = await child.line()
        assert hello["t"] == "hello"
        return child

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task

    async def answer(self, child: FakeChild, max_scans: int = 6) -> dict[str, Any]:
        """Scan until the child has an answer; skip snapshots."""
        for _ in range(max_scans):
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await child.line(0.2)
                    if msg["t"] == "answer":
                        return msg
            await self.rig.scans(1)
        raise AssertionError(f"no answer after {max_scans} scans")

    async def snap(self, child: FakeChild) -> dict[str, Any]:
        """The next snapshot the child gets (answers skipped)."""
        while True:
            msg = await child.line()
            if msg["t"] == "snap":
                return msg


@pytest.fixture
async def lr(tmp_path: Path) -> AsyncIterator[LinkRig]:
    r = LinkRig(tmp_path)
    try:
        yield r
    finally:
        await r.close()


def req(rid: str, user: str, cmd: str, args: Any, reason: str = "from the BMS") -> dict[str, Any]:
    return {"t": "req", "id": rid, "user": user, "cmd": cmd, "args": args, "reason": reason}


SET33 = {"name": "supply_setpoint_c", "value": 33.0}


# ---- the snapshot ----


async def test_snapshot_applies_staleness_and_gives_wall_read_times() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    ctl = rig.ctl
    read_at = ctl.status.image["it_supply_temp"].at_s
    snap = snapshot(ctl)
    json.dumps(snap, allow_nan=False)  # strict JSON
    v, q, at = snap["inputs"]["it_supply_temp"]
    assert q == "good" and math.isclose(v, ctl.status.image.value("it_supply_temp"))
    assert at == pytest.approx(WALL0 + read_at)  # the read time as wall time
    # the same image seen later than stale_after_s: every good point is stale, value kept
    later = rig.clock() + ctl.site.plc.stale_after_s + 0.5
    old = snapshot(ctl, now_s=later, wall_s=WALL0 + later)
    assert {q for _, q, _ in old["inputs"].values()} == {"stale"}
    assert old["inputs"]["it_supply_temp"][0] == v
    assert old["inputs"]["it_supply_temp"][2] == pytest.approx(WALL0 + read_at)
    # the billing meter's totaliser is the delivered heat, with its quality; the rest are the
    # meter's lifetime figures (controller.metering)
    assert old["energy"]["HeatDelivered_kWh"] == old["inputs"]["heat_meter_energy"]
    meter = ctl.meter_view()
    assert meter is not None and meter["totals"]["it_energy_kwh"] > 0
    for name, x in (
        ("HeatRejected_kWh", meter["totals"]["rejected_kwh"]),
        ("ItEnergy_kWh", meter["totals"]["it_energy_kwh"]),
        ("HeatLoopAvailability_pct", meter["availability_pct"]),
    ):
        assert snap["energy"][name][:2] == [x, "good"]


async def test_a_controller_without_a_meter_serves_its_figures_as_unmetered() -> None:
    rig = Rig(metering=False)
    await rig.until_mode(Mode.NORMAL_REUSE)
    snap = snapshot(rig.ctl)
    for name in ("HeatRejected_kWh", "ItEnergy_kWh", "HeatLoopAvailability_pct"):
        assert snap["energy"][name] == [None, "none", None]


async def test_snapshot_of_a_lost_plc_serves_no_number_and_an_out_of_range_one_says_so() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    rig.plc.set("tank_top_temp", 500.0)  # beyond the tag's range
    await rig.scans(1)
    snap = snapshot(rig.ctl)
    assert snap["inputs"]["tank_top_temp"][:2] == [500.0, "out_of_range"]
    assert snap["status"]["plc_comms_ok"] is True
    rig.plc.stop()
    await rig.scans(2)
    snap = snapshot(rig.ctl)
    assert snap["status"]["plc_comms_ok"] is False
    for name, (value, quality, _) in snap["inputs"].items():
        assert quality == "comms_lost" and value is None, name
    assert "PLC-LINK" in {a["id"] for a in snap["alarms"]}


async def test_snapshot_status_outputs_setpoints_interlocks_and_standing_alarms() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    rig.ctl.request("setpoint", SET33)
    await rig.scans(1)
    rig.plc.set("leak_reuse", True)
    await rig.until_mode(Mode.LEAK_TRIP)
    ctl, d = rig.ctl, rig.ctl.status.decision
    assert d is not None
    snap = snapshot(ctl)
    st = snap["status"]
    assert st["mode"] == "LEAK_TRIP" and st["trip_latched"] is True
    assert "IL-04" in st["active_interlocks"]
    assert st["mode_since"] == pytest.approx(ctl.status.wall - (d.now_s - d.mode_since_s))
    assert snap["interlocks"]["IL-04"] == [True, True, False]
    assert snap["interlocks"]["IL-06"][1] is False
    # every output but the heartbeat, with the level that set it
    assert set(snap["outputs"]) == {t.name for t in ctl.site.outputs} - {"heartbeat"}
    for name, (value, level, _why) in snap["outputs"].items():
        o = d.outputs[name]
        assert value == o.value and level == o.level.name.lower(), name
    assert snap["outputs"]["secondary_pump_cmd"][:2] == [False, "interlock"]
    assert snap["outputs_wall"] == ctl.status.wall
    assert snap["setpoints"]["supply_setpoint_c"] == [33.0, 33.0]
    # the BMS-level speed: effective = what the output got (the interlock's stop), none asked
    sp = snap["setpoints"].get("secondary_pump_speed_pct")
    if sp is not None:
        assert sp == [d.outputs["secondary_pump_speed_cmd"].value, None]
    alarms = {a["id"]: a for a in snap["alarms"]}
    il04 = alarms["IL-04"]
    assert il04["state"] == "active_unacknowledged" and il04["priority"] == "critical"
    assert il04["since_wall"] is not None and il04["message"]
    assert [a.id for a in ctl.core.alarms.standing()] == [a["id"] for a in snap["alarms"]]


async def test_snapshot_supply_setpoint_is_the_sites_until_set() -> None:
    rig = Rig()
    await rig.scans(2)
    snap = snapshot(rig.ctl)
    assert snap["setpoints"]["supply_setpoint_c"] == [rig.ctl.cfg.sequence.supply_setpoint_c, None]


# ---- requests from the child ----


async def test_unknown_user_is_denied_without_a_submit(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    child.send(req("1", "mallory", "setpoint", SET33))
    ans = await lr.answer(child, max_scans=1)
    assert (ans["id"], ans["ok"], ans["kind"]) == ("1", False, "denied")
    assert "mallory" in ans["why"]
    assert not lr.ctl._queue and rows(lr.db) == []  # never reached the command path
    assert lr.trace.of("log", "bms_request_denied")


async def test_a_viewer_setpoint_is_refused_by_the_permission_table_whatever_the_child_says(
    lr: LinkRig,
) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    msg = req("7", "vic", "setpoint", SET33)
    msg["role"] = "engineer"  # the child's word about roles is not taken
    child.send(msg)
    ans = await lr.answer(child)
    assert (ans["id"], ans["ok"], ans["kind"]) == ("7", False, "denied")
    assert "viewer" in ans["why"]
    assert "supply_setpoint_c" not in lr.ctl.core.operator.setpoints
    (row,) = rows(lr.db)
    assert (row["principal"], row["role"], row["via"], row["accepted"]) == (
        "bms:vic",
        "viewer",
        "bms",
        0,
    )


async def test_an_operator_setpoint_is_accepted_journalled_and_shown(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    child.send(req("a1", "olga", "setpoint", SET33, reason="OPC UA write Setpoints/x"))
    ans = await lr.answer(child)
    assert ans == {"t": "answer", "id": "a1", "ok": True, "why": "", "kind": "",
                   "old": None, "new": 33.0}  # fmt: skip
    assert lr.ctl.core.operator.setpoints["supply_setpoint_c"] == 33.0
    (row,) = rows(lr.db)
    assert (row["principal"], row["role"], row["via"], row["cmd"], row["target"]) == (
        "bms:olga",
        "operator",
        "bms",
        "setpoint",
        "supply_setpoint_c",
    )
    assert row["accepted"] == 1 and row["reason"] == "OPC UA write Setpoints/x"
    assert json.loads(row["new"]) == 33.0
    # the next snapshots: the setpoint in force, and the command told exactly once
    told: list[dict[str, Any]] = []
    for _ in range(3):
        await lr.rig.scans(1)
        snap = await lr.snap(child)
        told += [e for e in snap["events"] if e["kind"] == "command"]
    assert snap["setpoints"]["supply_setpoint_c"] == [33.0, 33.0]
    assert len(told) == 1
    assert told[0]["message"] == "bms:olga setpoint supply_setpoint_c null -> 33"
    assert told[0]["fields"]["via"] == "bms" and told[0]["fields"]["accepted"] is True


async def test_an_out_of_range_setpoint_is_refused_kind_range(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    child.send(req("r", "olga", "setpoint", {"name": "supply_setpoint_c", "value": 90.0}))
    ans = await lr.answer(child)
    assert (ans["ok"], ans["kind"]) == (False, "range")
    child.send(req("t", "olga", "setpoint", {"name": "supply_setpoint_c", "value": "hot"}))
    ans = await lr.answer(child)
    assert (ans["ok"], ans["kind"]) == (False, "type")
    assert "supply_setpoint_c" not in lr.ctl.core.operator.setpoints


async def test_malformed_lines_are_refused_or_logged_and_the_link_goes_on(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    child.send(b"this is not json\n")
    child.send(b"[1, 2, 3]\n")
    child.send(b'{"t": "mystery"}\n')
    child.send(req("x" * 65, "olga", "setpoint", SET33))  # id too long: no usable id
    child.send({"t": "req", "user": "olga", "cmd": "ack", "args": {"all": True}})  # no id
    child.send(b"\n")
    bad = [
        req("b1", "olga", "setpoint", [1, 2]),  # args not an object
        req("b2", 42, "setpoint", SET33),  # user not a string
        req("b3", "olga", None, SET33),  # cmd not a string
        {**req("b4", "olga", "setpoint", SET33), "reason": 5},  # reason not a string
    ]
    for m in bad:
        child.send(m)
    got = [await lr.answer(child, max_scans=1) for _ in bad]
    assert [(a["id"], a["ok"], a["kind"]) for a in got] == [
        (m["id"], False, "invalid") for m in bad
    ]
    assert "req.args" in got[0]["why"] and "req.user" in got[1]["why"]
    complaints = [d for w, n, d in lr.trace.items if w == "log" and n.startswith("bms_bad")]
    assert len(complaints) == 5, complaints
    assert all(len(json.dumps(d, default=str)) < 1000 for d in complaints)  # bounded lines
    assert not lr.ctl._queue and rows(lr.db) == []
    # and the link still serves a good request
    child.send(req("ok", "olga", "ack", {"all": True}))
    ans = await lr.answer(child)
    assert ans["id"] == "ok" and ans["ok"] is True


async def test_a_line_over_the_bound_is_skipped_whole(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    big = b'{"t": "req", "id": "big", "pad": "' + b"x" * MAX_CHILD_LINE + b'"}\n'
    child.send(big + json.dumps(req("after", "olga", "ack", {"all": True})).encode() + b"\n")
    ans = await lr.answer(child, max_scans=20)
    assert ans["id"] == "after" and ans["ok"] is True  # nothing from the long line answered
    assert lr.trace.of("log", "bms_line_too_long")


async def test_more_than_the_outstanding_bound_is_refused_busy(lr: LinkRig) -> None:
    child = await lr.start()
    await lr.rig.scans(2)
    for i in range(MAX_OUTSTANDING + 3):
        child.send(req(f"q{i}", "olga", "ack", {"all": True}))
    busy: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):  # without a scan, only the refusals come back
        while True:
            m = await child.line(0.3)
            if m["t"] == "answer":
                busy.append(m)
    assert [(a["id"], a["kind"]) for a in busy] == [
        (f"q{i}", "busy") for i in range(MAX_OUTSTANDING, MAX_OUTSTANDING + 3)
    ]
    assert len(lr.ctl._queue) == MAX_OUTSTANDING
    answered = []
    for _ in range(MAX_OUTSTANDING):
        answered.append(await lr.answer(child))
        if len(answered) == MAX_OUTSTANDING:
            break
    assert sorted(a["id"] for a in answered) == sorted(f"q{i}" for i in range(MAX_OUTSTANDING))
    assert all(a["ok"] for a in answered)


# ---- events, dropping, supervision ----


async def test_each_mode_change_is_told_once_even_across_dropped_snapshots(
    tmp_path: Path,
) -> None:
    # the child reads nothing for a while: snapshots past the write bound are dropped (the
    # next one sent is the newest), and the events wait for the next one that is sent
    r = LinkRig(tmp_path, write_bound=0)
    try:
        child = await r.start()
        assert child.writer is not None
        child.writer.transport.pause_reading()  # type: ignore[attr-defined]
        await r.rig.until_mode(Mode.NORMAL_REUSE)
        for _ in range(2000):
            await r.rig.scans(1)
            await asyncio.sleep(0.001)
            if r.link.dropped >= 5:
                break
        assert r.link.dropped >= 5  # the scan went on regardless
        r.rig.plc.set("leak_reuse", True)
        await r.rig.until_mode(Mode.LEAK_TRIP)
        for _ in range(5):
            await r.rig.scans(1)
            await asyncio.sleep(0.001)
        scans = r.ctl.status.scans
        child.writer.transport.resume_reading()  # type: ignore[attr-defined]
        modes: list[str] = []
        last_seq = 0
        quiet = 0
        while quiet < 5:  # read everything; scan whenever the child has caught up
            try:
                m = await child.line(0.2)
            except TimeoutError:
                quiet += 1
                await r.rig.scans(1)
                continue
            if m["t"] == "snap":
                assert m["seq"] > last_seq
                last_seq = m["seq"]
                modes += [e["fields"]["to"] for e in m["events"] if e["kind"] == "mode_changed"]
        assert modes.count("LEAK_TRIP") == 1 and modes.count("NORMAL_REUSE") == 1, modes
        assert r.ctl.status.scans >= scans
        assert r.link.status_view()["dropped"] == r.link.dropped
    finally:
        await r.close()


async def test_a_burst_of_events_is_spread_over_snapshots_none_lost_none_twice(
    lr: LinkRig,
) -> None:
    from types import SimpleNamespace

    from controller.bms_link import EVENTS_PER_SNAP
    from interlocks.engine import Event

    child = await lr.start()
    n = 2 * EVENTS_PER_SNAP + 50
    burst = [
        Event("command", 10.0, "ack", {"principal": f"p{i}", "wall": WALL0 + i, "accepted": True})
        for i in range(n)
    ]
    # the burst arrives through the scan's hook (a scan with many answered requests)
    lr.link.on_scan(SimpleNamespace(decision=SimpleNamespace(now_s=10.0), told=burst, wall=WALL0))
    got: list[str] = []
    while len(got) < n:
        snap = await lr.snap(child)
        assert len(snap["events"]) <= EVENTS_PER_SNAP
        assert len(encode(snap)) < bms_link.MAX_LINE
        got += [e["fields"]["principal"] for e in snap["events"]]
    assert got == [f"p{i}" for i in range(n)]  # in order, each once


async def test_a_child_that_exits_is_restarted_with_back_off(tmp_path: Path) -> None:
    r = LinkRig(tmp_path, backoff_s=(0.01, 0.02, 0.04))
    try:
        child = await r.start()
        child.send({"t": "ready", "endpoint": "opc.tcp://127.0.0.1:1/heatloop", "policies": []})
        await asyncio.sleep(0.05)
        view = r.ctl.status_view()["bms"] if r.ctl.bms_view else r.link.status_view()
        assert view["state"] == "running" and view["pid"] == child.pid
        for n in range(2, 6):
            r.spawner.children[-1].exit(1)
            c = await r.spawner.next_child(n)
            assert (await c.line())["t"] == "hello"  # a new child gets its hello first
        delays = [d["after_s"] for d in r.trace.of("log", "bms_restarting")]
        assert delays == [0.01, 0.02, 0.04, 0.04]
        assert r.link.restarts == 4
        assert len(r.trace.of("log", "bms_started")) == 5
        assert len(r.trace.of("log", "bms_exited")) == 4
    finally:
        await r.close()
    assert r.link.status_view()["state"] == "off"


async def test_the_back_off_starts_again_after_a_child_that_served_long_enough(
    tmp_path: Path,
) -> None:
    r = LinkRig(tmp_path, backoff_s=(0.01, 0.02, 0.04), healthy_reset_s=0.2)
    try:
        await r.start()
        for n in range(2, 4):  # two children that never get ready: the back-off grows
            r.spawner.children[-1].exit(1)
            await r.spawner.next_child(n)
        c = r.spawner.children[-1]
        c.send({"t": "ready", "endpoint": "opc.tcp://127.0.0.1:1/heatloop", "policies": []})
        await asyncio.sleep(0.3)  # serving longer than healthy_reset_s
        c.exit(1)
        await r.spawner.next_child(4)
        delays = [d["after_s"] for d in r.trace.of("log", "bms_restarting")]
        assert delays == [0.01, 0.02, 0.01]
    finally:
        await r.close()


def test_the_child_gets_no_secret_from_the_environment() -> None:
    opcua = QUICK.plc.opcua.model_copy(update={"password_env": "PLC_PASS"})
    site = QUICK.model_copy(update={"plc": QUICK.plc.model_copy(update={"opcua": opcua})})
    env = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "PLC_PASS": "plc-secret",
        "HEATLOOP_PLC_PASSWORD": "x",
        "SOME_API_TOKEN": "y",
        "AWS_SECRET_ACCESS_KEY": "z",
        "LANG": "C.UTF-8",
    }
    assert bms_link.child_env(site, env) == {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def test_the_demo_takes_4840_unless_busy_and_makes_one_user_per_role(tmp_path: Path) -> None:
    from controller import demo
    from controller.bms_users import UserStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        other = demo.free_port("127.0.0.1", taken)
        assert other != taken and other > 0
    site = demo.demo_bms_site(demo.demo_story_site(), tmp_path, 4840)
    assert (site.bms.enabled, site.bms.host, site.bms.port) == (True, "127.0.0.1", 4840)
    assert site.state_dir == tmp_path
    made = demo.make_users(site)
    store = UserStore(users_path(site))
    assert sorted(made) == ["engineer", "operator", "viewer"]
    assert len(set(made.values())) == 3
    for name, password in made.items():
        assert store.check(name, password) == name  # the name is the role
        assert store.check(name, password + "x") is None


async def test_a_child_that_asks_and_never_reads_is_ended(tmp_path: Path) -> None:
    r = LinkRig(tmp_path, hard_bound=0, backoff_s=(0.01,))
    try:
        child = await r.start()
        assert child.writer is not None
        child.writer.transport.pause_reading()  # type: ignore[attr-defined]
        line = json.dumps(req("n", "nobody", "ack", {"all": True})).encode() + b"\n"
        for i in range(20_000):  # unknown users: each refused at once, none read
            child.send(line.replace(b'"n"', f'"n{i}"'.encode()))
            if i % 500 == 0:
                await asyncio.sleep(0)
            if child.killed:
                break
        second = await r.spawner.next_child(2)
        assert child.killed and "stopped reading" in r.link.last_error
        assert (await second.line())["t"] == "hello"
    finally:
        await r.close()


async def test_a_silent_child_is_killed_and_restarted(tmp_path: Path) -> None:
    r = LinkRig(tmp_path, alive_timeout_s=0.2, start_grace_s=0.3, backoff_s=(0.01,))
    try:
        child = await r.start()
        for _ in range(3):
            child.send({"t": "alive", "sessions": 0})
            await asyncio.sleep(0.05)
        # then it stops answering (SIGSTOP, a stalled loop): killed, a new one started
        second = await r.spawner.next_child(2, timeout_s=5.0)
        assert child.killed
        assert "no alive" in r.link.last_error
        assert (await second.line())["t"] == "hello"
        await r.rig.scans(3)  # the scan never noticed
    finally:
        await r.close()


async def test_a_spawn_that_fails_is_retried_and_never_reaches_the_controller(
    tmp_path: Path,
) -> None:
    r = LinkRig(tmp_path, backoff_s=(0.01,))
    r.spawner.fail = OSError("no such interpreter")
    task = asyncio.create_task(r.link.run(r.stop))
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if r.link.restarts >= 3:
                break
        assert r.link.restarts >= 3 and "no such interpreter" in r.link.last_error
        await r.rig.scans(3)
        assert r.ctl.status.scans == 3
        r.spawner.fail = None
        child = await r.spawner.next_child(1)
        assert (await child.line())["t"] == "hello"
    finally:
        r.stop.set()
        await task


async def test_on_stop_the_child_gets_eof_then_is_killed_if_it_stays(tmp_path: Path) -> None:
    r = LinkRig(tmp_path, stop_wait_s=0.5)
    child = await r.start()
    r.stop.set()
    assert child.reader is not None
    async with asyncio.timeout(5.0):
        while await child.reader.read(65536):  # snapshots, then EOF
            pass
    assert r.task is not None
    await r.task  # the fake child never exits by itself: killed after the grace
    assert child.killed and r.link.state == "off"


# ---- the runtime's side ----


async def test_scan_hooks_run_after_the_scan_and_a_broken_one_never_stops_it() -> None:
    rig = Rig()
    seen: list[int] = []

    def broken(_st: Any) -> None:
        raise RuntimeError("boom")

    rig.ctl.scan_hooks += [broken, lambda st: seen.append(st.scans)]
    await rig.scans(3)
    assert seen == [1, 2, 3]
    assert rig.events("on_scan_failed")
    assert rig.ctl.status_view()["bms"]["state"] == "off"


async def test_the_link_starts_only_when_the_site_enables_it(tmp_path: Path) -> None:
    rig = Rig()
    stop = asyncio.Event()
    if "enabled" in type(QUICK.bms).model_fields:
        off = QUICK.model_copy(update={"bms": QUICK.bms.model_copy(update={"enabled": False})})
        assert start_bms_link(off, rig.ctl, stop) is None
    task = start_bms_link(site_in(tmp_path), rig.ctl, stop)
    assert task is not None
    stop.set()  # before the controller started: nothing is spawned
    await task
    assert rig.ctl.bms_view is not None and rig.ctl.status_view()["bms"]["state"] == "off"


def test_strict_json_never_carries_nan() -> None:
    assert bms_link.jsonable({"a": math.nan, "b": [math.inf, 1.5], "c": {1, 2}}) == {
        "a": None,
        "b": [None, 1.5],
        "c": [1, 2],
    }
    bounded = bms_link.jsonable({"long": "x" * 10_000, "many": list(range(10_000))})
    assert len(bounded["long"]) <= bms_link.MAX_TEXT + 1
    assert len(bounded["many"]) == bms_link.MAX_ITEMS


def test_every_alarm_state_has_its_protocol_name() -> None:
    from controller.alarms import AlarmState

    assert set(bms_link.ALARM_STATES) == set(AlarmState)
