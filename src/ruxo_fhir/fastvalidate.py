"""A compiled fast path for validating many resources of the same structure.

The fhir.resources models are the reference. The fast path never decides on its own that a
resource is invalid; it only proves some resources valid, and everything else goes to the model:

1. The first resource of a structural *shape* (dict keys, list lengths, nesting, the JSON type of
   every leaf, the resourceType) is validated by the model. If the model accepts it, the shape
   is compiled into a Python function that checks that a later resource has exactly this shape
   and that every primitive leaf is *surely valid* for its FHIR primitive type.
2. For a fixed shape the model's verdict depends on the leaf values only through the per-field
   primitive validators: its model-level validators (required primitives, one-of-many choice
   elements, null-in-list, extra keys, resourceType) depend on which keys are present, which the
   shape fixes. So "same shape as a valid resource and every leaf surely valid" implies "valid".
3. Each leaf check is conservative: it accepts a value only when the model's validator for that
   primitive type (fhir_core.types: pydantic-core Rust regexes, date parsing, integer bounds)
   certainly accepts it, and answers "not sure" otherwise (a leap second, a non-ASCII code, an
   id pattern changed in fhir_core.constraints, ...). "Not sure" sends the resource to the model.

4. The spec's rules (`ruxo_fhir.conformance`) are compiled into the same shape check when the
   model and the rules accepted the first resource of the shape: what the shape decides
   (cardinality, ele-1/ext-1, invariants `Invariant.shape_proof` proves) costs nothing later;
   bound codes, terminology warnings (memo per distinct value) and the other invariants (native
   provers, else fhirpathpy memoised on the values read) are checked per resource, and a failure
   there answers "not sure", so the slow path words the finding.

5. Objects a caller shares between resources and never edits, nor anything inside them
   (`FastPath(frozen=...)`: the import's constant concepts and dosages) are checked once per
   node of a shape: a node that held one when the shape was compiled gets a guard, and once a
   whole check with an object there passed, that object skips the node's structure and the
   tests reading only its leaves.

The verdict is therefore the model's verdict, only cheaper; the problems reported for an
invalid resource always come from the model. The primitive type of each element is read from
the model classes' field annotations (cached per class), not from a hand-written table. Element
kinds the compiler does not know (contained resources, primitive extensions `_x`, url, time,
uuid, base64Binary, xhtml, JSON null, empty lists or objects, a JSON type other than the
primitive's own) make the shape "model only". tests/test_validate_fastpath.py holds the
equivalence tests.
"""
from __future__ import annotations

import datetime
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ruxo_fhir.resource import Resource

if TYPE_CHECKING:
    from ruxo_fhir.conformance import Invariant, Rules, Trace

Check = Callable[[Any], bool]
ShapeCheck = Callable[[Resource], int]

# Return values of a compiled shape check.
OK, MISMATCH, UNSURE = 0, 1, 2

MAX_SHAPES_PER_KEY = 64
MAX_SHAPES = 4096
MAX_NODES = 2000  # larger resources (say a big Bundle) are left to the model
MEMO_LIMIT = 50_000  # per primitive type: values already proven valid
MAX_FROZEN = 256  # per node of a shape: frozen objects proven there (see FastPath)
NODE_MEMO = "(nodes)"  # the key in FastPath.memos of the memo of Coding / CodeableConcept nodes
_MEMO_KINDS = frozenset({"Coding", "CodeableConcept"})
# builtins the generated checks use, bound as default arguments: a local read is cheaper
_LOCALS = "type=type, len=len, id=id, str=str, int=int, float=float, bool=bool, dict=dict, list=list"


# --- primitive leaf checks: True only when the model surely accepts the value -------------

def _no_surrogates(value: str) -> bool:
    """pydantic-core rejects strings that are not valid Unicode (lone surrogates)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _string(value: str) -> bool:
    # Model: Rust regex search '[ \r\n\t\S]+'. Rust's White_Space is a subset of Python's
    # str.isspace(), so a character that is not isspace() matches \S in Rust.
    return bool(value) and not value.isspace() and _no_surrogates(value)


def _any_text(value: str) -> bool:
    # uri / canonical / markdown: the model's patterns ('\S*', '\s*(\S|\s)*') match any string.
    return _no_surrogates(value)


# Model: Rust '^[^\s]+(\s[^\s]+)*$'. Python's [^\s] is a subset of Rust's; the separators
# listed are whitespace in both.
_CODE = re.compile(r"[^\s]+(?:[\t\n\x0b\x0c\r ][^\s]+)*").fullmatch
_OID = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+").fullmatch
_DECIMAL_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?").fullmatch


def _code(value: str) -> bool:
    return _CODE(value) is not None and _no_surrogates(value)


def _oid(value: str) -> bool:
    return _OID(value) is not None


def _id_pattern() -> Callable[[str], re.Match[str] | None] | None:
    """The id rule as fhir_core builds it (constraints may be patched): None = not known."""
    from fhir_core import constraints

    if getattr(constraints, "TYPES_ID_PATTERN", None) != r"^[A-Za-z0-9\-.]+$":
        return None
    max_len = getattr(constraints, "TYPES_ID_MAX_LENGTH", None)
    if not isinstance(max_len, int) or max_len < 1:
        return None
    return re.compile(rf"[A-Za-z0-9\-.]{{1,{max_len}}}").fullmatch


def _valid_day(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _date_checks() -> tuple[Check, Check, Check]:
    from fhir_core.types import Date, DateTime, Instant

    date_re, datetime_re, instant_re = Date.pattern.fullmatch, DateTime.pattern.fullmatch, Instant.pattern.fullmatch

    def date(value: str) -> bool:
        if date_re(value) is None:
            return False
        return len(value) < 10 or _valid_day(value)  # YYYY and YYYY-MM (month <= 12 by the regex)

    def time_part_sure(value: str) -> bool:
        # value matched the FHIR regex and has a time: the zone is present by the regex.
        # Leap seconds and more than microsecond precision are left to the model.
        if value[17:19] == "60":
            return False
        rest = value[19:]
        if rest.startswith("."):
            digits = len(rest) - len(rest.lstrip(".0123456789")) - 1
            if digits > 6:
                return False
        return _valid_day(value[:10])

    def date_time(value: str) -> bool:
        if datetime_re(value) is None:
            return False
        if len(value) < 10:
            return True
        if len(value) == 10:
            return _valid_day(value)
        return time_part_sure(value)

    def instant(value: str) -> bool:
        return instant_re(value) is not None and time_part_sure(value)

    return date, date_time, instant


def _number_decimal(value: int | float) -> bool:
    if type(value) is int:
        return -(10 ** 18) < value < 10 ** 18
    return math.isfinite(value) and _DECIMAL_TEXT(repr(value)) is not None


# --- element descriptions from the model classes -----------------------------------------

@dataclass(frozen=True)
class Primitive:
    """A primitive FHIR type: the exact JSON types accepted and how a leaf is checked.

    `test` is a Python expression over `{v}` that is true when the value is surely valid
    (None: every value of the JSON types is valid); `memo` caches values proven valid.
    """

    name: str
    json_types: tuple[type, ...]
    test: str | None
    check: Check | None = None  # the same test as a function (for memo and for tests)
    memo: bool = False


@dataclass(frozen=True)
class Element:
    """One element of a model class: a primitive or a complex type, single or a list."""

    kind: Primitive | type | None  # None: not handled by the fast path
    is_list: bool


_BIG = 10 ** 18
# Names the generated code may use (see Primitive.test).
_ENV: dict[str, Any] = {"_nosur": _no_surrogates, "_numdec": _number_decimal, "_code": _code, "_oid": _OID}


def _primitives() -> dict[str, Primitive]:
    date, date_time, instant = _date_checks()
    text = "({v}.isascii() or _nosur({v}))"
    table = [
        Primitive("string", (str,), "{v} and not {v}.isspace() and " + text, _string),
        Primitive("code", (str,), None, _code, memo=True),
        Primitive("uri", (str,), text, _any_text),
        Primitive("canonical", (str,), text, _any_text),
        Primitive("markdown", (str,), text, _any_text),
        Primitive("oid", (str,), "_oid({v}) is not None", _oid),
        Primitive("boolean", (bool,), None),
        Primitive("decimal", (int, float), f"(type({{v}}) is int and -{_BIG} < {{v}} < {_BIG}) or _numdec({{v}})",
                  _number_decimal),
        Primitive("integer", (int,), "-2147483648 <= {v} <= 2147483647"),
        Primitive("unsignedInt", (int,), "0 <= {v} <= 2147483647"),
        Primitive("positiveInt", (int,), "1 <= {v} <= 2147483647"),
        Primitive("integer64", (int,), "-9223372036854775807 <= {v} <= 9223372036854775807"),
        Primitive("date", (str,), None, date, memo=True),
        Primitive("dateTime", (str,), None, date_time, memo=True),
        Primitive("instant", (str,), None, instant, memo=True),
    ]
    id_pattern = _id_pattern()
    if id_pattern is not None:
        _ENV["_id"] = id_pattern
        table.append(Primitive("id", (str,), "_id({v}) is not None", lambda v: id_pattern(v) is not None))
    return {p.name: p for p in table}


_UNION_TYPES: tuple[Any, ...] = (typing.Union, types.UnionType)


class ModelIndex:
    """Element descriptions per model class, read from the field annotations when first needed.

    Only the elements a shape has are described: describing a complex element loads (and has
    pydantic build) its model class, and a resource uses few of its type's elements."""

    def __init__(self) -> None:
        self.primitives = _primitives()
        self._fields: dict[type, dict[str, Any]] = {}
        self._elements: dict[tuple[type, str], Element | None] = {}

    def element(self, cls: type, key: str) -> Element | None:
        """The element `key` (its JSON name) of `cls`; None when the class has no such element
        (or the fast path handles none of its kind: comments, primitive extensions)."""
        if (cls, key) not in self._elements:
            annotation = self._annotations(cls).get(key, _MISSING)
            self._elements[(cls, key)] = None if annotation is _MISSING else self._describe(annotation)
        return self._elements[(cls, key)]

    def _annotations(self, cls: type) -> dict[str, Any]:
        found = self._fields.get(cls)
        if found is None:
            found = self._fields[cls] = {}
            fields: dict[str, Any] = getattr(cls, "model_fields", {})
            for name, info in fields.items():
                if name == "fhir_comments" or name.endswith("__ext"):
                    continue  # the fast path handles neither comments nor primitive extensions
                found[info.alias or name] = info.annotation
        return found

    def _describe(self, annotation: Any) -> Element:
        from fhir_core.types import FhirBase, FhirElementOrResourceBase

        ann, is_list = annotation, False
        while True:
            origin = typing.get_origin(ann)
            if origin in _UNION_TYPES:
                args = [a for a in typing.get_args(ann) if a is not type(None)]
                if len(args) != 1:
                    return Element(None, is_list)
                ann = args[0]
            elif origin is list:
                if is_list:
                    return Element(None, is_list)
                is_list, ann = True, typing.get_args(ann)[0]
            else:
                break
        if ann is bool:
            return Element(self.primitives["boolean"], is_list)
        if typing.get_origin(ann) is typing.Annotated:
            for meta in typing.get_args(ann)[1:]:
                name = getattr(meta, "__visit_name__", None)
                if isinstance(name, str):
                    return Element(self.primitives.get(name), is_list)
            return Element(None, is_list)
        if isinstance(ann, type) and issubclass(ann, FhirBase) and not issubclass(ann, FhirElementOrResourceBase):
            try:
                return Element(ann.get_model_klass(), is_list)
            except (ImportError, AttributeError, ValueError):
                return Element(None, is_list)
        return Element(None, is_list)


# --- the shape compiler ------------------------------------------------------------------

class _Unsupported(Exception):
    pass


class _Compiler:
    """Writes the Python source of one shape check (straight-line code, no recursion)."""

    def __init__(self, index: ModelIndex, memos: dict[str, set[Any]],
                 frozen: Mapping[int, Any] | None = None) -> None:
        self.index = index
        self.memos = memos
        self.frozen = frozen if frozen is not None else {}
        # nodes of the resource being compiled that hold a frozen object: (variable, first and
        # end index in `lines` of the structure lines below the node)
        self.frozen_nodes: list[tuple[str, int, int]] = []
        self.vars: dict[tuple[Any, ...], str] = {(): "r"}  # JSON path -> variable holding it
        self.lines: list[str] = []
        self.env: dict[str, Any] = {"_slow": _slow, **_ENV}
        self.counter = 0
        self.nodes = 0
        # value tests (`return 2`), each with the path of the node it reads (None: reads more,
        # say an invariant given the root) and a stricter test on leaves alone (or None);
        # emitted after the structure, see `value_tests`
        self.tests: list[tuple[tuple[Any, ...] | None, str, str | None]] = []
        self.concepts: list[tuple[Any, ...]] = []  # paths of Coding / CodeableConcept nodes
        self.leaves: list[tuple[tuple[Any, ...], str, Primitive]] = []  # (path, variable, kind)
        self.node_tags: list[object] = []  # the tags of this shape's nodes in the node memo

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, value: Any, prefix: str = "K") -> str:
        key = self.name(prefix)
        self.env[key] = value
        return key

    def emit(self, line: str, depth: int = 2) -> None:
        self.lines.append("    " * depth + line)

    def test(self, condition: str, path: tuple[Any, ...] | None, *, strict: str | None = None) -> None:
        """A value test: the resource is not proven valid (`return 2`) when `condition` holds.
        `path`: the node whose leaves alone decide the test (None: it reads more). `strict`, for
        a test that reads more: a condition on the same leaves alone that holds whenever
        `condition` does (it may hold more often: then the model decides); used where the
        leaves belong to a frozen node (see `frozen_guards`)."""
        self.tests.append((path, condition, condition if path is not None else strict))

    def compile(self, cls: type, resource: Resource, rules: RuleChecks | None = None,
                trace: Trace | None = None) -> ShapeCheck:
        # A dict has the shape's keys exactly when it has as many keys and every one of them
        # can be read: a missing key raises KeyError, which means another shape.
        keys = [k for k in resource if k != "resourceType"]
        self.emit(f"if len(r) != {len(resource)} or r['resourceType'] != {self.const(resource['resourceType'])}: "
                  "return 1", 2)
        self.object_body("r", cls, resource, keys, ())
        if rules is not None and trace is not None:
            self.rule_checks(rules, trace, resource)
        # Structure first (reads, JSON types, key counts, list lengths: `return 1`), values after
        # (`return 2`, which only read variables): a resource of another shape of the same keys
        # is turned away before any value is tested.
        lines, learn = self.frozen_guards(self.value_tests())
        source = (f"def check(r, {_LOCALS}):\n    try:\n" + "\n".join(lines)
                  + "\n    except KeyError:\n        return 1\n" + "".join(learn) + "    return 0\n")
        exec(compile(source, f"<fhir shape {resource.get('resourceType')}>", "exec"), self.env)
        check: ShapeCheck = self.env["check"]
        check.__doc__ = source  # for debugging: the generated code
        check.node_tags = self.node_tags  # type: ignore[attr-defined]  # for tests
        return check

    def frozen_guards(self, blocks: list[tuple[list[str], list[str] | None]]) -> tuple[list[str], list[str]]:
        """All lines (structure, then value tests), with the parts about a node that held a
        frozen object (see `FastPath`) under a guard; and the lines that, once the resource is
        proven valid, remember the frozen objects its guarded parts checked.

        Per such node, the guard skips its structure lines and the tests that read only its
        leaves when the node holds an object that a whole check has already passed there: the
        object is never edited, so those lines would answer as they did then. A test that
        reads the node's leaves together with other variables makes the node unguarded; one
        that reads more than leaves (an invariant given the root) is replaced by its `strict`
        form there, or makes it unguarded when it has none."""
        flat = self.lines + [line for block, _ in blocks for line in block]
        if not self.frozen_nodes:
            return flat, []
        refs = [set(_VAR_REF.findall("\n".join(block))) for block, _ in blocks]
        chosen: list[tuple[str, str, int, int, set[str]]] = []
        taken: set[str] = set()
        for var, start, end in sorted(self.frozen_nodes, key=lambda n: n[1]):  # outer nodes first
            if var in taken:
                continue  # inside a node already guarded
            inner = {var, *(m.group(1) for line in self.lines[start:end] if (m := _VAR_SET.match(line)))}
            if all(strict is not None and ref <= inner for (_, strict), ref in zip(blocks, refs) if ref & inner):
                chosen.append((var, "g" + var[1:], start, end, inner))
                taken |= inner
        if not chosen:
            return flat, []
        lines = list(self.lines)
        learn: list[str] = []
        for var, flag, start, end, _ in sorted(chosen, key=lambda n: -n[2]):
            seen = self.const({}, "P")  # id -> object: the frozen objects proven at this node
            lines[start:end] = [f"        {flag} = {seen}.get(id({var})) is {var}", f"        if not {flag}:",
                                *("    " + line for line in lines[start:end])]
            learn.append(f"    if not {flag} and _frozen.get(id({var})) is {var} and len({seen}) < {MAX_FROZEN}:\n"
                         f"        {seen}[id({var})] = {var}\n")
        self.env["_frozen"] = self.frozen
        guarded: dict[str, list[str]] = {}
        for (block, strict), ref in zip(blocks, refs):
            owner = next((c for c in chosen if ref and ref <= c[4]), None)
            if owner is None:
                lines += block
                continue
            if owner[1] not in guarded:
                guarded[owner[1]] = []
                lines.append(f"        if not {owner[1]}:")
                lines.append(owner[1])  # a placeholder, replaced by the node's tests below
            assert strict is not None
            guarded[owner[1]] += ["    " + line for line in strict]
        return [line for item in lines for line in guarded.get(item, [item])], learn

    def value_tests(self) -> list[tuple[list[str], list[str] | None]]:
        """The value tests as blocks of lines, each with its form on leaves alone (the same
        lines, or None; see `test` and `frozen_guards`). The tests that read only a Coding or
        CodeableConcept (its leaf tests, bindings, terminology) run once per distinct tuple of
        its leaf values: a tuple that passed them all is remembered (tagged with the node: one
        set for all shapes, at most MEMO_LIMIT entries), and a later node with the same values
        skips them (the same codings recur on every row).

        Exact: every such test is a function of the node's leaves alone (invariants, which may
        read the root, are never memoised), the shape fixes the node's keys and list lengths,
        and the memo only holds nodes whose leaves are all str or bool, already checked to be of
        that exact type; equal values of those types are the same value (unlike 1 == 1.0)."""
        memos = self.memo_nodes()
        groups: dict[tuple[Any, ...], list[str]] = {}
        order: list[tuple[Any, ...] | list[Any]] = []  # a memo node's path, or [condition, strict]
        for path, condition, strict in self.tests:
            node = None if path is None else next((m for m in memos if path[:len(m)] == m), None)
            if node is None:
                order.append([condition, strict])
                continue
            if node not in groups:
                groups[node] = []
                order.append(node)
            groups[node].append(condition)
        blocks: list[tuple[list[str], list[str] | None]] = []
        for item in order:
            if isinstance(item, list):
                condition, strict = item
                blocks.append(([f"        if {condition}: return 2"],
                               None if strict is None else [f"        if {strict}: return 2"]))
                continue
            conditions = groups[item]
            if len(conditions) < 2:  # one test is no dearer than the memo lookup
                line = [f"        if {conditions[0]}: return 2"]
                blocks.append((line, line))
                continue
            tag = object()  # this node of this shape: its entries never match another node's
            self.node_tags.append(tag)
            key, memo = self.name("k"), self.const(self.memos.setdefault(NODE_MEMO, set()), "N")
            values = ", ".join(var for _, var, _ in memos[item])
            block = [f"        {key} = ({self.const(tag, 'G')}, {values})",
                     f"        if {key} not in {memo}:",
                     *(f"            if {condition}: return 2" for condition in conditions),
                     f"            if len({memo}) < {MEMO_LIMIT}: {memo}.add({key})"]
            blocks.append((block, block))
        return blocks

    def memo_nodes(self) -> dict[tuple[Any, ...], list[tuple[tuple[Any, ...], str, Primitive]]]:
        """The outermost Coding / CodeableConcept nodes whose leaves are all str or bool, each
        with its leaves."""
        found: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], str, Primitive]]] = {}
        for node in self.concepts:
            if any(node[:len(outer)] == outer for outer in found):
                continue
            leaves = [leaf for leaf in self.leaves if leaf[0][:len(node)] == node]
            if leaves and all(kind.json_types in ((str,), (bool,)) for _, _, kind in leaves):
                found[node] = leaves
        return found

    def rule_checks(self, rules: RuleChecks, trace: Trace, resource: Resource) -> None:
        """The spec's rules for this shape, after its structure and leaves are checked: what the
        shape proves (cardinality, ele-1, ext-1, invariants that `shape_proof` proves) is decided
        now; bindings, terminology and the other invariants are checked per resource."""
        from ruxo_fhir.conformance import NATIVE_DECIDERS

        for path, rule in trace.codes:
            var = self.vars[path]
            if rule.type == "code":
                self.test(f"{var} not in {self.const(rule.codes, 'B')}", path)
                continue
            node = _at(resource, path)
            concept = node.get("concept") if rule.type == "CodeableReference" else node
            codings = concept.get("coding") if rule.type != "Coding" and isinstance(concept, dict) else None
            if isinstance(codings, list) and codings and all(isinstance(c, dict) for c in codings):
                # the shape fixes how many codings there are: one pair test each, inline, on the
                # leaves the shape check has already read
                base = (*path, "concept") if rule.type == "CodeableReference" else path
                pairs = self.const(rule.pairs, "B")
                tests = " or ".join(f"{self.pair((*base, 'coding', i))} in {pairs}" for i in range(len(codings)))
                self.test(f"not ({tests})", path)
            else:
                self.test(f"_bindp({self.const(rule, 'E')}, {var}) is not None", path)
        # terminology: a memo lookup on the (system, code) leaves already read, the call only
        # for a value not seen yet
        if trace.codings:
            memo = self.const(rules.coding_memo, "T")
        for path in trace.codings:
            self.test(f"{self.pair(path)} not in {memo} and not _coding_ok({self.vars[path]})", path)
        if trace.quantities:
            memo = self.const(rules.quantity_memo, "T")
        for path in trace.quantities:
            self.test(f"{self.pair(path)} not in {memo} and not _quantity_ok({self.vars[path]})", path)
        for path in trace.languages:
            self.test(f"not _bcp47({self.vars[path]})", path)
        if trace.identifiers:
            memo = self.const(rules.system_memo, "T")
        for path in trace.identifiers:
            self.test(f"{self.leaf_var((*path, 'system'))} not in {memo} and not _idsys_ok({self.vars[path]})", path)
        for path, inv in trace.invariants:
            node = _at(resource, path)
            if inv.shape_proof(node, resource):
                continue
            decider = NATIVE_DECIDERS.get(inv.key)
            if decider is not None:
                self.test(f"not {self.const(decider, 'D')}({self.vars[path]}, r)", None)
                continue
            var, const = self.vars[path], self.const(inv, "I")
            native = rules.natives.get(inv.key)
            absent = _ABSENT_PROVES.get(inv.key)
            if absent is not None and absent not in node:
                continue  # the native prover holds whenever the key is absent, and the shape fixes that
            if inv.key == "ref-1" and isinstance(node.get("reference"), str):  # the common case, inline
                ref = self.leaf_var((*path, 'reference'))
                self.test(f"{ref}[:1] == '#' and not _inv({const}, {var}, r)", None, strict=f"{ref}[:1] == '#'")
            elif inv.key in _NON_NEGATIVE and type(node.get(absent)) in (int, float):
                # tim-4/tim-5 on a number leaf (its JSON type fixed by the shape), inline
                number = self.leaf_var((*path, absent))
                self.test(f"not ({number} >= 0 or _inv({const}, {var}, r))", None, strict=f"not {number} >= 0")
            elif inv.key == "con-5" and _codings(node.get("verificationStatus")):
                # con-5's prover on the codes the shape has read: none of them says entered-in-error
                status = (*path, "verificationStatus", "coding")
                codes = " and ".join(f"{self.leaf_var((*status, i, 'code'))} != 'entered-in-error'"
                                     for i in range(len(node["verificationStatus"]["coding"])))
                self.test(f"not (({codes}) or _inv({const}, {var}, r))", None, strict=f"not ({codes})")
            elif native is not None:
                self.test(f"not ({self.const(native, 'N')}({var}, r) or _inv({const}, {var}, r))", None)
            else:
                self.test(f"not _inv({const}, {var}, r)", None)
        self.env.update(rules.env)

    def leaf_var(self, path: tuple[Any, ...]) -> str:
        """The variable the shape check read the node at `path` into; "None" when the shape has
        no such key (then `.get` would have answered None too)."""
        return self.vars.get(path, "None")

    def pair(self, path: tuple[Any, ...]) -> str:
        """`(system, code)` of the Coding (or Quantity) at `path`, from the variables read."""
        return f"({self.leaf_var((*path, 'system'))}, {self.leaf_var((*path, 'code'))})"

    def object_body(self, var: str, cls: type, obj: dict[str, Any], keys: list[str],
                    path: tuple[Any, ...]) -> None:
        for key in keys:
            element = self.index.element(cls, key)
            if element is None or element.kind is None:
                raise _Unsupported(key)
            value = obj[key]
            sub = self.name("v")
            self.emit(f"{sub} = {var}[{key!r}]")
            start = len(self.lines)
            if element.is_list:
                if type(value) is not list or not value:
                    raise _Unsupported(key)  # let the model judge odd lists (empty, not a list)
                self.emit(f"if type({sub}) is not list or len({sub}) != {len(value)}: return 1")
                for i, item in enumerate(value):
                    item_var = self.name("v")
                    self.emit(f"{item_var} = {sub}[{i}]")
                    self.vars[(*path, key, i)] = item_var
                    item_start = len(self.lines)
                    self.value(item_var, element.kind, item, (*path, key, i))
                    self.note_frozen(item_var, item, item_start)
            else:
                self.vars[(*path, key)] = sub
                self.value(sub, element.kind, value, (*path, key))
            self.note_frozen(sub, value, start)

    def note_frozen(self, var: str, value: Any, start: int) -> None:
        """Remember a node that is a frozen object, with the structure lines below it."""
        if type(value) in (dict, list) and self.frozen.get(id(value)) is value:
            self.frozen_nodes.append((var, start, len(self.lines)))

    def value(self, var: str, kind: Primitive | type, value: Any, path: tuple[Any, ...] = ()) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Unsupported("too large")
        if isinstance(kind, Primitive):
            self.leaf(var, kind, value, path)
            return
        if type(value) is not dict or not value or "resourceType" in value:
            raise _Unsupported(kind.__name__)
        if kind.__name__ in _MEMO_KINDS:
            self.concepts.append(path)
        self.emit(f"if type({var}) is not dict or len({var}) != {len(value)}: return 1")
        self.object_body(var, kind, value, list(value), path)

    def leaf(self, var: str, kind: Primitive, value: Any, path: tuple[Any, ...] = ()) -> None:
        if type(value) not in kind.json_types:
            raise _Unsupported(kind.name)
        if len(kind.json_types) == 1:
            self.emit(f"if type({var}) is not {kind.json_types[0].__name__}: return 1")
        else:
            allowed = " and ".join(f"type({var}) is not {t.__name__}" for t in kind.json_types)
            self.emit(f"if {allowed}: return 1")
        self.leaves.append((path, var, kind))
        test = self.leaf_test(var, kind)
        if test is not None:
            self.test(f"not {test}", path)

    def leaf_test(self, var: str, kind: Primitive) -> str | None:
        """The expression, true when the leaf `var` (of a right JSON type) is surely valid."""
        if kind.memo and kind.check is not None:
            check = self.const(kind.check, "C")
            memo = self.const(self.memos.setdefault(kind.name, set()), "M")
            return f"({var} in {memo} or _slow({check}, {memo}, {var}))"
        if kind.test is not None:
            return f"({kind.test.format(v=var)})"
        if kind.check is not None:
            return f"{self.const(kind.check, 'C')}({var})"
        return None

    def leaf_function(self, kind: Primitive) -> Check:
        """The leaf check exactly as compiled into shape checks, as a function (for tests)."""
        types_ok = " or ".join(f"type(v) is {t.__name__}" for t in kind.json_types)
        source = f"def accepts(v):\n    return ({types_ok}) and bool({self.leaf_test('v', kind) or 'True'})\n"
        exec(compile(source, f"<fhir leaf {kind.name}>", "exec"), self.env)
        accepts: Check = self.env["accepts"]
        return accepts


def _slow(check: Check, memo: set[Any], value: Any) -> bool:
    if not check(value):
        return False
    if len(memo) < MEMO_LIMIT:
        memo.add(value)
    return True


@dataclass
class FastStats:
    fast: int = 0  # resources proven valid by a compiled shape
    model: int = 0  # resources sent to the model
    compiled: int = 0  # shapes compiled
    unsupported: int = 0  # shapes the compiler declined
    shapes: dict[str, int] = field(default_factory=dict)


class FastPath:
    """Compiled shape checks for one FHIR version; see the module docstring.

    `frozen`: objects (by id) that the caller shares between resources and that nobody ever
    edits, deeply (nothing reachable from them changes either: an edit inside one would not be
    seen), such as the constant concepts and dosages of the import's mapper. A shape compiled
    from a resource holding one of them checks that part of a later resource once per shape,
    not once per resource, when it holds the very same object. The mapping is read when a
    shape is compiled, so objects may be added to it later; an object a shape has proven stays
    proven there (and referenced) for the FastPath's life, even if it leaves the mapping.
    """

    def __init__(self, rules: Rules | None = None, frozen: Mapping[int, Any] | None = None) -> None:
        self.rules = RuleChecks(rules) if rules is not None else None
        self.frozen = frozen
        self.index = ModelIndex()
        self.memos: dict[str, set[Any]] = {}
        # the JSON keys of a resource (resourceType among them) -> its compiled shapes, most
        # recently matched first; `Validator.validate` tries the first one inline
        self.shapes: dict[tuple[str, ...], list[ShapeCheck]] = {}
        self._declined: dict[tuple[str, ...], int] = {}
        self._leaves: dict[str, Check] = {}
        self._count = 0
        self.stats = FastStats()

    def check(self, resource: Resource) -> int:
        """OK: proven valid; UNSURE: a known shape with a leaf not proven; MISMATCH: unknown shape."""
        if type(resource) is not dict:  # a dict subclass might answer missing keys (defaultdict)
            return MISMATCH
        candidates = self.shapes.get(tuple(resource))
        if not candidates:
            return MISMATCH
        verdict = candidates[0](resource)
        if verdict == OK or len(candidates) == 1:  # the common case: one shape, or the most frequent
            return verdict
        for i in range(1, len(candidates)):
            shape = candidates[i]
            result = shape(resource)
            if result == OK:
                # one step forward: the order converges to the most frequent shapes first
                candidates[i - 1], candidates[i] = shape, candidates[i - 1]
                return OK
            if result == UNSURE:
                verdict = UNSURE
        return verdict

    def leaf_accepts(self, primitive: str, value: Any) -> bool:
        """Whether the compiled leaf check of `primitive` proves `value` valid (for tests)."""
        check = self._leaves.get(primitive)
        if check is None:
            check = self._leaves[primitive] = _Compiler(self.index, self.memos).leaf_function(
                self.index.primitives[primitive])
        return check(value)

    def learn(self, cls: type, resource: Resource, trace: Trace | None = None) -> None:
        """Compile the shape of `resource`, which the model and the rules (`trace`: what they
        looked at) have just accepted without a finding."""
        key = tuple(resource)
        candidates = self.shapes.setdefault(key, [])
        declined = self._declined.get(key, 0)
        if len(candidates) >= MAX_SHAPES_PER_KEY or declined >= MAX_SHAPES_PER_KEY or self._count >= MAX_SHAPES:
            return
        try:
            shape = _Compiler(self.index, self.memos, self.frozen).compile(cls, resource, self.rules, trace)
        except (_Unsupported, RecursionError):
            self.stats.unsupported += 1
            self._declined[key] = declined + 1
            return
        candidates.insert(0, shape)
        self._count += 1
        self.stats.compiled += 1
        kind = str(resource["resourceType"])
        self.stats.shapes[kind] = self.stats.shapes.get(kind, 0) + 1


class RuleChecks:
    """The per-resource parts of the spec's rules that compiled shapes call: bindings of
    Codings/CodeableConcepts, terminology warnings and invariants the shape does not prove, each
    memoised on the values it reads (bounded), so a value seen once is decided once."""

    def __init__(self, rules: Rules) -> None:
        from ruxo_fhir import conformance, terminology

        self.rules = rules
        self.natives = conformance.NATIVE_PROVERS
        codings: set[tuple[Any, Any]] = set()
        self.coding_memo = codings
        quantities: set[tuple[Any, Any]] = set()
        systems: set[Any] = set()

        def coding_ok(node: dict[str, Any]) -> bool:
            key = (node.get("system"), node.get("code"))
            if key in codings:
                return True
            if terminology.coding_warnings(*key):
                return False
            if len(codings) < MEMO_LIMIT:
                codings.add(key)
            return True

        def quantity_ok(node: dict[str, Any]) -> bool:
            key = (node.get("system"), node.get("code"))
            if key in quantities:
                return True
            if terminology.quantity_warnings(*key):
                return False
            if len(quantities) < MEMO_LIMIT:
                quantities.add(key)
            return True

        def idsys_ok(node: dict[str, Any]) -> bool:
            system = node.get("system")
            if system in systems:
                return True
            if not isinstance(system, str) or terminology.system_uri(system):
                return False
            if len(systems) < MEMO_LIMIT:
                systems.add(system)
            return True

        def inv(invariant: Invariant, node: dict[str, Any], root: Resource) -> bool:
            native = conformance.NATIVE_PROVERS.get(invariant.key)
            if native is not None and native(node, root):
                return True
            return invariant.verdict(node, root) is not False

        self.quantity_memo = quantities
        self.system_memo = systems
        self.env: dict[str, Any] = {"_bcp47": terminology.bcp47_ok, "_bindp": conformance.binding_problem, "_coding_ok": coding_ok,
                                    "_quantity_ok": quantity_ok, "_idsys_ok": idsys_ok, "_inv": inv}


# Native provers (conformance.NATIVE_PROVERS) that hold whenever their node lacks this key: for
# a shape without the key the invariant is decided when the shape is compiled.
_ABSENT_PROVES = {"ref-1": "reference", "con-5": "verificationStatus", "tim-4": "duration", "tim-5": "period"}
_NON_NEGATIVE = frozenset({"tim-4", "tim-5"})


_MISSING: Any = object()
_VAR_REF = re.compile(r"\bv[0-9]+\b")  # the variables a generated line reads (`_Compiler.name("v")`)
_VAR_SET = re.compile(r"\s*(v[0-9]+) = ")  # a generated line that sets one


def _codings(concept: Any) -> bool:
    """A CodeableConcept whose `coding` is a non-empty list of objects (what con-5's prover reads)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return isinstance(codings, list) and bool(codings) and all(isinstance(c, dict) for c in codings)


def _at(resource: Resource, path: tuple[Any, ...]) -> Any:
    node: Any = resource
    for part in path:
        node = node[part]
    return node
