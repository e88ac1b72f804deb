"""The run report in a real headless Chromium: it loads cleanly and shows everything.

Chromium comes from the Debian packages (``.ci/run`` installs it). Without it the test skips
with the reason shown; under ``CI=true`` it fails instead, so CI never skips it silently.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from chromium import Chromium, find_chromium  # noqa: E402
from verdict_program import fitted  # noqa: E402

CHARTS = [
    "score-per-step",
    "score-per-epoch",
    "cost-per-epoch",
    "tokens-per-epoch",
    "requests-per-epoch",
]


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        reason = "no Chromium on PATH (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the browser test must run in CI, but there is {reason}")
        pytest.skip(reason)
    with Chromium.launch(executable, width=1280, height=1400) as running:
        yield running


def shown_pixels(png: bytes) -> tuple[int, float]:
    """Distinct colours in a screenshot and the share of pixels unlike its most common one."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24)
    background = max(colours)[0]
    total = image.width * image.height
    return len(colours), 1 - background / total


def test_report_loads_without_errors_and_shows_every_chart_and_parameter(tmp_path, browser):
    trainer, _ = fitted(tmp_path / "run")
    page = browser.open(trainer.report_path.resolve().as_uri())
    assert page.errors == []
    rendered = page.evaluate(
        """(() => {
        const box = (el) => el.getBoundingClientRect();
        const charts = [...document.querySelectorAll("figure.chart")].map((f) => ({
          id: f.dataset.chart,
          marks: f.querySelectorAll("svg polyline, svg rect.bar, svg circle").length,
          width: box(f.querySelector("svg")).width,
          height: box(f.querySelector("svg")).height,
        }));
        const params = [...document.querySelectorAll("section.parameter")].map((s) => ({
          name: s.dataset.parameter,
          height: box(s).height,
          steps: s.querySelectorAll(".step").length,
          diffs: s.querySelectorAll(".diff ins").length,
        }));
        const graph = document.querySelector("#graph svg.afnio-graph");
        return {title: document.title, charts, params,
                graphBoxes: graph ? graph.querySelectorAll("g.node").length : 0,
                graphWidth: graph ? box(graph).width : 0};
      })()"""
    )
    assert rendered["title"] == "afnio run: run"
    assert [chart["id"] for chart in rendered["charts"]] == CHARTS
    for chart in rendered["charts"]:
        assert chart["width"] > 200 and chart["height"] > 80 and chart["marks"] > 0, chart
    assert [param["name"] for param in rendered["params"]] == ["prefix", "style"]
    assert all(param["height"] > 50 and param["steps"] == 8 for param in rendered["params"])
    assert rendered["params"][0]["diffs"] >= 9  # initial→final plus one per accepted step
    assert rendered["graphBoxes"] >= 4 and rendered["graphWidth"] > 100

    colours, drawn = shown_pixels(page.screenshot_png())
    assert colours > 50 and drawn > 0.05, (colours, drawn)

    # The buttons open every epoch of a parameter (the page's own script works).
    opened = page.evaluate(
        """(() => {
        document.querySelector('section.parameter button[data-action="expand"]').click();
        return [...document.querySelectorAll('section.parameter')[0]
                .querySelectorAll('details.epoch')].every((d) => d.open);
      })()"""
    )
    assert opened is True and page.errors == []


def test_a_broken_page_is_noticed(tmp_path, browser):
    """The harness itself: a script error and a blocked network load are reported."""
    page_path = tmp_path / "broken.html"
    page_path.write_text(
        '<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="default-src '
        "'none'; script-src 'unsafe-inline'\"><body style=\"background:#fff\">"
        '<img src="https://example.invalid/x.png"><script>undefinedFunction();</script>'
    )
    page = browser.open(page_path.resolve().as_uri())
    assert any("undefinedFunction" in error for error in page.errors), page.errors
    assert any("Content Security Policy" in error for error in page.errors), page.errors
    colours, drawn = shown_pixels(page.screenshot_png())
    assert drawn < 0.01, (colours, drawn)  # a blank page (but for a broken-image icon) fails
