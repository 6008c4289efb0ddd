"""FHIR REST client over a requests.Session: bounded retries, one re-auth on 401, safe paging."""
from __future__ import annotations

import email.utils
import hashlib
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests
import requests.auth
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import MaxRetryError, NewConnectionError

from ruxo_fhir.errors import CapabilityError, FatalServerError, RuxoError, TemporaryServerError, UsageError
from ruxo_fhir.transport.outcome import (
    TEMPORARY_STATUSES,
    raise_for_response,
    redact_url,
    summarize_outcome,
)

logger = logging.getLogger("ruxo_fhir.transport")

FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Pages one search may take before it is stopped as a runaway (a server whose `next` links never
# end). 20,000 pages hold 400,000 resources at HAPI's default 20 per page; pull --max-pages raises it.
DEFAULT_MAX_PAGES = 20_000
DEFAULT_MAX_RESPONSE_BYTES = 128 * 1024 * 1024  # one response body in memory (decompressed)
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_SIZE = 64 * 1024

ParamValue = str | int | float | Sequence[str]
Params = Mapping[str, ParamValue] | Sequence[tuple[str, str]]

# Failures of the connection itself (reset, refused, DNS, timeouts, truncated chunked bodies).
# SSLError is a ConnectionError subclass but is handled first: a bad certificate is not transient.
_TRANSIENT_EXCEPTIONS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


def _default_user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"ruxo-fhir/{version('ruxo-fhir')}"
    except Exception:
        return "ruxo-fhir"


DEFAULT_USER_AGENT = _default_user_agent()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date; None if absent/unparsable.

    ``now`` is the current wall-clock time (``time.time()``), used for the HTTP-date form. Dates
    in the past give 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN guard
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None instead of raising
        return None
    if when.tzinfo is None:  # RFC 9110 dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    """How ``FhirClient.request`` retries temporary failures of idempotent requests.

    Temporary means HTTP 408/429/500/502/503/504 or a broken connection. Between attempts the
    client sleeps ``Retry-After`` when the server sends one (seconds or HTTP-date), otherwise
    ``backoff_base * 2**(n-1)`` capped at ``backoff_cap``, shortened by up to ``jitter`` (a
    fraction, 0 = deterministic) using ``rng``.

    Worst case, stated so callers can plan: at most ``max_attempts`` attempts, and at most
    ``max_total_seconds`` of sleeping between them in total — a Retry-After longer than the budget
    left ends the retries at once instead of being shortened. One ``request()`` therefore lasts
    at most ``max_total_seconds + (max_attempts + 1) * timeout`` (the +1 is the single re-send
    after a 401 re-authentication); with the defaults and a 60 s timeout: 120 + 7 * 60 = 540 s.
    requests' timeout bounds each wait on the socket, so a server trickling bytes can stretch a
    single attempt beyond it.
    """

    max_attempts: int = 6
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    max_total_seconds: float = 120.0
    jitter: float = 0.25
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.max_total_seconds < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("RetryPolicy.jitter is a fraction between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """Delay after the ``attempt``-th failed attempt (1-based), without Retry-After."""
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** max(0, attempt - 1))
        if self.jitter:
            delay *= 1.0 - self.jitter * self.rng()
        return delay

    def next_delay(self, attempt: int, slept: float, retry_after: float | None) -> float | None:
        """Seconds to sleep before attempt ``attempt + 1``, or None when retries are used up.

        ``slept`` is what was already spent sleeping for this request.
        """
        remaining = self.max_total_seconds - slept
        if attempt >= self.max_attempts or remaining <= 0:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= remaining else None
        return min(self.backoff(attempt), remaining)


@runtime_checkable
class Refreshable(Protocol):
    """An auth object that can fetch fresh credentials (used once after a 401)."""

    def refresh(self) -> None: ...


class InvalidJSONError(FatalServerError, ValueError):
    """A response body that should be JSON is empty or malformed.

    Also a ValueError (like requests' own JSONDecodeError), so ``except ValueError`` around
    ``Response.json()`` keeps working.
    """


@dataclass(frozen=True)
class Response:
    """A finished HTTP exchange: status, case-insensitive headers, body bytes and the final URL."""

    status: int
    headers: CaseInsensitiveDict[str]
    body: bytes
    url: str

    def json(self) -> Any:
        """The body parsed as JSON; InvalidJSONError (a FatalServerError and ValueError) otherwise."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            what = "empty" if not self.body.strip() else "not valid JSON"
            raise InvalidJSONError(
                f"response body is {what}", status=self.status, url=redact_url(self.url)
            ) from exc

    def json_or_empty(self) -> dict[str, Any]:
        """The JSON object in the body, or {} when the body is empty (e.g. Prefer: return=minimal)."""
        if not self.body.strip():
            return {}
        doc = self.json()
        if not isinstance(doc, dict):
            raise FatalServerError("response body is not a JSON object", status=self.status, url=redact_url(self.url))
        return doc


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _was_not_sent(exc: BaseException) -> bool:
    """True when the failure happened before any byte of the request left (safe to resend any method)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        inner = exc.args[0]
        # NewConnectionError covers refused connections and (urllib3 2) DNS failures.
        return isinstance(inner, MaxRetryError) and isinstance(inner.reason, NewConnectionError)
    return False


def _unreachable(exc: BaseException) -> str | None:
    """`connection refused` / `host name not found` when nothing could even be connected to."""
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args:
        return None
    inner = exc.args[0]
    reason = inner.reason if isinstance(inner, MaxRetryError) else inner
    if not isinstance(reason, NewConnectionError):
        return None
    if type(reason).__name__ == "NameResolutionError" or "Name or service not known" in str(reason) \
            or "nodename nor servname" in str(reason) or "getaddrinfo failed" in str(reason):
        return "host name not found"
    cause: BaseException | None = reason
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause) \
                or "actively refused" in str(cause):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return None


def _log_target(url: str, params: Params | None) -> str:
    """Path plus parameter NAMES (values may be PHI) for logs and error messages."""
    prepared = PreparedRequest()
    try:
        prepared.prepare_url(url, params)
        full = prepared.url or url
    except requests.exceptions.RequestException:
        full = url
    return redact_url(full)


def _split_lines(chunks: Iterable[bytes], max_line: int | None = None) -> Iterator[bytes]:
    """Non-empty lines (without line ending) from a stream of byte chunks, linear in the input.

    ``max_line``: a line longer than this raises ResponseTooLarge (memory stays bounded)."""
    parts: list[bytes] = []
    pending = 0
    for chunk in chunks:
        if not chunk:
            continue
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            parts.append(chunk)
            pending += len(chunk)
            if max_line is not None and pending > max_line:
                raise ResponseTooLarge(f"a line of the download is longer than the {_mb(max_line)} cap")
            continue
        pending = len(pieces[-1])
        parts.append(pieces[0])
        first = b"".join(parts).rstrip(b"\r")
        if first:
            yield first
        for piece in pieces[1:-1]:
            piece = piece.rstrip(b"\r")
            if piece:
                yield piece
        parts = [pieces[-1]]
    last = b"".join(parts).rstrip(b"\r")
    if last:
        yield last


# --- bounded responses: one reader for every body (size cap, bounded decompression, deadline) ---

class ResponseTooLarge(FatalServerError):
    """A response body (after decompression) over the configured cap."""


class ResponseDeadline(FatalServerError):
    """No complete response within the --timeout deadline (a trickle or an endless stream)."""


class _BoundedDecoder:
    """gzip/deflate/identity decoding whose output per call never exceeds what the caller allows.

    zlib's ``max_length`` keeps a decompression bomb from expanding beyond ``room + 1`` bytes
    before the cap check sees it.
    """

    def __init__(self, encoding: str) -> None:
        enc = encoding.strip().lower()
        self._raw_deflate_tried = False
        self._z: Any
        if enc in ("", "identity"):
            self._z = None
        elif enc in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._z = zlib.decompressobj(zlib.MAX_WBITS)
        else:
            raise FatalServerError(f"unsupported Content-Encoding {enc[:40]!r} (we ask for gzip or deflate only)")
        self._deflate = enc == "deflate"

    def decode(self, data: bytes, room: int) -> Iterator[bytes]:
        """Decoded pieces of ``data``; stops early (the caller raises) once more than ``room`` came out."""
        if self._z is None:
            yield data
            return
        produced = 0
        while data and produced <= room:
            try:
                out = self._z.decompress(data, room - produced + 1)
            except zlib.error:
                if self._deflate and not self._raw_deflate_tried:  # servers often send raw deflate
                    self._raw_deflate_tried = True
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise FatalServerError("response body is not valid gzip/deflate data") from None
            self._raw_deflate_tried = True
            produced += len(out)
            yield out
            data = self._z.unconsumed_tail


def _set_socket_deadline(resp: requests.Response, remaining: float) -> None:
    """Shorten the socket timeout to what is left of the deadline (best effort: urllib3 internals)."""
    conn = getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(0.01, remaining))
        except OSError:
            pass


def _iter_raw(resp: requests.Response, deadline: float | None, what: str, url: str) -> Iterator[bytes]:
    """Raw (still encoded) body pieces as they arrive, each read ending by the deadline."""
    raw = resp.raw
    while True:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResponseDeadline(what, url=url)
            _set_socket_deadline(resp, remaining)
        try:
            piece = raw.read1(_READ_SIZE, decode_content=False)
        except Exception as exc:  # socket timeouts, urllib3 ReadTimeoutError / ProtocolError, ...
            if deadline is not None and time.monotonic() >= deadline - 0.005:
                raise ResponseDeadline(what, url=url) from exc
            if isinstance(exc, requests.exceptions.RequestException):
                raise
            raise requests.exceptions.ConnectionError(f"{type(exc).__name__} while reading the response") from exc
        if not piece:
            return
        yield piece


def read_bounded(resp: requests.Response, *, limit: int, deadline: float | None, target: str,
                 timeout: float | None = None) -> bytes:
    """The whole body of a streamed response: at most ``limit`` bytes after decompression, done
    by ``deadline`` (monotonic seconds) or ResponseDeadline; ResponseTooLarge over the cap."""
    slow = (f"no complete answer from {target} within the {timeout:g} s deadline (--timeout); the server "
            "trickles or streams without end") if timeout else f"no complete answer from {target} in time"
    loaded = getattr(resp, "_content", False)
    if getattr(resp, "_content_consumed", False) and isinstance(loaded, bytes):  # read by a session hook
        if len(loaded) > limit:
            raise ResponseTooLarge(f"response from {target} is larger than the {_mb(limit)} cap",
                                   status=resp.status_code, url=target)
        return loaded
    decoder = _BoundedDecoder(resp.headers.get("Content-Encoding", ""))
    body = bytearray()
    try:
        for piece in _iter_raw(resp, deadline, slow, target):
            for out in decoder.decode(piece, limit - len(body)):
                body += out
                if len(body) > limit:
                    raise ResponseTooLarge(
                        f"response from {target} is larger than the {_mb(limit)} cap (raise it with "
                        "--max-response-mb or the profile's max_response_mb if the server is right)",
                        status=resp.status_code, url=target)
    except BaseException:
        resp.close()
        raise
    release = getattr(resp.raw, "release_conn", None)
    if release is not None:
        release()
    return bytes(body)


def iter_bounded(resp: requests.Response, *, limit: int, target: str) -> Iterator[bytes]:
    """Decoded body pieces of a long download (constant memory; decompression bounded per piece)."""
    decoder = _BoundedDecoder(resp.headers.get("Content-Encoding", ""))
    for piece in _iter_raw(resp, None, "", target):
        yield from decoder.decode(piece, limit)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


@dataclass
class _Sending:
    """One logical request as the retry loop re-sends it."""

    method: str
    url: str
    target: str  # redacted: path and parameter names only
    params: Params | None
    case_id: str | None
    stream: bool
    body: bytes | str | Mapping[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    """A connection-level failure: the error to raise, its cause, and whether bytes may have left."""

    error: TemporaryServerError
    cause: BaseException
    sent: bool


class FhirClient:
    """A FHIR R4 REST client bound to one server base URL.

    The only code in ruxo-fhir that speaks HTTP. Requests are retried per ``retry``
    (RetryPolicy) when idempotent; a 401 triggers one ``auth.refresh()`` (when the auth object
    has one) that is not counted as a retry. ``request_count`` counts HTTP requests sent to
    the FHIR server (every attempt; token-endpoint calls of the auth object are not counted).
    Credentials are only ever sent to the base URL's origin (scheme, host, port).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: requests.auth.AuthBase | None = None,
        verify: bool | str = True,
        timeout: float = 60,
        retry: RetryPolicy | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        session: requests.Session | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RuxoError(f"FHIR base URL must be an http:// or https:// URL with a host, got {redact_url(base_url)!r}")
        if parts.query or parts.fragment:
            raise RuxoError("FHIR base URL must not carry a query or fragment")
        if "@" in parts.netloc:
            raise UsageError("FHIR base URL must not carry credentials (user:password@); use an auth object")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        # TLS verification stays on unless the caller passes verify=False; a str is a CA bundle path.
        self.verify = verify
        if verify is False and urlsplit(self.base_url).scheme.lower() == "https":
            # Said once here, not by urllib3 on every request (one warning per request drowns the output).
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            logger.warning("TLS certificate verification is OFF for %s (--insecure)", redact_url(self.base_url))
        # `timeout` bounds each wait on the socket AND the whole response (a deadline per attempt).
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.retry = retry or RetryPolicy()
        self.request_count = 0
        # Retries are for a server that answered before: nothing listening at first contact is
        # a wrong URL or a stopped server, said at once instead of after minutes of backoff.
        self.answered = False
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = user_agent
        self.session.headers["Accept"] = FHIR_JSON
        self.session.headers["Accept-Encoding"] = "gzip, deflate"  # what _BoundedDecoder decodes
        self._capabilities: dict[str, Any] | None = None
        # A server that says "slow down" (429/503, Retry-After) says it to the whole client: the
        # other threads of a concurrent push wait out the same pause once before their next
        # request (`_await_pause`), instead of each finding out by its own refusal.
        self._pause_lock = threading.Lock()
        self._pause: tuple[int, float] = (0, 0.0)  # (epoch, time.monotonic() to wait until)
        self._pauses_seen = threading.local()

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    def _set_pause(self, delay: float) -> None:
        with self._pause_lock:
            epoch, until = self._pause
            self._pause = (epoch + 1, max(until, time.monotonic() + delay))
            self._pauses_seen.epoch = epoch + 1  # this thread sleeps the delay itself

    def _await_pause(self) -> None:
        epoch, until = self._pause
        if epoch and getattr(self._pauses_seen, "epoch", 0) != epoch:
            self._pauses_seen.epoch = epoch
            remaining = until - time.monotonic()
            if remaining > 0:
                logger.info("waiting %.1f s: the server asked this client to slow down", remaining)
                self.retry.sleep(remaining)

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connection pool."""
        self.session.close()

    # -- URLs -----------------------------------------------------------------------------

    def url(self, url_or_path: str) -> str:
        """An absolute URL: absolute input as is, otherwise relative to the base URL."""
        if urlsplit(url_or_path).scheme:
            return url_or_path
        return f"{self.base_url}/{url_or_path.lstrip('/')}"

    def is_same_origin(self, url: str) -> bool:
        """Whether ``url`` is on the FHIR server's origin (same scheme, host and port)."""
        return _origin(self.url(url)) == _origin(self.base_url)

    def _require_same_origin(self, url: str, what: str) -> None:
        if not self.is_same_origin(url):
            host = urlsplit(url).hostname or "?"
            raise FatalServerError(
                f"refusing to send {what} to {host}: not the FHIR server's origin "
                f"({urlsplit(self.base_url).hostname})",
                url=redact_url(url),
            )

    # -- core ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url_or_path: str,
        *,
        params: Params | None = None,
        json: Any = None,
        data: bytes | str | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        authenticate: bool = True,
        check: bool = True,
        case_id: str | None = None,
    ) -> Response:
        """Send one request (with retries) and return the answer.

        ``idempotent`` defaults to True for GET/HEAD/OPTIONS/PUT/DELETE and False otherwise; only
        idempotent requests are retried after a temporary status or a connection failure once
        the request may have reached the server (a failure to connect at all is retried for any
        method). Pass ``idempotent=True`` for a POST that is safe to repeat, e.g. a transaction
        of PUTs with stable ids or a conditional create. ``authenticate=False`` sends no
        credentials (and allows another origin). With ``check`` (default) an error status raises
        via ``raise_for_response``; with ``check=False`` the final answer is returned whatever
        its status. ``case_id`` is attached to raised errors.
        """
        raw = self._send(
            method,
            url_or_path,
            params=params,
            json=json,
            data=data,
            headers=headers,
            idempotent=idempotent,
            authenticate=authenticate,
            check=check,
            case_id=case_id,
            stream=False,
        )
        return Response(status=raw.status_code, headers=raw.headers, body=raw.content, url=raw.url)

    def iter_lines(
        self,
        url_or_path: str,
        *,
        authenticate: bool = True,
        headers: Mapping[str, str] | None = None,
        chunk_size: int = 64 * 1024,
    ) -> Iterator[bytes]:
        """Stream a GET response as non-empty lines (bytes, line ending removed); constant memory.

        A connection broken mid-stream is resumed by requesting the URL again and skipping the
        lines already yielded (meant for static files such as bulk-export ndjson), within the
        same RetryPolicy bounds as ``request``.
        """
        yielded = 0
        failures = 0
        slept = 0.0
        while True:
            raw = self._send(
                "GET",
                url_or_path,
                params=None,
                json=None,
                data=None,
                headers=headers,
                idempotent=True,
                authenticate=authenticate,
                check=True,
                case_id=None,
                stream=True,
            )
            skip = yielded
            try:
                with raw:
                    pieces = iter_bounded(raw, limit=self.max_response_bytes, target=redact_url(raw.url))
                    for line in _split_lines(pieces, self.max_response_bytes):
                        if skip:
                            skip -= 1
                            continue
                        yield line
                        yielded += 1
                return
            except _TRANSIENT_EXCEPTIONS as exc:
                failures += 1
                target = redact_url(self.url(url_or_path))
                delay = self.retry.next_delay(failures, slept, None)
                if delay is None:
                    raise TemporaryServerError(
                        f"{type(exc).__name__} while downloading {target} (after {failures} breaks)",
                        url=target,
                    ) from exc
                logger.warning(
                    "download of %s broke after %d lines (%s); resuming in %.1f s",
                    target, yielded, type(exc).__name__, delay,
                )
                self.retry.sleep(delay)
                slept += delay

    def _send(
        self,
        method: str,
        url_or_path: str,
        *,
        params: Params | None,
        json: Any,
        data: bytes | str | Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        idempotent: bool | None,
        authenticate: bool,
        check: bool,
        case_id: str | None,
        stream: bool,
    ) -> requests.Response:
        """The retry loop around ``_attempt``: retries, one re-auth on 401, final status check."""
        method = method.upper()
        url = self.url(url_or_path)
        if authenticate:
            self._require_same_origin(url, "a request with credentials")
        retryable = idempotent if idempotent is not None else method in IDEMPOTENT_METHODS
        sending = _Sending(method, url, _log_target(url, params), params, case_id, stream)
        sending.body = orjson.dumps(json) if json is not None else data
        sending.headers = dict(headers or {})
        if sending.body is not None and not any(k.lower() == "content-type" for k in sending.headers):
            sending.headers["Content-Type"] = FHIR_JSON
        auth = self.auth if authenticate else None

        attempt, slept, reauthenticated = 0, 0.0, False
        while True:
            attempt += 1
            self._await_pause()
            outcome = self._attempt(sending, auth)
            if isinstance(outcome, _Failure):
                if outcome.sent and not retryable:
                    raise outcome.error from outcome.cause
                unreachable = None if self.answered else _unreachable(outcome.cause)
                if unreachable:
                    raise FatalServerError(f"cannot connect to {redact_url(self.base_url)} ({unreachable})",
                                           case_id=case_id) from outcome.cause
                delay = self.retry.next_delay(attempt, slept, None)
                if delay is None:
                    raise outcome.error from outcome.cause
                why = type(outcome.cause).__name__
            else:
                resp = outcome
                if resp.status_code == 401 and not reauthenticated and isinstance(auth, Refreshable):
                    # One re-authentication per request, not counted as a retry. Re-sending is
                    # safe for any method: the server refused the request without processing it.
                    reauthenticated, attempt = True, attempt - 1
                    resp.close()
                    logger.info("%s %s -> 401; refreshing credentials once", method, sending.target)
                    auth.refresh()
                    continue
                if not check or resp.status_code < 400:
                    return resp
                delay = self._status_delay(resp, attempt, slept) if retryable else None
                if delay is None:
                    raise_for_response(resp.status_code, resp.headers, resp.content, resp.url, case_id)
                    return resp  # pragma: no cover - raise_for_response raised for status >= 400
                resp.close()
                why = f"HTTP {resp.status_code}"
                self._set_pause(delay)
            logger.warning(
                "%s %s: %s; retry %d/%d in %.1f s",
                method, sending.target, why, attempt, self.retry.max_attempts - 1, delay,
            )
            self.retry.sleep(delay)
            slept += delay

    def _status_delay(self, resp: requests.Response, attempt: int, slept: float) -> float | None:
        """Seconds to wait before retrying a temporary status, or None (not temporary / budget spent)."""
        if resp.status_code not in TEMPORARY_STATUSES:
            return None
        wait = parse_retry_after(resp.headers.get("Retry-After"), self.retry.wall_clock())
        return self.retry.next_delay(attempt, slept, wait)

    def _attempt(self, sending: _Sending, auth: requests.auth.AuthBase | None) -> requests.Response | _Failure:
        """Send once; a connection-level failure comes back as a _Failure, other problems raise."""
        self.request_count += 1
        started = time.monotonic()
        method, target, case_id = sending.method, sending.target, sending.case_id
        deadline = started + self.timeout if self.timeout else None
        try:
            resp = self.session.request(
                method,
                sending.url,
                params=sending.params,
                data=sending.body,
                headers=sending.headers,
                auth=auth,
                timeout=self.timeout,
                # Passed per request: a session-level verify=False would be overridden by
                # REQUESTS_CA_BUNDLE, and an explicit choice must win.
                verify=self.verify,
                stream=True,  # bodies are read by read_bounded (cap, bounded decompression, deadline)
                allow_redirects=False,  # redirects follow _follow_redirect's policy, not requests'
            )
            resp = self._follow_redirects(resp, sending, auth)
            if not sending.stream:
                body = read_bounded(resp, limit=self.max_response_bytes, deadline=deadline, target=target,
                                    timeout=self.timeout)
                resp._content = body  # requests' own cache: .content / .json() read it from here
                setattr(resp, "_content_consumed", True)  # noqa: B010 - not in the type stubs
        except TemporaryServerError as exc:
            # Raised by the auth object (token endpoint unreachable or busy): nothing reached
            # the FHIR server yet, so any method may be retried.
            return _Failure(exc, exc.__cause__ or exc, sent=False)
        except requests.exceptions.SSLError as exc:
            raise FatalServerError(
                f"TLS error talking to {urlsplit(sending.url).hostname} (check the CA bundle / verify setting)",
                url=target,
                case_id=case_id,
            ) from exc
        except _TRANSIENT_EXCEPTIONS as exc:
            logger.debug("%s %s failed after %.3f s: %s", method, target, time.monotonic() - started, type(exc).__name__)
            error = TemporaryServerError(f"{type(exc).__name__} during {method} {target}", url=target, case_id=case_id)
            return _Failure(error, exc, sent=not _was_not_sent(exc))
        except requests.exceptions.RequestException as exc:
            raise FatalServerError(f"{type(exc).__name__} during {method} {target}", url=target, case_id=case_id) from exc
        logger.debug("%s %s -> %d in %.3f s", method, target, resp.status_code, time.monotonic() - started)
        self.answered = True
        return resp

    def _follow_redirects(self, resp: requests.Response, sending: _Sending,
                          auth: requests.auth.AuthBase | None) -> requests.Response:
        """Follow redirects by one policy: same origin freely (up to MAX_REDIRECTS); another origin
        only for a plain GET that carries no credentials, no body and no query (e.g. a bulk file
        on a storage host). A body, credentials or search parameters never leave the origin: such
        a redirect is an error, never an empty answer."""
        hops = 0
        method, body, url = sending.method, sending.body, sending.url
        carries_query = bool(sending.params) or bool(urlsplit(url).query)
        while resp.status_code in _REDIRECT_STATUSES and resp.headers.get("Location"):
            hops += 1
            target = urljoin(resp.url, resp.headers["Location"])
            resp.close()
            if hops > MAX_REDIRECTS:
                raise FatalServerError(f"more than {MAX_REDIRECTS} redirects from {sending.target}", url=sending.target)
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
            if not self.is_same_origin(target):
                carried = [what for what, present in (
                    ("credentials", auth is not None), ("a request body", body is not None),
                    ("search parameters", carries_query), (f"a {method}", method not in ("GET", "HEAD")),
                ) if present]
                if carried:
                    raise FatalServerError(
                        f"{sending.method} {sending.target} was redirected (HTTP {resp.status_code}) to another "
                        f"origin ({urlsplit(target).hostname}); not followed: it would carry {', '.join(carried)}",
                        status=resp.status_code, url=sending.target, case_id=sending.case_id)
            headers = dict(sending.headers)
            if body is None:
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            self.request_count += 1
            logger.debug("%s %s -> %d, following to %s", method, sending.target, resp.status_code, redact_url(target))
            resp = self.session.request(
                method, target, data=body, headers=headers,
                auth=auth if self.is_same_origin(target) else None,
                timeout=self.timeout, verify=self.verify, stream=True, allow_redirects=False,
            )
        return resp

    # -- FHIR helpers --------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET metadata``), fetched once and cached."""
        if self._capabilities is None:
            doc = self.request("GET", "metadata").json()
            if not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement":
                raise CapabilityError(
                    "GET metadata did not return a CapabilityStatement (is this a FHIR R4+ server?)",
                    url=redact_url(self.url("metadata")),
                )
            problem = capability_shape_problem(doc)
            if problem:
                raise CapabilityError(
                    f"the server's CapabilityStatement is malformed ({problem}); it cannot be trusted to say "
                    "what the server supports", url=redact_url(self.url("metadata")))
            self._capabilities = doc
        return self._capabilities

    def fhir_version(self) -> str:
        """The FHIR version the server declares, e.g. ``"4.0.1"``."""
        version = self.capabilities().get("fhirVersion")
        if not isinstance(version, str) or not version:
            raise CapabilityError("the server's CapabilityStatement has no fhirVersion", url=redact_url(self.url("metadata")))
        return version

    def _resource_path(self, resource_type: str, resource_id: str | None = None) -> str:
        path = quote(resource_type, safe="")
        if resource_id is not None:
            path += "/" + quote(resource_id, safe="")
        return path

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/Type/id``; FatalServerError (404/410) when absent."""
        resp = self.request("GET", self._resource_path(resource_type, resource_id))
        return resp.json_or_empty()

    def search_bundles(self, resource_type: str, params: Params | None = None, *,
                       max_pages: int | None = None) -> Iterator[dict[str, Any]]:
        """Every searchset Bundle page of ``GET [base]/Type?params``, following ``next`` links.

        ``next`` links are opaque: followed exactly as given (HAPI's ``<base>?_getpages=...``
        included), never rebuilt. They must be on the server's origin (they would otherwise
        receive our credentials and search parameters): another host raises FatalServerError.
        A next link that repeats a page already read ends with FatalServerError too (a paging
        loop), and so does a search that goes on beyond ``max_pages`` pages (default
        DEFAULT_MAX_PAGES).
        """
        yield from self._pages(resource_type, self.url(self._resource_path(resource_type)), params,
                               max_pages or DEFAULT_MAX_PAGES, set())

    def next_pages(self, resource_type: str, page: Mapping[str, Any], *,
                   max_pages: int | None = None) -> Iterator[dict[str, Any]]:
        """The pages after a searchset Bundle obtained elsewhere (a batch entry's answer),
        following its ``next`` links under the rules of :meth:`search_bundles`; ``max_pages``
        counts that first page."""
        link = _next_link(page)
        if link is None:
            return
        next_url = urljoin(self.base_url + "/", link)
        self._require_same_origin(next_url, "the next search page request")
        yield from self._pages(resource_type, next_url, None, (max_pages or DEFAULT_MAX_PAGES) - 1, {next_url})

    def _pages(self, resource_type: str, url: str, page_params: Params | None, limit: int,
               seen: set[str]) -> Iterator[dict[str, Any]]:
        pages = 0
        while True:
            if pages >= limit:
                raise FatalServerError(
                    f"search {resource_type} stopped after {limit} pages (the page limit): the server keeps "
                    f"sending next links; if the result is really that large, raise --max-pages or --page-size",
                    url=redact_url(url),
                )
            pages += 1
            resp = self.request("GET", url, params=page_params)
            bundle = resp.json()
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise FatalServerError("search did not return a Bundle", status=resp.status, url=redact_url(resp.url))
            yield bundle
            link = _next_link(bundle)
            if link is None:
                return
            next_url = urljoin(resp.url, link)
            if not self.is_same_origin(next_url):
                self._require_same_origin(next_url, "the next search page request")
            if next_url in seen or next_url == resp.url:
                raise FatalServerError("search paging loops (next link repeats a page)", url=redact_url(next_url))
            seen.add(next_url)
            url, page_params = next_url, None

    def search(self, resource_type: str, params: Params | None = None, *,
                max_pages: int | None = None) -> Iterator[dict[str, Any]]:
        """Every resource across all pages of a search (``_include``d ones too), each once.

        Pages may overlap (live paging while the set changes, an ``_include``d resource on
        several pages): a ``Type/id`` already yielded by this search is skipped, remembered as a
        64-bit digest (8 bytes a resource, not the resource). Entries with ``search.mode =
        outcome`` (server warnings) are logged, not yielded.
        """
        yielded: set[int] = set()
        repeats = 0
        for bundle in self.search_bundles(resource_type, params, max_pages=max_pages):
            for entry in bundle.get("entry") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                    continue
                resource: dict[str, Any] = entry["resource"]
                mode = (entry.get("search") or {}).get("mode")
                if mode == "outcome":
                    for line in summarize_outcome(resource):
                        logger.warning("search %s: server says %s", resource_type, line)
                    continue
                if isinstance(resource.get("id"), str):
                    key = _key_digest(f"{resource.get('resourceType')}/{resource['id']}")
                    if key in yielded:
                        repeats += 1
                        continue
                    yielded.add(key)
                yield resource
        if repeats:
            logger.info("search %s: %d resource(s) repeated across pages, each kept once", resource_type, repeats)

    def post_bundle(self, bundle: Mapping[str, Any], *, idempotent: bool, case_id: str | None = None) -> dict[str, Any]:
        """POST a batch/transaction Bundle to the base URL; returns the response Bundle.

        ``idempotent=True`` only when re-sending cannot create duplicates (all entries are PUTs
        with stable ids or conditional creates); only then are temporary failures retried.
        """
        resp = self.request("POST", self.base_url, json=bundle, idempotent=idempotent, case_id=case_id)
        return resp.json_or_empty()

    def put(self, resource_type: str, resource_id: str, resource: Mapping[str, Any], *, case_id: str | None = None) -> dict[str, Any]:
        """``PUT [base]/Type/id`` (update or create with a client id); the returned resource, or {}."""
        resp = self.request("PUT", self._resource_path(resource_type, resource_id), json=resource, case_id=case_id)
        return resp.json_or_empty()

    def create(
        self,
        resource_type: str,
        resource: Mapping[str, Any],
        if_none_exist: str | None = None,
        *,
        case_id: str | None = None,
    ) -> dict[str, Any]:
        """``POST [base]/Type``; with ``if_none_exist`` (e.g. ``"identifier=sys|val"``) a conditional
        create, which is idempotent and therefore retried. Returns the resource, or {}."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        resp = self.request(
            "POST",
            self._resource_path(resource_type),
            json=resource,
            headers=headers,
            idempotent=bool(if_none_exist),
            case_id=case_id,
        )
        return resp.json_or_empty()


def _key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def capability_shape_problem(doc: Mapping[str, Any]) -> str | None:
    """What is wrong with the shape of the CapabilityStatement parts we read, or None.

    Checked once where the statement is fetched, so every reader can trust `rest`,
    `resource`, `interaction`, `searchParam` and `operation` to be lists of objects.
    """

    def objects(node: Mapping[str, Any], key: str, where: str) -> tuple[list[Mapping[str, Any]], str | None]:
        value = node.get(key, [])
        if not isinstance(value, list):
            return [], f"{where}{key} is a {type(value).__name__}, not a list"
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                return [], f"{where}{key}[{i}] is a {type(item).__name__}, not an object"
        return value, None

    if "fhirVersion" in doc and not isinstance(doc["fhirVersion"], str):
        return "fhirVersion is not a string"
    rests, problem = objects(doc, "rest", "")
    if problem:
        return problem
    for r, rest in enumerate(rests):
        for key in ("interaction", "operation"):
            problem = objects(rest, key, f"rest[{r}].")[1]
            if problem:
                return problem
        resources, problem = objects(rest, "resource", f"rest[{r}].")
        if problem:
            return problem
        for i, res in enumerate(resources):
            if "type" in res and not isinstance(res["type"], str):
                return f"rest[{r}].resource[{i}].type is not a string"
            for key in ("interaction", "searchParam", "operation"):
                problem = objects(res, key, f"rest[{r}].resource[{i}].")[1]
                if problem:
                    return problem
    return None


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None
