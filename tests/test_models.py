"""Wire models: what reaches the scripts is validated, bounded and strictly typed."""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel, ValidationError

from session_worker.errors import (
    BadRequest,
    Conflict,
    IdempotencyMismatch,
    NotFound,
    SessionWorkerError,
)
from session_worker.models import (
    COMMAND_MODELS,
    MAX_INT,
    SCALAR_FIELDS,
    Command,
    CommandKind,
    CreateCommand,
    EndCommand,
    JobEntry,
    ReplaceCommand,
    Reply,
    Schedule,
    SessionEvent,
    SessionFields,
    StartCommand,
    UpdateCommand,
    scalar_defaults,
)

BASE = {"request_id": "r1", "project_id": "p", "session_id": "s"}
START = {**BASE, "job_id": "j", "current_tag": 0}


def start(**fields: Any) -> StartCommand:
    return StartCommand.model_validate({**START, **fields})


# integers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, MAX_INT])
def test_integers_up_to_the_bound_are_accepted(value: int) -> None:
    assert start(current_tag=value).current_tag == value
    assert SessionFields(session_tag=value, hold_off=value, run_timeout=value).session_tag == value


@pytest.mark.parametrize("value", [MAX_INT + 1, 10**15, 2**53 + 1, -1, True, False, 1.0, 0.5, "1"])
def test_integers_over_the_bound_or_of_another_type_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError):
        start(current_tag=value)
    with pytest.raises(ValidationError):
        SessionFields.model_validate({"session_tag": value})


def test_a_start_needs_its_tag() -> None:
    with pytest.raises(ValidationError):
        start(current_tag=None)


@pytest.mark.parametrize("field", ["time_start", "time_end", "time_started", "time_ended"])
def test_time_fields_may_be_minus_one(field: str) -> None:
    assert getattr(SessionFields.model_validate({field: -1}), field) == -1
    assert getattr(SessionFields.model_validate({field: MAX_INT}), field) == MAX_INT
    for bad in (-2, MAX_INT + 1, True, 1.5):
        with pytest.raises(ValidationError):
            SessionFields.model_validate({field: bad})


def test_the_same_bounds_hold_in_json_input() -> None:
    json = '{"request_id":"r","project_id":"p","session_id":"s","job_id":"j","current_tag":%s}'
    assert StartCommand.model_validate_json(json % MAX_INT).current_tag == MAX_INT
    for bad in (str(MAX_INT + 1), "1.0", "true", "1e3", '"5"'):
        with pytest.raises(ValidationError):
            StartCommand.model_validate_json(json % bad)


def _int_fields(model: type[BaseModel], seen: set[type[BaseModel]]) -> list[tuple[str, list[Any]]]:
    """Every (qualified field name, its constraints) holding an int, through nested models."""
    found: list[tuple[str, list[Any]]] = []
    if model in seen:
        return found
    seen.add(model)
    for name, info in model.model_fields.items():
        for leaf, constraints in _leaves(info.annotation, list(info.metadata)):
            if leaf is int:
                found.append((f"{model.__name__}.{name}", constraints))
            elif isinstance(leaf, type) and issubclass(leaf, BaseModel):
                found.extend(_int_fields(leaf, seen))
            elif typing.get_origin(leaf) is dict:
                for value in typing.get_args(leaf)[1:]:
                    if isinstance(value, type) and issubclass(value, BaseModel):
                        found.extend(_int_fields(value, seen))
    return found


def _leaves(annotation: Any, constraints: list[Any]) -> list[tuple[Any, list[Any]]]:
    """The types a field may hold, each with the constraints Annotated put on it."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        flat = [m for e in extra for m in getattr(e, "metadata", [e])]
        return _leaves(base, constraints + flat)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg, constraints)]
    return [(annotation, constraints)]


def test_every_integer_a_command_carries_is_bounded_for_lua() -> None:
    """Nothing above 10**12 can reach a script: every int of every command has that bound."""
    seen: set[type[BaseModel]] = set()
    fields = [f for model in COMMAND_MODELS.values() for f in _int_fields(model, seen)]
    names = {name for name, _ in fields}
    assert {
        "StartCommand.current_tag",
        "EndCommand.current_tag",
        "SessionFields.session_tag",
        "Schedule.current_pid",
        "JobEntry.time_started",
    } <= names
    for name, constraints in fields:
        upper = [m.le for m in constraints if isinstance(m, annotated_types.Le)]
        lower = [m.ge for m in constraints if isinstance(m, annotated_types.Ge)]
        assert upper and upper[0] <= MAX_INT, name
        assert lower and lower[0] >= -1, name


def test_the_bound_survives_lua_json() -> None:
    """Redis' cjson prints 14 significant digits: 10**12 + its -1 time values fit."""
    assert len(str(MAX_INT + 1)) <= 14
    assert float(MAX_INT + 1) == MAX_INT + 1


def test_no_float_or_bool_is_an_integer_anywhere() -> None:
    with pytest.raises(ValidationError):
        JobEntry.model_validate({"time_started": 1.0})
    with pytest.raises(ValidationError):
        Schedule.model_validate({"current_pid": True})
    with pytest.raises(ValidationError):
        EndCommand.model_validate({**BASE, "job_id": "j", "current_tag": 1.0, "result": "success"})


# documents ------------------------------------------------------------------------------------


def test_unknown_fields_are_refused_and_named() -> None:
    with pytest.raises(ValidationError) as err:
        SessionFields.model_validate({"session_tag": 1, "colour": "red"})
    assert "colour" in str(err.value)
    with pytest.raises(ValidationError) as err:
        Schedule.model_validate({"schedule_interval": "1 days", "when": "now"})
    assert "when" in str(err.value)
    with pytest.raises(ValidationError):
        JobEntry.model_validate({"status": "running", "extra": 1})
    with pytest.raises(ValidationError):
        start(extra=1)


@pytest.mark.parametrize("value", ["", "a" * 65, "a b", "a:b", "a{b}", "é", "a/b", 5])
def test_ids_outside_the_pattern_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError):
        start(session_id=value)
    with pytest.raises(ValidationError):
        start(job_id=value)
    with pytest.raises(ValidationError):
        start(project_id=value)
    with pytest.raises(ValidationError):
        SessionFields.model_validate(
            {"jobs": {value: {}}} if isinstance(value, str) else {"session_id": value}
        )


@pytest.mark.parametrize("value", ["a", "A-z_0", "x" * 64])
def test_ids_inside_the_pattern_are_accepted(value: str) -> None:
    assert start(session_id=value, job_id=value, project_id=value).job_id == value
    assert SessionFields.model_validate({"jobs": {value: {}}}).jobs == {value: JobEntry()}


def test_a_document_round_trips_with_its_version_alias() -> None:
    doc = SessionFields.model_validate(
        {
            "session_id": "s",
            "hold_off": 5,
            "_version": 3,
            "schedule": {"schedule_interval": "continuous", "event": "start"},
            "jobs": {
                "j": {
                    "client_id": "c",
                    "status": "running",
                    "result": "",
                    "time_started": 1,
                    "time_ended": -1,
                    "member": True,
                }
            },
        }
    )
    assert doc.version == 3
    assert doc.model_dump(by_alias=True, exclude_none=True)["_version"] == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule_interval", "every day"),
        ("schedule_interval", "1 fortnights"),
        ("schedule_date", "tomorrow"),
        ("schedule_date", "2024-13-45T99:99"),
        ("schedule_end_date", "2023-02-29T10:00"),
        ("schedule_year", "99"),
        ("event", "explode"),
        ("status", "done"),
        ("result", "maybe"),
    ],
)
def test_schedule_values_are_checked(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Schedule.model_validate({field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule_interval", "3 hours"),
        ("schedule_date", "2030-01-01T10:00:00Z"),
        ("schedule_start_date", "2030-01-01 10:00"),
        ("schedule_year", "2030"),
        ("schedule_day_of_week", "mon-fri"),
    ],
)
def test_schedule_values_accepted(field: str, value: str) -> None:
    assert getattr(Schedule.model_validate({field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "paused"),
        ("result", "aborted"),
        ("jobs", {"j": {"status": "done"}}),
        ("jobs", {"j": {"result": "meh"}}),
        ("description", 5),
        ("hold_off", "30"),
    ],
)
def test_document_values_are_checked(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        SessionFields.model_validate({field: value})


def test_the_version_field_is_named_with_its_underscore_only() -> None:
    assert SessionFields.model_validate({"_version": 4}).version == 4
    with pytest.raises(ValidationError, match="version"):
        SessionFields.model_validate({"version": 4})


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (CreateCommand, {"document": {"project_id": "other"}}),
        (ReplaceCommand, {"session_id": "s", "document": {"session_id": "t"}}),
        (ReplaceCommand, {"session_id": "s", "document": {"project_id": "other"}}),
        (UpdateCommand, {"session_id": "s", "patch": {"session_id": "t"}}),
        (UpdateCommand, {"session_id": "s", "patch": {"project_id": "other"}}),
    ],
)
def test_a_document_naming_other_ids_than_its_command_is_refused(
    model: type[Command], fields: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError, match="is not"):
        model.model_validate({"request_id": "r", "project_id": "p", **fields})
    same = {
        k: (
            {**v, **{n: x for n, x in (("session_id", "s"), ("project_id", "p")) if n in v}}
            if isinstance(v, dict)
            else v
        )
        for k, v in fields.items()
    }
    model.model_validate({"request_id": "r", "project_id": "p", **same})


def test_end_results_are_the_three_of_the_spec() -> None:
    for result in ("success", "fail", "aborted"):
        assert EndCommand.model_validate({**BASE, "job_id": "j", "result": result}).result == (
            result
        )
    for bad in ("", "running", "SUCCESS", None):
        with pytest.raises(ValidationError):
            EndCommand.model_validate({**BASE, "job_id": "j", "result": bad})
    assert EndCommand.model_validate({**BASE, "job_id": "j", "result": "fail"}).current_tag is None


def test_scalar_defaults_cover_every_scalar_field() -> None:
    defaults = scalar_defaults(30)
    assert set(defaults) == set(SCALAR_FIELDS)
    assert defaults["hold_off"] == 30
    assert (defaults["time_start"], defaults["session_tag"], defaults["run_timeout"]) == (-1, 0, 0)
    SessionFields.model_validate(defaults)  # the defaults are a valid document


# commands and replies -------------------------------------------------------------------------


def test_every_command_kind_has_a_model() -> None:
    assert set(COMMAND_MODELS) == set(typing.get_args(CommandKind))
    for model in COMMAND_MODELS.values():
        assert issubclass(model, Command)
        assert {"request_id", "reply_to", "project_id"} <= set(model.model_fields)


def test_commands_refuse_missing_fields() -> None:
    with pytest.raises(ValidationError):
        StartCommand.model_validate({**BASE, "job_id": "j"})
    with pytest.raises(ValidationError):
        COMMAND_MODELS["create"].model_validate({"request_id": "r", "project_id": "p"})


def test_reply_normalises_empty_containers() -> None:
    reply = Reply.model_validate_json(
        '{"request_id":"r","ok":true,"result":"success","job_schedule":[],"detached":{}}'
    )
    assert (reply.job_schedule, reply.detached) == ({}, [])


def test_reply_ignores_fields_it_does_not_know() -> None:
    reply = Reply.model_validate({"request_id": "r", "ok": True, "something": 1})
    assert reply.ok and not hasattr(reply, "something")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("bad_request", BadRequest),
        ("not_found", NotFound),
        ("conflict", Conflict),
        ("idempotency_mismatch", IdempotencyMismatch),
        ("weird", SessionWorkerError),
    ],
)
def test_raise_for_error_raises_the_typed_error(code: str, error: type[SessionWorkerError]) -> None:
    reply = Reply.failure("r", "s", code, "why")
    with pytest.raises(error) as raised:
        reply.raise_for_error()
    assert raised.value.description == "why"
    assert type(raised.value) is error


def test_raise_for_error_returns_a_successful_reply() -> None:
    reply = Reply(request_id="r", ok=True, result="hold-off", session_tag=3)
    assert reply.raise_for_error() is reply


def test_session_event_keeps_extra_fields() -> None:
    event = SessionEvent.model_validate(
        {
            "event": "run_completed",
            "project_id": "p",
            "session_id": "s",
            "time": 1,
            "session_tag": 2,
            "result": "fail",
            "closed": "deadline",
        }
    )
    assert event.model_dump()["closed"] == "deadline"
