"""Alarms per ISA-18.2: the catalogue, every state transition, acknowledgement, shelving,
first-out, chattering, persistence, and a state-machine test against a small reference model."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from controller.alarms import (
    CHATTER_MAX,
    CHATTER_WINDOW_S,
    INTERLOCK,
    UNLISTED,
    AlarmDef,
    AlarmState,
    AlarmTable,
    Priority,
    catalogue,
    catalogue_markdown,
)
from interlocks.rules import RULES
from plc_io.site import demo_site

SITE = demo_site()
DEFS = catalogue(RULES, SITE.inputs, SITE.outputs)
N, U, A, R = AlarmState.NORMAL, AlarmState.UNACK, AlarmState.ACKED, AlarmState.RTN_UNACK


def kinds(events) -> list[tuple[str, str]]:
    return [(e.kind, e.source) for e in events]


def table(present: dict[str, str]) -> AlarmTable:
    """A table with these conditions raised at t=100."""
    t, _ = AlarmTable.new(DEFS).update(present, 100.0)
    return t


def roundtrip(t: AlarmTable) -> AlarmTable:
    return AlarmTable.restore(DEFS, json.loads(json.dumps(t.snapshot(), allow_nan=False)))


# ---- the catalogue ----


def test_catalogue_covers_every_rule_input_output_and_condition() -> None:
    ids = set(DEFS)
    assert {r.id for r in RULES} <= ids
    assert {f"INPUT:{t.name}" for t in SITE.inputs} <= ids
    assert {
        f"FORCE:{t.name}" for t in (*SITE.inputs, *SITE.outputs) if t.name != "heartbeat"
    } <= ids
    assert "FORCE:heartbeat" not in ids
    assert {f"BYPASS:{r.id}" for r in RULES if r.bypassable} == {
        i for i in ids if i.startswith("BYPASS:")
    }
    assert {i for i in ids if i.startswith("PUMP:")} == {
        "PUMP:primary_pump_a_running",
        "PUMP:primary_pump_b_running",
        "PUMP:secondary_pump_running",
    }
    fixed = "PLC-LINK WRITE-FAILED VALVE-FAULT PRIMARY-PUMPS DRYCOOLER-FAULT CMD-BLOCKED HUNTING"
    assert set(fixed.split()) | {"JOURNAL", "DEGRADED", "MAINTENANCE"} <= ids
    # the rule table first, in its order: first-out depends on it
    assert list(DEFS)[: len(RULES)] == [r.id for r in RULES]
    assert all(DEFS[r.id].group == INTERLOCK for r in RULES)
    assert all(d.id == k and d.message for k, d in DEFS.items())


def test_catalogue_priorities() -> None:
    p = {k: d.priority for k, d in DEFS.items()}
    for i in ("IL-01", "IL-02", "IL-04", "IL-05"):
        assert p[i] is Priority.CRITICAL
    for i in ("IL-03", "IL-06", "IL-07", "IL-08", "IL-09", "PLC-LINK", "WRITE-FAILED"):
        assert p[i] is Priority.HIGH
    for i in ("PRIMARY-PUMPS", "DEGRADED", "JOURNAL", "INPUT:it_supply_temp"):
        assert p[i] is Priority.HIGH
    assert p["INPUT:leak_reuse"] is p["INPUT:leak_primary"] is Priority.HIGH
    assert p["INPUT:tank_top_temp"] is Priority.MEDIUM
    for i in ("VALVE-FAULT", "PUMP:secondary_pump_running", "DRYCOOLER-FAULT", "CMD-BLOCKED"):
        assert p[i] is Priority.MEDIUM
    for i in ("HUNTING", "BYPASS:IL-06", "FORCE:reuse_valve_cmd", "FORCE:leak_reuse"):
        assert p[i] is Priority.LOW
    assert p["MAINTENANCE"] is Priority.LOW


def test_catalogue_messages_come_from_the_rule_table() -> None:
    il04 = next(r for r in RULES if r.id == "IL-04")
    msg = DEFS["IL-04"].message
    assert il04.hazard in msg and il04.effect_text in msg and "Latched" in msg
    assert "Latched" not in DEFS["IL-06"].message


def test_catalogue_refuses_an_id_twice() -> None:
    with pytest.raises(ValueError, match="'IL-04' appears twice"):
        catalogue((*RULES, RULES[3]), ())


def test_catalogue_markdown_lists_every_alarm() -> None:
    md = catalogue_markdown(DEFS)
    assert md.startswith("| id | priority | message | group |")
    assert all(f"| `{i}` |" in md for i in DEFS)
    assert len(md.strip().splitlines()) == len(DEFS) + 2


# ---- the state machine, transition by transition ----


def test_normal_to_unacknowledged_raises_with_priority_message_and_detail() -> None:
    t, ev = AlarmTable.new(DEFS).update({"IL-06": "tank 96 °C"}, 100.0)
    a = t.alarms["IL-06"]
    assert (a.state, a.detail, a.active_since_wall, a.changed_wall) == (U, "tank 96 °C", 100, 100)
    assert kinds(ev) == [("alarm_raised", "IL-06")]
    assert ev[0].at_s == 100.0
    assert ev[0].detail["priority"] == "high"
    assert ev[0].detail["message"] == DEFS["IL-06"].message
    assert ev[0].detail["detail"] == "tank 96 °C"


def test_unacknowledged_to_acknowledged_to_normal() -> None:
    t = table({"IL-06": "hot"})
    t, acked, unknown, ev = t.acknowledge(["IL-06"], "alice", 110.0)
    assert (acked, unknown, kinds(ev)) == (["IL-06"], [], [("alarm_acknowledged", "IL-06")])
    assert ev[0].detail == {"who": "alice", "state": "acknowledged"}
    a = t.alarms["IL-06"]
    assert (a.state, a.acked_by, a.acked_wall) == (A, "alice", 110.0)
    t, ev = t.update({}, 120.0)
    assert t.alarms["IL-06"].state is N and kinds(ev) == [("alarm_cleared", "IL-06")]
    assert t.standing() == []


def test_unacknowledged_returns_then_acknowledged_to_normal() -> None:
    t, ev = table({"IL-06": "hot"}).update({}, 110.0)
    assert t.alarms["IL-06"].state is R and kinds(ev) == [("alarm_returned", "IL-06")]
    assert [a.id for a in t.standing()] == ["IL-06"]  # returned, still to acknowledge
    t, acked, _, ev = t.acknowledge(["IL-06"], "bob", 120.0)
    assert acked == ["IL-06"] and ev[0].detail["state"] == "normal"
    assert t.alarms["IL-06"].state is N


def test_returned_unacknowledged_activates_again() -> None:
    t, _ = table({"IL-06": "hot"}).update({}, 110.0)
    t, ev = t.update({"IL-06": "hot again"}, 130.0)
    a = t.alarms["IL-06"]
    assert (a.state, a.detail, a.active_since_wall) == (U, "hot again", 130.0)
    assert kinds(ev) == [("alarm_raised", "IL-06")]


def test_a_detail_change_while_active_is_kept_without_an_event() -> None:
    t = table({"INPUT:tank_top_temp": "stale 3 s"})
    t2, ev = t.update({"INPUT:tank_top_temp": "stale 9 s"}, 101.0)
    assert ev == [] and t2.alarms["INPUT:tank_top_temp"].detail == "stale 9 s"
    assert t2.alarms["INPUT:tank_top_temp"].active_since_wall == 100.0


def test_a_steady_plant_returns_the_same_table() -> None:
    t = table({"IL-04": "wet", "MAINTENANCE": "on"})
    for now in (101.0, 5000.0, 10**6):
        t2, ev = t.update({"IL-04": "wet", "MAINTENANCE": "on"}, now)
        assert t2 is t and ev == []
    empty = AlarmTable.new(DEFS)
    assert empty.update({}, 1.0)[0] is empty


# ---- acknowledgement of each state ----


def test_acknowledging_normal_or_acknowledged_changes_nothing() -> None:
    t = table({"IL-06": "hot"})
    t, *_ = t.acknowledge(["IL-06"], "alice", 110.0)
    for aid in ("IL-06", "IL-07"):  # acknowledged, normal
        t2, acked, unknown, ev = t.acknowledge([aid], "bob", 111.0)
        assert t2 is t and acked == [] and unknown == [] and ev == []
    assert t.alarms["IL-06"].acked_by == "alice"


def test_acknowledging_an_unknown_id_names_it() -> None:
    t = table({"IL-06": "hot"})
    _, acked, unknown, ev = t.acknowledge(["IL-66", "IL-06"], "alice", 110.0)
    assert acked == ["IL-06"] and unknown == ["IL-66"] and len(ev) == 1


def test_one_id_given_as_a_string_is_one_id() -> None:
    _, acked, unknown, _ = table({"IL-06": "hot"}).acknowledge("IL-06", "alice", 110.0)
    assert acked == ["IL-06"] and unknown == []


def test_acknowledge_all_takes_every_unacknowledged_alarm_it_shows() -> None:
    t = table({"IL-06": "hot", "HUNTING": "x", "PLC-LINK": "down"})
    t, _ = t.update({"IL-06": "hot", "PLC-LINK": "down"}, 110.0)  # HUNTING returned
    t, *_ = t.shelve("PLC-LINK", 500.0, "eve", "link work", 110.0)
    t, acked, unknown, _ = t.acknowledge(None, "alice", 120.0)
    assert sorted(acked) == ["HUNTING", "IL-06"] and unknown == []
    states = {i: t.alarms[i].state for i in ("IL-06", "HUNTING", "PLC-LINK")}
    assert states == {"IL-06": A, "HUNTING": N, "PLC-LINK": U}  # the shelved one was not seen


# ---- shelving ----


def test_a_shelved_alarm_keeps_its_states_silently_and_is_listed() -> None:
    t, why, ev = AlarmTable.new(DEFS).shelve("HUNTING", 400.0, "eve", "tuning", 100.0)
    assert why == "" and kinds(ev) == [("alarm_shelved", "HUNTING")]
    assert ev[0].detail["until_wall"] == 400.0 and ev[0].detail["reason"] == "tuning"
    t, ev = t.update({"HUNTING": "12 changes"}, 110.0)
    assert ev == [] and t.alarms["HUNTING"].state is U
    assert [a.id for a in t.shelved()] == ["HUNTING"]
    t, ev = t.update({}, 120.0)
    assert ev == [] and t.alarms["HUNTING"].state is R
    t, ev = t.update({"HUNTING": "13 changes"}, 130.0)
    assert ev == [] and t.alarms["HUNTING"].state is U


def test_shelving_expires_and_annunciates_a_standing_unacknowledged_alarm_once() -> None:
    t, *_ = AlarmTable.new(DEFS).shelve("HUNTING", 400.0, "eve", "tuning", 100.0)
    t, _ = t.update({"HUNTING": "x"}, 110.0)
    t2, ev = t.update({"HUNTING": "x"}, 399.9)
    assert t2 is t and ev == []
    t, ev = t.update({"HUNTING": "x"}, 400.0)
    assert kinds(ev) == [("alarm_unshelved", "HUNTING"), ("alarm_raised", "HUNTING")]
    assert ev[0].detail["why"] == "expired"
    assert t.alarms["HUNTING"].shelved_until is None and t.shelved() == []
    t2, ev = t.update({"HUNTING": "x"}, 401.0)
    assert t2 is t and ev == []


def test_shelving_expires_quietly_when_nothing_stands_unacknowledged() -> None:
    t, *_ = AlarmTable.new(DEFS).shelve("HUNTING", 400.0, "eve", "tuning", 100.0)
    t, _ = t.update({"HUNTING": "x"}, 110.0)
    t, _ = t.update({}, 120.0)  # returned while shelved: listed, not annunciated
    t, ev = t.update({}, 500.0)
    assert kinds(ev) == [("alarm_unshelved", "HUNTING")]
    assert t.alarms["HUNTING"].state is R


def test_unshelving_by_request_annunciates_a_standing_alarm() -> None:
    t, *_ = AlarmTable.new(DEFS).shelve("HUNTING", 400.0, "eve", "tuning", 100.0)
    t, _ = t.update({"HUNTING": "x"}, 110.0)
    t, why, ev = t.unshelve("HUNTING", "eve", 120.0)
    assert why == "" and kinds(ev) == [("alarm_unshelved", "HUNTING"), ("alarm_raised", "HUNTING")]
    assert ev[0].detail == {"why": "by request", "who": "eve"}
    t, why, ev = t.unshelve("HUNTING", "eve", 121.0)
    assert why == "alarm HUNTING is not shelved" and ev == []


def test_shelving_refuses_unknown_alarms_and_bad_times() -> None:
    t = AlarmTable.new(DEFS)
    for args, words in [
        (("IL-66", 200.0), "unknown alarm id 'IL-66'"),
        ((None, 200.0), "unknown alarm id"),
        (("HUNTING", math.nan), "until_wall nan is not a time"),
        (("HUNTING", math.inf), "until_wall inf is not a time"),
        (("HUNTING", True), "until_wall True is not a time"),
        (("HUNTING", 10**400), "is not a time"),
        (("HUNTING", "200"), "until_wall '200' is not a time"),
        (("HUNTING", 100.0), "not after now"),
        (("HUNTING", 50.0), "not after now"),
    ]:
        t2, why, ev = t.shelve(args[0], args[1], "eve", "r", 100.0)  # type: ignore[arg-type]
        assert t2 is t and ev == [] and words in why
    t2, why, _ = t.shelve("HUNTING", 200.0, "eve", "r", math.nan)
    assert t2 is t and "now_wall nan is not a time" in why
    t2, why, _ = t.unshelve("IL-66", "eve", 100.0)
    assert t2 is t and "unknown alarm id 'IL-66'" in why


def test_a_clock_set_back_ends_a_shelving_rather_than_prolonging_it() -> None:
    t, *_ = AlarmTable.new(DEFS).shelve("HUNTING", 400.0, "eve", "tuning", 100.0)
    t, _ = t.update({"HUNTING": "x"}, 110.0)
    t, ev = t.update({"HUNTING": "x"}, 50.0)  # before the shelving was granted
    assert kinds(ev) == [("alarm_unshelved", "HUNTING"), ("alarm_raised", "HUNTING")]
    assert ev[0].detail["why"] == "clock set back before the shelving"


# ---- first-out ----


def test_first_out_of_two_trips_in_one_scan_is_the_first_in_rule_order() -> None:
    # the conditions arrive in the opposite order: the rule table decides, not the dict
    t, ev = AlarmTable.new(DEFS).update({"IL-05": "wet", "IL-04": "wet"}, 100.0)
    assert t.alarms["IL-04"].first_out and not t.alarms["IL-05"].first_out
    assert kinds(ev) == [("alarm_raised", "IL-04"), ("alarm_raised", "IL-05")]
    assert ev[0].detail["first_out"] is True and ev[1].detail["first_out"] is False


def test_first_out_of_two_trips_in_two_scans_is_the_earlier() -> None:
    t, _ = AlarmTable.new(DEFS).update({"PLC-LINK": "x", "IL-06": "hot"}, 100.0)
    t, _ = t.update({"PLC-LINK": "x", "IL-06": "hot", "IL-04": "wet"}, 100.25)
    assert t.alarms["IL-06"].first_out and not t.alarms["IL-04"].first_out
    assert not t.alarms["PLC-LINK"].first_out  # only interlocks take part
    # returned but unacknowledged keeps the mark; NORMAL clears it
    t, _ = t.update({"IL-04": "wet"}, 101.0)
    assert t.alarms["IL-06"].state is R and t.alarms["IL-06"].first_out
    t, *_ = t.acknowledge(["IL-06"], "alice", 102.0)
    assert t.alarms["IL-06"].state is N and not t.alarms["IL-06"].first_out


def test_a_new_trip_sequence_has_its_own_first_out() -> None:
    t, _ = AlarmTable.new(DEFS).update({"IL-06": "hot"}, 100.0)
    t, _ = t.update({}, 110.0)  # IL-06 returned, unacknowledged, still marked
    t, _ = t.update({"IL-07": "scald"}, 120.0)
    assert t.alarms["IL-07"].first_out and not t.alarms["IL-06"].first_out


def test_an_active_acknowledged_interlock_holds_off_a_new_first_out() -> None:
    t, _ = AlarmTable.new(DEFS).update({"IL-06": "hot"}, 100.0)
    t, *_ = t.acknowledge(None, "alice", 101.0)
    t, _ = t.update({"IL-06": "hot", "IL-03": "flow"}, 102.0)
    assert t.alarms["IL-06"].first_out and not t.alarms["IL-03"].first_out


# ---- chattering ----


def flap(t: AlarmTable, aid: str, times: list[float]) -> tuple[AlarmTable, list]:
    events = []
    for at in times:
        t, ev = t.update({aid: "on"}, at)
        events += ev
        t, ev = t.update({}, at + 1.0)
        events += ev
    return t, events


def test_four_activations_in_a_minute_make_one_chattering_event_then_a_count() -> None:
    assert CHATTER_MAX == 3 and CHATTER_WINDOW_S == 60.0
    t, ev = flap(AlarmTable.new(DEFS), "IL-06", [0.0, 10.0, 20.0])
    assert [k for k, _ in kinds(ev)] == ["alarm_raised", "alarm_returned"] * 3
    t, ev = flap(t, "IL-06", [30.0])  # the fourth within 60 s
    assert kinds(ev) == [("alarm_chattering", "IL-06")]
    assert ev[0].detail["chatter_count"] == 1 and ev[0].detail["activations"] == 4
    t, ev = flap(t, "IL-06", [40.0, 95.0])  # 95: 54 s after the last one, still in a window
    assert ev == [] and t.alarms["IL-06"].chatter_count == 3
    assert t.alarms["IL-06"].chattering and t.alarms["IL-06"].state is R
    # a whole quiet window: the next activation is annunciated with the count, which resets
    t, ev = t.update({"IL-06": "on"}, 95.0 + CHATTER_WINDOW_S)
    assert kinds(ev) == [("alarm_raised", "IL-06")] and ev[0].detail["chatter_count"] == 3
    a = t.alarms["IL-06"]
    assert (a.chattering, a.chatter_count, a.state) == (False, 0, U)


def test_activations_spread_wider_than_the_window_never_chatter() -> None:
    t, ev = flap(AlarmTable.new(DEFS), "IL-06", [0.0, 30.0, 60.0, 90.0, 120.0])
    assert [k for k, _ in kinds(ev)].count("alarm_raised") == 5
    assert not t.alarms["IL-06"].chattering


def test_a_clock_set_back_never_prolongs_chatter_suppression() -> None:
    t, _ = flap(AlarmTable.new(DEFS), "IL-06", [1000.0, 1010.0, 1020.0, 1030.0])
    assert t.alarms["IL-06"].chattering
    t, ev = t.update({"IL-06": "on"}, 100.0)  # the wall clock stepped back 15 minutes
    assert kinds(ev) == [("alarm_raised", "IL-06")] and ev[0].detail["chatter_count"] == 1


# ---- conditions the catalogue does not know; odd input ----


def test_an_unknown_condition_is_raised_with_a_generic_definition_never_dropped() -> None:
    t, ev = AlarmTable.new(DEFS).update({"PROOF-TEST-OVERDUE": "IL-04 due"}, 100.0)
    assert kinds(ev) == [
        ("alarm_unknown_id", "PROOF-TEST-OVERDUE"),
        ("alarm_raised", "PROOF-TEST-OVERDUE"),
    ]
    d = t.defs["PROOF-TEST-OVERDUE"]
    assert (d.priority, d.group) == (Priority.MEDIUM, UNLISTED)
    assert t.alarms["PROOF-TEST-OVERDUE"].state is U
    t2 = roundtrip(t)
    assert t2 == t and t2.defs["PROOF-TEST-OVERDUE"] == d
    t3, _ = t.update({}, 101.0)
    assert roundtrip(t3) == t3  # returned, then after a restart still there to acknowledge


def test_a_time_that_is_not_finite_stands_for_the_latest_known() -> None:
    t = table({"IL-06": "hot"})
    for bad in (math.nan, math.inf, None, "soon", 10**400):
        t2, ev = t.update({}, bad)  # type: ignore[arg-type]
        assert t2.alarms["IL-06"].changed_wall == 100.0 and ev[0].at_s == 100.0
        assert roundtrip(t2) == t2


def test_details_are_bounded_and_made_text() -> None:
    t, _ = AlarmTable.new(DEFS).update({"IL-06": "x" * 10_000, "IL-07": 42}, 1.0)  # type: ignore[dict-item]
    assert len(t.alarms["IL-06"].detail) == 500 and t.alarms["IL-07"].detail == "42"


def test_standing_lists_highest_priority_first_then_oldest() -> None:
    t, _ = AlarmTable.new(DEFS).update({"HUNTING": "x", "IL-06": "x"}, 100.0)
    t, _ = t.update({"HUNTING": "x", "IL-06": "x", "IL-03": "x", "IL-04": "x"}, 110.0)
    assert [a.id for a in t.standing()] == ["IL-04", "IL-06", "IL-03", "HUNTING"]
    s = t.standing()[0].status()
    assert set(s) == {
        "id",
        "priority",
        "state",
        "message",
        "detail",
        "since_wall",
        "first_out",
        "shelved_until",
        "chatter_count",
    }
    assert s["priority"] == "critical" and s["state"] == "unacknowledged"
    json.dumps(s, allow_nan=False)


# ---- persistence ----


def test_restore_refuses_a_broken_snapshot_naming_the_field() -> None:
    good = table({"IL-06": "hot"}).snapshot()
    rec = good["alarms"]["IL-06"]
    cases = [
        ([], "alarms: list is not a table"),
        ({**good, "version": 2}, "alarms.version: 2"),
        ({**good, "wall": math.nan}, "alarms.wall: nan"),
        ({**good, "extra": 1}, "unknown field 'extra'"),
        ({**good, "alarms": []}, "alarms.alarms: []"),
        ({**good, "unlisted": "X"}, "alarms.unlisted"),
        ({**good, "alarms": {"IL-06": {**rec, "state": "gone"}}}, "alarms.alarms.IL-06.state"),
        ({**good, "alarms": {"IL-06": {**rec, "changed_wall": "x"}}}, "IL-06.changed_wall"),
        ({**good, "alarms": {"IL-06": {**rec, "first_out": 1}}}, "IL-06.first_out"),
        ({**good, "alarms": {"IL-06": {**rec, "chatter_count": -1}}}, "IL-06.chatter_count"),
        ({**good, "alarms": {"IL-06": {**rec, "recent": [1, 2, 3, 4]}}}, "IL-06.recent"),
        ({**good, "alarms": {"IL-06": {**rec, "detail": 5}}}, "IL-06.detail"),
        ({**good, "alarms": {"IL-06": {**rec, "shelved_until": 5.0}}}, "IL-06.shelved_until"),
        ({**good, "alarms": {"IL-06": {**rec, "colour": "red"}}}, "unknown field 'colour'"),
        ({**good, "alarms": {"IL-06": {"state": "normal"}}}, "IL-06.detail: missing"),
    ]
    for snap, words in cases:
        with pytest.raises(ValueError, match=None) as e:
            AlarmTable.restore(DEFS, snap)
        assert words in str(e.value), (words, str(e.value))
        assert "\n" not in str(e.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(
        [
            "state",
            "detail",
            "changed_wall",
            "recent",
            "chatter_count",
            "first_out",
            "shelved_until",
            "acked_by",
        ]
    ),
    value=JSON,
)
def test_restore_of_any_broken_record_is_a_value_error_or_a_valid_table(field, value) -> None:
    snap = table({"IL-06": "hot"}).snapshot()
    snap["alarms"]["IL-06"][field] = value
    try:
        t = AlarmTable.restore(DEFS, snap)
    except ValueError as e:
        assert f"IL-06.{field}" in str(e) and "\n" not in str(e)
    else:
        assert roundtrip(t) == t


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_restore_of_any_json_is_a_value_error_or_a_table(value) -> None:
    with contextlib.suppress(ValueError):
        AlarmTable.restore(DEFS, value)


def test_restore_takes_the_current_catalogues_text() -> None:
    snap = table({"IL-06": "hot"}).snapshot()
    defs = dict(DEFS)
    defs["IL-06"] = AlarmDef("IL-06", Priority.CRITICAL, "new words", INTERLOCK)
    a = AlarmTable.restore(defs, snap).alarms["IL-06"]
    assert (a.state, a.priority, a.message) == (U, Priority.CRITICAL, "new words")


IDS = ["IL-01", "IL-04", "IL-06", "PLC-LINK", "HUNTING", "ODD-1"]


@st.composite
def histories(draw: st.DrawFn) -> AlarmTable:
    """A table after a random history of scans, acknowledgements and shelvings."""
    t = AlarmTable.new(DEFS)
    now = 0.0
    for _ in range(draw(st.integers(0, 25))):
        now += draw(st.sampled_from([0.0, 0.25, 7.0, 30.0, 61.0, 500.0]))
        op = draw(st.sampled_from(["update", "update", "ack", "shelve", "unshelve"]))
        if op == "update":
            ids = draw(st.sets(st.sampled_from(IDS)))
            t, _ = t.update({i: draw(st.sampled_from(["a", "b"])) for i in ids}, now)
        elif op == "ack":
            t, *_ = t.acknowledge(draw(st.none() | st.lists(st.sampled_from(IDS))), "al", now)
        elif op == "shelve":
            until = now + draw(st.sampled_from([1.0, 60.0, 3600.0]))
            t, *_ = t.shelve(draw(st.sampled_from(IDS)), until, "eve", "why", now)
        else:
            t, *_ = t.unshelve(draw(st.sampled_from(IDS)), "eve", now)
    return t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_snapshot_round_trip_is_exact(t: AlarmTable) -> None:
    snap = t.snapshot()
    text = json.dumps(snap, allow_nan=False)
    back = AlarmTable.restore(DEFS, json.loads(text))
    assert back == t
    assert back.snapshot() == snap
    assert back.standing() == t.standing() and back.shelved() == t.shelved()


# ---- the state machine against a reference model ----


class Model:
    """ISA-18.2 as docs/operation.md states it, plainly: one dict per alarm, a full history."""

    def __init__(self) -> None:
        self.order = list(DEFS)
        self.s: dict[str, dict] = {}
        self.present: dict[str, str] = {}

    def get(self, aid: str) -> dict:
        if aid not in self.s:
            self.s[aid] = {
                "state": "N",
                "first": False,
                "shelf": None,  # (granted, until)
                "chat": False,
                "count": 0,
                "hist": [],
                "detail": "",
            }
        return self.s[aid]

    def update(self, present: dict[str, str], now: float) -> list[tuple[str, str]]:
        ev: list[tuple[str, str]] = []
        for aid in present:
            if aid not in DEFS and aid not in self.order:
                self.order.append(aid)
                ev.append(("alarm_unknown_id", aid))
        rank = {a: i for i, a in enumerate(self.order)}
        interlocks = {r.id for r in RULES}
        before = {a for a, m in self.s.items() if m["state"] in "UA"}
        rising = sorted((a for a in present if a not in before), key=rank.__getitem__)
        first = None
        if not before & interlocks:
            first = next((a for a in rising if a in interlocks), None)
        if first:
            for m in self.s.values():
                m["first"] = False
        for aid in rising:
            m = self.get(aid)
            m.update(state="U", first=aid == first, detail=present[aid])
            if m["chat"] and not (0 <= now - m["hist"][-1] < CHATTER_WINDOW_S):
                reported, m["chat"], m["count"], m["hist"] = m["count"], False, 0, []
            else:
                reported = 0
            in_window = sum(1 for h in m["hist"] if 0 <= now - h < CHATTER_WINDOW_S)
            m["hist"].append(now)
            start = not m["chat"] and in_window + 1 > CHATTER_MAX
            if m["chat"] or start:
                m["chat"], m["count"] = True, m["count"] + 1
            if m["shelf"] is None:
                if start:
                    ev.append(("alarm_chattering", aid))
                elif not m["chat"]:
                    ev.append(("alarm_raised", aid) if not reported else ("raised+count", aid))
        for aid in sorted(before, key=rank.__getitem__):
            m = self.s[aid]
            if aid in present:
                m["detail"] = present[aid]
            elif m["state"] == "U":
                m["state"] = "R"
                if m["shelf"] is None and not m["chat"]:
                    ev.append(("alarm_returned", aid))
            else:
                m.update(state="N", first=False, detail="")
                ev.append(("alarm_cleared", aid))
        for aid in sorted(self.s, key=rank.__getitem__):
            m = self.s[aid]
            if m["shelf"] is not None and not (m["shelf"][0] <= now < m["shelf"][1]):
                m["shelf"] = None
                ev.append(("alarm_unshelved", aid))
                if m["state"] == "U":
                    ev.append(("alarm_raised", aid))
        self.present = dict(present)
        return ev

    def ack(self, ids: list[str] | None) -> tuple[list[str], list[str]]:
        known = set(DEFS) | set(self.order)
        if ids is None:
            ids = [
                a
                for a in self.order
                if a in self.s and self.s[a]["state"] in "UR" and self.s[a]["shelf"] is None
            ]
        ids = list(dict.fromkeys(ids))
        acked = []
        for aid in ids:
            if aid not in known:
                continue
            m = self.get(aid)
            if m["state"] == "U":
                m["state"] = "A"
            elif m["state"] == "R":
                m.update(state="N", first=False, detail="")
            else:
                continue
            acked.append(aid)
        return acked, [a for a in ids if a not in known]


def model_kinds(events) -> list[tuple[str, str]]:
    out = []
    for e in events:
        if e.kind == "alarm_raised" and e.detail.get("chatter_count"):
            out.append(("raised+count", e.source))
        else:
            out.append((e.kind, e.source))
    return out


class AlarmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = AlarmTable.new(DEFS)
        self.m = Model()
        self.now = 1000.0

    @rule(
        ids=st.sets(st.sampled_from(IDS)),
        detail=st.sampled_from(["a", "b"]),
        dt=st.sampled_from([0.0, 0.25, 5.0, 19.0, 59.75, 60.0, 61.0, 400.0]),
    )
    def scan(self, ids: set[str], detail: str, dt: float) -> None:
        self.now += dt
        present = {i: detail for i in ids}
        self.t, ev = self.t.update(present, self.now)
        assert model_kinds(ev) == self.m.update(present, self.now)
        assert all(e.at_s == self.now for e in ev)

    @rule(ids=st.none() | st.lists(st.sampled_from([*IDS, "NOPE"]), max_size=3))
    def acknowledge(self, ids: list[str] | None) -> None:
        self.t, acked, unknown, ev = self.t.acknowledge(ids, "alice", self.now)
        assert (acked, unknown) == self.m.ack(ids)
        assert kinds(ev) == [("alarm_acknowledged", a) for a in acked]

    @rule(aid=st.sampled_from([*IDS, "NOPE"]), span=st.sampled_from([-5.0, 0.0, 30.0, 900.0]))
    def shelve(self, aid: str, span: float) -> None:
        self.t, why, ev = self.t.shelve(aid, self.now + span, "eve", "work", self.now)
        ok = aid in self.t.defs and span > 0
        assert (why == "") == ok and len(ev) == ok
        if ok:
            self.m.get(aid)["shelf"] = (self.now, self.now + span)

    @rule(aid=st.sampled_from(IDS))
    def unshelve(self, aid: str) -> None:
        self.t, why, ev = self.t.unshelve(aid, "eve", self.now)
        m = self.m.s.get(aid)
        if m is None or m["shelf"] is None:
            assert why and ev == []
            return
        m["shelf"] = None
        want = [("alarm_unshelved", aid)] + ([("alarm_raised", aid)] if m["state"] == "U" else [])
        assert kinds(ev) == want

    @rule()
    def restart(self) -> None:
        back = roundtrip(self.t)
        assert back == self.t
        self.t = back

    @rule()
    def steady(self) -> None:
        t2, ev = self.t.update(dict(self.m.present), self.now)
        assert t2 is self.t and ev == []

    @invariant()
    def agrees_with_the_model(self) -> None:
        code = {"N": N, "U": U, "A": A, "R": R}
        for aid in {*DEFS, *self.m.order}:
            a = self.t.alarms[aid]
            m = self.m.s.get(aid)
            if m is None:
                assert a.state is N and not a.first_out and not a.shelved, aid
                continue
            assert a.state is code[m["state"]], aid
            assert a.first_out == m["first"], aid
            assert (a.shelved_until, a.shelved_wall) == (
                (m["shelf"][1], m["shelf"][0]) if m["shelf"] else (None, None)
            ), aid
            assert (a.chattering, a.chatter_count) == (m["chat"], m["count"]), aid
            assert a.detail == (m["detail"] if m["state"] in "UAR" else ""), aid
        assert sum(a.first_out for a in self.t.alarms.values()) <= 1
        # what a scan carries over for the fast path equals what the alarms say
        fresh = AlarmTable(self.t.defs, self.t.alarms, self.t.wall)
        assert fresh._active == self.t._active and fresh._shelved == self.t._shelved
        assert (fresh._quiet_from, fresh._quiet_until) == (
            self.t._quiet_from,
            self.t._quiet_until,
        )


AlarmMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestAlarmStateMachine = AlarmMachine.TestCase
