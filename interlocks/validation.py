"""Sensor validation: turn raw samples into points the interlocks and modes may trust.

A point is valid only if its sample is usable (good or forced), fresh, finite, inside its
engineering range, not frozen while the loop flows, and not jumping faster than physics allows.
Anything else is invalid, and every consumer treats invalid as "unknown": fail toward cooling.
Validation keeps a little memory (last value and when it last changed) which it returns anew
each scan, so it stays a pure function of (image, memory, now).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from plc_io.image import USABLE, ProcessImage
from plc_io.tags import Tag, Value

# Reasons a point is invalid, in the order they are checked.
QUALITY, STALE, NAN, RANGE, FROZEN, RATE = "quality", "stale", "nan", "range", "frozen", "rate"

# Analogue tags that must move while the primary loop flows (a flat line there is a dead
# sensor) and cannot jump faster than the loop's thermal mass allows; their redundant twins too.
DYNAMIC_CHECKED = ("it_supply_temp", "it_return_temp")


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
    """What validation remembers between scans, per tag: (value, changed_at_s, seen_at_s)."""

    last: Mapping[str, tuple[float, float, float]]


EMPTY_MEMORY = Memory({})


Spec = tuple[tuple[str, bool, float, float, bool], ...]  # name, is_bool, lo, hi, dynamic


@dataclass(frozen=True)
class ValidationConfig:
    stale_s: float
    frozen_s: float
    max_rate_k_per_s: float
    frozen_noise_k: float = 0.005  # changes smaller than this count as "no change"
    redundant: Mapping[str, str] | None = None  # tag -> its twin; the worse (higher) one counts
    spec: Spec = ()  # compile_spec(input tags)


def validate(
    image: ProcessImage,
    memory: Memory,
    now_s: float,
    cfg: ValidationConfig,
    flowing: bool,
) -> tuple[dict[str, Point], Memory]:
    """Validate every input tag; `flowing` (the primary loop runs) arms the frozen check."""
    points: dict[str, Point] = {}
    last = dict(memory.last)
    samples = image.samples()
    stale_s = cfg.stale_s
    new = tuple.__new__  # Point(...) without the Python-level __new__: 30 of these a scan
    for name, is_bool, lo, hi, dynamic in cfg.spec:
        s = samples.get(name)
        if s is None:
            points[name] = new(Point, (None, False, QUALITY))
            continue
        v, q, at_s = s
        reason = ""
        if q not in USABLE or v is None:
            reason = QUALITY
        elif now_s - at_s > stale_s:
            reason = STALE
        elif not is_bool:
            x = float(v)
            if x != x:
                reason = NAN
            elif not lo <= x <= hi:
                reason = RANGE
            elif dynamic:
                reason = _dynamics(name, x, at_s, last, cfg, flowing)
        points[name] = new(Point, (v, not reason, reason))
    if cfg.redundant:
        for name, twin in cfg.redundant.items():
            if name in points and twin in points:
                points[name] = worse_of_two(points[name], points[twin])
    return points, Memory(last)


def compile_spec(tags: tuple[Tag, ...], redundant: Mapping[str, str] | None = None) -> Spec:
    """Per-tag constants, worked out once per tag table (validation runs every scan)."""
    dynamic = set(DYNAMIC_CHECKED)
    dynamic |= {twin for name, twin in (redundant or {}).items() if name in dynamic}
    return tuple((t.name, t.is_bool, t.lo, t.hi, t.name in dynamic) for t in tags)


def _dynamics(
    name: str,
    x: float,
    at_s: float,
    last: dict[str, tuple[float, float, float]],
    cfg: ValidationConfig,
    flowing: bool,
) -> str:
    prev = last.get(name)
    if prev is None:
        last[name] = (x, at_s, at_s)
        return ""
    px, changed_at, seen_at = prev
    if at_s <= seen_at:  # same sample seen again: nothing new to judge, keep the verdict clean
        return FROZEN if flowing and at_s - changed_at > cfg.frozen_s else ""
    dt = at_s - seen_at
    if abs(x - px) / dt > cfg.max_rate_k_per_s:
        # implausible jump: distrust this reading; a value that stays is judged from here on
        last[name] = (x, at_s, at_s)
        return RATE
    if abs(x - px) > cfg.frozen_noise_k:
        changed_at = at_s
    last[name] = (x, changed_at, at_s)
    if flowing and at_s - changed_at > cfg.frozen_s:
        return FROZEN
    return ""


def worse_of_two(a: Point, b: Point) -> Point:
    """Redundant sensors: trust the worse (hotter) valid reading; one valid one is enough."""
    if a.valid and b.valid:
        return a if a.num() >= b.num() else b
    return a if a.valid else b
