"""A tiny stateless plant driver for demos before the real controller exists."""

from __future__ import annotations

from collections.abc import Mapping

from plc_io.plant_config import PlantConfig

SUPPLY_SETPOINT_C = 35.0
FAN_GAIN_PCT_K = 25.0  # proportional only: a steady offset below setpoint is acceptable here
TANK_ROOM_K = (1.0, 4.0)  # return minus tank bottom: valve starts opening / fully open


def _clamp_pct(x: float) -> float:
    return 0.0 if x < 0.0 else 100.0 if x > 100.0 else x


def local_policy(meas: Mapping[str, float | bool], params: PlantConfig) -> dict[str, float | bool]:
    """Commands from one set of readings: duty pump A (B if A is not running), valve open in
    proportion to the room left in the tank while the customer is ready, fans proportional on
    it_supply_temp against 35 °C, and the reuse circuit isolated on any leak.
    """
    supply_c = float(meas["it_supply_temp"])
    room_k = float(meas["it_return_temp"]) - float(meas["tank_bottom_temp"])
    leak = bool(meas["leak_primary"]) or bool(meas["leak_reuse"])
    ready = bool(meas["customer_ready"]) and not leak
    # NaN readings fail toward cooling: fans full, no reuse.
    fan_pct = (
        100.0 if supply_c != supply_c else 50.0 + FAN_GAIN_PCT_K * (supply_c - SUPPLY_SETPOINT_C)
    )
    lo_k, hi_k = TANK_ROOM_K
    valve_pct = 100.0 * (room_k - lo_k) / (hi_k - lo_k) if ready and room_k == room_k else 0.0
    valve_pct = _clamp_pct(valve_pct)
    return {
        "reuse_valve_cmd": valve_pct,
        "drycooler_fan_cmd": _clamp_pct(fan_pct),
        "primary_pump_a_cmd": True,
        "primary_pump_b_cmd": not bool(meas["primary_pump_a_running"]),
        "primary_pump_speed_cmd": 100.0,
        "secondary_pump_cmd": valve_pct > 0.0,
        "secondary_pump_speed_cmd": 100.0,
        "customer_isolation_cmd": ready,
        "reuse_isolation_cmd": not leak,
    }
