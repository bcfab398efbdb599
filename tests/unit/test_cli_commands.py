"""The operator CLI against a real command channel: what each subcommand sends, its exit codes
(0 accepted or read, 2 refused or malformed, 1 no controller) and the pages a person reads.

The controller is a stub behind a real `ChannelServer` on a Unix socket in the site's state
directory, served from a thread so the CLI runs exactly as from a shell.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.authority import Answer, Request
from controller.channel import ChannelServer, socket_path
from controller.cli import journal_lines, main, parse_when, status_lines
from plc_io.site import demo_site_text

WAIT_S = 20.0


class Fake:
    """The controller's side of the channel."""

    def __init__(self, site: Path) -> None:
        self.site = str(site)
        self.requests: list[Request] = []
        self.reads: list[tuple[str, dict[str, Any]]] = []
        self.why = ""  # non-empty: refuse every command with this
        self.data: dict[str, Any] = {}

    async def submit(self, req: Request) -> Answer:
        self.requests.append(req)
        if self.why:
            return Answer(req.id, False, self.why)
        return Answer(req.id, True, "", old=False, new=True)

    async def read(self, cmd: str, args: Mapping[str, object]) -> dict[str, Any]:
        self.reads.append((cmd, dict(args)))
        return self.data

    @property
    def last(self) -> tuple[str, dict[str, object], str]:
        r = self.requests[-1]
        return r.cmd, dict(r.args), r.reason


class Quiet:
    """A logger that keeps the channel's refusal lines out of the CLI's captured output."""

    def warning(self, event: str, **fields: Any) -> None:
        pass


def _site(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(demo_site_text(), encoding="utf-8")
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    site = _site(tmp_path)
    f = Fake(site)
    loop = asyncio.new_event_loop()
    srv = ChannelServer(
        socket_path(tmp_path / "state"),
        {getpass.getuser(): "engineer"},
        f.submit,
        f.read,
        log=Quiet(),
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(WAIT_S)
    try:
        yield f
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def run(fake: Fake, *argv: str) -> int:
    cmd, *rest = argv
    return main([cmd, "--site", fake.site, *rest])


# ---- what each subcommand sends ----


@pytest.mark.parametrize(
    ("argv", "sent"),
    [
        (["reset", "--reason", "dry"], ("reset", {"rules": []}, "dry")),
        (
            ["reset", "IL-04", "IL-06", "--reason", "dry"],
            ("reset", {"rules": ["IL-04", "IL-06"]}, "dry"),
        ),
        (["ack", "IL-04", "PLC-LINK"], ("ack", {"alarms": ["IL-04", "PLC-LINK"]}, "")),
        (["ack", "--all"], ("ack", {"all": True}, "")),
        (
            ["bypass", "IL-06", "--minutes", "30", "--reason", "sensor swap"],
            ("bypass", {"rule": "IL-06", "minutes": 30.0}, "sensor swap"),
        ),
        (["bypass", "IL-06", "--end"], ("bypass", {"rule": "IL-06", "end": True}, "")),
        (
            ["force", "leak_reuse", "off", "--minutes", "5", "--reason", "r"],
            ("force", {"tag": "leak_reuse", "value": False, "minutes": 5.0}, "r"),
        ),
        (
            ["force", "primary_pump_b_cmd", "1", "--minutes", "5", "--reason", "r"],
            ("force", {"tag": "primary_pump_b_cmd", "value": True, "minutes": 5.0}, "r"),
        ),
        (
            ["force", "customer_ready", "TRUE", "--minutes", "1.5", "--reason", "r"],
            ("force", {"tag": "customer_ready", "value": True, "minutes": 1.5}, "r"),
        ),
        (
            ["force", "reuse_valve_cmd", "40", "--minutes", "5", "--reason", "r"],
            ("force", {"tag": "reuse_valve_cmd", "value": 40.0, "minutes": 5.0}, "r"),
        ),
        (
            ["force", "reuse_valve_cmd", "--release"],
            ("force", {"tag": "reuse_valve_cmd", "release": True}, ""),
        ),
        (
            ["maintenance", "on", "--reason", "pump swap"],
            ("maintenance", {"on": True}, "pump swap"),
        ),
        (["maintenance", "off", "--reason", "done"], ("maintenance", {"on": False}, "done")),
        (
            ["reject", "on", "--reason", "customer asked"],
            ("reject", {"on": True}, "customer asked"),
        ),
        (
            ["setpoint", "supply_setpoint_c", "31.5"],
            ("setpoint", {"name": "supply_setpoint_c", "value": 31.5}, ""),
        ),
        (
            ["shelve", "HUNTING", "--minutes", "60", "--reason", "tuning"],
            ("shelve", {"alarm": "HUNTING", "minutes": 60.0}, "tuning"),
        ),
        (["shelve", "HUNTING", "--end"], ("shelve", {"alarm": "HUNTING", "end": True}, "")),
    ],
)
def test_each_command_sends_its_request_and_exits_0(
    fake: Fake, argv: list[str], sent: tuple[str, dict[str, object], str], capsys
) -> None:
    assert run(fake, *argv) == 0
    assert fake.last == sent
    (req,) = fake.requests
    assert (req.principal, req.role, req.via) == (getpass.getuser(), "engineer", "cli")
    out = capsys.readouterr().out
    assert out == f"{sent[0]}: accepted: false → true\n"


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["reset", "IL-04"], "--reason"),  # a reset says why
        (["reset", "--reason", ""], "expected a reason of 1 to 500 characters"),
        (["reset", "--reason", "x" * 501], "expected a reason of 1 to 500 characters"),
        (["ack"], "expected alarm ids or --all"),
        (["ack", "IL-04", "--all"], "expected alarm ids or --all"),
        (["bypass", "IL-06"], "expected --minutes N --reason TEXT (or --end)"),
        (["bypass", "IL-06", "--minutes", "30"], "expected --minutes N --reason TEXT"),
        (["bypass", "IL-06", "--minutes", "30", "--end"], "expected --minutes or --end"),
        (["bypass", "IL-06", "--minutes", "0", "--reason", "r"], "expected a number > 0"),
        (["bypass", "IL-06", "--minutes", "nan", "--reason", "r"], "expected a number > 0"),
        (["bypass", "IL-06", "--minutes", "-5", "--reason", "r"], "expected a number > 0"),
        (
            ["force", "leak_reuse", "maybe", "--minutes", "5", "--reason", "r"],
            "expected true/false, on/off or 1/0",
        ),
        (
            ["force", "reuse_valve_cmd", "inf", "--minutes", "5", "--reason", "r"],
            "expected a finite number in %",
        ),
        (
            ["force", "reuse_valve_cmd", "half", "--minutes", "5", "--reason", "r"],
            "expected a finite number",
        ),
        (
            ["force", "no_such_tag", "1", "--minutes", "5", "--reason", "r"],
            "tag 'no_such_tag': expected a tag of this site",
        ),
        (["force", "reuse_valve_cmd", "40"], "expected TAG VALUE --minutes N --reason TEXT"),
        (["force", "reuse_valve_cmd", "40", "--release"], "expected no VALUE and no --minutes"),
        (["maintenance", "maybe", "--reason", "r"], "invalid choice"),
        (["maintenance", "on"], "--reason"),
        (["reject", "on"], "--reason"),
        (["setpoint", "supply_setpoint_c", "nan"], "expected a finite number"),
        (["setpoint", "supply_setpoint_c"], "value"),
        (["shelve", "HUNTING", "--minutes", "60"], "expected --minutes N --reason TEXT"),
        (["journal", "--since", "yesterday"], "--since 'yesterday': expected ISO 8601"),
        (["journal", "--limit", "0"], "expected a whole number 1 … 10000"),
    ],
)
def test_malformed_requests_exit_2_with_one_line_and_send_nothing(
    fake: Fake, argv: list[str], why: str, capsys
) -> None:
    assert run(fake, *argv) == 2
    err = capsys.readouterr().err
    assert why in err, err
    assert fake.requests == [] and fake.reads == []
    if not err.startswith("usage:"):  # argparse prints its usage first; ours is one line
        assert len(err.strip().splitlines()) == 1


def test_refused_by_the_controller_exits_2_with_what_and_why(fake: Fake, capsys) -> None:
    fake.why = "reset IL-04: refused: leak_reuse reads wet (the cause still holds)"
    assert run(fake, "reset", "IL-04", "--reason", "dry now") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"heatloop: refused: reset: {fake.why}\n"


def test_a_user_without_a_role_is_refused_exit_2(tmp_path: Path, capsys) -> None:
    """A real connection from this OS user to a controller whose site lists someone else."""
    site = _site(tmp_path)
    f = Fake(site)

    async def scenario() -> int:
        srv = ChannelServer(
            socket_path(tmp_path / "state"),
            {"nobody-here": "engineer"},
            f.submit,
            f.read,
            log=Quiet(),
        )
        await srv.start()
        try:
            return await asyncio.to_thread(main, ["reset", "--site", str(site), "--reason", "dry"])
        finally:
            await srv.close()

    assert asyncio.run(scenario()) == 2
    err = capsys.readouterr().err
    assert err.startswith("heatloop: refused: reset: user ")
    assert f"{getpass.getuser()!r}" in err and "has no role in this site's [roles]" in err
    assert f.requests == []


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["alarms"],
        ["journal"],
        ["reset", "--reason", "r"],
        ["ack", "--all"],
        ["force", "reuse_valve_cmd", "--release"],
        ["setpoint", "supply_setpoint_c", "30"],
    ],
)
def test_no_controller_exits_1_with_one_line(tmp_path: Path, argv: list[str], capsys) -> None:
    site = _site(tmp_path)
    cmd, *rest = argv
    assert main([cmd, "--site", str(site), *rest]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"heatloop: no controller: {tmp_path / 'state' / 'heatloop.sock'} does not exist "
        "(is `heatloop run` going for this site?)\n"
    )


def test_a_broken_site_file_exits_2_before_any_connection(tmp_path: Path, capsys) -> None:
    site = tmp_path / "site.toml"
    site.write_text(demo_site_text().replace("port = 5020", "port = true", 1), encoding="utf-8")
    assert main(["status", "--site", str(site)]) == 2
    assert "plc.port: True: expected a whole number" in capsys.readouterr().err


# ---- reads and the pages a person reads ----

NOW = 1_764_590_400.0  # 2025-12-01 12:00:00 UTC

STATUS: dict[str, Any] = {
    "site": "demo-edge-pool",
    "wall": NOW,
    "mode": "DRY_COOLER_REJECT",
    "mode_since_wall": NOW - 5400.0,
    "reject_reasons": ["leak_reuse reads wet (IL-04 latched)"],
    "interlocks": {
        "active": ["IL-04"],
        "latched": ["IL-04", "IL-05"],
        "bypassed": [
            {"rule": "IL-06", "until_wall": NOW + 1800, "who": "alice", "reason": "swap sensor"}
        ],
    },
    "alarms": [
        {
            "id": "IL-04",
            "priority": "critical",
            "state": "unacknowledged",
            "message": "Leak in the reuse zone",
            "detail": "leak_reuse wet",
            "since_wall": NOW - 600,
            "first_out": True,
            "shelved_until": None,
            "chatter_count": 0,
        },
        {
            "id": "IL-05",
            "priority": "high",
            "state": "acknowledged",
            "message": "Secondary pressure high",
            "detail": "",
            "since_wall": NOW - 590,
            "first_out": False,
            "shelved_until": None,
            "chatter_count": 3,
        },
    ],
    "outputs": {
        "reuse_valve_cmd": {"value": 0.0, "level": "interlock", "why": "IL-04: leak in reuse zone"},
        "primary_pump_a_cmd": {"value": True, "level": "mode", "why": "duty pump"},
    },
    "invalid": {"tank_top_temp": "stale: 12 s old"},
    "forces": [
        {
            "tag": "leak_primary",
            "value": False,
            "until_wall": NOW + 300,
            "who": "alice",
            "reason": "commissioning",
            "input": True,
        }
    ],
    "maintenance": False,
    "reject_requested": True,
    "setpoints": {"supply_setpoint_c": 33.0},
    "link": {"state": "ok", "last_error": "", "requests": 12345, "failures": 2},
    "scan": {"count": 99, "overruns": 1, "last_ms": 1.25, "period_s": 0.25},
    "degraded": [],
    "bms": {
        "state": "restarting",
        "pid": None,
        "restarts": 2,
        "last_error": "exited with code 1",
        "endpoint": "opc.tcp://0.0.0.0:4840/heatloop",
        "dropped": 0,
    },
}


def test_the_status_page_shows_what_an_operator_needs() -> None:
    page = "\n".join(status_lines(STATUS))
    assert "mode DRY_COOLER_REJECT since 2025-12-01 10:30:00Z (1 h 30 min)" in page
    assert "not reusing heat: leak_reuse reads wet (IL-04 latched)" in page
    assert "active:   IL-04" in page and "latched:  IL-04, IL-05" in page
    assert (
        "bypassed: IL-06 until 2025-12-01 12:30:00Z (in 30 min 0 s) by alice: swap sensor" in page
    )
    lines = page.splitlines()
    (first,) = [ln for ln in lines if "Leak in the reuse zone" in ln]
    assert first.lstrip().startswith("*") and "critical" in first and "unacknowledged" in first
    (second,) = [ln for ln in lines if "Secondary pressure high" in ln]
    assert not second.lstrip().startswith("*") and "chattering ×3" in second
    (valve,) = [ln for ln in lines if ln.strip().startswith("reuse_valve_cmd")]
    assert valve.split()[1:3] == ["0", "interlock"] and "IL-04: leak in reuse zone" in valve
    (pump,) = [ln for ln in lines if ln.strip().startswith("primary_pump_a_cmd")]
    assert pump.split()[1:3] == ["true", "mode"]
    assert any("tank_top_temp" in ln and "stale: 12 s old" in ln for ln in lines)
    assert "leak_primary = false (input) until 2025-12-01 12:05:00Z" in page
    assert "reject requested" in page and "supply_setpoint_c = 33" in page
    assert "link  ok   requests 12345   failures 2" in page
    assert "scan  99 scans   overruns 1   last 1.25 ms   period 0.25 s" in page
    assert (
        "bms   restarting   opc.tcp://0.0.0.0:4840/heatloop   restarts 2   dropped 0   "
        "last error: exited with code 1" in page
    )


def test_the_status_page_shows_a_held_heartbeat_and_overdue_proof_tests() -> None:
    now = STATUS["wall"]
    st = {
        **STATUS,
        "heartbeat_hold_until_wall": now + 8.0,
        "proof_tests": {
            "IL-04": {"overdue": True, "due_wall": now - 86400.0, "last_passed_wall": None},
            "WD": {"overdue": False, "due_wall": now + 3600.0, "last_passed_wall": now},
        },
    }
    page = "\n".join(status_lines(st))
    assert "HEARTBEAT HELD (watchdog proof test) until" in page
    assert "proof tests: OVERDUE IL-04; next due 2025-11-30" in page
    page = "\n".join(status_lines({**st, "proof_tests": {"WD": st["proof_tests"]["WD"]}}))
    assert "proof tests: none overdue; next due" in page


def test_the_status_page_shows_the_meter_and_an_interruption_in_progress() -> None:
    now = STATUS["wall"]
    meter = {
        "today": {"delivered_kwh": 12.34},
        "totals": {"delivered_kwh": 5678.9},
        "availability_today_pct": 87.5,
        "availability_pct": None,  # no time yet the customer wanted heat
        "open_interruption": {"start_wall": now - 60.0, "cls": "trip", "detail": "IL-04 latched"},
    }
    page = "\n".join(status_lines({**STATUS, "meter": meter}))
    assert (
        "meter: billed today 12.3 kWh, since the store was created 5678.9 kWh; availability "
        "today 87.50 %, since created n/a" in page
    )
    assert "interrupted since " in page and ": trip (IL-04 latched)" in page
    odd = "\n".join(status_lines({**STATUS, "meter": {"today": "x", "availability_pct": True}}))
    assert "billed today ?" in odd and "since created n/a" in odd


def test_the_status_page_survives_an_empty_or_odd_status() -> None:
    assert status_lines({})[0].startswith("site ?")
    odd = {"mode": 5, "alarms": "x", "outputs": [1], "interlocks": None, "wall": float("nan")}
    assert any("mode 5" in ln for ln in status_lines(odd))


def test_status_over_the_channel_and_json_parses(fake: Fake, capsys) -> None:
    fake.data = STATUS
    assert run(fake, "status") == 0
    out = capsys.readouterr().out
    assert "mode DRY_COOLER_REJECT" in out and "latched:  IL-04, IL-05" in out
    assert run(fake, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == STATUS
    assert fake.reads == [("status", {}), ("status", {})] and fake.requests == []


def test_status_watch_redraws_until_ctrl_c(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    fake.data = STATUS
    naps = []

    def sleep(s: float) -> None:
        naps.append(s)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    assert run(fake, "status", "--watch") == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[H\x1b[2J") == 2 and out.count("mode DRY_COOLER_REJECT") == 2
    assert naps == [1.0, 1.0]


def test_alarms_lists_the_standing_alarms(fake: Fake, capsys) -> None:
    fake.data = {"alarms": STATUS["alarms"]}
    assert run(fake, "alarms") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["priority", "state", "alarm", "since", "message"]
    assert out[1].lstrip().startswith("*") and "IL-04" in out[1]
    fake.data = {"alarms": []}
    assert run(fake, "alarms") == 0
    assert capsys.readouterr().out == "no standing alarms\n"


def test_journal_asks_for_the_window_and_prints_lines_oldest_first(fake: Fake, capsys) -> None:
    fake.data = {
        "events": [
            {"wall": NOW + 10, "kind": "trip", "source": "IL-04", "detail": {"tag": "leak_reuse"}},
            {"wall": NOW, "kind": "mode", "source": "supervisor", "detail": "HEAT_REUSE"},
        ],
        "commands": [
            {
                "wall_time": NOW + 20,
                "request_id": "r1",
                "principal": "alice",
                "role": "engineer",
                "via": "cli",
                "cmd": "reset",
                "target": "IL-04",
                "old": None,
                "new": None,
                "reason": "dry",
                "accepted": False,
                "why": "leak_reuse reads wet",
            }
        ],
    }
    before = time.time()
    assert run(fake, "journal", "--since", "-1h", "--kind", "trip", "mode", "--limit", "5") == 0
    after = time.time()
    ((cmd, args),) = fake.reads
    assert cmd == "journal" and args["kinds"] == ["trip", "mode"] and args["limit"] == 5
    assert before - 3600 <= args["since_wall"] <= after - 3600
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "2025-12-01 12:00:00Z  mode  supervisor  HEAT_REUSE",
        "2025-12-01 12:00:10Z  trip  IL-04  tag=leak_reuse",
        "2025-12-01 12:00:20Z  command reset IL-04 by alice [engineer, cli] (dry): "
        "refused: leak_reuse reads wet",
    ]


def test_journal_defaults_and_empty_window(fake: Fake, capsys) -> None:
    fake.data = {"events": [], "commands": []}
    assert run(fake, "journal") == 0
    assert fake.reads == [("journal", {"since_wall": None, "kinds": None, "limit": 100})]
    assert capsys.readouterr().out == "nothing journalled in that window\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-30s", NOW - 30),
        ("-15m", NOW - 900),
        ("-1h", NOW - 3600),
        ("-2d", NOW - 172800),
        ("-1.5h", NOW - 5400),
        ("2025-12-01T11:00", NOW - 3600),
        ("2025-12-01 11:00:00Z", NOW - 3600),
        ("2025-12-01T12:00:00+01:00", NOW - 3600),
    ],
)
def test_since_is_iso_8601_or_relative(text: str, expected: float) -> None:
    assert parse_when(text, NOW) == expected
    assert datetime.fromtimestamp(NOW, UTC).hour == 12


def test_journal_lines_tolerate_odd_rows() -> None:
    assert journal_lines({"events": [None, {"wall": "x"}], "commands": "no"}) == ["-", "-"]


# ---- the two commands other modules carry out ----


def test_replay_calls_the_recorder_with_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    fake_replay = types.ModuleType("controller.replay")

    def run_replay_cli(site: object, from_text: str, to_text: str, export: str | None) -> int:
        calls.append((site.site.name, from_text, to_text, export))  # type: ignore[attr-defined]
        return 0

    fake_replay.run_replay_cli = run_replay_cli  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "controller.replay", fake_replay)
    site = _site(tmp_path)
    argv = ["replay", "--site", str(site), "--from", "-1h", "--to", "-5m", "--export", "x.csv"]
    assert main(argv) == 0
    assert calls == [("demo-edge-pool", "-1h", "-5m", "x.csv")]
    assert main(["replay", "--site", str(site), "--from", "-1h"]) == 2  # --to is required


def test_run_reset_state_needs_a_reason_and_journals_the_os_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import controller.journal
    import controller.runtime

    site = _site(tmp_path)
    assert main(["run", "--site", str(site), "--reset-state"]) == 2
    assert "--reset-state: expected --reason TEXT" in capsys.readouterr().err
    assert main(["run", "--site", str(site), "--reason", "x"]) == 2
    assert "--reason: expected only with --reset-state" in capsys.readouterr().err

    calls = []

    def reset_state(path: Path, reason: str, who: str) -> Path:
        calls.append((path, reason, who))
        return path.with_name("heatloop.db.20251201T120000Z.bad")

    def make_transport(site: object) -> object:
        raise ValueError("stop before connecting")

    monkeypatch.setattr(controller.journal, "reset_state", reset_state)
    monkeypatch.setattr(controller.runtime, "make_transport", make_transport)
    argv = ["run", "--site", str(site), "--reset-state", "--reason", "disk replaced"]
    assert main(argv) == 2  # stopped by the fake transport, after the reset
    assert calls == [(tmp_path / "state" / "heatloop.db", "disk replaced", getpass.getuser())]
    assert "saved state moved to" in capsys.readouterr().out


# ---- another OS user, for real (root can become `nobody` with setpriv) ----

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the CLI as another OS user",
)
async def test_the_cli_run_as_another_os_user_is_refused() -> None:
    """`nobody` runs the CLI: first the socket's mode keeps it out, then (let into the socket's
    group) the controller sees uid 65534 from the kernel and refuses it by role."""
    import pwd

    user = pwd.getpwuid(NOBODY).pw_name
    folder = Path(tempfile.mkdtemp(prefix="heatloop-cli-"))  # /tmp/pytest-of-root is 0700
    try:
        folder.chmod(0o755)
        site = _site(folder)
        site.chmod(0o644)
        f = Fake(site)
        srv = ChannelServer(socket_path(folder / "state"), {"root": "engineer"}, f.submit,
                            f.read, log=Quiet())  # fmt: skip
        await srv.start()
        (folder / "state").chmod(0o755)

        async def as_nobody(*argv: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                sys.executable, "-m", "controller.cli", *argv,
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _out, err = await asyncio.wait_for(proc.communicate(), WAIT_S * 3)
            assert proc.returncode is not None
            return proc.returncode, err.decode()

        try:
            code, err = await as_nobody("reset", "--site", str(site), "--reason", "dry")
            assert code == 2
            assert err == (
                f"heatloop: refused: reset: permission denied on {srv.path}: expected a user "
                "in the controller's group\n"
            )
            os.chown(srv.path, -1, NOBODY)  # nobody's group may now open the socket
            code, err = await as_nobody("reset", "--site", str(site), "--reason", "dry")
            assert code == 2
            assert err == (
                f"heatloop: refused: reset: user {user!r} (uid {NOBODY}) has no role in this "
                "site's [roles]\n"
            )
            assert f.requests == []
        finally:
            await srv.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_run_on_a_state_directory_another_controller_serves_exits_2(fake: Fake, capsys) -> None:
    """The channel is bound before the PLC is touched: a second controller stops at once."""
    assert main(["run", "--site", fake.site]) == 2
    err = capsys.readouterr().err
    assert "another controller holds this socket" in err
    assert len(err.strip().splitlines()) == 1
    assert run(fake, "status") == 0  # the first one is untouched
