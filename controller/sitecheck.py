"""Checks of a site file that need the controller's own rules: the safe values must cool.

`plc_io.site` validates the file on its own terms (types, bounds, cross-field rules); it may not
import the controller. What only the controller knows lives here: the safe values of DESIGN §7
are what the PLC watchdog falls back to and what `heatloop run` writes at start-up and on
shutdown, so they must pass the arbitration guard with every pump's run feedback unknown (a
watchdog trip is exactly when nothing is known), and must be the contract's safe state.

Every command that starts anything (`check`, `run`, `study`, `sim serve`, `demo`) loads its site
through `load_checked_site`, so a site whose safe values would leave the servers without cooling
never starts.
"""

from __future__ import annotations

from pathlib import Path

from controller.arbitration import PUMP_SPEED_FLOOR_PCT, guarded_safe_outputs
from interlocks.rules import RULES as RULES_TABLE
from plc_io.site import Problem, Site, SiteError, load_site
from plc_io.tags import Value

# DESIGN §7: the safe state. (output, required value, why)
_CONTRACT: tuple[tuple[str, Value, str], ...] = (
    ("reuse_valve_cmd", 0.0, "all flow through the bypass"),
    ("drycooler_fan_cmd", 100.0, "dry cooler fans at full speed"),
    ("primary_pump_a_cmd", True, "primary pumps running"),
    ("primary_pump_b_cmd", True, "primary pumps running"),
    ("secondary_pump_cmd", False, "secondary pump off"),
    ("customer_isolation_cmd", False, "customer isolation valve closed"),
    ("reuse_isolation_cmd", False, "reuse isolation valve closed"),
)


def _shown(v: Value) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{float(v):g}"


# The safe-value rules as docs/site-file.md states them (generated from here).
RULES = (
    "the arbitration guard, run over the safe values with every pump's run feedback unknown, "
    "overrides none of them (a primary pump runs; a heat sink remains; the primary pump speed "
    f"is at least min(`control.primary_pump_speed_pct`, {PUMP_SPEED_FLOOR_PCT:g}) %)",
    "DESIGN §7: "
    + ", ".join(f"`{name}` = {_shown(want)}" for name, want, _ in _CONTRACT)
    + "; the rule broken is named in the refusal",
)


def check_site(site: Site) -> list[Problem]:
    """Every reason the site's safe values would not keep the servers cooled (empty: fine)."""
    safe = site.safe_outputs()
    # First the guard, as a scan would run it over the safe values with no pump feedback known
    # (a watchdog trip is exactly when nothing is known): its refusal names the rule broken.
    out, blocked = guarded_safe_outputs(
        safe,
        min_fan_pct=site.control.fan_min_pct,
        design_speed_pct=site.control.primary_pump_speed_pct,
    )
    probs: list[Problem] = []
    for item in blocked:
        name = item.partition("=")[0]
        if name in out:
            probs.append(
                Problem(
                    f"tags.{name}.safe",
                    safe.get(name),
                    f"a value the arbitration guard would not override ({out[name].why})",
                )
            )
    # Then the contract of DESIGN §7, which is stricter than the guard.
    for name, want, why in _CONTRACT:
        if name not in safe:
            continue  # a missing output is already refused by the site file's own checks
        have = safe[name]
        if isinstance(want, bool):
            ok = have is want
        else:
            ok = not isinstance(have, bool) and float(have) == want
        if not ok:
            probs.append(
                Problem(f"tags.{name}.safe", have, f"{_shown(want)} (DESIGN §7 safe state: {why})")
            )
    # The proof-test schedule names steps of the commissioning procedure: rules and the watchdog.
    steps = [r.id for r in RULES_TABLE] + ["WD"]
    for step in site.commissioning.proof_test_days_by_rule:
        if step not in steps:
            probs.append(
                Problem(
                    f"commissioning.proof_test_days_by_rule.{step[:40]}",
                    step,
                    f"a rule id or WD ({', '.join(steps)})",
                )
            )
    return _dedupe(probs)


def _dedupe(probs: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in probs:
        if p.path not in seen:  # one line per tag: the first names the rule broken
            seen.add(p.path)
            out.append(p)
    return out


def checked(site: Site, source: str) -> Site:
    """`site`, or SiteError if its safe values would not keep the servers cooled."""
    probs = check_site(site)
    if probs:
        raise SiteError(source, probs)
    return site


def load_checked_site(path: str | Path) -> Site:
    """Load and validate a site file, then refuse safe values that would stop cooling."""
    return checked(load_site(path), str(path))
