"""The BMS address space as data: every variable, method and alarm condition the OPC UA server
offers under `Objects/HeatLoop/` (DESIGN §9), generated from a site.

Theory of operation. One `Space` is built from the site's tag table, the interlock rules, the
alarm catalogue and the setpoint bounds, so nothing is listed twice: the OPC UA server process
builds its nodes from it (it receives `Space.to_json()` in its `hello`), `heatloop bms export`
writes the NodeSet2 XML and the points list from it, and the docs' points table is generated
from it. Each `Point` names where its value comes from in a controller snapshot (`feed`), so the
server needs no knowledge of the controller's internals.

Pure: no asyncua, no I/O. The server process gets the space from its parent over a socket, so
`Space.from_json` trusts nothing: a malformed document raises ValueError naming the field.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller import authority
from controller.alarms import Priority, catalogue
from controller.modes import Mode
from interlocks.rules import RULES
from plc_io.site import Site

NAMESPACE_URI = "urn:heatloop"
ROOT = "HeatLoop"
# The namespace of the UNECE Rec 20 unit codes in EUInformation (OPC 10000-8 §5.6.3).
UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"

TYPES = ("Double", "Boolean", "String", "DateTime", "UInt64")
ACCESS = ("read", "write")
PRIORITIES = ("critical", "high", "medium", "low")
# OPC UA severity (1..1000) per alarm priority.
SEVERITY: Mapping[str, int] = {"critical": 900, "high": 700, "medium": 500, "low": 300}

# The site's units (plc_io.tags.UNITS) by their UNECE Rec 20 common code. "bool" has none: a
# Boolean carries no engineering unit. A unit not listed here is served without EngineeringUnits.
UNECE_CODES: Mapping[str, str] = {
    "°C": "CEL",
    "m³/h": "MQH",
    "bar": "BAR",
    "kW": "KWT",
    "kWh": "KWH",
    "%": "P1",
    "s": "SEC",
    "count": "C62",  # "one": a dimensionless count
}
# EUInformation.Description: the unit's full name.
UNIT_NAMES: Mapping[str, str] = {
    "°C": "degree Celsius",
    "m³/h": "cubic metre per hour",
    "bar": "bar",
    "kW": "kilowatt",
    "kWh": "kilowatt hour",
    "%": "percent",
    "s": "second",
    "count": "one",
}

# Where each output's value came from (controller.arbitration.Level, lower case).
LEVELS = ("interlock", "manual", "sequence", "bms", "safe", "guard")

STATUS_POINTS: tuple[tuple[str, str, bool, str, str], ...] = (
    # browse name, type, array, snapshot key, description
    ("Mode", "String", False, "mode", "Operating mode: " + ", ".join(m.value for m in Mode)),
    ("ModeSince", "DateTime", False, "mode_since", "When the current mode was entered (UTC)"),
    (
        "TripLatched",
        "Boolean",
        False,
        "trip_latched",
        "A latched interlock trip stands: an engineer resets it once the cause is gone",
    ),
    (
        "ActiveInterlocks",
        "String",
        True,
        "active_interlocks",
        "Ids of the interlocks in force now",
    ),
    ("PlcCommsOk", "Boolean", False, "plc_comms_ok", "The controller reads and writes the PLC"),
    (
        "ScanOverruns",
        "UInt64",
        False,
        "scan_overruns",
        "Scans that took longer than the scan period since the controller started",
    ),
)

ENERGY_POINTS: tuple[tuple[str, str, tuple[float, float] | None, str], ...] = (
    # browse name, unit, range, description
    ("HeatDelivered_kWh", "kWh", None, "Heat delivered to the customer (the heat meter's count)"),
    ("HeatRejected_kWh", "kWh", None, "Heat rejected by the dry cooler (estimated, lifetime)"),
    ("ItEnergy_kWh", "kWh", None, "Energy drawn by the IT load (from it_power, lifetime)"),
    (
        "HeatLoopAvailability_pct",
        "%",
        (0.0, 100.0),
        "Heat-loop availability since the state store was created (docs/metering.md)",
    ),
)

# (name, type, description) of each method's input arguments, the command it becomes, and what
# it does (with the least role that may call it, DESIGN §13).
METHODS: tuple[tuple[str, tuple[tuple[str, str, str], ...], str, str], ...] = (
    (
        "ResetTrip",
        (),
        "reset",
        "Reset every latched interlock whose cause is gone and whose sensors are valid (engineer)",
    ),
    ("AcknowledgeAlarms", (), "ack", "Acknowledge every standing alarm (operator, engineer)"),
    (
        "RequestReject",
        (("Reject", "Boolean", "true: reject heat to the dry cooler; false: end the request"),),
        "reject",
        "Ask the controller to reject heat to the dry cooler instead of reusing it, or end "
        "that request (operator, engineer)",
    ),
)


def unit_id(code: str) -> int:
    """The OPC UA UnitId of a UNECE common code: its characters as bytes of one integer."""
    uid = 0
    for c in code:
        uid = (uid << 8) | ord(c)
    return uid


def unece(unit: str | None) -> tuple[int, str] | None:
    """(UnitId, common code) of a unit, or None when it has no UNECE code here."""
    code = UNECE_CODES.get(unit) if unit is not None else None
    return None if code is None else (unit_id(code), code)


@dataclass(frozen=True)
class Point:
    """One variable."""

    path: tuple[str, ...]  # below Objects/HeatLoop, e.g. ("Telemetry", "it_supply_temp")
    node_id: str  # "HeatLoop.Telemetry.it_supply_temp" (a string id in urn:heatloop)
    type: str  # one of TYPES
    array: bool  # True only for Status/ActiveInterlocks (String[])
    unit: str | None
    unece: tuple[int, str] | None  # (UnitId, common code), UNECE Rec 20
    range: tuple[float, float] | None  # EURange
    access: str  # "read" | "write"
    description: str
    feed: tuple[str, ...]  # where the value comes from in a snapshot
    value: object = None  # a static value (Interlocks/<id>/Description), else None


@dataclass(frozen=True)
class Method:
    name: str
    node_id: str
    inputs: tuple[tuple[str, str, str], ...]  # (name, type, description)
    cmd: str  # the command it becomes
    description: str


@dataclass(frozen=True)
class Condition:
    """One alarm of the controller's catalogue."""

    id: str
    node_id: str  # "HeatLoop.Alarms.<id>"
    priority: str  # one of PRIORITIES
    severity: int  # OPC UA 1..1000
    message: str
    source: str  # node id of the source node: an interlock object, a variable, or "HeatLoop"


@dataclass(frozen=True)
class Space:
    site: str
    points: tuple[Point, ...]
    methods: tuple[Method, ...]
    conditions: tuple[Condition, ...]
    modes: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(self)

    def point(self, node_id: str) -> Point:
        for p in self.points:
            if p.node_id == node_id:
                return p
        raise KeyError(node_id)

    def objects(self) -> tuple[tuple[str, ...], ...]:
        """The object paths below HeatLoop (folders and interlock objects), parents first."""
        seen: dict[tuple[str, ...], None] = {}
        for p in self.points:
            for i in range(1, len(p.path)):
                seen.setdefault(p.path[:i])
        if self.conditions:
            seen.setdefault(("Alarms",))
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; `Space.from_json` gives back an equal Space."""
        return {
            "site": self.site,
            "points": [
                {
                    "path": list(p.path),
                    "node_id": p.node_id,
                    "type": p.type,
                    "array": p.array,
                    "unit": p.unit,
                    "unece": None if p.unece is None else list(p.unece),
                    "range": None if p.range is None else list(p.range),
                    "access": p.access,
                    "description": p.description,
                    "feed": list(p.feed),
                    "value": p.value,
                }
                for p in self.points
            ],
            "methods": [
                {
                    "name": m.name,
                    "node_id": m.node_id,
                    "inputs": [list(a) for a in m.inputs],
                    "cmd": m.cmd,
                    "description": m.description,
                }
                for m in self.methods
            ],
            "conditions": [
                {
                    "id": c.id,
                    "node_id": c.node_id,
                    "priority": c.priority,
                    "severity": c.severity,
                    "message": c.message,
                    "source": c.source,
                }
                for c in self.conditions
            ],
            "modes": list(self.modes),
        }

    @classmethod
    def from_json(cls, d: object) -> Space:
        """The Space of a `to_json` document; ValueError naming the field on anything else."""
        r = _Reader()
        obj = r.obj(d, "space", ("site", "points", "methods", "conditions", "modes"))
        site = r.text(obj["site"], "space.site")
        points = tuple(
            _point_from(r, x, f"space.points[{i}]")
            for i, x in enumerate(r.array(obj["points"], "space.points"))
        )
        methods = tuple(
            _method_from(r, x, f"space.methods[{i}]")
            for i, x in enumerate(r.array(obj["methods"], "space.methods"))
        )
        conds = tuple(
            _condition_from(r, x, f"space.conditions[{i}]")
            for i, x in enumerate(r.array(obj["conditions"], "space.conditions"))
        )
        modes = tuple(
            r.text(x, f"space.modes[{i}]")
            for i, x in enumerate(r.array(obj["modes"], "space.modes"))
        )
        return cls(site, points, methods, conds, modes)


# ---- reading a document from another process ----

_MAX_SHOWN = 60


def _shown(v: object) -> str:
    s = repr(v)
    return s if len(s) <= _MAX_SHOWN else s[: _MAX_SHOWN - 1] + "…"


class _Reader:
    """Strict JSON field checks; each failure is one ValueError line: field, value, expectation."""

    @staticmethod
    def fail(path: str, v: object, expected: str) -> ValueError:
        return ValueError(f"{path}: {_shown(v)}: expected {expected}")

    def obj(self, v: object, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(path, v, "an object")
        missing = [k for k in keys if k not in v]
        if missing:
            raise self.fail(f"{path}.{missing[0]}", None, "a value (the key is missing)")
        extra = [k for k in v if k not in keys]
        if extra:
            raise self.fail(f"{path}.{extra[0]}", v[extra[0]], f"only the keys {', '.join(keys)}")
        return v

    def array(self, v: object, path: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(path, v, "an array")
        return v

    def text(self, v: object, path: str, *, empty: bool = True) -> str:
        if not isinstance(v, str) or (not empty and not v):
            raise self.fail(path, v, "a string" if empty else "a non-empty string")
        return v

    def flag(self, v: object, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, v, "true or false")
        return v

    def number(self, v: object, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(path, v, "a finite number")
        return float(v)

    def choice(self, v: object, path: str, choices: tuple[str, ...]) -> str:
        if v not in choices:
            raise self.fail(path, v, f"one of {', '.join(choices)}")
        return str(v)


def _point_from(r: _Reader, x: object, path: str) -> Point:
    keys = ("path", "node_id", "type", "array", "unit", "unece", "range", "access")
    o = r.obj(x, path, (*keys, "description", "feed", "value"))
    parts = tuple(
        r.text(s, f"{path}.path[{i}]", empty=False)
        for i, s in enumerate(r.array(o["path"], f"{path}.path"))
    )
    if not parts:
        raise r.fail(f"{path}.path", o["path"], "a non-empty array of names")
    node_id = r.text(o["node_id"], f"{path}.node_id")
    if node_id != node_id_of(parts):
        raise r.fail(f"{path}.node_id", node_id, f"{node_id_of(parts)!r} (from the path)")
    unit = None if o["unit"] is None else r.text(o["unit"], f"{path}.unit")
    code: tuple[int, str] | None = None
    if o["unece"] is not None:
        u = r.array(o["unece"], f"{path}.unece")
        if (
            len(u) != 2
            or not isinstance(u[1], str)
            or not 2 <= len(u[1]) <= 3
            or isinstance(u[0], bool)
            or u[0] != unit_id(u[1])
        ):
            raise r.fail(f"{path}.unece", u, "null or [UnitId, UNECE common code] that agree")
        code = (u[0], u[1])
    rng: tuple[float, float] | None = None
    if o["range"] is not None:
        a = r.array(o["range"], f"{path}.range")
        if len(a) != 2:
            raise r.fail(f"{path}.range", a, "null or [low, high]")
        lo, hi = r.number(a[0], f"{path}.range[0]"), r.number(a[1], f"{path}.range[1]")
        if not lo <= hi:
            raise r.fail(f"{path}.range", a, "low ≤ high")
        rng = (lo, hi)
    feed = tuple(
        r.text(s, f"{path}.feed[{i}]", empty=False)
        for i, s in enumerate(r.array(o["feed"], f"{path}.feed"))
    )
    if not feed:
        raise r.fail(f"{path}.feed", o["feed"], "a non-empty array of names")
    value = o["value"]
    if value is not None and not isinstance(value, str):
        raise r.fail(f"{path}.value", value, "null or a string")
    return Point(
        path=parts,
        node_id=node_id,
        type=r.choice(o["type"], f"{path}.type", TYPES),
        array=r.flag(o["array"], f"{path}.array"),
        unit=unit,
        unece=code,
        range=rng,
        access=r.choice(o["access"], f"{path}.access", ACCESS),
        description=r.text(o["description"], f"{path}.description"),
        feed=feed,
        value=value,
    )


def _method_from(r: _Reader, x: object, path: str) -> Method:
    o = r.obj(x, path, ("name", "node_id", "inputs", "cmd", "description"))
    name = r.text(o["name"], f"{path}.name", empty=False)
    node_id = r.text(o["node_id"], f"{path}.node_id")
    if node_id != node_id_of((name,)):
        raise r.fail(f"{path}.node_id", node_id, f"{node_id_of((name,))!r} (from the name)")
    inputs = []
    for i, a in enumerate(r.array(o["inputs"], f"{path}.inputs")):
        arg = r.array(a, f"{path}.inputs[{i}]")
        if len(arg) != 3:
            raise r.fail(f"{path}.inputs[{i}]", arg, "[name, type, description]")
        inputs.append(
            (
                r.text(arg[0], f"{path}.inputs[{i}][0]", empty=False),
                r.choice(arg[1], f"{path}.inputs[{i}][1]", TYPES),
                r.text(arg[2], f"{path}.inputs[{i}][2]"),
            )
        )
    return Method(
        name=name,
        node_id=node_id,
        inputs=tuple(inputs),
        cmd=r.text(o["cmd"], f"{path}.cmd", empty=False),
        description=r.text(o["description"], f"{path}.description"),
    )


def _condition_from(r: _Reader, x: object, path: str) -> Condition:
    o = r.obj(x, path, ("id", "node_id", "priority", "severity", "message", "source"))
    cid = r.text(o["id"], f"{path}.id", empty=False)
    node_id = r.text(o["node_id"], f"{path}.node_id")
    if node_id != node_id_of(("Alarms", cid)):
        raise r.fail(f"{path}.node_id", node_id, f"{node_id_of(('Alarms', cid))!r} (from the id)")
    sev = o["severity"]
    if isinstance(sev, bool) or not isinstance(sev, int) or not 1 <= sev <= 1000:
        raise r.fail(f"{path}.severity", sev, "a whole number 1..1000")
    return Condition(
        id=cid,
        node_id=node_id,
        priority=r.choice(o["priority"], f"{path}.priority", PRIORITIES),
        severity=sev,
        message=r.text(o["message"], f"{path}.message"),
        source=r.text(o["source"], f"{path}.source", empty=False),
    )


# ---- building the space from a site ----


def node_id_of(path: tuple[str, ...]) -> str:
    """The string node id of a path below HeatLoop (the root itself for an empty path)."""
    return ".".join((ROOT, *path))


def _check(sp: Space) -> None:
    """Every node (variable, method, condition, folder, object) has its own node id and browse
    path. A clash (a tag `x_level` beside the output `x`'s level sibling) raises ValueError.
    Only a setpoint is writable: whatever document arrives, no other variable becomes a write
    path (an output never is)."""
    for p in sp.points:
        if p.access == "write" and not (
            len(p.path) == 2 and p.path[0] == "Setpoints" and p.feed == ("setpoint", p.path[1])
        ):
            raise ValueError(
                f"BMS address space: variable {'/'.join(p.path)} access 'write': expected "
                "'read' (only Setpoints/<name> fed by that setpoint is writable)"
            )
    where: dict[str, str] = {node_id_of(o): f"object {'/'.join(o)}" for o in sp.objects()}
    names = [(p.node_id, f"variable {'/'.join(p.path)}") for p in sp.points]
    names += [(m.node_id, f"method {m.name}") for m in sp.methods]
    names += [(c.node_id, f"condition {c.id}") for c in sp.conditions]
    for nid, what in names:
        if nid in where:
            raise ValueError(
                f"BMS address space: {what} and {where[nid]} have the same node id {nid!r}; "
                "expected unique browse names (rename a tag)"
            )
        where[nid] = what
    sources = set(where) | {ROOT}
    for c in sp.conditions:
        if c.source not in sources:
            raise ValueError(
                f"BMS address space: condition {c.id} source {c.source!r}: expected a node id "
                "of this space"
            )


def _tag_point(folder: str, tag: Any, feed: str, access: str, description: str) -> Point:
    unit = None if tag.is_bool else tag.unit
    return Point(
        path=(folder, tag.name),
        node_id=node_id_of((folder, tag.name)),
        type="Boolean" if tag.is_bool else "Double",
        array=False,
        unit=unit,
        unece=unece(unit),
        range=None if tag.is_bool else (float(tag.lo), float(tag.hi)),
        access=access,
        description=description,
        feed=(feed, tag.name),
    )


def space(site: Site) -> Space:
    """The address space of this site."""
    points: list[Point] = []
    for name, typ, array, key, desc in STATUS_POINTS:
        points.append(
            Point(("Status", name), node_id_of(("Status", name)), typ, array, None, None, None,
                  "read", desc, ("status", key))
        )  # fmt: skip
    for t in site.inputs:
        points.append(_tag_point("Telemetry", t, "input", "read", t.description or t.name))
    for t in site.outputs:
        if t.name == "heartbeat":  # the watchdog's counter: no meaning to a BMS
            continue
        what = t.description or t.name
        points.append(
            _tag_point("Outputs", t, "output", "read", f"{what}; as last written to the PLC")
        )
        lvl = f"{t.name}_level"
        points.append(
            Point(("Outputs", lvl), node_id_of(("Outputs", lvl)), "String", False, None, None,
                  None, "read",
                  f"The priority level that set {t.name}: one of {', '.join(LEVELS)}",
                  ("output_level", t.name))
        )  # fmt: skip
    for name, unit, rng, desc in ENERGY_POINTS:
        points.append(
            Point(("Energy", name), node_id_of(("Energy", name)), "Double", False, unit,
                  unece(unit), rng, "read", desc, ("energy", name))
        )  # fmt: skip
    limits = authority.Limits.from_site(site).setpoints
    for name, (unit, desc) in authority.SETPOINTS.items():
        lo, hi = limits[name]
        points.append(
            Point(("Setpoints", name), node_id_of(("Setpoints", name)), "Double", False, unit,
                  unece(unit), (float(lo), float(hi)), "write", desc, ("setpoint", name))
        )  # fmt: skip
    for r in RULES:
        base = ("Interlocks", r.id)
        bypass = "may be bypassed by an engineer" if r.bypassable else "never bypassable"
        for name, key, desc in (
            ("Active", "active", f"{r.id} is in force (its cause holds or it is latched)"),
            ("Latched", "latched", f"{r.id} is latched: an engineer resets it once cleared"),
            ("Bypassed", "bypassed", f"{r.id} is bypassed by an engineer ({bypass})"),
        ):
            points.append(
                Point((*base, name), node_id_of((*base, name)), "Boolean", False, None, None,
                      None, "read", desc, ("interlock", r.id, key))
            )  # fmt: skip
        text = (
            f"{r.id}: {r.hazard}. Cause: {r.cause_text}. Action: {r.effect_text}. "
            f"{bypass[:1].upper()}{bypass[1:]}."
        )
        points.append(
            Point((*base, "Description"), node_id_of((*base, "Description")), "String", False,
                  None, None, None, "read", f"What {r.id} protects against and how",
                  ("static",), text[:1].upper() + text[1:])
        )  # fmt: skip
    methods = tuple(
        Method(name, node_id_of((name,)), args, cmd, desc) for name, args, cmd, desc in METHODS
    )
    inputs = {t.name for t in site.inputs}
    outputs = {t.name for t in site.outputs if t.name != "heartbeat"}
    rules = {r.id for r in RULES}
    conds = []
    for d in catalogue(RULES, site.inputs, site.outputs).values():
        prio = d.priority.name.lower()
        conds.append(
            Condition(
                id=d.id,
                node_id=node_id_of(("Alarms", d.id)),
                priority=prio,
                severity=SEVERITY[prio],
                message=d.message,
                source=_source(d.id, rules, inputs, outputs),
            )
        )
    return Space(
        site=site.site.name,
        points=tuple(points),
        methods=methods,
        conditions=tuple(conds),
        modes=tuple(m.value for m in Mode),
    )


def _source(alarm_id: str, rules: set[str], inputs: set[str], outputs: set[str]) -> str:
    """The node an alarm is about: its interlock object (IL-04, BYPASS:IL-04), the input's
    Telemetry variable (INPUT:x, PUMP:x, FORCE:x), the output's variable (FORCE:y), else the
    root."""
    subject = alarm_id.split(":", 1)[1] if ":" in alarm_id else alarm_id
    if subject in rules:
        return node_id_of(("Interlocks", subject))
    if ":" in alarm_id and subject in inputs:
        return node_id_of(("Telemetry", subject))
    if ":" in alarm_id and subject in outputs:
        return node_id_of(("Outputs", subject))
    return ROOT


# Priority names the alarm catalogue uses must all have a severity.
assert {p.name.lower() for p in Priority} == set(SEVERITY)


# ---- the points list ----

CSV_HEADER = ("browse path", "node id", "data type", "unit", "range", "access", "description")


def _num(x: float) -> str:
    s = f"{x:g}"
    return s if float(s) == x else repr(x)


def expanded_node_id(node_id: str) -> str:
    """The node id with its namespace URI (valid whatever index a server gives urn:heatloop)."""
    return f"nsu={NAMESPACE_URI};s={node_id}"


def rows(sp: Space) -> list[tuple[str, str, str, str, str, str, str]]:
    """One row per variable, method and condition, in the points list's columns."""
    out = []
    base = f"Objects/{ROOT}"
    for p in sp.points:
        out.append(
            (
                "/".join((base, *p.path)),
                expanded_node_id(p.node_id),
                p.type + ("[]" if p.array else ""),
                (p.unit or "") + (f" ({p.unece[1]})" if p.unece else ""),
                "" if p.range is None else f"{_num(p.range[0])} .. {_num(p.range[1])}",
                p.access,
                p.description,
            )
        )
    for m in sp.methods:
        args = ", ".join(f"{n}: {t} ({d})" for n, t, d in m.inputs) or "none"
        out.append(
            (
                f"{base}/{m.name}",
                expanded_node_id(m.node_id),
                "Method",
                "",
                "",
                "call",
                f"{m.description}. Arguments: {args}",
            )
        )
    for c in sp.conditions:
        out.append(
            (
                f"{base}/Alarms/{c.id}",
                expanded_node_id(c.node_id),
                "Condition",
                "",
                "",
                "acknowledge",
                f"{c.priority} (severity {c.severity}), source {c.source}: {c.message}",
            )
        )
    return out


def points_csv(sp: Space) -> str:
    """The points list for the integrator (CSV, header CSV_HEADER)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    w.writerows(rows(sp))
    return buf.getvalue()


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def points_markdown(sp: Space) -> str:
    """The points table of docs/bms.md."""
    lines = ["| " + " | ".join(CSV_HEADER) + " |", "|" + "---|" * len(CSV_HEADER)]
    for r in rows(sp):
        path, nid, typ, unit, rng, access, desc = r
        cells = (f"`{path}`", f"`{nid}`", typ, unit, rng, access, desc)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
