"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from engines import ENGINES
from fhirserver import TestFhirServer
from hapiserver import TestHapiServer, missing_tools

# --------------------------------------------------------------------------------------------
# Test FHIR server (tests/fhir_server: Medplum's FHIR router in memory, on the wheel's Node 24).
# fhir_server_session: one server process for the whole session (started on first use).
# fhir_server: the same server, reset (empty repository, default switches) before each test.
# --------------------------------------------------------------------------------------------


# Tests that use one of these fixtures start a server: they get the `e2e` marker by themselves,
# so `pytest -m "not e2e"` stays a fast unit run as tests are added. Tests that start their
# own loopback server mark themselves (`pytestmark = pytest.mark.e2e` or the decorator).
SERVER_FIXTURES = frozenset({"fhir_server", "fhir_server_session", "hapi_server", "hapi_server_session",
                             "fhir_engine", "any_server", "hostile_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Server fixtures -> `e2e`."""
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


# --------------------------------------------------------------------------------------------
# HAPI FHIR JPA (tests/hapi_server, built with Maven on first use) behind the fault front
# (tests/fault_front.py): the second real engine.
# hapi_server_session: one HAPI process for the whole session; hapi_server: reset before each test.
# Without Java 17+/Maven the HAPI tests skip with one line naming what to install -- except in CI
# (CI=true), where they fail: CI must never silently skip an engine.
# --------------------------------------------------------------------------------------------



def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def hapi_server_session() -> Iterator[TestHapiServer]:
    problem = missing_tools()
    if problem:
        if _in_ci():
            pytest.fail(f"CI=true and HAPI cannot run: {problem}", pytrace=False)
        pytest.skip(problem)
    server = TestHapiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hapi_server(hapi_server_session: TestHapiServer) -> Iterator[TestHapiServer]:
    hapi_server_session.reset()
    yield hapi_server_session


@pytest.fixture(params=ENGINES)
def any_server(request: pytest.FixtureRequest) -> Iterator[TestFhirServer | TestHapiServer]:
    """The same test on each engine, reset: ``medplum`` (fhir_server) and ``hapi`` (hapi_server).

    A test that needs a Medplum-front-only feature narrows it with
    ``@pytest.mark.parametrize("any_server", ["medplum"], indirect=True)`` and says why.
    """
    yield request.getfixturevalue(f"{'fhir' if request.param == 'medplum' else 'hapi'}_server")
