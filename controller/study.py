"""`heatloop study`: plant and supervisor in one process on simulated time, at full speed.

The supervisor sees what the PLC would serve it: every sensor reading as a good sample stamped
with the simulated time (a sensor fault in the plant shows as NaN, a frozen value or a bias,
exactly as over Modbus). Figures follow DESIGN §12.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from controller.modes import REUSE_MODES, Mode
from controller.supervisor import Commands, Supervisor, SupervisorConfig
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import Site
from sim.plant import PlantState, accounts, initial, measure, step
from sim.scenario import Scenario

DAY_S = 86400.0


@dataclass
class StudyResult:
    sim_s: float = 0.0
    it_heat_kwh: float = 0.0
    delivered_kwh: float = 0.0
    rejected_kwh: float = 0.0
    stored_kwh: float = 0.0
    losses_kwh: float = 0.0
    fan_kwh: float = 0.0
    peak_supply_c: float = -math.inf
    above_limit_s: float = 0.0
    kelvin_hours: float = 0.0
    blocked: int = 0
    mode_changes: int = 0
    reuse_s: float = 0.0  # time in a reuse mode (NORMAL_REUSE, BUFFER_FULL, CUSTOMER_OFFLINE)
    mode_s: Counter[str] = field(default_factory=Counter)
    interlock_s: Counter[str] = field(default_factory=Counter)
    trips: list[tuple[float, str]] = field(default_factory=list)

    @property
    def reuse_fraction(self) -> float:
        return self.delivered_kwh / self.it_heat_kwh if self.it_heat_kwh > 0 else 0.0

    @property
    def availability(self) -> float:
        return self.reuse_s / self.sim_s if self.sim_s > 0 else 0.0

    @property
    def changes_per_h(self) -> float:
        return self.mode_changes / (self.sim_s / 3600.0) if self.sim_s > 0 else 0.0

    def lines(self) -> list[str]:
        modes = ", ".join(f"{m} {100 * s / self.sim_s:.1f} %" for m, s in self.mode_s.most_common())
        ils = ", ".join(f"{i} {s / 60:.1f} min" for i, s in sorted(self.interlock_s.items()))
        return [
            f"simulated              {self.sim_s / 86400:10.2f} days",
            "safety",
            f"  peak it_supply_temp  {self.peak_supply_c:10.2f} °C",
            f"  above limit          {self.above_limit_s / 60:10.1f} min"
            f"  ({self.kelvin_hours:.3f} K·h)",
            f"  commands blocked     {self.blocked:10d}",
            f"  interlock time       {ils or 'none'}",
            "reuse",
            f"  IT heat              {self.it_heat_kwh:10.1f} kWh",
            f"  heat delivered       {self.delivered_kwh:10.1f} kWh (meter)",
            f"  reuse fraction       {100 * self.reuse_fraction:10.1f} %",
            f"  heat rejected        {self.rejected_kwh:10.1f} kWh (dry cooler)",
            f"  stored, losses       {self.stored_kwh:10.1f} kWh, {self.losses_kwh:.1f} kWh",
            f"  dry-cooler fans      {self.fan_kwh:10.1f} kWh",
            f"  heat-loop avail.     {100 * self.availability:10.1f} %",
            f"  mode changes         {self.changes_per_h:10.2f} per hour",
            f"  modes                {modes}",
        ]


def image_of(meas: dict[str, float | bool], now_s: float) -> ProcessImage:
    """What a healthy PLC link would serve: every reading good, stamped now."""
    new, good = tuple.__new__, Quality.GOOD  # Sample(...) minus a Python frame, 30 a step
    return ProcessImage({k: new(Sample, (v, good, now_s)) for k, v in meas.items()})


class ClosedLoop:
    """Plant and supervisor stepped together; `link_ok=False` spans simulate a lost PLC link."""

    def __init__(
        self, site: Site, *, seed: int = 0, scenario: Scenario | None = None, dt_s: float = 1.0
    ) -> None:
        self.site = site
        self.dt_s = dt_s
        self.scenario = scenario
        t0 = site.sim.start_day * DAY_S
        self.state: PlantState = initial(site.plant, seed, t0, site.tags)
        self.t0 = t0
        self.sup = Supervisor(SupervisorConfig.from_site(site), 0.0)
        self.outputs = dict(site.safe_outputs())
        self.result = StudyResult()
        self.commands = Commands()
        self.limit_c = site.interlocks.it_supply_high_c
        self.decision = None
        if scenario is not None:
            self.state = scenario.apply_due(self.state, -math.inf, 0.0)

    @property
    def elapsed_s(self) -> float:
        return self.state.t_s - self.t0

    def run(self, seconds: float) -> StudyResult:
        end = self.elapsed_s + seconds
        while self.elapsed_s < end - 1e-9:
            self.tick()
        return self.finish()

    def tick(self) -> None:
        dt, r = self.dt_s, self.result
        now = self.elapsed_s
        meas = measure(self.state)
        if self.commands.link_ok:
            d = self.sup.step(image_of(meas, now), now, self.commands)
            self.outputs = d.values()
        else:  # no link: the PLC watchdog holds the safe values
            d = self.sup.step(ProcessImage(), now, self.commands)
            self.outputs = dict(self.site.safe_outputs())
        self.decision = d
        if self.commands.reset:  # a reset is a one-scan command; the rest stand
            self.commands = replace(self.commands, reset=False)
        for e in d.events:
            if e.kind == "mode_changed":
                r.mode_changes += 1
            elif e.kind == "trip_latched":
                r.trips.append((now, e.source))
        r.blocked += len(d.blocked)
        r.mode_s[d.mode.value] += dt
        if d.mode in REUSE_MODES:
            r.reuse_s += dt
        for i in d.active:
            r.interlock_s[i] += dt
        self.state = step(self.state, self.outputs, dt)
        if self.scenario is not None:
            self.state = self.scenario.apply_due(self.state, now, now + dt)
        supply = self.state.primary_c[2]
        r.peak_supply_c = max(r.peak_supply_c, supply)
        if supply > self.limit_c:
            r.above_limit_s += dt
            r.kelvin_hours += (supply - self.limit_c) * dt / 3600.0
        r.sim_s += dt

    def finish(self) -> StudyResult:
        a, r = accounts(self.state), self.result
        r.it_heat_kwh, r.delivered_kwh, r.rejected_kwh = (
            a.it_heat_kwh,
            a.delivered_kwh,
            a.rejected_kwh,
        )
        r.stored_kwh, r.losses_kwh, r.fan_kwh = a.stored_kwh, a.losses_kwh, a.fan_energy_kwh
        return r

    @property
    def mode(self) -> Mode:
        return self.sup.mode
