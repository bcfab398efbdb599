"""The controller's side of the BMS server process: spawn it, feed it, answer it, restart it.

Theory of operation (DESIGN §9, §13; the protocol is in `controller.bms_server`'s docstring).

- Isolation. The OPC UA server runs in a child process (`python -m controller.bms_server --fd
  N`) on one end of a `socket.socketpair()`; nobody else can reach that channel. asyncua parses
  and buffers whatever a client sends before login, so a hostile client can stall the child: it
  must never stall a scan. The scan therefore only sets an `asyncio.Event` (and notes its told
  events in a bounded deque) through `Controller.scan_hooks`; this link's own task builds the
  snapshot and writes it without ever waiting for the child (no `drain`). If the child does not
  read, the socket's write buffer grows past `WRITE_BOUND` and snapshots are dropped (the next
  one sent is the newest; events wait for it, bounded) and counted.
- Supervision. A child that exits, closes its end, or sends no `alive` for `ALIVE_TIMEOUT_S`
  is killed (SIGKILL: a stopped process ignores everything else) and restarted after 1, 2, 4 …
  30 s; the back-off starts again after a child that served `HEALTHY_RESET_S`. Each start,
  exit and restart is one log line. A BMS server that cannot bind its port is the child's
  failure like any other: logged and retried, while the controller keeps scanning. The child
  runs in its own process group (a Ctrl-C reaches the controller, which closes the pair) with
  no descriptor but its end of the pair and no secret in its environment (`child_env`).
- Requests. The child's word about who may do what is not taken: the role comes from the users
  file (`bms_users.UserStore`), the request goes through `Controller.submit` (the one command
  path: permission table, checks, journal) in a task of its own, and the answer goes back with
  its `kind`. At most `MAX_OUTSTANDING` wait at once (more: kind "busy"); a malformed request is
  refused kind "invalid" when it carries a usable id, otherwise logged (rate-limited). Lines are
  bounded: the protocol's `MAX_LINE` for what the link sends, `MAX_CHILD_LINE` for what it
  reads (a request is small, and parsing megabytes of JSON on the controller's event loop would
  hand a compromised child a way to make scans late). A child that keeps writing but stops
  reading (its unread answers past `HARD_BOUND`) is ended like a silent one. Nothing here raises
  into the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from controller.alarms import AlarmState
from controller.authority import Answer, Request
from interlocks.engine import Event
from interlocks.rules import RULES
from plc_io.image import Quality, Sample
from plc_io.site import Site
from plc_io.transport import LinkState

if TYPE_CHECKING:
    from controller.runtime import Controller, Status

MAX_LINE = 4 * 1024 * 1024  # bytes per protocol line (the snapshot, the hello)
# bytes per line from the child: `ready`, `alive` and `req` are a few hundred bytes; parsing
# 64 KiB of JSON costs at most a few ms of the controller's event loop
MAX_CHILD_LINE = 64 * 1024
MAX_OUTSTANDING = 32  # requests from the child waiting for the controller
MAX_ID = 64  # characters of a request id
MAX_USER = 100  # characters of a BMS user name
ALIVE_TIMEOUT_S = 5.0  # a running child that says nothing this long is killed
# before its first word a child may take longer: importing asyncua, creating its certificate
# and key, binding; on a loaded two-core machine that can take several seconds
START_GRACE_S = 30.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HEALTHY_RESET_S = 60.0  # after a child that served this long, the back-off starts again
STOP_WAIT_S = 2.0  # on shutdown the child gets EOF and this long to exit, then SIGKILL
WRITE_BOUND = 1024 * 1024  # bytes unread by the child before snapshots are dropped
HARD_BOUND = 8 * WRITE_BOUND  # unread answers past this: the child is ended (it asks, never reads)
RESEND_S = 1.0  # with no scan, a snapshot anyway (ages and staleness move on)
MAX_EVENTS = 1000  # told events waiting for the next snapshot that is actually sent
EVENTS_PER_SNAP = 100  # at most this many in one snapshot (each at most a few kB)
MAX_TEXT = 500  # characters of any string in an event or an answer's old/new
MAX_ITEMS = 100  # items of any list or object there
LOG_BURST = 10  # protocol complaints logged per LOG_WINDOW_S; the rest are counted
LOG_WINDOW_S = 60.0
CHUNK = 65536
YIELD_EVERY = 100  # lines handled before giving the event loop back to the scan
# events the BMS sees (DESIGN §9: mode changes and commands, with who)
EVENT_KINDS = frozenset({"mode_changed", "command"})
ENERGY = ("HeatDelivered_kWh", "HeatRejected_kWh", "ItEnergy_kWh", "HeatLoopAvailability_pct")
HEAT_METER = "heat_meter_energy"
NOT_METERED = [None, "none", None]
HEARTBEAT = "heartbeat"
# alarm states as the link protocol names them (the OPC UA condition's Active and Acked)
ALARM_STATES = {
    AlarmState.NORMAL: "normal",
    AlarmState.UNACK: "active_unacknowledged",
    AlarmState.ACKED: "active_acknowledged",
    AlarmState.RTN_UNACK: "returned_unacknowledged",
}


class Child(Protocol):
    """What the link needs of a child process (`asyncio.subprocess.Process` is one)."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


Spawn = Callable[[socket.socket], Awaitable[Child]]


class _Process:
    """An asyncio subprocess whose `kill` never reaps: `Popen.send_signal` polls first, and a
    child that has just died is then reaped there, behind asyncio's child watcher, which reports
    exit code 255 instead of the signal that ended it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        if self._proc.returncode is None:  # not reaped yet: the pid is still this child's
            os.kill(self.pid, signal.SIGKILL)


# words in the name of an environment variable that may hold a secret
SECRET_WORDS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL", "PRIVATE", "APIKEY")


def child_env(site: Site, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours without secrets. The child faces the network (a hostile
    client may take it over); the PLC password the site names must never be in its reach, or
    a compromised BMS server could write PLC registers past every interlock."""
    env = dict(os.environ if environ is None else environ)
    named = site.plc.opcua.password_env
    return {
        k: v
        for k, v in env.items()
        if k != named and not any(w in k.upper().replace("_", "") for w in SECRET_WORDS)
    }


async def spawn_server(sock: socket.socket, env: Mapping[str, str] | None = None) -> Child:
    """`python -m controller.bms_server --fd N`, `sock` inherited as fd N (the only descriptor
    it gets); stdout and stderr are ours, so its JSON log lines join the controller's."""
    fd = sock.fileno()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.bms_server",
        "--fd",
        str(fd),
        stdin=asyncio.subprocess.DEVNULL,
        pass_fds=(fd,),
        env=None if env is None else dict(env),
        # its own process group: a Ctrl-C at the terminal reaches the controller only, which
        # then closes the pair (the child exits on EOF) instead of racing it
        start_new_session=True,
    )
    return _Process(proc)


def app_uri(site: Site) -> str:
    """The BMS server's application URI (also in its certificate): one per host."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return f"urn:{host or 'localhost'}:heatloop:bms"


# ---- the snapshot ----


def _num(x: object) -> float | bool | None:
    """A JSON-able sample value: bools stay bools, non-finite numbers become null."""
    if isinstance(x, bool) or x is None:
        return x
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(x: object, depth: int = 0) -> Any:
    """`x` as bounded, strict JSON values: NaN and infinities become null, unknown objects
    their text, strings at most MAX_TEXT characters, collections at most MAX_ITEMS items."""
    if x is None or isinstance(x, bool | int):
        return x
    if isinstance(x, str):
        return x if len(x) <= MAX_TEXT else x[:MAX_TEXT] + "…"
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if depth > 8:
        return str(x)[:200]
    if isinstance(x, Mapping):
        return {
            str(k)[:MAX_TEXT]: jsonable(v, depth + 1)
            for k, v in itertools.islice(x.items(), MAX_ITEMS)
        }
    if isinstance(x, list | tuple | set | frozenset):
        items = sorted(x, key=str) if isinstance(x, set | frozenset) else x
        return [jsonable(v, depth + 1) for v in itertools.islice(items, MAX_ITEMS)]
    return str(x)[:MAX_TEXT]


def _wall(at_s: float, now_s: float, wall_s: float) -> float | None:
    """A monotonic time as wall time (None for a sample never read)."""
    return wall_s - (now_s - at_s) if math.isfinite(at_s) else None


def sample_json(s: Sample, now_s: float, wall_s: float, stale_after_s: float) -> list[Any]:
    """`[value, quality, read wall time]`, staleness applied. A value that could not be read
    (comms lost, a garbled reply) goes without its number: only the status says anything."""
    q = s.quality_at(now_s, stale_after_s)
    value = None if q in (Quality.COMMS_LOST, Quality.BAD_REPLY) else _num(s.value)
    return [value, q.value, _wall(s.at_s, now_s, wall_s)]


def _event_json(e: Event, scan_now_s: float, scan_wall_s: float) -> dict[str, Any]:
    d = e.detail
    wall = _wall(e.at_s, scan_now_s, scan_wall_s)
    if e.kind == "mode_changed":
        fields = {"from": d.get("from"), "to": e.source, "reasons": d.get("reasons", [])}
        return {
            "kind": e.kind,
            "wall": wall,
            "message": f"{d.get('from')} -> {e.source}",
            "fields": jsonable(fields),
        }
    # a command: who, what, old and new, or why it was refused
    args = d.get("args")
    args = args if isinstance(args, Mapping) else {}
    target = next((str(args[k]) for k in ("name", "tag", "rule", "alarm") if k in args), "")
    if d.get("accepted"):
        what = f"{_short(d.get('old'))} -> {_short(d.get('new'))}"
    else:
        what = f"refused: {d.get('why')}"
    message = " ".join(p for p in (str(d.get("principal")), e.source, target, what) if p)
    fields = {
        k: d.get(k)
        for k in ("id", "principal", "role", "via", "args", "reason", "accepted", "why", "old")
    }
    fields["new"] = d.get("new")
    fields["cmd"] = e.source
    cmd_wall = d.get("wall")
    return {
        "kind": e.kind,
        "wall": cmd_wall if isinstance(cmd_wall, int | float) else wall,
        "message": message[:1000],
        "fields": jsonable(fields),
    }


def _short(x: object) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    text = x if isinstance(x, str) else json.dumps(jsonable(x))
    return text if len(text) <= 200 else text[:200] + "…"


def _setpoint_names() -> tuple[str, ...]:
    try:
        from controller.authority import SETPOINTS
    except ImportError:  # older core: only the supply setpoint
        return ("supply_setpoint_c",)
    return tuple(SETPOINTS)


def _bms_outputs() -> Mapping[str, str]:
    """BMS-level setpoint name -> the output it steers."""
    try:
        from controller.sequences import BMS_REQUESTS
    except ImportError:
        return {}
    return {name: out for name, (out, *_) in BMS_REQUESTS.items()}


def _setpoints(ctl: Controller) -> dict[str, list[Any]]:
    """name -> [effective value, BMS-requested value or null]. A BMS-level setpoint's effective
    value is what its output was last given (the sequence's own where it left no room); the
    supply setpoint is the request inside its bounds, else the site's."""
    requested = ctl.core.operator.setpoints
    d = ctl.status.decision
    outputs = _bms_outputs()
    bounds = ctl.core.limits.setpoints
    out: dict[str, list[Any]] = {}
    for name in _setpoint_names():
        req = requested.get(name)
        if name in outputs:
            o = d.outputs.get(outputs[name]) if d is not None else None
            eff = _num(o.value) if o is not None else None
        elif name == "supply_setpoint_c":
            lo, hi = bounds.get(name, (-math.inf, math.inf))
            ok = req is not None and lo <= req <= hi
            eff = _num(req) if ok else _num(ctl.cfg.sequence.supply_setpoint_c)
        else:
            eff = _num(req)
        out[name] = [eff, _num(req)]
    return out


def snapshot(
    ctl: Controller,
    events: Iterable[dict[str, Any]] | None = None,
    *,
    seq: int = 0,
    now_s: float | None = None,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """The `snap` line's object for the controller's latest scan (`controller.bms_space` says
    where each part is served). `events` are the event objects to carry (default: the mode
    changes and commands the last scan told); staleness is applied at `now_s` (default: the
    controller's clock now), read times are wall seconds."""
    site, st = ctl.site, ctl.status
    now = ctl.clock() if now_s is None else now_s
    wall = ctl.wall() if wall_s is None else wall_s
    stale_after = site.plc.stale_after_s
    d = st.decision
    img = st.image
    if d is not None:
        mode, since = d.mode.value, _wall(d.mode_since_s, d.now_s, st.wall)
        active, latched, bypassed = d.active, d.latched, d.bypassed
    else:
        sup = ctl.supervisor
        mode, since = sup.mode.value, None
        active, latched, bypassed = frozenset(), sup.latched, frozenset()
    inputs = {t.name: sample_json(img[t.name], now, wall, stale_after) for t in site.inputs}
    outputs = {
        k: [_num(o.value), o.level.name.lower(), str(o.why)]
        for k, o in (d.outputs.items() if d is not None else ())
        if k != HEARTBEAT
    }
    energy: dict[str, list[Any]] = {name: list(NOT_METERED) for name in ENERGY}
    if any(t.name == HEAT_METER for t in site.inputs):
        energy["HeatDelivered_kWh"] = inputs[HEAT_METER]
    meter = ctl.meter_view()
    if meter is not None:  # the meter's lifetime figures (docs/metering.md)
        totals = meter["totals"]
        for name, x in (
            ("HeatRejected_kWh", totals["rejected_kwh"]),
            ("ItEnergy_kWh", totals["it_energy_kwh"]),
            ("HeatLoopAvailability_pct", meter["availability_pct"]),
        ):
            if x is not None:
                energy[name] = [_num(x), Quality.GOOD.value, wall]
    alarms = [
        {
            "id": a.id,
            "state": ALARM_STATES.get(a.state, a.state.value),
            "priority": a.priority.name.lower(),
            "message": a.message,
            "detail": a.detail,
            "since_wall": _num(a.active_since_wall),
            "first_out": a.first_out,
            "shelved_until": _num(a.shelved_until),
        }
        for a in ctl.core.alarms.standing()
    ]
    if events is None:
        told = st.told if d is not None else ()
        events = [_event_json(e, d.now_s, st.wall) for e in told if e.kind in EVENT_KINDS]
    return {
        "t": "snap",
        "seq": seq,
        "wall": wall,
        "status": {
            "mode": mode,
            "mode_since": since,
            "trip_latched": bool(latched),
            "active_interlocks": sorted(active),
            "plc_comms_ok": d is not None and st.health.state is LinkState.OK,
            "scan_overruns": st.overruns,
        },
        "inputs": inputs,
        "outputs": outputs,
        "outputs_wall": st.wall if d is not None else None,
        "energy": energy,
        "setpoints": _setpoints(ctl),
        "interlocks": {r.id: [r.id in active, r.id in latched, r.id in bypassed] for r in RULES},
        "alarms": alarms,
        "events": list(events),
    }


def encode(msg: Mapping[str, Any]) -> bytes:
    """One protocol line: strict JSON (no NaN), UTF-8, newline-terminated."""
    return (
        json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode() + b"\n"
    )


# ---- requests ----


class BadRequest(ValueError):
    """A `req` line that cannot become a request; `rid` is its id when that is usable."""

    def __init__(self, why: str, rid: str | None) -> None:
        super().__init__(why)
        self.rid = rid


def _shown(x: object, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_req(msg: Mapping[str, Any]) -> tuple[str, str, str, dict[str, Any], str]:
    """(id, user, cmd, args, reason) of a `req` object; BadRequest naming the field otherwise."""
    rid = msg.get("id")
    usable = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID else None
    if usable is None:
        raise BadRequest(f"req.id: {_shown(rid)}: expected a string of 1 … {MAX_ID} chars", None)
    user = msg.get("user")
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER:
        raise BadRequest(
            f"req.user: {_shown(user)}: expected a string of 1 … {MAX_USER} chars", usable
        )
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or not 0 < len(cmd) <= 64:
        raise BadRequest(f"req.cmd: {_shown(cmd)}: expected a command name", usable)
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest(f"req.args: {_shown(args)}: expected a JSON object", usable)
    reason = msg.get("reason", "")
    if not isinstance(reason, str):
        raise BadRequest(f"req.reason: {_shown(reason)}: expected a string", usable)
    return usable, user, cmd, args, reason


# ---- the link ----


@dataclass
class _Conn:
    """One child's channel: its writer and what it asked that is not answered yet."""

    number: int
    writer: asyncio.StreamWriter
    started_s: float
    last_alive_s: float
    spoke: bool = False  # any `alive` or `ready` yet
    outstanding: set[str] = field(default_factory=set)
    closed: bool = False
    deaf: asyncio.Event = field(default_factory=asyncio.Event)  # it stopped reading answers

    def buffered(self) -> int:
        try:
            return self.writer.transport.get_write_buffer_size()
        except Exception:  # a transport already gone holds nothing
            return 0

    def send(self, line: bytes) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        try:
            self.writer.write(line)
        except Exception:  # the child went away; the supervisor sees it
            return False
        return True


class BmsLink:
    """Starts and supervises the BMS server process for `controller` (see the module doc)."""

    def __init__(
        self,
        site: Site,
        controller: Controller,
        *,
        log: Any = None,
        spawn: Spawn | None = None,
        json_logs: bool = True,
        clock: Callable[[], float] = time.monotonic,
        alive_timeout_s: float = ALIVE_TIMEOUT_S,
        start_grace_s: float = START_GRACE_S,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        healthy_reset_s: float = HEALTHY_RESET_S,
        write_bound: int = WRITE_BOUND,
        resend_s: float = RESEND_S,
        stop_wait_s: float = STOP_WAIT_S,
        hard_bound: int = HARD_BOUND,
    ) -> None:
        self.site = site
        self.controller = controller
        self.log = log if log is not None else structlog.get_logger("heatloop.bms_link")
        if spawn is None:
            env = child_env(site)
            spawn = functools.partial(spawn_server, env=env)
        self.spawn = spawn
        self.json_logs = json_logs
        self.clock = clock
        self.alive_timeout_s = alive_timeout_s
        self.start_grace_s = start_grace_s
        self.backoff_s = backoff_s
        self.healthy_reset_s = healthy_reset_s
        self.write_bound = write_bound
        self.resend_s = resend_s
        self.stop_wait_s = stop_wait_s
        self.hard_bound = hard_bound
        self.state = "off"
        self.pid: int | None = None
        self.restarts = 0
        self.last_error = ""
        self.endpoint: str | None = None
        self.dropped = 0
        self.sessions: int | None = None
        self.seq = 0
        self._wake = asyncio.Event()
        # (event, the scan's monotonic time, the scan's wall time), oldest first
        self._events: deque[tuple[Event, float, float]] = deque(maxlen=MAX_EVENTS)
        self._conn: _Conn | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._store: Any = None
        self._log_times: deque[float] = deque()
        self._suppressed = 0
        self._children = 0
        self._hello_line: bytes | None = None
        self._ready_at: float | None = None  # when the current child said `ready`

    # ---- what the scan calls (cheap) and what people read ----

    def on_scan(self, st: Status) -> None:
        """The scan's hook: note the events to tell and wake the sender. Never waits."""
        d = st.decision
        if d is not None:
            for e in st.told:
                if e.kind in EVENT_KINDS:
                    self._events.append((e, d.now_s, st.wall))
        self._wake.set()

    def status_view(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "endpoint": self.endpoint,
            "dropped": self.dropped,
        }

    # ---- supervision ----

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one child running until `stop`; never raises (but for cancellation)."""
        hooks = getattr(self.controller, "scan_hooks", None)
        if hooks is not None:
            hooks.append(self.on_scan)
        failures = 0
        try:
            while not stop.is_set():
                self._ready_at = None
                try:
                    why = await self._one_child(stop)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug here must not reach the controller
                    why = f"link error: {type(e).__name__}: {e}"
                    self._complain("bms_link_error", error=why)
                if stop.is_set():
                    break
                self.last_error = why
                # a child that served this long starts the back-off again from 1 s
                ready = self._ready_at
                if ready is not None and self.clock() - ready >= self.healthy_reset_s:
                    failures = 0
                delay = self.backoff_s[min(failures, len(self.backoff_s) - 1)]
                failures += 1
                self.state = "restarting"
                self.restarts += 1
                self.log.warning(
                    "bms_restarting", after_s=delay, restarts=self.restarts, why=why[:500]
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
        finally:
            if hooks is not None:
                with contextlib.suppress(ValueError):
                    hooks.remove(self.on_scan)
            for t in list(self._tasks):
                t.cancel()
            self.state, self.pid = "off", None

    async def _one_child(self, stop: asyncio.Event) -> str:
        """Run one child until it fails or `stop`; return why it ended."""
        self.state, self.endpoint, self.sessions = "starting", None, None
        if self._hello_line is None:  # the site does not change: built once (~10 ms)
            self._hello_line = encode(self._hello())  # before any process is started
        hello = self._hello_line
        parent, child_end = socket.socketpair()
        try:
            proc = await self.spawn(child_end)
        except Exception as e:
            parent.close()
            return f"cannot start the BMS server: {type(e).__name__}: {e}"
        finally:
            child_end.close()  # the child has its own copy
        self._children += 1
        self.pid = proc.pid
        self.log.info("bms_started", pid=proc.pid, child=self._children)
        tasks: dict[asyncio.Future[Any], str] = {}
        writer: asyncio.StreamWriter | None = None
        conn: _Conn | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=parent, limit=CHUNK)
            now = self.clock()
            conn = _Conn(self._children, writer, now, now)
            self._conn = conn
            conn.send(hello)
            tasks = {
                asyncio.ensure_future(proc.wait()): "exited",
                asyncio.ensure_future(self._read_loop(conn, reader)): "closed its end",
                asyncio.ensure_future(self._watch(conn)): "silent",
                asyncio.ensure_future(stop.wait()): "stop",
                asyncio.ensure_future(self._send_loop(conn)): "sender ended",
                asyncio.ensure_future(conn.deaf.wait()): "stopped reading",
            }
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            why = tasks[first]
            err = first.exception()
            if err is not None:  # a bug in one of ours: say which, end this child
                why = f"{why}: {type(err).__name__}: {err}"
            elif why == "silent":
                why = f"no alive for {first.result():g} s"
            elif why == "closed its end":
                why = f"closed the channel ({first.result()})"
        except BaseException:
            # cancelled (the controller is going) or broken before the child could be served:
            # never leave it behind
            with contextlib.suppress(Exception):
                if proc.returncode is None:
                    proc.kill()
            raise
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            if conn is not None:
                conn.closed = True
            self._conn = None
            with contextlib.suppress(Exception):
                if writer is not None:
                    writer.close()
                else:
                    parent.close()
        code = await self._end(proc, graceful=stop.is_set())
        why = f"{why}; exit code {code}" if why != "exited" else f"exited with code {code}"
        if stop.is_set():
            self.log.info("bms_exited", pid=proc.pid, why="controller stopping", code=code)
        else:
            self.log.warning("bms_exited", pid=proc.pid, why=why, code=code)
        self.pid = None
        return why

    async def _end(self, proc: Child, *, graceful: bool) -> int | None:
        """Let the child go: on shutdown it has EOF and `stop_wait_s`; a failed one is killed."""
        if proc.returncode is None and graceful:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_wait_s):
                    await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) or stalled child
        try:
            async with asyncio.timeout(5.0):
                return await proc.wait()
        except TimeoutError:  # never seen; do not hang the controller's shutdown on it
            with contextlib.suppress(ProcessLookupError, OSError):
                os.kill(proc.pid, signal.SIGKILL)
            return None

    async def _watch(self, conn: _Conn) -> float:
        """Return the limit once the child has said nothing for that long."""
        while True:
            limit = self.alive_timeout_s if conn.spoke else self.start_grace_s
            left = conn.last_alive_s + limit - self.clock()
            if left <= 0:
                return limit
            await asyncio.sleep(min(left, 0.5))

    def _hello(self) -> dict[str, Any]:
        from controller.bms_space import space

        site, b = self.site, self.site.bms
        users_file = site.state_dir / "bms_users.json"
        with contextlib.suppress(ImportError):
            from controller.bms_users import users_path

            users_file = users_path(site)
        return {
            "t": "hello",
            "space": space(site).to_json(),
            "bms": {
                "host": b.host,
                "port": b.port,
                "allow_none_security": getattr(b, "allow_none_security", False),
                "allow_anonymous": getattr(b, "allow_anonymous", False),
                "trust_on_first_use": getattr(b, "trust_on_first_use", False),
                "max_sessions": getattr(b, "max_sessions", 20),
                "min_sampling_ms": getattr(b, "min_sampling_ms", 100),
                "min_publishing_ms": getattr(b, "min_publishing_ms", 100),
            },
            "state_dir": str(site.state_dir),
            "users_file": str(users_file),
            "app_uri": app_uri(site),
            "json_logs": self.json_logs,
        }

    # ---- controller -> child ----

    async def _send_loop(self, conn: _Conn) -> None:
        """A snapshot after every scan (or every RESEND_S without one); never waits for the
        child: a full buffer drops the snapshot (the next one is the newest)."""
        while not conn.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resend_s):
                    await self._wake.wait()
            self._wake.clear()
            if conn.closed:
                return
            if conn.buffered() > self.write_bound:
                self.dropped += 1
                continue
            try:
                self.seq += 1
                events = list(itertools.islice(self._events, EVENTS_PER_SNAP))
                told = [_event_json(e, n, w) for e, n, w in events]
                line = encode(snapshot(self.controller, told, seq=self.seq))
                if len(line) > MAX_LINE:  # never seen (every part is bounded); never sent
                    self._complain("bms_snapshot_too_long", size=len(line), events=len(told))
                    line = encode(snapshot(self.controller, [], seq=self.seq))
            except Exception as e:  # a bug in building it: say so (rate-limited), go on
                self._complain("bms_snapshot_failed", error=f"{type(e).__name__}: {e}")
                continue
            if conn.send(line):
                for _ in events:  # told now (oldest first); newer ones wait their turn
                    if self._events:
                        self._events.popleft()
                if self._events:
                    self._wake.set()  # more waiting: the next snapshot at once

    def _answer(self, conn: _Conn, child_id: str, ans: Answer) -> None:
        if conn.buffered() > self.hard_bound:  # it asks and never reads: end it, keep no more
            conn.deaf.set()
            return
        msg = {
            "t": "answer",
            "id": child_id,
            "ok": bool(ans.accepted),
            "why": str(ans.why)[:1000],
            "kind": "" if ans.accepted else (ans.kind or "invalid"),
            "old": jsonable(ans.old),
            "new": jsonable(ans.new),
        }
        conn.send(encode(msg))

    # ---- child -> controller ----

    async def _read_loop(self, conn: _Conn, reader: asyncio.StreamReader) -> str:
        """Split the child's bytes into lines of at most MAX_CHILD_LINE (a longer one is skipped
        whole) and handle each; return at EOF."""
        buf = bytearray()
        skipping = False
        handled = 0
        while True:
            try:
                chunk = await reader.read(CHUNK)
            except (ConnectionError, OSError) as e:
                return f"{type(e).__name__}: {e}"
            if not chunk:
                return "EOF"
            start = 0
            while True:
                i = chunk.find(b"\n", start)
                if i < 0:
                    if not skipping:
                        buf += chunk[start:]
                        if len(buf) > MAX_CHILD_LINE:
                            self._complain("bms_line_too_long", limit=MAX_CHILD_LINE)
                            buf.clear()
                            skipping = True
                    break
                if skipping:
                    skipping = False
                else:
                    buf += chunk[start:i]
                    if len(buf) > MAX_CHILD_LINE:
                        self._complain("bms_line_too_long", limit=MAX_CHILD_LINE)
                    elif buf.strip():
                        self._on_line(conn, bytes(buf))
                    buf.clear()
                    handled += 1
                    if handled % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a flood never holds the scan back
                start = i + 1

    def _on_line(self, conn: _Conn, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as e:
            self._complain("bms_bad_line", error=str(e)[:200], line=line[:200])
            return
        if not isinstance(msg, dict):
            self._complain("bms_bad_line", error="not a JSON object", line=line[:200])
            return
        t = msg.get("t")
        if t == "alive":
            conn.spoke, conn.last_alive_s = True, self.clock()
            sessions = msg.get("sessions")
            if isinstance(sessions, int) and not isinstance(sessions, bool):
                self.sessions = sessions
        elif t == "ready":
            conn.spoke, conn.last_alive_s = True, self.clock()
            endpoint = msg.get("endpoint")
            self.endpoint = endpoint[:300] if isinstance(endpoint, str) else None
            self.state = "running"
            if self._ready_at is None:
                self._ready_at = self.clock()
            policies = msg.get("policies")
            self.log.info(
                "bms_ready",
                pid=self.pid,
                endpoint=self.endpoint,
                policies=jsonable(policies) if isinstance(policies, list) else None,
            )
        elif t == "req":
            self._on_req(conn, msg)
        else:
            self._complain("bms_bad_line", error=f"unknown message type {_shown(t)}")

    def _on_req(self, conn: _Conn, msg: Mapping[str, Any]) -> None:
        try:
            rid, user, cmd, args, reason = parse_req(msg)
        except BadRequest as e:
            if e.rid is None:
                self._complain("bms_bad_request", error=str(e))
            else:
                self._answer(conn, e.rid, Answer(e.rid, False, str(e), kind="invalid"))
            return
        if rid in conn.outstanding:
            # answering would resolve the first request of that id: the child is broken
            self._complain("bms_bad_request", error=f"req.id: {rid!r} already waits for answer")
            return
        if len(conn.outstanding) >= MAX_OUTSTANDING:
            why = f"busy: {MAX_OUTSTANDING} BMS requests wait for the controller"
            self._answer(conn, rid, Answer(rid, False, why, kind="busy"))
            return
        role = self._role(user)
        if role is None:
            why = f"user {user[:60]!r} is not a BMS user of this site"
            self._answer(conn, rid, Answer(rid, False, why, kind="denied"))
            self._complain("bms_request_denied", user=user[:60], cmd=cmd[:64], why=why)
            return
        # the controller's request id: unique across children (each numbers its own from 1)
        req = Request(f"bms{conn.number}-{rid}", f"bms:{user}", role, cmd, args, reason, via="bms")
        conn.outstanding.add(rid)
        task = asyncio.ensure_future(self._serve(conn, rid, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Conn, rid: str, req: Request) -> None:
        try:
            ans = await self.controller.submit(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the controller side failed: refuse, go on
            ans = Answer(req.id, False, f"internal error: {type(e).__name__}: {e}", kind="state")
        finally:
            conn.outstanding.discard(rid)
        self._answer(conn, rid, ans)  # to the child that asked; dropped if it is gone

    def _role(self, user: str) -> str | None:
        """The user's role from the users file (None: no such user, or no users file)."""
        try:
            if self._store is None:
                from controller.bms_users import UserStore, users_path

                self._store = UserStore(users_path(self.site))
            role = self._store.role(user)
        except Exception as e:  # an unreadable file grants nothing
            self._complain("bms_users_unreadable", error=f"{type(e).__name__}: {e}")
            return None
        return role if isinstance(role, str) else None

    def _complain(self, kind: str, **kw: Any) -> None:
        """A protocol complaint, at most LOG_BURST per LOG_WINDOW_S (the rest counted)."""
        now = self.clock()
        while self._log_times and now - self._log_times[0] > LOG_WINDOW_S:
            self._log_times.popleft()
        if len(self._log_times) >= LOG_BURST:
            self._suppressed += 1
            return
        self._log_times.append(now)
        if self._suppressed:
            kw["suppressed_before"] = self._suppressed
            self._suppressed = 0
        self.log.warning(
            kind, **{k: jsonable(v) if not isinstance(v, bytes) else v for k, v in kw.items()}
        )
