"""The shim served by a real uvicorn (`serve()` in a child process, on a free loopback port)
against a real Redis: python-freezerclient 6.5.0's v2 SessionManager, unchanged, doing every
call it has; and concurrent starts and ends from many clients at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from freezerclient.exceptions import ApiClientException
from freezerclient.v2.managers.sessions import SessionManager

from session_worker.models import CreateCommand, JobEntry, SessionFields
from session_worker.redis_server import ServerProcess, free_port
from session_worker.settings import Settings, TokenGrant
from session_worker.store import Store

pytestmark = pytest.mark.http

PROJECT = "proj"
TOKEN = "node-token"
SERVE = (
    "import sys\n"
    "from session_worker.api import serve\n"
    "from session_worker.settings import Settings\n"
    "serve(Settings.model_validate_json(sys.argv[1]), '127.0.0.1', int(sys.argv[2]),"
    " int(sys.argv[3]))\n"
)


@contextmanager
def shim_server(settings: Settings, workers: int, log_dir: Path) -> Iterator[str]:
    """`serve()` in a child process; yields the base URL once it answers."""
    port = free_port()
    log_path = log_dir / f"shim-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, settings.model_dump_json(), str(port), str(workers)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the shim exited: {log_path.read_text()}")
            try:
                if httpx.get(url + "/openapi.json", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the shim did not answer: {log_path.read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def settings(real_server: ServerProcess) -> Settings:
    return Settings(
        redis_url=real_server.url,
        auth_tokens={TOKEN: TokenGrant(project_id=PROJECT, user_id="node-1")},
    )


@pytest.fixture
def store(redis_url: str, settings: Settings) -> Iterator[Store]:
    """The store the shim uses; the database is emptied for each test (`redis_url`)."""
    client = redis.Redis.from_url(redis_url)
    yield Store(client, settings)
    client.close()


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One worker process."""
    with shim_server(settings, 1, tmp_path_factory.mktemp("shim")) as url:
        yield url


@pytest.fixture(scope="module")
def two_workers(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two worker processes sharing the port (what `serve()` runs by default)."""
    with shim_server(settings, 2, tmp_path_factory.mktemp("shim2")) as url:
        yield url


def manager(url: str, token: str | None = TOKEN) -> SessionManager:
    """freezerclient's manager with the three things it reads from its client."""
    client = SimpleNamespace(endpoint=url, project_id=PROJECT, auth_token=token)
    return SessionManager(client, verify=False)


def raises(status: int, call: Callable[[], Any]) -> str:
    with pytest.raises(ApiClientException) as info:
        call()
    assert info.value.status_code == status
    message = str(info.value)
    # The client prints the error body's description.
    assert message.startswith(f"[*] Error {status}: ")
    assert "{" not in message, "the description, not the raw body"
    return message


def test_freezerclient_session_lifecycle(server: str, store: Store) -> None:
    sm = manager(server)

    sid = sm.create({"description": "nightly", "schedule": {"schedule_interval": "1 days"}})
    assert isinstance(sid, str) and len(sid) == 32
    doc = sm.get(sid)
    assert doc["description"] == "nightly"
    assert doc["user_id"] == "node-1"
    assert doc["schedule"] == {"schedule_interval": "1 days"}
    assert sm.get("absent") is None

    # A session id in the document: the client posts to /sessions/{id} (create or replace).
    assert sm.create({"session_id": "fixed1", "schedule": {}, "session_tag": 0}) == "fixed1"
    assert sm.create({"session_id": "fixed1", "description": "again"}) == "fixed1"
    assert sm.get("fixed1")["description"] == "again"

    assert [d["session_id"] for d in sm.list()] == [sid, "fixed1"]
    found = sm.list(search={"match": [{"description": "again"}]})
    assert [d["session_id"] for d in found] == ["fixed1"]
    assert [d["session_id"] for d in sm.list_all(limit=1, offset=1)] == ["fixed1"]
    assert sm.list(limit=1) == sm.list_all(limit=1)

    assert sm.update(sid, {"description": "changed", "hold_off": 60}) == 2
    assert sm.get(sid)["hold_off"] == 60

    assert sm.add_job(sid, "j1") is None
    assert sm.add_job(sid, "j2") is None
    record = store.job_record(PROJECT, "j1")
    assert record is not None and record.session_id == sid
    assert record.job_schedule == {"schedule_interval": "1 days"}

    assert sm.start_session(sid, "j1", 0) == {"result": "success", "session_tag": 1}
    assert sm.start_session(sid, "j2", 0) == {"result": "success", "session_tag": 1}
    assert sm.start_session(sid, "j1", 1) == {"result": "hold-off", "session_tag": 1}
    assert sm.end_session(sid, "j1", 1, "success") == {"result": "success", "session_tag": 1}
    assert sm.get(sid)["status"] == "running"
    assert sm.end_session(sid, "j2", 1, "success") == {"result": "success", "session_tag": 1}
    doc = sm.get(sid)
    assert (doc["status"], doc["result"], doc["session_tag"]) == ("completed", "success", 1)

    assert sm.remove_job(sid, "j2") is None
    assert set(sm.get(sid)["jobs"]) == {"j1"}
    record = store.job_record(PROJECT, "j2")
    assert record is not None and record.session_id == ""

    assert sm.delete(sid) is None
    assert sm.get(sid) is None
    assert [d["session_id"] for d in sm.list()] == ["fixed1"]


def test_freezerclient_sees_the_error_descriptions(server: str, store: Store) -> None:
    sm = manager(server)
    assert "session absent does not exist" in raises(
        404, lambda: sm.start_session("absent", "j1", 0)
    )
    assert "colour" in raises(400, lambda: sm.create({"colour": "red"}))
    sm.create({"session_id": "s1", "jobs": {"j1": {}}})
    assert "tag too high" in raises(400, lambda: sm.start_session("s1", "j1", 5))
    assert "j9" in raises(400, lambda: sm.start_session("s1", "j9", 0))
    assert "result" in raises(400, lambda: sm.end_session("s1", "j1", 0, "maybe"))
    assert "exists" in raises(409, lambda: _create_collection(server, "s1"))
    raises(404, lambda: sm.delete("absent"))
    raises(404, lambda: sm.update("absent", {"description": "x"}))
    raises(404, lambda: sm.add_job("absent", "j1"))
    raises(404, lambda: sm.remove_job("absent", "j1"))  # after its 5 attempts


def _create_collection(url: str, session_id: str) -> None:
    """A create on an existing id through the collection (freezerclient never does this)."""
    response = httpx.post(
        f"{url}/v2/{PROJECT}/sessions/",
        json={"session_id": session_id},
        headers={"X-Auth-Token": TOKEN},
    )
    raise ApiClientException(response)


def test_freezerclient_without_a_valid_token_is_refused(server: str, store: Store) -> None:
    manager(server).create({"session_id": "s1"})
    for token in (None, "wrong"):
        sm = manager(server, token)
        raises(401, partial(sm.get, "s1"))
        raises(401, partial(sm.start_session, "s1", "j1", 0))


def test_another_projects_endpoint_is_forbidden(server: str, store: Store) -> None:
    client = SimpleNamespace(endpoint=server, project_id="someone-else", auth_token=TOKEN)
    sm = SessionManager(client, verify=False)
    raises(403, lambda: sm.list())
    raises(403, lambda: sm.create({"description": "x"}))


# Many clients at once, on a server with two worker processes ------------------------------

N = 50


@pytest.fixture
def busy_session(store: Store) -> str:
    jobs = {f"j{i}": JobEntry() for i in range(N)}
    store.create(
        CreateCommand(
            request_id="create-busy",
            project_id=PROJECT,
            document=SessionFields(session_id="busy", jobs=jobs),
        )
    ).raise_for_error()
    return "busy"


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # reported by the assertions below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_starts_bump_once_and_concurrent_ends_are_all_recorded(
    two_workers: str, store: Store, busy_session: str
) -> None:
    sm = manager(two_workers)
    starts = in_parallel([partial(sm.start_session, busy_session, f"j{i}", 0) for i in range(N)])
    assert starts == [{"result": "success", "session_tag": 1}] * N
    doc = store.get(PROJECT, busy_session)
    assert doc is not None
    assert doc["session_tag"] == 1 and doc["status"] == "running"
    assert {job["status"] for job in doc["jobs"].values()} == {"running"}
    runs = store.runs(PROJECT, busy_session)
    assert runs is not None and [run["session_tag"] for run in runs] == [1]

    results = ["fail" if i == 7 else "success" for i in range(N)]
    ends = in_parallel(
        [partial(sm.end_session, busy_session, f"j{i}", 1, results[i]) for i in range(N)]
    )
    assert ends == [{"result": "success", "session_tag": 1}] * N

    doc = store.get(PROJECT, busy_session)
    assert doc is not None
    assert (doc["status"], doc["result"], doc["session_tag"]) == ("completed", "fail", 1)
    assert {j: e["result"] for j, e in doc["jobs"].items()} == {
        f"j{i}": results[i] for i in range(N)
    }
    runs = store.runs(PROJECT, busy_session)
    assert runs is not None and len(runs) == 1
    assert (runs[0]["status"], runs[0]["result"]) == ("completed", "fail")
    assert {j: e["status"] for j, e in runs[0]["jobs"].items()} == {
        f"j{i}": "completed" for i in range(N)
    }


def test_concurrent_starts_of_one_job_from_many_nodes_bump_once(
    two_workers: str, store: Store, busy_session: str
) -> None:
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    with httpx.Client(limits=limits) as http:
        starts = in_parallel(
            [
                lambda: http.post(
                    f"{two_workers}/v1/sessions/{busy_session}/action",
                    json={"start": {"job_id": "j0", "current_tag": 0}},
                    headers={"X-Auth-Token": TOKEN},
                    timeout=30,
                )
                for _ in range(N)
            ]
        )
    assert [r.status_code for r in starts] == [202] * N
    assert {r.json()["session_tag"] for r in starts} == {1}
    # One start began run 1; the others found j0 already started in it.
    assert {r.json()["result"] for r in starts} == {"success"}
    doc = store.get(PROJECT, busy_session)
    assert doc is not None and doc["session_tag"] == 1
    assert doc["_version"] == 2  # created, then one start: nothing else was applied
