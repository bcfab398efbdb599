"""Properties of the metering core over arbitrary scan sequences (hypothesis)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import metering as m
from controller.modes import Mode
from controller.supervisor import Commands
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import MeteringConfig
from tests.unit.test_metering import CUSTOMER, DAY0, LEAK, Run, decision

CFG = MeteringConfig(interval_s=60)  # short intervals: many boundaries in a short run

# what a scan may be: (mode, keyword arguments of Run.scan)
SITUATIONS: list[tuple[Mode, dict[str, Any]]] = [
    (Mode.NORMAL_REUSE, {}),
    (Mode.NORMAL_REUSE, {"vals": CUSTOMER}),
    (Mode.BUFFER_FULL, {}),
    (Mode.STARTUP, {}),
    (Mode.DRY_COOLER_REJECT, {}),
    (Mode.DRY_COOLER_REJECT, {"reasons": ("secondary pump failed",)}),
    (Mode.LEAK_TRIP, LEAK),
    (Mode.CUSTOMER_OFFLINE, {"ready": False}),
    (Mode.CUSTOMER_OFFLINE, {}),
    (Mode.MAINTENANCE, {"cmds": Commands(maintenance=True)}),
    (Mode.DRY_COOLER_REJECT, {"cmds": Commands(link_ok=False)}),
]

scan_st = st.tuples(
    st.sampled_from([0.25, 1.0, 7.0, 30.0, 61.0, m.MAX_SCAN_DT_S + 5.0]),  # dt
    st.integers(0, len(SITUATIONS) - 1),
    st.floats(0.0, 400.0),  # kW the meter counts over the scan
    st.booleans() | st.just(True),  # the reading is good (mostly)
    st.sampled_from([0.0] * 8 + [-200.0, 500.0]),  # a wall-clock step before the scan
)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drive(r: Run, scans: list[tuple[float, int, float, bool, float]], meter: float) -> float:
    wall = DAY0 + r.t
    for dt, sit, kw, good, jump in scans:
        meter += kw * dt / 3600.0
        wall += dt + jump
        mode, kwargs = SITUATIONS[sit]
        r.scan(dt, meter if good else None, mode, wall=wall, **kwargs)
    return meter


def check_invariants(r: Run) -> None:
    v = m.view(r.state)
    for row in r.rows.values():
        assert sum(row["class_s"].values()) == pytest.approx(row["covered_s"], abs=1e-6)
        assert row["covered_s"] <= CFG.interval_s + 1e-6
        assert row["flags"] == sorted(set(row["flags"]))
        assert row["end_wall"] - row["start_wall"] == CFG.interval_s
        assert row["start_wall"] % CFG.interval_s == 0
    for key in m.ENERGIES:
        assert v["totals"][key] == pytest.approx(r.total(key), abs=1e-6)
    for c in m.CLASSES:
        assert v["totals"]["class_s"][c] == pytest.approx(
            sum(x["class_s"][c] for x in r.rows.values()), abs=1e-6
        )
    text = json.dumps(m.state_to_json(r.state), allow_nan=False)
    assert len(text) < 8000
    json.dumps(list(r.rows.values()), allow_nan=False)
    json.dumps(list(r.irows.values()), allow_nan=False)
    # interruptions: ids in order, at most one open, each a span of its class
    ids = sorted(r.irows)
    assert ids == list(range(1, len(ids) + 1))
    assert sum(1 for i in r.irows.values() if i["end_wall"] is None) <= 1
    for i in r.irows.values():
        assert i["cls"] in m.INTERRUPTION_CLASSES
        assert i["lost_kwh"] >= 0.0
        assert i["end_wall"] is None or i["end_wall"] >= i["start_wall"]
    started = [e.detail["id"] for e in r.events if e.kind == "interruption_started"]
    ended = [e.detail["id"] for e in r.events if e.kind == "interruption_ended"]
    assert started == ids and len(set(ended)) == len(ended) and set(ended) <= set(started)


@PROPS
@given(st.lists(scan_st, min_size=1, max_size=120))
def test_every_second_once_and_the_intervals_add_up(scans: list[Any]) -> None:
    r = Run(CFG)
    r.scan(0.0, 0.0)
    drive(r, scans, 0.0)
    check_invariants(r)


@PROPS
@given(st.lists(scan_st, min_size=2, max_size=80), st.data())
def test_the_state_json_round_trip_mid_run_continues_identically(
    scans: list[Any], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(1, len(scans) - 1))
    a = Run(CFG)
    a.scan(0.0, 0.0)
    meter = drive(a, scans[:cut], 0.0)
    b = Run(CFG)
    b.state = m.state_from_json(CFG, json.loads(json.dumps(m.state_to_json(a.state))))
    b.t = a.t
    for r in (a, b):
        drive(r, scans[cut:], meter)
    assert m.state_to_json(a.state) == m.state_to_json(b.state)
    assert [x for x in b.rows.values()] == [a.rows[k] for k in b.rows]


@PROPS
@given(
    st.lists(st.floats(0.05, 50.0), min_size=1, max_size=200),
    st.lists(st.floats(0.05, 50.0), min_size=1, max_size=200),
    st.floats(0.0, 900.0),
    st.lists(st.booleans(), min_size=200, max_size=200),
)
def test_any_split_into_scans_bills_the_same(
    a: list[float], b: list[float], kw: float, good: list[bool]
) -> None:
    """A totaliser counting kw: whatever the scan lengths, and whichever readings are lost on
    the way, the billed total is the count between the first and the last reading."""
    end = min(sum(a), sum(b))
    totals = []
    for steps in (a, b):
        r = Run(CFG)
        start = 1000.0
        r.scan(0.0, start)
        t = 0.0
        for k, dt in enumerate(steps):
            if t + dt >= end:
                dt = end - t
            t += dt
            last = t >= end
            r.scan(dt, start + kw * t / 3600.0 if good[k] or last else None)
            if last:
                break
        check_invariants(r)
        totals.append(r.total("delivered_kwh"))
        assert r.total("unbilled_kwh") == 0.0
        # every second accounted, in one class (no gap: no scan is longer than 50 s)
        assert sum(x["covered_s"] for x in r.rows.values()) == pytest.approx(end, abs=1e-6)
    assert totals[0] == pytest.approx(kw * end / 3600.0, rel=1e-9, abs=1e-9)
    assert totals[1] == pytest.approx(totals[0], rel=1e-9, abs=1e-9)


@PROPS
@given(st.floats(m.MAX_SCAN_DT_S + 0.01, 2 * 86400.0), st.floats(0.0, 500.0))
def test_a_gap_of_any_length_is_fault_time_and_the_meter_bridges_it(
    gap_s: float, kw: float
) -> None:
    r = Run(CFG)
    r.scan(0.0, 0.0)
    r.scan(10.0, kw * 10.0 / 3600.0)
    r.scan(gap_s, kw * (10.0 + gap_s) / 3600.0)
    check_invariants(r)
    assert r.total("delivered_kwh") == pytest.approx(kw * (10.0 + gap_s) / 3600.0)
    cls = m.view(r.state)["totals"]["class_s"]
    assert cls["fault"] == pytest.approx(gap_s)
    assert cls["available"] == pytest.approx(10.0)
    (gap,) = (i for i in r.irows.values() if i["detail"] == m.GAP_DETAIL)
    assert gap["start_wall"] == DAY0 + 10.0
    assert gap["end_wall"] == pytest.approx(DAY0 + 10.0 + gap_s)


@PROPS
@given(st.floats(1.0, 5000.0), st.integers(1, 50))
def test_a_clock_going_back_never_reopens_and_never_counts_a_second_twice(
    back_s: float, n: int
) -> None:
    r = Run(CFG)
    r.scan(0.0, 0.0)
    for _ in range(20):
        r.scan(10.0, 0.0)
    wall = DAY0 + r.t - back_s
    for _ in range(n):
        wall += 10.0
        r.scan(10.0, 0.0, wall=wall)  # Run asserts no closed interval comes back
    check_invariants(r)
    covered = sum(x["covered_s"] for x in r.rows.values())
    assert covered == pytest.approx(max(200.0, wall - DAY0), abs=1e-6)
    assert math.isclose(r.state.cursor_wall or 0.0, max(DAY0 + 200.0, wall))


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)


@PROPS
@given(
    st.lists(
        st.tuples(
            st.dictionaries(
                st.sampled_from((*m._USED, "customer_ready", "drycooler_fault")), ANY_VALUE
            ),
            st.sampled_from(list(Quality)),
            st.integers(0, len(SITUATIONS) - 1),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_reading_of_any_type_never_breaks_the_meter(scans: list[Any]) -> None:
    """Garbage in (wrong types, NaN, infinities, huge numbers, bad quality): the meter goes on,
    its state stays finite JSON that restores, and nothing is billed from a garbage reading."""
    r = Run(CFG)
    for vals, quality, sit in scans:
        mode, kwargs = SITUATIONS[sit]
        r.t += 10.0
        samples = {k: Sample(v, quality, r.t) for k, v in vals.items()}
        kwargs = dict(kwargs)
        cmds = kwargs.pop("cmds", None) or Commands()
        kwargs.pop("vals", None)
        kwargs.pop("ready", None)
        r.state, out = m.step(
            r.state, CFG, ProcessImage(samples), decision(r.t, mode, **kwargs), cmds, DAY0 + r.t
        )
        for row in out.intervals:
            r.rows[row["start_wall"]] = row
        for row in out.interruptions:
            r.irows[row["id"]] = row
        r.events += out.events
    text = json.dumps(m.state_to_json(r.state), allow_nan=False)
    m.state_from_json(CFG, json.loads(text))
    json.dumps(list(r.rows.values()), allow_nan=False)
    json.dumps(list(r.irows.values()), allow_nan=False)
    json.dumps(m.view(r.state), allow_nan=False)
    assert r.total("delivered_kwh") <= 1000.0 * r.t / 3600.0 + 0.2 * len(scans)
