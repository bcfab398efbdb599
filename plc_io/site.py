"""The site file: loaded and validated once into one frozen `Site`, or refused with every problem.

Each section is validated on its own and every tag on its own, so a file with several mistakes
reports all of them at once; cross-checks (required tags, overlapping Modbus addresses, safe
values) then run over whatever parsed. The result names field path, bad value and expectation.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from plc_io.plant_config import PlantConfig
from plc_io.tags import (
    OPCUA_EXACT_MAX,
    REQUIRED_INPUTS,
    REQUIRED_OUTPUTS,
    STRICT,
    UNITS,
    DataType,
    Direction,
    Encoding,
    ModbusTable,
    Tag,
    opcua_type_problem,
)

_FROZEN = STRICT
_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


class SiteInfo(BaseModel):
    model_config = _FROZEN
    name: str = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=2000)


class OpcuaClientConfig(BaseModel):
    """How heatloop reaches a PLC that speaks OPC UA."""

    model_config = _FROZEN
    endpoint: str = Field("opc.tcp://127.0.0.1:4841/", max_length=500)
    namespace: str = Field("urn:heatloop:plc", max_length=500)
    security: Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"] = "None"
    username: str | None = Field(None, max_length=100)
    password_env: str | None = Field(
        None, max_length=100
    )  # name of the environment variable holding the password
    subscribe: bool = True
    publish_interval_ms: int = Field(100, ge=10, le=10_000)
    # how long the PLC keeps a session heatloop could not close (a dead link) before it frees it
    session_timeout_s: float = Field(30.0, ge=5, le=3600)
    # with security: trust the first PLC certificate seen when none is trusted yet (logged)
    trust_on_first_use: bool = False
    # with security: the PLC's certificate (DER or PEM), relative to the site file's folder
    server_certificate: str | None = Field(None, min_length=1, max_length=4096)


class PlcConfig(BaseModel):
    model_config = _FROZEN
    transport: Literal["modbus", "opcua"] = "modbus"
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int = Field(5020, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=247)
    watchdog_s: float = Field(3.0, gt=0, le=60)
    watchdog_holdoff_s: float = Field(2.0, ge=0, le=60)
    timeout_s: float = Field(0.5, gt=0, le=10)
    reconnect_max_s: float = Field(5.0, gt=0, le=300)
    gap_registers: int = Field(8, ge=0, le=100)  # read across holes up to this size
    gap_bits: int = Field(32, ge=0, le=1000)
    stale_after_s: float = Field(2.0, gt=0, le=60)
    opcua: OpcuaClientConfig = OpcuaClientConfig()


class SimConfig(BaseModel):
    model_config = _FROZEN
    opcua_port: int = Field(4841, ge=1, le=65535)
    step_s: float = Field(0.1, gt=0, le=60)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    start_day: float = Field(180.0, ge=0, lt=366)  # day of year the simulated clock starts on


class BmsConfig(BaseModel):
    """The BMS OPC UA server (DESIGN §9): closed by default, every opening named here."""

    model_config = _FROZEN
    enabled: bool = True  # `heatloop run` starts the BMS server process
    host: str = Field("0.0.0.0", min_length=1, max_length=253)
    port: int = Field(4840, ge=1, le=65535)
    # a None (unencrypted) endpoint, read-only for everyone
    allow_none_security: bool = False
    # anonymous sessions, read-only
    allow_anonymous: bool = False
    # an unknown client certificate goes to trusted/ (logged) instead of rejected/
    trust_on_first_use: bool = False
    max_sessions: int = Field(20, ge=1, le=1000)
    # a faster sampling / publishing interval a client asks for is revised up to these
    min_sampling_ms: int = Field(100, ge=10, le=60_000)
    min_publishing_ms: int = Field(100, ge=10, le=60_000)


class StateConfig(BaseModel):
    model_config = _FROZEN
    dir: str = Field("state", min_length=1, max_length=4096)


class RecorderConfig(BaseModel):
    """The flight recorder: a bounded ring of every scan in the state directory."""

    model_config = _FROZEN
    enabled: bool = True
    hours: float = Field(24.0, ge=1, le=720)  # how far back the ring reaches
    snapshot_every_s: float = Field(300.0, ge=10, le=3600)  # supervisor snapshots for replay


PROOF_DAYS_MAX = 3650  # ten years: longer is no proof-test schedule
ProofDays = Annotated[int, Field(ge=1, le=PROOF_DAYS_MAX)]


class CommissioningConfig(BaseModel):
    """The proof-test schedule (docs/commissioning.md): how often each interlock and the PLC
    watchdog must pass a live test. An overdue one raises its `PROOF:<id>` alarm."""

    model_config = _FROZEN
    # days between live proof tests of every rule and of the watchdog (WD), unless listed below
    proof_test_days: ProofDays = 365
    # never passed live: due this many days after the state store was created
    first_test_days: int = Field(30, ge=0, le=PROOF_DAYS_MAX)
    # step id (a rule id such as "IL-04", or "WD") -> its own interval in days; the ids are
    # checked against the rule table when a command starts (controller.sitecheck)
    proof_test_days_by_rule: dict[str, ProofDays] = Field({}, max_length=100)

    def interval_days(self, step: str) -> int:
        return self.proof_test_days_by_rule.get(step, self.proof_test_days)


class MeteringConfig(BaseModel):
    """Metering and availability (docs/metering.md). Always on; the defaults suit the demo site."""

    model_config = _FROZEN
    # the statement's interval: the counters are kept and stored per interval of this length,
    # aligned to UTC (900 s: quarter hours); it must divide a day (below 60 s: tests and demos)
    interval_s: int = Field(900, ge=10, le=3600)
    # the heat meter's totaliser (heat_meter_energy) wraps to 0 at this count
    meter_rollover_kwh: float = Field(100_000_000.0, gt=0, le=1e12)
    # the largest power the meter can count (its qp x the largest dT): a totaliser step faster
    # than this is a jump (flagged, not billed)
    meter_max_kw: float = Field(1000.0, gt=0, le=1e6)
    # EN 1434 accuracy class of the meter (1, 2 or 3) and its smallest rated dT
    meter_class: int = Field(2, ge=1, le=3)
    meter_dt_min_k: float = Field(3.0, gt=0, le=20)
    # the cross-check (flow x dT x rho cp) may differ from the meter by this share of an
    # interval's energy before METER:CROSSCHECK; intervals below crosscheck_min_kwh are not judged
    crosscheck_tolerance_pct: float = Field(10.0, gt=0, le=100)
    crosscheck_min_kwh: float = Field(5.0, ge=0, le=1e6)
    # over an hour, IT heat = delivered + rejected + stored + losses to within this share of IT
    # heat, or METER:BALANCE
    balance_tolerance_pct: float = Field(15.0, gt=0, le=100)
    balance_min_kwh: float = Field(20.0, ge=0, le=1e6)
    # fluids of the loops (properties by temperature) and the buffer tank's volume
    primary_fluid: Literal["water", "pg25"] = "pg25"
    customer_fluid: Literal["water", "pg25"] = "water"
    secondary_fluid: Literal["water", "pg25"] = "water"
    tank_volume_m3: float = Field(10.0, gt=0, le=10_000)
    # dry-cooler fans' electrical power at 100 % (fan energy is estimated from the command)
    fan_rated_kw: float = Field(8.0, ge=0, le=500)
    # energy not delivered during an interruption: the mean metered power over this long before
    lost_energy_basis_h: float = Field(1.0, gt=0, le=168)

    @field_validator("interval_s")
    @classmethod
    def _divides_a_day(cls, v: int) -> int:
        if 86400 % v:
            raise ValueError("a length that divides a day (e.g. 300, 900, 3600)")
        return v


class MetricsConfig(BaseModel):
    """The Prometheus endpoint ([metrics]; off when the section is absent)."""

    model_config = _FROZEN
    host: str = Field("127.0.0.1", min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)


# A POSIX portable user name (IEEE Std 1003.1 §3.437: letters, digits, '.', '_', '-', not
# starting with '-'); 32 characters is the useradd limit. Roles map OS users from SO_PEERCRED.
USER_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,31}$")
ROLE_NAMES = ("viewer", "operator", "engineer")
# A role list is a short list of people, not a directory dump.
MAX_ROLE_USERS = 1000

UserList = Annotated[tuple[str, ...], Strict(False), Field(max_length=MAX_ROLE_USERS)]


class RolesConfig(BaseModel):
    """Who may do what on the local command channel: OS user names per role (default: nobody)."""

    model_config = _FROZEN
    viewer: UserList = ()
    operator: UserList = ()
    engineer: UserList = ()

    def by_user(self) -> dict[str, str]:
        return {u: role for role in ROLE_NAMES for u in getattr(self, role)}


class ScanConfig(BaseModel):
    model_config = _FROZEN
    period_s: float = Field(0.25, gt=0, le=10)


class ControlConfig(BaseModel):
    """Setpoints and mode thresholds the supervisor uses (°C unless named otherwise)."""

    model_config = _FROZEN
    it_supply_setpoint_c: float = Field(35.0, ge=10, le=60)
    tank_full_c: float = Field(60.0, ge=20, le=95)  # tank bottom above this: BUFFER_FULL
    tank_full_hysteresis_k: float = Field(3.0, gt=0, le=20)
    customer_ready_dwell_s: float = Field(300.0, ge=0, le=86400)
    reject_dwell_s: float = Field(600.0, ge=0, le=86400)
    min_mode_dwell_s: float = Field(60.0, ge=0, le=3600)
    reuse_reentry_min_s: float = Field(900.0, ge=0, le=86400)
    hunting_changes_per_h: int = Field(6, ge=1, le=3600)
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
    primary_flow_low_m3h: float = Field(5.0, ge=0, le=10_000)
    tank_top_high_c: float = Field(85.0, ge=20, le=99)
    secondary_pressure_high_bar: float = Field(5.5, gt=0, le=100)
    customer_supply_high_c: float = Field(65.0, ge=20, le=99)
    freeze_ambient_c: float = Field(-5.0, ge=-50, le=10)
    freeze_drycooler_out_c: float = Field(5.0, ge=-20, le=20)
    stale_s: float = Field(2.0, gt=0, le=60)
    frozen_s: float = Field(600.0, gt=0, le=86400)
    max_rate_k_per_s: float = Field(5.0, gt=0, le=100)
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
    "recorder": RecorderConfig,
    "commissioning": CommissioningConfig,
    "metering": MeteringConfig,
    "metrics": MetricsConfig,  # optional: absent means no endpoint
    "roles": RolesConfig,
}
_OPTIONAL_SECTIONS = ("metrics",)
_REQUIREDSECTIONS = ("site", "plc", "tags")


MAX_SHOWN = 80  # characters of a bad value shown in a problem line


@dataclass(frozen=True)
class Problem:
    path: str
    value: Any
    expected: str
    plain: bool = False  # `expected` is the whole message (file-level problems)

    def __str__(self) -> str:
        if self.plain:
            return f"{self.path}: {self.expected}"
        shown = repr(self.value)
        if len(shown) > MAX_SHOWN:  # a huge or deeply nested value: one readable line
            shown = shown[: MAX_SHOWN - 1] + "…"
        return f"{self.path}: {shown}: expected {self.expected}"


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
    recorder: RecorderConfig = RecorderConfig()
    commissioning: CommissioningConfig = CommissioningConfig()
    metering: MeteringConfig = MeteringConfig()
    metrics: MetricsConfig | None = None  # the Prometheus endpoint, off when [metrics] is absent
    # OS user name -> role ("viewer" | "operator" | "engineer"), from [roles]
    roles: dict[str, str] = Field(default_factory=dict)
    tags: tuple[Tag, ...]
    folder: Path = Path(".")
    # sha256 (hex) of the site file's bytes as loaded ("" when not read from text); left out
    # of dumps, so the validated site's own hash does not change with a comment
    source_sha256: str = Field("", exclude=True)

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


# strict type errors, said in the file's terms (TOML has no implicit conversions here)
_STRICT_TYPES = {
    "float_type": "a number (not true/false, not a string)",
    "int_type": "a whole number (not true/false, not a string)",
    "int_from_float": "a whole number",
    "bool_type": "true or false (not a number, not a string)",
    "string_type": "a string",
    "finite_number": "a finite number (not inf or nan)",
    "tuple_type": "an array",
    "dict_type": "a table",
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
    if kind in _STRICT_TYPES:
        return _STRICT_TYPES[kind]
    if kind == "string_too_long":
        return f"a string of at most {ctx.get('max_length')} characters"
    if kind == "string_too_short":
        return f"a string of at least {ctx.get('min_length')} character(s)"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


_UNION_MEMBERS = ("float", "bool")  # the loc pydantic appends for each member of Value


def _pydantic_problems(prefix: str, err: ValidationError) -> list[Problem]:
    probs: list[Problem] = []
    seen: set[str] = set()
    for e in err.errors():
        loc = list(e["loc"])
        union = bool(loc) and loc[-1] in _UNION_MEMBERS
        if union:  # `safe`: one line for the field, not one per member of float | bool
            loc = loc[:-1]
        path = ".".join(str(p) for p in (prefix, *loc) if p != "")
        if union and path in seen:
            continue
        seen.add(path)
        expected = "true/false or a number" if union else _expected(e)
        probs.append(Problem(path, e.get("input"), expected))
    return probs


# An OPC UA NodeId string (OPC 10000-6 §5.3.1.10): an optional namespace index or URI, then one
# identifier: numeric, string, GUID or opaque (base64). A string id is taken as it is, quotes and
# dots included (Siemens: `ns=3;s="DB_Heat"."heartbeat"`); the URI of `nsu=` has a scheme
# (RFC 3986: `urn:`, `http:`…) and no ';', and is looked up in the server's NamespaceArray at
# every connect. No control characters anywhere (a pasted line break is a typo, not an id).
_NODE_ID = re.compile(
    r"^(?:ns=(?P<ns>\d{1,5});|nsu=[^;\s=]+;)?"
    r"(?:i=(?P<i>\d{1,10})|s=.+|"
    r"g=[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|"
    r"b=(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?)$",
    re.S,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NODE_ID_FORMS = (
    "ns=<n>;i=<n> | ns=<n>;s=<text> | ns=<n>;g=<guid> | ns=<n>;b=<base64> (or nsu=<uri>;… "
    "with the namespace URI as the server lists it, e.g. urn:vendor:plc, http://… or "
    "CODESYSSPV3/3S/IecVarAccess: no spaces, ';' or '=')"
)


def valid_node_id(text: str) -> bool:
    """Whether `text` is a NodeId the OPC UA transport resolves (see `_NODE_ID`)."""
    m = _NODE_ID.match(text)
    if m is None or text.endswith("b=") or _CONTROL.search(text):
        return False
    ns, ident = m.group("ns"), m.group("i")
    return (ns is None or int(ns) <= 65535) and (ident is None or int(ident) <= 2**32 - 1)


def _check_tag(tag: Tag) -> list[Problem]:
    p = f"tags.{tag.name}"
    probs: list[Problem] = []
    if tag.opcua_node is not None and not valid_node_id(tag.opcua_node):
        probs.append(Problem(f"{p}.opcua_node", tag.opcua_node, f"a NodeId: {NODE_ID_FORMS}"))
    if tag.opcua_type is not None and tag.range[0] < tag.range[1]:
        why = opcua_type_problem(tag.is_bool, tag.range[0], tag.range[1], tag.opcua_type)
        if why is not None:
            probs.append(Problem(f"{p}.opcua_type", tag.opcua_type, why))
    if tag.is_bool and tuple(tag.range) != (0.0, 1.0):
        probs.append(Problem(f"{p}.range", list(tag.range), "[0, 1] for a bool tag"))
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
    if tag.forceable and tag.is_output:
        probs.append(
            Problem(
                f"{p}.forceable",
                tag.forceable,
                "only on an input (an engineer may force any output but the heartbeat)",
            )
        )
    return probs


def _check_roles(roles: RolesConfig) -> list[Problem]:
    """Each user a valid name, in one role only (a second role would be ambiguous)."""
    probs: list[Problem] = []
    first: dict[str, str] = {}
    for role in ROLE_NAMES:
        for i, user in enumerate(getattr(roles, role)):
            path = f"roles.{role}.{i}"
            if not USER_NAME.match(user):
                probs.append(
                    Problem(
                        path,
                        user,
                        "a POSIX user name (letters, digits, '.', '_', '-'; not starting with "
                        "'-'; at most 32 characters)",
                    )
                )
            elif user in first:
                where = first[user]
                also = f"in roles.{where}" if where != role else "earlier in the same list"
                probs.append(Problem(path, user, f"a user in one role only (also {also})"))
            else:
                first[user] = role
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


# The heartbeat counter must count at least this many distinct values before it wraps, so a PLC
# watchdog sampling it slowly cannot mistake a wrap for "unchanged".
HEARTBEAT_MIN_COUNTS = 255
# float32 represents every integer exactly only up to 2**24.
FLOAT32_EXACT = 2**24
_RAW_MAX = {Encoding.INT16: 32767, Encoding.UINT16: 65535, Encoding.INT32: 2**31 - 1}


def _check_heartbeat(hb: Tag) -> list[Problem]:
    """The counter 0, 1, 2, … range-high, 0, … must reach the PLC as distinct exact values."""
    p, mb = "tags.heartbeat", hb.modbus
    lo, hi = hb.range
    probs = []
    if mb.scale != 1:
        probs.append(Problem(f"{p}.modbus.scale", mb.scale, "1 (a counter sent as exact counts)"))
    if lo != 0 or hi != int(hi):
        probs.append(
            Problem(f"{p}.range", list(hb.range), "[0, N] with a whole N (the counter wraps to 0)")
        )
    elif hi - lo + 1 < HEARTBEAT_MIN_COUNTS:
        probs.append(
            Problem(
                f"{p}.range",
                list(hb.range),
                f"at least {HEARTBEAT_MIN_COUNTS} counts before the counter wraps",
            )
        )
    if mb.encoding is Encoding.FLOAT32 and hi > FLOAT32_EXACT:
        probs.append(
            Problem(
                f"{p}.range",
                list(hb.range),
                f"a high end ≤ 2**24 = {FLOAT32_EXACT} with encoding float32 "
                "(above it consecutive counts are not distinct)",
            )
        )
    if hb.opcua_type in ("Float", "Double") and hi > OPCUA_EXACT_MAX[hb.opcua_type]:
        # the integer types are held to their range by the tag check (opcua_type_problem)
        probs.append(
            Problem(
                f"{p}.range",
                list(hb.range),
                f"a high end ≤ {OPCUA_EXACT_MAX[hb.opcua_type]} with opcua_type "
                f"{hb.opcua_type} (above it consecutive counts are not distinct)",
            )
        )
    raw_max = _RAW_MAX.get(mb.encoding)
    if raw_max is not None and hi > raw_max:
        probs.append(
            Problem(
                f"{p}.range", list(hb.range), f"a high end ≤ {raw_max} with {mb.encoding.value}"
            )
        )
    return probs


def is_safety_input(tag: Tag) -> bool:
    """Leak and fault inputs: a cut wire on them must never read healthy (DESIGN §8)."""
    return (
        tag.is_bool
        and not tag.is_output
        and (tag.name.startswith("leak_") or tag.name.endswith("_fault"))
    )


def _check_fail_safe_inputs(by_name: dict[str, Tag]) -> list[Problem]:
    probs = []
    for t in by_name.values():
        if is_safety_input(t) and t.fail_state is not True and t.supervised_by is None:
            probs.append(
                Problem(
                    f"tags.{t.name}.fail_state",
                    t.fail_state,
                    "true (de-energise-to-trip: a cut wire reads wet/faulted) or a "
                    "supervised_by fault input, for a leak or fault input",
                )
            )
        sup = by_name.get(t.supervised_by or "")
        if sup is not None and sup.is_bool and not sup.is_output and sup.fail_state is not True:
            probs.append(
                Problem(
                    f"tags.{t.name}.supervised_by",
                    t.supervised_by,
                    f"a fault input whose own cut wire reads faulted "
                    f"(tags.{sup.name}.fail_state = true)",
                )
            )
    return probs


# it_supply_high_c must sit at least this far above the supply setpoint, or normal control
# hunting around the setpoint would trip IL-01.
SETPOINT_MARGIN_K = 3.0
# The PLC watchdog must not trip while one request times out and the next scan retries it, and it
# must act within a few missed scans: timeout_s + 2 × period_s < watchdog_s ≤ the bound below.
WATCHDOG_MAX_SCANS = 10
WATCHDOG_MAX_TIMEOUTS = 2

# (threshold key, the input tag whose range it must lie inside)
_THRESHOLD_TAGS = (
    ("control", "it_supply_setpoint_c", "it_supply_temp"),
    ("control", "tank_full_c", "tank_bottom_temp"),
    ("interlocks", "it_supply_high_c", "it_supply_temp"),
    ("interlocks", "primary_flow_low_m3h", "primary_flow"),
    ("interlocks", "tank_top_high_c", "tank_top_temp"),
    ("interlocks", "secondary_pressure_high_bar", "secondary_pressure"),
    ("interlocks", "customer_supply_high_c", "customer_supply_temp"),
    ("interlocks", "freeze_ambient_c", "ambient_temp"),
    ("interlocks", "freeze_drycooler_out_c", "drycooler_out_temp"),
)

# The cross-field rules, as docs/site-file.md states them (generated from this table).
CROSS_RULES = (
    f"`interlocks.it_supply_high_c` ≥ `control.it_supply_setpoint_c` + {SETPOINT_MARGIN_K:g} K",
    "`plc.timeout_s` < `plc.watchdog_s`",
    "`plc.watchdog_s` > `plc.timeout_s` + 2 × `scan.period_s` (one timed-out request and a "
    "retry must not trip the PLC watchdog)",
    f"`plc.watchdog_s` ≤ {WATCHDOG_MAX_SCANS} × `scan.period_s` + {WATCHDOG_MAX_TIMEOUTS} × "
    "`plc.timeout_s` (the watchdog acts within a few missed scans)",
    "`plc.stale_after_s` > `scan.period_s` and `interlocks.stale_s` > `scan.period_s`",
    "with an OPC UA subscription, `interlocks.stale_s` > `plc.stale_after_s` / 2 + "
    "`scan.period_s` (an unchanged value is proven fresh only by the Read every "
    "`plc.stale_after_s` / 2)",
    "`plc.opcua.publish_interval_ms` / 1000 < `plc.stale_after_s`",
    "`control.tank_full_c` < `interlocks.tank_top_high_c` (the tank is full before it is too hot)",
    "`control.tank_full_c` < `interlocks.customer_supply_high_c` (a full tank must not close "
    "the customer valve)",
    "`interlocks.freeze_ambient_c` < `interlocks.freeze_drycooler_out_c` < "
    "`control.it_supply_setpoint_c`",
    "`control.fan_min_pct` < the high end of `tags.drycooler_fan_cmd.range` (the fan loop needs "
    "room to act)",
    "a threshold lies strictly inside the range of the tag it is compared with: "
    + ", ".join(f"`{s}.{k}` in `tags.{t}`" for s, k, t in _THRESHOLD_TAGS),
    "a tag's `frozen_s` > `interlocks.stale_s`",
    "`bms.port` differs from `sim.opcua_port`, and from `plc.port` when the PLC is on this host",
    "`tags.heartbeat`: scale 1, range [0, N] with N + 1 ≥ "
    f"{HEARTBEAT_MIN_COUNTS} counts, N ≤ 2**24 with float32 or `opcua_type` Float, within the "
    "encoding's raw range and within the range of its `opcua_type`",
    "a `leak_*` or `*_fault` input has `fail_state = true` or `supervised_by` a fault input "
    "whose own `fail_state` is true",
)


def _num(x: float) -> str:
    return f"{x:g}"


def cross_checks(sections: dict[str, Any], by_name: dict[str, Tag]) -> list[Problem]:
    """Pairs of settings that contradict each other; each line names both fields."""
    plc, scan, ctl, il, sim, bms = (
        sections.get(k) for k in ("plc", "scan", "control", "interlocks", "sim", "bms")
    )
    probs: list[Problem] = []

    def need(ok: bool, path: str, value: Any, expected: str) -> None:
        if not ok:
            probs.append(Problem(path, value, expected))

    if ctl and il:
        sp, hi = ctl.it_supply_setpoint_c, il.it_supply_high_c
        need(
            hi >= sp + SETPOINT_MARGIN_K,
            "interlocks.it_supply_high_c",
            hi,
            f"≥ control.it_supply_setpoint_c ({_num(sp)}) + {SETPOINT_MARGIN_K:g} K",
        )
        need(
            ctl.tank_full_c < il.tank_top_high_c,
            "control.tank_full_c",
            ctl.tank_full_c,
            f"below interlocks.tank_top_high_c ({_num(il.tank_top_high_c)})",
        )
        need(
            ctl.tank_full_c < il.customer_supply_high_c,
            "control.tank_full_c",
            ctl.tank_full_c,
            f"below interlocks.customer_supply_high_c ({_num(il.customer_supply_high_c)})",
        )
        need(
            il.freeze_drycooler_out_c < sp,
            "interlocks.freeze_drycooler_out_c",
            il.freeze_drycooler_out_c,
            f"below control.it_supply_setpoint_c ({_num(sp)})",
        )
    if il:
        need(
            il.freeze_ambient_c < il.freeze_drycooler_out_c,
            "interlocks.freeze_ambient_c",
            il.freeze_ambient_c,
            f"below interlocks.freeze_drycooler_out_c ({_num(il.freeze_drycooler_out_c)})",
        )
        for t in by_name.values():
            if t.frozen_s is not None:
                need(
                    t.frozen_s > il.stale_s,
                    f"tags.{t.name}.frozen_s",
                    t.frozen_s,
                    f"longer than interlocks.stale_s ({_num(il.stale_s)})",
                )
    if plc:
        need(
            plc.timeout_s < plc.watchdog_s,
            "plc.timeout_s",
            plc.timeout_s,
            f"shorter than plc.watchdog_s ({_num(plc.watchdog_s)})",
        )
        need(
            plc.opcua.publish_interval_ms / 1000 < plc.stale_after_s,
            "plc.opcua.publish_interval_ms",
            plc.opcua.publish_interval_ms,
            f"shorter than plc.stale_after_s ({_num(plc.stale_after_s)} s)",
        )
    if plc and scan:
        per, wd, to = scan.period_s, plc.watchdog_s, plc.timeout_s
        if to < wd:  # else reported above
            need(
                wd > to + 2 * per,
                "plc.watchdog_s",
                wd,
                f"longer than plc.timeout_s ({_num(to)}) + 2 × scan.period_s ({_num(per)})",
            )
        top = WATCHDOG_MAX_SCANS * per + WATCHDOG_MAX_TIMEOUTS * to
        need(
            wd <= top + 1e-9,
            "plc.watchdog_s",
            wd,
            f"≤ {WATCHDOG_MAX_SCANS} × scan.period_s ({_num(per)}) + {WATCHDOG_MAX_TIMEOUTS} × "
            f"plc.timeout_s ({_num(to)}) = {_num(top)}",
        )
        need(
            plc.stale_after_s > per,
            "plc.stale_after_s",
            plc.stale_after_s,
            f"longer than scan.period_s ({_num(per)})",
        )
    if il and scan:
        need(
            il.stale_s > scan.period_s,
            "interlocks.stale_s",
            il.stale_s,
            f"longer than scan.period_s ({_num(scan.period_s)})",
        )
    if il and scan and plc and plc.transport == "opcua" and plc.opcua.subscribe:
        refresh = plc.stale_after_s / 2 + scan.period_s
        need(
            il.stale_s > refresh,
            "interlocks.stale_s",
            il.stale_s,
            f"longer than plc.stale_after_s ({_num(plc.stale_after_s)}) / 2 + scan.period_s "
            f"({_num(scan.period_s)}) = {_num(refresh)} with an OPC UA subscription",
        )
    fan = by_name.get("drycooler_fan_cmd")
    if ctl and fan is not None:
        need(
            ctl.fan_min_pct < fan.hi,
            "control.fan_min_pct",
            ctl.fan_min_pct,
            f"below the high end of tags.drycooler_fan_cmd.range ({_num(fan.hi)})",
        )
    for section, key, tag_name in _THRESHOLD_TAGS:
        cfg, t = sections.get(section), by_name.get(tag_name)
        if cfg is None or t is None or t.is_bool:
            continue
        v = getattr(cfg, key)
        need(
            t.lo < v < t.hi,
            f"{section}.{key}",
            v,
            f"inside tags.{tag_name}.range {[t.lo, t.hi]}",
        )
    if bms and sim:
        need(bms.port != sim.opcua_port, "bms.port", bms.port, "a port other than sim.opcua_port")
    if bms and plc and plc.host in ("127.0.0.1", "localhost"):
        need(bms.port != plc.port, "bms.port", bms.port, "a port other than plc.port")
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


def parse_site(
    data: dict[str, Any],
    source: str = "<site>",
    folder: Path | None = None,
    source_sha256: str = "",
) -> Site:
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
        if name in _OPTIONAL_SECTIONS and name not in data:
            sections[name] = None
            continue
        try:
            sections[name] = TypeAdapter(model).validate_python(data.get(name, {}))
        except ValidationError as e:
            found = _pydantic_problems(name, e)
            if name == "roles":  # an unknown key there is an unknown role, say which exist
                found = [
                    Problem(p.path, p.value, f"a role name: {', '.join(ROLE_NAMES)}")
                    if p.expected.startswith("no such key")
                    else p
                    for p in found
                ]
            probs += found

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
    elif hb is not None:
        probs += _check_heartbeat(hb)
    probs += _check_fail_safe_inputs(by_name)
    probs += cross_checks(sections, by_name)
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
    roles = sections.pop("roles", None)
    if roles is not None:
        probs += _check_roles(roles)
    if probs:
        raise SiteError(source, probs)
    return Site(
        **sections,
        roles=roles.by_user(),
        tags=tuple(tags),
        folder=folder or Path("."),
        source_sha256=source_sha256,
    )


# Site files are small; anything bigger is not a site file (and is not read into memory whole).
MAX_SITE_BYTES = 4 * 1024 * 1024


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A small UTF-8 text file's contents, or ValueError with one line saying why not."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SITE_BYTES + 1)
    except IsADirectoryError:
        raise ValueError(f"expected a readable {what}, found a directory") from None
    except OSError as e:
        raise ValueError(f"expected a readable {what} ({e.strerror or e})") from None
    if len(raw) > MAX_SITE_BYTES:
        raise ValueError(f"expected a {what} of at most {MAX_SITE_BYTES} bytes")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError("a byte-order mark at the start; save as UTF-8 without BOM")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"expected UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8"
        ) from None


def parse_toml(text: str) -> dict[str, Any]:
    """tomllib.loads, with every failure as ValueError naming the reason in one line."""
    if text.startswith("\ufeff"):
        raise ValueError("a byte-order mark at the start; save as UTF-8 without BOM")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        hint = " — a key or tag defined twice" if "overwrite" in str(e) else ""
        raise ValueError(f"not valid TOML: {e}{hint}") from None
    except RecursionError:
        raise ValueError("not valid TOML: arrays or tables nested too deeply") from None


def load_site(path: str | Path) -> Site:
    """Read and validate a site file. Raises SiteError (never a bare parse traceback)."""
    path = Path(path)
    try:
        text = read_text_file(path)
    except ValueError as e:
        raise SiteError(str(path), [Problem("(file)", None, str(e), plain=True)]) from None
    return loads_site(text, str(path), path.resolve().parent)


def loads_site(text: str, source: str = "<site>", folder: Path | None = None) -> Site:
    try:
        data = parse_toml(text)
    except ValueError as e:
        raise SiteError(source, [Problem("(file)", None, str(e), plain=True)]) from None
    # the file's bytes: read_text_file decoded strict UTF-8, so encoding gives them back
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        return parse_site(data, source, folder, digest)
    except RecursionError:  # a deeply nested value reached validation
        raise SiteError(
            source, [Problem("(file)", None, "values nested too deeply", plain=True)]
        ) from None


def demo_site_text() -> str:
    """The embedded demo site file, as `heatloop init` writes it."""
    return resources.files("plc_io").joinpath("demo_site.toml").read_text(encoding="utf-8")


def set_key(text: str, section: str, key: str, value: Any) -> str:
    """Site file `text` with `key = value` (as TOML) in `[section]`, where the key already
    stands: a copy of the demo site made for a test or a demonstration keeps its comments."""
    lines = text.splitlines(keepends=True)
    inside = False
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("["):
            inside = s == f"[{section}]"
            continue
        if inside and s.split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {json.dumps(value)}\n"
            return "".join(lines)
    raise KeyError(f"[{section}] {key} not in the site file text")


def demo_site(folder: Path | None = None) -> Site:
    return loads_site(demo_site_text(), "<demo site>", folder)
