"""Settings: one YAML file, overridable by environment variables, validated at start-up.

Every option is documented in ``docs/configuration.md`` (a test checks that the two agree).
Environment variables override the file: ``DISTILLGUARD_<SECTION>__<OPTION>``, for example
``DISTILLGUARD_UPSTREAM__BASE_URL=http://127.0.0.1:8000/v1``. Three secrets have short
names too: ``DISTILLGUARD_ADMIN_TOKEN``, ``DISTILLGUARD_UPSTREAM_API_KEY`` and
``DISTILLGUARD_STATE_URL``.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from distillguard.errors import ConfigError
from distillguard.exchange import Retention
from distillguard.netaddr import authority

ENV_PREFIX = "DISTILLGUARD_"
SectionT = TypeVar("SectionT", bound=BaseModel)
SHORT_ENV = {
    "DISTILLGUARD_ADMIN_TOKEN": ("admin", "token"),
    "DISTILLGUARD_UPSTREAM_API_KEY": ("upstream", "api_key"),
    "DISTILLGUARD_STATE_URL": ("state", "url"),
    "DISTILLGUARD_REDIS_URL": ("counters", "redis_url"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(8081, ge=0, le=65535)
    trusted_proxies: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # A client that sends nothing of an unfinished request (headers or body) for this
    # long is disconnected (serve._http_protocol).
    read_timeout_s: float = Field(30.0, gt=0)
    # On SIGTERM or SIGINT, how long the requests under way may take to be answered
    # before they are cancelled and the process ends (serve.Stack.serve).
    shutdown_timeout_s: int = Field(30, ge=1)
    replica_id: str | None = None
    # HTTPS on both ports: a PEM certificate (chain) and its unencrypted PEM key; the CA
    # file is what this project's own commands trust when they call the admin API (a
    # self-signed certificate is its own CA; none: the system's trust store)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together: "
                             "set both for HTTPS, or neither")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's URL, ``/v1`` included."""
        return f"{self.scheme}://{authority(self.host, self.port)}/v1"

    @property
    def admin_url(self) -> str:
        return f"{self.scheme}://{authority(self.admin_host, self.admin_port)}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None without TLS; ConfigError naming the files
        when the certificate or key cannot be read or do not belong together."""
        if not self.tls_cert_file or not self.tls_key_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            # an encrypted key is refused here, not asked for at a prompt no one sees
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file,
                                    password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot serve HTTPS with server.tls_cert_file "
                              f"{self.tls_cert_file} and server.tls_key_file "
                              f"{self.tls_key_file}: {reason}") from None
        return context

    def admin_verify(self) -> ssl.SSLContext | bool:
        """What a client of the admin API in this project trusts (httpx's ``verify``):
        ``tls_ca_file``, or the system's trust store."""
        if not self.tls_ca_file:
            return True
        try:
            return ssl.create_default_context(cafile=self.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot read server.tls_ca_file {self.tls_ca_file}: "
                              f"{exc}") from None

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {item!r} is not an IP network") from exc
        return value


# The shortest admin token taken. It opens the admin API and the dashboard; guessing is
# slowed down per address (gateway/adminauth.py), but a token such as "x" was accepted.
ADMIN_TOKEN_MIN_CHARS = 16


class AdminSettings(_Section):
    token: str | None = None
    # failed authentications per client address and minute before the admin API answers
    # 429 (gateway/adminauth.py); the dashboard's log-in form has a setting of its own
    failed_auth_per_minute: int = Field(10, ge=1)

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value.strip()) < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(
                f"the admin token must be at least {ADMIN_TOKEN_MIN_CHARS} characters (make "
                "one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return value


class UpstreamSettings(_Section):
    base_url: str = "demo"
    api_key: str | None = None
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(512, gt=0)
    # How long an idle pooled connection is kept: under the upstream's own idle timeout,
    # or a request sent as the upstream closes the connection fails (see docs).
    keepalive_s: float = Field(4.0, gt=0)
    # The most the gateway reads of one answer (a whole body, or a whole stream): an
    # upstream that sends without end would otherwise fill the gateway's memory.
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)
    models: list[str] = Field(default_factory=list)

    @property
    def is_demo(self) -> bool:
        return self.base_url == "demo"


class StateSettings(_Section):
    url: str = "sqlite:///distillguard.sqlite"
    key_cache_ttl_s: float = Field(0.5, ge=0, le=1.0)
    on_failure: Literal["open", "closed"] = "open"
    stale_grace_s: float = Field(300.0, ge=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("state.url must start with sqlite:// or postgresql://")
        return value


class CounterSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "dg"
    on_failure: Literal["open", "closed"] = "open"


class LimitSet(_Section):
    """Limits for one subject; ``None`` means unlimited."""

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)


def _default_tiers() -> dict[str, LimitSet]:
    return {
        "unverified": LimitSet(requests_per_minute=60, tokens_per_minute=40_000,
                               tokens_per_day=1_000_000),
        "standard": LimitSet(requests_per_minute=600, tokens_per_minute=400_000,
                             tokens_per_day=20_000_000),
        "verified": LimitSet(requests_per_minute=600, tokens_per_minute=400_000,
                             tokens_per_day=20_000_000),
        "trusted": LimitSet(requests_per_minute=6000, tokens_per_minute=4_000_000,
                            tokens_per_day=None),
    }


class LimitSettings(_Section):
    tiers: dict[str, LimitSet] = Field(default_factory=_default_tiers)
    # checked even when not given: ``tiers`` given without "standard" leaves it unlimited
    default_tier: str = Field("standard", validate_default=True)

    @field_validator("default_tier")
    @classmethod
    def _has_limits(cls, value: str, info: ValidationInfo) -> str:
        # Accounts of a tier without an entry get the default tier's limits; without an
        # entry of its own they were served with no limit at all.
        tiers = info.data.get("tiers")
        if tiers is not None and value not in tiers:
            raise ValueError(f"{value!r} has no entry in limits.tiers "
                             f"({', '.join(sorted(tiers)) or 'none'}): accounts of a tier "
                             "without one would have no limits; add it there or name "
                             "one of those")
        return value


class PipelineSettings(_Section):
    queue_size: int = Field(10_000, gt=0)
    retention: Retention = Retention.FULL
    trace_path: str | None = None
    trace_flush_s: float = Field(1.0, gt=0)


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    counters: CounterSettings = Field(default_factory=CounterSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    # Sections owned by later components (ledger, policy, detection, ...) are validated by
    # those components when they start; they are kept here verbatim.
    extensions: dict[str, Any] = Field(default_factory=dict)

    def limits_for_tier(self, tier: str | None) -> LimitSet:
        tiers = self.limits.tiers
        return tiers.get(tier or self.limits.default_tier) or tiers.get(
            self.limits.default_tier, LimitSet()
        )


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, value in environ.items():
        if name in SHORT_ENV:
            section, option = SHORT_ENV[name]
        elif name.startswith(ENV_PREFIX) and "__" in name:
            section, _, option = name[len(ENV_PREFIX):].lower().partition("__")
        else:
            continue
        parsed: Any = value
        if value[:1] in "[{" or value in ("true", "false", "null") or _is_number(value):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
        data.setdefault(section, {})[option] = parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_settings(
    path: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Read settings from ``path`` (YAML), then environment variables, then ``overrides``.

    Raises :class:`ConfigError` with every problem listed, naming the option.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping at top level")
        data = loaded
    known = set(Settings.model_fields)
    extensions = {k: data.pop(k) for k in list(data) if k not in known}
    _apply_env(data, dict(os.environ if environ is None else environ))
    for key in list(data):
        if key not in known:
            extensions[key] = data.pop(key)
    for section, values in (overrides or {}).items():
        target = data if section in known else extensions
        if isinstance(values, dict):
            target.setdefault(section, {}).update(values)
        else:
            target[section] = values
    data.setdefault("extensions", {}).update(extensions)
    return _validate(Settings, data, prefix="")


def validate_section(model: type[SectionT], raw: Any, section: str) -> SectionT:
    """Validate one component's settings section (``settings.extensions[section]``).

    Raises :class:`ConfigError` listing every problem with its full option name, in the
    same form as :func:`load_settings`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: the section must be a mapping")
    return _validate(model, raw, prefix=section + ".")


def _validate(model: type[SectionT], data: dict[str, Any], *, prefix: str) -> SectionT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"  {prefix}{where}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(problems)) from None
