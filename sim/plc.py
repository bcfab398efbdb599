"""The simulated PLC: runs the plant model in real time and serves the site's tag table over
Modbus TCP and OPC UA, with the DESIGN §7 watchdog and injectable comms faults.

One asyncio task paces the plant: it wakes at the next plant step, the watchdog's next deadline
or the end of a `comms_drop`, whichever comes first; writes from either protocol feed one command
image and one watchdog synchronously, so a write and the watchdog never disagree. The plant gets
`outputs()`: the commands, or every output's safe value while the watchdog holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from types import TracebackType

import structlog
from asyncua import ua

from plc_io.site import Site
from plc_io.tags import Value
from sim import faults as plant_faults
from sim import plant
from sim.faults import FaultError
from sim.plc_faults import PLC_FAULT_NAMES, CommsFaults, PlcFaultValueError
from sim.plc_modbus import ModbusMap, PlcModbusServer, PlcModbusStore
from sim.plc_opcua import NAMESPACE, PlcOpcua
from sim.plc_watchdog import Watchdog, WatchdogEvent
from sim.scenario import Scenario

log = structlog.get_logger("sim.plc")

ALL_FAULT_NAMES = (*plant_faults.FAULT_NAMES, *PLC_FAULT_NAMES)
_MAX_CATCHUP_STEPS = 500  # per wake-up; further behind, the simulated clock slips instead
_OPCUA_PERIOD_S = 0.1  # wall time between OPC UA refreshes at high speed
_MIN_SLEEP_S = 0.002


class SimPlc:
    """A PLC with a simulated plant behind it. `async with SimPlc(site) as plc: ...`"""

    def __init__(
        self,
        site: Site,
        *,
        speed: float = 1.0,
        scenario: Scenario | None = None,
        seed: int | None = None,
        host: str = "127.0.0.1",
        modbus_port: int | None = None,
        opcua_port: int | None = None,
        opcua_namespace: str = NAMESPACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed={speed!r}: expected a finite number > 0")
        self.site = site
        self.speed = float(speed)
        self.scenario = scenario
        self.seed = site.sim.seed if seed is None else seed
        self.host = host
        self.modbus_port = site.plc.port if modbus_port is None else modbus_port
        self.opcua_port = site.sim.opcua_port if opcua_port is None else opcua_port
        self._clock = clock
        self._step_s = site.sim.step_s
        self._t0_s = site.sim.start_day * 86400.0
        self._state = plant.initial(site.plant, seed=self.seed, t0_s=self._t0_s, tags=site.tags)
        if scenario is not None:
            scenario.check_plant(site.plant)  # refused now, not half-way through the run
            self._state = scenario.apply_due(self._state, -1.0, 0.0)  # events at 0 s
        self._plant_cmds = frozenset(plant.COMMAND_TAGS)
        self._safe: dict[str, Value] = {t.name: t.safe for t in site.outputs if t.safe is not None}
        self._commanded: dict[str, Value] = dict(self._safe)
        self.faults = CommsFaults()
        self._wd = Watchdog(site.plc.watchdog_s, site.plc.watchdog_holdoff_s, now_s=clock())
        self._map = ModbusMap(site.tags)
        self._modbus = PlcModbusServer(
            PlcModbusStore(self._map, site.plc.unit_id, self), host, self.modbus_port
        )
        # `opcua_namespace`: a PLC whose own namespace is not urn:heatloop:plc (tags at their
        # `opcua_node` ids then; see sim.plc_opcua)
        self._opcua = PlcOpcua(
            self,
            site.tags,
            sorted(plant.truth(self._state)),
            host,
            self.opcua_port,
            namespace=opcua_namespace,
        )
        self._task: asyncio.Task[None] | None = None
        self._wake_fut: asyncio.Future[None] | None = None
        self._steps = 0
        self._wall_anchor = 0.0
        self._opcua_dirty = True  # something other than a plant step changed: publish now
        self._plant_dirty = False  # the plant stepped since the last OPC UA refresh
        self._last_opcua = -math.inf
        self._was_dropped = False
        self._started = False

    # ---- lifecycle ----

    async def start(self) -> None:
        if self._started:
            return
        self._wd = Watchdog(
            self.site.plc.watchdog_s, self.site.plc.watchdog_holdoff_s, now_s=self.now()
        )
        self._map.set_cmd(self._commanded)
        self._refresh_modbus()
        await self._modbus.start()
        self.modbus_port = self._modbus.port
        try:
            await self._opcua.start()
        except BaseException:
            await self._modbus.stop()
            raise
        self.opcua_port = self._opcua.port
        self._wall_anchor = self.now()
        self._steps = 0
        self._started = True
        self._task = asyncio.create_task(self._run(), name="sim-plc")
        log.info(
            "sim_plc_started",
            modbus=f"{self.host}:{self.modbus_port}",
            unit_id=self.site.plc.unit_id,
            opcua=self._opcua.endpoint,
            speed=self.speed,
            step_s=self._step_s,
            watchdog_s=self._wd.timeout_s,
            holdoff_s=self._wd.holdoff_s,
            scenario=self.scenario.name if self.scenario else None,
        )
        log.info(
            "plc_watchdog_hold",
            reason="power-up: safe outputs until a steady heartbeat and fresh commands",
        )

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._opcua.stop()
        finally:
            await self._modbus.stop()
        log.info("sim_plc_stopped", sim_time_s=self.sim_time_s, watchdog_trips=self._wd.trips)

    async def wait(self) -> None:
        """Until the plant task ends: returns after `stop`, raises if the task failed."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> SimPlc:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- views ----

    def now(self) -> float:
        return self._clock()

    @property
    def sim_time_s(self) -> float:
        return self._state.t_s

    @property
    def watchdog_tripped(self) -> bool:
        return self._wd.tripped

    @property
    def watchdog_trips(self) -> int:
        return self._wd.trips

    def outputs(self) -> dict[str, Value]:
        """What the plant gets now: the commands, or the safe values while the watchdog holds."""
        return dict(self._safe) if self._wd.tripped else dict(self._commanded)

    def commanded(self) -> dict[str, Value]:
        """What the controller last wrote (safe values for outputs never written)."""
        return dict(self._commanded)

    def truth(self) -> dict[str, float]:
        return plant.truth(self._state)

    def measured(self) -> dict[str, Value]:
        """Every input tag as the PLC reads it now, the watchdog's own inputs included."""
        m: dict[str, Value] = dict(plant.measure(self._state))
        m["plc_watchdog_tripped"] = self._wd.tripped
        m["plc_watchdog_trips"] = float(min(self._wd.trips, 0xFFFF))
        return m

    # ---- faults ----

    def inject(self, name: str, target: str = "", value: float = 1.0) -> None:
        """Inject a plant fault (sim.faults) or a PLC comms fault; FaultError if invalid."""
        if name in PLC_FAULT_NAMES:
            try:
                self.faults.inject(name, target, value, self.now())
            except PlcFaultValueError as e:
                raise FaultError(name, e.field, e.value, e.expected) from e
            except (TypeError, ValueError) as e:
                raise FaultError(name, "value", value, "a number") from e
            self._opcua_dirty = True
            self._wake()
            kind = "plc"
        elif name in plant_faults.FAULT_NAMES:
            self._state = plant_faults.inject(self._state, name, target, value)
            self._refresh_modbus()
            self._opcua_dirty = True
            kind = "plant"
        else:
            raise FaultError(name, "name", name, f"one of {', '.join(ALL_FAULT_NAMES)}")
        log.info("sim_fault_injected", fault=name, target=target, value=value, kind=kind)

    def clear(self, name: str, target: str = "") -> None:
        if name in PLC_FAULT_NAMES:
            broken = self.faults.watchdog_broken
            try:
                self.faults.clear(name, target)
            except PlcFaultValueError as e:
                raise FaultError(name, e.field, e.value, e.expected) from e
            self._watchdog_mended(broken)
            self._opcua_dirty = True
            self._wake()
        elif name in plant_faults.FAULT_NAMES:
            self._state = plant_faults.clear(self._state, name, target)
            self._refresh_modbus()
            self._opcua_dirty = True
        else:
            raise FaultError(name, "name", name, f"one of {', '.join(ALL_FAULT_NAMES)}")
        log.info("sim_fault_cleared", fault=name, target=target)

    def clear_all(self) -> None:
        broken = self.faults.watchdog_broken
        self.faults.clear_all()
        self._watchdog_mended(broken)
        self._state = plant_faults.clear_all(self._state)
        self._refresh_modbus()
        self._opcua_dirty = True
        self._wake()
        log.info("sim_faults_cleared_all")

    # ---- writes (both protocols) ----

    def apply_writes(self, values: dict[str, Value], source: str) -> None:
        """Validated output values from a client: into the command image and the watchdog."""
        now = self.now()
        self._commanded.update(values)
        self._map.set_cmd(values)
        if "heartbeat" in values:
            self._wd.heartbeat(float(values["heartbeat"]), now)
        if any(name != "heartbeat" for name in values):
            self._wd.command(now)
        self._poll_watchdog(now, source)
        self._refresh_modbus_outputs()
        self._opcua_dirty = True
        self._wake()

    # ---- internals ----

    def _watchdog_mended(self, was_broken: bool) -> None:
        """`watchdog_broken` cleared: supervision starts again from this moment, as a restored
        watchdog rung's timer would (a heartbeat silent all along trips watchdog_s later)."""
        if was_broken and not self.faults.watchdog_broken and not self._wd.tripped:
            self._wd.last_change_s = max(self._wd.last_change_s, self.now())

    def _watchdog_off(self) -> bool:
        """The watchdog rung is deleted (`watchdog_broken`): a running watchdog never trips; a
        trip already in force stays and releases as usual."""
        return self.faults.watchdog_broken and not self._wd.tripped

    def _poll_watchdog(self, now: float, cause: str = "timer") -> None:
        if self._watchdog_off():
            return
        event = self._wd.poll(now)
        if event is None:
            return
        if event is WatchdogEvent.TRIP:
            log.warning(
                "plc_watchdog_trip",
                silent_s=round(now - self._wd.last_change_s, 3),
                watchdog_s=self._wd.timeout_s,
                trips=self._wd.trips,
                last_heartbeat=self._wd.last_heartbeat,
            )
        else:
            log.info(
                "plc_watchdog_release",
                held_s=round(now - self._wd.tripped_since_s, 3),
                holdoff_s=self._wd.holdoff_s,
                trips=self._wd.trips,
                cause=cause,
            )
        self._refresh_modbus()
        self._opcua_dirty = True

    def _refresh_modbus_outputs(self) -> None:
        self._map.set_view(self.outputs())

    def _refresh_modbus(self) -> None:
        self._map.set_view(self.measured())
        self._map.set_view(self.outputs())

    def _advance(self, now: float) -> int:
        """Step the plant up to wall time `now`; return the number of steps taken."""
        due = math.floor((now - self._wall_anchor) * self.speed / self._step_s + 1e-9)
        n = 0
        while self._steps < due:
            if n >= _MAX_CATCHUP_STEPS:
                lag = due - self._steps
                self._wall_anchor += lag * self._step_s / self.speed
                log.warning("sim_plant_behind", skipped_steps=lag, speed=self.speed)
                break
            t_run = self._steps * self._step_s
            if self.scenario is not None:
                self._state = self.scenario.apply_due(self._state, t_run, t_run + self._step_s)
            actuators = {k: v for k, v in self.outputs().items() if k in self._plant_cmds}
            self._state = plant.step(self._state, actuators, self._step_s)
            self._steps += 1
            n += 1
        return n

    def opcua_fault_status(self) -> int | None:
        """The status every OPC UA PLC variable shows under a PLC fault: a dropped link reads
        BadNoCommunication, an error fault BadDeviceFailure; None when healthy."""
        if self.faults.dropped(self.now()):
            return ua.StatusCodes.BadNoCommunication
        if self.faults.error_code is not None:
            return ua.StatusCodes.BadDeviceFailure
        return None

    async def _publish_opcua(self) -> None:
        plc_values = {**self.measured(), **self.outputs()}
        await self._opcua.publish_plc(plc_values, self.opcua_fault_status())
        plant_values: dict[str, float | bool | int] = dict(self.truth())
        plant_values["watchdog_tripped"] = self._wd.tripped
        plant_values["watchdog_trips"] = self._wd.trips
        plant_values["sim_time_s"] = self.sim_time_s
        await self._opcua.publish_plant(plant_values)

    def _wake(self) -> None:
        """Cut the plant task's sleep short (a write or a fault changed a deadline)."""
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _sleep(self, delay_s: float) -> None:
        # A plain future and a timer rather than wait_for(Event.wait()): on Python 3.11 a
        # cancel landing as wait_for times out can leave the task unable to finish.
        loop = asyncio.get_running_loop()
        self._wake_fut = loop.create_future()
        timer = loop.call_later(delay_s, self._wake)
        try:
            await self._wake_fut
        finally:
            timer.cancel()
            self._wake_fut = None

    async def _run(self) -> None:
        try:
            while True:
                now = self.now()
                self._poll_watchdog(now)
                if self._advance(now):
                    self._refresh_modbus()
                    self._plant_dirty = True
                dropped = self.faults.dropped(now)
                if dropped != self._was_dropped:
                    self._was_dropped = dropped
                    self._opcua_dirty = True
                    log.info("sim_comms_drop_" + ("start" if dropped else "end"))
                # Writes, faults and watchdog changes reach OPC UA at once; plant steps too,
                # unless they come faster than _OPCUA_PERIOD_S of wall time (high speed): then
                # at most one refresh per period (each costs ~0.5 ms of loop time).
                throttle = self._step_s / self.speed < _OPCUA_PERIOD_S
                plant_due = self._plant_dirty and (
                    not throttle or now - self._last_opcua >= _OPCUA_PERIOD_S
                )
                if self._opcua_dirty or plant_due:
                    self._opcua_dirty = self._plant_dirty = False
                    self._last_opcua = now
                    await self._publish_opcua()
                wake = self._wall_anchor + (self._steps + 1) * self._step_s / self.speed
                if not self._watchdog_off():
                    wake = min(wake, self._wd.deadline_s())
                if dropped and self.faults.drop_until_s is not None:
                    wake = min(wake, self.faults.drop_until_s)
                if self._plant_dirty:
                    wake = min(wake, self._last_opcua + _OPCUA_PERIOD_S)
                await self._sleep(max(_MIN_SLEEP_S, wake - self.now()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sim_plc_loop_failed", sim_time_s=self.sim_time_s)
            raise
