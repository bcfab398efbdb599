"""`heatloop study`: plant and supervisor in one process on simulated time, at full speed.

The supervisor sees what the PLC would serve it: every sensor reading as a good sample stamped
with the simulated time (a sensor fault in the plant shows as NaN, a frozen value or a bias,
exactly as over Modbus). Figures follow DESIGN §12.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller import metering, statement
from controller.modes import REUSE_MODES, Mode
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from interlocks.engine import Event
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import Site
from sim.plant import Model, PlantState, accounts, initial, measure, step
from sim.scenario import Scenario

DAY_S = 86400.0
# A study's wall clock: the plant's seconds since Jan 1 00:00 (`[sim] start_day`) on this year,
# so a statement's dates fall on the simulated days of the year.
STUDY_EPOCH = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


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
            f"  heat delivered       {self.delivered_kwh:10.1f} kWh (plant truth)",
            f"  reuse fraction       {100 * self.reuse_fraction:10.1f} %",
            f"  heat rejected        {self.rejected_kwh:10.1f} kWh (dry cooler)",
            f"  stored, losses       {self.stored_kwh:10.1f} kWh, {self.losses_kwh:.1f} kWh",
            f"  dry-cooler fans      {self.fan_kwh:10.1f} kWh",
            f"  time in reuse        {100 * self.availability:10.1f} %",
            f"  mode changes         {self.changes_per_h:10.2f} per hour",
            f"  modes                {modes}",
        ]


class StudyMeter:
    """The controller's meter (controller.metering) on a study: what the PLC serves, and beside
    it the same meter on perfect instruments (no sensor noise, no sensor fault), the ground
    truth that the statement's figures are held against. Rows are kept as the state store
    keeps them (newest per interval start and interruption id)."""

    def __init__(self, site: Site, state: PlantState) -> None:
        cfg = site.metering
        self.cfg = cfg
        self.measured = metering.new_state(cfg)
        self.perfect = metering.new_state(cfg)
        quiet = site.plant.model_copy(update={"sensor_noise": False})
        self.quiet: Model = initial(quiet, 0, state.t_s, site.tags).model
        self.intervals: dict[float, dict[str, Any]] = {}
        self.interruptions: dict[int, dict[str, Any]] = {}
        self.events: list[tuple[Event, float]] = []

    def account(
        self, state: PlantState, image: ProcessImage, d: Decision, cmds: Commands, wall: float
    ) -> None:
        self.measured, out = metering.step(self.measured, self.cfg, image, d, cmds, wall)
        for r in out.intervals:
            self.intervals[r["start_wall"]] = r
        for r in out.interruptions:
            self.interruptions[r["id"]] = r
        self.events += [(e, wall) for e in (*d.events, *out.events)]
        if cmds.link_ok:  # perfect instruments: the plant as it is, faults and all
            truth = replace(state, model=self.quiet, fx=state.fx._replace(sensors=()))
            image = image_of(measure(truth), d.now_s)
        self.perfect, _ = metering.step(self.perfect, self.cfg, image, d, cmds, wall)

    def statement(self, site: Site, from_wall: float, to_wall: float) -> dict[str, Any]:
        return statement.build(
            site=site.site.name,
            intervals=self.intervals.values(),
            interruptions=self.interruptions.values(),
            events=statement.event_dicts(self.events),
            commands=(),
            from_wall=from_wall,
            to_wall=to_wall,
            interval_s=self.cfg.interval_s,
            source="study",
        )


def image_of(meas: dict[str, float | bool], now_s: float) -> ProcessImage:
    """What a healthy PLC link would serve: every reading good, stamped now."""
    new, good = tuple.__new__, Quality.GOOD  # Sample(...) minus a Python frame, 30 a step
    return ProcessImage({k: new(Sample, (v, good, now_s)) for k, v in meas.items()})


class ClosedLoop:
    """Plant and supervisor stepped together; `link_ok=False` spans simulate a lost PLC link."""

    def __init__(
        self,
        site: Site,
        *,
        seed: int = 0,
        scenario: Scenario | None = None,
        dt_s: float = 1.0,
        metered: bool = False,
    ) -> None:
        """`metered`: run the controller's meter beside (`self.meter`), for a statement."""
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
        self.meter = StudyMeter(site, self.state) if metered else None

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
        cmds = self.commands
        if cmds.link_ok:
            image = image_of(measure(self.state), now)
            d = self.sup.step(image, now, cmds)
            self.outputs = d.values()
        else:  # no link: the PLC watchdog holds the safe values
            image = ProcessImage()
            d = self.sup.step(image, now, cmds)
            self.outputs = dict(self.site.safe_outputs())
        self.decision = d
        if self.meter is not None:
            self.meter.account(self.state, image, d, cmds, self.wall)
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

    @property
    def wall(self) -> float:
        """The study's wall clock now (STUDY_EPOCH + the plant's seconds since Jan 1)."""
        return STUDY_EPOCH + self.state.t_s

    def metered_lines(self) -> list[str]:
        """The meter's figures beside the plant's ground truth (needs `metered=True`)."""
        assert self.meter is not None, "ClosedLoop(metered=True) keeps a meter"
        got, ref = metering.view(self.meter.measured), metering.view(self.meter.perfect)
        billed, truth = got["totals"]["delivered_kwh"], accounts(self.state).delivered_kwh
        diff = 100.0 * (billed - truth) / truth if truth > 0 else 0.0
        a, b = got["availability_pct"], ref["availability_pct"]
        return [
            "metering (controller.metering, as a running controller meters)",
            f"  billed (totaliser)   {billed:10.1f} kWh (plant truth {truth:.1f}, {diff:+.3f} %)",
            f"  availability         {_pct(a)} (perfect instruments {_pct(b)})",
        ]


def _pct(x: float | None) -> str:
    return "    n/a" if x is None else f"{x:8.3f} %"


def write_statement(loop: ClosedLoop, folder: Path, site: Site) -> list[Path]:
    """The study's statement (JSON, Markdown, HTML) over the simulated span, built by the same
    code as `heatloop report` on a running controller's store."""
    if loop.meter is None:
        raise ValueError("a statement needs ClosedLoop(metered=True)")
    start = STUDY_EPOCH + loop.t0
    st = loop.meter.statement(site, start, max(loop.wall, start + 1.0))
    return statement.write_all(st, folder)
