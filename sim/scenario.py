"""Scenarios: timed fault events loaded from TOML and applied to the plant state as time passes."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plc_io.plant_config import PlantConfig
from plc_io.site import parse_toml, read_text_file

from . import faults
from .plant import PlantState

ACTIONS = ("inject", "clear", "clear_all")
_EVENT_KEYS = frozenset({"at_s", "action", "name", "target", "value", "duration_s"})
_TOP_KEYS = frozenset({"name", "description", "event"})


class ScenarioError(ValueError):
    """A scenario file cannot be read or an event in it is invalid."""


@dataclass(frozen=True, slots=True)
class Event:
    """One scenario event; at_s counts from the start of the run."""

    at_s: float
    action: str
    name: str = ""
    target: str = ""
    value: float = 1.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """Events sorted by time (file order on ties); `duration_s` already expanded into clears."""

    name: str
    events: tuple[Event, ...]
    source: str = "<memory>"

    def apply_due(self, state: PlantState, t_from_s: float, t_to_s: float) -> PlantState:
        """Apply every event with t_from_s < at_s <= t_to_s (times since the run started)."""
        times = [e.at_s for e in self.events]
        for e in self.events[bisect_right(times, t_from_s) : bisect_right(times, t_to_s)]:
            if e.action == "inject":
                state = faults.inject(state, e.name, e.target, e.value)
            elif e.action == "clear":
                state = faults.clear(state, e.name, e.target)
            else:
                state = faults.clear_all(state)
        return state

    def check_plant(self, params: PlantConfig) -> None:
        """Refuse an event this plant cannot take (a `meter_replace` reading at or above the
        meter's rollover count), once before the run, so a run never stops half-way."""
        rollover_kwh = params.heat_meter_rollover_kwh
        for e in self.events:
            if e.action == "inject" and e.name == "meter_replace" and not e.value < rollover_kwh:
                raise ScenarioError(
                    f"{self.source}: meter_replace at_s = {e.at_s:g}: value = {e.value!r}: "
                    f"expected a reading below [plant] heat_meter_rollover_kwh ({rollover_kwh:g})"
                )


def _fail(source: str, index: int, field: str, value: Any, expected: str) -> ScenarioError:
    return ScenarioError(f"{source}: event[{index}]: {field} = {value!r}: expected {expected}")


def _number(source: str, i: int, ev: Mapping[str, Any], key: str, lo: float) -> float:
    v = ev[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo:
        raise _fail(source, i, key, v, f"a finite number >= {lo:g}")
    return float(v)


def parse_scenario(data: Mapping[str, Any], source: str = "<memory>") -> Scenario:
    """Build a Scenario from already-parsed TOML data; errors name source, event, field, value."""
    extra = set(data) - _TOP_KEYS
    if extra:
        key = sorted(extra)[0]
        raise ScenarioError(
            f"{source}: top-level key {key!r} is not allowed; expected name, description, [[event]]"
        )
    raw = data.get("event", [])
    if not isinstance(raw, list):
        raise ScenarioError(f"{source}: event = {raw!r}: expected an array of [[event]] tables")
    keyed: list[tuple[float, float, Event]] = []
    for i, ev in enumerate(raw):
        if not isinstance(ev, dict):
            raise _fail(source, i, "event", ev, "a table")
        for key in ev:
            if key not in _EVENT_KEYS:
                raise _fail(
                    source, i, key, ev[key], f"no such field (fields: {sorted(_EVENT_KEYS)})"
                )
        if "at_s" not in ev:
            raise _fail(source, i, "at_s", None, "a time in seconds from the start of the run")
        at_s = _number(source, i, ev, "at_s", 0.0)
        action = ev.get("action", "inject")
        if action not in ACTIONS:
            raise _fail(source, i, "action", action, f"one of {', '.join(ACTIONS)}")
        if action == "clear_all":
            for key in ("name", "target", "value", "duration_s"):
                if key in ev:
                    raise _fail(source, i, key, ev[key], "nothing: clear_all takes no fields")
            keyed.append((at_s, i, Event(at_s, action)))
            continue
        name = ev.get("name")
        if not isinstance(name, str):
            raise _fail(source, i, "name", name, f"one of {', '.join(faults.FAULT_NAMES)}")
        target = ev.get("target", "")
        if not isinstance(target, str):
            raise _fail(source, i, "target", target, "a string")
        value = _number(source, i, ev, "value", -math.inf) if "value" in ev else 1.0
        if action == "clear":
            for key in ("value", "duration_s"):
                if key in ev:
                    raise _fail(
                        source, i, key, ev[key], "nothing: clear takes name and target only"
                    )
        try:
            target = faults.check(name, target, value if action == "inject" else None)
        except faults.FaultError as exc:
            raise _fail(source, i, exc.field, exc.value, exc.expected) from exc
        keyed.append((at_s, i, Event(at_s, action, name, target, value)))
        if "duration_s" in ev:
            duration_s = _number(source, i, ev, "duration_s", 0.0)
            if duration_s <= 0.0:
                raise _fail(source, i, "duration_s", duration_s, "a duration > 0 s")
            keyed.append(
                (at_s + duration_s, i + 0.5, Event(at_s + duration_s, "clear", name, target))
            )
    keyed.sort(key=lambda k: (k[0], k[1]))
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise ScenarioError(f"{source}: name = {name!r}: expected a string")
    return Scenario(name=name, events=tuple(e for _, _, e in keyed), source=source)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file. Raises ScenarioError."""
    source = str(path)
    try:
        text = read_text_file(path, "scenario file")
    except ValueError as exc:  # unreadable, a directory, too big, a BOM, not UTF-8
        raise ScenarioError(f"{source}: cannot read: {exc}") from None
    try:
        data = parse_toml(text)  # invalid or too deeply nested TOML
    except ValueError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    return parse_scenario(data, source)
