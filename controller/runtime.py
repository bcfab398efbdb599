"""The scan loop: read, step, write, persist, then log and publish (DESIGN §4).

One `asyncio.TaskGroup` holds the scan and the event-loop lag monitor; they live and die
together. If the process dies, the heartbeat stops and the PLC watchdog takes the plant to its
safe state, by design. An overrun (a scan longer than its period) is logged and counted, and the
next scan starts at once rather than being skipped.

Theory of operation.

- Safe values. The site's safe values pass through the same guard as every scan
  (`controller.arbitration.guard`) once, at construction; the start-up write, the shutdown write
  and every degraded scan write that guarded set. A set the guard corrects is logged
  (`safe_values_corrected`); it is never written uncorrected.
- Order inside a scan: outputs first, then the journal, then everybody else (log lines, the
  console, the BMS link through `scan_hooks`, which only wakes the link's own task: the BMS
  server process is never awaited by a scan). The journal's fsync can take a long time on slow
  storage; it must never delay an interlock's outputs. Nobody is told of an event before the
  journal has had it (on disk, or in its bounded queue while the store is failing, which is a
  degraded state). A kill -9 between the write and the persist loses the journal rows of that
  one scan: the PLC already holds the trip's outputs, its watchdog then drives the plant to the
  safe values (which isolate the reuse circuit as a leak trip does), and the restarted
  controller sees the leak input again; only a latch whose cause vanished inside that window is
  lost, and no one was told of it.
- The persist runs in a worker thread. The scan waits for it at most `persist_wait_s` (half a
  period), so even a store that hangs never holds back the next scan's outputs; a commit still
  running then is left to finish, later events wait in memory (in order, at most
  `MAX_WAITING`) and are told only after it. A commit running longer than the PLC's
  `watchdog_s` is a stalled journal: a degraded state (reuse rejected, an alarm), and the
  events held in memory are told from then on, as when the store fails outright.
- Failure is a state, not an exit. An exception in the decision step gives a degraded scan: the
  guarded safe values are written, reuse is rejected (`Commands.degraded` on the next good step,
  so the mode machine re-enters reuse only after its own reject dwell), and a `step_failed`
  event is raised once per cause (`step_recovered` when a step succeeds again). A journal that
  cannot persist (`JournalKeeper.problem`, or a hand-off to its worker that raises) is a
  degraded state too: reuse stays rejected, so a latched trip that may be unpersisted keeps the
  plant in reject until it is on disk. Outputs the PLC did not acknowledge go to the next step
  as `Commands.write_failed` (reject reuse, alarm).
- The heartbeat. One counter, in the transport: it writes `heartbeat` last and only when every
  other output of the pass was acknowledged. The runtime never sends a beat of its own, so a
  scan that cannot write safely (link down, writes refused, the scan itself broken) sends none
  and the PLC watchdog takes over.
- A heartbeat hold (`watchdog_test`, a PLC watchdog proof test) lives in the operator state
  and ends by the wall clock, whatever the tool that asked for it does; the runtime tells the
  transport each scan to write the heartbeat unchanged while it stands, every other output as
  usual. It never survives a restart (a restarted controller beats). When it ends, every output
  is re-sent each scan for the PLC's hold-off plus one watchdog period, so the PLC sees fresh
  commands after a steady heartbeat and releases its safe hold, as after any watchdog trip.
- Commissioning records (`commission`) are I/O, not decisions: the runtime checks, seals
  (the site key in the state directory, chained to the previous record) and files them in the
  journal on a connection of its own, beside the scan, one at a time. The proof-test schedule
  comes from the filed records: `last_passed` at start and after each filing; which steps are
  overdue is evaluated against the wall clock every PROOF_EVERY_S and handed to the core, which
  raises the `PROOF:<id>` alarms (a change takes a recorder snapshot, so replay follows it).
- Time is injected (`clock`, `sleep`, and `offload` for the journal's blocking I/O), so the loop
  runs on a fake clock in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from controller import arbitration, metering
from controller.arbitration import Output
from controller.authority import MAX_REASON, Answer, Cmd, Request, permitted, remaining_s
from controller.core import Core, ProofTest, ScanInput, ScanResult, proof_schedule
from controller.journal import JournalKeeper, MeterWrite
from controller.modes import Mode
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from interlocks.engine import Event
from plc_io.image import ProcessImage, Quality
from plc_io.site import Site
from plc_io.transport import CommsHealth, LinkState, Transport

RESEND_EVERY_S = 10.0  # every output is re-sent this often, whatever the PLC reports
HEARTBEAT = "heartbeat"
MAX_WAITING = 1000  # events held in memory behind a commit that has not returned
# Operator requests: at most this many wait for the scan (more are refused "busy"), and at most
# MAX_PER_SCAN are applied in one scan, so a flood of commands never stretches a scan.
MAX_QUEUED = 100
MAX_PER_SCAN = 8
COMMAND = "command"  # the kind of the event that journals an answered request
# the runtime logs these itself, with the PLC's reasons, once per cause (the supervisor's events
# of the same kinds are journalled but not logged twice)
_LOGGED_BY_RUNTIME = frozenset({"write_failed", "write_recovered"})
PROOF_EVERY_S = 5.0  # how often the proof-test schedule is held against the wall clock
MAX_FILINGS = 2  # commissioning records being filed or waiting to be; more are refused "busy"
# The channel's per-message limit: a commissioning record (≤ 1 MiB of canonical JSON) with its
# envelope. Only `commission` may be that long (controller.channel.LARGE_COMMANDS).
CHANNEL_MAX_BYTES = 2 * 1024 * 1024


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("heatloop")
    except Exception:  # not installed (a source tree): say so rather than guess
        return "unknown"


T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]


async def inline(fn: Callable[[], T]) -> T:
    """Run `fn` on the loop (tests on a fake clock; no worker thread)."""
    return fn()


def make_transport(site: Site, **kw: Any) -> Transport:
    """The transport the site file names."""
    if site.plc.transport == "opcua":
        from plc_io.opcua import OpcuaTransport

        return OpcuaTransport(site, **kw)
    from plc_io.modbus import ModbusTransport

    return ModbusTransport(site, **kw)


def guarded_safe_outputs(cfg: SupervisorConfig) -> tuple[dict[str, Output], list[str]]:
    """The site's safe values after the guard every scan passes through, and what it corrected."""
    return arbitration.guarded_safe_outputs(
        cfg.safe,
        min_fan_pct=cfg.sequence.fan_min_pct,
        design_speed_pct=cfg.sequence.primary_speed_pct,
    )


@dataclass
class Status:
    """The latest scan, as the console view and the BMS see it."""

    decision: Decision | None = None
    image: ProcessImage = field(default_factory=ProcessImage)
    health: CommsHealth = field(default_factory=CommsHealth)
    scans: int = 0
    overruns: int = 0
    blocked: int = 0
    degraded: tuple[str, ...] = ()  # runtime faults in force (journal, decision step)
    write_failed: Mapping[str, str] = field(default_factory=dict)  # last pass: tag -> reason
    # the events that may be announced now (the journal has them); publish these, not
    # `decision.events`, which may still wait for a slow commit
    told: tuple[Event, ...] = ()
    result: ScanResult | None = None  # the core's whole result: alarms, operator state
    wall: float = 0.0  # wall time of the last scan
    last_scan_s: float = 0.0  # compute + I/O time of the last scan
    max_lag_s: float = 0.0  # worst event-loop lag seen


def _bounded(x: object, limit: int = 500) -> str:
    try:
        text = json.dumps(x, default=str, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(x)
    return text if len(text) <= limit else text[:limit] + "…"


def command_row(e: Event) -> tuple[Any, ...]:
    """The journal's command record for a `command` event (who, when, what, old, new, why)."""
    d = e.detail
    args = d["args"] if isinstance(d["args"], Mapping) else {}
    if e.source == "reset":
        target = _bounded(args.get("rules") or "all", 200)
    elif e.source == Cmd.COMMISSION:
        target = str(args.get("run_id", ""))[:200]
    else:
        target = next(
            (str(args[k])[:200] for k in ("tag", "rule", "alarm", "name") if k in args), ""
        )
    new = d["new"] if d["accepted"] else {"requested": args}
    return (
        d["wall"],
        d["id"],
        d["principal"],
        d["role"],
        d["via"],
        e.source,
        target,
        _bounded(d["old"]),
        _bounded(new),
        str(d["reason"])[:500],
        int(bool(d["accepted"])),
        str(d["why"]),
    )


@dataclass(frozen=True)
class _MeterRows:
    """The meter's rows for the next commit and its newest memory (made JSON in the store's
    thread, after the scan: the scan only hands over references)."""

    intervals: tuple[Mapping[str, Any], ...]
    interruptions: tuple[Mapping[str, Any], ...]
    memory: metering.MeterState

    def write(self) -> MeterWrite:
        return MeterWrite(self.intervals, self.interruptions, metering.state_to_json(self.memory))


def _merge_meter(old: _MeterRows | None, new: _MeterRows) -> _MeterRows:
    """`new` over `old`, row by row (interval start, interruption id), and the newer memory."""
    if old is None:
        return new
    intervals = {r["start_wall"]: r for r in (*old.intervals, *new.intervals)}
    stops = {r["id"]: r for r in (*old.interruptions, *new.interruptions)}
    return _MeterRows(tuple(intervals.values()), tuple(stops.values()), new.memory)


class Controller:
    """Runs the decision core against a transport at the site's scan period."""

    def __init__(
        self,
        site: Site,
        transport: Transport,
        *,
        journal: JournalKeeper | None = None,
        recorder: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        offload: Offload[None] = asyncio.to_thread,
        on_scan: Callable[[Status], None] | None = None,
        log: Any = None,
        channel: Path | None = None,
        metering: bool = True,
    ) -> None:
        """`channel` is the Unix socket people's requests arrive on (none: in-process only).
        `journal.state()` (what the last run persisted) restores latches, fault memory,
        forces, bypasses, requests, setpoints and alarms; a state that cannot be restored
        raises ValueError naming the part (start-up stops: never silently start empty)."""
        self.site = site
        self.transport = transport
        self.journal = journal
        self.recorder = recorder
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.offload = offload
        self.on_scan = on_scan
        self.channel = channel
        self.log = log if log is not None else structlog.get_logger("heatloop.controller")
        self.cfg = SupervisorConfig.from_site(site)
        # a site whose safe values the guard would refuse is a configuration error, but even
        # if one got past `check`, the uncorrected values are never written
        self.safe, corrected = guarded_safe_outputs(self.cfg)
        if corrected:
            self.log.warning("safe_values_corrected", blocked=corrected)
        latched = journal.latched() if journal else frozenset()
        restored: dict[str, Any] = {}
        if latched is None:  # the journal could not be read: latched trips unknown
            assert journal is not None
            self.log.error("journal_unreadable", problem=journal.problem)
            latched = frozenset()
        elif journal is not None:
            restored = dict(journal.state() or {})
        self.core = self._new_core(clock(), wall(), restored, latched)
        if latched:
            self.log.warning("trip_restored", latched=sorted(latched))
        self.version = package_version()
        self.created_wall = self._created_wall(restored)
        # the meter (controller.metering): off only for a benchmark's baseline
        self._meter_discarded: str | None = None  # why the saved meter could not be restored
        self.meter = self._restore_meter(restored) if metering else None
        self._meter_pending: _MeterRows | None = None  # for the next commit, newest per key
        self._last_passed: dict[str, float] = {}
        self._proof_next = -float("inf")  # monotonic time of the next schedule evaluation
        self._filings = 0  # commissioning records being filed or waiting
        self._filing_lock = asyncio.Lock()
        self._full_answers: dict[str, Any] = {}  # request id -> the sealed record to answer
        self._key: Any = None  # the site's signing key, loaded at the first filing
        self._rule_table_sha256: str | None = None
        self._hold_on = False  # the transport holds the heartbeat
        self._release_until = -float("inf")  # re-send every output each scan until then
        if journal is not None and journal.latched() is not None:
            self._last_passed = self._read_last_passed()
        self.status = Status()
        self._last_link: LinkState | None = None
        self._resent_at = -RESEND_EVERY_S
        self._write_causes: dict[str, str] = {}  # last pass's unacknowledged outputs
        self._step_error: str | None = None  # why the decision step failed, while it does
        self._scan_error: str | None = None
        # operator requests waiting for the scan, and answers waiting for the journal
        self._queue: deque[tuple[Request, asyncio.Future[Answer] | None]] = deque()
        self._answering: dict[str, asyncio.Future[Answer]] = {}
        self._ids = itertools.count(1)
        self._new_core_built = False
        # the journal: a commit that may still be running in its worker thread, the events it
        # carries, when it started, and the events waiting for the next commit (in order)
        self.persist_wait_s = site.scan.period_s / 2
        self.stall_s = site.plc.watchdog_s
        self._inflight: asyncio.Future[None] | None = None
        self._inflight_events: list[Event] = []
        self._inflight_since = 0.0
        self._inflight_told = 0  # how many of its events were told early (a stalled commit)
        self._waiting: list[Event] = []
        self._waiting_told = 0
        self._waiting_state: dict[str, Any] | None = None
        self._sent_latched: frozenset[str] | None = None
        self._persist_error: str | None = None  # handing the journal its work failed
        # Called after every scan with its status, after everything else: each must return at
        # once (the BMS link only notes the told events and wakes its own task); one that
        # raises is logged and the scan goes on.
        self.scan_hooks: list[Callable[[Status], None]] = []
        self.bms_view: Callable[[], dict[str, Any]] | None = None  # the BMS link's state
        self.started = asyncio.Event()  # set once the start-up write is done

    def _created_wall(self, restored: Mapping[str, Any]) -> float:
        """When the state store was created (the first proof tests fall due from it): written
        once, at the first start with a readable store that has none. A store that cannot be
        read counts from now, and nothing is written over what it may hold."""
        w = restored.get("created_wall")
        if isinstance(w, int | float) and not isinstance(w, bool) and w == w:
            return float(w)
        now = self.wall()
        known = self.journal.latched() if self.journal is not None else None
        if self.journal is not None and known is not None and self.journal.problem is None:
            self.journal.record((), known, {"created_wall": now})
        return now

    def _restore_meter(self, restored: Mapping[str, Any]) -> metering.MeterState:
        """The meter as the last run persisted it. One that cannot be restored (a changed
        `[metering] interval_s`, a damaged memory) starts anew, loudly: metering never keeps
        the controller from cooling, and the `meter_state_discarded` event tells the statement
        that the totaliser's baseline starts again (the energy until the first reading after the
        start is then not billed)."""
        saved = restored.get("meter")
        if saved is None:
            return metering.new_state(self.site.metering)
        try:
            # no scan of this process vouches for the time since the saved one: its first scan
            # covers it as a gap ("controller not running"), however short the restart (the
            # monotonic clock is system-wide and would pass a kill -9 off as one long scan)
            return replace(metering.state_from_json(self.site.metering, saved), last_now_s=None)
        except ValueError as e:
            self.log.error("meter_state_discarded", why=str(e))
            self._meter_discarded = str(e)
            return metering.new_state(self.site.metering)

    def meter_view(self) -> dict[str, Any] | None:
        """The meter's lifetime and today's figures (status, BMS, metrics), or None when off."""
        return metering.view(self.meter) if self.meter is not None else None

    def _read_last_passed(self) -> dict[str, float]:
        """Step id -> newest live pass, from the journal's records (never raises)."""
        from controller import commission_record as cr

        assert self.journal is not None
        try:
            records = self.journal.commission_records()
            key = cr.public_key_hex(self._signing_key()) if records else None
            return cr.last_passed(records, key)
        except Exception as e:  # the schedule is a reminder: an unreadable one is logged
            self.log.error("proof_tests_unreadable", error=f"{type(e).__name__}: {e}")
            return {}

    def _signing_key(self) -> Any:
        if self._key is None:
            from controller.commission_record import load_or_create_key

            self._key = load_or_create_key(self.site.state_dir)
        return self._key

    def _new_core(
        self, now: float, wall: float, restored: Mapping[str, Any], latched: frozenset[str]
    ) -> Core:
        """A core restarted from persisted state; the latch table is the truth for latches."""
        memory = dict(restored.get("supervisor") or {})
        memory["latched"] = sorted(latched)
        return Core(self.site, now, wall, {**restored, "supervisor": memory}, cfg=self.cfg)

    @property
    def supervisor(self) -> Supervisor:
        return self.core.supervisor

    # ---- requests from people and the BMS ----

    async def submit(self, req: Request) -> Answer:
        """Queue a request for the next scan; the answer comes once the journal has it."""
        if req.cmd == Cmd.COMMISSION:
            return await self._commission(req)
        if len(self._queue) >= MAX_QUEUED:
            return Answer(
                req.id, False, f"busy: {MAX_QUEUED} requests wait for the scan", kind="busy"
            )
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        return await fut

    # ---- commissioning records ----

    async def _commission(self, req: Request) -> Answer:
        """File a commissioning record: check, seal, store, answer with the sealed record.
        Every answer is journalled as a command row (target the run id, new its seq and hash:
        never the record itself, which lives in the journal's commissioning table)."""
        args = req.args if isinstance(req.args, Mapping) else {}
        body = args.get("record")
        summary: dict[str, Any] = {}
        if isinstance(body, Mapping):
            summary = {
                k: str(body.get(k))[:200] for k in ("run_id", "target", "purpose", "outcome")
            }
        ans = self._commission_refusal(req, args, body)
        if ans is None:
            if self._filings >= MAX_FILINGS:
                ans = Answer(req.id, False, "busy: a record is being filed; try again", kind="busy")
            else:
                self._filings += 1
                try:
                    async with self._filing_lock:  # one at a time: each chains to the last
                        ans = await self._file(req, body)
                finally:
                    self._filings -= 1
        full = ans.new
        if self.journal is None:  # nothing to journal it in (and so nothing was filed)
            self.log.info("command_refused", cmd=req.cmd, principal=req.principal, why=ans.why)
            return ans
        if ans.accepted and isinstance(full, Mapping):
            ans = replace(ans, new={"seq": full.get("seq"), "hash": full.get("hash")})
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._answering[req.id] = fut
        self._full_answers[req.id] = full if ans.accepted else None
        # the reason is journalled and logged: never more than any request's reason may be
        shown = replace(req, reason=str(req.reason)[:MAX_REASON])
        event = self._command_event(shown, ans, self.clock(), self.wall(), summary)
        self._waiting.append(event)  # journalled with the next scan's commit, then answered
        try:
            answer = await fut
        finally:
            self._answering.pop(req.id, None)
            self._full_answers.pop(req.id, None)
        if answer.accepted:
            self._proof_next = -float("inf")  # a filing may clear a PROOF alarm at once
        return answer

    def _commission_refusal(
        self, req: Request, args: Mapping[str, Any], body: object
    ) -> Answer | None:
        from controller import commission_record as cr

        if not permitted(req.role, req.cmd):
            return Answer(
                req.id,
                False,
                f"role {str(req.role)[:40]} may not commission; needs engineer",
                kind="denied",
            )
        if not isinstance(req.reason, str) or len(req.reason) > MAX_REASON:
            return Answer(
                req.id,
                False,
                f"reason: expected a string of at most {MAX_REASON} characters",
                kind="invalid",
            )
        if set(args) != {"record"}:
            got = sorted(str(k)[:40] for k in args)
            return Answer(
                req.id,
                False,
                f"args: fields {got}: expected {{record}} for commission",
                kind="invalid",
            )
        if not isinstance(body, Mapping) or body.get("format") != cr.FORMAT:
            got = body.get("format") if isinstance(body, Mapping) else type(body).__name__
            return Answer(
                req.id,
                False,
                f"args.record: format {str(got)[:60]!r}: expected a JSON object with format "
                f"{cr.FORMAT!r}",
                kind="invalid",
            )
        if self.journal is None:
            return Answer(req.id, False, "no journal: nothing can be filed", kind="state")
        if self.journal.problem is not None:
            return Answer(
                req.id,
                False,
                f"the journal cannot write ({self.journal.problem}); the record was not filed: "
                "keep the tool's copy and file it again once the journal is back",
                kind="state",
            )
        return None

    async def _file(self, req: Request, body: Any) -> Answer:
        """Seal `body` after the newest record and store it (blocking I/O in the worker)."""
        from controller.commission_record import RecordError

        # the whole body is checked in the worker too: a megabyte of JSON walked and encoded
        # on the event loop would delay the scan
        try:
            sealed, passed = await self.offload(partial(self._seal_and_store, req, body))
        except (RecordError, RecursionError) as e:
            why = str(e) if isinstance(e, RecordError) else "record: nested too deeply"
            return Answer(req.id, False, why[:500], kind="invalid")
        except Exception as e:  # the tool keeps its copy; nothing half-filed is told as filed
            self.log.error("commission_not_filed", error=f"{type(e).__name__}: {e}")
            return Answer(
                req.id,
                False,
                f"not filed: {type(e).__name__}: {str(e)[:300]}; keep the tool's copy and file "
                "it again",
                kind="state",
            )
        self._last_passed = passed
        return Answer(req.id, True, "", None, sealed)

    def _seal_and_store(self, req: Request, body: Any) -> tuple[dict[str, Any], dict[str, float]]:
        from controller import commission_record as cr

        assert self.journal is not None
        key = self._signing_key()
        if self._rule_table_sha256 is None:
            from controller.commission_plan import rule_table_hash

            self._rule_table_sha256 = rule_table_hash(self.site)
        records = self.journal.commission_records()
        sealed = cr.seal(
            body,
            records[-1] if records else None,
            key,
            filed_wall=self.wall(),
            filed_by=req.principal,
            controller={
                "version": self.version,
                "site_sha256": self.site.source_sha256,
                "rule_table_sha256": self._rule_table_sha256,
            },
        )
        self.journal.add_commission_record(sealed)
        return sealed, cr.last_passed([*records, sealed], cr.public_key_hex(key))

    def request(self, cmd: str, args: Mapping[str, Any] | None = None, reason: str = "") -> str:
        """An in-process request (the demo, tests): engineer `local`, answered in the journal."""
        rid = f"local-{next(self._ids)}"
        req = Request(rid, "local", "engineer", cmd, dict(args or {}), reason, via="local")
        self._queue.append((req, None))
        return rid

    def reset_trip(self, *rules: str, reason: str = "trip reset") -> str:
        return self.request("reset", {"rules": list(rules)}, reason)

    def request_reject(self, on: bool, reason: str = "reject requested") -> str:
        return self.request("reject", {"on": on}, reason)

    def set_maintenance(self, on: bool, reason: str = "maintenance") -> str:
        return self.request("maintenance", {"on": on}, reason)

    def force(self, tag: str, value: Any, seconds: float, reason: str = "forced") -> str:
        return self.request("force", {"tag": tag, "value": value, "minutes": seconds / 60}, reason)

    # ---- the loop ----

    async def run(self, stop: asyncio.Event) -> None:
        server = None
        if self.channel is not None:
            from controller.channel import ChannelServer

            # first: a second controller on the same state directory stops here
            server = ChannelServer(
                self.channel,
                self.site.roles,
                self.submit,
                self.read,
                log=self.log,
                max_bytes=CHANNEL_MAX_BYTES,
            )
            await server.start()
        try:
            await self._run(stop)
        finally:
            if server is not None:
                await server.close()
            for _, fut in self._queue:
                if fut is not None and not fut.done():
                    fut.set_result(
                        Answer("", False, "not applied: the controller is stopping", kind="state")
                    )
            if self.recorder is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.recorder.close)

    async def _run(self, stop: asyncio.Event) -> None:
        await self.transport.connect()
        await self._write_safe("start")
        self.log.info("controller_started", period_s=self.site.scan.period_s)
        self.started.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._scan_loop(stop))
                tg.create_task(self._lag_monitor(stop))
        finally:
            try:
                await asyncio.wait_for(self._write_safe("stop"), timeout=2.0)
            except Exception as e:  # the watchdog covers a failed farewell
                self.log.warning("safe_write_on_stop_failed", error=str(e))
            await self.transport.close()
            if self.journal is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.close_journal(), timeout=2.0)
            self.log.info("controller_stopped", scans=self.status.scans)

    def safe_values(self) -> dict[str, Any]:
        """The guarded safe values, without the heartbeat (the transport beats)."""
        return {k: o.value for k, o in self.safe.items() if k != HEARTBEAT}

    async def _write_safe(self, when: str) -> None:
        result = await self.transport.write_outputs(self.safe_values())
        if result.failed:
            self.log.warning("safe_write_failed", when=when, failed=dict(result.failed))

    def degraded(self) -> tuple[str, ...]:
        """Runtime faults in force, as the next step sees them (each rejects reuse)."""
        faults: list[str] = []
        if self._step_error is not None:
            faults.append(f"decision step failed: {self._step_error}")
        if self.journal is not None and self.journal.problem is not None:
            faults.append(self.journal.problem)
        if self._persist_error is not None:
            faults.append(self._persist_error)
        if self.journal_busy and self.clock() - self._inflight_since > self.stall_s:
            faults.append(f"journal stalled: a commit has run longer than {self.stall_s:g} s")
        return tuple(faults)

    async def scan_once(self) -> Decision:
        t0 = self.clock()
        image, link_ok = await self._read()
        now, wall = self.clock(), self.wall()
        self._restore_latches(now, wall)
        inp = ScanInput(
            image,
            now,
            wall,
            link_ok,
            frozenset(self._write_causes),
            self.degraded(),
            self._take_requests(),
        )
        self._update_proof(now, wall)
        self._snapshot_if_due(wall)
        result, fallback = self._decide(inp)
        decision = result.decision
        self._heartbeat_hold(now, wall)
        notes: list[tuple[str, dict[str, Any]]] = []
        if link_ok:
            notes += await self._write(decision, image, now)
        # outputs first, then the meter and the journal, then anyone else
        events = [
            *result.events,
            *self._command_events(inp, result),
            *self._meter(image, result, wall),
        ]
        state = self.core.durable(now, wall) if events else None
        told = await self._persist(events, decision.latched, state)
        self._record(inp, result, fallback)
        for e in told:
            if e.kind == COMMAND:
                self._answered(e)
            elif e.kind not in _LOGGED_BY_RUNTIME:
                self.log.info(e.kind, source=e.source, **dict(e.detail))
        for kind, kw in notes:
            getattr(self.log, "warning" if kind == "write_failed" else "info")(kind, **kw)
        st = self.status
        st.decision, st.image, st.health = decision, image, self.transport.health
        st.result = result
        st.wall = wall
        st.scans += 1
        st.blocked = self.supervisor.blocked_total
        st.degraded = inp.degraded
        st.write_failed = dict(self._write_causes)
        st.told = tuple(told)
        st.last_scan_s = self.clock() - t0
        if self.on_scan:
            try:
                self.on_scan(st)
            except Exception as e:  # a broken viewer never stops the scan
                self.log.warning("on_scan_failed", error=f"{type(e).__name__}: {e}")
        for hook in self.scan_hooks:
            try:
                hook(st)
            except Exception as e:  # a broken listener never stops the scan
                self.log.warning("on_scan_failed", error=f"{type(e).__name__}: {e}")
        return decision

    # ---- what people read ----

    async def read(self, what: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Status, alarms and the journal for the command channel."""
        if what == "status":
            return self.status_view()
        if what == "alarms":
            return {"alarms": self._alarm_rows()}
        if what == "journal":
            return await asyncio.to_thread(self._read_journal, args)
        raise ValueError(f"cmd: expected status, alarms or journal, got {what!r}")

    def _alarm_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "id": a.id,
                "priority": a.priority.name.lower(),
                "state": a.state.value,
                "message": a.message,
                "detail": a.detail,
                "since_wall": a.active_since_wall,
                "first_out": a.first_out,
                "shelved_until": a.shelved_until,
                "chatter_count": a.chatter_count,
            }
            for a in self.core.alarms.standing()
        ]

    def status_view(self) -> dict[str, Any]:
        """The status page's data (DESIGN §13; the CLI prints it, `--json` shows it raw)."""
        st, op = self.status, self.core.operator
        d = st.decision
        health = st.health
        view: dict[str, Any] = {
            "site": self.site.site.name,
            "wall": st.wall,
            "mode": d.mode.value if d else self.supervisor.mode.value,
            "mode_since_wall": st.wall - (d.now_s - d.mode_since_s) if d else None,
            "reject_reasons": list(d.reject_reasons) if d else [],
            "waiting": self._waiting_for_reuse(),
            "interlocks": {
                "active": sorted(d.active) if d else [],
                "latched": sorted(self.supervisor.latched),
                "bypassed": [
                    {"rule": r, "until_wall": h.expires_wall, "who": h.who, "reason": h.reason}
                    for r, h in sorted(op.bypasses.items())
                ],
            },
            "alarms": self._alarm_rows(),
            "outputs": {
                k: {"value": o.value, "level": o.level.name.lower(), "why": o.why}
                for k, o in (d.outputs.items() if d else ())
            },
            "invalid": dict(d.invalid) if d else {},
            "forces": [
                {
                    "tag": t,
                    "value": h.value,
                    "until_wall": h.expires_wall,
                    "who": h.who,
                    "reason": h.reason,
                    "input": t in op.input_forces,
                }
                for t, h in sorted({**op.forces, **op.input_forces}.items())
            ],
            "maintenance": op.maintenance,
            "reject_requested": op.reject,
            "setpoints": dict(op.setpoints),
            "link": {
                "state": health.state.value,
                "last_error": health.last_error or "",
                "requests": health.requests,
                "failures": health.failures,
            },
            "scan": {
                "count": st.scans,
                "overruns": st.overruns,
                "last_ms": round(st.last_scan_s * 1000.0, 2),
                "period_s": self.site.scan.period_s,
            },
            "degraded": list(st.degraded),
            "recorder": self.recorder.stats() if self.recorder is not None else None,
            "bms": self._bms_view(),
            "inputs": self._inputs_view(),
            "site_sha256": self.site.source_sha256,
            "version": self.version,
            "heartbeat_hold_until_wall": (
                op.heartbeat_hold.expires_wall
                if op.heartbeat_hold is not None and self._hold_on
                else None
            ),
            "proof_tests": {k: p.to_json() for k, p in self.proof_tests(st.wall).items()},
            "meter": self.meter_view(),
        }
        return view

    def _inputs_view(self) -> dict[str, dict[str, Any]]:
        """Every input as the last scan saw it: value and quality as read (an engineer's input
        force shows as its forced value), and whether validation trusted it, and why not."""
        st, op = self.status, self.core.operator
        d = st.decision
        invalid = d.invalid if d is not None else {}
        out: dict[str, dict[str, Any]] = {}
        for tag in self.site.inputs:
            forced = op.input_forces.get(tag.name)
            if forced is not None:
                value, quality = forced.value, Quality.FORCED.value
            else:
                sample = st.image[tag.name]
                value, quality = sample.value, sample.quality.value
            why = invalid.get(tag.name, "")
            if d is None:
                why = "no scan yet"
            out[tag.name] = {"value": value, "quality": quality, "valid": not why, "reason": why}
        return out

    def _bms_view(self) -> dict[str, Any]:
        off = {"state": "off", "pid": None, "restarts": 0, "last_error": "", "endpoint": None}
        if self.bms_view is None:
            return {**off, "dropped": 0}
        try:
            return self.bms_view()
        except Exception as e:  # the status page never fails on the BMS link
            return {**off, "dropped": 0, "last_error": f"{type(e).__name__}: {e}"}

    def _waiting_for_reuse(self) -> str | None:
        """In DRY_COOLER_REJECT with no cause left: what the mode machine still waits for."""
        d = self.status.decision
        if d is None or d.mode is not Mode.DRY_COOLER_REJECT or d.reject_reasons:
            return None
        m = self.supervisor.machine
        t, now = m.timing, d.now_s
        if m.reject_clear_since is None:
            return None
        left = max(
            t.reject_dwell_s - (now - m.reject_clear_since),
            t.reuse_reentry_min_s - (now - m.left_reuse_s),
            t.min_dwell_s - (now - m.since_s),
            0.0,
        )
        return f"no reject cause; reuse resumes in about {left:.0f} s (dwell times against hunting)"

    def _read_journal(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The journal's newest entries (in a worker thread, on a connection of its own)."""
        from controller.journal import Journal

        since = args.get("since_wall")
        kinds = args.get("kinds")
        limit = args.get("limit", 100)
        if since is not None and (
            isinstance(since, bool) or not isinstance(since, int | float) or since != since
        ):
            raise ValueError(f"since_wall: expected a time in seconds, got {since!r:.60}")
        if kinds is not None and (
            not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds)
        ):
            raise ValueError(f"kinds: expected a list of event kinds, got {kinds!r:.60}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ValueError(f"limit: expected a whole number 1 … 10000, got {limit!r:.60}")
        path = self.site.state_dir / "heatloop.db"
        store = Journal(path)
        try:
            events = store.events(limit, since_wall=since, kinds=kinds)
            commands = store.commands(limit, since_wall=since)
        finally:
            store.close()
        return {
            "events": [
                {"wall": w, "kind": k, "source": src, "detail": det} for w, k, src, det in events
            ],
            "commands": commands,
        }

    def _take_requests(self) -> tuple[Request, ...]:
        """At most MAX_PER_SCAN waiting requests, in arrival order."""
        taken: list[Request] = []
        while self._queue and len(taken) < MAX_PER_SCAN:
            req, fut = self._queue.popleft()
            if fut is not None:
                if fut.done():  # the asker gave up (its connection closed): apply nothing
                    continue
                self._answering[req.id] = fut
            taken.append(req)
        return tuple(taken)

    def _command_events(self, inp: ScanInput, result: ScanResult) -> list[Event]:
        """One journal entry per answered request: who, when, what, old and new, reason."""
        return [
            self._command_event(req, ans, inp.now_s, inp.wall_s)
            for req, ans in zip(inp.requests, result.answers, strict=True)
        ]

    @staticmethod
    def _command_event(
        req: Request, ans: Answer, now: float, wall: float, args: Mapping[str, Any] | None = None
    ) -> Event:
        """`args`: what to journal of the arguments, when not all of them (a record)."""
        return Event(
            COMMAND,
            now,
            req.cmd,
            {
                "wall": wall,
                "id": req.id,
                "principal": req.principal,
                "role": req.role,
                "via": req.via,
                "args": dict(req.args if args is None else args),
                "reason": req.reason,
                "accepted": ans.accepted,
                "why": ans.why,
                "kind": ans.kind,
                "old": ans.old,
                "new": ans.new,
            },
        )

    def _answered(self, e: Event) -> None:
        """The journal has this request's entry: answer whoever waits for it, and log it."""
        d = e.detail
        fut = self._answering.pop(str(d["id"]), None)
        full = self._full_answers.pop(str(d["id"]), None)  # a sealed record goes back whole
        ans = Answer(
            str(d["id"]),
            bool(d["accepted"]),
            str(d["why"]),
            d["old"],
            d["new"] if full is None else full,
            str(d.get("kind", "")),
        )
        if fut is not None and not fut.done():
            fut.set_result(ans)
        self.log.info(
            "command_accepted" if ans.accepted else "command_refused",
            cmd=e.source,
            principal=d["principal"],
            role=d["role"],
            via=d["via"],
            args=d["args"],
            reason=d["reason"],
            why=ans.why,
        )

    def _meter(self, image: ProcessImage, result: ScanResult, wall: float) -> list[Event]:
        """Account this scan in the meter (raw readings: a forced input never bills); its rows
        go with the scan's commit. A meter that fails never touches the scan's outputs."""
        if self.meter is None:
            return []
        notes: list[Event] = []
        if self._meter_discarded is not None:
            why, self._meter_discarded = self._meter_discarded, None
            notes.append(
                Event("meter_state_discarded", result.decision.now_s, "metering", {"why": why})
            )
        try:
            self.meter, out = metering.step(
                self.meter,
                self.site.metering,
                image,
                result.decision,
                result.commands,
                wall,
            )
            rows = _MeterRows(out.intervals, out.interruptions, self.meter)
        except Exception as e:
            self._note_scan_error("metering", e)
            return notes
        conditions = dict(out.conditions)
        if conditions != self.core.meter_conditions:
            self.core.meter_conditions = conditions
            self._new_core_built = True  # the recorder's replay follows the alarm inputs
        if self.journal is not None:  # nothing to keep rows for without a store
            self._meter_pending = _merge_meter(self._meter_pending, rows)
        return [*notes, *out.events]

    def _snapshot_if_due(self, wall: float) -> None:
        """The recorder starts every replayable window from a snapshot of the core."""
        if self.recorder is None:
            return
        try:
            if self._new_core_built or self.recorder.snapshot_due(wall):
                self.recorder.put_snapshot(wall, self.core.snapshot())
                self._new_core_built = False
        except Exception as e:  # the recorder never stops a scan
            self._note_scan_error("recorder", e)

    def _record(self, inp: ScanInput, result: ScanResult, fallback: bool) -> None:
        """Hand the scan to the flight recorder (its thread encodes and digests it)."""
        if self.recorder is None:
            return
        try:
            self.recorder.put(inp, None if fallback else result, fallback)
        except Exception as e:  # the recorder never stops a scan
            self._note_scan_error("recorder", e)

    @property
    def journal_busy(self) -> bool:
        """A commit is still running in the journal's worker thread."""
        return self._inflight is not None and not self._inflight.done()

    async def close_journal(self) -> None:
        """Let a running commit finish, persist what waits, and close the journal."""
        if self.journal is None:
            return
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            self._inflight = None
        state, self._waiting_state = self._waiting_state, None
        meter, self._meter_pending = self._meter_pending, None
        await self.offload(partial(self._store, self._waiting, self._latched(), state, meter))
        self._waiting = []
        await self.offload(self.journal.close)

    def _store(
        self,
        batch: list[Event],
        latched: frozenset[str],
        state: dict[str, Any] | None,
        meter: _MeterRows | None = None,
    ) -> None:
        """The journal's work for one commit (in the worker thread): events, the latch set,
        the durable state, the answered requests and the meter's rows, in one transaction."""
        assert self.journal is not None
        events = [e for e in batch if e.kind != COMMAND]
        commands = [command_row(e) for e in batch if e.kind == COMMAND]
        self.journal.record(
            events, latched, state, commands, meter=meter.write() if meter is not None else None
        )

    def _latched(self) -> frozenset[str]:
        d = self.status.decision
        return d.latched if d is not None else self.supervisor.latched

    async def _persist(
        self, events: list[Event], latched: frozenset[str], state: dict[str, Any] | None
    ) -> list[Event]:
        """Hand this scan's events, latch set and durable state to the journal; return the
        events that may now be told, in order: those of every commit that has finished, and,
        once a commit has stalled, those held in memory (as when the store fails: an alarm
        nobody sees helps no one; the journal is degraded and they are persisted when it
        returns)."""
        if self.journal is None:
            return events
        self._waiting += events
        if state is not None:
            self._waiting_state = state
        if len(self._waiting) > MAX_WAITING:  # a store hung for hours: keep the newest
            cut = len(self._waiting) - MAX_WAITING
            del self._waiting[:cut]
            self._waiting_told = max(0, self._waiting_told - cut)
        told: list[Event] = []
        if self._inflight is not None:
            if not self._inflight.done():
                if self.clock() - self._inflight_since > self.stall_s:
                    told += self._inflight_events[self._inflight_told :]
                    told += self._waiting[self._waiting_told :]
                    self._inflight_told = len(self._inflight_events)
                    self._waiting_told = len(self._waiting)
                return told  # the store is still busy: the rest waits its turn, in memory
            err = self._inflight.exception()  # the keeper never raises; an executor might
            events, already = self._inflight_events, self._inflight_told
            self._inflight = None
            if isinstance(err, Exception):
                return told + self._hand_off_failed(err, events, already)
            self._persist_error = None
            told += events[already:]
        if (
            not self._waiting
            and self._waiting_state is None
            and self._meter_pending is None
            and latched == self._sent_latched
            and not self.journal.problem
        ):
            return told  # nothing new for the store (a retry after a failure always goes)
        batch, already = self._waiting, self._waiting_told
        self._waiting, self._waiting_told = [], 0
        state, self._waiting_state = self._waiting_state, None
        # the meter's rows go with every commit; while one runs they merge in memory (newest
        # row per interval and interruption), so a kill -9 loses at most the scans since the
        # last commit finished: one scan while the store keeps up
        meter, self._meter_pending = self._meter_pending, None
        # The plant's events and a changed latch set are told in the scan that raised them, so
        # that scan waits for the commit (at most persist_wait_s). A batch that only answers
        # people's requests holds no scan: its answers go out when the commit is done.
        urgent = latched != self._sent_latched or any(e.kind != COMMAND for e in batch)
        self._sent_latched = latched
        try:
            fut = asyncio.ensure_future(
                self.offload(partial(self._store, batch, latched, state, meter))
            )
            if not urgent:
                # answers and the meter's rows hold no scan: the commit starts when the scan
                # is over and the loop idles (no await here, so it never takes the GIL mid-scan)
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(fut), timeout=self.persist_wait_s)
        except TimeoutError:
            # slow storage: let the commit finish on its own; the next scans go on
            self._inflight, self._inflight_events, self._inflight_told = fut, batch, already
            self._inflight_since = self.clock()
            return told
        except Exception as e:  # the keeper never raises; handing it the work did
            if self._waiting_state is None:
                self._waiting_state = state
            if meter is not None:  # older than what waits: what waits wins, key by key
                self._meter_pending = (
                    meter
                    if self._meter_pending is None
                    else _merge_meter(meter, self._meter_pending)
                )
            return told + self._hand_off_failed(e, batch, already)
        self._persist_error = None
        return told + batch[already:]

    def _hand_off_failed(self, e: Exception, batch: list[Event], already: int) -> list[Event]:
        """The journal never got this batch: a degraded journal, as when its store fails. The
        batch waits in front of later events for the next try (the latch set goes again too),
        and is told now: an alarm nobody sees helps no one."""
        self._note_scan_error("persist", e)
        self._persist_error = f"journal cannot persist: {type(e).__name__}: {e}"
        self._waiting[:0] = batch
        self._waiting_told += len(batch)
        self._sent_latched = None
        return batch[already:]

    async def _read(self) -> tuple[ProcessImage, bool]:
        try:
            image = await self.transport.read_inputs()
        except Exception as e:  # a transport bug: treat as a lost link (IL-08, nothing written)
            self._note_scan_error("read_inputs", e)
            names = [t.name for t in self.site.inputs]
            return self.status.image.marked(names, Quality.COMMS_LOST, None), False
        health = self.transport.health
        if health.state is not self._last_link:
            self.log.info("plc_link", state=health.state.value, error=health.last_error)
            self._last_link = health.state
        return image, health.state is LinkState.OK

    def _decide(self, inp: ScanInput) -> tuple[ScanResult, bool]:
        """The core's decision, or a degraded one with the guarded safe values (and True)."""
        try:
            result = self.core.step(inp)
        except Exception as e:
            return self._fallback(inp, e), True
        if self._step_error is not None:
            back = Event("step_recovered", inp.now_s, "runtime", {"was": self._step_error})
            result = replace(result, events=(back, *result.events))
            self._step_error = None
        return result, False

    def _fallback(self, inp: ScanInput, e: Exception) -> ScanResult:
        now = inp.now_s
        err = f"{type(e).__name__}: {e}"
        events: tuple[Event, ...] = ()
        if err != self._step_error:  # once per cause, with where it broke
            tb = traceback.extract_tb(e.__traceback__)
            at = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
            events = (Event("step_failed", now, "runtime", {"error": err, "at": at}),)
        self._step_error = err
        prev = self.status.decision
        decision = Decision(
            now_s=now,
            mode=prev.mode if prev else self.supervisor.mode,
            mode_since_s=prev.mode_since_s if prev else now,
            outputs=dict(self.safe),
            active=prev.active if prev else frozenset(),
            latched=self.supervisor.latched,  # whatever is latched stays latched (and persisted)
            bypassed=frozenset(),
            events=events,
            blocked=(),
            reject_reasons=(f"decision step failed: {err}",),
            invalid=prev.invalid if prev else {},
        )
        why = f"not applied: the decision step failed ({err})"
        return ScanResult(
            decision=decision,
            alarms=self.core.alarms,
            operator=self.core.operator,
            commands=Commands(link_ok=inp.link_ok),
            answers=tuple(Answer(r.id, False, why, kind="state") for r in inp.requests),
            events=events,
        )

    async def _write(
        self, decision: Decision, image: ProcessImage, now: float
    ) -> list[tuple[str, dict[str, Any]]]:
        """Write the decision's outputs; note unacknowledged ones once per cause."""
        tripped = image["plc_watchdog_tripped"]
        if (
            (tripped.quality.usable and tripped.value is True)
            or now - self._resent_at >= RESEND_EVERY_S
            or now < self._release_until
        ):
            # the PLC releases its safe hold only on fresh commands (DESIGN §7), and a PLC
            # that does not report its watchdog gets them all now and then anyway
            self.transport.resend_all()
            self._resent_at = now
        values = {k: v for k, v in decision.values().items() if k != HEARTBEAT}
        try:
            result = await self.transport.write_outputs(values)
            failed = dict(result.failed)
        except Exception as e:  # a transport bug: nothing is known to have arrived
            self._note_scan_error("write_outputs", e)
            failed = dict.fromkeys([*values, HEARTBEAT], f"error: {type(e).__name__}: {e}")
        notes: list[tuple[str, dict[str, Any]]] = []
        if failed != self._write_causes:
            if failed:
                notes.append(("write_failed", {"failed": failed}))
            else:
                notes.append(("write_recovered", {"was": sorted(self._write_causes)}))
            self._write_causes = failed
        return notes

    def _heartbeat_hold(self, now: float, wall: float) -> None:
        """Tell the transport whether to hold the heartbeat this scan (by the wall clock, so a
        hold ends on time even while the decision step fails)."""
        h = self.core.operator.heartbeat_hold
        on = h is not None and remaining_s(h, wall) > 0.0
        hold = getattr(self.transport, "hold_heartbeat", None)
        if hold is not None:
            hold(on)
        if on == self._hold_on:
            return
        self._hold_on = on
        if on:
            assert h is not None
            self.log.warning("heartbeat_held", who=h.who, until_wall=h.expires_wall)
        else:
            # as after any watchdog trip: fresh commands each scan while the PLC's hold-off
            # runs, so it releases even if it does not report its watchdog
            p = self.site.plc
            self._release_until = now + p.watchdog_holdoff_s + p.watchdog_s
            self.log.info("heartbeat_resumed")

    def proof_tests(self, wall: float) -> dict[str, ProofTest]:
        """Each proof-test step's schedule at wall time `wall`."""
        return proof_schedule(self.site.commissioning, self._last_passed, self.created_wall, wall)

    def _update_proof(self, now: float, wall: float) -> None:
        """Every PROOF_EVERY_S (and at once after a filing): which proof tests are overdue,
        for the core's PROOF alarms. A change starts a new recorder snapshot (replay follows)."""
        if now < self._proof_next:
            return
        self._proof_next = now + PROOF_EVERY_S
        overdue = {k: p.detail for k, p in self.proof_tests(wall).items() if p.overdue}
        if overdue != self.core.proof_overdue:
            self.core.proof_overdue = overdue
            self._new_core_built = True

    def _restore_latches(self, now: float, wall: float) -> None:
        """A journal that opened only after start-up may hold trips latched before it: restart
        the decision core with them, exactly as a controller restart would."""
        if self.journal is None or self._inflight is not None:
            return  # never while the worker thread may be inside the journal
        restored = self.journal.take_restored()
        if not restored:
            return
        latched = self.supervisor.latched | restored
        self.log.warning("trip_restored", latched=sorted(latched), late=True)
        state = self.core.durable(now, wall)
        proof, meter = self.core.proof_overdue, self.core.meter_conditions
        self.core = self._new_core(now, wall, state, latched)
        self.core.proof_overdue, self.core.meter_conditions = proof, meter
        self._new_core_built = True  # the recorder needs a new starting point

    def _note_scan_error(self, where: str, e: Exception) -> None:
        err = f"{where}: {type(e).__name__}: {e}"
        if err != self._scan_error:
            self.log.error("scan_error", where=where, error=err, exc_info=e)
            self._scan_error = err

    async def _scan_loop(self, stop: asyncio.Event) -> None:
        period = self.site.scan.period_s
        next_t = self.clock()
        while not stop.is_set():
            try:
                await self.scan_once()
            except Exception as e:
                # never expected (each stage above degrades on its own); a scan that breaks
                # writes nothing this time, so no heartbeat goes out, and the loop goes on
                self._note_scan_error("scan", e)
            next_t += period
            now = self.clock()
            if now > next_t:
                self.status.overruns += 1
                self.log.warning(
                    "scan_overrun", late_s=round(now - next_t, 4), overruns=self.status.overruns
                )
                next_t = now  # start the next scan at once; never skip one silently
            # a plain sleep: on Python 3.11 wait_for can swallow a cancellation (gh-86296)
            await self.sleep(max(0.0, next_t - self.clock()))

    async def _lag_monitor(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        while not stop.is_set():
            t = self.clock()
            await self.sleep(every_s)
            lag = self.clock() - t - every_s
            if lag > self.status.max_lag_s:
                self.status.max_lag_s = lag
                if lag > 0.05:
                    self.log.warning("event_loop_lag", lag_s=round(lag, 4))


async def run_service(site: Site, transport: Transport, *, json_logs: bool = True) -> int:
    """`heatloop run`: the controller against the site's PLC until SIGINT/SIGTERM.

    A state database that exists but cannot be trusted (corrupt, from newer software, state
    that cannot be restored) stops start-up with one line and exit code 2: starting empty would
    silently forget latched trips, bypasses and alarms. A journal that cannot be opened for
    other reasons does not stop the service: it starts degraded (reuse rejected, an alarm) and
    keeps retrying.
    """
    import signal
    import sys

    from controller.journal import StateCorrupt
    from controller.logs import configure

    # JSON lines on stdout for journald (DESIGN §11; docs/deploy.md); a console keeps stderr
    configure(json=json_logs, stream=sys.stdout if json_logs else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    path = site.state_dir / "heatloop.db"
    try:
        journal = JournalKeeper(path)
    except StateCorrupt as e:
        print(f"heatloop: {e}", file=sys.stderr)
        return 2
    recorder = None
    if site.recorder.enabled:
        from controller.recorder import Recorder

        recorder = Recorder.for_site(site)
    try:
        ctl = Controller(
            site,
            transport,
            journal=journal,
            recorder=recorder,
            channel=site.state_dir / "heatloop.sock",
        )
    except ValueError as e:
        print(
            f"heatloop: {path}: the saved controller state cannot be restored ({e}); start a new "
            "one with: heatloop run --site SITE --reset-state --reason TEXT (the old file is kept)",
            file=sys.stderr,
        )
        journal.close()
        return 2
    from controller.metrics import Metrics, MetricsBindError
    from controller.sdnotify import Notifier, attach

    metrics = None
    if site.metrics is not None:
        metrics = Metrics(site, ctl)
        try:
            metrics.start()  # before the first scan: an address in use stops start-up
        except MetricsBindError as e:
            print(f"heatloop: {e}", file=sys.stderr)
            journal.close()
            return 2
        ctl.scan_hooks.append(metrics.on_scan)
    notifier = Notifier.from_env()
    if notifier is not None:
        attach(ctl, notifier)  # READY after the first scan, WATCHDOG while scans complete
    link_task = start_bms_link(site, ctl, stop, json_logs=json_logs)
    try:
        await ctl.run(stop)
    except OSError as e:  # e.g. another controller already serves this state directory
        print(f"heatloop: {e}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        if notifier is not None:
            notifier.notify(STOPPING="1")
        await stop_bms_link(link_task)
        if metrics is not None:
            metrics.close()
    return 0


def start_bms_link(
    site: Site, ctl: Controller, stop: asyncio.Event, *, json_logs: bool = True, log: Any = None
) -> asyncio.Task[None] | None:
    """The BMS server process beside the scan, when the site enables it (DESIGN §9).

    A task of its own, outside the scan's task group: nothing the link does (a child that
    cannot bind its port, dies, stalls) reaches the scan; it starts once the controller has
    started (a second controller on the same state directory stops before it spawns anything).
    """
    if not getattr(site.bms, "enabled", True):
        return None
    from controller.bms_link import BmsLink

    link = BmsLink(site, ctl, log=log, json_logs=json_logs)
    ctl.bms_view = link.status_view

    async def run() -> None:
        started = asyncio.ensure_future(ctl.started.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            stopped.cancel()
        if not stop.is_set():
            await link.run(stop)

    return asyncio.create_task(run(), name="bms-link")


async def stop_bms_link(task: asyncio.Task[None] | None) -> None:
    """Wait for the link to let its child go (EOF, at most 2 s, then SIGKILL); never raises."""
    if task is None:
        return
    try:
        async with asyncio.timeout(10.0):
            await asyncio.shield(task)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    except Exception:  # the link logs its own failures
        pass
