"""The BMS server's certificate and the client trust folder, also over a real asyncua server.

Invariants: the server's key is never readable by others (0600 in a 0700 folder); the
certificate carries the application URI and the names a client dials; a valid pair is kept (a
BMS that trusted it keeps trusting it), an expired or mismatched one is made again; a client
certificate nobody trusted opens no session, is saved in rejected/ and named in one log line;
trusting it is a `mv` with no restart; trust on first use only when the site asks; an empty
trust folder works.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

import controller.bms_pki as pki
from controller.bms_pki import ClientTrust, client_trust, host_names, server_certificate
from controller.bms_users import add_user

try:
    from tests.unit.bms_helpers import (
        CLIENT_URI,
        ListLog,
        bms_test_server,
        client_cert,
        connect,
        refused,
    )
except ImportError:  # pragma: no cover - run from tests/unit
    from bms_helpers import (  # type: ignore[no-redef]
        CLIENT_URI,
        ListLog,
        bms_test_server,
        client_cert,
        connect,
        refused,
    )

APP_URI = "urn:heatloop:site:demo"
PW = "correct horse battery"


def thumbprint(der: bytes) -> str:
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


def sans(cert_path: Path) -> x509.SubjectAlternativeName:
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# ---- the server's own certificate ----


def test_created_on_first_use_with_uri_names_and_a_private_key(tmp_path: Path) -> None:
    log = ListLog()
    cert, key = server_certificate(tmp_path, APP_URI, "bms.plant.example", log=log)
    assert cert == tmp_path / "pki" / "bms" / "own" / "cert.der"
    assert key == tmp_path / "pki" / "bms" / "own" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    san = sans(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [APP_URI]
    dns = san.get_values_for_type(x509.DNSName)
    assert {"bms.plant.example", "localhost", socket.gethostname()} <= set(dns)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # asyncua's own check of a server certificate: URI and a host name present, in date
    c = x509.load_der_x509_certificate(cert.read_bytes())
    assert uacrypto.check_certificate(c, APP_URI, "localhost") is False  # False: no error
    [line] = log.events("bms_certificate_created")
    assert line["reason"] == "absent" and line["thumbprint_sha256"] == thumbprint(cert.read_bytes())


def test_the_any_address_is_not_a_name() -> None:
    assert "0.0.0.0" not in host_names("0.0.0.0")
    assert "::" not in host_names("::")
    assert {"localhost", "127.0.0.1", socket.gethostname()} <= set(host_names("0.0.0.0"))


def test_a_valid_pair_is_kept(tmp_path: Path) -> None:
    cert, key = server_certificate(tmp_path, APP_URI, "127.0.0.1")
    before = (cert.read_bytes(), key.read_bytes())
    log = ListLog()
    assert server_certificate(tmp_path, APP_URI, "127.0.0.1", log=log) == (cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == before
    assert log.lines == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("expired", "expires"),
        ("uri", "application URI"),
        ("host", "host name"),
        ("key_garbage", "unreadable"),
        ("cert_garbage", "unreadable"),
        ("other_key", "not the key's"),
        ("cert_missing", "absent"),
    ],
)
def test_an_expired_or_mismatched_pair_is_made_again(
    tmp_path: Path, change: str, reason: str
) -> None:
    cert, key = server_certificate(tmp_path, APP_URI, "127.0.0.1")
    old = cert.read_bytes()
    uri, host, now = APP_URI, "127.0.0.1", None
    if change == "expired":  # five years and a day on: past its end
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=pki.VALID_DAYS + 1)
    elif change == "uri":
        uri = "urn:heatloop:site:renamed"
    elif change == "host":
        host = "bms-new.plant.example"
    elif change == "key_garbage":
        key.write_bytes(b"not a key")
    elif change == "cert_garbage":
        cert.write_bytes(b"not a certificate")
    elif change == "other_key":
        key.write_bytes(cert_gen.dump_private_key_as_pem(cert_gen.generate_private_key()))
    elif change == "cert_missing":
        cert.unlink()
    log = ListLog()
    server_certificate(tmp_path, uri, host, log=log, now=now)
    [line] = log.events("bms_certificate_created")
    assert reason in line["reason"]
    assert cert.read_bytes() != old
    new = x509.load_der_x509_certificate(cert.read_bytes())
    assert new.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # the new certificate belongs to the key on disk
    from cryptography.hazmat.primitives import serialization

    k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert new.public_key() == k.public_key()


def test_a_widened_key_is_narrowed_again(tmp_path: Path) -> None:
    _, key = server_certificate(tmp_path, APP_URI, "127.0.0.1")
    key.chmod(0o644)
    log = ListLog()
    server_certificate(tmp_path, APP_URI, "127.0.0.1", log=log)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert log.events("bms_key_mode_fixed")


# ---- client trust (no server) ----


def make_cert(folder: Path, uri: str = CLIENT_URI, *, days: int = 365) -> x509.Certificate:
    key = cert_gen.generate_private_key()
    return cert_gen.generate_self_signed_app_certificate(
        key,
        "a BMS client",
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("bms-client")],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )


def app(uri: str = CLIENT_URI) -> ua.ApplicationDescription:
    d = ua.ApplicationDescription()
    d.ApplicationUri = uri
    d.ApplicationType = ua.ApplicationType.Client
    return d


async def status_of(trust: ClientTrust, cert: x509.Certificate, uri: str = CLIENT_URI) -> str:
    try:
        await trust(cert, app(uri))
    except ServiceError as e:
        return ua.StatusCode(e.code).name
    return "Good"


async def test_unknown_client_is_refused_saved_and_named_once(tmp_path: Path) -> None:
    log = ListLog()
    trust = client_trust(tmp_path, False, log=log)
    assert trust.trusted() == frozenset()  # an empty folder works (asyncua's store fails on it)
    cert = make_cert(tmp_path)
    der = cert.public_bytes(Encoding.DER)
    for _ in range(3):
        assert await status_of(trust, cert) == "BadCertificateUntrusted"
    [line] = log.events("bms_client_untrusted")
    assert line["thumbprint_sha256"] == thumbprint(der)
    assert line["subject"] == cert.subject.rfc4514_string()
    rejected = tmp_path / "pki" / "bms" / "rejected"
    trusted = tmp_path / "pki" / "bms" / "trusted"
    [saved] = list(rejected.iterdir())
    assert saved.read_bytes() == der
    assert line["trust"] == f"mv {saved} {trusted}/"
    assert list(trusted.iterdir()) == []
    # the logged command trusts it, without a new validator (no restart)
    shutil.move(str(saved), str(trusted) + "/")
    assert await status_of(trust, cert) == "Good"


async def test_trusted_as_pem_and_a_broken_file_is_skipped(tmp_path: Path) -> None:
    log = ListLog()
    trust = client_trust(tmp_path, False, log=log)
    cert = make_cert(tmp_path)
    trusted = tmp_path / "pki" / "bms" / "trusted"
    (trusted / "bms.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (trusted / "junk.der").write_bytes(b"junk")
    for _ in range(2):
        assert await status_of(trust, cert) == "Good"
    assert len(log.events("bms_trust_file_unreadable")) == 1


async def test_trust_on_first_use_only_when_asked(tmp_path: Path) -> None:
    log = ListLog()
    trust = client_trust(tmp_path, True, log=log)
    cert = make_cert(tmp_path)
    assert await status_of(trust, cert) == "Good"
    [line] = log.events("bms_client_trusted_on_first_use")
    assert line["thumbprint_sha256"] == thumbprint(cert.public_bytes(Encoding.DER))
    [kept] = list((tmp_path / "pki" / "bms" / "trusted").iterdir())
    assert kept.read_bytes() == cert.public_bytes(Encoding.DER)
    # and a later validator without TOFU still trusts it (it is in the folder now)
    assert await status_of(client_trust(tmp_path, False, log=ListLog()), cert) == "Good"
    # first use only: once something is trusted, another unknown client needs the mv
    other = make_cert(tmp_path)
    assert await status_of(trust, other) == "BadCertificateUntrusted"
    assert [p.read_bytes() for p in (tmp_path / "pki" / "bms" / "rejected").iterdir()] == [
        other.public_bytes(Encoding.DER)
    ]
    assert len(log.events("bms_client_untrusted")) == 1


async def test_an_invalid_certificate_is_not_trusted_even_on_first_use(tmp_path: Path) -> None:
    """A certificate whose URI is not the client's is refused before trust is considered."""
    log = ListLog()
    trust = client_trust(tmp_path, True, log=log)
    cert = make_cert(tmp_path, uri="urn:someone:else")
    assert await status_of(trust, cert) == "BadCertificateUriInvalid"
    assert list((tmp_path / "pki" / "bms" / "trusted").iterdir()) == []
    assert len(log.events("bms_client_certificate_invalid")) == 1
    # trusted but expired: refused as such
    trust2 = client_trust(tmp_path / "b", False, log=ListLog())
    old = make_cert(tmp_path)
    (tmp_path / "b" / "pki" / "bms" / "trusted" / "old.der").write_bytes(
        old.public_bytes(Encoding.DER)
    )
    assert await status_of(trust2, old) == "Good"
    real_now = dt.datetime.now(dt.UTC)

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> dt.datetime:  # type: ignore[override]
            return real_now + dt.timedelta(days=400)

    import asyncua.crypto.validator as validator

    orig = validator.datetime
    validator.datetime = Later  # type: ignore[misc]
    try:
        assert await status_of(trust2, old) == "BadCertificateTimeInvalid"
    finally:
        validator.datetime = orig  # type: ignore[misc]


async def test_rejected_folder_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pki, "MAX_REJECTED", 3)
    log = ListLog()
    trust = client_trust(tmp_path, False, log=log)
    for _ in range(6):
        assert await status_of(trust, make_cert(tmp_path)) == "BadCertificateUntrusted"
    assert len(list((tmp_path / "pki" / "bms" / "rejected").iterdir())) == 3
    lines = log.events("bms_client_untrusted")
    assert len(lines) == 6 and [ln["saved"] is None for ln in lines] == [False] * 3 + [True] * 3


# ---- over a real asyncua server ----


async def test_client_trust_over_a_real_server(tmp_path: Path) -> None:
    """An untrusted client opens no session (its certificate waits in rejected/); after the
    logged mv, the same client logs in, with the server still running."""
    state = tmp_path / "state"
    users = state / "bms_users.json"
    add_user(users, "alice", "operator", PW)
    certs = await client_cert(tmp_path / "client")
    async with bms_test_server(state, users, validate_clients=True) as s:
        assert await refused(s.url, certs, "alice", PW) == "BadCertificateUntrusted"
        [line] = s.log.events("bms_client_untrusted")
        assert line["thumbprint_sha256"] == thumbprint(certs[0].read_bytes())
        assert s.log.events("bms_login") == [], "no session got as far as a login"
        saved, dest = line["trust"].removeprefix("mv ").split(" ")
        shutil.move(saved, dest)
        c = await connect(s.url, certs, "alice", PW)
        try:
            assert await c.nodes.server_state.read_value() == 0
        finally:
            await c.disconnect()


async def test_trust_on_first_use_over_a_real_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    users = state / "bms_users.json"
    add_user(users, "alice", "operator", PW)
    certs = await client_cert(tmp_path / "client")
    async with bms_test_server(state, users, validate_clients=True, tofu=True) as s:
        c = await connect(s.url, certs, "alice", PW)
        await c.disconnect()
        trusted = state / "pki" / "bms" / "trusted"
        assert [p.read_bytes() for p in trusted.iterdir()] == [certs[0].read_bytes()]
