"""`heatloop bms export`'s engine: the NodeSet2 XML imports into a real OPC UA server (asyncua,
initialised, never started: no socket) and carries every point; the points list parses."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from asyncua import Server, ua

from controller.bms_export import ExportError, export, file_stem, nodeset_xml
from controller.bms_space import NAMESPACE_URI, Space, space
from plc_io.site import Site, demo_site, demo_site_text, loads_site

UA_TYPES = {
    "Double": ua.ObjectIds.Double,
    "Boolean": ua.ObjectIds.Boolean,
    "String": ua.ObjectIds.String,
    "DateTime": ua.ObjectIds.DateTime,
    "UInt64": ua.ObjectIds.UInt64,
}


@pytest.fixture(scope="module")
def site() -> Site:
    return demo_site()


def test_export_writes_both_files_named_after_the_site(site: Site, tmp_path: Path) -> None:
    xml, pts = export(site, tmp_path / "out")
    assert xml == tmp_path / "out" / "heatloop-demo-edge-pool.NodeSet2.xml"
    assert pts == tmp_path / "out" / "heatloop-demo-edge-pool-points.csv"
    assert xml.read_bytes().startswith(b"<?xml") and pts.stat().st_size > 0
    assert sorted(p.name for p in xml.parent.iterdir()) == sorted([xml.name, pts.name])  # no temps


async def test_the_nodeset_imports_and_every_point_resolves(site: Site, tmp_path: Path) -> None:
    sp = space(site)
    xml, _ = export(site, tmp_path)
    server = Server()
    await server.init()
    try:
        await server.import_xml(str(xml))
        idx = await server.get_namespace_index(NAMESPACE_URI)
        root = server.get_node(ua.NodeId("HeatLoop", idx))
        # organised by the Objects folder, so a browse from Objects finds it
        assert root in await server.nodes.objects.get_children()
        for p in sp.points:
            node = server.get_node(ua.NodeId(p.node_id, idx))
            assert await node.read_browse_name() == ua.QualifiedName(p.path[-1], idx)
            dt = await node.read_data_type()
            assert dt == ua.NodeId(UA_TYPES[p.type]), p.node_id
            assert await node.read_value_rank() == (1 if p.array else -1), p.node_id
            access = (await node.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
            assert access == (3 if p.access == "write" else 1), p.node_id
            parent = await node.get_parent()
            assert parent.nodeid == ua.NodeId(".".join(("HeatLoop", *p.path[:-1])), idx)
            if p.range is not None:
                rng = await (await node.get_child("0:EURange")).read_value()
                assert (rng.Low, rng.High) == p.range, p.node_id
            if p.unece is not None:
                eu = await (await node.get_child("0:EngineeringUnits")).read_value()
                assert eu.UnitId == p.unece[0] and eu.DisplayName.Text == p.unit
                assert eu.NamespaceUri == "http://www.opcfoundation.org/UA/units/un/cefact"
            if p.value is not None:
                assert await node.read_value() == p.value
        for t in site.inputs:  # analogue telemetry carries the tag's range and unit
            if not t.is_bool:
                node = server.get_node(ua.NodeId(f"HeatLoop.Telemetry.{t.name}", idx))
                rng = await (await node.get_child("0:EURange")).read_value()
                assert (rng.Low, rng.High) == (t.lo, t.hi)
        for m in sp.methods:
            node = server.get_node(ua.NodeId(m.node_id, idx))
            assert await node.read_node_class() == ua.NodeClass.Method
            assert (await node.get_parent()).nodeid == root.nodeid
            props = {(await c.read_browse_name()).Name: c for c in await node.get_properties()}
            if m.inputs:
                args = await props["InputArguments"].read_value()
                assert [(a.Name, a.DataType) for a in args] == [
                    (n, ua.NodeId(UA_TYPES[t])) for n, t, _ in m.inputs
                ]
            else:
                assert "InputArguments" not in props
        # each child appears once when browsing (forward and inverse references agree)
        kids = [c.nodeid for c in await root.get_children()]
        assert len(kids) == len(set(kids))
    finally:
        await server.stop()


def test_the_points_list_has_one_row_per_point_method_and_condition(
    site: Site, tmp_path: Path
) -> None:
    sp = space(site)
    _, pts = export(site, tmp_path)
    with pts.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "browse path",
        "node id",
        "data type",
        "unit",
        "range",
        "access",
        "description",
    ]
    ids = [r[1] for r in rows[1:]]
    expected = [p.node_id for p in sp.points]
    expected += [m.node_id for m in sp.methods]
    expected += [c.node_id for c in sp.conditions]
    assert ids == [f"nsu=urn:heatloop;s={n}" for n in expected]


def test_the_xml_is_well_formed_for_a_site_with_an_extra_tag(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    extra = """
[tags.hx_primary_in_temp]
direction = "input"
type = "float"
unit = "°C"
range = [-10.0, 110.0]
description = "Primary side entering the <plate> HX & more \\u0007"
modbus = { table = "input", address = 40, encoding = "int16", scale = 0.01 }
"""
    sp: Space = space(loads_site(demo_site_text() + extra))
    root = ET.fromstring(nodeset_xml(sp))
    ns = "{http://opcfoundation.org/UA/2011/03/UANodeSet.xsd}"
    ids = [el.get("NodeId") for el in root if el.get("NodeId")]
    assert "ns=1;s=HeatLoop.Telemetry.hx_primary_in_temp" in ids
    assert "ns=1;s=HeatLoop.Telemetry.hx_primary_in_temp.EURange" in ids
    assert len(ids) == len(set(ids))
    var = next(el for el in root if el.get("NodeId", "").endswith("hx_primary_in_temp"))
    # markup is escaped; a control character XML cannot carry is replaced, not written raw
    assert var.find(f"{ns}Description").text == "Primary side entering the <plate> HX & more \ufffd"


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("demo-edge-pool", "heatloop-demo-edge-pool"),
        ("../../etc/passwd", "heatloop-etc_passwd"),
        ("Pool Hall / Wing B", "heatloop-Pool_Hall_Wing_B"),
        ("Schwimmbad Zürich", "heatloop-Schwimmbad_Z_rich"),
        ("...", "heatloop-site"),
    ],
)
def test_file_names_are_sanitised(name: str, stem: str) -> None:
    assert file_stem(name) == stem


def test_an_odd_site_name_stays_inside_out_dir(tmp_path: Path) -> None:
    text = demo_site_text().replace('name = "demo-edge-pool"', 'name = "../up/ and: away"', 1)
    site = loads_site(text)
    assert site.site.name == "../up/ and: away"
    out = tmp_path / "out"
    xml, pts = export(site, out)
    assert xml.parent == out and pts.parent == out
    assert xml.name == "heatloop-up_and_away.NodeSet2.xml"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_unwritable_out_dir_is_one_clear_error(site: Site, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(ExportError) as e:
            export(site, bad)
        msg = str(e.value)
        assert msg.startswith(f"out_dir {str(bad)!r}: expected a writable directory")
        assert "\n" not in msg
    assert blocker.read_text() == "not a directory"  # left alone


def test_export_needs_no_opc_ua_stack(tmp_path: Path) -> None:
    """The CLI's export is offline: asyncua is never imported, no server, no network."""
    code = (
        "import sys; from pathlib import Path; from controller.bms_export import export; "
        "from plc_io.site import demo_site; export(demo_site(), Path(sys.argv[1])); "
        "assert 'asyncua' not in sys.modules, 'asyncua imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert len(list(tmp_path.iterdir())) == 2


NODEOPCUA = Path(__file__).resolve().parent.parent / "hil" / "nodeopcua"
# Loads the standard nodeset and ours into a node-opcua address space (an independent
# implementation) and reports what it made of each node id given.
_LOAD = r"""
import { AddressSpace } from "node-opcua-address-space";
import { generateAddressSpace } from "node-opcua-address-space/nodeJS.js";
import { nodesets } from "node-opcua-nodesets";
const [file, ids] = [process.argv[1], JSON.parse(process.argv[2])];
const space = AddressSpace.create();
await generateAddressSpace(space, [nodesets.standard, file]);
const ns = space.getNamespaceIndex("urn:heatloop");
const prop = (n, name) => (n.getPropertyByName ? n.getPropertyByName(name) : null);
const out = {};
for (const id of ids) {
  const n = space.findNode(`ns=${ns};s=${id}`);
  if (!n) { out[id] = null; continue; }
  const r = { browseName: n.browseName.name, nodeClass: n.nodeClass };
  if (n.dataType) r.dataType = space.findNode(n.dataType).browseName.name;
  if (n.valueRank !== undefined) r.valueRank = n.valueRank;
  const eur = prop(n, "EURange");
  if (eur) { const v = eur.readValue().value.value; r.range = [v.low, v.high]; }
  const eu = prop(n, "EngineeringUnits");
  if (eu) r.unitId = eu.readValue().value.value.unitId;
  const args = prop(n, "InputArguments");
  if (args) r.args = args.readValue().value.value.map((a) => a.name);
  out[id] = r;
}
console.log(JSON.stringify(out));
space.dispose();
"""


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODEOPCUA / "node_modules").is_dir(),
    reason="node-opcua not installed (make test runs npm ci in tests/hil/nodeopcua)",
)
def test_the_nodeset_loads_into_node_opcua(site: Site, tmp_path: Path) -> None:
    """An integrator's tool is not asyncua: the same file loads into node-opcua's address
    space, with every point's type, rank, range and unit as the space says."""
    sp = space(site)
    xml, _ = export(site, tmp_path)
    ids = [p.node_id for p in sp.points] + [m.node_id for m in sp.methods] + ["HeatLoop"]
    run = subprocess.run(
        ["node", "--input-type=module", "-e", _LOAD, str(xml), json.dumps(ids)],
        cwd=NODEOPCUA,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["HeatLoop"] == {"browseName": "HeatLoop", "nodeClass": 1}  # an Object
    for p in sp.points:
        r = got[p.node_id]
        assert r is not None, p.node_id
        assert (r["browseName"], r["nodeClass"], r["dataType"]) == (p.path[-1], 2, p.type)
        assert r["valueRank"] == (1 if p.array else -1)
        assert r.get("range") == (None if p.range is None else list(p.range)), p.node_id
        assert r.get("unitId") == (None if p.unece is None else p.unece[0]), p.node_id
    for m in sp.methods:
        r = got[m.node_id]
        assert r["nodeClass"] == 4  # a Method
        assert r.get("args", []) == [n for n, _, _ in m.inputs]
