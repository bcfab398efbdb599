"""Generated parts of the docs: the mode diagram and the cause-and-effect matrix.

Each lives between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` in a Markdown file
(in docs/bms.md: `<!-- generated: NAME -->` and `<!-- end generated -->`);
`python -m controller.docgen` rewrites them from the tables in code, and a test fails when the
docs and the tables disagree.
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from controller.alarms import catalogue, catalogue_markdown
from controller.authority import permission_table_markdown
from controller.bms_space import points_markdown, space
from controller.modes import TRANSITIONS, mermaid_diagram
from controller.supervisor import SupervisorConfig
from interlocks.rules import RULES, conditions, effect_cell, matrix_columns
from plc_io.site import Site, demo_site

DOCS = Path(__file__).resolve().parent.parent / "docs"


def matrix_markdown(site: Site) -> str:
    """The C&E matrix from the rule table's declared effects, reset conditions and merge roles."""
    th = SupervisorConfig.from_site(site).thresholds
    outs = matrix_columns(tuple(t.name for t in site.outputs))
    marks = {c.name: chr(ord("a") + i) for i, c in enumerate(conditions())}
    head = ["id", "hazard", "cause", "delay", "latch", "reset", "bypass", "response", "wins on"]
    head += outs
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in RULES:
        by_out = {e.output: e for e in r.forces}
        limit_h = min(r.max_bypass_s, th.max_bypass_s) / 3600
        rows.append(
            "| "
            + " | ".join(
                [
                    r.id,
                    r.hazard,
                    r.cause_text,
                    f"{r.delay_s:g} s",
                    "yes" if r.latching else "no",
                    r.reset.text,
                    f"≤ {limit_h:g} h" if r.bypassable else "never",
                    f"{r.response_s:g} s",
                    "its circuit: " + ", ".join(r.protects) if r.protects else "more cooling",
                    *(effect_cell(by_out.get(o), th, marks) for o in outs),
                ]
            )
            + " |"
        )
    rows.append("")
    for c in conditions():
        rows.append(f"[{marks[c.name]}] while {c.text}.  ")
    rows[-1] = rows[-1].rstrip()
    return "\n".join(rows)


def transitions_markdown() -> str:
    rows = ["| trigger | from | to | guard | why |", "|---|---|---|---|---|"]
    for t in TRANSITIONS:
        src = ", ".join(s.value for s in t.sources)
        rows.append(f"| `{t.trigger}` | {src} | {t.dest.value} | `{t.guard}` | {t.why} |")
    return "\n".join(rows)


def _bounds(f: Any) -> str:
    """A field's bounds as the docs print them: numeric limits, string lengths, literal choices."""
    parts = [
        f"{k} {getattr(m, k)}"
        for m in f.metadata
        for k in ("gt", "ge", "lt", "le", "min_length", "max_length")
        if getattr(m, k, None) is not None
    ]
    if get_origin(f.annotation) is Literal:
        parts.append("one of " + ", ".join(repr(a) for a in get_args(f.annotation)))
    return ", ".join(parts)


def _default(f: Any) -> str:
    if f.is_required():
        return "required"
    if isinstance(f.default, BaseModel):
        return "(a table)"
    return f"`{f.default!r}`"


def site_keys_markdown() -> str:
    """Every key of every site-file section with its default and bounds, from the models."""
    from plc_io.site import SECTIONS

    out = [
        "Every number is finite (`inf` and `nan` are refused) and strictly typed: `true` is not "
        'a number, `1` is not `true`, `"5"` is neither; a whole number is accepted where a '
        "decimal is expected.",
        "",
    ]
    tables: list[tuple[str, type[BaseModel]]] = list(SECTIONS.items())
    for section, model in SECTIONS.items():  # nested tables such as [plc.opcua]
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                tables.append((f"{section}.{name}", f.annotation))
    for section, model in tables:
        out += [f"### [{section}]", "", "| key | default | bounds |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            out.append(f"| `{name}` | {_default(f)} | {_bounds(f)} |")
        out.append("")
    return "\n".join(out).rstrip()


def tag_keys_markdown() -> str:
    """The keys of a `[tags.<name>]` table and of its `modbus` table, with their bounds."""
    from plc_io.tags import MAX_ENGINEERING, ModbusPoint, Tag

    out = []
    for title, model in (("[tags.<name>]", Tag), ("[tags.<name>].modbus", ModbusPoint)):
        out += [f"### {title}", "", "| key | default | bounds |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            if name == "name":
                continue  # the table's own name
            bounds = _bounds(f)
            if name == "range":
                bounds = f"two finite numbers, low < high, each within ±{MAX_ENGINEERING:g}"
            elif isinstance(f.annotation, type) and issubclass(f.annotation, Enum):
                bounds = "one of " + ", ".join(repr(e.value) for e in f.annotation)
            out.append(f"| `{name}` | {_default(f)} | {bounds} |")
        out.append("")
    return "\n".join(out).rstrip()


def site_rules_markdown() -> str:
    """The cross-field rules and the safe-value rules, as `heatloop check` applies them."""
    from controller.sitecheck import RULES as SAFE_RULES
    from plc_io.site import CROSS_RULES

    out = ["Settings that contradict each other (each refusal names both fields):", ""]
    out += [f"- {r}" for r in CROSS_RULES]
    out += ["", "Safe values (checked by `controller/sitecheck.py`):", ""]
    out += [f"- {r}" for r in SAFE_RULES]
    return "\n".join(out)


def procedure_markdown(site: Site) -> str:
    """The commissioning steps (docs/commissioning.md), from the same plan the tool runs."""
    from controller.commission_plan import plan

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def sim(step: Any) -> str:
        if not step.sim:
            return "—"
        acts = []
        for a in step.sim:
            what = f"{a.name} {a.target}".strip()
            if a.relative_to:
                what += f" until it reads {a.value:g}"
            elif a.name != "sensor_fail":
                what += f" = {a.value:g}"
            acts.append(what + (f" (ramped, {a.ramp_k_per_s:g}/s)" if a.ramp_k_per_s else ""))
        return "; ".join(acts)

    def forced(step: Any) -> str:
        if step.forced:
            return "; ".join(f"force {f.tag} = {f.value}" for f in step.forced)
        return "not testable: " + step.why_not.get("forced", "no input force applies")

    cols = ("step", "hazard", "required", "sim", "forced", "in the field", "expected at the PLC")
    rows = ["| " + " | ".join((*cols, "confirmed by")) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in plan(site):
        if s.kind == "watchdog":
            sim_text = forced_text = field_text = "heartbeat held through the command channel"
        else:
            sim_text, forced_text, field_text = sim(s), forced(s), s.physical or "—"
        expects = "; ".join(e.text for e in s.expects)
        feedback = "; ".join(f"{f.tag} {f.text} within {f.within_s:g} s" for f in s.feedback)
        rows.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    s.id,
                    s.hazard,
                    f"{s.required_s:g} s",
                    sim_text,
                    forced_text,
                    field_text,
                    expects,
                    feedback or "—",
                )
            )
            + " |"
        )
    return "\n".join(rows)


def blocks(site: Site | None = None) -> dict[str, str]:
    site = site or demo_site()
    return {
        "mode-diagram": "```mermaid\n" + mermaid_diagram() + "\n```",
        "transitions": transitions_markdown(),
        "ce-matrix": matrix_markdown(site),
        "site-keys": site_keys_markdown(),
        "tag-keys": tag_keys_markdown(),
        "site-rules": site_rules_markdown(),
        "permissions": permission_table_markdown(),
        "alarms": catalogue_markdown(catalogue(RULES, site.inputs, site.outputs)),
        "bms-points": points_markdown(space(site)).rstrip("\n"),
        "commission-steps": procedure_markdown(site),
    }


def render(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pat = re.compile(rf"(<!-- generated:{name} -->).*?(<!-- /generated:{name} -->)", re.DOTALL)
        text = pat.sub(lambda m, b=body: f"{m.group(1)}\n{b}\n{m.group(2)}", text)
        # docs/bms.md's form: `<!-- generated: NAME -->` ... `<!-- end generated -->`
        pat = re.compile(rf"(<!-- generated: {name} -->).*?(<!-- end generated -->)", re.DOTALL)
        text = pat.sub(lambda m, b=body: f"{m.group(1)}\n{b}\n{m.group(2)}", text)
    return text


GENERATED_FILES = ("operation.md", "site-file.md", "bms.md", "commissioning.md")


def main() -> int:
    for name in GENERATED_FILES:
        path = DOCS / name
        path.write_text(render(path.read_text(encoding="utf-8"), blocks()), encoding="utf-8")
        print(f"regenerated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
