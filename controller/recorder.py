"""The flight recorder: every scan's inputs and decision digest in a bounded on-disk ring.

Theory of operation.

- What a scan leaves: its `ScanInput` (every image sample's value, quality and time exactly as
  floats; the monotonic and wall times; the link state; unacknowledged writes; runtime faults;
  the requests that arrived, as `Request.to_json()`), the digest of its `ScanResult`
  (`controller.core.digest`) with three short parts that say what differs on a mismatch (mode,
  outputs, events), and `fallback` when the step raised and the runtime wrote the safe values.
  `put_snapshot` adds `Core.snapshot()` now and then: replay starts at one.
- Off the scan path. `put` only appends a reference (everything in a ScanInput and a ScanResult
  is immutable) to a bounded deque; a writer thread digests, encodes, compresses and writes
  about once a second. A full queue drops the newest record and counts it in `dropped`; the
  records carry a sequence number, so the file marks the hole (`Gap`) and replay says "N scans
  missing" instead of reporting a false mismatch. Nothing here raises into the scan: failures
  are counted in `errors` and described in `problem` (None when all is well), like
  `JournalKeeper`.
- The ring. `<state dir>/recorder/rec-<first wall, yyyymmddThhmmssZ>.hlr`, one segment per
  `segment_s` (an hour). A segment is rotated at a snapshot (`snapshot_due` asks for one when
  the hour is up), so every segment but a broken one starts with a snapshot and stays
  replayable when older ones are deleted. Segments older than `hours` behind the newest
  record are deleted, and the oldest go first while the total exceeds `max_bytes`.
- The file. A segment is a sequence of frames: a 12-byte head (b"HL", kind, format, payload
  length, CRC32 over the head's first 8 bytes and the payload) and a zlib-compressed JSON
  payload. The first frame is the header (format, software version and a fingerprint of the
  decision code, the site's hash, the tag order, the quality names, a run id). A frame that is
  cut short, fails its CRC or does not decode ends the segment for the reader, which says so
  (`Torn`) and never raises: after kill -9 or a power loss the segment's prefix stays readable.
  Frames are handed to the OS as written and fsynced when a segment closes.
- Compact. Images are lists in the header's tag order, and a record carries only what changed
  since the previous record of its segment (values, qualities, unacknowledged writes, faults);
  a sample's time is the record's common read time unless it kept its previous time or has its
  own. JSON floats are `repr`: they round-trip bit for bit, NaN and ±inf included.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from plc_io.image import ProcessImage, Quality, Sample

FORMAT = 1
MAGIC = b"HL"
HEAD = struct.Struct(">2sBBII")  # magic, kind, format, payload length, crc32
K_HEADER, K_SNAPSHOT, K_RECORDS = ord("H"), ord("S"), ord("R")
MAX_FRAME = 256 * 1024 * 1024  # a longer length field is garbage, not a frame
QUALITIES: tuple[Quality, ...] = tuple(Quality)
_QIDX = {q: i + 1 for i, q in enumerate(QUALITIES)}  # 0: the tag is absent from the image
# flags of a record
F_LINK, F_FALLBACK, F_FAULTS, F_REQUESTS = 1, 2, 4, 8
SEGMENT_RE = re.compile(r"^rec-(\d{8}T\d{6}Z)(?:-(\d+))?\.hlr$")
DEFAULT_MAX_BYTES = 2 * 1024**3
RETRY_SNAPSHOT_S = 10.0  # after a failed write, ask for a fresh starting snapshot this often
# the decision code whose change can change a decision (the version fingerprint)
DECISION_CODE = (
    "controller/core.py",
    "controller/supervisor.py",
    "controller/modes.py",
    "controller/sequences.py",
    "controller/arbitration.py",
    "controller/authority.py",
    "controller/alarms.py",
    "interlocks/engine.py",
    "interlocks/rules.py",
    "interlocks/validation.py",
    "plc_io/image.py",
)


# ---- identity: software and site ----


@functools.lru_cache(maxsize=1)
def software() -> dict[str, str]:
    """The package version and a fingerprint of the decision code's source."""
    try:
        from importlib.metadata import version

        ver = version("heatloop")
    except Exception:  # not installed: the fingerprint still tells versions apart
        ver = "unknown"
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=8)
    for rel in DECISION_CODE:
        h.update(rel.encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update((root / rel).read_bytes())
    return {"version": ver, "code": h.hexdigest()}


def site_hash(site: Any) -> str:
    """A hash of the validated site (everything but the folder it was read from)."""
    text = site.model_dump_json(exclude={"folder"})
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def stamp(wall_s: float) -> str:
    """A wall time as the segment names spell it (UTC, to the second; a time no calendar
    holds, NaN or beyond year 9999, is spelt as the epoch)."""
    try:
        return datetime.fromtimestamp(wall_s, UTC).strftime("%Y%m%dT%H%M%SZ")
    except (ValueError, OverflowError, OSError):
        return "19700101T000000Z"


def _stamp_wall(text: str) -> float:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


def segments(directory: Path) -> list[Path]:
    """The ring's segment files, oldest first (by the stamp in the name, then its counter)."""
    found = []
    with contextlib.suppress(OSError):
        for p in directory.iterdir():
            m = SEGMENT_RE.match(p.name)
            if m:
                found.append(((m.group(1), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _segment_wall(path: Path) -> float:
    m = SEGMENT_RE.match(path.name)
    return _stamp_wall(m.group(1)) if m else -math.inf


# ---- what the reader yields ----


@dataclass(frozen=True)
class Header:
    path: Path
    run: str  # one id per recorder (process): sequence numbers continue only within it
    info: Mapping[str, Any]  # the header as written


@dataclass(frozen=True)
class Snapshot:
    path: Path
    offset: int  # of its frame: the records after it start from this state
    run: str
    wall_s: float
    snap: Mapping[str, Any]


class Recorded(NamedTuple):
    """One scan as it was recorded (a NamedTuple: replay builds thousands a second)."""

    path: Path
    run: str
    seq: int
    wall_s: float
    now_s: float
    link_ok: bool
    image: ProcessImage
    write_failed: frozenset[str]
    degraded: tuple[str, ...]
    requests: tuple[Mapping[str, Any], ...]  # Request.to_json() each
    digest: str  # "" for a fallback scan
    parts: tuple[str, str, str] | None  # mode, outputs hash, events hash (None: unknown)
    fallback: bool


@dataclass(frozen=True)
class Gap:
    path: Path
    run: str
    after_seq: int
    count: int
    why: str


@dataclass(frozen=True)
class Torn:
    """The reader stopped here: the rest of this segment is unreadable."""

    path: Path
    offset: int
    why: str

    def __str__(self) -> str:
        return f"{self.path.name}: unreadable from byte {self.offset} ({self.why}); rest skipped"


Item = Header | Snapshot | Recorded | Gap | Torn


# ---- encoding helpers ----


def _same(a: object, b: object) -> bool:
    """Equal and of the same type, -0.0 apart from 0.0; NaN is never `same` (it is re-sent)."""
    if type(a) is not type(b) or a != b:
        return False
    return not isinstance(a, float) or math.copysign(1.0, a) == math.copysign(1.0, b)  # type: ignore[arg-type]


def _json_default(v: object) -> object:
    # numpy scalars from the simulated plant: booleans and numbers as Python's own
    kind = getattr(getattr(v, "dtype", None), "kind", "")
    if kind == "b":
        return bool(v)  # type: ignore[arg-type]
    if kind in "iu" and kind:
        return int(v)  # type: ignore[call-overload]
    if kind == "f":
        return float(v)  # type: ignore[arg-type]
    # anything else is kept as text: replay then reports the scan as differing, which is true
    return repr(v)


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, default=_json_default).encode()


def frame(kind: int, raw: bytes, level: int = 6) -> bytes:
    """One frame: head, then `raw` (JSON text) zlib-compressed."""
    payload = zlib.compress(raw, level)
    head8 = struct.pack(">2sBBI", MAGIC, kind, FORMAT, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head8))
    return head8 + struct.pack(">I", crc) + payload


def _short_hash(x: object) -> str:
    return hashlib.blake2b(repr(x).encode(), digest_size=4).hexdigest()


def result_parts(result: Any) -> tuple[str, str, str]:
    """Mode, a hash of the outputs and one of the events: enough to say what differs."""
    d = result.decision
    outputs = tuple((k, o.value, int(o.level), o.why) for k, o in sorted(d.outputs.items()))
    events = tuple((e.kind, e.at_s, e.source, sorted(map(str, e.detail))) for e in result.events)
    return d.mode.value, _short_hash(outputs), _short_hash(events)


def _result_digest(result: Any) -> str:
    from controller.core import digest  # the recorder is used before the core is needed

    return str(digest(result))


class SegmentState:
    """What the previous record of the segment left (the writer's and the reader's mirror)."""

    def __init__(self, tags: Sequence[str]) -> None:
        self.tags = list(tags)
        self.index = {n: i for i, n in enumerate(self.tags)}
        n = len(self.tags)
        self.vals: list[object] = [None] * n
        self.quals: list[int] = [0] * n
        self.ats: list[float] = [math.nan] * n
        self.write_failed: frozenset[str] = frozenset()
        self.degraded: tuple[str, ...] = ()
        self.parts: tuple[str, str, str] | None = None

    def add_tag(self, name: str) -> None:
        self.index[name] = len(self.tags)
        self.tags.append(name)
        self.vals.append(None)
        self.quals.append(0)
        self.ats.append(math.nan)


def encode_record(
    st: SegmentState,
    seq: int,
    inp: Any,
    digest: str,
    parts: tuple[str, str, str] | None,
    fallback: bool,
    out: list[object],
) -> None:
    """Append one record (and any new tag names before it) to a frame's entry list."""
    samples = inp.image.samples()
    for name in samples:
        if name not in st.index:
            st.add_tag(name)
            out.append(name)  # a string entry: the next tag of this segment
    dv: list[object] = []
    dq: list[int] = []
    keep: list[int] = []
    own: list[object] = []
    base: float | None = None
    vals, quals, ats = st.vals, st.quals, st.ats
    for i, name in enumerate(st.tags):
        s = samples.get(name)
        if s is None:
            if quals[i]:
                dq += (i, 0)
                quals[i] = 0
            continue
        v, q, at = s
        qi = _QIDX[q]
        if qi != quals[i]:
            dq += (i, qi)
            quals[i] = qi
        old = vals[i]
        # `_same`, inlined (this loop runs for every tag of every scan): a change of value or
        # of type, or -0.0 for 0.0; NaN never equals itself and is written every time
        if v != old or type(v) is not type(old) or (v == 0 and not _same(v, old)):
            dv += (i, v)
            vals[i] = v
        if base is None:
            base = at
        elif at != base or type(at) is not type(base) or (at == 0 and not _same(at, base)):
            if _same(at, ats[i]):
                keep.append(i)
            else:
                own += (i, at)
        ats[i] = at
    flags = F_LINK if inp.link_ok else 0
    if fallback:
        flags |= F_FALLBACK
    entry: list[object] = [
        seq,
        inp.wall_s,
        inp.now_s,
        flags,
        dv,
        dq,
        [base, keep, own] if keep or own else base,
        digest,
        # parts: None unchanged, [] unknown (a fallback or a bare digest), else the three
        None if parts == st.parts else list(parts) if parts else [],
    ]
    st.parts = parts
    extra: dict[str, object] = {}
    wf, dg = frozenset(inp.write_failed), tuple(inp.degraded)
    if wf != st.write_failed or dg != st.degraded:
        entry[3] = int(entry[3]) | F_FAULTS  # type: ignore[call-overload]
        extra["wf"], extra["dg"] = sorted(wf), list(dg)
        st.write_failed, st.degraded = wf, dg
    if inp.requests:
        entry[3] = int(entry[3]) | F_REQUESTS  # type: ignore[call-overload]
        extra["rq"] = [r if isinstance(r, Mapping) else r.to_json() for r in inp.requests]
    if extra:
        entry.append(extra)
    out.append(entry)


# ---- the reader ----


def _decode_records(
    path: Path, run: str, st: SegmentState, entries: list[Any], last_seq: list[int | None]
) -> list[Item]:
    """One records frame's entries as items (raises on a malformed entry: the caller stops)."""
    items: list[Item] = []
    new = tuple.__new__
    quality = QUALITIES
    for e in entries:
        if isinstance(e, str):
            st.add_tag(e)
            continue
        if isinstance(e, dict):
            items.append(Gap(path, run, int(e["after"]), int(e["gap"]), str(e["why"])))
            continue
        seq, wall, now, flags, dv, dq, at_field, digest, parts = e[:9]
        extra = e[9] if len(e) > 9 else {}
        vals, quals, ats = st.vals, st.quals, st.ats
        for k in range(0, len(dq), 2):
            quals[dq[k]] = dq[k + 1]
        for k in range(0, len(dv), 2):
            vals[dv[k]] = dv[k + 1]
        tags = st.tags
        if type(at_field) is list:
            base, keep, own = at_field
            kept = set(keep)
            owned = {own[k]: own[k + 1] for k in range(0, len(own), 2)}
            samples = {}
            for i, name in enumerate(tags):
                qi = quals[i]
                if not qi:
                    continue
                if i in owned:
                    at = owned[i]
                elif i in kept:
                    at = ats[i]
                else:
                    at = base
                ats[i] = at
                samples[name] = new(Sample, (vals[i], quality[qi - 1], at))
        else:  # the common case: every sample read at the one time
            base = at_field
            samples = {
                name: new(Sample, (v, quality[q - 1], base))
                for name, v, q in zip(tags, vals, quals, strict=True)
                if q
            }
            st.ats = ats = [base if q else a for q, a in zip(quals, ats, strict=True)]
        if flags & F_FAULTS:
            st.write_failed = frozenset(extra["wf"])
            st.degraded = tuple(extra["dg"])
        if parts is not None:
            st.parts = (str(parts[0]), str(parts[1]), str(parts[2])) if parts else None
        items.append(
            new(
                Recorded,
                (
                    path,
                    run,
                    int(seq),
                    wall,
                    now,
                    bool(flags & F_LINK),
                    ProcessImage(samples),
                    st.write_failed,
                    st.degraded,
                    tuple(extra["rq"]) if flags & F_REQUESTS else (),
                    str(digest),
                    st.parts,
                    bool(flags & F_FALLBACK),
                ),
            )
        )
        last_seq[0] = int(seq)
    return items


def read_segment(
    path: Path, *, skip_records_before: int = 0, records: bool = True
) -> Iterator[Item]:
    """Every item of one segment, in order; a `Torn` last when the reader had to stop.

    Never raises. `skip_records_before`: frames before this byte offset are still decoded (a
    record carries only changes) but only the header among them is yielded. `records=False`
    skips the records frames unread (headers, snapshots and torn ends only).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        yield Torn(path, 0, f"cannot read: {e}")
        return
    if not data:
        yield Torn(path, 0, "empty segment")
        return
    pos, st, run = 0, None, ""
    last_seq: list[int | None] = [None]
    while pos < len(data):
        if len(data) - pos < HEAD.size:
            yield Torn(path, pos, "frame head cut short")
            return
        magic, kind, fmt, length, crc = HEAD.unpack_from(data, pos)
        if magic != MAGIC or fmt != FORMAT:
            yield Torn(path, pos, f"not a frame (magic {magic!r}, format {fmt})")
            return
        end = pos + HEAD.size + length
        if length > MAX_FRAME or end > len(data):
            yield Torn(path, pos, f"frame cut short ({len(data) - pos - HEAD.size} of {length})")
            return
        payload = data[pos + HEAD.size : end]
        if zlib.crc32(payload, zlib.crc32(data[pos : pos + 8])) != crc:
            yield Torn(path, pos, "checksum mismatch")
            return
        try:
            obj = json.loads(zlib.decompress(payload))
            if st is None:
                if kind != K_HEADER:
                    raise ValueError("the first frame is not a header")
                run = str(obj["run"])
                st = SegmentState([str(t) for t in obj["tags"]])
                if list(obj["qualities"]) != [q.value for q in QUALITIES]:
                    raise ValueError(f"unknown quality names {obj['qualities']}")
                items: list[Item] = [Header(path, run, obj)]
            elif kind == K_SNAPSHOT:
                items = [Snapshot(path, pos, run, float(obj["wall"]), obj["snap"])]
            elif kind == K_RECORDS and not records:
                items = []
            elif kind == K_RECORDS:
                items = _decode_records(path, run, st, obj, last_seq)
            else:
                raise ValueError(f"unknown frame kind {kind}")
        except Exception as e:  # a frame that passed its CRC but does not make sense
            yield Torn(path, pos, f"malformed frame: {type(e).__name__}: {e}"[:200])
            return
        if pos >= skip_records_before or kind == K_HEADER:
            yield from items
        pos = end


def iter_stream(directory: Path, start: Snapshot | None = None) -> Iterator[Item]:
    """Every item of the ring, oldest first; from `start` (that snapshot first) when given."""
    segs = segments(directory)
    if start is not None:
        segs = [p for p in segs if p == start.path or _segment_key(p) > _segment_key(start.path)]
    for p in segs:
        skip = start.offset if start is not None and p == start.path else 0
        yield from read_segment(p, skip_records_before=skip)


def _segment_key(p: Path) -> tuple[str, int]:
    m = SEGMENT_RE.match(p.name)
    return (m.group(1), int(m.group(2) or 0)) if m else ("", 0)


def iter_records(
    directory: Path, from_wall: float = -math.inf, to_wall: float = math.inf
) -> Iterator[Recorded]:
    """The recorded scans with a wall time in [from_wall, to_wall], oldest first."""
    for item in iter_stream(directory):
        if isinstance(item, Recorded) and from_wall <= item.wall_s <= to_wall:
            yield item


def find_snapshot(directory: Path, at_wall: float) -> Snapshot | None:
    """The last snapshot taken at or before `at_wall` (None: there is none), searching the
    newest segment first. Names are not trusted for times: after the wall clock was set back a
    segment's name is bumped past the newest one to keep the ring in the order of writing."""
    best: Snapshot | None = None
    for p in reversed(segments(directory)):
        for item in read_segment(p, records=False):
            if isinstance(item, Snapshot) and item.wall_s <= at_wall:
                best = item
        if best is not None:
            return best
    return None


# ---- the writer ----


class Recorder:
    """The ring, as the scan sees it: `put` never blocks on disk and never raises."""

    def __init__(
        self,
        directory: Path,
        tags: Sequence[str],
        *,
        site_name: str = "",
        site_digest: str = "",
        hours: float = 24.0,
        segment_s: float = 3600.0,
        snapshot_every_s: float = 300.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pending: int = 1200,
        flush_every_s: float = 1.0,
        flush_records: int = 64,
        thread: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.tags = tuple(tags)
        self.site_name = site_name
        self.site_digest = site_digest
        self.hours = hours
        self.segment_s = segment_s
        self.snapshot_every_s = snapshot_every_s
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.flush_every_s = flush_every_s
        self.flush_records = flush_records
        self.run = uuid.uuid4().hex[:16]
        self.software = software()
        # scan side
        self._q: collections.deque[tuple[Any, ...]] = collections.deque()
        self._seq = 0
        self._snap_wall: float | None = None
        self._seg_wall: float | None = None
        self._want_snapshot = True
        self._closed = False
        # counters (read by `stats`; ints are updated atomically enough for a report)
        self.records = 0  # put
        self.dropped = 0  # queue full
        self.lost = 0  # in a write that failed
        self.written = 0  # records on disk
        self.bytes_written = 0
        self.errors = 0
        self.deleted = 0  # segments
        self.problem: str | None = None
        # writer side
        self._lock = threading.Lock()
        self._file: Any = None
        self._path: Path | None = None
        self._path_wall = math.inf  # the current segment's start, as its name says
        self._ring: list[list[Any]] = []  # closed segments: path, start wall, bytes
        self._st: SegmentState | None = None
        self._seg_start = 0.0
        self._seg_bytes = 0
        self._last_seq = 0  # the last record encoded
        self._flushed_seq = 0  # the last record handed to the file
        self._lost_why = ""
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
            self._thread.start()

    @classmethod
    def for_site(cls, site: Any, **kw: Any) -> Recorder:
        """The site's recorder in `<state dir>/recorder` (`[recorder]` hours and snapshots)."""
        kw.setdefault("hours", site.recorder.hours)
        kw.setdefault("snapshot_every_s", site.recorder.snapshot_every_s)
        return cls(
            site.state_dir / "recorder",
            [t.name for t in site.inputs],
            site_name=site.site.name,
            site_digest=site_hash(site),
            **kw,
        )

    # ---- the scan's side: cheap, never raises ----

    def put(self, inp: Any, result: Any, fallback: bool = False) -> None:
        """Record one scan: its ScanInput, its ScanResult (or the digest as a str; None for a
        fallback scan). Drops the record, counted, when the writer is behind."""
        try:
            if self._closed:
                return
            self._seq += 1
            self.records += 1
            if len(self._q) >= self.max_pending:
                self.dropped += 1
                return
            self._q.append((K_RECORDS, self._seq, inp, result, fallback))
            if len(self._q) >= self.flush_records:
                self._wake.set()
        except Exception as e:
            self._fail("put", e)

    def snapshot_due(self, wall_s: float) -> bool:
        """Whether the scan should hand over a snapshot now (before its next step): at the
        start, every `snapshot_every_s`, when the segment's time is up, when the wall clock was
        set back, and (at most every RETRY_SNAPSHOT_S) when the writer had to start a new
        segment after a failure."""
        if self._snap_wall is None or self._seg_wall is None:
            return True
        since = wall_s - self._snap_wall
        if since < 0 or wall_s < self._seg_wall:
            return True  # the wall clock was set back: a new segment, in the ring's order
        if self._want_snapshot and since >= min(RETRY_SNAPSHOT_S, self.snapshot_every_s):
            return True
        return since >= self.snapshot_every_s or wall_s - self._seg_wall >= self.segment_s

    def put_snapshot(self, wall_s: float, snap: Mapping[str, Any]) -> None:
        """`Core.snapshot()` before the next `put`: replay may start from here. It is encoded
        now (the caller's dict may change later); a new segment starts with it when due."""
        try:
            if self._closed:
                return
            # taken, even if dropped below: a stuck writer must not cost a snapshot every scan
            last, self._snap_wall = self._snap_wall, wall_s
            if len(self._q) >= self.max_pending + 16:
                self.dropped += 1
                return
            text = dumps({"wall": wall_s, "snap": snap})
            seg = self._seg_wall
            new_segment = (
                self._want_snapshot
                or seg is None
                or wall_s - seg >= self.segment_s
                or wall_s < seg
                or (last is not None and wall_s < last)
            )
            if new_segment:
                self._seg_wall = wall_s
            self._want_snapshot = False
            self._q.append((K_SNAPSHOT, wall_s, text, new_segment))
        except Exception as e:
            self._fail("snapshot", e)

    def stats(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
            "pending": len(self._q),
            "bytes_written": self.bytes_written,
            "segments_deleted": self.deleted,
            "errors": self.errors,
            "problem": self.problem,
        }

    def close(self, timeout_s: float = 5.0) -> None:
        """Write everything queued, fsync and close the segment. Bounded: a writer stuck on a
        hung disk is left behind (a daemon thread) after `timeout_s`, so shutdown goes on."""
        self._closed = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                self._fail("close", TimeoutError(f"writer still busy after {timeout_s:g} s"))
                return
            self._thread = None
        if not self._lock.acquire(timeout=timeout_s):
            self._fail("close", TimeoutError(f"writer still busy after {timeout_s:g} s"))
            return
        self._lock.release()
        self.drain()
        with self._lock:
            self._close_segment()

    # ---- the writer's side ----

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self.drain()

    def drain(self) -> None:
        """Encode and write everything queued (the writer thread's pass; tests call it)."""
        with self._lock:
            errors = self.errors
            newest = -math.inf
            batch: list[object] = []
            batch_n = 0
            try:
                while self._q:
                    item = self._q.popleft()
                    if item[0] == K_SNAPSHOT:
                        self._write_records(batch, batch_n)
                        batch, batch_n = [], 0
                        _, wall, text, new_segment = item
                        if new_segment or self._file is None:
                            self._open_segment(wall)
                        self._write_raw(frame(K_SNAPSHOT, text))
                        continue
                    _, seq, inp, result, fallback = item
                    try:
                        wall = float(inp.wall_s)
                    except Exception as e:  # not a ScanInput: this record only is lost
                        self._lose(seq, e)
                        continue
                    newest = max(newest, wall)
                    if self._file is None or wall - self._seg_start >= 2 * self.segment_s:
                        # no snapshot came to rotate on (or the segment broke): rotate anyway
                        self._write_records(batch, batch_n)
                        batch, batch_n = [], 0
                        self._open_segment(wall)
                    if self._encode(seq, inp, result, fallback, batch):
                        batch_n += 1
                    else:  # the segment's change state is spoilt: end it here
                        self._write_records(batch, batch_n)
                        batch, batch_n = [], 0
                        self._close_segment()
                self._write_records(batch, batch_n)
                batch_n = 0
                if newest > -math.inf:
                    self._prune(newest)
                self._enforce_bytes()
                if self.errors == errors:
                    self.problem = None
            except Exception as e:
                self._broken(e, batch_n)

    def _encode(self, seq: int, inp: Any, result: Any, fallback: bool, out: list[object]) -> bool:
        """Append one record (after a gap marker when records went missing) to `out`."""
        assert self._st is not None
        if seq != self._last_seq + 1:
            why = self._lost_why or "recorder queue full (the writer fell behind)"
            out.append({"gap": seq - self._last_seq - 1, "after": self._last_seq, "why": why})
            self._lost_why = ""
        before, self._last_seq = self._last_seq, seq
        mark = len(out)
        try:
            if result is None:
                digest, parts = "", None
            elif isinstance(result, str):
                digest, parts = result, None
            else:
                digest, parts = _result_digest(result), result_parts(result)
            encode_record(self._st, seq, inp, digest, parts, fallback, out)
            return True
        except Exception as e:
            del out[mark:]  # a tag name it may have added goes with it
            self._last_seq = before
            self._lose(seq, e)
            return False

    def _lose(self, seq: int, e: Exception) -> None:
        """One record could not be encoded: counted, and the next record marks the gap."""
        self._fail("encode", e)
        self.lost += 1
        self._lost_why = f"a scan could not be recorded: {type(e).__name__}: {e}"[:200]

    def _write_records(self, batch: list[object], n: int) -> None:
        if batch:
            self._write_raw(frame(K_RECORDS, dumps(batch)))
            self.written += n
        self._flushed_seq = self._last_seq  # every record encoded so far is on its way

    def _write_raw(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._seg_bytes += len(data)
        self.bytes_written += len(data)

    def _open_segment(self, wall_s: float) -> None:
        self._close_segment()
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = segments(self.directory)
        self._ring = [[p, _segment_wall(p), _size(p)] for p in existing]  # closed, oldest first
        name = stamp(wall_s)
        n = 0
        if existing:  # the ring's order is its names' order: never sort before the newest
            top = _segment_key(existing[-1])
            if (name, 0) <= top:
                name, n = top[0], top[1] + 1
        path = self.directory / (f"rec-{name}.hlr" if n == 0 else f"rec-{name}-{n}.hlr")
        f = open(path, "xb")  # noqa: SIM115  # held open across passes, closed in _close_segment
        self._file, self._path, self._seg_start, self._seg_bytes = f, path, wall_s, 0
        self._path_wall = _segment_wall(path)
        self._st = SegmentState(self.tags)
        header = {
            "format": FORMAT,
            "run": self.run,
            "started_wall": wall_s,
            "first_seq": self._last_seq + 1,
            "site": self.site_name,
            "site_hash": self.site_digest,
            **self.software,
            "tags": list(self.tags),
            "qualities": [q.value for q in QUALITIES],
            "segment_s": self.segment_s,
        }
        self._write_raw(frame(K_HEADER, dumps(header)))
        self._prune(wall_s)

    def _close_segment(self) -> None:
        f, self._file, self._st = self._file, None, None
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(OSError, ValueError):
                f.close()

    def _prune(self, newest_wall: float) -> None:
        """Delete segments wholly older than `hours` before the newest record: a segment goes
        when the one after it started at or before the horizon (never the current one). The
        ring is listed from disk when a segment opens and kept in memory in between."""
        horizon = newest_wall - self.hours * 3600.0
        ring = self._ring
        while ring:
            nxt = ring[1][1] if len(ring) > 1 else self._path_wall
            if not nxt <= horizon:
                break
            self._delete(ring.pop(0)[0])

    def _enforce_bytes(self) -> None:
        """The second bound: the oldest segments go while the ring is larger than max_bytes."""
        ring = self._ring
        total = sum(r[2] for r in ring) + self._seg_bytes
        while ring and total > self.max_bytes:
            p, _, size = ring.pop(0)
            self._delete(p)
            total -= size
        if total > self.max_bytes and self._file is not None:
            # the current segment alone is too big: start a new one (a snapshot is asked for,
            # so the ring keeps a replayable start); this one goes when that one opens
            self._close_segment()
            self._want_snapshot = True

    def _delete(self, p: Path) -> None:
        try:
            p.unlink()
            self.deleted += 1
        except FileNotFoundError:
            pass

    def _broken(self, e: Exception, lost: int) -> None:
        """A write failed: this pass's records are lost (a gap says so); start a new segment
        on the next pass, with a snapshot as soon as the scan gives one."""
        self._fail("write", e)
        self.lost += lost
        self._last_seq = self._flushed_seq  # the next record written marks the hole
        self._lost_why = f"recorder write failed: {type(e).__name__}: {e}"[:200]
        self._close_segment()
        self._want_snapshot = True

    def _fail(self, where: str, e: Exception) -> None:
        self.errors += 1
        self.problem = f"flight recorder {where} failed: {type(e).__name__}: {e}"[:300]


def utc_text(wall_s: float) -> str:
    """A wall time for people: ISO 8601 UTC with milliseconds."""
    try:
        dt = datetime.fromtimestamp(wall_s, UTC)
    except (ValueError, OverflowError, OSError):
        return repr(wall_s)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
