"""The Store against the reference model (tests/reference_model.py), step by random step.

A hypothesis state machine sends the same random commands to the real Store (on Redis,
Valkey and fakeredis) and to the model, on two sessions of one project sharing four job ids,
with a clock that only the test moves: create, delete, start, end, add_job, remove_job,
repeated request ids (the same command, and a different one), SCRIPT FLUSH, the deadline
sweep and clock jumps around the hold-off and run_timeout edges. After every step it compares
the reply, both session documents, both run histories and every job's record.

Readings of the specification that the model makes (each also marked in the model):
- before its first run a session's jobs are members of no run (`member` false);
- inside the hold-off window with a lower tag, the rows of SPEC §3 apply in order (README):
  a job that already started (or ended) in run T is told success even once run T has
  completed; a job whose only state in run T is the `aborted` of its close is out-of-sync;
- a member removed while its run is running leaves that run's history; a closed run's
  history keeps it only if it reported in that run (README "History membership");
- a run deadline (and a superseding start) is a completion: it sets the session's
  time_end and time_ended to the time it was applied, not to time_start + run_timeout;
- closing a run (deadline or superseded) is a change of its own: `_version` +1, and +1 more
  for the command that applied it if that changed anything, so the version never depends
  on whether a read applied the deadline first;
- delete keeps the session's request records until they expire: a command repeated after
  the delete (a redelivered create, say) gets its first answer and changes nothing, and a
  session created again under the id keeps them (README "Request records").

The Store remembers request ids for longer than any example's clock can move, so that no
record expires during an example (expiry is pinned by tests/test_store.py, not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from reference_model import Outcome, ReferenceModel

from session_worker.models import (
    AddJobCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    EndCommand,
    JobEntry,
    RemoveJobCommand,
    Reply,
    SessionFields,
    StartCommand,
)
from session_worker.settings import Settings
from session_worker.store import Store

PROJECT = "proj"
T0 = 1_700_000_000
HISTORY_LIMIT = 3
# Far beyond the clock's reach in one example (at most stateful_step_count * 10^6 seconds).
REQUEST_TTL = 10**9
SESSIONS = ("s1", "s2")
JOBS = ("a", "b", "c", "d")
RESULTS = ("success", "fail", "aborted")

# Around every edge the machine's sessions can have: hold_off 0, 2 or 5 (inside while
# now - time_start <= hold_off), run_timeout 4 or 9 (closed once now >= time_start + it).
ADVANCES = (0, 1, 2, 3, 4, 5, 6, 9, 10, 1_000_000)

MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

SessionIds = st.sampled_from(SESSIONS)
JobIds = st.sampled_from(JOBS)
Results = st.sampled_from(RESULTS)


@dataclass(frozen=True)
class Sent:
    """A command as sent to the store, and the same command as the model takes it."""

    kind: str
    command: Command
    payload: dict[str, Any]


def start(session_id: str, request_id: str, job_id: str, tag: int) -> Sent:
    payload = {"session_id": session_id, "job_id": job_id, "current_tag": tag}
    cmd = StartCommand.model_validate({"request_id": request_id, "project_id": PROJECT, **payload})
    return Sent("start", cmd, {"request_id": request_id, **payload})


def end(session_id: str, request_id: str, job_id: str, tag: int | None, result: str) -> Sent:
    payload = {"session_id": session_id, "job_id": job_id, "current_tag": tag, "result": result}
    cmd = EndCommand.model_validate({"request_id": request_id, "project_id": PROJECT, **payload})
    return Sent("end", cmd, {"request_id": request_id, **payload})


def add_job(session_id: str, request_id: str, job_id: str, client_id: str) -> Sent:
    payload = {"session_id": session_id, "job_id": job_id, "client_id": client_id}
    cmd = AddJobCommand(request_id=request_id, project_id=PROJECT, **payload)
    return Sent("add_job", cmd, {"request_id": request_id, **payload})


def remove_job(session_id: str, request_id: str, job_id: str) -> Sent:
    payload = {"session_id": session_id, "job_id": job_id}
    cmd = RemoveJobCommand(request_id=request_id, project_id=PROJECT, **payload)
    return Sent("remove_job", cmd, {"request_id": request_id, **payload})


def create(
    session_id: str,
    request_id: str,
    hold_off: int,
    run_timeout: int,
    session_tag: int,
    jobs: list[str],
) -> Sent:
    document = SessionFields(
        session_id=session_id,
        hold_off=hold_off,
        run_timeout=run_timeout,
        session_tag=session_tag,
        jobs={job_id: JobEntry() for job_id in jobs},
    )
    cmd = CreateCommand(request_id=request_id, project_id=PROJECT, document=document)
    payload = {
        "request_id": request_id,
        "session_id": session_id,
        "hold_off": hold_off,
        "run_timeout": run_timeout,
        "session_tag": session_tag,
        "jobs": list(jobs),
    }
    return Sent("create", cmd, payload)


def delete(session_id: str, request_id: str) -> Sent:
    cmd = DeleteCommand(request_id=request_id, project_id=PROJECT, session_id=session_id)
    return Sent("delete", cmd, {"request_id": request_id, "session_id": session_id})


def compare_reply(reply: Reply, outcome: Outcome) -> None:
    code = reply.error.code if reply.error is not None else None
    assert (reply.ok, code) == (outcome.ok, outcome.error), reply
    if outcome.result is not None:
        assert (reply.result, reply.session_tag) == (outcome.result, outcome.session_tag), reply
    if outcome.added is not None:
        assert reply.added == outcome.added, reply
    if outcome.removed is not None:
        assert reply.removed == outcome.removed, reply


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """The fields of a stored document that the model holds."""
    fields = (
        "session_id",
        "hold_off",
        "run_timeout",
        "session_tag",
        "time_start",
        "time_end",
        "time_started",
        "time_ended",
        "status",
        "result",
        "_version",
    )
    job_fields = ("client_id", "status", "result", "time_started", "time_ended", "member")
    return {
        **{name: doc[name] for name in fields},
        "jobs": {
            job_id: {name: entry.get(name) for name in job_fields}
            for job_id, entry in doc["jobs"].items()
        },
    }


class StoreVersusModel(RuleBasedStateMachine):
    """One example: a fresh database, a fresh model, and the clock at T0."""

    client: ClassVar[redis.Redis | None] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.client is not None
        self.client.flushall()
        self.now = T0
        self.store = Store(
            self.client,
            Settings(history_limit=HISTORY_LIMIT, request_ttl=REQUEST_TTL),
            clock=lambda: self.now,
        )
        self.model = ReferenceModel(HISTORY_LIMIT)
        self.sent: list[Sent] = []
        self.stored: dict[tuple[str, str], Reply] = {}  # the store's reply per request record
        self.counter = 0

    # Helpers --------------------------------------------------------------------------------

    def new_request_id(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    def tag(self, session_id: str) -> int:
        session = self.model.sessions.get(session_id)
        return session.session_tag if session is not None else 0

    def send(self, sent: Sent) -> Reply:
        outcome, replayed = self.model.apply(sent.kind, sent.payload, self.now)
        reply = self.store.apply(sent.kind, sent.command)
        compare_reply(reply, outcome)
        key = (sent.payload["session_id"], sent.command.request_id)
        if replayed:
            assert reply.repeated, "a repeated command was not answered from its record"
            assert reply.as_stored() == self.stored[key], "a repeated command got another reply"
        elif outcome.error not in ("not_found", "idempotency_mismatch"):
            self.stored[key] = reply
        self.sent.append(sent)
        self.check()
        return reply

    def check(self) -> None:
        for session_id in SESSIONS:
            session = self.model.read(session_id, self.now)
            doc = self.store.get(PROJECT, session_id)
            runs = self.store.runs(PROJECT, session_id)
            if session is None:
                assert (doc, runs) == (None, None)
                continue
            assert doc is not None, f"{session_id} is missing"
            assert comparable(doc) == session.document()
            assert runs == session.history()
        for job_id in JOBS:
            record = self.store.job_record(PROJECT, job_id)
            expected = self.model.records.get(job_id)
            assert (record.session_id if record else None) == expected, job_id

    # Rules ----------------------------------------------------------------------------------

    @rule(
        session_id=SessionIds,
        hold_off=st.sampled_from((0, 2, 5)),
        run_timeout=st.sampled_from((0, 4, 9)),
        session_tag=st.sampled_from((0, 0, 2)),
        jobs=st.lists(JobIds, unique=True, max_size=3),
    )
    def create(
        self, session_id: str, hold_off: int, run_timeout: int, session_tag: int, jobs: list[str]
    ) -> None:
        rid = self.new_request_id()
        self.send(create(session_id, rid, hold_off, run_timeout, session_tag, jobs))

    @rule(session_id=SessionIds)
    def delete(self, session_id: str) -> None:
        self.send(delete(session_id, self.new_request_id()))

    @rule(session_id=SessionIds, job_id=JobIds, delta=st.sampled_from((-2, -1, 0, 0, 0, 1)))
    def start(self, session_id: str, job_id: str, delta: int) -> None:
        tag = max(0, self.tag(session_id) + delta)
        self.send(start(session_id, self.new_request_id(), job_id, tag))

    @rule(
        session_id=SessionIds,
        job_id=JobIds,
        delta=st.sampled_from((None, 0, 0, -1, -2, 1)),
        result=Results,
    )
    def end(self, session_id: str, job_id: str, delta: int | None, result: str) -> None:
        tag = None if delta is None else max(0, self.tag(session_id) + delta)
        self.send(end(session_id, self.new_request_id(), job_id, tag, result))

    @rule(session_id=SessionIds, job_id=JobIds, client_id=st.sampled_from(("", "node-1")))
    def add_job(self, session_id: str, job_id: str, client_id: str) -> None:
        self.send(add_job(session_id, self.new_request_id(), job_id, client_id))

    @rule(session_id=SessionIds, job_id=JobIds)
    def remove_job(self, session_id: str, job_id: str) -> None:
        self.send(remove_job(session_id, self.new_request_id(), job_id))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def repeat(self, data: st.DataObject) -> None:
        """The same command again under its request id (a redelivery or an HTTP retry)."""
        self.send(data.draw(st.sampled_from(self.sent)))

    @precondition(lambda self: bool(self.sent))
    @rule(
        data=st.data(),
        job_id=JobIds,
        kind=st.sampled_from(("start", "end", "add_job", "remove_job")),
        tag=st.integers(0, 3),
        result=Results,
    )
    def reuse(self, data: st.DataObject, job_id: str, kind: str, tag: int, result: str) -> None:
        """Another command under a request id already used on the session."""
        earlier = data.draw(st.sampled_from(self.sent))
        session_id = earlier.payload["session_id"]
        rid = earlier.command.request_id
        if kind == "start":
            self.send(start(session_id, rid, job_id, tag))
        elif kind == "end":
            self.send(end(session_id, rid, job_id, tag, result))
        elif kind == "add_job":
            self.send(add_job(session_id, rid, job_id, ""))
        else:
            self.send(remove_job(session_id, rid, job_id))

    @rule(seconds=st.sampled_from(ADVANCES), observe=st.booleans())
    def advance(self, seconds: int, observe: bool) -> None:
        """Move the clock; unobserved, the next command is the first to see the new time."""
        self.now += seconds
        if observe:
            self.check()

    @rule()
    def script_flush(self) -> None:
        assert self.client is not None
        self.client.script_flush()

    @rule()
    def sweep(self) -> None:
        self.store.sweep_deadlines()
        self.model.sweep(self.now)
        self.check()


@pytest.mark.timeout(600)
def test_the_store_follows_the_reference_model(backend: redis.Redis) -> None:
    StoreVersusModel.client = backend
    try:
        run_state_machine_as_test(StoreVersusModel, settings=MACHINE_SETTINGS)
    finally:
        StoreVersusModel.client = None
