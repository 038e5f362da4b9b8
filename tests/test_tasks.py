"""Task bodies called directly (in this process, no broker, no eager mode) on every backend.

Also the Celery app's configuration and the reply channel (replies.py) that tasks and the
client share.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from session_worker import tasks
from session_worker.celery_app import app, make_app, task_name
from session_worker.errors import ReplyTimeout
from session_worker.keys import KeyBuilder
from session_worker.models import COMMAND_MODELS, Reply
from session_worker.redis_server import free_port
from session_worker.replies import parse_reply_key, push_reply, wait_reply
from session_worker.settings import Settings
from session_worker.store import Store, derived_session_id

PROJECT = "acme"
KEYS = KeyBuilder("sw")


@pytest.fixture
def settings() -> Settings:
    return Settings(queue="test-tasks", key_prefix="sw")


@pytest.fixture
def store(backend: redis.Redis, settings: Settings) -> Iterator[Store]:
    """The Store the tasks of this process use for this test."""
    store = Store(backend, settings)
    tasks.use_store(store)
    yield store
    tasks.use_store(None)


def command(kind: str, session_id: str = "s", **fields: Any) -> dict[str, Any]:
    """The keyword arguments of a well-formed message for `kind`."""
    request_id = fields.pop("request_id", uuid.uuid4().hex)
    reply_session = session_id
    if kind == "create":
        document = fields.setdefault("document", {})
        reply_session = document.get("session_id") or derived_session_id(PROJECT, request_id)
    else:
        fields["session_id"] = session_id
    return {
        "request_id": request_id,
        "project_id": PROJECT,
        "reply_to": KEYS.reply(PROJECT, reply_session, request_id),
        **fields,
    }


def run(kind: str, fields: dict[str, Any], *args: Any) -> Reply | None:
    """Call the task body directly, then pop the reply it pushed (None when none)."""
    assert tasks.TASKS[kind](*args, **fields) is None  # tasks return nothing
    reply_to = fields.get("reply_to")
    if not isinstance(reply_to, str):
        return None
    raw = cast("bytes | None", tasks.get_store().client.lpop(reply_to))
    return None if raw is None else Reply.model_validate_json(raw)


def reply_keys(store: Store) -> list[bytes]:
    return [k for k in cast("list[bytes]", store.client.keys("*")) if b":reply:" in k]


def new_session(jobs: tuple[str, ...] = ("j0",), **document: Any) -> None:
    doc = {"session_id": "s", "hold_off": 3600, "jobs": {j: {} for j in jobs}} | document
    reply = run("create", command("create", document=doc))
    assert reply is not None and reply.ok, reply


# The app ----------------------------------------------------------------------------------


def test_every_command_kind_has_an_explicitly_named_task() -> None:
    assert set(tasks.TASKS) == set(COMMAND_MODELS)
    for kind, task in tasks.TASKS.items():
        assert task.name == f"session_worker.{kind}" == task_name(kind)
        assert task.name in app.tasks
        assert task.ignore_result


def test_the_app_is_json_only_late_acking_and_resultless() -> None:
    conf = app.conf
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result
    assert conf.result_backend is None
    assert conf.broker_connection_retry_on_startup
    assert conf.broker_connection_max_retries is None
    assert conf.worker_hijack_root_logger is False
    assert conf.worker_send_task_events


def test_the_app_is_configured_from_settings() -> None:
    settings = Settings(
        redis_url="redis://redis.example:6380/2", queue="nodes.eu", visibility_timeout=42
    )
    custom = make_app(settings)
    try:
        assert custom.conf.broker_url == "redis://redis.example:6380/2"
        assert custom.conf.task_default_queue == "nodes.eu"
        options = custom.conf.broker_transport_options
        assert options["visibility_timeout"] == 42
        assert options["unacked_restore_interval"] == 10.0  # min(10, 42 / 3)
        assert options["unacked_restore_throttle"] == 1
        assert options["unacked_mutex_expire"] == 30  # a stale restore lock: 30 s, not 300
        for kind in COMMAND_MODELS:
            route = custom.amqp.router.route({}, task_name(kind))
            assert route["queue"].name == "nodes.eu"
        assert custom.session_worker_settings is settings
    finally:
        custom.close()


def test_a_short_visibility_timeout_is_swept_often() -> None:
    custom = make_app(Settings(visibility_timeout=3))
    try:
        assert custom.conf.broker_transport_options["unacked_restore_interval"] == 1.0
    finally:
        custom.close()


# Applying commands ------------------------------------------------------------------------


def test_a_command_is_applied_and_its_reply_pushed(store: Store) -> None:
    new_session(hold_off=0)

    reply = run("start", command("start", job_id="j0", current_tag=0))

    assert reply is not None
    assert (reply.ok, reply.result, reply.session_tag) == (True, "success", 1)
    doc = store.get(PROJECT, "s")
    assert doc is not None and doc["session_tag"] == 1


def test_every_kind_runs_through_its_task(store: Store) -> None:
    created = run("create", command("create", document={"hold_off": 5}))
    assert created is not None and created.ok
    sid = created.session_id
    steps: list[tuple[str, dict[str, Any]]] = [
        ("add_job", {"job_id": "j1", "client_id": "c1"}),
        ("start", {"job_id": "j1", "current_tag": 0}),
        ("end", {"job_id": "j1", "result": "success"}),
        ("update", {"patch": {"description": "d"}}),
        ("replace", {"document": {"description": "r", "jobs": {"j1": {}}}}),
        ("remove_job", {"job_id": "j1"}),
        ("delete", {}),
    ]
    for kind, fields in steps:
        reply = run(kind, command(kind, session_id=sid, **fields))
        assert reply is not None and reply.ok, (kind, reply)
    assert store.get(PROJECT, sid) is None


def test_a_repeated_request_is_answered_from_its_record(store: Store) -> None:
    new_session(hold_off=0)
    fields = command("start", job_id="j0", current_tag=0)

    first = run("start", fields)
    doc = store.get(PROJECT, "s")
    again = run("start", fields)

    assert again is not None and again.as_stored() == first
    assert store.get(PROJECT, "s") == doc


BAD: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "missing job_id": ("start", {"current_tag": 0}, "bad_request", "job_id: Field required"),
    "string tag": ("start", {"job_id": "j0", "current_tag": "1"}, "bad_request", "current_tag"),
    "bool tag": ("start", {"job_id": "j0", "current_tag": True}, "bad_request", "current_tag"),
    "negative tag": ("start", {"job_id": "j0", "current_tag": -1}, "bad_request", "current_tag"),
    "unknown field": (
        "start",
        {"job_id": "j0", "current_tag": 0, "when": "now"},
        "bad_request",
        "when: Extra inputs are not permitted",
    ),
    "bad id": ("start", {"job_id": "j 0", "current_tag": 0}, "bad_request", "job_id"),
    "bad result": ("end", {"job_id": "j0", "result": "ok"}, "bad_request", "result"),
    "tag too high": ("start", {"job_id": "j0", "current_tag": 3}, "bad_request", "tag too high"),
    "bad client id": ("add_job", {"job_id": "j9", "client_id": "?"}, "bad_request", "client_id"),
    "job not in session": (
        "start",
        {"job_id": "j9", "current_tag": 0},
        "bad_request",
        "not in session",
    ),
    "nested document field": (
        "update",
        {"patch": {"schedule": {"schedule_interval": "sometimes"}}},
        "bad_request",
        "patch.schedule.schedule_interval",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_invalid_command_is_answered_never_raised(case: str, store: Store) -> None:
    new_session()
    before = store.get(PROJECT, "s")
    kind, fields, code, text = BAD[case]

    reply = run(kind, command(kind, **fields))

    assert reply is not None and reply.error is not None
    assert (reply.ok, reply.error.code) == (False, code)
    assert text in reply.error.description
    assert store.get(PROJECT, "s") == before


def test_an_unknown_session_is_not_found(store: Store) -> None:
    reply = run("start", command("start", session_id="ghost", job_id="j0", current_tag=0))
    assert reply is not None and reply.error is not None
    assert reply.error.code == "not_found"


def test_positional_arguments_are_refused(store: Store) -> None:
    new_session()
    fields = command("start", job_id="j0", current_tag=0)
    reply = run("start", fields, "s", "j0")
    assert reply is not None and reply.error is not None
    assert "keyword arguments only" in reply.error.description


def test_the_error_reply_of_a_garbled_command_takes_its_ids_from_the_reply_key(
    store: Store,
) -> None:
    key = KEYS.reply(PROJECT, "s", "r1")
    reply = run("start", {"reply_to": key, "request_id": 5, "current_tag": "x"})
    assert reply is not None and reply.error is not None
    assert (reply.request_id, reply.session_id) == ("r1", "s")
    for name in ("request_id", "project_id", "session_id", "job_id", "current_tag"):
        assert name in reply.error.description


@pytest.mark.parametrize(
    "reply_to",
    [
        None,
        7,
        "",
        "nope",
        "other:{acme:s}:reply:r",
        "sw:{acme:s}:reply:r:extra",
        "sw:{a b:s}:reply:r",
    ],
)
def test_a_command_without_a_usable_reply_key_is_logged_and_dropped(
    reply_to: Any, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    new_session()
    before = store.get(PROJECT, "s")
    fields = command("start", job_id=5, current_tag=0) | {"reply_to": reply_to}

    with caplog.at_level(logging.INFO, logger="session_worker.tasks"):
        assert run("start", fields) is None

    assert "dropped a command without its own reply_to" in caplog.text
    assert reply_keys(store) == []
    assert store.get(PROJECT, "s") == before


@pytest.mark.parametrize(
    "elsewhere",
    [
        KEYS.reply(PROJECT, "s", "someone-else"),  # another request of the session
        KEYS.reply(PROJECT, "other", "r-own"),  # another session
        KEYS.reply("victim", "s", "r-own"),  # another project
    ],
)
def test_a_reply_to_that_is_not_the_commands_own_gets_nothing(
    store: Store, elsewhere: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the command nor its refusal is written anywhere but the command's own reply
    list: a forged reply_to cannot put an answer in front of another caller."""
    new_session()
    before = store.get(PROJECT, "s")
    valid = command("start", job_id="j0", current_tag=0, request_id="r-own")
    invalid = command("start", job_id="j0", current_tag="zero", request_id="r-own")
    unknown = command("start", job_id="j0", current_tag=0, request_id="r-own")

    with caplog.at_level(logging.WARNING, logger="session_worker.tasks"):
        tasks.start(**(valid | {"reply_to": elsewhere}))
        tasks.start(**(invalid | {"reply_to": elsewhere}))
        # (how a message for an unknown session_worker.* task is answered)
        tasks.refuse(store, elsewhere, unknown, "bad_request", "unknown task")

    assert reply_keys(store) == []
    assert caplog.text.count("dropped a command without its own reply_to") == 3
    assert store.get(PROJECT, "s") == before


def test_a_command_without_reply_to_is_applied_silently(store: Store) -> None:
    new_session(hold_off=0)
    fields = command("start", job_id="j0", current_tag=0)
    del fields["reply_to"]

    assert tasks.start(**fields) is None

    assert reply_keys(store) == []
    assert store.get(PROJECT, "s")["session_tag"] == 1  # type: ignore[index]


def test_a_script_error_is_answered_not_retried(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    new_session()
    store.client.hset(KEYS.session(PROJECT, "s").jobs, "j0", "{not json")

    with caplog.at_level(logging.ERROR, logger="session_worker.tasks"):
        reply = run("start", command("start", job_id="j0", current_tag=0))

    assert reply is not None and reply.error is not None
    assert reply.error.code == "error"
    assert "could not apply start" in reply.error.description
    assert "failed" in caplog.text


def test_every_command_is_logged_on_one_line(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    new_session(hold_off=0)
    with caplog.at_level(logging.INFO, logger="session_worker.tasks"):
        run("start", command("start", job_id="j0", current_tag=0, request_id="req-7"))
        run("start", command("start", session_id="ghost", job_id="j0", current_tag=0))

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kind=")]
    assert len(lines) == 2
    assert lines[0].startswith(
        "kind=start session=s job=j0 outcome=success tag=1 request=req-7 latency_ms="
    )
    assert "session=ghost job=j0 outcome=error:not_found tag=-" in lines[1]


# Redis unavailable ------------------------------------------------------------------------


@pytest.fixture
def unreachable(settings: Settings) -> Iterator[Store]:
    """A Store whose Redis refuses connections (nothing listens on the port)."""
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    store = Store(client, settings)
    tasks.use_store(store)
    yield store
    tasks.use_store(None)
    client.close()


def test_redis_unreachable_makes_the_task_retry(unreachable: Store) -> None:
    # Called directly, Celery's retry re-raises the error; in a worker it schedules a retry.
    with pytest.raises(RedisConnectionError):
        tasks.start(**command("start", job_id="j0", current_tag=0))


def test_the_task_gives_up_after_its_last_retry(
    unreachable: Store, caplog: pytest.LogCaptureFixture
) -> None:
    tasks.start.push_request(retries=tasks.MAX_RETRIES)
    try:
        with caplog.at_level(logging.ERROR, logger="session_worker.tasks"):
            tasks.start.run(**command("start", job_id="j0", current_tag=0))
    finally:
        tasks.start.pop_request()
    assert f"gave up after {tasks.MAX_RETRIES} retries" in caplog.text


def test_each_process_builds_its_store_once(settings: Settings) -> None:
    tasks.use_store(None)
    try:
        first = tasks.get_store(settings)
        assert tasks.get_store(settings) is first
        assert first.settings is settings
    finally:
        tasks.use_store(None)


# The reply channel (replies.py) -----------------------------------------------------------


def test_parse_reply_key() -> None:
    key = KEYS.reply("acme", "db-1", "f00d")
    parsed = parse_reply_key("sw", key)
    assert parsed is not None
    assert (parsed.project_id, parsed.session_id, parsed.request_id) == ("acme", "db-1", "f00d")
    assert parse_reply_key("other", key) is None
    for bad in (None, 3, "", key + "\n", key + ":x", "sw:{acme:db-1}:meta", "sw:{acme}:reply:x"):
        assert parse_reply_key("sw", bad) is None


def test_a_pushed_reply_waits_with_a_ttl_for_its_caller(backend: redis.Redis) -> None:
    key = KEYS.reply(PROJECT, "s", "r1")
    reply = Reply(request_id="r1", session_id="s", ok=True, result="hold-off", session_tag=4)

    push_reply(backend, key, reply, ttl=30)

    assert 0 < backend.ttl(key) <= 30
    assert wait_reply(backend, key, 1.0) == reply
    assert not backend.exists(key)


def test_waiting_in_vain_raises_reply_timeout(backend: redis.Redis) -> None:
    key = KEYS.reply(PROJECT, "s", "r-lost")
    started = time.monotonic()
    with pytest.raises(ReplyTimeout) as caught:
        wait_reply(backend, key, 0.3, max_block=0.1)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0
    assert "r-lost" in str(caught.value) and "0.3 s" in str(caught.value)
    assert "workers" in str(caught.value)


def test_a_zero_timeout_checks_once(backend: redis.Redis) -> None:
    key = KEYS.reply(PROJECT, "s", "r0")
    with pytest.raises(ReplyTimeout):
        wait_reply(backend, key, 0)
    push_reply(backend, key, Reply(request_id="r0", ok=True), ttl=5)
    assert wait_reply(backend, key, 0).request_id == "r0"


@pytest.mark.parametrize("backend_name", ["redis", "valkey"])
def test_a_waiting_caller_gets_a_reply_pushed_while_it_waits(backend: redis.Redis) -> None:
    key = KEYS.reply(PROJECT, "s", "r2")
    reply = Reply(request_id="r2", ok=True, result="success", session_tag=1)
    pusher = threading.Timer(0.2, push_reply, args=(backend, key, reply, 5))
    pusher.start()
    try:
        assert wait_reply(backend, key, 5.0, max_block=0.05) == reply
    finally:
        pusher.join()
