"""The process image: every tag's last sample with its quality and the time it was taken.

Staleness is never stored: a sample knows when it was read, and `quality_at(now, …)` computes
whether it is still fresh. A value that could not be read is never served as good.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from typing import NamedTuple

from plc_io.tags import Tag, Value


class Quality(StrEnum):
    GOOD = "good"
    STALE = "stale"
    OUT_OF_RANGE = "out_of_range"
    COMMS_LOST = "comms_lost"
    BAD_REPLY = "bad_reply"
    FORCED = "forced"

    @property
    def usable(self) -> bool:
        """Whether a value of this quality may drive a decision."""
        return self in (Quality.GOOD, Quality.FORCED)


USABLE = frozenset({Quality.GOOD, Quality.FORCED})


class Sample(NamedTuple):
    """One reading. A NamedTuple: immutable, and cheap enough to build 30 of every scan."""

    value: Value | None
    quality: Quality
    at_s: float  # when it was read, in the caller's clock

    def age_s(self, now_s: float) -> float:
        return now_s - self.at_s

    def quality_at(self, now_s: float, stale_after_s: float) -> Quality:
        if self.quality is Quality.GOOD and self.age_s(now_s) > stale_after_s:
            return Quality.STALE
        return self.quality

    def usable_at(self, now_s: float, stale_after_s: float) -> bool:
        return self.quality_at(now_s, stale_after_s).usable


MISSING = Sample(None, Quality.COMMS_LOST, -math.inf)


INT64_LIMIT = 1 << 63  # no PLC integer is wider: a bigger one is a garbled reply


def _is_bool(value: object) -> bool:
    # numpy's bool_ is no subclass of bool; the simulated plant hands those over in-process
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"


def kind_error(tag: Tag, value: object) -> str | None:
    """Why `value` is not of the kind `tag` carries, or None when it is.

    A boolean tag takes a boolean (or an integer 0 or 1: a register holding a flag); an analogue
    tag takes a real number that is not a boolean (NaN and out-of-range numbers are of the
    right kind: the range check judges them). Anything else (a float on a boolean tag, NaN
    included; True on an analogue tag; a string; None; an integer no PLC register can hold) is
    a garbled reply, never coerced: `bool(nan)` is True and `float(True)` is 1.0.
    """
    if tag.is_bool:
        if _is_bool(value):
            return None
        if isinstance(value, int) and value in (0, 1):
            return None
        return f"{tag.name}: got {type(value).__name__} {_short(value)}, expected a boolean"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        return f"{tag.name}: got {type(value).__name__} {_short(value)}, expected a number"
    if isinstance(value, numbers.Integral) and not -INT64_LIMIT <= int(value) < INT64_LIMIT:
        return f"{tag.name}: integer {_short(value)} outside the 64-bit range"
    return None


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def judge_why(tag: Tag, value: object, at_s: float) -> tuple[Sample, str | None]:
    """A freshly decoded value's sample and, when it is of the wrong kind, the reason.

    GOOD inside the engineering range, OUT_OF_RANGE outside it (NaN included), BAD_REPLY (value
    None) for a value of the wrong kind.
    """
    why = kind_error(tag, value)
    if why is not None:
        return Sample(None, Quality.BAD_REPLY, at_s), why
    if tag.is_bool:
        return Sample(bool(value), Quality.GOOD, at_s), None
    v = float(value)  # type: ignore[arg-type]  # a Real, checked above
    ok = math.isfinite(v) and tag.lo <= v <= tag.hi
    return Sample(v, Quality.GOOD if ok else Quality.OUT_OF_RANGE, at_s), None


def judge(tag: Tag, value: object, at_s: float) -> Sample:
    """A freshly decoded value's sample: see `judge_why`."""
    return judge_why(tag, value, at_s)[0]


class ProcessImage(Mapping[str, Sample]):
    """An immutable view of samples by tag name; a tag never read is MISSING (comms lost)."""

    __slots__ = ("_samples",)

    def __init__(self, samples: Mapping[str, Sample] | Iterable[tuple[str, Sample]] = ()) -> None:
        self._samples = dict(samples)

    def __getitem__(self, name: str) -> Sample:
        return self._samples.get(name, MISSING)

    def __iter__(self) -> Iterator[str]:
        return iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> Mapping[str, Sample]:
        """The samples actually present (a missing tag is absent, not MISSING)."""
        return self._samples

    def __contains__(self, name: object) -> bool:
        return name in self._samples

    def value(self, name: str) -> Value | None:
        return self[name].value

    def updated(self, samples: Mapping[str, Sample]) -> ProcessImage:
        return ProcessImage({**self._samples, **samples})

    def marked(self, names: Iterable[str], quality: Quality, at_s: float | None) -> ProcessImage:
        """These points could not be read: keep the last value for diagnosis, never as good.

        at_s=None keeps each sample's own time, so the age stays the age of the kept value.
        """
        new = dict(self._samples)
        for n in names:
            old = self[n]
            new[n] = Sample(old.value, quality, old.at_s if at_s is None else at_s)
        return ProcessImage(new)

    def __repr__(self) -> str:
        return f"ProcessImage({self._samples!r})"
