"""Command line of the seeded synthetic case rows; the generator itself is tests/cohort_gen.py
(one generator for the tests and the benchmarks).

Run: python benchmarks/gen_cases.py 100000 [SEED] > cases.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cohort_gen import iter_rows, write_cases, write_rows

__all__ = ["main", "write_cases"]


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 1000
    seed = int(argv[1]) if len(argv) > 1 else 1
    write_rows(sys.stdout, iter_rows(n, seed))


if __name__ == "__main__":
    main(sys.argv[1:])
