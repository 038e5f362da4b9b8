"""Every setting of the service, read from the environment (prefix ``SESSION_WORKER_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TokenGrant(BaseModel):
    """What one ``X-Auth-Token`` may do: act as ``user_id`` inside ``project_id``."""

    project_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    user_id: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SESSION_WORKER_", extra="ignore")

    # Redis: broker, store and reply channel share it. None: `up` starts an embedded server.
    # redis+cluster://host:port: the store and replies on a Redis Cluster (see connection.py).
    redis_url: str | None = None
    # Celery's broker when it is not redis_url (required when redis_url is a cluster).
    broker_url: str | None = None
    key_prefix: str = Field(default="sw", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    redis_socket_timeout: float = Field(default=5.0, gt=0)
    redis_connect_timeout: float = Field(default=2.0, gt=0)

    # Command semantics.
    default_hold_off: int = Field(default=30, ge=0, le=10**12)
    history_limit: int = Field(default=100, ge=1, le=100_000)
    request_ttl: int = Field(default=86_400, ge=60)  # how long a request id is remembered
    reply_ttl: int = Field(default=300, ge=1)  # how long an unread reply waits for its caller
    reply_timeout: float = Field(default=10.0, gt=0)  # how long a caller waits by default

    # Celery.
    queue: str = Field(default="session_worker", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    visibility_timeout: int = Field(default=300, ge=1)  # unacked message is redelivered after
    deadline_sweep_interval: float = Field(default=5.0, gt=0)

    # Local stack (`session-worker up`).
    data_dir: Path = Path("var")

    # Operations (logs.py, metrics.py): log format text|json, root log level, and the port
    # on which `worker` / `sweep` serve /metrics (0: none; the shim serves /metrics itself).
    log_format: Literal["text", "json"] = "text"
    log_level: str = Field(default="INFO", pattern=r"^(?i:DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    metrics_port: int = Field(default=0, ge=0, le=65535)

    # HTTP shim.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9090, ge=0, le=65535)
    http_workers: int = Field(default=2, ge=1, le=64)
    # Seconds the shim's start, end and job calls (made on its event loop) wait for Redis
    # before a 503: a stalled Redis holds a shim process this long once (see api.Breaker).
    http_redis_timeout: float = Field(default=0.5, gt=0)
    auth_tokens: dict[str, TokenGrant] = Field(default_factory=dict)
    default_project: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    insecure_no_auth: bool = False
    max_body_bytes: int = Field(default=1 << 20, ge=1024)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
