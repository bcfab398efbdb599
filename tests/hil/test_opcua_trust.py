"""heatloop trusts the PLC's certificate, not any certificate (Basic256Sha256 SignAndEncrypt).

Against an asyncua server standing in for the PLC, with its own self-signed certificate.
Before, any certificate the endpoint listed was accepted: a man in the middle with his own
certificate could read and write every command.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs

from plc_io.opcua import OpcuaTransport
from plc_io.site import Site
from plc_io.transport import LinkState

try:  # tests/hil may or may not be a package
    from tests.hil.conftest import free_port
    from tests.hil.plc_standin import PlcStandIn, opcua_site
except ImportError:
    from conftest import free_port  # type: ignore[no-redef]
    from plc_standin import PlcStandIn, opcua_site  # type: ignore[no-redef]

pytestmark = [pytest.mark.hil]

SECURITY = "Basic256Sha256_SignAndEncrypt"


def thumbprint(der: bytes) -> str:
    """SHA-256 of the DER, as `openssl x509 -noout -fingerprint -sha256` prints it."""
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


async def secure_plc(folder: Path) -> PlcStandIn:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return await PlcStandIn(opcua_site(folder, port), port).start(cert_dir=folder)


@pytest_asyncio.fixture
async def plcs(tmp_path: Path) -> AsyncIterator[tuple[PlcStandIn, PlcStandIn]]:
    """Two PLC stand-ins with different certificates (the second: the replaced or the fake)."""
    a = await secure_plc(tmp_path / "plc_a")
    b = await secure_plc(tmp_path / "plc_b")
    yield a, b
    await a.stop()
    await b.stop()


def site_for(tmp_path: Path, plc: PlcStandIn, **opcua: object) -> Site:
    return opcua_site(tmp_path / "site", plc.port, security=SECURITY, **opcua)


async def scan_until(t: OpcuaTransport, pred: object, bound_s: float = 20) -> None:
    deadline = time.monotonic() + bound_s
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not reached; link {t.health.state}"
        await t.read_inputs()
        await asyncio.sleep(0.02)


async def refused_attempts(t: OpcuaTransport, n: int = 3) -> None:
    """Scan through `n` failed connects; the link must never come up."""
    await scan_until(t, lambda: t.link.failures >= n and t.health.state is not LinkState.OK)
    assert t.health.state is not LinkState.OK


def untrusted_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "plc_certificate_untrusted"]


async def test_an_untrusted_plc_certificate_is_refused_named_and_saved(
    plcs: tuple[PlcStandIn, PlcStandIn], tmp_path: Path
) -> None:
    """No session is ever created; one log line (not one per attempt) names the SHA-256
    thumbprint, the subject and the mv that trusts it; the certificate waits in rejected/."""
    plc, _ = plcs
    site = site_for(tmp_path, plc)
    t = OpcuaTransport(site)
    der = plc.cert_der()
    with capture_logs() as logs:
        try:
            await refused_attempts(t)
        finally:
            await t.close()
    assert plc.created == 0, "a session was created with an untrusted PLC"
    [line] = untrusted_lines(logs)
    assert line["thumbprint_sha256"] == thumbprint(der)
    assert line["subject"] == x509.load_der_x509_certificate(der).subject.rfc4514_string()
    rejected = site.state_dir / "pki" / "plc" / "rejected"
    trusted = site.state_dir / "pki" / "plc" / "trusted"
    [saved] = list(rejected.iterdir())
    assert saved.read_bytes() == der
    assert line["trust"] == f"mv {saved} {trusted}/"
    assert not trusted.exists() or not any(trusted.iterdir())


async def test_the_logged_mv_trusts_the_certificate(
    plcs: tuple[PlcStandIn, PlcStandIn], tmp_path: Path
) -> None:
    """Running the command from the log line, with the controller running, is all it takes."""
    plc, _ = plcs
    site = site_for(tmp_path, plc)
    t = OpcuaTransport(site)
    try:
        with capture_logs() as logs:
            await refused_attempts(t)
        [line] = untrusted_lines(logs)
        (site.state_dir / "pki" / "plc" / "trusted").mkdir(parents=True, exist_ok=True)
        subprocess.run(shlex.split(str(line["trust"])), check=True)
        await scan_until(t, lambda: t.health.state is LinkState.OK)
        assert plc.live() == 1
    finally:
        await t.close()


async def test_a_pinned_certificate_is_trusted_and_no_other(
    plcs: tuple[PlcStandIn, PlcStandIn], tmp_path: Path
) -> None:
    """`server_certificate` (PEM here, relative to the site file's folder) pins the PLC's: the
    PLC presenting it connects; another PLC presenting its own is refused."""
    plc, other = plcs
    folder = tmp_path / "site"
    folder.mkdir(parents=True, exist_ok=True)
    pem = x509.load_der_x509_certificate(plc.cert_der()).public_bytes(Encoding.PEM)
    (folder / "plc.pem").write_bytes(pem)
    t = OpcuaTransport(site_for(tmp_path, plc, server_certificate="plc.pem"))
    try:
        await scan_until(t, lambda: t.health.state is LinkState.OK)
    finally:
        await t.close()
    impostor = OpcuaTransport(site_for(tmp_path, other, server_certificate="plc.pem"))
    with capture_logs() as logs:
        try:
            await refused_attempts(impostor)
        finally:
            await impostor.close()
    assert other.created == 0
    [line] = untrusted_lines(logs)
    assert line["thumbprint_sha256"] == thumbprint(other.cert_der())


async def test_trust_on_first_use_then_a_changed_certificate_is_refused(
    plcs: tuple[PlcStandIn, PlcStandIn], tmp_path: Path
) -> None:
    """`trust_on_first_use = true`: the first certificate is stored in trusted/ (logged); a
    PLC presenting a different one later is refused, and the first stays the only trusted."""
    first, changed = plcs
    site = site_for(tmp_path, first, trust_on_first_use=True)
    trusted = site.state_dir / "pki" / "plc" / "trusted"
    t = OpcuaTransport(site)
    with capture_logs() as logs:
        try:
            await scan_until(t, lambda: t.health.state is LinkState.OK)
        finally:
            await t.close()
    [tofu] = [e for e in logs if e["event"] == "plc_certificate_trusted_on_first_use"]
    assert tofu["thumbprint_sha256"] == thumbprint(first.cert_der())
    assert [p.read_bytes() for p in trusted.iterdir()] == [first.cert_der()]
    later = OpcuaTransport(site_for(tmp_path, changed, trust_on_first_use=True))
    with capture_logs() as logs:
        try:
            await refused_attempts(later)
        finally:
            await later.close()
    assert changed.created == 0
    [line] = untrusted_lines(logs)
    assert line["thumbprint_sha256"] == thumbprint(changed.cert_der())
    assert [p.read_bytes() for p in trusted.iterdir()] == [first.cert_der()]


def test_a_missing_pinned_certificate_stops_start_up(tmp_path: Path) -> None:
    """A pin that cannot be read is a configuration error at start-up, naming the file, not a
    link that never comes up at 3 a.m."""
    site = opcua_site(tmp_path, 4841, security=SECURITY, server_certificate="missing.der")
    with pytest.raises(ValueError, match=r"missing\.der"):
        OpcuaTransport(site)
