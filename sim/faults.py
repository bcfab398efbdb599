"""Fault injection: validated, pure edits of the plant state's fault list (DESIGN §10 `Sim`)."""

from __future__ import annotations

import dataclasses
import math

from plc_io.tags import REQUIRED_BOOL_INPUTS, REQUIRED_INPUTS

from .plant import Fault, PlantState, effects_of, measure

__all__ = ["FAULT_NAMES", "Fault", "FaultError", "active", "check", "clear", "clear_all", "inject"]

FAULT_NAMES: tuple[str, ...] = (
    "leak",
    "customer_offline",
    "sensor_stuck",
    "sensor_fail",
    "sensor_bias",
    "pump_fail",
    "valve_stuck",
    "drycooler_fan_fail",
    "it_load_step",
    "ambient_override",
    "hx_fouling",
    "meter_replace",
)

_SENSOR_TARGETS = tuple(REQUIRED_INPUTS)
_BOOL_INPUTS = frozenset(REQUIRED_BOOL_INPUTS)
# Valid targets per fault; () means the fault takes no target (""). A single-target fault also
# accepts "" and means its only target.
_TARGETS: dict[str, tuple[str, ...]] = {
    "leak": ("primary", "reuse"),
    "customer_offline": (),
    "sensor_stuck": _SENSOR_TARGETS,
    "sensor_fail": _SENSOR_TARGETS,
    "sensor_bias": tuple(t for t in _SENSOR_TARGETS if t not in _BOOL_INPUTS),
    "pump_fail": ("primary_pump_a", "primary_pump_b", "secondary_pump"),
    "valve_stuck": ("reuse_valve",),
    "drycooler_fan_fail": (),
    "it_load_step": (),
    "ambient_override": (),
    "hx_fouling": (),
    "meter_replace": (),
}
# Value ranges where the value means something: (lo, hi, what it is).
_VALUES: dict[str, tuple[float, float, str]] = {
    "leak": (1e-6, 10000.0, "a leak rate in l/min > 0"),
    "it_load_step": (0.0, 5000.0, "the new IT power in kW, 0..5000"),
    "ambient_override": (-50.0, 60.0, "an ambient temperature in °C, -50..60"),
    "hx_fouling": (0.0, 0.9, "the fraction of HX UA lost, 0..0.9"),
    "sensor_bias": (-1e6, 1e6, "a finite offset in the sensor's unit"),
    "meter_replace": (0.0, 1e12, "the new heat meter's reading in kWh, 0..1e12"),
}


class FaultError(ValueError):
    """A fault request names an unknown fault, a wrong target or an invalid value."""

    def __init__(self, fault: str, field: str, value: object, expected: str) -> None:
        self.fault = fault
        self.field = field
        self.value = value
        self.expected = expected
        where = "fault name" if field == "name" else f"fault {fault!r}: {field}"
        super().__init__(f"{where} {value!r} is not valid; expected {expected}")


def check(name: str, target: str = "", value: float | None = None) -> str:
    """Validate a fault request (value None: not checked); return the normalised target."""
    if name not in _TARGETS:
        raise FaultError(name, "name", name, f"one of {', '.join(FAULT_NAMES)}")
    targets = _TARGETS[name]
    if not targets:
        if target:
            raise FaultError(name, "target", target, "'' (this fault takes no target)")
    elif target == "" and len(targets) == 1:
        target = targets[0]
    elif target not in targets:
        shown = ", ".join(targets) if len(targets) <= 6 else "an input tag from plc_io.tags"
        if name == "sensor_bias" and target in _BOOL_INPUTS:
            shown = "a float input tag (a boolean input cannot be biased)"
        raise FaultError(name, "target", target, shown)
    if value is None:
        return target
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise FaultError(name, "value", value, "a number")
    if name in _VALUES:
        lo, hi, what = _VALUES[name]
        if not (math.isfinite(value) and lo <= value <= hi):
            raise FaultError(name, "value", value, what)
    return target


def _with_faults(state: PlantState, faults: tuple[Fault, ...]) -> PlantState:
    return dataclasses.replace(state, faults=faults, fx=effects_of(faults))


def inject(state: PlantState, name: str, target: str = "", value: float = 1.0) -> PlantState:
    """State with the fault active from now; re-injecting the same name and target replaces it.

    sensor_stuck freezes the reading the sensor gives at injection; valve_stuck holds the valve
    where it is; meter_replace fits a heat meter showing `value` kWh, which counts on from there
    (it remembers the delivered energy at the swap); the other values are described in
    docs/plant.md.
    """
    target = check(name, target, value)
    frozen: float | bool | None = None
    if name == "sensor_stuck":
        frozen = measure(state)[target]
    elif name == "meter_replace":
        rollover_kwh = state.model.meter_rollover_kwh
        if not value < rollover_kwh:
            raise FaultError(
                name, "value", value, f"a reading below the meter's rollover {rollover_kwh:g} kWh"
            )
        frozen = state.acc_kj[2] / 3600.0  # delivered kWh at the swap
    fault = Fault(name, target, float(value), state.t_s, frozen)
    kept = tuple(f for f in state.faults if (f.name, f.target) != (name, target))
    return _with_faults(state, (*kept, fault))


def clear(state: PlantState, name: str, target: str = "") -> PlantState:
    """State without the named fault (a no-op if it is not active)."""
    target = check(name, target)
    kept = tuple(f for f in state.faults if (f.name, f.target) != (name, target))
    return state if len(kept) == len(state.faults) else _with_faults(state, kept)


def clear_all(state: PlantState) -> PlantState:
    """State with no active faults."""
    return _with_faults(state, ()) if state.faults else state


def active(state: PlantState) -> tuple[Fault, ...]:
    """The active faults, oldest first."""
    return state.faults
