"""Raw Modbus/TCP frames against the simulated PLC: every answer is the one the spec prescribes.

Invariant (Modbus Application Protocol Specification V1.1b3, §4.4, §6, §7): every request gets
exactly one answer with its own transaction id, in order, however the requests are split into or
packed together in TCP segments. An exception answer is the function code + 0x80 followed by one
exception code: 1 for a function code the PLC does not implement, 3 for a quantity, byte count,
coil value or PDU length the function does not allow, 2 for an address span outside the map; a
refused request changes nothing. The expected bytes below are built from the spec's layouts and
the site's tag table, never copied from a run.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from plc_io.tags import ModbusTable, Tag
from sim.plc import SimPlc
from tests.hil.conftest import wait_for

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="session")]

MBAP = struct.Struct(">HHHB")
ANSWER_TIMEOUT_S = 2.0  # generous: an answer either comes at once or never


class RawModbus:
    """A bare Modbus/TCP connection: send any bytes, read whole answers (MBAP + PDU)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tid = 0x1200

    async def __aenter__(self) -> RawModbus:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    def frame(self, pdu: bytes, unit: int = 1, tid: int | None = None, pid: int = 0) -> bytes:
        if tid is None:
            self.tid += 1
            tid = self.tid
        return MBAP.pack(tid, pid, len(pdu) + 1, unit) + pdu

    async def answer(self) -> tuple[int, int, bytes]:
        """(transaction id, unit id, PDU) of the next answer; checks the MBAP header."""
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            tid, pid, length, unit = MBAP.unpack(await self.reader.readexactly(MBAP.size))
            assert pid == 0, f"protocol id {pid}"
            assert 2 <= length <= 254, f"MBAP length {length}"
            return tid, unit, await self.reader.readexactly(length - 1)

    async def ask(self, pdu: bytes, unit: int = 1) -> bytes:
        """Send one request; return its answer's PDU (same transaction id and unit)."""
        self.writer.write(self.frame(pdu, unit))
        await self.writer.drain()
        tid, got_unit, answer = await self.answer()
        assert (tid, got_unit) == (self.tid, unit)
        return answer

    async def silent(self, within_s: float = 0.3) -> bool:
        """True if nothing arrives for `within_s` (a request that must get no answer)."""
        try:
            async with asyncio.timeout(within_s):
                await self.reader.read(1)
        except TimeoutError:
            return True
        return False


def exc(fc: int, code: int) -> bytes:
    """The spec's exception PDU."""
    return bytes((fc | 0x80, code))


def req(fc: int, *words: int) -> bytes:
    return struct.pack(f">B{len(words)}H", fc, *words)


def extent(plc: SimPlc, table: ModbusTable) -> tuple[int, int]:
    """First and last mapped address of a table, from the site's tag table."""
    spans = [
        (t.modbus.address, t.modbus.address + t.modbus.width - 1)
        for t in plc.site.tags
        if t.modbus.table is table
    ]
    return min(a for a, _ in spans), max(b for _, b in spans)


def coil(plc: SimPlc, name: str) -> Tag:
    tag = plc.site.tag(name)
    assert tag.modbus.table is ModbusTable.COIL
    return tag


@pytest_asyncio.fixture(loop_scope="session")
async def raw(plc: SimPlc) -> AsyncIterator[RawModbus]:
    async with RawModbus(plc.modbus_port) as conn:
        yield conn


async def test_a_bad_read_quantity_answers_exception_3(plc: SimPlc, raw: RawModbus) -> None:
    # FC01/02: 1..2000 bits; FC03/04: 1..125 registers (§6.1-6.4). The quantity is checked
    # before the address, so a zero quantity at an unmapped address is still exception 3.
    cases = [
        (1, 0, 0),
        (1, 0, 2001),
        (2, 0, 0),
        (2, 0, 2001),
        (3, 0, 0),
        (3, 0, 126),
        (3, 0, 200),
        (4, 0, 0),
        (4, 0, 126),
        (4, 0, 200),
        (4, 0, 0xFFFF),
        (4, 60000, 0),
    ]
    for fc, address, count in cases:
        assert await raw.ask(req(fc, address, count)) == exc(fc, 3), (fc, address, count)
    # the limits themselves are legal quantities: refused only because the demo map is smaller
    # than them, so with the address exception (2), not the quantity one
    for fc, table, limit in [(4, ModbusTable.INPUT, 125), (2, ModbusTable.DISCRETE, 2000)]:
        lo, hi = extent(plc, table)
        assert hi - lo + 1 < limit
        assert await raw.ask(req(fc, lo, limit)) == exc(fc, 2)


async def test_an_unknown_function_code_answers_exception_1(raw: RawModbus) -> None:
    # codes the PLC does not implement (diagnostics, event counter, report id, device
    # identification, FIFO, file records, user-defined, reserved) and the exception range itself
    for fc in (0x00, 0x07, 0x08, 0x0B, 0x0C, 0x11, 0x14, 0x15, 0x18, 0x2B, 0x41, 0x64, 0x7F):
        assert await raw.ask(bytes((fc, 0, 0, 0, 1))) == exc(fc, 1), hex(fc)
    assert await raw.ask(bytes((0x83, 0, 0, 0, 1))) == bytes((0x83, 1))
    assert await raw.ask(bytes((0x2B, 0x0E, 0x01, 0x00))) == exc(0x2B, 1)  # no body needed


async def test_fc05_accepts_only_ff00_and_0000(plc: SimPlc, raw: RawModbus) -> None:
    tag = coil(plc, "customer_isolation_cmd")
    a = tag.modbus.address
    before = plc.commanded()
    for value in (0x0001, 0x00FF, 0xFF01, 0xFFFF, 0x1234, 0x8000):
        assert await raw.ask(req(5, a, value)) == exc(5, 3), hex(value)
        assert plc.commanded() == before, f"FC05 {value:#06x} was applied"
    # the two legal values: the answer is the echo of the request, and the command lands
    for on in (True, False, before[tag.name]):
        value = 0xFF00 if on else 0x0000
        assert await raw.ask(req(5, a, value)) == req(5, a, value)
        assert plc.commanded()[tag.name] is on
    # out of the map: exception 2 (a legal value), exception 3 first (an illegal one, §6.5)
    _, hi = extent(plc, ModbusTable.COIL)
    assert await raw.ask(req(5, hi + 1, 0xFF00)) == exc(5, 2)
    assert await raw.ask(req(5, hi + 1, 0x1234)) == exc(5, 3)


async def test_fc15_and_fc16_with_a_bad_byte_count_answer_exception_3(
    plc: SimPlc, raw: RawModbus
) -> None:
    c = coil(plc, "customer_isolation_cmd").modbus.address
    h = plc.site.tag("reuse_valve_cmd").modbus.address
    before = plc.commanded()
    bad = {
        # FC15: byte count must be ceil(quantity / 8), the bytes sent must match it
        "fc15 qty 3, count 2": struct.pack(">BHHBBB", 15, c, 3, 2, 0, 0),
        "fc15 qty 9, count 1": struct.pack(">BHHBB", 15, c, 9, 1, 0xFF),
        "fc15 count 1, no data": struct.pack(">BHHB", 15, c, 1, 1),
        "fc15 count 1, two bytes": struct.pack(">BHHBBB", 15, c, 1, 1, 1, 0),
        "fc15 qty 0": struct.pack(">BHHB", 15, c, 0, 0),
        "fc15 qty 1969": struct.pack(">BHHB", 15, c, 1969, 247),
        "fc15 header short": struct.pack(">BHH", 15, c, 1),
        # FC16: byte count must be 2 × quantity, the bytes sent must match it
        "fc16 qty 2, count 2": struct.pack(">BHHBH", 16, h, 2, 2, 0),
        "fc16 qty 1, count 2, 4 bytes": struct.pack(">BHHBHH", 16, h, 1, 2, 0, 0),
        "fc16 qty 1, count 4, 2 bytes": struct.pack(">BHHBH", 16, h, 1, 4, 0),
        "fc16 qty 0": struct.pack(">BHHB", 16, h, 0, 0),
        "fc16 qty 124": struct.pack(">BHHB", 16, h, 124, 248),
        "fc16 odd data": struct.pack(">BHHBB", 16, h, 1, 1, 0),
    }
    for what, pdu in bad.items():
        fc = pdu[0]
        assert await raw.ask(pdu) == exc(fc, 3), what
    assert plc.commanded() == before
    # a well-formed multiple write: the answer is function, address and quantity (§6.11, 6.12)
    state = before["customer_isolation_cmd"]
    good15 = struct.pack(">BHHBB", 15, c, 1, 1, int(bool(state)))
    assert await raw.ask(good15) == struct.pack(">BHH", 15, c, 1)
    valve = plc.site.tag("reuse_valve_cmd")
    raw_valve = round(float(before["reuse_valve_cmd"]) / valve.modbus.scale)
    good16 = struct.pack(">BHHBH", 16, h, 1, 2, raw_valve)
    assert await raw.ask(good16) == struct.pack(">BHH", 16, h, 1)
    after = plc.commanded()
    assert after.pop("reuse_valve_cmd") == pytest.approx(before.pop("reuse_valve_cmd"))
    assert after == before


async def test_a_malformed_pdu_length_answers_exception_3(plc: SimPlc, raw: RawModbus) -> None:
    before = plc.commanded()
    for pdu in (
        bytes((3, 0, 0, 0)),  # one byte short
        bytes((4, 0, 0, 0, 1, 0)),  # one byte too many
        bytes((1,)),
        bytes((6, 0, 0, 0)),
        bytes((5, 0, 0, 0xFF, 0, 0)),
    ):
        assert await raw.ask(pdu) == exc(pdu[0], 3), pdu.hex()
    assert plc.commanded() == before


async def test_an_address_outside_the_map_answers_exception_2(plc: SimPlc, raw: RawModbus) -> None:
    before = plc.commanded()
    ilo, ihi = extent(plc, ModbusTable.INPUT)
    clo, chi = extent(plc, ModbusTable.COIL)
    _, hhi = extent(plc, ModbusTable.HOLDING)
    dlo, dhi = extent(plc, ModbusTable.DISCRETE)
    h = plc.site.tag("reuse_valve_cmd").modbus.address
    cases = [
        req(4, ihi + 1, 1),
        req(4, ihi, 2),
        req(4, 0xFFFF, 125),  # the span runs past 65535
        req(3, hhi + 1, 1),
        req(1, clo, chi - clo + 2),
        req(2, dhi + 1, 1),
        req(2, dlo, 2000),
        req(6, hhi + 1, 0),
        struct.pack(">BHHBH", 16, hhi + 1, 1, 2, 0),
        struct.pack(">BHHBB", 15, chi, 2, 1, 0),
        struct.pack(">BHHBB", 15, chi + 1, 1, 1, 0),
        req(6, plc.site.tag("it_supply_temp").modbus.address + 100, 0),
        struct.pack(">BHHHHBH", 23, ihi + 100, 1, h, 1, 2, 0),  # bad read span: no write
    ]
    for pdu in cases:
        assert await raw.ask(pdu) == exc(pdu[0], 2), pdu.hex()
    assert plc.commanded() == before
    # inside the map, a whole table reads in one request with the spec's byte count
    answer = await raw.ask(req(4, ilo, ihi - ilo + 1))
    assert answer[:2] == bytes((4, 2 * (ihi - ilo + 1))) and len(answer) == 2 + answer[1]
    answer = await raw.ask(req(2, dlo, dhi - dlo + 1))
    assert answer[:2] == bytes((2, (dhi - dlo + 8) // 8)) and len(answer) == 2 + answer[1]


async def test_pipelined_requests_each_get_their_answer_in_order(
    plc: SimPlc, raw: RawModbus
) -> None:
    # reads of outputs show what the plant gets: hold the watchdog's state still (tripped, as
    # no heartbeat runs here) so that every read of the same span has the same answer
    await wait_for(lambda: plc.watchdog_tripped, plc.site.plc.watchdog_s + 1.0)
    hlo, hhi = extent(plc, ModbusTable.HOLDING)
    clo, chi = extent(plc, ModbusTable.COIL)
    holding = req(3, hlo, hhi - hlo + 1)
    coils = req(1, clo, chi - clo + 1)
    # what each read answers on its own (the command image does not move without writes)
    alone = {holding: await raw.ask(holding), coils: await raw.ask(coils)}
    assert alone[holding][:2] == bytes((3, 2 * (hhi - hlo + 1)))
    assert alone[coils][:2] == bytes((1, (chi - clo + 8) // 8))
    # twelve requests, good and bad, in one segment
    batch = [holding, coils, req(3, 0, 0), bytes((0x41, 0, 0)), holding, req(1, chi + 1, 1)]
    batch += [coils, req(5, clo, 0x1234), holding, coils, req(4, 0, 0), holding]
    want = [alone.get(p) for p in batch]
    want[2], want[3], want[5] = exc(3, 3), exc(0x41, 1), exc(1, 2)
    want[7], want[10] = exc(5, 3), exc(4, 3)
    first = raw.tid + 1
    raw.writer.write(b"".join(raw.frame(p) for p in batch))
    await raw.writer.drain()
    got = [await raw.answer() for _ in batch]
    assert [tid for tid, _, _ in got] == list(range(first, first + len(batch)))
    assert [pdu for _, _, pdu in got] == want
    # the same requests byte by byte, with a frame boundary inside a segment
    stream = b"".join(raw.frame(p) for p in batch[:4])
    first = raw.tid - 3
    for i in range(0, len(stream), 5):
        raw.writer.write(stream[i : i + 5])
        await raw.writer.drain()
        await asyncio.sleep(0)
    got = [await raw.answer() for _ in range(4)]
    assert [(tid, pdu) for tid, _, pdu in got] == list(
        zip(range(first, first + 4), want[:4], strict=True)
    )


async def test_framing_other_protocols_and_units(plc: SimPlc, raw: RawModbus) -> None:
    lo, _ = extent(plc, ModbusTable.INPUT)
    read = req(4, lo, 1)
    # a protocol id other than 0 is not Modbus: skipped, and the next frame is answered
    raw.writer.write(raw.frame(read, pid=1))
    await raw.writer.drain()
    assert await raw.silent()
    assert (await raw.ask(read))[:2] == bytes((4, 2))
    # another unit id: device failure (4), in the spec's exception form
    assert await raw.ask(read, unit=plc.site.plc.unit_id + 1) == exc(4, 4)
    # an MBAP length the spec does not allow: the stream cannot be re-synchronised, closed
    async with RawModbus(plc.modbus_port) as other:
        other.writer.write(MBAP.pack(1, 0, 0, 1))
        await other.writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            assert await other.reader.read() == b""
    assert (await raw.ask(read))[:2] == bytes((4, 2))  # other connections carry on
