"""The command channel over real Unix sockets: who is asking, and every way a client can misuse it.

The controller side is a stub (plain coroutines for submit and read). Waiting is bounded by
generous timeouts only; no assertion depends on how fast anything ran.
"""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import json
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from controller.authority import Answer, Request
from controller.channel import (
    LOG_BURST,
    LOG_WINDOW_S,
    SOCKET_MODE,
    ChannelInUse,
    ChannelServer,
    NoController,
    call,
    parse_request,
    socket_path,
)

WAIT_S = 20.0  # generous: a loaded CI machine, never a speed assertion


class Stub:
    """The controller's side: records requests, answers from a table, can be made to fail."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.reads: list[tuple[str, dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.refuse: str = ""

    async def submit(self, req: Request) -> Answer:
        if self.fail is not None:
            raise self.fail
        self.requests.append(req)
        if self.refuse:
            return Answer(req.id, False, self.refuse)
        return Answer(req.id, True, "", old=False, new=True)

    async def read(self, cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        self.reads.append((cmd, dict(args)))
        return {"cmd": cmd, "mode": "HEAT_REUSE"}


class Log:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def alice(_sock: object) -> tuple[int, str | None]:
    return 1001, "alice"


@pytest.fixture
def stub() -> Stub:
    return Stub()


@pytest.fixture
async def server(tmp_path: Path, stub: Stub) -> AsyncIterator[ChannelServer]:
    srv = ChannelServer(
        socket_path(tmp_path),
        {"alice": "engineer", "bob": "viewer"},
        stub.submit,
        stub.read,
        log=Log(),
        peer=alice,
    )
    await srv.start()
    yield srv
    await srv.close()


async def ask(path: Path, cmd: str, args: Mapping[str, object] | None = None, reason: str = ""):
    return await asyncio.to_thread(call, path, cmd, args or {}, reason, WAIT_S)


async def raw(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(os.fspath(path), limit=2**20)


async def line(reader: asyncio.StreamReader) -> dict[str, Any]:
    text = await asyncio.wait_for(reader.readline(), WAIT_S)
    assert text.endswith(b"\n"), text
    return json.loads(text)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), WAIT_S) == b""


# ---- identity and roles ----


async def test_a_command_carries_the_peer_user_and_mapped_role(
    server: ChannelServer, stub: Stub
) -> None:
    reply = await ask(server.path, "force", {"tag": "x", "value": True, "minutes": 5}, "test")
    assert reply["ok"] is True and (reply["old"], reply["new"]) == (False, True)
    (req,) = stub.requests
    assert (req.principal, req.role, req.via) == ("alice", "engineer", "cli")
    assert (req.cmd, dict(req.args), req.reason) == (
        "force",
        {"tag": "x", "value": True, "minutes": 5},
        "test",
    )
    assert reply["id"] == req.id and len(req.id) >= 16


async def test_the_client_cannot_claim_a_principal(server: ChannelServer, stub: Stub) -> None:
    reader, writer = await raw(server.path)
    writer.write(b'{"cmd": "reset", "args": {}, "reason": "r", "principal": "root"}\n')
    reply = await line(reader)
    assert reply == {"ok": False, "why": "'principal': expected only the keys cmd, args, reason"}
    assert stub.requests == []
    writer.close()


async def test_reads_go_to_read_and_each_id_is_unique(server: ChannelServer, stub: Stub) -> None:
    assert await ask(server.path, "status") == {
        "ok": True,
        "why": "",
        "data": {"cmd": "status", "mode": "HEAT_REUSE"},
    }
    await ask(server.path, "journal", {"limit": 5})
    assert stub.reads == [("status", {}), ("journal", {"limit": 5})] and stub.requests == []
    await ask(server.path, "ack", {"all": True})
    await ask(server.path, "ack", {"all": True})
    assert len({r.id for r in stub.requests}) == 2


async def test_an_unknown_command_goes_to_the_core_to_be_refused_and_journalled(
    server: ChannelServer, stub: Stub
) -> None:
    stub.refuse = "cmd: 'launch': expected one of ack, …"
    reply = await ask(server.path, "launch", {})
    assert reply["ok"] is False and reply["why"] == stub.refuse
    assert [r.cmd for r in stub.requests] == ["launch"]
    assert server.log.lines[-1]["why"] == stub.refuse


async def test_unmapped_user_is_refused_with_the_real_peer_credential(
    tmp_path: Path, stub: Stub
) -> None:
    """No injected identity: the kernel says who connected, and the site does not list them."""
    me, uid = getpass.getuser(), os.getuid()
    log = Log()
    srv = ChannelServer(socket_path(tmp_path), {"someone-else": "engineer"}, stub.submit,
                        stub.read, log=log)  # fmt: skip
    await srv.start()
    try:
        reply = await ask(srv.path, "reset", {"rules": []}, "dry now")
        assert reply == {
            "ok": False,
            "why": f"user {me!r} (uid {uid}) has no role in this site's [roles]",
        }
        assert (await ask(srv.path, "status"))["ok"] is False  # no reads either
        assert stub.requests == [] and stub.reads == []
        assert log.lines[0] == {
            "event": "channel_refused",
            "user": me,
            "uid": uid,
            "cmd": "reset",
            "why": reply["why"],
        }
    finally:
        await srv.close()


async def test_mapped_user_by_the_real_peer_credential(tmp_path: Path, stub: Stub) -> None:
    srv = ChannelServer(socket_path(tmp_path), {getpass.getuser(): "viewer"}, stub.submit,
                        stub.read)  # fmt: skip
    await srv.start()
    try:
        assert (await ask(srv.path, "status"))["ok"] is True
        await ask(srv.path, "ack", {"all": True})
        assert [(r.principal, r.role) for r in stub.requests] == [(getpass.getuser(), "viewer")]
    finally:
        await srv.close()


async def test_a_uid_without_a_user_name_and_a_failing_lookup_are_refused(
    tmp_path: Path, stub: Stub
) -> None:
    def nameless(_s: object) -> tuple[int, str | None]:
        return 4242, None

    def broken(_s: object) -> tuple[int, str | None]:
        raise OSError("no credentials")

    for peer, why in (
        (nameless, "uid 4242 has no user name on this machine; no role"),
        (broken, "cannot identify the peer: no credentials"),
    ):
        srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit,
                            stub.read, log=Log(), peer=peer)  # fmt: skip
        await srv.start()
        try:
            assert await ask(srv.path, "status") == {"ok": False, "why": why}
        finally:
            await srv.close()
    assert stub.requests == [] and stub.reads == []


async def test_a_viewer_can_read_and_the_core_judges_its_commands(
    tmp_path: Path, stub: Stub
) -> None:
    def bob(_s: object) -> tuple[int, str | None]:
        return 1002, "bob"

    srv = ChannelServer(socket_path(tmp_path), {"bob": "viewer"}, stub.submit, stub.read,
                        peer=bob)  # fmt: skip
    await srv.start()
    try:
        assert (await ask(srv.path, "alarms"))["ok"] is True
        await ask(srv.path, "reset", {"rules": []}, "r")
        assert [(r.principal, r.role, r.cmd) for r in stub.requests] == [("bob", "viewer", "reset")]
    finally:
        await srv.close()


async def test_a_slow_user_lookup_does_not_stall_the_controllers_loop(
    tmp_path: Path, stub: Stub
) -> None:
    """A user-name lookup that hangs (a directory service down) runs off the event loop: the
    loop, which also runs the scan, goes on meanwhile."""
    entered, release = threading.Event(), threading.Event()
    released_in_time: list[bool] = []

    def slow(_s: object) -> tuple[int, str | None]:
        entered.set()
        released_in_time.append(release.wait(WAIT_S))  # False if the loop never got to run
        return 1001, "alice"

    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, stub.read,
                        peer=slow, idle_s=WAIT_S * 2)  # fmt: skip
    await srv.start()
    try:
        pending = asyncio.create_task(ask(srv.path, "status"))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        await asyncio.sleep(0)  # the loop runs while the lookup is blocked...
        release.set()  # ...so it can release it
        assert (await pending)["ok"] is True
        assert released_in_time == [True]
    finally:
        await srv.close()


# ---- the socket file ----


async def test_socket_is_mode_0660_from_the_start(server: ChannelServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == SOCKET_MODE == 0o660
    # nothing of the private binding directory is left behind
    names = sorted(p.name for p in server.path.parent.iterdir())
    assert names == [server.path.name, server.path.name + ".lock"]


async def test_stale_socket_is_replaced(tmp_path: Path, stub: Stub) -> None:
    path = socket_path(tmp_path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()  # the file stays; nobody listens (a controller killed with -9)
    with pytest.raises(NoController, match="nobody listens"):
        await ask(path, "status")
    srv = ChannelServer(path, {"alice": "engineer"}, stub.submit, stub.read, peer=alice)
    await srv.start()
    try:
        assert (await ask(path, "status"))["ok"] is True
    finally:
        await srv.close()
    assert not path.exists()


async def test_live_socket_is_refused_and_keeps_serving(server: ChannelServer, stub: Stub) -> None:
    second = ChannelServer(server.path, {}, stub.submit, stub.read)
    with pytest.raises(ChannelInUse, match="another controller holds this socket"):
        await second.start()
    assert (await ask(server.path, "status"))["ok"] is True


async def test_a_listening_socket_without_the_lock_is_not_taken_over(
    tmp_path: Path, stub: Stub
) -> None:
    path = socket_path(tmp_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.fspath(path))
    other.listen(1)  # some process answers here, whatever it is
    try:
        with pytest.raises(ChannelInUse, match="another controller answers on this socket"):
            await ChannelServer(path, {}, stub.submit, stub.read).start()
        assert path.exists()
        again = ChannelServer(path, {}, stub.submit, stub.read)
        # the refused start released its lock: the same refusal again, not "holds"
        with pytest.raises(ChannelInUse, match="answers on this socket"):
            await again.start()
    finally:
        other.close()


async def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path, stub: Stub) -> None:
    path = socket_path(tmp_path)
    path.write_text("notes")
    with pytest.raises(ChannelInUse, match="expected a socket or nothing"):
        await ChannelServer(path, {}, stub.submit, stub.read).start()
    assert path.read_text() == "notes"


async def test_close_removes_only_its_own_socket(tmp_path: Path, stub: Stub) -> None:
    path = socket_path(tmp_path)
    first = ChannelServer(path, {}, stub.submit, stub.read)
    await first.start()
    await first.close()
    assert not path.exists()
    first = ChannelServer(path, {}, stub.submit, stub.read)
    await first.start()
    path.unlink()  # removed by hand, and something else bound the path meanwhile
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.fspath(path))
    try:
        await first.close()
        assert path.exists()
    finally:
        other.close()


async def test_a_controller_still_starting_holds_the_socket(tmp_path: Path, stub: Stub) -> None:
    """The lock is taken before anything is bound: a controller starting at the same moment on
    the same state directory is refused even though no socket exists yet."""
    path = socket_path(tmp_path)
    fd = os.open(path.with_name("heatloop.sock.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the other controller's start() holds it
    try:
        with pytest.raises(ChannelInUse, match="another controller holds this socket"):
            await ChannelServer(path, {}, stub.submit, stub.read).start()
        assert not path.exists()
    finally:
        os.close(fd)
    srv = ChannelServer(path, {"alice": "engineer"}, stub.submit, stub.read, peer=alice)
    await srv.start()  # the other one is gone: the lock is free
    try:
        assert (await ask(path, "status"))["ok"] is True
    finally:
        await srv.close()
    again = ChannelServer(path, {}, stub.submit, stub.read)
    await again.start()  # close() released it
    await again.close()


async def test_a_path_longer_than_sun_path_works(tmp_path: Path, stub: Stub) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = socket_path(deep)
    assert len(os.fsencode(path)) > 108
    srv = ChannelServer(path, {"alice": "engineer"}, stub.submit, stub.read, peer=alice)
    await srv.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert (await ask(path, "status"))["ok"] is True
    finally:
        await srv.close()


# ---- limits ----


async def test_oversized_message_is_refused_and_closed(tmp_path: Path, stub: Stub) -> None:
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, stub.read,
                        log=Log(), peer=alice, max_bytes=1000)  # fmt: skip
    await srv.start()
    try:
        for blob in (b"x" * 1001 + b"\n", b"y" * 5000):  # too long with and without a newline
            reader, writer = await raw(srv.path)
            writer.write(blob)
            assert await line(reader) == {
                "ok": False,
                "why": "message larger than 1000 bytes; closed",
            }
            assert await closed(reader)
            writer.close()
        # exactly the limit is fine
        reader, writer = await raw(srv.path)
        msg = json.dumps({"cmd": "status", "args": {}, "reason": ""}).encode()
        writer.write(msg + b" " * (1000 - len(msg)) + b"\n")
        assert (await line(reader))["ok"] is True
        writer.close()
    finally:
        await srv.close()
    assert stub.requests == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b"hello", "not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"status"', "expected a JSON object, got str"),
        (b"{}", "cmd missing: expected a command name"),
        (b'{"cmd": 5}', "cmd: '5': expected a command name (a string of 1 to 64)"),
        (b'{"cmd": ""}', "cmd: '': expected a command name (a string of 1 to 64)"),
        (b'{"cmd": "force", "args": [1]}', "args: '[1]': expected a JSON object"),
        (b'{"cmd": "force", "reason": 3}', "reason: '3': expected a string"),
        (b'{"cmd": "force", "args": {"value": NaN}}', "not JSON: NaN is not JSON"),
        (b'{"cmd": "force", "args": {"value": -Infinity}}', "not JSON: -Infinity is not JSON"),
        (b"\xff\xfe{}", "not UTF-8: byte 0xff at offset 0"),
        (b"[" * 100_000, "not JSON: nested too deeply"),
    ],
)
def test_garbage_is_named(text: bytes, why: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_request(text)
    assert str(e.value).startswith(why), str(e.value)


async def test_garbage_on_the_socket_is_refused_and_the_connection_goes_on(
    server: ChannelServer, stub: Stub
) -> None:
    reader, writer = await raw(server.path)
    for bad in (b"hello\n", b"[1]\n", b'{"args": {}}\n', b'{"cmd": "x", "args": 1}\n'):
        writer.write(bad)
        reply = await line(reader)
        assert reply["ok"] is False and reply["why"], bad
    writer.write(b'{"cmd": "status"}\n')
    assert (await line(reader))["ok"] is True
    writer.close()
    assert stub.requests == []
    assert [ln["why"] for ln in server.log.lines] == [
        "not JSON: Expecting value: line 1 column 1 (char 0)",
        "expected a JSON object, got list",
        "cmd missing: expected a command name",
        "args: '1': expected a JSON object",
    ]


async def test_idle_client_is_closed(tmp_path: Path, stub: Stub) -> None:
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, stub.read,
                        log=Log(), peer=alice, idle_s=0.2)  # fmt: skip
    await srv.start()
    try:
        reader, writer = await raw(srv.path)  # connects and never sends
        assert await line(reader) == {
            "ok": False,
            "why": "idle: nothing received for 0.2 s; closed",
        }
        assert await closed(reader)
        writer.close()
        assert (await ask(srv.path, "status"))["ok"] is True  # the server is unaffected
    finally:
        await srv.close()


async def test_too_many_clients_the_newest_is_refused_busy(tmp_path: Path, stub: Stub) -> None:
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, stub.read,
                        log=Log(), peer=alice, max_clients=2, idle_s=60)  # fmt: skip
    await srv.start()
    held = []
    try:
        for _ in range(2):  # two clients that stay connected (each proven served)
            reader, writer = await raw(srv.path)
            writer.write(b'{"cmd": "status"}\n')
            assert (await line(reader))["ok"] is True
            held.append(writer)
        reply = await ask(srv.path, "status")
        assert reply == {"ok": False, "why": "busy: 2 clients already connected"}
        held.pop().close()  # one leaves: there is room again
        for _ in range(100):
            reply = await ask(srv.path, "status")
            if reply["ok"]:
                break
            await asyncio.sleep(0.05)
        assert reply["ok"] is True
    finally:
        for w in held:
            w.close()
        await srv.close()


async def test_a_flood_is_refused_and_does_not_flood_the_log(tmp_path: Path, stub: Stub) -> None:
    now = [0.0]  # a fake clock: the bucket refills only when the test says so
    log = Log()
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, stub.read,
                        log=log, peer=alice, rate_per_s=50, burst=100,
                        user_rate_per_s=1000, user_burst=1000,
                        clock=lambda: now[0])  # fmt: skip
    await srv.start()
    try:
        reader, writer = await raw(srv.path)
        writer.write(b'{"cmd": "ack", "args": {"all": true}}\n' * 1000)
        replies = [await line(reader) for _ in range(1000)]
        assert [r["ok"] for r in replies] == [True] * 100 + [False] * 900
        assert {r["why"] for r in replies[100:]} == {"too many requests: try again in a second"}
        assert len(stub.requests) == 100
        assert len(log.lines) == LOG_BURST and srv.refused == 900
        now[0] += 1.0  # one second later: 50 more
        writer.write(b'{"cmd": "ack", "args": {"all": true}}\n' * 51)
        replies = [await line(reader) for _ in range(51)]
        assert [r["ok"] for r in replies] == [True] * 50 + [False]
        now[0] += LOG_WINDOW_S  # a quiet spell: the next log line counts what was left out
        writer.write(b"garbage\n")
        await line(reader)
        assert log.lines[-1]["suppressed"] == 900 - LOG_BURST + 1
        writer.close()
    finally:
        await srv.close()


async def test_one_flooding_user_leaves_room_for_another(tmp_path: Path, stub: Stub) -> None:
    """A viewer's runaway script must not keep the engineer from resetting a trip."""
    who = iter([(1002, "bob"), (1001, "alice")])  # first connection bob, then alice
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer", "bob": "viewer"},
                        stub.submit, stub.read, log=Log(), peer=lambda _s: next(who),
                        rate_per_s=50, burst=100, user_rate_per_s=20, user_burst=40,
                        clock=lambda: 0.0)  # fmt: skip
    await srv.start()
    try:
        reader, writer = await raw(srv.path)
        writer.write(b'{"cmd": "status"}\n' * 500)
        replies = [await line(reader) for _ in range(500)]
        assert sum(r["ok"] for r in replies) == 40  # bob's own burst, then refused
        writer.close()
        reader, writer = await raw(srv.path)
        writer.write(b'{"cmd": "reset", "args": {"rules": []}, "reason": "dry"}\n' * 40)
        replies = [await line(reader) for _ in range(40)]
        assert all(r["ok"] for r in replies)  # alice's burst is whole
        assert {(r.principal, r.role) for r in stub.requests} == {("alice", "engineer")}
        writer.close()
    finally:
        await srv.close()


async def test_a_handler_error_is_a_refusal_and_the_server_goes_on(
    server: ChannelServer, stub: Stub
) -> None:
    stub.fail = RuntimeError("boom")
    assert await ask(server.path, "reset", {"rules": []}, "r") == {
        "ok": False,
        "why": "internal error: RuntimeError: boom",
    }
    assert await ask(server.path, "status") == {
        "ok": False,
        "why": "internal error: RuntimeError: boom",
    }
    assert server.log.lines[-1]["cmd"] == "status"
    stub.fail = ValueError("line one\nline two " + "x" * 2000)
    why = (await ask(server.path, "ack", {"all": True}))["why"]
    assert why.startswith("internal error: ValueError: line one line two xxx")
    assert "\n" not in why and len(why) == 500
    stub.fail = None
    assert (await ask(server.path, "status"))["ok"] is True


async def test_a_client_that_does_not_read_its_replies_is_dropped(
    tmp_path: Path, stub: Stub
) -> None:
    async def big(cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        return {"blob": "z" * 1_000_000}

    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, big,
                        log=Log(), peer=alice, idle_s=0.3)  # fmt: skip
    await srv.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(os.fspath(srv.path))
        s.sendall(b'{"cmd": "status"}\n' * 20)  # and never reads
        for _ in range(400):  # the server gives up on it (bounded wait)
            if not srv._clients:
                break
            await asyncio.sleep(0.05)
        assert not srv._clients
        s.close()
        assert (await ask(srv.path, "alarms"))["ok"] is True
    finally:
        await srv.close()


async def test_bad_read_arguments_are_a_refusal_naming_the_field(tmp_path: Path) -> None:
    async def read(cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        raise ValueError(f"limit: expected a whole number 1 … 10000, got {args['limit']!r}")

    stub = Stub()
    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, read,
                        log=Log(), peer=alice)  # fmt: skip
    await srv.start()
    try:
        assert await ask(srv.path, "journal", {"limit": 0}) == {
            "ok": False,
            "why": "journal: limit: expected a whole number 1 … 10000, got 0",
        }
    finally:
        await srv.close()


# ---- the client ----


async def test_no_controller_missing_socket_and_silent_or_garbled_server(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    with pytest.raises(NoController, match="does not exist"):
        call(path, "status", {}, timeout_s=WAIT_S)

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"hello there\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_unix_server(garbled, path=os.fspath(path))
    with pytest.raises(NoController, match="garbled reply"):
        await asyncio.to_thread(call, path, "status", {}, "", WAIT_S)
    srv.close()
    await srv.wait_closed()
    path.unlink()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    srv = await asyncio.start_unix_server(silent, path=os.fspath(path))
    with pytest.raises(NoController, match=r"no answer from the controller within 0\.3 s"):
        await asyncio.to_thread(call, path, "status", {}, "", 0.3)
    srv.close()

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path.unlink()
    srv = await asyncio.start_unix_server(hangup, path=os.fspath(path))
    with pytest.raises(NoController, match="closed the connection without answering"):
        await asyncio.to_thread(call, path, "status", {}, "", WAIT_S)
    srv.close()


async def test_non_finite_reply_values_are_carried_as_text(tmp_path: Path, stub: Stub) -> None:
    async def odd(cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        return {"value": float("nan"), "hi": float("inf"), "set": frozenset({"b", "a"})}

    srv = ChannelServer(socket_path(tmp_path), {"alice": "engineer"}, stub.submit, odd,
                        peer=alice)  # fmt: skip
    await srv.start()
    try:
        reply = await ask(srv.path, "status")
        assert reply["data"] == {"value": "NaN", "hi": "Infinity", "set": ["a", "b"]}
    finally:
        await srv.close()
