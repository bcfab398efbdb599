"""Faults of the simulated PLC's communications (not of the plant): drop, slow, error, garble,
refused writes and deleted OPC UA nodes.

The plant's faults live in sim.faults and change the plant state; these change how the PLC
answers on the wire. Times are in the PLC's wall clock, passed in.

- `write_refused`, target "" (every output), "coil" or "holding" (the outputs in that Modbus
  table; on OPC UA the same tags), value = Modbus exception code: writes to those outputs are
  refused (Modbus: that exception; OPC UA: BadDeviceFailure) and nothing is applied. Reads
  still work: a PLC whose output card or data block is write-protected.
- `nodes_deleted`, target "", value = seconds: the OPC UA face deletes every `Objects/PLC/<tag>`
  node for that long, then creates them again (a PLC program download). Modbus is untouched.
- `wrong_type`, target = a tag, value 1: the OPC UA face serves that tag with the other scalar
  type (a Boolean true for an analogue tag, a Double NaN for a boolean tag); value 2: a String.
  Until cleared. Modbus is untouched (registers have no type).
- `watchdog_broken`, target "", value ignored: the PLC's watchdog never trips while injected (a
  PLC program with the watchdog rung deleted), so a commissioning watchdog test must fail. A
  trip already in force stays as it is; clearing the fault restores normal supervision, timed
  from that moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes

PLC_FAULT_NAMES = (
    "comms_drop",
    "comms_slow",
    "comms_error",
    "comms_garble",
    "write_refused",
    "nodes_deleted",
    "wrong_type",
    "watchdog_broken",
)
WRONG_TYPE_KINDS = {1: "the other scalar type", 2: "a String"}
WRITE_TARGETS = ("", "coil", "holding")
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
    write_refused: dict[str, int] = field(default_factory=dict)  # target -> exception code
    nodes_deleted_until_s: float | None = None
    wrong_types: dict[str, int] = field(default_factory=dict)  # tag -> WRONG_TYPE_KINDS key
    watchdog_broken: bool = False  # the watchdog rung is gone: no trip while set
    tag_names: frozenset[str] = frozenset()  # set by the PLC: targets `wrong_type` may name

    def dropped(self, now_s: float) -> bool:
        return self.drop_until_s is not None and now_s < self.drop_until_s

    def write_refusal(self, table: str) -> int | None:
        """The exception code a write to an output in this Modbus table gets, or None."""
        code = self.write_refused.get(table)
        return code if code is not None else self.write_refused.get("")

    def nodes_gone(self, now_s: float) -> bool:
        """Whether the OPC UA face's PLC nodes are deleted now."""
        return self.nodes_deleted_until_s is not None and now_s < self.nodes_deleted_until_s

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
        for target, kind in self.wrong_types.items():
            out[f"wrong_type {target}"] = float(kind)
        for target, code in self.write_refused.items():
            out[f"write_refused {target or '*'}"] = float(code)
        if self.nodes_gone(now_s) and self.nodes_deleted_until_s is not None:
            out["nodes_deleted"] = self.nodes_deleted_until_s - now_s
        if self.watchdog_broken:
            out["watchdog_broken"] = 1.0
        return out

    def inject(self, name: str, target: str, value: float, now_s: float) -> None:
        if name == "write_refused":
            if target not in WRITE_TARGETS:
                raise PlcFaultValueError("target", target, f"one of {list(WRITE_TARGETS)}")
            self.write_refused[target] = _exception_code(value)
            return
        if name == "wrong_type":
            if not target or (self.tag_names and target not in self.tag_names):
                raise PlcFaultValueError("target", _bounded(target), "a tag of the site")
            if value not in WRONG_TYPE_KINDS:
                raise PlcFaultValueError("value", value, f"one of {WRONG_TYPE_KINDS}")
            self.wrong_types[target] = int(value)
            return
        if target:
            raise PlcFaultValueError("target", _bounded(target), "'' (PLC faults take no target)")
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
            self.error_code = _exception_code(v)
        elif name == "comms_garble":
            self.garble = True
        elif name == "watchdog_broken":
            self.watchdog_broken = True
        elif name == "nodes_deleted":
            if not (math.isfinite(v) and 0 < v <= MAX_DROP_S):
                raise PlcFaultValueError("value", value, f"seconds, 0 < value ≤ {MAX_DROP_S:g}")
            self.nodes_deleted_until_s = now_s + v
        else:
            raise PlcFaultValueError("name", _bounded(name), f"one of {list(PLC_FAULT_NAMES)}")

    def clear(self, name: str, target: str = "") -> None:
        """Clear a fault; for the targeted ones (`write_refused`, `wrong_type`) a target clears
        only that target, "" clears them all."""
        if target and name in ("write_refused", "wrong_type"):
            targets = self.write_refused if name == "write_refused" else self.wrong_types
            if target not in targets:
                raise PlcFaultValueError("target", _bounded(target), f"one of {sorted(targets)}")
            del targets[target]
            return
        if target:
            raise PlcFaultValueError("target", _bounded(target), "'' (PLC faults take no target)")
        if name == "comms_drop":
            self.drop_until_s = None
        elif name == "comms_slow":
            self.slow_s = 0.0
        elif name == "comms_error":
            self.error_code = None
        elif name == "comms_garble":
            self.garble = False
        elif name == "watchdog_broken":
            self.watchdog_broken = False
        elif name == "write_refused":
            self.write_refused.clear()
        elif name == "nodes_deleted":
            self.nodes_deleted_until_s = None
        elif name == "wrong_type":
            self.wrong_types.clear()
        else:
            raise PlcFaultValueError("name", _bounded(name), f"one of {list(PLC_FAULT_NAMES)}")

    def clear_all(self) -> None:
        self.drop_until_s = None
        self.slow_s = 0.0
        self.error_code = None
        self.garble = False
        self.write_refused.clear()
        self.nodes_deleted_until_s = None
        self.wrong_types.clear()
        self.watchdog_broken = False


def _exception_code(value: float) -> int:
    codes = sorted(int(c) for c in ExcCodes)
    v = float(value)
    if not (math.isfinite(v) and v == int(v) and int(v) in codes):
        raise PlcFaultValueError("value", value, f"a Modbus exception code, one of {codes}")
    return int(v)


BOUND_CHARS = 80


def _bounded(text: str) -> str:
    """A caller's string as quoted in an error or a log line: at most BOUND_CHARS, and says so
    (a 1 MB fault name must not become a 1 MB log line)."""
    if len(text) <= BOUND_CHARS:
        return text
    return f"{text[:BOUND_CHARS]}… ({len(text)} chars, truncated)"
