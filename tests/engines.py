"""Engine parametrization shared by the end-to-end test modules.

A module whose tests should run on every real engine overrides ``fhir_server`` with the
parametrized ``any_server`` fixture (tests/conftest.py)::

    fhir_server = both_engines_fixture()

A test that needs a switch only the Medplum front has (it changes what the engine itself
answers: its CapabilityStatement's fhirVersion or capabilities, auth, SMART, bulk polling...)
narrows itself with ``@medplum_only`` and says why in a comment.

Where engines differ in ways FHIR allows (a no-op update answered 200 with the same version,
referential integrity on DELETE, `$validate` offered or not), a test asserts what holds on every
conformant server, never one engine's reply; there is no per-engine expected failure.
"""

from __future__ import annotations

from typing import Any

import pytest

ENGINES = ("medplum", "hapi")

medplum_only = pytest.mark.parametrize("any_server", ["medplum"], indirect=True)


def both_engines_fixture() -> Any:
    """A module-level ``fhir_server`` fixture that is ``any_server`` (Medplum and HAPI)."""

    @pytest.fixture
    def fhir_server(any_server: Any) -> Any:
        return any_server

    return fhir_server

