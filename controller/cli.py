"""The `heatloop` command line. Exit codes: 0 success, 2 bad usage or site file, 1 failure.

The plant model (`sim`) is imported only inside the commands that run it (`demo`, `study`,
`sim serve`): the production controller (`run`) never loads it.

The commands on a running controller (`status`, `alarms`, `journal`, `reset`, `ack`, `bypass`,
`force`, `maintenance`, `reject`, `setpoint`, `shelve`) each send one request over the site's
command channel (controller/channel.py) and exit 0 when it is accepted or read, 2 when it is
malformed or refused (one line: what and why), 1 when no controller answers. They load only the
site file and the channel, so they start quickly; the controller checks every request again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from plc_io.site import Site, SiteError, demo_site, demo_site_text, load_site
from plc_io.tags import Tag

if TYPE_CHECKING:  # for annotations only: `run` must not load the plant model
    from sim.scenario import Scenario


def load_checked_site(path: str) -> Site:
    """The site file with its safe-value checks (imported here: `status` needs neither)."""
    from controller.sitecheck import load_checked_site as load

    return load(path)


def checked(site: Site, source: str) -> Site:
    from controller.sitecheck import checked as check

    return check(site, source)


EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage or a bad file or directory; exits with code 2."""


class Refused(Exception):
    """The controller refused the request (the message says what and why); exit 2."""


class NoAnswer(Exception):
    """No controller answers on the site's socket; exit 1."""


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

    # the site file first: a broken one exits 2 before anything heavier is loaded
    site = load_checked_site(args.site)
    check_state_dir(site)
    if args.reset_state:
        _reset_state(site, args.reason)
    elif args.reason is not None:
        raise UsageError("--reason: expected only with --reset-state")

    from controller.runtime import make_transport, run_service

    try:
        transport = make_transport(site)
    except ValueError as e:  # e.g. a password variable the site names is not set
        raise UsageError(str(e)) from e
    return asyncio.run(run_service(site, transport, json_logs=not args.console))


def cmd_study(args: argparse.Namespace) -> int:
    import time

    from controller.study import ClosedLoop

    site = load_checked_site(args.site)
    scenario = _scenario(args.scenario, site)
    loop = ClosedLoop(site, seed=args.seed, scenario=scenario, dt_s=args.step, metered=True)
    t0 = time.perf_counter()
    result = loop.run(args.days * 86400.0)
    wall = time.perf_counter() - t0
    print(f"study of {site.site.name!r}: {args.days:g} days at {args.step:g} s steps")
    print("\n".join([*result.lines(), *loop.metered_lines()]))
    print(f"speed                  {result.sim_s / wall:10.0f} × real time ({wall:.1f} s wall)")
    if args.report is not None:
        from controller.study import write_statement

        for p in write_statement(loop, Path(args.report), site):
            print(f"statement written: {p}")
    return EXIT_OK


def _scenario(path: str | None, site: Site) -> Scenario | None:
    """Load a scenario file and check it against the site's plant; a bad one is a UsageError
    (exit 2)."""
    if path is None:
        return None
    from sim.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(path)
        scenario.check_plant(site.plant)
        return scenario
    except ScenarioError as e:
        raise UsageError(str(e)) from None


def cmd_sim_serve(args: argparse.Namespace) -> int:
    site = load_checked_site(args.site)
    scenario = _scenario(args.scenario, site)
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


# ---- commands on a running controller (DESIGN §13): one request over the site's socket ----

MAX_REASON = 500  # characters, as the controller takes them
MAX_MINUTES = 1e6  # a sanity bound; the controller applies the site's own maximum
JOURNAL_MAX = 10_000


def _reason(text: str) -> str:
    if not text.strip() or len(text) > MAX_REASON:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: expected a reason of 1 to {MAX_REASON} characters"
        )
    return text


_minutes = _number_in(0.0, MAX_MINUTES)


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return v


def _limit(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= JOURNAL_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number 1 … {JOURNAL_MAX}")
    return v


_ON_OFF = {"on": True, "off": False}
_BOOL_WORDS = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_when(text: str, now_wall: float) -> float:
    """A wall time from ISO 8601 (no zone: UTC) or relative to now (`-15m`, `-1h`, `-2d`)."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now_wall - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected ISO 8601 (2026-12-01T13:00, UTC unless a zone is "
            "given) or a time ago (-30s, -15m, -1h, -2d)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def tag_value(site: Site, tag: str, text: str) -> bool | float:
    """A force value read by the tag's type; UsageError naming the tag and what it takes."""
    try:
        t = site.tag(tag)
    except KeyError:
        raise UsageError(f"tag {tag!r}: expected a tag of this site") from None
    if t.is_bool:
        v = _BOOL_WORDS.get(text.strip().lower())
        if v is None:
            raise UsageError(f"{tag} {text!r}: expected true/false, on/off or 1/0 (a boolean)")
        return v
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise UsageError(f"{tag} {text!r}: expected a finite number in {t.unit}")
    return x


def _socket(site: Site) -> Path:
    from controller.channel import socket_path

    return socket_path(site.state_dir)


def request(site: Site, cmd: str, args: dict[str, object], reason: str = "") -> dict[str, object]:
    """Send one request; its reply if accepted, else Refused (exit 2) or NoAnswer (exit 1)."""
    from controller.channel import NoController, call

    try:
        reply = call(_socket(site), cmd, args, reason)
    except NoController as e:
        raise NoAnswer(str(e)) from None
    if not reply.get("ok"):
        raise Refused(f"{cmd}: {reply.get('why') or 'no reason given'}")
    return reply


def _accepted(cmd: str, reply: Mapping[str, object]) -> int:
    old, new = reply.get("old"), reply.get("new")
    change = "" if old is None and new is None else f": {_shown(old)} → {_shown(new)}"
    print(f"{cmd}: accepted{change}")
    return EXIT_OK


def _shown(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_shown(x) for x in v) or "none"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_shown(x)}" for k, x in v.items()) or "none"
    return str(v)


def _when(wall: object) -> str:
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall):
        return "-"
    try:
        return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "-"


def _span(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _until(wall: object, now: object) -> str:
    text = _when(wall)
    if isinstance(wall, (int, float)) and isinstance(now, (int, float)) and text != "-":
        text += f" (in {_span(float(wall) - float(now))})"
    return text


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def _list(v: object) -> list[object]:
    return list(v) if isinstance(v, (list, tuple)) else []


def _map(v: object) -> Mapping[str, object]:
    return v if isinstance(v, Mapping) else {}


def alarm_rows(alarms: list[object]) -> list[str]:
    rows = [("", "priority", "state", "alarm", "since", "message")]
    for a in alarms:
        a = _map(a)
        mark = "*" if a.get("first_out") else ""
        state = str(a.get("state", ""))
        if a.get("shelved_until") is not None:
            state += f", shelved until {_when(a.get('shelved_until'))}"
        if a.get("chatter_count"):
            state += f", chattering ×{a.get('chatter_count')}"
        message = str(a.get("message", ""))
        if a.get("detail"):
            message += f": {a.get('detail')}"
        rows.append(
            (
                mark,
                str(a.get("priority", "")),
                state,
                str(a.get("id", "")),
                _when(a.get("since_wall")),
                message,
            )
        )
    return _table(rows)


def status_lines(st: Mapping[str, object]) -> list[str]:
    """The status page a person reads (DESIGN §13); every field optional, nothing assumed."""
    now = st.get("wall")
    out = [f"site {st.get('site', '?')}   at {_when(now)}"]
    since = st.get("mode_since_wall")
    mode = f"mode {st.get('mode', '?')}"
    if isinstance(since, (int, float)) and isinstance(now, (int, float)):
        mode += f" since {_when(since)} ({_span(float(now) - float(since))})"
    out.append(mode)
    reasons = _list(st.get("reject_reasons"))
    if reasons:
        out.append("not reusing heat: " + "; ".join(str(r) for r in reasons))
    elif st.get("waiting"):
        out.append(f"not reusing heat yet: {st['waiting']}")
    flags = []
    if st.get("maintenance"):
        flags.append("MAINTENANCE on")
    if st.get("reject_requested"):
        flags.append("reject requested")
    hold = st.get("heartbeat_hold_until_wall")
    if isinstance(hold, (int, float)):
        flags.append(f"HEARTBEAT HELD (watchdog proof test) until {_until(hold, now)}")
    if flags:
        out.append(" · ".join(flags))
    degraded = _list(st.get("degraded"))
    if degraded:
        out.append("DEGRADED: " + "; ".join(str(d) for d in degraded))

    il = _map(st.get("interlocks"))
    out += ["", "interlocks"]
    out.append(f"  active:   {', '.join(map(str, _list(il.get('active')))) or 'none'}")
    out.append(f"  latched:  {', '.join(map(str, _list(il.get('latched')))) or 'none'}")
    bypassed = _list(il.get("bypassed"))
    if not bypassed:
        out.append("  bypassed: none")
    for b in bypassed:
        b = _map(b)
        out.append(
            f"  bypassed: {b.get('rule')} until {_until(b.get('until_wall'), now)} "
            f"by {b.get('who')}: {b.get('reason')}"
        )

    alarms = _list(st.get("alarms"))
    out += ["", f"alarms ({len(alarms)} standing; * first out)"]
    out += alarm_rows(alarms) if alarms else ["  none"]

    outputs = _map(st.get("outputs"))
    out += ["", "outputs"]
    rows = [("tag", "value", "set by", "why")]
    for tag, o in outputs.items():
        o = _map(o)
        rows.append((tag, _shown(o.get("value")), str(o.get("level", "")), str(o.get("why", ""))))
    out += _table(rows) if outputs else ["  none yet (no scan completed)"]

    invalid = _map(st.get("invalid"))
    if invalid:
        out += ["", "invalid inputs"]
        out += _table([(tag, str(why)) for tag, why in invalid.items()])

    forces = _list(st.get("forces"))
    if forces:
        out += ["", "forces"]
        for f in forces:
            f = _map(f)
            kind = "input" if f.get("input") else "output"
            out.append(
                f"  {f.get('tag')} = {_shown(f.get('value'))} ({kind}) until "
                f"{_until(f.get('until_wall'), now)} by {f.get('who')}: {f.get('reason')}"
            )
    setpoints = _map(st.get("setpoints"))
    if setpoints:
        out += ["", "setpoints: " + ", ".join(f"{k} = {_shown(v)}" for k, v in setpoints.items())]

    proofs = {str(k): _map(v) for k, v in _map(st.get("proof_tests")).items()}
    if proofs:
        overdue = [k for k, v in proofs.items() if v.get("overdue")]
        line = "proof tests: " + (f"OVERDUE {', '.join(overdue)}" if overdue else "none overdue")
        dues = [d for v in proofs.values() if isinstance(d := v.get("due_wall"), (int, float))]
        if dues:
            line += f"; next due {_when(min(dues))}"
        out += ["", line]

    meter = _map(st.get("meter"))
    if meter:
        today, life = _map(meter.get("today")), _map(meter.get("totals"))
        out += [
            "",
            f"meter: billed today {_kwh(today.get('delivered_kwh'))}, since the store was "
            f"created {_kwh(life.get('delivered_kwh'))}; availability today "
            f"{_pct(meter.get('availability_today_pct'))}, since created "
            f"{_pct(meter.get('availability_pct'))}",
        ]
        stop = _map(meter.get("open_interruption"))
        if stop:
            out.append(
                f"  interrupted since {_when(stop.get('start_wall'))}: {stop.get('cls')} "
                f"({stop.get('detail')})"
            )

    link, scan = _map(st.get("link")), _map(st.get("scan"))
    errors = link.get("failures", link.get("errors", 0))
    out += [
        "",
        f"link  {link.get('state', '?')}   requests {link.get('requests', 0)}   "
        f"failures {errors}"
        + (f"   last error: {link.get('last_error')}" if link.get("last_error") else ""),
        f"scan  {scan.get('count', 0)} scans   overruns {scan.get('overruns', 0)}   "
        f"last {_shown(scan.get('last_ms'))} ms   period {_shown(scan.get('period_s'))} s",
    ]
    bms = _map(st.get("bms"))
    if bms:
        line = f"bms   {bms.get('state', '?')}"
        if bms.get("endpoint"):
            line += f"   {bms['endpoint']}"
        line += f"   restarts {bms.get('restarts', 0)}   dropped {bms.get('dropped', 0)}"
        if bms.get("last_error"):
            line += f"   last error: {bms['last_error']}"
        out.append(line)
    return out


def journal_lines(data: Mapping[str, object]) -> list[str]:
    """Events and command records, oldest first, one line each."""
    rows: list[tuple[float, str]] = []
    for e in _list(data.get("events")):
        e = _map(e)
        detail = e.get("detail")
        text = _shown(detail) if isinstance(detail, Mapping) else str(detail or "")
        wall = e.get("wall")
        line = f"{_when(wall)}  {e.get('kind', '')}  {e.get('source', '')}  {text}".rstrip()
        rows.append((wall if isinstance(wall, (int, float)) else 0.0, line))
    for c in _list(data.get("commands")):
        c = _map(c)
        wall = c.get("wall_time", c.get("wall"))
        verdict = "accepted" if c.get("accepted") else f"refused: {c.get('why', '')}"
        target = f" {c.get('target')}" if c.get("target") else ""
        change = ""
        if c.get("old") is not None or c.get("new") is not None:
            change = f" {_shown(c.get('old'))} → {_shown(c.get('new'))}"
        reason = f" ({c.get('reason')})" if c.get("reason") else ""
        line = (
            f"{_when(wall)}  command {c.get('cmd', '')}{target}{change} by "
            f"{c.get('principal', '?')} [{c.get('role', '?')}, {c.get('via', '?')}]{reason}: "
            f"{verdict}"
        )
        rows.append((wall if isinstance(wall, (int, float)) else 0.0, line))
    rows.sort(key=lambda r: r[0])
    return [line for _, line in rows]


def _kwh(x: object) -> str:
    return f"{x:.1f} kWh" if isinstance(x, int | float) and not isinstance(x, bool) else "?"


def _pct(x: object) -> str:
    return f"{x:.2f} %" if isinstance(x, int | float) and not isinstance(x, bool) else "n/a"


def cmd_status(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    if not args.watch:
        data = request(site, "status", {})["data"]
        print(json.dumps(data, indent=2) if args.json else "\n".join(status_lines(_map(data))))
        return EXIT_OK
    while True:  # until Ctrl-C (main turns it into exit 0)
        try:
            data = request(site, "status", {})["data"]
            page = json.dumps(data) if args.json else "\n".join(status_lines(_map(data)))
        except (NoAnswer, Refused) as e:
            page = f"heatloop: {e}"
        if not args.json:
            page = "\x1b[H\x1b[2J" + page  # redraw in place
        print(page, flush=True)
        time.sleep(1.0)


def cmd_alarms(args: argparse.Namespace) -> int:
    data = _map(request(load_site(args.site), "alarms", {})["data"])
    alarms = _list(data.get("alarms"))
    print("\n".join(alarm_rows(alarms)) if alarms else "no standing alarms")
    return EXIT_OK


def cmd_journal(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    since = None if args.since is None else parse_when(args.since, time.time())
    query = {"since_wall": since, "kinds": args.kind, "limit": args.limit}
    data = _map(request(site, "journal", query)["data"])
    lines = journal_lines(data)
    print("\n".join(lines) if lines else "nothing journalled in that window")
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    return _accepted("reset", request(site, "reset", {"rules": args.rules}, args.reason))


def cmd_ack(args: argparse.Namespace) -> int:
    if bool(args.alarms) == bool(args.all):
        raise UsageError("ack: expected alarm ids or --all (one of the two)")
    body: dict[str, object] = {"all": True} if args.all else {"alarms": args.alarms}
    return _accepted("ack", request(load_site(args.site), "ack", body))


def _hold(args: argparse.Namespace, key: str, what: str, end_flag: str) -> dict[str, object]:
    """The args of a bypass or shelve: either --minutes with --reason, or the end flag."""
    ending = getattr(args, end_flag)
    if ending and args.minutes is not None:
        raise UsageError(f"{args.command}: expected --minutes or --{end_flag}, not both")
    if ending:
        return {key: what, end_flag: True}
    if args.minutes is None or args.reason is None:
        raise UsageError(f"{args.command}: expected --minutes N --reason TEXT (or --{end_flag})")
    return {key: what, "minutes": args.minutes}


def cmd_bypass(args: argparse.Namespace) -> int:
    body = _hold(args, "rule", args.rule, "end")
    return _accepted("bypass", request(load_site(args.site), "bypass", body, args.reason or ""))


def cmd_shelve(args: argparse.Namespace) -> int:
    body = _hold(args, "alarm", args.alarm, "end")
    return _accepted("shelve", request(load_site(args.site), "shelve", body, args.reason or ""))


def cmd_force(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    if args.release:
        if args.value is not None or args.minutes is not None:
            raise UsageError("force --release: expected no VALUE and no --minutes")
        body: dict[str, object] = {"tag": args.tag, "release": True}
    else:
        if args.value is None or args.minutes is None or args.reason is None:
            raise UsageError("force: expected TAG VALUE --minutes N --reason TEXT (or --release)")
        value = tag_value(site, args.tag, args.value)
        body = {"tag": args.tag, "value": value, "minutes": args.minutes}
    return _accepted("force", request(site, "force", body, args.reason or ""))


def cmd_switch(args: argparse.Namespace) -> int:
    """maintenance on|off, reject on|off."""
    body = {"on": _ON_OFF[args.state]}
    return _accepted(args.command, request(load_site(args.site), args.command, body, args.reason))


def cmd_setpoint(args: argparse.Namespace) -> int:
    body = {"name": args.name, "value": args.value}
    return _accepted("setpoint", request(load_site(args.site), "setpoint", body))


def cmd_report(args: argparse.Namespace) -> int:
    site = load_site(args.site)  # a bad site file: SiteError, exit 2
    from controller.report import run_report

    return run_report(site, args.from_text, args.to_text, args.format, args.plot, args.out)


def cmd_replay(args: argparse.Namespace) -> int:
    site = load_checked_site(args.site)
    from controller.replay import run_replay_cli

    return int(run_replay_cli(site, args.from_text, args.to_text, args.export))


def _reset_state(site: Site, reason: str | None) -> None:
    """`run --reset-state --reason`: move the saved state aside, journalled with the OS user."""
    if reason is None:
        raise UsageError("--reset-state: expected --reason TEXT (why the saved state is dropped)")
    import getpass

    from controller.journal import reset_state

    path = site.state_dir / "heatloop.db"
    try:
        kept = reset_state(path, reason, who=getpass.getuser())
    except (ValueError, OSError) as e:
        raise UsageError(f"--reset-state: {e}") from None
    print(f"saved state moved to {kept}" if kept else f"no saved state at {path}; starting anew")


def add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def parser(
        name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--site", required=True, help="site file (TOML)")
        s.set_defaults(func=func)
        return s

    s = parser("status", "the running controller's status page", cmd_status)
    s.add_argument("--json", action="store_true", help="the status as JSON")
    s.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")

    parser("alarms", "standing alarms, highest priority first", cmd_alarms)

    s = parser("journal", "events and commands, oldest first", cmd_journal)
    s.add_argument("--since", default=None, help="ISO 8601 (UTC unless zoned) or -30s/-15m/-1h/-2d")
    s.add_argument("--kind", nargs="+", action="extend", default=None, help="event kinds")
    s.add_argument("--limit", type=_limit, default=100, help="rows of each (1 … 10000)")

    s = parser("reset", "reset latched trips (engineer; the cause must be gone)", cmd_reset)
    s.add_argument("rules", nargs="*", help="interlock ids (none: every latched trip)")
    s.add_argument("--reason", type=_reason, required=True)

    s = parser("ack", "acknowledge alarms (operator)", cmd_ack)
    s.add_argument("alarms", nargs="*", help="alarm ids")
    s.add_argument("--all", action="store_true", help="every unacknowledged alarm")

    s = parser("bypass", "bypass a bypassable interlock for a while (engineer)", cmd_bypass)
    s.add_argument("rule")
    s.add_argument("--minutes", type=_minutes, default=None)
    s.add_argument("--reason", type=_reason, default=None)
    s.add_argument("--end", action="store_true", help="end the bypass now")

    s = parser("force", "force an output or a forceable input (engineer)", cmd_force)
    s.add_argument("tag")
    s.add_argument("value", nargs="?", default=None, help="true/false/on/off/1/0 or a number")
    s.add_argument("--minutes", type=_minutes, default=None)
    s.add_argument("--reason", type=_reason, default=None)
    s.add_argument("--release", action="store_true", help="end the force now")

    s = parser("maintenance", "maintenance mode on or off (engineer)", cmd_switch)
    s.add_argument("state", choices=("on", "off"))
    s.add_argument("--reason", type=_reason, required=True)

    s = parser("reject", "request heat rejection on or off (operator)", cmd_switch)
    s.add_argument("state", choices=("on", "off"))
    s.add_argument("--reason", type=_reason, required=True)

    s = parser("setpoint", "set a bounded setpoint (operator)", cmd_setpoint)
    s.add_argument("name")
    s.add_argument("value", type=_finite)

    s = parser("shelve", "shelve an alarm for a while (engineer)", cmd_shelve)
    s.add_argument("alarm")
    s.add_argument("--minutes", type=_minutes, default=None)
    s.add_argument("--reason", type=_reason, default=None)
    s.add_argument("--end", action="store_true", help="unshelve now")

    s = parser("replay", "re-run the decision core on the flight recorder", cmd_replay)
    s.add_argument("--from", dest="from_text", required=True, help="start (ISO 8601 or -1h)")
    s.add_argument("--to", dest="to_text", required=True, help="end (ISO 8601 or -5m)")
    s.add_argument("--export", default=None, help="write the replayed scans to this CSV file")


def _bms_password(from_stdin: bool) -> str:
    """The new user's password: one line on stdin, or asked twice on the terminal."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    import getpass

    first = getpass.getpass("password (at least 12 characters): ")
    if getpass.getpass("password again: ") != first:
        raise UsageError("bms user: passwords do not match; nothing changed")
    return first


def cmd_bms_user(args: argparse.Namespace) -> int:
    """Add, replace or remove a BMS user; only a salted scrypt hash is stored (0600)."""
    from controller.bms_users import (
        UsersError,
        add_user,
        check_name,
        check_role,
        remove_user,
        users_path,
    )

    site = load_site(args.site)
    path = users_path(site)
    try:
        check_name(args.name)
        if args.remove:
            if not remove_user(path, args.name):
                raise UsageError(f"bms user: no such user {args.name!r} in {path}")
            print(f"removed {args.name} from {path}")
            return EXIT_OK
        if args.role is None:
            raise UsageError("bms user: --role: expected viewer, operator or engineer")
        check_role(args.role, "--role")
        replaced = add_user(path, args.name, args.role, _bms_password(args.password_stdin))
    except UsersError as e:
        raise UsageError(f"bms user: {e}") from None
    except OSError as e:
        raise UsageError(f"bms user: {path}: cannot write: {e.strerror or e}") from None
    # the running BMS server reads the file again on its next login: no restart
    print(f"{'replaced' if replaced else 'added'} {args.name} ({args.role}) in {path}")
    return EXIT_OK


def cmd_bms_export(args: argparse.Namespace) -> int:
    """NodeSet2 XML and the points list of the BMS address space, for the integrator."""
    site = load_checked_site(args.site)
    from controller.bms_export import ExportError, export

    try:
        paths = export(site, Path(args.out) if args.out is not None else Path.cwd())
    except ExportError as e:
        raise UsageError(f"bms export: {e}") from None
    for p in paths:
        print(p)
    return EXIT_OK


# ---- commissioning (heatloop commission …) ----


def cmd_commission(args: argparse.Namespace) -> int:
    """Step through the interlock tests and the watchdog proof test; file the signed record."""
    if getattr(args, "commission_command", None) == "verify":
        from controller.commission_record import cmd_verify

        return int(cmd_verify(args))
    import getpass

    from controller.commission import PURPOSES, Options, parse_only, run_commission

    if args.site is None:
        raise UsageError("commission: expected --site SITE")
    try:
        only = parse_only(args.only)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.sim:
        if args.method not in (None, "sim"):
            raise UsageError(f"--method {args.method}: expected sim (or no --method) with --sim")
        method = "sim"
    else:
        if args.method == "sim":
            raise UsageError("--method sim: expected --sim (the simulated PLC's fault interface)")
        method = args.method or "physical"
    if args.auto and method not in ("sim", "forced"):
        raise UsageError(
            f"--auto: expected --sim or --method forced (method {method} needs a person by the "
            "plant)"
        )
    if args.resume and only is not None:
        raise UsageError("--resume: expected no --only (the run keeps its own steps)")
    site_path = Path(args.site)
    site = load_checked_site(args.site)
    report = Path(args.report) if args.report is not None else Path.cwd() / "commissioning"
    opts = Options(
        site_path=site_path,
        sim=bool(args.sim),
        auto=bool(args.auto),
        only=only,
        method=method,
        report_dir=report,
        engineer=args.engineer or getpass.getuser(),
        purpose=PURPOSES[args.purpose],
        resume=bool(args.resume),
        comment=args.comment or "",
        bypass_reason=args.bypass_reason,
        timeout_s=args.timeout_s,
    )
    return run_commission(site, opts)


def _text(limit: int) -> Callable[[str], str]:
    """An argparse type: text of 1 to `limit` characters, not only blanks."""

    def parse(text: str) -> str:
        if not text.strip() or len(text) > limit:
            raise argparse.ArgumentTypeError(
                f"{text[:40]!r}: expected 1 to {limit} characters, not only blanks"
            )
        return text

    return parse


def add_commission_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "commission",
        help="step through every interlock test and the watchdog proof test; file the record",
        description="Step through every interlock test and the PLC watchdog proof test on a "
        "running controller (`heatloop run`), measure each response at the PLC, and file a "
        "signed, hash-chained record. Exit 0: every step passed and the record is filed; 2: bad "
        "usage or a step failed or was aborted (the record is filed); 1: no controller answers "
        "or the record could not be filed (it is written locally, marked UNFILED).",
    )
    s.add_argument("--site", default=None, help="site file (TOML) of the running controller")
    s.add_argument("--sim", action="store_true", help="the simulated PLC: causes as sim faults")
    s.add_argument(
        "--auto", action="store_true", help="no prompts (only with --sim or --method forced)"
    )
    s.add_argument("--only", default=None, help="step ids, comma-separated (IL-04,IL-05,WD)")
    s.add_argument(
        "--method",
        choices=("sim", "forced", "physical"),
        default=None,
        help="how each cause is applied (default: physical; sim with --sim)",
    )
    s.add_argument("--report", default=None, help="report folder (default ./commissioning)")
    s.add_argument(
        "--engineer",
        type=_text(200),
        default=None,
        help="who runs the test, as signed (default: the OS user)",
    )
    s.add_argument(
        "--purpose",
        choices=("handover", "proof-test"),
        default="handover",
        help="handover (default) or a periodic proof test",
    )
    s.add_argument("--resume", action="store_true", help="continue this site's unfinished run")
    s.add_argument("--comment", type=_text(4000), default=None, help="a comment for the record")
    s.add_argument(
        "--bypass-reason", type=_reason, default=None, help="why sign off while a bypass stands"
    )
    s.add_argument(
        "--timeout-s",
        type=_number_in(0, 3600),
        default=120.0,
        help="longest wait for a pre-condition, a cause or the return to normal (120 s)",
    )
    s.set_defaults(func=cmd_commission, commission_command=None)
    csub = s.add_subparsers(dest="commission_command")
    v = csub.add_parser(
        "verify",
        help="check the chain and signatures of the filed records, or one record file",
    )
    # SUPPRESS: `commission --site S verify` keeps the --site given before the word verify
    v.add_argument("--site", default=argparse.SUPPRESS, help="site file (TOML)")
    v.add_argument("--record", default=None, help="a record's JSON file (copied off the machine)")
    v.add_argument("--public-key", default=None, help="the site's public key (hex)")
    v.set_defaults(func=cmd_commission)


def add_bms_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bms = sub.add_parser("bms", help="the BMS OPC UA server: users, integration files")
    bms_sub = bms.add_subparsers(dest="bms_command", required=True)
    s = bms_sub.add_parser(
        "user",
        help="add, replace or remove a BMS user (only a salted hash is stored)",
        description="Add or replace a BMS user in <state dir>/bms_users.json (mode 0600); the "
        "running server picks the change up without a restart. Passwords: at least 12 "
        "characters.",
    )
    s.add_argument("--site", required=True, help="site file (TOML)")
    s.add_argument("name", help="user name: 1-64 of A-Z a-z 0-9 . _ @ -")
    s.add_argument("--role", default=None, help="viewer, operator or engineer")
    s.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    s.add_argument("--remove", action="store_true", help="remove the user")
    s.set_defaults(func=cmd_bms_user)
    s = bms_sub.add_parser(
        "export", help="write the NodeSet2 XML and the points list (CSV) of the address space"
    )
    s.add_argument("--site", required=True, help="site file (TOML)")
    s.add_argument("--out", default=None, help="output folder (default: the current one)")
    s.set_defaults(func=cmd_bms_export)


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
    s.add_argument(
        "--reset-state",
        action="store_true",
        help="move the saved state aside (kept as *.bad) and start a new one; needs --reason",
    )
    s.add_argument("--reason", type=_reason, default=None, help="why the state is reset")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("study", help="plant and supervisor in-process at full speed")
    s.add_argument("--site", required=True)
    s.add_argument("--days", type=_number_in(0, 3660), default=1.0)
    s.add_argument(
        "--step", type=_number_in(0, 3600), default=10.0, help="simulated seconds per step"
    )
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--scenario", default=None, help="scenario file (TOML) of timed faults")
    s.add_argument(
        "--report",
        default=None,
        help="write the energy and availability statement (JSON, Markdown, HTML) to this folder",
    )
    s.set_defaults(func=cmd_study)

    s = sub.add_parser(
        "report",
        help="the energy and availability statement over a range of days",
        description=(
            "The heat-delivery and availability statement of a site from its state store "
            "(read-only; a running controller may keep running). Dates: ISO 8601, a date "
            "(UTC midnight; as --to it includes that whole day) or a date-time with offset. "
            "Exit 0 written (an empty range says so), 2 bad usage, 1 the store cannot be read "
            "or the --plot could not be drawn."
        ),
    )
    s.add_argument("--site", required=True, help="site file (TOML)")
    s.add_argument("--from", dest="from_text", required=True, help="first day (2026-12-01)")
    s.add_argument("--to", dest="to_text", required=True, help="last day, included (2026-12-31)")
    s.add_argument(
        "--format",
        default="md",
        help="md (default), html, csv (one row per UTC day) or json (the contract)",
    )
    s.add_argument("--plot", default=None, help="also draw a PNG here (needs heatloop[plots])")
    s.add_argument("--out", default=None, help="write the statement here (default: stdout)")
    s.set_defaults(func=cmd_report)

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
    add_operator_commands(sub)
    add_commission_commands(sub)
    add_bms_commands(sub)
    return p


# Options whose value may be a time ago (`--since -1h`): argparse would take "-1h" for an option.
_TIME_OPTIONS = ("--since", "--from", "--to")


def _join_times(argv: Sequence[str]) -> list[str]:
    """`--since -1h` -> `--since=-1h`, so a relative time reads as the value it is."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _TIME_OPTIONS:
            nxt = next(it, None)
            if nxt is not None and _RELATIVE.match(nxt.strip()):
                out.append(f"{a}={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_join_times(sys.argv[1:] if argv is None else argv))
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
    except Refused as e:
        print(f"heatloop: refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NoAnswer as e:
        print(f"heatloop: {e}", file=sys.stderr)
        return EXIT_RUNTIME
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
