"""Hostile FHIR servers for the security tests: small loopback HTTP servers the tests start.

A server is one Python function ``handler(req) -> Reply`` on 127.0.0.1 (port chosen by the OS),
served from a daemon thread, recorded request by request, stopped by the fixture. Every loop
here is bounded (trickles and endless streams stop after ``max_seconds`` or when the client
hangs up), so a test can never hang on its own server.

    def test_x(hostile):
        srv = hostile(lambda req: Reply(401, body=outcome(req.headers.get("Authorization"))))
        ... run the CLI against srv.base_url ...
        assert srv.requests[0].method == "GET"
"""
from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Req:
    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    raw_target: str = ""

    @property
    def fhir_path(self) -> str:
        """The path below /fhir, e.g. 'metadata' or 'Patient'."""
        return self.path.split("/fhir", 1)[-1].strip("/")


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Raw body pieces sent with a pause between them (trickle / endless stream); `chunked` uses
    # Transfer-Encoding: chunked, otherwise Content-Length (when `length` is given) or close.
    stream: Iterable[bytes] | None = None
    pause: float = 0.0
    chunked: bool = False
    length: int | None = None


Handler = Callable[[Req], Reply]


def _body_bytes(body: bytes | str | dict[str, Any] | list[Any]) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


class HostileServer:
    """One loopback server; ``base_url`` is ``http://127.0.0.1:PORT/fhir``."""

    def __init__(self, handler: Handler, *, max_seconds: float = 60.0) -> None:
        self.handler = handler
        self.max_seconds = max_seconds
        self.requests: list[Req] = []
        owner = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Req(self.command, split.path, parse_qs(split.query, keep_blank_values=True),
                          dict(self.headers.items()), body, self.path)
                owner.requests.append(req)
                reply = owner.handler(req)
                owner._send(self, reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _send(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        h.send_response(reply.status)
        headers = {"Content-Type": "application/fhir+json", **reply.headers}
        for k, v in headers.items():
            h.send_header(k, v)
        if reply.stream is None:
            data = _body_bytes(reply.body)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        if reply.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        elif reply.length is not None:
            h.send_header("Content-Length", str(reply.length))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        deadline = time.monotonic() + self.max_seconds
        try:
            for piece in reply.stream:
                if time.monotonic() > deadline:
                    break
                if reply.chunked:
                    h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    h.wfile.write(piece)
                h.wfile.flush()
                if reply.pause:
                    time.sleep(reply.pause)
            if reply.chunked:
                h.wfile.write(b"0\r\n\r\n")
        except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True  # the client gave up: what these tests want to see

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/fhir"

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def paths(self) -> list[str]:
        return [r.fhir_path for r in self.requests]


# --- canned FHIR answers -------------------------------------------------------------------

def capability(**extra: Any) -> dict[str, Any]:
    """A small R4 CapabilityStatement declaring what push/pull/check look for."""
    resources = [
        {"type": t, "interaction": [{"code": c} for c in ("read", "update", "search-type", "create")],
         "searchParam": [{"name": "_lastUpdated", "type": "date"}, {"name": "identifier", "type": "token"}]}
        for t in ("Patient", "Condition", "MedicationStatement", "Observation", "AdverseEvent")
    ]
    doc: dict[str, Any] = {
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "date": "2024-01-01",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "resource": resources,
                  "interaction": [{"code": "transaction"}, {"code": "batch"}]}],
    }
    doc.update(extra)
    return doc


def searchset(resources: list[dict[str, Any]] | None = None, next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources or []]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def outcome(text: str, code: str = "security") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def gzip_bomb(decompressed_bytes: int) -> bytes:
    """gzip of `decompressed_bytes` zero bytes (about 1000:1)."""
    return gzip.compress(b"\0" * decompressed_bytes, compresslevel=9)


def endless(piece: bytes = b" ") -> Iterator[bytes]:
    """An endless body; HostileServer's max_seconds (and the client hanging up) bound it."""
    while True:
        yield piece


def fhir_basics(req: Req) -> Reply | None:
    """The answers every hostile server gives alike: metadata, empty searches."""
    if req.fhir_path == "metadata":
        return Reply(200, capability(), headers={"Date": "Wed, 02 Dec 2026 10:00:00 GMT"})
    if req.method == "GET" and req.fhir_path and "/" not in req.fhir_path:
        return Reply(200, searchset())
    return None


# --- pytest fixture ------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the module is also usable by hand
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def hostile() -> Iterator[Callable[..., HostileServer]]:
        """Factory: ``hostile(handler, max_seconds=...)`` starts a server, stopped after the test."""
        started: list[HostileServer] = []

        def make(handler: Handler, **kw: Any) -> HostileServer:
            srv = HostileServer(handler, **kw).start()
            started.append(srv)
            return srv

        yield make
        for srv in started:
            srv.stop()
