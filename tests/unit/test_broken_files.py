"""Broken site files, scenarios and state directories: exit 2 with one line each, never a traceback.

The corpus lives in tests/data/broken/. Every broken site file goes through `check`, `run`,
`study` and `sim serve`; `run` and `sim serve` must refuse it at start-up, before any socket is
opened (sockets are made to fail in these tests, so reaching one is a test failure).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import main
from controller.sitecheck import check_site, checked
from plc_io.site import SiteError, demo_site, demo_site_text, loads_site

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "data" / "broken"

# file -> a fragment of the one line that must explain it
SITES = {
    "site_bom.toml": "(file): a byte-order mark at the start; save as UTF-8 without BOM",
    "site_latin1.toml": "(file): expected UTF-8 text: byte 0xe0",
    "site_binary.toml": "(file): expected UTF-8 text",
    "site_deep_array.toml": "(file): not valid TOML: arrays or tables nested too deeply",
    "site_deep_inline_table.toml": "(file): not valid TOML: arrays or tables nested too deeply",
    "site_not_toml.toml": "(file): not valid TOML",
    "site_empty.toml": "site: None: expected this section",
    "site_no_cooling_safe_values.toml": "tags.primary_pump_a_cmd.safe: False: expected a value "
    "the arbitration guard would not override (no primary pump would run)",
    "site_reuse_valve_safe_open.toml": "tags.reuse_valve_cmd.safe: 100.0: expected 0 "
    "(DESIGN §7 safe state: all flow through the bypass)",
    "site_pump_speed_safe_low.toml": "tags.primary_pump_speed_cmd.safe: 10.0: expected a value "
    "the arbitration guard would not override (pump speed too low)",
    "site_stale_inf.toml": "plc.stale_after_s: inf: expected a finite number",
    "site_timeout_1e9.toml": "plc.timeout_s: 1000000000.0: expected a number ≤ 10",
    "site_port_true.toml": "plc.port: True: expected a whole number",
    "site_safe_yes.toml": "tags.secondary_pump_cmd.safe: 'yes': expected true/false or a number",
    "site_bool_range_0_2.toml": "tags.leak_reuse.range: [0.0, 2.0]: expected [0, 1]",
    "site_opcua_node_garbage.toml": "tags.it_supply_temp.opcua_node: 'PLC!it_supply_temp': "
    "expected a NodeId",
    "site_heartbeat_scaled.toml": "tags.heartbeat.modbus.scale: 0.5: expected 1",
    "site_opcua_nsu_space.toml": "tags.it_supply_temp.opcua_node: "
    "'nsu=urn:heatloop plc;s=it_supply_temp': expected a NodeId",
    "site_opcua_type_byte_heartbeat.toml": "tags.heartbeat.opcua_type: 'Byte': expected a type "
    "that holds range [0, 65535]; Byte holds 0…255",
    "site_leak_without_fail_state.toml": "tags.leak_reuse.fail_state: None: expected true",
    "site_timeout_above_watchdog.toml": "plc.timeout_s: 5.0: expected shorter than plc.watchdog_s",
    "site_tank_full_above_tank_high.toml": "control.tank_full_c: 90.0: expected below "
    "interlocks.tank_top_high_c (85)",
    "site_freeze_inverted.toml": "interlocks.freeze_ambient_c: 10.0: expected below "
    "interlocks.freeze_drycooler_out_c (5)",
    "site_huge_string.toml": "site.name: 'xxxx",
    "site_role_twice.toml": "roles.engineer.0: 'alice': expected a user in one role only "
    "(also in roles.operator)",
    "site_role_unknown.toml": "roles.admin: ['root']: expected a role name: viewer, operator, "
    "engineer",
    "site_role_bad_user.toml": "roles.viewer.0: '-rf /': expected a POSIX user name",
    "site_forceable_output.toml": "tags.reuse_valve_cmd.forceable: True: expected only on an input",
    "site_recorder_hours_0.toml": "recorder.hours: 0.0: expected a number ≥ 1",
    "site_bms_max_sessions_0.toml": "bms.max_sessions: 0: expected a number ≥ 1",
    "site_bms_anonymous_yes.toml": "bms.allow_anonymous: 'yes': expected true or false",
    "site_bms_sampling_5ms.toml": "bms.min_sampling_ms: 5: expected a number ≥ 10",
}
SCENARIOS = {
    "scenario_bom.toml": "a byte-order mark at the start; save as UTF-8 without BOM",
    "scenario_latin1.toml": "expected UTF-8 text",
    "scenario_deep.toml": "not valid TOML: arrays or tables nested too deeply",
    "scenario_bad_event.toml": "event[0]: at_s = inf: expected a finite number",
}


def commands(site: str) -> dict[str, list[str]]:
    return {
        "check": ["check", site],
        "run": ["run", "--site", site],
        "study": ["study", "--site", site, "--days", "0.001"],
        "sim serve": ["sim", "serve", "--site", site],
    }


class NoSocket(socket.socket):
    def __init__(self, *a: object, **kw: object) -> None:
        raise AssertionError("a socket was opened before the site file was refused")


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "socket", NoSocket)


def one_line_each(err: str, fragment: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert any(fragment in line for line in lines), err[:2000]
    assert all(len(line) < 400 for line in lines), "a problem line runs on"


def test_the_corpus_is_all_there() -> None:
    on_disk = {p.name for p in BROKEN.iterdir()}
    assert on_disk == set(SITES) | set(SCENARIOS)


@pytest.mark.parametrize("command", ["check", "run", "study", "sim serve"])
@pytest.mark.parametrize("name", sorted(SITES))
def test_broken_site_file_exits_2_with_one_line(
    name: str, command: str, no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(commands(str(BROKEN / name))[command]) == 2
    out, err = capsys.readouterr()
    one_line_each(err, f"{BROKEN / name}: {SITES[name]}")
    assert out == ""


@pytest.mark.parametrize("command", ["study", "sim serve"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_broken_scenario_exits_2_with_one_line(
    name: str,
    command: str,
    tmp_path: Path,
    no_sockets: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(demo_site_text(), encoding="utf-8")
    argv = [*commands(str(site))[command], "--scenario", str(BROKEN / name)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    one_line_each(err, f"{BROKEN / name}: ")
    one_line_each(err, SCENARIOS[name])
    assert len(err.splitlines()) == 1 and out == ""


def test_a_directory_given_as_site_file(
    tmp_path: Path, no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in commands(str(tmp_path)).values():
        assert main(argv) == 2
        one_line_each(capsys.readouterr().err, "expected a readable file, found a directory")


# ---- the state directory: checked by `run` at start-up, before connecting ----


def _site_with_state(tmp_path: Path, state: str) -> Path:
    path = tmp_path / "site.toml"
    text = demo_site_text().replace('dir = "state"', f"dir = {state!r}", 1)
    path.write_text(text, encoding="utf-8")
    return path


def test_run_refuses_a_state_path_that_is_a_file(
    tmp_path: Path, no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").write_text("not a directory")
    assert main(["run", "--site", str(_site_with_state(tmp_path, "state"))]) == 2
    one_line_each(capsys.readouterr().err, "expected a directory, found a file")


def test_run_refuses_a_state_dir_below_a_file(
    tmp_path: Path, no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["run", "--site", str(_site_with_state(tmp_path, "file/state"))]) == 2
    one_line_each(capsys.readouterr().err, "expected a writable directory")


def test_run_refuses_an_unwritable_state_dir(
    tmp_path: Path, no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:  # root writes through file modes: use a directory no one can write
        state = "/proc"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        state = str(tmp_path / "ro")
    assert main(["run", "--site", str(_site_with_state(tmp_path, state))]) == 2
    one_line_each(capsys.readouterr().err, "expected a writable directory")


# ---- `heatloop check SITE | head`: a closed pipe ends quietly ----


def test_check_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(demo_site_text(), encoding="utf-8")
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "controller.cli", "check", str(site)],
            stdout=w,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert proc.stderr.decode() == ""
    assert proc.returncode == 0


# ---- safe values that would leave the servers without cooling ----


def test_demo_safe_values_pass_the_guard_and_the_contract() -> None:
    assert check_site(demo_site()) == []


def test_no_cooling_safe_values_are_refused_naming_tag_and_rule() -> None:
    text = (BROKEN / "site_no_cooling_safe_values.toml").read_text(encoding="utf-8")
    site = loads_site(text)  # the file is well-formed: only the controller's rules refuse it
    lines = [str(p) for p in check_site(site)]
    assert lines == [
        "tags.primary_pump_a_cmd.safe: False: expected a value the arbitration guard would not "
        "override (no primary pump would run)",
        "tags.primary_pump_b_cmd.safe: False: expected a value the arbitration guard would not "
        "override (no primary pump would run)",
        "tags.drycooler_fan_cmd.safe: 0.0: expected a value the arbitration guard would not "
        "override (no heat sink would remain)",
    ]
    with pytest.raises(SiteError):
        checked(site, "site.toml")


@pytest.mark.parametrize(
    ("tag", "value", "fragment"),
    [
        ("secondary_pump_cmd", True, "expected false (DESIGN §7 safe state: secondary pump off)"),
        ("customer_isolation_cmd", True, "expected false (DESIGN §7 safe state: customer"),
        ("reuse_isolation_cmd", True, "expected false (DESIGN §7 safe state: reuse"),
        ("drycooler_fan_cmd", 60.0, "expected 100 (DESIGN §7 safe state: dry cooler fans"),
        ("primary_pump_b_cmd", False, "expected true (DESIGN §7 safe state: primary pumps"),
    ],
)
def test_every_safe_value_of_the_contract_is_checked(
    tag: str, value: object, fragment: str
) -> None:
    site = demo_site()
    tags = tuple(t.model_copy(update={"safe": value}) if t.name == tag else t for t in site.tags)
    lines = [str(p) for p in check_site(site.model_copy(update={"tags": tags}))]
    assert len(lines) == 1 and lines[0].startswith(f"tags.{tag}.safe: ") and fragment in lines[0]


def test_the_demo_command_checks_its_embedded_site(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import controller.cli as cli

    bad = loads_site((BROKEN / "site_reuse_valve_safe_open.toml").read_text(encoding="utf-8"))
    monkeypatch.setattr(cli, "demo_site", lambda: bad)
    monkeypatch.setattr(socket, "socket", NoSocket)
    assert main(["demo", "--minutes", "0.01"]) == 2
    one_line_each(capsys.readouterr().err, "tags.reuse_valve_cmd.safe: 100.0: expected 0")


# ---- architecture: `heatloop run` never loads the plant model ----


def test_the_cli_does_not_import_the_plant_model() -> None:
    code = (
        "import controller.cli, sys; "
        "loaded = [m for m in sys.modules if m == 'sim' or m.startswith('sim.')]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize(
    "argv",
    [
        ["--step", "0"],
        ["--step", "nan"],
        ["--days", "inf"],
        ["--days", "-1"],
        ["--seed", "-3"],
    ],
)
def test_study_options_out_of_bounds_are_usage_errors(
    argv: list[str], no_sockets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    site = str(ROOT / "plc_io" / "demo_site.toml")
    assert main(["study", "--site", site, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {argv[0]}: {argv[1]!r}: expected" in err


def test_init_into_a_directory_or_an_unwritable_place_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path), "--force"]) == 2
    one_line_each(capsys.readouterr().err, "expected a file path, found a directory")
    (tmp_path / "file").write_text("x")
    assert main(["init", str(tmp_path / "file" / "site.toml")]) == 2
    one_line_each(capsys.readouterr().err, "cannot write the site file")
