"""The tag table: one entry per plant signal, the single source for every view of it."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict


class Direction(StrEnum):
    INPUT = "input"
    OUTPUT = "output"


class DataType(StrEnum):
    FLOAT = "float"
    BOOL = "bool"


class ModbusTable(StrEnum):
    """Modbus object types. Only holding registers and coils can be written."""

    HOLDING = "holding"
    INPUT = "input"
    COIL = "coil"
    DISCRETE = "discrete"


class Encoding(StrEnum):
    INT16 = "int16"  # signed, value = raw * scale
    UINT16 = "uint16"  # unsigned, value = raw * scale
    INT32 = "int32"  # two registers, value = raw * scale
    FLOAT32 = "float32"  # two registers, IEEE 754
    BIT = "bit"  # coil or discrete input


REGISTER_WIDTH: dict[Encoding, int] = {
    Encoding.INT16: 1,
    Encoding.UINT16: 1,
    Encoding.INT32: 2,
    Encoding.FLOAT32: 2,
    Encoding.BIT: 1,
}

# Units the project speaks (DESIGN §8), plus counters and seconds for diagnostics.
UNITS = frozenset({"°C", "m³/h", "bar", "kW", "kWh", "%", "bool", "count", "s"})

# The tags DESIGN §8 promises every site defines.
REQUIRED_INPUTS = (
    "it_supply_temp",
    "it_return_temp",
    "primary_flow",
    "primary_pressure",
    "hx_primary_out_temp",
    "hx_secondary_in_temp",
    "hx_secondary_out_temp",
    "secondary_flow",
    "secondary_pressure",
    "tank_top_temp",
    "tank_mid_temp",
    "tank_bottom_temp",
    "customer_supply_temp",
    "customer_return_temp",
    "customer_flow",
    "drycooler_out_temp",
    "ambient_temp",
    "it_power",
    "heat_meter_power",
    "heat_meter_energy",
    "reuse_valve_pos",
    "leak_primary",
    "leak_reuse",
    "customer_ready",
    "primary_pump_a_running",
    "primary_pump_b_running",
    "secondary_pump_running",
    "drycooler_fault",
)
# The required inputs that are booleans (leak sensors, ready and run signals, faults).
REQUIRED_BOOL_INPUTS = REQUIRED_INPUTS[REQUIRED_INPUTS.index("leak_primary") :]
REQUIRED_OUTPUTS = (
    "reuse_valve_cmd",
    "drycooler_fan_cmd",
    "primary_pump_a_cmd",
    "primary_pump_b_cmd",
    "primary_pump_speed_cmd",
    "secondary_pump_cmd",
    "secondary_pump_speed_cmd",
    "customer_isolation_cmd",
    "reuse_isolation_cmd",
    "heartbeat",
)

Value = float | bool

# The OPC UA scalar types a PLC variable may have (IEC 61131-3 BOOL, SINT, USINT/BYTE, INT,
# UINT/WORD, DINT, UDINT/DWORD, REAL, LREAL), by the name the site file's `opcua_type` uses.
OpcuaType = Literal[
    "Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Float", "Double"
]
OPCUA_TYPES: tuple[str, ...] = (
    "Boolean",
    "SByte",
    "Byte",
    "Int16",
    "UInt16",
    "Int32",
    "UInt32",
    "Float",
    "Double",
)
# The values each integer type holds (OPC 10000-3 §8: built-in types).
OPCUA_INT_RANGE: dict[str, tuple[int, int]] = {
    "SByte": (-(2**7), 2**7 - 1),
    "Byte": (0, 2**8 - 1),
    "Int16": (-(2**15), 2**15 - 1),
    "UInt16": (0, 2**16 - 1),
    "Int32": (-(2**31), 2**31 - 1),
    "UInt32": (0, 2**32 - 1),
}
FLOAT32_MAX = 3.4028234663852886e38
# Integers every count of which the type carries exactly (a heartbeat counter's high end).
OPCUA_EXACT_MAX: dict[str, int] = {
    **{k: hi for k, (_, hi) in OPCUA_INT_RANGE.items()},
    "Float": 2**24,
    "Double": 2**53,
}


def opcua_type_problem(tag_is_bool: bool, lo: float, hi: float, opcua_type: str) -> str | None:
    """Why a tag (bool or analogue, engineering range [lo, hi]) cannot live in a variable of
    this OPC UA type, or None. A bool tag takes Boolean or an integer type (0/1, as a flag in a
    register); an analogue tag takes any numeric type whose range holds the tag's (an integer
    type rounds the value: a fractional resolution is lost, never refused)."""
    if tag_is_bool:
        if opcua_type == "Boolean" or opcua_type in OPCUA_INT_RANGE:
            return None
        return f"Boolean or an integer type for a bool tag, not {opcua_type}"
    if opcua_type == "Boolean":
        return "a numeric type for an analogue tag, not Boolean"
    if opcua_type in OPCUA_INT_RANGE:
        t_lo, t_hi = OPCUA_INT_RANGE[opcua_type]
        if not (t_lo - 0.5 < lo and hi < t_hi + 0.5):
            return f"a type that holds range [{lo:g}, {hi:g}]; {opcua_type} holds {t_lo}…{t_hi}"
    return None


# Site-file values are taken strictly: `port = true` is not port 1, `safe = "yes"` is not true.
# A float accepts an integer (TOML `3` for 3.0) but never a boolean or a string; inf and NaN are
# refused everywhere (a threshold of inf disables its interlock).
STRICT = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
# The largest magnitude of an engineering value (range ends): finite and far above any plant's.
MAX_ENGINEERING = 1e12
Finite = Annotated[float, Strict(), Field(ge=-MAX_ENGINEERING, le=MAX_ENGINEERING)]
# A pair from a TOML array (a list): the pair itself is lax, its members are strict.
FinitePair = Annotated[tuple[Finite, Finite], Strict(False)]


class ModbusPoint(BaseModel):
    """Where and how a tag lives in the PLC's Modbus map."""

    model_config = STRICT

    table: ModbusTable = Field(strict=False)  # from its name in the file
    address: int = Field(ge=0, le=65535)
    encoding: Encoding = Field(strict=False)
    scale: float = Field(1.0, ge=-1e6, le=1e6)
    word_order: Literal["big", "little"] = "big"

    @property
    def width(self) -> int:
        return REGISTER_WIDTH[self.encoding]

    @property
    def is_bit(self) -> bool:
        return self.table in (ModbusTable.COIL, ModbusTable.DISCRETE)


class Tag(BaseModel):
    """One plant signal: its name, unit, engineering range and where the PLC keeps it."""

    model_config = STRICT

    name: str = Field(max_length=64)
    direction: Direction = Field(strict=False)  # from its name in the file
    type: DataType = Field(strict=False)
    unit: str
    range: FinitePair
    description: str = Field("", max_length=500)
    modbus: ModbusPoint
    opcua_node: str | None = Field(None, max_length=4096)
    # the PLC variable's OPC UA type, checked against the node's DataType at connect (None: take
    # the node's); outputs are written as this type
    opcua_type: OpcuaType | None = None
    safe: Value | None = None  # outputs only: the value the PLC watchdog falls back to
    verify: bool = False  # outputs only: read back after writing
    # boolean inputs only: what the input reads when its circuit is cut / de-energised
    fail_state: bool | None = None
    # boolean inputs only: another boolean input that reads true while this one's circuit is
    # faulted (a leak-detection module's per-zone fault contact); true or invalid -> this invalid
    supervised_by: str | None = None
    # analogue inputs only: this tag's frozen-sensor window, overriding [interlocks].frozen_s
    frozen_s: float | None = Field(None, gt=0, le=86400)
    # inputs only: an engineer may force this input (with expiry); outputs but the heartbeat
    # are always forceable
    forceable: bool = False

    @property
    def lo(self) -> float:
        return self.range[0]

    @property
    def hi(self) -> float:
        return self.range[1]

    @property
    def is_output(self) -> bool:
        return self.direction is Direction.OUTPUT

    @property
    def is_bool(self) -> bool:
        return self.type is DataType.BOOL
