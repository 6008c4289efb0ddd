"""Which .xlsx reader: python-calamine vs openpyxl (read-only) on a few-thousand-row case workbook.

    python benchmarks/xlsx_readers.py [ROWS]      # default 5000; needs openpyxl (test extra)

Each reader turns every cell into what the import needs (values; openpyxl also the number
format it would need for date precision). Best of 3 runs, in this process.
"""
from __future__ import annotations

import csv
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cases.csv"


def workbook(path: Path, n: int) -> None:
    import openpyxl

    rows = list(csv.DictReader(EXAMPLE.open(encoding="utf-8")))
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("Cas")
    sheet.append(list(rows[0]))
    for i in range(n):
        r = dict(rows[i % len(rows)], case_id=f"C{i:06d}")
        sheet.append([datetime.fromisoformat(v) if k.endswith(("_date", "_start")) and len(v) == 10
                      else float(v) if k == "improvement_pct" else v for k, v in r.items()])
    book.save(path)


def calamine(path: Path) -> int:
    from python_calamine import CalamineWorkbook

    book = CalamineWorkbook.from_path(str(path))
    return sum(1 for _ in book.get_sheet_by_index(0).iter_rows())


def openpyxl_read(path: Path) -> int:
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    n = 0
    for row in book.worksheets[0].iter_rows():
        _ = [(c.value, c.number_format) for c in row]
        n += 1
    book.close()
    return n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.xlsx"
        workbook(path, n)
        print(f"{n} rows, {path.stat().st_size / 1e6:.2f} MB")
        for name, read in (("python-calamine", calamine), ("openpyxl read-only", openpyxl_read)):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                rows = read(path)
                best = min(best, time.perf_counter() - t)
            print(f"{name:20s} {best:6.3f} s  ({rows} rows, {best / rows * 1e6:.0f} µs/row)")


if __name__ == "__main__":
    main()
