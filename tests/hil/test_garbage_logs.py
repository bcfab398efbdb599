"""A PLC that floods its connections with garbage: the log stays small and logging never
makes a scan overrun (measured before: 22.6 MB in 10 s, one 9 MB line, overruns).

A raw asyncio socket server on 127.0.0.1 writes random bytes to every connection, whatever is
asked. For 10 s of wall time, with the production log set-up writing into a byte counter, two
clients talk to it: the controller's real scan loop over ModbusTransport (which times its
requests itself, so pymodbus rarely gets to its own error path), and a bare pymodbus client
with the library's own timeout, whose error messages carry a hex dump of the whole receive
buffer (the 9 MB line: 6.5 MB in 10 s with the old log set-up). Both must stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from controller.logs import DroppingQueueHandler, configure
from controller.runtime import Controller
from plc_io.modbus import ModbusTransport
from plc_io.site import demo_site

pytestmark = pytest.mark.hil

RUN_S = 10.0
LOG_LIMIT_BYTES = 100_000
GARBAGE_BYTES = 4096  # every 10 ms on every connection


class Counter(io.StringIO):
    """A stream that counts what is written and keeps the longest line."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.longest = 0
        self.lines = 0

    def write(self, s: str) -> int:
        n = len(s.encode("utf-8", "replace"))
        self.bytes += n
        self.lines += s.count("\n")
        self.longest = max(self.longest, n)
        return len(s)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def flood() -> None:
        while True:
            writer.write(os.urandom(GARBAGE_BYTES))
            await writer.drain()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(flood())
    try:
        while await reader.read(4096):
            pass
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
        writer.close()


async def bare_client(port: int, stop: asyncio.Event) -> int:
    """pymodbus with its own timeout, as a naive user of the library would run it."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
    requests = 0
    try:
        while not stop.is_set():
            if not client.connected:
                await client.connect()
            with contextlib.suppress(ModbusException, OSError):
                requests += 1
                await client.read_holding_registers(0, count=10, device_id=1)
    finally:
        client.close()
    return requests


@pytest.fixture
async def garbage_plc() -> AsyncIterator[int]:
    server = await asyncio.start_server(_garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port


@pytest.mark.usefixtures("restore_logging")
async def test_ten_seconds_of_garbage_make_a_small_log_and_no_overrun_from_logging(
    garbage_plc: int,
) -> None:
    out = Counter()
    setup = configure(json=True, stream=out)
    # time spent inside logging calls on the event loop (formatting, bounding, queueing)
    spent = {"s": 0.0, "max": 0.0}
    handle = DroppingQueueHandler.handle

    def timed(self: DroppingQueueHandler, record: logging.LogRecord) -> bool:
        t = time.perf_counter()
        try:
            return handle(self, record)
        finally:
            dt = time.perf_counter() - t
            spent["s"] += dt
            spent["max"] = max(spent["max"], dt)

    site = demo_site()
    transport = ModbusTransport(site, port=garbage_plc)
    ctl = Controller(site, transport)
    stop = asyncio.Event()
    try:
        DroppingQueueHandler.handle = timed  # type: ignore[method-assign]
        task = asyncio.create_task(ctl.run(stop))
        bare = asyncio.create_task(bare_client(garbage_plc, stop))
        await asyncio.sleep(RUN_S)
        stop.set()
        await asyncio.wait_for(task, 10.0)
        requests = await asyncio.wait_for(bare, 10.0)
    finally:
        DroppingQueueHandler.handle = handle  # type: ignore[method-assign]
        setup.close()
    period_s = site.scan.period_s
    print(
        f"\n{RUN_S:g} s of garbage: {out.bytes} bytes of log in {out.lines} lines (longest "
        f"{out.longest}), {setup.limit.suppressed_total} library lines suppressed, "
        f"{ctl.status.scans} scans, {ctl.status.overruns} overruns, {requests} bare requests, "
        f"logging took "
        f"{spent['s'] * 1000:.1f} ms in all (longest call {spent['max'] * 1000:.2f} ms)"
    )
    assert ctl.status.scans > 0 and requests > 0
    assert out.bytes < LOG_LIMIT_BYTES
    assert out.longest < 8 * 1024  # every line bounded
    # logging's share of the loop over the whole run is below one scan period: it cannot be
    # what makes a scan late (the transport's own timeouts may, and are counted apart)
    assert spent["s"] < period_s and spent["max"] < period_s / 2
