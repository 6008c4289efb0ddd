"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fhirserver import TestFhirServer

# --------------------------------------------------------------------------------------------
# Test FHIR server (tests/fhir_server: Medplum's FHIR router in memory, on the wheel's Node 24).
# fhir_server_session: one server process for the whole session (started on first use).
# fhir_server: the same server, reset (empty repository, default switches) before each test.
# --------------------------------------------------------------------------------------------


# Tests that use one of these fixtures start a server: they get the `e2e` marker by themselves,
# so `pytest -m "not e2e"` stays a fast unit run as tests are added. Tests that start their
# own loopback server mark themselves (`pytestmark = pytest.mark.e2e` or the decorator).
SERVER_FIXTURES = frozenset({"fhir_server", "fhir_server_session", "hapi_server", "hapi_server_session",
                             "fhir_engine", "hostile_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def fhir_server_session() -> Iterator[TestFhirServer]:
    server = TestFhirServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fhir_server(fhir_server_session: TestFhirServer) -> Iterator[TestFhirServer]:
    fhir_server_session.reset()
    yield fhir_server_session
