"""Shared HIL fixtures: free ports, a fast-watchdog site, simulated PLCs and a Modbus probe.

`sim_plc` is a fresh simulated PLC per test (any event loop scope; ~1.7 s to start, mostly
OPC UA). `shared_sim_plc` is one PLC for the whole session: tests using it must run in the
session loop (`pytest.mark.asyncio(loop_scope="session")`) and leave no fault behind (the
fixture below clears faults after each such test via `plc_clean`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pymodbus.client import AsyncModbusTcpClient

from plc_io.codec import decode, encode
from plc_io.site import Site, demo_site
from plc_io.tags import ModbusTable, Value
from sim.plc import SimPlc

WATCHDOG_S = 1.0
HOLDOFF_S = 0.5


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_site(watchdog_s: float = WATCHDOG_S, holdoff_s: float = HOLDOFF_S) -> Site:
    """The demo site with a short watchdog, so watchdog tests take about a second each."""
    site = demo_site()
    plc = site.plc.model_copy(update={"watchdog_s": watchdog_s, "watchdog_holdoff_s": holdoff_s})
    return site.model_copy(update={"plc": plc})


def make_plc(site: Site | None = None, **kw: Any) -> SimPlc:
    return SimPlc(site or fast_site(), modbus_port=free_port(), opcua_port=free_port(), **kw)


async def wait_for(pred: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> float:
    """Poll `pred` until true; return the monotonic time it became true, or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


class ModbusProbe:
    """A plain pymodbus client (timeout 0.5 s, no retries) that speaks tags via plc_io.codec."""

    def __init__(self, site: Site, port: int, timeout_s: float = 0.5) -> None:
        self.site = site
        self.unit = site.plc.unit_id
        self.client = AsyncModbusTcpClient(
            "127.0.0.1", port=port, timeout=timeout_s, retries=0, reconnect_delay=0.1
        )

    async def __aenter__(self) -> ModbusProbe:
        assert await self.client.connect(), "cannot connect to the simulated PLC"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.close()

    async def raw(self, table: ModbusTable, address: int, count: int) -> Any:
        c, u = self.client, self.unit
        if table is ModbusTable.INPUT:
            return await c.read_input_registers(address, count=count, device_id=u)
        if table is ModbusTable.HOLDING:
            return await c.read_holding_registers(address, count=count, device_id=u)
        if table is ModbusTable.COIL:
            return await c.read_coils(address, count=count, device_id=u)
        return await c.read_discrete_inputs(address, count=count, device_id=u)

    async def read(self, name: str) -> Value:
        tag = self.site.tag(name)
        rr = await self.raw(tag.modbus.table, tag.modbus.address, tag.modbus.width)
        assert not rr.isError(), f"{name}: {rr}"
        return decode(tag, rr.bits[:1] if tag.modbus.is_bit else rr.registers)

    async def write(self, name: str, value: Value) -> Any:
        tag = self.site.tag(name)
        raw = encode(tag, value)
        if isinstance(raw, bool):
            return await self.client.write_coil(tag.modbus.address, raw, device_id=self.unit)
        return await self.client.write_registers(tag.modbus.address, raw, device_id=self.unit)

    async def write_ok(self, name: str, value: Value) -> None:
        rr = await self.write(name, value)
        assert not rr.isError(), f"write {name}={value!r}: {rr}"


class Heartbeat:
    """Writes the heartbeat counter every `period_s` on its own connection while running."""

    def __init__(self, site: Site, port: int, period_s: float = 0.1) -> None:
        self.probe = ModbusProbe(site, port)
        self.period_s = period_s
        self.count = int(time.monotonic() * 10) % 65536  # differs from any earlier beat
        self.last_write_s = 0.0
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        await self.probe.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.probe.__aexit__()

    def start(self) -> None:
        if self._task is None:
            self._running = True
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> float:
        """Stop beating; return the time the last heartbeat write was answered.

        A flag, not Task.cancel(): pymodbus's client awaits asyncio.wait_for, which on Python
        3.11 can swallow a cancel that lands as the reply arrives (CPython gh-86296).
        """
        if self._task is not None:
            self._running = False
            await self._task
            self._task = None
        return self.last_write_s

    async def _run(self) -> None:
        while self._running:
            self.count = (self.count + 1) % 65536
            await self.probe.write_ok("heartbeat", float(self.count))
            self.last_write_s = time.monotonic()
            if self._running:
                await asyncio.sleep(self.period_s)


async def release_watchdog(plc: SimPlc, probe: ModbusProbe, beat: Heartbeat) -> None:
    """Bring a PLC out of its safe hold: heartbeats running, then fresh commands."""
    beat.start()
    if not plc.watchdog_tripped:
        return
    await asyncio.sleep(0.15)  # the heartbeat has resumed
    await probe.write_ok("reuse_valve_cmd", 0.0)
    await wait_for(lambda: not plc.watchdog_tripped, plc.site.plc.watchdog_holdoff_s + 1.0)


@pytest.fixture
def site() -> Site:
    return fast_site()


@pytest_asyncio.fixture
async def sim_plc() -> AsyncIterator[SimPlc]:
    """A fresh simulated PLC (fast watchdog site) on free ports, stopped after the test."""
    async with make_plc() as plc:
        yield plc


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def shared_sim_plc() -> AsyncIterator[SimPlc]:
    """One simulated PLC for the session (fast watchdog site). `initial_*` record its start."""
    async with make_plc() as plc:
        plc.initial_tripped = plc.watchdog_tripped  # type: ignore[attr-defined]
        plc.initial_trips = plc.watchdog_trips  # type: ignore[attr-defined]
        plc.initial_outputs = plc.outputs()  # type: ignore[attr-defined]
        yield plc


@pytest_asyncio.fixture(loop_scope="session")
async def plc(shared_sim_plc: SimPlc) -> AsyncIterator[SimPlc]:
    """The session's PLC, with every fault cleared after the test."""
    yield shared_sim_plc
    shared_sim_plc.clear_all()


# ---- real processes: `heatloop sim serve` for a module, `heatloop run` per test (procs.py) ----


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`heatloop sim serve` for the whole module (each test leaves no fault behind)."""
    from tests.hil import procs

    yield from procs.sim_server(tmp_path_factory)


@pytest.fixture
def controllers(sim: Any, tmp_path: Path) -> Iterator[Any]:
    """Start `heatloop run` processes (on a state dir of the test's, or the one given)."""
    from tests.hil import procs

    yield from procs.controller_starter(sim, tmp_path)


@pytest_asyncio.fixture
async def faults(sim: Any) -> AsyncIterator[Any]:
    """An OPC UA client on the sim's fault interface; every fault is cleared afterwards."""
    from tests.hil import procs

    async for f in procs.sim_faults(sim):
        yield f


@pytest_asyncio.fixture
async def probe(sim: Any) -> AsyncIterator[Any]:
    from tests.hil import procs

    async for p in procs.modbus_probe(sim):
        yield p
