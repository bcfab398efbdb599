"""Faults of the simulated PLC's communications (not of the plant): drop, slow, error, garble.

The plant's faults live in sim.faults and change the plant state; these change how the PLC
answers on the wire. Times are in the PLC's wall clock, passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pymodbus.constants import ExcCodes

PLC_FAULT_NAMES = ("comms_drop", "comms_slow", "comms_error", "comms_garble")
MAX_DROP_S = 3600.0
MAX_SLOW_S = 60.0


class PlcFaultValueError(ValueError):
    """A PLC fault's arguments are wrong: which field, the value given, what was expected."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{field}: {value!r}: expected {expected}")


@dataclass
class CommsFaults:
    """The PLC faults in force. `drop_until_s` is a deadline; the others last until cleared."""

    drop_until_s: float | None = None
    slow_s: float = 0.0
    error_code: int | None = None
    garble: bool = False

    def dropped(self, now_s: float) -> bool:
        return self.drop_until_s is not None and now_s < self.drop_until_s

    def active(self, now_s: float) -> dict[str, float]:
        """The faults in force now, by name, with their value (for logs and the OPC UA view)."""
        out: dict[str, float] = {}
        if self.dropped(now_s) and self.drop_until_s is not None:
            out["comms_drop"] = self.drop_until_s - now_s
        if self.slow_s > 0:
            out["comms_slow"] = self.slow_s
        if self.error_code is not None:
            out["comms_error"] = float(self.error_code)
        if self.garble:
            out["comms_garble"] = 1.0
        return out

    def inject(self, name: str, target: str, value: float, now_s: float) -> None:
        if target:
            raise PlcFaultValueError("target", target, "'' (PLC faults take no target)")
        v = float(value)
        if name == "comms_drop":
            if not (math.isfinite(v) and 0 < v <= MAX_DROP_S):
                raise PlcFaultValueError("value", value, f"seconds, 0 < value ≤ {MAX_DROP_S:g}")
            self.drop_until_s = now_s + v
        elif name == "comms_slow":
            if not (math.isfinite(v) and 0 < v <= MAX_SLOW_S):
                raise PlcFaultValueError(
                    "value", value, f"seconds of delay, 0 < value ≤ {MAX_SLOW_S:g}"
                )
            self.slow_s = v
        elif name == "comms_error":
            codes = sorted(int(c) for c in ExcCodes)
            if not (math.isfinite(v) and v == int(v) and int(v) in codes):
                raise PlcFaultValueError("value", value, f"a Modbus exception code, one of {codes}")
            self.error_code = int(v)
        elif name == "comms_garble":
            self.garble = True
        else:
            raise PlcFaultValueError("name", name, f"one of {list(PLC_FAULT_NAMES)}")

    def clear(self, name: str) -> None:
        if name == "comms_drop":
            self.drop_until_s = None
        elif name == "comms_slow":
            self.slow_s = 0.0
        elif name == "comms_error":
            self.error_code = None
        elif name == "comms_garble":
            self.garble = False
        else:
            raise PlcFaultValueError("name", name, f"one of {list(PLC_FAULT_NAMES)}")

    def clear_all(self) -> None:
        self.drop_until_s = None
        self.slow_s = 0.0
        self.error_code = None
        self.garble = False
