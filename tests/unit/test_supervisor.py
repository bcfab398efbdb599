"""The supervisor step on hand-built images: runtime faults, refused requests, pumps, events.

Each test drives a `Supervisor` scan by scan on a fake clock (the scan time is an argument) and
asserts the whole decision a user would see: reject reasons, events, outputs and their levels.
"""

from __future__ import annotations

import math

from controller.arbitration import Level, Manual
from controller.journal import event_row
from controller.modes import REUSE_MODES, Mode
from controller.supervisor import DC_FOLLOW_S, Commands, Decision, Supervisor, SupervisorConfig
from plc_io.image import Quality, Sample
from tests.unit.core_helpers import CFG, live, plant_like
from tests.unit.core_helpers import SITE as CFG_SITE


def reusing(now_s: float = 0.0) -> tuple[Supervisor, float]:
    """A supervisor driven on a healthy image until it reuses heat; returns it and the time."""
    sup = Supervisor(CFG, now_s)
    t, d = now_s, None
    while sup.mode is not Mode.NORMAL_REUSE:
        d = sup.step(plant_like(t, d), t)
        t += 1.0
        assert t < 10_000.0, "never reached NORMAL_REUSE"
    return sup, t


def kinds(d: Decision, kind: str) -> list[dict[str, object]]:
    return [dict(e.detail) for e in d.events if e.kind == kind]


# ---- Commands.write_failed and Commands.degraded (filled by the runtime) -------------------


def test_unacknowledged_writes_reject_reuse_with_one_event_per_change() -> None:
    sup, t = reusing()
    failed = frozenset({"secondary_pump_cmd", "heartbeat"})
    d = sup.step(live(t), t, Commands(write_failed=failed))
    assert "outputs not acknowledged: heartbeat, secondary_pump_cmd" in d.reject_reasons
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert kinds(d, "write_failed") == [{"outputs": ["heartbeat", "secondary_pump_cmd"]}]
    # the same set next scan: no new event
    d = sup.step(live(t + 1), t + 1, Commands(write_failed=failed))
    assert not kinds(d, "write_failed") and d.reject_reasons
    # a different set: one event
    d = sup.step(live(t + 2), t + 2, Commands(write_failed=frozenset({"heartbeat"})))
    assert kinds(d, "write_failed") == [{"outputs": ["heartbeat"]}]
    d = sup.step(live(t + 3), t + 3, Commands())
    assert kinds(d, "write_recovered") == [{"was": ["heartbeat"]}]
    assert not any("not acknowledged" in r for r in d.reject_reasons)
    d = sup.step(live(t + 4), t + 4, Commands())
    assert not kinds(d, "write_recovered")


def test_degraded_runtime_rejects_reuse_with_its_text_and_one_event_each_way() -> None:
    sup, t = reusing()
    cmds = Commands(degraded=("journal cannot persist",))
    d = sup.step(live(t), t, cmds)
    assert "journal cannot persist" in d.reject_reasons
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert kinds(d, "degraded") == [{"faults": ["journal cannot persist"]}]
    d = sup.step(live(t + 1), t + 1, cmds)
    assert not kinds(d, "degraded")
    d = sup.step(live(t + 2), t + 2, Commands())
    assert kinds(d, "degraded_cleared") == [{"was": ["journal cannot persist"]}]
    assert "journal cannot persist" not in d.reject_reasons


# ---- requests are checked against their tags before arbitration ----------------------


def test_manual_of_wrong_type_or_range_is_refused_once_and_never_written() -> None:
    """A manual reuse valve of 250 %, "abc", NaN, a boolean on an analogue output, an expiry
    beyond max_force_s: each is refused with an event naming tag, value and why, and the output
    stays with the sequence. ("abc" raised TypeError inside arbitration before.)"""
    max_s = CFG.max_force_s
    cases: list[tuple[object, float]] = [
        (250.0, 60.0),
        ("abc", 60.0),
        (float("nan"), 60.0),
        (True, 60.0),
        (50.0, max_s + 60.0),
    ]
    for value, ahead in cases:
        sup, t = reusing()
        manual = {"reuse_valve_cmd": Manual(value, t + ahead, "eng")}  # type: ignore[arg-type]
        d = sup.step(live(t), t, Commands(manual=manual))
        out = d.outputs["reuse_valve_cmd"]
        assert out.level is Level.SEQUENCE, value
        refused = kinds(d, "command_refused")
        assert len(refused) == 1, value
        assert refused[0]["tag"] == "reuse_valve_cmd" and refused[0]["why"]
        # standing, it is not reported again every scan
        d = sup.step(live(t + 1), t + 1, Commands(manual=manual))
        assert not kinds(d, "command_refused") and d.outputs["reuse_valve_cmd"].level is (
            Level.SEQUENCE
        )


def test_a_good_manual_value_within_max_force_s_is_used() -> None:
    sup, t = reusing()
    manual = {"reuse_valve_cmd": Manual(60.0, t + CFG.max_force_s, "eng")}
    d = sup.step(live(t), t, Commands(manual=manual))
    assert d.outputs["reuse_valve_cmd"] == (60.0, Level.MANUAL, "manual by eng")
    assert not kinds(d, "command_refused")


def test_a_bad_setpoint_is_refused_and_the_site_setpoint_kept() -> None:
    """NaN, inf, negative, or within 5 K of the IL-01 limit: refused with an event; the fan loop
    keeps working on the site's setpoint (same output as with no request at all)."""
    ceiling = CFG.thresholds.it_supply_high_c - 5.0
    for sp in (float("nan"), float("inf"), -20.0, 1e12, ceiling + 0.5):
        ref, _ = reusing()
        sup, t = reusing()
        d_ref = ref.step(live(t, it_supply_temp=37.0), t)
        d = sup.step(live(t, it_supply_temp=37.0), t, Commands(supply_setpoint_c=sp))
        assert [r["tag"] for r in kinds(d, "command_refused")] == ["supply_setpoint_c"], sp
        assert d.values()["drycooler_fan_cmd"] == d_ref.values()["drycooler_fan_cmd"]


def test_integers_too_large_for_a_float_are_refused_never_raised() -> None:
    """A request channel may carry any integer (JSON has no limit). 10**400 as a manual value, a
    manual expiry, a setpoint or a bypass expiry is refused with its event; it never raises
    out of the step (which would hold the controller in its degraded scan), and its event can be
    journalled."""
    cases = []
    for huge in (10**400, -(10**400), 10**5000):  # 10**5000: too long even for repr()
        cases += [
            Commands(manual={"reuse_valve_cmd": Manual(huge, 60.0, "eng")}),  # type: ignore[arg-type]
            Commands(supply_setpoint_c=huge),  # type: ignore[arg-type]
        ]
    for huge in (10**400, 10**5000):  # an expiry that far back is merely expired
        cases += [
            Commands(manual={"reuse_valve_cmd": Manual(50.0, huge, "eng")}),  # type: ignore[arg-type]
            Commands(bypasses={"IL-06": huge}),  # type: ignore[dict-item]
        ]
    for cmds in cases:
        sup, t = reusing()
        d = sup.step(live(t), t, cmds)
        refused = kinds(d, "command_refused") + kinds(d, "bypass_refused")
        assert len(refused) == 1, cmds
        for e in d.events:
            event_row(e, 0.0)  # the journal can hold it
        assert d.outputs["reuse_valve_cmd"].level is Level.SEQUENCE, cmds
        assert not d.bypassed, cmds


# ---- transitions are events, not every scan -------------------------------------------


def test_a_point_turning_invalid_gives_one_event_each_way() -> None:
    sup, t = reusing()
    events = []
    for i in range(5):
        d = sup.step(live(t + i, customer_flow=float("nan")), t + i)
        events += [e for e in d.events if e.kind.startswith("point_")]
        assert d.invalid["customer_flow"] == "nan"
    for i in range(5, 8):
        d = sup.step(live(t + i), t + i)
        events += [e for e in d.events if e.kind.startswith("point_")]
    assert [(e.kind, e.source, dict(e.detail)) for e in events] == [
        ("point_invalid", "customer_flow", {"tag": "customer_flow", "reason": "nan"}),
        ("point_valid", "customer_flow", {"tag": "customer_flow", "was": "nan"}),
    ]
    assert [e.at_s for e in events] == [t, t + 5]


def test_command_blocked_once_per_distinct_set_of_blocked_commands() -> None:
    """Both primary pumps held off by hand: the guard blocks it every scan, but the event comes
    once; a further blocked command (a new cause) gives one more."""
    sup, t = reusing()
    exp = t + 600.0
    off = {
        "primary_pump_a_cmd": Manual(False, exp, "eng"),
        "primary_pump_b_cmd": Manual(False, exp, "eng"),
    }
    blocked_events = []
    for i in range(5):
        d = sup.step(live(t + i), t + i, Commands(manual=off))
        assert d.blocked and d.values()["primary_pump_a_cmd"] is True
        blocked_events += kinds(d, "command_blocked")
    slow = {**off, "primary_pump_speed_cmd": Manual(1.0, exp, "eng")}
    for i in range(5, 10):
        d = sup.step(live(t + i), t + i, Commands(manual=slow))
        blocked_events += kinds(d, "command_blocked")
    assert len(blocked_events) == 2
    assert sup.blocked_total == 5 * 2 + 5 * 3  # the count still sees every scan


# ---- pumps, their failures, and the fan loop -----------------------------------------


def test_pump_and_valve_times_come_from_the_site_file() -> None:
    site = CFG_SITE.with_control(
        pump_fail_s=42.0, valve_follow_s=77.0, valve_tolerance_pct=7.0, valve_retry_s=999.0
    )
    cfg = SupervisorConfig.from_site(site)
    assert (cfg.pump_fail_s, cfg.valve_follow_s, cfg.valve_tolerance_pct, cfg.valve_retry_s) == (
        42.0,
        77.0,
        7.0,
        999.0,
    )
    assert cfg.max_force_s == site.control.max_force_s


def test_both_primary_pumps_failed_is_its_own_alarm_and_reject_cause() -> None:
    """Pump A stops: B takes duty; B stops too: `pump_failed` for each, one
    `primary_pumps_failed`, reuse rejected for that cause, and both pumps stay commanded."""
    sup, t = reusing()
    d = None
    seen: list[tuple[str, str]] = []
    for i in range(int(3 * CFG.pump_fail_s) + 3):
        d = sup.step(
            plant_like(t + i, d, primary_pump_a_running=False, primary_pump_b_running=False),
            t + i,
        )
        seen += [(e.kind, e.source) for e in d.events if "pump" in e.kind]
    assert d is not None
    assert seen == [
        ("pump_failed", "primary_pump_a_running"),
        ("pump_failed", "primary_pump_b_running"),
        ("primary_pumps_failed", "primary_pumps"),
    ]
    assert "both primary pumps failed" in d.reject_reasons
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert d.values()["primary_pump_a_cmd"] is True and d.values()["primary_pump_b_cmd"] is True


def test_pump_b_is_watched_when_it_runs_as_duty() -> None:
    sup, t = reusing()
    d = None
    kinds_seen: list[tuple[str, str]] = []
    for i in range(int(2 * CFG.pump_fail_s) + 3):
        d = sup.step(plant_like(t + i, d, primary_pump_b_running=False), t + i)
        kinds_seen += [(e.kind, e.source) for e in d.events if "pump" in e.kind]
    assert not kinds_seen  # B not commanded: nothing to judge
    assert d is not None and d.values()["primary_pump_b_cmd"] is False
    d = sup.step(plant_like(t + 100, d, primary_pump_b_running=False), t + 100)
    man = {"primary_pump_b_cmd": Manual(True, t + 1000.0, "eng")}
    for i in range(101, 101 + int(CFG.pump_fail_s) + 2):
        d = sup.step(
            plant_like(t + i, d, primary_pump_b_running=False), t + i, Commands(manual=man)
        )
        kinds_seen += [(e.kind, e.source) for e in d.events if "pump" in e.kind]
    assert kinds_seen == [("pump_failed", "primary_pump_b_running")]


def test_a_failed_secondary_pump_stays_failed_until_feedback_or_reset() -> None:
    """Its feedback never comes: reuse is entered once, the pump fails, and reuse is NOT tried
    again every re-entry interval (3 h here: before, every 15 min). A reset clears the verdict;
    feedback that shows it running clears it too."""
    sup, t0 = reusing()
    d = None
    entries = 0
    t = t0
    while t < t0 + 3 * 3600.0:
        d = sup.step(plant_like(t, d, secondary_pump_running=False), t)
        entries += sum(
            1 for e in d.events if e.kind == "mode_changed" and e.source == "NORMAL_REUSE"
        )
        t += 5.0
    assert d is not None
    assert entries == 0, "reuse was re-entered onto a failed secondary pump"
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert "secondary pump failed" in d.reject_reasons
    assert d.values()["secondary_pump_cmd"] is False  # no longer commanded, still failed

    d = sup.step(plant_like(t, d, secondary_pump_running=False), t, Commands(reset=True))
    assert [e.kind for e in d.events if "pump" in e.kind] == ["pump_reset"]
    assert "secondary pump failed" not in d.reject_reasons

    sup2, t2 = reusing()
    d2 = None
    for i in range(int(CFG.pump_fail_s) + 2):
        d2 = sup2.step(plant_like(t2 + i, d2, secondary_pump_running=False), t2 + i)
    assert d2 is not None and "secondary pump failed" in d2.reject_reasons
    d2 = sup2.step(plant_like(t2 + 50, d2, secondary_pump_running=True), t2 + 50)
    assert [e.kind for e in d2.events if "pump" in e.kind] == ["pump_recovered"]
    assert "secondary pump failed" not in d2.reject_reasons


def test_fans_leave_a_trip_from_where_they_are_not_from_a_stale_integral() -> None:
    """Reusing at the setpoint the fan loop sits near its minimum; a leak trip runs the fans at
    100 %; on the first scan after the reset the loop continues from 100 % (less at most one
    PI step), not from the minimum it had before the trip."""
    sup, t = reusing()
    d = sup.step(live(t), t)
    assert d.values()["drycooler_fan_cmd"] < 50.0
    for i in range(1, 60):
        d = sup.step(live(t + i, leak_reuse=i < 30), t + i)
    assert sup.mode is Mode.LEAK_TRIP and d.values()["drycooler_fan_cmd"] == 100.0
    d = sup.step(live(t + 60), t + 60, Commands(reset=True))
    assert sup.mode is Mode.DRY_COOLER_REJECT
    error_k = 0.02 + 0.02  # the supply reads setpoint + at most 0.02 K, both scans
    one_step = CFG.fan_kp * error_k * (1.0 + 1.0 / CFG.fan_ti_s)
    assert d.values()["drycooler_fan_cmd"] >= 100.0 - one_step


def test_fans_leave_a_supply_sensor_fault_from_100_pct() -> None:
    """IL-02 (NaN supply) drives the fans to 100 %; when the reading returns the loop goes on
    from 100 %, not from the integral it held while the sensor was gone."""
    sup, t = reusing()
    for i in range(30):
        d = sup.step(live(t + i, it_supply_temp=float("nan")), t + i)
    assert d.values()["drycooler_fan_cmd"] == 100.0
    d = sup.step(live(t + 30), t + 30)
    assert "IL-02" not in d.active
    one_step = CFG.fan_kp * 0.04 * (1.0 + 1.0 / CFG.fan_ti_s)
    assert d.values()["drycooler_fan_cmd"] >= 100.0 - one_step


# ---- fail toward cooling keeps every sink; a dead dry cooler puts the HX first -------


def test_supply_sensor_fault_keeps_the_reuse_mode_and_the_customer_as_sinks() -> None:
    """IL-02 forces fans and pumps, but it is no reuse fault: the reuse mode keeps running and
    the customer path stays open (before, the mode went to DRY_COOLER_REJECT and closed it)."""
    sup, t = reusing()
    for i in range(10):
        d = sup.step(live(t + i, it_supply_temp=float("nan")), t + i)
    assert "IL-02" in d.active and sup.mode is Mode.NORMAL_REUSE
    assert not any("IL-02" in r for r in d.reject_reasons)
    assert d.values()["customer_isolation_cmd"] is True
    assert d.values()["drycooler_fan_cmd"] == 100.0


def near_full(t: float, d: Decision | None, **changes: object) -> object:
    """The tank bottom 2 K short of full: the tank-full policy throttles the valve."""
    full = CFG.sequence.tank_full_c
    return plant_like(
        t,
        d,
        tank_bottom_temp=full - 2.0,
        tank_mid_temp=full - 1.0,
        tank_top_temp=full,
        it_return_temp=full + 5.0 + 0.02 * (int(t) % 2),
        **changes,  # type: ignore[arg-type]
    )


def test_dead_dry_cooler_input_puts_the_hx_first_unthrottled_with_one_event() -> None:
    sup, t = reusing()
    d = None
    for i in range(5):
        d = sup.step(near_full(t + i, d), t + i)  # type: ignore[arg-type]
    assert d is not None
    throttled = d.values()["reuse_valve_cmd"]
    assert throttled < 100.0  # the tank-full policy at work
    failed = []
    for i in range(5, 15):
        d = sup.step(near_full(t + i, d, drycooler_fault=True), t + i)  # type: ignore[arg-type]
        failed += kinds(d, "drycooler_failed")
    assert failed == [{"why": "drycooler_fault input"}]
    v = d.values()
    assert v["reuse_valve_cmd"] == 100.0 and v["secondary_pump_speed_cmd"] == 100.0
    assert v["secondary_pump_cmd"] is True and v["reuse_isolation_cmd"] is True
    assert v["customer_isolation_cmd"] is True
    d = sup.step(near_full(t + 20, d), t + 20)  # type: ignore[arg-type]
    assert [e.kind for e in d.events if e.kind.startswith("drycooler")] == ["drycooler_recovered"]


def test_dead_dry_cooler_in_the_reject_mode_uses_the_hx_only_when_its_protections_allow() -> None:
    """Reject requested, dry cooler dead: the HX (and the ready customer) become sinks even in
    DRY_COOLER_REJECT; with the reuse leak input unknown they do not (protections first)."""
    sup, t = reusing()
    d = None
    reject = Commands(request_reject=True)
    for i in range(5):
        d = sup.step(near_full(t + i, d, drycooler_fault=True), t + i, reject)  # type: ignore[arg-type]
    assert sup.mode is Mode.DRY_COOLER_REJECT
    v = d.values()
    assert v["reuse_valve_cmd"] == 100.0 and v["secondary_pump_cmd"] is True
    assert v["customer_isolation_cmd"] is True
    unknown = Sample(None, Quality.COMMS_LOST, t)
    d = sup.step(near_full(t + 5, d, drycooler_fault=True, leak_reuse=unknown), t + 5, reject)  # type: ignore[arg-type]
    v = d.values()
    assert v["reuse_valve_cmd"] == 0.0 and v["secondary_pump_cmd"] is False


def test_a_dry_cooler_whose_outlet_does_not_follow_its_fans_is_failed() -> None:
    """No fault input, but the fans run at 100 % and the outlet stays near the return: after
    DC_FOLLOW_S the dry cooler is judged failed (one event), not before."""
    sup, t = reusing()
    fans = {"drycooler_fan_cmd": Manual(100.0, t + 3600.0, "eng")}
    amb, ret = 20.0, 45.0
    warm_out = amb + 0.9 * (ret - amb)  # natural draft takes about a tenth of the difference
    d = None
    seen: list[tuple[float, dict[str, object]]] = []
    for i in range(int(DC_FOLLOW_S) + 5):
        img = plant_like(t + i, d, ambient_temp=amb, drycooler_out_temp=warm_out)
        d = sup.step(img, t + i, Commands(manual=fans))
        seen += [(t + i, e) for e in kinds(d, "drycooler_failed")]
    assert len(seen) == 1
    at, detail = seen[0]
    assert detail == {"why": "outlet not following the fans"}
    assert DC_FOLLOW_S <= at - t <= DC_FOLLOW_S + 2.0
    # a healthy outlet (well below the return) clears it
    d = sup.step(plant_like(t + 400, d, ambient_temp=amb, drycooler_out_temp=25.0), t + 400)
    assert kinds(d, "drycooler_recovered") == [{}]


# ---- Decision.faults: the fault memory, while it holds ------------------------------------


def test_a_healthy_plant_has_no_faults() -> None:
    sup, t = reusing()
    assert sup.step(live(t), t).faults == {}


def test_a_stuck_valve_is_a_fault_until_its_retry_interval_is_over() -> None:
    """Stuck shut while reuse wants it open: "valve" after valve_follow_s, not before; it
    holds through the retry interval, and is gone when reuse may try again."""
    sup, t = reusing()
    d = None
    first = None
    for i in range(1, int(CFG.valve_follow_s) + 5):
        d = sup.step(plant_like(t + i, d, reuse_valve_pos=0.0), t + i)
        if "valve" in d.faults and first is None:
            first = i
    assert first is not None and CFG.valve_follow_s <= first <= CFG.valve_follow_s + 2
    assert "not following" in " ".join(d.reject_reasons)
    # in the reject mode the valve is told 0 % and sits there: following again, reuse still
    # held off until the retry interval has passed since the fault
    k = t + first + 10
    d = sup.step(plant_like(k, d, reuse_valve_pos=0.0), k)
    assert not sup.valve_fault and "retried" in d.faults["valve"]
    end = t + first + CFG.valve_retry_s
    d = sup.step(plant_like(end + 1, d, reuse_valve_pos=0.0), end + 1)
    assert "valve" not in d.faults


def test_failed_pumps_are_faults_by_feedback_tag_and_both_primaries_its_own() -> None:
    sup, t = reusing()
    d = None
    for i in range(int(3 * CFG.pump_fail_s) + 3):
        d = sup.step(
            plant_like(t + i, d, primary_pump_a_running=False, primary_pump_b_running=False),
            t + i,
        )
    assert d is not None
    assert set(d.faults) == {
        "pump:primary_pump_a_running",
        "pump:primary_pump_b_running",
        "primary_pumps",
    }
    assert all(d.faults.values()) and all("\n" not in v for v in d.faults.values())
    d = sup.step(plant_like(t + 100, d), t + 100)  # both read running again
    assert d.faults == {}


def test_a_dead_dry_cooler_is_a_fault_with_its_why_and_clears() -> None:
    sup, t = reusing()
    d = sup.step(plant_like(t, None, drycooler_fault=True), t)
    assert d.faults == {"drycooler": "dry cooler is no heat sink: drycooler_fault input"}
    d = sup.step(plant_like(t + 1, d), t + 1)
    assert d.faults == {}


def test_hunting_is_a_fault_while_the_mode_changes_too_often() -> None:
    """Reject requested and released every scan past the dwell: more mode changes in an hour
    than the site allows makes "hunting"; with the request then left standing (no more
    changes) it is gone an hour after the changes, without needing another mode change."""
    quick = SupervisorConfig.from_site(
        CFG_SITE.with_control(
            min_mode_dwell_s=0.0,
            reject_dwell_s=0.0,
            customer_ready_dwell_s=0.0,
            reuse_reentry_min_s=0.0,
        )
    )
    sup = Supervisor(quick)
    d = None
    t = 0.0
    limit = quick.timing.hunting_changes_per_h
    for i in range(4 * limit):
        t += 1.0
        d = sup.step(plant_like(t, d), t, Commands(request_reject=i % 2 == 1))
    assert d is not None and "hunting" in d.faults and str(limit) in d.faults["hunting"]
    reject = Commands(request_reject=True)
    last_change = t
    while t < last_change + 3600.0 + 60.0:
        t += 30.0
        d = sup.step(plant_like(t, d), t, reject)
        assert not [e for e in d.events if e.kind == "mode_changed"] or t < last_change + 60
        if t < last_change + 3600.0 - 30.0:
            assert "hunting" in d.faults, t - last_change
    assert sup.mode is Mode.DRY_COOLER_REJECT and "hunting" not in d.faults


# ---- the PLC holds its safe values (its watchdog tripped and stays tripped) ---------------


def hold_bound(site: object = CFG_SITE) -> float:
    """DESIGN §7: a tripped PLC releases once the heartbeat has been steady for the hold-off
    and fresh commands arrived; a few scans more and a live controller must have seen it."""
    return site.plc.watchdog_holdoff_s + 4 * site.scan.period_s  # type: ignore[attr-defined]


HOLD_REASON = "PLC holds its safe values (watchdog tripped)"


def held(d: Decision) -> bool:
    return any(r.startswith(HOLD_REASON) for r in d.reject_reasons)


def test_the_plc_hold_bound_is_the_watchdog_hold_off_plus_four_scans() -> None:
    site = CFG_SITE.model_copy(
        update={
            "plc": CFG_SITE.plc.model_copy(update={"watchdog_holdoff_s": 7.0}),
            "scan": CFG_SITE.scan.model_copy(update={"period_s": 0.5}),
        }
    )
    assert SupervisorConfig.from_site(site).plc_hold_s == 7.0 + 4 * 0.5
    assert CFG.plc_hold_s == hold_bound()


def test_a_plc_holding_its_safe_values_past_the_hold_off_makes_reuse_leave() -> None:
    """Tripped through the hold-off and a few scans: a recovery in progress, reuse stays; one
    scan beyond that: the controller's writes are not reaching the PLC, so reuse is rejected
    with the reason, a fault (the PLC-SAFE-HOLD alarm) and one event; back to false: cleared
    with one event, and reuse returns only after the reject dwell."""
    sup, t0 = reusing()
    bound, step = hold_bound(), CFG_SITE.scan.period_s
    d = None
    t = t0
    while t - t0 <= bound:  # a trip the PLC releases within its hold-off: no verdict yet
        d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
        assert not held(d) and "plc_safe_hold" not in d.faults, t - t0
        assert not kinds(d, "plc_safe_hold")
        assert sup.mode is Mode.NORMAL_REUSE
        t += step
    d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
    assert held(d) and sup.mode is Mode.DRY_COOLER_REJECT
    reason = next(r for r in d.reject_reasons if r.startswith(HOLD_REASON))
    assert f"{bound:g} s" in reason
    assert d.faults["plc_safe_hold"].startswith(HOLD_REASON)
    assert kinds(d, "plc_safe_hold") == [{"tripped_s": t - t0}]
    # standing: no second event, still rejected, the fault line does not change
    fault = d.faults["plc_safe_hold"]
    for _ in range(20):
        t += step
        d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
        assert held(d) and d.faults["plc_safe_hold"] == fault and not kinds(d, "plc_safe_hold")
        assert sup.mode is Mode.DRY_COOLER_REJECT
    t += step
    d = sup.step(plant_like(t, d), t)
    assert not held(d) and "plc_safe_hold" not in d.faults
    assert kinds(d, "plc_safe_hold_cleared") == [{}]
    t += step
    d = sup.step(plant_like(t, d), t)
    assert not kinds(d, "plc_safe_hold_cleared")
    assert sup.mode is Mode.DRY_COOLER_REJECT  # the reject dwell still runs
    while sup.mode is not Mode.NORMAL_REUSE:
        t += 1.0
        d = sup.step(plant_like(t, d), t)
        assert t - t0 < 10_000.0, "reuse never came back after the hold cleared"


def test_a_plc_that_never_releases_its_hold_is_never_reported_in_reuse() -> None:
    """From start-up with the PLC tripped all along (the heartbeat never lands): the mode
    never reaches a reuse mode, whatever the plant allows."""
    sup = Supervisor(CFG, 0.0)
    d = None
    t = 0.0
    while t < 2000.0:
        d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
        assert sup.mode not in REUSE_MODES, t
        t += 1.0
    assert held(d) and "plc_safe_hold" in d.faults


def test_an_invalid_watchdog_input_is_no_proof_of_a_hold_and_keeps_one() -> None:
    """Tripped but unreadable (stale, bad, of the wrong kind) is no verdict: never a hold by
    itself, and it does not end one that stands (the reject stays: toward cooling)."""
    bad = [
        Sample(True, Quality.STALE, 0.0),
        Sample(True, Quality.COMMS_LOST, 0.0),
        Sample(float("nan"), Quality.GOOD, 0.0),
    ]
    for sample in bad:
        sup, t = reusing()
        d = None
        for _ in range(int(4 * hold_bound()) + 5):
            s = Sample(sample.value, sample.quality, t)
            d = sup.step(plant_like(t, d, plc_watchdog_tripped=s), t)
            assert not held(d) and "plc_safe_hold" not in d.faults, sample
            t += 1.0
        assert sup.mode is Mode.NORMAL_REUSE, sample
        # a hold that stands is kept while the input cannot be read
        for _ in range(int(hold_bound()) + 2):
            d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
            t += 1.0
        assert held(d)
        for _ in range(5):
            s = Sample(sample.value, sample.quality, t)
            d = sup.step(plant_like(t, d, plc_watchdog_tripped=s), t)
            assert held(d) and not kinds(d, "plc_safe_hold_cleared"), sample
            t += 1.0
        d = sup.step(plant_like(t, d), t)
        assert not held(d) and kinds(d, "plc_safe_hold_cleared") == [{}]


def test_an_unreadable_spell_restarts_the_count_toward_a_hold() -> None:
    """True, unreadable, true again: the hold-off is counted from the second true, since the
    PLC may have released and tripped again in between."""
    sup, t = reusing()
    bound = hold_bound()
    d = None
    for _ in range(int(bound)):
        d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
        t += 1.0
    d = sup.step(plant_like(t, d, plc_watchdog_tripped=Sample(True, Quality.STALE, t)), t)
    t += 1.0
    start = t
    while t - start <= bound:
        d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
        assert not held(d), t - start
        t += 1.0
    d = sup.step(plant_like(t, d, plc_watchdog_tripped=True), t)
    assert held(d)


def test_a_plc_hold_raises_the_plc_safe_hold_alarm_high_until_it_clears() -> None:
    """Through the whole core: the hold is the HIGH alarm PLC-SAFE-HOLD with the fault's line;
    it returns to normal (unacknowledged, so still listed) once the input reads false."""
    from controller.alarms import AlarmState, Priority
    from controller.core import Core, ScanInput

    core = Core(CFG_SITE, 0.0, 1e9)
    t, d = 0.0, None
    while t <= hold_bound() + 1.0:
        r = core.step(ScanInput(plant_like(t, d, plc_watchdog_tripped=True), t, 1e9 + t, True))
        d = r.decision
        t += 0.25
    alarm = r.alarms.alarms["PLC-SAFE-HOLD"]
    assert alarm.priority is Priority.HIGH and alarm.state is AlarmState.UNACK
    assert alarm.detail == d.faults["plc_safe_hold"]
    r = core.step(ScanInput(plant_like(t, d), t, 1e9 + t, True))
    assert "plc_safe_hold" not in r.decision.faults
    assert r.alarms.alarms["PLC-SAFE-HOLD"].state is AlarmState.RTN_UNACK


# ---- the BMS level of the priority array ----------------------------------------------------


def test_a_bms_speed_request_wins_while_the_tank_charges_and_the_sequence_holds_it_otherwise() -> (
    None
):
    sup, t = reusing()
    d = sup.step(plant_like(t, None), t)
    seq_speed = CFG.sequence.secondary_speed_pct
    assert d.outputs["secondary_pump_speed_cmd"].level is Level.SEQUENCE
    assert d.values()["secondary_pump_speed_cmd"] == seq_speed
    bms = Commands(bms={"secondary_pump_speed_pct": 55.0})
    d = sup.step(plant_like(t + 1, d), t + 1, bms)
    out = d.outputs["secondary_pump_speed_cmd"]
    assert (out.value, out.level) == (55.0, Level.BMS)
    # the pump itself stays the sequence's: the BMS only trims its speed
    assert d.outputs["secondary_pump_cmd"].level is Level.SEQUENCE
    # withdrawn: the sequence's speed again
    d = sup.step(plant_like(t + 2, d), t + 2)
    assert d.values()["secondary_pump_speed_cmd"] == seq_speed


def test_no_bms_request_overrides_an_interlock_or_a_dead_dry_cooler() -> None:
    bms = Commands(bms={"secondary_pump_speed_pct": 40.0})
    sup, t = reusing()
    d = None
    for i in range(30):  # a reuse-zone leak: IL-05 stops the reuse circuit and latches
        d = sup.step(live(t + i, leak_reuse=True), t + i, bms)
    assert d is not None and sup.mode is Mode.LEAK_TRIP
    assert all(o.level is not Level.BMS for o in d.outputs.values())
    assert d.values()["secondary_pump_cmd"] is False
    # the HX as the sink of last resort runs the secondary pump at full speed, whatever asked
    sup, t = reusing()
    d = None
    for i in range(15):
        d = sup.step(near_full(t + i, d, drycooler_fault=i >= 5), t + i, bms)  # type: ignore[arg-type]
    assert d is not None
    assert d.outputs["secondary_pump_speed_cmd"] == (100.0, Level.SEQUENCE, "")


def test_a_bms_request_out_of_bounds_or_unknown_is_refused_once_and_never_used() -> None:
    sup, t = reusing()
    d = None
    refusals = []
    for i, bms in enumerate(
        [{"secondary_pump_speed_pct": 5.0}] * 3
        + [{"fan": 10.0}]
        + [{"secondary_pump_speed_pct": math.nan}]
    ):
        d = sup.step(plant_like(t + i, d), t + i, Commands(bms=bms))  # type: ignore[arg-type]
        refusals += kinds(d, "command_refused")
        assert d.outputs["secondary_pump_speed_cmd"].level is Level.SEQUENCE
    assert [r["tag"] for r in refusals] == [
        "secondary_pump_speed_pct",
        "fan",
        "secondary_pump_speed_pct",
    ]
