"""BMS users: scrypt hashes, the users file, the login check, over a real asyncua server.

Invariants: a password is never stored or accepted in clear (only a salted scrypt hash is kept;
a password over an unencrypted channel is refused); nobody gets asyncua's Admin role; a broken
users file lets nobody in and never raises into the server; guessing a password cannot pin the
CPU (a locked name is refused without running scrypt); a crafted hash cannot make a login slow.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.crypto.permission_rules import UserRole
from hypothesis import given, settings
from hypothesis import strategies as st

import controller.bms_users as bu
from controller.bms_users import (
    ANONYMOUS,
    BmsUserManager,
    LoginLimiter,
    UsersError,
    UserStore,
    add_user,
    hash_password,
    parse_hash,
    parse_users,
    read_users,
    remove_user,
    users_path,
    verify_password,
)
from controller.cli import main
from plc_io.site import SiteError, demo_site, demo_site_text, loads_site

try:
    from tests.unit.bms_helpers import ListLog, bms_test_server, client_cert, connect, refused
except ImportError:  # pragma: no cover - run from tests/unit
    from bms_helpers import (  # type: ignore[no-redef]
        ListLog,
        bms_test_server,
        client_cert,
        connect,
        refused,
    )

PW = "correct horse battery"  # 21 characters
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Count scrypt runs (the CPU cost of a login) while still running them."""
    calls: list[tuple[int, int, int]] = []
    real = hashlib.scrypt

    def counting(pw: bytes, **kw: Any) -> bytes:
        calls.append((kw["n"], kw["r"], kw["p"]))
        return real(pw, **kw)

    monkeypatch.setattr(bu.hashlib, "scrypt", counting)
    return calls


# ---- hashes ----


def test_hash_format_and_verify() -> None:
    h = hash_password(PW)
    kind, n, r, p, salt, key = h.split("$")
    assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    # the key is scrypt itself (RFC 7914) of the UTF-8 password, not anything home-made
    assert base64.b64decode(key) == hashlib.scrypt(
        PW.encode(), salt=base64.b64decode(salt), n=16384, r=8, p=1, dklen=32
    )
    assert verify_password(PW, h)
    assert not verify_password(PW + "x", h)
    assert not verify_password("", h)
    assert hash_password(PW) != h, "the salt is random: the same password hashes differently"


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "garbage",
        "scrypt$16384$8$1$AAAA",
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16384$8$1$not*base64$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$-1$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        None,
        12345,
    ],
)
def test_verify_never_raises_on_a_malformed_hash(stored: Any, scrypt_calls: list[Any]) -> None:
    assert verify_password(PW, stored) is False
    assert scrypt_calls == []


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        (2**21, 8, 1),  # N beyond 2**20
        (2**20, 8, 1),  # 1 GiB of memory
        (2**14, 8, 16),  # 16× the time
        (2**14, 1000, 1),
        (2**14, 8, 100),
        (2**62, 8, 1),
    ],
)
def test_a_crafted_costly_hash_is_refused_without_running_scrypt(
    n: int, r: int, p: int, scrypt_calls: list[Any]
) -> None:
    """A users file edited to ask for minutes or gigabytes per login costs nothing."""
    salt = base64.b64encode(bytes(16)).decode()
    key = base64.b64encode(bytes(32)).decode()
    stored = f"scrypt${n}${r}${p}${salt}${key}"
    assert verify_password(PW, stored) is False
    assert scrypt_calls == []
    with pytest.raises(UsersError, match="hash: "):
        parse_hash(stored)


def test_verify_refuses_odd_passwords_without_raising() -> None:
    h = hash_password(PW)
    assert verify_password("\ud800 lone surrogate", h) is False
    assert verify_password("x" * 100_000, h) is False
    assert verify_password(None, h) is False  # type: ignore[arg-type]


# ---- the users file ----


def test_add_user_writes_0600_and_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "state" / "bms_users.json"
    assert add_user(path, "alice", "operator", PW) is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the state directory it creates stays reachable for the operators' group (the command
    # socket lives there), as the controller would make it
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o070 == (~_umask()) & 0o070
    raw = path.read_text(encoding="utf-8")
    assert PW not in raw
    doc = json.loads(raw)
    assert doc["version"] == 1
    entry = doc["users"]["alice"]
    assert entry["role"] == "operator" and verify_password(PW, entry["hash"])
    assert isinstance(entry["changed_wall"], float)
    assert add_user(path, "alice", "engineer", PW + "!") is True  # replaced
    assert read_users(path)["alice"]["role"] == "engineer"
    assert add_user(path, "bob@site.example", "viewer", PW) is False
    assert set(read_users(path)) == {"alice", "bob@site.example"}
    assert remove_user(path, "alice") is True
    assert remove_user(path, "alice") is False
    assert set(read_users(path)) == {"bob@site.example"}
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_users_path_is_in_the_state_dir(tmp_path: Path) -> None:
    site = demo_site(tmp_path)
    assert users_path(site) == site.state_dir / "bms_users.json"


@pytest.mark.parametrize(
    ("name", "role", "password", "fragment"),
    [
        (
            "alice",
            "operator",
            "short pw",
            "password: 8 characters: expected at least 12 characters",
        ),
        ("alice", "admin", PW, "role: 'admin': expected one of viewer, operator, engineer"),
        ("", "viewer", PW, "user name: '': expected 1-64 characters"),
        ("a b", "viewer", PW, "user name: 'a b': expected 1-64 characters"),
        ("x" * 65, "viewer", PW, "user name: 'xxxx"),
        ("root;rm", "viewer", PW, "user name: 'root;rm'"),
        ("alice", "viewer", "p" * 1025, "expected at most 1024 characters"),
    ],
)
def test_add_user_refuses_bad_input_with_one_line(
    tmp_path: Path, name: str, role: str, password: str, fragment: str
) -> None:
    path = tmp_path / "bms_users.json"
    with pytest.raises(UsersError) as e:
        add_user(path, name, role, password)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not path.exists()


BROKEN_FILES = {
    "not_utf8": (b'{"version": 1, "users": {"\xe9": {}}}', "expected UTF-8 text: byte 0xe9"),
    "not_json": (b"users: alice", "expected JSON"),
    "array": (b"[]", "expected a JSON object"),
    "version": (b'{"version": 2, "users": {}}', "version: 2: expected 1"),
    "users_list": (b'{"version": 1, "users": []}', "users: []: expected an object"),
    "bad_name": (
        json.dumps({"version": 1, "users": {"a b": {"role": "viewer", "hash": "x"}}}).encode(),
        "users.a b: user name: 'a b'",
    ),
    "unknown_role": (
        json.dumps(
            {"version": 1, "users": {"eve": {"role": "admin", "hash": hash_password(PW)}}}
        ).encode(),
        "users.eve: role: 'admin': expected one of viewer, operator, engineer",
    ),
    "malformed_hash": (
        json.dumps({"version": 1, "users": {"eve": {"role": "viewer", "hash": PW}}}).encode(),
        "users.eve: hash: expected scrypt$N$r$p$salt$key",
    ),
    "duplicate_user": (
        b'{"version": 1, "users": {"eve": {"role": "viewer", "hash": "x"}, '
        b'"eve": {"role": "engineer", "hash": "x"}}}',
        "'eve': expected once, found twice",
    ),
    "costly_hash": (
        json.dumps(
            {
                "version": 1,
                "users": {
                    "eve": {
                        "role": "viewer",
                        "hash": "scrypt$1048576$8$1$AAAAAAAAAAAAAAAAAAAAAA==$"
                        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                    }
                },
            }
        ).encode(),
        "users.eve: hash: N·r·p",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_users_file_lets_nobody_in_and_says_why_once(
    tmp_path: Path, case: str, scrypt_calls: list[Any]
) -> None:
    path = tmp_path / "bms_users.json"
    add_user(path, "alice", "engineer", PW)
    data, fragment = BROKEN_FILES[case]
    # alice's good entry stays in the file next to the broken part where the case allows
    path.write_bytes(data)
    with pytest.raises(UsersError) as e:
        read_users(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)
    log = ListLog()
    store = UserStore(path, log=log)
    scrypt_calls.clear()
    for _ in range(3):
        assert store.role("alice") is None and store.role("eve") is None
        assert store.check("alice", PW) is None
    assert scrypt_calls == [], "an unusable file runs no scrypt"
    [line] = log.events("bms_users_unusable")
    assert fragment in line["error"]
    # and add_user will not overwrite what it cannot read
    with pytest.raises(UsersError):
        add_user(path, "bob", "viewer", PW)
    assert path.read_bytes() == data


def test_a_good_entry_next_to_a_bad_one_does_not_log_in(tmp_path: Path) -> None:
    """One bad user makes the whole file unusable: a half-read file is not what was meant."""
    path = tmp_path / "bms_users.json"
    add_user(path, "alice", "engineer", PW)
    doc = json.loads(path.read_text())
    doc["users"]["eve"] = {"role": "root", "hash": doc["users"]["alice"]["hash"]}
    path.write_text(json.dumps(doc))
    store = UserStore(path, log=ListLog())
    assert store.check("alice", PW) is None
    assert "users.eve: role: 'root'" in str(store.error)


def test_the_store_reads_the_file_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "bms_users.json"
    log = ListLog()
    store = UserStore(path, log=log)
    assert store.role("alice") is None and store.error is None  # no file: nobody, not an error
    assert len(log.events("bms_users_none")) == 1
    add_user(path, "alice", "operator", PW)
    assert store.check("alice", PW) == "operator"
    add_user(path, "alice", "engineer", PW)
    assert store.role("alice") == "engineer"
    path.write_bytes(b"nonsense")
    assert store.role("alice") is None
    path.unlink()
    add_user(path, "alice", "viewer", PW)
    assert store.role("alice") == "viewer" and store.error is None


def test_an_unknown_user_costs_the_same_scrypt(tmp_path: Path, scrypt_calls: list[Any]) -> None:
    """Timing must not say which names exist: an unknown name runs the same scrypt."""
    path = tmp_path / "bms_users.json"
    add_user(path, "alice", "operator", PW)
    store = UserStore(path, log=ListLog())
    scrypt_calls.clear()
    assert store.check("alice", "wrong password!") is None
    assert store.check("mallory", "wrong password!") is None
    assert scrypt_calls == [(16384, 8, 1), (16384, 8, 1)]


# ---- the limiter and the user manager (no server) ----


def test_limiter_locks_a_name_after_five_failures_in_a_minute() -> None:
    lim = LoginLimiter()
    for i in range(4):
        assert lim.failed("alice", 100.0 + i) is False
    assert not lim.locked("alice", 104.0)
    assert lim.failed("alice", 104.0) is True
    assert lim.locked("alice", 104.0) and lim.locked("alice", 163.9)
    assert not lim.locked("alice", 164.0)
    assert not lim.locked("bob", 110.0), "one name's lockout is not another's"


def test_limiter_forgets_failures_older_than_the_window() -> None:
    lim = LoginLimiter()
    for t in (0.0, 20.0, 40.0, 59.0):
        assert not lim.failed("alice", t)
    assert not lim.failed("alice", 61.0)  # the failure at 0 has left the window
    assert not lim.locked("alice", 61.0)
    lim.succeeded("alice")
    for t in (62.0, 63.0, 64.0, 65.0):
        assert not lim.failed("alice", t)


def test_limiter_memory_is_bounded() -> None:
    lim = LoginLimiter(max_names=100)
    for i in range(10_000):
        lim.failed(f"u{i}", 0.0)
    assert len(lim._fails) <= 100


def manager(tmp_path: Path, *, anonymous: bool = False) -> tuple[BmsUserManager, ListLog, Clock]:
    path = tmp_path / "bms_users.json"
    if not path.exists():
        add_user(path, "alice", "operator", PW)
        add_user(path, "erin", "engineer", PW)
    log, clock = ListLog(), Clock()
    m = BmsUserManager(UserStore(path, log=log), allow_anonymous=anonymous, log=log, clock=clock)
    return m, log, clock


CERT = b"0\x82 a client certificate (DER)"


def test_brute_force_is_refused_without_running_scrypt(
    tmp_path: Path, scrypt_calls: list[Any]
) -> None:
    m, log, clock = manager(tmp_path)
    scrypt_calls.clear()
    for i in range(5):
        assert m.get_user(None, "alice", f"guess number {i}", CERT) is None
    assert len(scrypt_calls) == 5
    assert log.events("bms_login_refused")[-1]["locked_for_s"] == 60.0
    for _ in range(100):  # the right password too: the name is locked
        assert m.get_user(None, "alice", PW, CERT) is None
    assert len(scrypt_calls) == 5, "a locked name runs no scrypt"
    assert len(log.events("bms_login_refused")) == 6, "one line for the lockout, not 100"
    assert m.get_user(None, "erin", PW, CERT) is not None, "another user is not locked out"
    clock.t += 60.0
    user = m.get_user(None, "alice", PW, CERT)
    assert user is not None and user.name == "alice"


def test_every_user_is_asyncua_user_never_admin(tmp_path: Path) -> None:
    m, _, _ = manager(tmp_path)
    for name in ("alice", "erin"):
        user = m.get_user(None, name, PW, CERT)
        assert user.role is UserRole.User and user.name == name
    assert m.role_of(m.get_user(None, "erin", PW, CERT)) == "engineer"
    assert m.role_of(m.get_user(None, "alice", PW, CERT)) == "operator"
    # the admin name of asyncua's default manager is nothing special here
    assert m.get_user(None, "admin", "anything at all", CERT) is None


def test_password_over_a_plain_channel_is_refused_unlooked(
    tmp_path: Path, scrypt_calls: list[Any]
) -> None:
    m, log, _ = manager(tmp_path)
    scrypt_calls.clear()
    for cert in (b"", None):
        assert m.get_user(None, "alice", PW, cert) is None
    assert scrypt_calls == []
    lines = log.events("bms_login_refused")
    assert len(lines) == 2 and all("unencrypted" in ln["why"] for ln in lines)
    assert lines[0]["user"] == "alice"


def test_anonymous_is_refused_by_default_and_read_only_when_allowed(tmp_path: Path) -> None:
    m, log, _ = manager(tmp_path)
    assert m.get_user(None, None, None, CERT) is None
    assert m.get_user(None, None, None, b"") is None
    assert "anonymous" in log.events("bms_login_refused")[0]["why"]
    m2, _, _ = manager(tmp_path, anonymous=True)
    user = m2.get_user(None, None, None, b"")
    assert user.role is UserRole.User and user.name == ANONYMOUS
    assert m2.role_of(user) == "viewer"


def test_role_of_follows_the_file(tmp_path: Path) -> None:
    """Removing a user or changing a role takes effect on sessions already open."""
    m, _, _ = manager(tmp_path)
    user = m.get_user(None, "alice", PW, CERT)
    add_user(tmp_path / "bms_users.json", "alice", "viewer", PW)
    assert m.role_of(user) == "viewer"
    remove_user(tmp_path / "bms_users.json", "alice")
    assert m.role_of(user) is None
    assert m.role_of(None) is None


@pytest.mark.parametrize("name", ["", "a b", "x" * 200, "\x00", 42, "(anonymous)"])
def test_odd_user_names_are_refused_without_raising(tmp_path: Path, name: Any) -> None:
    m, log, _ = manager(tmp_path)
    assert m.get_user(None, name, PW, CERT) is None
    assert len(log.events("bms_login_refused")) == 1


def test_a_bug_in_the_store_refuses_the_login_not_the_server(tmp_path: Path) -> None:
    m, log, _ = manager(tmp_path)

    def boom(*_: Any) -> None:
        raise RuntimeError("disk on fire")

    m.store.check = boom  # type: ignore[method-assign]
    assert m.get_user(None, "alice", PW, CERT) is None
    assert log.events("bms_login_error")


# ---- against a real asyncua server and client ----


async def test_logins_over_a_real_server(tmp_path: Path) -> None:
    """Good password in; wrong password, unknown user, anonymous and a password over a None
    channel refused (the server offers None here to provoke it); a user added while the
    server runs logs in without a restart; a removed one no longer does."""
    users = tmp_path / "state" / "bms_users.json"
    add_user(users, "alice", "operator", PW)
    certs = await client_cert(tmp_path / "client")
    async with bms_test_server(tmp_path / "state", users, none_policy=True) as s:
        c = await connect(s.url, certs, "alice", PW)
        try:
            assert await c.nodes.server_state.read_value() == 0  # Running
        finally:
            await c.disconnect()
        c = await connect(s.url, certs, "alice", PW, mode=ua.MessageSecurityMode.Sign)
        await c.disconnect()
        assert await refused(s.url, certs, "alice", "wrong password!") == "BadUserAccessDenied"
        assert await refused(s.url, certs, "nobody", PW) == "BadUserAccessDenied"
        assert await refused(s.url, None, "alice", PW) == "BadUserAccessDenied"
        assert await refused(s.url, certs) == "BadIdentityTokenRejected"
        why = [ln["why"] for ln in s.log.events("bms_login_refused")]
        assert sum("unencrypted" in w for w in why) == 1
        assert sum("wrong user name or password" in w for w in why) == 2

        assert await refused(s.url, certs, "bob", PW + "2") == "BadUserAccessDenied"
        add_user(users, "bob", "viewer", PW + "2")  # while the server runs
        c = await connect(s.url, certs, "bob", PW + "2")
        await c.disconnect()
        remove_user(users, "bob")
        assert await refused(s.url, certs, "bob", PW + "2") == "BadUserAccessDenied"


async def test_anonymous_over_a_real_server_when_allowed(tmp_path: Path) -> None:
    users = tmp_path / "state" / "bms_users.json"
    certs = await client_cert(tmp_path / "client")
    async with bms_test_server(tmp_path / "state", users, allow_anonymous=True) as s:
        c = await connect(s.url, certs)
        try:
            assert await c.nodes.server_state.read_value() == 0
        finally:
            await c.disconnect()
        assert s.log.events("bms_login_refused") == []


# ---- the CLI ----


def _site(tmp_path: Path) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(demo_site_text(), encoding="utf-8")
    return p


def test_cli_bms_user_adds_replaces_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _site(tmp_path)
    path = tmp_path / "state" / "bms_users.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(PW + "\n"))
    argv = ["bms", "user", "--site", str(site), "alice", "--role", "operator", "--password-stdin"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("added")
    assert read_users(path)["alice"]["role"] == "operator"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setattr(sys, "stdin", io.StringIO(PW + "!\n"))
    argv[6] = "engineer"
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("replaced")
    assert verify_password(PW + "!", read_users(path)["alice"]["hash"])
    assert main(["bms", "user", "--site", str(site), "alice", "--remove"]) == 0
    assert "removed" in capsys.readouterr().out
    assert read_users(path) == {}
    assert main(["bms", "user", "--site", str(site), "alice", "--remove"]) == 2
    assert "no such user" in capsys.readouterr().err


def test_cli_bms_user_asks_twice_without_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _site(tmp_path)
    answers = iter([PW, PW + "typo"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    argv = ["bms", "user", "--site", str(site), "alice", "--role", "viewer"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "passwords do not match" in err and len(err.strip().splitlines()) == 1
    answers = iter([PW, PW])
    assert main(argv) == 0
    assert read_users(tmp_path / "state" / "bms_users.json")["alice"]["role"] == "viewer"


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["alice", "--role", "viewer", "--password-stdin"], "short\n", "at least 12 characters"),
        (["alice", "--role", "viewer", "--password-stdin"], "", "at least 12 characters"),
        (["a b", "--role", "viewer", "--password-stdin"], PW + "\n", "user name: 'a b'"),
        (["alice", "--password-stdin"], PW + "\n", "--role"),
    ],
)
def test_cli_bms_user_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    stdin: str,
    fragment: str,
) -> None:
    site = _site(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["bms", "user", "--site", str(site), *args]) == 2
    out, err = capsys.readouterr()
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "state" / "bms_users.json").exists()


def test_cli_bms_user_as_a_process(tmp_path: Path) -> None:
    """The installed entry point, the password on stdin, nothing of it on the screen."""
    site = _site(tmp_path)
    argv = ["bms", "user", "--site", str(site), "ops", "--role", "operator", "--password-stdin"]
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", *argv],
        input=PW + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    assert PW not in r.stdout + r.stderr
    assert "added" in r.stdout
    assert read_users(tmp_path / "state" / "bms_users.json")["ops"]["role"] == "operator"


# ---- the site keys ----


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_sessions", "0", "bms.max_sessions: 0: expected a number ≥ 1"),
        ("max_sessions", "1001", "bms.max_sessions: 1001: expected a number ≤ 1000"),
        ("min_sampling_ms", "9", "bms.min_sampling_ms: 9: expected a number ≥ 10"),
        ("min_publishing_ms", "60001", "bms.min_publishing_ms: 60001: expected a number ≤ 60000"),
        ("min_publishing_ms", "100.5", "bms.min_publishing_ms: 100.5: expected a whole number"),
        ("allow_anonymous", "1", "bms.allow_anonymous: 1: expected true or false"),
        ("allow_none_security", '"no"', "bms.allow_none_security: 'no': expected true or false"),
        ("trust_on_first_use", "0", "bms.trust_on_first_use: 0: expected true or false"),
        ("enabled", '"yes"', "bms.enabled: 'yes': expected true or false"),
        ("port", "4841", "bms.port: 4841: expected a port other than sim.opcua_port"),
    ],
)
def test_bms_site_keys_are_checked_with_one_line(key: str, value: str, fragment: str) -> None:
    text = demo_site_text()
    head, tail = text.split("[bms]\n", 1)
    tail, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", tail, count=1, flags=re.M)
    assert n == 1
    with pytest.raises(SiteError) as e:
        loads_site(head + "[bms]\n" + tail)
    assert [str(p) for p in e.value.problems] == [fragment] or any(
        str(p).startswith(fragment) for p in e.value.problems
    ), e.value.problems
    assert len(e.value.problems) == 1


def test_bms_defaults_are_closed() -> None:
    """The demo site and a site without [bms] are closed: no None, no anonymous, no TOFU."""
    text = demo_site_text()
    head, tail = text.split("[bms]\n", 1)
    without = head + "[" + tail.split("\n[", 1)[1]
    assert "[bms]" not in without
    for t in (text, without):
        bms = loads_site(t).bms
        assert not (bms.allow_none_security or bms.allow_anonymous or bms.trust_on_first_use)
        assert bms.enabled and bms.max_sessions == 20
        assert (bms.min_sampling_ms, bms.min_publishing_ms) == (100, 100)


# ---- bms export ----


def test_cli_bms_export_writes_both_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = _site(tmp_path)
    assert main(["bms", "export", "--site", str(site), "--out", str(tmp_path / "out")]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(paths) == 2 and all(p.parent == tmp_path / "out" and p.is_file() for p in paths)
    assert {p.suffix for p in paths} == {".xml", ".csv"}
    monkeypatch.chdir(tmp_path)
    assert main(["bms", "export", "--site", str(site)]) == 0
    assert all(
        Path(p).parent.resolve() == tmp_path.resolve() for p in capsys.readouterr().out.split()
    )
    (tmp_path / "afile").write_text("x")
    assert main(["bms", "export", "--site", str(site), "--out", str(tmp_path / "afile")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "bms export" in err


def test_login_lines_name_the_remote_address_when_known(tmp_path: Path) -> None:
    m, log, _ = manager(tmp_path)
    m.peer = lambda: ("192.0.2.7", 50123)
    m.get_user(None, "alice", "wrong password!", CERT)
    m.get_user(None, "alice", PW, CERT)
    assert log.events("bms_login_refused")[-1]["remote"] == "('192.0.2.7', 50123)"
    assert log.events("bms_login")[-1]["remote"] == "('192.0.2.7', 50123)"

    def broken() -> object:
        raise RuntimeError("no connection")

    m.peer = broken
    assert m.get_user(None, "alice", PW, CERT) is not None


def test_a_users_file_others_can_read_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "bms_users.json"
    add_user(path, "alice", "operator", PW)
    path.chmod(0o644)
    log = ListLog()
    store = UserStore(path, log=log)
    assert store.check("alice", PW) == "operator"  # still works: the hashes are salted
    assert store.role("alice") == "operator"
    assert len(log.events("bms_users_file_readable_by_others")) == 1
    add_user(path, "alice", "operator", PW)  # rewriting makes it 0600 again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_flood_of_fresh_names_gets_a_bounded_number_of_password_checks(
    tmp_path: Path, scrypt_calls: list[Any]
) -> None:
    """Per-name lockout does not help against a new name each time: all names together get
    at most CHECKS_PER_S checks per second (burst CHECKS_BURST), so the event loop stays free."""
    m, log, clock = manager(tmp_path)
    scrypt_calls.clear()
    for i in range(1000):
        assert m.get_user(None, f"spray{i}", "wrong password!", CERT) is None
    assert len(scrypt_calls) == bu.CHECKS_BURST
    assert len(log.events("bms_login_refused")) == bu.LOG_BURST, "the log is bounded too"
    clock.t += 1.0  # a second later: CHECKS_PER_S more
    assert m.get_user(None, "alice", PW, CERT) is not None
    clock.t += bu.LOG_WINDOW_S + 1
    m.get_user(None, "nobody", "wrong password!", CERT)
    last = log.events("bms_login_refused")[-1]
    assert last["suppressed_before"] == 1000 - bu.LOG_BURST


async def test_a_password_in_clear_over_a_signed_only_channel_is_refused(tmp_path: Path) -> None:
    """The Sign endpoint asks for the password encrypted in its token; a client that sends it
    in clear has exposed it to anyone on the path: refused. In clear inside SignAndEncrypt is
    what the SignAndEncrypt endpoint asks for (the channel encrypts): accepted."""
    users = tmp_path / "state" / "bms_users.json"
    add_user(users, "alice", "operator", PW)
    certs = await client_cert(tmp_path / "client")
    sign = ua.MessageSecurityMode.Sign
    async with bms_test_server(tmp_path / "state", users) as s:
        assert (
            await refused(s.url, certs, "alice", PW, mode=sign, plain_password=True)
            == "BadUserAccessDenied"
        )
        [line] = s.log.events("bms_login_refused")
        assert "signed-only" in line["why"] and line["user"] == "alice"
        assert line["remote"].startswith("('127.0.0.1'")
        c = await connect(s.url, certs, "alice", PW, mode=sign)  # encrypted in the token
        await c.disconnect()
        c = await connect(s.url, certs, "alice", PW, plain_password=True)  # SignAndEncrypt
        await c.disconnect()
        assert len(s.log.events("bms_login")) == 2


async def test_a_password_over_a_none_channel_is_refused_with_no_none_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncua 2.1.0 opens a None secure channel and a session on it even when no None policy
    is configured; the user manager is what refuses the password there. The client here is a
    careless one: it takes whatever endpoint is listed and logs in over None anyway."""
    from asyncua import Client

    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: eps[-1]))
    users = tmp_path / "state" / "bms_users.json"
    add_user(users, "alice", "engineer", PW)
    async with bms_test_server(tmp_path / "state", users) as s:
        assert await refused(s.url, None, "alice", PW) == "BadUserAccessDenied"
        [line] = s.log.events("bms_login_refused")
        assert "unencrypted" in line["why"]
        assert s.log.events("bms_login") == []


@settings(max_examples=300, deadline=None)
@given(password=st.text(max_size=50), stored=st.text(max_size=200))
def test_verify_password_is_a_bool_for_any_text(password: str, stored: str) -> None:
    assert verify_password(password, stored) is False or stored.startswith("scrypt$")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_users_raises_only_users_error(data: bytes) -> None:
    try:
        parse_users(data)
    except UsersError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
)
def test_parse_users_of_any_json_raises_only_users_error(doc: Any) -> None:
    for wrapped in (doc, {"version": 1, "users": doc}, {"version": 1, "users": {"eve": doc}}):
        with contextlib.suppress(UsersError):
            parse_users(json.dumps(wrapped).encode())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
