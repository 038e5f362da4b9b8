"""Redis clients built from Settings, so every process connects the same way.

A URL with the scheme ``redis+cluster://`` (``rediss+cluster://`` for TLS) names a Redis
Cluster by any one of its nodes: make_redis then returns a ``RedisCluster`` client, which
finds the other nodes itself. Every script call names all its keys and each call's keys
share one slot (keys.py), so the store runs on it unchanged. Celery's broker cannot use a
cluster: it takes ``broker_url`` (SESSION_WORKER_BROKER_URL), a plain Redis.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .settings import Settings, get_settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# What make_redis returns: one server, or a Redis Cluster.
RedisClient: TypeAlias = Redis | RedisCluster


def redis_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return settings.redis_url or DEFAULT_URL


def is_cluster_url(url: str) -> bool:
    """True when `url` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_node_url(url: str) -> str:
    """The plain ``redis://`` (or ``rediss://``) URL of the node a cluster URL names.

    A cluster has database 0 only, so the path must be empty or ``/0``.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {parts.scheme}://...")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only: drop the path of the URL")
    return urlunsplit((CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))


def broker_url(settings: Settings | None = None) -> str:
    """Celery's broker: `broker_url` when set, else the Redis URL (which must not be a cluster:
    kombu's Redis transport speaks to one server)."""
    settings = settings or get_settings()
    if settings.broker_url:
        return settings.broker_url
    url = redis_url(settings)
    if is_cluster_url(url):
        raise ValueError(
            "the Celery broker cannot use Redis Cluster: set SESSION_WORKER_BROKER_URL to a "
            "plain redis:// URL (SESSION_WORKER_REDIS_URL may stay the cluster, for the store)"
        )
    return url


# Error replies that mean "not now" rather than "this command is wrong": out of memory,
# persistence failing (MISCONF), a busy script, loading, a replica, a cluster reconfiguring,
# and (is_transient) a script flushed again as soon as it was loaded (NOSCRIPT: nothing ran).
TRANSIENT_CODES = frozenset(
    {"OOM", "MISCONF", "BUSY", "LOADING", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"}
    | {"NOREPLICAS"}
)


def is_transient(exc: BaseException) -> bool:
    """Redis is unreachable, too slow, or refuses for now (TRANSIENT_CODES): worth a retry
    later (a worker) or a 503 (the shim), never an error reply about the command."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | NoScriptError):
        return True
    if isinstance(exc, ResponseError):
        code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
        return code in TRANSIENT_CODES
    return False


# How a client retries a call whose connection failed (make_redis's `retry`):
#   "backoff"   three retries after a connection error, 0.1 s to 1 s apart, none after a
#               timeout: workers (a Celery retry follows), the sweep, node clients;
#   "immediate" one retry at once after a connection error, never sleeping and never after
#               a timeout: the shim, whose event loop must not wait (a stale connection
#               after a Redis restart is replaced; an outage or a stall is a fast 503);
#   "never"     each call sent at most once: blocking waits, and script calls that leave
#               no request record (an HTTP call without Idempotency-Key), where a resend
#               after a lost answer would apply the command twice.
RetryPolicy: TypeAlias = Literal["backoff", "immediate", "never"]


def _retry(policy: RetryPolicy) -> Retry:
    if policy == "backoff":
        return Retry(
            ExponentialBackoff(cap=1.0, base=0.05),
            retries=3,
            supported_errors=(RedisConnectionError,),
        )
    if policy == "immediate":
        return Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    return Retry(NoBackoff(), retries=0)


def make_redis(
    settings: Settings | None = None,
    *,
    wait_timeout: float | None = None,
    retry: RetryPolicy = "backoff",
) -> RedisClient:
    """A client for commands, or (with `wait_timeout`) for blocking waits of that length.

    Retrying a script call after a cut connection is safe when the command carries a request
    id: a command that already ran is answered from its request record. A command without
    one must go through a client made with ``retry="never"`` (see RetryPolicy). A blocking
    wait gets a socket timeout longer than the wait itself and no retries (a retried BLPOP
    would block for its whole timeout again, past the caller's deadline; replies.wait_reply
    waits again itself, within the deadline), so it ends with our timeout error, not a
    socket error. A cluster URL gives a RedisCluster client (see the module docstring).
    """
    settings = settings or get_settings()
    socket_timeout = settings.redis_socket_timeout
    if wait_timeout is not None:
        socket_timeout = wait_timeout + settings.redis_socket_timeout
        retry = "never"
    # Connection errors only: after a timeout Redis is stalled or overloaded, and each retry
    # would wait the whole socket timeout again (a stalled Redis held a read 84 s).
    retry_on_error: list[type[Exception]] = [] if retry == "never" else [RedisConnectionError]
    url = redis_url(settings)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "retry": _retry(retry),
    }
    if is_cluster_url(url):
        return RedisCluster.from_url(cluster_node_url(url), **common)
    return Redis.from_url(
        url,
        retry_on_error=retry_on_error,
        health_check_interval=30,
        **common,
    )
