"""Formula neutralisation for every CSV we write, and its exact inverse for every CSV we read.

A spreadsheet runs a cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR as a formula
(CSV injection). As OWASP advises, such a cell gets a leading ``'`` -- every cell, numbers
like ``-5`` included, since a writer cannot know which column a spreadsheet will treat as
text. A cell that already starts with quotes before a trigger gets one more, so reading back
(drop one leading ``'`` where a trigger follows the quotes) restores every value exactly.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import Any

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _needs_quote(value: str) -> bool:
    rest = value.lstrip("'")
    return rest.startswith(TRIGGERS)


def neutralise(value: str) -> str:
    """The cell as written: a leading ``'`` when a spreadsheet would run it as a formula."""
    return "'" + value if value and _needs_quote(value) else value


def unneutralise(value: str) -> str:
    """The inverse of ``neutralise`` (reading a file we, or a careful tool, wrote)."""
    return value[1:] if value.startswith("'") and _needs_quote(value[1:]) else value


def neutralise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: neutralise(v) if isinstance(v, str) else v for k, v in row.items()}


class SafeDictWriter(csv.DictWriter):  # type: ignore[type-arg]
    """csv.DictWriter whose every string cell passes ``neutralise`` (the one CSV writer we use)."""

    def writeheader(self) -> Any:
        return super().writeheader()

    def writerow(self, rowdict: Mapping[str, Any]) -> Any:
        return super().writerow(neutralise_row(rowdict))

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)
