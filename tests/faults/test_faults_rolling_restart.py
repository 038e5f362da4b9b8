"""Scenario 2: a rolling restart under load.

Sender threads keep commands flowing across many sessions while the workers are replaced one
by one: SIGTERM (Celery's warm shutdown: the task at hand finishes, reserved messages go back
to the queue), a replacement started and ready, next. Every command is sent once (no resend)
and must be answered once, applied once, none lost.
"""

from __future__ import annotations

import time

import pytest
import redis
from conftest import VISIBILITY_TIMEOUT
from faultkit import (
    Fleet,
    Ledger,
    Load,
    figures,
    make_sessions,
    unacked,
    update_via_queue,
    wait_until,
)

from session_worker.client import SessionClient
from session_worker.store import Store

pytestmark = pytest.mark.faults

SESSIONS = 40
SENDERS = 12
WORKERS = 3
REPLY_TIMEOUT = 15.0
# A warm stop takes a moment, except when a task finishes just as the stop begins: billiard's
# pool process then waits up to 30 s for the parent to read its result
# (GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT), which the stopping parent no longer does.
WARM_STOP_LIMIT = 40.0


# Three warm stops of up to WARM_STOP_LIMIT each, then the visibility timeout: more than the
# suite's default 120 s in the worst case.
@pytest.mark.timeout(3 * WARM_STOP_LIMIT + 120)
def test_rolling_restart_under_load_applies_every_command_once(
    fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    ledger = Ledger(make_sessions(store, SESSIONS, "roll"))
    sessions = list(ledger.base)
    for _ in range(WORKERS):
        fleet.worker(wait=False)
    for worker in fleet.workers:
        worker.wait_ready()

    def send(sender: int, n: int) -> None:
        session_id = sessions[(sender * 7 + n) % SESSIONS]
        update_via_queue(client, ledger, session_id, timeout=REPLY_TIMEOUT)

    load = Load(SENDERS, send)
    load.wait_for(100, timeout=30)
    stop_seconds = []
    for i in range(WORKERS):
        stop_seconds.append(fleet.workers[i].terminate(timeout=WARM_STOP_LIMIT))
        fleet.worker()
        time.sleep(0.3)
    load.stop()

    unanswered = ledger.unanswered()
    assert not unanswered, unanswered[:3]
    tally = ledger.tally(store)
    assert tally.sent >= 300, tally
    assert (tally.applied, tally.duplicated, tally.lost, tally.answered) == (
        tally.sent,
        0,
        0,
        tally.sent,
    )
    # A result read by nobody (see WARM_STOP_LIMIT) leaves its message unacknowledged until
    # the visibility timeout: it is redelivered and answered from its request record.
    wait_until(lambda: unacked(admin) == (0, 0), VISIBILITY_TIMEOUT * 2 + 5, "unacked drains")
    assert admin.llen(client.settings.queue) == 0
    counts = fleet.delivery_counts()
    redelivered = sum(1 for i in ledger.outcomes if counts[i] > 1)
    figures(
        "2 rolling restart",
        **tally.line(),
        restarts=WORKERS,
        sessions=SESSIONS,
        redelivered=redelivered,
        slowest_warm_stop_s=max(stop_seconds),
    )
