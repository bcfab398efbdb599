"""Plant parameters of the site file's `[plant]` table: what the simulated plant is built from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

Fluid = Literal["water", "pg25"]
# (at_s, power_kw) from a TOML array: the pair is lax (a list), its numbers strict
_Step = Annotated[tuple[float, float], Strict(False)]


class PlantConfig(BaseModel):
    """Physical parameters of the simulated plant. Defaults describe the ~200 kW demo site.

    Sources and assumptions for each default are in docs/plant.md.
    """

    # strict: `true` is not 1, "5" is not 5; inf and NaN refused
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    # IT load: base power with a sinusoidal ripple, optional scheduled steps, and the share of it
    # the cold plates put into the liquid (the rest goes to room air, outside this model).
    it_power_kw: float = Field(200.0, gt=0, le=5000)
    it_ripple_pct: float = Field(3.0, ge=0, le=50)
    it_ripple_period_s: float = Field(900.0, gt=0, le=366 * 86400)
    # (at_s since Jan 1 00:00, new base power kW), ascending; the last step at or before t wins.
    it_steps: Annotated[tuple[_Step, ...], Strict(False)] = ()
    liquid_capture_fraction: float = Field(0.9, gt=0, le=1)

    # primary loop: three well-mixed nodes (rack, return header, supply) sharing its volume
    primary_fluid: Fluid = "pg25"
    primary_volume_m3: float = Field(2.0, gt=0, le=100)
    primary_rack_volume_fraction: float = Field(0.3, ge=0.05, le=0.9)
    primary_return_volume_fraction: float = Field(0.3, ge=0.05, le=0.9)
    primary_design_flow_m3h: float = Field(20.0, gt=0, le=2000)  # one pump at 100 % speed
    primary_two_pump_flow_factor: float = Field(1.25, ge=1, le=2)  # both pumps on the system curve
    primary_pump_safe_speed_pct: float = Field(80.0, ge=0, le=100)
    primary_natural_mixing_kw_k: float = Field(10.0, ge=0, le=1000)  # only with no pump running
    primary_fill_pressure_bar: float = Field(2.0, ge=0, le=10)
    primary_pump_head_bar: float = Field(1.5, ge=0, le=10)
    primary_vessel_bar_per_l: float = Field(0.005, gt=0, le=1)  # static pressure lost per litre
    primary_loss_w_k: float = Field(50.0, ge=0, le=10000)  # piping to the plant room
    initial_primary_temp_c: float = Field(30.0, ge=0, le=90)

    # reuse valve and plate heat exchanger
    valve_stroke_s: float = Field(60.0, gt=0, le=3600)
    hx_ua_kw_k: float = Field(50.0, gt=0, le=5000)  # at both design flows; scales with flow^0.8

    # secondary loop and buffer tank
    secondary_fluid: Fluid = "water"
    secondary_design_flow_m3h: float = Field(18.0, gt=0, le=2000)
    secondary_fill_pressure_bar: float = Field(1.5, ge=0, le=10)
    secondary_pump_head_bar: float = Field(1.0, ge=0, le=10)
    secondary_expansion_bar_k: float = Field(0.02, ge=0, le=1)  # vs the initial mean tank temp
    secondary_vessel_bar_per_l: float = Field(0.01, gt=0, le=1)
    tank_volume_m3: float = Field(10.0, gt=0, le=1000)
    tank_nodes: int = Field(12, ge=3, le=50)
    tank_loss_w_k: float = Field(30.0, ge=0, le=10000)
    initial_tank_top_temp_c: float = Field(35.0, ge=0, le=90)
    initial_tank_bottom_temp_c: float = Field(30.0, ge=0, le=90)
    plant_room_temp_c: float = Field(20.0, ge=-20, le=50)

    # customer (indoor pool by default): demand with occupied hours and a winter peak
    customer_design_kw: float = Field(150.0, ge=0, le=5000)
    customer_design_flow_m3h: float = Field(12.0, gt=0, le=2000)
    customer_pool_temp_c: float = Field(28.0, ge=0, le=80)
    customer_hx_effectiveness: float = Field(0.8, gt=0, le=1)
    customer_occupied_from_h: float = Field(6.0, ge=0, le=24)
    customer_occupied_to_h: float = Field(22.0, ge=0, le=24)
    customer_unoccupied_fraction: float = Field(0.5, ge=0, le=1)
    customer_summer_fraction: float = Field(0.4, ge=0, le=1)

    # dry cooler: air-side UA and capacity rate at 100 % fan; natural draft with fans off
    drycooler_ua_kw_k: float = Field(40.0, gt=0, le=5000)
    drycooler_air_kw_k: float = Field(60.0, gt=0, le=10000)
    drycooler_natural_draft_pct: float = Field(5.0, ge=0, le=50)
    drycooler_fan_kw: float = Field(8.0, ge=0, le=500)

    # ambient: annual mean with a seasonal (coldest on ambient_coldest_day) and a daily swing
    ambient_mean_c: float = Field(10.0, ge=-40, le=45)
    ambient_seasonal_amp_k: float = Field(10.0, ge=0, le=40)
    ambient_daily_amp_k: float = Field(5.0, ge=0, le=20)
    ambient_coldest_day: float = Field(15.0, ge=0, le=365)

    # heat meter on the customer flow: its totaliser reading at t0, the count at which it wraps
    # to 0 (the reading is (start + counted) mod rollover), and its systematic error (a class-2
    # meter may read up to a few % off: counted = (1 + error/100) x delivered, power alike)
    heat_meter_start_kwh: float = Field(0.0, ge=0, le=1e12)
    heat_meter_rollover_kwh: float = Field(100_000_000.0, gt=0, le=1e12)
    heat_meter_error_pct: float = Field(0.0, ge=-20, le=20)

    # sensors: seeded Gaussian noise when enabled (standard deviations)
    sensor_noise: bool = False
    sensor_noise_temp_k: float = Field(0.05, ge=0, le=5)
    sensor_noise_rel_pct: float = Field(0.5, ge=0, le=20)  # flows and powers, of reading
    sensor_noise_pressure_bar: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> PlantConfig:
        if self.primary_rack_volume_fraction + self.primary_return_volume_fraction > 0.9:
            raise ValueError(
                "primary_rack_volume_fraction + primary_return_volume_fraction must be <= 0.9 "
                "(the supply node keeps the rest)"
            )
        if not self.heat_meter_start_kwh < self.heat_meter_rollover_kwh:
            raise ValueError(
                f"heat_meter_start_kwh {self.heat_meter_start_kwh:g} must be below "
                f"heat_meter_rollover_kwh {self.heat_meter_rollover_kwh:g} (a meter never "
                "shows its rollover count)"
            )
        last_s = -1.0
        for at_s, power_kw in self.it_steps:
            if not at_s > last_s or not at_s <= 1e10 or not 0.0 <= power_kw <= 5000.0:
                raise ValueError(
                    f"it_steps entry ({at_s}, {power_kw}): expected ascending at_s >= 0 "
                    "and 0 <= power_kw <= 5000"
                )
            last_s = at_s
        return self
