"""The loop's speed figures (DESIGN §12), each against a baseline measured in the same run.

1. supervisor step compute time over a realistic, varying image sequence (recorded from a
   running ClosedLoop), against the plant's `step` alone on the same states;
2. closed-loop speed in-process (plant + supervisor at 1 s steps), against the plant alone
   (`step` + `measure`);
3. interlock reaction over loopback Modbus: an in-process SimPlc and Controller with a
   ModbusTransport; a leak injected into the PLC until the controller has written the isolation
   outputs, against the scan period.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
import statistics
import time
from collections.abc import Callable, Iterator

import structlog

from controller.modes import Mode
from controller.runtime import Controller
from controller.study import ClosedLoop, image_of
from controller.supervisor import Supervisor, SupervisorConfig
from plc_io.image import ProcessImage
from plc_io.modbus import ModbusTransport
from plc_io.site import Site, demo_site
from plc_io.tags import Value
from sim import plant
from sim.plc import SimPlc

STEP_TARGET_S = 1e-3  # median supervisor step
LOOP_TARGET_X = 20_000.0  # simulated s per wall s, closed loop at 1 s steps
REACTION_MARGIN_S = 0.050  # p99 reaction <= one scan period + this

N_STEPS = 6000  # supervisor steps timed (one per recorded image)
LOOP_SIM_S = 6 * 3600.0  # closed-loop run length (simulated)
N_REACTIONS = 40
POLL_S = 0.001  # resolution of the reaction measurement

ISOLATION: dict[str, Value] = {
    "reuse_valve_cmd": 0.0,
    "secondary_pump_cmd": False,
    "reuse_isolation_cmd": False,
    "customer_isolation_cmd": False,
}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _time_each(calls: list[Callable[[], object]]) -> list[float]:
    out = []
    pc = time.perf_counter
    with _no_gc():
        for fn in calls:
            t = pc()
            fn()
            out.append(pc() - t)
    return out


# ---- 1. supervisor step ----


def _recorded(site: Site, n: int) -> tuple[list[tuple[ProcessImage, float]], list[tuple]]:
    """n (image, time) pairs and n (plant state, actuators) pairs from a running closed loop."""
    loop = ClosedLoop(site, dt_s=1.0)
    images, states = [], []
    for _ in range(n):
        now = loop.elapsed_s
        images.append((image_of(plant.measure(loop.state), now), now))
        loop.tick()
        states.append((loop.state, dict(loop.outputs)))
    return images, states


def bench_step(site: Site) -> list[str]:
    images, states = _recorded(site, N_STEPS)
    sup = Supervisor(SupervisorConfig.from_site(site), 0.0)
    modes: set[Mode] = set()

    def one(img: ProcessImage, now: float) -> Callable[[], object]:
        def f() -> None:
            modes.add(sup.step(img, now).mode)

        return f

    step_s = _time_each([one(img, now) for img, now in images])
    plant_s = _time_each([lambda s=s, a=a: plant.step(s, a, 1.0) for s, a in states])
    med, p99 = statistics.median(step_s), _pct(step_s, 0.99)
    bmed, bp99 = statistics.median(plant_s), _pct(plant_s, 0.99)
    ok = "met" if med <= STEP_TARGET_S else "NOT met"
    return [
        f"supervisor step, {N_STEPS} steps of a running closed loop (dt 1 s; modes seen: "
        f"{', '.join(sorted(m.value for m in modes))})",
        f"  step:     median {med * 1e6:7.1f} µs  p99 {p99 * 1e6:7.1f} µs"
        f"  (target median <= {STEP_TARGET_S * 1e6:.0f} µs: {ok})",
        f"  baseline plant.step alone: median {bmed * 1e6:7.1f} µs  p99 {bp99 * 1e6:7.1f} µs",
        f"  ratio supervisor / plant step: median {med / bmed:5.2f}x  p99 {p99 / bp99:5.2f}x",
    ]


# ---- 2. closed-loop speed ----


def bench_closed_loop(site: Site) -> list[str]:
    loop = ClosedLoop(site, dt_s=1.0)
    with _no_gc():
        t = time.perf_counter()
        r = loop.run(LOOP_SIM_S)
        loop_wall = time.perf_counter() - t
    speed = r.sim_s / loop_wall

    state = plant.initial(site.plant, site.sim.seed, site.sim.start_day * 86400.0)
    cmds = dict(site.safe_outputs())
    n = int(LOOP_SIM_S)
    with _no_gc():
        t = time.perf_counter()
        for _ in range(n):
            plant.measure(state)
            state = plant.step(state, cmds, 1.0)
        plant_wall = time.perf_counter() - t
    base = n / plant_wall
    ok = "met" if speed >= LOOP_TARGET_X else "NOT met"
    modes = ", ".join(f"{m} {100 * s / r.sim_s:.0f} %" for m, s in r.mode_s.most_common())
    return [
        f"closed loop in-process (ClosedLoop, dt 1 s, {LOOP_SIM_S / 3600:g} h simulated; {modes})",
        f"  plant + supervisor: {speed:10,.0f} x real time ({loop_wall:.2f} s wall)"
        f"  (target >= {LOOP_TARGET_X:,.0f} x: {ok})",
        f"  baseline plant alone (step + measure): {base:10,.0f} x real time",
        f"  ratio closed loop / plant alone: {speed / base:5.3f}"
        f"  (supervisor + loop bookkeeping: {base / speed - 1:3.1f}x the plant's own time)",
    ]


# ---- 3. interlock reaction over loopback Modbus ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reaction_site() -> Site:
    """The demo site with dwell times short enough to be back in NORMAL_REUSE within ~1 s."""
    return demo_site().with_control(
        customer_ready_dwell_s=0.0,
        reject_dwell_s=0.5,
        min_mode_dwell_s=0.5,
        reuse_reentry_min_s=0.0,
    )


async def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: {what} not reached within {timeout_s} s")
        await asyncio.sleep(POLL_S)
    return time.monotonic()


async def _reactions(site: Site, n: int) -> tuple[list[float], int]:
    rng = random.Random(0)
    period = site.scan.period_s
    plc = SimPlc(site, modbus_port=_free_port(), opcua_port=_free_port())
    async with plc:
        transport = ModbusTransport(site, port=plc.modbus_port)
        ctl = Controller(site, transport)
        stop = asyncio.Event()
        task = asyncio.create_task(ctl.run(stop))

        def mode() -> Mode | None:
            d = ctl.status.decision
            return d.mode if d is not None else None

        def isolated() -> bool:
            c = plc.commanded()
            return all(c[k] == v for k, v in ISOLATION.items())

        out: list[float] = []
        try:
            for _ in range(n):
                await _until(lambda: mode() is Mode.NORMAL_REUSE, 20.0, "NORMAL_REUSE")
                await _until(lambda: not isolated(), 2.0, "reuse circuit open")
                await asyncio.sleep(rng.uniform(0.0, period))  # a random scan phase
                t0 = time.monotonic()
                plc.inject("leak", "reuse")
                out.append(await _until(isolated, 5.0, "isolation commanded") - t0)
                await _until(lambda: mode() is Mode.LEAK_TRIP, 2.0, "LEAK_TRIP")
                plc.clear("leak", "reuse")
                await _until(lambda: ctl.status.image["leak_reuse"].value is False, 2.0, "leak dry")
                ctl.reset_trip()
        finally:
            stop.set()
            await asyncio.wait_for(task, 5.0)
        return out, ctl.status.overruns


def bench_reaction() -> list[str]:
    site = _reaction_site()
    period = site.scan.period_s
    # quiet: structlog (the controller, the PLC) and asyncua's warning about the simulated
    # PLC's None endpoint, which is by design for this test instrument
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    ua_log = logging.getLogger("asyncua")
    ua_level = ua_log.level
    ua_log.setLevel(logging.ERROR)
    try:
        xs, overruns = asyncio.run(_reactions(site, N_REACTIONS))
    finally:
        structlog.reset_defaults()
        ua_log.setLevel(ua_level)
    med, p99 = statistics.median(xs), _pct(xs, 0.99)
    target = period + REACTION_MARGIN_S
    ok = "met" if p99 <= target else "NOT met"
    return [
        f"interlock reaction over loopback Modbus (IL-04 leak, SimPlc + Controller in one "
        f"process, scan {period * 1000:.0f} ms, {len(xs)} runs at random scan phase; "
        f"inject -> isolation in plc.commanded(), {POLL_S * 1000:g} ms resolution)",
        f"  reaction: median {med * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms"
        f"  max {max(xs) * 1000:6.1f} ms  (target p99 <= {target * 1000:.0f} ms: {ok})",
        f"  (p99 of {len(xs)} runs is the slowest run)",
        f"  baseline scan period {period * 1000:.0f} ms: ratio median {med / period:4.2f}"
        f"  p99 {p99 / period:4.2f}  (scan overruns {overruns})",
    ]


def run() -> list[str]:
    site = demo_site()
    return [*bench_step(site), *bench_closed_loop(site), *bench_reaction()]


if __name__ == "__main__":
    print("\n".join(run()))
