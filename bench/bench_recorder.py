"""The flight recorder's size and cost, and replay speed, on a realistic closed-loop recording.

The recording: the simulated plant and the decision core at the default 250 ms scan for one
simulated hour, with a reuse leak that trips IL-04, an operator's acknowledgement and an
engineer's reset. Every reading passes through its tag's Modbus encoding first (int16 × scale,
float32), so the recorded values are what a controller reads from a PLC, not the plant model's
full-precision floats. The recorder writes one chunk per simulated second (its writer thread
writes about once a wall second at a 250 ms scan).

Figures:
1. bytes per scan and per day on disk, and the 24 h ring's size at that rate;
2. what recording costs the scan: `put` (median and p99, µs) — all the scan does — and the
   writer thread's CPU per scan (digest, encoding, compression, write), off the scan path;
3. replay speed in recorded scans per second (target ≥ 10,000), against the supervisor step
   alone on the same images in the same run (the baseline: replay cannot beat the core it
   re-runs) and against `Core.step` alone (the rest is decoding, digest and comparison).

Run: `.venv/bin/python -m bench recorder`.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

from controller.authority import Request
from controller.core import Core, ScanInput
from controller.recorder import Recorder, iter_records, segments
from controller.replay import replay
from controller.study import DAY_S
from controller.supervisor import Commands, Supervisor, SupervisorConfig
from plc_io.codec import decode, encode_or_none
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import Site, demo_site
from sim import faults
from sim.plant import initial, measure, step

PERIOD_S = 0.25
SIM_S = 3600.0
LEAK_S, DRY_S, ACK_S, RESET_S = 1200.0, 1500.0, 1260.0, 1620.0
REPLAY_TARGET = 10_000.0  # recorded scans per second
SCANS_PER_DAY = DAY_S / PERIOD_S


def plc_image(site: Site, meas: dict[str, float | bool], now_s: float) -> ProcessImage:
    """The readings as the PLC's registers carry them, read 5 ms before the scan's time."""
    samples = {}
    for tag in site.inputs:
        if tag.name not in meas:
            continue
        raw = encode_or_none(tag, meas[tag.name])
        if isinstance(raw, bool):  # a coil or discrete input
            raw = [raw]
        value = decode(tag, raw) if raw is not None else meas[tag.name]
        samples[tag.name] = Sample(value, Quality.GOOD, now_s - 0.005)
    return ProcessImage(samples)


def requests_at(t: float) -> tuple[Request, ...]:
    if t == ACK_S:
        return (Request("b-1", "bob", "operator", "ack", {"all": True}),)
    if t == RESET_S:
        return (Request("b-2", "alice", "engineer", "reset", {"rules": []}, "leak dried"),)
    return ()


def record(site: Site, wall0: float) -> tuple[Recorder, list[ScanInput], list[float], float]:
    """Run and record; returns the recorder, the inputs, each `put`'s time and the writer's."""
    rec = Recorder.for_site(site, thread=False)
    state = initial(site.plant, 0, site.sim.start_day * DAY_S, site.tags)
    core = Core(site, 0.0, wall0)
    inputs: list[ScanInput] = []
    put_s: list[float] = []
    writer_s = 0.0
    pc = time.perf_counter
    n = int(SIM_S / PERIOD_S)
    for k in range(n):
        now = k * PERIOD_S
        if now == LEAK_S:
            state = faults.inject(state, "leak", "reuse", 5.0)
        if now == DRY_S:
            state = faults.clear(state, "leak", "reuse")
        inp = ScanInput(
            plc_image(site, measure(state), now), now, wall0 + now, True, requests=requests_at(now)
        )
        if rec.snapshot_due(inp.wall_s):
            rec.put_snapshot(inp.wall_s, core.snapshot())
        result = core.step(inp)
        t = pc()
        rec.put(inp, result)
        put_s.append(pc() - t)
        inputs.append(inp)
        state = step(state, result.decision.values(), PERIOD_S)
        if k % 4 == 3:  # one chunk a second, as the writer thread does at this scan period
            t = pc()
            rec.drain()
            writer_s += pc() - t
    t = pc()
    rec.close()
    writer_s += pc() - t
    return rec, inputs, put_s, writer_s


def run() -> list[str]:
    site0 = demo_site()
    wall0 = 1_800_000_000.0
    with tempfile.TemporaryDirectory() as tmp:
        site = demo_site(Path(tmp))
        rec, inputs, put_s, writer_s = record(site, wall0)
        n = len(inputs)
        rec_dir = site.state_dir / "recorder"
        size = sum(p.stat().st_size for p in segments(rec_dir))
        per_scan = size / n
        per_day = per_scan * SCANS_PER_DAY
        ring = per_day * site0.recorder.hours / 24.0

        gc.collect()
        t = time.perf_counter()
        report = replay(site, rec_dir, wall0, wall0 + SIM_S)
        replay_s = time.perf_counter() - t
        images = [(r.image, r.now_s) for r in iter_records(rec_dir)]

    # baselines on the same inputs: the supervisor step alone, and the core step alone
    sup = Supervisor(SupervisorConfig.from_site(site0), 0.0)
    cmds = Commands()
    gc.collect()
    t = time.perf_counter()
    for img, now in images:
        sup.step(img, now, cmds)
    sup_s = time.perf_counter() - t
    core = Core(site0, 0.0, wall0)
    gc.collect()
    t = time.perf_counter()
    for inp in inputs:
        core.step(inp)
    core_s = time.perf_counter() - t

    replay_rate, sup_rate, core_rate = n / replay_s, n / sup_s, n / core_s
    put_sorted = sorted(put_s)
    p99 = put_sorted[int(0.99 * (len(put_sorted) - 1))]
    verdict = "met" if replay_rate >= REPLAY_TARGET else "NOT met"
    return [
        f"closed loop, {SIM_S / 3600:g} h at {PERIOD_S * 1000:.0f} ms ({n} scans), leak trip, "
        f"ack, reset; values as the PLC's registers carry them",
        f"  on disk        {per_scan:8.1f} bytes per scan, {per_day / 1e6:8.1f} MB per day; "
        f"24 h ring {ring / 1e6:.0f} MB (cap {rec.max_bytes / 1e9:.0f} GB)",
        f"  scan's cost    put median {statistics.median(put_s) * 1e6:6.2f} µs, "
        f"p99 {p99 * 1e6:6.2f} µs; writer thread {writer_s / n * 1e6:6.1f} µs CPU per scan "
        f"(off the scan path); dropped {rec.dropped}",
        f"  replay         {replay_rate:8.0f} scans/s ({report.matched}/{report.scans} matched "
        f"bit for bit), target ≥ {REPLAY_TARGET:,.0f}: {verdict}",
        f"  baselines      supervisor step alone {sup_rate:8.0f} steps/s (replay/supervisor "
        f"{replay_rate / sup_rate:.2f}); Core.step alone {core_rate:8.0f} steps/s "
        f"(replay/core {replay_rate / core_rate:.2f})",
    ]
