"""`heatloop sim serve`: the simulated plant and PLC as their own process, on the site's endpoints.

Runs until SIGINT or SIGTERM, then stops both servers and exits 0; a port already in use exits 1
with a message. The command line (`controller.cli`) validates the site file and the scenario
before calling `run_serve`, so there is one entry point and one set of checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from plc_io.site import Site
from sim.plc import SimPlc
from sim.scenario import Scenario

EXIT_OK, EXIT_RUNTIME = 0, 1


def run_serve(site: Site, scenario: Scenario | None, speed: float) -> int:
    """Serve an already validated site until stopped; a port in use exits 1 with a message."""
    try:
        return asyncio.run(serve(site, scenario, speed))
    except OSError as e:
        print(f"heatloop sim serve: {e}", file=sys.stderr)
        return EXIT_RUNTIME


async def serve(site: Site, scenario: Scenario | None, speed: float) -> int:
    """Run the simulated PLC until SIGINT/SIGTERM; stop cleanly and return 0."""
    # asyncua warns at start that a None-only endpoint has no signing: expected for this
    # test instrument, and noise on an operator's console.
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    plc = SimPlc(site, speed=speed, scenario=scenario, host=site.plc.host)
    try:
        async with plc:
            print(
                f"simulated PLC: Modbus TCP {plc.host}:{plc.modbus_port} unit "
                f"{site.plc.unit_id}, OPC UA opc.tcp://{plc.host}:{plc.opcua_port}/ "
                f"(speed ×{speed:g}); Ctrl-C stops",
                flush=True,
            )
            stopper = asyncio.create_task(stop.wait())
            runner = asyncio.create_task(plc.wait())
            done, _ = await asyncio.wait({stopper, runner}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if runner in done:
                runner.result()  # the plant task failed: raise it (exit 1)
            runner.cancel()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return EXIT_OK
