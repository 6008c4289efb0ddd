"""Server settings: profiles from a TOML config file, overridden by flags, turned into a client.

A profile names where a secret comes from (an environment variable or a key file path),
never the secret itself.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruxo_fhir.errors import InputError, UsageError

if TYPE_CHECKING:
    from ruxo_fhir.transport.rest import FhirClient

logger = logging.getLogger(__name__)

TOKEN_ENV = "RUXO_FHIR_TOKEN"
PASSWORD_ENV = "RUXO_FHIR_PASSWORD"
_SECRET_KEYS = {"token", "password", "secret", "access_token", "client_secret"}


@dataclass(frozen=True)
class ServerSettings:
    """Everything needed to reach one server; flags override profile values."""

    url: str | None = None
    fhir_version: str | None = None
    auth: str | None = None
    token_env: str = TOKEN_ENV
    user: str | None = None
    password_env: str = PASSWORD_ENV
    client_id: str | None = None
    private_key: str | None = None
    key_id: str | None = None
    scope: str | None = None
    batch_size: int | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    timeout: float | None = None
    max_response_mb: float | None = None
    profile: str | None = None

    def merged(self, **overrides: Any) -> ServerSettings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None and v is not False})


def default_config_path() -> Path:
    import platformdirs  # here, not at the top: only server commands read the config

    env = os.environ.get("RUXO_FHIR_CONFIG")
    return Path(env) if env else Path(platformdirs.user_config_dir("ruxo-fhir")) / "config.toml"


def load_profile(name: str, config: Path | None = None) -> ServerSettings:
    """The `[servers.NAME]` table of the config file as ServerSettings."""
    if sys.version_info >= (3, 11):  # imported here: only a profile needs a TOML parser
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = config or default_config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file not found (profile {name!r} asked for)", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read config file ({exc})", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", file=str(path)) from None
    servers = data.get("servers", {})
    if name not in servers:
        known = ", ".join(sorted(servers)) or "none"
        raise InputError(f"no profile {name!r} (profiles: {known})", file=str(path))
    table = dict(servers[name])
    secrets = _SECRET_KEYS & {k.lower() for k in table}
    if secrets:
        raise InputError(
            f"profile {name!r} holds a secret ({', '.join(sorted(secrets))}); name an environment "
            "variable (token_env, password_env) or a key file instead", file=str(path),
        )
    allowed = {f.name for f in fields(ServerSettings)}
    unknown = set(table) - allowed
    if unknown:
        raise InputError(f"profile {name!r}: unknown key(s) {', '.join(sorted(unknown))}", file=str(path))
    key = table.get("private_key")
    if isinstance(key, str) and _looks_like_key_material(key):
        # Never quote the value: it is the secret the profile must not hold.
        raise InputError(
            f"profile {name!r}: private_key holds key material, not a path; put the PEM in a file "
            "readable only by you (chmod 600) and give its path", file=str(path),
        )
    if isinstance(table.get("url"), str):
        check_server_url(str(table["url"]), f"profile {name!r} url")
    version = table.get("fhir_version")
    if version is not None:
        from ruxo_fhir.fhir_version import normalise_version

        try:
            table["fhir_version"] = normalise_version(str(version))
        except ValueError:
            raise InputError(f"profile {name!r}: fhir_version {version!r} is not supported (R4 or R5; "
                             "an R4B server takes R4 data: write \"R4\")", file=str(path)) from None
    return ServerSettings(**table, profile=name)


def _looks_like_key_material(value: str) -> bool:
    return "-----BEGIN" in value or "\n" in value or (len(value) > 200 and " " not in value and "/" not in value[:3])


def check_server_url(url: str, what: str = "--server") -> None:
    """Refuse a server URL carrying user:password@ (it would end up in reports, cursors, ledgers)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        raise UsageError(f"{what} is not a valid URL") from None
    if has_credentials or "@" in parts.netloc:
        raise UsageError(
            f"{what} carries credentials (user:password@host); remove them and use --auth basic --user NAME "
            "with the password in RUXO_FHIR_PASSWORD, or --auth bearer with RUXO_FHIR_TOKEN"
        )


def resolve_settings(profile: str | None, config: Path | None, **flags: Any) -> ServerSettings:
    base = load_profile(profile, config) if profile else ServerSettings()
    settings = base.merged(**flags)
    if not settings.url:
        raise UsageError("no server given: use --server URL or --profile NAME")
    check_server_url(settings.url, "--server" if flags.get("url") else "the server URL")
    if settings.private_key and _looks_like_key_material(settings.private_key):
        raise UsageError("--private-key takes the path of a PEM file, not the key itself")
    return settings


def auth_kind(settings: ServerSettings, env: Mapping[str, str]) -> str:
    """The auth to use: --auth if given; SMART when a client id or key is given; bearer with a token; else none.

    Never silently no auth: --client-id/--private-key without --auth mean SMART Backend Services.
    """
    from ruxo_fhir.transport.auth import default_auth_kind

    if settings.auth:
        return settings.auth
    if settings.client_id or settings.private_key:
        logger.info("auth: SMART Backend Services (--client-id/--private-key given without --auth)")
        return "smart"
    return "bearer" if env.get(settings.token_env) else default_auth_kind(env)


def make_client(settings: ServerSettings, env: Mapping[str, str] | None = None, *,
                quick: bool = False) -> FhirClient:
    """A transport.FhirClient for the settings; secrets come from the environment only.

    `quick`: a short retry budget (a connection check should answer in seconds, not minutes).
    """
    from ruxo_fhir.transport.auth import auth_from_options
    from ruxo_fhir.transport.rest import FhirClient, RetryPolicy

    env = os.environ if env is None else env
    assert settings.url
    verify: bool | str = True
    if settings.insecure:
        verify = False
    elif settings.ca_bundle:
        if not Path(settings.ca_bundle).is_file():
            raise InputError("CA bundle file not found", file=settings.ca_bundle)
        verify = settings.ca_bundle
    kind = auth_kind(settings, env)
    auth = auth_from_options(
        kind,
        token=env.get(settings.token_env),
        user=settings.user,
        password=env.get(settings.password_env),
        client_id=settings.client_id,
        private_key_path=settings.private_key,
        key_id=settings.key_id,
        scope=settings.scope,
        fhir_base_url=settings.url,
        verify=verify,
    )
    kwargs: dict[str, Any] = {"auth": auth, "verify": verify}
    if settings.timeout:
        kwargs["timeout"] = settings.timeout
    if settings.max_response_mb:
        kwargs["max_response_bytes"] = int(settings.max_response_mb * 1024 * 1024)
    if quick:
        kwargs["retry"] = RetryPolicy(max_attempts=2, max_total_seconds=3.0)
        kwargs.setdefault("timeout", 15.0)
    return FhirClient(settings.url, **kwargs)
