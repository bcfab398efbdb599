"""`heatloop demo`: simulated plant, simulated PLC, controller and BMS server over loopback.

The controller talks Modbus TCP to the simulated PLC exactly as in production and keeps wall
time, as it does in production; the plant runs `--speed` times faster. Dwell times are shortened
so a minute or two shows the whole story: start-up in DRY_COOLER_REJECT, heat reuse, a leak in
the reuse zone that trips and latches, the leak drying, a deliberate reset, and reuse again.

The BMS OPC UA server runs as in production, in its own process beside the scan (DESIGN §9),
on opc.tcp://127.0.0.1:4840/heatloop (another free port when 4840 is taken), with a state
directory of its own (a temporary one unless given) and three users, viewer, operator and
engineer, whose random passwords are printed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.logs import configure
from controller.metrics import Metrics
from controller.runtime import Controller, Status, start_bms_link, stop_bms_link
from controller.study import ClosedLoop
from plc_io.modbus import ModbusTransport
from plc_io.site import MetricsConfig, Site, demo_site
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


BMS_HOST = "127.0.0.1"  # the demo's users and passwords are printed: serve this machine only
BMS_PORT = 4840
METRICS_PORT = 9640  # the Prometheus endpoint ([metrics]), another free port when taken
BMS_ROLES = ("viewer", "operator", "engineer")


def free_port(host: str = BMS_HOST, preferred: int = BMS_PORT) -> int:
    """`preferred` when it can be bound now, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free TCP port on {host}")


def demo_bms_site(site: Site, state_dir: Path, port: int, metrics_port: int | None = None) -> Site:
    """`site` with its state in `state_dir`, the BMS server on BMS_HOST:`port` and, when given,
    the metrics endpoint on BMS_HOST:`metrics_port`."""
    update = {
        "state": site.state.model_copy(update={"dir": str(state_dir)}),
        "bms": site.bms.model_copy(update={"enabled": True, "host": BMS_HOST, "port": port}),
    }
    if metrics_port is not None:
        update["metrics"] = MetricsConfig(host=BMS_HOST, port=metrics_port)
    return site.model_copy(update=update)


def make_users(site: Site) -> dict[str, str]:
    """One BMS user per role, named after it, with a random password: name -> password."""
    from controller.bms_users import add_user, users_path

    made = {}
    for role in BMS_ROLES:
        password = secrets.token_urlsafe(15)
        add_user(users_path(site), role, role, password)
        made[role] = password
    return made


def status_line(elapsed_s: float, st: Status, meter: dict[str, Any] | None = None) -> str:
    d = st.decision
    if d is None:
        return "waiting for the first scan"
    v, img = d.values(), st.image

    def t(name: str) -> str:
        x = img.value(name)
        return "  ?  " if x is None else f"{float(x):5.1f}"

    ils = ",".join(sorted(d.active)) or "-"
    billed = ""
    if meter is not None:
        a = meter["availability_pct"]
        billed = f"billed {meter['totals']['delivered_kwh']:7.2f} kWh " + (
            f"avail {a:5.1f}% " if a is not None else ""
        )
    return (
        f"t={elapsed_s:7.0f}s {d.mode.value:<17} supply {t('it_supply_temp')} "
        f"return {t('it_return_temp')} tank {t('tank_top_temp')}/{t('tank_bottom_temp')} °C "
        f"delivered {t('heat_meter_power')} kW {billed}valve {float(v['reuse_valve_cmd']):5.1f}% "
        f"fans {float(v['drycooler_fan_cmd']):5.1f}% link {st.health.state.value} "
        f"interlocks {ils}" + (f" DEGRADED: {'; '.join(st.degraded)}" if st.degraded else "")
    )


async def _demo(minutes: float | None, speed: float, state_dir: Path) -> int:
    port = free_port()
    site = demo_bms_site(demo_story_site(), state_dir, port, free_port(preferred=METRICS_PORT))
    users = make_users(site)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with SimPlc(site, speed=speed) as plc:
        t0 = loop.time()
        transport = ModbusTransport(site, port=plc.modbus_port)
        ctl = Controller(site, transport)
        metrics = Metrics(site, ctl)
        metrics.start()
        ctl.scan_hooks.append(metrics.on_scan)
        assert site.metrics is not None
        busy = "" if port == BMS_PORT else f" ({BMS_PORT} is taken)"
        print(
            f"heatloop demo: simulated PLC on Modbus 127.0.0.1:{plc.modbus_port} and OPC UA "
            f"opc.tcp://127.0.0.1:{plc.opcua_port}/, plant ×{speed:g}; Ctrl-C stops\n"
            f"BMS server: opc.tcp://{BMS_HOST}:{port}/heatloop{busy}, Basic256Sha256 Sign or "
            f"SignAndEncrypt; state in {state_dir}\n"
            f"metrics for Prometheus: http://{BMS_HOST}:{site.metrics.port}/metrics\n"
            "BMS users (shown only now):\n"
            + "".join(f"  {name:<9} password {pw}\n" for name, pw in users.items())
            + f"story: {'; '.join(f'{a.at_s:g} s {a.what}' for a in STORY)}",
            flush=True,
        )
        task = asyncio.create_task(ctl.run(stop))
        link = start_bms_link(site, ctl, stop, json_logs=False)
        bms_state = "off"
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
                print(status_line(now, ctl.status, ctl.meter_view()), flush=True)
                bms = ctl.status_view()["bms"]
                if bms["state"] != bms_state:
                    bms_state = bms["state"]
                    print(f"--- BMS server {bms_state} {bms.get('endpoint') or ''}", flush=True)
                if wall_end is not None and loop.time() >= wall_end:
                    stop.set()
        finally:
            stop.set()
            await task
            await stop_bms_link(link)
            metrics.close()
        st = ctl.status
        print(
            f"stopped after {st.scans} scans, {st.overruns} overruns, "
            f"{st.blocked} blocked commands; PLC watchdog trips {plc.watchdog_trips}",
            flush=True,
        )
    print("\na simulated day of the same site, plant and supervisor in-process (10 s steps):")
    day = ClosedLoop(demo_site(), dt_s=10.0, metered=True)
    print("\n".join([*day.run(86400.0).lines(), *day.metered_lines()]), flush=True)
    return 0


def run_demo(
    minutes: float | None = None, speed: float | None = None, state: Path | None = None
) -> int:
    """The demo; `state` keeps its state directory (BMS users, certificates), else a temporary
    one is removed at the end."""
    configure(json=False)
    try:
        with contextlib.ExitStack() as stack:
            if state is None:
                state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="heatloop-")))
            state.mkdir(parents=True, exist_ok=True)
            return asyncio.run(_demo(minutes, speed or 10.0, state))
    except OSError as e:
        print(f"heatloop demo: {e}", file=sys.stderr)
        return 1
