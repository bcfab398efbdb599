"""Sensor validation: kinds, time stamps, frozen windows, plausibility, supervised inputs.

Every test drives `validate` (or the whole supervisor) on a fake clock; expected verdicts come
from the site's parameters and the physics of the loop (the servers heat the water, the supply
is downstream of the dry cooler), never from a previous run.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from controller.modes import Mode
from controller.study import image_of
from controller.supervisor import Commands, Supervisor, SupervisorConfig
from interlocks.rules import RULES_BY_ID
from interlocks.validation import (
    EMPTY_MEMORY,
    FROZEN,
    FUTURE,
    IMPLAUSIBLE,
    QUALITY,
    RATE,
    STALE,
    SUPERVISION,
    TYPE,
    Memory,
    Point,
    ValidationConfig,
    validate,
)
from plc_io.image import ProcessImage, Quality, Sample
from plc_io.site import demo_site_text, loads_site
from sim.plant import initial, measure, step
from tests.unit.core_helpers import CFG, SITE, image, live

VCFG = CFG.validation
ARMED = replace(VCFG, plausibility_settle_s=0.0)  # cross-checks armed from the first scan
BAND = SITE.interlocks.plausibility_band_k
MIN_KW = SITE.interlocks.plausibility_min_it_power_kw


def check(
    img: ProcessImage,
    now: float = 0.0,
    cfg: ValidationConfig = ARMED,
    memory: Memory = EMPTY_MEMORY,
    flowing: bool = True,
) -> dict[str, Point]:
    return validate(img, memory, now, cfg, flowing)[0]


def run(
    frames: list[tuple[float, ProcessImage]], cfg: ValidationConfig = ARMED, flowing: bool = True
) -> list[dict[str, Point]]:
    memory, out = EMPTY_MEMORY, []
    for t, img in frames:
        pts, memory = validate(img, memory, t, cfg, flowing)
        out.append(pts)
    return out


# ---- a value of the wrong kind is never good ---------------------------------------


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("it_supply_temp", True),  # a boolean on an analogue tag (an OPC UA variant)
        ("it_supply_temp", False),
        ("it_supply_temp", "35.0"),  # a string
        ("leak_reuse", math.nan),  # bool(nan) is True
        ("leak_reuse", 0.0),  # a float on a boolean tag
        ("leak_reuse", 1),  # an integer on a boolean tag
        ("leak_reuse", "False"),  # bool("False") is True
        ("customer_ready", 1.0),
        ("it_supply_temp", 10**400),  # an integer no register holds (float() would overflow)
    ],
)
def test_a_value_of_the_wrong_kind_is_invalid_with_reason_type(tag: str, value: object) -> None:
    p = check(image(0.0, **{tag: value}))[tag]  # type: ignore[arg-type]
    assert p == (None, False, TYPE)  # never True, never 1.0: the value is unknown


def test_numpy_booleans_and_integers_are_of_the_right_kind() -> None:
    p = check(image(0.0, leak_reuse=np.bool_(True), it_power=200, customer_ready=np.True_))
    assert p["leak_reuse"] == (True, True, "") and p["leak_reuse"].value is True
    assert p["customer_ready"].value is True
    assert p["it_power"].valid and p["it_power"].num() == 200.0


def test_a_supply_of_the_wrong_kind_is_il02_not_a_temperature() -> None:
    sup = Supervisor(CFG)
    for t in (0.0, 0.5, 1.0, 1.5):
        d = sup.step(live(t, it_supply_temp=True), t)  # type: ignore[arg-type]
    assert d.invalid["it_supply_temp"] == TYPE and "IL-02" in d.active
    assert d.outputs["drycooler_fan_cmd"].value == 100.0


def test_a_nan_on_a_leak_input_is_never_wet_nor_dry() -> None:
    sup = Supervisor(CFG)
    d = sup.step(live(0.0, leak_reuse=math.nan), 0.0)
    assert d.invalid["leak_reuse"] == TYPE
    assert not d.latched  # unknown is not wet: a garbled reply does not latch a trip ...
    assert any("leak_reuse" in r for r in d.reject_reasons)  # ... but it rejects reuse


# ---- time stamps ----------------------------------------------------------------------


def test_a_sample_from_the_future_is_not_fresh() -> None:
    now = 1000.0
    ahead = now + VCFG.future_s + 5.0
    p = check(image(now, it_supply_temp=Sample(35.0, Quality.GOOD, ahead)), now)
    assert p["it_supply_temp"] == (35.0, False, FUTURE)
    within = now + VCFG.future_s / 2  # a small skew between reader and scan is tolerated
    p = check(image(now, it_supply_temp=Sample(35.0, Quality.GOOD, within)), now)
    assert p["it_supply_temp"].valid


def test_a_nan_time_stamp_is_stale() -> None:
    p = check(image(0.0, leak_reuse=Sample(False, Quality.GOOD, math.nan)), 0.0)
    assert p["leak_reuse"] == (False, False, STALE)


def test_a_future_supply_sample_fails_toward_cooling() -> None:
    sup = Supervisor(CFG)
    for t in (0.0, 0.5, 1.0, 1.5):
        d = sup.step(live(t, it_supply_temp=Sample(30.0, Quality.GOOD, t + 3600.0)), t)
    assert d.invalid["it_supply_temp"] == FUTURE and "IL-02" in d.active


# ---- per-tag frozen windows -------------------------------------------------------------


def test_each_tag_has_its_own_frozen_window() -> None:
    tags = {t.name: t for t in SITE.inputs}
    supply_s, return_s = tags["it_supply_temp"].frozen_s, tags["it_return_temp"].frozen_s
    assert supply_s is not None and return_s is not None and supply_s < return_s
    assert supply_s < SITE.interlocks.frozen_s  # much shorter than the site default
    cfg = replace(VCFG, plausibility_settle_s=math.inf)  # frozen alone
    frames = [(float(t), image(float(t))) for t in range(0, int(return_s) + 3)]
    out = run(frames, cfg)
    by_t = dict(zip([t for t, _ in frames], out, strict=True))
    assert by_t[supply_s]["it_supply_temp"].valid  # the window is not over yet
    assert by_t[supply_s + 1]["it_supply_temp"].reason == FROZEN
    assert by_t[supply_s + 1]["it_return_temp"].valid
    assert by_t[return_s + 1]["it_return_temp"].reason == FROZEN


def test_a_tag_without_its_own_window_uses_the_site_default() -> None:
    text = demo_site_text().replace("frozen_s = 60 ", "# frozen_s = 60 ")
    site = loads_site(text)
    supply = next(t for t in site.inputs if t.name == "it_supply_temp")
    assert supply.frozen_s is None
    spec = {s[0]: s for s in SupervisorConfig.from_site(site).validation.spec}
    assert spec["it_supply_temp"][5] == site.interlocks.frozen_s


# ---- plausibility ---------------------------------------------------------------------


def test_supply_at_or_above_the_return_under_load_is_implausible() -> None:
    p = check(image(0.0, it_supply_temp=45.0, it_return_temp=45.0, drycooler_out_temp=44.0))
    assert p["it_supply_temp"] == (45.0, False, IMPLAUSIBLE)
    p = check(image(0.0, it_supply_temp=44.9, it_return_temp=45.0, drycooler_out_temp=44.0))
    assert p["it_supply_temp"].valid


def test_supply_colder_than_the_dry_cooler_outlet_by_more_than_the_band_is_implausible() -> None:
    outlet = 35.0
    p = check(image(0.0, it_supply_temp=outlet - BAND - 0.1, drycooler_out_temp=outlet))
    assert p["it_supply_temp"].reason == IMPLAUSIBLE
    p = check(image(0.0, it_supply_temp=outlet - BAND + 0.1, drycooler_out_temp=outlet))
    assert p["it_supply_temp"].valid
    # warmer than the outlet: the supply lags the outlet after the fans speed up; reading warm
    # fails toward cooling anyway, so only "too cold" is implausible
    p = check(image(0.0, it_supply_temp=outlet + BAND + 1.0, drycooler_out_temp=outlet))
    assert p["it_supply_temp"].valid


@pytest.mark.parametrize(
    ("why", "changes", "flowing"),
    [
        ("IT load below the arming level", {"it_power": MIN_KW - 1.0}, True),
        ("IT load unknown", {"it_power": math.nan}, True),
        ("primary loop not flowing", {}, False),
    ],
)
def test_plausibility_is_not_armed_without_load(why: str, changes: dict, flowing: bool) -> None:
    stuck_cold = {"it_supply_temp": 20.0, "drycooler_out_temp": 35.0}
    p = check(image(0.0, **stuck_cold, **changes), flowing=flowing)
    assert p["it_supply_temp"].valid, why


def test_plausibility_is_not_armed_before_the_loop_has_settled() -> None:
    settle = VCFG.plausibility_settle_s
    assert settle > 0.0
    frames = [
        (t, live(t, it_supply_temp=20.0 + 0.01 * (t % 2), drycooler_out_temp=35.0))
        for t in np.arange(0.0, settle + 2.0, 1.0)
    ]
    out = run(frames, VCFG)
    verdicts = [(t, p["it_supply_temp"].reason) for (t, _), p in zip(frames, out, strict=True)]
    assert all(r == "" for t, r in verdicts if t < settle)
    assert all(r == IMPLAUSIBLE for t, r in verdicts if t >= settle)


@pytest.mark.parametrize("reference", ["drycooler_out_temp", "it_return_temp"])
def test_a_check_is_not_armed_when_its_reference_is_invalid(reference: str) -> None:
    # the supply disagrees with both references; with one of them invalid, only the other check
    # is armed, and it still catches the stuck sensor
    bad = {"it_supply_temp": 46.0, "it_return_temp": 45.0, "drycooler_out_temp": 30.0}
    bad[reference] = math.nan
    p = check(image(0.0, **bad))
    other = "it_return_temp" if reference == "drycooler_out_temp" else "drycooler_out_temp"
    if other == "it_return_temp":  # 46 above the return 45: implausible
        assert p["it_supply_temp"].reason == IMPLAUSIBLE
    else:  # 46 not more than the band below a 30 °C outlet: that check passes
        assert p["it_supply_temp"].valid
    both = dict(bad, it_return_temp=math.nan, drycooler_out_temp=math.nan)
    assert check(image(0.0, **both))["it_supply_temp"].valid  # nothing armed: no verdict


def test_the_return_must_sit_above_a_trusted_supply() -> None:
    p = check(image(0.0, it_supply_temp=35.0, it_return_temp=34.0, drycooler_out_temp=34.0))
    # supply above the return: the supply is judged first and blamed (IL-02: more cooling), so
    # the return has no trusted reference left and is not judged
    assert p["it_supply_temp"].reason == IMPLAUSIBLE and p["it_return_temp"].valid


def test_a_rate_fault_is_held_until_a_plausibility_check_passes_again() -> None:
    rate = VCFG.max_rate_k_per_s
    jump = 35.0 - 1.5 * rate  # faster than physics, but within the band of the outlet
    low = {"it_power": MIN_KW / 2}  # low load: the cross-checks are not armed
    frames = [(0.0, live(0.0)), (1.0, live(1.0, it_supply_temp=jump, **low))]
    frames += [
        (float(t), live(float(t), it_supply_temp=jump + 0.02 * (t % 2), **low))
        for t in range(2, 30)
    ]
    mem, out = EMPTY_MEMORY, []
    for t, img in frames:
        pts, mem = validate(img, mem, t, ARMED, True)
        out.append(pts)
    assert out[1]["it_supply_temp"].reason == RATE
    # old behaviour: trusted again one scan after the jump; now held while nothing can judge it
    assert all(p["it_supply_temp"].reason == RATE for p in out[2:])
    assert "it_supply_temp" in mem.rate_faulted
    # load back: the reading sits below the return and agrees with the outlet: trusted again
    pts, mem = validate(live(30.0, it_supply_temp=jump), mem, 30.0, ARMED, True)
    assert pts["it_supply_temp"].valid and not mem.rate_faulted


def test_a_held_rate_fault_needs_the_settle_time_of_passing_checks() -> None:
    settle = VCFG.plausibility_settle_s
    jump = 35.0 - 1.5 * VCFG.max_rate_k_per_s
    frames = [(float(t), live(float(t))) for t in range(0, int(settle) + 2)]
    t0 = frames[-1][0] + 1.0
    frames += [
        (t0 + k, live(t0 + k, it_supply_temp=jump + 0.02 * (k % 2))) for k in range(int(settle) + 3)
    ]
    out = run(frames, VCFG)
    after = [(t - t0, p["it_supply_temp"].reason) for (t, _), p in zip(frames, out, strict=True)]
    after = [(k, r) for k, r in after if k >= 0]
    assert after[0] == (0.0, RATE)
    assert all(r == RATE for k, r in after if k < settle)
    assert after[-1][1] == ""


def test_the_scan_of_a_plausible_jump_itself_is_not_trusted() -> None:
    jump = 35.0 - 1.5 * VCFG.max_rate_k_per_s  # still within the band of the outlet
    out = run([(0.0, live(0.0)), (1.0, live(1.0, it_supply_temp=jump))])
    assert out[1]["it_supply_temp"].reason == RATE
    nxt = (2.0, live(2.0, it_supply_temp=jump + 0.02))
    out = run([(0.0, live(0.0)), (1.0, live(1.0, it_supply_temp=jump)), nxt])
    assert out[2]["it_supply_temp"].valid  # the next scan, checks armed and passing


def test_an_implausible_supply_stays_untrusted_until_it_agrees_for_the_settle_time() -> None:
    """The dry-cooler outlet answers the fans at once, the supply after the loop's transport
    time: a stuck-cold reading that looks plausible for a moment right after IL-02 sped the
    fans up is not trusted again until the checks have passed for the settle time."""
    settle = VCFG.plausibility_settle_s
    frames = [(float(t), live(float(t))) for t in range(0, int(settle) + 2)]
    t0 = frames[-1][0] + 1.0
    stuck = {"it_supply_temp": 20.0}
    frames.append((t0, live(t0, drycooler_out_temp=30.0, **stuck)))  # implausible
    frames += [
        (t0 + k, live(t0 + k, drycooler_out_temp=21.0, it_supply_temp=20.0 + 0.01 * (k % 2)))
        for k in range(1, int(settle) + 3)
    ]
    out = run(frames, VCFG)
    after = [(t - t0, p["it_supply_temp"].reason) for (t, _), p in zip(frames, out, strict=True)]
    after = [(k, r) for k, r in after if k >= 0]
    assert all(r == IMPLAUSIBLE for k, r in after if k < settle)
    assert after[-1][1] == ""


def test_stuck_at_20_supply_on_a_warming_plant_reaches_il02_within_its_response_time() -> None:
    """Closed loop on the plant model: the supply sensor sticks at 20 °C (with the 0.01 K jitter
    of a live ADC, so the frozen check cannot see it) while the plant warms from a 20 °C start.
    The controller believes the supply is cold and keeps the fans low; once the reading is
    implausible (more than the band below the dry-cooler outlet, the loop loaded and settled),
    IL-02 must act within its response time. The true supply never reaches the limit."""
    site = SITE
    cfg = SupervisorConfig.from_site(site)
    plant = site.plant.model_copy(update={"initial_primary_temp_c": 20.0})
    dt = 0.5
    state = initial(plant, 0, site.sim.start_day * 86400.0)
    sup = Supervisor(cfg, 0.0)
    outputs = dict(site.safe_outputs())
    il02 = RULES_BY_ID["IL-02"]
    loaded_s, implausible_at, acted_at, peak = 0.0, None, None, -math.inf
    t = 0.0
    while t < 4 * 3600.0 and acted_at is None:
        meas = measure(state)
        meas["it_supply_temp"] = 20.0 + 0.01 * (int(t / dt) % 2)  # stuck, with ADC jitter
        d = sup.step(image_of(meas, t), t)
        outputs = d.values()
        # the oracle, from the specification: loaded and flowing for the settle time, then the
        # reading more than the band below the outlet
        flowing = float(meas["primary_flow"]) > site.interlocks.primary_flow_low_m3h
        loaded = flowing and float(meas["it_power"]) >= MIN_KW
        loaded_s = loaded_s + dt if loaded else 0.0
        if (
            implausible_at is None
            and loaded_s > VCFG.plausibility_settle_s + dt
            and meas["it_supply_temp"] < float(meas["drycooler_out_temp"]) - BAND
        ):
            implausible_at = t
        if "IL-02" in d.active:
            acted_at = t
        state = step(state, outputs, dt)
        peak = max(peak, state.it_supply_temp_c)
        t += dt
    assert implausible_at is not None, "the plant never warmed past the band"
    assert acted_at is not None
    assert acted_at - implausible_at <= il02.response_s
    assert d.invalid["it_supply_temp"] == IMPLAUSIBLE
    assert d.outputs["drycooler_fan_cmd"].value == 100.0
    assert peak < site.interlocks.it_supply_high_c


# ---- supervised inputs ----------------------------------------------------------------

SUPERVISED_TAG = """
[tags.leak_reuse_fault]
direction = "input"
type = "bool"
unit = "bool"
range = [0.0, 1.0]
description = "Leak detection module: reuse zone cable fault"
modbus = { table = "discrete", address = 60, encoding = "bit" }
fail_state = true
"""


def supervised_site():
    text = demo_site_text()
    head = "[tags.leak_reuse]\n"
    assert head in text
    text = text.replace(head, head + 'supervised_by = "leak_reuse_fault"\n')
    return loads_site(text + SUPERVISED_TAG)


SUP_CFG = SupervisorConfig.from_site(supervised_site())


def test_a_supervised_input_is_invalid_while_its_supervisor_is_true_or_unknown() -> None:
    cfg = SUP_CFG.validation
    assert cfg.supervised == (("leak_reuse", "leak_reuse_fault"),)
    ok = check(image(0.0, leak_reuse_fault=False), cfg=cfg)
    assert ok["leak_reuse"] == (False, True, "")
    cut = check(image(0.0, leak_reuse_fault=True), cfg=cfg)
    assert cut["leak_reuse"] == (False, False, SUPERVISION)
    unknown = check(image(0.0, leak_reuse_fault=math.nan), cfg=cfg)
    assert unknown["leak_reuse"].reason == SUPERVISION
    # the leak input itself unreadable too (a PLC link blip): its own reason, not a cut cable
    both = image(
        0.0,
        leak_reuse=Sample(None, Quality.COMMS_LOST, 0.0),
        leak_reuse_fault=Sample(None, Quality.COMMS_LOST, 0.0),
    )
    assert check(both, cfg=cfg)["leak_reuse"].reason == QUALITY


def test_a_zone_faulted_by_supervision_latches_like_a_wet_one_and_refuses_its_reset() -> None:
    sup = Supervisor(SUP_CFG)
    d = sup.step(live(0.0, leak_reuse_fault=False), 0.0)
    assert not d.latched
    d = sup.step(live(1.0, leak_reuse_fault=True), 1.0)  # cable cut: the zone is blind
    assert "IL-04" in d.latched and d.outputs["secondary_pump_cmd"].value is False
    d = sup.step(live(2.0, leak_reuse_fault=True), 2.0, Commands(reset=True))
    assert "IL-04" in d.latched and sup.mode is Mode.LEAK_TRIP
    d = sup.step(live(3.0, leak_reuse_fault=False), 3.0, Commands(reset=True))
    assert "IL-04" not in d.latched  # cable repaired, zone valid and dry: reset accepted


def test_a_cut_cable_on_a_fail_state_wet_input_latches() -> None:
    tags = {t.name: t for t in SITE.inputs}
    for leak in ("leak_primary", "leak_reuse"):
        assert tags[leak].fail_state is True  # de-energise-to-trip: a cut cable reads wet
    sup = Supervisor(CFG)
    d = sup.step(live(0.0, leak_reuse=tags["leak_reuse"].fail_state), 0.0)
    assert "IL-04" in d.latched
    d = sup.step(live(1.0, leak_reuse=tags["leak_reuse"].fail_state), 1.0, Commands(reset=True))
    assert "IL-04" in d.latched


# ---- a forced input is taken at its forced value ---------------------------------------


def forced(value: object, at_s: float) -> Sample:
    return Sample(value, Quality.FORCED, at_s)  # as the engineer's force replaces the reading


def test_a_forced_supply_of_50_raises_il01_not_a_rate_fault() -> None:
    """35 °C to a forced 50 °C in one scan is faster than any loop warms (the rate check would
    call it a broken sensor, IL-02); forced, it is the value: IL-01 after its delay."""
    assert SITE.interlocks.it_supply_high_c < 50.0
    assert VCFG.max_rate_k_per_s < (50.0 - 35.0) / 1.0
    sup = Supervisor(CFG)
    d = None
    for t in range(0, 5):
        d = sup.step(live(float(t)), float(t))
    for t in range(5, 5 + int(RULES_BY_ID["IL-01"].delay_s) + 2):
        d = sup.step(live(float(t), it_supply_temp=forced(50.0, float(t))), float(t))
        assert "it_supply_temp" not in d.invalid
    assert d is not None and "IL-01" in d.active and "IL-02" not in d.active
    assert d.outputs["drycooler_fan_cmd"].value == 100.0


def test_a_forced_value_held_flat_past_the_frozen_window_is_not_frozen() -> None:
    window = VCFG.frozen_s
    frames = [(float(t), live(float(t))) for t in range(3)]
    frames += [
        (t, live(t, it_supply_temp=forced(30.0, t))) for t in (3.0, 3.0 + window, 4.0 + 2 * window)
    ]
    out = run(frames, VCFG)
    assert all(p["it_supply_temp"] == (30.0, True, "") for p in out[3:])
    # the same flat line from the real sensor is frozen
    real = run(
        [(0.0, live(0.0, it_supply_temp=30.0)), (window + 1, live(window + 1, it_supply_temp=30.0))]
    )
    assert real[-1]["it_supply_temp"].reason == FROZEN


def test_a_forced_supply_is_not_judged_implausible_nor_remembered_so() -> None:
    """Colder than the dry-cooler outlet by more than the band, checks armed: the real reading
    is implausible (IL-02), the forced one is the engineer's value and stays valid."""
    cold = 35.0 - BAND - 5.0
    img = live(0.0, it_supply_temp=cold)
    assert check(img)["it_supply_temp"].reason == IMPLAUSIBLE
    pts, mem = validate(live(0.0, it_supply_temp=forced(cold, 0.0)), EMPTY_MEMORY, 0.0, ARMED, True)
    assert pts["it_supply_temp"] == (cold, True, "") and not mem.implausible


def test_the_real_signal_after_a_force_starts_anew_and_keeps_its_distrust() -> None:
    """Forced to 50 for a while, then released to the real 35: no rate fault from the jump back
    (the force's value never entered the real signal's memory). A sensor that held a rate
    fault before the force still holds it after (low load: nothing can clear it)."""
    low = {"it_power": MIN_KW / 2}
    mem = EMPTY_MEMORY
    for t in range(3):
        _, mem = validate(live(float(t)), mem, float(t), ARMED, True)
    for t in range(3, 6):
        pts, mem = validate(live(float(t), it_supply_temp=forced(50.0, t)), mem, t, ARMED, True)
        assert pts["it_supply_temp"].valid
    pts, mem = validate(live(6.0), mem, 6.0, ARMED, True)
    assert pts["it_supply_temp"].valid

    jump = 35.0 - 1.5 * VCFG.max_rate_k_per_s
    mem = EMPTY_MEMORY
    for t, img in [(0.0, live(0.0, **low)), (1.0, live(1.0, it_supply_temp=jump, **low))]:
        pts, mem = validate(img, mem, t, ARMED, True)
    assert pts["it_supply_temp"].reason == RATE
    pts, mem = validate(live(2.0, it_supply_temp=forced(30.0, 2.0), **low), mem, 2.0, ARMED, True)
    assert pts["it_supply_temp"].valid and "it_supply_temp" in mem.rate_faulted
    for t in (3.0, 4.0):
        pts, mem = validate(live(t, it_supply_temp=jump + t / 100, **low), mem, t, ARMED, True)
        assert pts["it_supply_temp"].reason == RATE  # still distrusted once released


def test_a_forced_wet_leak_input_trips_il04_through_the_rule() -> None:
    sup = Supervisor(CFG)
    d = sup.step(live(0.0), 0.0)
    d = sup.step(live(1.0, leak_reuse=forced(True, 1.0)), 1.0)
    assert d.latched == {"IL-04"} and sup.mode is Mode.LEAK_TRIP
    assert [e.source for e in d.events if e.kind == "trip_latched"] == ["IL-04"]
    assert d.outputs["secondary_pump_cmd"].value is False
    assert d.outputs["reuse_isolation_cmd"].value is False


def test_a_forced_supervised_input_is_valid_whatever_its_fault_contact_reads() -> None:
    cfg = SUP_CFG.validation
    img = image(0.0, leak_reuse=forced(False, 0.0), leak_reuse_fault=True)
    assert check(img, cfg=cfg)["leak_reuse"] == (False, True, "")
    # the real reading on the same faulted contact is not trusted
    assert check(image(0.0, leak_reuse_fault=True), cfg=cfg)["leak_reuse"].reason == SUPERVISION


@pytest.mark.parametrize(
    ("value", "reason"), [(math.nan, "nan"), (500.0, "range"), ("50", TYPE), (True, TYPE)]
)
def test_a_forced_value_still_needs_its_kind_and_range(value: object, reason: str) -> None:
    """A force replaces the judgement of the signal, not the sanity of the value: a forced NaN
    or an out-of-range number is invalid, so the supply falls to IL-02 (more cooling)."""
    assert check(image(0.0, it_supply_temp=forced(value, 0.0)))["it_supply_temp"].reason == reason
