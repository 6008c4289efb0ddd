"""Pull through paging as real servers page: opaque `_getpages` links (HAPI), overlapping pages,
a bounded page count. Against the real engine; the output is compared with what was pushed.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from engines import both_engines_fixture, medplum_only
from fhirserver import TestFhirServer
from test_sync_e2e import EXAMPLE_CSV, bundle_resources, cli, import_bundle, keys

pytestmark = pytest.mark.e2e
fhir_server = both_engines_fixture()  # Medplum and HAPI (whose next links are opaque _getpages)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def pushed(fhir_server: TestFhirServer, tmp_path: Path, state: Path) -> set[str]:
    bundle = import_bundle(EXAMPLE_CSV, tmp_path / "example.json", state)
    run = cli("push", bundle, "--server", fhir_server.base_url, state=state)
    assert run.exit_code == 0, run
    return keys(bundle_resources(bundle))


def test_pull_small_pages_each_resource_once(
    fhir_server: TestFhirServer, pushed: set[str], tmp_path: Path, state: Path
) -> None:
    """Small pages through whatever links the engine gives (HAPI: opaque `_getpages`)."""
    out = tmp_path / "pulled.json"
    before = fhir_server.stats()["reads"]
    run = cli("pull", "--server", fhir_server.base_url, "-o", out, "--page-size", "4", state=state)
    assert run.exit_code == 0, run
    counted = Counter(f"{r['resourceType']}/{r['id']}" for r in bundle_resources(out))
    assert max(counted.values()) == 1 and set(counted) == pushed
    assert fhir_server.stats()["reads"] - before > len(pushed) // 4  # it really paged


@medplum_only  # paging / page_overlap: front switches (pages that overlap on purpose)
@pytest.mark.parametrize("paging", ["cached", "offset"])
def test_pull_overlapping_pages_each_resource_once(
    fhir_server: TestFhirServer, pushed: set[str], tmp_path: Path, state: Path, paging: str
) -> None:
    reads = {}
    for overlap in (0, 2):
        fhir_server.configure(page_size=5, paging=paging, page_overlap=overlap)
        before = fhir_server.stats()["reads"]
        out = tmp_path / f"pulled{overlap}.json"
        run = cli("pull", "--server", fhir_server.base_url, "-o", out, state=state)
        assert run.exit_code == 0, run
        reads[overlap] = fhir_server.stats()["reads"] - before
        pulled = bundle_resources(out)
        counted = Counter(f"{r['resourceType']}/{r['id']}" for r in pulled)
        assert [k for k, n in counted.items() if n > 1] == [], "a resource was written twice"
        assert set(counted) == pushed
    assert reads[2] > reads[0], reads  # the pages really overlapped (more pages for the same set)


def test_pull_page_limit_is_a_clear_error(
    fhir_server: TestFhirServer, pushed: set[str], tmp_path: Path, state: Path
) -> None:
    out = tmp_path / "pulled.json"
    run = cli("pull", "--server", fhir_server.base_url, "-o", out, "--page-size", "5", "--max-pages", "2",
              state=state)
    assert run.exit_code == 4, run
    assert len(run.lines) == 1 and "2 pages" in run.lines[0] and "--max-pages" in run.lines[0], run
    assert "Traceback" not in run.stderr
    assert not out.exists(), "a partial pull was left as if complete"

    ok = cli("pull", "--server", fhir_server.base_url, "-o", out, "--max-pages", "1000", state=state)
    assert ok.exit_code == 0, ok
    assert keys(json.loads(out.read_text(encoding="utf-8"))["entry"][i]["resource"]
                for i in range(len(pushed))) == pushed
