"""The interlock engine: delays, latches, resets, bypasses and the merge rule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from controller.supervisor import Supervisor, SupervisorConfig
from interlocks.engine import InterlockState, evaluate
from interlocks.rules import RULES, RULES_BY_ID
from interlocks.validation import Point
from plc_io.site import SiteError, demo_site_text, loads_site
from tests.unit.core_helpers import CFG, HEALTHY, image

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
    # a tank hotter than the return would heat the primary: the valve goes to bypass (7.9)
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
