"""Process image: staleness is computed from the time passed in; a failed point is never good."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plc_io.image import MISSING, ProcessImage, Quality, Sample, judge, judge_why
from plc_io.site import demo_site

SITE = demo_site()
TEMP = SITE.tag("it_supply_temp")  # range -20 … 120 °C
LEAK = SITE.tag("leak_primary")


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.integers(1, 100))
def test_staleness_is_computed_from_now_never_stored(at: int, dt: int, limit: int) -> None:
    s = Sample(40.0, Quality.GOOD, float(at))
    assert s.age_s(at + dt) == dt
    expected = Quality.GOOD if dt <= limit else Quality.STALE
    assert s.quality_at(at + dt, limit) is expected
    assert s.usable_at(at + dt, limit) is (expected is Quality.GOOD)
    assert s.quality is Quality.GOOD  # the sample itself never changes


def test_bad_qualities_never_turn_good_or_stale_with_time() -> None:
    for q in (Quality.COMMS_LOST, Quality.BAD_REPLY, Quality.OUT_OF_RANGE):
        s = Sample(40.0, q, 0.0)
        assert s.quality_at(0.0, 2.0) is q and s.quality_at(1e9, 2.0) is q
        assert not s.usable_at(0.0, 2.0)


def test_judge_checks_the_engineering_range() -> None:
    assert judge(TEMP, 35.0, 1.0) == Sample(35.0, Quality.GOOD, 1.0)
    assert judge(TEMP, 120.0, 1.0).quality is Quality.GOOD
    assert judge(TEMP, 120.01, 1.0) == Sample(120.01, Quality.OUT_OF_RANGE, 1.0)
    assert judge(TEMP, -40.0, 1.0).quality is Quality.OUT_OF_RANGE
    assert judge(TEMP, math.nan, 1.0).quality is Quality.OUT_OF_RANGE
    assert judge(TEMP, None, 1.0).quality is Quality.BAD_REPLY
    assert judge(LEAK, True, 1.0) == Sample(True, Quality.GOOD, 1.0)


def test_marked_points_keep_their_value_but_not_their_quality() -> None:
    img = ProcessImage(
        {"a": Sample(40.0, Quality.GOOD, 10.0), "b": Sample(True, Quality.GOOD, 10.0)}
    )
    lost = img.marked(["a"], Quality.COMMS_LOST, 12.0)
    assert lost["a"] == Sample(40.0, Quality.COMMS_LOST, 12.0)
    assert lost["b"] == img["b"]
    assert img["a"].quality is Quality.GOOD  # images are immutable
    # at_s=None keeps the value's own time, so its age stays honest
    kept = img.marked(["a", "b"], Quality.BAD_REPLY, None)
    assert kept["a"] == Sample(40.0, Quality.BAD_REPLY, 10.0)
    assert all(not s.usable_at(10.0, 2.0) for s in kept.values())


def test_a_tag_never_read_is_missing_and_comms_lost() -> None:
    img = ProcessImage()
    assert img["it_supply_temp"] is MISSING
    assert img["it_supply_temp"].quality is Quality.COMMS_LOST
    assert img.value("it_supply_temp") is None
    assert "it_supply_temp" not in img
    marked = img.marked(["x"], Quality.COMMS_LOST, None)
    assert marked["x"].value is None and marked["x"].quality is Quality.COMMS_LOST


def test_updated_replaces_only_the_given_samples() -> None:
    img = ProcessImage({"a": Sample(1.0, Quality.GOOD, 0.0)})
    new = img.updated({"b": Sample(2.0, Quality.GOOD, 1.0)})
    assert set(new) == {"a", "b"} and len(img) == 1


def test_opcua_status_codes_map_to_the_documented_qualities() -> None:
    from asyncua import ua

    from plc_io.opcua import quality_of

    S = ua.StatusCodes
    expect = {
        S.Good: Quality.GOOD,
        S.GoodClamped: Quality.GOOD,
        S.BadNoCommunication: Quality.COMMS_LOST,
        S.BadCommunicationError: Quality.COMMS_LOST,
        S.BadNotConnected: Quality.COMMS_LOST,
        S.BadServerNotConnected: Quality.COMMS_LOST,
        S.UncertainLastUsableValue: Quality.STALE,
        S.UncertainNoCommunicationLastUsableValue: Quality.STALE,
        S.UncertainSensorNotAccurate: Quality.BAD_REPLY,
        S.BadNodeIdUnknown: Quality.BAD_REPLY,
        S.BadTypeMismatch: Quality.BAD_REPLY,
        S.BadOutOfRange: Quality.BAD_REPLY,
    }
    for code, q in expect.items():
        assert quality_of(ua.StatusCode(code)) is q, ua.StatusCode(code).name
    # info bits (here: overflow) do not change the meaning of the code
    assert quality_of(ua.StatusCode(S.BadNoCommunication | 0x0080)) is Quality.COMMS_LOST


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("leak_primary", math.nan, "expected a boolean"),  # bool(nan) is True
        ("leak_primary", 1.0, "expected a boolean"),
        ("leak_primary", 2, "expected a boolean"),
        ("leak_primary", "false", "expected a boolean"),  # bool("false") is True
        ("leak_primary", None, "expected a boolean"),
        ("it_supply_temp", True, "expected a number"),  # float(True) is 1.0
        ("it_supply_temp", False, "expected a number"),
        ("it_supply_temp", "35.0", "expected a number"),
        ("it_supply_temp", None, "expected a number"),
        ("it_supply_temp", [35.0], "expected a number"),
        ("it_supply_temp", 2**70, "outside the 64-bit range"),
        ("it_supply_temp", -(2**70), "outside the 64-bit range"),
    ],
)
def test_a_value_of_the_wrong_kind_is_bad_reply_with_a_reason(
    name: str, value: object, why: str
) -> None:
    sample, reason = judge_why(SITE.tag(name), value, 3.0)
    assert sample == Sample(None, Quality.BAD_REPLY, 3.0)
    assert reason is not None and reason.startswith(f"{name}: ") and why in reason
    assert judge(SITE.tag(name), value, 3.0) == sample


def test_values_of_the_right_kind_are_judged_by_range() -> None:
    np = pytest.importorskip("numpy")
    assert judge(LEAK, np.bool_(True), 0.0) == Sample(True, Quality.GOOD, 0.0)
    assert judge(LEAK, 0, 0.0) == Sample(False, Quality.GOOD, 0.0)  # a flag register
    assert judge(TEMP, 35, 0.0) == Sample(35.0, Quality.GOOD, 0.0)
    assert judge(TEMP, np.float32(35.5), 0.0) == Sample(35.5, Quality.GOOD, 0.0)
    assert judge(TEMP, 2**40, 0.0).quality is Quality.OUT_OF_RANGE  # a number, far out


def test_a_reason_quotes_a_huge_value_bounded() -> None:
    _, reason = judge_why(TEMP, "x" * 1_000_000, 0.0)
    assert reason is not None and len(reason) < 200 and "1000002 chars" in reason
