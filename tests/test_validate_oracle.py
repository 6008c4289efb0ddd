"""The HL7 FHIR validator as an oracle: `ruxo-fhir validate` must give the same valid/invalid
verdict on every resource of a corpus of >= 150 R4 resources.

The oracle is the HL7 validator engine (ca.uhn.hapi.fhir:org.hl7.fhir.validation, through HAPI's
FhirInstanceValidator) with the R4 core definitions of hapi-fhir-validation-resources-r4, pinned
from Maven Central (tests/hl7_validator/pom.xml), OFFLINE: no terminology server. One JVM
validates the whole corpus folder (tests/hl7_validator/.../ValidateFolder.java). It is built with
Maven on first run (a stamp file in target/ names the sources it was built from).

The corpus: our output for the example, a generated cohort (tests/cohort_gen.py), seeded
mutations of both (one broken rule each, every kind in tests/validation_cases.py), and resources
as other tools write them (tests/data/validation/foreign.json). Known, explained differences:
tests/data/validator_differences.json (each entry must still be a difference).

Without java and mvn the test skips (one line says what to install); with CI=true it fails.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cohort_gen import generate_cases
from validation_cases import KINDS

from ruxo_fhir.importer import case_resources
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.records import CaseReader
from ruxo_fhir.validate import Validator

pytestmark = [pytest.mark.java, pytest.mark.e2e]

TESTS = Path(__file__).resolve().parent
PROJECT = TESTS / "hl7_validator"
EXAMPLE = TESTS.parent / "examples" / "cases.csv"
DIFFERENCES = TESTS / "data" / "validator_differences.json"
FOREIGN = TESTS / "data" / "validation" / "foreign.json"
Resource = dict[str, Any]


def _need_tools() -> tuple[str, str]:
    java, mvn = shutil.which("java"), shutil.which("mvn")
    if java and mvn:
        return java, mvn
    missing = " and ".join(n for n, p in (("a JDK 17+ (java)", java), ("Maven 3.8+ (mvn)", mvn)) if not p)
    message = f"HL7 validator oracle needs {missing}: install them (e.g. apt-get install openjdk-17-jdk-headless maven)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _build() -> list[str]:
    """Build the oracle once (stamp = hash of pom and sources); the java command line to run it."""
    java, mvn = _need_tools()
    sources = [PROJECT / "pom.xml", *sorted((PROJECT / "src").rglob("*.java"))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    target = PROJECT / "target"
    stamp = target / f".built-{digest}"
    classpath = target / "classpath.txt"
    if not (stamp.exists() and classpath.exists()):
        proc = subprocess.run([mvn, "-q", "-B", "process-classes"], cwd=PROJECT, capture_output=True, text=True,
                              timeout=1800, check=False)
        if proc.returncode != 0:
            pytest.fail(f"building the HL7 validator oracle failed (mvn exit {proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr)[-3000:]}")
        for old in target.glob(".built-*"):
            old.unlink()
        stamp.write_text("built\n")
    cp = f"{target / 'classes'}{os.pathsep}{classpath.read_text().strip()}"
    return [java, "-Xmx1500m", "-XX:+UseSerialGC", "-cp", cp, "ruxo.validator.ValidateFolder"]


def _ours(csv_path: Path) -> list[Resource]:
    mapping = load_mapping(None)
    reader = CaseReader(csv_path, mapping)
    return [r for _rec, rs in case_resources(reader, mapping, "R4", lambda rej: None) for r in rs]


def corpus(tmp: Path) -> dict[str, Resource]:
    """name -> resource; names sort in corpus order and say where each resource comes from."""
    out: dict[str, Resource] = {}
    example = _ours(EXAMPLE)
    for i, res in enumerate(example):
        out[f"a{i:03d}-example-{res['resourceType']}"] = res
    cohort_csv = tmp / "cohort.csv"
    cohort_csv.write_text(generate_cases(12, seed=15), encoding="utf-8")
    cohort = _ours(cohort_csv)
    for i, res in enumerate(cohort):
        out[f"b{i:03d}-cohort-{res['resourceType']}"] = res
    rng = random.Random(15)
    pool = example + cohort
    n = 0
    for name, kind, having, change, _rule, _where, _sev in KINDS:
        candidates = [r for r in pool if r["resourceType"] == kind and (having is None or having in r)]
        for res in rng.sample(candidates, min(3, len(candidates))):
            broken = copy.deepcopy(res)
            change(broken)
            if broken != res:
                out[f"c{n:03d}-mutant-{name}"] = broken
                n += 1
    for item in json.loads(FOREIGN.read_text(encoding="utf-8"))["resources"]:
        out[f"d-foreign-{item['name']}"] = item["resource"]
    return out


def _hl7_verdicts(command: list[str], folder: Path) -> dict[str, dict[str, Any]]:
    proc = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        pytest.fail(f"HL7 validator oracle exited {proc.returncode}: {proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["file"][: -len(".json")]: row for row in rows}


def test_validate_gives_the_hl7_validators_verdict_on_every_resource(tmp_path: Path) -> None:
    command = _build()
    resources = corpus(tmp_path)
    assert len(resources) >= 150
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, res in resources.items():
        (folder / f"{name}.json").write_text(json.dumps(res), encoding="utf-8")
    hl7 = _hl7_verdicts(command, folder)
    assert set(hl7) == set(resources)

    known = json.loads(DIFFERENCES.read_text(encoding="utf-8"))["differences"]
    validator = Validator("R4")
    unexplained: list[str] = []
    seen_known: set[str] = set()
    invalid = 0
    for name, res in sorted(resources.items()):
        ours = validator.validate(copy.deepcopy(res))
        theirs = hl7[name]
        ours_valid, theirs_valid = not ours, bool(theirs["valid"])
        invalid += not theirs_valid
        if ours_valid == theirs_valid:
            continue
        key = name.split("-", 1)[1]  # without the corpus position
        entry = known.get(key)
        if entry is not None and entry["hl7"] == ("valid" if theirs_valid else "invalid"):
            seen_known.add(key)
            continue
        hl7_errors = [f"{i['location']}: {i['message']}" for i in theirs["issues"] if i["severity"] in ("error", "fatal")]
        unexplained.append(f"{name}: ours {'valid' if ours_valid else [str(p) for p in ours]}; "
                           f"HL7 {'valid' if theirs_valid else hl7_errors}")
    assert not unexplained, "verdicts differ:\n" + "\n".join(unexplained)
    stale = sorted(set(known) - seen_known)
    assert not stale, f"validator_differences.json lists differences that no longer occur: {stale}"
    assert invalid >= 30, "the corpus must hold enough invalid resources to mean something"
