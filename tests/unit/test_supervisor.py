"""The supervisor step on hand-built images: runtime faults, refused requests, pumps, events.

Each test drives a `Supervisor` scan by scan on a fake clock (the scan time is an argument) and
asserts the whole decision a user would see: reject reasons, events, outputs and their levels.
"""

from __future__ import annotations

from controller.modes import Mode
from controller.supervisor import Commands, Decision, Supervisor
from tests.unit.core_helpers import CFG, live, plant_like


def reusing(now_s: float = 0.0) -> tuple[Supervisor, float]:
    """A supervisor driven on a healthy image until it reuses heat; returns it and the time."""
    sup = Supervisor(CFG, now_s)
    t, d = now_s, None
    while sup.mode is not Mode.NORMAL_REUSE:
        d = sup.step(plant_like(t, d), t)
        t += 1.0
        assert t < 10_000.0, "never reached NORMAL_REUSE"
    return sup, t


def kinds(d: Decision, kind: str) -> list[dict[str, object]]:
    return [dict(e.detail) for e in d.events if e.kind == kind]


# ---- Commands.write_failed and Commands.degraded (filled by the runtime) -------------------


def test_unacknowledged_writes_reject_reuse_with_one_event_per_change() -> None:
    sup, t = reusing()
    failed = frozenset({"secondary_pump_cmd", "heartbeat"})
    d = sup.step(live(t), t, Commands(write_failed=failed))
    assert "outputs not acknowledged: heartbeat, secondary_pump_cmd" in d.reject_reasons
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert kinds(d, "write_failed") == [{"outputs": ["heartbeat", "secondary_pump_cmd"]}]
    # the same set next scan: no new event
    d = sup.step(live(t + 1), t + 1, Commands(write_failed=failed))
    assert not kinds(d, "write_failed") and d.reject_reasons
    # a different set: one event
    d = sup.step(live(t + 2), t + 2, Commands(write_failed=frozenset({"heartbeat"})))
    assert kinds(d, "write_failed") == [{"outputs": ["heartbeat"]}]
    d = sup.step(live(t + 3), t + 3, Commands())
    assert kinds(d, "write_recovered") == [{"was": ["heartbeat"]}]
    assert not any("not acknowledged" in r for r in d.reject_reasons)
    d = sup.step(live(t + 4), t + 4, Commands())
    assert not kinds(d, "write_recovered")


def test_degraded_runtime_rejects_reuse_with_its_text_and_one_event_each_way() -> None:
    sup, t = reusing()
    cmds = Commands(degraded=("journal cannot persist",))
    d = sup.step(live(t), t, cmds)
    assert "journal cannot persist" in d.reject_reasons
    assert sup.mode is Mode.DRY_COOLER_REJECT
    assert kinds(d, "degraded") == [{"faults": ["journal cannot persist"]}]
    d = sup.step(live(t + 1), t + 1, cmds)
    assert not kinds(d, "degraded")
    d = sup.step(live(t + 2), t + 2, Commands())
    assert kinds(d, "degraded_cleared") == [{"was": ["journal cannot persist"]}]
    assert "journal cannot persist" not in d.reject_reasons
