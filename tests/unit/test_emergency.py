"""Fail toward cooling means more cooling, never less: emergency responses side by side with
normal control on the same plant, the same day and the same seed.

Each case runs a scenario from `sim/scenarios/` twice in-process: once with the fault (the
emergency response acts), once as the reference (normal control: healthy sensors, or a
controller that does not act on a dead dry cooler). The emergency run must be no worse in the
figures that matter for the servers (DESIGN §12): minutes with the true `it_supply_temp` above
its limit, K·h above it, and the peak. The tolerance on the peak is the supply sensor's noise
(two standard deviations, from the plant parameters): normal control regulates on a noisy
reading, the emergency response does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

import sim
from controller.study import ClosedLoop
from controller.supervisor import Supervisor
from interlocks.engine import Event
from interlocks.validation import Point
from plc_io.site import demo_site
from sim import fluids
from sim.plant import drycooler_effectiveness, truth
from sim.scenario import load_scenario

SITE = demo_site()
LIMIT_C = SITE.interlocks.it_supply_high_c
SCENARIOS = Path(sim.__file__).parent / "scenarios"
DT_S = 10.0  # the figures are over hours; 10 s scans resolve them (the plant's step is exact)
DAY_S = 86400.0
NOISE_TOL_K = 2.0 * SITE.plant.sensor_noise_temp_k
FAULT_AT_S = 7200.0  # every scenario here strikes two hours in
BOIL_C = 100.0  # no fluid temperature in the loop may exceed this, whatever the controller


def natural_draft_capacity_kw(ambient_c: float) -> float:
    """The most heat the dry cooler can reject on natural draft alone (fans dead) while its
    outlet, the servers' supply, stays at the limit: over every primary flow the pumps can give,
    with its inlet (the return) below boiling. From the plant's own parameters and its
    cross-flow e-NTU closed form; no controller can get more out of it."""
    p = SITE.plant
    rcp = fluids.vol_heat_capacity_kj_m3k(p.primary_fluid, LIMIT_C)
    air = p.drycooler_natural_draft_pct / 100.0
    ua, c_air = p.drycooler_ua_kw_k * air**0.8, p.drycooler_air_kw_k * air
    max_flow_m3s = p.primary_design_flow_m3h * p.primary_two_pump_flow_factor / 3600.0
    best = 0.0
    for i in range(1, 501):
        cp = rcp * max_flow_m3s * i / 500
        k = drycooler_effectiveness(ua, cp, c_air) * min(cp, c_air)
        t_in = ambient_c + (LIMIT_C - ambient_c) / (1.0 - k / cp) if k < cp else math.inf
        t_in = min(t_in, BOIL_C)  # outlet at or below the limit, inlet at or below boiling
        best = max(best, k * (t_in - ambient_c))
    return best


def losses_bound_kw() -> float:
    """Pipe and tank losses to the plant room with every node at boiling: an upper bound."""
    p = SITE.plant
    return (p.primary_loss_w_k + p.tank_loss_w_k) / 1000.0 * (BOIL_C - p.plant_room_temp_c)


@dataclass(frozen=True)
class Figures:
    peak_c: float
    above_s: float
    kelvin_hours: float
    events: tuple[Event, ...]
    min_ambient_c: float
    max_demand_kw: float
    min_it_liquid_kw: float
    delivered_kwh: float


class NoDryCoolerWatch(Supervisor):
    """Normal control as it was: the dry cooler's fault input and outlet are not acted on."""

    def _watch_drycooler(self, points: dict[str, Point], now_s: float) -> list[Event]:
        return []


def run(name: str, seconds: float = DAY_S, *, reference: bool = False) -> Figures:
    loop = ClosedLoop(SITE, scenario=load_scenario(SCENARIOS / f"{name}.toml"), dt_s=DT_S)
    if reference:
        loop.sup = NoDryCoolerWatch(loop.sup.cfg, 0.0)
    events: list[Event] = []
    amb, demand, liquid = math.inf, 0.0, math.inf
    while loop.elapsed_s < seconds - 1e-9:
        loop.tick()
        assert loop.decision is not None
        events += loop.decision.events
        if loop.elapsed_s > FAULT_AT_S:
            t = truth(loop.state)
            amb = min(amb, t["ambient_temp_c"])
            demand = max(demand, t["customer_demand_kw"] * (t["customer_ready"] > 0.5))
            liquid = min(liquid, t["it_liquid_kw"])
    r = loop.finish()
    return Figures(
        r.peak_supply_c,
        r.above_limit_s,
        r.kelvin_hours,
        tuple(events),
        amb,
        demand,
        liquid,
        r.delivered_kwh,
    )


@pytest.fixture(scope="module")
def healthy() -> Figures:
    return run("hot_day_healthy")


def assert_no_worse(emergency: Figures, reference: Figures) -> None:
    assert emergency.above_s <= reference.above_s, (emergency, reference)
    assert emergency.kelvin_hours <= reference.kelvin_hours + 1e-9
    assert emergency.peak_c <= reference.peak_c + NOISE_TOL_K


def test_hot_day_reference_holds_the_limit(healthy: Figures) -> None:
    """The reference itself: 420 kW on a 38 °C day is within the plant's means with every sink in
    service and normal control (the comparison below is against a run that copes)."""
    assert healthy.above_s == 0.0 and healthy.peak_c < LIMIT_C


@pytest.mark.parametrize("fault", ["failed", "stuck"])
def test_supply_sensor_fault_on_a_hot_day_keeps_the_customer_and_tank_as_sinks(
    fault: str, healthy: Figures
) -> None:
    """Under IL-02 the customer stays served: the meter counts what normal control delivers
    (within 1 %). The old response (reject mode, customer isolated) delivered 5 % of it and
    left the servers above the limit for most of the day."""
    emergency = run(f"hot_day_supply_{fault}")
    assert abs(emergency.delivered_kwh - healthy.delivered_kwh) <= 0.01 * healthy.delivered_kwh


# IL-01/IL-02 hold the duty pump at its design speed: on this plant more primary flow makes the
# air-limited dry cooler's outlet (the servers' supply) warmer (e-NTU: supply - ambient grows
# as (1 - eps) / (eps * cp) with the flow), so "both pumps at 100 %" cooled worse than normal
# control (45.06 °C, 2 min above the limit against 43.13 °C, 0 min) until the table changed.
@pytest.mark.parametrize("fault", ["failed", "stuck"])
def test_supply_sensor_fault_on_a_hot_day_cools_no_worse_than_normal_control(
    fault: str, healthy: Figures
) -> None:
    """The supply sensor fails (NaN: IL-02 at once) or sticks at its last reading as 420 kW and
    38 °C arrive. IL-02 keeps every sink in service (the reuse mode keeps running, the customer
    stays open): the servers are no worse off than under normal control with a healthy sensor."""
    emergency = run(f"hot_day_supply_{fault}")
    assert any(e.kind == "interlock_active" and e.source == "IL-02" for e in emergency.events)
    assert_no_worse(emergency, healthy)


@pytest.mark.parametrize("customer", ["online", "offline"])
def test_dead_dry_cooler_puts_the_hx_first_and_cools_no_worse(customer: str) -> None:
    """The dry-cooler fans die (natural draft only). The fault input is read and alarmed once,
    the HX becomes the first sink (full flow, not throttled by the tank-full policy) while the
    reuse circuit's protections allow, and the servers are no worse off than with normal control
    that ignores the dead cooler."""
    name = f"dead_drycooler_customer_{customer}"
    emergency = run(name)
    reference = run(name, reference=True)
    failed = [e for e in emergency.events if e.kind == "drycooler_failed"]
    assert len(failed) == 1 and failed[0].at_s >= FAULT_AT_S
    assert failed[0].detail["why"] == "drycooler_fault input"
    assert emergency.above_s <= reference.above_s
    assert emergency.peak_c <= reference.peak_c + NOISE_TOL_K
    if customer == "online":
        # the pool's 60 kW plus natural draft at the coldest hour come within a few kW of the
        # servers' heat: the steady-state balance below does not prove the crossing
        # unavoidable with the customer online, so only the side-by-side comparison holds
        return
    # Physics: even at the coldest hour after the failure, the most the natural draft, the
    # customer (at its highest demand) and the losses can take with the supply at the limit is
    # less than the servers put into the loop. No controller can hold the limit for good; only
    # the stored heat capacity delays the crossing, so minutes above the limit are unavoidable.
    sinks_kw = (
        natural_draft_capacity_kw(emergency.min_ambient_c)
        + emergency.max_demand_kw
        + losses_bound_kw()
    )
    assert emergency.min_it_liquid_kw > sinks_kw, (emergency.min_it_liquid_kw, sinks_kw)
    assert emergency.above_s > 0.0
