"""The mode table: every move and its guard, asserting the whole machine state after each step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.modes import TRANSITIONS, Conditions, Mode, ModeMachine, Timing, mermaid_diagram

T = Timing(
    min_dwell_s=60, reject_dwell_s=600, customer_ready_dwell_s=300, reuse_reentry_min_s=900,
    hunting_changes_per_h=6,
)  # fmt: skip
OK = Conditions(
    inputs_valid=True, leak_latched=False, leaks_dry=True, reset=False, maintenance=False,
    reject=False,
    customer_ready=True, tank_full=False,
)  # fmt: skip


def c(**kw: bool) -> Conditions:
    return replace(OK, **kw)


def in_reuse(now: float = 0.0) -> ModeMachine:
    m = ModeMachine(T, Mode.STARTUP, now)
    m.advance(OK, now)
    m.advance(OK, now + 600)
    assert m.mode is Mode.NORMAL_REUSE
    return m


def test_no_auto_transitions_bypass_the_guards() -> None:
    m = ModeMachine(T)
    assert not hasattr(m, "to_NORMAL_REUSE")


def test_startup_waits_for_valid_inputs_then_rejects() -> None:
    m = ModeMachine(T, Mode.STARTUP, 0)
    assert m.advance(c(inputs_valid=False), 1) is None and m.mode is Mode.STARTUP
    assert m.advance(OK, 2) == (Mode.STARTUP, Mode.DRY_COOLER_REJECT)
    assert m.since_s == 2


def test_reject_dwell_before_reuse() -> None:
    m = ModeMachine(T, Mode.STARTUP, 0)
    m.advance(OK, 0)
    assert m.advance(OK, 599) is None and m.mode is Mode.DRY_COOLER_REJECT
    assert m.advance(OK, 600) == (Mode.DRY_COOLER_REJECT, Mode.NORMAL_REUSE)


def test_reject_cause_restarts_the_dwell() -> None:
    m = ModeMachine(T, Mode.STARTUP, 0)
    m.advance(OK, 0)
    m.advance(c(reject=True), 500)
    assert m.advance(OK, 700) is None  # the cause cleared here: the dwell counts from 700
    assert m.advance(OK, 1299) is None
    assert m.advance(OK, 1300) == (Mode.DRY_COOLER_REJECT, Mode.NORMAL_REUSE)


def test_reject_is_immediate_and_reentry_waits_the_anti_hunting_interval() -> None:
    m = in_reuse()
    assert m.advance(c(reject=True), 601) == (Mode.NORMAL_REUSE, Mode.DRY_COOLER_REJECT)
    # cause gone at 602: reject dwell passes at 1202, but re-entry waits until 601 + 900
    assert m.advance(OK, 602) is None
    assert m.advance(OK, 1300) is None and m.mode is Mode.DRY_COOLER_REJECT
    assert m.advance(OK, 1501) == (Mode.DRY_COOLER_REJECT, Mode.NORMAL_REUSE)


def test_customer_lost_at_once_back_only_after_dwell() -> None:
    m = in_reuse()
    assert m.advance(c(customer_ready=False), 700) == (Mode.NORMAL_REUSE, Mode.CUSTOMER_OFFLINE)
    m.advance(OK, 710)
    assert m.advance(OK, 1009) is None
    assert m.advance(OK, 1010) == (Mode.CUSTOMER_OFFLINE, Mode.NORMAL_REUSE)


def test_customer_flapping_restarts_its_dwell() -> None:
    m = in_reuse()
    m.advance(c(customer_ready=False), 700)
    m.advance(OK, 710)
    m.advance(c(customer_ready=False), 900)
    assert m.advance(OK, 1050) is None
    assert m.mode is Mode.CUSTOMER_OFFLINE


def test_buffer_full_respects_min_dwell() -> None:
    m = in_reuse()
    assert m.advance(c(tank_full=True), 630) is None  # only 30 s in NORMAL_REUSE
    assert m.advance(c(tank_full=True), 660) == (Mode.NORMAL_REUSE, Mode.BUFFER_FULL)
    assert m.advance(OK, 700) is None
    assert m.advance(OK, 720) == (Mode.BUFFER_FULL, Mode.NORMAL_REUSE)


@pytest.mark.parametrize("start", [m for m in Mode if m is not Mode.LEAK_TRIP])
def test_leak_trips_from_every_mode(start: Mode) -> None:
    m = ModeMachine(T, start, 0)
    assert m.advance(c(leak_latched=True), 1) == (start, Mode.LEAK_TRIP)


def test_leak_trip_leaves_only_through_reset_with_latch_clear() -> None:
    m = in_reuse()
    m.advance(c(leak_latched=True), 700)
    assert m.advance(OK, 800) is None  # latch clear but no reset
    assert m.advance(c(leak_latched=True, reset=True), 801) is None  # reset refused: still wet
    assert m.advance(c(maintenance=True), 802) is None  # maintenance is no way out either
    assert m.advance(c(reset=True), 803) == (Mode.LEAK_TRIP, Mode.DRY_COOLER_REJECT)


def test_leak_trip_is_not_left_on_a_reset_while_a_leak_input_is_unknown() -> None:
    """Latches clear, but one leak zone cannot be read: a reset does not leave LEAK_TRIP."""
    m = in_reuse()
    m.advance(c(leak_latched=True), 700)
    assert m.advance(c(reset=True, leaks_dry=False), 800) is None
    assert m.mode is Mode.LEAK_TRIP
    assert m.advance(c(reset=True), 801) == (Mode.LEAK_TRIP, Mode.DRY_COOLER_REJECT)


def test_maintenance_enter_and_release_to_reject() -> None:
    m = in_reuse()
    assert m.advance(c(maintenance=True), 700) == (Mode.NORMAL_REUSE, Mode.MAINTENANCE)
    assert m.advance(OK, 710) == (Mode.MAINTENANCE, Mode.DRY_COOLER_REJECT)


def test_mode_hunting_is_flagged() -> None:
    t = Timing(0, 0, 0, 0, hunting_changes_per_h=4)
    m = ModeMachine(t, Mode.STARTUP, 0)
    now = 0.0
    for i in range(8):
        now += 10
        m.advance(c(tank_full=bool(i % 2)), now)
    assert m.hunting
    m.advance(OK, now + 3700)
    assert not m.hunting


def test_diagram_lists_every_transition() -> None:
    d = mermaid_diagram()
    for t in TRANSITIONS:
        for s in t.sources:
            assert f"{s.value} --> {t.dest.value}: {t.trigger}" in d


def test_every_wanted_mode_is_one_transition_away() -> None:
    """Exhaustive: from every mode under every combination of conditions, the mode the
    conditions call for is either the current one or reachable by a transition in the table."""
    from itertools import product

    from controller.modes import _BY_EDGE, wanted

    names = list(OK.__dataclass_fields__)
    for mode in Mode:
        for bits in product([False, True], repeat=len(names)):
            cond = Conditions(**dict(zip(names, bits, strict=True)))
            target = wanted(mode, cond)
            assert target is mode or (mode, target) in _BY_EDGE, (mode, cond, target)
