"""The commissioning tool's I/O: the controller's command channel, an independent read-only view
of the PLC, the simulated PLC's fault interface, and the terminal a person reads by the plant.

Nothing here ever writes the PLC: the observer opens its own transport and calls only
`read_inputs()` and `read_outputs()`. Everything the tool changes goes through the controller's
command channel (journalled there) or, with `--sim`, through the simulated PLC's `Sim` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from controller.channel import NoController, call, socket_path
from plc_io.image import ProcessImage, Quality
from plc_io.site import Site
from plc_io.tags import Value

SIM_NS = "urn:heatloop:plc"
PLC_POLL_S = 0.05  # the observer's PLC reads (~20 Hz)
STATUS_POLL_S = 0.25  # the controller's status (~4 Hz)
CALL_TIMEOUT_S = 10.0


class ControllerLink:
    """Requests to the running controller over its Unix socket, off the event loop."""

    def __init__(self, site: Site, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.path: Path = socket_path(site.state_dir)
        self.timeout_s = timeout_s

    async def call(
        self, cmd: str, args: Mapping[str, object] | None = None, reason: str = ""
    ) -> dict[str, Any]:
        """The reply (a dict with `ok`); NoController when nobody answers."""
        return await asyncio.to_thread(
            call, self.path, cmd, dict(args or {}), reason, self.timeout_s
        )

    async def status(self) -> dict[str, Any]:
        """The status page's data; NoController when nobody answers or the read is refused."""
        reply = await self.call("status")
        if not reply.get("ok") or not isinstance(reply.get("data"), dict):
            raise NoController(f"status refused: {reply.get('why') or 'no data'}")
        return reply["data"]


def _plain(image: ProcessImage) -> dict[str, Value | None]:
    """Values a decision may use; anything unreadable or out of range is None."""
    return {
        k: (s.value if s.quality in (Quality.GOOD, Quality.FORCED) else None)
        for k, s in image.items()
    }


def status_fields(st: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a controller status an Observation carries (every field optional)."""
    il = st.get("interlocks") if isinstance(st.get("interlocks"), Mapping) else {}
    outs = st.get("outputs") if isinstance(st.get("outputs"), Mapping) else {}
    link = st.get("link") if isinstance(st.get("link"), Mapping) else {}
    mode = st.get("mode")
    return {
        "mode": mode if isinstance(mode, str) else None,
        "active": frozenset(str(r) for r in il.get("active") or ()),
        "latched": frozenset(str(r) for r in il.get("latched") or ()),
        "bypassed": frozenset(
            str(b.get("rule")) for b in il.get("bypassed") or () if isinstance(b, Mapping)
        ),
        "levels": {str(k): str(v.get("level")) for k, v in outs.items() if isinstance(v, Mapping)},
        "link_ok": link.get("state") == "ok",
    }


class Observer:
    """Polls the PLC (read only, ~20 Hz) and the controller's status (~4 Hz) into Observations.

    `history` holds the observations since the current step began (`forget_before`), oldest
    first, so a run of hours at 20 Hz stays small; `latest` is the newest. The Observation
    class comes from the plan module (it is what the judge reads).
    """

    def __init__(
        self,
        site: Site,
        link: ControllerLink,
        make_observation: Callable[..., Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site = site
        self.link = link
        self.make = make_observation
        self.clock = clock
        self.history: list[Any] = []
        self.status: dict[str, Any] = {}
        self.status_t: float | None = None
        self.status_error: str | None = None
        self._fields: dict[str, Any] = status_fields({})
        self._fields["link_ok"] = False
        self._transport: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = True
        self._new = asyncio.Event()

    @property
    def latest(self) -> Any:
        return self.history[-1] if self.history else None

    async def start(self) -> None:
        from controller.runtime import make_transport

        self._transport = make_transport(self.site)
        await self._transport.connect()
        await self._poll_status_once()
        await self._poll_plc_once()
        self._tasks = [
            asyncio.create_task(self._plc_loop(), name="commission-plc"),
            asyncio.create_task(self._status_loop(), name="commission-status"),
        ]

    async def close(self) -> None:
        # A flag first, not Task.cancel(): pymodbus awaits asyncio.wait_for, which on Python 3.11
        # can swallow a cancel that lands as a reply arrives (CPython gh-86296), and the loop
        # would poll for ever. Cancel only what has not stopped by itself, and never wait long.
        self._running = False
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._tasks = []
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
            self._transport = None

    async def _poll_plc_once(self) -> None:
        from plc_io.transport import LinkState

        tr = self._transport
        try:
            ins = await tr.read_inputs()
            outs = await tr.read_outputs()
            lost = any(
                s.quality in (Quality.COMMS_LOST, Quality.BAD_REPLY)
                for s in (*ins.values(), *outs.values())
            )
            ok = tr.health.state is LinkState.OK and not lost
            inputs, outputs = _plain(ins), _plain(outs)
        except Exception:  # the observer must never stop the tool: an unread PLC is not ok
            ok, inputs, outputs = False, {}, {}
        obs = self.make(
            t=self.clock(),
            plc_ok=ok,
            inputs=inputs,
            outputs=outputs,
            status_t=self.status_t,
            **self._fields,
        )
        self.history.append(obs)
        self._new.set()

    async def _poll_status_once(self) -> None:
        try:
            st = await self.link.status()
        except NoController as e:
            self.status_error = str(e)
            self._fields["link_ok"] = False
            return
        self.status, self.status_t, self.status_error = st, self.clock(), None
        self._fields = status_fields(st)

    async def _plc_loop(self) -> None:
        while self._running:
            t = self.clock()
            await self._poll_plc_once()
            await asyncio.sleep(max(0.0, PLC_POLL_S - (self.clock() - t)))

    async def _status_loop(self) -> None:
        while self._running:
            t = self.clock()
            await self._poll_status_once()
            await asyncio.sleep(max(0.0, STATUS_POLL_S - (self.clock() - t)))

    async def next(self, timeout_s: float = 1.0) -> Any:
        """Wait for the next observation (or `timeout_s`); return the newest."""
        self._new.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), timeout_s)
        return self.latest

    def forget_before(self, t: float) -> None:
        """Drop the observations older than `t`, keeping the newest (`latest` stays)."""
        keep = [o for o in self.history if o.t >= t]
        self.history = keep or self.history[-1:]

    def since(self, t: float) -> list[Any]:
        return [o for o in self.history if o.t >= t]


class SimLink:
    """The simulated PLC's `Sim` fault interface over OPC UA (security None, 127.0.0.1)."""

    def __init__(self, site: Site, timeout_s: float = 4.0) -> None:
        self.url = f"opc.tcp://127.0.0.1:{site.sim.opcua_port}/"
        self.timeout_s = timeout_s
        self._client: Any = None
        self._node: Any = None
        self._ns = 0

    async def connect(self) -> None:
        from asyncua import Client

        client = Client(self.url, timeout=self.timeout_s)
        await client.connect()
        try:
            self._ns = await client.get_namespace_index(SIM_NS)
            self._node = await client.nodes.objects.get_child([f"{self._ns}:Sim"])
        except Exception:
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), self.timeout_s)
            self._client = None

    async def inject(self, name: str, target: str, value: float) -> None:
        await self._node.call_method(f"{self._ns}:InjectFault", name, target, float(value))

    async def clear(self, name: str, target: str) -> None:
        await self._node.call_method(f"{self._ns}:ClearFault", name, target)


def shown(v: object) -> str:
    if v is None:
        return "?"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


class Terminal:
    """What a person by the plant reads and answers.

    A live line is redrawn in place on a TTY and printed as plain lines (at most one a second)
    otherwise, so a test's captured output stays short. Input is read through the event loop
    (`add_reader`, raw reads into a line buffer), never a blocking thread, so Ctrl-C can abort a
    prompt and the process never waits on a thread stuck in `input()` at exit.
    """

    def __init__(self, out: TextIO | None = None, inp: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.inp = inp or sys.stdin
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._live_shown = False
        self._last_plain = -math.inf
        self._buf = ""  # typed input read but not yet taken, as text
        self._eof = False

    def say(self, text: str = "") -> None:
        self._end_live()
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        """One line on stderr: why the run cannot start."""
        self._end_live()
        print(text, file=sys.stderr, flush=True)

    def live(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text[:200])
            self.out.flush()
            self._live_shown = True
        elif time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            print("  … " + text, file=self.out, flush=True)

    def _end_live(self) -> None:
        if self._live_shown:
            self.out.write("\n")
            self._live_shown = False

    def _fd(self) -> int | None:
        try:
            return self.inp.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def _take_line(self) -> str | None:
        """A whole line already read (without its newline); the rest at end of input (None if
        nothing is left); None while a line is incomplete."""
        if "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            return line.rstrip("\r")
        if self._eof:
            line, self._buf = self._buf, ""
            return line or None
        return None

    def _fill(self) -> None:
        """Read what the input holds now (its fd is readable) as raw bytes, so several lines that
        arrive at once all wait here for the next questions."""
        fd = self._fd()
        try:
            chunk = os.read(fd, 4096) if fd is not None else b""
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._eof = True
        self._buf += chunk.decode("utf-8", "replace")

    async def line(self, abort: asyncio.Event | None = None) -> str | None:
        """The next line the person types; None at end of input or on `abort`."""
        got = self._take_line()
        if got is not None or self._eof:
            return got
        fd = self._fd()
        if fd is None:
            return None
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        try:
            loop.add_reader(fd, ready.set)
        except (OSError, ValueError, NotImplementedError):
            return None
        try:
            while True:
                waits = [asyncio.ensure_future(ready.wait())]
                if abort is not None:
                    waits.append(asyncio.ensure_future(abort.wait()))
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                if abort is not None and abort.is_set():
                    return None
                ready.clear()
                self._fill()
                got = self._take_line()
                if got is not None or self._eof:
                    return got
        finally:
            loop.remove_reader(fd)

    async def ask(self, prompt: str, abort: asyncio.Event | None = None) -> str | None:
        """Show `prompt`, then one line from the person; None at end of input or abort."""
        self.say(prompt)
        return await self.line(abort)

    def line_reader(self) -> LineWatch:
        return LineWatch(self)


class LineWatch:
    """A pending "press Enter" while something else is awaited (a step in progress): `pressed`
    is set when a line arrives (end of input is not a press)."""

    def __init__(self, term: Terminal) -> None:
        self.term = term
        self.pressed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        if await self.term.line() is not None:
            self.pressed.set()

    def __enter__(self) -> LineWatch:
        self._task = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def live_text(obs: Any, tags: Sequence[str]) -> str:
    """One line of the step's tags as the PLC holds them, with the controller's mode."""
    if obs is None:
        return "no reading yet"
    parts = [f"mode {obs.mode or '?'}"]
    if not obs.plc_ok:
        parts.append("PLC NOT READ")
    for t in tags:
        v = obs.inputs.get(t) if t in obs.inputs else obs.outputs.get(t)
        parts.append(f"{t}={shown(v)}")
    if obs.active:
        parts.append("active " + ",".join(sorted(obs.active)))
    if obs.latched:
        parts.append("latched " + ",".join(sorted(obs.latched)))
    return "  ".join(parts)
