"""Metering and heat-loop availability, pure (docs/metering.md).

Theory of operation
-------------------
Each scan hands `step` the process image, the decision, the commands, and the wall clock. The
meter keeps one *cursor* on the wall clock (the instant accounted up to) and accounts the seconds
from the cursor to this scan's wall time into 15-minute (`interval_s`) intervals aligned to UTC,
splitting a span at an interval boundary. The monotonic scan time (`decision.now_s`) checks the
wall clock: a span the monotonic clock does not vouch for is a *gap* (the controller did not
scan: restart, kill, hang; classed "fault", flag `gap`), wall time skipped by a forward step of
the clock is not accounted (flag `clock`), and a wall clock that goes backwards never reopens a
closed interval (the seconds are counted again only once the clock passes the cursor).

Billing is the heat meter's own totaliser: the accepted steps between its readings, whatever
happened between them (so a gap loses nothing billed: the next reading bridges it). The
estimates (flow x dT, IT energy, dry cooler, fans) are powers read at the previous scan held
over the span (the command of the previous scan was in force over it), and the buffer tank's
content is a state function, differenced like the totaliser.

Each scan is classed by its direct cause (precedence plc_link > planned_maintenance > trip >
customer_side > fault), "available" when the reuse path delivers what the customer wants, or
*residual* (STARTUP, a dwell, the re-entry wait after a trip): a residual scan continues the
interruption in progress. Everything is plain floats in tuples so that `step` stays cheap: it
runs every scan and every simulated step of a year-long study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.modes import Mode
from controller.supervisor import PLC_HOLD, Commands, Decision
from interlocks.engine import Event
from plc_io import fluids
from plc_io.image import ProcessImage, Quality
from plc_io.site import MeteringConfig

CLASSES = ("available", "planned_maintenance", "customer_side", "fault", "trip", "plc_link")
INTERRUPTION_CLASSES = CLASSES[1:]
FLAGS = (  # sorted: an interval row lists its flags in this order
    "balance",
    "clock",
    "crosscheck",
    "gap",
    "low_dt",
    "meter_invalid",
    "meter_jump",
    "meter_replaced",
    "meter_rollover",
    "meter_start",
)
ENERGIES = (
    "delivered_kwh",
    "unbilled_kwh",
    "delivered_calc_kwh",
    "rejected_kwh",
    "it_energy_kwh",
    "it_heat_kwh",
    "stored_kwh",
    "fan_kwh",
)
MODES = tuple(m.value for m in Mode)
STATE_VERSION = 1
SOURCE = "metering"  # the events' source

# A scan whose monotonic time is further than this from the previous one is no scan: the
# controller stopped (or hung) in between, and the wall time since the last scan is a gap.
# Above the 60 s step of a year-long study; far above the 0.25 s scan.
MAX_SCAN_DT_S = 120.0
# Wall and monotonic clocks may disagree by this much in one scan before it counts as a clock step.
CLOCK_TOL_S = 2.0
# A totaliser step may exceed meter_max_kw over the time since its last change by this much
# (display resolution, float32 encoding of the register).
RESOLUTION_KWH = 0.2
# The customer is being delivered to while its flow is above this (m³/h): LOW-DT applies.
DELIVERING_M3H = 0.1
LOW_DT_ALARM_S = 60.0  # customer dT below the meter's minimum this long: METER:LOW-DT
POWER_LIMIT_KW = 1e7  # no power of a heat-reuse plant is near this: beyond it, a bad reading
# The baseline power of an interruption: the billed energy over the available seconds in the
# lost_energy_basis_h before it, in RING buckets; below BASELINE_MIN_S of available time there
# is no fresh baseline and the previous interruption's is kept (interruptions back to back).
RING = 60
BASELINE_MIN_S = 60.0
# A closed interval is judged (cross-check) only when the scans covered nearly all of it.
FULL_COVER = 0.99
GAP_DETAIL = "controller not running"
# A gap is covered (as fault) by at most this many synthetic intervals (104 days at 900 s);
# the rest of it is skipped like a clock step. Bounds the work of one scan and one commit.
MAX_GAP_INTERVALS = 10_000
TRIP_RULES = frozenset({"IL-03", "IL-04", "IL-05", "IL-06", "IL-07"})  # each stops delivery

# accumulator layout: one tuple per interval (open), lifetime and UTC day (closed sums)
_COV, _DEL, _UNB, _CALC, _REJ, _ITE, _ITH, _STO, _FAN, _LOW = range(10)
_CLS0 = 10
_MODE0 = _CLS0 + len(CLASSES)
N_ACC = _MODE0 + len(MODES)
_ZERO = (0.0,) * N_ACC
_AVAIL, _PLANNED, _CUSTOMER, _FAULT, _TRIP, _PLC = range(6)
_MODE_INDEX = {m: i for i, m in enumerate(Mode)}
_CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
_FLAG_BIT = {f: 1 << i for i, f in enumerate(FLAGS)}
_F_START, _F_ROLL, _F_REPL, _F_JUMP, _F_INV, _F_CC, _F_BAL, _F_LOW, _F_GAP, _F_CLOCK = (
    _FLAG_BIT[f]
    for f in (
        "meter_start",
        "meter_rollover",
        "meter_replaced",
        "meter_jump",
        "meter_invalid",
        "crosscheck",
        "balance",
        "low_dt",
        "gap",
        "clock",
    )
)
# an interval whose meter reading is not whole is not cross-checked
_F_METER_UNSURE = _F_START | _F_REPL | _F_JUMP | _F_INV | _F_GAP | _F_CLOCK
# internal "missing" bits: an estimate was unknown for part of the open interval / balance block
_M_CALC, _M_BAL = 1, 2
_NAN = math.nan
_GOOD = Quality.GOOD
_REUSE_AVAILABLE = (Mode.NORMAL_REUSE, Mode.BUFFER_FULL)
_NO_CONDITIONS: Mapping[str, str] = {}
_NO_ROWS: tuple[dict[str, Any], ...] = ()
_NO_EVENTS: tuple[Event, ...] = ()
# the analogue inputs metering reads, in the order step() unpacks them
_USED = (
    "customer_flow",
    "customer_supply_temp",
    "customer_return_temp",
    "primary_flow",
    "it_return_temp",
    "it_supply_temp",
    "it_power",
    "reuse_valve_pos",
    "hx_primary_out_temp",
    "drycooler_out_temp",
    "tank_top_temp",
    "tank_mid_temp",
    "tank_bottom_temp",
    "heat_meter_energy",
)


def availability_pct(class_s: Mapping[str, float]) -> float | None:
    """Heat-loop availability, %: available / (available + fault + trip + plc_link +
    planned_maintenance). Customer-side time is not time the customer wanted heat. None when
    the denominator is 0."""
    a = class_s.get("available", 0.0)
    den = a + sum(class_s.get(c, 0.0) for c in ("fault", "trip", "plc_link", "planned_maintenance"))
    return 100.0 * a / den if den > 0.0 else None


def availability_excl_planned_pct(class_s: Mapping[str, float]) -> float | None:
    """As availability_pct with planned maintenance left out of the denominator too."""
    a = class_s.get("available", 0.0)
    den = a + sum(class_s.get(c, 0.0) for c in ("fault", "trip", "plc_link"))
    return 100.0 * a / den if den > 0.0 else None


@dataclass(frozen=True)
class MeterState:
    """Everything the meter remembers between scans. Immutable; JSON by `state_to_json`."""

    interval_s: int  # the site's interval when the state was made (a change needs a new store)
    cursor_wall: float | None  # wall time accounted up to (None: never scanned)
    last_now_s: float | None  # the previous scan's monotonic time
    open_start: float | None  # the open interval's start (wall, aligned)
    acc: tuple[float, ...]  # the open interval's accumulators (N_ACC)
    flags: int  # the open interval's FLAGS bits
    missing: int  # _M_* bits: estimates unknown for part of the open interval
    meter_first: float | None  # the totaliser reading bounding the open interval at its start
    meter_last: float | None  # the last accepted reading in it
    life: tuple[float, ...]  # sums of every closed interval
    today_start: float | None  # the UTC day `today` sums (start, wall)
    today: tuple[float, ...]  # sums of the closed intervals of that day
    meter_kwh: float | None  # the last accepted totaliser reading
    meter_idle_s: float  # seconds heat could flow since the accepted reading last changed
    prev: tuple[float, float, float, float, float]  # kW read at the previous scan: calc, IT
    # power, IT heat, rejected, fans (NaN: unknown)
    tank_kj: float | None  # the buffer tank's content at the last valid reading
    low_run_s: float  # seconds the customer dT has been low without a break
    alarms: tuple[tuple[float, str], ...]  # TOTALISER, CROSSCHECK, BALANCE: (until interval
    # start, detail); the condition stands while the open interval starts before `until`
    bal_start: float | None  # the balance block being summed (wall)
    bal: tuple[float, float, float, float, float]  # it_heat, delivered, rejected, stored, s
    bal_missing: bool
    interruption: tuple[int, str, str, float, float, float] | None  # id, cls, detail, start,
    # baseline kW, billed kWh during it
    next_id: int
    last_baseline_kw: float
    ring_idx: int  # absolute index of the newest bucket (wall // bucket)
    ring: tuple[float, ...]  # RING billed kWh then RING available seconds


@dataclass(frozen=True)
class MeterOut:
    intervals: tuple[dict[str, Any], ...]  # rows changed this scan (closed ones, then the open)
    interruptions: tuple[dict[str, Any], ...]  # rows started, changed or ended this scan
    events: tuple[Event, ...]
    conditions: Mapping[str, str]  # METER:* alarm id -> detail, present now


_NO_ALARM = ((-math.inf, ""), (-math.inf, ""), (-math.inf, ""))


def new_state(cfg: MeteringConfig) -> MeterState:
    """A meter that has never scanned."""
    return MeterState(
        interval_s=cfg.interval_s,
        cursor_wall=None,
        last_now_s=None,
        open_start=None,
        acc=_ZERO,
        flags=0,
        missing=0,
        meter_first=None,
        meter_last=None,
        life=_ZERO,
        today_start=None,
        today=_ZERO,
        meter_kwh=None,
        meter_idle_s=0.0,
        prev=(_NAN, _NAN, _NAN, _NAN, _NAN),
        tank_kj=None,
        low_run_s=0.0,
        alarms=_NO_ALARM,
        bal_start=None,
        bal=(0.0, 0.0, 0.0, 0.0, 0.0),
        bal_missing=False,
        interruption=None,
        next_id=1,
        last_baseline_kw=0.0,
        ring_idx=0,
        ring=(0.0,) * (2 * RING),
    )


class _Const:
    """Per-configuration constants (fluid polynomials, block lengths), computed once."""

    __slots__ = ("bucket_s", "cfg", "cust_cp", "cust_rho", "prim_cp", "prim_rho", "tank_h")

    def __init__(self, cfg: MeteringConfig) -> None:
        self.cfg = cfg
        self.prim_rho = fluids.density_coeffs(cfg.primary_fluid)
        self.prim_cp = fluids.cp_coeffs(cfg.primary_fluid)
        self.cust_rho = fluids.density_coeffs(cfg.customer_fluid)
        self.cust_cp = fluids.cp_coeffs(cfg.customer_fluid)
        self.tank_h = fluids.vol_enthalpy_coeffs(cfg.secondary_fluid)
        self.bucket_s = cfg.lost_energy_basis_h * 3600.0 / RING


_CONSTS: dict[int, _Const] = {}


def _const(cfg: MeteringConfig) -> _Const:
    c = _CONSTS.get(id(cfg))
    if c is None or c.cfg is not cfg:  # the entry keeps its cfg alive, so ids are not reused
        if len(_CONSTS) >= 64:  # a process has one site; tests make many: stay small
            _CONSTS.clear()
        c = _CONSTS[id(cfg)] = _Const(cfg)
    return c


_FLAG_NAMES: dict[int, tuple[str, ...]] = {}


def _flag_names(bits: int) -> list[str]:
    """The FLAGS set in `bits`, in FLAGS order (sorted: FLAGS is listed so)."""
    names = _FLAG_NAMES.get(bits)
    if names is None:
        names = _FLAG_NAMES[bits] = tuple(f for f in FLAGS if bits & _FLAG_BIT[f])
    return list(names)


def _q2(c: tuple[float, ...], t: float) -> float:
    return c[0] + t * (c[1] + t * c[2])


def _h(c: tuple[float, ...], t: float) -> float:
    return c[0] + t * (c[1] + t * (c[2] + t * (c[3] + t * (c[4] + t * c[5]))))


def _heat_kw(flow_m3h: float, hot_c: float, cold_c: float, rho_at_c: float, rho, cp) -> float:
    """Heat carried by a volume flow between two temperatures: V x rho(T at the flow sensor) x
    cp(mean) x dT (the enthalpy difference; cp is nearly linear over a loop's dT)."""
    return (
        flow_m3h / 3600.0 * _q2(rho, rho_at_c) * _q2(cp, 0.5 * (hot_c + cold_c)) * (hot_c - cold_c)
    )


def _block_s(interval_s: int) -> float:
    """The balance is judged over whole blocks of intervals at least an hour long."""
    return float(interval_s * -(-3600 // interval_s))


class _W:
    """A working copy of a MeterState for one step (mutable; frozen again at the end)."""

    __slots__ = (
        "acc",
        "alarms",
        "bal",
        "bal_missing",
        "bal_start",
        "c",
        "cfg",
        "cursor",
        "events",
        "flags",
        "interruption",
        "irows",
        "iv",
        "last_baseline_kw",
        "life",
        "meter_first",
        "meter_kwh",
        "meter_last",
        "missing",
        "next_id",
        "now_s",
        "open_start",
        "ring",
        "ring_idx",
        "rows",
        "today",
        "today_start",
    )

    def __init__(self, s: MeterState, cfg: MeteringConfig, c: _Const, now_s: float) -> None:
        self.cfg, self.c, self.now_s = cfg, c, now_s
        self.iv = float(cfg.interval_s)
        self.cursor = s.cursor_wall
        self.open_start = s.open_start
        self.acc = list(s.acc)
        self.flags, self.missing = s.flags, s.missing
        self.meter_first, self.meter_last, self.meter_kwh = s.meter_first, s.meter_last, s.meter_kwh
        self.life, self.today_start, self.today = s.life, s.today_start, s.today
        self.alarms = list(s.alarms)
        self.bal_start, self.bal, self.bal_missing = s.bal_start, list(s.bal), s.bal_missing
        self.interruption = s.interruption
        self.next_id, self.last_baseline_kw = s.next_id, s.last_baseline_kw
        self.ring_idx, self.ring = s.ring_idx, s.ring
        self.rows: list[dict[str, Any]] = []
        self.irows: list[dict[str, Any]] = []
        self.events: list[Event] = []

    # ---- intervals ----

    def advance(
        self,
        end: float,
        kind: int,  # 0 scan, 1 gap (fault, flag gap), 2 skip (not covered, flag clock)
        energies: tuple[float, ...] | None,  # estimates over the span: calc, IT, IT heat,
        # rejected, fans (kWh), shared among the intervals by time
        cls_i: int,
        mode_i: int,
        readings: tuple[float, float, float] | None,  # billed, unbilled, stored (kWh): go whole
        # to the interval that holds the span's last second, where they were read
        low_s: float,
    ) -> None:
        """Account the wall span (cursor, end] into the intervals, closing each one crossed."""
        pos = self.cursor
        assert pos is not None and self.open_start is not None
        if kind == 2:  # skipped wall time: no rows for the intervals it jumps over
            self.flags |= _F_CLOCK
            if end >= self.open_start + self.iv:
                self.close()
                self.open_start = end - end % self.iv
                self.flags |= _F_CLOCK
            if readings is not None:
                self.add_readings(readings)
            self.cursor = end
            return
        total = end - pos
        while True:
            i_end = self.open_start + self.iv
            stop = end if end < i_end else i_end
            piece = stop - pos
            acc = self.acc
            if piece > 0.0:
                if kind == 0:
                    acc[_COV] += piece
                    acc[_CLS0 + cls_i] += piece
                    acc[_MODE0 + mode_i] += piece
                    if low_s:
                        acc[_LOW] += low_s * piece / total
                elif kind == 1:
                    acc[_COV] += piece
                    acc[_CLS0 + _FAULT] += piece
                    self.flags |= _F_GAP
                else:
                    self.flags |= _F_CLOCK
                if energies is not None:
                    self.add_energies(energies, piece / total)
            pos = stop
            if stop >= end and readings is not None:
                self.add_readings(readings)
            if pos >= i_end:
                self.close()
            if pos >= end:
                break
        self.cursor = end

    def add_energies(self, e: tuple[float, ...], f: float) -> None:
        acc = self.acc
        acc[_CALC] += e[0] * f
        acc[_ITE] += e[1] * f
        acc[_ITH] += e[2] * f
        acc[_REJ] += e[3] * f
        acc[_FAN] += e[4] * f

    def add_readings(self, r: tuple[float, float, float]) -> None:
        acc = self.acc
        acc[_DEL] += r[0]
        acc[_UNB] += r[1]
        acc[_STO] += r[2]

    def close(self) -> None:
        """Close the open interval (judge it, add it to the sums) and open the next one."""
        cfg, acc, start = self.cfg, self.acc, self.open_start
        assert start is not None
        iv = self.iv
        full = acc[_COV] >= FULL_COVER * iv
        if full and not (self.flags & _F_METER_UNSURE) and not (self.missing & _M_CALC):
            m, k = acc[_DEL], acc[_CALC]
            big = m if m > k else k
            if (
                big >= cfg.crosscheck_min_kwh
                and abs(m - k) > cfg.crosscheck_tolerance_pct / 100 * big
            ):
                self.flags |= _F_CC
                self.alarms[1] = (
                    start + 2 * iv,
                    f"meter {m:.1f} kWh vs flow x dT {k:.1f} kWh over the interval: "
                    f"{100 * (m - k) / big:+.1f} %, tolerance {cfg.crosscheck_tolerance_pct:g} %",
                )
        self.balance(start, acc)
        self.rows.append(self.row(True))
        t = tuple(acc)
        self.life = tuple(a + b for a, b in zip(self.life, t, strict=True))
        day = start - start % 86400.0
        if day != self.today_start:
            self.today_start, self.today = day, _ZERO
        self.today = tuple(a + b for a, b in zip(self.today, t, strict=True))
        self.open_start = start + iv
        self.acc = list(_ZERO)
        self.flags = self.missing = 0
        self.meter_first = self.meter_last = self.meter_kwh

    def balance(self, start: float, acc: list[float]) -> None:
        """Sum the closing interval into its balance block; judge the block at its end."""
        block = _block_s(self.cfg.interval_s)
        b0 = start - start % block
        if b0 != self.bal_start:
            self.bal_start, self.bal, self.bal_missing = b0, [0.0] * 5, False
        b = self.bal
        b[0] += acc[_ITH]
        b[1] += acc[_DEL]
        b[2] += acc[_REJ]
        b[3] += acc[_STO]
        b[4] += acc[_COV]
        if self.missing & _M_BAL or self.flags & (_F_METER_UNSURE & ~_F_START):
            self.bal_missing = True
        if start + self.iv < b0 + block:
            return
        cfg = self.cfg
        it, out = b[0], b[1] + b[2] + b[3]
        if (
            b[4] >= FULL_COVER * block
            and not self.bal_missing
            and it >= cfg.balance_min_kwh
            and abs(it - out) > cfg.balance_tolerance_pct / 100 * it
        ):
            self.flags |= _F_BAL
            self.alarms[2] = (
                b0 + 2 * block,
                f"IT heat {it:.0f} kWh; delivered {b[1]:.0f} + rejected {b[2]:.0f} + stored "
                f"{b[3]:.0f} = {out:.0f} kWh over the last hour: {100 * (out - it) / it:+.0f} %, "
                f"tolerance {cfg.balance_tolerance_pct:g} %",
            )

    def row(self, closed: bool) -> dict[str, Any]:
        a, start = self.acc, self.open_start
        assert start is not None
        return {
            "start_wall": start,
            "end_wall": start + self.iv,
            "closed": closed,
            "covered_s": a[_COV],
            "delivered_kwh": a[_DEL],
            "unbilled_kwh": a[_UNB],
            "delivered_calc_kwh": a[_CALC],
            "rejected_kwh": a[_REJ],
            "it_energy_kwh": a[_ITE],
            "it_heat_kwh": a[_ITH],
            "stored_kwh": a[_STO],
            "fan_kwh": a[_FAN],
            "class_s": dict(zip(CLASSES, a[_CLS0:_MODE0], strict=True)),
            "mode_s": dict(zip(MODES, a[_MODE0:], strict=True)),
            "low_dt_s": a[_LOW],
            "flags": _flag_names(self.flags),
            "meter_first_kwh": self.meter_first,
            "meter_last_kwh": self.meter_last,
        }

    # ---- interruptions ----

    def baseline_kw(self, at_wall: float) -> float:
        """Mean billed power over the available seconds of the basis before at_wall."""
        b_now = int(at_wall // self.c.bucket_s)
        lo = max(b_now - RING + 1, self.ring_idx - RING + 1)
        kwh = secs = 0.0
        for b in range(lo, min(b_now, self.ring_idx) + 1):
            kwh += self.ring[b % RING]
            secs += self.ring[RING + b % RING]
        if secs >= BASELINE_MIN_S:
            self.last_baseline_kw = max(0.0, kwh * 3600.0 / secs)
        return self.last_baseline_kw

    def ring_add(self, at_wall: float, kwh: float, secs: float) -> None:
        b = int(at_wall // self.c.bucket_s)
        ring = list(self.ring)
        if b > self.ring_idx:
            for k in range(max(self.ring_idx + 1, b - RING + 1), b + 1):
                ring[k % RING] = ring[RING + k % RING] = 0.0
            self.ring_idx = b
        j = self.ring_idx % RING
        ring[j] += kwh
        ring[RING + j] += secs
        self.ring = tuple(ring)

    def irow(self, it: tuple[int, str, str, float, float, float], end: float | None) -> dict:
        i, cls, detail, start, base, during = it
        upto = self.cursor if end is None else end
        assert upto is not None
        return {
            "id": i,
            "cls": cls,
            "start_wall": start,
            "end_wall": end,
            "detail": detail,
            "baseline_kw": base,
            "delivered_during_kwh": during,
            "lost_kwh": max(0.0, base * max(0.0, upto - start) / 3600.0 - during),
        }

    def end_interruption(self, at: float) -> None:
        it = self.interruption
        if it is None:
            return
        row = self.irow(it, max(at, it[3]))
        self.irows.append(row)
        self.events.append(
            Event(
                "interruption_ended",
                self.now_s,
                SOURCE,
                {"id": it[0], "cls": it[1], "detail": it[2], "lost_kwh": row["lost_kwh"]},
            )
        )
        self.interruption = None

    def start_interruption(self, cls: str, detail: str, at: float) -> None:
        self.end_interruption(at)
        it = (self.next_id, cls, detail, at, self.baseline_kw(at), 0.0)
        self.next_id += 1
        self.interruption = it
        self.events.append(
            Event(
                "interruption_started",
                self.now_s,
                SOURCE,
                {"id": it[0], "cls": cls, "detail": detail, "baseline_kw": it[4]},
            )
        )

    def classify(self, cls: str | None, detail: str, at: float) -> None:
        """Move the interruption state to this scan's class (None: residual)."""
        it = self.interruption
        if cls == "available":
            self.end_interruption(at)
        elif cls is None:
            if it is None:
                self.start_interruption("fault", detail, at)
        elif it is None or it[1] != cls or (it[2] == GAP_DETAIL) != (detail == GAP_DETAIL):
            self.start_interruption(cls, detail, at)

    def freeze(self, **kw: Any) -> MeterState:
        # A frozen dataclass's __init__ sets each of its fields through object.__setattr__
        # (~0.3 µs each, a third of a scan's metering); filling the instance dict directly is
        # the same object, frozen all the same to its users.
        new = object.__new__(MeterState)
        new.__dict__.update(
            interval_s=self.cfg.interval_s,
            cursor_wall=self.cursor,
            open_start=self.open_start,
            acc=tuple(self.acc),
            flags=self.flags,
            missing=self.missing,
            meter_first=self.meter_first,
            meter_last=self.meter_last,
            life=self.life,
            today_start=self.today_start,
            today=self.today,
            meter_kwh=self.meter_kwh,
            alarms=tuple(self.alarms),
            bal_start=self.bal_start,
            bal=(self.bal[0], self.bal[1], self.bal[2], self.bal[3], self.bal[4]),
            bal_missing=self.bal_missing,
            interruption=self.interruption,
            next_id=self.next_id,
            last_baseline_kw=self.last_baseline_kw,
            ring_idx=self.ring_idx,
            ring=self.ring,
            **kw,
        )
        return new


def _cause(
    decision: Decision, commands: Commands, ready: object, ready_ok: bool
) -> tuple[str | None, str]:
    """This scan's class and its cause in words; None for a residual scan (no cause of its own)."""
    active = decision.active
    if not commands.link_ok or "IL-08" in active:
        return "plc_link", "PLC link lost"
    reasons = decision.reject_reasons
    for r in reasons:
        if r.startswith(PLC_HOLD):
            return "plc_link", r
    if commands.write_failed:
        return "plc_link", "outputs not acknowledged: " + ", ".join(sorted(commands.write_failed))
    mode = decision.mode
    if commands.maintenance or mode is Mode.MAINTENANCE:
        return "planned_maintenance", "maintenance"
    if decision.latched:
        return "trip", ", ".join(f"{r} latched" for r in sorted(decision.latched))
    tripping = active & TRIP_RULES
    if tripping:
        return "trip", ", ".join(f"{r} active" for r in sorted(tripping))
    if mode is Mode.LEAK_TRIP:
        return "trip", "leak trip"
    if ready_ok and ready is False:
        return "customer_side", "customer not ready"
    for r in reasons:
        if not r.startswith("interlock ") and r != "PLC link lost":
            return "fault", r
    if not ready_ok:
        return "fault", "customer_ready not valid"
    if mode in _REUSE_AVAILABLE:
        return "available", ""
    if mode is Mode.DRY_COOLER_REJECT:
        return None, "DRY_COOLER_REJECT (waiting to re-enter reuse)"
    if mode is Mode.CUSTOMER_OFFLINE:
        return None, "CUSTOMER_OFFLINE (customer ready, waiting out the dwell)"
    return None, mode.value


def step(
    state: MeterState,
    cfg: MeteringConfig,
    image: ProcessImage,
    decision: Decision,
    commands: Commands,
    wall_s: float,
) -> tuple[MeterState, MeterOut]:
    """Account one scan. See the module's theory of operation and docs/metering.md."""
    now = decision.now_s
    if not (math.isfinite(wall_s) and math.isfinite(now)):
        return state, MeterOut(_NO_ROWS, _NO_ROWS, _NO_EVENTS, _conditions(state, cfg))
    c = _const(cfg)
    iv = float(cfg.interval_s)
    samples = image.samples()
    invalid = decision.invalid

    # ---- the readings of this scan: powers held over the next span, the tank, the meter ----
    vals = []
    for tag in _USED:  # a usable reading is GOOD and trusted by validation; else NaN
        smp = samples.get(tag)
        if smp is None or smp[1] is not _GOOD or (invalid and tag in invalid):
            vals.append(_NAN)
        else:
            v = smp[0]
            if type(v) is int:
                v = float(v) if -1e15 < v < 1e15 else _NAN
            vals.append(v if type(v) is float and v - v == 0.0 else _NAN)  # inf, NaN: unknown
    (
        flow_c,
        t_cs,
        t_cr,
        flow_p,
        t_ret,
        t_sup,
        it_kw,
        x,
        t_hx,
        t_dc,
        t_top,
        t_mid,
        t_bot,
        reading,
    ) = vals
    calc_kw = _heat_kw(flow_c if flow_c > 0.0 else 0.0, t_cs, t_cr, t_cr, c.cust_rho, c.cust_cp)
    if calc_kw < 0.0:
        calc_kw = 0.0  # a heat meter counts heat into the customer only
    it_heat_kw = _heat_kw(flow_p, t_ret, t_sup, t_sup, c.prim_rho, c.prim_cp)
    x /= 100.0
    x = 0.0 if x < 0.0 else 1.0 if x > 1.0 else x  # NaN stays NaN
    t_mix = t_ret if x == 0.0 else x * t_hx + (1.0 - x) * t_ret
    rej_kw = _heat_kw(flow_p, t_mix, t_dc, t_sup, c.prim_rho, c.prim_cp)
    fan = decision.outputs.get("drycooler_fan_cmd")
    fan_v = fan.value if fan is not None else None
    fan_kw = (
        cfg.fan_rated_kw * (min(max(float(fan_v), 0.0), 100.0) / 100.0) ** 3
        if isinstance(fan_v, (int, float)) and not isinstance(fan_v, bool) and fan_v == fan_v
        else _NAN
    )
    if samples.get("drycooler_fault", (None,))[0] is True and "drycooler_fault" not in invalid:
        fan_kw = 0.0  # tripped fans draw nothing
    # a reading far outside any plant (validation's ranges let it through only when a site
    # widens them) is unknown rather than an infinite counter that the store cannot hold
    calc_kw, it_kw, it_heat_kw, rej_kw = (
        p if -POWER_LIMIT_KW < p < POWER_LIMIT_KW else _NAN
        for p in (calc_kw, it_kw, it_heat_kw, rej_kw)
    )
    tank_kj = (
        cfg.tank_volume_m3 / 3.0 * (_h(c.tank_h, t_top) + _h(c.tank_h, t_mid) + _h(c.tank_h, t_bot))
    )
    if not -1e15 < tank_kj < 1e15:  # NaN (a sensor unknown) or beyond any tank
        tank_kj_s: float | None = state.tank_kj
        stored = 0.0
        tank_missing = True
    else:
        stored = 0.0 if state.tank_kj is None else (tank_kj - state.tank_kj) / 3600.0
        tank_kj_s, tank_missing = tank_kj, False
    ready_s = samples.get("customer_ready")
    ready_ok = ready_s is not None and ready_s[1] is _GOOD and "customer_ready" not in invalid
    ready = ready_s[0] if ready_s is not None else None
    delivering_low = flow_c > DELIVERING_M3H and t_cs - t_cr < cfg.meter_dt_min_k  # NaN: False

    w = _W(state, cfg, c, now)
    first = state.cursor_wall is None
    if first:
        w.cursor = wall_s
        w.open_start = wall_s - wall_s % iv
        w.today_start = w.open_start - w.open_start % 86400.0
    dt = None if state.last_now_s is None else now - state.last_now_s
    dt_ok = dt is not None and 0.0 <= dt <= MAX_SCAN_DT_S
    cursor = w.cursor
    assert cursor is not None
    wd = wall_s - cursor
    real_s = 0.0  # seconds that really passed (the meter's allowance grows with them)
    span_s = 0.0  # seconds of this scan accounted by the wall clock
    est_s = 0.0  # seconds the held powers are integrated over
    gap = False
    if first:
        pass
    elif wd < 0.0:  # the wall clock went back: count nothing by it until it passes the cursor
        w.flags |= _F_CLOCK
        if dt_ok:
            real_s = est_s = dt  # type: ignore[assignment]
    elif dt_ok and wd <= dt + CLOCK_TOL_S:  # type: ignore[operator]
        real_s = est_s = span_s = wd
    elif dt_ok:  # the wall clock stepped forward: the skipped time is not accounted
        assert dt is not None
        w.advance(wall_s - dt, 2, None, 0, 0, None, 0.0)
        real_s = est_s = span_s = dt
    else:  # no scan vouches for the time since the last one: the controller was not running
        gap = True
        real_s = wd

    # ---- the totaliser: billing truth ----
    billed = unbilled = 0.0
    # the meter counts only while heat flows to the customer: its allowance grows only with
    # the time flow x dT says heat flowed, or cannot say (unknown, or nobody scanning), so a
    # meter swapped for one reading higher while the loop stood still is a jump, not a sale
    could_count = gap or not (calc_kw <= 0.0) or not (state.prev[0] <= 0.0)
    idle_s = state.meter_idle_s + (real_s if could_count else 0.0)
    rollover = cfg.meter_rollover_kwh
    last = state.meter_kwh
    if not (0.0 <= reading < rollover):  # NaN, bad quality, impossible count: skip it
        w.flags |= _F_INV
    elif last is None:
        w.meter_kwh = reading
        w.flags |= _F_START
        if w.meter_first is None:
            w.meter_first = reading
        w.meter_last = reading
        idle_s = 0.0
    else:
        d = reading - last
        allow = cfg.meter_max_kw * idle_s / 3600.0 + RESOLUTION_KWH
        kind = ""
        if d > 0.0:
            if d <= allow:
                billed = d
            else:
                unbilled, kind = d, "meter_jump"
        elif d < -RESOLUTION_KWH:
            wrapped = rollover - last + reading
            if wrapped <= allow:
                billed, kind = wrapped, "meter_rollover"
            else:
                kind = "meter_replaced"
        else:
            d = 0.0  # unchanged, or back by less than the resolution: keep the higher count
        if d != 0.0:
            w.meter_kwh = w.meter_last = reading
            idle_s = 0.0
        if kind:
            w.flags |= _FLAG_BIT[kind]
            w.events.append(
                Event(
                    kind,
                    now,
                    SOURCE,
                    {
                        "from_kwh": last,
                        "to_kwh": reading,
                        "step_kwh": reading - last,
                        "allowed_kwh": allow,
                        "billed_kwh": billed,
                    },
                )
            )
            if kind != "meter_rollover":
                what = "jumped" if kind == "meter_jump" else "went backwards (meter replaced?)"
                # the interval holding the reading (the one the span ends in), and the next
                read_in = max(w.open_start or 0.0, (math.ceil(wall_s / iv) - 1) * iv)
                w.alarms[0] = (
                    read_in + 2 * iv,
                    f"totaliser {what}: {last:.3f} -> {reading:.3f} kWh, allowed step "
                    f"{allow:.3f} kWh; not billed, counted again from {reading:.3f}",
                )

    # ---- this scan's class, then the seconds ----
    cls, detail = _cause(decision, commands, ready, ready_ok)
    low_run = state.low_run_s + span_s if delivering_low else 0.0
    if low_run > LOW_DT_ALARM_S:
        w.flags |= _F_LOW
    readings = (billed, unbilled, stored)
    credited = False  # the billed step is already in an interruption's delivered_during
    if gap:
        w.classify("fault", GAP_DETAIL, cursor)
        it = w.interruption
        if it is not None and billed:  # what the customer got while nobody was scanning
            w.interruption = (it[0], it[1], it[2], it[3], it[4], it[5] + billed)
            credited = True
        if wd > MAX_GAP_INTERVALS * iv:  # beyond, the gap is skipped rather than covered
            w.advance(cursor + MAX_GAP_INTERVALS * iv, 1, None, 0, 0, None, 0.0)
            w.advance(wall_s, 2, None, 0, 0, readings, 0.0)
        elif wd > 0.0:
            w.advance(wall_s, 1, None, 0, 0, readings, 0.0)
        else:
            w.add_readings(readings)
        w.classify(cls, detail, wall_s)
        low_run = 0.0
    else:
        energies: tuple[float, ...] | None = None
        if est_s > 0.0:
            h = est_s / 3600.0
            e0, e1, e2, e3, e4 = (k * h for k in state.prev)
            if e0 != e0:
                w.missing |= _M_CALC
                e0 = 0.0
            if e2 != e2 or e3 != e3 or tank_missing:  # the heat balance's own terms
                w.missing |= _M_BAL
            energies = (
                e0,
                0.0 if e1 != e1 else e1,
                0.0 if e2 != e2 else e2,
                0.0 if e3 != e3 else e3,
                0.0 if e4 != e4 else e4,
            )
        start_at = w.cursor
        assert start_at is not None
        w.classify(cls, detail, start_at)
        if span_s > 0.0 and wall_s > start_at:
            if cls is not None:
                cls_i = _CLASS_INDEX[cls]
            else:  # residual: the class of the interruption in progress (classify made one)
                cls_i = _CLASS_INDEX[w.interruption[1]] if w.interruption else _FAULT
            low_s = span_s if delivering_low else 0.0
            w.advance(wall_s, 0, energies, cls_i, _MODE_INDEX[decision.mode], readings, low_s)
            if cls_i == _AVAIL:
                w.ring_add(wall_s, billed, span_s)
        else:  # nothing to account by the wall: the readings still belong to the open interval
            w.add_readings(readings)
            if energies is not None:
                w.add_energies(energies, 1.0)
    it = w.interruption
    if it is not None:
        if cls != "available" and billed and not credited:
            it = (it[0], it[1], it[2], it[3], it[4], it[5] + billed)
            w.interruption = it
        w.irows.append(w.irow(it, None))
    new = w.freeze(
        last_now_s=now,
        meter_idle_s=idle_s,
        prev=(calc_kw, it_kw, it_heat_kw, rej_kw, fan_kw),
        tank_kj=tank_kj_s,
        low_run_s=low_run,
    )
    w.rows.append(w.row(False))
    return new, MeterOut(tuple(w.rows), tuple(w.irows), tuple(w.events), _conditions(new, cfg))


def _conditions(s: MeterState, cfg: MeteringConfig) -> Mapping[str, str]:
    """The METER:* conditions that stand in this state (alarm id -> detail)."""
    start = s.open_start
    if start is None:
        return _NO_CONDITIONS
    tot, cc, bal = s.alarms
    if start >= tot[0] and start >= cc[0] and start >= bal[0] and s.low_run_s <= LOW_DT_ALARM_S:
        return _NO_CONDITIONS
    out: dict[str, str] = {}
    if start < tot[0]:
        out["METER:TOTALISER"] = tot[1]
    if start < cc[0]:
        out["METER:CROSSCHECK"] = cc[1]
    if start < bal[0]:
        out["METER:BALANCE"] = bal[1]
    if s.low_run_s > LOW_DT_ALARM_S:
        out["METER:LOW-DT"] = (
            f"customer dT below the heat meter's rated {cfg.meter_dt_min_k:g} K for more than "
            f"{LOW_DT_ALARM_S:g} s while delivering"
        )
    return out


def _totals(acc: tuple[float, ...] | list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "delivered_kwh": acc[_DEL],
        "unbilled_kwh": acc[_UNB],
        "delivered_calc_kwh": acc[_CALC],
        "rejected_kwh": acc[_REJ],
        "it_energy_kwh": acc[_ITE],
        "it_heat_kwh": acc[_ITH],
        "stored_kwh": acc[_STO],
        "fan_kwh": acc[_FAN],
        "class_s": dict(zip(CLASSES, acc[_CLS0:_MODE0], strict=True)),
    }
    return out


def view(state: MeterState) -> dict[str, Any]:
    """The figures for status, the BMS and the metrics: lifetime and UTC-day totals (closed
    intervals plus the open one), reuse fraction, availability, the meter, the open
    interruption."""
    s = state
    life = tuple(a + b for a, b in zip(s.life, s.acc, strict=True))
    day_closed = s.today
    if s.open_start is not None and s.today_start != s.open_start - s.open_start % 86400.0:
        day_closed = _ZERO  # the open interval began a new day
    today = tuple(a + b for a, b in zip(day_closed, s.acc, strict=True))
    lt, td = _totals(life), _totals(today)
    it = s.interruption
    open_row = None
    if it is not None:
        base, during = it[4], it[5]
        upto = s.cursor_wall if s.cursor_wall is not None else it[3]
        open_row = {
            "id": it[0],
            "cls": it[1],
            "start_wall": it[3],
            "end_wall": None,
            "detail": it[2],
            "baseline_kw": base,
            "delivered_during_kwh": during,
            "lost_kwh": max(0.0, base * max(0.0, upto - it[3]) / 3600.0 - during),
        }
    return {
        "interval_s": s.interval_s,
        "totals": lt,
        "today": td,
        "reuse_fraction": lt["delivered_kwh"] / lt["it_energy_kwh"]
        if lt["it_energy_kwh"] > 0
        else None,
        "availability_pct": availability_pct(lt["class_s"]),
        "availability_today_pct": availability_pct(td["class_s"]),
        "meter_kwh": s.meter_kwh,
        "open_interruption": open_row,
    }


# ---- the state as JSON (the state store keeps it under "meter") ----

_FLOAT_OR_NONE = (
    "cursor_wall",
    "last_now_s",
    "open_start",
    "meter_first",
    "meter_last",
    "today_start",
    "meter_kwh",
    "tank_kj",
    "bal_start",
)
_FLOATS = ("meter_idle_s", "low_run_s", "last_baseline_kw")
_INTS = ("interval_s", "flags", "missing", "next_id", "ring_idx")
_TUPLES = {"acc": N_ACC, "life": N_ACC, "today": N_ACC, "bal": 5, "ring": 2 * RING}


def _j(x: float) -> float | None:
    return x if x == x else None  # NaN (unknown) as null


def state_to_json(s: MeterState) -> dict[str, Any]:
    """The state as JSON-able data (finite floats, None for unknown), exact on the way back."""
    d: dict[str, Any] = {"version": STATE_VERSION}
    for k in (*_FLOAT_OR_NONE, *_FLOATS, *_INTS, "bal_missing"):
        d[k] = getattr(s, k)
    for k in _TUPLES:
        d[k] = list(getattr(s, k))
    d["prev"] = [_j(x) for x in s.prev]
    d["alarms"] = [[_j(u) if u != -math.inf else None, t] for u, t in s.alarms]
    d["interruption"] = None if s.interruption is None else list(s.interruption)
    return d


def _bad(part: str, v: object, want: str) -> ValueError:
    return ValueError(f"meter state {part}: {str(v)[:60]!r}: expected {want}")


def _float(part: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(part, v, "a finite number")
    return float(v)


def state_from_json(cfg: MeteringConfig, d: object) -> MeterState:
    """The state `state_to_json` wrote; ValueError naming the part for anything malformed."""
    if not isinstance(d, Mapping):
        raise _bad("", d, "an object")
    if d.get("version") != STATE_VERSION:
        raise _bad("version", d.get("version"), f"{STATE_VERSION}")
    kw: dict[str, Any] = {}
    for k in _FLOAT_OR_NONE:
        v = d.get(k)
        kw[k] = None if v is None else _float(k, v)
    for k in _FLOATS:
        kw[k] = _float(k, d.get(k))
    for k in _INTS:
        v = d.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _bad(k, v, "a whole number >= 0")
        kw[k] = v
    if kw["next_id"] < 1:
        raise _bad("next_id", kw["next_id"], "a whole number >= 1")
    if not isinstance(d.get("bal_missing"), bool):
        raise _bad("bal_missing", d.get("bal_missing"), "true or false")
    kw["bal_missing"] = d["bal_missing"]
    for k, n in _TUPLES.items():
        v = d.get(k)
        if not isinstance(v, list) or len(v) != n:
            raise _bad(k, v, f"a list of {n} numbers")
        kw[k] = tuple(_float(f"{k}[{i}]", x) for i, x in enumerate(v))
    prev = d.get("prev")
    if not isinstance(prev, list) or len(prev) != 5:
        raise _bad("prev", prev, "a list of 5 numbers or nulls")
    kw["prev"] = tuple(_NAN if x is None else _float(f"prev[{i}]", x) for i, x in enumerate(prev))
    alarms = d.get("alarms")
    if not isinstance(alarms, list) or len(alarms) != 3:
        raise _bad("alarms", alarms, "3 [until, detail] pairs")
    al = []
    for i, a in enumerate(alarms):
        if not (isinstance(a, list) and len(a) == 2 and isinstance(a[1], str)):
            raise _bad(f"alarms[{i}]", a, "[until or null, detail]")
        al.append((-math.inf if a[0] is None else _float(f"alarms[{i}]", a[0]), a[1]))
    kw["alarms"] = tuple(al)
    it = d.get("interruption")
    if it is None:
        kw["interruption"] = None
    else:
        if not (
            isinstance(it, list)
            and len(it) == 6
            and isinstance(it[0], int)
            and not isinstance(it[0], bool)
            and it[1] in INTERRUPTION_CLASSES
            and isinstance(it[2], str)
        ):
            raise _bad("interruption", it, "[id, class, detail, start, baseline kW, kWh]")
        if it[0] >= kw["next_id"]:
            raise _bad("interruption", it, f"an id below next_id {kw['next_id']}")
        kw["interruption"] = (
            it[0],
            it[1],
            it[2],
            _float("interruption start", it[3]),
            _float("interruption baseline", it[4]),
            _float("interruption delivered", it[5]),
        )
    if (kw["cursor_wall"] is None) != (kw["open_start"] is None):
        raise _bad("open_start", kw["open_start"], "present exactly when cursor_wall is")
    if kw["flags"] >= 1 << len(FLAGS) or kw["missing"] > _M_CALC | _M_BAL:
        raise _bad("flags", kw["flags"], f"bits of the {len(FLAGS)} flags")
    if kw["interval_s"] != cfg.interval_s:
        raise _bad(
            "interval_s",
            kw["interval_s"],
            f"the site's [metering] interval_s {cfg.interval_s} (it changed: the intervals "
            "already stored are of the old length)",
        )
    if kw["open_start"] is not None and kw["open_start"] % cfg.interval_s:
        raise _bad("open_start", kw["open_start"], f"a multiple of interval_s {cfg.interval_s}")
    return MeterState(**kw)
