"""The simulated heat meter: its totaliser counts the delivered heat with its own systematic
error, wraps at its rollover count, and can be swapped for a new meter (`meter_replace`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from controller.cli import main
from plc_io.codec import decode, encode
from plc_io.plant_config import PlantConfig
from plc_io.site import SiteError, demo_site, demo_site_text, loads_site
from sim import plant
from sim.faults import FaultError, active, clear, clear_all, inject
from sim.plc import SimPlc
from sim.scenario import ScenarioError, load_scenario, parse_scenario
from tests.hil.conftest import free_port

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
# a winter day with the pool occupied: the customer takes heat all the time
T0_S = 20 * 86400.0 + 8 * 3600.0


def _with_plant(**keys: object) -> str:
    """The demo site text with these `[plant]` keys added (the demo file does not list them)."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return demo_site_text().replace("[plant]\n", "[plant]\n" + lines, 1)


def _run(s: plant.PlantState, seconds: float, dt_s: float = 10.0) -> plant.PlantState:
    for _ in range(round(seconds / dt_s)):
        s = plant.step(s, RUN, dt_s)
    return s


def _start(**params: float) -> plant.PlantState:
    return _run(plant.initial(PlantConfig(**params), t0_s=T0_S), 600.0)


def _delivered(s: plant.PlantState) -> float:
    return plant.accounts(s).delivered_kwh


def _meter(s: plant.PlantState) -> float:
    reading = plant.measure(s)["heat_meter_energy"]
    assert isinstance(reading, float)
    assert reading == plant.truth(s)["heat_meter_energy_kwh"]  # one meter, two views
    return reading


def test_an_exact_meter_counts_the_delivered_heat_from_its_start_reading() -> None:
    s = _run(_start(heat_meter_start_kwh=1234.5), 3600.0)
    assert _delivered(s) > 50.0  # the customer took heat: the test measures something
    assert _meter(s) == pytest.approx(1234.5 + _delivered(s), rel=1e-12)


def test_the_reading_wraps_at_the_rollover_count_and_keeps_counting() -> None:
    # 5 kWh below a 1000 kWh rollover: within the hour it wraps
    s0 = plant.initial(
        PlantConfig(heat_meter_start_kwh=995.0, heat_meter_rollover_kwh=1000.0), t0_s=T0_S
    )
    readings = []
    s = s0
    for _ in range(360):
        s = plant.step(s, RUN, 10.0)
        readings.append(_meter(s))
    delivered = _delivered(s)
    assert delivered > 10.0
    assert all(0.0 <= r < 1000.0 for r in readings)
    wraps = [i for i in range(1, len(readings)) if readings[i] < readings[i - 1]]
    assert len(wraps) == 1  # it went through 1000 once and never went backwards otherwise
    assert readings[-1] == pytest.approx(995.0 + delivered - 1000.0, abs=1e-9)


@pytest.mark.parametrize("error_pct", [1.0, -2.5])
def test_a_meter_with_a_systematic_error_counts_that_share_more_or_less(error_pct: float) -> None:
    exact = _run(_start(heat_meter_start_kwh=100.0), 3600.0)
    off = _run(_start(heat_meter_start_kwh=100.0, heat_meter_error_pct=error_pct), 3600.0)
    # the meter's error changes what it shows, never the plant: the same heat was delivered
    assert _delivered(off) == _delivered(exact) and off.tank_c == exact.tank_c
    gain = 1.0 + error_pct / 100.0
    assert _meter(off) - 100.0 == pytest.approx(gain * _delivered(exact), rel=1e-12)
    assert plant.measure(off)["heat_meter_power"] == pytest.approx(
        gain * plant.truth(off)["customer_kw"], rel=1e-12
    )
    assert plant.truth(off)["customer_kw"] > 10.0


def test_a_replaced_meter_counts_on_from_its_own_reading() -> None:
    s = _start(heat_meter_start_kwh=50_000.0)
    d_swap = _delivered(s)
    swapped = inject(s, "meter_replace", "", 12.0)
    assert _meter(swapped) == pytest.approx(12.0)  # the new meter shows its reading at once
    assert _meter(s) == pytest.approx(50_000.0 + d_swap)  # inject is pure
    later = _run(swapped, 1800.0)
    assert _delivered(later) - d_swap > 20.0
    assert _meter(later) == pytest.approx(12.0 + _delivered(later) - d_swap, rel=1e-12)
    # the swap is a meter's affair: the plant delivers exactly what it would have without it
    assert _delivered(later) == _delivered(_run(s, 1800.0))
    # cleared: the original meter is back, showing what it would have counted all along
    assert _meter(clear(later, "meter_replace")) == pytest.approx(50_000.0 + _delivered(later))
    assert _meter(clear_all(later)) == _meter(clear(later, "meter_replace"))


def test_a_second_replacement_replaces_the_first_and_wraps_at_the_rollover() -> None:
    s = _start(heat_meter_rollover_kwh=1000.0, heat_meter_error_pct=1.0)
    s = _run(inject(s, "meter_replace", "", 500.0), 600.0)
    d2 = _delivered(s)
    s = inject(s, "meter_replace", "", 999.0)
    assert [(f.name, f.value) for f in active(s)] == [("meter_replace", 999.0)]
    s = _run(s, 1800.0)
    assert _delivered(s) - d2 > 5.0
    assert _meter(s) == pytest.approx((999.0 + 1.01 * (_delivered(s) - d2)) % 1000.0)
    assert _meter(s) < 999.0  # wrapped


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (1000.0, ["value", "1000.0", "rollover 1000 kWh"]),
        (2000.0, ["value", "2000.0", "rollover 1000 kWh"]),
        (-1.0, ["value", "-1.0", "0..1e12"]),
        (math.nan, ["value", "nan", "kWh"]),
    ],
)
def test_a_replacement_reading_the_meter_cannot_show_is_refused(
    value: float, words: list[str]
) -> None:
    s = _start(heat_meter_rollover_kwh=1000.0)
    with pytest.raises(FaultError) as info:
        inject(s, "meter_replace", "", value)
    for word in words:
        assert word in str(info.value), str(info.value)
    with pytest.raises(FaultError, match="no target"):
        inject(s, "meter_replace", "heat_meter", 1.0)


def test_a_scenario_swaps_the_meter_at_its_time() -> None:
    scenario = parse_scenario(
        {"event": [{"at_s": 600, "name": "meter_replace", "value": 7.0, "duration_s": 600}]}
    )
    s = plant.initial(PlantConfig(heat_meter_start_kwh=300.0), t0_s=T0_S)
    t = 0.0
    seen = []
    for _ in range(180):
        s = scenario.apply_due(s, t, t + 10.0)
        t += 10.0
        seen.append((t, _meter(s), _delivered(s)))
        s = plant.step(s, RUN, 10.0)
    at_swap = next(x for x in seen if x[0] == 600.0)
    during = next(x for x in seen if x[0] == 900.0)
    after = seen[-1]
    assert at_swap[1] == pytest.approx(7.0)
    assert during[1] == pytest.approx(7.0 + during[2] - at_swap[2])
    assert after[1] == pytest.approx(300.0 + after[2])  # the clear refits the original meter


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("heat_meter_start_kwh", 2e8, ["heat_meter_start_kwh 2e+08", "heat_meter_rollover_kwh"]),
        ("heat_meter_rollover_kwh", 0.0, ["heat_meter_rollover_kwh", "0.0", "> 0"]),
        ("heat_meter_error_pct", 25.0, ["heat_meter_error_pct", "25.0", "≤ 20"]),
        ("heat_meter_error_pct", "1", ["heat_meter_error_pct", "'1'"]),
    ],
)
def test_the_site_file_refuses_a_meter_it_cannot_simulate(
    key: str, value: object, words: list[str]
) -> None:
    with pytest.raises(SiteError) as info:
        loads_site(_with_plant(**{key: value}))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_the_site_file_sets_the_meter() -> None:
    text = _with_plant(
        heat_meter_start_kwh=990.0, heat_meter_rollover_kwh=1000.0, heat_meter_error_pct=-1.5
    )
    p = loads_site(text).plant
    assert (p.heat_meter_start_kwh, p.heat_meter_rollover_kwh, p.heat_meter_error_pct) == (
        990.0,
        1000.0,
        -1.5,
    )
    assert PlantConfig().heat_meter_rollover_kwh == 1e8 and PlantConfig().heat_meter_error_pct == 0


def test_the_reading_just_below_the_rollover_travels_the_demo_sites_register() -> None:
    # int32 at 0.1 kWh: the largest reading the default meter shows fits, to its resolution
    tag = demo_site().tag("heat_meter_energy")
    top = 1e8 - 0.05
    back = decode(tag, encode(tag, top))
    assert isinstance(back, float) and abs(back - top) <= 0.05 + 1e-6


def test_the_simulated_plc_takes_the_swap_by_name() -> None:
    site = demo_site()
    plc = SimPlc(site, modbus_port=free_port(), opcua_port=free_port())
    plc.inject("meter_replace", "", 42.0)
    assert plc.measured()["heat_meter_energy"] == pytest.approx(42.0)
    with pytest.raises(FaultError, match="rollover"):
        plc.inject("meter_replace", "", 1e8)
    plc.clear("meter_replace")
    assert plc.measured()["heat_meter_energy"] == pytest.approx(0.0)


def test_a_scenario_swapping_to_a_reading_beyond_the_rollover_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_path = tmp_path / "site.toml"
    site_path.write_text(_with_plant(heat_meter_rollover_kwh=1000.0), encoding="utf-8")
    bad = tmp_path / "swap.toml"
    bad.write_text('[[event]]\nat_s = 3600\nname = "meter_replace"\nvalue = 1500.0\n')
    scenario = load_scenario(bad)  # a reading is a reading: the file alone is fine
    with pytest.raises(ScenarioError) as info:
        scenario.check_plant(loads_site(site_path.read_text()).plant)
    for word in ("swap.toml", "at_s = 3600", "1500.0", "heat_meter_rollover_kwh (1000)"):
        assert word in str(info.value), str(info.value)
    with pytest.raises(ScenarioError, match="1500"):
        SimPlc(
            loads_site(site_path.read_text()),
            scenario=scenario,
            modbus_port=free_port(),
            opcua_port=free_port(),
        )
    # the command line says so in one line and exits 2 before it serves anything
    assert main(["sim", "serve", "--site", str(site_path), "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "1500.0" in err and "heat_meter_rollover_kwh" in err and "\n" not in err
    assert main(["study", "--site", str(site_path), "--scenario", str(bad), "--days", "1"]) == 2
    assert "heat_meter_rollover_kwh" in capsys.readouterr().err
