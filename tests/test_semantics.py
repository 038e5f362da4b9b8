"""SPEC §3 and §4 row by row, straight against the scripts, on every backend.

Each test body runs on real Redis 7, Valkey 8, fakeredis and a 3-master Redis Cluster (the
`backend` fixture). Time is pinned with a `Clock` handed to the Store (the scripts then use it
instead of Redis TIME), so the hold-off and deadline edges are exact and nothing sleeps; the
last tests use the server's own TIME.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import orjson
import pytest
import redis
from clock import T0, Clock
from redis.client import PubSub

from session_worker.keys import events_channel
from session_worker.models import (
    MAX_INT,
    AddJobCommand,
    CreateCommand,
    EndCommand,
    JobEntry,
    RemoveJobCommand,
    ReplaceCommand,
    Reply,
    SessionEvent,
    SessionFields,
    StartCommand,
    UpdateCommand,
)
from session_worker.settings import Settings
from session_worker.store import Store

PROJECT = "proj"
CLUSTER_BACKENDS = ("redis", "valkey", "fakeredis", "cluster")
HOLD_OFF = 30


class Session:
    """Commands on one session, each with a fresh request id unless one is given."""

    def __init__(self, store: Store, session_id: str = "s1") -> None:
        self.store = store
        self.id = session_id

    def create(self, jobs: Iterable[str] = (), **fields: Any) -> Reply:
        document = SessionFields(
            session_id=self.id, jobs={job: JobEntry() for job in jobs}, **fields
        )
        cmd = CreateCommand(request_id=new_id(), project_id=PROJECT, document=document)
        return self.store.create(cmd).raise_for_error()

    def start(self, job: str, tag: int, request_id: str | None = None) -> Reply:
        return self.store.start(
            StartCommand(
                request_id=request_id or new_id(),
                project_id=PROJECT,
                session_id=self.id,
                job_id=job,
                current_tag=tag,
            )
        )

    def end(
        self,
        job: str,
        result: str = "success",
        tag: int | None = None,
        request_id: str | None = None,
    ) -> Reply:
        cmd = EndCommand.model_validate(
            {
                "request_id": request_id or new_id(),
                "project_id": PROJECT,
                "session_id": self.id,
                "job_id": job,
                "current_tag": tag,
                "result": result,
            }
        )
        return self.store.end(cmd)

    def add(self, job: str) -> Reply:
        return self.store.add_job(
            AddJobCommand(request_id=new_id(), project_id=PROJECT, session_id=self.id, job_id=job)
        )

    def remove(self, job: str) -> Reply:
        return self.store.remove_job(
            RemoveJobCommand(
                request_id=new_id(), project_id=PROJECT, session_id=self.id, job_id=job
            )
        )

    def doc(self) -> dict[str, Any]:
        doc = self.store.get(PROJECT, self.id)
        assert doc is not None
        return doc

    def job(self, job: str) -> dict[str, Any]:
        entry: dict[str, Any] = self.doc()["jobs"][job]
        return entry

    def version(self) -> int:
        version: int = self.doc()["_version"]
        return version

    def run(self, tag: int) -> dict[str, Any]:
        runs = self.store.runs(PROJECT, self.id, tag)
        assert runs is not None
        assert len(runs) == 1, runs
        return runs[0]


def new_id() -> str:
    return uuid.uuid4().hex


def result_of(reply: Reply) -> tuple[str | None, int | None]:
    assert reply.ok, reply.error
    return reply.result, reply.session_tag


def error_of(reply: Reply) -> str:
    assert not reply.ok
    assert reply.error is not None
    return reply.error.code


def scheduled() -> dict[str, Any]:
    return {"status": "scheduled", "result": "", "time_started": -1, "time_ended": -1}


def state(entry: dict[str, Any]) -> dict[str, Any]:
    """A job entry without the fields that are not its run state."""
    return {k: entry[k] for k in ("status", "result", "time_started", "time_ended")}


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
def s(store: Store) -> Session:
    return Session(store)


@pytest.fixture
def started(s: Session, clock: Clock) -> Session:
    """Jobs a, b, c; `a` started run 1 at T0 (so T0..T0+HOLD_OFF is its hold-off)."""
    s.create(["a", "b", "c"])
    assert result_of(s.start("a", 0)) == ("success", 1)
    return s


# start ------------------------------------------------------------------------------------


def test_start_on_a_missing_session_is_not_found_and_not_remembered(
    store: Store, backend: redis.Redis
) -> None:
    s = Session(store)
    request_id = new_id()
    assert error_of(s.start("a", 0, request_id)) == "not_found"
    assert backend.dbsize() == 0  # on a cluster: summed over the masters
    # Not stored: once the session exists the same request id is applied.
    s.create(["a"])
    assert result_of(s.start("a", 0, request_id)) == ("success", 1)


def test_start_of_a_job_not_in_the_session_is_bad_request(started: Session) -> None:
    version = started.version()
    reply = started.start("zz", 1)
    assert error_of(reply) == "bad_request"
    assert reply.error is not None and "zz" in reply.error.description
    assert started.version() == version


def test_start_with_a_tag_above_the_sessions_is_bad_request(started: Session) -> None:
    version = started.version()
    reply = started.start("b", 2)
    assert error_of(reply) == "bad_request"
    assert reply.error is not None and "tag too high" in reply.error.description
    assert started.version() == version


def test_a_never_started_session_counts_as_outside_its_hold_off(s: Session) -> None:
    s.create(["a", "b"], hold_off=10**6)
    assert s.doc()["time_start"] == -1
    assert result_of(s.start("a", 0)) == ("success", 1)
    doc = s.doc()
    assert (doc["status"], doc["result"], doc["time_start"], doc["time_end"]) == (
        "running",
        "",
        T0,
        -1,
    )
    assert doc["time_started"] == T0
    assert state(doc["jobs"]["a"]) == {
        "status": "running",
        "result": "",
        "time_started": T0,
        "time_ended": -1,
    }
    assert state(doc["jobs"]["b"]) == scheduled()
    assert doc["jobs"]["a"]["member"] and doc["jobs"]["b"]["member"]


def test_tag_5_session_started_long_ago_starts_run_6(s: Session, clock: Clock) -> None:
    s.create(
        ["a", "b"],
        session_tag=5,
        time_start=T0 - 100_000,
        time_end=T0 - 99_000,
        time_started=T0 - 500_000,
        time_ended=T0 - 99_000,
        status="completed",
        result="success",
    )
    assert result_of(s.start("a", 5)) == ("success", 6)
    doc = s.doc()
    assert (doc["session_tag"], doc["time_start"], doc["status"]) == (6, T0, "running")
    assert doc["time_started"] == T0 - 500_000  # the first start ever is kept
    assert state(doc["jobs"]["b"]) == scheduled()
    assert set(s.run(6)["jobs"]) == {"a", "b"}


def test_inside_hold_off_a_lower_tag_joins_the_run(started: Session, clock: Clock) -> None:
    clock.advance(HOLD_OFF)  # now - time_start == hold_off is still inside
    version = started.version()
    assert result_of(started.start("b", 0)) == ("success", 1)
    assert started.doc()["session_tag"] == 1
    assert started.doc()["time_start"] == T0  # no bump, no new run
    assert state(started.job("b")) == {
        "status": "running",
        "result": "",
        "time_started": T0 + HOLD_OFF,
        "time_ended": -1,
    }
    assert started.version() == version + 1
    assert started.run(1)["jobs"]["b"]["status"] == "running"


def test_inside_hold_off_an_equal_tag_gets_hold_off(started: Session, clock: Clock) -> None:
    version = started.version()
    assert result_of(started.start("b", 1)) == ("hold-off", 1)
    clock.advance(HOLD_OFF)
    assert result_of(started.start("a", 1)) == ("hold-off", 1)
    assert started.version() == version
    assert state(started.job("b")) == scheduled()


def test_one_second_past_hold_off_an_equal_tag_starts_a_new_run(
    started: Session, clock: Clock
) -> None:
    clock.advance(HOLD_OFF + 1)
    assert result_of(started.start("b", 1)) == ("success", 2)
    assert started.doc()["time_start"] == T0 + HOLD_OFF + 1


def test_hold_off_zero_window_is_the_start_second_only(s: Session, clock: Clock) -> None:
    s.create(["a"], hold_off=0)
    assert result_of(s.start("a", 0)) == ("success", 1)
    assert result_of(s.start("a", 1)) == ("hold-off", 1)
    clock.advance(1)
    assert result_of(s.start("a", 1)) == ("success", 2)


def test_a_repeated_start_of_a_started_job_changes_nothing(started: Session, clock: Clock) -> None:
    clock.advance(5)
    version = started.version()
    assert result_of(started.start("a", 0)) == ("success", 1)
    assert started.version() == version
    assert started.job("a")["time_started"] == T0
    # Also once the job has completed in the run.
    assert result_of(started.end("a")) == ("success", 1)
    version = started.version()
    assert result_of(started.start("a", 0)) == ("success", 1)
    assert started.version() == version
    assert started.job("a")["status"] == "completed"


def test_inside_hold_off_a_lower_tag_is_out_of_sync_once_the_run_completed(
    s: Session, clock: Clock
) -> None:
    s.create(["a", "b"], run_timeout=10)
    s.start("a", 0)
    clock.advance(10)  # the deadline closes run 1 while its hold-off is still open
    version = s.version()
    assert s.doc()["status"] == "completed"
    assert result_of(s.start("b", 0)) == ("out-of-sync", 1)
    assert s.version() == version
    assert state(s.job("b")) == {
        "status": "completed",
        "result": "aborted",
        "time_started": -1,
        "time_ended": T0 + 10,
    }


def test_inside_hold_off_a_job_that_is_not_a_member_is_out_of_sync(
    started: Session, clock: Clock
) -> None:
    started.add("late")
    version = started.version()
    clock.advance(1)
    assert result_of(started.start("late", 0)) == ("out-of-sync", 1)
    assert started.version() == version
    assert started.job("late")["member"] is False
    assert "late" not in started.run(1)["jobs"]


def test_outside_hold_off_a_lower_tag_aborts_the_jobs_part_of_the_run(
    started: Session, clock: Clock
) -> None:
    started.end("a", "success")
    started.start("b", 0)
    started.end("b", "success")
    clock.advance(HOLD_OFF + 1)
    assert result_of(started.start("c", 0)) == ("out-of-sync", 1)
    aborted = {
        "status": "completed",
        "result": "aborted",
        "time_started": -1,
        "time_ended": T0 + HOLD_OFF + 1,
    }
    assert state(started.job("c")) == aborted
    run = started.run(1)
    assert state(run["jobs"]["c"]) == aborted
    # c was the last open member: the run is recomputed and completes as a failure.
    assert (run["status"], run["result"], run["time_end"]) == (
        "completed",
        "fail",
        T0 + HOLD_OFF + 1,
    )
    doc = started.doc()
    assert (doc["status"], doc["result"], doc["session_tag"]) == ("completed", "fail", 1)
    assert doc["time_ended"] == T0 + HOLD_OFF + 1


def test_outside_hold_off_a_lower_tag_leaves_the_run_open_while_others_run(
    started: Session, clock: Clock
) -> None:
    clock.advance(HOLD_OFF + 1)
    assert result_of(started.start("c", 0)) == ("out-of-sync", 1)
    assert started.doc()["status"] == "running"
    assert started.job("c")["result"] == "aborted"
    started.start("b", 0)  # b also missed the window
    assert started.doc()["status"] == "running"  # a still runs
    started.end("a", "success")
    doc = started.doc()
    assert (doc["status"], doc["result"]) == ("completed", "fail")


def test_a_job_that_missed_the_window_cannot_make_the_run_a_success(
    started: Session, clock: Clock
) -> None:
    """The out-of-sync rule closed c's part of run 1 (aborted, never started): an end from
    c for run 1 afterwards is out-of-sync and changes nothing, so run 1 cannot be reported
    a success with a job that never ran in it."""
    clock.advance(HOLD_OFF + 1)
    started.start("c", 0)
    started.start("b", 0)
    version = started.version()
    assert result_of(started.end("c", "success", tag=1)) == ("out-of-sync", 1)
    assert result_of(started.end("b", "success")) == ("out-of-sync", 1)
    assert started.version() == version
    assert (started.job("c")["status"], started.job("c")["result"]) == ("completed", "aborted")
    started.end("a", "success")
    doc = started.doc()
    assert (doc["status"], doc["result"]) == ("completed", "fail")
    run = started.run(1)
    assert run["jobs"]["c"]["result"] == "aborted" and run["jobs"]["c"]["time_started"] == -1


def test_outside_hold_off_a_lower_tag_of_a_started_job_changes_nothing(
    started: Session, clock: Clock
) -> None:
    clock.advance(HOLD_OFF + 1)
    version = started.version()
    assert result_of(started.start("a", 0)) == ("out-of-sync", 1)
    assert started.version() == version
    assert started.job("a")["status"] == "running"


def test_outside_hold_off_a_lower_tag_after_the_run_completed_changes_nothing(
    s: Session, clock: Clock
) -> None:
    s.create(["a"])
    s.start("a", 0)
    s.end("a", "success")
    s.start("a", 1)  # hold-off
    clock.advance(HOLD_OFF + 1)
    version = s.version()
    assert result_of(s.start("a", 0)) == ("out-of-sync", 1)
    assert s.version() == version
    assert (s.doc()["status"], s.doc()["result"]) == ("completed", "success")


# new run -----------------------------------------------------------------------------------


def test_a_new_run_resets_the_other_jobs(s: Session, clock: Clock) -> None:
    """freezer-api's bug: a node that never started in run N+1 made it succeed from run N."""
    s.create(["a", "b"])
    s.start("a", 0)
    s.start("b", 0)
    s.end("a", "success")
    s.end("b", "success")
    assert (s.doc()["status"], s.doc()["result"]) == ("completed", "success")
    clock.advance(HOLD_OFF + 1)
    assert result_of(s.start("a", 1)) == ("success", 2)
    doc = s.doc()
    assert (doc["status"], doc["result"], doc["time_end"]) == ("running", "", -1)
    assert state(doc["jobs"]["b"]) == scheduled()
    assert s.end("a", "success").ok
    doc = s.doc()
    assert (doc["status"], doc["result"]) == ("running", "")  # b has not run in round 2
    assert doc["time_ended"] == T0  # the last completion is still run 1's
    assert s.run(2)["jobs"]["b"]["status"] == "scheduled"
    assert (s.run(1)["status"], s.run(1)["result"]) == ("completed", "success")


def test_a_new_run_supersedes_a_running_one(started: Session, clock: Clock) -> None:
    started.start("b", 0)
    started.end("b", "success")
    clock.advance(HOLD_OFF + 1)
    now = clock.now
    assert result_of(started.start("c", 1)) == ("success", 2)
    run = started.run(1)
    assert (run["status"], run["result"], run["time_end"], run["closed"]) == (
        "completed",
        "fail",
        now,
        "superseded",
    )
    assert state(run["jobs"]["a"]) == {
        "status": "completed",
        "result": "aborted",
        "time_started": T0,
        "time_ended": now,
    }
    assert state(run["jobs"]["b"])["result"] == "success"
    assert state(run["jobs"]["c"]) == {
        "status": "completed",
        "result": "aborted",
        "time_started": -1,
        "time_ended": now,
    }
    doc = started.doc()
    assert (doc["session_tag"], doc["status"], doc["time_start"]) == (2, "running", now)
    assert state(doc["jobs"]["a"]) == scheduled()
    assert doc["jobs"]["c"]["status"] == "running"


def _write(s: Session, kind: str, **fields: Any) -> Reply:
    """A PATCH (update) or a replace of the session's document with `fields`."""
    doc = SessionFields.model_validate(fields)
    cmd: UpdateCommand | ReplaceCommand
    if kind == "update":
        cmd = UpdateCommand(request_id=new_id(), project_id=PROJECT, session_id=s.id, patch=doc)
        return s.store.update(cmd).raise_for_error()
    cmd = ReplaceCommand(request_id=new_id(), project_id=PROJECT, session_id=s.id, document=doc)
    return s.store.replace(cmd).raise_for_error()


def test_a_replace_that_resets_the_status_closes_the_running_run(
    started: Session, clock: Clock
) -> None:
    clock.advance(5)
    _write(started, "replace", jobs={"a": {}, "b": {}, "c": {}}, description="x")
    run = started.run(1)
    assert (run["status"], run["result"], run["closed"], run["time_end"]) == (
        "completed",
        "fail",
        "superseded",
        T0 + 5,
    )
    assert state(run["jobs"]["b"])["result"] == "aborted"
    doc = started.doc()
    assert (doc["session_tag"], doc["status"]) == (1, "")
    # The next start opens run 2; no run is left running in the history.
    assert result_of(started.start("b", 1)) == ("success", 2)
    runs = started.store.runs(PROJECT, started.id)
    assert runs is not None
    assert [(r["session_tag"], r["status"]) for r in runs] == [(1, "completed"), (2, "running")]


def test_a_patch_that_raises_the_tag_closes_the_running_run(started: Session) -> None:
    _write(started, "update", session_tag=5)
    assert (started.run(1)["status"], started.run(1)["closed"]) == ("completed", "superseded")
    runs = started.store.runs(PROJECT, started.id)
    assert runs is not None
    assert [(r["session_tag"], r["status"]) for r in runs] == [(1, "completed"), (5, "running")]


def test_a_patch_that_completes_the_run_records_what_it_says(started: Session) -> None:
    _write(started, "update", status="completed", result="success")
    run = started.run(1)
    assert (run["status"], run["result"], run["closed"]) == ("completed", "success", "")


def test_a_job_added_during_a_run_cannot_hold_it_open(started: Session, clock: Clock) -> None:
    started.remove("c")
    reply = started.add("d")
    assert reply.ok and reply.added is True
    assert state(started.job("d")) == scheduled()
    assert started.job("d")["member"] is False
    started.start("b", 0)
    started.end("a", "success")
    started.end("b", "success")
    doc = started.doc()
    assert (doc["status"], doc["result"]) == ("completed", "success")
    assert set(started.run(1)["jobs"]) == {"a", "b"}
    # From the next run on it is a member and holds the run open.
    clock.advance(HOLD_OFF + 1)
    assert result_of(started.start("a", 1)) == ("success", 2)
    assert started.job("d")["member"] is True
    started.start("b", 1)
    started.end("a", "success")
    started.end("b", "success")
    assert started.doc()["status"] == "running"
    assert result_of(started.start("d", 1)) == ("success", 2)
    started.end("d", "success")
    assert (started.doc()["status"], started.doc()["result"]) == ("completed", "success")
    assert set(started.run(2)["jobs"]) == {"a", "b", "d"}


def test_removing_the_only_unfinished_member_completes_the_run(started: Session) -> None:
    started.start("b", 0)
    started.end("a", "success")
    started.end("b", "success")
    assert started.doc()["status"] == "running"
    reply = started.remove("c")
    assert reply.ok and reply.removed is True
    doc = started.doc()
    assert (doc["status"], doc["result"], doc["time_end"]) == ("completed", "success", T0)
    assert "c" not in doc["jobs"]


def test_removing_a_failed_member_does_not_leave_its_failure_behind(started: Session) -> None:
    started.start("b", 0)
    started.end("b", "fail")
    started.end("c", "success")
    started.remove("b")
    started.end("a", "success")
    assert (started.doc()["status"], started.doc()["result"]) == ("completed", "success")


def test_a_removed_member_leaves_the_running_runs_history(started: Session) -> None:
    started.start("b", 0)
    started.end("c", "fail")
    started.remove("b")  # running
    started.remove("c")  # completed with a failure
    started.end("a", "success")
    run = started.run(1)
    assert (run["status"], run["result"]) == ("completed", "success")
    assert set(run["jobs"]) == {"a"}


def test_a_job_removed_after_its_run_completed_stays_in_that_runs_history(
    started: Session,
) -> None:
    for job in ("a", "b", "c"):
        started.end(job, "success")
    started.remove("b")
    assert set(started.run(1)["jobs"]) == {"a", "b", "c"}


def test_removing_the_last_job_leaves_the_run_open(s: Session) -> None:
    s.create(["a"])
    s.start("a", 0)
    assert s.remove("a").ok
    doc = s.doc()
    assert (doc["status"], doc["result"], doc["jobs"]) == ("running", "", {})


# end -------------------------------------------------------------------------------------


def test_end_on_a_missing_session_is_not_found(store: Store) -> None:
    assert error_of(Session(store).end("a")) == "not_found"


def test_end_of_a_job_not_in_the_session_is_bad_request(started: Session) -> None:
    version = started.version()
    assert error_of(started.end("zz")) == "bad_request"
    assert started.version() == version


def test_end_with_a_bad_result_is_bad_request_in_the_script(started: Session) -> None:
    """The model refuses it first; the script refuses it too if it ever got one."""
    version = started.version()
    raw = started.store._run(
        "end", PROJECT, started.id, new_id(), "f" * 40, False, ["a", "", "maybe"]
    )
    reply = Reply.model_validate_json(raw)
    assert error_of(reply) == "bad_request"
    assert reply.error is not None and "result" in reply.error.description
    assert started.version() == version
    assert started.job("a")["status"] == "running"


def test_end_with_a_tag_above_the_sessions_is_bad_request(started: Session) -> None:
    version = started.version()
    reply = started.end("a", "success", tag=2)
    assert error_of(reply) == "bad_request"
    assert reply.error is not None and "tag too high" in reply.error.description
    assert started.version() == version


def test_end_completes_the_job_and_recomputes(started: Session, clock: Clock) -> None:
    started.start("b", 0)
    clock.advance(7)
    assert result_of(started.end("a", "success", tag=1)) == ("success", 1)
    assert state(started.job("a")) == {
        "status": "completed",
        "result": "success",
        "time_started": T0,
        "time_ended": T0 + 7,
    }
    assert started.doc()["status"] == "running"
    assert result_of(started.end("b", "fail")) == ("success", 1)  # tag omitted: T
    assert result_of(started.end("c", "aborted")) == ("success", 1)
    doc = started.doc()
    assert (doc["status"], doc["result"], doc["time_end"], doc["time_ended"]) == (
        "completed",
        "fail",
        T0 + 7,
        T0 + 7,
    )
    run = started.run(1)
    assert (run["status"], run["result"], run["closed"]) == ("completed", "fail", "completed")
    assert {job: e["result"] for job, e in run["jobs"].items()} == {
        "a": "success",
        "b": "fail",
        "c": "aborted",
    }


def test_a_run_succeeds_only_if_every_member_succeeded(started: Session) -> None:
    started.end("a", "success")
    started.end("b", "success")
    assert started.doc()["status"] == "running"
    started.end("c", "success")
    assert (started.doc()["status"], started.doc()["result"]) == ("completed", "success")


def test_a_changed_end_result_is_counted_once(started: Session) -> None:
    started.end("a", "fail")
    started.end("a", "success")  # the node corrected itself before the run completed
    started.end("b", "success")
    started.end("c", "success")
    assert (started.doc()["status"], started.doc()["result"]) == ("completed", "success")


def test_an_end_after_the_run_completed_never_changes_its_result(started: Session) -> None:
    """SPEC §3: the run's result is recomputed only while it is running."""
    for job in ("a", "b", "c"):
        started.end(job, "success")
    assert result_of(started.end("a", "fail")) == ("success", 1)
    doc = started.doc()
    assert (doc["status"], doc["result"]) == ("completed", "success")
    assert doc["jobs"]["a"]["result"] == "fail"  # the job's own latest report
    assert started.run(1)["result"] == "success"


def test_a_late_end_goes_only_into_its_runs_history(started: Session, clock: Clock) -> None:
    started.start("b", 0)
    started.end("c", "success")
    clock.advance(HOLD_OFF + 1)
    started.start("a", 1)  # run 2 supersedes run 1 (b still running there)
    assert started.run(1)["result"] == "fail"
    before = started.doc()
    clock.advance(3)
    assert result_of(started.end("b", "success", tag=1)) == ("out-of-sync", 2)
    run1 = started.run(1)
    assert state(run1["jobs"]["b"]) == {
        "status": "completed",
        "result": "success",
        "time_started": T0,
        "time_ended": T0 + HOLD_OFF + 4,
    }
    assert (run1["status"], run1["result"]) == ("completed", "fail")  # recorded result kept
    after = started.doc()
    assert after["_version"] == before["_version"] + 1
    assert {k: v for k, v in after.items() if k != "_version"} == {
        k: v for k, v in before.items() if k != "_version"
    }
    assert state(after["jobs"]["b"]) == scheduled()
    # A second late end for the same run does not overwrite the first.
    assert result_of(started.end("b", "fail", tag=1)) == ("out-of-sync", 2)
    assert started.run(1)["jobs"]["b"]["result"] == "success"
    assert started.version() == after["_version"]


def test_a_late_end_never_changes_a_completed_runs_result(s: Session, clock: Clock) -> None:
    s.create(["a", "b"])
    s.start("a", 0)
    s.start("b", 0)
    s.end("a", "success")
    s.end("b", "success")
    clock.advance(HOLD_OFF + 1)
    s.start("a", 1)
    version = s.version()
    assert result_of(s.end("b", "fail", tag=1)) == ("out-of-sync", 2)
    run1 = s.run(1)
    assert (run1["result"], run1["jobs"]["b"]["result"]) == ("success", "success")
    assert s.version() == version


def test_a_late_end_of_a_job_that_was_not_a_member_records_nothing(
    started: Session, clock: Clock
) -> None:
    started.add("d")  # joins in run 2
    clock.advance(HOLD_OFF + 1)
    started.start("a", 1)
    version = started.version()
    assert result_of(started.end("d", "success", tag=1)) == ("out-of-sync", 2)
    assert "d" not in started.run(1)["jobs"]
    assert started.version() == version


def test_an_end_from_a_non_member_stays_out_of_the_runs_history(started: Session) -> None:
    """SPEC §4: a run's history lists its member jobs only."""
    started.add("d")
    assert result_of(started.end("d", "success")) == ("success", 1)
    assert "d" not in started.run(1)["jobs"]
    started.end("a", "success")
    started.end("b", "success")
    started.end("c", "success")
    assert (started.doc()["status"], started.doc()["result"]) == ("completed", "success")
    assert set(started.run(1)["jobs"]) == {"a", "b", "c"}


def test_rounds_complete_after_a_replace_that_omits_the_tag(
    s: Session, store: Store, clock: Clock
) -> None:
    s.create(["a", "b"])
    for tag in range(3):
        s.start("a", tag)
        s.start("b", tag)
        s.end("a", "success")
        s.end("b", "success")
        clock.advance(HOLD_OFF + 1)
    s.add("d")  # joins in run 4
    store.replace(
        ReplaceCommand(
            request_id=new_id(),
            project_id=PROJECT,
            session_id=s.id,
            document=SessionFields(jobs={"a": JobEntry(), "b": JobEntry(), "d": JobEntry()}),
        )
    ).raise_for_error()
    for _ in range(3):
        tag = s.doc()["session_tag"]
        assert result_of(s.start("a", tag)) == ("success", tag + 1)
        for job in ("b", "d"):
            assert result_of(s.start(job, tag)) == ("success", tag + 1)
        for job in ("a", "b", "d"):
            s.end(job, "success")
        assert (s.doc()["status"], s.doc()["result"]) == ("completed", "success")
        clock.advance(HOLD_OFF + 1)


def test_a_document_may_not_lower_the_tag(s: Session, store: Store, clock: Clock) -> None:
    s.create(["a"])
    s.start("a", 0)
    version = s.version()
    lowered = SessionFields(session_tag=0, jobs={"a": JobEntry()})
    replace = ReplaceCommand(
        request_id=new_id(), project_id=PROJECT, session_id=s.id, document=lowered
    )
    update = UpdateCommand(
        request_id=new_id(), project_id=PROJECT, session_id=s.id, patch=SessionFields(session_tag=0)
    )
    for reply in (store.replace(replace), store.update(update)):
        assert error_of(reply) == "bad_request"
        assert reply.error is not None and "may not go down" in reply.error.description
    assert (s.doc()["session_tag"], s.version()) == (1, version)
    raised = UpdateCommand(
        request_id=new_id(), project_id=PROJECT, session_id=s.id, patch=SessionFields(session_tag=7)
    )
    assert store.update(raised).ok and s.doc()["session_tag"] == 7


def test_a_late_end_for_a_run_evicted_from_history_records_nothing(
    s: Session, clock: Clock, store: Store, backend: redis.Redis
) -> None:
    s.create(["a", "b"])
    for tag in range(5):
        s.start("a", tag)
        clock.advance(HOLD_OFF + 1)
    assert [r["session_tag"] for r in store.runs(PROJECT, s.id) or []] == [3, 4, 5]
    version = s.version()
    assert result_of(s.end("b", "success", tag=1)) == ("out-of-sync", 5)
    assert s.version() == version
    assert store.runs(PROJECT, s.id, 1) == []
    keys = store.keys.session(PROJECT, s.id)
    assert not backend.hexists(keys.run_jobs, "1:b")


def test_concurrent_starts_bump_the_tag_once_and_concurrent_ends_lose_nothing(
    s: Session, store: Store
) -> None:
    jobs = [f"job-{i}" for i in range(16)]
    s.create(jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        starts = list(pool.map(lambda job: s.start(job, 0), jobs))
    assert {result_of(reply) for reply in starts} == {("success", 1)}
    doc = s.doc()
    assert doc["session_tag"] == 1
    assert {e["status"] for e in doc["jobs"].values()} == {"running"}
    assert len(store.runs(PROJECT, s.id) or []) == 1
    results = {job: "fail" if i == 3 else "success" for i, job in enumerate(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        ends = list(pool.map(lambda job: s.end(job, results[job]), jobs))
    assert all(reply.ok for reply in ends)
    run = s.run(1)
    assert (run["status"], run["result"]) == ("completed", "fail")
    assert {job: e["result"] for job, e in run["jobs"].items()} == results


# run deadline --------------------------------------------------------------------------------


@pytest.fixture
def timed(s: Session) -> Session:
    """Jobs a, b; run_timeout 60; `a` started run 1 at T0 and b ended in it."""
    s.create(["a", "b", "c"], run_timeout=60)
    reply = s.start("a", 0)
    assert reply.deadline == T0 + 60
    s.end("b", "success")
    return s


def assert_closed_by_deadline(s: Session, tag: int, closed_at: int) -> None:
    run = s.run(tag)
    assert (run["status"], run["result"], run["time_end"], run["closed"]) == (
        "completed",
        "fail",
        closed_at,
        "deadline",
    )
    assert state(run["jobs"]["a"]) == {
        "status": "completed",
        "result": "aborted",
        "time_started": T0,
        "time_ended": closed_at,
    }
    assert state(run["jobs"]["b"])["result"] == "success"
    assert state(run["jobs"]["c"]) == {
        "status": "completed",
        "result": "aborted",
        "time_started": -1,
        "time_ended": closed_at,
    }


def test_the_deadline_is_applied_by_the_next_command(timed: Session, clock: Clock) -> None:
    clock.advance(59)
    timed.add("x")
    assert timed.store.get(PROJECT, timed.id)["status"] == "running"  # type: ignore[index]
    clock.advance(1)
    timed.add("y")
    raw = timed.store.client.hgetall(timed.store.keys.session(PROJECT, timed.id).meta)
    assert raw[b"status"] == b"completed"  # written by add_job itself, before any read
    assert_closed_by_deadline(timed, 1, T0 + 60)


def test_the_deadline_is_applied_by_a_start_which_then_begins_a_new_run(
    timed: Session, clock: Clock
) -> None:
    clock.advance(61)
    assert result_of(timed.start("a", 1)) == ("success", 2)
    assert_closed_by_deadline(timed, 1, T0 + 61)


def test_the_deadline_is_applied_by_a_read(timed: Session, clock: Clock) -> None:
    clock.advance(60)
    doc = timed.doc()
    assert (doc["status"], doc["result"], doc["time_end"], doc["time_ended"]) == (
        "completed",
        "fail",
        T0 + 60,
        T0 + 60,
    )
    assert state(doc["jobs"]["a"])["result"] == "aborted"
    assert state(doc["jobs"]["c"])["result"] == "aborted"
    assert_closed_by_deadline(timed, 1, T0 + 60)


def test_the_deadline_is_applied_by_runs(timed: Session, clock: Clock) -> None:
    clock.advance(100)
    assert_closed_by_deadline(timed, 1, T0 + 100)


def test_the_sweep_applies_deadlines_and_publishes_the_completion(
    timed: Session, clock: Clock, backend: redis.Redis
) -> None:
    store = timed.store
    with subscribed(backend, timed.id) as events:
        clock.advance(59)
        assert store.sweep_deadlines() == 0
        clock.advance(1)
        assert store.sweep_deadlines() == 1
        kinds = [e["event"] for e in events()]
    assert kinds == ["run_completed"]
    raw = store.client.hgetall(store.keys.session(PROJECT, timed.id).meta)
    assert raw[b"status"] == b"completed"
    assert_closed_by_deadline(timed, 1, T0 + 60)
    assert store.client.zcard(store.keys.deadlines()) == 0
    assert store.sweep_deadlines() == 0


def test_the_sweep_reschedules_a_session_whose_run_was_renewed(
    timed: Session, clock: Clock
) -> None:
    store = timed.store
    clock.advance(61)
    timed.start("a", 1)  # closes run 1 by its deadline and starts run 2 (deadline T0+121)
    assert store.sweep_deadlines() == 0  # run 2's start moved the schedule on
    store.client.zadd(store.keys.deadlines(), {f"{PROJECT}:{timed.id}": T0})  # a stale entry
    assert store.sweep_deadlines() == 1
    assert timed.doc()["status"] == "running"
    assert store.client.zscore(store.keys.deadlines(), f"{PROJECT}:{timed.id}") == T0 + 121


def test_no_deadline_without_run_timeout(started: Session, clock: Clock) -> None:
    clock.advance(10**7)
    assert started.doc()["status"] == "running"
    assert started.store.sweep_deadlines() == 0


# history -------------------------------------------------------------------------------------


def test_history_keeps_the_last_runs_and_forgets_their_job_entries(
    s: Session, clock: Clock, store: Store, backend: redis.Redis
) -> None:
    s.create(["a", "b"])
    for tag in range(6):
        assert result_of(s.start("a", tag)) == ("success", tag + 1)
        s.start("b", tag)
        s.end("a", "success")
        s.end("b", "fail" if tag % 2 else "success")
        clock.advance(HOLD_OFF + 1)
    runs = store.runs(PROJECT, s.id)
    assert runs is not None
    assert [r["session_tag"] for r in runs] == [4, 5, 6]  # history_limit=3, ascending
    assert [r["result"] for r in runs] == ["fail", "success", "fail"]
    assert store.runs(PROJECT, s.id, 1) == []
    keys = store.keys.session(PROJECT, s.id)
    fields = {f.decode() for f in cast(list[bytes], backend.hkeys(keys.run_jobs))}
    assert fields == {f"{tag}:{job}" for tag in (4, 5, 6) for job in ("a", "b")}
    index = cast(list[bytes], backend.zrange(keys.run_jobs_index, 0, -1))
    assert {m.decode() for m in index} == fields


def test_runs_of_a_missing_tag_and_of_a_missing_session(started: Session, store: Store) -> None:
    assert started.store.runs(PROJECT, started.id, 7) == []
    assert started.store.runs(PROJECT, started.id, 0) == []
    assert store.runs(PROJECT, "nope") is None
    assert store.runs(PROJECT, "nope", 1) is None


def test_runs_are_readable_while_a_run_is_in_progress(started: Session) -> None:
    runs = started.store.runs(PROJECT, started.id)
    assert runs is not None and len(runs) == 1
    assert runs[0] == {
        "session_tag": 1,
        "time_start": T0,
        "time_end": -1,
        "status": "running",
        "result": "",
        "closed": "",
        "jobs": {
            "a": {"status": "running", "result": "", "time_started": T0, "time_ended": -1},
            "b": scheduled(),
            "c": scheduled(),
        },
    }


def test_a_never_started_session_has_no_runs(s: Session) -> None:
    s.create(["a"])
    assert s.store.runs(PROJECT, s.id) == []


# events --------------------------------------------------------------------------------------


class subscribed:
    """Listen on a session's event channel; calling the result drains what arrived."""

    def __init__(self, client: redis.Redis, session_id: str) -> None:
        self.pubsub: PubSub = client.pubsub()  # type: ignore[no-untyped-call]
        self.channel = events_channel(PROJECT, session_id)

    def __enter__(self) -> Any:
        self.pubsub.subscribe(self.channel)
        message = self.pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "subscribe"
        return self.drain

    def drain(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            message = self.pubsub.get_message(timeout=0.1)
            if message is None:
                return events
            if message["type"] == "message":
                events.append(orjson.loads(message["data"]))

    def __exit__(self, *exc: object) -> None:
        self.pubsub.close()


def test_the_events_of_a_round(s: Session, backend: redis.Redis, clock: Clock) -> None:
    with subscribed(backend, s.id) as events:
        s.create(["a"])
        s.add("b")
        s.start("a", 0)
        clock.advance(1)
        s.start("b", 0)
        s.start("b", 1)  # hold-off: no event
        s.end("a", "success")
        s.end("b", "fail")
        clock.advance(HOLD_OFF)
        s.start("a", 1)
        s.remove("b")
        received = events()
    kinds = [(e["event"], e.get("job_id"), e.get("session_tag")) for e in received]
    assert kinds == [
        ("session_created", None, None),
        ("job_added", "b", None),
        ("run_started", "a", 1),
        ("job_started", "a", 1),
        ("job_started", "b", 1),
        ("job_ended", "a", 1),
        ("job_ended", "b", 1),
        ("run_completed", None, 1),
        ("run_started", "a", 2),
        ("job_started", "a", 2),
        ("job_removed", "b", None),
    ]
    for event in received:
        model = SessionEvent.model_validate(event)
        assert (model.project_id, model.session_id) == (PROJECT, s.id)
    assert received[7]["result"] == "fail"
    assert [e["time"] for e in received[-3:]] == [T0 + 1 + HOLD_OFF] * 3


def test_late_and_superseded_runs_publish_events(
    started: Session, backend: redis.Redis, clock: Clock
) -> None:
    clock.advance(HOLD_OFF + 1)
    with subscribed(backend, started.id) as events:
        started.start("b", 0)  # out-of-sync: b's part of run 1 is aborted
        started.start("c", 1)  # run 2 supersedes run 1
        started.end("a", "success", tag=1)  # late end
        received = events()
    assert [(e["event"], e.get("session_tag"), e.get("result")) for e in received] == [
        ("job_ended", 1, "aborted"),
        ("run_completed", 1, "fail"),
        ("run_started", 2, None),
        ("job_started", 2, None),
        ("job_ended_late", 1, "success"),
    ]
    assert received[1]["closed"] == "superseded"


# the server's own clock ---------------------------------------------------------------------


@pytest.fixture
def real_time_store(backend: redis.Redis) -> Store:
    return Store(backend, Settings(default_hold_off=HOLD_OFF, history_limit=3))


def test_server_time_drives_a_round(real_time_store: Store, backend: redis.Redis) -> None:
    s = Session(real_time_store)
    s.create(["a", "b"])
    before = int(backend.time()[0])
    assert result_of(s.start("a", 0)) == ("success", 1)
    after = int(backend.time()[0])
    doc = s.doc()
    assert before <= doc["time_start"] <= after
    assert result_of(s.start("b", 1)) == ("hold-off", 1)
    assert result_of(s.start("b", 0)) == ("success", 1)
    s.end("a", "success")
    s.end("b", "success")
    doc = s.doc()
    assert (doc["status"], doc["result"]) == ("completed", "success")
    assert doc["time_start"] <= doc["time_end"] <= int(backend.time()[0])


def test_server_time_outside_hold_off_and_deadline(
    real_time_store: Store, backend: redis.Redis
) -> None:
    now = int(backend.time()[0])
    s = Session(real_time_store)
    s.create(["a", "b"], session_tag=3, time_start=now - 1000, status="running", run_timeout=5000)
    assert result_of(s.start("a", 2)) == ("out-of-sync", 3)  # b is still open in run 3
    assert s.job("a")["result"] == "aborted"
    assert result_of(s.start("a", 3)) == ("success", 4)
    assert s.run(3)["closed"] == "superseded"
    late = Session(real_time_store, "s2")
    late.create(["a"], session_tag=1, time_start=now - 100, status="running", run_timeout=10)
    doc = late.doc()  # the read applies the passed deadline with the server's clock
    assert (doc["status"], doc["result"]) == ("completed", "fail")
    assert doc["time_end"] >= now
    assert late.run(1)["closed"] == "deadline"


def test_a_session_at_the_tag_bound_starts_no_new_run(s: Session, clock: Clock) -> None:
    s.create(["a"], session_tag=MAX_INT, time_start=clock.now - 10 * HOLD_OFF)
    assert error_of(s.start("a", MAX_INT)) == "bad_request"
    assert s.doc()["session_tag"] == MAX_INT
