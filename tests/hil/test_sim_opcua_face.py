"""The simulated PLC's OPC UA face: its fault methods answer and log a hostile argument bounded."""

from __future__ import annotations

import json

import pytest
from asyncua import Client, ua
from structlog.testing import capture_logs

from sim.plc import SimPlc

try:  # tests/hil may or may not be a package
    from tests.hil.conftest import make_plc
except ImportError:
    from conftest import make_plc  # type: ignore[no-redef]

pytestmark = [pytest.mark.hil]

HUGE = "x" * 1_000_000


async def test_a_1_mb_method_argument_is_logged_and_answered_bounded() -> None:
    """A caller's 1 MB fault name (or target) used to come back and be logged whole."""
    plc: SimPlc = make_plc()
    async with plc:
        client = Client(f"opc.tcp://127.0.0.1:{plc.opcua_port}/", timeout=5)
        async with client:
            ns = await client.get_namespace_index("urn:heatloop:plc")
            sim = await client.nodes.objects.get_child([f"{ns}:Sim"])
            calls = [
                ("InjectFault", (HUGE, "", 1.0)),
                ("InjectFault", ("comms_drop", HUGE, 1.0)),
                ("InjectFault", ("write_refused", HUGE, 4.0)),
                ("InjectFault", ("wrong_type", HUGE, 1.0)),
                ("ClearFault", (HUGE, "")),
                ("ClearFault", ("leak", HUGE)),
            ]
            for method, args in calls:
                with capture_logs() as logs, pytest.raises(ua.UaStatusCodeError) as err:
                    await sim.call_method(f"{ns}:{method}", *args)
                assert err.value.code == ua.StatusCodes.BadInvalidArgument, method
                for e in logs:
                    line = json.dumps(e, default=str)
                    assert len(line) < 2_000, line[:300]
                (refused,) = [e for e in logs if e["event"] == "sim_method_refused"]
                assert "truncated" in refused["reason"], refused
    assert not plc.faults.active(plc.now())
