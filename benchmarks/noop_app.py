"""The bare Celery baseline: the project's Celery app with one empty task that replies.

``celery -A benchmarks.noop_app worker`` runs it with the same configuration as the
session-worker workers (``session_worker.celery_app.make_app``: broker, serialisation, late
acks, prefetch) and is started with the same flags. The task does nothing but push a reply
to the caller's list (one RPUSH), which the caller BLPOPs, as a command's reply travels.
"""

from __future__ import annotations

import os

from session_worker.celery_app import make_app
from session_worker.connection import RedisClient, make_redis

# Inside session_worker.*: the workers' transport refuses every other task name (broker.py).
TASK_NAME = "session_worker.bench_noop"
REPLY = b'{"ok":true}'

app = make_app()
app.set_current()

_client: tuple[int, RedisClient] | None = None


def _redis() -> RedisClient:
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), make_redis())
    return _client[1]


@app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
def noop(reply_to: str) -> None:
    """An empty task: answer on the reply list."""
    _redis().rpush(reply_to, REPLY)
