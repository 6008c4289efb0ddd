"""Workbooks as hospitals keep them: rows of an .xlsx sheet as the text a CSV export would hold.

One reader, python-calamine (Rust's calamine): about 20x faster than openpyxl on a 5,000-row
sheet (benchmarks/README.md). Date cells become ISO dates, numbers their shortest decimal text
(90.0 -> "90", 45.5 -> "45.5"), so a workbook and its CSV export map to the same FHIR.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from ruxo_fhir.errors import InputError

WORKBOOK_SUFFIXES = (".xlsx", ".xlsm")
# Formats we do not read: one line that says what to do instead.
OTHER_WORKBOOKS = {".xls": "an Excel 97-2003 .xls workbook", ".ods": "an OpenDocument .ods spreadsheet",
                   ".xlsb": "an Excel binary .xlsb workbook", ".numbers": "a Numbers spreadsheet"}


def is_workbook(path: Path) -> bool:
    return path.suffix.lower() in WORKBOOK_SUFFIXES


def refuse_other_workbook(path: Path) -> None:
    """A workbook format we do not read: InputError naming the way out."""
    kind = OTHER_WORKBOOKS.get(path.suffix.lower())
    if kind:
        raise InputError(f"{kind} is not read directly: save it as .xlsx or CSV (UTF-8) and import that",
                         file=str(path))


def cell_text(value: Any) -> str:
    """A cell as the text the CSV path parses: ISO dates, plain numbers, trimmed strings."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == time(0) else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, (time, timedelta)):
        return str(value)
    return str(value)


def sheet_rows(path: Path, sheet: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(1-based row number, cell texts) of every row of the sheet (the first one by default)."""
    from python_calamine import CalamineError, CalamineWorkbook

    try:
        book = CalamineWorkbook.from_path(str(path))
    except (CalamineError, OSError, ValueError) as exc:
        raise InputError(f"not a readable .xlsx workbook ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                         file=str(path)) from None
    try:
        names = list(book.sheet_names)
        if sheet is None:
            if not names:
                raise InputError("the workbook has no sheet", file=str(path))
            name = names[0]
        elif sheet in names:
            name = sheet
        else:
            raise InputError(f"no sheet named {sheet!r} (sheets: {', '.join(names)})", file=str(path))
        try:
            data = book.get_sheet_by_name(name)
            first_row = data.start[0] if data.start else 0
            for offset, cells in enumerate(data.iter_rows()):
                yield first_row + offset + 1, [cell_text(c) for c in cells]
        except CalamineError as exc:
            raise InputError(f"sheet {name!r} is not readable ({exc})", file=str(path)) from None
    finally:
        book.close()
