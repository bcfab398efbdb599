"""A real asyncua server with the BMS server's user manager, certificate and client trust, and a
real asyncua client, on 127.0.0.1 (for the users and PKI tests)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Client, Server, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from controller.bms_pki import ClientTrust, client_trust, server_certificate
from controller.bms_server import _CONNECTION, install_connection_context
from controller.bms_users import BmsUserManager, UserStore

APP_URI = "urn:heatloop:test:bms"
CLIENT_URI = "urn:heatloop:test:client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ListLog:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.lines.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.lines if e == name]


def channel_encrypted() -> bool | None:
    """Whether the connection being served encrypts (SignAndEncrypt); None if unknown."""
    proc = _CONNECTION.get()
    if proc is None:
        return None
    return bool(proc._connection.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt)


@dataclass
class BmsTestServer:
    server: Server
    url: str
    users: BmsUserManager
    trust: ClientTrust | None
    log: ListLog
    state_dir: Path


@contextlib.asynccontextmanager
async def bms_test_server(
    state_dir: Path,
    users_file: Path,
    *,
    none_policy: bool = False,
    allow_anonymous: bool = False,
    validate_clients: bool = False,
    tofu: bool = False,
) -> AsyncIterator[BmsTestServer]:
    """Basic256Sha256 Sign and SignAndEncrypt (plus None when asked), username tokens
    (plus anonymous when allowed), the BMS user manager; with `validate_clients`, the trust
    folder decides which client certificates may open a session."""
    log = ListLog()
    install_connection_context()
    users = BmsUserManager(
        UserStore(users_file, log=log),
        allow_anonymous=allow_anonymous,
        log=log,
        peer=lambda: getattr(_CONNECTION.get(), "name", None),
        channel_encrypted=channel_encrypted,
    )
    server = Server()
    users.install(server.iserver)
    await server.init()
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/heatloop"
    server.set_endpoint(url)
    await server.set_application_uri(APP_URI)
    server.allow_remote_admin(False)
    policies = [
        ua.SecurityPolicyType.Basic256Sha256_Sign,
        ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ]
    if none_policy:
        policies.append(ua.SecurityPolicyType.NoSecurity)
    server.set_security_policy(policies)
    tokens: list[type] = [ua.UserNameIdentityToken]
    if allow_anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    cert, key = server_certificate(state_dir, APP_URI, "127.0.0.1", log=log)
    await server.load_certificate(str(cert))
    await server.load_private_key(str(key))
    trust = None
    if validate_clients:
        trust = client_trust(state_dir, tofu, log=log)
        server.set_certificate_validator(trust)
    await server.start()
    try:
        yield BmsTestServer(server, url, users, trust, log, state_dir)
    finally:
        await server.stop()


async def client_cert(folder: Path, uri: str = CLIENT_URI) -> tuple[Path, Path]:
    c = Client("opc.tcp://127.0.0.1:1")
    c.application_uri = uri
    return await c.setup_self_signed_certificate(folder / "client-key.pem", folder / "client.der")


async def connect(
    url: str,
    certs: tuple[Path, Path] | None,
    user: str | None = None,
    password: str | None = None,
    *,
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
    uri: str = CLIENT_URI,
    plain_password: bool = False,
) -> Client:
    """A connected client (the caller disconnects); `certs` None: a None secure channel;
    `plain_password`: the password goes in clear in its token whatever the endpoint asks."""
    c = Client(url, timeout=10)
    c.application_uri = uri
    if plain_password:
        asked = c.server_policy

        def server_policy(token_type: ua.UserTokenType) -> ua.UserTokenPolicy:
            policy = asked(token_type)
            if token_type == ua.UserTokenType.UserName:
                policy = ua.UserTokenPolicy(
                    PolicyId=policy.PolicyId, TokenType=policy.TokenType, SecurityPolicyUri=None
                )
            return policy

        c.server_policy = server_policy  # type: ignore[method-assign]
    if certs is not None:
        await c.set_security(SecurityPolicyBasic256Sha256, str(certs[0]), str(certs[1]), mode=mode)
    if user is not None:
        c.set_user(user)
    if password is not None:
        c.set_password(password)
    await c.connect()
    return c


async def refused(url: str, certs: tuple[Path, Path] | None, *args: Any, **kw: Any) -> str:
    """Connect must fail; the status name it failed with (or the exception's name)."""
    try:
        c = await connect(url, certs, *args, **kw)
    except ua.UaStatusCodeError as e:
        return ua.StatusCode(e.code).name
    except Exception as e:  # the client's way of failing is not the point
        return type(e).__name__
    await c.disconnect()
    raise AssertionError("the session was accepted")
