"""The mode table: every mode, every transition and its guard, in one place (DESIGN §5).

Theory of operation. Each scan the supervisor works out `Conditions` (what holds now, with
hysteresis already applied) and asks `ModeMachine.advance` to move. The machine picks the mode
the conditions call for by precedence (LEAK_TRIP › MAINTENANCE › DRY_COOLER_REJECT ›
CUSTOMER_OFFLINE › BUFFER_FULL › NORMAL_REUSE), then looks for the one transition in
`TRANSITIONS` from the current mode to it and fires it only if its guard passes. Moves toward
safety (a leak, a reject) have no dwell; moves back toward reuse wait out their dwell times, so
the plant never chatters. A latched trip leaves only through the `reset` trigger.

`transitions` runs the table with `auto_transitions` off: its `to_<state>()` methods would skip
every guard. The diagram in docs/ is generated from `TRANSITIONS` (`mermaid_diagram`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from transitions import Machine


class Mode(StrEnum):
    STARTUP = "STARTUP"
    NORMAL_REUSE = "NORMAL_REUSE"
    BUFFER_FULL = "BUFFER_FULL"
    CUSTOMER_OFFLINE = "CUSTOMER_OFFLINE"
    DRY_COOLER_REJECT = "DRY_COOLER_REJECT"
    LEAK_TRIP = "LEAK_TRIP"
    MAINTENANCE = "MAINTENANCE"


_MODES = {m.value: m for m in Mode}
REUSE_MODES = (Mode.NORMAL_REUSE, Mode.BUFFER_FULL, Mode.CUSTOMER_OFFLINE)


@dataclass(frozen=True, slots=True)
class Conditions:
    """What holds this scan, as the supervisor judged it (hysteresis already applied)."""

    inputs_valid: bool  # enough is known to leave STARTUP
    leak_latched: bool  # a leak latch is set
    leaks_dry: bool  # every leak input valid and dry (an unknown zone is never "dry")
    reset: bool  # a deliberate reset of every rule, or of a leak rule, was asked this scan
    maintenance: bool  # an engineer holds maintenance
    reject: bool  # a reuse fault, a reject request, or a cooling interlock holds
    customer_ready: bool
    tank_full: bool


@dataclass(frozen=True)
class Timing:
    min_dwell_s: float
    reject_dwell_s: float
    customer_ready_dwell_s: float
    reuse_reentry_min_s: float
    hunting_changes_per_h: int


@dataclass(frozen=True)
class Transition:
    trigger: str
    sources: tuple[Mode, ...]
    dest: Mode
    guard: str  # name of a ModeMachine method returning bool
    why: str


_ANY_BUT_TRIP = tuple(m for m in Mode if m is not Mode.LEAK_TRIP)

TRANSITIONS: tuple[Transition, ...] = (
    Transition("leak", _ANY_BUT_TRIP, Mode.LEAK_TRIP, "always", "any leak zone wet (latches)"),
    Transition(
        "reset",
        (Mode.LEAK_TRIP,),
        Mode.DRY_COOLER_REJECT,
        "reset_ok",
        "every leak input dry + reset",
    ),
    Transition("inputs_valid", (Mode.STARTUP,), Mode.DRY_COOLER_REJECT, "always", "inputs valid"),
    Transition("reject", REUSE_MODES, Mode.DRY_COOLER_REJECT, "always", "reuse fault or request"),
    Transition(
        "resume_reuse", (Mode.DRY_COOLER_REJECT,), Mode.NORMAL_REUSE, "resume_ok", "fault gone"
    ),
    Transition(
        "resume_full", (Mode.DRY_COOLER_REJECT,), Mode.BUFFER_FULL, "resume_ok", "fault gone"
    ),
    Transition(
        "resume_offline",
        (Mode.DRY_COOLER_REJECT,),
        Mode.CUSTOMER_OFFLINE,
        "resume_ok",
        "fault gone, customer not ready",
    ),
    Transition(
        "customer_lost",
        (Mode.NORMAL_REUSE, Mode.BUFFER_FULL),
        Mode.CUSTOMER_OFFLINE,
        "always",
        "customer not ready",
    ),
    Transition(
        "customer_back",
        (Mode.CUSTOMER_OFFLINE,),
        Mode.NORMAL_REUSE,
        "customer_dwell_ok",
        "customer ready for its dwell",
    ),
    Transition(
        "customer_back_full",
        (Mode.CUSTOMER_OFFLINE,),
        Mode.BUFFER_FULL,
        "customer_dwell_ok",
        "customer ready, tank full",
    ),
    Transition("tank_full", (Mode.NORMAL_REUSE,), Mode.BUFFER_FULL, "dwell_ok", "tank full"),
    Transition("tank_room", (Mode.BUFFER_FULL,), Mode.NORMAL_REUSE, "dwell_ok", "tank has room"),
    Transition(
        "maintenance",
        (Mode.DRY_COOLER_REJECT, *REUSE_MODES),
        Mode.MAINTENANCE,
        "always",
        "engineer request",
    ),
    Transition(
        "release", (Mode.MAINTENANCE,), Mode.DRY_COOLER_REJECT, "always", "engineer release"
    ),
)

_BY_EDGE: dict[tuple[Mode, Mode], Transition] = {
    (s, t.dest): t for t in TRANSITIONS for s in t.sources
}


def wanted(mode: Mode, c: Conditions) -> Mode:
    """The mode the conditions call for, by precedence, reachable in one transition."""
    if c.leak_latched or (mode is Mode.LEAK_TRIP and not (c.reset and c.leaks_dry)):
        return Mode.LEAK_TRIP
    if mode is Mode.STARTUP:
        return Mode.DRY_COOLER_REJECT if c.inputs_valid else Mode.STARTUP
    if mode is Mode.LEAK_TRIP:  # reset with every leak dry: out through the reject mode
        return Mode.DRY_COOLER_REJECT
    if c.maintenance:
        return Mode.MAINTENANCE
    if mode is Mode.MAINTENANCE or c.reject:
        return Mode.DRY_COOLER_REJECT
    if not c.customer_ready:
        return Mode.CUSTOMER_OFFLINE
    return Mode.BUFFER_FULL if c.tank_full else Mode.NORMAL_REUSE


class ModeMachine:
    """The mode table run by `transitions`. Time is passed in; nothing here reads a clock."""

    def __init__(self, timing: Timing, mode: Mode = Mode.STARTUP, now_s: float = 0.0) -> None:
        self.timing = timing
        self.since_s = now_s
        self.now_s = now_s
        self.cond: Conditions | None = None
        self.reject_clear_since: float | None = None  # reject cause absent since
        self.ready_since: float | None = None  # customer ready since
        self.left_reuse_s: float = -1e18  # last time a fault pushed us out of reuse
        self.changes: deque[float] = deque()
        self.hunting = False
        self.state: str = mode.value
        self._machine = Machine(
            model=self,
            states=[m.value for m in Mode],
            transitions=[
                {
                    "trigger": t.trigger,
                    "source": [s.value for s in t.sources],
                    "dest": t.dest.value,
                    "conditions": t.guard,
                }
                for t in TRANSITIONS
            ],
            initial=mode.value,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    @property
    def mode(self) -> Mode:
        return _MODES[self.state]

    # guards (named in TRANSITIONS)
    def always(self) -> bool:
        return True

    def reset_ok(self) -> bool:
        c = self.cond
        return c is not None and c.reset and c.leaks_dry and not c.leak_latched

    def dwell_ok(self) -> bool:
        return self.now_s - self.since_s >= self.timing.min_dwell_s

    def resume_ok(self) -> bool:
        t = self.timing
        return (
            self.reject_clear_since is not None
            and self.now_s - self.reject_clear_since >= t.reject_dwell_s
            and self.now_s - self.left_reuse_s >= t.reuse_reentry_min_s
            and self.dwell_ok()
        )

    def customer_dwell_ok(self) -> bool:
        return (
            self.ready_since is not None
            and self.now_s - self.ready_since >= self.timing.customer_ready_dwell_s
        )

    def advance(self, c: Conditions, now_s: float) -> tuple[Mode, Mode] | None:
        """Move as far as one transition allows; return (from, to) when the mode changed."""
        self.now_s, self.cond = now_s, c
        # a trip is a fault like any reject cause: the reject dwell and the anti-hunting
        # re-entry interval both count from when it is over, not from before it
        faulted = c.reject or c.leak_latched or self.mode is Mode.LEAK_TRIP
        if faulted:
            self.reject_clear_since = None
        elif self.reject_clear_since is None:
            self.reject_clear_since = now_s
        if not c.customer_ready:
            self.ready_since = None
        elif self.ready_since is None:
            self.ready_since = now_s
        if self.changes and now_s - self.changes[0] > 3600.0:
            self._count_changes(now_s)  # hunting ends an hour after the changes stop, too
        old = self.mode
        target = wanted(old, c)
        if target is old:
            return None
        edge = _BY_EDGE.get((old, target))
        if edge is None or not self.trigger(edge.trigger):  # type: ignore[attr-defined]
            return None
        if old in REUSE_MODES and target in (Mode.DRY_COOLER_REJECT, Mode.LEAK_TRIP):
            self.left_reuse_s = now_s
        self.since_s = now_s
        self.changes.append(now_s)
        self._count_changes(now_s)
        return old, self.mode

    def _count_changes(self, now_s: float) -> None:
        """Keep the last hour's mode changes; hunting is more of them than the site allows."""
        while self.changes and now_s - self.changes[0] > 3600.0:
            self.changes.popleft()
        self.hunting = len(self.changes) > self.timing.hunting_changes_per_h


def mermaid_diagram() -> str:
    """The mode diagram, generated from TRANSITIONS, for docs/operation.md."""
    lines = ["stateDiagram-v2", f"    [*] --> {Mode.STARTUP.value}"]
    for t in TRANSITIONS:
        lines += [f"    {s.value} --> {t.dest.value}: {t.trigger}" for s in t.sources]
    return "\n".join(lines)
