"""A fault-injecting HTTP front for a FHIR engine that has no switches of its own (HAPI FHIR JPA).

It forwards every request to the engine and every reply back **untouched**: the status line, the
headers (in order, duplicates kept) and the body bytes are the engine's. Only hop-by-hop headers
are a connection's own business (``Connection``, ``Keep-Alive``, ``Transfer-Encoding``...): the
front reads a chunked reply whole and sends it with ``Content-Length``; nothing else changes. The
``Host`` header is forwarded as the client sent it, so the URLs the engine builds (``Location``,
``Content-Location``, paging links, ``fullUrl``) name the front, as behind any reverse proxy.

What the front may do is what a network or a gateway does, never a fix of a reply:

- inject faults, with the same switches and counting as the Medplum front
  (``tests/fhir_server/README.md``; a ``POST .../$validate`` changes nothing and counts as a read, as
  ``POST Type/_search`` does): ``faults`` / ``faults_reads`` ``{"429", "503",
  "drop_before", "drop_after": N}``, ``retry_after``, ``latency_ms``;
- refuse what a more limited server refuses: ``batch_only`` (a transaction Bundle -> 400
  ``not-supported``), ``max_bundle_entries`` (a larger Bundle -> 413 ``too-costly``);
- pass engine switches to the engine's own admin API (HAPI: ``page_size``, ``no_client_ids``,
  ``validate``), so the engine behaves that way itself.

Replies the front makes itself (the faults and refusals above) are OperationOutcomes shaped like
the Medplum front's. The admin API (``/$admin/reset|config|stats|count``) has the same shapes as
the Medplum front's, so one test drives either engine.

Loopback only, threaded, bounded (at most ``MAX_WORKERS`` requests at once; a request body over
``MAX_BODY`` bytes is refused).
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

MAX_WORKERS = 32
MAX_BODY = 200 * 1024 * 1024
UPSTREAM_TIMEOUT = 300.0
FAULT_KINDS = ("429", "503", "drop_before", "drop_after")
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "proxy-connection"}
)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

FRONT_DEFAULTS: dict[str, Any] = {
    "faults": dict.fromkeys(FAULT_KINDS, 0),
    "faults_reads": dict.fromkeys(FAULT_KINDS, 0),
    "retry_after": 1,
    "latency_ms": 0,
    "batch_only": False,
    "max_bundle_entries": 0,
}


class Engine(Protocol):
    """What the front needs from the engine behind it (its own admin API)."""

    engine_switches: frozenset[str]

    def reset(self) -> None: ...

    def configure(self, switches: dict[str, Any]) -> dict[str, Any]: ...

    def config(self) -> dict[str, Any]: ...

    def counts(self) -> dict[str, int]: ...

    def entries_written(self) -> int: ...


class SwitchError(ValueError):
    """An unknown switch or a bad value (the admin API answers 400)."""


def _check_front_switch(name: str, value: Any) -> Any:
    if name in ("faults", "faults_reads"):
        if value is None:
            return dict.fromkeys(FAULT_KINDS, 0)
        if not isinstance(value, dict):
            raise SwitchError(f"{name} must be an object")
        for kind, n in value.items():
            if kind not in FAULT_KINDS:
                raise SwitchError(f"{name}: unknown fault kind {kind!r}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise SwitchError(f"{name}.{kind} must be an integer >= 0")
        return value
    default = FRONT_DEFAULTS[name]
    if value is None:
        return default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SwitchError(f"{name} must be true or false")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SwitchError(f"{name} must be an integer >= 0")
    return value


def outcome(status: int, code: str, text: str, expression: str | None = None) -> tuple[int, bytes]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": text, "details": {"text": text}}
    if expression:
        issue["expression"] = [expression]
    return status, json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()


class FaultFront:
    """``FaultFront(engine_url, engine).start()``; ``.root_url``, ``.base_url``; ``.stop()``."""

    def __init__(self, upstream_root: str, engine: Engine, *, host: str = "127.0.0.1", port: int = 0,
                 fhir_path: str = "/fhir", log: Callable[[str], None] | None = None) -> None:
        parts = urlsplit(upstream_root)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault front forwards to loopback engines only")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.engine = engine
        self.fhir_path = fhir_path
        self._log = log
        self._lock = threading.Lock()
        self._config: dict[str, Any] = copy.deepcopy(FRONT_DEFAULTS)
        self._startup: dict[str, Any] = {}
        self._zero_stats()
        self._server = _Server((host, port), _Handler)
        self._server.front = self
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultFront:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def root_url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + self.fhir_path

    # -- switches, stats --------------------------------------------------------------------

    def _zero_stats(self) -> None:
        self._stats: dict[str, Any] = {
            "requests": 0, "by_method": {}, "by_status": {}, "reads": 0, "writes": 0,
            "write_entries_received": 0,
            "faults_injected": dict.fromkeys(FAULT_KINDS, 0),
            "faults_injected_reads": dict.fromkeys(FAULT_KINDS, 0),
            "tokens_issued": 0, "exports_started": 0,
        }
        self._counters = {"writes": 0, "reads": 0}

    def set_startup(self, switches: dict[str, Any]) -> None:
        """Switches applied now and again by every reset."""
        self._startup = dict(switches)
        self.configure(self._startup)

    def configure(self, switches: dict[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        """Merge switches (nested ``faults`` objects merged, ``None`` restores a default)."""
        patch = {**(switches or {}), **kw}
        engine_patch = {k: v for k, v in patch.items() if k in self.engine.engine_switches}
        with self._lock:
            nxt = copy.deepcopy(self._config)
            for name, value in patch.items():
                if name in self.engine.engine_switches:
                    continue
                if name not in FRONT_DEFAULTS:
                    raise SwitchError(f"unknown switch {name!r}")
                checked = _check_front_switch(name, value)
                if name in ("faults", "faults_reads") and value is not None:
                    checked = {**nxt[name], **checked}
                nxt[name] = checked
            self._config = nxt
            if "faults" in patch:
                self._counters["writes"] = 0
            if "faults_reads" in patch:
                self._counters["reads"] = 0
        if engine_patch:
            self.engine.configure(engine_patch)
        return self.config()

    def config(self) -> dict[str, Any]:
        with self._lock:
            out = copy.deepcopy(self._config)
        out.update(self.engine.config())
        return out

    def reset(self) -> None:
        self.engine.reset()
        with self._lock:
            self._config = copy.deepcopy(FRONT_DEFAULTS)
            self._zero_stats()
        if self._startup:
            self.configure(self._startup)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = copy.deepcopy(self._stats)
        out["entries_written"] = self.engine.entries_written()
        return out

    # -- per request ------------------------------------------------------------------------

    def _count(self, key: str, sub: str | None = None) -> None:
        with self._lock:
            if sub is None:
                self._stats[key] += 1
            else:
                self._stats[key][sub] = self._stats[key].get(sub, 0) + 1

    def _count_entries(self, n: int) -> None:
        with self._lock:
            self._stats["write_entries_received"] += n

    def _pick_fault(self, kind: str) -> str | None:
        with self._lock:
            faults = self._config["faults" if kind == "writes" else "faults_reads"]
            self._counters[kind] += 1
            n = self._counters[kind]
            for k in FAULT_KINDS:
                every = faults.get(k, 0)
                if every > 0 and n % every == 0:
                    self._stats["faults_injected" if kind == "writes" else "faults_injected_reads"][k] += 1
                    return k
        return None

    def _refusal(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        """batch_only / max_bundle_entries on a Bundle POSTed to the FHIR base."""
        if method != "POST" or path.rstrip("/") != self.fhir_path:
            return None
        with self._lock:
            batch_only = self._config["batch_only"]
            cap = self._config["max_bundle_entries"]
        if not batch_only and not cap:
            return None
        try:
            bundle = json.loads(body)
        except ValueError:
            return None  # the engine says what is wrong with it
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            return None
        entries = bundle.get("entry") or []
        if cap and isinstance(entries, list) and len(entries) > cap:
            return outcome(413, "too-costly",
                           f"Bundle has {len(entries)} entries; this server accepts at most {cap}", "Bundle.entry")
        if batch_only and bundle.get("type") == "transaction":
            return outcome(400, "not-supported",
                           "Transaction bundles are not supported by this server; only batch is supported",
                           "Bundle.type")
        return None


def _write_entries(segs: list[str], body: bytes) -> int:
    """Write entries a request carries: 1, or a Bundle's POST/PUT/PATCH/DELETE entries."""
    if segs:
        return 1
    try:
        bundle = json.loads(body)
    except ValueError:
        return 0
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    if not isinstance(entries, list):
        return 0
    return sum(1 for e in entries if isinstance(e, dict) and isinstance(e.get("request"), dict)
               and str(e["request"].get("method", "")).upper() in WRITE_METHODS)


def _read_bundle(segs: list[str], body: bytes) -> bool:
    """A Bundle POSTed to the base whose entries are all GET/HEAD: searches and reads, no write."""
    if segs:
        return False
    try:
        bundle = json.loads(body)
    except ValueError:
        return False
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    return isinstance(entries, list) and bool(entries) and all(
        isinstance(e, dict) and isinstance(e.get("request"), dict)
        and str(e["request"].get("method", "")).upper() in ("GET", "HEAD") for e in entries)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    front: FaultFront

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault front listens on loopback only")
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_WORKERS)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # bounded: at most MAX_WORKERS connections served at once
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 120  # idle keep-alive connections end

    def log_message(self, format: str, *args: Any) -> None:
        log = self.server.front._log
        if log is not None:
            log("[fault-front] " + (format % args))

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
              reason: str | None = None) -> None:
        self.send_response_only(status, reason)
        for name, value in headers or [("Content-Type", "application/fhir+json; charset=utf-8")]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.server.front._count("by_status", str(status))

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), [("Content-Type", "application/json")])

    def _drop(self) -> None:
        self.server.front._count("by_status", "dropped")
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.connection.close()

    def _admin(self, method: str, path: str, body: bytes) -> None:
        front = self.server.front
        try:
            if path == "/$admin/reset" and method == "POST":
                front.reset()
                return self._json(200, {"status": "reset", "config": front.config()})
            if path == "/$admin/config" and method == "POST":
                patch = json.loads(body or b"{}")
                if not isinstance(patch, dict):
                    raise SwitchError("config body must be a JSON object")
                return self._json(200, front.configure(patch))
            if path == "/$admin/config" and method == "GET":
                return self._json(200, front.config())
            if path == "/$admin/stats" and method == "GET":
                return self._json(200, front.stats())
            if path == "/$admin/count" and method == "GET":
                return self._json(200, front.engine.counts())
        except (SwitchError, ValueError) as exc:
            return self._json(400, {"error": str(exc)})
        return self._json(404, {"error": f"no admin route {method} {path}"})

    def _handle(self) -> None:
        front = self.server.front
        method = self.command
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            self.close_connection = True
            status, payload = outcome(413, "too-costly", f"request body over {MAX_BODY} bytes")
            return self._send(status, payload)
        if path.startswith("/$admin/"):
            return self._admin(method, path, body)

        front._count("requests")
        front._count("by_method", method)
        in_base = path == front.fhir_path or path.startswith(front.fhir_path + "/")
        rel = path[len(front.fhir_path):] if in_base else path
        exempt = rel in ("/metadata", "/.well-known/smart-configuration")
        fault = None
        if in_base and not exempt:
            latency = front._config["latency_ms"]
            if latency:
                time.sleep(latency / 1000)
            segs = [s for s in rel.split("/") if s]
            search_post = method == "POST" and len(segs) == 2 and segs[1] == "_search"
            validate_post = method == "POST" and bool(segs) and segs[-1] == "$validate"
            # a batch of GET entries (push's reads before writing) is a read, whatever its method
            read_bundle = method == "POST" and _read_bundle(segs, body)
            is_write = method in WRITE_METHODS and not search_post and not validate_post and not read_bundle
            front._count("writes" if is_write else "reads")
            if is_write:
                front._count_entries(_write_entries(segs, body))
            fault = front._pick_fault("writes" if is_write else "reads")
            if fault == "429":
                status, payload = outcome(429, "throttled", "Too many requests (injected fault)")
                return self._send(status, payload, [("Content-Type", "application/fhir+json; charset=utf-8"),
                                                    ("Retry-After", str(front._config["retry_after"]))])
            if fault == "503":
                return self._send(*outcome(503, "transient", "Service unavailable (injected fault)"))
            if fault == "drop_before":
                return self._drop()
            refused = front._refusal(method, path, body)
            if refused is not None:
                return self._send(*refused)

        status, reason, headers, payload = self._forward(method, body)
        if fault == "drop_after":
            return self._drop()
        if in_base and rel == "/$export" and status == 202:
            front._count("exports_started")
        self._send(status, payload, headers, reason)

    def _forward(self, method: str, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        front = self.server.front
        conn = http.client.HTTPConnection(front.upstream_host, front.upstream_port, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in HOP_BY_HOP or name.lower() == "content-length":
                    continue
                conn.putheader(name, value)
            if body or method in WRITE_METHODS:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()
            headers = [(n, v) for n, v in resp.getheaders()
                       if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"]
            return resp.status, resp.reason, headers, payload
        finally:
            conn.close()

    def _dispatch(self) -> None:
        try:
            self._handle()
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as exc:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(*outcome(502, "exception", f"fault front: {type(exc).__name__}: {exc}"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch
