"""Operator authority: the permission table, every refusal, expiries across clock steps, the
operator state's snapshot, and agreement with the supervisor's own checks.

Invariants first: `apply` never raises; a refused request leaves the state untouched (the very
same object) with no effects; an accepted one leaves a state whose snapshot is plain JSON and
whose every hold lasts no longer than the site allows.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.authority import (
    MAX_SHELVE_S,
    PERMISSIONS,
    READS,
    SETPOINTS,
    Answer,
    Cmd,
    Effects,
    Held,
    Limits,
    OperatorState,
    Request,
    Role,
    apply,
    expire,
    forced_image,
    permission_table_markdown,
    permitted,
    prune,
    remaining_s,
    to_commands,
)
from controller.sequences import BMS_REQUESTS
from controller.supervisor import Commands, Supervisor
from interlocks.rules import RULES
from plc_io.image import Quality, Sample
from tests.unit.core_helpers import CFG, SITE, image

LIMITS = Limits.from_site(SITE)
WALL = 1_764_590_400.375  # a wall time with a fraction, as time.time() gives
EMPTY = OperatorState()
MAX_FORCE_MIN = SITE.control.max_force_s / 60
IT_HIGH = SITE.interlocks.it_supply_high_c

# DESIGN §13, written out here independently of controller/authority.py.
VIEW, OPER, ENG = "viewer", "operator", "engineer"
DESIGN_13: dict[str, set[str]] = {
    "status": {VIEW, OPER, ENG},
    "alarms": {VIEW, OPER, ENG},
    "journal": {VIEW, OPER, ENG},
    "ack": {OPER, ENG},
    "reject": {OPER, ENG},
    "setpoint": {OPER, ENG},
    "reset": {ENG},
    "maintenance": {ENG},
    "force": {ENG},
    "bypass": {ENG},
    "shelve": {ENG},
    "watchdog_test": {ENG},
    "commission": {ENG},
}

# one valid request per command
GOOD_ARGS: dict[str, dict[str, object]] = {
    "status": {},
    "alarms": {},
    "journal": {"limit": 10},
    "ack": {"alarms": ["IL-04"]},
    "reject": {"on": True},
    "setpoint": {"name": "supply_setpoint_c", "value": 30.0},
    "reset": {"rules": []},
    "maintenance": {"on": True},
    "force": {"tag": "reuse_valve_cmd", "value": 20.0, "minutes": 30},
    "bypass": {"rule": "IL-06", "minutes": 30},
    "shelve": {"alarm": "HUNTING", "minutes": 60},
    "watchdog_test": {"seconds": 10},
    "commission": {"record": {"format": "heatloop-commissioning/1"}},
}


def req(
    cmd: object,
    args: object = None,
    *,
    role: object = "engineer",
    reason: object = "commissioning check",
    who: object = "alice",
    rid: object = "r1",
) -> Request:
    return Request(
        id=rid,  # type: ignore[arg-type]
        principal=who,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        cmd=cmd,  # type: ignore[arg-type]
        args={} if args is None else args,  # type: ignore[arg-type]
        reason=reason,  # type: ignore[arg-type]
    )


def accepted(
    state: OperatorState, r: Request, now_wall: float = WALL
) -> tuple[OperatorState, Answer, Effects]:
    new, ans, eff = apply(state, r, LIMITS, now_wall)
    assert ans.accepted, ans.why
    assert ans.id == r.id and ans.why == ""
    return new, ans, eff


def refused(state: OperatorState, r: Request, *parts: str) -> str:
    """Apply `r`, check it is refused with nothing changed, and that `why` holds every part."""
    new, ans, eff = apply(state, r, LIMITS, WALL)
    assert not ans.accepted
    assert new is state and eff == Effects()
    assert "\n" not in ans.why and len(ans.why) < 600
    for p in parts:
        assert p in ans.why, (p, ans.why)
    return ans.why


# ---- the permission table ------------------------------------------------------------------


def test_the_table_names_every_command_and_role_of_design_13() -> None:
    assert {c.value for c in Cmd} == set(DESIGN_13) == {c.value for c in PERMISSIONS}
    assert {r.value for r in Role} == {VIEW, OPER, ENG}
    assert {c.value for c in READS} == {"status", "alarms", "journal"}


@pytest.mark.parametrize("cmd", sorted(DESIGN_13))
@pytest.mark.parametrize("role", [VIEW, OPER, ENG])
def test_every_role_and_command_is_allowed_exactly_as_design_13_says(role: str, cmd: str) -> None:
    allowed = role in DESIGN_13[cmd]
    assert permitted(role, cmd) is allowed
    assert permitted(Role(role), Cmd(cmd)) is allowed
    r = req(cmd, GOOD_ARGS[cmd], role=role)
    if allowed and cmd == "commission":  # the runtime files records (I/O), never the core
        refused(EMPTY, r, "runtime")
    elif allowed:
        new, ans, _ = accepted(EMPTY, r)
        if Cmd(cmd) in READS:
            assert new is EMPTY and ans.old is None and ans.new is None
    else:
        needs = " or ".join(x for x in (VIEW, OPER, ENG) if x in DESIGN_13[cmd])
        assert refused(EMPTY, r) == f"role {role} may not {cmd}; needs {needs}"


@pytest.mark.parametrize(
    ("role", "cmd"),
    [
        ("root", "status"),
        ("engineer", "rm"),
        ("Engineer", "force"),
        (None, None),
        (["engineer"], "force"),
        ({"engineer": 1}, {"force": 1}),
        (1, 2),
        (math.nan, "ack"),
        ("engineer", b"force"),
    ],
)
def test_permitted_is_false_for_anything_unknown_and_never_raises(
    role: object, cmd: object
) -> None:
    assert permitted(role, cmd) is False


def test_the_generated_table_marks_the_roles_of_design_13() -> None:
    lines = permission_table_markdown().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[-3:] == [VIEW, OPER, ENG]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = {
            role for role, mark in zip(head[-3:], cells[-3:], strict=True) if mark == "✓"
        }
    assert rows == DESIGN_13


# ---- refusals: each names the field, the value and what was expected ------------------------


@pytest.mark.parametrize(
    ("r", "parts"),
    [
        (req("rm"), ("cmd: 'rm'", "expected one of status, alarms")),
        (req(None), ("cmd: None",)),
        (req("force", GOOD_ARGS["force"], role="root"), ("role: 'root'", "viewer, operator")),
        (req("force", GOOD_ARGS["force"], role=5), ("role: 5",)),
        (req("bypass", GOOD_ARGS["bypass"], role="operator"), ("role operator may not bypass",)),
        (req("force", GOOD_ARGS["force"], who=""), ("principal: ''", "non-empty string")),
        (req("force", GOOD_ARGS["force"], who=7), ("principal: 7",)),
        (req("status", rid=["x"]), ("id: ['x']", "expected a string")),
        (req("force", ["reuse_valve_cmd", 1]), ("args: ['reuse_valve_cmd', 1]", "an object")),
        (req("force", "tag=x"), ("args: 'tag=x'",)),
    ],
)
def test_unknown_command_role_principal_or_args_shape_is_refused(
    r: Request, parts: tuple[str, ...]
) -> None:
    refused(EMPTY, r, *parts)


@pytest.mark.parametrize("cmd", ["reset", "bypass", "force", "maintenance", "reject", "shelve"])
@pytest.mark.parametrize("reason", ["", "   ", None, 42, "x" * 501])
def test_a_reason_is_required_where_design_13_asks_for_one(cmd: str, reason: object) -> None:
    refused(EMPTY, req(cmd, GOOD_ARGS[cmd], reason=reason), "reason: ", "at most 500 characters")


def test_a_reason_of_500_characters_is_enough_and_an_optional_one_must_still_be_text() -> None:
    accepted(EMPTY, req("force", GOOD_ARGS["force"], reason="x" * 500))
    accepted(EMPTY, req("ack", GOOD_ARGS["ack"], reason=""))
    refused(EMPTY, req("ack", GOOD_ARGS["ack"], reason=["why"]), "reason: ['why']")


@pytest.mark.parametrize(
    ("cmd", "args", "parts"),
    [
        ("reject", {"on": "yes"}, ("args.on: 'yes'", "expected true or false")),
        ("reject", {"on": 1}, ("args.on: 1",)),
        ("maintenance", {"on": None}, ("args.on: None",)),
        ("maintenance", {}, ("args: fields []", "expected {on} for maintenance")),
        ("maintenance", {"on": True, "for": 5}, ("args: fields ['for', 'on']",)),
        ("setpoint", {"name": "fan", "value": 30}, ("args.name: 'fan'", "supply_setpoint_c")),
        ("setpoint", {"name": "supply_setpoint_c", "value": math.nan}, ("args.value: nan",)),
        ("setpoint", {"name": "supply_setpoint_c", "value": True}, ("args.value: True",)),
        ("setpoint", {"name": "supply_setpoint_c", "value": "30"}, ("a finite number",)),
        # never within 5 K of the IL-01 limit, never below 10 °C
        ("setpoint", {"name": "supply_setpoint_c", "value": IT_HIGH - 4.99}, ("within [10, ",)),
        ("setpoint", {"name": "supply_setpoint_c", "value": 9.99}, ("args.value: 9.99",)),
        ("setpoint", {"name": "supply_setpoint_c", "value": 10**400}, ("a finite number",)),
        ("ack", {"alarms": []}, ("args.alarms: []", "non-empty list")),
        ("ack", {"alarms": "IL-04"}, ("args.alarms: 'IL-04'",)),
        ("ack", {"alarms": ["IL-04", 4]}, ("args.alarms: 4",)),
        ("ack", {"alarms": ["IL-04"] * 201}, ("at most 200",)),
        ("ack", {"all": False}, ("args.all: False", "expected true")),
        ("ack", {"all": True, "alarms": ["IL-04"]}, ("{alarms} or {all}",)),
        ("reset", {"rules": ["IL-99"]}, ("args.rules: 'IL-99'", "unknown rule", "IL-04, IL-05")),
        ("reset", {"rules": ["IL-06"]}, ("args.rules: 'IL-06'", "not a latching rule")),
        ("reset", {"rules": "IL-04"}, ("args.rules: 'IL-04'", "a list")),
        ("reset", {}, ("expected {rules} for reset",)),
        ("shelve", {"alarm": "", "minutes": 5}, ("args.alarm: ''",)),
        ("shelve", {"alarm": "x" * 101, "minutes": 5}, ("at most 100 characters",)),
        ("shelve", {"alarm": "HUNTING", "minutes": MAX_SHELVE_S / 60 + 1}, ("args.minutes",)),
        ("shelve", {"alarm": "HUNTING", "minutes": 0}, ("args.minutes: 0", "> 0")),
        ("shelve", {"alarm": "HUNTING", "end": False}, ("args.end: False",)),
    ],
)
def test_bad_arguments_are_refused_naming_field_value_and_expectation(
    cmd: str, args: dict[str, object], parts: tuple[str, ...]
) -> None:
    refused(EMPTY, req(cmd, args), *parts)


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (
            {"tag": "heartbeat", "value": 1.0, "minutes": 5},
            ("args.tag: 'heartbeat'", "other than heartbeat"),
        ),
        (
            {"tag": "no_such_tag", "value": 1.0, "minutes": 5},
            ("args.tag: 'no_such_tag'", "leak_reuse"),
        ),
        # an input the site does not allow forcing (the supply temperature behind IL-01/IL-02)
        ({"tag": "it_supply_temp", "value": 30.0, "minutes": 5}, ("args.tag: 'it_supply_temp'",)),
        ({"tag": 3, "value": 1.0, "minutes": 5}, ("args.tag: 3",)),
        ({"tag": "reuse_valve_cmd", "value": "50", "minutes": 5}, ("args.value: '50'", "a number")),
        ({"tag": "reuse_valve_cmd", "value": True, "minutes": 5}, ("args.value: True",)),
        ({"tag": "reuse_valve_cmd", "value": math.inf, "minutes": 5}, ("a finite number",)),
        (
            {"tag": "secondary_pump_cmd", "value": 1, "minutes": 5},
            ("true or false for boolean output",),
        ),
        ({"tag": "leak_reuse", "value": 0, "minutes": 5}, ("true or false for boolean input",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": 0}, ("args.minutes: 0",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": -1}, ("args.minutes: -1",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": math.nan}, ("args.minutes: nan",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": math.inf}, ("args.minutes: inf",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": "5"}, ("args.minutes: '5'",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0, "minutes": 10**400}, ("args.minutes: 1000",)),
        ({"tag": "reuse_valve_cmd", "value": 20.0}, ("{minutes, tag, value} or {release, tag}",)),
        (
            {"tag": "reuse_valve_cmd", "release": True},
            ("args.tag: 'reuse_valve_cmd'", "not forced"),
        ),
        ({"tag": "leak_reuse", "release": True}, ("args.tag: 'leak_reuse'", "not forced")),
        ({"tag": "reuse_valve_cmd", "release": 1}, ("args.release: 1", "expected true")),
    ],
)
def test_a_bad_force_is_refused(args: dict[str, object], parts: tuple[str, ...]) -> None:
    refused(EMPTY, req("force", args), *parts)


@pytest.mark.parametrize("tag", [t.name for t in SITE.outputs if t.name != "heartbeat"])
def test_a_force_beyond_the_value_range_or_the_site_maximum_is_refused(tag: str) -> None:
    t = SITE.tag(tag)
    if not t.is_bool:
        refused(EMPTY, req("force", {"tag": tag, "value": t.hi + 1, "minutes": 5}), "range")
        refused(EMPTY, req("force", {"tag": tag, "value": t.lo - 1, "minutes": 5}), "range")
    value = True if t.is_bool else t.lo
    over = {"tag": tag, "value": value, "minutes": MAX_FORCE_MIN + 0.01}
    refused(EMPTY, req("force", over), f"max_force_s = {SITE.control.max_force_s:g} s")
    accepted(EMPTY, req("force", {**over, "minutes": MAX_FORCE_MIN}))


@pytest.mark.parametrize("rule", [r for r in RULES if not r.bypassable], ids=lambda r: r.id)
def test_a_rule_design_6_makes_unbypassable_cannot_be_bypassed(rule: object) -> None:
    rid = rule.id  # type: ignore[attr-defined]
    refused(
        EMPTY, req("bypass", {"rule": rid, "minutes": 1}), f"args.rule: '{rid}'", "not bypassable"
    )


@pytest.mark.parametrize("rule", [r for r in RULES if r.bypassable], ids=lambda r: r.id)
def test_a_bypass_lasts_at_most_the_rules_and_the_sites_maximum(rule: object) -> None:
    rid = rule.id  # type: ignore[attr-defined]
    limit_min = min(rule.max_bypass_s, SITE.interlocks.max_bypass_s) / 60  # type: ignore[attr-defined]
    assert limit_min <= 4 * 60  # DESIGN §6: at most 4 h
    refused(EMPTY, req("bypass", {"rule": rid, "minutes": limit_min + 0.01}), "args.minutes")
    new, _, _ = accepted(EMPTY, req("bypass", {"rule": rid, "minutes": limit_min}))
    assert remaining_s(new.bypasses[rid], WALL) <= limit_min * 60


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        ({"rule": "IL-99", "minutes": 5}, ("args.rule: 'IL-99'", "IL-01")),
        ({"rule": None, "minutes": 5}, ("args.rule: None",)),
        ({"rule": "IL-06", "minutes": 0}, ("args.minutes: 0",)),
        ({"rule": "IL-06", "end": True}, ("args.rule: 'IL-06'", "not bypassed")),
        ({"rule": "IL-06", "end": "yes"}, ("args.end: 'yes'",)),
        ({"rule": "IL-06"}, ("{minutes, rule} or {end, rule}",)),
    ],
)
def test_a_bad_bypass_is_refused(args: dict[str, object], parts: tuple[str, ...]) -> None:
    refused(EMPTY, req("bypass", args), *parts)


def test_a_hostile_request_is_refused_in_one_bounded_line() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    huge = "x" * 10_000_000
    refused(EMPTY, req("force", GOOD_ARGS["force"], reason=huge), "reason: 'xxxx")
    refused(EMPTY, req("force", {"tag": deep, "value": 1.0, "minutes": 5}), "args.tag: ")
    refused(EMPTY, req("force", {"tag": huge, "value": 1.0, "minutes": 5}), "args.tag: 'xxx")
    refused(EMPTY, req("force", {"tag": "reuse_valve_cmd", "value": 10**5000, "minutes": 5}))
    refused(EMPTY, req("setpoint", {"name": "supply_setpoint_c", "value": -(10**5000)}))
    refused(EMPTY, req(huge), "cmd: 'xxx")
    refused(EMPTY, req("ack", {"alarms": [huge]}), "args.alarms")
    refused(EMPTY, req("ack", {"alarms": deep}), "args.alarms")


def test_something_that_is_not_a_request_is_refused() -> None:
    new, ans, eff = apply(EMPTY, None, LIMITS, WALL)  # type: ignore[arg-type]
    assert not ans.accepted and ans.id == "None" and new is EMPTY and eff == Effects()


def test_an_unreadable_wall_clock_grants_nothing_with_an_expiry() -> None:
    for cmd in ("force", "bypass", "shelve"):
        new, ans, eff = apply(EMPTY, req(cmd, GOOD_ARGS[cmd]), LIMITS, math.nan)
        assert not ans.accepted and "now_wall: nan" in ans.why
        assert new is EMPTY and eff == Effects()


# ---- what accepted requests do --------------------------------------------------------------


def test_a_force_of_an_output_stands_with_who_why_and_expiry_until_released() -> None:
    r = req("force", {"tag": "reuse_valve_cmd", "value": 20, "minutes": 30}, who="alice")
    s1, ans, eff = accepted(EMPTY, r)
    assert eff == Effects() and (ans.old, ans.new) == (None, 20.0)
    h = s1.forces["reuse_valve_cmd"]
    assert h == Held(20.0, WALL, h.expires_wall, "alice", "commissioning check")
    assert isinstance(h.value, float)  # an analogue value is carried as a float
    assert h.expires_wall - WALL == pytest.approx(1800.0, abs=1e-6)
    assert s1.input_forces == {} and s1.bypasses == {}
    # forcing it again replaces the value; the answer names the old one
    s2, ans, _ = accepted(s1, req("force", {"tag": "reuse_valve_cmd", "value": 35.5, "minutes": 5}))
    assert (ans.old, ans.new) == (20.0, 35.5) and s2.forces["reuse_valve_cmd"].value == 35.5
    # ending early needs no reason: it returns the output to automatic control
    s3, ans, _ = accepted(s2, req("force", {"tag": "reuse_valve_cmd", "release": True}, reason=""))
    assert (ans.old, ans.new) == (35.5, None) and s3 == EMPTY


def test_a_force_of_a_forceable_input_goes_to_the_input_forces() -> None:
    s, ans, _ = accepted(EMPTY, req("force", {"tag": "leak_reuse", "value": True, "minutes": 10}))
    assert s.forces == {} and s.input_forces["leak_reuse"].value is True
    s, ans, _ = accepted(s, req("force", {"tag": "leak_reuse", "release": True}, reason=""))
    assert s == EMPTY and ans.old is True


@pytest.mark.parametrize("tag", ["leak_reuse", "leak_primary"])
def test_a_leak_input_may_be_forced_wet_but_never_dry(tag: str) -> None:
    """Forcing a leak input to its trip state tests the trip; forcing it dry would hide one."""
    refused(EMPTY, req("force", {"tag": tag, "value": False, "minutes": 10}), tag, "trip state")
    s, _, _ = accepted(EMPTY, req("force", {"tag": tag, "value": True, "minutes": 10}))
    assert s.input_forces[tag].value is True
    # a dry force restored from an older state is ended at start-up, with why
    dry = OperatorState(input_forces={tag: Held(False, WALL, WALL + 60, "a", "r")})
    kept, ended = prune(dry, LIMITS)
    assert kept == EMPTY and "trip state" in ended[0][3]


def test_a_bypass_stands_until_ended_and_needs_no_reason_to_end() -> None:
    s, ans, _ = accepted(EMPTY, req("bypass", {"rule": "IL-06", "minutes": 30}, who="bob"))
    h = s.bypasses["IL-06"]
    assert h.value is None and h.who == "bob" and h.granted_wall == WALL
    assert ans.new == {"until_wall": h.expires_wall}
    s, ans, _ = accepted(s, req("bypass", {"rule": "IL-06", "end": True}, reason=""))
    assert s == EMPTY and ans.old == {"until_wall": h.expires_wall}


@pytest.mark.parametrize(("cmd", "attr"), [("reject", "reject"), ("maintenance", "maintenance")])
def test_reject_and_maintenance_flags_answer_old_and_new(cmd: str, attr: str) -> None:
    s, ans, _ = accepted(EMPTY, req(cmd, {"on": True}))
    assert getattr(s, attr) is True and (ans.old, ans.new) == (False, True)
    s, ans, _ = accepted(s, req(cmd, {"on": False}))
    assert s == EMPTY and (ans.old, ans.new) == (True, False)


def test_a_setpoint_inside_its_bounds_is_kept_as_a_float() -> None:
    hi = IT_HIGH - 5.0
    s, ans, _ = accepted(
        EMPTY, req("setpoint", {"name": "supply_setpoint_c", "value": 30}, role="operator")
    )
    assert s.setpoints == {"supply_setpoint_c": 30.0} and (ans.old, ans.new) == (None, 30.0)
    s, ans, _ = accepted(s, req("setpoint", {"name": "supply_setpoint_c", "value": hi}))
    assert (ans.old, ans.new) == (30.0, hi)
    accepted(s, req("setpoint", {"name": "supply_setpoint_c", "value": 10}))


def test_ack_reset_and_shelve_become_effects_for_the_core() -> None:
    s, ans, eff = accepted(EMPTY, req("ack", {"alarms": ["IL-04", "HUNTING", "IL-04"]}, role=OPER))
    assert s is EMPTY and eff == Effects(ack=("IL-04", "HUNTING"))
    _, _, eff = accepted(EMPTY, req("ack", {"all": True}, role=OPER))
    assert eff == Effects(ack=(), ack_all=True)
    _, ans, eff = accepted(EMPTY, req("reset", {"rules": ["IL-04", "IL-04"]}))
    assert eff == Effects(reset=frozenset({"IL-04"})) and ans.new == ["IL-04"]
    _, _, eff = accepted(EMPTY, req("reset", {"rules": []}))
    assert eff == Effects(reset=frozenset())
    _, _, eff = accepted(EMPTY, req("shelve", {"alarm": "HUNTING", "minutes": 60}))
    assert eff.shelve is not None and eff.shelve[0] == "HUNTING"
    assert eff.shelve[1] == pytest.approx(WALL + 3600.0)
    _, _, eff = accepted(EMPTY, req("shelve", {"alarm": "HUNTING", "end": True}, reason=""))
    assert eff == Effects(unshelve="HUNTING")


# ---- expiry, and the wall clock stepped back or forward ------------------------------------


def forced_for(minutes: float) -> OperatorState:
    s, _, _ = accepted(
        EMPTY, req("force", {"tag": "reuse_valve_cmd", "value": 20.0, "minutes": minutes})
    )
    s, _, _ = accepted(s, req("force", {"tag": "leak_reuse", "value": True, "minutes": minutes}))
    s, _, _ = accepted(s, req("bypass", {"rule": "IL-06", "minutes": minutes}))
    return s


def test_holds_end_when_their_time_is_up_and_not_before() -> None:
    s = forced_for(10)
    same, ended = expire(s, WALL + 599.0)
    assert same is s and ended == []
    gone, ended = expire(s, WALL + 600.0)
    assert gone == EMPTY
    assert ended == [
        ("force", "reuse_valve_cmd", s.forces["reuse_valve_cmd"]),
        ("input_force", "leak_reuse", s.input_forces["leak_reuse"]),
        ("bypass", "IL-06", s.bypasses["IL-06"]),
    ]


def test_a_wall_clock_set_back_never_lengthens_a_hold_beyond_its_grant() -> None:
    h = forced_for(10).forces["reuse_valve_cmd"]
    # after a reboot the clock reads an hour earlier: 10 minutes remain, not 70
    assert remaining_s(h, WALL - 3600.0) == pytest.approx(600.0)
    assert remaining_s(h, WALL + 120.0) == pytest.approx(480.0)


def test_a_wall_clock_set_forward_ends_holds_early() -> None:
    s = forced_for(10)
    assert remaining_s(s.bypasses["IL-06"], WALL + 86400.0) == 0.0
    assert expire(s, WALL + 86400.0)[0] == EMPTY


def test_an_unreadable_wall_clock_ends_every_hold() -> None:
    s = forced_for(10)
    assert remaining_s(s.forces["reuse_valve_cmd"], math.nan) == 0.0
    assert expire(s, math.nan)[0] == EMPTY


# ---- to_commands and forced_image against the supervisor's own checks ----------------------


def step_events(state: OperatorState, now_s: float, now_wall: float) -> tuple[list[str], object]:
    sup = Supervisor(CFG, now_s)
    cmds = Commands(**to_commands(state, now_s, now_wall))  # type: ignore[arg-type]
    img = forced_image(image(now_s), state, now_s, now_wall)
    d = sup.step(img, now_s, cmds)
    return [e.kind for e in d.events], d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wall=st.floats(1e9, 4e9),
    now_s=st.floats(0.0, 1e7),
    frac=st.sampled_from([1.0, 0.5, 0.01]) | st.floats(0.01, 1.0),  # >= 144 s: outlasts later_s
    later_s=st.just(0.0) | st.floats(0.0, 60.0),
)
def test_an_accepted_force_and_bypass_pass_the_supervisors_checks(
    wall: float, now_s: float, frac: float, later_s: float
) -> None:
    """What authority accepts, the supervisor and the interlock engine accept too: the same
    bounds, even at the very maximum and at any fraction of a second."""
    bypass_min = min(RULES[5].max_bypass_s, SITE.interlocks.max_bypass_s) / 60
    assert RULES[5].id == "IL-06"
    s = EMPTY
    for r in (
        req("force", {"tag": "reuse_valve_cmd", "value": 20.0, "minutes": MAX_FORCE_MIN * frac}),
        req("force", {"tag": "drycooler_fan_cmd", "value": 100.0, "minutes": MAX_FORCE_MIN}),
        req("bypass", {"rule": "IL-06", "minutes": bypass_min * frac}),
        req("bypass", {"rule": "IL-07", "minutes": bypass_min}),
    ):
        s, _, _ = accepted(s, r, wall)
    kinds, d = step_events(s, now_s, wall + later_s)
    assert "command_refused" not in kinds and "bypass_refused" not in kinds
    assert d.bypassed == {"IL-06", "IL-07"}  # type: ignore[attr-defined]
    assert d.outputs["drycooler_fan_cmd"].value == 100.0  # type: ignore[attr-defined]


# 2038, a few hours before the wall clock crosses 2**31 s: now + 8 h and now + 4 h round up
# there, so an expiry taken as plain now + duration would lie beyond the supervisor's bound.
ROUNDS_UP = 2147469406.6607988


def test_a_maximal_force_and_bypass_pass_the_supervisors_checks_where_the_sum_rounds_up() -> None:
    max_force, max_bypass = SITE.control.max_force_s, SITE.interlocks.max_bypass_s
    assert (ROUNDS_UP + max_force) - ROUNDS_UP > max_force
    assert (ROUNDS_UP + max_bypass) - ROUNDS_UP > max_bypass
    s = EMPTY
    for r in (
        req("force", {"tag": "drycooler_fan_cmd", "value": 100.0, "minutes": MAX_FORCE_MIN}),
        req("bypass", {"rule": "IL-07", "minutes": max_bypass / 60}),
    ):
        s, _, _ = accepted(s, r, ROUNDS_UP)
    assert s.forces["drycooler_fan_cmd"].expires_wall - ROUNDS_UP <= max_force
    kinds, d = step_events(s, 1e6, ROUNDS_UP)
    assert "command_refused" not in kinds and "bypass_refused" not in kinds
    assert d.bypassed == {"IL-07"}  # type: ignore[attr-defined]


def test_the_supply_setpoint_bounds_are_the_supervisors() -> None:
    """A setpoint authority accepts at its ceiling is used; one just above is refused by both."""
    hi = LIMITS.setpoints["supply_setpoint_c"][1]
    s, _, _ = accepted(EMPTY, req("setpoint", {"name": "supply_setpoint_c", "value": hi}))
    kinds, _ = step_events(s, 0.0, WALL)
    assert "command_refused" not in kinds
    above = math.nextafter(hi, math.inf)
    refused(EMPTY, req("setpoint", {"name": "supply_setpoint_c", "value": above}))
    sup = Supervisor(CFG, 0.0)
    d = sup.step(image(0.0), 0.0, Commands(supply_setpoint_c=above))
    assert [e.kind for e in d.events].count("command_refused") == 1
    assert LIMITS.setpoints["supply_setpoint_c"][0] == 10.0


def test_to_commands_carries_what_remains_on_the_scan_clock() -> None:
    s = forced_for(10)
    s, _, _ = accepted(s, req("maintenance", {"on": True}))
    s, _, _ = accepted(s, req("reject", {"on": True}))
    c = to_commands(s, 500.0, WALL + 60.0)
    manual = c["manual"]
    assert isinstance(manual, Mapping)
    m = manual["reuse_valve_cmd"]
    assert (m.value, m.who) == (20.0, "alice")
    assert m.expires_s == pytest.approx(500.0 + 540.0)
    assert c["bypasses"] == {"IL-06": pytest.approx(500.0 + 540.0)}
    assert c["maintenance"] is True and c["request_reject"] is True
    assert c["supply_setpoint_c"] is None
    assert "leak_reuse" not in manual  # an input force changes the image, not the outputs
    # expired holds ask for nothing even before `expire` removed them
    c = to_commands(s, 500.0, WALL + 600.0)
    assert c["manual"] == {} and c["bypasses"] == {}
    Commands(**c)  # type: ignore[arg-type]  # every key is a Commands field


def test_forced_image_replaces_forced_inputs_with_fresh_forced_samples() -> None:
    s = forced_for(10)
    img = image(100.0)
    out = forced_image(img, s, 100.5, WALL + 1.0)
    assert out["leak_reuse"] == Sample(True, Quality.FORCED, 100.5)
    assert {k: v for k, v in out.items() if k != "leak_reuse"} == {
        k: v for k, v in img.items() if k != "leak_reuse"
    }
    assert forced_image(img, s, 100.5, WALL + 600.0) is img  # expired: the plant's reading
    assert forced_image(img, EMPTY, 100.5, WALL) is img


def test_a_forced_leak_input_trips_the_supervisor_as_a_real_one_would() -> None:
    """Forcing an input is how a commissioning engineer proves an interlock: it must act."""
    s, _, _ = accepted(EMPTY, req("force", {"tag": "leak_reuse", "value": True, "minutes": 5}))
    _, d = step_events(s, 0.0, WALL)
    assert "IL-04" in d.latched  # type: ignore[attr-defined]


# ---- snapshot and restore --------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=20)


@st.composite
def holds(draw: st.DrawFn, value: st.SearchStrategy[object]) -> dict[str, Held]:
    keys = draw(st.lists(texts, max_size=3, unique=True))
    out = {}
    for k in keys:
        g = draw(finite)
        e = draw(st.floats(min_value=g, allow_nan=False, allow_infinity=False))
        out[k] = Held(draw(value), g, e, draw(texts), draw(texts))
    return out


states = st.builds(
    OperatorState,
    forces=holds(st.booleans() | finite),
    input_forces=holds(st.booleans() | finite | st.integers(-(2**53), 2**53)),
    bypasses=holds(st.none()),
    maintenance=st.booleans(),
    reject=st.booleans(),
    setpoints=st.dictionaries(texts, finite, max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(states)
def test_a_snapshot_restores_to_an_equal_state_through_json(s: OperatorState) -> None:
    text = json.dumps(s.snapshot(), allow_nan=False)
    assert OperatorState.restore(json.loads(text)) == s


def test_restore_of_an_older_snapshot_takes_defaults() -> None:
    assert OperatorState.restore({}) == EMPTY
    assert OperatorState.restore({"maintenance": True}) == OperatorState(maintenance=True)


GOOD_HELD = {
    "value": 1.0,
    "granted_wall": WALL,
    "expires_wall": WALL + 60,
    "who": "a",
    "reason": "r",
}


@pytest.mark.parametrize(
    ("d", "part"),
    [
        ([], "operator state: []: expected a JSON object"),
        ({"forcez": {}}, "unexpected field ['forcez']"),
        ({"maintenance": "yes"}, "maintenance: 'yes': expected true or false"),
        ({"reject": 1}, "reject: 1"),
        ({"forces": []}, "forces: []"),
        (
            {"forces": {"t": {**GOOD_HELD, "expires_wall": "soon"}}},
            "forces.'t'.expires_wall: 'soon'",
        ),
        ({"forces": {"t": {**GOOD_HELD, "granted_wall": math.nan}}}, "granted_wall: nan"),
        ({"forces": {"t": {**GOOD_HELD, "expires_wall": WALL - 1}}}, "expected ≥ granted_wall"),
        ({"forces": {"t": {**GOOD_HELD, "value": "on"}}}, "forces.'t'.value: 'on'"),
        ({"forces": {"t": {**GOOD_HELD, "who": None}}}, "who: None"),
        ({"input_forces": {"t": {"value": 1.0}}}, "input_forces.'t'"),
        ({"bypasses": {"IL-06": GOOD_HELD}}, "bypasses.IL-06.value: 1.0: expected null"),
        ({"setpoints": {"supply_setpoint_c": math.inf}}, "setpoints.'supply_setpoint_c': inf"),
        ({"setpoints": {"supply_setpoint_c": True}}, "expected a finite number"),
    ],
)
def test_restore_refuses_a_bad_snapshot_naming_the_field(d: object, part: str) -> None:
    with pytest.raises(ValueError) as e:
        OperatorState.restore(d)
    assert part in str(e.value)
    assert "\n" not in str(e.value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    json_values | st.dictionaries(st.sampled_from(sorted(OperatorState().snapshot())), json_values)
)
def test_restore_of_anything_is_a_state_or_a_value_error(d: object) -> None:
    with contextlib.suppress(ValueError):
        OperatorState.restore(d)


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        Request,
        id=texts,
        principal=texts,
        role=st.sampled_from([VIEW, OPER, ENG]) | texts,
        cmd=st.sampled_from(sorted(DESIGN_13)) | texts,
        args=st.dictionaries(texts, json_values, max_size=4),
        reason=st.text(max_size=40),
        via=st.sampled_from(["cli", "bms", "demo", "commission"]),
    )
)
def test_a_request_round_trips_through_json(r: Request) -> None:
    d = json.loads(json.dumps(r.to_json()))
    back = Request.from_json(d)
    assert back.to_json() == d
    if not _has_nan(r.args):  # NaN != NaN: compare the rest
        assert back == r


def _has_nan(x: object) -> bool:
    if isinstance(x, float):
        return x != x
    if isinstance(x, Mapping):
        return any(_has_nan(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_nan(v) for v in x)
    return False


@pytest.mark.parametrize(
    ("d", "part"),
    [
        ("x", "request: 'x'"),
        ({"id": "1", "principal": "a", "role": "viewer"}, "request.cmd: None"),
        (
            {"id": "1", "principal": "a", "role": "viewer", "cmd": "status", "args": []},
            "request.args: []",
        ),
        (
            {"id": "1", "principal": "a", "role": "viewer", "cmd": "status", "who": "x"},
            "unexpected field",
        ),
    ],
)
def test_request_from_json_refuses_a_malformed_object_naming_the_field(
    d: object, part: str
) -> None:
    with pytest.raises(ValueError) as e:
        Request.from_json(d)
    assert part in str(e.value)


def test_an_answer_is_plain_json() -> None:
    a = Answer("r1", False, "args.on: 'yes': expected true or false", kind="type")
    assert json.loads(json.dumps(a.to_json())) == {
        "id": "r1",
        "accepted": False,
        "why": "args.on: 'yes': expected true or false",
        "old": None,
        "new": None,
        "kind": "type",
    }


# ---- prune: what the site no longer allows after a restart -----------------------------------


def test_prune_ends_holds_the_site_no_longer_allows() -> None:
    s = forced_for(10)
    h = Held(1.0, WALL, WALL + 60, "a", "r")
    s = OperatorState(
        forces={**s.forces, "gone_cmd": h, "heartbeat": h},
        input_forces={**s.input_forces, "it_supply_temp": Held(30.0, WALL, WALL + 60, "a", "r")},
        bypasses={**s.bypasses, "IL-04": Held(None, WALL, WALL + 60, "a", "r")},
        setpoints={"supply_setpoint_c": IT_HIGH},  # within 5 K of IL-01: dropped
    )
    kept, ended = prune(s, LIMITS)
    assert kept == forced_for(10)
    assert sorted((k, key) for k, key, _, _ in ended) == [
        ("bypass", "IL-04"),
        ("force", "gone_cmd"),
        ("force", "heartbeat"),
        ("input_force", "it_supply_temp"),
    ]
    assert prune(kept, LIMITS)[0] is kept


def test_prune_ends_a_hold_granted_longer_than_the_current_maximum() -> None:
    long = Held(20.0, WALL, WALL + SITE.control.max_force_s + 1, "a", "r")
    kept, ended = prune(OperatorState(forces={"reuse_valve_cmd": long}), LIMITS)
    assert kept == EMPTY and "longer than max_force_s" in ended[0][3]


# ---- never raises; a refusal changes nothing; an acceptance stays within bounds --------------

ARG_NAMES = [
    "tag",
    "value",
    "minutes",
    "release",
    "rule",
    "end",
    "alarm",
    "alarms",
    "all",
    "on",
    "name",
    "rules",
]
nice = st.sampled_from(
    [
        "reuse_valve_cmd",
        "leak_reuse",
        "heartbeat",
        "IL-06",
        "IL-04",
        "supply_setpoint_c",
        "HUNTING",
        True,
        False,
        5,
        30.0,
        MAX_FORCE_MIN,
        ["IL-04"],
        [],
    ]
)
START = forced_for(10)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rid=texts | json_values,
    who=st.just("alice") | json_values,
    role=st.sampled_from([VIEW, OPER, ENG]) | json_values,
    cmd=st.sampled_from(sorted(DESIGN_13)) | json_values,
    args=st.dictionaries(st.sampled_from(ARG_NAMES), nice | json_values, max_size=4) | json_values,
    reason=st.just("test") | json_values,
    start=st.sampled_from([EMPTY, START]),
    now_wall=st.just(WALL) | st.floats(allow_nan=True, allow_infinity=True),
)
def test_apply_never_raises_and_a_refusal_changes_nothing(
    rid: object,
    who: object,
    role: object,
    cmd: object,
    args: object,
    reason: object,
    start: OperatorState,
    now_wall: float,
) -> None:
    r = req(cmd, args, role=role, reason=reason, who=who, rid=rid)
    new, ans, eff = apply(start, r, LIMITS, now_wall)
    assert isinstance(ans.id, str) and isinstance(ans.why, str)
    assert not ans.why.startswith("internal error"), ans.why
    json.dumps(ans.to_json(), allow_nan=False)
    if not ans.accepted:
        assert new is start and eff == Effects() and ans.why
        return
    assert permitted(role, cmd)
    # whatever was accepted persists as plain JSON and restores equal
    assert OperatorState.restore(json.loads(json.dumps(new.snapshot(), allow_nan=False))) == new
    for h in (*new.forces.values(), *new.input_forces.values()):
        assert h.expires_wall - h.granted_wall <= SITE.control.max_force_s
    for h in new.bypasses.values():
        assert h.expires_wall - h.granted_wall <= SITE.interlocks.max_bypass_s
    assert prune(new, LIMITS)[1] == []


@pytest.mark.parametrize(
    ("r", "kind"),
    [
        (req("setpoint", {"name": "supply_setpoint_c", "value": 30}, role="viewer"), "denied"),
        (req("reset", {"rules": []}, role="operator"), "denied"),
        (req("setpoint", {"name": "supply_setpoint_c", "value": 9.99}), "range"),
        (req("setpoint", {"name": "secondary_pump_speed_pct", "value": 100.5}), "range"),
        (req("setpoint", {"name": "secondary_pump_speed_pct", "value": "60"}), "type"),
        (req("setpoint", {"name": "supply_setpoint_c", "value": math.nan}), "type"),
        (req("setpoint", {"name": "fan", "value": 30}), "invalid"),
        (req("reject", {"on": "yes"}), "invalid"),
        (req("ack", {"alarms": []}), "invalid"),
    ],
)
def test_a_refusal_says_its_class_so_a_protocol_can_answer_with_its_own_code(
    r: Request, kind: str
) -> None:
    refused(EMPTY, r)
    assert apply(EMPTY, r, LIMITS, WALL)[1].kind == kind
    assert accepted(EMPTY, req("reject", {"on": True}))[1].kind == ""


def test_every_bms_request_is_a_bounded_setpoint_with_a_unit() -> None:
    assert set(BMS_REQUESTS) <= set(LIMITS.setpoints) and set(SETPOINTS) == set(LIMITS.setpoints)
    for name, (_, lo, hi) in BMS_REQUESTS.items():
        assert LIMITS.setpoints[name] == (lo, hi)
        s, _, _ = accepted(EMPTY, req("setpoint", {"name": name, "value": lo}, role="operator"))
        assert s.setpoints == {name: lo}
        # the supervisor gets it as a BMS-level request, by name
        assert to_commands(s, 0.0, WALL)["bms"] == {name: lo}
        refused(EMPTY, req("setpoint", {"name": name, "value": lo - 0.01}), f"[{lo:g}, {hi:g}]")
