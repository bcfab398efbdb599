"""The BMS address space as data (DESIGN §9): generated from the site, the rules and the alarm
catalogue; a JSON document the server process rebuilds it from, trusting nothing."""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest

from controller import authority
from controller.alarms import catalogue
from controller.bms_space import (
    CSV_HEADER,
    NAMESPACE_URI,
    ROOT,
    SEVERITY,
    Space,
    points_csv,
    points_markdown,
    space,
    unece,
    unit_id,
)
from controller.modes import Mode
from interlocks.rules import RULES
from plc_io.site import Site, demo_site, demo_site_text, loads_site
from plc_io.tags import UNITS

EXTRA_INPUT = """
[tags.hx_primary_in_temp]
direction = "input"
type = "float"
unit = "°C"
range = [-10.0, 110.0]
description = "Primary side entering the plate HX"
modbus = { table = "input", address = 40, encoding = "int16", scale = 0.01 }
"""


def _site_with(extra: str) -> Site:
    return loads_site(demo_site_text() + extra)


@pytest.fixture(scope="module")
def site() -> Site:
    return demo_site()


@pytest.fixture(scope="module")
def sp(site: Site) -> Space:
    return space(site)


def _by_path(sp: Space) -> dict[tuple[str, ...], object]:
    return {p.path: p for p in sp.points}


# ---- the tree ----


def test_every_input_is_telemetry_with_its_unit_and_range(site: Site, sp: Space) -> None:
    tele = {p.path[1]: p for p in sp.points if p.path[0] == "Telemetry"}
    assert list(tele) == [t.name for t in site.inputs]  # every input, in the file's order
    for t in site.inputs:
        p = tele[t.name]
        assert p.node_id == f"{ROOT}.Telemetry.{t.name}"
        assert p.feed == ("input", t.name) and p.access == "read" and not p.array
        if t.is_bool:
            assert (p.type, p.unit, p.unece, p.range) == ("Boolean", None, None, None)
        else:
            assert p.type == "Double" and p.unit == t.unit and p.range == (t.lo, t.hi)
            assert p.unece is not None, f"{t.name}: unit {t.unit} has no UNECE code"


def test_every_output_but_the_heartbeat_with_its_level_sibling(site: Site, sp: Space) -> None:
    outs = {p.path[1]: p for p in sp.points if p.path[0] == "Outputs"}
    names = [t.name for t in site.outputs if t.name != "heartbeat"]
    assert set(outs) == set(names) | {f"{n}_level" for n in names}
    assert "heartbeat" not in outs and "heartbeat_level" not in outs
    for t in site.outputs:
        if t.name == "heartbeat":
            continue
        p, lvl = outs[t.name], outs[f"{t.name}_level"]
        assert p.access == "read" and p.feed == ("output", t.name)  # read-only: never a command
        assert p.type == ("Boolean" if t.is_bool else "Double")
        if not t.is_bool:
            assert p.range == (t.lo, t.hi) and p.unit == t.unit
        assert lvl.type == "String" and lvl.feed == ("output_level", t.name)


def test_status_energy_and_the_contract_names(sp: Space) -> None:
    by = _by_path(sp)
    status = {p.path[1]: (p.type, p.array, p.feed) for p in sp.points if p.path[0] == "Status"}
    assert status == {
        "Mode": ("String", False, ("status", "mode")),
        "ModeSince": ("DateTime", False, ("status", "mode_since")),
        "TripLatched": ("Boolean", False, ("status", "trip_latched")),
        "ActiveInterlocks": ("String", True, ("status", "active_interlocks")),
        "PlcCommsOk": ("Boolean", False, ("status", "plc_comms_ok")),
        "ScanOverruns": ("UInt64", False, ("status", "scan_overruns")),
    }
    assert [p for p in sp.points if p.array] == [by[("Status", "ActiveInterlocks")]]
    energy = {p.path[1]: p for p in sp.points if p.path[0] == "Energy"}
    assert list(energy) == [
        "HeatDelivered_kWh",
        "HeatRejected_kWh",
        "ItEnergy_kWh",
        "HeatLoopAvailability_pct",
    ]
    for name, p in energy.items():
        assert p.type == "Double" and p.feed == ("energy", name)
        assert p.unit == ("%" if name.endswith("_pct") else "kWh")
    assert energy["HeatLoopAvailability_pct"].range == (0.0, 100.0)
    assert sp.modes == tuple(m.value for m in Mode)
    assert sp.site == "demo-edge-pool"


def test_setpoints_are_the_only_writable_points_with_the_authority_bounds(
    site: Site, sp: Space
) -> None:
    bounds = authority.Limits.from_site(site).setpoints
    sps = {p.path[1]: p for p in sp.points if p.path[0] == "Setpoints"}
    assert (
        list(sps) == list(authority.SETPOINTS) == ["supply_setpoint_c", "secondary_pump_speed_pct"]
    )
    for name, p in sps.items():
        assert p.access == "write" and p.type == "Double" and p.feed == ("setpoint", name)
        assert p.range == tuple(bounds[name])
        assert (p.unit, p.description) == authority.SETPOINTS[name]
    assert sps["supply_setpoint_c"].unit == "°C"
    assert sps["secondary_pump_speed_pct"].unit == "%"
    # the supply setpoint can never be asked at or above the IL-01 trip limit
    assert sps["supply_setpoint_c"].range[1] < site.interlocks.it_supply_high_c
    writable = {p.node_id for p in sp.points if p.access == "write"}
    assert writable == {p.node_id for p in sps.values()}


def test_setpoints_follow_the_site_limits() -> None:
    """A site with a lower IT-supply trip limit gets a lower setpoint ceiling: generated."""
    text = demo_site_text()
    base = space(loads_site(text)).point("HeatLoop.Setpoints.supply_setpoint_c").range
    site = loads_site(text.replace("it_supply_high_c = 45.0", "it_supply_high_c = 42.0", 1))
    lowered = space(site).point("HeatLoop.Setpoints.supply_setpoint_c").range
    assert lowered == tuple(authority.Limits.from_site(site).setpoints["supply_setpoint_c"])
    assert lowered[1] == pytest.approx(base[1] - 3.0)


def test_every_rule_is_an_interlock_object(sp: Space) -> None:
    for r in RULES:
        kids = {p.path[2]: p for p in sp.points if p.path[:2] == ("Interlocks", r.id)}
        assert set(kids) == {"Active", "Latched", "Bypassed", "Description"}
        for k in ("Active", "Latched", "Bypassed"):
            assert kids[k].type == "Boolean" and kids[k].feed == ("interlock", r.id, k.lower())
        d = kids["Description"]
        assert d.type == "String" and d.feed == ("static",) and isinstance(d.value, str)
        assert r.hazard in d.value and r.cause_text in d.value
        assert ("never bypassable" in d.value.lower()) == (not r.bypassable)


def test_methods(sp: Space) -> None:
    ms = {m.name: m for m in sp.methods}
    assert list(ms) == ["ResetTrip", "AcknowledgeAlarms", "RequestReject"]
    assert {n: m.cmd for n, m in ms.items()} == {
        "ResetTrip": "reset",
        "AcknowledgeAlarms": "ack",
        "RequestReject": "reject",
    }
    assert ms["RequestReject"].inputs[0][:2] == ("Reject", "Boolean")
    assert ms["ResetTrip"].inputs == () == ms["AcknowledgeAlarms"].inputs
    assert all(m.node_id == f"{ROOT}.{m.name}" for m in ms.values())


def test_every_catalogue_alarm_is_a_condition_exactly_once(site: Site, sp: Space) -> None:
    defs = catalogue(RULES, site.inputs, site.outputs)
    ids = [c.id for c in sp.conditions]
    assert ids == list(defs) and len(set(ids)) == len(ids)
    nodes = {p.node_id for p in sp.points} | {f"{ROOT}.Interlocks.{r.id}" for r in RULES}
    for c in sp.conditions:
        d = defs[c.id]
        assert c.priority == d.priority.name.lower() and c.message == d.message
        assert c.severity == SEVERITY[c.priority]
        assert c.node_id == f"{ROOT}.Alarms.{c.id}"
        assert c.source == ROOT or c.source in nodes
    sev = {c.id: (c.severity, c.source) for c in sp.conditions}
    assert sev["IL-04"] == (900, f"{ROOT}.Interlocks.IL-04")  # critical
    assert sev["INPUT:it_supply_temp"] == (700, f"{ROOT}.Telemetry.it_supply_temp")  # high
    assert sev["BYPASS:IL-03"] == (300, f"{ROOT}.Interlocks.IL-03")  # low
    assert sev["FORCE:reuse_valve_cmd"] == (300, f"{ROOT}.Outputs.reuse_valve_cmd")
    assert sev["PLC-LINK"] == (700, ROOT)
    assert sev["VALVE-FAULT"][0] == 500  # medium
    assert set(SEVERITY) == {"critical", "high", "medium", "low"}
    assert SEVERITY == {"critical": 900, "high": 700, "medium": 500, "low": 300}


def test_an_extra_input_tag_is_an_extra_telemetry_point_and_alarm(sp: Space) -> None:
    bigger = space(_site_with(EXTRA_INPUT))
    p = bigger.point("HeatLoop.Telemetry.hx_primary_in_temp")
    assert (p.unit, p.range, p.unece) == ("°C", (-10.0, 110.0), unece("°C"))
    assert len(bigger.points) == len(sp.points) + 1
    assert {c.id for c in bigger.conditions} - {c.id for c in sp.conditions} == {
        "INPUT:hx_primary_in_temp",
        "FORCE:hx_primary_in_temp",
    }


def test_a_browse_name_collision_is_refused_naming_both() -> None:
    clash = """
[tags.reuse_valve_cmd_level]
direction = "input"
type = "float"
unit = "%"
range = [0.0, 100.0]
modbus = { table = "input", address = 40, encoding = "uint16" }
"""
    site = _site_with(clash)
    space(site)  # an input of that name lives in Telemetry: no clash yet
    out = clash.replace('"input"', '"output"').replace('table = "output"', 'table = "holding"')
    out = out.replace("address = 40", "address = 60")
    out += "safe = 0.0\n"
    with pytest.raises(ValueError) as e:
        space(_site_with(out))
    msg = str(e.value)
    assert (
        "Outputs/reuse_valve_cmd_level" in msg and msg.count("Outputs/reuse_valve_cmd_level") == 2
    )
    assert "HeatLoop.Outputs.reuse_valve_cmd_level" in msg and "\n" not in msg


# ---- units ----


def test_unit_ids_follow_the_ua_encoding_of_unece_codes() -> None:
    # OPC 10000-8 §5.6.3: UnitId = the code's characters as bytes of an Int32, big end first
    assert unit_id("CEL") == 0x43454C == 4408652  # the spec's own example (degree Celsius)
    assert unece("°C") == (4408652, "CEL")
    assert unece("m³/h") == (0x4D5148, "MQH")
    assert unece("bar") == (0x424152, "BAR")
    assert unece("kW") == (0x4B5754, "KWT")
    assert unece("kWh") == (0x4B5748, "KWH")
    assert unece("%") == (0x5031, "P1")


def test_every_demo_unit_maps_and_an_unknown_one_is_none(site: Site) -> None:
    for t in site.tags:
        if t.unit != "bool":
            assert unece(t.unit) is not None, t.unit
    for u in UNITS - {"bool"}:
        assert unece(u) is not None, u
    assert unece("furlong/fortnight") is None and unece(None) is None and unece("bool") is None


# ---- the JSON document ----


@pytest.mark.parametrize("extra", ["", EXTRA_INPUT])
def test_json_round_trip_is_exact(extra: str) -> None:
    sp = space(_site_with(extra))
    doc = json.loads(json.dumps(sp.to_json()))  # what crosses the socket
    back = Space.from_json(doc)
    assert back == sp
    assert back.to_json() == sp.to_json()


def _bad(mutate) -> str:
    doc = space(demo_site()).to_json()
    doc = copy.deepcopy(doc)
    mutate(doc)
    with pytest.raises(ValueError) as e:
        Space.from_json(doc)
    msg = str(e.value)
    assert "\n" not in msg and "expected" in msg
    return msg


def _set(path, value):
    def go(doc):
        d = doc
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return go


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set(["points", 7, "range"], [0, "x"]), "space.points[7].range[1]"),
        (_set(["points", 7, "range"], [0, math.nan]), "space.points[7].range[1]"),
        (_set(["points", 7, "range"], [5.0, 1.0]), "space.points[7].range"),
        (_set(["points", 7, "type"], "Int99"), "space.points[7].type"),
        (_set(["points", 7, "access"], "admin"), "space.points[7].access"),
        (_set(["points", 7, "array"], "yes"), "space.points[7].array"),
        (_set(["points", 7, "unece"], [1, "CEL"]), "space.points[7].unece"),
        (_set(["points", 7, "node_id"], "HeatLoop.Other"), "space.points[7].node_id"),
        (_set(["points", 7, "path"], []), "space.points[7].path"),
        (_set(["points", 7, "feed"], [1]), "space.points[7].feed[0]"),
        (_set(["points", 7, "value"], {"a": 1}), "space.points[7].value"),
        (_set(["points", 7, "surprise"], 1), "space.points[7].surprise"),
        (_set(["methods", 2, "inputs"], [["Reject", "Boolean"]]), "space.methods[2].inputs[0]"),
        (_set(["conditions", 0, "severity"], True), "space.conditions[0].severity"),
        (_set(["conditions", 0, "severity"], 5000), "space.conditions[0].severity"),
        (_set(["conditions", 0, "priority"], "urgent"), "space.conditions[0].priority"),
        (_set(["conditions", 0, "source"], "Elsewhere"), "condition IL-01 source"),
        (_set(["modes"], "STARTUP"), "space.modes"),
        # no document makes an output (or anything but a setpoint) writable
        (_set(["points", 40, "access"], "write"), "access 'write': expected 'read'"),
        (_set(["points", 6, "access"], "write"), "Telemetry/it_supply_temp access 'write'"),
        (_set(["site"], None), "space.site"),
    ],
)
def test_from_json_names_the_bad_field(mutate, field: str) -> None:
    assert field in _bad(mutate)


def test_from_json_refuses_garbage_and_duplicates() -> None:
    for junk in (None, [], "space", 3, {"site": "x"}):
        with pytest.raises(ValueError, match="space"):
            Space.from_json(junk)

    def dup(doc):
        doc["points"].append(doc["points"][0])

    assert "HeatLoop.Status.Mode" in _bad(dup)

    def missing(doc):
        del doc["conditions"]

    assert "space.conditions" in _bad(missing)


def test_point_lookup(sp: Space) -> None:
    assert sp.point("HeatLoop.Status.Mode").path == ("Status", "Mode")
    with pytest.raises(KeyError):
        sp.point("HeatLoop.Status.Nothing")


# ---- the points list ----


def test_points_csv_has_one_row_per_point_method_and_condition(sp: Space) -> None:
    text = points_csv(sp)
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_HEADER
    assert rows[0] == [
        "browse path",
        "node id",
        "data type",
        "unit",
        "range",
        "access",
        "description",
    ]
    body = rows[1:]
    assert len(body) == len(sp.points) + len(sp.methods) + len(sp.conditions)
    by_node = {r[1]: r for r in body}
    assert len(by_node) == len(body)
    t = by_node[f"nsu={NAMESPACE_URI};s=HeatLoop.Telemetry.it_supply_temp"]
    assert t[0] == "Objects/HeatLoop/Telemetry/it_supply_temp"
    assert t[2:6] == ["Double", "°C (CEL)", "-20 .. 120", "read"]
    sp_row = by_node["nsu=urn:heatloop;s=HeatLoop.Setpoints.supply_setpoint_c"]
    assert sp_row[5] == "write"
    arr = by_node["nsu=urn:heatloop;s=HeatLoop.Status.ActiveInterlocks"]
    assert arr[2] == "String[]"
    rej = by_node["nsu=urn:heatloop;s=HeatLoop.RequestReject"]
    assert rej[0] == "Objects/HeatLoop/RequestReject" and rej[2] == "Method"
    assert "Reject: Boolean" in rej[6]
    cond = by_node["nsu=urn:heatloop;s=HeatLoop.Alarms.IL-04"]
    assert cond[2] == "Condition" and "severity 900" in cond[6]


def test_points_markdown_is_one_table_row_per_entry(sp: Space) -> None:
    md = points_markdown(sp)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| browse path | node id |")
    assert len(lines) == 2 + len(sp.points) + len(sp.methods) + len(sp.conditions)
    assert all(line.count(" | ") >= 6 for line in lines[2:])
