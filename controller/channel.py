"""The local command channel: a Unix socket in the state directory, one JSON object per line.

Theory of operation. Everything a person at the IPC asks of a running controller arrives here
(DESIGN §13) and leaves as a `Request` handed to `submit` (the scan applies it, authorises it and
journals it) or as a read handed to `read`. This module only decides *who* is asking and keeps
the socket from being used against the controller:

- identity comes from the kernel (`SO_PEERCRED` uid -> `pwd` user name -> the site's `[roles]`),
  never from anything the client sends; a user the site does not list is refused, and the
  refusal names the user and uid;
- the socket is created 0660 with no window in which it is reachable with wider rights: it is
  bound inside a fresh private (0700) directory, chmod-ed, and only then renamed into place
  (this also replaces a stale socket atomically; the process-wide umask is never touched, so no
  other thread's files change mode);
- every limit refuses with one line and keeps the controller running: a line longer than
  `max_bytes` (then closed), a line longer than `small_bytes` for any command but those in
  `LARGE_COMMANDS` (a commissioning record; the controller runs with `max_bytes` = 2 MiB for it,
  so at most `max_clients` × `max_bytes` of lines are held at once and only one is parsed at a
  time), text that is not a JSON object with a `cmd`, a client that sends
  nothing for `idle_s` (closed), more than `max_clients` connections (the newest is refused
  "busy"), more requests than a token bucket allows (`rate_per_s`, burst `burst`, for the
  whole server; and `user_rate_per_s`, burst `user_burst`, for each uid, so one flooding client
  leaves room for the engineer who must reset a trip);
- refusals are logged as structlog events with user, uid, cmd and why, at most `LOG_BURST` per
  `LOG_WINDOW_S`; the first line after a quiet spell says how many were left out, so a flood of
  bad requests cannot flood the log;
- nothing raises into the controller: an exception in `submit` or `read` becomes the reply
  "internal error: …" and a log line.

Reads (status, alarms, journal) are answered directly by `read`, after the permission table says
the role may read. Commands are answered by the core at its next scan; the channel does not
second-guess them (authorisation and validation live in `controller.authority`, one place).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import pwd
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from controller.authority import READS, Answer, Request, permitted

SOCKET_NAME = "heatloop.sock"
SOCKET_MODE = 0o660
LOG_BURST = 10  # refusal log lines per window; the rest are counted
LOG_WINDOW_S = 10.0
# Longest socket path bind/connect take directly (sun_path is 108 bytes with its NUL); a longer
# one is reached through /proc/self/fd/<dir fd>/<name>.
_SUN_PATH_MAX = 100
# A reply can carry the whole status or a page of the journal; past this it is not a reply.
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_TRACKED_UIDS = 1024  # per-uid rate buckets kept at once
MAX_WHY = 500  # characters of a refusal's reason
MAX_CMD = 64  # characters of a command name (the longest is "maintenance")
MAX_LINE_BYTES = 16384  # every request but a commissioning record fits in this
LARGE_COMMANDS = frozenset({"commission"})  # may use up to `max_bytes`

Peer = Callable[[socket.socket], tuple[int, str | None]]  # socket -> (uid, user name or None)


class NoController(Exception):
    """Nobody answers on the socket (the CLI exits 1); the message is one line."""


class ChannelInUse(OSError):
    """Another controller already answers on this socket (same state directory): exit 2."""


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def peer_credentials(sock: socket.socket) -> tuple[int, str | None]:
    """The connecting process's uid from the kernel, and its user name (None if it has none)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, None


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """`path` as an AF_UNIX address; a path too long for sun_path goes through its folder's fd."""
    text = os.fspath(path)
    if len(os.fsencode(text)) < _SUN_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answers(path: Path, timeout_s: float = 1.0) -> bool:
    """Whether a process accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            with _unix_address(path) as addr:
                s.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # a timeout or an unexpected error: not provably dead, do not replace
            return True
        return True


def _json_safe(obj: Any) -> Any:
    """A copy JSON can carry strictly: sets as sorted lists, non-finite floats as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_json_safe(v) for v in obj), key=repr)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def encode_line(obj: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = json.dumps(_json_safe(obj), allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _one_line(text: str, limit: int = MAX_WHY) -> str:
    """A refusal is one line a person reads: whitespace runs collapsed, bounded."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a number must be finite)")


def parse_request(line: bytes) -> tuple[str, dict[str, Any], str]:
    """(cmd, args, reason) from one request line; ValueError with one line naming what is wrong."""
    try:
        msg = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: byte 0x{line[e.start]:02x} at offset {e.start}") from None
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"not JSON: {str(e)[:120]}") from None
    if not isinstance(msg, dict):
        raise ValueError(f"expected a JSON object, got {type(msg).__name__}")
    unknown = sorted(set(msg) - {"cmd", "args", "reason"})
    if unknown:
        raise ValueError(f"{unknown[0][:40]!r}: expected only the keys cmd, args, reason")
    if "cmd" not in msg:
        raise ValueError("cmd missing: expected a command name")
    cmd, args, reason = msg["cmd"], msg.get("args", {}), msg.get("reason", "")
    if not isinstance(cmd, str) or not 0 < len(cmd) <= MAX_CMD:
        raise ValueError(
            f"cmd: {str(cmd)[:40]!r}: expected a command name (a string of 1 to {MAX_CMD})"
        )
    if not isinstance(args, dict):
        raise ValueError(f"args: {str(args)[:40]!r}: expected a JSON object")
    if not isinstance(reason, str):
        raise ValueError(f"reason: {str(reason)[:40]!r}: expected a string")
    return cmd, args, reason


class _TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; one per request."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self.tokens, self.at = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _LogLimit:
    """At most `burst` lines per `window_s`; the first line after a quiet spell counts the rest."""

    def __init__(self, burst: int, window_s: float, clock: Callable[[], float]) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self.start, self.count, self.suppressed = clock(), 0, 0

    def allow(self) -> tuple[bool, int]:
        now = self.clock()
        if now - self.start >= self.window_s:
            self.start, self.count = now, 0
        if self.count >= self.burst:
            self.suppressed += 1
            return False, 0
        self.count += 1
        left_out, self.suppressed = self.suppressed, 0
        return True, left_out


class ChannelServer:
    """Serves the command channel on a Unix socket until `close()`; never raises into the caller
    once started."""

    def __init__(
        self,
        path: Path,
        roles: Mapping[str, str],
        submit: Callable[[Request], Awaitable[Answer]],
        read: Callable[[str, Mapping[str, object]], Awaitable[dict[str, Any]]],
        *,
        log: Any = None,
        max_bytes: int = MAX_LINE_BYTES,
        small_bytes: int = MAX_LINE_BYTES,
        idle_s: float = 5.0,
        max_clients: int = 16,
        rate_per_s: float = 50.0,
        burst: float = 100.0,
        user_rate_per_s: float = 20.0,
        user_burst: float = 40.0,
        peer: Peer = peer_credentials,
        clock: Callable[[], float] = time.monotonic,
        via: str = "cli",
    ) -> None:
        self.path = Path(path)
        self.roles = dict(roles)
        self.submit, self.read = submit, read
        self.log = log if log is not None else structlog.get_logger("heatloop.channel")
        self.max_bytes, self.idle_s, self.max_clients = max_bytes, idle_s, max_clients
        self.small_bytes = min(small_bytes, max_bytes)
        self.peer, self.via = peer, via
        self._bucket = _TokenBucket(rate_per_s, burst, clock)
        self._user_buckets: dict[int, _TokenBucket] = {}
        self._user_rate = (user_rate_per_s, user_burst)
        self._clock = clock
        self._log_limit = _LogLimit(LOG_BURST, LOG_WINDOW_S, clock)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self.refused = 0  # refusals since start (status can show it)

    # ---- socket life ----

    async def start(self) -> None:
        """Bind and listen. ChannelInUse if another controller holds or answers on the socket;
        OSError if the state directory cannot hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_socket()):
                raise ChannelInUse(
                    f"{self.path}: expected a socket or nothing, found another kind of file; "
                    "remove it by hand"
                )
            if self.path.exists() and _answers(self.path):
                raise ChannelInUse(
                    f"{self.path}: another controller answers on this socket (two controllers "
                    "on one state directory?)"
                )
            sock = self._bind_private()
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=self.max_bytes + 1
            )
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        """An exclusive lock on `<socket>.lock` for the server's life: two controllers starting
        on one state directory at the same moment cannot both bind (the loser's rename would
        silently take the socket from the winner, leaving two controllers on one plant)."""
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ChannelInUse(
                f"{self.path}: another controller holds this socket ({lock.name} is locked; two "
                "controllers on one state directory?)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _bind_private(self) -> socket.socket:
        """Bind in a fresh 0700 directory, chmod 0660, listen, then rename into place."""
        private = Path(tempfile.mkdtemp(prefix=".sock-", dir=self.path.parent))
        tmp = private / SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _unix_address(tmp) as addr:
                sock.bind(addr)
            os.chmod(tmp, SOCKET_MODE)
            sock.listen(max(8, self.max_clients + 4))
            sock.setblocking(False)
            os.rename(tmp, self.path)  # atomic; replaces a stale socket
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        return sock

    async def close(self) -> None:
        """Stop listening, end every connection, remove the socket if it is still ours."""
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # someone else's socket stays
                self.path.unlink()
        self._release_lock()  # last: the socket is gone before another controller may bind

    # ---- one connection ----

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._clients) >= self.max_clients
        self._clients.add(task)
        try:
            if busy:
                await self._refuse(
                    writer, None, None, "", f"busy: {self.max_clients} clients already connected"
                )
                return
            await self._conversation(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never into the controller
            self._log_refusal(None, None, "", f"internal error: {type(e).__name__}: {e}")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self.idle_s)

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        try:
            # the user-name lookup may ask a directory service (NSS: LDAP, sssd): never on the
            # controller's event loop, and never longer than a client may idle
            uid, user = await asyncio.wait_for(asyncio.to_thread(self.peer, sock), self.idle_s)
        except TimeoutError:
            await self._refuse(writer, None, None, "", "cannot identify the peer: lookup timed out")
            return
        except Exception as e:  # a faulty peer lookup refuses, never raises
            await self._refuse(writer, None, None, "", f"cannot identify the peer: {e}")
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_s)
            except TimeoutError:
                await self._refuse(
                    writer, user, uid, "", f"idle: nothing received for {self.idle_s:g} s; closed"
                )
                return
            except asyncio.LimitOverrunError:
                await self._refuse(
                    writer, user, uid, "", f"message larger than {self.max_bytes} bytes; closed"
                )
                return
            except asyncio.IncompleteReadError as e:  # end of input: a last line without \n
                line = e.partial
                if not line.strip():
                    return
            if len(line.rstrip(b"\r\n")) > self.max_bytes:
                await self._refuse(
                    writer, user, uid, "", f"message larger than {self.max_bytes} bytes; closed"
                )
                return
            if not line.strip():
                continue  # a blank line is no request
            reply = await self._one(line, uid, user)
            if not await self._send(writer, reply):
                return
            if reader.at_eof():
                return

    async def _one(self, line: bytes, uid: int, user: str | None) -> dict[str, Any]:
        """The reply to one request line."""
        if not self._take(uid):
            return self._refusal(user, uid, "", "too many requests: try again in a second")
        try:
            cmd, args, reason = parse_request(line)
        except ValueError as e:
            return self._refusal(user, uid, "", str(e))
        size = len(line.rstrip(b"\r\n"))
        if size > self.small_bytes and cmd not in LARGE_COMMANDS:
            return self._refusal(
                user,
                uid,
                cmd,
                f"message of {size} bytes: expected at most {self.small_bytes} for {cmd[:40]!r} "
                f"(only {', '.join(sorted(LARGE_COMMANDS))} may be up to {self.max_bytes})",
            )
        if user is None:
            return self._refusal(
                user, uid, cmd, f"uid {uid} has no user name on this machine; no role"
            )
        role = self.roles.get(user)
        if role is None:
            return self._refusal(
                user, uid, cmd, f"user {user!r} (uid {uid}) has no role in this site's [roles]"
            )
        try:
            if cmd in READS:
                if not permitted(role, cmd):
                    return self._refusal(
                        user, uid, cmd, f"role {role!r} may not read {cmd!r} (DESIGN §13)"
                    )
                try:
                    data = await self.read(cmd, args)
                except ValueError as e:  # the read's arguments (one line naming the field)
                    return self._refusal(user, uid, cmd, f"{cmd}: {e}")
                return {"ok": True, "why": "", "data": data}
            req = Request(
                id=uuid.uuid4().hex,
                principal=user,
                role=role,
                cmd=cmd,
                args=args,
                reason=reason,
                via=self.via,
            )
            ans = await self.submit(req)
            reply = {
                "ok": ans.accepted is True,
                "why": _one_line(str(ans.why)),
                "id": ans.id,
                "old": ans.old,
                "new": ans.new,
            }
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the controller side failed: refuse, go on
            return self._refusal(user, uid, cmd, f"internal error: {type(e).__name__}: {e}")
        if not reply["ok"]:
            self._log_refusal(user, uid, cmd, reply["why"])
        return reply

    def _take(self, uid: int) -> bool:
        """A token from this uid's bucket, then from the server's: a uid over its own rate
        does not use up the others' share."""
        bucket = self._user_buckets.get(uid)
        if bucket is None:
            if len(self._user_buckets) >= MAX_TRACKED_UIDS:  # uids are few; stay bounded anyway
                self._user_buckets.clear()
            bucket = self._user_buckets[uid] = _TokenBucket(*self._user_rate, self._clock)
        return bucket.take() and self._bucket.take()

    def _refusal(self, user: str | None, uid: int | None, cmd: str, why: str) -> dict[str, Any]:
        why = _one_line(why)
        self._log_refusal(user, uid, cmd, why)
        return {"ok": False, "why": why}

    async def _refuse(
        self,
        writer: asyncio.StreamWriter,
        user: str | None,
        uid: int | None,
        cmd: str,
        why: str,
    ) -> None:
        await self._send(writer, self._refusal(user, uid, cmd, why))

    async def _send(self, writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> bool:
        """Write one reply line; False if the client is gone or does not read (then closed)."""
        try:
            writer.write(encode_line(reply))
            await asyncio.wait_for(writer.drain(), self.idle_s)
        except (OSError, TimeoutError):
            return False
        return True

    def _log_refusal(self, user: str | None, uid: int | None, cmd: str, why: str) -> None:
        self.refused += 1
        ok, left_out = self._log_limit.allow()
        if not ok:
            return
        with contextlib.suppress(Exception):  # a broken logger never breaks the channel
            fields: dict[str, Any] = {"user": user, "uid": uid, "cmd": cmd, "why": why}
            if left_out:
                fields["suppressed"] = left_out
            self.log.warning("channel_refused", **fields)


def call(
    path: Path,
    cmd: str,
    args: Mapping[str, object] | None = None,
    reason: str = "",
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Send one request to the controller on `path` and return its reply (a dict with `ok`).

    NoController (one line) when nobody answers; a reply of {"ok": False, "why": …} when the
    operating system refuses the connection (the user is not in the socket's group).
    """
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    line = encode_line({"cmd": cmd, "args": dict(args or {}), "reason": reason})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            with _unix_address(path) as addr:
                s.connect(addr)
        except FileNotFoundError:
            raise NoController(
                f"no controller: {path} does not exist (is `heatloop run` going for this site?)"
            ) from None
        except ConnectionRefusedError:
            raise NoController(
                f"no controller: nobody listens on {path} (the controller has stopped)"
            ) from None
        except PermissionError:
            return {
                "ok": False,
                "why": f"permission denied on {path}: expected a user in the controller's group",
            }
        except TimeoutError:
            raise NoController(
                f"no controller: {path} did not accept within {timeout_s:g} s"
            ) from None
        except OSError as e:
            raise NoController(f"no controller: {path}: {e.strerror or e}") from None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(line)  # a refusal may already be waiting (busy): read it below
        buf = bytearray()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoController(f"no answer from the controller within {timeout_s:g} s")
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise NoController(
                    f"no answer from the controller within {timeout_s:g} s"
                ) from None
            except ConnectionResetError:
                break  # closed without reading our line: whatever came before is the reply
            except OSError as e:
                raise NoController(f"the connection broke: {e.strerror or e}") from None
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY_BYTES:
                raise NoController("garbled reply: larger than the limit")
    text = bytes(buf).split(b"\n", 1)[0]
    if not text.strip():
        raise NoController("the controller closed the connection without answering")
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError):
        raise NoController("garbled reply: not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise NoController("garbled reply: not an object with ok")
    return reply
