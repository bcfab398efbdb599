"""Closed-loop scenarios: the supervisor against the simulated plant, in-process on simulated time.

Invariant first: heat reuse never compromises server cooling. In every scan of every scenario
(checked by `Watch.tick`) some primary pump is commanded, a latched leak trip keeps the reuse
circuit isolated at interlock level, and a lost PLC link leaves the plant at the site's safe
values. On top of that each scenario asserts the DESIGN §12 figures a user would notice: the true
`it_supply_temp` (peak, time above the 45 °C limit, K·h), time from cause to safe state, modes
reached and when, heat delivered and the reuse fraction, blocked commands, mode changes.

Every expected value comes from physics, the site's parameters, or a reference policy run side by
side on the same plant (reuse always rejected: every watt to the dry cooler under the same fan
loop), never from a number read off an earlier run. Long spans use coarse scans (dt 5-10 s);
reaction times are judged at dt 1 s against the rules' required response times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from controller.arbitration import Level, Output
from controller.modes import REUSE_MODES, Mode
from controller.sequences import reuse_valve_pct
from controller.study import ClosedLoop
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from interlocks.rules import RULES_BY_ID
from plc_io.image import ProcessImage
from tests.unit.closed_loop_helpers import (
    HOLD_TOL_K,
    ISOLATED,
    LIMIT_C,
    NOISE_K,
    PEAK_TOL_K,
    SETPOINT_C,
    SITE,
    Watch,
    max_liquid_kw,
    plant_commands,
    rejecting,
    settled,
    site_with,
    tank_kwh_per_k,
)

CONTROL = SITE.control
PUMP_FAIL_S = SupervisorConfig.from_site(SITE).pump_fail_s


def supply(loop: ClosedLoop) -> float:
    return loop.state.it_supply_temp_c


def in_mode(mode: Mode) -> Callable[[ClosedLoop], bool]:
    return lambda loop: loop.mode is mode


def active(rule: str) -> Callable[[ClosedLoop], bool]:
    return lambda loop: loop.decision is not None and rule in loop.decision.active


# 1 ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_normal_day_reuses_heat_without_hunting_or_overheating() -> None:
    """A summer day from cold start: the servers are no warmer than with every watt sent to the
    dry cooler (the always-reject reference, same day, same seed), the pool gets all the heat it
    asks for while it is connected, nothing is blocked and the modes do not hunt."""
    dt = 10.0
    loop = ClosedLoop(SITE, dt_s=dt)
    w = Watch(loop)
    asked_kwh = [0.0]

    def demand(lp: ClosedLoop) -> None:
        v = lp.decision.values()
        if lp.mode in REUSE_MODES and v["customer_isolation_cmd"] is True:
            asked_kwh[0] += w.truth("customer_demand_kw") * dt / 3600.0

    w.run(24 * 3600.0, each=demand)
    r = loop.finish()
    ref = rejecting(ClosedLoop(SITE, dt_s=dt)).run(24 * 3600.0)

    assert r.above_limit_s == 0.0 and r.kelvin_hours == 0.0
    assert r.peak_supply_c <= ref.peak_supply_c + PEAK_TOL_K  # reuse never costs cooling
    # the pool is served in full while connected (the meter can never count more than it asks)
    assert asked_kwh[0] * 0.99 <= r.delivered_kwh <= asked_kwh[0] * 1.01
    assert ref.delivered_kwh == 0.0
    # reuse from the end of the start-up reject dwell to the end of the day, never left
    assert r.sim_s - r.reuse_s <= CONTROL.reject_dwell_s + 2 * dt
    assert r.blocked == 0
    assert [m for _, m in w.modes] == [Mode.DRY_COOLER_REJECT, Mode.NORMAL_REUSE]
    assert r.mode_changes == 2 and r.changes_per_h < CONTROL.hunting_changes_per_h
    assert not w.kinds("mode_hunting") and not r.trips and not r.interlock_s
    # the supply holds its setpoint through the night/day demand swing, not just on average
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K


# 2 ------------------------------------------------------------------------------------------


def test_customer_offline_isolates_customer_keeps_charging_and_returns_after_dwell() -> None:
    """Customer lost: isolated at once, the tank keeps charging while it has room, nothing is
    billed; customer back: NORMAL_REUSE only after the customer-ready dwell."""
    loop = settled(dt_s=5.0)
    w = Watch(loop)
    tank0 = sum(loop.state.tank_c)
    meter0 = w.truth("heat_meter_energy_kwh")

    w.inject("customer_offline")
    assert w.run_until(in_mode(Mode.CUSTOMER_OFFLINE), within_s=10.0) == 0.0
    assert w.output("customer_isolation_cmd") == (False, Level.SEQUENCE)
    assert w.output("secondary_pump_cmd") == (True, Level.SEQUENCE)
    assert w.output("reuse_isolation_cmd") == (True, Level.SEQUENCE)
    # the sequence's own rule at the tank bottom's true temperature, give or take the sensor noise
    seq = SupervisorConfig.from_site(SITE).sequence
    bottom = loop.state.tank_c[-1]
    lo, hi = (reuse_valve_pct(bottom + d, seq) for d in (HOLD_TOL_K, -HOLD_TOL_K))
    assert lo > seq.valve_min_pct  # room in the tank: charging
    assert lo <= w.output("reuse_valve_cmd")[0] <= hi
    hx_kwh = [0.0]
    w.run(
        3600.0,
        each=lambda lp: hx_kwh.__setitem__(0, hx_kwh[0] + w.truth("hx_kw") * loop.dt_s / 3600),
    )
    assert loop.mode is Mode.CUSTOMER_OFFLINE and len(w.modes) == 1
    # energy balance: the customer is isolated, so what the HX gave went into the tank, less
    # the tank's standing losses (30 W/K: a fraction of a kW against tens through the HX)
    n = len(loop.state.tank_c)
    gained_kwh = tank_kwh_per_k() * (sum(loop.state.tank_c) - tank0) / n
    assert hx_kwh[0] > 0.0
    assert 0.95 * hx_kwh[0] <= gained_kwh <= hx_kwh[0]
    assert w.truth("heat_meter_energy_kwh") == meter0  # isolated: the meter stood still
    assert loop.result.above_limit_s == 0.0
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K

    t_back = w.clear("customer_offline")
    # back to reuse: NORMAL_REUSE, or BUFFER_FULL when the tank filled while the customer was away
    back_s = w.run_until(
        lambda lp: lp.mode in (Mode.NORMAL_REUSE, Mode.BUFFER_FULL),
        within_s=CONTROL.customer_ready_dwell_s + 60,
    )
    assert back_s is not None
    # the dwell, then the next scan: no sooner, no later
    assert CONTROL.customer_ready_dwell_s <= back_s <= CONTROL.customer_ready_dwell_s + loop.dt_s
    assert len([m for t, m in w.modes if t >= t_back]) == 1  # nothing in between
    assert w.output("customer_isolation_cmd") == (True, Level.SEQUENCE)
    meter1 = w.truth("heat_meter_energy_kwh")
    w.run(600.0)
    # the pool asks for heat again: the meter counts it (at least half its demand in 10 min)
    assert w.truth("heat_meter_energy_kwh") - meter1 > 0.5 * w.truth("customer_demand_kw") / 6
    assert loop.result.above_limit_s == 0.0 and loop.result.blocked == 0


# 3 ------------------------------------------------------------------------------------------

# At the 35 °C setpoint the IT return is ~45 °C, so the demo tank can never reach its 60 °C full
# threshold; with 42 °C it fills in about an hour with the customer away, and on its own with a
# small pool (40 kW design, ~16 kW in summer) taking less than the tank is given.
FULL_SITE = site_with(tank_full_c=42.0)
SMALL_POOL_SITE = FULL_SITE.model_copy(
    update={"plant": FULL_SITE.plant.model_copy(update={"customer_design_kw": 40.0})}
)


def _fill_tank(w: Watch) -> float:
    """Customer away until charging stops near full; the time it took."""
    w.inject("customer_offline")
    stop_s = w.run_until(
        lambda lp: (
            lp.decision.values()["reuse_valve_cmd"] == 0.0
            and lp.decision.values()["secondary_pump_cmd"] is False
        ),
        within_s=3 * 3600.0,
    )
    assert stop_s is not None, "charging never stopped"
    return stop_s


def test_tank_fills_with_small_demand_buffer_full_holds_without_chatter() -> None:
    """More heat than the pool takes: the tank fills, NORMAL_REUSE gives way to BUFFER_FULL
    (HX flow cut to 25 %, surplus to the dry cooler, customer still served) and holds it; the tank
    stays far from IL-06 and the supply at its setpoint."""
    loop = settled(SMALL_POOL_SITE, dt_s=5.0)
    w = Watch(loop)
    full_c = SMALL_POOL_SITE.control.tank_full_c
    mean0 = sum(loop.state.tank_c) / len(loop.state.tank_c)
    took = w.run_until(in_mode(Mode.BUFFER_FULL), within_s=6 * 3600.0)
    assert took is not None
    # energy: a stratified tank whose bottom reads full is full throughout; it cannot get
    # there faster than all the servers' heat could bring it
    need_kwh = tank_kwh_per_k(SMALL_POOL_SITE) * (full_c - HOLD_TOL_K - mean0)
    assert took >= 3600.0 * need_kwh / max_liquid_kw(SMALL_POOL_SITE)
    assert w.output("reuse_valve_cmd") == (25.0, Level.SEQUENCE)
    assert w.output("customer_isolation_cmd") == (True, Level.SEQUENCE)
    assert w.output("secondary_pump_cmd") == (True, Level.SEQUENCE)

    top_over_return = [max(loop.state.tank_c) - w.truth("it_return_temp_c")]
    w.run(
        2 * 3600.0,
        each=lambda lp: top_over_return.append(max(lp.state.tank_c) - w.truth("it_return_temp_c")),
    )
    assert [m for _, m in w.modes] == [Mode.BUFFER_FULL]  # entered once, held: no chatter
    # physics: the tank is heated only by the primary, so never above the return
    assert max(top_over_return) <= 0.0
    assert "IL-06" not in loop.result.interlock_s and full_c < LIMIT_C < 85.0
    r = loop.result
    assert r.above_limit_s == 0.0 and r.blocked == 0
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K


def test_tank_fills_with_customer_away_charging_stops_near_full_cooling_held() -> None:
    """Customer away: the tank charges until its bottom reaches the full threshold, then charging
    stops (valve to bypass, secondary pump off) and the dry cooler alone holds the supply; with
    the customer back after its dwell, reuse resumes with the customer served."""
    loop = settled(FULL_SITE, dt_s=5.0)
    w = Watch(loop)
    full_c = FULL_SITE.control.tank_full_c
    mean0 = sum(loop.state.tank_c) / len(loop.state.tank_c)
    stop_s = _fill_tank(w)
    # energy: no faster than all the servers' heat could bring the whole tank to full
    need_kwh = tank_kwh_per_k(FULL_SITE) * (full_c - HOLD_TOL_K - mean0)
    assert stop_s >= 3600.0 * need_kwh / max_liquid_kw(FULL_SITE)
    assert loop.state.tank_c[-1] > full_c - HOLD_TOL_K  # stopped at full, not early
    assert loop.mode is Mode.CUSTOMER_OFFLINE

    top_over_return = [max(loop.state.tank_c) - w.truth("it_return_temp_c")]
    w.run(
        3600.0,
        each=lambda lp: top_over_return.append(max(lp.state.tank_c) - w.truth("it_return_temp_c")),
    )
    assert max(top_over_return) <= 0.0  # heated only by the primary: never above the return
    assert "IL-06" not in loop.result.interlock_s
    assert loop.result.above_limit_s == 0.0
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K

    t_back = w.clear("customer_offline")
    back_s = w.run_until(lambda lp: lp.mode is not Mode.CUSTOMER_OFFLINE, within_s=600.0)
    assert back_s is not None and back_s >= CONTROL.customer_ready_dwell_s
    # BUFFER_FULL when the tank bottom reads above the threshold, else NORMAL_REUSE
    assert loop.mode in (Mode.BUFFER_FULL, Mode.NORMAL_REUSE)
    assert w.output("customer_isolation_cmd") == (True, Level.SEQUENCE)
    w.run(1800.0)
    assert len([t for t, _ in w.modes if t >= t_back]) <= 2
    assert loop.result.above_limit_s == 0.0 and loop.result.blocked == 0


def test_tank_full_customer_offline_secondary_pump_does_not_chatter() -> None:
    """Near full with the customer away the secondary pump stays stopped: a pump must not start
    and stop with sensor noise (DESIGN §5: the plant never chatters)."""
    loop = settled(FULL_SITE, dt_s=5.0)
    w = Watch(loop)
    _fill_tank(w)
    starts = [0]
    last = [False]

    def count(lp: ClosedLoop) -> None:
        on = bool(lp.decision.values()["secondary_pump_cmd"])
        starts[0] += on and not last[0]
        last[0] = on

    w.run(3600.0, each=count)
    # Charging restarts only once the tank bottom has cooled by the hysteresis. With the customer
    # away the tank loses heat only to the plant room (tank_loss_w_k): cooling it by the
    # hysteresis takes far longer than this hour (and the noise is far smaller than it), so
    # the pump, stopped at full, does not start again.
    p = FULL_SITE.plant
    loss_kw = p.tank_loss_w_k / 1000.0 * (FULL_SITE.control.tank_full_c - p.plant_room_temp_c)
    cool_s = 3600.0 * tank_kwh_per_k(FULL_SITE) * CONTROL.tank_full_hysteresis_k / loss_kw
    assert cool_s > 3600.0 and CONTROL.tank_full_hysteresis_k > 6 * NOISE_K
    assert starts[0] == 0


# 4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("zone", "rule"), [("primary", "IL-05"), ("reuse", "IL-04")])
def test_leak_trips_isolates_reuse_latches_until_reset(zone: str, rule: str) -> None:
    """A wet leak sensor: LEAK_TRIP in the scan that sees it, reuse circuit isolated at interlock
    level, primary pumps still running; latched through drying until a deliberate reset, which
    leads to DRY_COOLER_REJECT, never straight back to reuse."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    flow0 = w.truth("primary_flow_m3h")

    t_leak = w.inject("leak", zone, 5.0)
    took = w.run_until(in_mode(Mode.LEAK_TRIP), within_s=5.0)
    assert took is not None and took <= RULES_BY_ID[rule].response_s  # the rule's requirement
    assert [(e.source, e.at_s) for e in w.kinds("trip_latched")] == [(rule, t_leak + took)]
    for name, value in ISOLATED.items():
        v, level = w.output(name)
        assert (v, level) == (value, Level.INTERLOCK)
        assert rule in loop.decision.outputs[name].why
    assert plant_commands(loop)["primary_pump_a_cmd"] is True
    w.run(60.0)  # the valve strokes shut in 60 s
    assert w.truth("primary_pump_a_running") == 1.0
    # primary pumps never stopped: the flow, set by the pumps alone, is what it was
    assert w.truth("primary_flow_m3h") == pytest.approx(flow0, rel=1e-9)
    assert w.truth("reuse_valve_pos_pct") == 0.0 and w.truth("secondary_flow_m3h") == 0.0
    w.run(540.0)

    w.reset()  # still wet: refused
    w.tick()
    assert loop.mode is Mode.LEAK_TRIP and rule in loop.decision.latched
    assert [e.source for e in w.kinds("reset_refused")] == [rule]

    w.clear("leak", zone)
    w.run(600.0)  # dry for 10 min: still latched
    assert loop.mode is Mode.LEAK_TRIP and loop.decision.latched == {rule}
    assert w.output("reuse_valve_cmd") == (0.0, Level.INTERLOCK)

    t_reset = w.now
    w.reset()
    w.tick()
    assert loop.mode is Mode.DRY_COOLER_REJECT
    assert not loop.decision.latched and rule not in loop.decision.active
    assert [e.source for e in w.kinds("trip_reset", t_reset)] == [rule]
    w.tick()
    assert loop.mode is Mode.DRY_COOLER_REJECT  # the reset alone never resumes reuse
    r = loop.result
    assert r.above_limit_s == 0.0 and r.blocked == 0
    assert r.peak_supply_c < LIMIT_C  # the trip's full fans only ever cooled more


def test_after_leak_reset_reuse_waits_for_reentry_and_reject_dwell() -> None:
    """A short leak, dried and reset: DRY_COOLER_REJECT holds for the reject dwell after the reset
    and reuse is not re-entered sooner than reuse_reentry_min_s after the leak pushed it out."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    t_leak = w.inject("leak", "reuse", 5.0)
    w.run(60.0)
    w.clear("leak", "reuse")
    w.run(60.0)
    t_reset = w.now
    w.reset()
    back_s = w.run_until(lambda lp: lp.mode in REUSE_MODES, within_s=1800.0)
    assert back_s is not None  # it does come back
    back_at = t_reset + back_s
    assert back_at - t_reset >= CONTROL.reject_dwell_s
    assert back_at - t_leak >= CONTROL.reuse_reentry_min_s


# 5 ------------------------------------------------------------------------------------------


def test_primary_pump_failure_hands_duty_to_standby_without_losing_flow() -> None:
    """Duty pump A trips: standby B is commanded within the failover time (the guard already in
    the scan that sees A stopped), primary flow holds, the supply stays at its setpoint and reuse
    continues."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    flow0 = w.truth("primary_flow_m3h")
    assert w.output("primary_pump_b_cmd")[0] is False

    flows: list[float] = []

    def b_commanded(lp: ClosedLoop) -> bool:
        flows.append(w.truth("primary_flow_m3h"))
        return lp.decision.values()["primary_pump_b_cmd"] is True

    t_fail = w.inject("pump_fail", "primary_pump_a")
    took = w.run_until(b_commanded, within_s=30.0)
    # the guard starts B in the scan that reads A stopped; IL-03 and the failover (pump_fail_s)
    # are the later lines of defence, so B is commanded within IL-03's delay at the latest
    assert took is not None and took <= RULES_BY_ID["IL-03"].delay_s
    w.run(PUMP_FAIL_S + 2.0, each=lambda lp: flows.append(w.truth("primary_flow_m3h")))
    assert w.output("primary_pump_b_cmd") == (True, Level.SEQUENCE)  # duty handed over
    blocked = loop.result.blocked
    # the guard held B once a scan, only until the failover took over after pump_fail_s
    assert blocked <= PUMP_FAIL_S / loop.dt_s + 2
    w.run(1800.0, each=lambda lp: flows.append(w.truth("primary_flow_m3h")))
    # never low enough for IL-03; and one pump at the same speed gives the same flow as before
    assert min(flows) >= SITE.interlocks.primary_flow_low_m3h
    assert w.truth("primary_flow_m3h") == pytest.approx(flow0, rel=1e-9)
    assert w.truth("primary_pump_b_running") == 1.0
    assert loop.result.blocked == blocked
    assert "IL-03" not in loop.result.interlock_s  # flow was never low
    assert [m for t, m in w.modes if t >= t_fail] == []  # still NORMAL_REUSE
    assert loop.result.above_limit_s == 0.0
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K


# 6 ------------------------------------------------------------------------------------------


def test_reuse_valve_stuck_open_is_detected_and_the_hx_taken_out() -> None:
    """The reuse valve sticks where it is during NORMAL_REUSE; then reuse is rejected. The
    valve's feedback no longer follows the command, so `reuse_valve_fault` is raised; stopping
    the secondary pump and closing the reuse isolation take the HX out all the same, and the
    dry cooler holds the setpoint."""
    loop = settled(dt_s=5.0)
    w = Watch(loop)
    w.inject("valve_stuck")
    stuck_at = w.truth("reuse_valve_pos_pct")
    assert stuck_at > 20.0
    t_rej = w.now
    loop.commands = replace(loop.commands, request_reject=True)  # BMS RequestReject(True)
    w.run(1800.0)
    assert loop.mode is Mode.DRY_COOLER_REJECT
    fault = w.kinds("reuse_valve_fault", since_s=t_rej)
    assert fault and fault[0].at_s - t_rej <= loop.sup.cfg.valve_follow_s + 2 * loop.dt_s
    assert w.output("reuse_valve_cmd") == (0.0, Level.SEQUENCE)
    assert w.truth("reuse_valve_pos_pct") == stuck_at  # still stuck open
    assert w.truth("secondary_flow_m3h") == 0.0 and abs(w.truth("hx_kw")) < 1.0
    r = loop.result
    assert r.above_limit_s == 0.0 and r.peak_supply_c < LIMIT_C
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K


def test_reuse_valve_stuck_closed_from_start_is_detected_and_reuse_rejected() -> None:
    """The valve sticks in bypass before reuse ever starts: its feedback never follows the
    command, the supervisor raises `reuse_valve_fault` and leaves reuse to the dry cooler,
    which alone holds the setpoint; the time does not count as heat-loop availability."""
    loop = ClosedLoop(SITE, dt_s=5.0)
    w = Watch(loop)
    w.inject("valve_stuck")
    w.run(3 * 3600.0)
    faults_seen = w.kinds("reuse_valve_fault")
    assert faults_seen, "a valve that never follows its command must be reported"
    first = faults_seen[0].at_s
    entered = next(t for t, m in w.modes if m is Mode.NORMAL_REUSE)
    # stroke 60 s, tolerance window 120 s: reported within the window after reuse began
    assert first - entered <= loop.sup.cfg.valve_follow_s + 2 * loop.dt_s
    assert any(m is Mode.DRY_COOLER_REJECT and t >= first for t, m in w.modes)
    assert w.truth("reuse_valve_pos_pct") == 0.0 and abs(w.truth("hx_kw")) < 1.0
    r = loop.finish()
    assert r.above_limit_s == 0.0 and r.peak_supply_c < LIMIT_C
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K
    # reuse is tried again at most every valve_retry_s, and each try lasts until the valve is
    # judged (valve_follow_s, plus a scan either side): that is all the availability there is
    cfg = loop.sup.cfg
    tries = 1 + r.sim_s // cfg.valve_retry_s
    assert r.reuse_s <= tries * (cfg.valve_follow_s + 2 * loop.dt_s)
    assert len(w.modes) / 3.0 < SITE.control.hunting_changes_per_h


# 7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["sensor_fail", "sensor_stuck"])
def test_supply_sensor_fault_fails_toward_cooling(fault: str) -> None:
    """`it_supply_temp` fails (NaN) or freezes: IL-02 acts within its delay (after the tag's
    frozen window for a stuck sensor), fans 100 %, the duty pump at its design speed; reuse goes
    on (the customer and the tank stay sinks); the true supply only ever falls."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    response_s = RULES_BY_ID["IL-02"].response_s  # required cause-to-effect time
    tag = SITE.tag("it_supply_temp")
    frozen_s = tag.frozen_s if tag.frozen_s is not None else SITE.interlocks.frozen_s
    window = frozen_s if fault == "sensor_stuck" else 0.0
    at_fault = supply(loop)
    peak_after = [at_fault]

    w.inject(fault, "it_supply_temp")
    took = w.run_until(active("IL-02"), within_s=window + 60.0)
    assert took is not None
    # A frozen reading cannot be told from a steady one before the window is over; it is judged
    # frozen one scan after it (the check is strict), then the rule's response time applies.
    slack = loop.dt_s if fault == "sensor_stuck" else 0.0
    assert window <= took <= window + response_s + slack
    assert loop.mode in REUSE_MODES
    for name, value in [
        ("drycooler_fan_cmd", 100.0),
        ("primary_pump_a_cmd", True),
        ("primary_pump_speed_cmd", CONTROL.primary_pump_speed_pct),
    ]:
        assert w.output(name) == (value, Level.INTERLOCK)
    assert w.output("customer_isolation_cmd") == (True, Level.INTERLOCK)  # the pool, a sink
    w.run(1200.0, each=lambda lp: peak_after.append(supply(lp)))
    assert "IL-02" in loop.decision.active and loop.mode in REUSE_MODES
    assert loop.result.above_limit_s == 0.0
    # a steady plant under full fans: the supply never rises above where the fault found it
    assert max(peak_after) <= at_fault + HOLD_TOL_K
    assert supply(loop) < SETPOINT_C  # overcooled on full fans, never hotter


# 8 ------------------------------------------------------------------------------------------


class _HxKeptOut(Supervisor):
    """The reference for the fan failure: the same supervisor with the HX path held shut, so
    the tank and the customer take nothing (what cooling would be without reuse as a sink)."""

    def step(self, image: ProcessImage, now_s: float, cmds: Commands | None = None) -> Decision:
        d = super().step(image, now_s, cmds or Commands())
        shut = {
            "reuse_valve_cmd": 0.0,
            "secondary_pump_cmd": False,
            "reuse_isolation_cmd": False,
            "customer_isolation_cmd": False,
        }
        outs = dict(d.outputs) | {k: Output(v, Level.GUARD, "reference") for k, v in shut.items()}
        return replace(d, outputs=outs)


def _hot_day_fan_failure(reference: bool = False) -> tuple[Watch, float]:
    loop = settled(dt_s=5.0)
    w = Watch(loop)
    w.inject("ambient_override", "", 35.0)
    w.run(3600.0)
    assert loop.mode is Mode.NORMAL_REUSE and not loop.result.interlock_s
    if reference:
        loop.sup.__class__ = _HxKeptOut  # same state, HX path shut from here on
    t_fail = w.inject("drycooler_fan_fail")
    return w, t_fail


@pytest.mark.slow
def test_dry_cooler_fan_failure_on_hot_day_puts_every_sink_in_service() -> None:
    """35 °C outside and the dry-cooler fans fail (natural draft only): the fault input is
    alarmed at once, the HX goes first; when the supply crosses the limit IL-01 acts within its
    delay with fans 100 %, the duty pump, the HX toward the tank and the customer path open,
    and the reuse mode keeps running (every sink in service)."""
    w, t_fail = _hot_day_fan_failure()
    loop = w.loop
    w.tick()
    assert [e.at_s for e in w.kinds("drycooler_failed", t_fail)] == [t_fail]  # its first scan
    cross = w.run_until(lambda lp: supply(lp) > LIMIT_C, within_s=2 * 3600.0)
    assert cross is not None
    took = w.run_until(active("IL-01"), within_s=60.0)
    assert took is not None
    # the rule's delay, plus a scan or two for the noisy reading (0.05 K) to stay above
    assert took <= RULES_BY_ID["IL-01"].delay_s + 2 * loop.dt_s
    assert loop.mode in REUSE_MODES
    forced = {
        "drycooler_fan_cmd": 100.0,
        "primary_pump_a_cmd": True,
        "reuse_valve_cmd": 100.0,
        "secondary_pump_cmd": True,
        "reuse_isolation_cmd": True,
        "customer_isolation_cmd": True,
    }
    tank_bottom, ret = loop.state.tank_c[-1], w.truth("it_return_temp_c")
    assert tank_bottom < ret  # the tank is a sink, so the HX is in service
    for name, value in forced.items():
        assert w.output(name) == (value, Level.INTERLOCK), name
    assert loop.result.blocked == 0


@pytest.mark.slow
def test_dry_cooler_fan_failure_on_hot_day_reuse_as_a_sink_cools_no_worse() -> None:
    """Side by side over four hours after the fan failure: with the HX (tank and customer) in
    service the servers are no worse off than with the HX path held shut; the HX really takes
    heat."""
    hx_kw: list[float] = []
    runs = []
    for reference in (False, True):
        w, _ = _hot_day_fan_failure(reference)
        peak = [supply(w.loop)]
        above = [0.0]

        def track(
            lp: ClosedLoop,
            peak: list[float] = peak,
            above: list[float] = above,
            ref: bool = reference,
            w: Watch = w,
        ) -> None:
            peak[0] = max(peak[0], supply(lp))
            above[0] += lp.dt_s if supply(lp) > LIMIT_C else 0.0
            if not ref:
                hx_kw.append(w.truth("hx_kw"))

        w.run(4 * 3600.0, each=track)
        runs.append((peak[0], above[0]))
    (peak, above), (ref_peak, ref_above) = runs
    assert max(hx_kw) > 0.0
    assert above <= ref_above
    assert peak <= ref_peak + PEAK_TOL_K


# 9 ------------------------------------------------------------------------------------------


def _load_step(load_kw: float, reference: bool) -> tuple[float, float, float, Watch]:
    """From a settled loop (reuse, or the always-reject reference settled the same way), step
    the IT load; return the peak supply after the step, the last time it was off the setpoint
    band, the step time, and the watch."""
    loop = rejecting(ClosedLoop(SITE, dt_s=2.0)) if reference else settled(dt_s=2.0)
    w = Watch(loop)
    if reference:
        w.run(3600.0)
    t_step = w.inject("it_load_step", "", load_kw)
    peak, last_off = [supply(loop)], [t_step]

    def track(lp: ClosedLoop) -> None:
        peak[0] = max(peak[0], supply(lp))
        if abs(supply(lp) - SETPOINT_C) > HOLD_TOL_K:
            last_off[0] = w.now

    w.run(3600.0, each=track)
    return peak[0], last_off[0], t_step, w


@pytest.mark.parametrize("load_kw", [300.0, 500.0])
def test_it_load_step_supply_recovers_to_setpoint(load_kw: float) -> None:
    """The IT load steps from 200 kW: side by side with the always-reject reference, reuse lets
    the supply peak no higher and brings it back to the setpoint band about as soon; reuse
    carries on."""
    peak, last_off, t_step, w = _load_step(load_kw, reference=False)
    ref_peak, ref_off, ref_step, _ = _load_step(load_kw, reference=True)
    loop = w.loop
    r = loop.result
    assert r.above_limit_s == 0.0
    assert peak <= ref_peak + PEAK_TOL_K
    # back in the band no later than the reference, give or take the fan loop's integral time:
    # under reuse the HX carried part of the old load, so the fans start from a lower integral
    assert last_off - t_step <= ref_off - ref_step + loop.sup.cfg.fan_ti_s
    assert abs(supply(loop) - SETPOINT_C) < HOLD_TOL_K
    # a bigger load fills the tank sooner: BUFFER_FULL is a reuse mode too
    assert loop.mode in (Mode.NORMAL_REUSE, Mode.BUFFER_FULL) and r.blocked == 0
    assert all(m in (Mode.NORMAL_REUSE, Mode.BUFFER_FULL) for _, m in w.modes)


# 10 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_s", "binding"),
    # a short loss: the re-entry time since leaving reuse binds; a long one: the reject dwell
    [(120.0, "reuse_reentry_min_s"), (600.0, "reject_dwell_s")],
)
def test_plc_link_loss_watchdog_safe_state_then_reject_then_reuse_after_dwell(
    loss_s: float, binding: str
) -> None:
    """The PLC link drops: IL-08 at once, the plant held at the site's safe values (the
    watchdog's; checked every scan), on return DRY_COOLER_REJECT, then reuse only after both the
    reject dwell (since the return) and the re-entry time (since reuse was left)."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    t_loss = w.link(False)
    w.tick()
    assert "IL-08" in loop.decision.active and loop.mode is Mode.DRY_COOLER_REJECT
    assert plant_commands(loop) == {
        k: v for k, v in SITE.safe_outputs().items() if k != "heartbeat"
    }
    w.run(loss_s - 1.0)
    assert w.truth("secondary_pump_running") == 0.0
    assert w.truth("primary_pump_a_running") == w.truth("primary_pump_b_running") == 1.0
    assert w.truth("reuse_valve_pos_pct") == 0.0  # stroked to bypass in 60 s

    t_back = w.link(True)
    w.tick()
    assert loop.mode is Mode.DRY_COOLER_REJECT and "IL-08" not in loop.decision.active
    assert [e.source for e in w.kinds("interlock_cleared", t_back)].count("IL-08") == 1
    back_s = w.run_until(in_mode(Mode.NORMAL_REUSE), within_s=1800.0)
    assert back_s is not None
    back_at = t_back + 1.0 + back_s
    assert back_at - t_back >= CONTROL.reject_dwell_s
    assert back_at - t_loss >= CONTROL.reuse_reentry_min_s
    # and no later than the binding one of the two (plus a scan or two)
    due = {
        "reject_dwell_s": t_back + CONTROL.reject_dwell_s,
        "reuse_reentry_min_s": t_loss + CONTROL.reuse_reentry_min_s,
    }[binding]
    assert back_at <= due + loop.dt_s  # the first scan at or after it
    r = loop.result
    assert r.above_limit_s == 0.0 and r.peak_supply_c < LIMIT_C and not r.trips


def test_a_study_wires_the_plant_from_its_own_site_file() -> None:
    """A site whose leak cable is supervised by a zone fault input must get that input from the
    simulated plant; without it the zone would read faulted and trip a healthy plant."""
    from sim import faults
    from tests.unit.test_plant_faults import ZONE_FAULT, supervised_site

    loop = ClosedLoop(supervised_site(), dt_s=1.0)
    loop.run(120.0)
    assert loop.decision is not None and loop.decision.mode is not Mode.LEAK_TRIP
    assert ZONE_FAULT not in loop.decision.invalid and "leak_reuse" not in loop.decision.invalid
    # and a cut cable trips the zone fault input, which latches the trip like a wet zone
    loop.state = faults.inject(loop.state, "sensor_fail", "leak_reuse")
    loop.run(5.0)
    assert loop.decision.mode is Mode.LEAK_TRIP and "IL-04" in loop.decision.latched
