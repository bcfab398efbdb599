"""The decision core as one step: people's requests, the supervisor and the alarms.

`Core.step` takes everything a scan knows (the process image, the monotonic and wall times, the
link state, what the PLC did not acknowledge, runtime faults and the operator requests that
arrived) and returns everything it decided. It is pure: no clock, no I/O. The runtime calls it
every scan; `heatloop replay` calls it on the flight recorder's inputs and checks that every
decision digests to the same value as when it was taken.

Order inside a step: standing forces and bypasses whose time is up end; the requests are
authorised and applied in arrival order (`controller.authority`); the supervisor steps on the
image with the engineer's input forces applied; a reset is answered from the interlock engine's
own verdict; then the alarm table follows the abnormal conditions of this scan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from controller.alarms import PROOF_PREFIX, WATCHDOG_STEP, AlarmTable, Priority, catalogue
from controller.arbitration import Level
from controller.authority import (
    Answer,
    Cmd,
    Effects,
    Limits,
    OperatorState,
    Request,
    apply,
    expire,
    forced_image,
    permitted,
    prune,
    to_commands,
)
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from interlocks.engine import Event
from interlocks.rules import RULES
from plc_io.image import ProcessImage
from plc_io.site import CommissioningConfig, Site

SNAPSHOT_VERSION = 1
RULE_BY_ID = {r.id: r for r in RULES}
# supervisor fault keys -> alarm ids
_FAULT_ALARMS = {
    "valve": "VALVE-FAULT",
    "primary_pumps": "PRIMARY-PUMPS",
    "drycooler": "DRYCOOLER-FAULT",
    "hunting": "HUNTING",
    "plc_safe_hold": "PLC-SAFE-HOLD",
}


@dataclass(frozen=True)
class ScanInput:
    """Everything one scan knows before it decides (what the flight recorder keeps)."""

    image: ProcessImage
    now_s: float  # monotonic: the supervisor's clock
    wall_s: float  # wall clock: expiries and alarm times, which outlive a restart
    link_ok: bool
    write_failed: frozenset[str] = frozenset()
    degraded: tuple[str, ...] = ()
    requests: tuple[Request, ...] = ()


@dataclass(frozen=True)
class ScanResult:
    decision: Decision
    alarms: AlarmTable
    operator: OperatorState
    commands: Commands
    answers: tuple[Answer, ...]
    events: tuple[Event, ...]  # the decision's, then expiries, commands and alarms


def _id_texts(snap: Mapping[str, Any], key: str) -> dict[str, str]:
    got = snap.get(key, {})
    if not isinstance(got, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in got.items()
    ):
        raise ValueError(f"snapshot {key}: {str(got)[:60]!r}: expected id -> text")
    return dict(got)


def _refused(req: Request, why: str, kind: str = "state") -> Answer:
    return Answer(req.id, False, why, kind=kind)


class Core:
    """The supervisor, the operator state and the alarm table, stepped together."""

    def __init__(
        self,
        site: Site,
        now_s: float = 0.0,
        wall_s: float = 0.0,
        restored: Mapping[str, Any] | None = None,
        *,
        cfg: SupervisorConfig | None = None,
    ) -> None:
        """`restored` is `durable()` as persisted before a restart: latches, fault memory,
        forces, bypasses, requests, setpoints and alarm states come back; the mode starts at
        STARTUP (DESIGN §5). Raises ValueError naming the part that cannot be restored."""
        self.site = site
        self.cfg = cfg if cfg is not None else SupervisorConfig.from_site(site)
        self.limits = Limits.from_site(site)
        self.defs = catalogue(RULES, site.inputs, site.outputs)
        r = restored or {}
        memory = r.get("supervisor")
        latched = frozenset(memory.get("latched", ())) if isinstance(memory, Mapping) else None
        self.supervisor = Supervisor(self.cfg, now_s, latched or frozenset(), memory=memory)
        op = OperatorState.restore(r["operator"]) if "operator" in r else OperatorState()
        # a site file changed between runs: end what it no longer allows (journalled at the
        # first step), toward the safe side
        self.operator, self._pruned = prune(op, self.limits)
        self.alarms = (
            AlarmTable.restore(self.defs, r["alarms"])
            if "alarms" in r
            else AlarmTable.new(self.defs)
        )
        self.last: Decision | None = None
        # proof tests overdue now: step id -> the alarm's detail (the runtime sets it from the
        # journal's records and the wall clock, every few seconds; a snapshot carries it)
        self.proof_overdue: Mapping[str, str] = {}
        # metering plausibility conditions now: alarm id -> detail (the runtime sets them from
        # controller.metering after each scan; a snapshot carries them)
        self.meter_conditions: Mapping[str, str] = {}

    # ---- snapshots: replay starts from one; a restart from `durable` ----

    def snapshot(self) -> dict[str, Any]:
        """Everything the next step depends on, JSON-able (floats exact, NaN allowed)."""
        snap = {
            "version": SNAPSHOT_VERSION,
            "supervisor": self.supervisor.snapshot(),
            "operator": self.operator.snapshot(),
            "alarms": self.alarms.snapshot(),
        }
        if self.proof_overdue:  # absent when none: older snapshots read the same
            snap["proof_overdue"] = dict(self.proof_overdue)
        if self.meter_conditions:
            snap["meter_conditions"] = dict(self.meter_conditions)
        return snap

    @classmethod
    def from_snapshot(cls, site: Site, snap: Mapping[str, Any]) -> Core:
        if not isinstance(snap, Mapping) or snap.get("version") != SNAPSHOT_VERSION:
            got = snap.get("version") if isinstance(snap, Mapping) else type(snap).__name__
            raise ValueError(f"snapshot version: expected {SNAPSHOT_VERSION}, got {got!r}")
        core = cls(site)
        core.supervisor = Supervisor.from_snapshot(core.cfg, snap["supervisor"])
        core.operator, core._pruned = OperatorState.restore(snap["operator"]), []
        core.alarms = AlarmTable.restore(core.defs, snap["alarms"])
        core.proof_overdue = _id_texts(snap, "proof_overdue")
        core.meter_conditions = _id_texts(snap, "meter_conditions")
        return core

    def durable(self, now_s: float, wall_s: float) -> dict[str, Any]:
        """What survives a restart (the state store keeps it, key by key)."""
        d = self.last
        mode = (
            {"mode": d.mode.value, "since_wall": wall_s - (now_s - d.mode_since_s)}
            if d is not None
            else None
        )
        operator = self.operator.snapshot()
        # a heartbeat hold never outlives the process: a restarted controller beats at once
        # (a test tool that died with the old one must not leave the PLC unsupervised)
        operator.pop("heartbeat_hold", None)
        return {
            "supervisor": self.supervisor.restart_memory(now_s),
            "operator": operator,
            "alarms": self.alarms.snapshot(),
            "mode": mode,
        }

    @property
    def latched(self) -> frozenset[str]:
        return self.supervisor.latched

    # ---- the step ----

    def step(self, inp: ScanInput) -> ScanResult:
        now, wall = inp.now_s, inp.wall_s
        events: list[Event] = []
        for kind, key, held, why in self._pruned:
            events.append(Event(f"{kind}_ended", now, key, {"who": held.who, "why": why}))
        self._pruned = []
        op, ended = expire(self.operator, wall)
        for kind, key, held in ended:
            events.append(
                Event(f"{kind}_expired", now, key, {"who": held.who, "reason": held.reason})
            )
        alarms = self.alarms
        answers: list[Answer] = []
        resets: list[tuple[int, Request, frozenset[str]]] = []  # answered after the step
        for req in inp.requests:
            undone = self._hold_would_undo(req)
            if undone:
                answers.append(_refused(req, undone))
                continue
            op, ans, eff = apply(op, req, self.limits, wall, link_ok=inp.link_ok)
            if ans.accepted:
                alarms, ans = self._alarm_effects(alarms, req, ans, eff, wall, events)
                if eff.reset is not None:
                    resets.append((len(answers), req, eff.reset))
            answers.append(ans)
        latched_before = self.supervisor.latched
        reset: bool | frozenset[str] = False
        if resets:
            if any(not rules for _, _, rules in resets):
                reset = True
            else:
                reset = frozenset().union(*(rules for _, _, rules in resets))
        cmds = Commands(
            **to_commands(op, now, wall),
            reset=reset,
            link_ok=inp.link_ok,
            write_failed=inp.write_failed,
            degraded=inp.degraded,
        )
        image = forced_image(inp.image, op, now, wall) if op.input_forces else inp.image
        decision = self.supervisor.step(image, now, cmds)
        for i, req, rules in resets:
            answers[i] = _reset_answer(req, rules, latched_before, decision)
        held = op.heartbeat_hold
        if held is not None:
            undone = self._off_safe(decision)
            if undone:  # such an interlock started during the test: the PLC must not undo it
                op = replace(op, heartbeat_hold=None)
                why = "an interlock holds " + "; ".join(undone)[:300]
                events.append(
                    Event("heartbeat_hold_ended", now, "heartbeat", {"who": held.who, "why": why})
                )
        present = conditions(decision, inp, op, {**self.proof_overdue, **self.meter_conditions})
        alarms, alarm_events = alarms.update(present, wall)
        self.operator, self.alarms, self.last = op, alarms, decision
        return ScanResult(
            decision=decision,
            alarms=alarms,
            operator=op,
            commands=cmds,
            answers=tuple(answers),
            events=(*decision.events, *events, *alarm_events),
        )

    def _hold_would_undo(self, req: Request) -> str:
        """Why a heartbeat hold may not start now ("" if it may): an interlock holds an output
        at a value other than its safe value (IL-09's fans at minimum against a freeze, IL-01's
        reuse circuit opened as a heat sink), and the PLC's watchdog would replace it with the
        safe value. The safe values isolate the reuse circuit as the leak and overpressure trips
        do, so a hold during those is allowed: the PLC's fallback and the interlock agree."""
        if req.cmd != Cmd.WATCHDOG_TEST or not permitted(req.role, req.cmd):
            return ""
        args = req.args if isinstance(req.args, Mapping) else {}
        seconds = args.get("seconds")
        ending = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if (ending and seconds == 0) or self.last is None:
            return ""  # ending a hold is always allowed; the argument checks come in `apply`
        undone = self._off_safe(self.last)
        if not undone:
            return ""
        return (
            "watchdog_test: an interlock holds "
            + "; ".join(undone)[:300]
            + ", which the PLC's safe values would undo during the test; test once it has cleared"
        )

    def _off_safe(self, d: Decision) -> list[str]:
        """The outputs an interlock holds away from their safe values, as `name = value (why)`."""
        safe = self.cfg.safe
        return sorted(
            f"{k} = {o.value!r} ({o.why})"
            for k, o in d.outputs.items()
            if o.level is Level.INTERLOCK and k in safe and o.value != safe[k]
        )

    def _alarm_effects(
        self,
        alarms: AlarmTable,
        req: Request,
        ans: Answer,
        eff: Effects,
        wall: float,
        events: list[Event],
    ) -> tuple[AlarmTable, Answer]:
        """Acknowledge or shelve as an accepted request asks; refuse an unknown alarm."""
        if eff.ack is not None or eff.ack_all:
            ids = None if eff.ack_all else list(eff.ack or ())
            unknown = [] if ids is None else [i for i in ids if i not in alarms.defs]
            if unknown:
                shown = ", ".join(repr(u)[:60] for u in unknown[:5])
                return alarms, _refused(req, f"alarms: unknown alarm id {shown}", "invalid")
            alarms, acked, _, ev = alarms.acknowledge(ids, req.principal, wall)
            events += ev
            return alarms, replace(ans, new=acked)
        if eff.shelve is not None:
            alarm_id, until = eff.shelve
            d = alarms.defs.get(alarm_id)
            if d is not None and d.priority is Priority.CRITICAL:
                # the servers' and the water's alarms are never hidden (ISA-18.2: highly managed)
                return alarms, _refused(req, f"alarm {alarm_id!r}: critical, cannot be shelved")
            alarms, why, ev = alarms.shelve(alarm_id, until, req.principal, req.reason, wall)
            if why:
                return alarms, _refused(req, f"alarm {alarm_id!r}: {why}")
            events += ev
        if eff.unshelve is not None:
            alarms, why, ev = alarms.unshelve(eff.unshelve, req.principal, wall)
            if why:
                return alarms, _refused(req, f"alarm {eff.unshelve!r}: {why}")
            events += ev
        return alarms, ans


def _reset_answer(
    req: Request, rules: frozenset[str], latched_before: frozenset[str], d: Decision
) -> Answer:
    """The interlock engine's verdict on a reset, as the answer to the person who asked."""
    wanted = rules or latched_before
    if not latched_before:
        return _refused(req, "nothing is latched")
    not_latched = sorted(wanted - latched_before)
    if not_latched:
        return _refused(req, f"{', '.join(not_latched)} not latched")
    refused = {
        e.source: str(e.detail.get("why", "")) for e in d.events if e.kind == "reset_refused"
    }
    mine = {rid: why for rid, why in refused.items() if rid in wanted}
    done = sorted(wanted - d.latched)
    if mine:
        why = "; ".join(f"{rid} refused: {w}" for rid, w in sorted(mine.items()))
        if done:
            why += f" ({', '.join(done)} reset)"
        return Answer(req.id, False, why, sorted(latched_before), sorted(d.latched), "state")
    return Answer(req.id, True, "", sorted(latched_before), sorted(d.latched))


def conditions(
    d: Decision,
    inp: ScanInput,
    op: OperatorState,
    later: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every abnormal condition of this scan, as alarm id -> detail. `later` holds what the
    runtime found between scans: overdue proof-test steps by step id, and metering alarms by
    their whole id (METER:...)."""
    present: dict[str, str] = {}
    for rid in d.active:
        rule = RULE_BY_ID.get(rid)
        text = rule.hazard if rule is not None else rid
        if rid in d.latched:
            text += " (latched)"
        if rid in d.bypassed:
            text += " (bypassed)"
        present[rid] = text
    if not inp.link_ok:
        present["PLC-LINK"] = "PLC link lost"
    else:
        # with the link down every input is invalid for the same reason: one alarm, not thirty
        for tag, why in d.invalid.items():
            present[f"INPUT:{tag}"] = why
    if inp.write_failed:
        present["WRITE-FAILED"] = ", ".join(sorted(inp.write_failed))
    for key, why in d.faults.items():
        if key.startswith("pump:"):
            present[f"PUMP:{key[5:]}"] = why
        elif key in _FAULT_ALARMS:
            present[_FAULT_ALARMS[key]] = why
    if d.blocked:
        present["CMD-BLOCKED"] = "; ".join(d.blocked)
    for fault in inp.degraded:
        present["JOURNAL" if fault.startswith("journal") else "DEGRADED"] = fault
    for rid, held in op.bypasses.items():
        present[f"BYPASS:{rid}"] = f"by {held.who}: {held.reason}"
    for tag, held in (*op.forces.items(), *op.input_forces.items()):
        present[f"FORCE:{tag}"] = f"{held.value!r} by {held.who}: {held.reason}"
    if op.maintenance:
        present["MAINTENANCE"] = "maintenance on"
    for key, why in (later or {}).items():  # proof-test step ids, and whole metering ids
        present[key if key.startswith("METER:") else f"{PROOF_PREFIX}{key}"] = why
    return present


# ---- the proof-test schedule (pure: the wall time is an argument) ----

DAY_S = 86400.0
PROOF_STEPS: tuple[str, ...] = (*(r.id for r in RULES), WATCHDOG_STEP)


@dataclass(frozen=True)
class ProofTest:
    """One step's proof-test state, as `status` shows it."""

    interval_days: int
    last_passed_wall: float | None
    due_wall: float
    overdue: bool
    detail: str  # the alarm's detail while overdue

    def to_json(self) -> dict[str, object]:
        return {
            "interval_days": self.interval_days,
            "last_passed_wall": self.last_passed_wall,
            "due_wall": self.due_wall,
            "overdue": self.overdue,
        }


def _day(wall: float) -> str:
    try:
        return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d")
    except (ValueError, OverflowError, OSError):
        return "?"


def proof_schedule(
    cfg: CommissioningConfig,
    last_passed: Mapping[str, float],
    created_wall: float,
    now_wall: float,
) -> dict[str, ProofTest]:
    """Each step's schedule: due `interval` days after its last live pass (`last_passed`, step
    id -> filed wall time), or `first_test_days` after the state store was created when it never
    passed live. Overdue from the due time on. A time that is not a number (NaN) is never
    overdue here: the schedule is a reminder, not a protection."""
    out: dict[str, ProofTest] = {}
    for step in PROOF_STEPS:
        days = cfg.interval_days(step)
        last = last_passed.get(step)
        if last is not None:
            due = last + days * DAY_S
            detail = f"last passed live {_day(last)}; interval {days} d, due {_day(due)}"
        else:
            due = created_wall + cfg.first_test_days * DAY_S
            detail = (
                f"never passed live; first test due {_day(due)} ({cfg.first_test_days} d "
                f"after the state store was created); interval {days} d"
            )
        out[step] = ProofTest(days, last, due, now_wall >= due, detail)
    return out


def _canon(x: object) -> object:
    """A canonical, order-independent form for hashing (sets and dicts sorted)."""
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), _canon(v)) for k, v in x.items()))
    if isinstance(x, frozenset | set):
        return tuple(sorted(str(v) for v in x))
    if isinstance(x, list | tuple):
        return tuple(_canon(v) for v in x)
    return x


def digest(result: ScanResult) -> str:
    """32 hex characters that change with anything the scan decided or told."""
    d = result.decision
    body = (
        d.mode.value,
        d.mode_since_s,
        tuple((k, o.value, int(o.level), o.why) for k, o in sorted(d.outputs.items())),
        _canon(d.active),
        _canon(d.latched),
        _canon(d.bypassed),
        tuple((e.kind, e.at_s, e.source, _canon(e.detail)) for e in result.events),
        d.blocked,
        d.reject_reasons,
        _canon(d.invalid),
        _canon(d.faults),
        tuple((a.id, a.accepted, a.why) for a in result.answers),
    )
    return hashlib.blake2b(repr(body).encode(), digest_size=16).hexdigest()
