"""`heatloop commission` end to end: real `heatloop sim serve` and `heatloop run` processes, the
tool as the engineer runs it, and the record it files.

One simulated plant and one controller serve the whole module (each test leaves the plant in
automatic control with no fault and no reject). Their site file is the test site of
tests/hil/procs.py (quick watchdog, short dwell times) with a quick reuse valve (`[plant]
valve_stroke_s`). The stuck-valve test runs last, on a controller of its own with a short
`valve_follow_s` (so a valve that does not move is found in seconds): a valve fault keeps the
controller out of reuse for `valve_retry_s`.

Every response the tool measures is over real Modbus; the judge compares it with the rule's
required time. The wall time of each test is printed (`-s`) for the CI budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from interlocks.rules import RULES
from tests.hil.conftest import ModbusProbe, free_port
from tests.hil.procs import (
    ROOT,
    ControllerProc,
    Ports,
    SimFaults,
    SimServer,
    cli,
    command_rows,
    heatloop,
    poll_until,
    read_outputs,
    serving,
    sim_faults,
    status,
    stop_process,
    wait_status,
    write_site,
)

pytestmark = [pytest.mark.hil, pytest.mark.timeout(300)]

VALVE_STROKE_S = 4.0  # the simulated reuse valve's full stroke
VALVE_FOLLOW_S = 8.0  # the valve test's bound for the valve to follow (the default is 120 s)
RUN_TIMEOUT_S = 280.0  # a whole run; a generous bound, not a timing


@dataclass
class Plant:
    sim: SimServer
    ctl: ControllerProc
    site_path: Path
    state: Path


def quick_valve_site(folder: Path, ports: Ports, *keys: tuple[str, str, Any]) -> Path:
    """The HIL test site with a quick reuse valve in the simulated plant."""
    path = write_site(folder, ports, folder / "state", keys=keys)
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace("[plant]\n", f"[plant]\nvalve_stroke_s = {VALVE_STROKE_S}\n", 1),
        encoding="utf-8",
    )
    return path


def start_controller(path: Path, name: str) -> ControllerProc:
    """`heatloop run` on `path`, answering status after its first scan."""
    ctl = ControllerProc(path, name)
    deadline = time.monotonic() + 30.0
    while True:
        r = cli(path, "status", "--json")
        if r.returncode == 0 and json.loads(r.stdout)["scan"]["count"] > 0:
            return ctl
        if ctl.proc.poll() is not None or time.monotonic() > deadline:
            ctl.cleanup()
            raise AssertionError(f"no controller status: {r.stderr}\n{ctl.tail()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    """The module's simulated plant on the commissioning test site (overrides conftest's)."""
    folder = tmp_path_factory.mktemp("commission")
    ports = Ports(free_port(), free_port(), free_port())
    with serving(quick_valve_site(folder, ports), ports) as server:
        yield server


@pytest.fixture(scope="module")
def plant(sim: SimServer) -> Iterator[Plant]:
    """`heatloop run` on the same site file, for the whole module."""
    path = sim.folder / "site.toml"
    p = Plant(sim, start_controller(path, "controller"), path, sim.site.state_dir)
    try:
        yield p
    finally:
        p.ctl.cleanup()  # the valve test may have replaced it


@pytest.fixture
async def faults(sim: SimServer) -> AsyncIterator[SimFaults]:
    async for f in sim_faults(sim):
        yield f


@pytest.fixture
async def probe(sim: SimServer) -> AsyncIterator[ModbusProbe]:
    async with ModbusProbe(sim.site, sim.ports.plc) as p:
        yield p


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    t = time.monotonic()
    yield
    print(f"\n[wall] {request.node.name}: {time.monotonic() - t:.1f} s")


async def commission(plant: Plant, report: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        heatloop("commission", "--site", str(plant.site_path), "--report", str(report), *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def record_of(report: Path) -> dict[str, Any]:
    """The newest sealed record the run wrote (the JSON next to its .md and .html)."""
    files = sorted(report.glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert files, f"no record in {report}: {list(report.iterdir())}"
    return json.loads(files[-1].read_text(encoding="utf-8"))


async def back_to_automatic(plant: Plant) -> None:
    """Reject off (the tool leaves it on after a failure), any latch reset, and reuse again, for
    the next test."""
    r = await asyncio.to_thread(cli, plant.site_path, "reject", "off", "--reason", "test done")
    assert r.returncode == 0, r.stderr
    latched = (await asyncio.to_thread(status, plant.site_path))["interlocks"]["latched"]
    if latched:
        await asyncio.to_thread(cli, plant.site_path, "reset", "--reason", "test done", *latched)
    await wait_status(
        plant.site_path,
        lambda st: st["mode"] == "NORMAL_REUSE" and not st["interlocks"]["latched"],
        30.0,
        "NORMAL_REUSE again",
    )


@pytest.fixture(autouse=True)
async def leave_the_plant_automatic(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After a test on the shared plant, even a failed one, the next starts from reuse."""
    yield
    if "plant" in request.fixturenames:
        with contextlib.suppress(Exception):
            await back_to_automatic(request.getfixturevalue("plant"))


def report_line(rec: dict[str, Any]) -> str:
    return ", ".join(f"{s['id']} {s['result']} {s.get('response_s')}" for s in rec["steps"])


async def test_a_sim_auto_run_passes_every_rule_and_the_watchdog_and_the_record_verifies(
    plant: Plant, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    t = time.monotonic()
    r = await commission(plant, report, "--sim", "--auto")
    wall = time.monotonic() - t
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    rec = record_of(report)
    print(f"\n[wall] full --sim --auto run: {wall:.1f} s; {report_line(rec)}")
    assert [s["id"] for s in rec["steps"]] == [x.id for x in RULES] + ["WD"]
    assert all(s["result"] == "passed" for s in rec["steps"]), report_line(rec)
    for s in rec["steps"]:  # measured, and within the rule's required time
        if s["kind"] == "rule" and s["id"] != "IL-08":
            assert s["response_s"] is not None and s["response_s"] <= s["required_s"], s
    assert rec["outcome"] == "passed" and rec["target"] == "sim" and rec["seq"] >= 1
    assert {p.suffix for p in report.iterdir() if not p.name.startswith(".")} >= {
        ".md",
        ".html",
        ".json",
    }
    v = await asyncio.to_thread(cli, plant.site_path, "commission", "verify")
    assert v.returncode == 0, f"{v.stdout}\n{v.stderr}"
    st = await asyncio.to_thread(status, plant.site_path)
    assert not st["forces"] and not st["reject_requested"] and not st["interlocks"]["latched"]


async def test_a_forced_input_is_journalled_and_released(plant: Plant, tmp_path: Path) -> None:
    report = tmp_path / "report"
    before = len(command_rows(plant.state))
    r = await commission(plant, report, "--method", "forced", "--auto", "--only", "IL-03")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    rec = record_of(report)
    (step,) = rec["steps"]
    assert (step["id"], step["method"], step["result"]) == ("IL-03", "forced", "passed")
    assert rec["target"] == "live"  # no --sim: it counts toward the proof-test schedule
    (used,) = rec["forces_used"]
    assert used["step"] == "IL-03" and used["cleared_wall"] >= used["set_wall"]
    rows = [x for x in command_rows(plant.state)[before:] if x["cmd"] == "force"]
    assert [x["accepted"] for x in rows] == [1, 1], rows
    assert rows[0]["target"] == used["tag"] and rec["run_id"] in rows[0]["reason"]
    assert json.loads(rows[1]["new"]) is None  # the release: nothing forced any more
    st = await asyncio.to_thread(status, plant.site_path)
    assert not st["forces"]


async def test_a_broken_plc_watchdog_fails_wd_and_leaves_the_plant_cooling(
    plant: Plant, faults: SimFaults, probe: ModbusProbe, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    await faults.inject("watchdog_broken", "", 1.0)
    try:
        r = await commission(plant, report, "--sim", "--auto", "--only", "WD")
        assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
        rec = record_of(report)
        (step,) = rec["steps"]
        assert (step["id"], step["result"]) == ("WD", "failed"), step
        assert rec["outcome"] == "failed"
        md = next(report.glob("*.md")).read_text(encoding="utf-8")
        assert "FAIL" in "\n".join(md.splitlines()[:6]).upper()  # said at the top
        assert "reject off" in rec["comments"]
        st = await asyncio.to_thread(status, plant.site_path)
        assert st["reject_requested"] is True and st["heartbeat_hold_until_wall"] is None
        await shut_at_plc(probe)
    finally:
        await faults.clear("watchdog_broken", "")
    await back_to_automatic(plant)


class Running:
    """`heatloop commission` in the background, its output read line by line."""

    def __init__(self, plant: Plant, report: Path, *args: str, typing: bool = False) -> None:
        self.report = report
        argv = ("--site", str(plant.site_path), "--report", str(report), *args)
        self.proc = subprocess.Popen(
            heatloop("commission", *argv),
            cwd=ROOT,
            stdin=subprocess.PIPE if typing else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.applied = threading.Event()  # the cause is applied: the step is under way
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        log = self.report.parent / "tool.log"  # kept for a failing test's reader
        with log.open("a", encoding="utf-8") as keep:
            for line in self.proc.stdout:
                self.lines.append(line)
                keep.write(line)
                keep.flush()
                if "applied:" in line:
                    self.applied.set()

    async def wait_applied(self) -> None:
        ok = await asyncio.to_thread(self.applied.wait, 60.0)
        assert ok, "".join(self.lines)

    async def seen(self, text: str, timeout_s: float = 60.0) -> None:
        """Wait until the tool has printed a line containing `text`."""
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None, f"exited before {text!r}:\n{self.out}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{self.out}"
            await asyncio.sleep(0.05)

    def type(self, line: str) -> None:
        """What the engineer types at the prompt."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    async def wait(self) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, RUN_TIMEOUT_S)
        finally:
            stop_process(self.proc)
            self._reader.join(2.0)

    @property
    def out(self) -> str:
        return "".join(self.lines)


async def shut_at_plc(probe: ModbusProbe) -> None:
    await poll_until(
        lambda: read_outputs(probe, ("reuse_valve_cmd", "secondary_pump_cmd")),
        lambda v: v["reuse_valve_cmd"] <= 0.011 and v["secondary_pump_cmd"] is False,
        10.0,
        "reuse circuit shut at the PLC",
    )


async def test_a_plc_link_lost_mid_step_fails_the_step_and_leaves_the_plant_in_reject(
    plant: Plant, faults: SimFaults, probe: ModbusProbe, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    run = Running(plant, report, "--sim", "--auto", "--only", "IL-04")
    await run.wait_applied()
    await faults.inject("comms_drop", "", 4.0)  # the PLC answers nobody for 4 s
    code = await run.wait()
    assert code == 2, run.out
    rec = record_of(report)
    (step,) = rec["steps"]
    assert step["result"] == "failed" and "PLC link lost" in " ".join(step["failures"]), step
    st = await wait_status(plant.site_path, lambda s: s["link"]["state"] == "ok", 20.0, "link")
    assert st["reject_requested"] is True
    assert "IL-04" not in st["interlocks"]["latched"]  # reset once the leak was gone
    await shut_at_plc(probe)
    await back_to_automatic(plant)


async def test_ctrl_c_mid_step_takes_the_cause_back_and_leaves_the_plant_in_reject(
    plant: Plant, probe: ModbusProbe, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    run = Running(plant, report, "--sim", "--auto", "--only", "IL-04")
    await run.wait_applied()
    run.proc.send_signal(signal.SIGINT)
    code = await run.wait()
    assert code == 2, run.out
    rec = record_of(report)
    (step,) = rec["steps"]
    assert (step["result"], rec["outcome"]) == ("aborted", "aborted"), step
    assert step["restored"] is True  # the leak fault was cleared
    st = await asyncio.to_thread(status, plant.site_path)
    assert st["reject_requested"] is True and "IL-04" not in st["interlocks"]["latched"]
    assert "heatloop reject off" in run.out
    await shut_at_plc(probe)
    await back_to_automatic(plant)


async def test_a_run_cut_short_resumes_without_repeating_its_finished_steps(
    plant: Plant, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    run = Running(plant, report, "--sim", "--auto", "--only", "IL-04,IL-07")
    await run.seen("── IL-07")
    await run.wait_applied()  # IL-04's cause: wait for IL-07's
    await run.seen("sim fault sensor_bias/customer_supply_temp")
    run.proc.send_signal(signal.SIGINT)
    assert await run.wait() == 2, run.out
    first = record_of(report)
    assert [s["result"] for s in first["steps"]] == ["passed", "aborted"]
    await back_to_automatic(plant)
    r = await commission(plant, report, "--sim", "--auto", "--resume")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "IL-04 already done" in r.stdout and "── IL-04" not in r.stdout
    again = record_of(report)
    assert again["run_id"] == first["run_id"] and again["seq"] == first["seq"] + 1
    assert again["steps"][0] == first["steps"][0]  # IL-04 as it was, not run again
    assert [s["result"] for s in again["steps"]] == ["passed", "passed"]
    r = await commission(plant, report, "--sim", "--auto", "--resume")
    assert r.returncode == 2 and "finished" in r.stderr and r.stderr.count("\n") == 1


async def test_a_bypassed_rule_fails_its_step_and_sign_off_needs_a_reason(
    plant: Plant, tmp_path: Path
) -> None:
    site = plant.site_path
    r = await asyncio.to_thread(cli, site, "bypass", "IL-06", "--minutes", "10", "--reason", "t")
    assert r.returncode == 0, r.stderr
    try:
        report = tmp_path / "report"
        why = "tank sensor replaced next week"
        r = await commission(
            plant, report, "--sim", "--auto", "--only", "IL-06,IL-07", "--bypass-reason", why
        )
        assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
        assert "IL-06" in r.stdout.split("── IL-06")[0]  # listed before the first step
        rec = record_of(report)
        il06, il07 = rec["steps"]
        assert il06["result"] == "failed" and "bypassed" in il06["failures"][0], il06
        assert il07["result"] == "passed", il07  # the run went on: nothing was applied
        assert [b["rule"] for b in rec["bypasses_at_start"]] == ["IL-06"]
        assert [b["rule"] for b in rec["bypasses_at_end"]] == ["IL-06"]
        assert rec["bypasses_removed"] == [] and rec["bypass_signoff_reason"] == why
        assert rec["signoff"]["engineer"] and rec["outcome"] == "failed"
        st = await asyncio.to_thread(status, site)
        assert st["reject_requested"] is False  # a bypass is no fault of the plant
    finally:
        r = await asyncio.to_thread(cli, site, "bypass", "IL-06", "--end")
        assert r.returncode == 0, r.stderr


async def test_a_physical_step_waits_for_the_engineer_and_is_signed_off_at_the_prompt(
    plant: Plant, faults: SimFaults, tmp_path: Path
) -> None:
    """The engineer's part is played by the test: the sim's leak stands in for a wetted rope."""
    report = tmp_path / "report"
    run = Running(plant, report, "--only", "IL-04", "--engineer", "Ada", typing=True)
    await run.seen("APPLY THE CAUSE NOW")
    await faults.inject("leak", "reuse", 1.0)
    await run.seen("RESTORE NOW")
    await faults.clear("leak", "reuse")
    await run.seen("sign off as Ada?")
    run.type("yes")
    code = await run.wait()
    assert code == 0, run.out
    rec = record_of(report)
    (step,) = rec["steps"]
    assert (step["method"], step["result"], rec["target"]) == ("physical", "passed", "live")
    assert step["reset"]["done"] is True and step["back_to_normal"] is True
    assert step["response_s"] is not None and step["response_s"] <= step["required_s"]
    assert rec["signoff"]["engineer"] == "Ada" and rec["outcome"] == "passed"


async def test_a_controller_killed_mid_step_fails_it_takes_the_fault_back_and_keeps_the_record(
    plant: Plant, probe: ModbusProbe, tmp_path: Path
) -> None:
    """Next to last: it kills the module's controller (the valve test starts its own)."""
    report = tmp_path / "report"
    run = Running(plant, report, "--sim", "--auto", "--only", "IL-04")
    await run.wait_applied()
    plant.ctl.kill9()
    code = await run.wait()
    assert code == 1, run.out  # nothing could be filed
    (path,) = report.glob("*-UNFILED.json")
    rec = json.loads(path.read_text(encoding="utf-8"))
    (step,) = rec["steps"]
    assert step["result"] == "failed" and "stopped answering" in step["failures"][0], step
    assert step["restored"] is True  # the leak was cleared through the simulator
    assert (report / path.name.replace(".json", ".md")).exists()
    assert "could NOT be filed" in run.out
    # the PLC's watchdog, not the dead controller, now holds the plant safe
    await poll_until(
        lambda: read_outputs(probe, ("plc_watchdog_tripped",)),
        lambda v: v["plc_watchdog_tripped"] is True,
        10.0,
        "the PLC watchdog's safe hold",
    )
    await shut_at_plc(probe)


async def test_a_stuck_reuse_valve_fails_il04_on_its_feedback(
    plant: Plant, faults: SimFaults, probe: ModbusProbe, tmp_path: Path
) -> None:
    """Last in the module: the valve fault keeps the controller out of reuse afterwards. A
    controller of its own, with a short `valve_follow_s`, so the tool's bound is seconds."""
    plant.ctl.cleanup()  # one controller on the PLC at a time
    path = quick_valve_site(
        tmp_path / "site", plant.sim.ports, ("control", "valve_follow_s", VALVE_FOLLOW_S)
    )
    plant.ctl = await asyncio.to_thread(start_controller, path, "controller-valve")
    plant.site_path, plant.state = path, tmp_path / "site" / "state"
    report = tmp_path / "report"
    # stuck well away from the bypass, so "≤ tolerance" cannot be met by where it already is
    await poll_until(lambda: probe.read("reuse_valve_pos"), lambda v: v > 30.0, 30.0, "valve open")
    await faults.inject("valve_stuck", "reuse_valve", 1.0)
    r = await commission(plant, report, "--sim", "--auto", "--only", "IL-04")
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
    rec = record_of(report)
    (step,) = rec["steps"]
    assert step["result"] == "failed", step
    bad = [f for f in step["feedback"] if not f["ok"]]
    assert [f["tag"] for f in bad] == ["reuse_valve_pos"], step
    assert all(e["ok"] for e in step["effects"]), step  # the command itself was right
    assert any("reuse_valve_pos" in f for f in step["failures"]), step["failures"]
