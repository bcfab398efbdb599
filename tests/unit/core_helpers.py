"""Hand-built process images for the pure-core tests."""

from __future__ import annotations

from controller.supervisor import Decision, SupervisorConfig
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import demo_site
from plc_io.tags import Value

SITE = demo_site()
CFG = SupervisorConfig.from_site(SITE)

HEALTHY: dict[str, Value] = {
    "it_supply_temp": 35.0,
    "it_return_temp": 45.0,
    "primary_flow": 18.0,
    "primary_pressure": 2.5,
    "hx_primary_out_temp": 40.0,
    "hx_secondary_in_temp": 38.0,
    "hx_secondary_out_temp": 43.0,
    "secondary_flow": 15.0,
    "secondary_pressure": 2.0,
    "tank_top_temp": 45.0,
    "tank_mid_temp": 42.0,
    "tank_bottom_temp": 38.0,
    "customer_supply_temp": 44.0,
    "customer_return_temp": 30.0,
    "customer_flow": 10.0,
    "drycooler_out_temp": 35.0,
    "ambient_temp": 15.0,
    "it_power": 200.0,
    "heat_meter_power": 120.0,
    "heat_meter_energy": 1000.0,
    "reuse_valve_pos": 50.0,
    "plc_watchdog_trips": 0.0,
    "leak_primary": False,
    "leak_reuse": False,
    "customer_ready": True,
    "primary_pump_a_running": True,
    "primary_pump_b_running": False,
    "secondary_pump_running": True,
    "drycooler_fault": False,
    "plc_watchdog_tripped": False,
}


def image(now_s: float, **changes: Value | Sample) -> ProcessImage:
    """A good image at `now_s`; keyword values override, a Sample overrides quality too."""
    samples = {}
    for name, v in {**HEALTHY, **changes}.items():
        samples[name] = v if isinstance(v, Sample) else Sample(v, Quality.GOOD, now_s)
    return ProcessImage(samples)


def live(now_s: float, **changes: Value | Sample) -> ProcessImage:
    """As `image`, with the loop temperatures moving a little (a flat line is a frozen sensor)."""
    wiggle = 0.02 * (int(now_s) % 2)
    moving: dict[str, Value | Sample] = {
        "it_supply_temp": 35.0 + wiggle,
        "it_return_temp": 45.0 + wiggle,
    }
    return image(now_s, **{**moving, **changes})


def plant_like(now_s: float, last: Decision | None, **changes: Value | Sample) -> ProcessImage:
    """`live`, with the actuators' feedback following what was last commanded (an ideal
    plant: the valve at its command, each pump running when told to)."""
    fb: dict[str, Value | Sample] = {}
    if last is not None:
        v = last.values()
        fb = {
            "reuse_valve_pos": float(v["reuse_valve_cmd"]),
            "primary_pump_a_running": bool(v["primary_pump_a_cmd"]),
            "primary_pump_b_running": bool(v["primary_pump_b_cmd"]),
            "secondary_pump_running": bool(v["secondary_pump_cmd"]),
        }
    return live(now_s, **{**fb, **changes})
