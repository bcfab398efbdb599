"""The interface every PLC transport offers (Modbus TCP, OPC UA, the in-memory fake).

A transport never lets a comms failure escape as an exception into the scan: `read_inputs`
always returns a whole image in which unreadable points carry a bad quality, and
`write_outputs` reports what it could not write. Exceptions are for programming errors
(an unknown tag) only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn, Protocol

import structlog

from plc_io.codec import Block
from plc_io.image import ProcessImage, Sample, judge_why
from plc_io.tags import Tag, Value


class LinkState(StrEnum):
    CONNECTING = "connecting"
    OK = "ok"
    LOST = "lost"


class PlcError(Exception):
    """One error type for every way a PLC request fails.

    kind: "comms" (no answer, timeout, connection refused or dropped), "exception" (the PLC
    answered with a protocol error, e.g. Modbus exception code 2 illegal address), or
    "bad_reply" (an answer that cannot be decoded: short, garbled, wrong type).
    """

    def __init__(self, kind: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class UnknownTagError(KeyError):
    """A write names a tag that is not an output of the site's tag table."""


@dataclass(frozen=True)
class CommsHealth:
    """What the controller and the BMS see of the link."""

    state: LinkState = LinkState.CONNECTING
    since_s: float = 0.0  # when `state` was entered
    last_ok_s: float | None = None
    consecutive_failures: int = 0
    requests: int = 0  # requests sent since start (for the requests-per-scan figure)
    failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """What a write pass achieved. `heartbeat` is in `failed` with a reason starting
    "withheld:" when it was not sent because some other output of the pass failed."""

    written: tuple[str, ...] = ()  # tags acknowledged this pass (changed values plus heartbeat)
    failed: Mapping[str, str] = field(default_factory=dict)  # tag -> reason


class Transport(Protocol):
    """What the scan loop needs of a PLC link. Times come from the transport's own clock."""

    @property
    def health(self) -> CommsHealth: ...

    async def connect(self) -> None:
        """Try once to connect; never raises for comms. Later calls retry with back-off."""

    async def close(self) -> None: ...

    async def read_inputs(self) -> ProcessImage:
        """Read every input tag. Points that could not be read come back comms_lost or bad_reply."""

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        """Write the values that changed since the last good write, then `heartbeat` last,
        in its own request, only if every other due output was acknowledged (and verified).

        Raises UnknownTagError for a name that is not an output tag.
        """

    async def read_outputs(self) -> ProcessImage:
        """Read back the output tags as the PLC holds them."""

    def resend_all(self) -> None:
        """Send every output on the next pass, changed or not."""

    def hold_heartbeat(self, on: bool) -> None:
        """While on, every pass writes the heartbeat unchanged (a PLC watchdog proof test: the
        PLC sees a frozen heartbeat); the other outputs are written as usual."""


# ---- shared bookkeeping for the transports (link health, back-off, change-only logging) ----

MODBUS_EXCEPTIONS: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class LinkMonitor:
    """Link state, request counters and a bounded exponential back-off for reconnects.

    Also logs each failure cause once when it starts and once when it clears (keyed per block
    or per link), never every scan: a PLC that refuses one block for a week makes two lines.
    """

    def __init__(
        self, name: str, reconnect_max_s: float, base_s: float = 0.1, log: Any = None
    ) -> None:
        self.name = name
        self.reconnect_max_s = reconnect_max_s
        self.base_s = min(base_s, reconnect_max_s)
        self.log = log if log is not None else structlog.get_logger("plc_io")
        self.state = LinkState.CONNECTING
        self.since_s = 0.0
        self.last_ok_s: float | None = None
        self.consecutive_failures = 0
        self.requests = 0
        self.failures = 0
        self.last_error: str | None = None
        self.next_attempt_s = -math.inf
        self._causes: dict[str, str] = {}

    @property
    def health(self) -> CommsHealth:
        return CommsHealth(
            self.state,
            self.since_s,
            self.last_ok_s,
            self.consecutive_failures,
            self.requests,
            self.failures,
            self.last_error,
        )

    def _enter(self, state: LinkState, now_s: float) -> None:
        if state is not self.state:
            self.log.info("plc_link", transport=self.name, state=state.value, was=self.state.value)
            self.state, self.since_s = state, now_s

    def may_attempt(self, now_s: float) -> bool:
        """Whether the back-off allows another connect attempt now."""
        return now_s >= self.next_attempt_s

    def ok(self, now_s: float) -> None:
        """A request was answered: the link works (even if the answer was an error reply)."""
        self.consecutive_failures = 0
        self.last_ok_s = now_s
        self.next_attempt_s = -math.inf
        self._enter(LinkState.OK, now_s)
        self.cause("link", None)

    def lost(self, now_s: float, error: str) -> None:
        """A connect or request failed for comms: back off before the next connect attempt."""
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = error
        delay = min(self.reconnect_max_s, self.base_s * 2 ** (self.consecutive_failures - 1))
        self.next_attempt_s = now_s + delay
        self._enter(LinkState.LOST, now_s)
        self.cause("link", error)

    def error_reply(self, error: str) -> None:
        """The PLC answered with an error (counted, but the link itself is fine)."""
        self.failures += 1
        self.last_error = error

    def judged(self, tag: Tag, value: object, at_s: float) -> Sample:
        """`judge` a decoded value; a value of the wrong kind is bad_reply, its reason logged
        once when it starts and once when it clears (keyed per tag)."""
        sample, why = judge_why(tag, value, at_s)
        if why is not None or self._causes:
            self.cause(f"value {tag.name}", why and f"bad_reply: {why}")
        return sample

    def cause(self, key: str, cause: str | None) -> None:
        """Log a failure cause for `key` only when it changes (None: it cleared)."""
        old = self._causes.get(key)
        if old == cause:
            return
        if cause is None:
            del self._causes[key]
            self.log.info("plc_fault_cleared", transport=self.name, where=key, was=old)
        else:
            self._causes[key] = cause
            self.log.warning("plc_fault", transport=self.name, where=key, cause=cause)


HEARTBEAT = "heartbeat"


class OutputCache:
    """Which outputs a pass must send: the changed ones, `heartbeat` always, all after a reconnect.

    `normalise(tag, value)` turns a value into what is compared and sent (a Modbus encoding, an
    OPC UA Variant value) and raises ValueError (CodecError is one) for a value that must never
    be sent, such as NaN: that tag fails for this pass and its previous command stays in force.
    If the caller passes no `heartbeat`, the cache counts one itself (0 … range high, wrapping).
    """

    def __init__(
        self, site_name: str, outputs: Iterable[Tag], normalise: Callable[[Tag, Value], Any]
    ) -> None:
        self.site_name = site_name
        self.tags = {t.name: t for t in outputs}
        self.normalise = normalise
        self.desired: dict[str, Any] = {}
        self.written: dict[str, Any] = {}  # acknowledged by the PLC since the last connect
        self.heartbeat = 0
        self.hold = False  # the counter stands still (still sent each pass: a frozen beat)

    def accept(self, values: Mapping[str, Value]) -> dict[str, str]:
        """Take a pass's values; return the refused ones. Raises UnknownTagError."""
        failed: dict[str, str] = {}
        for name, v in values.items():
            tag = self.tags.get(name)
            if tag is None:
                raise UnknownTagError(
                    f"{name!r} is not an output tag of site {self.site_name!r} "
                    f"(outputs: {', '.join(self.tags)})"
                )
            try:
                self.desired[name] = self.normalise(tag, v)
            except (ValueError, TypeError) as e:
                failed[name] = f"refused, not sent: {e}"
        if HEARTBEAT in self.tags:
            if HEARTBEAT not in values:
                # wraps to 0 after the tag's range high (the site check demands [0, N])
                if not self.hold:
                    self.heartbeat = (self.heartbeat + 1) % (int(self.tags[HEARTBEAT].hi) + 1)
                self.desired[HEARTBEAT] = self.normalise(self.tags[HEARTBEAT], self.heartbeat)
            elif HEARTBEAT in failed:
                self.desired.pop(HEARTBEAT, None)  # never resend an old beat as if alive
        return failed

    def due(self) -> list[Tag]:
        """Outputs to send this pass, in tag-table order (`heartbeat` included)."""
        d, w = self.desired, self.written
        return [
            t
            for n, t in self.tags.items()
            if n in d and (n == HEARTBEAT or n not in w or w[n] != d[n])
        ]

    def sent(self, names: Iterable[str]) -> None:
        for n in names:
            self.written[n] = self.desired[n]

    def unsent(self, names: Iterable[str]) -> None:
        for n in names:
            self.written.pop(n, None)

    def reconnected(self) -> None:
        """The PLC may have lost every output: send them all again."""
        self.written.clear()


def withheld(failed: Mapping[str, str]) -> str:
    """The reason the heartbeat is not sent: the other outputs of the pass that failed."""
    names = sorted(n for n in failed if n != HEARTBEAT)
    first = failed[names[0]]
    if len(first) > 120:  # a reason may quote the PLC; one log line stays one line
        first = first[:120] + "… (truncated)"
    return f"withheld: {', '.join(names)} not acknowledged ({names[0]}: {first})"


async def write_in_order(
    out: OutputCache,
    values: Mapping[str, Value],
    connected: Callable[[], Awaitable[bool]],
    link_reason: Callable[[], str],
    send: Callable[[list[Tag], dict[str, str]], Awaitable[list[str]]],
) -> WriteResult:
    """One write pass, the same for every transport: the due commands first, `heartbeat` last.

    The heartbeat tells the PLC watchdog "my commands arrived". So it goes in a request of its
    own, after every other due output, and only when each of them was acknowledged (and read
    back, where `verify` is set) and none was refused before sending (NaN, wrong kind). Else it
    is withheld, `failed["heartbeat"]` says why ("withheld: …"), and if the controller cannot
    get its commands through for `watchdog_s` the PLC drives the plant to its safe values.

    `send(tags, failed)` writes the tags in as few requests as the protocol allows, verifies
    those marked `verify`, records each failure in `failed`, keeps `out` up to date and returns
    the names the PLC acknowledged.
    """
    failed = out.accept(values)
    due = out.due()
    if not due:
        return WriteResult((), failed)
    if not await connected():
        reason = link_reason()
        return WriteResult((), {**failed, **{t.name: reason for t in due}})
    commands = [t for t in due if t.name != HEARTBEAT]
    written = await send(commands, failed) if commands else []
    beat = [t for t in due if t.name == HEARTBEAT]
    if beat:
        if any(n != HEARTBEAT for n in failed):
            failed[HEARTBEAT] = withheld(failed)
        else:
            written += await send(beat, failed)
    return WriteResult(tuple(n for n in written if n not in failed), failed)


class PlannedTransport:
    """What the register-shaped transports (Modbus, in-memory) share: read plans executed by
    `_read`, the image kept between scans, and the output cache."""

    link: LinkMonitor
    _out: OutputCache
    _image: ProcessImage
    _input_plan: Sequence[Block]
    _output_plan: Sequence[Block]

    @property
    def health(self) -> CommsHealth:
        return self.link.health

    async def read_inputs(self) -> ProcessImage:
        self._image = await self._read(self._input_plan, self._image)
        return self._image

    async def read_outputs(self) -> ProcessImage:
        return await self._read(self._output_plan, ProcessImage())

    def resend_all(self) -> None:
        """Send every output on the next pass, changed or not (e.g. to release the watchdog)."""
        self._out.reconnected()

    def hold_heartbeat(self, on: bool) -> None:
        self._out.hold = on

    async def _read(self, plan: Sequence[Block], prev: ProcessImage) -> ProcessImage:
        raise NotImplementedError

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        return await write_in_order(
            self._out, values, self._connected, self._link_reason, self._send
        )

    async def _connected(self) -> bool:
        raise NotImplementedError

    async def _send(self, tags: list[Tag], failed: dict[str, str]) -> list[str]:
        raise NotImplementedError

    def _link_reason(self) -> str:
        """Nothing could be sent: every due output fails with the link's state as the reason."""
        return f"comms: link {self.link.state.value} ({self.link.last_error})"


async def answer_within(
    timeout_s: float,
    request: Awaitable[Any],
    fail: Callable[[str], NoReturn],
    comms_errors: tuple[type[BaseException], ...],
) -> Any:
    """Await one PLC request within the timeout; no answer or a broken connection goes to
    `fail` (which raises the comms PlcError and drops the link)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request
    except TimeoutError:
        fail(f"no answer within {timeout_s} s")
    except comms_errors as e:
        fail(f"{type(e).__name__}: {e}")
