"""One conformance suite for every PLC transport: the in-memory fake, Modbus TCP and OPC UA.

Invariant: a transport never raises for comms and never serves a value as good that it did not
just read; what it writes is exactly the changed outputs plus the heartbeat, and everything
again after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from asyncua import ua
from structlog.testing import capture_logs

from controller.alarms import AlarmState
from controller.core import ScanResult
from controller.modes import REUSE_MODES
from plc_io.image import ProcessImage, Quality
from plc_io.transport import LinkState, UnknownTagError

try:  # tests/hil may or may not be a package
    from tests.hil.conformance import Controller, Rig, conformance_site
except ImportError:
    from conformance import Controller, Rig, conformance_site  # type: ignore[no-redef]

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="module")]

KINDS = ["memory", "modbus", "opcua", "opcua-poll"]
# cases about OPC UA's own features (variant types, nodes) run on its two transports only
OPCUA_ONLY = pytest.mark.parametrize("rig", ["opcua", "opcua-poll"], indirect=True)
SITE = conformance_site()
TIMEOUT_S = SITE.plc.timeout_s
INPUTS = [t.name for t in SITE.inputs]
OUTPUTS = [t.name for t in SITE.outputs]
COMMANDS = {k: v for k, v in SITE.safe_outputs().items() if k != "heartbeat"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=KINDS)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    r = Rig(request.param, SITE)
    await r.start()
    yield r
    await r.close()


async def connected(t: Any, within_s: float = 30.0) -> None:
    """Connect, and while the attempt failed retry (at the transport's own back-off): on a
    machine whose cores are busy elsewhere an OPC UA connect can outlast its budget once."""
    deadline = time.monotonic() + within_s
    await t.connect()
    while t.health.state is LinkState.LOST and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        await t.connect()


@pytest_asyncio.fixture(loop_scope="module")
async def tx(rig: Rig) -> AsyncIterator[Any]:
    rig.clear_all()
    t = rig.transport()
    await connected(t)
    yield t
    await t.close()
    rig.clear_all()


async def until(tx: Any, pred: Any, within_s: float) -> tuple[ProcessImage, float]:
    """Read until `pred(image)` holds; return the image and the time it took."""
    t0 = time.monotonic()
    while True:
        img = await tx.read_inputs()
        if pred(img) or time.monotonic() - t0 > within_s:
            return img, time.monotonic() - t0
        await asyncio.sleep(0.02)


def all_q(img: ProcessImage, q: Quality) -> bool:
    return all(img[n].quality is q for n in INPUTS)


def none_good(img: ProcessImage) -> bool:
    return not any(img[n].quality in (Quality.GOOD, Quality.STALE) for n in INPUTS)


async def test_reads_every_input_good(tx: Any) -> None:
    img, _ = await until(tx, lambda i: all_q(i, Quality.GOOD), 2.0)
    assert {n: img[n].quality for n in INPUTS} == dict.fromkeys(INPUTS, Quality.GOOD)
    assert tx.health.state is LinkState.OK
    now = time.monotonic()
    assert all(now - 1.0 < img[n].at_s <= now for n in INPUTS)
    assert isinstance(img.value("leak_primary"), bool)
    assert isinstance(img.value("it_supply_temp"), float)


async def test_writes_only_changed_outputs(rig: Rig, tx: Any) -> None:
    r = await tx.write_outputs(COMMANDS)
    assert not r.failed and set(r.written) == set(OUTPUTS)  # first pass: all, plus heartbeat
    n0 = tx.health.requests
    r = await tx.write_outputs(COMMANDS)
    assert r.written == ("heartbeat",) and not r.failed
    assert tx.health.requests - n0 == 1
    n0 = tx.health.requests
    r = await tx.write_outputs({**COMMANDS, "reuse_valve_cmd": 42.0, "secondary_pump_cmd": True})
    assert set(r.written) == {"reuse_valve_cmd", "secondary_pump_cmd", "heartbeat"}
    # memory and Modbus: one FC16 (0), one FC15, then the heartbeat's own FC16 (5);
    # OPC UA: one Write of the commands, then the heartbeat's own Write
    assert tx.health.requests - n0 == (2 if rig.is_opcua else 3)
    cmd = rig.plc.commanded()
    assert cmd["reuse_valve_cmd"] == pytest.approx(42.0)
    assert cmd["secondary_pump_cmd"] is True
    back = await tx.read_outputs()
    assert set(back) == set(OUTPUTS) and back["heartbeat"].quality is Quality.GOOD


async def test_heartbeat_written_every_pass(rig: Rig, tx: Any) -> None:
    beats = []
    for _ in range(5):
        r = await tx.write_outputs(COMMANDS)
        assert "heartbeat" in r.written
        beats.append(rig.plc.commanded()["heartbeat"])
    assert len(set(beats)) == 5  # it changes every pass, so the PLC watchdog sees it alive
    r = await tx.write_outputs({"heartbeat": 7.0})
    assert r.written == ("heartbeat",) and rig.plc.commanded()["heartbeat"] == 7.0


async def test_nan_is_refused_and_unknown_tags_raise(rig: Rig, tx: Any) -> None:
    await tx.write_outputs(COMMANDS)
    beat = rig.plc.commanded()["heartbeat"]
    r = await tx.write_outputs({"reuse_valve_cmd": math.nan, "secondary_pump_cmd": True})
    assert "reuse_valve_cmd" in r.failed and "reuse_valve_cmd" not in r.written
    assert "secondary_pump_cmd" in r.written  # the rest of the pass goes on...
    # ... but a command that did not reach the PLC withholds the heartbeat
    assert r.failed["heartbeat"].startswith("withheld: reuse_valve_cmd")
    assert rig.plc.commanded()["heartbeat"] == beat
    assert rig.plc.commanded()["reuse_valve_cmd"] == COMMANDS["reuse_valve_cmd"]
    r = await tx.write_outputs({"reuse_valve_cmd": 0.0})
    assert "heartbeat" in r.written and not r.failed
    with pytest.raises(UnknownTagError, match=r"no_such_tag.*not an output"):
        await tx.write_outputs({"no_such_tag": 1.0})
    with pytest.raises(UnknownTagError):
        await tx.write_outputs({"it_supply_temp": 1.0})  # an input is not writable


async def test_link_drop_then_reconnect(rig: Rig, tx: Any) -> None:
    good, _ = await until(tx, lambda i: all_q(i, Quality.GOOD), 2.0)
    await tx.write_outputs(COMMANDS)
    await rig.stop()
    img, took = await until(tx, none_good, TIMEOUT_S * 2 + 0.1)
    assert all_q(img, Quality.COMMS_LOST), {n: img[n].quality for n in INPUTS}
    assert took <= TIMEOUT_S * 2 + 0.1
    # the last value is kept for diagnosis, never as good
    assert all(img[n].value == good[n].value for n in INPUTS)
    for _ in range(3):
        t0 = time.monotonic()
        again = await tx.read_inputs()
        assert none_good(again) and time.monotonic() - t0 <= TIMEOUT_S + 0.1
    w = await tx.write_outputs(COMMANDS)
    assert not w.written and "heartbeat" in w.failed
    assert tx.health.state is LinkState.LOST

    await rig.start()
    img, took = await until(tx, lambda i: all_q(i, Quality.GOOD), 5.0)
    assert all_q(img, Quality.GOOD), took
    w = await tx.write_outputs(COMMANDS)
    assert set(w.written) == set(OUTPUTS), "after a reconnect every output is written again"
    assert rig.plc.commanded()["drycooler_fan_cmd"] == COMMANDS["drycooler_fan_cmd"]
    assert tx.health.state is LinkState.OK


async def test_comms_drop_fault_is_comms_lost_then_recovers(rig: Rig, tx: Any) -> None:
    await until(tx, lambda i: all_q(i, Quality.GOOD), 2.0)
    rig.plc.inject("comms_drop", value=1.0)
    img, took = await until(tx, none_good, TIMEOUT_S * 2 + 0.2)
    assert all_q(img, Quality.COMMS_LOST) and took <= TIMEOUT_S * 2 + 0.2
    img, _ = await until(tx, lambda i: all_q(i, Quality.GOOD), 3.0)
    assert all_q(img, Quality.GOOD)


async def test_slow_server_fails_within_the_timeout(rig: Rig, tx: Any) -> None:
    await until(tx, lambda i: all_q(i, Quality.GOOD), 2.0)
    rig.slow(3.0)
    t0 = time.monotonic()
    img, _ = await until(tx, none_good, TIMEOUT_S * 3)
    took = time.monotonic() - t0
    assert all_q(img, Quality.COMMS_LOST)
    assert took < TIMEOUT_S * 3, f"took {took:.2f} s; pymodbus's defaults would take 12 s"
    t0 = time.monotonic()
    r = await tx.write_outputs(COMMANDS)
    assert "heartbeat" in r.failed and time.monotonic() - t0 <= TIMEOUT_S + 0.1
    rig.clear_all()
    img, _ = await until(tx, lambda i: all_q(i, Quality.GOOD), 4.0)
    assert all_q(img, Quality.GOOD)


async def test_error_replies_are_bad_quality_not_exceptions(rig: Rig, tx: Any) -> None:
    await until(tx, lambda i: all_q(i, Quality.GOOD), 2.0)
    if rig.is_opcua:
        # The PLC answers Bad for a node it does not have (BadNodeIdUnknown).
        tag = SITE.tag("it_supply_temp").model_copy(update={"opcua_node": "ns=2;s=PLC.nope"})
        site = SITE.model_copy(
            update={"tags": tuple(tag if t.name == tag.name else t for t in SITE.tags)}
        )
        t = rig.transport(site)
        await connected(t)
        try:
            img, _ = await until(t, lambda i: i["it_return_temp"].quality is Quality.GOOD, 2.0)
            assert img["it_supply_temp"].quality is Quality.BAD_REPLY
            assert img["it_return_temp"].quality is Quality.GOOD
        finally:
            await t.close()
        return
    for fault, value in (("comms_error", 2.0), ("comms_error", 4.0), ("comms_garble", 1.0)):
        rig.plc.inject(fault, value=value)
        img = await tx.read_inputs()
        assert all_q(img, Quality.BAD_REPLY), fault
        assert tx.health.state is LinkState.OK  # the PLC answered: the link is fine
        if fault == "comms_error":
            r = await tx.write_outputs(COMMANDS)
            assert r.failed["heartbeat"].startswith("withheld:"), r.failed
            assert "exception" in r.failed["heartbeat"]
        rig.plc.clear(fault)
    img = await tx.read_inputs()
    assert all_q(img, Quality.GOOD)


async def test_a_failure_cause_is_logged_once_not_every_scan(rig: Rig) -> None:
    rig.clear_all()
    with capture_logs() as logs:
        t = rig.transport()
        await connected(t)
        rig.plc.inject("comms_error", value=2.0)
        for _ in range(5):
            img = await t.read_inputs() if not rig.is_opcua else await settled_read(t, BAD)
            assert all_q(img, Quality.BAD_REPLY)
        rig.plc.clear("comms_error")
        for _ in range(3):
            img = await t.read_inputs() if not rig.is_opcua else await settled_read(t, GOOD)
            assert all_q(img, Quality.GOOD)
        await t.close()
    faults = [e for e in logs if e["event"] == "plc_fault"]
    cleared = [e for e in logs if e["event"] == "plc_fault_cleared"]
    if rig.is_opcua:  # every variable reports the PLC's device failure: one cause, one line
        assert [e["where"] for e in faults] == ["status BadDeviceFailure"], faults
        assert [e["where"] for e in cleared] == ["status BadDeviceFailure"], cleared
        return
    blocks = len({e["where"] for e in faults})
    assert blocks == 2 and len(faults) == 2, faults  # one line per refused block, not per scan
    assert all("illegal data address" in e["cause"] for e in faults)
    assert len(cleared) == 2


BAD, GOOD = Quality.BAD_REPLY, Quality.GOOD


async def settled_read(t: Any, quality: Quality, within_s: float = 3.0) -> Any:
    """OPC UA values arrive by subscription or the next poll: read until they show `quality`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        img = await t.read_inputs()
        if all_q(img, quality) or asyncio.get_running_loop().time() > deadline:
            return img
        await asyncio.sleep(0.05)


async def test_reconnect_back_off_is_exponential_and_bounded() -> None:
    """On hand-made time: retries after 0.1, 0.2, then every reconnect_max_s (0.4 here)."""
    from plc_io.memory import MemoryPlc, MemoryTransport

    now = [0.0]
    plc = MemoryPlc(SITE, clock=lambda: now[0])
    t = MemoryTransport(SITE, plc, clock=lambda: now[0])
    plc.stop()
    attempts = []
    for step in range(200):
        now[0] = step * 0.01
        before = t.health.failures
        img = await t.read_inputs()
        assert none_good(img)
        if t.health.failures > before:
            attempts.append(round(now[0], 2))
    gaps = [b - a for a, b in itertools.pairwise(attempts)][:6]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4, 0.4], abs=0.011)
    plc.start()
    now[0] = 10.0
    assert all_q(await t.read_inputs(), Quality.GOOD)
    assert t.health.consecutive_failures == 0 and t.health.state is LinkState.OK


async def test_verify_reads_back_and_resends_what_the_plc_does_not_hold() -> None:
    from plc_io.memory import MemoryPlc, MemoryTransport

    tags = tuple(
        t.model_copy(update={"verify": True}) if t.name == "reuse_valve_cmd" else t
        for t in SITE.tags
    )
    site = SITE.model_copy(update={"tags": tags})
    plc = MemoryPlc(site)
    t = MemoryTransport(site, plc)
    r = await t.write_outputs(COMMANDS)
    assert "reuse_valve_cmd" in r.written and not r.failed
    plc.override("reuse_valve_cmd", 0.0)  # e.g. the valve is in local control
    r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 30.0})
    assert r.failed["reuse_valve_cmd"].startswith("verify: PLC holds 0.0")
    assert plc.commanded()["reuse_valve_cmd"] == 30.0
    r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 30.0})
    assert "reuse_valve_cmd" in r.failed, "an unverified write is sent again next pass"
    plc.release("reuse_valve_cmd")
    r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 30.0})
    assert "reuse_valve_cmd" in r.written and not r.failed
    r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 30.0})
    assert r.written == ("heartbeat",)


async def test_verify_over_the_wire_agrees_with_what_the_plc_holds(rig: Rig) -> None:
    tags = tuple(
        t.model_copy(update={"verify": True}) if t.name == "reuse_valve_cmd" else t
        for t in SITE.tags
    )
    t = rig.transport(SITE.model_copy(update={"tags": tags}))
    await connected(t)
    try:
        for value in (42.0, 43.0):
            r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": value})
            holds = rig.plc.outputs()["reuse_valve_cmd"]  # the safe value while a watchdog holds
            assert rig.plc.commanded()["reuse_valve_cmd"] == pytest.approx(value)
            if holds == pytest.approx(value):
                assert "reuse_valve_cmd" in r.written and not r.failed
            else:
                assert r.failed["reuse_valve_cmd"].startswith("verify: PLC holds")
    finally:
        await t.close()


# ---- the heartbeat means "my commands arrived" ----

# A plant sending heat to the customer, then a reuse leak: the commands change in both the
# holding-register block (valve, speed) and the coil block (pump, isolation valves).
REUSE = {
    **COMMANDS,
    "reuse_valve_cmd": 60.0,
    "secondary_pump_speed_cmd": 70.0,
    "secondary_pump_cmd": True,
    "customer_isolation_cmd": True,
    "reuse_isolation_cmd": True,
}
LEAK_TRIP = {
    **REUSE,
    "reuse_valve_cmd": 0.0,
    "secondary_pump_speed_cmd": 0.0,
    "secondary_pump_cmd": False,
    "customer_isolation_cmd": False,
    "reuse_isolation_cmd": False,
}
COILS = [t.name for t in SITE.outputs if t.modbus.table.value == "coil"]
TRIPPED_COILS = {n for n in COILS if LEAK_TRIP[n] != REUSE[n]}


class MemoryWatchdog:
    """The in-memory PLC has no watchdog: feed DESIGN §7's (the simulated PLC's own state
    machine) from what actually landed in the in-memory PLC, and apply its safe hold."""

    def __init__(self, plc: Any, site: Any) -> None:
        from sim.plc_watchdog import Watchdog

        self.plc, self.site = plc, site
        self.wd = Watchdog(site.plc.watchdog_s, site.plc.watchdog_holdoff_s, time.monotonic())
        self.seen = 0

    def poll(self) -> None:
        now = time.monotonic()
        for write in self.plc.write_log[self.seen :]:
            if "heartbeat" in write:
                self.wd.heartbeat(float(write["heartbeat"]), now)
            if any(n != "heartbeat" for n in write):
                self.wd.command(now)
        self.seen = len(self.plc.write_log)
        self.wd.poll(now)
        for t in self.site.outputs:
            if self.wd.tripped:
                self.plc.override(t.name, t.safe)
            else:
                self.plc.release(t.name)

    @property
    def watchdog_tripped(self) -> bool:
        self.poll()
        return bool(self.wd.tripped)


async def scan_until(t: Any, values: dict[str, Any], done: Any, within_s: float) -> list[Any]:
    """Write passes every 50 ms (a controller's scan), re-sending everything while the PLC
    holds its safe state, until `done()`; return the results."""
    results = []
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, f"not done within {within_s} s: {results[-1:]}"
        results.append(await t.write_outputs(values))
        await asyncio.sleep(0.05)
    return results


async def test_a_refused_coil_block_withholds_the_heartbeat_and_the_watchdog_trips(
    rig: Rig,
) -> None:
    """Coil writes refused during a reuse leak: the valve command lands, the pump and
    isolation commands do not, so the heartbeat is withheld and the PLC watchdog takes the
    plant to its safe values (secondary pump off, isolation closed)."""
    site = conformance_site(watchdog_s=1.0, watchdog_holdoff_s=0.3)
    own = Rig(rig.kind, site)  # a PLC of its own, with a short watchdog
    await own.start()
    t = own.transport()
    try:
        await connected(t)
        plc = own.plc
        wd = MemoryWatchdog(plc, site) if own.kind == "memory" else plc
        bound_s = site.plc.watchdog_s + site.plc.watchdog_holdoff_s + 3.0

        def released() -> bool:
            if wd.watchdog_tripped:
                t.resend_all()  # the PLC releases its safe hold only on fresh commands
                return False
            return True

        await scan_until(t, REUSE, released, bound_s)
        await scan_until(t, REUSE, lambda: plc.outputs()["secondary_pump_cmd"] is True, 1.0)
        assert not wd.watchdog_tripped and plc.outputs()["reuse_isolation_cmd"] is True

        plc.inject("write_refused", "coil", 4.0)
        beat = plc.commanded()["heartbeat"]
        results = await scan_until(
            t, LEAK_TRIP, lambda: wd.watchdog_tripped, site.plc.watchdog_s + 3.0
        )
        assert results, "the watchdog was already tripped"
        for r in results:
            assert set(r.failed) >= TRIPPED_COILS, r
            assert r.failed["heartbeat"].startswith("withheld:"), r.failed
            assert "secondary_pump_cmd" in r.failed["heartbeat"]
        assert "reuse_valve_cmd" in results[0].written  # the holding block still landed
        assert plc.commanded()["heartbeat"] == beat, "the PLC never saw the heartbeat advance"
        assert plc.commanded()["secondary_pump_cmd"] is True  # the refused command
        safe = SITE.safe_outputs()
        held = plc.outputs()
        assert {n: held[n] for n in COILS} == {n: safe[n] for n in COILS}
        assert held["drycooler_fan_cmd"] == pytest.approx(safe["drycooler_fan_cmd"])

        plc.clear("write_refused")
        results = await scan_until(t, LEAK_TRIP, released, bound_s)
        r = await t.write_outputs(LEAK_TRIP)
        assert "heartbeat" in r.written and not r.failed
        assert plc.outputs()["secondary_pump_cmd"] is False
    finally:
        await t.close()
        await own.close()


# ---- the controller knows when the PLC holds its safe values ----

PLC_HOLD = "PLC holds its safe values (watchdog tripped)"


def plc_holds(r: ScanResult) -> bool:
    return any(x.startswith(PLC_HOLD) for x in r.decision.reject_reasons)


def watchdog_reads(ctl: Controller, tripped: bool) -> bool:
    """The controller's last image reads the PLC's watchdog as `tripped` (and good)."""
    assert ctl.image is not None
    s = ctl.image["plc_watchdog_tripped"]
    return s.quality is Quality.GOOD and s.value is tripped


@pytest.mark.parametrize("how", ["writes refused", "heartbeat stopped"])
async def test_a_controller_whose_writes_never_reach_the_plc_rejects_reuse_for_its_hold(
    rig: Rig, how: str
) -> None:
    """The PLC refuses every write, or the heartbeat the controller writes no longer moves: the
    PLC watchdog trips and holds the safe values, and the controller, reading
    plc_watchdog_tripped past the hold-off plus four scans, rejects reuse for that reason
    (never a reuse mode), with the fault, the PLC-SAFE-HOLD alarm and one event; once the
    writes land again the PLC releases and the hold clears with one event."""
    site = conformance_site(watchdog_s=1.0, watchdog_holdoff_s=0.3)
    site = site.model_copy(update={"scan": site.scan.model_copy(update={"period_s": 0.25})})
    own = Rig(rig.kind, site)  # a PLC of its own, with a short watchdog
    await own.start()
    t = own.transport()
    try:
        await connected(t)
        plc = own.plc
        wd = MemoryWatchdog(plc, site) if own.kind == "memory" else plc
        ctl = Controller(site, t, wd if own.kind == "memory" else None)
        ctl.plc = plc
        bound_s = site.plc.watchdog_holdoff_s + 4 * site.scan.period_s
        assert ctl.core.cfg.plc_hold_s == bound_s
        settle_s = site.plc.watchdog_s + site.plc.watchdog_holdoff_s + 5.0  # generous

        # writes that land: the PLC, tripped since it powered up, releases its safe hold
        r = await ctl.scan_until(lambda r: watchdog_reads(ctl, False), settle_s)
        assert not plc_holds(r) and "plc_safe_hold" not in r.decision.faults
        assert not wd.watchdog_tripped

        ctl.events.clear()
        if how == "writes refused":
            plc.inject("write_refused", "", 4.0)
        else:
            ctl.heartbeat = float(plc.commanded()["heartbeat"])
        r = await ctl.scan_until(plc_holds, site.plc.watchdog_s + bound_s + settle_s)
        d = r.decision
        assert watchdog_reads(ctl, True) and wd.watchdog_tripped
        safe, held = site.safe_outputs(), plc.outputs()
        assert {n: held[n] for n in safe if n != "heartbeat"} == pytest.approx(
            {n: v for n, v in safe.items() if n != "heartbeat"}
        )
        assert d.mode not in REUSE_MODES
        reason = next(x for x in d.reject_reasons if x.startswith(PLC_HOLD))
        assert reason == f"{PLC_HOLD} for more than {bound_s:g} s"
        assert d.faults["plc_safe_hold"].startswith(PLC_HOLD)
        assert r.alarms.alarms["PLC-SAFE-HOLD"].state is AlarmState.UNACK
        starts = [e for e in ctl.events if e.kind == "plc_safe_hold"]
        assert len(starts) == 1 and starts[0].detail["tripped_s"] > bound_s
        for _ in range(5):  # it stands, and is not reported again
            await asyncio.sleep(0.05)
            r = await ctl.scan()
            assert plc_holds(r) and r.decision.mode not in REUSE_MODES
        assert [e.kind for e in ctl.events].count("plc_safe_hold") == 1

        # the writes land again: the PLC releases and the hold clears, once
        if how == "writes refused":
            plc.clear("write_refused")
        ctl.heartbeat = None
        r = await ctl.scan_until(lambda r: not plc_holds(r), settle_s)
        assert watchdog_reads(ctl, False) and "plc_safe_hold" not in r.decision.faults
        assert [e.kind for e in ctl.events].count("plc_safe_hold_cleared") == 1
    finally:
        await t.close()
        await own.close()


# ---- a value of the wrong kind is never good ----


async def test_a_value_of_the_wrong_kind_is_bad_reply_never_coerced() -> None:
    """Bool(nan) is True and float(True) is 1.0; neither may reach the decision core."""
    from plc_io.memory import MemoryPlc, MemoryTransport

    plc = MemoryPlc(SITE)
    t = MemoryTransport(SITE, plc)
    wrong = {
        "leak_primary": math.nan,  # would read wet... or, for a healthy-when-true input, healthy
        "customer_ready": 1.0,
        "drycooler_fault": "false",
        "it_supply_temp": True,  # would read 1.0 °C: cold, so no IL-01
        "it_return_temp": "35.0",
        "ambient_temp": None,
        "primary_flow": 10**30,
    }
    with capture_logs() as logs:
        plc.set_many(wrong)  # type: ignore[arg-type]
        img = await t.read_inputs()
        img = await t.read_inputs()  # logged once, not every scan
    for name in wrong:
        assert img[name].quality is Quality.BAD_REPLY, name
        assert img[name].value is None, name
    assert all(img[n].quality is Quality.GOOD for n in INPUTS if n not in wrong)
    reasons = {e["where"]: e["cause"] for e in logs if e["event"] == "plc_fault"}
    assert len(reasons) == len(wrong), reasons
    assert "expected a boolean" in reasons["value leak_primary"]
    assert "expected a number" in reasons["value it_supply_temp"]
    # and nothing of the wrong kind is ever sent: NaN is not "run", True is not 1 %
    r = await t.write_outputs({"secondary_pump_cmd": math.nan, "reuse_valve_cmd": True})
    assert set(r.failed) == {"secondary_pump_cmd", "reuse_valve_cmd", "heartbeat"}
    assert plc.commanded()["secondary_pump_cmd"] is False
    assert plc.commanded()["reuse_valve_cmd"] == 0.0


# ---- OPC UA: wrong variant types, deleted nodes ----


@OPCUA_ONLY
async def test_opcua_a_variant_of_the_wrong_type_is_bad_reply(rig: Rig, tx: Any) -> None:
    """A Boolean served for a float tag is not 0.0 °C, a Double NaN for a boolean tag is
    not True, a String is not a number: bad_reply, by subscription and by read."""
    await until(tx, lambda i: all_q(i, Quality.GOOD), 3.0)
    kinds = {"it_supply_temp": 1.0, "leak_reuse": 1.0, "ambient_temp": 2.0, "customer_ready": 2.0}
    for name, kind in kinds.items():
        rig.plc.inject("wrong_type", name, kind)

    def shows(img: ProcessImage) -> bool:
        return all(img[n].quality is Quality.BAD_REPLY for n in kinds)

    img, _ = await until(tx, shows, 3.0)
    assert {n: img[n].quality for n in kinds} == dict.fromkeys(kinds, Quality.BAD_REPLY)
    for _ in range(3):  # and it stays so, whether verified by a read or notified
        img = await tx.read_inputs()
        assert all(img[n].quality is Quality.BAD_REPLY for n in kinds)
        assert all(img[n].quality is Quality.GOOD for n in INPUTS if n not in kinds)
        await asyncio.sleep(SITE.plc.stale_after_s / 2)
    rig.plc.clear("wrong_type")
    img, _ = await until(tx, lambda i: all_q(i, Quality.GOOD), 3.0)
    assert all_q(img, Quality.GOOD)
    assert isinstance(img.value("it_supply_temp"), float)
    assert isinstance(img.value("leak_reuse"), bool)


# asyncua 2.1's server fails to notify the deletion (the bug this case is about) and says so
@pytest.mark.filterwarnings("ignore:coroutine 'MonitoredItemService.datachange_callback'")
@OPCUA_ONLY
async def test_opcua_deleted_nodes_go_bad_and_come_back_fresh(rig: Rig, tx: Any) -> None:
    """A PLC program download deletes the PLC's nodes. The asyncua server never tells the
    subscriber; the points must go bad (never stay good on the last value) and be good with
    fresh values, by notification again, once the nodes are back."""
    await until(tx, lambda i: all_q(i, Quality.GOOD), 3.0)
    stale_s = SITE.plc.stale_after_s
    # the nodes stay away longer than the bound below, so a loaded machine still sees them gone
    bound_s = stale_s + 5.0
    rig.plc.inject("nodes_deleted", "", bound_s + stale_s + 1.0)
    img, _ = await until(tx, lambda i: all_q(i, Quality.BAD_REPLY), bound_s)
    assert all_q(img, Quality.BAD_REPLY), {n: img[n].quality for n in INPUTS}
    if rig.kind == "opcua":
        # a notification sent before the nodes vanished, arriving late, is no fresh value
        late = ua.DataValue(ua.Variant(30.0, ua.VariantType.Double))
        for nodeid in list(tx._nodes.values()):
            tx._arrived(nodeid, late)
        tx._verified_at = tx._clock()  # between two verifying reads, as it arrives on site
        img = await tx.read_inputs()
        assert not any(img[n].usable_at(time.monotonic(), stale_s) for n in INPUTS)
    deleted_seen = time.monotonic()
    w = await tx.write_outputs(COMMANDS)
    assert "heartbeat" in w.failed  # nowhere to write it
    while rig.plc.faults.nodes_gone(time.monotonic()):
        img = await tx.read_inputs()
        assert not any(img[n].usable_at(time.monotonic(), stale_s) for n in INPUTS)
        await asyncio.sleep(0.05)
    back_at = time.monotonic()
    assert back_at > deleted_seen
    img, _ = await until(
        tx,
        lambda i: all(i[n].quality is Quality.GOOD and i[n].at_s >= back_at for n in INPUTS),
        5.0,
    )
    assert all(img[n].quality is Quality.GOOD and img[n].at_s >= back_at for n in INPUTS)
    if rig.kind == "opcua":  # notifications flow again: the monitored items were recreated
        notified: list[str] = []
        arrived = tx._arrived
        tx._arrived = lambda nodeid, dv: (notified.append(nodeid), arrived(nodeid, dv))
        try:
            await until(tx, lambda i: bool(notified), 5.0)
        finally:
            tx._arrived = arrived
        assert notified, "no data change notification after the nodes came back"
    w = await tx.write_outputs(COMMANDS)
    assert "heartbeat" in w.written and not w.failed


# ---- Modbus: a PLC that lies about what it answers ----


class LyingPlc:
    """A raw Modbus/TCP server on 127.0.0.1 (no library): answers every request honestly with
    zeros, except that `lie(fc, pdu)` may rewrite the reply PDU."""

    def __init__(self, lie: Any = None) -> None:
        self.lie = lie
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LyingPlc:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @staticmethod
    def honest(pdu: bytes) -> bytes:
        fc = pdu[0]
        address, count = struct.unpack(">HH", pdu[1:5])
        if fc in (3, 4):
            return bytes([fc, 2 * count]) + bytes(2 * count)
        if fc in (1, 2):
            n = (count + 7) // 8
            return bytes([fc, n]) + bytes(n)
        if fc in (15, 16):
            return struct.pack(">BHH", fc, address, count)
        return pdu  # 5, 6: the echo

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                tid, _pid, length, unit = struct.unpack(">HHHB", await r.readexactly(7))
                pdu = await r.readexactly(length - 1)
                reply = self.honest(pdu)
                if self.lie is not None:
                    reply = self.lie(pdu[0], reply)
                w.write(struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply)
                await w.drain()
        w.close()


def swap_fc(of: int, to: int) -> Any:
    """A reply to function `of` sent under function code `to` (same body)."""
    return lambda fc, reply: bytes([to]) + reply[1:] if fc == of else reply


def one_register_more(fc: int, reply: bytes) -> bytes:
    if fc == 4:
        return bytes([4, reply[1] + 2]) + reply[2:] + b"\x00\x00"
    return reply


def one_byte_more(fc: int, reply: bytes) -> bytes:
    return bytes([2, reply[1] + 1]) + reply[2:] + b"\x00" if fc == 2 else reply


def byte_count_one_register_short(fc: int, reply: bytes) -> bytes:
    return bytes([4, reply[1] - 2]) + reply[2:] if fc == 4 else reply  # data as asked


def exception_for_another_fc(fc: int, reply: bytes) -> bytes:
    return bytes([0x83, 2]) if fc == 4 else reply  # "illegal address", but for FC03


MODBUS_LIES = {
    "FC03 answer to FC04": (swap_fc(4, 3), "input"),
    "FC01 answer to FC02": (swap_fc(2, 1), "discrete"),
    "FC04 with one register more": (one_register_more, "input"),
    "FC04 byte count one register short": (byte_count_one_register_short, "input"),
    "FC02 with one byte more": (one_byte_more, "discrete"),
    "FC04 exception under 0x83": (exception_for_another_fc, "input"),
}


@pytest.mark.parametrize("lie", list(MODBUS_LIES))
async def test_modbus_a_reply_that_does_not_match_the_request_is_bad_reply(lie: str) -> None:
    """Pymodbus matches replies by transaction id and decodes them by their own function
    code: an FC03 answer to an FC04 read would be used as input registers."""
    from plc_io.modbus import ModbusTransport

    liar, table = MODBUS_LIES[lie]
    lied = [t.name for t in SITE.inputs if t.modbus.table.value == table]
    async with LyingPlc() as plc:
        t = ModbusTransport(SITE, host="127.0.0.1", port=plc.port)
        img = await t.read_inputs()
        assert all_q(img, Quality.GOOD), "the honest server answers well"
        plc.lie = liar
        with capture_logs() as logs:
            img = await t.read_inputs()
        await t.close()
    assert {n: img[n].quality for n in lied} == dict.fromkeys(lied, Quality.BAD_REPLY)
    assert all(img[n].quality is Quality.GOOD for n in INPUTS if n not in lied)
    assert t.health.state is LinkState.OK  # the PLC answered: the link is up, the answer wrong
    assert any(e["event"] == "plc_fault" and "bad_reply" in e["cause"] for e in logs), logs


MODBUS_WRITE_LIES = {
    "FC16 answer under FC06": (swap_fc(16, 6), "holding"),
    "FC15 answer under FC16": (swap_fc(15, 16), "coil"),
    "FC16 echo with another count": (
        lambda fc, reply: reply[:3] + bytes([0, reply[4] + 1]) if fc == 16 else reply,
        "holding",
    ),
    "FC15 echo with another address": (
        lambda fc, reply: bytes([15, 0, reply[2] + 1]) + reply[3:] if fc == 15 else reply,
        "coil",
    ),
}


@pytest.mark.parametrize("lie", list(MODBUS_WRITE_LIES))
async def test_modbus_a_write_answer_that_does_not_match_is_no_acknowledgement(lie: str) -> None:
    """An answer to a write under another function code or echoing another span
    did not acknowledge the write: those outputs fail and the heartbeat is withheld."""
    from plc_io.modbus import ModbusTransport

    liar, table = MODBUS_WRITE_LIES[lie]
    lied = {t.name for t in SITE.outputs if t.modbus.table.value == table} - {"heartbeat"}
    async with LyingPlc(liar) as plc:
        t = ModbusTransport(SITE, host="127.0.0.1", port=plc.port)
        r = await t.write_outputs(COMMANDS)
        await t.close()
    assert set(r.failed) == lied | {"heartbeat"}, r.failed
    assert all(r.failed[n].startswith("bad_reply") for n in lied), r.failed
    assert r.failed["heartbeat"].startswith("withheld:")
    assert set(r.written) == set(OUTPUTS) - lied - {"heartbeat"}


async def test_modbus_a_byte_count_beyond_the_frame_is_never_good() -> None:
    """Pymodbus discards a reply whose byte count claims more data than the frame holds, so
    the request goes unanswered: comms_lost after the timeout (never good), then a reconnect."""
    from plc_io.modbus import ModbusTransport

    def too_long(fc: int, reply: bytes) -> bytes:
        return bytes([4, reply[1] + 2]) + reply[2:] if fc == 4 else reply

    async with LyingPlc(too_long) as plc:
        t = ModbusTransport(SITE, host="127.0.0.1", port=plc.port)
        img = await t.read_inputs()
        await t.close()
    assert none_good(img), {n: img[n].quality for n in INPUTS}
