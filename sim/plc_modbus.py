"""The simulated PLC's Modbus TCP face: the site's tag table served as a Modbus map.

The server is our own small asyncio Modbus/TCP frame handler, not pymodbus's server. Measured on
pymodbus 3.16 (see /work/shared/LIBNOTES.md): its server answers only the first of several
requests that arrive in one TCP read (a pipelining client times out), answers a bad quantity or an
unknown function code with exception 1 in a malformed exception PDU, and takes an FC05 value other
than 0xFF00/0x0000 as ON. Commissioning and integrators practise against this PLC, so it answers
as the Modbus Application Protocol Specification V1.1b3 says (its §6 and §7 state diagrams):

- Requests on one connection are answered one by one, in order, however they arrive in TCP
  segments (pipelined requests each get their answer, with their own transaction id).
- Checks in the spec's order, each with its exception (function code | 0x80, then the code):
  function code not implemented: 1; quantity out of range (reads of registers 1..125, of bits
  1..2000; FC15 1..1968 bits, FC16 1..123 registers, FC23 read 1..125 / write 1..121), a byte
  count that does not match the quantity or the bytes sent, a PDU whose length does not fit its
  function code, an FC05 value other than 0xFF00 / 0x0000: 3; an address span leaving the
  table's map: 2.
- Each table spans its first to its last mapped address; a read leaving that span: exception 2.
  Holes inside it read as 0, because the controller's read plan reads across small gaps. Writes
  are accepted only to output tags' own addresses (else exception 2).
- A written value outside its tag's engineering range (or not finite): exception 3, nothing
  applied. A multi-register value may be written one register at a time (the other half is
  taken from the last written image).
- Reads of outputs return the outputs the plant gets now: while the watchdog holds the safe
  state, the safe values. The answer to a single write (function codes 5 and 6) is the echo of
  the request.
- Unit id other than `plc.unit_id`: exception 4 (device failure), as pymodbus's own simulator.
- Framing: an MBAP header with a protocol id other than 0 is skipped without an answer (the spec:
  not Modbus); a length field below 2 or above 254 means the stream cannot be re-synchronised,
  so the connection is closed.
- Faults: `comms_drop` — no reply at all, nothing applied; `comms_slow` — each request delayed;
  `comms_error` — every request answered with that exception code; `comms_garble` — register
  reads answer with one register fewer than asked for, bit reads with one byte fewer;
  `write_refused` — writes to that table's outputs answered with its code, nothing applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import Mapping
from typing import Protocol

import structlog
from pymodbus.constants import ExcCodes

from plc_io.codec import CodecError, decode, encode
from plc_io.tags import Encoding, ModbusTable, Tag, Value
from sim.plc_faults import CommsFaults

log = structlog.get_logger("sim.plc")

# Which table each implemented function code works on; any other code is exception 1.
_FC_TABLE: dict[int, ModbusTable] = {
    1: ModbusTable.COIL,
    5: ModbusTable.COIL,
    15: ModbusTable.COIL,
    2: ModbusTable.DISCRETE,
    3: ModbusTable.HOLDING,
    6: ModbusTable.HOLDING,
    16: ModbusTable.HOLDING,
    22: ModbusTable.HOLDING,
    23: ModbusTable.HOLDING,
    4: ModbusTable.INPUT,
}
_BIT_TABLES = (ModbusTable.COIL, ModbusTable.DISCRETE)
# Quantity limits of the spec (§6.1-6.4, 6.11, 6.12, 6.17).
_MAX_READ_BITS = 2000
_MAX_READ_REGS = 125
_MAX_WRITE_BITS = 1968
_MAX_WRITE_REGS = 123
_MAX_RW_WRITE_REGS = 121
# MBAP: transaction id, protocol id, length (unit id + PDU), unit id. A PDU is at most 253 bytes.
_MBAP = struct.Struct(">HHHB")
_MAX_LENGTH = 254
_COIL_ON, _COIL_OFF = 0xFF00, 0x0000


class ModbusError(Exception):
    """A request answered with a Modbus exception (the code is the spec's)."""

    def __init__(self, code: ExcCodes) -> None:
        super().__init__(code.name)
        self.code = code


def exception_pdu(function_code: int, code: int) -> bytes:
    """The spec's exception response: the function code with its top bit set, then the code."""
    return bytes(((function_code | 0x80) & 0xFF, code))


def _pack_bits(bits: list[int | bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> list[bool]:
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


_RAW_LIMITS = {
    Encoding.INT16: (-0x8000, 0x7FFF),
    Encoding.UINT16: (0, 0xFFFF),
    Encoding.INT32: (-0x80000000, 0x7FFFFFFF),
}
_FLOAT32_LIMIT = 3.0e38


def encode_saturating(tag: Tag, value: Value) -> list[int] | bool:
    """Encode like a PLC analogue input card: a value the encoding cannot hold saturates.

    NaN (a failed sensor) reads as the raw minimum of a signed encoding (the usual wire-break
    code, far outside any engineering range), the raw maximum of an unsigned one, and -3e38 for
    float32; anything else beyond the encoding clamps to its nearest end.
    """
    try:
        return encode(tag, value)
    except CodecError:
        pass
    m = tag.modbus
    v = float(value)
    if m.encoding is Encoding.FLOAT32:
        sub = -_FLOAT32_LIMIT if math.isnan(v) or v < 0 else _FLOAT32_LIMIT
        return encode(tag, sub)
    lo, hi = _RAW_LIMITS[m.encoding]
    if math.isnan(v):
        raw = hi if m.encoding is Encoding.UINT16 else lo
    else:
        raw = max(lo, min(hi, v / m.scale))
        raw = lo if raw <= lo else hi if raw >= hi else round(raw)
    return encode(tag, raw * m.scale)


def _in_range(tag: Tag, value: Value) -> bool:
    if tag.is_bool:
        return True
    v = float(value)
    tol = 1e-9 * max(1.0, abs(tag.lo), abs(tag.hi))
    return math.isfinite(v) and tag.lo - tol <= v <= tag.hi + tol


class ModbusMap:
    """The PLC's registers and bits by table and address, built from the tag table.

    `view` is what reads return; `cmd` holds the holding registers and coils as last written
    (the command image in raw form, so that half of a two-register value can be written).
    """

    def __init__(self, tags: tuple[Tag, ...]) -> None:
        self.owner: dict[ModbusTable, dict[int, Tag]] = {t: {} for t in ModbusTable}
        self.view: dict[ModbusTable, dict[int, int | bool]] = {t: {} for t in ModbusTable}
        self.cmd: dict[ModbusTable, dict[int, int | bool]] = {t: {} for t in ModbusTable}
        self.tags = {t.name: t for t in tags}
        # Reads may span the holes between tags (the controller's read plan coalesces across
        # small gaps), as in a PLC whose data block is contiguous; only the first to the last
        # mapped address of each table exists.
        self.extent: dict[ModbusTable, tuple[int, int]] = {}
        for t in tags:
            m = t.modbus
            for a in range(m.address, m.address + m.width):
                self.owner[m.table][a] = t
                self.view[m.table][a] = False if m.is_bit else 0
                lo, hi = self.extent.get(m.table, (a, a))
                self.extent[m.table] = (min(lo, a), max(hi, a))
                if t.is_output:
                    self.cmd[m.table][a] = False if m.is_bit else 0

    @staticmethod
    def _put(image: dict[int, int | bool], tag: Tag, raw: list[int] | bool) -> None:
        if isinstance(raw, bool):
            image[tag.modbus.address] = raw
        else:
            for i, r in enumerate(raw):
                image[tag.modbus.address + i] = r

    def set_view(self, values: Mapping[str, Value]) -> None:
        for name, v in values.items():
            tag = self.tags.get(name)
            if tag is not None:
                self._put(self.view[tag.modbus.table], tag, encode_saturating(tag, v))

    def set_cmd(self, values: Mapping[str, Value]) -> None:
        for name, v in values.items():
            tag = self.tags.get(name)
            if tag is not None and tag.is_output:
                self._put(self.cmd[tag.modbus.table], tag, encode_saturating(tag, v))

    def read(
        self, table: ModbusTable, address: int, count: int, *, cmd: bool = False
    ) -> list[int | bool] | None:
        """Raw values, or None if the span leaves the table's extent. Holes read as zero."""
        extent = self.extent.get(table)
        if extent is None or address < extent[0] or address + count - 1 > extent[1]:
            return None
        image = (self.cmd if cmd else self.view)[table]
        zero: int | bool = False if table in (ModbusTable.COIL, ModbusTable.DISCRETE) else 0
        return [image.get(a, zero) for a in range(address, address + count)]

    def decode_write(
        self, table: ModbusTable, address: int, values: list[int] | list[bool]
    ) -> tuple[ExcCodes | None, dict[str, Value], dict[int, int | bool]]:
        """Check a write against the map; return (error, decoded tag values, raw to commit)."""
        owner = self.owner[table]
        bits = table in (ModbusTable.COIL, ModbusTable.DISCRETE)
        staged: dict[int, int | bool] = {}
        touched: dict[str, Tag] = {}
        for i, raw in enumerate(values):
            a = address + i
            tag = owner.get(a)
            if tag is None or not tag.is_output:
                return ExcCodes.ILLEGAL_ADDRESS, {}, {}
            staged[a] = bool(raw) if bits else int(raw) & 0xFFFF
            touched[tag.name] = tag
        image = {**self.cmd[table], **staged}
        decoded: dict[str, Value] = {}
        for name, tag in touched.items():
            m = tag.modbus
            raw_tag = [image[a] for a in range(m.address, m.address + m.width)]
            value = decode(tag, raw_tag)  # type: ignore[arg-type]
            if not _in_range(tag, value):
                return ExcCodes.ILLEGAL_VALUE, {}, {}
            decoded[name] = value
        return None, decoded, staged


class ModbusHost(Protocol):
    """What the Modbus face needs of the PLC."""

    faults: CommsFaults

    def now(self) -> float: ...

    def apply_writes(self, values: dict[str, Value], source: str) -> None: ...


def _fields(body: bytes, fmt: str) -> tuple[int, ...]:
    """A fixed-layout request body; any other length is a malformed request (exception 3)."""
    if len(body) != struct.calcsize(fmt):
        raise ModbusError(ExcCodes.ILLEGAL_VALUE)
    return struct.unpack(fmt, body)


def _require(ok: bool) -> None:
    if not ok:
        raise ModbusError(ExcCodes.ILLEGAL_VALUE)


class PlcModbusStore:
    """Answers one request PDU from the map: the spec's checks in its order, faults, writes."""

    def __init__(self, mmap: ModbusMap, unit_id: int, host: ModbusHost) -> None:
        self.map = mmap
        self.unit_id = unit_id
        self.host = host

    async def respond(self, unit_id: int, pdu: bytes) -> bytes | None:
        """The response PDU to a request PDU, or None when the PLC does not answer."""
        faults = self.host.faults
        if faults.dropped(self.host.now()):
            return None  # comms_drop: a PLC gone quiet; nothing is applied
        if faults.slow_s > 0:
            await asyncio.sleep(faults.slow_s)
            if faults.dropped(self.host.now()):
                return None
        fc = pdu[0]
        if faults.error_code is not None:
            return exception_pdu(fc, faults.error_code)
        if unit_id != self.unit_id:
            return exception_pdu(fc, ExcCodes.DEVICE_FAILURE)
        try:
            return self._serve(fc, pdu[1:])
        except ModbusError as e:
            return exception_pdu(fc, e.code)

    def _serve(self, fc: int, body: bytes) -> bytes:
        table = _FC_TABLE.get(fc)
        if table is None:
            raise ModbusError(ExcCodes.ILLEGAL_FUNCTION)
        bits = table in _BIT_TABLES
        if fc in (1, 2, 3, 4):
            address, count = _fields(body, ">HH")
            _require(1 <= count <= (_MAX_READ_BITS if bits else _MAX_READ_REGS))
            return self._read_reply(fc, table, self._read(table, address, count))
        if fc == 5:
            address, value = _fields(body, ">HH")
            _require(value in (_COIL_ON, _COIL_OFF))
            self._write(table, address, [value == _COIL_ON])
            return bytes((fc,)) + body
        if fc == 6:
            address, value = _fields(body, ">HH")
            self._write(table, address, [value])
            return bytes((fc,)) + body
        if fc in (15, 16):
            _require(len(body) >= 5)
            address, count, nbytes = struct.unpack_from(">HHB", body)
            data = body[5:]
            if bits:
                _require(1 <= count <= _MAX_WRITE_BITS and nbytes == (count + 7) // 8)
            else:
                _require(1 <= count <= _MAX_WRITE_REGS and nbytes == 2 * count)
            _require(len(data) == nbytes)
            values: list[int] | list[bool] = (
                _unpack_bits(data, count) if bits else list(struct.unpack(f">{count}H", data))
            )
            self._write(table, address, values)
            return struct.pack(">BHH", fc, address, count)
        if fc == 22:
            address, and_mask, or_mask = _fields(body, ">HHH")
            current = int(self.map.cmd[table].get(address, 0))
            self._write(table, address, [(current & and_mask) | (or_mask & ~and_mask & 0xFFFF)])
            return bytes((fc,)) + body
        # fc 23: read/write multiple registers; the write happens before the read (§6.17)
        _require(len(body) >= 9)
        r_addr, r_count, w_addr, w_count, nbytes = struct.unpack_from(">HHHHB", body)
        _require(1 <= r_count <= _MAX_READ_REGS and 1 <= w_count <= _MAX_RW_WRITE_REGS)
        _require(nbytes == 2 * w_count and len(body) == 9 + nbytes)
        self._read(table, r_addr, r_count)  # a bad read span refuses the whole request
        self._write(table, w_addr, list(struct.unpack_from(f">{w_count}H", body, 9)))
        regs = self._read(table, r_addr, r_count)
        return struct.pack(f">BB{r_count}H", fc, 2 * r_count, *(int(r) & 0xFFFF for r in regs))

    def _read(self, table: ModbusTable, address: int, count: int) -> list[int | bool]:
        values = self.map.read(table, address, count)
        if values is None:
            raise ModbusError(ExcCodes.ILLEGAL_ADDRESS)
        return values

    def _read_reply(self, fc: int, table: ModbusTable, values: list[int | bool]) -> bytes:
        garble = self.host.faults.garble
        if table in _BIT_TABLES:
            data = _pack_bits(values)
            if garble:
                data = data[:-1]  # comms_garble: one byte fewer than the quantity needs
            return bytes((fc, len(data))) + data
        if garble:
            values = values[:-1]  # comms_garble: one register fewer than asked for
        regs = [int(v) & 0xFFFF for v in values]
        return struct.pack(f">BB{len(regs)}H", fc, 2 * len(regs), *regs)

    def _write(self, table: ModbusTable, address: int, values: list[int] | list[bool]) -> None:
        if (refused := self.host.faults.write_refusal(table.value)) is not None:
            raise ModbusError(ExcCodes(refused))  # the `write_refused` PLC fault: nothing applied
        err, decoded, staged = self.map.decode_write(table, address, values)
        if err is not None:
            raise ModbusError(err)
        self.map.cmd[table].update(staged)
        self.host.apply_writes(decoded, "modbus")


class PlcModbusServer:
    """A Modbus/TCP server in front of the store; `port` is the port actually bound after
    `start`. Each connection is one task that reads an MBAP frame, answers it and reads the next,
    so pipelined requests are answered in order whatever TCP segments they came in."""

    def __init__(self, store: PlcModbusStore, host: str, port: int) -> None:
        self.store = store
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            server = await asyncio.start_server(
                self._serve_client, self.host, self.port, reuse_address=True
            )
        except OSError as e:
            raise OSError(f"Modbus server cannot listen on {self.host}:{self.port}: {e}") from e
        self.port = server.sockets[0].getsockname()[1]
        self._server = server

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        for task in clients:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)  # type: ignore[arg-type]
        name = writer.get_extra_info("peername")
        peer = f"{name[0]}:{name[1]}" if name else None
        log.info("modbus_client_connected", peer=peer)
        try:
            while True:
                tid, pid, length, unit = _MBAP.unpack(await reader.readexactly(_MBAP.size))
                if not 2 <= length <= _MAX_LENGTH:
                    # The frame boundary is lost: nothing after it can be parsed safely.
                    log.warning(
                        "modbus_frame_refused",
                        peer=peer,
                        length=length,
                        expected=f"an MBAP length of 2..{_MAX_LENGTH}; connection closed",
                    )
                    break
                pdu = await reader.readexactly(length - 1)
                if pid != 0:
                    continue  # not Modbus: skipped without an answer
                try:
                    reply = await self.store.respond(unit, pdu)
                except Exception as e:  # a bug in the PLC, not the client's fault: device failure
                    log.error("modbus_request_failed", peer=peer, error=repr(e)[:200])
                    reply = exception_pdu(pdu[0], ExcCodes.DEVICE_FAILURE)
                if reply is not None:
                    writer.write(_MBAP.pack(tid, 0, len(reply) + 1, unit) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            if task is not None:
                self._clients.discard(task)  # type: ignore[arg-type]
            writer.close()
            log.info("modbus_client_disconnected", peer=peer)
