"""The scan loop: read, step, write, heartbeat, publish, journal (DESIGN §4).

One `asyncio.TaskGroup` holds the scan and the event-loop lag monitor; they live and die
together. If the process dies, the heartbeat stops and the PLC watchdog takes the plant to its
safe state, by design. Safe values are written at start-up, before the first decision, and on an
orderly shutdown. An overrun (a scan longer than its period) is logged and counted, and the next
scan starts at once rather than being skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from controller.arbitration import Manual
from controller.journal import Journal
from controller.supervisor import Commands, Decision, Supervisor, SupervisorConfig
from plc_io.image import ProcessImage
from plc_io.site import Site
from plc_io.transport import CommsHealth, LinkState, Transport

RESEND_EVERY_S = 10.0  # every output is re-sent this often, whatever the PLC reports


def make_transport(site: Site, **kw: Any) -> Transport:
    """The transport the site file names."""
    if site.plc.transport == "opcua":
        from plc_io.opcua import OpcuaTransport

        return OpcuaTransport(site, **kw)
    from plc_io.modbus import ModbusTransport

    return ModbusTransport(site, **kw)


@dataclass
class Status:
    """The latest scan, as the console view and the BMS see it."""

    decision: Decision | None = None
    image: ProcessImage = field(default_factory=ProcessImage)
    health: CommsHealth = field(default_factory=CommsHealth)
    scans: int = 0
    overruns: int = 0
    blocked: int = 0
    last_scan_s: float = 0.0  # compute + I/O time of the last scan
    max_lag_s: float = 0.0  # worst event-loop lag seen


class Controller:
    """Runs the supervisor against a transport at the site's scan period."""

    def __init__(
        self,
        site: Site,
        transport: Transport,
        *,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_scan: Callable[[Status], None] | None = None,
    ) -> None:
        self.site = site
        self.transport = transport
        self.journal = journal
        self.clock = clock
        self.on_scan = on_scan
        self.log = structlog.get_logger("heatloop.controller")
        latched = journal.latched() if journal else frozenset()
        self.supervisor = Supervisor(SupervisorConfig.from_site(site), clock(), latched)
        if latched:
            self.log.warning("trip_restored", latched=sorted(latched))
        self.commands = Commands()
        self._reset_pending = False
        self.status = Status()
        self._heartbeat = 0
        # the counter wraps within the tag's range, so the PLC never refuses the write
        self._heartbeat_modulo = int(site.tag("heartbeat").hi) + 1
        self._last_link: LinkState | None = None
        self._resent_at = -RESEND_EVERY_S

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
        await self.transport.write_outputs(self._with_heartbeat(self.site.safe_outputs()))
        self.log.info("controller_started", period_s=self.site.scan.period_s)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._scan_loop(stop))
                tg.create_task(self._lag_monitor(stop))
        finally:
            try:
                await asyncio.wait_for(
                    self.transport.write_outputs(self._with_heartbeat(self.site.safe_outputs())),
                    timeout=2.0,
                )
            except Exception as e:  # the watchdog covers a failed farewell
                self.log.warning("safe_write_on_stop_failed", error=str(e))
            await self.transport.close()
            self.log.info("controller_stopped", scans=self.status.scans)

    def _with_heartbeat(self, values: dict[str, Any]) -> dict[str, Any]:
        self._heartbeat = (self._heartbeat + 1) % self._heartbeat_modulo
        return {**values, "heartbeat": float(self._heartbeat)}

    async def scan_once(self) -> Decision:
        t0 = self.clock()
        image = await self.transport.read_inputs()
        health = self.transport.health
        link_ok = health.state is LinkState.OK
        if health.state is not self._last_link:
            self.log.info("plc_link", state=health.state.value, error=health.last_error)
            self._last_link = health.state
        now = self.clock()
        cmds = replace(self.commands, link_ok=link_ok, reset=self._reset_pending)
        self._reset_pending = False
        decision = self.supervisor.step(image, now, cmds)
        if self.journal is not None:
            # durable before anything acts on it or reports it: a trip the PLC has seen, or a
            # log line has announced, is never lost to a kill -9
            self.journal.record(decision.events, decision.latched)
        if link_ok:
            tripped = image["plc_watchdog_tripped"]
            if (tripped.quality.usable and tripped.value is True) or (
                now - self._resent_at >= RESEND_EVERY_S
            ):
                # the PLC releases its safe hold only on fresh commands (DESIGN §7), and a PLC
                # that does not report its watchdog gets them all now and then anyway
                self.transport.resend_all()
                self._resent_at = now
            result = await self.transport.write_outputs(self._with_heartbeat(decision.values()))
            if result.failed:
                self.log.warning("write_failed", failed=dict(result.failed))
        for e in decision.events:
            self.log.info(e.kind, source=e.source, **{k: v for k, v in e.detail.items()})
        st = self.status
        st.decision, st.image, st.health = decision, image, self.transport.health
        st.scans += 1
        st.blocked = self.supervisor.blocked_total
        st.last_scan_s = self.clock() - t0
        if self.on_scan:
            self.on_scan(st)
        return decision

    async def _scan_loop(self, stop: asyncio.Event) -> None:
        period = self.site.scan.period_s
        next_t = self.clock()
        while not stop.is_set():
            await self.scan_once()
            next_t += period
            now = self.clock()
            if now > next_t:
                self.status.overruns += 1
                self.log.warning(
                    "scan_overrun", late_s=round(now - next_t, 4), overruns=self.status.overruns
                )
                next_t = now  # start the next scan at once; never skip one silently
            # a plain sleep: on Python 3.11 wait_for can swallow a cancellation (gh-86296)
            await asyncio.sleep(max(0.0, next_t - self.clock()))

    async def _lag_monitor(self, stop: asyncio.Event, every_s: float = 0.1) -> None:
        while not stop.is_set():
            t = self.clock()
            await asyncio.sleep(every_s)
            lag = self.clock() - t - every_s
            if lag > self.status.max_lag_s:
                self.status.max_lag_s = lag
                if lag > 0.05:
                    self.log.warning("event_loop_lag", lag_s=round(lag, 4))


async def run_service(site: Site, transport: Transport, *, json_logs: bool = True) -> int:
    """`heatloop run`: the controller against the site's PLC until SIGINT/SIGTERM."""
    import signal

    from controller.logs import configure

    configure(json=json_logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    journal = Journal(site.state_dir / "heatloop.db")
    try:
        await Controller(site, transport, journal=journal).run(stop)
    finally:
        journal.close()
    return 0
