"""Key and channel names: one hash tag per session, ids that cannot collide."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from session_worker.keys import KeyBuilder, SessionKeys, events_channel


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_every_key_of_a_session_is_in_one_slot() -> None:
    keys = KeyBuilder().session("proj", "sess", "req-1")
    assert len(set(keys)) == len(SessionKeys._fields)
    assert {slot(k) for k in keys} == {slot("{proj:sess}")}
    assert all("{proj:sess}" in k for k in keys)


def test_the_reply_key_is_the_sessions_reply_key_of_the_request() -> None:
    kb = KeyBuilder()
    assert kb.session("p", "s", "r1").reply == kb.reply("p", "s", "r1") == "sw:{p:s}:reply:r1"
    assert kb.session("p", "s").reply == "sw:{p:s}:reply:-"


def test_the_layout_of_a_sessions_keys() -> None:
    assert KeyBuilder().session("p", "s", "r") == SessionKeys(
        meta="sw:{p:s}:meta",
        jobs="sw:{p:s}:jobs",
        runs="sw:{p:s}:runs",
        run_jobs="sw:{p:s}:runjobs",
        run_jobs_index="sw:{p:s}:runjobs:ix",
        request="sw:{p:s}:request:r",
        reply="sw:{p:s}:reply:r",
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("p", "s1"), ("p", "s2")),
        (("p1", "s"), ("p2", "s")),
        (("a-b", "c"), ("a", "b-c")),
        (("a_b", "c"), ("a", "b_c")),
    ],
)
def test_different_sessions_never_share_a_key(a: tuple[str, str], b: tuple[str, str]) -> None:
    kb = KeyBuilder()
    assert not set(kb.session(*a, "r")) & set(kb.session(*b, "r"))
    assert kb.session_base(*a) != kb.session_base(*b)


def test_the_prefix_is_applied_to_every_key() -> None:
    kb = KeyBuilder("other")
    names = [
        *kb.session("p", "s", "r"),
        kb.job_record("p", "j"),
        kb.job_move("p", "j", "r"),
        kb.project_index("p"),
        kb.deadlines(),
    ]
    assert all(name.startswith("other:") for name in names)
    assert not set(names) & set(KeyBuilder().session("p", "s", "r"))


def test_a_jobs_record_and_its_move_markers_share_the_jobs_slot() -> None:
    kb = KeyBuilder()
    record = kb.job_record("p", "j")
    assert record == "sw:job:{p:j}"
    assert slot(kb.job_move("p", "j", "r1")) == slot(record)
    assert kb.job_move("p", "j", "r1") != kb.job_move("p", "j", "r2")
    # A job record is never one of a session's keys, even for equal ids.
    assert record not in KeyBuilder().session("p", "j", "r")


def test_the_project_index_is_per_project() -> None:
    kb = KeyBuilder()
    assert kb.project_index("p1") != kb.project_index("p2")
    assert kb.project_index("p1") == "sw:index:{p1}"


def test_the_events_channel() -> None:
    assert events_channel("p", "s") == "sessions:p:s:events"
