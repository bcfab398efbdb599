"""Modbus TCP transport: coalesced reads, changed-only writes and a bounded reconnect (pymodbus).

Theory of operation. pymodbus fails slowly by default (timeout × retries, long back-off, no
retry of a failed first connect) and through two channels (raised exceptions and error replies);
it also accepts short replies. So this module owns all of that itself:

- the client is built with retries=0 and no automatic reconnect, and every request is timed
  here with `asyncio.timeout(site.plc.timeout_s)`;
- a comms failure (timeout, refused, dropped) closes the connection: a late answer can then
  never be taken for the reply to a later request, and the rest of the scan fails at once
  instead of waiting one timeout per block. Reconnects follow `LinkMonitor`'s bounded back-off;
  between attempts every call returns immediately with comms_lost points;
- an error reply (Modbus exception code) or a reply with the wrong count marks only that
  block's points bad_reply; the link stays up;
- after each (re)connect the cache of written values is empty, so the next pass writes every
  output again: the PLC may have restarted and lost them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from plc_io.codec import Block, CodecError, decode_block, encode, encode_or_none, plan_reads
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import Site
from plc_io.tags import ModbusTable, Tag, Value
from plc_io.transport import (
    MODBUS_EXCEPTIONS,
    LinkMonitor,
    OutputCache,
    PlannedTransport,
    PlcError,
    answer_within,
)

MAX_WRITE_REGISTERS = 123  # FC16 limit
MAX_WRITE_BITS = 1968  # FC15 limit


def plan_writes(tags: Sequence[Tag]) -> list[tuple[ModbusTable, int, list[Tag]]]:
    """Group output tags into runs of adjacent addresses: one FC16 or FC15 request each."""
    runs: list[tuple[ModbusTable, int, list[Tag]]] = []
    for table, limit in (
        (ModbusTable.HOLDING, MAX_WRITE_REGISTERS),
        (ModbusTable.COIL, MAX_WRITE_BITS),
    ):
        group = sorted((t for t in tags if t.modbus.table is table), key=lambda t: t.modbus.address)
        end = -1
        for t in group:
            a = t.modbus.address
            if (
                runs
                and runs[-1][0] is table
                and a == end
                and a + t.modbus.width - runs[-1][1] <= limit
            ):
                runs[-1][2].append(t)
            else:
                runs.append((table, a, [t]))
            end = a + t.modbus.width
    return runs


def _reason(err: PlcError) -> str:
    return f"{err.kind}: {err}"


class ModbusTransport(PlannedTransport):
    """The `Transport` over Modbus TCP. host/port default to the site file's [plc] section."""

    def __init__(
        self,
        site: Site,
        *,
        host: str | None = None,
        port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
    ) -> None:
        self.site = site
        cfg = site.plc
        self.host = host or cfg.host
        self.port = port or cfg.port
        self.unit_id = cfg.unit_id
        self.timeout_s = cfg.timeout_s
        self._clock = clock
        self._log = log if log is not None else structlog.get_logger("plc_io.modbus")
        self.link = LinkMonitor("modbus", cfg.reconnect_max_s, log=self._log)
        self._outputs = {t.name: t for t in site.outputs}
        self._input_plan = plan_reads(site.inputs, cfg.gap_registers, cfg.gap_bits)
        self._output_plan = plan_reads(site.outputs, cfg.gap_registers, cfg.gap_bits)
        self._client: AsyncModbusTcpClient | None = None
        self._image = ProcessImage()
        # Outputs are compared as raw encodings, not floats: a change below the register's
        # resolution is no change, and NaN or an unencodable value is refused before sending.
        self._out = OutputCache(site.site.name, site.outputs, encode)

    # ---- Transport interface ----

    @property
    def read_plan(self) -> tuple[Block, ...]:
        return self._input_plan

    async def connect(self) -> None:
        await self._ensure_connected(self._clock())

    async def close(self) -> None:
        self._drop()

    async def _connected(self) -> bool:
        return await self._ensure_connected(self._clock())

    async def _send(self, tags: list[Tag], failed: dict[str, str]) -> list[str]:
        """Write these outputs (one FC16/FC15 per adjacent run), then verify; see
        `write_in_order`, which calls this for the commands and then for the heartbeat."""
        out = self._out
        written: list[str] = []
        for table, start, run in plan_writes(tags):
            names = [t.name for t in run]
            key = f"write {table.value} {start}"
            if self._client is None:  # the link dropped earlier in this pass
                failed.update(dict.fromkeys(names, "comms: link lost"))
                out.unsent(names)
                continue
            try:
                if table is ModbusTable.HOLDING:
                    regs = [r for n in names for r in out.desired[n]]
                    req = self._client.write_registers(start, regs, device_id=self.unit_id)
                    fc, count = 16, len(regs)
                else:
                    bits = [bool(out.desired[n]) for n in names]
                    req = self._client.write_coils(start, bits, device_id=self.unit_id)
                    fc, count = 15, len(bits)
                rr = await self._call(req, fc)
                self._check_echo(rr, fc, start, count)
            except PlcError as e:
                failed.update(dict.fromkeys(names, _reason(e)))
                out.unsent(names)
                self.link.cause(key, _reason(e))
                continue
            self.link.cause(key, None)
            out.sent(names)
            written += names
        verify = [self._outputs[n] for n in written if self._outputs[n].verify]
        if verify:
            await self._verify(verify, failed)
        return written

    def _check_echo(self, rr: Any, fc: int, start: int, count: int) -> None:
        """An FC15/FC16 answer echoes the request's address and quantity; anything else is not
        an acknowledgement of what we sent."""
        got = (getattr(rr, "address", None), getattr(rr, "count", None))
        if got != (start, count):
            msg = f"FC{fc} reply echoes address {got[0]} count {got[1]}, sent {start} {count}"
            self.link.error_reply(msg)
            raise PlcError("bad_reply", msg)

    # ---- internals ----

    async def _ensure_connected(self, now: float) -> bool:
        c = self._client
        if c is not None and c.connected:
            return True
        if c is not None:  # dropped by the peer since the last call
            self._drop()
            self.link.lost(now, "comms: connection closed by peer")
        if not self.link.may_attempt(now):
            return False
        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            # ours (asyncio.timeout in _call) fires first; pymodbus's own is only a backstop
            timeout=self.timeout_s * 1.5 + 0.05,
            retries=0,
            reconnect_delay=0,  # reconnects are ours, with our back-off
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as e:
            ok, err = False, f"comms: connect failed: {type(e).__name__} {e}"
        else:
            err = f"comms: connect to {self.host}:{self.port} refused or failed"
        if not ok:
            client.close()
            self.link.lost(self._clock(), err)
            return False
        self._client = client
        self._out.reconnected()  # the PLC may have lost our outputs: write them all again
        return True

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _call(self, request: Any, fc: int) -> Any:
        """Send one request within the timeout; translate both failure channels to PlcError.

        pymodbus matches a reply to its request by transaction id only and decodes it by the
        reply's own function code, so an FC03 answer to an FC04 read arrives as data: the
        function code (or 0x80 + it, for an exception) must be the request's, else bad_reply.
        """
        self.link.requests += 1
        rr = await answer_within(
            self.timeout_s, request, self._comms_failed, (ModbusException, OSError)
        )
        got = getattr(rr, "function_code", None)
        if not isinstance(got, int) or got & 0x7F != fc:
            self.link.ok(self._clock())  # the PLC answered; the answer is wrong
            msg = f"reply has function code {got!r}, request was FC{fc}"
            self.link.error_reply(msg)
            raise PlcError("bad_reply", msg)
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            self.link.ok(self._clock())
            msg = f"exception code {code} ({MODBUS_EXCEPTIONS.get(code or 0, 'unknown')})"
            self.link.error_reply(msg)
            raise PlcError("exception", msg, code)
        self.link.ok(self._clock())
        return rr

    def _comms_failed(self, msg: str) -> NoReturn:
        # Closing makes a late answer harmless and fails the rest of the pass at once.
        self._drop()
        self.link.lost(self._clock(), f"comms: {msg}")
        raise PlcError("comms", msg)

    async def _read_block(self, block: Block) -> dict[str, Value]:
        assert self._client is not None
        c, a, n, dev = self._client, block.start, block.count, self.unit_id
        if block.table is ModbusTable.INPUT:
            rr = await self._call(c.read_input_registers(a, count=n, device_id=dev), 4)
        elif block.table is ModbusTable.HOLDING:
            rr = await self._call(c.read_holding_registers(a, count=n, device_id=dev), 3)
        elif block.table is ModbusTable.DISCRETE:
            rr = await self._call(c.read_discrete_inputs(a, count=n, device_id=dev), 2)
        else:
            rr = await self._call(c.read_coils(a, count=n, device_id=dev), 1)
        if block.is_bits:
            raw = rr.bits or []
            # the byte count must be ceil(n / 8): bits come padded to whole bytes
            got_ok = len(raw) == 8 * ((n + 7) // 8)
        else:
            raw = rr.registers or []
            got_ok = len(raw) == n
        if not got_ok:
            msg = f"reply has {len(raw)} values, asked for {n}"
            self.link.error_reply(msg)
            raise PlcError("bad_reply", msg)
        try:
            return decode_block(block, raw)
        except CodecError as e:
            self.link.error_reply(str(e))
            raise PlcError("bad_reply", str(e)) from e

    async def _read(self, plan: Sequence[Block], prev: ProcessImage) -> ProcessImage:
        now = self._clock()
        if not await self._ensure_connected(now):
            names = [t.name for b in plan for t in b.tags]
            return prev.marked(names, Quality.COMMS_LOST, None)
        samples: dict[str, Sample] = {}
        bad: dict[Quality, list[str]] = {}
        for block in plan:
            key = f"read {block.table.value} {block.start}+{block.count}"
            if self._client is None:  # the link dropped earlier in this pass
                bad.setdefault(Quality.COMMS_LOST, []).extend(t.name for t in block.tags)
                continue
            try:
                values = await self._read_block(block)
            except PlcError as e:
                q = Quality.COMMS_LOST if e.kind == "comms" else Quality.BAD_REPLY
                bad.setdefault(q, []).extend(t.name for t in block.tags)
                if e.kind != "comms":
                    self.link.cause(key, _reason(e))
                continue
            self.link.cause(key, None)
            at = self._clock()
            for t in block.tags:
                samples[t.name] = self.link.judged(t, values[t.name], at)
        image = prev.updated(samples) if samples else prev
        for q, names in bad.items():
            image = image.marked(names, q, None)
        return image

    async def _verify(self, tags: list[Tag], failed: dict[str, str]) -> None:
        """Read back tags marked `verify` and fail those the PLC does not hold as written."""
        for block in plan_reads(tags, 0, 0):
            names = [t.name for t in block.tags]
            if self._client is None:
                failed.update(dict.fromkeys(names, "verify: link lost"))
                self._out.unsent(names)
                continue
            try:
                got = await self._read_block(block)
            except PlcError as e:
                failed.update(dict.fromkeys(names, f"verify: {_reason(e)}"))
                self._out.unsent(names)
                continue
            for t in block.tags:
                if encode_or_none(t, got[t.name]) != self._out.desired[t.name]:
                    failed[t.name] = f"verify: PLC holds {got[t.name]!r}"
                    self._out.unsent([t.name])  # so the next pass sends it again
