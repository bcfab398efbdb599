"""The controller's side of commissioning against the simulated PLC, all real processes.

`heatloop sim serve` runs for the module; each test starts `heatloop run` on a state directory of
its own and talks to it over its command channel as the commissioning tool does
(`controller.channel.call`). The PLC is watched over Modbus, the journal read back read-only.
Times are generous bounds from the site's parameters (watchdog_s, hold-off), never measurements.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller import commission_record as cr
from controller.authority import max_heartbeat_hold_s
from controller.channel import call, socket_path
from tests.hil.conftest import ModbusProbe
from tests.hil.procs import (
    HOLDOFF_S,
    WATCHDOG_S,
    ControllerProc,
    command_rows,
    matches,
    poll_until,
    reach_reuse,
    read_outputs,
    status,
    wait_status,
)

pytestmark = pytest.mark.hil

ME = getpass.getuser()
SLACK_S = 1.0  # the brief's bound: safe values at the PLC within watchdog_s + 1 s


async def started(ctl: ControllerProc) -> None:
    await ctl.wait_event(lambda e: e.get("event") == "controller_started", 20.0, "start")
    await wait_status(ctl.site_path, lambda st: st["scan"]["count"] > 0, 10.0, "a first scan")


async def ask(state: Path, cmd: str, args: dict[str, Any], reason: str = "proof test") -> Any:
    return await asyncio.to_thread(call, socket_path(state), cmd, args, reason, 30.0)


def journal_events(state: Path, kind: str) -> list[dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(f"file:{state / 'heatloop.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT source, detail FROM events WHERE kind = ?", (kind,)).fetchall()
    finally:
        db.close()
    return [{"source": s, **json.loads(d)} for s, d in rows]


async def test_a_heartbeat_hold_trips_the_plc_watchdog_and_the_plc_is_released_after_it(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await started(ctl)
    await reach_reuse(ctl, probe)  # outputs far from the safe values: the trip is visible
    safe = {n: v for n, v in probe.site.safe_outputs().items() if n != "heartbeat"}
    outputs = tuple(safe)
    assert not matches(await read_outputs(probe, outputs), safe)
    trips = await probe.read("plc_watchdog_trips")

    seconds = WATCHDOG_S + HOLDOFF_S + 3.0
    t0 = time.monotonic()
    reply = await ask(state, "watchdog_test", {"seconds": seconds})
    assert reply["ok"] is True, reply
    until = reply["new"]["until_wall"]
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["heartbeat_hold_until_wall"] == until
    # the PLC sees a frozen heartbeat and falls back to every safe value
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped", *outputs)),
        lambda v: v["plc_watchdog_tripped"] is True and matches(v, safe),
        WATCHDOG_S + SLACK_S + (time.monotonic() - t0),
        "the PLC's safe values after a held heartbeat",
    )
    assert await probe.read("plc_watchdog_trips") == trips + 1
    # the hold ends by itself (nobody ends it), and the PLC is released: a steady heartbeat
    # for its hold-off and fresh commands after it
    await poll_until(
        lambda: probe.read("plc_watchdog_tripped"),
        lambda v: v is False,
        max(0.0, until - time.time()) + HOLDOFF_S + WATCHDOG_S + 10.0,
        "the PLC released after the hold",
    )
    assert time.time() >= until - 0.5, "released before the hold ended"
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["heartbeat_hold_until_wall"] is None and st["link"]["state"] == "ok"
    await ctl.wait_event(lambda e: e.get("event") == "heartbeat_resumed", 10.0, "resumed")

    rows = [r for r in command_rows(state) if r["cmd"] == "watchdog_test"]
    assert [(r["accepted"], r["principal"], r["role"]) for r in rows] == [(1, ME, "engineer")]
    assert json.loads(rows[0]["new"])["until_wall"] == until
    await wait_status(ctl.site_path, lambda s: True, 5.0, "status")
    assert [e["who"] for e in journal_events(state, "heartbeat_hold_expired")] == [ME]


async def test_a_hold_beyond_its_bound_or_by_a_non_engineer_is_refused(
    controllers: Callable[..., ControllerProc], probe: ModbusProbe, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await started(ctl)
    bound = max_heartbeat_hold_s(WATCHDOG_S)
    reply = await ask(state, "watchdog_test", {"seconds": bound + 1})
    assert reply["ok"] is False and f"{bound:g}" in reply["why"], reply
    for role in ("viewer", "operator"):
        other = tmp_path / f"state-{role}"
        c = controllers(other, roles={role: [ME]})
        await started(c)
        reply = await ask(other, "watchdog_test", {"seconds": 5})
        assert reply["ok"] is False and "engineer" in reply["why"], reply
        st = await asyncio.to_thread(status, c.site_path)
        assert st["heartbeat_hold_until_wall"] is None
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["heartbeat_hold_until_wall"] is None
    assert await probe.read("plc_watchdog_tripped") is False


def record(kib: int = 0) -> dict[str, Any]:
    """A record body about `kib` KiB long (as-found lines: strings are bounded, lists not)."""
    lines = ["x" * 1000] * kib
    return {
        "format": cr.FORMAT,
        "run_id": os.urandom(16).hex(),
        "purpose": "proof test",
        "target": "live",
        "site": {"name": "demo", "file": "/abs/site.toml", "sha256": "00" * 32},
        "software": {"version": "0.1.0", "python": "3.11"},
        "rule_table_sha256": "11" * 32,
        "engineer": "Alice",
        "started_wall": 1.0,
        "ended_wall": 2.0,
        "steps": [
            {
                "id": "WD",
                "kind": "watchdog",
                "method": "heartbeat_hold",
                "result": "passed",
                "failures": lines,
            }
        ],
        "outcome": "passed",
    }


async def test_a_large_record_is_filed_over_the_channel_and_its_proof_test_counted(
    controllers: Callable[..., ControllerProc], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ctl = controllers(state)
    await started(ctl)
    body = record(900)  # near the 1 MiB a record may have
    reply = await ask(state, "commission", {"record": body})
    assert reply["ok"] is True, reply["why"]
    sealed = reply["new"]
    assert sealed["seq"] == 1 and sealed["steps"] == body["steps"]
    assert cr.verify_record(sealed, sealed["public_key"]) == []
    st = await asyncio.to_thread(status, ctl.site_path)
    assert st["proof_tests"]["WD"]["last_passed_wall"] == sealed["filed_wall"]
    assert st["site_sha256"] == sealed["controller"]["site_sha256"]
    too_big = await ask(state, "commission", {"record": record(1100)})
    assert too_big["ok"] is False and str(cr.MAX_BYTES) in too_big["why"], too_big
    rows = [r for r in command_rows(state) if r["cmd"] == "commission"]
    assert (rows[0]["accepted"], rows[0]["target"]) == (1, body["run_id"])
