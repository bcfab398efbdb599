"""Which OPC UA server certificates heatloop accepts from the PLC.

Theory of operation. With a security policy, the PLC's certificate is what stops a man in the
middle: the secure channel is encrypted to it and the session is signed by its key. asyncua
accepts any certificate the server lists, so heatloop decides itself, before any session
exists: the certificate the PLC's endpoint presents is trusted only if it is

- the one pinned by `[plc.opcua] server_certificate` (DER or PEM), or
- byte for byte one of the certificates in `<state dir>/pki/plc/trusted/` (DER or PEM files,
  read again at every connect attempt, so trusting one is a `mv` and no restart), or
- the first one ever seen, when `trust_on_first_use = true` and nothing is trusted yet (the
  trusted folder holds no file at all and nothing is pinned): it is then stored in `trusted/`.

Anything else is refused: it is saved in `<state dir>/pki/plc/rejected/` under its SHA-256
thumbprint and one log line `plc_certificate_untrusted` names the thumbprint, the subject and
the `mv` that trusts it. Certificates are trusted one by one, by identity; a CA chain, the
validity period or the application URI do not make a certificate trusted (a PLC's certificate
is normally self-signed and replaced only by a deliberate act, which then needs the `mv`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


@dataclass(frozen=True)
class CertInfo:
    der: bytes
    thumbprint: str  # SHA-256 of the DER, as `openssl x509 -fingerprint -sha256` prints it
    subject: str

    @property
    def file_name(self) -> str:
        return "plc-" + self.thumbprint.replace(":", "").lower()[:16] + ".der"


def cert_info(der: bytes) -> CertInfo:
    """The thumbprint and subject of a DER certificate (ValueError if it is not one)."""
    cert = x509.load_der_x509_certificate(der)
    digest = hashlib.sha256(der).hexdigest().upper()
    thumb = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    return CertInfo(der, thumb, cert.subject.rfc4514_string())


def load_cert_file(path: Path) -> bytes:
    """A certificate file (DER or PEM) as DER; ValueError naming the file if it is neither."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read certificate: {e.strerror or e}") from e
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
        return x509.load_der_x509_certificate(data).public_bytes(Encoding.DER)
    except ValueError as e:
        raise ValueError(f"{path}: not a DER or PEM X.509 certificate ({e})") from e


class PlcCertificateUntrusted(Exception):
    """The PLC presented a certificate heatloop does not trust; the connect must fail."""

    def __init__(self, info: CertInfo, saved: Path | None, command: str) -> None:
        self.info = info
        self.saved = saved
        self.command = command
        super().__init__(
            f"PLC certificate untrusted: sha256 {info.thumbprint}, subject {info.subject!r}; "
            f"to trust it: {command}"
        )


class PlcTrust:
    """The trust decision for the PLC's certificate (see the module docstring)."""

    def __init__(
        self, state_dir: Path, *, pinned: Path | None, trust_on_first_use: bool, log: Any
    ) -> None:
        base = state_dir / "pki" / "plc"
        self.trusted_dir = base / "trusted"
        self.rejected_dir = base / "rejected"
        self.tofu = trust_on_first_use
        self._log = log
        # a pinned file that is missing or broken is a configuration error: fail at start-up
        self.pinned = load_cert_file(pinned) if pinned is not None else None
        self._refused: set[str] = set()  # thumbprints logged as refused, one line each
        self._unreadable: set[str] = set()

    def _trusted(self) -> tuple[set[bytes], bool]:
        """The trusted certificates (DER), and whether the folder holds any file at all."""
        if not self.trusted_dir.is_dir():
            return set(), False
        found: set[bytes] = set()
        any_file = False
        for p in sorted(self.trusted_dir.iterdir()):
            if not p.is_file():
                continue
            any_file = True
            try:
                found.add(load_cert_file(p))
            except ValueError as e:
                if str(p) not in self._unreadable:
                    self._unreadable.add(str(p))
                    self._log.warning("plc_trust_file_unreadable", path=str(p), error=str(e))
        return found, any_file

    def check(self, der: bytes) -> CertInfo:
        """Accept the certificate or raise PlcCertificateUntrusted (saved in rejected/)."""
        try:
            info = cert_info(der)
        except ValueError as e:
            raise ValueError(f"the PLC presented a certificate that does not parse: {e}") from e
        trusted, any_file = self._trusted()
        if der == self.pinned or der in trusted:
            self._refused.discard(info.thumbprint)
            return info
        if self.tofu and self.pinned is None and not any_file:
            self.trusted_dir.mkdir(parents=True, exist_ok=True)
            path = self.trusted_dir / info.file_name
            path.write_bytes(der)
            self._log.warning(
                "plc_certificate_trusted_on_first_use",
                thumbprint_sha256=info.thumbprint,
                subject=info.subject,
                path=str(path),
            )
            return info
        saved: Path | None = self.rejected_dir / info.file_name
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            assert saved is not None
            saved.write_bytes(der)
        except OSError:
            saved = None  # refused all the same; the log still names the thumbprint
        command = (
            f"mv {saved} {self.trusted_dir}/"
            if saved is not None
            else f"save the PLC's certificate into {self.trusted_dir}/"
        )
        if info.thumbprint not in self._refused:
            self._refused.add(info.thumbprint)
            self._log.error(
                "plc_certificate_untrusted",
                thumbprint_sha256=info.thumbprint,
                subject=info.subject,
                saved=str(saved) if saved is not None else None,
                trust=command,
            )
        raise PlcCertificateUntrusted(info, saved, command)
