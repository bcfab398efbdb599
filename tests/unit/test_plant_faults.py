"""The fault API: every fault has a visible effect, clears cleanly, and bad requests say why."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from plc_io.plant_config import PlantConfig
from plc_io.site import Site, demo_site, demo_site_text, loads_site
from plc_io.tags import REQUIRED_BOOL_INPUTS
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
    (
        "meter_replace",
        "",
        0.0,
        {},
        # a new meter from 0 has counted only since the swap, the old one from the start; the
        # plant delivers the same heat either way
        lambda m, t, m0, t0: (
            0.0 < m["heat_meter_energy"] < m0["heat_meter_energy"] - 1.0
            and t["delivered_kwh"] == t0["delivered_kwh"]
        ),
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


# ---- a cut wire on a boolean input reads what the site declares (DESIGN §8) ----

ZONE_FAULT = "leak_reuse_zone_fault"


def supervised_site(fail_state: bool | None = None) -> Site:
    """The demo site with the reuse-zone leak cable supervised by the leak-detection module's
    zone fault contact (a new discrete input); `fail_state` of the cable as given (None: none)."""
    text = demo_site_text()
    old = 'description = "Leak, reuse zone (true = wet)"\nfail_state = true'
    assert text.count(old) == 1, "demo site's leak_reuse entry changed: update this helper"
    declared = "" if fail_state is None else f"\nfail_state = {str(fail_state).lower()}"
    text = text.replace(
        old,
        f'description = "Leak, reuse zone (true = wet)"\nsupervised_by = "{ZONE_FAULT}"{declared}',
    )
    taken = {t.modbus.address for t in demo_site().tags if t.modbus.table.value == "discrete"}
    text += f"""
[tags.{ZONE_FAULT}]
direction = "input"
type = "bool"
unit = "bool"
range = [0.0, 1.0]
description = "Leak detection module: reuse zone cable fault (true = faulted)"
fail_state = true
modbus = {{ table = "discrete", address = {max(taken) + 1}, encoding = "bit" }}
"""
    return loads_site(text, "<supervised demo site>")


def _running_on(site: Site) -> plant.PlantState:
    s = plant.initial(site.plant.model_copy(update={"it_ripple_pct": 0.0}), tags=site.tags)
    for _ in range(60):
        s = plant.step(s, RUN, 10.0)
    return s


@pytest.mark.parametrize("name", REQUIRED_BOOL_INPUTS)
def test_a_cut_boolean_input_reads_the_fail_state_its_tag_declares(name: str) -> None:
    site = demo_site()
    declared = site.tag(name).fail_state
    s = _running_on(site)
    cut = plant.measure(inject(s, "sensor_fail", name))[name]
    assert cut is (False if declared is None else declared)
    assert plant.measure(clear(inject(s, "sensor_fail", name), "sensor_fail", name)) == (
        plant.measure(s)
    )


def test_a_cut_leak_cable_reads_wet_and_a_cut_fault_wire_reads_faulted() -> None:
    # the hazard itself: dry zones and a healthy dry cooler, then the wires are cut
    s = _running_on(demo_site())
    healthy = plant.measure(s)
    assert not healthy["leak_reuse"] and not healthy["leak_primary"]
    assert not healthy["drycooler_fault"]
    for name in ("leak_reuse", "leak_primary", "drycooler_fault"):
        assert plant.measure(inject(s, "sensor_fail", name))[name] is True, name


def test_the_plant_takes_its_wiring_from_the_tag_table_it_is_given() -> None:
    # not a list in the plant: flip the declaration in the tags, the reading follows
    site = demo_site()
    flipped = tuple(
        t.model_copy(update={"fail_state": False}) if t.name == "leak_reuse" else t
        for t in site.tags
    )
    s = plant.initial(site.plant, tags=flipped)
    assert plant.measure(inject(s, "sensor_fail", "leak_reuse"))["leak_reuse"] is False
    # without a tag table the plant is wired like the demo site
    assert plant.initial(PlantConfig()).model.wiring == plant.Wiring.from_tags(site.tags)


@pytest.mark.parametrize("fail_state", [None, True])
def test_a_cut_supervised_cable_trips_its_zone_fault_input(fail_state: bool | None) -> None:
    site = supervised_site(fail_state)
    s = _running_on(site)
    healthy = plant.measure(s)
    assert healthy[ZONE_FAULT] is False and healthy["leak_reuse"] is False
    cut = plant.measure(inject(s, "sensor_fail", "leak_reuse"))
    assert cut[ZONE_FAULT] is True
    assert cut["leak_reuse"] is bool(fail_state)
    # a real leak on a whole cable is wet with the zone healthy
    wet = plant.measure(inject(s, "leak", "reuse", 5.0))
    assert wet["leak_reuse"] is True and wet[ZONE_FAULT] is False
    # another cut circuit leaves the reuse zone's fault contact alone
    assert plant.measure(inject(s, "sensor_fail", "leak_primary"))[ZONE_FAULT] is False
    assert (
        plant.measure(clear(inject(s, "sensor_fail", "leak_reuse"), "sensor_fail", "leak_reuse"))[
            ZONE_FAULT
        ]
        is False
    )


# ---- a dead dry cooler is visible to the controller ----


def test_a_dead_dry_cooler_reads_faulted_and_its_outlet_ignores_the_fan_command() -> None:
    s = _running()

    def run(state: plant.PlantState, fan_pct: float) -> tuple[dict, dict]:
        return _after(state, 300.0, {"drycooler_fan_cmd": fan_pct})

    # healthy: more fan, more air, a colder outlet (the outlet follows the command)
    (m_hi, t_hi), (m_lo, t_lo) = run(s, 100.0), run(s, 20.0)
    assert not m_hi["drycooler_fault"]
    assert t_hi["drycooler_out_temp_c"] < t_lo["drycooler_out_temp_c"] - 0.5
    # fans failed: the fault input reads true and the outlet is the same whatever is commanded
    dead = inject(s, "drycooler_fan_fail")
    (m_hi, t_hi), (m_lo, t_lo) = run(dead, 100.0), run(dead, 20.0)
    assert m_hi["drycooler_fault"] is True and m_lo["drycooler_fault"] is True
    assert t_hi["drycooler_out_temp_c"] == t_lo["drycooler_out_temp_c"]
    assert t_hi["fan_power_kw"] == 0.0
