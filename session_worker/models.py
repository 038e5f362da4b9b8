"""Pydantic wire models: the session document, each command, replies, runs and events."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from .errors import error_from_code

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
MAX_INT = 10**12  # Lua numbers are doubles, printed with 14 significant digits

Id = Annotated[StrictStr, Field(pattern=ID_PATTERN)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_INT)]
Time = Annotated[StrictInt, Field(ge=-1, le=MAX_INT)]
Text = Annotated[StrictStr, Field(max_length=65_536)]

SessionStatus = Literal["", "running", "completed"]
SessionResult = Literal["", "success", "fail"]
JobStatus = Literal["scheduled", "running", "completed"]
JobResult = Literal["", "success", "fail", "aborted"]
EndResult = Literal["success", "fail", "aborted"]
ScheduleStatus = Literal["", "completed", "stop", "scheduled", "running", "aborting", "removed"]

_CRON = Annotated[StrictStr, Field(max_length=64)]
_INTERVAL = r"^(continuous|[0-9]{1,9} (weeks|days|hours|minutes|seconds))$"
_ISO_DATETIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _real_datetime(value: str | None) -> str | None:
    """An ISO-8601 date-time that exists (the pattern alone lets 2024-13-45T99:99 in)."""
    if value is not None:
        try:
            dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"not a valid date-time: {exc}") from None
    return value


class Schedule(Strict):
    """A session's scheduling information: the fields of a freezer job_schedule."""

    time_created: Time | None = None
    time_started: Time | None = None
    time_ended: Time | None = None
    event: Literal["", "stop", "start", "abort", "remove"] | None = None
    status: (
        Literal["", "completed", "stop", "scheduled", "running", "aborting", "removed"] | None
    ) = None
    result: Literal["", "success", "fail", "aborted"] | None = None
    schedule_date: Annotated[StrictStr, Field(pattern=_ISO_DATETIME)] | None = None
    schedule_start_date: Annotated[StrictStr, Field(pattern=_ISO_DATETIME)] | None = None
    schedule_end_date: Annotated[StrictStr, Field(pattern=_ISO_DATETIME)] | None = None
    schedule_interval: Annotated[StrictStr, Field(pattern=_INTERVAL)] | None = None
    schedule_year: Annotated[StrictStr, Field(pattern=r"^[0-9]{4}$")] | None = None
    schedule_month: _CRON | None = None
    schedule_day: _CRON | None = None
    schedule_week: _CRON | None = None
    schedule_day_of_week: _CRON | None = None
    schedule_hour: _CRON | None = None
    schedule_minute: _CRON | None = None
    schedule_second: _CRON | None = None
    current_pid: Count | None = None

    _dates = field_validator("schedule_date", "schedule_start_date", "schedule_end_date")(
        _real_datetime
    )


class JobEntry(Strict):
    """A job inside a session document. `member` is output only (ignored on input)."""

    client_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{0,64}$")] | None = None
    status: JobStatus | None = None
    result: JobResult | None = None
    time_started: Time | None = None
    time_ended: Time | None = None
    member: StrictBool | None = None


class SessionFields(Strict):
    """The writable fields of a session document; every one optional (PATCH)."""

    session_id: Id | None = None
    project_id: Id | None = None
    user_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{0,64}$")] | None = None
    description: Text | None = None
    hold_off: Count | None = None
    session_tag: Count | None = None
    schedule: Schedule | None = None
    jobs: dict[Id, JobEntry] | None = None
    time_start: Time | None = None
    time_end: Time | None = None
    time_started: Time | None = None
    time_ended: Time | None = None
    status: SessionStatus | None = None
    result: SessionResult | None = None
    run_timeout: Count | None = None
    # Accepted so that a fetched document can be sent back; the service keeps its own.
    # Only as `_version`: a field named `version` is unknown, like any other.
    version: Count | None = Field(default=None, alias="_version")


# Fields a caller may set; the rest of a document (ids, _version) is the service's.
SCALAR_FIELDS = (
    "user_id",
    "description",
    "hold_off",
    "session_tag",
    "time_start",
    "time_end",
    "time_started",
    "time_ended",
    "status",
    "result",
    "run_timeout",
)


def scalar_defaults(hold_off: int) -> dict[str, Any]:
    """What a new session holds where the document is silent (SPEC §2)."""
    return {
        "user_id": "",
        "description": "",
        "hold_off": hold_off,
        "session_tag": 0,
        "time_start": -1,
        "time_end": -1,
        "time_started": -1,
        "time_ended": -1,
        "status": "",
        "result": "",
        "run_timeout": 0,
    }


# Commands -------------------------------------------------------------------------------

CommandKind = Literal[
    "start", "end", "add_job", "remove_job", "create", "replace", "update", "delete"
]


class Command(Strict):
    """What every queued command carries."""

    request_id: Id
    # The list the caller waits on: the request's reply key (keys.py), or None for no push.
    reply_to: StrictStr | None = Field(default=None, max_length=512)
    project_id: Id


class SessionCommand(Command):
    session_id: Id


class StartCommand(SessionCommand):
    job_id: Id
    current_tag: Count


class EndCommand(SessionCommand):
    job_id: Id
    current_tag: Count | None = None
    result: EndResult


class AddJobCommand(SessionCommand):
    job_id: Id
    client_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""


class RemoveJobCommand(SessionCommand):
    job_id: Id


def _same_ids(cmd: Command, doc: SessionFields, where: str) -> None:
    """A document may name the ids of its command, never others."""
    if doc.project_id is not None and doc.project_id != cmd.project_id:
        raise ValueError(f"{where}.project_id {doc.project_id!r} is not {cmd.project_id!r}")
    session_id = getattr(cmd, "session_id", None)
    if session_id is not None and doc.session_id is not None and doc.session_id != session_id:
        raise ValueError(f"{where}.session_id {doc.session_id!r} is not {session_id!r}")


class CreateCommand(Command):
    document: SessionFields
    user_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""

    @model_validator(mode="after")
    def _ids(self) -> CreateCommand:
        _same_ids(self, self.document, "document")
        return self


class ReplaceCommand(SessionCommand):
    document: SessionFields
    user_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""

    @model_validator(mode="after")
    def _ids(self) -> ReplaceCommand:
        _same_ids(self, self.document, "document")
        return self


class UpdateCommand(SessionCommand):
    patch: SessionFields

    @model_validator(mode="after")
    def _ids(self) -> UpdateCommand:
        _same_ids(self, self.patch, "patch")
        return self


class DeleteCommand(SessionCommand):
    pass


COMMAND_MODELS: dict[str, type[Command]] = {
    "start": StartCommand,
    "end": EndCommand,
    "add_job": AddJobCommand,
    "remove_job": RemoveJobCommand,
    "create": CreateCommand,
    "replace": ReplaceCommand,
    "update": UpdateCommand,
    "delete": DeleteCommand,
}


# Replies --------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    code: str
    description: str


def _empty_list_is_object(value: Any) -> Any:
    return {} if value == [] else value


def _empty_object_is_list(value: Any) -> Any:
    return [] if value == {} else value


class Reply(BaseModel):
    """The answer to one command, as stored under its request id and pushed to reply_to."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    session_id: str = ""
    ok: bool
    result: Literal["success", "hold-off", "out-of-sync"] | None = None
    session_tag: int | None = None
    version: int | None = None
    error: ErrorInfo | None = None
    # Per command: add_job / remove_job / create / replace / delete / start.
    job_id: str | None = None
    added: bool | None = None
    removed: bool | None = None
    job_schedule: dict[str, Any] | None = None
    created: bool | None = None
    created_at: int | None = None
    detached: list[str] | None = None
    deadline: int | None = None
    # Return value only (never stored or pushed): the command was answered from its request
    # record, and `gone` when its session no longer exists (it was deleted since); the store
    # decides by them which of its steps outside the session's slot to redo.
    repeated: bool | None = None
    gone: bool | None = None

    _normalise_schedule = field_validator("job_schedule", mode="before")(_empty_list_is_object)
    _normalise_detached = field_validator("detached", mode="before")(_empty_object_is_list)

    def as_stored(self) -> Reply:
        """This reply as stored under its request id and pushed (no return-only flags)."""
        return self.model_copy(update={"repeated": None, "gone": None})

    def raise_for_error(self) -> Reply:
        """This reply, or the typed error it carries (errors.py)."""
        if self.error is not None:
            raise error_from_code(self.error.code, self.error.description)
        return self

    @classmethod
    def failure(cls, request_id: str, session_id: str, code: str, description: str) -> Reply:
        return cls(
            request_id=request_id,
            session_id=session_id,
            ok=False,
            error=ErrorInfo(code=code, description=description),
        )


class JobRecord(BaseModel):
    """A job's own record: the session it belongs to and that session's schedule."""

    session_id: str
    session_tag: int
    job_schedule: dict[str, Any]


class SessionEvent(BaseModel):
    """A message on `sessions:{project}:{session}:events` (watchers only)."""

    model_config = ConfigDict(extra="allow")

    event: str
    project_id: str
    session_id: str
    time: int
    session_tag: int | None = None
    job_id: str | None = None
    result: str | None = None
