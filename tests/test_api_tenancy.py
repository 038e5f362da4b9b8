"""Tenancy and auth of the HTTP shim (SPEC §7) over a real Redis.

Tokens: `tok-a` acts as user `alice` in project A, `tok-b` as `bob` in project B. Project B's
token on every route of project A's session is answered 403 (A's path) or 404 (B's own path,
or v1, where the project is the token's), and A's session never changes. Unknown or missing
tokens are 401. The token never appears in a log record.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from asgi_client import Api

from session_worker.api import create_app
from session_worker.models import CreateCommand, JobEntry, SessionFields, StartCommand
from session_worker.settings import Settings, TokenGrant
from session_worker.store import Store

pytestmark = pytest.mark.http

A, B = "proj-a", "proj-b"
TOKENS = {
    "tok-a": TokenGrant(project_id=A, user_id="alice"),
    "tok-b": TokenGrant(project_id=B, user_id="bob"),
}
AS_A = {"X-Auth-Token": "tok-a"}
AS_B = {"X-Auth-Token": "tok-b"}
SESSION = "shared-name"


@pytest.fixture
def store(redis_url: str) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_url)
    yield Store(client, Settings(redis_url=redis_url, auth_tokens=TOKENS))
    client.close()


@pytest.fixture
def api(store: Store) -> Iterator[Api]:
    a = Api(create_app(store.settings, store))
    yield a
    a.close()


@pytest.fixture
def session_a(store: Store) -> str:
    """A's session with jobs j1, j2; j1 started run 1."""
    doc = SessionFields(session_id=SESSION, jobs={"j1": JobEntry(), "j2": JobEntry()})
    store.create(
        CreateCommand(request_id=uuid.uuid4().hex, project_id=A, document=doc)
    ).raise_for_error()
    store.start(
        StartCommand(
            request_id=uuid.uuid4().hex,
            project_id=A,
            session_id=SESSION,
            job_id="j1",
            current_tag=0,
        )
    ).raise_for_error()
    return SESSION


def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything project A has: its session, run history, list and job records."""
    return (
        store.get(A, SESSION),
        store.runs(A, SESSION),
        store.list_sessions(A),
        store.job_record(A, "j1"),
        store.job_record(A, "j2"),
    )


START = {"start": {"job_id": "j2", "current_tag": 0}}
END = {"end": {"job_id": "j1", "current_tag": 1, "result": "fail"}}
DOC = {"description": "taken over", "jobs": {"j9": {}}}

# (method, suffix under the family prefix, json body or None)
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/sessions", {"match": []}),
    ("POST", "/sessions", {"session_id": SESSION, **DOC}),
    ("GET", f"/sessions/{SESSION}", None),
    ("PATCH", f"/sessions/{SESSION}", DOC),
    ("POST", f"/sessions/{SESSION}", DOC),
    ("DELETE", f"/sessions/{SESSION}", None),
    ("POST", f"/sessions/{SESSION}/action", START),
    ("POST", f"/sessions/{SESSION}/actions", END),
    ("PUT", f"/sessions/{SESSION}/jobs/j9", None),
    ("DELETE", f"/sessions/{SESSION}/jobs/j1", None),
    ("GET", f"/sessions/{SESSION}/runs", None),
    ("GET", f"/sessions/{SESSION}/runs/1", None),
]
ROUTE_IDS = [f"{m} {s}" for m, s, _ in ROUTES]


def call(api: Api, method: str, url: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": {**headers, "content-type": "application/json"}}
    if body is not None:
        kwargs["json"] = body
    return api.request(method, url, **kwargs)


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"title", "description"}


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES, ids=ROUTE_IDS)
def test_another_projects_token_on_a_projects_path_is_403(
    api: Api, store: Store, session_a: str, method: str, suffix: str, body: Any
) -> None:
    before = snapshot(store)
    assert_error(call(api, method, f"/v2/{A}{suffix}", body, AS_B), 403)
    assert snapshot(store) == before


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("prefix", [f"/v2/{B}", "/v1"])
def test_another_projects_token_never_reaches_a_projects_session(
    api: Api, store: Store, session_a: str, method: str, suffix: str, body: Any, prefix: str
) -> None:
    """Under B's own path (or v1) the same session id names B's session: never A's."""
    before = snapshot(store)
    response = call(api, method, prefix + suffix, body, AS_B)
    assert response.status_code < 500
    if response.status_code >= 400:
        assert_error(response, response.status_code)
    assert snapshot(store) == before
    if method == "GET" and suffix == "/sessions":
        assert response.json() == {"sessions": []}
    elif method == "GET":
        assert_error(response, 404)


@pytest.mark.parametrize(("method", "suffix", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Auth-Token": "nope"}, {"X-Auth-Token": ""}, {"x-auth-token": "TOK-A"}],
    ids=["missing", "unknown", "empty", "wrong-case"],
)
@pytest.mark.parametrize("prefix", [f"/v2/{A}", "/v1"])
def test_a_missing_or_unknown_token_is_401(
    api: Api,
    store: Store,
    session_a: str,
    method: str,
    suffix: str,
    body: Any,
    headers: dict[str, str],
    prefix: str,
) -> None:
    before = snapshot(store)
    response = call(api, method, prefix + suffix, body, headers)
    assert_error(response, 401)
    assert "www-authenticate" in response.headers
    assert snapshot(store) == before


@pytest.mark.parametrize("prefix", [f"/v2/{A}", "/v1"])
def test_the_owners_token_works_on_every_route(api: Api, store: Store, prefix: str) -> None:
    S = f"/sessions/{SESSION}"
    steps: list[tuple[str, str, Any, int]] = [
        ("POST", "/sessions", {"session_id": SESSION, "jobs": {"j1": {}}}, 201),
        ("GET", "/sessions", {"match": []}, 200),
        ("GET", S, None, 200),
        ("PATCH", S, {"description": "patched"}, 200),
        ("POST", S, {"jobs": {"j1": {}, "j2": {}}, "hold_off": 0}, 201),
        ("PUT", f"{S}/jobs/j3", None, 204),
        ("POST", f"{S}/action", {"start": {"job_id": "j1", "current_tag": 0}}, 202),
        ("POST", f"{S}/actions", {"end": {"job_id": "j1", "result": "success"}}, 202),
        ("DELETE", f"{S}/jobs/j3", None, 204),
        ("GET", f"{S}/runs", None, 200),
        ("GET", f"{S}/runs/1", None, 200),
        ("DELETE", S, None, 204),
    ]
    for method, suffix, body, status in steps:
        response = call(api, method, prefix + suffix, body, AS_A)
        assert response.status_code == status, (method, suffix, response.text)
    assert store.get(A, SESSION) is None


def test_a_project_sees_only_its_own_sessions(api: Api, store: Store, session_a: str) -> None:
    call(api, "POST", f"/v2/{B}/sessions", {"session_id": "b-only"}, AS_B).raise_for_status()
    listed = call(api, "GET", "/v1/sessions", {"match": []}, AS_A).json()["sessions"]
    assert [d["session_id"] for d in listed] == [SESSION]
    listed = call(api, "GET", f"/v2/{B}/sessions", None, AS_B).json()["sessions"]
    assert [d["session_id"] for d in listed] == ["b-only"]
    # The same id in two projects: two sessions.
    call(api, "POST", f"/v2/{B}/sessions", {"session_id": SESSION}, AS_B).raise_for_status()
    b_doc = store.get(B, SESSION)
    a_doc = store.get(A, SESSION)
    assert b_doc is not None and a_doc is not None
    assert b_doc["project_id"] == B and a_doc["project_id"] == A
    assert b_doc["session_tag"] == 0 and a_doc["session_tag"] == 1


def test_the_tokens_user_is_recorded_on_create(api: Api, store: Store) -> None:
    r = call(api, "POST", "/v1/sessions", {"description": "x", "user_id": "mallory"}, AS_A)
    assert r.status_code == 201
    doc = store.get(A, r.json()["session_id"])
    assert doc is not None and doc["user_id"] == "alice"
    r = call(api, "POST", f"/v2/{A}/sessions/s2", {"description": "y"}, AS_A)
    assert r.status_code == 201
    doc = store.get(A, "s2")
    assert doc is not None and doc["user_id"] == "alice"


def test_a_body_naming_another_project_is_refused(api: Api, store: Store) -> None:
    r = call(api, "POST", f"/v2/{A}/sessions", {"project_id": B}, AS_A)
    assert_error(r, 400)
    assert store.list_sessions(A) == [] and store.list_sessions(B) == []


def test_the_token_is_never_logged(
    api: Api, session_a: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "tok-b"
    with caplog.at_level(logging.DEBUG):
        for method, suffix, body in ROUTES:
            call(api, method, f"/v2/{A}{suffix}", body, {"X-Auth-Token": secret})
            call(api, method, f"/v2/{A}{suffix}", body, {"X-Auth-Token": secret + "x"})
    assert all(secret not in record.getMessage() for record in caplog.records)


def test_openapi_needs_no_token(api: Api) -> None:
    assert api.request("GET", "/openapi.json").status_code == 200
