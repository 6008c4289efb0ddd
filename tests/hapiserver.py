"""Build, start and drive HAPI FHIR JPA (R4, in-memory H2) for the end-to-end tests.

HAPI is the second real engine of the suite, beside Medplum's router (``tests/fhirserver.py``).
``tests/hapi_server`` holds a pom (HAPI FHIR pinned, from Maven Central) and our own small launcher
(embedded Jetty + HAPI's JPA Spring configuration). The first start builds it with Maven
(``mvn -q -B process-classes``: compile the launcher, copy the runtime jars to ``target/lib``);
a stamp file makes later starts skip Maven until the pom or the launcher changes. It then runs on
``java -cp target/classes:target/lib/*``.

By hand::

    python tests/hapiserver.py [--port N] [--no-client-ids] [--validate]

prints the FHIR base URL as its first stdout line and serves until Ctrl-C / SIGTERM.

In tests (``tests/conftest.py``), :class:`TestHapiServer` puts the fault front
(``tests/fault_front.py``) in front of HAPI, so a test drives it exactly like the Medplum server:
``configure()``/``reset()``/``stats()``/``counts()``, ``root_url``/``base_url``. The front never
changes a reply; engine switches (``page_size``, ``no_client_ids``, ``validate``) are HAPI's own
settings, set through the launcher's ``/$admin/config``.

Needs Java 17+ (``java``) and, for the build, Maven 3.8+ (``mvn``); ``RUXO_HAPI_JAVA`` /
``RUXO_HAPI_MVN`` override the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from fault_front import FaultFront

HAPI_DIR = Path(__file__).resolve().parent / "hapi_server"
TARGET = HAPI_DIR / "target"
STAMP = TARGET / ".ruxo-build-stamp"
MAIN_CLASS = "ruxo.hapi.HapiLauncher"
MIN_JAVA = 17
LOG_ENV = "RUXO_FHIR_SERVER_LOG"
INSTALL_HINT = "install Java 17+ and Maven 3.8+ (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless maven)"
JVM_OPTS = ["-Xmx1536m", "-XX:+UseParallelGC", "-Dfile.encoding=UTF-8"]


class HapiServerError(RuntimeError):
    """The HAPI test server could not be built, started or driven."""


class HapiUnavailable(HapiServerError):
    """Java or Maven is missing: the message names what to install."""


# --------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------


def java_command() -> str:
    return os.environ.get("RUXO_HAPI_JAVA") or shutil.which("java") or ""


def mvn_command() -> str:
    return os.environ.get("RUXO_HAPI_MVN") or shutil.which("mvn") or ""


def java_major(java: str) -> int:
    proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if not found:
        return 0
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def missing_tools() -> str | None:
    """None when HAPI can be built and run here, else one line naming what to install."""
    java = java_command()
    if not java:
        return f"HAPI FHIR tests need `java`: {INSTALL_HINT}"
    major = java_major(java)
    if major < MIN_JAVA:
        return f"HAPI FHIR tests need Java {MIN_JAVA}+ (found {major or 'unknown'} at {java}): {INSTALL_HINT}"
    if not _build_current() and not mvn_command():
        return f"HAPI FHIR tests need `mvn` for the first build: {INSTALL_HINT}"
    return None


# --------------------------------------------------------------------------------------------
# build, once per pom/launcher
# --------------------------------------------------------------------------------------------


def _source_digest() -> str:
    h = hashlib.sha256()
    files = [HAPI_DIR / "pom.xml", *sorted((HAPI_DIR / "src").rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(f.relative_to(HAPI_DIR).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def _build_current() -> bool:
    return STAMP.exists() and STAMP.read_text().strip() == _source_digest() and (TARGET / "lib").is_dir()


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Inter-process lock: parallel pytest workers wait for one Maven build."""
    key = hashlib.sha256(str(HAPI_DIR).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ruxo-fhir-hapi-{key}.lock", "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(*, force: bool = False, quiet: bool = True) -> float:
    """Build tests/hapi_server unless the stamp matches; returns the seconds Maven took (0 if skipped)."""
    with _build_lock():
        if not force and _build_current():
            return 0.0
        mvn = mvn_command()
        if not mvn:
            raise HapiUnavailable(f"HAPI FHIR tests need `mvn` for the first build: {INSTALL_HINT}")
        shutil.rmtree(TARGET / "lib", ignore_errors=True)  # no stale jars from an older pom
        STAMP.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [mvn, "-q", "-B", "process-classes"], cwd=HAPI_DIR, capture_output=quiet, text=True, check=False
        )
        took = time.monotonic() - t0
        if proc.returncode != 0:
            detail = f"\n{(proc.stdout or '')[-4000:]}\n{(proc.stderr or '')[-4000:]}" if quiet else ""
            raise HapiServerError(f"mvn failed in {HAPI_DIR} (exit {proc.returncode}){detail}")
        STAMP.write_text(_source_digest() + "\n")
        return took


def classpath() -> str:
    return os.pathsep.join([str(TARGET / "classes"), str(TARGET / "lib" / "*")])


# --------------------------------------------------------------------------------------------
# the engine process
# --------------------------------------------------------------------------------------------


class HapiEngine:
    """A running ``java ruxo.hapi.HapiLauncher``: HAPI FHIR JPA without any front.

    ``base_url`` is HAPI's FHIR base; ``root_url + "/$admin/..."`` its test admin API.
    """

    engine_switches = frozenset({"page_size", "no_client_ids", "validate"})

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, no_client_ids: bool = False,
                 validate: bool = False, startup_timeout: float = 600.0, log: bool | None = None) -> None:
        self.host = host
        self._requested_port = port
        self.no_client_ids = no_client_ids
        self.validate = validate
        self.startup_timeout = startup_timeout
        self.log = bool(os.environ.get(LOG_ENV)) if log is None else log
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.port = 0
        self.startup_seconds = 0.0
        self.build_seconds = 0.0

    def start(self, *, exit_on_stdin_close: bool = True) -> HapiEngine:
        if self._proc is not None:
            raise HapiServerError("HAPI already started")
        problem = missing_tools()
        if problem:
            raise HapiUnavailable(problem)
        self.build_seconds = ensure_built()
        cmd = [java_command(), *JVM_OPTS, "-cp", classpath(), MAIN_CLASS,
               "-host", self.host, "-port", str(self._requested_port)]
        if self.no_client_ids:
            cmd.append("-no-client-ids")
        if self.validate:
            cmd.append("-validate")
        if exit_on_stdin_close:
            cmd.append("-exit-on-stdin-close")
        if not self.log:
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd, cwd=HAPI_DIR, stdin=subprocess.PIPE if exit_on_stdin_close else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self._stderr,
        )
        try:
            info = self._read_ready_line()
        except HapiServerError as exc:
            detail = self.stderr_tail()
            self.stop()
            raise HapiServerError(f"{exc}\n--- HAPI stderr ---\n{detail}") from None
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self.port = int(info["port"])
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        fd = self._proc.stdout.fileno()
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b'{"event"'):
                    info: dict[str, Any] = json.loads(line)
                    if info.get("event") == "listening":
                        return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HapiServerError(f"HAPI did not start within {self.startup_timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait(timeout=30)
                    raise HapiServerError(f"HAPI exited with code {code} before it was ready")
                buf += chunk

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # the launcher exits when its stdin closes
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def stderr_tail(self, limit: int = 6000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - limit))
        return self._stderr.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def root_url(self) -> str:
        if not self.port:
            raise HapiServerError("HAPI not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/fhir"

    # -- the launcher's admin API (used by the fault front) ----------------------------------

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root_url + "/$admin/" + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise HapiServerError(f"{method} /$admin/{path} -> {exc.code}: {detail}") from None

    def reset(self) -> None:
        self._admin("POST", "reset", {})

    def configure(self, switches: dict[str, Any]) -> dict[str, Any]:
        patch = dict(switches)
        if "no_client_ids" in patch:  # the launcher's switch says what is allowed
            value = patch.pop("no_client_ids")
            patch["client_ids"] = None if value is None else not value
        out: dict[str, Any] = self._admin("POST", "config", patch)
        return out

    def config(self) -> dict[str, Any]:
        raw = self._admin("GET", "config")
        return {"page_size": raw["page_size"], "no_client_ids": not raw["client_ids"], "validate": raw["validate"]}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = self._admin("GET", "count")
        return out

    def entries_written(self) -> int:
        return int(self._admin("GET", "versions")["versions"])


# --------------------------------------------------------------------------------------------
# HAPI behind the fault front: the test fixture's object
# --------------------------------------------------------------------------------------------


class TestHapiServer:
    """HAPI FHIR JPA behind the fault front, with the interface of ``fhirserver.TestFhirServer``.

    ``base_url``/``root_url`` are the front's; ``engine_base_url`` is HAPI itself (no front).
    ``stats()["entries_written"]`` counts resource versions HAPI stored (deletes included, no-op
    updates and rolled-back transactions not), read from its database.
    """

    __test__ = False
    engine = "hapi"

    def __init__(self, *, no_client_ids: bool = False, validate: bool = False,
                 config: dict[str, Any] | None = None, startup_timeout: float = 600.0,
                 log: bool | None = None) -> None:
        self.hapi = HapiEngine(no_client_ids=no_client_ids, validate=validate,
                               startup_timeout=startup_timeout, log=log)
        self._startup_config = dict(config or {})
        self.front: FaultFront | None = None

    def start(self) -> TestHapiServer:
        self.hapi.start()
        try:
            log = (lambda line: print(line, file=sys.stderr)) if self.hapi.log else None
            self.front = FaultFront(self.hapi.root_url, self.hapi, log=log).start()
            if self._startup_config:
                self.front.set_startup(self._startup_config)
        except BaseException:
            self.hapi.stop()
            raise
        return self

    def stop(self) -> None:
        front, self.front = self.front, None
        if front is not None:
            front.stop()
        self.hapi.stop()

    def __enter__(self) -> TestHapiServer:
        return self.start() if self.front is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.front is not None and self.hapi.running

    def _front(self) -> FaultFront:
        if self.front is None:
            raise HapiServerError("server not started")
        return self.front

    @property
    def port(self) -> int:
        return self._front().port

    @property
    def root_url(self) -> str:
        return self._front().root_url

    @property
    def base_url(self) -> str:
        return self._front().base_url

    @property
    def engine_base_url(self) -> str:
        return self.hapi.base_url

    def configure(self, switches: dict[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        return self._front().configure({**(switches or {}), **kw})

    def config(self) -> dict[str, Any]:
        return self._front().config()

    def reset(self) -> None:
        self._front().reset()

    def stats(self) -> dict[str, Any]:
        return self._front().stats()

    def counts(self) -> dict[str, int]:
        return self.hapi.counts()

    def stderr_tail(self, limit: int = 6000) -> str:
        return self.hapi.stderr_tail(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start HAPI FHIR JPA (R4, in-memory H2) for ruxo-fhir.")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-client-ids", action="store_true",
                        help="refuse client-assigned ids (HAPI's NOT_ALLOWED id strategy)")
    parser.add_argument("--validate", action="store_true", help="validate resources on write")
    parser.add_argument("--build-only", action="store_true",
                        help="build (if the pom or launcher changed) and exit; CI runs this first")
    args = parser.parse_args(argv)
    problem = missing_tools()
    if problem:
        print(problem, file=sys.stderr)
        return 5
    if args.build_only:
        try:
            took = ensure_built(quiet=False)
        except HapiServerError as exc:
            print(str(exc), file=sys.stderr)
            return 4
        print(f"HAPI test server built in {took:.0f}s" if took else "HAPI test server already built",
              file=sys.stderr)
        return 0
    if not _build_current():
        print("building the HAPI FHIR test server (first run: Maven downloads ~300 MB)...", file=sys.stderr)
    engine = HapiEngine(host=args.host, port=args.port, no_client_ids=args.no_client_ids,
                        validate=args.validate, log=True)
    try:
        engine.start(exit_on_stdin_close=False)
    except HapiServerError as exc:
        print(str(exc), file=sys.stderr)
        return 4
    print(engine.base_url, flush=True)
    if engine.build_seconds:
        print(f"built in {engine.build_seconds:.0f}s", file=sys.stderr)
    print(f"started in {engine.startup_seconds:.0f}s; Ctrl-C stops it", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while engine.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
