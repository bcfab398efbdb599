"""The BMS server's Alarms & Conditions: every alarm of the controller's catalogue as an OPC UA
condition under `Objects/HeatLoop/Alarms/<id>`.

Theory of operation. asyncua 2.1 can emit condition events and wire ConditionRefresh, but the
Acknowledge / Shelve state machines are left to the server, and instantiating the full
AlarmConditionType (≈ 60 child nodes, ≈ 90 ms each on this machine) for the ≈ 100 alarms of a
site would take seconds at every start. So each condition is an object whose type definition
is AlarmConditionType (clients see the standard type) with the children a BMS uses, built in
one batch: EnabledState/Id, ActiveState/Id, AckedState/Id, Retain, Severity, Message,
SourceNode, SourceName, ConditionName, InputNode, SuppressedOrShelved, Time, EventId, EventType
and the Acknowledge method; the source node gets a HasCondition reference to it.

State comes only from the controller: each snapshot lists the standing alarms (ISA-18.2
states); an alarm not listed is normal (inactive, acknowledged, Retain false). When a
condition's (active, acked, retain, shelved, severity, message) changes, its variables are
written and one AlarmConditionType event (a fresh EventId) is emitted twice: on the condition
node and on the Server object, because asyncua does not propagate events and most BMS clients
subscribe at the Server. `Acknowledge(EventId, Comment)` (on the instance, or the type's method
with the condition as object) checks the session's role (operator or engineer), that the
EventId is one this condition emitted recently (BadEventIdUnknown) and that it is not already
acknowledged (BadConditionBranchAlreadyAcked), then asks the controller (`ack` of this alarm);
it never changes the state itself: the next snapshot does. ConditionRefresh / ConditionRefresh2
(asyncua's own implementation replays only to the node the last event was emitted on) are
replaced: between RefreshStart and RefreshEnd every retained condition's last event is replayed,
same EventId, to the monitored items of that subscription watching the Server object or the
condition node.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common import event_objects

from controller import bms_space

if TYPE_CHECKING:
    from controller.bms_server import BmsServer

S = ua.StatusCodes
SEVERITY = {"critical": 900, "high": 700, "medium": 500, "low": 300}
RECENT_EVENT_IDS = 8  # EventIds of a condition an Acknowledge may name
ACKERS = frozenset({"operator", "engineer"})
# (active, acked, retain) of controller.alarms.AlarmState values
STATES = {
    "normal": (False, True, False),
    "active_unacknowledged": (True, False, True),
    "active_acknowledged": (True, True, True),
    "returned_unacknowledged": (False, False, True),
}
SERVER = ua.NodeId(ua.ObjectIds.Server)


@dataclass
class Cond:
    """One condition's served state and its last event."""

    spec: bms_space.Condition
    nid: ua.NodeId
    source: ua.NodeId
    event: Any
    shown: tuple[bool, bool, bool, bool, int, str] = (False, True, False, False, 0, "")
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=RECENT_EVENT_IDS))


def _loc(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, "en")


class Conditions:
    def __init__(self, bms: BmsServer, log: Any) -> None:
        self.bms = bms
        self.log = log
        self._by_id: dict[str, Cond] = {}
        self._by_nid: dict[ua.NodeId, Cond] = {}

    # ---- build ----

    async def build(self) -> None:
        bms, sp = self.bms, self.bms.space
        if not sp.conditions:
            return
        folder = bms.nodeid("HeatLoop.Alarms")
        items: list[ua.AddNodesItem] = []
        prop = bms.property_item
        for c in sp.conditions:
            nid = bms.nodeid(c.node_id)
            source = bms.nodeid(c.source)
            if source not in bms._ours:
                source = bms.nodeid(bms_space.ROOT)
            items.append(
                bms.object_item(
                    c.node_id,
                    folder,
                    c.id,
                    typedef=ua.ObjectIds.AlarmConditionType,
                    ref=ua.ObjectIds.Organizes,
                    description=c.message,
                    notifier=True,
                )
            )
            base = c.node_id
            for state, true_text, false_text, initial in (
                ("EnabledState", "Enabled", "Disabled", True),
                ("ActiveState", "Active", "Inactive", False),
                ("AckedState", "Acknowledged", "Unacknowledged", True),
            ):
                items.append(
                    bms.variable_item(
                        f"{base}.{state}",
                        nid,
                        state,
                        ua.Variant(_loc(true_text if initial else false_text)),
                        datatype=ua.NodeId(ua.ObjectIds.LocalizedText),
                        typedef=ua.ObjectIds.TwoStateVariableType,
                        name_ns=0,
                    )
                )
                items.append(
                    prop(
                        f"{base}.{state}.Id",
                        bms.nodeid(f"{base}.{state}"),
                        "Id",
                        ua.Variant(initial, ua.VariantType.Boolean),
                        ua.ObjectIds.Boolean,
                    )
                )
            sev = SEVERITY.get(c.priority, c.severity)
            for name, variant, dtype in (
                ("Retain", ua.Variant(False, ua.VariantType.Boolean), ua.ObjectIds.Boolean),
                ("Severity", ua.Variant(sev, ua.VariantType.UInt16), ua.ObjectIds.UInt16),
                ("Message", ua.Variant(_loc(c.message)), ua.ObjectIds.LocalizedText),
                ("SourceNode", ua.Variant(source, ua.VariantType.NodeId), ua.ObjectIds.NodeId),
                ("SourceName", ua.Variant(c.source, ua.VariantType.String), ua.ObjectIds.String),
                ("ConditionName", ua.Variant(c.id, ua.VariantType.String), ua.ObjectIds.String),
                ("InputNode", ua.Variant(source, ua.VariantType.NodeId), ua.ObjectIds.NodeId),
                (
                    "SuppressedOrShelved",
                    ua.Variant(False, ua.VariantType.Boolean),
                    ua.ObjectIds.Boolean,
                ),
                (
                    "EventType",
                    ua.Variant(ua.NodeId(ua.ObjectIds.AlarmConditionType), ua.VariantType.NodeId),
                    ua.ObjectIds.NodeId,
                ),
                ("EventId", ua.Variant(b"", ua.VariantType.ByteString), ua.ObjectIds.ByteString),
                (
                    "Time",
                    ua.Variant(datetime.now(UTC), ua.VariantType.DateTime),
                    ua.ObjectIds.UtcTime,
                ),
            ):
                items.append(prop(f"{base}.{name}", nid, name, variant, dtype))
            ev = event_objects.AlarmCondition()
            _fix_data_types(ev)
            ev.add_property("NodeId", nid, ua.VariantType.NodeId)  # the ConditionId
            ev.SourceNode = source
            ev.SourceName = c.source
            ev.ConditionName = c.id
            ev.ConditionClassId = ua.NodeId(ua.ObjectIds.ProcessConditionClassType)
            ev.ConditionClassName = _loc("Process")
            ev.InputNode = source
            ev.BranchId = ua.NodeId()
            ev.Severity = sev
            ev.Message = _loc(c.message)
            ev.EnabledState = _loc("Enabled")
            setattr(ev, "EnabledState/Id", True)
            ev.Quality = ua.StatusCode(S.Good)
            cond = Cond(c, nid, source, ev, shown=(False, True, False, False, sev, c.message))
            self._by_id[c.id] = cond
            self._by_nid[nid] = cond
        await bms.add_nodes(items)
        refs = []
        for cond in self._by_id.values():
            ref = ua.AddReferencesItem()
            ref.SourceNodeId = cond.source
            ref.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasCondition)
            ref.IsForward = True
            ref.TargetNodeId = cond.nid
            ref.TargetNodeClass = ua.NodeClass.Object
            refs.append(ref)
        await bms.server.iserver.isession.add_references(refs)
        args = [
            ua.Argument(
                Name="EventId",
                DataType=ua.NodeId(ua.ObjectIds.ByteString),
                ValueRank=-1,
                ArrayDimensions=[],
                Description=_loc("the EventId of the event being acknowledged"),
            ),
            ua.Argument(
                Name="Comment",
                DataType=ua.NodeId(ua.ObjectIds.LocalizedText),
                ValueRank=-1,
                ArrayDimensions=[],
                Description=_loc("why (journalled)"),
            ),
        ]
        server = bms.server
        for cond in self._by_id.values():
            m = await server.get_node(cond.nid).add_method(
                bms.nodeid(f"{cond.spec.node_id}.Acknowledge"),
                ua.QualifiedName("Acknowledge", 0),
                self.acknowledge,
                args,
                [],
            )
            bms._ours.add(m.nodeid)
        # the type's method, called with the condition as object (the usual way)
        session = server.iserver.isession
        session.add_method_callback(
            ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge), self.acknowledge
        )
        for mid in (
            ua.ObjectIds.ConditionType_ConditionRefresh,
            ua.ObjectIds.ConditionType_ConditionRefresh2,
        ):
            session.add_method_callback(ua.NodeId(mid), self.refresh)

    # ---- state ----

    async def apply(self, alarms: list[Any], now: datetime) -> None:
        """Serve the standing alarms of a snapshot (not listed: normal)."""
        standing: dict[str, dict[str, Any]] = {}
        for a in alarms[:10_000]:
            if not isinstance(a, dict) or not isinstance(a.get("id"), str):
                self.bms.complaints(
                    "warning",
                    "bms_snapshot_malformed",
                    field="alarms",
                    why=f"not an alarm: {str(a)[:100]}",
                )
                continue
            if a["id"] not in self._by_id:
                self.bms.complaints("warning", "bms_alarm_unknown", alarm=a["id"][:100])
                continue
            standing[a["id"]] = a
        for cid, cond in self._by_id.items():
            a = standing.get(cid)
            state = a.get("state") if a else "normal"
            if state not in STATES:
                self.bms.complaints(
                    "warning",
                    "bms_snapshot_value",
                    node=cond.spec.node_id,
                    why=f"alarm state {str(state)[:60]}",
                )
                continue
            active, acked, retain = STATES[state]
            shelved = bool(a and a.get("shelved_until") is not None)
            pr = a.get("priority") if a else None
            severity = SEVERITY.get(pr, cond.shown[4]) if isinstance(pr, str) else cond.shown[4]
            message = cond.spec.message
            if a and isinstance(a.get("message"), str) and a["message"]:
                message = a["message"]
            if a and isinstance(a.get("detail"), str) and a["detail"]:
                message = f"{message} ({a['detail']})"
            message = message[:1000]
            shown = (active, acked, retain, shelved, severity, message)
            if shown == cond.shown:
                continue
            prev = cond.shown
            cond.shown = shown
            at = _when(a, now) if active and not prev[0] else now
            await self._changed(cond, at, now)

    async def _changed(self, cond: Cond, at: datetime, now: datetime) -> None:
        active, acked, retain, shelved, severity, message = cond.shown
        ev = cond.event
        event_id = uuid.uuid4().bytes
        cond.recent.append(event_id)
        ev.EventId = event_id
        ev.Time = at
        ev.ReceiveTime = now
        ev.Severity = severity
        ev.LastSeverity = severity
        ev.Message = _loc(message)
        ev.Retain = retain
        ev.ActiveState = _loc("Active" if active else "Inactive")
        setattr(ev, "ActiveState/Id", active)
        setattr(ev, "ActiveState/TransitionTime", at)
        ev.AckedState = _loc("Acknowledged" if acked else "Unacknowledged")
        setattr(ev, "AckedState/Id", acked)
        ev.SuppressedOrShelved = shelved
        base = cond.spec.node_id
        write = self.bms.server.write_attribute_value
        nid = self.bms.nodeid
        for name, variant in (
            ("ActiveState", ua.Variant(ev.ActiveState)),
            ("ActiveState.Id", ua.Variant(active, ua.VariantType.Boolean)),
            ("AckedState", ua.Variant(ev.AckedState)),
            ("AckedState.Id", ua.Variant(acked, ua.VariantType.Boolean)),
            ("Retain", ua.Variant(retain, ua.VariantType.Boolean)),
            ("Severity", ua.Variant(severity, ua.VariantType.UInt16)),
            ("Message", ua.Variant(ev.Message)),
            ("SuppressedOrShelved", ua.Variant(shelved, ua.VariantType.Boolean)),
            ("EventId", ua.Variant(event_id, ua.VariantType.ByteString)),
            ("Time", ua.Variant(at, ua.VariantType.DateTime)),
        ):
            await write(nid(f"{base}.{name}"), ua.DataValue(variant, SourceTimestamp=at))
        await self._emit(cond)

    async def _emit(self, cond: Cond, subscription: Any = None, mid: int | None = None) -> None:
        """The condition's event on the Server object and on the condition node."""
        ev = cond.event
        subs = self.bms.server.iserver.subscription_service.subscriptions
        for node in (SERVER, cond.nid):
            ev.emitting_node = node
            if subscription is None:
                for sub in list(subs.values()):
                    await sub.monitored_item_srv.trigger_event(ev)
            elif mid is None:
                await subscription.monitored_item_srv.trigger_event(ev)
            else:
                item = subscription.monitored_item_srv._monitored_items.get(mid)
                if item is not None and item.read_value_id.NodeId == node:
                    await subscription.monitored_item_srv.trigger_event(ev, mid)

    # ---- methods ----

    async def refresh(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        """ConditionRefresh(SubscriptionId) and ConditionRefresh2(SubscriptionId,
        MonitoredItemId): replay the retained conditions between RefreshStart and RefreshEnd."""
        from controller.bms_server import current_caller

        if not 1 <= len(args) <= 2 or any(a.VariantType != ua.VariantType.UInt32 for a in args):
            return ua.StatusCode(S.BadInvalidArgument)
        svc = self.bms.server.iserver.subscription_service
        sub = svc.subscriptions.get(args[0].Value)
        caller = current_caller()
        if sub is None or (caller is not None and not self._owns(sub)):
            return ua.StatusCode(S.BadSubscriptionIdInvalid)
        mid = args[1].Value if len(args) == 2 else None
        if mid is not None and mid not in sub.monitored_item_srv._monitored_items:
            return ua.StatusCode(S.BadMonitoredItemIdInvalid)
        sid = args[0].Value
        start = svc.standard_events.get(ua.ObjectIds.RefreshStartEventType)
        end = svc.standard_events.get(ua.ObjectIds.RefreshEndEventType)
        if start is not None:
            await start.trigger(subscription_id=sid)
        for cond in self._by_id.values():
            if cond.shown[2]:  # retained
                await self._emit(cond, sub, mid)
        if end is not None:
            await end.trigger(subscription_id=sid)
        return []

    @staticmethod
    def _owns(sub: Any) -> bool:
        """The subscription belongs to the calling session."""
        from controller.bms_server import _CONNECTION

        proc = _CONNECTION.get()
        session = getattr(proc, "session", None)
        return session is not None and sub.session_id == session.session_id

    async def acknowledge(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        from controller.bms_server import current_caller

        bms = self.bms
        caller = current_caller()
        cond = self._by_nid.get(parent)
        node = cond.spec.node_id if cond else str(parent)
        shown = [a.Value for a in args]
        code = bms.gate(caller, node + ".Acknowledge", shown, ACKERS)
        if code != S.Good:
            return ua.StatusCode(code)
        assert caller is not None
        if cond is None:
            return ua.StatusCode(
                bms.refuse(
                    caller, node, shown, S.BadNodeIdUnknown, "not a condition of this server"
                )
            )
        if len(args) != 2:
            return ua.StatusCode(
                bms.refuse(caller, node, shown, S.BadInvalidArgument, "expected EventId, Comment")
            )
        bad = [
            args[0].VariantType != ua.VariantType.ByteString,
            args[1].VariantType not in (ua.VariantType.LocalizedText, ua.VariantType.String),
        ]
        if any(bad):
            bms.refuse(caller, node, shown, S.BadTypeMismatch, "argument type")
            return ua.CallMethodResult(
                StatusCode=ua.StatusCode(S.BadInvalidArgument),
                InputArgumentResults=[
                    ua.StatusCode(S.BadTypeMismatch if b else S.Good) for b in bad
                ],
            )
        if args[0].Value not in cond.recent:
            return ua.StatusCode(
                bms.refuse(
                    caller, node, shown, S.BadEventIdUnknown, "not an event of this condition"
                )
            )
        if cond.shown[1]:
            return ua.StatusCode(
                bms.refuse(caller, node, shown, S.BadConditionBranchAlreadyAcked, "already")
            )
        comment = args[1].Value
        text = comment.Text if isinstance(comment, ua.LocalizedText) else comment
        reason = (
            text
            if isinstance(text, str) and text.strip()
            else (f"OPC UA Acknowledge Alarms/{cond.spec.id}")
        )
        code = await bms.request(caller.name, "ack", {"alarms": [cond.spec.id]}, reason)
        if code != S.Good:
            bms.refuse(caller, node, shown, code, "the controller refused")
        return ua.StatusCode(code)


def _when(a: dict[str, Any] | None, now: datetime) -> datetime:
    since = a.get("since_wall") if a else None
    if isinstance(since, int | float) and not isinstance(since, bool):
        try:
            return datetime.fromtimestamp(float(since), UTC)
        except (OverflowError, OSError, ValueError):
            pass
    return now


def _fix_data_types(ev: Any) -> None:
    """asyncua 2.1's event classes declare some fields with a data type NodeId (UtcTime,
    Duration) where a VariantType is needed: setting one makes every emission fail
    ("'NodeId' object has no attribute '__name__'"). Declare them as their built-in types."""
    builtin = {
        ua.ObjectIds.UtcTime: ua.VariantType.DateTime,
        ua.ObjectIds.Duration: ua.VariantType.Double,
    }
    for name, dtype in list(ev.data_types.items()):
        if isinstance(dtype, ua.NodeId):
            ev.data_types[name] = builtin.get(dtype.Identifier, ua.VariantType.Variant)
