"""The PLC watchdog of DESIGN §7 as a pure state machine: heartbeat and command times in, trip
and release out. No clock, no I/O: the simulated PLC feeds it wall times and acts on its events.

Theory of operation. The watchdog watches one thing, the time since the `heartbeat` output last
*changed*. Running (not tripped), a gap of `timeout_s` trips it: every output goes to its safe
value and the trip is counted. Tripped, it releases only when both hold:

1. the heartbeat has been changing steadily for `holdoff_s`: `resume_s` is the first change after
   the heartbeat came back, and any later gap of `timeout_s` or more starts that clock again;
2. a write of some non-heartbeat output arrived at or after `resume_s` (fresh commands: a
   controller that only ticks its heartbeat has not shown it knows what the plant should do).

A PLC powers up tripped (`tripped=True`, `trips=0`): with no controller it holds the safe state,
and a controller must prove itself exactly as after a trip. The power-up hold is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class WatchdogEvent(StrEnum):
    TRIP = "trip"
    RELEASE = "release"


@dataclass
class Watchdog:
    timeout_s: float
    holdoff_s: float
    now_s: float  # the time the PLC started
    tripped: bool = True
    trips: int = 0
    last_heartbeat: float | None = None
    last_change_s: float = 0.0  # when the heartbeat last changed (start time before any change)
    resume_s: float | None = None  # tripped: first change of a steady heartbeat run
    fresh_cmd_s: float | None = None  # tripped: last non-heartbeat output write
    tripped_since_s: float = 0.0

    def __post_init__(self) -> None:
        self.last_change_s = self.now_s
        self.tripped_since_s = self.now_s

    def heartbeat(self, value: float, now_s: float) -> None:
        """The controller wrote the heartbeat (changed or not)."""
        if self.last_heartbeat is not None and value == self.last_heartbeat:
            return
        gap_s = now_s - self.last_change_s
        if self.tripped and (self.resume_s is None or gap_s >= self.timeout_s):
            self.resume_s = now_s
        self.last_heartbeat = value
        self.last_change_s = now_s

    def command(self, now_s: float) -> None:
        """The controller wrote some output other than the heartbeat."""
        self.fresh_cmd_s = now_s

    def poll(self, now_s: float) -> WatchdogEvent | None:
        """Advance to `now_s`; return the transition that happened, if any."""
        silent_s = now_s - self.last_change_s
        if not self.tripped:
            if silent_s >= self.timeout_s:
                self.tripped = True
                self.trips += 1
                self.resume_s = None
                self.fresh_cmd_s = None
                self.tripped_since_s = now_s
                return WatchdogEvent.TRIP
            return None
        if self.resume_s is not None and silent_s >= self.timeout_s:
            self.resume_s = None  # the heartbeat stopped again: the hold-off starts over
        if self.releasable(now_s):
            self.tripped = False
            self.resume_s = None
            self.fresh_cmd_s = None
            return WatchdogEvent.RELEASE
        return None

    def releasable(self, now_s: float) -> bool:
        return (
            self.tripped
            and self.resume_s is not None
            and now_s - self.resume_s >= self.holdoff_s
            and self.fresh_cmd_s is not None
            and self.fresh_cmd_s >= self.resume_s
        )

    def deadline_s(self) -> float:
        """The next time `poll` could change something without another write."""
        if not self.tripped:
            return self.last_change_s + self.timeout_s
        if self.resume_s is None:
            return float("inf")  # nothing happens until the heartbeat changes
        due_s = self.last_change_s + self.timeout_s  # the steady run breaks
        if self.fresh_cmd_s is not None and self.fresh_cmd_s >= self.resume_s:
            due_s = min(due_s, self.resume_s + self.holdoff_s)  # the hold-off ends
        return due_s
