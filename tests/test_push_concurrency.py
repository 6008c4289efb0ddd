"""push --concurrency N against both real engines (Medplum's router and HAPI FHIR JPA behind the
fault front): the same end state, counts, notices and ledger as N = 1, under every fault switch.

Each case: push a generated cohort with 4 bundles in flight (faults on), rerun until done as a
user would, then check the server holds exactly our resources, the counts add up, the notices
are said once, and a rerun with the ledger writes nothing.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cohort_gen import generate_cases
from engines import both_engines_fixture
from fhirserver import TestFhirServer
from hapiserver import TestHapiServer

pytestmark = pytest.mark.e2e

fhir_server = both_engines_fixture()  # Medplum and HAPI FHIR JPA
Server = TestFhirServer | TestHapiServer

ALL_FAULTS = {"429": 7, "503": 11, "drop_before": 13, "drop_after": 17}
N_CASES = 300


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 200 entries (not 1000): the cohort spans about ten, so every test here also
    checks a window's reads made while the previous window's bundles are in flight."""
    import importlib

    monkeypatch.setattr(importlib.import_module("ruxo_fhir.sync.push"), "LEDGER_WINDOW", 200)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Resources of N_CASES generated cases, in the order push receives them from a CSV."""
    from ruxo_fhir.importer import source_resources
    from ruxo_fhir.mapping.spec import load_mapping

    src = tmp_path_factory.mktemp("concurrency") / "cases.csv"
    src.write_text(generate_cases(N_CASES, seed=7), encoding="utf-8")
    return list(source_resources(src, load_mapping()))


def _configure(server: Server, **switches: Any) -> None:
    """HAPI JPA refuses a reference to a resource it does not hold by itself (its default
    `enforce_referential_integrity_on_write`); the Medplum front needs the switch."""
    if isinstance(server, TestHapiServer):
        switches.pop("referential_integrity", None)
    server.configure(**switches)


def _push(server: Server, resources: list[dict[str, Any]], ledger_path: Path, *, concurrency: int,
          mode: str | None = None, batch_size: int = 40, runs: int = 4,
          max_attempts: int = 6) -> tuple[Any, int]:
    """The library push with short sleeps; a run that runs out of retries is rerun."""
    from ruxo_fhir.errors import TemporaryServerError
    from ruxo_fhir.mapping.spec import load_mapping
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import PushOptions, push
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    for attempt in range(1, runs + 1):
        retry = RetryPolicy(max_attempts=max_attempts, backoff_base=0.01, backoff_cap=0.05,
                            max_total_seconds=5 * max_attempts, jitter=0)
        options = PushOptions(batch_size=batch_size, mode=mode or "transaction", mode_explicit=mode is not None,
                              sleep=lambda s: time.sleep(min(s, 0.05)), concurrency=concurrency)
        with FhirClient(server.base_url, retry=retry) as client, Ledger(ledger_path) as ledger:
            try:
                return push(client, resources, load_mapping(), options, ledger=ledger), attempt
            except TemporaryServerError:
                if attempt == runs:
                    raise
    raise AssertionError("unreachable")


def _server_keys(server: Server) -> set[str]:
    import requests

    out: set[str] = set()
    for kind in ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent"):
        url: str | None = f"{server.base_url}/{kind}?_count=1000&_elements=id"
        while url:
            bundle = requests.get(url, headers={"Accept": "application/fhir+json"}, timeout=60).json()
            out |= {f"{kind}/{e['resource']['id']}" for e in bundle.get("entry", [])}
            url = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
    return out


def _keys(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


@pytest.mark.parametrize(("config", "mode", "switches", "shrinks"), [
    pytest.param({"faults": ALL_FAULTS, "retry_after": 0}, None, False, False, id="faults-transaction"),
    pytest.param({"faults": ALL_FAULTS, "retry_after": 0}, "batch", False, False, id="faults-batch"),
    pytest.param({"faults": ALL_FAULTS, "retry_after": 0, "batch_only": True}, None, True, False,
                 id="faults-batch-only-server"),
    pytest.param({"max_bundle_entries": 15}, None, False, True, id="size-cap-413"),
    pytest.param({"referential_integrity": True, "latency_ms": 5}, None, False, False, id="referential-integrity"),
    pytest.param({"faults": {"429": 5}, "retry_after": 1}, None, False, False, id="retry-after"),
])
def test_concurrent_push_same_end_state_as_sequential(
    fhir_server: Server, cohort: list[dict[str, Any]], tmp_path: Path,
    config: dict[str, Any], mode: str | None, switches: bool, shrinks: bool,
) -> None:
    _configure(fhir_server, **config)
    result, runs = _push(fhir_server, cohort, tmp_path / "ledger.sqlite3", concurrency=4, mode=mode)
    stats = fhir_server.stats()
    for fault, every in config.get("faults", {}).items():
        assert every and stats["faults_injected"][fault] > 0, stats  # the fault really fired
    assert result.rejected == 0 and result.errors == [], result.errors[:5]
    if runs == 1:
        assert result.created + result.updated == result.total == len(cohort)
    assert result.mode == ("batch" if mode == "batch" or switches else "transaction")
    assert len([t for t in result.notices if "switching to batch" in t]) == (1 if switches else 0), result.notices
    assert any("chunks of" in t for t in result.notices) == shrinks, result.notices
    assert _server_keys(fhir_server) == _keys(cohort)

    writes = fhir_server.stats()["writes"]
    again, _ = _push(fhir_server, cohort, tmp_path / "ledger.sqlite3", concurrency=4, mode=mode)
    assert again.unchanged == again.total == len(cohort)
    assert fhir_server.stats()["writes"] == writes  # the ledger skips everything: no write at all


def test_concurrency_keeps_reference_order_and_counts_of_one(
    fhir_server: Server, cohort: list[dict[str, Any]], tmp_path: Path
) -> None:
    """With referential integrity on, a case bundle sent before the bundle carrying its Patient
    landed would be refused; 8 in flight, with every 3rd write refused (503) so that bundles
    overtake each other, must still see none refused, and the counts per type are those of a
    sequential push.

    One request meets a 503 with odds near 1/3 per attempt, so with ~200 requests six attempts
    run out now and then (a rerun, as a user would do); 30 attempts make that (1/3)^30-rare, so
    `runs == 1` tests ordering, not luck."""
    _configure(fhir_server, referential_integrity=True, faults={"503": 3}, retry_after=0)
    result, runs = _push(fhir_server, cohort, tmp_path / "l8.sqlite3", concurrency=8, batch_size=10,
                         max_attempts=30)
    assert runs == 1 and result.rejected == 0, result.errors[:3]
    assert fhir_server.stats()["faults_injected"]["503"] > 0
    fhir_server.reset()
    _configure(fhir_server, referential_integrity=True)
    sequential, _ = _push(fhir_server, cohort, tmp_path / "l1.sqlite3", concurrency=1, batch_size=10)
    assert {k: dict(v) for k, v in result.by_type.items()} == {k: dict(v) for k, v in sequential.by_type.items()}
    # a patient's cases share a bundle when sent concurrently: no more bundles than in order
    assert 0 < result.bundles_sent <= sequential.bundles_sent
    assert _server_keys(fhir_server) == _keys(cohort)


def test_a_server_pause_slows_every_thread_once() -> None:
    """A Retry-After seen by one thread makes the others wait it out once, before their next
    request; the thread that saw it sleeps it itself, not twice."""
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    slept: dict[str, list[float]] = {}

    def sleep(seconds: float) -> None:
        slept.setdefault(threading.current_thread().name, []).append(seconds)

    client = FhirClient("http://127.0.0.1:9/fhir", retry=RetryPolicy(sleep=sleep))
    seen = threading.Thread(target=lambda: (client._set_pause(30.0), client._await_pause()), name="saw-429")
    seen.start()
    seen.join()
    other = threading.Thread(target=lambda: (client._await_pause(), client._await_pause()), name="other")
    other.start()
    other.join()
    assert "saw-429" not in slept  # it sleeps the delay in its own retry loop, not again here
    assert len(slept["other"]) == 1 and 29.0 < slept["other"][0] <= 30.0


def test_cli_push_csv_streams_with_concurrency_and_names_bad_rows(
    fhir_server: Server, tmp_path: Path
) -> None:
    """`push CASES.csv --concurrency 4`: a bad row is named (file, row, why) and not pushed, the
    rest lands, exit 1; a rerun writes nothing."""
    from e2e_cli import Run, run_cli

    lines = generate_cases(60, seed=11).splitlines()
    fields = lines[5].split(",")
    fields[0] = "BAD-ROW"
    fields[9] = "EVERY-FULL-MOON"  # frequency
    lines[5] = ",".join(fields)
    src = tmp_path / "cases.csv"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    state = tmp_path / "state"
    args = ["push", src, "--server", fhir_server.base_url, "--batch-size", "20", "--concurrency", "4"]
    run = run_cli(Run, *args, state=state)
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stderr
    assert any(f"{src}, row 6:" in ln and "frequency" in ln for ln in run.lines), run
    summary = [ln for ln in run.lines if ln.startswith("created ")]
    assert summary and "rejected 0" in summary[-1], run
    from ruxo_fhir.importer import source_resources
    from ruxo_fhir.mapping.spec import load_mapping

    expected = list(source_resources(src, load_mapping()))  # the 59 good rows' resources
    assert f"total {len(expected)}" in summary[-1], run
    assert _server_keys(fhir_server) == _keys(expected)
    writes = fhir_server.stats()["writes"]
    again = run_cli(Run, *args, state=state)
    assert again.exit_code == 1 and fhir_server.stats()["writes"] == writes, again


def test_a_server_that_starts_refusing_client_ids_mid_push_loses_nothing(fhir_server: Server, tmp_path: Path) -> None:
    """The server accepts client-assigned ids, then, with bundles in flight, starts refusing them
    (its own policy switch, a policy change mid-run). Push either restarts the window under
    server ids, or, when windows overlapped, stops with one line naming `--ids server`; either
    way a rerun completes and the server holds every resource once (no derived-id duplicates,
    nothing lost). 80 cases: identifier searches on the Medplum front grow with its size."""
    from collections import Counter

    from ruxo_fhir.errors import ServerError
    from ruxo_fhir.importer import source_resources
    from ruxo_fhir.mapping.spec import load_mapping

    src = tmp_path / "cases.csv"
    src.write_text(generate_cases(80, seed=3), encoding="utf-8")
    cohort = list(source_resources(src, load_mapping()))
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import PushOptions, push
    from ruxo_fhir.transport.rest import FhirClient

    lock = threading.Lock()
    seen = [0]
    flipped = threading.Event()

    def progress(n: int) -> None:
        with lock:
            seen[0] += n
            flip = seen[0] >= len(cohort) // 3 and not flipped.is_set()
            if flip:
                flipped.set()
                fhir_server.configure(no_client_ids=True)  # before any other bundle is recorded

    stopped: str | None = None
    with FhirClient(fhir_server.base_url) as client, Ledger(tmp_path / "ledger.sqlite3") as ledger:
        try:
            first = push(client, cohort, load_mapping(), PushOptions(batch_size=20, concurrency=4),
                         ledger=ledger, on_progress=progress)
        except ServerError as exc:
            stopped = str(exc)
    assert flipped.is_set()
    if stopped is not None:
        assert "--ids server" in stopped and "\n" not in stopped, stopped
    else:
        assert first.ids == "server" and first.rejected == 0, first.errors[:3]
    with FhirClient(fhir_server.base_url) as client, Ledger(tmp_path / "ledger.sqlite3") as ledger:
        again = push(client, cohort, load_mapping(), PushOptions(batch_size=20, concurrency=4, ids="server"),
                     ledger=ledger)
    assert again.rejected == 0 and not again.conflicts, again.errors[:3]
    assert fhir_server.counts() == dict(Counter(r["resourceType"] for r in cohort))
