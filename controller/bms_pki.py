"""The BMS server's certificates: its own certificate and key, and which clients it trusts.

Theory of operation. Files live under `<state dir>/pki/bms/`:

- `own/cert.der` + `own/key.pem`: the server's self-signed application instance certificate
  (RSA 2048, SHA-256, the application URI and the host names in subjectAltName). Created on
  first start, kept while it is valid and matches (its key, the application URI, the names),
  created again when it has expired or is about to, or no longer matches. The key is written
  0600 in a 0700 folder, atomically (a crash never leaves half a key). asyncua's
  `setup_self_signed_certificate` is not used as is because it takes one host name and writes
  the key with the process umask; its building blocks (`generate_private_key`,
  `generate_self_signed_app_certificate`) are.
- `trusted/`: client certificates (DER or PEM) accepted at CreateSession, byte for byte, read
  again whenever the folder's listing changes (trusting a BMS is a `mv`, no restart; an empty
  or missing folder simply trusts nobody, unlike asyncua's TrustStore which fails on it).
- `rejected/`: an unknown client's certificate is saved here under its thumbprint, with one
  log line naming the thumbprint, the subject and the `mv` that trusts it; the session is
  refused (BadCertificateUntrusted). With `trust_on_first_use`, while `trusted/` holds no
  file at all, it is saved in `trusted/` instead (logged) and accepted: the first BMS is
  trusted on first use, any later one needs the `mv` (as for the PLC's certificate). At most
  `MAX_REJECTED` files are kept, so a client sending fresh certificates cannot fill the disk.

A trusted certificate must still be valid now and carry the client's application URI
(asyncua's basic validation: BadCertificateTimeInvalid / BadCertificateUriInvalid).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from controller.bms_users import write_atomic
from plc_io.plc_trust import CertInfo, cert_info, load_cert_file

VALID_DAYS = 5 * 365  # every renewal means every BMS must trust the server again
RENEW_BEFORE = dt.timedelta(days=7)
MAX_REJECTED = 100
MAX_TRUSTED_FILES = 1000
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def bms_pki_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "pki" / "bms"


def host_names(host: str) -> list[str]:
    """The names and addresses the server's certificate carries: the configured host (unless
    it is the any-address), this machine's host names, localhost and 127.0.0.1."""
    names: list[str] = []
    # no getfqdn(): a reverse DNS lookup can hang for seconds at start, and the controller
    # restarts a BMS server process that stays silent
    for n in (host, socket.gethostname(), "localhost", "127.0.0.1"):
        n = (n or "").strip()
        if n and n not in _ANY_ADDRESS and n not in names:
            names.append(n)
    return names


def _general_names(app_uri: str, names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def _keep(
    cert_path: Path, key_path: Path, app_uri: str, names: list[str], now: dt.datetime
) -> str | None:
    """None if the existing pair can be kept, else why it is made again."""
    if not key_path.is_file() or not cert_path.is_file():
        return "absent"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        return f"unreadable: {str(e)[:100]}"
    if not isinstance(key, rsa.RSAPrivateKey) or cert.public_key() != key.public_key():
        return "the certificate is not the key's"
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now + dt.timedelta(days=1):
        return f"not valid before {cert.not_valid_before_utc.isoformat()}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    if app_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
        return f"the application URI is not {app_uri}"
    present = set(_general_names(app_uri, names))
    if not present <= set(san):
        return "a host name is missing"
    return None


def server_certificate(
    state_dir: Path, app_uri: str, host: str, *, log: Any = None, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """The server's certificate (DER) and key (PEM) paths, created or renewed if needed."""
    from asyncua.crypto import cert_gen
    from cryptography.x509.oid import ExtendedKeyUsageOID

    log = log if log is not None else structlog.get_logger("heatloop.bms")
    now = now if now is not None else dt.datetime.now(dt.UTC)
    own = bms_pki_dir(state_dir) / "own"
    own.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(own, 0o700)
    cert_path, key_path = own / "cert.der", own / "key.pem"
    names = host_names(host)
    why = _keep(cert_path, key_path, app_uri, names, now)
    if why is None:
        if key_path.stat().st_mode & 0o077:  # someone widened it: narrow it again
            os.chmod(key_path, 0o600)
            log.warning("bms_key_mode_fixed", path=str(key_path))
        return cert_path, key_path
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "heatloop BMS server",
        {"organizationName": "heatloop"},
        _general_names(app_uri, names),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=VALID_DAYS,
    )
    # the key first: a crash between the two leaves a key without its certificate, which the
    # next start sees as "not the key's" and makes again
    write_atomic(key_path, cert_gen.dump_private_key_as_pem(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(Encoding.DER), 0o644)
    info = cert_info(cert.public_bytes(Encoding.DER))
    log.warning(
        "bms_certificate_created",
        reason=why,
        path=str(cert_path),
        thumbprint_sha256=info.thumbprint,
        application_uri=app_uri,
        names=names,
        valid_until=cert.not_valid_after_utc.isoformat(),
    )
    return cert_path, key_path


def _file_name(info: CertInfo) -> str:
    return "client-" + info.thumbprint.replace(":", "").lower()[:16] + ".der"


class ClientTrust:
    """The certificate validator the BMS server installs (`server.set_certificate_validator`):
    an async callable (certificate, ApplicationDescription) that raises asyncua's ServiceError
    to refuse the session (see the module docstring)."""

    def __init__(self, state_dir: Path, trust_on_first_use: bool, *, log: Any = None) -> None:
        base = bms_pki_dir(state_dir)
        self.trusted_dir = base / "trusted"
        self.rejected_dir = base / "rejected"
        self.tofu = trust_on_first_use
        self.log = log if log is not None else structlog.get_logger("heatloop.bms")
        for d in (self.trusted_dir, self.rejected_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._listing: tuple[tuple[str, int, int], ...] | None = None
        self._trusted: frozenset[bytes] = frozenset()
        self._unreadable: set[str] = set()
        self._logged: set[tuple[str, str]] = set()  # (why, thumbprint) logged, one line each

    def trusted(self) -> frozenset[bytes]:
        """The trusted certificates (DER), read again when the folder's listing changes."""
        try:
            entries = sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_size)
                for e in os.scandir(self.trusted_dir)
                if e.is_file()
            )[:MAX_TRUSTED_FILES]
        except OSError:
            entries = []
        listing = tuple(entries)
        if listing != self._listing:
            found: set[bytes] = set()
            for name, _, _ in listing:
                p = self.trusted_dir / name
                try:
                    found.add(load_cert_file(p))
                except ValueError as e:
                    if str(p) not in self._unreadable:
                        self._unreadable.add(str(p))
                        self.log.warning("bms_trust_file_unreadable", path=str(p), error=str(e))
            self._listing, self._trusted = listing, frozenset(found)
        return self._trusted

    def decide(self, der: bytes) -> tuple[bool, CertInfo]:
        """(accepted, info): trusted, or trusted now on first use; else saved in rejected/."""
        info = cert_info(der)
        if der in self.trusted():
            return True, info
        if self.tofu and not self._listing:
            # first use only: while trusted/ holds no file at all, as for the PLC's certificate
            # (plc_io/plc_trust.py); a setting left on cannot let every later client in
            path = self.trusted_dir / _file_name(info)
            write_atomic(path, der, 0o644)
            self.log.warning(
                "bms_client_trusted_on_first_use",
                thumbprint_sha256=info.thumbprint,
                subject=info.subject,
                path=str(path),
            )
            self._listing = None
            return True, info
        saved: Path | None = self.rejected_dir / _file_name(info)
        assert saved is not None
        try:
            if not saved.exists():
                if sum(1 for _ in self.rejected_dir.iterdir()) >= MAX_REJECTED:
                    saved = None  # full: refused all the same, logged without a copy
                else:
                    write_atomic(saved, der, 0o644)
        except OSError:
            saved = None
        if ("untrusted", info.thumbprint) not in self._logged:
            if len(self._logged) > 10 * MAX_REJECTED:  # bounded: a flood may log again
                self._logged.clear()
            self._logged.add(("untrusted", info.thumbprint))
            self.log.error(
                "bms_client_untrusted",
                thumbprint_sha256=info.thumbprint,
                subject=info.subject,
                saved=str(saved) if saved is not None else None,
                trust=(
                    f"mv {saved} {self.trusted_dir}/"
                    if saved is not None
                    else f"save the client's certificate into {self.trusted_dir}/"
                ),
            )
        return False, info

    async def __call__(self, cert: x509.Certificate, app_description: Any) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

        der = cert.public_bytes(Encoding.DER)
        try:
            # valid now and carrying the client's application URI, trusted or not: a
            # certificate that fails this is neither trusted on first use nor kept
            await CertificateValidator(
                CertificateValidatorOptions.BASIC_VALIDATION
                | CertificateValidatorOptions.PEER_CLIENT
            )(cert, app_description)
        except ServiceError as e:
            info = cert_info(der)
            if ("invalid", info.thumbprint) not in self._logged:
                self._logged.add(("invalid", info.thumbprint))
                self.log.error(
                    "bms_client_certificate_invalid",
                    thumbprint_sha256=info.thumbprint,
                    subject=info.subject,
                    status=ua.StatusCode(e.code).name,
                    application_uri=str(getattr(app_description, "ApplicationUri", ""))[:200],
                )
            raise
        ok, _ = self.decide(der)
        if not ok:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


def client_trust(state_dir: Path, trust_on_first_use: bool, *, log: Any = None) -> ClientTrust:
    """The validator for `server.set_certificate_validator(...)`."""
    return ClientTrust(state_dir, trust_on_first_use, log=log)
