"""Every pair of rules that force a shared output, generated from the rule table.

The conflict rule (DESIGN §6, docs/safety.md): a rule that protects a circuit (`Rule.protects`) wins
on the outputs of that circuit over any cooling wish, and between two protective rules the more
isolating value wins; elsewhere the value that keeps more cooling wins. The oracle below states
that rule on its own, independently of the engine's code, and each pair is checked twice: with
real points where both causes hold (effect conditions evaluated as the engine would), and on the
declared values alone (as if every effect condition held), so the merge holds even if a
condition ever let a cooling wish through.
"""

from __future__ import annotations

import itertools
import math

import pytest

from interlocks.engine import InterlockState, evaluate, merge
from interlocks.rules import CIRCUITS, RULES, RULES_BY_ID, Rule
from interlocks.validation import Point
from plc_io.tags import Value
from tests.unit.core_helpers import CFG, HEALTHY

TH = CFG.thresholds
UNKNOWN = Point(None, False, "quality")

# Points that make each rule's cause hold (IL-08 is the link state and forces nothing). IL-01
# is provoked with the tank colder than the return, so its conditional sink effects are on.
PROVOKE: dict[str, list[dict[str, Value | Point]]] = {
    "IL-01": [{"it_supply_temp": 46.0, "tank_bottom_temp": 30.0, "it_return_temp": 50.0}],
    "IL-02": [{"it_supply_temp": UNKNOWN, "tank_bottom_temp": 30.0, "it_return_temp": 50.0}],
    "IL-03": [{"primary_flow": 1.0}],
    "IL-04": [{"leak_reuse": True}],
    "IL-05": [{"leak_primary": True}],
    "IL-06": [{"tank_top_temp": 90.0}, {"secondary_pressure": 6.0}],
    "IL-07": [{"customer_supply_temp": 70.0}],
    "IL-09": [{"ambient_temp": -10.0, "drycooler_out_temp": 2.0}],
}
TIMES = [0.0, 1.0, 2.0, 3.0, 6.0, 31.0, 40.0]  # past every rule's delay


def test_every_rule_that_forces_something_can_be_provoked() -> None:
    assert {r.id for r in RULES if r.forces} == set(PROVOKE)
    for rid, variants in PROVOKE.items():
        for v in variants:
            assert RULES_BY_ID[rid].cause(points(v), TH), rid


def test_protective_rules_claim_only_outputs_of_their_circuits() -> None:
    for r in RULES:
        claimed = {o for c in r.protects for o in CIRCUITS[c]}
        assert set(r.outputs) <= claimed or not r.protects, r.id


def points(*changes: dict[str, Value | Point]) -> dict[str, Point]:
    p = {k: Point(v, True) for k, v in HEALTHY.items()}
    for ch in changes:
        for k, v in ch.items():
            p[k] = v if isinstance(v, Point) else Point(v, True)
    return p


def expected(wishes: list[tuple[Rule, Value]]) -> Value:
    """The conflict rule, stated on its own."""
    protective = [v for r, v in wishes if r.protects]
    if protective:
        if any(isinstance(v, bool) for v in protective):
            return all(bool(v) for v in protective)  # off wins: the more isolating
        return min(float(v) for v in protective)
    values = [v for _, v in wishes]
    if any(isinstance(v, bool) for v in values):
        return any(bool(v) for v in values)  # on wins: more cooling
    return max(float(v) for v in values)


def _pairs() -> list[tuple[str, str, int, int]]:
    out = []
    for a, b in itertools.combinations([r for r in RULES if r.forces], 2):
        if set(a.outputs) & set(b.outputs):
            for i, j in itertools.product(range(len(PROVOKE[a.id])), range(len(PROVOKE[b.id]))):
                out.append((a.id, b.id, i, j))
    return out


PAIRS = _pairs()


def test_the_pairs_cover_the_conflicts_that_matter() -> None:
    ids = {(a, b) for a, b, _, _ in PAIRS}
    for pair in [("IL-01", "IL-04"), ("IL-01", "IL-06"), ("IL-01", "IL-07"), ("IL-01", "IL-09")]:
        assert pair in ids


@pytest.mark.parametrize(("a", "b", "i", "j"), PAIRS)
def test_both_causes_held_the_merged_value_is_the_conflict_rules(
    a: str, b: str, i: int, j: int
) -> None:
    ra, rb = RULES_BY_ID[a], RULES_BY_ID[b]
    p = points(PROVOKE[a][i], PROVOKE[b][j])
    if not (ra.cause(p, TH) and rb.cause(p, TH)):
        # one reading cannot be hot and unknown at once: such rules must force the same values
        assert ra.group and ra.group == rb.group and ra.forces == rb.forces
        return
    state = InterlockState()
    for t in TIMES:
        v = evaluate(p, state, t, TH)
        state = v.state
    assert {a, b} <= v.active
    fa, fb = ra.effects(p, TH), rb.effects(p, TH)
    for out in sorted(set(ra.outputs) & set(rb.outputs)):
        wishes = [(r, f[out]) for r, f in ((ra, fa), (rb, fb)) if out in f]
        wishes += [
            (r, r.effects(p, TH)[out])
            for r in RULES
            if r.id in v.active and r not in (ra, rb) and out in r.effects(p, TH)
        ]
        if not wishes:
            assert out not in v.forced
            continue
        assert v.forced[out].value == expected(wishes), (a, b, out)


@pytest.mark.parametrize(("a", "b", "i", "j"), PAIRS)
def test_declared_values_merge_as_the_conflict_rule_says(a: str, b: str, i: int, j: int) -> None:
    ra, rb = RULES_BY_ID[a], RULES_BY_ID[b]
    da = {e.output: e.shown(TH) for e in ra.forces}
    db = {e.output: e.shown(TH) for e in rb.forces}
    for out in set(da) & set(db):
        wishes = [(ra, da[out]), (rb, db[out])]
        assert merge(wishes).value == expected(wishes), (a, b, out)
        assert merge(wishes[::-1]).value == expected(wishes), (b, a, out)


def test_over_pressure_wins_over_the_hx_as_a_sink_on_the_merge_alone() -> None:
    """The hazard of 7.9 in one line: IL-01 wants the secondary pump on, IL-06 wants it off."""
    il01, il06 = RULES_BY_ID["IL-01"], RULES_BY_ID["IL-06"]
    assert merge([(il01, True), (il06, False)]) == (False, ("IL-06",))
    assert merge([(il01, 100.0), (il06, 0.0)]) == (0.0, ("IL-06",))
    il09 = RULES_BY_ID["IL-09"]
    assert merge([(il09, TH.fan_min_pct), (il01, 100.0)]) == (100.0, ("IL-01",))


def test_no_rule_ever_forces_a_primary_pump_off() -> None:
    for r in RULES:
        for e in r.forces:
            if e.output in ("primary_pump_a_cmd", "primary_pump_b_cmd"):
                assert e.value is True and e.otherwise is None, r.id
            if e.output in ("primary_pump_speed_cmd", "drycooler_fan_cmd"):
                assert float(e.shown(TH)) > 0.0 and not math.isnan(float(e.shown(TH)))
