"""One OPC UA session at a time, always closed: failed and abandoned connects close theirs.

Against a PLC-like server (sessions outlive their connection until the session timeout, at
most two at once, a third CreateSession refused with BadTooManySessions, as a PLC whose other
slot is its HMI's). Before, every failed connect left its session behind: the third attempt
was refused and, on a real PLC, the HMI and SCADA were locked out with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from plc_io.opcua import OpcuaTransport
from plc_io.transport import LinkState

try:  # tests/hil may or may not be a package
    from tests.hil.conftest import free_port, wait_for
    from tests.hil.plc_standin import PlcStandIn, keep_sessions_like_a_plc, opcua_site
except ImportError:
    from conftest import free_port, wait_for  # type: ignore[no-redef]
    from plc_standin import (  # type: ignore[no-redef]
        PlcStandIn,
        keep_sessions_like_a_plc,
        opcua_site,
    )

pytestmark = [pytest.mark.hil]

ATTEMPTS = 10


@pytest_asyncio.fixture
async def plc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PlcStandIn]:
    keep_sessions_like_a_plc(monkeypatch)
    port = free_port()
    standin = await PlcStandIn(opcua_site(tmp_path, port), port).start()
    yield standin
    await standin.stop()


async def attempts(t: OpcuaTransport, plc: PlcStandIn, n: int, bound_s: float) -> None:
    """Scan (read the inputs) until the PLC has seen `n` CreateSession requests."""
    deadline = time.monotonic() + bound_s
    while plc.created + plc.refused < n:
        assert time.monotonic() < deadline, f"only {plc.created + plc.refused} connects"
        await t.read_inputs()
        assert t.health.state is not LinkState.OK  # the fault makes every connect fail
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", ["resolve", "subscribe", "stall"])
async def test_failed_connects_never_hold_more_than_one_session(
    plc: PlcStandIn, tmp_path: Path, fault: str
) -> None:
    """Ten connects that fail after CreateSession (the node lookup refused, the subscription
    refused, the lookup answering long after the timeout): the PLC never sees two sessions of
    ours, never refuses one, and once the fault clears the link comes up with one session,
    which close() closes."""
    plc.fault = fault
    t = OpcuaTransport(opcua_site(tmp_path, plc.port))
    try:
        await attempts(t, plc, ATTEMPTS, bound_s=90)
        assert plc.refused == 0, f"{plc.refused} connects refused BadTooManySessions"
        assert plc.peak <= 1, f"the PLC held {plc.peak} sessions of ours at once"
        plc.fault = None
        await wait_for_link(t)
        assert plc.live() == 1
        assert plc.peak <= 1 and plc.refused == 0
    finally:
        await t.close()
    await wait_for(lambda: plc.live() == 0, timeout_s=5)


async def wait_for_link(t: OpcuaTransport, bound_s: float = 20) -> None:
    deadline = time.monotonic() + bound_s
    while t.health.state is not LinkState.OK:
        assert time.monotonic() < deadline, f"link still {t.health.state}"
        await t.read_inputs()
        await asyncio.sleep(0.02)


async def test_a_dead_link_leaves_no_second_session(plc: PlcStandIn, tmp_path: Path) -> None:
    """A link that dies under a connected client (here: the transport's socket cut without a
    CloseSession reaching the PLC) leaves a session the PLC keeps; the reconnect takes it over
    and closes it before creating its own, so the PLC never holds two."""
    port = plc.port
    t = OpcuaTransport(opcua_site(tmp_path, port))
    try:
        await wait_for_link(t)
        for _ in range(5):
            client = t._client
            assert client is not None
            client.disconnect_socket()  # the cable, not an orderly close
            deadline = time.monotonic() + 10
            while t._client is client:  # scan until the transport notices
                assert time.monotonic() < deadline, "the transport did not notice the cut link"
                await t.read_inputs()
                await asyncio.sleep(0.02)
            await wait_for_link(t)
            assert plc.live() == 1
        assert plc.peak <= 1 and plc.refused == 0
    finally:
        await t.close()
    await wait_for(lambda: plc.live() == 0, timeout_s=5)
