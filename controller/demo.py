"""`heatloop demo`: simulated plant, simulated PLC and controller together over loopback.

The controller talks Modbus TCP to the simulated PLC exactly as in production and keeps wall
time, as it does in production; the plant runs `--speed` times faster. Dwell times are shortened
so a minute or two shows the whole story: start-up in DRY_COOLER_REJECT, heat reuse, a leak in
the reuse zone that trips and latches, the leak drying, a deliberate reset, and reuse again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from controller.logs import configure
from controller.runtime import Controller, Status
from controller.study import ClosedLoop
from plc_io.modbus import ModbusTransport
from plc_io.site import Site, demo_site
from sim.plc import SimPlc


@dataclass(frozen=True)
class Act:
    at_s: float  # wall seconds from start
    what: str


STORY = (
    Act(40.0, "inject leak reuse"),
    Act(55.0, "clear leak reuse"),
    Act(65.0, "reset"),
)


def demo_story_site() -> Site:
    return demo_site().with_control(
        reject_dwell_s=15.0,
        reuse_reentry_min_s=15.0,
        customer_ready_dwell_s=15.0,
        min_mode_dwell_s=10.0,
    )


def status_line(elapsed_s: float, st: Status) -> str:
    d = st.decision
    if d is None:
        return "waiting for the first scan"
    v, img = d.values(), st.image

    def t(name: str) -> str:
        x = img.value(name)
        return "  ?  " if x is None else f"{float(x):5.1f}"

    ils = ",".join(sorted(d.active)) or "-"
    return (
        f"t={elapsed_s:7.0f}s {d.mode.value:<17} supply {t('it_supply_temp')} "
        f"return {t('it_return_temp')} tank {t('tank_top_temp')}/{t('tank_bottom_temp')} °C "
        f"delivered {t('heat_meter_power')} kW valve {float(v['reuse_valve_cmd']):5.1f}% "
        f"fans {float(v['drycooler_fan_cmd']):5.1f}% link {st.health.state.value} "
        f"interlocks {ils}" + (f" DEGRADED: {'; '.join(st.degraded)}" if st.degraded else "")
    )


async def _demo(minutes: float | None, speed: float) -> int:
    site = demo_story_site()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with SimPlc(site, speed=speed) as plc:
        t0 = loop.time()
        transport = ModbusTransport(site, port=plc.modbus_port)
        ctl = Controller(site, transport)
        print(
            f"heatloop demo: simulated PLC on Modbus 127.0.0.1:{plc.modbus_port} and OPC UA "
            f"opc.tcp://127.0.0.1:{plc.opcua_port}/, plant ×{speed:g}; Ctrl-C stops\n"
            f"story: {'; '.join(f'{a.at_s:g} s {a.what}' for a in STORY)}",
            flush=True,
        )
        task = asyncio.create_task(ctl.run(stop))
        pending = list(STORY)
        wall_end = None if minutes is None else loop.time() + minutes * 60.0
        try:
            while not stop.is_set() and not task.done():
                await asyncio.sleep(1.0)
                now = loop.time() - t0
                while pending and pending[0].at_s <= now:
                    act = pending.pop(0)
                    print(f"--- t={now:.0f}s: {act.what}", flush=True)
                    if act.what.startswith("inject"):
                        _, name, target = act.what.split()
                        plc.inject(name, target)
                    elif act.what.startswith("clear"):
                        _, name, target = act.what.split()
                        plc.clear(name, target)
                    else:
                        ctl.reset_trip()
                print(status_line(now, ctl.status), flush=True)
                if wall_end is not None and loop.time() >= wall_end:
                    stop.set()
        finally:
            stop.set()
            await task
        st = ctl.status
        print(
            f"stopped after {st.scans} scans, {st.overruns} overruns, "
            f"{st.blocked} blocked commands; PLC watchdog trips {plc.watchdog_trips}",
            flush=True,
        )
    print("\na simulated day of the same site, plant and supervisor in-process (10 s steps):")
    print("\n".join(ClosedLoop(demo_site(), dt_s=10.0).run(86400.0).lines()), flush=True)
    return 0


def run_demo(minutes: float | None = None, speed: float | None = None) -> int:
    configure(json=False)
    try:
        return asyncio.run(_demo(minutes, speed or 10.0))
    except OSError as e:
        print(f"heatloop demo: {e}", file=sys.stderr)
        return 1
