"""The BMS OPC UA server process: `python -m controller.bms_server --fd N`.

Theory of operation (DESIGN §9, §13). The controller (`controller.bms_link`) spawns this process
on one end of a `socket.socketpair()` inherited as fd N. Everything the server knows comes over
that pair: what to serve and how (`hello`), the values (`snap`) and the controller's decisions
(`answer`). It never reads the site file and never writes a PLC register; a client's write or
method call becomes a `req` that the controller's one command path decides. asyncua parses and
buffers whatever a client sends before any login, so a hostile client can stall this process:
that is why it is a process of its own, and why it never waits for its parent.

Protocol (one JSON object per line, UTF-8, at most `MAX_LINE` bytes):

  controller -> server
    {"t": "hello", "space": Space.to_json(), "bms": {host, port, allow_none_security,
     allow_anonymous, trust_on_first_use, max_sessions, min_sampling_ms, min_publishing_ms},
     "state_dir", "users_file", "app_uri", "json_logs"}       first line, once
    {"t": "snap", ...}                                          after every scan
    {"t": "answer", "id", "ok", "why", "kind", "old", "new"}    to a req
  server -> controller
    {"t": "ready", "endpoint", "policies"}                      once serving
    {"t": "alive", "sessions"}                                  every ALIVE_S
    {"t": "req", "id", "user", "cmd", "args", "reason"}         a write or a method call

A hello that is not one (garbage, too long, missing fields, a space that does not parse) is one
log line and exit 2; end of file on the pair stops the server and exits 0 at once (the
controller is gone or restarts us). A snapshot that is malformed is one log line (rate-limited)
and is skipped; a single value of the wrong shape serves Bad for that variable only. Writes to
the parent go into the socket's buffer without waiting (no `drain`): past `WRITE_BOUND` bytes
an `alive` is dropped and a request is refused BadCommunicationError, so a parent that does not
read can never stall the OPC UA clients.

Values. Each variable's value is written with `server.write_attribute_value` (4-6x cheaper than
`node.write_value`) only when its value or status changed, or when its source time moved on by
`REFRESH_S`; the status code comes from the point's quality (`QUALITY_STATUS`), the source
timestamp is the PLC read time for telemetry and the scan's wall time otherwise. Nothing is
historized (a client write without SourceTimestamp poisons asyncua's in-memory history). A
controller that sends no usable snapshot for `SILENCE_S` (hung, its socket still open) turns
every value UncertainNoCommunicationLastUsableValue until the next one. A snapshot without an
alarm list leaves the conditions as they stand (see `controller.bms_conditions`).

Writes and methods (asyncua 2.1 internals, pinned and tested in tests/hil/test_bms_server.py).
asyncua runs an attribute setter that raises as a failure of the whole Write request, so the
attribute write service is wrapped: every item gets its own status. The caller's session and
secure channel are not passed to the services, so `UaProcessor.process_message` is wrapped to
put the connection in a context variable for the duration of each request. Checks in order: a
None secure channel refuses every write and method (BadSecurityModeInsufficient); the session's
role, looked up again at each use (`BmsUserManager.role_of`), may do it (else
BadUserAccessDenied); the value's variant type (BadTypeMismatch) and range (BadOutOfRange,
NaN and infinities included); then a `req` to the controller, whose `answer` decides the status
(`KIND_STATUS`; no answer within `ANSWER_TIMEOUT_S`: BadTimeout). An accepted setpoint write
does not change the variable: the next snapshot shows the value the controller now uses. Each
refusal is logged once (user, node, value, status), rate-limited. asyncua 2.1 turns a method
handler's exception into BadUnexpectedError, so handlers return their status code instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from asyncua import Server, ua
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor

from controller import bms_space
from controller.bms_space import Point, Space
from plc_io.opcua import NUMERIC_VARIANTS

log = structlog.get_logger("heatloop.bms")

MAX_LINE = 4 * 1024 * 1024  # bytes per protocol line
WRITE_BOUND = 1024 * 1024  # bytes waiting in the pair's send buffer before we drop / refuse
HELLO_TIMEOUT_S = 60.0
ALIVE_S = 1.0
ANSWER_TIMEOUT_S = 5.0
MAX_PENDING = 32  # requests waiting for an answer (the controller takes as many)
STOP_TIMEOUT_S = 0.7  # end of file: the server gets this long to close, then we exit anyway
REFRESH_S = 10.0  # an unchanged value's source timestamp is brought up to date this often
# The controller sends a snapshot at least every second (bms_link.RESEND_S); silent this long,
# every value turns UncertainNoCommunicationLastUsableValue: a hung controller whose socket
# stays open must not leave its last values looking fresh.
SILENCE_S = 5.0
LOG_BURST = 10  # refusal / bad-input log lines per LOG_WINDOW_S; the rest are counted
LOG_WINDOW_S = 10.0
MAX_SHOWN = 120  # characters of a client's value in a log line
ROLES_WRITE = frozenset({"operator", "engineer"})

S = ua.StatusCodes
QUALITY_STATUS: Mapping[str, int] = {
    "good": S.Good,
    "forced": S.GoodLocalOverride,
    "stale": S.UncertainLastUsableValue,
    "out_of_range": S.BadOutOfRange,
    "comms_lost": S.BadNoCommunication,
    "bad_reply": S.BadCommunicationError,
    "none": S.BadWaitingForInitialData,
}
KIND_STATUS: Mapping[str, int] = {
    "denied": S.BadUserAccessDenied,
    "range": S.BadOutOfRange,
    "type": S.BadTypeMismatch,
    "invalid": S.BadInvalidArgument,
    "state": S.BadInvalidState,
    "busy": S.BadTooManyOperations,
}
VARIANT = {
    "Double": ua.VariantType.Double,
    "Boolean": ua.VariantType.Boolean,
    "String": ua.VariantType.String,
    "DateTime": ua.VariantType.DateTime,
    "UInt64": ua.VariantType.UInt64,
}
POLICIES = (
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class HelloError(ValueError):
    """The first line is not a usable hello (one line naming the field)."""


# ---- the hello ----


@dataclass(frozen=True)
class BmsSettings:
    host: str
    port: int
    allow_none_security: bool
    allow_anonymous: bool
    trust_on_first_use: bool
    max_sessions: int
    min_sampling_ms: float
    min_publishing_ms: float


@dataclass(frozen=True)
class Hello:
    space: Space
    bms: BmsSettings
    state_dir: Path
    users_file: Path
    app_uri: str
    json_logs: bool


def _shown(x: object, limit: int = MAX_SHOWN) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_hello(line: bytes) -> Hello:
    """The hello line as a `Hello`; HelloError naming the field, value and expectation."""
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise HelloError(f"hello: not JSON ({str(e)[:100]})") from None
    if not isinstance(msg, dict) or msg.get("t") != "hello":
        raise HelloError(f"hello: expected an object with t='hello', got {_shown(msg, 80)}")
    b = msg.get("bms")
    if not isinstance(b, dict):
        raise HelloError(f"hello.bms: expected an object, got {_shown(b, 80)}")

    def flag(name: str) -> bool:
        v = b.get(name)
        if not isinstance(v, bool):
            raise HelloError(f"hello.bms.{name}: expected true or false, got {_shown(v)}")
        return v

    def integer(name: str, lo: int, hi: int) -> int:
        v = b.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise HelloError(f"hello.bms.{name}: expected an integer {lo}..{hi}, got {_shown(v)}")
        return v

    def text(d: Mapping[str, Any], name: str, where: str) -> str:
        v = d.get(name)
        if not isinstance(v, str) or not v or len(v) > 4096:
            raise HelloError(f"{where}{name}: expected a non-empty string, got {_shown(v)}")
        return v

    settings = BmsSettings(
        host=text(b, "host", "hello.bms."),
        port=integer("port", 0, 65535),  # 0: any free port (tests)
        allow_none_security=flag("allow_none_security"),
        allow_anonymous=flag("allow_anonymous"),
        trust_on_first_use=flag("trust_on_first_use"),
        max_sessions=integer("max_sessions", 1, 1000),
        min_sampling_ms=integer("min_sampling_ms", 1, 3_600_000),
        min_publishing_ms=integer("min_publishing_ms", 1, 3_600_000),
    )
    try:
        sp = Space.from_json(msg.get("space"))
    except (ValueError, TypeError, KeyError) as e:
        raise HelloError(f"hello.space: {str(e)[:300]}") from None
    json_logs = msg.get("json_logs", True)
    if not isinstance(json_logs, bool):
        raise HelloError(f"hello.json_logs: expected true or false, got {_shown(json_logs)}")
    return Hello(
        space=sp,
        bms=settings,
        state_dir=Path(text(msg, "state_dir", "hello.")),
        users_file=Path(text(msg, "users_file", "hello.")),
        app_uri=text(msg, "app_uri", "hello."),
        json_logs=json_logs,
    )


# ---- small helpers ----


class Throttle:
    """At most `burst` log lines per `window_s`; the first line after a suppressed spell says
    how many were left out (so a flood of bad writes cannot flood the log)."""

    def __init__(
        self,
        burst: int = LOG_BURST,
        window_s: float = LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._start, self._sent, self.suppressed = -math.inf, 0, 0

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        now = self.clock()
        if now - self._start >= self.window_s:
            self._start, self._sent = now, 0
        if self._sent >= self.burst:
            self.suppressed += 1
            return
        self._sent += 1
        if self.suppressed:
            fields["suppressed_before"], self.suppressed = self.suppressed, 0
        getattr(log, level)(event, **fields)


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(code)


def _dt(wall: object) -> datetime | None:
    if isinstance(wall, bool) or not isinstance(wall, int | float) or not math.isfinite(wall):
        return None
    try:
        return datetime.fromtimestamp(float(wall), UTC)
    except (OverflowError, OSError, ValueError):
        return None


def typed(point: Point, value: object) -> object:
    """A snapshot value as the point's OPC UA value; ValueError if it does not fit."""
    if point.array:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {_shown(value)}")
        return list(value)
    t = point.type
    if t == "Double":
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    elif t == "Boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return value == 1
    elif t == "String":
        if isinstance(value, str):
            return value
    elif t == "DateTime":
        d = _dt(value)
        if d is not None:
            return d
    elif t == "UInt64" and _uint64(value):
        return value
    raise ValueError(f"expected {t}, got {_shown(value)}")


def _uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _initial(point: Point) -> object:
    if point.array:
        return []
    return {"Double": 0.0, "Boolean": False, "String": "", "DateTime": _EPOCH, "UInt64": 0}[
        point.type
    ]


def feed_sample(snap: Mapping[str, Any], feed: Sequence[str]) -> tuple[object, str, object]:
    """(value, quality, source wall time) of one feed in a snapshot; KeyError if it is absent,
    ValueError if its entry has the wrong shape."""
    kind = feed[0] if feed else ""
    wall = snap.get("wall")
    if kind == "status":
        return snap["status"][feed[1]], "good", wall
    if kind in ("input", "energy"):
        entry = snap["inputs" if kind == "input" else "energy"][feed[1]]
        if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[1], str):
            raise ValueError(f"expected [value, quality, read time], got {_shown(entry)}")
        return entry[0], entry[1], entry[2]
    if kind in ("output", "output_level"):
        entry = snap["outputs"][feed[1]]
        if not isinstance(entry, list) or len(entry) < 2:
            raise ValueError(f"expected [value, level, why], got {_shown(entry)}")
        at = snap.get("outputs_wall", wall)
        return (entry[0] if kind == "output" else entry[1]), "good", at
    if kind == "setpoint":
        entry = snap["setpoints"][feed[1]]
        if not isinstance(entry, list) or len(entry) != 2:
            raise ValueError(f"expected [effective, requested], got {_shown(entry)}")
        return entry[0], "good", wall
    if kind == "interlock":
        entry = snap["interlocks"][feed[1]]
        index = {"active": 0, "latched": 1, "bypassed": 2}[feed[2]]
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError(f"expected [active, latched, bypassed], got {_shown(entry)}")
        return entry[index], "good", wall
    raise KeyError(f"feed {feed!r}")


def data_value(point: Point, snap: Mapping[str, Any]) -> tuple[object, int, datetime | None]:
    """(value or None, status code, source time) of a point in a snapshot. An absent feed is
    BadWaitingForInitialData, a malformed one BadDataUnavailable (ValueError is not raised:
    one bad value must not hide the others)."""
    try:
        value, quality, at = feed_sample(snap, point.feed)
    except (KeyError, IndexError, TypeError):
        return None, S.BadWaitingForInitialData, None
    code = QUALITY_STATUS.get(quality) if isinstance(quality, str) else None
    if code is None:
        raise ValueError(
            f"quality: expected one of {sorted(QUALITY_STATUS)}, got {_shown(quality)}"
        )
    if value is None:
        # no number to serve: only the status speaks (a good status with no value is not one)
        return None, (S.BadWaitingForInitialData if code & 0xC0000000 == 0 else code), _dt(at)
    return typed(point, value), code, _dt(at)


# ---- who is calling ----

# The connection (UaProcessor) whose request is being served; asyncua's services are not told.
_CONNECTION: contextvars.ContextVar[Any] = contextvars.ContextVar("bms_connection", default=None)


def install_connection_context() -> None:
    """Wrap `UaProcessor.process_message` (asyncua 2.1 internals, pinned) so the services see
    which connection (session, user, secure channel) a request came on. Idempotent."""
    if getattr(UaProcessor, "_heatloop_context", False):
        return
    original = UaProcessor.process_message

    async def process_message(self: UaProcessor, seqhdr: Any, body: Any) -> Any:
        token = _CONNECTION.set(self)
        try:
            return await original(self, seqhdr, body)
        finally:
            _CONNECTION.reset(token)

    UaProcessor.process_message = process_message  # type: ignore[method-assign]
    UaProcessor._heatloop_context = True  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Caller:
    user: Any  # asyncua User of the session
    name: str  # the heatloop user name ("" when none)
    secure: bool  # the secure channel signs (and maybe encrypts): not MessageSecurityMode None


def current_caller() -> Caller | None:
    """The client whose request is being served, or None for the server's own calls."""
    proc = _CONNECTION.get()
    if proc is None:
        return None
    session = getattr(proc, "session", None)
    user = getattr(session, "user", None)
    try:
        mode = proc._connection.security_policy.Mode
    except AttributeError:
        mode = ua.MessageSecurityMode.None_
    name = getattr(user, "name", None)
    return Caller(user, name if isinstance(name, str) else "", mode != ua.MessageSecurityMode.None_)


# ---- the link to the controller ----


class Link:
    """The pair, both ways. `send` never waits: a full buffer refuses (False)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.dropped = 0
        self.closed = False

    def send(self, msg: Mapping[str, Any]) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        try:
            line = json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            log.error("bms_link_unencodable", t=msg.get("t"), error=str(e)[:200])
            return False
        data = line.encode() + b"\n"
        if self.writer.transport.get_write_buffer_size() + len(data) > WRITE_BOUND:
            self.dropped += 1
            return False
        self.writer.write(data)
        return True


# ---- the server ----


class BmsServer:
    """The asyncua server built from a hello; `apply(snap)` serves a snapshot, `answer(msg)`
    completes a request."""

    def __init__(self, hello: Hello, link: Link) -> None:
        self.hello = hello
        self.space = hello.space
        self.link = link
        self.server = Server()
        self.ns = 0
        self.endpoint = ""
        self.policies: list[str] = []
        self.users: Any = None  # bms_users.BmsUserManager
        self._nodes: dict[str, ua.NodeId] = {}  # point node id text -> NodeId
        self._points: list[tuple[Point, ua.NodeId]] = []
        self._setpoints: dict[ua.NodeId, Point] = {}
        self._ours: set[ua.NodeId] = set()  # every node we created (writes refused)
        self._last: dict[ua.NodeId, tuple[object, int, datetime | None]] = {}
        self._pending: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._req_counter = 0
        self._req_prefix = f"{os.getpid()}-{int(time.time())}"
        self.refusals = Throttle()
        self.complaints = Throttle()
        self.conditions: Any = None  # bms_conditions.Conditions
        self._event_gen: Any = None
        self._root: ua.NodeId | None = None
        self.last_snap_s = time.monotonic()
        self.silent = False

    # ---- build ----

    async def start(self) -> None:
        from controller import bms_pki, bms_users
        from controller.bms_conditions import Conditions

        h, b = self.hello, self.hello.bms
        install_connection_context()
        store = bms_users.UserStore(h.users_file)

        def channel_encrypted() -> bool | None:
            proc = _CONNECTION.get()
            if proc is None:
                return None
            mode = proc._connection.security_policy.Mode
            return bool(mode == ua.MessageSecurityMode.SignAndEncrypt)

        self.users = bms_users.BmsUserManager(
            store,
            allow_anonymous=b.allow_anonymous,
            log=log,
            peer=lambda: getattr(_CONNECTION.get(), "name", None),  # the client's address
            channel_encrypted=channel_encrypted,  # a password in clear over Sign-only: refused
        )
        server = self.server
        self.users.install(server.iserver)
        server.iserver.bind_condition_methods = True  # RefreshStart/End events, then ours
        await server.init()
        server.allow_remote_admin(False)
        server.set_server_name("heatloop BMS")
        await server.set_application_uri(h.app_uri)
        host = b.host
        url_host = f"[{host}]" if ":" in host else host
        self.endpoint = f"opc.tcp://{url_host}:{b.port}/heatloop"
        server.set_endpoint(self.endpoint)
        cert, key = bms_pki.server_certificate(h.state_dir, h.app_uri, host)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies = list(POLICIES)
        if b.allow_none_security:
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        self.policies = [p.name for p in policies]
        tokens: list[type] = [ua.UserNameIdentityToken]
        if b.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        server.set_certificate_validator(
            bms_pki.client_trust(h.state_dir, b.trust_on_first_use)  # type: ignore[arg-type]
        )
        self._limits()
        self.ns = await server.register_namespace(bms_space.NAMESPACE_URI)
        await self._build()
        self.conditions = Conditions(self, log)
        await self.conditions.build()
        self._wrap_write()
        self._event_gen = await server.get_event_generator(
            ua.ObjectIds.BaseEventType, ua.ObjectIds.Server
        )
        await server.start()
        if server.bserver is not None and b.port == 0 and server.bserver.port:
            self.endpoint = f"opc.tcp://{url_host}:{server.bserver.port}/heatloop"

    def _limits(self) -> None:
        """Sessions, connections and the fastest intervals a client gets (asyncua 2.1 has no
        setting for these; its attributes and services are adjusted here, pinned)."""
        b, iserver = self.hello.bms, self.server.iserver
        InternalSession.max_connections = b.max_sessions  # activated sessions (class-wide)
        iserver.max_connections = b.max_sessions + 10  # TCP connections, before login too
        iserver.max_pending_activation_seconds = 10.0  # an abandoned connection is closed
        iserver.max_subscriptions = 10 * b.max_sessions
        subs = iserver.subscription_service
        create_sub = subs.create_subscription
        create_items = subs.create_monitored_items
        modify_items = subs.modify_monitored_items
        min_pub, min_samp = float(b.min_publishing_ms), float(b.min_sampling_ms)

        async def create_subscription(
            params: ua.CreateSubscriptionParameters, *args: Any, **kw: Any
        ) -> ua.CreateSubscriptionResult:
            asked = params.RequestedPublishingInterval
            if not (isinstance(asked, int | float) and math.isfinite(asked) and asked >= min_pub):
                params.RequestedPublishingInterval = min_pub  # revised up (or a garbage value)
            return await create_sub(params, *args, **kw)

        def _revise(results: Sequence[Any]) -> None:
            for r in results:
                if r.RevisedSamplingInterval is None or not r.RevisedSamplingInterval >= min_samp:
                    r.RevisedSamplingInterval = min_samp

        async def create_monitored_items(params: Any) -> Any:
            results = await create_items(params)
            _revise(results)
            return results

        def modify_monitored_items(params: Any) -> Any:
            results = modify_items(params)
            _revise(results)
            return results

        subs.create_subscription = create_subscription  # type: ignore[method-assign]
        subs.create_monitored_items = create_monitored_items  # type: ignore[method-assign]
        subs.modify_monitored_items = modify_monitored_items  # type: ignore[method-assign]

    def nodeid(self, text: str) -> ua.NodeId:
        return ua.NodeId(text, self.ns)

    async def add_nodes(self, items: list[ua.AddNodesItem]) -> None:
        for r in await self.server.iserver.isession.add_nodes(items):
            r.StatusCode.check()
        self._ours.update(i.RequestedNewNodeId for i in items)

    def object_item(
        self,
        node_id: str,
        parent: ua.NodeId,
        name: str,
        *,
        typedef: int = ua.ObjectIds.BaseObjectType,
        ref: int = ua.ObjectIds.HasComponent,
        description: str = "",
        notifier: bool = False,
    ) -> ua.AddNodesItem:
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = self.nodeid(node_id)
        item.BrowseName = ua.QualifiedName(name, self.ns)
        item.ParentNodeId = parent
        item.ReferenceTypeId = ua.NodeId(ref)
        item.NodeClass = ua.NodeClass.Object
        item.TypeDefinition = ua.NodeId(typedef)
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(description or name)
        attrs.EventNotifier = ua.EventNotifier.SubscribeToEvents.mask if notifier else 0
        attrs.WriteMask = attrs.UserWriteMask = 0
        item.NodeAttributes = attrs
        return item

    def variable_item(
        self,
        node_id: str,
        parent: ua.NodeId,
        name: str,
        variant: ua.Variant,
        *,
        datatype: ua.NodeId,
        typedef: int = ua.ObjectIds.BaseDataVariableType,
        ref: int = ua.ObjectIds.HasComponent,
        description: str = "",
        writable: bool = False,
        array: bool = False,
        name_ns: int | None = None,
    ) -> ua.AddNodesItem:
        item = ua.AddNodesItem()
        item.RequestedNewNodeId = self.nodeid(node_id)
        item.BrowseName = ua.QualifiedName(name, self.ns if name_ns is None else name_ns)
        item.ParentNodeId = parent
        item.ReferenceTypeId = ua.NodeId(ref)
        item.NodeClass = ua.NodeClass.Variable
        item.TypeDefinition = ua.NodeId(typedef)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(name)
        attrs.Description = ua.LocalizedText(description or name)
        attrs.DataType = datatype
        attrs.Value = variant
        if array:
            attrs.ValueRank = ua.ValueRank.OneDimension
            attrs.ArrayDimensions = [0]
        else:
            attrs.ValueRank = ua.ValueRank.Scalar
            attrs.ArrayDimensions = None
        access = ua.AccessLevel.CurrentRead.mask
        if writable:
            access |= ua.AccessLevel.CurrentWrite.mask
        attrs.AccessLevel = attrs.UserAccessLevel = access
        attrs.WriteMask = attrs.UserWriteMask = 0
        attrs.Historizing = False
        item.NodeAttributes = attrs
        return item

    def property_item(
        self, node_id: str, parent: ua.NodeId, name: str, variant: ua.Variant, datatype: int
    ) -> ua.AddNodesItem:
        """A standard property (browse name in namespace 0, as the spec names it)."""
        return self.variable_item(
            node_id,
            parent,
            name,
            variant,
            datatype=ua.NodeId(datatype),
            typedef=ua.ObjectIds.PropertyType,
            ref=ua.ObjectIds.HasProperty,
            name_ns=0,
        )

    async def _build(self) -> None:
        sp = self.space
        root = self.nodeid(bms_space.ROOT)
        self._root = root
        items = [
            self.object_item(
                bms_space.ROOT,
                ua.NodeId(ua.ObjectIds.ObjectsFolder),
                bms_space.ROOT,
                ref=ua.ObjectIds.Organizes,
                description=f"heatloop supervisory controller, site {sp.site}",
                notifier=True,
            )
        ]
        for path in sp.objects():
            parent = self.nodeid(bms_space.node_id_of(path[:-1])) if len(path) > 1 else root
            folder = len(path) == 1
            items.append(
                self.object_item(
                    bms_space.node_id_of(path),
                    parent,
                    path[-1],
                    typedef=ua.ObjectIds.FolderType if folder else ua.ObjectIds.BaseObjectType,
                    ref=ua.ObjectIds.Organizes if folder else ua.ObjectIds.HasComponent,
                    notifier=path == ("Alarms",),
                )
            )
        await self.add_nodes(items)
        items = []
        for p in sp.points:
            nid = self.nodeid(p.node_id)
            parent = self.nodeid(bms_space.node_id_of(p.path[:-1])) if len(p.path) > 1 else root
            vt = VARIANT[p.type]
            # AnalogItemType requires EURange; a metered total (kWh) has a unit but no range
            typedef = ua.ObjectIds.BaseDataVariableType
            if p.type == "Double" and p.range is not None:
                typedef = ua.ObjectIds.AnalogItemType
            elif p.type == "Double" and p.unece is not None:
                typedef = ua.ObjectIds.BaseAnalogType
            value = p.value if p.feed == ("static",) else _initial(p)
            items.append(
                self.variable_item(
                    p.node_id,
                    parent,
                    p.path[-1],
                    ua.Variant(value, vt, is_array=p.array) if p.array else ua.Variant(value, vt),
                    datatype=ua.NodeId(vt.value),
                    typedef=typedef,
                    description=p.description,
                    writable=p.access == "write",
                    array=p.array,
                )
            )
            if p.unece is not None:
                unit_id, code = p.unece
                eu = ua.EUInformation(
                    NamespaceUri=bms_space.UNECE_NAMESPACE,
                    UnitId=unit_id,
                    DisplayName=ua.LocalizedText(p.unit or code),
                    Description=ua.LocalizedText(code),
                )
                items.append(
                    self.property_item(
                        p.node_id + ".EngineeringUnits",
                        nid,
                        "EngineeringUnits",
                        ua.Variant(eu, ua.VariantType.ExtensionObject),
                        ua.ObjectIds.EUInformation,
                    )
                )
            if p.range is not None:
                rng = ua.Range(Low=float(p.range[0]), High=float(p.range[1]))
                items.append(
                    self.property_item(
                        p.node_id + ".EURange",
                        nid,
                        "EURange",
                        ua.Variant(rng, ua.VariantType.ExtensionObject),
                        ua.ObjectIds.Range,
                    )
                )
            self._nodes[p.node_id] = nid
            if p.feed != ("static",):
                self._points.append((p, nid))
            if p.access == "write":
                self._setpoints[nid] = p
        await self.add_nodes(items)
        for _, nid in self._points:  # nothing known yet: no made-up zero served as good
            await self.server.write_attribute_value(
                nid, ua.DataValue(StatusCode=_status(S.BadWaitingForInitialData))
            )
        await self._build_mode_machine()
        await self._build_methods(root)

    async def _build_mode_machine(self) -> None:
        """Status/ModeMachine: a FiniteStateMachineType-style object. asyncua 2.1 declares
        FiniteStateMachineType abstract (its StateMachine helper cannot instantiate it), so the
        object is of a concrete subtype `HeatLoopModeMachineType` with CurrentState (a
        StateVariableType whose Id names the current state object) and one StateType object
        per mode with its StateNumber."""
        if not self.space.modes:
            return
        status = self.nodeid("HeatLoop.Status")
        if status not in self._ours:
            return
        mtype = await self.server.create_custom_object_type(
            self.ns, "HeatLoopModeMachineType", ua.NodeId(ua.ObjectIds.FiniteStateMachineType)
        )
        base = "HeatLoop.Status.ModeMachine"
        machine = self.nodeid(base)
        item = self.object_item(base, status, "ModeMachine", description="Mode as a state machine")
        item.TypeDefinition = mtype.nodeid
        items = [
            item,
            self.variable_item(
                base + ".CurrentState",
                machine,
                "CurrentState",
                ua.Variant(ua.LocalizedText(""), ua.VariantType.LocalizedText),
                datatype=ua.NodeId(ua.ObjectIds.LocalizedText),
                typedef=ua.ObjectIds.FiniteStateVariableType,
                name_ns=0,
            ),
            self.property_item(
                base + ".CurrentState.Id",
                self.nodeid(base + ".CurrentState"),
                "Id",
                ua.Variant(ua.NodeId(), ua.VariantType.NodeId),
                ua.ObjectIds.NodeId,
            ),
        ]
        self._mode_states: dict[str, ua.NodeId] = {}
        for i, mode in enumerate(self.space.modes, start=1):
            sid = f"{base}.{mode}"
            items.append(self.object_item(sid, machine, mode, typedef=ua.ObjectIds.StateType))
            items.append(
                self.property_item(
                    sid + ".StateNumber",
                    self.nodeid(sid),
                    "StateNumber",
                    ua.Variant(i, ua.VariantType.UInt32),
                    ua.ObjectIds.UInt32,
                )
            )
            self._mode_states[mode] = self.nodeid(sid)
        await self.add_nodes(items)
        self._mode_current = self.nodeid(base + ".CurrentState")
        self._mode_current_id = self.nodeid(base + ".CurrentState.Id")
        await self.server.write_attribute_value(
            self._mode_current, ua.DataValue(StatusCode=_status(S.BadWaitingForInitialData))
        )
        self._mode_shown: str | None = None

    async def _build_methods(self, root: ua.NodeId) -> None:
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {}
        for m in self.space.methods:
            handlers[m.name] = self._method_handler(m)
        node = self.server.get_node(root)
        for m in self.space.methods:
            args = [
                ua.Argument(
                    Name=name,
                    DataType=ua.NodeId(VARIANT[t].value),
                    ValueRank=-1,
                    ArrayDimensions=[],
                    Description=ua.LocalizedText(text),
                )
                for name, t, text in m.inputs
            ]
            method = await node.add_method(
                self.nodeid(m.node_id),
                ua.QualifiedName(m.name, self.ns),
                handlers[m.name],
                args,
                [],
            )
            await method.write_attribute(
                ua.AttributeIds.Description,
                ua.DataValue(ua.Variant(ua.LocalizedText(m.description))),
            )
            self._ours.add(method.nodeid)

    # ---- stop ----

    async def stop(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result({"ok": False, "kind": "_link"})
        with contextlib.suppress(Exception):
            await self.server.stop()

    def sessions(self) -> int:
        return max(0, InternalSession._current_connections)

    # ---- values ----

    async def apply(self, snap: Mapping[str, Any]) -> None:
        """Serve one snapshot (malformed parts are logged, bounded, never raised)."""
        for section in ("status", "inputs", "outputs", "energy", "setpoints", "interlocks"):
            if not isinstance(snap.get(section, {}), dict):
                self.complaints(
                    "warning", "bms_snapshot_malformed", field=section, why="expected an object"
                )
                return
        self.last_snap_s = time.monotonic()
        self.silent = False
        now = datetime.now(UTC)
        wall = _dt(snap.get("wall"))
        write = self.server.write_attribute_value
        for p, nid in self._points:
            try:
                value, code, at = data_value(p, snap)
            except ValueError as e:
                value, code, at = None, S.BadDataUnavailable, wall
                self.complaints("warning", "bms_snapshot_value", node=p.node_id, why=str(e)[:200])
            at = at or wall
            if self._unchanged(self._last.get(nid), value, code, at):
                continue
            self._last[nid] = (value, code, at)
            if value is None:
                dv = ua.DataValue(StatusCode=_status(code), SourceTimestamp=at, ServerTimestamp=now)
            else:
                vt = VARIANT[p.type]
                dv = ua.DataValue(
                    ua.Variant(value, vt, is_array=True) if p.array else ua.Variant(value, vt),
                    StatusCode=_status(code),
                    SourceTimestamp=at,
                    ServerTimestamp=now,
                )
            result = await write(nid, dv)
            if isinstance(result, ua.StatusCode) and not result.is_good():
                self._last.pop(nid, None)
                self.complaints(
                    "warning", "bms_value_not_served", node=p.node_id, status=result.name
                )
        await self._apply_mode(snap, now)
        # no usable alarm list: the conditions keep their states (a standing alarm is never
        # cleared by a snapshot that says nothing about alarms)
        alarms = snap.get("alarms")
        if isinstance(alarms, list):
            await self.conditions.apply(alarms, now)
        else:
            self.complaints("warning", "bms_snapshot_malformed", field="alarms", why="not a list")
        events = snap.get("events", [])
        if isinstance(events, list):
            for ev in events[:100]:
                await self._emit_event(ev)
        else:
            self.complaints("warning", "bms_snapshot_malformed", field="events", why="not a list")

    async def check_silence(self) -> None:
        """No snapshot for SILENCE_S: every value keeps its number with the status
        UncertainNoCommunicationLastUsableValue (the next snapshot rewrites them all)."""
        if self.silent or time.monotonic() - self.last_snap_s < SILENCE_S:
            return
        self.silent = True
        log.warning("bms_controller_silent", after_s=SILENCE_S)
        code = S.UncertainNoCommunicationLastUsableValue
        now = datetime.now(UTC)
        for p, nid in self._points:
            last = self._last.get(nid)
            if last is None or last[1] & 0x80000000:  # nothing served yet, or already Bad
                continue
            value, _, at = last
            self._last[nid] = (value, code, at)
            if value is None:
                dv = ua.DataValue(StatusCode=_status(code), SourceTimestamp=at, ServerTimestamp=now)
            else:
                vt = VARIANT[p.type]
                variant = ua.Variant(value, vt, is_array=True) if p.array else ua.Variant(value, vt)
                dv = ua.DataValue(
                    variant, StatusCode=_status(code), SourceTimestamp=at, ServerTimestamp=now
                )
            await self.server.write_attribute_value(nid, dv)

    @staticmethod
    def _unchanged(
        last: tuple[object, int, datetime | None] | None,
        value: object,
        code: int,
        at: datetime | None,
    ) -> bool:
        """Same value and status, and a source time that has not moved on by REFRESH_S."""
        if last is None or last[0] != value or last[1] != code:
            return False
        return at is None or last[2] is None or (at - last[2]).total_seconds() < REFRESH_S

    async def _apply_mode(self, snap: Mapping[str, Any], now: datetime) -> None:
        if not hasattr(self, "_mode_current"):
            return
        status = snap.get("status")
        mode = status.get("mode") if isinstance(status, dict) else None
        if mode == self._mode_shown or not isinstance(mode, str):
            return
        state = self._mode_states.get(mode)
        if state is None:
            self.complaints("warning", "bms_snapshot_value", node="ModeMachine", why=_shown(mode))
            return
        self._mode_shown = mode
        at = _dt(status.get("mode_since")) or now
        await self.server.write_attribute_value(
            self._mode_current,
            ua.DataValue(
                ua.Variant(ua.LocalizedText(mode), ua.VariantType.LocalizedText),
                SourceTimestamp=at,
                ServerTimestamp=now,
            ),
        )
        await self.server.write_attribute_value(
            self._mode_current_id,
            ua.DataValue(ua.Variant(state, ua.VariantType.NodeId), SourceTimestamp=at),
        )

    async def _emit_event(self, ev: object) -> None:
        """A mode change or a command as a BaseEventType event on the Server object (where
        BMS clients subscribe; asyncua does not propagate events up the tree)."""
        if not isinstance(ev, dict) or not isinstance(ev.get("message"), str):
            self.complaints("warning", "bms_snapshot_malformed", field="events", why=_shown(ev))
            return
        kind = ev.get("kind")
        fields = ev.get("fields") if isinstance(ev.get("fields"), dict) else {}
        if kind == "mode_changed":
            severity = 700 if "TRIP" in str(fields.get("to", "")) else 500
        else:
            severity = 300 if fields.get("accepted", True) else 400
        gen = self._event_gen
        gen.event.Message = ua.LocalizedText(f"{kind}: {ev['message']}"[:1000])
        gen.event.Severity = severity
        gen.event.SourceNode = self._root
        gen.event.SourceName = bms_space.ROOT
        await gen.trigger(time_attr=_dt(ev.get("wall")))

    # ---- requests ----

    async def request(self, user: str, cmd: str, args: Mapping[str, Any], reason: str) -> int:
        """Send a `req` and wait for the controller's answer; the OPC UA status it means."""
        if len(self._pending) >= MAX_PENDING:
            return S.BadTooManyOperations
        self._req_counter += 1
        rid = f"{self._req_prefix}-{self._req_counter}"[:64]
        fut: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            msg = {"t": "req", "id": rid, "user": user, "cmd": cmd, "args": dict(args)}
            msg["reason"] = reason[:500]
            if not self.link.send(msg):
                return S.BadCommunicationError
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    answer = await fut
            except TimeoutError:
                return S.BadTimeout
        finally:
            self._pending.pop(rid, None)
        if answer.get("kind") == "_link":
            return S.BadCommunicationError
        if answer.get("ok") is True:
            return S.Good
        return KIND_STATUS.get(str(answer.get("kind")), S.BadInvalidArgument)

    def answer(self, msg: Mapping[str, Any]) -> None:
        fut = self._pending.get(msg.get("id")) if isinstance(msg.get("id"), str) else None
        if fut is None:
            self.complaints("info", "bms_answer_unknown", id=_shown(msg.get("id"), 80))
            return
        if not fut.done():
            fut.set_result(msg)

    def refuse(self, caller: Caller | None, node: str, value: object, code: int, why: str) -> int:
        self.refusals(
            "warning",
            "bms_refused",
            user=caller.name if caller else "",
            node=node,
            value=_shown(value),
            status=ua.StatusCode(code).name,
            why=why,
        )
        return code

    def role(self, caller: Caller) -> str | None:
        try:
            return self.users.role_of(caller.user)
        except Exception as e:  # a broken users file refuses, never crashes a request
            self.complaints("error", "bms_role_lookup_failed", error=repr(e)[:200])
            return None

    def gate(self, caller: Caller | None, node: str, value: object, roles: frozenset[str]) -> int:
        """The checks every write and method starts with: secure channel, then role."""
        if caller is None:
            return self.refuse(caller, node, value, S.BadUserAccessDenied, "no session")
        if not caller.secure:
            return self.refuse(
                caller, node, value, S.BadSecurityModeInsufficient, "unsigned (None) channel"
            )
        role = self.role(caller)
        if role not in roles:
            why = f"role {role!r} may not (needs {' or '.join(sorted(roles))})"
            return self.refuse(caller, node, value, S.BadUserAccessDenied, why)
        return S.Good

    # ---- writes ----

    def _wrap_write(self) -> None:
        service = self.server.iserver.attribute_service
        original = service.write

        async def write(params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
            caller = current_caller()
            if caller is None:  # the server's own writes (asyncua internals)
                if user is None:
                    return await original(params)
                return await original(params, user=user)
            items = params.NodesToWrite
            results: list[ua.StatusCode | None] = [None] * len(items)
            passthrough: list[int] = []
            jobs: list[tuple[int, Awaitable[int]]] = []
            for i, wv in enumerate(items):
                if wv.NodeId in self._setpoints:
                    code = self._check_setpoint(caller, wv)
                    if code is None:
                        jobs.append((i, self._request_setpoint(caller, wv)))
                    else:
                        results[i] = _status(code)
                elif wv.NodeId in self._ours or wv.NodeId.NamespaceIndex == self.ns:
                    code = (
                        S.BadSecurityModeInsufficient
                        if not caller.secure
                        else (S.BadUserAccessDenied)
                    )
                    results[i] = _status(
                        self.refuse(
                            caller, str(wv.NodeId.Identifier), _value_of(wv), code, "read-only"
                        )
                    )
                elif not caller.secure:
                    results[i] = _status(
                        self.refuse(
                            caller,
                            wv.NodeId.to_string(),
                            _value_of(wv),
                            S.BadSecurityModeInsufficient,
                            "unsigned (None) channel",
                        )
                    )
                else:
                    passthrough.append(i)
            if jobs:
                codes = await asyncio.gather(*(j for _, j in jobs))
                for (i, _), code in zip(jobs, codes, strict=True):
                    results[i] = _status(code)
            if passthrough:
                sub = ua.WriteParameters(NodesToWrite=[items[i] for i in passthrough])
                done = await (original(sub) if user is None else original(sub, user=user))
                for i, code in zip(passthrough, done, strict=True):
                    results[i] = code
            return [r if r is not None else _status(S.BadInternalError) for r in results]

        service.write = write  # type: ignore[method-assign]

    def _check_setpoint(self, caller: Caller, wv: ua.WriteValue) -> int | None:
        """None when the write may go to the controller, else the refusal's status."""
        p = self._setpoints[wv.NodeId]
        value = _value_of(wv)
        if wv.AttributeId != ua.AttributeIds.Value or wv.IndexRange:
            return self.refuse(
                caller, p.node_id, value, S.BadUserAccessDenied, "only the value may be written"
            )
        code = self.gate(caller, p.node_id, value, ROLES_WRITE)
        if code != S.Good:
            return code
        variant = wv.Value.Value if wv.Value is not None else None
        if (
            variant is None
            or variant.VariantType not in NUMERIC_VARIANTS
            or isinstance(variant.Value, list | bool)
            or variant.Value is None
        ):
            vt = variant.VariantType.name if variant is not None else "none"
            return self.refuse(
                caller, p.node_id, value, S.BadTypeMismatch, f"expected a number, got {vt}"
            )
        v = float(variant.Value)
        if not math.isfinite(v):
            return self.refuse(caller, p.node_id, value, S.BadOutOfRange, "not a finite number")
        if p.range is not None and not p.range[0] <= v <= p.range[1]:
            return self.refuse(
                caller,
                p.node_id,
                value,
                S.BadOutOfRange,
                f"expected {p.range[0]:g}..{p.range[1]:g}",
            )
        return None

    async def _request_setpoint(self, caller: Caller, wv: ua.WriteValue) -> int:
        p = self._setpoints[wv.NodeId]
        v = float(wv.Value.Value.Value)
        name = p.feed[1] if len(p.feed) > 1 else p.path[-1]
        code = await self.request(
            caller.name,
            "setpoint",
            {"name": name, "value": v},
            f"OPC UA write {'/'.join(p.path)}",
        )
        if code != S.Good:
            self.refuse(caller, p.node_id, v, code, "the controller refused or did not answer")
        return code

    # ---- methods ----

    def _method_handler(self, m: bms_space.Method) -> Callable[..., Awaitable[Any]]:
        roles = frozenset({"engineer"}) if m.cmd == "reset" else ROLES_WRITE
        expected = [VARIANT[t] for _, t, _ in m.inputs]

        async def handler(parent: ua.NodeId, *args: ua.Variant) -> Any:
            caller = current_caller()
            shown = [a.Value for a in args]
            code = self.gate(caller, m.node_id, shown, roles)
            if code != S.Good:
                return _status(code)
            assert caller is not None
            if len(args) != len(expected):
                return _status(
                    self.refuse(
                        caller,
                        m.node_id,
                        shown,
                        S.BadInvalidArgument,
                        f"expected {len(expected)} arguments",
                    )
                )
            bad = [
                a.VariantType != vt or isinstance(a.Value, list)
                for a, vt in zip(args, expected, strict=True)
            ]
            if any(bad):
                self.refuse(caller, m.node_id, shown, S.BadTypeMismatch, "argument type")
                return ua.CallMethodResult(
                    StatusCode=_status(S.BadInvalidArgument),
                    InputArgumentResults=[_status(S.BadTypeMismatch if b else S.Good) for b in bad],
                )
            if m.cmd == "reset":
                cmd_args: dict[str, Any] = {"rules": []}
            elif m.cmd == "ack":
                cmd_args = {"all": True}
            elif m.cmd == "reject":
                cmd_args = {"on": bool(args[0].Value)}
            else:
                cmd_args = {}
            code = await self.request(caller.name, m.cmd, cmd_args, f"OPC UA method {m.name}")
            if code != S.Good:
                self.refuse(caller, m.node_id, shown, code, "the controller refused")
            return _status(code)

        return handler


def _value_of(wv: ua.WriteValue) -> object:
    v = wv.Value.Value if wv.Value is not None else None
    return v.Value if v is not None else None


# ---- the process ----


async def _read_hello(reader: asyncio.StreamReader) -> Hello:
    try:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            line = await reader.readline()
    except TimeoutError:
        raise HelloError(f"hello: nothing within {HELLO_TIMEOUT_S:g} s") from None
    except ValueError:  # longer than the stream's limit
        raise HelloError(f"hello: line longer than {MAX_LINE} bytes") from None
    if not line:
        raise HelloError("hello: end of file before the hello")
    return parse_hello(line)


async def _alive_loop(bms: BmsServer, link: Link) -> None:
    while True:
        link.send({"t": "alive", "sessions": bms.sessions()})
        try:
            await bms.check_silence()
        except Exception as e:  # never let the heartbeat die of it
            bms.complaints("error", "bms_silence_check_failed", error=repr(e)[:300])
        await asyncio.sleep(ALIVE_S)


async def _serve_link(bms: BmsServer, link: Link) -> None:
    """Handle the parent's lines until end of file."""
    reader = link.reader
    while True:
        try:
            line = await reader.readline()
        except ValueError:
            bms.complaints("warning", "bms_link_line_too_long", limit=MAX_LINE)
            continue
        except (ConnectionError, OSError):
            return
        if not line:
            return
        if not line.endswith(b"\n"):
            return  # the last, cut line of a closing pair
        try:
            msg = json.loads(line)
        except ValueError as e:
            bms.complaints("warning", "bms_link_bad_line", error=str(e)[:200], line=line[:200])
            continue
        if not isinstance(msg, dict):
            bms.complaints("warning", "bms_link_bad_line", error="not an object", line=line[:200])
            continue
        t = msg.get("t")
        try:
            if t == "snap":
                await bms.apply(msg)
            elif t == "answer":
                bms.answer(msg)
            elif t == "hello":
                bms.complaints("warning", "bms_link_second_hello")
            else:
                bms.complaints("warning", "bms_link_unknown", t=_shown(t, 40))
        except Exception as e:  # a bug here skips the line, never stops the server
            bms.complaints("error", "bms_link_line_failed", t=_shown(t, 40), error=repr(e)[:300])


async def run(fd: int) -> int:
    """The process: hello, serve, until end of file. Returns the exit code."""
    from controller import logs

    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE)
    link = Link(reader, writer)
    try:
        hello = await _read_hello(reader)
    except HelloError as e:
        log.error("bms_hello_refused", why=str(e))
        return 2
    logs.configure(json=hello.json_logs)
    bms = BmsServer(hello, link)
    try:
        await bms.start()
    except Exception as e:
        log.error("bms_server_start_failed", endpoint=bms.endpoint, error=repr(e)[:500])
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bms.stop(), STOP_TIMEOUT_S)
        return 1
    link.send({"t": "ready", "endpoint": bms.endpoint, "policies": bms.policies})
    log.info("bms_server_ready", endpoint=bms.endpoint, policies=bms.policies)
    alive = asyncio.create_task(_alive_loop(bms, link))
    try:
        await _serve_link(bms, link)
    finally:
        link.closed = True
        alive.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(bms.stop(), STOP_TIMEOUT_S)
        log.info("bms_server_stopped", why="end of file from the controller")
    return 0


NICE = 10  # the server process's CPU priority relative to the controller


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m controller.bms_server")
    parser.add_argument("--fd", type=int, required=True, help="the inherited socketpair end")
    ns = parser.parse_args(argv)
    # below the controller: on a small IPC the scan must win every contest for a core
    with contextlib.suppress(OSError):
        os.nice(NICE)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        code = asyncio.run(run(ns.fd))
    except OSError as e:  # a bad fd
        log.error("bms_link_unusable", fd=ns.fd, error=str(e)[:200])
        code = 2
    except KeyboardInterrupt:
        code = 0
    from controller import logs

    logs._close_current()  # flush the log queue: os._exit skips atexit
    sys.stderr.flush()
    # asyncua may leave threads or tasks behind; the controller expects us gone at once
    os._exit(code)


if __name__ == "__main__":
    # run the importable module, not this `__main__` copy: bms_conditions imports
    # controller.bms_server, and both must share one connection context variable
    from controller.bms_server import main as _main

    _main()
