"""Progress on a terminal: totals and ETA for every input kind (CSV, Bundle, ndjson folder)."""
from __future__ import annotations

from pathlib import Path

from helpers import EXAMPLE_CSV, invoke

from ruxo_fhir.logs import ProgressLine, progress_text
from ruxo_fhir.progress import count_items


def test_text_has_total_percent_rate_and_eta() -> None:
    assert progress_text("pushed", 1200, 7400, 30.0) == "pushed 1200/7400 (16 %), 40/s, ETA 0:02:35"
    assert progress_text("pushed", 74, 74, 2.0) == "pushed 74/74 (100 %), 0:00:02"
    assert progress_text("pulled", 10, None, 2.0) == "pulled 10, 5/s"


def test_every_input_kind_has_a_total(tmp_path: Path) -> None:
    bundle, folder = tmp_path / "b.json", tmp_path / "nd"
    assert invoke("import", EXAMPLE_CSV, "-o", bundle).exit_code == 0
    assert invoke("import", EXAMPLE_CSV, "-o", folder, "--format", "ndjson").exit_code == 0
    assert count_items(EXAMPLE_CSV) == 12  # rows
    assert count_items(bundle) == 74  # resources
    assert count_items(folder) == 74
    assert count_items(next(folder.glob("Patient.ndjson"))) == 12
    assert count_items(tmp_path / "missing.json") is None


def test_the_line_redraws_with_the_eta_and_ends_with_a_newline() -> None:
    now = [0.0]
    out: list[str] = []
    line = ProgressLine("pushed", out.append, 100, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 1.0
        line(10)
    assert out[-1].startswith("\rpushed 40/100 (40 %), 10/s, ETA 0:00:06")
    line(60)
    line.close()
    assert "100/100 (100 %)" in out[-2] and out[-1] == "\n"
