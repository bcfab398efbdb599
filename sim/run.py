"""Open-loop runs of the plant under a policy: the DESIGN §12 figures for studies and benches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from plc_io.plant_config import PlantConfig
from plc_io.tags import Tag

from .local import local_policy
from .plant import PlantState, accounts, initial, measure, step
from .scenario import Scenario

Policy = Callable[[Mapping[str, float | bool], PlantConfig], Mapping[str, float | bool]]


@dataclass(frozen=True, slots=True)
class Figures:
    """The figures that matter (DESIGN §12) for one simulated run, from the true plant values."""

    sim_seconds: float
    it_heat_kwh: float
    delivered_kwh: float
    rejected_kwh: float
    stored_kwh: float
    losses_kwh: float
    fan_kwh: float
    peak_it_supply_temp_c: float
    minutes_above_limit: float
    kelvin_hours_above_limit: float
    reuse_fraction: float
    balance_error_pct: float

    def lines(self) -> list[str]:
        """A short printable report."""
        return [
            f"simulated            {self.sim_seconds / 3600.0:10.2f} h",
            f"IT heat              {self.it_heat_kwh:10.1f} kWh",
            f"delivered (meter)    {self.delivered_kwh:10.1f} kWh",
            f"rejected (dry cooler){self.rejected_kwh:10.1f} kWh",
            f"stored (loop + tank) {self.stored_kwh:10.1f} kWh",
            f"losses               {self.losses_kwh:10.1f} kWh",
            f"dry-cooler fans      {self.fan_kwh:10.1f} kWh",
            f"reuse fraction       {100.0 * self.reuse_fraction:10.1f} %",
            f"peak it_supply_temp  {self.peak_it_supply_temp_c:10.2f} °C",
            f"above limit          {self.minutes_above_limit:10.1f} min"
            f" ({self.kelvin_hours_above_limit:.2f} K·h)",
            f"energy balance error {self.balance_error_pct:10.4f} % of captured heat",
        ]


def simulate(
    params: PlantConfig,
    seconds: float,
    dt_s: float = 1.0,
    seed: int = 0,
    scenario: Scenario | None = None,
    policy: Policy = local_policy,
    t0_s: float = 0.0,
    supply_limit_c: float = 45.0,
    tags: Iterable[Tag] | None = None,
) -> tuple[Figures, PlantState]:
    """Run the plant for `seconds` under `policy` (fed by `measure`), applying the scenario;
    return the figures and the final plant state. `tags`: the site's tag table (the wiring of
    its boolean inputs, see `plant.initial`)."""
    if not (seconds >= 0.0 and math.isfinite(seconds)):
        raise ValueError(f"seconds={seconds!r}: expected a finite duration >= 0")
    if not (dt_s > 0.0 and math.isfinite(dt_s)):
        raise ValueError(f"dt_s={dt_s!r}: expected a finite time step > 0 s")
    state = initial(params, seed, t0_s, tags)
    if scenario is not None:
        state = scenario.apply_due(state, -math.inf, 0.0)
    above_s = kelvin_s = elapsed_s = 0.0
    n_full = int(seconds // dt_s)
    rest_s = seconds - n_full * dt_s
    steps = [dt_s] * n_full + ([rest_s] if rest_s > 1e-9 * dt_s else [])
    for h in steps:
        state = step(state, policy(measure(state), params), h)
        if scenario is not None:
            state = scenario.apply_due(state, elapsed_s, elapsed_s + h)
        elapsed_s += h
        excess_k = state.primary_c[2] - supply_limit_c
        if excess_k > 0.0:
            above_s += h
            kelvin_s += excess_k * h
    a = accounts(state)
    captured = a.captured_kwh
    figures = Figures(
        sim_seconds=elapsed_s,
        it_heat_kwh=a.it_heat_kwh,
        delivered_kwh=a.delivered_kwh,
        rejected_kwh=a.rejected_kwh,
        stored_kwh=a.stored_kwh,
        losses_kwh=a.losses_kwh,
        fan_kwh=a.fan_energy_kwh,
        peak_it_supply_temp_c=a.peak_it_supply_temp_c,
        minutes_above_limit=above_s / 60.0,
        kelvin_hours_above_limit=kelvin_s / 3600.0,
        reuse_fraction=a.delivered_kwh / a.it_heat_kwh if a.it_heat_kwh > 0.0 else 0.0,
        balance_error_pct=100.0 * a.balance_error_kwh / captured if captured > 0.0 else 0.0,
    )
    return figures, state
