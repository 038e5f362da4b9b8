"""Scenario 5: one slow command does not hold back other sessions' commands.

A worker stalls in the middle of a command (the test-only pause before its script: a command
stuck on an overloaded or frozen machine). Each worker process takes one message at a time
(prefetch 1, acks late), so the stall holds that one message and nothing else: the other
workers answer every other session's commands well within the reply timeout while it lasts.
The slow command's sender gets a clear ReplyTimeout, and the command still takes effect
exactly once when the stalled worker finishes it (its warm shutdown waits for it).
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from faultkit import PROJECT, Fleet, Ledger, figures, make_sessions, unacked, update_via_queue

from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.settings import Settings
from session_worker.store import Store

pytestmark = pytest.mark.faults

OTHER_SESSIONS = 6
COMMANDS = 60
SENDERS = 6
REPLY_TIMEOUT = 3.0
STALL = 20  # seconds the slow worker holds its command


def test_a_slow_command_holds_back_no_other_session(
    fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis, settings: Settings
) -> None:
    # A visibility timeout longer than the stall, as in production (there the stall would be
    # redelivered after it, and answered from its request record: scenario 1).
    patient = settings.model_copy(update={"visibility_timeout": STALL * 3})
    ledger = Ledger(make_sessions(store, OTHER_SESSIONS + 1, "slow"))
    slow_session, *others = ledger.base
    stalled = fleet.worker(env={"SESSION_WORKER_TEST_PAUSE": f"before:{STALL}"}, settings=patient)
    slow_id = ledger.new(slow_session)
    _, slow_key = client.send(
        "update", request_id=slow_id, session_id=slow_session, patch={"description": "slow"}
    )
    stalled.wait_for_log(rf"test pause before request={slow_id}")
    stalled_at = time.monotonic()
    stalled.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish this one, take no other
    fleet.worker(wait=False, settings=patient)
    fleet.worker(wait=False, settings=patient)
    for worker in fleet.workers[1:]:
        worker.wait_ready()

    def send(n: int) -> None:
        update_via_queue(client, ledger, others[n % len(others)], timeout=REPLY_TIMEOUT)

    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(send, range(COMMANDS)))
    others_done_after = time.monotonic() - stalled_at

    unanswered = [(i, o) for i, o in ledger.unanswered() if i != slow_id]
    assert not unanswered, unanswered[:3]
    # All of that happened while the slow command was still held, not yet applied.
    doc = store.get(PROJECT, slow_session)
    assert doc is not None and doc["_version"] == ledger.base[slow_session]
    assert others_done_after < STALL, others_done_after
    slowest_other = max(o.seconds for i, o in ledger.outcomes.items() if i != slow_id)
    assert slowest_other < REPLY_TIMEOUT

    # Its own sender waits in vain for now, and is told so clearly and promptly.
    started = time.monotonic()
    with pytest.raises(ReplyTimeout, match="same request id is safe"):
        client.wait(slow_key, timeout=0.5)
    assert time.monotonic() - started < 2.0
    reply = client.wait(slow_key, timeout=STALL + 15)
    assert reply.ok and reply.version == ledger.base[slow_session] + 1, reply
    ledger.answered(slow_id, reply.version, 1, time.monotonic() - stalled_at)
    assert stalled.proc.wait(30) == 0, stalled.log()

    tally = ledger.tally(store)
    assert (tally.sent, tally.applied, tally.duplicated, tally.lost, tally.answered) == (
        COMMANDS + 1,
        COMMANDS + 1,
        0,
        0,
        COMMANDS + 1,
    )
    assert unacked(admin) == (0, 0)
    assert fleet.deliveries(slow_id) == 1
    figures(
        "5 one slow command",
        **tally.line(),
        stall_s=STALL,
        others_done_within_s=others_done_after,
        slowest_other_reply_s=slowest_other,
    )
