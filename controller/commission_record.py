"""Commissioning records: the body's checks, the seal (hash chain and Ed25519 signature), the
verifiers, the proof-test dates, and the printable reports.

Theory of the seal. A record is a JSON object. `seal` adds where it sits in the site's chain
(`seq`, `prev_hash` = the previous record's `hash`), when and by whom it was filed, the
controller's own view of its software and site (`controller`) and the site's public key; then
`hash` = sha256 of `canonical(record without hash and signature)` and `signature` = Ed25519 over
the same bytes. `canonical` is sorted-key compact JSON, so a record read back from the journal or
from a pretty-printed copy gives the same bytes. What this detects, and what it cannot:
- a record altered after sealing: its hash (and its signature) no longer match;
- a record deleted from the middle or reordered: a gap in `seq` or a `prev_hash` that does not
  match the record before it;
- a record re-signed or forged with another key: it is checked against the site's public key
  (`commission_ed25519.pub`, and printed on every record, so a copy off the machine is checked
  with the public key alone);
- the newest records deleted (no later record points to them) or the chain rebuilt by someone
  who holds the private key: the chain alone cannot show either, so `verify_filings` compares
  the records with the command audit, where the controller journals the seq and hash of every
  record it filed. Someone who also edits the audit is caught only by the copies handed over
  (each names its seq and hash), which is why the verifier prints the newest seq and hash.

The private key is made once, on first use, in the state directory (PKCS8 PEM, 0600). A key file
that cannot be read, is not Ed25519 or does not match its `.pub` stops filing with one line: a
new key is never made silently, as it would orphan the verification of every earlier record.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from controller.bms_users import write_atomic

FORMAT = "heatloop-commissioning/1"
KEY_FILE = "commission_ed25519.pem"
PUB_FILE = "commission_ed25519.pub"
MAX_BYTES = 1 << 20  # canonical body, as the command channel's limit for it
MAX_STEPS = 200
MAX_TEXT = 4000  # characters in any one string
MAX_DEPTH = 16  # nesting of objects and lists
MAX_KEY_FILE = 64 * 1024

PURPOSES = ("handover", "proof test")
TARGETS = ("sim", "live")
METHODS = ("sim", "forced", "physical", "heartbeat_hold")
RESULTS = ("passed", "failed", "aborted", "skipped", "not_testable")
OUTCOMES = ("passed", "failed", "aborted", "incomplete")
# methods that exercise the real plant's path: only these count as a proof test
PROOF_METHODS = frozenset({"forced", "physical", "heartbeat_hold"})
# what `seal` adds; a body carrying any of them is refused (it would be overwritten)
SEAL_KEYS = (
    "seq",
    "prev_hash",
    "filed_wall",
    "filed_by",
    "controller",
    "public_key",
    "hash",
    "signature",
)
ORPHAN = "a new key would orphan the verification of every earlier record"


class RecordError(ValueError):
    """A malformed record body or an unusable key file; `str()` is one line naming the field
    or file, the value and what was expected."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stored or copied record; `seq` None when it has none."""

    seq: int | None
    what: str

    def __str__(self) -> str:
        return f"{'record' if self.seq is None else f'seq {self.seq}'}: {self.what}"


def canonical(obj: object) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no spaces, UTF-8, finite numbers."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _shown(v: object, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "…"


# ---- the key ----


def key_paths(state_dir: Path) -> tuple[Path, Path]:
    """(private key PEM, 0600; public key as hex, 0644) in the state directory."""
    d = Path(state_dir)
    return d / KEY_FILE, d / PUB_FILE


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte Ed25519 public key as 64 hex digits."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _read_private(pem: Path) -> Ed25519PrivateKey:
    keep = f"restore it from its backup; never delete it to make a new one: {ORPHAN}"
    try:
        if pem.stat().st_size > MAX_KEY_FILE:
            raise RecordError(f"{pem}: larger than {MAX_KEY_FILE} bytes, not a key file; {keep}")
        data = pem.read_bytes()
    except OSError as e:
        raise RecordError(f"{pem}: cannot be read ({e.strerror or e}); fix it or {keep}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        why = " ".join(str(e).split())[:200]
        raise RecordError(f"{pem}: not an unencrypted PEM private key ({why}); {keep}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RecordError(f"{pem}: holds a {type(key).__name__}, expected an Ed25519 key; {keep}")
    return key


def load_or_create_key(state_dir: Path) -> Ed25519PrivateKey:
    """The site's signing key, made on first use (PEM 0600 and its `.pub` 0644, each written
    whole or not at all). RecordError (one line: the file and what to do) when the key file
    cannot be read, is not Ed25519, or does not match its `.pub`, and when the `.pub` stands
    without its key: never a silent new key."""
    pem, pub = key_paths(state_dir)
    if not pem.exists() and not pem.is_symlink():
        if pub.exists() or pub.is_symlink():
            raise RecordError(
                f"{pem}: missing, but its public key {pub.name} is there; restore the private "
                f"key from its backup ({ORPHAN}; move {pub.name} aside only to start a new "
                "key on purpose)"
            )
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(pem, data, 0o600)
        write_atomic(pub, (public_key_hex(key) + "\n").encode("ascii"), 0o644)
        return key
    key = _read_private(pem)
    want = public_key_hex(key)
    try:
        text = pub.read_bytes()[:MAX_KEY_FILE].decode("ascii").strip().lower()
    except FileNotFoundError:
        # the key was written and the power went before its .pub: derived, so nothing orphaned
        write_atomic(pub, (want + "\n").encode("ascii"), 0o644)
        return key
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(
            f"{pub}: cannot be read ({getattr(e, 'strerror', None) or e}); it must hold "
            f"{want}, the public key of {pem.name}"
        ) from None
    if text != want:
        raise RecordError(
            f"{pub}: holds {_shown(text, 70)} but {pem.name} has public key {want}; put back "
            f"the matching pair from its backup, never make a new key: {ORPHAN}"
        )
    return key


def _key_hex(text: object) -> str | None:
    """`text` as a lowercase 64-hex-digit public key, or None."""
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    return t if re.fullmatch(r"[0-9a-f]{64}", t) else None


# ---- the body ----


def _bad(field: str, value: object, expected: str) -> RecordError:
    return RecordError(f"record field {field}: {_shown(value)}, expected {expected}")


def _walk(x: object, path: str, depth: int) -> None:
    """Every value is JSON, every number finite, every string bounded, nesting bounded."""
    if depth > MAX_DEPTH:
        raise RecordError(f"record field {path}: nested deeper than {MAX_DEPTH} levels")
    if x is None or isinstance(x, bool | int):
        return
    if isinstance(x, float):
        if not math.isfinite(x):
            raise _bad(path, x, "a finite number")
    elif isinstance(x, str):
        if len(x) > MAX_TEXT:
            raise RecordError(
                f"record field {path}: {len(x)} characters, expected at most {MAX_TEXT}"
            )
    elif isinstance(x, Mapping):
        for k, v in x.items():
            if not isinstance(k, str):
                raise _bad(f"{path} key", k, "text keys (a JSON object)")
            if len(k) > 200:
                raise _bad(f"{path} key", k, "a key of at most 200 characters")
            _walk(v, f"{path}.{k}" if path else k, depth + 1)
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _walk(v, f"{path}[{i}]", depth + 1)
    else:
        raise _bad(path, x, f"a JSON value, not {type(x).__name__}")


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _need(d: Mapping[str, Any], key: str, path: str, kind: str, optional: bool = False) -> None:
    field = f"{path}.{key}" if path else key
    if key not in d:
        if optional:
            return
        raise RecordError(f"record field {field}: missing, expected {kind}")
    v = d[key]
    ok = {
        "text": isinstance(v, str),
        "non-empty text": isinstance(v, str) and bool(v.strip()),
        "text or null": v is None or isinstance(v, str),
        "a finite number": _number(v),
        "an object": isinstance(v, Mapping),
        "an object or null": v is None or isinstance(v, Mapping),
        "a list of objects": isinstance(v, list | tuple) and all(isinstance(e, Mapping) for e in v),
        "a list of text": isinstance(v, list | tuple) and all(isinstance(e, str) for e in v),
    }[kind]
    if not ok:
        raise _bad(field, v, kind)


def _one_of(d: Mapping[str, Any], key: str, path: str, allowed: Sequence[str]) -> None:
    field = f"{path}.{key}" if path else key
    if d.get(key) not in allowed:
        shown = d.get(key, "missing")
        raise _bad(field, shown, "one of " + ", ".join(allowed))


def check_body(body: object) -> dict[str, Any]:
    """The record body (see docs/commissioning.md) as a plain JSON dict of its own (a copy),
    or RecordError naming the field, its value and what was expected."""
    if not isinstance(body, Mapping):
        raise RecordError(f"record: {type(body).__name__}, expected a JSON object")
    _walk(body, "", 0)
    if body.get("format") != FORMAT:
        raise _bad("format", body.get("format", "missing"), repr(FORMAT))
    for key in SEAL_KEYS:
        if key in body:
            raise _bad(key, body[key], "absent (the controller adds it when it seals the record)")
    _need(body, "run_id", "", "non-empty text")
    _one_of(body, "purpose", "", PURPOSES)
    _one_of(body, "target", "", TARGETS)
    _need(body, "site", "", "an object")
    for key in ("name", "file", "sha256"):
        _need(body["site"], key, "site", "text")
    _need(body, "software", "", "an object")
    _need(body["software"], "version", "software", "text")
    _need(body, "rule_table_sha256", "", "text")
    _need(body, "engineer", "", "non-empty text")
    _need(body, "os_user", "", "text", optional=True)
    _need(body, "started_wall", "", "a finite number")
    _need(body, "ended_wall", "", "a finite number")
    _need(body, "steps", "", "a list of objects")
    steps = body["steps"]
    if len(steps) > MAX_STEPS:
        raise RecordError(f"record field steps: {len(steps)} steps, expected at most {MAX_STEPS}")
    for i, step in enumerate(steps):
        _need(step, "id", f"steps[{i}]", "non-empty text")
        _one_of(step, "method", f"steps[{i}]", METHODS)
        _one_of(step, "result", f"steps[{i}]", RESULTS)
    _one_of(body, "outcome", "", OUTCOMES)
    for key in ("bypasses_at_start", "bypasses_at_end", "forces_used"):
        _need(body, key, "", "a list of objects", optional=True)
    _need(body, "bypasses_removed", "", "a list of text", optional=True)
    _need(body, "bypass_signoff_reason", "", "text or null", optional=True)
    _need(body, "summary", "", "an object", optional=True)
    _need(body, "comments", "", "text", optional=True)
    _need(body, "signoff", "", "an object or null", optional=True)
    try:
        data = canonical(body)
    except (TypeError, ValueError) as e:  # a lone surrogate; an integer of 4300+ digits
        raise RecordError(f"record: not storable as JSON text ({_shown(str(e), 120)})") from None
    if len(data) > MAX_BYTES:
        raise RecordError(f"record: {len(data)} bytes as JSON, expected at most {MAX_BYTES}")
    copy: dict[str, Any] = json.loads(data)
    return copy


# ---- the seal ----


def seal(
    body: Mapping[str, Any],
    prev: Mapping[str, Any] | None,
    key: Ed25519PrivateKey,
    *,
    filed_wall: float,
    filed_by: str,
    controller: Mapping[str, Any],
) -> dict[str, Any]:
    """The sealed record: `body` (checked) chained after `prev` (the newest sealed record,
    None for the first), hashed and signed with `key`. RecordError when the body, `prev` or
    the filing fields are malformed."""
    rec = check_body(body)
    if prev is None:
        seq, prev_hash = 1, ""
    else:
        s, h = prev.get("seq"), prev.get("hash")
        damaged = "; the stored records are damaged: see heatloop commission verify --site SITE"
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise RecordError(
                f"the newest stored record's seq {_shown(s)}: expected an integer from 1{damaged}"
            )
        if not isinstance(h, str) or not h:
            raise RecordError(
                f"the newest stored record (seq {s}) has hash {_shown(h)}: expected its "
                f"hash{damaged}"
            )
        seq, prev_hash = s + 1, h
    if not _number(filed_wall):
        raise _bad("filed_wall", filed_wall, "a finite wall time")
    if not isinstance(filed_by, str) or not filed_by.strip() or len(filed_by) > MAX_TEXT:
        raise _bad("filed_by", filed_by, "the principal who filed it (non-empty text)")
    if not isinstance(controller, Mapping):
        raise _bad("controller", controller, "an object")
    _walk(controller, "controller", 1)
    rec.update(
        seq=seq,
        prev_hash=prev_hash,
        filed_wall=float(filed_wall),
        filed_by=filed_by,
        controller=json.loads(canonical(dict(controller))),
        public_key=public_key_hex(key),
    )
    data = canonical(rec)
    rec["hash"] = hashlib.sha256(data).hexdigest()
    rec["signature"] = key.sign(data).hex()
    return rec


# ---- verification ----


def _seq(rec: object) -> int | None:
    s = rec.get("seq") if isinstance(rec, Mapping) else None
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _own_problems(rec: object) -> list[Problem]:
    """The record checked against itself: format, hash, signature with its embedded key."""
    if not isinstance(rec, Mapping):
        return [Problem(None, f"not a record: {type(rec).__name__}, expected a JSON object")]
    seq = _seq(rec)
    if "unreadable" in rec and "hash" not in rec:
        return [Problem(seq, f"the stored record is unreadable: {rec['unreadable']}")]
    missing = [k for k in ("hash", "signature", "public_key") if not isinstance(rec.get(k), str)]
    if missing:
        return [Problem(seq, f"not a sealed record: {', '.join(missing)} missing or not text")]
    out: list[Problem] = []
    if seq is None:
        out.append(Problem(None, f"seq {_shown(rec.get('seq'))}: expected an integer"))
    if rec.get("format") != FORMAT:
        out.append(Problem(seq, f"format {_shown(rec.get('format'))}, expected {FORMAT!r}"))
    try:
        data = canonical({k: v for k, v in rec.items() if k not in ("hash", "signature")})
    except (TypeError, ValueError, RecursionError) as e:
        return [*out, Problem(seq, f"its content is not canonical JSON ({_shown(str(e), 120)})")]
    if hashlib.sha256(data).hexdigest() != rec["hash"]:
        out.append(Problem(seq, "altered after sealing: its content does not match its hash"))
    key = _key_hex(rec["public_key"])
    if key is None:
        out.append(Problem(seq, f"public_key {_shown(rec['public_key'])}: expected 64 hex digits"))
        return out
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(
            bytes.fromhex(rec["signature"]), data
        )
    except (ValueError, InvalidSignature):
        out.append(
            Problem(seq, "its signature does not verify with its public key (altered or forged)")
        )
    return out


def _pinned(rec: Mapping[str, Any], public_key_hex: str) -> list[Problem]:
    got = _key_hex(rec.get("public_key"))
    if got == public_key_hex or not isinstance(rec.get("public_key"), str):
        return []
    return [
        Problem(
            _seq(rec),
            f"signed with key {_shown(rec.get('public_key'), 70)}, not with the site's key "
            f"{public_key_hex} (re-signed or forged)",
        )
    ]


def _checked_key(public_key_hex: str | None) -> tuple[str | None, list[Problem]]:
    if public_key_hex is None:
        return None, []
    key = _key_hex(public_key_hex)
    if key is None:
        what = f"public key {_shown(public_key_hex)}: expected 64 hex digits (the site's key)"
        return None, [Problem(None, what)]
    return key, []


def verify_record(record: Mapping[str, Any], public_key_hex: str) -> list[Problem]:
    """One record on its own (a copy off the machine): its hash, its signature, and that it
    was signed with `public_key_hex`. [] = genuine."""
    key, out = _checked_key(public_key_hex)
    if out:
        return out
    out = _own_problems(record)
    if key is not None and isinstance(record, Mapping):
        out += _pinned(record, key)
    return out


def verify_chain(
    records: Sequence[Mapping[str, Any]], public_key_hex: str | None = None
) -> list[Problem]:
    """The journal's records in stored order: each one's hash and signature, seq 1..n with no
    gap, each `prev_hash` the hash of the one before, one signing key throughout, and (when
    given) that key is `public_key_hex`. [] = intact. Every problem names its seq."""
    key, out = _checked_key(public_key_hex)
    first_key: str | None = None
    prev: Mapping[str, Any] | None = None
    for i, rec in enumerate(records, start=1):
        out += _own_problems(rec)
        if not isinstance(rec, Mapping):
            prev = None
            continue
        seq = _seq(rec)
        if seq != i:
            out.append(
                Problem(
                    seq,
                    f"found at position {i}, expected seq {i} there "
                    "(a record was deleted, inserted or reordered)",
                )
            )
        want_prev = "" if i == 1 else (prev.get("hash") if prev is not None else None)
        if rec.get("prev_hash") != want_prev:
            before = "nothing (the first record)" if i == 1 else f"the record at position {i - 1}"
            out.append(
                Problem(
                    seq,
                    f"prev_hash {_shown(rec.get('prev_hash'), 24)} is not the hash of {before} "
                    "(a record was deleted, reordered or altered)",
                )
            )
        if key is not None:
            out += _pinned(rec, key)
        else:
            k = _key_hex(rec.get("public_key"))
            if first_key is None:
                first_key = k
            elif k is not None and k != first_key:
                out.append(
                    Problem(
                        seq,
                        f"signed with key {k}, the records before it with {first_key} "
                        f"(the signing key changed at seq {seq})",
                    )
                )
        prev = rec
    return out


def verify_filings(
    records: Sequence[Mapping[str, Any]], filings: Iterable[Mapping[str, Any]]
) -> list[Problem]:
    """The command audit's accepted filings (`journal.read_commission_filings`) against the
    stored records: each seq filed is still there, with the hash it was filed with. This
    catches what the chain alone cannot: the newest records deleted (no later record points
    to them), or the whole chain rebuilt. [] = every filing accounted for."""
    stored = {s: rec for rec in records if (s := _seq(rec)) is not None}
    out: list[Problem] = []
    for f in filings:
        when = f"filed {_iso(f.get('wall_time'))} by {_txt(f.get('principal'))}"
        seq = f.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            what = _txt(f.get("unreadable") or seq)
            out.append(
                Problem(None, f"a filing in the command audit ({when}) is unreadable: {what}")
            )
            continue
        rec = stored.get(seq)
        if rec is None:
            out.append(
                Problem(seq, f"{when} (command audit) but missing from the records: deleted")
            )
        elif rec.get("hash") != f.get("hash"):
            out.append(
                Problem(
                    seq,
                    f"{when} with hash {_shown(f.get('hash'), 70)} (command audit), but the "
                    f"stored record's hash is {_shown(rec.get('hash'), 70)}: replaced",
                )
            )
    return out


def last_passed(
    records: Iterable[Mapping[str, Any]], public_key_hex: str | None = None
) -> dict[str, float]:
    """Step id -> newest `filed_wall` of a record on the live plant in which that step passed
    by a method that exercises the plant's path (forced, physical, heartbeat_hold). Simulated
    records never count; neither does a record that fails its own hash or signature, nor
    (when `public_key_hex` is given) one signed with another key."""
    key = _key_hex(public_key_hex) if public_key_hex is not None else None
    out: dict[str, float] = {}
    for rec in records:
        if not isinstance(rec, Mapping) or rec.get("target") != "live":
            continue
        wall = rec.get("filed_wall")
        if not _number(wall) or not isinstance(rec.get("steps"), list):
            continue
        if public_key_hex is not None and _key_hex(rec.get("public_key")) != key:
            continue
        if _own_problems(rec):
            continue
        for step in rec["steps"]:
            if not isinstance(step, Mapping) or not isinstance(step.get("id"), str):
                continue
            if step.get("result") == "passed" and step.get("method") in PROOF_METHODS:
                out[step["id"]] = max(out.get(step["id"], -math.inf), float(wall))
    return out


# ---- rendering ----


# bidirectional overrides and isolates: they make text display in another order than it is
# stored ("Trojan Source"), so a value could read differently from what was signed
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean(text: str, keep: str = "\n\t") -> str:
    """`text` with control characters (but those in `keep`) and bidi controls shown as "?"."""
    return "".join(
        "?" if (c in _BIDI or (unicodedata.category(c) == "Cc" and c not in keep)) else c
        for c in text
    )


def _m(x: object) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _l(x: object) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else []


def _iso(w: object) -> str:
    if not _number(w):
        return "—"
    try:
        t = datetime.fromtimestamp(float(w), UTC)  # type: ignore[arg-type]
    except (OverflowError, OSError, ValueError):
        return _shown(w)
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _txt(v: object) -> str:
    """A value as plain text (not yet escaped): numbers short, None a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return format(v, ".6g") if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return " or ".join(_txt(e) for e in v) if v else "—"
    if isinstance(v, Mapping):
        return json.dumps(v, sort_keys=True, ensure_ascii=False, default=str)
    return str(v)


def _secs(v: object) -> str:
    return f"{v:.3f}" if _number(v) else "—"


def _ok(v: object) -> str:
    return {True: "ok", False: "NOT OK"}.get(v, "—") if isinstance(v, bool) else "—"


def _verdict(row: Mapping[str, Any]) -> str:
    """ok / NOT OK, with the judge's note (e.g. "not proven: already at this value")."""
    note = row.get("note")
    return f"{_ok(row.get('ok'))}; {_txt(note)}" if note else _ok(row.get("ok"))


def failed_steps(record: Mapping[str, Any]) -> int:
    return sum(1 for s in _l(record.get("steps")) if _m(s).get("result") == "failed")


def report_name(record: Mapping[str, Any]) -> str:
    """`<site>-commissioning-<seq:04d>`: the reports' file name without its suffix."""
    name = str(_m(record.get("site")).get("name") or "site")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64] or "site"
    seq = _seq(record)
    return f"{safe}-commissioning-{seq if seq is not None and seq >= 0 else 0:04d}"


@dataclass(frozen=True)
class _Head:
    """The top of a report, as plain text: (label, value) rows and the warning lines."""

    title: str
    outcome: str
    failed: int
    sim: bool
    rows: list[tuple[str, str]]
    warnings: list[str]
    verify: str


SIM_NOTE = "SIMULATED PLANT: this record proves the procedure and the control logic, not the plant."


def _head(rec: Mapping[str, Any]) -> _Head:
    site, soft, ctl = _m(rec.get("site")), _m(rec.get("software")), _m(rec.get("controller"))
    target = rec.get("target")
    warnings = []
    if not isinstance(rec.get("signature"), str):
        warnings.append(
            "NOT FILED: the controller did not seal this record; it carries no hash or "
            "signature and proves nothing until it is filed."
        )
    if ctl and ctl.get("site_sha256") != site.get("sha256"):
        warnings.append(
            "WARNING: the site file the tool read (sha256 "
            f"{_txt(site.get('sha256'))}) is not the one the controller runs "
            f"({_txt(ctl.get('site_sha256'))})."
        )
    if ctl and ctl.get("rule_table_sha256") != rec.get("rule_table_sha256"):
        warnings.append(
            "WARNING: the tool's rule table (sha256 "
            f"{_txt(rec.get('rule_table_sha256'))}) is not the controller's "
            f"({_txt(ctl.get('rule_table_sha256'))})."
        )
    if _l(rec.get("bypasses_at_end")):
        warnings.append("WARNING: bypasses stood at sign-off (listed below with the reason).")
    summary = _m(rec.get("summary"))
    engineer = _txt(rec.get("engineer"))
    if rec.get("os_user"):
        engineer += f" (OS user {_txt(rec.get('os_user'))})"
    rows = [
        ("Site", f"{_txt(site.get('name'))} ({_txt(site.get('file'))})"),
        ("Purpose", _txt(rec.get("purpose"))),
        ("Target", {"live": "live plant", "sim": "simulated plant"}.get(str(target), _txt(target))),
        ("Outcome", _txt(rec.get("outcome")).upper()),
        (
            "Steps",
            ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.items())
            or f"{len(_l(rec.get('steps')))}",
        ),
        ("Engineer", engineer),
        ("Started (UTC)", _iso(rec.get("started_wall"))),
        ("Ended (UTC)", _iso(rec.get("ended_wall"))),
        (
            "Software",
            f"heatloop {_txt(soft.get('version'))}, Python {_txt(soft.get('python'))}; "
            f"controller {_txt(ctl.get('version'))}",
        ),
        ("Site file sha256", _txt(site.get("sha256"))),
        ("Controller's site file sha256", _txt(ctl.get("site_sha256"))),
        ("Rule table sha256", _txt(rec.get("rule_table_sha256"))),
        ("Record", f"seq {_txt(rec.get('seq'))}, run {_txt(rec.get('run_id'))}"),
        ("Filed (UTC)", f"{_iso(rec.get('filed_wall'))} by {_txt(rec.get('filed_by'))}"),
        ("Previous record's hash", _txt(rec.get("prev_hash")) or "none (the first record)"),
        ("Hash", _txt(rec.get("hash"))),
        ("Signature (Ed25519)", _txt(rec.get("signature"))),
        ("Site public key", _txt(rec.get("public_key"))),
    ]
    verify = (
        f"heatloop commission verify --record {report_name(rec)}.json "
        f"--public-key {_key_hex(rec.get('public_key')) or 'HEX'}"
        if isinstance(rec.get("signature"), str)
        else ""
    )
    return _Head(
        title=f"Commissioning record: {_txt(site.get('name'))}",
        outcome=_txt(rec.get("outcome")).upper(),
        failed=failed_steps(rec),
        sim=target == "sim",
        rows=rows,
        warnings=warnings,
        verify=verify,
    )


def _failed_line(n: int) -> str:
    return f"{n} FAILED STEP{'S' if n != 1 else ''}"


def _step_rows(rec: Mapping[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            _txt(s.get("id")),
            _txt(s.get("hazard")),
            _txt(s.get("method")),
            _secs(s.get("required_s")),
            _secs(s.get("response_s")),
            _txt(s.get("result")).upper(),
        )
        for s in map(_m, _l(rec.get("steps")))
    ]


STEP_COLUMNS = ("Step", "Hazard", "Method", "Required s", "Measured s", "Result")
EFFECT_COLUMNS = ("Output", "Expected", "Before", "As found", "At s", "Level", "")
FEEDBACK_COLUMNS = ("Feedback", "Expected", "Before", "As found", "Within s", "At s", "")
BYPASS_COLUMNS = ("Rule", "Who", "Reason", "Until (UTC)")
FORCE_COLUMNS = ("Tag", "Value", "Step", "Set (UTC)", "Cleared (UTC)")


def _effect_rows(step: Mapping[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            _txt(e.get("output")),
            _txt(e.get("expected")),
            _txt(e.get("before")),
            _txt(e.get("as_found")),
            _secs(e.get("at_s")),
            _txt(e.get("level")),
            _verdict(e),
        )
        for e in map(_m, _l(step.get("effects")))
    ]


def _feedback_rows(step: Mapping[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            _txt(f.get("tag")),
            _txt(f.get("expected")),
            _txt(f.get("before")),
            _txt(f.get("as_found")),
            _secs(f.get("within_s")),
            _secs(f.get("at_s")),
            _verdict(f),
        )
        for f in map(_m, _l(step.get("feedback")))
    ]


def _response(step: Mapping[str, Any]) -> str:
    required = step.get("required_s")
    want = f"required within {_secs(required)} s" if _number(required) else "no time required"
    got = step.get("response_s")
    return f"{_secs(got)} s measured, {want}" if _number(got) else f"not measured, {want}"


def _step_facts(step: Mapping[str, Any]) -> list[tuple[str, str]]:
    reset = _m(step.get("reset"))
    if reset:
        done = "done" if reset.get("done") else "NOT done"
        reset_text = (
            f"needed, {done}: {_txt(reset.get('how'))}" if reset.get("needed") else "not needed"
        )
    else:
        reset_text = "—"
    return [
        ("Hazard", _txt(step.get("hazard"))),
        ("Cause", _txt(step.get("cause"))),
        ("Applied", f"{_txt(step.get('applied'))} (method {_txt(step.get('method'))})"),
        ("Expected effect", _txt(step.get("effect"))),
        ("Response", _response(step)),
        (
            "Rule",
            f"active {_txt(step.get('rule_active'))}, latched {_txt(step.get('latched'))}",
        ),
        (
            "Mode",
            f"{_txt(step.get('mode_before'))} before, {_txt(step.get('mode_during'))} during, "
            f"{_txt(step.get('mode_after'))} after",
        ),
        ("Reset", reset_text),
        (
            "Restored",
            f"{_txt(step.get('restored'))}; back to normal: {_txt(step.get('back_to_normal'))}",
        ),
        ("Time (UTC)", f"{_iso(step.get('started_wall'))} to {_iso(step.get('ended_wall'))}"),
    ]


def _bypass_rows(items: object) -> list[tuple[str, ...]]:
    return [
        (_txt(b.get("rule")), _txt(b.get("who")), _txt(b.get("reason")), _iso(b.get("until_wall")))
        for b in map(_m, _l(items))
    ]


def _force_rows(items: object) -> list[tuple[str, ...]]:
    return [
        (
            _txt(f.get("tag")),
            _txt(f.get("value")),
            _txt(f.get("step")),
            _iso(f.get("set_wall")),
            _iso(f.get("cleared_wall")),
        )
        for f in map(_m, _l(items))
    ]


# ---- Markdown ----

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#&!~{}])")


def _md(text: str) -> str:
    """Text safe in Markdown: one line, every character that could format or open HTML
    backslash-escaped (a `<script>` in a comment stays text)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(_clean(text).split()))


def _md_table(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return out


def to_markdown(record: Mapping[str, Any]) -> str:
    """The record as a Markdown page: outcome and failures first, then each step."""
    rec = _m(record)
    h = _head(rec)
    out = [f"# {_md(h.title)}", ""]
    line = f"**OUTCOME: {_md(h.outcome)}**"
    if h.failed:
        line += f" — **{_failed_line(h.failed)}**"
    out += [line, ""]
    if h.sim:
        out += [f"**{_md(SIM_NOTE)}**", ""]
    for w in h.warnings:
        out += [f"**{_md(w)}**", ""]
    out += [*_md_table(("", ""), h.rows), ""]
    if h.verify:
        out += [
            "To verify this record (its JSON copy) with the site's public key alone:",
            "",
            f"    {h.verify}",
            "",
        ]
    out += ["## Steps", ""]
    out += [*_md_table(STEP_COLUMNS, _step_rows(rec)), ""]
    for step in map(_m, _l(rec.get("steps"))):
        out += [f"### {_md(_txt(step.get('id')))}: {_md(_txt(step.get('result')).upper())}", ""]
        out += [f"- {_md(k)}: {_md(v)}" for k, v in _step_facts(step)] + [""]
        if _l(step.get("effects")):
            out += [*_md_table(EFFECT_COLUMNS, _effect_rows(step)), ""]
        if _l(step.get("feedback")):
            out += [*_md_table(FEEDBACK_COLUMNS, _feedback_rows(step)), ""]
        for f in _l(step.get("failures")):
            out.append(f"- **FAILURE**: {_md(_txt(f))}")
        if _l(step.get("failures")):
            out.append("")
        if step.get("comment"):
            out += [f"> {_md(line)}" for line in str(step["comment"]).splitlines() if line.strip()]
            out.append("")
    out += ["## Bypasses", ""]
    for title, key in (("At the start", "bypasses_at_start"), ("At the end", "bypasses_at_end")):
        rows = _bypass_rows(rec.get(key))
        out += [f"{title}: none" if not rows else f"{title}:", ""]
        if rows:
            out += [*_md_table(BYPASS_COLUMNS, rows), ""]
    removed = ", ".join(_txt(r) for r in _l(rec.get("bypasses_removed"))) or "none"
    out += [f"Removed during the run: {_md(removed)}", ""]
    if rec.get("bypass_signoff_reason"):
        reason = _txt(rec.get("bypass_signoff_reason"))
        out += [f"Signed off while a bypass stood, because: {_md(reason)}", ""]
    out += ["## Forces used", ""]
    forces = _force_rows(rec.get("forces_used"))
    out += (_md_table(FORCE_COLUMNS, forces) if forces else ["none"]) + [""]
    if rec.get("comments"):
        out += ["## Comments", ""]
        out += [f"> {_md(line)}" for line in str(rec["comments"]).splitlines() if line.strip()]
        out.append("")
    so = _m(rec.get("signoff"))
    out += ["## Sign-off", ""]
    if so:
        out += [
            f"- Engineer: {_md(_txt(so.get('engineer')))}",
            f"- Statement: {_md(_txt(so.get('statement')))}",
            f"- Signed (UTC): {_md(_iso(so.get('wall')))}",
        ]
    else:
        out.append("not signed off")
    return "\n".join(out) + "\n"


# ---- HTML ----

_CSS = """
body { font: 10.5pt/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #111; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #999; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .3em; }
.outcome { font-size: 2.6em; font-weight: 800; letter-spacing: .05em; margin: .2em 0; }
.passed { color: #0a6b2b; } .failed, .aborted, .incomplete { color: #b00020; }
.failcount { font-size: 1.6em; font-weight: 800; color: #b00020; }
.sim, .warn { font-weight: 700; border: 2px solid #b36b00; padding: .4em .6em; margin: .4em 0; }
table { border-collapse: collapse; width: 100%; margin: .4em 0; }
th, td { border: 1px solid #bbb; padding: .2em .4em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.hex, code { font-family: ui-monospace, monospace; word-break: break-all; font-size: .9em; }
tr.bad td { background: #fde7ea; }
.comment { white-space: pre-wrap; border-left: 3px solid #999; padding-left: .6em; }
@media print {
  body { margin: 0; max-width: none; font-size: 9.5pt; }
  .step { break-inside: avoid; }
  h2 { break-after: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


def _h(text: str) -> str:
    return html.escape(_clean(text), quote=True)


def _html_table(
    cols: Sequence[str], rows: Sequence[Sequence[str]], bad_col: int | None = None
) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(c)}</th>" for c in cols) + "</tr>"]
    for r in rows:
        bad = bad_col is not None and r[bad_col].split(";")[0] in ("NOT OK", "FAILED", "ABORTED")
        cells = "".join(f"<td>{_h(c)}</td>" for c in r)
        out.append(("<tr class='bad'>" if bad else "<tr>") + cells + "</tr>")
    out.append("</table>")
    return out


def to_html(record: Mapping[str, Any]) -> str:
    """The record as one printable HTML page: inline CSS, no external assets, every text
    escaped."""
    rec = _m(record)
    h = _head(rec)
    klass = h.outcome.lower() if h.outcome.lower() in OUTCOMES else "failed"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(h.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_h(h.title)}</h1>",
        f'<div class="outcome {klass}">{_h(h.outcome)}</div>',
    ]
    if h.failed:
        out.append(f'<div class="failcount">{_failed_line(h.failed)}</div>')
    if h.sim:
        out.append(f'<p class="sim">{_h(SIM_NOTE)}</p>')
    out += [f'<p class="warn">{_h(w)}</p>' for w in h.warnings]
    out.append("<table>")
    for label, value in h.rows:
        hexy = label.lower().endswith(("sha256", "hash", "key", "(ed25519)"))
        cls = ' class="hex"' if hexy else ""
        out.append(f"<tr><th>{_h(label)}</th><td{cls}>{_h(value)}</td></tr>")
    out.append("</table>")
    if h.verify:
        out += [
            "<p>To verify this record (its JSON copy) with the site's public key alone:</p>",
            f"<p><code>{_h(h.verify)}</code></p>",
        ]
    out.append("<h2>Steps</h2>")
    out += _html_table(STEP_COLUMNS, _step_rows(rec), bad_col=5)
    for step in map(_m, _l(rec.get("steps"))):
        out.append('<div class="step">')
        out.append(f"<h3>{_h(_txt(step.get('id')))}: {_h(_txt(step.get('result')).upper())}</h3>")
        out.append("<table>")
        out += [f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in _step_facts(step)]
        out.append("</table>")
        if _l(step.get("effects")):
            out += _html_table(EFFECT_COLUMNS, _effect_rows(step), bad_col=6)
        if _l(step.get("feedback")):
            out += _html_table(FEEDBACK_COLUMNS, _feedback_rows(step), bad_col=6)
        fails = _l(step.get("failures"))
        if fails:
            out.append("<ul>" + "".join(f"<li><b>FAILURE</b>: {_h(_txt(f))}</li>" for f in fails))
            out.append("</ul>")
        if step.get("comment"):
            out.append(f'<p class="comment">{_h(str(step["comment"]))}</p>')
        out.append("</div>")
    out.append("<h2>Bypasses</h2>")
    for title, key in (("At the start", "bypasses_at_start"), ("At the end", "bypasses_at_end")):
        rows = _bypass_rows(rec.get(key))
        out.append(f"<p>{_h(title)}: none</p>" if not rows else f"<p>{_h(title)}:</p>")
        if rows:
            out += _html_table(BYPASS_COLUMNS, rows)
    removed = ", ".join(_txt(r) for r in _l(rec.get("bypasses_removed"))) or "none"
    out.append(f"<p>Removed during the run: {_h(removed)}</p>")
    if rec.get("bypass_signoff_reason"):
        reason = _txt(rec.get("bypass_signoff_reason"))
        out.append(f'<p class="warn">Signed off while a bypass stood, because: {_h(reason)}</p>')
    out.append("<h2>Forces used</h2>")
    forces = _force_rows(rec.get("forces_used"))
    out += _html_table(FORCE_COLUMNS, forces) if forces else ["<p>none</p>"]
    if rec.get("comments"):
        out += ["<h2>Comments</h2>", f'<p class="comment">{_h(str(rec["comments"]))}</p>']
    so = _m(rec.get("signoff"))
    out.append("<h2>Sign-off</h2>")
    if so:
        out += [
            "<table>",
            f"<tr><th>Engineer</th><td>{_h(_txt(so.get('engineer')))}</td></tr>",
            f"<tr><th>Statement</th><td>{_h(_txt(so.get('statement')))}</td></tr>",
            f"<tr><th>Signed (UTC)</th><td>{_h(_iso(so.get('wall')))}</td></tr>",
            "</table>",
        ]
    else:
        out.append("<p>not signed off</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def to_json(record: Mapping[str, Any]) -> str:
    """The sealed record itself, pretty (it verifies as it is: the hash is over the
    canonical form, which any JSON reader reproduces)."""
    return (
        json.dumps(dict(record), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        + "\n"
    )


def write_reports(record: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """`<site>-commissioning-<seq:04d>.{md,html,json}` in `out_dir`, each written whole or
    not at all; their paths, in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = report_name(record)
    paths = []
    for suffix, text in (
        (".md", to_markdown(record)),
        (".html", to_html(record)),
        (".json", to_json(record)),
    ):
        path = out_dir / (base + suffix)
        write_atomic(path, text.encode("utf-8"), 0o644)
        paths.append(path)
    return paths


# ---- `heatloop commission verify` ----

EXIT_OK, EXIT_RUNTIME, EXIT_PROBLEM = 0, 1, 2
MAX_RECORD_FILE = 4 * MAX_BYTES


def summary_line(rec: object, ok: bool) -> str:
    """`seq 3 2026-12-01T19:30:00Z passed IL-01…WD live ok`."""
    r = _m(rec)
    ids = [_plain(str(_m(s).get("id")), 40) for s in _l(r.get("steps"))]
    steps = "no steps" if not ids else ids[0] if len(ids) == 1 else f"{ids[0]}…{ids[-1]}"
    return (
        f"seq {_txt(r.get('seq'))} {_iso(r.get('filed_wall'))} {_txt(r.get('outcome'))} "
        f"{steps} {_txt(r.get('target'))} {'ok' if ok else 'PROBLEM'}"
    )


def _plain(text: str, limit: int = 2000) -> str:
    """One printable line: a tampered record's text must not move the cursor, clear the
    screen or print a line of its own (control characters become "?")."""
    text = " ".join(_clean(text, keep="").split())
    return text if len(text) <= limit else text[:limit] + "…"


def _say(text: str) -> None:
    print(_plain(text))


def _err(text: str) -> None:
    print(f"heatloop: {_plain(text)}", file=sys.stderr)


def _verify_file(path: Path, key_text: str) -> int:
    key = _key_hex(key_text)
    if key is None:
        _err(f"--public-key {_shown(key_text)}: expected 64 hex digits (printed on the record)")
        return EXIT_PROBLEM
    try:
        if path.stat().st_size > MAX_RECORD_FILE:
            _err(f"{path}: larger than {MAX_RECORD_FILE} bytes, not a commissioning record")
            return EXIT_PROBLEM
        data = path.read_bytes()
    except OSError as e:
        _err(f"{path}: cannot be read ({e.strerror or e})")
        return EXIT_PROBLEM
    try:
        rec = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        _err(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a record's .json")
        return EXIT_PROBLEM
    except (ValueError, RecursionError) as e:
        _err(f"{path}: not JSON ({_shown(str(e), 120)}); expected a record's .json")
        return EXIT_PROBLEM
    problems = verify_record(rec, key)
    _say(summary_line(rec, not problems))
    for p in problems:
        _say(f"  {p}")
    if problems:
        _say(f"NOT GENUINE: {len(problems)} problem(s) with {path} against public key {key}")
        return EXIT_PROBLEM
    _say(f"genuine: {path} is signed by public key {key} and unaltered")
    return EXIT_OK


def _verify_site(site_path: str, key_text: str | None) -> int:
    from controller.journal import (
        StoreUnreadable,
        read_commission_filings,
        read_commission_records,
        read_state_resets,
    )
    from plc_io.site import SiteError, load_site

    try:
        site = load_site(site_path)
    except SiteError as e:
        for p in e.problems:
            _err(f"{e.source}: {p}")
        return EXIT_PROBLEM
    pinned: str | None = None
    if key_text is not None:
        pinned = _key_hex(key_text)
        if pinned is None:
            _err(f"--public-key {_shown(key_text)}: expected 64 hex digits (the site's key)")
            return EXIT_PROBLEM
    store = site.state_dir / "heatloop.db"
    try:
        records = read_commission_records(store)
        filings = read_commission_filings(store)
        resets = read_state_resets(store)
    except StoreUnreadable as e:
        _err(str(e))
        return EXIT_RUNTIME
    _, pub = key_paths(site.state_dir)
    extra: list[str] = []
    try:
        on_disk = _key_hex(pub.read_bytes()[:MAX_KEY_FILE].decode("ascii", "replace"))
        if on_disk is None:
            extra.append(f"{pub}: not 64 hex digits of a public key")
    except OSError as e:
        on_disk = None
        if records:
            extra.append(f"{pub}: cannot be read ({e.strerror or e}); the site's key is unknown")
    if pinned is not None and on_disk is not None and on_disk != pinned:
        extra.append(f"{pub} holds {on_disk}, not the --public-key given ({pinned})")
    key = pinned or on_disk
    problems = verify_chain(records, key) + verify_filings(records, filings)
    by_seq: dict[int | None, list[Problem]] = {}
    for p in problems:
        by_seq.setdefault(p.seq, []).append(p)
    for rec in records:
        _say(summary_line(rec, _seq(rec) not in by_seq))
    for p in problems:
        _say(f"  {p}")
    for line in extra:
        _say(f"  {line}")
    for r in resets:  # not a problem: an engineer's fresh start, journalled with its reason
        _say(
            f"note: this store was started anew {_iso(r.get('wall_time'))} by "
            f"{_txt(r.get('who'))} ({_txt(r.get('reason'))}); the records before that are in "
            f"{_txt(r.get('old'))}"
        )
    if not records:
        _say(f"no commissioning records in {store}")
        return EXIT_PROBLEM if extra or problems else EXIT_OK
    newest = records[-1]
    tail = f"newest seq {_txt(newest.get('seq'))}, hash {_txt(newest.get('hash'))}"
    if problems or extra:
        _say(f"NOT INTACT: {len(problems) + len(extra)} problem(s) in {len(records)} record(s)")
        return EXIT_PROBLEM
    _say(
        f"intact: {len(records)} record(s), seq 1..{len(records)} chained, each signed by "
        f"the site's key {key}, every filing in the command audit present; {tail} (compare "
        "with the newest copy handed over)"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """`heatloop commission verify --site SITE [--public-key HEX]`: the journal's chain (exit 0
    intact, 2 any problem, 1 the store cannot be read); `--record FILE.json --public-key HEX`:
    one copy off the machine (exit 0 genuine, 2 not)."""
    site = getattr(args, "site", None)
    record = getattr(args, "record", None)
    key = getattr(args, "public_key", None)
    if (site is None) == (record is None):
        _err("commission verify: give --site SITE, or --record FILE.json --public-key HEX")
        return EXIT_PROBLEM
    if record is not None:
        if key is None:
            _err("--record needs --public-key HEX (the site's public key, printed on the record)")
            return EXIT_PROBLEM
        return _verify_file(Path(record), key)
    return _verify_site(str(site), key)
