"""Operator authority: the permission table and what people asked for that stands (DESIGN §13).

Theory of operation. Every request a person or the BMS makes reaches `apply` as a `Request`
(who, role, command, JSON arguments, reason). `apply` authorises it against `PERMISSIONS` (data,
the one table), validates every argument against the site's `Limits` and, when accepted,
returns the new `OperatorState` plus the `Effects` the core must carry out this scan (resets,
acknowledgements, shelving: those live in the interlock engine and the alarm table). It never
raises and never changes the state on a refusal, whatever the request holds; each refusal is one
line naming the field, the value (bounded) and what was expected.

What stands (forces, bypasses, maintenance, reject, setpoints) is one frozen value that survives
restarts. Its expiries are wall-clock times, because a monotonic clock restarts at reboot.
`remaining_s` reads them as `min(expires - now, expires - granted)`, never below 0: a wall clock
set back never makes a hold last longer than it was granted for from that moment, a clock set
forward ends it early, toward the safe side (automatic control, every interlock in force). Each
scan `to_commands` turns what remains into the supervisor's monotonic expiries
(`now_s + remaining`), so the supervisor's own checks see the same bounds.

Pure: no clock, no I/O, no logging. Time is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

from controller.arbitration import NOT_FORCEABLE, Manual, check_setpoint, shown, value_problem
from controller.sequences import BMS_REQUESTS
from interlocks.rules import RULES_BY_ID, Rule
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import is_safety_input
from plc_io.tags import Tag

if TYPE_CHECKING:
    from plc_io.site import Site


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ENGINEER = "engineer"


class Cmd(StrEnum):
    STATUS = "status"
    ALARMS = "alarms"
    JOURNAL = "journal"
    ACK = "ack"
    REJECT = "reject"
    SETPOINT = "setpoint"
    RESET = "reset"
    MAINTENANCE = "maintenance"
    FORCE = "force"
    BYPASS = "bypass"
    SHELVE = "shelve"
    WATCHDOG_TEST = "watchdog_test"
    COMMISSION = "commission"


READS: frozenset[Cmd] = frozenset({Cmd.STATUS, Cmd.ALARMS, Cmd.JOURNAL})

_ALL = frozenset(Role)
_OPERATOR_UP = frozenset({Role.OPERATOR, Role.ENGINEER})
_ENGINEER = frozenset({Role.ENGINEER})

# THE permission table (DESIGN §13). Everything else asks `permitted`.
PERMISSIONS: Mapping[Cmd, frozenset[Role]] = MappingProxyType(
    {
        Cmd.STATUS: _ALL,
        Cmd.ALARMS: _ALL,
        Cmd.JOURNAL: _ALL,
        Cmd.ACK: _OPERATOR_UP,
        Cmd.REJECT: _OPERATOR_UP,
        Cmd.SETPOINT: _OPERATOR_UP,
        Cmd.RESET: _ENGINEER,
        Cmd.MAINTENANCE: _ENGINEER,
        Cmd.FORCE: _ENGINEER,
        Cmd.BYPASS: _ENGINEER,
        Cmd.SHELVE: _ENGINEER,
        Cmd.WATCHDOG_TEST: _ENGINEER,
        Cmd.COMMISSION: _ENGINEER,
    }
)

# One line per command for the generated table in docs/operation.md.
DESCRIPTIONS: Mapping[Cmd, str] = MappingProxyType(
    {
        Cmd.STATUS: "read the status (mode, interlocks, outputs, inputs, link, scan)",
        Cmd.ALARMS: "read the standing alarms",
        Cmd.JOURNAL: "read the journal (events and commands)",
        Cmd.ACK: "acknowledge alarms",
        Cmd.REJECT: "request reject (all heat to the dry cooler) on/off",
        Cmd.SETPOINT: "BMS setpoints (bounded)",
        Cmd.RESET: "reset a latched trip (cause gone, its sensors valid)",
        Cmd.MAINTENANCE: "maintenance on/off",
        Cmd.FORCE: "force an output / a forceable input (with expiry, at most the site's maximum)",
        Cmd.BYPASS: "bypass a bypassable interlock (reason, expiry at most 4 h)",
        Cmd.SHELVE: "shelve an alarm (reason, expiry at most 24 h)",
        Cmd.WATCHDOG_TEST: "hold the heartbeat unchanged for a PLC watchdog proof test (reason, "
        "at most max(30 s, 4 × plc.watchdog_s); 0 s ends it)",
        Cmd.COMMISSION: "file a commissioning record (sealed, chained and signed by the "
        "controller)",
    }
)

# Commands whose granting form needs a reason. Ending a hold early (release, end) does not:
# it returns the plant to automatic control with every interlock in force.
REASON_REQUIRED = frozenset(
    {Cmd.RESET, Cmd.BYPASS, Cmd.FORCE, Cmd.MAINTENANCE, Cmd.REJECT, Cmd.SHELVE, Cmd.WATCHDOG_TEST}
)
MAX_REASON = 500
MAX_NAME = 200  # request id, principal
MAX_ALARM_ID = 100
MAX_LIST = 200  # alarms in one acknowledgement, rules in one reset
MAX_SHELVE_S = 86400.0
# The bounded setpoints a person or the BMS may set: name -> (unit, what it does). Bounds:
# `Limits.setpoints`. The BMS-level ones (controller.sequences.BMS_REQUESTS) steer an output
# only where the mode's sequence leaves it room.
SETPOINTS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "supply_setpoint_c": (
            "°C",
            "IT supply temperature the dry-cooler fans hold (the site's it_supply_setpoint_c "
            "until set)",
        ),
        "secondary_pump_speed_pct": (
            "%",
            "secondary pump speed while the tank charges in a reuse mode (BMS level: the "
            "sequence's speed until set; interlocks, forces and a failed dry cooler win over it)",
        ),
    }
)

# The supply setpoint a request may ask for: at least SETPOINT_MIN_C, and never within
# SETPOINT_MARGIN_K of the IL-01 limit (the values controller/supervisor.py applies).
SETPOINT_MIN_C = 10.0
SETPOINT_MARGIN_K = 5.0
# The longest heartbeat hold (`watchdog_test`): long enough for any site's watchdog to trip and
# be seen (watchdog_s ≤ 60), short enough that a forgotten test ends by itself soon.
HOLD_MIN_S = 1.0
HOLD_FLOOR_S = 30.0
HOLD_WATCHDOGS = 4.0


def max_heartbeat_hold_s(watchdog_s: float) -> float:
    """The bound of a `watchdog_test` hold: max(30 s, 4 × plc.watchdog_s)."""
    return max(HOLD_FLOOR_S, HOLD_WATCHDOGS * watchdog_s)


def _role(role: object) -> Role | None:
    return Role(role) if isinstance(role, str) and role in _ROLE_VALUES else None


def _cmd(cmd: object) -> Cmd | None:
    return Cmd(cmd) if isinstance(cmd, str) and cmd in _CMD_VALUES else None


_ROLE_VALUES = frozenset(r.value for r in Role)
_CMD_VALUES = frozenset(c.value for c in Cmd)


def permitted(role: object, cmd: object) -> bool:
    """Whether `role` may issue `cmd`; False for an unknown role or command, never raises."""
    r, c = _role(role), _cmd(cmd)
    return r is not None and c is not None and r in PERMISSIONS[c]


def permission_table_markdown() -> str:
    """The DESIGN §13 table, generated from PERMISSIONS (for docs/operation.md)."""
    roles = list(Role)
    rows = [
        "| command | what | " + " | ".join(r.value for r in roles) + " |",
        "|---|---|" + "---|" * len(roles),
    ]
    for c in Cmd:
        marks = " | ".join("✓" if r in PERMISSIONS[c] else "" for r in roles)
        rows.append(f"| `{c.value}` | {DESCRIPTIONS[c]} | {marks} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Request:
    id: str  # unique (the channel assigns)
    principal: str  # who: an OS user name ("alice"), or "bms:<user>"
    role: str  # as mapped by the channel; re-checked here
    cmd: str
    args: Mapping[str, object] = field(default_factory=dict)
    reason: str = ""
    via: str = "cli"  # "cli" | "bms" | "demo" | "commission"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "principal": self.principal,
            "role": self.role,
            "cmd": self.cmd,
            "args": dict(self.args) if isinstance(self.args, Mapping) else self.args,
            "reason": self.reason,
            "via": self.via,
        }

    @classmethod
    def from_json(cls, d: object) -> Request:
        """The request `to_json` wrote; ValueError naming the field for anything else."""
        if not isinstance(d, Mapping):
            raise ValueError(f"request: {shown(d)}: expected a JSON object")
        extra = set(d) - _REQUEST_FIELDS
        if extra:
            raise ValueError(f"request: unexpected field {shown(sorted(map(str, extra)))}")
        for k in ("id", "principal", "role", "cmd"):
            if not isinstance(d.get(k), str):
                raise ValueError(f"request.{k}: {shown(d.get(k))}: expected a string")
        for k in ("reason", "via"):
            if k in d and not isinstance(d[k], str):
                raise ValueError(f"request.{k}: {shown(d[k])}: expected a string")
        args = d.get("args", {})
        if not isinstance(args, Mapping):
            raise ValueError(f"request.args: {shown(args)}: expected a JSON object")
        return cls(
            id=d["id"],
            principal=d["principal"],
            role=d["role"],
            cmd=d["cmd"],
            args=dict(args),
            reason=d.get("reason", ""),
            via=d.get("via", "cli"),
        )


_REQUEST_FIELDS = frozenset({"id", "principal", "role", "cmd", "args", "reason", "via"})


@dataclass(frozen=True)
class Answer:
    id: str
    accepted: bool
    why: str = ""  # refusal: one line naming the field, the value and what was expected
    old: object = None  # JSON-able old and new value (journalled)
    new: object = None
    # a refusal's class, so a protocol can answer with its own code (the BMS: an OPC UA status):
    # "denied" (the role may not), "range", "type", "state" (not now: e.g. the cause stands),
    # "busy", "invalid" (anything else malformed); "" when accepted
    kind: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "accepted": self.accepted,
            "why": self.why,
            "old": self.old,
            "new": self.new,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class Held:
    """A standing force, bypass or shelve: what, granted when, until when, by whom, why."""

    value: object  # the forced value (None for a bypass)
    granted_wall: float
    expires_wall: float
    who: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "value": self.value,
            "granted_wall": self.granted_wall,
            "expires_wall": self.expires_wall,
            "who": self.who,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class OperatorState:
    """Everything people asked for that stands; survives restarts (see `snapshot`)."""

    forces: Mapping[str, Held] = field(default_factory=dict)  # output tag -> force
    input_forces: Mapping[str, Held] = field(default_factory=dict)  # input tag -> force
    bypasses: Mapping[str, Held] = field(default_factory=dict)  # rule id -> bypass
    maintenance: bool = False
    reject: bool = False
    setpoints: Mapping[str, float] = field(default_factory=dict)  # e.g. "supply_setpoint_c"
    # a PLC watchdog proof test: the heartbeat is held unchanged until then. Never survives a
    # restart (`Core.durable` leaves it out): a restarted controller beats.
    heartbeat_hold: Held | None = None

    def snapshot(self) -> dict[str, object]:
        """JSON-able; `restore` gives back an equal state."""
        snap: dict[str, object] = {
            "forces": {k: h.to_json() for k, h in self.forces.items()},
            "input_forces": {k: h.to_json() for k, h in self.input_forces.items()},
            "bypasses": {k: h.to_json() for k, h in self.bypasses.items()},
            "maintenance": self.maintenance,
            "reject": self.reject,
            "setpoints": dict(self.setpoints),
        }
        if self.heartbeat_hold is not None:  # absent when none: older snapshots look the same
            snap["heartbeat_hold"] = self.heartbeat_hold.to_json()
        return snap

    @classmethod
    def restore(cls, d: object) -> OperatorState:
        """The state `snapshot` wrote; ValueError naming the field for anything else.

        A missing key takes its default (an older snapshot); an unknown one is refused.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"operator state: {shown(d)}: expected a JSON object")
        extra = set(d) - _STATE_FIELDS
        if extra:
            raise ValueError(
                f"operator state: unexpected field {shown(sorted(map(str, extra)))}; "
                f"expected {', '.join(sorted(_STATE_FIELDS))}"
            )
        holds = {k: _restore_holds(d.get(k, {}), k) for k in ("forces", "input_forces")}
        bypasses = _restore_holds(d.get("bypasses", {}), "bypasses")
        for k, h in bypasses.items():
            if h.value is not None:
                raise ValueError(
                    f"operator state: bypasses.{k}.value: {shown(h.value)}: expected null"
                )
        flags = {}
        for k in ("maintenance", "reject"):
            v = d.get(k, False)
            if not isinstance(v, bool):
                raise ValueError(f"operator state: {k}: {shown(v)}: expected true or false")
            flags[k] = v
        sp = d.get("setpoints", {})
        if not isinstance(sp, Mapping):
            raise ValueError(f"operator state: setpoints: {shown(sp)}: expected a JSON object")
        setpoints: dict[str, float] = {}
        for name, v in sp.items():
            if not isinstance(name, str) or not _finite_number(v):
                raise ValueError(
                    f"operator state: setpoints.{shown(name)}: {shown(v)}: expected a finite number"
                )
            setpoints[name] = v  # type: ignore[assignment]  # checked: a finite int or float
        hold = None
        if d.get("heartbeat_hold") is not None:
            hold = _restore_holds({"heartbeat": d["heartbeat_hold"]}, "heartbeat_hold")["heartbeat"]
        return cls(
            forces=holds["forces"],
            input_forces=holds["input_forces"],
            bypasses=bypasses,
            maintenance=flags["maintenance"],
            reject=flags["reject"],
            setpoints=setpoints,
            heartbeat_hold=hold,
        )


_STATE_FIELDS = frozenset(
    {"forces", "input_forces", "bypasses", "maintenance", "reject", "setpoints", "heartbeat_hold"}
)
_HELD_FIELDS = frozenset({"value", "granted_wall", "expires_wall", "who", "reason"})


def _restore_holds(d: object, where: str) -> dict[str, Held]:
    if not isinstance(d, Mapping):
        raise ValueError(f"operator state: {where}: {shown(d)}: expected a JSON object")
    out: dict[str, Held] = {}
    for key, h in d.items():
        at = f"operator state: {where}.{shown(key, 40)}"
        if not isinstance(key, str):
            raise ValueError(f"{at}: expected a string key")
        if not isinstance(h, Mapping) or set(h) != _HELD_FIELDS:
            raise ValueError(
                f"{at}: {shown(h)}: expected an object with {', '.join(sorted(_HELD_FIELDS))}"
            )
        v = h["value"]
        if not (v is None or isinstance(v, bool) or _finite_number(v)):
            raise ValueError(f"{at}.value: {shown(v)}: expected null, true, false or a number")
        g, e = h["granted_wall"], h["expires_wall"]
        for name, t in (("granted_wall", g), ("expires_wall", e)):
            if not _finite_number(t):
                raise ValueError(f"{at}.{name}: {shown(t)}: expected a finite wall time")
        if e < g:
            raise ValueError(f"{at}.expires_wall: {shown(e)}: expected ≥ granted_wall {g!r}")
        for name in ("who", "reason"):
            if not isinstance(h[name], str):
                raise ValueError(f"{at}.{name}: {shown(h[name])}: expected a string")
        out[key] = Held(v, g, e, h["who"], h["reason"])
    return out


@dataclass(frozen=True)
class Limits:
    """What the site allows; built once at start-up."""

    outputs: Mapping[str, Tag]
    inputs: Mapping[str, Tag]
    forceable_inputs: frozenset[str]
    max_force_s: float
    max_bypass_s: float
    rules: Mapping[str, Rule]
    setpoints: Mapping[str, tuple[float, float]]  # name -> (lo, hi)
    max_hold_s: float = HOLD_FLOOR_S  # the longest `watchdog_test` heartbeat hold

    @classmethod
    def from_site(cls, site: Site) -> Limits:
        return cls(
            outputs=MappingProxyType({t.name: t for t in site.outputs}),
            inputs=MappingProxyType({t.name: t for t in site.inputs}),
            # the tag key `forceable` (inputs only; outputs but the heartbeat always are)
            forceable_inputs=frozenset(t.name for t in site.inputs if t.forceable),
            max_force_s=site.control.max_force_s,
            max_bypass_s=site.interlocks.max_bypass_s,
            rules=MappingProxyType(dict(RULES_BY_ID)),
            setpoints=MappingProxyType(
                {
                    "supply_setpoint_c": (
                        SETPOINT_MIN_C,
                        site.interlocks.it_supply_high_c - SETPOINT_MARGIN_K,
                    ),
                    **{name: (lo, hi) for name, (_, lo, hi) in BMS_REQUESTS.items()},
                }
            ),
            max_hold_s=max_heartbeat_hold_s(site.plc.watchdog_s),
        )


@dataclass(frozen=True)
class Effects:
    """What the core must do this scan beyond the new OperatorState."""

    reset: frozenset[str] | None = None  # rules to reset (empty = every latched rule)
    ack: tuple[str, ...] | None = None  # alarms to acknowledge; () with ack_all
    ack_all: bool = False
    shelve: tuple[str, float] | None = None  # (alarm id, until wall time)
    unshelve: str | None = None


NO_EFFECTS = Effects()


class _Refused(Exception):
    """A refusal inside `apply`: its text is the answer's `why`, `kind` its class."""

    def __init__(self, why: str, kind: str = "invalid") -> None:
        super().__init__(why)
        self.kind = kind


def _finite_number(x: object) -> bool:
    """A finite int or float that is not a bool; an int too large for a float is not."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _keys(args: Mapping[object, object], cmd: Cmd, *forms: frozenset[str]) -> frozenset[str]:
    """The form of `args` (one of `forms`, by its exact set of keys), else refused."""
    keys = frozenset(args)
    for f in forms:
        if keys == f:
            return f
    wanted = " or ".join("{" + ", ".join(sorted(f)) + "}" for f in forms)
    got = sorted(shown(k, 40) if not isinstance(k, str) else k[:40] for k in keys)
    raise _Refused(f"args: fields {shown(got)}: expected {wanted} for {cmd.value}")


def _text(value: object, name: str, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > limit:
        what = "a string" if empty else "a non-empty string"
        raise _Refused(f"{name}: {shown(value)}: expected {what} of at most {limit} characters")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Refused(f"{name}: {shown(value)}: expected true or false")
    return value


def _duration_s(minutes: object, limit_s: float, limit_name: str) -> float:
    """Minutes as seconds, a finite number > 0 and at most `limit_s`."""
    if not _finite_number(minutes) or not 0 < minutes * 60 <= limit_s:  # type: ignore[operator]
        raise _Refused(
            f"args.minutes: {shown(minutes)}: expected a number of minutes > 0 and at most "
            f"{limit_s / 60:g} ({limit_name} = {limit_s:g} s)"
        )
    return float(minutes) * 60.0  # type: ignore[arg-type]  # finite, checked


def _expiry(now_wall: float, duration_s: float) -> float:
    """now + duration, rounded down so that expiry - now never exceeds the duration granted
    (the supervisor and the interlock engine check exactly that bound)."""
    exp = now_wall + duration_s
    while exp - now_wall > duration_s:
        exp = math.nextafter(exp, -math.inf)
    return exp


def apply(
    state: OperatorState,
    req: Request,
    limits: Limits,
    now_wall: float,
    *,
    link_ok: bool = True,
) -> tuple[OperatorState, Answer, Effects]:
    """Authorise, validate and apply one request. Never raises; a refusal changes nothing.

    Reads are authorised and answered accepted with no change (the channel serves their data).
    `link_ok`: the PLC link works (a heartbeat hold is refused while it does not).
    """
    rid = getattr(req, "id", None)
    rid = rid if isinstance(rid, str) and len(rid) <= MAX_NAME else shown(rid)
    try:
        new, answer, effects = _apply(state, req, limits, now_wall, link_ok)
        return new, Answer(rid, True, "", answer[0], answer[1]), effects
    except _Refused as r:
        return state, Answer(rid, False, str(r), kind=r.kind), NO_EFFECTS
    except Exception as e:  # a bug must not take the scan down: refuse, change nothing
        return (
            state,
            Answer(rid, False, f"internal error: {type(e).__name__}: {shown(e)}"),
            (NO_EFFECTS),
        )


def _apply(
    state: OperatorState, req: Request, limits: Limits, now_wall: float, link_ok: bool = True
) -> tuple[OperatorState, tuple[object, object], Effects]:
    cmd = _cmd(req.cmd)
    if cmd is None:
        raise _Refused(f"cmd: {shown(req.cmd)}: expected one of {', '.join(c.value for c in Cmd)}")
    role = _role(req.role)
    if role is None:
        raise _Refused(
            f"role: {shown(req.role)}: expected one of {', '.join(r.value for r in Role)}"
        )
    if role not in PERMISSIONS[cmd]:
        needs = " or ".join(r.value for r in Role if r in PERMISSIONS[cmd])
        raise _Refused(f"role {role.value} may not {cmd.value}; needs {needs}", "denied")
    if not isinstance(req.id, str) or len(req.id) > MAX_NAME:
        raise _Refused(f"id: {shown(req.id)}: expected a string of at most {MAX_NAME} characters")
    who = _text(req.principal, "principal", MAX_NAME)
    if cmd in READS:
        return state, (None, None), NO_EFFECTS
    args = req.args
    if not isinstance(args, Mapping):
        raise _Refused(f"args: {shown(args)}: expected an object of named arguments")
    # a reason, where given, is journalled: it must be text even where it is optional
    reason = _text(req.reason, "reason", MAX_REASON, empty=True)
    ending = args.get("release") is True or args.get("end") is True
    if cmd is Cmd.WATCHDOG_TEST:
        seconds = args.get("seconds")
        ending = _finite_number(seconds) and seconds == 0
    if cmd in REASON_REQUIRED and not ending:
        _text(reason, "reason", MAX_REASON)
    if cmd is Cmd.ACK:
        return _ack(state, args)
    if cmd in (Cmd.REJECT, Cmd.MAINTENANCE):
        _keys(args, cmd, frozenset({"on"}))
        on = _flag(args["on"], "args.on")
        old = state.reject if cmd is Cmd.REJECT else state.maintenance
        key = "reject" if cmd is Cmd.REJECT else "maintenance"
        return _replace(state, **{key: on}), (old, on), NO_EFFECTS
    if cmd is Cmd.SETPOINT:
        return _setpoint(state, args, limits)
    if cmd is Cmd.RESET:
        return _reset(state, args, limits)
    if not _finite_number(now_wall):
        raise _Refused(f"now_wall: {shown(now_wall)}: the controller's clock is not a time")
    if cmd is Cmd.FORCE:
        return _force(state, args, limits, now_wall, who, reason)
    if cmd is Cmd.WATCHDOG_TEST:
        return _watchdog_test(state, args, limits, now_wall, who, reason, link_ok)
    if cmd is Cmd.COMMISSION:
        # I/O (the site key, the journal): the runtime files records itself, never the core
        raise _Refused("commission: filed by the running controller's runtime only", "state")
    if cmd is Cmd.BYPASS:
        return _bypass(state, args, limits, now_wall, who, reason)
    return _shelve(state, args, now_wall)


def _replace(state: OperatorState, **changes: object) -> OperatorState:
    return OperatorState(**{**_fields(state), **changes})  # type: ignore[arg-type]


def _fields(state: OperatorState) -> dict[str, object]:
    return {
        "forces": state.forces,
        "input_forces": state.input_forces,
        "bypasses": state.bypasses,
        "maintenance": state.maintenance,
        "reject": state.reject,
        "setpoints": state.setpoints,
        "heartbeat_hold": state.heartbeat_hold,
    }


def _str_list(value: object, name: str, *, empty: bool) -> list[str]:
    if not isinstance(value, list | tuple) or len(value) > MAX_LIST or (not empty and not value):
        size = "a list" if empty else "a non-empty list"
        raise _Refused(f"{name}: {shown(value)}: expected {size} of at most {MAX_LIST} ids")
    for v in value:
        _text(v, name, MAX_ALARM_ID)
    return list(value)


def _ack(
    state: OperatorState, args: Mapping[str, object]
) -> tuple[OperatorState, tuple[object, object], Effects]:
    form = _keys(args, Cmd.ACK, frozenset({"alarms"}), frozenset({"all"}))
    if "all" in form:
        if args["all"] is not True:
            raise _Refused(f"args.all: {shown(args['all'])}: expected true (or args.alarms)")
        return state, (None, "all"), Effects(ack=(), ack_all=True)
    ids = tuple(dict.fromkeys(_str_list(args["alarms"], "args.alarms", empty=False)))
    return state, (None, list(ids)), Effects(ack=ids)


def _setpoint(
    state: OperatorState, args: Mapping[str, object], limits: Limits
) -> tuple[OperatorState, tuple[object, object], Effects]:
    _keys(args, Cmd.SETPOINT, frozenset({"name", "value"}))
    name, value = args["name"], args["value"]
    if not isinstance(name, str) or name not in limits.setpoints:
        raise _Refused(
            f"args.name: {shown(name)}: expected one of {', '.join(sorted(limits.setpoints))}"
        )
    lo, hi = limits.setpoints[name]
    why = check_setpoint(value, lo, hi, name)
    if why:
        kind = "range" if _finite_number(value) else "type"
        raise _Refused(f"args.value: {shown(value)}: expected {why}", kind)
    v = float(value)  # type: ignore[arg-type]  # a finite number, checked
    old = state.setpoints.get(name)
    return _replace(state, setpoints={**state.setpoints, name: v}), (old, v), NO_EFFECTS


def _reset(
    state: OperatorState, args: Mapping[str, object], limits: Limits
) -> tuple[OperatorState, tuple[object, object], Effects]:
    _keys(args, Cmd.RESET, frozenset({"rules"}))
    rules = _str_list(args["rules"], "args.rules", empty=True)
    latching = sorted(k for k, r in limits.rules.items() if r.latching)
    for rid in rules:
        rule = limits.rules.get(rid)
        if rule is None or not rule.latching:
            what = "unknown rule" if rule is None else "not a latching rule"
            raise _Refused(
                f"args.rules: {shown(rid)}: {what}; expected latching rules "
                f"({', '.join(latching)}) or an empty list for all latched"
            )
    chosen = frozenset(rules)
    # the engine decides in the scan whether each reset holds (cause gone, sensors valid)
    return state, (None, sorted(chosen) or "all latched"), Effects(reset=chosen)


def _force(
    state: OperatorState,
    args: Mapping[str, object],
    limits: Limits,
    now_wall: float,
    who: str,
    reason: str,
) -> tuple[OperatorState, tuple[object, object], Effects]:
    form = _keys(
        args,
        Cmd.FORCE,
        frozenset({"tag", "value", "minutes"}),
        frozenset({"tag", "release"}),
    )
    name = args["tag"]
    tag = limits.outputs.get(name) if isinstance(name, str) else None
    is_input = False
    if tag is None or tag.name in NOT_FORCEABLE:
        tag = None
        if isinstance(name, str) and name in limits.forceable_inputs:
            tag, is_input = limits.inputs.get(name), True
    if tag is None:
        inputs = ", ".join(sorted(limits.forceable_inputs)) or "none on this site"
        raise _Refused(
            f"args.tag: {shown(name)}: expected an output other than "
            f"{', '.join(sorted(NOT_FORCEABLE))}, or a forceable input ({inputs})"
        )
    key = "input_forces" if is_input else "forces"
    held: Mapping[str, Held] = state.input_forces if is_input else state.forces
    if "release" in form:
        if args["release"] is not True:
            raise _Refused(f"args.release: {shown(args['release'])}: expected true")
        if tag.name not in held:
            raise _Refused(f"args.tag: {shown(tag.name)}: not forced")
        old = held[tag.name].value
        rest = {k: h for k, h in held.items() if k != tag.name}
        return _replace(state, **{key: rest}), (old, None), NO_EFFECTS
    value = args["value"]
    why = value_problem(tag, value)
    if why:
        if is_input:
            why = why.replace(" output ", " input ")
        raise _Refused(f"args.value: {shown(value)}: expected {why}")
    # an analogue value is stored as a float, as the codec and the sample carry it
    v: object = value if tag.is_bool else float(value)  # type: ignore[arg-type]
    if is_input and _hides_a_trip(tag, v):
        raise _Refused(
            f"args.value: {shown(value)}: expected {str(tag.fail_state).lower()} for "
            f"{tag.name}: a leak or fault input may be forced only to its trip state, never "
            "to hide one"
        )
    duration = _duration_s(args["minutes"], limits.max_force_s, "max_force_s")
    old_held = held.get(tag.name)
    new_held = Held(v, now_wall, _expiry(now_wall, duration), who, reason)
    return (
        _replace(state, **{key: {**held, tag.name: new_held}}),
        (None if old_held is None else old_held.value, v),
        NO_EFFECTS,
    )


def _bypass(
    state: OperatorState,
    args: Mapping[str, object],
    limits: Limits,
    now_wall: float,
    who: str,
    reason: str,
) -> tuple[OperatorState, tuple[object, object], Effects]:
    form = _keys(args, Cmd.BYPASS, frozenset({"rule", "minutes"}), frozenset({"rule", "end"}))
    rid = args["rule"]
    rule = limits.rules.get(rid) if isinstance(rid, str) else None
    if rule is None:
        raise _Refused(
            f"args.rule: {shown(rid)}: expected a rule id ({', '.join(sorted(limits.rules))})"
        )
    if "end" in form:
        if args["end"] is not True:
            raise _Refused(f"args.end: {shown(args['end'])}: expected true")
        if rule.id not in state.bypasses:
            raise _Refused(f"args.rule: {shown(rule.id)}: not bypassed")
        old = state.bypasses[rule.id].expires_wall
        rest = {k: h for k, h in state.bypasses.items() if k != rule.id}
        return _replace(state, bypasses=rest), ({"until_wall": old}, None), NO_EFFECTS
    if not rule.bypassable:
        ok = ", ".join(sorted(k for k, r in limits.rules.items() if r.bypassable))
        raise _Refused(f"args.rule: {shown(rule.id)}: not bypassable; expected one of {ok}")
    limit = min(rule.max_bypass_s, limits.max_bypass_s)
    duration = _duration_s(args["minutes"], limit, f"max_bypass_s of {rule.id}")
    was = state.bypasses.get(rule.id)
    new_held = Held(None, now_wall, _expiry(now_wall, duration), who, reason)
    return (
        _replace(state, bypasses={**state.bypasses, rule.id: new_held}),
        (
            None if was is None else {"until_wall": was.expires_wall},
            {"until_wall": new_held.expires_wall},
        ),
        NO_EFFECTS,
    )


def _watchdog_test(
    state: OperatorState,
    args: Mapping[str, object],
    limits: Limits,
    now_wall: float,
    who: str,
    reason: str,
    link_ok: bool,
) -> tuple[OperatorState, tuple[object, object], Effects]:
    """Hold the heartbeat unchanged for `seconds` (0: end a hold now; ending one that is not
    there is accepted, so a tool cleaning up after an abort is never refused)."""
    _keys(args, Cmd.WATCHDOG_TEST, frozenset({"seconds"}))
    seconds = args["seconds"]
    was = state.heartbeat_hold
    old = None if was is None else {"until_wall": was.expires_wall}
    if _finite_number(seconds) and seconds == 0:
        return _replace(state, heartbeat_hold=None), (old, None), NO_EFFECTS
    limit = limits.max_hold_s
    if not _finite_number(seconds) or not HOLD_MIN_S <= seconds <= limit:  # type: ignore[operator]
        kind = "range" if _finite_number(seconds) else "type"
        raise _Refused(
            f"args.seconds: {shown(seconds)}: expected 0 (end the hold) or {HOLD_MIN_S:g} … "
            f"{limit:g} s (the bound max({HOLD_FLOOR_S:g} s, {HOLD_WATCHDOGS:g} × "
            "plc.watchdog_s))",
            kind,
        )
    if not link_ok:
        raise _Refused(
            "watchdog_test: the PLC link is down; a heartbeat hold proves nothing while the PLC "
            "hears no controller at all",
            "state",
        )
    duration = float(seconds)  # type: ignore[arg-type]  # finite, checked
    held = Held(None, now_wall, _expiry(now_wall, duration), who, reason)
    new = {"seconds": duration, "until_wall": held.expires_wall}
    return _replace(state, heartbeat_hold=held), (old, new), NO_EFFECTS


def _shelve(
    state: OperatorState, args: Mapping[str, object], now_wall: float
) -> tuple[OperatorState, tuple[object, object], Effects]:
    form = _keys(args, Cmd.SHELVE, frozenset({"alarm", "minutes"}), frozenset({"alarm", "end"}))
    # the alarm id itself is checked by the core against the alarm table
    alarm = _text(args["alarm"], "args.alarm", MAX_ALARM_ID)
    if "end" in form:
        if args["end"] is not True:
            raise _Refused(f"args.end: {shown(args['end'])}: expected true")
        return state, (None, None), Effects(unshelve=alarm)
    until = _expiry(now_wall, _duration_s(args["minutes"], MAX_SHELVE_S, "MAX_SHELVE_S"))
    return state, (None, {"until_wall": until}), Effects(shelve=(alarm, until))


def remaining_s(held: Held, now_wall: float) -> float:
    """Seconds a hold has left: min(expires - now, expires - granted), never below 0.

    A wall clock set back never makes the remainder longer than the time granted; set forward,
    it ends the hold early. An unreadable time (NaN) ends it.
    """
    left = min(held.expires_wall - now_wall, held.expires_wall - held.granted_wall)
    return left if left > 0.0 else 0.0  # NaN compares false: 0


_KINDS = (("force", "forces"), ("input_force", "input_forces"), ("bypass", "bypasses"))


def expire(
    state: OperatorState, now_wall: float
) -> tuple[OperatorState, list[tuple[str, str, Held]]]:
    """End every force and bypass whose time is up: (kind, key, held) for each, in key order.

    Nothing ended: the same state object, so a scan with nothing to do allocates nothing.
    """
    ended: list[tuple[str, str, Held]] = []
    changes: dict[str, object] = {}
    for kind, attr in _KINDS:
        holds: Mapping[str, Held] = getattr(state, attr)
        gone = sorted(k for k, h in holds.items() if remaining_s(h, now_wall) <= 0.0)
        if gone:
            ended += [(kind, k, holds[k]) for k in gone]
            changes[attr] = {k: h for k, h in holds.items() if k not in gone}
    hold = state.heartbeat_hold
    if hold is not None and remaining_s(hold, now_wall) <= 0.0:
        ended.append(("heartbeat_hold", "heartbeat", hold))
        changes["heartbeat_hold"] = None
    return (_replace(state, **changes) if changes else state), ended


def prune(
    state: OperatorState, limits: Limits
) -> tuple[OperatorState, list[tuple[str, str, Held, str]]]:
    """End what the site no longer allows (after a site file change between restarts).

    A force of a tag that is gone, no longer forceable or whose value no longer fits; a bypass
    of a rule that is gone or no longer bypassable; any hold granted for longer than the
    current maximum; a setpoint outside its current bounds is dropped (the site's own applies).
    Returns (kind, key, held, why) for each hold ended. Ending is always toward the safe side.
    """
    ended: list[tuple[str, str, Held, str]] = []
    changes: dict[str, object] = {}
    for kind, attr in _KINDS:
        holds: Mapping[str, Held] = getattr(state, attr)
        keep: dict[str, Held] = {}
        for k, h in holds.items():
            why = _hold_problem(kind, k, h, limits)
            if why:
                ended.append((kind, k, h, why))
            else:
                keep[k] = h
        if len(keep) != len(holds):
            changes[attr] = keep
    sp = {
        n: v
        for n, v in state.setpoints.items()
        if n in limits.setpoints and not check_setpoint(v, *limits.setpoints[n], n)
    }
    if len(sp) != len(state.setpoints):
        changes["setpoints"] = sp
    return (_replace(state, **changes) if changes else state), ended


def _hides_a_trip(tag: Tag, value: object) -> bool:
    """A leak or fault input forced to anything but the state its cut wire reads (the trip)."""
    return is_safety_input(tag) and tag.fail_state is not None and value != tag.fail_state


def _hold_problem(kind: str, key: str, h: Held, limits: Limits) -> str:
    granted_s = h.expires_wall - h.granted_wall
    if kind == "bypass":
        rule = limits.rules.get(key)
        if rule is None or not rule.bypassable:
            return "rule unknown or not bypassable"
        limit = min(rule.max_bypass_s, limits.max_bypass_s)
        return f"longer than max_bypass_s {limit:g} s" if granted_s > limit else ""
    if kind == "force":
        tag = limits.outputs.get(key)
        if tag is None or key in NOT_FORCEABLE:
            return "not a forceable output"
    else:
        tag = limits.inputs.get(key)
        if tag is None or key not in limits.forceable_inputs:
            return "not a forceable input"
    why = value_problem(tag, h.value)
    if why:
        return f"value {shown(h.value)}: expected {why}"
    if kind == "input_force" and _hides_a_trip(tag, h.value):
        return "a leak or fault input may be forced only to its trip state"
    if granted_s > limits.max_force_s:
        return f"longer than max_force_s {limits.max_force_s:g} s"
    return ""


def to_commands(state: OperatorState, now_s: float, now_wall: float) -> dict[str, object]:
    """The `Commands` fields this state asks for, with expiries on the scan's monotonic clock."""
    manual = {}
    for tag, h in state.forces.items():
        left = remaining_s(h, now_wall)
        if left > 0.0:
            manual[tag] = Manual(h.value, now_s + left, h.who)  # type: ignore[arg-type]
    bypasses = {}
    for rid, h in state.bypasses.items():
        left = remaining_s(h, now_wall)
        if left > 0.0:
            bypasses[rid] = now_s + left
    return {
        "manual": manual,
        "bypasses": bypasses,
        "maintenance": state.maintenance,
        "request_reject": state.reject,
        "supply_setpoint_c": state.setpoints.get("supply_setpoint_c"),
        "bms": {n: v for n, v in state.setpoints.items() if n in BMS_REQUESTS},
    }


def forced_image(
    image: ProcessImage, state: OperatorState, now_s: float, now_wall: float
) -> ProcessImage:
    """The image with each standing input force as a fresh FORCED sample."""
    forced = {
        tag: Sample(h.value, Quality.FORCED, now_s)  # type: ignore[arg-type]
        for tag, h in state.input_forces.items()
        if remaining_s(h, now_wall) > 0.0
    }
    return image.updated(forced) if forced else image
