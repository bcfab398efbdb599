"""`heatloop study --report`: the meter of a running controller on the simulated plant, its
statement held against the plant's ground truth, and the same statement as the state store's."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from controller import metering, statement
from controller.journal import Journal, MeterWrite, event_row
from controller.report import build_from_store
from controller.study import STUDY_EPOCH, ClosedLoop, write_statement
from plc_io.site import demo_site, demo_site_text, set_key
from sim.plant import accounts
from sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
SITE = demo_site()
LEAK = load_scenario(
    ROOT / "sim" / "scenarios" / "reuse_leak.toml"
)  # leak 1 h in, pool off at 2.5 h
H = 3600.0


def story() -> ClosedLoop:
    """Six hours: the scenario's leak trip (reset once dry), its customer outage, then a
    maintenance window from 4:30 to 5:00."""
    loop = ClosedLoop(SITE, scenario=LEAK, dt_s=10.0, metered=True)
    loop.run(1.75 * H)  # the leak (1:00-1:30) has tripped and dried
    loop.commands = replace(loop.commands, reset=True)
    loop.run(2.75 * H)  # the customer outage (2:30-3:30) and the way back
    loop.commands = replace(loop.commands, maintenance=True)
    loop.run(0.5 * H)
    loop.commands = replace(loop.commands, maintenance=False)
    loop.run(1.0 * H)
    return loop


def test_a_study_statement_bills_the_plants_delivered_heat_and_classes_each_interruption(
    tmp_path: Path,
) -> None:
    loop = story()
    paths = write_statement(loop, tmp_path, SITE)
    assert sorted(p.suffix for p in paths) == [".html", ".json", ".md"]
    st = json.loads((tmp_path / "statement.json").read_text(encoding="utf-8"))
    truth = accounts(loop.state).delivered_kwh
    # the simulated meter is exact; the bill misses only the first scan before its baseline and
    # the totaliser's resolution (heat_meter_energy is read as a float here)
    first_scan_kwh = SITE.plant.it_power_kw * loop.dt_s / 3600.0
    assert truth > 100.0 and abs(st["delivered_kwh"] - truth) <= first_scan_kwh
    classes = [i["cls"] for i in st["interruptions"] if i["cls"] != "fault"]
    assert classes == ["trip", "customer_side", "planned_maintenance"]
    by_cls = {i["cls"]: i for i in st["interruptions"]}
    leak_at = STUDY_EPOCH + loop.t0 + 1 * H
    assert abs(by_cls["trip"]["start_wall"] - leak_at) <= 60.0  # IL-04 acts within seconds
    maint = by_cls["planned_maintenance"]
    # the window, then the mode machine's dwells on the way back to reuse (still the window's)
    c = SITE.control
    back_s = max(c.reject_dwell_s, c.reuse_reentry_min_s, c.min_mode_dwell_s) + loop.dt_s
    assert 0.5 * H - loop.dt_s <= maint["duration_s"] <= 0.5 * H + back_s
    # availability: the contract's formula over the statement's own seconds, and the same on
    # perfect instruments (the ground truth: no sensor noise, no sensor fault)
    t = st["time_s"]
    wanted = sum(t[c] for c in ("available", "fault", "trip", "plc_link", "planned_maintenance"))
    assert st["availability_pct"] == metering.availability_pct(t)
    assert abs(st["availability_pct"] - 100.0 * t["available"] / wanted) < 1e-9
    assert loop.meter is not None
    ideal = metering.view(loop.meter.perfect)["availability_pct"]
    assert abs(st["availability_pct"] - ideal) < 0.5  # percentage points
    assert 30.0 < st["availability_pct"] < 95.0  # the trip and maintenance count against it


def test_the_study_statement_is_the_one_the_state_store_gives(tmp_path: Path) -> None:
    """The rows and events a study's meter makes, stored as a running controller stores them,
    give `heatloop report` the very statement the study wrote."""
    loop = ClosedLoop(SITE, scenario=LEAK, dt_s=30.0, metered=True)
    loop.run(4 * H)
    assert loop.meter is not None
    start, end = STUDY_EPOCH + loop.t0, loop.wall
    folder = tmp_path / "site"
    text = set_key(demo_site_text(), "state", "dir", str(tmp_path / "state"))
    folder.mkdir()
    (folder / "site.toml").write_text(text, encoding="utf-8")
    site = demo_site(folder).model_copy(
        update={"state": SITE.state.model_copy(update={"dir": str(tmp_path / "state")})}
    )
    j = Journal(site.state_dir / "heatloop.db")
    m = loop.meter
    j.write(
        [event_row(e, w) for e, w in m.events],
        frozenset(),
        meter=MeterWrite(tuple(m.intervals.values()), tuple(m.interruptions.values())),
    )
    j.close()
    stored = build_from_store(site, start, end)
    studied = m.statement(site, start, end)
    assert studied["source"] == "study" and stored["source"] == "controller"
    assert {**studied, "source": "controller"} == stored
    assert statement.to_markdown({**studied, "source": "controller"}) == statement.to_markdown(
        stored
    )


def test_heatloop_study_report_writes_the_statement(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", "study", "--site", str(ROOT / "plc_io" /
         "demo_site.toml"), "--days", "0.25", "--step", "30", "--report", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "statement.json").read_text(encoding="utf-8"))
    assert {"delivered_kwh", "availability_pct"} <= st.keys()
    line = next(x for x in r.stdout.splitlines() if "billed (totaliser)" in x)
    assert f"{st['delivered_kwh']:.1f}" in line
