"""The core step: requests, supervisor and alarms together (pure, on made-up times)."""

from __future__ import annotations

import json

from controller.authority import Request
from controller.core import Core, ScanInput, digest
from plc_io.image import Quality
from tests.unit.core_helpers import SITE, live

WALL0 = 1.8e9


def scan(core: Core, t: float, *reqs: Request, link_ok: bool = True, **changes: object):
    img = live(t, **changes)  # type: ignore[arg-type]
    if not link_ok:
        img = img.marked(list(img), Quality.COMMS_LOST, None)
    return core.step(ScanInput(img, t, WALL0 + t, link_ok, requests=tuple(reqs)))


def req(cmd: str, args: dict[str, object], reason: str = "test", n: int = 1) -> Request:
    return Request(f"r{n}", "alice", "engineer", cmd, args, reason)


def test_a_critical_alarm_cannot_be_shelved_and_a_lesser_one_can() -> None:
    core = Core(SITE, 0.0, WALL0)
    for t in range(4):
        scan(core, float(t))
    r = scan(core, 4.0, req("shelve", {"alarm": "IL-04", "minutes": 10}))
    assert not r.answers[0].accepted and "critical" in r.answers[0].why
    r = scan(core, 5.0, req("shelve", {"alarm": "HUNTING", "minutes": 10}, n=2))
    assert r.answers[0].accepted, r.answers[0]


def test_with_the_link_lost_one_plc_alarm_stands_for_every_input() -> None:
    core = Core(SITE, 0.0, WALL0)
    for t in range(3):
        scan(core, float(t))
    r = scan(core, 3.0, link_ok=False)
    standing = {a.id for a in r.alarms.standing()}
    assert "PLC-LINK" in standing and "IL-08" in standing
    assert not any(a.startswith("INPUT:") for a in standing)


def test_an_unknown_alarm_in_an_acknowledgement_is_refused_and_nothing_is_acked() -> None:
    core = Core(SITE, 0.0, WALL0)
    scan(core, 0.0, link_ok=False)
    r = scan(core, 1.0, req("ack", {"alarms": ["PLC-LINK", "NOPE"]}), link_ok=False)
    assert not r.answers[0].accepted and "NOPE" in r.answers[0].why
    assert r.alarms.alarms["PLC-LINK"].state.value == "unacknowledged"


def test_a_core_restored_from_its_snapshot_decides_bit_for_bit_the_same() -> None:
    a = Core(SITE, 0.0, WALL0)
    for t in range(20):
        scan(a, float(t))
    snap = json.loads(json.dumps(a.snapshot(), allow_nan=True))
    b = Core.from_snapshot(SITE, snap)
    latched: set[str] = set()
    for t in range(20, 60):
        changes = {"leak_reuse": True} if 30 <= t < 35 else {}
        reqs = (req("reset", {"rules": []}, n=t),) if t == 45 else ()
        ra, rb = scan(a, float(t), *reqs, **changes), scan(b, float(t), *reqs, **changes)
        assert digest(ra) == digest(rb), t
        latched |= rb.decision.latched
    assert latched == {"IL-04"}  # the window held a trip and its reset
    assert a.latched == b.latched == frozenset()


def test_the_digest_changes_with_what_was_decided() -> None:
    a, b = Core(SITE, 0.0, WALL0), Core(SITE, 0.0, WALL0)
    for t in range(5):
        assert digest(scan(a, float(t))) == digest(scan(b, float(t)))
    ra = scan(a, 5.0)
    rb = scan(b, 5.0, leak_reuse=True)
    assert digest(ra) != digest(rb)
