"""The import's fast mapping (constants shared between resources, R5 rewritten in place) writes
the same bytes as the safe one, and the safe one shares no nested value between resources."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from cohort_gen import write_cases

from ruxo_fhir.fhir_version import to_version
from ruxo_fhir.mapping.forward import ForwardMapper
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.records import Accepted, CaseReader

ROOT = Path(__file__).resolve().parents[1]


def _accepted(path: Path) -> list[Accepted]:
    return [i for i in CaseReader(path, load_mapping()) if isinstance(i, Accepted)]


def _containers(node: Any) -> list[Any]:
    """Every dict and list inside a resource (the resource itself excluded)."""
    out: list[Any] = []
    children = node.values() if isinstance(node, dict) else node
    for child in children:
        if isinstance(child, (dict, list)):
            out.append(child)
            out += _containers(child)
    return out


def test_shared_constants_and_in_place_r5_give_the_same_bytes(tmp_path: Path) -> None:
    items = _accepted(write_cases(tmp_path / "cases.csv", 400, 5)) + _accepted(ROOT / "examples" / "cases.csv")
    safe, fast = ForwardMapper(load_mapping()), ForwardMapper(load_mapping(), share_constants=True)
    kinds = set()
    for item in items:
        a = safe.case(item.record, include_patient=item.new_patient)
        b = fast.case(item.record, include_patient=item.new_patient)
        assert [orjson.dumps(r) for r in a] == [orjson.dumps(r) for r in b]
        r5_copy = [to_version(r, "R5") for r in a]
        r5_in_place = [to_version(r, "R5", in_place=True) for r in b]
        assert [orjson.dumps(r) for r in r5_copy] == [orjson.dumps(r) for r in r5_in_place]
        kinds.update(r["resourceType"] for r in a)
    assert kinds == {"Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent"}


def test_safe_mapping_shares_nothing_between_resources(tmp_path: Path) -> None:
    items = _accepted(write_cases(tmp_path / "cases.csv", 200, 6))
    mapper = ForwardMapper(load_mapping())
    seen: dict[int, str] = {}
    resources = []
    for item in items:
        for res in mapper.case(item.record, include_patient=item.new_patient):
            resources.append(res)  # kept alive: ids of live objects are unique
            for node in _containers(res):
                assert id(node) not in seen, f"{res['resourceType']} shares a value with {seen[id(node)]}"
                seen[id(node)] = res["resourceType"]
    # the fast mapping does share (what makes it fast): e.g. the dosage of one frequency
    fast = ForwardMapper(load_mapping(), share_constants=True)
    bid = [i.record for i in items if i.record.frequency == "BID"][:2]
    first, second = (fast.case(r, include_patient=False)[1] for r in bid)
    assert first["resourceType"] == "MedicationStatement" and first["dosage"] is second["dosage"]
