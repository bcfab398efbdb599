"""The metering core against the plant model in-process (as `heatloop study` runs them): billed
energy, the estimates and the interruptions against the plant's own ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from controller import metering as m
from controller.study import ClosedLoop, image_of
from plc_io import fluids
from plc_io.site import Site, demo_site
from sim import faults
from sim.plant import Accounts, accounts, measure, truth

SITE = demo_site()  # sensor noise on, as the study runs it
DAY0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400.0
DT_S = 20.0


def tank_kwh(site: Site, tr: dict[str, float]) -> float:
    """The buffer tank's true content over all its nodes (the meter sees three sensors)."""
    p = site.plant
    v = p.tank_volume_m3 / p.tank_nodes
    return (
        sum(
            v * fluids.vol_enthalpy_kj_m3(p.secondary_fluid, tr[f"tank_node_{i:02d}_temp_c"])
            for i in range(p.tank_nodes)
        )
        / 3600.0
    )


@dataclass
class Metered:
    """A closed loop with the meter stepped after each supervisor step, as the runtime does."""

    site: Site = SITE
    loop: ClosedLoop = field(init=False)
    state: m.MeterState = field(init=False)
    rows: dict[float, dict[str, Any]] = field(default_factory=dict)
    irows: dict[int, dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[dict[str, str], dict[str, float]]] = field(default_factory=list)
    first: tuple[Accounts, float] | None = None
    last: tuple[Accounts, float] | None = None

    def __post_init__(self) -> None:
        self.loop = ClosedLoop(self.site, dt_s=DT_S)
        self.state = m.new_state(self.site.metering)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / DT_S)):
            tr = truth(self.loop.state)
            self.last = (accounts(self.loop.state), tank_kwh(self.site, tr))
            if self.first is None:
                self.first = self.last
            meas, now = measure(self.loop.state), self.loop.elapsed_s
            self.loop.tick()
            self.state, out = m.step(
                self.state,
                self.site.metering,
                image_of(meas, now),
                self.loop.decision,
                self.loop.commands,
                DAY0 + now,
            )
            for r in out.intervals:
                self.rows[r["start_wall"]] = r
            for r in out.interruptions:
                self.irows[r["id"]] = r
            if out.conditions:
                self.seen.append((dict(out.conditions), tr))

    def truth_delta(self) -> tuple[Accounts, float]:
        assert self.first is not None and self.last is not None
        (a0, t0), (a1, t1) = self.first, self.last
        fields = ("it_heat_kwh", "captured_kwh", "delivered_kwh", "rejected_kwh", "stored_kwh")
        d = {f: getattr(a1, f) - getattr(a0, f) for f in fields}
        d["losses_kwh"] = a1.losses_kwh - a0.losses_kwh
        d["fan_energy_kwh"] = a1.fan_energy_kwh - a0.fan_energy_kwh
        return Accounts(**d, peak_it_supply_temp_c=a1.peak_it_supply_temp_c), t1 - t0


@pytest.fixture(scope="module", params=[None, 15.0], ids=["summer", "winter"])
def day(request: pytest.FixtureRequest) -> Metered:
    """A day of the demo site (starting on its own day 180), and a winter day."""
    site = SITE
    if request.param is not None:
        site = SITE.model_copy(update={"sim": SITE.sim.model_copy(update={"start_day": 15.0})})
    run = Metered(site)
    run.run(86400.0)
    return run


def test_billed_energy_is_the_plants_delivered_energy(day: Metered) -> None:
    # the simulated meter counts exactly what the plant delivered: agreement to round-off
    truth_, _ = day.truth_delta()
    v = m.view(day.state)["totals"]
    assert truth_.delivered_kwh > 500.0  # a day of real delivery, not an empty comparison
    assert v["delivered_kwh"] == pytest.approx(truth_.delivered_kwh, rel=1e-9)
    assert v["unbilled_kwh"] == 0.0


def test_cross_check_agrees_within_a_fraction_of_the_tolerance(day: Metered) -> None:
    # the plant evaluates rho*cp at the tank's mean temperature; the meter at the return
    # (density) and the mean of supply and return (cp): water's rho*cp moves ~0.03 %/K, so a
    # 10 K difference is ~0.3 %; sensor noise on a 15-minute interval adds well under 1 %
    tol = SITE.metering.crosscheck_tolerance_pct / 100.0
    # as the meter judges: whole intervals after the first reading, above the minimum energy
    judged = [
        r
        for r in day.rows.values()
        if r["closed"]
        and "meter_start" not in r["flags"]
        and max(r["delivered_kwh"], r["delivered_calc_kwh"]) >= SITE.metering.crosscheck_min_kwh
    ]
    assert len(judged) > 48
    for r in judged:
        big = max(r["delivered_kwh"], r["delivered_calc_kwh"])
        assert abs(r["delivered_kwh"] - r["delivered_calc_kwh"]) < 0.25 * tol * big
    assert all("crosscheck" not in r["flags"] for r in day.rows.values())


def test_estimates_against_the_plants_truth(day: Metered) -> None:
    truth_, tank_true = day.truth_delta()
    v = m.view(day.state)["totals"]
    # IT power is read directly: only the hold of one step's reading (ripple period 900 s)
    assert v["it_energy_kwh"] == pytest.approx(truth_.it_heat_kwh, rel=0.005)
    # heat into the liquid: flow x dT at the supply temperature's density; the plant uses the
    # loop mean (pg25 rho*cp ~0.03 %/K over a ~5 K difference) and loses ~1 % to the pipes
    assert v["it_heat_kwh"] == pytest.approx(truth_.captured_kwh, rel=0.01)
    # dry cooler: its inlet estimated from the valve position, the HX outlet and the rack
    # outlet (the plant mixes at the return header: the two differ by the pipe loss)
    assert v["rejected_kwh"] == pytest.approx(truth_.rejected_kwh, rel=0.02)
    # fans: the plant's own law (rated power x speed cubed) on the command in force
    assert v["fan_kwh"] == pytest.approx(truth_.fan_energy_kwh, rel=1e-6, abs=1e-9)
    # the tank from three sensors: its mean to within 1 K, i.e. one K of its heat capacity
    kwh_per_k = (
        SITE.metering.tank_volume_m3 * fluids.vol_heat_capacity_kj_m3k("water", 40.0) / 3600.0
    )
    assert abs(v["stored_kwh"] - tank_true) < kwh_per_k


def test_the_healthy_plant_raises_no_meter_alarm_but_a_true_low_dt(day: Metered) -> None:
    dt_min = SITE.metering.meter_dt_min_k
    for present, tr in day.seen:
        assert set(present) <= {"METER:LOW-DT"}, present
        # LOW-DT only when the plant's true customer dT is low (the sensors' noise is 0.05 K)
        assert tr["customer_supply_temp_c"] - tr["customer_return_temp_c"] < dt_min + 0.5


def test_the_healthy_day_is_available_but_for_the_start(day: Metered) -> None:
    v = m.view(day.state)
    cls = v["totals"]["class_s"]
    assert sum(cls.values()) == pytest.approx(day.loop.elapsed_s - DT_S)  # first scan to last
    # the only interruption: the start, before the supervisor first enters reuse
    (start,) = day.irows.values()
    assert start["cls"] == "fault" and start["detail"].split()[0] in (
        "STARTUP",
        "DRY_COOLER_REJECT",
    )
    assert cls["fault"] == pytest.approx(start["end_wall"] - start["start_wall"])
    assert cls["fault"] < 900.0  # start-up and the first dwell: minutes
    total = sum(cls.values())
    assert v["availability_pct"] == pytest.approx(100.0 * (total - cls["fault"]) / total)


def test_a_customer_outage_a_leak_trip_and_maintenance_are_classed() -> None:
    run = Metered()
    run.run(3 * 3600.0)
    lp = run.loop
    lp.state = faults.inject(lp.state, "customer_offline")
    run.run(1800.0)
    lp.state = faults.clear(lp.state, "customer_offline")
    run.run(3600.0)
    lp.state = faults.inject(lp.state, "leak", "reuse", 2.0)
    run.run(300.0)
    lp.state = faults.clear(lp.state, "leak", "reuse")
    run.run(600.0)
    lp.commands = replace(lp.commands, reset=True)
    run.run(3600.0)
    lp.commands = replace(lp.commands, maintenance=True)
    run.run(1200.0)
    lp.commands = replace(lp.commands, maintenance=False)
    run.run(3600.0)
    rows = [run.irows[i] for i in sorted(run.irows)]
    assert [(r["cls"], r["detail"]) for r in rows[1:]] == [
        ("customer_side", "customer not ready"),
        ("trip", "IL-04 latched"),
        ("planned_maintenance", "maintenance"),
    ]
    assert rows[0]["cls"] == "fault"  # the start
    assert all(r["end_wall"] is not None for r in rows)
    outage, trip, maint = rows[1:]
    # the outage lasts as long as the customer was away plus the dwell before reuse again
    assert 1800.0 <= outage["end_wall"] - outage["start_wall"] < 1800.0 + 900.0
    # the trip lasts from the leak through the reset to the re-entry into reuse
    assert 900.0 - DT_S <= trip["end_wall"] - trip["start_wall"] < 900.0 + 900.0
    # maintenance, then the wait to re-enter reuse after it (residual: still maintenance)
    assert 1200.0 - DT_S <= maint["end_wall"] - maint["start_wall"] < 1200.0 + 900.0
    for r in (outage, trip, maint):
        assert r["baseline_kw"] > 10.0
        dur_h = (r["end_wall"] - r["start_wall"]) / 3600.0
        assert r["lost_kwh"] == pytest.approx(
            max(0.0, r["baseline_kw"] * dur_h - r["delivered_during_kwh"])
        )
    cls = m.view(run.state)["totals"]["class_s"]
    for r in rows:
        assert cls[r["cls"]] == pytest.approx(r["end_wall"] - r["start_wall"])
    truth_, _ = run.truth_delta()
    assert m.view(run.state)["totals"]["delivered_kwh"] == pytest.approx(
        truth_.delivered_kwh, rel=1e-9
    )
