"""The queue path end to end: a real Redis, real Celery worker processes, the client.

No eager mode and no mocks: every command here is a message on the broker, taken by a
``celery worker`` subprocess, applied by its script, and answered on the reply list.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
import redis

from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.keys import KeyBuilder, events_channel
from session_worker.models import CreateCommand, Reply, SessionFields
from session_worker.redis_server import ServerKind, ServerProcess, find_server_binary, free_port
from session_worker.settings import Settings
from session_worker.store import Store

pytestmark = pytest.mark.integration

PROJECT = "acme"
READY_TIMEOUT = 30.0
REPLY_TIMEOUT = 20.0


# Worker processes -------------------------------------------------------------------------
# (Reusable by any integration test; candidates for tests/conftest.py.)


class Worker:
    """One `celery worker` process (and its pool), in a process group of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The worker's main process (also its process group id)."""
        return self.proc.pid

    def pool_pids(self) -> list[int]:
        """The pool processes (children of the main process)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(
        self, pattern: str, timeout: float = REPLY_TIMEOUT, count: int = 1
    ) -> list[str]:
        """Wait until `pattern` (a regex) matched `count` times in the log; the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m.group(0) for m in re.finditer(pattern, self.log())]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the worker log:\n{self.log()}")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_for_log(r"\S+@\S+ ready\.", timeout=READY_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool) at once: no goodbye, no ack."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown; SIGKILL whatever is left after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)


class StartWorker(Protocol):
    def __call__(
        self, *, concurrency: int = 2, env: dict[str, str] | None = None, wait: bool = True
    ) -> Worker: ...


@pytest.fixture(scope="module")
def queue_name() -> str:
    """A queue of this module's own, so that no other worker takes its messages."""
    return f"sw-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_url: str, queue_name: str) -> Settings:
    return Settings(redis_url=redis_url, queue=queue_name)


def start_worker_process(
    settings: Settings,
    log_path: Path,
    *,
    concurrency: int = 2,
    env: dict[str, str] | None = None,
) -> Worker:
    environ = {k: v for k, v in os.environ.items() if k != "SESSION_WORKER_TEST_PAUSE"}
    environ |= {
        "SESSION_WORKER_REDIS_URL": settings.redis_url or "",
        "SESSION_WORKER_QUEUE": settings.queue,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "session_worker.celery_app",
        "worker",
        "--pool",
        "prefork",
        "-c",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "-Q",
        settings.queue,
        "-n",
        f"{log_path.stem}-{uuid.uuid4().hex[:8]}@%h",
        "--loglevel",
        "INFO",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True
        )
    return Worker(proc, log_path)


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """Start worker processes on this test's Redis and queue; all stopped after the test.

    ``worker(concurrency=2, env={...}, wait=True)`` returns a Worker: ``pid``,
    ``pool_pids()``, ``kill()`` (SIGKILL the whole group), ``stop()`` (warm shutdown),
    ``wait_for_log()``, ``log()``.
    """
    started: list[Worker] = []

    def start(
        *, concurrency: int = 2, env: dict[str, str] | None = None, wait: bool = True
    ) -> Worker:
        log_path = tmp_path / f"worker{len(started)}.log"
        started.append(start_worker_process(settings, log_path, concurrency=concurrency, env=env))
        if wait:
            started[-1].wait_ready()
        return started[-1]

    yield start
    # SIGKILL, not a warm shutdown (which spends ~2 s joining the pool): the next test
    # starts from a flushed Redis, so nothing a worker leaves behind can leak into it.
    for w in started:
        w.kill()


@pytest.fixture
def client(settings: Settings) -> Iterator[SessionClient]:
    with SessionClient(settings=settings, project_id=PROJECT, timeout=REPLY_TIMEOUT) as c:
        yield c


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """Direct access to the same Redis, for setting up and checking state."""
    redis_client = redis.Redis.from_url(settings.redis_url or "")
    yield Store(redis_client, settings)
    redis_client.close()


def make_session(
    store: Store, session_id: str, *, jobs: int = 1, hold_off: int = 3600, **fields: Any
) -> None:
    doc = SessionFields.model_validate(
        {"session_id": session_id, "hold_off": hold_off, "jobs": {f"j{i}": {} for i in range(jobs)}}
        | fields
    )
    reply = store.create(
        CreateCommand(request_id=uuid.uuid4().hex, project_id=PROJECT, document=doc)
    )
    assert reply.ok, reply


class Events:
    """The session's events channel, subscribed before the test acts."""

    def __init__(self, url: str, session_id: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(events_channel(PROJECT, session_id))
        confirmed = self._pubsub.get_message(timeout=5.0)  # the server now sends us events
        assert confirmed is not None and confirmed["type"] == "subscribe", confirmed

    def drain(self, settle: float = 0.5) -> list[dict[str, Any]]:
        """Every event received until none arrived for `settle` seconds."""
        events: list[dict[str, Any]] = []
        while (message := self._pubsub.get_message(timeout=settle)) is not None:
            events.append(orjson.loads(message["data"]))
        return events

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def events(settings: Settings) -> Iterator[Callable[[str], Events]]:
    opened: list[Events] = []

    def subscribe(session_id: str) -> Events:
        opened.append(Events(settings.redis_url or "", session_id))
        return opened[-1]

    yield subscribe
    for e in opened:
        e.close()


def in_threads(count: int, action: Callable[[int], Reply]) -> list[Reply]:
    """Run action(0..count-1) in `count` threads released at the same moment."""
    barrier = threading.Barrier(count)
    replies: list[Reply | BaseException | None] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = action(i)
        except BaseException as exc:
            replies[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failures = [r for r in replies if not isinstance(r, Reply)]
    assert not failures, failures[:3]
    return [r for r in replies if isinstance(r, Reply)]


# The commands, end to end -----------------------------------------------------------------


def test_every_command_through_the_queue(worker: StartWorker, client: SessionClient) -> None:
    worker()
    created = client.create({"description": "db cluster", "hold_off": 0}).raise_for_error()
    sid = created.session_id
    assert created.created_at is not None
    assert client.add_job(sid, "node-1", "client-a").raise_for_error().added is True
    assert client.add_job(sid, "node-2").raise_for_error().added is True
    assert client.job_record("node-1") is not None

    started = client.start(sid, "node-1", 0).raise_for_error()
    assert (started.result, started.session_tag) == ("success", 1)
    joined = client.start(sid, "node-2", 0).raise_for_error()
    assert joined.result in ("success", "out-of-sync")  # hold_off 0: the window may be over

    assert client.end(sid, "node-1", "success", 1).raise_for_error().result == "success"
    updated = client.update(sid, {"description": "renamed"}).raise_for_error()
    assert updated.version is not None
    doc = client.get(sid)
    assert doc is not None
    assert doc["description"] == "renamed"
    assert doc["jobs"]["node-1"]["result"] == "success"
    runs = client.runs(sid)
    assert runs is not None
    assert [r["session_tag"] for r in runs] == [1]
    assert [d["session_id"] for d in client.list()] == [sid]

    assert client.remove_job(sid, "node-2").raise_for_error().ok
    replaced = client.replace(sid, {"description": "replaced", "hold_off": 5})
    assert replaced.raise_for_error().ok
    assert client.get(sid)["description"] == "replaced"  # type: ignore[index]
    assert client.delete(sid).raise_for_error().ok
    assert client.get(sid) is None
    assert client.list() == []

    missing = client.start(sid, "node-1", 0)
    assert not missing.ok and missing.error is not None
    assert missing.error.code == "not_found"


def test_create_without_id_derives_it_from_the_request(
    worker: StartWorker, client: SessionClient
) -> None:
    worker()
    first = client.create({"hold_off": 10}, request_id="create-1").raise_for_error()
    again = client.create({"hold_off": 10}, request_id="create-1").raise_for_error()
    assert again == first
    assert client.get(first.session_id) is not None
    assert len(client.list()) == 1


def test_concurrent_starts_bump_the_tag_exactly_once(
    worker: StartWorker,
    client: SessionClient,
    store: Store,
    events: Callable[[str], Events],
) -> None:
    worker()
    worker()
    make_session(store, "burst", jobs=50, hold_off=3600)
    watch = events("burst")

    replies = in_threads(50, lambda i: client.start("burst", f"j{i}", 0))

    # One start opened run 1; every other one joined it inside the hold-off window (SPEC §3:
    # a member still `scheduled` joins with `success`), all with the new tag.
    assert {(r.ok, r.result, r.session_tag) for r in replies} == {(True, "success", 1)}
    assert len({r.request_id for r in replies}) == 50
    seen = watch.drain()
    assert [e["session_tag"] for e in seen if e["event"] == "run_started"] == [1]
    assert len([e for e in seen if e["event"] == "job_started"]) == 50
    doc = store.get(PROJECT, "burst")
    assert doc is not None
    assert (doc["session_tag"], doc["status"]) == (1, "running")
    assert {j["status"] for j in doc["jobs"].values()} == {"running"}

    # The same nodes asking again with the new tag are held off; nothing changes.
    again = in_threads(50, lambda i: client.start("burst", f"j{i}", 1))
    assert {(r.ok, r.result, r.session_tag) for r in again} == {(True, "hold-off", 1)}
    assert store.get(PROJECT, "burst") == doc


def test_concurrent_ends_are_all_recorded_and_complete_the_run_once(
    worker: StartWorker,
    client: SessionClient,
    store: Store,
    events: Callable[[str], Events],
) -> None:
    worker()
    worker()
    make_session(store, "ends", jobs=50, hold_off=3600)
    assert all(r.ok for r in in_threads(50, lambda i: client.start("ends", f"j{i}", 0)))
    watch = events("ends")
    results = ["fail" if i % 10 == 3 else "success" for i in range(50)]

    replies = in_threads(50, lambda i: client.end("ends", f"j{i}", results[i], 1))

    assert {(r.ok, r.result, r.session_tag) for r in replies} == {(True, "success", 1)}
    seen = watch.drain()
    completed = [e for e in seen if e["event"] == "run_completed"]
    assert len(completed) == 1
    assert (completed[0]["session_tag"], completed[0]["result"]) == (1, "fail")
    assert len([e for e in seen if e["event"] == "job_ended"]) == 50
    runs = store.runs(PROJECT, "ends")
    assert runs is not None and len(runs) == 1
    run = runs[0]
    assert (run["status"], run["result"]) == ("completed", "fail")
    assert {job_id: j["result"] for job_id, j in run["jobs"].items()} == {
        f"j{i}": results[i] for i in range(50)
    }


def test_the_same_request_id_is_applied_once(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    worker()
    make_session(store, "dedup", jobs=1, hold_off=0)

    first = client.start("dedup", "j0", 0, request_id="req-1").raise_for_error()
    doc = store.get(PROJECT, "dedup")
    time.sleep(1.1)  # hold_off 0: a second start applied for real would open run 2
    second = client.start("dedup", "j0", 0, request_id="req-1").raise_for_error()

    assert second == first
    assert (first.result, first.session_tag) == ("success", 1)
    assert store.get(PROJECT, "dedup") == doc

    other = client.start("dedup", "j0", 1, request_id="req-1")
    assert other.error is not None and other.error.code == "idempotency_mismatch"
    assert store.get(PROJECT, "dedup") == doc


def test_a_reply_pushed_before_the_caller_waits_is_received(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    worker()
    make_session(store, "late", jobs=1)

    request_id, reply_key = client.send("start", session_id="late", job_id="j0", current_tag=0)
    assert reply_key == KeyBuilder().reply(PROJECT, "late", request_id)
    deadline = time.monotonic() + REPLY_TIMEOUT
    while not store.client.exists(reply_key):
        assert time.monotonic() < deadline, "the worker never replied"
        time.sleep(0.02)
    ttl = store.client.ttl(reply_key)
    assert 0 < ttl <= client.settings.reply_ttl

    reply = client.wait(reply_key)

    assert (reply.request_id, reply.result, reply.session_tag) == (request_id, "success", 1)
    assert not store.client.exists(reply_key)


def test_waiting_without_workers_times_out_clearly(client: SessionClient, store: Store) -> None:
    make_session(store, "nobody", jobs=1)
    request_id, reply_key = client.send("start", session_id="nobody", job_id="j0", current_tag=0)

    started = time.monotonic()
    with pytest.raises(ReplyTimeout) as caught:
        client.wait(reply_key, timeout=0.3)

    assert 0.25 < time.monotonic() - started < 2.0
    message = str(caught.value)
    assert request_id in message and "0.3 s" in message and "workers" in message


def test_a_worker_started_before_redis_consumes_once_redis_is_up(
    tmp_path: Path, queue_name: str
) -> None:
    kind: ServerKind = "redis" if find_server_binary("redis") else "valkey"
    port = free_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", queue=queue_name)
    early = start_worker_process(settings, tmp_path / "early.log", concurrency=1)
    try:
        early.wait_for_log(r"Cannot connect to \S+://", timeout=READY_TIMEOUT)
        with ServerProcess(kind, tmp_path / "data", port=port) as server:
            store = Store(redis.Redis.from_url(server.url), settings)
            make_session(store, "late-redis", jobs=1)
            with SessionClient(settings=settings, project_id=PROJECT, timeout=30) as client:
                reply = client.start("late-redis", "j0", 0)
            assert (reply.result, reply.session_tag) == ("success", 1)
            store.client.close()
    finally:
        early.stop()


# Workers dying mid-command ----------------------------------------------------------------


def test_a_command_whose_worker_died_before_its_script_is_applied_once(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    doomed = worker(env={"SESSION_WORKER_TEST_PAUSE": "before:60"})
    make_session(store, "crash", jobs=1)
    request_id, reply_key = client.send("start", session_id="crash", job_id="j0", current_tag=0)
    doomed.wait_for_log(rf"test pause before request={request_id}")
    doomed.kill()
    assert store.get(PROJECT, "crash")["session_tag"] == 0  # type: ignore[index]

    worker(env={"SESSION_WORKER_VISIBILITY_TIMEOUT": "3"})
    reply = client.wait(reply_key)

    assert (reply.ok, reply.result, reply.session_tag) == (True, "success", 1)
    doc = store.get(PROJECT, "crash")
    assert doc is not None
    assert (doc["session_tag"], doc["_version"]) == (1, 2)  # created (1), started (2)


def test_a_command_whose_worker_died_after_its_script_is_answered_again_not_reapplied(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    doomed = worker(env={"SESSION_WORKER_TEST_PAUSE": "after:60"})
    make_session(store, "crash", jobs=1, hold_off=0)
    request_id, reply_key = client.send("start", session_id="crash", job_id="j0", current_tag=0)
    first = client.wait(reply_key)  # the script ran and replied; the message is not acked
    doomed.wait_for_log(rf"test pause after request={request_id}")
    doomed.kill()
    doc = store.get(PROJECT, "crash")

    worker(env={"SESSION_WORKER_VISIBILITY_TIMEOUT": "3"})
    again = client.wait(reply_key)  # the redelivered command, answered from its record

    assert again == first
    assert (first.result, first.session_tag) == ("success", 1)
    assert store.get(PROJECT, "crash") == doc


def test_a_command_whose_pool_process_died_is_redelivered_at_once(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker(concurrency=1, env={"SESSION_WORKER_TEST_PAUSE": "before:1"})
    make_session(store, "crash", jobs=1)
    request_id, reply_key = client.send("start", session_id="crash", job_id="j0", current_tag=0)
    line = w.wait_for_log(rf"test pause before request={request_id} pid=\d+")[0]
    pool_pid = int(line.rpartition("=")[2])
    assert pool_pid in w.pool_pids()
    os.kill(pool_pid, signal.SIGKILL)

    reply = client.wait(reply_key)  # task_reject_on_worker_lost: back on the queue, run again

    assert (reply.result, reply.session_tag) == ("success", 1)
    assert len(w.wait_for_log(rf"test pause before request={request_id}", count=2)) == 2
    doc = store.get(PROJECT, "crash")
    assert doc is not None
    assert (doc["session_tag"], doc["_version"]) == (1, 2)


# Commands that cannot be run --------------------------------------------------------------


def _raw_send(client: SessionClient, task: str, kwargs: dict[str, Any], **options: Any) -> None:
    client.app.send_task(task, kwargs=kwargs, queue=client.settings.queue, **options)


def _answered(worker_log: Worker, client: SessionClient, store: Store) -> None:
    """The worker still consumes: a good command after the bad one is answered."""
    reply = client.start("s", "j0", 0)
    assert reply.ok, (reply.error, worker_log.log()[-3000:])


BAD_COMMANDS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    # name: (kind, fields, error code, text the description must contain)
    "missing field": ("start", {"session_id": "s", "current_tag": 0}, "bad_request", "job_id"),
    "wrong type": (
        "start",
        {"session_id": "s", "job_id": "j0", "current_tag": "0"},
        "bad_request",
        "current_tag",
    ),
    "float tag": (
        "start",
        {"session_id": "s", "job_id": "j0", "current_tag": 1.0},
        "bad_request",
        "current_tag",
    ),
    "unknown field": (
        "start",
        {"session_id": "s", "job_id": "j0", "current_tag": 0, "colour": "red"},
        "bad_request",
        "colour",
    ),
    "patch naming another session": (
        "update",
        {"session_id": "s", "patch": {"session_id": "other", "description": "x"}},
        "bad_request",
        "patch.session_id",
    ),
    "replace naming another project": (
        "replace",
        {"session_id": "s", "document": {"project_id": "elsewhere"}},
        "bad_request",
        "document.project_id",
    ),
    "unknown session": (
        "start",
        {"session_id": "nope", "job_id": "j0", "current_tag": 0},
        "not_found",
        "nope",
    ),
    "unknown job": (
        "start",
        {"session_id": "s", "job_id": "ghost", "current_tag": 0},
        "bad_request",
        "ghost",
    ),
    "tag too high": (
        "start",
        {"session_id": "s", "job_id": "j0", "current_tag": 7},
        "bad_request",
        "tag too high",
    ),
    "bad result": (
        "end",
        {"session_id": "s", "job_id": "j0", "result": "great"},
        "bad_request",
        "result",
    ),
    "bad document": (
        "update",
        {"session_id": "s", "patch": {"hold_off": -1, "flavour": 1}},
        "bad_request",
        "flavour",
    ),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_a_bad_command_gets_an_error_reply_and_changes_nothing(
    case: str, worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    before = store.get(PROJECT, "s")
    kind, fields, code, text = BAD_COMMANDS[case]

    reply = client.call(kind, **fields)

    assert not reply.ok and reply.error is not None
    assert reply.error.code == code
    assert text in reply.error.description
    assert store.get(PROJECT, "s") == before
    _answered(w, client, store)


def test_positional_arguments_get_an_error_reply(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    reply_key = KeyBuilder().reply(PROJECT, "s", "positional")
    client.app.send_task(
        "session_worker.start",
        args=["s", "j0", 0],
        kwargs={"reply_to": reply_key, "request_id": "positional"},
        queue=client.settings.queue,
    )
    reply = client.wait(reply_key)
    assert reply.error is not None and "keyword arguments only" in reply.error.description
    _answered(w, client, store)


@pytest.mark.faults  # scenario 6 of the fault-injection suite
def test_an_unknown_task_name_gets_an_error_reply(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    reply_key = KeyBuilder().reply(PROJECT, "s", "unknown-task")
    fields = {"request_id": "unknown-task", "project_id": PROJECT, "session_id": "s"}
    _raw_send(client, "session_worker.explode", fields | {"reply_to": reply_key})

    reply = client.wait(reply_key)

    assert reply.error is not None and reply.error.code == "bad_request"
    assert "session_worker.explode" in reply.error.description
    assert "session_worker.start" in reply.error.description
    _answered(w, client, store)


class _Payload:
    """Unpickling this creates a file: proof enough that a pickle would run code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.faults  # scenario 6 of the fault-injection suite
def test_a_pickled_message_is_refused_and_never_unpickled(
    worker: StartWorker, client: SessionClient, store: Store, tmp_path: Path
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    before = store.get(PROJECT, "s")
    marker = tmp_path / "unpickled"
    reply_key = KeyBuilder().reply(PROJECT, "s", "pickled")
    fields = {
        "request_id": "pickled",
        "reply_to": reply_key,
        "project_id": PROJECT,
        "session_id": "s",
        "job_id": "j0",
        "current_tag": 0,
        "payload": _Payload(marker),
    }
    pickle.dumps(fields)  # the payload pickles (and does nothing until loaded)
    _raw_send(client, "session_worker.start", fields, serializer="pickle")

    w.wait_for_log(r"ContentDisallowed|content type.*not allowed|Refusing to deserialize")
    _answered(w, client, store)
    assert not marker.exists()
    assert not store.client.exists(reply_key)
    after = store.get(PROJECT, "s")
    assert after is not None and before is not None
    assert after["session_tag"] == 1 and before["session_tag"] == 0  # only the good start ran


def _envelope(
    body: bytes,
    queue: str,
    content_type: str = "application/json",
    task: str = "session_worker.start",
    **headers: Any,
) -> bytes:
    """A message as kombu's Redis transport stores it on the queue list."""
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"task": task, "id": uuid.uuid4().hex, "lang": "py", **headers},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": uuid.uuid4().hex,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
            },
        }
    )


MALFORMED_MESSAGES: dict[str, Callable[[str], bytes]] = {
    # name: the bytes pushed straight onto the queue list, given the queue's name
    "envelope not JSON": lambda queue: b"{not json at all",
    "envelope JSON but not an object": lambda queue: b"[1, 2, 3]",
    "body not JSON": lambda queue: _envelope(b"{'start': oops", queue),
    "body JSON but not a task": lambda queue: _envelope(b'{"hello": "world"}', queue),
    "body in an unknown content type": lambda queue: _envelope(b"x", queue, "application/x-evil"),
}


def _push_then_get_past(
    worker: StartWorker,
    client: SessionClient,
    store: Store,
    messages: dict[str, Callable[[str], bytes]],
) -> str:
    """Push `messages` straight onto the queue of a one-process worker, then a good start
    behind them; check the worker got past every one (only the good start ran, the worker is
    up, the queue empty, nothing left unacknowledged to come back after the visibility
    timeout). Returns the worker's log."""
    w = worker(concurrency=1)
    make_session(store, "s", jobs=1)
    before = store.get(PROJECT, "s")
    queue = client.settings.queue
    for make in messages.values():
        store.client.lpush(queue, make(queue))

    _answered(w, client, store)  # queued behind all of them: the worker got past each one
    after = store.get(PROJECT, "s")
    assert before is not None and after is not None
    assert (before["session_tag"], after["session_tag"]) == (0, 1)  # only the good start ran
    assert w.proc.poll() is None, w.log()
    assert store.client.llen(queue) == 0
    log = w.log()
    assert "Unrecoverable error" not in log, log
    # (The good start is acknowledged just after its reply: wait for that.)
    deadline = time.monotonic() + 5
    while store.client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.client.hlen("unacked") == 0
    assert store.client.zcard("unacked_index") == 0
    return log


@pytest.mark.faults  # scenario 6 of the fault-injection suite
def test_malformed_messages_pushed_onto_the_queue_are_refused_and_the_worker_goes_on(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    log = _push_then_get_past(worker, client, store, MALFORMED_MESSAGES)
    # The transport refuses the two envelopes and the body that is no task ...
    assert log.count("refused a malformed message on the queue") == 3, log
    # ... Celery the body that is not JSON and the disallowed content type.
    assert log.count("Can't decode message body") == 1, log
    assert "Refusing to deserialize untrusted content of type application/x-evil" in log, log


@pytest.mark.faults  # scenario 6 of the fault-injection suite
def test_celery_built_ins_and_commands_carrying_callbacks_are_refused(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    """Someone who can write to the broker could ask a worker to run Celery's own tasks, or
    hang callbacks on a command that the worker would send on as new tasks: both refused."""
    w = worker(concurrency=1)
    make_session(store, "s", jobs=1)
    make_session(store, "victim", jobs=0)
    queue = client.settings.queue
    unlock = orjson.dumps([[], {"group_id": "g", "result": []}, {}])
    store.client.lpush(queue, _envelope(unlock, queue, task="celery.chord_unlock"))
    delete = {
        "task": "session_worker.delete",
        "args": [],
        "kwargs": {"request_id": "cb", "project_id": PROJECT, "session_id": "victim"},
        "options": {},
        "subtask_type": None,
        "immutable": True,
    }
    start = {
        "request_id": "carrier",
        "project_id": PROJECT,
        "session_id": "s",
        "job_id": "j0",
        "current_tag": 0,
    }
    for canvas in ({"callbacks": [delete]}, {"chain": [delete]}, {"errbacks": [delete]}):
        body = orjson.dumps([[], start, {**canvas, "chord": None}])
        store.client.lpush(queue, _envelope(body, queue))

    _answered(w, client, store)  # queued behind them all: the worker went past each one
    log = w.log()
    assert log.count("refused a message this service does not run") == 4, log
    assert "celery.chord_unlock" in log and "carrying callbacks" in log, log
    assert store.get(PROJECT, "victim") is not None
    assert not store.client.exists(store.keys.request(PROJECT, "s", "carrier"))
    assert w.proc.poll() is None


def _start_body(request_id: str) -> bytes:
    start = {
        "request_id": request_id,
        "project_id": PROJECT,
        "session_id": "s",
        "job_id": "j0",
        "current_tag": 0,
        "reply_to": KeyBuilder().reply(PROJECT, "s", request_id),
    }
    return orjson.dumps([[], start, {"callbacks": None, "errbacks": None, "chain": None}])


_DEEP = 100_000


def _far_future() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()


HOSTILE_MESSAGES: dict[str, Callable[[str], bytes]] = {
    # Celery reads time limits in the worker's main loop: a string there ended the worker
    # (and the message, put back, ended the next one); a number stalled it for good.
    "time limits that are strings": lambda queue: _envelope(
        _start_body("tl-str"), queue, timelimit=["x", "y"]
    ),
    "a time limit that is a number": lambda queue: _envelope(
        _start_body("tl-num"), queue, timelimit=5
    ),
    "negative time limits": lambda queue: _envelope(
        _start_body("tl-neg"), queue, timelimit=[-1, -1]
    ),
    "an eta a month ahead": lambda queue: _envelope(
        _start_body("eta-far"), queue, eta=_far_future()
    ),
    "an eta that is no time": lambda queue: _envelope(_start_body("eta-bad"), queue, eta=7),
    "a body nested too deep": lambda queue: _envelope(
        b'[[], {"document": ' + b"[" * _DEEP + b"]" * _DEEP + b"}, {}]", queue
    ),
    "an envelope nested too deep": lambda queue: (
        b'{"body": "", "headers": ' + b"[" * _DEEP + b"]" * _DEEP + b"}"
    ),
}


@pytest.mark.faults  # scenario 6 of the fault-injection suite
def test_hostile_headers_and_nesting_are_refused_and_the_worker_goes_on(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    """What Celery would read in the worker's main loop and die on (or stall on) is refused
    by the transport first: nothing applied, nothing answered, the worker consumes on."""
    log = _push_then_get_past(worker, client, store, HOSTILE_MESSAGES)
    refused = log.count("refused a message this service does not run") + log.count(
        "refused a malformed message on the queue"
    )
    assert refused == len(HOSTILE_MESSAGES), log
    assert store.client.keys("*reply*") == []


def test_a_command_without_a_usable_reply_key_is_dropped_and_logged(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    before = store.get(PROJECT, "s")
    for reply_to in ("not-a-reply-key", "other:{acme:s}:reply:x", None):
        fields = {"request_id": "r1", "project_id": PROJECT, "session_id": "s", "job_id": 5}
        _raw_send(client, "session_worker.start", fields | {"reply_to": reply_to})

    w.wait_for_log(r"dropped a command without its own reply_to", count=3)
    assert store.get(PROJECT, "s") == before
    assert store.client.keys("*reply*") == []
    _answered(w, client, store)


@pytest.mark.parametrize(
    "elsewhere",
    [
        KeyBuilder().reply(PROJECT, "s", "another-request"),
        KeyBuilder().reply("victim-project", "vs", "r2"),
    ],
)
def test_a_reply_to_that_is_not_the_commands_reply_key_gets_nothing(
    worker: StartWorker, client: SessionClient, store: Store, elsewhere: str
) -> None:
    """A command cannot direct its answer into another request's, session's or project's
    reply list: it is neither applied nor answered there."""
    w = worker()
    make_session(store, "s", jobs=1)
    before = store.get(PROJECT, "s")
    fields = {"request_id": "r2", "project_id": PROJECT, "session_id": "s", "job_id": "j0"}
    _raw_send(client, "session_worker.start", fields | {"current_tag": 0, "reply_to": elsewhere})

    w.wait_for_log(r"dropped a command without its own reply_to")
    assert store.get(PROJECT, "s") == before
    assert store.client.keys("*reply*") == []
    _answered(w, client, store)


def test_every_command_is_logged_on_one_line(
    worker: StartWorker, client: SessionClient, store: Store
) -> None:
    w = worker()
    make_session(store, "s", jobs=1)
    reply = client.start("s", "j0", 0, request_id="logged")
    assert reply.ok
    line = w.wait_for_log(r"kind=start .*request=logged.*")[0]
    assert "session=s job=j0 outcome=success tag=1 request=logged latency_ms=" in line
