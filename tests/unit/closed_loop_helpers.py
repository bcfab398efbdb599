"""Helpers for the closed-loop scenarios: build a settled loop, drive it, watch what a user sees.

Every scan driven through `Watch.run` is checked against the invariants that hold in *every*
scenario (DESIGN §5-§7), so a scenario test only states what is special about its fault:

- some primary pump is commanded to run at the plant (no state without a cooling path);
- while a leak trip is latched the reuse circuit is isolated (the leak's isolation always holds);
- while the PLC link is down the plant holds the site's safe values (the watchdog's state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from controller.arbitration import Level
from controller.modes import Mode
from controller.study import ClosedLoop
from interlocks.engine import Event
from plc_io.site import Site, demo_site
from sim import faults, fluids
from sim.plant import COMMAND_TAGS, truth

SITE = demo_site()
LIMIT_C = SITE.interlocks.it_supply_high_c  # 45 °C, W45 class
SETPOINT_C = SITE.control.it_supply_setpoint_c  # 35 °C
# Oracles from the site's parameters, not from a run:
# the supply sensor's noise (one standard deviation); the fan loop regulates on that reading, so
# the true supply is held to within a few of them. Six is the band we call "at the setpoint".
NOISE_K = SITE.plant.sensor_noise_temp_k
HOLD_TOL_K = 6.0 * NOISE_K
# two standard deviations: what one controller's peak may exceed another's by, on noise alone
PEAK_TOL_K = 2.0 * NOISE_K


def tank_kwh_per_k(site: Site = SITE) -> float:
    """Heat capacity of the buffer tank (water at 40 °C), kWh per K."""
    p = site.plant
    return p.tank_volume_m3 * fluids.vol_heat_capacity_kj_m3k(p.secondary_fluid, 40.0) / 3600.0


def max_liquid_kw(site: Site = SITE, it_kw: float | None = None) -> float:
    """The most heat the servers can put into the liquid loop (base load plus ripple)."""
    p = site.plant
    base = p.it_power_kw if it_kw is None else it_kw
    return base * (1.0 + p.it_ripple_pct / 100.0) * p.liquid_capture_fraction


def rejecting(loop: ClosedLoop) -> ClosedLoop:
    """The same loop as the trivial reference policy: reuse always rejected (a standing BMS
    RequestReject), every watt to the dry cooler under the same fan loop."""
    loop.commands = replace(loop.commands, request_reject=True)
    return loop


ISOLATED = {
    "reuse_valve_cmd": 0.0,
    "secondary_pump_cmd": False,
    "reuse_isolation_cmd": False,
    "customer_isolation_cmd": False,
}


def site_with(**control: Any) -> Site:
    """The demo site with some `[control]` keys changed (dwell times, thresholds)."""
    return SITE.with_control(**control)


def settled(site: Site = SITE, *, dt_s: float = 5.0, warm_s: float = 3600.0) -> ClosedLoop:
    """A loop run from start-up until it has been reusing heat for a while (1 h: NORMAL_REUSE)."""
    loop = ClosedLoop(site, dt_s=dt_s)
    loop.run(warm_s)
    assert loop.mode is Mode.NORMAL_REUSE, "the warm-up should end in NORMAL_REUSE"
    return loop


def plant_commands(loop: ClosedLoop) -> dict[str, float | bool]:
    """What the plant's actuators were last told (after the PLC: watchdog included)."""
    return dict(zip(COMMAND_TAGS, loop.state.cmd, strict=True))


@dataclass
class Watch:
    """Drives a loop scan by scan, checks the common invariants, keeps what a user would see."""

    loop: ClosedLoop
    events: list[Event] = field(default_factory=list)
    modes: list[tuple[float, Mode]] = field(default_factory=list)  # (elapsed_s, mode) changes

    @property
    def now(self) -> float:
        return self.loop.elapsed_s

    def inject(self, name: str, target: str = "", value: float = 1.0) -> float:
        self.loop.state = faults.inject(self.loop.state, name, target, value)
        return self.now

    def clear(self, name: str, target: str = "") -> float:
        self.loop.state = faults.clear(self.loop.state, name, target)
        return self.now

    def link(self, ok: bool) -> float:
        self.loop.commands = replace(self.loop.commands, link_ok=ok)
        return self.now

    def reset(self) -> None:
        """A deliberate reset (ResetTrip) for one scan; `ClosedLoop.tick` drops it afterwards."""
        self.loop.commands = replace(self.loop.commands, reset=True)

    def tick(self) -> None:
        loop = self.loop
        before = loop.mode
        loop.tick()
        d = loop.decision
        assert d is not None
        self.events += d.events
        if d.mode is not before:
            self.modes.append((d.now_s, d.mode))
        cmd = plant_commands(loop)
        assert cmd["primary_pump_a_cmd"] or cmd["primary_pump_b_cmd"], f"no pump at {d.now_s}"
        if loop.commands.link_ok and d.latched & {"IL-04", "IL-05"}:
            for name, value in ISOLATED.items():
                assert d.outputs[name].value == value, f"{name} not isolated at {d.now_s}"
                assert d.outputs[name].level is Level.INTERLOCK
        if not loop.commands.link_ok:
            safe = loop.site.safe_outputs()
            assert all(cmd[k] == safe[k] for k in COMMAND_TAGS), f"not safe at {d.now_s}"

    def run(self, seconds: float, each: Callable[[ClosedLoop], object] | None = None) -> None:
        """Scan for `seconds`; `each(loop)` after every scan (to track a peak, count starts)."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.tick()
            if each is not None:
                each(self.loop)

    def run_until(self, pred: Callable[[ClosedLoop], bool], within_s: float) -> float | None:
        """Scan until `pred(loop)` holds after a scan; return that scan's time from now (0.0: the
        very next scan), or None if it did not hold within `within_s`."""
        start = self.now
        while self.now - start < within_s - 1e-9:
            self.tick()
            if pred(self.loop):
                d = self.loop.decision
                assert d is not None
                return d.now_s - start
        return None

    def output(self, name: str) -> tuple[Any, Level]:
        d = self.loop.decision
        assert d is not None
        o = d.outputs[name]
        return o.value, o.level

    def kinds(self, kind: str, since_s: float = -1.0) -> list[Event]:
        return [e for e in self.events if e.kind == kind and e.at_s >= since_s]

    def truth(self, name: str) -> float:
        return truth(self.loop.state)[name]
