"""Validation throughput: resources/s of `Validator.validate` on the example and on N generated cases.

    python benchmarks/bench_validate.py [--cases 10000] [--version R4] [--repeat 3]

Resources are mapped beforehand (ForwardMapper + to_version, not timed); a fresh Validator
validates all of them (shape compiling included; the model classes are loaded before timing).
Prints resources/s (best of --repeat) and the number of resources with problems (must be 0).
Not collected by pytest.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import cohort_gen

from ruxo_fhir.fhir_version import to_version
from ruxo_fhir.mapping.forward import ForwardMapper
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.records import CaseReader, Reject
from ruxo_fhir.validate import Validator


def resources(csv_path: Path, version: str) -> list[dict[str, Any]]:
    mapping = load_mapping(None)
    mapper = ForwardMapper(mapping)
    out: list[dict[str, Any]] = []
    for item in CaseReader(csv_path, mapping):
        if isinstance(item, Reject):
            continue
        out += [to_version(r, version) for r in mapper.case(item.record, include_patient=item.new_patient)]  # type: ignore[arg-type]
    return out


def measure(flat: list[dict[str, Any]], version: str, repeat: int) -> tuple[float, int]:
    warm = Validator(version, fast=False)  # type: ignore[arg-type]
    for kind in sorted({r["resourceType"] for r in flat}):
        warm.validate(next(r for r in flat if r["resourceType"] == kind))
    best, bad = float("inf"), 0
    for _ in range(repeat):
        v = Validator(version)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        bad = sum(1 for r in flat if v.validate(r))
        best = min(best, time.perf_counter() - t0)
    return len(flat) / best, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--version", default="R4")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gen = Path(tmp) / "gen.csv"
        gen.write_text(cohort_gen.generate_cases(args.cases, seed=7))
        for name, path in (("example", REPO / "examples" / "cases.csv"), (f"{args.cases} cases", gen)):
            flat = resources(path, args.version)
            rate, bad = measure(flat, args.version, args.repeat)
            print(f"{name}: {len(flat)} resources, {rate:,.0f} resources/s, {bad} with problems ({args.version})")


if __name__ == "__main__":
    main()
