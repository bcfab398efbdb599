"""OPC UA toward PLC-shaped address spaces: typed variables, URI-qualified node ids, no
heatloop namespace. Real sockets on 127.0.0.1 against the simulated PLC's typed layout, which,
as a real server does, takes a write only of each variable's own variant type.

A PLC program declares REAL (Float), WORD/UINT (UInt16), INT (Int16), BYTE, BOOL; an output
written as anything else is refused with BadTypeMismatch, the heartbeat included, and the PLC
holds its safe state for ever. These cases show the writes landing and the watchdog released.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua
from structlog.testing import capture_logs

from plc_io.image import ProcessImage, Quality
from plc_io.opcua import OpcuaTransport
from plc_io.site import Site, demo_site_text, loads_site
from sim.plc import SimPlc

try:  # tests/hil may or may not be a package
    from tests.hil.conftest import free_port
except ImportError:
    from conftest import free_port  # type: ignore[no-redef]

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="module")]

WATCHDOG_S = 1.0
HOLDOFF_S = 0.5

# The PLC's variables as a PLC program declares them.
TYPES = {
    "reuse_valve_cmd": "Float",  # REAL
    "primary_pump_speed_cmd": "UInt16",  # UINT, whole percent
    "secondary_pump_speed_cmd": "Int16",  # INT
    "drycooler_fan_cmd": "Byte",  # BYTE
    "heartbeat": "UInt16",  # WORD: the counter 0 … 65535 wraps with the type
    "primary_pump_a_cmd": "Boolean",  # BOOL
    "customer_isolation_cmd": "UInt16",  # a flag in a word: 0 or 1
    "it_supply_temp": "Float",
    "it_power": "UInt16",
    "leak_primary": "UInt16",  # a flag in a word, read as a boolean
}


def site_text(
    types: dict[str, str] | None = None, nodes: Callable[[str], str | None] | None = None
) -> str:
    """The demo site over OPC UA with `types` stated per tag and, if given, every tag at the
    node id `nodes(tag)`."""
    text = demo_site_text()
    for name, opcua_type in (TYPES if types is None else types).items():
        text, n = re.subn(
            rf"^\[tags\.{name}\]$",
            lambda m, t=opcua_type: f'{m[0]}\nopcua_type = "{t}"',
            text,
            flags=re.M,
        )
        assert n == 1, name
    if nodes is not None:
        for name in re.findall(r"^\[tags\.(\w+)\]$", text, flags=re.M):
            node = nodes(name)
            if node is not None:
                text = re.sub(
                    rf"^\[tags\.{name}\]$",
                    lambda m, v=node: f"{m[0]}\nopcua_node = {json.dumps(v)}",
                    text,
                    flags=re.M,
                )
    # the speed command read back after writing: its rounding to UInt16 must verify
    text = re.sub(
        r"^(\[tags\.primary_pump_speed_cmd\])$", r"\1\nverify = true", text, count=1, flags=re.M
    )
    return text.replace('transport = "modbus"', 'transport = "opcua"', 1)


def fast(site: Site) -> Site:
    """Short timeouts and a fast PLC watchdog, so a case takes about a second."""
    opcua = site.plc.opcua.model_copy(update={"publish_interval_ms": 50})
    plc = site.plc.model_copy(
        update={
            "timeout_s": 0.3,
            "reconnect_max_s": 0.4,
            "stale_after_s": 1.0,
            "watchdog_s": WATCHDOG_S,
            "watchdog_holdoff_s": HOLDOFF_S,
            "opcua": opcua,
        }
    )
    return site.model_copy(update={"plc": plc})


def make_site(**kw: Any) -> Site:
    return fast(loads_site(site_text(**kw), "<typed site>"))


SITE = make_site()
COMMANDS = {k: v for k, v in SITE.safe_outputs().items() if k != "heartbeat"}
# values a PLC variable of each type holds differently from the Double sent before
TYPED_COMMANDS = {**COMMANDS, "reuse_valve_cmd": 42.3, "primary_pump_speed_cmd": 80.6}


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def transport(site: Site, plc: SimPlc) -> OpcuaTransport:
    return OpcuaTransport(site, endpoint=f"opc.tcp://127.0.0.1:{plc.opcua_port}/")


async def released(tx: OpcuaTransport, plc: SimPlc, values: dict[str, Any]) -> dict[str, str]:
    """Write passes every 0.1 s, as the scan does, until the PLC watchdog lets go (or a
    generous bound passes); return the last pass's failures. The PLC lets go once the
    heartbeat has changed steadily for the hold-off and fresh commands came after it."""
    deadline = time.monotonic() + HOLDOFF_S + WATCHDOG_S + 3.0
    failed: dict[str, str] = {"": "no pass"}
    while time.monotonic() < deadline:
        failed = dict((await tx.write_outputs(values)).failed)
        if not plc.watchdog_tripped and not failed:
            break
        tx.resend_all()  # fresh commands after a steady heartbeat, as the runtime sends them
        await asyncio.sleep(0.1)
    return failed


async def settled(tx: OpcuaTransport, pred: Callable[[ProcessImage], bool]) -> ProcessImage:
    deadline = time.monotonic() + 4.0
    while True:
        img = await tx.read_inputs()
        if pred(img) or time.monotonic() > deadline:
            return img
        await asyncio.sleep(0.05)


def all_good(img: ProcessImage) -> bool:
    return all(img[t.name].quality is Quality.GOOD for t in SITE.inputs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc() -> AsyncIterator[SimPlc]:
    async with SimPlc(SITE, modbus_port=free_port(), opcua_port=free_port()) as p:
        yield p


@pytest_asyncio.fixture(loop_scope="module")
async def tx(plc: SimPlc) -> AsyncIterator[OpcuaTransport]:
    t = transport(SITE, plc)
    await t.connect()
    yield t
    await t.close()


async def test_typed_writes_land_and_the_heartbeat_releases_the_watchdog(
    plc: SimPlc, tx: OpcuaTransport
) -> None:
    # (the PLC shows its safe values while it holds them; the speed's read-back matches
    # only once released, so the commands go after the release)
    failed = await released(tx, plc, COMMANDS)
    assert not failed, failed
    assert not plc.watchdog_tripped, "the heartbeat did not land: the PLC holds its safe state"
    r = await tx.write_outputs(TYPED_COMMANDS)
    assert not r.failed, r.failed  # 80.6 % goes as 81 and reads back as 81: verified
    cmd = plc.commanded()
    assert cmd["reuse_valve_cmd"] == f32(42.3)  # a REAL holds the nearest float32
    assert cmd["primary_pump_speed_cmd"] == 81.0  # a UINT holds whole percent, rounded
    assert cmd["primary_pump_a_cmd"] is True and cmd["customer_isolation_cmd"] is False
    beats = []
    for _ in range(3):  # the heartbeat lands every pass, as UInt16
        r = await tx.write_outputs(TYPED_COMMANDS)
        assert "heartbeat" in r.written and not r.failed
        beats.append(plc.commanded()["heartbeat"])
    assert len(set(beats)) == 3
    back = await tx.read_outputs()
    assert back["reuse_valve_cmd"].quality is Quality.GOOD
    assert back["reuse_valve_cmd"].value == pytest.approx(42.3, abs=1e-5)
    assert back["primary_pump_speed_cmd"].value == 81.0
    assert back["customer_isolation_cmd"].value is False  # a UInt16 0 read as a flag
    # inputs of every type read as the tag's kind: a UInt16 0/1 as a boolean
    img = await settled(tx, all_good)
    assert {t.name: img[t.name].quality for t in SITE.inputs if not all_good(img)} == {}
    assert isinstance(img.value("leak_primary"), bool)
    assert isinstance(img.value("it_power"), float)
    assert img.value("it_power") == round(img.value("it_power"))  # a UINT: whole kW


async def test_the_heartbeat_counter_wraps_with_uint16(plc: SimPlc, tx: OpcuaTransport) -> None:
    """The transport counts 0 … range high (65535) and wraps to 0: every count fits a WORD."""
    await released(tx, plc, COMMANDS)
    tx._out.heartbeat = 65533  # the transport's own counter, two counts before the wrap
    seen = []
    for _ in range(4):
        r = await tx.write_outputs(COMMANDS)
        assert "heartbeat" in r.written and not r.failed, r.failed
        seen.append(plc.commanded()["heartbeat"])
    assert seen == [65534.0, 65535.0, 0.0, 1.0]
    assert not plc.watchdog_tripped


@pytest.mark.parametrize(
    ("tag", "value", "reason"),
    [
        ("primary_pump_speed_cmd", 70000.0, "out of range for UInt16: 70000 is outside 0…65535"),
        ("primary_pump_speed_cmd", -1.0, "out of range for UInt16: -1 is outside 0…65535"),
        ("secondary_pump_speed_cmd", -40000.0, "out of range for Int16: -40000"),
        ("drycooler_fan_cmd", 256.0, "out of range for Byte: 256 is outside 0…255"),
        ("reuse_valve_cmd", 1e39, "out of range for Float: 1e+39"),
    ],
)
async def test_a_value_the_plc_variable_cannot_hold_is_never_sent(
    plc: SimPlc, tx: OpcuaTransport, tag: str, value: float, reason: str
) -> None:
    await released(tx, plc, COMMANDS)
    before = plc.commanded()
    with capture_logs() as logs:
        r = await tx.write_outputs({**COMMANDS, tag: value})
    assert r.failed[tag].startswith(reason), r.failed
    # a command that did not reach the PLC withholds the heartbeat: the PLC is not told
    # "my commands arrived" while one of them is missing
    assert r.failed["heartbeat"].startswith(f"withheld: {tag}")
    assert plc.commanded()[tag] == before[tag]
    assert plc.commanded()["heartbeat"] == before["heartbeat"]
    causes = [e for e in logs if e.get("where") == f"write {tag}"]
    assert len(causes) == 1 and reason in causes[0]["cause"], logs
    r = await tx.write_outputs(COMMANDS)
    assert not r.failed and "heartbeat" in r.written


async def test_an_opcua_type_the_node_does_not_have_is_named(plc: SimPlc) -> None:
    """The site says LREAL (Double) where the PLC has REAL (Float): the output is unresolved
    with one log line naming both types, never written as the wrong type; an input likewise."""
    site = make_site(types={**TYPES, "reuse_valve_cmd": "Double", "it_supply_temp": "Double"})
    t = transport(site, plc)
    with capture_logs() as logs:
        await t.connect()
        try:
            r = await t.write_outputs(COMMANDS)
            img = await t.read_inputs()
        finally:
            await t.close()
    want = "opcua_type Double but the node's DataType is Float"
    assert want in r.failed["reuse_valve_cmd"], r.failed
    assert r.failed["heartbeat"].startswith("withheld: reuse_valve_cmd")
    assert "primary_pump_speed_cmd" in r.written  # the rest of the pass goes on
    assert img["it_supply_temp"].quality is Quality.BAD_REPLY
    assert img["it_return_temp"].quality is Quality.GOOD
    for name in ("reuse_valve_cmd", "it_supply_temp"):
        lines = [e for e in logs if e.get("where") == f"node {name}"]
        assert len(lines) == 1 and want in lines[0]["cause"], logs


def s7_node(uri: str) -> Callable[[str], str]:
    """Siemens S7-1500 style: a data block's members, quoted, in the PLC's own namespace."""
    return lambda name: f'nsu={uri};s="DB_Heat"."{name}"'


async def test_nsu_ids_resolve_on_a_plc_without_the_heatloop_namespace() -> None:
    """Every tag at its own `nsu=` id, Siemens quotes included, on a PLC that has no
    urn:heatloop:plc: it connects, reads and writes, and the watchdog lets go. The namespace
    index is looked up at every connect: a PLC restarted with its namespace at another index
    is found again."""
    uri = "http://www.siemens.com/simatic-s7-opcua"
    site = make_site(nodes=s7_node(uri))
    port = free_port()
    # first PLC: its own namespace first (index 2), the S7 one after it (index 3)
    first = SimPlc(site, modbus_port=free_port(), opcua_port=port, opcua_namespace="urn:vendor:plc")
    async with first:
        t = transport(site, first)
        await t.connect()
        try:
            assert t._nodes["heartbeat"].NamespaceIndex == 3
            img = await settled(t, all_good)
            assert all_good(img), {n: s.quality for n, s in img.items()}
            assert not await released(t, first, COMMANDS)
            assert not (await t.write_outputs(TYPED_COMMANDS)).failed
            assert not first.watchdog_tripped
            assert first.commanded()["reuse_valve_cmd"] == f32(42.3)
            await first.stop()
            # the same PLC after a firmware update: the S7 namespace is now at index 2
            second = SimPlc(site, modbus_port=free_port(), opcua_port=port, opcua_namespace=uri)
            async with second:
                img = await settled(t, all_good)
                assert all_good(img), {n: s.quality for n, s in img.items()}
                assert t._nodes["heartbeat"].NamespaceIndex == 2
                assert not await released(t, second, COMMANDS)
                assert not second.watchdog_tripped
        finally:
            await t.close()


async def test_an_unknown_namespace_uri_is_named_and_the_rest_works(plc: SimPlc) -> None:
    site = make_site(
        nodes=lambda name: (
            "nsu=urn:nobody:plc;s=PLC.it_return_temp" if name == "it_return_temp" else None
        )
    )
    t = transport(site, plc)
    with capture_logs() as logs:
        await t.connect()
        try:
            img = await settled(t, lambda i: i["it_supply_temp"].quality is Quality.GOOD)
        finally:
            await t.close()
    assert img["it_return_temp"].quality is Quality.BAD_REPLY
    assert img["it_supply_temp"].quality is Quality.GOOD
    lines = [e for e in logs if e.get("where") == "node it_return_temp"]
    assert (
        len(lines) == 1
        and "'urn:nobody:plc' is not in the PLC's NamespaceArray" in (lines[0]["cause"])
    ), logs


async def test_a_variable_redeclared_with_another_type_is_read_again(plc: SimPlc) -> None:
    """A PLC program download turns the valve's REAL into an LREAL under the same node id:
    the write refused as mistyped is not retried blindly; the DataType is read again within
    a verification period and the command lands as the new type (where the site does not
    state `opcua_type`); where it does, the output stays refused, naming both types."""
    untyped = make_site(types={k: v for k, v in TYPES.items() if k != "reuse_valve_cmd"})
    t, typed = transport(untyped, plc), transport(SITE, plc)
    await t.connect()
    await typed.connect()
    try:
        assert not await released(t, plc, COMMANDS)
        await plc._opcua.retype("reuse_valve_cmd", ua.VariantType.Double)
        r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 42.3})
        assert r.failed["reuse_valve_cmd"] == "exception: BadTypeMismatch", r.failed
        assert "heartbeat" in r.failed
        deadline = time.monotonic() + SITE.plc.stale_after_s + 3.0
        while time.monotonic() < deadline:
            await t.read_inputs()  # the verification period reads the DataType again
            r = await t.write_outputs({**COMMANDS, "reuse_valve_cmd": 42.3})
            if not r.failed:
                break
            await asyncio.sleep(0.1)
        assert not r.failed, r.failed
        assert plc.commanded()["reuse_valve_cmd"] == 42.3  # an LREAL holds it exactly
        want = "opcua_type Float but the node's DataType is Double"
        deadline = time.monotonic() + SITE.plc.stale_after_s + 3.0
        while time.monotonic() < deadline:
            r = await typed.write_outputs({**COMMANDS, "reuse_valve_cmd": 40.0})
            if want in r.failed.get("reuse_valve_cmd", ""):
                break
            await typed.read_inputs()
            await asyncio.sleep(0.1)
        assert want in r.failed["reuse_valve_cmd"], r.failed
        assert plc.commanded()["reuse_valve_cmd"] == 42.3  # nothing sent as a Float
    finally:
        await t.close()
        await typed.close()
        await plc._opcua.retype("reuse_valve_cmd", ua.VariantType.Float)


async def test_the_simulated_plc_takes_only_each_variables_own_type(plc: SimPlc) -> None:
    """As a real server: a Double for a REAL, a Boolean for a WORD flag, a Float for a WORD
    are BadTypeMismatch; the variable's own type is taken (what the transport now sends)."""
    ns = plc._opcua.ns
    async with Client(f"opc.tcp://127.0.0.1:{plc.opcua_port}/", timeout=2) as c:

        async def write(tag: str, variant: ua.Variant) -> str:
            node = ua.NodeId(f"PLC.{tag}", ns)
            (st,) = await c.uaclient.write_attributes(
                [node], [ua.DataValue(variant)], ua.AttributeIds.Value
            )
            return st.name

        dt = await c.get_node(ua.NodeId("PLC.reuse_valve_cmd", ns)).read_data_type_as_variant_type()
        assert dt is ua.VariantType.Float
        assert await write("reuse_valve_cmd", ua.Variant(0.0, ua.VariantType.Double)) == (
            "BadTypeMismatch"
        )
        assert await write("customer_isolation_cmd", ua.Variant(False)) == "BadTypeMismatch"
        assert await write("heartbeat", ua.Variant(5.0, ua.VariantType.Float)) == (
            "BadTypeMismatch"
        )
        assert await write("reuse_valve_cmd", ua.Variant(0.0, ua.VariantType.Float)) == "Good"
        assert await write("customer_isolation_cmd", ua.Variant(0, ua.VariantType.UInt16)) == (
            "Good"
        )
        assert await write("customer_isolation_cmd", ua.Variant(2, ua.VariantType.UInt16)) == (
            "BadOutOfRange"
        )
