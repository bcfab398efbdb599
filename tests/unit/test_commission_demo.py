"""`make commission-demo`'s site: a demo site this machine's user may commission."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from controller.commission_demo import DWELLS, write_site
from plc_io.site import demo_site_text, load_site, set_key


def test_the_demo_commissioning_site_lets_this_user_commission_it(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path / "demo"))
    assert site.roles == {getpass.getuser(): "engineer"}
    assert site.state_dir == tmp_path / "demo" / "state"
    assert not site.bms.enabled  # nothing listens beyond what the procedure needs
    assert site.plc.port != site.sim.opcua_port
    assert site.control.reject_dwell_s == DWELLS["reject_dwell_s"]


def test_set_key_replaces_a_standing_key_and_refuses_a_missing_one() -> None:
    text = set_key(demo_site_text(), "plc", "port", 1502)
    assert "port = 1502\n" in text and text.count("\n") == demo_site_text().count("\n")
    with pytest.raises(KeyError, match=r"\[plc\] nonsense"):
        set_key(text, "plc", "nonsense", 1)
