"""The HTML report: one self-contained page, rendered by a real browser (headless Chromium) and looked at.

Chromium comes from the distribution (Debian: `apt-get install -y chromium`); .ci/run installs it.
Off CI a machine without it skips these tests with one line; with CI=true they fail instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import pytest
from helpers import CANONICAL, EXAMPLE_CSV, invoke, read_csv_rows, write_cases

from ruxo_fhir.importer import source_resources
from ruxo_fhir.mapping import load_mapping
from ruxo_fhir.outcomes import compute_outcomes

# The plot's bar colours and the fewest pixels of each a rendered page must show (6 complete bars,
# 5 partial, 1 short none bar; the page's coloured text alone gives < 1,000 of any of them)
BAR_COLOURS = {"complete": ((0x1B, 0x78, 0x37), 20_000), "partial": ((0xE0, 0x82, 0x14), 10_000),
               "none": ((0xB2, 0x18, 0x2B), 1_000)}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("headless Chromium is missing on CI (.ci/run installs it: apt-get install -y chromium)")
    pytest.skip("needs headless Chromium: apt-get install -y chromium")


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    result = invoke("outcomes", EXAMPLE_CSV, "--format", "html", "-o", out)
    assert result.exit_code == 0, str(result)
    return out


def test_the_page_is_self_contained(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # nothing fetched from anywhere: no external src/href, no @import, the plot inline
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)
    assert "@import" not in html and "url(" not in html
    assert html.count('src="data:image/png;base64,') == 1


def rendered_text(report: Path, tmp_path: Path) -> str:
    proc = browse(report, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", proc.stdout))


def test_chromium_renders_tables_rate_rule_and_warnings(report: Path, tmp_path: Path) -> None:
    text = rendered_text(report, tmp_path)
    assert "Table I: indications" in text and "Table II: outcome under treatment" in text
    assert "chronic cutaneous lupus 2" in text and "dermatomyositis 4" in text and "Total 12" in text
    # Table II grouped as the seed: complete 6 | partial 5 or none 1, like cases on one line with (n=k)
    assert "Complete remission (n=6)" in text and "Partial remission (n=5) or none (n=1)" in text
    assert "Dermatomyositis (face+hands) after 4 months (n=3)" in text
    assert "after 4 months (n=1) — no response" in text
    assert "11/12 = 91.7 % (95 % CI 61.5–99.8 %)" in text
    assert "ruxo-response-1.0" in text
    assert "Data-quality warnings None." in text


def test_the_screenshot_shows_the_page_and_the_plot(report: Path, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    shot = tmp_path / "shot.png"
    proc = browse(report, tmp_path, "--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    import numpy as np  # matplotlib's own dependency

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    pixels = np.asarray(image, dtype=np.int16).reshape(-1, 3)
    white = int(np.all(pixels == 255, axis=1).sum())
    assert white < 0.97 * len(pixels), "blank page"
    assert len(np.unique(pixels[::7], axis=0)) > 50  # text, tables and a plot: many colours
    for name, (rgb, fewest) in BAR_COLOURS.items():
        near = int(np.all(np.abs(pixels - np.array(rgb)) <= 6, axis=1).sum())
        assert near > fewest, f"the {name} bars of the plot are not on the page ({near} pixels)"


def test_warnings_reach_the_page(tmp_path: Path) -> None:
    rows = read_csv_rows(EXAMPLE_CSV)
    for r in rows:
        r["improvement_percent"] = r.pop("improvement_pct")
    src = write_cases(tmp_path / "renamed.csv", rows,
                      columns=["improvement_percent" if c == "improvement_pct" else c for c in CANONICAL])
    out = tmp_path / "r.html"
    assert invoke("outcomes", src, "--format", "html", "-o", out).exit_code == 0
    text = rendered_text(out, tmp_path)
    assert "10 of 12 case(s) not evaluable" in text
    assert "Not evaluable (n=10)" in text
    # said next to the rate, not only at the bottom of the page
    assert text.index("10 of 12 case(s) not evaluable") < text.index("Table I")


def test_the_plot_labels_never_overlap_and_the_ci_has_one_decimal() -> None:
    mapping = load_mapping()
    result = compute_outcomes(source_resources(EXAMPLE_CSV, mapping), mapping)
    from ruxo_fhir.report import figure

    fig, labels = figure(result)
    try:
        renderer = fig.canvas.get_renderer()
        assert len(labels) == len(result.by_group) == 8
        boxes = [lab.get_window_extent(renderer) for lab in labels]
        overlapping = [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in combinations(zip(labels, boxes), 2)
                       if ba.overlaps(bb)]
        assert overlapping == []
        assert "95 % CI 61.5–99.8 %" in fig.axes[0].get_title()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_without_chromium_ci_fails_and_a_workstation_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        chromium()
