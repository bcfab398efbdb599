"""Commissioning records: sealed records chain and verify; an altered, deleted, reordered or
re-signed record is detected in the journal and in a copy off the machine; only genuine live
passes count as proof tests; the reports escape what people typed; the key is private and
never silently replaced; bad bodies are refused naming the field; a schema-2 store migrates."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from controller import commission_record as cr
from controller.journal import (
    SCHEMA_VERSION,
    Journal,
    JournalKeeper,
    StoreUnreadable,
    open_checked,
    read_commission_filings,
    read_commission_records,
    reset_state,
)
from plc_io.site import demo_site_text

ROOT = Path(__file__).resolve().parents[2]
V2 = ROOT / "tests" / "data" / "state" / "v2.db"
WALL = 1_790_000_000.0
CONTROLLER = {"version": "0.1.0", "site_sha256": "a" * 64, "rule_table_sha256": "b" * 64}


def step(id_: str, method: str = "forced", result: str = "passed", **extra: Any) -> dict:
    return {
        "id": id_,
        "kind": "watchdog" if id_ == "WD" else "rule",
        "hazard": f"hazard of {id_}",
        "cause": "cause",
        "effect": "effect",
        "method": method,
        "applied": "applied",
        "required_s": 1.0,
        "response_s": 0.5,
        "effects": [],
        "feedback": [],
        "result": result,
        "failures": [] if result == "passed" else ["as found 50, expected 100"],
        "comment": "",
        **extra,
    }


def body(target: str = "live", steps: list[dict] | None = None, **extra: Any) -> dict:
    b = {
        "format": cr.FORMAT,
        "run_id": "0123456789abcdef",
        "purpose": "handover",
        "target": target,
        "site": {"name": "demo", "file": "/srv/site.toml", "sha256": "a" * 64},
        "software": {"version": "0.1.0", "python": "3.11.2"},
        "rule_table_sha256": "b" * 64,
        "engineer": "Eve",
        "os_user": "eve",
        "started_wall": WALL,
        "ended_wall": WALL + 600.0,
        "steps": steps if steps is not None else [step("IL-04"), step("WD", "heartbeat_hold")],
        "bypasses_at_start": [],
        "bypasses_at_end": [],
        "bypasses_removed": [],
        "bypass_signoff_reason": None,
        "forces_used": [],
        "outcome": "passed",
        "summary": {"passed": 2, "failed": 0},
        "comments": "",
        "signoff": {"engineer": "Eve", "statement": "as found", "wall": WALL + 600.0},
    }
    b.update(extra)
    return b


class Site:
    """A site file in tmp_path whose state directory holds a journal of sealed records."""

    def __init__(self, tmp_path: Path) -> None:
        self.file = tmp_path / "site.toml"
        self.file.write_text(demo_site_text())
        self.state = tmp_path / "state"
        self.db = self.state / "heatloop.db"
        self.key = cr.load_or_create_key(self.state)
        self.pub = cr.public_key_hex(self.key)

    def file_records(
        self, bodies: list[dict], key: Ed25519PrivateKey | None = None, audit: bool = True
    ) -> list[dict]:
        """Seal and file each body as the controller does: the record in its table, then the
        accepted request in the command audit with the seq and hash it was filed as."""
        keeper = JournalKeeper(self.db)
        try:
            prev = (keeper.commission_records() or [None])[-1]
            out = []
            for i, b in enumerate(bodies):
                wall = WALL + 1000.0 * (i + 1)
                prev = cr.seal(
                    b, prev, key or self.key, filed_wall=wall, filed_by="eve", controller=CONTROLLER
                )
                keeper.add_commission_record(prev)
                if audit:
                    new = json.dumps({"seq": prev["seq"], "hash": prev["hash"]})
                    row = (wall, f"r{i}", "eve", "engineer", "channel", "commission")
                    row += (b["run_id"], "null", new, "file", 1, "")
                    keeper.record([], frozenset(), commands=[row])
                out.append(prev)
            return out
        finally:
            keeper.close()

    def sql(self, statement: str, *params: object) -> None:
        db = sqlite3.connect(self.db)
        try:
            db.execute(statement, params)
            db.commit()
        finally:
            db.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def seqs(problems: list[cr.Problem]) -> set[int | None]:
    return {p.seq for p in problems}


# ---- seal and verify ----


def test_sealed_records_chain_and_verify_against_the_site_key(site: Site) -> None:
    filed = site.file_records([body(), body(), body()])
    stored = read_commission_records(site.db)
    assert stored == filed  # the JSON text keeps every value exactly
    assert [r["seq"] for r in stored] == [1, 2, 3]
    assert stored[0]["prev_hash"] == "" and stored[2]["prev_hash"] == stored[1]["hash"]
    assert all(r["public_key"] == site.pub for r in stored)
    assert cr.verify_chain(stored, site.pub) == []
    assert cr.verify_chain(stored) == []
    # the seal covers the controller's own view and who filed it, and signs those bytes
    content = {k: v for k, v in stored[1].items() if k not in ("hash", "signature")}
    assert content["controller"] == CONTROLLER and content["filed_by"] == "eve"
    site.key.public_key().verify(bytes.fromhex(stored[1]["signature"]), cr.canonical(content))


def test_a_field_altered_in_the_store_is_detected_naming_its_seq(site: Site) -> None:
    site.file_records([body(), body(), body()])
    rec = read_commission_records(site.db)[1]
    rec["steps"][1]["result"] = "passed"
    rec["steps"][0]["response_s"] = 0.1  # a slow response made to look fast
    site.sql("UPDATE commissioning SET record = ? WHERE seq = 2", json.dumps(rec))
    problems = cr.verify_chain(read_commission_records(site.db), site.pub)
    assert seqs(problems) == {2}
    assert any("altered after sealing" in str(p) for p in problems)
    assert all(str(p).startswith("seq 2: ") and "\n" not in str(p) for p in problems)


def test_an_altered_hash_breaks_the_next_link(site: Site) -> None:
    site.file_records([body(), body(), body()])
    rec = read_commission_records(site.db)[1]
    rec["engineer"] = "Mallory"
    content = {k: v for k, v in rec.items() if k not in ("hash", "signature")}
    import hashlib

    rec["hash"] = hashlib.sha256(cr.canonical(content)).hexdigest()  # no key to re-sign
    site.sql("UPDATE commissioning SET record = ? WHERE seq = 2", json.dumps(rec))
    problems = cr.verify_chain(read_commission_records(site.db), site.pub)
    assert seqs(problems) == {2, 3}
    assert any("signature does not verify" in p.what for p in problems if p.seq == 2)
    assert any("prev_hash" in p.what for p in problems if p.seq == 3)


def test_a_deleted_middle_record_is_detected(site: Site) -> None:
    site.file_records([body(), body(), body()])
    site.sql("DELETE FROM commissioning WHERE seq = 2")
    problems = cr.verify_chain(read_commission_records(site.db), site.pub)
    assert seqs(problems) == {3}
    assert any("expected seq 2" in p.what for p in problems)
    assert any("prev_hash" in p.what for p in problems)


def test_swapped_records_are_detected(site: Site) -> None:
    site.file_records([body(), body(), body()])
    site.sql("UPDATE commissioning SET seq = 99 WHERE seq = 1")
    site.sql("UPDATE commissioning SET seq = 1 WHERE seq = 2")
    site.sql("UPDATE commissioning SET seq = 2 WHERE seq = 99")
    problems = cr.verify_chain(read_commission_records(site.db), site.pub)
    assert {1, 2} <= seqs(problems)
    assert all("deleted" in p.what or "prev_hash" in p.what for p in problems)


def test_a_record_re_signed_with_another_key_is_detected(site: Site) -> None:
    site.file_records([body(), body()])
    other = Ed25519PrivateKey.generate()
    records = read_commission_records(site.db)
    # a forger rewrites record 2 and seals it again, with their key, in the right place
    forged_body = {k: v for k, v in records[1].items() if k not in cr.SEAL_KEYS}
    forged_body["engineer"] = "Mallory"
    forged = cr.seal(
        forged_body, records[0], other, filed_wall=WALL, filed_by="eve", controller=CONTROLLER
    )
    site.sql(
        "UPDATE commissioning SET record = ?, hash = ? WHERE seq = 2",
        json.dumps(forged),
        forged["hash"],
    )
    stored = read_commission_records(site.db)
    assert cr.verify_record(stored[1], cr.public_key_hex(other)) == []  # genuine to itself
    pinned = cr.verify_chain(stored, site.pub)
    assert seqs(pinned) == {2} and "not with the site's key" in pinned[0].what
    unpinned = cr.verify_chain(stored)  # no .pub: the key change still shows
    assert seqs(unpinned) == {2} and "signing key changed at seq 2" in unpinned[0].what
    # the whole chain re-signed with the forger's key: every record fails the site key
    site.sql("DELETE FROM commissioning")
    site.file_records([body(), body()], key=other, audit=False)
    assert seqs(cr.verify_chain(read_commission_records(site.db), site.pub)) == {1, 2}


def test_a_deleted_newest_record_is_caught_by_the_command_audit(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    filed = site.file_records([body(), body(), body()])
    site.sql("DELETE FROM commissioning WHERE seq = 3")
    records = read_commission_records(site.db)
    assert cr.verify_chain(records, site.pub) == []  # the chain alone cannot see it
    problems = cr.verify_filings(records, read_commission_filings(site.db))
    assert [(p.seq, "missing from the records: deleted" in p.what) for p in problems] == [(3, True)]
    assert verify(site=str(site.file)) == 2
    out = capsys.readouterr().out
    assert "seq 3: filed" in out and out.splitlines()[-1].startswith("NOT INTACT")
    # the whole chain rebuilt with the site's own key (someone who holds it): each replaced
    # record's hash differs from the one filed
    site.sql("DELETE FROM commissioning")
    site.file_records([body(comments="rewritten")] * 3, audit=False)
    records = read_commission_records(site.db)
    assert cr.verify_chain(records, site.pub) == []
    problems = cr.verify_filings(records, read_commission_filings(site.db))
    assert [p.seq for p in problems] == [1, 2, 3] and all("replaced" in p.what for p in problems)
    assert filed[0]["hash"] in problems[0].what


def test_an_unreadable_row_is_a_problem_not_a_crash(site: Site) -> None:
    site.file_records([body(), body()])
    site.sql("UPDATE commissioning SET record = ? WHERE seq = 2", "{not json")
    problems = cr.verify_chain(read_commission_records(site.db), site.pub)
    assert seqs(problems) == {2} and "unreadable" in problems[0].what


def test_a_copy_verifies_with_the_public_key_alone(site: Site, tmp_path: Path) -> None:
    (rec,) = site.file_records([body()])
    paths = cr.write_reports(rec, tmp_path / "out")
    assert [p.name for p in paths] == [
        f"demo-commissioning-0001.{s}" for s in ("md", "html", "json")
    ]
    copy = json.loads(paths[2].read_text(encoding="utf-8"))
    assert copy == rec
    assert cr.verify_record(copy, site.pub) == []
    assert cr.verify_record(copy, site.pub.upper()) == []  # hex in either case
    other = cr.public_key_hex(Ed25519PrivateKey.generate())
    problems = cr.verify_record(copy, other)
    assert len(problems) == 1 and "not with the site's key" in problems[0].what
    copy["outcome"] = "passed" if rec["outcome"] != "passed" else "failed"
    assert any("altered" in p.what for p in cr.verify_record(copy, site.pub))
    assert "expected 64 hex digits" in cr.verify_record(rec, "xyz")[0].what


def test_seal_refuses_a_bad_previous_record_and_bad_filing_fields(site: Site) -> None:
    with pytest.raises(cr.RecordError, match=r"newest stored record \(seq 1\) has hash None"):
        cr.seal(body(), {"seq": 1}, site.key, filed_wall=WALL, filed_by="x", controller={})
    unreadable = {"seq": 2, "unreadable": "not JSON"}  # as the journal shows a damaged row
    with pytest.raises(cr.RecordError, match="heatloop commission verify --site SITE"):
        cr.seal(body(), unreadable, site.key, filed_wall=WALL, filed_by="x", controller={})
    with pytest.raises(cr.RecordError, match="filed_wall"):
        cr.seal(body(), None, site.key, filed_wall=math.nan, filed_by="x", controller={})
    with pytest.raises(cr.RecordError, match="filed_by"):
        cr.seal(body(), None, site.key, filed_wall=WALL, filed_by=" ", controller={})
    with pytest.raises(cr.RecordError, match=r"controller\.version"):
        bad = {"version": math.inf}
        cr.seal(body(), None, site.key, filed_wall=WALL, filed_by="x", controller=bad)


# ---- the journal table ----


def test_the_journal_refuses_a_gap_or_a_fork_and_writes_nothing(site: Site) -> None:
    first, second = site.file_records([body(), body()])
    j = Journal(site.db)
    try:
        fork = cr.seal(body(), first, site.key, filed_wall=WALL, filed_by="x", controller={})
        with pytest.raises(ValueError, match=r"seq 2: expected seq 3") as err:
            j.add_commission_record(fork)  # sealed against an older record: a fork
        assert "\n" not in str(err.value)
        gap = cr.seal(
            body(), {**second, "seq": 3}, site.key, filed_wall=WALL, filed_by="x", controller={}
        )
        with pytest.raises(ValueError, match="seq 4: expected seq 3"):
            j.add_commission_record(gap)
        wrong_prev = {
            **cr.seal(body(), second, site.key, filed_wall=WALL, filed_by="x", controller={})
        }
        wrong_prev["prev_hash"] = first["hash"]
        with pytest.raises(ValueError, match=r"prev_hash .* expected the last record's hash"):
            j.add_commission_record(wrong_prev)
        with pytest.raises(ValueError, match="seq 'one'"):
            j.add_commission_record({"seq": "one"})
        assert [r["seq"] for r in j.commission_records()] == [1, 2]
    finally:
        j.close()


def test_read_commission_records_is_read_only_and_clear_about_bad_files(
    site: Site, tmp_path: Path
) -> None:
    with pytest.raises(StoreUnreadable, match="no state store there"):
        read_commission_records(tmp_path / "nowhere" / "heatloop.db")
    assert not (tmp_path / "nowhere").exists()  # nothing created
    text = tmp_path / "text.db"
    text.write_text("not a database\n" * 100)
    with pytest.raises(StoreUnreadable, match=r"text\.db"):
        read_commission_records(text)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE customers (name TEXT)")
    db.close()
    with pytest.raises(StoreUnreadable, match="not a heatloop state store"):
        read_commission_records(other)
    # while a controller holds the store open (and writes to it), and after it stopped
    keeper = JournalKeeper(site.db)
    site.file_records([body()])
    before = site.db.read_bytes()
    assert len(read_commission_records(site.db)) == 1
    keeper.close()
    assert len(read_commission_records(site.db)) == 1
    assert site.db.read_bytes() == before or Journal(site.db).version == SCHEMA_VERSION


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to read as another user",
)
def test_an_auditor_who_may_not_write_the_state_directory_reads_the_records() -> None:
    with tempfile.TemporaryDirectory() as d:  # pytest's own folder is closed to others
        Path(d).chmod(0o755)
        site = Site(Path(d))
        site.file_records([body(), body()])
        site.state.chmod(0o755)
        site.db.chmod(0o644)
        _read_as_nobody(site)


def _read_as_nobody(site: Site) -> None:
    for p in (site.db.with_name("heatloop.db-wal"), site.db.with_name("heatloop.db-shm")):
        assert not p.exists()  # no controller runs: the store is the file alone
    code = (
        "import sys; from pathlib import Path; "
        "from controller.journal import read_commission_records as r; "
        "print(len(r(Path(sys.argv[1]))))"
    )
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    run = subprocess.run(
        [*nobody, sys.executable, "-c", code, str(site.db)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (run.returncode, run.stdout.strip()) == (0, "2"), run.stderr
    assert sorted(p.name for p in site.state.iterdir() if p.name.startswith("heatloop.db")) == [
        "heatloop.db",
        "heatloop.db.lock",
    ]


def test_a_schema_2_store_migrates_and_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "heatloop.db"
    shutil.copyfile(V2, path)
    assert read_commission_records(path) == []  # before any migration: no table, no records
    j = open_checked(path)
    assert j.version == SCHEMA_VERSION == 4
    assert j.latched() == {"IL-05"}
    assert [k for _, k, _, _ in reversed(j.events())] == ["mode_changed", "trip_latched"]
    assert j.load_state() == {"operator": {"reject": True}}
    assert [c["cmd"] for c in j.commands()] == ["reject"]
    assert j.commission_records() == []
    j.close()
    new = Journal(tmp_path / "new.db")
    new.close()

    def schema(p: Path) -> dict[str, str]:
        db = sqlite3.connect(p)
        try:
            rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
            return {name: " ".join(sql.split()) for name, sql in rows}
        finally:
            db.close()

    assert schema(path) == schema(tmp_path / "new.db")
    assert "commissioning" in schema(path)


# ---- proof tests ----


def test_last_passed_counts_only_genuine_live_passes_by_a_plant_method(site: Site) -> None:
    records = site.file_records(
        [
            body(steps=[step("IL-04"), step("IL-05"), step("WD", "heartbeat_hold")]),
            body(target="sim", steps=[step("IL-04", "sim"), step("IL-06", "sim")]),
            body(steps=[step("IL-04", result="failed"), step("IL-07", "physical")]),
            body(steps=[step("IL-09")]),
        ]
    )
    walls = [r["filed_wall"] for r in records]
    got = cr.last_passed(read_commission_records(site.db))
    assert got == {
        "IL-04": walls[0],
        "IL-05": walls[0],
        "WD": walls[0],
        "IL-07": walls[2],
        "IL-09": walls[3],
    }
    # a tampered record (someone marks IL-08 passed) does not count
    rec = read_commission_records(site.db)[3]
    rec["steps"].append(step("IL-08", "physical"))
    site.sql("UPDATE commissioning SET record = ? WHERE seq = 4", json.dumps(rec))
    got = cr.last_passed(read_commission_records(site.db))
    assert "IL-08" not in got and "IL-09" not in got
    # a record signed by another key counts only without a pinned key
    forged = cr.seal(
        body(steps=[step("IL-03")]),
        records[-1],
        Ed25519PrivateKey.generate(),
        filed_wall=WALL + 9e5,
        filed_by="x",
        controller={},
    )
    assert "IL-03" in cr.last_passed([forged])
    assert cr.last_passed([forged], site.pub) == {}
    assert cr.last_passed([{"target": "live"}, "junk", {"steps": "x"}]) == {}  # type: ignore[list-item]


# ---- rendering ----


def test_reports_escape_what_people_typed(site: Site) -> None:
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    s = step("IL-04", result="failed", comment=evil, hazard=evil)
    s["effects"] = [
        {
            "output": evil,
            "expected": [0.0],
            "before": 100.0,
            "as_found": 50.0,
            "at_s": None,
            "level": None,
            "ok": False,
        }
    ]
    (rec,) = site.file_records(
        [
            body(
                target="sim",
                steps=[s, step("IL-05", result="failed")],
                outcome="failed",
                comments=evil,
                engineer=evil,
                site={"name": evil, "file": evil, "sha256": "c" * 64},
            )
        ]
    )
    page = cr.to_html(rec)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img" in page
    assert "http" not in page.replace("http-equiv", "")  # no external assets
    assert "@media print" in page and "<style>" in page
    assert "2 FAILED STEPS" in page and "FAILED</div>" in page
    assert "proves the procedure and the control logic, not the plant" in page
    assert "WARNING: the site file the tool read" in page  # c… is not the controller's a…
    md = cr.to_markdown(rec)
    assert re.search(r"(?<!\\)<", md) is None and "\\<script\\>" in md  # all escaped
    assert md.index("2 FAILED STEPS") < md.index("## Steps")
    assert f"--public-key {rec['public_key']}" in md
    bidi = cr.to_html({**rec, "comments": "ok \u202edeliaf\u202c \x1b[2J"})
    assert "\u202e" not in bidi and "\x1b" not in bidi and "ok ?deliaf? ?[2J" in bidi
    name = cr.report_name(rec)
    assert "/" not in name and "<" not in name and name.endswith("-commissioning-0001")


def test_a_passing_live_record_says_so_without_warnings(site: Site) -> None:
    (rec,) = site.file_records([body()])
    md, page = cr.to_markdown(rec), cr.to_html(rec)
    for text in (md, page):
        assert "PASSED" in text and "FAILED STEP" not in text
        assert "WARNING" not in text and "SIMULATED" not in text
        assert rec["hash"] in text and rec["prev_hash"] == ""
        assert "2026-09-21T" in text  # UTC ISO times
    assert json.loads(cr.to_json(rec)) == rec
    unfiled = cr.to_markdown(body())  # the tool's own copy when filing failed
    assert "NOT FILED: the controller did not seal this record" in unfiled
    assert "commission verify" not in unfiled


def test_an_effect_the_step_could_not_prove_says_so_in_every_report(site: Site) -> None:
    row = {"output": "reuse_valve_cmd", "expected": [0.0], "before": 0.0, "as_found": 0.0}
    unproven = {**row, "at_s": 0.0, "ok": True, "note": "not proven: already at this value"}
    late = {**row, "at_s": None, "ok": False}
    (rec,) = site.file_records([body(steps=[step("IL-04", effects=[unproven, late])])])
    for text in (cr.to_markdown(rec), cr.to_html(rec)):
        assert "ok; not proven: already at this value" in text
    assert cr.to_html(rec).count("<tr class='bad'>") == 1  # the late row only


# ---- the key ----


def test_the_key_is_private_and_loads_back_the_same(site: Site) -> None:
    pem, pub = cr.key_paths(site.state)
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pub.read_text().strip() == site.pub
    assert b"BEGIN PRIVATE KEY" in pem.read_bytes()  # PKCS8, unencrypted
    assert cr.public_key_hex(cr.load_or_create_key(site.state)) == site.pub
    pub.unlink()  # a lost .pub is derived again from its key: nothing is orphaned
    assert cr.public_key_hex(cr.load_or_create_key(site.state)) == site.pub
    assert pub.read_text().strip() == site.pub


def _garbage(pem: Path, pub: Path) -> None:
    pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")


def _ec_key(pem: Path, pub: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _other_pub(pem: Path, pub: Path) -> None:
    pub.write_text(cr.public_key_hex(Ed25519PrivateKey.generate()) + "\n")


def _key_gone(pem: Path, pub: Path) -> None:
    pem.unlink()


def _encrypted(pem: Path, pub: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


BROKEN: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "not a key": (_garbage, "commission_ed25519.pem", "not an unencrypted PEM private key"),
    "an EC key": (_ec_key, "commission_ed25519.pem", "expected an Ed25519 key"),
    "encrypted": (_encrypted, "commission_ed25519.pem", "not an unencrypted PEM"),
    "another .pub": (_other_pub, "commission_ed25519.pub", "put back the matching pair"),
    "key missing": (_key_gone, "commission_ed25519.pem", "missing, but its public key"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_key_is_refused_never_replaced(site: Site, case: str) -> None:
    make, file, what = BROKEN[case]
    pem, pub = cr.key_paths(site.state)
    make(pem, pub)
    before = {p.name: p.read_bytes() for p in site.state.iterdir() if p.is_file()}
    with pytest.raises(cr.RecordError) as err:
        cr.load_or_create_key(site.state)
    line = str(err.value)
    assert "\n" not in line and file in line and what in line
    assert "orphan the verification of every earlier record" in line
    assert {p.name: p.read_bytes() for p in site.state.iterdir() if p.is_file()} == before


# ---- the body ----


def _with(path: str, value: object) -> dict:
    b = body()
    target: Any = b
    keys = path.replace("]", "").replace("[", ".").split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return b


_DELETE = object()

BAD_BODIES: list[tuple[str, object, str]] = [
    ("format", "heatloop-commissioning/0", "record field format: 'heatloop-commissioning/0'"),
    ("engineer", _DELETE, "record field engineer: missing, expected non-empty text"),
    ("engineer", "  ", "record field engineer: '  ', expected non-empty text"),
    ("purpose", "fun", "record field purpose: 'fun', expected one of handover, proof test"),
    ("target", "lab", "record field target: 'lab', expected one of sim, live"),
    ("outcome", "fine", "record field outcome: 'fine', expected one of passed, failed"),
    ("steps[1].method", "magic", "record field steps[1].method: 'magic', expected one of sim"),
    ("steps[0].result", None, "record field steps[0].result: None, expected one of passed"),
    ("steps[0].id", 4, "record field steps[0].id: 4, expected non-empty text"),
    ("steps[0].response_s", math.nan, "record field steps[0].response_s: nan, expected a finite"),
    ("started_wall", True, "record field started_wall: True, expected a finite number"),
    ("steps[1].comment", "x" * 4001, "record field steps[1].comment: 4001 characters"),
    ("site.sha256", None, "record field site.sha256: None, expected text"),
    ("steps", {"a": 1}, "record field steps: {'a': 1}, expected a list of objects"),
    ("forces_used", ["IL-04"], "record field forces_used: ['IL-04'], expected a list of objects"),
    ("signoff", "yes", "record field signoff: 'yes', expected an object or null"),
    ("hash", "f" * 64, "record field hash: 'ffff"),
    ("seq", 7, "record field seq: 7, expected absent"),
    ("comments", b"bytes", "record field comments: b'bytes', expected a JSON value, not bytes"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_a_malformed_body_is_refused_naming_the_field(
    path: str, value: object, message: str
) -> None:
    with pytest.raises(cr.RecordError) as err:
        cr.check_body(_with(path, value))
    line = str(err.value)
    assert line.startswith(message), line
    assert "\n" not in line and len(line) < 300


def test_body_sizes_are_bounded() -> None:
    many = [step(f"S{i}") for i in range(cr.MAX_STEPS + 1)]
    with pytest.raises(cr.RecordError, match="steps: 201 steps, expected at most 200"):
        cr.check_body(body(steps=many))
    big = [step(f"S{i}", comment="x" * 3900, hazard="y" * 3900) for i in range(150)]
    with pytest.raises(
        cr.RecordError, match=r"record: \d+ bytes as JSON, expected at most 1048576"
    ):
        cr.check_body(body(steps=big))
    deep: Any = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(cr.RecordError, match="nested deeper"):
        cr.check_body(body(comments_extra=deep))
    with pytest.raises(cr.RecordError, match="record: list, expected a JSON object"):
        cr.check_body([])
    with pytest.raises(cr.RecordError, match="not storable as JSON text"):
        cr.check_body(body(comments="\ud800"))
    ok = body(steps=[step("IL-04", effects=({"output": "x", "expected": (0.0,)},))])
    assert cr.check_body(ok)["steps"][0]["effects"][0]["expected"] == [0.0]  # a JSON copy


# ---- heatloop commission verify ----


def _wired() -> bool:
    try:
        from controller import cli
    except ImportError:  # pragma: no cover
        return False
    return hasattr(cli, "cmd_commission")


def verify(
    site: str | None = None, record: str | None = None, public_key: str | None = None
) -> int:
    """`heatloop commission verify …` through the command line when it is wired, else the
    command's function with the arguments the parser gives it."""
    if _wired():
        from controller.cli import main

        argv = ["commission", "verify"]
        for flag, v in (("--site", site), ("--record", record), ("--public-key", public_key)):
            if v is not None:
                argv += [flag, v]
        return main(argv)
    return cr.cmd_verify(argparse.Namespace(site=site, record=record, public_key=public_key))


def test_verify_site_exit_codes(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(site=str(site.file)) == 1  # no store yet
    assert "no state store there" in capsys.readouterr().err
    JournalKeeper(site.db).close()
    assert verify(site=str(site.file)) == 0
    assert "no commissioning records" in capsys.readouterr().out
    records = site.file_records([body(), body(steps=[step("IL-01"), step("IL-09")]), body()])
    assert verify(site=str(site.file)) == 0
    out = capsys.readouterr().out.splitlines()
    filed = datetime.fromtimestamp(records[1]["filed_wall"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert out[1] == f"seq 2 {filed} passed IL-01…IL-09 live ok"
    assert out[-1].startswith("intact: 3 record(s)") and records[-1]["hash"] in out[-1]
    assert verify(site=str(site.file), public_key=site.pub) == 0
    capsys.readouterr()
    other = cr.public_key_hex(Ed25519PrivateKey.generate())
    assert verify(site=str(site.file), public_key=other) == 2  # the key on paper wins
    assert "not the --public-key given" in capsys.readouterr().out
    site.sql("DELETE FROM commissioning WHERE seq = 2")
    assert verify(site=str(site.file)) == 2
    out = capsys.readouterr().out
    assert "seq 3" in out and "PROBLEM" in out and out.splitlines()[-1].startswith("NOT INTACT")


def test_verify_names_a_reset_store_and_where_the_old_records_are(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.file_records([body()])
    kept = reset_state(site.db, "store damaged by a disk fault", "eve", now_wall=WALL)
    assert kept is not None
    assert verify(site=str(site.file)) == 0  # a new, empty chain is intact
    out = capsys.readouterr().out
    assert "note: this store was started anew 2026-09-21T" in out
    assert "by eve (store damaged by a disk fault)" in out and str(kept) in out
    assert len(read_commission_records(kept)) == 1  # the old record is kept, and readable


def test_verify_record_exit_codes(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (rec,) = site.file_records([body()])
    path = cr.write_reports(rec, tmp_path / "out")[2]
    assert verify(record=str(path), public_key=site.pub) == 0
    assert "genuine" in capsys.readouterr().out
    other = cr.public_key_hex(Ed25519PrivateKey.generate())
    assert verify(record=str(path), public_key=other) == 2
    assert "NOT GENUINE" in capsys.readouterr().out
    assert verify(record=str(path), public_key="12ab") == 2
    assert verify(record=str(path)) == 2  # no key
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{}")
    assert verify(record=str(bad), public_key=site.pub) == 2
    assert "not UTF-8" in capsys.readouterr().err
    bad.write_text("{ not json")
    assert verify(record=str(bad), public_key=site.pub) == 2
    err = capsys.readouterr().err
    assert "not JSON" in err and len(err.strip().splitlines()) == 1
    # a copy whose text would drive the terminal prints as one plain line per item
    evil = {**rec, "outcome": "passed\x1b[2J\nseq 9 ok", "target": "live\rok"}
    bad.write_text(json.dumps(evil))
    assert verify(record=str(bad), public_key=site.pub) == 2
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert out.splitlines()[0].startswith("seq 1 ") and "passed?[2J?seq 9 ok" in out
    bad.write_text("[1, 2]")
    assert verify(record=str(bad), public_key=site.pub) == 2
    assert verify(record=str(tmp_path / "missing.json"), public_key=site.pub) == 2


def test_key_files_are_only_made_on_first_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert not state.exists()
    key = cr.load_or_create_key(state)
    assert sorted(p.name for p in state.iterdir()) == [cr.KEY_FILE, cr.PUB_FILE]
    assert os.stat(state / cr.KEY_FILE).st_size > 0
    assert cr.public_key_hex(cr.load_or_create_key(state)) == cr.public_key_hex(key)


# ---- any content survives the trip through a pretty copy, and any change shows ----

_KEY = Ed25519PrivateKey.generate()
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # no lone surrogates
_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(comment=_text, before=_value, as_found=_value, at_s=_value, mutate=st.integers(0, 10**6))
def test_any_content_round_trips_through_a_pretty_copy_and_any_change_is_detected(
    comment: str, before: object, as_found: object, at_s: object, mutate: int
) -> None:
    effect = {"output": "reuse_valve_cmd", "before": before, "as_found": as_found, "at_s": at_s}
    s = step("IL-04", comment=comment, effects=[effect])
    rec = cr.seal(body(steps=[s]), None, _KEY, filed_wall=WALL, filed_by="x", controller={})
    key = cr.public_key_hex(_KEY)
    copy = json.loads(cr.to_json(rec))
    assert cr.verify_record(copy, key) == []
    # change one value the record holds (a different value of the same kind)
    field = ["comment", "before", "as_found", "at_s"][mutate % 4]
    target = copy["steps"][0] if field == "comment" else copy["steps"][0]["effects"][0]
    old = target[field]
    if isinstance(old, bool) or old is None:
        new: object = not old
    elif isinstance(old, int | float):
        new = old + 1 if abs(old) < 1e15 else old / 2
    else:
        new = old + "x"
    assume(new != old or type(new) is not type(old))
    target[field] = new
    assert any("altered" in p.what for p in cr.verify_record(copy, key))
