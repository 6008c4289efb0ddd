"""The fault front (tests/fault_front.py) passes the engine's replies through untouched and injects
faults exactly as its switches say.

Most tests put it before a small loopback origin (127.0.0.1, bounded, stdlib) whose replies are
crafted to catch any normalisation: no ETag, an odd Location, repeated headers, chunked bodies,
unusual reason phrases. The last ones run it before HAPI FHIR JPA and compare with HAPI directly.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from fault_front import FaultFront
from hapiserver import TestHapiServer

pytestmark = pytest.mark.e2e

FHIR_JSON = "application/fhir+json"


class _Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.seen: list[dict[str, Any]] = []


class _OriginHandler(BaseHTTPRequestHandler):
    """Answers from a fixed script; records what reached it."""

    protocol_version = "HTTP/1.1"
    server: _Origin

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append({"method": self.command, "path": self.path, "body": body,
                                 "headers": list(self.headers.items())})
        if self.path.startswith("/fhir/chunked"):
            self.send_response_only(200, "OK")
            self.send_header("Content-Type", FHIR_JSON)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"resourceType":"Bundle",', b'"type":"searchset",  "total":0}'):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        reply = ('{"resourceType":"Patient","id":"x",  "meta":{"versionId":"7"}, "gender":"other"}'
                 if self.command in ("GET", "PUT") else
                 '{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":"200"}}]}')
        payload = reply.encode()
        self.send_response_only(201 if self.command == "PUT" else 200, "Made It" if self.command == "PUT" else "OK")
        self.send_header("Content-Type", "application/fhir+json;charset=UTF-8")
        self.send_header("X-Odd", "one")
        self.send_header("X-Odd", "two")
        self.send_header("Content-Location", "Patient/x")  # no _history: the front must not "fix" it
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = _any


class _OriginAdmin:
    """The engine-admin hooks the front calls; this origin has no switches and no store."""

    engine_switches = frozenset({"page_size"})

    def __init__(self) -> None:
        self.resets = 0
        self.patches: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.resets += 1

    def configure(self, switches: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(dict(switches))
        return {}

    def config(self) -> dict[str, Any]:
        return {"page_size": (self.patches[-1].get("page_size") if self.patches else None)}

    def counts(self) -> dict[str, int]:
        return {"Patient": 1}

    def entries_written(self) -> int:
        return 0


@pytest.fixture
def origin() -> Iterator[_Origin]:
    server = _Origin()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def front(origin: _Origin) -> Iterator[FaultFront]:
    f = FaultFront(f"http://127.0.0.1:{origin.server_address[1]}", _OriginAdmin()).start()
    try:
        yield f
    finally:
        f.stop()


def _raw(url: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 exchange on a fresh socket; the whole reply as bytes (connection: close)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lines = [f"{method} {parts.path}{'?' + parts.query if parts.query else ''} HTTP/1.1",
             f"Host: {parts.netloc}", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _split(reply: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *rest = head.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in rest)]
    return status.encode(), headers, body


def _end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
    return [(k, v) for k, v in headers if k.lower() not in hop]


# --------------------------------------------------------------------------------------------
# pass-through
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_reply_bytes_headers_and_status_pass_through_untouched(
    origin: _Origin, front: FaultFront, method: str
) -> None:
    direct_url = f"http://127.0.0.1:{origin.server_address[1]}/fhir/Patient/x"
    via_url = f"{front.base_url}/Patient/x" if method != "POST" else front.base_url
    if method == "POST":
        direct_url = f"http://127.0.0.1:{origin.server_address[1]}/fhir"
    body = b'{"resourceType":"Patient"}' if method != "GET" else b""
    d_status, d_headers, d_body = _split(_raw(direct_url, method, body))
    v_status, v_headers, v_body = _split(_raw(via_url, method, body))
    assert v_status == d_status  # same code and reason phrase ("201 Made It")
    assert v_body == d_body  # byte for byte (odd spacing kept)
    assert _end_to_end(v_headers) == _end_to_end(d_headers)  # order and duplicates kept
    names = {k.lower() for k, _ in v_headers}
    assert "etag" not in names and "location" not in names and "last-modified" not in names
    assert dict(v_headers)["Content-Length"] == str(len(v_body))


def test_chunked_reply_is_sent_whole_with_content_length(origin: _Origin, front: FaultFront) -> None:
    status, headers, body = _split(_raw(f"{front.base_url}/chunked"))
    assert status == b"HTTP/1.1 200 OK"
    assert body == b'{"resourceType":"Bundle","type":"searchset",  "total":0}'
    assert dict(headers)["Content-Length"] == str(len(body))
    assert "transfer-encoding" not in {k.lower() for k, _ in headers}


def test_request_forwarded_with_the_clients_host_path_and_body(origin: _Origin, front: FaultFront) -> None:
    body = b'{"resourceType":"Patient","id":"x"}'
    r = requests.put(f"{front.base_url}/Patient/x?_pretty=false", data=body,
                     headers={"Content-Type": FHIR_JSON, "If-Match": 'W/"3"'}, timeout=30)
    assert r.status_code == 201
    seen = origin.seen[-1]
    assert (seen["method"], seen["path"], seen["body"]) == ("PUT", "/fhir/Patient/x?_pretty=false", body)
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["host"] == f"127.0.0.1:{front.port}"  # the engine builds URLs that name the front
    assert sent["if-match"] == 'W/"3"'


# --------------------------------------------------------------------------------------------
# faults and refusals
# --------------------------------------------------------------------------------------------


def test_every_nth_write_gets_429_with_retry_after_reads_counted_apart(origin: _Origin, front: FaultFront) -> None:
    front.configure({"faults": {"429": 2}, "retry_after": 3})
    codes = [requests.put(f"{front.base_url}/Patient/x", data=b"{}", timeout=30).status_code for _ in range(4)]
    assert codes == [201, 429, 201, 429]
    assert [requests.get(f"{front.base_url}/Patient/x", timeout=30).status_code for _ in range(3)] == [200] * 3
    r = requests.put(f"{front.base_url}/Patient/x", data=b"{}", timeout=30)
    assert r.status_code == 201  # 5th write
    r = requests.put(f"{front.base_url}/Patient/x", data=b"{}", timeout=30)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "3")
    assert r.json()["issue"][0]["code"] == "throttled"
    stats = front.stats()
    assert (stats["writes"], stats["reads"], stats["faults_injected"]["429"]) == (6, 3, 3)
    assert stats["write_entries_received"] == 6  # counted on arrival, faulted or not
    assert sum(1 for s in origin.seen if s["method"] == "PUT") == 3  # faulted writes never reached it


def test_drop_before_never_reaches_the_engine_drop_after_does(origin: _Origin, front: FaultFront) -> None:
    front.configure(faults={"drop_before": 1})
    with pytest.raises(requests.ConnectionError):
        requests.put(f"{front.base_url}/Patient/x", data=b"{}", timeout=30)
    assert origin.seen == []
    front.configure(faults={"drop_before": 0, "drop_after": 1})
    with pytest.raises(requests.ConnectionError):
        requests.put(f"{front.base_url}/Patient/x", data=b"{}", timeout=30)
    assert [s["method"] for s in origin.seen] == ["PUT"]
    assert front.stats()["by_status"]["dropped"] == 2


def test_metadata_never_faulted(origin: _Origin, front: FaultFront) -> None:
    front.configure(faults_reads={"503": 1})
    assert requests.get(f"{front.base_url}/metadata", timeout=30).status_code == 200
    r = requests.get(f"{front.base_url}/Patient/x", timeout=30)
    assert r.status_code == 503 and r.json()["issue"][0]["code"] == "transient"


def test_batch_only_refuses_transactions_and_forwards_batches(origin: _Origin, front: FaultFront) -> None:
    front.configure(batch_only=True)
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    r = requests.post(front.base_url, json=tx, timeout=30)
    assert r.status_code == 400
    assert "only batch is supported" in r.json()["issue"][0]["diagnostics"]
    assert origin.seen == []
    r = requests.post(front.base_url, json={**tx, "type": "batch"}, timeout=30)
    assert r.status_code == 200 and len(origin.seen) == 1


def test_bundle_size_cap_413(origin: _Origin, front: FaultFront) -> None:
    front.configure(max_bundle_entries=2)
    entries = [{"request": {"method": "GET", "url": "Patient/x"}}] * 3
    r = requests.post(front.base_url, json={"resourceType": "Bundle", "type": "batch", "entry": entries}, timeout=30)
    assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-costly"
    assert origin.seen == []
    r = requests.post(front.base_url, json={"resourceType": "Bundle", "type": "batch", "entry": entries[:2]},
                      timeout=30)
    assert r.status_code == 200
    puts = [{"request": {"method": "PUT", "url": "Patient/x"}}] * 2
    requests.post(front.base_url, json={"resourceType": "Bundle", "type": "batch", "entry": puts + entries[:1]},
                  timeout=30)
    assert front.stats()["write_entries_received"] == 2  # PUT entries only; GET entries are reads


def test_admin_api_switches_reset_and_errors(origin: _Origin, front: FaultFront) -> None:
    admin = front.engine
    assert isinstance(admin, _OriginAdmin)
    r = requests.post(f"{front.root_url}/$admin/config", json={"page_size": 5, "latency_ms": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["latency_ms"] == 1 and r.json()["page_size"] == 5
    assert admin.patches == [{"page_size": 5}]  # engine switches go to the engine
    assert requests.post(f"{front.root_url}/$admin/config", json={"nope": 1}, timeout=30).status_code == 400
    assert requests.post(f"{front.root_url}/$admin/config", json={"faults": {"429": -1}},
                         timeout=30).status_code == 400
    requests.get(f"{front.base_url}/Patient/x", timeout=30)
    assert requests.get(f"{front.root_url}/$admin/stats", timeout=30).json()["reads"] == 1
    assert requests.get(f"{front.root_url}/$admin/count", timeout=30).json() == {"Patient": 1}
    assert requests.post(f"{front.root_url}/$admin/reset", timeout=30).status_code == 200
    assert admin.resets == 1
    stats = front.stats()
    assert (stats["reads"], stats["requests"], front.config()["latency_ms"]) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# before HAPI FHIR JPA
# --------------------------------------------------------------------------------------------

_VARYING = {"date", "x-request-id"}  # per exchange on HAPI, whoever sends the request


def _comparable(r: requests.Response, search: bool = False) -> list[tuple[str, str]]:
    # a search or history Bundle is made per request: its id (Content-Location) and time vary
    varying = _VARYING | ({"last-modified", "content-location"} if search else set())
    return [(k, v) for k, v in r.raw.headers.items()
            if k.lower() not in varying and k.lower() not in ("transfer-encoding", "content-length", "connection")]


def test_hapi_replies_pass_through_the_front_byte_identical(hapi_server: TestHapiServer) -> None:
    direct, via = hapi_server.engine_base_url, hapi_server.base_url
    patient = {"resourceType": "Patient", "id": "pt-front", "gender": "female"}
    put = requests.put(f"{via}/Patient/pt-front", data=json.dumps(patient),
                       headers={"Content-Type": FHIR_JSON}, timeout=60)
    assert put.status_code == 201
    # whatever HAPI says about the write, the front did not add to it
    front_names = {k.lower() for k in put.raw.headers}
    direct_put = requests.put(f"{direct}/Patient/pt-other", data=json.dumps({**patient, "id": "pt-other"}),
                              headers={"Content-Type": FHIR_JSON}, timeout=60)
    assert front_names - {"content-length", "transfer-encoding"} == \
        {k.lower() for k in direct_put.raw.headers} - {"content-length", "transfer-encoding"}
    for path in ("/Patient/pt-front", "/Patient?gender=female&_count=1", "/Patient/pt-front/_history",
                 "/Patient/missing"):
        a = requests.get(f"{direct}{path}", headers={"Host": f"127.0.0.1:{hapi_server.port}"}, timeout=60)
        b = requests.get(f"{via}{path}", timeout=60)
        assert (b.status_code, b.reason) == (a.status_code, a.reason), path
        bundle = "?" in path or path.endswith("/_history")
        assert _comparable(b, bundle) == _comparable(a, bundle), path
        if bundle:  # Bundle ids are per request; the entries are the same bytes
            assert b.json()["entry"] == a.json()["entry"], path
        elif path != "/Patient/missing":
            assert b.content == a.content, path


def test_hapi_engine_switches_are_hapis_own_settings(hapi_server: TestHapiServer) -> None:
    hapi_server.configure(no_client_ids=True)
    r = requests.put(f"{hapi_server.base_url}/Patient/pt-new", data=json.dumps({"resourceType": "Patient",
                     "id": "pt-new"}), headers={"Content-Type": FHIR_JSON}, timeout=60)
    assert r.status_code in (400, 404) and "HAPI-0959" in r.text  # HAPI's own refusal text
    hapi_server.configure(no_client_ids=False, page_size=2)
    for i in range(3):
        requests.put(f"{hapi_server.base_url}/Patient/pt-{i}", data=json.dumps({"resourceType": "Patient",
                     "id": f"pt-{i}"}), headers={"Content-Type": FHIR_JSON}, timeout=60).raise_for_status()
    page = requests.get(f"{hapi_server.base_url}/Patient?_count=50", timeout=60).json()
    assert len(page["entry"]) == 2 and any(ln["relation"] == "next" for ln in page["link"])
    assert hapi_server.counts() == {"Patient": 3}
    assert hapi_server.stats()["entries_written"] == 3
    hapi_server.reset()
    assert hapi_server.counts() == {}
    assert hapi_server.config()["page_size"] != 2 and hapi_server.config()["no_client_ids"] is False
