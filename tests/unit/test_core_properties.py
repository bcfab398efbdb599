"""Property tests of the decision core over arbitrary, hostile process images.

Invariants, whatever the inputs (NaN, stale, out of range, missing, comms lost, in any order):
the step never raises; no decision ever leaves zero primary pumps commanded; once the supply
temperature has been high or unusable for the supply rules' delay, the fans are at 100 % and a
primary pump runs; while a leak input is wet or a leak latch is set, the reuse circuit is
isolated; LEAK_TRIP is left only through a reset with every leak dry.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.modes import Mode
from controller.supervisor import Commands, Supervisor
from interlocks.rules import RULES_BY_ID
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


@st.composite
def sample_for(draw, name: str, now: float) -> Sample | None:
    if draw(st.integers(0, 9)) == 0:
        return None  # missing from the image altogether
    q = draw(st.sampled_from([Quality.GOOD] * 4 + list(Quality)))
    age = draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0, 60.0]))
    if name in BOOL_TAGS:
        v = draw(st.one_of(st.booleans(), st.none()))
    else:
        v = draw(st.one_of(st.just(float(HEALTHY[name])), numbers, st.none()))
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
        )
        out.append((dt, names, draw(st.randoms(use_true_random=False)), cmds))
    return out


def usable_supply(s: Sample, now: float) -> float:
    """The supply temperature if a user would call it trustworthy now, else NaN."""
    if not s.quality.usable or s.value is None or now - s.at_s > CFG.validation.stale_s:
        return math.nan
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
            samples.get(z) is not None
            and samples[z].value is True
            and samples[z].quality.usable
            and now - samples[z].at_s <= CFG.validation.stale_s
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
        if d.mode is Mode.LEAK_TRIP:
            assert leak_seen
