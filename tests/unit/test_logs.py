"""Log lines stay bounded, third-party floods are rate-limited, and a stalled stream never
blocks the caller (10 s of PLC garbage once made a 9 MB line and 22.6 MB of log)."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
import structlog

from controller.logs import BURST, MAX_FIELD_CHARS, WINDOW_S, configure


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in stream.getvalue().splitlines() if x.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_a_huge_field_is_cut_and_says_so() -> None:
    out = io.StringIO()
    setup = configure(json=True, stream=out)
    huge = "ab" * 4_500_000  # 9 MB, as pymodbus' hex dump of a garbage buffer
    structlog.get_logger("heatloop.test").warning("plc_fault", cause=huge, small="kept")
    logging.getLogger("pymodbus.logging").error("Unable to decode %s", huge)
    setup.close()
    got = lines(out)
    assert len(got) == 2
    for line in out.getvalue().splitlines():
        assert len(line) < 2 * MAX_FIELD_CHARS + 500  # one field at most, plus the frame
    assert got[0]["small"] == "kept"
    assert str(got[0]["cause"]).endswith(f"…[truncated {len(huge) - MAX_FIELD_CHARS} chars]")
    assert "truncated" in str(got[1]["event"])


@pytest.mark.usefixtures("restore_logging")
def test_third_party_floods_are_rate_limited_with_a_count_and_ours_are_not() -> None:
    out = io.StringIO()
    clock = Clock()
    setup = configure(json=True, stream=out, clock=clock)
    lib = logging.getLogger("pymodbus.logging")
    ours = structlog.get_logger("heatloop.controller")
    for i in range(100):
        clock.t = i * 0.05  # 100 lines in 5 s
        lib.error("ERROR: request ask for transaction_id=%d but got id=0, Skipping.", i)
        ours.info("mode_changed", n=i)
    clock.t = WINDOW_S + 1.0
    lib.error("after the flood")
    setup.close()
    got = lines(out)
    lib_lines = [x for x in got if "Skipping" in str(x["event"]) or "flood" in str(x["event"])]
    assert len(lib_lines) == BURST + 1
    assert f"[{100 - BURST} earlier messages from pymodbus.logging suppressed]" in str(
        lib_lines[-1]["event"]
    )
    assert len([x for x in got if x["event"] == "mode_changed"]) == 100


class StalledStream(io.StringIO):
    """stderr into a pipe nobody reads: every write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait()
        return super().write(s)


@pytest.mark.usefixtures("restore_logging")
def test_a_stalled_stream_never_blocks_the_logging_caller() -> None:
    out = StalledStream()
    setup = configure(json=True, stream=out)
    log = structlog.get_logger("heatloop.controller")
    for i in range(50):
        log.info("scan_overrun", n=i)  # on a synchronous handler the first call would hang
    assert out.getvalue() == ""  # nothing written yet: the calls returned anyway
    out.release.set()
    setup.close()
    assert len(lines(out)) == 50
