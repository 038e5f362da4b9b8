"""The Lua files: every one registered, each header true to its KEYS and ARGV, and the scripts
surviving SCRIPT FLUSH on every backend."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

import pytest
import redis
from clock import Clock

from session_worker.keys import SessionKeys
from session_worker.models import (
    AddJobCommand,
    CreateCommand,
    EndCommand,
    JobEntry,
    Reply,
    SessionFields,
    StartCommand,
)
from session_worker.scripts import (
    DOCUMENT_SCRIPTS,
    JOB_SCRIPTS,
    SESSION_SCRIPTS,
    Scripts,
    lua_source,
)
from session_worker.settings import Settings
from session_worker.store import Store

LUA = resources.files("session_worker") / "lua"
PRELUDE_ARGV = 9  # ARGV[1..9] are the prelude's; a session script's own start at ARGV[10]


def lua_files() -> dict[str, str]:
    return {
        entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
        for entry in LUA.iterdir()
        if entry.name.endswith(".lua")
    }


def header(text: str) -> str:
    """The comment block a file opens with."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


def used(kind: str, text: str) -> set[int]:
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    return {int(n) for n in re.findall(rf"\b{kind}\[(\d+)\]", code)}


def documented(kind: str, text: str) -> set[int]:
    return {int(n) for n in re.findall(rf"^--\s+{kind}\[(\d+)\]", header(text), re.MULTILINE)}


# registration -----------------------------------------------------------------------------------


def test_every_lua_file_is_registered() -> None:
    assert set(lua_files()) == {*SESSION_SCRIPTS, *JOB_SCRIPTS, "_prelude", "_documents"}
    assert len(SESSION_SCRIPTS + JOB_SCRIPTS) == len({*SESSION_SCRIPTS, *JOB_SCRIPTS})


def test_scripts_registers_each_one_by_the_sha_of_its_full_source() -> None:
    scripts = Scripts(redis.Redis())  # registering talks to no server
    assert set(scripts.by_name) == {*SESSION_SCRIPTS, *JOB_SCRIPTS}
    for name, script in scripts.by_name.items():
        assert script.sha == hashlib.sha1(lua_source(name).encode()).hexdigest()
        assert scripts[name] is script


def test_session_scripts_get_the_prelude_and_job_scripts_do_not() -> None:
    files = lua_files()
    for name in SESSION_SCRIPTS:
        if name in DOCUMENT_SCRIPTS:
            heads = files["_prelude"] + "\n" + files["_documents"]
        else:
            heads = files["_prelude"]
        assert lua_source(name) == heads + "\n" + files[name]
    for name in JOB_SCRIPTS:
        assert lua_source(name) == files[name]


# headers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(lua_files()))
def test_each_file_opens_with_a_header_naming_itself(name: str) -> None:
    text = lua_files()[name]
    assert text.startswith(f"-- {name}.lua: ")
    assert "KEYS[" in header(text) and "ARGV[" in header(text)


@pytest.mark.parametrize("name", SESSION_SCRIPTS)
def test_a_session_script_header_names_the_argv_it_uses(name: str) -> None:
    text = lua_files()[name]
    assert f"KEYS[1..{len(SessionKeys._fields)}], ARGV[1..9]: see _prelude.lua" in header(text)
    assert "Returns" in header(text)
    own = {n for n in used("ARGV", text) if n > PRELUDE_ARGV}
    assert own == documented("ARGV", text), name
    assert used("KEYS", text) <= set(range(1, len(SessionKeys._fields) + 1))


@pytest.mark.parametrize("name", JOB_SCRIPTS)
def test_a_job_script_header_names_its_keys_and_argv(name: str) -> None:
    text = lua_files()[name]
    assert used("KEYS", text) == documented("KEYS", text)
    assert used("ARGV", text) == documented("ARGV", text)
    assert "Returns" in header(text)


def test_the_prelude_header_is_the_key_layout_of_keys_py() -> None:
    text = lua_files()["_prelude"]
    names = re.findall(r"^--\s+KEYS\[\d+\]\s+(\w+)", header(text), re.MULTILINE)
    assert names == list(SessionKeys._fields)
    assert documented("ARGV", text) == set(range(1, PRELUDE_ARGV + 1))
    assert used("ARGV", text) == set(range(1, PRELUDE_ARGV + 1))


@pytest.mark.parametrize("name", sorted(lua_files()))
def test_lua_never_builds_a_key_name(name: str) -> None:
    """Every key a script touches comes from KEYS (SPEC §8: one declared slot per call)."""
    code = "\n".join(line.split("--", 1)[0] for line in lua_files()[name].splitlines())
    calls = r"(?:redis\.call|call_chunked)\('(\w+)'(?:,\s*([^,)]+))?"
    for command, first in re.findall(calls, code):
        if command in ("TIME", "PUBLISH"):
            continue
        assert first.startswith("KEYS["), f"{name}: {command} {first}"


# SCRIPT FLUSH -----------------------------------------------------------------------------------

PROJECT = "proj"


def play(store: Store, session_id: str, between: Callable[[], object]) -> list[Any]:
    """A round of commands; `between()` runs before each one. Returns what a caller sees."""
    rid = uuid.uuid4().hex
    seen: list[Any] = []

    def base() -> dict[str, Any]:
        return {"request_id": uuid.uuid4().hex, "project_id": PROJECT, "session_id": session_id}

    between()
    doc = SessionFields(session_id=session_id, jobs={"a": JobEntry(), "b": JobEntry()})
    seen.append(store.create(CreateCommand(request_id=rid, project_id=PROJECT, document=doc)))
    steps: list[Callable[[], Any]] = [
        lambda: store.start(StartCommand(**base(), job_id="a", current_tag=0)),
        lambda: store.add_job(AddJobCommand(**base(), job_id="c")),  # a member from run 2
        lambda: store.start(StartCommand(**base(), job_id="b", current_tag=1)),
        lambda: store.start(StartCommand(**base(), job_id="b", current_tag=0)),
        lambda: store.end(EndCommand(**base(), job_id="a", result="success")),
        lambda: store.end(EndCommand(**base(), job_id="b", result="success")),
        lambda: store.get(PROJECT, session_id),
        lambda: store.runs(PROJECT, session_id),
        lambda: store.create(CreateCommand(request_id=rid, project_id=PROJECT, document=doc)),
    ]
    for step in steps:
        between()
        seen.append(step())
    return [visible(answer) for answer in seen]


def visible(answer: Any) -> Any:
    """What a caller sees, without the ids that differ between two sessions or requests."""
    if isinstance(answer, Reply):
        return answer.model_dump(exclude={"request_id", "session_id"})
    if isinstance(answer, dict):
        return {k: v for k, v in answer.items() if k != "session_id"}
    return answer


def test_script_flush_between_commands_changes_nothing_visible(backend: redis.Redis) -> None:
    store = Store(backend, Settings(), clock=Clock())
    calm = play(store, "calm", lambda: None)
    flushed = play(store, "flushed", backend.script_flush)
    assert flushed == calm
    assert calm[-1]["result"] == "success" and calm[-3]["status"] == "completed"


def test_a_new_store_after_script_flush_loads_the_scripts_again(backend: redis.Redis) -> None:
    first = Store(backend, Settings(), clock=Clock())
    play(first, "s1", lambda: None)
    backend.script_flush()
    second = Store(backend, Settings(), clock=Clock())
    assert second.get(PROJECT, "s1") == first.get(PROJECT, "s1")
    assert backend.script_exists(second.scripts["read"].sha) == [True]
    assert backend.script_exists(second.scripts["start"].sha) == [False]


def test_script_calls_in_a_pipeline_survive_script_flush(backend: redis.Redis) -> None:
    store = Store(backend, Settings(), clock=Clock())
    doc = SessionFields(session_id="s")
    store.create(CreateCommand(request_id="r0", project_id=PROJECT, document=doc))
    backend.script_flush()
    pipe = backend.pipeline()
    for i in range(3):
        keys = store.keys.session(PROJECT, "s", f"r{i + 1}")  # each request its own record
        store.scripts["add_job"](
            keys=list(keys),
            args=[f"r{i + 1}", "fp", 600, 0, "events", 10, "", PROJECT, "s", f"job-{i}", ""],
            client=pipe,
        )
    assert len(pipe.execute()) == 3
    got = store.get(PROJECT, "s")
    assert got is not None and sorted(got["jobs"]) == ["job-0", "job-1", "job-2"]
