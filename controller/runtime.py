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
  console, the BMS through `on_scan`). The journal's fsync can take a long time on slow storage;
  it must never delay an interlock's outputs. Nobody is told of an event before the journal has
  had it (on disk, or in its bounded queue while the store is failing, which is a degraded
  state). A kill -9 between the write and the persist loses the journal rows of that one scan:
  the PLC already holds the trip's outputs, its watchdog then drives the plant to the safe
  values (which isolate the reuse circuit as a leak trip does), and the restarted controller
  sees the leak input again; only a latch whose cause vanished inside that window is lost, and
  no one was told of it.
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
- Time is injected (`clock`, `sleep`, and `offload` for the journal's blocking I/O), so the loop
  runs on a fake clock in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import structlog

from controller import arbitration
from controller.arbitration import Manual, Output
from controller.journal import JournalKeeper
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from interlocks.engine import Event
from plc_io.image import ProcessImage, Quality
from plc_io.site import Site
from plc_io.transport import CommsHealth, LinkState, Transport

RESEND_EVERY_S = 10.0  # every output is re-sent this often, whatever the PLC reports
HEARTBEAT = "heartbeat"
MAX_WAITING = 1000  # events held in memory behind a commit that has not returned
# the runtime logs these itself, with the PLC's reasons, once per cause (the supervisor's events
# of the same kinds are journalled but not logged twice)
_LOGGED_BY_RUNTIME = frozenset({"write_failed", "write_recovered"})

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
    last_scan_s: float = 0.0  # compute + I/O time of the last scan
    max_lag_s: float = 0.0  # worst event-loop lag seen


class Controller:
    """Runs the supervisor against a transport at the site's scan period."""

    def __init__(
        self,
        site: Site,
        transport: Transport,
        *,
        journal: JournalKeeper | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        offload: Offload[None] = asyncio.to_thread,
        on_scan: Callable[[Status], None] | None = None,
        log: Any = None,
    ) -> None:
        self.site = site
        self.transport = transport
        self.journal = journal
        self.clock = clock
        self.sleep = sleep
        self.offload = offload
        self.on_scan = on_scan
        self.log = log if log is not None else structlog.get_logger("heatloop.controller")
        self.cfg = SupervisorConfig.from_site(site)
        # a site whose safe values the guard would refuse is a configuration error, but even
        # if one got past `check`, the uncorrected values are never written
        self.safe, corrected = guarded_safe_outputs(self.cfg)
        if corrected:
            self.log.warning("safe_values_corrected", blocked=corrected)
        latched = journal.latched() if journal else frozenset()
        if latched is None:  # the journal could not be read: latched trips unknown
            assert journal is not None
            self.log.error("journal_unreadable", problem=journal.problem)
            latched = frozenset()
        self.supervisor = Supervisor(self.cfg, clock(), latched)
        if latched:
            self.log.warning("trip_restored", latched=sorted(latched))
        self.commands = Commands()
        self._reset_pending = False
        self.status = Status()
        self._last_link: LinkState | None = None
        self._resent_at = -RESEND_EVERY_S
        self._write_causes: dict[str, str] = {}  # last pass's unacknowledged outputs
        self._step_error: str | None = None  # why the decision step failed, while it does
        self._scan_error: str | None = None
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
        self._sent_latched: frozenset[str] | None = None
        self._persist_error: str | None = None  # handing the journal its work failed

    # ---- commands from operators, engineers and the BMS (already authorised) ----

    def reset_trip(self) -> None:
        self._reset_pending = True

    def request_reject(self, on: bool) -> None:
        self.commands = replace(self.commands, request_reject=on)

    def set_maintenance(self, on: bool) -> None:
        self.commands = replace(self.commands, maintenance=on)

    def force(self, tag: str, value: Any, seconds: float, who: str) -> None:
        manual = dict(self.commands.manual)
        manual[tag] = Manual(value, self.clock() + seconds, who)
        self.commands = replace(self.commands, manual=manual)

    # ---- the loop ----

    async def run(self, stop: asyncio.Event) -> None:
        await self.transport.connect()
        await self._write_safe("start")
        self.log.info("controller_started", period_s=self.site.scan.period_s)
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
        now = self.clock()
        self._restore_latches(now)
        cmds = replace(
            self.commands,
            link_ok=link_ok,
            reset=self._reset_pending,
            write_failed=frozenset(self._write_causes),
            degraded=self.degraded(),
        )
        self._reset_pending = False
        decision = self._decide(image, now, cmds)
        notes: list[tuple[str, dict[str, Any]]] = []
        if link_ok:
            notes += await self._write(decision, image, now)
        # outputs first, then the journal, then anyone else (the module's theory of operation)
        told = await self._persist(decision)
        for e in told:
            if e.kind not in _LOGGED_BY_RUNTIME:
                self.log.info(e.kind, source=e.source, **dict(e.detail))
        for kind, kw in notes:
            getattr(self.log, "warning" if kind == "write_failed" else "info")(kind, **kw)
        st = self.status
        st.decision, st.image, st.health = decision, image, self.transport.health
        st.scans += 1
        st.blocked = self.supervisor.blocked_total
        st.degraded = cmds.degraded
        st.write_failed = dict(self._write_causes)
        st.told = tuple(told)
        st.last_scan_s = self.clock() - t0
        if self.on_scan:
            try:
                self.on_scan(st)
            except Exception as e:  # a broken viewer never stops the scan
                self.log.warning("on_scan_failed", error=f"{type(e).__name__}: {e}")
        return decision

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
        await self.offload(partial(self.journal.record, self._waiting, self._latched()))
        self._waiting = []
        await self.offload(self.journal.close)

    def _latched(self) -> frozenset[str]:
        d = self.status.decision
        return d.latched if d is not None else self.supervisor.latched

    async def _persist(self, decision: Decision) -> list[Event]:
        """Hand this scan's events and latch set to the journal; return the events that may
        now be told, in order: those of every commit that has finished, and, once a commit has
        stalled, those held in memory (as when the store fails: an alarm nobody sees helps
        no one; the journal is degraded and they are persisted when it returns)."""
        if self.journal is None:
            return list(decision.events)
        self._waiting += decision.events
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
            and decision.latched == self._sent_latched
            and not self.journal.problem
        ):
            return told  # nothing new for the store (a retry after a failure always goes)
        batch, already = self._waiting, self._waiting_told
        self._waiting, self._waiting_told = [], 0
        self._sent_latched = decision.latched
        try:
            fut = asyncio.ensure_future(
                self.offload(partial(self.journal.record, batch, decision.latched))
            )
            await asyncio.wait_for(asyncio.shield(fut), timeout=self.persist_wait_s)
        except TimeoutError:
            # slow storage: let the commit finish on its own; the next scans go on
            self._inflight, self._inflight_events, self._inflight_told = fut, batch, already
            self._inflight_since = self.clock()
            return told
        except Exception as e:  # the keeper never raises; handing it the work did
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

    def _decide(self, image: ProcessImage, now: float, cmds: Commands) -> Decision:
        """The supervisor's decision, or a degraded one with the guarded safe values."""
        try:
            decision = self.supervisor.step(image, now, cmds)
        except Exception as e:
            return self._fallback(now, e)
        if self._step_error is not None:
            back = Event("step_recovered", now, "runtime", {"was": self._step_error})
            decision = replace(decision, events=(back, *decision.events))
            self._step_error = None
        return decision

    def _fallback(self, now: float, e: Exception) -> Decision:
        err = f"{type(e).__name__}: {e}"
        events: tuple[Event, ...] = ()
        if err != self._step_error:  # once per cause, with where it broke
            tb = traceback.extract_tb(e.__traceback__)
            at = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
            events = (Event("step_failed", now, "runtime", {"error": err, "at": at}),)
        self._step_error = err
        prev = self.status.decision
        return Decision(
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

    async def _write(
        self, decision: Decision, image: ProcessImage, now: float
    ) -> list[tuple[str, dict[str, Any]]]:
        """Write the decision's outputs; note unacknowledged ones once per cause."""
        tripped = image["plc_watchdog_tripped"]
        if (tripped.quality.usable and tripped.value is True) or (
            now - self._resent_at >= RESEND_EVERY_S
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

    def _restore_latches(self, now: float) -> None:
        """A journal that opened only after start-up may hold trips latched before it: restart
        the decision core with them, exactly as a controller restart would."""
        if self.journal is None or self._inflight is not None:
            return  # never while the worker thread may be inside the journal
        restored = self.journal.take_restored()
        if not restored:
            return
        latched = self.supervisor.latched | restored
        self.log.warning("trip_restored", latched=sorted(latched), late=True)
        self.supervisor = Supervisor(self.cfg, now, latched)

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

    A journal that cannot be opened does not stop the service: it starts degraded (reuse
    rejected, an alarm) and keeps retrying. Only a configuration error at start exits.
    """
    import signal

    from controller.logs import configure

    configure(json=json_logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    journal = JournalKeeper(site.state_dir / "heatloop.db")
    await Controller(site, transport, journal=journal).run(stop)
    return 0
