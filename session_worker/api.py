"""The HTTP shim: freezer-api's sessions API over the store (SPEC §6, §7).

Two path families with the same routes and behaviour: ``/v2/{project_id}/sessions...``
(freezer-api, what python-freezerclient calls) and ``/v1/sessions...`` (the project comes
from the caller's token, or ``default_project`` when auth is off). Every route is served
with and without a trailing slash, never through a redirect.

Mutations are store commands, the same scripts and request-id de-duplication the workers
use, applied directly (one script call for start and end). Bodies are parsed here with
orjson and validated with the wire models, so every error a client can cause is a 4xx with
a JSON ``{"title", "description"}`` body; Redis out of reach is a 503 with ``Retry-After``.

Start, end, add_job and remove_job call the (synchronous) store right on the event loop:
each is one O(1) script call, cheaper inline than through a thread hop, on one Redis
connection per process with a short timeout (http_redis_timeout). Reads, document writes
and the list, whose cost grows with the jobs, run in the thread pool on pooled clients. Requests are
routed by plain Starlette routes (no dependency injection); the OpenAPI document (/docs,
/openapi.json) is built from the same route table.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ipaddress
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Literal, TypeVar

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema
from redis import Redis
from redis import exceptions as redis_errors
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Route

from . import __version__, logs, metrics
from .connection import RedisClient, is_transient, make_redis
from .errors import BadRequest, NotFound, SessionWorkerError, Unavailable
from .hot_path import HotPath
from .models import (
    ID_PATTERN,
    AddJobCommand,
    Command,
    Count,
    CreateCommand,
    DeleteCommand,
    EndCommand,
    EndResult,
    Id,
    RemoveJobCommand,
    ReplaceCommand,
    Reply,
    SessionFields,
    StartCommand,
    UpdateCommand,
)
from .settings import Settings, TokenGrant, get_settings
from .store import Store

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAG = re.compile(r"[0-9]{1,13}")
_MAX_INT = 10**12
# While Redis is out of reach the shim answers 503 at once, and PINGs it this often
# (seconds), with this timeout, to know when it is back (Breaker).
PROBE_INTERVAL = 0.25
PROBE_TIMEOUT = 1.0

ACTIONS: dict[str, tuple[str, ...]] = {
    "start": ("job_id", "current_tag"),
    "end": ("job_id", "current_tag", "result"),
}
_ACTION_SHAPES = " or ".join(f'{{"{name}": {{...}}}}' for name in ACTIONS)
# What GET returns at the top level of a document: the only names a list filter may use.
DOCUMENT_FIELDS = frozenset(f.alias or n for n, f in SessionFields.model_fields.items())
_FILTER_KEYS = frozenset(("match", "match_not"))

# Handed to uvicorn worker processes (which import the app afresh) by serve().
_SETTINGS_ENV = "_SESSION_WORKER_HTTP_SETTINGS"

_JSON = "application/json"

T = TypeVar("T", bound=BaseModel)


# Errors only the shim raises (the domain errors are in errors.py) ----------------------


class ApiError(SessionWorkerError):
    """An error of the HTTP layer; `headers` go out with its response."""

    headers: ClassVar[Mapping[str, str]] = {}


class Unauthorized(ApiError):
    code, status, title = "unauthorized", 401, "Unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Token realm="session-worker"'}


class Forbidden(ApiError):
    code, status, title = "forbidden", 403, "Access Forbidden"


class PayloadTooLarge(ApiError):
    code, status, title = "too_large", 413, "Request body too large"


class UnsupportedMediaType(ApiError):
    code, status, title = "unsupported_media_type", 415, "Unsupported media type"


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


def _error(
    status: int, title: str, description: str, headers: Mapping[str, str] | None = None
) -> Response:
    return _json(status, {"title": title, "description": description}, headers)


_NO_CONTENT = 204


# Auth ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom a request acts for: the project every key is scoped to, and the user."""

    project_id: str
    user_id: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Auth:
    """``X-Auth-Token`` → grant (SPEC §7). No tokens configured: auth is off."""

    def __init__(self, tokens: Mapping[str, TokenGrant], default_project: str) -> None:
        # Looked up by digest: a lookup never compares the secret itself byte by byte.
        self._grants = {_digest(token): grant for token, grant in tokens.items()}
        self.enabled = bool(self._grants)
        self.default_project = default_project

    def caller(self, request: Request, path_project: str | None) -> Caller:
        """The caller, or 401 (no or unknown token), 403 (another project), 404 (bad id)."""
        if not self.enabled:
            if path_project is None:
                return Caller(self.default_project, "")
            if _ID.fullmatch(path_project) is None:
                raise NotFound(f"no such project: {path_project!r}")
            return Caller(path_project, "")
        token = request.headers.get("x-auth-token")
        if not token:
            raise Unauthorized("an X-Auth-Token header is required")
        grant = self._grants.get(_digest(token))
        if grant is None:
            raise Unauthorized("the X-Auth-Token is not valid")
        if path_project is not None and path_project != grant.project_id:
            raise Forbidden("the token does not grant access to this project")
        return Caller(grant.project_id, grant.user_id)


# Request parsing -----------------------------------------------------------------------


def _path_id(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    if _ID.fullmatch(value) is None:
        raise NotFound(f"no such {name.removesuffix('_id')}: {value!r}")
    return value


def _remembered(request: Request) -> bool:
    """Only a call that can be repeated (it names its Idempotency-Key) leaves a request record."""
    return "idempotency-key" in request.headers


def _request_id(request: Request) -> str:
    key = request.headers.get("idempotency-key")
    if key is None:
        return uuid.uuid4().hex
    if _ID.fullmatch(key) is None:
        raise BadRequest(f"Idempotency-Key must match {ID_PATTERN}")
    return key


def _is_json(content_type: str | None) -> bool:
    """application/json, optionally with a utf-8 charset."""
    if not content_type:
        return False
    media, _, params = content_type.partition(";")
    if media.strip().lower() != _JSON:
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def _describe(exc: ValidationError, prefix: str = "") -> str:
    unknown: list[str] = []
    other: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        where = prefix + ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.append(where)
        elif err["type"] == "missing":
            other.append(f"{where}: field required")
        else:
            other.append(f"{where or 'body'}: {err['msg']}")
    parts = [f"unknown field(s): {', '.join(unknown)}"] if unknown else []
    return "; ".join(parts + other)


def _validate(model: type[T], data: Any, prefix: str = "") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe(exc, prefix)) from None


def _object(body: Any, what: str = "the request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return body


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) > _MAX_INT:
        raise BadRequest(f"{name} must be an integer between 0 and {_MAX_INT}")
    return int(raw)


# What a mutation did, for its log line and metrics: (kind, command, reply) in the scope.
_NOTE = "session_worker.command"


def _noted(request: Request, kind: str, cmd: Command, reply: Reply) -> Reply:
    """Note the command and its reply for the request's log line; raise the reply's error."""
    request.scope[_NOTE] = (kind, cmd, reply)
    return reply.raise_for_error()


def _metered(
    kind: str, handler: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """`handler` with one log line and the command metrics per request (logs.log_command).

    Every mutation is counted, also one refused before it reached the store (401, 415, bad
    JSON...): its outcome is the error's code.
    """

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        outcome = "error:internal"
        try:
            response = await handler(request)
            outcome = "ok"
            return response
        except SessionWorkerError as exc:
            outcome = f"error:{exc.code}"
            raise
        except redis_errors.RedisError as exc:
            if is_transient(exc):
                outcome = f"error:{Unavailable.code}"
            raise
        except ClientDisconnect:
            outcome = f"error:{BadRequest.code}"
            raise
        finally:
            _record(request, kind, outcome, time.perf_counter() - started)

    endpoint.__name__ = endpoint.__qualname__ = getattr(handler, "__name__", kind)
    return endpoint


def _record(request: Request, kind: str, outcome: str, seconds: float) -> None:
    note = request.scope.get(_NOTE)
    cmd: Command | None = None
    reply: Reply | None = None
    if note is not None:
        kind, cmd, reply = note
        if reply is not None and outcome == "ok":
            outcome = metrics.outcome_of(reply)
    metrics.observe_command(kind, outcome, "http", seconds)
    params = request.path_params
    session = params.get("session_id") or (reply.session_id if reply is not None else None)
    if cmd is not None:
        request_id: object = cmd.request_id
    else:
        request_id = request.headers.get("idempotency-key")
    logs.log_command(
        log,
        via="http",
        kind=kind,
        session=session,
        job=getattr(cmd, "job_id", None) or params.get("job_id"),
        outcome=outcome,
        tag=None if reply is None else reply.session_tag,
        request_id=request_id,
        seconds=seconds,
    )


# The application -----------------------------------------------------------------------


class Shim:
    """Route handlers over one store. Every handler takes only the request (lean hot path)."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.auth = Auth(settings.auth_tokens, settings.default_project)
        self.max_body = settings.max_body_bytes
        self._store = store
        self._documents = store
        self._owned: list[RedisClient] = []
        self._hot: HotPath | None = None
        self.breaker = Breaker(settings)

    @property
    def store(self) -> Store:
        """The store of the hot path (start, end, add_job, remove_job), called on the event
        loop.

        The given store, or one over this process's own connection, made on first use.
        Raises StoreUnreachable (a 503) without a Redis call while the breaker is open.
        """
        self._check_reachable()
        if self._store is None:
            self._make_stores()
            assert self._store is not None
        return self._store

    @property
    def hot_path(self) -> HotPath:
        """Start and end on the event loop over an auto-pipelined connection to the hot-path
        store's server (hot_path.py), made on first use. Checks the breaker like `store`."""
        store = self.store
        if self._hot is None:
            self._hot = HotPath.like(store, store.client, self.settings)
        return self._hot

    @property
    def documents(self) -> Store:
        """The store of reads, document writes and the list, called in the thread pool: a
        document with thousands of jobs takes a while, and must not hold up the event loop."""
        self._check_reachable()
        if self._documents is None:
            self._make_stores()
            assert self._documents is not None
        return self._documents

    def _check_reachable(self) -> None:
        if self.breaker.open:
            raise StoreUnreachable("Redis was unreachable a moment ago")

    def _make_stores(self) -> None:
        # The hot path (start, end, add_job, remove_job: one O(1) script each) runs right on
        # the event loop, one call at a time, so one connection per process serves it
        # without a pool checkout per call (the pool's check of a connection costs a system
        # call). Its calls wait at most http_redis_timeout: a Redis that stalls holds the
        # process that long once, then the breaker answers. It connects on first use (the
        # shim starts while Redis is down and answers 503 until it is back) and retries a
        # failed call once, at once, never sleeping on the event loop.
        loop_settings = self.settings.model_copy(
            update={"redis_socket_timeout": self.settings.http_redis_timeout}
        )
        loop_client = make_redis(loop_settings, retry="immediate")
        single: RedisClient = loop_client
        if isinstance(loop_client, Redis):
            single = Redis(
                connection_pool=loop_client.connection_pool, single_connection_client=True
            )
        # A call without Idempotency-Key leaves no request record, so it is sent at most
        # once: through a client that never retries, from a pool, whose check of a
        # connection before each call replaces one the server closed (a restart) before
        # anything is sent on it. A cut after sending is a 503, never a resend.
        loop_once = make_redis(loop_settings, retry="never")
        self._store = metrics.MeteredStore(single, loop_settings, once_client=loop_once)
        # Reads and document writes (their cost grows with the jobs) run in threads, on
        # pooled clients of their own with the general socket timeout.
        pooled = make_redis(self.settings, retry="immediate")
        pooled_once = make_redis(self.settings, retry="never")
        self._documents = metrics.MeteredStore(pooled, self.settings, once_client=pooled_once)
        self._owned = [single, loop_once, pooled, pooled_once]
        if single is not loop_client:
            self._owned.append(loop_client)

    async def release_loop(self) -> None:
        """Close the hot path's connection, which belongs to the running event loop, before
        that loop ends; a later request on another loop opens a new one."""
        if self._hot is not None:
            await self._hot.aclose()

    def close(self) -> None:
        self.breaker.close()
        if self._hot is not None:
            self._hot.close()
        for client in self._owned:
            client.close()
            if isinstance(client, Redis):
                client.connection_pool.disconnect()
        self._owned = []

    # Helpers --------------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        return self.auth.caller(request, request.path_params.get("project_id"))

    async def body(self, request: Request, *, required: bool) -> Any:
        """The parsed JSON body; None when an optional body is absent."""
        content_type = request.headers.get("content-type")
        if required and not _is_json(content_type):
            raise UnsupportedMediaType(f"the request body must be {_JSON}")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit():
                raise BadRequest("Content-Length is not a number")
            if int(length) > self.max_body:
                raise PayloadTooLarge(f"the request body is over {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"the request body is over {self.max_body} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            if required:
                raise BadRequest("missing request body")
            return None
        if not _is_json(content_type):
            raise UnsupportedMediaType(f"a request body must be {_JSON}")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None

    def document(self, body: Any, caller: Caller, session_id: str | None) -> SessionFields:
        doc = _validate(SessionFields, _object(body))
        if doc.project_id is not None and doc.project_id != caller.project_id:
            raise BadRequest(f"project_id must be {caller.project_id} (the caller's project)")
        if session_id is not None and doc.session_id not in (None, session_id):
            raise BadRequest(f"session_id must be {session_id} (the session in the path)")
        return doc

    @staticmethod
    async def _write(method: Callable[..., Reply], cmd: Command, request: Request) -> Reply:
        """A document write (create, replace, update, delete), run in the thread pool."""
        reply: Reply = await run_in_threadpool(method, cmd, remember=_remembered(request))
        return reply

    # Sessions -------------------------------------------------------------------------

    async def list_sessions(self, request: Request) -> Response:
        caller = self.caller(request)
        limit = _query_int(request, "limit", 10) or 10  # freezer-api: limit=0 means 10
        offset = _query_int(request, "offset", 0)
        body = await self.body(request, required=False)
        filters: dict[str, list[dict[str, Any]]] = {"match": [], "match_not": []}
        if body is not None:
            unknown = set(_object(body)) - _FILTER_KEYS
            if unknown:
                raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
            for key in _FILTER_KEYS & set(body):
                value = body[key]
                if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
                    raise BadRequest(f"{key} must be a list of objects {{field: value}}")
                fields = {name for m in value for name in m}
                if fields - DOCUMENT_FIELDS:
                    bad = ", ".join(sorted(fields - DOCUMENT_FIELDS))
                    raise BadRequest(f"{key}: unknown field(s): {bad}")
                filters[key] = value
        # One read per session: off the event loop, so a long list never stalls the others.
        sessions = await run_in_threadpool(
            self.documents.list_sessions,
            caller.project_id,
            limit=limit,
            offset=offset,
            match=filters["match"],
            match_not=filters["match_not"],
        )
        return _json(200, {"sessions": sessions})

    async def create_session(self, request: Request) -> Response:
        caller = self.caller(request)
        request_id = _request_id(request)
        doc = self.document(await self.body(request, required=True), caller, None)
        doc = self._recorded_user(doc, caller)
        cmd = CreateCommand(
            request_id=request_id,
            reply_to=None,
            project_id=caller.project_id,
            document=doc,
            user_id=caller.user_id,
        )
        reply = _noted(
            request, "create", cmd, await self._write(self.documents.create, cmd, request)
        )
        return _json(201, {"session_id": reply.session_id})

    async def get_session(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        doc = await run_in_threadpool(self.documents.get, caller.project_id, session_id)
        if doc is None:
            raise NotFound(f"session {session_id} does not exist")
        return _json(200, doc)

    async def update_session(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        request_id = _request_id(request)
        patch = self.document(await self.body(request, required=True), caller, session_id)
        # As in freezer-api, a patch never changes who created the session.
        patch = patch.model_copy(update={"user_id": None})
        cmd = UpdateCommand(
            request_id=request_id,
            reply_to=None,
            project_id=caller.project_id,
            session_id=session_id,
            patch=patch,
        )
        reply = _noted(
            request, "update", cmd, await self._write(self.documents.update, cmd, request)
        )
        return _json(200, {"session_id": session_id, "version": reply.version})

    async def replace_session(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        request_id = _request_id(request)
        doc = self.document(await self.body(request, required=True), caller, session_id)
        doc = self._recorded_user(doc, caller)
        cmd = ReplaceCommand(
            request_id=request_id,
            reply_to=None,
            project_id=caller.project_id,
            session_id=session_id,
            document=doc,
            user_id=caller.user_id,
        )
        reply = _noted(
            request, "replace", cmd, await self._write(self.documents.replace, cmd, request)
        )
        return _json(201, {"session_id": session_id, "version": reply.version})

    async def delete_session(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        cmd = DeleteCommand(
            request_id=_request_id(request),
            reply_to=None,
            project_id=caller.project_id,
            session_id=session_id,
        )
        _noted(request, "delete", cmd, await self._write(self.documents.delete, cmd, request))
        return Response(status_code=_NO_CONTENT)

    @staticmethod
    def _recorded_user(doc: SessionFields, caller: Caller) -> SessionFields:
        """With auth on, the token's user is recorded as the creator (as freezer-api does)."""
        if caller.user_id:
            return doc.model_copy(update={"user_id": caller.user_id})
        return doc

    # Actions (the hot path: one script call) -----------------------------------------

    async def action(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        request_id = _request_id(request)
        body = await self.body(request, required=True)
        if not isinstance(body, dict) or len(body) != 1:
            raise BadRequest(f"the body must be exactly one action: {_ACTION_SHAPES}")
        ((name, params),) = body.items()
        fields = ACTIONS.get(name)
        if fields is None:
            raise BadRequest(f"unknown action {name!r}; known actions: {', '.join(ACTIONS)}")
        params = _object(params, f"{name}")
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(f'{name}.{u}' for u in unknown)}")
        data = {
            **params,
            "request_id": request_id,
            "reply_to": None,
            "project_id": caller.project_id,
            "session_id": session_id,
        }
        request.scope[_NOTE] = (name, None, None)  # a refused body is still a start / end
        remember = _remembered(request)
        cmd: StartCommand | EndCommand
        if name == "start":
            cmd = _validate(StartCommand, data, f"{name}.")
            reply = await self.hot_path.start(cmd, remember=remember)
        else:
            cmd = _validate(EndCommand, data, f"{name}.")
            reply = await self.hot_path.end(cmd, remember=remember)
        _noted(request, name, cmd, reply)
        return _json(202, {"result": reply.result, "session_tag": reply.session_tag})

    # Jobs -----------------------------------------------------------------------------

    async def add_job(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        job_id = _path_id(request, "job_id")
        request_id = _request_id(request)
        body = await self.body(request, required=False)
        client_id: Any = ""
        if body is not None:
            body = _object(body)
            unknown = set(body) - {"client_id"}
            if unknown:
                raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
            client_id = body.get("client_id", "")
        cmd = _validate(
            AddJobCommand,
            {
                "request_id": request_id,
                "reply_to": None,
                "project_id": caller.project_id,
                "session_id": session_id,
                "job_id": job_id,
                "client_id": client_id,
            },
        )
        _noted(request, "add_job", cmd, self.store.add_job(cmd, remember=_remembered(request)))
        return Response(status_code=_NO_CONTENT)

    async def remove_job(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        job_id = _path_id(request, "job_id")
        cmd = RemoveJobCommand(
            request_id=_request_id(request),
            reply_to=None,
            project_id=caller.project_id,
            session_id=session_id,
            job_id=job_id,
        )
        _noted(
            request, "remove_job", cmd, self.store.remove_job(cmd, remember=_remembered(request))
        )
        return Response(status_code=_NO_CONTENT)

    # Runs -----------------------------------------------------------------------------

    async def list_runs(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        runs = await run_in_threadpool(self.documents.runs, caller.project_id, session_id)
        if runs is None:
            raise NotFound(f"session {session_id} does not exist")
        return _json(200, {"runs": runs})

    async def get_run(self, request: Request) -> Response:
        caller = self.caller(request)
        session_id = _path_id(request, "session_id")
        raw_tag: str = request.path_params["tag"]
        if _TAG.fullmatch(raw_tag) is None or int(raw_tag) > _MAX_INT:
            raise NotFound(f"no such run: {raw_tag!r}")
        runs = await run_in_threadpool(
            self.documents.runs, caller.project_id, session_id, int(raw_tag)
        )
        if runs is None:
            raise NotFound(f"session {session_id} does not exist")
        if not runs:
            raise NotFound(f"run {int(raw_tag)} of session {session_id} is not in the history")
        return _json(200, runs[0])


# Operations: /healthz, /readyz, /metrics ---------------------------------------------

READY_TIMEOUT = 1.0  # seconds a readiness probe waits for Redis and for a worker's pong
READY_CACHE = 2.0  # seconds a readiness answer is reused (a flood of /readyz costs nothing)


class Operations:
    """Health, readiness and metrics of one shim process (no auth: no session data).

    /readyz pings Redis (a client of its own with short timeouts) and broadcasts a Celery
    ping that any worker on the broker answers; the answer is cached for READY_CACHE seconds
    and concurrent probes share one check. /metrics adds up every process writing to the
    multiprocess directory (metrics.py) and reads the queue's depth from the broker.
    """

    def __init__(self, shim: Shim) -> None:
        self.settings = shim.settings
        self._lock = asyncio.Lock()
        self._ready: tuple[float, list[str], int] | None = None  # (until, missing, workers)
        self._redis: Any = None
        self._celery: Any = None

    @property
    def celery(self) -> Any:
        """A Celery app for control messages and the queue's depth, made on first use."""
        if self._celery is None:
            from .celery_app import make_app

            self._celery = make_app(self.settings)
        return self._celery

    async def healthz(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        async with self._lock:
            now = time.monotonic()
            if self._ready is None or self._ready[0] <= now:
                missing, workers = await run_in_threadpool(self._probe)
                self._ready = (time.monotonic() + READY_CACHE, missing, workers)
            _, missing, workers = self._ready
        if missing:
            return _error(
                503, "Service unavailable", "not ready: " + "; ".join(missing), {"Retry-After": "1"}
            )
        return _json(200, {"status": "ready", "redis": "ok", "workers": workers})

    def _probe(self) -> tuple[list[str], int]:
        """What is missing (empty: ready) and how many workers answered."""
        if self._redis is None:
            quick = self.settings.model_copy(
                update={
                    "redis_socket_timeout": READY_TIMEOUT,
                    "redis_connect_timeout": READY_TIMEOUT,
                }
            )
            # One try: a stalled Redis must cost this probe READY_TIMEOUT, not retries.
            self._redis = make_redis(quick, retry="never")
        try:
            self._redis.ping()
        except (redis_errors.RedisError, OSError) as exc:
            return [f"Redis does not answer PING ({type(exc).__name__})"], 0
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=READY_TIMEOUT)
                pongs = self.celery.control.ping(timeout=READY_TIMEOUT, limit=1, connection=conn)
        except Exception as exc:  # the broker went away between the two checks
            return [f"the Celery broker cannot be reached ({type(exc).__name__})"], 0
        if not pongs:
            return [f"no Celery worker answered a ping within {READY_TIMEOUT:g} s"], 0
        return [], len(pongs)

    def queue_depth(self) -> int:
        """Messages waiting in the command queue (every priority), from the broker."""
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=READY_TIMEOUT)
            declared = conn.default_channel.queue_declare(queue=self.settings.queue)
            return int(declared.message_count)

    async def metrics(self, request: Request) -> Response:
        depth = metrics.QueueDepth(self.settings.queue, self.queue_depth)
        body = await run_in_threadpool(metrics.render, [depth])
        return Response(body, media_type=metrics.CONTENT_TYPE)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._celery is not None:
            self._celery.close()


# Documentation models (OpenAPI only; validation uses the command models) ----------------


class ErrorBody(BaseModel):
    title: str
    description: str


class SessionCreated(BaseModel):
    session_id: str


class SessionVersion(BaseModel):
    session_id: str
    version: int


class ActionReply(BaseModel):
    result: Literal["success", "hold-off", "out-of-sync"]
    session_tag: int


class SessionList(BaseModel):
    sessions: list[dict[str, Any]]


class RunList(BaseModel):
    runs: list[dict[str, Any]]


class StartParams(BaseModel):
    job_id: Id
    current_tag: Count


class EndParams(BaseModel):
    job_id: Id
    current_tag: Count | None = None
    result: EndResult


class ActionRequest(BaseModel):
    """Exactly one of `start` or `end`."""

    start: StartParams | None = None
    end: EndParams | None = None


class JobRequest(BaseModel):
    """Optional body of PUT .../jobs/{job_id}."""

    client_id: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")


class SessionFilter(BaseModel):
    """Optional body of GET .../sessions: every `match` entry must equal, no `match_not` may."""

    match: list[dict[str, Any]] = []
    match_not: list[dict[str, Any]] = []


_REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "SessionFields": SessionFields,
    "ActionRequest": ActionRequest,
    "JobRequest": JobRequest,
    "SessionFilter": SessionFilter,
}


@dataclass(frozen=True)
class _Op:
    method: str
    suffix: str
    handler: str
    status: int
    summary: str
    reply: type[BaseModel] | None = None
    body: str | None = None
    body_required: bool = True
    mutation: bool = False


# The command kind of each mutation handler (an action is start or end, known from its body).
_KINDS = {
    "action": "action",
    "create_session": "create",
    "update_session": "update",
    "replace_session": "replace",
    "delete_session": "delete",
    "add_job": "add_job",
    "remove_job": "remove_job",
}

# Registration order is matching order: the hot path (actions) comes first.
# fmt: off
_OPS = (
    _Op("POST", "/sessions/{session_id}/action", "action", 202, "Start or end a job's run",
        ActionReply, "ActionRequest", mutation=True),
    _Op("POST", "/sessions/{session_id}/actions", "action", 202,
        "Start or end a job's run (alias of .../action)", ActionReply, "ActionRequest",
        mutation=True),
    _Op("GET", "/sessions", "list_sessions", 200, "List sessions", SessionList,
        "SessionFilter", body_required=False),
    _Op("POST", "/sessions", "create_session", 201, "Create a session", SessionCreated,
        "SessionFields", mutation=True),
    _Op("GET", "/sessions/{session_id}", "get_session", 200, "Get a session"),
    _Op("PATCH", "/sessions/{session_id}", "update_session", 200, "Update a session",
        SessionVersion, "SessionFields", mutation=True),
    _Op("POST", "/sessions/{session_id}", "replace_session", 201,
        "Create or replace a session", SessionVersion, "SessionFields", mutation=True),
    _Op("DELETE", "/sessions/{session_id}", "delete_session", 204, "Delete a session",
        mutation=True),
    _Op("PUT", "/sessions/{session_id}/jobs/{job_id}", "add_job", 204,
        "Add a job to a session", None, "JobRequest", body_required=False, mutation=True),
    _Op("DELETE", "/sessions/{session_id}/jobs/{job_id}", "remove_job", 204,
        "Remove a job from a session", mutation=True),
    _Op("GET", "/sessions/{session_id}/runs", "list_runs", 200, "Run history", RunList),
    _Op("GET", "/sessions/{session_id}/runs/{tag}", "get_run", 200, "One run of the history"),
)
# fmt: on

_FAMILIES = (("v2", "/v2/{project_id}"), ("v1", "/v1"))

_ERROR_STATUSES = {
    400: "Bad request (malformed JSON, invalid fields, tag too high, job not in session)",
    401: "Missing or unknown X-Auth-Token",
    403: "The token belongs to another project",
    404: "No such session (or run)",
    409: "The session already exists",
    413: "Body over the configured limit",
    415: "Content-Type is not application/json",
    422: "Idempotency-Key reused for a different command",
    503: "Redis cannot be reached in time (retry with the same Idempotency-Key)",
}


def _openapi_extra(op: _Op, path: str) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    for name in re.findall(r"{(\w+)}", path):
        schema = {"type": "integer"} if name == "tag" else {"type": "string", "pattern": ID_PATTERN}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    params.append(
        {
            "name": "X-Auth-Token",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "Required when auth is configured",
        }
    )
    if op.mutation:
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": ID_PATTERN},
                "description": "The request id: a retry with the same key is applied once",
            }
        )
    if op.handler == "list_sessions":
        for name, default in (("limit", 10), ("offset", 0)):
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0, "default": default},
                }
            )
    extra: dict[str, Any] = {"parameters": params}
    if op.body is not None:
        extra["requestBody"] = {
            "required": op.body_required,
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{op.body}"}}},
        }
    return extra


def _responses(op: _Op) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {}
    if op.reply is not None:
        responses[op.status] = {"model": op.reply, "description": HTTPStatus(op.status).phrase}
    else:
        responses[op.status] = {"description": HTTPStatus(op.status).phrase}
    for status, description in _ERROR_STATUSES.items():
        responses[status] = {"model": ErrorBody, "description": description}
    return responses


# Error handlers ------------------------------------------------------------------------


class StoreUnreachable(redis_errors.ConnectionError):
    """Redis was found unreachable and has not answered a probe since (Breaker)."""


class Breaker:
    """Fast 503s while Redis is unreachable.

    Store calls of the hot path run on the event loop, so a Redis that refuses connections,
    or stalls, would make every request wait for its own connection attempt or timeout, one
    after another. Once a call fails that way the breaker opens: requests are answered 503
    at once, and a thread PINGs Redis every PROBE_INTERVAL seconds; the first answer closes
    the breaker again. A connection cut in the middle of a call does not open it (the next
    call simply reconnects).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.model_copy(
            update={"redis_socket_timeout": PROBE_TIMEOUT, "redis_connect_timeout": PROBE_TIMEOUT}
        )
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.open = False
        self.trips = 0

    def trip(self, exc: Exception) -> None:
        """A store call failed with `exc`: open the breaker if Redis is out of reach."""
        if not _is_unreachable(exc):
            return
        with self._lock:
            if self.open or self._stopped.is_set():
                return
            self.open = True
            self.trips += 1
        threading.Thread(target=self._probe, name="redis-probe", daemon=True).start()

    def _probe(self) -> None:
        client = make_redis(self._settings, retry="never")
        try:
            while not self._stopped.wait(PROBE_INTERVAL):
                try:
                    client.ping()
                except (redis_errors.RedisError, OSError):
                    continue
                break
        finally:
            client.close()
            self.open = False

    def close(self) -> None:
        self._stopped.set()


def _is_unreachable(exc: Exception) -> bool:
    """Redis could not be connected to (refused, unreachable) or did not answer in time, as
    opposed to a connection cut in the middle of a call (redis-py's wording tells a failed
    connect apart: utils.format_error_message)."""
    if isinstance(exc, StoreUnreachable):
        return False
    if isinstance(exc, redis_errors.TimeoutError):
        return True
    return isinstance(exc, redis_errors.ConnectionError) and " connecting to " in str(exc)


_STATUSES = frozenset(status.value for status in HTTPStatus)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves on this path (a 405's Allow header)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SessionWorkerError)
        headers = exc.headers if isinstance(exc, ApiError) else None
        return _error(exc.status, exc.title, exc.description, headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 404:
            title, description = NotFound.title, f"no such resource: {request.url.path}"
        elif status == 405:
            methods = _allowed_methods(request) or headers.get("Allow", "")
            headers["Allow"] = methods
            title = "Method not allowed"
            description = f"{request.method} is not allowed here; allowed: {methods}"
        else:
            title = HTTPStatus(status).phrase if status in _STATUSES else "Error"
            description = str(exc.detail)
        return _error(status, title, description, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return _error(400, BadRequest.title, "; ".join(parts) or "invalid request")

    async def redis_error(request: Request, exc: Exception) -> Response:
        if not is_transient(exc):  # a script or a bug of ours: nothing the client did
            log.error("unexpected Redis error: %s", exc, exc_info=exc)
            return await unexpected(request, exc)
        if not isinstance(exc, StoreUnreachable):
            log.warning("redis unavailable: %s", type(exc).__name__)
            request.app.state.shim.breaker.trip(exc)
        return _error(
            503,
            "Service unavailable",
            "the session store cannot be reached; retry with the same Idempotency-Key",
            {"Retry-After": "1"},
        )

    async def disconnected(request: Request, exc: Exception) -> Response:
        return _error(400, BadRequest.title, "the client went away while sending the body")

    async def unexpected(request: Request, exc: Exception) -> Response:
        return _error(500, "Internal error", "an unexpected error occurred on the server")

    app.add_exception_handler(SessionWorkerError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    # Redis unreachable, too slow, or refusing for now (out of memory, MISCONF, loading,
    # a replica, a cluster reconfiguring): 503 with Retry-After (connection.is_transient).
    app.add_exception_handler(redis_errors.RedisError, redis_error)
    app.add_exception_handler(Exception, unexpected)


# Building and serving ------------------------------------------------------------------


class EncodedSlashes:
    """404 for a path with an encoded slash (``%2F``) in it.

    The server decodes the path before routing, so ``/sessions/s1%2Fjobs%2Fj1`` would be
    routed as ``/sessions/s1/jobs/j1``. No id can hold a slash (SPEC §2), so such a path
    names nothing: it is answered as any path id outside the pattern is (SPEC §6).
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw and b"%2f" in raw.lower():
            response = _error(
                404, NotFound.title, f"no such resource: {raw.decode('latin-1')[:200]}"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The shim as an ASGI app; `store` defaults to one over a connection made from settings."""
    settings = settings or (store.settings if store is not None else get_settings())
    shim = Shim(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What is alive once the app is built (routes, models, schemas) lives as long as the
        # process: out of the collector's way, so a full collection between two requests
        # does not walk it all again (a pause of milliseconds, seen in the p99).
        gc.collect()
        gc.freeze()
        yield
        await shim.release_loop()
        shim.close()
        app.state.operations.close()

    app = FastAPI(
        title="session-worker",
        version=__version__,
        description=(
            "freezer-api compatible sessions API (v2, `/v2/{project_id}/sessions`) and the "
            "same routes under `/v1/sessions` (project from the token). Errors are "
            '`{"title", "description"}`.'
        ),
        redirect_slashes=False,
        lifespan=lifespan,
        # No OpenTelemetry here (metrics are Prometheus, metrics.py): FastAPI's native
        # telemetry would otherwise look for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.shim = shim
    # Requests are served by plain routes whose handlers take only the request (no
    # dependency solving on the hot path); the OpenAPI document is built from APIRoutes made
    # from the same table, which are never mounted.
    documented: list[BaseRoute] = []
    for op in _OPS:
        for family, prefix in _FAMILIES:
            path = prefix + op.suffix
            endpoint: Callable[[Request], Awaitable[Response]] = getattr(shim, op.handler)
            served = _metered(_KINDS[op.handler], endpoint) if op.mutation else endpoint
            name = f"{family}_{op.handler}"
            for variant in (path, path + "/"):
                app.router.routes.append(Route(variant, served, methods=[op.method], name=name))
            documented.append(
                APIRoute(
                    path,
                    endpoint,
                    methods=[op.method],
                    status_code=op.status,
                    summary=op.summary,
                    name=name,
                    tags=[f"sessions ({family})"],
                    responses=_responses(op),
                    openapi_extra=_openapi_extra(op, path),
                    response_class=Response,
                )
            )
    # Operations: no auth, outside /v1 and /v2 (load balancers and Prometheus call them).
    ops = Operations(shim)
    app.state.operations = ops
    for path, handler in (
        ("/healthz", ops.healthz),
        ("/readyz", ops.readyz),
        ("/metrics", ops.metrics),
    ):
        app.router.routes.append(Route(path, handler, methods=["GET"], name=path[1:]))
    _install_error_handlers(app)
    _install_openapi(app, documented)
    app.add_middleware(EncodedSlashes)
    return app


def _install_openapi(app: FastAPI, routes: list[BaseRoute]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=routes,
            )
            _, defs = models_json_schema(
                [(model, "validation") for model in _REQUEST_MODELS.values()],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_environment() -> FastAPI:
    """uvicorn factory for worker processes: the settings serve() handed down, else the env."""
    logs.configure()  # a uvicorn worker process: our format, like its parent's
    raw = os.environ.get(_SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else get_settings()
    return create_app(settings)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to serve without auth on anything but loopback (SPEC §7)."""
    if settings.auth_tokens or _is_loopback(host):
        return
    if settings.insecure_no_auth:
        log.warning("serving on %s without authentication (insecure_no_auth is set)", host)
        return
    raise SystemExit(
        f"refusing to serve on {host} without authentication: configure "
        "SESSION_WORKER_AUTH_TOKENS, bind to 127.0.0.1, or set "
        "SESSION_WORKER_INSECURE_NO_AUTH=true to accept the risk"
    )


def serve(
    settings: Settings | None = None,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    *,
    access_log: bool = False,
) -> None:
    """Run the shim under uvicorn (uvloop and httptools when installed) until stopped."""
    import importlib.util

    import uvicorn

    settings = settings or get_settings()
    host = host or settings.http_host
    port = settings.http_port if port is None else port
    workers = workers or settings.http_workers
    check_bind(settings, host)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": loop,
        "http": http,
        "access_log": access_log,
        "server_header": False,
        "log_level": "info",
        # uvicorn's loggers go to the root logger, in SESSION_WORKER_LOG_FORMAT (logs.py).
        "log_config": None,
    }
    if workers > 1:
        os.environ[_SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)


__all__ = ["Auth", "Caller", "Shim", "app_from_environment", "check_bind", "create_app", "serve"]
