"""The site file: loaded and validated once into one frozen `Site`, or refused with every problem.

Each section is validated on its own and every tag on its own, so a file with several mistakes
reports all of them at once; cross-checks (required tags, overlapping Modbus addresses, safe
values) then run over whatever parsed. The result names field path, bad value and expectation.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from plc_io.plant_config import PlantConfig
from plc_io.tags import (
    REQUIRED_INPUTS,
    REQUIRED_OUTPUTS,
    UNITS,
    DataType,
    Direction,
    Encoding,
    ModbusTable,
    Tag,
)

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


class SiteInfo(BaseModel):
    model_config = _FROZEN
    name: str = Field(min_length=1)
    description: str = ""


class OpcuaClientConfig(BaseModel):
    """How heatloop reaches a PLC that speaks OPC UA."""

    model_config = _FROZEN
    endpoint: str = "opc.tcp://127.0.0.1:4841/"
    namespace: str = "urn:heatloop:plc"
    security: Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"] = "None"
    username: str | None = None
    password_env: str | None = None  # name of the environment variable holding the password
    subscribe: bool = True
    publish_interval_ms: int = Field(100, ge=10, le=10_000)


class PlcConfig(BaseModel):
    model_config = _FROZEN
    transport: Literal["modbus", "opcua"] = "modbus"
    host: str = "127.0.0.1"
    port: int = Field(5020, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=247)
    watchdog_s: float = Field(3.0, gt=0, le=60)
    watchdog_holdoff_s: float = Field(2.0, ge=0, le=60)
    timeout_s: float = Field(0.5, gt=0, le=10)
    reconnect_max_s: float = Field(5.0, gt=0, le=300)
    gap_registers: int = Field(8, ge=0, le=100)  # read across holes up to this size
    gap_bits: int = Field(32, ge=0, le=1000)
    stale_after_s: float = Field(2.0, gt=0)
    opcua: OpcuaClientConfig = OpcuaClientConfig()


class SimConfig(BaseModel):
    model_config = _FROZEN
    opcua_port: int = Field(4841, ge=1, le=65535)
    step_s: float = Field(0.1, gt=0, le=60)
    seed: int = 0
    start_day: float = Field(180.0, ge=0, lt=366)  # day of year the simulated clock starts on


class BmsConfig(BaseModel):
    model_config = _FROZEN
    host: str = "0.0.0.0"
    port: int = Field(4840, ge=1, le=65535)
    allow_none_security: bool = False


class StateConfig(BaseModel):
    model_config = _FROZEN
    dir: str = "state"


class ScanConfig(BaseModel):
    model_config = _FROZEN
    period_s: float = Field(0.25, gt=0, le=10)


class ControlConfig(BaseModel):
    """Setpoints and mode thresholds the supervisor uses (°C unless named otherwise)."""

    model_config = _FROZEN
    it_supply_setpoint_c: float = Field(35.0, ge=10, le=60)
    tank_full_c: float = Field(60.0, ge=20, le=95)  # tank bottom above this: BUFFER_FULL
    tank_full_hysteresis_k: float = Field(3.0, gt=0, le=20)
    customer_ready_dwell_s: float = Field(300.0, ge=0)
    reject_dwell_s: float = Field(600.0, ge=0)
    min_mode_dwell_s: float = Field(60.0, ge=0)
    reuse_reentry_min_s: float = Field(900.0, ge=0)
    hunting_changes_per_h: int = Field(6, ge=1)
    fan_min_pct: float = Field(10.0, ge=0, le=100)
    secondary_pump_speed_pct: float = Field(80.0, ge=0, le=100)
    primary_pump_speed_pct: float = Field(80.0, ge=0, le=100)
    pump_fail_s: float = Field(10.0, gt=0, le=600)  # run feedback missing this long: pump failed
    valve_follow_s: float = Field(120.0, gt=0, le=3600)  # valve position must follow within this
    valve_tolerance_pct: float = Field(10.0, gt=0, le=50)  # ... to within this many %
    valve_retry_s: float = Field(3600.0, gt=0, le=86400)  # a failed valve is tried again after
    max_force_s: float = Field(28800.0, gt=0, le=86400)  # longest manual or forced value


class InterlockConfig(BaseModel):
    """Interlock thresholds (DESIGN §6)."""

    model_config = _FROZEN
    it_supply_high_c: float = Field(45.0, ge=20, le=70)
    primary_flow_low_m3h: float = Field(5.0, ge=0)
    tank_top_high_c: float = Field(85.0, ge=20, le=99)
    secondary_pressure_high_bar: float = Field(5.5, gt=0)
    customer_supply_high_c: float = Field(65.0, ge=20, le=99)
    freeze_ambient_c: float = Field(-5.0, ge=-50, le=10)
    freeze_drycooler_out_c: float = Field(5.0, ge=-20, le=20)
    stale_s: float = Field(2.0, gt=0)
    frozen_s: float = Field(600.0, gt=0)
    max_rate_k_per_s: float = Field(5.0, gt=0)
    # how far it_supply_temp may disagree with drycooler_out_temp (measured just upstream of it)
    plausibility_band_k: float = Field(8.0, gt=0, le=50)
    # below this IT load the plausibility cross-checks are not armed
    plausibility_min_it_power_kw: float = Field(20.0, ge=0, le=100_000)
    max_bypass_s: float = Field(14400.0, gt=0, le=14400)  # longest bypass of an interlock (4 h)
    # redundant sensors: tag -> its twin; the validated value is the worse (hotter) of the two
    # valid readings, and one valid reading is enough
    redundant: dict[str, str] = Field(default_factory=dict)


SECTIONS: dict[str, type[BaseModel]] = {
    "site": SiteInfo,
    "plc": PlcConfig,
    "sim": SimConfig,
    "bms": BmsConfig,
    "state": StateConfig,
    "scan": ScanConfig,
    "control": ControlConfig,
    "interlocks": InterlockConfig,
    "plant": PlantConfig,
}
_REQUIREDSECTIONS = ("site", "plc", "tags")


@dataclass(frozen=True)
class Problem:
    path: str
    value: Any
    expected: str

    def __str__(self) -> str:
        return f"{self.path}: {self.value!r}: expected {self.expected}"


class SiteError(Exception):
    """The site file cannot be used; `problems` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class Site(BaseModel):
    """The whole validated site file. `tags` keeps the file's order."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    site: SiteInfo
    plc: PlcConfig
    sim: SimConfig
    bms: BmsConfig
    state: StateConfig
    scan: ScanConfig
    control: ControlConfig
    interlocks: InterlockConfig
    plant: PlantConfig
    tags: tuple[Tag, ...]
    folder: Path = Path(".")

    def tag(self, name: str) -> Tag:
        for t in self.tags:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def inputs(self) -> tuple[Tag, ...]:
        return tuple(t for t in self.tags if not t.is_output)

    @property
    def outputs(self) -> tuple[Tag, ...]:
        return tuple(t for t in self.tags if t.is_output)

    @property
    def state_dir(self) -> Path:
        p = Path(self.state.dir)
        return p if p.is_absolute() else self.folder / p

    def with_control(self, **changes: float) -> Site:
        """This site with some `[control]` settings changed (shorter dwells for demos, tests)."""
        return self.model_copy(update={"control": self.control.model_copy(update=changes)})

    def safe_outputs(self) -> dict[str, float | bool]:
        return {t.name: t.safe for t in self.outputs if t.safe is not None}


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", "≥"),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "≤"),
}


def _expected(e: Any) -> str:
    """Turn a pydantic error into the 'expected …' half of a problem line."""
    kind, ctx = e["type"], e.get("ctx", {})
    if kind == "extra_forbidden":
        return "no such key (unknown key)"
    if kind == "missing":
        return "a value (required key is missing)"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"a number {op} {ctx[key]}"
    if kind in ("literal_error", "enum"):
        return f"one of {ctx.get('expected')}"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _pydantic_problems(prefix: str, err: ValidationError) -> list[Problem]:
    return [
        Problem(
            ".".join(str(p) for p in (prefix, *e["loc"]) if p != ""), e.get("input"), _expected(e)
        )
        for e in err.errors()
    ]


def _check_tag(tag: Tag) -> list[Problem]:
    p = f"tags.{tag.name}"
    probs: list[Problem] = []
    if not _SNAKE.match(tag.name):
        probs.append(Problem(f"{p}", tag.name, "a snake_case tag name"))
    if tag.unit not in UNITS:
        probs.append(Problem(f"{p}.unit", tag.unit, f"one of {sorted(UNITS)}"))
    lo, hi = tag.range
    if not lo < hi:
        probs.append(Problem(f"{p}.range", list(tag.range), "low < high"))
    mb = tag.modbus
    if tag.is_bool:
        if tag.unit != "bool":
            probs.append(Problem(f"{p}.unit", tag.unit, "'bool' for a bool tag"))
        if not mb.is_bit and mb.encoding is not Encoding.UINT16:
            probs.append(
                Problem(f"{p}.modbus.encoding", mb.encoding.value, "bit (or uint16) for a bool tag")
            )
    if mb.is_bit and mb.encoding is not Encoding.BIT:
        probs.append(
            Problem(f"{p}.modbus.encoding", mb.encoding.value, f"'bit' in the {mb.table} table")
        )
    if not mb.is_bit and mb.encoding is Encoding.BIT:
        probs.append(
            Problem(f"{p}.modbus.table", mb.table.value, "coil or discrete for encoding 'bit'")
        )
    if mb.encoding is Encoding.BIT and not tag.is_bool:
        probs.append(Problem(f"{p}.type", tag.type.value, "bool for encoding 'bit'"))
    if mb.scale == 0:
        probs.append(Problem(f"{p}.modbus.scale", mb.scale, "a non-zero scale"))
    elif mb.encoding in (Encoding.INT16, Encoding.UINT16) and lo < hi and not tag.is_bool:
        raw_lo, raw_hi = (-32768, 32767) if mb.encoding is Encoding.INT16 else (0, 65535)
        if not (raw_lo * abs(mb.scale) <= lo and hi <= raw_hi * abs(mb.scale)):
            probs.append(
                Problem(
                    f"{p}.modbus.scale",
                    mb.scale,
                    f"a scale at which range {list(tag.range)} fits {mb.encoding.value}",
                )
            )
    if tag.is_output:
        if mb.table not in (ModbusTable.HOLDING, ModbusTable.COIL):
            probs.append(
                Problem(f"{p}.modbus.table", mb.table.value, "holding or coil for an output")
            )
        if tag.safe is None:
            probs.append(Problem(f"{p}.safe", None, "a safe value for every output"))
        elif tag.is_bool and not isinstance(tag.safe, bool):
            probs.append(Problem(f"{p}.safe", tag.safe, "true or false for a bool output"))
        elif not tag.is_bool and (isinstance(tag.safe, bool) or not lo <= tag.safe <= hi):
            probs.append(Problem(f"{p}.safe", tag.safe, f"a number within range {[lo, hi]}"))
    else:
        if tag.safe is not None:
            probs.append(Problem(f"{p}.safe", tag.safe, "no safe value on an input"))
        if tag.verify:
            probs.append(Problem(f"{p}.verify", tag.verify, "read-back only on outputs"))
    if not (tag.is_bool and not tag.is_output):
        if tag.fail_state is not None:
            probs.append(Problem(f"{p}.fail_state", tag.fail_state, "only on a boolean input"))
        if tag.supervised_by is not None:
            probs.append(
                Problem(f"{p}.supervised_by", tag.supervised_by, "only on a boolean input")
            )
    if tag.frozen_s is not None and (tag.is_bool or tag.is_output):
        probs.append(Problem(f"{p}.frozen_s", tag.frozen_s, "only on an analogue input"))
    return probs


def _check_supervision(by_name: dict[str, Tag]) -> list[Problem]:
    """`supervised_by` names another boolean input (the zone's fault contact)."""
    probs = []
    for t in by_name.values():
        sup = t.supervised_by
        if sup is None:
            continue
        other = by_name.get(sup)
        if other is None or other.is_output or not other.is_bool or sup == t.name:
            probs.append(
                Problem(f"tags.{t.name}.supervised_by", sup, "the name of another boolean input")
            )
    return probs


def _check_overlaps(tags: list[Tag]) -> list[Problem]:
    owner: dict[tuple[ModbusTable, int], str] = {}
    probs = []
    for t in tags:
        for a in range(t.modbus.address, t.modbus.address + t.modbus.width):
            key = (t.modbus.table, a)
            if key in owner:
                probs.append(
                    Problem(
                        f"tags.{t.name}.modbus.address",
                        t.modbus.address,
                        f"an address not used by tags.{owner[key]} "
                        f"({t.modbus.table.value} {a} overlaps)",
                    )
                )
                break
            owner[key] = t.name
    return probs


def parse_site(data: dict[str, Any], source: str = "<site>", folder: Path | None = None) -> Site:
    """Validate a parsed site file; raise SiteError listing every problem found."""
    probs: list[Problem] = []
    if not isinstance(data, dict):
        raise SiteError(source, [Problem("", data, "a TOML table")])
    for key in data:
        if key not in SECTIONS and key != "tags":
            probs.append(Problem(key, "…", f"a known section ({', '.join([*SECTIONS, 'tags'])})"))
    probs += [Problem(s, None, "this section") for s in _REQUIREDSECTIONS if s not in data]

    sections: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = TypeAdapter(model).validate_python(data.get(name, {}))
        except ValidationError as e:
            probs += _pydantic_problems(name, e)

    raw_tags = data.get("tags", {})
    tags: list[Tag] = []
    if not isinstance(raw_tags, dict):
        probs.append(Problem("tags", raw_tags, "a table of tags keyed by tag name"))
        raw_tags = {}
    for name, body in raw_tags.items():
        if not isinstance(body, dict):
            probs.append(Problem(f"tags.{name}", body, "a table"))
            continue
        try:
            tag = Tag.model_validate({"name": name, **body})
        except ValidationError as e:
            probs += _pydantic_problems(f"tags.{name}", e)
            continue
        probs += _check_tag(tag)
        tags.append(tag)
    probs += _check_overlaps(tags)
    by_name = {t.name: t for t in tags}
    probs += _check_supervision(by_name)
    for direction, names in (
        (Direction.INPUT, REQUIRED_INPUTS),
        (Direction.OUTPUT, REQUIRED_OUTPUTS),
    ):
        for n in names:
            if n not in raw_tags:
                probs.append(Problem(f"tags.{n}", None, f"the required {direction.value} tag"))
            elif n in by_name and by_name[n].direction is not direction:
                probs.append(
                    Problem(f"tags.{n}.direction", by_name[n].direction.value, direction.value)
                )
    hb = by_name.get("heartbeat")
    if hb is not None and (
        hb.type is not DataType.FLOAT or hb.modbus.table is not ModbusTable.HOLDING
    ):
        probs.append(
            Problem("tags.heartbeat", hb.modbus.table.value, "a float tag in a holding register")
        )
    il = sections.get("interlocks")
    for name, twin in il.redundant.items() if il else ():
        for key, tag_name in ((name, name), (name, twin)):
            t = by_name.get(tag_name)
            if t is None or t.is_output or t.is_bool:
                probs.append(
                    Problem(f"interlocks.redundant.{key}", tag_name, "an analogue input tag")
                )
    plc = sections.get("plc")
    sim = sections.get("sim")
    if plc and sim and plc.host in ("127.0.0.1", "localhost") and plc.port == sim.opcua_port:
        probs.append(Problem("sim.opcua_port", sim.opcua_port, "a port other than plc.port"))
    if probs:
        raise SiteError(source, probs)
    return Site(**sections, tags=tuple(tags), folder=folder or Path("."))


def load_site(path: str | Path) -> Site:
    """Read and validate a site file. Raises SiteError (never a bare parse traceback)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SiteError(
            str(path), [Problem("", str(path), f"a readable file ({e.strerror})")]
        ) from e
    return loads_site(text, str(path), path.resolve().parent)


def loads_site(text: str, source: str = "<site>", folder: Path | None = None) -> Site:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        hint = " — a key or tag defined twice" if "overwrite" in str(e) else ""
        raise SiteError(source, [Problem("(file)", "TOML", f"valid TOML: {e}{hint}")]) from e
    return parse_site(data, source, folder)


def demo_site_text() -> str:
    """The embedded demo site file, as `heatloop init` writes it."""
    return resources.files("plc_io").joinpath("demo_site.toml").read_text(encoding="utf-8")


def demo_site(folder: Path | None = None) -> Site:
    return loads_site(demo_site_text(), "<demo site>", folder)
