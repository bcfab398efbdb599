"""The interlock engine: delays, latches, resets, bypasses and the merge rule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from controller.arbitration import Level, Manual
from controller.docgen import matrix_markdown
from controller.supervisor import Commands, Supervisor, SupervisorConfig
from interlocks.engine import InterlockState, evaluate
from interlocks.rules import RULES, RULES_BY_ID, Condition, Effect, Rule, matrix_lines
from interlocks.validation import Point
from plc_io.image import Quality, Sample
from plc_io.site import SiteError, demo_site_text, loads_site
from tests.unit.core_helpers import CFG, HEALTHY, SITE, image

TH = CFG.thresholds


def pts(**changes: object) -> dict[str, Point]:
    p = {k: Point(v, True) for k, v in HEALTHY.items()}
    for k, v in changes.items():
        p[k] = v if isinstance(v, Point) else Point(v, True)
    return p


def run(points: dict[str, Point], times: list[float], state=None, **kw):
    state = state or InterlockState()
    v = None
    for t in times:
        v = evaluate(points, state, t, TH, **kw)
        state = v.state
    return v


def test_healthy_plant_forces_nothing() -> None:
    v = run(pts(), [0, 1, 10])
    assert not v.forced and not v.active and not v.events


def test_supply_high_acts_only_after_its_delay() -> None:
    hot = pts(it_supply_temp=46.0)
    assert "IL-01" not in run(hot, [0.0, 1.9]).active
    v = run(hot, [0.0, 2.0])
    assert "IL-01" in v.active and v.forced["drycooler_fan_cmd"].value == 100.0


def test_supply_flipping_between_hot_and_unknown_still_acts() -> None:
    state = InterlockState()
    for i, t in enumerate([0.0, 0.5, 1.0, 1.5, 2.0]):
        p = pts(it_supply_temp=46.0 if i % 2 == 0 else Point(None, False, "quality"))
        v = evaluate(p, state, t, TH)
        state = v.state
    assert v.active & {"IL-01", "IL-02"} and v.forced["drycooler_fan_cmd"].value == 100.0


def test_hx_joins_as_a_sink_only_when_the_tank_is_colder() -> None:
    v = run(pts(it_supply_temp=46.0, tank_bottom_temp=30.0, it_return_temp=50.0), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 100.0
    assert v.forced["secondary_pump_cmd"].value is True
    # a tank hotter than the return would heat the primary: the valve goes to bypass
    v = run(pts(it_supply_temp=46.0, tank_bottom_temp=60.0, it_return_temp=50.0), [0, 3])
    assert v.forced["reuse_valve_cmd"] == (0.0, ("IL-01",))
    assert "secondary_pump_cmd" not in v.forced


def test_leak_isolation_wins_over_cooling_wishes() -> None:
    p = pts(it_supply_temp=46.0, tank_bottom_temp=30.0, it_return_temp=50.0, leak_reuse=True)
    v = run(p, [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 0.0
    assert v.forced["reuse_valve_cmd"].by == ("IL-04",)
    assert v.forced["secondary_pump_cmd"].value is False
    assert v.forced["drycooler_fan_cmd"].value == 100.0  # cooling still asked for elsewhere


def test_more_cooling_wins_between_non_leak_rules() -> None:
    # freeze protection wants fans at minimum; high supply wants them at 100 %
    p = pts(it_supply_temp=46.0, ambient_temp=-10.0, drycooler_out_temp=2.0)
    v = run(p, [0, 31, 62])
    assert {"IL-01", "IL-09"} <= v.active
    assert v.forced["drycooler_fan_cmd"].value == 100.0


def test_leak_latches_and_needs_dry_and_reset() -> None:
    v = run(pts(leak_primary=True), [0])
    assert v.latched == {"IL-05"}
    dry = pts()
    v = run(dry, [1, 2], v.state)
    assert v.latched == {"IL-05"} and "IL-05" in v.active
    v = evaluate(pts(leak_primary=True), v.state, 3, TH, reset=True)
    assert v.latched == {"IL-05"} and v.events[0].kind == "reset_refused"
    v = evaluate(dry, v.state, 4, TH, reset=True)
    assert not v.latched and not v.active
    assert [e.kind for e in v.events] == ["trip_reset", "interlock_cleared"]


def test_primary_leak_never_stops_primary_pumps() -> None:
    v = run(pts(leak_primary=True), [0])
    assert "primary_pump_a_cmd" not in v.forced or v.forced["primary_pump_a_cmd"].value is True


def test_bypass_suppresses_effects_until_expiry_and_never_on_safety_rules() -> None:
    hot_tank = pts(tank_top_temp=90.0)
    v = run(hot_tank, [0, 3], bypasses={"IL-06": 100.0})
    assert "IL-06" in v.active and "IL-06" in v.bypassed and "reuse_valve_cmd" not in v.forced
    v = evaluate(hot_tank, v.state, 101, TH, bypasses={"IL-06": 100.0})
    assert "IL-06" not in v.bypassed and v.forced["reuse_valve_cmd"].value == 0.0
    v = run(pts(leak_reuse=True), [0], bypasses={"IL-04": 1e9})
    assert v.forced["reuse_isolation_cmd"].value is False and not v.bypassed


def test_link_loss_raises_il08() -> None:
    v = run(pts(), [0], link_ok=False)
    assert "IL-08" in v.active


def test_unknown_flow_counts_as_low() -> None:
    v = run(pts(primary_flow=Point(None, False, "quality")), [0, 5])
    assert v.forced["primary_pump_b_cmd"].value is True


def test_rule_table_as_design_states() -> None:
    assert [r.id for r in RULES] == [f"IL-0{i}" for i in range(1, 10)]
    for rid in ("IL-01", "IL-02", "IL-04", "IL-05"):
        assert not RULES_BY_ID[rid].bypassable
    assert {r.id for r in RULES if r.latching} == {"IL-04", "IL-05"}
    assert all(r.max_bypass_s <= 4 * 3600 for r in RULES)


REDUNDANT_SITE = """
[tags.it_supply_temp_b]
direction = "input"
type = "float"
unit = "°C"
range = [-20.0, 120.0]
description = "Second supply sensor"
modbus = { table = "input", address = 40, encoding = "int16", scale = 0.01 }
"""


def redundant_site():
    text = demo_site_text().replace(
        "[interlocks]\n", '[interlocks]\nredundant = { it_supply_temp = "it_supply_temp_b" }\n'
    )
    return loads_site(text + REDUNDANT_SITE)


def test_redundant_sensors_worse_of_two_drives_the_interlock() -> None:
    site = redundant_site()
    cfg = SupervisorConfig.from_site(site)
    sup = Supervisor(cfg)
    t = 0.0
    hot_plant = {"it_return_temp": 56.0, "drycooler_out_temp": 45.5}
    for i in range(5):  # A reads normal, B reads hot: the hotter valid one counts
        t += 1
        d = sup.step(
            image(t, it_supply_temp=35.0 + 0.01 * i, it_supply_temp_b=46.0, **hot_plant), t
        )
    assert "IL-01" in d.active
    armed = replace(cfg, validation=replace(cfg.validation, plausibility_settle_s=0.0))
    sup = Supervisor(armed)
    for i in range(5):  # B hot but implausible (above the return): the pair is unknown, never A
        t += 1
        d = sup.step(image(t, it_supply_temp=35.0 + 0.01 * i, it_supply_temp_b=46.0), t)
    assert "IL-02" in d.active and d.invalid["it_supply_temp"] == "implausible"
    sup = Supervisor(cfg)
    for i in range(5):  # B dead: A alone is enough, no IL-02
        t += 1
        d = sup.step(image(t, it_supply_temp=35.0 + 0.01 * i, it_supply_temp_b=math.nan), t)
    assert not d.active & {"IL-01", "IL-02"}
    for _ in range(5):  # both dead: unknown, fail toward cooling
        t += 1
        d = sup.step(image(t, it_supply_temp=math.nan, it_supply_temp_b=math.nan), t)
    assert "IL-02" in d.active


def test_redundant_pair_must_name_analogue_inputs() -> None:
    text = demo_site_text().replace(
        "[interlocks]\n", '[interlocks]\nredundant = { it_supply_temp = "leak_reuse" }\n'
    )
    with pytest.raises(SiteError) as e:
        loads_site(text)
    assert [str(p) for p in e.value.problems] == [
        "interlocks.redundant.it_supply_temp: 'leak_reuse': expected an analogue input tag"
    ]


# ---- a clock that steps backwards never suspends a delay --------------------------------


def test_clock_stepping_back_an_hour_mid_delay_does_not_suspend_il01() -> None:
    hot = pts(it_supply_temp=46.0)
    delay = RULES_BY_ID["IL-01"].delay_s
    times = [0.0, 0.5, 1.0]  # 1 s of the 2 s delay accumulated, then NTP steps back an hour
    back = [1.0 - 3600.0 + 0.5 * k for k in range(0, 6)]
    state, acted_after = InterlockState(), None
    elapsed, last = 0.0, None
    for t in times + back:
        elapsed += max(0.0, t - last) if last is not None else 0.0
        last = t
        v = evaluate(hot, state, t, TH)
        state = v.state
        if "IL-01" in v.active and acted_after is None:
            acted_after = elapsed
    assert acted_after == delay  # after 2 s of accumulated scan time, not an hour later


def test_clock_stepping_back_through_the_supervisor_still_cools() -> None:
    sup = Supervisor(CFG)
    t = 1000.0
    for _ in range(3):
        d = sup.step(image(t, it_supply_temp=46.0), t)
        t += 0.5
    t -= 3600.0  # the clock steps back; old samples now look stamped in the future
    for _ in range(3):
        d = sup.step(image(t, it_supply_temp=46.0), t)
        t += 0.5
    assert "IL-01" in d.active and d.outputs["drycooler_fan_cmd"].value == 100.0


# ---- a latch is never cleared on an unknown sensor ------------------------------------


@pytest.mark.parametrize(
    "unknown",
    [
        Point(None, False, "quality"),
        Point(False, False, "stale"),
        Point(None, False, "type"),
    ],
)
def test_a_leak_latch_is_not_reset_while_its_input_is_unknown(unknown: Point) -> None:
    v = run(pts(leak_reuse=True), [0.0])
    assert v.latched == {"IL-04"}
    v = evaluate(pts(leak_reuse=unknown), v.state, 1.0, TH, reset=True)
    assert v.latched == {"IL-04"} and v.forced["secondary_pump_cmd"].value is False
    assert [e.kind for e in v.events] == ["reset_refused"]
    assert v.events[0].detail["why"] == RULES_BY_ID["IL-04"].reset.text
    v = evaluate(pts(leak_reuse=False), v.state, 2.0, TH, reset=True)
    assert not v.latched


def test_a_leak_input_lost_does_not_latch_but_keeps_an_existing_latch() -> None:
    lost = Point(None, False, "quality")
    v = run(pts(leak_reuse=lost), [0.0, 1.0, 2.0])
    assert not v.latched  # a PLC link blip does not latch a trip that needs an engineer
    v = run(pts(leak_reuse=True), [3.0], v.state)
    v = run(pts(leak_reuse=lost), [4.0, 5.0], v.state)
    assert v.latched == {"IL-04"}


def test_supervisor_keeps_leak_trip_when_reset_arrives_with_the_leak_input_lost() -> None:
    sup = Supervisor(CFG)
    d = sup.step(image(0.0, leak_reuse=True), 0.0)
    assert d.mode.value == "LEAK_TRIP"
    lost = Sample(None, Quality.COMMS_LOST, 1.0)
    d = sup.step(image(1.0, leak_reuse=lost), 1.0, Commands(reset=True))
    assert "IL-04" in d.latched and d.mode.value == "LEAK_TRIP"
    assert d.outputs["reuse_isolation_cmd"].value is False


# ---- every rule's reset condition is data, evaluated by the engine, in the matrix -------


def test_every_rule_declares_its_reset_condition_and_the_matrix_shows_it() -> None:
    site = SITE
    outs = tuple(t.name for t in site.outputs)
    lines = "\n".join(matrix_lines(outs, TH))
    md = matrix_markdown(site)
    for r in RULES:
        assert isinstance(r.reset, Condition) and r.reset.text
        assert r.reset.text in lines and r.reset.text in md
    assert "| reset |" in md.splitlines()[0]


def test_the_engine_evaluates_a_rules_reset_condition() -> None:
    # a non-latching rule with hysteresis in its reset: acts above 50, clears only below 40
    hyst = Rule(
        "IL-T",
        "test",
        "tank_top_temp above 50",
        "fans 100",
        lambda p, th: p["tank_top_temp"].num() > 50.0,
        (Effect("drycooler_fan_cmd", 100.0),),
        Condition("cool", "tank_top_temp below 40", lambda p, th: p["tank_top_temp"].num() < 40.0),
    )
    rules = (hyst,)
    v = evaluate(pts(tank_top_temp=55.0), InterlockState(), 0.0, TH, rules=rules)
    assert "IL-T" in v.active
    v = evaluate(pts(tank_top_temp=45.0), v.state, 1.0, TH, rules=rules)
    assert "IL-T" in v.active  # cause gone, reset condition not yet met
    v = evaluate(pts(tank_top_temp=39.0), v.state, 2.0, TH, rules=rules)
    assert "IL-T" not in v.active


# ---- the reuse circuit as an emergency sink, the customer kept in service -------

HOT_SINK = {"it_supply_temp": 46.0, "tank_bottom_temp": 30.0, "it_return_temp": 50.0}


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("secondary over-pressure (before IL-06's delay)", {"secondary_pressure": 6.0}),
        ("tank top over its limit", {"tank_top_temp": 90.0}),
        ("secondary pressure unknown", {"secondary_pressure": Point(None, False, "quality")}),
        ("tank top unknown", {"tank_top_temp": Point(None, False, "stale")}),
        ("reuse leak input unknown", {"leak_reuse": Point(None, False, "quality")}),
        ("primary leak input unknown", {"leak_primary": Point(None, False, "stale")}),
    ],
)
def test_il01_uses_the_reuse_circuit_only_when_its_protections_are_valid_and_normal(
    why: str, change: dict
) -> None:
    v = run(pts(**HOT_SINK), [0, 3])
    assert v.forced["secondary_pump_cmd"].value is True  # the HX is a sink: in service
    v = run(pts(**HOT_SINK, **change), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 0.0, why
    assert "secondary_pump_cmd" not in v.forced or v.forced["secondary_pump_cmd"].value is False
    assert "reuse_isolation_cmd" not in v.forced or v.forced["reuse_isolation_cmd"].value is False


def test_il01_keeps_the_customer_path_open_unless_its_supply_is_hot_or_unknown() -> None:
    v = run(pts(it_supply_temp=46.0), [0, 3])
    assert v.forced["customer_isolation_cmd"] == (True, ("IL-01",))
    v = run(pts(it_supply_temp=46.0, customer_supply_temp=Point(None, False, "quality")), [0, 3])
    assert "customer_isolation_cmd" not in v.forced
    for leak in ("leak_reuse", "leak_primary"):  # IL-04/05 protect this valve: unknown is no go
        v = run(pts(it_supply_temp=46.0, **{leak: Point(None, False, "quality")}), [0, 3])
        assert "customer_isolation_cmd" not in v.forced, leak
    hot_customer = TH.customer_supply_high_c + 1.0
    v = run(pts(it_supply_temp=46.0, customer_supply_temp=hot_customer), [0, 1, 3])
    assert "IL-07" in v.active and v.forced["customer_isolation_cmd"] == (False, ("IL-07",))


def test_with_the_dry_cooler_failed_the_hx_is_a_sink_by_any_margin() -> None:
    # tank 1 K colder than the return: below the usual margin, but a sink all the same
    near = {"it_supply_temp": 46.0, "tank_bottom_temp": 49.0, "it_return_temp": 50.0}
    assert TH.hx_sink_margin_k > 1.0
    v = run(pts(**near), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 0.0
    v = run(pts(**near, drycooler_fault=True), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 100.0
    assert v.forced["secondary_pump_cmd"].value is True
    # a tank hotter than the return would heat the primary even now: never a sink
    v = run(pts(**dict(near, tank_bottom_temp=51.0), drycooler_fault=True), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 0.0
    # an unknown fault input does not relax the margin
    v = run(pts(**near, drycooler_fault=Point(None, False, "quality")), [0, 3])
    assert v.forced["reuse_valve_cmd"].value == 0.0


def test_il01_sends_the_valve_to_bypass_in_maintenance_when_the_tank_is_no_sink() -> None:
    sup = Supervisor(CFG)
    manual = {"reuse_valve_cmd": Manual(100.0, 3600.0, "engineer")}
    cmds = Commands(maintenance=True, manual=manual)
    no_sink = {"tank_bottom_temp": 60.0, "it_return_temp": 50.0}
    t = 0.0
    for k in range(10):
        d = sup.step(image(t, it_supply_temp=44.0 + 0.01 * (k % 2), **no_sink), t, cmds)
        t += 0.5
    assert d.outputs["reuse_valve_cmd"].level is Level.MANUAL  # the engineer has the valve
    for k in range(8):  # warming at 1 K/s, within what the rate check believes
        d = sup.step(image(t, it_supply_temp=min(44.5 + 0.5 * k, 46.0), **no_sink), t, cmds)
        t += 0.5
    assert "IL-01" in d.active
    assert d.outputs["reuse_valve_cmd"] == (0.0, Level.INTERLOCK, "IL-01")


# ---- every declared field is used; bypass limits enforced -------------------------------


def test_every_rules_delay_fits_its_required_response_time() -> None:
    for r in RULES:
        assert r.delay_s <= r.response_s, r.id


def test_interlock_active_event_carries_hazard_effect_and_alarm() -> None:
    v = run(pts(it_supply_temp=46.0), [0, 3])
    (e,) = [e for e in v.events if e.kind == "interlock_active"]
    rule = RULES_BY_ID["IL-01"]
    assert e.detail == {"hazard": rule.hazard, "effect": rule.effect_text, "alarm": "IT"}
    v = run(pts(tank_top_temp=90.0), [0, 3])
    (e,) = [e for e in v.events if e.kind == "interlock_active"]
    assert e.detail["alarm"] == "operator"


def test_every_rule_field_is_used_somewhere() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Rule)}
    assert fields == {
        "id",  # everywhere
        "hazard",  # events, matrix
        "cause_text",  # matrix
        "effect_text",  # interlock_active event
        "cause",  # engine
        "forces",  # engine, matrix, pair tests
        "reset",  # engine, matrix
        "delay_s",  # engine
        "latching",  # engine
        "bypassable",  # engine (refusal)
        "max_bypass_s",  # engine (refusal)
        "response_s",  # tests: delay fits, HIL budget
        "protects",  # engine merge
        "alarm",  # interlock_active event
        "group",  # engine shared clock
    }


def _refusals(v) -> list[tuple[str, str]]:
    return [(e.source, str(e.detail["why"])) for e in v.events if e.kind == "bypass_refused"]


def test_a_bypass_longer_than_the_maximum_is_refused_with_an_event() -> None:
    hot_tank = pts(tank_top_temp=90.0)
    limit = min(RULES_BY_ID["IL-06"].max_bypass_s, TH.max_bypass_s)
    too_long = {"IL-06": 3 + limit + 1.0}
    v = run(hot_tank, [0], bypasses=too_long)
    assert [s for s, _ in _refusals(v)] == ["IL-06"]
    v = run(hot_tank, [3], v.state, bypasses=too_long)
    assert not v.bypassed and v.forced["reuse_valve_cmd"].value == 0.0
    assert not _refusals(v)  # reported once, not every scan
    v = run(hot_tank, [0, 3], bypasses={"IL-06": 3 + limit})
    assert v.bypassed == {"IL-06"} and not _refusals(v)


@pytest.mark.parametrize(
    ("rid", "expiry", "why"),
    [
        ("IL-01", 100.0, "not bypassable"),
        ("IL-04", 100.0, "not bypassable"),
        ("IL-99", 100.0, "unknown rule"),
        ("IL-06", math.nan, "is not a time"),
        ("IL-06", math.inf, "longer than max_bypass_s"),
    ],
)
def test_an_impossible_bypass_is_refused_with_an_event(rid: str, expiry: float, why: str) -> None:
    v = run(pts(tank_top_temp=90.0, it_supply_temp=46.0), [0.0], bypasses={rid: expiry})
    assert not v.bypassed
    (refusal,) = _refusals(v)
    assert refusal[0] == rid and why in refusal[1]


def test_il01_holds_the_duty_pump_on_at_design_speed() -> None:
    """More flow through an air-limited dry cooler leaves it warmer: IL-01/IL-02 hold the loop
    at its design flow rather than pushing both pumps to 100 %."""
    for cause in ({"it_supply_temp": 46.0}, {"it_supply_temp": Point(None, False, "nan")}):
        v = run(pts(**cause), [0, 3])
        assert v.forced["primary_pump_a_cmd"].value is True
        assert v.forced["primary_pump_speed_cmd"].value == SITE.control.primary_pump_speed_pct
        assert "primary_pump_b_cmd" not in v.forced


def test_under_il01_a_failed_duty_pump_still_hands_over_to_the_standby() -> None:
    sup = Supervisor(CFG)
    t, d = 0.0, None
    for k in range(40):
        a_runs = k < 4  # pump A trips while the supply is hot
        img = image(t, it_supply_temp=46.0 + 0.01 * (k % 2), primary_pump_a_running=a_runs)
        d = sup.step(img, t)
        t += 1.0
    assert "IL-01" in d.active
    assert d.outputs["primary_pump_b_cmd"].value is True


def test_under_il02_every_safe_sink_is_held_in_service_at_the_interlock_level() -> None:
    """Supply sensor lost, tank colder than the return, customer supply normal: the PLC is
    told to charge the tank through the HX and keep the customer open, whatever the mode."""
    sup = Supervisor(CFG)
    t, d = 0.0, None
    for k in range(6):
        d = sup.step(image(t, it_supply_temp=math.nan, it_return_temp=45.0 + 0.01 * (k % 2)), t)
        t += 0.5
    assert "IL-02" in d.active
    want = {
        "drycooler_fan_cmd": 100.0,
        "reuse_valve_cmd": 100.0,
        "secondary_pump_cmd": True,
        "secondary_pump_speed_cmd": SITE.control.secondary_pump_speed_pct,
        "reuse_isolation_cmd": True,
        "customer_isolation_cmd": True,
    }
    for name, value in want.items():
        assert d.outputs[name].value == value, name
        assert d.outputs[name].level is Level.INTERLOCK, name


# ---- a reset names the rules it resets ----------------------------------------------


def test_a_reset_naming_one_rule_leaves_the_others_latched() -> None:
    v = run(pts(leak_reuse=True, leak_primary=True), [0.0])
    assert v.latched == {"IL-04", "IL-05"}
    v = evaluate(pts(), v.state, 1.0, TH, reset=frozenset({"IL-04"}))
    assert v.latched == {"IL-05"}
    assert [(e.kind, e.source) for e in v.events] == [
        ("trip_reset", "IL-04"),
        ("interlock_cleared", "IL-04"),
    ]
    v = evaluate(pts(), v.state, 2.0, TH, reset=frozenset({"IL-05"}))
    assert not v.latched and not v.active


@pytest.mark.parametrize("nothing", [False, frozenset(), frozenset({"IL-06"}), 1, "IL-04", None])
def test_only_true_or_a_set_naming_the_rule_resets_it(nothing: object) -> None:
    """No reset, an empty set, a set naming another rule, or a request of the wrong kind (a
    truthy number, a bare string): the latch stays, and no event claims otherwise."""
    v = run(pts(leak_reuse=True), [0.0])
    v = evaluate(pts(), v.state, 1.0, TH, reset=nothing)  # type: ignore[arg-type]
    assert v.latched == {"IL-04"} and not v.events


def test_a_named_reset_is_refused_while_its_own_cause_holds() -> None:
    v = run(pts(leak_reuse=True, leak_primary=True), [0.0])
    v = evaluate(pts(leak_primary=True), v.state, 1.0, TH, reset=frozenset({"IL-04", "IL-05"}))
    assert v.latched == {"IL-05"}
    assert [(e.kind, e.source) for e in v.events if e.kind.startswith(("trip", "reset"))] == [
        ("trip_reset", "IL-04"),
        ("reset_refused", "IL-05"),
    ]


def test_leak_trip_is_left_only_when_both_leak_latches_are_reset() -> None:
    """IL-04 and IL-05 latched, both zones dry again: resetting IL-04 alone keeps LEAK_TRIP
    (IL-05 still latched, the reuse circuit still isolated); resetting IL-05 then leaves it."""
    sup = Supervisor(CFG)
    d = sup.step(image(0.0, leak_reuse=True, leak_primary=True), 0.0)
    assert d.latched == {"IL-04", "IL-05"} and d.mode.value == "LEAK_TRIP"
    d = sup.step(image(1.0), 1.0, Commands(reset=frozenset({"IL-04"})))
    assert d.latched == {"IL-05"} and d.mode.value == "LEAK_TRIP"
    assert d.outputs["reuse_isolation_cmd"].value is False
    assert d.outputs["secondary_pump_cmd"].value is False
    d = sup.step(image(2.0), 2.0)
    assert d.mode.value == "LEAK_TRIP"
    d = sup.step(image(3.0), 3.0, Commands(reset=frozenset({"IL-05"})))
    assert not d.latched and d.mode.value == "DRY_COOLER_REJECT"


def test_a_reset_of_a_rule_that_is_no_leak_does_not_end_a_leak_trip() -> None:
    """The leak latch cleared, but its zone's neighbour was unknown at that reset: the mode
    stays LEAK_TRIP, and a later reset naming only IL-06 does not end it; one naming a leak
    rule does."""
    sup = Supervisor(CFG)
    sup.step(image(0.0, leak_reuse=True), 0.0)
    lost = Sample(None, Quality.COMMS_LOST, 1.0)
    d = sup.step(image(1.0, leak_primary=lost), 1.0, Commands(reset=frozenset({"IL-04"})))
    assert not d.latched and d.mode.value == "LEAK_TRIP"  # an unknown zone is never dry
    d = sup.step(image(2.0), 2.0, Commands(reset=frozenset({"IL-06"})))
    assert d.mode.value == "LEAK_TRIP"
    d = sup.step(image(3.0), 3.0, Commands(reset=frozenset({"IL-04"})))
    assert d.mode.value == "DRY_COOLER_REJECT"


def test_any_reset_clears_the_pump_failure_memory_an_empty_one_does_not() -> None:
    sup = Supervisor(CFG, memory={"pumps_failed": ["secondary_pump_running"]})
    d = sup.step(image(0.0, secondary_pump_running=False), 0.0, Commands(reset=frozenset()))
    assert sup.pump_failed == {"secondary_pump_running"}
    assert not [e for e in d.events if e.kind == "pump_reset"]
    d = sup.step(
        image(1.0, secondary_pump_running=False), 1.0, Commands(reset=frozenset({"IL-06"}))
    )
    assert not sup.pump_failed
    assert [e.detail for e in d.events if e.kind == "pump_reset"] == [
        {"pumps": ["secondary_pump_running"]}
    ]
