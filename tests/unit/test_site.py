"""The site file: the demo validates, and every kind of mistake is named with field, value, need."""

from __future__ import annotations

import json
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
    leak = next(line for line in out.splitlines() if line.startswith("leak_reuse "))
    assert leak.rstrip().endswith("reads true")  # a cut leak cable reads wet


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


# ---- every number finite and physically bounded ----


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("plc", "stale_after_s", "inf"),
        ("interlocks", "stale_s", "inf"),
        ("interlocks", "max_rate_k_per_s", "inf"),
        ("interlocks", "primary_flow_low_m3h", "inf"),
        ("interlocks", "frozen_s", "nan"),
        ("plc", "timeout_s", "1e9"),
        ("plc", "stale_after_s", "1e9"),
        ("control", "reject_dwell_s", "1e9"),
        ("interlocks", "secondary_pressure_high_bar", "1e9"),
        ("plant", "heat_meter_start_kwh", "1e99"),
        ("sim", "seed", "100000000000"),
    ],
)
def test_non_finite_and_absurd_numbers_are_refused(section: str, key: str, value: str) -> None:
    text = re.sub(
        rf"^\[{section}\]$", f"[{section}]\n{key} = {value}", demo_site_text(), count=1, flags=re.M
    )
    if re.search(rf"^{key} = ", demo_site_text(), re.M):  # the demo sets it: replace instead
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", demo_site_text(), count=1, flags=re.M)
    probs = problems(text)
    assert len(probs) == 1 and probs[0].startswith(f"{section}.{key}: "), probs
    assert "finite" in probs[0] or "≤" in probs[0], probs


def test_non_finite_tag_range_and_scale_are_refused() -> None:
    probs = problems(edit(r"^range = \[-20.0, 120.0\]", "range = [-20.0, inf]"))
    assert probs[0].startswith("tags.it_supply_temp.range.1: inf: expected a finite number")
    probs = problems(edit(r"scale = 0.01 \}", "scale = 1e300 }"))
    assert any(p.startswith("tags.it_supply_temp.modbus.scale: 1e+300") for p in probs)


def test_every_number_key_in_the_site_file_has_an_upper_bound() -> None:
    from pydantic import BaseModel

    from plc_io.site import SECTIONS

    unbounded = []
    for section, model in SECTIONS.items():
        models = [(section, model)] + [
            (f"{section}.{n}", f.annotation)
            for n, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
        ]
        for where, m in models:
            for name, f in m.model_fields.items():
                if f.annotation in (int, float) and not any(
                    getattr(c, "le", None) is not None or getattr(c, "lt", None) is not None
                    for c in f.metadata
                ):
                    unbounded.append(f"{where}.{name}")
    assert unbounded == []


# ---- strict types, bool ranges, NodeIds, byte-order marks ----


def test_a_boolean_is_not_a_port() -> None:
    probs = problems(edit(r"^port = 5020 ", "port = true "))
    assert probs == ["plc.port: True: expected a whole number (not true/false, not a string)"]


def test_a_string_is_not_a_boolean_safe_value_and_a_number_neither() -> None:
    yes = problems(edit(r"^safe = false\n", 'safe = "yes"\n'))
    assert any(p.startswith("tags.secondary_pump_cmd.safe: 'yes': expected") for p in yes), yes
    one = problems(edit(r"^safe = false\n", "safe = 1\n"))
    assert "tags.secondary_pump_cmd.safe: 1.0: expected true or false for a bool output" in one


def test_strings_and_booleans_are_not_numbers_anywhere() -> None:
    probs = problems(edit(r"^watchdog_s = 3.0", 'watchdog_s = "3"'))
    assert probs == ["plc.watchdog_s: '3': expected a number (not true/false, not a string)"]
    probs = problems(edit(r"^sensor_noise = true", "sensor_noise = 1"))
    assert probs == ["plant.sensor_noise: 1: expected true or false (not a number, not a string)"]
    probs = problems(edit(r"^range = \[-20.0, 120.0\]", "range = [false, 120.0]"))
    assert probs[0].startswith("tags.it_supply_temp.range.0: False: expected a number")


def test_a_boolean_tag_has_range_0_to_1() -> None:
    probs = problems(
        edit(r'^(description = "Leak, reuse zone.*\n)', r"\1").replace(
            'range = [0.0, 1.0]\ndescription = "Leak, reuse zone',
            'range = [0.0, 2.0]\ndescription = "Leak, reuse zone',
        )
    )
    assert probs == ["tags.leak_reuse.range: [0.0, 2.0]: expected [0, 1] for a bool tag"]


@pytest.mark.parametrize(
    "node",
    ["garbage", "ns=2;x=1", "ns=2;s=", "ns=70000;i=1", "ns=2;i=12ab", "ns=1;g=1234", "s"],
)
def test_garbage_opcua_node_is_refused(node: str) -> None:
    text = edit(r'^(description = "Supply to the racks.*)$', rf'\1\nopcua_node = "{node}"')
    probs = problems(text)
    assert len(probs) == 1 and probs[0].startswith(
        f"tags.it_supply_temp.opcua_node: {node!r}: expected a NodeId"
    ), probs


@pytest.mark.parametrize(
    "node",
    [
        "ns=2;s=PLC.it_supply_temp",
        "i=2253",
        "nsu=urn:heatloop:plc;s=PLC/x",
        "nsu=CODESYSSPV3/3S/IecVarAccess;s=|var|CODESYS Control.Application.PLC_PRG.heartbeat",
        "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a",
        "ns=1;b=M/RbKBsRVkePCePcx24oRA==",
    ],
)
def test_well_formed_opcua_nodes_pass(node: str) -> None:
    text = edit(r'^(description = "Supply to the racks.*)$', rf'\1\nopcua_node = "{node}"')
    assert loads_site(text).tag("it_supply_temp").opcua_node == node


def test_byte_order_mark_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(b"\xef\xbb\xbf" + demo_site_text().encode())
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: (file): a byte-order mark at the start; save as UTF-8 without BOM" in err
    assert "Invalid statement" not in err
    assert "byte-order mark" in problems("\ufeff" + demo_site_text())[0]


# ---- settings that contradict each other, one line naming both ----


def _set(text: str, key: str, value: str) -> str:
    out, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", text, count=1, flags=re.M)
    assert n == 1, key
    return out


@pytest.mark.parametrize(
    ("edits", "line"),
    [
        (
            [("it_supply_high_c", "36.0")],
            "interlocks.it_supply_high_c: 36.0: expected ≥ control.it_supply_setpoint_c (35) + 3 K",
        ),
        (
            [("timeout_s", "3.0")],
            "plc.timeout_s: 3.0: expected shorter than plc.watchdog_s (3)",
        ),
        (
            [("watchdog_s", "0.9")],
            "plc.watchdog_s: 0.9: expected longer than plc.timeout_s (0.5) + 2 × "
            "scan.period_s (0.25)",
        ),
        (
            [("watchdog_s", "30.0")],
            "plc.watchdog_s: 30.0: expected ≤ 10 × scan.period_s (0.25) + 2 × plc.timeout_s "
            "(0.5) = 3.5",
        ),
        (
            [("tank_full_c", "90.0")],
            "control.tank_full_c: 90.0: expected below interlocks.tank_top_high_c (85)",
        ),
        (
            [("freeze_ambient_c", "8.0")],
            "interlocks.freeze_ambient_c: 8.0: expected below "
            "interlocks.freeze_drycooler_out_c (5)",
        ),
        (
            [("stale_s", "0.2")],
            "interlocks.stale_s: 0.2: expected longer than scan.period_s (0.25)",
        ),
        (
            [("customer_supply_high_c", "40.0")],
            "control.tank_full_c: 42.0: expected below interlocks.customer_supply_high_c (40)",
        ),
    ],
)
def test_contradicting_settings_name_both_fields(edits: list[tuple[str, str]], line: str) -> None:
    text = demo_site_text()
    for key, value in edits:
        text = _set(text, key, value)
    assert line in problems(text)


def test_interlock_staleness_outlasts_the_opcua_subscription_refresh() -> None:
    """With an OPC UA subscription an unchanged value is proven fresh only by the Read every
    plc.stale_after_s / 2: validation must not call it stale in between (a leak input that
    never changes would flicker unknown, a steady supply reading would raise IL-02)."""
    opcua = demo_site_text().replace('transport = "modbus"', 'transport = "opcua"', 1)
    assert (
        "interlocks.stale_s: 1.0: expected longer than plc.stale_after_s (2) / 2 + "
        "scan.period_s (0.25) = 1.25 with an OPC UA subscription"
        in problems(_set(opcua, "stale_s", "1.0"))
    )
    loads_site(_set(opcua, "stale_s", "1.5"))
    polled = opcua + "\n[plc.opcua]\nsubscribe = false\n"  # read every scan
    loads_site(_set(polled, "stale_s", "1.0"))
    loads_site(_set(demo_site_text(), "stale_s", "1.0"))  # Modbus polls every scan


def test_fan_minimum_below_full_speed_and_thresholds_inside_their_tags_range() -> None:
    text = demo_site_text().replace("[control]", "[control]\nfan_min_pct = 100.0", 1)
    assert (
        "control.fan_min_pct: 100.0: expected below the high end of "
        "tags.drycooler_fan_cmd.range (100)" in problems(text)
    )
    text = _set(demo_site_text(), "secondary_pressure_high_bar", "12.0")
    assert (
        "interlocks.secondary_pressure_high_bar: 12.0: expected inside "
        "tags.secondary_pressure.range [0.0, 10.0]" in problems(text)
    )


def test_bms_port_cannot_share_the_simulated_plcs_port() -> None:
    text = _set(demo_site_text(), "opcua_port", "4840")
    assert "bms.port: 4840: expected a port other than sim.opcua_port" in problems(text)


def test_watchdog_of_the_hil_tests_stays_valid() -> None:
    # tests/hil run the controller with watchdog_s 1.5 and 1.0 s: both inside the rule
    for wd in ("1.5", "1.1"):
        assert loads_site(_set(demo_site_text(), "watchdog_s", wd)).plc.watchdog_s == float(wd)


# ---- the heartbeat must be writable exactly ----


def _heartbeat(range_: str, modbus: str) -> str:
    text = demo_site_text()
    block = re.search(r"\[tags.heartbeat\].*?\n\n", text + "\n\n", re.S)
    assert block
    new = re.sub(r"^range = .*$", f"range = {range_}", block.group(0), count=1, flags=re.M)
    new = re.sub(r"^modbus = .*$", f"modbus = {modbus}", new, count=1, flags=re.M)
    return text.replace(block.group(0), new)


@pytest.mark.parametrize(
    ("range_", "modbus", "expected"),
    [
        (
            "[0.0, 65535.0]",
            '{ table = "holding", address = 5, encoding = "uint16", scale = 0.5 }',
            "tags.heartbeat.modbus.scale: 0.5: expected 1",
        ),
        (
            "[0.0, 100000000.0]",
            '{ table = "holding", address = 5, encoding = "float32" }',
            "tags.heartbeat.range: [0.0, 100000000.0]: expected a high end ≤ 2**24",
        ),
        (
            "[0.0, 10.0]",
            '{ table = "holding", address = 5, encoding = "uint16" }',
            "tags.heartbeat.range: [0.0, 10.0]: expected at least 255 counts",
        ),
        (
            "[5.0, 65535.0]",
            '{ table = "holding", address = 5, encoding = "uint16" }',
            "tags.heartbeat.range: [5.0, 65535.0]: expected [0, N]",
        ),
    ],
)
def test_heartbeat_that_cannot_count_distinctly_is_refused(
    range_: str, modbus: str, expected: str
) -> None:
    probs = problems(_heartbeat(range_, modbus))
    assert any(p.startswith(expected) for p in probs), probs


def test_heartbeat_float32_up_to_2_pow_24_is_fine() -> None:
    text = _heartbeat(
        "[0.0, 16777216.0]", '{ table = "holding", address = 5, encoding = "float32" }'
    )
    assert loads_site(text).tag("heartbeat").hi == 2**24


# ---- a cut wire on a leak or fault input never reads healthy ----


@pytest.mark.parametrize("tag", ["leak_primary", "leak_reuse", "drycooler_fault"])
def test_leak_or_fault_input_without_fail_safe_declaration_is_refused(tag: str) -> None:
    text = re.sub(
        rf"(\[tags.{tag}\].*?)fail_state = true[^\n]*\n",
        r"\1",
        demo_site_text(),
        count=1,
        flags=re.S,
    )
    probs = problems(text)
    assert len(probs) == 1 and probs[0].startswith(f"tags.{tag}.fail_state: None: expected true")
    falsy = re.sub(
        rf"(\[tags.{tag}\].*?)fail_state = true",
        r"\1fail_state = false",
        demo_site_text(),
        count=1,
        flags=re.S,
    )
    assert problems(falsy)[0].startswith(f"tags.{tag}.fail_state: False: expected true")


def test_supervised_leak_input_needs_a_fail_safe_fault_contact() -> None:
    base = re.sub(
        r"(\[tags.leak_reuse\].*?)fail_state = true[^\n]*\n",
        r'\1supervised_by = "leak_reuse_zone_fault"\n',
        demo_site_text(),
        count=1,
        flags=re.S,
    )
    contact = (
        '\n[tags.leak_reuse_zone_fault]\ndirection = "input"\ntype = "bool"\nunit = "bool"\n'
        'range = [0.0, 1.0]\nFAIL\nmodbus = { table = "discrete", address = 9, encoding = "bit" }\n'
    )
    site = loads_site(base + contact.replace("FAIL", "fail_state = true"))
    assert site.tag("leak_reuse").supervised_by == "leak_reuse_zone_fault"
    probs = problems(base + contact.replace("FAIL", "fail_state = false"))
    assert any(
        p.startswith("tags.leak_reuse.supervised_by: 'leak_reuse_zone_fault': expected a fault")
        for p in probs
    ), probs


# ---- [roles], forceable inputs and [recorder] ----


def _roles(body: str) -> str:
    """The demo site with its [roles] lists replaced by `body` (taken literally)."""
    empty = "viewer = []\noperator = []\nengineer = []\n"
    assert empty in demo_site_text()
    return demo_site_text().replace(empty, body + "\n", 1)


def test_demo_site_lists_nobody_and_its_forceable_inputs() -> None:
    site = demo_site()
    assert site.roles == {}
    assert {t.name for t in site.tags if t.forceable} == {
        "leak_primary",
        "leak_reuse",
        "tank_top_temp",
        "secondary_pressure",
        "customer_supply_temp",
        "customer_ready",
        "primary_flow",
    }
    assert (site.recorder.enabled, site.recorder.hours, site.recorder.snapshot_every_s) == (
        True,
        24.0,
        300.0,
    )


def test_roles_map_each_user_to_one_role() -> None:
    site = loads_site(
        _roles('viewer = ["bms-view", "guest"]\noperator = ["ops"]\nengineer = ["alice"]')
    )
    assert site.roles == {
        "bms-view": "viewer",
        "guest": "viewer",
        "ops": "operator",
        "alice": "engineer",
    }


def test_a_user_in_two_roles_is_refused_naming_both() -> None:
    probs = problems(_roles('viewer = ["bob"]\noperator = []\nengineer = ["alice", "bob"]'))
    assert probs == [
        "roles.engineer.1: 'bob': expected a user in one role only (also in roles.viewer)"
    ]
    probs = problems(_roles('viewer = []\noperator = ["ops", "ops"]\nengineer = []'))
    assert probs == [
        "roles.operator.1: 'ops': expected a user in one role only (also earlier in the same list)"
    ]


@pytest.mark.parametrize("user", ["", "-rf", "al ice", "root;id", "x" * 33, "ünï", "a/b", "a\nb"])
def test_a_user_name_that_is_not_posix_is_refused(user: str) -> None:
    probs = problems(_roles(f"viewer = [{json.dumps(user)}]\noperator = []\nengineer = []"))
    assert len(probs) == 1 and probs[0].startswith("roles.viewer.0: "), probs
    assert "expected a POSIX user name" in probs[0]


def test_role_lists_are_strict() -> None:
    assert problems(_roles("viewer = [1]\noperator = []\nengineer = []"))[0].startswith(
        "roles.viewer.0: 1: expected a string"
    )
    assert problems(_roles('viewer = "alice"\noperator = []\nengineer = []'))[0].startswith(
        "roles.viewer: 'alice': expected"
    )
    assert problems(_roles('viewer = []\noperator = []\nengineer = []\nroot = ["x"]')) == [
        "roles.root: ['x']: expected a role name: viewer, operator, engineer"
    ]


def test_forceable_only_on_inputs() -> None:
    probs = problems(edit(r"^(description = \"Reuse valve command.*)$", r"\1\nforceable = true"))
    assert probs == [
        "tags.reuse_valve_cmd.forceable: True: expected only on an input (an engineer may "
        "force any output but the heartbeat)"
    ]
    probs = problems(edit(r"^(description = \"Buffer tank, middle\")$", r"\1\nforceable = 1"))
    assert probs == [
        "tags.tank_mid_temp.forceable: 1: expected true or false (not a number, not a string)"
    ]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("hours", "0.5", "recorder.hours: 0.5: expected a number ≥ 1"),
        ("hours", "721", "recorder.hours: 721: expected a number ≤ 720"),
        ("hours", "nan", "recorder.hours: nan: expected a finite number"),
        ("snapshot_every_s", "9", "recorder.snapshot_every_s: 9: expected a number ≥ 10"),
        ("snapshot_every_s", "3601", "recorder.snapshot_every_s: 3601: expected a number ≤ 3600"),
        ("enabled", '"yes"', "recorder.enabled: 'yes': expected true or false"),
    ],
)
def test_recorder_bounds(key: str, value: str, fragment: str) -> None:
    probs = problems(edit(rf"^{key} = .*$", f"{key} = {value}"))
    assert len(probs) == 1 and probs[0].startswith(fragment), probs


# ---- OPC UA: node ids as PLCs write them, and the variable types a tag may live in ----


def _with_node(node: str) -> str:
    """The demo site with it_supply_temp at `node`, written as a TOML basic string (escapes
    kept as they are: re.sub's own escapes would turn "\\n" into a line break)."""
    text, n = re.subn(
        r'^(description = "Supply to the racks.*)$',
        lambda m: f"{m.group(1)}\nopcua_node = {json.dumps(node)}",
        demo_site_text(),
        count=1,
        flags=re.M,
    )
    assert n == 1
    return text


@pytest.mark.parametrize(
    "node",
    [
        "nsu=ns=2;i=5",  # an index where the URI belongs
        "nsu=urn:a b;s=x",  # no spaces in a URI
        "ns=2;s=DB_Heat\nheartbeat",  # a pasted line break
        "nsu=urn:x;i=4294967296",  # beyond UInt32
        "nsu=;i=1",
        "nsu=urn:x",
    ],
)
def test_bad_nsu_and_garbage_node_ids_are_refused_by_check(node: str) -> None:
    text = _with_node(node)
    probs = problems(text)
    assert len(probs) == 1 and probs[0].startswith(
        f"tags.it_supply_temp.opcua_node: {node!r}: expected a NodeId"
    ), probs


@pytest.mark.parametrize(
    "node",
    [
        'ns=3;s="DB_Heat"."it_supply_temp"',  # Siemens S7-1500, quotes and all
        "ns=4;s=|var|CODESYS Control for Linux SL.Application.GVL.it_supply_temp",
        "ns=4;s=MAIN.fSupplyTemp",  # Beckhoff TwinCAT
        'nsu=http://www.siemens.com/simatic-s7-opcua;s="DB_Heat"."it_supply_temp"',
        "nsu=urn:BeckhoffAutomation:Ua:PLC1;i=850",
    ],
)
def test_plc_style_node_ids_pass(node: str) -> None:
    text = _with_node(node)
    assert loads_site(text).tag("it_supply_temp").opcua_node == node


def _typed(tag: str, opcua_type: str) -> str:
    return edit(rf"^(\[tags\.{tag}\])$", rf'\1\nopcua_type = "{opcua_type}"')


@pytest.mark.parametrize(
    ("tag", "opcua_type", "expected"),
    [
        # the counter runs 0 … 65535 and wraps: a Byte would refuse every count above 255
        (
            "heartbeat",
            "Byte",
            "tags.heartbeat.opcua_type: 'Byte': expected a type that holds "
            "range [0, 65535]; Byte holds 0…255",
        ),
        (
            "heartbeat",
            "Int16",
            "tags.heartbeat.opcua_type: 'Int16': expected a type that holds "
            "range [0, 65535]; Int16 holds -32768…32767",
        ),
        ("heartbeat", "Boolean", "tags.heartbeat.opcua_type: 'Boolean': expected a numeric type"),
        (
            "it_supply_temp",
            "Boolean",
            "tags.it_supply_temp.opcua_type: 'Boolean': expected a "
            "numeric type for an analogue tag",
        ),
        (
            "leak_primary",
            "Float",
            "tags.leak_primary.opcua_type: 'Float': expected Boolean or an "
            "integer type for a bool tag",
        ),
        ("reuse_valve_cmd", "String", "tags.reuse_valve_cmd.opcua_type: 'String': expected one of"),
    ],
)
def test_an_opcua_type_that_cannot_hold_the_tag_is_refused(
    tag: str, opcua_type: str, expected: str
) -> None:
    probs = problems(_typed(tag, opcua_type))
    assert len(probs) == 1 and probs[0].startswith(expected), probs


def test_a_float_heartbeat_counts_exactly_only_up_to_2_pow_24() -> None:
    text = _heartbeat(
        "[0.0, 33554432.0]", '{ table = "holding", address = 5, encoding = "int32" }'
    ).replace("[tags.heartbeat]", '[tags.heartbeat]\nopcua_type = "Float"')
    assert problems(text) == [
        "tags.heartbeat.range: [0.0, 33554432.0]: expected a high end ≤ 16777216 with "
        "opcua_type Float (above it consecutive counts are not distinct)"
    ]
    ok = text.replace("[0.0, 33554432.0]", "[0.0, 16777216.0]")
    assert loads_site(ok).tag("heartbeat").opcua_type == "Float"


@pytest.mark.parametrize(
    ("tag", "opcua_type"),
    [
        ("heartbeat", "UInt16"),
        ("heartbeat", "UInt32"),
        ("heartbeat", "Double"),
        ("reuse_valve_cmd", "Float"),
        ("reuse_valve_cmd", "SByte"),  # 0…100 %, rounded to whole percent
        ("primary_pump_a_cmd", "Boolean"),
        ("leak_primary", "UInt16"),  # a flag in a PLC word, 0 or 1
        ("it_supply_temp", "Int16"),
    ],
)
def test_an_opcua_type_that_holds_the_tag_is_taken(tag: str, opcua_type: str) -> None:
    assert loads_site(_typed(tag, opcua_type)).tag(tag).opcua_type == opcua_type
