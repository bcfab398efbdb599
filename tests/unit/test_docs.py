"""The generated parts of the docs match the tables in code (run `make docs` to refresh)."""

from __future__ import annotations

from controller.docgen import DOCS, blocks, render


def test_operation_md_is_up_to_date() -> None:
    text = (DOCS / "operation.md").read_text(encoding="utf-8")
    assert render(text, blocks()) == text, "docs/operation.md is stale: run `make docs`"
    for body in blocks().values():
        assert body in text
