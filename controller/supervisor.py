"""The supervisor step: a process image and a time in, a decision out. No I/O, no clock.

Order inside a step, as in DESIGN §4: validate the inputs, evaluate the interlocks, advance the
mode machine, let the mode's sequence ask for outputs (the fan PI loop among them), arbitrate
the priority array, and guard the result. The same object runs in the scan loop over Modbus,
in the in-process closed loop of `heatloop study`, and under hypothesis in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.arbitration import (
    Manual,
    Output,
    Refusal,
    arbitrate,
    check_manual,
    check_setpoint,
    guard,
    min_pump_speed_pct,
    shown,
)
from controller.modes import Conditions, Mode, ModeMachine, Timing
from controller.sequences import PI, SequenceConfig, mode_outputs
from interlocks.engine import Event, InterlockState, evaluate
from interlocks.rules import (
    Thresholds,
    customer_sink,
    leaks_dry,
    reuse_circuit_safe,
    tank_is_sink,
)
from interlocks.validation import (
    EMPTY_MEMORY,
    Point,
    ValidationConfig,
    compile_spec,
    compile_supervision,
    validate,
)
from plc_io.image import ProcessImage
from plc_io.site import Site
from plc_io.tags import Tag, Value

LEAK_RULES = frozenset({"IL-04", "IL-05"})
NONE: frozenset[str] = frozenset()
NO_MANUAL: Mapping[str, Manual] = {}
# Interlocks that reject reuse. IL-01/IL-02 do not: fail toward cooling means more cooling,
# so the reuse mode keeps running (customer and tank are sinks) under the interlock's forced
# fans and pumps, and the interlock itself decides which reuse outputs its protections allow.
REJECT_RULES = frozenset({"IL-03", "IL-06", "IL-08"})
# The dry cooler counts as failed when its fault input says so, or when its fans have been
# commanded high for DC_FOLLOW_S with a real driving difference (return at least DC_DRIVE_K above
# ambient) and its outlet has not come down by at least half of that difference (a healthy
# cooler at full air flow takes most of it; natural draft alone takes about a tenth).
DC_FANS_HIGH_PCT = 90.0
DC_DRIVE_K = 5.0
DC_APPROACH_FRAC = 0.5
DC_FOLLOW_S = 300.0
# Without these the reuse circuit runs blind: leave it to the dry cooler.
REUSE_SENSORS = (
    "tank_top_temp",
    "tank_mid_temp",
    "tank_bottom_temp",
    "hx_secondary_out_temp",
    "secondary_pressure",
    "leak_reuse",
    "leak_primary",
)
PUMP_FEEDBACK = (
    ("primary_pump_a_cmd", "primary_pump_a_running"),
    ("primary_pump_b_cmd", "primary_pump_b_running"),
    ("secondary_pump_cmd", "secondary_pump_running"),
)
PRIMARY_FEEDBACK = frozenset({"primary_pump_a_running", "primary_pump_b_running"})
SETPOINT_MIN_C = 10.0  # the lowest supply setpoint a request may ask for (as the site file)
ANALOGUE_USED = ("it_supply_temp", "it_return_temp", "tank_bottom_temp", "primary_flow")


@dataclass(frozen=True)
class Commands:
    """What operators, engineers and the BMS ask for this scan (already authorised)."""

    reset: bool = False
    request_reject: bool = False
    maintenance: bool = False
    manual: Mapping[str, Manual] = field(default_factory=dict)
    bypasses: Mapping[str, float] = field(default_factory=dict)  # rule id -> expiry
    supply_setpoint_c: float | None = None
    link_ok: bool = True
    # outputs the PLC did not acknowledge in the previous scan (heartbeat included)
    write_failed: frozenset[str] = frozenset()
    # runtime-level faults, e.g. "journal cannot persist"
    degraded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    now_s: float
    mode: Mode
    mode_since_s: float
    outputs: Mapping[str, Output]
    active: frozenset[str]
    latched: frozenset[str]
    bypassed: frozenset[str]
    events: tuple[Event, ...]
    blocked: tuple[str, ...]
    reject_reasons: tuple[str, ...]
    invalid: Mapping[str, str]  # tag -> why it is not trusted

    def values(self) -> dict[str, Value]:
        return {k: o.value for k, o in self.outputs.items()}


@dataclass(frozen=True)
class SupervisorConfig:
    inputs: tuple[Tag, ...]
    safe: Mapping[str, Value]
    thresholds: Thresholds
    validation: ValidationConfig
    sequence: SequenceConfig
    timing: Timing
    tank_full_hysteresis_k: float
    primary_flow_low_m3h: float
    fan_kp: float = 8.0  # % per K
    fan_ti_s: float = 120.0
    pump_fail_s: float = 10.0  # commanded but not running this long: the pump has failed
    valve_follow_s: float = 120.0  # the reuse valve must reach its command within this
    valve_tolerance_pct: float = 10.0
    valve_retry_s: float = 3600.0  # after a valve fault, try reuse again at most this often
    outputs: tuple[Tag, ...] = ()  # requests are checked against these (range, type)
    max_force_s: float = 28800.0  # a manual or forced value may last at most this long

    @classmethod
    def from_site(cls, site: Site) -> SupervisorConfig:
        il, c = site.interlocks, site.control
        return cls(
            inputs=site.inputs,
            safe=site.safe_outputs(),
            thresholds=Thresholds(
                it_supply_high_c=il.it_supply_high_c,
                primary_flow_low_m3h=il.primary_flow_low_m3h,
                tank_top_high_c=il.tank_top_high_c,
                secondary_pressure_high_bar=il.secondary_pressure_high_bar,
                customer_supply_high_c=il.customer_supply_high_c,
                freeze_ambient_c=il.freeze_ambient_c,
                freeze_drycooler_out_c=il.freeze_drycooler_out_c,
                fan_min_pct=c.fan_min_pct,
                max_bypass_s=il.max_bypass_s,
                primary_speed_pct=c.primary_pump_speed_pct,
                secondary_speed_pct=c.secondary_pump_speed_pct,
            ),
            validation=ValidationConfig(
                il.stale_s,
                il.frozen_s,
                il.max_rate_k_per_s,
                redundant=dict(il.redundant),
                spec=compile_spec(site.inputs, il.redundant, il.frozen_s),
                plausibility_band_k=il.plausibility_band_k,
                plausibility_min_it_power_kw=il.plausibility_min_it_power_kw,
                supervised=compile_supervision(site.inputs),
            ),
            sequence=SequenceConfig(
                supply_setpoint_c=c.it_supply_setpoint_c,
                tank_full_c=c.tank_full_c,
                fan_min_pct=c.fan_min_pct,
                primary_speed_pct=c.primary_pump_speed_pct,
                secondary_speed_pct=c.secondary_pump_speed_pct,
            ),
            timing=Timing(
                min_dwell_s=c.min_mode_dwell_s,
                reject_dwell_s=c.reject_dwell_s,
                customer_ready_dwell_s=c.customer_ready_dwell_s,
                reuse_reentry_min_s=c.reuse_reentry_min_s,
                hunting_changes_per_h=c.hunting_changes_per_h,
            ),
            tank_full_hysteresis_k=c.tank_full_hysteresis_k,
            primary_flow_low_m3h=il.primary_flow_low_m3h,
            pump_fail_s=c.pump_fail_s,
            valve_follow_s=c.valve_follow_s,
            valve_tolerance_pct=c.valve_tolerance_pct,
            valve_retry_s=c.valve_retry_s,
            outputs=site.outputs,
            max_force_s=c.max_force_s,
        )


class Supervisor:
    """The decision core. `latched` restores trips that were latched before a restart."""

    def __init__(
        self, cfg: SupervisorConfig, now_s: float = 0.0, latched: frozenset[str] = frozenset()
    ) -> None:
        self.cfg = cfg
        self.machine = ModeMachine(cfg.timing, Mode.STARTUP, now_s)
        self.il = InterlockState(latched=latched, active=latched)
        self.memory = EMPTY_MEMORY
        c = cfg.sequence
        self.fan_pi = PI(cfg.fan_kp, cfg.fan_ti_s, c.fan_min_pct, 100.0)
        self.fan_pi_out = math.nan  # the loop's own output last scan
        self.last: Mapping[str, Output] = {}
        self.out_tags = {t.name: t for t in cfg.outputs}
        self.invalid: Mapping[str, str] = {}  # points invalid in the last scan, with why
        self.blocked_names: frozenset[str] = frozenset()  # commands the guard blocked last scan
        self.refused: frozenset[tuple[str, str, str]] = frozenset()  # as last reported
        self.pump_fail_since: dict[str, float] = {}  # feedback tag -> commanded, stopped since
        self.pump_failed: set[str] = set()  # feedback tags of pumps judged failed
        self.dc_failed = False  # the dry cooler is no sink (fault input, or outlet not following)
        self.dc_not_cooling_since: float | None = None
        self.blocked_total = 0
        self.was_hunting = False
        self.write_failed: frozenset[str] = frozenset()  # as last reported, for its events
        self.degraded: tuple[str, ...] = ()
        self.tank_full = False  # with hysteresis: set above tank_full_c, cleared below it - hyst
        self.valve_off_since: float | None = None  # reuse valve away from its command since
        self.valve_fault = False
        self.valve_fault_at = -math.inf

    @property
    def mode(self) -> Mode:
        return self.machine.mode

    @property
    def latched(self) -> frozenset[str]:
        return self.il.latched

    def step(self, image: ProcessImage, now_s: float, cmds: Commands = Commands()) -> Decision:
        cfg = self.cfg
        flow = image["primary_flow"]
        flowing = (
            flow.quality.usable
            and isinstance(flow.value, float)
            and flow.value > cfg.primary_flow_low_m3h
        )
        points, self.memory = validate(image, self.memory, now_s, cfg.validation, flowing)
        verdict = evaluate(
            points,
            self.il,
            now_s,
            cfg.thresholds,
            link_ok=cmds.link_ok,
            reset=cmds.reset,
            bypasses=cmds.bypasses,
        )
        self.il = verdict.state
        events = list(verdict.events)

        valve_event = self._watch_valve(points, now_s)
        if valve_event:
            events.append(valve_event)
        if cmds.write_failed or cmds.degraded or self.write_failed or self.degraded:
            events += self._runtime_events(cmds, now_s)
        events += self._watch_pumps(points, now_s, cmds.reset)
        events += self._watch_drycooler(points, now_s)
        reasons = self._reject_reasons(points, verdict.active, cmds, now_s)
        tank = points["tank_bottom_temp"].num() if "tank_bottom_temp" in points else math.nan
        if tank > cfg.sequence.tank_full_c:
            self.tank_full = True
        elif tank < cfg.sequence.tank_full_c - cfg.tank_full_hysteresis_k:
            self.tank_full = False  # inside the band, or unknown (NaN): keep the flag
        ready = points.get("customer_ready")
        cond = Conditions(
            inputs_valid=cmds.link_ok and points["it_supply_temp"].valid,
            leak_latched=bool(verdict.latched & LEAK_RULES),
            leaks_dry=leaks_dry(points),
            reset=cmds.reset,
            maintenance=cmds.maintenance,
            reject=bool(reasons),
            customer_ready=ready is not None and ready.valid and ready.value is True,
            tank_full=self.tank_full,
        )
        moved = self.machine.advance(cond, now_s)
        if moved:
            events.append(
                Event(
                    "mode_changed",
                    now_s,
                    moved[1].value,
                    {"from": moved[0].value, "reasons": list(reasons)},
                )
            )
        if self.machine.hunting and not self.was_hunting:
            events.append(
                Event("mode_hunting", now_s, "modes", {"changes_1h": len(self.machine.changes)})
            )
        self.was_hunting = self.machine.hunting

        values = {n: points[n].num() if n in points else math.nan for n in ANALOGUE_USED}
        # requests are checked against their tags before anything uses them
        manual, refusals = (
            check_manual(cmds.manual, self.out_tags, now_s, cfg.max_force_s)
            if cmds.manual
            else (NO_MANUAL, [])
        )
        setpoint = cfg.sequence.supply_setpoint_c
        if cmds.supply_setpoint_c is not None:
            # never let a requested setpoint sit within 5 K of the IL-01 limit
            ceiling = cfg.thresholds.it_supply_high_c - 5.0
            why = check_setpoint(cmds.supply_setpoint_c, SETPOINT_MIN_C, ceiling)
            if why:
                refusals.append(
                    Refusal("supply_setpoint_c", cmds.supply_setpoint_c, f"expected {why}")
                )
            else:
                setpoint = float(cmds.supply_setpoint_c)
        if refusals or self.refused:
            events += self._refusal_events(refusals, now_s)
        error = values["it_supply_temp"] - setpoint
        # bumpless in every mode: whenever the fans were given anything but the loop's own
        # output (a trip's or start-up's 100 %, an interlock, a manual value, the guard), the
        # loop continues from where they really are, never from a stale integral
        last_fan = self.last.get("drycooler_fan_cmd")
        if last_fan is not None and last_fan.value != self.fan_pi_out:
            self.fan_pi = self.fan_pi.track(float(last_fan.value), error, now_s)
        fan_pct, self.fan_pi = self.fan_pi.update(error, now_s)
        self.fan_pi_out = fan_pct
        seq = mode_outputs(
            self.machine.mode,
            values,
            fan_pct,
            cfg.sequence,
            self.tank_full,
            hx_first=self.dc_failed
            and tank_is_sink(points, 0.0)
            and reuse_circuit_safe(points, cfg.thresholds),
            customer_ok=cond.customer_ready and customer_sink(points, cfg.thresholds),
        )
        if "primary_pump_a_running" in self.pump_failed:
            seq["primary_pump_b_cmd"] = True  # duty to the standby

        forced = {k: (f.value, ",".join(f.by)) for k, f in verdict.forced.items()}
        outputs = arbitrate(cfg.safe, now_s, interlock=forced, manual=manual, sequence=seq)
        running = {
            fb: (points[fb].value if fb in points and points[fb].valid else None)
            for fb in ("primary_pump_a_running", "primary_pump_b_running")
        }
        blocked = guard(
            outputs,
            running,  # type: ignore[arg-type]
            min_fan_pct=cfg.sequence.fan_min_pct,
            min_pump_speed_pct=min_pump_speed_pct(cfg.sequence.primary_speed_pct),
        )
        self.blocked_total += len(blocked)
        blocked_names = frozenset(b.partition("=")[0] for b in blocked) if blocked else NONE
        if blocked_names != self.blocked_names:  # once per distinct cause, not every scan
            if blocked:
                events.append(Event("command_blocked", now_s, "guard", {"blocked": blocked}))
            self.blocked_names = blocked_names
        invalid = {k: p.reason for k, p in points.items() if not p.valid}
        if invalid.keys() != self.invalid.keys():
            events += self._point_events(invalid, now_s)
        self.invalid = invalid
        self.last = outputs
        return Decision(
            now_s=now_s,
            mode=self.machine.mode,
            mode_since_s=self.machine.since_s,
            outputs=outputs,
            active=verdict.active,
            latched=verdict.latched,
            bypassed=verdict.bypassed,
            events=tuple(events),
            blocked=tuple(blocked),
            reject_reasons=reasons,
            invalid=invalid,
        )

    def _reject_reasons(
        self, points: Mapping[str, Point], active: frozenset[str], cmds: Commands, now_s: float
    ) -> tuple[str, ...]:
        r = [f"interlock {i}" for i in sorted(active & REJECT_RULES)]
        r += [
            f"{n} {points[n].reason}" for n in REUSE_SENSORS if n in points and not points[n].valid
        ]
        if cmds.request_reject:
            r.append("reject requested")
        if not cmds.link_ok:
            r.append("PLC link lost")
        if cmds.write_failed:
            r.append(f"outputs not acknowledged: {', '.join(sorted(cmds.write_failed))}")
        r += [str(d) for d in cmds.degraded]
        if self.valve_fault or now_s - self.valve_fault_at < self.cfg.valve_retry_s:
            r.append("reuse valve not following its command")
        if "secondary_pump_running" in self.pump_failed:
            r.append("secondary pump failed")
        if self.pump_failed >= PRIMARY_FEEDBACK:
            r.append("both primary pumps failed")
        return tuple(r)

    def _point_events(self, invalid: Mapping[str, str], now_s: float) -> list[Event]:
        """One `point_invalid` when a point turns bad, one `point_valid` when it recovers."""
        was = self.invalid
        events = [
            Event("point_invalid", now_s, k, {"tag": k, "reason": why})
            for k, why in invalid.items()
            if k not in was
        ]
        events += [
            Event("point_valid", now_s, k, {"tag": k, "was": why})
            for k, why in was.items()
            if k not in invalid
        ]
        return events

    def _refusal_events(self, refusals: list[Refusal], now_s: float) -> list[Event]:
        """`command_refused` once per distinct refused request (a standing one is not repeated)."""
        keys = frozenset((r.tag, shown(r.value), r.why) for r in refusals)
        new = keys - self.refused
        self.refused = keys
        return [
            Event(
                "command_refused",
                now_s,
                r.tag,
                {"tag": r.tag, "value": _shown(r.value), "why": r.why},
            )
            for r in refusals
            if (r.tag, shown(r.value), r.why) in new
        ]

    def _runtime_events(self, cmds: Commands, now_s: float) -> list[Event]:
        """One event when unacknowledged writes or runtime faults start, change or clear."""
        failed, degraded = sorted(cmds.write_failed), list(cmds.degraded)
        events = [
            *_change(
                now_s,
                "plc",
                ("write_failed", "write_recovered"),
                "outputs",
                failed,
                sorted(self.write_failed),
            ),
            *_change(
                now_s,
                "runtime",
                ("degraded", "degraded_cleared"),
                "faults",
                degraded,
                list(self.degraded),
            ),
        ]
        self.write_failed, self.degraded = frozenset(failed), tuple(degraded)
        return events

    def _watch_valve(self, points: Mapping[str, Point], now_s: float) -> Event | None:
        """Compare the valve's feedback with what was last written; report a stuck valve once."""
        last = self.last.get("reuse_valve_cmd")
        pos = points["reuse_valve_pos"].num() if "reuse_valve_pos" in points else math.nan
        if last is None or math.isnan(pos):
            return None  # unknown feedback: no verdict either way
        if abs(pos - float(last.value)) <= self.cfg.valve_tolerance_pct:
            self.valve_off_since = None
        elif self.valve_off_since is None:
            self.valve_off_since = now_s
        was = self.valve_fault
        since = self.valve_off_since
        self.valve_fault = since is not None and now_s - since >= self.cfg.valve_follow_s
        if self.valve_fault and not was:
            self.valve_fault_at = now_s
            return Event(
                "reuse_valve_fault", now_s, "reuse_valve", {"cmd": last.value, "pos": round(pos, 1)}
            )
        return None

    def _watch_drycooler(self, points: Mapping[str, Point], now_s: float) -> list[Event]:
        """Is the dry cooler a sink? One event when it fails, one when it recovers."""
        fault = points.get("drycooler_fault")
        by_input = fault is not None and fault.valid and fault.value is True
        fan = self.last.get("drycooler_fan_cmd")
        not_cooling = False
        if fan is not None and float(fan.value) >= DC_FANS_HIGH_PCT:
            ret, out, amb = (
                points[n].num() if n in points else math.nan
                for n in ("it_return_temp", "drycooler_out_temp", "ambient_temp")
            )
            drive = ret - amb  # NaN when any is unknown: no verdict from the temperatures
            not_cooling = drive >= DC_DRIVE_K and out - amb > DC_APPROACH_FRAC * drive
        if not not_cooling:
            self.dc_not_cooling_since = None
        elif self.dc_not_cooling_since is None:
            self.dc_not_cooling_since = now_s
        since = self.dc_not_cooling_since
        failed = by_input or (since is not None and now_s - since >= DC_FOLLOW_S)
        if failed == self.dc_failed:
            return []
        self.dc_failed = failed
        if failed:
            why = "drycooler_fault input" if by_input else "outlet not following the fans"
            return [Event("drycooler_failed", now_s, "drycooler", {"why": why})]
        return [Event("drycooler_recovered", now_s, "drycooler")]

    def _watch_pumps(self, points: Mapping[str, Point], now_s: float, reset: bool) -> list[Event]:
        """Judge every pump with run feedback against what it was last told.

        Commanded but reading stopped for `pump_fail_s`: failed, with one event. A failed pump
        stays failed until its own feedback reads running again or a deliberate reset clears
        it; not commanding it proves nothing, so reuse is not re-entered onto a dead secondary
        pump every re-entry interval. Both primary pumps failed is its own alarm.
        """
        events: list[Event] = []
        was_both = self.pump_failed >= PRIMARY_FEEDBACK
        if reset and self.pump_failed:
            events.append(Event("pump_reset", now_s, "pumps", {"pumps": sorted(self.pump_failed)}))
            self.pump_failed = set()
        for cmd, fb in PUMP_FEEDBACK:
            last = self.last.get(cmd)
            p = points.get(fb)
            known = p is not None and p.valid
            if known and p.value is True:
                self.pump_fail_since.pop(fb, None)
                if fb in self.pump_failed:
                    self.pump_failed.discard(fb)
                    events.append(Event("pump_recovered", now_s, fb))
            elif known and last is not None and last.value is True:
                since = self.pump_fail_since.setdefault(fb, now_s)
                if now_s - since >= self.cfg.pump_fail_s and fb not in self.pump_failed:
                    self.pump_failed.add(fb)
                    events.append(Event("pump_failed", now_s, fb, {"commanded_s": now_s - since}))
            else:
                self.pump_fail_since.pop(fb, None)  # not commanded, or unknown: no verdict
        both = self.pump_failed >= PRIMARY_FEEDBACK
        if both and not was_both:
            events.append(Event("primary_pumps_failed", now_s, "primary_pumps"))
        return events


def _shown(v: object) -> object:
    """A refused value as an event carries it: numbers as they are, anything else bounded."""
    if isinstance(v, bool | float) or (isinstance(v, int) and -(2**63) <= v < 2**63):
        return v
    return shown(v)


def _change(
    now_s: float, source: str, kinds: tuple[str, str], key: str, new: list[str], old: list[str]
) -> list[Event]:
    """The first kind when a standing fault starts or changes, the second when it is gone."""
    if new == old:
        return []
    if new:
        return [Event(kinds[0], now_s, source, {key: new})]
    return [Event(kinds[1], now_s, source, {"was": old})]
