"""A burst of operator commands with the flight recorder on, against the plain scan.

Two runs of the same controller over the in-memory PLC, each with a real journal in a temporary
state directory and its command channel on a real Unix socket: (a) neither commands nor the
recorder; (b) the recorder on, and 1,000 requests sent at once by 8 client threads of another
process through the socket while the scan runs. Measured per scan (wall time, the journal's
commit in its worker thread as in production): from the scan's start to the outputs
acknowledged by the PLC, and the whole scan, which waits for the journal (at most half a
period) only when it carries the plant's events; an accepted request is answered once its
record is on disk, at a later scan if need be. Reported: p50 and p99 of
each, the loaded/plain ratio of the p99s (target ≤ 1.1), and what became of the 1,000
requests. The channel's rate limits and the per-scan limit keep a flood out of the scan.

Run: `.venv/bin/python -m bench commands`.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.bench_journal import Quiet, Stamped
from controller.channel import ChannelServer, NoController, call
from controller.journal import JournalKeeper
from controller.recorder import Recorder
from controller.runtime import Controller
from plc_io.memory import MemoryPlc
from plc_io.site import Site, demo_site
from tests.unit.core_helpers import HEALTHY

SCANS = 480
BURST_AT = 80  # scans in, the burst starts
BURST = 1000
CLIENTS = 8


def _burst(sock: Path) -> Counter[str]:
    """1,000 requests from CLIENTS threads of this process (run as its own process)."""

    def one(i: int) -> str:
        try:
            r = call(sock, "setpoint", {"name": "supply_setpoint_c", "value": 25.0 + i % 10})
        except NoController as e:
            return f"no answer: {str(e)[:40]}"
        if r.get("ok"):
            return "accepted"
        why = str(r.get("why", ""))
        return "busy" if "busy" in why else why.split(":")[0][:40]

    with ThreadPoolExecutor(CLIENTS) as pool:
        return Counter(pool.map(one, range(BURST)))


def _sender(sock: Path) -> subprocess.Popen[str]:
    """The burst from another process, as people's CLIs would send it."""
    code = (
        "import json, sys; from pathlib import Path; from bench.bench_commands import _burst; "
        "print(json.dumps(_burst(Path(sys.argv[1]))))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(sock)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )


async def _run(
    site: Site, folder: Path, loaded: bool
) -> tuple[list[float], list[float], Counter[str]]:
    plc = MemoryPlc(site, clock=time.monotonic)
    plc.set_many({k: v for k, v in HEALTHY.items() if k in plc.measured()})
    transport = Stamped(site, plc, log=Quiet())
    recorder = Recorder.for_site(site) if loaded else None
    ctl = Controller(
        site,
        transport,
        journal=JournalKeeper(folder / "heatloop.db"),
        recorder=recorder,
        log=Quiet(),
    )
    sock = folder / "heatloop.sock"
    server = ChannelServer(sock, site.roles, ctl.submit, ctl.read, log=Quiet())
    await server.start()
    await transport.connect()
    outcome: Counter[str] = Counter()
    sender: subprocess.Popen[str] | None = None
    durations: list[float] = []
    to_outputs: list[float] = []
    period = site.scan.period_s
    try:
        for i in range(SCANS):
            if loaded and i == BURST_AT:
                sender = _sender(sock)
            plc.set("it_supply_temp", 35.0 + 0.02 * (i % 2))
            plc.set("it_return_temp", 45.0 + 0.02 * (i % 2))
            t0 = time.perf_counter()
            await ctl.scan_once()
            dt = time.perf_counter() - t0
            durations.append(dt)
            to_outputs.append(transport.written_at - t0)
            await asyncio.sleep(max(0.0, period - dt))
        if sender is not None:
            out, _ = await asyncio.to_thread(sender.communicate, timeout=120.0)
            outcome.update(json.loads(out))
    finally:
        await server.close()
        await ctl.close_journal()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
    return to_outputs, durations, outcome


def _p(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


def run() -> list[str]:
    base = demo_site()
    scan = base.scan.model_copy(update={"period_s": 0.05})  # 20 scans a second: a short bench
    roles = {getpass.getuser(): "engineer"}
    lines = []
    outputs, whole = {}, {}
    for loaded in (False, True):
        with tempfile.TemporaryDirectory() as d:
            state = base.state.model_copy(update={"dir": d})
            site = base.model_copy(update={"scan": scan, "state": state, "roles": roles})
            outputs[loaded], whole[loaded], outcome = asyncio.run(_run(site, Path(d), loaded))
        name = "burst of 1,000 + recorder" if loaded else "plain scan"
        for what, xs in (("to outputs", outputs[loaded]), ("whole scan", whole[loaded])):
            lines.append(
                f"{name:26s} {what}: p50 {_p(xs, 50) * 1e3:6.2f} ms  "
                f"p99 {_p(xs, 99) * 1e3:6.2f} ms  max {max(xs) * 1e3:6.2f} ms"
            )
        if loaded:
            told = ", ".join(f"{k} {v}" for k, v in outcome.most_common())
            lines.append(f"  the 1,000 requests: {told}")
    for what, xs in (("scan start to outputs", outputs), ("whole scan (journal wait)", whole)):
        ratio = _p(xs[True], 99) / _p(xs[False], 99)
        lines.append(f"ratio p99 loaded / plain, {what}: {ratio:5.2f}  (target ≤ 1.1)")
    return lines
