"""The periodic deadline sweep (SPEC §4): close runs whose ``run_timeout`` has passed.

A read or command on a session applies its passed deadline by itself; the sweep is what makes
the completion event fire when no node calls any more (a node that died). It runs as one
process per deployment (``session-worker sweep``; ``up`` starts one): running two is harmless,
each expiry is applied once by the script that finds it, the other sees it done. Each run
the sweep closes counts in ``session_worker_deadline_expiries_total`` (metrics.py).
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from .connection import make_redis
from .metrics import MeteredStore
from .settings import Settings
from .store import Store

log = logging.getLogger("session_worker.sweep")

BATCH = 100  # sessions handled per sweep call; a full batch is followed by another at once
MAX_BATCHES = 100  # per sweep, so one sweep always ends (the rest waits for the next one)
MAX_RETRY_DELAY = 30.0  # cap of the back-off while Redis cannot be reached


def sweep_once(store: Store) -> int:
    """Apply every passed deadline now (in batches until one is not full); how many."""
    total = 0
    for _ in range(MAX_BATCHES):
        handled = store.sweep_deadlines(batch=BATCH)
        total += handled
        if handled < BATCH:
            break
    return total


def run_sweep(
    settings: Settings,
    *,
    interval: float | None = None,
    stop: threading.Event | None = None,
    client: Redis | None = None,
) -> None:
    """Sweep every `interval` seconds (default settings.deadline_sweep_interval) until `stop`.

    Survives Redis being away (restart, failover): the error is logged once per outage and
    the sweep retries with a growing delay, logging again when Redis answers.
    """
    interval = settings.deadline_sweep_interval if interval is None else interval
    stop = stop or threading.Event()
    store = MeteredStore(client or make_redis(settings), settings, sweep=True)
    log.info("deadline sweep every %.3g s", interval)
    delay = interval
    failing = False
    while not stop.is_set():
        try:
            expired = sweep_once(store)
        except RedisError as exc:
            if not failing:
                log.warning("deadline sweep: Redis unavailable (%s); retrying", exc)
            failing = True
            delay = min(max(delay * 2, interval), MAX_RETRY_DELAY)
        else:
            if failing:
                log.info("deadline sweep: Redis reachable again")
            failing = False
            delay = interval
            if expired:
                log.info("deadline sweep: %d session(s) past their run deadline", expired)
        stop.wait(delay)
    log.info("deadline sweep stopped")
