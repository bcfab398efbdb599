"""The supervisor step: a process image and a time in, a decision out. No I/O, no clock.

Order inside a step, as in DESIGN §4: validate the inputs, evaluate the interlocks, advance the
mode machine, let the mode's sequence ask for outputs (the fan PI loop among them), arbitrate
the priority array, and guard the result. The same object runs in the scan loop over Modbus,
in the in-process closed loop of `heatloop study`, and under hypothesis in the tests.

Its state is data: `snapshot()` is everything the next step depends on, as JSON-able values,
and `from_snapshot` continues from it bit for bit (the flight recorder replays from one).
`restart_memory()` is the smaller part that outlives a restart (DESIGN §5: the mode starts at
STARTUP again, but latches, failed pumps, a valve fault's retry clock and a failed dry cooler
are kept, so a restart never retries what the plant has already shown to be broken).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from controller.arbitration import (
    Level,
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
from controller.sequences import BMS_REQUESTS, PI, SequenceConfig, bms_room, mode_outputs
from interlocks.engine import Event, InterlockState, evaluate, reset_covers
from interlocks.rules import (
    RULES,
    Thresholds,
    customer_sink,
    leaks_dry,
    reuse_circuit_safe,
    tank_is_sink,
)
from interlocks.validation import (
    EMPTY_MEMORY,
    Memory,
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
FEEDBACK_CMD = {fb: cmd for cmd, fb in PUMP_FEEDBACK}
RULE_IDS = frozenset(r.id for r in RULES)
SNAPSHOT_VERSION = 1
SETPOINT_MIN_C = 10.0  # the lowest supply setpoint a request may ask for (as the site file)
ANALOGUE_USED = ("it_supply_temp", "it_return_temp", "tank_bottom_temp", "primary_flow")
# A tripped PLC releases its safe hold once the heartbeat has been steady for its hold-off and
# fresh commands arrived (DESIGN §7); this many scans more and a live controller whose writes
# land must have seen it released. Tripped for longer: the writes are not reaching the PLC.
PLC_HOLD_SCANS = 4
PLC_HOLD = "PLC holds its safe values (watchdog tripped)"


@dataclass(frozen=True)
class Commands:
    """What operators, engineers and the BMS ask for this scan (already authorised)."""

    # True: every latched rule; a set: the latched rules it names (a leak rule or all of them
    # also lets LEAK_TRIP go); False or an empty set: no reset
    reset: bool | frozenset[str] = False
    request_reject: bool = False
    maintenance: bool = False
    manual: Mapping[str, Manual] = field(default_factory=dict)
    bypasses: Mapping[str, float] = field(default_factory=dict)  # rule id -> expiry
    supply_setpoint_c: float | None = None
    # BMS requests by setpoint name (controller.sequences.BMS_REQUESTS), e.g.
    # {"secondary_pump_speed_pct": 60.0}: the BMS level of the priority array
    bms: Mapping[str, float] = field(default_factory=dict)
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
    # the supervisor's fault memory while it holds: "valve", "pump:<feedback tag>",
    # "primary_pumps", "drycooler", "hunting" -> one line why
    faults: Mapping[str, str] = field(default_factory=dict)

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
    # plc_watchdog_tripped reading true longer than this: the PLC holds its safe values (the
    # demo site's hold-off of 2 s plus PLC_HOLD_SCANS scans of 0.25 s)
    plc_hold_s: float = 3.0

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
            plc_hold_s=site.plc.watchdog_holdoff_s + PLC_HOLD_SCANS * site.scan.period_s,
        )


class Supervisor:
    """The decision core. `latched` restores trips that were latched before a restart, and
    `memory` (a `restart_memory()` from before it) the faults the plant had shown."""

    def __init__(
        self,
        cfg: SupervisorConfig,
        now_s: float = 0.0,
        latched: frozenset[str] = frozenset(),
        memory: Mapping[str, object] | None = None,
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
        self.dc_why = ""  # why it counts as failed
        self.dc_remembered = False  # failed as remembered over a restart, not yet judged again
        self.dc_not_cooling_since: float | None = None
        self.blocked_total = 0
        self.was_hunting = False
        self.write_failed: frozenset[str] = frozenset()  # as last reported, for its events
        self.degraded: tuple[str, ...] = ()
        self.tank_full = False  # with hysteresis: set above tank_full_c, cleared below it - hyst
        self.valve_off_since: float | None = None  # reuse valve away from its command since
        self.valve_fault = False
        self.valve_fault_at = -math.inf
        self.plc_tripped_since: float | None = None  # plc_watchdog_tripped read true since
        self.plc_hold = False  # tripped for longer than plc_hold_s: the PLC holds safe values
        if memory is not None:
            self._remember(memory, now_s, latched)

    @property
    def mode(self) -> Mode:
        return self.machine.mode

    # ---- the state as data ----

    def snapshot(self) -> dict[str, object]:
        """Everything the next step depends on, JSON-able (`json.dumps(allow_nan=True)`).

        Sets are sorted lists, tuples lists, enums their names; `from_snapshot` turns them
        back into what the code expects, so a restored supervisor decides bit for bit alike.
        """
        m, il, mem = self.machine, self.il, self.memory
        return {
            "version": SNAPSHOT_VERSION,
            "mode": {
                "mode": m.mode.value,
                "since_s": m.since_s,
                "now_s": m.now_s,
                "reject_clear_since": m.reject_clear_since,
                "ready_since": m.ready_since,
                "left_reuse_s": m.left_reuse_s,
                "changes": list(m.changes),
                "hunting": m.hunting,
            },
            "interlocks": {
                "held_s": dict(il.held_s),
                "active": sorted(il.active),
                "latched": sorted(il.latched),
                "bypassed": sorted(il.bypassed),
                "last_now_s": il.last_now_s,
                "refused": sorted(il.refused),
            },
            "validation": {
                "last": {k: list(v) for k, v in mem.last.items()},
                "rate_faulted": dict(mem.rate_faulted),
                "implausible": dict(mem.implausible),
                "loaded_s": mem.loaded_s,
                "last_now_s": mem.last_now_s,
            },
            "fan_pi": {"integral": self.fan_pi.integral, "last_s": self.fan_pi.last_s},
            "fan_pi_out": self.fan_pi_out,
            "last": {k: [o.value, o.level.name, o.why] for k, o in self.last.items()},
            "invalid": dict(self.invalid),
            "blocked_names": sorted(self.blocked_names),
            "refused": sorted(list(r) for r in self.refused),
            "pump_fail_since": dict(self.pump_fail_since),
            "pump_failed": sorted(self.pump_failed),
            "dc_failed": self.dc_failed,
            "dc_why": self.dc_why,
            "dc_not_cooling_since": self.dc_not_cooling_since,
            "dc_remembered": self.dc_remembered,
            "blocked_total": self.blocked_total,
            "was_hunting": self.was_hunting,
            "write_failed": sorted(self.write_failed),
            "degraded": [d if isinstance(d, str) else str(d) for d in self.degraded],
            "tank_full": self.tank_full,
            "valve_off_since": self.valve_off_since,
            "valve_fault": self.valve_fault,
            "valve_fault_at": self.valve_fault_at,
            "plc_tripped_since": self.plc_tripped_since,
            "plc_hold": self.plc_hold,
        }

    @classmethod
    def from_snapshot(cls, cfg: SupervisorConfig, snap: object) -> Supervisor:
        """A supervisor that continues exactly where the one that took `snap` was.

        Raises ValueError naming the first key that is missing or of the wrong kind.
        """
        r = _Reader("supervisor snapshot")
        top = r.section(snap, "")
        if top.get("version") != SNAPSHOT_VERSION:
            raise ValueError(
                f"supervisor snapshot: version is {_short(top.get('version'))}, "
                f"expected {SNAPSHOT_VERSION}"
            )
        m = r.section(r.key(top, "mode"), "mode")
        mode_name = r.text(m, "mode", "mode")
        if mode_name not in Mode.__members__:
            raise ValueError(
                f"supervisor snapshot: mode.mode is {_short(mode_name)}, expected one of "
                f"{', '.join(Mode.__members__)}"
            )
        sup = cls(cfg, r.num(m, "since_s", "mode"))
        mm = sup.machine
        mm.state = Mode[mode_name].value
        mm.now_s = r.num(m, "now_s", "mode")
        mm.reject_clear_since = r.opt_num(m, "reject_clear_since", "mode")
        mm.ready_since = r.opt_num(m, "ready_since", "mode")
        mm.left_reuse_s = r.num(m, "left_reuse_s", "mode")
        mm.changes = deque(r.nums(m, "changes", "mode"))
        mm.hunting = r.flag(m, "hunting", "mode")

        i = r.section(r.key(top, "interlocks"), "interlocks")
        sup.il = InterlockState(
            held_s=r.num_map(i, "held_s", "interlocks"),
            active=frozenset(r.texts(i, "active", "interlocks")),
            latched=frozenset(r.texts(i, "latched", "interlocks")),
            bypassed=frozenset(r.texts(i, "bypassed", "interlocks")),
            last_now_s=r.opt_num(i, "last_now_s", "interlocks"),
            refused=frozenset(r.texts(i, "refused", "interlocks")),
        )

        v = r.section(r.key(top, "validation"), "validation")
        last_raw = r.section(r.key(v, "last", "validation"), "validation.last")
        last: dict[str, tuple[float, float, float]] = {}
        for tag, entry in last_raw.items():
            if not (isinstance(entry, list) and len(entry) == 3 and all(map(_is_num, entry))):
                raise ValueError(
                    f"supervisor snapshot: validation.last.{tag} is {_short(entry)}, "
                    "expected [value, changed_at_s, seen_at_s]"
                )
            last[tag] = (entry[0], entry[1], entry[2])
        sup.memory = Memory(
            last,
            r.num_map(v, "rate_faulted", "validation"),
            r.num_map(v, "implausible", "validation"),
            r.num(v, "loaded_s", "validation"),
            r.opt_num(v, "last_now_s", "validation"),
        )

        pi = r.section(r.key(top, "fan_pi"), "fan_pi")
        sup.fan_pi = replace(
            sup.fan_pi,
            integral=r.num(pi, "integral", "fan_pi"),
            last_s=r.opt_num(pi, "last_s", "fan_pi"),
        )
        sup.fan_pi_out = r.num(top, "fan_pi_out")
        outputs: dict[str, Output] = {}
        for tag, entry in r.section(r.key(top, "last"), "last").items():
            ok = (
                isinstance(entry, list)
                and len(entry) == 3
                and (isinstance(entry[0], bool) or _is_num(entry[0]))
                and entry[1] in Level.__members__
                and isinstance(entry[2], str)
            )
            if not ok:
                raise ValueError(
                    f"supervisor snapshot: last.{tag} is {_short(entry)}, "
                    "expected [value, level name, why]"
                )
            outputs[tag] = Output(entry[0], Level[entry[1]], entry[2])
        sup.last = outputs
        sup.invalid = r.text_map(top, "invalid")
        sup.blocked_names = frozenset(r.texts(top, "blocked_names"))
        refused = r.key(top, "refused")
        if not isinstance(refused, list) or not all(
            isinstance(x, list) and len(x) == 3 and all(isinstance(y, str) for y in x)
            for x in refused
        ):
            raise ValueError(
                f"supervisor snapshot: refused is {_short(refused)}, "
                "expected a list of [tag, value shown, why]"
            )
        sup.refused = frozenset((x[0], x[1], x[2]) for x in refused)
        sup.pump_fail_since = r.num_map(top, "pump_fail_since")
        sup.pump_failed = set(r.texts(top, "pump_failed"))
        sup.dc_failed = r.flag(top, "dc_failed")
        sup.dc_why = r.text(top, "dc_why")
        sup.dc_not_cooling_since = r.opt_num(top, "dc_not_cooling_since")
        sup.dc_remembered = r.flag(top, "dc_remembered")
        blocked_total = r.key(top, "blocked_total")
        if not isinstance(blocked_total, int) or isinstance(blocked_total, bool):
            raise ValueError(
                f"supervisor snapshot: blocked_total is {_short(blocked_total)}, "
                "expected an integer"
            )
        sup.blocked_total = blocked_total
        sup.was_hunting = r.flag(top, "was_hunting")
        sup.write_failed = frozenset(r.texts(top, "write_failed"))
        sup.degraded = tuple(r.texts(top, "degraded"))
        sup.tank_full = r.flag(top, "tank_full")
        sup.valve_off_since = r.opt_num(top, "valve_off_since")
        sup.valve_fault = r.flag(top, "valve_fault")
        sup.valve_fault_at = r.num(top, "valve_fault_at")
        sup.plc_tripped_since = r.opt_num(top, "plc_tripped_since")
        sup.plc_hold = r.flag(top, "plc_hold")
        return sup

    def restart_memory(self, now_s: float) -> dict[str, object]:
        """What outlives a restart (JSON-able): latched rules, failed pumps, the valve fault
        with its ages in seconds as of `now_s`, the failed dry cooler. The mode does not: a
        restart begins at STARTUP (DESIGN §5)."""
        at, off = self.valve_fault_at, self.valve_off_since
        return {
            "latched": sorted(self.il.latched),
            "pumps_failed": sorted(self.pump_failed),
            "valve_fault": self.valve_fault,
            "valve_fault_age_s": max(0.0, now_s - at) if math.isfinite(at) else None,
            "valve_off_s": None if off is None else max(0.0, now_s - off),
            "drycooler_failed": self.dc_failed,
            "drycooler_why": self.dc_why,
        }

    def _remember(self, memory: object, now_s: float, latched: frozenset[str]) -> None:
        """Apply a `restart_memory()` (a missing key: nothing remembered of it)."""
        r = _Reader("supervisor memory")
        mem = r.section(memory, "")
        get = mem.get
        rules = frozenset(r.texts(mem, "latched")) if get("latched") is not None else NONE
        unknown = sorted(rules - RULE_IDS)
        if unknown:
            raise ValueError(
                f"supervisor memory: latched holds {_short(unknown)}, expected rule ids "
                f"({', '.join(sorted(RULE_IDS))})"
            )
        rules |= latched
        self.il = InterlockState(latched=rules, active=rules)
        pumps = set(r.texts(mem, "pumps_failed")) if get("pumps_failed") is not None else set()
        if not pumps <= FEEDBACK_CMD.keys():
            raise ValueError(
                f"supervisor memory: pumps_failed holds {_short(sorted(pumps))}, expected pump "
                f"feedback tags ({', '.join(FEEDBACK_CMD)})"
            )
        self.pump_failed = pumps
        if get("valve_fault") is not None:
            self.valve_fault = r.flag(mem, "valve_fault")
        fault_age, off = (self._age(r, mem, k) for k in ("valve_fault_age_s", "valve_off_s"))
        if fault_age is not None:
            self.valve_fault_at = now_s - fault_age  # the retry clock runs on, not anew
        if off is not None:
            self.valve_off_since = now_s - off
        if get("drycooler_failed") is not None and r.flag(mem, "drycooler_failed"):
            self.dc_failed = True
            why = r.text(mem, "drycooler_why") if get("drycooler_why") is not None else ""
            self.dc_why = why or "judged failed before the restart"
            # judged already: it stays failed until a scan can judge it again, and then only
            # a cooling outlet clears it
            self.dc_remembered = True
            self.dc_not_cooling_since = now_s - DC_FOLLOW_S

    @staticmethod
    def _age(r: _Reader, mem: Mapping[str, object], key: str) -> float | None:
        """An age in seconds from restart memory: absent or null, or a finite number >= 0."""
        age = r.opt_num(mem, key) if key in mem else None
        if age is not None and not 0.0 <= age < math.inf:
            raise ValueError(f"supervisor memory: {key} is {_short(age)}, expected seconds >= 0")
        return age

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
        covers = reset_covers(cmds.reset)  # None: every rule; else the rules named (maybe none)
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
        events += self._watch_pumps(points, now_s, covers is None or bool(covers))
        events += self._watch_drycooler(points, now_s)
        events += self._watch_plc_hold(points, now_s)
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
            # LEAK_TRIP is left on a reset of every rule or of a leak rule (the machine also
            # asks that no leak latch remains and every leak input reads dry)
            reset=covers is None or not covers.isdisjoint(LEAK_RULES),
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
        bms_ok: dict[str, Value] = {}
        for name, v in cmds.bms.items():
            target = BMS_REQUESTS.get(name) if isinstance(name, str) else None
            if target is None:
                refusals.append(
                    Refusal(str(name), v, f"expected one of {', '.join(sorted(BMS_REQUESTS))}")
                )
                continue
            output, lo, hi = target
            why = check_setpoint(v, lo, hi, name)
            if why:
                refusals.append(Refusal(name, v, f"expected {why}"))
            else:
                bms_ok[output] = float(v)
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
        hx_first = (
            self.dc_failed
            and tank_is_sink(points, 0.0)
            and reuse_circuit_safe(points, cfg.thresholds)
        )
        seq = mode_outputs(
            self.machine.mode,
            values,
            fan_pct,
            cfg.sequence,
            self.tank_full,
            hx_first=hx_first,
            customer_ok=cond.customer_ready and customer_sink(points, cfg.thresholds),
        )
        if "primary_pump_a_running" in self.pump_failed:
            seq["primary_pump_b_cmd"] = True  # duty to the standby
        if bms_ok:
            # the BMS level wins only where the sequence's value is a default (DESIGN §4)
            room = bms_room(self.machine.mode, seq, hx_first)
            bms = {o: v for o, v in bms_ok.items() if o in room}
            for o in bms:
                del seq[o]
        else:
            bms = {}

        forced = {k: (f.value, ",".join(f.by)) for k, f in verdict.forced.items()}
        outputs = arbitrate(cfg.safe, now_s, interlock=forced, manual=manual, sequence=seq, bms=bms)
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
            faults=self._faults(now_s),
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
        if self.plc_hold:
            r.append(f"{PLC_HOLD} for more than {self.cfg.plc_hold_s:g} s")
        r += [str(d) for d in cmds.degraded]
        if self._valve_held(now_s):
            r.append("reuse valve not following its command")
        if "secondary_pump_running" in self.pump_failed:
            r.append("secondary pump failed")
        if self.pump_failed >= PRIMARY_FEEDBACK:
            r.append("both primary pumps failed")
        return tuple(r)

    def _valve_held(self, now_s: float) -> bool:
        """The valve does not follow, or did within the retry interval: no reuse."""
        return self.valve_fault or now_s - self.valve_fault_at < self.cfg.valve_retry_s

    def _faults(self, now_s: float) -> dict[str, str]:
        """The fault memory as it stands, one stable line each (the alarms show them)."""
        valve = self._valve_held(now_s)
        if not (
            valve or self.pump_failed or self.dc_failed or self.machine.hunting or self.plc_hold
        ):
            return {}
        cfg = self.cfg
        faults: dict[str, str] = {}
        if self.valve_fault:
            faults["valve"] = (
                f"reuse valve more than {cfg.valve_tolerance_pct:g} % from its command "
                f"for {cfg.valve_follow_s:g} s"
            )
        elif valve:
            faults["valve"] = (
                f"reuse valve did not follow its command; reuse is retried "
                f"{cfg.valve_retry_s:g} s after the fault"
            )
        for fb in sorted(self.pump_failed):
            faults[f"pump:{fb}"] = (
                f"{FEEDBACK_CMD.get(fb, fb)} commanded on but {fb} read stopped for "
                f"{cfg.pump_fail_s:g} s"
            )
        if self.pump_failed >= PRIMARY_FEEDBACK:
            faults["primary_pumps"] = "both primary pumps failed"
        if self.dc_failed:
            faults["drycooler"] = f"dry cooler is no heat sink: {self.dc_why}"
        if self.machine.hunting:
            faults["hunting"] = (
                f"more than {cfg.timing.hunting_changes_per_h} mode changes in an hour"
            )
        if self.plc_hold:
            faults["plc_safe_hold"] = (
                f"{PLC_HOLD} for more than {cfg.plc_hold_s:g} s: the heartbeat or the "
                "commands are not reaching it"
            )
        return faults

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

    def _watch_plc_hold(self, points: Mapping[str, Point], now_s: float) -> list[Event]:
        """Does the PLC hold its safe values? One event when the hold starts, one when it ends.

        `plc_watchdog_tripped` read true for longer than `plc_hold_s` is a hold: past the
        hold-off, a live controller's heartbeat and commands would have released it. An
        unreadable input is no verdict: it neither starts a hold nor ends one that stands
        (reuse stays rejected: toward cooling), and a count not yet a hold starts over, since
        the PLC may have released and tripped again unseen.
        """
        p = points.get("plc_watchdog_tripped")
        if p is None or not p.valid:
            if not self.plc_hold:
                self.plc_tripped_since = None
            return []
        tripped_s = 0.0
        if p.value is True:
            if self.plc_tripped_since is None:
                self.plc_tripped_since = now_s
            tripped_s = now_s - self.plc_tripped_since
        else:
            self.plc_tripped_since = None
        hold = tripped_s > self.cfg.plc_hold_s
        if hold == self.plc_hold:
            return []
        self.plc_hold = hold
        if hold:
            return [Event("plc_safe_hold", now_s, "plc", {"tripped_s": tripped_s})]
        return [Event("plc_safe_hold_cleared", now_s, "plc")]

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
        judged = not_cooling = False
        if fan is not None and float(fan.value) >= DC_FANS_HIGH_PCT:
            ret, out, amb = (
                points[n].num() if n in points else math.nan
                for n in ("it_return_temp", "drycooler_out_temp", "ambient_temp")
            )
            drive = ret - amb  # NaN when any is unknown: no verdict from the temperatures
            judged = drive >= DC_DRIVE_K and out == out
            not_cooling = judged and out - amb > DC_APPROACH_FRAC * drive
        if self.dc_remembered:
            # failed before a restart: that stands (the HX stays first sink) until the fans
            # run high with a real driving difference and the outlet can be judged again
            if not judged:
                return []
            self.dc_remembered = False
        if not not_cooling:
            self.dc_not_cooling_since = None
        elif self.dc_not_cooling_since is None:
            self.dc_not_cooling_since = now_s
        since = self.dc_not_cooling_since
        failed = by_input or (since is not None and now_s - since >= DC_FOLLOW_S)
        if failed:
            self.dc_why = "drycooler_fault input" if by_input else "outlet not following the fans"
        if failed == self.dc_failed:
            return []
        self.dc_failed = failed
        if failed:
            return [Event("drycooler_failed", now_s, "drycooler", {"why": self.dc_why})]
        self.dc_why = ""
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


def _short(v: object) -> str:
    """A value as bounded text for an error line."""
    return shown(v, 60)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Reader:
    """Typed reads from a parsed snapshot; every failure is one ValueError naming the key."""

    def __init__(self, what: str) -> None:
        self.what = what

    def _fail(self, where: str, key: str, v: object, expected: str) -> ValueError:
        name = f"{where}.{key}" if where else key
        return ValueError(f"{self.what}: {name} is {_short(v)}, expected {expected}")

    def section(self, v: object, where: str) -> Mapping[str, object]:
        if not isinstance(v, Mapping):
            what = f"{self.what}: {where}" if where else self.what
            raise ValueError(f"{what} is {_short(v)}, expected an object")
        return v

    def key(self, d: Mapping[str, object], key: str, where: str = "") -> object:
        if key not in d:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"{self.what}: {name} is missing")
        return d[key]

    def num(self, d: Mapping[str, object], key: str, where: str = "") -> float:
        v = self.key(d, key, where)
        if not _is_num(v):
            raise self._fail(where, key, v, "a number")
        return v  # type: ignore[return-value]

    def opt_num(self, d: Mapping[str, object], key: str, where: str = "") -> float | None:
        v = self.key(d, key, where)
        if v is not None and not _is_num(v):
            raise self._fail(where, key, v, "a number or null")
        return v  # type: ignore[return-value]

    def nums(self, d: Mapping[str, object], key: str, where: str = "") -> list[float]:
        v = self.key(d, key, where)
        if not isinstance(v, list) or not all(map(_is_num, v)):
            raise self._fail(where, key, v, "a list of numbers")
        return v

    def flag(self, d: Mapping[str, object], key: str, where: str = "") -> bool:
        v = self.key(d, key, where)
        if not isinstance(v, bool):
            raise self._fail(where, key, v, "true or false")
        return v

    def text(self, d: Mapping[str, object], key: str, where: str = "") -> str:
        v = self.key(d, key, where)
        if not isinstance(v, str):
            raise self._fail(where, key, v, "a string")
        return v

    def texts(self, d: Mapping[str, object], key: str, where: str = "") -> list[str]:
        v = self.key(d, key, where)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._fail(where, key, v, "a list of strings")
        return v

    def num_map(self, d: Mapping[str, object], key: str, where: str = "") -> dict[str, float]:
        v = self.key(d, key, where)
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str) and _is_num(x) for k, x in v.items()
        ):
            raise self._fail(where, key, v, "an object of numbers")
        return dict(v)

    def text_map(self, d: Mapping[str, object], key: str, where: str = "") -> dict[str, str]:
        v = self.key(d, key, where)
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        ):
            raise self._fail(where, key, v, "an object of strings")
        return dict(v)
