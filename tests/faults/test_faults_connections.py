"""Scenario 4: connections cut under a caller.

``CLIENT KILL TYPE normal`` cuts every client connection at once (callers blocked on their
reply, workers' broker and store connections) while a caller waits. A loopback proxy cuts a
connection at the worst moment for a script call: after Redis received the EVALSHA (so the
command ran), before its answer reaches the caller, which redis-py then retries on a new
connection. The request record must answer the retry: the command still takes effect once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from faultkit import (
    PROJECT,
    Fleet,
    Ledger,
    Load,
    TcpProxy,
    figures,
    make_sessions,
    update_via_http,
    update_via_queue,
)

from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.models import UpdateCommand
from session_worker.redis_server import ServerProcess
from session_worker.settings import Settings
from session_worker.store import Store

pytestmark = pytest.mark.faults

WAIT = 3.0  # the caller's timeout
SLACK = 1.0  # how far past its timeout a caller may end


def kill_clients(admin: redis.Redis) -> int:
    """CLIENT KILL TYPE normal (all but this connection); how many were killed."""
    return int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal"))


def _wait_in_thread(
    client: SessionClient, reply_key: str, timeout: float
) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["reply"] = client.wait(reply_key, timeout)
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_caller_whose_connection_is_killed_ends_within_its_timeout(
    client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    make_sessions(store, 1, "nobody")
    # No worker: the reply cannot come; the caller must still end on time, with a clear error.
    _, reply_key = client.send(
        "update", session_id="nobody0", patch={"description": "never answered"}
    )
    thread, outcome = _wait_in_thread(client, reply_key, WAIT)
    time.sleep(WAIT - 0.8)
    killed = kill_clients(admin)
    thread.join(WAIT * 4)
    assert not thread.is_alive(), "the caller hangs"
    assert isinstance(outcome.get("error"), ReplyTimeout), outcome
    seconds = outcome["seconds"]
    assert isinstance(seconds, float)
    figures("4 client kill, caller waiting, no reply", killed=killed, caller_ended_s=seconds)
    assert seconds < WAIT + SLACK


def test_client_kill_while_a_command_is_in_flight_applies_it_once(
    fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    ledger = Ledger(make_sessions(store, 2, "kill"))
    fleet.worker(env={"SESSION_WORKER_TEST_PAUSE": "before:1.5"})
    request_id = ledger.new("kill0")
    _, reply_key = client.send(
        "update", request_id=request_id, session_id="kill0", patch={"description": "x"}
    )
    thread, outcome = _wait_in_thread(client, reply_key, 10.0)
    fleet.workers[0].wait_for_log(rf"test pause before request={request_id}")
    killed = kill_clients(admin)  # the caller, the worker's broker and store connections
    thread.join(30)
    assert not thread.is_alive(), "the caller hangs"
    reply = outcome.get("reply")
    if reply is None:
        # The reply can be lost with the connection; the same request id is answered again.
        assert isinstance(outcome.get("error"), ReplyTimeout), outcome
        update_via_queue(client, ledger, "kill0", timeout=15.0, request_id=request_id)
    else:
        ledger.answered(request_id, reply.version, 1, float(outcome["seconds"]))  # type: ignore[arg-type, attr-defined]
    # The worker still consumes: the next command is answered.
    update_via_queue(client, ledger, "kill1", timeout=15.0)
    assert not ledger.unanswered(), ledger.unanswered()
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost) == (tally.sent, 0, 0)
    figures("4 client kill, command in flight", **tally.line(), killed=killed)


def test_workers_consume_on_after_connections_are_cut_under_load(
    fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    """CLIENT KILL every 0.3 s while commands flow: an acknowledgement can fail with its
    connection. The workers must consume on (the message comes back after the visibility
    timeout and is answered from its request record), every command applied once."""
    ledger = Ledger(make_sessions(store, 16, "cut"))
    sessions = list(ledger.base)
    fleet.worker(wait=False)
    fleet.worker()
    fleet.workers[0].wait_ready()

    def send(sender: int, n: int) -> None:
        session_id = sessions[(sender * 5 + n) % len(sessions)]
        update_via_queue(client, ledger, session_id, timeout=2.0, attempts=1)

    load = Load(6, send)
    load.wait_for(20, timeout=30)
    killed = 0
    for _ in range(20):
        killed += kill_clients(admin)
        time.sleep(0.3)
    load.stop()
    # Commands sent now must all be answered: no worker may be left waiting on a dead
    # acknowledgement.
    before = set(ledger.outcomes)
    for i in range(8):
        update_via_queue(client, ledger, sessions[i], timeout=15.0)
    probes = [o for i, o in ledger.outcomes.items() if i not in before]
    assert all(o.version is not None for o in probes), probes
    # What timed out during the cuts is sent again with its request id (a node's retry).
    for request_id, outcome in ledger.unanswered():
        update_via_queue(
            client, ledger, outcome.session_id, timeout=15.0, attempts=3, request_id=request_id
        )
    assert not ledger.unanswered(), ledger.unanswered()[:3]
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost) == (tally.sent, 0, 0), tally
    figures("4 client kill under load", **tally.line(), killed=killed)


# Cut after the script call was sent, before its answer --------------------------------------


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[TcpProxy]:
    tcp = TcpProxy(server.port)
    yield tcp
    tcp.close()


def test_a_store_call_cut_before_its_answer_is_retried_and_applied_once(
    proxy: TcpProxy, settings: Settings, store: Store
) -> None:
    ledger = Ledger(make_sessions(store, 1, "cut"))
    via_proxy = settings.model_copy(update={"redis_url": proxy.url})
    from session_worker.connection import make_redis

    client = make_redis(via_proxy)
    cut_store = Store(client, via_proxy)
    try:
        warm = cut_store.get(PROJECT, "cut0")  # loads the read script; the update is loaded below
        assert warm is not None
        for attempt in range(3):
            request_id = ledger.new("cut0")
            cmd = UpdateCommand(
                request_id=request_id,
                project_id=PROJECT,
                session_id="cut0",
                patch={"description": f"cut {attempt}"},  # type: ignore[arg-type]
            )
            if attempt:  # the first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
                proxy.cut_after(b"EVALSHA", request_id.encode())
            reply = cut_store.update(cmd)
            assert reply.ok, reply
            ledger.answered(request_id, reply.version, 1, 0.0)
    finally:
        client.close()
    assert proxy.cuts == 2
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost) == (tally.sent, 0, 0)
    figures("4 store call cut before its answer", **tally.line(), cuts=proxy.cuts)


def test_a_worker_and_the_shim_cut_before_the_script_answer_apply_once(
    proxy: TcpProxy, fleet: Fleet, settings: Settings, store: Store, client: SessionClient
) -> None:
    """The worker and the shim talk to Redis through the proxy; the caller does not."""
    ledger = Ledger(make_sessions(store, 2, "wcut"))
    via_proxy = settings.model_copy(update={"redis_url": proxy.url})
    fleet.worker(settings=via_proxy)
    shim = fleet.shim(settings=via_proxy)
    update_via_queue(client, ledger, "wcut0", timeout=10.0)  # loads the scripts
    assert update_via_http(shim.http, ledger, "wcut1") == [200]

    cuts = 0
    for _ in range(3):
        request_id = ledger.new("wcut0")
        cut = proxy.cut_after(b"EVALSHA", request_id.encode())
        update_via_queue(client, ledger, "wcut0", timeout=10.0, request_id=request_id)
        assert cut.wait(5)  # (the reply may reach the caller first)
        cuts += 1
        request_id = ledger.new("wcut1")
        cut = proxy.cut_after(b"EVALSHA", request_id.encode())
        assert update_via_http(shim.http, ledger, "wcut1", request_id=request_id) == [200]
        assert cut.wait(5)  # (the reply may reach the caller first)
        cuts += 1
    assert not ledger.unanswered(), ledger.unanswered()
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost, tally.resent) == (tally.sent, 0, 0, 0)
    figures("4 worker and shim cut before the script answer", **tally.line(), cuts=cuts)


def _version(store: Store, session_id: str) -> int:
    doc = store.get(PROJECT, session_id)
    assert doc is not None
    return int(doc["_version"])


def test_a_call_without_a_request_record_is_sent_at_most_once(
    proxy: TcpProxy, settings: Settings, store: Store
) -> None:
    """An HTTP call without Idempotency-Key leaves no request record, so nothing could answer
    a resend: the store sends it through its no-retry client, and a cut costs an error, not
    a second effect. The same cut on the retrying client applies the command twice (the
    reason the no-retry client exists)."""
    from session_worker.connection import make_redis

    make_sessions(store, 2, "once")
    via_proxy = settings.model_copy(update={"redis_url": proxy.url})
    retrying, once = make_redis(via_proxy), make_redis(via_proxy, retry="never")
    try:
        applied = {}
        for session_id, cut_store in (
            ("once0", Store(retrying, via_proxy, once_client=once)),
            ("once1", Store(retrying, via_proxy)),
        ):
            cut_store.get(PROJECT, session_id)  # loads the read script
            warm = UpdateCommand(
                request_id=uuid.uuid4().hex,
                project_id=PROJECT,
                session_id=session_id,
                patch={"description": "warm"},  # type: ignore[arg-type]
            )
            cut_store.update(warm, remember=False).raise_for_error()  # loads update.lua
            before = _version(store, session_id)
            marker = f"cut-{uuid.uuid4().hex}"
            cmd = warm.model_copy(
                update={"patch": warm.patch.model_copy(update={"description": marker})}
            )
            cut = proxy.cut_after(b"EVALSHA", marker.encode())
            if cut_store.once_client is not None:
                with pytest.raises(redis.ConnectionError):
                    cut_store.update(cmd, remember=False)
            else:
                cut_store.update(cmd, remember=False).raise_for_error()  # resent, answered
            assert cut.wait(5)  # (set just after the proxy closed the connection)
            doc = store.get(PROJECT, session_id)
            assert doc is not None and doc["description"] == marker
            applied[session_id] = _version(store, session_id) - before
    finally:
        retrying.close()
        once.close()
    assert applied["once0"] == 1, "the no-retry client applied the command more than once"
    assert applied["once1"] == 2, "the retrying client was expected to send the call again"
    figures("4 call without request record cut", applied_once=applied["once0"])


def test_a_shim_call_without_idempotency_key_cut_before_its_answer_is_a_503_applied_once(
    proxy: TcpProxy, fleet: Fleet, settings: Settings, store: Store
) -> None:
    make_sessions(store, 1, "nokey")
    via_proxy = settings.model_copy(update={"redis_url": proxy.url})
    shim = fleet.shim(settings=via_proxy)
    path = f"/v2/{PROJECT}/sessions/nokey0"
    assert shim.http.patch(path, json={"description": "warm"}).status_code == 200
    before = _version(store, "nokey0")
    marker = f"cut-{uuid.uuid4().hex}"
    cut = proxy.cut_after(b"EVALSHA", marker.encode())
    response = shim.http.patch(path, json={"description": marker})
    assert cut.wait(5)
    assert response.status_code == 503, response.text
    assert response.headers.get("retry-after")
    assert set(response.json()) == {"title", "description"}
    assert _version(store, "nokey0") == before + 1
    # The shim goes on serving on a fresh connection.
    assert shim.http.patch(path, json={"description": "after"}).status_code == 200
    assert _version(store, "nokey0") == before + 2


def test_a_reply_popped_but_never_delivered_costs_one_resend(
    proxy: TcpProxy, fleet: Fleet, settings: Settings, store: Store
) -> None:
    """BLPOP took the reply off its list, then the connection died: the caller times out
    (clearly, on time) and sends again with the same request id, answered from the record."""
    ledger = Ledger(make_sessions(store, 1, "lost"))
    fleet.worker()
    via_proxy = settings.model_copy(update={"redis_url": proxy.url})
    with SessionClient(settings=via_proxy, project_id=PROJECT) as node:
        request_id = ledger.new("lost0")
        reply_key = store.keys.reply(PROJECT, "lost0", request_id)
        cut = proxy.cut_after(b"BLPOP", reply_key.encode())
        started = time.monotonic()
        update_via_queue(node, ledger, "lost0", timeout=WAIT, attempts=2, request_id=request_id)
        seconds = time.monotonic() - started
    assert cut.is_set()
    assert not ledger.unanswered(), ledger.unanswered()
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost, tally.resent) == (1, 0, 0, 1)
    figures("4 reply lost with its connection", **tally.line(), caller_s=seconds)
    assert seconds < 2 * WAIT + SLACK
    _ = uuid
