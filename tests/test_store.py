"""Store over the scripts: every reply code of every command, request-id de-duplication, job
moves, delete, list, empty objects, integer bounds and the cost of start/end on a big session.

Each test body runs on real Redis 7, Valkey 8, fakeredis and a 3-master Redis Cluster (the
`backend` fixture).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
import pytest
import redis
from clock import T0, Clock
from redis.client import Monitor, PubSub
from redis.cluster import RedisCluster

from session_worker import store as store_module
from session_worker.keys import events_channel
from session_worker.models import (
    MAX_INT,
    AddJobCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    EndCommand,
    JobEntry,
    JobRecord,
    RemoveJobCommand,
    ReplaceCommand,
    Reply,
    Schedule,
    SessionFields,
    StartCommand,
    UpdateCommand,
    scalar_defaults,
)
from session_worker.settings import Settings
from session_worker.store import Store, derived_session_id

PROJECT = "proj"
CLUSTER_BACKENDS = ("redis", "valkey", "fakeredis", "cluster")
HOLD_OFF = 30


def new_id() -> str:
    return uuid.uuid4().hex


def create_cmd(
    session_id: str | None, *jobs: str, request_id: str = "", **fields: Any
) -> CreateCommand:
    document = SessionFields(
        session_id=session_id, jobs={job: JobEntry() for job in jobs}, **fields
    )
    return CreateCommand(request_id=request_id or new_id(), project_id=PROJECT, document=document)


def start_cmd(session_id: str, job: str, tag: int, request_id: str = "") -> StartCommand:
    return StartCommand(
        request_id=request_id or new_id(),
        project_id=PROJECT,
        session_id=session_id,
        job_id=job,
        current_tag=tag,
    )


def end_cmd(session_id: str, job: str, result: str = "success") -> EndCommand:
    return EndCommand.model_validate(
        {
            "request_id": new_id(),
            "project_id": PROJECT,
            "session_id": session_id,
            "job_id": job,
            "result": result,
        }
    )


def add_cmd(session_id: str, job: str, request_id: str = "") -> AddJobCommand:
    return AddJobCommand(
        request_id=request_id or new_id(), project_id=PROJECT, session_id=session_id, job_id=job
    )


def remove_cmd(session_id: str, job: str) -> RemoveJobCommand:
    return RemoveJobCommand(
        request_id=new_id(), project_id=PROJECT, session_id=session_id, job_id=job
    )


def update_cmd(session_id: str, request_id: str = "", **fields: Any) -> UpdateCommand:
    return UpdateCommand(
        request_id=request_id or new_id(),
        project_id=PROJECT,
        session_id=session_id,
        patch=SessionFields(**fields),
    )


def delete_cmd(session_id: str, request_id: str = "") -> DeleteCommand:
    return DeleteCommand(
        request_id=request_id or new_id(), project_id=PROJECT, session_id=session_id
    )


def error_of(reply: Reply) -> str:
    assert not reply.ok
    assert reply.error is not None
    return reply.error.code


@pytest.fixture(params=CLUSTER_BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Redis 7, Valkey 8, fakeredis and a 3-master Redis Cluster (conftest.py)."""
    name: str = request.param
    return name


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(backend: redis.Redis, clock: Clock) -> Store:
    return Store(backend, Settings(default_hold_off=HOLD_OFF, history_limit=3), clock=clock)


@pytest.fixture
def s1(store: Store) -> str:
    """Session s1 with jobs a, b, c; a started run 1."""
    store.create(create_cmd("s1", "a", "b", "c")).raise_for_error()
    store.start(start_cmd("s1", "a", 0)).raise_for_error()
    return "s1"


def version(store: Store, session_id: str) -> int:
    doc = store.get(PROJECT, session_id)
    assert doc is not None
    value: int = doc["_version"]
    return value


def slot_keys(backend: redis.Redis, session_id: str) -> set[str]:
    pattern = f"sw:{{{PROJECT}:{session_id}}}:*"
    if isinstance(backend, RedisCluster):  # KEYS answers for one node: ask the slot's own
        found = backend.keys(pattern, target_nodes=backend.get_node_from_key(pattern))
    else:
        found = backend.keys(pattern)
    return {k.decode() for k in cast(list[bytes], found)}


class Events:
    """Counts the events published on one session's channel."""

    def __init__(self, client: redis.Redis, session_id: str) -> None:
        self.pubsub: PubSub = client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(events_channel(PROJECT, session_id))
        assert self.pubsub.get_message(timeout=5) is not None  # the subscribe confirmation

    def drain(self) -> list[dict[str, Any]]:
        events = []
        while (message := self.pubsub.get_message(timeout=0.1)) is not None:
            if message["type"] == "message":
                events.append(orjson.loads(message["data"]))
        return events


@pytest.fixture
def events(backend: redis.Redis) -> Iterator[Callable[[str], Events]]:
    opened: list[Events] = []

    def listen(session_id: str) -> Events:
        opened.append(Events(backend, session_id))
        return opened[-1]

    yield listen
    for e in opened:
        e.pubsub.close()


# request-id de-duplication, for every command -------------------------------------------------

# kind -> (the command, another command under the same request id). The session s1 exists.
Pair = tuple[Command, Command]


def _pairs(rid: str) -> dict[str, Pair]:
    replace_doc = SessionFields(jobs={"a": JobEntry(), "b": JobEntry()}, description="r")
    return {
        "start": (start_cmd("s1", "b", 0, rid), start_cmd("s1", "b", 1, rid)),
        "end": (
            EndCommand(
                request_id=rid, project_id=PROJECT, session_id="s1", job_id="a", result="success"
            ),
            EndCommand(
                request_id=rid, project_id=PROJECT, session_id="s1", job_id="a", result="fail"
            ),
        ),
        "add_job": (add_cmd("s1", "x", rid), add_cmd("s1", "y", rid)),
        "remove_job": (
            RemoveJobCommand(request_id=rid, project_id=PROJECT, session_id="s1", job_id="b"),
            RemoveJobCommand(request_id=rid, project_id=PROJECT, session_id="s1", job_id="c"),
        ),
        "create": (
            create_cmd("s1", "a", request_id=rid, description="one"),
            create_cmd("s1", "a", request_id=rid, description="two"),
        ),
        "replace": (
            ReplaceCommand(
                request_id=rid, project_id=PROJECT, session_id="s1", document=replace_doc
            ),
            ReplaceCommand(
                request_id=rid,
                project_id=PROJECT,
                session_id="s1",
                document=replace_doc.model_copy(update={"description": "other"}),
            ),
        ),
        "update": (
            update_cmd("s1", rid, description="one"),
            update_cmd("s1", rid, description="two"),
        ),
        "delete": (delete_cmd("s1", rid), update_cmd("s1", rid, description="after")),
    }


KINDS = ("start", "end", "add_job", "remove_job", "create", "replace", "update", "delete")


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeated_request_gets_the_same_reply_and_no_second_effect(
    kind: str,
    store: Store,
    s1: str,
    backend: redis.Redis,
    events: Callable[[str], Events],
) -> None:
    rid = new_id()
    first_cmd, other_cmd = _pairs(rid)[kind]
    listener = events(s1)
    first = store.apply(kind, first_cmd)
    assert first.request_id == rid
    assert listener.drain() or kind == "create"  # create on s1 is a (stored) conflict
    state = {k: backend.dump(k) for k in slot_keys(backend, s1)}

    again = store.apply(kind, first_cmd)
    assert (again.repeated, again.gone) == (True, True if kind == "delete" else None)
    assert again.as_stored() == first
    assert listener.drain() == []
    assert {k: backend.dump(k) for k in slot_keys(backend, s1)} == state

    mismatch = store.apply(kind, other_cmd)
    assert error_of(mismatch) == "idempotency_mismatch"
    assert mismatch.error is not None and rid in mismatch.error.description
    assert listener.drain() == []
    assert {k: backend.dump(k) for k in slot_keys(backend, s1)} == state
    # The refusal was not stored: the first command still gets its first reply.
    assert store.apply(kind, first_cmd).as_stored() == first


def test_a_repeated_request_pushes_its_reply_again(store: Store, s1: str) -> None:
    rid = new_id()
    reply_key = store.keys.reply(PROJECT, s1, rid)
    cmd = start_cmd(s1, "b", 0, rid).model_copy(update={"reply_to": reply_key})
    first = store.start(cmd)
    pushed = store.client.lrange(reply_key, 0, -1)
    assert len(pushed) == 1 and Reply.model_validate_json(pushed[0]) == first
    store.client.delete(reply_key)
    assert store.start(cmd).as_stored() == first
    pushed = store.client.lrange(reply_key, 0, -1)
    assert len(pushed) == 1 and Reply.model_validate_json(pushed[0]) == first
    ttl = store.client.ttl(reply_key)
    assert 0 < ttl <= store.settings.reply_ttl


def test_a_reply_is_pushed_only_when_reply_to_is_set(store: Store, s1: str) -> None:
    rid = new_id()
    store.start(start_cmd(s1, "b", 0, rid))
    assert store.client.exists(store.keys.reply(PROJECT, s1, rid)) == 0


def test_a_reply_to_other_than_the_requests_reply_key_is_refused(store: Store, s1: str) -> None:
    before = version(store, s1)
    cmd = start_cmd(s1, "b", 0).model_copy(update={"reply_to": "somewhere:else"})
    reply = store.start(cmd)
    assert error_of(reply) == "bad_request"
    assert version(store, s1) == before


def test_error_replies_are_remembered_but_not_found_is_not(store: Store, s1: str) -> None:
    rid = new_id()
    assert error_of(store.start(start_cmd(s1, "nope", 0, rid))) == "bad_request"
    store.add_job(add_cmd(s1, "nope")).raise_for_error()
    # The same request again: its stored bad_request, not a start of the job now present.
    assert error_of(store.start(start_cmd(s1, "nope", 0, rid))) == "bad_request"
    rid = new_id()
    assert error_of(store.add_job(add_cmd("s2", "x", rid))) == "not_found"
    store.create(create_cmd("s2")).raise_for_error()
    assert store.add_job(add_cmd("s2", "x", rid)).added is True


def test_request_records_expire_after_their_ttl(backend: redis.Redis, clock: Clock) -> None:
    store = Store(backend, Settings(request_ttl=60), clock=clock)
    store.create(create_cmd("s1", "a")).raise_for_error()
    rid = new_id()
    first = store.add_job(add_cmd("s1", "x", rid))
    record = store.keys.request(PROJECT, "s1", rid)
    assert backend.exists(record)
    assert 55 <= backend.ttl(record) <= 60  # Redis forgets it by itself (real time)
    backend.delete(record)  # as if those 60 s had passed
    again = store.add_job(add_cmd("s1", "x", rid))
    assert first.added is True
    assert (again.ok, again.added, again.repeated) == (True, False, None)  # run afresh


# reply codes, command by command --------------------------------------------------------------


def test_add_job(store: Store, s1: str) -> None:
    before = version(store, s1)
    reply = store.add_job(add_cmd(s1, "d"))
    assert (reply.ok, reply.result, reply.added, reply.job_id) == (True, "success", True, "d")
    assert (reply.session_tag, reply.version) == (1, before + 1)
    assert reply.job_schedule == {}
    again = store.add_job(add_cmd(s1, "d"))
    assert (again.ok, again.added, again.version) == (True, False, before + 1)
    assert error_of(store.add_job(add_cmd("missing", "d"))) == "not_found"
    record = store.job_record(PROJECT, "d")
    assert record == JobRecord(session_id=s1, session_tag=1, job_schedule={})


def test_add_job_returns_the_sessions_schedule_for_the_jobs_record(store: Store) -> None:
    schedule = Schedule(schedule_date="2030-01-01T10:00:00", schedule_interval="1 days")
    store.create(
        CreateCommand(
            request_id=new_id(),
            project_id=PROJECT,
            document=SessionFields(session_id="s", schedule=schedule),
        )
    ).raise_for_error()
    reply = store.add_job(add_cmd("s", "a"))
    expected = schedule.model_dump(exclude_none=True)
    assert reply.job_schedule == expected
    assert store.job_record(PROJECT, "a") == JobRecord(
        session_id="s", session_tag=0, job_schedule=expected
    )
    assert store.get(PROJECT, "s")["schedule"] == expected  # type: ignore[index]


def test_remove_job(store: Store, s1: str) -> None:
    before = version(store, s1)
    reply = store.remove_job(remove_cmd(s1, "b"))
    assert (reply.ok, reply.result, reply.removed, reply.version) == (
        True,
        "success",
        True,
        before + 1,
    )
    assert store.job_record(PROJECT, "b") == JobRecord(
        session_id="", session_tag=0, job_schedule={"event": "stop"}
    )
    again = store.remove_job(remove_cmd(s1, "b"))
    assert (again.ok, again.removed, again.version) == (True, False, before + 1)
    assert error_of(store.remove_job(remove_cmd("missing", "b"))) == "not_found"


def test_create(store: Store, clock: Clock) -> None:
    rid = new_id()
    reply = store.create(create_cmd("s", "a", request_id=rid, hold_off=5, description="d"))
    assert (reply.ok, reply.result, reply.session_id, reply.version) == (True, "success", "s", 1)
    assert (reply.session_tag, reply.created_at, reply.deadline) == (0, T0, None)
    doc = store.get(PROJECT, "s")
    assert doc is not None
    assert doc == {
        "session_id": "s",
        "project_id": PROJECT,
        "user_id": "",
        "description": "d",
        "hold_off": 5,
        "session_tag": 0,
        "schedule": {},
        "time_start": -1,
        "time_end": -1,
        "time_started": -1,
        "time_ended": -1,
        "status": "",
        "result": "",
        "run_timeout": 0,
        "_version": 1,
        "jobs": {
            "a": {
                "client_id": "",
                "status": "scheduled",
                "result": "",
                "time_started": -1,
                "time_ended": -1,
                "member": False,
            }
        },
    }
    assert store.job_record(PROJECT, "a") == JobRecord(
        session_id="s", session_tag=0, job_schedule={}
    )
    conflict = store.create(create_cmd("s"))
    assert error_of(conflict) == "conflict"
    assert version(store, "s") == 1


def test_create_defaults_hold_off_and_user(store: Store) -> None:
    cmd = create_cmd("s").model_copy(update={"user_id": "alice"})
    store.create(cmd).raise_for_error()
    doc = store.get(PROJECT, "s")
    assert doc is not None and (doc["hold_off"], doc["user_id"]) == (HOLD_OFF, "alice")


def test_create_without_an_id_derives_it_from_the_request(store: Store) -> None:
    rid = new_id()
    first = store.create(create_cmd(None, request_id=rid))
    assert first.ok and first.session_id == derived_session_id(PROJECT, rid)
    again = store.create(create_cmd(None, request_id=rid))
    assert again.as_stored() == first
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == [first.session_id]


def test_replace_creates_then_overwrites_and_keeps_history(store: Store, s1: str) -> None:
    missing = store.replace(
        ReplaceCommand(
            request_id=new_id(),
            project_id=PROJECT,
            session_id="s2",
            document=SessionFields(description="new"),
        )
    )
    assert (missing.ok, missing.created, missing.version, missing.detached) == (True, True, 1, [])
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == ["s1", "s2"]

    before = version(store, s1)
    reply = store.replace(
        ReplaceCommand(
            request_id=new_id(),
            project_id=PROJECT,
            session_id=s1,
            document=SessionFields(
                session_tag=1, jobs={"a": JobEntry(), "d": JobEntry()}, description="replaced"
            ),
        )
    )
    assert (reply.ok, reply.created, reply.version) == (True, False, before + 1)
    assert sorted(reply.detached or []) == ["b", "c"]
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert (doc["description"], sorted(doc["jobs"])) == ("replaced", ["a", "d"])
    for job in ("b", "c"):
        assert store.job_record(PROJECT, job) == JobRecord(
            session_id="", session_tag=0, job_schedule={"event": "stop"}
        )
    assert store.job_record(PROJECT, "d") == JobRecord(
        session_id=s1, session_tag=1, job_schedule={}
    )
    runs = store.runs(PROJECT, s1)
    assert runs is not None and [r["session_tag"] for r in runs] == [1]


def test_update(store: Store, s1: str) -> None:
    before = version(store, s1)
    reply = store.update(
        update_cmd(
            s1, description="patched", jobs={"a": JobEntry(client_id="node-1"), "d": JobEntry()}
        )
    )
    assert (reply.ok, reply.result, reply.version) == (True, "success", before + 1)
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert doc["description"] == "patched"
    assert doc["hold_off"] == HOLD_OFF  # untouched fields kept
    assert (doc["jobs"]["a"]["client_id"], doc["jobs"]["a"]["status"]) == ("node-1", "running")
    assert (doc["jobs"]["d"]["status"], doc["jobs"]["d"]["member"]) == ("scheduled", False)
    assert store.job_record(PROJECT, "d") == JobRecord(
        session_id=s1, session_tag=1, job_schedule={}
    )
    assert error_of(store.update(update_cmd("missing", description="x"))) == "not_found"


def test_update_of_job_results_can_complete_the_run(store: Store, s1: str) -> None:
    done = JobEntry(status="completed", result="success")
    store.update(update_cmd(s1, jobs={"b": done, "c": done})).raise_for_error()
    assert store.get(PROJECT, s1)["status"] == "running"  # type: ignore[index]
    store.update(update_cmd(s1, jobs={"a": done})).raise_for_error()
    doc = store.get(PROJECT, s1)
    assert doc is not None and (doc["status"], doc["result"]) == ("completed", "success")
    # The run's history entry shows the states the patch wrote (SPEC §4: updated with every
    # change), not the members as never started.
    runs = store.runs(PROJECT, s1, 1)
    assert runs is not None
    assert (runs[0]["status"], runs[0]["result"]) == ("completed", "success")
    assert {job: (e["status"], e["result"]) for job, e in runs[0]["jobs"].items()} == {
        job: ("completed", "success") for job in ("a", "b", "c")
    }


def test_a_created_running_session_shows_its_jobs_in_the_run_history(store: Store) -> None:
    jobs = {
        "a": JobEntry(status="completed", result="success", time_started=T0, time_ended=T0),
        "b": JobEntry(status="running", time_started=T0),
    }
    document = SessionFields(
        session_id="s", session_tag=2, status="running", time_start=T0, jobs=jobs
    )
    store.create(
        CreateCommand(request_id=new_id(), project_id=PROJECT, document=document)
    ).raise_for_error()
    runs = store.runs(PROJECT, "s", 2)
    assert runs is not None
    assert {job: (e["status"], e["result"]) for job, e in runs[0]["jobs"].items()} == {
        "a": ("completed", "success"),
        "b": ("running", ""),
    }
    store.end(end_cmd("s", "b")).raise_for_error()
    runs = store.runs(PROJECT, "s", 2)
    assert runs is not None and (runs[0]["status"], runs[0]["result"]) == ("completed", "success")


def test_update_sets_a_run_deadline(store: Store, s1: str, clock: Clock) -> None:
    reply = store.update(update_cmd(s1, run_timeout=10))
    assert reply.deadline == T0 + 10
    assert store.client.zscore(store.keys.deadlines(), f"{PROJECT}:{s1}") == T0 + 10
    clock.now += 10
    assert store.sweep_deadlines() == 1
    assert store.get(PROJECT, s1)["result"] == "fail"  # type: ignore[index]


def test_delete(store: Store, s1: str, backend: redis.Redis) -> None:
    store.update(update_cmd(s1, run_timeout=100)).raise_for_error()
    rid = new_id()
    reply = store.delete(delete_cmd(s1, rid))
    assert (reply.ok, reply.result) == (True, "success")
    assert sorted(reply.detached or []) == ["a", "b", "c"]
    assert store.get(PROJECT, s1) is None
    assert store.runs(PROJECT, s1) is None
    for job in ("a", "b", "c"):
        assert store.job_record(PROJECT, job) == JobRecord(
            session_id="", session_tag=0, job_schedule={"event": "stop"}
        )
    assert store.list_sessions(PROJECT) == []
    assert backend.zcard(store.keys.project_index(PROJECT)) == 0
    assert backend.zcard(store.keys.deadlines()) == 0
    # Only the request records are left (create, start, update, delete), until their TTL.
    left = slot_keys(backend, s1)
    assert store.keys.request(PROJECT, s1, rid) in left and len(left) == 4
    assert all(":request:" in key for key in left)
    assert all(0 < backend.ttl(key) <= store.settings.request_ttl for key in left)
    again = store.delete(delete_cmd(s1, rid))
    assert (again.repeated, again.gone) == (True, True) and again.as_stored() == reply
    assert error_of(store.delete(delete_cmd(s1))) == "not_found"


def test_a_create_repeated_after_delete_does_not_bring_the_session_back(
    store: Store, backend: redis.Redis
) -> None:
    created_rid, start_rid = new_id(), new_id()
    created = store.create(create_cmd("s9", "a", "b", request_id=created_rid, run_timeout=60))
    started = store.start(start_cmd("s9", "a", 0, start_rid))
    assert created.ok and started.ok and started.deadline is not None
    store.delete(delete_cmd("s9")).raise_for_error()
    # A redelivered create (and start) after the delete: the first answers, nothing applied.
    create_again = store.create(create_cmd("s9", "a", "b", request_id=created_rid, run_timeout=60))
    start_again = store.start(start_cmd("s9", "a", 0, start_rid))
    assert create_again.gone is True and create_again.as_stored() == created
    assert start_again.gone is True and start_again.as_stored() == started
    assert store.get(PROJECT, "s9") is None
    assert store.list_sessions(PROJECT) == []
    assert backend.zcard(store.keys.project_index(PROJECT)) == 0
    assert backend.zcard(store.keys.deadlines()) == 0
    for job in ("a", "b"):
        record = store.job_record(PROJECT, job)
        assert record is not None and record.session_id == ""
    # A new create under the id (a new request) works, and a start on it is fresh.
    store.create(create_cmd("s9", "a")).raise_for_error()
    fresh = store.start(start_cmd("s9", "a", 0))
    assert (fresh.ok, fresh.result, fresh.session_tag, fresh.gone) == (True, "success", 1, None)


def test_a_session_created_again_after_delete_keeps_its_records(
    store: Store, s1: str, backend: redis.Redis
) -> None:
    rid = new_id()
    deleted = store.delete(delete_cmd(s1, rid))
    store.create(create_cmd(s1, "a")).raise_for_error()
    assert 0 < backend.ttl(store.keys.request(PROJECT, s1, rid)) <= store.settings.request_ttl
    again = store.delete(delete_cmd(s1, rid))  # still the first answer ...
    assert (again.repeated, again.gone) == (True, None) and again.as_stored() == deleted
    # ... and it leaves the new session's index entry and job records alone.
    assert store.get(PROJECT, s1) is not None
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == [s1]
    record = store.job_record(PROJECT, "a")
    assert record is not None and record.session_id == s1


def test_delete_leaves_a_moved_jobs_record_alone(store: Store, s1: str) -> None:
    store.create(create_cmd("s2")).raise_for_error()
    store.add_job(add_cmd("s2", "a")).raise_for_error()
    store.delete(delete_cmd(s1)).raise_for_error()
    record = store.job_record(PROJECT, "a")
    assert record is not None and record.session_id == "s2"


def test_reads_of_a_missing_session(store: Store) -> None:
    assert store.get(PROJECT, "missing") is None
    assert store.runs(PROJECT, "missing") is None
    assert store.job_record(PROJECT, "a") is None


# job moves --------------------------------------------------------------------------------------


def test_adding_a_job_to_another_session_moves_it(store: Store, s1: str) -> None:
    store.create(create_cmd("s2")).raise_for_error()
    rid = new_id()
    moved = store.add_job(add_cmd("s2", "b", rid))
    assert moved.added is True
    s1_doc = store.get(PROJECT, s1)
    assert s1_doc is not None and sorted(s1_doc["jobs"]) == ["a", "c"]
    assert store.job_record(PROJECT, "b") == JobRecord(
        session_id="s2", session_tag=0, job_schedule={}
    )
    # remove_job on the old session afterwards: nothing there, the record is left alone.
    reply = store.remove_job(remove_cmd(s1, "b"))
    assert (reply.ok, reply.removed) == (True, False)
    assert store.job_record(PROJECT, "b") == JobRecord(
        session_id="s2", session_tag=0, job_schedule={}
    )
    # A redelivered move answers as before and moves nothing.
    store.add_job(add_cmd(s1, "b")).raise_for_error()  # b goes back to s1 by a new request
    assert store.add_job(add_cmd("s2", "b", rid)).as_stored() == moved
    record = store.job_record(PROJECT, "b")
    assert record is not None and record.session_id == s1
    s2_doc = store.get(PROJECT, "s2")
    assert s2_doc is not None and s2_doc["jobs"] == {}


def test_moving_the_last_open_member_out_completes_the_old_run(store: Store, s1: str) -> None:
    store.end(end_cmd(s1, "a")).raise_for_error()
    store.end(end_cmd(s1, "b")).raise_for_error()
    store.create(create_cmd("s2")).raise_for_error()
    store.add_job(add_cmd("s2", "c")).raise_for_error()
    doc = store.get(PROJECT, s1)
    assert doc is not None and (doc["status"], doc["result"]) == ("completed", "success")


def test_create_with_a_job_of_another_session_moves_it(store: Store, s1: str) -> None:
    store.create(create_cmd("s2", "c")).raise_for_error()
    doc = store.get(PROJECT, s1)
    assert doc is not None and sorted(doc["jobs"]) == ["a", "b"]
    record = store.job_record(PROJECT, "c")
    assert record is not None and record.session_id == "s2"


# list --------------------------------------------------------------------------------------------


def test_list_is_ordered_by_creation_time_then_id(store: Store, clock: Clock) -> None:
    for now, session_id in ((T0 + 5, "m"), (T0, "z"), (T0, "b"), (T0 + 1, "a"), (T0, "c")):
        clock.now = now
        store.create(create_cmd(session_id, description="x" if session_id < "m" else "y"))
    ids = [d["session_id"] for d in store.list_sessions(PROJECT)]
    assert ids == ["b", "c", "z", "a", "m"]
    assert [d["session_id"] for d in store.list_sessions(PROJECT, limit=2, offset=1)] == [
        "c",
        "z",
    ]
    assert store.list_sessions(PROJECT, offset=5) == []
    assert [d["session_id"] for d in store.list_sessions(PROJECT, limit=1)] == ["b"]
    matched = store.list_sessions(PROJECT, match=[{"description": "x"}])
    assert [d["session_id"] for d in matched] == ["b", "c", "a"]
    both = store.list_sessions(PROJECT, match=[{"description": "x"}, {"hold_off": HOLD_OFF}])
    assert [d["session_id"] for d in both] == ["b", "c", "a"]
    assert store.list_sessions(PROJECT, match=[{"description": "x"}, {"hold_off": 1}]) == []
    rest = store.list_sessions(PROJECT, match_not=[{"description": "x"}, {"session_id": "m"}])
    assert [d["session_id"] for d in rest] == ["z"]
    page = store.list_sessions(PROJECT, match=[{"description": "x"}], limit=1, offset=1)
    assert [d["session_id"] for d in page] == ["c"]
    assert store.list_sessions("other") == []


# empty objects ---------------------------------------------------------------------------------


def test_empty_jobs_and_schedule_are_objects(store: Store) -> None:
    reply = store.create(create_cmd("s", status="running", session_tag=1, time_start=T0))
    assert reply.ok
    doc = store.get(PROJECT, "s")
    assert doc is not None
    assert doc["jobs"] == {} and isinstance(doc["jobs"], dict)
    assert doc["schedule"] == {} and isinstance(doc["schedule"], dict)
    runs = store.runs(PROJECT, "s")
    assert runs is not None and runs[0]["jobs"] == {} and isinstance(runs[0]["jobs"], dict)
    added = store.add_job(add_cmd("s", "a"))
    assert added.job_schedule == {} and isinstance(added.job_schedule, dict)
    record = store.job_record(PROJECT, "a")
    assert record is not None and isinstance(record.job_schedule, dict)
    store.remove_job(remove_cmd("s", "a")).raise_for_error()
    doc = store.get(PROJECT, "s")
    assert doc is not None and doc["jobs"] == {} and isinstance(doc["jobs"], dict)
    deleted = store.delete(delete_cmd("s"))
    assert deleted.detached == []


def test_replies_read_back_from_the_reply_list_have_objects(store: Store) -> None:
    store.create(create_cmd("s")).raise_for_error()
    rid = new_id()
    key = store.keys.reply(PROJECT, "s", rid)
    store.add_job(add_cmd("s", "a", rid).model_copy(update={"reply_to": key}))
    raw = store.client.lpop(key)
    assert isinstance(raw, bytes)
    assert Reply.model_validate_json(raw).job_schedule == {}


# integers --------------------------------------------------------------------------------------


def test_the_largest_integers_pass_through_lua_exactly(store: Store) -> None:
    store.create(
        create_cmd(
            "s",
            "a",
            session_tag=MAX_INT,
            hold_off=MAX_INT,
            run_timeout=MAX_INT,
            time_start=MAX_INT,
            time_end=MAX_INT,
            time_started=MAX_INT,
            time_ended=MAX_INT,
            status="completed",
            result="success",
        )
    ).raise_for_error()
    doc = store.get(PROJECT, "s")
    assert doc is not None
    for field in (
        "session_tag",
        "hold_off",
        "run_timeout",
        "time_start",
        "time_end",
        "time_started",
        "time_ended",
    ):
        assert doc[field] == MAX_INT, field
        assert type(doc[field]) is int
    reply = store.start(start_cmd("s", "a", MAX_INT))
    assert (reply.result, reply.session_tag) == ("hold-off", MAX_INT)
    assert store.start(start_cmd("s", "a", MAX_INT - 1)).result == "out-of-sync"


def test_the_last_new_run_below_the_tag_bound_is_exact(store: Store) -> None:
    store.create(create_cmd("s", "a", session_tag=MAX_INT - 1)).raise_for_error()
    reply = store.start(start_cmd("s", "a", MAX_INT - 1))
    assert (reply.result, reply.session_tag) == ("success", MAX_INT)
    runs = store.runs(PROJECT, "s", MAX_INT)
    assert runs is not None and runs[0]["session_tag"] == MAX_INT
    # (At the bound no further run begins: tests/test_semantics.py.)


# cost: start and end do not scan the jobs --------------------------------------------------------


BIG = 10_000
WHOLE_HASH = {"HGETALL", "HKEYS", "HVALS", "HSCAN"}
END_MARKER = "end-of-measured-calls"
SLOWLOG_THRESHOLD_US = 1000


def big_round(store: Store, clock: Clock, session_id: str) -> int:
    """Create a session of BIG jobs, then play starts and ends on it; returns the calls made.

    The session is written by the create script alone (the store would also write 10,000 job
    records one by one), then the Lua VM is flushed so that the calls do not pay the garbage
    collection of the create's garbage.
    """
    jobs: dict[str, dict[str, Any]] = {f"job-{i:05d}": {} for i in range(BIG)}
    args = [orjson.dumps(scalar_defaults(HOLD_OFF)).decode(), "{}", orjson.dumps(jobs).decode()]
    store._run("create", PROJECT, session_id, new_id(), "0", False, args)
    store.client.script_flush()
    steps: list[tuple[str, int]] = [
        ("job-00000", 0),  # start: new run 1
        ("job-00001", 0),  # start: joins run 1
        ("job-00000", -1),  # end: success
        ("job-00001", -2),  # end: fail
        ("job-00002", 0),  # start, past the hold-off: out-of-sync, aborts its part of run 1
        ("job-00002", 1),  # start: run 2 supersedes run 1
        ("job-00002", -1),  # end: success
    ]
    for i, (job, tag) in enumerate(steps):
        if i == 4:
            clock.now += HOLD_OFF + 1
        if tag >= 0:
            reply = store.start(start_cmd(session_id, job, tag))
        else:
            reply = store.end(end_cmd(session_id, job, "success" if tag == -1 else "fail"))
        assert reply.ok, reply
    return len(steps)


def script_calls(monitor: Monitor) -> list[list[str]]:
    """The commands each EVALSHA ran inside the script, up to the END_MARKER echo."""
    calls: list[list[str]] = []
    while END_MARKER not in (line := monitor.next_command())["command"]:  # type: ignore[no-untyped-call]
        if line["client_type"] == "lua" and calls:
            calls[-1].append(line["command"])
        elif line["command"].startswith("EVALSHA"):
            calls.append([])
    return calls


@pytest.fixture
def real_backend(backend_name: str, backend: redis.Redis) -> redis.Redis:
    if backend_name == "fakeredis":
        pytest.skip("fakeredis has neither SLOWLOG nor MONITOR")
    if backend_name == "cluster":
        pytest.skip("SLOWLOG and MONITOR are per node; the cost is the same as on one server")
    return backend


@pytest.mark.faults  # scenario 7 of the fault-injection suite
def test_start_and_end_stay_out_of_the_slowlog_on_a_big_session(
    real_backend: redis.Redis, clock: Clock
) -> None:
    """SLOWLOG at 1 ms: start and end of a 10,000-job session never show, its full read does.

    The slowlog measures wall time, so a server preempted on a loaded machine can log any
    command; a scan of 10,000 jobs would show in every attempt, so one clean attempt of three
    is the proof.
    """
    backend = real_backend
    store = Store(backend, Settings(default_hold_off=HOLD_OFF), clock=clock)
    shas = [store.scripts[name].sha.encode() for name in ("start", "end")]
    setting = "slowlog-log-slower-than"
    threshold = cast(str, backend.config_get(setting)[setting])
    backend.config_set(setting, SLOWLOG_THRESHOLD_US)
    try:
        for attempt in range(3):
            backend.slowlog_reset()
            big_round(store, clock, f"big-{attempt}")
            slow = [
                entry["command"]
                for entry in backend.slowlog_get(128)
                if any(sha in entry["command"] for sha in shas)
            ]
            if not slow:
                break
        assert slow == []
        # The control: a script that does read every job shows in the slowlog.
        backend.slowlog_reset()
        assert store.get(PROJECT, "big-0") is not None
        assert backend.slowlog_len() >= 1, "the O(jobs) read should show in the slowlog"
    finally:
        backend.config_set(setting, threshold)
    runs = store.runs(PROJECT, "big-0")
    assert runs is not None
    assert [(r["session_tag"], r["result"], r["closed"]) for r in runs] == [
        (1, "fail", "superseded"),
        (2, "", ""),
    ]
    assert len(runs[0]["jobs"]) == BIG


@pytest.mark.faults  # scenario 7 of the fault-injection suite
def test_start_and_end_never_read_the_whole_jobs_hash(
    real_backend: redis.Redis, clock: Clock
) -> None:
    """MONITOR shows every command a script runs: none reads all jobs, and few run at all."""
    store = Store(real_backend, Settings(default_hold_off=HOLD_OFF), clock=clock)
    with real_backend.monitor() as monitor:  # type: ignore[no-untyped-call]
        made = big_round(store, clock, "big")
        real_backend.echo(END_MARKER)
        inside = [commands for commands in script_calls(monitor) if commands]
    # The create, then each call (an EVALSHA refused by NOSCRIPT after the flush ran nothing).
    assert len(inside) == 1 + made
    jobs_key = store.keys.session(PROJECT, "big").jobs
    assert any(c.startswith(f"HSET {jobs_key}") for c in inside[0])
    for commands in inside[1:]:
        assert len(commands) < 40, commands
        for command in commands:
            name, _, rest = command.partition(" ")
            assert not (name.upper() in WHOLE_HASH and rest.startswith(jobs_key)), command


class _Counting(Store):
    """Counts reads of the whole document and pipelines sent."""

    reads = 0
    pipelines = 0

    def get(self, project_id: str, session_id: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get(project_id, session_id)

    def _run_many(self, script: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        self.pipelines += -(-len(calls) // store_module.BATCH)
        return super()._run_many(script, calls)


def test_a_document_with_thousands_of_jobs_costs_a_few_round_trips(backend: redis.Redis) -> None:
    """Attaching the jobs of a document is pipelined, and never reads the whole document per
    job (which made a create of n jobs cost O(n^2))."""
    store = _Counting(backend, Settings())
    jobs = [f"big-{n:04d}" for n in range(2000)]
    store.create(create_cmd("s-big", *jobs)).raise_for_error()
    assert (store.reads, store.pipelines) == (0, 4)
    # Replace into another session moves every job: attach and move, pipelined.
    doc = SessionFields(jobs={job: JobEntry() for job in jobs})
    cmd = ReplaceCommand(request_id=new_id(), project_id=PROJECT, session_id="s-new", document=doc)
    store.replace(cmd).raise_for_error()
    assert (store.reads, store.pipelines) == (0, 4 + 8)
    old = store.get(PROJECT, "s-big")
    assert old is not None and old["jobs"] == {}
    for job in (jobs[0], jobs[-1]):
        record = store.job_record(PROJECT, job)
        assert record is not None and record.session_id == "s-new"


def test_a_run_with_more_members_than_lua_can_unpack_reads_and_replaces(store: Store) -> None:
    """Lua's unpack takes a few thousand values at most: the history read and a replace
    that drops every job slice their calls."""
    jobs = {f"many-{n:05d}": JobEntry(status="running", time_started=T0) for n in range(9000)}
    doc = SessionFields(
        session_id="many", session_tag=1, status="running", time_start=T0, jobs=jobs
    )
    store.create(CreateCommand(request_id=new_id(), project_id=PROJECT, document=doc))
    runs = store.runs(PROJECT, "many")
    assert runs is not None and len(runs) == 1
    assert len(runs[0]["jobs"]) == 9000
    assert {j["status"] for j in runs[0]["jobs"].values()} == {"running"}
    cmd = ReplaceCommand(
        request_id=new_id(), project_id=PROJECT, session_id="many", document=SessionFields()
    )
    reply = store.replace(cmd).raise_for_error()
    assert len(reply.detached or []) == 9000
    after = store.get(PROJECT, "many")
    assert after is not None and after["jobs"] == {}


def test_a_remove_job_repeated_after_the_session_was_created_again_leaves_the_job_alone(
    store: Store,
) -> None:
    store.create(create_cmd("s5", "a")).raise_for_error()
    remove = RemoveJobCommand(request_id=new_id(), project_id=PROJECT, session_id="s5", job_id="a")
    assert store.remove_job(remove).removed is True
    store.delete(delete_cmd("s5")).raise_for_error()
    store.create(create_cmd("s5", "a")).raise_for_error()
    again = store.remove_job(remove)  # redelivered late: its first answer, no second effect
    assert (again.repeated, again.gone, again.removed) == (True, None, True)
    doc = store.get(PROJECT, "s5")
    assert doc is not None and list(doc["jobs"]) == ["a"]
    record = store.job_record(PROJECT, "a")
    assert record is not None and record.session_id == "s5"


def test_a_create_repeated_without_its_request_id_finishes_the_indexing(store: Store) -> None:
    """A create whose steps after the script never ran (its caller got a 503 and has no
    request id to repeat) is listed once the caller creates the same id again (409)."""
    cmd = create_cmd("s6", "a")
    args = store_module._document_args(cmd.document, scalar_defaults(HOLD_OFF))
    store._run("create", PROJECT, "s6", "", "", False, args)  # the script, and nothing after
    assert store.get(PROJECT, "s6") is not None
    assert store.list_sessions(PROJECT) == []
    assert error_of(store.create(create_cmd("s6", "a"))) == "conflict"
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == ["s6"]


def test_list_filters_compare_json_types_too(store: Store) -> None:
    store.create(create_cmd("s7", session_tag=1)).raise_for_error()
    assert [d["session_id"] for d in store.list_sessions(PROJECT, match=[{"session_tag": 1}])] == [
        "s7"
    ]
    for wanted in (1.0, True, "1"):
        assert store.list_sessions(PROJECT, match=[{"session_tag": wanted}]) == []
        assert len(store.list_sessions(PROJECT, match_not=[{"session_tag": wanted}])) == 1
    assert store.list_sessions(PROJECT, match=[{"schedule": {}}]) != []
    assert store.list_sessions(PROJECT, match=[{"schedule": []}]) == []


def test_history_keeps_the_last_runs_across_a_gap_in_the_tags(store: Store, clock: Clock) -> None:
    """Runs are dropped from the lowest tag up; a document that raised the tag far leaves a
    gap, which the trim crosses too (history_limit is 3 here)."""
    store.create(create_cmd("g", "a", hold_off=0)).raise_for_error()
    tag = 0
    for _ in range(4):
        clock.now += 10
        tag = store.start(start_cmd("g", "a", tag)).raise_for_error().session_tag or 0
    store.update(update_cmd("g", session_tag=500)).raise_for_error()
    tag = 500
    for _ in range(3):
        clock.now += 10
        tag = store.start(start_cmd("g", "a", tag)).raise_for_error().session_tag or 0
    runs = store.runs(PROJECT, "g")
    assert runs is not None
    assert [r["session_tag"] for r in runs] == [501, 502, 503]


def test_a_replace_repeated_after_a_job_came_back_leaves_its_record_alone(store: Store) -> None:
    store.create(create_cmd("t", "x")).raise_for_error()
    doc = SessionFields(jobs={"y": JobEntry()})
    replace = ReplaceCommand(request_id=new_id(), project_id=PROJECT, session_id="t", document=doc)
    assert store.replace(replace).raise_for_error().detached == ["x"]
    store.add_job(add_cmd("t", "x")).raise_for_error()
    again = store.replace(replace)  # redelivered late
    assert again.repeated is True and again.detached == ["x"]
    record = store.job_record(PROJECT, "x")
    assert record is not None and record.session_id == "t"


def test_a_job_record_left_pointing_at_a_session_without_the_job_reads_as_detached(
    store: Store, backend: redis.Redis
) -> None:
    """The sessions hold the truth: a record whose detach was lost (a 503 after the script,
    a crash, a race with a delete) is repaired when read."""
    store.create(create_cmd("u", "x", "z")).raise_for_error()
    record_key = store.keys.job_record(PROJECT, "x")
    # The delete's script, without the steps after it.
    store._run("delete", PROJECT, "u", "", "", False)
    assert backend.hget(record_key, "session_id") == b"u"
    assert store.job_record(PROJECT, "x") == JobRecord(
        session_id="", session_tag=0, job_schedule={"event": "stop"}
    )
    assert backend.hget(record_key, "session_id") == b""  # repaired in Redis too
    # A delete repeated without its request id (404) clears the index entry left behind.
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == []
    assert backend.zscore(store.keys.project_index(PROJECT), "u") is not None
    assert error_of(store.delete(delete_cmd("u"))) == "not_found"
    assert backend.zscore(store.keys.project_index(PROJECT), "u") is None


def test_commands_without_a_request_record_leave_only_short_lived_move_markers(
    store: Store, backend: redis.Redis
) -> None:
    store.create(create_cmd("v")).raise_for_error()
    store.create(create_cmd("w")).raise_for_error()
    remembered = add_cmd("v", "x")
    store.add_job(remembered).raise_for_error()
    marker = store.keys.job_move(PROJECT, "x", remembered.request_id)
    assert store.settings.request_ttl - 5 <= backend.ttl(marker) <= store.settings.request_ttl
    quick = add_cmd("w", "x")
    store.add_job(quick, remember=False).raise_for_error()  # moves x from v to w
    marker = store.keys.job_move(PROJECT, "x", quick.request_id)
    assert 0 < backend.ttl(marker) <= store_module.UNREMEMBERED_MARKER_TTL
    # The move out of v left no request record either.
    v_doc, w_doc = store.get(PROJECT, "v"), store.get(PROJECT, "w")
    assert v_doc is not None and w_doc is not None
    assert (list(v_doc["jobs"]), list(w_doc["jobs"])) == ([], ["x"])
    move_id = store_module._derived_request_id(quick.request_id, "move:x")
    assert not backend.exists(store.keys.request(PROJECT, "v", move_id))
