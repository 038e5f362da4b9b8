"""Every Redis key and pub/sub channel name, built in one place.

All keys of one session share the hash tag ``{<project>:<session>}``, so every session script
touches one slot and runs on Redis Cluster. Ids match ``[A-Za-z0-9_-]{1,64}``, so the tag
cannot be ambiguous. Keys outside a session's slot: a job's own record (its slot is the job),
the per-project session index and the deadline schedule.
"""

from __future__ import annotations

from typing import NamedTuple


class SessionKeys(NamedTuple):
    """The KEYS every session script receives, in this order (see lua/_prelude.lua)."""

    meta: str  # hash: session scalars, schedule JSON, counters of the current run
    jobs: str  # hash: job_id -> job JSON
    runs: str  # hash: tag -> run JSON (history)
    run_jobs: str  # hash: "<tag>:<job_id>" -> the job's state in that run
    run_jobs_index: str  # zset: "<tag>:<job_id>" scored by tag (per-run listing, eviction)
    request: str  # string: this request's record, "<fingerprint>|<reply JSON>" (TTL)
    reply: str  # list: this request's reply, read by the waiting caller


class KeyBuilder:
    def __init__(self, prefix: str = "sw") -> None:
        self.prefix = prefix

    def session_base(self, project_id: str, session_id: str) -> str:
        return f"{self.prefix}:{{{project_id}:{session_id}}}"

    def request(self, project_id: str, session_id: str, request_id: str) -> str:
        """String: what the command with this request id answered, and its fingerprint."""
        return f"{self.session_base(project_id, session_id)}:request:{request_id}"

    def reply(self, project_id: str, session_id: str, request_id: str) -> str:
        return f"{self.session_base(project_id, session_id)}:reply:{request_id}"

    def session(self, project_id: str, session_id: str, request_id: str = "-") -> SessionKeys:
        base = self.session_base(project_id, session_id)
        return SessionKeys(
            meta=f"{base}:meta",
            jobs=f"{base}:jobs",
            runs=f"{base}:runs",
            run_jobs=f"{base}:runjobs",
            run_jobs_index=f"{base}:runjobs:ix",
            request=self.request(project_id, session_id, request_id),
            reply=self.reply(project_id, session_id, request_id),
        )

    def job_record(self, project_id: str, job_id: str) -> str:
        """Hash: the job's own record (session_id, session_tag, job_schedule)."""
        return f"{self.prefix}:job:{{{project_id}:{job_id}}}"

    def job_move(self, project_id: str, job_id: str, request_id: str) -> str:
        """String: which session a job was taken from by this request (de-duplicates moves)."""
        return f"{self.job_record(project_id, job_id)}:move:{request_id}"

    def project_index(self, project_id: str) -> str:
        """Zset: the project's session ids scored by creation time."""
        return f"{self.prefix}:index:{{{project_id}}}"

    def deadlines(self) -> str:
        """Zset: "<project>:<session>" scored by the time its running run expires."""
        return f"{self.prefix}:deadlines"


def events_channel(project_id: str, session_id: str) -> str:
    return f"sessions:{project_id}:{session_id}:events"
