"""`heatloop report` over a year of 15-minute intervals (target ≤ 2 s).

A real state store is written with the Journal: 35,040 closed intervals (a year of 15-minute
rows, every field metering.py writes), 300 interruptions, 2,000 events a statement reads
(trips, alarms, bypasses, forces, meter events) among 30,000 it does not (mode changes, point
validity) and 400 audited commands. Then `heatloop report` runs over the year as its own
process (interpreter start included, as an operator runs it) in each format, and once more with
`--plot`. Baseline in the same run: reading the same interval and interruption rows with a bare
SELECT and json.loads (the least any report must do); the ratio says what the statement costs
on top. Each figure is the median of 3 runs.

Run: `.venv/bin/python -m bench report`.
"""

from __future__ import annotations

import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from controller.journal import Journal, MeterWrite
from plc_io.site import demo_site_text

TARGET_S = 2.0
RUNS = 3
IV = 900.0
YEAR_FROM, YEAR_TO = "2026-01-01", "2026-12-31"
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
N_INTERVALS = 365 * 96
CLASSES = ("available", "planned_maintenance", "customer_side", "fault", "trip", "plc_link")


def _interval(rng: random.Random, start: float, meter: float) -> dict[str, object]:
    cls = dict.fromkeys(CLASSES, 0.0)
    if rng.random() < 0.02:
        cls[rng.choice(CLASSES[1:])] = 300.0
        cls["available"] = 600.0
    else:
        cls["available"] = 900.0
    kwh = rng.uniform(5.0, 12.0)
    return {
        "start_wall": start,
        "end_wall": start + IV,
        "closed": True,
        "covered_s": IV,
        "delivered_kwh": kwh,
        "unbilled_kwh": 0.0,
        "delivered_calc_kwh": kwh * rng.uniform(0.98, 1.02),
        "rejected_kwh": rng.uniform(30.0, 40.0),
        "it_energy_kwh": 50.0,
        "it_heat_kwh": 48.0,
        "stored_kwh": rng.uniform(-1.0, 1.0),
        "fan_kwh": rng.uniform(0.1, 2.0),
        "class_s": cls,
        "mode_s": {"NORMAL_REUSE": 700.0, "BUFFER_FULL": 200.0},
        "low_dt_s": 0.0,
        "flags": ["low_dt"] if rng.random() < 0.01 else [],
        "meter_first_kwh": meter,
        "meter_last_kwh": meter + kwh,
    }


def _store(db: Path) -> None:
    rng = random.Random(12)
    j = Journal(db)
    meter = 1000.0
    statement_kinds = ("trip_latched", "alarm_raised", "bypass_active", "force_expired")
    other_kinds = ("mode_changed", "point_invalid", "point_valid")
    for day in range(365):
        start = T0 + day * 86400.0
        ivs = []
        for k in range(96):
            iv = _interval(rng, start + k * IV, meter)
            meter = float(iv["meter_last_kwh"])  # type: ignore[arg-type]
            ivs.append(iv)
        irs = [
            {
                "id": day + 1,
                "cls": rng.choice(CLASSES[1:]),
                "start_wall": start + 3600.0,
                "end_wall": start + 3600.0 + rng.uniform(60.0, 7200.0),
                "detail": "customer not ready",
                "baseline_kw": 40.0,
                "delivered_during_kwh": 0.0,
                "lost_kwh": rng.uniform(1.0, 80.0),
            }
            for _ in range(1)
            if day % 6 < 5  # 300-odd interruptions
        ]
        rows = [
            (start + rng.uniform(0, 86400), rng.choice(statement_kinds), "IL-06", '{"who": "a"}')
            for _ in range(5 if day < 365 - 175 else 6)
        ] + [
            (start + rng.uniform(0, 86400), rng.choice(other_kinds), "tank_top_temp", "{}")
            for _ in range(82)
        ]
        cmds = [
            (start + 7200.0, f"f{day}", "alice", "engineer", "cli", "force", "drycooler_fan_cmd",
             "null", "100.0", "fan test", 1, "")
        ]  # fmt: skip
        if day % 10 == 0:
            cmds.append(
                (start + 9000.0, f"b{day}", "alice", "engineer", "cli", "bypass", "IL-06",
                 "null", "{}", "sensor swap", 1, "")
            )  # fmt: skip
        j.write(rows, frozenset(), commands=cmds, meter=MeterWrite(ivs, irs, {"day": day}))
    j.close()


def _baseline(db: Path) -> float:
    t0 = time.perf_counter()
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    n = 0
    for (text,) in con.execute("SELECT row FROM meter_intervals ORDER BY start_wall"):
        json.loads(text)
        n += 1
    for (text,) in con.execute("SELECT row FROM meter_interruptions ORDER BY id"):
        json.loads(text)
    con.close()
    assert n == N_INTERVALS, n
    return time.perf_counter() - t0


def _heatloop() -> list[str]:
    exe = Path(sys.executable).parent / "heatloop"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "controller.cli"]


def _report(site: Path, out: Path, fmt: str, *extra: str) -> float:
    cmd = [*_heatloop(), "report", "--site", str(site), "--from", YEAR_FROM, "--to", YEAR_TO]
    cmd += ["--format", fmt, "--out", str(out), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"heatloop report --format {fmt} exited {r.returncode}: {r.stderr}")
    return took


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        site = folder / "site.toml"
        site.write_text(demo_site_text())
        db = folder / "state" / "heatloop.db"
        t0 = time.perf_counter()
        _store(db)
        made_s = time.perf_counter() - t0
        con = sqlite3.connect(db)
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("meter_intervals", "meter_interruptions", "events", "commands")
        }
        con.close()
        base = statistics.median(_baseline(db) for _ in range(RUNS))
        lines = [
            f"a year of 15-minute intervals: {counts['meter_intervals']} intervals, "
            f"{counts['meter_interruptions']} interruptions, {counts['events']} events, "
            f"{counts['commands']} commands ({db.stat().st_size / 1e6:.1f} MB, written in "
            f"{made_s:.1f} s)",
            f"  baseline (bare SELECT + json.loads of the rows): {base * 1000:7.1f} ms",
        ]
        for fmt in ("md", "html", "csv", "json"):
            out = folder / f"statement.{fmt}"
            took = statistics.median(_report(site, out, fmt) for _ in range(RUNS))
            lines.append(
                f"  heatloop report --format {fmt:4s}  {took:6.2f} s (process, median of {RUNS}),"
                f" ratio to the 2 s target {took / TARGET_S:5.2f}, to the baseline "
                f"{took / base:5.1f}  ({out.stat().st_size / 1e3:.0f} kB)"
            )
        year = json.loads((folder / "statement.json").read_text())
        assert len(year["days"]) == 365 and year["intervals"] == N_INTERVALS
        png = folder / "statement.png"
        took = statistics.median(
            _report(site, folder / "s.md", "md", "--plot", str(png)) for _ in range(RUNS)
        )
        lines.append(
            f"  heatloop report --format md --plot  {took:6.2f} s (matplotlib import included), "
            f"ratio to the 2 s target {took / TARGET_S:5.2f}"
        )
        return lines


if __name__ == "__main__":
    print("\n".join(run()))
