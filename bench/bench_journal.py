"""The journal's fsync against the interlock writes: a leak trip with fast and with slow storage.

For each storage speed, a controller over the in-memory PLC reaches NORMAL_REUSE, the journal
goes idle, then a reuse leak trips IL-04. Measured on the tripping scan (wall time, the journal
in a worker thread as in production): from the start of the scan to the isolation outputs
acknowledged by the PLC; to the trip on disk; and the whole scan, which waits for the persist
at most half a period (a longer commit finishes in its worker thread while the next scans go
on). Slow storage is an injected 200 ms sleep inside the commit, where SQLite fsyncs. The write
latency must not grow with the fsync (ratio ≈ 1) and must stay within IL-04's response time.

Run: `.venv/bin/python -m bench journal`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from controller.journal import Journal, JournalKeeper
from controller.modes import Mode
from controller.runtime import Controller
from interlocks.rules import RULES_BY_ID
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.site import Site, demo_site
from plc_io.tags import Value
from plc_io.transport import WriteResult
from tests.unit.core_helpers import HEALTHY  # the same healthy plant the core tests start from

SLOW_FSYNC_S = 0.2
TRIPS = 15


class Stamped(MemoryTransport):
    """Notes the wall time each write pass was acknowledged."""

    written_at: float = 0.0

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        result = await super().write_outputs(values)
        self.written_at = time.perf_counter()
        return result


class Quiet:
    def __getattr__(self, _level: str) -> Callable[..., None]:
        return lambda *a, **kw: None


async def _trip(site: Site, folder: Path, fsync_s: float) -> tuple[float, float, float]:
    """(outputs acknowledged, persist done, scan done) after the tripping scan's start, in s."""
    persisted = {"at": 0.0}

    def commit() -> None:
        time.sleep(fsync_s)
        persisted["at"] = time.perf_counter()

    t = {"now": 1000.0}
    plc = MemoryPlc(site, clock=lambda: t["now"])
    plc.set_many({k: v for k, v in HEALTHY.items() if k in plc.measured()})
    transport = Stamped(site, plc, clock=lambda: t["now"], log=Quiet())
    journal = JournalKeeper(
        folder / "heatloop.db", opener=lambda p: Journal(p, before_commit=commit)
    )
    ctl = Controller(site, transport, journal=journal, clock=lambda: t["now"], log=Quiet())
    await transport.connect()
    for i in range(400):
        plc.set("it_supply_temp", 35.0 + 0.02 * (i % 2))
        plc.set("it_return_temp", 45.0 + 0.02 * (i % 2))
        await ctl.scan_once()
        t["now"] += site.scan.period_s
        if ctl.supervisor.mode is Mode.NORMAL_REUSE:
            break
    assert ctl.supervisor.mode is Mode.NORMAL_REUSE, ctl.supervisor.mode
    while ctl.journal_busy:  # the trip starts with the store idle
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)  # and from the same idle loop for both storage speeds
    plc.set("leak_reuse", True)
    t0 = time.perf_counter()
    await ctl.scan_once()
    done = time.perf_counter()
    assert plc.values["reuse_isolation_cmd"] is False and ctl.supervisor.mode is Mode.LEAK_TRIP
    await ctl.close_journal()
    return transport.written_at - t0, persisted["at"] - t0, done - t0


def run() -> list[str]:
    site = demo_site().with_control(
        customer_ready_dwell_s=0.0,
        reject_dwell_s=1.0,
        min_mode_dwell_s=1.0,
        reuse_reentry_min_s=0.0,
    )
    response_s = RULES_BY_ID["IL-04"].response_s
    results: dict[str, list[tuple[float, float, float]]] = {"fast": [], "slow": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(TRIPS):
            for name, fsync_s in (("fast", 0.0), ("slow", SLOW_FSYNC_S)):
                folder = Path(tmp) / f"{name}{i}"
                results[name].append(asyncio.run(_trip(site, folder, fsync_s)))

    def med(name: str, k: int) -> float:
        return statistics.median(r[k] for r in results[name])

    write_fast, write_slow = med("fast", 0), med("slow", 0)
    persist_slow = med("slow", 1)
    scan_fast, scan_slow = med("fast", 2), med("slow", 2)
    before = all(r[0] < r[1] for rs in results.values() for r in rs)
    return [
        f"leak trip (IL-04, response {response_s:g} s), in-memory PLC, journal in a worker "
        f"thread, median of {TRIPS} trips; slow storage = {SLOW_FSYNC_S * 1000:.0f} ms per commit",
        f"  scan start -> isolation acknowledged: fast {write_fast * 1000:7.2f} ms, "
        f"slow {write_slow * 1000:7.2f} ms, ratio {write_slow / write_fast:5.2f}",
        f"  scan start -> trip on disk (slow):    {persist_slow * 1000:7.2f} ms, after the "
        f"outputs (persisting first, as before, would have held them back that long)",
        f"  whole tripping scan:                  fast {scan_fast * 1000:7.2f} ms, "
        f"slow {scan_slow * 1000:7.2f} ms, ratio {scan_slow / scan_fast:5.1f}",
        f"  outputs written before the persist in every trip: {'yes' if before else 'NO'}; "
        f"within response time with slow storage: "
        f"{'yes' if write_slow < response_s else 'NO'}",
    ]


if __name__ == "__main__":
    print("\n".join(run()))
