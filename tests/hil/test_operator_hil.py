"""People acting on a running controller through the CLI (DESIGN §13), all real processes.

`heatloop sim serve` runs for the module; each test starts `heatloop run` on a state directory
of its own, whose site file maps the user running the tests to a role, and then does what an
operator or engineer at the IPC would do: `heatloop reset`, `bypass`, `force`, `ack`,
`status`, `journal`. The journal is read back from the state database the way an auditor would.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.hil.conftest import ModbusProbe
from tests.hil.procs import (
    ISOLATION,
    ControllerProc,
    SimFaults,
    cli,
    command_rows,
    leak_trip,
    matches,
    poll_until,
    read_outputs,
    status,
    wait_status,
)

pytestmark = pytest.mark.hil

ME = getpass.getuser()


async def run_cli(site: Path, *args: str) -> Any:
    return await asyncio.to_thread(cli, site, *args)


async def started(ctl: ControllerProc) -> None:
    """The controller answers on its socket."""
    await ctl.wait_event(lambda e: e.get("event") == "controller_started", 20.0, "start")
    await wait_status(ctl.site_path, lambda st: st["scan"]["count"] > 0, 10.0, "a first scan")


async def test_reset_is_refused_while_wet_and_accepted_once_dry_journalled_with_the_os_user(
    controllers: Callable[..., ControllerProc],
    faults: SimFaults,
    probe: ModbusProbe,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await leak_trip(ctl, probe, faults)

    wet = await run_cli(ctl.site_path, "reset", "--reason", "leak found and fixed")
    assert wet.returncode == 2, wet
    assert "IL-04" in wet.stderr and "cause still present" in wet.stderr
    assert matches(await read_outputs(probe, tuple(ISOLATION)), ISOLATION)

    await faults.clear("leak", "reuse")
    await poll_until(lambda: probe.read("leak_reuse"), lambda v: v is False, 2.0, "leak dry")
    await wait_status(
        ctl.site_path, lambda st: "INPUT:leak_reuse" not in st["invalid"], 5.0, "a dry reading"
    )
    dry = await run_cli(ctl.site_path, "reset", "IL-04", "--reason", "leak found and fixed")
    assert dry.returncode == 0, dry
    await ctl.wait_mode("DRY_COOLER_REJECT", 5.0)

    rows = [r for r in command_rows(state) if r["cmd"] == "reset"]
    assert [(r["accepted"], r["principal"], r["role"]) for r in rows] == [
        (0, ME, "engineer"),
        (1, ME, "engineer"),
    ]
    assert all(r["reason"] == "leak found and fixed" for r in rows)
    assert "cause still present" in rows[0]["why"]


async def test_a_user_the_site_does_not_name_is_refused(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    ctl = controllers(roles={"engineer": ["nobody-else"]})
    await ctl.wait_event(lambda e: e.get("event") == "controller_started", 20.0, "start")
    for args in (("status",), ("reject", "on", "--reason", "test")):
        r = await run_cli(ctl.site_path, *args)
        assert r.returncode == 2, r
        assert ME in r.stderr and "role" in r.stderr
    viewer = controllers(tmp_path / "state2", roles={"viewer": [ME]})
    await viewer.wait_event(lambda e: e.get("event") == "controller_started", 20.0, "start")
    assert (await run_cli(viewer.site_path, "status")).returncode == 0
    r = await run_cli(viewer.site_path, "reject", "on", "--reason", "test")
    assert r.returncode == 2 and "viewer" in r.stderr


async def test_no_controller_answering_exits_1(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    ctl = controllers()
    await started(ctl)
    ctl.kill9()
    r = await run_cli(ctl.site_path, "status")
    assert r.returncode == 1, r
    assert r.stderr.strip().count("\n") == 0  # one line


async def test_a_force_expires_on_time_also_across_a_kill9_of_the_controller(
    controllers: Callable[..., ControllerProc],
    probe: ModbusProbe,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await started(ctl)
    minutes = 0.25  # 15 s
    r = await run_cli(
        ctl.site_path,
        "force",
        "drycooler_fan_cmd",
        "63",
        "--minutes",
        str(minutes),
        "--reason",
        "fan test",
    )
    assert r.returncode == 0, r
    t_forced = time.time()
    await poll_until(
        lambda: probe.read("drycooler_fan_cmd"), lambda v: abs(v - 63) < 0.02, 3.0, "fans at 63"
    )
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["outputs"]["drycooler_fan_cmd"]["level"] == "manual"
    assert any(a["id"] == "FORCE:drycooler_fan_cmd" for a in st["alarms"])

    ctl.kill9()
    again = controllers(state)
    await started(again)
    st = await asyncio.to_thread(status, again.site_path)
    assert [f["tag"] for f in st["forces"]] == ["drycooler_fan_cmd"]  # survived the kill
    assert st["forces"][0]["until_wall"] == pytest.approx(t_forced + minutes * 60, abs=2.0)
    await again.wait_event(
        lambda e: e.get("event") == "force_expired", minutes * 60 + 10.0, "force_expired"
    )
    t_expired = time.time()
    # on time: not before the expiry (granted a moment before the CLI returned), and after it
    # within a few scans and the log line's way to us on a loaded machine
    assert t_forced + minutes * 60 - 1.0 <= t_expired <= t_forced + minutes * 60 + 10.0
    st = await asyncio.to_thread(status, again.site_path)
    assert st["forces"] == [] and st["outputs"]["drycooler_fan_cmd"]["level"] != "manual"


async def test_a_bypass_ends_on_time_and_a_non_bypassable_rule_is_refused(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    ctl = controllers()
    await started(ctl)
    r = await run_cli(ctl.site_path, "bypass", "IL-04", "--minutes", "5", "--reason", "x")
    assert r.returncode == 2 and "IL-04" in r.stderr
    r = await run_cli(ctl.site_path, "bypass", "IL-06", "--minutes", "600", "--reason", "x")
    assert r.returncode == 2, r  # beyond the 4 h maximum
    r = await run_cli(ctl.site_path, "bypass", "IL-06", "--minutes", "0.1", "--reason", "test")
    assert r.returncode == 0, r
    t0 = time.time()
    st = await wait_status(
        ctl.site_path, lambda s: s["interlocks"]["bypassed"], 3.0, "IL-06 bypassed"
    )
    assert st["interlocks"]["bypassed"][0]["rule"] == "IL-06"
    assert any(a["id"] == "BYPASS:IL-06" for a in st["alarms"])
    await ctl.wait_event(lambda e: e.get("event") == "bypass_expired", 15.0, "bypass_expired")
    assert time.time() - t0 >= 6.0 - 1.0
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["interlocks"]["bypassed"] == []


async def test_alarms_go_through_their_isa_states_under_cli_acknowledgement(
    controllers: Callable[..., ControllerProc], faults: SimFaults
) -> None:
    ctl = controllers()
    await started(ctl)
    alarm = "INPUT:tank_mid_temp"

    def state_of(st: dict[str, Any]) -> str:
        return next((a["state"] for a in st["alarms"] if a["id"] == alarm), "normal")

    await faults.inject("sensor_fail", "tank_mid_temp", 1.0)
    await wait_status(
        ctl.site_path, lambda s: state_of(s) == "unacknowledged", 10.0, "alarm raised"
    )
    r = await run_cli(ctl.site_path, "ack", alarm)
    assert r.returncode == 0, r
    await wait_status(ctl.site_path, lambda s: state_of(s) == "acknowledged", 3.0, "acked")
    await faults.clear("sensor_fail", "tank_mid_temp")
    await wait_status(ctl.site_path, lambda s: state_of(s) == "normal", 10.0, "cleared")

    await faults.inject("sensor_fail", "tank_mid_temp", 1.0)
    await wait_status(ctl.site_path, lambda s: state_of(s) == "unacknowledged", 10.0, "again")
    await faults.clear("sensor_fail", "tank_mid_temp")
    await wait_status(
        ctl.site_path, lambda s: state_of(s) == "returned_unacknowledged", 10.0, "returned"
    )
    r = await run_cli(ctl.site_path, "ack", "--all")
    assert r.returncode == 0, r
    await wait_status(ctl.site_path, lambda s: state_of(s) == "normal", 3.0, "acked → normal")
    r = await run_cli(ctl.site_path, "ack", "NO-SUCH-ALARM")
    assert r.returncode == 2 and "NO-SUCH-ALARM" in r.stderr


async def test_kill9_during_a_burst_of_commands_loses_no_acknowledged_command(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    """Every request the CLI was told was accepted is in the journal after a kill -9, and the
    last accepted setpoint and reject request are what the restarted controller holds."""
    state = tmp_path / "state"
    ctl = controllers(state)
    await started(ctl)
    rng = random.Random(9)
    accepted: list[tuple[str, str]] = []
    killed = asyncio.Event()

    async def killer() -> None:
        # at a random moment once the burst is under way (a loaded machine starts CLIs slowly)
        deadline = time.monotonic() + 60.0
        while len(accepted) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        ctl.kill9()
        killed.set()

    async def sender(n: int) -> None:
        i = 0
        while not killed.is_set():
            i += 1
            value = f"{25.0 + (n * 100 + i) % 10:g}"
            r = await run_cli(ctl.site_path, "setpoint", "supply_setpoint_c", value)
            if r.returncode == 0:
                accepted.append(("setpoint", value))

    kill = asyncio.create_task(killer())
    await asyncio.gather(*(sender(n) for n in range(3)))
    await kill
    assert accepted, "no command was accepted before the kill"

    rows = command_rows(state)
    journalled = [json.loads(r["new"]) for r in rows if r["cmd"] == "setpoint" and r["accepted"]]
    assert len(journalled) >= len(accepted)
    again = controllers(state)
    await started(again)
    st = await asyncio.to_thread(status, again.site_path)
    assert st["setpoints"]["supply_setpoint_c"] == pytest.approx(float(journalled[-1]))


async def test_a_corrupt_state_database_stops_start_up_and_reset_state_starts_anew(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "heatloop.db").write_bytes(b"this is not a database" * 100)
    ctl = controllers(state)
    ctl.proc.wait(30.0)
    assert ctl.proc.returncode == 2
    ctl._reader.join(2.0)
    text = "\n".join(ctl.lines)
    assert "heatloop.db" in text and "--reset-state" in text
    assert (state / "heatloop.db").read_bytes().startswith(b"this is not")  # kept, untouched

    anew = ControllerProc(ctl.site_path, "controller#anew", "--reset-state", "--reason", "disk")
    try:
        await started(anew)
        kept = list(state.glob("heatloop.db.*.bad"))
        assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not")
        r = await run_cli(ctl.site_path, "journal", "--kind", "state_reset")
        assert r.returncode == 0 and "disk" in r.stdout, r
    finally:
        anew.cleanup()
