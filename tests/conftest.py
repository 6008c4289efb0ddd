"""Shared pytest fixtures."""

from __future__ import annotations

from typing import Iterator

import pytest

from fhirserver import TestFhirServer


# --------------------------------------------------------------------------------------------
# Test FHIR server (tests/fhir_server: Medplum's FHIR router in memory, on the wheel's Node 24).
# fhir_server_session: one server process for the whole session (started on first use).
# fhir_server: the same server, reset (empty repository, default switches) before each test.
# --------------------------------------------------------------------------------------------


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
