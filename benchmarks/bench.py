"""ruxo-fhir benchmark: every stage beside its floor, measured in the same run.

    python benchmarks/bench.py                   # 25k rows (jobs 1, 2); push of 3000 cases at 0/200 ms
    python benchmarks/bench.py --sizes 25000,1000000 --push-cases 1000   # adds 1M rows (long)
    python benchmarks/bench.py --sizes 2000 --push-cases 100 --latencies 0,50 --levels 1,4   # a quick look

Stages and floors (ratios, not absolute times: shared machines are noisy):

- start-up: `ruxo-fhir --help`, an import of one row, and the bare interpreter (best of 3).
- import+validate: `ruxo-fhir import --format ndjson` in one subprocess, start-up included, vs.
  a floor that writes the same resources, parsed into memory beforehand, as
  `orjson.dumps(resource)` + newline to one file (best of 3); the import is best of
  `--import-repeat` runs too (default 3, one at 1M rows), its median beside it: noise only ever
  adds time, so best against best. Wall and CPU ratios. Peak RSS is sampled over the whole
  process tree (main + --jobs workers, summed), the largest of the runs.
- where the import time goes, per row, on min(N, 20k) rows in this process.
- push --concurrency c (c = 1, 2, 4, 8) vs. sequential `requests.post` of the same transaction
  bundles, serialised beforehand, to the same test server emptied in between, at each server
  latency (the test front's `latency_ms` switch); then a re-push: write entries sent (must be 0).
- push CASES.csv memory: peak RSS of the CLI push of a CSV at two sizes (streamed: flat).
- `--pull`: the older push/pull/re-push stage of `--push-rows` rows (pull vs raw paging GETs).

Not collected by pytest (no test_ prefix, outside tests/).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import cohort_gen

from ruxo_fhir.bundle import make_bundle, put_entry
from ruxo_fhir.fhir_version import to_version
from ruxo_fhir.importer import case_resources
from ruxo_fhir.mapping.forward import ForwardMapper
from ruxo_fhir.mapping.spec import load_mapping
from ruxo_fhir.records import CaseReader, Reject
from ruxo_fhir.validate import Validator

Resource = dict[str, Any]
COHORT_TYPES = ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent")


# --- process-tree memory --------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _field_kb(path: str, name: bytes) -> int:
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Samples RSS and PSS summed over a process and its descendants (20 Hz)."""

    def __init__(self, pid: int, skip_root: bool = False) -> None:
        self.pid = pid
        self.skip_root = skip_root
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = _children()
            pids, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                if pid != self.pid or not self.skip_root:
                    pids.append(pid)
                todo.extend(tree.get(pid, []))
            rss = sum(_field_kb(f"/proc/{p}/status", b"VmRSS:") for p in pids)
            pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", b"Pss:") for p in pids)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(0.05)


def run_import(csv_path: Path, out: Path, jobs: int) -> dict[str, Any]:
    """`ruxo-fhir import --format ndjson` in a subprocess: wall, peak tree RSS/PSS, max RSS."""
    cmd = [sys.executable, "-m", "ruxo_fhir", "-q", "import", str(csv_path), "-o", str(out),
           "--format", "ndjson", "--jobs", str(jobs), "--rejects", str(out.parent / f"{out.name}.rejects.csv")]
    # ru_maxrss of a child forked from this (large) process starts at our own size, so the
    # per-process maximum comes from GNU time, which forks from a small process.
    timefile = out.parent / f"{out.name}.time"
    wrapped = Path("/usr/bin/time").exists()
    if wrapped:
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(timefile), *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with TreeMemory(proc.pid, skip_root=wrapped) as mem:
        err = proc.communicate()[1].decode()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"import failed ({proc.returncode}): {err}")
    max_rss = float("nan")
    with contextlib.suppress(OSError, ValueError):
        max_rss = int(timefile.read_text().split()[-1]) / 1024
    return {"wall": wall, "tree_rss_mb": mem.peak_rss_kb / 1024, "tree_pss_mb": mem.peak_pss_kb / 1024,
            "max_rss_mb": max_rss, "procs": mem.peak_procs, "summary": err.strip().splitlines()[-1]}


# --- floors -----------------------------------------------------------------------------------

def orjson_floor(ndjson_dir: Path, target: Path, batch: int = 50_000, repeat: int = 3) -> tuple[float, float]:
    """Seconds to write the resources of an ndjson folder as `orjson.dumps(resource)` plus a
    newline to one file, the resources parsed into memory beforehand (in batches, parsing not
    timed); each batch best of `repeat`. Returns (wall seconds, CPU seconds of those best runs)."""
    seconds, cpu_seconds = 0.0, 0.0
    with target.open("wb") as out:
        for path in sorted(ndjson_dir.glob("*.ndjson")):
            with path.open("rb") as fh:
                while True:
                    lines = [line for _, line in zip(range(batch), fh)]
                    if not lines:
                        break
                    resources = [orjson.loads(line) for line in lines]
                    del lines
                    dumps, write = orjson.dumps, out.write
                    start = out.tell()
                    best = (float("inf"), 0.0)
                    for _ in range(repeat):
                        out.seek(start)
                        out.truncate()
                        t0, c0 = time.perf_counter(), time.process_time()
                        for res in resources:
                            write(dumps(res))
                            write(b"\n")
                        out.flush()
                        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
                    seconds += best[0]
                    cpu_seconds += best[1]
    return seconds, cpu_seconds


def bytecode_note() -> str:
    """Let the measured subprocesses read ruxo_fhir as compiled bytecode, as an installed copy
    does from its second run on. With PYTHONDONTWRITEBYTECODE set and an editable install (no
    __pycache__ in src/), every start would compile our modules again (~0.3 s a process)."""
    was = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    package = Path(sys.modules["ruxo_fhir"].__file__ or "").parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (f"bytecode: {package} compiled (its __pycache__, git-ignored) before measuring"
            + ("; PYTHONDONTWRITEBYTECODE was set: dropped for the measured processes" if was else ""))


def startup_times(tmp: Path, seed: int, repeat: int = 3) -> dict[str, tuple[float, float]]:
    """(best wall s, CPU s of that run) of `ruxo-fhir --help` and of an import of one row."""
    one = cohort_gen.write_cases(tmp / "one.csv", 1, seed)
    commands = {
        "ruxo-fhir --help": [sys.executable, "-m", "ruxo_fhir", "--help"],
        "ruxo-fhir import (1 row)": [sys.executable, "-m", "ruxo_fhir", "-q", "import", str(one), "-o",
                                     str(tmp / "one-out"), "--format", "ndjson"],
        "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    }
    out: dict[str, tuple[float, float]] = {}
    for name, cmd in commands.items():
        best = (float("inf"), 0.0)
        for _ in range(repeat):
            before = os.times()
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            wall = time.perf_counter() - t0
            after = os.times()
            cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            best = min(best, (wall, cpu))
        out[name] = best
    return out


# --- where the time goes ----------------------------------------------------------------------

def stage_breakdown(csv_path: Path, version: str = "R4") -> dict[str, float]:
    """Microseconds per row for each step of the import, in this process."""
    mapping = load_mapping(None)
    t0 = time.perf_counter()
    items = [i for i in CaseReader(csv_path, mapping) if not isinstance(i, Reject)]
    t_read = time.perf_counter() - t0
    mapper = ForwardMapper(mapping, share_constants=True)  # as the import builds it
    # timed as the import runs it: each case's resources dropped after use (keeping them all
    # alive makes the cyclic GC rescan them, which the streaming import never pays)
    t0 = time.perf_counter()
    for i in items:
        mapper.case(i.record, include_patient=i.new_patient)
    t_map = time.perf_counter() - t0
    per_case = [mapper.case(i.record, include_patient=i.new_patient) for i in items]
    t0 = time.perf_counter()
    per_case = [[to_version(r, version) for r in rs] for rs in per_case]  # type: ignore[arg-type]
    t_version = time.perf_counter() - t0
    flat = [r for rs in per_case for r in rs]
    model = Validator(version, fast=False)  # type: ignore[arg-type]
    for kind in sorted({r["resourceType"] for r in flat}):  # load the model classes (one-off, ~1 s)
        model.validate(next(r for r in flat if r["resourceType"] == kind))
    fast = Validator(version, frozen=mapper.constants)  # type: ignore[arg-type]  # as the import builds it
    t0 = time.perf_counter()
    bad = sum(1 for r in flat if fast.validate(r))
    t_fast = time.perf_counter() - t0
    sample = flat[: min(len(flat), 3000)]
    t0 = time.perf_counter()
    for r in sample:
        model.validate(r)
    t_model = (time.perf_counter() - t0) * len(flat) / max(1, len(sample))
    with tempfile.TemporaryFile() as fh:
        t0 = time.perf_counter()
        for r in flat:
            fh.write(orjson.dumps(r))
            fh.write(b"\n")
        t_floor = time.perf_counter() - t0
    n = len(items)
    assert fast.fast is not None
    return {"rows": n, "resources": len(flat), "invalid": bad, "read+parse+cross-row": t_read / n * 1e6,
            "map": t_map / n * 1e6, "to_version": t_version / n * 1e6, "validate (fast path)": t_fast / n * 1e6,
            "validate (model only, extrapolated)": t_model / n * 1e6, "orjson floor": t_floor / n * 1e6,
            "shapes": fast.fast.stats.compiled, "model calls": fast.fast.stats.model}


def profile_import(csv_path: Path, out: Path, top: int = 12) -> str:
    from ruxo_fhir.importer import import_cases

    prof = cProfile.Profile()
    prof.enable()
    import_cases(csv_path, out, mapping=load_mapping(None), fmt="ndjson")
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
    return buf.getvalue().strip("\n")


# --- server stages ----------------------------------------------------------------------------

def cohort(n: int, seed: int, tmp: Path) -> list[Resource]:
    """The validated resources of n generated rows, in case order (as push receives them)."""
    path = cohort_gen.write_cases(tmp / f"push{n}.csv", n, seed)
    mapping = load_mapping(None)
    return [r for _rec, rs in case_resources(CaseReader(path, mapping), mapping, "R4", lambda rej: None) for r in rs]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def server_stages(resources: list[Resource], batch: int, page: int, tmp: Path, repeat: int) -> dict[str, Any]:
    import requests
    from fhirserver import TestFhirServer

    from ruxo_fhir.bundle import NdjsonWriter
    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.pull import PullOptions, pull_cohort
    from ruxo_fhir.sync.push import PushOptions, chunk_groups, group_resources, push
    from ruxo_fhir.transport.rest import FhirClient

    mapping = load_mapping(None)
    bodies = [orjson.dumps(make_bundle([put_entry(r) for g in chunk for r in g.resources], "transaction"))
              for chunk in chunk_groups(group_resources(resources, mapping), batch)]
    out: dict[str, Any] = {"entries": len(resources), "bundles": len(bodies), "batch": batch, "page": page}
    server = TestFhirServer(config={"page_size": page}).start()
    try:
        base = server.base_url
        session = requests.Session()
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}

        def raw_post() -> None:
            for body in bodies:
                r = session.post(base, data=body, headers=headers, timeout=600)
                r.raise_for_status()

        def raw_pull() -> int:
            n = 0
            with (tmp / "raw-pull.ndjson").open("wb") as fh:
                for kind in COHORT_TYPES:
                    url: str | None = f"{base}/{kind}?_count={page}"
                    while url:
                        bundle = session.get(url, headers=headers, timeout=600).json()
                        for e in bundle.get("entry") or []:
                            fh.write(orjson.dumps(e["resource"]))
                            fh.write(b"\n")
                            n += 1
                        url = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
            return n

        # warm-up: the server's first requests pay for JIT compilation
        for body in bodies[:3]:
            session.post(base, data=body, headers=headers, timeout=600).raise_for_status()
        raw_pull()
        raw_times, push_times = [], []
        for i in range(repeat):
            server.reset()
            raw_times.append(timed(raw_post)[0])
            server.reset()
            ledger_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="ledger"))
            client = FhirClient(base)
            with Ledger(ledger_dir / "ledger.sqlite3") as ledger:
                t, result = timed(lambda: push(client, resources, mapping, PushOptions(batch_size=batch),
                                               ledger=ledger))
                push_times.append(t)
                assert result.created == len(resources), result.summary_line
                out["push_requests"] = client.request_count
                out["push_bundles"] = result.bundles_sent
                if i == repeat - 1:  # re-push the unchanged data with the same ledger
                    before = server.stats()
                    again = FhirClient(base)
                    t2, res2 = timed(lambda: push(again, resources, mapping, PushOptions(batch_size=batch),
                                                  ledger=ledger))
                    after = server.stats()
                    out["repush_s"] = t2
                    out["repush_unchanged"] = res2.unchanged
                    out["repush_entries_written"] = after["entries_written"] - before["entries_written"]
                    out["repush_writes"] = after["writes"] - before["writes"]
                    out["repush_requests"] = again.request_count
        out["raw_post_s"], out["push_s"] = min(raw_times), min(push_times)
        # pull what is now on the server
        pull_times, raw_pull_times, replay_times = [], [], []
        for _ in range(1):
            t, n_raw = timed(raw_pull)
            raw_pull_times.append(t)
            client = FhirClient(base)

            def our_pull(client: FhirClient = client) -> int:
                writer = NdjsonWriter(tmp / "pulled")
                n = 0
                for res in pull_cohort(client, mapping, PullOptions(page_size=page)):
                    writer.write(res)
                    n += 1
                writer.close()
                return n

            urls: list[str] = []
            client.session.hooks["response"].append(lambda r, *a, **k: urls.append(r.url))
            t, n_ours = timed(our_pull)
            pull_times.append(t)
            out["pull_requests"] = client.request_count

            def replay(urls: list[str] = urls) -> None:
                for url in urls:
                    session.get(url, headers=headers, timeout=600).json()

            replay_times.append(timed(replay)[0])
        out["pull_s"], out["raw_pull_s"] = min(pull_times), min(raw_pull_times)
        out["replay_s"] = min(replay_times)
        out["pulled"], out["raw_pulled"] = n_ours, n_raw
    finally:
        server.stop()
    return out


PUSH_ENGINES = ("medplum", "hapi")


def _engine_server(engine: str) -> Any:
    """The test server of an engine, not started: Medplum's router or HAPI JPA, each behind a
    front with the `latency_ms` switch (tests/fhirserver.py, tests/hapiserver.py)."""
    if engine == "hapi":
        from hapiserver import TestHapiServer

        return TestHapiServer()
    from fhirserver import TestFhirServer

    return TestFhirServer()


ENGINE_NAMES = {"medplum": "Medplum fhir-router (test front)", "hapi": "HAPI FHIR JPA (fault front)"}


def push_concurrency(resources: list[Resource], batch: int, latencies: list[int], levels: list[int],
                     tmp: Path, engines: tuple[str, ...] = PUSH_ENGINES) -> list[dict[str, Any]]:
    """`push --concurrency c` vs sequential raw transaction POSTs of the same bundles, per
    engine and server latency (the front's latency_ms switch: a delay before every request, the
    engine's reply untouched), each on an emptied server (`reset`: HAPI expunges); then a
    re-push (writes sent)."""
    import requests

    from ruxo_fhir.sync.ledger import Ledger
    from ruxo_fhir.sync.push import LEDGER_WINDOW, PushOptions, group_resources, push, windows
    from ruxo_fhir.transport.rest import FhirClient

    mapping = load_mapping(None)
    # the bundles `--concurrency > 1` sends (a patient's cases kept together within a window;
    # concurrency 1 sends the cases in order: a few more bundles, so its raw floor is a little higher)
    bodies = [orjson.dumps(make_bundle([put_entry(r) for g in chunk for r in g.resources], "transaction"))
              for window in windows(group_resources(resources, mapping), batch, LEDGER_WINDOW, together=True)
              for chunk in window]
    rows: list[dict[str, Any]] = []
    for engine in engines:
        server = _engine_server(engine)
        try:
            server.start()
        except Exception as exc:  # a missing engine (no Java, no Maven) is reported, not fatal
            rows.append({"engine": ENGINE_NAMES[engine], "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            rows += _push_engine(server, ENGINE_NAMES[engine], bodies, resources, mapping, batch, latencies,
                                 levels, tmp, requests, Ledger, PushOptions, push, FhirClient)
        finally:
            server.stop()
    return rows


def _push_engine(server: Any, name: str, bodies: list[bytes], resources: list[Resource], mapping: Any,
                 batch: int, latencies: list[int], levels: list[int], tmp: Path, requests: Any, Ledger: Any,
                 PushOptions: Any, push: Any, FhirClient: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base = server.base_url
    session = requests.Session()
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    for body in bodies[:3]:  # warm-up (the engine's JIT)
        session.post(base, data=body, headers=headers, timeout=600).raise_for_status()
    for latency in latencies:
        server.reset()
        server.configure(latency_ms=latency)
        t0 = time.perf_counter()
        for body in bodies:
            session.post(base, data=body, headers=headers, timeout=600).raise_for_status()
        raw = time.perf_counter() - t0
        for level in levels:
            server.reset()
            server.configure(latency_ms=latency)
            ledger_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="ledger"))
            with FhirClient(base) as client, Ledger(ledger_dir / "ledger.sqlite3") as ledger:
                options = PushOptions(batch_size=batch, concurrency=level)
                t, result = timed(lambda: push(client, resources, mapping, options, ledger=ledger))
                assert result.created + result.updated == len(resources), result.summary_line
                row = {"engine": name, "latency_ms": latency,
                       "concurrency": level, "push_s": t, "raw_s": raw, "bundles": len(bodies),
                       "requests": client.request_count}
                if level == levels[-1]:
                    before = server.stats()
                    again = push(client, resources, mapping, options, ledger=ledger)
                    row["repush_entries_written"] = server.stats()["entries_written"] - before["entries_written"]
                    row["repush_unchanged"] = again.unchanged
            rows.append(row)
    return rows


def push_csv_memory(rows: int, tmp: Path, seed: int) -> dict[str, float]:
    """Peak RSS of `ruxo-fhir push CASES.csv` (to the test server, emptied first) at two sizes:
    the CSV is mapped as push consumes it, so memory should not grow with the file."""
    from fhirserver import TestFhirServer

    out: dict[str, float] = {}
    server = TestFhirServer().start()
    try:
        for n in (rows // 10, rows):
            csv_path = cohort_gen.write_cases(tmp / f"pushmem{n}.csv", n, seed)
            server.reset()
            cmd = [sys.executable, "-m", "ruxo_fhir", "-q", "push", str(csv_path), "--server", server.base_url]
            env = {**os.environ, "RUXO_FHIR_STATE_DIR": str(tmp / f"pushmem-state{n}")}
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            with TreeMemory(proc.pid) as mem:
                proc.wait()
            out[f"{n:,} rows"] = mem.peak_rss_kb / 1024
    finally:
        server.stop()
    return out


# --- report -----------------------------------------------------------------------------------

def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = _field_kb("/proc/meminfo", b"MemTotal:") / 1024 / 1024
    load = os.getloadavg()
    return (f"nproc {os.cpu_count()}, CPU {model}, RAM {mem:.0f} GB, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, load average at start {load[0]:.1f}")


def fmt_ratio(value: float, target: float | None = None) -> str:
    text = f"{value:.2f}x"
    if target is not None:
        text += " (ok)" if value <= target else f" (target {target:g}x)"
    return text


def report_push(args: argparse.Namespace, tmp: Path, say: Callable[..., None]) -> None:
    """The push --concurrency stage and its table (both engines)."""
    latencies = [int(x) for x in args.latencies.split(",") if x]
    levels = [int(x) for x in args.levels.split(",") if x]
    resources = cohort(args.push_cases, args.seed, tmp)
    engines = tuple(e for e in args.engines.split(",") if e)
    conc = push_concurrency(resources, args.push_batch, latencies, levels, tmp, engines)
    measured = [row for row in conc if "skipped" not in row]
    say(f"## push --concurrency vs sequential raw transaction POSTs ({args.push_cases:,} cases = "
        f"{len(resources):,} resources, batch {args.push_batch} = "
        f"{measured[0]['bundles'] if measured else '?'} bundles, "
        "empty server each time; target at 200 ms, c=4: <= 0.4x)")
    say()
    say("| engine | latency | concurrency | push s | raw POST s (sequential) | push / raw | requests |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    for row in measured:
        target = 0.4 if row["latency_ms"] >= 200 and row["concurrency"] == 4 else None
        say(f"| {row['engine']} | {row['latency_ms']} ms | {row['concurrency']} | {row['push_s']:.1f} | "
            f"{row['raw_s']:.1f} | {fmt_ratio(row['push_s'] / row['raw_s'], target)} | {row['requests']} |")
    say()
    for row in measured:
        if "repush_entries_written" in row:
            say(f"re-push of the same data ({row['engine']}, latency {row['latency_ms']} ms, concurrency "
                f"{row['concurrency']}): {row['repush_entries_written']} entries written, "
                f"{row['repush_unchanged']:,} unchanged")
    for row in conc:
        if "skipped" in row:
            say(f"{row['engine']}: not measured ({row['skipped']})")
    say()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25000", help="comma-separated row counts (default 25k)")
    ap.add_argument("--full", action="store_true", help="also N = 1,000,000")
    ap.add_argument("--jobs", default="1,2", help="--jobs values to run the import with (default 1,2)")
    ap.add_argument("--push-rows", type=int, default=1000,
                    help="rows pushed/pulled (default 1000; the test server's searches grow ~quadratically)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--page-size", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2, help="push: best of R runs (default 2); pull runs once")
    ap.add_argument("--import-repeat", type=int, default=3,
                    help="import: best of R runs below 1M rows, as the floor is best of 3 (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-server", action="store_true", help="skip every server stage")
    ap.add_argument("--pull", action="store_true", help="also the push/pull/re-push stage of --push-rows rows")
    ap.add_argument("--push-cases", type=int, default=3000, help="cases of the concurrency stage (default 3000)")
    ap.add_argument("--push-batch", type=int, default=100, help="batch size of the concurrency stage (default 100)")
    ap.add_argument("--latencies", default="0,200", help="server latencies in ms (default 0,200)")
    ap.add_argument("--levels", default="1,2,4,8", help="push --concurrency levels (default 1,2,4,8)")
    ap.add_argument("--push-only", action="store_true", help="only the push --concurrency stage")
    ap.add_argument("--engines", default="medplum,hapi",
                    help="engines of the concurrency stage (default medplum,hapi; HAPI starts in about a minute)")
    ap.add_argument("--push-mem-rows", type=int, default=10000,
                    help="push CASES.csv memory: rows of the larger file (a tenth for the smaller; 0 = skip)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of a 5k-row import")
    ap.add_argument("--write-readme", action="store_true", help="replace the results in benchmarks/README.md")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.full and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    jobs_list = [int(j) for j in args.jobs.split(",") if j]
    tmp_ctx = contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory(
        prefix="ruxo-bench-")
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with tmp_ctx as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        say(f"machine: {machine()}")
        say(f"started {time.strftime('%Y-%m-%d %H:%M:%S')}, seed {args.seed}")
        say(bytecode_note())
        say()
        if args.push_only:
            report_push(args, tmp, say)
            say(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
            return 0
        st = startup_times(tmp, args.seed)
        say("## start-up (best of 3; wall on this machine, CPU of that run)")
        say()
        say("| command | wall s | CPU s |")
        say("|---|---:|---:|")
        for name, (wall, cpu) in st.items():
            say(f"| `{name}` | {wall:.2f} | {cpu:.2f} |")
        say()
        few = 20  # rows that already bring every resource type: start-up incl. loading the model classes
        one = cohort_gen.write_cases(tmp / "startup.csv", few, args.seed)
        startup = {j: min(run_import(one, tmp / f"startup-out{j}", j)["wall"] for _ in range(2)) for j in jobs_list}
        say("## import --format ndjson (one subprocess, start-up included) vs the orjson floor")
        say()
        say("floor: the same resources, parsed into memory beforehand, each written as `orjson.dumps(r)` + "
            f"newline to one file, best of 3. The import is measured the same way: best of {args.import_repeat} "
            "runs (1 at 1M rows), the median beside it. Per-row rate leaves the 20-row start-up out ("
            + ", ".join(f"jobs {j}: {s:.2f} s" for j, s in startup.items()) + ").")
        say()
        say("On a loaded machine wall time measures the queue for the CPUs more than the work: the CPU "
            "ratio (CPU seconds of the import process tree / CPU seconds of the floor) is the steadier one.")
        say()
        say("| rows | jobs | runs | wall s (best) | floor wall s | import / floor (wall, best) | "
            "import / floor (wall, median) | CPU s (tree, best run) | floor CPU s | "
            "import / floor (CPU) | rows/s (no start-up) | peak RSS, tree sum | peak PSS, tree sum | "
            "max RSS of one process |")
        say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            csv_path = cohort_gen.write_cases(tmp / f"cases{n}.csv", n, args.seed)
            floor_s: float | None = None
            floor_cpu = 0.0
            for j in jobs_list:
                out = tmp / f"out{n}-{j}"
                runs = []  # (wall, CPU, run_import result) of each run, best by wall
                for _ in range(args.import_repeat if n < 1_000_000 else 1):
                    with contextlib.suppress(OSError):
                        subprocess.run(["rm", "-rf", str(out)], check=False)
                    before = os.times()
                    r = run_import(csv_path, out, j)
                    after = os.times()
                    runs.append((r["wall"], (after.children_user - before.children_user)
                                 + (after.children_system - before.children_system), r))
                    if floor_s is None:
                        floor_s, floor_cpu = orjson_floor(out, tmp / "floor.ndjson")
                assert floor_s is not None
                wall, cpu, r = min(runs, key=lambda run: run[0])
                walls = sorted(run[0] for run in runs)
                work = max(1e-9, wall - startup[j]) * n / (n - few)
                say(f"| {n:,} | {j} | {len(runs)} | {wall:.1f} | {floor_s:.2f} | {fmt_ratio(wall / floor_s, 10)} | "
                    f"{walls[len(walls) // 2] / floor_s:.2f}x | "
                    f"{cpu:.1f} | {floor_cpu:.2f} | {fmt_ratio(cpu / max(floor_cpu, 1e-9))} | {n / work:,.0f} | "
                    f"{max(run[2]['tree_rss_mb'] for run in runs):.0f} MB ({max(run[2]['procs'] for run in runs)} procs) | "
                    f"{max(run[2]['tree_pss_mb'] for run in runs):.0f} MB | "
                    f"{max(run[2]['max_rss_mb'] for run in runs):.0f} MB |")
                with contextlib.suppress(OSError):
                    subprocess.run(["rm", "-rf", str(out)], check=False)
            (tmp / "floor.ndjson").unlink(missing_ok=True)
            if n >= 1_000_000:
                (csv_path).unlink(missing_ok=True)
        say()
        sample = cohort_gen.write_cases(tmp / "sample.csv", min(sizes[0], 20_000), args.seed)
        b = stage_breakdown(sample)
        floor_us = b["orjson floor"]
        say(f"## where an import row's time goes ({b['rows']:,} rows, {b['resources']:,} resources, "
            f"in process, jobs 1; {b['shapes']} shapes compiled, {b['model calls']} model calls)")
        say()
        say("| step | µs per row | × orjson floor |")
        say("|---|---:|---:|")
        for key in ("read+parse+cross-row", "map", "to_version", "validate (fast path)",
                    "validate (model only, extrapolated)", "orjson floor"):
            say(f"| {key} | {b[key]:.0f} | {b[key] / floor_us:.1f} |")
        say()
        if args.profile:
            say("```")
            say(profile_import(cohort_gen.write_cases(tmp / "prof.csv", 5000, args.seed), tmp / "prof-out"))
            say("```")
        if not args.no_server:
            report_push(args, tmp, say)
            if args.push_mem_rows:
                mem = push_csv_memory(args.push_mem_rows, tmp, args.seed)
                say("## push CASES.csv memory (peak RSS of the push process, streamed CSV)")
                say()
                say("| file | peak RSS |")
                say("|---|---:|")
                for name, mb in mem.items():
                    say(f"| {name} | {mb:.0f} MB |")
                say()
        if not args.no_server and args.pull:
            resources = cohort(args.push_rows, args.seed, tmp)
            s = server_stages(resources, args.batch_size, args.page_size, tmp, args.repeat)
            say(f"## server stages ({args.push_rows:,} rows = {s['entries']:,} resources; batch {s['batch']}, "
                f"page {s['page']}; test server = Medplum fhir-router in memory; push best of {args.repeat})")
            say()
            say("| stage | ours s | floor s | ratio | requests |")
            say("|---|---:|---:|---:|---:|")
            say(f"| push (first) vs raw requests.post of the same {s['bundles']} bundles | {s['push_s']:.2f} | "
                f"{s['raw_post_s']:.2f} | {fmt_ratio(s['push_s'] / s['raw_post_s'], 1.3)} | {s['push_requests']} |")
            say(f"| re-push unchanged: {s['repush_entries_written']} write entries sent "
                f"({s['repush_writes']} write requests), {s['repush_unchanged']} unchanged | {s['repush_s']:.2f} | "
                f"- | - | {s['repush_requests']} |")
            say(f"| pull ({s['pulled']:,} resources) vs raw paging GETs ({s['raw_pulled']:,}) | {s['pull_s']:.2f} | "
                f"{s['raw_pull_s']:.2f} | {fmt_ratio(s['pull_s'] / s['raw_pull_s'])} | {s['pull_requests']} |")
            say(f"| pull vs raw GETs of the very URLs pull requested (isolates client overhead) | "
                f"{s['pull_s']:.2f} | {s['replay_s']:.2f} | {fmt_ratio(s['pull_s'] / s['replay_s'])} | "
                f"{s['pull_requests']} |")
            say()
        say(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if args.write_readme:
        write_readme(lines, argv if argv is not None else sys.argv[1:])
    return 0


def write_readme(lines: list[str], argv: list[str]) -> None:
    readme = REPO / "benchmarks" / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    shown, skip = [], False
    for arg in argv:  # the command as rerun elsewhere: no local work dir, no README rewrite
        if skip:
            skip = False
        elif arg == "--workdir":
            skip = True
        elif not arg.startswith("--workdir=") and arg != "--write-readme":
            shown.append(arg)
    command = " ".join(["python benchmarks/bench.py", *shown])
    body = "\n".join([begin, "", f"`{command}`", "", *lines, "", end])
    if begin in text and end in text:
        text = text[: text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        text += "\n" + body + "\n"
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
