"""`heatloop report`: the energy and availability statement of a site over a range of days,
read from the state store (read-only; works beside a running controller) and written as
Markdown, HTML, CSV or JSON (docs/metering.md, "Statements").

Exit codes: 0 the statement was written (an empty range too: it says "no metering data between
… and …"); 2 bad usage (a date that does not parse, a range that ends before it starts, an
output file that cannot be written; a bad site file, as every command); 1 the store cannot be
read, or `--plot` could not draw (matplotlib missing: the statement is still written first).
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO

from controller import statement
from controller.journal import StoreUnreadable, read_meter
from plc_io.site import Site

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
FORMATS = ("md", "html", "csv", "json")
DATE_HELP = (
    "expected an ISO 8601 date (2026-12-01, UTC midnight) or a date-time with its offset "
    "(2026-12-01T06:00+01:00; without an offset it is UTC)"
)
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ReportUsage(ValueError):
    """A bad argument: one line naming the flag, the value and what is expected."""


def parse_day_or_time(flag: str, text: str, *, end: bool = False) -> float:
    """A wall time from `--from`/`--to`. A date alone is UTC midnight; as `--to` (`end`) it
    includes that whole day (the next midnight). ReportUsage naming the flag otherwise."""
    t = text.strip()
    try:
        if _DATE_ONLY.match(t):
            d = date.fromisoformat(t)
            if end:
                d += timedelta(days=1)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        if "T" not in t and " " not in t:
            raise ValueError("not a date-time")
        w = datetime.fromisoformat(t)
    except (ValueError, OverflowError):
        raise ReportUsage(f"{flag} {text[:60]!r}: {DATE_HELP}") from None
    if w.tzinfo is None:
        w = w.replace(tzinfo=UTC)
    return w.timestamp()


def render(st: dict[str, object], fmt: str) -> str:
    return {
        "md": statement.to_markdown,
        "html": statement.to_html,
        "csv": statement.to_csv,
        "json": statement.to_json,
    }[fmt](st)


def build_from_store(site: Site, from_wall: float, to_wall: float) -> dict[str, object]:
    """The statement of `site` over [from_wall, to_wall), from its state store (read-only).
    StoreUnreadable when the store cannot be read."""
    data = read_meter(
        site.state_dir / "heatloop.db", from_wall, to_wall, kinds=statement.EVENT_KINDS
    )
    return statement.build(
        site=site.site.name,
        intervals=data.intervals,
        interruptions=data.interruptions,
        events=data.events,
        commands=data.commands,
        from_wall=from_wall,
        to_wall=to_wall,
        interval_s=site.metering.interval_s,
        source="controller",
    )


def _write(path: Path, text: str) -> None:
    """Replace `path` whole (a reader never sees half a statement)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_report(
    site: Site,
    from_text: str,
    to_text: str,
    fmt: str = "md",
    plot_path: str | None = None,
    out_path: str | None = None,
    *,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """`heatloop report`; the exit codes are in the module docstring."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        f = parse_day_or_time("--from", from_text)
        t = parse_day_or_time("--to", to_text, end=True)
        if t <= f:
            raise ReportUsage(
                f"--to {to_text[:60]!r} ({statement.iso(t)}) is not after --from "
                f"{from_text[:60]!r} ({statement.iso(f)}): expected a range that ends after "
                "it starts"
            )
        if fmt not in FORMATS:
            raise ReportUsage(f"--format {fmt[:20]!r}: expected one of {', '.join(FORMATS)}")
    except ReportUsage as e:
        print(f"heatloop report: {e}", file=err)
        return EXIT_USAGE
    try:
        st = build_from_store(site, f, t)
    except StoreUnreadable as e:
        print(f"heatloop report: {e}", file=err)
        return EXIT_RUNTIME
    text = render(st, fmt)
    if out_path is None:
        out.write(text)
        out.flush()
    else:
        try:
            _write(Path(out_path), text)
        except OSError as e:
            print(
                f"heatloop report: --out {out_path!r}: cannot write ({e.strerror or e})", file=err
            )
            return EXIT_USAGE
    if st["empty"]:
        print(f"heatloop report: {statement.empty_line(st)}", file=err)
    if plot_path is not None:
        try:
            statement.plot(st, Path(plot_path))
        except statement.PlotsUnavailable as e:
            print(f"heatloop report: --plot: {e} (the statement was written)", file=err)
            return EXIT_RUNTIME
        except OSError as e:
            print(
                f"heatloop report: --plot {plot_path!r}: cannot write ({e.strerror or e})",
                file=err,
            )
            return EXIT_USAGE
    return EXIT_OK
