"""An independent Modbus master (mbpoll, libmodbus) against the simulated PLC: it must read what
pymodbus reads and what the plant measures, and its writes must land in the command image."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from plc_io.codec import decode
from plc_io.tags import ModbusTable
from sim.plc import SimPlc
from tests.hil.conftest import ModbusProbe

MBPOLL = shutil.which("mbpoll")
pytestmark = [
    pytest.mark.hil,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(MBPOLL is None, reason="mbpoll not installed (apt-get install mbpoll)"),
]
_LINE = re.compile(r"^\[(\d+)\]:\s+(\S+)")


async def mbpoll(plc: SimPlc, *args: str, write: tuple[str, ...] = ()) -> dict[int, str]:
    """Run mbpoll once (0-based addresses) without blocking the loop the PLC runs in."""
    assert MBPOLL is not None
    proc = await asyncio.create_subprocess_exec(
        MBPOLL,
        "-m",
        "tcp",
        "-a",
        str(plc.site.plc.unit_id),
        "-p",
        str(plc.modbus_port),
        "-0",
        "-1",
        "-o",
        "2",
        *args,
        "127.0.0.1",
        *write,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    return {int(m.group(1)): m.group(2) for line in text.splitlines() if (m := _LINE.match(line))}


async def test_mbpoll_reads_input_registers_like_pymodbus(plc: SimPlc) -> None:
    site = plc.site
    async with ModbusProbe(site, plc.modbus_port) as probe:
        before = (await probe.raw(ModbusTable.INPUT, 0, 28)).registers
        got = await mbpoll(plc, "-t", "3", "-r", "0", "-c", "28")
        after = (await probe.raw(ModbusTable.INPUT, 0, 28)).registers
    assert sorted(got) == list(range(28))
    for tag in site.inputs:
        m = tag.modbus
        if m.table is not ModbusTable.INPUT:
            continue
        span = range(m.address, m.address + m.width)
        raw = [int(got[a]) & 0xFFFF for a in span]
        value = decode(tag, raw)
        lo, hi = sorted((decode(tag, before[span.start : span.stop]),
                         decode(tag, after[span.start : span.stop])))  # fmt: skip
        res = abs(m.scale) / 2 if m.width == 1 or m.encoding.value == "int32" else 1e-3
        assert lo - res <= value <= hi + res, f"{tag.name}: mbpoll {value}, pymodbus {lo}…{hi}"


async def test_mbpoll_decodes_float32_itself(plc: SimPlc) -> None:
    """mbpoll's own float decoding (big-endian words, -B) agrees with the measured IT power."""
    site = plc.site
    tag = site.tag("it_power")
    assert tag.modbus.word_order == "big"
    before = float(plc.measured()["it_power"])
    got = await mbpoll(plc, "-t", "3:float", "-B", "-r", str(tag.modbus.address), "-c", "1")
    after = float(plc.measured()["it_power"])
    value = float(got[tag.modbus.address])
    assert min(before, after) - 1e-3 <= value <= max(before, after) + 1e-3


async def test_mbpoll_reads_coils_and_discrete_inputs(plc: SimPlc) -> None:
    site = plc.site
    coils = [t for t in site.outputs if t.modbus.table is ModbusTable.COIL]
    discrete = [t for t in site.inputs if t.modbus.table is ModbusTable.DISCRETE]
    async with ModbusProbe(site, plc.modbus_port) as probe:
        pm_coils = (await probe.raw(ModbusTable.COIL, 0, len(coils))).bits[: len(coils)]
        pm_discrete = (await probe.raw(ModbusTable.DISCRETE, 0, len(discrete))).bits
    got_coils = await mbpoll(plc, "-t", "0", "-r", "0", "-c", str(len(coils)))
    got_discrete = await mbpoll(plc, "-t", "1", "-r", "0", "-c", str(len(discrete)))
    assert [got_coils[i] == "1" for i in range(len(coils))] == pm_coils
    outputs, measured = plc.outputs(), plc.measured()
    for t in coils:
        assert (got_coils[t.modbus.address] == "1") == outputs[t.name], t.name
    for t in discrete:
        assert (got_discrete[t.modbus.address] == "1") == pm_discrete[t.modbus.address], t.name
        assert (got_discrete[t.modbus.address] == "1") == measured[t.name], t.name
    # outside the map: mbpoll reports the PLC's illegal-address answer and fails
    proc = await asyncio.create_subprocess_exec(
        MBPOLL or "mbpoll",
        *("-m", "tcp", "-a", "1", "-p", str(plc.modbus_port), "-0", "-1", "-o", "1"),
        *("-t", "0", "-r", "0", "-c", str(len(coils) + 1), "127.0.0.1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode != 0 or b"Illegal data address" in out, out.decode()


async def test_mbpoll_writes_a_little_endian_float_into_the_command_image(plc: SimPlc) -> None:
    tag = plc.site.tag("drycooler_fan_cmd")
    assert tag.modbus.word_order == "little"  # mbpoll's default word order
    await mbpoll(plc, "-t", "4:float", "-r", str(tag.modbus.address), write=("62.5",))
    assert plc.commanded()["drycooler_fan_cmd"] == 62.5
    await mbpoll(plc, "-t", "4:float", "-r", str(tag.modbus.address), write=("100",))
    assert plc.commanded()["drycooler_fan_cmd"] == 100.0
