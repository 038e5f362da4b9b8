"""Thin, explicitly named Celery tasks: one per command kind (``session_worker.start`` ...).

A task receives the command's fields as keyword arguments, validates them with the command's
pydantic model, and runs it through the Store (one Lua script call, which stores the reply
under the request id and pushes it to ``reply_to``). It returns nothing: there is no result
backend. A command that cannot be run (invalid fields, a ``reply_to`` that is not its reply
key) is answered with a ``bad_request`` error reply when its ``reply_to`` is a well-formed
reply key, else logged and dropped; it never raises, so it is never retried and never
poisons the queue. Redis being unreachable is the one failure that is retried (with
backoff): the request id makes a repeated command harmless.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

from celery import shared_task
from celery.signals import task_unknown, worker_process_init
from pydantic import ValidationError

from .celery_app import task_name
from .connection import is_transient, make_redis
from .errors import BadRequest, SessionWorkerError, Unavailable
from .logs import log_command
from .metrics import MeteredStore, observe_command, outcome_of
from .models import COMMAND_MODELS, Command, CreateCommand, Reply, SessionCommand
from .replies import ReplyKey, parse_reply_key, push_reply
from .settings import Settings, get_settings
from .store import Store, derived_session_id

logger = logging.getLogger(__name__)

MAX_RETRIES = 12  # 1 + 2 + 4 + 8 + 16 + 7 * 30 s: about four minutes of outage
RETRY_BACKOFF = 1.0  # seconds before the first retry, doubled each time ...
RETRY_BACKOFF_MAX = 30.0  # ... up to this (keep it well under visibility_timeout)
MAX_DESCRIPTION = 2000

# Test-only fault injection, read once at import: "before:<seconds>" or "after:<seconds>"
# makes every command sleep that long before or after its script, so that an integration
# test can kill the worker in the middle of a command. Unset in every real deployment.
_TEST_PAUSE = os.environ.get("SESSION_WORKER_TEST_PAUSE", "")


# The Store of this process ----------------------------------------------------------------

_store: Store | None = None
_store_pid = 0


def get_store(settings: Settings | None = None) -> Store:
    """This process's Store, created on first use (so after the pool forked)."""
    global _store, _store_pid
    if _store is None or _store_pid != os.getpid():
        settings = settings or get_settings()
        _store, _store_pid = MeteredStore(make_redis(settings), settings), os.getpid()
    return _store


def use_store(store: Store | None) -> None:
    """Make the tasks of this process use `store` (None: build one from settings again)."""
    global _store, _store_pid
    _store, _store_pid = store, os.getpid()


def _forget_store_after_fork(**_: Any) -> None:
    use_store(None)


worker_process_init.connect(_forget_store_after_fork)


def _app_settings(app: Any) -> Settings | None:
    settings = getattr(app, "session_worker_settings", None)
    return settings if isinstance(settings, Settings) else None


# Running one command ----------------------------------------------------------------------


def run_command(
    kind: str, fields: dict[str, Any], store: Store, *, args: tuple[Any, ...] = ()
) -> Reply | None:
    """Validate and apply one command; returns its reply (None when it had nowhere to go).

    Raises only what connection.is_transient calls worth a retry (Redis unreachable, timing
    out, out of memory, loading, a replica after a failover...); every other failure becomes
    an error reply.
    """
    started = time.perf_counter()
    try:
        reply = _apply(kind, fields, store, args)
    except Exception as exc:  # a bug, or a script error: answer, do not retry
        if is_transient(exc):
            raise
        logger.exception("kind=%s request=%s failed", kind, _text(fields.get("request_id")))
        reply = _refuse(
            store, fields, SessionWorkerError.code, f"the worker could not apply {kind}: {exc}"
        )
    _log(kind, fields, reply, started)
    return reply


def _apply(kind: str, fields: dict[str, Any], store: Store, args: tuple[Any, ...]) -> Reply | None:
    if args:
        return _refuse(
            store,
            fields,
            BadRequest.code,
            f"{kind} takes keyword arguments only, not {len(args)} positional",
        )
    model = COMMAND_MODELS[kind]
    try:
        cmd = model.model_validate(fields)
    except ValidationError as exc:
        return _refuse(store, fields, BadRequest.code, f"invalid {kind} command: {describe(exc)}")
    expected = store.keys.reply(cmd.project_id, _session_of(cmd), cmd.request_id)
    if cmd.reply_to is not None and cmd.reply_to != expected:
        return _refuse(store, fields, BadRequest.code, f"reply_to must be {expected}")
    _test_pause("before", cmd.request_id)
    reply = store.apply(kind, cmd)
    _test_pause("after", cmd.request_id)
    return reply


def _session_of(cmd: Command) -> str:
    """The session a command acts on (a create without an id: derived from its request)."""
    if isinstance(cmd, SessionCommand):
        return cmd.session_id
    assert isinstance(cmd, CreateCommand)
    return cmd.document.session_id or derived_session_id(cmd.project_id, cmd.request_id)


def _refuse(store: Store, fields: dict[str, Any], code: str, description: str) -> Reply | None:
    """Push an error reply for a command that was not applied; None when it has no reply key."""
    return refuse(store, fields.get("reply_to"), fields, code, description)


def refuse(
    store: Store, reply_to: object, fields: dict[str, Any], code: str, description: str
) -> Reply | None:
    """Push an error reply to `reply_to` when it is the command's own reply key; else log and
    drop it."""
    if len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 3] + "..."
    key = parse_reply_key(store.settings.key_prefix, reply_to)
    if key is None or not _is_own_reply_key(fields, key):
        logger.warning(
            "dropped a command without its own reply_to (%s: %s); request=%s",
            code,
            description,
            _text(fields.get("request_id")),
        )
        return None
    request_id = fields.get("request_id")
    session_id = fields.get("session_id")
    reply = Reply.failure(
        request_id if isinstance(request_id, str) else key.request_id,
        session_id if isinstance(session_id, str) else key.session_id,
        code,
        description,
    )
    assert isinstance(reply_to, str)
    push_reply(store.client, reply_to, reply, store.settings.reply_ttl)
    return reply


def _is_own_reply_key(fields: dict[str, Any], key: ReplyKey) -> bool:
    """Whether `key` can be the reply list of the command `fields`: every id the command
    carries as a string (project, request, session; for a create without a session id, the
    one derived from its request id) is the key's. A refusal goes nowhere else, so a
    command cannot direct an answer into another session's or project's keys; ids missing
    or garbled are taken from the key, so such a command still gets its error reply."""

    def given(name: str, value: Any) -> str:
        return value if isinstance(value, str) else str(getattr(key, name))

    project_id = given("project_id", fields.get("project_id"))
    request_id = given("request_id", fields.get("request_id"))
    session_id = fields.get("session_id")
    document = fields.get("document")
    if session_id is None and isinstance(document, dict):
        session_id = document.get("session_id")
        if session_id is None:
            session_id = derived_session_id(project_id, request_id)
    own = (project_id, request_id, given("session_id", session_id))
    return own == (key.project_id, key.request_id, key.session_id)


def describe(exc: ValidationError) -> str:
    """A validation error in one line that names every offending field."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "command"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _log(kind: str, fields: dict[str, Any], reply: Reply | None, started: float) -> None:
    """The command's metrics and its one log line (logs.log_command)."""
    seconds = time.perf_counter() - started
    outcome = outcome_of(reply)
    observe_command(kind, outcome, "queue", seconds)
    log_command(
        logger,
        via="queue",
        kind=kind,
        session=reply.session_id if reply and reply.session_id else fields.get("session_id"),
        job=fields.get("job_id"),
        outcome=outcome,
        tag=None if reply is None else reply.session_tag,
        request_id=fields.get("request_id"),
        seconds=seconds,
    )


def _text(value: object) -> str:
    """A field for a log line: short, on one line, "-" when absent."""
    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else repr(value)
    return text[:80].replace("\n", " ")


def _test_pause(phase: str, request_id: str) -> None:
    wanted, _, seconds = _TEST_PAUSE.partition(":")
    if wanted == phase:
        logger.warning(
            "test pause %s request=%s pid=%d: sleeping %s s",
            phase,
            request_id,
            os.getpid(),
            seconds,
        )
        time.sleep(float(seconds))


# The tasks --------------------------------------------------------------------------------


def _retry_countdown(retries: int) -> float:
    return min(RETRY_BACKOFF_MAX, RETRY_BACKOFF * 2.0**retries) * random.uniform(0.5, 1.0)


def _execute(task: Any, kind: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    store = get_store(_app_settings(task.app))
    try:
        run_command(kind, fields, store, args=args)
    except Exception as exc:
        if not is_transient(exc):
            raise
        retries: int = task.request.retries
        request_id = _text(fields.get("request_id"))
        if retries >= MAX_RETRIES:
            logger.error(
                "kind=%s request=%s gave up after %d retries: Redis unavailable (%s)",
                kind,
                request_id,
                retries,
                exc,
            )
            _refuse_quietly(store, fields, f"Redis unavailable: {exc}")
            return
        countdown = _retry_countdown(retries)
        logger.warning(
            "kind=%s request=%s Redis unavailable (%s); retry %d/%d in %.1f s",
            kind,
            request_id,
            exc,
            retries + 1,
            MAX_RETRIES,
            countdown,
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from exc


def _refuse_quietly(store: Store, fields: dict[str, Any], description: str) -> None:
    try:
        _refuse(store, fields, Unavailable.code, description)
    except Exception:
        logger.debug("could not push the unavailable reply", exc_info=True)


def _command_task(kind: str) -> Any:
    def run(self: Any, *args: Any, **fields: Any) -> None:
        _execute(self, kind, args, fields)

    run.__name__ = run.__qualname__ = kind
    run.__doc__ = f"Apply one {kind} command (fields: models.{COMMAND_MODELS[kind].__name__})."
    return shared_task(name=task_name(kind), bind=True, ignore_result=True, typing=False)(run)


start = _command_task("start")
end = _command_task("end")
add_job = _command_task("add_job")
remove_job = _command_task("remove_job")
create = _command_task("create")
replace = _command_task("replace")
update = _command_task("update")
delete = _command_task("delete")

TASKS: dict[str, Any] = {
    "start": start,
    "end": end,
    "add_job": add_job,
    "remove_job": remove_job,
    "create": create,
    "replace": replace,
    "update": update,
    "delete": delete,
}


# Messages for a task nobody knows ---------------------------------------------------------


def _answer_unknown_task(sender: Any = None, name: str = "", message: Any = None, **_: Any) -> None:
    """Answer a message for an unregistered task name when its reply key can be read.

    Only a JSON body is looked at (parsed with json, never with kombu's deserialisers).
    """
    try:
        if message is None or message.content_type != "application/json":
            return
        body = json.loads(message.body)
        kwargs = body[1] if isinstance(body, list) and len(body) == 3 else None
        if not isinstance(kwargs, dict):
            return
        app = getattr(sender, "app", None)
        known = ", ".join(sorted(task_name(kind) for kind in COMMAND_MODELS))
        refuse(
            get_store(_app_settings(app)),
            kwargs.get("reply_to"),
            kwargs,
            BadRequest.code,
            f"unknown task {name!r}; known tasks: {known}",
        )
    except Exception:
        logger.exception("could not answer a message for unknown task %r", name)


task_unknown.connect(_answer_unknown_task)
