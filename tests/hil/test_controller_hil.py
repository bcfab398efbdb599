"""The controller as a real process against the simulated PLC as a real process (DESIGN §7, §10).

`heatloop sim serve` runs once for the module; each test starts its own `heatloop run` on its
own state directory (a site file per controller, same ports), reads the controller's JSON log
lines from stderr, watches the PLC with a plain Modbus client, and injects plant faults through
the simulated PLC's OPC UA `Sim` object. Every process is killed in a finalizer.

Figures (printed; run with -s to see them): leak reaction time, from the InjectFault call to
the isolation outputs at the PLC; watchdog time, from SIGKILL of the controller to the PLC's
safe state. Speed is for the figures; the assertions are orders of events and generous bounds
built from the site's parameters, so three Python processes on two busy cores still pass.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.runtime import RESEND_EVERY_S
from interlocks.rules import RULES_BY_ID
from tests.hil.conftest import ModbusProbe
from tests.hil.procs import (
    ALLOWANCE_S,
    CONTROL,
    HOLDOFF_S,
    ISOLATION,
    SCAN_S,
    STEP_S,
    WATCHDOG_S,
    ControllerProc,
    SimFaults,
    SimServer,
    journal_latched,
    leak_trip,
    matches,
    poll_until,
    reach_reuse,
    read_outputs,
)

pytestmark = pytest.mark.hil

ROOT = Path(__file__).resolve().parents[2]
NS = "urn:heatloop:plc"

# ---- tests ----


async def test_leak_via_opcua_reaches_leak_trip_and_isolates_within_response_time(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    sim: SimServer,
) -> None:
    rule = RULES_BY_ID["IL-04"]
    # the rule's response time, plus one scan (the fault may land just after a read) and one
    # PLC request timeout (a slow write still counts), plus headroom for a loaded machine
    budget_s = rule.response_s + SCAN_S + sim.site.plc.timeout_s + ALLOWANCE_S
    ctl = controllers()
    await reach_reuse(ctl, probe)

    t0 = time.monotonic()
    await faults.inject("leak", "reuse", 1.0)
    t_call = time.monotonic() - t0
    t_iso, _ = await poll_until(
        lambda: read_outputs(probe, tuple(ISOLATION)),
        lambda v: matches(v, ISOLATION),
        budget_s + 2.0,
        "isolation outputs at the PLC",
    )
    reaction_s = t_iso - t0
    ev = await ctl.wait_mode("LEAK_TRIP", budget_s)
    latched = await ctl.wait_event(
        lambda e: e.get("event") == "trip_latched", budget_s, "trip_latched"
    )
    print(
        f"\nleak reaction (InjectFault call -> isolation outputs read at the PLC): "
        f"{reaction_s * 1000:.0f} ms (OPC UA call {t_call * 1000:.0f} ms); budget "
        f"{budget_s * 1000:.0f} ms = response_s {rule.response_s:g} s + scan {SCAN_S:g} s "
        f"+ PLC timeout {sim.site.plc.timeout_s:g} s + headroom {ALLOWANCE_S:g} s"
    )
    assert reaction_s <= budget_s, f"{reaction_s:.3f} s > {budget_s:.3f} s"
    assert ev["from"] == "NORMAL_REUSE"
    assert latched["source"] == "IL-04"
    assert ctl.of("interlock_active") and ctl.of("interlock_active")[-1]["source"] == "IL-04"
    # primary pumps never stop for a reuse leak
    assert await probe.read("primary_pump_a_cmd") is True


async def test_kill9_leaves_plc_safe_within_watchdog_then_restart_resumes_in_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, sim: SimServer, tmp_path: Path
) -> None:
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    budget_s = WATCHDOG_S + STEP_S + ALLOWANCE_S
    # the last beat went out before the kill, so the watchdog needs at least watchdog_s minus
    # the time since that beat: more than half of it unless a scan stalled for watchdog_s / 2
    floor_s = WATCHDOG_S / 2
    ctl = controllers()
    await reach_reuse(ctl, probe)
    before = await read_outputs(probe, tuple(safe))
    assert not matches(before, safe), "outputs already safe: the test would prove nothing"

    t_kill = ctl.kill9()
    assert ctl.proc.returncode == -signal.SIGKILL
    t_safe, _ = await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *safe)),
        lambda v: v["plc_watchdog_tripped"] is True and matches(v, safe),
        budget_s + 2.0,
        "watchdog trip and safe outputs",
    )
    wd_s = t_safe - t_kill
    print(
        f"\nwatchdog (SIGKILL -> plc_watchdog_tripped and safe outputs at the PLC): "
        f"{wd_s * 1000:.0f} ms; bounds [{floor_s * 1000:.0f}, {budget_s * 1000:.0f}] ms = "
        f"watchdog_s {WATCHDOG_S:g} s / 2 .. + plant step {STEP_S:g} s + headroom "
        f"{ALLOWANCE_S:g} s"
    )
    assert floor_s <= wd_s <= budget_s
    await asyncio.sleep(2 * STEP_S)  # the hold holds
    assert matches(await read_outputs(probe, tuple(safe)), safe)

    again = controllers(tmp_path / "state")  # same journal, nothing latched
    await again.wait_event(lambda e: e.get("event") == "mode_changed", 15.0, "first mode")
    assert again.modes[0] == ("STARTUP", "DRY_COOLER_REJECT")
    assert not again.of("trip_restored")
    await reach_reuse(again, probe)  # the watchdog let go of the new controller
    assert again.modes[:2] == [
        ("STARTUP", "DRY_COOLER_REJECT"),
        ("DRY_COOLER_REJECT", "NORMAL_REUSE"),
    ]


async def test_latched_leak_trip_survives_kill9_and_needs_a_reset(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await leak_trip(ctl, probe, faults)
    await ctl.wait_event(lambda e: e.get("event") == "trip_latched", 1.0, "trip_latched")
    # order, not time: by the time anyone is told, the PLC holds the isolation and the latch
    # is on disk (outputs first, then the journal, then the log)
    assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
    assert journal_latched(state) == {"IL-04"}

    ctl.kill9()
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"),
        lambda v: v is True,
        WATCHDOG_S + STEP_S + 1.0,
        "watchdog trip",
    )

    again = controllers(state)
    restored = await again.wait_event(
        lambda e: e.get("event") == "trip_restored", 15.0, "trip_restored"
    )
    assert restored["latched"] == ["IL-04"]
    await again.wait_mode("LEAK_TRIP", 5.0)
    assert again.modes[0] == ("STARTUP", "LEAK_TRIP")  # never through DRY_COOLER_REJECT
    # the new controller holds the PLC (watchdog released) with the reuse circuit isolated
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *ISOLATION)),
        lambda v: v["plc_watchdog_tripped"] is False and matches(v, ISOLATION),
        5.0,
        "controller in charge, reuse isolated",
    )

    await faults.clear("leak", "reuse")
    await poll_until(lambda: probe.read("leak_reuse"), lambda v: v is False, 2.0, "leak_reuse dry")
    t_dry = time.monotonic()
    while time.monotonic() - t_dry < 3.0:  # dry, but nobody reset it: still tripped
        assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
        await asyncio.sleep(0.25)
    assert again.mode == "LEAK_TRIP" and again.modes == [("STARTUP", "LEAK_TRIP")]
    assert not again.of("trip_reset")
    assert journal_latched(state) == {"IL-04"}
    assert again.proc.poll() is None


async def test_orderly_stop_and_plain_restart_resumes_in_dry_cooler_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, sim: SimServer, tmp_path: Path
) -> None:
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    ctl = controllers()
    await reach_reuse(ctl, probe)
    ctl.proc.send_signal(signal.SIGTERM)
    assert ctl.proc.wait(5.0) == 0
    ctl._reader.join(2.0)
    assert ctl.of("controller_stopped")
    # the farewell write put the safe values at the PLC before any watchdog could act
    assert matches(await read_outputs(probe, tuple(safe)), safe)

    again = controllers(tmp_path / "state")
    await again.wait_event(lambda e: e.get("event") == "mode_changed", 15.0, "first mode")
    assert again.modes[0] == ("STARTUP", "DRY_COOLER_REJECT")
    assert not again.of("trip_restored")
    assert journal_latched(tmp_path / "state") == set()


async def test_a_journal_that_cannot_open_leaves_the_controller_in_charge_in_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, tmp_path: Path
) -> None:
    """The journal's path is a directory: no crash loop. The controller starts degraded (an
    alarm, reuse rejected because latched trips are unknown) and keeps the PLC under its
    control: the watchdog is released and the isolation stays closed."""
    state = tmp_path / "state"
    (state / "heatloop.db").mkdir(parents=True)
    ctl = controllers(state)
    await ctl.wait_event(
        lambda e: e.get("event") == "journal_unreadable", 15.0, "journal_unreadable"
    )
    await ctl.wait_mode("DRY_COOLER_REJECT", 15.0)
    await ctl.wait_event(lambda e: e.get("event") == "degraded", 5.0, "degraded alarm")
    # a healthy controller reaches reuse about a second after start (CONTROL above); this one
    # must not, for several times that
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"), lambda v: v is False, 5.0, "watchdog released"
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 * max(CONTROL.values()):
        assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
        await asyncio.sleep(0.25)
    assert ctl.mode == "DRY_COOLER_REJECT" and ctl.proc.poll() is None


async def test_refused_writes_withhold_the_heartbeat_and_are_reported_once_until_they_clear(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    sim: SimServer,
) -> None:
    """The PLC refuses every coil write (a write-protected output card). The controller sends
    no heartbeat with commands that did not arrive, so the PLC watchdog takes the plant to its
    safe values; the controller keeps running, reports the failure once per cause (not every
    scan), leaves reuse, and takes the PLC back when the writes are accepted again."""
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    ctl = controllers()
    await reach_reuse(ctl, probe)
    await faults.inject("write_refused", "coil", 4.0)
    # unchanged coils are re-sent at least every RESEND_EVERY_S, so the refusal shows by then
    failed = await ctl.wait_event(
        lambda e: e.get("event") == "write_failed", RESEND_EVERY_S + 5.0, "write_failed"
    )
    assert str(failed["failed"].get("heartbeat", "")).startswith("withheld:"), failed
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *safe)),
        lambda v: v["plc_watchdog_tripped"] is True and matches(v, safe),
        WATCHDOG_S + STEP_S + 5.0,
        "the PLC watchdog's safe state",
    )
    await ctl.wait_mode("DRY_COOLER_REJECT", 5.0)
    await asyncio.sleep(10 * SCAN_S)  # ten more scans of refused writes
    assert ctl.proc.poll() is None
    # once per cause: a handful of lines (the set changes as the mode changes), not one a scan
    assert len(ctl.of("write_failed")) <= 4, ctl.of("write_failed")

    await faults.clear("write_refused", "")  # PLC comms faults clear without a target
    await ctl.wait_event(lambda e: e.get("event") == "write_recovered", 10.0, "write_recovered")
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"),
        lambda v: v is False,
        HOLDOFF_S + WATCHDOG_S + 5.0,
        "the controller back in charge",
    )
