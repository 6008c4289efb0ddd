"""Rebuild the LibreOffice fr_FR fixtures from examples/cases.csv (needs openpyxl and LibreOffice Calc).

    apt-get install -y libreoffice-calc-nogui locales   # fr_FR.UTF-8 generated
    python tests/data/libreoffice_fr/make_fixtures.py

What a hospital's sheet looks like: a workbook typed in a French LibreOffice, dates in date
cells shown as JJ/MM/AAAA, numbers in number cells, a month-and-year onset typed as "11/2022"
(which LibreOffice fr_FR keeps as text: it is not a date it recognises). openpyxl writes that
workbook (the cell formats a user would set); LibreOffice Calc then opens it and saves it
itself, so the committed files are LibreOffice's own output:

- cases_fr.xlsx  LibreOffice's .xlsx (sheet "Cas")
- cases_fr.csv   LibreOffice's fr_FR CSV export of it: `;`, UTF-8, cells as shown (dd/mm/yyyy)
- cases_fr.ods   the same workbook as OpenDocument (only used to test the "save as .xlsx" line)
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "examples" / "cases.csv"
DATE_COLUMNS = {"birth_date", "disease_onset", "treatment_start", "evaluation_date"}
NUMBER_COLUMNS = {"improvement_pct", "baseline_score", "followup_score"}
FR_FR = "1036"  # LibreOffice language id of fr-FR


def typed_workbook(target: Path) -> None:
    import openpyxl

    rows = list(csv.DictReader(EXAMPLE.open(encoding="utf-8")))
    columns = list(rows[0])
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Cas"
    sheet.append(columns)
    for row in rows:
        values: list[object] = []
        for column in columns:
            text = row[column]
            if column in DATE_COLUMNS and len(text) == 10:
                values.append(datetime.fromisoformat(text))
            elif column in DATE_COLUMNS and len(text) == 7:
                values.append(f"{text[5:7]}/{text[:4]}")  # typed 11/2022: text in LibreOffice fr_FR
            elif column in NUMBER_COLUMNS and text:
                values.append(float(text) if "." in text else int(text))
            else:
                values.append(text or None)
        sheet.append(values)
        for cell in sheet[sheet.max_row]:
            if isinstance(cell.value, datetime):
                cell.number_format = "DD/MM/YYYY"
    book.save(target)


def soffice(args: list[str], profile: Path, cwd: Path) -> None:
    env = {**os.environ, "LC_ALL": "fr_FR.UTF-8", "LANG": "fr_FR.UTF-8", "HOME": str(profile)}
    subprocess.run(["soffice", "--headless", f"-env:UserInstallation=file://{profile}/lo", *args],
                   cwd=cwd, env=env, check=True, timeout=300, capture_output=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        typed = work / "typed" / "cases_fr.xlsx"
        typed.parent.mkdir()
        typed_workbook(typed)
        out = work / "out"
        soffice(["--convert-to", "xlsx:Calc MS Excel 2007 XML", "--outdir", str(out), str(typed)], work, work)
        soffice(["--convert-to", "ods", "--outdir", str(out), str(out / "cases_fr.xlsx")], work, work)
        # CSV filter options: `;` (59), `"` (34), UTF-8 (76), line 1, -, fr-FR, quote text, detect, as shown
        soffice(["--convert-to", f"csv:Text - txt - csv (StarCalc):59,34,76,1,,{FR_FR},false,true,true",
                 "--outdir", str(out), str(out / "cases_fr.xlsx")], work, work)
        for name in ("cases_fr.xlsx", "cases_fr.csv", "cases_fr.ods"):
            shutil.copyfile(out / name, HERE / name)
            print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
