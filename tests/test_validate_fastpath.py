"""The validation fast path gives the fhir.resources models' verdict, R4 and R5.

Every test feeds the same resource to a warmed fast validator (`Validator(version)`) and to
the model-only validator (`Validator(version, fast=False)`) and wants the same answer:
valid or not, and for invalid resources the same problems (the fast path never words a
problem itself, so they are equal, not just equally many).
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
from fhir_core import types as ft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruxo_fhir.fastvalidate import MISMATCH, NODE_MEMO, OK, UNSURE
from ruxo_fhir.fhir_version import VERSIONS
from ruxo_fhir.importer import case_resources
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.records import CaseReader, Reject
from ruxo_fhir.validate import Validator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cases.csv"
Resource = dict[str, Any]


@functools.cache
def _examples(version: str) -> tuple[Resource, ...]:
    mapping = load_mapping(None)
    reader = CaseReader(EXAMPLE, mapping)
    out = [r for _rec, rs in case_resources(reader, mapping, version, lambda rej: None) for r in rs]  # type: ignore[arg-type]
    assert reader.report.rejected == 0
    return tuple(out)


def examples(version: str) -> list[Resource]:
    return copy.deepcopy(list(_examples(version)))


@functools.cache
def full(version: str) -> Validator:
    return Validator(version, fast=False)  # type: ignore[arg-type]


@functools.cache
def warm(version: str) -> Validator:
    """A fast validator that has seen (and compiled the shapes of) every example resource."""
    v = Validator(version)  # type: ignore[arg-type]
    for res in examples(version):
        assert v.validate(res) == []
    return v


def first(version: str, kind: str, having: str | None = None) -> Resource:
    for res in examples(version):
        if res["resourceType"] == kind and (having is None or having in res):
            return res
    raise AssertionError(f"no {kind} with {having} in the examples")


def same_verdict(version: str, resource: Resource) -> list[Any]:
    got = warm(version).validate(copy.deepcopy(resource))
    want = full(version).validate(copy.deepcopy(resource))
    assert bool(got) == bool(want), (resource, got, want)
    assert got == want
    return got


def fast_check(version: str, resource: Resource) -> int:
    fast = warm(version).fast
    assert fast is not None
    return fast.check(resource)


# --- the examples themselves --------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_example_shape_is_compiled_and_then_proven_valid_without_the_model(version: str) -> None:
    v = warm(version)
    assert v.fast is not None
    assert v.fast.stats.unsupported == 0
    assert v.fast.stats.compiled > 0
    before = v.fast.stats.fast
    resources = examples(version)
    for res in resources:
        assert fast_check(version, res) == OK
        assert v.validate(res) == []
    assert v.fast.stats.fast == before + len(resources)


@pytest.mark.parametrize("version", VERSIONS)
def test_other_valid_values_in_a_known_shape_take_the_fast_path(version: str) -> None:
    cond = first(version, "Condition", "onsetDateTime")
    for onset in ("1999", "1999-12", "2000-02-29", "2021-03-04T05:06:07Z", "2021-03-04T05:06:07.123456+14:00"):
        res = copy.deepcopy(cond)
        res["onsetDateTime"] = onset
        res["id"] = "another-id.1"
        res["code"]["text"] = " leading space is fine for a string "
        assert fast_check(version, res) == OK, onset
        assert same_verdict(version, res) == []


# --- invalid values in a known shape: the fast path must not prove them ---------------------

def _set(res: Resource, path: tuple[Any, ...], value: Any) -> Resource:
    out = copy.deepcopy(res)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


BAD_VALUES: list[tuple[str, str | None, tuple[Any, ...], Any]] = [
    # (resource type, required key, path, bad value)
    ("Condition", "onsetDateTime", ("onsetDateTime",), "2020-02-30"),
    ("Condition", "onsetDateTime", ("onsetDateTime",), "2020-13"),
    ("Condition", "onsetDateTime", ("onsetDateTime",), "2020-1-01"),
    ("Condition", "onsetDateTime", ("onsetDateTime",), "20200101"),
    ("Condition", "onsetDateTime", ("onsetDateTime",), "2020-01-01T10:00:00"),  # a time needs a zone
    ("Condition", "onsetDateTime", ("onsetDateTime",), "2020-01-01T24:00:00Z"),
    ("Condition", "onsetDateTime", ("onsetDateTime",), ""),
    ("Condition", None, ("code", "text"), ""),
    ("Condition", None, ("code", "text"), "\u00a0"),
    ("Condition", None, ("code", "text"), "\u2003\u3000"),
    ("Condition", None, ("code", "text"), "bad \ud800 surrogate"),
    ("Condition", None, ("id",), "a_b"),
    ("Condition", None, ("id",), "x" * 256),
    ("Condition", None, ("id",), ""),
    ("Condition", None, ("id",), "caf\u00e9"),
    ("Condition", None, ("subject", "reference"), ""),
    ("Condition", None, ("clinicalStatus", "coding", 0, "code"), " active"),
    ("Condition", None, ("clinicalStatus", "coding", 0, "code"), "active "),
    ("Condition", None, ("clinicalStatus", "coding", 0, "code"), "act  ive"),
    ("Condition", None, ("clinicalStatus", "coding", 0, "code"), ""),
    ("Condition", None, ("clinicalStatus", "coding", 0, "code"), "a\u00a0\u00a0b"),
    ("Condition", None, ("clinicalStatus", "coding", 0, "system"), "\udfff"),
    ("Observation", "valueQuantity", ("valueQuantity", "value"), math.inf),
    ("Observation", "valueQuantity", ("valueQuantity", "value"), math.nan),
    ("Observation", "valueQuantity", ("status",), "fi  nal"),
    ("Patient", "birthDate", ("birthDate",), "1970-02-29"),
    ("Patient", "birthDate", ("birthDate",), "1970-00"),
    ("Patient", "birthDate", ("birthDate",), "0000"),
    ("Patient", "birthDate", ("birthDate",), "1970-01-01T00:00:00Z"),  # date, not dateTime
    ("Patient", None, ("gender",), ""),
    ("MedicationStatement", "dosage", ("dosage", 0, "timing", "repeat", "frequency"), 0),
    ("MedicationStatement", "dosage", ("dosage", 0, "timing", "repeat", "frequency"), 2 ** 31),
    ("MedicationStatement", "dosage", ("dosage", 0, "timing", "repeat", "period"), 10 ** 30),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind,having,path,bad", BAD_VALUES, ids=[f"{k}-{'.'.join(map(str, p))}-{b!r}"[:60]
                                                                     for k, _, p, b in BAD_VALUES])
def test_a_bad_value_in_a_known_shape_is_caught(version: str, kind: str, having: str | None,
                                                path: tuple[Any, ...], bad: Any) -> None:
    res = _set(first(version, kind, having), path, bad)
    if bad == 10 ** 30:  # a huge decimal: the model accepts it; the fast path leaves it to the model
        assert fast_check(version, res) == UNSURE
        same_verdict(version, res)
        return
    assert fast_check(version, res) == UNSURE  # the shape is known: the value check said "not sure"
    problems = same_verdict(version, res)
    assert problems, "the model must reject it too"


SHAPE_CHANGES: list[tuple[str, str | None, str, Any]] = [
    # (resource type, required key, what, how) -> a shape never compiled: the model decides
    ("Condition", None, "wrong JSON type", lambda r: r["code"].__setitem__("text", 5)),
    ("Condition", None, "wrong JSON type", lambda r: r.__setitem__("id", 12345)),
    ("Observation", "valueQuantity", "wrong JSON type", lambda r: r["valueQuantity"].__setitem__("value", "85")),
    ("Observation", "valueQuantity", "wrong JSON type", lambda r: r["valueQuantity"].__setitem__("value", True)),
    ("Observation", "valueBoolean", "wrong JSON type", lambda r: r.__setitem__("valueBoolean", "true")),
    ("Observation", "valueBoolean", "wrong JSON type", lambda r: r.__setitem__("valueBoolean", 1)),
    ("Observation", None, "wrong JSON type", lambda r: r.__setitem__("status", ["final"])),
    ("Observation", None, "unknown element", lambda r: r.__setitem__("colour", "blue")),
    ("Condition", None, "unknown element", lambda r: r["code"].__setitem__("colour", "blue")),
    ("Observation", None, "missing required element", lambda r: r.pop("status")),
    ("MedicationStatement", None, "missing required element", lambda r: r.pop("status")),
    ("Patient", None, "null value", lambda r: r.__setitem__("gender", None)),
    ("Observation", None, "null in a list", lambda r: r["partOf"].append(None)),
    ("Observation", "valueQuantity", "two choices", lambda r: r.__setitem__("valueBoolean", True)),
    ("Condition", None, "python field name", lambda r: r.__setitem__("clinicalStatus__ext", {"id": "x"})),
    ("Condition", None, "primitive extension", lambda r: r.__setitem__("_onsetDateTime", {"id": "x"})),
    ("Condition", None, "not a list", lambda r: r.__setitem__("category", r["category"][0])),
    ("Condition", None, "resourceType inside", lambda r: r["code"].__setitem__("resourceType", "Patient")),
    ("Condition", None, "another resourceType", lambda r: r.__setitem__("resourceType", "Observation")),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind,having,what,change", SHAPE_CHANGES, ids=[f"{k}-{w}-{i}" for i, (k, _, w, _c)
                                                                          in enumerate(SHAPE_CHANGES)])
def test_a_changed_shape_goes_to_the_model(version: str, kind: str, having: str | None, what: str,
                                           change: Any) -> None:
    res = copy.deepcopy(first(version, kind, having))
    change(res)
    assert fast_check(version, res) in (MISMATCH, UNSURE)
    problems = same_verdict(version, res)
    if what in ("unknown element", "missing required element", "null in a list", "two choices",
                "another resourceType"):
        assert problems, f"{what} must be caught"


# --- each primitive check is sound: it never accepts what the model's type rejects ---------

ANNOTATIONS: dict[str, Any] = {
    "string": ft.StringType, "code": ft.CodeType, "id": ft.IdType, "uri": ft.UriType,
    "canonical": ft.CanonicalType, "markdown": ft.MarkdownType, "oid": ft.OidType,
    "decimal": ft.DecimalType, "integer": ft.IntegerType, "unsignedInt": ft.UnsignedIntType,
    "positiveInt": ft.PositiveIntType, "integer64": ft.Integer64Type, "date": ft.DateType,
    "dateTime": ft.DateTimeType, "instant": ft.InstantType, "boolean": ft.BooleanType,
}


@functools.cache
def adapter(name: str) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(ANNOTATIONS[name])


def model_accepts(name: str, value: Any) -> bool:
    try:
        adapter(name).validate_python(value)
    except (pydantic.ValidationError, ValueError, TypeError):
        return False
    return True


def fast_accepts(name: str, value: Any) -> bool:
    fast = Validator("R4").fast
    assert fast is not None
    return fast.leaf_accepts(name, value)


@functools.cache
def _leaf_checker() -> Any:
    fast = Validator("R4").fast
    assert fast is not None
    return fast


def assert_sound(name: str, value: Any) -> None:
    if _leaf_checker().leaf_accepts(name, value):
        assert model_accepts(name, value), f"{name}: fast path accepts {value!r}, the model does not"


def test_every_primitive_the_compiler_knows_is_tested_here() -> None:
    assert set(_leaf_checker().index.primitives) <= set(ANNOTATIONS)


# Rust's and Python's whitespace classes differ only below U+3001; every character there is
# tried alone and inside a code.
@pytest.mark.parametrize("name", ["string", "code", "id", "uri", "markdown", "oid"])
def test_single_characters_exhaustively(name: str) -> None:
    for cp in [*list(range(12289)), 55296, 57343, 65279, 1114111]:
        c = chr(cp)
        for value in (c, "a" + c + "b", c + "a", "a" + c, "urn:oid:1." + c):
            assert_sound(name, value)


def test_typical_values_are_accepted_by_the_fast_path() -> None:
    f = _leaf_checker()
    for name, value in [("string", "x"), ("string", "Dermatomyositis"), ("code", "final"), ("code", "M33.1"),
                        ("code", "{score}"), ("id", "r0123456789abcdef0123456789abcdef"), ("uri", "http://x"),
                        ("date", "2024-05-14"), ("date", "1962"), ("dateTime", "2022-11"),
                        ("dateTime", "2024-06-14"), ("decimal", 85), ("decimal", 85.5), ("positiveInt", 2),
                        ("instant", "2024-01-02T03:04:05.678Z"), ("boolean", True)]:
        assert f.leaf_accepts(name, value), (name, value)
        assert model_accepts(name, value)


TRICKY_TEXT = st.sampled_from([
    "", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u1680", "\u2028", "\u3000", "\x1c", "\x85", "\x00",
    "a b", "a  b", " a", "a ", "a\tb", "a\nb", "a\u00a0b", "\ud800", "x\udc00", "é", "日本",
    "2020", "2020-02", "2020-02-29", "2021-02-29", "2020-00", "2020-13", "2020-01-32", "0000", "0001-01-01",
    "9999-12-31", "2020-01-01T00:00:00Z", "2020-01-01T00:00:60Z", "2020-01-01T23:59:59.1234567+14:00",
    "2020-01-01T10:00:00+14:01", "2020-01-01T10:00:00-00:00", "2020-01-01T10:00Z", "2020-01-01T10:00:00",
    "urn:oid:1.2.3", "urn:oid:3.1", "urn:oid:1.02", "a_b", "a.b-c", "x" * 255, "x" * 256,
])
DATE_LIKE = st.one_of(
    st.dates().map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.isoformat()[:7]),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.from_regex(r"\A[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2}))?)?)?\Z"),
)
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2 ** 64), max_value=2 ** 64), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2 ** 31 - 1, 2 ** 31, -(2 ** 31), -(2 ** 31) - 1, 10 ** 18, 10 ** 18 - 1, 1e-7, -0.0]),
    st.booleans(),
)
ANY_VALUE = st.one_of(st.text(), TRICKY_TEXT, DATE_LIKE, NUMBERS, st.none())


@settings(max_examples=3000, deadline=None, database=None)
@given(name=st.sampled_from(sorted(ANNOTATIONS)), value=ANY_VALUE)
def test_primitive_checks_are_sound(name: str, value: Any) -> None:
    assert_sound(name, value)


# --- property: mutate the examples; fast and model agree on every mutant -------------------

def _leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*path, i))]
    return [path]


def _node_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(node, dict):
        out += [p for k, v in node.items() for p in _node_paths(v, (*path, k))]
    elif isinstance(node, list):
        out += [p for i, v in enumerate(node) for p in _node_paths(v, (*path, i))]
    return out


def _get(res: Resource, path: tuple[Any, ...]) -> Any:
    node: Any = res
    for part in path:
        node = node[part]
    return node


def _tweak(value: Any, how: int, char: str) -> Any:
    if not isinstance(value, str):
        return value
    return [value + " ", " " + value, value.replace(" ", "  ", 1) if " " in value else value + "  x", "",
            value[:-1], value + char, char + value, value[: len(value) // 2] + char + value[len(value) // 2:],
            value.replace("-", "_"), value.upper()][how % 10]


@st.composite
def mutants(draw: st.DrawFn, version: str) -> Resource:
    res = copy.deepcopy(draw(st.sampled_from(_examples(version))))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.integers(0, 9))
        if kind <= 5:  # a new value for a leaf (most mutants keep the shape)
            path = draw(st.sampled_from(_leaf_paths(res)))
            if path == ("resourceType",):
                continue
            old = _get(res, path)
            if kind <= 3:
                new = _tweak(old, draw(st.integers(0, 9)), draw(st.characters()))
            elif isinstance(old, str):
                new = draw(st.one_of(st.text(max_size=12), TRICKY_TEXT, DATE_LIKE))
            else:
                new = draw(ANY_VALUE)
            _get(res, path[:-1])[path[-1]] = new
        elif kind == 6:  # drop an element
            path = draw(st.sampled_from(_node_paths(res)))
            if path == ("resourceType",):
                continue
            parent = _get(res, path[:-1])
            del parent[path[-1]]
        elif kind == 7:  # add an element (known or not) somewhere
            dicts = [p for p in [(), *_node_paths(res)] if isinstance(_get(res, p), dict)]
            where = _get(res, draw(st.sampled_from(dicts)))
            key = draw(st.sampled_from(["text", "status", "display", "value", "colour", "id", "extension", "_status"]))
            where[key] = draw(st.one_of(TRICKY_TEXT, NUMBERS, st.just([]), st.just({})))
        elif kind == 8:  # repeat a list item
            lists = [p for p in _node_paths(res) if isinstance(_get(res, p), list) and _get(res, p)]
            if lists:
                items = _get(res, draw(st.sampled_from(lists)))
                items.append(copy.deepcopy(items[0]))
        else:  # a structural type change: wrap a value in a list or unwrap a list
            path = draw(st.sampled_from(_node_paths(res)))
            if path == ("resourceType",):
                continue
            old = _get(res, path)
            _get(res, path[:-1])[path[-1]] = old[0] if isinstance(old, list) and old else [old]
    return res


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_and_model_verdicts_agree_on_mutated_examples(version: str, data: st.DataObject) -> None:
    resource = data.draw(mutants(version))
    same_verdict(version, resource)


def test_a_dict_subclass_that_invents_keys_goes_to_the_model() -> None:
    from collections import defaultdict

    res: dict[str, Any] = defaultdict(str, first("R4", "Condition", "onsetDateTime"))
    del res["onsetDateTime"]
    assert fast_check("R4", res) == MISMATCH
    same_verdict("R4", res)


# --- the memo per Coding / CodeableConcept node ----------------------------------------------

CONCEPT_CHANGES: list[tuple[tuple[Any, ...], Any, bool]] = [
    # (path, new value, whether the changed node passes its own tests): the model's verdict goes
    (("clinicalStatus", "coding", 0, "code"), "resolved", True),  # valid: a new memo entry
    (("clinicalStatus", "coding", 0, "code"), "not-a-status", False),  # required binding
    (("clinicalStatus", "coding", 0, "code"), "active ", False),  # code syntax
    (("clinicalStatus", "coding", 0, "system"), "http://example.org/status", False),  # binding: another system
    # a valid coding, but con-3/con-5 (invariants, which read the root) are checked outside the memo
    (("verificationStatus", "coding", 0, "code"), "entered-in-error", True),
    (("category", 0, "coding", 0, "code"), "a\u00a0\u00a0b", False),
    (("code", "coding", 0, "code"), "396230007", False),  # SNOMED check digit: a warning
    (("code", "coding", 1, "code"), "M33.1x", False),  # ICD-10 format: a warning
    (("code", "coding", 2, "display"), "", False),
    (("code", "coding", 2, "display"), "Another display", True),
    (("code", "text"), "\u2003", False),
    (("bodySite", 0, "coding", 0, "system"), "\udfff", False),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path,new,node_ok", CONCEPT_CHANGES,
                         ids=[f"{'.'.join(map(str, p))}-{n!r}" for p, n, _ in CONCEPT_CHANGES])
def test_a_remembered_coding_never_lets_a_changed_one_through(version: str, path: tuple[Any, ...], new: Any,
                                                            node_ok: bool) -> None:
    """The memo is keyed by every leaf of the node: a node that differs from a remembered one in
    any leaf is tested anew, and only a node that passed every test is remembered."""
    v = Validator(version)  # type: ignore[arg-type]
    fast = v.fast
    assert fast is not None
    cond = first(version, "Condition", "onsetDateTime")
    assert v.validate(copy.deepcopy(cond)) == []  # learns the shape (model)
    assert fast.check(copy.deepcopy(cond)) == OK  # fills the memos
    tags = [tag for shape in fast.shapes[tuple(cond)] for tag in shape.node_tags]  # type: ignore[attr-defined]
    memo = fast.memos[NODE_MEMO]

    def entries() -> list[int]:
        return [sum(1 for key in memo if key[0] is tag) for tag in tags]

    assert tags and entries() == [1] * len(tags)
    changed = _set(cond, path, new)
    want = full(version).check(copy.deepcopy(changed))
    for _ in range(2):  # the second time would find a wrongly remembered value
        assert fast.check(copy.deepcopy(changed)) == (UNSURE if want else OK)
        assert v.check(copy.deepcopy(changed)) == want
        assert v.validate(copy.deepcopy(changed)) == [p for p in want if p.severity == "error"]
    assert bool(want) != node_ok or path[0] == "verificationStatus"  # the table says what the model says
    assert sum(entries()) == len(tags) + node_ok
    assert fast.check(copy.deepcopy(cond)) == OK


def test_a_remembered_coding_needs_the_exact_json_types() -> None:
    """Equal is not enough: a str subclass with a remembered value is not proven valid here (the
    leaf's type test comes before the memo), the model decides."""

    class Text(str):
        pass

    v = Validator("R4")
    assert v.fast is not None
    cond = first("R4", "Condition", "onsetDateTime")
    assert v.validate(copy.deepcopy(cond)) == [] and v.fast.check(copy.deepcopy(cond)) == OK
    changed = _set(cond, ("code", "coding", 0, "code"), Text(cond["code"]["coding"][0]["code"]))
    assert v.fast.check(changed) == MISMATCH
    assert v.validate(copy.deepcopy(changed)) == full("R4").validate(copy.deepcopy(changed))


# --- frozen objects: constants shared by resources, checked once per node of a shape ---------

@pytest.mark.parametrize("version", VERSIONS)
def test_a_frozen_object_is_checked_in_full_once_per_node_then_skipped(version: str) -> None:
    frozen: dict[int, Any] = {}
    v = Validator(version, frozen=frozen)  # type: ignore[arg-type]
    assert v.fast is not None
    statement = first(version, "MedicationStatement", "dosage")
    dosage = copy.deepcopy(statement["dosage"])
    frozen[id(dosage)] = dosage

    def holding(value: Any) -> Resource:
        res = copy.deepcopy(statement)
        res["dosage"] = value  # the same key, the same place
        return res

    assert v.validate(holding(dosage)) == []  # the model; the shape is compiled with a guard on dosage
    assert v.fast.check(holding(dosage)) == OK  # a whole check passed: the dosage is remembered there
    # Editing a frozen object breaks the contract, and shows the skip: the edit is not seen...
    dosage[0]["timing"]["repeat"]["frequency"] = 0
    assert v.fast.check(holding(dosage)) == OK
    # ...while an equal object that is not frozen, or a frozen one never proven there, is checked
    assert v.fast.check(holding(copy.deepcopy(dosage))) == UNSURE
    other = copy.deepcopy(dosage)
    frozen[id(other)] = other
    for _ in range(2):  # a failed check never remembers it
        assert v.fast.check(holding(other)) == UNSURE
        assert v.validate(holding(other)) == full(version).validate(holding(other)) != []


FROZEN_CHANGES = [change for change in CONCEPT_CHANGES if change[0][0] != "bodySite"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path,new,node_ok", FROZEN_CHANGES,
                         ids=[f"{'.'.join(map(str, p))}-{n!r}" for p, n, _ in FROZEN_CHANGES])
def test_a_changed_frozen_object_gets_the_model_verdict_every_time(version: str, path: tuple[Any, ...], new: Any,
                                                                 node_ok: bool) -> None:
    """A frozen object is skipped only at a node where a whole check with it passed; one that
    fails a test of its node, or whose test also reads the root (con-5: its strict form), goes
    to the model every time."""
    frozen: dict[int, Any] = {}
    v = Validator(version, frozen=frozen)  # type: ignore[arg-type]
    assert v.fast is not None
    cond = first(version, "Condition", "onsetDateTime")
    top = path[0]
    good = copy.deepcopy(cond[top])
    frozen[id(good)] = good
    assert v.validate({**copy.deepcopy(cond), top: good}) == []  # compiled with a guard at `top`
    changed = _set(cond, path, new)
    node = changed[top]
    frozen[id(node)] = node
    want = full(version).check(copy.deepcopy(changed))
    for _ in range(3):  # from the second time on, a wrongly remembered object would be skipped
        assert v.fast.check({**copy.deepcopy(changed), top: node}) == (UNSURE if want else OK)
        assert v.check({**copy.deepcopy(changed), top: node}) == want
    assert v.fast.check({**copy.deepcopy(cond), top: good}) == OK


@pytest.mark.parametrize("version", VERSIONS)
def test_the_import_shares_its_constants_with_the_validator_and_gets_the_same_verdicts(version: str) -> None:
    from ruxo_fhir.importer import _CaseBuilder

    mapping = load_mapping(None)
    builder = _CaseBuilder(mapping, version, share_constants=True)  # type: ignore[arg-type]
    assert builder.validator.fast is not None and builder.mapper.constants
    assert builder.validator.fast.frozen is builder.mapper.constants
    for _ in range(2):  # the second pass skips the constants already proven
        for item in CaseReader(EXAMPLE, mapping):
            assert not isinstance(item, Reject)
            resources, problem = builder.build(item.record, item.new_patient)
            assert problem is None
            assert [full(version).validate(copy.deepcopy(r)) for r in resources] == [[]] * len(resources)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_frozen_object_proven_at_one_node_is_checked_again_at_another(version: str) -> None:
    """Proven means proven at that node of that shape: the same frozen concept moved to a node
    with another binding (clinicalStatus -> verificationStatus), or nested frozen objects
    (a frozen list holding a frozen dict), get the model's verdict on every pass."""
    cond = first(version, "Condition", "onsetDateTime")
    clinical, verification = copy.deepcopy(cond["clinicalStatus"]), copy.deepcopy(cond["verificationStatus"])
    category = copy.deepcopy(cond["category"])
    frozen: dict[int, Any] = {id(o): o for o in (clinical, verification, category, category[0])}
    v = Validator(version, frozen=frozen)  # type: ignore[arg-type]
    assert v.fast is not None
    good = {**copy.deepcopy(cond), "clinicalStatus": clinical, "verificationStatus": verification,
            "category": category}
    swapped = {**good, "verificationStatus": clinical}  # a clinical status code where a verification one goes
    inner = {**good, "category": [category[0]]}  # the frozen dict in a list that is not frozen
    want = full(version).validate(copy.deepcopy(swapped))
    assert want  # the binding of verificationStatus refuses it
    for _ in range(3):  # from the second pass on, `good`'s objects are remembered at their nodes
        assert v.validate(good) == []
        assert v.fast.check(good) == OK
        assert v.validate(swapped) == want
        assert v.validate(inner) == full(version).validate(copy.deepcopy(inner)) == []
