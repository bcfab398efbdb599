"""The commissioning plan and its judge: steps generated from the rule table, recipes that make
the intended rule fire (checked against the plant model in the closed loop), and a judge whose
verdict follows from the observations alone (hypothesis timelines)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import commission_plan as cp
from controller.commission_plan import Method, Observation, PlanError, Step
from interlocks.rules import RULES, RULES_BY_ID
from interlocks.validation import Point
from plc_io.site import Site, demo_site_text, loads_site
from plc_io.tags import Value
from sim import faults as sim_faults
from sim.plc_faults import PLC_FAULT_NAMES, CommsFaults
from tests.hil.procs import set_key
from tests.unit.core_helpers import HEALTHY

SITE = loads_site(demo_site_text())
ROOT = Path(__file__).resolve().parents[2]
RULE_IDS = [r.id for r in RULES]
# outputs of a plant in NORMAL_REUSE: every one of them away from its safe value but the pumps A
# and its speed (the safe state runs the primary pumps)
RUNNING: dict[str, Value] = {
    "reuse_valve_cmd": 50.0,
    "drycooler_fan_cmd": 40.0,
    "primary_pump_speed_cmd": 80.0,
    "secondary_pump_speed_cmd": 80.0,
    "heartbeat": 7.0,
    "primary_pump_a_cmd": True,
    "primary_pump_b_cmd": False,
    "secondary_pump_cmd": True,
    "customer_isolation_cmd": True,
    "reuse_isolation_cmd": True,
}


def site_text(*edits: tuple[str, str, object]) -> str:
    """The demo site's text with `key = value` set in `[section]` (added when absent)."""
    text = demo_site_text()
    for section, key, value in edits:
        try:
            text = set_key(text, section, key, value)
        except KeyError:
            head = f"[{section}]\n"
            assert head in text
            text = text.replace(head, f"{head}{key} = {json.dumps(value)}\n", 1)
    return text


def site_with(*edits: tuple[str, str, object]) -> Site:
    return loads_site(site_text(*edits))


def forceable(text: str, tag: str) -> str:
    """The site text with `forceable = true` in `[tags.<tag>]` (inserted or switched on)."""
    head = f"[tags.{tag}]\n"
    assert head in text
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    body = text[start:end]
    if "forceable" in body:
        return text
    return text[:start] + "forceable = true\n" + text[start:]


def obs(
    t: float = 0.0,
    *,
    inputs: Mapping[str, Value | None] | None = None,
    outputs: Mapping[str, Value | None] | None = None,
    mode: str | None = "NORMAL_REUSE",
    active: tuple[str, ...] = (),
    latched: tuple[str, ...] = (),
    bypassed: tuple[str, ...] = (),
    levels: Mapping[str, str] | None = None,
    plc_ok: bool = True,
    link_ok: bool = True,
    status_t: float | None = None,
    **changes: Value | None,
) -> Observation:
    ins: dict[str, Value | None] = dict(HEALTHY if inputs is None else inputs)
    ins.update(changes)
    return Observation(
        t=t,
        plc_ok=plc_ok,
        inputs=ins,
        outputs=dict(RUNNING if outputs is None else outputs),
        mode=mode,
        active=frozenset(active),
        latched=frozenset(latched),
        bypassed=frozenset(bypassed),
        levels=dict(levels or {}),
        link_ok=link_ok,
        status_t=t if status_t is None else status_t,
    )


def step_of(sid: str, site: Site = SITE, method: Method = Method.SIM) -> Step:
    return next(s for s in cp.plan(site, method=method) if s.id == sid)


# ---- plan ----------------------------------------------------------------------------------


def test_steps_follow_the_rule_table_then_the_watchdog() -> None:
    steps = cp.plan(SITE)
    assert [s.id for s in steps] == [*RULE_IDS, "WD"]
    for s in steps[:-1]:
        r = RULES_BY_ID[s.id]
        assert s.kind == "rule"
        assert (s.hazard, s.cause_text, s.delay_s, s.latching, s.reset_text) == (
            r.hazard,
            r.cause_text,
            r.delay_s,
            r.latching,
            r.reset.text,
        )
        assert s.effect_text.startswith(r.effect_text)
        if s.id != "IL-08":
            assert s.required_s == r.response_s
    assert steps[-1].kind == "watchdog"


def test_every_default_rule_has_a_sim_recipe_the_simulator_accepts() -> None:
    """The fault names are copied as strings (the controller may not import the plant): each
    must be one the simulated PLC takes, with a valid target and value."""
    for s in cp.plan(SITE)[:-1]:
        assert s.sim, s.id
        assert "sim" not in s.why_not, s.id
        before = obs()
        for a in cp.sim_actions(s, before, SITE):
            if a.name in PLC_FAULT_NAMES:
                CommsFaults().inject(a.name, a.target, a.value, 0.0)
            else:
                sim_faults.check(a.name, a.target, a.value)


def test_the_expects_are_the_rules_effects_with_the_sites_thresholds() -> None:
    site = site_with(("control", "fan_min_pct", 15.0), ("control", "primary_pump_speed_pct", 70.0))
    il09 = step_of("IL-09", site)
    assert {e.output: e.values for e in il09.expects} == {
        "drycooler_fan_cmd": (15.0,),
        "primary_pump_a_cmd": (True,),
    }
    il01 = {e.output: e.values for e in step_of("IL-01", site).expects}
    assert il01["primary_pump_speed_cmd"] == (70.0,)
    # a conditional effect with a value otherwise accepts both; one without is not checked
    assert il01["reuse_valve_cmd"] == (100.0, 0.0)
    assert "secondary_pump_cmd" not in il01
    assert "secondary_pump_cmd" in step_of("IL-01", site).effect_text


def test_feedback_follows_the_effects_within_the_sites_follow_times() -> None:
    site = site_with(("control", "valve_follow_s", 90.0), ("control", "pump_fail_s", 7.0))
    fb = {f.tag: f for f in step_of("IL-04", site).feedback}
    assert fb["reuse_valve_pos"].within_s == 90.0
    assert fb["reuse_valve_pos"].test(9.0) and not fb["reuse_valve_pos"].test(11.0)
    assert fb["secondary_pump_running"].within_s == 7.0
    assert fb["secondary_pump_running"].test(False) and not fb["secondary_pump_running"].test(True)
    il03 = {f.tag for f in step_of("IL-03").feedback}
    assert il03 == {"primary_pump_a_running", "primary_pump_b_running"}
    assert step_of("IL-07").feedback == ()  # no input confirms the customer valve


def test_forced_follows_forceable_on_the_site() -> None:
    steps = {s.id: s for s in cp.plan(SITE, method=Method.FORCED)}
    assert steps["IL-04"].forced == (cp.InputForce("leak_reuse", True),)
    assert steps["IL-05"].forced == (cp.InputForce("leak_primary", True),)
    why = steps["IL-01"].why_not["forced"]
    assert "it_supply_temp" in why and "[tags.it_supply_temp] forceable = true" in why
    assert steps["IL-09"].why_not["forced"] == (
        "ambient_temp, drycooler_out_temp are not forceable on this site; the site's "
        "[tags.ambient_temp] forceable = true and [tags.drycooler_out_temp] forceable = true "
        "allow it"
    )
    text = forceable(
        forceable(forceable(demo_site_text(), "it_supply_temp"), "ambient_temp"),
        "drycooler_out_temp",
    )
    site = loads_site(text)
    steps = {s.id: s for s in cp.plan(site, method=Method.FORCED)}
    assert steps["IL-01"].forced is not None and "forced" not in steps["IL-01"].why_not
    assert steps["IL-01"].forced[0].value > site.interlocks.it_supply_high_c
    assert steps["IL-09"].forced is not None
    # a force is a valid value, and a link cannot be forced, whatever the site allows
    assert steps["IL-02"].forced is None and "valid value" in steps["IL-02"].why_not["forced"]
    assert steps["IL-08"].forced is None and "link" in steps["IL-08"].why_not["forced"]


def test_forced_values_make_the_cause_true_and_stay_valid() -> None:
    text = demo_site_text()
    for tag in ("it_supply_temp", "ambient_temp", "drycooler_out_temp"):
        text = forceable(text, tag)
    site = loads_site(text)
    th = cp.thresholds(site)
    for s in cp.plan(site, method=Method.FORCED):
        if s.forced is None:
            continue
        pts = {k: Point(v, True) for k, v in HEALTHY.items()}
        for f in s.forced:
            t = site.tag(f.tag)
            if not t.is_bool:
                assert t.lo < float(f.value) < t.hi, (s.id, f)
            pts[f.tag] = Point(f.value, True)
        assert RULES_BY_ID[s.id].cause(pts, th), s.id


def test_only_selects_in_table_order_and_names_unknown_ids() -> None:
    assert [s.id for s in cp.plan(SITE, only=["WD", "IL-04"])] == ["IL-04", "WD"]
    with pytest.raises(PlanError) as e:
        cp.plan(SITE, only=["IL-04", "IL-99"])
    msg = str(e.value)
    assert "'IL-99'" in msg and "IL-01" in msg and "WD" in msg and "\n" not in msg


def test_only_naming_a_step_the_method_cannot_test_is_an_error() -> None:
    with pytest.raises(PlanError) as e:
        cp.plan(SITE, only=["IL-02"], method=Method.FORCED)
    msg = str(e.value)
    assert "'IL-02'" in msg and "forced" in msg and "sim, physical" in msg
    # unnamed, it is returned with its reason (the runner records it not_testable)
    il02 = step_of("IL-02", method=Method.FORCED)
    assert not il02.testable(Method.FORCED) and il02.testable(Method.SIM)
    with pytest.raises(PlanError, match="IL-08"):
        cp.plan(SITE, only=["IL-08"], method=Method.FORCED)
    with pytest.raises(PlanError, match="method"):
        cp.plan(SITE, method="heartbeat_hold")  # type: ignore[arg-type]


def test_the_watchdog_step_expects_exactly_the_sites_safe_values() -> None:
    for site in (SITE, site_with(("plc", "watchdog_s", 2.5))):
        wd = step_of("WD", site)
        safe = {k: v for k, v in site.safe_outputs().items() if k != "heartbeat"}
        assert {e.output: e.values for e in wd.expects} == {k: (v,) for k, v in safe.items()}
        assert wd.required_s == site.plc.watchdog_s + cp.WD_MARGIN_S
        il08 = step_of("IL-08", site)
        assert il08.expects == wd.expects
        assert il08.required_s == wd.required_s
    text = demo_site_text().replace(
        'description = "Primary pump speed"\nsafe = 80.0',
        'description = "Primary pump speed"\nsafe = 70.0',
    )
    wd = step_of("WD", loads_site(text))
    assert dict((e.output, e.values) for e in wd.expects)["primary_pump_speed_cmd"] == (70.0,)


def test_the_ramp_stays_below_the_rate_check() -> None:
    for rate in (5.0, 2.0):
        site = site_with(("interlocks", "max_rate_k_per_s", rate))
        ramps = [a.ramp_k_per_s for a in step_of("IL-01", site).sim or () if a.ramp_k_per_s]
        assert len(ramps) == 3
        # a runner stepping once a scan shows the controller at most twice the ramp rate
        assert all(2 * r < rate for r in ramps)


def test_sim_actions_offset_from_the_as_found_reading() -> None:
    il01 = step_of("IL-01")
    before = obs(it_supply_temp=33.0)
    acts = cp.sim_actions(il01, before, SITE)
    target = SITE.interlocks.it_supply_high_c + cp.SUPPLY_SIM_MARGIN_K
    assert [a.target for a in acts] == ["it_supply_temp", "it_return_temp", "drycooler_out_temp"]
    assert all(a.value == pytest.approx(target - 33.0) and a.relative_to is None for a in acts)
    with pytest.raises(PlanError, match="it_supply_temp"):
        cp.sim_actions(il01, obs(it_supply_temp=None), SITE)
    no_sim = replace(il01, sim=None, why_not={"sim": "no simulator here"})
    with pytest.raises(PlanError, match=r"IL-01.*no simulator here"):
        cp.sim_actions(no_sim, before, SITE)
    assert cp.sim_actions(step_of("IL-08"), before, SITE)[0].value == SITE.plc.watchdog_s + 3.0


def intended(step: Step, before: Observation) -> Observation:
    """The observation the step's sim recipe means to produce (plant reaction aside)."""
    ins = dict(before.inputs)
    plc_ok = True
    for a in cp.sim_actions(step, before, SITE):
        if a.name == "sensor_bias":
            ins[a.target] = float(ins[a.target]) + a.value  # type: ignore[arg-type]
        elif a.name == "sensor_fail":
            ins[a.target] = -327.68  # the simulated PLC's wire-break reading (raw minimum)
        elif a.name == "leak":
            ins[f"leak_{a.target}"] = True
        elif a.name == "ambient_override":
            ins["ambient_temp"] = a.value
        elif a.name == "comms_drop":
            plc_ok = False
    return replace(before, inputs=ins, plc_ok=plc_ok)


def test_cause_present_agrees_with_the_rule_on_the_recipes_intended_values() -> None:
    th = cp.thresholds(SITE)
    before = obs()
    for s in cp.plan(SITE)[:-1]:
        assert not cp.cause_present(s, before, SITE), s.id
        after = intended(s, before)
        assert cp.cause_present(s, after, SITE), s.id
        if s.id == "IL-08":
            continue
        rule = RULES_BY_ID[s.id]
        pts = {
            t.name: Point(
                after.inputs.get(t.name),
                after.inputs.get(t.name) is not None
                and (t.is_bool or t.lo <= float(after.inputs[t.name]) <= t.hi),  # type: ignore[arg-type]
            )
            for t in SITE.inputs
        }
        assert rule.cause(pts, th), s.id
        # the readings stay valid (in range), so a sensor-validation rule is not what fires
        for t in SITE.inputs:
            if s.id != "IL-02" and not t.is_bool:
                assert pts[t.name].valid, (s.id, t.name)


def test_il01_keeps_the_plausibility_relations() -> None:
    """Supply below return and not more than the band below the dry-cooler outlet: the same
    offset on all three keeps both relations as found."""
    before = obs()
    after = intended(step_of("IL-01"), before)
    sup, ret, out = (
        float(after.inputs[k]) for k in ("it_supply_temp", "it_return_temp", "drycooler_out_temp")
    )  # type: ignore[arg-type]
    assert sup < ret
    assert sup >= out - SITE.interlocks.plausibility_band_k
    assert sup > SITE.interlocks.it_supply_high_c


# ---- rule table hash -------------------------------------------------------------------------


def test_rule_table_hash_is_stable_across_processes() -> None:
    code = (
        "from plc_io.site import demo_site; from controller.commission_plan import "
        "rule_table_hash; print(rule_table_hash(demo_site()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == cp.rule_table_hash(SITE)
    assert len(cp.rule_table_hash(SITE)) == 64


def test_rule_table_hash_changes_with_a_threshold_only() -> None:
    h = cp.rule_table_hash(SITE)
    assert cp.rule_table_hash(site_with(("interlocks", "it_supply_high_c", 46.0))) != h
    assert cp.rule_table_hash(site_with(("control", "fan_min_pct", 12.0))) != h
    assert cp.rule_table_hash(site_with(("interlocks", "max_bypass_s", 3600))) != h
    # settings the rule table does not read leave it alone
    assert cp.rule_table_hash(site_with(("plc", "port", 5021))) == h
    assert cp.rule_table_hash(site_with(("control", "reject_dwell_s", 300))) == h


# ---- preconditions, cause, normal ------------------------------------------------------------


def test_a_healthy_running_plant_meets_every_precondition() -> None:
    for s in cp.plan(SITE):
        assert cp.preconditions(s, obs(), SITE) == [], s.id


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"plc_ok": False}, "tool cannot read"),
        ({"link_ok": False}, "controller reports its link lost"),
        ({"status_t": -2.5}, "2.5 s old"),
        ({"active": ("IL-07",)}, "active: IL-07"),
        ({"latched": ("IL-05",)}, "latched: IL-05"),
        ({"bypassed": ("IL-06",)}, "IL-06 is bypassed"),
        ({"mode": "LEAK_TRIP"}, "mode LEAK_TRIP"),
        ({"mode": "STARTUP"}, "mode STARTUP"),
        ({"mode": "MAINTENANCE"}, "mode MAINTENANCE"),
        ({"mode": None}, "mode unknown"),
        ({"secondary_pressure": 6.0}, "already present"),
        ({"secondary_pressure": None}, "secondary_pressure: unreadable"),
        ({"tank_top_temp": math.nan}, "tank_top_temp: nan"),
        ({"tank_top_temp": 150.0}, "tank_top_temp: 150"),
    ],
)
def test_each_precondition_problem_is_named(change: dict[str, object], words: str) -> None:
    kw = {
        k: v for k, v in change.items() if k in Observation.__dataclass_fields__ or k == "status_t"
    }
    ins = {k: v for k, v in change.items() if k not in kw}
    o = obs(**kw, **ins)  # type: ignore[arg-type]
    probs = cp.preconditions(step_of("IL-06"), o, SITE)
    assert any(words in p for p in probs), probs


def test_status_never_read_is_a_problem() -> None:
    o = replace(obs(), status_t=None)
    assert any("no controller status" in p for p in cp.preconditions(step_of("IL-04"), o, SITE))


def test_a_bypass_of_another_rule_does_not_stop_this_step() -> None:
    assert cp.preconditions(step_of("IL-04"), obs(bypassed=("IL-06",)), SITE) == []


def test_watchdog_preconditions() -> None:
    wd = step_of("WD")
    assert cp.preconditions(wd, obs(), SITE) == []
    assert any("active" in p for p in cp.preconditions(wd, obs(active=("IL-09",)), SITE))
    assert any("link" in p for p in cp.preconditions(wd, obs(link_ok=False), SITE))
    safe = {**RUNNING, **SITE.safe_outputs()}
    probs = cp.preconditions(wd, obs(outputs=safe), SITE)
    assert any("safe value already" in p and "cannot be seen" in p for p in probs)


def test_cause_present_reads_the_raw_inputs_as_the_rule_does() -> None:
    il05 = step_of("IL-05")
    assert cp.cause_present(il05, obs(leak_primary=True), SITE)
    assert not cp.cause_present(il05, obs(leak_primary=False), SITE)
    il03 = step_of("IL-03")
    low = SITE.interlocks.primary_flow_low_m3h
    assert cp.cause_present(il03, obs(primary_flow=low - 0.1), SITE)
    assert cp.cause_present(il03, obs(primary_flow=None), SITE)  # unknown counts as low
    assert cp.cause_present(il03, obs(primary_flow=-5.0), SITE)  # out of range: unknown
    assert not cp.cause_present(il03, obs(primary_flow=low + 0.1), SITE)
    il02 = step_of("IL-02")
    assert cp.cause_present(il02, obs(it_supply_temp=math.nan), SITE)
    assert cp.cause_present(il02, obs(it_supply_temp=True), SITE)  # wrong kind
    assert not cp.cause_present(il02, obs(), SITE)
    assert cp.cause_present(step_of("IL-08"), obs(plc_ok=False), SITE)
    assert not cp.cause_present(step_of("WD"), obs(plc_ok=False), SITE)


def test_a_supervised_leak_input_with_its_fault_contact_true_is_a_leak() -> None:
    text = demo_site_text().replace(
        "[tags.leak_reuse]\n", '[tags.leak_reuse]\nsupervised_by = "drycooler_fault"\n'
    )
    site = loads_site(text)
    il04 = step_of("IL-04", site)
    assert cp.cause_present(il04, obs(leak_reuse=False, drycooler_fault=True), site)
    assert not cp.cause_present(il04, obs(leak_reuse=False, drycooler_fault=False), site)


def test_already_in_place_names_the_outputs_a_step_cannot_prove() -> None:
    il07 = step_of("IL-07")
    assert cp.already_in_place(il07, obs()) == []
    closed = {**RUNNING, "customer_isolation_cmd": False}
    assert cp.already_in_place(il07, obs(outputs=closed)) == ["customer_isolation_cmd"]
    assert cp.already_in_place(step_of("IL-03"), obs()) == ["primary_pump_a_cmd"]


def test_normal() -> None:
    assert cp.normal(obs()) == []
    assert cp.normal(obs(mode="DRY_COOLER_REJECT")) == []
    for o, words in [
        (obs(plc_ok=False), "PLC link"),
        (obs(link_ok=False), "PLC link"),
        (obs(active=("IL-03",)), "IL-03"),
        (obs(latched=("IL-04",)), "IL-04"),
        (obs(mode="LEAK_TRIP"), "LEAK_TRIP"),
        (obs(mode="STARTUP"), "STARTUP"),
    ]:
        assert any(words in p for p in cp.normal(o)), o


# ---- judge: examples -------------------------------------------------------------------------


def il04_timeline(
    valve_at: float | None, pos_at: float | None, end: float = 130.0
) -> list[Observation]:
    """IL-04 applied at t = 0: the isolation arrives at `valve_at` (None: never), the valve's
    position follows at `pos_at`."""
    out = []
    t = 0.0
    while t <= end:
        tripped = valve_at is not None and t >= valve_at
        outputs = dict(RUNNING)
        if tripped:
            outputs.update(
                reuse_valve_cmd=0.0,
                secondary_pump_cmd=False,
                reuse_isolation_cmd=False,
                customer_isolation_cmd=False,
            )
        pos = 3.0 if pos_at is not None and t >= pos_at else 64.8
        out.append(
            obs(
                t,
                outputs=outputs,
                leak_reuse=True,
                reuse_valve_pos=pos,
                secondary_pump_running=not tripped,
                active=("IL-04",) if tripped else (),
                latched=("IL-04",) if tripped else (),
                mode="LEAK_TRIP" if tripped else "NORMAL_REUSE",
                levels={"reuse_valve_cmd": "interlock"} if tripped else {},
            )
        )
        t += 0.5
    return out


def test_judge_passes_a_clean_trip() -> None:
    step = step_of("IL-04")
    r = cp.judge(
        step, Method.SIM, 0.0, il04_timeline(0.5, 40.0), obs(), SITE, "sim fault leak/reuse = 1"
    )
    assert r.result == "passed", r.failures
    assert r.response_s == 0.5
    assert r.rule_active and r.latched
    assert r.mode_before == "NORMAL_REUSE" and r.mode_during == "LEAK_TRIP"
    e = {x.output: x for x in r.effects}["reuse_valve_cmd"]
    assert (e.before, e.as_found, e.at_s, e.level, e.ok) == (50.0, 0.0, 0.5, "interlock", True)
    j = r.to_json()
    assert json.loads(json.dumps(j, allow_nan=False)) == j
    keys = (
        "id kind hazard cause effect method applied required_s response_s effects feedback "
        "rule_active latched mode_before mode_during reset restored back_to_normal mode_after "
        "result failures comment started_wall ended_wall"
    )
    assert set(j) == set(keys.split())


def test_judge_fails_a_late_response_and_a_stuck_valve() -> None:
    step = step_of("IL-04")
    r = cp.judge(step, Method.SIM, 0.0, il04_timeline(1.5, 40.0), obs(), SITE, "")
    assert r.result == "failed"
    assert "reuse_valve_cmd: 0 % after 1.5 s, expected 0 % within 1 s" in r.failures
    r = cp.judge(step, Method.SIM, 0.0, il04_timeline(0.5, None), obs(), SITE, "")
    assert r.result == "failed"
    assert r.failures == ("reuse_valve_pos: as found 64.8 %, expected ≤ 10 % within 120 s",)


def test_judge_fails_a_rule_that_never_went_active_or_latched() -> None:
    step = step_of("IL-04")
    tl = [replace(o, active=frozenset(), latched=frozenset()) for o in il04_timeline(0.5, 40.0)]
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert "IL-04 never went active" in r.failures and "IL-04 did not latch" in r.failures


def test_judge_fails_when_the_plc_link_is_lost_mid_step() -> None:
    step = step_of("IL-04")
    tl = il04_timeline(0.5, 40.0)
    tl[10] = replace(tl[10], plc_ok=False, outputs={}, inputs={})
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "failed" and r.failures[0] == "PLC link lost mid-step"


def test_a_non_latching_rule_is_judged_while_its_cause_stands() -> None:
    """IL-07 clears by design once the customer supply cools again; the effects are judged up
    to then, and a feedback not yet due is not proven (no failure)."""
    step = step_of("IL-07")
    hot = SITE.interlocks.customer_supply_high_c + 3.0
    tl = []
    for k in range(40):
        t = k * 0.5
        cause = t < 10.0
        on = 2.0 <= t < 10.5
        outputs = {**RUNNING, "customer_isolation_cmd": not on}
        tl.append(
            obs(
                t,
                outputs=outputs,
                customer_supply_temp=hot if cause else 60.0,
                active=("IL-07",) if on else (),
            )
        )
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "passed", r.failures
    assert r.response_s == 2.0
    # a forced cause does not show at the PLC inputs: the whole window counts
    r = cp.judge(step, Method.FORCED, 0.0, tl, obs(), SITE, "")
    assert r.result == "failed"


def test_il08_is_judged_on_the_links_return() -> None:
    step = step_of("IL-08")
    safe = {**RUNNING, **SITE.safe_outputs()}
    tl = [obs(0.0)]
    tl += [obs(t, plc_ok=False, link_ok=False, inputs={}, outputs={}) for t in (0.5, 3.0, 6.0)]
    tl.append(
        obs(
            6.5,
            outputs=safe,
            plc_watchdog_tripped=True,
            plc_watchdog_trips=1.0,
            mode="DRY_COOLER_REJECT",
        )
    )
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "sim fault comms_drop = 6")
    assert r.result == "passed", r.failures
    assert r.rule_active and r.response_s is None
    notes = {e.output: e.note for e in r.effects}
    already = {k for k, v in RUNNING.items() if SITE.safe_outputs().get(k) == v}
    assert already == {"primary_pump_a_cmd", "primary_pump_speed_cmd"}
    for out, note in notes.items():
        want = "not proven: already" if out in already else "seen at its safe value"
        assert note.startswith(want), (out, note)
    # the trip visible during the outage (the simulator's instrument view) is timed
    tl2 = list(tl)
    tl2[2] = replace(tl2[2], inputs={"plc_watchdog_tripped": True})
    r = cp.judge(step, Method.SIM, 0.0, tl2, obs(), SITE, "")
    assert r.result == "passed" and r.response_s == 3.0
    tl3 = list(tl)
    tl3[3] = replace(tl3[3], inputs={"plc_watchdog_tripped": True})  # 6 s: too late
    r = cp.judge(step, Method.SIM, 0.0, tl3, obs(), SITE, "")
    assert r.result == "failed" and r.response_s == 6.0
    # a PLC that did not fall back, or did not count the trip
    bad = list(tl)
    bad[-1] = replace(bad[-1], outputs=dict(RUNNING))
    r = cp.judge(step, Method.SIM, 0.0, bad, obs(), SITE, "")
    assert any(f.startswith("reuse_valve_cmd: as found 50 %") for f in r.failures)
    bad[-1] = replace(tl[-1], inputs={**HEALTHY, "plc_watchdog_trips": 0.0})
    r = cp.judge(step, Method.SIM, 0.0, bad, obs(), SITE, "")
    assert any("plc_watchdog_trips" in f for f in r.failures)
    # nothing was held, so nothing is said about a hold-off or a release
    assert not any("release" in f for f in r.failures)
    r = cp.judge(step, Method.SIM, 0.0, [obs(0.0), obs(3.0)], obs(), SITE, "")
    assert "the PLC link did not go down (the cause was not applied)" in r.failures
    assert "the controller's PLC link did not go down" in r.failures


def test_il08_a_release_before_the_tool_reads_again_counts_by_the_trip_counter() -> None:
    """The tool's own connection may come back after the PLC has already released its safe
    hold: the trip counter is then the evidence; without one mapped, the step fails."""
    step = step_of("IL-08")
    tl = [obs(0.0), obs(3.0, plc_ok=False, link_ok=False, inputs={}, outputs={})]
    tl.append(obs(9.0, plc_watchdog_tripped=False, plc_watchdog_trips=1.0))
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "passed", r.failures
    moved = [e for e in r.effects if not e.note.startswith("not proven: already")]
    assert moved and all("plc_watchdog_trips rose from 0 to 1" in e.note for e in moved)
    tl[-1] = replace(tl[-1], inputs={**HEALTHY, "plc_watchdog_trips": 0.0})
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "failed"
    assert any(f.startswith("reuse_valve_cmd: as found 50 %") for f in r.failures)


def test_an_effect_already_in_place_is_marked_not_proven() -> None:
    isolated = {
        **RUNNING,
        "reuse_valve_cmd": 0.0,
        "secondary_pump_cmd": False,
        "reuse_isolation_cmd": False,
        "customer_isolation_cmd": False,
    }
    tl = il04_timeline(0.5, 40.0)
    before = obs(outputs=isolated, mode="DRY_COOLER_REJECT")
    r = cp.judge(step_of("IL-04"), Method.SIM, 0.0, tl, before, SITE, "")
    assert all(e.ok and e.note == cp.ALREADY for e in r.effects)


def test_a_value_the_sequence_set_responds_only_once_the_interlock_holds_it() -> None:
    """IL-01's fans: a slowly rising supply drives them to 100 % through the sequence before the
    limit is crossed; the rule has responded when the controller says the interlock holds them."""
    step = step_of("IL-04")
    outs = {e.output for e in step.expects}
    tl = [
        replace(o, levels={k: "interlock" if o.t >= 0.5 else "sequence" for k in outs})
        for o in il04_timeline(0.0, 40.0)
    ]
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "passed" and r.response_s == pytest.approx(0.5)
    late = [replace(o, levels=dict.fromkeys(outs, "sequence")) for o in tl]
    r = cp.judge(step, Method.SIM, 0.0, late, obs(), SITE, "")
    assert r.result == "failed" and r.response_s is None
    # an output that changes at the cause is timed by the PLC reads, not by the status poll
    lagging = [
        replace(o, levels={k: "interlock" if o.t >= 1.0 else "sequence" for k in outs})
        for o in il04_timeline(0.5, 40.0)
    ]
    r = cp.judge(step, Method.SIM, 0.0, lagging, obs(), SITE, "")
    assert r.result == "passed" and r.response_s == pytest.approx(0.5)


def test_not_run_records_why() -> None:
    s = step_of("IL-02", method=Method.FORCED)
    r = cp.not_run(s, Method.FORCED, "not_testable", s.why_not["forced"])
    j = r.to_json()
    assert j["result"] == "not_testable" and j["failures"] == [s.why_not["forced"]]
    assert j["method"] == "forced"
    assert cp.not_run(step_of("WD"), Method.SIM, "skipped", "").method == "heartbeat_hold"


def test_non_finite_values_stay_json() -> None:
    step = step_of("IL-04")
    tl = il04_timeline(0.5, 40.0)
    tl[-1] = replace(tl[-1], outputs={**tl[-1].outputs, "reuse_valve_cmd": math.nan})
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    assert r.result == "failed"
    json.dumps(r.to_json(), allow_nan=False)


# ---- judge: properties -------------------------------------------------------------------

SIMPLE = replace(step_of("IL-04"), feedback=())
OUTS = [e.output for e in SIMPLE.expects]
DT = 0.25


@st.composite
def timelines(draw: st.DrawFn) -> tuple[float, list[Observation], dict[str, list[bool]]]:
    """Per output, whether it shows an accepted value at each observation (0.25 s apart)."""
    n = draw(st.integers(1, 30))
    required = draw(st.sampled_from([0.5, 1.0, 2.0, 5.0]))
    oks = {o: draw(st.lists(st.booleans(), min_size=n, max_size=n)) for o in OUTS}
    tl = []
    for k in range(n):
        outputs = dict(RUNNING)
        for o in OUTS:
            want = next(e for e in SIMPLE.expects if e.output == o).values[0]
            wrong: Value = (not want) if isinstance(want, bool) else 50.0
            outputs[o] = want if oks[o][k] else wrong
        tl.append(obs(k * DT, outputs=outputs, active=("IL-04",), latched=("IL-04",)))
    return required, tl, oks


def first_kept(seq: list[bool]) -> int | None:
    first = None
    for i in range(len(seq) - 1, -1, -1):
        if not seq[i]:
            break
        first = i
    return first


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines())
def test_judge_passes_iff_every_expect_arrives_in_time_and_stays(
    case: tuple[float, list[Observation], dict[str, list[bool]]],
) -> None:
    required, tl, oks = case
    step = replace(SIMPLE, required_s=required)
    r = cp.judge(step, Method.SIM, 0.0, tl, obs(), SITE, "")
    firsts = {o: first_kept(seq) for o, seq in oks.items()}
    arrived = all(f is not None for f in firsts.values())
    on_time = arrived and all(f * DT <= required for f in firsts.values())  # type: ignore[operator]
    assert (r.result == "passed") == on_time, (r.failures, firsts)
    if arrived:
        assert r.response_s == max(f * DT for f in firsts.values())  # type: ignore[operator]
    else:
        assert r.response_s is None
        assert r.result == "failed"
    for e in r.effects:
        f = firsts[e.output]
        assert e.at_s == (None if f is None else f * DT)
        # a flicker is not a response: the value at the end decides whether any came
        assert (e.at_s is not None) == oks[e.output][-1]
    assert len(r.failures) == sum(not e.ok for e in r.effects)


WD = step_of("WD")
HOLDOFF = SITE.plc.watchdog_holdoff_s
PROVEN = [e for e in WD.expects if not e.accepts(RUNNING.get(e.output))]


def wd_timeline(
    safe_at: Mapping[str, float | None], release_at: float | None, t_resume: float, end: float
) -> list[Observation]:
    tl = []
    t = 0.0
    trip_times = [x for x in safe_at.values() if x is not None]
    tripped_from = min(trip_times) if trip_times else None
    while t <= end + 1e-9:
        outputs = dict(RUNNING)
        released = release_at is not None and t >= release_at
        for e in PROVEN:
            at = safe_at[e.output]
            if at is not None and t >= at and not released:
                outputs[e.output] = e.values[0]
        tripped = tripped_from is not None and t >= tripped_from and not released
        tl.append(
            obs(
                round(t, 3),
                outputs=outputs,
                plc_watchdog_tripped=tripped,
                plc_watchdog_trips=1.0 if tripped_from is not None and t >= tripped_from else 0.0,
            )
        )
        t += DT
    return tl


@st.composite
def wd_cases(draw: st.DrawFn) -> tuple[dict[str, float | None], float | None, float]:
    t_resume = draw(st.sampled_from([5.0, 6.0, 8.0]))
    safe_at = {
        e.output: draw(
            st.one_of(st.none(), st.integers(0, int(t_resume / DT) - 1).map(lambda k: k * DT))
        )
        for e in PROVEN
    }
    release = draw(st.one_of(st.none(), st.integers(0, 40).map(lambda k: t_resume + k * DT)))
    return safe_at, release, t_resume


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wd_cases())
def test_judge_watchdog_passes_iff_safe_in_time_held_and_released(
    case: tuple[dict[str, float | None], float | None, float],
) -> None:
    safe_at, release, t_resume = case
    end = t_resume + HOLDOFF + cp.RELEASE_SLACK_S + 1.0
    tl = wd_timeline(safe_at, release, t_resume, end)
    r = cp.judge_watchdog(WD, 0.0, t_resume, tl, obs(), SITE)
    times = list(safe_at.values())
    all_safe = all(x is not None for x in times)
    in_time = all_safe and all(x <= WD.required_s for x in times)  # type: ignore[operator]
    held = release is None or release >= t_resume + HOLDOFF - cp.WD_MARGIN_S
    released = release is not None and release <= t_resume + HOLDOFF + cp.RELEASE_SLACK_S
    ok = in_time and held and released
    assert (r.result == "passed") == ok, (r.failures, case)
    if all_safe:
        assert r.response_s == max(times)  # type: ignore[type-var]
    else:
        assert r.response_s is None


def test_a_broken_watchdog_fails_the_proof_test() -> None:
    never = {e.output: None for e in PROVEN}
    tl = wd_timeline(never, None, 6.0, 12.0)
    r = cp.judge_watchdog(WD, 0.0, 6.0, tl, obs(), SITE)
    assert r.result == "failed"
    assert (
        "reuse_valve_cmd: as found 50 %, not at its safe value 0 % within 4 s of the heartbeat hold"
        in r.failures
    )
    assert any("plc_watchdog_tripped" in f for f in r.failures)
    assert any("plc_watchdog_trips" in f for f in r.failures)


def test_outputs_already_safe_are_not_proven_but_not_failed() -> None:
    at = {e.output: 3.0 for e in PROVEN}
    tl = wd_timeline(at, 8.5, 6.0, 12.0)
    r = cp.judge_watchdog(WD, 0.0, 6.0, tl, obs(), SITE)
    assert r.result == "passed", r.failures
    already = [e for e in r.effects if e.note]
    assert {e.output for e in already} == {"primary_pump_a_cmd", "primary_pump_speed_cmd"}
    assert all(e.ok and "already at its safe value" in e.note for e in already)
    assert r.response_s == 3.0


def test_a_premature_or_missing_release_fails() -> None:
    at = {e.output: 3.0 for e in PROVEN}
    r = cp.judge_watchdog(WD, 0.0, 6.0, wd_timeline(at, 6.25, 6.0, 12.0), obs(), SITE)
    assert any(f.startswith("PLC released 0.25 s after the heartbeat resumed") for f in r.failures)
    r = cp.judge_watchdog(WD, 0.0, 6.0, wd_timeline(at, None, 6.0, 12.0), obs(), SITE)
    assert any("did not release" in f for f in r.failures)


# ---- the recipes against the plant model, in the closed loop ------------------------------


@pytest.fixture(scope="module")
def warm_loop():  # type: ignore[no-untyped-def]
    from tests.unit.closed_loop_helpers import settled

    loop = settled()
    loop.dt_s = SITE.scan.period_s
    return loop


def loop_obs(loop) -> Observation:  # type: ignore[no-untyped-def]
    from sim.plant import measure

    d = loop.decision
    ins = {
        k: (bool(v) if type(v).__name__ in ("bool", "bool_") else float(v))
        for k, v in measure(loop.state).items()
    }
    return Observation(
        t=loop.elapsed_s,
        plc_ok=True,
        inputs=ins,
        outputs=dict(loop.outputs),
        mode=d.mode.value,
        active=frozenset(d.active),
        latched=frozenset(d.latched),
        bypassed=frozenset(d.bypassed),
        levels={k: o.level.name.lower() for k, o in d.outputs.items()},
        link_ok=True,
        status_t=loop.elapsed_s,
    )


def run_recipe(loop, step: Step) -> tuple[cp.StepResult, set[str]]:  # type: ignore[no-untyped-def]
    """What the runner does with a sim step, in-process: ramp or inject the faults, take t0 at
    the first observation showing the cause, observe until every feedback was due, judge."""
    from tests.unit.closed_loop_helpers import Watch

    w = Watch(loop)
    w.run(2.0)
    before = loop_obs(loop)
    assert cp.preconditions(step, before, SITE) == []
    acts = cp.sim_actions(step, before, SITE)
    ramped = {a: 0.0 for a in acts if a.ramp_k_per_s}
    for a in acts:
        if not a.ramp_k_per_s:
            w.inject(a.name, a.target, a.value)
    window = max([step.required_s] + [f.within_s for f in step.feedback]) + 2.0
    t0, seen, tl = None, set(), []
    while t0 is None or tl[-1].t < t0 + window:
        for a in ramped:
            d = a.ramp_k_per_s * loop.dt_s
            ramped[a] = min(a.value, ramped[a] + d) if a.value > 0 else max(a.value, ramped[a] - d)
            w.inject(a.name, a.target, ramped[a])
        w.tick()
        o = loop_obs(loop)
        tl.append(o)
        seen |= o.active
        if t0 is None and cp.cause_present(step, o, SITE):
            t0 = o.t
        assert o.t - before.t < 60.0 or t0 is not None, "the cause never showed"
    r = cp.judge(step, Method.SIM, t0, tl, before, SITE, cp.applied_text(step, Method.SIM, acts))
    return r, seen


@pytest.mark.parametrize("sid", [r for r in RULE_IDS if r != "IL-08"])
def test_each_sim_recipe_makes_its_rule_pass_in_the_closed_loop(warm_loop, sid: str) -> None:  # type: ignore[no-untyped-def]
    """The recipe fires the intended rule through the plant model and the real supervisor,
    and no sensor-validation rule: IL-02 only for IL-02 (a valid signal, not a rate or
    plausibility fault)."""
    loop = copy.deepcopy(warm_loop)
    r, seen = run_recipe(loop, step_of(sid))
    assert r.result == "passed", r.failures
    assert sid in seen
    if sid != "IL-02":
        assert "IL-02" not in seen
    assert r.response_s is not None and r.response_s <= r.required_s


def test_a_stuck_valve_fails_the_leak_step_on_its_feedback(warm_loop) -> None:  # type: ignore[no-untyped-def]
    loop = copy.deepcopy(warm_loop)
    loop.state = sim_faults.inject(loop.state, "valve_stuck", "reuse_valve", 1.0)
    r, _ = run_recipe(loop, step_of("IL-04"))
    assert r.result == "failed"
    assert len(r.failures) == 1 and r.failures[0].startswith("reuse_valve_pos: as found")
    assert all(e.ok for e in r.effects)  # the PLC outputs did their part
