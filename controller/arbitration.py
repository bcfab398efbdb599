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

from plc_io.tags import Value


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
    return isinstance(v, bool) or math.isfinite(v)


PUMPS = (
    ("primary_pump_a_cmd", "primary_pump_a_running"),
    ("primary_pump_b_cmd", "primary_pump_b_running"),
)


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
