"""The reply list a caller waits on, as the scripts fill it (on every backend)."""

from __future__ import annotations

import uuid

import redis

from session_worker.keys import KeyBuilder
from session_worker.models import (
    AddJobCommand,
    CreateCommand,
    Reply,
    SessionFields,
    StartCommand,
)
from session_worker.replies import wait_reply
from session_worker.settings import Settings
from session_worker.store import Store

PROJECT = "proj"


def test_a_refused_request_id_reuse_leaves_the_first_reply_in_front(backend: redis.Redis) -> None:
    store = Store(backend, Settings())
    rid = uuid.uuid4().hex
    reply_key = KeyBuilder().reply(PROJECT, "s", rid)
    store.create(
        CreateCommand(
            request_id=uuid.uuid4().hex, project_id=PROJECT, document=SessionFields(session_id="s")
        )
    )
    first = store.add_job(
        AddJobCommand(
            request_id=rid, reply_to=reply_key, project_id=PROJECT, session_id="s", job_id="a"
        )
    )
    reused = store.start(
        StartCommand(
            request_id=rid,
            reply_to=reply_key,
            project_id=PROJECT,
            session_id="s",
            job_id="a",
            current_tag=0,
        )
    )
    assert first.ok
    assert reused.error is not None and reused.error.code == "idempotency_mismatch"
    waiting = backend.lrange(reply_key, 0, -1)
    assert len(waiting) == 2
    assert Reply.model_validate_json(waiting[0]) == first
    assert Reply.model_validate_json(waiting[1]) == reused


def test_a_repeated_command_leaves_one_reply_to_read(backend: redis.Redis) -> None:
    store = Store(backend, Settings())
    rid = uuid.uuid4().hex
    reply_key = KeyBuilder().reply(PROJECT, "s", rid)
    store.create(
        CreateCommand(
            request_id=uuid.uuid4().hex, project_id=PROJECT, document=SessionFields(session_id="s")
        )
    )
    cmd = AddJobCommand(
        request_id=rid, reply_to=reply_key, project_id=PROJECT, session_id="s", job_id="a"
    )
    first = store.add_job(cmd)
    again = store.add_job(cmd)
    assert again.repeated is True and again.as_stored() == first
    assert backend.llen(reply_key) == 1
    assert 0 < backend.ttl(reply_key) <= Settings().reply_ttl


def test_a_waiting_caller_skips_what_is_not_its_reply(backend: redis.Redis) -> None:
    """Only someone writing to Redis directly can put anything else on a reply list; the
    caller skips it and takes its own reply."""
    rid = uuid.uuid4().hex
    reply_key = KeyBuilder().reply(PROJECT, "s", rid)
    forged = Reply.failure("someone-else", "s", "bad_request", "not yours")
    own = Reply.failure(rid, "s", "not_found", "session s does not exist")
    backend.rpush(reply_key, b"{not json", forged.model_dump_json(), own.model_dump_json())
    assert wait_reply(backend, reply_key, timeout=1.0) == own
    assert backend.llen(reply_key) == 0
