"""The `heatloop` command line. Exit codes: 0 success, 2 bad usage or site file, 1 failure.

The plant model (`sim`) is imported only inside the commands that run it (`demo`, `study`,
`sim serve`): the production controller (`run`) never loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from controller.sitecheck import checked, load_checked_site
from plc_io.site import Site, SiteError, demo_site, demo_site_text
from plc_io.tags import Tag

if TYPE_CHECKING:  # for annotations only: `run` must not load the plant model
    from sim.scenario import Scenario

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage or a bad file or directory; exits with code 2."""


def check_state_dir(site: Site) -> Path:
    """Create the state directory if needed and prove it writable; UsageError (exit 2) if not.

    Checked at start-up, before any connection: a journal that cannot persist is a
    configuration error here, not something to discover in the first scan.
    """
    d = site.state_dir
    if d.exists() and not d.is_dir():
        raise UsageError(f"state.dir {str(d)!r}: expected a directory, found a file")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UsageError(
            f"state.dir {str(d)!r}: expected a writable directory ({e.strerror or e})"
        ) from None
    return d


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def tag_table_lines(site: Site) -> list[str]:
    """The tag table as fixed-width text (what `heatloop check` prints)."""
    rows = [("tag", "dir", "type", "unit", "range", "modbus", "encoding", "safe", "cut wire")]

    def cut(t: Tag) -> str:
        """What a broken circuit on this boolean input reads (commissioning proves it)."""
        if t.supervised_by is not None:
            return f"invalid (supervised by {t.supervised_by})"
        if t.fail_state is not None:
            return f"reads {str(t.fail_state).lower()}"
        return ""

    def enc(t: Tag) -> str:
        m = t.modbus
        s = m.encoding.value
        if m.scale != 1.0:
            s += f" ×{_fmt_num(m.scale)}"
        if m.width == 2:
            s += f" {m.word_order}"
        return s

    for t in site.tags:
        rows.append(
            (
                t.name,
                "out" if t.is_output else "in",
                t.type.value,
                t.unit,
                f"{_fmt_num(t.lo)}…{_fmt_num(t.hi)}",
                f"{t.modbus.table.value}:{t.modbus.address}",
                enc(t),
                "" if t.safe is None else str(t.safe).lower(),
                cut(t),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists; use --force to overwrite")
    if path.is_dir():
        raise UsageError(f"{path}: expected a file path, found a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(demo_site_text(), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot write the site file ({e.strerror or e})") from None
    print(f"wrote the demo site file to {path}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    site = load_checked_site(args.site)
    print(f"site {site.site.name!r}: {len(site.inputs)} inputs, {len(site.outputs)} outputs — OK")
    print()
    print("\n".join(tag_table_lines(site)))
    print()
    print("cause-and-effect matrix (interlocks; thresholds from this site file)")
    print("\n".join(cause_effect_lines(site)))
    return EXIT_OK


def cause_effect_lines(site: Site) -> list[str]:
    from controller.supervisor import SupervisorConfig
    from interlocks.rules import matrix_lines

    cfg = SupervisorConfig.from_site(site)
    return matrix_lines(tuple(t.name for t in site.outputs), cfg.thresholds)


def cmd_demo(args: argparse.Namespace) -> int:
    checked(demo_site(), "<demo site>")  # the embedded site passes the same checks as any other
    from controller.demo import run_demo

    return run_demo(minutes=args.minutes, speed=args.speed)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from controller.runtime import make_transport, run_service

    site = load_checked_site(args.site)
    check_state_dir(site)
    try:
        transport = make_transport(site)
    except ValueError as e:  # e.g. a password variable the site names is not set
        raise UsageError(str(e)) from e
    return asyncio.run(run_service(site, transport, json_logs=not args.console))


def cmd_study(args: argparse.Namespace) -> int:
    import time

    from controller.study import ClosedLoop

    site = load_checked_site(args.site)
    scenario = _scenario(args.scenario)
    loop = ClosedLoop(site, seed=args.seed, scenario=scenario, dt_s=args.step)
    t0 = time.perf_counter()
    result = loop.run(args.days * 86400.0)
    wall = time.perf_counter() - t0
    print(f"study of {site.site.name!r}: {args.days:g} days at {args.step:g} s steps")
    print("\n".join(result.lines()))
    print(f"speed                  {result.sim_s / wall:10.0f} × real time ({wall:.1f} s wall)")
    return EXIT_OK


def _scenario(path: str | None) -> Scenario | None:
    """Load a scenario file; a bad one is a UsageError (exit 2)."""
    if path is None:
        return None
    from sim.scenario import ScenarioError, load_scenario

    try:
        return load_scenario(path)
    except ScenarioError as e:
        raise UsageError(str(e)) from None


def cmd_sim_serve(args: argparse.Namespace) -> int:
    site = load_checked_site(args.site)
    scenario = _scenario(args.scenario)
    from sim.serve import run_serve

    return run_serve(site, scenario, args.speed)


def _number_in(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number with lo < x ≤ hi (usage error, exit 2, otherwise)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not lo < v <= hi:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number > {lo:g} and ≤ {hi:g}")
        return v

    return parse


_positive = _number_in(0.0, 1e6)  # --speed: simulated seconds per wall second


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number 0 … 2**32 - 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heatloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write the demo site file as a starting point")
    s.add_argument("path")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("check", help="validate a site file and print its tag table")
    s.add_argument("site")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("demo", help="run the embedded demo site")
    s.add_argument(
        "--minutes", type=_number_in(0, 525_600), default=None, help="stop after N wall minutes"
    )
    s.add_argument(
        "--speed", type=_positive, default=None, help="simulated seconds per wall second"
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("run", help="the production controller")
    s.add_argument("--site", required=True)
    s.add_argument("--console", action="store_true", help="readable logs instead of JSON")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("study", help="plant and supervisor in-process at full speed")
    s.add_argument("--site", required=True)
    s.add_argument("--days", type=_number_in(0, 3660), default=1.0)
    s.add_argument(
        "--step", type=_number_in(0, 3600), default=10.0, help="simulated seconds per step"
    )
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--scenario", default=None, help="scenario file (TOML) of timed faults")
    s.set_defaults(func=cmd_study)

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
    s.set_defaults(func=cmd_sim_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage already; keep 0 for --help
        return int(e.code or 0)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `heatloop check SITE | head`: the reader has seen enough. Problems go to stderr
        # before anything is printed, so the output stopped on the success path.
        _silence_stdout()
        return EXIT_OK
    except SiteError as e:
        for p in e.problems:
            print(f"{e.source}: {p}", file=sys.stderr)
        print(f"{e.source}: {len(e.problems)} problem(s); nothing started", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"heatloop: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
