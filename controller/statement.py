"""Energy and availability statements (docs/metering.md, "Statements").

`build` turns interval rows, interruption rows, journal events and the command audit into one
statement (a JSON-able dict, the contract of `heatloop report --format json`); the renderers
turn that dict into Markdown (the auditor's line-by-line account), one self-contained HTML page
(the customer's and the finance team's), CSV (one row per UTC day) and a PNG (matplotlib, an
optional extra). `build` does no I/O and reads no clock, so the same code states a running
controller's store (`source: "controller"`) and a study's in-memory meter (`source: "study"`,
its events made journal-shaped by `event_dicts`).

Clipping: an interval belongs to the range when its start is in [from, to); an interruption
when it overlaps [from, to), its duration and energy not delivered clipped to the range (an
open one counts up to the end of the metered data). Figures are sums over the rows, never
re-derived: the statement agrees with the rows an auditor can read in the store.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from controller.metering import (
    CLASSES,
    availability_excl_planned_pct,
    availability_pct,
)
from controller.metering import ENERGIES as ENERGY_KEYS  # an interval row's figures (kWh)
from interlocks.engine import Event

DAY_S = 86400.0
REJECTED_METHOD = (
    "estimated: primary flow x rho*cp(T) x (the mix after the reuse valve - the dry-cooler "
    "outlet temperature), scan by scan (docs/metering.md)"
)
BYPASS_EVENTS = ("bypass_active", "bypass_ended", "bypass_refused", "bypass_expired")
FORCE_EVENTS = ("force_ended", "force_expired", "input_force_ended", "input_force_expired")
METER_EVENTS = ("meter_rollover", "meter_replaced", "meter_jump")
# the journal's event kinds a statement reads (the report asks the store for these only)
EVENT_KINDS = (
    "trip_latched",
    "trip_reset",
    "alarm_raised",
    *BYPASS_EVENTS,
    *FORCE_EVENTS,
    *METER_EVENTS,
)
MD_LIST_MAX = 1000  # Markdown lists longer than this are cut (the JSON and CSV hold them all)
CSV_COLUMNS = (
    "date",
    *ENERGY_KEYS,
    "reuse_fraction_pct",
    "availability_pct",
    "availability_excl_planned_pct",
    "covered_s",
    *(f"{c}_s" for c in CLASSES),
    "interruptions",
    "lost_kwh",
    "flags",
)


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed (the `plots` extra)."""


# ---- small helpers ----


def iso(wall: float | None) -> str | None:
    """UTC ISO 8601 with a Z, to the second."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _day(wall: float) -> date:
    return datetime.fromtimestamp(wall, UTC).date()


def _day_start(d: date) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


class _Reader:
    """Reads numbers from rows that came from a store or a meter: a figure that is missing
    counts 0, one that is not a finite number counts 0 and is noted (never a NaN in a sum)."""

    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []

    def num(self, row: Mapping[str, Any], key: str, where: float | None) -> float:
        v = row.get(key, 0.0)
        if v is None:
            return 0.0
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            self.note(where, "unreadable", f"{key} {str(v)[:40]!r} is not a finite number")
            return 0.0
        return float(v)

    def note(self, wall: float | None, what: str, detail: str) -> None:
        self.notes.append({"at": iso(wall), "wall_time": wall, "what": what, "detail": detail})


def _pct(num: float, den: float) -> float | None:
    return 100.0 * num / den if den > 0 else None


def _text(v: object, limit: int = 300) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit] + "…"


# ---- build ----


def build(
    *,
    site: str,
    intervals: Iterable[Mapping[str, Any]],
    interruptions: Iterable[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]],
    commands: Iterable[Mapping[str, Any]],
    from_wall: float,
    to_wall: float,
    interval_s: int,
    source: str,
) -> dict[str, Any]:
    """The statement over [from_wall, to_wall) (module docstring); JSON-able, every number
    finite or None. ValueError for a range that is not two finite times in order."""
    for name, v in (("from_wall", from_wall), ("to_wall", to_wall)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} {v!r}: expected a finite wall time in seconds")
    if to_wall <= from_wall:
        raise ValueError(f"to_wall {to_wall!r}: expected after from_wall {from_wall!r}")
    rd = _Reader()
    ivs = sorted(
        (
            r
            for r in intervals
            if _finite(r.get("start_wall")) and from_wall <= r["start_wall"] < to_wall
        ),
        key=lambda r: r["start_wall"],
    )
    # per UTC day (POSIX days are 86,400 s): the energy figures, then the class seconds, then
    # the covered seconds, summed in one flat list (a year is 35,040 rows: keep this loop lean)
    n_e, n_c = len(ENERGY_KEYS), len(CLASSES)
    cls_at = {c: n_e + i for i, c in enumerate(CLASSES)}
    days: dict[int, list[float]] = {}
    day_flags: dict[int, set[str]] = {}
    mode_s: dict[str, float] = {}
    low_dt = 0.0
    flag_items: list[dict[str, Any]] = []
    flag_counts: Counter[str] = Counter()
    data_end = from_wall
    for r in ivs:
        start = float(r["start_wall"])
        if "unreadable" in r:
            rd.note(start, "unreadable", f"interval row: {_text(r['unreadable'], 100)}")
            continue
        key = int(start // DAY_S)
        acc = days.get(key)
        if acc is None:
            acc = days[key] = [0.0] * (n_e + n_c + 1)
        for i, k in enumerate(ENERGY_KEYS):
            v = r.get(k, 0.0)
            if type(v) is not float or v - v != 0.0:  # not a finite float: the careful way
                v = rd.num(r, k, start)
            acc[i] += v
        cs = r.get("class_s")
        if type(cs) is dict:
            for c, v in cs.items():
                j = cls_at.get(c)
                if j is None:
                    rd.note(start, "unreadable", f"class_s has an unknown class {str(c)[:40]!r}")
                    continue
                if type(v) is not float or v - v != 0.0:
                    v = rd.num(cs, c, start)
                acc[j] += v
        elif cs is not None:
            rd.note(start, "unreadable", "class_s is not a mapping")
        cov = r.get("covered_s", 0.0)
        if type(cov) is not float or cov - cov != 0.0:
            cov = rd.num(r, "covered_s", start)
        acc[-1] += cov
        lo = r.get("low_dt_s", 0.0)
        low_dt += lo if type(lo) is float and lo - lo == 0.0 else rd.num(r, "low_dt_s", start)
        ms = r.get("mode_s")
        if type(ms) is dict:
            for m, v in ms.items():
                if type(v) is not float or v - v != 0.0:
                    v = rd.num(ms, m, start)
                mode_s[m] = mode_s.get(m, 0.0) + v
        flags = r.get("flags")
        if flags and isinstance(flags, list):
            names = sorted({str(f) for f in flags})
            flag_counts.update(names)
            day_flags.setdefault(key, set()).update(names)
            flag_items.append(
                {"at": iso(start), "wall_time": start, "what": ",".join(names), "detail": ""}
            )
        end = rd.num(r, "end_wall", start) if r.get("closed") else start + cov
        if end > data_end:
            data_end = min(end, to_wall)
    totals = dict.fromkeys(ENERGY_KEYS, 0.0)
    time_s = dict.fromkeys(CLASSES, 0.0)
    covered = 0.0
    for acc in days.values():
        for i, k in enumerate(ENERGY_KEYS):
            totals[k] += acc[i]
        for c, j in cls_at.items():
            time_s[c] += acc[j]
        covered += acc[-1]
    irs, lost_by_day = _interruptions(rd, interruptions, from_wall, to_wall, data_end)
    evs = [e for e in events if _finite(e.get("wall_time"))]
    evs.sort(key=lambda e: e["wall_time"])
    for e in evs:  # the interval's flag counts it; the event says when and what
        if e.get("kind") in METER_EVENTS:
            w = float(e["wall_time"])
            flag_items.append(
                {"at": iso(w), "wall_time": w, "what": e["kind"], "detail": _text(e.get("detail"))}
            )
    flag_items.sort(key=lambda f: f["wall_time"])
    for note in rd.notes:
        flag_counts[note["what"]] += 1
    flag_items += rd.notes
    cmds = [c for c in commands if _finite(c.get("wall_time"))]
    cmds.sort(key=lambda c: c["wall_time"])

    day_rows = []
    empty_acc = [0.0] * (n_e + n_c + 1)
    for d0 in _days(from_wall, to_wall):
        key = int(_day_start(d0) // DAY_S)
        acc = days.get(key, empty_acc)
        de = dict(zip(ENERGY_KEYS, acc, strict=False))
        dcs = {c: acc[j] for c, j in cls_at.items()}
        lost, n_irs = lost_by_day.get(d0, (0.0, 0))
        day_rows.append(
            {
                "date": d0.isoformat(),
                **de,
                "reuse_fraction_pct": _pct(de["delivered_kwh"], de["it_energy_kwh"]),
                "availability_pct": availability_pct(dcs),
                "availability_excl_planned_pct": availability_excl_planned_pct(dcs),
                "covered_s": acc[-1],
                "time_s": dcs,
                "interruptions": n_irs,
                "lost_kwh": lost,
                "flags": sorted(day_flags.get(key, ())),
            }
        )
    mode_total = sum(mode_s.values())
    by_class: dict[str, dict[str, float]] = {}
    for ir in irs:
        b = by_class.setdefault(ir["cls"], {"count": 0, "duration_s": 0.0, "lost_kwh": 0.0})
        b["count"] += 1
        b["duration_s"] += ir["duration_s"]
        b["lost_kwh"] += ir["lost_kwh"]
    alarms = [_alarm(e) for e in evs if e.get("kind") == "alarm_raised"]
    return {
        "statement": "heat delivered and heat-loop availability",
        "site": site,
        "from": iso(from_wall),
        "to": iso(to_wall),
        "from_wall": float(from_wall),
        "to_wall": float(to_wall),
        "interval_s": int(interval_s),
        "source": source,
        "empty": not ivs and not irs,
        **totals,
        "rejected_method": REJECTED_METHOD,
        "crosscheck_diff_pct": _pct(
            totals["delivered_calc_kwh"] - totals["delivered_kwh"], totals["delivered_kwh"]
        ),
        "reuse_fraction_pct": _pct(totals["delivered_kwh"], totals["it_energy_kwh"]),
        "availability_pct": availability_pct(time_s),
        "availability_excl_planned_pct": availability_excl_planned_pct(time_s),
        "coverage_pct": _pct(covered, to_wall - from_wall),
        "covered_s": covered,
        "intervals": len(ivs),
        "low_dt_s": low_dt,
        "time_s": time_s,
        "lost_kwh": sum(ir["lost_kwh"] for ir in irs),
        "interruptions_by_class": by_class,
        "days": day_rows,
        "interruptions": irs,
        "trips": _trips(evs),
        "alarms": alarms,
        "alarm_counts": dict(sorted(Counter(a["id"] for a in alarms).items())),
        "bypasses": _holds(evs, cmds, "bypass", BYPASS_EVENTS),
        "forces": _holds(evs, cmds, "force", FORCE_EVENTS),
        "mode_share_pct": {
            m: 100.0 * s / mode_total for m, s in sorted(mode_s.items(), key=lambda x: -x[1])
        }
        if mode_total > 0
        else {},
        "meter_flags": flag_items,
        "meter_flag_counts": dict(sorted(flag_counts.items())),
    }


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _days(from_wall: float, to_wall: float) -> list[date]:
    """The UTC days that [from_wall, to_wall) touches (a day is touched by an instant)."""
    first, last = _day(from_wall), _day(to_wall)
    if last > first and _day_start(last) >= to_wall:
        last -= timedelta(days=1)  # the end is excluded: a range to midnight ends the day before
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _interruptions(
    rd: _Reader,
    rows: Iterable[Mapping[str, Any]],
    lo: float,
    hi: float,
    data_end: float,
) -> tuple[list[dict[str, Any]], dict[date, tuple[float, int]]]:
    """Interruptions overlapping [lo, hi), clipped; energy not delivered in proportion to
    the clipped share of the duration (as the row states it) and spread over the days."""
    out: list[dict[str, Any]] = []
    by_day: dict[date, tuple[float, int]] = {}
    for r in rows:
        start, end = r.get("start_wall"), r.get("end_wall")
        if not _finite(start) or (end is not None and not _finite(end)):
            rd.note(start if _finite(start) else None, "unreadable", "interruption row times")
            continue
        assert isinstance(start, int | float)
        is_open = end is None
        # an open interruption lasts, as far as the statement knows, to the end of the data
        stop = max(float(start), data_end) if is_open else float(end)  # type: ignore[arg-type]
        a, b = max(float(start), lo), min(stop, hi)
        if b <= a and not (start >= lo and start < hi):
            continue  # no overlap (an instant one inside the range is kept, 0 s long)
        b = max(a, b)
        full = stop - float(start)
        lost_all = rd.num(r, "lost_kwh", float(start))
        share = (b - a) / full if full > 0 else (1.0 if lo <= start < hi else 0.0)
        lost = lost_all * share
        out.append(
            {
                "id": r.get("id"),
                "cls": str(r.get("cls", "")),
                "start": iso(float(start)),
                "end": None if is_open else iso(float(end)),  # type: ignore[arg-type]
                "start_wall": float(start),
                "end_wall": None if is_open else float(end),  # type: ignore[arg-type]
                "open": is_open,
                "clipped": a > start or b < stop,
                "duration_s": b - a,
                "detail": _text(r.get("detail", "")),
                "baseline_kw": rd.num(r, "baseline_kw", float(start)),
                "lost_kwh": lost,
            }
        )
        for d0 in _days(a, b) if b > a else [_day(a)]:
            d_lo, d_hi = max(a, _day_start(d0)), min(b, _day_start(d0) + DAY_S)
            part = lost * (d_hi - d_lo) / (b - a) if b > a else lost
            old_lost, n = by_day.get(d0, (0.0, 0))
            by_day[d0] = (old_lost + part, n + (1 if d0 == _day(a) else 0))
    out.sort(key=lambda i: (i["start_wall"], str(i["id"])))
    return out, by_day


def _trips(evs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    trips: list[dict[str, Any]] = []
    for e in evs:
        det = e.get("detail") if isinstance(e.get("detail"), Mapping) else {}
        if e.get("kind") == "trip_latched":
            trips.append(
                {
                    "at": iso(e["wall_time"]),
                    "wall_time": e["wall_time"],
                    "rule": str(e.get("source", "")),
                    "hazard": _text(det.get("hazard", "")),  # type: ignore[union-attr]
                    "reset_at": None,
                }
            )
        elif e.get("kind") == "trip_reset":
            for t in trips:  # the oldest unreset trip of that rule
                if t["rule"] == e.get("source") and t["reset_at"] is None:
                    t["reset_at"] = iso(e["wall_time"])
                    break
    return trips


def _alarm(e: Mapping[str, Any]) -> dict[str, Any]:
    det = e.get("detail") if isinstance(e.get("detail"), Mapping) else {}
    assert isinstance(det, Mapping)
    return {
        "at": iso(e["wall_time"]),
        "wall_time": e["wall_time"],
        "id": str(e.get("source", "")),
        "priority": _text(det.get("priority", "")),
        "message": _text(det.get("message", "")),
        "detail": _text(det.get("detail", "")),
    }


def _holds(
    evs: list[Mapping[str, Any]],
    cmds: list[Mapping[str, Any]],
    cmd: str,
    kinds: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Bypasses or forces, line by line: each request (accepted or refused, from the command
    audit, with who and why) and each start, end and expiry the controller journalled."""
    out: list[dict[str, Any]] = []
    for c in cmds:
        if c.get("cmd") != cmd:
            continue
        out.append(
            {
                "at": iso(c["wall_time"]),
                "wall_time": c["wall_time"],
                "what": "request accepted" if c.get("accepted") else "request refused",
                "target": _text(c.get("target", "")),
                "who": _text(f"{c.get('principal', '')} ({c.get('role', '')}, {c.get('via', '')})"),
                "reason": _text(c.get("reason", "")),
                "detail": _text(
                    f"new {_text(c.get('new'))}" + (f"; {c['why']}" if c.get("why") else "")
                ),
            }
        )
    for e in evs:
        if e.get("kind") not in kinds:
            continue
        det = e.get("detail") if isinstance(e.get("detail"), Mapping) else {}
        assert isinstance(det, Mapping)
        out.append(
            {
                "at": iso(e["wall_time"]),
                "wall_time": e["wall_time"],
                "what": str(e["kind"]),
                "target": _text(e.get("source", "")),
                "who": _text(det.get("who", "")),
                "reason": _text(det.get("reason", det.get("why", ""))),
                "detail": _text({k: v for k, v in det.items() if k not in ("who", "reason")}),
            }
        )
    out.sort(key=lambda h: h["wall_time"])
    return out


def event_dicts(pairs: Iterable[tuple[Event, float]]) -> list[dict[str, Any]]:
    """Events with their wall times as the journal's rows read back (`read_meter`): the
    detail goes through JSON as the store's does, so a study's statement equals a store's."""
    return [
        {
            "wall_time": float(wall),
            "kind": e.kind,
            "source": e.source,
            "detail": _json_detail(e.detail),
        }
        for e, wall in pairs
    ]


def _json_detail(detail: Mapping[str, object]) -> dict[str, Any]:
    d = json.loads(json.dumps(dict(detail), default=str))
    return d if isinstance(d, dict) else {"value": d}


# ---- renderers ----


def to_json(st: Mapping[str, Any]) -> str:
    """The statement as strict JSON (no NaN: `build` leaves none)."""
    return json.dumps(st, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _kwh(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def _p(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} %"


def _dur(s: float) -> str:
    s = round(s)
    h, rem = divmod(s, 3600)
    return f"{h:d} h {rem // 60:02d} min" if h else f"{rem // 60:d} min {rem % 60:02d} s"


def empty_line(st: Mapping[str, Any]) -> str:
    return f"no metering data between {st['from']} and {st['to']}"


def _md(v: object) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(v).split()).replace("\\", "\\\\").replace("|", "\\|")


def _md_table(head: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cut = rows[:MD_LIST_MAX]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in cut]
    if len(rows) > len(cut):
        lines.append(f"\n… and {len(rows) - len(cut)} more (every one is in the JSON statement)")
    return lines


def to_markdown(st: Mapping[str, Any]) -> str:
    """The auditor's statement: every figure with how it was made, then the lists."""
    out = [
        f"# Heat delivery statement: {_md(st['site'])}",
        "",
        f"Period {st['from']} to {st['to']} (UTC, the end excluded); intervals of "
        f"{st['interval_s']} s; source: {st['source']}.",
        "",
    ]
    if st["empty"]:
        out.append(f"**{empty_line(st)}.**")
        return "\n".join(out) + "\n"
    ts = st["time_s"]
    out += [
        "## Summary",
        "",
        *_md_table(
            ["figure", "value", "how"],
            [
                ["heat delivered (billed)", f"{_kwh(st['delivered_kwh'])} kWh",
                 "the heat meter's totaliser, accepted steps summed"],
                ["not billed", f"{_kwh(st['unbilled_kwh'])} kWh",
                 "totaliser steps flagged as jumps"],
                ["cross-check", f"{_kwh(st['delivered_calc_kwh'])} kWh "
                 f"({_p(st['crosscheck_diff_pct'])} from billed)",
                 "customer flow x (supply - return) x rho*cp(T)"],
                ["heat rejected", f"{_kwh(st['rejected_kwh'])} kWh", st["rejected_method"]],
                ["IT energy", f"{_kwh(st['it_energy_kwh'])} kWh", "integral of it_power"],
                ["IT heat captured", f"{_kwh(st['it_heat_kwh'])} kWh",
                 "primary flow x rho*cp x (it_return - it_supply)"],
                ["stored (tank change)", f"{_kwh(st['stored_kwh'])} kWh",
                 "buffer-tank content at the end minus at the start"],
                ["dry-cooler fans", f"{_kwh(st['fan_kwh'])} kWh",
                 "estimated: rated power x (fan command / 100 %)^3"],
                ["reuse fraction", _p(st["reuse_fraction_pct"]), "billed / IT energy"],
                ["availability", _p(st["availability_pct"]),
                 "available / (available + fault + trip + plc_link + planned_maintenance)"],
                ["availability, planned maintenance excluded",
                 _p(st["availability_excl_planned_pct"]),
                 "available / (available + fault + trip + plc_link)"],
                ["energy not delivered", f"{_kwh(st['lost_kwh'])} kWh",
                 "interruptions, estimated from the power before each"],
                ["metered time",
                 f"{_dur(st['covered_s'])} ({_p(st['coverage_pct'])} of the period)",
                 f"{st['intervals']} intervals"],
            ],
        ),
        "",
        "## Time by class",
        "",
        *_md_table(["class", "time", "seconds"], [[c, _dur(s), f"{s:.0f}"] for c, s in ts.items()]),
        "",
        "## Energy per day (UTC)",
        "",
        *_md_table(
            ["date", "delivered kWh", "not billed kWh", "cross-check kWh", "rejected kWh",
             "IT energy kWh", "reuse", "availability", "interruptions", "not delivered kWh",
             "flags"],
            [
                [d["date"], _kwh(d["delivered_kwh"]), _kwh(d["unbilled_kwh"]),
                 _kwh(d["delivered_calc_kwh"]), _kwh(d["rejected_kwh"]),
                 _kwh(d["it_energy_kwh"]), _p(d["reuse_fraction_pct"]),
                 _p(d["availability_pct"]), d["interruptions"], _kwh(d["lost_kwh"]),
                 ", ".join(d["flags"])]
                for d in st["days"]
            ],
        ),
        "",
        "## Interruptions",
        "",
    ]  # fmt: skip
    if st["interruptions"]:
        out += _md_table(
            ["id", "class", "start", "end", "duration in period", "detail", "not delivered kWh"],
            [
                [
                    i["id"],
                    i["cls"],
                    i["start"],
                    i["end"] or "(open)",
                    _dur(i["duration_s"]) + (" (clipped)" if i["clipped"] else ""),
                    i["detail"],
                    _kwh(i["lost_kwh"]),
                ]
                for i in st["interruptions"]
            ],
        )
    else:
        out.append("None.")
    out += ["", "## Trips", ""]
    out += (
        _md_table(
            ["latched", "rule", "hazard", "reset"],
            [[t["at"], t["rule"], t["hazard"], t["reset_at"] or "–"] for t in st["trips"]],
        )
        if st["trips"]
        else ["None."]
    )
    out += ["", "## Alarms raised", ""]
    if st["alarms"]:
        out += [f"- {_md(k)}: {n}" for k, n in st["alarm_counts"].items()] + [""]
        out += _md_table(
            ["raised", "alarm", "priority", "message", "detail"],
            [[a["at"], a["id"], a["priority"], a["message"], a["detail"]] for a in st["alarms"]],
        )
    else:
        out.append("None.")
    for title, key in (("Bypasses", "bypasses"), ("Forces", "forces")):
        out += ["", f"## {title}", ""]
        out += (
            _md_table(
                ["at", "what", "target", "who", "reason", "detail"],
                [
                    [h["at"], h["what"], h["target"], h["who"], h["reason"], h["detail"]]
                    for h in st[key]
                ],
            )
            if st[key]
            else ["None."]
        )
    out += ["", "## Mode shares", ""]
    out += [f"- {_md(m)}: {p:.2f} %" for m, p in st["mode_share_pct"].items()] or ["None."]
    out += ["", "## Meter plausibility", ""]
    if st["meter_flags"]:
        out += [f"- {_md(k)}: {n}" for k, n in st["meter_flag_counts"].items()] + [""]
        out += _md_table(
            ["at", "what", "detail"],
            [[f["at"], f["what"], f["detail"]] for f in st["meter_flags"]],
        )
    else:
        out.append("No flags.")
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:60rem;color:#1b2733;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem}
.sub{color:#5b6b7a}.cards{display:flex;flex-wrap:wrap;gap:1rem;margin:1.5rem 0}
.card{border:1px solid #d5dde5;border-radius:.5rem;padding:.8rem 1rem;min-width:10rem}
.card b{display:block;font-size:1.5rem}.card span{color:#5b6b7a;font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e3e8ee;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{background:#e8eef4;height:.9rem;border-radius:.2rem;min-width:12rem}
.bar i{display:block;height:100%;background:#d9622b;border-radius:.2rem}
.bar.av i{background:#2f8f5b}
.empty{font-size:1.2rem;padding:2rem;border:1px dashed #aab6c2;border-radius:.5rem}
"""


def _h(v: object) -> str:
    return html.escape(str(v), quote=True)


def _html_table(
    head: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()
) -> str:
    th = "".join(f"<th>{_h(x)}</th>" for x in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _bar(v: float | None, top: float, cls: str = "") -> str:
    w = 0.0 if v is None or top <= 0 else max(0.0, min(100.0, 100.0 * v / top))
    return f'<div class="bar {cls}"><i style="width:{w:.1f}%"></i></div>'


def to_html(st: Mapping[str, Any]) -> str:
    """One self-contained page (inline CSS, CSS bars, no scripts): headline figures, energy
    and availability per day, the interruptions. Every text from the rows is escaped."""
    title = f"Heat delivery statement: {st['site']}"
    head = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_h(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_h(title)}</h1><p class='sub'>{_h(st['from'])} to {_h(st['to'])} (UTC) · "
        f"source: {_h(st['source'])}</p>"
    )
    if st["empty"]:
        return head + f"<p class='empty'>{_h(empty_line(st))}.</p></body></html>\n"
    cards = [
        (f"{_kwh(st['delivered_kwh'])} kWh", "heat delivered (billed)"),
        (_p(st["availability_pct"]), "heat-loop availability"),
        (_p(st["reuse_fraction_pct"]), "reuse fraction (of IT energy)"),
        (str(len(st["interruptions"])), "interruptions"),
        (f"{_kwh(st['lost_kwh'])} kWh", "energy not delivered (estimated)"),
    ]
    parts = [head, '<div class="cards">']
    parts += [f'<div class="card"><b>{_h(v)}</b><span>{_h(k)}</span></div>' for v, k in cards]
    parts.append("</div>")
    top = max((d["delivered_kwh"] for d in st["days"]), default=0.0)
    parts.append("<h2>Per day</h2>")
    parts.append(
        _html_table(
            ["date", "delivered kWh", "", "availability", "", "interruptions"],
            [
                [
                    _h(d["date"]),
                    _h(_kwh(d["delivered_kwh"])),
                    _bar(d["delivered_kwh"], top),
                    _h(_p(d["availability_pct"])),
                    _bar(d["availability_pct"], 100.0, "av"),
                    _h(d["interruptions"]),
                ]
                for d in st["days"]
            ],
            frozenset({1, 3, 5}),
        )
    )
    parts.append("<h2>Interruptions</h2>")
    if st["interruptions"]:
        parts.append(
            _html_table(
                ["class", "start", "end", "duration", "cause", "not delivered kWh"],
                [
                    [
                        _h(i["cls"]),
                        _h(i["start"]),
                        _h(i["end"] or "(open)"),
                        _h(_dur(i["duration_s"])),
                        _h(i["detail"]),
                        _h(_kwh(i["lost_kwh"])),
                    ]
                    for i in st["interruptions"]
                ],
                frozenset({5}),
            )
        )
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Energy</h2>")
    parts.append(
        _html_table(
            ["figure", "kWh"],
            [[_h(k.removesuffix("_kwh").replace("_", " ")), _h(_kwh(st[k]))] for k in ENERGY_KEYS],
            frozenset({1}),
        )
    )
    parts.append(
        f"<p class='sub'>Heat rejected is {_h(st['rejected_method'])}. Availability excluding "
        f"planned maintenance: {_h(_p(st['availability_excl_planned_pct']))}. Trips: "
        f"{len(st['trips'])}; alarms raised: {len(st['alarms'])}; bypass and force lines: "
        f"{len(st['bypasses']) + len(st['forces'])}; meter flags: {len(st['meter_flags'])} "
        "(the Markdown and JSON statements list them).</p>"
    )
    parts.append("</body></html>\n")
    return "".join(parts)


def to_csv(st: Mapping[str, Any]) -> str:
    """One row per UTC day of the period (`CSV_COLUMNS`). An empty period: one row with no
    date and no figures whose `flags` says "no metering data between … and …"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    if st["empty"]:
        w.writerow([""] * (len(CSV_COLUMNS) - 1) + [empty_line(st)])
        return buf.getvalue()
    for d in st["days"]:
        w.writerow(
            [
                d["date"],
                *(_c(d[k]) for k in ENERGY_KEYS),
                _c(d["reuse_fraction_pct"]),
                _c(d["availability_pct"]),
                _c(d["availability_excl_planned_pct"]),
                _c(d["covered_s"]),
                *(_c(d["time_s"][c]) for c in CLASSES),
                d["interruptions"],
                _c(d["lost_kwh"]),
                " ".join(d["flags"]),
            ]
        )
    return buf.getvalue()


def _c(v: float | None) -> str:
    return "" if v is None else repr(round(float(v), 6))  # reads back with float()


def plot(st: Mapping[str, Any], path: Path) -> None:
    """A PNG of heat delivered per day (bars) and availability per day (line, right axis).
    PlotsUnavailable when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on an industrial PC
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(
            "matplotlib is not installed: pip install 'heatloop[plots]'"
        ) from None
    days = st["days"]
    fig = Figure(figsize=(max(6.0, min(24.0, 0.25 * len(days) + 4)), 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(days)))
    ax.bar(x, [d["delivered_kwh"] for d in days], color="#d9622b", label="delivered (kWh)")
    ax.set_ylabel("heat delivered per day (kWh)")
    ax2 = ax.twinx()
    av = [math.nan if d["availability_pct"] is None else d["availability_pct"] for d in days]
    ax2.plot(x, av, color="#2f8f5b", marker="." if len(days) < 60 else None, label="availability")
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("availability (%)")
    step = max(1, len(days) // 12)
    ax.set_xticks(x[::step], [d["date"] for d in days][::step], rotation=30, ha="right")
    last = _days(st["from_wall"], st["to_wall"])[-1]  # the last day in the range, not the end
    title = f"{st['site']}: {st['from'][:10]} to {last.isoformat()} (UTC days)"
    if st["empty"]:
        title += f" ({empty_line(st)})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_all(st: Mapping[str, Any], folder: Path, stem: str = "statement") -> list[Path]:
    """The statement as `<stem>.json`, `.md` and `.html` in `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, render in (("json", to_json), ("md", to_markdown), ("html", to_html)):
        p = folder / f"{stem}.{ext}"
        p.write_text(render(st), encoding="utf-8")
        out.append(p)
    return out
