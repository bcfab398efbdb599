"""Property tests of the supervisor step over hostile requests: manual values and setpoints.

Invariant first: whatever an operator, an engineer, the BMS or a broken command channel asks
(unknown tags, NaN, inf, strings, booleans on analogue outputs, numbers on boolean ones, huge
values, any expiry), `Supervisor.step` never raises; every output it decides has its tag's type
and stays inside its tag's range; a primary pump is commanded; and some heat sink remains (the
dry-cooler fans at their minimum or more, or the HX path open).
"""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.arbitration import Level, Manual
from controller.sequences import BMS_REQUESTS
from controller.supervisor import Commands, Decision, Supervisor
from tests.unit.core_helpers import CFG, SITE, plant_like

OUTPUTS = {t.name: t for t in SITE.outputs}
BMS_OUTPUTS = {output for output, _, _ in BMS_REQUESTS.values()}
FAN_MIN = CFG.sequence.fan_min_pct
# short dwells, so each example reaches reuse in a few scans and its requests meet every
# sequence, not only start-up's
QUICK = replace(
    CFG,
    timing=replace(CFG.timing, min_dwell_s=0, reject_dwell_s=2, customer_ready_dwell_s=0),
)

# integers no float can hold: a JSON request channel carries them
HUGE_INTS = (10**400, -(10**400), 10**5000)
tag_names = st.one_of(
    st.sampled_from([*OUTPUTS, "heartbeat", "no_such_tag", "", "REUSE_VALVE_CMD"]),
    st.text(max_size=12),
)
anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 250.0, -1.0, 0.0, 100.0]),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(HUGE_INTS),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
expiries = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([math.nan, math.inf, -math.inf, *HUGE_INTS]),
)
manuals = st.dictionaries(
    tag_names,
    st.one_of(
        st.builds(Manual, anything, expiries, st.text(max_size=4)),
        anything,  # not even a Manual: a broken channel
    ),
    max_size=6,
)
setpoints = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -40.0, 0.0, 1e12, 35.0, 39.9, 40.1]),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(HUGE_INTS),
    st.text(max_size=4),
)


@st.composite
def commands(draw: st.DrawFn) -> Commands:
    return Commands(
        reset=draw(st.booleans()),
        request_reject=draw(st.booleans()),
        maintenance=draw(st.integers(0, 4)) == 0,
        manual=draw(manuals),
        supply_setpoint_c=draw(setpoints),
        bms=draw(st.dictionaries(st.sampled_from([*BMS_REQUESTS, "fan", ""]), anything)),
    )


def assert_outputs_sane(d: Decision) -> None:
    for name, out in d.outputs.items():
        tag = OUTPUTS[name]
        v = out.value
        if tag.is_bool:
            assert isinstance(v, bool), (name, v, out)
        else:
            assert isinstance(v, int | float) and not isinstance(v, bool), (name, v, out)
            assert math.isfinite(v) and tag.lo <= v <= tag.hi, (name, v, out)
    v = d.values()
    assert v["primary_pump_a_cmd"] or v["primary_pump_b_cmd"], "no primary pump commanded"
    hx_open = (
        float(v["reuse_valve_cmd"]) > 0
        and v["secondary_pump_cmd"] is True
        and v["reuse_isolation_cmd"] is True
    )
    assert float(v["drycooler_fan_cmd"]) >= FAN_MIN or hx_open, "no heat sink left"
    # the BMS level wins only on what it may steer, and only while the sequence runs the pump
    for name, out in d.outputs.items():
        if out.level is Level.BMS:
            assert name in BMS_OUTPUTS, (name, out)
            assert d.outputs["secondary_pump_cmd"] == (True, Level.SEQUENCE, ""), d.outputs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0.25, 1.0, 5.0, 60.0]), commands()), max_size=25))
def test_step_never_raises_and_outputs_stay_in_type_and_range(scans: list) -> None:
    sup = Supervisor(QUICK, 0.0)
    now, d = 0.0, None
    for _ in range(5):
        now += 1.0
        d = sup.step(plant_like(now, d), now)
    for dt, cmds in scans:
        now += dt
        d = sup.step(plant_like(now, d), now, cmds)
        assert_outputs_sane(d)
