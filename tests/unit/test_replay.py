"""Replay: a closed-loop run recorded in-process (the core on the simulated plant, a leak trip, an
engineer's reset) re-runs bit for bit; an altered input is named as the first difference; gaps,
restarts and torn segments are reported, never mistaken for a mismatch; the CLI's exit codes.

The expected digests are the ones the core produced when the run was recorded (a reference run
side by side, in the same test), never numbers copied from an earlier run.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import controller.replay as replay_mod
from controller.authority import Request
from controller.core import Core, ScanInput
from controller.recorder import (
    K_HEADER,
    K_RECORDS,
    K_SNAPSHOT,
    Recorded,
    Recorder,
    SegmentState,
    dumps,
    encode_record,
    frame,
    iter_records,
    read_segment,
    segments,
    utc_text,
)
from controller.replay import parse_when, replay, run_replay_cli
from controller.runtime import Controller, inline
from controller.study import DAY_S, image_of
from plc_io.image import Sample
from plc_io.memory import MemoryPlc, MemoryTransport
from plc_io.site import Site, demo_site
from sim import faults
from sim.plant import initial, measure, step
from tests.unit.core_helpers import HEALTHY

WALL0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DT_S = 1.0
LEAK_AT, DRY_AT, RESET_AT, ACK_AT = 600, 700, 760, 620  # scan indexes (seconds at DT_S)
N_SCANS = 3600  # one recorded hour


@dataclass
class Run:
    site: Site
    rec_dir: Path
    walls: list[float] = field(default_factory=list)  # by scan index (seq - 1)
    snapshots: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    recorder: Recorder | None = None


def requests_at(k: int) -> tuple[Request, ...]:
    if k == ACK_AT:
        return (Request("r-ack", "bob", "operator", "ack", {"all": True}, via="cli"),)
    if k == RESET_AT:
        return (Request("r-reset", "alice", "engineer", "reset", {"rules": []}, "leak dried"),)
    return ()


def record_run(
    folder: Path,
    *,
    n: int = N_SCANS,
    hold: range = range(0),
    max_pending: int = 1200,
    wall0: float = WALL0,
    core: Core | None = None,
    rebuild_at: int | None = None,
) -> Run:
    """The simulated plant and the core stepped together, every scan recorded as the runtime
    does: a snapshot when the recorder asks, then the step, then `put`. A reuse-zone leak at
    LEAK_AT dries at DRY_AT; an operator acknowledges at ACK_AT, an engineer resets at
    RESET_AT. No write pass runs during `hold` (the writer falls behind). At `rebuild_at` the
    runtime replaces its core with a new one (as when late-restored latches arrive)."""
    site = demo_site(folder)
    run = Run(site, site.state_dir / "recorder")
    rec = Recorder.for_site(
        site, thread=False, segment_s=300.0, snapshot_every_s=120.0, max_pending=max_pending
    )
    state = initial(site.plant, 0, site.sim.start_day * DAY_S, site.tags)
    core = core if core is not None else Core(site, 0.0, wall0)
    for k in range(n):
        now = k * DT_S
        wall = wall0 + now
        if k == LEAK_AT:
            state = faults.inject(state, "leak", "reuse", 5.0)
        if k == DRY_AT:
            state = faults.clear(state, "leak", "reuse")
        inp = ScanInput(image_of(measure(state), now), now, wall, True, requests=requests_at(k))
        if k == rebuild_at:
            core = Core(site, now, wall)
        if rec.snapshot_due(wall) or k == rebuild_at:
            rec.put_snapshot(wall, core.snapshot())
            run.snapshots.append(wall)
        run.walls.append(wall)
        try:
            result = core.step(inp)
        except Exception:  # as the runtime: the guarded safe values, a fallback record
            rec.put(inp, None, fallback=True)
            run.modes.append("fallback")
            state = step(state, site.safe_outputs(), DT_S)
        else:
            rec.put(inp, result)
            run.modes.append(result.decision.mode.value)
            state = step(state, result.decision.values(), DT_S)
        if k % 20 == 19 and k not in hold:
            rec.drain()
    rec.close()
    run.recorder = rec
    return run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return record_run(tmp_path_factory.mktemp("run"))


def copy_run(run: Run, folder: Path) -> Run:
    """The same recording under another site folder (to alter it)."""
    site = demo_site(folder)
    shutil.copytree(run.rec_dir, site.state_dir / "recorder")
    return replace(run, site=site, rec_dir=site.state_dir / "recorder")


def rewrite(path: Path, change: Callable[[Recorded], Recorded]) -> None:
    """Re-encode one segment with `change` applied to every record: valid frames, valid CRCs,
    so the reader takes the altered value as recorded (this is tampering, not a torn file)."""
    items = list(read_segment(path))
    header = items[0].info  # type: ignore[union-attr]
    st = SegmentState(header["tags"])
    out = [frame(K_HEADER, dumps(header))]
    for item in items[1:]:
        if isinstance(item, Recorded):
            batch: list[object] = []
            r = change(item)
            encode_record(st, r.seq, r, r.digest, r.parts, r.fallback, batch)
            out.append(frame(K_RECORDS, dumps(batch)))
        else:
            out.append(frame(K_SNAPSHOT, dumps({"wall": item.wall_s, "snap": item.snap})))  # type: ignore[union-attr]
    path.write_bytes(b"".join(out))


def test_recorded_leak_trip_replays_bit_for_bit(recorded: Run) -> None:
    """Every scan of a recorded run with a leak trip, an acknowledgement and a reset digests
    exactly as it did when it ran; the timeline shows the trip, the reset and the requests."""
    assert "LEAK_TRIP" in recorded.modes and recorded.modes[-1] == "NORMAL_REUSE"
    report = replay(recorded.site, recorded.rec_dir, WALL0, recorded.walls[-1])
    assert report.ok, report.lines()
    assert (report.scans, report.matched, report.in_window) == (N_SCANS, N_SCANS, N_SCANS)
    assert report.start_wall == WALL0 and not report.warnings and not report.gaps
    text = [t for _, t in report.timeline]
    leak = WALL0 + LEAK_AT * DT_S
    assert (leak, "interlock IL-04 latched") in report.timeline
    assert any(t.endswith("→ LEAK_TRIP") for w, t in report.timeline if w == leak)
    assert (WALL0 + RESET_AT * DT_S, "request r-reset accepted") in report.timeline
    assert (WALL0 + RESET_AT * DT_S, "interlock IL-04 reset") in report.timeline
    assert any(t.startswith("alarm acknowledged") for t in text)
    assert "output reuse_isolation_cmd held at False, now by interlock: IL-04" in text


def test_replay_starts_at_the_last_snapshot_before_the_window(recorded: Run) -> None:
    """A window in the middle: the core is restored from the last snapshot at or before its
    start, the scans from there are stepped and compared, the timeline covers the window."""
    start, end = WALL0 + 650.5, WALL0 + 900.0
    report = replay(recorded.site, recorded.rec_dir, start, end)
    snap = max(w for w in recorded.snapshots if w <= start)
    assert report.ok, report.lines()
    assert report.start_wall == snap
    assert report.scans == sum(snap <= w <= end for w in recorded.walls)
    assert report.in_window == sum(start <= w <= end for w in recorded.walls)
    assert report.timeline[0][0] == WALL0 + 651.0  # the first scan inside the window


def test_altered_input_is_named_as_the_first_difference(recorded: Run, tmp_path: Path) -> None:
    """One recorded input changed in the file (the reuse leak read wet in one scan of
    NORMAL_REUSE): replay names that scan as the first difference and says the mode differs."""
    run = copy_run(recorded, tmp_path)
    k = N_SCANS - 40  # in NORMAL_REUSE, near the end of the run
    assert run.modes[k] == "NORMAL_REUSE"
    seq, wall = k + 1, run.walls[k]
    (seg,) = [p for p in segments(run.rec_dir) if any(
        isinstance(i, Recorded) and i.seq == seq for i in read_segment(p))]  # fmt: skip

    def wet(r: Recorded) -> Recorded:
        if r.seq != seq:
            return r
        s = r.image["leak_reuse"]
        return r._replace(image=r.image.updated({"leak_reuse": Sample(True, s.quality, s.at_s)}))

    rewrite(seg, wet)
    before = {r.seq: r.image for r in iter_records(recorded.rec_dir)}
    after = {r.seq: r.image for r in iter_records(run.rec_dir)}
    assert [s for s in before if dict(before[s]) != dict(after[s])] == [seq]  # only that scan
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert not report.ok and report.first is not None
    assert (report.first.seq, report.first.wall_s) == (seq, wall)
    assert report.matched == k and report.first.index == k
    assert "mode recorded NORMAL_REUSE, replayed LEAK_TRIP" in report.first.what
    out = io.StringIO()
    assert run_replay_cli(run.site, utc_text(WALL0), utc_text(wall + 5), None, out=out) == 1
    assert f"first difference: scan {seq} at {utc_text(wall)}" in out.getvalue()


def test_dropped_scans_are_a_gap_not_a_mismatch(tmp_path: Path) -> None:
    """The writer fell behind and scans were dropped: replay says how many are missing and
    where, resumes at the next snapshot, and every scan it did replay matches."""
    run = record_run(tmp_path, n=600, max_pending=25, hold=range(390, 420))
    assert run.recorder is not None and run.recorder.dropped > 0
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert report.ok, report.lines()
    assert report.differing == 0 and report.matched == report.scans
    assert any(f"{run.recorder.dropped} scans missing" in g for g in report.gaps), report.gaps
    assert any("resumed" in g for g in report.gaps)
    assert report.scans + report.not_replayed + run.recorder.dropped == 600


def test_restart_resumes_at_the_next_snapshot(tmp_path: Path) -> None:
    """Two runs in one ring (a controller restarted from its durable state): the restart is
    reported and replay continues from the new run's first snapshot; everything matches."""
    first = record_run(tmp_path, n=300)
    core = Core(first.site, 0.0, WALL0 + 400.0, restored=None)
    second = record_run(tmp_path, n=300, wall0=WALL0 + 400.0, core=core)
    report = replay(first.site, first.rec_dir, WALL0, second.walls[-1])
    assert report.ok, report.lines()
    assert report.scans == 600 and report.not_replayed == 0
    assert any("restarted" in g for g in report.gaps)


def test_a_core_rebuilt_mid_run_is_followed(tmp_path: Path) -> None:
    """The runtime replaced its core mid-run (new state, same recorder, no gap) and handed over
    its snapshot: replay continues from that snapshot and every scan matches."""
    run = record_run(tmp_path, n=800, rebuild_at=DRY_AT + 20)  # latched, dry, not yet reset
    assert run.modes[DRY_AT + 19] == "LEAK_TRIP" != run.modes[DRY_AT + 20]  # a new core: no latch
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert report.ok, report.lines()
    assert report.scans == 800 and not report.gaps


def test_a_failed_step_is_expected_to_fail_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan whose step raised is recorded as a fallback: replay matches it when the replayed
    step raises too, and names it when the replayed step decides instead (a fixed bug)."""
    real = Core.step

    def broken(self: Core, inp: ScanInput) -> object:
        if 300.0 <= inp.now_s < 303.0:  # a bug that bites for three scans
            raise ZeroDivisionError("division by zero")
        return real(self, inp)

    monkeypatch.setattr(Core, "step", broken)
    run = record_run(tmp_path, n=400)
    assert run.modes[300:303] == ["fallback"] * 3
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert report.ok and report.scans == 400, report.lines()
    monkeypatch.setattr(Core, "step", real)  # the bug fixed
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert report.first is not None and report.first.seq == 301
    assert report.first.what == (
        "the recorded step failed (safe values written); the replayed one did not",
    )


class Clock:
    """A monotonic clock that moves when the test moves it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += dt


class Quiet:
    def __getattr__(self, _level: str) -> Callable[..., None]:
        return lambda *a, **kw: None


async def test_scans_recorded_by_the_runtime_replay_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan loop itself feeds the recorder (in-memory PLC, fake clocks): a leak trip, a
    decision step that fails for two scans (safe values written, then `step_recovered`), an
    in-process reset once dry. Every scan replays bit for bit."""
    real = Core.step

    def broken(self: Core, inp: ScanInput) -> object:
        if 1040.0 <= inp.now_s < 1040.5:  # the same bug, when recording and when replaying
            raise ZeroDivisionError("division by zero")
        return real(self, inp)

    monkeypatch.setattr(Core, "step", broken)
    site = demo_site(tmp_path).with_control(
        customer_ready_dwell_s=0.0,
        reject_dwell_s=1.0,
        min_mode_dwell_s=1.0,
        reuse_reentry_min_s=0.0,
    )
    clock = Clock()
    plc = MemoryPlc(site, clock=clock)
    plc.set_many({k: v for k, v in HEALTHY.items() if k in plc.measured()})
    transport = MemoryTransport(site, plc, clock=clock, sleep=clock.sleep)
    rec = Recorder.for_site(site, thread=False, snapshot_every_s=30.0)
    wall = lambda: WALL0 + clock()  # noqa: E731
    ctl = Controller(
        site, transport, recorder=rec, clock=clock, wall=wall, sleep=clock.sleep,
        offload=inline, log=Quiet(),
    )  # fmt: skip
    await transport.connect()
    modes = []
    for k in range(600):
        wobble = 0.02 * (k % 2)  # a live sensor is never perfectly still
        plc.set_many({"it_supply_temp": 35.0 + wobble, "it_return_temp": 45.0 + wobble})
        plc.set("leak_reuse", 200 <= k < 300)
        if k == 320:
            ctl.reset_trip(reason="leak dried")
        modes.append((await ctl.scan_once()).mode.value)
        clock.t += site.scan.period_s
        if k % 4 == 3:
            rec.drain()
    rec.close()
    assert "LEAK_TRIP" in modes and modes[-1] != "LEAK_TRIP"  # tripped, and reset
    report = replay(site, rec.directory, WALL0, WALL0 + clock())
    assert report.ok, report.lines()
    assert report.scans == 600 and report.matched == 600
    assert sum(r.fallback for r in iter_records(rec.directory)) == 2


def test_torn_last_segment_is_reported_and_the_rest_replays(recorded: Run, tmp_path: Path) -> None:
    """The last segment cut mid-frame (kill -9): replay warns which segment is unreadable from
    where and replays everything before the cut."""
    run = copy_run(recorded, tmp_path)
    last = segments(run.rec_dir)[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    kept = list(iter_records(run.rec_dir))
    report = replay(run.site, run.rec_dir, WALL0, run.walls[-1])
    assert report.ok and report.scans == len(kept) < N_SCANS
    assert any(last.name in w and "cut short" in w for w in report.warnings)


def test_other_software_or_site_is_warned(
    recorded: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each segment header carries the software version, the decision code's fingerprint and
    the site's hash: replay under other ones says so (and still compares)."""
    theirs = replay_mod.software()
    monkeypatch.setattr(replay_mod, "software", lambda: {**theirs, "code": "0" * 16})
    site = recorded.site.model_copy(
        update={"site": recorded.site.site.model_copy(update={"description": "renamed"})}
    )
    report = replay(site, recorded.rec_dir, WALL0, WALL0 + 100.0)
    assert report.ok
    assert any("decision code" in w for w in report.warnings)
    assert any("site file" in w for w in report.warnings)
    assert not any("software version" in w for w in report.warnings)


def test_cli_exit_codes_and_one_line_refusals(recorded: Run, tmp_path: Path) -> None:
    """0 when every scan matched; 2 with one line for a time that is not one, a window that
    ends before it starts, nothing recorded in the window, or no recorder at all."""
    site = recorded.site
    end = utc_text(recorded.walls[-1])

    def cli(frm: str, to: str, s: Site = site, now: float = WALL0 + 1000.0) -> tuple[int, str]:
        out = io.StringIO()
        return run_replay_cli(s, frm, to, None, now_wall=now, out=out), out.getvalue()

    code, text = cli("2027-01-15T08:10:00Z", end)
    assert code == 0 and "differ" in text and "0 differ" in text
    code, text = cli("-15m", "now")  # relative to now_wall
    assert code == 0 and "timeline:" in text
    for frm, to, why in [
        ("yesterday", end, "--from 'yesterday': expected ISO 8601"),
        ("2027-01-15T08:10:00Z", "13:99", "--to '13:99': expected ISO 8601"),
        (end, "2027-01-15T08:10:00Z", "is after --to"),
        ("2030-01-01T00:00:00Z", "2030-01-02T00:00:00Z", "nothing replayable recorded"),
    ]:
        code, text = cli(frm, to)
        assert code == 2 and why in text and len(text.strip().splitlines()) == 1, text
    code, text = cli("-15m", "now", demo_site(tmp_path))
    assert code == 2 and "nothing recorded" in text


def test_export_has_one_row_per_scan(recorded: Run, tmp_path: Path) -> None:
    """--export: one CSV row per scan in the window with the wall time, mode, each input's
    value and quality (exact), each output's value and level, active interlocks, the match."""
    start, end = WALL0 + LEAK_AT - 2, WALL0 + LEAK_AT + 2
    path = tmp_path / "incident.csv"
    out = io.StringIO()
    code = run_replay_cli(recorded.site, utc_text(start), utc_text(end), str(path), out=out)
    assert code == 0
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    recs = list(iter_records(recorded.rec_dir, start, end))
    assert len(rows) == len(recs) == 5
    for row, rec in zip(rows, recs, strict=True):
        assert float(row["wall_s"]) == rec.wall_s and row["match"] == "yes"
        supply = rec.image["it_supply_temp"]
        assert float(row["it_supply_temp"]) == supply.value
        assert row["it_supply_temp.quality"] == "good"
    assert [r["mode"] for r in rows][1:3] == ["DRY_COOLER_REJECT", "LEAK_TRIP"]
    assert "IL-04" in rows[2]["active"] and rows[2]["reuse_valve_cmd.level"] == "interlock"
    assert f"exported 5 rows to {path}" in out.getvalue()


def test_times_parse_as_documented() -> None:
    """ISO 8601 with Z or an offset, relative times before now, `now`."""
    now = WALL0 + 3600.0
    assert parse_when("2027-01-15T08:05:00Z", now) == WALL0 + 300.0
    assert parse_when("2027-01-15T09:05:00+01:00", now) == WALL0 + 300.0
    assert parse_when("-15m", now) == now - 900.0
    assert parse_when("-2h", now) == now - 7200.0
    assert parse_when("-30s", now) == now - 30.0
    assert parse_when("now", now) == now
    with pytest.raises(ValueError, match="--from '15 minutes ago': expected ISO 8601"):
        parse_when("15 minutes ago", now, "--from")
