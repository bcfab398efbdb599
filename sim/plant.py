"""The plant model: pure `initial`/`step`/`measure`/`truth` over an immutable state (DESIGN §2)."""

# Theory of operation
# -------------------
# The plant is a set of well-mixed control volumes joined by algebraic (quasi-static) components:
#
#   primary loop:  supply node ──► rack node (+ IT liquid heat) ──► return header node
#                  ──► 3-way valve: HX share / bypass ──► dry cooler ──► supply node
#   secondary:     tank bottom ──► HX (secondary side) ──► tank top        (secondary pump)
#   customer:      tank top ──► customer HX (pool) ──► tank bottom          (customer's pump)
#
# Heat exchangers (plate HX, dry cooler, customer HX) hold negligible fluid next to the nodes, so
# they are effectiveness-NTU algebra evaluated from the node temperatures at the start of each
# sub-step. Every heat flow q (kW) that leaves one node enters another node or one of the energy
# accounts in the same sub-step with the same value, so the energy balance closes to round-off
# by construction; the validation tests check it against an independent enthalpy computation.
#
# Integration: explicit first-order upwind (tanks in series) with the step split into sub-steps so
# that no node exchanges more than `_COURANT` of its content per sub-step; that keeps every update
# a convex combination of neighbouring temperatures (monotone, no overshoot, no NaN) for any dt.
# At dt = 1 s the default plant needs one sub-step; at dt = 60 s two. Flows, UA values and the
# boundary conditions (IT power, ambient, demand: evaluated at mid-step) are constant in a step;
# fluid properties (rho*cp) are evaluated once per loop per step at the loop's mean temperature.
#
# Speed: the hot path is plain Python floats and tuples (numpy costs ~1 µs per call, more than a
# whole 12-node tank update in a list comprehension). numpy is used once, at `initial`, to draw the
# seeded sensor-noise tables; `measure` indexes them by the step counter, so `step` stays pure.

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from plc_io.plant_config import PlantConfig
from plc_io.site import demo_site
from plc_io.tags import REQUIRED_INPUTS, REQUIRED_OUTPUTS, Tag

from . import fluids

_COURANT = 0.5  # max share of a node's content exchanged per sub-step
_DAY_S = 86400.0
_YEAR_D = 365.0
_TWO_PI = 2.0 * math.pi
_NAN = float("nan")

# Actuator commands, in the order they are held in PlantState.cmd.
COMMAND_TAGS: tuple[str, ...] = tuple(t for t in REQUIRED_OUTPUTS if t != "heartbeat")
_VALVE, _FAN, _PA, _PB, _PSPEED, _SEC, _SSPEED, _CISO, _RISO = range(9)
_CMD_INDEX = {tag: i for i, tag in enumerate(COMMAND_TAGS)}
_CMD_IS_BOOL = (False, False, True, True, False, True, False, True, True)

# DESIGN §7 safe values. Both primary pumps run: with the controller gone nobody can start the
# standby pump if the duty pump trips, so the watchdog state keeps both in service (fail toward
# cooling). The speed is the demo default; `safe_actuators(params)` uses the site's safe speed.
SAFE_ACTUATORS: dict[str, float | bool] = {
    "reuse_valve_cmd": 0.0,
    "drycooler_fan_cmd": 100.0,
    "primary_pump_a_cmd": True,
    "primary_pump_b_cmd": True,
    "primary_pump_speed_cmd": 80.0,
    "secondary_pump_cmd": False,
    "secondary_pump_speed_cmd": 0.0,
    "customer_isolation_cmd": False,
    "reuse_isolation_cmd": False,
    "heartbeat": 0.0,
}


def safe_actuators(params: PlantConfig) -> dict[str, float | bool]:
    """SAFE_ACTUATORS with the site's primary pump safe speed."""
    return {**SAFE_ACTUATORS, "primary_pump_speed_cmd": params.primary_pump_safe_speed_pct}


@dataclass(frozen=True, slots=True)
class Fault:
    """One active fault. `frozen` holds the reading a stuck sensor keeps."""

    name: str
    target: str
    value: float
    since_s: float
    frozen: float | bool | None = None


class Effects(NamedTuple):
    """What the active faults do, flattened once per inject/clear so `step` reads plain fields."""

    leak_primary_lpm: float = 0.0
    leak_primary_since_s: float = 0.0
    leak_reuse_lpm: float = 0.0
    leak_reuse_since_s: float = 0.0
    customer_offline: bool = False
    pump_a_failed: bool = False
    pump_b_failed: bool = False
    secondary_pump_failed: bool = False
    valve_stuck: bool = False
    fan_failed: bool = False
    it_override_kw: float = _NAN
    ambient_override_c: float = _NAN
    hx_ua_factor: float = 1.0
    # meter_replace: the new meter's reading at the swap, and the delivered kWh at that moment
    meter_new_kwh: float = _NAN
    meter_since_kwh: float = 0.0
    # (tag, kind, value, frozen) ordered bias, stuck, fail so the strongest fault applies last
    sensors: tuple[tuple[str, str, float, float | bool | None], ...] = ()


_SENSOR_ORDER = {"sensor_bias": 0, "sensor_stuck": 1, "sensor_fail": 2}


def effects_of(faults: tuple[Fault, ...]) -> Effects:
    """Flatten a fault list into the per-step effects."""
    kw: dict[str, object] = {}
    ua_factor = 1.0
    sensors = []
    for f in faults:
        if f.name == "leak":
            kw[f"leak_{f.target}_lpm"] = f.value
            kw[f"leak_{f.target}_since_s"] = f.since_s
        elif f.name == "customer_offline":
            kw["customer_offline"] = True
        elif f.name == "pump_fail":
            key = {"primary_pump_a": "pump_a_failed", "primary_pump_b": "pump_b_failed"}
            kw[key.get(f.target, "secondary_pump_failed")] = True
        elif f.name == "valve_stuck":
            kw["valve_stuck"] = True
        elif f.name == "drycooler_fan_fail":
            kw["fan_failed"] = True
        elif f.name == "it_load_step":
            kw["it_override_kw"] = f.value
        elif f.name == "ambient_override":
            kw["ambient_override_c"] = f.value
        elif f.name == "hx_fouling":
            ua_factor = 1.0 - f.value
        elif f.name == "meter_replace":
            kw["meter_new_kwh"] = f.value
            kw["meter_since_kwh"] = float(f.frozen or 0.0)
        elif f.name in _SENSOR_ORDER:
            sensors.append((f.target, f.name, f.value, f.frozen))
    sensors.sort(key=lambda s: _SENSOR_ORDER[s[1]])
    return Effects(hx_ua_factor=ua_factor, sensors=tuple(sensors), **kw)  # type: ignore[arg-type]


# Sensor noise classes: absolute std for temperatures and pressures, relative for flows/powers.
_TEMP_TAGS = frozenset(t for t in REQUIRED_INPUTS if t.endswith("_temp"))
_REL_TAGS = frozenset(
    {"primary_flow", "secondary_flow", "customer_flow", "it_power", "heat_meter_power"}
)
_PRESSURE_TAGS = frozenset({"primary_pressure", "secondary_pressure"})
_NOISE_ROWS = (
    4093,
    4099,
)  # two coprime table lengths: the combined noise repeats after 16.8 M steps


@dataclass(frozen=True, slots=True)
class Wiring:
    """How the boolean inputs are wired, from the site's tag table (DESIGN §8: a broken circuit
    never reads healthy). `sensor_fail` on a boolean input cuts its circuit: the input then reads
    its `fail_state` (false when the site declares none: a de-energised contact), and if it is
    `supervised_by` a fault input (a leak-detection module's zone fault contact), that input
    reads true. Fault inputs named here read false while every circuit they watch is whole.
    """

    fail_reads: tuple[tuple[str, bool], ...] = ()  # (boolean input, reading with the wire cut)
    supervisors: tuple[tuple[str, str], ...] = ()  # (supervised input, its fault input)

    @classmethod
    def from_tags(cls, tags: Iterable[Tag]) -> Wiring:
        inputs = [t for t in tags if not t.is_output and t.is_bool]
        return cls(
            fail_reads=tuple(
                (t.name, bool(t.fail_state)) for t in inputs if t.fail_state is not None
            ),
            supervisors=tuple(
                (t.name, t.supervised_by) for t in inputs if t.supervised_by is not None
            ),
        )


@cache
def demo_wiring() -> Wiring:
    """The demo site's wiring: what a plant built without a tag table is wired like."""
    return Wiring.from_tags(demo_site().tags)


class Model:
    """Constants derived once from the parameters, shared (never copied) by all states of a run."""

    __slots__ = (
        "amb_daily_k",
        "amb_mean_c",
        "amb_seasonal_k",
        "c_air_kw_k",
        "coldest_day",
        "cust_design_kw",
        "cust_eps",
        "cust_from_h",
        "cust_summer",
        "cust_to_h",
        "cust_unocc",
        "fail_reads",
        "fan_kw",
        "fault_inputs",
        "g_mix_kw_k",
        "hx_ua_kw_k",
        "it_kw",
        "it_ripple",
        "it_ripple_w",
        "it_step_kw",
        "it_step_s",
        "liquid_fraction",
        "meter_gain",
        "meter_rollover_kwh",
        "meter_start_kwh",
        "n_tank",
        "natural_draft",
        "noise_a",
        "noise_b",
        "noise_scale",
        "params",
        "pipe_loss_kw_k",
        "pool_c",
        "rcp_p",
        "rcp_s",
        "room_c",
        "sec_mean0_c",
        "seed",
        "supervisors",
        "tank_loss_kw_k",
        "two_pump",
        "ua_dc_kw_k",
        "v_node_m3",
        "v_rack_m3",
        "v_ret_m3",
        "v_sup_m3",
        "valve_rate_pct_s",
        "vc_m3s",
        "vp_m3s",
        "vs_m3s",
        "wiring",
    )

    def __init__(self, params: PlantConfig, seed: int, wiring: Wiring | None = None) -> None:
        p = params
        self.params = p
        self.seed = seed
        self.wiring = demo_wiring() if wiring is None else wiring
        self.fail_reads = dict(self.wiring.fail_reads)
        self.supervisors = dict(self.wiring.supervisors)
        # fault inputs beyond the required ones: measured (false) so the PLC can serve them
        self.fault_inputs = tuple(
            sorted({f for _, f in self.wiring.supervisors} - set(REQUIRED_INPUTS))
        )
        self.it_kw = p.it_power_kw
        self.it_ripple = p.it_ripple_pct / 100.0
        self.it_ripple_w = _TWO_PI / p.it_ripple_period_s
        self.it_step_s = tuple(s for s, _ in p.it_steps)
        self.it_step_kw = tuple(k for _, k in p.it_steps)
        self.liquid_fraction = p.liquid_capture_fraction
        self.rcp_p = fluids.rcp_coeffs(p.primary_fluid)
        self.rcp_s = fluids.rcp_coeffs(p.secondary_fluid)
        self.v_rack_m3 = p.primary_volume_m3 * p.primary_rack_volume_fraction
        self.v_ret_m3 = p.primary_volume_m3 * p.primary_return_volume_fraction
        self.v_sup_m3 = p.primary_volume_m3 - self.v_rack_m3 - self.v_ret_m3
        self.vp_m3s = p.primary_design_flow_m3h / 3600.0
        self.two_pump = p.primary_two_pump_flow_factor
        self.g_mix_kw_k = p.primary_natural_mixing_kw_k
        self.pipe_loss_kw_k = p.primary_loss_w_k / 1000.0 / 3.0  # per primary node
        self.valve_rate_pct_s = 100.0 / p.valve_stroke_s
        self.hx_ua_kw_k = p.hx_ua_kw_k
        self.vs_m3s = p.secondary_design_flow_m3h / 3600.0
        self.n_tank = p.tank_nodes
        self.v_node_m3 = p.tank_volume_m3 / p.tank_nodes
        self.tank_loss_kw_k = p.tank_loss_w_k / 1000.0 / p.tank_nodes
        self.sec_mean0_c = 0.5 * (p.initial_tank_top_temp_c + p.initial_tank_bottom_temp_c)
        self.room_c = p.plant_room_temp_c
        self.vc_m3s = p.customer_design_flow_m3h / 3600.0
        self.pool_c = p.customer_pool_temp_c
        self.cust_eps = p.customer_hx_effectiveness
        self.cust_design_kw = p.customer_design_kw
        self.cust_from_h = p.customer_occupied_from_h
        self.cust_to_h = p.customer_occupied_to_h
        self.cust_unocc = p.customer_unoccupied_fraction
        self.cust_summer = p.customer_summer_fraction
        self.ua_dc_kw_k = p.drycooler_ua_kw_k
        self.c_air_kw_k = p.drycooler_air_kw_k
        self.natural_draft = p.drycooler_natural_draft_pct / 100.0
        self.fan_kw = p.drycooler_fan_kw
        self.meter_start_kwh = p.heat_meter_start_kwh
        self.meter_rollover_kwh = p.heat_meter_rollover_kwh
        self.meter_gain = 1.0 + p.heat_meter_error_pct / 100.0
        self.amb_mean_c = p.ambient_mean_c
        self.amb_seasonal_k = p.ambient_seasonal_amp_k
        self.amb_daily_k = p.ambient_daily_amp_k
        self.coldest_day = p.ambient_coldest_day
        # Noise is drawn here, once, from the seed; measure() only indexes it.
        rng = np.random.default_rng(seed)
        m = len(REQUIRED_INPUTS)
        self.noise_a = rng.standard_normal((_NOISE_ROWS[0], m)).tolist()
        self.noise_b = rng.standard_normal((_NOISE_ROWS[1], m)).tolist()
        scale = []
        for tag in REQUIRED_INPUTS:
            if not p.sensor_noise:
                scale.append(0.0)
            elif tag in _TEMP_TAGS:
                scale.append(p.sensor_noise_temp_k * math.sqrt(0.5))
            elif tag in _PRESSURE_TAGS:
                scale.append(p.sensor_noise_pressure_bar * math.sqrt(0.5))
            elif tag in _REL_TAGS:
                scale.append(-p.sensor_noise_rel_pct / 100.0 * math.sqrt(0.5))  # <0: relative
            else:
                scale.append(0.0)
        self.noise_scale = tuple(scale)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and (self.params, self.seed, self.wiring) == (
            other.params,
            other.seed,
            other.wiring,
        )

    def __hash__(self) -> int:
        return hash((self.params, self.seed, self.wiring))

    def __repr__(self) -> str:
        return f"Model(seed={self.seed})"


@dataclass(frozen=True, slots=True)
class PlantState:
    """Everything the plant is at one instant. Immutable: `step` returns a new one."""

    t_s: float  # seconds since Jan 1 00:00
    step_count: int  # indexes the sensor-noise tables
    valve_pos_pct: float  # true reuse valve position, 0 = all bypass
    primary_c: tuple[float, float, float]  # rack, return header, supply node temperatures
    tank_c: tuple[float, ...]  # tank node temperatures, top first
    cmd: tuple[float | bool, ...]  # last valid command per COMMAND_TAGS entry
    acc_kj: tuple[
        float, ...
    ]  # it, captured, delivered, rejected, stored, losses, fan (kJ), peak °C
    faults: tuple[Fault, ...]
    fx: Effects
    model: Model

    @property
    def it_supply_temp_c(self) -> float:
        """True rack inlet temperature (the supply node)."""
        return self.primary_c[2]


@dataclass(frozen=True, slots=True)
class Accounts:
    """Cumulative energy accounts since `initial` (kWh), and the peak true supply temperature."""

    it_heat_kwh: float
    captured_kwh: float
    delivered_kwh: float
    rejected_kwh: float
    stored_kwh: float
    losses_kwh: float
    fan_energy_kwh: float
    peak_it_supply_temp_c: float

    @property
    def balance_error_kwh(self) -> float:
        """captured - (delivered + rejected + stored + losses): zero for a conservative model."""
        return self.captured_kwh - (
            self.delivered_kwh + self.rejected_kwh + self.stored_kwh + self.losses_kwh
        )


def initial(
    params: PlantConfig, seed: int = 0, t0_s: float = 0.0, tags: Iterable[Tag] | None = None
) -> PlantState:
    """The plant at t0_s (seconds since Jan 1 00:00) at rest in its safe state, all faults clear.

    `tags`: the site's tag table, which says what each boolean input reads with its circuit cut
    (`Wiring`); without one the plant is wired like the demo site.
    """
    if not math.isfinite(t0_s):
        raise ValueError(f"t0_s={t0_s!r}: expected a finite number of seconds since Jan 1")
    model = Model(params, seed, None if tags is None else Wiring.from_tags(tags))
    n = params.tank_nodes
    top_c, bottom_c = params.initial_tank_top_temp_c, params.initial_tank_bottom_temp_c
    tank = tuple(top_c + (bottom_c - top_c) * i / (n - 1) for i in range(n))
    t_p = params.initial_primary_temp_c
    safe = safe_actuators(params)
    cmd = tuple(safe[tag] for tag in COMMAND_TAGS)
    return PlantState(
        t_s=float(t0_s),
        step_count=0,
        valve_pos_pct=0.0,
        primary_c=(t_p, t_p, t_p),
        tank_c=tank,
        cmd=cmd,
        acc_kj=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, t_p),
        faults=(),
        fx=Effects(),
        model=model,
    )


def _merge(
    cmd: tuple[float | bool, ...], actuators: Mapping[str, float | bool]
) -> tuple[float | bool, ...]:
    """New command tuple: missing or NaN keeps the old command; numbers clamp to 0..100 %."""
    vals: list[float | bool] | None = None
    for tag, v in actuators.items():
        i = _CMD_INDEX.get(tag)
        if i is None:
            if tag == "heartbeat":
                continue
            raise ValueError(
                f"actuator {tag!r} is not an output tag; expected one of {COMMAND_TAGS}"
            )
        if v is None or v != v:  # NaN: keep the previous command
            continue
        if _CMD_IS_BOOL[i]:
            new: float | bool = bool(v)
        else:
            f = float(v)
            new = 0.0 if f < 0.0 else 100.0 if f > 100.0 else f
        if vals is None:
            vals = list(cmd)
        vals[i] = new
    return cmd if vals is None else tuple(vals)


def _rcp(c: tuple[float, float, float, float, float], t: float) -> float:
    return c[0] + t * (c[1] + t * (c[2] + t * (c[3] + t * c[4])))


def _counterflow_eps(ntu: float, cr: float) -> float:
    """Effectiveness of a counter-flow exchanger (closed form; cr = Cmin/Cmax)."""
    if cr < 0.999999:
        e = math.exp(-ntu * (1.0 - cr))
        return (1.0 - e) / (1.0 - cr * e)
    return ntu / (1.0 + ntu)


def hx_effectiveness(ua_kw_k: float, c_hot_kw_k: float, c_cold_kw_k: float) -> float:
    """Counter-flow plate HX effectiveness by the e-NTU method (0 when a side has no flow)."""
    c_min = min(c_hot_kw_k, c_cold_kw_k)
    if c_min <= 0.0:
        return 0.0
    return _counterflow_eps(ua_kw_k / c_min, c_min / max(c_hot_kw_k, c_cold_kw_k))


def drycooler_effectiveness(ua_kw_k: float, c_fluid_kw_k: float, c_air_kw_k: float) -> float:
    """Cross-flow coil, air mixed, fluid unmixed (tube passes), by the e-NTU closed forms."""
    if c_fluid_kw_k <= 0.0 or c_air_kw_k <= 0.0:
        return 0.0
    if c_fluid_kw_k <= c_air_kw_k:  # Cmin unmixed (fluid), Cmax mixed (air)
        cr = c_fluid_kw_k / c_air_kw_k
        return (1.0 - math.exp(-cr * (1.0 - math.exp(-ua_kw_k / c_fluid_kw_k)))) / cr
    cr = c_air_kw_k / c_fluid_kw_k  # Cmin mixed (air), Cmax unmixed (fluid)
    return 1.0 - math.exp(-(1.0 - math.exp(-cr * ua_kw_k / c_air_kw_k)) / cr)


class _Cond(NamedTuple):
    """Boundary conditions and exchanger coefficients that hold for one step."""

    it_kw: float
    liquid_kw: float
    ambient_c: float
    demand_kw: float
    fan_kw: float
    vp_m3s: float  # primary flow
    vs_m3s: float  # secondary flow
    vc_m3s: float  # customer flow
    cp_kw_k: float  # primary capacity rate
    chx_kw_k: float  # primary capacity rate through the HX
    cs_kw_k: float
    cc_kw_k: float
    k_hx_kw_k: float  # q_hx = k_hx * (return header - tank bottom)
    k_dc_kw_k: float  # q_dc = k_dc * (mix - ambient)
    k_c_kw_k: float  # q_c = clip(k_c * (tank top - pool), 0, demand)
    pump_a: bool
    pump_b: bool
    pump_s: bool


def _conditions(
    m: Model, fx: Effects, cmd: tuple, valve_pct: float, t_s: float, rcp_p: float, rcp_s: float
) -> _Cond:
    # IT load: scheduled base (or the it_load_step fault) with a sinusoidal ripple.
    base_kw = fx.it_override_kw
    if base_kw != base_kw:
        base_kw = m.it_kw
        if m.it_step_s:
            i = bisect_right(m.it_step_s, t_s)
            if i:
                base_kw = m.it_step_kw[i - 1]
    it_kw = base_kw * (1.0 + m.it_ripple * math.sin(m.it_ripple_w * t_s))
    # Season phase shared by ambient and customer demand: +1 on the coldest day.
    day = t_s / _DAY_S
    season = math.cos(_TWO_PI * (day - m.coldest_day) / _YEAR_D)
    hour = (t_s % _DAY_S) / 3600.0
    ambient_c = fx.ambient_override_c
    if ambient_c != ambient_c:
        ambient_c = (
            m.amb_mean_c
            - m.amb_seasonal_k * season
            - m.amb_daily_k * math.cos(_TWO_PI * (hour - 3.0) / 24.0)  # min 03:00, max 15:00
        )
    occupied = m.cust_from_h <= hour < m.cust_to_h
    demand_kw = (
        m.cust_design_kw
        * (m.cust_summer + (1.0 - m.cust_summer) * 0.5 * (1.0 + season))
        * (1.0 if occupied else m.cust_unocc)
    )
    # Pumps and flows (instantaneous: pump run-up is seconds, far below the loop time constants).
    pump_a = bool(cmd[_PA]) and not fx.pump_a_failed
    pump_b = bool(cmd[_PB]) and not fx.pump_b_failed
    speed = cmd[_PSPEED] / 100.0
    if pump_a and pump_b:
        vp = m.vp_m3s * m.two_pump * speed
    elif pump_a or pump_b:
        vp = m.vp_m3s * speed
    else:
        vp = 0.0
    pump_s = bool(cmd[_SEC]) and not fx.secondary_pump_failed
    vs = m.vs_m3s * cmd[_SSPEED] / 100.0 if pump_s and cmd[_RISO] else 0.0
    vc = m.vc_m3s if cmd[_CISO] and not fx.customer_offline else 0.0
    vhx = vp * valve_pct / 100.0
    cp = rcp_p * vp
    chx = rcp_p * vhx
    cs = rcp_s * vs
    cc = rcp_s * vc
    # Plate HX: equal film resistances at design flow, each scaling with its own flow^0.8.
    if vhx > 0.0 and vs > 0.0:
        ua = (
            m.hx_ua_kw_k
            * fx.hx_ua_factor
            / (0.5 * ((m.vp_m3s / vhx) ** 0.8 + (m.vs_m3s / vs) ** 0.8))
        )
        k_hx = hx_effectiveness(ua, chx, cs) * min(chx, cs)
    else:
        k_hx = 0.0
    # Dry cooler: air flow follows fan speed (natural draft when the fans stand), UA ~ air^0.8.
    fan = 0.0 if fx.fan_failed else cmd[_FAN] / 100.0
    air = fan if fan > m.natural_draft else m.natural_draft
    if cp > 0.0 and air > 0.0:
        c_air = m.c_air_kw_k * air
        eps = drycooler_effectiveness(m.ua_dc_kw_k * air**0.8, cp, c_air)
        k_dc = eps * min(cp, c_air)
    else:
        k_dc = 0.0
    return _Cond(
        it_kw,
        it_kw * m.liquid_fraction,
        ambient_c,
        demand_kw,
        m.fan_kw * fan * fan * fan,
        vp,
        vs,
        vc,
        cp,
        chx,
        cs,
        cc,
        k_hx,
        k_dc,
        m.cust_eps * cc,
        pump_a,
        pump_b,
        pump_s,
    )


def _valve_travel(pos: float, target: float, rate: float, dt_s: float) -> tuple[float, float]:
    """Valve end position and its mean over the step, moving at a constant stroke speed."""
    gap = target - pos
    travel = rate * dt_s
    if gap >= 0.0:
        if gap <= travel:
            t_frac = gap / travel if travel > 0.0 else 0.0
            return target, target - 0.5 * gap * t_frac  # ramp then hold
        return pos + travel, pos + 0.5 * travel
    if -gap <= travel:
        t_frac = -gap / travel
        return target, target - 0.5 * gap * t_frac
    return pos - travel, pos - 0.5 * travel


def mix_inversions(t: list[float]) -> list[float]:
    """Mix unstable layers (warmer below colder) until the tank is stably stratified.

    Pool-adjacent-violators on equal-volume nodes: a node warmer than the block above it merges
    with that block into one mean temperature, repeatedly. Conserves energy exactly.
    """
    sums: list[float] = []
    counts: list[int] = []
    for x in t:
        s, c = x, 1
        while sums and s * counts[-1] > sums[-1] * c:
            s += sums.pop()
            c += counts.pop()
        sums.append(s)
        counts.append(c)
    out: list[float] = []
    for s, c in zip(sums, counts, strict=True):
        out.extend([s / c] * c)
    return out


def step(state: PlantState, actuators: Mapping[str, float | bool], dt_s: float) -> PlantState:
    """Advance the plant by dt_s with the given actuator commands; returns a new state."""
    if not 0.0 < dt_s < math.inf:
        raise ValueError(f"dt_s={dt_s!r}: expected a finite time step > 0 s")
    m = state.model
    fx = state.fx
    cmd = _merge(state.cmd, actuators) if actuators else state.cmd
    pos0 = state.valve_pos_pct
    if fx.valve_stuck:
        pos1 = pos_avg = pos0
    else:
        pos1, pos_avg = _valve_travel(pos0, cmd[_VALVE], m.valve_rate_pct_s, dt_s)

    t_rack, t_ret, t_sup = state.primary_c
    tank = state.tank_c
    n = m.n_tank
    rcp_p = _rcp(m.rcp_p, (t_rack + t_ret + t_sup) / 3.0)
    rcp_s = _rcp(m.rcp_s, sum(tank) / n)
    c = _conditions(m, fx, cmd, pos_avg, state.t_s + 0.5 * dt_s, rcp_p, rcp_s)
    cp, cs, cc = c.cp_kw_k, c.cs_kw_k, c.cc_kw_k
    k_hx, k_dc, k_c = c.k_hx_kw_k, c.k_dc_kw_k, c.k_c_kw_k
    liquid_kw, amb_c, demand_kw = c.liquid_kw, c.ambient_c, c.demand_kw
    g = 0.0 if cp > 0.0 else m.g_mix_kw_k  # natural mixing only matters with the pumps stopped
    lp = m.pipe_loss_kw_k
    lt = m.tank_loss_kw_k
    room = m.room_c
    pool = m.pool_c

    cap_r = rcp_p * m.v_rack_m3
    cap_t = rcp_p * m.v_ret_m3
    cap_s = rcp_p * m.v_sup_m3
    cap_n = rcp_s * m.v_node_m3
    # Sub-steps: the fastest node sets the count (see theory of operation).
    rate = max((cp + 2.0 * g + lp) / min(cap_r, cap_t, cap_s), (cs + cc + lt + k_hx) / cap_n)
    n_sub = math.ceil(dt_s * rate / _COURANT) if dt_s * rate > _COURANT else 1
    h = dt_s / n_sub
    hr, ht, hs, hn = h / cap_r, h / cap_t, h / cap_s, h / cap_n
    cn = cs - cc  # net downward flow through the tank
    a_down = hn * cn if cn > 0.0 else 0.0
    a_up = -hn * cn if cn < 0.0 else 0.0
    km = 1.0 - a_down - a_up - hn * lt  # middle-node self coefficient
    kl = hn * lt * room
    delivered = rejected = losses = 0.0
    tank_sum0 = sum(tank)
    prim0 = (t_rack, t_ret, t_sup)
    for _ in range(n_sub):
        t0, tb = tank[0], tank[-1]
        q_hx = k_hx * (t_ret - tb)
        t_mix = t_ret - q_hx / cp if cp > 0.0 else t_ret
        q_dc = k_dc * (t_mix - amb_c)
        q_c = k_c * (t0 - pool)
        q_c = 0.0 if q_c < 0.0 else demand_kw if q_c > demand_kw else q_c
        q_pipe = lp * (t_rack + t_ret + t_sup - 3.0 * room)
        q_tank = lt * (sum(tank) - n * room)
        delivered += q_c
        rejected += q_dc
        losses += q_pipe + q_tank
        # Primary: supply -> rack (+IT) -> return header -> HX/bypass -> dry cooler -> supply.
        t_rack, t_ret, t_sup = (
            t_rack
            + hr
            * (
                cp * (t_sup - t_rack)
                + g * (t_sup + t_ret - 2.0 * t_rack)
                + liquid_kw
                - lp * (t_rack - room)
            ),
            t_ret
            + ht
            * (cp * (t_rack - t_ret) + g * (t_rack + t_sup - 2.0 * t_ret) - lp * (t_ret - room)),
            t_sup
            + hs
            * (
                cp * (t_ret - t_sup)
                + g * (t_rack + t_ret - 2.0 * t_sup)
                - q_hx
                - q_dc
                - lp * (t_sup - room)
            ),
        )
        # Tank: HX outlet enters the top, customer return the bottom, net flow cn in between.
        top = t0 + hn * (cs * (tb - t0) + q_hx - lt * (t0 - room))
        bottom = tb + hn * (cc * (t0 - tb) - q_c - lt * (tb - room))
        if n > 2:
            top += a_up * (tank[1] - t0)
            bottom += a_down * (tank[-2] - tb)
            if a_down:
                mid = [km * x + a_down * u + kl for u, x in pairwise(tank[:-1])]
            else:
                mid = [km * x + a_up * d + kl for x, d in pairwise(tank[1:])]
            new = [top, *mid, bottom]
        else:
            new = [top, bottom]
        for i in range(n - 1):
            if new[i + 1] > new[i]:
                new = mix_inversions(new)
                break
        tank = tuple(new)

    stored = rcp_p * (
        m.v_rack_m3 * (t_rack - prim0[0])
        + m.v_ret_m3 * (t_ret - prim0[1])
        + m.v_sup_m3 * (t_sup - prim0[2])
    ) + rcp_s * m.v_node_m3 * (sum(tank) - tank_sum0)
    a = state.acc_kj
    acc = (
        a[0] + c.it_kw * dt_s,
        a[1] + liquid_kw * dt_s,
        a[2] + delivered * h,
        a[3] + rejected * h,
        a[4] + stored,
        a[5] + losses * h,
        a[6] + c.fan_kw * dt_s,
        t_sup if t_sup > a[7] else a[7],
    )
    return PlantState(
        state.t_s + dt_s,
        state.step_count + 1,
        pos1,
        (t_rack, t_ret, t_sup),
        tank,
        cmd,
        acc,
        state.faults,
        fx,
        m,
    )


def accounts(state: PlantState) -> Accounts:
    """Cumulative energy accounts of the run so far."""
    a = state.acc_kj
    return Accounts(
        it_heat_kwh=a[0] / 3600.0,
        captured_kwh=a[1] / 3600.0,
        delivered_kwh=a[2] / 3600.0,
        rejected_kwh=a[3] / 3600.0,
        stored_kwh=a[4] / 3600.0,
        losses_kwh=a[5] / 3600.0,
        fan_energy_kwh=a[6] / 3600.0,
        peak_it_supply_temp_c=a[7],
    )


def meter_reading_kwh(state: PlantState) -> float:
    """The heat meter's totaliser as its display shows it: what it has counted (delivered heat
    times its systematic error) from its start reading, or from the reading a replacement meter
    was fitted with, modulo its rollover count."""
    m = state.model
    fx = state.fx
    delivered_kwh = state.acc_kj[2] / 3600.0
    if fx.meter_new_kwh == fx.meter_new_kwh:  # a replacement meter is fitted
        counted = fx.meter_new_kwh + m.meter_gain * (delivered_kwh - fx.meter_since_kwh)
    else:
        counted = m.meter_start_kwh + m.meter_gain * delivered_kwh
    return counted % m.meter_rollover_kwh


def _leak_drop_bar(lpm: float, since_s: float, t_s: float, bar_per_l: float) -> float:
    return lpm * max(0.0, t_s - since_s) / 60.0 * bar_per_l if lpm > 0.0 else 0.0


class _Now(NamedTuple):
    """Instantaneous derived values of a state: the algebraic parts of the model."""

    c: _Cond
    q_hx_kw: float
    q_dc_kw: float
    q_c_kw: float
    t_mix_c: float
    primary_pressure_bar: float
    secondary_pressure_bar: float


def _now(state: PlantState) -> _Now:
    m = state.model
    p = m.params
    fx = state.fx
    t_r, t_t, t_s = state.primary_c
    tank = state.tank_c
    n = m.n_tank
    rcp_p = _rcp(m.rcp_p, (t_r + t_t + t_s) / 3.0)
    rcp_s = _rcp(m.rcp_s, sum(tank) / n)
    c = _conditions(m, fx, state.cmd, state.valve_pos_pct, state.t_s, rcp_p, rcp_s)
    t0, tb = tank[0], tank[-1]
    q_hx = c.k_hx_kw_k * (t_t - tb)
    t_mix = t_t - q_hx / c.cp_kw_k if c.cp_kw_k > 0.0 else t_t
    q_dc = c.k_dc_kw_k * (t_mix - c.ambient_c)
    q_c = min(max(c.k_c_kw_k * (t0 - m.pool_c), 0.0), c.demand_kw)
    # Static fill pressure less what a leak has drained from the expansion vessel, plus pump head
    # on a quadratic system curve; the secondary also rises with thermal expansion.
    prim_p = p.primary_fill_pressure_bar + p.primary_pump_head_bar * (c.vp_m3s / m.vp_m3s) ** 2
    prim_p -= _leak_drop_bar(
        fx.leak_primary_lpm, fx.leak_primary_since_s, state.t_s, p.primary_vessel_bar_per_l
    )
    sec_p = (
        p.secondary_fill_pressure_bar
        + p.secondary_expansion_bar_k * (sum(tank) / n - m.sec_mean0_c)
        + p.secondary_pump_head_bar * (c.vs_m3s / m.vs_m3s) ** 2
        - _leak_drop_bar(
            fx.leak_reuse_lpm, fx.leak_reuse_since_s, state.t_s, p.secondary_vessel_bar_per_l
        )
    )
    return _Now(c, q_hx, q_dc, q_c, t_mix, max(0.0, prim_p), max(0.0, sec_p))


def truth(state: PlantState) -> dict[str, float]:
    """True plant values by name, for test instruments and the simulated PLC's Plant folder."""
    m = state.model
    fx = state.fx
    t_r, t_t, t_s = state.primary_c
    tank = state.tank_c
    n = m.n_tank
    c, q_hx, q_dc, q_c, t_mix, prim_p, sec_p = _now(state)
    t0, tb = tank[0], tank[-1]
    a = accounts(state)
    out: dict[str, float] = {
        "t_s": state.t_s,
        "it_power_kw": c.it_kw,
        "it_liquid_kw": c.liquid_kw,
        "rack_temp_c": t_r,
        "return_header_temp_c": t_t,
        "it_supply_temp_c": t_s,
        "it_return_temp_c": t_r,
        "hx_primary_out_temp_c": t_t - q_hx / c.chx_kw_k if c.chx_kw_k > 0.0 else t_t,
        "hx_secondary_in_temp_c": tb,
        "hx_secondary_out_temp_c": tb + q_hx / c.cs_kw_k if c.cs_kw_k > 0.0 else tb,
        "mix_temp_c": t_mix,
        "drycooler_out_temp_c": t_mix - q_dc / c.cp_kw_k if c.cp_kw_k > 0.0 else t_s,
        "customer_supply_temp_c": t0,
        "customer_return_temp_c": t0 - q_c / c.cc_kw_k if c.cc_kw_k > 0.0 else m.pool_c,
        "ambient_temp_c": c.ambient_c,
        "primary_flow_m3h": c.vp_m3s * 3600.0,
        "hx_primary_flow_m3h": c.vp_m3s * state.valve_pos_pct / 100.0 * 3600.0,
        "secondary_flow_m3h": c.vs_m3s * 3600.0,
        "customer_flow_m3h": c.vc_m3s * 3600.0,
        "primary_pressure_bar": prim_p,
        "secondary_pressure_bar": sec_p,
        "hx_kw": q_hx,
        "drycooler_kw": q_dc,
        "customer_kw": q_c,
        "customer_demand_kw": c.demand_kw,
        "tank_loss_kw": m.tank_loss_kw_k * (sum(tank) - n * m.room_c),
        "pipe_loss_kw": m.pipe_loss_kw_k * (t_r + t_t + t_s - 3.0 * m.room_c),
        "fan_power_kw": c.fan_kw,
        "reuse_valve_pos_pct": state.valve_pos_pct,
        "primary_pump_a_running": float(c.pump_a),
        "primary_pump_b_running": float(c.pump_b),
        "secondary_pump_running": float(c.pump_s),
        "customer_ready": float(not fx.customer_offline),
        "it_heat_kwh": a.it_heat_kwh,
        "captured_kwh": a.captured_kwh,
        "delivered_kwh": a.delivered_kwh,
        "rejected_kwh": a.rejected_kwh,
        "stored_kwh": a.stored_kwh,
        "losses_kwh": a.losses_kwh,
        "fan_energy_kwh": a.fan_energy_kwh,
        "heat_meter_energy_kwh": meter_reading_kwh(state),
        "peak_it_supply_temp_c": a.peak_it_supply_temp_c,
    }
    for i, x in enumerate(tank):
        out[f"tank_node_{i:02d}_temp_c"] = x
    return out


def measure(state: PlantState) -> dict[str, float | bool]:
    """Sensor readings for every REQUIRED_INPUTS tag and every fault input the wiring names,
    with noise and sensor faults applied."""
    m = state.model
    fx = state.fx
    t_r, t_t, t_s = state.primary_c
    tank = state.tank_c
    c, q_hx, q_dc, q_c, t_mix, prim_p, sec_p = _now(state)
    t0, tb = tank[0], tank[-1]
    vals: dict[str, float | bool] = {
        "it_supply_temp": t_s,
        "it_return_temp": t_r,
        "primary_flow": c.vp_m3s * 3600.0,
        "primary_pressure": prim_p,
        "hx_primary_out_temp": t_t - q_hx / c.chx_kw_k if c.chx_kw_k > 0.0 else t_t,
        "hx_secondary_in_temp": tb,
        "hx_secondary_out_temp": tb + q_hx / c.cs_kw_k if c.cs_kw_k > 0.0 else tb,
        "secondary_flow": c.vs_m3s * 3600.0,
        "secondary_pressure": sec_p,
        "tank_top_temp": t0,
        "tank_mid_temp": tank[m.n_tank // 2],
        "tank_bottom_temp": tb,
        "customer_supply_temp": t0,
        "customer_return_temp": t0 - q_c / c.cc_kw_k if c.cc_kw_k > 0.0 else m.pool_c,
        "customer_flow": c.vc_m3s * 3600.0,
        "drycooler_out_temp": t_mix - q_dc / c.cp_kw_k if c.cp_kw_k > 0.0 else t_s,
        "ambient_temp": c.ambient_c,
        "it_power": c.it_kw,
        "heat_meter_power": q_c * m.meter_gain,
        "heat_meter_energy": meter_reading_kwh(state),
        "reuse_valve_pos": state.valve_pos_pct,
        "leak_primary": fx.leak_primary_lpm > 0.0,
        "leak_reuse": fx.leak_reuse_lpm > 0.0,
        "customer_ready": not fx.customer_offline,
        "primary_pump_a_running": c.pump_a,
        "primary_pump_b_running": c.pump_b,
        "secondary_pump_running": c.pump_s,
        "drycooler_fault": fx.fan_failed,
    }
    for name in m.fault_inputs:
        vals[name] = False  # every watched circuit whole until a sensor_fail cuts one
    if m.params.sensor_noise:
        k = state.step_count
        row_a = m.noise_a[k % _NOISE_ROWS[0]]
        row_b = m.noise_b[k % _NOISE_ROWS[1]]
        for j, tag in enumerate(REQUIRED_INPUTS):
            s = m.noise_scale[j]
            if s:
                z = row_a[j] + row_b[j]
                v = vals[tag]
                vals[tag] = v + s * z if s > 0.0 else v * (1.0 - s * z)
    for tag, kind, value, frozen in fx.sensors:
        if kind == "sensor_bias":
            vals[tag] = vals[tag] + value
        elif kind == "sensor_stuck":
            if frozen is not None:
                vals[tag] = frozen
        elif isinstance(vals[tag], bool):
            # sensor_fail on a contact: a cut circuit reads what the site says it reads (a
            # de-energise-to-trip leak cable reads wet), and its supervising fault input trips
            vals[tag] = m.fail_reads.get(tag, False)
            supervisor = m.supervisors.get(tag)
            if supervisor is not None:
                vals[supervisor] = True
        else:  # sensor_fail on an analogue input: an open circuit reads NaN
            vals[tag] = _NAN
    return vals
