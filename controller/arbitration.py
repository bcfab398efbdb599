"""Arbitration: a priority array per output, then a guard no command gets past.

Levels, highest first: interlock › manual/forced (always with an expiry) › mode sequence ›
BMS request › safe value. Every output records which level won and why, so the BMS and the logs
can see it. After the array, `guard` refuses any result that leaves the servers with no
running primary pump or no open path to a heat sink; it corrects the command, and the
supervisor counts it and raises an event.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from plc_io.tags import Tag, Value


class Level(IntEnum):
    SAFE = 0
    BMS = 1
    SEQUENCE = 2
    MANUAL = 3
    INTERLOCK = 4
    GUARD = 5  # the last check: cooling must stay possible


class Output(NamedTuple):
    """An output as arbitrated: its value and the level that set it (ten of these a scan)."""

    value: Value
    level: Level
    why: str = ""


@dataclass(frozen=True, slots=True)
class Manual:
    value: Value
    expires_s: float
    who: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused before arbitration: the tag (or request) it named, its value, why."""

    tag: str
    value: object
    why: str


def _finite(x: int | float) -> bool:
    """Finite as a float; an integer too large for one (10**400) is not, and never raises."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def shown(value: object, limit: int = 80) -> str:
    """A requested value as bounded text, for refusals and their events; never raises (an
    integer of more than 4300 digits has no repr)."""
    try:
        return repr(value)[:limit]
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"


def value_problem(tag: Tag, value: object) -> str:
    """Why `value` cannot be written to `tag` ("" when it can): type first, then range."""
    if tag.is_bool:
        return "" if isinstance(value, bool) else f"true or false for boolean output {tag.name}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"a number for analogue output {tag.name}"
    if not _finite(value):
        return f"a finite number for {tag.name}"
    if not tag.lo <= value <= tag.hi:
        return f"a value within {tag.name}'s range [{tag.lo:g}, {tag.hi:g}] {tag.unit}"
    return ""


# Outputs no person may hold: the heartbeat is the controller's proof of life to the PLC.
NOT_FORCEABLE = frozenset({"heartbeat"})


def check_manual(
    manual: Mapping[object, object],
    outputs: Mapping[str, Tag],
    now_s: float,
    max_force_s: float,
) -> tuple[dict[str, Manual], list[Refusal]]:
    """Split manual/forced requests into the ones arbitration may use and the refused ones.

    A request is refused when it names no output (or the heartbeat), carries a value of the
    wrong type or outside the tag's range, or has an expiry that is not a number or lies more
    than `max_force_s` ahead. An expired request is neither: arbitration just ignores it.
    """
    ok: dict[str, Manual] = {}
    refused: list[Refusal] = []
    for name, m in manual.items():
        tag = outputs.get(name) if isinstance(name, str) else None
        value = m.value if isinstance(m, Manual) else m
        if tag is None or tag.name in NOT_FORCEABLE:
            why = "an output tag that may be forced"
        elif not isinstance(m, Manual):
            why = "a manual value with an expiry"
        else:
            why = value_problem(tag, m.value)
            exp = m.expires_s
            if not why and (
                isinstance(exp, bool)
                or not isinstance(exp, int | float)
                or exp != exp  # NaN (math.isnan would overflow on a huge integer)
                or exp > now_s + max_force_s  # exact for any integer: never an overflow
            ):
                why = f"an expiry at most max_force_s = {max_force_s:g} s ahead, got {shown(exp)}"
        if why:
            refused.append(Refusal(str(name), value, f"expected {why}"))
        else:
            ok[str(name)] = m
    return ok, refused


def check_setpoint(value: object, lo: float, hi: float, name: str = "supply_setpoint_c") -> str:
    """Why a requested setpoint is refused ("" when it is usable)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        return f"a finite number for {name}"
    if not lo <= value <= hi:
        return f"a {name} within [{lo:g}, {hi:g}]"
    return ""


def arbitrate(
    safe: Mapping[str, Value],
    now_s: float,
    *,
    interlock: Mapping[str, tuple[Value, str]] | None = None,
    manual: Mapping[str, Manual] | None = None,
    sequence: Mapping[str, Value] | None = None,
    bms: Mapping[str, Value] | None = None,
) -> dict[str, Output]:
    """Pick, for every output in `safe`, the value of the highest level that asks for it."""
    interlock, manual, sequence, bms = interlock or {}, manual or {}, sequence or {}, bms or {}
    out: dict[str, Output] = {}
    for name, safe_value in safe.items():
        if name in interlock:
            v, why = interlock[name]
            out[name] = Output(v, Level.INTERLOCK, why)
        elif name in manual and now_s < manual[name].expires_s and _sane(manual[name].value):
            m = manual[name]
            out[name] = Output(m.value, Level.MANUAL, f"manual by {m.who or 'engineer'}")
        elif name in sequence and _sane(sequence[name]):
            out[name] = Output(sequence[name], Level.SEQUENCE)
        elif name in bms and _sane(bms[name]):
            out[name] = Output(bms[name], Level.BMS, "BMS request")
        else:
            out[name] = Output(safe_value, Level.SAFE, "safe value")
    return out


def _sane(v: Value) -> bool:
    """A request that is not a finite number (NaN, inf) falls through to the level below."""
    return isinstance(v, bool) or _finite(v)


PUMPS = (
    ("primary_pump_a_cmd", "primary_pump_a_running"),
    ("primary_pump_b_cmd", "primary_pump_b_running"),
)


# The guard never lets the primary pumps run slower than this (or their design speed, if lower).
PUMP_SPEED_FLOOR_PCT = 30.0


def min_pump_speed_pct(design_speed_pct: float) -> float:
    """The primary pump speed below which the guard overrides a command."""
    return min(design_speed_pct, PUMP_SPEED_FLOOR_PCT)


def guarded_safe_outputs(
    safe: Mapping[str, Value], *, min_fan_pct: float, design_speed_pct: float
) -> tuple[dict[str, Output], list[str]]:
    """The safe values after the guard every scan passes through, and what it corrected.

    Pump feedback counts as unknown: this is what start-up, shutdown, a broken step and a PLC
    watchdog trip write, exactly when nothing is known.
    """
    out = arbitrate(safe, 0.0)
    blocked = guard(
        out,
        {},
        min_fan_pct=min_fan_pct,
        min_pump_speed_pct=min_pump_speed_pct(design_speed_pct),
    )
    return out, blocked


def guard(
    out: dict[str, Output],
    running: Mapping[str, bool | None],
    *,
    min_fan_pct: float,
    min_pump_speed_pct: float,
) -> list[str]:
    """Correct `out` in place so the servers keep a pump and a heat sink; return what was blocked.

    `running` holds pump run feedback (None when unknown). A pump counts as able to run when it
    is commanded and not known to be stopped.
    """
    blocked: list[str] = []
    cmds = [bool(out[c].value) if c in out else False for c, _ in PUMPS]
    alive = [cmd and running.get(fb) is not False for (_, fb), cmd in zip(PUMPS, cmds, strict=True)]
    if not any(alive):
        for c, _ in PUMPS:
            if c in out and not out[c].value:
                blocked.append(f"{c}=false")
                out[c] = Output(True, Level.GUARD, "no primary pump would run")
    spd = out.get("primary_pump_speed_cmd")
    if spd is not None and float(spd.value) < min_pump_speed_pct:
        blocked.append(f"primary_pump_speed_cmd={float(spd.value):g}")
        out["primary_pump_speed_cmd"] = Output(
            min_pump_speed_pct, Level.GUARD, "pump speed too low"
        )
    fan = out.get("drycooler_fan_cmd")
    hx_open = (
        float(out["reuse_valve_cmd"].value) > 0
        and bool(out["secondary_pump_cmd"].value)
        and bool(out["reuse_isolation_cmd"].value)
        if all(k in out for k in ("reuse_valve_cmd", "secondary_pump_cmd", "reuse_isolation_cmd"))
        else False
    )
    if fan is not None and float(fan.value) < min_fan_pct and not hx_open:
        blocked.append(f"drycooler_fan_cmd={float(fan.value):g}")
        out["drycooler_fan_cmd"] = Output(min_fan_pct, Level.GUARD, "no heat sink would remain")
    return blocked
