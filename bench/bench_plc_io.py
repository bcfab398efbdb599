"""PLC I/O speed: a ModbusTransport scan against bare pymodbus calls, and requests per scan."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import structlog
from pymodbus.client import AsyncModbusTcpClient

from plc_io.codec import plan_reads
from plc_io.modbus import ModbusTransport, plan_writes
from plc_io.site import Site, demo_site
from plc_io.tags import ModbusTable

ITERATIONS = 300
WARMUP = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _raw_scan(client: AsyncModbusTcpClient, site: Site, hb: int) -> None:
    """The same requests as one transport scan, as bare pymodbus calls without any checking."""
    for b in plan_reads(site.inputs, site.plc.gap_registers, site.plc.gap_bits):
        if b.table is ModbusTable.INPUT:
            await client.read_input_registers(b.start, count=b.count, device_id=site.plc.unit_id)
        elif b.table is ModbusTable.DISCRETE:
            await client.read_discrete_inputs(b.start, count=b.count, device_id=site.plc.unit_id)
        elif b.table is ModbusTable.HOLDING:
            await client.read_holding_registers(b.start, count=b.count, device_id=site.plc.unit_id)
        else:
            await client.read_coils(b.start, count=b.count, device_id=site.plc.unit_id)
    addr = site.tag("heartbeat").modbus.address
    await client.write_registers(addr, [hb], device_id=site.plc.unit_id)


async def _bench() -> list[str]:
    from sim.plc import SimPlc  # bench-only: the simulated PLC stands in for the real one

    # warnings only: info lines on the console would be timed too
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    site = demo_site()
    port = _free_port()
    commands = {k: v for k, v in site.safe_outputs().items() if k != "heartbeat"}
    async with SimPlc(site, modbus_port=port, opcua_port=_free_port()):
        tx = ModbusTransport(site, host="127.0.0.1", port=port)
        await tx.connect()
        raw = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
        await raw.connect()
        first_req = tx.health.requests
        await tx.read_inputs()
        await tx.write_outputs(commands)
        first_scan = tx.health.requests - first_req
        t_tx: list[float] = []
        t_raw: list[float] = []
        req0 = tx.health.requests
        for i in range(WARMUP + ITERATIONS):
            # alternate the two so drift in the simulated PLC's load hits both alike
            t0 = time.perf_counter()
            await tx.read_inputs()
            await tx.write_outputs(commands)
            t1 = time.perf_counter()
            await _raw_scan(raw, site, i & 0xFFFF)
            t2 = time.perf_counter()
            if i >= WARMUP:
                t_tx.append(t1 - t0)
                t_raw.append(t2 - t1)
        steady = (tx.health.requests - req0) / (WARMUP + ITERATIONS)
        img = await tx.read_inputs()
        bad = [n for n, s in img.items() if s.quality.value != "good"]
        raw.close()
        await tx.close()
    reads = len(plan_reads(site.inputs, site.plc.gap_registers, site.plc.gap_bits))
    # every command in as few FC16/FC15 runs as possible, then the heartbeat's own request
    all_writes = len(plan_writes([t for t in site.outputs if t.name != "heartbeat"])) + 1
    m_tx, m_raw = statistics.median(t_tx), statistics.median(t_raw)
    p99 = statistics.quantiles(t_tx, n=100)[98]
    return [
        f"scan = read {len(site.inputs)} inputs + write pass, median of {ITERATIONS}",
        f"ModbusTransport    {m_tx * 1e3:.3f} ms median, {p99 * 1e3:.3f} ms p99",
        f"bare pymodbus      {m_raw * 1e3:.3f} ms median (same requests, no checks)",
        f"overhead ratio     {m_tx / m_raw:.2f}  (target <= 1.5)",
        f"requests per scan  {steady:.2f} steady (minimum {reads} reads + 1 heartbeat write"
        f" = {reads + 1})",
        f"first scan         {first_scan} requests (minimum {reads} reads + {all_writes}"
        f" writes, the heartbeat last = {reads + all_writes})",
        f"inputs not good at the end: {bad or 'none'}",
    ]


def run() -> list[str]:
    old = structlog.get_config()
    try:
        return asyncio.run(_bench())
    finally:
        structlog.configure(**old)  # leave logging as the other benchmarks expect it


if __name__ == "__main__":
    for line in run():
        print(line)
