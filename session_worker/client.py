"""What a node uses: send a command through the queue, wait for its reply; read a session.

    with SessionClient("redis://127.0.0.1:6379/0", project_id="acme") as client:
        reply = client.start("db-cluster", "node-1", current_tag=3).raise_for_error()
        if reply.result == "success":
            ...  # back up, tagged reply.session_tag

Every command gets a request id (uuid4 hex unless given) and a reply key in the session's key
space; the worker's script pushes the reply there. Sending the same command again with the
same request id (after a timeout, say) is safe: it is applied once and answered with the
same reply. Reads go straight to Redis, not through the queue.
"""

from __future__ import annotations

import builtins
import uuid
from types import TracebackType
from typing import Any, Self

from celery import Celery

from .celery_app import make_app, task_name
from .connection import make_redis
from .errors import BadRequest, ReplyTimeout
from .metrics import REPLY_TIMEOUTS
from .models import COMMAND_MODELS, ID_RE, JobRecord, Reply
from .replies import wait_reply
from .settings import Settings, get_settings
from .store import Store, derived_session_id

_MAX_REPR = 512


def _summary(fields: dict[str, Any]) -> str:
    """The command's own fields, short (no ids the task id and reply key already carry)."""
    shown = (
        f"{name}={value!r}"
        for name, value in fields.items()
        if name not in ("request_id", "reply_to", "project_id") and not isinstance(value, dict)
    )
    return ", ".join(shown)[:_MAX_REPR]


class SessionClient:
    """Commands through the queue (typed replies) and reads from the store, for one project.

    A command method returns the Reply whether or not it carries an error (use
    ``reply.raise_for_error()``); it raises errors.ReplyTimeout when no reply arrives in
    time, and errors.BadRequest for ids that cannot form a reply key. Thread-safe.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        project_id: str = "default",
        settings: Settings | None = None,
        timeout: float | None = None,
        app: Celery | None = None,
    ) -> None:
        settings = settings or get_settings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        _check_id("project_id", project_id)
        self.settings = settings
        self.project_id = project_id
        self.timeout = settings.reply_timeout if timeout is None else timeout
        self._own_app = app is None
        self.app: Celery = make_app(settings) if app is None else app
        self._redis = make_redis(settings)
        # Waits block for at most `self.timeout` per BLPOP, under this client's socket timeout.
        self._block = max(self.timeout, 1.0)
        self._wait_redis = make_redis(settings, wait_timeout=self._block)
        self.store = Store(self._redis, settings)

    # Sending and waiting ----------------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> tuple[str, str]:
        """Enqueue one command; returns its request id and the reply key to wait on.

        `fields` are the command's fields (models.COMMAND_MODELS[kind]); project_id defaults
        to the client's, request_id to a new uuid4 hex. The worker validates the command and
        answers an invalid one with a bad_request reply.
        """
        if kind not in COMMAND_MODELS:
            known = ", ".join(COMMAND_MODELS)
            raise BadRequest(f"unknown command {kind!r}; known commands: {known}")
        fields.setdefault("project_id", self.project_id)
        request_id = fields.get("request_id") or uuid.uuid4().hex
        fields["request_id"] = request_id
        project_id = _check_id("project_id", fields["project_id"])
        _check_id("request_id", request_id)
        if kind == "create":
            document = fields.get("document") or {}
            session_id = document.get("session_id") if isinstance(document, dict) else None
            session_id = session_id or derived_session_id(project_id, request_id)
        else:
            session_id = fields.get("session_id")
        reply_key = self.store.keys.reply(
            project_id, _check_id("session_id", session_id), request_id
        )
        fields["reply_to"] = reply_key
        self.app.send_task(
            task_name(kind),
            kwargs=fields,
            queue=self.settings.queue,
            # The Celery task id is the request id (Flower, logs and the unacked set then
            # name the command as its sender does).
            task_id=request_id,
            # What Flower and the worker log show: a short summary, not a second copy of
            # the command (Celery puts it in the message twice).
            argsrepr="()",
            kwargsrepr=_summary(fields),
        )
        return request_id, reply_key

    def wait(self, reply_key: str, timeout: float | None = None) -> Reply:
        """The reply pushed to `reply_key` (even one pushed before this call), or ReplyTimeout."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return wait_reply(self._wait_redis, reply_key, timeout, max_block=self._block)
        except ReplyTimeout:
            REPLY_TIMEOUTS.inc()
            raise

    def call(self, kind: str, *, timeout: float | None = None, **fields: Any) -> Reply:
        """Send one command and wait for its reply."""
        _, reply_key = self.send(kind, **fields)
        return self.wait(reply_key, timeout)

    # Commands ---------------------------------------------------------------------------

    def start(
        self,
        session_id: str,
        job_id: str,
        current_tag: int,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Ask to start the session's run (SPEC §3): success, hold-off or out-of-sync."""
        return self.call(
            "start",
            timeout=timeout,
            request_id=request_id,
            session_id=session_id,
            job_id=job_id,
            current_tag=current_tag,
        )

    def end(
        self,
        session_id: str,
        job_id: str,
        result: str,
        current_tag: int | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Report the job's result (success, fail, aborted) for run `current_tag`."""
        return self.call(
            "end",
            timeout=timeout,
            request_id=request_id,
            session_id=session_id,
            job_id=job_id,
            result=result,
            current_tag=current_tag,
        )

    def add_job(
        self,
        session_id: str,
        job_id: str,
        client_id: str = "",
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Put a job into the session; the reply carries its job_schedule."""
        return self.call(
            "add_job",
            timeout=timeout,
            request_id=request_id,
            session_id=session_id,
            job_id=job_id,
            client_id=client_id,
        )

    def remove_job(
        self,
        session_id: str,
        job_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Take a job out of the session."""
        return self.call(
            "remove_job",
            timeout=timeout,
            request_id=request_id,
            session_id=session_id,
            job_id=job_id,
        )

    def create(
        self,
        document: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        user_id: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Create a session; without a session id, one derived from the request id.

        The reply's session_id is the new session's id.
        """
        document = dict(document or {})
        if session_id is not None:
            if document.get("session_id", session_id) != session_id:
                raise BadRequest("session_id differs from the document's session_id")
            document["session_id"] = session_id
        fields: dict[str, Any] = {"request_id": request_id, "document": document}
        if user_id:
            fields["user_id"] = user_id
        return self.call("create", timeout=timeout, **fields)

    def replace(
        self,
        session_id: str,
        document: dict[str, Any],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Create or overwrite the session's document (its run history is kept)."""
        return self.call(
            "replace",
            timeout=timeout,
            request_id=request_id,
            session_id=session_id,
            document=document,
        )

    def update(
        self,
        session_id: str,
        patch: dict[str, Any],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Merge `patch` into the session's document."""
        return self.call(
            "update", timeout=timeout, request_id=request_id, session_id=session_id, patch=patch
        )

    def delete(
        self, session_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Reply:
        """Delete the session, its history and its request records."""
        return self.call("delete", timeout=timeout, request_id=request_id, session_id=session_id)

    # Reads (straight from Redis) ----------------------------------------------------------

    def get(self, session_id: str) -> dict[str, Any] | None:
        """The session document, or None."""
        return self.store.get(self.project_id, session_id)

    def list(
        self,
        limit: int = 10,
        offset: int = 0,
        match: list[dict[str, Any]] | None = None,
        match_not: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """The project's sessions by creation time; `match` all equal, `match_not` none."""
        return self.store.list_sessions(
            self.project_id, limit=limit, offset=offset, match=match, match_not=match_not
        )

    def runs(self, session_id: str, tag: int | None = None) -> builtins.list[dict[str, Any]] | None:
        """The session's run history ascending by tag (only run `tag` when given), or None."""
        return self.store.runs(self.project_id, session_id, tag)

    def job_record(self, job_id: str) -> JobRecord | None:
        """The job's own record (its session, tag and schedule), or None."""
        return self.store.job_record(self.project_id, job_id)

    # Lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the Redis connections (and the Celery app when this client made it)."""
        self._redis.close()
        self._wait_redis.close()
        if self._own_app:
            self.app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or ID_RE.match(value) is None:
        raise BadRequest(f"{name} must match [A-Za-z0-9_-]{{1,64}}, got {value!r}")
    return value
