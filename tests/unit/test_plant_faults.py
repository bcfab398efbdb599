"""The fault API: every fault has a visible effect, clears cleanly, and bad requests say why."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from plc_io.plant_config import PlantConfig
from sim import faults, plant
from sim.faults import FAULT_NAMES, FaultError, active, clear, clear_all, inject

RUN = {
    "reuse_valve_cmd": 100.0,
    "drycooler_fan_cmd": 15.0,
    "primary_pump_a_cmd": True,
    "primary_pump_b_cmd": False,
    "primary_pump_speed_cmd": 100.0,
    "secondary_pump_cmd": True,
    "secondary_pump_speed_cmd": 100.0,
    "customer_isolation_cmd": True,
    "reuse_isolation_cmd": True,
}
Reading = dict[str, float | bool]


def _running() -> plant.PlantState:
    s = plant.initial(PlantConfig(it_ripple_pct=0.0), t0_s=150 * 86400.0)
    for _ in range(60):
        s = plant.step(s, RUN, 10.0)
    return s


def _after(s: plant.PlantState, seconds: float = 600.0, cmds: dict | None = None):
    for _ in range(int(seconds // 10)):
        s = plant.step(s, cmds or {}, 10.0)
    return plant.measure(s), plant.truth(s)


# name, target, value, extra commands after injection, check(faulty meas, truth, clean meas, truth)
Check = Callable[[Reading, dict, Reading, dict], bool]
CASES: list[tuple[str, str, float, dict, Check]] = [
    (
        "leak",
        "primary",
        20.0,
        {},
        lambda m, t, m0, t0: (
            m["leak_primary"] and m["primary_pressure"] < m0["primary_pressure"] - 0.5
        ),
    ),
    (
        "leak",
        "reuse",
        20.0,
        {},
        lambda m, t, m0, t0: (
            m["leak_reuse"] and m["secondary_pressure"] < m0["secondary_pressure"] - 1
        ),
    ),
    (
        "customer_offline",
        "",
        1.0,
        {},
        lambda m, t, m0, t0: (
            not m["customer_ready"] and m["customer_flow"] == 0 and m0["customer_flow"] > 0
        ),
    ),
    (
        "sensor_stuck",
        "it_return_temp",
        1.0,
        {"reuse_valve_cmd": 0.0},
        lambda m, t, m0, t0: abs(m["it_return_temp"] - t["it_return_temp_c"]) > 0.5,
    ),
    (
        "sensor_fail",
        "tank_top_temp",
        1.0,
        {},
        lambda m, t, m0, t0: math.isnan(m["tank_top_temp"]) and math.isfinite(m0["tank_top_temp"]),
    ),
    (
        "sensor_fail",
        "primary_pump_a_running",
        1.0,
        {},
        lambda m, t, m0, t0: m["primary_pump_a_running"] is False and m0["primary_pump_a_running"],
    ),
    (
        "sensor_bias",
        "it_supply_temp",
        -3.0,
        {},
        lambda m, t, m0, t0: m["it_supply_temp"] == pytest.approx(t["it_supply_temp_c"] - 3.0),
    ),
    (
        "pump_fail",
        "primary_pump_a",
        1.0,
        {},
        lambda m, t, m0, t0: not m["primary_pump_a_running"] and m["primary_flow"] == 0.0,
    ),
    (
        "pump_fail",
        "secondary_pump",
        1.0,
        {},
        lambda m, t, m0, t0: not m["secondary_pump_running"] and m["secondary_flow"] == 0.0,
    ),
    (
        "valve_stuck",
        "reuse_valve",
        1.0,
        {"reuse_valve_cmd": 0.0},
        lambda m, t, m0, t0: m["reuse_valve_pos"] == 100.0 and m0["reuse_valve_pos"] == 0.0,
    ),
    (
        "drycooler_fan_fail",
        "",
        1.0,
        {},
        lambda m, t, m0, t0: (
            m["drycooler_fault"]
            and t["fan_power_kw"] == 0
            and t["drycooler_kw"] < t0["drycooler_kw"]
        ),
    ),
    (
        "it_load_step",
        "",
        120.0,
        {},
        lambda m, t, m0, t0: (
            m["it_power"] == pytest.approx(120.0) and m0["it_power"] == pytest.approx(200.0)
        ),
    ),
    (
        "ambient_override",
        "",
        33.0,
        {},
        lambda m, t, m0, t0: (
            m["ambient_temp"] == 33.0 and m["drycooler_out_temp"] > m0["drycooler_out_temp"]
        ),
    ),
    (
        "hx_fouling",
        "",
        0.8,
        {},
        lambda m, t, m0, t0: t["hx_kw"] < 0.8 * t0["hx_kw"],
    ),
]


def test_every_fault_name_is_exercised() -> None:
    assert {c[0] for c in CASES} == set(FAULT_NAMES)


@pytest.mark.parametrize(("name", "target", "value", "cmds", "check"), CASES, ids=lambda x: str(x))
def test_fault_has_a_visible_effect_and_clears(
    name: str, target: str, value: float, cmds: dict, check: Check
) -> None:
    s = _running()
    faulty = inject(s, name, target, value)
    assert [(f.name, f.target) for f in active(faulty)] == [(name, target)]
    assert active(s) == ()  # inject is pure
    m, t = _after(faulty, cmds=cmds)
    m0, t0 = _after(s, cmds=cmds)
    assert check(m, t, m0, t0)
    cleared = clear(faulty, name, target)
    assert active(cleared) == ()
    assert plant.measure(cleared).keys() == plant.measure(s).keys()
    if name != "valve_stuck":  # the valve stays where the fault left it
        assert _after(cleared, cmds=cmds)[0] == m0


def test_reinject_replaces_and_clear_all_clears() -> None:
    s = inject(_running(), "it_load_step", value=100.0)
    s = inject(s, "it_load_step", value=150.0)
    s = inject(s, "leak", "reuse", 2.0)
    assert [(f.name, f.value) for f in active(s)] == [("it_load_step", 150.0), ("leak", 2.0)]
    assert active(clear_all(s)) == ()
    assert clear(s, "hx_fouling") is s  # clearing an inactive fault is a no-op


def test_single_target_fault_accepts_empty_target() -> None:
    s = inject(_running(), "valve_stuck")
    assert active(s)[0].target == "reuse_valve"


@pytest.mark.parametrize(
    ("name", "target", "value", "words"),
    [
        ("leek", "", 1.0, ["'leek'", "expected one of", "leak"]),
        ("leak", "tank", 1.0, ["'leak'", "target", "'tank'", "expected primary, reuse"]),
        ("leak", "", 1.0, ["'leak'", "target", "''"]),
        ("pump_fail", "primary_pump_c", 1.0, ["'primary_pump_c'", "primary_pump_a"]),
        ("sensor_stuck", "it_supply_tmp", 1.0, ["'it_supply_tmp'", "input tag"]),
        ("sensor_bias", "leak_reuse", 1.0, ["'leak_reuse'", "boolean"]),
        ("hx_fouling", "hx", 0.5, ["'hx'", "no target"]),
        ("hx_fouling", "", 0.95, ["value", "0.95", "0..0.9"]),
        ("it_load_step", "", -5.0, ["value", "-5.0", "kW"]),
        ("ambient_override", "", float("nan"), ["value", "nan", "°C"]),
        ("leak", "primary", 0.0, ["value", "0.0", "l/min"]),
    ],
)
def test_bad_requests_raise_fault_error_naming_field_value_expected(
    name: str, target: str, value: float, words: list[str]
) -> None:
    s = _running()
    with pytest.raises(FaultError) as info:
        inject(s, name, target, value)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "expected" in message
    assert isinstance(info.value, ValueError)


def test_clear_validates_too() -> None:
    with pytest.raises(FaultError, match="'nope'"):
        clear(_running(), "nope")
    with pytest.raises(FaultError, match="target"):
        clear(_running(), "leak", "everywhere")


def test_check_normalises_without_a_state() -> None:
    assert faults.check("valve_stuck", "") == "reuse_valve"
    assert faults.check("sensor_fail", "it_power") == "it_power"
