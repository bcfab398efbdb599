"""The scan loop over the in-memory PLC: safe values at start and stop, heartbeat, comms loss,
journalled trips that survive a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.journal import Journal
from controller.modes import Mode
from controller.runtime import Controller
from plc_io.memory import MemoryPlc, MemoryTransport
from tests.unit.core_helpers import HEALTHY, SITE


def plant_ok(plc: MemoryPlc) -> None:
    plc.set_many({k: v for k, v in HEALTHY.items() if k in plc.measured()})


async def scans(ctl: Controller, n: int, plc: MemoryPlc | None = None) -> None:
    for i in range(n):
        if plc is not None:  # a live sensor is never perfectly still
            plc.set("it_supply_temp", 35.0 + 0.02 * (i % 2))
        await ctl.scan_once()


async def test_start_writes_safe_values_then_heartbeat_counts_every_scan() -> None:
    plc = MemoryPlc(SITE)
    plant_ok(plc)
    plc.set_many({"reuse_valve_cmd": 55.0, "drycooler_fan_cmd": 0.0})  # stale commands in the PLC
    ctl = Controller(SITE, MemoryTransport(SITE, plc))
    stop = asyncio.Event()
    task = asyncio.create_task(ctl.run(stop))
    await asyncio.sleep(0.05)
    beats = []
    for _ in range(3):
        beats.append(plc.values["heartbeat"])
        await asyncio.sleep(SITE.scan.period_s)
    assert len(set(beats)) == 3, beats  # the heartbeat changes every scan
    stop.set()
    await task
    assert plc.commanded() | {"heartbeat": 0} == SITE.safe_outputs() | {"heartbeat": 0}


async def test_comms_loss_marks_inputs_writes_nothing_and_resumes_in_reject() -> None:
    plc = MemoryPlc(SITE)
    plant_ok(plc)
    ctl = Controller(SITE, MemoryTransport(SITE, plc))
    await ctl.transport.connect()
    await scans(ctl, 3, plc)
    assert ctl.supervisor.mode is Mode.DRY_COOLER_REJECT
    plc.stop()
    writes = len(plc.write_log)
    d = await ctl.scan_once()
    assert "IL-08" in d.active
    assert ctl.status.image["it_supply_temp"].quality.value == "comms_lost"
    assert len(plc.write_log) == writes  # nothing can be written
    plc.start()
    for _ in range(40):
        d = await ctl.scan_once()
        if "IL-08" not in d.active:
            break
        await asyncio.sleep(0.05)
    assert "IL-08" not in d.active and d.mode is Mode.DRY_COOLER_REJECT


async def test_leak_trip_survives_a_restart_through_the_journal(tmp_path: Path) -> None:
    plc = MemoryPlc(SITE)
    plant_ok(plc)
    journal = Journal(tmp_path / "heatloop.db")
    ctl = Controller(SITE, MemoryTransport(SITE, plc), journal=journal)
    await ctl.transport.connect()
    await scans(ctl, 2, plc)
    plc.set("leak_reuse", True)
    d = await ctl.scan_once()
    assert d.mode is Mode.LEAK_TRIP and plc.values["reuse_isolation_cmd"] is False
    journal.close()  # the process dies here; the trip was written in the scan that raised it

    plc.set("leak_reuse", False)
    journal = Journal(tmp_path / "heatloop.db")
    ctl = Controller(SITE, MemoryTransport(SITE, plc), journal=journal)
    await ctl.transport.connect()
    await scans(ctl, 3, plc)
    assert ctl.supervisor.mode is Mode.LEAK_TRIP  # dry, but no reset yet
    ctl.reset_trip()
    d = await ctl.scan_once()
    assert d.mode is Mode.DRY_COOLER_REJECT and not d.latched
    assert journal.latched() == frozenset()
    kinds = [k for _, k, _, _ in journal.events(50)]
    assert "trip_latched" in kinds and "trip_reset" in kinds
    journal.close()


async def test_outputs_resent_while_the_plc_watchdog_holds_its_safe_state() -> None:
    """The PLC releases its safe hold only on fresh commands; unchanged outputs must be sent."""
    plc = MemoryPlc(SITE)
    plant_ok(plc)
    ctl = Controller(SITE, MemoryTransport(SITE, plc))
    await ctl.transport.connect()
    await scans(ctl, 3, plc)

    n = len(plc.write_log)
    await scans(ctl, 1, plc)
    steady = {k for w in plc.write_log[n:] for k in w}
    assert "heartbeat" in steady and "reuse_isolation_cmd" not in steady  # changed ones only
    plc.set("plc_watchdog_tripped", True)
    n = len(plc.write_log)
    await scans(ctl, 1, plc)
    assert {k for w in plc.write_log[n:] for k in w} == {t.name for t in SITE.outputs}
