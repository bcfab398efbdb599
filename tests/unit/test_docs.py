"""The generated parts of the docs match the tables in code (run `make docs` to refresh)."""

from __future__ import annotations

import pytest

from controller.docgen import DOCS, GENERATED_FILES, blocks, render


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_docs_are_up_to_date(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    assert render(text, blocks()) == text, f"docs/{name} is stale: run `make docs`"
    assert "<!-- generated:" in text
