"""The one client seam of the sync stages: what push, plan, pull, prune and identity need of a
FHIR client. ``transport.FhirClient`` is one; tests may pass a server double that implements only
the part the code under test calls."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol


class Client(Protocol):
    base_url: str

    def capabilities(self) -> dict[str, Any]: ...

    def search(self, resource_type: str, params: dict[str, str], *,
               max_pages: int | None = None) -> Iterator[dict[str, Any]]: ...

    def search_bundles(self, resource_type: str, params: dict[str, str], *,
                       max_pages: int | None = None) -> Iterator[dict[str, Any]]: ...

    def next_pages(self, resource_type: str, page: dict[str, Any], *,
                   max_pages: int | None = None) -> Iterator[dict[str, Any]]: ...

    def request(self, method: str, url_or_path: str, *, json: Any = None,
                headers: Mapping[str, str] | None = None, idempotent: bool | None = None,
                check: bool = True) -> Any: ...

    def post_bundle(self, bundle: dict[str, Any], *, idempotent: bool) -> dict[str, Any]: ...
