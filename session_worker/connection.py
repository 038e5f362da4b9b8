"""Redis clients built from Settings, so every process connects the same way."""

from __future__ import annotations

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .settings import Settings, get_settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return settings.redis_url or DEFAULT_URL


def make_redis(settings: Settings | None = None, *, wait_timeout: float | None = None) -> Redis:
    """A client for commands, or (with `wait_timeout`) for blocking waits of that length.

    Retrying a script call after a cut connection is safe: a command that already ran is
    answered from its request record. A blocking wait gets a socket timeout longer than the
    wait itself, so it ends with our timeout error, not a socket error.
    """
    settings = settings or get_settings()
    socket_timeout = settings.redis_socket_timeout
    if wait_timeout is not None:
        socket_timeout = wait_timeout + settings.redis_socket_timeout
    return Redis.from_url(
        redis_url(settings),
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )
