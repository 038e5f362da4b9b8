"""Typed methods over the Lua scripts: the only module that calls them.

Each command is one script call on the session's slot. What lies outside that slot (a job's
own record, the project's session index, the deadline schedule) is updated in separate
one-slot steps after it, each idempotent and ordered so that a crash between two of them
loses nothing: a redelivered command gets its stored reply and runs the steps again.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import orjson
from redis.exceptions import NoScriptError

from .connection import RedisClient
from .keys import KeyBuilder, events_channel
from .models import (
    SCALAR_FIELDS,
    AddJobCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    EndCommand,
    JobRecord,
    RemoveJobCommand,
    ReplaceCommand,
    Reply,
    SessionCommand,
    SessionFields,
    StartCommand,
    UpdateCommand,
    scalar_defaults,
)
from .scripts import Scripts
from .settings import Settings, get_settings

# The fields of the stored session that are the service's bookkeeping, not the document's.
_INTERNAL = ("members", "done", "failed", "closed", "hist_min", "created_at", "version")
_INTERNAL_FIELDS = (*_INTERNAL, "run_completed")  # run_completed: a read's note for metrics

# Script calls sent in one pipeline by _run_many.
BATCH = 500
# Seconds the marker of a job move made by a command without a request record is kept: long
# enough for a retry of the call itself, not 24 hours of memory per call.
UNREMEMBERED_MARKER_TTL = 60

# Scripts that change nothing (they may apply a passed deadline, which is idempotent).
READ_SCRIPTS = frozenset({"read", "runs"})

_SESSION_NAMESPACE = uuid.UUID("4b6f1c1e-52a3-4c36-9e0d-5e3c1f0a7d21")


def derived_session_id(project_id: str, request_id: str) -> str:
    """The id of a session created without one: fixed by the request, so a retry finds it."""
    return uuid.uuid5(_SESSION_NAMESPACE, f"{project_id}:{request_id}").hex


def fingerprint(kind: str, payload: dict[str, Any]) -> str:
    """What makes two commands with one request id "the same command"."""
    body = {k: v for k, v in payload.items() if k not in ("request_id", "reply_to")}
    return hashlib.sha1(orjson.dumps([kind, body], option=orjson.OPT_SORT_KEYS)).hexdigest()


def _derived_request_id(request_id: str, step: str) -> str:
    return hashlib.sha1(f"{request_id}:{step}".encode()).hexdigest()


def _document_args(doc: SessionFields, defaults: dict[str, Any] | None) -> list[str]:
    """ARGV[10..12] of create / replace / update: scalars, schedule, jobs."""
    given = doc.model_dump(include=set(SCALAR_FIELDS), exclude_none=True)
    scalars = {**defaults, **given} if defaults is not None else given
    if doc.schedule is not None:
        schedule = orjson.dumps(doc.schedule.model_dump(exclude_none=True)).decode()
    else:
        schedule = "{}" if defaults is not None else ""
    jobs = {
        job_id: entry.model_dump(exclude_none=True, exclude={"member"})
        for job_id, entry in (doc.jobs or {}).items()
    }
    return [orjson.dumps(scalars).decode(), schedule, orjson.dumps(jobs).decode()]


def _same(stored: Any, wanted: Any) -> bool:
    """JSON equality, types included: 1.0 and true do not match the integer 1."""
    if type(stored) is not type(wanted):
        return False
    if isinstance(stored, dict):
        return stored.keys() == wanted.keys() and all(_same(stored[k], wanted[k]) for k in stored)
    if isinstance(stored, list):
        return len(stored) == len(wanted) and all(map(_same, stored, wanted))
    return bool(stored == wanted)


def _error(reply: Reply) -> str | None:
    return reply.error.code if reply.error is not None else None


def _text(value: Any) -> str:
    """A Redis reply item as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _object(value: Any) -> dict[str, Any]:
    """An empty Lua table comes back as [] from some servers: it is always an object here."""
    return {} if value == [] else cast(dict[str, Any], value)


class Store:
    """Session commands and reads on one Redis (or Redis Cluster) client."""

    def __init__(
        self,
        client: RedisClient,
        settings: Settings | None = None,
        *,
        clock: Callable[[], int] | None = None,
        once_client: RedisClient | None = None,
    ) -> None:
        self.client = client
        # Commands that leave no request record (remember=False) go through `once_client`
        # when given: a client that never retries (connection.make_redis(retry="never")),
        # because a call retried after its answer was lost would apply the command twice.
        self.once_client = once_client
        self.settings = settings or get_settings()
        self.keys = KeyBuilder(self.settings.key_prefix)
        self.scripts = Scripts(client)
        self._clock = clock  # tests only: replaces the server's TIME inside the scripts

    # Script calls -------------------------------------------------------------------------

    def _run(
        self,
        script: str,
        project_id: str,
        session_id: str,
        request_id: str,
        fp: str,
        push_reply: bool,
        args: Iterable[Any] = (),
    ) -> Any:
        keys, argv = self._script_args(project_id, session_id, request_id, fp, push_reply, args)
        return self._call(script, keys, argv, once=not request_id and script not in READ_SCRIPTS)

    def _call(self, script: str, keys: list[str], argv: list[Any], *, once: bool) -> Any:
        client = self.once_client if once and self.once_client is not None else self.client
        return self.returned(self.scripts[script](keys=keys, args=argv, client=client))

    def _script_args(
        self,
        project_id: str,
        session_id: str,
        request_id: str,
        fp: str,
        push_reply: bool,
        args: Iterable[Any],
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of a session script (the layout of lua/_prelude.lua)."""
        keys = self.keys.session(project_id, session_id, request_id or "-")
        argv: list[Any] = [
            request_id,
            fp,
            self.settings.request_ttl,
            self.settings.reply_ttl if push_reply else 0,
            events_channel(project_id, session_id),
            self.settings.history_limit,
            "" if self._clock is None else self._clock(),
            project_id,
            session_id,
            *args,
        ]
        return list(keys), argv

    def returned(self, raw: Any) -> Any:
        """Every session script's return value passes here (MeteredStore counts from it)."""
        return raw

    def _run_many(self, script: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Call one script many times (keys, args each) in pipelines: one round trip per
        BATCH calls. A call the pipeline could not run for want of the script on its node
        (NOSCRIPT: a cluster pipeline does not load scripts) is made again on its own."""
        found: list[Any] = []
        runner = self.scripts[script]
        for begin in range(0, len(calls), BATCH):
            chunk = calls[begin : begin + BATCH]
            with self.client.pipeline(transaction=False) as pipe:
                for keys, args in chunk:
                    runner(keys=keys, args=args, client=pipe)
                answers = pipe.execute(raise_on_error=False)
            for (keys, args), answer in zip(chunk, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    answer = runner(keys=keys, args=args)
                elif isinstance(answer, Exception):
                    raise answer
                found.append(answer)
        return found

    def _command(
        self,
        kind: str,
        cmd: Command,
        session_id: str,
        args: Iterable[Any] = (),
        remember: bool = True,
    ) -> Reply:
        """Run one command script. `remember=False` (an HTTP call without Idempotency-Key,
        which nobody can repeat) skips the request record: no de-duplication, no memory."""
        prepared = self.command_args(kind, cmd, session_id, args, remember=remember)
        if isinstance(prepared, Reply):
            return prepared
        keys, argv = prepared
        return Reply.model_validate_json(self._call(kind, keys, argv, once=not remember))

    def command_args(
        self,
        kind: str,
        cmd: Command,
        session_id: str,
        args: Iterable[Any] = (),
        *,
        remember: bool = True,
    ) -> tuple[list[str], list[Any]] | Reply:
        """KEYS and ARGV of command script `kind`, or the error reply of a command refused
        before any call (a reply_to that is not its own reply list)."""
        reply_key = self.keys.reply(cmd.project_id, session_id, cmd.request_id)
        if cmd.reply_to is not None and cmd.reply_to != reply_key:
            return Reply.failure(
                cmd.request_id, session_id, "bad_request", f"reply_to must be {reply_key}"
            )
        return self._script_args(
            cmd.project_id,
            session_id,
            cmd.request_id if remember else "",
            fingerprint(kind, cmd.model_dump(mode="json")) if remember else "",
            cmd.reply_to is not None,
            args,
        )

    # Commands -----------------------------------------------------------------------------

    @staticmethod
    def start_args(cmd: StartCommand) -> list[Any]:
        """The arguments of start.lua after the common ones."""
        return [cmd.job_id, cmd.current_tag]

    @staticmethod
    def end_args(cmd: EndCommand) -> list[Any]:
        """The arguments of end.lua after the common ones."""
        return [cmd.job_id, "" if cmd.current_tag is None else cmd.current_tag, cmd.result]

    def start(self, cmd: StartCommand, *, remember: bool = True) -> Reply:
        reply = self._command("start", cmd, cmd.session_id, self.start_args(cmd), remember=remember)
        self._schedule_deadline(cmd.project_id, cmd.session_id, reply)
        return reply

    def end(self, cmd: EndCommand, *, remember: bool = True) -> Reply:
        return self._command("end", cmd, cmd.session_id, self.end_args(cmd), remember=remember)

    def add_job(self, cmd: AddJobCommand, *, remember: bool = True) -> Reply:
        reply = self._command(
            "add_job", cmd, cmd.session_id, [cmd.job_id, cmd.client_id], remember=remember
        )
        if reply.ok and not reply.gone:
            schedule = orjson.dumps(reply.job_schedule or {}).decode()
            tag = reply.session_tag or 0
            self._attach(cmd, cmd.session_id, [cmd.job_id], tag, schedule, remember)
        return reply

    def remove_job(self, cmd: RemoveJobCommand, *, remember: bool = True) -> Reply:
        reply = self._command("remove_job", cmd, cmd.session_id, [cmd.job_id], remember=remember)
        if reply.ok and not (reply.repeated and not reply.gone and self._has_job(cmd, cmd.job_id)):
            # (A repeat finds the job back in the session: added again since; its record
            # is the new add's.)
            self._detach_jobs(cmd.project_id, cmd.session_id, [cmd.job_id])
        return reply

    def create(self, cmd: CreateCommand, *, remember: bool = True) -> Reply:
        doc = cmd.document
        session_id = doc.session_id or derived_session_id(cmd.project_id, cmd.request_id)
        defaults = scalar_defaults(self.settings.default_hold_off)
        if cmd.user_id and not doc.user_id:
            defaults["user_id"] = cmd.user_id
        reply = self._command(
            "create", cmd, session_id, _document_args(doc, defaults), remember=remember
        )
        if reply.ok and not reply.gone:
            self._index(cmd.project_id, session_id, reply)
            self._attach_jobs(cmd, session_id, doc, reply, remember)
        elif reply.error is not None and reply.error.code == "conflict":
            # The session exists. If its creator's steps after the script never ran (a
            # create without a request id answered 503, say), the create repeated by that
            # caller finishes its indexing: the 409 leaves the session listed.
            created_at = self.client.hget(
                self.keys.session(cmd.project_id, session_id).meta, "created_at"
            )
            if created_at is not None:
                index = self.keys.project_index(cmd.project_id)
                self.client.zadd(index, {session_id: int(created_at)}, nx=True)
        return reply

    def replace(self, cmd: ReplaceCommand, *, remember: bool = True) -> Reply:
        doc = cmd.document
        defaults = scalar_defaults(self.settings.default_hold_off)
        del defaults["session_tag"]  # not given: the session keeps its tag (0 when new)
        if cmd.user_id and not doc.user_id:
            defaults["user_id"] = cmd.user_id
        reply = self._command(
            "replace", cmd, cmd.session_id, _document_args(doc, defaults), remember=remember
        )
        if reply.ok and not reply.gone:
            self._index(cmd.project_id, cmd.session_id, reply)
            detached = list(reply.detached or ())
            if reply.repeated:  # a job added back since is the new add's (see remove_job)
                detached = [job for job in detached if not self._has_job(cmd, job)]
            self._detach_jobs(cmd.project_id, cmd.session_id, detached)
            self._attach_jobs(cmd, cmd.session_id, doc, reply, remember)
        return reply

    def update(self, cmd: UpdateCommand, *, remember: bool = True) -> Reply:
        reply = self._command(
            "update", cmd, cmd.session_id, _document_args(cmd.patch, None), remember=remember
        )
        if reply.ok and not reply.gone:
            self._schedule_deadline(cmd.project_id, cmd.session_id, reply)
            self._attach_jobs(cmd, cmd.session_id, cmd.patch, reply, remember)
        return reply

    def delete(self, cmd: DeleteCommand, *, remember: bool = True) -> Reply:
        reply = self._command("delete", cmd, cmd.session_id, remember=remember)
        # A repeated delete redoes the steps below unless the session was created again since.
        if reply.ok and (reply.gone or not reply.repeated):
            self._detach_jobs(cmd.project_id, cmd.session_id, list(reply.detached or ()))
        if (reply.ok and (reply.gone or not reply.repeated)) or _error(reply) == "not_found":
            # (A delete of an absent session also clears what a delete whose steps after
            # its script never ran left behind: the session is not there to list.)
            self.client.zrem(self.keys.deadlines(), f"{cmd.project_id}:{cmd.session_id}")
            self.client.zrem(self.keys.project_index(cmd.project_id), cmd.session_id)
        return reply

    def apply(self, kind: str, cmd: Command) -> Reply:
        """Run a validated command by its kind (what the workers call)."""
        method: Callable[[Any], Reply] = getattr(self, kind)
        return method(cmd)

    # Steps outside the session's slot -----------------------------------------------------

    def _index(self, project_id: str, session_id: str, reply: Reply) -> None:
        created_at = reply.created_at or 0
        self.client.zadd(self.keys.project_index(project_id), {session_id: created_at}, nx=True)
        self._schedule_deadline(project_id, session_id, reply)

    def deadline_entry(
        self, project_id: str, session_id: str, reply: Reply
    ) -> tuple[str, str, int] | None:
        """(key, member, score) of the sweep's schedule entry that `reply` asks for, if any."""
        if reply.ok and not reply.gone and reply.deadline is not None:
            return self.keys.deadlines(), f"{project_id}:{session_id}", reply.deadline
        return None

    def _schedule_deadline(self, project_id: str, session_id: str, reply: Reply) -> None:
        entry = self.deadline_entry(project_id, session_id, reply)
        if entry is not None:
            key, member, score = entry
            self.client.zadd(key, {member: score})

    def _attach_jobs(
        self, cmd: Command, session_id: str, doc: SessionFields, reply: Reply, remember: bool
    ) -> None:
        if doc.jobs:
            # The session's schedule as stored, read once for all the jobs.
            meta = self.keys.session(cmd.project_id, session_id).meta
            schedule = _text(self.client.hget(meta, "schedule") or b"{}")
            tag = reply.session_tag or 0
            self._attach(cmd, session_id, list(doc.jobs), tag, schedule, remember)

    def _attach(
        self,
        cmd: Command,
        session_id: str,
        job_ids: list[str],
        tag: int,
        schedule: str,
        remember: bool,
    ) -> None:
        """Point the jobs' records here (`schedule`: the session's, JSON); take each job out
        of the session it was in before. Pipelined: a document with 10,000 jobs costs a few
        round trips, not 10,000. A command that leaves no request record (`remember` false)
        leaves no lasting marker either: only long enough to cover a retry of this call."""
        marker_ttl = self.settings.request_ttl if remember else UNREMEMBERED_MARKER_TTL
        previous = self._run_many(
            "attach_job",
            [
                (
                    [
                        self.keys.job_record(cmd.project_id, job_id),
                        self.keys.job_move(cmd.project_id, job_id, cmd.request_id),
                    ],
                    [session_id, tag, schedule, marker_ttl],
                )
                for job_id in job_ids
            ],
        )
        moves = []
        for job_id, old in zip(job_ids, previous, strict=True):
            old_session = _text(old)
            if old_session and old_session != session_id:
                move = RemoveJobCommand(
                    request_id=_derived_request_id(cmd.request_id, f"move:{job_id}"),
                    reply_to=None,
                    project_id=cmd.project_id,
                    session_id=old_session,
                    job_id=job_id,
                )
                request_id = move.request_id if remember else ""
                fp = fingerprint("remove_job", move.model_dump(mode="json")) if remember else ""
                moves.append(
                    self._script_args(cmd.project_id, old_session, request_id, fp, False, [job_id])
                )
        for raw in self._run_many("remove_job", moves):
            self.returned(raw)

    def _has_job(self, cmd: SessionCommand, job_id: str) -> bool:
        """Does the command's session hold the job now?"""
        jobs = self.keys.session(cmd.project_id, cmd.session_id).jobs
        return bool(self.client.hexists(jobs, job_id))

    def _detach_jobs(self, project_id: str, session_id: str, job_ids: list[str]) -> None:
        """Detach the jobs' records from `session_id` (those that still point at it)."""
        self._run_many(
            "detach_job",
            [([self.keys.job_record(project_id, job_id)], [session_id]) for job_id in job_ids],
        )

    # Reads --------------------------------------------------------------------------------

    def get(self, project_id: str, session_id: str) -> dict[str, Any] | None:
        """The session document as the API shows it, or None."""
        raw = self._run("read", project_id, session_id, "", "", False)
        if not raw:
            return None
        return self._document(orjson.loads(raw))

    @staticmethod
    def _document(stored: dict[str, Any]) -> dict[str, Any]:
        doc = {k: v for k, v in stored.items() if k not in _INTERNAL_FIELDS}
        doc["schedule"] = _object(orjson.loads(stored.get("schedule") or "{}"))
        doc["jobs"] = _object(stored.get("jobs", {}))
        doc["_version"] = stored.get("version", 0)
        return doc

    def runs(
        self, project_id: str, session_id: str, tag: int | None = None
    ) -> list[dict[str, Any]] | None:
        """The run history ascending by tag (one run when `tag` is given), or None."""
        raw = self._run("runs", project_id, session_id, "", "", False, ["" if tag is None else tag])
        if not raw:
            return None
        runs = orjson.loads(raw)["runs"]
        if runs == {}:
            return []
        for run in runs:
            run["jobs"] = _object(run["jobs"])
        return cast(list[dict[str, Any]], runs)

    def list_sessions(
        self,
        project_id: str,
        *,
        limit: int = 10,
        offset: int = 0,
        match: list[dict[str, Any]] | None = None,
        match_not: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions ordered by creation time then id; `match` all equal, `match_not` none."""
        index = self.keys.project_index(project_id)
        ids = [_text(i) for i in cast(list[Any], self.client.zrange(index, 0, -1))]
        found: list[dict[str, Any]] = []
        skipped = 0
        for session_id in ids:
            doc = self.get(project_id, session_id)
            if doc is None:
                continue
            if not all(_same(doc.get(k), v) for m in match or () for k, v in m.items()):
                continue
            if any(_same(doc.get(k), v) for m in match_not or () for k, v in m.items()):
                continue
            if skipped < offset:
                skipped += 1
                continue
            found.append(doc)
            if len(found) >= limit:
                break
        return found

    def job_record(self, project_id: str, job_id: str) -> JobRecord | None:
        raw = cast(dict[Any, Any], self.client.hgetall(self.keys.job_record(project_id, job_id)))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        session_id = fields["session_id"]
        if session_id and not self.client.hexists(
            self.keys.session(project_id, session_id).jobs, job_id
        ):
            # The record is derived from the sessions, which hold the truth: one pointing at
            # a session that no longer holds the job (its detach was lost to a crash, a 503
            # or a race with a delete) is detached now, and read as such.
            self._detach_jobs(project_id, session_id, [job_id])
            return JobRecord(session_id="", session_tag=0, job_schedule={"event": "stop"})
        return JobRecord(
            session_id=session_id,
            session_tag=int(fields["session_tag"]),
            job_schedule=_object(orjson.loads(fields["job_schedule"])),
        )

    # Deadlines ----------------------------------------------------------------------------

    def sweep_deadlines(self, batch: int = 100) -> int:
        """Apply every passed run deadline (the periodic sweep of SPEC §4); returns how many."""
        now = self._clock() if self._clock else int(cast(Any, self.client.time())[0])
        schedule = self.keys.deadlines()
        due = [
            _text(m)
            for m in cast(list[Any], self.client.zrangebyscore(schedule, "-inf", now, 0, batch))
        ]
        for member in due:
            project_id, session_id = member.split(":", 1)
            doc = self.get(project_id, session_id)  # the read applies the deadline
            if doc and doc["status"] == "running" and doc["run_timeout"] > 0:
                deadline = doc["time_start"] + doc["run_timeout"]
                self.client.zadd(schedule, {member: deadline})
            else:
                self.client.zrem(schedule, member)
        return len(due)
