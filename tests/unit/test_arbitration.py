"""Arbitration, the guard, the sequences and the PI loop."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from controller.arbitration import Level, Manual, arbitrate, check_manual, check_setpoint, guard
from controller.modes import Mode
from controller.sequences import PI, mode_outputs
from controller.supervisor import Commands, Supervisor
from tests.unit.core_helpers import CFG, SITE, image

SAFE = dict(CFG.safe)


def test_priority_interlock_over_manual_over_sequence() -> None:
    out = arbitrate(
        SAFE,
        10.0,
        interlock={"reuse_valve_cmd": (0.0, "IL-04")},
        manual={
            "reuse_valve_cmd": Manual(50.0, 100.0, "eng"),
            "drycooler_fan_cmd": Manual(40.0, 100.0, "eng"),
        },
        sequence={"reuse_valve_cmd": 80.0, "drycooler_fan_cmd": 20.0, "secondary_pump_cmd": True},
        bms={"secondary_pump_cmd": False, "customer_isolation_cmd": True},
    )
    assert (out["reuse_valve_cmd"].value, out["reuse_valve_cmd"].level) == (0.0, Level.INTERLOCK)
    assert out["reuse_valve_cmd"].why == "IL-04"
    assert (out["drycooler_fan_cmd"].value, out["drycooler_fan_cmd"].level) == (40.0, Level.MANUAL)
    assert out["secondary_pump_cmd"].level is Level.SEQUENCE
    assert (out["customer_isolation_cmd"].value, out["customer_isolation_cmd"].level) == (
        True,
        Level.BMS,
    )
    assert out["reuse_isolation_cmd"].level is Level.SAFE


def test_manual_values_expire() -> None:
    out = arbitrate(SAFE, 100.0, manual={"drycooler_fan_cmd": Manual(40.0, 100.0)})
    assert out["drycooler_fan_cmd"].level is Level.SAFE


@given(
    a=st.booleans(),
    b=st.booleans(),
    fa=st.sampled_from([True, False, None]),
    fb=st.sampled_from([True, False, None]),
    fan=st.floats(0, 100),
    valve=st.floats(0, 100),
    sec=st.booleans(),
)
def test_guard_always_leaves_a_pump_and_a_sink(a, b, fa, fb, fan, valve, sec) -> None:
    seq = {
        **SAFE,
        "primary_pump_a_cmd": a,
        "primary_pump_b_cmd": b,
        "drycooler_fan_cmd": fan,
        "reuse_valve_cmd": valve,
        "secondary_pump_cmd": sec,
        "reuse_isolation_cmd": sec,
    }
    out = arbitrate(SAFE, 0.0, sequence=seq)
    blocked = guard(
        out,
        {"primary_pump_a_running": fa, "primary_pump_b_running": fb},
        min_fan_pct=10.0,
        min_pump_speed_pct=30.0,
    )
    alive = [
        out["primary_pump_a_cmd"].value and fa is not False,
        out["primary_pump_b_cmd"].value and fb is not False,
    ]
    assert any(alive) or (out["primary_pump_a_cmd"].value and out["primary_pump_b_cmd"].value)
    hx = valve > 0 and sec
    assert out["drycooler_fan_cmd"].value >= 10.0 or hx
    if not (a or b):
        assert blocked and out["primary_pump_a_cmd"].level is Level.GUARD


def test_pi_anti_windup_recovers_quickly_after_long_saturation() -> None:
    pi = PI(kp=8.0, ti_s=120.0, lo=10.0, hi=100.0)
    t = 0.0
    for _ in range(3600):  # an hour far too hot: output pinned at 100 %
        t += 1
        out, pi = pi.update(10.0, t)
    assert out == 100.0 and pi.integral <= 100.0
    for _ in range(60):  # now too cold: a wound-up integrator would hold 100 % for hours
        t += 1
        out, pi = pi.update(-2.0, t)
    assert out < 100.0


def test_pi_nan_error_fails_to_full_cooling() -> None:
    out, _ = PI(8.0, 120.0, 10.0, 100.0).update(math.nan, 1.0)
    assert out == 100.0


def test_pi_bumpless_transfer() -> None:
    pi = PI(8.0, 120.0, 10.0, 100.0).track(actual=55.0, error=0.5, now_s=0.0)
    out, _ = pi.update(0.5, 0.0)
    assert abs(out - 55.0) < 1e-9


def test_sequences_by_mode() -> None:
    v = {"tank_bottom_temp": 40.0}
    reuse = mode_outputs(Mode.NORMAL_REUSE, v, 30.0, CFG.sequence)
    assert reuse["reuse_valve_cmd"] > 0 and reuse["secondary_pump_cmd"] is True
    assert reuse["customer_isolation_cmd"] is True
    reject = mode_outputs(Mode.DRY_COOLER_REJECT, v, 30.0, CFG.sequence)
    assert reject["reuse_valve_cmd"] == 0 and reject["secondary_pump_cmd"] is False
    offline = mode_outputs(Mode.CUSTOMER_OFFLINE, v, 30.0, CFG.sequence)
    assert offline["customer_isolation_cmd"] is False and offline["reuse_valve_cmd"] > 0
    full = mode_outputs(
        Mode.CUSTOMER_OFFLINE, {"tank_bottom_temp": 70.0}, 30.0, CFG.sequence, tank_full=True
    )
    assert full["reuse_valve_cmd"] == 0 and full["secondary_pump_cmd"] is False
    # an unknown tank is no place to send heat (reuse_valve_pct's own rule), in every mode
    for m in (Mode.NORMAL_REUSE, Mode.CUSTOMER_OFFLINE):
        unknown = mode_outputs(m, {}, 30.0, CFG.sequence)
        assert unknown["reuse_valve_cmd"] == 0.0, m
    for m in (Mode.STARTUP, Mode.LEAK_TRIP):
        assert mode_outputs(m, v, 30.0, CFG.sequence)["drycooler_fan_cmd"] == 100.0


def test_fan_returns_bumplessly_after_a_manual_force() -> None:
    sup = Supervisor(CFG)
    t = 0.0
    force = Commands(manual={"drycooler_fan_cmd": Manual(80.0, 25.0, "eng")})
    for _ in range(30):
        t += 1
        d = sup.step(image(t, it_supply_temp=35.0 + 0.01 * (t % 2)), t, force)
        if t == 20:
            assert d.outputs["drycooler_fan_cmd"].level is Level.MANUAL
    # the force expired at 25 s: the loop continues from 80 %, not from its old 10 %
    assert d.outputs["drycooler_fan_cmd"].level is Level.SEQUENCE
    assert abs(d.values()["drycooler_fan_cmd"] - 80.0) < 1.0


def test_manual_force_in_maintenance_but_interlocks_still_win() -> None:
    sup = Supervisor(CFG)
    manual = {
        "reuse_valve_cmd": Manual(70.0, 3600, "eng"),
        "secondary_pump_cmd": Manual(True, 3600),
    }
    t = 0.0
    for _ in range(3):
        t += 1
        d = sup.step(image(t), t, Commands(maintenance=True, manual=manual))
    assert d.mode is Mode.MAINTENANCE
    assert (d.values()["reuse_valve_cmd"], d.outputs["reuse_valve_cmd"].level) == (
        70.0,
        Level.MANUAL,
    )
    t += 1
    d = sup.step(image(t, leak_reuse=True), t, Commands(maintenance=True, manual=manual))
    assert d.mode is Mode.LEAK_TRIP and d.values()["reuse_valve_cmd"] == 0.0
    assert d.outputs["secondary_pump_cmd"].level is Level.INTERLOCK


def test_requested_supply_setpoint_is_bounded_below_the_interlock_limit() -> None:
    """A BMS setpoint of 60 °C (or NaN) must not let the fans idle up to the IL-01 limit."""
    results = {}
    for sp in (None, 60.0, math.nan, 30.0):
        sup = Supervisor(CFG)
        t = 0.0
        for _ in range(60):
            t += 1
            d = sup.step(
                image(t, it_supply_temp=40.5 + 0.01 * (t % 2)), t, Commands(supply_setpoint_c=sp)
            )
        results[sp if sp == sp else "nan"] = d.values()["drycooler_fan_cmd"]
    # 40.5 °C is above the 40 °C ceiling: the fans push, as they do for the site setpoint
    assert results[60.0] > CFG.sequence.fan_min_pct + 3.0  # not idling at the minimum
    assert results["nan"] == results[None]
    assert results[30.0] >= results[None]


def test_a_non_finite_request_falls_through_to_the_level_below() -> None:
    out = arbitrate(
        SAFE,
        0.0,
        manual={"drycooler_fan_cmd": Manual(math.nan, 100.0, "eng")},
        sequence={"drycooler_fan_cmd": 42.0, "reuse_valve_cmd": math.inf},
    )
    assert (out["drycooler_fan_cmd"].value, out["drycooler_fan_cmd"].level) == (
        42.0,
        Level.SEQUENCE,
    )
    assert (out["reuse_valve_cmd"].value, out["reuse_valve_cmd"].level) == (0.0, Level.SAFE)


OUTPUTS = {t.name: t for t in SITE.outputs}
MAX_FORCE_S = SITE.control.max_force_s


def test_check_manual_refuses_wrong_type_range_name_and_expiry_naming_each() -> None:
    """Every bad request is refused with the tag, its value and what was expected; good ones pass
    untouched. The bounds come from the tag table and the site's max_force_s."""
    good = {
        "reuse_valve_cmd": Manual(100.0, 10.0, "eng"),
        "secondary_pump_cmd": Manual(False, 10.0),
        "drycooler_fan_cmd": Manual(0, MAX_FORCE_S),  # an int is a number; 0 % is in range
    }
    bad = {
        "primary_pump_speed_cmd": Manual(250.0, 10.0),  # above the tag's 100 %
        "reuse_valve_cmd ": Manual(10.0, 10.0),  # no such output
        "customer_isolation_cmd": Manual(1.0, 10.0),  # a number on a boolean output
        "secondary_pump_speed_cmd": Manual(True, 10.0),  # a boolean on an analogue output
        "primary_pump_a_cmd": Manual("abc", 10.0),  # type: ignore[dict-item]
        "heartbeat": Manual(5.0, 10.0),  # the controller's own
    }
    ok, refused = check_manual({**good, **bad}, OUTPUTS, 0.0, MAX_FORCE_S)
    assert ok == good
    by_tag = {r.tag: r for r in refused}
    assert set(by_tag) == set(bad)
    r = by_tag["primary_pump_speed_cmd"]
    assert r.value == 250.0 and "range [0, 100]" in r.why and r.why.startswith("expected")
    assert "true or false" in by_tag["customer_isolation_cmd"].why
    assert "a number" in by_tag["secondary_pump_speed_cmd"].why
    assert "true or false" in by_tag["primary_pump_a_cmd"].why

    for exp in (MAX_FORCE_S + 1.0, math.inf, math.nan):
        ok, refused = check_manual(
            {"reuse_valve_cmd": Manual(50.0, 100.0 + exp)}, OUTPUTS, 100.0, MAX_FORCE_S
        )
        assert not ok and "max_force_s" in refused[0].why
    for v in (math.nan, math.inf, -1.0, 100.0001):
        ok, refused = check_manual({"reuse_valve_cmd": Manual(v, 1.0)}, OUTPUTS, 0.0, MAX_FORCE_S)
        assert not ok and len(refused) == 1, v


def test_check_setpoint_refuses_non_numbers_and_out_of_range() -> None:
    for v in (math.nan, math.inf, -5.0, 9.99, 40.01, True, "35"):
        assert check_setpoint(v, 10.0, 40.0), v
    for v in (10.0, 35, 40.0):
        assert check_setpoint(v, 10.0, 40.0) == ""
