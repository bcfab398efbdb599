"""Plant parameters of the site file's `[plant]` table: what the simulated plant is built from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Fluid = Literal["water", "pg25"]


class PlantConfig(BaseModel):
    """Physical parameters of the simulated plant. Defaults describe the ~200 kW demo site."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # IT load
    it_power_kw: float = Field(200.0, gt=0)
    it_ripple_pct: float = Field(3.0, ge=0, le=50)
    it_ripple_period_s: float = Field(900.0, gt=0)
    liquid_capture_fraction: float = Field(0.9, gt=0, le=1)

    # primary loop
    primary_fluid: Fluid = "pg25"
    primary_volume_m3: float = Field(2.0, gt=0)
    primary_design_flow_m3h: float = Field(20.0, gt=0)
    primary_pump_safe_speed_pct: float = Field(80.0, ge=0, le=100)

    # reuse valve and plate heat exchanger
    valve_stroke_s: float = Field(60.0, gt=0)
    hx_ua_kw_k: float = Field(50.0, gt=0)

    # secondary loop and buffer tank
    secondary_fluid: Fluid = "water"
    secondary_design_flow_m3h: float = Field(18.0, gt=0)
    tank_volume_m3: float = Field(10.0, gt=0)
    tank_nodes: int = Field(12, ge=3, le=50)
    tank_loss_w_k: float = Field(30.0, ge=0)

    # customer (indoor pool by default)
    customer_design_kw: float = Field(150.0, ge=0)
    customer_design_flow_m3h: float = Field(12.0, gt=0)
    customer_return_temp_c: float = 28.0

    # dry cooler
    drycooler_ua_kw_k: float = Field(40.0, gt=0)
    drycooler_fan_kw: float = Field(8.0, ge=0)

    # ambient
    ambient_mean_c: float = 10.0
    ambient_seasonal_amp_k: float = Field(10.0, ge=0)
    ambient_daily_amp_k: float = Field(5.0, ge=0)

    # sensors
    sensor_noise: bool = False
