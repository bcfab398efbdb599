"""Interlock evaluation: validated points, memory and a time in; forced outputs and events out.

Theory of operation. Each rule's cause is evaluated every scan. A cause must hold for the rule's
delay before the rule acts (debounce). The delay counts accumulated scan time, the sum of
max(0, now - previous now) over the scans the cause held, never `now - cause_since`: a clock
that steps backwards (NTP, an operator) cannot suspend an interlock, and one that steps forwards
can only make it act sooner. A rule clears when its reset condition (data in the rule table)
holds: by itself for the non-latching rules, on a deliberate reset for the latching ones, which
stay latched otherwise; a latch is never cleared on an unknown sensor, because the leak rules'
reset condition asks for a valid, dry input. A reset is `True` (every latched rule) or a set of
rule ids (only those); anything else resets nothing, so a garbled request never clears a trip.

A bypass (rule id -> expiry) suppresses a rule's effects but not its visibility. It is refused,
with one `bypass_refused` event, when the rule is unknown or not bypassable, or its expiry is
not a finite time at most the rule's and the site's `max_bypass_s` from now.

Merging. When rules force the same output differently, a rule that protects a circuit
(`Rule.protects`: the leak isolations IL-04/05 of the reuse and customer circuits, IL-06 stop
charging, IL-07 customer scald) wins on that circuit's outputs over any cooling wish, and among
protective rules the value that isolates more (off, the smaller number) wins. Elsewhere the
value that keeps more cooling wins: on this plant the larger number or `True` for every output
(fans faster, pumps on, HX in service). IL-08 is raised from the link state the caller passes.
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
    held_s: Mapping[str, float] = field(default_factory=dict)  # rule clock -> time cause held
    active: frozenset[str] = frozenset()
    latched: frozenset[str] = frozenset()
    bypassed: frozenset[str] = frozenset()
    last_now_s: float | None = None  # the previous scan's time: delays add up its increments
    refused: frozenset[str] = frozenset()  # bypass requests refused (reported once)


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


def _more_cooling(a: Value, b: Value) -> bool:
    """Whether `a` keeps more cooling than `b` (on, the larger number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) and not bool(b)
    return float(a) > float(b)


def merge(wishes: list[tuple[Rule, Value]]) -> Forced:
    """The conflict rule for one output: protective rules win, then more cooling."""
    protective = [(r, v) for r, v in wishes if r.protects]
    pool = protective or wishes
    best = pool[0][1]
    for _, v in pool[1:]:
        if _more_cooling(best, v) if protective else _more_cooling(v, best):
            best = v  # protective: the more isolating value; else the more cooling one
    return Forced(best, tuple(r.id for r, v in pool if v == best))


NO_RESET: frozenset[str] = frozenset()


def reset_covers(reset: object) -> frozenset[str] | None:
    """The rule ids a reset request names: None for every rule (`True`), `NO_RESET` for none.

    Only `True` means "all": a truthy number, a string or any other object is no reset request
    (a latch is cleared only on a deliberate, well-formed reset); a set names its rules, and an
    element that is no string names no rule.
    """
    if reset is True:
        return None
    if not reset or not isinstance(reset, frozenset | set):
        return NO_RESET
    return frozenset(x for x in reset if isinstance(x, str))


def _bypass_refusal(rule: Rule | None, expiry: float, now_s: float, th: Thresholds) -> str:
    """Why a bypass request is refused, or "" when it may stand."""
    if rule is None:
        return "unknown rule"
    if not rule.bypassable:
        return "not bypassable"
    if not isinstance(expiry, int | float) or isinstance(expiry, bool) or expiry != expiry:
        return f"expiry {expiry!r} is not a time"
    limit = min(rule.max_bypass_s, th.max_bypass_s)
    if not expiry <= now_s + limit:  # inf and far futures both; exact for any integer
        try:
            ahead = f"{expiry - now_s:g}"
        except OverflowError:  # an integer beyond any float
            ahead = "more than 1e308"
        return f"expiry {ahead} s from now, longer than max_bypass_s {limit:g} s"
    return ""


def evaluate(
    points: Points,
    state: InterlockState,
    now_s: float,
    th: Thresholds,
    *,
    link_ok: bool = True,
    reset: bool | frozenset[str] = False,
    bypasses: Mapping[str, float] | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> Verdict:
    """One scan of the interlock layer. `bypasses` maps rule id to its expiry time; `reset` is
    True (every latched rule) or the ids of the latched rules to reset."""
    events: list[Event] = []
    resets = reset_covers(reset)
    last = state.last_now_s
    # elapsed scan time; a step backwards (or a NaN time) adds nothing, and suspends nothing
    dt = now_s - last if last is not None and now_s > last else 0.0
    held_s: dict[str, float] = {}
    acting: set[str] = set()
    latched = set(state.latched)
    held_now = {r.id: (not link_ok) if r.id == "IL-08" else r.cause(points, th) for r in rules}
    for r in rules:
        if held_now[r.id] and r.clock not in held_s:
            prev = state.held_s.get(r.clock)
            held_s[r.clock] = 0.0 if prev is None else prev + dt
    for r in rules:
        held = held_now[r.id]
        if held and held_s[r.clock] >= r.delay_s:
            acting.add(r.id)
            if r.latching and r.id not in latched:
                latched.add(r.id)
                events.append(Event("trip_latched", now_s, r.id, {"hazard": r.hazard}))
        if r.id in latched and (resets is None or r.id in resets):
            if held:
                events.append(Event("reset_refused", now_s, r.id, {"why": "cause still present"}))
            elif not r.reset(points, th):
                events.append(Event("reset_refused", now_s, r.id, {"why": r.reset.text}))
            else:
                latched.discard(r.id)
                events.append(Event("trip_reset", now_s, r.id))
        elif not r.latching and not held and r.id in state.active:
            # a non-latching rule that acted clears when its reset condition holds
            ok = link_ok if r.id == "IL-08" else r.reset(points, th)
            if not ok:
                acting.add(r.id)
    bypassed: set[str] = set()
    refused: set[str] = set()
    for rid, expiry in (bypasses or {}).items():
        rule = next((r for r in rules if r.id == rid), None)
        why = _bypass_refusal(rule, expiry, now_s, th)
        if why:
            refused.add(str(rid))
            if str(rid) not in state.refused:
                events.append(Event("bypass_refused", now_s, str(rid), {"why": why}))
        elif now_s < expiry:
            bypassed.add(rid)
    active = frozenset(acting | latched)
    wishes: dict[str, list[tuple[Rule, Value]]] = {}
    for r in rules:
        if r.id not in active or r.id in bypassed:
            continue
        for out, v in r.effects(points, th).items():
            wishes.setdefault(out, []).append((r, v))
    forced = {out: merge(w) for out, w in wishes.items()}
    by_id = {r.id: r for r in rules}
    for rid in sorted(active - state.active):
        r = by_id[rid]
        events.append(
            Event(
                "interlock_active",
                now_s,
                rid,
                {"hazard": r.hazard, "effect": r.effect_text, "alarm": r.alarm or "operator"},
            )
        )
    for rid in sorted(state.active - active):
        events.append(Event("interlock_cleared", now_s, rid))
    for rid in sorted(bypassed - state.bypassed):
        events.append(Event("bypass_active", now_s, rid, {"until_s": (bypasses or {})[rid]}))
    for rid in sorted(state.bypassed - bypassed):
        events.append(Event("bypass_ended", now_s, rid))
    new = InterlockState(
        held_s,
        active,
        frozenset(latched),
        frozenset(bypassed),
        now_s if now_s == now_s else last,  # a NaN time is no time: keep the last good one
        frozenset(refused),
    )
    return Verdict(forced, active, frozenset(latched), frozenset(bypassed), new, tuple(events))
