"""structlog set-up: JSON lines in service mode, readable key=value lines on a console.

Logs stay small and off the scan's critical path, whatever a library or a PLC sends:
- every field of every line is bounded (`MAX_FIELD_CHARS`; a longer value is cut and says
  `…[truncated N chars]`), so one line is at most a few kB: pymodbus' error messages carry a hex
  dump of its whole receive buffer, which a PLC sending garbage makes megabytes long;
- third-party (stdlib) loggers get at most `BURST` lines per `WINDOW_S` each; the first line
  after a quiet spell says how many were suppressed (our own events are already logged once per
  cause, never every scan, so they are not limited);
- lines are formatted on the caller's thread but written by a listener thread through a bounded
  queue, so a stalled stderr never blocks the event loop; lines that do not fit are dropped and
  counted, and the next line that fits says so.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import time
from collections.abc import Callable, MutableMapping
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

import structlog

MAX_FIELD_CHARS = 2048
MAX_LINE_CHARS = 8192  # the sum of the fields; past it every field is cut to a quarter of this
BURST = 5
WINDOW_S = 10.0
QUEUE_LINES = 10_000


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[truncated {len(text) - limit} chars]"


def _bounded(value: Any, limit: int) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return _cut(value, limit)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) <= limit // 4:  # a hex/repr form is up to four times longer
            return value
        return _cut(repr(bytes(value[: limit + 1])), limit) + f" of {len(value)} bytes"
    text = repr(value)
    return value if len(text) <= limit else _cut(text, limit)


def bound_fields(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: no field longer than MAX_FIELD_CHARS, no line much longer than
    MAX_LINE_CHARS."""
    total = 0
    for k, v in list(event_dict.items()):
        b = _bounded(v, MAX_FIELD_CHARS)
        event_dict[k] = b
        total += len(b) if isinstance(b, str) else 16
    if total > MAX_LINE_CHARS:
        for k, v in list(event_dict.items()):
            event_dict[k] = _bounded(v, MAX_LINE_CHARS // (4 * max(1, len(event_dict))))
    return event_dict


class RateLimit(logging.Filter):
    """At most `burst` records per `window_s` per third-party logger; structlog's own records
    (their `msg` is the event dict) always pass. The first record let through after some were
    suppressed carries the count."""

    def __init__(
        self,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # name -> (start, sent, suppressed)
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):
            return True
        now = self.clock()
        start, sent, suppressed = self._windows.get(record.name, (now, 0, 0))
        if now - start >= self.window_s:
            start, sent = now, 0
        if sent >= self.burst:
            self._windows[record.name] = (start, sent, suppressed + 1)
            self.suppressed_total += 1
            return False
        if suppressed:
            # cut first: the library's text may be megabytes, the count must stay visible
            record.msg = (
                f"{_cut(record.getMessage(), MAX_FIELD_CHARS)} "
                f"[{suppressed} earlier messages from {record.name} suppressed]"
            )
            record.args = None
        self._windows[record.name] = (start, sent + 1, 0)
        return True


class DroppingQueueHandler(QueueHandler):
    """A QueueHandler that drops (and counts) instead of blocking or raising when full."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)  # type: ignore[attr-defined]
        except queue.Full:
            self.dropped += 1
            return
        if self.dropped:
            note = logging.makeLogRecord(
                {"name": "heatloop.logs", "levelno": logging.WARNING, "levelname": "WARNING"}
            )
            note.msg = f'{{"event": "log_lines_dropped", "dropped": {self.dropped}}}'
            with_note = self.dropped
            try:
                self.queue.put_nowait(note)  # type: ignore[attr-defined]
                self.dropped -= with_note
            except queue.Full:
                pass


class LogSetup:
    """What `configure` installed; `close()` flushes the queue and restores nothing else."""

    def __init__(self, handler: DroppingQueueHandler, listener: QueueListener, limit: RateLimit):
        self.handler, self.listener, self.limit = handler, listener, limit
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.listener.stop()  # writes what is queued, then ends the thread


_current: LogSetup | None = None  # logging is process-wide: one set-up at a time
_atexit_registered = False


def configure(
    json: bool,
    level: int = logging.INFO,
    *,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LogSetup:
    """Route structlog and the libraries' stdlib logs into one bounded stream (stderr)."""
    global _current, _atexit_registered
    if _current is not None:
        _current.close()
    out = stream if stream is not None else sys.stderr
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    tail: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
    ]
    if json:
        tail.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[*tail, bound_fields, renderer]
    )
    q: queue.Queue[Any] = queue.Queue(QUEUE_LINES)
    handler = DroppingQueueHandler(q)
    handler.setFormatter(formatter)  # formatted (and bounded) before it is queued
    limit = RateLimit(clock=clock)
    handler.addFilter(limit)
    writer = logging.StreamHandler(out)
    writer.setFormatter(logging.Formatter("%(message)s"))
    listener = QueueListener(q, writer)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the libraries are chatty at INFO; their warnings still come through
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)  # one line per callback
    # asyncua warns about the simulated PLC's None endpoint, which is by design
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    _current = LogSetup(handler, listener, limit)
    if not _atexit_registered:
        atexit.register(_close_current)
        _atexit_registered = True
    return _current


def _close_current() -> None:
    if _current is not None:
        _current.close()
