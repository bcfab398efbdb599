"""The BMS OPC UA server process on its own (`python -m controller.bms_server --fd N`): a test
parent plays the controller's side of the link (hello, snapshots, answers) and a real asyncua
client connects over 127.0.0.1 with Basic256Sha256 SignAndEncrypt and a username, as a BMS
would. One child serves the module (start ≈ 2-7 s); a second one, with the None endpoint and
anonymous sessions enabled, serves the tests of those openings.

Expected values come from the snapshot the test sends and from the interface's mapping
(quality -> status code, answer kind -> status code), never from an earlier run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua

from controller.bms_server import NICE
from controller.bms_space import NAMESPACE_URI, Point, Space, space
from controller.bms_users import add_user
from plc_io.site import load_site
from tests.hil.bms_parent import ROOT, BmsParent, accept, hello, snapshot
from tests.hil.conftest import free_port
from tests.unit.bms_helpers import client_cert, connect

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="module")]

S = ua.StatusCodes
PASSWORDS = {
    "olivia": ("operator", "olivia-password-1"),
    "victor": ("viewer", "victor-password-1"),
    "erin": ("engineer", "erin-password-12"),
}
TELEMETRY = "HeatLoop.Telemetry.it_supply_temp"
SETPOINT = "HeatLoop.Setpoints.supply_setpoint_c"


@dataclass
class Rig:
    parent: BmsParent
    space: Space
    state_dir: Path
    certs: tuple[Path, Path]
    ns: int = 0

    def nid(self, text: str) -> ua.NodeId:
        return ua.NodeId(text, self.ns)

    async def client(self, user: str = "olivia", **kw: Any) -> Client:
        return await connect(self.parent.endpoint, self.certs, user, PASSWORDS[user][1], **kw)


async def _rig(tmp: Path, **hello_kw: Any) -> Rig:
    state = tmp / "state"
    state.mkdir()
    for name, (role, password) in PASSWORDS.items():
        add_user(state / "bms_users.json", name, role, password)
    certs = await client_cert(tmp)
    trusted = state / "pki" / "bms" / "trusted"
    trusted.mkdir(parents=True)
    (trusted / "test-client.der").write_bytes(certs[0].read_bytes())  # (cert, key)
    sp = space(load_site(ROOT / "plc_io" / "demo_site.toml"))
    parent = BmsParent(hello(sp, state, free_port(), **hello_kw), tmp / "child.log")
    await parent.start()
    return Rig(parent, sp, state, certs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    r = await _rig(tmp_path_factory.mktemp("bms_server"), min_sampling_ms=250)
    c = await r.client()
    try:
        r.ns = await c.get_namespace_index(NAMESPACE_URI)
    finally:
        await c.disconnect()
    yield r
    code = await r.parent.close()
    assert code == 0, f"end of file must stop the child with 0: {code}\n{r.parent.log()}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """A child with the None endpoint and anonymous sessions enabled."""
    r = await _rig(
        tmp_path_factory.mktemp("bms_server_open"),
        allow_none_security=True,
        allow_anonymous=True,
        max_sessions=2,
    )
    yield r
    await r.parent.close()


@pytest_asyncio.fixture(loop_scope="module")
async def olivia(rig: Rig) -> AsyncIterator[Client]:
    c = await rig.client("olivia")
    yield c
    await c.disconnect()


async def until(pred: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll an async predicate until it gives a truthy value (a generous bound, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the bound")
        await asyncio.sleep(0.05)


async def write(client: Client, nid: ua.NodeId, variant: ua.Variant) -> int:
    wv = ua.WriteValue(NodeId=nid, AttributeId=ua.AttributeIds.Value, Value=ua.DataValue(variant))
    (result,) = await client.uaclient.write(ua.WriteParameters(NodesToWrite=[wv]))
    return result.value


async def call(client: Client, method: str, *args: ua.Variant, ns: int) -> ua.CallMethodResult:
    req = ua.CallMethodRequest(
        ObjectId=ua.NodeId("HeatLoop", ns),
        MethodId=ua.NodeId(method, ns),
        InputArguments=list(args),
    )
    (res,) = await client.uaclient.call([req])
    return res


def _point(sp: Space, node_id: str) -> Point:
    return sp.point(node_id)


# ---- the tree ----


async def test_the_server_runs_below_the_controllers_cpu_priority(rig: Rig) -> None:
    """On a two-core IPC a busy BMS server must lose every contest for a core to the scan."""
    assert rig.parent.proc is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, rig.parent.proc.pid) >= min(mine + NICE, 19)


async def test_browse_the_contract_tree(rig: Rig, olivia: Client) -> None:
    """Every variable, method and condition of the space is where the contract puts it, by
    browse path from Objects, with its node id."""
    ns = rig.ns
    objects = olivia.nodes.objects
    for p in rig.space.points:
        path = [f"{ns}:HeatLoop", *(f"{ns}:{part}" for part in p.path)]
        node = await objects.get_child(path)
        assert node.nodeid == ua.NodeId(p.node_id, ns), p.node_id
    for m in rig.space.methods:
        node = await objects.get_child([f"{ns}:HeatLoop", f"{ns}:{m.name}"])
        assert node.nodeid == ua.NodeId(m.node_id, ns)
        assert await node.read_node_class() == ua.NodeClass.Method
    for c in rig.space.conditions:
        node = await objects.get_child([f"{ns}:HeatLoop", f"{ns}:Alarms", f"{ns}:{c.id}"])
        assert node.nodeid == ua.NodeId(c.node_id, ns)
        assert await node.read_type_definition() == ua.NodeId(ua.ObjectIds.AlarmConditionType)


async def test_units_range_and_access(rig: Rig, olivia: Client) -> None:
    """EngineeringUnits (UNECE), EURange, read-only telemetry and writable setpoints."""
    p = _point(rig.space, TELEMETRY)
    node = olivia.get_node(rig.nid(TELEMETRY))
    eu = await (await node.get_child(["0:EngineeringUnits"])).read_value()
    assert eu.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"
    assert p.unece is not None and eu.UnitId == p.unece[0]
    rng = await (await node.get_child(["0:EURange"])).read_value()
    assert p.range is not None and (rng.Low, rng.High) == p.range
    assert await node.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
    al = await node.read_attribute(ua.AttributeIds.AccessLevel)
    assert not al.Value.Value & ua.AccessLevel.CurrentWrite.mask
    al = await olivia.get_node(rig.nid(SETPOINT)).read_attribute(ua.AttributeIds.AccessLevel)
    assert al.Value.Value & ua.AccessLevel.CurrentWrite.mask


async def test_no_none_endpoint_and_no_anonymous_by_default(rig: Rig) -> None:
    c = Client(rig.parent.endpoint, timeout=10)
    endpoints = await c.connect_and_get_server_endpoints()
    modes = {e.SecurityMode for e in endpoints}
    assert ua.MessageSecurityMode.None_ not in modes
    assert modes == {ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt}
    for e in endpoints:
        kinds = {t.TokenType for t in e.UserIdentityTokens}
        assert kinds == {ua.UserTokenType.UserName}, e.SecurityPolicyUri
    with pytest.raises(ua.UaStatusCodeError):
        anon = await connect(rig.parent.endpoint, rig.certs)
        await anon.disconnect()


# ---- values ----


async def test_telemetry_status_follows_quality(rig: Rig, olivia: Client) -> None:
    """good -> Good with the value and the PLC read time as source timestamp; stale ->
    UncertainLastUsableValue with the value; comms_lost -> BadNoCommunication, no value."""
    node = olivia.get_node(rig.nid(TELEMETRY))
    wall = time.time()
    cases = [
        ([31.5, "good", wall - 0.3], S.Good, 31.5),
        ([31.5, "stale", wall - 5.0], S.UncertainLastUsableValue, 31.5),
        ([None, "comms_lost", None], S.BadNoCommunication, None),
        ([31.7, "forced", wall - 0.2], S.GoodLocalOverride, 31.7),
        ([140.0, "out_of_range", wall - 0.2], S.BadOutOfRange, None),
    ]
    for seq, (sample, code, value) in enumerate(cases, start=100):
        snap = snapshot(rig.space, seq=seq, wall=wall)
        snap["inputs"]["it_supply_temp"] = sample
        rig.parent.send(snap)

        async def shown(code: int = code) -> ua.DataValue | None:
            dv = await node.read_data_value(raise_on_bad_status=False)
            return dv if dv.StatusCode.value == code else None

        dv = await until(shown)
        got = dv.Value.Value if dv.Value is not None else None
        assert got == value, sample
        if sample[2] is not None:
            assert abs(dv.SourceTimestamp.replace(tzinfo=UTC).timestamp() - sample[2]) < 0.001


async def test_every_section_of_a_snapshot_is_served(rig: Rig, olivia: Client) -> None:
    """Status, outputs with the level that set them, energy (not metered: no value, waiting),
    setpoints (the effective value) and interlock flags, each from its feed."""
    wall = time.time()
    snap = snapshot(rig.space, seq=150, wall=wall)
    snap["status"].update(
        mode="LEAK_TRIP",
        mode_since=wall - 30.0,
        trip_latched=True,
        active_interlocks=["IL-04"],
        plc_comms_ok=False,
        scan_overruns=3,
    )
    snap["outputs"]["reuse_valve_cmd"] = [0.0, "interlock", "IL-04"]
    snap["outputs"]["secondary_pump_cmd"] = [False, "interlock", "IL-04"]
    snap["energy"]["HeatRejected_kWh"] = [None, "none", None]
    snap["energy"]["HeatDelivered_kWh"] = [1234.5, "bad_reply", wall - 0.1]
    snap["setpoints"]["supply_setpoint_c"] = [33.0, 33.0]
    snap["interlocks"]["IL-04"] = [True, True, False]
    rig.parent.send(snap)
    expected = {
        "HeatLoop.Status.Mode": (S.Good, "LEAK_TRIP"),
        "HeatLoop.Status.TripLatched": (S.Good, True),
        "HeatLoop.Status.ActiveInterlocks": (S.Good, ["IL-04"]),
        "HeatLoop.Status.PlcCommsOk": (S.Good, False),
        "HeatLoop.Status.ScanOverruns": (S.Good, 3),
        "HeatLoop.Status.ModeSince": (S.Good, datetime.fromtimestamp(wall - 30.0, UTC)),
        "HeatLoop.Outputs.reuse_valve_cmd": (S.Good, 0.0),
        "HeatLoop.Outputs.reuse_valve_cmd_level": (S.Good, "interlock"),
        "HeatLoop.Outputs.secondary_pump_cmd": (S.Good, False),
        "HeatLoop.Energy.HeatRejected_kWh": (S.BadWaitingForInitialData, None),
        "HeatLoop.Energy.HeatDelivered_kWh": (S.BadCommunicationError, None),
        "HeatLoop.Setpoints.supply_setpoint_c": (S.Good, 33.0),
        "HeatLoop.Interlocks.IL-04.Active": (S.Good, True),
        "HeatLoop.Interlocks.IL-04.Latched": (S.Good, True),
        "HeatLoop.Interlocks.IL-04.Bypassed": (S.Good, False),
    }

    async def served() -> dict[str, tuple[int, Any]]:
        got = {}
        for nid in expected:
            dv = await olivia.get_node(rig.nid(nid)).read_data_value(raise_on_bad_status=False)
            value = dv.Value.Value if dv.Value is not None else None
            if isinstance(value, datetime):
                value = value.replace(tzinfo=UTC)
            got[nid] = (dv.StatusCode.value, value)
        return got if got["HeatLoop.Status.Mode"][1] == "LEAK_TRIP" else {}

    got = await until(served)
    assert abs(got.pop("HeatLoop.Status.ModeSince")[1].timestamp() - (wall - 30.0)) < 0.001
    expected.pop("HeatLoop.Status.ModeSince")
    assert got == expected
    description = rig.space.point("HeatLoop.Interlocks.IL-04.Description").value
    node = olivia.get_node(rig.nid("HeatLoop.Interlocks.IL-04.Description"))
    assert await node.read_value() == description
    rig.parent.send(snapshot(rig.space, seq=151))


async def test_a_silent_controller_makes_values_uncertain(rig: Rig, olivia: Client) -> None:
    """No snapshot for SILENCE_S (a hung controller whose socket stays open): the values keep
    their numbers but say UncertainNoCommunicationLastUsableValue; the next snapshot makes them
    good again."""
    snap = snapshot(rig.space, seq=160)
    snap["inputs"]["it_supply_temp"] = [35.5, "good", time.time()]
    rig.parent.send(snap)
    node = olivia.get_node(rig.nid(TELEMETRY))

    def status_is(code: int, value: float) -> Callable[[], Any]:
        async def check() -> bool:
            dv = await node.read_data_value(raise_on_bad_status=False)
            got = dv.Value.Value if dv.Value is not None else None
            return dv.StatusCode.value == code and got == value

        return check

    await until(status_is(S.Good, 35.5))
    rig.parent.resending = False
    try:
        await until(status_is(S.UncertainNoCommunicationLastUsableValue, 35.5), timeout_s=30)
    finally:
        rig.parent.resending = True
    rig.parent.send(snapshot(rig.space, seq=161) | {"inputs": snap["inputs"]})
    await until(status_is(S.Good, 35.5))
    assert rig.parent.log_events("bms_controller_silent")


async def test_subscription_gets_a_change(rig: Rig, olivia: Client) -> None:
    seen: list[Any] = []

    class Handler:
        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            seen.append(val)

    sub = await olivia.create_subscription(100, Handler())
    try:
        await sub.subscribe_data_change(olivia.get_node(rig.nid(TELEMETRY)))
        snap = snapshot(rig.space, seq=200)
        snap["inputs"]["it_supply_temp"] = [36.25, "good", time.time()]
        rig.parent.send(snap)

        async def got() -> bool:
            return 36.25 in seen

        await until(got)
    finally:
        await sub.delete()


async def test_fast_intervals_are_revised_up(rig: Rig, olivia: Client) -> None:
    """A client asking 10 ms publishing and 1 ms sampling gets the hello's min_publishing_ms
    (100) and min_sampling_ms (250)."""
    sub = await olivia.create_subscription(10, None)
    try:
        assert sub.parameters.RequestedPublishingInterval == 100
        item = ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=rig.nid(TELEMETRY), AttributeId=ua.AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=1, SamplingInterval=1.0, QueueSize=1
            ),
        )
        params = ua.CreateMonitoredItemsParameters(
            SubscriptionId=sub.subscription_id,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToCreate=[item],
        )
        (result,) = await olivia.uaclient.create_monitored_items(params)
        assert result.StatusCode.is_good()
        assert result.RevisedSamplingInterval == 250
    finally:
        await sub.delete()


async def test_sessions_are_bounded(open_rig: Rig) -> None:
    """max_sessions (2 in this child's hello): one session more is refused, the ones open
    keep working."""
    first = await connect(open_rig.parent.endpoint, None)
    second = await connect(open_rig.parent.endpoint, None)
    try:
        with pytest.raises(ua.UaStatusCodeError):
            third = await connect(open_rig.parent.endpoint, None)
            await third.disconnect()
        assert await first.nodes.server_state.read_value() == 0
    finally:
        await first.disconnect()
        await second.disconnect()


async def test_malformed_snapshots_are_skipped(rig: Rig, olivia: Client) -> None:
    """Garbage, a non-object, a wrong section and a wrong value type never stop the server: the
    next good snapshot is served, and the one bad value is Bad (not an old value as good)."""
    rig.parent.send_raw(b"this is not json\n")
    rig.parent.send_raw(b"[1, 2, 3]\n")
    rig.parent.send({"t": "snap", "inputs": "nope"})
    snap = snapshot(rig.space, seq=300)
    snap["inputs"]["it_supply_temp"] = ["hot", "good", time.time()]
    rig.parent.send(snap)
    node = olivia.get_node(rig.nid(TELEMETRY))

    async def bad() -> bool:
        dv = await node.read_data_value(raise_on_bad_status=False)
        return dv.StatusCode.value == S.BadDataUnavailable

    await until(bad)
    snap = snapshot(rig.space, seq=301)
    snap["inputs"]["it_supply_temp"] = [33.0, "good", time.time()]
    rig.parent.send(snap)

    async def good() -> bool:
        dv = await node.read_data_value(raise_on_bad_status=False)
        return dv.StatusCode.is_good() and dv.Value.Value == 33.0

    await until(good)


# ---- writes ----


async def test_setpoint_write_becomes_a_request(rig: Rig, olivia: Client) -> None:
    """In range: one `req` with the user, cmd and args; the controller's answer is the status
    (accepted -> Good, kind range -> BadOutOfRange). The node's value is not written by the
    server on accept: the snapshot shows the controller's value."""
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    value = (p.range[0] + p.range[1]) / 2
    rig.parent.answerer = accept
    before = len(rig.parent.reqs)
    code = await write(olivia, rig.nid(SETPOINT), ua.Variant(value, ua.VariantType.Double))
    assert code == S.Good
    req = rig.parent.reqs[before]
    assert req["user"] == "olivia" and req["cmd"] == "setpoint"
    assert req["args"] == {"name": "supply_setpoint_c", "value": value}
    assert "Setpoints/supply_setpoint_c" in req["reason"]
    assert len(req["id"]) <= 64
    rig.parent.answerer = lambda r: {"ok": False, "why": "outside", "kind": "range"}
    try:
        code = await write(olivia, rig.nid(SETPOINT), ua.Variant(value, ua.VariantType.Double))
        assert code == S.BadOutOfRange
        for kind, status in (
            ("denied", S.BadUserAccessDenied),
            ("state", S.BadInvalidState),
            ("busy", S.BadTooManyOperations),
            ("type", S.BadTypeMismatch),
        ):
            rig.parent.answerer = lambda r, k=kind: {"ok": False, "why": "x", "kind": k}
            code = await write(olivia, rig.nid(SETPOINT), ua.Variant(value, ua.VariantType.Double))
            assert code == status, kind
    finally:
        rig.parent.answerer = accept


async def test_setpoint_integer_variant_is_a_number(rig: Rig, olivia: Client) -> None:
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    value = math.ceil(p.range[0])
    before = len(rig.parent.reqs)
    code = await write(olivia, rig.nid(SETPOINT), ua.Variant(value, ua.VariantType.Int32))
    assert code == S.Good
    assert rig.parent.reqs[before]["args"]["value"] == float(value)


async def test_refused_writes_never_reach_the_controller(rig: Rig, olivia: Client) -> None:
    """Out of range, NaN, infinity, a wrong type, a read-only node: refused by the server
    itself, no `req`."""
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    before = len(rig.parent.reqs)
    nid = rig.nid(SETPOINT)
    assert await write(olivia, nid, ua.Variant(p.range[1] + 1, ua.VariantType.Double)) == (
        S.BadOutOfRange
    )
    assert await write(olivia, nid, ua.Variant(math.nan, ua.VariantType.Double)) == S.BadOutOfRange
    assert await write(olivia, nid, ua.Variant(math.inf, ua.VariantType.Double)) == S.BadOutOfRange
    assert await write(olivia, nid, ua.Variant("35", ua.VariantType.String)) == S.BadTypeMismatch
    assert await write(olivia, nid, ua.Variant(True, ua.VariantType.Boolean)) == S.BadTypeMismatch
    assert await write(olivia, rig.nid(TELEMETRY), ua.Variant(1.0, ua.VariantType.Double)) == (
        S.BadUserAccessDenied
    )
    assert len(rig.parent.reqs) == before
    assert rig.parent.log_events("bms_refused"), "each refusal is logged"


async def test_per_item_status_in_one_write(rig: Rig, olivia: Client) -> None:
    """One Write with a good and a bad item: each gets its own status (asyncua would fail the
    whole batch on a raising setter)."""
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    items = [
        ua.WriteValue(
            NodeId=rig.nid(SETPOINT),
            AttributeId=ua.AttributeIds.Value,
            Value=ua.DataValue(ua.Variant(p.range[1] + 5, ua.VariantType.Double)),
        ),
        ua.WriteValue(
            NodeId=rig.nid(SETPOINT),
            AttributeId=ua.AttributeIds.Value,
            Value=ua.DataValue(ua.Variant(p.range[0], ua.VariantType.Double)),
        ),
    ]
    results = await olivia.uaclient.write(ua.WriteParameters(NodesToWrite=items))
    assert [r.value for r in results] == [S.BadOutOfRange, S.Good]


async def test_viewer_write_is_denied_without_a_request(rig: Rig) -> None:
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    c = await rig.client("victor")
    try:
        before = len(rig.parent.reqs)
        code = await write(c, rig.nid(SETPOINT), ua.Variant(p.range[0], ua.VariantType.Double))
        assert code == S.BadUserAccessDenied
        res = await call(c, "HeatLoop.AcknowledgeAlarms", ns=rig.ns)
        assert res.StatusCode.value == S.BadUserAccessDenied
        assert len(rig.parent.reqs) == before
    finally:
        await c.disconnect()


async def test_no_answer_is_bad_timeout(rig: Rig, olivia: Client) -> None:
    """A controller that never answers: BadTimeout after the 5 s bound, not a hung client."""
    p = _point(rig.space, SETPOINT)
    assert p.range is not None
    rig.parent.answerer = None
    try:
        code = await write(olivia, rig.nid(SETPOINT), ua.Variant(p.range[0], ua.VariantType.Double))
        assert code == S.BadTimeout
    finally:
        rig.parent.answerer = accept


# ---- methods ----


async def test_reset_trip_needs_an_engineer(rig: Rig, olivia: Client) -> None:
    before = len(rig.parent.reqs)
    res = await call(olivia, "HeatLoop.ResetTrip", ns=rig.ns)
    assert res.StatusCode.value == S.BadUserAccessDenied
    assert len(rig.parent.reqs) == before
    c = await rig.client("erin")
    try:
        res = await call(c, "HeatLoop.ResetTrip", ns=rig.ns)
        assert res.StatusCode.value == S.Good
        req = rig.parent.reqs[before]
        assert (req["user"], req["cmd"], req["args"]) == ("erin", "reset", {"rules": []})
        rig.parent.answerer = lambda r: {"ok": False, "why": "leak still wet", "kind": "state"}
        res = await call(c, "HeatLoop.ResetTrip", ns=rig.ns)
        assert res.StatusCode.value == S.BadInvalidState
    finally:
        rig.parent.answerer = accept
        await c.disconnect()


async def test_methods_become_requests(rig: Rig, olivia: Client) -> None:
    before = len(rig.parent.reqs)
    res = await call(olivia, "HeatLoop.AcknowledgeAlarms", ns=rig.ns)
    assert res.StatusCode.value == S.Good
    res = await call(
        olivia, "HeatLoop.RequestReject", ua.Variant(True, ua.VariantType.Boolean), ns=rig.ns
    )
    assert res.StatusCode.value == S.Good
    got = [(r["cmd"], r["args"]) for r in rig.parent.reqs[before:]]
    assert got == [("ack", {"all": True}), ("reject", {"on": True})]


async def test_bad_method_arguments(rig: Rig, olivia: Client) -> None:
    before = len(rig.parent.reqs)
    res = await call(olivia, "HeatLoop.RequestReject", ns=rig.ns)
    assert res.StatusCode.value == S.BadInvalidArgument
    res = await call(
        olivia, "HeatLoop.RequestReject", ua.Variant(1.0, ua.VariantType.Double), ns=rig.ns
    )
    assert res.StatusCode.value == S.BadInvalidArgument
    assert [r.value for r in res.InputArgumentResults] == [S.BadTypeMismatch]
    assert len(rig.parent.reqs) == before


# ---- alarms and events ----


class Events:
    def __init__(self) -> None:
        self.got: list[Any] = []

    def event_notification(self, event: Any) -> None:
        self.got.append(event)

    def of(self, condition: str) -> list[Any]:
        return [e for e in self.got if getattr(e, "ConditionName", None) == condition]


async def test_alarm_condition_event_refresh_and_acknowledge(rig: Rig, olivia: Client) -> None:
    """A standing alarm of a snapshot: an active, unacknowledged AlarmConditionType event at the
    Server object; ConditionRefresh replays it; Acknowledge with its EventId becomes `ack` of
    that alarm; once the snapshot no longer lists it, an inactive, Retain false event."""
    cond = next(c for c in rig.space.conditions if c.id == "IL-04")
    handler = Events()
    sub = await olivia.create_subscription(100, handler)
    try:
        await sub.subscribe_events(
            olivia.nodes.server, olivia.get_node(ua.NodeId(ua.ObjectIds.AlarmConditionType))
        )
        snap = snapshot(rig.space, seq=400)
        snap["alarms"] = [
            {
                "id": "IL-04",
                "state": "active_unacknowledged",
                "priority": "critical",
                "message": cond.message,
                "detail": "",
                "since_wall": time.time() - 1,
                "first_out": True,
                "shelved_until": None,
            }
        ]
        rig.parent.send(snap)

        async def active() -> Any:
            es = [e for e in handler.of("IL-04") if getattr(e, "ActiveState/Id", None)]
            return es[-1] if es else None

        ev = await until(active)
        assert getattr(ev, "AckedState/Id") is False and ev.Retain is True
        assert ev.Severity == 900 and ev.SourceNode == rig.nid(cond.source)
        assert ev.EventType == ua.NodeId(ua.ObjectIds.AlarmConditionType)
        # a reconnecting client's ConditionRefresh sees it again, same EventId
        n = len(handler.of("IL-04"))
        await olivia.get_node(ua.NodeId(ua.ObjectIds.ConditionType)).call_method(
            ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
            ua.Variant(sub.subscription_id, ua.VariantType.UInt32),
        )

        async def replayed() -> bool:
            return len(handler.of("IL-04")) > n

        await until(replayed)
        assert handler.of("IL-04")[-1].EventId == ev.EventId
        # Acknowledge (the type's method on the condition) -> ack of that alarm
        before = len(rig.parent.reqs)
        req = ua.CallMethodRequest(
            ObjectId=rig.nid(cond.node_id),
            MethodId=ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
            InputArguments=[
                ua.Variant(ev.EventId, ua.VariantType.ByteString),
                ua.Variant(ua.LocalizedText("seen, on it")),
            ],
        )
        (res,) = await olivia.uaclient.call([req])
        assert res.StatusCode.value == S.Good
        r = rig.parent.reqs[before]
        assert (r["user"], r["cmd"], r["args"], r["reason"]) == (
            "olivia",
            "ack",
            {"alarms": ["IL-04"]},
            "seen, on it",
        )
        req.InputArguments[0] = ua.Variant(b"not-an-event", ua.VariantType.ByteString)
        (res,) = await olivia.uaclient.call([req])
        assert res.StatusCode.value == S.BadEventIdUnknown
        # the instance's own Acknowledge method reaches the same handler
        req.MethodId = rig.nid(f"{cond.node_id}.Acknowledge")
        (res,) = await olivia.uaclient.call([req])
        assert res.StatusCode.value == S.BadEventIdUnknown
        assert len(rig.parent.reqs) == before + 1
        # a snapshot without an alarm list says nothing about alarms: IL-04 stays standing
        n = len(handler.of("IL-04"))
        snap = snapshot(rig.space, seq=402)
        del snap["alarms"]
        snap["inputs"]["it_supply_temp"] = [37.125, "good", time.time()]  # a marker
        rig.parent.send(snap)
        marker = olivia.get_node(rig.nid(TELEMETRY))

        async def handled() -> bool:  # snapshots are served in order
            return await marker.read_value() == 37.125

        await until(handled)
        state = olivia.get_node(rig.nid(f"{cond.node_id}.ActiveState.Id"))
        assert await state.read_value() is True
        assert len(handler.of("IL-04")) == n
        # gone from the snapshot: normal
        rig.parent.send(snapshot(rig.space, seq=401))

        async def normal() -> bool:
            es = handler.of("IL-04")
            return bool(es) and getattr(es[-1], "ActiveState/Id") is False

        await until(normal)
        last = handler.of("IL-04")[-1]
        assert last.Retain is False and getattr(last, "AckedState/Id") is True
    finally:
        await sub.delete()


async def test_mode_change_event_on_server(rig: Rig, olivia: Client) -> None:
    handler = Events()
    sub = await olivia.create_subscription(100, handler)
    try:
        await sub.subscribe_events(olivia.nodes.server)
        snap = snapshot(rig.space, seq=500)
        snap["status"]["mode"] = (
            "LEAK_TRIP" if "LEAK_TRIP" in rig.space.modes else rig.space.modes[-1]
        )
        snap["events"] = [
            {
                "kind": "mode_changed",
                "wall": time.time(),
                "message": "NORMAL_REUSE -> LEAK_TRIP",
                "fields": {"to": "LEAK_TRIP"},
            }
        ]
        rig.parent.send(snap)

        async def seen() -> bool:
            return any("NORMAL_REUSE -> LEAK_TRIP" in str(e.Message.Text) for e in handler.got)

        await until(seen)
        current = olivia.get_node(rig.nid("HeatLoop.Status.ModeMachine.CurrentState"))

        async def machine() -> bool:
            v = await current.read_value()
            return v.Text == snap["status"]["mode"]

        await until(machine)
    finally:
        await sub.delete()
        rig.parent.send(snapshot(rig.space, seq=501))


# ---- the None endpoint and anonymous sessions, when enabled ----


async def test_password_over_none_channel_refused(open_rig: Rig) -> None:
    """With allow_none_security the None endpoint is offered, and a username session over it
    is still refused (asyncua 2.1 alone would accept it)."""
    c = Client(open_rig.parent.endpoint, timeout=10)
    endpoints = await c.connect_and_get_server_endpoints()
    assert ua.MessageSecurityMode.None_ in {e.SecurityMode for e in endpoints}
    with pytest.raises(ua.UaStatusCodeError):
        c = await connect(open_rig.parent.endpoint, None, "olivia", PASSWORDS["olivia"][1])
        await c.disconnect()


async def test_anonymous_on_none_channel_can_only_read(open_rig: Rig) -> None:
    c = await connect(open_rig.parent.endpoint, None)
    try:
        ns = await c.get_namespace_index(NAMESPACE_URI)
        p = _point(open_rig.space, SETPOINT)
        assert p.range is not None
        before = len(open_rig.parent.reqs)
        code = await write(
            c, ua.NodeId(SETPOINT, ns), ua.Variant(p.range[0], ua.VariantType.Double)
        )
        assert code == S.BadSecurityModeInsufficient
        res = await call(c, "HeatLoop.AcknowledgeAlarms", ns=ns)
        assert res.StatusCode.value == S.BadSecurityModeInsufficient
        assert len(open_rig.parent.reqs) == before
        dv = await c.get_node(ua.NodeId(TELEMETRY, ns)).read_data_value(raise_on_bad_status=False)
        assert dv.StatusCode is not None  # readable
    finally:
        await c.disconnect()


# ---- the process ----


async def test_garbage_hello_exits_2(tmp_path: Path) -> None:
    parent = BmsParent({}, tmp_path / "child.log")
    await parent.start(first_line=b"\x00\xffnot a hello\n", wait_ready=False)
    assert parent.proc is not None
    async with asyncio.timeout(30):
        code = await parent.proc.wait()
    assert code == 2
    assert parent.log_events("bms_hello_refused")
    await parent.close()


async def test_hello_errors_name_the_field() -> None:
    from controller.bms_server import HelloError, parse_hello

    sp = space(load_site(ROOT / "plc_io" / "demo_site.toml"))
    good = hello(sp, Path("/tmp/x"), 4840)
    parse_hello(json.dumps(good).encode())
    bad = json.loads(json.dumps(good))
    bad["bms"]["max_sessions"] = "many"
    with pytest.raises(HelloError, match="max_sessions"):
        parse_hello(json.dumps(bad).encode())
    bad = json.loads(json.dumps(good))
    bad["space"] = {"site": 1}
    with pytest.raises(HelloError, match=r"hello\.space"):
        parse_hello(json.dumps(bad).encode())


async def test_snapshot_timestamps_are_utc() -> None:
    from controller.bms_server import data_value

    sp = space(load_site(ROOT / "plc_io" / "demo_site.toml"))
    snap = snapshot(sp, wall=1764600000.25)
    snap["inputs"]["it_supply_temp"] = [34.9, "stale", 1764600000.2]
    value, code, at = data_value(sp.point(TELEMETRY), snap)
    assert (value, code) == (34.9, S.UncertainLastUsableValue)
    assert at == datetime.fromtimestamp(1764600000.2, UTC)


async def test_a_parent_that_does_not_read_never_blocks_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes to the parent never wait: past the buffer bound `send` refuses at once, and a
    request then fails BadCommunicationError instead of hanging the OPC UA client."""
    import socket

    from controller import bms_server

    monkeypatch.setattr(bms_server, "WRITE_BOUND", 64 * 1024)
    ours, theirs = socket.socketpair()
    try:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader, writer = await asyncio.open_connection(sock=ours)
        link = bms_server.Link(reader, writer)
        sent = [link.send({"t": "alive", "sessions": 0, "pad": "x" * 1000}) for _ in range(1000)]
        assert sent[0] and not sent[-1], "the bound refuses once the parent stops reading"
        assert writer.transport.get_write_buffer_size() <= bms_server.WRITE_BOUND
        assert link.dropped == sent.count(False)
        while link.send({"t": "alive"}):  # fill what is left, to less than a request's line
            pass
        sp = space(load_site(ROOT / "plc_io" / "demo_site.toml"))
        h = bms_server.parse_hello(json.dumps(hello(sp, Path("/tmp/x"), 4840)).encode())
        bms = bms_server.BmsServer(h, link)
        code = await bms.request("olivia", "ack", {"all": True}, "test")
        assert code == S.BadCommunicationError
        writer.close()
    finally:
        theirs.close()
