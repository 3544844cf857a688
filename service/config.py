"""Settings from the environment (prefix ``TDX_``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import MAX_CPU_RATIO, MIN_CPU_RATIO

# TDX_ADMIN_TOKEN is a password for everything: a short one is guessed. Generated tokens are 47.
ADMIN_TOKEN_MIN_LENGTH = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TDX_", extra="ignore")

    database_url: str = "sqlite:///./tdx.db"
    admin_token: str | None = None
    heartbeat_timeout_s: float = Field(default=40.0, gt=0)
    # SQLite durability: FULL fsyncs the WAL on every commit, so an acknowledged write survives
    # power loss; NORMAL survives process crashes only.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # PostgreSQL connections per replica (also the number of concurrent database transactions).
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # How long a request waits for the database before 503 database_unavailable (README "Limits"):
    # a new PostgreSQL connection (libpq counts whole seconds, at least 2), a free pooled one, a
    # statement or lock (PostgreSQL; its socket is cut 1 s later if the server stopped answering),
    # SQLite's write lock held by another process.
    db_connect_timeout_s: float = Field(default=3.0, gt=0, le=600)
    db_pool_timeout_s: float = Field(default=5.0, gt=0, le=600)
    db_statement_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    sqlite_busy_timeout_s: float = Field(default=5.0, ge=0, le=600)
    # /readyz answers 503 when the database does not answer within this.
    readyz_timeout_s: float = Field(default=1.5, gt=0, le=60)
    # Slow clients (service/server.py): a request's head must arrive within http_header_timeout_s,
    # its body within http_body_timeout_s of the head; at most http_max_connections connections
    # (and no more than the file-descriptor limit allows), the oldest idle one evicted beyond it.
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    http_body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    http_max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    cpu_allocation_ratio: float = Field(default=4.0, ge=MIN_CPU_RATIO, le=MAX_CPU_RATIO)
    placement_policy: Literal["spread", "pack"] = "spread"
    tdx_affinity_multiplier: float = Field(default=2.0, ge=0)
    schedule_timeout_s: int = Field(default=3600, ge=1)
    candidate_limit: int = Field(default=16, ge=1, le=500)
    queue_tick_s: float = Field(default=5.0, gt=0)
    idempotency_ttl_s: int = Field(default=86400, ge=86400)
    token_cache_ttl_s: float = Field(default=1.0, ge=0)
    # VM creates per second per API token (a token bucket in each replica; 0: no limit), the
    # bucket's size (a burst), and whether admin tokens are limited too.
    vm_create_rate_per_s: float = Field(default=10.0, ge=0)
    vm_create_burst: int = Field(default=100, ge=1)
    rate_limit_admin: bool = False
    # Open SSE streams plus waiting long-polls per API token, in each replica (429 beyond).
    max_streams_per_principal: int = Field(default=20, ge=1, le=100_000)
    # Fleet policy defaults, until PUT /v1/policy sets them (README "TDX policy").
    max_td_builds_per_host: int = Field(default=4, ge=1, le=10_000)
    td_memory_overhead_mib: int = Field(default=0, ge=0, le=2**20)
    # How long a guided opt-in may wait for its host (drained, then a new load) before it fails.
    opt_in_timeout_s: int = Field(default=86400, ge=60, le=30 * 86400)
    log_requests: bool = True
    run_background_tasks: bool = True

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, value: str | None) -> str | None:
        if not value:
            return None  # unset (or set empty): one is generated at the first start
        if len(value) < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"{len(value)} character(s) is too short for an admin token: use at least {ADMIN_TOKEN_MIN_LENGTH} "
                "(e.g. `openssl rand -hex 32`), or leave it unset to have one generated at the first start"
            )
        if value != value.strip() or any(not c.isprintable() for c in value):
            raise ValueError(
                "an admin token with whitespace at an end or unprintable characters: "
                "no Authorization header could carry it"
            )
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
