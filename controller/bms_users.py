"""BMS users: the users file, scrypt password hashes and the login check of the OPC UA server.

Theory of operation. The BMS server's users live in `<state dir>/bms_users.json` (mode 0600),
never in the site file and never in plain text: each user has a role (viewer, operator,
engineer) and a salted scrypt hash. `heatloop bms user` writes the file atomically (temporary
file, fsync, rename, under a lock file so two writers never lose each other's user); the
server's `UserStore` reads it again whenever its inode, size or mtime changes, so adding or
removing a user needs no restart.

Everything that reads the file is paranoid because a login runs on the server's event loop:

- a file that is not UTF-8 JSON of the expected shape, a user with an unknown role or a
  malformed hash makes the whole file unusable (`UsersError` naming what is wrong): nobody
  logs in, one log line says why, nothing raises into the server;
- a hash's scrypt parameters are bounded before scrypt runs, so a crafted file cannot make
  one login take minutes or gigabytes;
- a username with a password over an unencrypted (None) secure channel is refused before the
  password is looked at (asyncua 2.1.0 accepts such a session even with no None policy;
  there the client certificate is `b""`), and so is a password sent in clear in its token over
  a signed-only channel (with `install` and `channel_encrypted`);
- 5 failed logins for one name within 60 s refuse that name for 60 s without running scrypt,
  and all names together get at most `CHECKS_PER_S` password checks per second, so guessing
  cannot pin the CPU or starve the server's event loop; an unknown name costs the same scrypt
  as a known one, so timing does not tell which names exist; refusal log lines are bounded;
- every session gets asyncua's `UserRole.User`, never `Admin` (Admin ignores AccessLevel); the
  heatloop role is looked up again at each use with `role_of`, so removing a user or changing
  a role takes effect on open sessions too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import stat
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from plc_io.site import Site

ROLES = ("viewer", "operator", "engineer")
USERS_FILE = "bms_users.json"
FILE_VERSION = 1

# scrypt as written by hash_password (RFC 7914; n=2**14, r=8 is the interactive-login setting)
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
# bounds on what a stored hash may ask of a login (a crafted file must not stall the server)
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_WORK = 4 * SCRYPT_N * SCRYPT_R * SCRYPT_P  # n*r*p: at most 4× the default's time
MAX_MEM = 64 * 1024 * 1024  # 128*n*r bytes of scrypt memory
SALT_RANGE = (8, 64)
KEY_RANGE = (16, 64)

MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # characters; longer is not a password but a payload
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_USERS = 10_000

# failed-login limiter (per user name)
MAX_FAILURES = 5
FAIL_WINDOW_S = 60.0
LOCKOUT_S = 60.0
MAX_TRACKED_NAMES = 10_000

# all names together: at most this many password checks (scrypt) per second, so a flood of
# logins under fresh names cannot keep the server's event loop busy (it must stay responsive)
CHECKS_PER_S = 5.0
CHECKS_BURST = 20
LOG_BURST = 20  # refusal log lines per window; the rest are counted in the next line
LOG_WINDOW_S = 10.0

ANONYMOUS = "(anonymous)"  # cannot be a user name (parentheses), so never found in the file


# A well-formed hash no password matches (all-zero key): an unknown user's login runs the same
# scrypt as a known one's, so timing does not reveal which names exist.
def _format(n: int, r: int, p: int, salt: bytes, key: bytes) -> str:
    return "$".join(
        (
            "scrypt",
            str(n),
            str(r),
            str(p),
            base64.b64encode(salt).decode(),
            base64.b64encode(key).decode(),
        )
    )


_DUMMY_HASH = _format(SCRYPT_N, SCRYPT_R, SCRYPT_P, bytes(SALT_BYTES), bytes(KEY_BYTES))


class UsersError(ValueError):
    """The users file or a user's data cannot be used; the message is one line naming
    the field, the value and what was expected."""


def _shown(value: object) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:79] + "…"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsersError(
            f"user name: {_shown(name)}: expected 1-64 characters of A-Z a-z 0-9 . _ @ -"
        )
    return name


def check_role(role: object, where: str = "role") -> str:
    if role not in ROLES:
        raise UsersError(f"{where}: {_shown(role)}: expected one of {', '.join(ROLES)}")
    return str(role)


def check_password(password: object) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        n = len(password) if isinstance(password, str) else 0
        raise UsersError(f"password: {n} characters: expected at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UsersError(
            f"password: {len(password)} characters: expected at most {MAX_PASSWORD} characters"
        )
    return password


def _secret(password: str) -> bytes:
    # NFC so the same password typed on two keyboards (composed or decomposed é) matches
    return unicodedata.normalize("NFC", password).encode("utf-8")


def hash_password(password: str) -> str:
    """A salted scrypt hash: `scrypt$16384$8$1$<salt b64>$<key b64>`."""
    salt = os.urandom(SALT_BYTES)
    key = hashlib.scrypt(
        _secret(password), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES
    )
    return _format(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, key)


def _b64(text: str, lo_hi: tuple[int, int], what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise UsersError(f"{what}: expected base64") from e
    if not lo_hi[0] <= len(raw) <= lo_hi[1]:
        raise UsersError(f"{what}: {len(raw)} bytes: expected {lo_hi[0]}…{lo_hi[1]} bytes")
    return raw


def parse_hash(stored: object) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a stored hash, its cost bounded; UsersError if malformed."""
    if not isinstance(stored, str) or len(stored) > 512:
        raise UsersError("hash: expected a string scrypt$N$r$p$salt$key")
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise UsersError("hash: expected scrypt$N$r$p$salt$key")
    nums = []
    for label, text in zip(("N", "r", "p"), parts[1:4], strict=True):
        if not text.isascii() or not text.isdigit() or len(text) > 8:
            raise UsersError(f"hash: {label} = {_shown(text)}: expected a whole number")
        nums.append(int(text))
    n, r, p = nums
    if n < 2 or n > MAX_N or n & (n - 1):
        raise UsersError(f"hash: N = {n}: expected a power of 2, 2…{MAX_N}")
    if not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise UsersError(f"hash: r = {r}, p = {p}: expected r 1…{MAX_R}, p 1…{MAX_P}")
    if n * r * p > MAX_WORK or 128 * n * r > MAX_MEM:
        raise UsersError(
            f"hash: N·r·p = {n * r * p}: expected at most {MAX_WORK} and 128·N·r ≤ {MAX_MEM} bytes"
        )
    salt = _b64(parts[4], SALT_RANGE, "hash: salt")
    key = _b64(parts[5], KEY_RANGE, "hash: key")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (constant-time compare). Never raises: a malformed
    or too costly hash, a password that is not text or is too long are all simply False."""
    try:
        if not isinstance(password, str) or len(password) > MAX_PASSWORD:
            return False
        n, r, p, salt, key = parse_hash(stored)
        got = hashlib.scrypt(
            _secret(password), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=2 * MAX_MEM
        )
        return hmac.compare_digest(got, key)
    except Exception:  # a login answers yes or no, never an exception
        return False


def users_path(site: Site) -> Path:
    return site.state_dir / USERS_FILE


# ---- the file ----


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with a key twice (a user listed twice) is refused, not silently merged."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise UsersError(f"{_shown(k)}: expected once, found twice")
        out[k] = v
    return out


def parse_users(data: bytes, source: str = USERS_FILE) -> dict[str, dict[str, Any]]:
    """The users of a users file's bytes: name -> {"role", "hash", "changed_wall"}.
    UsersError (one line, prefixed with `source`) if anything in it is unusable."""
    if len(data) > MAX_FILE_BYTES:
        raise UsersError(f"{source}: {len(data)} bytes: expected at most {MAX_FILE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise UsersError(f"{source}: expected UTF-8 text: byte {data[e.start]:#04x}") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsersError(f"{source}: expected JSON: {str(e)[:100]}") from e
    except UsersError as e:
        raise UsersError(f"{source}: {e}") from None
    if not isinstance(doc, dict):
        raise UsersError(f"{source}: expected a JSON object")
    if doc.get("version") != FILE_VERSION or isinstance(doc.get("version"), bool):
        raise UsersError(f"{source}: version: {_shown(doc.get('version'))}: expected 1")
    users = doc.get("users")
    if not isinstance(users, dict):
        raise UsersError(f"{source}: users: {_shown(users)}: expected an object")
    if len(users) > MAX_USERS:
        raise UsersError(f"{source}: users: {len(users)} users: expected at most {MAX_USERS}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in users.items():
        try:
            check_name(name)
            if not isinstance(entry, dict):
                raise UsersError(f"{_shown(entry)}: expected an object with role and hash")
            check_role(entry.get("role"))
            parse_hash(entry.get("hash"))
            changed = entry.get("changed_wall", 0.0)
            if (
                isinstance(changed, bool)
                or not isinstance(changed, int | float)
                or not math.isfinite(changed)
            ):
                raise UsersError(f"changed_wall: {_shown(changed)}: expected a number")
        except UsersError as e:
            raise UsersError(f"{source}: users.{_shown(name)[1:-1][:64]}: {e}") from None
        out[name] = {"role": entry["role"], "hash": entry["hash"], "changed_wall": changed}
    return out


def read_users(path: Path) -> dict[str, dict[str, Any]]:
    """The users in `path` ({} if there is no file); UsersError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsersError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_users(data, str(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of the users file (a lock file next to it)."""
    # the folder is the state directory: made as the controller makes it (its group must reach
    # the command socket there); the users file itself is 0600
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` whole or not at all: a `mode` temporary file, fsync, rename,
    fsync of the folder (a power cut leaves the old file or the new one, never a torn one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # an umask or an old temporary file must not widen it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write(path: Path, users: dict[str, dict[str, Any]]) -> None:
    """Atomically replace the users file (0600)."""
    doc = {"version": FILE_VERSION, "users": dict(sorted(users.items()))}
    write_atomic(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def add_user(path: Path, name: str, role: str, password: str) -> bool:
    """Add or replace a user (True = replaced). Refuses (UsersError) a bad name, role or
    password, and a users file it cannot read (it is never overwritten blindly)."""
    check_name(name)
    check_role(role)
    check_password(password)
    hashed = hash_password(password)
    with _locked(path):
        users = read_users(path)
        replaced = name in users
        users[name] = {"role": role, "hash": hashed, "changed_wall": time.time()}
        _write(path, users)
    return replaced


def remove_user(path: Path, name: str) -> bool:
    """Remove a user (True = there was one)."""
    check_name(name)
    with _locked(path):
        users = read_users(path)
        if name not in users:
            return False
        del users[name]
        _write(path, users)
    return True


class UserStore:
    """The users file as the server sees it: read again when it changes; unusable → nobody."""

    def __init__(self, path: Path, *, log: Any = None) -> None:
        self.path = Path(path)
        self._log = log if log is not None else structlog.get_logger("heatloop.bms")
        self._key: tuple[int, ...] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self.error: UsersError | None = None

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            key: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            key = ()
        except OSError as e:
            key = (-1, e.errno or 0)
        if key == self._key:
            return
        self._key = key
        try:
            self._users = read_users(self.path)
            self.error = None
            if key and len(key) == 4 and stat.S_IMODE(os.stat(self.path).st_mode) & 0o077:
                # the hashes are salted scrypt, but readable hashes invite offline guessing
                self._log.warning(
                    "bms_users_file_readable_by_others", path=str(self.path), expected="0600"
                )
            if self._users:
                self._log.info("bms_users_loaded", path=str(self.path), users=len(self._users))
            else:
                self._log.warning(
                    "bms_users_none",
                    path=str(self.path),
                    hint="nobody can log in; add a user with `heatloop bms user`",
                )
        except Exception as e:  # any other failure is unusable too, never raised into a login
            err = e if isinstance(e, UsersError) else UsersError(f"{self.path}: {e!r}"[:300])
            self._users, self.error = {}, err
            self._log.error("bms_users_unusable", path=str(self.path), error=str(err))

    @property
    def usable(self) -> bool:
        self._refresh()
        return self.error is None

    def role(self, name: str) -> str | None:
        """The role of `name`; None if no such user or the file is unusable."""
        self._refresh()
        entry = self._users.get(name) if isinstance(name, str) else None
        return entry["role"] if entry is not None else None

    def check(self, name: str, password: str) -> str | None:
        """The role of `name` if `password` is right, else None (never raises)."""
        self._refresh()
        if self.error is not None:
            return None  # nobody logs in; the reason was logged once
        entry = self._users.get(name) if isinstance(name, str) else None
        if entry is None:
            verify_password(password, _DUMMY_HASH)  # same cost as a real user (timing)
            return None
        return entry["role"] if verify_password(password, entry["hash"]) else None


class LoginLimiter:
    """Per-name failed-login limiter: `MAX_FAILURES` failures within `FAIL_WINDOW_S` refuse
    the name for `LOCKOUT_S` (then without running scrypt). Bounded memory."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window_s: float = FAIL_WINDOW_S,
        lockout_s: float = LOCKOUT_S,
        max_names: int = MAX_TRACKED_NAMES,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_names = max_names
        self._fails: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked(self, name: str, now: float) -> bool:
        until = self._locked_until.get(name)
        if until is None:
            return False
        if now < until:
            return True
        del self._locked_until[name]
        return False

    def failed(self, name: str, now: float) -> bool:
        """Count a failure; True if it starts a lockout."""
        q = self._fails.get(name)
        if q is None:
            self._prune(now)
            q = self._fails[name] = deque(maxlen=self.max_failures)
        q.append(now)
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if len(q) >= self.max_failures:
            q.clear()
            self._locked_until[name] = now + self.lockout_s
            return True
        return False

    def succeeded(self, name: str) -> None:
        self._fails.pop(name, None)

    def _prune(self, now: float) -> None:
        if len(self._fails) < self.max_names:
            return
        for k in [k for k, q in self._fails.items() if not q or q[-1] <= now - self.window_s]:
            del self._fails[k]
        while len(self._fails) >= self.max_names:  # a flood of names: forget the oldest
            del self._fails[next(iter(self._fails))]
        for k in [k for k, t in self._locked_until.items() if t <= now]:
            del self._locked_until[k]


class BmsUserManager:
    """asyncua user manager of the BMS server (see the module docstring for the rules)."""

    def __init__(
        self,
        store: UserStore,
        *,
        allow_anonymous: bool,
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
        peer: Callable[[], object] | None = None,
        channel_encrypted: Callable[[], bool | None] | None = None,
    ) -> None:
        """`peer`, if given, names the remote address of the connection being served (asyncua
        does not tell `get_user`); it is added to every login log line. `channel_encrypted`,
        if given, says whether that connection's secure channel encrypts (SignAndEncrypt);
        with `install(iserver)` it lets a password sent unencrypted in its token over a
        signed-only channel be refused (anyone on the path could read it)."""
        from asyncua.crypto.permission_rules import User, UserRole

        self._user_cls, self._user_role = User, UserRole
        self.store = store
        self.allow_anonymous = allow_anonymous
        self.log = log if log is not None else structlog.get_logger("heatloop.bms")
        self.clock = clock
        self.peer = peer
        self.channel_encrypted = channel_encrypted
        # set by the decrypt_user_token wrapper just before asyncua calls get_user (both run
        # synchronously in one activate_session, so nothing can come in between)
        self._token_plain: bool | None = None
        self.limiter = LoginLimiter()
        self._lock_logged: set[str] = set()
        self._tokens = float(CHECKS_BURST)
        self._tokens_at = clock()
        self._log_times: deque[float] = deque()
        self._suppressed = 0

    def _may_check(self, now: float) -> bool:
        """Token bucket over all password checks (CHECKS_PER_S, burst CHECKS_BURST)."""
        self._tokens = min(
            float(CHECKS_BURST), self._tokens + (now - self._tokens_at) * CHECKS_PER_S
        )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _remote(self) -> dict[str, str]:
        if self.peer is None:
            return {}
        try:
            remote = self.peer()
        except Exception:  # the address is a courtesy in a log line, never a reason to fail
            return {}
        return {} if remote is None else {"remote": str(remote)[:100]}

    def _refuse(self, user: str | None, why: str, **fields: Any) -> None:
        """One log line per refusal, at most LOG_BURST per LOG_WINDOW_S (the rest counted)."""
        now = self.clock()
        while self._log_times and now - self._log_times[0] > LOG_WINDOW_S:
            self._log_times.popleft()
        if len(self._log_times) >= LOG_BURST:
            self._suppressed += 1
            return None
        self._log_times.append(now)
        if self._suppressed:
            fields["suppressed_before"] = self._suppressed
            self._suppressed = 0
        self.log.warning("bms_login_refused", user=user, why=why, **fields, **self._remote())
        return None

    def install(self, iserver: Any) -> None:
        """Make this the server's user manager, and note for each username token whether its
        password came encrypted (asyncua 2.1 `InternalServer.decrypt_user_token`, pinned)."""
        iserver.set_user_manager(self)
        original = iserver.decrypt_user_token
        if getattr(original, "_heatloop_guard", False):
            return

        def decrypt_user_token(isession: Any, token: Any) -> tuple[str, str]:
            self._token_plain = not getattr(token, "EncryptionAlgorithm", None)
            return original(isession, token)  # type: ignore[no-any-return]

        decrypt_user_token._heatloop_guard = True  # type: ignore[attr-defined]
        iserver.decrypt_user_token = decrypt_user_token

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> Any:
        """The asyncua `User` of a session being activated, or None (BadUserAccessDenied)."""
        plain, self._token_plain = self._token_plain, None
        try:
            return self._get_user(username, password, certificate, plain)
        except Exception as e:  # a bug here refuses the login, not the server
            self.log.error("bms_login_error", user=_shown(username)[:80], error=repr(e)[:200])
            return None

    def _encrypted_channel(self) -> bool | None:
        if self.channel_encrypted is None:
            return None
        try:
            return self.channel_encrypted()
        except Exception:  # unknown: treated as not encrypting
            return False

    def _get_user(self, username: Any, password: Any, certificate: Any, plain: bool | None) -> Any:
        if username is None:  # anonymous (or an X.509 identity: not a heatloop user)
            if not self.allow_anonymous:
                return self._refuse(
                    None, "anonymous sessions are not allowed (bms.allow_anonymous)"
                )
            return self._user_cls(role=self._user_role.User, name=ANONYMOUS)
        shown = username if isinstance(username, str) and NAME.fullmatch(username) else None
        if not certificate:
            # asyncua hands b"" as the peer certificate on a None secure channel: the password
            # crossed the network in clear. Refuse it without looking at it.
            return self._refuse(
                shown or _shown(username),
                "a password over an unencrypted channel is refused; the password should be "
                "treated as exposed",
            )
        if plain and password and self._encrypted_channel() is False:
            # a signed-only channel with the password in clear in its token (the endpoint asks
            # for it encrypted; a client that ignores that has exposed it)
            return self._refuse(
                shown or _shown(username),
                "a password in clear over a signed-only channel is refused; the password "
                "should be treated as exposed",
            )
        if shown is None:
            return self._refuse(_shown(username), "not a valid user name")
        now = self.clock()
        if self.limiter.locked(shown, now):
            if shown not in self._lock_logged:  # one line per lockout, not one per attempt
                if len(self._lock_logged) >= MAX_TRACKED_NAMES:
                    self._lock_logged.clear()  # bounded: at worst a lockout is logged again
                self._lock_logged.add(shown)
                self._refuse(shown, f"locked for {LOCKOUT_S:g} s after failed logins")
            return None
        self._lock_logged.discard(shown)
        if not self._may_check(now):
            return self._refuse(shown, "too many logins at once; try again in a second")
        role = self.store.check(shown, password if isinstance(password, str) else "")
        if role is None:
            if self.store.error is not None:
                return self._refuse(shown, "the users file is unusable (logged)")
            locks = self.limiter.failed(shown, now)
            return self._refuse(
                shown,
                "wrong user name or password",
                **({"locked_for_s": LOCKOUT_S} if locks else {}),
            )
        self.limiter.succeeded(shown)
        self.log.info("bms_login", user=shown, role=role, **self._remote())
        # never UserRole.Admin: asyncua's Admin ignores AccessLevel
        return self._user_cls(role=self._user_role.User, name=shown)

    def role_of(self, user: Any) -> str | None:
        """The heatloop role of a session's user now (None: none, or no longer a user)."""
        name = getattr(user, "name", None)
        if name is None:
            return None
        if name == ANONYMOUS:
            return "viewer" if self.allow_anonymous else None
        return self.store.role(name)
