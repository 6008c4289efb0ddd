"""Auth objects: bearer, basic, SMART Backend Services assertions, token caching, options."""
from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ruxo_fhir.errors import AuthError, CapabilityError, ConfigError, RuxoError, TemporaryServerError
from ruxo_fhir.transport import (
    BasicAuth,
    BearerAuth,
    FhirClient,
    RetryPolicy,
    SmartBackendAuth,
    auth_from_options,
    default_auth_kind,
    jwk_thumbprint,
)
from ruxo_fhir.transport.auth import CLIENT_ASSERTION_TYPE, public_jwk

BASE = "https://fhir.example.org/r4"
TOKEN_URL = "https://auth.example.org/oauth2/token"
SMART_CONFIG = f"{BASE}/.well-known/smart-configuration"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class TokenServer:
    """A fake SMART token endpoint that records the assertions it receives."""

    def __init__(self, rsps: responses.RequestsMock, expires_in: int = 300) -> None:
        self.forms: list[dict[str, str]] = []
        self.expires_in = expires_in
        rsps.get(SMART_CONFIG, json={"token_endpoint": TOKEN_URL, "token_endpoint_auth_methods_supported": ["private_key_jwt"]})
        rsps.add_callback(responses.POST, TOKEN_URL, callback=self.answer)

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = request.body if isinstance(request.body, str) else (request.body or b"").decode()
        form = {k: v[0] for k, v in parse_qs(body).items()}
        self.forms.append(form)
        token = {"access_token": f"token-{len(self.forms)}", "token_type": "bearer", "expires_in": self.expires_in}
        return 200, {"Content-Type": "application/json"}, json.dumps(token)


def b64url_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


# -- bearer and basic ---------------------------------------------------------------------------


def test_bearer_and_basic_set_headers_and_hide_secrets() -> None:
    request = requests.Request("GET", BASE).prepare()
    BearerAuth("tok-123")(request)
    assert request.headers["Authorization"] == "Bearer tok-123"
    BasicAuth("alice", "pässword")(request)
    assert request.headers["Authorization"] == "Basic " + base64.b64encode("alice:pässword".encode()).decode()
    assert "tok-123" not in repr(BearerAuth("tok-123"))
    assert "pässword" not in repr(BasicAuth("alice", "pässword")) and "alice" in repr(BasicAuth("alice", "x"))


# -- RFC 7638 thumbprints -----------------------------------------------------------------------


def test_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 section 3.1: this RSA key has thumbprint NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    key = rsa.RSAPublicNumbers(b64url_int("AQAB"), b64url_int(n)).public_key()
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def independent_thumbprint(jwk: dict[str, Any]) -> str:
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def test_thumbprints_agree_with_pyjwt_jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    assert jwk_thumbprint(rsa_key) == independent_thumbprint(rsa_jwk)
    assert jwk_thumbprint(ec_key) == independent_thumbprint(ec_jwk)
    assert "d" not in public_jwk(rsa_key) and "d" not in public_jwk(ec_key)


# -- SMART backend services ---------------------------------------------------------------------


def decode(assertion: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, alg: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(assertion, key.public_key(), algorithms=[alg], audience=TOKEN_URL)
    return claims


def test_smart_rsa_assertion_is_what_the_spec_asks(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    server = TokenServer(rsps)
    auth = SmartBackendAuth(BASE, "client-42", pem(rsa_key), scope="system/Patient.rs")
    assert auth.access_token() == "token-1"
    auth.refresh()
    assert auth.access_token() == "token-2"

    first, second = server.forms
    assert first["grant_type"] == "client_credentials"
    assert first["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert first["scope"] == "system/Patient.rs"
    header = jwt.get_unverified_header(first["client_assertion"])
    assert header == {"alg": "RS384", "typ": "JWT", "kid": jwk_thumbprint(rsa_key)}
    claims = decode(first["client_assertion"], rsa_key, "RS384")
    assert claims["iss"] == claims["sub"] == "client-42"
    assert claims["aud"] == TOKEN_URL
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["exp"] - time.time() <= 300
    assert decode(second["client_assertion"], rsa_key, "RS384")["jti"] != claims["jti"]


def test_smart_ec_p384_uses_es384_and_given_kid(rsps: responses.RequestsMock, ec_key: ec.EllipticCurvePrivateKey) -> None:
    server = TokenServer(rsps)
    auth = SmartBackendAuth(BASE, "client-ec", pem(ec_key), key_id="my-key-1")
    auth.access_token()
    assertion = server.forms[0]["client_assertion"]
    assert jwt.get_unverified_header(assertion) == {"alg": "ES384", "typ": "JWT", "kid": "my-key-1"}
    assert decode(assertion, ec_key, "ES384")["sub"] == "client-ec"


def test_smart_token_reused_then_refreshed_near_expiry(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    server = TokenServer(rsps, expires_in=100)
    now = [1_000_000.0]
    auth = SmartBackendAuth(BASE, "c", pem(rsa_key), clock=lambda: now[0])
    assert auth.access_token() == "token-1"
    now[0] += 85  # 15 s left of 100: still more than 10 %
    assert auth.access_token() == "token-1"
    now[0] += 6  # 9 s left: less than 10 % → new token
    assert auth.access_token() == "token-2"
    assert len(server.forms) == 2


def test_smart_short_lived_tokens_refresh_with_one_second_margin(
    rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = TokenServer(rsps, expires_in=3)
    now = [5_000.0]
    auth = SmartBackendAuth(BASE, "c", pem(rsa_key), clock=lambda: now[0])
    auth.access_token()
    now[0] += 1.5
    auth.access_token()
    assert len(server.forms) == 1
    now[0] += 0.7  # 0.8 s left: under the 1 s floor
    assert auth.access_token() == "token-2"


def test_smart_token_endpoint_error_is_auth_error_without_assertion(
    rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey
) -> None:
    rsps.get(SMART_CONFIG, json={"token_endpoint": TOKEN_URL})
    rsps.post(TOKEN_URL, status=400, json={"error": "invalid_client", "error_description": "unknown kid"})
    auth = SmartBackendAuth(BASE, "c", pem(rsa_key))
    with pytest.raises(AuthError) as info:
        auth.access_token()
    message = str(info.value)
    assert "invalid_client" in message and "unknown kid" in message
    body = rsps.calls[1].request.body
    sent = parse_qs(body if isinstance(body, str) else "")
    assert sent["client_assertion"][0] not in message


def test_smart_token_endpoint_busy_is_temporary(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    rsps.get(SMART_CONFIG, json={"token_endpoint": TOKEN_URL})
    rsps.post(TOKEN_URL, status=503)
    with pytest.raises(TemporaryServerError):
        SmartBackendAuth(BASE, "c", pem(rsa_key)).access_token()


def test_smart_without_configuration_is_capability_error(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    rsps.get(SMART_CONFIG, status=404)
    with pytest.raises(CapabilityError):
        SmartBackendAuth(BASE, "c", pem(rsa_key)).access_token()


def test_smart_explicit_token_endpoint_skips_discovery(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    rsps.post(TOKEN_URL, json={"access_token": "t", "expires_in": 60})
    auth = SmartBackendAuth(BASE, "c", pem(rsa_key), token_endpoint=TOKEN_URL)
    assert auth.access_token() == "t"
    assert len(rsps.calls) == 1


def test_smart_repr_reveals_no_secret(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    TokenServer(rsps)
    auth = SmartBackendAuth(BASE, "client-42", pem(rsa_key))
    token = auth.access_token()
    text = repr(auth)
    assert "client-42" in text
    assert token not in text and "PRIVATE" not in text and str(rsa_key.private_numbers().d) not in text


def test_smart_rejects_unsuitable_keys() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="RS384 or ES384"):
        SmartBackendAuth(BASE, "c", pem(p256))
    assert SmartBackendAuth(BASE, "c", pem(p256), alg="ES256").alg == "ES256"
    with pytest.raises(ConfigError, match="cannot load"):
        SmartBackendAuth(BASE, "c", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_client_refreshes_smart_token_once_after_401(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    server = TokenServer(rsps)

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.headers["Authorization"] == "Bearer token-2":
            return 200, {}, json.dumps({"resourceType": "Patient", "id": "1"})
        return 401, {}, ""

    rsps.add_callback(responses.GET, f"{BASE}/Patient/1", callback=answer)
    auth = SmartBackendAuth(BASE, "c", pem(rsa_key))
    client = FhirClient(BASE, auth=auth, retry=RetryPolicy(sleep=lambda s: None))
    assert client.read("Patient", "1")["id"] == "1"
    assert len(server.forms) == 2 and client.request_count == 2


def test_client_retries_when_token_endpoint_is_briefly_down(rsps: responses.RequestsMock, rsa_key: rsa.RSAPrivateKey) -> None:
    rsps.get(SMART_CONFIG, json={"token_endpoint": TOKEN_URL})
    rsps.post(TOKEN_URL, status=503)
    rsps.post(TOKEN_URL, json={"access_token": "t", "expires_in": 60})
    rsps.post(f"{BASE}/Patient", status=201, json={"resourceType": "Patient", "id": "p"})
    sleeps: list[float] = []
    client = FhirClient(BASE, auth=SmartBackendAuth(BASE, "c", pem(rsa_key)), retry=RetryPolicy(sleep=sleeps.append, jitter=0))
    # Not idempotent, but nothing reached the FHIR server, so the POST may be retried.
    assert client.create("Patient", {"resourceType": "Patient"})["id"] == "p"
    assert sleeps == [1]


# -- options ------------------------------------------------------------------------------------


def test_auth_from_options_builds_each_kind(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(rsa_key))
    assert auth_from_options("none") is None
    assert isinstance(auth_from_options("bearer", token="t"), BearerAuth)
    assert isinstance(auth_from_options("Basic", user="u", password="p"), BasicAuth)
    smart = auth_from_options("smart", client_id="c", private_key_path=key_file, fhir_base_url=BASE, key_id="k", scope="system/*.rs")
    assert isinstance(smart, SmartBackendAuth) and smart.key_id == "k" and smart.scope == "system/*.rs"


@pytest.mark.parametrize(
    "kind,options,fragment",
    [
        ("bearer", {}, "RUXO_FHIR_TOKEN"),
        ("basic", {"user": "u"}, "password"),
        ("smart", {"client_id": "c"}, "private key file, FHIR base URL"),
        ("smart", {"client_id": "c", "private_key_path": "/nonexistent/key.pem", "fhir_base_url": BASE}, "cannot read"),
        ("kerberos", {}, "none, bearer, basic, smart"),
    ],
)
def test_auth_from_options_explains_missing_pieces(kind: str, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RuxoError, match=fragment):
        auth_from_options(kind, **options)


def test_default_auth_kind() -> None:
    assert default_auth_kind({"RUXO_FHIR_TOKEN": "x"}) == "bearer"
    assert default_auth_kind({"RUXO_FHIR_TOKEN": ""}) == "none"
    assert default_auth_kind({}) == "none"
