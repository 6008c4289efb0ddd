"""Push refuses before any write: data of the wrong FHIR version, a server lacking what the
strategy needs. Asserted on the real engine's own request log (`/$admin/stats`), not on our code.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from engines import both_engines_fixture, medplum_only
from fhirserver import TestFhirServer
from test_sync_e2e import EXAMPLE_CSV, bundle_resources, cli, import_bundle, server_count, type_counts

pytestmark = pytest.mark.e2e
fhir_server = both_engines_fixture()  # Medplum and HAPI; the Medplum front's switches: medplum_only


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="module")
def r5_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("r5") / "r5.json"
    run = cli("import", EXAMPLE_CSV, "-o", out, "--fhir-version", "R5", state=out.parent / "state")
    assert run.exit_code == 0, run
    return out


def _nothing_written(server: TestFhirServer) -> None:
    stats = server.stats()
    assert stats["writes"] == 0 and stats["write_entries_received"] == 0, stats
    assert stats["by_method"].get("POST", 0) == stats["by_method"].get("PUT", 0) == 0, stats
    assert server_count(server) == {}


def _one_line_exit_5(run: object) -> str:
    assert run.exit_code == 5, run  # type: ignore[attr-defined]
    lines = run.lines  # type: ignore[attr-defined]
    assert len(lines) == 1, run
    assert "Traceback" not in run.stderr  # type: ignore[attr-defined]
    return str(lines[0])


@pytest.mark.parametrize("flag", [[], ["--fhir-version", "R4"]], ids=["no-flag", "flag-says-R4"])
def test_r5_data_to_r4_server_exit_5_no_write(
    fhir_server: TestFhirServer, r5_bundle: Path, state: Path, flag: list[str]
) -> None:
    line = _one_line_exit_5(cli("push", r5_bundle, "--server", fhir_server.base_url, *flag, state=state))
    assert "R5" in line and "4.0.1" in line and "MedicationStatement" in line, line
    _nothing_written(fhir_server)


def test_r5_ndjson_folder_to_r4_server_exit_5_no_write(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r5nd"
    run = cli("import", EXAMPLE_CSV, "-o", out, "--format", "ndjson", "--fhir-version", "R5", state=state)
    assert run.exit_code == 0, run
    line = _one_line_exit_5(cli("push", out, "--server", fhir_server.base_url, state=state))
    assert "R5" in line, line
    _nothing_written(fhir_server)
    # the dry run says the same and writes nothing either
    line = _one_line_exit_5(cli("push", out, "--server", fhir_server.base_url, "--dry-run", state=state))
    assert "R5" in line, line
    _nothing_written(fhir_server)


@medplum_only  # an R5 server: the front's fhir_version switch (the HAPI fixture is R4)
def test_r4_data_to_r5_server_refused_even_if_the_flag_says_r5(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    r4 = import_bundle(EXAMPLE_CSV, tmp_path / "r4.json", state)
    fhir_server.configure(fhir_version="5.0.0")
    line = _one_line_exit_5(cli("push", r4, "--server", fhir_server.base_url, "--fhir-version", "R5",
                                state=state))
    assert "R4" in line and "5.0.0" in line, line
    _nothing_written(fhir_server)


@medplum_only  # as above
def test_r5_data_to_r5_server_is_pushed(fhir_server: TestFhirServer, r5_bundle: Path, state: Path) -> None:
    """The guard is no blanket refusal: R5 data goes to a server that says 5.0.0 (this engine
    validates R4 only, so validation is switched off; it is the version check under test)."""
    fhir_server.configure(fhir_version="5.0.0", validate=False)
    run = cli("push", r5_bundle, "--server", fhir_server.base_url, "--fhir-version", "R5", state=state)
    assert run.exit_code == 0, run
    assert server_count(fhir_server) == type_counts(bundle_resources(r5_bundle))


@medplum_only  # capabilities_omit: a front switch (HAPI declares every interaction)
def test_capability_preflight_missing_update_exit_5_no_write(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    bundle = import_bundle(EXAMPLE_CSV, tmp_path / "b.json", state)
    fhir_server.configure(capabilities_omit=["update"])
    line = _one_line_exit_5(cli("push", bundle, "--server", fhir_server.base_url, state=state))
    assert "update" in line, line
    _nothing_written(fhir_server)


@medplum_only  # resource_types: a front switch
def test_capability_preflight_type_not_declared_and_check_lists_it(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    bundle = import_bundle(EXAMPLE_CSV, tmp_path / "b.json", state)
    assert "AdverseEvent" in type_counts(bundle_resources(bundle))
    fhir_server.configure(resource_types=["Patient", "Condition", "MedicationStatement", "Observation"])
    line = _one_line_exit_5(cli("push", bundle, "--server", fhir_server.base_url, state=state))
    assert "AdverseEvent" in line, line
    _nothing_written(fhir_server)

    check = cli("check", "--server", fhir_server.base_url, state=state)
    assert check.exit_code == 5, check
    ae = [ln for ln in check.output.splitlines() if "AdverseEvent" in ln]
    assert ae and "not declared" in ae[0], check


def test_check_lists_every_type_push_writes(fhir_server: TestFhirServer, state: Path, tmp_path: Path) -> None:
    bundle = import_bundle(EXAMPLE_CSV, tmp_path / "b.json", state)
    check = cli("check", "--server", fhir_server.base_url, state=state)
    assert check.exit_code == 0, check
    for kind in type_counts(bundle_resources(bundle)):
        assert any(kind in ln for ln in check.output.splitlines()), (kind, check)


@medplum_only  # capabilities_omit / bundle_entry_resource: front switches
def test_no_search_declared_push_works_and_never_skips_on_trust(
    fhir_server: TestFhirServer, state: Path, tmp_path: Path
) -> None:
    """Without `search-type` the ledger cannot see the server's copy: push still writes (it needs
    only update), says so once, and a re-push sends everything again rather than trusting it."""
    bundle = import_bundle(EXAMPLE_CSV, tmp_path / "b.json", state)
    n = len(bundle_resources(bundle))
    fhir_server.configure(capabilities_omit=["search-type"], bundle_entry_resource=False)
    for attempt in (1, 2):
        run = cli("push", bundle, "--server", fhir_server.base_url, state=state)
        assert run.exit_code == 0, run
        assert run.summary()["unchanged"] == 0, run
        assert fhir_server.stats()["write_entries_received"] == attempt * n
        notes = [ln for ln in run.lines if "declares no search" in ln]
        assert len(notes) == len(type_counts(bundle_resources(bundle))), run  # once per type
    assert fhir_server.stats()["by_status"].get("400", 0) == 0  # no search was tried
