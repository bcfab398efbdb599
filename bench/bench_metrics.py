"""The scan's cost of metering and the NOC's endpoint (issue: scan p99 ratio <= 1.1).

Controllers on the in-memory PLC, each at the real scan period with its journal in a temporary
state directory, run in alternating blocks in the same process (so a busy machine weighs on
every arm alike):
- "with": metering on and the Prometheus endpoint served and scraped every second by an HTTP
  GET in a thread;
- "endpoint": the endpoint scraped, `Controller(..., metering=False)` (the endpoint's share);
- "baseline": `Controller(..., metering=False)` and no endpoint.
Each scan's time is `ctl.status.last_scan_s`, taken by a scan hook. Printed: each arm's p99,
the ratios, and what a scrape costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import structlog
from prometheus_client.parser import text_string_to_metric_families

from controller.journal import JournalKeeper
from controller.metrics import Metrics
from controller.runtime import Controller, Status
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.site import MetricsConfig, Site, demo_site
from tests.unit.core_helpers import HEALTHY

TARGET_RATIO = 1.1
SCANS = int(os.environ.get("HEATLOOP_BENCH_METRICS_SCANS", "400"))  # per arm
BLOCKS = 4  # alternating blocks per arm
SCRAPE_EVERY_S = 1.0

# a healthy plant (the core tests' own): the customer takes heat, so the controller reaches
# NORMAL_REUSE and the meter accounts delivered energy every scan
PLANT = HEALTHY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _p(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No log lines on the console during the timing (both arms alike)."""
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        structlog.reset_defaults()


class _Plant:
    """A scan hook keeping the PLC's inputs live: loop temperatures wiggle (a flat line is a
    frozen sensor), actuator feedback follows the commands, the meter's totaliser counts."""

    def __init__(self, plc: MemoryPlc, period_s: float) -> None:
        self.plc = plc
        self.period_s = period_s
        self.n = 0
        self.energy = float(PLANT["heat_meter_energy"])
        plc.set_many({k: v for k, v in PLANT.items() if k in plc.measured()})

    def __call__(self, st: Status) -> None:
        self.n += 1
        w = 0.02 * (self.n % 2)
        self.energy += float(PLANT["heat_meter_power"]) * self.period_s / 3600.0
        cmd = self.plc.commanded()
        self.plc.set_many(
            {
                "it_supply_temp": 35.0 + w,
                "it_return_temp": 45.0 + w,
                "heat_meter_energy": round(self.energy, 3),
                "reuse_valve_pos": float(cmd["reuse_valve_cmd"]),
                "primary_pump_a_running": bool(cmd["primary_pump_a_cmd"]),
                "primary_pump_b_running": bool(cmd["primary_pump_b_cmd"]),
                "secondary_pump_running": bool(cmd["secondary_pump_cmd"]),
            }
        )


def _controller(site: Site, folder: Path, metered: bool) -> tuple[Controller, MemoryPlc]:
    plc = MemoryPlc(site)
    folder.mkdir(parents=True, exist_ok=True)
    journal = JournalKeeper(folder / "heatloop.db")
    ctl = Controller(site, MemoryTransport(site, plc), journal=journal, metering=metered)
    ctl.scan_hooks.append(_Plant(plc, site.scan.period_s))
    return ctl, plc


class _Scraper(threading.Thread):
    """GET /metrics every second, as Prometheus would (which parses in its own process: the
    last body is parsed here after the timing, to count its samples)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.times: list[float] = []
        self.body = ""
        self.errors = 0

    def run(self) -> None:
        while not self.stop.wait(SCRAPE_EVERY_S):
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    self.body = resp.read().decode("utf-8")
            except Exception:
                self.errors += 1
                continue
            self.times.append(time.perf_counter() - t)


async def _block(ctl: Controller, n: int, times: list[float]) -> None:
    """Run the controller as a service until `n` more scans have completed."""
    stop = asyncio.Event()
    start = ctl.status.scans

    def hook(st: Status) -> None:
        times.append(st.last_scan_s)
        if st.scans - start >= n:
            stop.set()

    ctl.scan_hooks.append(hook)
    try:
        await ctl.run(stop)
    finally:
        ctl.scan_hooks.remove(hook)


# the arms: name -> (metering on, endpoint served and scraped)
ARMS: dict[str, tuple[bool, bool]] = {
    "with": (True, True),
    "endpoint": (False, True),
    "baseline": (False, False),
}


async def _arm(
    site: Site, folder: Path, metered: bool, endpoint: bool, n: int, times: list[float]
) -> tuple[_Scraper | None, Controller]:
    """One block: a fresh controller on the arm's state directory (restored from it)."""
    ctl, _ = _controller(site, folder, metered)
    metrics = scraper = None
    if endpoint:
        metrics = Metrics(site, ctl)
        metrics.start()
        ctl.scan_hooks.insert(0, metrics.on_scan)
        scraper = _Scraper(f"http://{metrics.address}/metrics")
        scraper.start()
    try:
        await _block(ctl, n, times)
    finally:
        if scraper is not None:
            scraper.stop.set()
            scraper.join(5)
        if metrics is not None:
            metrics.close()
    return scraper, ctl


def run() -> list[str]:
    base = demo_site().with_control(
        customer_ready_dwell_s=0.0,
        reject_dwell_s=1.0,
        min_mode_dwell_s=1.0,
        reuse_reentry_min_s=0.0,
    )
    site = base.model_copy(update={"metrics": MetricsConfig(host="127.0.0.1", port=_free_port())})
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    scrapes: list[float] = []
    series = errors = 0
    modes: set[str] = set()
    wired = "metering" in inspect.signature(Controller.__init__).parameters
    per_block = max(1, SCANS // BLOCKS)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        for _ in range(BLOCKS):
            for name, (metered, endpoint) in ARMS.items():
                folder = Path(tmp) / name
                scraper, ctl = asyncio.run(
                    _arm(site, folder, metered, endpoint, per_block, times[name])
                )
                if scraper is not None:
                    scrapes += scraper.times
                    fams = text_string_to_metric_families(scraper.body)
                    series = max(series, sum(len(f.samples) for f in fams))
                    errors += scraper.errors
                d = ctl.status.decision
                if d is not None:
                    modes.add(d.mode.value)
    p99 = {name: _p(xs, 0.99) for name, xs in times.items()}
    med = {name: statistics.median(xs) for name, xs in times.items()}
    ratio = p99["with"] / p99["baseline"]
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    label = {
        "with": f"metering + endpoint scraped every {SCRAPE_EVERY_S:g} s",
        "endpoint": "endpoint scraped, no metering",
        "baseline": "baseline (no metering, no endpoint)",
    }
    lines = [
        f"scan time at the real period ({base.scan.period_s:g} s), in-memory PLC, journal on "
        f"disk; {per_block * BLOCKS} scans per arm in {BLOCKS} alternating blocks; modes "
        f"reached: {', '.join(sorted(modes))}",
        *(
            f"  {label[name]:<46} p99 {p99[name] * 1000:6.2f} ms, median {med[name] * 1000:5.2f} ms"
            for name in ARMS
        ),
        f"  ratio p99 with / baseline {ratio:5.3f} (target <= {TARGET_RATIO}): {verdict}",
        f"  ratio p99 endpoint / baseline {p99['endpoint'] / p99['baseline']:5.3f} (the "
        "endpoint's share)",
        f"  scrapes: {len(scrapes)} ({errors} failed), {series} samples each, GET "
        f"median {statistics.median(scrapes) * 1000 if scrapes else float('nan'):.1f} ms "
        "(it waits for the next scan, then builds)",
    ]
    if not wired:
        lines.append("  NOTE: Controller has no metering switch yet: every arm meters")
    return lines


if __name__ == "__main__":
    for line in run():
        print(line)
