"""The NOC's Prometheus endpoint (`[metrics]`): the controller's state, read at scrape time.

Theory of operation. One custom collector on a registry of its own reads, when Prometheus
scrapes, references the scan already holds (`ctl.status`, `ctl.core.alarms`, `ctl.meter_view()`):
the scan never builds anything for the endpoint, it only observes its own duration into a
histogram (`on_scan`, a few microseconds). The exposition is the `prometheus_client` library's,
served by its threaded HTTP server on `site.metrics.host:port`, bound at `start()` so an address
that cannot be bound stops start-up with one line (`MetricsBindError`), never mid-run.

A scrape never breaks the scan: it runs in the server's threads, reads frozen values or whole
references, and each family is built inside its own `try`; it first waits (at most one period)
for the next scan to complete, so its few milliseconds of CPU fall in the idle rest of the
period instead of stretching a scan through the GIL (`on_scan` wakes it). A family that raises
is left out of that scrape and logged once per cause (the rest of the scrape is served).

Nothing stale is served as fresh (DESIGN §4): when the newest completed scan is older than
`stale_after_s`, `heatloop_scan_fresh` is 0 and every input's `heatloop_input_good` is 0; the
other state families keep their last values (an alert on a latched trip must not "resolve"
because the scan hung; systemd's watchdog restarts a hung scan, see controller.sdnotify).

Metric names are a contract with the NOC's dashboards and alert rules: `docs/deploy.md` lists
each; `deploy/grafana-dashboard.json` uses only these (a unit test checks it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from controller.alarms import AlarmState, Priority
from controller.arbitration import Level
from controller.modes import Mode
from interlocks.rules import RULES
from plc_io.image import Quality
from plc_io.transport import LinkState

if TYPE_CHECKING:
    from controller.runtime import Controller, Status
    from plc_io.site import Site

PREFIX = "heatloop_"
# Scan time buckets for a 250 ms period: fine below 10 ms (a healthy scan on loopback takes a
# few ms), the period and its multiples above (an overrun, a PLC timeout).
SCAN_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.15,
    0.2,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# The energy counters from `meter_view()["totals"]`: metric stem -> totals key.
ENERGY_COUNTERS = (
    ("heat_delivered_kwh", "delivered_kwh", "Heat delivered to the customer, billable (kWh)"),
    ("heat_unbilled_kwh", "unbilled_kwh", "Totaliser steps flagged as jumps, not billed (kWh)"),
    (
        "heat_delivered_calc_kwh",
        "delivered_calc_kwh",
        "Heat delivered by flow x dT x rho*cp, the cross-check (kWh)",
    ),
    ("heat_rejected_kwh", "rejected_kwh", "Heat rejected at the dry cooler, estimated (kWh)"),
    ("it_energy_kwh", "it_energy_kwh", "IT electrical energy (kWh)"),
    ("it_heat_kwh", "it_heat_kwh", "IT heat captured by the primary loop (kWh)"),
    ("fan_energy_kwh", "fan_kwh", "Dry-cooler fan energy, estimated (kWh)"),
)
INTERRUPTION_CLASSES = ("planned_maintenance", "customer_side", "fault", "trip", "plc_link")
LINK_STATES = tuple(s.value for s in LinkState)


class MetricsBindError(OSError):
    """The endpoint's address cannot be bound (in use, not on this host, not resolvable)."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _num(x: object) -> float | None:
    """A JSON-ish number as a float, or None (bools, text, None: not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def _value(x: object) -> float:
    """An input or output value as a sample: bools 1/0, a missing value NaN (valid in the
    exposition: Prometheus keeps it, graphs show a gap)."""
    if isinstance(x, bool):
        return 1.0 if x else 0.0
    if isinstance(x, int | float):
        return float(x)
    return math.nan


class _Collector:
    """Reads the controller at scrape time; each family in its own try (see the module doc)."""

    def __init__(self, owner: Metrics) -> None:
        self.owner = owner

    def describe(self) -> list[Metric]:
        # nothing to describe up front: the registry then never calls collect() at
        # registration (before the controller has scanned)
        return []

    def collect(self) -> Iterator[Metric]:
        self.owner.wait_for_scan()
        yield from self.owner.families()


class Metrics:
    """The endpoint: `start()` binds (or raises MetricsBindError), `on_scan` is a scan hook."""

    def __init__(self, site: Site, ctl: Controller, *, log: Any = None) -> None:
        self.site = site
        self.ctl = ctl
        self.log = log if log is not None else structlog.get_logger("heatloop.metrics")
        cfg = site.metrics
        self.host = cfg.host if cfg is not None else "127.0.0.1"
        self.port = cfg.port if cfg is not None else 0
        period = site.scan.period_s
        self.stale_after_s = max(4.0 * period, 2.0)
        # a scrape waits (at most `align_s`) for the next scan to complete, then builds at once:
        # its CPU time falls in the idle rest of the period, not across a scan (the GIL)
        self.align_s = period
        self._scan_seq = 0
        self._scanned = threading.Condition()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # first: the wait comes before any formatting
        self.scan_time = Histogram(
            PREFIX + "scan_duration_seconds",
            "Compute and I/O time of each completed scan",
            buckets=SCAN_BUCKETS_S,
            registry=self.registry,
        )
        self._units = {t.name: t.unit for t in site.tags}
        self._inputs = tuple(t.name for t in site.inputs)
        self._rules = tuple(r.id for r in RULES)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._failed: dict[str, str] = {}  # family -> the cause last logged (log once per cause)
        self._lock = threading.Lock()  # scrapes may run in parallel threads
        self.scrape_errors = 0
        self._builders: tuple[tuple[str, Callable[[], Iterable[Metric]]], ...] = (
            ("build", self._build),
            ("scan", self._scan),
            ("mode", self._mode),
            ("interlocks", self._interlocks),
            ("alarms", self._alarms),
            ("inputs", self._inputs_families),
            ("outputs", self._outputs),
            ("link", self._link),
            ("energy", self._energy),
        )

    # ---- lifecycle ----

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    def start(self) -> None:
        """Bind and serve now, or raise MetricsBindError naming [metrics], the address and why."""
        if self._server is not None:
            return
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as e:  # in use, not an address of this host, a name that does not resolve
            why = e.strerror or str(e) or type(e).__name__
            raise MetricsBindError(f"[metrics] {self.address}: cannot listen: {why}") from e
        if self.port == 0:  # an ephemeral port (tests): say which one
            self.port = int(self._server.server_address[1])
        self.log.info("metrics_listening", address=self.address)

    def close(self) -> None:
        """Stop serving (blocks until the server's loop has noticed, at most about 0.5 s)."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.shutdown()
            server.server_close()
        except Exception as e:  # never in the way of a shutdown
            self.log.warning("metrics_close_failed", error=f"{type(e).__name__}: {e}")
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def on_scan(self, st: Status) -> None:
        """A scan hook: one histogram observation and a wake-up for a waiting scrape."""
        self.scan_time.observe(st.last_scan_s)
        with self._scanned:
            self._scan_seq += 1
            self._scanned.notify_all()

    def wait_for_scan(self) -> None:
        """Block the scraping thread until the next scan completes, at most `align_s` (a hung
        scan delays a scrape by that, never more; it is then served with scan_fresh 0)."""
        if self.align_s <= 0:
            return
        with self._scanned:
            seq = self._scan_seq
            self._scanned.wait_for(lambda: self._scan_seq != seq, timeout=self.align_s)

    # ---- the scrape ----

    def families(self) -> Iterator[Metric]:
        """Every family that could be built now; one that raises is skipped and logged once."""
        for name, build in self._builders:
            try:
                built = list(build())
            except Exception as e:
                self._family_failed(name, e)
                continue
            if name in self._failed:
                with self._lock:
                    self._failed.pop(name, None)
                self.log.info("metrics_family_recovered", family=name)
            yield from built

    def _family_failed(self, name: str, e: Exception) -> None:
        cause = f"{type(e).__name__}: {e}"[:300]
        with self._lock:
            self.scrape_errors += 1
            seen = self._failed.get(name) == cause
            self._failed[name] = cause
        if not seen:
            self.log.warning("metrics_family_failed", family=name, error=cause)

    def _fresh(self) -> bool:
        d = self.ctl.status.decision
        if d is None:
            return False
        return self.ctl.clock() - d.now_s <= self.stale_after_s

    def _build(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            PREFIX + "build_info",
            "The controller's version and site (always 1)",
            labels=["version", "site"],
        )
        g.add_metric([str(self.ctl.version), self.site.site.name], 1.0)
        return [g]

    def _scan(self) -> Iterable[Metric]:
        st = self.ctl.status
        out: list[Metric] = []
        for stem, value, text in (
            ("scans", st.scans, "Scans completed since start"),
            ("scan_overruns", st.overruns, "Scans that took longer than the period"),
            ("blocked_commands", st.blocked, "Unsafe commands blocked by arbitration"),
        ):
            c = CounterMetricFamily(PREFIX + stem, text)
            c.add_metric([], float(value))
            out.append(c)
        degraded = GaugeMetricFamily(
            PREFIX + "degraded",
            "1 while a runtime fault (journal, decision step) holds: reuse rejected",
        )
        degraded.add_metric([], 1.0 if st.degraded else 0.0)
        fresh = GaugeMetricFamily(
            PREFIX + "scan_fresh",
            "1 when the newest completed scan is recent (see stale_after_seconds)",
        )
        fresh.add_metric([], 1.0 if self._fresh() else 0.0)
        period = GaugeMetricFamily(PREFIX + "scan_period_seconds", "The configured scan period")
        period.add_metric([], float(self.site.scan.period_s))
        stale = GaugeMetricFamily(
            PREFIX + "scan_stale_after_seconds",
            "A scan older than this is not fresh: inputs are then served as not good",
        )
        stale.add_metric([], self.stale_after_s)
        lag = GaugeMetricFamily(
            PREFIX + "event_loop_lag_max_seconds", "Worst event-loop lag seen since start"
        )
        lag.add_metric([], float(st.max_lag_s))
        out += [degraded, fresh, period, stale, lag]
        if st.decision is not None:
            ts = GaugeMetricFamily(
                PREFIX + "last_scan_timestamp_seconds",
                "Wall-clock time (UTC epoch) of the newest completed scan",
            )
            ts.add_metric([], float(st.wall))
            out.append(ts)
        return out

    def _mode(self) -> Iterable[Metric]:
        d = self.ctl.status.decision
        if d is None:
            return []
        g = GaugeMetricFamily(PREFIX + "mode", "1 for the current mode", labels=["mode"])
        for m in Mode:
            g.add_metric([m.value], 1.0 if d.mode is m else 0.0)
        since = GaugeMetricFamily(PREFIX + "mode_seconds", "Time in the current mode")
        since.add_metric([], max(0.0, d.now_s - d.mode_since_s))
        return [g, since]

    def _interlocks(self) -> Iterable[Metric]:
        d = self.ctl.status.decision
        if d is None:
            return []
        out = []
        for stem, ids, text in (
            ("interlock_active", d.active, "1 while the interlock's cause holds"),
            ("interlock_latched", d.latched, "1 while the interlock is latched (needs a reset)"),
            ("interlock_bypassed", d.bypassed, "1 while an engineer's bypass stands"),
        ):
            g = GaugeMetricFamily(PREFIX + stem, text, labels=["rule"])
            for rule in self._rules:
                g.add_metric([rule], 1.0 if rule in ids else 0.0)
            out.append(g)
        return out

    def _alarms(self) -> Iterable[Metric]:
        """Per alarm only those not normal (active, returned unacknowledged, or shelved): a
        site has over a hundred alarms, nearly all normal, and a series for each would make
        every scrape several times dearer (and the scrape shares the CPU with the scan). A
        series that ends is marked stale by Prometheus, so an alert on it resolves. The
        counts per priority are always there, for dashboards."""
        table = self.ctl.core.alarms  # a frozen value: one reference, consistent
        labels = ["alarm", "priority"]
        active = GaugeMetricFamily(
            PREFIX + "alarm_active",
            "1 while the alarm's condition holds (listed: alarms not normal, or shelved)",
            labels=labels,
        )
        acked = GaugeMetricFamily(
            PREFIX + "alarm_acknowledged",
            "1 when no acknowledgement is pending (active-acknowledged); 0 for "
            "active-unacknowledged and returned-unacknowledged",
            labels=labels,
        )
        shelved = GaugeMetricFamily(
            PREFIX + "alarm_shelved", "1 while the alarm is shelved", labels=labels
        )
        prios = [p.name.lower() for p in Priority]
        n_active = dict.fromkeys(prios, 0)
        n_unacked = dict.fromkeys(prios, 0)
        n_shelved = dict.fromkeys(prios, 0)
        for a in table.alarms.values():
            if a.state is AlarmState.NORMAL and not a.shelved:
                continue
            prio = a.priority.name.lower()
            lv = [a.id, prio]
            pending = a.state in (AlarmState.UNACK, AlarmState.RTN_UNACK)
            active.add_metric(lv, 1.0 if a.active else 0.0)
            acked.add_metric(lv, 0.0 if pending else 1.0)
            shelved.add_metric(lv, 1.0 if a.shelved else 0.0)
            n_active[prio] += a.active
            n_unacked[prio] += pending
            n_shelved[prio] += a.shelved
        out: list[Metric] = [active, acked, shelved]
        for stem, counts, text in (
            ("alarms_active", n_active, "Alarms whose condition holds, by priority"),
            ("alarms_unacknowledged", n_unacked, "Alarms waiting for an acknowledgement"),
            ("alarms_shelved", n_shelved, "Alarms shelved, by priority"),
        ):
            g = GaugeMetricFamily(PREFIX + stem, text, labels=["priority"])
            for prio in prios:
                g.add_metric([prio], float(counts[prio]))
            out.append(g)
        return out

    def _inputs_families(self) -> Iterable[Metric]:
        st = self.ctl.status
        d = st.decision
        if d is None:
            return []
        image, forces = st.image, self.ctl.core.operator.input_forces
        fresh = self._fresh()
        invalid = d.invalid
        value = GaugeMetricFamily(
            PREFIX + "input_value",
            "Every input as read (an engineer's input force: its forced value); NaN when "
            "there is no number",
            labels=["tag", "unit"],
        )
        good = GaugeMetricFamily(
            PREFIX + "input_good",
            "1 when the input's quality is good (read, in range, fresh); 0 otherwise "
            "(stale, out of range, comms lost, bad reply, forced)",
            labels=["tag"],
        )
        valid = GaugeMetricFamily(
            PREFIX + "input_valid",
            "1 when validation trusted the input in the newest scan",
            labels=["tag"],
        )
        for name in self._inputs:
            forced = forces.get(name)
            if forced is not None:
                v, q = forced.value, Quality.FORCED
            else:
                s = image[name]
                v, q = s.value, s.quality
            x = _value(v)
            value.add_metric([name, self._units.get(name, "")], x)
            ok = q is Quality.GOOD and fresh and not math.isnan(x)
            good.add_metric([name], 1.0 if ok else 0.0)
            valid.add_metric([name], 0.0 if name in invalid else 1.0)
        return [value, good, valid]

    def _outputs(self) -> Iterable[Metric]:
        d = self.ctl.status.decision
        if d is None:
            return []
        value = GaugeMetricFamily(
            PREFIX + "output_value",
            "Every output as decided in the newest scan, with the arbitration level that won",
            labels=["tag", "unit", "level"],
        )
        level = GaugeMetricFamily(
            PREFIX + "output_level",
            "The winning arbitration level as a number: "
            + ", ".join(f"{lv.value} {lv.name.lower()}" for lv in Level),
            labels=["tag"],
        )
        for name, o in d.outputs.items():
            value.add_metric(
                [name, self._units.get(name, ""), o.level.name.lower()], _value(o.value)
            )
            level.add_metric([name], float(int(o.level)))
        failed = GaugeMetricFamily(
            PREFIX + "outputs_write_failed",
            "Outputs the PLC did not acknowledge in the newest write pass",
        )
        failed.add_metric([], float(len(self.ctl.status.write_failed)))
        return [value, level, failed]

    def _link(self) -> Iterable[Metric]:
        h = self.ctl.status.health
        up = GaugeMetricFamily(PREFIX + "plc_link_up", "1 while the PLC link is OK")
        up.add_metric([], 1.0 if h.state is LinkState.OK else 0.0)
        state = GaugeMetricFamily(
            PREFIX + "plc_link_state", "1 for the PLC link's current state", labels=["state"]
        )
        for s in LINK_STATES:
            state.add_metric([s], 1.0 if h.state.value == s else 0.0)
        requests = CounterMetricFamily(PREFIX + "plc_requests", "PLC requests sent since start")
        requests.add_metric([], float(h.requests))
        failures = CounterMetricFamily(PREFIX + "plc_failures", "PLC requests that failed")
        failures.add_metric([], float(h.failures))
        consecutive = GaugeMetricFamily(
            PREFIX + "plc_consecutive_failures", "PLC requests failed in a row, now"
        )
        consecutive.add_metric([], float(h.consecutive_failures))
        return [up, state, requests, failures, consecutive]

    def _energy(self) -> Iterable[Metric]:
        view_fn = getattr(self.ctl, "meter_view", None)
        view = view_fn() if view_fn is not None else None
        if not isinstance(view, Mapping):
            return []  # metering off: no energy families (absent, not zero)
        totals = view.get("totals")
        out: list[Metric] = []
        if isinstance(totals, Mapping):
            for stem, key, text in ENERGY_COUNTERS:
                x = _num(totals.get(key))
                if x is None:
                    continue
                c = CounterMetricFamily(PREFIX + stem, text + ", since the store was created")
                c.add_metric([], x)
                out.append(c)
            stored = _num(totals.get("stored_kwh"))
            if stored is not None:
                g = GaugeMetricFamily(
                    PREFIX + "heat_stored_kwh",
                    "Net change of the buffer tank's content since the store was created (kWh)",
                )
                g.add_metric([], stored)
                out.append(g)
            class_s = totals.get("class_s")
            if isinstance(class_s, Mapping):
                c = CounterMetricFamily(
                    PREFIX + "metering_class_seconds",
                    "Metered time per availability class, since the store was created",
                    labels=["class"],
                )
                for cls, s in class_s.items():
                    x = _num(s)
                    if x is not None:
                        c.add_metric([str(cls)], x)
                out.append(c)
        avail = GaugeMetricFamily(
            PREFIX + "availability_percent",
            "Heat-loop availability (docs/metering.md), lifetime and this UTC day",
            labels=["period"],
        )
        for period, key in (("lifetime", "availability_pct"), ("today", "availability_today_pct")):
            x = _num(view.get(key))
            if x is not None:  # None: no time yet in which the customer wanted heat
                avail.add_metric([period], x)
        out.append(avail)
        reuse = _num(view.get("reuse_fraction"))
        if reuse is not None:
            g = GaugeMetricFamily(
                PREFIX + "reuse_fraction",
                "Heat delivered / IT energy, lifetime (0 to 1)",
            )
            g.add_metric([], reuse)
            out.append(g)
        meter = _num(view.get("meter_kwh"))
        if meter is not None:
            g = GaugeMetricFamily(
                PREFIX + "meter_energy_kwh", "The heat meter's last accepted totaliser reading"
            )
            g.add_metric([], meter)
            out.append(g)
        open_row = view.get("open_interruption")
        cls = open_row.get("cls") if isinstance(open_row, Mapping) else None
        g = GaugeMetricFamily(
            PREFIX + "interruption_open",
            "1 for the class of the interruption in progress (none: all 0)",
            labels=["class"],
        )
        for c_name in INTERRUPTION_CLASSES:
            g.add_metric([c_name], 1.0 if cls == c_name else 0.0)
        out.append(g)
        return out


def metric_names(m: Metrics) -> set[str]:
    """Every sample name the endpoint serves now, and the gauges it would list if anything
    stood (per-alarm families are empty while every alarm is normal); the dashboard test uses
    it."""
    names: set[str] = set()
    for fam in m.registry.collect():
        names.update(s.name for s in fam.samples)
        if fam.type == "gauge":
            names.add(fam.name)
    return names
