"""Rigs for the transport conformance suite: one PLC stand-in per transport, driven alike.

A rig owns the PLC side (the in-memory PLC, or the simulated PLC on loopback sockets) and makes
transports that talk to it. Tests drive faults through the rig, so one test body covers the
memory fake, Modbus TCP and OPC UA.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from controller.core import Core, ScanInput, ScanResult
from interlocks.engine import Event
from plc_io.image import ProcessImage
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.modbus import ModbusTransport
from plc_io.opcua import OpcuaTransport
from plc_io.site import Site, demo_site
from plc_io.transport import LinkState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conformance_site(**plc: Any) -> Site:
    """The demo site with short timeouts, so faults show in tenths of a second."""
    site = demo_site()
    opcua = site.plc.opcua.model_copy(update={"publish_interval_ms": 50, **plc.pop("opcua", {})})
    cfg = {"timeout_s": 0.2, "reconnect_max_s": 0.4, "stale_after_s": 1.0, "opcua": opcua, **plc}
    return site.model_copy(update={"plc": site.plc.model_copy(update=cfg)})


class DelayProxy:
    """A TCP relay that can hold the server's answers back (a slow PLC for any protocol)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await r.read(65536):
                    if slow and self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    w.write(data)
                    await w.drain()
            w.close()

        for coro in (pump(cr, sw, False), pump(sr, cw, True)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class Rig:
    """The PLC side for one transport kind: "memory", "modbus", "opcua" or "opcua-poll"."""

    def __init__(self, kind: str, site: Site) -> None:
        self.kind = kind
        self.site = site
        self.mem: MemoryPlc | None = None
        self.sim: Any = None
        self.proxy: DelayProxy | None = None
        self.modbus_port = free_port()
        self.opcua_port = free_port()

    @property
    def is_opcua(self) -> bool:
        return self.kind.startswith("opcua")

    async def start(self) -> None:
        """Start (or restart after `stop`) the PLC on the same ports."""
        if self.kind == "memory":
            if self.mem is None:
                self.mem = MemoryPlc(self.site)
            else:
                self.mem.start()
            return
        from sim.plc import SimPlc  # the simulated PLC is only needed by the socket rigs

        self.sim = SimPlc(
            self.site, modbus_port=self.modbus_port, opcua_port=self.opcua_port, speed=1.0
        )
        await self.sim.start()
        if self.proxy is None:
            port = self.opcua_port if self.is_opcua else self.modbus_port
            self.proxy = DelayProxy(port)
            await self.proxy.start()

    async def stop(self) -> None:
        """The PLC goes away (link drop)."""
        if self.mem is not None:
            self.mem.stop()
        if self.sim is not None:
            await self.sim.stop()

    async def close(self) -> None:
        # stop in a task of its own: awaited directly from pytest-asyncio's module-scoped
        # finalizer, the simulated PLC's stop was seen to hang
        await asyncio.wait_for(self.stop(), 10)
        if self.proxy is not None:
            await self.proxy.stop()

    @property
    def plc(self) -> Any:
        return self.mem if self.kind == "memory" else self.sim

    def transport(self, site: Site | None = None) -> Any:
        """A fresh transport (OPC UA ones through the delay proxy, for the slow-server case)."""
        site = site or self.site
        if self.kind == "memory":
            assert self.mem is not None
            return MemoryTransport(site, self.mem)
        if self.kind == "modbus":
            return ModbusTransport(site, host="127.0.0.1", port=self.modbus_port)
        assert self.proxy is not None
        port = self.proxy.port
        if self.kind == "opcua-poll":
            opcua = site.plc.opcua.model_copy(update={"subscribe": False})
            site = site.model_copy(update={"plc": site.plc.model_copy(update={"opcua": opcua})})
        return OpcuaTransport(site, endpoint=f"opc.tcp://127.0.0.1:{port}/")

    def slow(self, seconds: float) -> None:
        """Every answer `seconds` late (for Modbus and memory also the PLC's own fault)."""
        if self.is_opcua:
            assert self.proxy is not None
            self.proxy.delay_s = seconds  # the simulated PLC has no OPC UA slow fault
        else:
            self.plc.inject("comms_slow", value=seconds)

    def clear_all(self) -> None:
        if self.proxy is not None:
            self.proxy.delay_s = 0.0
        if self.plc is not None:
            self.plc.clear_all()


class Controller:
    """The runtime's scan over a rig's transport, without the runtime: read the inputs, step
    the decision core, write its outputs (everything again while the PLC reports its watchdog
    tripped: the PLC releases its hold only on fresh commands), and feed what was not
    acknowledged into the next scan, as `controller.runtime` does.

    `heartbeat`, when set, is written as the heartbeat every scan instead of the transport's
    counter: a controller whose heartbeat does not move. `watchdog` feeds the in-memory PLC,
    which has none of its own (an object with `watchdog_tripped`)."""

    def __init__(self, site: Site, transport: Any, watchdog: Any = None) -> None:
        self.clock = time.monotonic
        self.wall = time.time
        self.core = Core(site, self.clock(), self.wall())
        self.t = transport
        self.watchdog = watchdog
        self.plc: Any = None  # the in-memory PLC the watchdog's state is written into
        self.heartbeat: float | None = None
        self.write_failed: frozenset[str] = frozenset()
        self.events: list[Event] = []
        self.image: ProcessImage | None = None  # the last one read

    async def scan(self) -> ScanResult:
        """One scan; returns the core's decision, alarms and events."""
        if self.watchdog is not None and self.plc is not None:
            self.plc.set("plc_watchdog_tripped", self.watchdog.watchdog_tripped)
        img = self.image = await self.t.read_inputs()
        link_ok = self.t.health.state is LinkState.OK
        r = self.core.step(ScanInput(img, self.clock(), self.wall(), link_ok, self.write_failed))
        self.events += r.events
        tripped = img["plc_watchdog_tripped"]
        if tripped.quality.usable and tripped.value is True:
            self.t.resend_all()
        values = {k: v for k, v in r.decision.values().items() if k != "heartbeat"}
        if self.heartbeat is not None:
            values["heartbeat"] = self.heartbeat
        w = await self.t.write_outputs(values)
        self.write_failed = frozenset(w.failed)
        return r

    async def scan_until(self, done: Any, within_s: float, period_s: float = 0.05) -> ScanResult:
        """Scan every `period_s` until `done(result)`; the last result (an assertion names the
        last decision if it never came)."""
        deadline = time.monotonic() + within_s
        while True:
            r = await self.scan()
            if done(r):
                return r
            d = r.decision
            assert time.monotonic() < deadline, (
                f"not within {within_s} s: mode {d.mode.value}, reasons {d.reject_reasons}, "
                f"faults {dict(d.faults)}"
            )
            await asyncio.sleep(period_s)
