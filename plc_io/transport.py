"""The interface every PLC transport offers (Modbus TCP, OPC UA, the in-memory fake).

A transport never lets a comms failure escape as an exception into the scan: `read_inputs`
always returns a whole image in which unreadable points carry a bad quality, and
`write_outputs` reports what it could not write. Exceptions are for programming errors
(an unknown tag) only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from plc_io.image import ProcessImage
from plc_io.tags import Value


class LinkState(StrEnum):
    CONNECTING = "connecting"
    OK = "ok"
    LOST = "lost"


class PlcError(Exception):
    """One error type for every way a PLC request fails.

    kind: "comms" (no answer, timeout, connection refused or dropped), "exception" (the PLC
    answered with a protocol error, e.g. Modbus exception code 2 illegal address), or
    "bad_reply" (an answer that cannot be decoded: short, garbled, wrong type).
    """

    def __init__(self, kind: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class UnknownTagError(KeyError):
    """A write names a tag that is not an output of the site's tag table."""


@dataclass(frozen=True)
class CommsHealth:
    """What the controller and the BMS see of the link."""

    state: LinkState = LinkState.CONNECTING
    since_s: float = 0.0  # when `state` was entered
    last_ok_s: float | None = None
    consecutive_failures: int = 0
    requests: int = 0  # requests sent since start (for the requests-per-scan figure)
    failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class WriteResult:
    written: tuple[str, ...] = ()  # tags sent this pass (changed values plus heartbeat)
    failed: Mapping[str, str] = field(default_factory=dict)  # tag -> reason


class Transport(Protocol):
    """What the scan loop needs of a PLC link. Times come from the transport's own clock."""

    @property
    def health(self) -> CommsHealth: ...

    async def connect(self) -> None:
        """Try once to connect; never raises for comms. Later calls retry with back-off."""

    async def close(self) -> None: ...

    async def read_inputs(self) -> ProcessImage:
        """Read every input tag. Points that could not be read come back comms_lost or bad_reply."""

    async def write_outputs(self, values: Mapping[str, Value]) -> WriteResult:
        """Write the values that changed since the last good write, plus `heartbeat` always.

        Raises UnknownTagError for a name that is not an output tag.
        """

    async def read_outputs(self) -> ProcessImage:
        """Read back the output tags as the PLC holds them."""
