"""Typed settings from ``TOLLGATE_*`` environment variables, validated at start.

Each service subclasses :class:`ServiceSettings` with its own prefix
(``TOLLGATE_ROUTER_``, ``TOLLGATE_CACHE_``, …). Settings shared by the whole
mesh (Redis/PostgreSQL URLs, telemetry) are read without a service prefix,
matching DESIGN.md (``TOLLGATE_REDIS_URL``, ``TOLLGATE_DATABASE_URL``).
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


def shared_env(name: str, default: object = None, **kwargs: object) -> object:
    """A field read from the mesh-wide ``TOLLGATE_<NAME>`` variable (no service prefix)."""
    return Field(default, validation_alias=AliasChoices(f"TOLLGATE_{name.upper()}"), **kwargs)  # type: ignore[call-overload, no-any-return]


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    # Seconds to let in-flight calls finish after SIGTERM before cancelling them.
    grace_period_s: float = Field(10.0, gt=0, le=300)
    log_level: str = shared_env("log_level", "INFO")  # type: ignore[assignment]
    # OTLP/gRPC collector address; tracing is off when empty.
    otlp_endpoint: str = shared_env("otlp_endpoint", "")  # type: ignore[assignment]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class SettingsError(SystemExit):
    """Raised (as a clean exit) when settings are invalid."""


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build settings from the environment; on error, exit with a message naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "") or ""
        lines = [f"invalid settings for {cls.__name__}:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            var = f"{prefix}{field}".upper()
            lines.append(f"  {var}: {err['msg']} (got {err.get('input')!r})")
        print("\n".join(lines), file=sys.stderr)
        raise SettingsError(2) from None


class RedisSettings(BaseSettings):
    """Mixin: the mesh's Redis and this deployment's key prefix."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    redis_url: str = shared_env("redis_url", "redis://127.0.0.1:6379/0")  # type: ignore[assignment]
    # Every key starts with this, so several deployments (or test runs) share one Redis safely.
    redis_prefix: str = shared_env("redis_prefix", "tg:")  # type: ignore[assignment]


class DatabaseSettings(BaseSettings):
    """Mixin: the control-plane PostgreSQL database."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    database_url: str = shared_env("database_url", "postgresql://postgres@127.0.0.1:5432/tollgate")  # type: ignore[assignment]
