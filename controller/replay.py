"""`heatloop replay`: re-run the decision core on the flight recorder and compare digests.

Theory of operation. Replay restores `Core.from_snapshot` from the last snapshot taken at or
before `--from`, steps every recorded `ScanInput` in order up to `--to`, and compares the digest
of each replayed `ScanResult` with the digest recorded when the scan ran. The core is pure (no
clock, no I/O: every input it ever sees is in the record), so the same software on the same site
file must reproduce every decision bit for bit; a scan whose digest differs is named with its
wall time and sequence number, and with what differs where the record can tell (the mode, the
outputs, the events). Scans before `--from` are stepped (and compared) only to reach the window.

Each later snapshot in the window is the live core's state at that moment: replay continues
from it (so a core the runtime rebuilt is followed, and a restore that lost state shows as a
difference after it). Where the chain of scans breaks (records dropped by a full queue or a
failed write, a torn segment end, a controller restart) the state can no longer be carried
forward: replay says how many scans are missing and resumes at the next snapshot, counting the
scans in between as not replayed. A record made by different software or under a different
site file is still replayed, with a warning: bit for bit then holds only as far as the change
left the decisions alone.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from controller.authority import Request
from controller.core import Core, ScanInput, ScanResult, digest
from controller.recorder import (
    Gap,
    Header,
    Recorded,
    Snapshot,
    Torn,
    find_snapshot,
    iter_stream,
    read_segment,
    result_parts,
    segments,
    site_hash,
    software,
    utc_text,
)
from interlocks.engine import Event
from plc_io.site import Site

EXIT_OK, EXIT_DIFFERS, EXIT_USAGE = 0, 1, 2
ANALOGUE_STEP_FRAC = 0.10  # an analogue output is shown in the timeline when it moves this much
_RELATIVE = re.compile(r"^-\s*(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Difference:
    """The first scan whose replayed decision does not digest as recorded."""

    seq: int
    index: int  # scans stepped before it in this replay
    wall_s: float
    recorded: str
    replayed: str
    what: tuple[str, ...]

    def line(self) -> str:
        return (
            f"first difference: scan {self.seq} at {utc_text(self.wall_s)} "
            f"(replayed scan {self.index + 1}): {'; '.join(self.what)} "
            f"(digest recorded {self.recorded or '-'}, replayed {self.replayed or '-'})"
        )


@dataclass
class ReplayReport:
    from_wall: float
    to_wall: float
    start_wall: float | None = None  # the snapshot replay started from
    scans: int = 0  # stepped and compared
    matched: int = 0
    differing: int = 0
    in_window: int = 0  # of the stepped scans, those inside [from, to]
    not_replayed: int = 0  # recorded but after a break, before the next snapshot
    rows: int = 0  # written to the export
    first: Difference | None = None
    gaps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    problem: str | None = None  # nothing could be replayed: why

    @property
    def ok(self) -> bool:
        return self.problem is None and self.scans > 0 and self.first is None

    def lines(self) -> list[str]:
        out = [f"warning: {w}" for w in self.warnings]
        out += [f"gap: {g}" for g in self.gaps]
        if self.problem is not None:
            return [*out, self.problem]
        start = utc_text(self.start_wall) if self.start_wall is not None else "?"
        out.append(
            f"replayed {self.scans} scans from the snapshot at {start} "
            f"({self.in_window} in {utc_text(self.from_wall)} … {utc_text(self.to_wall)}): "
            f"{self.matched} matched bit for bit, {self.differing} differ"
            + (f", {self.not_replayed} not replayed (after a break)" if self.not_replayed else "")
        )
        if self.first is not None:
            out.append(self.first.line())
        out.append("timeline:" if self.timeline else "timeline: no changes in the window")
        out += [f"  {utc_text(w)}  {text}" for w, text in self.timeline]
        return out


def replay(
    site: Site,
    rec_dir: Path,
    from_wall: float,
    to_wall: float,
    *,
    export: IO[str] | None = None,
) -> ReplayReport:
    """Replay the recorded scans of [from_wall, to_wall]; `export` gets one CSV row a scan."""
    report = ReplayReport(from_wall, to_wall)
    if not segments(rec_dir):
        report.problem = f"nothing recorded: no flight recorder segments in {rec_dir}"
        return report
    snap = find_snapshot(rec_dir, from_wall)
    if snap is None:
        snap = _first_snapshot_after(rec_dir, from_wall, to_wall)
        if snap is None:
            report.problem = (
                f"nothing to replay between {utc_text(from_wall)} and {utc_text(to_wall)}: "
                f"no snapshot at or before the window or inside it{_span(rec_dir)}"
            )
            return report
        report.warnings.append(
            f"no snapshot at or before {utc_text(from_wall)}: replay starts at the first one, "
            f"{utc_text(snap.wall_s)}"
        )
    try:
        core = Core.from_snapshot(site, snap.snap)
    except Exception as e:
        report.problem = f"snapshot at {utc_text(snap.wall_s)} cannot be restored: {e}"
        return report
    report.start_wall = snap.wall_s
    replayer = _Replayer(site, report, core, snap, export)
    replayer.run(iter_stream(rec_dir, start=snap))
    if report.in_window == 0:
        report.problem = (
            f"nothing replayable recorded between {utc_text(from_wall)} and "
            f"{utc_text(to_wall)}{_span(rec_dir)}"
        )
    return report


def _span(rec_dir: Path) -> str:
    """ " (the record covers A … B)": the first and last recorded scans, for a refusal."""
    segs = segments(rec_dir)
    first = next((r.wall_s for r in read_segment(segs[0]) if isinstance(r, Recorded)), None)
    last = None
    for r in read_segment(segs[-1]):
        if isinstance(r, Recorded):
            last = r.wall_s
    if first is None or last is None:
        return ""
    return f" (the record covers {utc_text(first)} … {utc_text(last)})"


def _first_snapshot_after(rec_dir: Path, from_wall: float, to_wall: float) -> Snapshot | None:
    for p in segments(rec_dir):
        for item in read_segment(p, records=False):
            if isinstance(item, Snapshot) and from_wall < item.wall_s <= to_wall:
                return item
    return None


class _Replayer:
    """One pass over the stream: step, compare, note the timeline, write the export rows."""

    def __init__(
        self, site: Site, report: ReplayReport, core: Core, start: Snapshot, export: IO[str] | None
    ) -> None:
        self.site, self.report, self.core, self.start = site, report, core, start
        self.ours = software()
        self.site_hash = site_hash(site)
        self.warned: set[tuple[str, str]] = set()
        self.run_id: str | None = None
        self.last_seq: int | None = None
        self.last_wall: float | None = None
        self.broken: str | None = None  # why the chain broke; None while it holds
        self.step_error: str | None = None  # the replayed step failed last time: why
        self.recovering: str | None = None  # this step is the first good one after that
        self.prev: dict[str, Any] | None = None  # timeline state
        self.inputs = [t.name for t in site.inputs]
        self.outputs = {t.name: t for t in site.outputs}
        self.writer = csv.writer(export) if export is not None else None
        if self.writer is not None:
            head = ["wall_utc", "wall_s", "seq", "mode", "active", "latched", "match"]
            for n in self.inputs:
                head += [n, f"{n}.quality"]
            for n in self.outputs:
                head += [n, f"{n}.level"]
            self.writer.writerow(head)

    def run(self, stream: Iterator[object]) -> None:
        r = self.report
        for item in stream:
            if isinstance(item, Recorded):
                if item.wall_s > r.to_wall:
                    break
                self._scan(item)
            elif isinstance(item, Header):
                self._header(item)
            elif isinstance(item, Snapshot):
                if (item.path, item.offset) != (self.start.path, self.start.offset):
                    self._restore(item)
            elif isinstance(item, Gap):
                r.gaps.append(
                    f"{item.count} scans missing after scan {item.after_seq}"
                    f"{self._after()}: {item.why}"
                )
                self.broken = "gap"
            elif isinstance(item, Torn):
                r.warnings.append(str(item))

    def _after(self) -> str:
        return f" ({utc_text(self.last_wall)})" if self.last_wall is not None else ""

    def _header(self, h: Header) -> None:
        info = h.info
        for key, ours, what in (
            ("version", self.ours["version"], "software version"),
            ("code", self.ours["code"], "decision code"),
            ("site_hash", self.site_hash, "site file"),
        ):
            theirs = str(info.get(key, "?"))
            if theirs != ours and (key, theirs) not in self.warned:
                self.warned.add((key, theirs))
                self.report.warnings.append(
                    f"{h.path.name} was recorded with {what} {theirs}, this is {ours}: "
                    "decisions may differ where the change touches them"
                )
        if self.run_id is not None and h.run != self.run_id and self.broken is None:
            self.broken = "restart"
            self.report.gaps.append(
                f"controller restarted after scan {self.last_seq}{self._after()}: "
                "replay resumes at the next snapshot"
            )

    def _restore(self, s: Snapshot) -> None:
        """Carry on from the live core's own state at this snapshot. The scans since the last
        one were checked against their digests; restoring here also follows a core the runtime
        rebuilt (a restart, late-restored latches) and ends a break in the chain."""
        try:
            core = Core.from_snapshot(self.site, s.snap)
        except Exception as e:
            self.report.warnings.append(f"snapshot at {utc_text(s.wall_s)} not restorable: {e}")
            return
        self.core = core
        if self.broken is not None:
            self.report.gaps.append(f"replay resumed at the snapshot of {utc_text(s.wall_s)}")
            self.broken = None
            self.run_id, self.last_seq = s.run, None

    def _scan(self, rec: Recorded) -> None:
        r = self.report
        if (
            self.broken is None
            and self.last_seq is not None
            and (rec.run != self.run_id or rec.seq != self.last_seq + 1)
        ):
            missing = rec.seq - self.last_seq - 1 if rec.run == self.run_id else "some"
            r.gaps.append(
                f"{missing} scans missing after scan {self.last_seq}{self._after()} "
                "(not in the record: a segment deleted or unreadable)"
            )
            self.broken = "unmarked gap"
        self.run_id, self.last_seq, self.last_wall = rec.run, rec.seq, rec.wall_s
        window = rec.wall_s >= r.from_wall
        if self.broken is not None:
            r.not_replayed += 1
            if window:
                self._row(rec, None, "not replayed")
            return
        result, got, error = self._step(rec)
        if rec.fallback:
            same = result is None
        else:
            same = result is not None and (got == rec.digest or self._recovered(rec, result))
        r.scans += 1
        if same:
            r.matched += 1
        else:
            r.differing += 1
            if r.first is None:
                r.first = Difference(
                    rec.seq, r.scans - 1, rec.wall_s, rec.digest, got, _what(rec, result, error)
                )
        if window:
            r.in_window += 1
            if result is not None:
                self._timeline(rec.wall_s, result)
            self._row(rec, result, "yes" if same else "no")

    def _step(self, rec: Recorded) -> tuple[ScanResult | None, str, str]:
        try:
            requests = tuple(Request.from_json(q) for q in rec.requests)
        except ValueError as e:
            return None, "", f"recorded request unreadable: {e}"
        inp = ScanInput(
            image=rec.image,
            now_s=rec.now_s,
            wall_s=rec.wall_s,
            link_ok=rec.link_ok,
            write_failed=rec.write_failed,
            degraded=rec.degraded,
            requests=requests,
        )
        try:
            result = self.core.step(inp)
        except Exception as e:  # as the runtime does: the step failed, safe values written
            self.step_error = f"{type(e).__name__}: {e}"
            return None, "", self.step_error
        self.recovering, self.step_error = self.step_error, None
        return result, digest(result), ""

    def _recovered(self, rec: Recorded, result: ScanResult) -> bool:
        """The first good step after failed ones: the runtime may have put its own
        `step_recovered` event in front of the core's events before the digest (as its journal
        and alarms see them). Either digest is the exact decision."""
        was = self.recovering
        if was is None:
            return False
        back = Event("step_recovered", rec.now_s, "runtime", {"was": was})
        return digest(replace(result, events=(back, *result.events))) == rec.digest

    def _timeline(self, wall: float, res: ScanResult) -> None:
        d = res.decision
        add = self.report.timeline.append
        outs = {k: (o.value, o.level, o.why) for k, o in d.outputs.items()}
        prev = self.prev
        if prev is None:
            add(
                (
                    wall,
                    f"at the window's start: mode {d.mode.value}; interlocks active "
                    f"{_ids(d.active)}, latched {_ids(d.latched)}",
                )
            )
        else:
            if d.mode != prev["mode"]:
                why = f" ({'; '.join(d.reject_reasons)})" if d.reject_reasons else ""
                add((wall, f"mode {prev['mode'].value} → {d.mode.value}{why}"))
            for rid in sorted(d.active - prev["active"]):
                add((wall, f"interlock {rid} active"))
            for rid in sorted(prev["active"] - d.active):
                add((wall, f"interlock {rid} cleared"))
            for rid in sorted(d.latched - prev["latched"]):
                add((wall, f"interlock {rid} latched"))
            for rid in sorted(prev["latched"] - d.latched):
                add((wall, f"interlock {rid} reset"))
            if outs != prev["outputs"]:
                self._output_lines(wall, prev["outputs"], outs)
        for e in res.events:
            if e.kind.startswith("alarm_"):
                add((wall, f"{e.kind.replace('_', ' ')} {e.source}{_detail(e.detail)}"))
        for ans in res.answers:
            verdict = "accepted" if ans.accepted else f"refused: {ans.why}"
            add((wall, f"request {ans.id} {verdict}"))
        self.prev = {"mode": d.mode, "active": d.active, "latched": d.latched, "outputs": outs}

    def _output_lines(
        self, wall: float, before: Mapping[str, tuple[Any, ...]], now: Mapping[str, tuple[Any, ...]]
    ) -> None:
        for name, (v, level, why) in now.items():
            old = before.get(name)
            if old is None or not self._moved(name, old, (v, level)):
                continue
            by = f"{level.name.lower()}{': ' + why if why else ''}"
            if _same_value(old[0], v):
                text = f"output {name} held at {_val(v)}, now by {by}"
            else:
                text = f"output {name} {_val(old[0])} → {_val(v)} ({by})"
            self.report.timeline.append((wall, text))

    def _moved(self, name: str, old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
        if old[1] != new[1]:
            return True  # another level took it over
        a, b = old[0], new[0]
        if isinstance(a, bool) or isinstance(b, bool):
            return a != b
        tag = self.outputs.get(name)
        span = (tag.hi - tag.lo) if tag is not None else 100.0
        try:
            return abs(float(b) - float(a)) >= ANALOGUE_STEP_FRAC * span
        except (TypeError, ValueError):
            return a != b

    def _row(self, rec: Recorded, res: ScanResult | None, match: str) -> None:
        if self.writer is None:
            return
        self.report.rows += 1
        row: list[object] = [utc_text(rec.wall_s), repr(rec.wall_s), rec.seq]
        if res is not None:
            d = res.decision
            row += [d.mode.value, " ".join(sorted(d.active)), " ".join(sorted(d.latched))]
        else:
            row += ["", "", ""]
        row.append(match if not rec.fallback else f"{match} (fallback)")
        samples = rec.image.samples()
        for n in self.inputs:
            s = samples.get(n)
            row += ["", "absent"] if s is None else [_exact(s.value), s.quality.value]
        for n in self.outputs:
            o = res.decision.outputs.get(n) if res is not None else None
            row += ["", ""] if o is None else [_exact(o.value), o.level.name.lower()]
        self.writer.writerow(row)


def _what(rec: Recorded, result: ScanResult | None, error: str) -> tuple[str, ...]:
    """What differs, as far as the record can tell."""
    if rec.fallback and result is not None:
        return ("the recorded step failed (safe values written); the replayed one did not",)
    if result is None:
        return (f"the replayed step failed: {error}",)
    if rec.parts is None:
        return ("the decision differs (the record holds its digest only)",)
    mode, outs, events = result_parts(result)
    what = []
    if mode != rec.parts[0]:
        what.append(f"mode recorded {rec.parts[0]}, replayed {mode}")
    if outs != rec.parts[1]:
        what.append("outputs differ")
    if events != rec.parts[2]:
        what.append("events differ")
    return tuple(what) or (
        "mode, outputs and events agree; another part differs (invalid inputs, faults, "
        "blocked commands, reject reasons or answers)",
    )


def _same_value(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _exact(v: object) -> str:
    """A value for the CSV: floats in full (`repr` reads back bit for bit), None empty."""
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _ids(ids: frozenset[str]) -> str:
    return ", ".join(sorted(ids)) or "none"


def _val(v: object) -> str:
    if isinstance(v, float):
        return repr(v) if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def _detail(detail: Mapping[str, object]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in detail.items() if v not in ("", None, {}))
    return f" ({text[:120]})" if text else ""


# ---- the command line ----


def parse_when(text: str, now_wall: float, what: str = "time") -> float:
    """ISO 8601 (`2026-12-01T13:05:00Z`, an offset, or local time without a zone), a relative
    time before now (`-15m`, `-2h`, `-30s`, `-1d`) or `now`; ValueError naming `what`."""
    t = text.strip()
    if t.lower() == "now":
        return now_wall
    m = _RELATIVE.match(t)
    if m:
        return now_wall - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in "zZ" and t else t)
    except ValueError:
        raise ValueError(
            f"{what} {text!r}: expected ISO 8601 (2026-12-01T13:05:00Z), local time without a "
            "zone, or relative like -15m"
        ) from None
    return dt.timestamp()  # naive: local time, as the people at the IPC read their clock


def run_replay_cli(
    site: Site,
    from_text: str,
    to_text: str,
    export: str | None,
    *,
    now_wall: float | None = None,
    out: IO[str] | None = None,
) -> int:
    """`heatloop replay --site S --from T --to T [--export F]`: 0 every scan matched, 1 one
    differs (the first is printed), 2 bad usage or nothing recorded in the window."""
    out = out if out is not None else sys.stdout
    now = time.time() if now_wall is None else now_wall
    try:
        f = parse_when(from_text, now, "--from")
        t = parse_when(to_text, now, "--to")
    except ValueError as e:
        print(f"heatloop replay: {e}", file=out)
        return EXIT_USAGE
    if f > t:
        print(
            f"heatloop replay: --from {utc_text(f)} is after --to {utc_text(t)}: "
            "expected a window that starts before it ends",
            file=out,
        )
        return EXIT_USAGE
    rec_dir = site.state_dir / "recorder"
    try:
        if export is not None:
            with open(export, "w", newline="", encoding="utf-8") as fh:
                report = replay(site, rec_dir, f, t, export=fh)
        else:
            report = replay(site, rec_dir, f, t)
    except OSError as e:
        print(f"heatloop replay: --export {export!r}: cannot write ({e.strerror or e})", file=out)
        return EXIT_USAGE
    for line in report.lines():
        print(line, file=out)
    if report.problem is not None:
        return EXIT_USAGE
    if export is not None:
        print(f"exported {report.rows} rows to {export}", file=out)
    return EXIT_OK if report.ok else EXIT_DIFFERS
