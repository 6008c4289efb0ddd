"""`import --jobs N`: worker processes parse, map, validate and serialise chunks of rows.

The main process reads CSV rows, runs the cross-row checks in file order and writes. What a
worker sends back per chunk is a few large byte blocks, not an object per resource: one block
per output stream (a resource type for ndjson, one stream for a Bundle) holding the chunk's
serialised lines in row order, with the offsets of each row's pieces, so pickling is a copy
and the main process writes each stream in one or a few writes. Whether a row's Patient goes
out is a cross-row decision, so it is its own piece, cut out by the main process when the
patient is not new. Output bytes, rejects and their order are those of one process.
"""
from __future__ import annotations

import functools
import pickle
import queue
import signal
import threading
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import orjson

from ruxo_fhir.bundle import BundleWriter, NdjsonWriter
from ruxo_fhir.errors import WorkerError
from ruxo_fhir.fhir_version import FhirVersion
from ruxo_fhir.importer import _CaseBuilder, _PatientsPending, _reject_accepted
from ruxo_fhir.records import CaseReader, CaseRecord, Reject
from ruxo_fhir.resource import Resource
from ruxo_fhir.validate import Problem

CHUNK_ROWS = 200  # cases per worker task

_Rows = list[tuple[int, list[str]]]
# Per row, what the worker found: the row-local reject, or the record with the problem of its
# Patient (None when valid or when the mapping writes no Patient) and of its other resources.
_RowOutcome = Reject | tuple[CaseRecord, Problem | None, Problem | None]
# Per stream: the joined lines, then at each of the 2n+1 piece boundaries (row i's Patient is
# piece 2i, its other resources piece 2i+1) the byte offset and the number of lines before it.
_Stream = tuple[bytes, "array[int]", "array[int]"]
# Per chunk: the row outcomes, the streams, and each piece's resource types in order of first
# appearance (so the main process counts types in the order one process meets them).
_ChunkResult = tuple[list[_RowOutcome], dict[str, _Stream], list[tuple[str, ...]]]

ONE_STREAM = ""  # the stream name when the output is one Bundle (row order across types)


class RawNdjsonWriter(NdjsonWriter):
    """NdjsonWriter that also takes lines already serialised by a worker (same bytes,
    newline included), many resources in one write."""

    def write_raw(self, kind: str, data: bytes | memoryview) -> None:
        # a memoryview (a slice of a worker's block) is written without a copy
        (self._writes.get(kind) or self._file(kind).write)(cast(bytes, data))


class _StreamsBuilder:
    """Collects a chunk's serialised resources per stream, piece by piece (worker side)."""

    def __init__(self, by_kind: bool, kinds_cache: dict[tuple[str, ...], tuple[str, ...]]) -> None:
        self.by_kind = by_kind
        self.lines: dict[str, list[bytes]] = {}
        self.ends: dict[str, list[int]] = {}
        self.counts: dict[str, list[int]] = {}
        self.size: dict[str, int] = {}
        self.kinds: list[tuple[str, ...]] = []
        self._cache = kinds_cache  # one tuple object per sequence: pickled once per chunk
        self._pieces = 0

    def piece(self, data: list[tuple[str, bytes]]) -> None:
        """Close the next piece, holding `data` (resource type, serialised line) in order."""
        seen: list[str] = []
        for kind, line in data:
            stream = kind if self.by_kind else ONE_STREAM
            lines = self.lines.get(stream)
            if lines is None:
                lines = self.lines[stream] = []
                self.ends[stream] = [0] * (self._pieces + 1)
                self.counts[stream] = [0] * (self._pieces + 1)
                self.size[stream] = 0
            lines.append(line)
            self.size[stream] += len(line)
            if kind not in seen:
                seen.append(kind)
        self._pieces += 1
        size, lines_of, counts = self.size, self.lines, self.counts
        for stream, ends in self.ends.items():
            ends.append(size[stream])
            counts[stream].append(len(lines_of[stream]))
        key = tuple(seen)
        self.kinds.append(self._cache.setdefault(key, key))

    def streams(self) -> dict[str, _Stream]:
        return {s: (b"".join(lines), array("q", self.ends[s]), array("q", self.counts[s]))
                for s, lines in self.lines.items()}


_worker_state: tuple[CaseReader, _CaseBuilder, bool, dict[tuple[str, ...], tuple[str, ...]]] | None = None


def _worker_init(reader: CaseReader, version: FhirVersion, by_kind: bool) -> None:
    global _worker_state
    _worker_state = (reader, _CaseBuilder(reader.mapping, version, share_constants=True), by_kind, {})


def _checked(builder: _CaseBuilder, resources: list[Resource]) -> tuple[list[tuple[str, bytes]], Problem | None]:
    """Validate `resources` in order; serialised (type, line) pairs when all are valid."""
    validate = builder.validator.validate
    for res in resources:
        problems = validate(res)
        if problems:
            return [], problems[0]
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    return [(r["resourceType"], dumps(r, option=newline)) for r in resources], None


def _worker_rows(rows: _Rows) -> _ChunkResult:
    """Parse, map, validate and serialise rows. Whether a case carries its Patient is only
    known in the main process (cross-row), so the Patient is built, judged and laid out as a
    piece of its own."""
    assert _worker_state is not None, "worker not initialised"
    reader, builder, by_kind, kinds_cache = _worker_state
    out = _StreamsBuilder(by_kind, kinds_cache)
    items: list[_RowOutcome] = []
    for line, fields in rows:
        item = reader.parse(line, fields)
        if isinstance(item, Reject):
            items.append(item)
            out.piece([])
            out.piece([])
            continue
        resources = builder.resources(item, include_patient=True)
        patient_problem: Problem | None = None
        if resources and resources[0]["resourceType"] == "Patient":
            patient_data, patient_problem = _checked(builder, resources[:1])
            out.piece(patient_data)
            resources = resources[1:]
        else:
            out.piece([])
        data, problem = _checked(builder, resources)
        out.piece(data)
        items.append((item, patient_problem, problem))
    return items, out.streams(), out.kinds


class Chunk:
    """One chunk's output as the main process writes it: the kept byte ranges of each stream
    (the pieces of rejected rows and of Patients already written left out)."""

    def __init__(self, records: list[CaseRecord], result: _ChunkResult, dropped: list[int]) -> None:
        self.records = records  # the accepted cases, in row order
        self._streams = result[1]
        self._kinds = result[2]
        self._dropped = dropped  # piece indices, ascending

    def parts(self) -> Iterator[tuple[str, memoryview, int]]:
        """(stream, bytes to write, number of resources in them) in stream order."""
        dropped = self._dropped
        for stream, (block, ends, counts) in self._streams.items():
            view = memoryview(block)
            pos, skip = 0, 0
            for d in dropped:
                start, end = ends[d], ends[d + 1]
                if start == end:
                    continue
                if start > pos:
                    yield stream, view[pos:start], counts[d] - skip
                pos, skip = end, counts[d + 1]
            if pos < len(block):
                yield stream, view[pos:], counts[-1] - skip

    def first_seen(self, counts: Counter[str]) -> list[str]:
        """The resource types this chunk writes that `counts` has not met, in the order one
        process meets them (its counts then keep the same key order)."""
        new = {k for k in self._streams if k not in counts}
        if not new:
            return []
        dropped = set(self._dropped)
        order: list[str] = []
        for i, kinds in enumerate(self._kinds):
            if i in dropped:
                continue
            for kind in kinds:
                if kind not in counts and kind not in order:
                    order.append(kind)
        return order

    def write_to(self, writer: RawNdjsonWriter | BundleWriter | NdjsonWriter, counts: Counter[str]) -> None:
        """Write the kept lines: ndjson as they are, a Bundle's entries parsed back (the Bundle
        is written whole at the end). `counts` gains the resources per type."""
        if isinstance(writer, RawNdjsonWriter):
            for kind in self.first_seen(counts):
                counts[kind] = 0  # the key's place; its count follows below
            write_raw = writer.write_raw
            for stream, data, n in self.parts():
                write_raw(stream, data)
                counts[stream] += n
            return
        write = writer.write
        for _stream, data, _n in self.parts():
            for line in data.tobytes().split(b"\n")[:-1]:
                res = orjson.loads(line)
                write(res)
                counts[res["resourceType"]] += 1


def _chunks(rows: Iterable[tuple[int, list[str]]], size: int) -> Iterator[_Rows]:
    chunk: _Rows = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pool_context() -> Any:
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class _RemoteTraceback(Exception):
    """The worker's traceback, chained under the exception it raised (shown with RUXO_FHIR_DEBUG)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _worker_main(tasks: Any, lock: Any, results: Any, task_writer: Any,
                 initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """A worker's loop: take the next chunk off the shared task pipe, answer on its own pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked from the fork until ignored
    task_writer.close()  # only the main process writes tasks: EOF here once it is gone
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            with lock:
                data = tasks.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        index, rows = pickle.loads(data)
        try:
            reply: tuple[int, bool, Any] = (index, True, _worker_rows(rows))
        except Exception as exc:  # a bug: raised again in the main process, with this traceback
            import traceback

            reply = (index, False, (_picklable(exc), traceback.format_exc()))
        try:
            results.send_bytes(pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))
        except OSError:
            return  # the main process is gone


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__} in an import worker")
    return exc


class _Workers:
    """`jobs` worker processes fed from one task pipe (whichever is free takes the next chunk),
    each answering on a pipe of its own, read by the main thread.

    Not multiprocessing.Pool: its worker-handler thread also waits on the result pipe, so while
    a chunk's large result is being read it wakes up thousands of times (0.4-0.5 s of CPU at
    25k rows, contending for the GIL with the main thread), and a worker killed mid-chunk, or a
    Ctrl-C, left it waiting forever. Here a sender thread feeds the task pipe (a full task pipe
    never blocks the thread that reads results), workers ignore SIGINT (the main process stops
    them), and a worker that dies raises WorkerError.
    """

    def __init__(self, context: Any, jobs: int, initializer: Callable[..., None] | None,
                 initargs: tuple[Any, ...]) -> None:
        tasks, self._tasks = context.Pipe(duplex=False)
        lock = self._lock = context.Lock()  # kept: with spawn, a child rebuilds it from its name later
        self._procs: list[Any] = []
        self._results: list[Any] = []
        self._done: dict[int, Any] = {}
        # SIGINT stays blocked while the workers start, so a Ctrl-C in that moment neither kills a
        # worker before it ignores SIGINT nor is lost here (it arrives when unblocked below)
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
        try:
            try:
                for _ in range(jobs):
                    reader, writer = context.Pipe(duplex=False)
                    self._results.append(reader)
                    proc = context.Process(target=_worker_main, daemon=True, name="ruxo-fhir import worker",
                                           args=(tasks, lock, writer, self._tasks, initializer, initargs))
                    proc.start()
                    writer.close()  # the worker's end: EOF here when it dies
                    self._procs.append(proc)
            finally:
                tasks.close()
                if masked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, masked)  # a Ctrl-C held back arrives here
        except BaseException:
            self.terminate()
            raise
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="ruxo-fhir import tasks", daemon=True)
        self._sender.start()

    def _send(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._tasks.send_bytes(data)
            except OSError:
                return  # the workers are gone; the main thread says why

    def submit(self, index: int, rows: _Rows) -> None:
        self._outbox.put(pickle.dumps((index, rows), pickle.HIGHEST_PROTOCOL))

    def result(self, index: int) -> _ChunkResult:
        """Chunk `index`'s result, waiting for it (others that come first are kept)."""
        from multiprocessing.connection import wait

        while index not in self._done:
            sentinels = {proc.sentinel: proc for proc in self._procs}
            ready: Any
            for ready in wait([*self._results, *sentinels]):
                if isinstance(ready, int):
                    proc = sentinels[ready]
                    if not self._results[self._procs.index(proc)].poll():
                        raise self._died(proc)
                    continue  # its last answer first
                try:
                    got, ok, value = pickle.loads(ready.recv_bytes())
                except EOFError:
                    raise self._died(self._procs[self._results.index(ready)]) from None
                if not ok:
                    exc, trace = value
                    raise exc from _RemoteTraceback(trace)
                self._done[got] = value
        return self._done.pop(index)  # type: ignore[no-any-return]

    @staticmethod
    def _died(proc: Any) -> WorkerError:
        proc.join(1)
        code = proc.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"stopped (exit code {code})")
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        return WorkerError(f"an import worker process {how}{hint}; nothing was written: "
                           "rerun the import, with fewer --jobs or --jobs 1")

    def close(self) -> None:
        """Stop the workers once every result is in."""
        for _ in self._procs:
            self._outbox.put(b"")
        self._outbox.put(None)
        self._sender.join()
        for proc in self._procs:
            proc.join()
        self._close_pipes()

    def terminate(self) -> None:
        """Stop at once (an error, an interrupt, or the consumer gave up)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join()
        if hasattr(self, "_outbox"):
            self._outbox.put(None)  # the sender's pending write fails now that no worker reads
        self._close_pipes()

    def _close_pipes(self) -> None:
        for conn in (*self._results, self._tasks):
            conn.close()


def parallel_chunks(
    reader: CaseReader,
    version: FhirVersion,
    on_reject: Callable[[Reject], None],
    jobs: int,
    *,
    by_kind: bool,
) -> Iterator[Chunk]:
    """The import's chunks in row order, done by `jobs` worker processes.

    The main process only reads CSV rows, keeps the cross-row checks (in file order, calling
    `on_reject` as rows are rejected) and writes; workers parse, map, validate and serialise.
    At most 2 x jobs chunks are in flight, so memory stays flat. `by_kind`: one stream per
    resource type (ndjson); else one stream in row order (a Bundle).
    """
    global _worker_state
    pending = _PatientsPending()
    admit = reader.admitter()
    chunks = _chunks(reader.rows(), CHUNK_ROWS)
    context = _pool_context()
    inflight: deque[tuple[_Rows, Callable[[], _ChunkResult]]] = deque()
    init: tuple[Callable[..., None] | None, tuple[Any, ...]] = (_worker_init, (reader, version, by_kind))
    if context.get_start_method() == "fork":
        # The first chunk is done here, before the workers fork: loading the FHIR models and
        # compiling the first shapes (most of a worker's start-up) is paid once, and the forked
        # workers inherit the warm builder instead of each building their own.
        first = next(chunks, None)
        if first is not None:
            _worker_init(reader, version, by_kind)
            done = _worker_rows(first)
            inflight.append((first, lambda: done))
            init = (None, ())

    def settle(rows: _Rows, result: _ChunkResult) -> Chunk:
        """The cross-row step for a chunk's rows, in order: which pieces go out."""
        records: list[CaseRecord] = []
        dropped: list[int] = []
        for i, ((line, fields), outcome) in enumerate(zip(rows, result[0])):
            item = admit(line, fields, outcome if isinstance(outcome, Reject) else outcome[0])
            if isinstance(item, Reject):
                on_reject(item)
                dropped += (2 * i, 2 * i + 1)
                continue
            assert not isinstance(outcome, Reject)
            record, patient_problem, problem = outcome
            include = pending.include(item)
            if include and patient_problem is not None:  # the Patient is validated first, as in one process
                problem = patient_problem
            pending.settle(record, include, problem is None)
            if problem is not None:
                _reject_accepted(reader, on_reject, record, version, problem)
                dropped += (2 * i, 2 * i + 1)
                continue
            if not include:
                dropped.append(2 * i)
            records.append(record)
        return Chunk(records, result, dropped)

    workers: _Workers | None = None
    try:
        workers = _Workers(context, jobs, *init)
        for index, chunk in enumerate(chunks):
            workers.submit(index, chunk)
            inflight.append((chunk, functools.partial(workers.result, index)))
            while len(inflight) > 2 * jobs:
                rows, get = inflight.popleft()
                yield settle(rows, get())
        while inflight:
            rows, get = inflight.popleft()
            yield settle(rows, get())
        workers.close()
        workers = None
    finally:
        _worker_state = None  # the main process's warm builder (forked workers have their copy)
        if workers is not None:
            workers.terminate()
    admit.finish()
