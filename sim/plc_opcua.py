"""The simulated PLC's OPC UA face: the tag table as `Objects/PLC/<tag>`, and the `Sim` test
instrument (fault methods, true plant values). Security None, bound where told (127.0.0.1): it is
a test instrument, never a production endpoint.

Node ids are strings in namespace `urn:heatloop:plc`: `PLC.<tag>`, `Sim`, `Sim.InjectFault`,
`Sim.ClearFault`, `Sim.ClearAllFaults`, `Sim.Plant`, `Sim.Plant.<name>`. A tag that sets
`opcua_node` is served at that id instead (an `nsu=` URI becomes a namespace of the server), and
one that sets `opcua_type` as a variable of that type (else Double, or Boolean for a bool tag):
a typed PLC layout, which takes a write only of the variable's own variant type, as a real
server does (a Double for a Float variable is BadTypeMismatch).

Client writes are intercepted per item in front of asyncua's attribute write service (an internal
API of asyncua 2.1; pinned, and tests/hil exercises it), so each item gets its own status: an
output write lands in the PLC's command image (BadOutOfRange outside the tag's range,
BadTypeMismatch for a wrong variant type, BadNoCommunication during `comms_drop`); every other
node of ours is BadNotWritable. The variables of the outputs show what the plant gets now (the
safe values while the watchdog holds), not what was last written.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole

from plc_io.tags import Tag, Value
from sim.plc_faults import CommsFaults

log = structlog.get_logger("sim.plc")

NAMESPACE = "urn:heatloop:plc"
_ADMIN = User(role=UserRole.Admin)  # asyncua's own default user for the write service
PLANT_WATCHDOG = {
    "watchdog_tripped": ua.VariantType.Boolean,
    "watchdog_trips": ua.VariantType.UInt32,
    "sim_time_s": ua.VariantType.Double,
}
_NUMERIC = frozenset(
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


class OpcuaHost(Protocol):
    """What the OPC UA face needs of the PLC."""

    faults: CommsFaults

    def now(self) -> float: ...

    def apply_writes(self, values: dict[str, Value], source: str) -> None: ...

    def outputs(self) -> dict[str, Value]: ...

    def opcua_fault_status(self) -> int | None: ...

    def inject(self, name: str, target: str = "", value: float = 1.0) -> None: ...

    def clear(self, name: str, target: str = "") -> None: ...

    def clear_all(self) -> None: ...


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(code)


def _arg(name: str, vtype: ua.VariantType, text: str) -> ua.Argument:
    return ua.Argument(
        Name=name,
        DataType=ua.NodeId(vtype.value),
        ValueRank=-1,
        ArrayDimensions=[],
        Description=ua.LocalizedText(text),
    )


class PlcOpcua:
    """Owns the asyncua server; `port` is the port actually bound after `start`."""

    def __init__(
        self,
        host: OpcuaHost,
        tags: tuple[Tag, ...],
        plant_names: list[str],
        bind_host: str,
        port: int,
        namespace: str = NAMESPACE,
    ) -> None:
        self.host = host
        self.namespace = namespace
        self.tags = tags
        self.plant_names = plant_names
        self.bind_host = bind_host
        self.port = port
        self.server: Server | None = None
        self.ns = 0
        self._plc_nodes: dict[str, ua.NodeId] = {}
        self._plc_vt: dict[str, ua.VariantType] = {}
        self._tag_nodes: dict[str, ua.NodeId] = {}  # tags served at their own `opcua_node`
        self._plant_nodes: dict[str, tuple[ua.NodeId, ua.VariantType]] = {}
        self._outputs: dict[ua.NodeId, Tag] = {}
        self._read_only: set[ua.NodeId] = set()
        self._last: dict[ua.NodeId, Any] = {}
        self._bad: int | None = None  # the status every PLC variable shows during a fault
        self._plc_folder: Any = None
        host.faults.tag_names = frozenset(t.name for t in tags)  # `wrong_type` targets
        self._deleted = False  # the `nodes_deleted` fault holds: no Objects/PLC/<tag> nodes

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.bind_host}:{self.port}/"

    async def start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("heatloop simulated PLC")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.allow_remote_admin(False)
        ns = await server.register_namespace(self.namespace)
        self.ns = ns
        self._tag_nodes = {
            t.name: await self._node_id(server, t.opcua_node) for t in self.tags if t.opcua_node
        }
        objects = server.nodes.objects

        self._plc_folder = await objects.add_folder(
            ua.NodeId("PLC", ns), ua.QualifiedName("PLC", ns)
        )
        await self._add_plc_nodes(self.host.outputs())

        sim = await objects.add_object(ua.NodeId("Sim", ns), ua.QualifiedName("Sim", ns))
        msg = [_arg("Message", ua.VariantType.String, "what was done, or why not")]
        name_arg = _arg("name", ua.VariantType.String, "fault name")
        target_arg = _arg("target", ua.VariantType.String, "fault target, '' for none")
        value_arg = _arg("value", ua.VariantType.Double, "fault value (meaning per fault)")
        for method, fn, args in (
            ("InjectFault", self._m_inject, [name_arg, target_arg, value_arg]),
            ("ClearFault", self._m_clear, [name_arg, target_arg]),
            ("ClearAllFaults", self._m_clear_all, []),
        ):
            await sim.add_method(
                ua.NodeId(f"Sim.{method}", ns), ua.QualifiedName(method, ns), fn, args, msg
            )
        plant = await sim.add_folder(ua.NodeId("Sim.Plant", ns), ua.QualifiedName("Plant", ns))
        kinds: dict[str, ua.VariantType] = dict.fromkeys(self.plant_names, ua.VariantType.Double)
        kinds.update(PLANT_WATCHDOG)
        for name, vt in kinds.items():
            nid = ua.NodeId(f"Sim.Plant.{name}", ns)
            await plant.add_variable(nid, ua.QualifiedName(name, ns), ua.Variant(_typed(0, vt), vt))
            self._plant_nodes[name] = (nid, vt)
            self._read_only.add(nid)

        self._wrap_write(server)
        await server.start()
        if server.bserver is not None:
            self.port = server.bserver.port
        self.server = server

    async def _add_plc_nodes(self, values: Mapping[str, Value]) -> None:
        """Create `Objects/PLC/<tag>` for every tag, holding `values` (at start, and again after
        `nodes_deleted`: then with the PLC's values now, so a node never comes back as a made-up
        good 0.0)."""
        ns, plc = self.ns, self._plc_folder
        for tag in self.tags:
            # the tag's `opcua_type` when it states one (a typed PLC layout), else as always
            default = ua.VariantType.Boolean if tag.is_bool else ua.VariantType.Double
            vt = ua.VariantType[tag.opcua_type] if tag.opcua_type else default
            nid = self._tag_nodes.get(tag.name) or ua.NodeId(f"PLC.{tag.name}", ns)
            init: Value = values.get(tag.name, False if tag.is_bool else 0.0)
            var = await plc.add_variable(
                nid,
                ua.QualifiedName(tag.name, nid.NamespaceIndex),
                ua.Variant(_typed(init, vt), vt),
                datatype=ua.NodeId(vt.value),
            )
            if tag.description:
                await var.write_attribute(
                    ua.AttributeIds.Description,
                    ua.DataValue(ua.Variant(ua.LocalizedText(tag.description))),
                )
            self._plc_nodes[tag.name] = nid
            self._plc_vt[tag.name] = vt
            self._last.pop(nid, None)
            if tag.is_output:
                await var.set_writable()
                self._outputs[nid] = tag
            else:
                self._read_only.add(nid)

    @staticmethod
    async def _node_id(server: Server, text: str) -> ua.NodeId:
        """A tag's `opcua_node` as a node of this server: an `nsu=` URI is registered as a
        namespace, an `ns=<n>` index is made to exist (placeholder namespaces before it)."""
        node = ua.NodeId.from_string(text)
        uri = getattr(node, "NamespaceUri", None)
        if uri is not None:
            uris = await server.get_namespace_array()
            idx = uris.index(uri) if uri in uris else await server.register_namespace(uri)
        else:
            idx = node.NamespaceIndex
            while len(await server.get_namespace_array()) <= idx:
                n = len(await server.get_namespace_array())
                await server.register_namespace(f"urn:heatloop:sim:ns{n}")
        return ua.NodeId(node.Identifier, idx, node.NodeIdType)

    async def _delete_plc_nodes(self) -> None:
        """The `nodes_deleted` fault: every `Objects/PLC/<tag>` goes, as in a PLC program
        download (the folder stays). Reads answer BadNodeIdUnknown, browse paths BadNoMatch."""
        assert self.server is not None
        nodes = [self.server.get_node(nid) for nid in self._plc_nodes.values()]
        await self.server.delete_nodes(nodes)
        self._outputs.clear()
        self._read_only.difference_update(self._plc_nodes.values())
        self._last.clear()
        self._bad = None

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    # ---- values ----

    async def _write(self, nid: ua.NodeId, value: Any, vt: ua.VariantType, ts: datetime) -> None:
        assert self.server is not None
        last = self._last.get(nid, _UNSET)
        if last == value:
            return
        self._last[nid] = value
        if isinstance(last, tuple):  # `wrong_type` served another variant type here
            await self._untyped(nid)
        dv = ua.DataValue(ua.Variant(_typed(value, vt), vt), SourceTimestamp=ts, ServerTimestamp=ts)
        await self.server.write_attribute_value(nid, dv)

    async def retype(self, name: str, vt: ua.VariantType) -> None:
        """A PLC program download that declares tag `name`'s variable with another type (same
        node id): its DataType and value change, and writes must now be of type `vt`."""
        assert self.server is not None
        nid = self._plc_nodes[name]
        self._plc_vt[name] = vt
        await self._untyped(nid)
        dt = ua.DataValue(ua.Variant(ua.NodeId(vt.value)))
        await self.server.write_attribute_value(nid, dt, ua.AttributeIds.DataType)
        self._last.pop(nid, None)
        await self.publish_plc(self.host.outputs(), self.host.opcua_fault_status())

    async def _untyped(self, nid: ua.NodeId) -> None:
        """asyncua refuses a value of another variant type than the node holds, even from the
        server itself (BadTypeMismatch); it checks against the value held, so forget that one
        first (asyncua 2.1 internals, pinned; for `wrong_type` and its clearing only)."""
        assert self.server is not None
        node = self.server.iserver.aspace._nodes.get(nid)
        if node is not None:
            node.attributes[ua.AttributeIds.Value].value = None

    async def publish_plc(self, values: Mapping[str, Value], bad_status: int | None) -> None:
        """Show PLC view values (changed ones only), or every one with `bad_status` while a
        PLC fault holds (BadNoCommunication for a drop, BadDeviceFailure for an error)."""
        if self.server is None:
            return
        gone = self.host.faults.nodes_gone(self.host.now())
        if gone != self._deleted:
            self._deleted = gone
            await (self._delete_plc_nodes() if gone else self._add_plc_nodes(values))
            log.info("sim_plc_nodes_" + ("deleted" if gone else "recreated"), nodes=len(self.tags))
        if gone:
            return
        ts = datetime.now(UTC)
        if bad_status is not None:
            if self._bad != bad_status:
                self._bad = bad_status
                bad = ua.DataValue(
                    StatusCode=_status(bad_status), SourceTimestamp=ts, ServerTimestamp=ts
                )
                for nid in self._plc_nodes.values():
                    self._last.pop(nid, None)
                    await self.server.write_attribute_value(nid, bad)
            return
        self._bad = None
        wrong = self.host.faults.wrong_types
        for name, v in values.items():
            nid = self._plc_nodes.get(name)
            if nid is None:
                continue
            if name in wrong:
                await self._write_wrong(nid, name, wrong[name], ts)
            else:
                await self._write(nid, v, self._plc_vt[name], ts)

    async def _write_wrong(self, nid: ua.NodeId, name: str, kind: int, ts: datetime) -> None:
        """The `wrong_type` fault: serve a variant that does not match the tag's type."""
        assert self.server is not None
        marker = ("wrong_type", kind)
        if self._last.get(nid, _UNSET) == marker:
            return
        self._last[nid] = marker  # unequal to any value: the true value returns on clear
        if kind == 2:
            variant = ua.Variant("21.5", ua.VariantType.String)
        elif any(t.is_bool for t in self.tags if t.name == name):
            # by the tag's kind, not the variable's type: a bool tag in a UInt16 takes 0/1
            variant = ua.Variant(math.nan, ua.VariantType.Double)
        else:
            variant = ua.Variant(True, ua.VariantType.Boolean)
        await self._untyped(nid)
        dv = ua.DataValue(variant, SourceTimestamp=ts, ServerTimestamp=ts)
        await self.server.write_attribute_value(nid, dv)

    async def publish_plant(self, values: Mapping[str, float | bool | int]) -> None:
        if self.server is None:
            return
        ts = datetime.now(UTC)
        for name, v in values.items():
            entry = self._plant_nodes.get(name)
            if entry is not None:
                await self._write(entry[0], v, entry[1], ts)

    # ---- client writes ----

    def _wrap_write(self, server: Server) -> None:
        service = server.iserver.attribute_service
        original: Callable[..., Awaitable[list[ua.StatusCode]]] = service.write

        async def write(params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
            items = params.NodesToWrite
            results: list[ua.StatusCode | None] = [None] * len(items)
            passthrough: list[int] = []
            accepted: dict[str, Value] = {}
            for i, wv in enumerate(items):
                if wv.NodeId in self._outputs:
                    code, value = self._check_output_write(self._outputs[wv.NodeId], wv)
                    results[i] = _status(code)
                    if code == ua.StatusCodes.Good:
                        accepted[self._outputs[wv.NodeId].name] = value
                elif wv.NodeId in self._read_only:
                    results[i] = _status(ua.StatusCodes.BadNotWritable)
                elif self._deleted and wv.NodeId in self._plc_nodes.values():
                    results[i] = _status(ua.StatusCodes.BadNodeIdUnknown)
                else:
                    passthrough.append(i)
            if passthrough:
                sub = ua.WriteParameters(NodesToWrite=[items[i] for i in passthrough])
                for i, code in zip(passthrough, await original(sub, user=user), strict=True):
                    results[i] = code
            if accepted:
                self.host.apply_writes(accepted, "opcua")
                await self.publish_plc(self.host.outputs(), self.host.opcua_fault_status())
            return [
                r if r is not None else _status(ua.StatusCodes.BadInternalError) for r in results
            ]

        service.write = write  # type: ignore[method-assign]

    def _check_output_write(self, tag: Tag, wv: ua.WriteValue) -> tuple[int, Value]:
        if wv.AttributeId != ua.AttributeIds.Value or wv.IndexRange:
            return ua.StatusCodes.BadNotWritable, 0.0
        if self.host.faults.dropped(self.host.now()):
            return ua.StatusCodes.BadNoCommunication, 0.0
        if self.host.faults.write_refusal(tag.modbus.table.value) is not None:
            return ua.StatusCodes.BadDeviceFailure, 0.0  # the `write_refused` PLC fault
        variant = wv.Value.Value if wv.Value is not None else None
        if variant is None or variant.Value is None or isinstance(variant.Value, list):
            return ua.StatusCodes.BadTypeMismatch, 0.0
        # as a real server: only the variable's own type (a Double for a Float is refused)
        if variant.VariantType != self._plc_vt[tag.name]:
            return ua.StatusCodes.BadTypeMismatch, 0.0
        if tag.is_bool:
            if variant.VariantType == ua.VariantType.Boolean:
                return ua.StatusCodes.Good, bool(variant.Value)
            if variant.Value not in (0, 1):  # a flag in an integer variable
                return ua.StatusCodes.BadOutOfRange, False
            return ua.StatusCodes.Good, variant.Value == 1
        v = float(variant.Value)
        if not (math.isfinite(v) and tag.lo <= v <= tag.hi):
            return ua.StatusCodes.BadOutOfRange, 0.0
        return ua.StatusCodes.Good, v

    # ---- methods ----

    async def _m_inject(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        return self._call(
            "InjectFault",
            args,
            (
                ("name", {ua.VariantType.String}),
                ("target", {ua.VariantType.String}),
                ("value", _NUMERIC),
            ),
            lambda n, t, v: self.host.inject(n, t, float(v)),
        )

    async def _m_clear(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        return self._call(
            "ClearFault",
            args,
            (("name", {ua.VariantType.String}), ("target", {ua.VariantType.String})),
            lambda n, t: self.host.clear(n, t),
        )

    async def _m_clear_all(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        return self._call("ClearAllFaults", args, (), lambda: self.host.clear_all())

    def _call(
        self,
        method: str,
        args: tuple[ua.Variant, ...],
        spec: tuple[tuple[str, set[ua.VariantType] | frozenset[ua.VariantType]], ...],
        fn: Callable[..., None],
    ) -> ua.CallMethodResult:
        """Check the arguments, run `fn`, answer Good or a Bad status with a message."""
        if len(args) != len(spec):
            code = (
                ua.StatusCodes.BadArgumentsMissing
                if len(args) < len(spec)
                else ua.StatusCodes.BadTooManyArguments
            )
            names = ", ".join(n for n, _ in spec) or "none"
            return self._fail(method, code, f"{len(args)} arguments; expected ({names})", [])
        arg_results = []
        bad = []
        for (name, types), a in zip(spec, args, strict=True):
            ok = isinstance(a, ua.Variant) and a.VariantType in types and a.Value is not None
            arg_results.append(
                _status(ua.StatusCodes.Good if ok else ua.StatusCodes.BadTypeMismatch)
            )
            if not ok:
                got = a.VariantType.name if isinstance(a, ua.Variant) else type(a).__name__
                bad.append(f"{name}: {got}")
        if bad:
            return self._fail(
                method,
                ua.StatusCodes.BadTypeMismatch,
                f"wrong argument types ({'; '.join(bad)})",
                arg_results,
            )
        values = [a.Value for a in args]
        try:
            fn(*values)
        except ValueError as e:  # FaultError and friends: the caller's mistake
            return self._fail(method, ua.StatusCodes.BadInvalidArgument, str(e), [])
        except Exception as e:  # never let a method call take the instrument down
            log.exception("sim_method_failed", method=method, args=[_bounded(v) for v in values])
            return self._fail(method, ua.StatusCodes.BadInternalError, repr(e), [])
        text = f"{method}({', '.join(_bounded(v) for v in values)}): done"
        return ua.CallMethodResult(
            StatusCode=_status(ua.StatusCodes.Good),
            InputArgumentResults=[_status(ua.StatusCodes.Good)] * len(args),
            OutputArguments=[ua.Variant(text, ua.VariantType.String)],
        )

    @staticmethod
    def _fail(
        method: str, code: int, message: str, arg_results: list[ua.StatusCode]
    ) -> ua.CallMethodResult:
        # a method argument is the caller's: a 1 MB name must not become a 1 MB log line
        message = _bounded_text(message, MESSAGE_CHARS)
        log.warning(
            "sim_method_refused", method=method, status=ua.StatusCode(code).name, reason=message
        )
        return ua.CallMethodResult(
            StatusCode=_status(code),
            InputArgumentResults=arg_results,
            OutputArguments=[ua.Variant(message, ua.VariantType.String)],
        )


MESSAGE_CHARS = 300  # longest reason logged or answered for a method call
ARG_CHARS = 80  # longest argument quoted


def _bounded_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars, truncated)"


def _bounded(value: object) -> str:
    """An argument as quoted in a log line or an answer: its repr, at most ARG_CHARS."""
    return _bounded_text(repr(value), ARG_CHARS)


class _Unset:
    pass


_UNSET = _Unset()


_INT_LIMITS = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
}


def _typed(value: Any, vt: ua.VariantType) -> Any:
    """A value as a variable of type `vt` holds it. Integer types round half away from zero
    and saturate at the type's ends, as a PLC's REAL_TO_INT conversions do; NaN becomes 0."""
    if vt == ua.VariantType.Boolean:
        return bool(value)
    limits = _INT_LIMITS.get(vt)
    if limits is not None:
        v = float(value)
        lo, hi = limits
        if math.isnan(v):
            return 0
        if math.isinf(v):
            return hi if v > 0 else lo
        return int(min(max(math.copysign(math.floor(abs(v) + 0.5), v), lo), hi))
    return float(value)
