"""Sensor validation: turn raw samples into points the interlocks and modes may trust.

A point is valid only if its sample is usable (good or forced), of the tag's kind, neither stale
nor stamped in the future, finite, inside its engineering range, not frozen while the loop flows,
not jumping faster than physics allows, plausible against its neighbours along the flow path,
and (for a supervised boolean input) not reported faulted by its supervising input. Anything
else is invalid, and every consumer treats invalid as "unknown": fail toward cooling.

A forced input (quality FORCED: an engineer's force, with an expiry) is taken at its forced
value: still checked for kind, age, NaN and range, but never judged frozen, by rate, by
plausibility or by its supervising input, because those judge the real signal and the wire it
comes on, which the force has replaced. While forced, the real signal's frozen/rate baseline is
dropped (after the force it starts anew from its first reading) and any rate or plausibility
fault it holds is kept: a sensor distrusted before the force is still distrusted after it.

Validation keeps a little memory (last value, when it last changed, which tags hold a rate
fault) which it returns anew each scan, so it stays a pure function of (image, memory, now).

Plausibility (the supply sensor stuck at a believable value). Under load (`it_power` at least
`plausibility_min_it_power_kw` and the primary loop flowing, for `plausibility_settle_s` of
scan time) the servers heat the loop, so the supply must sit below the return; and the supply,
measured just downstream of the dry cooler, must not read more than `plausibility_band_k` below
`drycooler_out_temp`. That second check is one-sided on purpose: the supply lags the outlet by
the loop's transport time, so after the fans speed up it reads warmer than the outlet for a
while, and a supply reading too warm fails toward cooling anyway; a supply reading colder than
the water that feeds it is the stuck sensor that hides an overheat. A check whose reference
sensor is itself invalid is not armed (it cannot tell which of the two is wrong; frozen, rate
and range checks still run). A failed check makes the subject invalid ("implausible"); for the
supply that is IL-02, fail toward cooling. A rate fault (an implausible jump) is held until an
armed plausibility check passes again on a later scan: a sensor that jumped once is not trusted
again just because it stopped moving. Checks run on the merged value of a redundant pair, so a
twin reading implausibly hot makes the pair unknown (IL-02), never hands it to the colder twin.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from plc_io.image import USABLE, ProcessImage, Quality, Sample
from plc_io.tags import Tag, Value

# Reasons a point is invalid, in the order they are checked.
QUALITY, TYPE, FUTURE, STALE, NAN, RANGE = "quality", "type", "future", "stale", "nan", "range"
FROZEN, RATE, IMPLAUSIBLE, SUPERVISION = "frozen", "rate", "implausible", "supervision"

# Analogue tags that must move while the primary loop flows (a flat line there is a dead
# sensor) and cannot jump faster than the loop's thermal mass allows; their redundant twins too.
DYNAMIC_CHECKED = ("it_supply_temp", "it_return_temp")

# Plausibility cross-checks, in evaluation order: (subject, relation, reference).
# "below": subject < reference; "above": subject > reference; "not_below": subject >=
# reference - plausibility_band_k. The supply is judged first, so the return's check uses a
# supply that has already passed its own check against the dry-cooler outlet.
PLAUSIBILITY: tuple[tuple[str, str, str], ...] = (
    ("it_supply_temp", "below", "it_return_temp"),
    ("it_supply_temp", "not_below", "drycooler_out_temp"),
    ("it_return_temp", "above", "it_supply_temp"),
)
LOAD_TAG = "it_power"
INT64_LIMIT = 1 << 63
FORCED = Quality.FORCED


class Point(NamedTuple):
    """A validated input. A NamedTuple because 30 are built every scan."""

    value: Value | None
    valid: bool
    reason: str = ""  # why not valid; empty when valid

    def num(self) -> float:
        """The value as a float; NaN when invalid, so comparisons are false."""
        return float(self.value) if self.valid and self.value is not None else math.nan


@dataclass(frozen=True, slots=True)
class Memory:
    """What validation remembers between scans: per tag (value, changed_at_s, seen_at_s), the
    sensors holding a rate or plausibility fault, and how long the loop has run loaded."""

    last: Mapping[str, tuple[float, float, float]]
    # sensor -> scan time its armed plausibility checks have passed since its last rate fault
    rate_faulted: Mapping[str, float] = field(default_factory=dict)
    # checked subject -> the same since it last failed a plausibility check
    implausible: Mapping[str, float] = field(default_factory=dict)
    loaded_s: float = 0.0  # scan time the loop has flowed under load, for arming plausibility
    last_now_s: float | None = None


EMPTY_MEMORY = Memory({})

# name, is_bool, lo, hi, dynamic, frozen window (s)
Spec = tuple[tuple[str, bool, float, float, bool, float], ...]


@dataclass(frozen=True)
class ValidationConfig:
    stale_s: float
    frozen_s: float  # the site's default window; a tag's own `frozen_s` is already in `spec`
    max_rate_k_per_s: float
    frozen_noise_k: float = 0.005  # changes smaller than this count as "no change"
    redundant: Mapping[str, str] | None = None  # tag -> its twin; the worse (higher) one counts
    spec: Spec = ()  # compile_spec(input tags)
    future_s: float = 0.5  # a sample stamped further ahead than this is not fresh
    plausibility_band_k: float = 8.0
    plausibility_min_it_power_kw: float = 20.0
    # the loop must have flowed under load this long before the cross-checks are armed: the
    # supply sensor lags the dry-cooler outlet by the loop's transport and mixing time, and the
    # return-supply difference needs a loop transit to build up after a start
    plausibility_settle_s: float = 120.0
    supervised: tuple[tuple[str, str], ...] = ()  # (input, its supervising input)
    plausibility: tuple[tuple[str, str, str], ...] = PLAUSIBILITY  # (subject, relation, ref)

    @cached_property
    def plausibility_groups(self) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
        """The checks by subject, in table order: worked out once, used every scan."""
        groups: dict[str, list[tuple[str, str]]] = {}
        for subject, relation, reference in self.plausibility:
            groups.setdefault(subject, []).append((relation, reference))
        return tuple((s, tuple(g)) for s, g in groups.items())


def validate(
    image: ProcessImage,
    memory: Memory,
    now_s: float,
    cfg: ValidationConfig,
    flowing: bool,
) -> tuple[dict[str, Point], Memory]:
    """Validate every input tag; `flowing` (the primary loop runs) arms the frozen check and,
    with enough IT load, the plausibility checks."""
    points: dict[str, Point] = {}
    last = dict(memory.last)
    held = memory.rate_faulted
    faulted: dict[str, float] | None = None  # copied on first change: none in a quiet scan
    jumped: tuple[str, ...] = ()
    samples = image.samples()
    stale_s, future_at = cfg.stale_s, now_s + cfg.future_s
    new = tuple.__new__  # Point(...) without the Python-level __new__: 30 of these a scan
    for name, is_bool, lo, hi, dynamic, frozen_s in cfg.spec:
        s = samples.get(name)
        if s is None:
            points[name] = new(Point, (None, False, QUALITY))
            continue
        v, q, at_s = s
        reason = ""
        if q not in USABLE or v is None:
            reason = QUALITY
        elif is_bool and type(v) is not bool and (v := _as_bool(v)) is None:
            reason = TYPE  # never bool(nan) or bool("0"): the kind is wrong, the value unknown
        elif not is_bool and type(v) is not float and not _is_number(v):
            reason, v = TYPE, None  # never float(True) = 1.0, never a string
        elif at_s > future_at:
            reason = FUTURE  # a clock ahead of ours: its age is unknown
        elif not now_s - at_s <= stale_s:  # a NaN time stamp is stale, never fresh
            reason = STALE
        elif not is_bool:
            x = float(v)  # type: ignore[arg-type]  # a real number, checked above
            if x != x:
                reason = NAN
            elif not lo <= x <= hi:
                reason = RANGE
            elif dynamic and q is FORCED:
                last.pop(name, None)  # the real signal's baseline starts anew after the force
            elif dynamic:
                reason = _dynamics(name, x, at_s, last, cfg, frozen_s, flowing)
                if reason == RATE:
                    faulted = faulted if faulted is not None else dict(held)
                    faulted[name] = 0.0
                    jumped = (*jumped, name)  # this scan's reading is never trusted
                elif name in held and not reason:
                    reason = RATE  # held until a plausibility check passes (below)
        points[name] = new(Point, (v, not reason, reason))
    if faulted is not None:
        held = faulted
    # readings of the sensors holding a rate fault from an earlier scan, before a redundant
    # pair is merged; the scan of the jump itself is never trusted
    rate_values = (
        {
            h: points[h].value
            for h in held
            if h not in jumped and h in points and points[h].reason == RATE
        }
        if held
        else {}
    )
    if cfg.redundant:
        for name, twin in cfg.redundant.items():
            if name in points and twin in points:
                points[name] = worse_of_two(points[name], points[twin])
    last_now = memory.last_now_s
    dt = now_s - last_now if last_now is not None and now_s > last_now else 0.0
    # a clock stepping backwards adds nothing and resets nothing: scan time is accumulated
    load = points.get(LOAD_TAG)
    loaded = flowing and load is not None and load.num() >= cfg.plausibility_min_it_power_kw
    loaded_s = memory.loaded_s + dt if loaded else 0.0
    implausible = memory.implausible
    if cfg.plausibility and (implausible or held or loaded):
        armed = loaded and loaded_s >= cfg.plausibility_settle_s
        held, implausible = _cross_check(
            points, rate_values, held, implausible, dt, cfg, armed, jumped, samples
        )
    for name, supervisor in cfg.supervised:
        s = samples.get(name)
        if s is None or s.quality is not FORCED:  # a forced input does not come on the wire
            _supervise(points, name, supervisor)
    now_kept = now_s if now_s == now_s else last_now  # a NaN time is no time
    return points, Memory(last, held, implausible, loaded_s, now_kept)


def _as_bool(v: object) -> bool | None:
    """numpy's bool_ (the simulated plant, in-process) is a boolean; a float, NaN, a string or
    an integer is not: `bool(nan)` is True."""
    if getattr(getattr(v, "dtype", None), "kind", "") == "b":
        return bool(v)  # type: ignore[arg-type]
    return None


def _is_number(v: object) -> bool:
    """A real number that is no boolean (True is not 1.0 on an analogue tag)."""
    if isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", "") == "b":
        return False
    if isinstance(v, numbers.Integral):
        return -INT64_LIMIT <= int(v) < INT64_LIMIT  # no register is wider; float() would overflow
    return isinstance(v, numbers.Real)


def _cross_check(
    points: dict[str, Point],
    rate_values: Mapping[str, Value | None],
    rate_held: Mapping[str, float],
    implausible: Mapping[str, float],
    dt: float,
    cfg: ValidationConfig,
    armed: bool,
    jumped: tuple[str, ...],
    samples: Mapping[str, Sample],
) -> tuple[Mapping[str, float], Mapping[str, float]]:
    """Cross-check the cooling-critical temperatures; return the rate and plausibility faults
    still held.

    Runs on the merged points (a redundant pair already reduced to its worse reading), so a
    twin reading implausibly hot makes the pair invalid (IL-02: more cooling), never hands the
    decision to the colder twin. A sensor holding a rate fault is judged on its own reading. A
    fault is trusted again only after the armed checks have passed for `plausibility_settle_s`
    of scan time: the dry-cooler outlet answers the fans within seconds, the supply only after
    the loop's transport time, so a stuck reading can look plausible for a moment right after
    IL-02 has sped the fans up, and must not flip the verdict back every other scan.
    """
    band, settle = cfg.plausibility_band_k, cfg.plausibility_settle_s
    twins = cfg.redundant or {}
    impl: dict[str, float] | None = None  # copied on first change: none in a quiet scan
    rate: dict[str, float] | None = None
    for subject, group in cfg.plausibility_groups:
        p = points.get(subject)
        if p is None:
            continue
        if _forced(subject, p, samples):
            continue  # an engineer's value: neither judged nor marked implausible; holds kept
        if armed and p.reason in ("", RATE):
            verdict = _verdict(p.value, group, points, band)
            if verdict is False:
                impl = impl if impl is not None else dict(implausible)
                impl[subject] = 0.0
            elif verdict is True and subject in (impl if impl is not None else implausible):
                impl = impl if impl is not None else dict(implausible)
                impl[subject] += dt
                if impl[subject] >= settle:
                    del impl[subject]
        for h in (subject, twins.get(subject, "")) if armed and rate_values else ():
            if h not in rate_values or h in jumped:
                continue
            verdict = _verdict(rate_values[h], group, points, band)
            rate = rate if rate is not None else dict(rate_held)
            if verdict is False:
                rate[h] = 0.0
            elif verdict is True:
                rate[h] += dt
                if rate[h] >= settle:
                    del rate[h]
                    if points[h].reason == RATE:
                        points[h] = Point(points[h].value, True, "")
        if subject in (impl if impl is not None else implausible):
            p = points[subject]
            if p.valid or p.reason == RATE:
                points[subject] = Point(p.value, False, IMPLAUSIBLE)
    return (
        rate if rate is not None else rate_held,
        impl if impl is not None else implausible,
    )


def _forced(subject: str, p: Point, samples: Mapping[str, Sample]) -> bool:
    """Whether the point stands for a forced sample (of a redundant pair: the forced twin won)."""
    s = samples.get(subject)
    return s is not None and s.quality is FORCED and p.valid and p.value == s.value


def _verdict(
    value: Value | None,
    group: tuple[tuple[str, str], ...],
    points: Mapping[str, Point],
    band: float,
) -> bool | None:
    """All armed checks of one subject passed (True), one failed (False), none armed (None).

    A check is armed only while its reference is valid: with the reference unknown it cannot
    tell which of the two sensors is wrong.
    """
    if value is None:
        return None
    x = float(value)
    verdict: bool | None = None
    for relation, reference in group:
        ref = points.get(reference)
        if ref is None or not ref.valid:
            continue
        if not _holds(x, relation, ref.num(), band):
            return False
        verdict = True
    return verdict


def _holds(x: float, relation: str, r: float, band: float) -> bool:
    if relation == "below":
        return x < r
    if relation == "above":
        return x > r
    return x >= r - band  # not_below


def _supervise(points: dict[str, Point], name: str, supervisor: str) -> None:
    """A supervised input is invalid while its supervising input reads true (the circuit is
    faulted) or, the input itself being readable, the supervising input is unknown."""
    p, s = points.get(name), points.get(supervisor)
    if p is None:
        return
    if s is None or not s.valid:
        if p.valid:
            points[name] = Point(p.value, False, SUPERVISION)
    elif s.value is True:
        points[name] = Point(p.value, False, SUPERVISION)


def compile_spec(
    tags: tuple[Tag, ...], redundant: Mapping[str, str] | None = None, frozen_s: float = 600.0
) -> Spec:
    """Per-tag constants, worked out once per tag table (validation runs every scan).

    `frozen_s` is the site's frozen window for every tag that has no `frozen_s` of its own.
    """
    dynamic = set(DYNAMIC_CHECKED)
    dynamic |= {twin for name, twin in (redundant or {}).items() if name in dynamic}
    return tuple(
        (
            t.name,
            t.is_bool,
            t.lo,
            t.hi,
            t.name in dynamic,
            frozen_s if t.frozen_s is None else float(t.frozen_s),
        )
        for t in tags
    )


def compile_supervision(tags: tuple[Tag, ...]) -> tuple[tuple[str, str], ...]:
    """(input, supervising input) for every boolean input with `supervised_by`."""
    return tuple((t.name, t.supervised_by) for t in tags if t.supervised_by is not None)


def _dynamics(
    name: str,
    x: float,
    at_s: float,
    last: dict[str, tuple[float, float, float]],
    cfg: ValidationConfig,
    frozen_s: float,
    flowing: bool,
) -> str:
    prev = last.get(name)
    if prev is None:
        last[name] = (x, at_s, at_s)
        return ""
    px, changed_at, seen_at = prev
    if at_s <= seen_at:  # same sample seen again: nothing new to judge, keep the verdict clean
        return FROZEN if flowing and at_s - changed_at > frozen_s else ""
    dt = at_s - seen_at
    if abs(x - px) / dt > cfg.max_rate_k_per_s:
        # implausible jump: distrust this reading, and the sensor until plausibility passes
        last[name] = (x, at_s, at_s)
        return RATE
    if abs(x - px) > cfg.frozen_noise_k:
        changed_at = at_s
    last[name] = (x, changed_at, at_s)
    if flowing and at_s - changed_at > frozen_s:
        return FROZEN
    return ""


def worse_of_two(a: Point, b: Point) -> Point:
    """Redundant sensors: trust the worse (hotter) valid reading; one valid one is enough."""
    if a.valid and b.valid:
        return a if a.num() >= b.num() else b
    return a if a.valid else b
