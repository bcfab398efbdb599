"""The commissioning procedure as data, and its judge: pure functions of the site, the rule table
and observations. No clock, no I/O: the runner (`controller.commission`) applies causes, polls the
PLC and the controller, and hands the observations here.

Theory of operation. One step per interlock rule, in `RULES` order, then the PLC watchdog proof
test `WD`. A step is generated from the rule's own data (hazard, cause and effect texts, effects
with the site's thresholds, delay, latching, reset condition, response time) plus a small recipe
per default rule in this module (`RECIPES`): how to make the cause true by each method, and which
inputs the cause reads. What is expected is the rule's declared effects at the PLC outputs; what
is confirmed afterwards is the plant following them (valve position, pump run feedback) within
the follow times the supervisor itself allows.

Causes applied through the simulated PLC must be *valid* signals that make the intended rule
fire, never a sensor-validation fault (that would be IL-02 instead): the supply and return
temperatures are rate-checked (`[interlocks] max_rate_k_per_s`) and cross-checked for
plausibility (supply below return under load, supply not more than `plausibility_band_k` below
the dry-cooler outlet), so IL-01 ramps the same offset onto all three.

A response is the first time a PLC output shows an accepted value *and keeps it* to the end of
the observation window: a flicker is not a response. The step's response time is the latest of
those first times, measured from `t0`, the moment the cause is present at the PLC.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from controller.supervisor import PUMP_FEEDBACK, SupervisorConfig
from interlocks.rules import RULES, Effect, Rule, Thresholds
from interlocks.validation import SUPERVISION, Point
from plc_io.site import Site
from plc_io.tags import Tag, Value


class Method(StrEnum):
    SIM = "sim"  # a fault of the simulated PLC or its plant
    FORCED = "forced"  # an input force through the controller's command channel
    PHYSICAL = "physical"  # the engineer applies the cause in the field
    HEARTBEAT_HOLD = "heartbeat_hold"  # the WD step: the controller holds its heartbeat


class PlanError(ValueError):
    """A plan cannot be made as asked: one line naming the field, the value and the expectation."""


WD_ID = "WD"
LINK_RULE = "IL-08"  # raised from the PLC link state, not from points
# The PLC watchdog acts `watchdog_s` after the heartbeat last changed; on top of that come one
# controller scan (the hold starts at a scan, the last change may be one scan before the hold
# was accepted), the PLC's own watchdog poll and the observer's poll (~20 Hz). One second covers
# all three on the default site (0.25 s scan). IL-08's rule-table `response_s` is the
# controller's own part (raising IL-08 in its scan) and is kept in the rule table; the step's
# required time is the watchdog's, since the PLC alone can act while the link is down.
WD_MARGIN_S = 1.0
# The tool's view of the controller must be this fresh before a step may start.
STATUS_MAX_AGE_S = 2.0
# After the heartbeat resumes the PLC must release its safe hold within its hold-off plus this.
RELEASE_SLACK_S = 3.0
# Beyond a threshold by this much (°C / K), so noise and the plant's own reaction to the effect
# (fans to 100 % cool the loop) do not carry the reading back across the limit mid-step.
TEMP_MARGIN_K = 3.0
# A ramped sim cause rises at this fraction of the rate check's limit: a runner that updates the
# offset in steps of at most `ramp_k_per_s` × its tick (tick ≤ one scan) shows the controller at
# most twice the ramp rate between two scans, still below the limit.
RAMP_FRACTION = 0.4
ALREADY = "not proven: already at this value before the cause"
STATUS_BAD_MODES = ("LEAK_TRIP", "STARTUP", "MAINTENANCE")
NOT_NORMAL_MODES = ("LEAK_TRIP", "STARTUP")
# The reuse valve's position follows its command (the supervisor's own valve check).
VALVE_FEEDBACK = (("reuse_valve_cmd", "reuse_valve_pos"),)


# ---- plan data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimAction:
    """One fault of the simulated PLC (`Objects/Sim.InjectFault(name, target, value)`).

    `value` means what the fault name says (sim/faults.py, sim/plc_faults.py): `leak` a leak rate
    in l/min, `ambient_override` an ambient temperature in °C, `sensor_fail` nothing (1.0),
    `comms_drop` seconds the link stays down, `sensor_bias` an offset added to the reading.

    In a plan (`Step.sim`) a `sensor_bias` with `relative_to` set is a template: `value` is the
    *reading to reach* on the tag `relative_to`; `sim_actions(step, before, site)` turns it into
    the offset to inject (`value - before.inputs[relative_to]`, the same offset on every action of
    the step that names the same `relative_to`, so the readings keep their relations).

    `ramp_k_per_s` None: inject at once. Otherwise the runner raises the offset from 0 to `value`
    no faster than `ramp_k_per_s`, re-injecting in steps of at most `ramp_k_per_s` × its tick
    (tick ≤ `scan.period_s`), every action of the step together; and on restore it ramps the
    offset back to 0 the same way before clearing the fault (a step back trips the rate check:
    IL-02, held until plausibility has passed for minutes).
    """

    name: str
    target: str
    value: float
    ramp_k_per_s: float | None = None
    relative_to: str | None = None


@dataclass(frozen=True)
class InputForce:
    """An input force through the command channel (`force {"tag", "value", "minutes"}`)."""

    tag: str
    value: Value


@dataclass(frozen=True)
class Expect:
    """The accepted values at a PLC output (numbers within `tolerance`)."""

    output: str
    values: tuple[Value, ...]
    text: str
    tolerance: float = 0.0

    def accepts(self, v: Value | None) -> bool:
        return accepted(v, self.values, self.tolerance)


@dataclass(frozen=True)
class Feedback:
    """The plant confirms an effect: `tag` passes `test` within `within_s`.

    With `output` set the input follows that output's value as found (a conditional effect:
    the valve goes to 100 % or to 0 % depending on the plant), to within `tolerance`; `test` then
    accepts any of the output's accepted values and `judge` uses the as-found one.
    """

    tag: str
    text: str
    within_s: float
    test: Callable[[Value | None], bool]
    output: str = ""
    tolerance: float = 0.0


@dataclass(frozen=True)
class Step:
    id: str
    kind: str  # "rule" | "watchdog"
    hazard: str
    cause_text: str
    effect_text: str
    required_s: float
    delay_s: float
    latching: bool
    reset_text: str
    expects: tuple[Expect, ...]
    feedback: tuple[Feedback, ...]
    sim: tuple[SimAction, ...] | None
    forced: tuple[InputForce, ...] | None
    physical: str | None
    restore_text: str
    why_not: Mapping[str, str]  # method -> why it cannot test this step
    cause_tags: tuple[str, ...] = ()  # the inputs the rule's cause reads (preconditions)
    method: str = Method.SIM.value  # the method this step was planned for

    def testable(self, method: Method | str) -> bool:
        return str(method) not in self.why_not


# ---- recipes -----------------------------------------------------------------------------

Target = Callable[[Site, Thresholds], float]


@dataclass(frozen=True)
class SimSpec:
    """A sim fault of a recipe; `value` from the site (a reading to reach with `relative_to`)."""

    name: str
    target: str
    value: Target
    relative_to: str | None = None
    ramp: bool = False


@dataclass(frozen=True)
class Recipe:
    """How to apply one default rule's cause by each method, and which inputs the cause reads."""

    cause_tags: tuple[str, ...]
    sim: tuple[SimSpec, ...] | None
    sim_why: str  # when `sim` is None
    forced: tuple[tuple[str, Callable[[Site, Thresholds], Value]], ...] | None
    forced_why: str  # when `forced` is None
    physical: Callable[[Site, Thresholds], str]
    physical_restore: str


def _tag(site: Site, name: str) -> Tag:
    return site.tag(name)


def _beyond(site: Site, name: str, limit: float, margin: float) -> float:
    """A reading `margin` beyond `limit` (above for margin > 0, below for < 0), kept strictly
    inside the tag's range (then halfway between the limit and the range's end): a reading out
    of range is invalid and would test the validation, not the rule."""
    t = _tag(site, name)
    x = limit + margin
    edge = t.hi if margin > 0 else t.lo
    room = 0.01 * (t.hi - t.lo)
    if (margin > 0 and x > edge - room) or (margin < 0 and x < edge + room):
        x = (limit + edge) / 2.0
    return x


def _fraction_above_lo(site: Site, name: str, limit: float, frac: float) -> float:
    t = _tag(site, name)
    return t.lo + frac * (limit - t.lo)


def _n(x: float) -> str:
    return f"{round(x, 2):g}"


# Sim fault names, copied from sim.faults.FAULT_NAMES / sim.plc_faults.PLC_FAULT_NAMES as
# strings: the controller must not import the plant (import-linter contract).
SENSOR_BIAS, SENSOR_FAIL, LEAK, AMBIENT, COMMS_DROP = (
    "sensor_bias",
    "sensor_fail",
    "leak",
    "ambient_override",
    "comms_drop",
)
SIM_AMBIENT_MIN_C = -50.0  # sim.faults: ambient_override takes -50 … 60 °C
LEAK_LPM = 1.0


# IL-01 by sim: the supply reading is a bias on the true supply, and IL-01's fans at 100 % cool
# the true supply by several kelvin while the step runs (the demo plant: about 5 K), so the
# reading is taken well past the limit, or the plant's own reaction would clear the cause.
SUPPLY_SIM_MARGIN_K = 12.0


def _supply_target(s: Site, th: Thresholds) -> float:
    return _beyond(s, "it_supply_temp", th.it_supply_high_c, SUPPLY_SIM_MARGIN_K)


# IL-03 by sim: the standby pump the rule starts adds flow (the demo plant: ×1.25 with both
# pumps), and a biased reading moves with the true flow; a tenth of the way up from the range's
# low end keeps the reading below the limit after the standby pump has started.
def _flow_sim_target(s: Site, th: Thresholds) -> float:
    return _fraction_above_lo(s, "primary_flow", th.primary_flow_low_m3h, 0.1)


def _flow_forced(s: Site, th: Thresholds) -> float:
    return _fraction_above_lo(s, "primary_flow", th.primary_flow_low_m3h, 0.5)


# IL-06 by sim: stopping the secondary pump takes its head off the reading (the demo plant:
# 1 bar); 15 % of the span above the limit stays above it.
def _pressure_target(s: Site, th: Thresholds) -> float:
    t = _tag(s, "secondary_pressure")
    return _beyond(s, "secondary_pressure", th.secondary_pressure_high_bar, 0.15 * (t.hi - t.lo))


def _customer_target(s: Site, th: Thresholds) -> float:
    return _beyond(s, "customer_supply_temp", th.customer_supply_high_c, TEMP_MARGIN_K)


# IL-09 by sim: the fans going to minimum warm the outlet again, so the outlet reading is taken
# well below its limit (a lower outlet keeps the supply plausible: the check is one-sided).
def _ambient_sim(s: Site, th: Thresholds) -> float:
    return max(_beyond(s, "ambient_temp", th.freeze_ambient_c, -5.0), SIM_AMBIENT_MIN_C)


def _outlet_sim(s: Site, th: Thresholds) -> float:
    return _beyond(s, "drycooler_out_temp", th.freeze_drycooler_out_c, -10.0)


def _leak_recipe(zone: str) -> Recipe:
    """A leak zone's rule: the simulated leak, its input forced wet, the rope wetted."""
    tag = f"leak_{zone}"
    return Recipe(
        cause_tags=(tag,),
        sim=(SimSpec(LEAK, zone, lambda s, th: LEAK_LPM),),
        sim_why="",
        forced=((tag, lambda s, th: True),),
        forced_why="",
        physical=lambda s, th: f"Wet the leak detection rope in zone {zone}",
        physical_restore=f"Dry the leak detection rope in zone {zone} until {tag} reads dry",
    )


RECIPES: dict[str, Recipe] = {
    "IL-01": Recipe(
        cause_tags=("it_supply_temp",),
        sim=tuple(
            SimSpec(SENSOR_BIAS, tag, _supply_target, "it_supply_temp", ramp=True)
            for tag in ("it_supply_temp", "it_return_temp", "drycooler_out_temp")
        ),
        sim_why="",
        forced=(("it_supply_temp", _supply_target),),
        forced_why="",
        physical=lambda s, th: (
            "Let the supply to the racks really warm up until it_supply_temp reads above "
            f"{_n(th.it_supply_high_c)} °C (e.g. dry cooler fans off at their local isolator, "
            "or a load bank); a sensor dipped in a calibrator bath jumps faster than "
            "max_rate_k_per_s and disagrees with it_return_temp: that tests IL-02, not IL-01"
        ),
        physical_restore="Put the dry cooler fans back in service and let the supply cool",
    ),
    "IL-02": Recipe(
        cause_tags=("it_supply_temp",),
        sim=(SimSpec(SENSOR_FAIL, "it_supply_temp", lambda s, th: 1.0),),
        sim_why="",
        forced=None,
        forced_why=(
            "an input force is a valid value; IL-02 needs it_supply_temp unknown (use sim or "
            "physical: open the sensor circuit)"
        ),
        physical=lambda s, th: (
            "Open the it_supply_temp sensor circuit (lift one wire at its transmitter or the "
            "PLC input terminal)"
        ),
        physical_restore="Reconnect the it_supply_temp sensor wire",
    ),
    "IL-03": Recipe(
        cause_tags=("primary_flow",),
        sim=(SimSpec(SENSOR_BIAS, "primary_flow", _flow_sim_target, "primary_flow"),),
        sim_why="",
        forced=(("primary_flow", _flow_forced),),
        forced_why="",
        physical=lambda s, th: (
            "Close the primary flow hand valve until primary_flow reads below "
            f"{_n(th.primary_flow_low_m3h)} m³/h"
        ),
        physical_restore="Open the primary flow hand valve fully again",
    ),
    "IL-04": _leak_recipe("reuse"),
    "IL-05": _leak_recipe("primary"),
    "IL-06": Recipe(
        cause_tags=("tank_top_temp", "secondary_pressure"),
        sim=(SimSpec(SENSOR_BIAS, "secondary_pressure", _pressure_target, "secondary_pressure"),),
        sim_why="",
        forced=(("secondary_pressure", _pressure_target),),
        forced_why="",
        physical=lambda s, th: (
            "Pressurise the secondary_pressure sensor with a hand test pump at its test valve "
            f"until it reads above {_n(th.secondary_pressure_high_bar)} bar"
        ),
        physical_restore="Release the test pump and reopen the sensor's isolation valve",
    ),
    "IL-07": Recipe(
        cause_tags=("customer_supply_temp",),
        sim=(
            SimSpec(SENSOR_BIAS, "customer_supply_temp", _customer_target, "customer_supply_temp"),
        ),
        sim_why="",
        forced=(("customer_supply_temp", _customer_target),),
        forced_why="",
        physical=lambda s, th: (
            "Put the customer_supply_temp sensor in a calibrator bath above "
            f"{_n(th.customer_supply_high_c)} °C"
        ),
        physical_restore="Put the customer_supply_temp sensor back in its pocket",
    ),
    "IL-08": Recipe(
        cause_tags=(),
        sim=(SimSpec(COMMS_DROP, "", lambda s, th: s.plc.watchdog_s + RELEASE_SLACK_S),),
        sim_why="",
        forced=None,
        forced_why="a link cannot be forced (use sim or physical: pull the PLC network cable)",
        physical=lambda s, th: (
            "Pull the PLC's network cable (the controller's link to the PLC) for "
            f"{_n(s.plc.watchdog_s + RELEASE_SLACK_S)} s, then plug it back in"
        ),
        physical_restore="Plug the PLC's network cable back in",
    ),
    "IL-09": Recipe(
        cause_tags=("ambient_temp", "drycooler_out_temp"),
        sim=(
            SimSpec(AMBIENT, "", _ambient_sim),
            SimSpec(SENSOR_BIAS, "drycooler_out_temp", _outlet_sim, "drycooler_out_temp"),
        ),
        sim_why="",
        forced=(
            ("ambient_temp", lambda s, th: _beyond(s, "ambient_temp", th.freeze_ambient_c, -3.0)),
            (
                "drycooler_out_temp",
                lambda s, th: _beyond(
                    s, "drycooler_out_temp", th.freeze_drycooler_out_c, -TEMP_MARGIN_K
                ),
            ),
        ),
        forced_why="",
        physical=lambda s, th: (
            f"Cool the ambient_temp sensor below {_n(th.freeze_ambient_c)} °C and the "
            f"drycooler_out_temp sensor below {_n(th.freeze_drycooler_out_c)} °C together "
            "(freeze spray or a calibrator); the outlet reading must not rise above the supply's"
        ),
        physical_restore="Let both sensors warm back to ambient in their pockets",
    ),
}


# ---- values and tolerances -----------------------------------------------------------------


def tolerance(tag: Tag) -> float:
    """How far a read-back number may sit from the expected one: the codec rounds to its scale
    (0.01 % on the demo's uint16 valve), an OPC UA PLC may keep a REAL (float32, 7 digits), and a
    PLC may scale to its own raw counts; 0.5 % of the span (or 0.01) covers all of these and is
    still far below any step an effect makes."""
    if tag.is_bool:
        return 0.0
    return max(0.005 * (tag.hi - tag.lo), 0.01)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def accepted(v: Value | None, values: Sequence[Value], tol: float) -> bool:
    """Whether a read value is one of `values`: booleans exactly (True is not 1.0), numbers
    finite and within `tol`."""
    if v is None:
        return False
    if isinstance(v, bool):
        return any(isinstance(x, bool) and x is v for x in values)
    if not _is_num(v) or not math.isfinite(float(v)):
        return False
    return any(_is_num(x) and abs(float(v) - float(x)) <= tol for x in values)


def fmt(v: object, unit: str = "") -> str:
    """A value for a record line: on/off, a number with its unit, or why there is none."""
    if v is None:
        return "unreadable"
    if isinstance(v, bool):
        return "on" if v else "off"
    if _is_num(v):
        x = float(v)  # type: ignore[arg-type]
        if not math.isfinite(x):
            return str(x)
        u = "" if unit in ("", "bool", "count") else f" {unit}"
        return f"{round(x, 2):g}{u}"
    return repr(v)


def thresholds(site: Site) -> Thresholds:
    """The rule thresholds exactly as the controller builds them from this site."""
    return SupervisorConfig.from_site(site).thresholds


# ---- plan --------------------------------------------------------------------------------


def step_ids(rules: Sequence[Rule] = RULES) -> tuple[str, ...]:
    return (*(r.id for r in rules), WD_ID)


def _expects(rule: Rule, site: Site, th: Thresholds) -> tuple[tuple[Expect, ...], list[str]]:
    """The rule's effects as accepted values at the PLC outputs, and what is not checked."""
    out: list[Expect] = []
    unchecked: list[str] = []
    names = {t.name for t in site.outputs}
    for e in rule.forces:
        if e.output not in names:
            unchecked.append(f"{e.output} (not on this site)")
            continue
        tag = site.tag(e.output)
        v = e.shown(th)
        vt = fmt(v, tag.unit)
        if e.when is None:
            out.append(Expect(e.output, (v,), f"{e.output} = {vt}", tolerance(tag)))
        elif e.otherwise is not None:
            text = f"{e.output} = {vt} while {e.when.name}, else {fmt(e.otherwise, tag.unit)}"
            out.append(Expect(e.output, (v, e.otherwise), text, tolerance(tag)))
        else:
            unchecked.append(f"{e.output} ({vt} only while {e.when.name}; else not forced)")
    return tuple(out), unchecked


def _feedback(expects: Sequence[Expect], site: Site) -> tuple[Feedback, ...]:
    """The plant's confirmation of the effects: valve position, pump run feedback."""
    inputs = {t.name for t in site.inputs}
    c = site.control
    out: list[Feedback] = []
    by_out = {e.output: e for e in expects}
    for cmd, fb in VALVE_FEEDBACK:
        e = by_out.get(cmd)
        if e is None or fb not in inputs:
            continue
        tol = c.valve_tolerance_pct
        values = e.values

        def test(v: Value | None, values: tuple[Value, ...] = values, tol: float = tol) -> bool:
            return accepted(v, values, tol)

        if len(values) == 1:
            text = _within_text(site.tag(fb), float(values[0]), tol)
            out.append(Feedback(fb, text, c.valve_follow_s, test, cmd, tol))
        else:
            text = f"follows {cmd} to within {_n(tol)} %"
            out.append(Feedback(fb, text, c.valve_follow_s, test, cmd, tol))
    for cmd, fb in PUMP_FEEDBACK:
        e = by_out.get(cmd)
        if e is None or fb not in inputs or len(e.values) != 1:
            continue
        want = e.values[0]

        def ptest(v: Value | None, want: Value = want) -> bool:
            return isinstance(v, bool) and v is want

        out.append(Feedback(fb, f"{fmt(want)}", c.pump_fail_s, ptest, cmd, 0.0))
    return tuple(out)


def _within_text(tag: Tag, v: float, tol: float) -> str:
    u = f" {tag.unit}" if tag.unit not in ("", "bool", "count") else ""
    if v - tol <= tag.lo:
        return f"≤ {_n(tag.lo + tol)}{u}"
    if v + tol >= tag.hi:
        return f"≥ {_n(tag.hi - tol)}{u}"
    return f"{_n(v)} ± {_n(tol)}{u}"


def _sim_actions(recipe: Recipe, site: Site, th: Thresholds) -> tuple[SimAction, ...]:
    ramp = RAMP_FRACTION * site.interlocks.max_rate_k_per_s
    return tuple(
        SimAction(
            s.name, s.target, float(s.value(site, th)), ramp if s.ramp else None, s.relative_to
        )
        for s in recipe.sim or ()
    )


def _forces(
    recipe: Recipe, site: Site, th: Thresholds
) -> tuple[tuple[InputForce, ...] | None, str]:
    if recipe.forced is None:
        return None, recipe.forced_why
    by_name = {t.name: t for t in site.inputs}
    missing = [tag for tag, _ in recipe.forced if tag not in by_name]
    if missing:
        return None, f"{', '.join(missing)}: not an input of this site"
    locked = [tag for tag, _ in recipe.forced if not by_name[tag].forceable]
    if locked:
        allow = " and ".join(f"[tags.{tag}] forceable = true" for tag in locked)
        verb = "is" if len(locked) == 1 else "are"
        return None, (
            f"{', '.join(locked)} {verb} not forceable on this site; the site's {allow} "
            f"allow{'s' if len(locked) == 1 else ''} it"
        )
    return tuple(InputForce(tag, value(site, th)) for tag, value in recipe.forced), ""


def _restore(
    method: Method,
    rule: Rule,
    recipe: Recipe | None,
    step_sim: tuple[SimAction, ...] | None,
    forced: tuple[InputForce, ...] | None,
) -> str:
    if method is Method.SIM and step_sim:
        ramped = [a for a in step_sim if a.ramp_k_per_s is not None]
        text = "clear the sim fault(s) " + ", ".join(
            f"{a.name}/{a.target}" if a.target else a.name for a in step_sim
        )
        if ramped:
            text += (
                f" (ramp the offsets back to 0 at {_n(ramped[0].ramp_k_per_s or 0.0)} K/s "
                "first: a step back trips the rate check)"
            )
    elif method is Method.FORCED and forced:
        text = "clear the input force(s) on " + ", ".join(f.tag for f in forced)
    elif method is Method.PHYSICAL and recipe is not None:
        text = recipe.physical_restore
    else:
        text = "nothing was applied"
    if rule.latching:
        text += f"; then reset {rule.id} through the command channel ({rule.reset.text})"
    return text


def _rule_step(rule: Rule, site: Site, th: Thresholds, method: Method) -> Step:
    recipe = RECIPES.get(rule.id)
    expects, unchecked = _expects(rule, site, th)
    why_not: dict[str, str] = {}
    sim: tuple[SimAction, ...] | None = None
    forced: tuple[InputForce, ...] | None = None
    physical: str | None = None
    if recipe is None:
        why = f"no recipe for {rule.id} in controller.commission_plan.RECIPES"
        why_not = {Method.SIM.value: why, Method.FORCED.value: why, Method.PHYSICAL.value: why}
    else:
        if recipe.sim is None:
            why_not[Method.SIM.value] = recipe.sim_why
        else:
            sim = _sim_actions(recipe, site, th)
            amb = [a for a in sim if a.name == AMBIENT]
            if amb and not amb[0].value < th.freeze_ambient_c:
                sim, why_not[Method.SIM.value] = (
                    None,
                    (
                        f"the simulated ambient cannot go below freeze_ambient_c "
                        f"({_n(th.freeze_ambient_c)} °C)"
                    ),
                )
        forced, why = _forces(recipe, site, th)
        if forced is None:
            why_not[Method.FORCED.value] = why
        physical = recipe.physical(site, th)
    effect_text = rule.effect_text
    if unchecked:
        effect_text += "; not checked at the PLC: " + "; ".join(unchecked)
    if rule.id == LINK_RULE:
        expects = _safe_expects(site)
        required = site.plc.watchdog_s + WD_MARGIN_S
        fb: tuple[Feedback, ...] = ()
        effect_text += (
            "; the PLC watchdog holds every output at its safe value, seen when the link is back"
        )
    else:
        required = rule.response_s
        fb = _feedback(expects, site)
    return Step(
        id=rule.id,
        kind="rule",
        hazard=rule.hazard,
        cause_text=rule.cause_text,
        effect_text=effect_text,
        required_s=required,
        delay_s=rule.delay_s,
        latching=rule.latching,
        reset_text=rule.reset.text,
        expects=expects,
        feedback=fb,
        sim=sim,
        forced=forced,
        physical=physical,
        restore_text=_restore(method, rule, recipe, sim, forced),
        why_not=why_not,
        cause_tags=recipe.cause_tags if recipe else (),
        method=method.value,
    )


def _safe_expects(site: Site) -> tuple[Expect, ...]:
    """Every output's safe value but the heartbeat's (the heartbeat is what stops)."""
    return tuple(
        Expect(t.name, (t.safe,), f"{t.name} = {fmt(t.safe, t.unit)} (safe)", tolerance(t))
        for t in site.outputs
        if t.safe is not None and t.name != "heartbeat"
    )


def _wd_step(site: Site) -> Step:
    wd, hold = site.plc.watchdog_s, site.plc.watchdog_holdoff_s
    return Step(
        id=WD_ID,
        kind="watchdog",
        hazard="the controller stops and nothing drives the plant to a cooling-safe state",
        cause_text=f"the controller holds its heartbeat unchanged (watchdog_test) for > {_n(wd)} s",
        effect_text=(
            f"the PLC drives every output to its safe value within {_n(wd)} s of the last "
            f"heartbeat change, holds it for {_n(hold)} s after the heartbeat resumes and fresh "
            "commands arrive, then releases"
        ),
        required_s=wd + WD_MARGIN_S,
        delay_s=wd,
        latching=False,
        reset_text="automatic: the heartbeat resumes, then the PLC's hold-off",
        expects=_safe_expects(site),
        feedback=(),
        sim=None,
        forced=None,
        physical=None,
        restore_text="end the heartbeat hold (watchdog_test seconds = 0); the PLC releases",
        why_not={},
        cause_tags=(),
        method=Method.HEARTBEAT_HOLD.value,
    )


def plan(
    site: Site, only: Sequence[str] | None = None, method: Method = Method.SIM
) -> tuple[Step, ...]:
    """The steps, in rule-table order then `WD`. A step the method cannot test is returned with
    `why_not[method]` (the runner records it not_testable), unless `only` names it: then
    PlanError, as for an unknown id."""
    try:
        method = Method(method)
    except ValueError:
        raise PlanError(f"method: {method!r}: expected one of sim, forced, physical") from None
    if method is Method.HEARTBEAT_HOLD:
        raise PlanError("method: 'heartbeat_hold': expected one of sim, forced, physical")
    ids = step_ids()
    wanted: set[str] | None = None
    if only is not None:
        if isinstance(only, str):
            only = [only]
        wanted = set()
        for raw in only:
            sid = raw.strip() if isinstance(raw, str) else raw
            if sid not in ids:
                raise PlanError(f"only: {raw!r}: expected one of {', '.join(ids)}")
            wanted.add(sid)
        if not wanted:
            raise PlanError(f"only: {list(only)!r}: expected at least one of {', '.join(ids)}")
    th = thresholds(site)
    steps = [_rule_step(r, site, th, method) for r in RULES]
    steps.append(_wd_step(site))
    if wanted is None:
        return tuple(steps)
    chosen = tuple(s for s in steps if s.id in wanted)
    for s in chosen:
        why = s.why_not.get(method.value)
        if why is not None:
            can = [m.value for m in (Method.SIM, Method.FORCED, Method.PHYSICAL) if s.testable(m)]
            raise PlanError(
                f"only: {s.id!r}: method {method.value} cannot test it ({why}); methods that "
                f"can: {', '.join(can) or 'none'}"
            )
    return chosen


def sim_actions(step: Step, before: Observation, site: Site) -> tuple[SimAction, ...]:
    """The step's sim faults to inject, concrete: a templated `sensor_bias` (`relative_to` set)
    becomes the offset that takes `relative_to`'s as-found reading to the planned reading
    (`relative_to` None in the result); everything else as planned. PlanError when the step has
    no sim recipe or a reading to start from is missing."""
    if step.sim is None:
        why = step.why_not.get(Method.SIM.value, "no sim recipe")
        raise PlanError(f"step {step.id}: method sim cannot test it ({why})")
    out: list[SimAction] = []
    for a in step.sim:
        if a.relative_to is None:
            out.append(a)
            continue
        r = before.inputs.get(a.relative_to)
        if not _is_num(r) or not math.isfinite(float(r)):  # type: ignore[arg-type]
            raise PlanError(
                f"before.inputs.{a.relative_to}: {r!r}: expected a finite reading to offset from"
            )
        offset = a.value - float(r)  # type: ignore[arg-type]
        out.append(SimAction(a.name, a.target, offset, a.ramp_k_per_s, None))
    return tuple(out)


def applied_text(step: Step, method: Method, actions: Sequence[SimAction] = ()) -> str:
    """One line saying how the cause was applied, for `StepResult.applied`."""
    if step.kind == "watchdog":
        return "controller heartbeat held (watchdog_test)"
    if method is Method.SIM:
        return "; ".join(
            f"sim fault {a.name}"
            + (f"/{a.target}" if a.target else "")
            + f" = {_n(a.value)}"
            + (f" (ramped at {_n(a.ramp_k_per_s)} /s)" if a.ramp_k_per_s else "")
            for a in (actions or step.sim or ())
        )
    if method is Method.FORCED:
        return "; ".join(f"input force {f.tag} = {fmt(f.value)}" for f in step.forced or ())
    return step.physical or ""


# ---- the rule table's fingerprint ---------------------------------------------------------


def _effect_json(e: Effect, th: Thresholds) -> dict[str, object]:
    return {
        "output": e.output,
        "value": e.shown(th),
        "when": None if e.when is None else {"name": e.when.name, "text": e.when.text},
        "otherwise": e.otherwise,
    }


def rule_table_data(site: Site, rules: Sequence[Rule] = RULES) -> dict[str, object]:
    """Everything the rule table means on this site, as plain JSON data."""
    th = thresholds(site)
    return {
        "thresholds": {k: getattr(th, k) for k in sorted(th.__dataclass_fields__)},
        "rules": [
            {
                "id": r.id,
                "hazard": r.hazard,
                "cause": r.cause_text,
                "effect": r.effect_text,
                "effects": [_effect_json(e, th) for e in r.forces],
                "delay_s": r.delay_s,
                "latching": r.latching,
                "bypassable": r.bypassable,
                "max_bypass_s": min(r.max_bypass_s, th.max_bypass_s),
                "response_s": r.response_s,
                "protects": list(r.protects),
                "reset": {"name": r.reset.name, "text": r.reset.text},
                "group": r.group,
            }
            for r in rules
        ],
    }


def rule_table_hash(site: Site) -> str:
    """sha256 hex of the rule table as it runs on this site (its data and the thresholds):
    canonical JSON, so it is the same in every process and changes with any threshold."""
    blob = json.dumps(
        rule_table_data(site),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()
    return hashlib.sha256(blob).hexdigest()


# ---- observations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    t: float  # tool's monotonic seconds
    plc_ok: bool  # the observer's PLC read succeeded
    inputs: Mapping[str, Value | None]  # raw PLC inputs (None = unreadable/bad)
    outputs: Mapping[str, Value | None]  # PLC outputs read back
    mode: str | None
    active: frozenset[str]
    latched: frozenset[str]
    bypassed: frozenset[str]
    levels: Mapping[str, str]  # output -> winning level from the controller status
    link_ok: bool  # the controller's own PLC link state
    status_t: float | None  # when the controller status was last read (None: never)


def raw_points(obs: Observation, site: Site) -> dict[str, Point]:
    """Points from the raw PLC inputs: valid when readable, of the tag's kind, finite and in
    range (a supervised input is invalid by supervision while its fault input reads true or
    cannot be read), as the rules read them."""
    pts: dict[str, Point] = {}
    for t in site.inputs:
        v = obs.inputs.get(t.name) if obs.plc_ok else None
        if t.is_bool:
            ok = isinstance(v, bool)
        else:
            ok = _is_num(v) and math.isfinite(float(v)) and t.lo <= float(v) <= t.hi  # type: ignore[arg-type]
        pts[t.name] = Point(v, ok, "" if ok else "raw")
    for t in site.inputs:
        sup = t.supervised_by
        if sup is None:
            continue
        s = pts.get(sup)
        if s is None or not s.valid or s.value is True:
            pts[t.name] = Point(pts[t.name].value, False, SUPERVISION)
    return pts


def cause_present(step: Step, obs: Observation, site: Site) -> bool:
    """The rule's own cause on the raw PLC inputs; IL-08: the observer cannot read the PLC;
    WD: never (its cause is the held heartbeat, not an input)."""
    if step.id == LINK_RULE:
        return not obs.plc_ok
    rule = next((r for r in RULES if r.id == step.id), None)
    if rule is None:
        return False
    return bool(rule.cause(raw_points(obs, site), thresholds(site)))


def _status_problems(obs: Observation) -> list[str]:
    if obs.status_t is None:
        return ["no controller status read yet"]
    age = obs.t - obs.status_t
    if not age <= STATUS_MAX_AGE_S:
        return [f"controller status is {_n(age)} s old, expected at most {_n(STATUS_MAX_AGE_S)} s"]
    return []


def _link_problems(obs: Observation) -> list[str]:
    out = []
    if not obs.plc_ok:
        out.append("PLC link down (the tool cannot read the PLC)")
    if not obs.link_ok:
        out.append("PLC link down (the controller reports its link lost)")
    return out


def preconditions(step: Step, obs: Observation, site: Site) -> list[str]:
    """Why the step may not start now, one line each; [] when the plant is in a state where the
    test is meaningful and safe."""
    probs = _link_problems(obs) + _status_problems(obs)
    if step.kind == "watchdog":
        if obs.active:
            probs.append(f"interlock(s) active: {', '.join(sorted(obs.active))}")
        if obs.plc_ok and not any(not e.accepts(obs.outputs.get(e.output)) for e in step.expects):
            probs.append(
                "every output is at its safe value already: the watchdog's fallback cannot be "
                "seen (wait until the plant runs, e.g. NORMAL_REUSE)"
            )
        return probs
    if obs.active:
        probs.append(f"interlock(s) active: {', '.join(sorted(obs.active))}")
    if obs.latched:
        probs.append(f"trip(s) latched: {', '.join(sorted(obs.latched))} (reset them first)")
    if step.id in obs.bypassed:
        probs.append(f"{step.id} is bypassed: a bypass would mask the test (remove it first)")
    if obs.mode is None:
        probs.append("controller mode unknown")
    elif obs.mode in STATUS_BAD_MODES:
        probs.append(f"mode {obs.mode}: expected a running mode, not {'/'.join(STATUS_BAD_MODES)}")
    if obs.plc_ok:
        pts = raw_points(obs, site)
        for tag in step.cause_tags:
            p = pts.get(tag)
            if p is None or not p.valid:
                v = obs.inputs.get(tag)
                why = "supervision fault" if p is not None and p.reason == SUPERVISION else fmt(v)
                probs.append(f"{tag}: {why}: expected a valid reading before the test")
        if cause_present(step, obs, site):
            probs.append(f"the cause is already present: {step.cause_text}")
    return probs


def already_in_place(step: Step, obs: Observation) -> list[str]:
    """The step's expected outputs that already hold an accepted value (a step run now proves
    nothing about them: e.g. IL-07 while DRY_COOLER_REJECT already closed the customer valve).
    Not a precondition: the runner may wait for the plant to run (reuse) or go ahead, and the
    record marks each such effect "not proven"."""
    if not obs.plc_ok:
        return []
    return [e.output for e in step.expects if e.accepts(obs.outputs.get(e.output))]


def normal(obs: Observation) -> list[str]:
    """Why the plant is not back to normal after a step; [] when it is. DRY_COOLER_REJECT is
    normal enough: after a trip reset its dwell keeps it there for minutes by design."""
    probs = _link_problems(obs)
    if obs.active:
        probs.append(f"interlock(s) active: {', '.join(sorted(obs.active))}")
    if obs.latched:
        probs.append(f"trip(s) latched: {', '.join(sorted(obs.latched))}")
    if obs.mode is None:
        probs.append("controller mode unknown")
    elif obs.mode in NOT_NORMAL_MODES:
        probs.append(f"mode {obs.mode}")
    return probs


# ---- results -------------------------------------------------------------------------------


def _j(v: object) -> object:
    """A value as JSON takes it: a non-finite number as its name (records are canonical JSON
    with allow_nan=False)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


@dataclass(frozen=True)
class EffectResult:
    output: str
    expected: tuple[Value, ...]
    before: Value | None
    as_found: Value | None
    at_s: float | None  # from t0 to the first accepted value that stayed
    level: str | None  # the controller's winning level for this output at the end
    ok: bool
    note: str = ""  # e.g. "not proven: already at its safe value"

    def to_json(self) -> dict[str, object]:
        return {
            "output": self.output,
            "expected": [_j(v) for v in self.expected],
            "before": _j(self.before),
            "as_found": _j(self.as_found),
            "at_s": self.at_s,
            "level": self.level,
            "ok": self.ok,
            "note": self.note,
        }


@dataclass(frozen=True)
class FeedbackResult:
    tag: str
    expected: str
    before: Value | None
    as_found: Value | None
    within_s: float
    at_s: float | None
    ok: bool
    note: str = ""  # e.g. "not proven: the effect ended before the plant had to follow"

    def to_json(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "expected": self.expected,
            "before": _j(self.before),
            "as_found": _j(self.as_found),
            "within_s": self.within_s,
            "at_s": self.at_s,
            "ok": self.ok,
            "note": self.note,
        }


RESULTS = ("passed", "failed", "aborted", "skipped", "not_testable")


@dataclass(frozen=True)
class StepResult:
    id: str
    kind: str
    hazard: str
    cause: str
    effect: str
    method: str
    applied: str
    required_s: float
    response_s: float | None
    effects: tuple[EffectResult, ...]
    feedback: tuple[FeedbackResult, ...]
    rule_active: bool
    latched: bool
    mode_before: str | None
    mode_during: str | None
    result: str
    failures: tuple[str, ...]
    reset: Mapping[str, object] = field(default_factory=dict)
    restored: bool = False
    back_to_normal: bool = False
    mode_after: str | None = None
    comment: str = ""
    started_wall: float = 0.0
    ended_wall: float = 0.0

    def to_json(self) -> dict[str, object]:
        r = self.response_s
        return {
            "id": self.id,
            "kind": self.kind,
            "hazard": self.hazard,
            "cause": self.cause,
            "effect": self.effect,
            "method": self.method,
            "applied": self.applied,
            "required_s": self.required_s,
            "response_s": None if r is None else round(r, 3),
            "effects": [e.to_json() for e in self.effects],
            "feedback": [f.to_json() for f in self.feedback],
            "rule_active": self.rule_active,
            "latched": self.latched,
            "mode_before": self.mode_before,
            "mode_during": self.mode_during,
            "reset": dict(self.reset),
            "restored": self.restored,
            "back_to_normal": self.back_to_normal,
            "mode_after": self.mode_after,
            "result": self.result,
            "failures": list(self.failures),
            "comment": self.comment,
            "started_wall": self.started_wall,
            "ended_wall": self.ended_wall,
        }


def _result(step: Step, failures: Sequence[str], **fields: Any) -> StepResult:
    """A step's result: the step's own texts and required time, `fields` for the rest, and
    "passed" only with no failure line (unless `fields` names the result)."""
    fields.setdefault("result", "failed" if failures else "passed")
    return StepResult(
        id=step.id,
        kind=step.kind,
        hazard=step.hazard,
        cause=step.cause_text,
        effect=step.effect_text,
        required_s=step.required_s,
        failures=tuple(failures),
        **fields,
    )


def not_run(step: Step, method: Method | str, result: str, why: str) -> StepResult:
    """A step that was not run: `skipped`, `not_testable` or `aborted` before its cause, with
    why as its one failure line (an empty `why` gives none)."""
    if result not in RESULTS:
        raise PlanError(f"result: {result!r}: expected one of {', '.join(RESULTS)}")
    return _result(
        step,
        (why,) if why else (),
        method=str(Method(method)) if step.kind == "rule" else Method.HEARTBEAT_HOLD.value,
        applied="",
        response_s=None,
        effects=(),
        feedback=(),
        rule_active=False,
        latched=False,
        mode_before=None,
        mode_during=None,
        result=result,
        reset={"needed": False, "done": False, "how": ""},
    )


# ---- the judge -----------------------------------------------------------------------------


def _kept_from(window: Sequence[Observation], ok: Callable[[Observation], bool]) -> int | None:
    """The index from which `ok` holds on every observation to the end of the window (a
    flicker is not a response), or None if it does not hold at the end."""
    first: int | None = None
    for i in range(len(window) - 1, -1, -1):
        if not ok(window[i]):
            break
        first = i
    return first


def _unit(site: Site, name: str) -> str:
    try:
        return site.tag(name).unit
    except KeyError:
        return ""


def _last_level(window: Sequence[Observation], output: str) -> str | None:
    for o in reversed(window):
        if output in o.levels:
            return o.levels[output]
    return None


def _last_mode(window: Sequence[Observation]) -> str | None:
    for o in reversed(window):
        if o.mode is not None:
            return o.mode
    return None


def _expect_line(
    e: Expect, as_found: Value | None, at_s: float | None, step: Step, site: Site
) -> str:
    want = " or ".join(fmt(v, _unit(site, e.output)) for v in e.values)
    found = fmt(as_found, _unit(site, e.output))
    if at_s is None:
        return f"{e.output}: as found {found}, expected {want} within {_n(step.required_s)} s"
    return f"{e.output}: {found} after {_n(at_s)} s, expected {want} within {_n(step.required_s)} s"


def _judge_feedback(
    step: Step,
    window: Sequence[Observation],
    t0: float,
    before: Observation,
    site: Site,
    effects: Mapping[str, EffectResult],
    cut_at: float | None,
) -> tuple[list[FeedbackResult], list[str]]:
    """Each feedback on the window; `cut_at` (the cause went away and the window was cut
    there): a feedback not yet due by then is not proven, which is no failure."""
    rows: list[FeedbackResult] = []
    fails: list[str] = []
    for f in step.feedback:
        test = f.test
        text = f.text
        eff = effects.get(f.output)
        if f.output and eff is not None and len(eff.expected) > 1:
            # a conditional effect: the input follows the value the output actually took
            target = eff.as_found
            tol = f.tolerance

            def follows(v: Value | None, target: Value | None = target, tol: float = tol) -> bool:
                return target is not None and accepted(v, (target,), tol)

            test = follows
            if _is_num(target):
                text = _within_text(site.tag(f.tag), float(target), tol)  # type: ignore[arg-type]
        i = _kept_from(window, lambda o, test=test, tag=f.tag: o.plc_ok and test(o.inputs.get(tag)))
        at_s = None if i is None else max(0.0, window[i].t - t0)
        ok = at_s is not None and at_s <= f.within_s
        as_found = window[-1].inputs.get(f.tag) if window else None
        note = ""
        if not ok and at_s is None and cut_at is not None and cut_at - t0 < f.within_s:
            ok, note = (
                True,
                (
                    f"not proven: the effect ended after {_n(cut_at - t0)} s (its cause went "
                    "away), "
                    f"before the plant had to follow ({_n(f.within_s)} s)"
                ),
            )
        rows.append(
            FeedbackResult(
                f.tag, text, before.inputs.get(f.tag), as_found, f.within_s, at_s, ok, note
            )
        )
        if not ok:
            found = fmt(as_found, _unit(site, f.tag))
            fails.append(f"{f.tag}: as found {found}, expected {text} within {_n(f.within_s)} s")
    return rows, fails


def _cause_window(
    step: Step, method: Method, window: Sequence[Observation], site: Site
) -> tuple[Sequence[Observation], float | None]:
    """The part of the window in which the cause stood at the PLC inputs: a non-latching rule
    clears by design when its cause goes away (IL-01: the fans it speeds up cool the supply
    below the limit again), so its effects are judged up to the first readable observation,
    after the cause was seen, that no longer shows it. A forced cause is not at the PLC inputs
    (it lives in the controller and stands until cleared): the whole window."""
    if step.latching or method is Method.FORCED or step.id == LINK_RULE:
        return window, None
    seen = False
    for i, o in enumerate(window):
        if not o.plc_ok:
            continue
        present = cause_present(step, o, site)
        if present:
            seen = True
        elif seen:
            return window[:i], o.t
    return window, None


def judge(
    step: Step,
    method: Method,
    t0: float,
    obs: Sequence[Observation],
    before: Observation,
    site: Site,
    applied: str,
) -> StepResult:
    """Judge a rule step from the observations.

    `t0`: when the cause is present at the PLC (a step cause: when the fault or force was
    accepted, or the first observation with `cause_present`; a ramped cause: the first such
    observation; physical: the first such observation). Observations before `t0` are ignored;
    the window ends at the last one, so the runner observes until every expect and feedback
    could have arrived (`required_s`, each feedback's `within_s`) and a little beyond. For a
    non-latching rule whose cause was applied at the PLC (sim, physical) the window is cut where
    the cause went away (`_cause_window`): the rule clears then by design.

    IL-08: the observer's own link drops with the controller's, so the outputs are judged on
    the first readable observation after the outage (every output at its safe value: the PLC
    watchdog acted). Its time is measured only if `plc_watchdog_tripped` was readable during the
    outage (the runner may fill it from the simulator's instrument view); otherwise `at_s` is
    None, the effect row says so and that is no failure: the WD step measures the watchdog's time
    with the link up.
    """
    if step.kind != "rule":
        raise PlanError(f"step {step.id}: kind {step.kind!r}: judge takes rule steps")
    method = Method(method)
    window = sorted((o for o in obs if o.t >= t0), key=lambda o: o.t)
    judged, cut_at = _cause_window(step, method, window, site)
    if step.id == LINK_RULE:
        effects, fails, response = _judge_link(step, t0, window, before, site)
        rule_active = any(not o.link_ok for o in window)
    else:
        effects, fails, response = _judge_expects(step, t0, judged, before, site)
        rule_active = any(step.id in o.active for o in window)
        if any(not o.plc_ok for o in window):
            fails.insert(0, "PLC link lost mid-step")
        if fails and cut_at is not None:
            fails.append(f"the cause went away {_n(cut_at - t0)} s after it was applied")
    by_out = {e.output: e for e in effects}
    fb_rows, fb_fails = _judge_feedback(step, judged, t0, before, site, by_out, cut_at)
    fails += fb_fails
    if not rule_active:
        what = (
            "the controller's PLC link did not go down"
            if step.id == LINK_RULE
            else (f"{step.id} never went active")
        )
        fails.append(what)
    latched = step.latching and any(step.id in o.latched for o in window)
    if step.latching and not latched:
        fails.append(f"{step.id} did not latch")
    return _result(
        step,
        fails,
        method=method.value,
        applied=applied,
        response_s=response,
        effects=tuple(effects),
        feedback=tuple(fb_rows),
        rule_active=rule_active,
        latched=latched,
        mode_before=before.mode,
        mode_during=_last_mode(judged),
        reset={"needed": step.latching, "done": False, "how": ""},
    )


# The levels at which an interlock's value reaches an output (the guard only ever adds cooling).
RULE_LEVELS = frozenset({"interlock", "guard"})


def _held(o: Observation, e: Expect) -> bool:
    return o.plc_ok and e.accepts(o.outputs.get(e.output))


def _claimed(o: Observation, e: Expect) -> bool:
    """The PLC output holds an accepted value and the controller says an interlock set it (a
    level not reported, before any status, is not held against it)."""
    return _held(o, e) and o.levels.get(e.output) in (None, *RULE_LEVELS)


def _response_index(window: Sequence[Observation], e: Expect) -> int | None:
    """Where the expect was met, to stay: the PLC output's change, timed by the observer's own
    reads; but an output that already held the value when the cause arrived (IL-01's fans,
    which the sequence drives up while the supply rises slowly) has responded only once the
    controller says an interlock holds it. Either way an interlock must hold it by the end."""
    i = _kept_from(window, lambda o: _held(o, e))
    j = _kept_from(window, lambda o: _claimed(o, e))
    if i is None or j is None:
        return None
    return j if i == 0 else i


def _judge_expects(
    step: Step, t0: float, window: Sequence[Observation], before: Observation, site: Site
) -> tuple[list[EffectResult], list[str], float | None]:
    effects: list[EffectResult] = []
    fails: list[str] = []
    times: list[float | None] = []
    for e in step.expects:
        i = _response_index(window, e)
        at_s = None if i is None else max(0.0, window[i].t - t0)
        ok = at_s is not None and at_s <= step.required_s
        as_found = window[-1].outputs.get(e.output) if window else None
        b = before.outputs.get(e.output)
        # an output that already held the value proves nothing about the rule (e.g. a leak
        # step run while DRY_COOLER_REJECT already bypasses the valve): say so in the record
        note = ALREADY if ok and e.accepts(b) else ""
        effects.append(
            EffectResult(
                e.output, e.values, b, as_found, at_s, _last_level(window, e.output), ok, note
            )
        )
        times.append(at_s)
        if not ok:
            fails.append(_expect_line(e, as_found, at_s, step, site))
    response = None if any(t is None for t in times) or not times else max(times)  # type: ignore[type-var]
    return effects, fails, response


def _judge_link(
    step: Step, t0: float, window: Sequence[Observation], before: Observation, site: Site
) -> tuple[list[EffectResult], list[str], float | None]:
    """IL-08: the outputs on the link's return, and the watchdog's time when it was visible."""
    fails: list[str] = []
    down = next((i for i, o in enumerate(window) if not o.plc_ok), None)
    back = None
    if down is not None:
        back = next((i for i in range(down, len(window)) if window[i].plc_ok), None)
    if down is None:
        fails.append("the PLC link did not go down (the cause was not applied)")
    elif back is None:
        fails.append("the PLC link did not come back within the window")
    # the trip's time is known only if it was visible before the link came back (the
    # simulator's instrument view); seen only on the return, it happened somewhere in the outage
    blind = window[:back] if back is not None else window
    tripped_at = next((o.t for o in blind if o.inputs.get("plc_watchdog_tripped") is True), None)
    seen = window[back] if back is not None else None
    trips = "plc_watchdog_trips"
    counted: str | None = None  # the trip counter's evidence, when the site maps it
    if seen is not None and any(t.name == trips for t in site.inputs):
        b, a = before.inputs.get(trips), seen.inputs.get(trips)
        if _is_num(a) and _is_num(b) and float(a) > float(b):  # type: ignore[arg-type]
            counted = f"{trips} rose from {fmt(b)} to {fmt(a)}"
        else:
            fails.append(f"{trips}: as found {fmt(a)}, expected more than {fmt(b)} (a trip)")
    released = seen is not None and seen.inputs.get("plc_watchdog_tripped") is not True
    effects: list[EffectResult] = []
    times: list[float | None] = []
    for e in step.expects:
        b = before.outputs.get(e.output)
        v = seen.outputs.get(e.output) if seen is not None else None
        ok = seen is not None and e.accepts(v)
        at_s: float | None = None
        note = ""
        if ok and tripped_at is not None:
            at_s = max(0.0, tripped_at - t0)
            ok = at_s <= step.required_s
        elif ok:
            note = (
                "seen at its safe value when the link came back; the watchdog's time is not "
                "measurable through a dropped link (the WD step measures it)"
            )
        elif counted is not None and released:
            # the PLC tripped (its counter says so) and had released again before the tool's
            # own connection was back: the safe hold itself was not seen, the WD step sees it
            ok, note = (
                True,
                (
                    f"not seen: the PLC had released its safe hold before the tool could read it "
                    f"again; {counted}"
                ),
            )
        if ok and e.accepts(b):
            note = "not proven: already at its safe value before the link dropped"
        effects.append(
            EffectResult(
                e.output,
                e.values,
                b,
                v,
                at_s,
                seen.levels.get(e.output) if seen is not None else None,
                ok,
                note,
            )
        )
        times.append(at_s)
        if seen is not None and not ok:
            fails.append(_expect_line(e, v, at_s, step, site) + " (on the link's return)")
    measured = [t for t in times if t is not None]
    response = max(measured) if measured and len(measured) == len(times) else None
    return effects, fails, response


def judge_watchdog(
    step: Step,
    t0: float,
    t_resume: float,
    obs: Sequence[Observation],
    before: Observation,
    site: Site,
) -> StepResult:
    """Judge the WD step. `t0`: the heartbeat hold was accepted; `t_resume`: the hold ended.

    Every output not already safe in `before` must reach its safe value within `required_s` of
    `t0` and keep it to `t_resume`; outputs already safe are listed "not proven" (no failure).
    After `t_resume` the PLC must keep the safe values for at least `watchdog_holdoff_s -
    WD_MARGIN_S` and release (some proven output leaves its safe value, or `plc_watchdog_tripped`
    reads false when the site maps it) within `watchdog_holdoff_s + RELEASE_SLACK_S`. When mapped,
    `plc_watchdog_tripped` must read true during the hold and `plc_watchdog_trips` must rise.
    """
    window = sorted((o for o in obs if o.t >= t0), key=lambda o: o.t)
    hold = [o for o in window if o.t <= t_resume]
    after = [o for o in window if o.t > t_resume]
    holdoff = site.plc.watchdog_holdoff_s
    min_hold_end = t_resume + max(0.0, holdoff - WD_MARGIN_S)
    release_by = t_resume + holdoff + RELEASE_SLACK_S
    mapped = {t.name for t in site.inputs}
    fails: list[str] = []
    if any(not o.plc_ok for o in window):
        fails.append("PLC link lost mid-step")
    effects: list[EffectResult] = []
    proven: list[Expect] = []
    times: list[float | None] = []
    for e in step.expects:
        b = before.outputs.get(e.output)
        as_found = hold[-1].outputs.get(e.output) if hold else None
        level = _last_level(hold, e.output)
        if e.accepts(b):
            effects.append(
                EffectResult(
                    e.output,
                    e.values,
                    b,
                    as_found,
                    None,
                    level,
                    True,
                    "not proven: already at its safe value",
                )
            )
            continue
        proven.append(e)
        i = _kept_from(hold, lambda o, e=e: o.plc_ok and e.accepts(o.outputs.get(e.output)))
        at_s = None if i is None else max(0.0, hold[i].t - t0)
        ok = at_s is not None and at_s <= step.required_s
        times.append(at_s)
        effects.append(EffectResult(e.output, e.values, b, as_found, at_s, level, ok))
        if not ok:
            want = fmt(e.values[0], _unit(site, e.output))
            found = fmt(as_found, _unit(site, e.output))
            if at_s is None:
                fails.append(
                    f"{e.output}: as found {found}, not at its safe value {want} within "
                    f"{_n(step.required_s)} s of the heartbeat hold"
                )
            else:
                fails.append(
                    f"{e.output}: at its safe value {want} after {_n(at_s)} s, expected within "
                    f"{_n(step.required_s)} s"
                )
    if not proven:
        fails.append("nothing proven: every output was at its safe value before the hold")
    feedback: list[FeedbackResult] = []
    tripped = "plc_watchdog_tripped"
    # the hold after the heartbeat resumes, and the release: judged only once the PLC went safe
    # (a watchdog that never tripped has nothing to hold or release; its failure is said above)
    went_safe = any(e.at_s is not None and not e.note for e in effects)
    if went_safe:
        left = [
            o
            for o in after
            if o.plc_ok and any(not e.accepts(o.outputs.get(e.output)) for e in proven)
        ]
        if tripped in mapped:
            left = [o for o in after if o.plc_ok and o.inputs.get(tripped) is False] or left
        released_at = left[0].t if left else None
        early = released_at is not None and released_at < min_hold_end
        feedback.append(
            FeedbackResult(
                "holdoff",
                f"safe values kept ≥ {_n(min_hold_end - t_resume)} s after the heartbeat resumes",
                None,
                None if released_at is None else round(released_at - t_resume, 3),
                holdoff,
                None if released_at is None else max(0.0, released_at - t_resume),
                not early,
            )
        )
        if early and released_at is not None:
            fails.append(
                f"PLC released {_n(released_at - t_resume)} s after the heartbeat resumed, "
                f"expected a hold of at least {_n(min_hold_end - t_resume)} s (watchdog_holdoff_s "
                f"{_n(holdoff)} s)"
            )
        released_ok = released_at is not None and released_at <= release_by
        feedback.append(
            FeedbackResult(
                "release",
                f"PLC releases within {_n(holdoff + RELEASE_SLACK_S)} s after the heartbeat "
                "resumes",
                None,
                None if released_at is None else round(released_at - t_resume, 3),
                holdoff + RELEASE_SLACK_S,
                None if released_at is None else max(0.0, released_at - t_resume),
                released_ok,
            )
        )
        if not released_ok:
            fails.append(
                "PLC did not release its safe hold within "
                f"{_n(holdoff + RELEASE_SLACK_S)} s after the heartbeat resumed"
            )
    if tripped in mapped:
        seen = any(o.plc_ok and o.inputs.get(tripped) is True for o in hold)
        last = hold[-1].inputs.get(tripped) if hold else None
        feedback.append(
            FeedbackResult(
                tripped,
                "on during the hold",
                before.inputs.get(tripped),
                last,
                step.required_s,
                None,
                seen,
            )
        )
        if not seen:
            fails.append(f"{tripped}: as found {fmt(last)}, expected on during the hold")
    trips = "plc_watchdog_trips"
    if trips in mapped:
        b = before.inputs.get(trips)
        readable = [o for o in window if o.plc_ok]
        a = readable[-1].inputs.get(trips) if readable else None
        rose = _is_num(a) and _is_num(b) and float(a) > float(b)  # type: ignore[arg-type]
        feedback.append(
            FeedbackResult(trips, f"more than {fmt(b)}", b, a, step.required_s, None, rose)
        )
        if not rose:
            fails.append(f"{trips}: as found {fmt(a)}, expected more than {fmt(b)} (a trip)")
    response = None if not times or any(t is None for t in times) else max(times)  # type: ignore[type-var]
    any_safe = any(e.ok and e.at_s is not None for e in effects)
    return _result(
        step,
        fails,
        method=Method.HEARTBEAT_HOLD.value,
        applied="controller heartbeat held (watchdog_test)",
        response_s=response,
        effects=tuple(effects),
        feedback=tuple(feedback),
        rule_active=any_safe,
        latched=False,
        mode_before=before.mode,
        mode_during=_last_mode(hold),
        reset={"needed": False, "done": False, "how": ""},
    )
