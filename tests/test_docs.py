"""Every Python snippet in the docs runs as written (one namespace per page, in a temp dir)."""

import re
from pathlib import Path

import pytest

import afnio

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(page for page in DOCS.rglob("*.md") if "```python" in page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", page.read_text(), re.S | re.M)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    previous = afnio.get_backward_model_client()
    try:
        for index, block in enumerate(blocks):
            exec(compile(block, f"{page.name} block {index}", "exec"), namespace)
    finally:
        afnio.set_backward_model_client(previous)
