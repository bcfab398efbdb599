"""The NOC's Prometheus endpoint: a real Controller on the in-memory PLC, `Metrics` on a free port
on 127.0.0.1, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import Metrics, MetricsBindError, metric_names
from controller.modes import Mode
from plc_io.site import MetricsConfig, Site
from tests.unit.test_runtime import PERIOD_S, QUICK, Rig

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "prometheus-rules.yml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_metrics(site: Site, port: int, host: str = "127.0.0.1") -> Site:
    return site.model_copy(update={"metrics": MetricsConfig(host=host, port=port)})


@pytest.fixture
def rig() -> Iterator[tuple[Rig, Metrics]]:
    r = Rig(with_metrics(QUICK, free_port()))
    m = Metrics(r.ctl.site, r.ctl)
    m.align_s = 0.0  # scans are driven by hand here: a scrape waits for none
    r.ctl.scan_hooks.append(m.on_scan)
    m.start()
    try:
        yield r, m
    finally:
        m.close()


def scrape(m: Metrics) -> Samples:
    with urllib.request.urlopen(f"http://{m.address}/metrics", timeout=10) as resp:
        text = resp.read().decode("utf-8")
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not served; have {sorted({k[0] for k in samples})}"
    return samples[key]


def series(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name}


def current_modes(samples: Samples) -> list[str]:
    return [m for m, v in series(samples, "heatloop_mode", "mode").items() if v == 1.0]


async def test_the_scrape_parses_and_shows_the_mode_and_follows_a_change(
    rig: tuple[Rig, Metrics],
) -> None:
    r, m = rig
    await r.until_mode(Mode.NORMAL_REUSE)
    s = scrape(m)
    assert current_modes(s) == [r.ctl.status.decision.mode.value] == ["NORMAL_REUSE"]
    assert set(series(s, "heatloop_mode", "mode")) == {x.value for x in Mode}
    assert one(s, "heatloop_scans_total") == r.ctl.status.scans
    assert one(s, "heatloop_scan_fresh") == 1.0
    assert one(s, "heatloop_plc_link_up") == 1.0
    assert one(s, "heatloop_build_info", version=r.ctl.version, site=QUICK.site.name) == 1.0
    # every scan observed once into the histogram
    assert one(s, "heatloop_scan_duration_seconds_count") == r.ctl.status.scans
    # outputs carry the level that won, as the decision says
    d = r.ctl.status.decision
    fan = d.outputs["drycooler_fan_cmd"]
    assert (
        one(
            s,
            "heatloop_output_value",
            tag="drycooler_fan_cmd",
            unit="%",
            level=fan.level.name.lower(),
        )
        == fan.value
    )
    # an operator's reject request: the mode series moves to DRY_COOLER_REJECT
    r.ctl.request_reject(True)
    await r.until_mode(Mode.DRY_COOLER_REJECT)
    s = scrape(m)
    assert current_modes(s) == ["DRY_COOLER_REJECT"]


async def test_a_nan_input_is_served_as_nan_with_quality_not_good(
    rig: tuple[Rig, Metrics],
) -> None:
    r, m = rig
    await r.scans(3)
    s = scrape(m)
    assert one(s, "heatloop_input_good", tag="tank_mid_temp") == 1.0
    r.plc.set("tank_mid_temp", math.nan)
    await r.scans(1)
    s = scrape(m)
    assert math.isnan(one(s, "heatloop_input_value", tag="tank_mid_temp", unit="°C"))
    assert one(s, "heatloop_input_good", tag="tank_mid_temp") == 0.0
    assert one(s, "heatloop_input_valid", tag="tank_mid_temp") == 0.0
    assert one(s, "heatloop_input_good", tag="tank_top_temp") == 1.0
    # and its alarm is listed, active and waiting for an acknowledgement, with its priority
    alarm = r.ctl.core.alarms.alarms["INPUT:tank_mid_temp"]
    prio = alarm.priority.name.lower()
    assert one(s, "heatloop_alarm_active", alarm=alarm.id, priority=prio) == 1.0
    assert one(s, "heatloop_alarm_acknowledged", alarm=alarm.id, priority=prio) == 0.0
    assert one(s, "heatloop_alarms_unacknowledged", priority=prio) >= 1.0
    # alarms that are normal are not listed one by one (counted per priority instead)
    listed = set(series(s, "heatloop_alarm_active", "alarm"))
    assert listed == {a.id for a in r.ctl.core.alarms.standing()}


async def test_a_scan_that_stops_is_not_served_as_fresh(rig: tuple[Rig, Metrics]) -> None:
    """The scan hangs (no scan completes) while the HTTP thread still answers: inputs stop
    being good and heatloop_scan_fresh is 0; the latched/mode state keeps its last value."""
    r, m = rig
    await r.until_mode(Mode.NORMAL_REUSE)
    assert one(scrape(m), "heatloop_scan_fresh") == 1.0
    r.clock.t += m.stale_after_s + PERIOD_S  # time passes, no scan
    s = scrape(m)
    assert one(s, "heatloop_scan_fresh") == 0.0
    assert set(series(s, "heatloop_input_good", "tag").values()) == {0.0}
    assert current_modes(s) == ["NORMAL_REUSE"]  # last known, flagged by scan_fresh


async def test_no_scan_yet_serves_no_state_and_not_fresh(rig: tuple[Rig, Metrics]) -> None:
    _, m = rig
    s = scrape(m)
    assert one(s, "heatloop_scan_fresh") == 0.0
    assert not series(s, "heatloop_mode", "mode")
    assert not series(s, "heatloop_input_good", "tag")


async def test_a_family_that_raises_is_skipped_and_logged_once(
    rig: tuple[Rig, Metrics],
) -> None:
    r, m = rig
    await r.scans(2)
    logged: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: logged.append((event, kw))

    m.log = Log()

    def broken() -> dict[str, Any]:
        raise RuntimeError("meter view broke")

    r.ctl.meter_view = broken  # type: ignore[attr-defined]
    for _ in range(3):
        s = scrape(m)
        assert current_modes(s) == [r.ctl.status.decision.mode.value]
        assert not any(k[0].endswith("_kwh_total") for k in s)
    failures = [kw for ev, kw in logged if ev == "metrics_family_failed"]
    assert failures == [{"family": "energy", "error": "RuntimeError: meter view broke"}]
    assert m.scrape_errors == 3
    # the alarm table itself broken: that family goes, the rest stays
    r.ctl.core.alarms = None  # type: ignore[assignment]
    s = scrape(m)
    assert not series(s, "heatloop_alarm_active", "alarm")
    assert one(s, "heatloop_scans_total") == r.ctl.status.scans


def view(**over: Any) -> dict[str, Any]:
    totals = {
        "delivered_kwh": 120.5,
        "unbilled_kwh": 0.0,
        "delivered_calc_kwh": 119.0,
        "rejected_kwh": 40.0,
        "it_energy_kwh": 200.0,
        "it_heat_kwh": 180.0,
        "stored_kwh": -3.5,
        "fan_kwh": 2.25,
        "class_s": {"available": 3000.0, "trip": 600.0, "customer_side": 0.0},
    }
    return {
        "interval_s": 900,
        "totals": totals,
        "today": totals,
        "reuse_fraction": 0.6025,
        "availability_pct": 83.3,
        "availability_today_pct": None,
        "meter_kwh": 1120.5,
        "open_interruption": {"id": 3, "cls": "trip"},
        **over,
    }


async def test_energy_counters_come_from_the_meter_view(rig: tuple[Rig, Metrics]) -> None:
    r, m = rig
    await r.scans(2)
    r.ctl.meter_view = lambda: None  # type: ignore[method-assign]
    s = scrape(m)
    assert not any(k[0].endswith("_kwh_total") for k in s)  # metering off: absent, not zero
    r.ctl.meter_view = view  # type: ignore[attr-defined]
    s = scrape(m)
    assert one(s, "heatloop_heat_delivered_kwh_total") == 120.5
    assert one(s, "heatloop_heat_rejected_kwh_total") == 40.0
    assert one(s, "heatloop_it_energy_kwh_total") == 200.0
    assert one(s, "heatloop_fan_energy_kwh_total") == 2.25
    assert one(s, "heatloop_heat_stored_kwh") == -3.5
    assert one(s, "heatloop_metering_class_seconds_total", **{"class": "trip"}) == 600.0
    assert one(s, "heatloop_availability_percent", period="lifetime") == 83.3
    # no time yet today in which the customer wanted heat: no sample, never a made-up 0 or 100
    assert "today" not in series(s, "heatloop_availability_percent", "period")
    assert one(s, "heatloop_reuse_fraction") == 0.6025
    opened = series(s, "heatloop_interruption_open", "class")
    assert opened["trip"] == 1.0 and sum(opened.values()) == 1.0


def test_an_address_in_use_is_a_bind_error_naming_metrics_and_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = Rig(with_metrics(QUICK, port))
        m = Metrics(r.ctl.site, r.ctl)
        with pytest.raises(MetricsBindError) as e:
            m.start()
    msg = str(e.value)
    assert msg.startswith(f"[metrics] 127.0.0.1:{port}: cannot listen: ")
    assert "in use" in msg and "\n" not in msg


def test_an_address_not_on_this_host_is_a_bind_error() -> None:
    r = Rig(with_metrics(QUICK, free_port(), host="192.0.2.1"))  # TEST-NET-1: never ours
    m = Metrics(r.ctl.site, r.ctl)
    with pytest.raises(MetricsBindError, match=r"^\[metrics\] 192\.0\.2\.1:\d+: cannot listen: "):
        m.start()


# ---- the Grafana dashboard only uses what the endpoint serves ----

METRIC = re.compile(r"\bheatloop_[a-z0-9_]+")


def exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query") and isinstance(v, str):
                yield v
            else:
                yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)


async def test_every_metric_the_dashboard_uses_is_served(rig: tuple[Rig, Metrics]) -> None:
    r, m = rig
    await r.scans(3)
    r.ctl.meter_view = view  # type: ignore[attr-defined]
    served = metric_names(m)
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dash.get("schemaVersion"), int) and dash.get("panels")
    variables = [v["name"] for v in dash["templating"]["list"]]
    assert "instance" in variables
    # what Grafana needs to lay out and query every panel: unique ids, a place, a data source
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"][
            "w"
        ] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
    used = {name for e in exprs(dash) for name in METRIC.findall(e)}
    assert len(used) >= 15, used
    assert used <= served, f"not served: {sorted(used - served)}"
    # every panel query is scoped to the chosen node(s)
    for e in exprs(dash["panels"]):
        for name in METRIC.findall(e):
            assert re.search(name + r'\{[^}]*instance=~"\$instance"', e), e


async def test_every_metric_the_alert_rules_use_is_served(rig: tuple[Rig, Metrics]) -> None:
    r, m = rig
    await r.scans(3)
    r.ctl.meter_view = view  # type: ignore[attr-defined]
    served = metric_names(m)
    rules = [
        line.split("expr:", 1)[1].strip()
        for line in RULES.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("expr:")
    ]
    assert len(rules) >= 8
    used = {name for e in rules for name in METRIC.findall(e)}
    assert used <= served, f"not served: {sorted(used - served)}"


async def test_a_scrape_waits_for_the_next_scan_and_then_answers(
    rig: tuple[Rig, Metrics],
) -> None:
    """The scrape's CPU time goes in the idle rest of the period: it starts building when a
    scan completes (and a hung scan delays it by at most `align_s`)."""
    r, m = rig
    await r.scans(2)
    m.align_s = 60.0  # far longer than the test: the scan, not the timeout, must release it
    got: list[Samples] = []
    t = threading.Thread(target=lambda: got.append(scrape(m)), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waiting for a scan
    scans = r.ctl.status.scans
    await r.scans(1)
    t.join(30.0)
    assert not t.is_alive() and got
    assert one(got[0], "heatloop_scans_total") == scans + 1


async def test_the_energy_counters_are_the_running_meter_s_totals(
    rig: tuple[Rig, Metrics],
) -> None:
    """The controller's own meter (controller.metering): the counters are its lifetime totals,
    read at scrape time, and the billable one grows with the heat meter's totaliser."""
    r, m = rig
    await r.until_mode(Mode.NORMAL_REUSE)
    for _ in range(20):
        r.plc.set("heat_meter_energy", float(r.plc.values["heat_meter_energy"]) + 0.5)
        await r.scans(1)
    mv = r.ctl.meter_view()
    assert mv is not None
    s = scrape(m)
    totals = mv["totals"]
    assert one(s, "heatloop_heat_delivered_kwh_total") == totals["delivered_kwh"]
    assert one(s, "heatloop_it_energy_kwh_total") == totals["it_energy_kwh"]
    assert totals["delivered_kwh"] > 0.0
    classes = series(s, "heatloop_metering_class_seconds_total", "class")
    assert classes == {k: float(v) for k, v in totals["class_s"].items()}
