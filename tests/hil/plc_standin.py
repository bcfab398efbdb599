"""An asyncua server shaped like a PLC's OPC UA server, for the session and trust tests.

Like a PLC (and unlike asyncua's default) it keeps a session whose connection went away until
the session times out, allows at most `max_sessions` sessions (a third CreateSession answers
BadTooManySessions, as an S7-1500 with its HMI and SCADA slots taken does), counts them, and
can be told to refuse or stall the services a connect uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.server.internal_session import SessionState
from asyncua.server.uaprocessor import UaProcessor
from cryptography.x509.oid import ExtendedKeyUsageOID

from plc_io.site import Site

try:  # tests/hil may or may not be a package
    from tests.hil.conftest import fast_site
except ImportError:
    from conftest import fast_site  # type: ignore[no-redef]

NAMESPACE = "urn:heatloop:plc"
SERVER_URI = "urn:heatloop:test:plc"


def opcua_site(folder: Path, port: int, **opcua: object) -> Site:
    """The fast demo site over OPC UA to 127.0.0.1:`port`, its state under `folder`."""
    site = fast_site()
    cfg = site.plc.opcua.model_copy(update={"endpoint": f"opc.tcp://127.0.0.1:{port}/", **opcua})
    # a short back-off, so ten failed connects take seconds
    plc = site.plc.model_copy(update={"transport": "opcua", "reconnect_max_s": 0.2, "opcua": cfg})
    return site.model_copy(update={"plc": plc, "folder": folder})


class PlcStandIn:
    """`fault`: None, "resolve" (TranslateBrowsePaths refused), "subscribe" (CreateSubscription
    refused) or "stall" (TranslateBrowsePaths answers after `stall_s`, long past the client's
    timeout; the PLC serves one request at a time per connection, so a CloseSession sent on that
    connection waits too)."""

    def __init__(self, site: Site, port: int, *, max_sessions: int = 2) -> None:
        self.site = site
        self.port = port
        self.url = f"opc.tcp://127.0.0.1:{port}/"
        self.max_sessions = max_sessions
        self.fault: str | None = None
        self.stall_s = 3.0
        self.created = 0  # CreateSession requests granted
        self.refused = 0  # CreateSession requests answered BadTooManySessions
        self.peak = 0  # most sessions open at once
        self.server = Server()
        self.cert_path: Path | None = None

    def live(self) -> int:
        sessions = self.server.iserver._external_sessions.values()
        return sum(1 for s in sessions if s.state is not SessionState.Closed)

    async def start(self, *, cert_dir: Path | None = None) -> PlcStandIn:
        """Start; with `cert_dir`, only Basic256Sha256 SignAndEncrypt, with the certificate in
        that folder (made there if missing)."""
        server = self.server
        await server.init()
        server.set_endpoint(self.url)
        await server.set_application_uri(SERVER_URI)
        if cert_dir is not None:
            key, cert = cert_dir / "plc-key.pem", cert_dir / "plc-cert.der"
            self.cert_path = cert
            await cert_gen.setup_self_signed_certificate(
                key, cert, SERVER_URI, "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH], {}
            )
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(ua.NodeId("PLC", ns), f"{ns}:PLC")
        for t in self.site.tags:
            vt = ua.VariantType.Boolean if t.is_bool else ua.VariantType.Double
            value: Any = False if t.is_bool else float(t.lo)
            node = ua.NodeId(f"PLC.{t.name}", ns)
            var = await folder.add_variable(node, f"{ns}:{t.name}", value, vt)
            if t.is_output:
                await var.set_writable()
        self._instrument()
        await server.start()
        return self

    def cert_der(self) -> bytes:
        """The certificate this PLC presents (DER)."""
        assert self.cert_path is not None, "started without security"
        return self.cert_path.read_bytes()

    async def stop(self) -> None:
        await self.server.stop()

    def _instrument(self) -> None:
        iserver = self.server.iserver
        create = iserver.create_session

        def create_session(name: str, *args: Any, **kw: Any) -> Any:
            if kw.get("external") and self.live() >= self.max_sessions:
                self.refused += 1
                raise ServiceError(ua.StatusCodes.BadTooManySessions)
            session = create(name, *args, **kw)
            if kw.get("external"):
                self.created += 1
                self.peak = max(self.peak, self.live())
                self._faulty(session)
            return session

        iserver.create_session = create_session

    def _faulty(self, session: Any) -> None:
        translate = session.translate_browsepaths_to_nodeids
        subscribe = session.create_subscription

        async def translate_browsepaths_to_nodeids(params: Any) -> Any:
            if self.fault == "resolve":
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            if self.fault == "stall":
                await asyncio.sleep(self.stall_s)
            return await translate(params)

        async def create_subscription(*args: Any, **kw: Any) -> Any:
            if self.fault == "subscribe":
                raise ServiceError(ua.StatusCodes.BadTooManySubscriptions)
            return await subscribe(*args, **kw)

        session.translate_browsepaths_to_nodeids = translate_browsepaths_to_nodeids
        session.create_subscription = create_subscription


def keep_sessions_like_a_plc(monkeypatch: Any) -> None:
    """asyncua's server closes a session without subscriptions when its connection drops; a PLC
    keeps it until the session timeout (OPC UA Part 4 §5.6.2), which is what leaks sessions."""
    monkeypatch.setattr(UaProcessor, "_should_close_session_on_transport_loss", lambda self: False)
