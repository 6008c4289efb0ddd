"""The one name for a FHIR resource as the code handles it: parsed JSON, a plain dict.

Plain dicts (not fhir.resources models) flow through mapping, sync and outcomes because
they are what the wire and the files hold; validation builds models only where it checks.
"""
from __future__ import annotations

from typing import Any

Resource = dict[str, Any]
