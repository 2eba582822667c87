"""The HTML report fits a 1400-px browser window: no table is cut, none needs a horizontal scrollbar.

Rendered in headless Chromium (skipped where there is none), like ``make report-screenshot``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from results.fabricate import class_record, write_run

from fimlora.reporting import build_report

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the report: records every table wider than its box, and whether the page scrolls.
PROBE = """<script>
const cut = [...document.querySelectorAll('.table-wrap')]
  .filter(w => w.scrollWidth > w.clientWidth + 1)
  .map(w => (w.querySelector('caption') || {}).textContent || '?');
document.body.setAttribute('data-probe', JSON.stringify({
  cut: cut, page: document.documentElement.scrollWidth, window: window.innerWidth}));
</script>"""


def overflowing_tables(html: str, tmp_path, width: int = 1400) -> dict:
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={width},3000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        # Without a session bus Chromium waits ~25 s for D-Bus before it renders anything.
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"},
    ).stdout
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, dom[-500:]
    return json.loads(match.group(1).replace("&quot;", '"'))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the report")
def test_every_table_fits_a_1400_px_window(tmp_path):
    root = tmp_path / "runs"
    labels = ["negative", "neutral", "positive"]
    # Three classes with long names, one method that never predicts "neutral", and warnings in the
    # note columns: the widest tables the report makes (results over seeds: 12 columns; per class).
    for seed in range(3):
        for method, matrix in (
            ("lora", [[30, 5, 5], [6, 20, 4], [3, 2, 25]]),
            ("fim-lora", [[35, 0, 5], [20, 0, 10], [5, 0, 25]]),
        ):
            write_run(
                root / "tweets" / f"s{seed}" / method,
                method=method,
                seed=seed,
                dataset="three-class-tweets-with-a-long-name.csv",
                accuracy=0.6,
                classes=class_record(matrix, labels),
            )
    files = build_report(root, tmp_path / "report", n_resamples=10_000)
    html = files.html.read_text(encoding="utf-8")
    assert "never predicts neutral (3 of 3 runs)" in html
    probe = overflowing_tables(html, tmp_path)
    assert probe["cut"] == [], probe
    assert probe["page"] <= probe["window"], probe


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the report")
def test_the_probe_sees_a_table_that_does_not_fit(tmp_path):
    """The check above can fail: an unbreakable 3000-px cell is reported as cut."""
    html = (
        "<html><body><main style='max-width:1280px'><div class='table-wrap' style='overflow-x:auto'>"
        f"<table><caption>wide</caption><tr><td style='white-space:nowrap'>{'x' * 400}</td></tr></table>"
        "</div></main></body></html>"
    )
    assert overflowing_tables(html, tmp_path)["cut"] == ["wide"]
