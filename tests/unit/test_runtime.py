"""The scan loop over the in-memory PLC, on a fake clock: safe values at start and stop (guarded),
the heartbeat, comms loss, write failures as supervisor input, failures that degrade instead of
ending the process, the order write → persist → log, and journalled trips across a restart."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from controller.journal import Journal, JournalKeeper, read_meter
from controller.modes import Mode
from controller.runtime import Controller, guarded_safe_outputs, inline
from controller.supervisor import SupervisorConfig
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.site import Site
from plc_io.tags import Value
from plc_io.transport import WriteResult
from tests.unit.core_helpers import HEALTHY, SITE

PERIOD_S = SITE.scan.period_s
WALL0 = 1.8e9  # a wall-clock time in 2027
# short dwells so reuse is reached in a few fake seconds
QUICK = SITE.with_control(
    customer_ready_dwell_s=0.0, reject_dwell_s=1.0, min_mode_dwell_s=1.0, reuse_reentry_min_s=0.0
)
ISOLATED = {"secondary_pump_cmd": False, "reuse_isolation_cmd": False}


class FakeClock:
    """A monotonic clock that moves only when `run_for` moves it (trio's MockClock, by hand).

    `sleep` parks the caller until the clock reaches its deadline; `run_for` lets every runnable
    task run, then jumps to the earliest deadline, and so on up to the end of the span.
    """

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(0.0, dt), self._seq, fut))
        self._seq += 1
        await fut

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def run_for(self, dt: float) -> None:
        end = self.t + dt
        while True:
            await self.settle()
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            at, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, at)
            if not fut.done():
                fut.set_result(None)
        self.t = end
        await self.settle()


class Trace:
    """One ordered record of what the scan did: writes, persists, log lines."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, what: str, name: str, detail: Mapping[str, Any]) -> None:
        self.items.append((what, name, dict(detail)))

    def of(self, what: str, name: str | None = None) -> list[dict[str, Any]]:
        return [d for w, n, d in self.items if w == what and (name is None or n == name)]

    def index(self, what: str, pred: Any = lambda n, d: True) -> int:
        for i, (w, n, d) in enumerate(self.items):
            if w == what and pred(n, d):
                return i
        raise AssertionError(f"no {what} matching in {self.items}")


class TraceLog:
    """A logger that records every call into a Trace (stands in for structlog)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **kw: Any) -> None:
            self.trace.add("log", event, kw)

        return log


class TracedTransport(MemoryTransport):
    """The in-memory transport, noting each write pass (and what the caller passed) in a Trace."""

    def __init__(self, site: Site, plc: MemoryPlc, trace: Trace, clock: FakeClock) -> None:
        super().__init__(site, plc, clock=clock, sleep=clock.sleep)
        self.trace = trace
        self.passed: list[dict[str, Value]] = []

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        self.passed.append(dict(values))
        result = await super().write_outputs(values)
        self.trace.add("write", "outputs", {**values, "_failed": dict(result.failed)})
        return result


def plant_ok(plc: MemoryPlc) -> None:
    plc.set_many({k: v for k, v in HEALTHY.items() if k in plc.measured()})


def wiggle(plc: MemoryPlc, clock: FakeClock) -> None:
    """A live sensor is never perfectly still (a flat line is a frozen sensor)."""
    plc.set("it_supply_temp", 35.0 + 0.02 * (int(clock() / PERIOD_S) % 2))
    plc.set("it_return_temp", 45.0 + 0.02 * (int(clock() / PERIOD_S) % 2))


class Rig:
    """A controller, its in-memory PLC and a fake clock, driven scan by scan or as a service."""

    def __init__(
        self,
        site: Site = QUICK,
        *,
        clock: FakeClock | None = None,
        journal: JournalKeeper | None = None,
        plc: MemoryPlc | None = None,
        trace: Trace | None = None,
        wall0: float = WALL0,
        metering: bool = True,
    ) -> None:
        self.clock = clock or FakeClock()
        self.wall0 = wall0  # the wall clock runs with the fake monotonic one, offset
        self.trace = trace or Trace()
        self.plc = plc or MemoryPlc(site, clock=self.clock)
        plant_ok(self.plc)
        self.transport = TracedTransport(site, self.plc, self.trace, self.clock)
        self.ctl = Controller(
            site,
            self.transport,
            journal=journal,
            clock=self.clock,
            wall=self.wall,
            sleep=self.clock.sleep,
            offload=inline,
            log=TraceLog(self.trace),
            metering=metering,
        )

    def wall(self) -> float:
        return self.wall0 + self.clock()

    async def scans(self, n: int) -> None:
        await self.ctl.transport.connect()
        for _ in range(n):
            wiggle(self.plc, self.clock)
            await self.ctl.scan_once()
            self.clock.t += PERIOD_S
            await asyncio.sleep(0)  # the loop idles between scans, as in the service

    async def until_mode(self, mode: Mode, max_scans: int = 200) -> None:
        for _ in range(max_scans):
            await self.scans(1)
            if self.ctl.supervisor.mode is mode:
                return
        raise AssertionError(f"not {mode} after {max_scans} scans: {self.ctl.supervisor.mode}")

    def events(self, kind: str) -> list[dict[str, Any]]:
        return self.trace.of("log", kind)


def keeper(path: Path, clock: FakeClock, **kw: Any) -> JournalKeeper:
    return JournalKeeper(path, clock=clock, **kw)


# ---- the loop on a fake clock ----


async def test_service_writes_guarded_safe_values_first_and_last_and_beats_every_scan() -> None:
    rig = Rig(SITE)
    plc, clock = rig.plc, rig.clock
    plc.set_many({"reuse_valve_cmd": 55.0, "drycooler_fan_cmd": 0.0})  # stale commands in the PLC
    stop = asyncio.Event()
    task = asyncio.create_task(rig.ctl.run(stop))
    beats: list[Value] = []
    for _ in range(12):
        wiggle(plc, clock)
        await clock.run_for(PERIOD_S)
        beats.append(plc.values["heartbeat"])
    stop.set()
    await clock.run_for(PERIOD_S)
    await task
    safe = {k: v for k, v in rig.ctl.safe_values().items()}
    first, last = rig.transport.passed[0], rig.transport.passed[-1]
    assert first == safe and last == safe  # the start-up and the farewell write
    assert plc.commanded() | {"heartbeat": 0} == SITE.safe_outputs() | {"heartbeat": 0}
    # one beat per scan: a new value every period, never the same twice in a row
    assert all(a != b for a, b in itertools.pairwise(beats)), beats
    # the scan count follows the period on the fake clock (one at t0, one per period after)
    assert rig.ctl.status.scans in (12, 13) and rig.ctl.status.overruns == 0


async def test_the_runtime_never_sends_a_heartbeat_of_its_own() -> None:
    """One counter, in the transport: the runtime passes no `heartbeat`, so a pass the transport
    withholds the beat for can never be overridden by a runtime-made one."""
    rig = Rig()
    await rig.scans(5)
    assert rig.transport.passed and all("heartbeat" not in v for v in rig.transport.passed)
    beats = {w["heartbeat"] for w in rig.plc.write_log if "heartbeat" in w}
    assert len(beats) == 5


async def test_the_heartbeat_wraps_within_its_tags_range() -> None:
    """The counter the PLC sees goes 0 … range high, 0 …: never outside the declared range."""
    hi = 300.0
    tags = tuple(
        t.model_copy(update={"range": (0.0, hi)}) if t.name == "heartbeat" else t
        for t in QUICK.tags
    )
    rig = Rig(QUICK.model_copy(update={"tags": tags}))
    await rig.scans(int(2.5 * (hi + 1)))
    beats = [float(w["heartbeat"]) for w in rig.plc.write_log if "heartbeat" in w]
    assert max(beats) == hi and min(beats) == 0.0
    assert all(a != b for a, b in itertools.pairwise(beats))


async def test_slow_plc_overruns_are_counted_and_no_scan_is_skipped() -> None:
    rig = Rig(SITE)
    slow_s = 0.8 * SITE.plc.timeout_s  # each request: slow, not dead
    assert slow_s > PERIOD_S  # so every scan is longer than a period
    rig.plc.inject("comms_slow", "", slow_s)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.ctl.run(stop))
    span_s = 40 * PERIOD_S
    await rig.clock.run_for(span_s)
    stop.set()
    await rig.clock.run_for(10 * slow_s)
    await task
    st = rig.ctl.status
    assert st.overruns >= st.scans - 2 > 0  # every scan late (the first and last may not be)
    assert st.overruns == len(rig.events("scan_overrun"))  # each one logged
    # back to back, none skipped: each scan is at least one slow read pass long
    assert st.scans <= span_s / slow_s + 2


async def test_comms_loss_marks_inputs_writes_nothing_and_resumes_in_reject() -> None:
    rig = Rig(SITE)
    plc = rig.plc
    await rig.scans(3)
    assert rig.ctl.supervisor.mode is Mode.DRY_COOLER_REJECT
    plc.stop()
    writes = len(plc.write_log)
    await rig.scans(1)
    d = rig.ctl.status.decision
    assert d is not None and "IL-08" in d.active
    assert rig.ctl.status.image["it_supply_temp"].quality.value == "comms_lost"
    assert len(plc.write_log) == writes  # nothing can be written, no heartbeat either
    plc.start()
    # the transport's reconnect back-off is bounded by reconnect_max_s
    for _ in range(int(4 * SITE.plc.reconnect_max_s / PERIOD_S)):
        await rig.scans(1)
        d = rig.ctl.status.decision
        if d is not None and "IL-08" not in d.active:
            break
    assert d is not None and "IL-08" not in d.active and d.mode is Mode.DRY_COOLER_REJECT


async def test_outputs_resent_while_the_plc_watchdog_holds_its_safe_state() -> None:
    """The PLC releases its safe hold only on fresh commands; unchanged outputs must be sent."""
    rig = Rig(SITE)
    plc = rig.plc
    await rig.scans(3)
    n = len(plc.write_log)
    await rig.scans(1)
    steady = {k for w in plc.write_log[n:] for k in w}
    assert "heartbeat" in steady and "reuse_isolation_cmd" not in steady  # changed ones only
    plc.set("plc_watchdog_tripped", True)
    n = len(plc.write_log)
    await rig.scans(1)
    assert {k for w in plc.write_log[n:] for k in w} == {t.name for t in SITE.outputs}


# ---- safe values pass through the guard ----


def unsafe_site() -> Site:
    """Safe values with no cooling path: fans stopped, both primary pumps off."""
    bad = {"drycooler_fan_cmd": 0.0, "primary_pump_a_cmd": False, "primary_pump_b_cmd": False}
    tags = tuple(
        t.model_copy(update={"safe": bad[t.name]}) if t.name in bad else t for t in QUICK.tags
    )
    return QUICK.model_copy(update={"tags": tags})


async def test_start_and_stop_never_write_safe_values_the_guard_refuses() -> None:
    site = unsafe_site()
    rig = Rig(site)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.ctl.run(stop))
    await rig.clock.run_for(2 * PERIOD_S)
    stop.set()
    await rig.clock.run_for(PERIOD_S)
    await task
    cfg = SupervisorConfig.from_site(site)
    _, corrected = guarded_safe_outputs(cfg)
    assert corrected  # the guard does refuse this set...
    assert rig.events("safe_values_corrected")[0]["blocked"] == corrected  # ...and says so
    for values in (rig.transport.passed[0], rig.transport.passed[-1]):  # start-up, farewell
        assert values["primary_pump_a_cmd"] or values["primary_pump_b_cmd"]
        assert values["drycooler_fan_cmd"] >= cfg.sequence.fan_min_pct
    assert plc_cools(rig.plc.commanded(), cfg)


def plc_cools(out: Mapping[str, Value], cfg: SupervisorConfig) -> bool:
    pump = bool(out["primary_pump_a_cmd"]) or bool(out["primary_pump_b_cmd"])
    return pump and float(out["drycooler_fan_cmd"]) >= cfg.sequence.fan_min_pct


# ---- unacknowledged writes are an input to the next step, logged once per cause ----


async def test_refused_writes_reject_reuse_next_scan_and_are_logged_once_per_cause() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    rig.plc.inject("comms_error", "secondary_pump_cmd", 4)  # the coil block is refused
    rig.plc.set("plc_watchdog_tripped", True)  # every output is due again, coils included
    await rig.scans(1)
    failed = rig.ctl.status.write_failed
    assert "secondary_pump_cmd" in failed or "customer_isolation_cmd" in failed, failed
    await rig.scans(1)  # the next step sees them
    d = rig.ctl.status.decision
    assert d is not None
    assert any(r.startswith("outputs not acknowledged") for r in d.reject_reasons)
    await rig.scans(40)
    assert len(rig.events("write_failed")) == 1  # once per cause, not every scan
    assert rig.ctl.supervisor.mode is Mode.DRY_COOLER_REJECT
    rig.plc.clear("comms_error", "secondary_pump_cmd")
    rig.plc.set("plc_watchdog_tripped", False)
    await rig.scans(40)
    assert len(rig.events("write_recovered")) == 1 and len(rig.events("write_failed")) == 1
    assert not rig.ctl.status.write_failed


# ---- an exception in the step or the journal degrades, never ends the scan ----


async def test_a_step_that_raises_writes_guarded_safe_values_and_the_loop_goes_on() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    assert rig.plc.commanded()["reuse_isolation_cmd"] is True
    real_step = rig.ctl.supervisor.step

    def broken(*a: Any, **kw: Any) -> Any:
        raise TypeError("unsupported operand type(s) for -: 'str' and 'float'")

    rig.ctl.supervisor.step = broken  # type: ignore[method-assign]
    beats = rig.plc.values["heartbeat"]
    await rig.scans(20)
    want = rig.ctl.safe_values()
    assert {k: rig.plc.commanded()[k] for k in want} == want  # guarded safe values at the PLC
    assert rig.plc.values["heartbeat"] != beats  # safe writes arrive: the beat goes on
    assert len(rig.events("step_failed")) == 1  # an alarm once, not every scan
    d = rig.ctl.status.decision
    assert d is not None and d.reject_reasons[0].startswith("decision step failed")

    rig.ctl.supervisor.step = real_step  # type: ignore[method-assign]
    await rig.scans(1)
    assert len(rig.events("step_recovered")) == 1
    d = rig.ctl.status.decision
    assert d is not None and any(r.startswith("decision step failed") for r in d.reject_reasons)
    assert rig.events("degraded")  # the supervisor raised its alarm too
    assert d.mode is not Mode.NORMAL_REUSE  # back only after the mode machine's own dwell


async def test_a_non_numeric_manual_value_never_ends_the_scan() -> None:
    rig = Rig()
    await rig.scans(3)
    rig.ctl.force("reuse_valve_cmd", "abc", 600.0, "engineer")
    await rig.scans(5)
    assert rig.ctl.status.scans == 8
    assert isinstance(rig.plc.commanded()["reuse_valve_cmd"], float)  # never the string


class FlakyJournal(Journal):
    """A store whose commit fails (a full disk, a failing fsync) while `broken` is set."""

    broken = False
    commits = 0

    def __init__(self, path: Path) -> None:
        super().__init__(path, before_commit=self._commit)

    def _commit(self) -> None:
        if FlakyJournal.broken:
            raise sqlite3.OperationalError("disk I/O error")
        FlakyJournal.commits += 1


async def test_journal_that_cannot_commit_degrades_queues_events_and_catches_up(
    tmp_path: Path,
) -> None:
    FlakyJournal.broken, FlakyJournal.commits = False, 0
    clock = FakeClock()
    journal = keeper(tmp_path / "heatloop.db", clock, opener=FlakyJournal, retry_max_s=4.0)
    rig = Rig(clock=clock, journal=journal)
    await rig.until_mode(Mode.NORMAL_REUSE)
    FlakyJournal.broken = True
    rig.plc.set("leak_reuse", True)  # a latching trip while nothing can be persisted
    await rig.scans(1)
    assert rig.ctl.supervisor.mode is Mode.LEAK_TRIP
    assert rig.plc.commanded()["reuse_isolation_cmd"] is False  # outputs went out regardless
    assert journal.problem and "disk I/O error" in journal.problem
    await rig.scans(20)
    d = rig.ctl.status.decision
    assert d is not None and journal.problem in d.reject_reasons
    assert rig.events("degraded") and rig.ctl.status.scans > 20
    assert any(r[1] == "trip_latched" for r in journal.pending)  # kept in memory

    # the leak dries and is reset while the latch cannot be persisted: still no reuse
    rig.plc.set("leak_reuse", False)
    rig.ctl.reset_trip()
    await rig.scans(int(3 * QUICK.control.reject_dwell_s / PERIOD_S) + 10)
    assert rig.ctl.supervisor.mode is Mode.DRY_COOLER_REJECT

    FlakyJournal.broken = False
    await rig.scans(int(2 * journal.retry_max_s / PERIOD_S))
    assert journal.problem is None and not journal.pending
    assert rig.events("degraded_cleared")
    kinds = [k for _, k, _, _ in journal.events(200)]
    assert "trip_latched" in kinds and "trip_reset" in kinds  # nothing lost
    await rig.until_mode(Mode.NORMAL_REUSE)


async def test_journal_path_that_is_a_directory_starts_degraded_and_scans_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "heatloop.db"
    path.mkdir()
    clock = FakeClock()
    journal = keeper(path, clock)
    assert journal.latched() is None and journal.problem
    rig = Rig(clock=clock, journal=journal)
    assert rig.events("journal_unreadable")
    await rig.scans(int(3 * QUICK.control.reject_dwell_s / PERIOD_S) + 10)
    d = rig.ctl.status.decision
    assert d is not None and d.mode is Mode.DRY_COOLER_REJECT  # latches unknown: no reuse
    assert journal.problem in d.reject_reasons
    beats = {w["heartbeat"] for w in rig.plc.write_log if "heartbeat" in w}
    assert len(beats) > 10  # the controller is in charge (writes arrive, the beat goes on)


async def test_read_only_and_corrupt_journals_start_degraded(tmp_path: Path) -> None:
    good = tmp_path / "ro.db"
    Journal(good).close()

    def read_only(path: Path) -> Journal:
        j = Journal.__new__(Journal)
        j.path, j.before_commit = path, None
        j.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        return j

    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database, just garbage\x00" * 100)
    for path, opener in ((good, read_only), (corrupt, Journal)):
        clock = FakeClock()
        j = keeper(path, clock, opener=opener)
        rig = Rig(clock=clock, journal=j)
        await rig.scans(10)
        d = rig.ctl.status.decision
        assert d is not None and j.problem is not None and j.problem in d.reject_reasons
        assert rig.ctl.status.scans == 10


async def test_latches_in_a_journal_that_opens_late_are_restored_never_deleted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "heatloop.db"
    j = Journal(path)
    j.write([], frozenset({"IL-04"}))
    j.close()
    tries = {"n": 0}

    def late(p: Path) -> Journal:
        tries["n"] += 1
        if tries["n"] <= 2:
            raise sqlite3.OperationalError("unable to open database file")
        return Journal(p)

    clock = FakeClock()
    journal = keeper(path, clock, opener=late, retry_min_s=1.0)
    rig = Rig(clock=clock, journal=journal)
    assert journal.latched() is None
    await rig.scans(int(10 / PERIOD_S))
    assert rig.events("trip_restored")
    assert rig.ctl.supervisor.mode is Mode.LEAK_TRIP
    assert rig.plc.commanded()["reuse_isolation_cmd"] is False
    again = Journal(path)
    assert again.latched() == {"IL-04"}
    again.close()


async def test_leak_trip_survives_a_restart_through_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    clock = FakeClock()
    rig = Rig(SITE, clock=clock, journal=keeper(path, clock))
    await rig.scans(2)
    rig.plc.set("leak_reuse", True)
    await rig.scans(1)
    assert rig.ctl.supervisor.mode is Mode.LEAK_TRIP
    assert rig.plc.values["reuse_isolation_cmd"] is False
    assert rig.ctl.journal is not None
    rig.ctl.journal.close()  # the process dies here; the trip was on disk before it was told

    journal = keeper(path, clock)
    rig = Rig(SITE, clock=clock, journal=journal, plc=rig.plc)
    rig.plc.set("leak_reuse", False)
    await rig.scans(3)
    assert rig.ctl.supervisor.mode is Mode.LEAK_TRIP  # dry, but no reset yet
    rig.ctl.reset_trip()
    await rig.scans(1)
    d = rig.ctl.status.decision
    assert d is not None and d.mode is Mode.DRY_COOLER_REJECT and not d.latched
    assert journal.latched() == frozenset()
    kinds = [k for _, k, _, _ in journal.events(50)]
    assert "trip_latched" in kinds and "trip_reset" in kinds
    journal.close()


# ---- outputs first, then the journal, then everyone else ----


async def test_tripping_scan_writes_outputs_then_persists_then_logs(tmp_path: Path) -> None:
    trace = Trace()

    def opener(path: Path) -> Journal:
        return Journal(path, before_commit=lambda: trace.add("persist", "commit", {}))

    clock = FakeClock()
    rig = Rig(
        clock=clock, journal=keeper(tmp_path / "heatloop.db", clock, opener=opener), trace=trace
    )
    await rig.until_mode(Mode.NORMAL_REUSE)
    del trace.items[:]
    rig.plc.set("leak_reuse", True)
    await rig.scans(1)
    isolate = trace.index("write", lambda n, d: d.get("reuse_isolation_cmd") is False)
    persist = trace.index("persist")
    told = trace.index("log", lambda n, d: n == "trip_latched")
    assert isolate < persist < told, trace.items


async def test_a_hung_journal_never_holds_back_the_outputs_and_is_a_degraded_state(
    tmp_path: Path,
) -> None:
    """The commit hangs (stalled storage): the trip's outputs go out, the scans go on, nobody
    is told of the trip until it is on disk, and past watchdog_s the journal is degraded."""
    hold = {"on": False}
    release = threading.Event()

    def opener(path: Path) -> Journal:
        return Journal(path, before_commit=lambda: hold["on"] and release.wait(30.0) and None)

    clock = FakeClock()
    journal = keeper(tmp_path / "heatloop.db", clock, opener=opener)
    rig = Rig(clock=clock, journal=journal)
    rig.ctl.offload = asyncio.to_thread  # a real worker thread, as in production
    await rig.until_mode(Mode.NORMAL_REUSE)
    while rig.ctl.journal_busy:  # the trip starts with the store idle (the meter's rows go
        await asyncio.sleep(0.005)  # with every scan: let the last of them land first)
    hold["on"] = True
    rig.plc.set("leak_reuse", True)
    await rig.scans(1)
    assert rig.plc.commanded()["reuse_isolation_cmd"] is False  # out, though the commit hangs
    assert rig.ctl.journal_busy  # the trip's own commit hangs
    beats = rig.plc.values["heartbeat"]
    await rig.scans(int(rig.ctl.stall_s / PERIOD_S) - 1)  # slow, not yet stalled
    assert rig.plc.values["heartbeat"] != beats  # still in charge of the PLC
    assert not rig.events("trip_latched")  # not told before the journal has it
    assert all(e.kind != "trip_latched" for e in rig.ctl.status.told)  # nor published
    await rig.scans(4)  # past watchdog_s: a stalled journal
    d = rig.ctl.status.decision
    assert d is not None and any(r.startswith("journal stalled") for r in d.reject_reasons)
    await rig.scans(1)
    # stalled: what waits in memory is told now (an alarm nobody sees helps no one)
    assert len(rig.events("trip_latched")) == 1 and rig.events("degraded")

    hold["on"] = False
    release.set()
    for _ in range(500):  # generous: a loaded machine may make each commit slow
        await asyncio.sleep(0.01)  # the worker thread finishes the commit
        await rig.scans(1)
        if rig.events("degraded_cleared") and not rig.ctl.journal_busy:
            break
    assert rig.events("degraded_cleared")
    assert len(rig.events("trip_latched")) == 1  # told once, never twice
    kinds = [k for _, k, _, _ in journal.events(100)]
    assert kinds.count("trip_latched") == 1 and "degraded" in kinds  # and all on disk


async def test_a_journal_hand_off_that_raises_is_a_degraded_state_and_is_retried(
    tmp_path: Path,
) -> None:
    """The hand-off to the journal's worker itself raises (no thread can be started): the scan
    still completes and is published, the journal is degraded (reuse rejected) and the trip's
    events and latch are kept and persisted once the hand-off works again."""
    clock = FakeClock()
    journal = keeper(tmp_path / "heatloop.db", clock)
    rig = Rig(clock=clock, journal=journal)
    await rig.until_mode(Mode.NORMAL_REUSE)
    broken = {"on": True}

    async def offload(fn: Any) -> Any:
        if broken["on"]:
            raise RuntimeError("can't start new thread")
        return fn()

    rig.ctl.offload = offload
    scans = rig.ctl.status.scans
    rig.plc.set("leak_reuse", True)
    await rig.scans(5)
    assert rig.plc.commanded()["reuse_isolation_cmd"] is False
    assert rig.ctl.status.scans == scans + 5  # every scan completed and was published
    d = rig.ctl.status.decision
    assert d is not None and any("can't start new thread" in r for r in d.reject_reasons)
    assert len(rig.events("trip_latched")) == 1  # told once, as for a store that fails

    broken["on"] = False
    await rig.scans(2)
    assert journal.latched() == frozenset({"IL-04"})
    kinds = [k for _, k, _, _ in journal.events(200)]
    assert kinds.count("trip_latched") == 1 and "degraded" in kinds
    d = rig.ctl.status.decision
    assert d is not None and not any("can't start" in r for r in d.reject_reasons)


async def test_every_supervisor_event_is_logged_in_the_scan_that_raised_it() -> None:
    rig = Rig()
    seen: set[str] = set()
    for i in range(30):
        if i == 10:
            rig.plc.set("tank_top_temp", float("nan"))  # a point turns invalid
        if i == 20:
            rig.plc.set("tank_top_temp", 45.0)
        n = len(rig.trace.items)
        await rig.scans(1)
        d = rig.ctl.status.decision
        assert d is not None
        logged = [name for w, name, _ in rig.trace.items[n:] if w == "log"]
        want = [e.kind for e in d.events if e.kind not in ("write_failed", "write_recovered")]
        assert [k for k in logged if k in want] == want
        seen |= set(want)
    assert "mode_changed" in seen


# ---- the meter in the scan ----


async def test_the_meters_rows_go_with_the_scans_commit_and_a_restart_bills_on(
    tmp_path: Path,
) -> None:
    """The meter's open interval is on disk after each scan; a controller started again on
    the same store carries on from its memory, billing the totaliser's count in between."""
    clock = FakeClock()
    path = tmp_path / "heatloop.db"
    rig = Rig(clock=clock, journal=keeper(path, clock))
    rig.plc.set("heat_meter_energy", 1000.0)
    await rig.until_mode(Mode.NORMAL_REUSE)
    for kwh in (1000.1, 1000.2, 1000.3):  # 0.1 kWh a second: 360 kW, a real meter's pace
        rig.plc.set("heat_meter_energy", kwh)
        await rig.scans(4)
    stored = read_meter(path, 0.0, 4e9)
    assert sum(r["delivered_kwh"] for r in stored.intervals) == pytest.approx(0.3)
    await rig.ctl.close_journal()
    # down for a few seconds while the meter counts on, then started again
    clock.t += 5.0
    again = Rig(clock=clock, journal=keeper(path, clock), plc=rig.plc)
    again.plc.set("heat_meter_energy", 1000.6)  # the new rig set a healthy plant: meter too
    await again.scans(4)
    meter = again.ctl.meter_view()
    assert meter is not None and meter["totals"]["delivered_kwh"] == pytest.approx(0.6)
    await again.ctl.close_journal()
    stored = read_meter(path, 0.0, 4e9)
    assert sum(r["delivered_kwh"] for r in stored.intervals) == pytest.approx(0.6)


async def test_a_meter_that_fails_never_stops_the_scan_or_its_outputs() -> None:
    rig = Rig()
    await rig.until_mode(Mode.NORMAL_REUSE)
    rig.ctl.meter = "not a meter state"  # type: ignore[assignment]  # step raises on it
    rig.plc.set("leak_reuse", True)
    await rig.scans(2)
    assert rig.plc.commanded()["reuse_isolation_cmd"] is False  # the trip still acts
    assert rig.ctl.supervisor.mode is Mode.LEAK_TRIP
    assert any(n == "scan_error" and d.get("where") == "metering" for _, n, d in rig.trace.items)
