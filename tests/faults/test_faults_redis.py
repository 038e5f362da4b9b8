"""Scenarios 3 and 8: Redis restarted mid-stream, its scripts flushed, or down at start-up.

Commands flow through the queue (workers) and through the HTTP shim (``session-worker web``)
while Redis is stopped and started again on the same port with its append-only file, or
while ``SCRIPT FLUSH`` throws every loaded script away. Senders do what the client contract
says: after a timeout (or a 503) they send again with the same request id. Nobody is
restarted by hand: workers, node clients and the shim must find Redis again by themselves,
and the recovery time is measured from the moment Redis answers again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
import redis
from conftest import VISIBILITY_TIMEOUT
from faultkit import (
    PROJECT,
    Fleet,
    Ledger,
    Load,
    figures,
    job_id,
    make_sessions,
    unacked,
    update_via_http,
    update_via_queue,
    wait_until,
)

from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.redis_server import ServerProcess
from session_worker.settings import Settings
from session_worker.store import Store

pytestmark = pytest.mark.faults

SESSIONS = 12
QUEUE_SENDERS = 6
HTTP_SENDERS = 2
ATTEMPT_TIMEOUT = 3.0  # a sender waits this long for a reply before sending again
ATTEMPTS = 20
DOWN_FOR = 2.0  # seconds Redis stays down
RECOVERY_BOUND = 20.0  # seconds: every face answers again within this after Redis is back
FAST_503 = 1.0  # seconds: the slowest 503 while Redis is down


def _probe_queue(client: SessionClient, session_id: str) -> float:
    """Seconds until a fresh command through the queue is answered (resent on timeout)."""
    started = time.monotonic()
    request_id = uuid.uuid4().hex
    while True:
        try:
            reply = client.call(
                "update",
                timeout=1.0,
                request_id=request_id,
                session_id=session_id,
                patch={"description": "probe"},
            )
        except ReplyTimeout:
            pass
        except Exception:
            time.sleep(0.1)
        else:
            assert reply.ok, reply
            return time.monotonic() - started
        assert time.monotonic() - started < RECOVERY_BOUND, "the queue did not recover"


def _probe(action: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    wait_until(action, RECOVERY_BOUND, what, interval=0.05)
    return time.monotonic() - started


def test_redis_restarted_mid_stream_everything_recovers_by_itself(
    server: ServerProcess,
    fleet: Fleet,
    client: SessionClient,
    store: Store,
    admin: redis.Redis,
) -> None:
    ledger = Ledger(make_sessions(store, SESSIONS, "rr"))
    probe_session = next(iter(make_sessions(store, 1, "probe")))
    sessions = list(ledger.base)
    fleet.worker(wait=False)
    fleet.worker(wait=False)
    shim = fleet.shim()
    for worker in fleet.workers:
        worker.wait_ready()

    def send(sender: int, n: int) -> None:
        session_id = sessions[(sender * 5 + n) % SESSIONS]
        if sender < HTTP_SENDERS:
            update_via_http(shim.http, ledger, session_id, attempts=ATTEMPTS * 3)
        else:
            update_via_queue(client, ledger, session_id, timeout=ATTEMPT_TIMEOUT, attempts=ATTEMPTS)

    load = Load(QUEUE_SENDERS + HTTP_SENDERS, send)
    load.wait_for(150, timeout=30)

    server.stop()
    down_at = time.monotonic()
    # While Redis is down the shim answers 503 + Retry-After, fast, and does not hang.
    slowest_503 = 0.0
    while time.monotonic() - down_at < DOWN_FOR:
        started = time.monotonic()
        response = shim.http.get(f"/v2/{PROJECT}/sessions/{probe_session}")
        slowest_503 = max(slowest_503, time.monotonic() - started)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
    assert slowest_503 < FAST_503
    server.start()
    up_at = time.monotonic()

    recovery: dict[str, float] = {}

    def measure(name: str, probe: Callable[[], float]) -> None:
        recovery[name] = probe()

    probes = [
        threading.Thread(
            target=measure, args=("queue", lambda: _probe_queue(client, probe_session))
        ),
        threading.Thread(
            target=measure,
            args=(
                "http",
                lambda: _probe(
                    lambda: (
                        shim.http.get(f"/v2/{PROJECT}/sessions/{probe_session}").status_code == 200
                    ),
                    "the shim answers 200",
                ),
            ),
        ),
        threading.Thread(
            target=measure,
            args=(
                "client_read",
                lambda: _probe(lambda: _reads(client, probe_session), "the client reads"),
            ),
        ),
    ]
    for thread in probes:
        thread.start()
    for thread in probes:
        thread.join(RECOVERY_BOUND + 5)
    assert set(recovery) == {"queue", "http", "client_read"}, recovery
    sent_at_recovery = load.sent
    load.wait_for(sent_at_recovery + 100, timeout=30)
    load.stop()

    unanswered = ledger.unanswered()
    assert not unanswered, unanswered[:3]
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost, tally.answered) == (
        tally.sent,
        0,
        0,
        tally.sent,
    )
    # The scripts were loaded again (a restart starts with an empty script cache).
    assert cached_scripts(admin) >= 1
    wait_until(
        lambda: unacked(admin) == (0, 0),
        VISIBILITY_TIMEOUT * 3 + 10,
        "messages taken before the restart are redelivered and acknowledged",
    )
    figures(
        "3 redis restart",
        **tally.line(),
        down_s=up_at - down_at,
        slowest_503_s=slowest_503,
        recovery_queue_s=recovery["queue"],
        recovery_http_s=recovery["http"],
        recovery_client_read_s=recovery["client_read"],
    )
    assert max(recovery.values()) < RECOVERY_BOUND


def cached_scripts(admin: redis.Redis) -> int:
    return int(admin.info("memory")["number_of_cached_scripts"])


def _reads(client: SessionClient, session_id: str) -> bool:
    try:
        return client.get(session_id) is not None
    except redis.RedisError:
        return False


def test_script_flush_mid_stream_costs_nothing(
    fleet: Fleet, client: SessionClient, store: Store, admin: redis.Redis
) -> None:
    ledger = Ledger(make_sessions(store, SESSIONS, "flush"))
    sessions = list(ledger.base)
    fleet.worker(wait=False)
    fleet.worker(wait=False)
    shim = fleet.shim()
    for worker in fleet.workers:
        worker.wait_ready()

    def send(sender: int, n: int) -> None:
        session_id = sessions[(sender * 5 + n) % SESSIONS]
        if sender < HTTP_SENDERS:
            update_via_http(shim.http, ledger, session_id)
        else:
            update_via_queue(client, ledger, session_id, timeout=10.0)

    load = Load(QUEUE_SENDERS + HTTP_SENDERS, send)
    flushes = 5
    for _ in range(flushes):
        load.wait_for(load.sent + 60, timeout=30)
        admin.script_flush()
    load.wait_for(load.sent + 60, timeout=30)
    load.stop()

    # Every command answered the first time: no timeout, no resend, no 503.
    assert not ledger.unanswered(), ledger.unanswered()[:3]
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost, tally.resent) == (tally.sent, 0, 0, 0)
    assert cached_scripts(admin) >= 1  # loaded again after the last flush
    figures("3 script flush", **tally.line(), flushes=flushes)


def test_workers_and_shim_started_while_redis_is_down_begin_once_it_is_up(
    server: ServerProcess, fleet: Fleet, settings: Settings, store: Store
) -> None:
    ledger = Ledger(make_sessions(store, 4, "late"))
    server.stop()
    for _ in range(2):
        fleet.worker(wait=False)
    shim = fleet.shim()
    for worker in fleet.workers:
        worker.wait_for_log(r"Cannot connect to \S+://", timeout=30)
    started = time.monotonic()
    response = shim.http.get(f"/v2/{PROJECT}/sessions/late0")
    assert response.status_code == 503 and time.monotonic() - started < FAST_503
    time.sleep(1.0)  # down a while longer: the workers keep trying

    server.start()
    up_at = time.monotonic()
    with SessionClient(settings=settings, project_id=PROJECT) as client:
        threads = [
            threading.Thread(
                target=update_via_queue,
                args=(client, ledger, session_id),
                kwargs={"timeout": RECOVERY_BOUND},
            )
            for session_id in ledger.base
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RECOVERY_BOUND + 5)
    first_answer = time.monotonic() - up_at
    http_recovery = _probe(
        lambda: shim.http.get(f"/v2/{PROJECT}/sessions/late0").status_code == 200, "shim 200"
    )

    assert not ledger.unanswered(), ledger.unanswered()
    tally = ledger.tally(store)
    assert (tally.applied, tally.duplicated, tally.lost) == (tally.sent, 0, 0)
    # Both workers consume (each took commands), without a restart.
    for worker in fleet.workers:
        worker.wait_for_log(r"\S+@\S+ ready\.", timeout=5)
    figures(
        "8 workers started before redis",
        **tally.line(),
        recovery_queue_s=first_answer,
        recovery_http_s=http_recovery,
    )


def test_a_stalled_redis_holds_the_shim_one_short_timeout_and_healthz_not_at_all(
    server: ServerProcess, fleet: Fleet, settings: Settings, store: Store
) -> None:
    """SIGSTOP: Redis accepts connections but answers nothing. With the default settings,
    concurrent starts (the event loop's calls) wait one http_redis_timeout at most, reads
    (in threads) their socket timeout at most, /healthz not at all; once the breaker has
    opened every request is a 503 at once, until Redis answers a probe again."""
    make_sessions(store, 1, "stall")
    shim = fleet.shim()
    path = f"/v2/{PROJECT}/sessions/stall0"
    action = {"start": {"job_id": job_id("stall0", 0), "current_tag": 0}}
    assert shim.http.get(path).status_code == 200
    assert server.pid is not None
    timings: dict[str, list[float]] = {"start": [], "get": [], "healthz": []}

    def timed(kind: str, call: Callable[[], httpx.Response], status: int) -> None:
        began = time.monotonic()
        response = call()
        timings[kind].append(time.monotonic() - began)
        assert response.status_code == status, (kind, response.status_code, response.text)

    clients = [httpx.Client(base_url=shim.url, timeout=30.0) for _ in range(7)]
    os.kill(server.pid, signal.SIGSTOP)
    try:
        threads = [
            threading.Thread(
                target=timed, args=("start", lambda c=c: c.post(f"{path}/action", json=action), 503)
            )
            for c in clients[:6]
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.1)
        timed("healthz", lambda: clients[6].get("/healthz"), 200)
        for thread in threads:
            thread.join(30)
        first_s = max(timings["start"])
        assert first_s < settings.http_redis_timeout + 1.0, timings
        slowest = 0.0
        for _ in range(20):
            began = time.monotonic()
            response = shim.http.get(path)
            assert response.status_code == 503 and response.headers["retry-after"]
            assert shim.http.post(f"{path}/action", json=action).status_code == 503
            assert shim.http.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - began)
        assert slowest < 0.5
    finally:
        os.kill(server.pid, signal.SIGCONT)
        for c in clients:
            c.close()
    assert max(timings["healthz"]) < 0.5, timings
    recovery = _probe(lambda: shim.http.get(path).status_code == 200, "shim 200 after the stall")
    figures(
        "3 redis stalled (SIGSTOP)",
        concurrent_starts_s=first_s,
        healthz_during_s=max(timings["healthz"]),
        slowest_later_503s_and_healthz_s=slowest,
        recovery_http_s=recovery,
    )
