"""Scenario 1: a worker SIGKILLed while it holds commands.

The worker is killed with its whole process group (main process and pool: no goodbye, no
acknowledgement), once while its command waits before the script (test-only pause,
``SESSION_WORKER_TEST_PAUSE``) and once after the script ran, replied and before the message
was acknowledged. A replacement worker gets the messages back after the visibility timeout;
each command takes effect exactly once, each sender gets the right reply (or a clear
ReplyTimeout while it waits, never a hang), and kombu's unacked set drains.
"""

from __future__ import annotations

import time

import pytest
import redis
from conftest import VISIBILITY_TIMEOUT
from faultkit import PROJECT, Fleet, Ledger, figures, job_id, make_sessions, unacked, wait_until

from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.store import Store

pytestmark = pytest.mark.faults

COMMANDS = 4  # one start per session; the killed worker holds the first, the rest queue up


@pytest.mark.parametrize("phase", ["before", "after"])
def test_a_worker_killed_while_holding_commands_loses_and_repeats_none(
    phase: str, fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    ledger = Ledger(make_sessions(store, COMMANDS, "crash"))
    doomed = fleet.worker(env={"SESSION_WORKER_TEST_PAUSE": f"{phase}:60"})
    sent = []
    for session_id in ledger.base:
        request_id = ledger.new(session_id)
        _, reply_key = client.send(
            "start",
            request_id=request_id,
            session_id=session_id,
            job_id=job_id(session_id),
            current_tag=0,
        )
        sent.append((request_id, session_id, reply_key))
    first_id, first_session, first_key = sent[0]
    doomed.wait_for_log(rf"test pause {phase} request={first_id}")

    first_reply = None
    if phase == "after":
        # The script ran and pushed its reply; the message is still unacknowledged.
        first_reply = client.wait(first_key, timeout=5)
        assert (first_reply.result, first_reply.session_tag) == ("success", 1)
    # A caller waiting on a command nobody answers yet ends with a clear timeout, promptly.
    started = time.monotonic()
    with pytest.raises(ReplyTimeout, match="same request id is safe"):
        client.wait(sent[-1][2], timeout=0.5)
    assert time.monotonic() - started < 2.0

    held = unacked(admin)
    assert held[0] >= 1 and held[0] == held[1], held
    doomed.kill()
    killed_at = time.monotonic()
    applied_before = store.get(PROJECT, first_session)
    assert applied_before is not None
    assert applied_before["session_tag"] == (1 if phase == "after" else 0)

    fleet.worker()
    replies = {}
    for request_id, _, reply_key in sent:
        reply = client.wait(reply_key, timeout=VISIBILITY_TIMEOUT * 4 + 10)
        replies[request_id] = reply
        ledger.answered(request_id, reply.version, 1, time.monotonic() - killed_at)
    redelivered_after = time.monotonic() - killed_at

    for request_id, reply in replies.items():
        assert (reply.request_id, reply.ok, reply.result, reply.session_tag) == (
            request_id,
            True,
            "success",
            1,
        )
    if first_reply is not None:
        assert replies[first_id] == first_reply  # answered again from its record
    for session_id in ledger.base:
        doc = store.get(PROJECT, session_id)
        assert doc is not None
        assert (doc["session_tag"], doc["status"]) == (1, "running")
        assert doc["jobs"][job_id(session_id)]["status"] == "running"
        runs = store.runs(PROJECT, session_id)
        assert runs is not None and [r["session_tag"] for r in runs] == [1]
    tally = ledger.tally(store)
    assert (tally.sent, tally.applied, tally.duplicated, tally.lost) == (COMMANDS, COMMANDS, 0, 0)
    # Nothing stays taken-but-unacknowledged once the redelivered messages ran.
    wait_until(lambda: unacked(admin) == (0, 0), VISIBILITY_TIMEOUT * 2 + 5, "unacked drains")
    assert admin.llen(client.settings.queue) == 0
    figures(
        f"1 worker SIGKILL {phase} script",
        **tally.line(),
        held_by_killed=held[0],
        redelivered_s=redelivered_after,
        visibility_timeout_s=VISIBILITY_TIMEOUT,
    )
