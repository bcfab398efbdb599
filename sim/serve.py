"""`heatloop sim serve`: the simulated plant and PLC as their own process, on the site's endpoints.

Runs until SIGINT or SIGTERM, then stops both servers and exits 0. A bad site file raises
plc_io.site.SiteError and a bad scenario sim.scenario.ScenarioError (the main CLI maps both to
exit 2); a port already in use exits 1 with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from plc_io.site import Site, load_site
from sim.plc import SimPlc
from sim.scenario import Scenario, load_scenario

EXIT_OK, EXIT_RUNTIME = 0, 1


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `sim serve --site SITE [--scenario FILE] [--speed X]` to the main CLI."""
    sim = sub.add_parser("sim", help="the simulated plant and PLC")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    s = sim_sub.add_parser(
        "serve",
        help="serve the simulated PLC over Modbus TCP and OPC UA on the site's endpoints",
        description=(
            "Run the simulated plant and PLC until Ctrl-C / SIGTERM: Modbus TCP on "
            "[plc] host:port (unit [plc] unit_id), OPC UA on opc.tcp://127.0.0.1:[sim] opcua_port/."
        ),
    )
    s.add_argument("--site", required=True, help="site file (TOML)")
    s.add_argument("--scenario", default=None, help="scenario file (TOML) of timed faults")
    s.add_argument(
        "--speed", type=_positive, default=1.0, help="simulated seconds per wall second (1)"
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    site = load_site(args.site)  # SiteError: the caller's exit 2
    scenario = load_scenario(args.scenario) if args.scenario else None  # ScenarioError: exit 2
    return run_serve(site, scenario, args.speed)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m sim.serve serve --site …` for running without the main CLI."""
    from plc_io.site import SiteError
    from sim.scenario import ScenarioError

    parser = argparse.ArgumentParser(prog="python -m sim.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["sim", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except (SiteError, ScenarioError) as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
