"""The supervisor step on hand-built images: runtime faults, refused requests, pumps, events.

Each test drives a `Supervisor` scan by scan on a fake clock (the scan time is an argument) and
asserts the whole decision a user would see: reject reasons, events, outputs and their levels.
"""

from __future__ import annotations

from controller.arbitration import Level, Manual
from controller.modes import Mode
from controller.supervisor import Commands, Decision, Supervisor
from tests.unit.core_helpers import CFG, live, plant_like


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


# ---- 7.13: requests are checked against their tags before arbitration ----------------------


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


# ---- 8.9: transitions are events, not every scan -------------------------------------------


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
