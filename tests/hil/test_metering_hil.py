"""Metering against the simulated plant over real sockets: `heatloop sim serve --speed` and
`heatloop run` as processes, the controller's figures read as a customer's auditor would
(`heatloop report --format json`, `heatloop status --json`, the store read-only) and held
against the plant's own truth from the simulated PLC's OPC UA `Sim/Plant` folder.

Two plants, each shared by the tests of its class (one sim and one controller per class, so the
file stays within its wall-time budget):

- a fast plant (a simulated day in 48 s of wall time) with an exact meter: the bill over a
  day against the true delivered heat, then kill -9 of the controller mid-run;
- a plant whose meter reads 1 % high and starts just below a small rollover count: the bill
  across the rollover and across a meter swap, then a leak trip, a customer outage and a
  maintenance window classed as interruptions.

Both plants start with the customer offline (a scenario event at 0 s), so the controller's
first reading is a meter standing still. Each measurement starts and ends the same way (the
customer offline, the meter steady and read by the controller), so the bill and the truth cover
exactly the same heat and are compared to the meter's resolution, not to a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from controller.journal import read_meter
from plc_io.site import Site, load_site, set_key
from tests.hil.conftest import free_port
from tests.hil.procs import (
    NS,
    ROOT,
    ControllerProc,
    Ports,
    cli,
    heatloop,
    status,
    stop_process,
    wait_port,
    write_site,
)

pytestmark = pytest.mark.hil

INTERVAL_S = 10  # [metering] interval_s: short, so intervals close while the test runs
# The meter may count up to [metering] meter_max_kw per second of the controller's clock; the
# plant runs `speed` times faster, so that is the customer's design power (x 1.5 margin) times
# the speed: no faster, or a step the meter could not have counted would pass as delivered heat.
METER_MAX_MARGIN = 1.5
RESOLUTION_KWH = 0.1  # the demo site's heat_meter_energy register: int32 at 0.1 kWh
DAY_SPEED = 1800.0  # a simulated day in 48 s of wall time
DAY_STEP_S = 2.0  # [sim] step_s at that speed: 900 plant steps per wall second
SWAP_SPEED = 480.0
SWAP_STEP_S = 1.0
ROLLOVER_KWH = 1000.0
SWAP_START_KWH = 985.0  # 15 kWh below the rollover: it wraps within seconds of delivery
ERROR_PCT = 1.0  # the swap plant's meter reads 1 % high
WINTER_DAY = 20.0  # [sim] start_day: the pool takes heat all day
STEADY_SCENARIO = '[[event]]\nat_s = 0\nname = "customer_offline"\n'


# ---- site files and processes ----


def put(text: str, section: str, key: str, value: Any) -> str:
    """`key = value` in `[section]`: replaced where the text has it, else added under the
    header, else a new section at the end (the demo file lists no [metering] table)."""
    with contextlib.suppress(KeyError):
        return set_key(text, section, key, value)
    header = f"[{section}]\n"
    if header in text:
        return text.replace(header, f"{header}{key} = {json.dumps(value)}\n", 1)
    return f"{text.rstrip()}\n\n{header}{key} = {json.dumps(value)}\n"


def meter_site(
    folder: Path, ports: Ports, plant: dict[str, Any], speed: float, speed_step_s: float
) -> tuple[Path, Site]:
    """The HIL site (free ports, short dwells, me as engineer) with a meter test's keys."""
    path = write_site(folder, ports, folder / "state")
    text = path.read_text(encoding="utf-8")
    design_kw = load_site(path).plant.customer_design_kw
    max_kw = METER_MAX_MARGIN * design_kw * speed
    keys: list[tuple[str, str, Any]] = [
        ("sim", "step_s", speed_step_s),
        # the plant runs hundreds of times faster than the controller's clock: a temperature
        # moves that much faster per second, which the rate check must allow
        ("interlocks", "max_rate_k_per_s", 100.0),
        ("sim", "start_day", WINTER_DAY),
        ("metering", "interval_s", INTERVAL_S),
        ("metering", "meter_max_kw", max_kw),
        ("metering", "meter_rollover_kwh", plant.get("heat_meter_rollover_kwh", 1e8)),
        *(("plant", k, v) for k, v in plant.items()),
    ]
    for section, key, value in keys:
        text = put(text, section, key, value)
    path.write_text(text, encoding="utf-8")
    site = load_site(path)  # the edits took: checked, not assumed
    assert site.metering.interval_s == INTERVAL_S and site.sim.step_s == speed_step_s
    for k, v in plant.items():
        assert getattr(site.plant, k) == v, k
    return path, site


@dataclass
class Rig:
    """One simulated plant served at a speed, and the controller(s) run against it."""

    site_path: Path
    site: Site
    ports: Ports
    sim: subprocess.Popen[bytes]
    started_wall: float
    controllers: list[ControllerProc] = field(default_factory=list)

    @property
    def ctl(self) -> ControllerProc:
        return self.controllers[-1]

    @property
    def db(self) -> Path:
        return self.site.state_dir / "heatloop.db"

    def start_controller(self) -> ControllerProc:
        c = ControllerProc(self.site_path, f"controller#{len(self.controllers)}")
        self.controllers.append(c)
        return c


@contextlib.contextmanager
def rig(folder: Path, plant: dict[str, Any], speed: float, step_s: float) -> Iterator[Rig]:
    ports = Ports(free_port(), free_port(), free_port())
    path, site = meter_site(folder, ports, plant, speed, step_s)
    scenario = folder / "customer_offline_at_start.toml"
    scenario.write_text(STEADY_SCENARIO, encoding="utf-8")
    log_path = folder / "sim.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            heatloop(
                "sim", "serve", "--site", str(path), "--scenario", str(scenario),
                "--speed", str(speed),
            ),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    r = Rig(path, site, ports, proc, time.time())
    try:
        wait_port(ports.plc, proc, log_path, 30.0)
        wait_port(ports.opcua, proc, log_path, 30.0)
        r.start_controller()
        yield r
    finally:
        for c in r.controllers:
            c.cleanup()
        stop_process(proc)


@pytest.fixture(scope="class")
def day_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with rig(tmp_path_factory.mktemp("meter-day"), {}, DAY_SPEED, DAY_STEP_S) as r:
        yield r


@pytest.fixture(scope="class")
def swap_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    plant = {
        "heat_meter_start_kwh": SWAP_START_KWH,
        "heat_meter_rollover_kwh": ROLLOVER_KWH,
        "heat_meter_error_pct": ERROR_PCT,
    }
    with rig(tmp_path_factory.mktemp("meter-swap"), plant, SWAP_SPEED, SWAP_STEP_S) as r:
        yield r


# ---- the simulated plant's fault interface and truth (OPC UA `Sim`) ----


class Bench:
    """The test instruments: faults in, true plant values out."""

    def __init__(self, client: Client, ns: int) -> None:
        self.client, self.ns = client, ns
        self.sim = client.get_node(ua.NodeId("Sim", ns))

    async def inject(self, name: str, target: str = "", value: float = 1.0) -> None:
        await self.sim.call_method(f"{self.ns}:InjectFault", name, target, float(value))

    async def clear(self, name: str, target: str = "") -> None:
        await self.sim.call_method(f"{self.ns}:ClearFault", name, target)

    async def truth(self, *names: str) -> dict[str, float]:
        nodes = [self.client.get_node(ua.NodeId(f"Sim.Plant.{n}", self.ns)) for n in names]
        values = await self.client.read_values(nodes)
        return {n: float(v) for n, v in zip(names, values, strict=True)}


@contextlib.asynccontextmanager
async def bench(r: Rig) -> AsyncIterator[Bench]:
    client = Client(f"opc.tcp://127.0.0.1:{r.ports.opcua}/", timeout=4)
    await client.connect()
    try:
        yield Bench(client, await client.get_namespace_index(NS))
    finally:
        await client.disconnect()


# ---- the controller's side ----


async def ctl_status(r: Rig) -> dict[str, Any]:
    return await asyncio.to_thread(status, r.site_path)


async def until_status(
    r: Rig, pred: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = await ctl_status(r)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            short = {k: st.get(k) for k in ("mode", "meter", "reject_reasons", "alarms")}
            raise AssertionError(f"{what} not seen within {timeout_s} s; last status {short}")
        await asyncio.sleep(0.25)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


async def report(r: Rig, from_wall: float, to_wall: float) -> dict[str, Any]:
    """`heatloop report --format json` over [from, to) as a person at the IPC runs it."""
    p = await asyncio.to_thread(
        cli, r.site_path, "report", "--from", iso(from_wall), "--to", iso(to_wall),
        "--format", "json",
    )  # fmt: skip
    assert p.returncode == 0, f"report exited {p.returncode}: {p.stderr}"
    st = json.loads(p.stdout)
    assert isinstance(st["delivered_kwh"], float | int) and "availability_pct" in st
    return st


def whole_run(r: Rig) -> tuple[float, float]:
    return r.started_wall - 3600.0, time.time() + 3600.0


async def intervals(r: Rig) -> list[dict[str, Any]]:
    """Every interval row in the store, oldest first (read-only, beside the running controller)."""
    lo, hi = whole_run(r)
    data = await asyncio.to_thread(read_meter, r.db, lo, hi)
    return data.intervals


async def interruptions(r: Rig) -> list[dict[str, Any]]:
    """Every interruption row in the store, in order (read-only)."""
    lo, hi = whole_run(r)
    data = await asyncio.to_thread(read_meter, r.db, lo, hi)
    return sorted(data.interruptions, key=lambda i: i["id"])


async def wait_mode_after(ctl: ControllerProc, mode: str, t_mono: float, timeout_s: float) -> float:
    """The wall time the controller logged entering `mode` after monotonic `t_mono`."""
    e = await ctl.wait_event(
        lambda e: e.get("event") == "mode_changed" and e.get("source") == mode
        and e["_rx_s"] >= t_mono,
        timeout_s,
        f"mode_changed to {mode}",
    )  # fmt: skip
    return time.time() - (time.monotonic() - e["_rx_s"])


@dataclass(frozen=True)
class Steady:
    delivered_kwh: float  # the plant's true delivered heat so far
    meter_kwh: float  # what the meter shows (and the controller last read)
    wall: float


async def steady(r: Rig, b: Bench) -> Steady:
    """The customer offline, the meter standing, and the controller has read it."""
    await b.inject("customer_offline")
    names = ("delivered_kwh", "heat_meter_energy_kwh", "customer_kw")
    deadline = time.monotonic() + 20.0
    last: dict[str, float] = {}
    while True:
        t = await b.truth(*names)
        if t["customer_kw"] == 0.0 and last and t["delivered_kwh"] == last["delivered_kwh"]:
            break
        assert time.monotonic() < deadline, f"the plant did not stop delivering: {t}"
        last = t
        await asyncio.sleep(0.3)
    await until_status(
        r,
        lambda st: (
            st["meter"]["meter_kwh"] is not None
            and abs(st["meter"]["meter_kwh"] - t["heat_meter_energy_kwh"]) <= RESOLUTION_KWH
        ),
        10.0,
        f"the controller reading the standing meter ({t['heat_meter_energy_kwh']:.2f} kWh)",
    )
    return Steady(t["delivered_kwh"], t["heat_meter_energy_kwh"], time.time())


@dataclass
class Delivery:
    """Samples of the customer side while heat flows, for the meter's error bound."""

    samples: list[dict[str, float]] = field(default_factory=list)

    async def run_until(self, b: Bench, done: Callable[[dict[str, float]], bool]) -> None:
        names = (
            "t_s", "delivered_kwh", "heat_meter_energy_kwh", "customer_kw",
            "customer_supply_temp_c", "customer_return_temp_c", "customer_flow_m3h",
        )  # fmt: skip
        while True:
            t = await b.truth(*names)
            self.samples.append(t)
            if done(t):
                return
            await asyncio.sleep(0.5)

    def mpe_pct(self, dt_min_k: float, qp_m3h: float) -> float:
        """EN 1434 class 2 maximum permissible error 2 + 4 dTmin/dT + 0.01 qp/q (%), weighted
        by the heat flowing at each sample (the run's own temperatures and flows)."""
        rows = [s for s in self.samples if s["customer_kw"] > 1.0 and s["customer_flow_m3h"] > 0]
        assert rows, "no sample while the customer took heat"
        weight = sum(s["customer_kw"] for s in rows)
        e = 0.0
        for s in rows:
            dt_k = s["customer_supply_temp_c"] - s["customer_return_temp_c"]
            e += s["customer_kw"] * (
                2.0 + 4.0 * dt_min_k / dt_k + 0.01 * qp_m3h / s["customer_flow_m3h"]
            )
        return e / weight


def within_class(billed: float, true_kwh: float, mpe_pct: float) -> bool:
    return abs(billed - true_kwh) <= mpe_pct / 100.0 * true_kwh


async def ready(r: Rig) -> dict[str, Any]:
    await r.ctl.wait_event(lambda e: e.get("event") == "controller_started", 30.0, "start")
    return await until_status(
        r,
        lambda st: st["scan"]["count"] > 0 and (st.get("meter") or {}).get("meter_kwh") is not None,
        30.0,
        "a first scan with a meter reading",
    )


# ---- a simulated day, then kill -9 ----


class TestDay:
    async def test_a_days_bill_from_the_totaliser_is_the_heat_the_plant_delivered(
        self, day_rig: Rig
    ) -> None:
        r = day_rig
        await ready(r)
        async with bench(r) as b:
            s0 = await steady(r, b)
            await b.clear("customer_offline")
            t_s0 = (await b.truth("t_s"))["t_s"]
            day = Delivery()
            await day.run_until(b, lambda t: t["t_s"] >= t_s0 + 86400.0)
            s1 = await steady(r, b)
        st = await report(r, *whole_run(r))
        true_kwh = s1.delivered_kwh - s0.delivered_kwh
        billed = st["delivered_kwh"]
        mpe = day.mpe_pct(r.site.metering.meter_dt_min_k, r.site.plant.customer_design_flow_m3h)
        figures = (
            f"day: billed {billed:.2f} kWh, true {true_kwh:.2f} kWh, "
            f"difference {billed - true_kwh:+.3f} kWh ({(billed / true_kwh - 1) * 100:+.4f} %), "
            f"class 2 MPE {mpe:.2f} %"
        )
        print(figures)
        assert true_kwh > 500.0, figures  # a day of heat, not a test of nothing
        assert within_class(billed, true_kwh, mpe), figures
        # an exact meter: the bill is the plant's heat to the register's resolution
        assert abs(billed - true_kwh) <= RESOLUTION_KWH + 1e-6, figures
        assert abs(billed - (s1.meter_kwh - s0.meter_kwh)) <= RESOLUTION_KWH + 1e-6, figures
        assert st["unbilled_kwh"] == 0.0, figures
        rows = await intervals(r)
        assert sum(x["delivered_kwh"] for x in rows) == pytest.approx(billed, abs=1e-6)
        assert not {"meter_jump", "meter_replaced", "meter_rollover"} & {
            f for x in rows for f in x["flags"]
        }

    async def test_kill_9_loses_no_finished_interval_and_the_meter_bridges_the_gap(
        self, day_rig: Rig
    ) -> None:
        r = day_rig
        await ready(r)
        async with bench(r) as b:
            await b.clear("customer_offline")  # heat flows across the kill
            await until_status(
                r, lambda st: st["meter"]["totals"]["delivered_kwh"] > 0, 20.0, "billing"
            )
            deadline = time.monotonic() + 3 * INTERVAL_S
            while len([x for x in await intervals(r) if x["closed"]]) < 2:
                assert time.monotonic() < deadline, "two closed intervals"
                await asyncio.sleep(0.5)
            before = [x for x in await intervals(r) if x["closed"]]
            t_kill = time.time()
            r.ctl.kill9()
            # down until a whole interval has passed with no scan at all
            await asyncio.sleep(math.ceil(t_kill / INTERVAL_S + 1) * INTERVAL_S + 1.0 - time.time())
            t_restart = time.time()
            r.start_controller()
            await ready(r)
            after_restart = math.floor(t_restart / INTERVAL_S) * INTERVAL_S + INTERVAL_S
            deadline = time.monotonic() + 4 * INTERVAL_S
            while True:
                rows = await intervals(r)
                if any(x["closed"] and x["start_wall"] >= after_restart for x in rows):
                    break
                assert time.monotonic() < deadline, "an interval closed after the restart"
                await asyncio.sleep(0.5)
            await steady(r, b)  # the store stands still while it is read
        rows = await intervals(r)
        by_start = {x["start_wall"]: x for x in rows}
        for x in before:  # every interval closed before the kill, present and unchanged
            assert by_start.get(x["start_wall"]) == x, x["start_wall"]
        starts = sorted(by_start)
        assert starts == [starts[0] + i * INTERVAL_S for i in range(len(starts))], "a hole"
        down = [x for x in rows if x["start_wall"] >= t_kill and x["end_wall"] <= t_restart]
        assert down, "no interval lies wholly in the downtime"
        for x in down:
            assert x["closed"] and "gap" in x["flags"], x
            assert x["class_s"].get("available", 0.0) == 0.0, x
        st = await report(r, *whole_run(r))
        gone = [i for i in await interruptions(r) if "controller not running" in i["detail"]]
        assert gone, await interruptions(r)
        assert any(
            i["start_wall"] <= t_kill + 1.0 and i["end_wall"] is not None
            and i["end_wall"] >= t_restart - 1.0
            for i in gone
        ), gone  # fmt: skip
        # the totaliser bridges the gap: the bill over the whole run is its end minus its start
        first, last = rows[0], rows[-1]
        counted = last["meter_last_kwh"] - first["meter_first_kwh"]
        billed = sum(x["delivered_kwh"] for x in rows)
        print(f"kill -9: billed {billed:.2f} kWh over the run, meter counted {counted:.2f} kWh")
        assert billed == pytest.approx(counted, abs=1e-6)
        assert st["delivered_kwh"] == pytest.approx(billed, abs=1e-6)


# ---- a meter reading 1 % high: rollover, swap, interruptions ----


class TestSwap:
    async def test_the_bill_runs_on_across_the_rollover_and_reads_the_meters_error(
        self, swap_rig: Rig
    ) -> None:
        r = swap_rig
        await ready(r)
        async with bench(r) as b:
            s0 = await steady(r, b)
            assert s0.meter_kwh == pytest.approx(SWAP_START_KWH)
            await b.clear("customer_offline")
            run = Delivery()
            # through the rollover and on, until enough heat that 1 % is ten resolution steps
            await run.run_until(b, lambda t: t["delivered_kwh"] - s0.delivered_kwh >= 100.0)
            s1 = await steady(r, b)
        assert s1.meter_kwh < s0.meter_kwh  # it wrapped
        st = await report(r, *whole_run(r))
        billed, true_kwh = st["delivered_kwh"], s1.delivered_kwh - s0.delivered_kwh
        mpe = run.mpe_pct(r.site.metering.meter_dt_min_k, r.site.plant.customer_design_flow_m3h)
        figures = (
            f"meter +{ERROR_PCT} %: billed {billed:.2f} kWh, true {true_kwh:.2f} kWh "
            f"({(billed / true_kwh - 1) * 100:+.3f} %), class 2 MPE {mpe:.2f} %"
        )
        print(figures)
        # the bill continues across the wrap: the meter's count, end + rollover - start
        assert billed == pytest.approx(s1.meter_kwh + ROLLOVER_KWH - s0.meter_kwh, abs=0.11)
        # physics: the meter counts (1 + error) x the heat, and the bill is what it counts
        gain = 1.0 + ERROR_PCT / 100.0
        assert abs(billed - gain * true_kwh) <= RESOLUTION_KWH + 1e-6, figures
        assert within_class(billed, true_kwh, mpe), figures
        rows = await intervals(r)
        flagged = [x for x in rows if "meter_rollover" in x["flags"]]
        assert len(flagged) == 1, [x["flags"] for x in rows]
        assert flagged[0]["delivered_kwh"] > 0.0  # the wrapped step is billed
        assert st["unbilled_kwh"] == 0.0

    async def test_a_swapped_meter_is_flagged_not_billed_and_billing_goes_on_from_it(
        self, swap_rig: Rig
    ) -> None:
        r = swap_rig
        await ready(r)
        async with bench(r) as b:
            # the meter is swapped with the customer flow stopped (a technician isolates it)
            s0 = await steady(r, b)
            billed0 = (await report(r, *whole_run(r)))["delivered_kwh"]
            # the new meter shows half the old one's count: it went backwards, and by far more
            # than a rollover the meter could have counted in the seconds it stood still
            new_kwh = round(s0.meter_kwh / 2.0, 1)
            await b.inject("meter_replace", "", new_kwh)
            st = await until_status(
                r,
                lambda st: any(a["id"] == "METER:TOTALISER" for a in st["alarms"]),
                10.0,
                "METER:TOTALISER raised",
            )
            assert st["meter"]["meter_kwh"] == pytest.approx(new_kwh, abs=RESOLUTION_KWH)
            await b.clear("customer_offline")
            await Delivery().run_until(b, lambda t: t["delivered_kwh"] - s0.delivered_kwh >= 30.0)
            s1 = await steady(r, b)
        st = await report(r, *whole_run(r))
        rows = await intervals(r)
        swapped = [x for x in rows if "meter_replaced" in x["flags"]]
        assert len(swapped) == 1, [x["flags"] for x in rows]
        gain = 1.0 + ERROR_PCT / 100.0
        since_swap = s1.meter_kwh - new_kwh
        print(
            f"swap: billed {st['delivered_kwh'] - billed0:.2f} kWh after it, "
            f"the new meter counted {since_swap:.2f} kWh"
        )
        # nothing billed for the step from the old meter to the new one; the new one's count is
        assert st["delivered_kwh"] - billed0 == pytest.approx(since_swap, abs=0.11)
        assert since_swap == pytest.approx(gain * (s1.delivered_kwh - s0.delivered_kwh), abs=0.11)
        assert "meter_replaced" in json.dumps(st["meter_flags"])

    async def test_a_trip_a_customer_outage_and_maintenance_are_classed_as_they_happened(
        self, swap_rig: Rig
    ) -> None:
        r = swap_rig
        await ready(r)
        ctl = r.ctl
        site = r.site_path
        marks: dict[str, tuple[float, float]] = {}
        async with bench(r) as b:
            await b.clear("customer_offline")
            await until_status(r, lambda st: st["mode"] == "NORMAL_REUSE", 30.0, "reuse")
            t_from = time.time()

            # a leak in the reuse zone trips IL-04; dry again, an engineer resets it
            t = time.time()
            t_mono = time.monotonic()
            await b.inject("leak", "reuse", 1.0)
            await wait_mode_after(ctl, "LEAK_TRIP", t_mono, 10.0)
            await asyncio.sleep(2.0)
            await b.clear("leak", "reuse")
            await until_status(
                r,
                lambda st: (
                    st["inputs"]["leak_reuse"]["value"] is False
                    and st["inputs"]["leak_reuse"]["valid"]
                ),
                10.0,
                "a dry leak reading",
            )
            res = await asyncio.to_thread(cli, site, "reset", "IL-04", "--reason", "leak fixed")
            assert res.returncode == 0, res.stderr
            t_mono = time.monotonic()
            marks["trip"] = (t, await wait_mode_after(ctl, "NORMAL_REUSE", t_mono, 20.0))

            # the customer goes offline for a while
            t = time.time()
            t_mono = time.monotonic()
            await b.inject("customer_offline")
            await wait_mode_after(ctl, "CUSTOMER_OFFLINE", t_mono, 10.0)
            await asyncio.sleep(2.0)
            t_mono = time.monotonic()
            await b.clear("customer_offline")
            marks["customer_side"] = (t, await wait_mode_after(ctl, "NORMAL_REUSE", t_mono, 20.0))

            # a maintenance window, on and off by an engineer at the IPC
            t = time.time()
            t_mono = time.monotonic()
            res = await asyncio.to_thread(cli, site, "maintenance", "on", "--reason", "pump seal")
            assert res.returncode == 0, res.stderr
            await wait_mode_after(ctl, "MAINTENANCE", t_mono, 10.0)
            await asyncio.sleep(2.0)
            t_mono = time.monotonic()
            res = await asyncio.to_thread(cli, site, "maintenance", "off", "--reason", "done")
            assert res.returncode == 0, res.stderr
            marks["planned_maintenance"] = (
                t,
                await wait_mode_after(ctl, "NORMAL_REUSE", t_mono, 20.0),
            )
        await asyncio.sleep(1.0)  # the scan that ended the last one is committed
        # from the start of the interval the first cause fell in (intervals count by their start)
        st = await report(r, math.floor(t_from / INTERVAL_S - 1) * INTERVAL_S, time.time() + 60)
        rows = [i for i in st["interruptions"] if i["start_wall"] >= t_from - 1.0]
        shown = "\n".join(
            f"  {i['cls']:<20} {i['start_wall'] - t_from:7.2f} … "
            f"{(i['end_wall'] or math.nan) - t_from:7.2f} s  {i['detail']}"
            for i in rows
        )
        causes = "\n".join(
            f"  {k:<20} {a - t_from:7.2f} … {e - t_from:7.2f} s" for k, (a, e) in marks.items()
        )
        print(f"interruptions (s after the first cause):\n{shown}\ncaused:\n{causes}")
        named = [i for i in rows if i["cls"] in marks]
        assert [i["cls"] for i in named] == list(marks), f"{shown}\ncaused:\n{causes}"
        # each when it was caused, to a generous bound (the scan, the CLI, a busy machine)
        for i in named:
            caused, ended = marks[i["cls"]]
            assert caused - 1.0 <= i["start_wall"] <= caused + 5.0, f"{i}\n{causes}"
            assert i["end_wall"] is not None, i
            assert ended - 5.0 <= i["end_wall"] <= ended + 2.0, f"{i}\n{causes}"
        # availability is what the report's own time says: available / time the customer wanted
        t = st["time_s"]
        wanted = sum(t.get(c, 0.0) for c in ("available", "fault", "trip", "plc_link"))
        expect = 100.0 * t["available"] / (wanted + t.get("planned_maintenance", 0.0))
        assert st["availability_pct"] == pytest.approx(expect, abs=0.01)
        assert st["availability_excl_planned_pct"] == pytest.approx(
            100.0 * t["available"] / wanted, abs=0.01
        )
        assert t["trip"] > 0 and t["customer_side"] > 0 and t["planned_maintenance"] > 0
