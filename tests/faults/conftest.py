"""Fixtures of the fault-injection suite: a Redis of each test's own, worker and shim processes.

Every test gets a fresh server (redis-server when installed, else valkey-server) with the
append-only file on and fsynced on every write, so a restart or a crash of Redis loses
nothing that was acknowledged, and a queue of its own. Whatever a test started is killed
after it, however it ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from faultkit import FIGURES, PROJECT, Fleet

from session_worker.client import SessionClient
from session_worker.redis_server import ServerKind, ServerProcess, find_server_binary
from session_worker.settings import Settings
from session_worker.store import Store

# Short enough that a message whose worker died is redelivered within the test.
VISIBILITY_TIMEOUT = 4


def server_kind() -> ServerKind:
    return "redis" if find_server_binary("redis") else "valkey"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """This test's own server, persistent (appendonly, fsync always), on a free port."""
    with ServerProcess(
        server_kind(), tmp_path / "redis", appendonly=True, appendfsync="always"
    ) as process:
        yield process


@pytest.fixture
def settings(server: ServerProcess) -> Settings:
    return Settings(
        redis_url=server.url,
        queue=f"faults-{uuid.uuid4().hex[:10]}",
        visibility_timeout=VISIBILITY_TIMEOUT,
        reply_timeout=10.0,
    )


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[redis.Redis]:
    """A plain client for looking at (and breaking) the server."""
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """The store on this test's server, for setting up and checking state."""
    client = redis.Redis.from_url(settings.redis_url or "")
    yield Store(client, settings)
    client.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[SessionClient]:
    """What a node uses: commands through the queue."""
    with SessionClient(settings=settings, project_id=PROJECT) as node:
        yield node


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    """Worker and shim processes of this test (``fleet.worker()``, ``fleet.shim()``)."""
    processes = Fleet(settings, tmp_path)
    yield processes
    processes.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
