"""Property tests of the decision core over arbitrary, hostile process images.

Invariants, whatever the inputs (NaN, stale, out of range, missing, comms lost, values of the
wrong kind, in any order) and whatever bypasses are asked for (unknown rules, any expiry
including NaN and infinity): the step never raises; no decision ever leaves zero primary pumps
commanded; once the supply temperature has been high or unusable for the supply rules' delay,
the fans are at 100 % and a primary pump runs; while a leak input is wet or a leak latch is
set, the reuse circuit is isolated; a leak latch is cleared only by a reset while its own input
is valid and dry, and LEAK_TRIP is left only that way; a non-bypassable rule is never bypassed,
and no bypass stands whose expiry is not a finite time within the maximum from now.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.modes import Mode
from controller.supervisor import Commands, Supervisor
from interlocks.engine import InterlockState, evaluate
from interlocks.rules import RULES, RULES_BY_ID
from interlocks.validation import Point
from plc_io.image import ProcessImage, Quality, Sample
from tests.unit.core_helpers import CFG, HEALTHY, SITE

HIGH = SITE.interlocks.it_supply_high_c
SUPPLY_DELAY = max(RULES_BY_ID["IL-01"].delay_s, RULES_BY_ID["IL-02"].delay_s)
BOOL_TAGS = [t.name for t in SITE.inputs if t.is_bool]
NUM_TAGS = [t.name for t in SITE.inputs if not t.is_bool]

numbers = st.one_of(
    st.floats(min_value=-30, max_value=130),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e9, -1e9]),
)
qualities = st.sampled_from(list(Quality))
# values a transport should never let through, but validation must not trust if one does
wrong_kind = st.sampled_from([math.nan, 1.0, 0.0, 1, True, "1", b"\x01"])
RULE_IDS = [r.id for r in RULES]
NOT_BYPASSABLE = frozenset(r.id for r in RULES if not r.bypassable)
MAX_BYPASS_S = CFG.thresholds.max_bypass_s
expiries = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=900.0, max_value=30_000.0),
    st.sampled_from([10**400, -(10**400)]),  # integers no float can hold
)
bypass_maps = st.dictionaries(
    st.one_of(st.sampled_from(RULE_IDS), st.text(max_size=6)), expiries, max_size=4
)


@st.composite
def sample_for(draw, name: str, now: float) -> Sample | None:
    if draw(st.integers(0, 9)) == 0:
        return None  # missing from the image altogether
    q = draw(st.sampled_from([Quality.GOOD] * 4 + list(Quality)))
    age = draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0, 60.0]))
    if name in BOOL_TAGS:
        v = draw(st.one_of(st.booleans(), st.none(), wrong_kind))
    else:
        v = draw(st.one_of(st.just(float(HEALTHY[name])), numbers, st.none(), wrong_kind))
    return Sample(v, q, now - age)


@st.composite
def scans(draw):
    """A sequence of (dt, partial image changes, commands)."""
    out = []
    for _ in range(draw(st.integers(1, 40))):
        dt = draw(st.sampled_from([0.1, 0.25, 0.25, 1.0, 5.0, 60.0]))
        names = draw(st.lists(st.sampled_from(NUM_TAGS + BOOL_TAGS), max_size=8, unique=True))
        cmds = Commands(
            reset=draw(st.booleans()),
            request_reject=draw(st.booleans()),
            maintenance=draw(st.integers(0, 5)) == 0,
            link_ok=draw(st.integers(0, 5)) != 0,
            bypasses=draw(bypass_maps) if draw(st.integers(0, 3)) == 0 else {},
        )
        out.append((dt, names, draw(st.randoms(use_true_random=False)), cmds))
    return out


def fresh(s: Sample | None, now: float) -> bool:
    """Usable and neither stale nor stamped ahead of the validation's tolerance."""
    return (
        s is not None
        and s.quality.usable
        and now - s.at_s <= CFG.validation.stale_s
        and s.at_s <= now + CFG.validation.future_s
    )


def valid_dry(s: Sample | None, now: float) -> bool:
    """What a user would call a leak input known to be dry."""
    return fresh(s, now) and s is not None and s.value is False


def usable_supply(s: Sample, now: float) -> float:
    """The supply temperature if a user would call it trustworthy now, else NaN."""
    if not s.quality.usable or s.value is None or now - s.at_s > CFG.validation.stale_s:
        return math.nan
    if isinstance(s.value, bool) or not isinstance(s.value, float | int):
        return math.nan  # the wrong kind is unknown, never 1.0
    v = float(s.value)
    return v if math.isfinite(v) and -20 <= v <= 120 else math.nan


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scans(), st.data())
def test_invariants_hold_over_hostile_scan_sequences(seq, data) -> None:
    sup = Supervisor(CFG)
    now = 1000.0
    samples: dict[str, Sample] = {n: Sample(v, Quality.GOOD, now) for n, v in HEALTHY.items()}
    bad_since: float | None = None
    leak_seen = False
    for dt, names, _rnd, cmds in seq:
        now += dt
        # samples not redrawn age naturally: a stuck link shows as stale
        for n in names:
            s = data.draw(sample_for(n, now))
            if s is None:
                samples.pop(n, None)
            else:
                samples[n] = s
        image = ProcessImage(samples)
        before, latched_before = sup.mode, sup.latched
        d = sup.step(image, now, cmds)
        assert not (latched_before - d.latched) or cmds.reset, "a latch cleared without reset"
        for rule, zone in (("IL-04", "leak_reuse"), ("IL-05", "leak_primary")):
            if rule in latched_before and rule not in d.latched:
                assert valid_dry(samples.get(zone), now), f"{rule} cleared on an unknown {zone}"

        assert not d.bypassed & NOT_BYPASSABLE, "a non-bypassable rule was bypassed"
        for rid in d.bypassed:
            expiry = cmds.bypasses[rid]
            assert math.isfinite(expiry) and now < expiry <= now + MAX_BYPASS_S
        v = d.values()

        assert v["primary_pump_a_cmd"] or v["primary_pump_b_cmd"], "no primary pump commanded"

        sup_s = samples.get("it_supply_temp", Sample(None, Quality.COMMS_LOST, -1e9))
        t = usable_supply(sup_s, now)
        if math.isnan(t) or t > HIGH:
            bad_since = now if bad_since is None else bad_since
        else:
            bad_since = None
        if bad_since is not None and now - bad_since >= SUPPLY_DELAY:
            assert v["drycooler_fan_cmd"] == 100.0, d.outputs["drycooler_fan_cmd"]
            assert v["primary_pump_a_cmd"] or v["primary_pump_b_cmd"]

        wet = any(
            samples.get(z) is not None and samples[z].value is True and fresh(samples[z], now)
            for z in ("leak_primary", "leak_reuse")
        )
        leak_seen = leak_seen or wet
        if wet or d.latched & {"IL-04", "IL-05"}:
            assert v["reuse_valve_cmd"] == 0.0
            assert v["secondary_pump_cmd"] is False
            assert v["reuse_isolation_cmd"] is False and v["customer_isolation_cmd"] is False
        if wet:
            assert d.mode is Mode.LEAK_TRIP
        if before is Mode.LEAK_TRIP and d.mode is not Mode.LEAK_TRIP:
            assert cmds.reset and not wet and not (d.latched & {"IL-04", "IL-05"})
            zones = {"IL-04": "leak_reuse", "IL-05": "leak_primary"}
            assert all(valid_dry(samples.get(zones[r]), now) for r in latched_before & set(zones))
        if d.mode is Mode.LEAK_TRIP:
            assert leak_seen


points_strategy = st.dictionaries(
    st.sampled_from(NUM_TAGS + BOOL_TAGS),
    st.one_of(
        st.builds(Point, st.one_of(numbers, st.booleans(), st.none()), st.booleans()),
        st.just(Point(None, False, "supervision")),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(points_strategy, st.floats(allow_nan=True), st.booleans(), bypass_maps)))
def test_evaluate_never_raises_and_never_bypasses_a_safety_rule(scans_) -> None:
    """The interlock engine alone, on arbitrary points, clocks (NaN, backwards) and bypasses."""
    state = InterlockState()
    for pts, now, reset, bypasses in scans_:
        v = evaluate(pts, state, now, CFG.thresholds, reset=reset, bypasses=bypasses)
        state = v.state
        assert not v.bypassed & NOT_BYPASSABLE
        assert v.bypassed <= set(RULE_IDS)
        for out, f in v.forced.items():
            if out in ("primary_pump_a_cmd", "primary_pump_b_cmd"):
                assert f.value is True
