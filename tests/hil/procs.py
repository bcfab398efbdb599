"""Real processes for the HIL tests: `heatloop sim serve` and `heatloop run` as the site runs
them, their site files, their logs, and a plain Modbus client and the simulated PLC's fault
interface to watch and disturb the plant.

The fixtures (`sim`, `controllers`, `faults`, `probe`) are in `tests/hil/conftest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
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
from asyncua import Client

from plc_io.site import Site, demo_site_text, load_site, set_key
from tests.hil.conftest import ModbusProbe, free_port

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


@dataclass(frozen=True)
class Ports:
    plc: int
    opcua: int
    bms: int


def write_site(
    folder: Path,
    ports: Ports,
    state_dir: Path,
    roles: dict[str, list[str]] | None = None,
    keys: tuple[tuple[str, str, Any], ...] = (),
    bms: bool = False,
) -> Path:
    """The demo site with free ports, a state dir of its own, a quick watchdog and dwell times;
    `roles` maps a role to its OS users (default: the user running the tests is engineer).
    `bms`: `heatloop run` starts its BMS server process (on 127.0.0.1:`ports.bms`); off by
    default, so a test that does not look at the BMS does not pay for an OPC UA server."""
    text = demo_site_text()
    if roles is None:
        roles = {"engineer": [getpass.getuser()]}
    for section, key, value in (
        *(("roles", r, users) for r, users in roles.items()),
        *keys,
        ("plc", "port", ports.plc),
        ("plc", "watchdog_s", WATCHDOG_S),
        ("plc", "watchdog_holdoff_s", HOLDOFF_S),
        ("sim", "opcua_port", ports.opcua),
        ("bms", "enabled", bms),
        ("bms", "host", "127.0.0.1"),
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
    assert site.bms.enabled is bms
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
    """`heatloop run` with its JSON log lines (stdout, and stderr merged in) parsed by a reader
    thread."""

    def __init__(self, site_path: Path, name: str, *extra: str) -> None:
        self.name = name
        self.site_path = site_path
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(
            heatloop("run", "--site", str(site_path), *extra),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
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


@contextlib.contextmanager
def serving(site_path: Path, ports: Ports) -> Iterator[SimServer]:
    """`heatloop sim serve` on `site_path` until the block ends."""
    folder = site_path.parent
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


def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    """`heatloop sim serve` for the whole module (each test leaves no fault behind)."""
    folder = tmp_path_factory.mktemp("hil-sim")
    ports = Ports(free_port(), free_port(), free_port())
    with serving(write_site(folder, ports, folder / "state"), ports) as sim:
        yield sim


def controller_starter(
    sim: SimServer, tmp_path: Path
) -> Iterator[Callable[[Path | None], ControllerProc]]:
    """Start `heatloop run` processes (on a state dir of the test's, or the one given)."""
    started: list[ControllerProc] = []

    def start(state_dir: Path | None = None, **site_kw: Any) -> ControllerProc:
        state = state_dir or tmp_path / "state"
        path = write_site(tmp_path / f"ctl{len(started)}", sim.ports, state, **site_kw)
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


async def sim_faults(sim: SimServer) -> AsyncIterator[SimFaults]:
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


async def modbus_probe(sim: SimServer) -> AsyncIterator[ModbusProbe]:
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


async def leak_trip(ctl: ControllerProc, probe: ModbusProbe, faults: SimFaults) -> None:
    """From reuse, a leak in the reuse zone: the controller in LEAK_TRIP within IL-04's time."""
    from interlocks.rules import RULES_BY_ID

    await reach_reuse(ctl, probe)
    await faults.inject("leak", "reuse", 1.0)
    await ctl.wait_mode("LEAK_TRIP", RULES_BY_ID["IL-04"].response_s + SCAN_S + 1.0)


def journal_latched(state_dir: Path) -> set[str]:
    db = sqlite3.connect(f"file:{state_dir / 'heatloop.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT rule_id FROM latches")}
    finally:
        db.close()


def cli(site_path: Path, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """One `heatloop <command> --site SITE …` as a person at the IPC runs it."""
    cmd, *rest = args
    return subprocess.run(
        heatloop(cmd, "--site", str(site_path), *rest),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def status(site_path: Path) -> dict[str, Any]:
    r = cli(site_path, "status", "--json")
    assert r.returncode == 0, f"status exited {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


async def wait_status(
    site: Path, pred: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, Any]:
    """`heatloop status --json` polled until `pred` holds (a generous bound, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = await asyncio.to_thread(status, site)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout_s} s; last status {st}")
        await asyncio.sleep(0.2)


def command_rows(state: Path) -> list[dict[str, Any]]:
    """The journal's command records, oldest first, read-only."""
    db = sqlite3.connect(f"file:{state / 'heatloop.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM commands ORDER BY id")]
    finally:
        db.close()
