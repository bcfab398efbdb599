"""Statements are sums of the rows, clipped to the range; every renderer says plainly when there
is no data; HTML escapes every text; CSV reads back; JSON carries the contract figures; a
study's in-memory events make the same statement as the store's rows."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from controller import statement
from controller.journal import Journal, MeterWrite, event_row, read_meter
from interlocks.engine import Event

T0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z
DAY = 86400.0
IV = 900.0
CLASSES = ("available", "planned_maintenance", "customer_side", "fault", "trip", "plc_link")


def avail(cs: dict[str, float]) -> float:
    """The contract formula, written out here independently of controller.metering."""
    den = sum(cs[c] for c in ("available", "fault", "trip", "plc_link", "planned_maintenance"))
    return 100.0 * cs["available"] / den


def row(start: float, i: int, **over: Any) -> dict[str, Any]:
    """An interval whose figures vary with i, so sums over the wrong rows would not match."""
    cls = dict.fromkeys(CLASSES, 0.0)
    cls["available"] = 900.0 - (i % 3) * 100
    cls["trip"] = (i % 3) * 60
    cls["planned_maintenance"] = (i % 3) * 40
    r = {
        "start_wall": start,
        "end_wall": start + IV,
        "closed": True,
        "covered_s": 900.0,
        "delivered_kwh": 10.0 + i * 0.25,
        "unbilled_kwh": 0.5 if i == 5 else 0.0,
        "delivered_calc_kwh": 10.2 + i * 0.25,
        "rejected_kwh": 30.0 + i,
        "it_energy_kwh": 50.0,
        "it_heat_kwh": 45.0,
        "stored_kwh": (-1.0) ** i,
        "fan_kwh": 0.7,
        "class_s": cls,
        "mode_s": {"NORMAL_REUSE": 600.0, "DRY_COOLER_REJECT": 300.0},
        "low_dt_s": 0.0,
        "flags": ["meter_jump"] if i == 5 else [],
        "meter_first_kwh": 1000.0 + i,
        "meter_last_kwh": 1001.0 + i,
    }
    r.update(over)
    return r


def rows(first: float, n: int) -> list[dict[str, Any]]:
    return [row(first + k * IV, k) for k in range(n)]


def build(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "site": "Pool hall",
        "intervals": [],
        "interruptions": [],
        "events": [],
        "commands": [],
        "from_wall": T0,
        "to_wall": T0 + 2 * DAY,
        "interval_s": 900,
        "source": "controller",
    }
    args.update(kw)
    return statement.build(**args)


def test_figures_are_sums_of_the_rows_in_the_range_by_start() -> None:
    inside = rows(T0, 2 * 96)  # two whole days
    before = [row(T0 - IV, 99, delivered_kwh=1e6)]  # ends inside the range, starts before
    after = [row(T0 + 2 * DAY, 98, delivered_kwh=1e6)]  # starts at the excluded end
    st = build(intervals=before + inside + after)
    assert st["intervals"] == len(inside) and not st["empty"]
    for key in statement.ENERGY_KEYS:
        assert st[key] == pytest.approx(sum(r[key] for r in inside)), key
    cs = {c: sum(r["class_s"][c] for r in inside) for c in CLASSES}
    assert st["time_s"] == pytest.approx(cs)
    assert st["availability_pct"] == pytest.approx(avail(cs))
    without_planned = cs["available"] / (cs["available"] + cs["trip"]) * 100
    assert st["availability_excl_planned_pct"] == pytest.approx(without_planned)
    delivered = sum(r["delivered_kwh"] for r in inside)
    assert st["reuse_fraction_pct"] == pytest.approx(100 * delivered / (50.0 * len(inside)))
    assert st["coverage_pct"] == pytest.approx(100.0)
    assert st["mode_share_pct"] == pytest.approx(
        {"NORMAL_REUSE": 200 / 3, "DRY_COOLER_REJECT": 100 / 3}
    )
    # per UTC day: the first 96 rows, then the next 96
    assert [d["date"] for d in st["days"]] == ["2026-12-01", "2026-12-02"]
    for d, part in zip(st["days"], (inside[:96], inside[96:]), strict=True):
        assert d["delivered_kwh"] == pytest.approx(sum(r["delivered_kwh"] for r in part))
        dcs = {c: sum(r["class_s"][c] for r in part) for c in CLASSES}
        assert d["availability_pct"] == pytest.approx(avail(dcs))
    assert st["meter_flag_counts"] == {"meter_jump": 1}
    assert st["days"][0]["flags"] == ["meter_jump"]


def test_an_interruption_crossing_the_range_edges_is_clipped() -> None:
    ivs = rows(T0, 96)
    irs = [
        # 600 s before the start, 600 s inside: half its duration and energy count
        {"id": 1, "cls": "trip", "start_wall": T0 - 600, "end_wall": T0 + 600,
         "detail": "IL-04 latched", "baseline_kw": 36.0, "lost_kwh": 12.0},
        # wholly inside
        {"id": 2, "cls": "customer_side", "start_wall": T0 + 3600, "end_wall": T0 + 5400,
         "detail": "customer not ready", "baseline_kw": 36.0, "lost_kwh": 18.0},
        # ends before the range
        {"id": 3, "cls": "fault", "start_wall": T0 - 7200, "end_wall": T0 - 3600,
         "detail": "x", "baseline_kw": 1.0, "lost_kwh": 1.0},
        # 900 s inside, 2700 s after the end
        {"id": 4, "cls": "planned_maintenance", "start_wall": T0 + DAY - 900,
         "end_wall": T0 + DAY + 2700, "detail": "maintenance by alice", "baseline_kw": 10.0,
         "lost_kwh": 8.0},
    ]  # fmt: skip
    st = build(intervals=ivs, interruptions=irs, to_wall=T0 + DAY)
    got = {i["id"]: (i["duration_s"], i["lost_kwh"], i["clipped"]) for i in st["interruptions"]}
    assert got == {
        1: (600.0, pytest.approx(6.0), True),
        2: (1800.0, pytest.approx(18.0), False),
        4: (900.0, pytest.approx(2.0), True),
    }
    assert st["lost_kwh"] == pytest.approx(26.0)
    assert st["interruptions_by_class"]["trip"] == {
        "count": 1,
        "duration_s": 600.0,
        "lost_kwh": 6.0,
    }
    assert st["days"][0]["lost_kwh"] == pytest.approx(26.0) and st["days"][0]["interruptions"] == 3


def test_an_open_interruption_counts_to_the_end_of_the_data() -> None:
    ivs = rows(T0, 8)  # data to T0 + 2 h
    ivs[-1] = {**ivs[-1], "closed": False, "covered_s": 300.0}  # the open one: 300 s so far
    lost = 40.0 * 3000 / 3600  # as the meter states it at its last write (the end of the data)
    irs = [{"id": 9, "cls": "plc_link", "start_wall": T0 + 3600, "end_wall": None,
            "detail": "PLC link lost", "baseline_kw": 40.0, "lost_kwh": lost}]  # fmt: skip
    st = build(intervals=ivs, interruptions=irs)
    (ir,) = st["interruptions"]
    assert ir["open"] and ir["end"] is None
    assert ir["duration_s"] == pytest.approx(7 * 900 + 300 - 3600)  # to the end of the data
    assert ir["lost_kwh"] == pytest.approx(irs[0]["lost_kwh"])


def test_a_figure_that_is_not_a_number_counts_nothing_and_is_flagged() -> None:
    ivs = rows(T0, 4)
    ivs[1] = {**ivs[1], "delivered_kwh": float("nan")}
    ivs[2] = {**ivs[2], "delivered_kwh": "12"}
    ivs[3] = {"start_wall": T0 + 3 * IV, "end_wall": T0 + 4 * IV, "closed": True,
              "unreadable": "not JSON"}  # fmt: skip
    st = build(intervals=ivs)
    assert st["delivered_kwh"] == pytest.approx(ivs[0]["delivered_kwh"])
    assert st["meter_flag_counts"]["unreadable"] == 3
    assert math.isfinite(st["delivered_kwh"])
    json.loads(statement.to_json(st), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))


def test_a_range_without_data_says_so_in_every_format() -> None:
    st = build(intervals=rows(T0 + 5 * DAY, 4))  # data, but not in the range
    assert st["empty"] is True and st["delivered_kwh"] == 0.0 and st["availability_pct"] is None
    line = "no metering data between 2026-12-01T00:00:00Z and 2026-12-03T00:00:00Z"
    assert statement.empty_line(st) == line
    for render in (statement.to_markdown, statement.to_html, statement.to_csv):
        assert line in render(st), render.__name__
    assert json.loads(statement.to_json(st))["empty"] is True
    (only,) = list(csv.DictReader(io.StringIO(statement.to_csv(st))))
    assert only["date"] == "" and only["flags"] == line


def test_html_escapes_every_text() -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    ivs = rows(T0, 4)
    irs = [{"id": 1, "cls": "fault", "start_wall": T0, "end_wall": T0 + 60, "detail": evil,
            "baseline_kw": 1.0, "lost_kwh": 0.0}]  # fmt: skip
    events = [
        {"wall_time": T0 + 5, "kind": "alarm_raised", "source": evil,
         "detail": {"priority": evil, "message": evil}},
        {"wall_time": T0 + 6, "kind": "trip_latched", "source": evil, "detail": {"hazard": evil}},
    ]  # fmt: skip
    page = statement.to_html(build(site=evil, intervals=ivs, interruptions=irs, events=events))
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page
    assert (
        page.startswith("<!DOCTYPE html>")
        and "<link" not in page
        and "src=" not in page.replace("src=x", "")
    )


def test_markdown_keeps_one_line_per_table_row() -> None:
    irs = [{"id": 1, "cls": "fault", "start_wall": T0, "end_wall": T0 + 60,
            "detail": "a | b\nc", "baseline_kw": 1.0, "lost_kwh": 0.0}]  # fmt: skip
    md = statement.to_markdown(build(intervals=rows(T0, 2), interruptions=irs))
    (line,) = [x for x in md.splitlines() if x.startswith("| 1 |")]
    assert "a \\| b c" in line


def test_csv_has_one_row_per_day_and_reads_back() -> None:
    ivs = rows(T0, 96 + 10)
    st = build(intervals=ivs)
    got = list(csv.DictReader(io.StringIO(statement.to_csv(st))))
    assert [r["date"] for r in got] == ["2026-12-01", "2026-12-02"]
    assert tuple(got[0]) == statement.CSV_COLUMNS
    for r, part in zip(got, (ivs[:96], ivs[96:]), strict=True):
        assert float(r["delivered_kwh"]) == pytest.approx(sum(x["delivered_kwh"] for x in part))
        assert float(r["covered_s"]) == 900.0 * len(part)


def test_json_carries_the_contract_figures() -> None:
    st = build(intervals=rows(T0, 8))
    d = json.loads(statement.to_json(st))
    assert d["delivered_kwh"] == pytest.approx(sum(r["delivered_kwh"] for r in rows(T0, 8)))
    assert isinstance(d["availability_pct"], float)
    for key in ("site", "from", "to", "source", "unbilled_kwh", "delivered_calc_kwh",
                "rejected_kwh", "rejected_method", "it_energy_kwh", "it_heat_kwh",
                "reuse_fraction_pct", "fan_kwh", "stored_kwh", "availability_excl_planned_pct",
                "coverage_pct", "time_s", "days", "interruptions", "trips", "alarms",
                "bypasses", "forces", "mode_share_pct", "meter_flags", "empty"):  # fmt: skip
        assert key in d, key
    assert (d["from"], d["to"]) == ("2026-12-01T00:00:00Z", "2026-12-03T00:00:00Z")


def test_trips_alarms_bypasses_and_forces_are_listed_with_who_and_why() -> None:
    events = [
        {"wall_time": T0 + 10, "kind": "trip_latched", "source": "IL-04",
         "detail": {"hazard": "leak in the reuse zone"}},
        {"wall_time": T0 + 11, "kind": "alarm_raised", "source": "IL-04",
         "detail": {"priority": "high", "message": "Leak, reuse zone", "detail": ""}},
        {"wall_time": T0 + 900, "kind": "trip_reset", "source": "IL-04", "detail": {}},
        {"wall_time": T0 + 950, "kind": "bypass_active", "source": "IL-06",
         "detail": {"until_s": 99.0}},
        {"wall_time": T0 + 990, "kind": "force_expired", "source": "drycooler_fan_cmd",
         "detail": {"who": "bob", "reason": "fan test"}},
        {"wall_time": T0 + 991, "kind": "meter_replaced", "source": "meter",
         "detail": {"from_kwh": 5000.0, "to_kwh": 3.0}},
    ]  # fmt: skip
    commands = [
        {"wall_time": T0 + 949, "cmd": "bypass", "target": "IL-06", "principal": "alice",
         "role": "engineer", "via": "cli", "reason": "sensor swap", "accepted": True,
         "new": {"until": 1.0}, "why": ""},
        {"wall_time": T0 + 960, "cmd": "force", "target": "drycooler_fan_cmd", "principal": "eve",
         "role": "viewer", "via": "cli", "reason": "", "accepted": False, "new": None,
         "why": "role viewer may not force"},
        {"wall_time": T0 + 961, "cmd": "ack", "target": "*", "principal": "bob",
         "role": "operator", "via": "cli", "reason": "", "accepted": True, "new": None, "why": ""},
    ]  # fmt: skip
    st = build(intervals=rows(T0, 4), events=events, commands=commands)
    assert [(t["rule"], t["reset_at"]) for t in st["trips"]] == [("IL-04", "2026-12-01T00:15:00Z")]
    assert [(a["id"], a["priority"]) for a in st["alarms"]] == [("IL-04", "high")]
    assert st["alarm_counts"] == {"IL-04": 1}
    assert [(b["what"], b["target"], b["reason"]) for b in st["bypasses"]] == [
        ("request accepted", "IL-06", "sensor swap"),
        ("bypass_active", "IL-06", ""),
    ]
    assert [(f["what"], f["who"][:3]) for f in st["forces"]] == [
        ("request refused", "eve"),
        ("force_expired", "bob"),
    ]
    assert [f["what"] for f in st["meter_flags"] if f["what"] == "meter_replaced"] == [
        "meter_replaced"
    ]


def test_a_studys_events_make_the_same_statement_as_the_stores(tmp_path: Path) -> None:
    evs = [
        (Event("trip_latched", 5.0, "IL-04", {"hazard": "leak", "n": (1, 2)}), T0 + 10),
        (Event("alarm_raised", 5.0, "IL-04", {"priority": "high", "at": Path("/x")}), T0 + 11),
        (Event("meter_jump", 6.0, "meter", {"step_kwh": 50.0}), T0 + 12),
    ]
    ivs = rows(T0, 8)
    j = Journal(tmp_path / "j.db")
    j.write([event_row(e, w) for e, w in evs], frozenset(), meter=MeterWrite(ivs, []))
    j.close()
    data = read_meter(tmp_path / "j.db", T0, T0 + 2 * DAY, kinds=statement.EVENT_KINDS)
    assert statement.event_dicts(evs) == data.events
    from_store = build(intervals=data.intervals, events=data.events)
    from_memory = build(intervals=ivs, events=statement.event_dicts(evs))
    assert statement.to_json(from_store) == statement.to_json(from_memory)


def test_write_all_writes_json_markdown_and_html(tmp_path: Path) -> None:
    st = build(intervals=rows(T0, 4), source="study")
    paths = statement.write_all(st, tmp_path / "out")
    assert [p.name for p in paths] == ["statement.json", "statement.md", "statement.html"]
    assert json.loads(paths[0].read_text())["source"] == "study"


def test_a_bad_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"to_wall .* expected after from_wall"):
        build(to_wall=T0)
    with pytest.raises(ValueError, match="from_wall nan"):
        build(from_wall=float("nan"))


# ---- the real meter, through the store and in memory ----


def _scan_inputs(now: float, meter: float, mode: Any, *, ready: bool, leak: bool) -> tuple:
    from controller.arbitration import Level, Output
    from controller.supervisor import Decision
    from plc_io.image import ProcessImage, Quality, Sample

    latched = frozenset({"IL-04"}) if leak else frozenset()
    d = Decision(
        now_s=now,
        mode=mode,
        mode_since_s=0.0,
        outputs={"drycooler_fan_cmd": Output(50.0, Level.SEQUENCE)},
        active=latched,
        latched=latched,
        bypassed=frozenset(),
        events=(),
        blocked=(),
        reject_reasons=(),
        invalid={},
    )
    vals: dict[str, Any] = {
        "customer_ready": ready,
        "heat_meter_energy": meter,
        "it_power": 200.0,
        "customer_flow": 12.0 if mode.name == "NORMAL_REUSE" else 0.0,
        "customer_supply_temp": 45.0,
        "customer_return_temp": 35.0,
    }
    return ProcessImage({k: Sample(v, Quality.GOOD, now) for k, v in vals.items()}), d


def test_the_real_meters_rows_state_the_same_through_the_store_and_in_memory(
    tmp_path: Path,
) -> None:
    """Item 5: one statement for a running controller (rows from the store, written scan by
    scan in the scan's transaction) and for a study (the meter's rows in memory)."""
    from controller import metering as m
    from controller.journal import JournalKeeper
    from controller.modes import Mode
    from controller.supervisor import Commands
    from plc_io.site import MeteringConfig

    cfg = MeteringConfig(interval_s=900)
    state = m.new_state(cfg)
    wall = {"t": T0 + 6 * 3600.0}
    keeper = JournalKeeper(tmp_path / "heatloop.db", wall=lambda: wall["t"])
    rows: dict[float, dict[str, Any]] = {}
    irows: dict[int, dict[str, Any]] = {}
    pairs: list[tuple[Event, float]] = []
    meter_kwh, now = 5000.0, 0.0
    # 3 h: reuse at 120 kW, a leak trip of 20 min, a customer outage of 15 min, reuse again
    plan = [(3600, Mode.NORMAL_REUSE, True, False, 120.0)]
    plan += [(1200, Mode.LEAK_TRIP, True, True, 0.0), (2700, Mode.NORMAL_REUSE, True, False, 120.0)]
    plan += [(900, Mode.CUSTOMER_OFFLINE, False, False, 0.0)]
    plan += [(2400, Mode.NORMAL_REUSE, True, False, 120.0)]
    for seconds, mode, ready, leak, kw in plan:
        for _ in range(seconds // 10):
            now += 10.0
            wall["t"] += 10.0
            meter_kwh += kw * 10.0 / 3600.0
            image, d = _scan_inputs(now, meter_kwh, mode, ready=ready, leak=leak)
            state, out = m.step(state, cfg, image, d, Commands(), wall["t"])
            for r in out.intervals:
                rows[r["start_wall"]] = r
            for r in out.interruptions:
                irows[r["id"]] = r
            pairs += [(e, wall["t"]) for e in out.events]
            keeper.record(
                out.events,
                d.latched,
                meter=MeterWrite(out.intervals, out.interruptions, m.state_to_json(state)),
            )
    assert keeper.problem is None
    keeper.close()
    lo, hi = T0, T0 + DAY
    data = read_meter(tmp_path / "heatloop.db", lo, hi, kinds=statement.EVENT_KINDS)
    kw_ = {"site": "s", "from_wall": lo, "to_wall": hi, "interval_s": 900}
    from_store = statement.build(
        intervals=data.intervals,
        interruptions=data.interruptions,
        events=data.events,
        commands=data.commands,
        source="controller",
        **kw_,
    )
    events = [e for e in statement.event_dicts(pairs) if e["kind"] in statement.EVENT_KINDS]
    from_memory = statement.build(
        intervals=list(rows.values()),
        interruptions=list(irows.values()),
        events=events,
        commands=[],
        source="controller",
        **kw_,
    )
    assert statement.to_json(from_store) == statement.to_json(from_memory)
    # and the figures are the meter's own: billed = the totaliser's count after its baseline
    v = m.view(state)
    assert from_store["delivered_kwh"] == pytest.approx(v["totals"]["delivered_kwh"])
    assert from_store["delivered_kwh"] == pytest.approx(
        120.0 * (3600 + 2700 + 2400) / 3600, abs=1.0
    )
    assert from_store["availability_pct"] == pytest.approx(v["availability_pct"])
    assert [i["cls"] for i in from_store["interruptions"]] == ["trip", "customer_side"]
    j = Journal(tmp_path / "heatloop.db")
    assert j.load_state()["meter"] == m.state_to_json(state)  # the memory matches the rows
    j.close()
