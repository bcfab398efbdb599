"""An in-memory PLC and transport: the controller's unit-test double, held to the Modbus contract.

`MemoryPlc` holds every tag's value and offers the simulated PLC's fault hooks (`inject`,
`clear`, `clear_all`, `stop`/`start`, plus `override` for an output the PLC drives itself).
`MemoryTransport` talks to it the way `ModbusTransport` talks to a real PLC: the same read plan
(one request per block), changed-only writes grouped as FC16/FC15 would be, the same timeout,
back-off and quality rules. Both run one conformance suite.

Faults (names as on the simulated PLC; `target` "" means every block, else the block holding
that tag):
- `comms_drop` value = seconds of no answer: requests wait `timeout_s`, then fail comms_lost;
- `comms_slow` value = seconds of delay per answer, until cleared (≥ timeout_s: no answer);
- `comms_error` value = Modbus exception code: the block's points come back bad_reply;
- `comms_garble`: replies carry fewer values than asked for: bad_reply.
- `write_refused` target "" (every output), "coil" or "holding", value = Modbus exception
  code: writes to the outputs of that table are refused with that code, nothing applied.
`stop()` refuses connections at once (a stopped PLC); `start()` is a PLC restart, which forgets
every output (back to its safe value) and so makes the transport write all outputs again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import structlog

from plc_io.codec import Block, decode, encode, encode_or_none, plan_reads
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.modbus import plan_writes
from plc_io.site import Site
from plc_io.tags import Tag, Value
from plc_io.transport import (
    MODBUS_EXCEPTIONS,
    LinkMonitor,
    OutputCache,
    PlannedTransport,
    PlcError,
)

FAULTS = ("comms_drop", "comms_slow", "comms_error", "comms_garble", "write_refused")
WRITE_TARGETS = ("", "coil", "holding")


class MemoryPlc:
    """A PLC as a dict of tag values, with fault hooks. Times come from `clock`."""

    def __init__(self, site: Site, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.site = site
        self._clock = clock
        self._tags = {t.name: t for t in site.tags}
        self.values: dict[str, Value] = {}
        for t in site.tags:
            if t.is_output:
                self.values[t.name] = t.safe if t.safe is not None else 0.0
            else:
                self.values[t.name] = False if t.is_bool else max(t.lo, min(t.hi, 20.0))
        self.faults: dict[tuple[str, str], float] = {}
        self.overrides: dict[str, Value] = {}
        self.running = True
        self.epoch = 0  # bumped by every start(): connections of an older epoch are broken
        self.requests = 0
        self.write_log: list[dict[str, Value]] = []  # one entry per write request

    # ---- the test's side ----

    def set(self, name: str, value: Value) -> None:
        """Set a measured value (or force an output as the PLC would)."""
        if name not in self._tags:
            raise KeyError(name)
        self.values[name] = value

    def set_many(self, values: Mapping[str, Value]) -> None:
        for k, v in values.items():
            self.set(k, v)

    def inject(self, name: str, target: str = "", value: float = 1.0) -> None:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        if name == "write_refused" and target not in WRITE_TARGETS:
            raise ValueError(f"write_refused target {target!r}: expected one of {WRITE_TARGETS}")
        if name == "comms_drop":
            value = self._clock() + value  # held as the time the drop ends
        self.faults[(name, target)] = value

    def clear(self, name: str, target: str = "") -> None:
        if name == "write_refused" and not target:  # as the simulated PLC: every target
            for key in [k for k in self.faults if k[0] == name]:
                del self.faults[key]
        self.faults.pop((name, target), None)

    def clear_all(self) -> None:
        self.faults.clear()

    def stop(self) -> None:
        """The PLC goes away: connections are refused and open ones break."""
        self.running = False

    def start(self) -> None:
        """The PLC restarts: outputs fall back to their safe values."""
        self.running = True
        self.epoch += 1
        for t in self.site.outputs:
            self.values[t.name] = t.safe if t.safe is not None else 0.0

    def override(self, name: str, value: Value) -> None:
        """The PLC drives this output itself (a watchdog, a local switch): writes still land
        in `commanded()`, but reads and the plant see `value` until `release(name)`."""
        if name not in self._tags or not self._tags[name].is_output:
            raise KeyError(name)
        self.overrides[name] = value

    def release(self, name: str) -> None:
        self.overrides.pop(name, None)

    def commanded(self) -> dict[str, Value]:
        """What the controller last wrote (safe values for outputs never written)."""
        return {t.name: self.values[t.name] for t in self.site.outputs}

    def outputs(self) -> dict[str, Value]:
        """What the plant gets: the commands, except where the PLC overrides them."""
        return {**self.commanded(), **self.overrides}

    def read(self, name: str) -> Value:
        """A tag as a read request sees it."""
        return self.overrides.get(name, self.values[name])

    def measured(self) -> dict[str, Value]:
        return {t.name: self.values[t.name] for t in self.site.inputs}

    # ---- the transport's side ----

    def write_refusal(self, table: str) -> int | None:
        """The exception code a write to this Modbus table gets (`write_refused`), or None."""
        code = self.faults.get(("write_refused", table), self.faults.get(("write_refused", "")))
        return None if code is None else int(code)

    def fault(self, name: str, tags: Iterable[Tag]) -> float | None:
        """The active fault of this kind for a request touching `tags`, if any."""
        if not self.faults:
            return None
        for target in ("", *(t.name for t in tags)):
            v = self.faults.get((name, target))
            if v is None:
                continue
            if name == "comms_drop" and self._clock() >= v:
                del self.faults[(name, target)]
                continue
            return v
        return None


class MemoryTransport(PlannedTransport):
    """The `Transport` over a `MemoryPlc`, with Modbus's request structure and quality rules."""

    def __init__(
        self,
        site: Site,
        plc: MemoryPlc | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        log: Any = None,
    ) -> None:
        self.site = site
        self.plc = plc if plc is not None else MemoryPlc(site, clock=clock)
        cfg = site.plc
        self.timeout_s = cfg.timeout_s
        self._clock = clock
        self._sleep = sleep
        self.link = LinkMonitor(
            "memory", cfg.reconnect_max_s, log=log or structlog.get_logger("plc_io.memory")
        )
        self._outputs = {t.name: t for t in site.outputs}
        self._input_plan = plan_reads(site.inputs, cfg.gap_registers, cfg.gap_bits)
        self._output_plan = plan_reads(site.outputs, cfg.gap_registers, cfg.gap_bits)
        self._out = OutputCache(site.site.name, site.outputs, encode)
        self._epoch: int | None = None  # the PLC epoch we are connected to
        self._image = ProcessImage()

    async def connect(self) -> None:
        self._ensure_connected(self._clock())

    async def close(self) -> None:
        self._epoch = None

    async def _connected(self) -> bool:
        return self._ensure_connected(self._clock())

    async def _send(self, tags: list[Tag], failed: dict[str, str]) -> list[str]:
        """As `ModbusTransport._send`: one request per FC16/FC15 run, then verify."""
        out = self._out
        written: list[str] = []
        for table, _start, run in plan_writes(tags):
            names = [t.name for t in run]
            try:
                await self._request(run)
                code = self.plc.write_refusal(table.value)
                if code is not None:
                    msg = f"exception code {code} ({MODBUS_EXCEPTIONS.get(code, 'unknown')})"
                    self.link.error_reply(msg)
                    raise PlcError("exception", msg, code)
            except PlcError as e:
                failed.update(dict.fromkeys(names, f"{e.kind}: {e}"))
                out.unsent(names)
                continue
            write = {t.name: decode(t, _raw(out.desired[t.name])) for t in run}
            self.plc.values.update(write)
            self.plc.write_log.append(write)
            out.sent(names)
            written += names
        for n in written:
            t = self._outputs[n]
            if t.verify and encode_or_none(t, self.plc.read(n)) != out.desired[n]:
                failed[n] = f"verify: PLC holds {self.plc.read(n)!r}"
                out.unsent([n])
        return written

    # ---- internals ----

    def _ensure_connected(self, now: float) -> bool:
        if self._epoch is not None and self.plc.running and self._epoch == self.plc.epoch:
            return True
        if self._epoch is not None:
            self._epoch = None
            self.link.lost(now, "comms: connection closed by peer")
        if not self.link.may_attempt(now):
            return False
        if not self.plc.running:
            self.link.lost(now, "comms: connection refused")
            return False
        self._epoch = self.plc.epoch
        self._out.reconnected()
        return True

    async def _request(self, tags: Sequence[Tag]) -> None:
        """One simulated request: apply the PLC's faults, raise PlcError like ModbusTransport."""
        self.link.requests += 1
        self.plc.requests += 1
        plc = self.plc
        if not plc.running or self._epoch != plc.epoch:
            self._comms_failed("connection reset")
        delay = plc.fault("comms_slow", tags) or 0.0
        if plc.fault("comms_drop", tags) is not None or delay >= self.timeout_s:
            await self._sleep(self.timeout_s)
            self._comms_failed(f"no answer within {self.timeout_s} s")
        if delay:
            await self._sleep(delay)
        self.link.ok(self._clock())
        code = plc.fault("comms_error", tags)
        if code is not None:
            msg = f"exception code {int(code)} ({MODBUS_EXCEPTIONS.get(int(code), 'unknown')})"
            self.link.error_reply(msg)
            raise PlcError("exception", msg, int(code))
        if plc.fault("comms_garble", tags) is not None:
            self.link.error_reply("short reply")
            raise PlcError("bad_reply", "reply has fewer values than asked for")

    def _comms_failed(self, msg: str) -> NoReturn:
        self._epoch = None
        self.link.lost(self._clock(), f"comms: {msg}")
        raise PlcError("comms", msg)

    async def _read(self, plan: Sequence[Block], prev: ProcessImage) -> ProcessImage:
        if not self._ensure_connected(self._clock()):
            names = [t.name for b in plan for t in b.tags]
            return prev.marked(names, Quality.COMMS_LOST, None)
        samples: dict[str, Sample] = {}
        bad: dict[Quality, list[str]] = {}
        for block in plan:
            key = f"read {block.table.value} {block.start}+{block.count}"
            if self._epoch is None:
                bad.setdefault(Quality.COMMS_LOST, []).extend(t.name for t in block.tags)
                continue
            try:
                await self._request(block.tags)
            except PlcError as e:
                q = Quality.COMMS_LOST if e.kind == "comms" else Quality.BAD_REPLY
                bad.setdefault(q, []).extend(t.name for t in block.tags)
                if e.kind != "comms":
                    self.link.cause(key, f"{e.kind}: {e}")
                continue
            self.link.cause(key, None)
            at = self._clock()
            for t in block.tags:
                samples[t.name] = self.link.judged(t, self.plc.read(t.name), at)
        image = prev.updated(samples) if samples else prev
        for q, names in bad.items():
            image = image.marked(names, q, None)
        return image


def _raw(encoded: list[int] | bool) -> list[int] | list[bool]:
    return [encoded] if isinstance(encoded, bool) else encoded
