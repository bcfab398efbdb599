"""Closed-loop scenarios: the supervisor against the simulated plant, in-process on simulated time.

Invariant first: heat reuse never compromises server cooling. In every scan of every scenario
(checked by `Watch.tick`) some primary pump is commanded, a latched leak trip keeps the reuse
circuit isolated at interlock level, and a lost PLC link leaves the plant at the site's safe
values. On top of that each scenario asserts the DESIGN §12 figures a user would notice: the true
`it_supply_temp` (peak, time above the 45 °C limit, K·h), time from cause to safe state, modes
reached and when, heat delivered and the reuse fraction, blocked commands, mode changes.

Figures quoted in comments were measured on the demo site (day 180, seed 0, sensor noise on).
Long spans use coarse scans (dt 5 s); reaction times are measured at dt 1 s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from controller.arbitration import Level
from controller.modes import REUSE_MODES, Mode
from controller.study import ClosedLoop
from controller.supervisor import SupervisorConfig
from interlocks.rules import RULES_BY_ID
from tests.unit.closed_loop_helpers import (
    ISOLATED,
    LIMIT_C,
    SETPOINT_C,
    SITE,
    Watch,
    plant_commands,
    settled,
    site_with,
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
    """A summer day from cold start: the servers stay at their setpoint, a quarter of the IT heat
    reaches the pool, nothing is blocked and the modes do not hunt."""
    loop = ClosedLoop(SITE, dt_s=5.0)
    w = Watch(loop)
    w.run(24 * 3600.0)
    r = loop.finish()

    assert r.above_limit_s == 0.0 and r.kelvin_hours == 0.0
    assert r.peak_supply_c < SETPOINT_C + 1.0  # measured 35.11 °C
    # measured 25.7 % (1233 of 4800 kWh): summer pool demand is 60 kW occupied, 30 kW at night
    assert r.reuse_fraction > 0.24
    assert r.delivered_kwh > 1150.0
    assert r.availability > 0.98  # measured 99.3 %: only the 600 s start-up reject dwell
    assert r.blocked == 0
    assert [m for _, m in w.modes] == [Mode.DRY_COOLER_REJECT, Mode.NORMAL_REUSE]
    assert r.mode_changes == 2 and r.changes_per_h < CONTROL.hunting_changes_per_h
    assert not w.kinds("mode_hunting") and not r.trips and not r.interlock_s
    # the supply holds its setpoint through the night/day demand swing, not just on average
    assert abs(supply(loop) - SETPOINT_C) < 0.3


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
    assert w.output("reuse_valve_cmd")[0] > 50.0  # tank bottom ~37 °C: plenty of room
    w.run(3600.0)
    assert loop.mode is Mode.CUSTOMER_OFFLINE and len(w.modes) == 1
    assert sum(loop.state.tank_c) / len(loop.state.tank_c) > tank0 / len(loop.state.tank_c) + 2.0
    assert w.truth("heat_meter_energy_kwh") - meter0 < 0.5  # the meter stood still
    assert loop.result.peak_supply_c < SETPOINT_C + 1.0  # measured 35.1 °C

    t_back = w.clear("customer_offline")
    # back to reuse: NORMAL_REUSE, or BUFFER_FULL when the tank filled while the customer was away
    back_s = w.run_until(
        lambda lp: lp.mode in (Mode.NORMAL_REUSE, Mode.BUFFER_FULL),
        within_s=CONTROL.customer_ready_dwell_s + 60,
    )
    assert back_s is not None
    assert CONTROL.customer_ready_dwell_s <= back_s <= CONTROL.customer_ready_dwell_s + 5.0
    assert len([m for t, m in w.modes if t >= t_back]) == 1  # nothing in between
    assert w.output("customer_isolation_cmd") == (True, Level.SEQUENCE)
    meter1 = w.truth("heat_meter_energy_kwh")
    w.run(600.0)
    assert w.truth("heat_meter_energy_kwh") - meter1 > 5.0  # ~60 kW to the pool again
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
    took = w.run_until(in_mode(Mode.BUFFER_FULL), within_s=4 * 3600.0)
    assert took is not None  # measured 2.5 h after the warm-up
    assert w.output("reuse_valve_cmd") == (25.0, Level.SEQUENCE)
    assert w.output("customer_isolation_cmd") == (True, Level.SEQUENCE)
    assert w.output("secondary_pump_cmd") == (True, Level.SEQUENCE)

    peak_top = [max(loop.state.tank_c)]
    w.run(2 * 3600.0, each=lambda lp: peak_top.append(max(lp.state.tank_c)))
    assert [m for _, m in w.modes] == [Mode.BUFFER_FULL]  # entered once, held: no chatter
    assert max(peak_top) < full_c + 2.0  # measured 43.1 °C after 2 h; IL-06 acts at 85 °C
    assert "IL-06" not in loop.result.interlock_s
    r = loop.result
    assert r.peak_supply_c < SETPOINT_C + 1.0 and r.above_limit_s == 0.0 and r.blocked == 0
    assert abs(supply(loop) - SETPOINT_C) < 0.5


def test_tank_fills_with_customer_away_charging_stops_near_full_cooling_held() -> None:
    """Customer away: the tank charges until its bottom reaches the full threshold, then charging
    stops (valve to bypass, secondary pump off) and the dry cooler alone holds the supply; with
    the customer back after its dwell, reuse resumes with the customer served."""
    loop = settled(FULL_SITE, dt_s=5.0)
    w = Watch(loop)
    stop_s = _fill_tank(w)
    assert stop_s > 1800.0  # measured ~65 min of charging
    full_c = FULL_SITE.control.tank_full_c
    assert loop.state.tank_c[-1] > full_c - 0.5  # stopped near full, not early
    assert loop.mode is Mode.CUSTOMER_OFFLINE

    peak_top = [max(loop.state.tank_c)]
    w.run(3600.0, each=lambda lp: peak_top.append(max(lp.state.tank_c)))
    assert max(peak_top) < full_c + 2.0  # measured 42.6 °C; IL-06 acts at 85 °C
    assert "IL-06" not in loop.result.interlock_s
    assert loop.result.peak_supply_c < SETPOINT_C + 1.0 and loop.result.above_limit_s == 0.0
    assert abs(supply(loop) - SETPOINT_C) < 0.5

    t_back = w.clear("customer_offline")
    back_s = w.run_until(lambda lp: lp.mode is not Mode.CUSTOMER_OFFLINE, within_s=600.0)
    assert back_s is not None and back_s >= CONTROL.customer_ready_dwell_s
    # BUFFER_FULL when the tank bottom reads above the threshold (as measured), else NORMAL_REUSE
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
    assert starts[0] <= 2  # measured 64 starts in the hour (128 changes)


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
    assert took is not None and took <= 1.0  # measured 0 s: the first scan that reads it wet
    assert [(e.source, e.at_s) for e in w.kinds("trip_latched")] == [(rule, t_leak + took)]
    for name, value in ISOLATED.items():
        v, level = w.output(name)
        assert (v, level) == (value, Level.INTERLOCK)
        assert rule in loop.decision.outputs[name].why
    assert plant_commands(loop)["primary_pump_a_cmd"] is True
    w.run(60.0)  # the valve strokes shut in 60 s
    assert w.truth("primary_pump_a_running") == 1.0
    assert w.truth("primary_flow_m3h") >= 0.95 * flow0  # primary pumps never stopped
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
    assert r.above_limit_s == 0.0 and r.peak_supply_c < SETPOINT_C + 1.0  # measured 33.98 °C
    assert r.blocked == 0


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
    back_at = t_reset + back_s  # measured: t_leak + 180 s
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
    # measured 0 s: the guard starts B in the scan that reads A stopped; IL-03 (5 s) and the
    # failover (pump_fail_s, 10 s) are the later lines of defence
    assert took is not None and took <= RULES_BY_ID["IL-03"].delay_s
    w.run(PUMP_FAIL_S + 2.0, each=lambda lp: flows.append(w.truth("primary_flow_m3h")))
    assert w.output("primary_pump_b_cmd") == (True, Level.SEQUENCE)  # duty handed over
    blocked = loop.result.blocked
    assert blocked <= PUMP_FAIL_S + 2  # the guard held B only until the failover took over
    w.run(1800.0, each=lambda lp: flows.append(w.truth("primary_flow_m3h")))
    assert min(flows) >= 0.95 * flow0  # measured: no dip at all
    assert w.truth("primary_pump_b_running") == 1.0
    assert loop.result.blocked == blocked
    assert "IL-03" not in loop.result.interlock_s  # flow was never low
    assert [m for t, m in w.modes if t >= t_fail] == []  # still NORMAL_REUSE
    assert loop.result.above_limit_s == 0.0
    assert abs(supply(loop) - SETPOINT_C) < 0.5


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
    assert r.above_limit_s == 0.0 and r.peak_supply_c < SETPOINT_C + 1.0
    assert abs(supply(loop) - SETPOINT_C) < 0.5


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
    assert r.above_limit_s == 0.0 and r.peak_supply_c < SETPOINT_C + 1.0
    assert abs(supply(loop) - SETPOINT_C) < 0.5
    assert r.availability < 0.5  # re-tries after each anti-hunting interval, no more
    assert len(w.modes) / 3.0 < SITE.control.hunting_changes_per_h


# 7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["sensor_fail", "sensor_stuck"])
def test_supply_sensor_fault_fails_toward_cooling(fault: str) -> None:
    """`it_supply_temp` fails (NaN) or freezes: IL-02 acts within its delay (after the frozen
    window for a stuck sensor), fans 100 %, both primary pumps at full speed, reuse rejected;
    the true supply stays within limits throughout."""
    loop = settled(dt_s=1.0)
    w = Watch(loop)
    response_s = RULES_BY_ID["IL-02"].response_s  # required cause-to-effect time, 1 s
    window = SITE.interlocks.frozen_s if fault == "sensor_stuck" else 0.0

    w.inject(fault, "it_supply_temp")
    took = w.run_until(active("IL-02"), within_s=window + 60.0)
    assert took is not None
    # measured: 1 s for NaN; 602 s for frozen (judged frozen one scan after the 600 s window,
    # the check being strict, then the 1 s delay). A frozen reading cannot be told from a steady
    # one before the window is over.
    slack = loop.dt_s if fault == "sensor_stuck" else 0.0
    assert window <= took <= window + response_s + slack
    assert loop.mode is Mode.DRY_COOLER_REJECT
    for name, value in [
        ("drycooler_fan_cmd", 100.0),
        ("primary_pump_a_cmd", True),
        ("primary_pump_b_cmd", True),
        ("primary_pump_speed_cmd", 100.0),
    ]:
        assert w.output(name) == (value, Level.INTERLOCK)
    w.run(1200.0)
    assert "IL-02" in loop.decision.active
    r = loop.result
    assert r.above_limit_s == 0.0
    assert r.peak_supply_c < SETPOINT_C + 1.0  # measured 34.0 (fail) / 34.6 °C (stuck window)
    assert supply(loop) < SETPOINT_C  # overcooled on full fans, never hotter


# 8 ------------------------------------------------------------------------------------------


def _hot_day_fan_failure() -> tuple[Watch, float]:
    loop = settled(dt_s=5.0)
    w = Watch(loop)
    w.inject("ambient_override", "", 35.0)
    w.run(3600.0)
    assert loop.mode is Mode.NORMAL_REUSE and not loop.result.interlock_s
    assert loop.result.peak_supply_c < 38.0  # measured 36.9 °C on full fans: hot but coping
    t_fail = w.inject("drycooler_fan_fail")
    return w, t_fail


@pytest.mark.slow
def test_dry_cooler_fan_failure_on_hot_day_puts_every_sink_in_service() -> None:
    """35 °C outside and the dry-cooler fans fail (natural draft only): the supply crosses the
    limit, IL-01 acts within its delay, fans 100 %, both primary pumps at 100 %, HX in service
    toward the tank. The plant cannot reject 180 kW this way: the minutes above the limit are
    reported as measured."""
    w, t_fail = _hot_day_fan_failure()
    loop = w.loop
    cross = w.run_until(lambda lp: supply(lp) > LIMIT_C, within_s=2 * 3600.0)
    assert cross is not None  # measured ~14 min after the fans stopped
    took = w.run_until(active("IL-01"), within_s=60.0)
    assert took is not None
    assert took <= RULES_BY_ID["IL-01"].delay_s + 2 * loop.dt_s  # the sensor is noisy by 0.05 K
    assert loop.mode is Mode.DRY_COOLER_REJECT
    forced = {
        "drycooler_fan_cmd": 100.0,
        "primary_pump_a_cmd": True,
        "primary_pump_b_cmd": True,
        "primary_pump_speed_cmd": 100.0,
        # tank bottom ~43 °C, return ~55 °C: the HX is a sink
        "reuse_valve_cmd": 100.0,
        "secondary_pump_cmd": True,
        "reuse_isolation_cmd": True,
    }
    for name, value in forced.items():
        assert w.output(name) == (value, Level.INTERLOCK), name
    w.run(t_fail + 4 * 3600.0 - w.now)
    assert "IL-01" in loop.decision.active and loop.result.blocked == 0
    r = loop.result
    # Honest figures (4 h after the fan failure): measured 219.6 min above 45 °C, 187.6 K·h,
    # peak 112.5 °C; see the xfail test below for why the tank does not help.
    print(
        f"fan failure on a 35 °C day: {r.above_limit_s / 60:.1f} min above {LIMIT_C:g} °C, "
        f"{r.kelvin_hours:.1f} K·h, peak {r.peak_supply_c:.1f} °C"
    )
    assert r.above_limit_s > 0.0


@pytest.mark.slow
def test_dry_cooler_fan_failure_on_hot_day_tank_absorbs_heat() -> None:
    """Under IL-01 the tank really takes heat: the secondary pump runs at a real speed, the HX
    carries heat, and the peak stays below the bound measured with the HX flowing."""
    w, t_fail = _hot_day_fan_failure()
    loop = w.loop
    assert w.run_until(active("IL-01"), within_s=2 * 3600.0) is not None
    w.run(600.0)
    assert w.output("secondary_pump_cmd")[0] is True
    assert w.output("secondary_pump_speed_cmd")[0] > 0.0
    assert w.truth("hx_kw") > 20.0
    w.run(t_fail + 4 * 3600.0 - w.now)
    # with secondary_pump_speed_cmd forced to 100 % under IL-01: peak 74.2 °C, 57 K·h
    assert loop.result.peak_supply_c < 76.0


# 9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load_kw", "peak_c"),
    [(300.0, 35.18), (500.0, 35.41)],  # measured peaks
)
def test_it_load_step_supply_recovers_to_setpoint(load_kw: float, peak_c: float) -> None:
    """The IT load steps from 200 kW: the fans pick it up, the supply never leaves the setpoint
    by more than a few tenths and is back within 0.3 K in 15 min; reuse carries on."""
    loop = settled(dt_s=2.0)
    w = Watch(loop)
    fan0 = w.output("drycooler_fan_cmd")[0]
    t_step = w.inject("it_load_step", "", load_kw)
    last_off = [t_step]

    def track(lp: ClosedLoop) -> None:
        if supply(lp) > SETPOINT_C + 0.3:
            last_off[0] = w.now

    w.run(3600.0, each=track)
    r = loop.result
    assert r.above_limit_s == 0.0
    assert r.peak_supply_c < peak_c + 0.1
    assert last_off[0] - t_step <= 15 * 60.0  # measured 0 (300 kW) / 8.9 min (500 kW)
    assert abs(supply(loop) - SETPOINT_C) < 0.3
    assert w.output("drycooler_fan_cmd")[0] > fan0 + 5.0
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
    assert back_at <= due + 2.0  # measured: at `due` + 1 s
    r = loop.result
    assert r.above_limit_s == 0.0 and r.peak_supply_c < SETPOINT_C + 1.0 and not r.trips
