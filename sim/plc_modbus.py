"""The simulated PLC's Modbus TCP face: the site's tag table served as a Modbus map by pymodbus.

Why not pymodbus's `SimDevice`: its `action` hook sees a bit request's count in 16-bit words, not
in bits, so it cannot refuse a read of an unmapped coil that shares a word with a mapped one, and
its blocks cannot tell a PLC's own refresh from a client's write. The map is instead a small
datastore with the interface the pymodbus server calls (`async_getValues` / `async_setValues`, as
pymodbus's own `SimCore` has), installed on the server after construction. That interface is
internal to pymodbus: the version is pinned (>=3.16.1,<3.17) and tests/hil exercises it.

Behaviour on the wire:
- Each table spans its first to its last mapped address; a read leaving that span: exception 2
  (illegal address). Holes inside it read as 0, because the controller's read plan reads across
  small gaps. Writes are accepted only to output tags' own addresses (else exception 2).
- A written value outside its tag's engineering range (or not finite): exception 3, nothing
  applied. A multi-register value may be written one register at a time (the other half is
  taken from the last written image).
- Reads of outputs return the outputs the plant gets now: while the watchdog holds the safe
  state, the safe values. The echo of a single write (function codes 5 and 6) is what was written.
- Unit id other than `plc.unit_id`: exception 4 (device failure), as pymodbus's own simulator.
- Faults: `comms_drop` — no reply at all, nothing applied; `comms_slow` — each request delayed;
  `comms_error` — every request answered with that exception code; `comms_garble` — register
  reads answer with one register fewer than asked for, bit reads with one byte fewer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Protocol

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc_io.codec import CodecError, decode, encode
from plc_io.tags import Encoding, ModbusTable, Tag, Value
from sim.plc_faults import CommsFaults

log = structlog.get_logger("sim.plc")

# Which table each function code works on.
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
# A request reaches the datastore once or twice; its first call is a read for these codes...
_READ_FIRST = frozenset({1, 2, 3, 4, 22})
# ... and a write for these. Delays apply once per request, on its first call.
_WRITE_FIRST = frozenset({5, 6, 15, 16, 23})
_PLAIN_READS = frozenset({1, 2, 3, 4})
_ECHO = frozenset({5, 6})

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


class PlcModbusStore:
    """The datastore the pymodbus server calls for every request (SimCore's interface)."""

    def __init__(self, mmap: ModbusMap, unit_id: int, host: ModbusHost) -> None:
        self.map = mmap
        self.unit_id = unit_id
        self.host = host

    def device_ids(self) -> list[int]:
        return [self.unit_id]

    async def _gate(self, device_id: int, first: bool) -> ExcCodes | None:
        faults = self.host.faults
        if faults.dropped(self.host.now()):
            # With ignore_missing_devices the server sends nothing back: a PLC gone quiet.
            raise NoSuchIdException("comms_drop: the simulated PLC does not answer")
        if first and faults.slow_s > 0:
            await asyncio.sleep(faults.slow_s)
            if faults.dropped(self.host.now()):
                raise NoSuchIdException("comms_drop: the simulated PLC does not answer")
        if faults.error_code is not None:
            return ExcCodes(faults.error_code)
        if device_id != self.unit_id:
            return ExcCodes.DEVICE_FAILURE
        return None

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = _FC_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if (exc := await self._gate(device_id, func_code in _READ_FIRST)) is not None:
            return exc
        if count < 1:
            return ExcCodes.ILLEGAL_VALUE
        values = self.map.read(table, address, count, cmd=func_code in _ECHO)
        if values is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if self.host.faults.garble and func_code in _PLAIN_READS:
            if table in (ModbusTable.COIL, ModbusTable.DISCRETE):
                values = values[: 8 * ((len(values) - 1) // 8)]  # one byte fewer
            else:
                values = values[:-1]
        return values  # type: ignore[return-value]

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        table = _FC_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if (exc := await self._gate(device_id, func_code in _WRITE_FIRST)) is not None:
            return exc
        if (refused := self.host.faults.write_refusal(table.value)) is not None:
            return ExcCodes(refused)  # the `write_refused` PLC fault: nothing applied
        if not values:
            return ExcCodes.ILLEGAL_VALUE
        err, decoded, staged = self.map.decode_write(table, address, list(values))
        if err is not None:
            return err
        self.map.cmd[table].update(staged)
        self.host.apply_writes(decoded, "modbus")
        return None


class _LoggingTcpServer(ModbusTcpServer):
    """pymodbus's TCP server, logging each client connection with its peer address."""

    def callback_new_connection(self):  # type: ignore[no-untyped-def]
        handler = super().callback_new_connection()

        peer: list[str | None] = [None]

        def trace_connect(up: bool) -> None:
            if up:
                transport = getattr(handler, "transport", None)
                name = transport.get_extra_info("peername") if transport is not None else None
                peer[0] = f"{name[0]}:{name[1]}" if name else None
            event = "modbus_client_connected" if up else "modbus_client_disconnected"
            log.info(event, peer=peer[0])

        handler.trace_connect = trace_connect
        return handler


class PlcModbusServer:
    """Owns the pymodbus server; `port` is the port actually bound after `start`."""

    def __init__(self, store: PlcModbusStore, host: str, port: int) -> None:
        self.store = store
        self.host = host
        self.port = port
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        # The device is a placeholder the constructor insists on; the store replaces it.
        placeholder = SimDevice(
            self.store.unit_id, simdata=[SimData(0, datatype=DataType.REGISTERS)]
        )
        server = _LoggingTcpServer(
            placeholder, address=(self.host, self.port), ignore_missing_devices=True
        )
        server.context = self.store  # type: ignore[assignment]
        try:
            await server.serve_forever(background=True)
        except RuntimeError as e:
            raise OSError(f"Modbus server cannot listen on {self.host}:{self.port}: {e}") from e
        sockets = getattr(server.transport, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
