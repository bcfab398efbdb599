"""A non-Python BMS against heatloop's BMS server: node-opcua-client 2.182.2 (an independent
OPC UA stack) connects to `heatloop run`'s server with Basic256Sha256 SignAndEncrypt and a
username, browses, reads, subscribes and is refused an out-of-range write.

The client is `tests/hil/nodeopcua/client.mjs` (one JSON line per result). It makes its own
certificate; the test trusts it the way an integrator does, by copying it into the server's
`pki/bms/trusted/` before start, and the client trusts the server's certificate from
`pki/bms/own/cert.der` (never on first use). `make test` installs node-opcua (`npm ci --prefix
tests/hil/nodeopcua`); without Node or that install these tests fail with one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hil.procs import ROOT, SimServer
from tests.hil.test_bms_e2e import Bms, setpoint_range, start_bms

pytestmark = pytest.mark.hil

NODE_DIR = ROOT / "tests" / "hil" / "nodeopcua"
CLIENT = NODE_DIR / "client.mjs"
TIMEOUT_S = 60.0  # node start, key generation on first use, a loaded machine


def node_client(
    pki: Path,
    *args: str,
    endpoint: str = "opc.tcp://127.0.0.1:1/heatloop",
    user: str | None = None,
    password: str | None = None,
    server_cert: Path | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the node-opcua BMS client needs Node.js 20")
    if not (NODE_DIR / "node_modules" / "node-opcua-client").is_dir():
        pytest.fail(f"node-opcua is not installed: run `npm ci --prefix {NODE_DIR}` (make test)")
    cmd = [node, str(CLIENT), "--endpoint", endpoint, "--pki", str(pki)]
    if user is not None:
        cmd += ["--user", user]
    if server_cert is not None:
        cmd += ["--server-cert", str(server_cert)]
    env = dict(os.environ)
    if password is not None:
        env["HEATLOOP_BMS_PASSWORD"] = password  # not on the command line
    r = subprocess.run(
        [*cmd, *args],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return r.returncode, lines


@pytest.fixture(scope="module")
def rig(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bms, Path]]:
    folder = tmp_path_factory.mktemp("bms-node")
    pki = folder / "node-pki"
    rc, lines = node_client(pki, "cert")
    assert rc == 0, lines
    der = Path(lines[-1]["der"])
    for b in start_bms(sim, folder, client_certs=(der,), name="bms-node"):
        yield b, pki


def run(rig: tuple[Bms, Path], *args: str, user: str = "alice") -> tuple[int, list[dict[str, Any]]]:
    b, pki = rig
    return node_client(
        pki,
        *args,
        endpoint=b.endpoint,
        user=user,
        password=b.password(user),
        server_cert=b.server_cert,
    )


def test_node_opcua_sees_basic256sha256_endpoints_only(rig: tuple[Bms, Path]) -> None:
    rc, eps = run(rig, "endpoints")
    assert rc == 0, eps
    modes = {(e["securityPolicyUri"].rsplit("#", 1)[-1], e["securityMode"]) for e in eps}
    assert ("Basic256Sha256", "SignAndEncrypt") in modes
    assert all(p != "None" and m != "None" for p, m in modes), modes
    assert all("Anonymous" not in e["userTokens"] for e in eps)


def test_node_opcua_browses_the_whole_tree(rig: tuple[Bms, Path]) -> None:
    b, _ = rig
    rc, lines = run(rig, "browse", user="vera")
    assert rc == 0, lines[-3:]
    assert lines[0]["session"] == "open"
    assert lines[0]["securityMode"] == "SignAndEncrypt"
    assert lines[0]["securityPolicy"].endswith("#Basic256Sha256")
    ns = lines[0]["namespaceIndex"]
    seen = {ln["path"]: ln for ln in lines[1:]}
    for p in b.space.points:
        got = seen.get("/".join(p.path))
        assert got is not None, f"{'/'.join(p.path)} not browsed"
        assert got["nodeId"] == f"ns={ns};s={p.node_id}"
        assert got["nodeClass"] == "Variable"
    for m in b.space.methods:
        assert seen[m.name]["nodeClass"] == "Method"


def test_node_opcua_reads_values_with_status_and_source_time(rig: tuple[Bms, Path]) -> None:
    ids = [
        "s=HeatLoop.Telemetry.it_supply_temp",
        "s=HeatLoop.Status.Mode",
        "s=HeatLoop.Status.PlcCommsOk",
    ]
    rc, lines = run(rig, "read", *ids, user="vera")
    assert rc == 0, lines
    got = {ln["nodeId"]: ln for ln in lines[1:]}
    t = got[ids[0]]
    assert (t["status"], t["dataType"]) == ("Good", "Double")
    assert isinstance(t["value"], float) and t["sourceTimestamp"] is not None
    assert got[ids[1]]["dataType"] == "String" and got[ids[1]]["value"] in rig[0].space.modes
    assert got[ids[2]]["value"] is True


def test_node_opcua_subscribes_and_receives_notifications(rig: tuple[Bms, Path]) -> None:
    node = "s=HeatLoop.Telemetry.it_supply_temp"
    rc, lines = run(rig, "subscribe", "4", "250", node, "s=HeatLoop.Status.Mode", user="vera")
    assert rc == 0, lines
    assert lines[1]["publishingInterval"] >= 100  # the site's minimum, at least
    notes = [ln for ln in lines if ln.get("notification") and ln["nodeId"] == node]
    assert notes and all(n["status"] == "Good" for n in notes)


def test_node_opcua_is_refused_an_out_of_range_write_and_a_viewer_any_write(
    rig: tuple[Bms, Path],
) -> None:
    b, _ = rig
    lo, hi = setpoint_range(b, "supply_setpoint_c")
    sp = "s=HeatLoop.Setpoints.supply_setpoint_c"
    rc, lines = run(rig, "write", sp, str(hi + 5.0))
    assert rc == 0, lines
    assert lines[-1]["status"] == "BadOutOfRange"
    rc, lines = run(rig, "write", sp, str((lo + hi) / 2), user="vera")
    assert rc == 0, lines
    assert lines[-1]["status"] == "BadUserAccessDenied"
    rc, lines = run(rig, "write", sp, "true", "Boolean")
    assert rc == 0, lines
    assert lines[-1]["status"] == "BadTypeMismatch"


def test_node_opcua_with_a_wrong_password_gets_no_session(rig: tuple[Bms, Path]) -> None:
    b, pki = rig
    rc, lines = node_client(
        pki,
        "read",
        "s=HeatLoop.Status.Mode",
        endpoint=b.endpoint,
        user="wendy",
        password="not-wendys-password",
        server_cert=b.server_cert,
    )
    assert rc == 1 and "BadUserAccessDenied" in lines[-1]["error"], lines
