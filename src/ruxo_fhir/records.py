"""The local case record and a forgiving, loss-free reader for spreadsheet CSV exports."""
from __future__ import annotations

import codecs
import csv
import hashlib
import re
import unicodedata
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

from ruxo_fhir.csvsafe import unneutralise
from ruxo_fhir.errors import InputError
from ruxo_fhir.mapping.spec import MappingSpec
from ruxo_fhir.model import CANONICAL_COLUMNS as CANONICAL_COLUMNS
from ruxo_fhir.model import CaseRecord as CaseRecord
from ruxo_fhir.model import Reject as Reject
from ruxo_fhir.model import format_decimal as format_decimal
from ruxo_fhir.model import new_record
from ruxo_fhir.spreadsheet import is_workbook, refuse_other_workbook, sheet_rows

_FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_YEAR_MONTH = re.compile(r"^\d{4}-\d{2}$")
_YEAR = re.compile(r"^\d{4}$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")
MAX_SIGNIFICANT_DIGITS = 15
_YES = {"yes", "y", "true", "1", "oui", "o"}
_NO = {"no", "n", "false", "0", "non"}


@dataclass
class ReadReport:
    """Counters and de-duplicated warnings of one read; accepted + rejected == total."""

    file: str
    accepted: int = 0
    rejected: int = 0
    encoding: str = ""
    delimiter: str = ""
    warnings: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.accepted + self.rejected

    def warn(self, message: str) -> None:
        self.warnings[message] = self.warnings.get(message, 0) + 1

    def warning_lines(self) -> list[str]:
        return [m if n == 1 else f"{m} ({n} rows)" for m, n in self.warnings.items()]


# --- file-level: encoding and delimiter -------------------------------------------------

def detect_encoding(path: Path, chunk_size: int = 1 << 20) -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM, or Windows-1252; reads in chunks."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
            if not head:
                raise InputError("empty file", file=str(path))
            if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                return "utf-16"
            fh.seek(0)
            decoder = codecs.getincrementaldecoder("utf-8")()
            utf8_ok = True
            saw_nul = False
            while chunk := fh.read(chunk_size):
                saw_nul = saw_nul or b"\x00" in chunk
                if utf8_ok:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError:
                        utf8_ok = False
            if saw_nul:
                raise InputError("not a text CSV file (contains NUL bytes)", file=str(path))
            if utf8_ok:
                try:
                    decoder.decode(b"", final=True)
                    return "utf-8-sig"
                except UnicodeDecodeError:
                    pass
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=str(path)) from None
    # cp1252 leaves 5 bytes undefined: a file using them is neither UTF-8 nor cp1252.
    try:
        with path.open("rb") as fh:
            cp_decoder = codecs.getincrementaldecoder("cp1252")()
            while chunk := fh.read(chunk_size):
                cp_decoder.decode(chunk)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"unreadable encoding (neither UTF-8 nor Windows-1252; byte 0x{exc.object[exc.start]:02x})",
            file=str(path),
        ) from None
    return "cp1252"


_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)


def has_utf8_sequences(path: Path, chunk_size: int = 1 << 20) -> bool:
    """Whether a file that is not clean UTF-8 still holds UTF-8 multi-byte characters (a UTF-8
    file with stray bytes, not a Windows-1252 one: cp1252 text almost never forms them)."""
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            if _UTF8_MULTIBYTE.search(chunk):
                return True
    return False


def _check_no_stray_bytes(values: dict[str, str]) -> None:
    for column, value in values.items():
        bad = [ord(ch) - 0xDC00 for ch in value if "\udc80" <= ch <= "\udcff"]
        if bad:
            raise _RowError(column, f"invalid UTF-8 byte(s) {', '.join(f'0x{b:02x}' for b in bad[:3])} in a UTF-8 "
                                    "file (this row was saved in another encoding)")


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


# --- row-level parsing ------------------------------------------------------------------

class _RowError(Exception):
    def __init__(self, column: str, error: str) -> None:
        super().__init__(error)
        self.column = column
        self.error = error


def _full_date(column: str, value: str) -> str:
    if not _FULL_DATE.match(value):
        raise _RowError(column, f"bad date {value!r} (expected YYYY-MM-DD)")
    try:
        date.fromisoformat(value)
    except ValueError:
        raise _RowError(column, f"bad date {value!r} (no such day)") from None
    return value


def _partial_date(column: str, value: str, allow_month: bool, allow_year: bool) -> str:
    if _FULL_DATE.match(value):
        return _full_date(column, value)
    if allow_month and _YEAR_MONTH.match(value):
        if 1 <= int(value[5:7]) <= 12:
            return value
        raise _RowError(column, f"bad date {value!r} (no such month)")
    if allow_year and _YEAR.match(value):
        return value
    forms = "YYYY-MM-DD" + (", YYYY-MM" if allow_month else "") + (" or YYYY" if allow_year else "")
    raise _RowError(column, f"bad date {value!r} (expected {forms})")


# Formats a reject suggests when a date is not ISO and no configured format reads it. They are
# only ever suggested, never applied: 05/06/2024 is June 5th in Lyon and May 6th in Boston.
SUGGESTED_DATE_FORMATS = ("%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%Y/%m/%d", "%m/%Y", "%Y%m%d",
                          "%d/%m/%y", "%m/%d/%y")


def _precision(fmt: str) -> int:
    """What a format pins down: 3 = day, 2 = month, 1 = year."""
    if "%d" in fmt or "%j" in fmt:
        return 3
    if "%m" in fmt or "%b" in fmt or "%B" in fmt:
        return 2
    return 1


def _strptime(value: str, fmt: str, lowest: int) -> str | None:
    """The ISO text of `value` read with `fmt` (YYYY-MM-DD, YYYY-MM or YYYY as the format says)."""
    precision = _precision(fmt)
    if precision < lowest:
        return None
    try:
        parsed = datetime.strptime(value, fmt)
    except ValueError:
        return None
    if precision == 3:
        return parsed.date().isoformat()
    return f"{parsed.year:04d}-{parsed.month:02d}" if precision == 2 else f"{parsed.year:04d}"


def read_date(column: str, value: str, formats: tuple[str, ...], *, allow_month: bool, allow_year: bool) -> str:
    """An ISO date from `value`: ISO always, then each configured strptime format in order.

    Nothing is guessed: a value no configured format reads is rejected, and the reject names
    the format(s) that would read it (both, when they disagree: an ambiguous day/month).
    """
    if value[:4].isdigit() and (len(value) <= 4 or value[4] == "-"):
        return _partial_date(column, value, allow_month, allow_year) if (allow_month or allow_year) \
            else _full_date(column, value)
    lowest = 1 if allow_year else 2 if allow_month else 3
    for fmt in formats:
        iso = _strptime(value, fmt, lowest)
        if iso is None:
            continue
        if "%y" in fmt and int(iso[:4]) > date.today().year:
            raise _RowError(column, f"{value!r} read with {fmt} gives the year {iso[:4]}: a two-digit year "
                                    "is ambiguous (format the column with 4-digit years, %Y)")
        return iso
    forms = "YYYY-MM-DD" + (", YYYY-MM" if allow_month else "") + (" or YYYY" if allow_year else "")
    tried = f"; tried {', '.join(formats)}" if formats else ""
    readings = {fmt: iso for fmt in SUGGESTED_DATE_FORMATS if fmt not in formats
                and "%y" not in fmt and (iso := _strptime(value, fmt, lowest)) is not None}
    if not readings:  # two-digit years only when nothing else reads it, and never into the future
        this_year = date.today().year
        readings = {fmt: iso for fmt in SUGGESTED_DATE_FORMATS if fmt not in formats
                    and (iso := _strptime(value, fmt, lowest)) is not None and int(iso[:4]) <= this_year}
    hint = ""
    if len(set(readings.values())) > 1:
        hint = "; ambiguous, not guessed: " + ", ".join(f"--date-format {f} reads {i}" for f, i in readings.items())
    elif readings:
        fmts = " or ".join(readings)
        hint = f"; --date-format {fmts} would read it as {next(iter(readings.values()))}"
    raise _RowError(column, f"bad date {value!r} (expected {forms}{tried}){hint}")


def _decimal(column: str, value: str) -> Decimal:
    text = value.replace("%", "").replace("\u00a0", "").replace(" ", "")
    if _DECIMAL_COMMA.match(text):
        text = text.replace(",", ".")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise _RowError(column, f"not a number: {value!r}") from None
    if not number.is_finite():
        raise _RowError(column, f"not a finite number: {value!r}")
    digits = len(number.normalize().as_tuple().digits)
    if digits > MAX_SIGNIFICANT_DIGITS:
        # FHIR servers and JSON tools commonly hold decimals as IEEE doubles (15 digits exact);
        # more digits would not survive a round trip, and spreadsheets never export more.
        raise _RowError(column, f"{value!r} has {digits} significant digits (at most {MAX_SIGNIFICANT_DIGITS})")
    if number and not -MAX_SIGNIFICANT_DIGITS <= number.adjusted() < MAX_SIGNIFICANT_DIGITS:
        # the same double-precision bound: 1e20 would not be written as an exact JSON number
        raise _RowError(column, f"{value!r} is out of range (at most {MAX_SIGNIFICANT_DIGITS} digits before or "
                                "after the decimal point)")
    return number


def _close_match(name: str, candidates: list[str]) -> str | None:
    """The candidate header most like `name` (case, spaces and `_`/`-` ignored), if close enough."""
    import difflib  # here: only a header that matches no column needs it

    def norm(text: str) -> str:
        return re.sub(r"[\s_\-.]+", "", text.lower())

    keyed = {norm(c): c for c in candidates}
    target = norm(name)
    found = difflib.get_close_matches(target, list(keyed), n=1, cutoff=0.6)
    if found:
        return keyed[found[0]]
    prefix = [c for k, c in keyed.items() if k and (k.startswith(target) or target.startswith(k))]
    return prefix[0] if len(prefix) == 1 else None


def _labels(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(";") if part.strip())


# (column, month precision allowed, year precision allowed), in the order rejects name them
_DATE_COLUMNS = (("birth_date", False, True), ("disease_onset", True, True), ("treatment_start", False, False),
                 ("evaluation_date", False, False))


# Letters of other scripts that look like Latin ones (Unicode confusables, the common cases):
# an identifier typed with them matches nothing a colleague types on a Latin keyboard.
_LATIN_LOOKALIKES = frozenset(
    "АВЕЅІЈКМНОРСТХУаеорсухіјѕԁԛԝһӏ"  # Cyrillic
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧονϲ"  # Greek
)


def _script(ch: str) -> str:
    try:
        return unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return "UNKNOWN"


def identifier(column: str, value: str) -> str:
    """An identifier as compared and stored: NFC-normalised; invisible characters and
    mixed-script look-alikes (a Cyrillic С in "С01") are refused with the reason."""
    if value.isascii() and value.isprintable():
        return value  # NFC already; no invisible character; Latin letters only
    text = unicodedata.normalize("NFC", value)
    for ch in text:
        if unicodedata.category(ch) in ("Cf", "Cc", "Co", "Cn") or (ch.isspace() and ch != " "):
            name = unicodedata.name(ch, "unnamed")
            raise _RowError(column, f"contains an invisible character U+{ord(ch):04X} ({name.lower()}); "
                                    "retype the identifier")
    scripts = {_script(ch) for ch in text if ch.isalpha()}
    if len(scripts) > 1:
        raise _RowError(column, f"mixes {' and '.join(sorted(s.title() for s in scripts))} letters "
                                f"(look-alike characters?) in {text!r}")
    if scripts and scripts != {"LATIN"}:
        letters = [ch for ch in text if ch.isalpha()]
        if all(ch in _LATIN_LOOKALIKES for ch in letters):
            script = next(iter(scripts)).title()
            raise _RowError(column, f"{text!r} is written with {script} letters that look like Latin ones "
                                    f"({''.join(dict.fromkeys(letters))}); type it in Latin letters")
    return text


_SCORE_COLUMNS = ("baseline_score", "followup_score")
_FLAGS = {**dict.fromkeys(_YES, True), **dict.fromkeys(_NO, False)}
_MINUS_100, _PLUS_100, _ZERO = Decimal(-100), Decimal(100), Decimal(0)
_MEMO_CAP = 1 << 16  # values remembered per memo; emptied when full, so memory stays flat


class RowRules:
    """What parsing a row needs from the mapping, looked up once per file, with memos of the
    values already read: dates, numbers and labels repeat across rows, and reading one
    (regex, `Decimal`, `date.fromisoformat`) costs more than the rest of the row. Only
    successes are remembered; a bad value is read (and explained) again every time."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.required = tuple(mapping.required_columns)
        self.sex = mapping.sex_spellings()
        self.frequencies = mapping.medication.frequencies
        self.formats = mapping.date_formats
        self.dates: tuple[tuple[str, bool, bool, dict[str, str]], ...] = tuple(
            (column, allow_month, allow_year, {}) for column, allow_month, allow_year in _DATE_COLUMNS)
        self.decimals: dict[str, Decimal] = {}
        self.labels: dict[str, tuple[str, ...]] = {}

    def date(self, column: str, raw: str, allow_month: bool, allow_year: bool, memo: dict[str, str]) -> str:
        iso = memo.get(raw)
        if iso is None:
            iso = read_date(column, raw, self.formats, allow_month=allow_month, allow_year=allow_year)
            if len(memo) >= _MEMO_CAP:
                memo.clear()
            memo[raw] = iso
        return iso

    def decimal(self, column: str, raw: str) -> Decimal:
        number = self.decimals.get(raw)
        if number is None:
            number = _decimal(column, raw)
            if len(self.decimals) >= _MEMO_CAP:
                self.decimals.clear()
            self.decimals[raw] = number
        return number

    def label_list(self, raw: str) -> tuple[str, ...]:
        found = self.labels.get(raw)
        if found is None:
            found = _labels(raw)
            if len(self.labels) >= _MEMO_CAP:
                self.labels.clear()
            self.labels[raw] = found
        return found


def parse_row(values: dict[str, str], rules: RowRules, row: int) -> CaseRecord:
    """Validate one row's canonical values; raise _RowError naming the column and why.

    The checks run in a fixed order (required, sex, frequency, dates, date order, numbers,
    score name, recurrence, identifiers): a row with several problems is rejected for the
    first, the same one on every run.
    """
    for column in rules.required:
        if not values.get(column):
            raise _RowError(column, "required value is missing")
    sex = rules.sex.get(values["sex"].strip().lower())
    if sex is None:
        raise _RowError("sex", f"unknown sex {values['sex']!r} (expected F, M, other or unknown)")
    frequency = values["frequency"].upper()
    if frequency not in rules.frequencies:
        allowed = " or ".join(rules.frequencies)
        raise _RowError("frequency", f"unknown frequency {values['frequency']!r} (expected {allowed})")
    dates: list[str | None] = []
    bad: list[_RowError] = []
    for column, allow_month, allow_year, memo in rules.dates:
        raw = values.get(column)
        if not raw:
            dates.append(None)
            continue
        try:
            dates.append(rules.date(column, raw, allow_month, allow_year, memo))
        except _RowError as exc:
            bad.append(exc)
    if bad:  # every bad date of the row, not only the first
        raise _RowError(bad[0].column, "; ".join([bad[0].error, *(f"{e.column}: {e.error}" for e in bad[1:])]))
    birth, onset, start, evaluation = dates  # the order of _DATE_COLUMNS
    assert start is not None  # a required column
    if birth:
        if birth[:4] > start[:4] or (len(birth) == 10 and birth > start):
            raise _RowError("birth_date", "birth date is after treatment start")
    if evaluation:
        if evaluation < start:
            raise _RowError("evaluation_date", f"evaluation {evaluation} is before treatment start {start}")
    improvement = None
    raw = values.get("improvement_pct")
    if raw:
        improvement = rules.decimal("improvement_pct", raw)
        if not _MINUS_100 <= improvement <= _PLUS_100:
            raise _RowError("improvement_pct", f"{raw!r} is outside -100..100")
    scores: list[Decimal | None] = []
    for column in _SCORE_COLUMNS:
        raw = values.get(column)
        if not raw:
            scores.append(None)
            continue
        number = rules.decimal(column, raw)
        if number < _ZERO:
            raise _RowError(column, f"negative score {raw!r}")
        scores.append(number)
    baseline, followup = scores
    score_name = values.get("score_name") or None
    if score_name is None and (baseline is not None or followup is not None):
        raise _RowError("score_name", "required when a baseline or follow-up score is given")
    recurrence = None
    raw = values.get("recurrence_after_stop")
    if raw:
        recurrence = _FLAGS.get(raw.lower())
        if recurrence is None:
            raise _RowError("recurrence_after_stop", f"expected yes or no, got {raw!r}")
    return new_record(  # the fields of CaseRecord, in order
        identifier("case_id", values["case_id"]),
        identifier("patient_id", values["patient_id"]),
        sex,
        values["indication"],
        start,
        frequency,
        birth,
        values.get("site") or None,
        onset,
        rules.label_list(values.get("prior_treatments", "")),
        evaluation,
        improvement,
        score_name,
        baseline,
        followup,
        rules.label_list(values.get("adverse_events", "")),
        recurrence,
        row,
    )


def _digest(*parts: str | None) -> bytes:
    """A compact 8-byte key: cross-row checks keep these, not Python objects per row."""
    return hashlib.blake2b("\x1f".join(p or "" for p in parts).encode(), digest_size=8).digest()


class CrossRowIndex:
    """Remembers accepted case ids and each patient's sex/birth date as 64-bit hashes.

    Two open-addressing hash tables over flat `array('Q')` columns (linear probing, at most
    half full): about 16 bytes per case and 32 per patient, not a Python object per row, so a
    million rows cost tens of MB. Keys are 64-bit hashes (Python's SipHash of the strings,
    seeded per process; 0 marks an empty slot): the index lives only in the process that reads
    the file, and a false "duplicate" needs a 64-bit collision (~3e-8 at a million rows).
    """

    def __init__(self, capacity: int = 1024) -> None:
        size = 1 << max(4, (capacity * 2 - 1).bit_length())
        self._case_keys = array("Q", bytes(8 * size))
        self._cases = 0
        self._patient_keys = array("Q", bytes(8 * size))
        self._patient_traits = array("Q", bytes(8 * size))
        self._patients = 0
        self._last: tuple[CaseRecord, int, int, int] | None = None

    def __len__(self) -> int:
        return self._cases

    @property
    def patients(self) -> int:
        return self._patients

    @staticmethod
    def _key(value: object) -> int:
        return hash(value) & 0xFFFF_FFFF_FFFF_FFFF or 1

    @staticmethod
    def _slot(keys: array[int], key: int) -> int:
        mask = len(keys) - 1
        i = key & mask
        while True:
            found = keys[i]
            if found == key or found == 0:
                return i
            i = (i + 1) & mask

    def _keys_of(self, record: CaseRecord) -> tuple[int, int, int]:
        last = self._last
        if last is not None and last[0] is record:
            return last[1], last[2], last[3]
        keys = (self._key(record.case_id), self._key(record.patient_id), self._key((record.sex, record.birth_date)))
        self._last = (record, *keys)
        return keys

    def check(self, record: CaseRecord) -> None:
        case, patient, traits = self._keys_of(record)
        if self._case_keys[self._slot(self._case_keys, case)] == case:
            raise _RowError("case_id", f"duplicate case_id {record.case_id!r} (the first row wins)")
        i = self._slot(self._patient_keys, patient)
        if self._patient_keys[i] == patient and self._patient_traits[i] != traits:
            raise _RowError(
                "patient_id",
                f"patient {record.patient_id!r} has another sex or birth_date in an earlier row",
            )

    def add(self, record: CaseRecord) -> bool:
        """Register an accepted record; True when its patient is new."""
        case, patient, traits = self._keys_of(record)
        self._last = None
        i = self._slot(self._case_keys, case)
        if self._case_keys[i] != case:
            self._case_keys[i] = case
            self._cases += 1
            if self._cases * 2 > len(self._case_keys):
                self._case_keys = self._grown(self._case_keys)[0]
        i = self._slot(self._patient_keys, patient)
        if self._patient_keys[i] == patient:
            return False
        self._patient_keys[i] = patient
        self._patient_traits[i] = traits
        self._patients += 1
        if self._patients * 2 > len(self._patient_keys):
            self._patient_keys, self._patient_traits = self._grown(self._patient_keys, self._patient_traits)
        return True

    def admit(self, record: CaseRecord) -> bool:
        """`check` and then `add` in one pass (each key hashed and probed once): True when the
        patient is new; a failed check raises the same _RowError and registers nothing."""
        case = hash(record.case_id) & 0xFFFF_FFFF_FFFF_FFFF or 1
        keys = self._case_keys
        mask = len(keys) - 1
        i = case & mask
        while found := keys[i]:
            if found == case:
                raise _RowError("case_id", f"duplicate case_id {record.case_id!r} (the first row wins)")
            i = (i + 1) & mask
        patient = hash(record.patient_id) & 0xFFFF_FFFF_FFFF_FFFF or 1
        traits = hash((record.sex, record.birth_date)) & 0xFFFF_FFFF_FFFF_FFFF or 1
        pkeys = self._patient_keys
        pmask = len(pkeys) - 1
        j = patient & pmask
        while (found := pkeys[j]) and found != patient:
            j = (j + 1) & pmask
        if found and self._patient_traits[j] != traits:
            raise _RowError(
                "patient_id",
                f"patient {record.patient_id!r} has another sex or birth_date in an earlier row",
            )
        self._last = None
        keys[i] = case
        self._cases += 1
        if self._cases * 2 > len(keys):
            self._case_keys = self._grown(keys)[0]
        if found:
            return False
        pkeys[j] = patient
        self._patient_traits[j] = traits
        self._patients += 1
        if self._patients * 2 > len(pkeys):
            self._patient_keys, self._patient_traits = self._grown(pkeys, self._patient_traits)
        return True

    def _grown(self, keys: array[int], values: array[int] | None = None) -> tuple[array[int], array[int]]:
        size = len(keys) * 2
        new_keys = array("Q", bytes(8 * size))
        new_values = array("Q", bytes(8 * size)) if values is not None else new_keys
        mask = size - 1
        for j, key in enumerate(keys):
            if key:
                i = key & mask
                while new_keys[i]:
                    i = (i + 1) & mask
                new_keys[i] = key
                if values is not None:
                    new_values[i] = values[j]
        return new_keys, new_values


# --- the reader -------------------------------------------------------------------------

class FractionCheck:
    """Notices a percentage column exported as fractions (0.85 for 85 %): every value in 0..1."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.count = 0
        self.outside = False

    def add(self, value: Decimal | float) -> None:
        self.count += 1
        if not self.outside and not 0 <= value <= 1:
            self.outside = True

    @property
    def suspicious(self) -> bool:
        return self.count > 0 and not self.outside

    def message(self) -> str:
        return (f"{self.column}: all {self.count} value(s) are between 0 and 1 -- a percentage column "
                "exported as fractions? (0.85 is read as 0.85 %, not 85 %; export percent numbers, 0-100)")

    def warn(self, report: ReadReport) -> None:
        if self.suspicious:
            report.warn(self.message())


@dataclass(frozen=True, slots=True)
class Accepted:
    record: CaseRecord
    new_patient: bool


class Admitter:
    """Cross-row checks of parsed rows, in file order: duplicate case ids, one sex/birth date
    per patient, counts and file-level warnings (`finish()` after the last row)."""

    def __init__(self, reader: CaseReader) -> None:
        self.reader = reader
        self.index = CrossRowIndex()
        self.fractions = FractionCheck("improvement_pct")

    def __call__(self, line: int, fields: list[str], item: CaseRecord | Reject) -> Accepted | Reject:
        report = self.reader.report
        if isinstance(item, Reject):
            report.rejected += 1
            return item
        try:
            new_patient = self.index.admit(item)
        except _RowError as exc:
            report.rejected += 1
            return Reject(line, self.reader._values(fields), exc.column, exc.error)
        self.reader._label_warnings(item)
        if item.improvement_pct is not None:
            self.fractions.add(item.improvement_pct)
        report.accepted += 1
        return Accepted(item, new_patient)

    def finish(self) -> None:
        self.fractions.warn(self.reader.report)


class CaseReader:
    """Iterates a case CSV (or an .xlsx sheet) as Accepted/Reject items; file-level problems raise InputError.

    Opening checks the file (encoding, header, required columns) before anything is
    yielded, so a caller can refuse to write anything for an unusable file. A workbook's
    cells are turned into the text a CSV export would hold, then read by the same rules.
    """

    def __init__(self, path: str | Path, mapping: MappingSpec, *, sheet: str | None = None) -> None:
        self.path = Path(path)
        self.mapping = mapping
        self.sheet = sheet
        self.report = ReadReport(file=str(self.path))
        refuse_other_workbook(self.path)
        self.workbook = is_workbook(self.path)
        if self.workbook:
            self.report.encoding = "xlsx"
        elif sheet is not None:
            raise InputError("--sheet applies to .xlsx workbooks only", file=str(self.path))
        else:
            self.report.encoding = detect_encoding(self.path)
        self._errors = "strict"
        if self.report.encoding == "cp1252" and has_utf8_sequences(self.path):
            # UTF-8 with a few stray bytes: read as UTF-8, never silently as cp1252 (mojibake in
            # every name); the rows holding the stray bytes are rejected, naming their line.
            self.report.encoding, self._errors = "utf-8-sig", "surrogateescape"
            self.report.warn("the file is UTF-8 except for stray bytes; rows holding them are rejected "
                             "(re-save the file as UTF-8)")
        self._columns = self._read_header()
        self._rules = RowRules(mapping)
        self._template = dict.fromkeys(CANONICAL_COLUMNS, "")
        self._slots: list[tuple[int, str]] = [(i, name) for i, name in enumerate(self._columns) if name is not None]
        self._every_column_mapped = len(self._slots) == len(self._columns)

    def _open(self) -> TextIO:
        return self.path.open("r", encoding=self.report.encoding, errors=self._errors, newline="")

    def _header_fields(self) -> list[str]:
        if self.workbook:
            for _line, fields in sheet_rows(self.path, self.sheet):
                if any(fields):
                    return fields
            raise InputError("empty sheet (no header row)", file=str(self.path))
        with self._open() as fh:
            first = ""
            for line in fh:
                if line.strip():
                    first = line
                    break
            if not first:
                raise InputError("empty file (no header line)", file=str(self.path))
        self.report.delimiter = _sniff_delimiter(first)
        try:
            return next(csv.reader([first], delimiter=self.report.delimiter))
        except csv.Error as exc:  # e.g. a header field over the csv module's field limit
            raise InputError(f"header line is not readable CSV ({exc}; is this a case CSV?)",
                             file=str(self.path), row=1) from None

    def _read_header(self) -> list[str | None]:
        header = self._header_fields()
        lookup: dict[str, str] = {}
        for name, col in self.mapping.columns.items():
            lookup[name.lower()] = name
            for alias in col.aliases:
                lookup[alias.strip().lower()] = name
        columns: list[str | None] = []
        extras: list[str] = []
        for raw in header:
            key = raw.strip().lstrip("\ufeff").strip().lower()
            canonical = lookup.get(key)
            if canonical is not None and canonical in columns:
                raise InputError(f"column {raw.strip()!r} appears twice in the header", file=str(self.path), row=1)
            columns.append(canonical)
            if canonical is None and key:
                extras.append(raw.strip())
        missing = [c for c in self.mapping.required_columns if c not in columns]
        if missing:
            raise InputError(
                f"missing required column(s): {', '.join(missing)} (is this a case CSV?)",
                file=str(self.path), row=1,
            )
        self._header_warnings([c for c in self.mapping.columns if c not in columns], extras)
        return columns

    def _header_warnings(self, missing: list[str], extras: list[str]) -> None:
        """Name every mapped column the header lacks, with the extra column it was probably renamed to."""
        unmatched = list(extras)
        absent: list[str] = []
        for name in missing:
            guess = _close_match(name, unmatched)
            if guess is None:
                absent.append(name)
                continue
            unmatched.remove(guess)
            self.report.warn(
                f"column {guess!r} is not in the mapping and is ignored: did you mean {name}? "
                f"({name} is missing from the header: rename the column, or add {guess!r} to "
                f"columns.{name}.aliases in a --mapping copy)")
        if absent:
            self.report.warn(f"mapped column(s) missing from the header, read as empty: {', '.join(absent)}")
        if unmatched:
            self.report.warn(f"extra column(s) ignored, kept out of FHIR: {', '.join(unmatched)}")

    def __iter__(self) -> Iterator[Accepted | Reject]:
        admit = self.admitter()
        for line, fields in self.rows():
            yield admit(line, fields, self.parse(line, fields))
        admit.finish()

    # The three steps of `__iter__`, separable so `import --jobs` can parse rows in worker
    # processes (`parse` is row-local) while the main process keeps the cross-row state.
    def rows(self) -> Iterator[tuple[int, list[str]]]:
        """(source line or sheet row, fields) of every non-blank row after the header."""
        if self.workbook:
            rows = (r for r in sheet_rows(self.path, self.sheet) if any(r[1]))
            next(rows, None)  # the header
            yield from rows
            return
        with self._open() as fh:
            # strict: an unterminated quote is an error, not the rest of the file in one field
            reader = csv.reader(fh, delimiter=self.report.delimiter, strict=True)
            header_seen = False
            last_line = 0
            try:
                for fields in reader:
                    start_line = last_line + 1
                    last_line = reader.line_num
                    if not any(f.strip() for f in fields):
                        continue  # blank lines are not rows
                    if not header_seen:
                        header_seen = True
                        continue
                    yield start_line, fields
            except csv.Error as exc:
                why = "unterminated quote" if "end of data" in str(exc) or "EOF" in str(exc) else str(exc)
                raise InputError(f"not a readable CSV ({why}; check the quote characters)",
                                 file=str(self.path), row=last_line + 1) from None
            except UnicodeDecodeError as exc:
                raise InputError(f"unreadable encoding ({exc.reason})", file=str(self.path)) from None

    def parse(self, line: int, fields: list[str]) -> CaseRecord | Reject:
        """The row-local checks of one row (no state: safe in a worker process)."""
        values = self._values(fields)
        try:
            if self._errors == "surrogateescape":
                _check_no_stray_bytes(values)
            if len(fields) > len(self._columns) and any(f.strip() for f in fields[len(self._columns):]):
                raise _RowError("-", f"row has {len(fields)} fields but the header has {len(self._columns)}")
            return parse_row(values, self._rules, line)
        except _RowError as exc:
            return Reject(line, values, exc.column, exc.error)

    def admitter(self) -> Admitter:
        """The cross-row step, in file order (one admitter per pass over the file)."""
        return Admitter(self)

    def _values(self, fields: list[str]) -> dict[str, str]:
        """The row's values by canonical column name (every canonical column present)."""
        values = self._template.copy()
        joined = "".join(fields)
        if "\ufeff" not in joined and "'" not in joined:  # nothing to take off but spaces
            if self._every_column_mapped:
                values.update(zip(self._columns, map(str.strip, fields)))  # type: ignore[arg-type]
            else:
                n = len(fields)
                for i, column in self._slots:
                    if i < n:
                        values[column] = fields[i].strip()
            return values
        for name, raw in zip(self._columns, fields):
            if name is not None:
                # a formula guard (') added by our CSV writers is taken off again
                # a BOM anywhere in a value (files pasted together) is an artefact, not data
                values[name] = unneutralise(raw.replace("\ufeff", "").strip()).strip()
        return values

    def _label_warnings(self, record: CaseRecord) -> None:
        mapping = self.mapping
        if record.indication not in mapping.indications:
            self.report.warn(f"unknown indication label {record.indication!r} kept as text (no code)")
        for label in record.prior_treatments:
            if label not in mapping.prior_treatments:
                self.report.warn(f"unknown prior-treatment label {label!r} kept as text (no code)")
        for label in record.adverse_events:
            if label not in mapping.adverse_events:
                self.report.warn(f"unknown adverse-event label {label!r} kept as text (no code)")
