"""Edge settings (``TOLLGATE_EDGE_*``).

The edge serves HTTP, not gRPC, so it does not inherit :class:`libs.settings.ServiceSettings`
(its tracing endpoint would be read and ignored); the fields it shares with it keep their names.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.settings import shared_env


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_EDGE_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The RouterService every request is translated to (one long-lived channel).
    router_target: str = "127.0.0.1:50051"
    # Deadline of a call when the request sends no `x-request-timeout`, and the most one may ask for.
    default_timeout_s: float = Field(60.0, gt=0)
    max_timeout_s: float = Field(600.0, gt=0)
    # Bodies larger than this are refused with 413 before they are read in full (the router's gRPC message
    # limit is 16 MiB; 1,000,000 characters of content fit even as \uXXXX escape pairs).
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # After SIGTERM: stop accepting, let in-flight requests finish for this long, then close.
    grace_period_s: int = Field(10, gt=0, le=300)
    # Idle HTTP keep-alive connections are closed after this. Longer than clients keep theirs (httpx, under
    # the openai SDK, drops idle ones after 5 s): with equal timeouts a client reuses a connection the edge is
    # closing at that moment, and the request fails (seen as a ReadError in the soak run).
    keep_alive_s: int = Field(75, gt=0)
    # GET /healthz asks the router's health service with this timeout.
    health_timeout_s: float = Field(1.0, gt=0)
    log_level: str = shared_env("log_level", "INFO")  # type: ignore[assignment]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
