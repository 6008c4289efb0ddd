"""The docs stand alone in a clone: every relative link resolves inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

DOCS = ("README.md", "examples/README.md", "mappings/README.md", "benchmarks/README.md", "examples/SEED.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_targets(doc: Path) -> list[str]:
    return [t for t in LINK.findall(doc.read_text(encoding="utf-8")) if "://" not in t and not t.startswith("#")]


def test_every_relative_link_resolves_inside_the_repository() -> None:
    problems = []
    for name in DOCS:
        doc = REPO / name
        if not doc.is_file():
            continue
        for target in relative_targets(doc):
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(REPO.resolve()):
                problems.append(f"{name}: {target} points outside the repository")
            elif not path.exists():
                problems.append(f"{name}: {target} does not exist")
    assert problems == []


def test_no_doc_or_test_refers_to_files_outside_the_clone() -> None:
    # ../shared sat beside the first checkouts; a clone has no such folder
    offenders = []
    for path in [*REPO.glob("*.md"), *REPO.glob("examples/*.md"), *REPO.glob("mappings/*.md"), *REPO.glob("tests/*.py")]:
        if path.name == "test_docs.py":
            continue
        if re.search(r"\.\./shared|parents\[2\]\s*/\s*\"shared\"", path.read_text(encoding="utf-8")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_the_link_checker_can_fail(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("see [a](a.md) and [web](https://example.org) and [top](#x)\n", encoding="utf-8")
    assert relative_targets(doc) == ["a.md"]
