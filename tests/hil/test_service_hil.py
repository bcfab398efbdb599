"""`heatloop run` as systemd runs it: a real NOTIFY_SOCKET datagram socket standing in for
systemd, the `[metrics]` endpoint scraped over HTTP, and a `[metrics]` address already taken.

One `heatloop sim serve` and one controller process serve the READY / watchdog / scrape / stop
checks (the file's wall time stays well under its 40 s budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.modes import Mode
from plc_io.site import load_site
from tests.hil.conftest import free_port
from tests.hil.procs import ControllerProc, SimServer, write_site

pytestmark = pytest.mark.hil

WATCHDOG_USEC = 2_000_000  # pings every second at most: a few arrive within the test


class FakeSystemd:
    """NOTIFY_SOCKET: a bound AF_UNIX datagram socket, read as systemd would."""

    def __init__(self) -> None:
        # a short path: AF_UNIX addresses are limited to 108 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="hl-notify-", dir="/tmp"))
        self.address = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def read(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return [m for _, m in self.messages]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    async def wait(self, key: str, count: int, timeout_s: float) -> list[float]:
        """Until `count` messages carry `key`=1; their arrival times."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.read()
            times = [t for t, m in self.messages if m.get(key) == "1"]
            if len(times) >= count:
                return times
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} x {key}=1 not within {timeout_s} s: {self.read()}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def site_with_metrics(sim: SimServer, folder: Path, port: int) -> Path:
    path = write_site(folder, sim.ports, folder / "state")
    with path.open("a", encoding="utf-8") as f:
        f.write(f'\n[metrics]\nhost = "127.0.0.1"\nport = {port}\n')
    m = load_site(path).metrics
    assert m is not None and (m.host, m.port) == ("127.0.0.1", port)
    return path


@contextlib.contextmanager
def environment(**env: str) -> Iterator[None]:
    """`heatloop run` inherits these (as systemd sets them for the service)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def test_heatloop_run_notifies_systemd_pings_while_scanning_and_serves_metrics(
    sim: SimServer, tmp_path: Path
) -> None:
    systemd = FakeSystemd()
    port = free_port()
    site = site_with_metrics(sim, tmp_path / "ctl", port)
    with environment(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC=str(WATCHDOG_USEC)):
        ctl = ControllerProc(site, "controller")
    try:
        await systemd.wait("READY", 1, 20.0)
        first = next(m for _, m in systemd.messages if m.get("READY") == "1")
        # sent from a completed scan: it names the scan's mode and the PLC link
        assert first["STATUS"].startswith("mode ") and "PLC link" in first["STATUS"]
        assert first["STATUS"].split(";")[0].removeprefix("mode ") in {m.value for m in Mode}
        # watchdog pings keep coming while scans complete, never faster than WATCHDOG_USEC/2
        await systemd.wait("WATCHDOG", 3, 10.0)
        # at most one ping per WATCHDOG_USEC/2 since the process started (not one per scan: the
        # scans come four times a second); counted against a span the test measured, which can
        # only be longer than the controller's
        pings = len(await systemd.wait("WATCHDOG", 3, 0.0))
        assert pings <= (time.monotonic() - ctl.started_s) / (WATCHDOG_USEC / 2e6) + 1

        # the endpoint: parses with prometheus_client's parser and shows the controller's mode
        await ctl.wait_mode("NORMAL_REUSE", 15.0)
        s = await asyncio.to_thread(scrape, port)
        modes = {dict(k[1])["mode"]: v for k, v in s.items() if k[0] == "heatloop_mode"}
        assert set(modes) == {m.value for m in Mode}
        assert [m for m, v in modes.items() if v == 1.0] == [ctl.mode]
        assert s[("heatloop_scan_fresh", ())] == 1.0
        assert s[("heatloop_plc_link_up", ())] == 1.0
        assert s[("heatloop_scans_total", ())] > 0
        assert any(k[0] == "heatloop_heat_delivered_kwh_total" for k in s)

        # an orderly stop says STOPPING=1
        ctl.cleanup()
        assert ctl.proc.returncode == 0, ctl.tail()
        await systemd.wait("STOPPING", 1, 5.0)
    finally:
        ctl.cleanup()
        systemd.close()


async def test_a_metrics_port_already_taken_stops_the_start_with_exit_2_and_one_line(
    sim: SimServer, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        site = site_with_metrics(sim, tmp_path / "ctl", port)
        ctl = ControllerProc(site, "controller")
        try:
            code = await asyncio.to_thread(ctl.proc.wait, 30.0)
            ctl._reader.join(2.0)
        finally:
            ctl.cleanup()
    assert code == 2, ctl.tail()
    said = [line for line in ctl.lines if "[metrics]" in line]
    assert said == [f"heatloop: [metrics] 127.0.0.1:{port}: cannot listen: Address already in use"]
    assert not any("Traceback" in line for line in ctl.lines), ctl.tail()
    # it stopped before the first scan: no scan was logged, nothing was started
    assert not ctl.of("controller_started")
