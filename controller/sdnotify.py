"""systemd's notify protocol (sd_notify), by hand: READY, the watchdog, STATUS, STOPPING.

Theory of operation. systemd (Type=notify) passes `NOTIFY_SOCKET`, an AF_UNIX datagram address:
a path, or `@name` for the abstract namespace. Each message is one datagram of `KEY=value` lines.
With `WatchdogSec=` it also passes `WATCHDOG_USEC` (and `WATCHDOG_PID`, the process meant to
ping); once the service is ready, a service that sends no `WATCHDOG=1` within that time is killed
and, with `Restart=on-failure`, started again.

`attach` pings only from the scan hook, that is only when a scan has completed: a scan that
hangs (a blocked read, a stuck event loop) stops the pings and systemd restarts the process. That
is the second line; the first is the PLC's own watchdog on the heartbeat (DESIGN §7), which has
already driven the plant to its safe state by then (3 s against systemd's 10 s). READY=1 follows
the first completed scan, whatever the PLC link: a controller that runs with its PLC away is
doing its job (PLC-LINK alarm, BMS and metrics show it); restarting it would not bring the PLC
back and would exhaust systemd's start limit.

Sending never blocks and never raises: the socket is non-blocking (a full queue is a failed
send), and every failure is counted in `failures` and returned as False. The scan never waits
for systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.runtime import Controller, Status

STATUS_EVERY_S = 5.0  # STATUS= at most this often (on a change of mode, link or degraded)
MAX_VALUE = 400  # a STATUS text is a line, not a log


def _field(key: str, value: object) -> str | None:
    """`KEY=value` with the value on one line; None for a key systemd could misread."""
    if not key or not all(c.isupper() or c.isdigit() or c == "_" for c in key):
        return None
    text = str(value).replace("\n", " ").replace("\r", " ")
    return f"{key}={text[:MAX_VALUE]}"


class Notifier:
    """sd_notify over a real AF_UNIX SOCK_DGRAM socket; `notify` never raises."""

    def __init__(
        self, address: str, *, watchdog_usec: int | None = None, watchdog_pid: int | None = None
    ) -> None:
        self.address = address
        # '@name' is Linux's abstract namespace: a leading NUL byte
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid
        self.sent = 0
        self.failures = 0
        self.last_error: str | None = None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None when NOTIFY_SOCKET is unset or empty.
        A WATCHDOG_USEC that is not a positive whole number means no watchdog."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC", "")
        if raw.isdigit() and int(raw) > 0:
            usec = int(raw)
        pid: int | None = None
        raw_pid = environ.get("WATCHDOG_PID", "")
        if raw_pid:
            # a WATCHDOG_PID we cannot read is not ours: never ping on someone else's behalf
            pid = int(raw_pid) if raw_pid.isdigit() else -1
        return cls(address, watchdog_usec=usec, watchdog_pid=pid)

    @property
    def watchdog_s(self) -> float | None:
        """The watchdog period for this process, or None (none asked, or meant for another
        process: WATCHDOG_PID names a pid that is not ours)."""
        if self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 1e6

    def notify(self, **fields: object) -> bool:
        """Send one datagram of `KEY=value` lines (READY="1", WATCHDOG="1", STATUS="…",
        STOPPING="1"); True if the socket took it. Never raises, never blocks."""
        lines = [f for f in (_field(k, v) for k, v in fields.items()) if f is not None]
        if not lines:
            return False
        try:
            if self._sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                self._sock = s
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self._target)
        except Exception as e:  # gone, refused, queue full, bad address: counted, not raised
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"[:200]
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class _Hook:
    """The scan hook `attach` installs (state between scans; cheap on every scan)."""

    def __init__(self, ctl: Controller, notifier: Notifier) -> None:
        self.ctl = ctl
        self.n = notifier
        self.ready = False
        wd = notifier.watchdog_s
        self.ping_every_s = wd / 2 if wd is not None else None
        self.last_ping = -float("inf")
        self.status_text = ""
        self.status_at = -float("inf")

    def status_line(self, st: Status) -> str:
        d = st.decision
        mode = d.mode.value if d is not None else "no scan"
        text = f"mode {mode}; PLC link {st.health.state.value}"
        if d is not None and d.latched:
            text += f"; latched {','.join(sorted(d.latched))}"
        if st.degraded:
            text += "; degraded"
        return text

    def __call__(self, st: Status) -> None:
        now = self.ctl.clock()
        text = self.status_line(st)
        fields: dict[str, Any] = {}
        if not self.ready:
            fields["READY"] = "1"
        if text != self.status_text and (not self.ready or now - self.status_at >= STATUS_EVERY_S):
            fields["STATUS"] = text
        if self.ping_every_s is not None and now - self.last_ping >= self.ping_every_s:
            fields["WATCHDOG"] = "1"
        if not fields:
            return
        if self.n.notify(**fields):
            self.ready = True
            if "STATUS" in fields:
                self.status_text, self.status_at = text, now
            if "WATCHDOG" in fields:
                self.last_ping = now


def watchdog_floor_s(ctl: Controller) -> float:
    """The shortest systemd watchdog that suits the site: the PLC's watchdog must act first
    (twice its time plus its hold-off), and a healthy scan must ping in time (4 periods)."""
    plc, period = ctl.site.plc, ctl.site.scan.period_s
    return max(2.0 * plc.watchdog_s + plc.watchdog_holdoff_s, 4.0 * period)


def attach(ctl: Controller, notifier: Notifier) -> None:
    """A scan hook: READY=1 (with STATUS=) after the first completed scan, WATCHDOG=1 after
    completed scans at most every WATCHDOG_USEC/2, STATUS= on a change at most every
    STATUS_EVERY_S. A send that fails is tried again after the next scan. A systemd watchdog
    shorter than the site needs (`watchdog_floor_s`) is logged at once: it would restart a
    healthy controller, or act before the PLC's watchdog."""
    wd, floor = notifier.watchdog_s, watchdog_floor_s(ctl)
    if wd is not None and wd < floor:
        ctl.log.warning(
            "systemd_watchdog_short",
            watchdog_s=wd,
            needed_s=floor,
            fix=f"set WatchdogSec= to at least {floor:g}s in heatloop.service",
        )
    ctl.scan_hooks.append(_Hook(ctl, notifier))
