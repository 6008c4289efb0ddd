"""How push cuts a resource stream into windows and bundles (`windows`).

In order (concurrency 1) the chunks are the groups as given. Sent concurrently, a patient's later
cases share a bundle with the Patient's first case, so a window's bundles never wait for one
another: checked here on a generated cohort (patients with several cases, spread over the file)
and on small hand-made streams, from the references the resources carry.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest
from cohort_gen import generate_cases

push_mod = importlib.import_module("ruxo_fhir.sync.push")
Group = push_mod.Group


def key(res: dict[str, Any]) -> str:
    return f"{res['resourceType']}/{res['id']}"


def refs(res: dict[str, Any]) -> set[str]:
    """`Type/id` of every literal reference (the test's own walk, not push's)."""
    out: set[str] = set()
    stack: list[Any] = [res]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "reference" and isinstance(v, str) and "?" not in v:
                    out.add("/".join(v.split("/")[-2:]))
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)
    return out


@pytest.fixture(scope="module")
def cohort_groups(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from ruxo_fhir.importer import source_resources
    from ruxo_fhir.mapping.spec import load_mapping

    src = tmp_path_factory.mktemp("windows") / "cases.csv"
    src.write_text(generate_cases(600, seed=11), encoding="utf-8")
    mapping = load_mapping()
    return list(push_mod.group_resources(source_resources(src, mapping), mapping))


def flat(windows: list[list[list[Any]]]) -> list[Any]:
    return [g for w in windows for chunk in w for g in chunk]


def test_in_order_windows_are_the_chunks_as_given(cohort_groups: list[Any]) -> None:
    wins = list(push_mod.windows(iter(cohort_groups), 40, 200))
    assert [c for w in wins for c in w] == list(push_mod.chunk_groups(cohort_groups, 40))
    assert all(len({key(r) for c in w for g in c for r in g.resources}) >= 200 for w in wins[:-1])


def test_together_no_bundle_of_a_window_waits_for_another(cohort_groups: list[Any]) -> None:
    """Every group once; no bundle over the size; a window's bundle references nothing another
    bundle of the same window holds; a referenced group comes earlier in the same bundle."""
    patients = [r["id"] for g in cohort_groups for r in g.resources if r["resourceType"] == "Patient"]
    cases = [g for g in cohort_groups if g.case_id]
    assert len(patients) < len(cases)  # the cohort has patients with several cases
    in_order = list(push_mod.windows(iter(cohort_groups), 40, 200))
    wins = list(push_mod.windows(iter(cohort_groups), 40, 200, together=True))
    assert sorted(map(id, flat(wins))) == sorted(map(id, cohort_groups))
    waits_in_order = 0
    for w in in_order:  # the same check on the chunks in order finds waits (the test can fail)
        holder = {key(r): i for i, c in enumerate(w) for g in c for r in g.resources}
        waits_in_order += sum(1 for i, c in enumerate(w) for g in c for r in g.resources
                              for ref in refs(r) if holder.get(ref, i) != i)
    assert waits_in_order > 0
    for w in wins:
        holder = {key(r): i for i, c in enumerate(w) for g in c for r in g.resources}
        for i, chunk in enumerate(w):
            assert sum(len(g.resources) for g in chunk) <= 40
            order = [key(r) for g in chunk for r in g.resources]
            assert len(order) == len(set(order))
            for pos, k in enumerate(order):
                res = next(r for g in chunk for r in g.resources if key(r) == k)
                for ref in refs(res):
                    assert holder.get(ref, i) == i, f"{k} in bundle {i} waits for {ref}"
                    if ref in order and ref.split("/")[0] == "Patient":
                        assert order.index(ref) < pos
    # no more bundles than in order (a window's last bundle, not full, waits for the next window)
    assert sum(map(len, wins)) <= sum(map(len, in_order))


def _case(case: str, patient: str, *, with_patient: bool = False, size: int = 2) -> Any:
    res: list[dict[str, Any]] = []
    if with_patient:
        res.append({"resourceType": "Patient", "id": patient})
    res += [{"resourceType": "Observation", "id": f"{case}-{n}", "subject": {"reference": f"Patient/{patient}"}}
            for n in range(size)]
    return Group(case, res)


def test_together_keeps_a_patients_cases_in_their_order() -> None:
    stream = [_case("a1", "A", with_patient=True), _case("b1", "B", with_patient=True),
              _case("c1", "C", with_patient=True), _case("a2", "A"), _case("b2", "B"), _case("a3", "A")]
    (w,) = push_mod.windows(iter(stream), 7, 100, together=True)
    by_case = {g.case_id: i for i, chunk in enumerate(w) for g in chunk}
    assert by_case["a1"] == by_case["a2"] == by_case["a3"]
    assert by_case["b1"] == by_case["b2"]
    chunk_a = [g.case_id for g in w[by_case["a1"]]]
    assert chunk_a.index("a1") < chunk_a.index("a2") < chunk_a.index("a3")


def test_together_a_cluster_larger_than_a_bundle_goes_in_order() -> None:
    stream = [_case("a1", "A", with_patient=True, size=3)] + [_case(f"a{n}", "A", size=3) for n in range(2, 6)]
    (w,) = push_mod.windows(iter(stream), 7, 100, together=True)
    assert [[g.case_id for g in c] for c in w] == [["a1", "a2"], ["a3", "a4"], ["a5"]]


def test_together_never_puts_one_resource_twice_in_a_bundle() -> None:
    """A resource given twice (two groups holding it) goes in two bundles, in the order given;
    the flight sends the second after the first lands."""
    first = Group("x1", [{"resourceType": "Patient", "id": "X"}])
    again = Group("x2", [{"resourceType": "Patient", "id": "X", "active": True}])
    (w,) = push_mod.windows(iter([first, _case("y", "Y", with_patient=True), again]), 50, 100, together=True)
    assert [[g.case_id for g in c] for c in w] == [["x1", "y"], ["x2"]]


def test_together_a_window_does_not_end_on_a_bundle_part_full() -> None:
    """The last bundle of a window, not full, joins the next window's groups (fewer requests)."""
    stream = [_case(f"c{n}", f"P{n}", with_patient=True, size=2) for n in range(10)]  # 3 entries each
    wins = list(push_mod.windows(iter(stream), 6, 8, together=True))
    assert all(sum(len(g.resources) for g in c) == 6 for w in wins[:-1] for c in w)
    assert sum(map(len, wins)) == 5
    assert [g.case_id for g in flat(wins)] == [f"c{n}" for n in range(10)]
