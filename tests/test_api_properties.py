"""Property tests of the HTTP shim over a real Redis: random methods, paths, bodies and headers.

For every request: never a 5xx; every error is a JSON {"title", "description"}; a session the
request does not name (another session of the project, a session of another project) never
changes; and a refused request (4xx) leaves the session it names unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import redis
from asgi_client import Api
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from session_worker.api import create_app
from session_worker.models import CreateCommand, JobEntry, SessionFields, StartCommand
from session_worker.settings import Settings, TokenGrant
from session_worker.store import Store

pytestmark = pytest.mark.http

P, OTHER = "p", "other"
TARGET, VICTIM = "t1", "victim"
TARGET_JOBS = ("a", "b")
VICTIM_JOBS = ("victim-job-1", "victim-job-2")  # adding one elsewhere would move it: never named
TOKEN = "tok"
MAX_BODY = 2048


def _create(store: Store, project: str, session_id: str, jobs: tuple[str, ...]) -> None:
    doc = SessionFields(session_id=session_id, jobs={j: JobEntry() for j in jobs}, hold_off=5)
    store.create(
        CreateCommand(request_id=uuid.uuid4().hex, project_id=project, document=doc)
    ).raise_for_error()
    store.start(
        StartCommand(
            request_id=uuid.uuid4().hex,
            project_id=project,
            session_id=session_id,
            job_id=jobs[0],
            current_tag=0,
        )
    ).raise_for_error()


class World:
    """Three sessions: the target (named by requests), a victim in the same project, and a
    session with the target's id and jobs in another project."""

    def __init__(self, client: redis.Redis, store: Store) -> None:
        self.client = client
        self.store = store

    def reset(self) -> None:
        self.client.flushdb()
        _create(self.store, P, TARGET, TARGET_JOBS)
        _create(self.store, P, VICTIM, VICTIM_JOBS)
        _create(self.store, OTHER, TARGET, TARGET_JOBS)

    def session(self, project: str, session_id: str) -> tuple[Any, ...]:
        """The session's document, run history and its own jobs' records."""
        jobs = VICTIM_JOBS if session_id == VICTIM else TARGET_JOBS
        records = [self.store.job_record(project, j) for j in jobs]
        return (
            self.store.get(project, session_id),
            self.store.runs(project, session_id),
            records,
        )

    def bystanders(self) -> tuple[Any, ...]:
        return (self.session(P, VICTIM), self.session(OTHER, TARGET))


@pytest.fixture
def world(redis_url: str) -> Iterator[tuple[Api, World]]:
    client = redis.Redis.from_url(redis_url)
    settings_ = Settings(
        redis_url=redis_url,
        auth_tokens={TOKEN: TokenGrant(project_id=P, user_id="u")},
        max_body_bytes=MAX_BODY,
    )
    store = Store(client, settings_)
    api = Api(create_app(settings_, store))
    yield api, World(client, store)
    api.close()
    client.close()


# Strategies -------------------------------------------------------------------------------
# Mostly well-formed requests (so that they reach the store), mixed with every kind of junk.

_FORBIDDEN = {VICTIM, *VICTIM_JOBS}

junk = st.text(max_size=70).filter(lambda s: s not in _FORBIDDEN)
valid_id = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).filter(
    lambda s: s not in _FORBIDDEN
)
_target = st.sampled_from([TARGET] * 8 + ["nope", "x" * 65, "a.b"])
session_id = st.one_of(_target, _target, _target, valid_id, junk)
job_id = st.one_of(st.sampled_from([*TARGET_JOBS, "j9", "c"] * 3 + ["a b", ""]), valid_id, junk)
a_tag = st.one_of(
    st.integers(min_value=0, max_value=2),
    st.integers(min_value=-2, max_value=3),
    st.sampled_from([10**12, 10**12 + 1, 2**63, -(2**63)]),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=8,
)
FIELDS = [*sorted(SessionFields.model_fields), "_version", "colour", "member"]
job_entry = st.dictionaries(
    st.sampled_from(["status", "result", "client_id", "time_started", "time_ended", "host"]),
    st.one_of(a_tag, st.sampled_from(["scheduled", "running", "completed", "success", "c1"])),
    max_size=3,
)
field_value = st.one_of(
    a_tag,
    st.sampled_from(["", "running", "completed", "success", "fail", "aborted", "text"]),
    st.dictionaries(job_id, job_entry, max_size=3),
    st.dictionaries(
        st.sampled_from(["event", "status", "schedule_interval", "when"]),
        st.sampled_from(["", "stop", "running", "2 days", "x"]),
        max_size=2,
    ),
    json_value,
)
document = st.dictionaries(st.sampled_from(FIELDS), field_value, max_size=5)
well_formed_action = st.one_of(
    st.builds(
        lambda j, t: {"start": {"job_id": j, "current_tag": t}},
        st.sampled_from(TARGET_JOBS),
        st.integers(0, 2),
    ),
    st.builds(
        lambda j, t, r: {"end": {"job_id": j, "current_tag": t, "result": r}},
        st.sampled_from(TARGET_JOBS),
        st.integers(0, 2),
        st.sampled_from(["success", "fail", "aborted"]),
    ),
)
action_params = st.fixed_dictionaries(
    {},
    optional={
        "job_id": job_id,
        "current_tag": a_tag,
        "result": st.sampled_from(["success", "fail", "aborted", "", "maybe"]),
        "force": json_value,
    },
)
action_body = st.one_of(
    well_formed_action,
    well_formed_action,
    st.dictionaries(
        st.sampled_from(["start", "end", "stop", ""]),
        st.one_of(action_params, json_value),
        max_size=2,
    ),
)
filter_list = st.lists(st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=2), max_size=2)
list_filter = st.fixed_dictionaries(
    {},
    optional={"match": filter_list | json_value, "match_not": filter_list, "where": json_value},
)
raw_body = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b" ",
            b"{",
            b'{"start": NaN}',
            b"[]",
            b"null",
            b'"x"',
            b"\xff\xfe",
            b'{"a": 1, "a": 2}',
            b'{"start": {"job_id": "a", "current_tag": 1e3}}',
            b'{"start": {"job_id": "a", "current_tag": 99999999999999999999999}}',
            b"x" * (MAX_BODY + 1),
        ]
    ),
    json_value.map(orjson.dumps),
)

# (method, path under the family prefix, body) of the real routes, then anything.
COLLECTION = "/sessions"


def _session(suffix: str = "") -> st.SearchStrategy[str]:
    return session_id.map(lambda i: f"/sessions/{quote(i, safe='')}{suffix}")


def _body(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes | None]:
    return st.one_of(shaped.map(orjson.dumps), shaped.map(orjson.dumps), raw_body, st.none())


route = st.one_of(
    st.tuples(st.just("GET"), st.just(COLLECTION), _body(list_filter)),
    st.tuples(st.just("POST"), st.just(COLLECTION), _body(document)),
    st.tuples(st.sampled_from(["GET", "DELETE"]), _session(), st.none() | raw_body),
    st.tuples(st.sampled_from(["PATCH", "POST"]), _session(), _body(document)),
    st.tuples(st.just("POST"), _session("/action"), _body(action_body)),
    st.tuples(st.just("POST"), _session("/actions"), _body(action_body)),
    st.tuples(
        st.sampled_from(["PUT", "DELETE"]),
        st.builds(lambda s, j: f"{s}/jobs/{quote(j, safe='')}", _session(), job_id),
        _body(st.fixed_dictionaries({}, optional={"client_id": job_id, "x": json_value})),
    ),
    st.tuples(st.just("GET"), _session("/runs"), st.none()),
    st.tuples(
        st.just("GET"),
        st.builds(lambda s, t: f"{s}/runs/{quote(str(t), safe='')}", _session(), a_tag),
        st.none(),
    ),
)
anything = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"]),
    st.one_of(
        route.map(lambda r: r[1]),
        junk.map(lambda s: "/" + quote(s, safe="/")),
    ),
    st.one_of(st.none(), raw_body, _body(document), _body(action_body)),
)
request_line = st.one_of(route, route, route, anything)
_prefix = st.sampled_from([f"/v2/{P}"] * 12 + ["/v1"] * 8 + [f"/v2/{OTHER}", "/v3", "", "/v2"])
prefix = st.one_of(*[_prefix] * 5, junk.map(lambda s: "/v2/" + quote(s, safe="")))
content_type = st.sampled_from(
    ["application/json"] * 6
    + [
        None,
        "application/json; charset=utf-8",
        "text/plain",
        "application/json; charset=latin-1",
        "APPLICATION/JSON",
        "multipart/form-data",
        "",
        "application/json;;;",
        "application/jsonx",
    ]
)
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=70)
token = st.sampled_from([TOKEN] * 8 + ["wrong", "", None])
headers = st.fixed_dictionaries(
    {},
    optional={
        "Idempotency-Key": st.one_of(st.sampled_from(["k1", "k2"]), ascii_text),
        "Content-Length": st.sampled_from(["abc", "-1", "99999999999", "0", "1"]),
        "Accept": st.sampled_from(["text/html", "*/*", "application/json"]),
    },
)
query = st.one_of(
    st.just(""),
    st.builds(
        lambda k, v: f"?{k}={quote(v, safe='')}",
        st.sampled_from(["limit", "offset", "other"]),
        st.one_of(st.sampled_from(["0", "1", "-1", "10", "1e3", "99999999999999"]), junk),
    ),
)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    line=request_line,
    prefix=prefix,
    slash=st.sampled_from(["", "", "/"]),
    query=query,
    content_type=content_type,
    token=token,
    headers=headers,
)
def test_random_requests_never_fail_the_server_nor_touch_bystanders(
    world: tuple[Api, World],
    line: tuple[str, str, bytes | None],
    prefix: str,
    slash: str,
    query: str,
    content_type: str | None,
    token: str | None,
    headers: dict[str, str],
) -> None:
    api, state = world
    state.reset()
    before = state.bystanders()
    target_before = state.session(P, TARGET)
    method, path, body = line
    request_headers = dict(headers)
    if content_type is not None:
        request_headers["Content-Type"] = content_type
    if token is not None:
        request_headers["X-Auth-Token"] = token
    if body is not None and "Content-Length" not in request_headers:
        request_headers["Content-Length"] = str(len(body))
    url = prefix + path + slash + query
    response = api.request(method, url, content=body, headers=request_headers)
    event(f"status {response.status_code}")

    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400 and method != "HEAD":
        assert response.headers["content-type"] == "application/json"
        error = response.json()
        assert set(error) == {"title", "description"}
        assert isinstance(error["title"], str) and isinstance(error["description"], str)
    if response.status_code == 405:
        assert response.headers["allow"]
    assert state.bystanders() == before
    if response.status_code >= 400:
        assert state.session(P, TARGET) == target_before


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=action_body, key=st.one_of(st.none(), st.sampled_from(["k1", "k2"])))
def test_random_actions_change_only_their_session(
    world: tuple[Api, World], body: dict[str, Any], key: str | None
) -> None:
    api, state = world
    state.reset()
    before = state.bystanders()
    target_before = state.session(P, TARGET)
    headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = api.request(
        "POST", f"/v2/{P}/sessions/{TARGET}/action", content=orjson.dumps(body), headers=headers
    )
    event(f"status {response.status_code}")
    assert response.status_code in (202, 400), response.text
    if response.status_code == 202:
        reply = response.json()
        assert set(reply) == {"result", "session_tag"}
        assert reply["result"] in ("success", "hold-off", "out-of-sync")
    else:
        assert state.session(P, TARGET) == target_before
    assert state.bystanders() == before
