"""A few minutes of `heatloop run` against `heatloop sim serve --speed 60` (real processes,
Modbus on 127.0.0.1): the bill from the totaliser and the customer-side time, held against the
plant's own truth (the simulated PLC's OPC UA `Sim/Plant`) and the outage caused in the same run.

About 2.7 simulated hours in 160 s: the customer takes heat for a minute, is offline for 40 s
(40 simulated minutes), then takes heat again; before and after, the meter stands still and
the controller has read it (as in tests/hil/test_metering_hil.py), so the bill and the truth
cover the same heat.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from tests.hil.test_metering_hil import bench, ready, report, rig, steady, whole_run

SPEED = 60.0
DELIVER_S = 60.0
OFFLINE_S = 40.0


async def _run(folder: Path) -> list[str]:
    with rig(folder, {}, SPEED, 0.1) as r:
        await ready(r)
        async with bench(r) as b:
            s0 = await steady(r, b)  # starts with the customer offline for a moment
            await b.clear("customer_offline")
            await asyncio.sleep(DELIVER_S)
            t_off = time.time()
            await b.inject("customer_offline")
            await asyncio.sleep(OFFLINE_S)
            offline_s = time.time() - t_off
            await b.clear("customer_offline")
            await asyncio.sleep(DELIVER_S)
            s1 = await steady(r, b)
        st = await report(r, *whole_run(r))
    true_kwh = s1.delivered_kwh - s0.delivered_kwh
    billed = st["delivered_kwh"]
    side = [i for i in st["interruptions"] if i["cls"] == "customer_side"]
    longest = max((i["duration_s"] for i in side), default=0.0)
    return [
        f"heatloop run against sim serve --speed {SPEED:g}: {s1.wall - s0.wall:.0f} s wall, "
        f"{(s1.wall - s0.wall) * SPEED / 3600:.1f} h simulated",
        f"  billed {billed:.2f} kWh, plant truth {true_kwh:.2f} kWh: ratio {billed / true_kwh:.5f} "
        f"({billed - true_kwh:+.3f} kWh; the register's resolution is 0.1 kWh)",
        f"  the outage caused {offline_s:.1f} s, its customer_side interruption {longest:.1f} s; "
        f"availability {st['availability_pct']:.2f} %, time by class {st['time_s']}",
    ]


def run() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="meter-live-") as d:
        return asyncio.run(_run(Path(d)))
