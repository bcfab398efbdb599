"""The metering core on hand-built scans: the totaliser's rules, interruptions and their classes,
intervals, gaps and clock steps, and the state's JSON (docs/metering.md)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest

from controller import metering as m
from controller.arbitration import Level, Output
from controller.modes import Mode
from controller.supervisor import PLC_HOLD, Commands, Decision
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import MeteringConfig

CFG = MeteringConfig(interval_s=900)
DAY0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400.0  # a UTC midnight
NONE: frozenset[str] = frozenset()


def decision(
    now: float,
    mode: Mode = Mode.NORMAL_REUSE,
    *,
    active: frozenset[str] = NONE,
    latched: frozenset[str] = NONE,
    reasons: tuple[str, ...] = (),
    invalid: Mapping[str, str] | None = None,
    fan_pct: float = 0.0,
) -> Decision:
    return Decision(
        now_s=now,
        mode=mode,
        mode_since_s=0.0,
        outputs={"drycooler_fan_cmd": Output(fan_pct, Level.SEQUENCE)},
        active=active | latched,
        latched=latched,
        bypassed=NONE,
        events=(),
        blocked=(),
        reject_reasons=reasons,
        invalid=invalid or {},
    )


def image(now: float, meter: float | None, *, ready: bool = True, **vals: Any) -> ProcessImage:
    """A healthy reading of what metering uses; `meter=None` reads the totaliser as comms lost."""
    base: dict[str, Any] = {"customer_ready": ready, **vals}
    s = {k: Sample(v, Quality.GOOD, now) for k, v in base.items()}
    s["heat_meter_energy"] = (
        Sample(meter, Quality.GOOD, now) if meter is not None else Sample(None, Quality.STALE, now)
    )
    return ProcessImage(s)


class Run:
    """Drives the meter scan by scan on one clock (wall = DAY0 + monotonic unless told)."""

    def __init__(self, cfg: MeteringConfig = CFG) -> None:
        self.cfg = cfg
        self.state = m.new_state(cfg)
        self.t = 0.0
        self.rows: dict[float, dict[str, Any]] = {}  # the newest row per interval start
        self.irows: dict[int, dict[str, Any]] = {}
        self.events: list[Any] = []
        self.conditions: Mapping[str, str] = {}

    def scan(
        self,
        dt: float,
        meter: float | None,
        mode: Mode = Mode.NORMAL_REUSE,
        *,
        cmds: Commands | None = None,
        wall: float | None = None,
        ready: bool = True,
        **kw: Any,
    ) -> m.MeterOut:
        self.t += dt
        vals = kw.pop("vals", {})
        d = decision(self.t, mode, **kw)
        w = DAY0 + self.t if wall is None else wall
        self.state, out = m.step(
            self.state,
            self.cfg,
            image(self.t, meter, ready=ready, **vals),
            d,
            cmds or Commands(),
            w,
        )
        for r in out.intervals:
            old = self.rows.get(r["start_wall"])
            assert old is None or not old["closed"], f"closed interval {r['start_wall']} reopened"
            self.rows[r["start_wall"]] = r
        for r in out.interruptions:
            self.irows[r["id"]] = r
        self.events += out.events
        self.conditions = out.conditions
        return out

    def hold(
        self, seconds: float, kw_: float, meter: float, step: float = 10.0, **kw: Any
    ) -> float:
        """Scan every `step` s for `seconds` with the meter counting kw_; the last reading."""
        for _ in range(round(seconds / step)):
            meter += kw_ * step / 3600.0
            self.scan(step, meter, **kw)
        return meter

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def total(self, key: str) -> float:
        return sum(r[key] for r in self.rows.values())


# ---- the totaliser (billing truth) ----


def test_first_reading_is_the_baseline_and_steps_are_billed() -> None:
    r = Run()
    r.scan(0.0, 1000.0)
    assert r.total("delivered_kwh") == 0.0
    r.scan(10.0, 1000.25)
    r.scan(10.0, 1000.5)
    assert r.total("delivered_kwh") == pytest.approx(0.5)
    row = r.rows[DAY0]
    assert row["flags"] == ["meter_start"]
    assert (row["meter_first_kwh"], row["meter_last_kwh"]) == (1000.0, 1000.5)
    assert r.conditions == {}


def test_rollover_is_billed_across_the_wrap() -> None:
    cfg = MeteringConfig(meter_rollover_kwh=1000.0)
    r = Run(cfg)
    r.scan(0.0, 990.0)
    r.scan(60.0, 995.0)
    r.scan(60.0, 3.0)  # 5 kWh to the wrap and 3 after: 8 kWh in 60 s (480 kW < 1000 kW)
    r.scan(60.0, 6.0)
    assert r.total("delivered_kwh") == pytest.approx(5.0 + 8.0 + 3.0)
    assert r.total("unbilled_kwh") == 0.0
    assert "meter_rollover" in r.rows[DAY0]["flags"]
    assert r.kinds() == ["meter_rollover"]
    assert "METER:TOTALISER" not in r.conditions


def test_a_totaliser_that_goes_back_is_a_replaced_meter_not_billed() -> None:
    r = Run()
    r.scan(0.0, 5000.0)
    r.scan(60.0, 5001.0)
    r.scan(60.0, 12.0)  # a new meter: nothing billed for this step
    assert r.total("delivered_kwh") == pytest.approx(1.0)
    assert r.total("unbilled_kwh") == 0.0
    assert "meter_replaced" in r.rows[DAY0]["flags"]
    assert "meter_replaced" in r.kinds()
    assert "went backwards" in r.conditions["METER:TOTALISER"]
    r.scan(60.0, 13.5)  # counted again from the new meter's reading
    assert r.total("delivered_kwh") == pytest.approx(2.5)
    # the condition stands for the rest of that interval and the next, then clears
    r.hold(900.0, 0.0, 13.5, step=60.0)
    assert "METER:TOTALISER" in r.conditions
    r.hold(900.0, 0.0, 13.5, step=60.0)
    assert "METER:TOTALISER" not in r.conditions


def test_a_jump_beyond_the_meters_largest_power_is_not_billed() -> None:
    r = Run()  # meter_max_kw 1000: at most 1000 x 10/3600 + 0.2 = 2.98 kWh in 10 s
    r.scan(0.0, 100.0)
    r.scan(10.0, 400.0)
    r.scan(10.0, 400.5)
    assert r.total("delivered_kwh") == pytest.approx(0.5)
    assert r.total("unbilled_kwh") == pytest.approx(300.0)
    assert "meter_jump" in r.rows[DAY0]["flags"]
    assert "jumped" in r.conditions["METER:TOTALISER"]
    ev = next(e for e in r.events if e.kind == "meter_jump")
    assert ev.detail["step_kwh"] == pytest.approx(300.0)


def test_a_meter_swapped_higher_while_no_heat_flowed_is_a_jump_not_billed() -> None:
    """A technician swaps the meter with the loop standing still; the new one reads higher.
    No heat flowed, so the meter cannot have counted it: however long the loop stood, the
    step is a jump. With the flow unknown the same step after the same hour is billed."""
    still = {"customer_flow": 0.0, "customer_supply_temp": 40.0, "customer_return_temp": 40.0}
    r = Run()
    r.scan(0.0, 100.0, vals=still)
    for _ in range(360):  # an hour: at 1000 kW the meter could have counted 1000 kWh
        r.scan(10.0, 100.0, vals=still)
    r.scan(10.0, 150.0, vals=still)
    assert r.total("delivered_kwh") == 0.0 and r.total("unbilled_kwh") == pytest.approx(50.0)
    assert "meter_jump" in r.kinds() and "METER:TOTALISER" in r.conditions
    unknown = Run()
    unknown.scan(0.0, 100.0)
    for _ in range(360):
        unknown.scan(10.0, 100.0)
    unknown.scan(10.0, 150.0)
    assert unknown.total("delivered_kwh") == pytest.approx(50.0)


def test_a_step_just_within_the_allowance_is_billed() -> None:
    r = Run()
    r.scan(0.0, 100.0)
    allowed = CFG.meter_max_kw * 10.0 / 3600.0 + m.RESOLUTION_KWH
    r.scan(10.0, 100.0 + allowed * 0.999)
    assert r.total("delivered_kwh") == pytest.approx(allowed * 0.999)
    assert r.total("unbilled_kwh") == 0.0


def test_an_invalid_reading_is_skipped_and_the_blind_time_judged_on_return() -> None:
    r = Run()
    r.scan(0.0, 100.0)
    for _ in range(60):
        r.scan(10.0, None)  # 600 s blind: up to 1000 kW x 600 s = 166.7 kWh may have passed
    r.scan(10.0, 130.0)
    assert r.total("delivered_kwh") == pytest.approx(30.0)
    assert "meter_invalid" in r.rows[DAY0]["flags"]
    assert "METER:TOTALISER" not in r.conditions
    # a reading in decision.invalid is not used either
    r.scan(10.0, 131.0, invalid={"heat_meter_energy": "frozen"})
    assert r.total("delivered_kwh") == pytest.approx(30.0)
    # blind again, then more than the allowance for that time: a jump
    r.scan(10.0, 300.0)
    assert r.total("unbilled_kwh") == pytest.approx(170.0)


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf, 2e8, True, "12"])
def test_an_impossible_reading_is_invalid(bad: object) -> None:
    r = Run()
    r.scan(0.0, 100.0)
    r.scan(10.0, bad)  # type: ignore[arg-type]
    r.scan(10.0, 100.5)
    assert r.total("delivered_kwh") == pytest.approx(0.5)
    assert "meter_invalid" in r.rows[DAY0]["flags"]


def test_a_reading_back_by_less_than_the_resolution_keeps_the_higher_count() -> None:
    r = Run()
    r.scan(0.0, 100.0)
    r.scan(10.0, 100.1)
    r.scan(10.0, 100.05)  # float32 jitter of the register
    r.scan(10.0, 100.3)
    assert r.total("delivered_kwh") == pytest.approx(0.3)
    assert [e.kind for e in r.events if e.kind.startswith("meter_")] == []


# ---- interruptions and availability ----

LEAK = {"active": frozenset({"IL-04"}), "latched": frozenset({"IL-04"})}


def test_interruptions_through_a_leak_trip_a_customer_outage_maintenance_and_a_lost_link() -> None:
    r = Run()
    kw = 120.0
    meter = r.hold(3600.0, kw, 1000.0)  # an hour available at 120 kW: the baseline
    t_trip = DAY0 + r.t
    meter = r.hold(600.0, 0.0, meter, mode=Mode.LEAK_TRIP, **LEAK)
    # reset: re-entry wait in DRY_COOLER_REJECT with no cause of its own stays the trip
    meter = r.hold(300.0, 0.0, meter, mode=Mode.DRY_COOLER_REJECT)
    t_back = DAY0 + r.t
    meter = r.hold(1800.0, kw, meter)
    # customer outage, then its dwell (ready again, still CUSTOMER_OFFLINE): customer side
    meter = r.hold(600.0, 0.0, meter, mode=Mode.CUSTOMER_OFFLINE, ready=False)
    meter = r.hold(120.0, 0.0, meter, mode=Mode.CUSTOMER_OFFLINE)
    meter = r.hold(1800.0, kw, meter)
    # maintenance, then a lost PLC link in the middle of it: a new interruption
    maint = Commands(maintenance=True)
    meter = r.hold(600.0, 0.0, meter, mode=Mode.MAINTENANCE, cmds=maint)
    meter = r.hold(60.0, 0.0, meter, mode=Mode.MAINTENANCE, cmds=Commands(link_ok=False))
    meter = r.hold(60.0, 0.0, meter, mode=Mode.DRY_COOLER_REJECT)  # link back: wait, residual
    meter = r.hold(600.0, kw, meter)

    rows = [r.irows[i] for i in sorted(r.irows)]
    got = [(x["cls"], x["detail"]) for x in rows]
    assert got == [
        ("trip", "IL-04 latched"),
        ("customer_side", "customer not ready"),
        ("planned_maintenance", "maintenance"),
        ("plc_link", "PLC link lost"),
    ]
    trip = rows[0]
    assert trip["start_wall"] == pytest.approx(t_trip)
    assert trip["end_wall"] == pytest.approx(t_back)
    assert trip["baseline_kw"] == pytest.approx(kw, rel=1e-6)
    assert trip["lost_kwh"] == pytest.approx(kw * 900.0 / 3600.0, rel=1e-6)  # 15 min at 120 kW
    assert rows[1]["end_wall"] - rows[1]["start_wall"] == pytest.approx(720.0)
    assert rows[3]["end_wall"] - rows[3]["start_wall"] == pytest.approx(120.0)
    assert all(x["end_wall"] is not None for x in rows)
    ended = [e for e in r.events if e.kind == "interruption_ended"]
    assert [e.detail["id"] for e in ended] == [x["id"] for x in rows]
    cls = {c: sum(x["class_s"][c] for x in r.rows.values()) for c in m.CLASSES}
    assert cls["trip"] == pytest.approx(900.0)
    assert cls["customer_side"] == pytest.approx(720.0)
    assert cls["planned_maintenance"] == pytest.approx(600.0)
    assert cls["plc_link"] == pytest.approx(120.0)
    v = m.view(r.state)
    assert v["open_interruption"] is None
    assert v["totals"]["class_s"] == pytest.approx(cls)
    assert v["availability_pct"] == pytest.approx(
        100 * cls["available"] / (cls["available"] + cls["trip"] + 600 + 120 + cls["fault"])
    )
    assert m.availability_excl_planned_pct(cls) == pytest.approx(
        100 * cls["available"] / (cls["available"] + cls["trip"] + 120 + cls["fault"])
    )


@pytest.mark.parametrize(
    ("kw", "cmds", "ready", "want"),
    [
        ({"mode": Mode.LEAK_TRIP, **LEAK}, Commands(link_ok=False), True, "plc_link"),
        ({"mode": Mode.MAINTENANCE}, Commands(maintenance=True), False, "planned_maintenance"),
        ({"mode": Mode.LEAK_TRIP, **LEAK}, Commands(maintenance=True), True, "planned_maintenance"),
        ({"mode": Mode.LEAK_TRIP, **LEAK}, Commands(), False, "trip"),
        (
            {"mode": Mode.CUSTOMER_OFFLINE, "reasons": ("reuse valve not following",)},
            None,
            False,
            "customer_side",
        ),
        (
            {"mode": Mode.DRY_COOLER_REJECT, "reasons": ("secondary pump failed",)},
            None,
            True,
            "fault",
        ),
        (
            {"mode": Mode.DRY_COOLER_REJECT, "reasons": (f"{PLC_HOLD} for 3 s",)},
            None,
            True,
            "plc_link",
        ),
        (
            {
                "mode": Mode.DRY_COOLER_REJECT,
                "active": frozenset({"IL-06"}),
                "reasons": ("interlock IL-06",),
            },
            None,
            True,
            "trip",
        ),
        (
            {"mode": Mode.NORMAL_REUSE},
            Commands(write_failed=frozenset({"heartbeat"})),
            True,
            "plc_link",
        ),
        ({"mode": Mode.DRY_COOLER_REJECT, "reasons": ("reject requested",)}, None, True, "fault"),
        ({"mode": Mode.NORMAL_REUSE, "active": frozenset({"IL-01"})}, None, True, "available"),
        ({"mode": Mode.BUFFER_FULL}, None, True, "available"),
    ],
)
def test_precedence_of_causes(
    kw: dict[str, Any], cmds: Commands | None, ready: bool, want: str
) -> None:
    r = Run()
    r.scan(0.0, 100.0)
    r.scan(10.0, 100.0, cmds=cmds, ready=ready, **kw)
    got = max(m.CLASSES, key=lambda c: r.rows[DAY0]["class_s"][c])
    assert got == want
    assert r.rows[DAY0]["class_s"][want] == pytest.approx(10.0)


def test_an_invalid_customer_ready_is_a_fault_not_the_customer() -> None:
    r = Run()
    r.scan(0.0, 100.0)
    r.scan(10.0, 100.0, invalid={"customer_ready": "comms lost"})
    assert r.rows[DAY0]["class_s"]["fault"] == 10.0
    assert r.irows[1]["detail"] == "customer_ready not valid"


def test_a_residual_scan_continues_the_interruption_and_a_new_cause_starts_another() -> None:
    r = Run()
    r.hold(600.0, 100.0, 10.0)
    r.scan(10.0, 10.0, mode=Mode.CUSTOMER_OFFLINE, ready=False)
    r.scan(10.0, 10.0, mode=Mode.CUSTOMER_OFFLINE)  # dwell: continues customer_side
    assert len([i for i in r.irows.values() if i["cls"] == "customer_side"]) == 1
    r.scan(10.0, 10.0, mode=Mode.DRY_COOLER_REJECT, reasons=("secondary pump failed",))
    assert [i["cls"] for i in r.irows.values()][-2:] == ["customer_side", "fault"]
    r.scan(10.0, 10.0, mode=Mode.DRY_COOLER_REJECT)  # residual: still the fault
    assert r.rows[DAY0]["class_s"]["fault"] == pytest.approx(20.0)
    assert r.state.interruption is not None and r.state.interruption[1] == "fault"


def test_energy_delivered_during_an_interruption_reduces_the_energy_not_delivered() -> None:
    r = Run()
    meter = r.hold(3600.0, 100.0, 0.0)
    meter = r.hold(1800.0, 40.0, meter, mode=Mode.DRY_COOLER_REJECT, reasons=("valve",))
    r.hold(60.0, 100.0, meter)
    it = next(i for i in r.irows.values() if i["cls"] == "fault" and i["detail"] == "valve")
    assert it["delivered_during_kwh"] == pytest.approx(20.0)
    assert it["lost_kwh"] == pytest.approx(100.0 * 0.5 - 20.0)


def test_back_to_back_interruptions_keep_the_last_baseline() -> None:
    r = Run()
    meter = r.hold(3600.0, 80.0, 0.0)
    meter = r.hold(7200.0, 0.0, meter, mode=Mode.LEAK_TRIP, **LEAK)
    r.hold(600.0, 0.0, meter, mode=Mode.MAINTENANCE, cmds=Commands(maintenance=True))
    maint = next(i for i in r.irows.values() if i["cls"] == "planned_maintenance")
    assert maint["baseline_kw"] == pytest.approx(80.0)
    assert maint["lost_kwh"] == pytest.approx(80.0 * 600.0 / 3600.0)


# ---- intervals, gaps, clock ----


def test_a_scan_across_a_boundary_is_split_and_the_interval_closes() -> None:
    r = Run()
    r.scan(0.0, 0.0, wall=DAY0 + 890.0)
    r.scan(20.0, 1.0, wall=DAY0 + 910.0)
    first, second = r.rows[DAY0], r.rows[DAY0 + 900.0]
    assert first["closed"] and not second["closed"]
    assert first["covered_s"] == pytest.approx(10.0)
    assert second["covered_s"] == pytest.approx(10.0)
    assert second["delivered_kwh"] == pytest.approx(1.0)  # billed where it was read
    assert first["end_wall"] == second["start_wall"] == DAY0 + 900.0


def test_a_restart_after_a_gap_makes_fault_intervals_and_bills_the_meter_where_read() -> None:
    r = Run()
    r.scan(0.0, 0.0)
    meter = r.hold(600.0, 100.0, 0.0)
    state = m.state_from_json(CFG, json.loads(json.dumps(m.state_to_json(r.state))))
    r.state = state
    # the controller was down two hours; monotonic time of the new process is unrelated
    r.t = 5.0
    out = r.scan(0.0, meter + 150.0, wall=DAY0 + 600.0 + 7200.0, mode=Mode.STARTUP)
    closed = [x for x in out.intervals if x["closed"]]
    assert [x["start_wall"] - DAY0 for x in closed] == [900.0 * k for k in range(8)]
    for x in closed[1:]:
        assert x["class_s"]["fault"] == 900.0 and x["flags"] == ["gap"]
    assert closed[0]["class_s"]["fault"] == 300.0
    assert sum(x["delivered_kwh"] for x in closed) == pytest.approx(100.0 * 600.0 / 3600.0)
    open_row = out.intervals[-1]
    assert not open_row["closed"] and open_row["start_wall"] == DAY0 + 7200.0
    assert open_row["delivered_kwh"] == pytest.approx(150.0)  # read after the gap
    assert "gap" in open_row["flags"]
    gap = next(i for i in r.irows.values() if i["detail"] == m.GAP_DETAIL)
    assert gap["cls"] == "fault" and gap["start_wall"] == DAY0 + 600.0
    assert gap["delivered_during_kwh"] == pytest.approx(150.0)
    # STARTUP after it is residual: the same interruption goes on
    r.scan(10.0, meter + 150.0, mode=Mode.STARTUP)
    assert r.state.interruption is not None and r.state.interruption[2] == m.GAP_DETAIL


def test_a_long_scan_is_a_gap() -> None:
    r = Run()
    r.scan(0.0, 0.0)
    r.scan(m.MAX_SCAN_DT_S + 1.0, 0.5)
    assert r.rows[DAY0]["class_s"]["fault"] == pytest.approx(m.MAX_SCAN_DT_S + 1.0)
    assert "gap" in r.rows[DAY0]["flags"]


def test_a_wall_clock_going_back_never_reopens_a_closed_interval() -> None:
    r = Run()
    r.scan(0.0, 0.0)
    meter = r.hold(1200.0, 100.0, 0.0)  # one interval closed, the second open at 1200 s
    t = r.t
    for k in range(1, 31):  # the wall clock went back 1000 s; the monotonic clock runs on
        meter += 100.0 * 10.0 / 3600.0
        r.scan(10.0, meter, wall=DAY0 + t - 1000.0 + 10.0 * k)
    assert "clock" in r.rows[DAY0 + 900.0]["flags"]
    assert r.rows[DAY0]["covered_s"] == pytest.approx(900.0)
    # billed energy went on being counted, into the open interval
    assert r.total("delivered_kwh") == pytest.approx(100.0 * 1500.0 / 3600.0)
    assert r.rows[DAY0 + 900.0]["covered_s"] == pytest.approx(300.0)  # no second twice


def test_a_wall_clock_step_forward_is_not_covered() -> None:
    r = Run()
    r.scan(0.0, 0.0)
    r.scan(10.0, 0.1, wall=DAY0 + 10.0)
    r.scan(10.0, 0.2, wall=DAY0 + 2000.0)
    assert r.rows[DAY0]["covered_s"] == pytest.approx(10.0)
    assert "clock" in r.rows[DAY0]["flags"]
    assert r.rows[DAY0 + 1800.0]["covered_s"] == pytest.approx(10.0)
    assert r.total("delivered_kwh") == pytest.approx(0.2)


def test_non_finite_clock_is_ignored() -> None:
    r = Run()
    r.scan(0.0, 0.0)
    before = r.state
    out = r.scan(10.0, 1.0, wall=math.nan)
    assert r.state is before and out.intervals == ()


# ---- cross-check, balance, low dT ----

CUSTOMER = {"customer_flow": 12.0, "customer_supply_temp": 45.0, "customer_return_temp": 35.0}


def customer_kw(v: dict[str, float] = CUSTOMER) -> float:
    from plc_io import fluids

    ts, tr = v["customer_supply_temp"], v["customer_return_temp"]
    rho = fluids.density_kg_m3("water", tr)
    cp = fluids.cp_kj_kgk("water", (ts + tr) / 2)
    return v["customer_flow"] / 3600.0 * rho * cp * (ts - tr)


def test_cross_check_agrees_with_a_meter_that_counts_the_same_heat() -> None:
    r = Run()
    kw = customer_kw()
    assert 130.0 < kw < 140.0  # 12 m³/h of water at 10 K
    r.scan(0.0, 0.0, vals=CUSTOMER)
    r.hold(1800.0, kw, 0.0, vals=CUSTOMER)
    row = r.rows[DAY0 + 900.0]
    assert row["closed"]
    assert row["delivered_calc_kwh"] == pytest.approx(row["delivered_kwh"], rel=1e-9)
    assert "METER:CROSSCHECK" not in r.conditions


def test_a_meter_reading_low_raises_the_cross_check_for_the_next_interval() -> None:
    r = Run()
    kw = customer_kw()
    r.scan(0.0, 0.0, vals=CUSTOMER)
    r.hold(1800.0, 0.85 * kw, 0.0, vals=CUSTOMER)  # 15 % low, tolerance 10 %
    assert "crosscheck" in r.rows[DAY0 + 900.0]["flags"]
    assert "crosscheck" not in r.rows[DAY0]["flags"]  # not whole: the meter started in it
    assert "-15.0 %" in r.conditions["METER:CROSSCHECK"]


def test_a_meter_that_stopped_counting_fails_the_cross_check() -> None:
    r = Run()
    r.scan(0.0, 0.0, vals=CUSTOMER)
    r.hold(1800.0, 0.0, 0.0, vals=CUSTOMER)
    assert "crosscheck" in r.rows[DAY0 + 900.0]["flags"]
    assert "METER:CROSSCHECK" in r.conditions


def test_low_dt_while_delivering_is_counted_and_warned_after_a_minute() -> None:
    r = Run()
    low = {**CUSTOMER, "customer_return_temp": 43.0}  # 2 K < 3 K
    r.scan(0.0, 0.0, vals=low)
    r.hold(60.0, 10.0, 0.0, vals=low)
    assert "METER:LOW-DT" not in r.conditions
    r.scan(10.0, 1.0, vals=low)
    assert "METER:LOW-DT" in r.conditions
    assert r.rows[DAY0]["low_dt_s"] == pytest.approx(70.0)
    r.scan(10.0, 1.1, vals=CUSTOMER)
    assert "METER:LOW-DT" not in r.conditions
    r.scan(10.0, 1.1, vals={**low, "customer_flow": 0.0})  # not delivering: no low dT
    assert r.rows[DAY0]["low_dt_s"] == pytest.approx(70.0)


def balance_vals(out_kw: float) -> dict[str, float]:
    """Primary side carrying about 180 kW of IT heat; the dry cooler takes out_kw of it."""
    return {
        "primary_flow": 25.0,
        "it_return_temp": 40.0,
        "it_supply_temp": 33.6,
        "reuse_valve_pos": 0.0,
        "hx_primary_out_temp": 40.0,
        "drycooler_out_temp": 40.0 - 6.4 * out_kw / 180.0,
        "tank_top_temp": 40.0,
        "tank_mid_temp": 38.0,
        "tank_bottom_temp": 35.0,
    }


def test_heat_balance_off_over_an_hour_is_raised() -> None:
    good, bad = Run(), Run()
    for r, share in ((good, 1.0), (bad, 0.7)):
        v = balance_vals(180.0 * share)
        r.scan(0.0, 0.0, vals=v)
        r.hold(2 * 3600.0, 0.0, 0.0, step=30.0, vals=v)
    assert "METER:BALANCE" not in good.conditions
    assert "METER:BALANCE" in bad.conditions
    assert "balance" in bad.rows[DAY0 + 3600.0 - 900.0]["flags"]
    row = good.rows[DAY0 + 3600.0]
    assert row["rejected_kwh"] == pytest.approx(row["it_heat_kwh"], rel=1e-9)


# ---- sums, view and the state as JSON ----


def test_every_covered_second_is_in_one_class_and_intervals_add_up_to_the_totals() -> None:
    r = Run()
    meter = r.hold(1000.0, 90.0, 0.0, vals=CUSTOMER)
    meter = r.hold(500.0, 0.0, meter, mode=Mode.LEAK_TRIP, **LEAK)
    meter = r.hold(700.0, 0.0, meter, mode=Mode.CUSTOMER_OFFLINE, ready=False)
    r.hold(1000.0, 90.0, meter, vals=CUSTOMER)
    v = m.view(r.state)
    for row in r.rows.values():
        assert sum(row["class_s"].values()) == pytest.approx(row["covered_s"])
        assert sum(row["mode_s"].values()) == pytest.approx(row["covered_s"])
    for key in m.ENERGIES:
        assert v["totals"][key] == pytest.approx(r.total(key))
    assert v["today"]["delivered_kwh"] == pytest.approx(v["totals"]["delivered_kwh"])
    assert v["meter_kwh"] == pytest.approx(meter + 90.0 * 1000.0 / 3600.0)
    assert v["reuse_fraction"] is None  # no IT power read
    assert v["interval_s"] == 900
    json.dumps(v, allow_nan=False)


def test_the_day_totals_start_again_at_utc_midnight() -> None:
    r = Run()
    r.scan(0.0, 0.0, wall=DAY0 - 600.0)
    meter = 0.0
    for k in range(1, 121):
        meter += 60.0 * 10.0 / 3600.0
        r.scan(10.0, meter, wall=DAY0 - 600.0 + 10.0 * k)
    v = m.view(r.state)
    assert v["totals"]["delivered_kwh"] == pytest.approx(20.0)
    assert v["today"]["delivered_kwh"] == pytest.approx(10.0)


def test_state_json_is_small_exact_and_continues_identically() -> None:
    a = Run()
    meter = a.hold(1000.0, 90.0, 0.0, vals=CUSTOMER)
    a.hold(300.0, 0.0, meter, mode=Mode.LEAK_TRIP, **LEAK)
    text = json.dumps(m.state_to_json(a.state), allow_nan=False)
    assert len(text) < 8000
    b = Run()
    b.state, b.t = m.state_from_json(CFG, json.loads(text)), a.t
    assert m.state_to_json(b.state) == m.state_to_json(a.state)
    for r in (a, b):
        r.hold(1200.0, 50.0, meter, vals=CUSTOMER)
    assert m.state_to_json(a.state) == m.state_to_json(b.state)


@pytest.mark.parametrize(
    ("change", "part"),
    [
        ({"version": 9}, "version"),
        ({"acc": [0.0] * 3}, "acc"),
        ({"life": [math.nan] * m.N_ACC}, "life[0]"),
        ({"meter_kwh": "12"}, "meter_kwh"),
        ({"meter_kwh": True}, "meter_kwh"),
        ({"next_id": 0}, "next_id"),
        ({"interruption": [1, "lunch", "x", 0.0, 0.0, 0.0]}, "interruption"),
        ({"interval_s": 300}, "interval_s"),
        ({"alarms": [[None, "x"]]}, "alarms"),
        ({"prev": [1.0, None]}, "prev"),
        ({"bal_missing": 0}, "bal_missing"),
        ({"interruption": [99, "trip", "x", 0.0, 0.0, 0.0]}, "interruption"),
        ({"flags": 1 << 20}, "flags"),
    ],
)
def test_a_malformed_state_is_refused_naming_the_part(change: dict[str, Any], part: str) -> None:
    r = Run()
    r.hold(100.0, 10.0, 0.0)
    d = {**m.state_to_json(r.state), **change}
    with pytest.raises(ValueError, match="meter state " + re.escape(part)):
        m.state_from_json(CFG, d)
    with pytest.raises(ValueError, match="meter state"):
        m.state_from_json(CFG, [1, 2])


def test_availability_formulas() -> None:
    cs = {c: 0.0 for c in m.CLASSES}
    assert m.availability_pct(cs) is None
    cs.update(available=90.0, fault=5.0, planned_maintenance=5.0, customer_side=1000.0)
    assert m.availability_pct(cs) == pytest.approx(90.0)
    assert m.availability_excl_planned_pct(cs) == pytest.approx(100 * 90 / 95)


def test_a_forced_meter_reading_is_never_billed() -> None:
    r = Run()
    r.scan(0.0, 100.0)
    r.t += 10.0
    forced = ProcessImage(
        {
            "heat_meter_energy": Sample(150.0, Quality.FORCED, r.t),
            "customer_ready": Sample(True, Quality.GOOD, r.t),
        }
    )
    r.state, out = m.step(r.state, CFG, forced, decision(r.t), Commands(), DAY0 + r.t)
    assert out.intervals[-1]["delivered_kwh"] == 0.0
    assert "meter_invalid" in out.intervals[-1]["flags"]
    assert r.state.meter_kwh == 100.0


def test_a_huge_wall_step_forward_emits_no_rows_for_the_skipped_time() -> None:
    """A PC that boots with its clock at 1970 and is set by NTP a scan later: one scan's work."""
    r = Run()
    r.scan(0.0, 0.0, wall=1000.0)
    out = r.scan(1.0, 0.001, wall=DAY0 + 5.0)
    assert [x["start_wall"] for x in out.intervals] == [900.0, DAY0]
    assert out.intervals[0]["closed"] and "clock" in out.intervals[0]["flags"]
    assert out.intervals[-1]["covered_s"] == pytest.approx(1.0)
    assert out.intervals[-1]["delivered_kwh"] == pytest.approx(0.001)
    assert r.state.open_start == DAY0


def test_a_gap_longer_than_the_bound_is_covered_only_up_to_it() -> None:
    cfg = MeteringConfig(interval_s=60)
    r = Run(cfg)
    r.scan(0.0, 0.0)
    gap = (m.MAX_GAP_INTERVALS + 500) * 60.0
    out = r.scan(gap, 77.0)
    assert len(out.intervals) <= m.MAX_GAP_INTERVALS + 2
    assert r.total("covered_s") == pytest.approx(m.MAX_GAP_INTERVALS * 60.0)
    assert r.total("delivered_kwh") == pytest.approx(77.0)  # the meter bridges it all
    assert "clock" in out.intervals[-1]["flags"]
