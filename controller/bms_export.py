"""The integrator's artefacts of the BMS address space: a NodeSet2 XML and a points list (CSV).

`heatloop bms export --site SITE` calls `export`. Both files are written from the same
`controller.bms_space.Space` the OPC UA server serves, so they cannot drift from it. Export is
offline and fast: no asyncua, no network, no server; the XML is written with ElementTree.

What the NodeSet2 holds: the `HeatLoop` object (organised by the Objects folder, i=85), its
folders, one object per interlock, every variable with its DataType, ValueRank, AccessLevel,
Description and, where the space gives them, the `EngineeringUnits` (EUInformation, UNECE Rec 20
code) and `EURange` (Range) properties, and the methods with their `InputArguments`. The alarm
conditions are not nodes of the NodeSet (a condition instance carries the whole
AlarmConditionType structure, which the server builds at run time); the points list names each
one with its priority, severity and source.
"""

from __future__ import annotations

import os
import re
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from controller.bms_space import (
    NAMESPACE_URI,
    ROOT,
    UNECE_NAMESPACE,
    UNIT_NAMES,
    Point,
    Space,
    node_id_of,
    points_csv,
    space,
)
from plc_io.site import Site

UANODESET = "http://opcfoundation.org/UA/2011/03/UANodeSet.xsd"
UAX = "http://opcfoundation.org/UA/2008/02/Types.xsd"

# Standard nodes (OPC 10000-6 NodeIds.csv).
OBJECTS_FOLDER = "i=85"
FOLDER_TYPE = "i=61"
BASE_OBJECT_TYPE = "i=58"
BASE_DATA_VARIABLE_TYPE = "i=63"
ANALOG_ITEM_TYPE = "i=2368"  # a Double with EURange (mandatory) and EngineeringUnits
PROPERTY_TYPE = "i=68"
EU_INFORMATION_XML = "i=888"  # EUInformation, Default XML encoding
RANGE_XML = "i=885"
ARGUMENT_XML = "i=297"

ALIASES = {
    "Boolean": "i=1",
    "UInt64": "i=9",
    "Double": "i=11",
    "String": "i=12",
    "DateTime": "i=13",
    "Organizes": "i=35",
    "HasTypeDefinition": "i=40",
    "HasProperty": "i=46",
    "HasComponent": "i=47",
    "Argument": "i=296",
    "Range": "i=884",
    "EUInformation": "i=887",
}
ACCESS_LEVEL = {"read": 1, "write": 3}  # CurrentRead, CurrentRead | CurrentWrite
NS = 1  # urn:heatloop is the NodeSet's first (only) namespace

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ExportError(ValueError):
    """The artefacts cannot be written; one line naming the path and the reason."""


def file_stem(site_name: str) -> str:
    """`heatloop-<site name>` with anything but letters, digits, '.', '_' and '-' replaced, so a
    site name never names a path elsewhere (no '/', no leading dot, bounded length)."""
    safe = _UNSAFE.sub("_", site_name).strip("._-")[:100] or "site"
    return f"heatloop-{safe}"


def _nid(node_id: str) -> str:
    return f"ns={NS};s={node_id}"


def _q(tag: str) -> str:
    return f"{{{UANODESET}}}{tag}"


def _x(tag: str) -> str:
    return f"{{{UAX}}}{tag}"


# Characters XML 1.0 cannot carry at all (ElementTree would write them and break the file); a
# description from the site file may hold one through a TOML escape such as "\u0007".
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = _NOT_XML.sub("\ufffd", text)
    return el


def _localized(parent: ET.Element, tag: str, text: str) -> None:
    el = ET.SubElement(parent, _x(tag))
    _text(el, _x("Locale"), "en")
    _text(el, _x("Text"), text)


class _Writer:
    def __init__(self, sp: Space) -> None:
        self.sp = sp
        self.forward: dict[str, list[tuple[str, str]]] = {}  # parent node id -> (ref, child)
        self.root = ET.Element(_q("UANodeSet"))
        uris = ET.SubElement(self.root, _q("NamespaceUris"))
        _text(uris, _q("Uri"), NAMESPACE_URI)
        aliases = ET.SubElement(self.root, _q("Aliases"))
        for name, target in ALIASES.items():
            _text(aliases, _q("Alias"), target).set("Alias", name)

    def node(
        self,
        kind: str,
        node_id: str,
        browse: str,
        parent: str,
        parent_ref: str,
        description: str,
        typedef: str | None,
        *,
        ns: int = NS,
        **attrs: str,
    ) -> ET.Element:
        el = ET.SubElement(
            self.root,
            _q(kind),
            {"NodeId": node_id, "BrowseName": f"{ns}:{browse}", "ParentNodeId": parent, **attrs},
        )
        _text(el, _q("DisplayName"), browse)
        _text(el, _q("Description"), description)
        refs = ET.SubElement(el, _q("References"))
        _text(refs, _q("Reference"), parent).attrib.update(
            {"ReferenceType": parent_ref, "IsForward": "false"}
        )
        if parent != OBJECTS_FOLDER:  # the standard folder is not ours to extend
            self.forward.setdefault(parent, []).append((parent_ref, node_id))
        if typedef is not None:
            _text(refs, _q("Reference"), typedef).set("ReferenceType", "HasTypeDefinition")
        return el

    def objects(self) -> None:
        self.node(
            "UAObject",
            _nid(ROOT),
            ROOT,
            OBJECTS_FOLDER,
            "Organizes",
            f"heatloop supervisory controller, site {self.sp.site}",
            BASE_OBJECT_TYPE,
        )
        for path in self.sp.objects():
            parent = _nid(node_id_of(path[:-1]))
            folder = len(path) == 1
            self.node(
                "UAObject",
                _nid(node_id_of(path)),
                path[-1],
                parent,
                "Organizes",
                _object_description(path),
                FOLDER_TYPE if folder else BASE_OBJECT_TYPE,
            )

    def variable(self, p: Point) -> None:
        parent = _nid(node_id_of(p.path[:-1]))
        analog = p.type == "Double" and p.range is not None
        attrs = {
            "DataType": p.type,
            "AccessLevel": str(ACCESS_LEVEL[p.access]),
            "UserAccessLevel": str(ACCESS_LEVEL[p.access]),
        }
        if p.array:
            attrs |= {"ValueRank": "1", "ArrayDimensions": "0"}
        el = self.node(
            "UAVariable",
            _nid(p.node_id),
            p.path[-1],
            parent,
            "HasComponent",
            p.description,
            ANALOG_ITEM_TYPE if analog else BASE_DATA_VARIABLE_TYPE,
            **attrs,
        )
        if isinstance(p.value, str):
            _text(ET.SubElement(el, _q("Value")), _x("String"), p.value)
        if p.range is not None:
            self.range_property(p)
        if p.unit is not None and p.unece is not None:
            self.unit_property(p)

    def _property(self, owner: Point | str, name: str, datatype: str, **attrs: str) -> ET.Element:
        owner_id = owner.node_id if isinstance(owner, Point) else owner
        el = self.node(
            "UAVariable",
            _nid(f"{owner_id}.{name}"),
            name,
            _nid(owner_id),
            "HasProperty",
            name,
            PROPERTY_TYPE,
            ns=0,
            DataType=datatype,
            AccessLevel="1",
            UserAccessLevel="1",
            **attrs,
        )
        return el

    def range_property(self, p: Point) -> None:
        assert p.range is not None
        el = self._property(p, "EURange", "Range")
        body = _ext_object(ET.SubElement(el, _q("Value")), RANGE_XML, "Range")
        _text(body, _x("Low"), repr(p.range[0]))
        _text(body, _x("High"), repr(p.range[1]))

    def unit_property(self, p: Point) -> None:
        assert p.unit is not None and p.unece is not None
        el = self._property(p, "EngineeringUnits", "EUInformation")
        body = _ext_object(ET.SubElement(el, _q("Value")), EU_INFORMATION_XML, "EUInformation")
        _text(body, _x("NamespaceUri"), UNECE_NAMESPACE)
        _text(body, _x("UnitId"), str(p.unece[0]))
        _localized(body, "DisplayName", p.unit)
        _localized(body, "Description", UNIT_NAMES.get(p.unit, p.unit))

    def methods(self) -> None:
        for m in self.sp.methods:
            self.node(
                "UAMethod",
                _nid(m.node_id),
                m.name,
                _nid(ROOT),
                "HasComponent",
                m.description,
                None,
            )
            if not m.inputs:
                continue
            el = self._property(
                m.node_id, "InputArguments", "Argument", ValueRank="1", ArrayDimensions="0"
            )
            args = ET.SubElement(ET.SubElement(el, _q("Value")), _x("ListOfExtensionObject"))
            for name, typ, desc in m.inputs:
                body = _ext_object(args, ARGUMENT_XML, "Argument")
                _text(body, _x("Name"), name)
                _text(ET.SubElement(body, _x("DataType")), _x("Identifier"), ALIASES[typ])
                _text(body, _x("ValueRank"), "-1")
                _localized(body, "Description", desc)

    def build(self) -> ET.ElementTree:
        self.objects()
        for p in self.sp.points:
            self.variable(p)
        self.methods()
        # each parent lists its children too (forward), as NodeSet2 files from modelling tools
        # do, so a reader that does not add inverse references itself still browses down
        by_id = {el.get("NodeId"): el for el in self.root}
        for source, links in self.forward.items():
            refs = by_id[source].find(_q("References"))
            assert refs is not None
            for ref, target in links:
                _text(refs, _q("Reference"), target).set("ReferenceType", ref)
        tree = ET.ElementTree(self.root)
        ET.indent(tree)  # asyncua's importer reads an ExtensionObject only with text inside
        return tree


def _ext_object(parent: ET.Element, type_id: str, name: str) -> ET.Element:
    """An ExtensionObject (in a Value or a ListOfExtensionObject) with its Body's struct."""
    ext = ET.SubElement(parent, _x("ExtensionObject"))
    _text(ET.SubElement(ext, _x("TypeId")), _x("Identifier"), type_id)
    return ET.SubElement(ET.SubElement(ext, _x("Body")), _x(name))


def _object_description(path: tuple[str, ...]) -> str:
    folders = {
        "Status": "The controller's mode, trips and PLC link",
        "Telemetry": "Every plant input as the controller reads it, with its quality",
        "Outputs": "Every command as last written to the PLC, and the level that set it",
        "Energy": "Metered and accounted energy",
        "Setpoints": "What the BMS may set (operator role), range-checked",
        "Interlocks": "The hard interlocks: state and description of each",
        "Alarms": "The alarm conditions (ISA-18.2), reported as OPC UA Alarms & Conditions",
    }
    if len(path) == 1:
        return folders.get(path[0], path[0])
    return f"Interlock {path[-1]}" if path[0] == "Interlocks" else "/".join(path)


def nodeset_xml(sp: Space) -> bytes:
    """The NodeSet2 document of this address space."""
    ET.register_namespace("", UANODESET)
    ET.register_namespace("uax", UAX)
    tree = _Writer(sp).build()
    return ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True)


def _write(path: Path, data: bytes) -> None:
    """Write atomically: a reader never sees half a file, a failure leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(site: Site, out_dir: Path) -> tuple[Path, Path]:
    """Write `heatloop-<site>.NodeSet2.xml` and `heatloop-<site>-points.csv` into `out_dir`
    (created if missing); returns both paths. ExportError if the directory cannot be written."""
    out_dir = Path(out_dir)
    sp = space(site)
    stem = file_stem(sp.site)
    xml_path, csv_path = out_dir / f"{stem}.NodeSet2.xml", out_dir / f"{stem}-points.csv"
    xml, csv = nodeset_xml(sp), points_csv(sp).encode("utf-8")
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(20, "not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        _write(xml_path, xml)
        _write(csv_path, csv)
    except OSError as e:
        raise ExportError(
            f"out_dir {str(out_dir)!r}: expected a writable directory ({e.strerror or e})"
        ) from None
    return xml_path, csv_path
