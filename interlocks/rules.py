"""The default interlocks of DESIGN §6 as data: one table drives the runtime layer, the HIL
tests, the commissioning checklist and the cause-and-effect matrix.

A rule's cause reads validated points and thresholds. Its effects are declared, not computed:
each `Effect` names an output, the value forced on it, and optionally a named `Condition` under
which it is forced (with the value forced otherwise), so the C&E matrix and the conflict tests
are generated from the table without calling the rule on made-up inputs. Its reset condition
is a named `Condition` too, evaluated by the engine.

Causes treat an invalid point as whatever fails toward cooling: an unknown supply temperature
is IL-02, an unknown primary flow counts as low, a leak zone invalid by supervision counts as
wet. Effects that use the reuse circuit or the customer as an emergency heat sink do so only
while that circuit's own protection inputs are valid and normal.

Merging (see `interlocks.engine`): a rule that protects a circuit (`protects`) wins on the
outputs of that circuit over any cooling wish; elsewhere the value that keeps more cooling wins.
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

SUPERVISION = "supervision"  # interlocks.validation.SUPERVISION (no import cycle at run time)

# The outputs of each circuit a protective rule may claim (DESIGN §2).
CIRCUITS: dict[str, tuple[str, ...]] = {
    "reuse": (
        "reuse_valve_cmd",
        "secondary_pump_cmd",
        "secondary_pump_speed_cmd",
        "reuse_isolation_cmd",
    ),
    "customer": ("customer_isolation_cmd",),
}


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
    # the loop's design pump speeds ([control]): what IL-01/IL-02 hold the pumps at
    primary_speed_pct: float = 80.0
    secondary_speed_pct: float = 80.0
    max_bypass_s: float = 4 * 3600.0  # the site's longest bypass; a rule may allow less


@dataclass(frozen=True)
class Condition:
    """A named condition on the points: evaluated by the engine, printed in the matrix."""

    name: str
    text: str
    test: Callable[[Points, Thresholds], bool]

    def __call__(self, p: Points, th: Thresholds) -> bool:
        return self.test(p, th)


@dataclass(frozen=True)
class Effect:
    """One forced output. `value` may name a `Thresholds` field (IL-09: fans to minimum).

    With `when`, the value is forced while the condition holds and `otherwise` (None: nothing)
    while it does not.
    """

    output: str
    value: Value | str
    when: Condition | None = None
    otherwise: Value | None = None

    def resolve(self, p: Points, th: Thresholds) -> Value | None:
        if self.when is not None and not self.when(p, th):
            return self.otherwise
        v = self.value
        return getattr(th, v) if isinstance(v, str) else v

    def shown(self, th: Thresholds) -> Value:
        """The value as the matrix shows it (a threshold name resolved)."""
        v = self.value
        return getattr(th, v) if isinstance(v, str) else v


@dataclass(frozen=True)
class Rule:
    id: str
    hazard: str
    cause_text: str
    effect_text: str
    cause: Callable[[Points, Thresholds], bool]
    forces: tuple[Effect, ...]
    reset: Condition  # when the rule may clear: by itself, or (latching) on a deliberate reset
    delay_s: float = 0.0
    latching: bool = False
    bypassable: bool = True
    max_bypass_s: float = 4 * 3600.0
    response_s: float = 1.0  # required time from cause to effect at the PLC outputs (delay incl.)
    # circuits this rule protects: on their outputs it wins over any cooling wish
    protects: tuple[str, ...] = ()
    alarm: str = ""  # who is alarmed besides the operator (into the interlock_active event)
    # Rules of one group share their debounce clock: a cause that flips between "too hot" and
    # "unknown" still acts after the delay, instead of restarting both clocks at every flip.
    group: str = ""

    @property
    def clock(self) -> str:
        return self.group or self.id

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(e.output for e in self.forces)

    def effects(self, p: Points, th: Thresholds) -> Effects:
        """The values this rule forces at these points."""
        out: Effects = {}
        for e in self.forces:
            v = e.resolve(p, th)
            if v is not None:
                out[e.output] = v
        return out


def _invalid(p: Points, name: str) -> bool:
    pt = p.get(name)
    return pt is None or not pt.valid


def _above(p: Points, name: str, limit: float) -> bool:
    return p[name].num() > limit if name in p else False


def _normal(p: Points, name: str, limit: float) -> bool:
    """Valid and not above its limit (NaN compares false: unknown is not normal)."""
    return p[name].num() <= limit if name in p else False


def _wet(p: Points, name: str) -> bool:
    """Wet, or its circuit reported faulted by its supervising input: a cut cable is a leak."""
    pt = p.get(name)
    if pt is None:
        return False
    return (pt.valid and pt.value is True) or pt.reason == SUPERVISION


def _dry(p: Points, name: str) -> bool:
    pt = p.get(name)
    return pt is not None and pt.valid and pt.value is False


def _true(p: Points, name: str) -> bool:
    pt = p.get(name)
    return pt is not None and pt.valid and pt.value is True


def leaks_dry(p: Points) -> bool:
    """Every leak zone is known to be dry (valid and false): the only state that lets a leak
    trip be left, or the reuse and customer circuits be used as emergency sinks."""
    return _dry(p, "leak_reuse") and _dry(p, "leak_primary")


def reuse_circuit_safe(p: Points, th: Thresholds) -> bool:
    """The reuse circuit's own protection inputs are valid and normal: both leak zones dry (IL-04
    and IL-05 isolate this circuit), secondary pressure and tank top not above their limits."""
    return (
        leaks_dry(p)
        and _normal(p, "secondary_pressure", th.secondary_pressure_high_bar)
        and _normal(p, "tank_top_temp", th.tank_top_high_c)
    )


def tank_is_sink(p: Points, margin_k: float) -> bool:
    """The tank bottom is colder than the return by `margin_k` (NaN compares false: an unknown
    tank is no sink, and a tank hotter than the return would heat the primary)."""
    tank = p["tank_bottom_temp"].num() if "tank_bottom_temp" in p else float("nan")
    ret = p["it_return_temp"].num() if "it_return_temp" in p else float("nan")
    return tank < ret - margin_k


def _hx_sink(p: Points, th: Thresholds) -> bool:
    """The reuse circuit may take heat as an emergency sink: it is a sink (by any margin when the
    dry cooler has failed, since the HX is then the only sink left) and it is safe to use."""
    margin = 0.0 if _true(p, "drycooler_fault") else th.hx_sink_margin_k
    return tank_is_sink(p, margin) and reuse_circuit_safe(p, th)


def customer_sink(p: Points, th: Thresholds) -> bool:
    """The customer path may stay open as a sink: its supply is known and not too hot, and no
    leak zone is wet or unknown (IL-04 and IL-05 isolate the customer too)."""
    return _normal(p, "customer_supply_temp", th.customer_supply_high_c) and leaks_dry(p)


HX_SINK = Condition(
    "hx_sink",
    "the reuse circuit is a sink and safe to use: tank_bottom_temp below it_return_temp by "
    "hx_sink_margin_k (by any margin while drycooler_fault is valid and true), leak_reuse and "
    "leak_primary valid and dry, secondary_pressure and tank_top_temp valid and not above their "
    "limits",
    _hx_sink,
)
CUSTOMER_SINK = Condition(
    "customer_sink",
    "customer_supply_temp valid and not above customer_supply_high_c, leak_reuse and "
    "leak_primary valid and dry",
    customer_sink,
)

# Primary flow is held at its design speed, not pushed to 100 %: the dry cooler is limited on
# its air side, so more water through it leaves it warmer (measured on the plant model, hot day,
# 420 kW: both pumps at 100 % peak 45.1 °C against 43.2 °C at design flow). The duty pump is
# held on; a failed one is handed over by the supervisor's failover, a lost flow by IL-03.
ALL_SINKS: tuple[Effect, ...] = (
    Effect("drycooler_fan_cmd", 100.0),
    Effect("primary_pump_a_cmd", True),
    Effect("primary_pump_speed_cmd", "primary_speed_pct"),
    # a tank that is no sink would heat the primary: then the valve goes to bypass, whatever
    # the mode (MAINTENANCE included)
    Effect("reuse_valve_cmd", 100.0, HX_SINK, otherwise=0.0),
    Effect("secondary_pump_cmd", True, HX_SINK),
    Effect("secondary_pump_speed_cmd", "secondary_speed_pct", HX_SINK),
    Effect("reuse_isolation_cmd", True, HX_SINK),
    Effect("customer_isolation_cmd", True, CUSTOMER_SINK),
)

ISOLATE_REUSE: tuple[Effect, ...] = (
    Effect("reuse_valve_cmd", 0.0),
    Effect("secondary_pump_cmd", False),
    Effect("reuse_isolation_cmd", False),
    Effect("customer_isolation_cmd", False),
)


def _not(cause: Callable[[Points, Thresholds], bool]) -> Callable[[Points, Thresholds], bool]:
    def gone(p: Points, th: Thresholds) -> bool:
        return not cause(p, th)

    return gone


def _supply_high(p: Points, th: Thresholds) -> bool:
    return _above(p, "it_supply_temp", th.it_supply_high_c)


def _supply_invalid(p: Points, th: Thresholds) -> bool:
    return _invalid(p, "it_supply_temp")


def _flow_low(p: Points, th: Thresholds) -> bool:
    pt = p.get("primary_flow")
    return pt is None or not pt.valid or pt.num() < th.primary_flow_low_m3h


def _leak_reuse(p: Points, th: Thresholds) -> bool:
    return _wet(p, "leak_reuse")


def _leak_primary(p: Points, th: Thresholds) -> bool:
    return _wet(p, "leak_primary")


def _reuse_dry(p: Points, th: Thresholds) -> bool:
    return _dry(p, "leak_reuse")


def _primary_dry(p: Points, th: Thresholds) -> bool:
    return _dry(p, "leak_primary")


def _tank_or_pressure_high(p: Points, th: Thresholds) -> bool:
    return _above(p, "tank_top_temp", th.tank_top_high_c) or _above(
        p, "secondary_pressure", th.secondary_pressure_high_bar
    )


def _customer_hot(p: Points, th: Thresholds) -> bool:
    return _above(p, "customer_supply_temp", th.customer_supply_high_c)


def _freeze(p: Points, th: Thresholds) -> bool:
    amb, out = p.get("ambient_temp"), p.get("drycooler_out_temp")
    if amb is None or out is None:
        return False
    return amb.num() < th.freeze_ambient_c and out.num() < th.freeze_drycooler_out_c


def _never(p: Points, th: Thresholds) -> bool:
    return False  # IL-08 is raised by the engine from the link state, not from points


def _always(p: Points, th: Thresholds) -> bool:
    return True  # IL-08 clears with the link, which the engine knows


RULES: tuple[Rule, ...] = (
    Rule(
        "IL-01",
        "servers overheat: supply to the racks too hot",
        "it_supply_temp above it_supply_high_c",
        "dry cooler fans 100 %; duty primary pump held on at design speed; every sink its own "
        "protections allow kept in service: HX and tank charging at full valve while the reuse "
        "circuit is a safe sink (else reuse valve to bypass), customer path open while its "
        "supply is known and not hot",
        _supply_high,
        ALL_SINKS,
        Condition(
            "supply_not_high",
            "automatic: it_supply_temp not above it_supply_high_c",
            _not(_supply_high),
        ),
        delay_s=2.0,
        bypassable=False,
        response_s=3.0,
        alarm="IT",
        group="supply",
    ),
    Rule(
        "IL-02",
        "servers overheat unseen: supply temperature unknown",
        "it_supply_temp invalid (comms, wrong kind, future or stale, NaN, out of range, frozen, "
        "rate, implausible against it_return_temp or drycooler_out_temp)",
        "as IL-01: fail toward cooling",
        _supply_invalid,
        ALL_SINKS,
        Condition("supply_valid", "automatic: it_supply_temp valid", _not(_supply_invalid)),
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
        (Effect("primary_pump_a_cmd", True), Effect("primary_pump_b_cmd", True)),
        Condition(
            "flow_ok",
            "automatic: primary_flow valid and not below primary_flow_low_m3h",
            _not(_flow_low),
        ),
        delay_s=5.0,
        response_s=6.0,
        alarm="IT",
    ),
    Rule(
        "IL-04",
        "water damage and loss of fluid: leak in the reuse zone",
        "leak_reuse wet, or invalid by supervision (its circuit faulted)",
        "reuse valve to bypass, secondary pump off, reuse and customer isolation closed",
        _leak_reuse,
        ISOLATE_REUSE,
        Condition(
            "reuse_dry",
            "leak_reuse valid and dry, then a deliberate reset (ResetTrip)",
            _reuse_dry,
        ),
        latching=True,
        bypassable=False,
        response_s=1.0,
        protects=("reuse", "customer"),
    ),
    Rule(
        "IL-05",
        "water damage near the racks: leak in the primary zone",
        "leak_primary wet, or invalid by supervision (its circuit faulted)",
        "as IL-04, alarm to IT; primary pumps keep running",
        _leak_primary,
        ISOLATE_REUSE,
        Condition(
            "primary_dry",
            "leak_primary valid and dry, then a deliberate reset (ResetTrip)",
            _primary_dry,
        ),
        latching=True,
        bypassable=False,
        response_s=1.0,
        protects=("reuse", "customer"),
        alarm="IT",
    ),
    Rule(
        "IL-06",
        "tank or secondary circuit overheated or overpressured",
        "tank_top_temp above tank_top_high_c or secondary_pressure above "
        "secondary_pressure_high_bar",
        "stop charging: reuse valve to bypass, secondary pump off",
        _tank_or_pressure_high,
        (Effect("reuse_valve_cmd", 0.0), Effect("secondary_pump_cmd", False)),
        Condition(
            "tank_and_pressure_ok",
            "automatic: tank_top_temp and secondary_pressure not above their limits",
            _not(_tank_or_pressure_high),
        ),
        delay_s=2.0,
        response_s=3.0,
        protects=("reuse",),
    ),
    Rule(
        "IL-07",
        "customer scalded or its equipment damaged",
        "customer_supply_temp above customer_supply_high_c",
        "close the customer isolation valve",
        _customer_hot,
        (Effect("customer_isolation_cmd", False),),
        Condition(
            "customer_not_hot",
            "automatic: customer_supply_temp not above customer_supply_high_c",
            _not(_customer_hot),
        ),
        delay_s=2.0,
        response_s=3.0,
        protects=("customer",),
    ),
    Rule(
        "IL-08",
        "no supervision: PLC comms lost",
        "PLC link lost",
        "nothing can be written: the PLC watchdog takes over; on return DRY_COOLER_REJECT",
        _never,
        (),
        Condition("link_back", "automatic: the PLC link is back", _always),
        bypassable=False,
        response_s=3.0,
    ),
    Rule(
        "IL-09",
        "dry cooler freezes",
        "ambient_temp below freeze_ambient_c and drycooler_out_temp below freeze_drycooler_out_c",
        "dry cooler fans to minimum; keep primary circulation",
        _freeze,
        (Effect("drycooler_fan_cmd", "fan_min_pct"), Effect("primary_pump_a_cmd", True)),
        Condition(
            "no_freeze",
            "automatic: ambient_temp or drycooler_out_temp back above its limit",
            _not(_freeze),
        ),
        delay_s=30.0,
        response_s=31.0,
    ),
)

RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}


def conditions(rules: tuple[Rule, ...] = RULES) -> list[Condition]:
    """The effect conditions of the table, in first-use order (the matrix's footnotes)."""
    seen: list[Condition] = []
    for r in rules:
        for e in r.forces:
            if e.when is not None and e.when not in seen:
                seen.append(e.when)
    return seen


def effect_cell(e: Effect | None, th: Thresholds, marks: Mapping[str, str]) -> str:
    """One matrix cell: the forced value, its condition's mark and the value otherwise."""
    if e is None:
        return ""

    def fmt(v: Value) -> str:
        return "on" if v is True else "off" if v is False else f"{v:g}"

    cell = fmt(e.shown(th))
    if e.when is not None:
        cell += f" [{marks[e.when.name]}]"
        if e.otherwise is not None:
            cell += f" else {fmt(e.otherwise)}"
    return cell


def matrix_columns(outputs: tuple[str, ...], rules: tuple[Rule, ...] = RULES) -> list[str]:
    """The outputs some rule forces, in tag-table order."""
    return [o for o in outputs if any(o in r.outputs for r in rules)]


def matrix_lines(outputs: tuple[str, ...], th: Thresholds) -> list[str]:
    """The cause-and-effect matrix: one row per rule, one column per output it can force, its
    reset condition, then the effect conditions as footnotes."""
    cols = matrix_columns(outputs)
    marks = {c.name: chr(ord("a") + i) for i, c in enumerate(conditions())}
    short = {c: c.removesuffix("_cmd") for c in cols}
    head = ["id", "latch", "bypass", "delay", "wins", *short.values(), "cause", "reset"]
    rows = [head]
    for r in RULES:
        by_out = {e.output: e for e in r.forces}
        rows.append(
            [
                r.id,
                "yes" if r.latching else "",
                "no" if not r.bypassable else f"≤{min(r.max_bypass_s, th.max_bypass_s) / 3600:g}h",
                f"{r.delay_s:g}s",
                "+".join(r.protects) or "cooling",
                *(effect_cell(by_out.get(c), th, marks) for c in cols),
                r.cause_text,
                r.reset.text,
            ]
        )
    w = [max(len(row[i]) for row in rows) for i in range(len(head) - 2)]
    lines = [
        "  ".join(c.ljust(x) for c, x in zip(row[:-2], w, strict=True))
        + "  "
        + row[-2]
        + "  | "
        + row[-1]
        for row in rows
    ]
    lines += [f"[{marks[c.name]}] while {c.text}" for c in conditions()]
    return lines
