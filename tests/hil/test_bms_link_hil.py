"""The BMS server process under `heatloop run`, all real processes (DESIGN §9, issue item 6).

`heatloop sim serve` runs for the module; each test starts `heatloop run` with the BMS server
enabled on a free port and then breaks the server process as a hostile client or a bug could:
SIGKILL (it dies), SIGSTOP (it stalls and reads nothing). Each time the controller restarts it
with back-off and keeps scanning: the scan count goes on rising and no overrun is caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.bms_link import ALIVE_TIMEOUT_S
from tests.hil.procs import ControllerProc, status, wait_status

pytestmark = pytest.mark.hil

# generous: a child imports asyncua and may create its certificate on a loaded two-core machine
START_S = 90.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def reap(pid: int) -> None:
    """Leave no stopped child behind if a test fails half-way."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


async def started(ctl: ControllerProc) -> None:
    await ctl.wait_event(lambda e: e.get("event") == "controller_started", 30.0, "start")


async def running_bms(ctl: ControllerProc) -> dict[str, Any]:
    await started(ctl)
    st = await wait_status(
        ctl.site_path,
        lambda s: s["bms"]["state"] == "running" and s["bms"]["pid"] is not None,
        START_S,
        "the BMS server running",
    )
    assert st["bms"]["endpoint"].startswith("opc.tcp://127.0.0.1:")
    return st


async def restarted(ctl: ControllerProc, old_pid: int) -> dict[str, Any]:
    return await wait_status(
        ctl.site_path,
        lambda s: s["bms"]["state"] == "running" and s["bms"]["pid"] not in (None, old_pid),
        START_S,
        "a new BMS server running",
    )


async def test_a_killed_bms_server_is_restarted_and_the_scan_goes_on(
    controllers: Callable[..., ControllerProc],
) -> None:
    ctl = controllers(bms=True)
    st = await running_bms(ctl)
    pid = st["bms"]["pid"]
    try:
        scans, overruns = st["scan"]["count"], st["scan"]["overruns"]
        os.kill(pid, signal.SIGKILL)
        st = await restarted(ctl, pid)
        assert not alive(pid)
        assert st["bms"]["restarts"] >= 1 and st["bms"]["last_error"]
        assert st["scan"]["count"] > scans
        assert st["scan"]["overruns"] == overruns, "the BMS server's death cost a scan"
        exited = ctl.of("bms_exited")
        assert exited and exited[0]["pid"] == pid and exited[0]["code"] == -signal.SIGKILL
        assert ctl.of("bms_restarting") and len(ctl.of("bms_started")) >= 2
    finally:
        reap(pid)


async def test_a_stalled_bms_server_is_killed_after_the_alive_timeout_and_scans_go_on(
    controllers: Callable[..., ControllerProc],
) -> None:
    ctl = controllers(bms=True)
    st = await running_bms(ctl)
    pid = st["bms"]["pid"]
    try:
        overruns = st["scan"]["overruns"]
        os.kill(pid, signal.SIGSTOP)  # it reads nothing and says nothing from now on
        stopped_at = time.monotonic()
        # while it is stopped the controller scans on, and its snapshots do not pile up
        seen = [st["scan"]["count"]]
        while time.monotonic() - stopped_at < ALIVE_TIMEOUT_S / 2:
            seen.append((await asyncio.to_thread(status, ctl.site_path))["scan"]["count"])
        assert seen[-1] > seen[0], seen
        st = await restarted(ctl, pid)
        assert time.monotonic() - stopped_at >= ALIVE_TIMEOUT_S  # not before its time
        assert "no alive" in st["bms"]["last_error"]
        assert not alive(pid)  # SIGKILL ends a stopped process too
        assert st["scan"]["overruns"] == overruns, [
            (e["event"], e.get("timestamp"), e.get("late_s"), e.get("why"), e.get("lag_s"))
            for e in ctl.events
            if e.get("event") in ("scan_overrun", "event_loop_lag", "bms_exited", "bms_started")
        ]
    finally:
        reap(pid)


async def test_a_bms_port_in_use_is_the_servers_failure_never_the_controllers(
    controllers: Callable[..., ControllerProc], sim: Any
) -> None:
    with socket.socket() as squatter:  # someone else holds the BMS port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", sim.ports.bms))
        squatter.listen()
        ctl = controllers(bms=True)
        await started(ctl)
        st = await wait_status(
            ctl.site_path,
            lambda s: s["bms"]["restarts"] >= 1 and s["scan"]["count"] > 8,
            START_S,
            "a failed BMS server restarted while the controller scans",
        )
        assert st["bms"]["state"] != "running" and st["bms"]["last_error"]
        assert ctl.proc.poll() is None  # the controller did not exit (the plant matters more)
        assert not ctl.of("scan_overrun")
    # the port is free again: the next attempt serves
    st = await running_bms(ctl)
    assert st["bms"]["restarts"] >= 1


async def test_a_killed_controller_leaves_no_bms_server_behind_and_a_restart_serves_again(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    ctl = controllers(bms=True)
    st = await running_bms(ctl)
    pid = st["bms"]["pid"]
    try:
        ctl.kill9()
        # the server process sees end of file on its channel and exits: the port is free
        deadline = time.monotonic() + 30.0
        while alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not alive(pid), "the BMS server outlived its controller"
        again = controllers(tmp_path / "state", bms=True)
        st = await running_bms(again)
        assert st["bms"]["pid"] != pid and st["bms"]["restarts"] == 0
    finally:
        reap(pid)


async def test_with_the_bms_off_no_server_process_is_started(
    controllers: Callable[..., ControllerProc],
) -> None:
    ctl = controllers()  # the HIL default: bms off
    await started(ctl)
    st = await wait_status(
        ctl.site_path, lambda s: s["scan"]["count"] > 4, 30.0, "the controller scanning"
    )
    assert st["bms"]["state"] == "off" and st["bms"]["pid"] is None
    assert not ctl.of("bms_started")
