"""The default interlocks of DESIGN §6 as data: one table drives the runtime layer, the HIL
tests, the commissioning checklist and the cause-and-effect matrix.

A rule's cause reads validated points and thresholds; its effects are forced output values,
which may depend on the points (IL-01 adds the heat exchanger as a sink only while the tank is
colder than the return). Causes treat an invalid point as whatever fails toward cooling: an
unknown supply temperature is IL-02, an unknown primary flow counts as low.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from plc_io.tags import Value

if TYPE_CHECKING:
    from interlocks.validation import Point

Points = Mapping[str, "Point"]
Effects = dict[str, Value]


@dataclass(frozen=True)
class Thresholds:
    it_supply_high_c: float
    primary_flow_low_m3h: float
    tank_top_high_c: float
    secondary_pressure_high_bar: float
    customer_supply_high_c: float
    freeze_ambient_c: float
    freeze_drycooler_out_c: float
    fan_min_pct: float
    hx_sink_margin_k: float = 2.0  # tank this much colder than the return: the HX can cool


@dataclass(frozen=True)
class Rule:
    id: str
    hazard: str
    cause_text: str
    effect_text: str
    cause: Callable[[Points, Thresholds], bool]
    effects: Callable[[Points, Thresholds], Effects]
    delay_s: float = 0.0
    latching: bool = False
    reset_text: str = "automatic when the cause clears"
    bypassable: bool = True
    max_bypass_s: float = 4 * 3600.0
    response_s: float = 1.0  # required time from cause to effect at the PLC outputs (delay incl.)
    isolation: bool = False  # a leak's isolation of the reuse circuit always holds
    alarm: str = ""  # who is alarmed besides the operator
    # Rules of one group share their debounce clock: a cause that flips between "too hot" and
    # "unknown" still acts after the delay, instead of restarting both clocks at every flip.
    group: str = ""

    @property
    def clock(self) -> str:
        return self.group or self.id


def _invalid(p: Points, name: str) -> bool:
    pt = p.get(name)
    return pt is None or not pt.valid


def _above(p: Points, name: str, limit: float) -> bool:
    return p[name].num() > limit if name in p else False


def _wet(p: Points, name: str) -> bool:
    pt = p.get(name)
    return pt is not None and pt.valid and pt.value is True


ISOLATE_REUSE: Effects = {
    "reuse_valve_cmd": 0.0,
    "secondary_pump_cmd": False,
    "reuse_isolation_cmd": False,
    "customer_isolation_cmd": False,
}


def _all_sinks(p: Points, th: Thresholds) -> Effects:
    fx: Effects = {
        "drycooler_fan_cmd": 100.0,
        "primary_pump_a_cmd": True,
        "primary_pump_b_cmd": True,
        "primary_pump_speed_cmd": 100.0,
    }
    tank = p["tank_bottom_temp"].num() if "tank_bottom_temp" in p else float("nan")
    ret = p["it_return_temp"].num() if "it_return_temp" in p else float("nan")
    if tank < ret - th.hx_sink_margin_k:  # NaN compares false: an unknown tank is no sink
        fx |= {
            "reuse_valve_cmd": 100.0,
            "secondary_pump_cmd": True,
            "secondary_pump_speed_cmd": 100.0,
            "reuse_isolation_cmd": True,
        }
    return fx


def _supply_high(p: Points, th: Thresholds) -> bool:
    return _above(p, "it_supply_temp", th.it_supply_high_c)


def _supply_invalid(p: Points, th: Thresholds) -> bool:
    return _invalid(p, "it_supply_temp")


def _flow_low(p: Points, th: Thresholds) -> bool:
    pt = p.get("primary_flow")
    return pt is None or not pt.valid or pt.num() < th.primary_flow_low_m3h


def _start_standby(p: Points, th: Thresholds) -> Effects:
    return {"primary_pump_a_cmd": True, "primary_pump_b_cmd": True}


def _leak_reuse(p: Points, th: Thresholds) -> bool:
    return _wet(p, "leak_reuse")


def _leak_primary(p: Points, th: Thresholds) -> bool:
    return _wet(p, "leak_primary")


def _isolate(p: Points, th: Thresholds) -> Effects:
    return dict(ISOLATE_REUSE)


def _tank_or_pressure_high(p: Points, th: Thresholds) -> bool:
    return _above(p, "tank_top_temp", th.tank_top_high_c) or _above(
        p, "secondary_pressure", th.secondary_pressure_high_bar
    )


def _stop_charging(p: Points, th: Thresholds) -> Effects:
    return {"reuse_valve_cmd": 0.0, "secondary_pump_cmd": False}


def _customer_hot(p: Points, th: Thresholds) -> bool:
    return _above(p, "customer_supply_temp", th.customer_supply_high_c)


def _close_customer(p: Points, th: Thresholds) -> Effects:
    return {"customer_isolation_cmd": False}


def _freeze(p: Points, th: Thresholds) -> bool:
    amb, out = p.get("ambient_temp"), p.get("drycooler_out_temp")
    if amb is None or out is None:
        return False
    return amb.num() < th.freeze_ambient_c and out.num() < th.freeze_drycooler_out_c


def _fans_min(p: Points, th: Thresholds) -> Effects:
    return {"drycooler_fan_cmd": th.fan_min_pct, "primary_pump_a_cmd": True}


def _never(p: Points, th: Thresholds) -> bool:
    return False  # IL-08 is raised by the supervisor from the link state, not from points


def _nothing(p: Points, th: Thresholds) -> Effects:
    return {}


RULES: tuple[Rule, ...] = (
    Rule(
        "IL-01",
        "servers overheat: supply to the racks too hot",
        "it_supply_temp above it_supply_high_c",
        "dry cooler fans 100 %; both primary pumps at 100 %; HX in service when the tank is "
        "colder than the return",
        _supply_high,
        _all_sinks,
        delay_s=2.0,
        bypassable=False,
        response_s=3.0,
        alarm="IT",
        group="supply",
    ),
    Rule(
        "IL-02",
        "servers overheat unseen: supply temperature unknown",
        "it_supply_temp invalid (comms, stale, NaN, out of range, frozen, implausible rate)",
        "as IL-01: fail toward cooling",
        _supply_invalid,
        _all_sinks,
        delay_s=1.0,
        bypassable=False,
        response_s=2.0,
        alarm="IT",
        group="supply",
    ),
    Rule(
        "IL-03",
        "loss of primary circulation",
        "primary_flow below primary_flow_low_m3h (or unknown) with a pump commanded",
        "start the standby primary pump; alarm",
        _flow_low,
        _start_standby,
        delay_s=5.0,
        response_s=6.0,
        alarm="IT",
    ),
    Rule(
        "IL-04",
        "water damage and loss of fluid: leak in the reuse zone",
        "leak_reuse wet",
        "reuse valve to bypass, secondary pump off, reuse and customer isolation closed",
        _leak_reuse,
        _isolate,
        latching=True,
        reset_text="leak dry and a deliberate reset (ResetTrip)",
        bypassable=False,
        response_s=1.0,
        isolation=True,
    ),
    Rule(
        "IL-05",
        "water damage near the racks: leak in the primary zone",
        "leak_primary wet",
        "as IL-04, alarm to IT; primary pumps keep running",
        _leak_primary,
        _isolate,
        latching=True,
        reset_text="leak dry and a deliberate reset (ResetTrip)",
        bypassable=False,
        response_s=1.0,
        isolation=True,
        alarm="IT",
    ),
    Rule(
        "IL-06",
        "tank or secondary circuit overheated or overpressured",
        "tank_top_temp above tank_top_high_c or secondary_pressure above "
        "secondary_pressure_high_bar",
        "stop charging: reuse valve to bypass, secondary pump off",
        _tank_or_pressure_high,
        _stop_charging,
        delay_s=2.0,
        response_s=3.0,
    ),
    Rule(
        "IL-07",
        "customer scalded or its equipment damaged",
        "customer_supply_temp above customer_supply_high_c",
        "close the customer isolation valve",
        _customer_hot,
        _close_customer,
        delay_s=2.0,
        response_s=3.0,
    ),
    Rule(
        "IL-08",
        "no supervision: PLC comms lost",
        "PLC link lost",
        "nothing can be written: the PLC watchdog takes over; on return DRY_COOLER_REJECT",
        _never,
        _nothing,
        bypassable=False,
        response_s=3.0,
    ),
    Rule(
        "IL-09",
        "dry cooler freezes",
        "ambient_temp below freeze_ambient_c and drycooler_out_temp below freeze_drycooler_out_c",
        "dry cooler fans to minimum; keep primary circulation",
        _freeze,
        _fans_min,
        delay_s=30.0,
        response_s=31.0,
    ),
)

RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}


def matrix_lines(outputs: tuple[str, ...], th: Thresholds) -> list[str]:
    """The cause-and-effect matrix: one row per rule, one column per output it can force."""
    from interlocks.validation import Point

    # Evaluate effects at a point set that makes conditional effects show their widest form.
    probe: dict[str, Point] = {
        "tank_bottom_temp": Point(0.0, True),
        "it_return_temp": Point(100.0, True),
    }
    cols = [o for o in outputs if any(o in r.effects(probe, th) for r in RULES)]
    short = {c: c.removesuffix("_cmd") for c in cols}
    head = ["id", "latch", "bypass", "delay", *short.values(), "cause"]
    rows = [head]
    for r in RULES:
        fx, always = r.effects(probe, th), r.effects({}, th)
        cells = []
        for c in cols:
            v = fx.get(c)
            cell = "" if v is None else ("on" if v is True else "off" if v is False else f"{v:g}")
            cells.append(cell + ("*" if v is not None and c not in always else ""))
        rows.append(
            [
                r.id,
                "yes" if r.latching else "",
                "no" if not r.bypassable else "≤4h",
                f"{r.delay_s:g}s",
                *cells,
                r.cause_text,
            ]
        )
    w = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return [
        "  ".join(c.ljust(x) for c, x in zip(row[:-1], w, strict=True)) + "  " + row[-1]
        for row in rows
    ]
