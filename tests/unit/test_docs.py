"""The generated parts of the docs match the tables in code (run `make docs` to refresh)."""

from __future__ import annotations

import pytest

from controller.docgen import DOCS, GENERATED_FILES, blocks, render


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_docs_are_up_to_date(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    assert render(text, blocks()) == text, f"docs/{name} is stale: run `make docs`"
    assert "<!-- generated:" in text


def test_site_file_doc_lists_every_bound_and_cross_check() -> None:
    from controller.sitecheck import RULES as SAFE_RULES
    from plc_io.site import CROSS_RULES

    text = (DOCS / "site-file.md").read_text(encoding="utf-8")
    for rule in (*CROSS_RULES, *SAFE_RULES):
        assert f"- {rule}" in text
    assert "| `stale_after_s` | `2.0` | gt 0, le 60 |" in text  # was unbounded
    assert "| `fail_state` |" in text and "| `frozen_s` | `None` | gt 0, le 86400 |" in text
    assert "finite (`inf` and `nan` are refused)" in text


def test_the_safety_argument_names_only_tests_that_exist() -> None:
    """docs/safety.md maps hazards to tests; a renamed or deleted test must not leave it lying."""
    import re

    tests = DOCS.parent / "tests"
    text = (DOCS / "safety.md").read_text(encoding="utf-8")
    current, missing, named = None, [], 0
    for token in re.findall(r"`([^`]+)`", text):
        m = re.match(r"((?:unit|hil)/\w+\.py)(?:::(test_\w+))?", token) or re.match(
            r"::(test_\w+)", token
        )
        if m is None:
            continue
        if token.startswith("::"):
            name = m.group(1)
        else:
            current, name = tests / m.group(1), m.group(2)
            if not current.exists():
                missing.append(str(current))
                continue
        if name and current is not None:
            named += 1
            if not re.search(rf"def {name}\b", current.read_text(encoding="utf-8")):
                missing.append(f"{current.name}::{name}")
    assert named > 50 and not missing, missing
