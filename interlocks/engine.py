"""Interlock evaluation: validated points, memory and a time in; forced outputs and events out.

Theory of operation. Each rule's cause is evaluated every scan. A cause must hold for the rule's
delay before the rule acts (debounce); a latching rule then stays latched until its cause is gone
and a deliberate reset arrives. A bypass (never on the non-bypassable rules, always with an
expiry) suppresses a rule's effects but not its visibility. When rules force the same output
differently, a leak's isolation of the reuse circuit holds; otherwise the value that keeps more
cooling wins, which on this plant is the larger number or `True` for every output (fans faster,
pumps on, HX in service). IL-08 is raised from the link state the caller passes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from interlocks.rules import RULES, Points, Rule, Thresholds
from plc_io.tags import Value


@dataclass(frozen=True)
class Event:
    """Something the runtime logs and journals. `kind` is a short snake_case name."""

    kind: str
    at_s: float
    source: str = ""
    detail: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class InterlockState:
    cause_since: Mapping[str, float] = field(default_factory=dict)  # rule clock -> cause since
    active: frozenset[str] = frozenset()
    latched: frozenset[str] = frozenset()
    bypassed: frozenset[str] = frozenset()


class Forced(NamedTuple):
    value: Value
    by: tuple[str, ...]  # ids of the rules that forced this value


@dataclass(frozen=True)
class Verdict:
    forced: Mapping[str, Forced]
    active: frozenset[str]  # rules acting now (latched ones included)
    latched: frozenset[str]
    bypassed: frozenset[str]
    state: InterlockState
    events: tuple[Event, ...]


def _merge(current: Forced | None, value: Value, rule: Rule) -> Forced:
    if current is None:
        return Forced(value, (rule.id,))
    by = (*current.by, rule.id)
    if isinstance(value, bool) or isinstance(current.value, bool):
        return Forced(bool(current.value) or bool(value), by)
    return Forced(max(float(current.value), float(value)), by)


def evaluate(
    points: Points,
    state: InterlockState,
    now_s: float,
    th: Thresholds,
    *,
    link_ok: bool = True,
    reset: bool = False,
    bypasses: Mapping[str, float] | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> Verdict:
    """One scan of the interlock layer. `bypasses` maps rule id to its expiry time."""
    events: list[Event] = []
    cause_since: dict[str, float] = {}
    acting: set[str] = set()
    latched = set(state.latched)
    bypassed: set[str] = set()
    held_now = {r.id: (not link_ok) if r.id == "IL-08" else r.cause(points, th) for r in rules}
    for r in rules:
        if held_now[r.id]:
            cause_since[r.clock] = state.cause_since.get(r.clock, now_s)
    for r in rules:
        held = held_now[r.id]
        if held and now_s - cause_since[r.clock] >= r.delay_s:
            acting.add(r.id)
            if r.latching and r.id not in latched:
                latched.add(r.id)
                events.append(Event("trip_latched", now_s, r.id, {"hazard": r.hazard}))
        if r.id in latched and reset:
            if held:
                events.append(Event("reset_refused", now_s, r.id, {"why": "cause still present"}))
            else:
                latched.discard(r.id)
                events.append(Event("trip_reset", now_s, r.id))
        expiry = (bypasses or {}).get(r.id)
        if expiry is not None and r.bypassable and now_s < expiry:
            bypassed.add(r.id)
    active = frozenset(acting | latched)
    forced: dict[str, Forced] = {}
    isolating = [r for r in rules if r.id in active and r.isolation]
    for r in rules:
        if r.id not in active or r.id in bypassed:
            continue
        for out, v in r.effects(points, th).items():
            forced[out] = _merge(forced.get(out), v, r)
    for r in isolating:  # a leak's isolation holds over any cooling wish on the reuse circuit
        for out, v in r.effects(points, th).items():
            forced[out] = Forced(v, tuple(x.id for x in isolating))
    for rid in sorted(active - state.active):
        events.append(Event("interlock_active", now_s, rid))
    for rid in sorted(state.active - active):
        events.append(Event("interlock_cleared", now_s, rid))
    for rid in sorted(bypassed - state.bypassed):
        events.append(Event("bypass_active", now_s, rid, {"until_s": (bypasses or {})[rid]}))
    for rid in sorted(state.bypassed - bypassed):
        events.append(Event("bypass_ended", now_s, rid))
    new = InterlockState(cause_since, active, frozenset(latched), frozenset(bypassed))
    return Verdict(forced, active, frozenset(latched), frozenset(bypassed), new, tuple(events))
