"""systemd's notify protocol against a real AF_UNIX datagram socket standing in for systemd:
READY after the first completed scan, watchdog pings only while scans complete, WATCHDOG_PID
honoured, and a notifier that never raises or blocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.sdnotify import Notifier, attach, watchdog_floor_s
from plc_io.image import ProcessImage
from tests.unit.test_runtime import PERIOD_S, QUICK, FakeClock, Rig, Trace, TracedTransport


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound datagram socket, read without blocking."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="hl-sd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        address = str(short_dir / "notify")
    else:
        address = f"@heatloop-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    fake = FakeSystemd(address)
    try:
        yield fake
    finally:
        fake.close()


def env(sd: FakeSystemd, usec: int | None = 1_000_000, pid: int | None = None) -> dict[str, str]:
    e = {"NOTIFY_SOCKET": sd.address}
    if usec is not None:
        e["WATCHDOG_USEC"] = str(usec)
    if pid is not None:
        e["WATCHDOG_PID"] = str(pid)
    return e


def kinds(msgs: list[dict[str, str]], key: str) -> int:
    return sum(1 for m in msgs if m.get(key) == "1")


async def scan_reading(rig: Rig, sd: FakeSystemd, n: int) -> list[dict[str, str]]:
    """`n` scans, reading the socket after each as systemd does (a datagram socket's queue is
    short: net.unix.max_dgram_qlen, 10 by default)."""
    msgs: list[dict[str, str]] = []
    for _ in range(n):
        await rig.scans(1)
        msgs += sd.messages()
    return msgs


def test_from_env_is_none_without_a_notify_socket() -> None:
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}) is None
    n = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "junk"})
    assert n is not None and n.watchdog_s is None


async def test_ready_comes_after_the_first_completed_scan_and_not_before(
    systemd: FakeSystemd,
) -> None:
    rig = Rig(QUICK)
    n = Notifier.from_env(env(systemd))
    assert n is not None
    attach(rig.ctl, n)
    await rig.ctl.transport.connect()
    assert systemd.messages() == []  # connected, no scan yet: not ready
    await rig.scans(1)
    msgs = systemd.messages()
    assert kinds(msgs, "READY") == 1
    assert msgs[0]["STATUS"].startswith("mode ") and "PLC link ok" in msgs[0]["STATUS"]
    assert kinds(await scan_reading(rig, systemd, 40), "READY") == 0  # once only


async def test_watchdog_pings_while_scans_complete_at_half_the_watchdog_period(
    systemd: FakeSystemd,
) -> None:
    rig = Rig(QUICK)
    usec = 1_000_000
    n = Notifier.from_env(env(systemd, usec=usec))
    assert n is not None
    attach(rig.ctl, n)
    scans = 40
    msgs = await scan_reading(rig, systemd, scans)
    pings = kinds(msgs, "WATCHDOG")
    # one ping per usec/2 of scan time (the first with READY): from the parameters
    expected = scans * PERIOD_S / (usec / 2e6)
    assert expected - 1 <= pings <= expected + 1, pings
    # never more often than half the period: the scan is 4x faster than the pings
    assert pings < scans


class HangingTransport(TracedTransport):
    """The in-memory transport whose read never returns once `hang` is set."""

    hang = False

    async def read_inputs(self) -> ProcessImage:
        if self.hang:
            await asyncio.Event().wait()
        return await super().read_inputs()


async def test_a_hung_scan_stops_the_pings(systemd: FakeSystemd) -> None:
    clock = FakeClock()
    rig = Rig(QUICK, clock=clock)
    transport = HangingTransport(QUICK, rig.plc, Trace(), clock)
    rig.ctl.transport = transport
    n = Notifier.from_env(env(systemd, usec=1_000_000))
    assert n is not None
    attach(rig.ctl, n)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.ctl.run(stop))
    try:
        before: list[dict[str, str]] = []
        for _ in range(10):
            await clock.run_for(0.5)
            before += systemd.messages()
        assert kinds(before, "READY") == 1 and kinds(before, "WATCHDOG") >= 8
        transport.hang = True
        await clock.run_for(0.5)  # the scan in flight finishes; the next one hangs
        systemd.messages()
        scans = rig.ctl.status.scans
        after: list[dict[str, str]] = []
        for _ in range(30):
            await clock.run_for(1.0)
            after += systemd.messages()
        assert rig.ctl.status.scans == scans  # hung indeed
        assert kinds(after, "WATCHDOG") == 0
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watchdog_pid_of_another_process_means_no_pings(systemd: FakeSystemd) -> None:
    rig = Rig(QUICK)
    n = Notifier.from_env(env(systemd, pid=os.getpid() + 1))
    assert n is not None and n.watchdog_s is None
    attach(rig.ctl, n)
    msgs = await scan_reading(rig, systemd, 20)
    assert kinds(msgs, "READY") == 1 and kinds(msgs, "WATCHDOG") == 0


async def test_watchdog_pid_of_this_process_pings(systemd: FakeSystemd) -> None:
    rig = Rig(QUICK)
    n = Notifier.from_env(env(systemd, pid=os.getpid()))
    assert n is not None and n.watchdog_s == 1.0
    attach(rig.ctl, n)
    assert kinds(await scan_reading(rig, systemd, 8), "WATCHDOG") >= 3


def test_a_vanished_socket_returns_false_and_never_raises(short_dir: Path) -> None:
    path = str(short_dir / "gone")
    sd = FakeSystemd(path)
    n = Notifier(path)
    assert n.notify(READY="1") is True
    assert sd.messages() == [{"READY": "1"}]
    sd.close()
    os.unlink(path)
    assert n.notify(WATCHDOG="1") is False
    assert n.notify(STOPPING="1") is False
    assert n.failures == 2 and n.last_error
    assert Notifier("relative-name-nobody-bound").notify(READY="1") is False
    assert Notifier("@").notify(READY="1") is False


def test_a_full_queue_never_blocks_the_sender(short_dir: Path) -> None:
    """systemd not reading (hung, or slow): sends fail at once instead of blocking the scan."""
    path = str(short_dir / "full")
    sd = FakeSystemd(path)
    try:
        n = Notifier(path)
        results = [n.notify(STATUS="x" * 300) for _ in range(5000)]
        assert results[0] is True and results[-1] is False
        assert n.failures == results.count(False) > 0
    finally:
        sd.close()


def test_fields_stay_one_line_and_unknown_keys_are_dropped(short_dir: Path) -> None:
    path = str(short_dir / "lines")
    sd = FakeSystemd(path)
    try:
        n = Notifier(path)
        assert n.notify(STATUS="two\nlines", bad_key="x") is True
        assert sd.messages() == [{"STATUS": "two lines"}]
        assert n.notify(bad="x") is False  # nothing left to send
    finally:
        sd.close()


def test_a_systemd_watchdog_too_short_for_the_site_is_logged_at_attach(
    systemd: FakeSystemd,
) -> None:
    trace = Trace()
    rig = Rig(QUICK, trace=trace)
    floor = watchdog_floor_s(rig.ctl)
    p = QUICK.plc
    assert floor == max(2 * p.watchdog_s + p.watchdog_holdoff_s, 4 * QUICK.scan.period_s)
    n = Notifier.from_env(env(systemd, usec=int(floor * 1e6) - 1))
    assert n is not None
    attach(rig.ctl, n)
    assert [d["needed_s"] for d in trace.of("log", "systemd_watchdog_short")] == [floor]
    ok = Notifier.from_env(env(systemd, usec=10_000_000))  # the unit's WatchdogSec=10s
    assert ok is not None and ok.watchdog_s is not None and ok.watchdog_s >= floor
    attach(rig.ctl, ok)
    assert len(trace.of("log", "systemd_watchdog_short")) == 1
