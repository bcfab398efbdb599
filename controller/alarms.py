"""Alarms per ISA-18.2: one catalogue of abnormal conditions and a pure alarm state table.

Theory of operation. Every abnormal condition the controller can see has one alarm with an id,
a priority and a message (`catalogue`, built from the interlock table and the site's tags). Each
scan the caller passes the conditions that hold (`present`: alarm id -> one line of detail) and
the wall-clock time; `AlarmTable.update` moves every alarm through the ISA-18.2 states and
returns the events to journal. The table is a frozen value: nothing here reads a clock, logs or
does I/O, so a restart restores it from `snapshot()` and a replay reproduces it exactly.

States (ISA-18.2 names) and transitions, per alarm:

    NORMAL    --condition present-->   UNACK      (active, unacknowledged)  `alarm_raised`
    UNACK     --acknowledged------->   ACKED      (active, acknowledged)    `alarm_acknowledged`
    ACKED     --condition gone----->   NORMAL                               `alarm_cleared`
    UNACK     --condition gone----->   RTN_UNACK  (returned, unacknowledged) `alarm_returned`
    RTN_UNACK --acknowledged------->   NORMAL                               `alarm_acknowledged`
    RTN_UNACK --condition present-->   UNACK      (a new activation)        `alarm_raised`

Acknowledging a NORMAL or ACKED alarm changes nothing and is not an error.

Shelving (the engineer's role is checked by `controller.authority`): a shelved alarm keeps its
state machine but raises no `alarm_raised`, `alarm_returned` or `alarm_chattering` events (it is
suppressed, not removed: it is still listed, with `shelved_until`). At `shelved_until` it
unshelves itself (`alarm_unshelved`, why "expired"); if its condition then holds unacknowledged
it is annunciated at that moment (one `alarm_raised`). A wall clock set back to before the
shelving was granted also ends it: how long it stood can no longer be told, and the safe error
is to annunciate early, never late.

First-out: when interlock alarms (group "interlock", the rule ids) become active while no other
interlock alarm is active (all NORMAL or returned), the first of them to activate is marked
`first_out`: the cause of the trip sequence, not its consequences. The resolution is one scan:
when several activate in the same update, the first in the rule table's order (the catalogue's
order) is the first out. A new first-out supersedes an older mark; the mark is cleared when the
alarm returns to NORMAL.

Chattering: an alarm that activates more than CHATTER_MAX times within CHATTER_WINDOW_S is
chattering. Its further activations raise no `alarm_raised`/`alarm_returned` events; they count
in `chatter_count`, and one `alarm_chattering` event says it started. The first activation after
a whole window with none ends the chattering: its `alarm_raised` reports the count, which is
reset. A time that steps backwards is outside every window, so a clock set back never prolongs
the suppression.

Cost: the plant is steady most of the time, so `update` first compares `present` with the
active set and the shelving deadlines and returns the same table, allocating nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum, StrEnum
from typing import Any, TypeGuard

from interlocks.engine import Event
from interlocks.rules import Rule
from plc_io.tags import Tag

CHATTER_MAX = 3  # activations allowed within the window before an alarm is chattering
CHATTER_WINDOW_S = 60.0
MAX_TEXT = 500  # details, names and reasons are bounded: a runaway string never grows the state
SNAPSHOT_VERSION = 1

INTERLOCK = "interlock"  # the group first-out applies to
UNLISTED = "unlisted"  # the group of a condition the catalogue did not know


class AlarmState(StrEnum):
    NORMAL = "normal"
    UNACK = "unacknowledged"
    ACKED = "acknowledged"
    RTN_UNACK = "returned_unacknowledged"


_ACTIVE = (AlarmState.UNACK, AlarmState.ACKED)  # the condition holds


class Priority(IntEnum):
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


@dataclass(frozen=True, slots=True)
class AlarmDef:
    id: str
    priority: Priority
    message: str
    group: str


# ---- the catalogue ----

_CRITICAL_RULES = frozenset({"IL-01", "IL-02", "IL-04", "IL-05"})  # the servers, the water
_HIGH_INPUTS = ("it_supply_temp",)  # plus every leak_* input
_OTHER_ALARMS: tuple[tuple[str, Priority, str, str], ...] = (
    # id, priority, group, message; PUMP:* go between VALVE-FAULT and PRIMARY-PUMPS
    (
        "WRITE-FAILED",
        Priority.HIGH,
        "output",
        "A command to the PLC was not confirmed (write failed or read back differently): "
        "the PLC may not be doing what the controller decided",
    ),
    (
        "PLC-SAFE-HOLD",
        Priority.HIGH,
        "output",
        "The PLC holds its safe values (its watchdog tripped and stays tripped past its "
        "hold-off): the heartbeat or the commands are not reaching it; heat reuse rejected, "
        "cooling by the dry cooler",
    ),
    (
        "VALVE-FAULT",
        Priority.MEDIUM,
        "equipment",
        "Reuse valve does not follow its command: heat reuse held off, heat goes to the dry cooler",
    ),
)
_AFTER_PUMPS: tuple[tuple[str, Priority, str, str], ...] = (
    (
        "PRIMARY-PUMPS",
        Priority.HIGH,
        "equipment",
        "Both primary pumps failed: no confirmed circulation through the racks",
    ),
    (
        "DRYCOOLER-FAULT",
        Priority.MEDIUM,
        "equipment",
        "Dry cooler failed (fault input, or outlet not following the fans): it cannot be "
        "counted on as the heat sink",
    ),
    (
        "CMD-BLOCKED",
        Priority.MEDIUM,
        "control",
        "A command was corrected by the guard: it would have left the servers without a pump "
        "or a heat sink",
    ),
    (
        "HUNTING",
        Priority.LOW,
        "control",
        "Modes change too often (hunting): check setpoints and sensors",
    ),
    (
        "JOURNAL",
        Priority.HIGH,
        "system",
        "The journal cannot persist: heat reuse is rejected until it recovers",
    ),
    (
        "DEGRADED",
        Priority.HIGH,
        "system",
        "Controller degraded (decision step or runtime fault): safe outputs, heat reuse rejected",
    ),
)


def _rule_def(r: Rule) -> AlarmDef:
    prio = Priority.CRITICAL if r.id in _CRITICAL_RULES else Priority.HIGH
    latched = " Latched: an engineer resets it once the cause is gone." if r.latching else ""
    return AlarmDef(r.id, prio, f"{r.id} {r.hazard}. Action: {r.effect_text}.{latched}", INTERLOCK)


def _input_priority(name: str) -> Priority:
    if name in _HIGH_INPUTS or name.startswith("leak_"):
        return Priority.HIGH
    return Priority.MEDIUM


def _is_pump_feedback(t: Tag) -> bool:
    return t.is_bool and "pump" in t.name and t.name.endswith("_running")


def _about(t: Tag) -> str:
    return f"{t.name} ({t.description})" if t.description else t.name


def catalogue(
    rules: Iterable[Rule], inputs: Iterable[Tag], outputs: Iterable[Tag] = ()
) -> dict[str, AlarmDef]:
    """Every alarm of a site by id, in a fixed order: the rules first, in the table's order
    (which decides first-out), then the plant, the controller and the people's standing
    actions. Raises ValueError on an id that would appear twice."""
    rules, ins, outs = tuple(rules), tuple(inputs), tuple(outputs)
    defs: list[AlarmDef] = [_rule_def(r) for r in rules]
    defs.append(
        AlarmDef(
            "PLC-LINK",
            Priority.HIGH,
            "PLC link lost or failing: nothing can be written, the PLC watchdog holds the safe "
            "state",
            "link",
        )
    )
    for t in ins:
        defs.append(
            AlarmDef(
                f"INPUT:{t.name}",
                _input_priority(t.name),
                f"Input {_about(t)} invalid: its reading is not trusted",
                "input",
            )
        )
    defs += [AlarmDef(i, p, m, g) for i, p, g, m in _OTHER_ALARMS]
    for t in ins:
        if _is_pump_feedback(t):
            defs.append(
                AlarmDef(
                    f"PUMP:{t.name}",
                    Priority.MEDIUM,
                    f"Pump failed: {_about(t)} does not confirm the run command",
                    "equipment",
                )
            )
    defs += [AlarmDef(i, p, m, g) for i, p, g, m in _AFTER_PUMPS]
    for r in rules:
        if r.bypassable:
            defs.append(
                AlarmDef(
                    f"BYPASS:{r.id}",
                    Priority.LOW,
                    f"{r.id} bypassed by an engineer: it does not act on {r.hazard}",
                    "operator",
                )
            )
    for t in (*ins, *outs):
        if t.name != "heartbeat":
            defs.append(
                AlarmDef(
                    f"FORCE:{t.name}",
                    Priority.LOW,
                    f"{'Output' if t.is_output else 'Input'} {t.name} forced by an engineer",
                    "operator",
                )
            )
    defs.append(
        AlarmDef(
            "MAINTENANCE",
            Priority.LOW,
            "Maintenance on: heat reuse rejected, cooling by the dry cooler",
            "operator",
        )
    )
    defs += [AlarmDef(i, p, m, METER_GROUP) for i, p, m in METER_ALARMS]
    # periodic proof tests (commissioning): one per rule and the PLC watchdog, while overdue
    for step, what in (*((r.id, f"interlock {r.id} ({r.hazard})") for r in rules), _PROOF_WD):
        defs.append(
            AlarmDef(
                f"{PROOF_PREFIX}{step}",
                Priority.LOW,
                f"Proof test of {what} overdue: no live test passed within its interval",
                PROOF_GROUP,
            )
        )
    out: dict[str, AlarmDef] = {}
    for d in defs:
        if d.id in out:
            raise ValueError(f"alarm catalogue: id {d.id!r} appears twice; expected unique ids")
        out[d.id] = d
    return out


# metering plausibility (controller.metering sets them; docs/metering.md)
METER_GROUP = "metering"
METER_ALARMS: tuple[tuple[str, Priority, str], ...] = (
    (
        "METER:TOTALISER",
        Priority.MEDIUM,
        "Heat meter totaliser went backwards or jumped: the step is flagged and not billed",
    ),
    (
        "METER:CROSSCHECK",
        Priority.LOW,
        "Heat meter and flow x dT cross-check disagree beyond the tolerance",
    ),
    (
        "METER:BALANCE",
        Priority.LOW,
        "Heat balance off over the last hour: IT heat is not delivered + rejected + stored",
    ),
    (
        "METER:LOW-DT",
        Priority.LOW,
        "Customer dT below the heat meter's rated minimum: its reading is not within its class",
    ),
)
PROOF_PREFIX = "PROOF:"
PROOF_GROUP = "proof test"
WATCHDOG_STEP = "WD"  # the PLC watchdog's proof-test step id
_PROOF_WD = (WATCHDOG_STEP, "the PLC watchdog (WD: safe values when the heartbeat stops)")


def unlisted_def(alarm_id: str) -> AlarmDef:
    """The generic definition of a condition the catalogue did not know (never dropped)."""
    return AlarmDef(alarm_id, Priority.MEDIUM, f"Unlisted condition {alarm_id}", UNLISTED)


def catalogue_markdown(defs: Mapping[str, AlarmDef]) -> str:
    """The alarm list as a Markdown table (docs/operation.md)."""
    lines = ["| id | priority | message | group |", "|---|---|---|---|"]
    for d in defs.values():
        msg = d.message.replace("|", "\\|")
        lines.append(f"| `{d.id}` | {d.priority.name.lower()} | {msg} | {d.group} |")
    return "\n".join(lines) + "\n"


# ---- one alarm ----


@dataclass(frozen=True, slots=True)
class Alarm:
    id: str
    priority: Priority
    message: str
    state: AlarmState = AlarmState.NORMAL
    detail: str = ""  # the condition's own line, kept up to date while active
    active_since_wall: float | None = None  # the latest activation (kept while returned)
    changed_wall: float | None = None  # the latest state change
    first_out: bool = False
    acked_by: str = ""
    acked_wall: float | None = None
    shelved_until: float | None = None
    shelved_by: str = ""
    shelve_reason: str = ""
    shelved_wall: float | None = None  # when the shelving was granted (a clock set back ends it)
    chatter_count: int = 0  # activations not annunciated while chattering
    chattering: bool = False
    recent: tuple[float, ...] = ()  # the last CHATTER_MAX activation times

    @property
    def active(self) -> bool:
        """Whether the condition holds (active, acknowledged or not)."""
        return self.state in _ACTIVE

    @property
    def shelved(self) -> bool:
        return self.shelved_until is not None

    def status(self) -> dict[str, object]:
        """The alarm as `heatloop status` and `heatloop alarms` show it (JSON-able)."""
        return {
            "id": self.id,
            "priority": self.priority.name.lower(),
            "state": str(self.state),
            "message": self.message,
            "detail": self.detail,
            "since_wall": self.active_since_wall,
            "first_out": self.first_out,
            "shelved_until": self.shelved_until,
            "chatter_count": self.chatter_count,
        }


def _ordered(defs: Mapping[str, AlarmDef], ids: Iterable[str]) -> list[str]:
    """`ids` in the catalogue's order (the rule table first)."""
    ids = list(ids)
    if len(ids) < 2:
        return ids
    rank = {aid: i for i, aid in enumerate(defs)}
    return sorted(ids, key=rank.__getitem__)


def _fresh(d: AlarmDef) -> Alarm:
    return Alarm(d.id, d.priority, d.message)


def _text(v: object) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + "…"


def _shown(v: object) -> str:
    """A refused value as a refusal shows it: its repr, bounded."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _finite(x: object) -> TypeGuard[int | float]:
    """A number that is a time: not a bool, not NaN or infinite, not an int beyond any float."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def _in_window(now: float, then: float) -> bool:
    # a time that stepped backwards is outside the window: never prolongs a suppression
    return 0.0 <= now - then < CHATTER_WINDOW_S


def _raised(a: Alarm, at: float, **extra: object) -> Event:
    detail: dict[str, object] = {
        "priority": a.priority.name.lower(),
        "message": a.message,
        "detail": a.detail,
        "first_out": a.first_out,
    }
    detail.update(extra)
    return Event("alarm_raised", at, a.id, detail)


# ---- the table ----


@dataclass(frozen=True)
class AlarmTable:
    """Every alarm of the site and its state; a frozen value, replaced when anything changes."""

    defs: Mapping[str, AlarmDef]
    alarms: Mapping[str, Alarm]
    wall: float | None = None  # the time of the latest change: stands in for a non-finite now
    # derived, for the steady-plant fast path: active id -> detail, and the shelving deadlines
    _active: dict[str, str] = field(init=False, repr=False, compare=False)
    _shelved: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _quiet_from: float = field(init=False, repr=False, compare=False)
    _quiet_until: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        active = {a.id: a.detail for a in self.alarms.values() if a.state in _ACTIVE}
        shelved = tuple(a.id for a in self.alarms.values() if a.shelved_until is not None)
        self._derive(active, shelved)

    def _derive(self, active: dict[str, str], shelved: tuple[str, ...]) -> None:
        lo, hi = -math.inf, math.inf
        for aid in shelved:
            a = self.alarms[aid]
            lo = max(lo, a.shelved_wall if a.shelved_wall is not None else math.inf)
            hi = min(hi, a.shelved_until if a.shelved_until is not None else -math.inf)
        object.__setattr__(self, "_active", active)
        object.__setattr__(self, "_shelved", shelved)
        object.__setattr__(self, "_quiet_from", lo)
        object.__setattr__(self, "_quiet_until", hi)

    @classmethod
    def _known(
        cls,
        defs: Mapping[str, AlarmDef],
        alarms: Mapping[str, Alarm],
        wall: float | None,
        active: dict[str, str],
        shelved: tuple[str, ...],
    ) -> AlarmTable:
        """A table whose derived fields the caller already knows (a scan's cost, not 100
        alarms'). `shelved` must be in the alarms' order, as `__post_init__` would make it."""
        t = cls.__new__(cls)
        object.__setattr__(t, "defs", defs)
        object.__setattr__(t, "alarms", alarms)
        object.__setattr__(t, "wall", wall)
        t._derive(active, shelved)
        return t

    @classmethod
    def new(cls, defs: Mapping[str, AlarmDef]) -> AlarmTable:
        """Every alarm NORMAL."""
        return cls(dict(defs), {aid: _fresh(d) for aid, d in defs.items()})

    def _now(self, now_wall: object) -> float:
        """A finite time: a non-finite or non-numeric one stands for the latest known."""
        if _finite(now_wall):
            return float(now_wall)
        return self.wall if self.wall is not None else 0.0

    # ---- the scan ----

    def update(self, present: Mapping[str, str], now_wall: float) -> tuple[AlarmTable, list[Event]]:
        """Follow the conditions holding this scan (alarm id -> detail). Ids not in the
        catalogue are added with a generic MEDIUM definition and an `alarm_unknown_id` event:
        a condition is never dropped. Returns the same table when nothing changed."""
        if (
            type(present) is dict
            and present == self._active
            and (type(now_wall) is float or type(now_wall) is int)
            and self._quiet_from <= now_wall < self._quiet_until
        ):
            return self, []  # the steady plant: nothing to do, nothing allocated
        now = self._now(now_wall)
        cur = {str(k): _text(v) for k, v in present.items()}
        alarms = dict(self.alarms)
        events: list[Event] = []
        changed = False
        added = {aid: unlisted_def(aid) for aid in cur if aid not in self.defs}
        defs: Mapping[str, AlarmDef] = {**self.defs, **added} if added else self.defs
        for aid, d in added.items():
            alarms[aid] = _fresh(d)
            events.append(Event("alarm_unknown_id", now, aid, {"detail": cur[aid]}))
            changed = True

        # activations, in the catalogue's order (first-out and event order depend on it)
        rising = _ordered(defs, (aid for aid in cur if aid not in self._active))
        il_active = any(defs[aid].group == INTERLOCK for aid in self._active)
        first = None
        if not il_active:
            first = next((aid for aid in rising if defs[aid].group == INTERLOCK), None)
        if first is not None:
            for aid, a in alarms.items():  # a new trip sequence supersedes an older mark
                if a.first_out:
                    alarms[aid] = replace(a, first_out=False)
        for aid in rising:
            a = alarms[aid]
            chattering, count, recent = a.chattering, a.chatter_count, a.recent
            last = recent[-1] if recent else None
            reported = 0
            if chattering and (last is None or not _in_window(now, last)):
                chattering, reported, count, recent = False, count, 0, ()  # a quiet window
            window = (*(t for t in recent if _in_window(now, t)), now)
            start_chatter = not chattering and len(window) > CHATTER_MAX
            if chattering or start_chatter:
                chattering, count = True, count + 1
            a = replace(
                a,
                state=AlarmState.UNACK,
                detail=cur[aid],
                active_since_wall=now,
                changed_wall=now,
                first_out=aid == first,
                acked_by="",
                acked_wall=None,
                chattering=chattering,
                chatter_count=count,
                recent=window[-CHATTER_MAX:],
            )
            alarms[aid] = a
            changed = True
            if a.shelved_until is not None:
                continue  # suppressed: annunciated at unshelving if still unacknowledged
            if start_chatter:
                events.append(
                    Event(
                        "alarm_chattering",
                        now,
                        aid,
                        {
                            "chatter_count": count,
                            "activations": len(window),
                            "window_s": CHATTER_WINDOW_S,
                        },
                    )
                )
            elif not chattering:
                extra = {"chatter_count": reported} if reported else {}
                events.append(_raised(a, now, **extra))

        # returns and detail changes
        gone = (a for a, x in self._active.items() if a not in cur or cur[a] != x)
        for aid in _ordered(self.defs, gone):
            a = alarms[aid]
            if aid in cur:
                alarms[aid] = replace(a, detail=cur[aid])  # the same condition, news of it
            elif a.state is AlarmState.UNACK:
                alarms[aid] = replace(a, state=AlarmState.RTN_UNACK, changed_wall=now)
                if a.shelved_until is None and not a.chattering:
                    events.append(Event("alarm_returned", now, aid, {"detail": a.detail}))
            else:  # ACKED: the operator has seen it, it is over
                alarms[aid] = _to_normal(a, now)
                events.append(Event("alarm_cleared", now, aid, {}))
            changed = True

        # shelving that ran out (or whose grant lies in the future: the clock went back)
        shelved = self._shelved
        for aid in self._shelved:
            a = alarms[aid]
            until, granted = a.shelved_until, a.shelved_wall
            if until is not None and granted is not None and granted <= now < until:
                continue
            back = granted is not None and now < granted and (until is None or now < until)
            why = "clock set back before the shelving" if back else "expired"
            a = _unshelved(a)
            alarms[aid] = a
            changed = True
            shelved = tuple(x for x in shelved if x != aid)
            events.append(Event("alarm_unshelved", now, aid, {"why": why, "who": ""}))
            if a.state is AlarmState.UNACK:
                events.append(_raised(a, now, after_shelving=True))

        if not changed:
            return self, events
        # every condition present is now active with its detail; none else is
        return AlarmTable._known(defs, alarms, now, cur, shelved), events

    # ---- people ----

    def acknowledge(
        self, ids: Iterable[str] | None, who: str, now_wall: float
    ) -> tuple[AlarmTable, list[str], list[str], list[Event]]:
        """Acknowledge these alarms (None: every unacknowledged alarm not shelved, which the
        operator could see).
        Returns (table, acknowledged ids, unknown ids, events); acknowledging a NORMAL or
        ACKED alarm changes nothing and is not an error."""
        now = self._now(now_wall)
        who = _text(who)
        if ids is None:
            targets = [
                aid
                for aid, a in self.alarms.items()
                if a.state in (AlarmState.UNACK, AlarmState.RTN_UNACK) and a.shelved_until is None
            ]
        else:
            if isinstance(ids, str):
                ids = [ids]  # one id, not its characters
            targets = list(dict.fromkeys(_text(i) for i in ids))
        unknown = [aid for aid in targets if aid not in self.alarms]
        alarms = dict(self.alarms)
        acked: list[str] = []
        events: list[Event] = []
        for aid in targets:
            a = alarms.get(aid)
            if a is None:
                continue
            if a.state is AlarmState.UNACK:
                a = replace(
                    a, state=AlarmState.ACKED, acked_by=who, acked_wall=now, changed_wall=now
                )
            elif a.state is AlarmState.RTN_UNACK:
                a = _to_normal(a, now)
            else:
                continue
            alarms[aid] = a
            acked.append(aid)
            events.append(
                Event("alarm_acknowledged", now, aid, {"who": who, "state": str(a.state)})
            )
        if not acked:
            return self, acked, unknown, events
        # acknowledging changes no condition and no shelving
        return (
            AlarmTable._known(self.defs, alarms, now, self._active, self._shelved),
            acked,
            unknown,
            events,
        )

    def shelve(
        self, alarm_id: str, until_wall: float, who: str, reason: str, now_wall: float
    ) -> tuple[AlarmTable, str, list[Event]]:
        """Shelve an alarm until a wall time. Returns (table, "" or why refused, events).
        The maximum duration is the caller's (authority); a time that is not finite or not
        in the future is refused here too."""
        a = self.alarms.get(alarm_id) if isinstance(alarm_id, str) else None
        if a is None:
            return (
                self,
                f"unknown alarm id {_shown(alarm_id)}: expected an id from the catalogue",
                [],
            )
        if not _finite(now_wall):
            return (
                self,
                f"now_wall {_shown(now_wall)} is not a time: expected a finite wall time",
                [],
            )
        if not _finite(until_wall):
            return (
                self,
                f"until_wall {_shown(until_wall)} is not a time: expected a finite wall time",
                [],
            )
        now, until = float(now_wall), float(until_wall)
        if until <= now:
            return (
                self,
                f"until_wall {until:g} is not after now ({now:g}): expected a future time",
                [],
            )
        who, reason = _text(who), _text(reason)
        b = replace(a, shelved_until=until, shelved_by=who, shelve_reason=reason, shelved_wall=now)
        alarms = dict(self.alarms)
        alarms[alarm_id] = b
        ev = Event(
            "alarm_shelved",
            now,
            alarm_id,
            {"who": who, "reason": reason, "until_wall": until, "state": str(a.state)},
        )
        return AlarmTable(self.defs, alarms, now), "", [ev]

    def unshelve(
        self, alarm_id: str, who: str, now_wall: float
    ) -> tuple[AlarmTable, str, list[Event]]:
        """End a shelving early; an alarm still active and unacknowledged is annunciated."""
        a = self.alarms.get(alarm_id) if isinstance(alarm_id, str) else None
        if a is None:
            return (
                self,
                f"unknown alarm id {_shown(alarm_id)}: expected an id from the catalogue",
                [],
            )
        if a.shelved_until is None:
            return self, f"alarm {alarm_id} is not shelved", []
        now = self._now(now_wall)
        b = _unshelved(a)
        alarms = dict(self.alarms)
        alarms[alarm_id] = b
        events = [Event("alarm_unshelved", now, alarm_id, {"why": "by request", "who": _text(who)})]
        if b.state is AlarmState.UNACK:
            events.append(_raised(b, now, after_shelving=True))
        return AlarmTable(self.defs, alarms, now), "", events

    # ---- views ----

    def standing(self) -> list[Alarm]:
        """Every alarm not NORMAL: highest priority first, then the oldest activation."""
        rank = {aid: i for i, aid in enumerate(self.defs)}
        out = [a for a in self.alarms.values() if a.state is not AlarmState.NORMAL]
        out.sort(
            key=lambda a: (
                -a.priority,
                a.active_since_wall if a.active_since_wall is not None else math.inf,
                rank.get(a.id, 0),
            )
        )
        return out

    def shelved(self) -> list[Alarm]:
        """Every shelved alarm, whatever its state (an operator must see what is hidden)."""
        return [self.alarms[aid] for aid in self._shelved]

    # ---- persistence ----

    def snapshot(self) -> dict[str, Any]:
        """JSON-able; only alarms that differ from a fresh NORMAL one are kept."""
        kept: dict[str, dict[str, object]] = {}
        for aid, a in self.alarms.items():
            if a != _fresh(self.defs[aid]):
                rec = {f: getattr(a, f) for f in _STATE_FIELDS}
                rec["state"] = str(a.state)
                rec["recent"] = list(a.recent)
                kept[aid] = rec
        return {
            "version": SNAPSHOT_VERSION,
            "wall": self.wall,
            "unlisted": [aid for aid, d in self.defs.items() if d.group == UNLISTED],
            "alarms": kept,
        }

    @classmethod
    def restore(cls, defs: Mapping[str, AlarmDef], d: object) -> AlarmTable:
        """The table a snapshot describes, on this catalogue. A standing alarm the catalogue
        no longer knows comes back with a generic definition. ValueError names the field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"alarms: {type(d).__name__} is not a table; expected a mapping")
        if d.get("version") != SNAPSHOT_VERSION:
            raise ValueError(
                f"alarms.version: {_shown(d.get('version'))}; expected {SNAPSHOT_VERSION}"
            )
        wall = d.get("wall")
        if wall is not None and not _finite(wall):
            raise ValueError(f"alarms.wall: {_shown(wall)}; expected a finite time or null")
        unlisted = d.get("unlisted", [])
        if not isinstance(unlisted, list) or not all(isinstance(i, str) for i in unlisted):
            raise ValueError(f"alarms.unlisted: {_shown(unlisted)}; expected a list of ids")
        recs = d.get("alarms")
        if not isinstance(recs, Mapping):
            raise ValueError(f"alarms.alarms: {_shown(recs)}; expected a mapping of id to alarm")
        extra = set(d) - {"version", "wall", "unlisted", "alarms"}
        if extra:
            raise ValueError(f"alarms: unknown field {_shown(sorted(extra, key=str)[0])}")
        full = dict(defs)
        for aid in [*unlisted, *recs]:
            if not isinstance(aid, str):
                raise ValueError(f"alarms.alarms: id {_shown(aid)}; expected a string")
            if aid not in full:
                full[aid] = unlisted_def(aid)
        alarms = {aid: _fresh(x) for aid, x in full.items()}
        for aid, rec in recs.items():
            alarms[aid] = _restore_alarm(full[aid], rec)
        return cls(full, alarms, float(wall) if wall is not None else None)


_STATE_FIELDS = tuple(f.name for f in fields(Alarm) if f.name not in ("id", "priority", "message"))


def _to_normal(a: Alarm, now: float) -> Alarm:
    return replace(
        a,
        state=AlarmState.NORMAL,
        detail="",
        active_since_wall=None,
        changed_wall=now,
        first_out=False,
        acked_by="",
        acked_wall=None,
    )


def _unshelved(a: Alarm) -> Alarm:
    return replace(a, shelved_until=None, shelved_by="", shelve_reason="", shelved_wall=None)


def _restore_alarm(d: AlarmDef, rec: object) -> Alarm:
    where = f"alarms.alarms.{d.id}"
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: {_shown(rec)}; expected a mapping")
    extra = set(rec) - set(_STATE_FIELDS)
    if extra:
        raise ValueError(f"{where}: unknown field {_shown(sorted(extra, key=str)[0])}")
    missing = [f for f in _STATE_FIELDS if f not in rec]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing")
    kw: dict[str, Any] = {}
    try:
        kw["state"] = AlarmState(rec["state"])
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}.state: {_shown(rec['state'])}; expected one of {[str(s) for s in AlarmState]}"
        ) from None
    for f in ("detail", "acked_by", "shelved_by", "shelve_reason"):
        v = rec[f]
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise ValueError(f"{where}.{f}: {_shown(v)}; expected a string of at most {MAX_TEXT}")
        kw[f] = v
    for f in ("active_since_wall", "changed_wall", "acked_wall", "shelved_until", "shelved_wall"):
        v = rec[f]
        if v is not None and not _finite(v):
            raise ValueError(f"{where}.{f}: {_shown(v)}; expected a finite time or null")
        kw[f] = float(v) if v is not None else None
    for f in ("first_out", "chattering"):
        if not isinstance(rec[f], bool):
            raise ValueError(f"{where}.{f}: {_shown(rec[f])}; expected true or false")
        kw[f] = rec[f]
    n = rec["chatter_count"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{where}.chatter_count: {_shown(n)}; expected a whole number ≥ 0")
    kw["chatter_count"] = n
    recent = rec["recent"]
    if (
        not isinstance(recent, list | tuple)
        or len(recent) > CHATTER_MAX
        or not all(_finite(t) for t in recent)
    ):
        raise ValueError(
            f"{where}.recent: {_shown(recent)}; expected at most {CHATTER_MAX} finite times"
        )
    kw["recent"] = tuple(float(t) for t in recent)
    if (kw["shelved_until"] is None) != (kw["shelved_wall"] is None):
        raise ValueError(
            f"{where}.shelved_until: {_shown(kw['shelved_until'])} with shelved_wall "
            f"{_shown(kw['shelved_wall'])}; expected both set or both null"
        )
    return Alarm(d.id, d.priority, d.message, **kw)
