"""The controller's side of the BMS link, for tests: spawns the real child
`python -m controller.bms_server --fd N` over a socketpair, sends the hello and snapshots, and
answers (or ignores) its requests as the test says.

`snapshot(space, ...)` builds a complete, well-formed snapshot for a `Space` (every feed
present, good quality), which a test then changes where it wants to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from controller.bms_space import Space

ROOT = Path(__file__).resolve().parents[2]
RESEND_S = 1.0  # controller.bms_link.RESEND_S
READY_TIMEOUT_S = 60.0  # a loaded two-core machine: import asyncua, make a key, bind

Answerer = Callable[[dict[str, Any]], dict[str, Any] | None]


def accept(req: dict[str, Any]) -> dict[str, Any] | None:
    return {"ok": True, "why": "", "kind": "", "old": None, "new": req.get("args")}


def hello(
    space: Space,
    state_dir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    allow_none_security: bool = False,
    allow_anonymous: bool = False,
    trust_on_first_use: bool = False,
    max_sessions: int = 20,
    min_sampling_ms: int = 100,
    min_publishing_ms: int = 100,
    app_uri: str = "urn:heatloop:test:bms-server",
) -> dict[str, Any]:
    return {
        "t": "hello",
        "space": space.to_json(),
        "bms": {
            "host": host,
            "port": port,
            "allow_none_security": allow_none_security,
            "allow_anonymous": allow_anonymous,
            "trust_on_first_use": trust_on_first_use,
            "max_sessions": max_sessions,
            "min_sampling_ms": min_sampling_ms,
            "min_publishing_ms": min_publishing_ms,
        },
        "state_dir": str(state_dir),
        "users_file": str(state_dir / "bms_users.json"),
        "app_uri": app_uri,
        "json_logs": True,
    }


def snapshot(space: Space, *, seq: int = 1, wall: float | None = None) -> dict[str, Any]:
    """Every feed of `space` present with a plausible good value (mid-range numbers, False,
    mode NORMAL_REUSE); no alarms, no events."""
    wall = time.time() if wall is None else wall
    snap: dict[str, Any] = {
        "t": "snap",
        "seq": seq,
        "wall": wall,
        "status": {
            "mode": "NORMAL_REUSE" if "NORMAL_REUSE" in space.modes else space.modes[0],
            "mode_since": wall - 60.0,
            "trip_latched": False,
            "active_interlocks": [],
            "plc_comms_ok": True,
            "scan_overruns": 0,
        },
        "inputs": {},
        "outputs": {},
        "outputs_wall": wall,
        "energy": {},
        "setpoints": {},
        "interlocks": {},
        "alarms": [],
        "events": [],
    }
    for p in space.points:
        kind = p.feed[0]
        mid = (p.range[0] + p.range[1]) / 2 if p.range else 1.0
        value: Any = False if p.type == "Boolean" else mid
        if kind == "input":
            snap["inputs"][p.feed[1]] = [value, "good", wall - 0.1]
        elif kind == "energy":
            snap["energy"][p.feed[1]] = [value, "good", wall - 0.1]
        elif kind == "output":
            snap["outputs"].setdefault(p.feed[1], [value, "sequence", ""])[0] = value
        elif kind == "output_level":
            snap["outputs"].setdefault(p.feed[1], [0.0, "sequence", ""])[1] = "sequence"
        elif kind == "setpoint":
            snap["setpoints"][p.feed[1]] = [value, None]
        elif kind == "interlock":
            snap["interlocks"][p.feed[1]] = [False, False, False]
    return snap


class BmsParent:
    """One child process and its pair. `answerer(req)` gives the answer's fields (or None: no
    answer); every request is also kept in `reqs`."""

    def __init__(self, hello_msg: Mapping[str, Any], log_path: Path) -> None:
        self.hello_msg = dict(hello_msg)
        self.log_path = log_path
        self.answerer: Answerer | None = accept
        self.reqs: list[dict[str, Any]] = []
        self.alive: list[dict[str, Any]] = []
        self.ready: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self.eof = asyncio.Event()
        self.last_snap: dict[str, Any] | None = None
        self.resending = True
        self._resend_task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        assert self.ready is not None
        return str(self.ready["endpoint"])

    async def start(self, *, first_line: bytes | None = None, wait_ready: bool = True) -> None:
        ours, theirs = socket.socketpair()
        self._sock = ours
        fd = theirs.fileno()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log_path.open("ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controller.bms_server",
                "--fd",
                str(fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(fd,),
                cwd=str(ROOT),
                env=env,
            )
        theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours, limit=8 * 1024 * 1024)
        self._reader_task = asyncio.create_task(self._read(reader))
        self._resend_task = asyncio.create_task(self._resend())
        if first_line is not None:
            self._writer.write(first_line)
        else:
            self.send(self.hello_msg)
        if wait_ready:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while self.ready is None:
                    if self.proc.returncode is not None:
                        raise RuntimeError(f"child exited {self.proc.returncode}: {self.log()}")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self._ready.wait()

    def send(self, msg: Mapping[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg, allow_nan=False).encode() + b"\n")
        if msg.get("t") == "snap":
            self.last_snap = {**msg, "events": []}  # resent as is, its events told once

    async def _resend(self) -> None:
        """As the controller's link: the last snapshot again every RESEND_S while no new one
        comes (`resending` False: a controller gone silent with its socket open)."""
        while True:
            await asyncio.sleep(RESEND_S)
            if self.resending and self.last_snap is not None and self._writer is not None:
                self._writer.write(json.dumps(self.last_snap).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                self.eof.set()
                return
            msg = json.loads(line)
            t = msg.get("t")
            if t == "ready":
                self.ready = msg
                self._ready.set()
            elif t == "alive":
                self.alive.append(msg)
            elif t == "req":
                self.reqs.append(msg)
                fields = self.answerer(msg) if self.answerer is not None else None
                if fields is not None:
                    self.send({"t": "answer", "id": msg["id"], **fields})
            self._changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not pred():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._changed.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                if isinstance(d, dict) and d.get("event") == event:
                    out.append(d)
        return out

    async def close(self, timeout_s: float = 10.0) -> int | None:
        """Close our end (EOF for the child) and wait for it to exit; its exit code."""
        if self._writer is not None:
            self._writer.close()
        for task in (self._reader_task, self._resend_task):
            if task is not None:
                task.cancel()
        if self.proc is None:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None
