"""The supervisor's state as data: snapshots that replay bit for bit, and restart memory.

Invariant first: a supervisor restored from a snapshot taken at any scan (through a JSON round
trip, as the flight recorder stores it) decides exactly what the original decides at every
later scan: outputs with their levels and reasons, mode, events, faults, everything, NaN
included. Restart memory is the smaller promise of DESIGN §5: after a restart the mode begins
at STARTUP, but what the plant has shown to be broken stays known.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.arbitration import Manual
from controller.modes import Mode
from controller.supervisor import (
    DC_FOLLOW_S,
    Commands,
    Decision,
    Supervisor,
    SupervisorConfig,
)
from interlocks.rules import RULES
from plc_io.image import Quality, Sample
from tests.unit.core_helpers import CFG, SITE, live, plant_like
from tests.unit.test_supervisor_properties import manuals, setpoints

# short times, so a few dozen scans meet dwell ends, pump and valve verdicts, retries, hunting
QUICK = replace(
    CFG,
    timing=replace(
        CFG.timing,
        min_dwell_s=2.0,
        reject_dwell_s=3.0,
        customer_ready_dwell_s=2.0,
        reuse_reentry_min_s=5.0,
        hunting_changes_per_h=3,
    ),
    pump_fail_s=3.0,
    valve_follow_s=4.0,
    valve_retry_s=30.0,
)
RULE_IDS = [r.id for r in RULES]
OUTPUT_NAMES = [t.name for t in SITE.outputs]


def canon(x: object) -> object:
    """A comparable form that tells 1 from 1.0 from True and finds NaN equal to NaN."""
    if isinstance(x, Enum):
        return ("enum", type(x).__name__, x.value)
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, float):
        return ("float", repr(x))
    if isinstance(x, int):
        return ("int", x)
    if isinstance(x, str) or x is None:
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (
            type(x).__name__,
            [(f.name, canon(getattr(x, f.name))) for f in dataclasses.fields(x)],
        )
    if isinstance(x, dict | Mapping):
        return ("map", sorted(((canon(k), canon(v)) for k, v in x.items()), key=repr))
    if isinstance(x, frozenset | set):
        return ("set", sorted((canon(v) for v in x), key=repr))
    if isinstance(x, tuple | list):
        return (type(x).__name__, [canon(v) for v in x])
    raise TypeError(f"canon: {type(x).__name__}")


INTERNALS = (
    "il",
    "memory",
    "fan_pi",
    "fan_pi_out",
    "last",
    "invalid",
    "blocked_names",
    "refused",
    "pump_fail_since",
    "pump_failed",
    "dc_failed",
    "dc_why",
    "dc_remembered",
    "dc_not_cooling_since",
    "blocked_total",
    "was_hunting",
    "write_failed",
    "degraded",
    "tank_full",
    "valve_off_since",
    "valve_fault",
    "valve_fault_at",
    "plc_tripped_since",
    "plc_hold",
)


def internals(sup: Supervisor) -> object:
    m = sup.machine
    machine = (m.mode, m.since_s, m.reject_clear_since, m.ready_since, m.left_reuse_s)
    return canon([machine, list(m.changes), m.hunting, *(getattr(sup, name) for name in INTERNALS)])


def through_json(snap: dict) -> dict:
    return json.loads(json.dumps(snap, allow_nan=True))


# ---- the property: snapshot anywhere, continue bit for bit -------------------------

temps = st.one_of(st.floats(-30.0, 130.0), st.sampled_from([math.nan, 35.0, 44.0, 46.0, 50.0]))
qualities = st.sampled_from(list(Quality))
rarely_true = st.sampled_from([False, False, False, False, True])
image_changes = st.fixed_dictionaries(
    {},
    optional={
        "leak_reuse": rarely_true,
        "leak_primary": rarely_true,
        "customer_ready": st.booleans(),
        "tank_bottom_temp": st.floats(20.0, 80.0),
        "tank_top_temp": st.floats(40.0, 95.0),
        "it_supply_temp": temps,
        "it_return_temp": temps,
        "primary_flow": st.floats(0.0, 30.0),
        "primary_pump_a_running": st.booleans(),
        "primary_pump_b_running": st.booleans(),
        "secondary_pump_running": st.booleans(),
        "reuse_valve_pos": st.floats(0.0, 100.0),
        "drycooler_out_temp": st.floats(-10.0, 60.0),
        "ambient_temp": st.floats(-20.0, 40.0),
        "drycooler_fault": st.booleans(),
        "it_power": st.floats(0.0, 300.0),
        "plc_watchdog_tripped": st.sampled_from([False, True, True]),
    },
)
# tag -> quality of its sample this scan (stale, forced, comms lost...)
quality_changes = st.dictionaries(
    st.sampled_from(
        [
            "it_supply_temp",
            "it_return_temp",
            "leak_reuse",
            "tank_bottom_temp",
            "plc_watchdog_tripped",
        ]
    ),
    qualities,
    max_size=2,
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[Commands, dict[str, float]]:
    """Commands, with bypass expiries as offsets from the scan's time (added in the test)."""
    reset = draw(
        st.one_of(
            st.booleans(),
            st.frozensets(st.sampled_from([*RULE_IDS, "IL-99"]), max_size=3),
        )
    )
    bypass = draw(
        st.dictionaries(
            st.sampled_from([*RULE_IDS, "IL-99"]), st.floats(-10.0, 20_000.0), max_size=2
        )
    )
    cmds = Commands(
        reset=reset,
        request_reject=draw(st.integers(0, 5)) == 0,
        maintenance=draw(st.integers(0, 8)) == 0,
        manual=draw(st.one_of(st.just({}), manuals)),
        supply_setpoint_c=draw(setpoints),
        link_ok=draw(st.integers(0, 10)) != 0,
        write_failed=draw(st.frozensets(st.sampled_from(OUTPUT_NAMES), max_size=2)),
        degraded=tuple(
            draw(st.lists(st.sampled_from(["journal cannot persist", "x"]), max_size=1))
        ),
    )
    return cmds, bypass


scans = st.lists(
    st.tuples(
        st.sampled_from([0.25, 1.0, 2.0, 5.0, 30.0, 150.0]),
        image_changes,
        quality_changes,
        st.one_of(st.just((Commands(), {})), commands()),
    ),
    min_size=1,
    max_size=40,
)


def frame(now: float, last: Decision | None, changes: dict, quals: dict):
    img = dict(changes)
    for tag, q in quals.items():
        base = plant_like(now, last, **changes)[tag]
        img[tag] = Sample(base.value, q, now)
    return plant_like(now, last, **img)


def with_bypass(cmds: Commands, bypass: dict[str, float], now: float) -> Commands:
    return replace(cmds, bypasses={k: now + v for k, v in bypass.items()}) if bypass else cmds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(warmup=st.integers(0, 30), scans=scans, data=st.data())
def test_a_restored_snapshot_decides_bit_for_bit_alike(warmup: int, scans: list, data) -> None:
    sup = Supervisor(QUICK, 0.0)
    now, d = 0.0, None
    for _ in range(warmup):  # some examples start from reuse, others from start-up
        now += 1.0
        d = sup.step(plant_like(now, d), now)
    at = data.draw(st.integers(0, len(scans) - 1), label="snapshot before scan")
    twin: Supervisor | None = None
    d_twin = None
    for i, (dt, changes, quals, (cmds, bypass)) in enumerate(scans):
        if i == at:
            snap = sup.snapshot()
            twin, d_twin = Supervisor.from_snapshot(QUICK, through_json(snap)), d
            assert canon(through_json(twin.snapshot())) == canon(through_json(snap))
            assert internals(twin) == internals(sup)  # the same types too: tuples, sets, enums
        now += dt
        c = with_bypass(cmds, bypass, now)
        d = sup.step(frame(now, d, changes, quals), now, c)
        if twin is not None:
            d_twin = twin.step(frame(now, d_twin, changes, quals), now, c)
            assert canon(d_twin) == canon(d), f"scan {i} after a snapshot before scan {at}"
    assert twin is not None
    assert canon(through_json(twin.snapshot())) == canon(through_json(sup.snapshot()))


def test_snapshot_is_json_with_nan_and_infinities() -> None:
    """A fresh supervisor holds -inf (no valve fault yet) and, after a NaN supply, NaN."""
    sup = Supervisor(CFG, 0.0)
    sup.step(live(1.0, it_supply_temp=math.nan), 1.0)
    text = json.dumps(sup.snapshot(), allow_nan=True)
    assert "-Infinity" in text
    back = Supervisor.from_snapshot(CFG, json.loads(text))
    assert back.valve_fault_at == -math.inf and back.mode is Mode.STARTUP


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (lambda s: s.pop("mode"), "mode is missing"),
        (lambda s: s.__setitem__("version", 99), "version is 99, expected 1"),
        (lambda s: s["mode"].__setitem__("mode", "PARTY"), "mode.mode is 'PARTY'"),
        (
            lambda s: s["mode"].__setitem__("since_s", "10"),
            "mode.since_s is '10', expected a number",
        ),
        (lambda s: s["interlocks"].__setitem__("latched", "IL-04"), "interlocks.latched"),
        (
            lambda s: s["validation"]["last"].__setitem__("it_supply_temp", [1, 2]),
            "validation.last.it_supply_temp",
        ),
        (
            lambda s: s["last"].__setitem__("reuse_valve_cmd", [1.0, "BOSS", ""]),
            "last.reuse_valve_cmd",
        ),
        (lambda s: s.__setitem__("tank_full", 1), "tank_full is 1, expected true or false"),
        (
            lambda s: s.__setitem__("blocked_total", 1.5),
            "blocked_total is 1.5, expected an integer",
        ),
        (lambda s: s.__setitem__("refused", [["a", "b"]]), "refused"),
    ],
)
def test_a_bad_snapshot_is_refused_naming_the_key(mutate, names: str) -> None:
    sup = Supervisor(CFG, 0.0)
    d = None
    for t in range(1, 5):
        d = sup.step(plant_like(float(t), d), float(t))
    snap = through_json(sup.snapshot())
    mutate(snap)
    with pytest.raises(ValueError, match="supervisor snapshot") as e:
        Supervisor.from_snapshot(CFG, snap)
    assert names in str(e.value)
    assert "\n" not in str(e.value)


def test_not_a_snapshot_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="expected an object"):
        Supervisor.from_snapshot(CFG, ["not", "a", "snapshot"])


# ---- restart memory: what a user would notice after a restart -------------------------


def reusing(cfg: SupervisorConfig = CFG) -> tuple[Supervisor, float, Decision]:
    sup = Supervisor(cfg, 0.0)
    t, d = 0.0, None
    while sup.mode is not Mode.NORMAL_REUSE:
        t += 1.0
        d = sup.step(plant_like(t, d), t)
        assert t < 10_000.0, "never reached NORMAL_REUSE"
    assert d is not None
    return sup, t, d


def restarted(sup: Supervisor, now: float, new_now: float) -> Supervisor:
    """The supervisor a restart builds: memory through JSON, a fresh clock `new_now`."""
    memory = through_json(sup.restart_memory(now))
    return Supervisor(CFG, new_now, memory=memory)


def test_a_latched_leak_trip_is_still_latched_after_a_restart() -> None:
    sup, t, d = reusing()
    d = sup.step(plant_like(t + 1, d, leak_reuse=True), t + 1)
    assert d.latched == {"IL-04"}
    new = restarted(sup, t + 1, 5.0)  # the monotonic clock began anew
    assert new.mode is Mode.STARTUP and new.latched == {"IL-04"}
    d = None
    for i in range(1, 20):  # dry now, but nobody reset it
        d = new.step(plant_like(5.0 + i, d), 5.0 + i)
    assert new.mode is Mode.LEAK_TRIP and d is not None and d.latched == {"IL-04"}
    assert d.values()["secondary_pump_cmd"] is False and d.values()["reuse_valve_cmd"] == 0.0


def test_a_failed_secondary_pump_is_not_retried_after_a_restart() -> None:
    sup, t, d = reusing()
    for i in range(1, int(CFG.pump_fail_s) + 3):
        d = sup.step(plant_like(t + i, d, secondary_pump_running=False), t + i)
    assert "secondary pump failed" in d.reject_reasons
    new = restarted(sup, t + i, 0.0)
    d, entered = None, 0
    for k in range(1, 4 * 3600, 5):  # long past every dwell and re-entry interval
        d = new.step(plant_like(float(k), d, secondary_pump_running=False), float(k))
        entered += any(e.kind == "mode_changed" and e.source == "NORMAL_REUSE" for e in d.events)
    assert entered == 0, "reuse was tried again on a pump known to be dead"
    assert "secondary pump failed" in d.reject_reasons
    assert d.faults["pump:secondary_pump_running"]
    assert not [e for e in d.events if e.kind == "pump_failed"]  # known, not found again


def test_a_failed_duty_pump_stays_failed_and_the_standby_runs_after_a_restart() -> None:
    sup, t, d = reusing()
    for i in range(1, int(CFG.pump_fail_s) + 3):
        d = sup.step(plant_like(t + i, d, primary_pump_a_running=False), t + i)
    assert "primary_pump_a_running" in sup.pump_failed
    new = restarted(sup, t + i, 0.0)
    d = new.step(plant_like(1.0, None, primary_pump_a_running=False), 1.0)
    assert d.values()["primary_pump_b_cmd"] is True  # duty to the standby from the first scan
    assert "pump:primary_pump_a_running" in d.faults


def test_a_valve_fault_keeps_its_retry_clock_across_a_restart() -> None:
    """Faulted 1000 s before the restart: reuse is retried only valve_retry_s after the fault,
    so 2600 s into the new run, not at once and not 3600 s after the restart."""
    cfg = CFG
    sup, t, d = reusing()
    i = 0
    while not sup.valve_fault:
        i += 1
        d = sup.step(plant_like(t + i, d, reuse_valve_pos=0.0), t + i)  # stuck shut
        assert i < 1000
    fault_at = t + i
    for k in range(1, 1000):  # stuck shut in the reject mode: it follows 0 % again
        d = sup.step(plant_like(fault_at + k, d, reuse_valve_pos=0.0), fault_at + k)
    now = fault_at + 1000.0
    memory = through_json(sup.restart_memory(now))
    assert memory["valve_fault_age_s"] == 1000.0
    new = Supervisor(cfg, 50.0, memory=memory)
    retry_at = 50.0 + cfg.valve_retry_s - 1000.0  # on the new clock
    d, entered = None, None
    s = 50.0
    while s < 50.0 + cfg.valve_retry_s + cfg.timing.reuse_reentry_min_s:
        s += 5.0
        d = new.step(plant_like(s, d), s)
        if s < retry_at:
            assert "reuse valve not following its command" in d.reject_reasons, s
            assert "valve" in d.faults
        if entered is None and new.mode is Mode.NORMAL_REUSE:
            entered = s
    assert entered is not None and retry_at <= entered < 50.0 + cfg.valve_retry_s


def test_a_failed_dry_cooler_stays_failed_across_a_restart_until_it_can_be_judged() -> None:
    """Failed because its outlet did not follow the fans at 100 %: after the restart the
    verdict stands (the HX stays the first sink, the fault is still shown, no new event) while
    the fans run low and nothing can be judged; with the fans high it is confirmed while the
    outlet stays warm, and clears (one event) once the outlet follows."""
    sup, t, d = reusing()
    fans = Commands(manual={"drycooler_fan_cmd": Manual(100.0, t + 3600.0, "eng")})
    amb, ret = 20.0, 45.0
    warm = {"ambient_temp": amb, "drycooler_out_temp": amb + 0.9 * (ret - amb)}
    for i in range(1, int(DC_FOLLOW_S) + 5):
        d = sup.step(plant_like(t + i, d, **warm), t + i, fans)
    assert sup.dc_failed and "drycooler" in d.faults
    new = restarted(sup, t + i, 0.0)
    d = None
    for k in range(1, 30):  # the supply at its setpoint: the fan loop runs low
        d = new.step(plant_like(float(k), d, **warm), float(k))
        assert "drycooler" in d.faults and not [e for e in d.events if "drycooler" in e.kind]
    assert d.values()["drycooler_fan_cmd"] < 90.0
    fans = Commands(manual={"drycooler_fan_cmd": Manual(100.0, 1000.0, "eng")})
    for k in range(30, 40):  # fans high, outlet still warm: confirmed, no event either way
        d = new.step(plant_like(float(k), d, **warm), float(k), fans)
        assert "drycooler" in d.faults and not [e for e in d.events if "drycooler" in e.kind]
    d = new.step(plant_like(40.0, d, ambient_temp=amb, drycooler_out_temp=25.0), 40.0, fans)
    assert [e.kind for e in d.events if "drycooler" in e.kind] == ["drycooler_recovered"]
    assert "drycooler" not in d.faults


def test_restart_memory_is_json_and_a_fresh_supervisor_remembers_nothing() -> None:
    sup = Supervisor(CFG, 0.0)
    mem = sup.restart_memory(0.0)
    assert json.loads(json.dumps(mem, allow_nan=False)) == mem
    assert mem == {
        "latched": [],
        "pumps_failed": [],
        "valve_fault": False,
        "valve_fault_age_s": None,
        "valve_off_s": None,
        "drycooler_failed": False,
        "drycooler_why": "",
    }
    new = Supervisor(CFG, 0.0, memory=mem)
    assert canon(through_json(new.snapshot())) == canon(through_json(sup.snapshot()))


def test_latches_from_the_journal_and_from_memory_are_both_kept() -> None:
    new = Supervisor(CFG, 0.0, frozenset({"IL-05"}), memory={"latched": ["IL-04"]})
    assert new.latched == {"IL-04", "IL-05"}


@pytest.mark.parametrize(
    ("memory", "names"),
    [
        ({"latched": "IL-04"}, "latched is 'IL-04', expected a list of strings"),
        ({"latched": ["IL-99"]}, "latched holds ['IL-99']"),
        ({"pumps_failed": ["primary_pump_c_running"]}, "pumps_failed holds"),
        ({"valve_fault_age_s": -5.0}, "valve_fault_age_s is -5.0, expected seconds >= 0"),
        ({"valve_fault_age_s": "1h"}, "valve_fault_age_s is '1h'"),
        ({"valve_off_s": math.inf}, "valve_off_s is inf"),
        ({"drycooler_failed": "yes"}, "drycooler_failed is 'yes', expected true or false"),
        ([1, 2], "supervisor memory is [1, 2], expected an object"),
    ],
)
def test_bad_restart_memory_is_refused_naming_the_key(memory: object, names: str) -> None:
    with pytest.raises(ValueError) as e:
        Supervisor(CFG, 0.0, memory=memory)  # type: ignore[arg-type]
    assert names in str(e.value) and "\n" not in str(e.value)


def test_a_manual_value_survives_a_snapshot_as_the_same_type() -> None:
    """An integer manual value is written as an integer; the restored last outputs keep it."""
    sup, t, d = reusing()
    man = Commands(manual={"reuse_valve_cmd": Manual(40, t + 100.0, "eng")})
    d = sup.step(plant_like(t + 1, d), t + 1, man)
    back = Supervisor.from_snapshot(CFG, through_json(sup.snapshot()))
    assert type(back.last["reuse_valve_cmd"].value) is int
    assert canon(back.last) == canon(sup.last)
