"""The HTTP shim over a real Redis: every route of SPEC §6 in both path families, with and
without a trailing slash, status codes and bodies, the bad-input table (each answered with a
JSON error and no change to the store), 503 when Redis is out of reach, OpenAPI, and the
refusal to serve without auth on a public address.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from asgi_client import Api
from clock import Clock
from redis.backoff import NoBackoff
from redis.retry import Retry

from session_worker.api import PROBE_INTERVAL, check_bind, create_app, serve
from session_worker.connection import is_transient
from session_worker.keys import KeyBuilder
from session_worker.models import (
    AddJobCommand,
    CreateCommand,
    JobEntry,
    SessionFields,
    StartCommand,
)
from session_worker.redis_server import ServerKind, ServerProcess
from session_worker.settings import Settings, TokenGrant
from session_worker.store import Store

pytestmark = pytest.mark.http

PROJECT = "proj"
MAX_BODY = 4096
JSON = {"content-type": "application/json"}


def new_id() -> str:
    return uuid.uuid4().hex


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"title", "description"}
    assert body["title"] and body["description"]
    return body


def redis_state(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type and value: equal before and after = nothing changed."""
    state: dict[bytes, Any] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == b"string":
            state[key] = client.get(key)
        else:
            state[key] = kind
    return state


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, default_project=PROJECT, max_body_bytes=MAX_BODY)


@pytest.fixture
def store(client: redis.Redis, settings: Settings, clock: Clock) -> Store:
    return Store(client, settings, clock=clock)


@pytest.fixture
def api(store: Store, settings: Settings) -> Iterator[Api]:
    a = Api(create_app(settings, store))
    yield a
    a.close()


def make_session(store: Store, session_id: str, *jobs: str, **fields: Any) -> str:
    doc = SessionFields(session_id=session_id, jobs={j: JobEntry() for j in jobs}, **fields)
    store.create(
        CreateCommand(request_id=new_id(), project_id=PROJECT, document=doc)
    ).raise_for_error()
    return session_id


def start(store: Store, session_id: str, job: str, tag: int) -> None:
    store.start(
        StartCommand(
            request_id=new_id(),
            project_id=PROJECT,
            session_id=session_id,
            job_id=job,
            current_tag=tag,
        )
    ).raise_for_error()


@pytest.fixture
def s1(store: Store) -> str:
    """Session s1 with jobs a and b, hold-off 30 s, never started."""
    return make_session(store, "s1", "a", "b", hold_off=30)


# Both path families, each with and without a trailing slash.
FAMILIES = [f"/v2/{PROJECT}/sessions", "/v1/sessions"]
SLASHES = ["", "/"]


@pytest.fixture(params=FAMILIES, ids=["v2", "v1"])
def base(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(params=SLASHES, ids=["no-slash", "slash"])
def slash(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


# Routes: success paths ------------------------------------------------------------------


def test_create_returns_201_and_the_new_id(api: Api, store: Store, base: str, slash: str) -> None:
    r = api.post(base + slash, json={"description": "nightly", "hold_off": 5})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"session_id"}
    doc = store.get(PROJECT, body["session_id"])
    assert doc is not None
    assert doc["description"] == "nightly"
    assert doc["hold_off"] == 5
    assert doc["project_id"] == PROJECT
    assert doc["jobs"] == {} and doc["schedule"] == {}


def test_create_with_an_id_in_the_body_uses_it(api: Api, store: Store, base: str) -> None:
    r = api.post(base, json={"session_id": "mine", "jobs": {"j1": {}}})
    assert (r.status_code, r.json()) == (201, {"session_id": "mine"})
    doc = store.get(PROJECT, "mine")
    assert doc is not None and list(doc["jobs"]) == ["j1"]


def test_create_on_an_existing_id_is_409(api: Api, s1: str, base: str) -> None:
    assert_error(api.post(base, json={"session_id": s1}), 409)


def test_create_with_an_idempotency_key_is_applied_once(api: Api, store: Store) -> None:
    headers = {"Idempotency-Key": "create-1"}
    first = api.post(FAMILIES[0], json={"description": "x"}, headers=headers)
    again = api.post(FAMILIES[0], json={"description": "x"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert len(store.list_sessions(PROJECT)) == 1
    other = api.post(FAMILIES[0], json={"description": "y"}, headers=headers)
    assert_error(other, 422)


def test_get_returns_the_document(api: Api, s1: str, base: str, slash: str) -> None:
    r = api.get(f"{base}/{s1}{slash}")
    assert r.status_code == 200
    doc = r.json()
    assert doc["session_id"] == s1
    assert doc["session_tag"] == 0
    assert doc["hold_off"] == 30
    assert set(doc["jobs"]) == {"a", "b"}
    assert doc["_version"] == 1


def test_get_of_an_absent_session_is_404(api: Api, base: str) -> None:
    assert_error(api.get(f"{base}/nope"), 404)


def test_list_with_a_json_body_filters(api: Api, store: Store, base: str, slash: str) -> None:
    make_session(store, "x1", description="keep")
    make_session(store, "x2", description="drop")
    make_session(store, "x3", description="keep")
    url = base + slash
    r = api.request("GET", url, json={"match": []})
    assert r.status_code == 200
    assert [d["session_id"] for d in r.json()["sessions"]] == ["x1", "x2", "x3"]
    r = api.request("GET", url, json={"match": [{"description": "keep"}]})
    assert [d["session_id"] for d in r.json()["sessions"]] == ["x1", "x3"]
    r = api.request("GET", url, json={"match_not": [{"description": "keep"}]})
    assert [d["session_id"] for d in r.json()["sessions"]] == ["x2"]
    r = api.get(url, params={"limit": 1, "offset": 1})
    assert [d["session_id"] for d in r.json()["sessions"]] == ["x2"]
    r = api.get(url)
    assert len(r.json()["sessions"]) == 3


def test_list_limit_zero_means_the_default_as_in_freezer_api(api: Api, store: Store) -> None:
    for i in range(12):
        make_session(store, f"s{i:02d}")
    assert len(api.get(FAMILIES[0], params={"limit": 0}).json()["sessions"]) == 10


def test_patch_returns_200_and_the_new_version(api: Api, store: Store, s1: str, base: str) -> None:
    r = api.patch(f"{base}/{s1}", json={"description": "changed", "jobs": {"c": {}}})
    assert r.status_code == 200
    assert r.json() == {"session_id": s1, "version": 2}
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert doc["description"] == "changed"
    assert set(doc["jobs"]) == {"a", "b", "c"}


def test_patch_never_changes_the_creator(api: Api, store: Store, s1: str) -> None:
    api.patch(f"{FAMILIES[0]}/{s1}", json={"user_id": "mallory"}).raise_for_status()
    doc = store.get(PROJECT, s1)
    assert doc is not None and doc["user_id"] == ""


def test_patch_of_an_absent_session_is_404(api: Api, base: str) -> None:
    assert_error(api.patch(f"{base}/nope", json={"description": "x"}), 404)


def test_post_to_the_session_replaces_it(
    api: Api, store: Store, s1: str, base: str, slash: str
) -> None:
    r = api.post(f"{base}/{s1}{slash}", json={"description": "new", "jobs": {"a": {}}})
    assert r.status_code == 201
    assert r.json() == {"session_id": s1, "version": 2}
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert doc["description"] == "new" and set(doc["jobs"]) == {"a"}


def test_post_to_a_new_id_creates_it(api: Api, store: Store, base: str) -> None:
    r = api.post(f"{base}/fresh", json={"hold_off": 7})
    assert (r.status_code, r.json()) == (201, {"session_id": "fresh", "version": 1})
    doc = store.get(PROJECT, "fresh")
    assert doc is not None and doc["hold_off"] == 7


def test_delete_is_204_then_404(api: Api, store: Store, s1: str, base: str, slash: str) -> None:
    r = api.delete(f"{base}/{s1}{slash}")
    assert (r.status_code, r.content) == (204, b"")
    assert store.get(PROJECT, s1) is None
    assert_error(api.delete(f"{base}/{s1}"), 404)


@pytest.mark.parametrize("action", ["action", "actions"])
def test_start_and_end(api: Api, store: Store, s1: str, base: str, slash: str, action: str) -> None:
    url = f"{base}/{s1}/{action}{slash}"
    r = api.post(url, json={"start": {"job_id": "a", "current_tag": 0}})
    assert (r.status_code, r.json()) == (202, {"result": "success", "session_tag": 1})
    r = api.post(url, json={"start": {"job_id": "b", "current_tag": 0}})
    assert (r.status_code, r.json()) == (202, {"result": "success", "session_tag": 1})
    r = api.post(url, json={"start": {"job_id": "a", "current_tag": 1}})
    assert (r.status_code, r.json()) == (202, {"result": "hold-off", "session_tag": 1})
    r = api.post(url, json={"end": {"job_id": "a", "current_tag": 1, "result": "success"}})
    assert (r.status_code, r.json()) == (202, {"result": "success", "session_tag": 1})
    r = api.post(url, json={"end": {"job_id": "b", "result": "fail"}})
    assert (r.status_code, r.json()) == (202, {"result": "success", "session_tag": 1})
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert (doc["status"], doc["result"]) == ("completed", "fail")


def test_start_out_of_sync(api: Api, store: Store, s1: str, clock: Clock) -> None:
    url = f"{FAMILIES[0]}/{s1}/action"
    api.post(url, json={"start": {"job_id": "a", "current_tag": 0}}).raise_for_status()
    clock.now += 31
    r = api.post(url, json={"start": {"job_id": "b", "current_tag": 0}})
    assert (r.status_code, r.json()) == (202, {"result": "out-of-sync", "session_tag": 1})


def test_action_errors_from_the_script(api: Api, s1: str) -> None:
    url = f"{FAMILIES[0]}/{s1}/action"
    body = assert_error(api.post(url, json={"start": {"job_id": "a", "current_tag": 5}}), 400)
    assert "tag too high" in body["description"]
    body = assert_error(api.post(url, json={"start": {"job_id": "zz", "current_tag": 0}}), 400)
    assert "zz" in body["description"]
    assert_error(
        api.post(f"{FAMILIES[0]}/nope/action", json={"end": {"job_id": "a", "result": "fail"}}), 404
    )


def test_an_action_with_an_idempotency_key_is_applied_once(
    api: Api, store: Store, s1: str, clock: Clock
) -> None:
    url = f"{FAMILIES[0]}/{s1}/action"
    headers = {"Idempotency-Key": "start-a-0"}
    body = {"start": {"job_id": "a", "current_tag": 0}}
    first = api.post(url, json=body, headers=headers)
    clock.now += 100  # outside the hold-off: a second application would start run 2
    again = api.post(url, json=body, headers=headers)
    assert first.json() == again.json() == {"result": "success", "session_tag": 1}
    doc = store.get(PROJECT, s1)
    assert doc is not None and doc["session_tag"] == 1
    other = {"start": {"job_id": "b", "current_tag": 0}}
    assert_error(api.post(url, json=other, headers=headers), 422)


def test_only_an_idempotency_key_leaves_a_request_record(
    api: Api, client: redis.Redis, s1: str
) -> None:
    url = f"{FAMILIES[0]}/{s1}/action"
    records = f"sw:{{{PROJECT}:{s1}}}:request:*"
    body = {"start": {"job_id": "a", "current_tag": 0}}
    before = set(client.keys(records))
    assert api.post(url, json=body).status_code == 202
    assert set(client.keys(records)) == before  # nobody can repeat it: nothing to remember
    api.post(url, json=body, headers={"Idempotency-Key": "k1"})
    key = KeyBuilder().request(PROJECT, s1, "k1").encode()
    assert set(client.keys(records)) == before | {key}


def test_put_job_without_a_body_adds_it(
    api: Api, store: Store, s1: str, base: str, slash: str
) -> None:
    r = api.put(f"{base}/{s1}/jobs/j9{slash}", headers=JSON)
    assert (r.status_code, r.content) == (204, b"")
    doc = store.get(PROJECT, s1)
    assert doc is not None and doc["jobs"]["j9"]["status"] == "scheduled"
    record = store.job_record(PROJECT, "j9")
    assert record is not None and record.session_id == s1


def test_put_job_with_a_client_id(api: Api, store: Store, s1: str) -> None:
    r = api.put(f"{FAMILIES[0]}/{s1}/jobs/j9", json={"client_id": "node-7"})
    assert r.status_code == 204
    doc = store.get(PROJECT, s1)
    assert doc is not None and doc["jobs"]["j9"]["client_id"] == "node-7"


def test_delete_job(api: Api, store: Store, s1: str, base: str, slash: str) -> None:
    r = api.delete(f"{base}/{s1}/jobs/a{slash}")
    assert (r.status_code, r.content) == (204, b"")
    doc = store.get(PROJECT, s1)
    assert doc is not None and set(doc["jobs"]) == {"b"}
    # Removing a job that is not there succeeds (freezerclient retries until it gets a 204).
    assert api.delete(f"{base}/{s1}/jobs/a").status_code == 204


def test_jobs_of_an_absent_session_are_404(api: Api, base: str) -> None:
    assert_error(api.put(f"{base}/nope/jobs/j1", headers=JSON), 404)
    assert_error(api.delete(f"{base}/nope/jobs/j1"), 404)


def test_runs(api: Api, store: Store, s1: str, base: str, slash: str, clock: Clock) -> None:
    assert api.get(f"{base}/{s1}/runs{slash}").json() == {"runs": []}
    start(store, s1, "a", 0)
    clock.now += 31
    start(store, s1, "b", 1)
    r = api.get(f"{base}/{s1}/runs{slash}")
    assert r.status_code == 200
    runs = r.json()["runs"]
    assert [run["session_tag"] for run in runs] == [1, 2]
    assert runs[0]["status"] == "completed" and runs[0]["result"] == "fail"
    assert set(runs[1]["jobs"]) == {"a", "b"}
    r = api.get(f"{base}/{s1}/runs/2{slash}")
    assert r.status_code == 200
    assert r.json() == runs[1]


@pytest.mark.parametrize("tag", ["3", "0", "-1", "x", "1.0", "9" * 14])
def test_an_absent_run_is_404(api: Api, store: Store, s1: str, tag: str) -> None:
    start(store, s1, "a", 0)
    assert_error(api.get(f"{FAMILIES[0]}/{s1}/runs/{tag}"), 404)


def test_runs_of_an_absent_session_are_404(api: Api, base: str) -> None:
    assert_error(api.get(f"{base}/nope/runs"), 404)
    assert_error(api.get(f"{base}/nope/runs/1"), 404)


def test_v1_uses_the_default_project_when_auth_is_off(api: Api, store: Store) -> None:
    r = api.post("/v1/sessions", json={"session_id": "v1s"})
    assert r.status_code == 201
    assert api.get(f"/v2/{PROJECT}/sessions/v1s").status_code == 200
    assert api.get("/v2/other/sessions/v1s").status_code == 404


def test_no_route_answers_with_a_redirect(api: Api, s1: str) -> None:
    for url in (FAMILIES[0], FAMILIES[0] + "/", f"{FAMILIES[0]}/{s1}/", f"/v1/sessions/{s1}/"):
        r = api.get(url)
        assert r.status_code == 200, url


def test_openapi_documents_both_families(api: Api) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    paths = spec["paths"]
    for prefix in ("/v2/{project_id}/sessions", "/v1/sessions"):
        assert set(paths[prefix]) == {"get", "post"}
        assert set(paths[prefix + "/{session_id}"]) == {"get", "patch", "post", "delete"}
        assert set(paths[prefix + "/{session_id}/action"]) == {"post"}
        assert set(paths[prefix + "/{session_id}/jobs/{job_id}"]) == {"put", "delete"}
        assert set(paths[prefix + "/{session_id}/runs/{tag}"]) == {"get"}
    action = paths["/v2/{project_id}/sessions/{session_id}/action"]["post"]
    assert "202" in action["responses"]
    ref = action["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"]
    assert "SessionFields" in spec["components"]["schemas"]
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# Bad input: a JSON error, and nothing changes --------------------------------------------

S = "s1"
V2 = f"/v2/{PROJECT}/sessions"
ACTION = f"{V2}/{S}/action"
TOO_BIG = b'{"description": "' + b"x" * MAX_BODY + b'"}'

# (id, method, url, request kwargs, status)
# fmt: off
BAD_INPUT: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("malformed-json", "POST", ACTION, {"content": b'{"start": ', "headers": JSON}, 400),
    ("malformed-json-create", "POST", V2, {"content": b"{'a': 1}", "headers": JSON}, 400),
    ("nan", "PATCH", f"{V2}/{S}", {"content": b'{"hold_off": NaN}', "headers": JSON}, 400),
    ("empty-body-action", "POST", ACTION, {"content": b"", "headers": JSON}, 400),
    ("empty-body-create", "POST", V2, {"content": b"", "headers": JSON}, 400),
    ("empty-body-patch", "PATCH", f"{V2}/{S}", {"content": b" ", "headers": JSON}, 400),
    ("empty-body-replace", "POST", f"{V2}/{S}", {"content": b"", "headers": JSON}, 400),
    ("not-an-object-list", "POST", ACTION, {"json": [{"start": {}}]}, 400),
    ("not-an-object-string", "POST", V2, {"json": "session"}, 400),
    ("not-an-object-number", "PATCH", f"{V2}/{S}", {"json": 3}, 400),
    ("not-an-object-put-job", "PUT", f"{V2}/{S}/jobs/j9", {"json": ["c"]}, 400),
    ("not-an-object-list-filter", "GET", V2, {"json": [1]}, 400),
    ("no-action", "POST", ACTION, {"json": {}}, 400),
    ("two-actions", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": 0},
                                              "end": {"job_id": "a", "result": "fail"}}}, 400),
    ("unknown-action", "POST", ACTION, {"json": {"stop": {"job_id": "a"}}}, 400),
    ("action-params-not-object", "POST", ACTION, {"json": {"start": ["a", 0]}}, 400),
    ("missing-job-id", "POST", ACTION, {"json": {"start": {"current_tag": 0}}}, 400),
    ("missing-current-tag", "POST", ACTION, {"json": {"start": {"job_id": "a"}}}, 400),
    ("missing-result", "POST", ACTION, {"json": {"end": {"job_id": "a"}}}, 400),
    ("unknown-action-field", "POST", ACTION,
     {"json": {"start": {"job_id": "a", "current_tag": 0, "force": True}}}, 400),
    ("job-id-not-string", "POST", ACTION, {"json": {"start": {"job_id": 1, "current_tag": 0}}},
     400),
    ("tag-string", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": "0"}}}, 400),
    ("tag-float", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": 0.0}}}, 400),
    ("tag-bool", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": False}}}, 400),
    ("tag-negative", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": -1}}}, 400),
    ("tag-too-big", "POST", ACTION,
     {"json": {"start": {"job_id": "a", "current_tag": 10**12 + 1}}}, 400),
    ("tag-over-64-bit", "POST", ACTION,
     {"content": b'{"start": {"job_id": "a", "current_tag": 99999999999999999999999}}',
      "headers": JSON}, 400),
    ("end-tag-float", "POST", ACTION,
     {"json": {"end": {"job_id": "a", "current_tag": 1.5, "result": "success"}}}, 400),
    ("hold-off-fraction", "PATCH", f"{V2}/{S}", {"json": {"hold_off": 1.5}}, 400),
    ("hold-off-string", "PATCH", f"{V2}/{S}", {"json": {"hold_off": "30"}}, 400),
    ("hold-off-negative", "POST", V2, {"json": {"hold_off": -5}}, 400),
    ("session-tag-too-big", "POST", f"{V2}/{S}", {"json": {"session_tag": 10**12 + 1}}, 400),
    ("result-unknown", "POST", ACTION,
     {"json": {"end": {"job_id": "a", "result": "maybe"}}}, 400),
    ("result-empty", "POST", ACTION, {"json": {"end": {"job_id": "a", "result": ""}}}, 400),
    ("unknown-document-field", "POST", V2, {"json": {"description": "x", "colour": "red"}}, 400),
    ("unknown-schedule-field", "PATCH", f"{V2}/{S}", {"json": {"schedule": {"when": 1}}}, 400),
    ("unknown-job-field", "PATCH", f"{V2}/{S}", {"json": {"jobs": {"a": {"host": "x"}}}}, 400),
    ("bad-job-status", "PATCH", f"{V2}/{S}", {"json": {"jobs": {"a": {"status": "gone"}}}}, 400),
    ("unknown-put-job-field", "PUT", f"{V2}/{S}/jobs/j9", {"json": {"client": "x"}}, 400),
    ("unknown-filter-key", "GET", V2, {"json": {"where": []}}, 400),
    ("unknown-filter-field", "GET", V2, {"json": {"match": [{"colour": "red"}]}}, 400),
    ("filter-not-list", "GET", V2, {"json": {"match": {"status": ""}}}, 400),
    ("limit-not-int", "GET", V2 + "?limit=ten", {}, 400),
    ("offset-negative", "GET", V2 + "?offset=-1", {}, 400),
    ("other-project-in-body", "POST", V2, {"json": {"project_id": "other"}}, 400),
    ("other-session-in-body", "PATCH", f"{V2}/{S}", {"json": {"session_id": "s2"}}, 400),
    ("bad-id-in-body", "POST", V2, {"json": {"session_id": "has space"}}, 400),
    ("bad-job-id-in-action", "POST", ACTION, {"json": {"start": {"job_id": "a/b",
                                                                  "current_tag": 0}}}, 400),
    ("bad-job-id-in-jobs", "PATCH", f"{V2}/{S}", {"json": {"jobs": {"a b": {}}}}, 400),
    ("bad-client-id", "PUT", f"{V2}/{S}/jobs/j9", {"json": {"client_id": "né"}}, 400),
    ("long-id-in-body", "POST", V2, {"json": {"session_id": "x" * 65}}, 400),
    ("bad-idempotency-key", "POST", ACTION,
     {"json": {"start": {"job_id": "a", "current_tag": 0}},
      "headers": {"Idempotency-Key": "not valid!"}}, 400),
    ("oversized-body", "POST", V2, {"content": TOO_BIG, "headers": JSON}, 413),
    ("oversized-action", "POST", ACTION, {"content": TOO_BIG, "headers": JSON}, 413),
    ("oversized-list-filter", "GET", V2, {"content": TOO_BIG, "headers": JSON}, 413),
    ("content-type-text", "POST", ACTION,
     {"content": b'{"start": {"job_id": "a", "current_tag": 0}}',
      "headers": {"content-type": "text/plain"}}, 415),
    ("content-type-missing", "POST", V2, {"content": b'{"description": "x"}'}, 415),
    ("content-type-form", "PATCH", f"{V2}/{S}", {"data": {"description": "x"}}, 415),
    ("content-type-latin1", "POST", V2,
     {"content": b'{"description": "x"}',
      "headers": {"content-type": "application/json; charset=latin-1"}}, 415),
    ("content-type-put-job-body", "PUT", f"{V2}/{S}/jobs/j9",
     {"content": b'{"client_id": "c"}', "headers": {"content-type": "text/plain"}}, 415),
    ("unknown-session-action", "POST", f"{V2}/nope/action",
     {"json": {"start": {"job_id": "a", "current_tag": 0}}}, 404),
    ("unknown-session-get", "GET", f"{V2}/nope", {}, 404),
    ("unknown-session-patch", "PATCH", f"{V2}/nope", {"json": {"description": "x"}}, 404),
    ("unknown-session-delete", "DELETE", f"{V2}/nope", {}, 404),
    ("unknown-session-put-job", "PUT", f"{V2}/nope/jobs/a", {"headers": JSON}, 404),
    ("unknown-session-runs", "GET", f"{V2}/nope/runs", {}, 404),
    ("unknown-job-start", "POST", ACTION,
     {"json": {"start": {"job_id": "zz", "current_tag": 0}}}, 400),
    ("unknown-job-end", "POST", ACTION,
     {"json": {"end": {"job_id": "zz", "result": "fail"}}}, 400),
    ("tag-too-high", "POST", ACTION, {"json": {"start": {"job_id": "a", "current_tag": 1}}}, 400),
    ("bad-session-id-in-path", "GET", f"{V2}/bad.id", {}, 404),
    ("bad-session-id-in-path-action", "POST", f"{V2}/bad%20id/action",
     {"json": {"start": {"job_id": "a", "current_tag": 0}}}, 404),
    ("bad-session-id-in-path-patch", "PATCH", f"{V2}/{'x' * 65}", {"json": {}}, 404),
    ("bad-job-id-in-path", "PUT", f"{V2}/{S}/jobs/j%2A9", {"headers": JSON}, 404),
    ("bad-job-id-in-path-delete", "DELETE", f"{V2}/{S}/jobs/a.b", {}, 404),
    ("bad-project-in-path", "GET", f"/v2/p%21/sessions/{S}", {}, 404),
    # An encoded slash is no separator: these name no session (and must not reach one).
    ("encoded-slash-remove-job", "DELETE", f"{V2}/{S}%2Fjobs%2Fa", {}, 404),
    ("encoded-slash-add-job", "PUT", f"{V2}/{S}%2Fjobs%2Fzz", {"headers": JSON}, 404),
    ("encoded-slash-action", "POST", f"{V2}/{S}%2faction",
     {"json": {"start": {"job_id": "a", "current_tag": 0}}}, 404),
    ("encoded-slash-runs", "GET", f"{V2}/{S}%2Fruns", {}, 404),
    ("impossible-schedule-date", "PATCH", f"{V2}/{S}",
     {"json": {"schedule": {"schedule_date": "2024-13-45T99:99"}}}, 400),
    ("version-without-underscore", "PATCH", f"{V2}/{S}", {"json": {"version": 1}}, 400),
    ("unknown-route", "GET", "/v3/sessions", {}, 404),
    ("unknown-suffix", "POST", f"{V2}/{S}/start", {"json": {}}, 404),
]

# fmt: on

WRONG_METHODS: list[tuple[str, str, set[str]]] = [
    ("PUT", f"{V2}/{S}", {"GET", "HEAD", "PATCH", "POST", "DELETE"}),
    ("DELETE", V2, {"GET", "HEAD", "POST"}),
    ("PATCH", V2 + "/", {"GET", "HEAD", "POST"}),
    ("GET", ACTION, {"POST"}),
    ("PUT", f"{V2}/{S}/actions/", {"POST"}),
    ("GET", f"{V2}/{S}/jobs/a", {"PUT", "DELETE"}),
    ("POST", f"{V2}/{S}/runs", {"GET", "HEAD"}),
    ("DELETE", f"/v1/sessions/{S}/runs/1", {"GET", "HEAD"}),
    ("OPTIONS", f"/v1/sessions/{S}", {"GET", "HEAD", "PATCH", "POST", "DELETE"}),
]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_refused_and_changes_nothing(
    api: Api,
    store: Store,
    client: redis.Redis,
    s1: str,
    method: str,
    url: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    before_doc = store.get(PROJECT, s1)
    before_state = redis_state(client)
    response = api.request(method, url, **kwargs)
    assert_error(response, status)
    assert store.get(PROJECT, s1) == before_doc
    after_state = redis_state(client)
    if status != 400 or before_state != after_state:
        # A refusal from the script itself (unknown job, tag too high) is remembered under
        # its request id; the session itself never changes.
        changed = {
            k
            for k in before_state.keys() | after_state.keys()
            if before_state.get(k) != after_state.get(k)
        }
        assert all(k.endswith((b":requests", b":requests:exp")) for k in changed), changed
    assert store.list_sessions(PROJECT) == [before_doc]


@pytest.mark.parametrize(("method", "url", "allowed"), WRONG_METHODS)
def test_a_wrong_method_is_405_with_allow(
    api: Api, store: Store, client: redis.Redis, s1: str, method: str, url: str, allowed: set[str]
) -> None:
    before = redis_state(client)
    response = api.request(method, url, json={"start": {"job_id": "a", "current_tag": 0}})
    assert_error(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert redis_state(client) == before


def test_a_streamed_body_over_the_limit_is_413(api: Api, client: redis.Redis, s1: str) -> None:
    """No Content-Length (chunked): the limit holds on what is actually read."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"description": "'
        for _ in range(MAX_BODY // 512 + 1):
            yield b"x" * 512
        yield b'"}'

    before = redis_state(client)
    response = api.patch(f"{V2}/{s1}", content=chunks(), headers=JSON)
    assert_error(response, 413)
    assert redis_state(client) == before


# Not bad input ------------------------------------------------------------------------


def test_a_get_list_with_a_json_body_and_a_put_without_body_are_fine(api: Api, s1: str) -> None:
    assert api.request("GET", V2 + "/", json={"match": []}).status_code == 200
    assert api.put(f"{V2}/{s1}/jobs/j9", headers=JSON).status_code == 204
    assert api.put(f"{V2}/{s1}/jobs/j10", content=b"", headers=JSON).status_code == 204
    assert api.put(f"{V2}/{s1}/jobs/j11").status_code == 204


def test_json_with_a_utf8_charset_is_accepted(api: Api, s1: str) -> None:
    r = api.post(
        f"{V2}/{s1}/action",
        content=orjson.dumps({"start": {"job_id": "a", "current_tag": 0}}),
        headers={"content-type": "Application/JSON; charset=UTF-8"},
    )
    assert r.status_code == 202


def test_a_document_read_back_can_be_written_back(api: Api, store: Store, s1: str) -> None:
    start(store, s1, "a", 0)
    doc = api.get(f"{V2}/{s1}").json()
    r = api.post(f"{V2}/{s1}", json=doc)
    assert r.status_code == 201
    assert api.patch(f"{V2}/{s1}", json=doc).status_code == 200


def test_the_largest_integers_pass(api: Api, store: Store) -> None:
    big = 10**12
    r = api.post(
        V2,
        json={
            "session_id": "big",
            "hold_off": big,
            "session_tag": big,
            "run_timeout": big,
            "jobs": {"a": {}},
        },
    )
    assert r.status_code == 201
    doc = store.get(PROJECT, "big")
    assert doc is not None
    assert (doc["hold_off"], doc["session_tag"], doc["run_timeout"]) == (big, big, big)


# Failures outside the client's control ----------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_redis_out_of_reach_is_503_with_retry_after(settings: Settings) -> None:
    dead = redis.Redis(
        host="127.0.0.1",
        port=_closed_port(),
        socket_connect_timeout=0.2,
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    api = Api(create_app(settings, Store(dead, settings)))
    try:
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"{V2}/s1", {}),
            ("POST", f"{V2}/s1/action", {"json": {"start": {"job_id": "a", "current_tag": 0}}}),
            ("POST", V2, {"json": {}}),
            ("GET", V2, {}),
        ]
        for method, url, kwargs in cases:
            response = api.request(method, url, **kwargs)
            assert_error(response, 503)
            assert response.headers["retry-after"] == "1"
    finally:
        api.close()
        dead.close()


def test_the_shim_starts_without_redis_and_serves_once_it_is_up(
    server_kind: ServerKind, tmp_path: Path
) -> None:
    port = _closed_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_connect_timeout=0.2)
    app = create_app(settings)
    api = Api(app)
    try:
        response = api.get(f"{V2}/s1")
        assert_error(response, 503)
        assert response.headers["retry-after"] == "1"
        with ServerProcess(server_kind, tmp_path, port=port) as server:
            wait_closed(app)  # the breaker's probe sees Redis back
            assert_error(api.get(f"{V2}/s1"), 404)
            assert api.post(V2, json={"session_id": "s1"}).status_code == 201
            server.restart()  # a server without persistence: it comes back empty
            assert api.post(V2, json={"session_id": "s2"}).status_code == 201
    finally:
        api.close()
        app.state.shim.close()


def wait_closed(app: Any, timeout: float = 5.0) -> None:
    """Wait until the shim's breaker has seen Redis answer again."""
    deadline = time.monotonic() + timeout
    while app.state.shim.breaker.open:
        assert time.monotonic() < deadline, "the breaker did not close"
        time.sleep(0.02)


def test_while_redis_is_unreachable_the_shim_answers_503_without_trying_each_time(
    server_kind: ServerKind, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Store calls run on the event loop: during an outage one request pays for the failed
    connection, the others are answered 503 at once until a probe sees Redis back."""
    port = _closed_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0")
    app = create_app(settings)
    api = Api(app)
    try:
        with caplog.at_level(logging.WARNING, logger="session_worker.api"):
            for _ in range(5):
                response = api.get(f"{V2}/s1")
                assert_error(response, 503)
                assert response.headers["retry-after"] == "1"
                assert_error(api.post(V2, json={"session_id": "s1"}), 503)
            tried = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
            assert len(tried) == 1
            assert app.state.shim.breaker.open
        time.sleep(PROBE_INTERVAL * 3)
        assert app.state.shim.breaker.open  # still nobody there
        with ServerProcess(server_kind, tmp_path, port=port):
            wait_closed(app)
            assert_error(api.get(f"{V2}/s1"), 404)
            assert api.post(V2, json={"session_id": "s1"}).status_code == 201
        assert app.state.shim.breaker.trips == 1
    finally:
        api.close()
        app.state.shim.close()


def test_redis_out_of_memory_is_a_503_and_changes_nothing(
    api: Api, store: Store, client: redis.Redis
) -> None:
    make_session(store, "s1", "a")
    before = store.get(PROJECT, "s1")
    limit = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", 1)
    try:
        for response in (
            api.post(V2, json={"session_id": "s2"}),
            api.post(f"{V2}/s1/action", json={"start": {"job_id": "a", "current_tag": 0}}),
        ):
            body = assert_error(response, 503)
            assert response.headers["retry-after"] == "1"
            assert "retry" in body["description"]
    finally:
        client.config_set("maxmemory", limit)
    assert store.get(PROJECT, "s1") == before
    assert store.get(PROJECT, "s2") is None


def test_transient_redis_errors_are_told_apart_from_the_others() -> None:
    assert is_transient(redis.ConnectionError("Error 111 connecting to x"))
    assert is_transient(redis.TimeoutError("Timeout reading from socket"))
    assert is_transient(redis.exceptions.OutOfMemoryError("command not allowed", status_code="OOM"))
    assert is_transient(redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"))
    assert is_transient(redis.ResponseError("BUSY Redis is busy running a script"))
    assert not is_transient(redis.ResponseError("ERR user_script:12: attempt to index nil"))
    assert not is_transient(ValueError("not Redis"))


class _Broken(Store):
    def get(self, project_id: str, session_id: str) -> dict[str, Any] | None:
        raise RuntimeError("a bug")


def test_an_unexpected_error_is_a_json_500(settings: Settings, client: redis.Redis) -> None:
    api = Api(create_app(settings, _Broken(client, settings)), raise_app_exceptions=False)
    try:
        body = assert_error(api.get(f"{V2}/s1"), 500)
        assert "a bug" not in body["description"]
    finally:
        api.close()


# serve(): no public bind without auth ----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_auth(host: str) -> None:
    check_bind(Settings(), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_a_public_bind_without_tokens_is_refused(host: str) -> None:
    with pytest.raises(SystemExit, match="refusing to serve"):
        check_bind(Settings(), host)
    check_bind(Settings(insecure_no_auth=True), host)
    check_bind(Settings(auth_tokens={"t": TokenGrant(project_id="p")}), host)


def test_serve_refuses_before_listening() -> None:
    with pytest.raises(SystemExit, match="SESSION_WORKER_AUTH_TOKENS"):
        serve(Settings(), "0.0.0.0", 0, 1)


def test_add_job_through_the_store_and_the_api_agree(api: Api, store: Store, s1: str) -> None:
    """The shim adds what the store adds: same document either way."""
    api.put(f"{V2}/{s1}/jobs/x1", headers=JSON).raise_for_status()
    store.add_job(
        AddJobCommand(request_id=new_id(), project_id=PROJECT, session_id=s1, job_id="x2")
    ).raise_for_error()
    doc = store.get(PROJECT, s1)
    assert doc is not None
    assert doc["jobs"]["x1"] == doc["jobs"]["x2"]
