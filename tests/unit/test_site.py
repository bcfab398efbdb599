"""The site file: the demo validates, and every kind of mistake is named with field, value, need."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controller.cli import main
from plc_io.site import SiteError, demo_site, demo_site_text, loads_site
from plc_io.tags import REQUIRED_INPUTS, REQUIRED_OUTPUTS


def problems(text: str) -> list[str]:
    with pytest.raises(SiteError) as e:
        loads_site(text)
    return [str(p) for p in e.value.problems]


def edit(pattern: str, repl: str) -> str:
    text, n = re.subn(pattern, repl, demo_site_text(), count=1, flags=re.M)
    assert n == 1, pattern
    return text


def test_demo_site_has_every_contract_tag_with_safe_values_on_outputs() -> None:
    site = demo_site()
    names = {t.name for t in site.tags}
    assert set(REQUIRED_INPUTS) | set(REQUIRED_OUTPUTS) <= names
    assert set(site.safe_outputs()) == {t.name for t in site.outputs}
    safe = site.safe_outputs()
    # DESIGN §7: bypass, fans full, primary pumps running, secondary off, isolations closed
    assert safe["reuse_valve_cmd"] == 0 and safe["drycooler_fan_cmd"] == 100
    assert safe["primary_pump_a_cmd"] is True and safe["secondary_pump_cmd"] is False
    assert safe["customer_isolation_cmd"] is False and safe["reuse_isolation_cmd"] is False


def test_contract_keys_as_design_states() -> None:
    site = demo_site()
    assert (site.plc.transport, site.plc.host, site.plc.port) == ("modbus", "127.0.0.1", 5020)
    assert (site.plc.unit_id, site.plc.watchdog_s) == (1, 3.0)
    assert site.sim.opcua_port == 4841
    assert (site.bms.host, site.bms.port) == ("0.0.0.0", 4840)


def test_state_dir_resolves_against_the_site_folder(tmp_path: Path) -> None:
    assert demo_site(tmp_path).state_dir == tmp_path / "state"


def test_site_is_frozen() -> None:
    site = demo_site()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        site.plc.port = 1  # type: ignore[misc]


def test_unknown_key_names_the_path() -> None:
    probs = problems(edit(r"^\[plc\]$", "[plc]\nwatchdog = 3"))
    assert probs == ["plc.watchdog: 3: expected no such key (unknown key)"]


def test_unknown_section() -> None:
    assert any(p.startswith("plcc:") for p in problems(demo_site_text() + "\n[plcc]\nx = 1\n"))


def test_inverted_range() -> None:
    probs = problems(edit(r"^range = \[-20.0, 120.0\]", "range = [120.0, -20.0]"))
    assert "tags.it_supply_temp.range: [120.0, -20.0]: expected low < high" in probs


def test_unknown_unit() -> None:
    probs = problems(edit(r'^unit = "°C"', 'unit = "degF"'))
    assert probs[0].startswith("tags.it_supply_temp.unit: 'degF': expected one of")


def test_overlapping_modbus_addresses_name_both_tags() -> None:
    # it_power is float32 at input 20..21; moving heat_meter_power to 21 overlaps it
    probs = problems(
        edit(r"address = 22, encoding = \"float32\"", 'address = 21, encoding = "float32"')
    )
    assert probs == [
        "tags.heat_meter_power.modbus.address: 21: expected an address not used by "
        "tags.it_power (input 21 overlaps)"
    ]


def test_duplicate_tag_is_refused() -> None:
    text = demo_site_text() + '\n[tags.it_supply_temp]\ndirection = "input"\n'
    probs = problems(text)
    assert len(probs) == 1 and "it_supply_temp" in probs[0] and "twice" in probs[0]


def test_missing_safe_value_on_output() -> None:
    probs = problems(edit(r"^safe = 0.0\n", ""))
    assert "tags.reuse_valve_cmd.safe: None: expected a safe value for every output" in probs


def test_missing_required_tag() -> None:
    text = re.sub(r"\[tags.leak_reuse\].*?\n\n", "", demo_site_text(), flags=re.S)
    assert "tags.leak_reuse: None: expected the required input tag" in problems(text)


def test_scale_that_cannot_hold_the_range() -> None:
    probs = problems(edit(r"scale = 0.01 \}", "scale = 0.001 }"))
    assert probs[0].startswith("tags.it_supply_temp.modbus.scale: 0.001: expected a scale")


def test_every_problem_is_reported_at_once() -> None:
    text = edit(r"^port = 5020 ", "port = 70000 ")
    text = text.replace('unit = "°C"', 'unit = "K"', 1).replace("[site]", "[site]\nowner = 1")
    probs = problems(text)
    assert len(probs) == 3, probs


def test_cli_check_exits_2_with_one_line_per_problem(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text(edit(r"^port = 5020 ", "port = 70000 ").replace("[site]", "[site]\nowner = 1"))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"{bad}: plc.port: 70000: expected a number ≤ 65535" in err
    assert f"{bad}: site.owner: 1: expected no such key (unknown key)" in err
    assert "Traceback" not in "".join(err)


def test_cli_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    assert "expected a readable file" in capsys.readouterr().err


def test_cli_init_then_check(tmp_path: Path, capsys) -> None:
    path = tmp_path / "site.toml"
    assert main(["init", str(path)]) == 0
    assert main(["init", str(path)]) == 2  # refuses to overwrite
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "it_supply_temp" in out and "coil:0" in out


def test_cli_run_refuses_a_missing_password_variable(tmp_path: Path, capsys) -> None:
    path = tmp_path / "site.toml"
    text = demo_site_text().replace('transport = "modbus"', 'transport = "opcua"', 1)
    path.write_text(text + '\n[plc.opcua]\nusername = "plc"\npassword_env = "HEATLOOP_NO_SUCH"\n')
    assert main(["run", "--site", str(path)]) == 2
    assert "HEATLOOP_NO_SUCH" in capsys.readouterr().err


def test_demo_site_declares_fail_states_and_per_tag_frozen_windows() -> None:
    site = demo_site()
    for name in ("leak_primary", "leak_reuse", "drycooler_fault"):
        assert site.tag(name).fail_state is True  # de-energise-to-trip
    for name in ("customer_ready", "primary_pump_a_running", "secondary_pump_running"):
        assert site.tag(name).fail_state is False
    assert site.tag("it_supply_temp").frozen_s == 60
    assert site.tag("it_return_temp").frozen_s == 120
    assert site.interlocks.plausibility_band_k == 8.0 and site.interlocks.max_bypass_s == 14400
    assert (site.control.pump_fail_s, site.control.max_force_s) == (10, 28800)


def test_fail_state_and_frozen_s_only_where_they_mean_something() -> None:
    probs = problems(edit(r'^(description = "Supply to the racks.*)$', r"\1\nfail_state = true"))
    assert "tags.it_supply_temp.fail_state: True: expected only on a boolean input" in probs
    probs = problems(edit(r'^(description = "Leak, reuse zone.*)$', r"\1\nfrozen_s = 5"))
    assert "tags.leak_reuse.frozen_s: 5.0: expected only on an analogue input" in probs


def test_supervised_by_must_name_another_boolean_input() -> None:
    probs = problems(
        edit(r'^(description = "Leak, reuse zone.*)$', r'\1\nsupervised_by = "it_supply_temp"')
    )
    assert (
        "tags.leak_reuse.supervised_by: 'it_supply_temp': expected the name of another "
        "boolean input" in probs
    )
    ok = edit(r'^(description = "Leak, reuse zone.*)$', r'\1\nsupervised_by = "drycooler_fault"')
    assert loads_site(ok).tag("leak_reuse").supervised_by == "drycooler_fault"
