"""Offline terminology checks that a FHIR validator without a terminology server cannot make.

They give warnings, not errors: a code can be well-formed and still not exist, and a site may
knowingly use a local system. What is checked (no network, no code tables):

- SNOMED CT (`http://snomed.info/sct`): an SCTID is 6-18 digits without a leading zero, its last
  digit is a Verhoeff check digit, and the partition identifier (2nd and 3rd digit from the right)
  says what it identifies -- a code in a Coding must be a concept id (partition 00 or 10), not a
  description (01/11) or relationship (02/12). Postcoordinated expressions are left alone.
- ICD-10 (`http://hl7.org/fhir/sid/icd-10`, `.../icd-10-cm`): code shape, e.g. `M331` is flagged,
  ICD-10 writes `M33.1`.
- UCUM (`http://unitsofmeasure.org`): a Quantity's code must parse as a UCUM unit expression (the
  UCUM grammar with the atoms of the UCUM essence that clinical data uses; see `ucum_valid`).
- A code system that is not an absolute URI (`snomed`, `ICD10`): a system must be a URL, a URN
  (`urn:oid:`, `urn:uuid:`) or another absolute URI.
"""
from __future__ import annotations

import re
from functools import lru_cache

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"

# A warning: (rule id, message).
Warning_ = tuple[str, str]

# --- SNOMED CT -----------------------------------------------------------------------------

_D = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
      (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
      (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
      (9, 8, 7, 6, 5, 4, 3, 2, 1, 0))
_P = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
      (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
      (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8))


def verhoeff_ok(digits: str) -> bool:
    """True when the last digit of `digits` is the Verhoeff check digit of the others."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _D[c][_P[i % 8][ord(ch) - 48]]
    return c == 0


def snomed_code(code: str) -> Warning_ | None:
    if not code.isascii() or not code.isdigit():
        if any(ch in code for ch in ":|=+{()"):
            return None  # a postcoordinated expression: not an SCTID
        return ("snomed-sctid", f"SNOMED CT code '{code}' is not an SCTID (6-18 digits)")
    if not 6 <= len(code) <= 18 or code[0] == "0":
        return ("snomed-sctid", f"SNOMED CT code '{code}' is not an SCTID (6-18 digits, no leading zero)")
    if not verhoeff_ok(code):
        return ("snomed-check-digit", f"SNOMED CT code '{code}' has a wrong check digit (Verhoeff)")
    partition = code[-3:-1]
    if partition not in ("00", "10"):
        what = {"01": "a description id", "11": "a description id", "02": "a relationship id",
                "12": "a relationship id"}.get(partition, f"partition '{partition}'")
        return ("snomed-partition", f"SNOMED CT code '{code}' is {what}, not a concept id (partition 00 or 10)")
    return None


# --- ICD-10 --------------------------------------------------------------------------------

_ICD10_WHO = re.compile(r"[A-Z][0-9]{2}(?:\.[0-9]{1,2})?[+*†]?").fullmatch
_ICD10_CM = re.compile(r"[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?").fullmatch
_ICD10_NODOT = re.compile(r"([A-Z][0-9][0-9A-Z])([0-9A-Z]{1,4})").fullmatch
_ICD10_RANGE = re.compile(r"[A-Z][0-9]{2}-[A-Z][0-9]{2}").fullmatch  # chapter/block codes (e.g. A00-B99)


def icd10_code(code: str, system: str) -> Warning_ | None:
    check = _ICD10_CM if system == ICD10_CM else _ICD10_WHO
    if check(code) or _ICD10_RANGE(code) or (system == ICD10 and re.fullmatch(r"[IVXL]+", code)):
        return None
    fixed = code.strip().upper()
    nodot = _ICD10_NODOT(fixed)
    if nodot:
        fixed = f"{nodot.group(1)}.{nodot.group(2)}"
    if check(fixed):
        return ("icd10-format", f"ICD-10 code '{code}' is not written as ICD-10 writes it ({fixed})")
    return ("icd10-format", f"'{code}' is not an ICD-10 code (letter, two digits, optional dot and subcode)")


# --- BCP-47 language tags ------------------------------------------------------------------

BCP47 = "urn:ietf:bcp:47"
# RFC 5646 syntax; the primary language subtag is an ISO 639 code (2-3 letters): the 4-8 letter
# forms the grammar reserves are not in the IANA registry, so 'english' is not a tag.
_BCP47 = re.compile(
    r"(?:[A-Za-z]{2,3}(?:-[A-Za-z]{3}){0,3}(?:-[A-Za-z]{4})?(?:-(?:[A-Za-z]{2}|[0-9]{3}))?"
    r"(?:-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*(?:-[0-9A-WYZa-wyz](?:-[A-Za-z0-9]{2,8})+)*"
    r"(?:-[xX](?:-[A-Za-z0-9]{1,8})+)?|[xX](?:-[A-Za-z0-9]{1,8})+|i-[A-Za-z]{3,8})").fullmatch


def bcp47_ok(tag: str) -> bool:
    """Whether `tag` is a well-formed BCP-47 language tag (e.g. en, en-US, de-CH, zh-Hant-TW)."""
    return _BCP47(tag) is not None


# --- code system URIs ----------------------------------------------------------------------

_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s]+").fullmatch


def system_uri(system: str) -> Warning_ | None:
    if _ABSOLUTE_URI(system):
        return None
    return ("system-uri", f"code system '{system}' is not an absolute URI (e.g. http://snomed.info/sct)")


# --- UCUM ----------------------------------------------------------------------------------

_PREFIXES = {
    "Y": 24, "Z": 21, "E": 18, "P": 15, "T": 12, "G": 9, "M": 6, "k": 3, "h": 2, "da": 1, "d": -1,
    "c": -2, "m": -3, "u": -6, "n": -9, "p": -12, "f": -15, "a": -18, "z": -21, "y": -24,
    "Ki": 0, "Mi": 0, "Gi": 0, "Ti": 0,
}
# Metric atoms (prefixes allowed), from the UCUM essence: base units, SI and other metric units.
_METRIC = {"m", "s", "g", "rad", "K", "C", "cd", "mol", "sr", "Hz", "N", "Pa", "J", "W", "A", "V", "F", "Ohm", "S", "Wb", "Cel", "T", "H", "lm", "lx", "Bq", "Gy", "Sv", "l", "L", "ar", "t", "bar", "u", "eV", "pc", "[c]", "[h]", "[k]", "[eps_0]", "[mu_0]", "[e]", "[m_e]", "[m_p]", "[G]", "[g]", "atm", "[ly]", "gf", "Ky", "Gal", "dyn", "erg", "P", "St", "Mx", "G", "Oe", "Gb", "sb", "Lmb", "ph", "Ci", "R", "RAD", "REM", "cal", "[iU]", "[IU]", "mho", "st", "Np", "B", "B[SPL]", "B[V]", "B[mV]", "B[uV]", "B[10.nV]", "B[W]", "B[kW]", "bit", "By", "Bd", "osm", "eq", "kat", "U", "mo_g", "AU", "asu"}
# Non-metric atoms (no prefixes), the ones clinical data uses and their families.
_NONMETRIC = {"10*", "10^", "[pi]", "%", "[ppth]", "[ppm]", "[ppb]", "[pptr]", "gon", "deg", "'", "''", "min", "h", "d", "a_t", "a_j", "a_g", "a", "wk", "mo_s", "mo_j", "mo", "mo_g", "[in_i]", "[ft_i]", "[yd_i]", "[mi_i]", "[fth_i]", "[nmi_i]", "[kn_i]", "[sin_i]", "[sft_i]", "[syd_i]", "[cin_i]", "[cft_i]", "[cyd_i]", "[bf_i]", "[cr_i]", "[mil_i]", "[cml_i]", "[hd_i]", "[lb_av]", "[oz_av]", "[dr_av]", "[scwt_av]", "[lcwt_av]", "[ston_av]", "[lton_av]", "[stone_av]", "[gr]", "[pwt_tr]", "[oz_tr]", "[lb_tr]", "[sc_ap]", "[dr_ap]", "[oz_ap]", "[lb_ap]", "[oz_m]", "[gal_us]", "[bbl_us]", "[qt_us]", "[pt_us]", "[gil_us]", "[foz_us]", "[fdr_us]", "[min_us]", "[crd_us]", "[bu_us]", "[gal_wi]", "[pk_us]", "[dqt_us]", "[dpt_us]", "[tbs_us]", "[tsp_us]", "[cup_us]", "[foz_m]", "[cup_m]", "[tsp_m]", "[tbs_m]", "[gal_br]", "[pk_br]", "[bu_br]", "[qt_br]", "[pt_br]", "[gil_br]", "[foz_br]", "[fdr_br]", "[min_br]", "[drp]", "[pH]", "[degF]", "[degR]", "[degRe]", "[Cal]", "[Btu]", "[HP]", "[CFU]", "[PFU]", "[FFU]", "[BAU]", "[AU]", "[arb'U]", "[USP'U]", "[GPL'U]", "[MPL'U]", "[APL'U]", "[beth'U]", "[anti'Xa'U]", "[todd'U]", "[dye'U]", "[smgy'U]", "[bdsk'U]", "[ka'U]", "[knk'U]", "[mclg'U]", "[tb'U]", "[hnsf'U]", "[lf]", "[D'ag'U]", "[FEU]", "[ELU]", "[EU]", "[S]", "[HPF]", "[LPF]", "[MET]", "[mesh_i]", "[ch]", "[Ch]", "[hp'_X]", "[hp'_C]", "[hp'_M]", "[hp'_Q]", "[kp_X]", "[kp_C]", "[kp_M]", "[kp_Q]", "[srd_us]", "[rch_us]", "[rlk_us]", "[lk_us]", "[rd_us]", "[ft_us]", "[yd_us]", "[in_us]", "[mi_us]", "[acr_us]", "[smi_us]", "[sct]", "[twp]", "[mil_us]", "[ch_us]", "[fur_us]", "[in_br]", "[ft_br]", "[rd_br]", "[ch_br]", "[lk_br]", "[fth_br]", "[pc_br]", "[yd_br]", "[mi_br]", "[nmi_br]", "[kn_br]", "[acr_br]", "[psi]", "[diop]", "[p'diop]", "%[slope]", "[IR]", "[iU]", "[pca]", "[pca_pr]", "[mm_Hg]", "mm[Hg]", "cm[H2O]", "m[H2O]", "m[Hg]", "[in_i'H2O]", "[in_i'Hg]", "[wood'U]", "[PRU]", "[Amb'a'1'U]", "[lne]", "[pnt]", "[pied]", "[pouce]", "[ligne]", "[didot]", "[cicero]", "[pnt_pr]", "[car_m]", "[car_Au]", "[smoot]", "[m/s2/Hz^(1/2)]", "[NTU]", "[PNU]", "[Lf]", "[CCID_50]", "[TCID_50]", "[EID_50]", "[Btu_39]", "[Btu_59]", "[Btu_60]", "[Btu_m]", "[Btu_th]", "[Btu_IT]", "cal_[15]", "cal_[20]", "cal_m", "cal_IT", "cal_th", "[den]", "[tex]"}
# Metric atoms that are written with a bracketed suffix (m[H2O] etc.) are in _METRIC via the parser.
_METRIC |= {"m[H2O]", "m[Hg]", "g%", "[iU]", "[IU]", "cal_[15]", "cal_[20]", "cal_m", "cal_IT", "cal_th"}

def _atom_ok(symbol: str) -> bool:
    if symbol in _METRIC or symbol in _NONMETRIC:
        return True
    for n in (2, 1):
        prefix, rest = symbol[:n], symbol[n:]
        if prefix in _PREFIXES and rest in _METRIC:
            return True
    return False


@lru_cache(maxsize=4096)
def ucum_valid(code: str) -> bool:
    """A UCUM unit expression check: the UCUM grammar (terms with `.` and `/`, exponents,
    parentheses, factors, annotations) over the known atoms and prefixes (case sensitive)."""
    if not code or code != code.strip() or " " in code:
        return False
    parser = _UcumParser(code)
    try:
        parser.main_term()
    except ValueError:
        return False
    return parser.pos == len(code)


class _UcumParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def main_term(self) -> None:
        if self.peek() == "/":
            self.pos += 1
        self.term()

    def term(self) -> None:
        self.component()
        while self.peek() in (".", "/") and self.peek():
            self.pos += 1
            self.component()

    def component(self) -> None:
        if self.peek() == "(":
            self.pos += 1
            self.term()
            if self.peek() != ")":
                raise ValueError("unbalanced parenthesis")
            self.pos += 1
            self._annotation()
            return
        if self.peek() == "{":
            self._annotation(required=True)
            return
        start = self.pos
        if self.peek().isdigit():  # a factor (integer), possibly with an annotation
            while self.peek().isdigit():
                self.pos += 1
            if self.text[self.pos:self.pos + 1] in ("*", "^"):  # 10* / 10^ special units
                self.pos = start
            else:
                self._annotation()
                return
        self._simple_unit_with_exponent()
        self._annotation()

    def _annotation(self, required: bool = False) -> None:
        if self.peek() != "{":
            if required:
                raise ValueError("annotation expected")
            return
        end = self.text.find("}", self.pos)
        if end < 0:
            raise ValueError("unclosed annotation")
        body = self.text[self.pos + 1:end]
        if "{" in body or any(not (33 <= ord(c) <= 126 or c == " ") for c in body):
            raise ValueError("bad annotation")
        self.pos = end + 1

    def _simple_unit_with_exponent(self) -> None:
        # Read the longest run of symbol characters (brackets kept whole), then find the
        # longest prefix that is an atom (with or without a metric prefix); the rest must be
        # an exponent.
        start = self.pos
        i = self.pos
        text = self.text
        while i < len(text):
            c = text[i]
            if c == "[":
                end = text.find("]", i)
                if end < 0:
                    raise ValueError("unclosed bracket")
                i = end + 1
            elif c in "./(){}" or c.isspace():
                break
            else:
                i += 1
        run = text[start:i]
        if not run:
            raise ValueError("unit expected")
        for cut in range(len(run), 0, -1):
            atom, rest = run[:cut], run[cut:]
            if _atom_ok(atom) and (rest == "" or re.fullmatch(r"[+-]?[0-9]+", rest)):
                self.pos = start + len(run)
                return
        raise ValueError(f"unknown unit {run!r}")


def ucum_code(code: str) -> Warning_ | None:
    if ucum_valid(code):
        return None
    return ("ucum", f"'{code}' is not a valid UCUM unit code")


def coding_warnings(system: str | None, code: str | None) -> list[Warning_]:
    """Warnings for one (system, code) of a Coding."""
    out: list[Warning_] = []
    if isinstance(system, str):
        bad = system_uri(system)
        if bad:
            out.append(bad)
        elif isinstance(code, str):
            found = None
            if system == SNOMED:
                found = snomed_code(code)
            elif system in (ICD10, ICD10_CM):
                found = icd10_code(code, system)
            elif system == UCUM:
                found = ucum_code(code)
            elif system == BCP47 and not bcp47_ok(code):
                found = ("bcp-47", f"'{code}' is not a BCP-47 language tag (e.g. en, en-US, fr-CH)")
            if found:
                out.append(found)
    return out


def quantity_warnings(system: str | None, code: str | None) -> list[Warning_]:
    """Warnings for a Quantity's system and code (UCUM units when the system is UCUM)."""
    out: list[Warning_] = []
    if isinstance(system, str):
        bad = system_uri(system)
        if bad:
            out.append(bad)
        elif system == UCUM and isinstance(code, str):
            found = ucum_code(code)
            if found:
                out.append(found)
    return out
