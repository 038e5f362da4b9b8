"""A reference model of SPEC §3 and §4 in plain Python: sessions, jobs, runs and their history.

It is written from the specification's text, not from the Lua scripts, so that
tests/test_model_based.py can drive it and the real Store with the same random commands and
compare every reply and every document. Where the specification leaves a choice open, the
choice is named in a comment marked "Reading:" (and listed in that test module's docstring).

What it models: create (with hold_off, run_timeout, session_tag and jobs), delete, start, end,
add_job (a job belongs to one session: adding it elsewhere moves it), remove_job, the
run deadline (applied by the next command or read of the session, and by the sweep), the
run history bounded to the last `history_limit` runs, request-id de-duplication (same
command: the stored reply and no effect; another command: idempotency_mismatch; not_found
is not stored) and `_version` (+1 for every command or read that changes anything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCHEDULED = "scheduled"
RUNNING = "running"
COMPLETED = "completed"

STATE_FIELDS = ("status", "result", "time_started", "time_ended")


@dataclass
class Job:
    """A job entry of the session document."""

    client_id: str = ""
    status: str = SCHEDULED
    result: str = ""
    time_started: int = -1
    time_ended: int = -1
    member: bool = False  # a member of the current run
    # The job has a state of its own in the current run (it started, ended, or the
    # out-of-sync rule aborted it); an `aborted` written by the run's close is not its own.
    own: bool = False

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STATE_FIELDS}

    def document(self) -> dict[str, Any]:
        return {"client_id": self.client_id, **self.state(), "member": self.member}

    def reset(self) -> None:
        self.status, self.result, self.time_started, self.time_ended = SCHEDULED, "", -1, -1
        self.own = False


@dataclass
class Run:
    """One entry of the run history (SPEC §4)."""

    session_tag: int
    time_start: int
    time_end: int = -1
    status: str = RUNNING
    result: str = ""
    closed: str = ""  # how it completed: "completed", "deadline" or "superseded"
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Member jobs that reported in this run (started, ended, or were aborted by the
    # out-of-sync rule); the others' entries only say what the run did to them.
    reported: set[str] = field(default_factory=set)
    # Member jobs whose `aborted` was written by the run's close (deadline or superseded).
    aborted_by_close: set[str] = field(default_factory=set)

    def document(self) -> dict[str, Any]:
        return {
            "session_tag": self.session_tag,
            "time_start": self.time_start,
            "time_end": self.time_end,
            "status": self.status,
            "result": self.result,
            "closed": self.closed,
            "jobs": {job_id: dict(entry) for job_id, entry in self.jobs.items()},
        }


@dataclass(frozen=True)
class Outcome:
    """What the model answers to a command."""

    ok: bool
    result: str | None = None
    session_tag: int | None = None
    error: str | None = None
    added: bool | None = None
    removed: bool | None = None

    @classmethod
    def failure(cls, code: str) -> Outcome:
        return cls(ok=False, error=code)


NOT_FOUND = Outcome.failure("not_found")
BAD_REQUEST = Outcome.failure("bad_request")


@dataclass
class Session:
    session_id: str
    hold_off: int
    run_timeout: int
    session_tag: int
    time_start: int = -1
    time_end: int = -1
    time_started: int = -1
    time_ended: int = -1
    status: str = ""
    result: str = ""
    version: int = 1
    jobs: dict[str, Job] = field(default_factory=dict)
    runs: dict[int, Run] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "hold_off": self.hold_off,
            "run_timeout": self.run_timeout,
            "session_tag": self.session_tag,
            "time_start": self.time_start,
            "time_end": self.time_end,
            "time_started": self.time_started,
            "time_ended": self.time_ended,
            "status": self.status,
            "result": self.result,
            "_version": self.version,
            "jobs": {job_id: job.document() for job_id, job in self.jobs.items()},
        }

    def history(self) -> list[dict[str, Any]]:
        return [self.runs[tag].document() for tag in sorted(self.runs)]

    def members(self) -> dict[str, Job]:
        return {job_id: job for job_id, job in self.jobs.items() if job.member}


def fingerprint(kind: str, payload: dict[str, Any]) -> str:
    """Two commands are "the same" when their kind and every field but the request id match."""
    body = {k: v for k, v in payload.items() if k not in ("request_id", "reply_to")}
    return json.dumps([kind, body], sort_keys=True)


class ReferenceModel:
    """Every session of one project, and the job records (job id -> session id, "" detached)."""

    def __init__(self, history_limit: int) -> None:
        self.history_limit = history_limit
        self.sessions: dict[str, Session] = {}
        self.records: dict[str, str] = {}
        # Request records per session id (fingerprint, reply). They belong to the session's
        # id, not to one incarnation of it: they outlive a delete (README "Request records"),
        # and a session created again under the id keeps them.
        self.requests: dict[str, dict[str, tuple[str, Outcome]]] = {}
        self._changed = False

    # The command layer ----------------------------------------------------------------------

    def apply(self, kind: str, payload: dict[str, Any], now: int) -> tuple[Outcome, bool]:
        """Apply one command; also say whether the reply was a stored one (a replay)."""
        session_id = payload["session_id"]
        request_id = payload["request_id"]
        fp = fingerprint(kind, payload)
        # A request record answers whether or not the session exists now (SPEC §5: the same
        # request id returns the stored reply; another command under it is refused).
        records = self.requests.get(session_id, {})
        if request_id in records:
            stored_fp, stored = records[request_id]
            if stored_fp == fp:
                return stored, True
            return Outcome.failure("idempotency_mismatch"), False
        outcome = self._fresh(kind, payload, now)
        # README "Request records": a not_found reply is not remembered; every other one is,
        # and a delete forgets none of them: a command repeated after the delete (a create
        # redelivered late, say) gets its first answer and is not applied again.
        if outcome.error != "not_found":
            self.requests.setdefault(session_id, {})[request_id] = (fp, outcome)
        return outcome, False

    def _fresh(self, kind: str, payload: dict[str, Any], now: int) -> Outcome:
        args = {k: v for k, v in payload.items() if k not in ("request_id", "reply_to")}
        args.pop("project_id", None)
        request_id: str = payload["request_id"]
        if kind == "create":
            return self.create(now=now, request_id=request_id, **args)
        if kind == "add_job":
            return self.add_job(now=now, request_id=request_id, **args)
        method = getattr(self, kind)
        outcome: Outcome = method(now=now, **args)
        return outcome

    def _begin(self, session: Session, now: int) -> None:
        self._changed = False
        self._deadline(session, now)

    def _finish(self, session: Session) -> None:
        if self._changed:
            session.version += 1
        self._changed = False

    # Reads ---------------------------------------------------------------------------------

    def read(self, session_id: str, now: int) -> Session | None:
        """What Store.get / Store.runs see: the passed deadline is applied first."""
        session = self.sessions.get(session_id)
        if session is not None:
            self._begin(session, now)
            self._finish(session)
        return session

    def sweep(self, now: int) -> None:
        for session in self.sessions.values():
            self._begin(session, now)
            self._finish(session)

    # Commands ------------------------------------------------------------------------------

    def create(
        self,
        *,
        session_id: str,
        hold_off: int,
        run_timeout: int,
        session_tag: int,
        jobs: list[str],
        now: int,
        request_id: str,
    ) -> Outcome:
        if session_id in self.sessions:
            return Outcome.failure("conflict")
        session = Session(session_id, hold_off, run_timeout, session_tag)
        # Reading: before its first run a session's jobs are members of no run.
        session.jobs = {job_id: Job() for job_id in jobs}
        self.sessions[session_id] = session
        for job_id in jobs:
            self._attach(session_id, job_id, f"{request_id}:move:{job_id}", now)
        return Outcome(ok=True)

    def delete(self, *, session_id: str, now: int) -> Outcome:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return NOT_FOUND
        for job_id in session.jobs:
            if self.records.get(job_id) == session_id:
                self.records[job_id] = ""
        return Outcome(ok=True)

    def start(self, *, session_id: str, job_id: str, current_tag: int, now: int) -> Outcome:
        session = self.sessions.get(session_id)
        if session is None:
            return NOT_FOUND
        self._begin(session, now)
        try:
            return self._start(session, job_id, current_tag, now)
        finally:
            self._finish(session)

    def _start(self, s: Session, job_id: str, tag: int, now: int) -> Outcome:
        job = s.jobs.get(job_id)
        if job is None or tag > s.session_tag:
            return BAD_REQUEST
        big_t = s.session_tag
        inside = s.time_start != -1 and now - s.time_start <= s.hold_off
        if inside:
            if tag == big_t:
                return Outcome(ok=True, result="hold-off", session_tag=big_t)
            # README "start, inside the hold-off, lower tag": the rows are applied in order,
            # so a job that already started in run T is told success even once run T has
            # completed; one whose only state there is the close's `aborted` is out-of-sync.
            if s.status == RUNNING and job.member and job.status == SCHEDULED:
                job.status, job.result, job.time_started = RUNNING, "", now
                job.own = True
                self._record(s, job_id)
                return Outcome(ok=True, result="success", session_tag=big_t)
            if job.own:
                return Outcome(ok=True, result="success", session_tag=big_t)
            return Outcome(ok=True, result="out-of-sync", session_tag=big_t)
        if tag == big_t:
            self._new_run(s, job_id, now)
            return Outcome(ok=True, result="success", session_tag=s.session_tag)
        if s.status == RUNNING and job.member and job.status == SCHEDULED:
            job.status, job.result, job.time_ended = COMPLETED, "aborted", now
            job.own = True
            self._record(s, job_id)
            self._recompute(s, now)
        return Outcome(ok=True, result="out-of-sync", session_tag=big_t)

    def _new_run(self, s: Session, job_id: str, now: int) -> None:
        if s.status == RUNNING:
            self._close(s, now, "superseded")
        s.session_tag += 1
        s.time_start, s.time_end = now, -1
        s.status, s.result = RUNNING, ""
        if s.time_started == -1:
            s.time_started = now
        for job in s.jobs.values():
            job.member = True
            job.reset()
        starter = s.jobs[job_id]
        starter.status, starter.time_started, starter.own = RUNNING, now, True
        s.runs[s.session_tag] = Run(
            s.session_tag,
            now,
            jobs={j: job.state() for j, job in s.jobs.items()},
            reported={job_id},
        )
        for old in sorted(s.runs)[: -self.history_limit]:
            del s.runs[old]
        self._changed = True

    def end(
        self, *, session_id: str, job_id: str, current_tag: int | None, result: str, now: int
    ) -> Outcome:
        session = self.sessions.get(session_id)
        if session is None:
            return NOT_FOUND
        self._begin(session, now)
        try:
            return self._end(session, job_id, current_tag, result, now)
        finally:
            self._finish(session)

    def _end(self, s: Session, job_id: str, tag: int | None, result: str, now: int) -> Outcome:
        job = s.jobs.get(job_id)
        if tag is None:
            tag = s.session_tag
        if job is None or result not in ("success", "fail", "aborted") or tag > s.session_tag:
            return BAD_REQUEST
        if tag < s.session_tag:
            run = s.runs.get(tag)
            entry = run.jobs.get(job_id) if run is not None else None
            # README "Late ends": the `aborted` a deadline or a newer run wrote is replaced by
            # the real result; an end or the out-of-sync rule's `aborted` is not.
            if (
                run is not None
                and entry is not None
                and (entry["status"] != COMPLETED or job_id in run.aborted_by_close)
            ):
                entry.update(status=COMPLETED, result=result, time_ended=now)
                run.aborted_by_close.discard(job_id)
                run.reported.add(job_id)
                self._changed = True
            return Outcome(ok=True, result="out-of-sync", session_tag=s.session_tag)
        # README "Late ends": a job whose part of the run closed before it started (the
        # out-of-sync rule's `aborted`) has no result to report for this run.
        missed = job.own and job.status == COMPLETED and job.result == "aborted"
        if missed and job.time_started == -1:
            return Outcome(ok=True, result="out-of-sync", session_tag=s.session_tag)
        job.status, job.result, job.time_ended = COMPLETED, result, now
        job.own = True
        self._changed = True
        self._record(s, job_id)
        self._recompute(s, now)
        return Outcome(ok=True, result="success", session_tag=s.session_tag)

    def add_job(
        self, *, session_id: str, job_id: str, client_id: str, now: int, request_id: str
    ) -> Outcome:
        session = self.sessions.get(session_id)
        if session is None:
            return NOT_FOUND
        self._begin(session, now)
        added = job_id not in session.jobs
        if added:
            session.jobs[job_id] = Job(client_id=client_id)
            self._changed = True
        self._finish(session)
        self._attach(session_id, job_id, f"{request_id}:move:{job_id}", now)
        return Outcome(ok=True, added=added)

    def remove_job(self, *, session_id: str, job_id: str, now: int) -> Outcome:
        session = self.sessions.get(session_id)
        if session is None:
            return NOT_FOUND
        self._begin(session, now)
        job = session.jobs.pop(job_id, None)
        if job is not None:
            self._changed = True
            # Reading: a member removed from the running run leaves that run's history (it
            # lists member jobs only). README "History membership": a closed run keeps it
            # only if it reported there; one that never did no longer appears in that run.
            run = session.runs.get(session.session_tag)
            if job.member and session.status == RUNNING and run is not None:
                run.jobs.pop(job_id, None)
            for old in session.runs.values():
                if job_id not in old.reported:
                    old.jobs.pop(job_id, None)
            self._recompute(session, now)
            if self.records.get(job_id) == session_id:
                self.records[job_id] = ""
        self._finish(session)
        return Outcome(ok=True, removed=job is not None)

    # Outside the session's slot --------------------------------------------------------------

    def _attach(self, session_id: str, job_id: str, move_request_id: str, now: int) -> None:
        """The job's record points at session_id; the session it was in before loses it."""
        previous = self.records.get(job_id, "")
        self.records[job_id] = session_id
        if previous and previous != session_id:
            self.apply(
                "remove_job",
                {"request_id": move_request_id, "session_id": previous, "job_id": job_id},
                now,
            )

    # Runs ----------------------------------------------------------------------------------

    def _record(self, s: Session, job_id: str) -> None:
        """The current run's history entry follows the job (member jobs only)."""
        self._changed = True
        job = s.jobs[job_id]
        run = s.runs.get(s.session_tag)
        if job.member and run is not None:
            run.jobs[job_id] = job.state()
            run.reported.add(job_id)
            run.aborted_by_close.discard(job_id)

    def _recompute(self, s: Session, now: int) -> None:
        if s.status != RUNNING:
            return
        members = s.members()
        # "removing the last job leaves the run open for its deadline": no members, no close.
        if not members or any(job.status != COMPLETED for job in members.values()):
            return
        success = all(job.result == "success" for job in members.values())
        self._complete(s, now, "success" if success else "fail", "completed")

    def _deadline(self, s: Session, now: int) -> None:
        if s.status == RUNNING and s.run_timeout > 0 and now >= s.time_start + s.run_timeout:
            self._close(s, now, "deadline")

    def _close(self, s: Session, now: int, how: str) -> None:
        """Close the running run as failed: its unfinished member jobs are aborted.

        Reading: the close is a change of its own (+1 to `_version`), whichever command or
        read applies it, so the version never depends on whether anyone read in between.
        """
        changed = self._changed
        run = s.runs.get(s.session_tag)
        for job_id, job in s.members().items():
            if job.status != COMPLETED:
                job.status, job.result, job.time_ended = COMPLETED, "aborted", now
                if run is not None:
                    run.jobs[job_id] = job.state()
                    run.aborted_by_close.add(job_id)
        self._complete(s, now, "fail", how)
        s.version += 1
        self._changed = changed

    def _complete(self, s: Session, now: int, result: str, how: str) -> None:
        s.status, s.result = COMPLETED, result
        s.time_end = s.time_ended = now
        run = s.runs.get(s.session_tag)
        if run is not None:
            run.status, run.result, run.time_end, run.closed = COMPLETED, result, now, how
        self._changed = True
