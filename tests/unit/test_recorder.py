"""The flight recorder: an exact round trip, the ring's two bounds, torn tails, gaps and failures.

Invariants: what the reader returns is exactly what was put (every float bit for bit, NaN as
NaN); a damaged segment yields a prefix of what was written and never raises; a record that
could not be written leaves a gap marker, never a silent hole; `put` never raises.
"""

from __future__ import annotations

import math
import random
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.authority import Request
from controller.core import ScanInput
from controller.recorder import (
    HEAD,
    RETRY_SNAPSHOT_S,
    Gap,
    Header,
    Recorded,
    Recorder,
    Snapshot,
    Torn,
    find_snapshot,
    iter_records,
    iter_stream,
    read_segment,
    segments,
)
from plc_io.image import MISSING, ProcessImage, Quality, Sample
from plc_io.site import demo_site
from tests.unit.core_helpers import HEALTHY, SITE

TAGS = [t.name for t in SITE.inputs]
WALL0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
PERIOD_S = SITE.scan.period_s


def key(x: object) -> tuple[object, ...]:
    """What "the same" means for a recorded value: floats by their bits (any NaN is NaN)."""
    if isinstance(x, float):
        return ("nan",) if math.isnan(x) else ("float", struct.pack(">d", x))
    return (type(x).__name__, x)


def image_key(img: ProcessImage) -> dict[str, tuple[object, ...]]:
    return {n: (key(s.value), s.quality, key(s.at_s)) for n, s in sorted(img.samples().items())}


def input_key(i: ScanInput | Recorded) -> tuple[object, ...]:
    reqs = tuple(r if isinstance(r, dict) else r.to_json() for r in i.requests)
    return (
        image_key(i.image),
        key(i.now_s),
        key(i.wall_s),
        i.link_ok,
        frozenset(i.write_failed),
        tuple(i.degraded),
        reqs,
    )


def scan(k: int, **kw: Any) -> ScanInput:
    """Scan k of a healthy plant read at one time, its temperatures moving a little."""
    now = 100.0 + k * PERIOD_S
    values = {**HEALTHY, "it_supply_temp": 35.0 + 0.01 * (k % 7), "tank_top_temp": 45.0 + k / 3}
    img = ProcessImage({n: Sample(v, Quality.GOOD, now - 0.01) for n, v in values.items()})
    return ScanInput(img, now, WALL0 + k * PERIOD_S, True, **kw)


def recorder(d: Path, **kw: Any) -> Recorder:
    return Recorder(d, TAGS, thread=False, **kw)


def record(rec: Recorder, inputs: list[ScanInput], *, drain_every: int = 8) -> list[str]:
    """Put every input as the runtime would (a snapshot when due); return the digests put."""
    digests = []
    for n, i in enumerate(inputs):
        if rec.snapshot_due(i.wall_s):
            rec.put_snapshot(i.wall_s, {"scan": n, "x": [1.5, math.nan]})
        d = f"{n:032x}"
        rec.put(i, d)
        digests.append(d)
        if (n + 1) % drain_every == 0:
            rec.drain()
    rec.drain()
    return digests


def varied() -> list[ScanInput]:
    """Scans that exercise every part of the encoding."""
    out = [scan(k) for k in range(3)]
    base = scan(3)
    samples = dict(base.image.samples())
    del samples["customer_flow"]  # absent from the image (not MISSING)
    samples["it_power"] = MISSING  # value None, comms lost, at -inf
    samples["tank_mid_temp"] = Sample(math.nan, Quality.OUT_OF_RANGE, base.now_s - 0.01)
    samples["ambient_temp"] = Sample(-0.0, Quality.STALE, 12.5)  # its own old time
    samples["plc_not_in_site"] = Sample(1, Quality.GOOD, base.now_s - 0.01)  # an int, new tag
    out.append(ScanInput(ProcessImage(samples), base.now_s, base.wall_s, True))
    s4 = scan(4)
    samples = dict(s4.image.samples())
    samples["ambient_temp"] = Sample(-0.0, Quality.STALE, 12.5)  # keeps its time
    samples["tank_mid_temp"] = Sample(math.inf, Quality.FORCED, 5e-324)
    req = Request("r-1", "alice", "engineer", "force", {"tag": "x", "value": 1.5}, "test")
    out.append(
        ScanInput(
            ProcessImage(samples),
            s4.now_s,
            s4.wall_s,
            False,
            frozenset({"heartbeat", "reuse_valve_cmd"}),
            ("journal cannot persist: disk full",),
            (req,),
        )
    )
    out.append(scan(5, degraded=("journal cannot persist: disk full",)))
    out.append(scan(6))
    return out


def test_round_trip_is_exact(tmp_path: Path) -> None:
    """Every field of every scan comes back as it was put: samples (present, absent, MISSING,
    NaN, ±0, inf, subnormal times, a tag not in the site), times, link, faults, requests."""
    inputs = varied()
    rec = recorder(tmp_path)
    digests = record(rec, inputs, drain_every=2)
    rec.put(scan(7), None, fallback=True)  # the step raised: safe values were written
    rec.close()
    got = list(iter_records(tmp_path))
    assert [input_key(r) for r in got] == [input_key(i) for i in [*inputs, scan(7)]]
    assert [r.digest for r in got] == [*digests, ""]
    assert [r.fallback for r in got] == [False] * len(inputs) + [True]
    assert [r.seq for r in got] == list(range(1, len(inputs) + 2))
    assert rec.stats()["written"] == len(inputs) + 1 and rec.problem is None


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.tuples(finite_or_not, finite_or_not), min_size=1, max_size=6),
    times=st.tuples(finite_or_not, finite_or_not),
)
def test_floats_round_trip_bit_for_bit(
    values: list[tuple[float, float]], times: tuple[float, float]
) -> None:
    """Any float (NaN, ±inf, -0.0, subnormals) as a value, a sample time or a scan time."""
    names = TAGS[: len(values)]
    inputs = []
    for k in range(3):  # a value repeated, changed and repeated again
        vals = values if k != 1 else [(v + 1.0, at) for v, at in values]
        img = ProcessImage(
            {n: Sample(v, Quality.GOOD, at) for n, (v, at) in zip(names, vals, strict=True)}
        )
        inputs.append(ScanInput(img, times[0], times[1], True))
    with tempfile.TemporaryDirectory() as d:
        rec = recorder(Path(d))
        for i in inputs:
            rec.put(i, "0" * 32)
        rec.close()
        got = [r for r in iter_stream(Path(d)) if isinstance(r, Recorded)]
    assert [input_key(r) for r in got] == [input_key(i) for i in inputs]


def stream_kinds(d: Path) -> Iterator[tuple[str, object]]:
    for item in iter_stream(d):
        yield type(item).__name__, item


def test_ring_keeps_hours_and_deletes_older_segments(tmp_path: Path) -> None:
    """A full ring overwrites the oldest: after every write pass, no segment wholly older than
    `hours` before the newest scan is left, every scan of the last `hours` is still there, and
    each segment starts with a snapshot (so replay can start in any of them)."""
    hours = 1 / 60  # one minute of 20-second segments
    rec = recorder(tmp_path, hours=hours, segment_s=20.0, snapshot_every_s=10.0)
    inputs = [scan(k) for k in range(int(5 * 60 / PERIOD_S))]  # five minutes
    for n in range(0, len(inputs), 40):
        record(rec, inputs[n : n + 40], drain_every=40)
        newest = inputs[min(n + 39, len(inputs) - 1)].wall_s
        kept = list(iter_records(tmp_path, newest - hours * 3600.0, newest))
        assert [r.seq for r in kept] == list(range(kept[0].seq, kept[-1].seq + 1))
        assert kept[0].wall_s <= max(newest - hours * 3600.0, WALL0) + PERIOD_S
        segs = segments(tmp_path)
        starts = [next(i for i in read_segment(p) if isinstance(i, Recorded)).wall_s for p in segs]
        # the second segment starts after the horizon: the first holds the horizon's scans
        assert len(segs) == 1 or starts[1] > newest - hours * 3600.0
    rec.close()
    assert rec.deleted >= 10
    for p in segments(tmp_path):
        kinds = [type(i).__name__ for i in read_segment(p)][:2]
        assert kinds == ["Header", "Snapshot"], p.name


def test_ring_stays_within_max_bytes(tmp_path: Path) -> None:
    """The second bound: the ring's files never add up to more than max_bytes after a write
    pass; the oldest segments go first and the newest scans are kept."""
    cap = 20_000
    rec = recorder(tmp_path, segment_s=20.0, snapshot_every_s=20.0, max_bytes=cap)
    inputs = [scan(k) for k in range(2000)]
    for n in range(0, len(inputs), 50):
        record(rec, inputs[n : n + 50], drain_every=50)
        assert sum(p.stat().st_size for p in segments(tmp_path)) <= cap
    rec.close()
    assert rec.deleted > 0
    last = list(iter_records(tmp_path))
    assert last[-1].seq == len(inputs)


@pytest.fixture(scope="module")
def written() -> Iterator[tuple[Path, list[object]]]:
    """One segment of many frames (records, snapshots) and everything the reader makes of it."""
    d = Path(tempfile.mkdtemp())
    rec = recorder(d, snapshot_every_s=30.0)
    record(rec, varied() + [scan(k) for k in range(7, 300)], drain_every=16)
    rec.close()
    (seg,) = segments(d)
    yield seg, list(read_segment(seg))
    shutil.rmtree(d)


def frame_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(data):
        pos += HEAD.size + HEAD.unpack_from(data, pos)[3]
        ends.append(pos)
    return ends


def comparable(items: list[object]) -> list[object]:
    out: list[object] = []
    for i in items:
        if isinstance(i, Recorded):
            out.append(("rec", i.seq, input_key(i), i.digest))
        elif isinstance(i, Snapshot):
            out.append(("snap", i.offset, key(i.wall_s)))
        elif isinstance(i, Header | Gap):
            out.append(type(i).__name__)
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frac=st.floats(0.0, 1.0))
def test_torn_tail_reads_a_prefix(written: tuple[Path, list[object]], frac: float) -> None:
    """A segment cut at any byte (kill -9, power loss) reads as a prefix of what was written,
    ending with a Torn item unless the cut fell between two frames; the reader never raises."""
    seg, full = written
    data = seg.read_bytes()
    cut = int(frac * len(data))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / seg.name
        p.write_bytes(data[:cut])
        got = list(read_segment(p))
    whole = [i for i in got if not isinstance(i, Torn)]
    assert comparable(whole) == comparable(full[: len(whole)])
    if cut in frame_ends(data):
        assert not isinstance(got[-1], Torn)
    else:
        assert isinstance(got[-1], Torn) and got[-1].offset <= cut


def test_damaged_frame_ends_the_segment_there(written: tuple[Path, list[object]]) -> None:
    """A flipped byte inside a frame (bad storage): the frames before it are read, the reader
    says where and why it stopped, and nothing after it is trusted."""
    seg, full = written
    data = bytearray(seg.read_bytes())
    ends = frame_ends(bytes(data))
    rng = random.Random(9)
    for _ in range(20):
        k = rng.randrange(1, len(ends))
        at = rng.randrange(ends[k - 1], ends[k])
        bad = bytearray(data)
        bad[at] ^= 0x40
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / seg.name
            p.write_bytes(bytes(bad))
            got = list(read_segment(p))
        assert isinstance(got[-1], Torn) and got[-1].offset == ends[k - 1]
        whole = got[:-1]
        assert comparable(whole) == comparable(full[: len(whole)])


def test_full_queue_drops_the_newest_and_marks_a_gap(tmp_path: Path) -> None:
    """The writer falls behind: `put` drops the newest records (counted), never blocks; the file
    carries a gap marker saying how many scans are missing after which one."""
    rec = recorder(tmp_path, max_pending=5)
    inputs = [scan(k) for k in range(10)]
    for i in inputs[:8]:
        rec.put(i, "a" * 32)  # nobody drains: the queue holds five
    assert rec.stats()["dropped"] == 3 and rec.stats()["pending"] == 5
    rec.drain()
    for i in inputs[8:]:
        rec.put(i, "b" * 32)
    rec.close()
    items = [i for i in iter_stream(tmp_path) if isinstance(i, Recorded | Gap)]
    assert [(type(i).__name__, getattr(i, "seq", None)) for i in items] == [
        *[("Recorded", s) for s in range(1, 6)],
        ("Gap", None),
        ("Recorded", 9),
        ("Recorded", 10),
    ]
    gap = items[5]
    assert isinstance(gap, Gap) and (gap.after_seq, gap.count) == (5, 3)
    assert "queue full" in gap.why


class FailingFile:
    """A segment file on a disk that just filled up."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_write_failure_is_counted_marked_and_recovered(tmp_path: Path) -> None:
    """A write that fails loses that pass's records: counted, `problem` says why, nothing raises
    into the scan; the next pass starts a new segment whose gap marker names the cause."""
    rec = recorder(tmp_path)
    inputs = [scan(k) for k in range(12)]
    record(rec, inputs[:4], drain_every=4)
    rec._file = FailingFile(rec._file)  # the disk fills up
    for i in inputs[4:8]:
        rec.put(i, "c" * 32)
    rec.drain()
    assert rec.lost == 4 and rec.errors == 1
    assert rec.problem is not None and "No space left on device" in rec.problem
    # the new segment wants a starting snapshot, but a failing disk never costs one a scan
    assert not rec.snapshot_due(inputs[8].wall_s)
    assert rec.snapshot_due(inputs[0].wall_s + RETRY_SNAPSHOT_S)
    record(rec, inputs[8:], drain_every=4)
    rec.close()
    assert rec.problem is None
    assert len(segments(tmp_path)) == 2
    items = [i for i in iter_stream(tmp_path) if isinstance(i, Recorded | Gap)]
    gaps = [i for i in items if isinstance(i, Gap)]
    assert [(g.after_seq, g.count) for g in gaps] == [(4, 4)]
    assert "No space left on device" in gaps[0].why
    assert [i.seq for i in items if isinstance(i, Recorded)] == [1, 2, 3, 4, 9, 10, 11, 12]


def test_put_never_raises_and_a_bad_record_is_a_gap(tmp_path: Path) -> None:
    """Garbage handed to the recorder (a bug in the caller) costs that record only: counted,
    described, a gap in the file; the records around it are kept."""
    rec = recorder(tmp_path)
    rec.put(scan(0), "d" * 32)
    rec.put(None, "e" * 32)  # not a ScanInput
    rec.put(scan(2), "f" * 32)
    rec.close()
    assert rec.lost == 1 and rec.errors == 1
    assert rec.problem is not None and "encode" in rec.problem
    items = [i for i in iter_stream(tmp_path) if isinstance(i, Recorded | Gap)]
    assert [getattr(i, "seq", "gap") for i in items] == [1, "gap", 3]


def test_snapshot_is_found_at_or_before_a_time(tmp_path: Path) -> None:
    """find_snapshot gives the last snapshot taken at or before the time asked for."""
    rec = recorder(tmp_path, snapshot_every_s=10.0, segment_s=30.0)
    record(rec, [scan(k) for k in range(400)])  # 100 s at 250 ms
    rec.close()
    walls = [i.wall_s for i in iter_stream(tmp_path) if isinstance(i, Snapshot)]
    assert walls == [WALL0 + 10.0 * k for k in range(10)]
    assert find_snapshot(tmp_path, WALL0 - 1.0) is None
    for at in (WALL0, WALL0 + 9.99, WALL0 + 10.0, WALL0 + 55.0, WALL0 + 1e6):
        snap = find_snapshot(tmp_path, at)
        assert snap is not None and snap.wall_s == max(w for w in walls if w <= at)


def test_writer_thread_writes_and_close_flushes(tmp_path: Path) -> None:
    """With its own thread (as in production) every record put before `close` is on disk."""
    rec = Recorder(tmp_path, TAGS, flush_every_s=0.01)
    inputs = [scan(k) for k in range(200)]
    for i in inputs:
        rec.put(i, "0" * 32)
    rec.close()
    assert [r.seq for r in iter_records(tmp_path)] == list(range(1, 201))
    rec.put(scan(200), "0" * 32)  # after close: ignored, never raises
    assert rec.stats()["records"] == 200


def test_segment_header_names_software_and_site(tmp_path: Path) -> None:
    """Each segment's header carries the version, the decision code's fingerprint, the site's
    hash and the tag order (replay warns when they differ from its own)."""
    rec = Recorder.for_site(demo_site(tmp_path), thread=False)
    rec.put(scan(0), "0" * 32)
    rec.close()
    (head,) = [i for i in iter_stream(tmp_path / "state" / "recorder") if isinstance(i, Header)]
    assert head.info["tags"] == TAGS and head.info["site"] == SITE.site.name
    assert len(head.info["code"]) == 16 and len(head.info["site_hash"]) == 16
    assert head.info["version"]


class HungFile(FailingFile):
    """A segment file on a disk that stopped answering: a write waits until released."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.gate = threading.Event()

    def write(self, data: bytes) -> int:
        self.gate.wait(60.0)
        return int(self.real.write(data))


def test_close_gives_up_on_a_hung_disk(tmp_path: Path) -> None:
    """Shutdown never waits on a hung disk: `close` returns after its bound with `problem` set,
    leaving the stuck writer thread behind."""
    rec = Recorder(tmp_path, TAGS, flush_every_s=3600.0)  # its thread only wakes when told
    rec.put(scan(0), "0" * 32)
    rec.drain()  # the segment is open
    hung = HungFile(rec._file)
    rec._file = hung
    rec.put(scan(1), "1" * 32)
    rec.close(timeout_s=0.2)  # the thread is now inside the write
    assert rec.problem is not None and "writer still busy" in rec.problem
    hung.gate.set()  # the disk answers again: let the thread finish
    assert rec._thread is not None
    rec._thread.join(60.0)
    assert not rec._thread.is_alive()


def test_wall_clock_set_back_starts_a_new_segment_in_order(tmp_path: Path) -> None:
    """The wall clock stepped back an hour (an operator, NTP): a snapshot is asked for at once,
    a new segment starts with it, and its name sorts after the older ones so the ring's order
    stays the order of writing."""
    rec = recorder(tmp_path, snapshot_every_s=60.0)
    before = [scan(k) for k in range(20)]
    record(rec, before)
    back = [replace(scan(k), wall_s=scan(k).wall_s - 3600.0) for k in range(20, 40)]
    assert rec.snapshot_due(back[0].wall_s)
    record(rec, back)
    rec.close()
    segs = segments(tmp_path)
    assert len(segs) == 2 and segs[1].name.endswith("-1.hlr")
    seqs = [r.seq for r in iter_stream(tmp_path) if isinstance(r, Recorded)]
    assert seqs == list(range(1, 41))
    assert [type(i).__name__ for i in read_segment(segs[1])][:2] == ["Header", "Snapshot"]
    snap = find_snapshot(tmp_path, back[5].wall_s)  # replay of the hour lived twice
    assert snap is not None and (snap.path, snap.wall_s) == (segs[1], back[0].wall_s)
