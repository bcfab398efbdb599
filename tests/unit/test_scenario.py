"""Scenario files: loading, validation messages, and timed application to the plant."""

from __future__ import annotations

from pathlib import Path

import pytest

from plc_io.plant_config import PlantConfig
from sim import plant
from sim.faults import active
from sim.run import simulate
from sim.scenario import Scenario, ScenarioError, load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "sim" / "scenarios"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "case.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_load_and_run(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.events
    fig, _ = simulate(PlantConfig(), 3 * 3600.0, dt_s=30.0, scenario=scenario)
    assert abs(fig.balance_error_pct) < 1e-6


def test_events_apply_in_their_window_and_duration_clears(tmp_path: Path) -> None:
    scenario = load_scenario(
        _write(
            tmp_path,
            """
            name = "t"
            [[event]]
            at_s = 100
            name = "leak"
            target = "reuse"
            duration_s = 50
            [[event]]
            at_s = 120
            action = "inject"
            name = "it_load_step"
            value = 150.0
            [[event]]
            at_s = 300
            action = "clear_all"
            """,
        )
    )
    assert isinstance(scenario, Scenario) and scenario.name == "t"
    assert [(e.at_s, e.action, e.name) for e in scenario.events] == [
        (100.0, "inject", "leak"),
        (120.0, "inject", "it_load_step"),
        (150.0, "clear", "leak"),
        (300.0, "clear_all", ""),
    ]
    s = plant.initial(PlantConfig())
    assert scenario.apply_due(s, 0.0, 99.9) is s
    s = scenario.apply_due(s, 99.9, 100.0)  # at_s == t_to is due
    assert [f.name for f in active(s)] == ["leak"]
    assert scenario.apply_due(s, 100.0, 100.5) is s  # at_s == t_from is already applied
    s = scenario.apply_due(s, 100.5, 200.0)
    assert [(f.name, f.value) for f in active(s)] == [("it_load_step", 150.0)]
    s = scenario.apply_due(s, 200.0, 1e9)
    assert active(s) == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[event]]\nat_s = 1\nname = 'leek'\ntarget = 'reuse'", ["event[0]", "name", "'leek'"]),
        (
            "[[event]]\nat_s = 1\nname = 'leak'\ntarget = 'reuse'\n"
            "[[event]]\nat_s = 2\nname = 'leak'\ntarget = 'roof'",
            ["event[1]", "target", "'roof'", "primary, reuse"],
        ),
        ("[[event]]\nat_s = -5\nname = 'customer_offline'", ["event[0]", "at_s", "-5", ">= 0"]),
        ("[[event]]\nname = 'customer_offline'", ["event[0]", "at_s", "expected"]),
        ("[[event]]\nat_s = 'soon'\nname = 'customer_offline'", ["at_s", "'soon'", "number"]),
        ("[[event]]\nat_s = 1\naction = 'explode'", ["action", "'explode'", "inject, clear"]),
        ("[[event]]\nat_s = 1\nname = 'hx_fouling'\nvalue = 2.0", ["value", "2.0", "0..0.9"]),
        ("[[event]]\nat_s = 1\nname = 'hx_fouling'\nwhen = 3", ["event[0]", "when", "no such"]),
        (
            "[[event]]\nat_s = 1\nname = 'customer_offline'\nduration_s = 0",
            ["duration_s", "0", "> 0"],
        ),
        ("[[event]]\nat_s = 1\naction = 'clear_all'\nname = 'leak'", ["name", "clear_all"]),
        (
            "[[event]]\nat_s = 1\naction = 'clear'\nname = 'leak'\ntarget = 'reuse'\nvalue = 1",
            ["value"],
        ),
        ("speed = 3\n", ["top-level", "'speed'"]),
        ("[[event]\nat_s = 1", ["not valid TOML"]),
    ],
)
def test_load_errors_name_file_event_field_value_expected(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.toml")
