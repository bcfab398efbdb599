"""The simulated PLC over real loopback sockets: Modbus map, OPC UA view, watchdog, comms faults.

Invariants first: what a client reads is what the plant measures (within encoding resolution);
what a client writes is what the plant gets, unless the watchdog holds the safe state; the
watchdog trips no earlier than `watchdog_s` and no later than `watchdog_s` plus one plant step,
and releases only after a steady heartbeat for the hold-off and fresh commands.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from pymodbus.exceptions import ModbusException

from plc_io.codec import decode_block, plan_reads
from plc_io.site import Site, demo_site_text
from plc_io.tags import Encoding, ModbusTable, Tag, Value
from sim.faults import FaultError
from sim.plc import SimPlc
from tests.hil.conftest import (
    HOLDOFF_S,
    WATCHDOG_S,
    Heartbeat,
    ModbusProbe,
    free_port,
    make_plc,
    release_watchdog,
    wait_for,
)
from tests.unit.test_plant_faults import ZONE_FAULT, supervised_site

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="session")]

NS = "urn:heatloop:plc"
STEP_S = 0.1  # demo site's plant step at speed 1
LATE_S = 1.0  # scheduling slack on a loaded machine: a bound, not a measurement


def resolution(tag: Tag, value: float) -> float:
    m = tag.modbus
    if m.encoding is Encoding.FLOAT32:
        return 1e-6 * max(1.0, abs(value))
    return abs(m.scale) / 2 + 1e-9


def assert_between(tag: Tag, got: Value, a: Value, b: Value) -> None:
    """`got` (read over a wire) agrees with a measured value taken just before or just after."""
    if tag.is_bool:
        assert got in (a, b), f"{tag.name}: read {got!r}, measured {a!r} / {b!r}"
        return
    lo, hi = min(float(a), float(b)), max(float(a), float(b))
    res = resolution(tag, hi)
    assert lo - res <= float(got) <= hi + res, f"{tag.name}: read {got}, measured {a}…{b}"


async def read_inputs(probe: ModbusProbe, site: Site) -> dict[str, Value]:
    """Every input tag the way the controller reads them: the codec's coalesced read plan."""
    got: dict[str, Value] = {}
    for block in plan_reads(site.inputs, site.plc.gap_registers, site.plc.gap_bits):
        rr = await probe.raw(block.table, block.start, block.count)
        assert not rr.isError(), f"{block}: {rr}"
        got.update(decode_block(block, rr.bits if block.is_bits else rr.registers))
    return got


@pytest_asyncio.fixture(loop_scope="session")
async def opc(plc: SimPlc) -> AsyncIterator[tuple[Client, int]]:
    client = Client(f"opc.tcp://127.0.0.1:{plc.opcua_port}/", timeout=2)
    async with client:
        yield client, await client.get_namespace_index(NS)


def plc_node(opc: tuple[Client, int], tag: str) -> object:
    client, ns = opc
    return client.get_node(ua.NodeId(f"PLC.{tag}", ns))


# ---- Modbus map ----


async def test_inputs_over_modbus_decode_to_the_measured_values(plc: SimPlc) -> None:
    site = plc.site
    async with ModbusProbe(site, plc.modbus_port) as probe:
        before = plc.measured()
        got = await read_inputs(probe, site)
        after = plc.measured()
    assert set(got) == {t.name for t in site.inputs}
    for tag in site.inputs:
        assert_between(tag, got[tag.name], before[tag.name], after[tag.name])


async def test_outputs_written_over_modbus_reach_the_plant(plc: SimPlc) -> None:
    site = plc.site
    cmds: dict[str, Value] = {
        "drycooler_fan_cmd": 40.0,
        "reuse_valve_cmd": 50.0,
        "customer_isolation_cmd": True,
        "reuse_isolation_cmd": True,
    }
    async with (
        ModbusProbe(site, plc.modbus_port) as probe,
        Heartbeat(site, plc.modbus_port) as beat,
    ):
        await release_watchdog(plc, probe, beat)
        for name, value in cmds.items():
            await probe.write_ok(name, value)
        for name, value in cmds.items():
            assert plc.commanded()[name] == value
            assert plc.outputs()[name] == value
            assert await probe.read(name) == value
        await wait_for(lambda: plc.truth()["fan_power_kw"] < 1.0, 1.0)  # 40 % fan
        await wait_for(lambda: plc.truth()["reuse_valve_pos_pct"] > 0.5, 2.0)  # valve opening
        for name in cmds:
            await probe.write_ok(name, site.tag(name).safe)  # type: ignore[arg-type]


async def test_a_two_register_value_can_be_written_one_register_at_a_time(plc: SimPlc) -> None:
    site = plc.site
    tag = site.tag("drycooler_fan_cmd")  # float32, little word order: low word first
    async with ModbusProbe(site, plc.modbus_port) as probe:
        await probe.write_ok("drycooler_fan_cmd", 100.0)  # 0x42C80000 -> [0x0000, 0x42C8]
        rr = await probe.client.write_register(tag.modbus.address + 1, 0x4248, device_id=1)
        assert not rr.isError()
    assert plc.commanded()["drycooler_fan_cmd"] == 50.0  # 0x42480000


async def test_anything_outside_the_map_is_refused(plc: SimPlc) -> None:
    site = plc.site
    u = site.plc.unit_id
    async with ModbusProbe(site, plc.modbus_port) as probe:
        c = probe.client
        commanded = plc.commanded()
        refused = {
            "write holding 20 (an input register's address)": await c.write_register(
                20, 1, device_id=u
            ),
            "write holding 100": await c.write_register(100, 1, device_id=u),
            "write coil 5": await c.write_coil(5, True, device_id=u),
            "write coils 3..5": await c.write_coils(3, [True, True, True], device_id=u),
            "read input 100": await c.read_input_registers(100, count=1, device_id=u),
            "read input 27..28": await c.read_input_registers(27, count=2, device_id=u),
            "read holding 6": await c.read_holding_registers(6, count=1, device_id=u),
            "read coils 0..5": await c.read_coils(0, count=6, device_id=u),
            "read discrete 8": await c.read_discrete_inputs(8, count=1, device_id=u),
        }
        for what, rr in refused.items():
            assert rr.isError() and rr.exception_code == 2, f"{what}: {rr}"
        # values outside the tag's range: illegal value, nothing applied
        rr = await c.write_register(0, 20000, device_id=u)  # reuse_valve_cmd 200 %
        assert rr.isError() and rr.exception_code == 3, rr
        rr = await c.write_registers(1, [0, 0x7FC0], device_id=u)  # drycooler_fan_cmd NaN
        assert rr.isError() and rr.exception_code == 3, rr
        # an unknown unit id: device failure, as pymodbus's own simulator answers
        rr = await c.read_input_registers(0, count=1, device_id=u + 1)
        assert rr.isError() and rr.exception_code == 4, rr
        # a read across the holes between tags is fine (the controller's read plan does it)
        rr = await c.read_input_registers(0, count=28, device_id=u)
        assert not rr.isError() and len(rr.registers) == 28
    assert plc.commanded() == commanded


# ---- OPC UA view ----


async def test_opcua_plc_view_agrees_with_modbus(plc: SimPlc, opc: tuple[Client, int]) -> None:
    site = plc.site
    client, ns = opc
    # the contract is the browse path Objects/PLC/<tag>
    node = await client.nodes.objects.get_child([f"{ns}:PLC", f"{ns}:it_supply_temp"])
    assert node.nodeid == ua.NodeId("PLC.it_supply_temp", ns)
    nodes = [plc_node(opc, t.name) for t in site.tags]
    await asyncio.sleep(1.5 * STEP_S)  # the OPC UA view refreshes once per plant step
    async with ModbusProbe(site, plc.modbus_port) as probe:
        for attempt in range(3):  # a plant step may land between the three reads
            before = await read_inputs(probe, site)
            names = [t.name for t in site.tags]
            values = dict(zip(names, await client.read_values(nodes), strict=True))
            after = await read_inputs(probe, site)
            try:
                for tag in site.inputs:
                    assert_between(tag, values[tag.name], before[tag.name], after[tag.name])
                break
            except AssertionError:
                if attempt == 2:
                    raise
        outputs = plc.outputs()
        for tag in site.outputs:
            assert values[tag.name] == pytest.approx(outputs[tag.name]), tag.name
            assert isinstance(values[tag.name], bool) == tag.is_bool


async def test_opcua_write_lands_in_the_command_image(plc: SimPlc, opc: tuple[Client, int]) -> None:
    site = plc.site
    valve = plc_node(opc, "reuse_valve_cmd")
    async with (
        ModbusProbe(site, plc.modbus_port) as probe,
        Heartbeat(site, plc.modbus_port) as beat,
    ):
        await release_watchdog(plc, probe, beat)
        await valve.write_value(ua.Variant(33.0, ua.VariantType.Double))  # type: ignore[attr-defined]
        assert plc.commanded()["reuse_valve_cmd"] == 33.0
        assert plc.outputs()["reuse_valve_cmd"] == 33.0
        assert await probe.read("reuse_valve_cmd") == pytest.approx(33.0)
        await plc_node(opc, "secondary_pump_cmd").write_value(True)  # type: ignore[attr-defined]
        assert plc.commanded()["secondary_pump_cmd"] is True
        assert await probe.read("secondary_pump_cmd") is True
        # and a Modbus write shows in the OPC UA view
        await probe.write_ok("reuse_valve_cmd", 12.5)
        await wait_for(lambda: plc.outputs()["reuse_valve_cmd"] == 12.5, 0.5)
        deadline = time.monotonic() + 1.0
        while await valve.read_value() != pytest.approx(12.5):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "Modbus write not shown over OPC UA"
            await asyncio.sleep(0.02)
        await probe.write_ok("reuse_valve_cmd", 0.0)
        await probe.write_ok("secondary_pump_cmd", False)


async def test_opcua_refuses_bad_writes_item_by_item(plc: SimPlc, opc: tuple[Client, int]) -> None:
    client, ns = opc
    cases = [
        ("PLC.reuse_valve_cmd", ua.Variant(150.0, ua.VariantType.Double), "BadOutOfRange"),
        ("PLC.reuse_valve_cmd", ua.Variant(10.0, ua.VariantType.Float), "BadTypeMismatch"),
        ("PLC.secondary_pump_cmd", ua.Variant(1.0, ua.VariantType.Double), "BadTypeMismatch"),
        ("PLC.it_supply_temp", ua.Variant(20.0, ua.VariantType.Double), "BadNotWritable"),
        ("Sim.Plant.it_supply_temp_c", ua.Variant(20.0, ua.VariantType.Double), "BadNotWritable"),
        ("PLC.drycooler_fan_cmd", ua.Variant(100.0, ua.VariantType.Double), "Good"),
    ]
    params = ua.WriteParameters(
        NodesToWrite=[
            ua.WriteValue(
                NodeId=ua.NodeId(nid, ns),
                AttributeId=ua.AttributeIds.Value,
                Value=ua.DataValue(v),
            )
            for nid, v, _ in cases
        ]
    )
    before = plc.commanded()
    results = await client.uaclient.write(params)
    assert [r.name for r in results] == [want for _, _, want in cases]
    assert plc.commanded()["reuse_valve_cmd"] == before["reuse_valve_cmd"]


async def test_sim_plant_folder_shows_true_values_and_the_watchdog(
    plc: SimPlc, opc: tuple[Client, int]
) -> None:
    client, ns = opc
    plant = await client.nodes.objects.get_child([f"{ns}:Sim", f"{ns}:Plant"])
    names = {(await n.read_browse_name()).Name for n in await plant.get_children()}
    assert set(plc.truth()) | {"watchdog_tripped", "watchdog_trips"} <= names
    supply = await plant.get_child(f"{ns}:it_supply_temp_c")
    assert await supply.read_value() == pytest.approx(plc.truth()["it_supply_temp_c"], abs=0.5)
    tripped = await plant.get_child(f"{ns}:watchdog_tripped")
    trips = await plant.get_child(f"{ns}:watchdog_trips")
    await asyncio.sleep(0.15)  # one publish
    assert await tripped.read_value() == plc.watchdog_tripped
    assert await trips.read_value() == plc.watchdog_trips


# ---- watchdog ----


async def test_watchdog_holds_the_safe_state_from_power_up(shared_sim_plc: SimPlc) -> None:
    plc = shared_sim_plc
    assert plc.initial_tripped is True  # type: ignore[attr-defined]
    assert plc.initial_trips == 0  # type: ignore[attr-defined]
    assert plc.initial_outputs == plc.site.safe_outputs()  # type: ignore[attr-defined]


async def test_watchdog_trips_after_watchdog_s_and_not_before(plc: SimPlc) -> None:
    site = plc.site
    safe = site.safe_outputs()
    cmds: dict[str, Value] = {"drycooler_fan_cmd": 30.0, "reuse_valve_cmd": 60.0}
    async with (
        ModbusProbe(site, plc.modbus_port) as probe,
        Heartbeat(site, plc.modbus_port) as beat,
    ):
        await release_watchdog(plc, probe, beat)
        trips = plc.watchdog_trips
        for name, value in cmds.items():
            await probe.write_ok(name, value)
        await asyncio.sleep(3 * STEP_S)
        assert not plc.watchdog_tripped
        for name, value in cmds.items():  # with heartbeats, outputs follow the commands
            assert plc.outputs()[name] == value
            assert await probe.read(name) == pytest.approx(value)

        last_beat = await beat.stop()
        await asyncio.sleep(max(0.0, last_beat + 0.8 * WATCHDOG_S - time.monotonic()))
        assert not plc.watchdog_tripped, "tripped before watchdog_s"
        assert await probe.read("plc_watchdog_tripped") is False
        assert await probe.read("drycooler_fan_cmd") == pytest.approx(30.0)

        # the safe values as a Modbus client sees them, within watchdog_s + one plant step
        while await probe.read("drycooler_fan_cmd") != safe["drycooler_fan_cmd"]:
            assert time.monotonic() - last_beat < WATCHDOG_S + STEP_S + LATE_S, "trip too late"
            await asyncio.sleep(0.005)
        seen_s = time.monotonic() - last_beat
        # never early (the watchdog counts from the last beat it received, which is after
        # `last_beat`); late only by scheduling, bounded generously so a loaded machine passes
        assert WATCHDOG_S - 0.05 <= seen_s <= WATCHDOG_S + STEP_S + LATE_S, seen_s

        assert plc.watchdog_tripped
        assert plc.watchdog_trips == trips + 1
        assert plc.outputs() == safe
        assert plc.commanded()["drycooler_fan_cmd"] == 30.0  # the commands are kept, not used
        for name, value in safe.items():
            assert await probe.read(name) == pytest.approx(value)
        assert await probe.read("plc_watchdog_tripped") is True
        assert await probe.read("plc_watchdog_trips") == float(trips + 1)
        await wait_for(lambda: plc.truth()["fan_power_kw"] > 7.0, 1.0)  # the plant got them


async def test_watchdog_release_needs_steady_heartbeat_for_holdoff_and_fresh_commands(
    plc: SimPlc,
) -> None:
    site = plc.site
    async with (
        ModbusProbe(site, plc.modbus_port) as probe,
        Heartbeat(site, plc.modbus_port) as beat,
    ):
        await wait_for(lambda: plc.watchdog_tripped, WATCHDOG_S + 0.5)
        trips = plc.watchdog_trips

        # commands written while the heartbeat is still stopped do not count
        await probe.write_ok("drycooler_fan_cmd", 45.0)
        beat.start()
        await asyncio.sleep(3 * HOLDOFF_S)
        assert plc.watchdog_tripped, "released on heartbeat alone"
        assert plc.outputs()["drycooler_fan_cmd"] == 100.0

        # heartbeat steady for the hold-off, then a fresh command: released at once
        await probe.write_ok("drycooler_fan_cmd", 45.0)
        await wait_for(lambda: not plc.watchdog_tripped, 0.2)
        assert plc.outputs()["drycooler_fan_cmd"] == 45.0
        assert await probe.read("plc_watchdog_tripped") is False
        assert plc.watchdog_trips == trips

        # trip again; a fresh command soon after the heartbeat resumes waits for the hold-off
        await beat.stop()
        await wait_for(lambda: plc.watchdog_tripped, WATCHDOG_S + STEP_S + 0.1)
        assert plc.watchdog_trips == trips + 1
        resumed = time.monotonic()
        beat.start()
        await asyncio.sleep(0.1)
        await probe.write_ok("drycooler_fan_cmd", 55.0)
        await asyncio.sleep(max(0.0, resumed + 0.7 * HOLDOFF_S - time.monotonic()))
        assert plc.watchdog_tripped, "released before the hold-off"
        released = await wait_for(lambda: not plc.watchdog_tripped, HOLDOFF_S + 0.3)
        assert released - resumed >= HOLDOFF_S - 0.02
        assert plc.outputs()["drycooler_fan_cmd"] == 55.0
        assert plc.watchdog_trips == trips + 1
        await probe.write_ok("drycooler_fan_cmd", 100.0)


# ---- faults ----


async def test_comms_drop_via_opcua_method_silences_modbus_then_recovers(
    plc: SimPlc, opc: tuple[Client, int]
) -> None:
    client, ns = opc
    site = plc.site
    sim = await client.nodes.objects.get_child([f"{ns}:Sim"])
    inject = f"{ns}:InjectFault"
    for args, status in [
        (("no_such_fault", "", 1.0), ua.StatusCodes.BadInvalidArgument),
        (("comms_drop", "", -1.0), ua.StatusCodes.BadInvalidArgument),
        (("leak", "kitchen", 1.0), ua.StatusCodes.BadInvalidArgument),
        (("comms_drop", "", "1.5"), ua.StatusCodes.BadTypeMismatch),
        (("comms_drop",), ua.StatusCodes.BadArgumentsMissing),
    ]:
        with pytest.raises(ua.UaStatusCodeError) as err:
            await sim.call_method(inject, *args)
        assert err.value.code == status, args
    assert not plc.faults.active(plc.now())

    temp = plc_node(opc, "it_supply_temp")
    fan = plc_node(opc, "drycooler_fan_cmd")
    async with ModbusProbe(site, plc.modbus_port) as probe:
        assert not (await probe.raw(ModbusTable.INPUT, 0, 1)).isError()
        message = await sim.call_method(inject, "comms_drop", "", 1.5)
        dropped_at = time.monotonic()
        assert "comms_drop" in message
        t = time.monotonic()
        with pytest.raises(ModbusException):  # no reply: the client times out
            await probe.raw(ModbusTable.INPUT, 0, 1)
        assert 0.4 <= time.monotonic() - t < 1.0

        deadline = time.monotonic() + 0.5
        while (await temp.read_data_value(raise_on_bad_status=False)).StatusCode.value != (  # type: ignore[attr-defined]
            ua.StatusCodes.BadNoCommunication
        ):
            assert time.monotonic() < deadline, "OPC UA view not BadNoCommunication"
            await asyncio.sleep(0.02)
        with pytest.raises(ua.UaStatusCodeError) as err:
            await fan.write_value(ua.Variant(50.0, ua.VariantType.Double))  # type: ignore[attr-defined]
        assert err.value.code == ua.StatusCodes.BadNoCommunication
        plant_supply = await sim.get_child([f"{ns}:Plant", f"{ns}:it_supply_temp_c"])
        assert await plant_supply.read_value() > 0  # the instrument itself still answers

        await asyncio.sleep(max(0.0, dropped_at + 1.5 + 0.1 - time.monotonic()))
        for _ in range(3):  # the client may have closed the silent connection: reconnect
            if not probe.client.connected:
                await probe.client.connect()
            try:
                rr = await probe.raw(ModbusTable.INPUT, 0, 1)
                break
            except ModbusException:
                await asyncio.sleep(0.1)
        assert not rr.isError(), rr
        await wait_for(lambda: not plc.faults.dropped(plc.now()), 0.1)
        deadline = time.monotonic() + 0.5
        while not (await temp.read_data_value(raise_on_bad_status=False)).StatusCode.is_good():  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "OPC UA view did not come back"
            await asyncio.sleep(0.02)


async def test_targeted_plc_faults_clear_one_target_or_all(plc: SimPlc) -> None:
    plc.inject("write_refused", "coil", 4.0)
    plc.inject("write_refused", "holding", 4.0)
    plc.clear("write_refused", "coil")
    assert plc.faults.write_refusal("coil") is None
    assert plc.faults.write_refusal("holding") == 4
    with pytest.raises(FaultError) as err:
        plc.clear("write_refused", "coil")  # no longer in force: named, not ignored
    assert err.value.field == "target"
    with pytest.raises(FaultError):
        plc.clear("comms_garble", "modbus")  # untargeted faults take no target
    plc.clear("write_refused")
    assert plc.faults.write_refusal("holding") is None


async def test_comms_error_slow_and_garble(plc: SimPlc) -> None:
    site = plc.site
    async with ModbusProbe(site, plc.modbus_port) as probe:
        plc.inject("comms_error", value=4)
        rr = await probe.raw(ModbusTable.INPUT, 0, 2)
        assert rr.isError() and rr.exception_code == 4
        rr = await probe.write("reuse_valve_cmd", 10.0)
        assert rr.isError() and rr.exception_code == 4
        plc.clear("comms_error")
        assert not (await probe.raw(ModbusTable.INPUT, 0, 2)).isError()

        plc.inject("comms_garble")
        rr = await probe.raw(ModbusTable.INPUT, 0, 5)
        assert not rr.isError() and len(rr.registers) == 4  # one register short
        plc.clear("comms_garble")
        assert len((await probe.raw(ModbusTable.INPUT, 0, 5)).registers) == 5

    slow_s = 0.5
    plc.inject("comms_slow", value=slow_s)
    async with ModbusProbe(site, plc.modbus_port, timeout_s=4 * slow_s) as patient:
        t = time.monotonic()
        assert not (await patient.raw(ModbusTable.INPUT, 0, 1)).isError()
        assert time.monotonic() - t >= slow_s  # never faster than the fault says
        plc.clear("comms_slow")
        t = time.monotonic()
        assert not (await patient.raw(ModbusTable.INPUT, 0, 1)).isError()
        assert time.monotonic() - t < slow_s  # the delay is gone (a bound, not a timing)

    for name, target, value, field in [
        ("comms_error", "", 9.0, "value"),
        ("comms_slow", "", 0.0, "value"),
        ("comms_drop", "", math.inf, "value"),
        ("comms_garble", "modbus", 1.0, "target"),
        ("nope", "", 1.0, "name"),
    ]:
        with pytest.raises(FaultError) as err:
            plc.inject(name, target, value)
        assert err.value.field == field
        assert "expected" in str(err.value)
    assert not plc.faults.active(plc.now())


async def test_plant_fault_via_opcua_shows_on_modbus(plc: SimPlc, opc: tuple[Client, int]) -> None:
    client, ns = opc
    sim = await client.nodes.objects.get_child([f"{ns}:Sim"])
    async with ModbusProbe(plc.site, plc.modbus_port) as probe:
        assert await probe.read("leak_reuse") is False
        await sim.call_method(f"{ns}:InjectFault", "leak", "reuse", 5.0)
        await wait_for(lambda: plc.measured()["leak_reuse"] is True, 1.0)
        assert await probe.read("leak_reuse") is True
        await sim.call_method(f"{ns}:ClearFault", "leak", "reuse")
        await wait_for(lambda: plc.measured()["leak_reuse"] is False, 1.0)
        assert await probe.read("leak_reuse") is False
        await sim.call_method(f"{ns}:InjectFault", "comms_garble", "", 1.0)
        await sim.call_method(f"{ns}:ClearAllFaults")
        assert not plc.faults.active(plc.now())


async def test_a_cut_leak_cable_reads_wet_and_a_cut_fault_wire_reads_faulted_over_modbus(
    plc: SimPlc,
) -> None:
    site = plc.site
    assert site.tag("leak_reuse").fail_state is True  # the demo site: de-energise-to-trip
    assert site.tag("drycooler_fault").fail_state is True
    async with ModbusProbe(site, plc.modbus_port) as probe:
        assert await probe.read("leak_reuse") is False
        assert await probe.read("drycooler_fault") is False
        plc.inject("sensor_fail", "leak_reuse")
        assert await probe.read("leak_reuse") is True  # a cut cable reads wet
        assert await probe.read("leak_primary") is False  # the other zone is untouched
        plc.inject("sensor_fail", "drycooler_fault")
        assert await probe.read("drycooler_fault") is True  # a cut wire reads faulted
        plc.clear("sensor_fail", "leak_reuse")
        plc.clear("sensor_fail", "drycooler_fault")
        assert await probe.read("leak_reuse") is False
        assert await probe.read("drycooler_fault") is False


async def test_a_cut_supervised_leak_cable_trips_its_zone_fault_input_over_modbus() -> None:
    site = supervised_site()  # leak_reuse supervised by a zone fault contact, no fail_state
    async with make_plc(site) as plc, ModbusProbe(site, plc.modbus_port) as probe:
        assert await probe.read(ZONE_FAULT) is False
        plc.inject("sensor_fail", "leak_reuse")
        assert await probe.read(ZONE_FAULT) is True  # the controller sees the zone invalid
        assert await probe.read("leak_reuse") is False
        plc.clear("sensor_fail", "leak_reuse")
        assert await probe.read(ZONE_FAULT) is False


async def test_a_dead_dry_cooler_reads_faulted_over_modbus(plc: SimPlc) -> None:
    async with ModbusProbe(plc.site, plc.modbus_port) as probe:
        assert await probe.read("drycooler_fault") is False
        plc.inject("drycooler_fan_fail")
        assert await probe.read("drycooler_fault") is True
        plc.clear("drycooler_fan_fail")
        assert await probe.read("drycooler_fault") is False


# ---- the command ----


async def test_sim_serve_runs_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    modbus_port, opcua_port = free_port(), free_port()
    text = demo_site_text().replace("port = 5020", f"port = {modbus_port}", 1)
    text = text.replace("opcua_port = 4841", f"opcua_port = {opcua_port}", 1)
    site_file = tmp_path / "site.toml"
    site_file.write_text(text, encoding="utf-8")
    root = Path(__file__).resolve().parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli",  # the one entry point of `heatloop sim serve`
        "sim",
        "serve",
        "--site",
        str(site_file),
        "--speed",
        "5",
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            while b"simulated PLC:" not in (line := await proc.stdout.readline()):
                assert line, "sim serve ended before serving"
        from tests.hil.conftest import fast_site

        async with ModbusProbe(fast_site(), modbus_port) as probe:
            assert isinstance(await probe.read("it_supply_temp"), float)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            out = await proc.stdout.read()
            assert await proc.wait() == 0, out.decode()
        assert b"sim_plc_stopped" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_broken_watchdog_never_trips_until_the_fault_is_cleared(plc: SimPlc) -> None:
    """`watchdog_broken` (the watchdog rung deleted): outputs stay as commanded through a
    silent heartbeat well past watchdog_s; clearing it restores supervision from that moment."""
    site = plc.site
    async with (
        ModbusProbe(site, plc.modbus_port) as probe,
        Heartbeat(site, plc.modbus_port) as beat,
    ):
        await release_watchdog(plc, probe, beat)
        trips = plc.watchdog_trips
        await probe.write_ok("drycooler_fan_cmd", 30.0)
        plc.inject("watchdog_broken")
        last_beat = await beat.stop()
        await asyncio.sleep(max(0.0, last_beat + 3 * WATCHDOG_S - time.monotonic()))
        assert not plc.watchdog_tripped, "a broken watchdog tripped"
        assert plc.watchdog_trips == trips
        assert plc.outputs()["drycooler_fan_cmd"] == 30.0
        assert await probe.read("drycooler_fan_cmd") == pytest.approx(30.0)
        assert await probe.read("plc_watchdog_tripped") is False

        cleared = time.monotonic()
        plc.clear("watchdog_broken")
        assert not plc.watchdog_tripped, "tripped at once on clearing: timed from before"
        tripped = await wait_for(lambda: plc.watchdog_tripped, WATCHDOG_S + STEP_S + LATE_S)
        assert tripped - cleared >= WATCHDOG_S - 0.05, "not timed from the clearing"
        assert plc.outputs() == site.safe_outputs()
        assert plc.watchdog_trips == trips + 1
