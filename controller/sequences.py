"""Sequences: what each mode asks of the actuators, with PI loops whose time is passed in.

The fan loop holds `it_supply_temp` at its setpoint in every mode; it is direct-acting (hotter
→ faster) with clamping anti-windup, and bumpless: when the fans come back from a forced value
the integrator is re-seeded so the command continues from where the fans really are.
The reuse valve follows the tank: fully open while the tank has plenty of room, closing down
as the bottom of the tank approaches its full threshold, so the HX never pushes heat the tank
cannot hold (the dry cooler, in series after the HX, takes the rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from controller.modes import Mode
from plc_io.tags import Value


@dataclass(frozen=True, slots=True)
class PI:
    kp: float  # output % per K
    ti_s: float  # integral time
    lo: float
    hi: float
    integral: float = 0.0  # the integral term, in output %
    last_s: float | None = None

    def update(self, error: float, now_s: float) -> tuple[float, PI]:
        """One PI step. A NaN error returns the upper limit (fail safe), and the integral
        follows that output, so the loop comes back from it without a jump."""
        if math.isnan(error):
            return self.hi, PI(self.kp, self.ti_s, self.lo, self.hi, self.hi, now_s)
        dt = 0.0 if self.last_s is None else max(0.0, now_s - self.last_s)
        # anti-windup as simple-pid does it: the integral itself never leaves the output range
        i = min(max(self.integral + self.kp * error * dt / self.ti_s, self.lo), self.hi)
        out = min(max(self.kp * error + i, self.lo), self.hi)
        return out, PI(self.kp, self.ti_s, self.lo, self.hi, i, now_s)

    def track(self, actual: float, error: float, now_s: float) -> PI:
        """Bumpless transfer: seed the integral so the next output equals `actual`."""
        p = 0.0 if math.isnan(error) else self.kp * error
        i = min(max(actual - p, self.lo), self.hi)
        return PI(self.kp, self.ti_s, self.lo, self.hi, i, now_s)


@dataclass(frozen=True)
class SequenceConfig:
    supply_setpoint_c: float
    tank_full_c: float
    fan_min_pct: float
    primary_speed_pct: float
    secondary_speed_pct: float
    valve_band_k: float = 6.0  # the valve closes over this band below tank_full_c
    valve_min_pct: float = 20.0  # least flow through the HX while the tank still charges
    buffer_full_valve_pct: float = 25.0  # BUFFER_FULL: tank in circuit, surplus to dry cooler


def _num(p: Mapping[str, float], name: str) -> float:
    return p.get(name, math.nan)


def reuse_valve_pct(tank_bottom_c: float, cfg: SequenceConfig) -> float:
    """Valve opening for charging: open with room in the tank, closing near full."""
    if math.isnan(tank_bottom_c):
        return 0.0  # an unknown tank is no place to send heat
    room_k = cfg.tank_full_c - tank_bottom_c
    if room_k <= 0:
        return 0.0
    frac = min(1.0, room_k / cfg.valve_band_k)
    return cfg.valve_min_pct + (100.0 - cfg.valve_min_pct) * frac


# What the BMS may ask of the actuators (the BMS level of DESIGN §4's priority array):
# setpoint name -> (output, lo, hi). The sequence yields such an output to a BMS request only
# where its own value is a default (`bms_room`); interlocks, forces and the guard win over it.
BMS_REQUESTS: Mapping[str, tuple[str, float, float]] = {
    # the customer side's flow while the tank charges: any speed keeps the servers cooled (the
    # dry cooler, in series after the HX, trims what the HX does not take); 30 % is the least
    # that keeps the pump off its minimum-flow limit
    "secondary_pump_speed_pct": ("secondary_pump_speed_cmd", 30.0, 100.0),
}


def bms_room(mode: Mode, out: Mapping[str, Value], hx_first: bool = False) -> frozenset[str]:
    """The outputs of `mode_outputs`' result whose value a BMS request may replace this scan.

    The secondary pump's speed, while the sequence runs that pump to charge the tank in a reuse
    mode. Never when the HX is the sink of last resort (`hx_first`: full speed is then what
    keeps the servers cool), never while the pump is stopped."""
    if hx_first or mode not in BMS_MODES or out.get("secondary_pump_cmd") is not True:
        return frozenset()
    return BMS_ROOM


BMS_MODES = (Mode.NORMAL_REUSE, Mode.BUFFER_FULL, Mode.CUSTOMER_OFFLINE)
BMS_ROOM = frozenset({"secondary_pump_speed_cmd"})


HX_FIRST_MODES = (
    Mode.NORMAL_REUSE,
    Mode.BUFFER_FULL,
    Mode.CUSTOMER_OFFLINE,
    Mode.DRY_COOLER_REJECT,
)


def mode_outputs(
    mode: Mode,
    values: Mapping[str, float],
    fan_pct: float,
    cfg: SequenceConfig,
    tank_full: bool = False,
    hx_first: bool = False,
    customer_ok: bool = False,
) -> dict[str, Value]:
    """Requested outputs for a mode. `values` holds valid analogue inputs (NaN when invalid);
    `tank_full` is the supervisor's full flag, with its hysteresis already applied.

    `hx_first`: the dry cooler has failed and the reuse circuit is a safe sink (the supervisor
    checked its leak, pressure and tank inputs and that the tank is colder than the return).
    The HX is then the first sink in every mode that may run the reuse circuit, the reject mode
    included: full flow through it and the secondary pump at full speed, not throttled by the
    tank-full policy (IL-06 still stops charging at the tank's limit). `customer_ok`: the
    customer is ready and its supply sensor valid and normal, so in the reject mode its path
    opens as well (in the reuse modes it follows the mode as usual)."""
    out: dict[str, Value] = {
        "drycooler_fan_cmd": fan_pct,
        "primary_pump_a_cmd": True,
        "primary_pump_b_cmd": False,
        "primary_pump_speed_cmd": cfg.primary_speed_pct,
        "reuse_valve_cmd": 0.0,
        "secondary_pump_cmd": False,
        "secondary_pump_speed_cmd": 0.0,
        "customer_isolation_cmd": False,
        "reuse_isolation_cmd": False,
    }
    if mode in (Mode.STARTUP, Mode.LEAK_TRIP):
        out["drycooler_fan_cmd"] = 100.0  # nothing is trusted yet, or we are tripped: full cooling
        return out
    charge = {
        "secondary_pump_cmd": True,
        "secondary_pump_speed_cmd": cfg.secondary_speed_pct,
        "reuse_isolation_cmd": True,
    }
    tank_bottom = _num(values, "tank_bottom_temp")
    if mode is Mode.NORMAL_REUSE:
        # an unknown tank is no place to send heat: no least opening then (the supervisor
        # rejects reuse on an invalid tank sensor anyway; this keeps the sequence honest alone)
        valve = reuse_valve_pct(tank_bottom, cfg)
        if not math.isnan(tank_bottom):
            valve = max(valve, cfg.valve_min_pct)
        out |= charge | {"reuse_valve_cmd": valve, "customer_isolation_cmd": True}
    elif mode is Mode.BUFFER_FULL:
        out |= charge | {
            "reuse_valve_cmd": cfg.buffer_full_valve_pct,
            "customer_isolation_cmd": True,
        }
    elif mode is Mode.CUSTOMER_OFFLINE and not tank_full and not math.isnan(tank_bottom):
        # charge until full; restart only once the tank has cooled by the hysteresis, so the
        # secondary pump does not chatter on sensor noise at the threshold
        valve = max(reuse_valve_pct(tank_bottom, cfg), cfg.valve_min_pct)
        out |= charge | {"reuse_valve_cmd": valve}
    if hx_first and mode in HX_FIRST_MODES:
        out |= charge | {"reuse_valve_cmd": 100.0, "secondary_pump_speed_cmd": 100.0}
        if mode is Mode.DRY_COOLER_REJECT and customer_ok:
            out["customer_isolation_cmd"] = True
    return out
