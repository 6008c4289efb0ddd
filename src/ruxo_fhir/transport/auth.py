"""Credentials as requests auth objects: bearer token, HTTP basic, SMART Backend Services (JWT)."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import requests
import requests.auth
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ruxo_fhir.errors import AuthError, CapabilityError, ConfigError, RuxoError, TemporaryServerError, UsageError
from ruxo_fhir.redact import remember, remember_basic
from ruxo_fhir.transport.outcome import TEMPORARY_STATUSES, raise_for_response, redact_url

logger = logging.getLogger("ruxo_fhir.transport")

DEFAULT_SMART_SCOPE = "system/*.read system/*.write"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AUTH_KINDS = ("none", "bearer", "basic", "smart")
# SMART Backend Services: the assertion "SHALL" expire no more than five minutes after issue.
MAX_ASSERTION_SECONDS = 300
DEFAULT_TOKEN_SECONDS = 300  # when a token response omits expires_in

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` with a fixed token (no refresh: a 401 is final)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("bearer token is empty")
        remember(token)
        check_token_text(token)
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


def check_token_text(token: str, what: str = "the bearer token (RUXO_FHIR_TOKEN or the profile's token_env)",
                     error: type[RuxoError] = UsageError) -> None:
    """A token goes into an HTTP header: visible ASCII only (RFC 6750), else a usage error.

    The message names the problem, never the token (a newline would otherwise make the HTTP
    library fail with the header, token included, in its error text).
    """
    for ch in token:
        if ch in "\r\n":
            raise error(f"{what} contains a line break; set it to the token alone")
        if not ("\x21" <= ch <= "\x7e"):
            kind = "a non-ASCII character" if ord(ch) > 0x7E else "a space or control character"
            raise error(f"{what} contains {kind}; a token is visible ASCII only (check how it was copied)")


class BasicAuth(requests.auth.AuthBase):
    """HTTP Basic authentication; user and password are encoded as UTF-8 (RFC 7617)."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        remember_basic(user, password)
        self._header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, password=***)"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def public_jwk(key: PublicKey | PrivateKey) -> dict[str, str]:
    """The required JWK members of a key's public half (RFC 7517/7518), no private parts."""
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"e": _b64url(_int_bytes(numbers.e)), "kty": "RSA", "n": _b64url(_int_bytes(numbers.n))}
    if isinstance(public, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(public.curve.name)
        if crv is None:
            raise ConfigError(f"unsupported elliptic curve {public.curve.name}")
        size = (public.curve.key_size + 7) // 8  # coordinates are padded to the field size
        point = public.public_numbers()
        return {"crv": crv, "kty": "EC", "x": _b64url(_int_bytes(point.x, size)), "y": _b64url(_int_bytes(point.y, size))}
    raise ConfigError("only RSA and EC keys are supported")


def jwk_thumbprint(key: PublicKey | PrivateKey) -> str:
    """RFC 7638 JWK thumbprint: SHA-256 of the canonical JSON of the required members, base64url."""
    canonical = json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _load_private_key(pem: bytes, password: bytes | None) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The library's message never quotes key material, but keep ours generic anyway.
        raise ConfigError(f"cannot load the SMART private key ({type(exc).__name__}: is it an unencrypted PEM key?)") from exc
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError("the SMART private key must be RSA or EC (P-384)")
    return key


def _choose_alg(key: PrivateKey, alg: str | None) -> str:
    if alg is not None:
        family_ok = (alg[:2] in ("RS", "PS") and isinstance(key, rsa.RSAPrivateKey)) or (
            alg[:2] == "ES" and isinstance(key, ec.EllipticCurvePrivateKey)
        )
        if not family_ok:
            raise ConfigError(f"algorithm {alg} does not fit a {type(key).__name__.replace('PrivateKey', '')} key")
        return alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    if key.curve.name == "secp384r1":
        return "ES384"
    # SMART Backend Services servers must support RS384 and ES384 only; anything else is opt-in.
    raise ConfigError(f"SMART backend services expect RS384 or ES384; a {key.curve.name} key needs an explicit alg")


class SmartBackendAuth(requests.auth.AuthBase):
    """SMART Backend Services (client_credentials + private_key_jwt) as a requests auth object.

    Discovers the token endpoint from ``<base>/.well-known/smart-configuration`` (unless
    ``token_endpoint`` is given), signs a short-lived client assertion, caches the access token
    and fetches a new one when less than max(1 s, 10 %) of its lifetime is left. ``refresh()``
    forces a new token (FhirClient calls it once after a 401). Token-endpoint failures raise
    AuthError (the OAuth ``error``/``error_description``, never the assertion) or, for
    429/5xx/connection problems, TemporaryServerError.
    """

    def __init__(
        self,
        fhir_base_url: str,
        client_id: str,
        private_key_pem: bytes,
        key_id: str | None = None,
        *,
        scope: str = DEFAULT_SMART_SCOPE,
        alg: str | None = None,
        token_endpoint: str | None = None,
        key_password: bytes | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
        verify: bool | str = True,
        timeout: float = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client_id:
            raise ConfigError("SMART client_id is empty")
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.client_id = client_id
        self._key = _load_private_key(private_key_pem, key_password)
        self.alg = _choose_alg(self._key, alg)
        self.key_id = key_id or jwk_thumbprint(self._key)
        self.scope = scope
        self.verify = verify
        self.timeout = timeout
        self.token_requests = 0
        if token_endpoint is not None:
            check_token_endpoint(token_endpoint, self.fhir_base_url)
        self._token_endpoint = token_endpoint
        self._session_factory = session_factory
        self._session: requests.Session | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._lifetime = 0.0

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(client_id={self.client_id!r}, fhir_base_url={self.fhir_base_url!r}, "
            f"alg={self.alg!r}, kid={self.key_id!r}, scope={self.scope!r})"
        )

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.access_token()}"
        return r

    # -- public -----------------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        """The session used for discovery and token requests (made on first use)."""
        if self._session is None:
            self._session = self._session_factory()
        return self._session

    def close(self) -> None:
        """Close the discovery/token session."""
        if self._session is not None:
            self._session.close()

    @property
    def token_endpoint(self) -> str:
        """The OAuth token endpoint, discovered from the SMART configuration on first use."""
        with self._lock:
            if self._token_endpoint is None:
                self._token_endpoint = self._discover()
                check_token_endpoint(self._token_endpoint, self.fhir_base_url)
            return self._token_endpoint

    def access_token(self) -> str:
        """A valid access token: the cached one unless it is (nearly) expired."""
        with self._lock:
            if self._token is None or self._needs_new_token():
                self._fetch_token()
            assert self._token is not None
            return self._token

    def expires_in(self) -> float | None:
        """Seconds until the cached token expires; None before the first token."""
        with self._lock:
            return self._expires_at - self._clock() if self._expires_at else None

    def refresh(self) -> None:
        """Forget the cached token and fetch a new one now."""
        with self._lock:
            self._token = None
            self._fetch_token()

    def make_assertion(self, audience: str | None = None) -> str:
        """A signed client-assertion JWT for the token endpoint (``audience``, default discovered).

        Header: alg, typ JWT, kid. Claims: iss = sub = client_id, aud, iat, exp (<= 300 s later),
        and a fresh random jti, so two assertions never share one.
        """
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience or self.token_endpoint,
            "iat": now,
            "exp": now + MAX_ASSERTION_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        assertion = jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.key_id, "typ": "JWT"})
        remember(assertion)
        return assertion

    # -- internals ------------------------------------------------------------------------

    def _needs_new_token(self) -> bool:
        left = self._expires_at - self._clock()
        return left < max(1.0, 0.1 * self._lifetime)

    def _discover(self) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        resp = self._post_or_get("GET", url, headers={"Accept": "application/json"})
        if resp.status_code == 404:
            raise CapabilityError(
                "the server publishes no .well-known/smart-configuration; give the token endpoint explicitly",
                status=404,
                url=redact_url(url),
            )
        raise_for_response(resp.status_code, resp.headers, resp.content, url)
        try:
            config = resp.json()
        except ValueError:
            config = None
        endpoint = config.get("token_endpoint") if isinstance(config, dict) else None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise CapabilityError("the SMART configuration names no token_endpoint", url=redact_url(url))
        methods = config.get("token_endpoint_auth_methods_supported") if isinstance(config, dict) else None
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            logger.warning("SMART configuration does not list private_key_jwt; trying anyway")
        return endpoint

    def _post_or_get(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, verify=self.verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise AuthError(f"TLS error talking to {redact_url(url)} (check the CA bundle / verify setting)") from exc
        except requests.exceptions.RequestException as exc:
            raise TemporaryServerError(
                f"{type(exc).__name__} talking to the authorization server", url=redact_url(url)
            ) from exc

    def _fetch_token(self) -> None:
        endpoint = self.token_endpoint
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.make_assertion(endpoint),
        }
        self.token_requests += 1
        resp = self._post_or_get("POST", endpoint, data=form, headers={"Accept": "application/json"},
                                 allow_redirects=False)
        status = resp.status_code
        if 300 <= status < 400:
            raise AuthError(f"token endpoint answered a redirect (HTTP {status}); not followed: the client "
                            "assertion goes only to the token endpoint the server names", status=status,
                            url=redact_url(endpoint))
        if status in TEMPORARY_STATUSES:
            raise TemporaryServerError(f"token endpoint busy (HTTP {status})", status=status, url=redact_url(endpoint))
        body = _json_object(resp)
        if status >= 400 or not isinstance(body.get("access_token"), str):
            error = _short(body.get("error")) or "no access_token in the answer"
            description = _short(body.get("error_description"))
            reason = f"token endpoint refused the client credentials: {error}"
            if description:
                reason += f" ({description})"
            raise AuthError(reason, status=status, url=redact_url(endpoint))
        token_type = body.get("token_type")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            logger.warning("token endpoint issued a %r token; sending it as Bearer", token_type)
        lifetime = body.get("expires_in")
        seconds = float(lifetime) if isinstance(lifetime, (int, float)) and lifetime > 0 else DEFAULT_TOKEN_SECONDS
        token = str(body["access_token"])
        remember(token)
        check_token_text(token, "the access token the token endpoint issued", AuthError)
        self._token = token
        self._lifetime = seconds
        self._expires_at = self._clock() + seconds
        logger.debug("SMART token obtained, lifetime %.0f s, scope %s", seconds, _short(body.get("scope")))


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def check_token_endpoint(endpoint: str, fhir_base_url: str) -> None:
    """The client assertion may only travel over TLS, or to the FHIR server's own origin.

    An https server naming an http:// token endpoint elsewhere (or any plain-http endpoint on
    another origin) is refused: the signed assertion would cross the network in the clear.
    """
    if _origin(endpoint)[0] == "https" or _origin(endpoint) == _origin(fhir_base_url):
        return
    raise AuthError(
        f"the SMART token endpoint {redact_url(endpoint)} is not https and not on the FHIR server's origin; "
        "refusing to send the client assertion there (ask the server's operator for an https token endpoint)"
    )


def _json_object(resp: requests.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _short(value: object, limit: int = 300) -> str:
    if not isinstance(value, str):
        return ""
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def default_auth_kind(env: Mapping[str, str]) -> str:
    """``"bearer"`` when RUXO_FHIR_TOKEN is set (non-empty) in ``env``, else ``"none"``."""
    return "bearer" if env.get("RUXO_FHIR_TOKEN") else "none"


def auth_from_options(
    kind: str,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    client_id: str | None = None,
    private_key_path: str | Path | None = None,
    key_id: str | None = None,
    scope: str | None = None,
    fhir_base_url: str | None = None,
    verify: bool | str = True,
) -> requests.auth.AuthBase | None:
    """The auth object for ``kind`` (none|bearer|basic|smart), or ConfigError naming what is missing.

    Environment variables (RUXO_FHIR_TOKEN, RUXO_FHIR_PASSWORD) are read by the caller.
    """
    kind = kind.strip().lower()
    if kind == "none":
        return None
    if kind == "bearer":
        if not token:
            raise ConfigError("auth 'bearer' needs a token (set RUXO_FHIR_TOKEN)")
        return BearerAuth(token)
    if kind == "basic":
        missing = [name for name, value in (("user", user), ("password", password)) if not value]
        if missing:
            raise ConfigError(f"auth 'basic' needs {' and '.join(missing)} (password via RUXO_FHIR_PASSWORD)")
        assert user is not None and password is not None
        return BasicAuth(user, password)
    if kind == "smart":
        needed = (("client id", client_id), ("private key file", private_key_path), ("FHIR base URL", fhir_base_url))
        missing = [name for name, value in needed if not value]
        if missing:
            raise ConfigError(f"auth 'smart' needs {', '.join(missing)}")
        assert client_id and private_key_path and fhir_base_url
        try:
            pem = Path(private_key_path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read private key file {private_key_path}: {exc.strerror or type(exc).__name__}") from exc
        return SmartBackendAuth(
            fhir_base_url,
            client_id,
            pem,
            key_id,
            scope=scope or DEFAULT_SMART_SCOPE,
            verify=verify,
        )
    raise ConfigError(f"unknown auth kind {kind!r}; choose one of {', '.join(AUTH_KINDS)}")
