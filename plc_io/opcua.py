"""OPC UA client transport (asyncua) for PLCs that speak OPC UA: same contract as Modbus.

Theory of operation. Each tag maps to `tag.opcua_node` (a NodeId string: `ns=<n>;…`, or
`nsu=<uri>;…` looked up in the server's NamespaceArray at every connect, since indexes move with
PLC firmware) when set, else to the browse path `Objects/PLC/<tag>` in namespace
`site.plc.opcua.namespace`, resolved in one TranslateBrowsePaths call per connect; that namespace
is looked up only when some tag has no `opcua_node`. Outputs are written as their node's own
type: one Read of the DataType attribute of every output node per connect gives each output's
variant type (Boolean, SByte, Byte, Int16, UInt16, Int32, UInt32, Float, Double; anything else,
or a type other than the tag's `opcua_type`, leaves the tag unresolved with the reason). Integer
types are rounded half away from zero and range-checked (a value the type cannot hold is never
sent: that output fails, so the heartbeat is withheld); Float goes as the nearest float32.
Inputs arrive by subscription (`subscribe = true`) or by one polled Read per scan. asyncua's own
reconnect is off: this transport reconnects itself with `LinkMonitor`'s bounded back-off and
then writes every output again, exactly like Modbus.

Freshness with a subscription: the server only sends changes, and asyncua 2.1's server never
tells a subscriber that a node was deleted (a PLC program download): a subscription trusted
alone serves the last value as good for ever and never updates after the node returns. So each
subscribed item is proven fresh on its own: a sample's time is that of its last data-change
notification or of the last Read of its node, and every stale_after_s / 2 one Read of every
subscribed node refreshes the unchanged ones (`quality_at(now, stale_after_s)` makes any item
stale that neither proved). A node that answers BadNodeIdUnknown is bad at once; its browse path
is looked up again each period, and once it answers its monitored item is recreated. Keep-alives
still watch the link: no publish response for keep-alive period + timeout_s means the link is
dead, every input goes comms_lost and the client reconnects.

Type check: a Good value whose variant type does not match the tag (a Boolean for a float tag,
a Double NaN for a boolean tag, a String, an array) is bad_reply, on read and on subscription;
an analogue tag takes any numeric scalar variant, a boolean tag Boolean or an integer 0/1.

Sessions: one at a time, always closed. A PLC has few session slots, shared with its HMI and
SCADA, and keeps a session whose connection died until the session times out
(`session_timeout_s`). A client that fails or is abandoned (a connect that fails after
CreateSession, a dead link) is dropped at once and its session closed in the background
(CloseSession within min(timeout_s, 1 s)); no connect starts until that is over. A session
whose CloseSession did not get through (the link was dead) is taken over on a new secure channel
with ActivateSession and closed before the next CreateSession, so the PLC never holds two of
ours. Only a CreateSession whose answer never came leaves one to the session timeout.

Trust: with a security policy the PLC's certificate is judged by `plc_io.plc_trust` on the
endpoint list, before any session, and the secure channel is pinned to it.

Status codes to quality (documented in docs/plc-io.md):
  Good*                                                   → good (then the range check)
  BadNoCommunication, BadCommunicationError, BadNotConnected, BadServerNotConnected,
  BadTimeout, BadConnectionClosed, BadSecureChannelClosed, BadSessionClosed      → comms_lost
  UncertainLastUsableValue, UncertainNoCommunicationLastUsableValue,
  UncertainSubstituteValue                                → stale (an old value, honestly labelled)
  any other Uncertain or Bad                              → bad_reply
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.uaerrors import UaError

from plc_io.image import ProcessImage, Quality, Sample, kind_error
from plc_io.plc_trust import PlcTrust
from plc_io.site import Site
from plc_io.tags import FLOAT32_MAX, OPCUA_INT_RANGE, Tag, Value, opcua_type_problem
from plc_io.transport import (
    CommsHealth,
    LinkMonitor,
    OutputCache,
    PlcError,
    WriteResult,
    answer_within,
    write_in_order,
)

S = ua.StatusCodes
COMMS_CODES = frozenset(
    {
        S.BadNoCommunication,
        S.BadCommunicationError,
        S.BadNotConnected,
        S.BadServerNotConnected,
        S.BadTimeout,
        S.BadConnectionClosed,
        S.BadSecureChannelClosed,
        S.BadSessionClosed,
    }
)
LAST_USABLE_CODES = frozenset(
    {
        S.UncertainLastUsableValue,
        S.UncertainNoCommunicationLastUsableValue,
        S.UncertainSubstituteValue,
    }
)


def quality_of(status: ua.StatusCode | None) -> Quality:
    """Map an OPC UA status code to a point quality (GOOD still needs the range check)."""
    if status is None:
        return Quality.GOOD
    code = status.value & 0xFFFF0000  # the low bits are info bits (overflow, limits)
    if code & 0xC0000000 == 0:
        return Quality.GOOD
    if code in COMMS_CODES:
        return Quality.COMMS_LOST
    if code in LAST_USABLE_CODES:
        return Quality.STALE
    return Quality.BAD_REPLY


# Variant types a tag may arrive as: a boolean tag only as Boolean; an analogue tag as any
# numeric scalar (PLCs serve REAL, LREAL, INT, DINT…). Anything else is bad_reply.
NUMERIC_VARIANTS = frozenset(
    {
        ua.VariantType.Double,
        ua.VariantType.Float,
        ua.VariantType.SByte,
        ua.VariantType.Byte,
        ua.VariantType.Int16,
        ua.VariantType.UInt16,
        ua.VariantType.Int32,
        ua.VariantType.UInt32,
        ua.VariantType.Int64,
        ua.VariantType.UInt64,
    }
)
INTEGER_VARIANTS = frozenset(NUMERIC_VARIANTS - {ua.VariantType.Double, ua.VariantType.Float})
# A boolean tag: Boolean, or an integer 0/1 (a flag in a PLC word, as on the Modbus side);
# `kind_error` makes any other integer bad_reply, never True.
BOOL_VARIANTS = frozenset({ua.VariantType.Boolean} | INTEGER_VARIANTS)
# A node that is not there (deleted by a PLC program download, or never was): look it up again.
GONE_CODES = frozenset({S.BadNodeIdUnknown, S.BadNodeIdInvalid})

# The DataType NodeId (namespace 0) of a PLC variable -> the variant type its values are written
# as: the nine scalar types a PLC declares, plus the standard subtypes that encode as them
# (Duration is a Double, IntegerId and Counter are UInt32: OPC 10000-3 §8).
_DATATYPE_VARIANT: dict[int, ua.VariantType] = {
    **{
        int(vt.value): vt
        for vt in (
            ua.VariantType.Boolean,
            ua.VariantType.SByte,
            ua.VariantType.Byte,
            ua.VariantType.Int16,
            ua.VariantType.UInt16,
            ua.VariantType.Int32,
            ua.VariantType.UInt32,
            ua.VariantType.Float,
            ua.VariantType.Double,
        )
    },
    ua.ObjectIds.Duration: ua.VariantType.Double,
    ua.ObjectIds.IntegerId: ua.VariantType.UInt32,
    ua.ObjectIds.Counter: ua.VariantType.UInt32,
}


def datatype_variant(tag: Tag, dv: ua.DataValue) -> ua.VariantType | str:
    """The variant type to write `tag` as, from its node's DataType attribute (a Read's
    DataValue), checked against the tag's `opcua_type` and range; or why the tag cannot be
    written (a type no PLC scalar maps to, a mismatch naming both types, a range the type
    cannot hold)."""
    if not dv.StatusCode.is_good():
        return f"DataType not readable: {dv.StatusCode.name}"
    dt = dv.Value.Value if dv.Value is not None else None
    if not isinstance(dt, ua.NodeId):
        return f"DataType attribute is not a NodeId: {dt!r}"[:200]
    vt = _DATATYPE_VARIANT.get(dt.Identifier) if dt.NamespaceIndex == 0 else None
    if vt is None:
        return (
            f"node DataType {dt.to_string()} is not one of Boolean, SByte, Byte, Int16, UInt16, "
            "Int32, UInt32, Float, Double"
        )
    if tag.opcua_type is not None and tag.opcua_type != vt.name:
        return f"opcua_type {tag.opcua_type} but the node's DataType is {vt.name}"
    why = opcua_type_problem(tag.is_bool, tag.lo, tag.hi, vt.name)
    if why is not None:
        return f"node DataType {vt.name} does not fit the tag: expected {why}"
    return vt


def variant_error(tag: Tag, variant: ua.Variant | None) -> str | None:
    """Why this variant cannot be the tag's value (wrong variant type, array, no value)."""
    if variant is None or variant.Value is None:
        return f"{tag.name}: no value"
    allowed = BOOL_VARIANTS if tag.is_bool else NUMERIC_VARIANTS
    if variant.VariantType not in allowed or isinstance(variant.Value, list | tuple):
        kind = "array of " if isinstance(variant.Value, list | tuple) else ""
        want = (
            "Boolean (or an integer 0/1)"
            if tag.is_bool
            else "a numeric scalar (Double, Float, Int…)"
        )
        return f"{tag.name}: variant {kind}{variant.VariantType.name}, expected {want}"
    return kind_error(tag, variant.Value)


def _normalise(tag: Tag, value: Value) -> bool | float:
    """The Python value to send for a tag; refuses what must never reach the PLC."""
    if (why := kind_error(tag, value)) is not None:
        raise ValueError(why)  # never bool(nan) = True, nor float(True) = 1.0
    if tag.is_bool:
        return bool(value)
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{tag.name}: value {value!r} is not a finite number")
    return v


def typed_value(tag: Tag, vt: ua.VariantType, value: bool | float) -> bool | int | float:
    """A normalised output value as the node's variant type holds it. Integer types round half
    away from zero (a fractional resolution is lost); a value the type cannot hold raises
    ValueError ("out of range for UInt16: …") and is never sent."""
    name = vt.name
    if vt is ua.VariantType.Boolean:
        if not tag.is_bool:  # refused at connect already (datatype_variant); never 1.0 -> True
            raise ValueError(f"an analogue value {value!r} for a Boolean node")
        return bool(value)
    if tag.is_bool:
        if vt in INTEGER_VARIANTS:
            return int(bool(value))  # a flag in a PLC word: 0 or 1
        raise ValueError(f"a boolean for a {name} node")
    v = float(value)
    if vt is ua.VariantType.Double:
        return v
    if vt is ua.VariantType.Float:
        if not abs(v) <= FLOAT32_MAX:
            raise ValueError(f"out of range for Float: {v!r} beyond ±{FLOAT32_MAX:.7g}")
        # what the PLC will hold: the nearest float32 (about 7 significant digits)
        return float(struct.unpack("<f", struct.pack("<f", v))[0])
    lo, hi = OPCUA_INT_RANGE[name]
    n = int(math.copysign(math.floor(abs(v) + 0.5), v))
    if not lo <= n <= hi:
        raise ValueError(f"out of range for {name}: {v:g} is outside {lo}…{hi}, not sent")
    return n


@dataclass(frozen=True)
class _Orphan:
    """A session of ours the PLC may still hold: its CloseSession did not get through."""

    token: ua.NodeId
    nonce: bytes | None
    policy_ids: Any  # the endpoint's user token policies, needed to activate it again


def _site_path(site: Site, path: str) -> Path:
    """A path from the site file, relative to the site file's folder."""
    p = Path(path)
    return p if p.is_absolute() else site.folder / p


# A session the PLC has already freed: nothing left to close.
SESSION_GONE_CODES = frozenset({S.BadSessionIdInvalid, S.BadSessionClosed})


class _Handler:
    """Subscription callbacks: remember each node's last DataValue and when it came."""

    def __init__(self, owner: OpcuaTransport) -> None:
        self.owner = owner

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.owner._arrived(node.nodeid, data.monitored_item.Value)


class OpcuaTransport:
    """The `Transport` over OPC UA. `endpoint` defaults to site.plc.opcua.endpoint."""

    def __init__(
        self,
        site: Site,
        *,
        endpoint: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
    ) -> None:
        self.site = site
        self.cfg = cfg = site.plc.opcua
        self.endpoint = endpoint or cfg.endpoint
        self.timeout_s = site.plc.timeout_s
        self._clock = clock
        self._log = log if log is not None else structlog.get_logger("plc_io.opcua")
        self.link = LinkMonitor("opcua", site.plc.reconnect_max_s, log=self._log)
        self._password: str | None = None
        if cfg.password_env:
            # bad configuration fails at start-up, not as a comms fault at 3 a.m.
            if cfg.password_env not in os.environ:
                raise ValueError(
                    f"plc.opcua.password_env: environment variable {cfg.password_env!r} is not set"
                )
            self._password = os.environ[cfg.password_env]
        self._inputs = site.inputs
        self._outputs = {t.name: t for t in site.outputs}
        self._out = OutputCache(site.site.name, site.outputs, _normalise)
        self._client: Client | None = None
        # One session at a time (see "Sessions" in the module docstring): the close of an
        # abandoned client runs in the background and no connect starts until it is over;
        # a session whose CloseSession did not get through is taken over and closed first.
        self._closing: asyncio.Task[None] | None = None
        self._orphan: _Orphan | None = None
        self._close_s = min(self.timeout_s, 1.0)
        self._trust: PlcTrust | None = None
        if cfg.security != "None":
            pin = cfg.server_certificate
            self._trust = PlcTrust(
                site.state_dir,
                pinned=None if pin is None else _site_path(site, pin),
                trust_on_first_use=cfg.trust_on_first_use,
                log=self._log,
            )
        self._sub: Any = None
        self._nodes: dict[str, ua.NodeId] = {}  # tag -> node, for the tags that resolved
        self._by_node: dict[ua.NodeId, str] = {}
        self._ns: int | None = None  # index of [plc.opcua] namespace, when a tag needs it
        self._unresolved: dict[str, str] = {}  # tag -> why it has no node
        # outputs: the variant type each is written as (its node's DataType, read at connect)
        self._vtypes: dict[str, ua.VariantType] = {}
        # tags with a node but no usable type yet (DataType unreadable, mismatched): retried
        # with the look-ups of `_reresolve`; each is also in `_unresolved` with the reason
        self._typing: dict[str, ua.NodeId] = {}
        self._no_uri: set[str] = set()  # nsu= tags whose URI the server did not list
        # outputs the PLC refused as mistyped: that type is not taken again until it changes
        # (a PLC program download) or the link reconnects
        self._refused_vt: dict[str, ua.VariantType] = {}
        self._latest: dict[str, tuple[ua.DataValue, float]] = {}  # subscription: dv, arrival
        self._image = ProcessImage()
        self._subscribed_at = 0.0
        # Subscription verification (see the module docstring): a Read of every subscribed
        # item at least every stale_after_s / 2; nodes that went away are looked up again and
        # their monitored items recreated once they answer.
        self._verify_every_s = site.plc.stale_after_s / 2
        self._verified_at = -math.inf
        self._handles: dict[str, int] = {}  # input tag -> monitored item handle
        self._gone: set[str] = set()  # tags whose node answered "unknown" or has no item
        self._polled_bad: set[str] = set()  # bad status codes of the last polled read
        self._logged_codes: set[str] = set()  # the ones logged, until they clear
        # keep-alive: at least every timeout_s/2, so a dead link shows within one timeout
        pi_s = cfg.publish_interval_ms / 1000
        self._keepalive_count = max(1, int(self.timeout_s / 2 / pi_s))
        self._dead_after_s = self._keepalive_count * pi_s + self.timeout_s

    # ---- Transport interface ----

    @property
    def health(self) -> CommsHealth:
        return self.link.health

    async def connect(self) -> None:
        await self._ensure_connected(self._clock())

    async def close(self) -> None:
        """Close the session and the link. Bounded: a PLC that does not answer keeps our
        session until `session_timeout_s`, after one attempt to take it over and close it."""
        self._abandon()
        task, self._closing = self._closing, None
        if task is not None:
            await task  # bounded by _close_s
        if self._orphan is not None:
            try:
                async with asyncio.timeout(2 * self.timeout_s):
                    await self._reclaim(self._orphan)
            except Exception as e:  # best effort: the PLC frees it at its session timeout
                self._log.warning("plc_session_left_open", error=f"{type(e).__name__} {e}"[:200])

    async def read_inputs(self) -> ProcessImage:
        now = self._clock()
        names = [t.name for t in self._inputs]
        if not await self._ensure_connected(now):
            self._image = self._image.marked(names, Quality.COMMS_LOST, None)
        elif self.cfg.subscribe:
            if now - self._verified_at >= self._verify_every_s:
                await self._verify_subscription()
            if self._client is None:  # the verification found the link dead
                self._image = self._image.marked(names, Quality.COMMS_LOST, None)
            else:
                self._image = self._from_subscription(now)
        else:
            if (self._gone or self._unresolved) and now - self._verified_at >= self._verify_every_s:
                self._verified_at = now
                await self._reresolve()
            self._image = await self._poll(self._inputs, self._image)
        self._log_statuses()
        return self._image

    def _log_statuses(self) -> None:
        """One log line per bad status code the PLC reports while it lasts, not one per scan
        (comms statuses are the link's business and logged there)."""
        codes = (
            {
                dv.StatusCode.name
                for dv, _ in self._latest.values()
                if quality_of(dv.StatusCode) is Quality.BAD_REPLY
            }
            if self.cfg.subscribe
            else self._polled_bad
        )
        for code in self._logged_codes - codes:
            self.link.cause(f"status {code}", None)
        for code in codes:
            self.link.cause(f"status {code}", code)
        self._logged_codes = set(codes)

    def resend_all(self) -> None:
        """Send every output on the next pass, changed or not (e.g. to release the watchdog)."""
        self._out.reconnected()

    def hold_heartbeat(self, on: bool) -> None:
        """Write the heartbeat unchanged while on (a watchdog proof test)."""
        self._out.hold = on

    async def read_outputs(self) -> ProcessImage:
        tags = list(self._outputs.values())
        if not await self._ensure_connected(self._clock()):
            return ProcessImage().marked([t.name for t in tags], Quality.COMMS_LOST, None)
        return await self._poll(tags, ProcessImage())

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        return await write_in_order(
            self._out, values, self._connected, self._link_reason, self._send
        )

    async def _connected(self) -> bool:
        return await self._ensure_connected(self._clock())

    def _link_reason(self) -> str:
        return f"comms: link {self.link.state.value} ({self.link.last_error})"

    async def _send(self, tags: list[Tag], failed: dict[str, str]) -> list[str]:
        """Write these outputs in one Write request, then verify; see `write_in_order`, which
        calls this for the commands and then for the heartbeat alone."""
        out = self._out
        send: list[Tag] = []
        dvs: list[ua.DataValue] = []
        for t in tags:
            if t.name not in self._nodes:
                failed[t.name] = f"bad_reply: {self._unresolved.get(t.name, 'no node')}"
                out.unsent([t.name])
                continue
            # written as the node's own type: a PLC answers BadTypeMismatch to anything else
            vt = self._vtypes[t.name]
            try:
                value = typed_value(t, vt, out.desired[t.name])
            except ValueError as e:  # a value the PLC variable cannot hold is never sent
                failed[t.name] = str(e)
                out.unsent([t.name])
                self.link.cause(f"write {t.name}", str(e))
                continue
            send.append(t)
            dvs.append(ua.DataValue(ua.Variant(value, vt)))
        if not send:
            return []
        try:
            results = await self._call(
                self._client_or_raise().uaclient.write_attributes(
                    [self._nodes[t.name] for t in send], dvs, ua.AttributeIds.Value
                )
            )
        except PlcError as e:
            out.unsent(t.name for t in send)
            failed.update({t.name: f"{e.kind}: {e}" for t in send})
            return []
        if len(results) != len(send):  # a garbled answer: nothing is known to have landed
            out.unsent(t.name for t in send)
            msg = f"bad_reply: {len(results)} results for {len(send)} writes"
            self.link.error_reply(msg)
            failed.update(dict.fromkeys((t.name for t in send), msg))
            return []
        written: list[str] = []
        for t, st in zip(send, results, strict=True):
            if st.is_good():
                out.sent([t.name])
                written.append(t.name)
                self.link.cause(f"write {t.name}", None)
            else:
                out.unsent([t.name])
                failed[t.name] = f"exception: {st.name}"
                self.link.cause(f"write {t.name}", st.name)
                if st.value & 0xFFFF0000 in GONE_CODES:
                    self._gone.add(t.name)
                elif st.value & 0xFFFF0000 == S.BadTypeMismatch:
                    # the variable's type changed (a PLC program download): read it again
                    self._retype(t.name, f"write as {self._vtypes[t.name].name}: {st.name}")
        verify = [self._outputs[n] for n in written if self._outputs[n].verify]
        if verify:
            await self._verify(verify, failed)
        return written

    async def _verify(self, tags: list[Tag], failed: dict[str, str]) -> None:
        """Read back tags marked `verify`; fail, and resend next pass, what the PLC lacks."""
        try:
            dvs = await self._call(
                self._client_or_raise().uaclient.read_attributes(
                    [self._nodes[t.name] for t in tags], ua.AttributeIds.Value
                )
            )
        except PlcError as e:
            failed.update({t.name: f"verify: {e.kind}: {e}" for t in tags})
            self._out.unsent(t.name for t in tags)
            return
        for i, t in enumerate(tags):
            dv = dvs[i] if i < len(dvs) else None
            got = dv.Value.Value if dv is not None and dv.Value is not None else None
            vt = self._vtypes[t.name]
            ok = (
                dv is not None
                and quality_of(dv.StatusCode) is Quality.GOOD
                and dv.Value.VariantType == vt
                and not isinstance(got, list | tuple)
                and got == typed_value(t, vt, self._out.desired[t.name])  # what was sent
            )
            if not ok:
                failed[t.name] = f"verify: PLC holds {got!r}"[:200]
                self._out.unsent([t.name])

    # ---- connection ----

    def _client_or_raise(self) -> Client:
        if self._client is None:
            raise PlcError("comms", "not connected")
        return self._client

    async def _ensure_connected(self, now: float) -> bool:
        c = self._client
        if c is not None and c.uaclient.state is UaClientState.CONNECTED:
            return True
        if c is not None:
            self._abandon()
            self.link.lost(now, "comms: connection lost")
        if self._closing is not None:
            if not self._closing.done():
                return False  # the last session is still being closed: never two at once
            self._closing = None
        if not self.link.may_attempt(now):
            return False
        client = self._new_client()
        try:
            async with asyncio.timeout(max(4 * self.timeout_s, 2.0)):
                if self._orphan is not None:
                    await self._reclaim(self._orphan)
                await self._configure(client)  # checks the PLC's certificate, before a session
                await client.connect(auto_reconnect=False)
                self._client = client
                await self._resolve(client)
                if self.cfg.subscribe:
                    await self._subscribe(client)
        except Exception as e:  # any failure to connect is a comms fault, retried with back-off
            self._client = client
            self._abandon()  # closes the session it may have created (in the background)
            self.link.lost(self._clock(), f"comms: connect failed: {type(e).__name__} {e}")
            return False
        self.link.ok(self._clock())
        self._out.reconnected()  # the PLC may have lost our outputs: write them all again
        return True

    def _new_client(self) -> Client:
        client = Client(self.endpoint, timeout=self.timeout_s, watchdog_intervall=1.0)
        # what the PLC waits before freeing a session we could not close (a dead link)
        client.session_timeout = self.cfg.session_timeout_s * 1000
        return client

    async def _configure(self, client: Client) -> None:
        cfg = self.cfg
        if cfg.security != "None":
            policy_name, mode_name = cfg.security.split("_", 1)
            policy = getattr(security_policies, f"SecurityPolicy{policy_name}")
            mode = getattr(ua.MessageSecurityMode, mode_name)
            folder = self.site.state_dir / "opcua_client"
            folder.mkdir(parents=True, exist_ok=True)
            key, cert = Path(folder, "key.pem"), Path(folder, "cert.der")
            client.application_uri = "urn:heatloop:controller"
            await client.setup_self_signed_certificate(key, cert)
            # asyncua takes whatever certificate the endpoint lists: judge it first, on a
            # channel without a session. The secure channel is then encrypted to exactly this
            # certificate and CreateSession must present the same one, so a man in the middle
            # with another certificate gets no further than GetEndpoints.
            endpoints = await client.connect_and_get_server_endpoints()
            ep = Client.find_endpoint(endpoints, mode, policy.URI)
            der = uacrypto.der_from_x509(uacrypto.x509_from_der(ep.ServerCertificate))
            assert self._trust is not None  # made in __init__ whenever security is set
            self._trust.check(der)
            await client.set_security(policy, cert, key, server_certificate=der, mode=mode)
        if cfg.username:
            client.set_user(cfg.username)
            if self._password is not None:
                client.set_password(self._password)

    def _abandon(self) -> None:
        """Drop the client now, without waiting on a link that may be dead: the transport
        holds no client from here on, and its session is closed in the background
        (`_close_session`); no connect starts before that is over."""
        c, self._client, self._sub = self._client, None, None
        self._latest.clear()
        if c is None:
            return
        c.uaclient.request_disconnect()
        # asyncua 2.1 internals (pinned): left running, the publish loop retries every second
        # forever and the supervisor probes a dead server
        tasks = (
            c._supervisor_task,
            c._stale_watchdog_task,
            c._renew_channel_task,
            c.uaclient.session._publish_task,
        )
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
        self._closing = asyncio.get_running_loop().create_task(self._close_session(c))

    async def _close_session(self, c: Client) -> None:
        """CloseSession within `_close_s`, then the socket. A session the PLC did not hear
        closed is remembered as `_orphan`: the next connect takes it over and closes it."""
        session = c.uaclient.session
        token, nonce, ids = session.authentication_token, c._server_nonce, c._policy_ids
        left = session.has_session
        try:
            protocol = c.uaclient.protocol
            if left and protocol is not None and not protocol.is_closed:
                c.uaclient.pre_request_hook = None  # never wait on asyncua's reconnect gate
                async with asyncio.timeout(self._close_s):
                    await c.uaclient.close_session(True)
                left = False
        except UaError as e:
            left = getattr(e, "code", None) not in SESSION_GONE_CODES
        except Exception:  # timeout or a dead socket: taken over at the next connect
            pass
        finally:
            c.disconnect_socket()
        if left:
            self._orphan = _Orphan(token, nonce, ids)

    async def _reclaim(self, orphan: _Orphan) -> None:
        """Take over a session of ours that the PLC may still hold and close it, before any new
        CreateSession (OPC UA Part 4 §6.7: ActivateSession moves a session to a new secure
        channel). A PLC that has already freed it says so, which is as good."""
        probe = self._new_client()
        await self._configure(probe)
        await probe.connect_socket()
        try:
            await probe.send_hello()
            await probe.open_secure_channel()
            probe.uaclient.session.restore_authentication_token(orphan.token)
            probe._server_nonce = orphan.nonce
            probe._policy_ids = orphan.policy_ids
            try:
                await probe.activate_session(username=self.cfg.username, password=self._password)
                await probe.uaclient.close_session(True)
            except UaError as e:
                if getattr(e, "code", None) not in SESSION_GONE_CODES:
                    raise
            self._orphan = None
            self._log.info("plc_session_reclaimed", session=orphan.token.to_string())
        finally:
            probe.disconnect_socket()

    async def _resolve(self, client: Client) -> None:
        """Find every tag's node and every output's type (at each connect: a PLC firmware or
        program download may move namespace indexes, node ids and types). The namespace
        array is read once; `[plc.opcua] namespace` is needed only by tags without
        `opcua_node`, so a PLC that lacks it serves every tag that has its own node."""
        self._nodes.clear()
        self._unresolved.clear()
        self._gone.clear()
        self._vtypes.clear()
        self._typing.clear()
        self._no_uri.clear()
        self._refused_vt.clear()
        uris = list(await client.get_namespace_array())
        by_path = [t for t in self.site.tags if not t.opcua_node]
        self._ns = self._namespace_index(uris) if by_path else None
        found: dict[str, ua.NodeId | str] = {}
        for t in self.site.tags:
            if t.opcua_node:
                found[t.name] = self._parse_node(t, uris)
        if by_path and self._ns is None:
            why = self._no_namespace(uris)
            found.update(dict.fromkeys((t.name for t in by_path), why))
        elif by_path:
            found.update(await self._translate(client, by_path))
        await self._adopt(client, found, call=False)
        for name, why in self._unresolved.items():
            self.link.cause(f"node {name}", why)
        self._by_node = {n: k for k, n in self._nodes.items()}

    def _namespace_index(self, uris: Sequence[str]) -> int | None:
        try:
            return list(uris).index(self.cfg.namespace)
        except ValueError:
            return None

    def _no_namespace(self, uris: Sequence[str]) -> str:
        shown = ", ".join(repr(u) for u in uris)[:300]
        return (
            f"no opcua_node, and plc.opcua.namespace {self.cfg.namespace!r} is not in the "
            f"PLC's NamespaceArray ({shown})"
        )

    def _parse_node(self, tag: Tag, uris: Sequence[str]) -> ua.NodeId | str:
        """The tag's `opcua_node` as a NodeId, an `nsu=` URI looked up in `uris` (indexes may
        move with PLC firmware; the URI does not); or why there is none."""
        text = tag.opcua_node or ""
        try:
            node = ua.NodeId.from_string(text)
        except (ValueError, UaError) as e:
            return f"bad opcua_node {text!r}: {e}"
        uri = getattr(node, "NamespaceUri", None)
        if isinstance(node, ua.ExpandedNodeId) and getattr(node, "ServerIndex", None):
            return f"opcua_node {text!r}: a node on another server (srv=) is not supported"
        if uri is None:
            return ua.NodeId(node.Identifier, node.NamespaceIndex, node.NodeIdType)
        if uri not in uris:
            self._no_uri.add(tag.name)
            shown = ", ".join(repr(u) for u in uris)[:300]
            return f"{text!r}: namespace {uri!r} is not in the PLC's NamespaceArray ({shown})"
        self._no_uri.discard(tag.name)
        return ua.NodeId(node.Identifier, list(uris).index(uri), node.NodeIdType)

    def _needs_type(self, name: str) -> bool:
        """Outputs are written as their node's type; an input with `opcua_type` is checked."""
        return name in self._outputs or self.site.tag(name).opcua_type is not None

    async def _adopt(
        self, client: Client, found: Mapping[str, ua.NodeId | str], *, call: bool = True
    ) -> list[str]:
        """Take looked-up nodes: those that need a type get it from one Read of their DataType
        attribute (`datatype_variant`); a node without a usable type, or a tag without a
        node, is unresolved with the reason. Returns the tags that now have a node."""
        typed = [
            n for n, got in found.items() if isinstance(got, ua.NodeId) and self._needs_type(n)
        ]
        types: dict[str, ua.VariantType | str] = {}
        if typed:
            request = client.uaclient.read_attributes(
                [found[n] for n in typed], ua.AttributeIds.DataType
            )
            dvs = await (self._call(request) if call else request)
            if len(dvs) != len(typed):
                raise PlcError("exception", f"{len(dvs)} DataType results for {len(typed)} nodes")
            for name, dv in zip(typed, dvs, strict=True):
                vt = datatype_variant(self.site.tag(name), dv)
                if isinstance(vt, ua.VariantType) and self._refused_vt.get(name) == vt:
                    # a steady reason, not a resolve-and-refuse cycle every period
                    vt = f"node DataType {vt.name}, but the PLC refused a write as {vt.name}"
                types[name] = vt
        adopted: list[str] = []
        for name, got in found.items():
            vt = types.get(name)
            if isinstance(got, ua.NodeId) and isinstance(vt, str):
                self._typing[name] = got  # the node is there; its type is read again later
                got = f"{self.site.tag(name).opcua_node or 'Objects/PLC/' + name}: {vt}"
            if isinstance(got, str):
                self._nodes.pop(name, None)
                self._vtypes.pop(name, None)
                self._unresolved[name] = got
                continue
            self._typing.pop(name, None)
            self._refused_vt.pop(name, None)
            self._nodes[name] = got
            if isinstance(vt, ua.VariantType) and name in self._outputs:
                self._vtypes[name] = vt
            self._unresolved.pop(name, None)
            adopted.append(name)
        return adopted

    def _retype(self, name: str, why: str) -> None:
        """An output the PLC refused as mistyped: unresolved until its DataType reads as
        another type (or the next connect)."""
        node = self._nodes.pop(name, None)
        vt = self._vtypes.pop(name, None)
        if vt is not None:
            self._refused_vt[name] = vt
        if node is not None:
            self._typing[name] = node
        self._unresolved[name] = f"{why}; DataType to be read again"
        self.link.cause(f"node {name}", self._unresolved[name])

    async def _translate(self, client: Client, tags: Sequence[Tag]) -> dict[str, ua.NodeId | str]:
        """Browse-path results by tag name: the node, or why there is none."""
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder, 0)
        paths = [f"/{self._ns}:PLC/{self._ns}:{t.name}" for t in tags]
        results = await client.translate_browsepaths(objects, paths)
        out: dict[str, ua.NodeId | str] = {}
        for name, r in zip((t.name for t in tags), results, strict=True):
            if r.StatusCode.is_good() and r.Targets:
                target = r.Targets[0].TargetId
                out[name] = ua.NodeId(target.Identifier, target.NamespaceIndex)
            else:
                out[name] = f"Objects/PLC/{name}: {r.StatusCode.name}"
        return out

    async def _reresolve(self) -> None:
        """Look up again what is missing: browse paths of tags whose node went away or never
        resolved (a PLC program download may delete nodes and create them under new ids),
        `nsu=` URIs and the namespace the PLC did not list, and the DataType of nodes whose
        type was unreadable or refused. Inputs that resolve join `_gone`, so their monitored
        item is (re)created once they answer."""
        by_path = [
            t
            for t in self.site.tags
            if not t.opcua_node and (t.name in self._gone or t.name in self._unresolved)
        ]
        if not (by_path or self._typing or self._no_uri):
            return
        client = self._client_or_raise()
        found: dict[str, ua.NodeId | str] = dict(self._typing)
        try:
            if self._no_uri or (by_path and self._ns is None):
                uris = await self._call(client.get_namespace_array())
                for name in list(self._no_uri):
                    found[name] = self._parse_node(self.site.tag(name), uris)
                if self._ns is None:
                    self._ns = self._namespace_index(uris)
            if by_path and self._ns is not None:
                found.update(await self._call(self._translate(client, by_path)))
            old = dict(self._nodes)
            was_unresolved = set(self._unresolved)
            adopted = await self._adopt(client, found)
        except PlcError:
            return  # comms drops the link; a refused lookup is retried next period
        for name in found:
            why = self._unresolved.get(name)
            self.link.cause(f"node {name}", why)
        for name in adopted:
            got = self._nodes[name]
            if name in was_unresolved:
                self._gone.add(name)
            if old.get(name) is not None and old[name] != got:
                self._by_node.pop(old[name], None)
            self._by_node[got] = name
            if name in self._outputs:
                self._gone.discard(name)  # written by node id: nothing to recreate

    async def _subscribe(self, client: Client) -> None:
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = self.cfg.publish_interval_ms
        params.RequestedMaxKeepAliveCount = self._keepalive_count
        params.RequestedLifetimeCount = max(3 * self._keepalive_count, 300)
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        self._latest.clear()
        self._handles.clear()
        sub = await client.create_subscription(params, _Handler(self))
        self._sub = sub
        await self._monitor([t for t in self._inputs if t.name in self._nodes])
        self._subscribed_at = time.monotonic()
        # Seed with one read so the first scan after a connect is not empty.
        await self._seed([t for t in self._inputs if t.name in self._nodes])
        self._verified_at = self._clock()

    async def _monitor(self, tags: Sequence[Tag]) -> None:
        """Create monitored items for these tags (a refused one joins `_gone`: retried once
        its node answers a read)."""
        client = self._client_or_raise()
        if not tags or self._sub is None:
            return
        nodes = [client.get_node(self._nodes[t.name]) for t in tags]
        handles = await self._sub.subscribe_data_change(
            nodes, sampling_interval=self.cfg.publish_interval_ms
        )
        for t, h in zip(tags, handles, strict=True):
            if isinstance(h, ua.StatusCode):
                self._gone.add(t.name)
                self.link.cause(f"node {t.name}", f"monitored item refused: {h.name}")
            else:
                self._handles[t.name] = h
                self._gone.discard(t.name)
                self.link.cause(f"node {t.name}", None)

    async def _verify_subscription(self) -> None:
        """Prove every subscribed item fresh with one Read (asyncua 2.1's server never tells a
        subscriber that a node was deleted: trusted alone, a subscription serves the last value
        as good for ever). A good read of an item's node refreshes its sample; a bad one
        replaces it; an item whose node went away is recreated once the node answers again."""
        self._verified_at = self._clock()
        if self._gone or self._unresolved:
            await self._reresolve()
            if self._client is None:
                return
        tags = [t for t in self._inputs if t.name in self._nodes]
        if not tags:
            return
        sent_at = self._clock()
        try:
            dvs = await self._call(
                self._client_or_raise().uaclient.read_attributes(
                    [self._nodes[t.name] for t in tags], ua.AttributeIds.Value
                )
            )
        except PlcError:
            return  # comms drops the link; unverified items go stale by their own age
        if len(dvs) != len(tags):
            self.link.error_reply(f"read returned {len(dvs)} results for {len(tags)} nodes")
            return
        at = self._clock()
        back: list[Tag] = []
        for t, dv in zip(tags, dvs, strict=True):
            code = dv.StatusCode.value & 0xFFFF0000 if dv.StatusCode is not None else 0
            if code in GONE_CODES:
                self._gone.add(t.name)
            elif t.name in self._gone and quality_of(dv.StatusCode) is not Quality.COMMS_LOST:
                back.append(t)
            latest = self._latest.get(t.name)
            if latest is None or latest[1] <= sent_at:  # never over a newer notification
                self._latest[t.name] = (dv, at)
        if back:
            await self._remonitor(back)

    async def _remonitor(self, tags: list[Tag]) -> None:
        """Replace the monitored items of nodes that came back."""
        assert self._sub is not None
        old = [self._handles.pop(t.name) for t in tags if t.name in self._handles]
        if old:
            try:
                await self._call(self._sub.unsubscribe(old))
            except PlcError as e:
                if e.kind == "comms":
                    return
                # the server may already have dropped items of deleted nodes: nothing to free
        try:
            await self._call(self._monitor(tags))
        except PlcError:
            return  # comms drops the link; otherwise retried at the next verification

    # ---- reading ----

    def _arrived(self, nodeid: ua.NodeId, dv: ua.DataValue) -> None:
        name = self._by_node.get(nodeid)
        # An item whose node is known gone takes nothing until it is monitored anew: a
        # notification still in flight from before the node vanished (a loaded server or
        # network delays a publish by seconds) would otherwise make its last value fresh.
        if name is not None and name not in self._gone and name not in self._unresolved:
            self._latest[name] = (dv, self._clock())
            code = dv.StatusCode.value & 0xFFFF0000 if dv.StatusCode is not None else 0
            if code in GONE_CODES:  # the item reports an error: recreate it when the node is back
                self._gone.add(name)

    async def _seed(self, tags: Sequence[Tag]) -> None:
        c = self._client_or_raise()
        dvs = await c.uaclient.read_attributes(
            [self._nodes[t.name] for t in tags], ua.AttributeIds.Value
        )
        at = self._clock()
        for t, dv in zip(tags, dvs, strict=True):
            self._latest.setdefault(t.name, (dv, at))

    def _sample(self, tag: Tag, dv: ua.DataValue, at: float, prev: Sample) -> Sample:
        """One DataValue (read or notified) as a sample: the status code, then the variant
        type against the tag's type, then the kind and the range (`judge`)."""
        q = quality_of(dv.StatusCode)
        why = variant_error(tag, dv.Value)
        if q is Quality.GOOD:
            if why is None:
                return self.link.judged(tag, dv.Value.Value, at)
            # a Boolean for a float tag is not 0.0 °C, a Double NaN for a boolean not True
            self.link.cause(f"value {tag.name}", f"bad_reply: {why}")
            return Sample(prev.value, Quality.BAD_REPLY, prev.at_s)
        keep = prev.value
        if why is None:
            v = dv.Value.Value
            keep = bool(v) if tag.is_bool else float(v)
        return Sample(keep, q, at if q is Quality.STALE else prev.at_s)

    def _from_subscription(self, now: float) -> ProcessImage:
        sub = self._sub
        mono = time.monotonic()
        last = (sub.last_publish_at or self._subscribed_at) if sub is not None else None
        if sub is None or last is None or mono - last > self._dead_after_s:
            self._abandon()
            self.link.lost(now, f"comms: no publish response for {self._dead_after_s:.2f} s")
            names = [t.name for t in self._inputs]
            return self._image.marked(names, Quality.COMMS_LOST, None)
        samples: dict[str, Sample] = {}
        for t in self._inputs:
            prev = self._image[t.name]
            got = self._latest.get(t.name)
            if got is None:
                why = self._unresolved.get(t.name)
                samples[t.name] = Sample(
                    prev.value, Quality.BAD_REPLY if why else Quality.COMMS_LOST, prev.at_s
                )
                continue
            # fresh as of its last notification or verifying read, never of a keep-alive alone
            dv, arrived = got
            samples[t.name] = self._sample(t, dv, arrived, prev)
        return ProcessImage(samples)

    async def _poll(self, tags: Sequence[Tag], prev: ProcessImage) -> ProcessImage:
        known = [t for t in tags if t.name in self._nodes]
        samples: dict[str, Sample] = {
            t.name: Sample(prev[t.name].value, Quality.BAD_REPLY, prev[t.name].at_s)
            for t in tags
            if t.name not in self._nodes
        }
        try:
            dvs = await self._call(
                self._client_or_raise().uaclient.read_attributes(
                    [self._nodes[t.name] for t in known], ua.AttributeIds.Value
                )
            )
        except PlcError as e:
            q = Quality.COMMS_LOST if e.kind == "comms" else Quality.BAD_REPLY
            return prev.updated(samples).marked([t.name for t in known], q, None)
        if len(dvs) != len(known):
            self.link.error_reply(f"read returned {len(dvs)} results for {len(known)} nodes")
            return prev.updated(samples).marked([t.name for t in known], Quality.BAD_REPLY, None)
        at = self._clock()
        self._polled_bad = {
            dv.StatusCode.name for dv in dvs if quality_of(dv.StatusCode) is Quality.BAD_REPLY
        }
        for t, dv in zip(known, dvs, strict=True):
            if dv.StatusCode is not None and dv.StatusCode.value & 0xFFFF0000 in GONE_CODES:
                self._gone.add(t.name)  # looked up again by browse path (read_inputs)
            else:
                self._gone.discard(t.name)
            samples[t.name] = self._sample(t, dv, at, prev[t.name])
        return prev.updated(samples)

    async def _call(self, request: Any) -> Any:
        """One service call within the timeout; failures become PlcError (comms drops the link)."""
        self.link.requests += 1
        try:
            result = await answer_within(
                self.timeout_s, request, self._comms_failed, (OSError, ConnectionError)
            )
        except UaError as e:
            if getattr(e, "code", None) in COMMS_CODES:
                self._comms_failed(str(e))
            # a service-level Bad status: the link answered
            self.link.ok(self._clock())
            self.link.error_reply(str(e))
            raise PlcError("exception", str(e)) from e
        self.link.ok(self._clock())
        return result

    def _comms_failed(self, msg: str) -> NoReturn:
        self._abandon()
        self.link.lost(self._clock(), f"comms: {msg}")
        raise PlcError("comms", msg)
