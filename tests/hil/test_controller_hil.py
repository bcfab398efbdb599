"""The controller as a real process against the simulated PLC as a real process (DESIGN §7, §10).

`heatloop sim serve` runs once for the module; each test starts its own `heatloop run` on its
own state directory (a site file per controller, same ports), reads the controller's JSON log
lines from stderr, watches the PLC with a plain Modbus client, and injects plant faults through
the simulated PLC's OPC UA `Sim` object. Every process is killed in a finalizer.

Figures (printed; run with -s to see them): leak reaction time, from the InjectFault call to
the isolation outputs at the PLC; watchdog time, from SIGKILL of the controller to the PLC's
safe state. Speed is for the figures; the assertions are orders of events and generous bounds
built from the site's parameters, so three Python processes on two busy cores still pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client

from controller.runtime import RESEND_EVERY_S
from interlocks.rules import RULES_BY_ID
from plc_io.site import Site, demo_site_text, load_site
from tests.hil.conftest import ModbusProbe, free_port

pytestmark = pytest.mark.hil

ROOT = Path(__file__).resolve().parents[2]
NS = "urn:heatloop:plc"

SCAN_S = 0.25  # [scan] period_s (demo default)
WATCHDOG_S = 1.5  # shorter than the demo's 3 s so the kill tests are quick
HOLDOFF_S = 0.5
STEP_S = 0.1  # [sim] step_s: the simulated PLC polls its watchdog at least this often
# Dwell times short enough that a fresh controller reaches NORMAL_REUSE about 1 s after start,
# so the isolation outputs are open (and the leak test measures a real change).
CONTROL = {
    "customer_ready_dwell_s": 0,
    "reject_dwell_s": 1,
    "min_mode_dwell_s": 1,
    "reuse_reentry_min_s": 0,
}
POLL_S = 0.01
# Headroom for bounds, not a measurement: the probe's poll, the OPC UA call, and three Python
# processes sharing two cores that someone else may keep busy. A controller that misses a
# response time by a whole second is still caught; the printed figures show the real slack.
ALLOWANCE_S = 1.0

ISOLATION = {
    "secondary_pump_cmd": False,
    "customer_isolation_cmd": False,
    "reuse_isolation_cmd": False,
    "reuse_valve_cmd": 0.0,
}
OPEN_IN_REUSE = ("secondary_pump_cmd", "reuse_isolation_cmd", "customer_isolation_cmd")


# ---- site files ----


def set_key(text: str, section: str, key: str, value: Any) -> str:
    """`text` with `key = value` replaced in `[section]` (the key must already be there)."""
    lines = text.splitlines(keepends=True)
    inside = False
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("["):
            inside = s == f"[{section}]"
            continue
        if inside and s.split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {json.dumps(value)}\n"
            return "".join(lines)
    raise KeyError(f"[{section}] {key} not in the demo site text")


@dataclass(frozen=True)
class Ports:
    plc: int
    opcua: int
    bms: int


def write_site(folder: Path, ports: Ports, state_dir: Path) -> Path:
    """The demo site with free ports, a state dir of its own, a quick watchdog and dwell times."""
    text = demo_site_text()
    for section, key, value in (
        ("plc", "port", ports.plc),
        ("plc", "watchdog_s", WATCHDOG_S),
        ("plc", "watchdog_holdoff_s", HOLDOFF_S),
        ("sim", "opcua_port", ports.opcua),
        ("bms", "port", ports.bms),
        ("state", "dir", str(state_dir)),
        *(("control", k, v) for k, v in CONTROL.items()),
    ):
        text = set_key(text, section, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(text, encoding="utf-8")
    site = load_site(path)  # the edits took: checked, not assumed
    assert (site.plc.port, site.sim.opcua_port, site.bms.port) == (
        ports.plc,
        ports.opcua,
        ports.bms,
    )
    assert site.state_dir == state_dir and site.plc.watchdog_s == WATCHDOG_S
    assert site.scan.period_s == SCAN_S and site.sim.step_s == STEP_S
    return path


# ---- processes ----


def heatloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *args]


def stop_process(p: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; always reaped."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5.0)


class ControllerProc:
    """`heatloop run` with its stderr JSON lines parsed by a reader thread."""

    def __init__(self, site_path: Path, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(
            heatloop("run", "--site", str(site_path)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, name=f"stderr-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    ev["_rx_s"] = time.monotonic()
                    self.events.append(ev)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == kind]

    @property
    def modes(self) -> list[tuple[str, str]]:
        return [(e["from"], e["source"]) for e in self.of("mode_changed")]

    @property
    def mode(self) -> str | None:
        m = self.modes
        return m[-1][1] if m else None

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.lines[-n:])

    async def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            events = list(self.events)
            for e in events[seen:]:
                if pred(e):
                    return e
            seen = len(events)
            if self.proc.poll() is not None:
                self._reader.join(1.0)
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout_s} s:\n{self.tail()}")
            await asyncio.sleep(0.02)

    async def wait_mode(self, mode: str, timeout_s: float) -> dict[str, Any]:
        return await self.wait_event(
            lambda e: e.get("event") == "mode_changed" and e.get("source") == mode,
            timeout_s,
            f"mode_changed to {mode}",
        )

    def kill9(self) -> float:
        """SIGKILL now; return the monotonic time the signal was sent."""
        t = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5.0)
        self._reader.join(2.0)
        return t

    def cleanup(self) -> None:
        stop_process(self.proc)
        self._reader.join(2.0)


@dataclass
class SimServer:
    proc: subprocess.Popen[bytes]
    ports: Ports
    folder: Path
    site: Site
    log_path: Path


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None:
            raise AssertionError(f"sim serve exited ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"port {port} not answering after {timeout_s} s:\n{log.read_text()}"
            )
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    """`heatloop sim serve` for the whole module (each test leaves no fault behind)."""
    folder = tmp_path_factory.mktemp("hil-sim")
    ports = Ports(free_port(), free_port(), free_port())
    site_path = write_site(folder, ports, folder / "state")
    log_path = folder / "sim.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            heatloop("sim", "serve", "--site", str(site_path)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port(ports.plc, proc, log_path, 30.0)
        wait_port(ports.opcua, proc, log_path, 30.0)
        yield SimServer(proc, ports, folder, load_site(site_path), log_path)
    finally:
        stop_process(proc)


@pytest.fixture
def controllers(
    sim: SimServer, tmp_path: Path
) -> Iterator[Callable[[Path | None], ControllerProc]]:
    """Start `heatloop run` processes (on a state dir of the test's, or the one given)."""
    started: list[ControllerProc] = []

    def start(state_dir: Path | None = None) -> ControllerProc:
        state = state_dir or tmp_path / "state"
        path = write_site(tmp_path / f"ctl{len(started)}", sim.ports, state)
        c = ControllerProc(path, f"controller#{len(started)}")
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.cleanup()


class SimFaults:
    """The simulated PLC's OPC UA `Sim` object."""

    def __init__(self, client: Client, ns: int, node: Any) -> None:
        self.client, self.ns, self.node = client, ns, node

    async def inject(self, name: str, target: str, value: float) -> None:
        await self.node.call_method(f"{self.ns}:InjectFault", name, target, float(value))

    async def clear(self, name: str, target: str) -> None:
        await self.node.call_method(f"{self.ns}:ClearFault", name, target)

    async def clear_all(self) -> None:
        await self.node.call_method(f"{self.ns}:ClearAllFaults")


@pytest_asyncio.fixture
async def faults(sim: SimServer) -> AsyncIterator[SimFaults]:
    """An OPC UA client on the sim's fault interface; every fault is cleared afterwards."""
    client = Client(f"opc.tcp://127.0.0.1:{sim.ports.opcua}/", timeout=4)
    await client.connect()
    try:
        ns = await client.get_namespace_index(NS)
        node = await client.nodes.objects.get_child([f"{ns}:Sim"])
        f = SimFaults(client, ns, node)
        try:
            yield f
        finally:
            await f.clear_all()
    finally:
        await client.disconnect()


@pytest_asyncio.fixture
async def probe(sim: SimServer) -> AsyncIterator[ModbusProbe]:
    async with ModbusProbe(sim.site, sim.ports.plc) as p:
        yield p


# ---- PLC views over Modbus ----


async def read_outputs(probe: ModbusProbe, names: Iterator[str] | tuple[str, ...]) -> dict:
    return {n: await probe.read(n) for n in names}


def matches(got: dict[str, Any], want: dict[str, Any]) -> bool:
    for name, v in want.items():
        g = got[name]
        if isinstance(v, bool):
            if g is not v:
                return False
        elif not math.isclose(float(g), float(v), abs_tol=0.011):  # 0.01 % register resolution
            return False
    return True


async def poll_until(
    fn: Callable[[], Any], pred: Callable[[Any], bool], timeout_s: float, what: str
) -> tuple[float, Any]:
    """Await `fn()` every POLL_S until `pred` holds; return (monotonic time, value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = await fn()
        t = time.monotonic()
        if pred(v):
            return t, v
        if t > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s; last {v!r}")
        await asyncio.sleep(POLL_S)


async def reach_reuse(ctl: ControllerProc, probe: ModbusProbe) -> None:
    """Controller in NORMAL_REUSE, the PLC watchdog released, the reuse circuit open."""
    await ctl.wait_mode("NORMAL_REUSE", 15.0)
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *OPEN_IN_REUSE)),
        lambda v: v["plc_watchdog_tripped"] is False and all(v[n] for n in OPEN_IN_REUSE),
        5.0,
        "reuse circuit open at the PLC",
    )


def journal_latched(state_dir: Path) -> set[str]:
    db = sqlite3.connect(f"file:{state_dir / 'heatloop.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT rule_id FROM latches")}
    finally:
        db.close()


# ---- tests ----


async def test_leak_via_opcua_reaches_leak_trip_and_isolates_within_response_time(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    sim: SimServer,
) -> None:
    rule = RULES_BY_ID["IL-04"]
    # the rule's response time, plus one scan (the fault may land just after a read) and one
    # PLC request timeout (a slow write still counts), plus headroom for a loaded machine
    budget_s = rule.response_s + SCAN_S + sim.site.plc.timeout_s + ALLOWANCE_S
    ctl = controllers()
    await reach_reuse(ctl, probe)

    t0 = time.monotonic()
    await faults.inject("leak", "reuse", 1.0)
    t_call = time.monotonic() - t0
    t_iso, _ = await poll_until(
        lambda: read_outputs(probe, tuple(ISOLATION)),
        lambda v: matches(v, ISOLATION),
        budget_s + 2.0,
        "isolation outputs at the PLC",
    )
    reaction_s = t_iso - t0
    ev = await ctl.wait_mode("LEAK_TRIP", budget_s)
    latched = await ctl.wait_event(
        lambda e: e.get("event") == "trip_latched", budget_s, "trip_latched"
    )
    print(
        f"\nleak reaction (InjectFault call -> isolation outputs read at the PLC): "
        f"{reaction_s * 1000:.0f} ms (OPC UA call {t_call * 1000:.0f} ms); budget "
        f"{budget_s * 1000:.0f} ms = response_s {rule.response_s:g} s + scan {SCAN_S:g} s "
        f"+ PLC timeout {sim.site.plc.timeout_s:g} s + headroom {ALLOWANCE_S:g} s"
    )
    assert reaction_s <= budget_s, f"{reaction_s:.3f} s > {budget_s:.3f} s"
    assert ev["from"] == "NORMAL_REUSE"
    assert latched["source"] == "IL-04"
    assert ctl.of("interlock_active") and ctl.of("interlock_active")[-1]["source"] == "IL-04"
    # primary pumps never stop for a reuse leak
    assert await probe.read("primary_pump_a_cmd") is True


async def test_kill9_leaves_plc_safe_within_watchdog_then_restart_resumes_in_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, sim: SimServer, tmp_path: Path
) -> None:
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    budget_s = WATCHDOG_S + STEP_S + ALLOWANCE_S
    # the last beat went out before the kill, so the watchdog needs at least watchdog_s minus
    # the time since that beat: more than half of it unless a scan stalled for watchdog_s / 2
    floor_s = WATCHDOG_S / 2
    ctl = controllers()
    await reach_reuse(ctl, probe)
    before = await read_outputs(probe, tuple(safe))
    assert not matches(before, safe), "outputs already safe: the test would prove nothing"

    t_kill = ctl.kill9()
    assert ctl.proc.returncode == -signal.SIGKILL
    t_safe, _ = await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *safe)),
        lambda v: v["plc_watchdog_tripped"] is True and matches(v, safe),
        budget_s + 2.0,
        "watchdog trip and safe outputs",
    )
    wd_s = t_safe - t_kill
    print(
        f"\nwatchdog (SIGKILL -> plc_watchdog_tripped and safe outputs at the PLC): "
        f"{wd_s * 1000:.0f} ms; bounds [{floor_s * 1000:.0f}, {budget_s * 1000:.0f}] ms = "
        f"watchdog_s {WATCHDOG_S:g} s / 2 .. + plant step {STEP_S:g} s + headroom "
        f"{ALLOWANCE_S:g} s"
    )
    assert floor_s <= wd_s <= budget_s
    await asyncio.sleep(2 * STEP_S)  # the hold holds
    assert matches(await read_outputs(probe, tuple(safe)), safe)

    again = controllers(tmp_path / "state")  # same journal, nothing latched
    await again.wait_event(lambda e: e.get("event") == "mode_changed", 15.0, "first mode")
    assert again.modes[0] == ("STARTUP", "DRY_COOLER_REJECT")
    assert not again.of("trip_restored")
    await reach_reuse(again, probe)  # the watchdog let go of the new controller
    assert again.modes[:2] == [
        ("STARTUP", "DRY_COOLER_REJECT"),
        ("DRY_COOLER_REJECT", "NORMAL_REUSE"),
    ]


async def test_latched_leak_trip_survives_kill9_and_needs_a_reset(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await reach_reuse(ctl, probe)
    await faults.inject("leak", "reuse", 1.0)
    await ctl.wait_mode("LEAK_TRIP", RULES_BY_ID["IL-04"].response_s + SCAN_S + 1.0)
    await ctl.wait_event(lambda e: e.get("event") == "trip_latched", 1.0, "trip_latched")
    # order, not time: by the time anyone is told, the PLC holds the isolation and the latch
    # is on disk (outputs first, then the journal, then the log)
    assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
    assert journal_latched(state) == {"IL-04"}

    ctl.kill9()
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"),
        lambda v: v is True,
        WATCHDOG_S + STEP_S + 1.0,
        "watchdog trip",
    )

    again = controllers(state)
    restored = await again.wait_event(
        lambda e: e.get("event") == "trip_restored", 15.0, "trip_restored"
    )
    assert restored["latched"] == ["IL-04"]
    await again.wait_mode("LEAK_TRIP", 5.0)
    assert again.modes[0] == ("STARTUP", "LEAK_TRIP")  # never through DRY_COOLER_REJECT
    # the new controller holds the PLC (watchdog released) with the reuse circuit isolated
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *ISOLATION)),
        lambda v: v["plc_watchdog_tripped"] is False and matches(v, ISOLATION),
        5.0,
        "controller in charge, reuse isolated",
    )

    await faults.clear("leak", "reuse")
    await poll_until(lambda: probe.read("leak_reuse"), lambda v: v is False, 2.0, "leak_reuse dry")
    t_dry = time.monotonic()
    while time.monotonic() - t_dry < 3.0:  # dry, but nobody reset it: still tripped
        assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
        await asyncio.sleep(0.25)
    assert again.mode == "LEAK_TRIP" and again.modes == [("STARTUP", "LEAK_TRIP")]
    assert not again.of("trip_reset")
    assert journal_latched(state) == {"IL-04"}
    assert again.proc.poll() is None


async def test_orderly_stop_and_plain_restart_resumes_in_dry_cooler_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, sim: SimServer, tmp_path: Path
) -> None:
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    ctl = controllers()
    await reach_reuse(ctl, probe)
    ctl.proc.send_signal(signal.SIGTERM)
    assert ctl.proc.wait(5.0) == 0
    ctl._reader.join(2.0)
    assert ctl.of("controller_stopped")
    # the farewell write put the safe values at the PLC before any watchdog could act
    assert matches(await read_outputs(probe, tuple(safe)), safe)

    again = controllers(tmp_path / "state")
    await again.wait_event(lambda e: e.get("event") == "mode_changed", 15.0, "first mode")
    assert again.modes[0] == ("STARTUP", "DRY_COOLER_REJECT")
    assert not again.of("trip_restored")
    assert journal_latched(tmp_path / "state") == set()


async def test_a_journal_that_cannot_open_leaves_the_controller_in_charge_in_reject(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, tmp_path: Path
) -> None:
    """The journal's path is a directory: no crash loop. The controller starts degraded (an
    alarm, reuse rejected because latched trips are unknown) and keeps the PLC under its
    control: the watchdog is released and the isolation stays closed."""
    state = tmp_path / "state"
    (state / "heatloop.db").mkdir(parents=True)
    ctl = controllers(state)
    await ctl.wait_event(
        lambda e: e.get("event") == "journal_unreadable", 15.0, "journal_unreadable"
    )
    await ctl.wait_mode("DRY_COOLER_REJECT", 15.0)
    await ctl.wait_event(lambda e: e.get("event") == "degraded", 5.0, "degraded alarm")
    # a healthy controller reaches reuse about a second after start (CONTROL above); this one
    # must not, for several times that
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"), lambda v: v is False, 5.0, "watchdog released"
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 * max(CONTROL.values()):
        assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)
        await asyncio.sleep(0.25)
    assert ctl.mode == "DRY_COOLER_REJECT" and ctl.proc.poll() is None


async def test_refused_writes_withhold_the_heartbeat_and_are_reported_once_until_they_clear(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    sim: SimServer,
) -> None:
    """The PLC refuses every coil write (a write-protected output card). The controller sends
    no heartbeat with commands that did not arrive, so the PLC watchdog takes the plant to its
    safe values; the controller keeps running, reports the failure once per cause (not every
    scan), leaves reuse, and takes the PLC back when the writes are accepted again."""
    safe = {t.name: t.safe for t in sim.site.outputs if t.name != "heartbeat"}
    ctl = controllers()
    await reach_reuse(ctl, probe)
    await faults.inject("write_refused", "coil", 4.0)
    # unchanged coils are re-sent at least every RESEND_EVERY_S, so the refusal shows by then
    failed = await ctl.wait_event(
        lambda e: e.get("event") == "write_failed", RESEND_EVERY_S + 5.0, "write_failed"
    )
    assert str(failed["failed"].get("heartbeat", "")).startswith("withheld:"), failed
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *safe)),
        lambda v: v["plc_watchdog_tripped"] is True and matches(v, safe),
        WATCHDOG_S + STEP_S + 5.0,
        "the PLC watchdog's safe state",
    )
    await ctl.wait_mode("DRY_COOLER_REJECT", 5.0)
    await asyncio.sleep(10 * SCAN_S)  # ten more scans of refused writes
    assert ctl.proc.poll() is None
    # once per cause: a handful of lines (the set changes as the mode changes), not one a scan
    assert len(ctl.of("write_failed")) <= 4, ctl.of("write_failed")

    await faults.clear("write_refused", "")  # PLC comms faults clear without a target
    await ctl.wait_event(lambda e: e.get("event") == "write_recovered", 10.0, "write_recovered")
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"),
        lambda v: v is False,
        HOLDOFF_S + WATCHDOG_S + 5.0,
        "the controller back in charge",
    )
