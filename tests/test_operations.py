"""Operations: metrics, structured logs, /healthz and /readyz, the deadline sweep's count.

Unit tests count in this process (prometheus-client's default registry); the stack test runs
`session-worker up` (2 workers, sweep, shim) on a Redis with a password, runs a short
`simulate` and an HTTP start through it, and checks /metrics (every process added up), the
JSON log lines and that neither the password nor the token was ever printed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from asgi_client import call
from clock import Clock
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from session_worker import logs, tasks
from session_worker.api import create_app
from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.metrics import MeteredStore, outcome_of, run_completed_in
from session_worker.models import Reply
from session_worker.redis_server import ServerProcess, free_port
from session_worker.settings import Settings, TokenGrant
from session_worker.simulate import SimConfig, run_simulation
from session_worker.stack import mask_url

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "ops"


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process (0 when never counted)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def new_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def settings(redis_url: str) -> Settings:
    # A queue of our own: nothing else sends to it, no worker consumes it.
    return Settings(redis_url=redis_url, default_project=PROJECT, queue=f"ops-{new_id()[:8]}")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(client: redis.Redis, settings: Settings, clock: Clock) -> MeteredStore:
    return MeteredStore(client, settings, clock=clock)


def create(store: MeteredStore, session_id: str, jobs: list[str], **doc: Any) -> None:
    fields = {"session_id": session_id, "jobs": {j: {} for j in jobs}, **doc}
    reply = tasks.run_command(
        "create", {"request_id": new_id(), "project_id": PROJECT, "document": fields}, store
    )
    assert reply is not None and reply.ok, reply


def command(store: MeteredStore, kind: str, **fields: Any) -> Reply:
    fields.setdefault("request_id", new_id())
    reply = tasks.run_command(kind, {"project_id": PROJECT, **fields}, store)
    assert reply is not None
    return reply


# Metrics: unit -------------------------------------------------------------------------


def test_outcome_names() -> None:
    assert outcome_of(None) == "dropped"
    assert outcome_of(Reply(request_id="r", ok=True, result="hold-off")) == "hold-off"
    assert outcome_of(Reply(request_id="r", ok=True)) == "ok"
    assert outcome_of(Reply.failure("r", "s", "not_found", "gone")) == "error:not_found"


def test_run_completed_note_is_read_only_when_present() -> None:
    assert run_completed_in(b'{"ok":true,"result":"success"}') is None
    note = {"session_tag": 3, "result": "fail", "closed": "deadline"}
    raw = json.dumps({"ok": True, "run_completed": note}).encode()
    assert run_completed_in(raw) == note
    # A job called "run_completed" inside the document is not a note.
    assert run_completed_in(b'{"jobs":{"run_completed":{}}}') is None
    assert run_completed_in(None) is None


def test_queue_commands_count_by_kind_and_outcome(store: MeteredStore) -> None:
    s = f"q-{new_id()[:8]}"
    create(store, s, ["a", "b"])
    before = {
        outcome: sample("session_worker_commands_total", kind="start", outcome=outcome, via="queue")
        for outcome in ("success", "hold-off", "out-of-sync", "error:bad_request")
    }
    durations = sample("session_worker_command_duration_seconds_count", kind="start", via="queue")
    assert command(store, "start", session_id=s, job_id="a", current_tag=0).result == "success"
    assert command(store, "start", session_id=s, job_id="a", current_tag=1).result == "hold-off"
    assert command(store, "start", session_id=s, job_id="b", current_tag=0).result == "success"
    assert command(store, "start", session_id=s, job_id="zz", current_tag=0).error is not None
    after = {
        outcome: sample("session_worker_commands_total", kind="start", outcome=outcome, via="queue")
        for outcome in before
    }
    assert {k: after[k] - before[k] for k in before} == {
        "success": 2,
        "hold-off": 1,
        "out-of-sync": 0,
        "error:bad_request": 1,
    }
    assert (
        sample("session_worker_command_duration_seconds_count", kind="start", via="queue")
        == durations + 4
    )


def test_a_completed_run_is_counted_once_even_when_its_end_is_repeated(
    store: MeteredStore,
) -> None:
    s = f"done-{new_id()[:8]}"
    create(store, s, ["a", "b"])
    command(store, "start", session_id=s, job_id="a", current_tag=0)
    command(store, "start", session_id=s, job_id="b", current_tag=0)
    before = sample("session_worker_runs_completed_total", result="fail", closed="completed")
    command(store, "end", session_id=s, job_id="a", result="success", current_tag=1)
    assert sample("session_worker_runs_completed_total", result="fail", closed="completed") == (
        before
    )
    end = {"session_id": s, "job_id": "b", "result": "fail", "current_tag": 1}
    request_id = new_id()
    assert command(store, "end", request_id=request_id, **end).ok
    assert command(store, "end", request_id=request_id, **end).ok  # redelivered: stored reply
    assert sample("session_worker_runs_completed_total", result="fail", closed="completed") == (
        before + 1
    )
    # The note never reaches the document or the run history.
    doc = store.get(PROJECT, s)
    assert doc is not None and "run_completed" not in doc and doc["result"] == "fail"


def test_a_superseded_run_is_counted(store: MeteredStore, clock: Clock) -> None:
    s = f"sup-{new_id()[:8]}"
    create(store, s, ["a", "b"], hold_off=5)
    command(store, "start", session_id=s, job_id="a", current_tag=0)
    clock.now += 10
    before = sample("session_worker_runs_completed_total", result="fail", closed="superseded")
    assert command(store, "start", session_id=s, job_id="a", current_tag=1).session_tag == 2
    after = sample("session_worker_runs_completed_total", result="fail", closed="superseded")
    assert after == before + 1


def test_the_sweep_counts_the_deadlines_it_applies(
    client: redis.Redis, settings: Settings, store: MeteredStore, clock: Clock
) -> None:
    s = f"late-{new_id()[:8]}"
    create(store, s, ["a", "b"], run_timeout=60)
    command(store, "start", session_id=s, job_id="a", current_tag=0)
    sweeper = MeteredStore(client, settings, clock=clock, sweep=True)
    expiries = sample("session_worker_deadline_expiries_total")
    by_deadline = sample("session_worker_runs_completed_total", result="fail", closed="deadline")
    clock.now += 30
    sweeper.sweep_deadlines()
    assert sample("session_worker_deadline_expiries_total") == expiries
    clock.now += 31
    assert sweeper.sweep_deadlines() == 1
    assert sample("session_worker_deadline_expiries_total") == expiries + 1
    assert (
        sample("session_worker_runs_completed_total", result="fail", closed="deadline")
        == by_deadline + 1
    )
    assert sweeper.sweep_deadlines() == 0  # nothing left: counted once
    assert sample("session_worker_deadline_expiries_total") == expiries + 1
    doc = store.get(PROJECT, s)
    assert doc is not None and doc["status"] == "completed" and "run_completed" not in doc


def test_a_deadline_applied_by_a_command_is_a_completed_run_not_a_sweep_expiry(
    store: MeteredStore, clock: Clock
) -> None:
    s = f"cmd-{new_id()[:8]}"
    create(store, s, ["a", "b"], run_timeout=5, hold_off=100)
    command(store, "start", session_id=s, job_id="a", current_tag=0)
    expiries = sample("session_worker_deadline_expiries_total")
    by_deadline = sample("session_worker_runs_completed_total", result="fail", closed="deadline")
    clock.now += 5
    assert command(store, "end", session_id=s, job_id="b", result="success").ok
    assert (
        sample("session_worker_runs_completed_total", result="fail", closed="deadline")
        == by_deadline + 1
    )
    assert sample("session_worker_deadline_expiries_total") == expiries


def test_a_reply_wait_that_times_out_is_counted(settings: Settings) -> None:
    before = sample("session_worker_reply_timeouts_total")
    with (
        SessionClient(settings=settings, project_id=PROJECT, timeout=0.05) as client,
        pytest.raises(ReplyTimeout),
    ):
        client.start("nobody-consumes", "j", 0)
    assert sample("session_worker_reply_timeouts_total") == before + 1


def test_http_mutations_are_counted_and_metrics_show_the_queue_depth(
    settings: Settings, store: MeteredStore
) -> None:
    s = f"http-{new_id()[:8]}"
    create(store, s, ["a"])
    app = create_app(settings, store)
    ok_before = sample("session_worker_commands_total", kind="start", outcome="success", via="http")
    bad_before = sample(
        "session_worker_commands_total", kind="start", outcome="error:bad_request", via="http"
    )
    raw_before = sample(
        "session_worker_commands_total", kind="action", outcome="error:bad_request", via="http"
    )
    url = f"/v2/{PROJECT}/sessions/{s}/action"
    r = call(app, "POST", url, json={"start": {"job_id": "a", "current_tag": 0}})
    assert r.status_code == 202
    r = call(app, "POST", url, json={"start": {"job_id": "a", "current_tag": 9}})
    assert r.status_code == 400  # tag too high, from the script
    r = call(app, "POST", url, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400  # never became a command
    assert (
        sample("session_worker_commands_total", kind="start", outcome="success", via="http")
        == ok_before + 1
    )
    assert (
        sample(
            "session_worker_commands_total", kind="start", outcome="error:bad_request", via="http"
        )
        == bad_before + 1
    )
    assert (
        sample(
            "session_worker_commands_total", kind="action", outcome="error:bad_request", via="http"
        )
        == raw_before + 1
    )
    # Three commands waiting in the queue (no worker consumes it).
    with SessionClient(settings=settings, project_id=PROJECT) as sender:
        for _ in range(3):
            sender.send("start", session_id=s, job_id="a", current_tag=1)
    scraped = call(app, "GET", "/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    values = scrape_values(scraped.text)
    assert values[("session_worker_queue_depth", (("queue", settings.queue),))] == 3
    key = (
        "session_worker_commands_total",
        (("kind", "start"), ("outcome", "success"), ("via", "http")),
    )
    assert values[key] == ok_before + 1


def scrape_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# Health -----------------------------------------------------------------------------------


def test_healthz_needs_nothing(settings: Settings) -> None:
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    grants = {"secret-token-1": TokenGrant(project_id=PROJECT)}
    app = create_app(dead.model_copy(update={"auth_tokens": grants}))
    r = call(app, "GET", "/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    for path in ("/v1/healthz", f"/v2/{PROJECT}/healthz", "/v1/readyz", "/v1/metrics"):
        assert call(app, "GET", path).status_code in (401, 404)


def test_readyz_without_a_worker_is_503_naming_the_workers(settings: Settings) -> None:
    app = create_app(settings)
    started = time.monotonic()
    r = call(app, "GET", "/readyz")
    assert r.status_code == 503
    body = r.json()
    assert set(body) == {"title", "description"}
    assert "no Celery worker answered a ping within 1 s" in body["description"]
    assert "Redis" not in body["description"]
    assert time.monotonic() - started < 5


def test_readyz_with_redis_down_is_503_naming_redis_and_is_cached(settings: Settings) -> None:
    dead = settings.model_copy(
        update={"redis_url": f"redis://:pw-never-shown@127.0.0.1:{free_port()}/0"}
    )
    app = create_app(dead)
    ops = app.state.operations
    probes = 0
    probe = ops._probe

    def counting() -> tuple[list[str], int]:
        nonlocal probes
        probes += 1
        return probe()

    ops._probe = counting
    r = call(app, "GET", "/readyz")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "Redis does not answer PING" in r.json()["description"]
    assert "pw-never-shown" not in r.text
    for _ in range(5):
        assert call(app, "GET", "/readyz").status_code == 503
    assert probes == 1  # answered from the cache


def test_readyz_with_redis_stalled_answers_within_its_timeout(
    settings: Settings, silent_port: int
) -> None:
    """A Redis that takes connections and never answers costs one probe READY_TIMEOUT (1 s),
    not the retries of a command client."""
    stalled = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{silent_port}/0"})
    app = create_app(stalled)
    started = time.monotonic()
    r = call(app, "GET", "/readyz")
    took = time.monotonic() - started
    assert r.status_code == 503
    assert "Redis does not answer PING (TimeoutError)" in r.json()["description"]
    assert took < 2.5


# Logs ---------------------------------------------------------------------------------


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer (restored afterwards)."""
    monkeypatch.setenv(logs.FORMAT_ENV, "json")
    monkeypatch.setenv(logs.LEVEL_ENV, "debug")
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    monkeypatch.setattr("sys.stderr", buffer)
    logs.configure()
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_session_worker", False):
                root.removeHandler(handler)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_json_log_line_of_an_http_command_and_no_secrets(
    json_logs: io.StringIO, redis_url: str
) -> None:
    token = "tok-" + new_id()
    password_url = f"redis://:hunter2-{new_id()[:6]}@127.0.0.1:{free_port()}/0"
    settings = Settings(
        redis_url=redis_url,
        auth_tokens={token: TokenGrant(project_id=PROJECT, user_id="u1")},
        queue=f"ops-{new_id()[:8]}",
    )
    app = create_app(settings)
    s = f"log-{new_id()[:8]}"
    headers = {"X-Auth-Token": token, "Idempotency-Key": "req-" + s}
    r = call(app, "POST", f"/v2/{PROJECT}/sessions/{s}", json={"jobs": {"a": {}}}, headers=headers)
    assert r.status_code == 201
    r = call(
        app,
        "POST",
        f"/v2/{PROJECT}/sessions/{s}/action",
        json={"start": {"job_id": "a", "current_tag": 0}},
        headers={"X-Auth-Token": token, "Idempotency-Key": "start-" + s},
    )
    assert r.status_code == 202
    bad = call(app, "DELETE", f"/v2/{PROJECT}/sessions/{s}", headers={"X-Auth-Token": "wrong"})
    assert bad.status_code == 401
    # Anything that prints a Redis URL is masked by the formatter, whatever logged it.
    logging.getLogger("session_worker.test").warning("connecting to %s", password_url)
    down = create_app(settings.model_copy(update={"redis_url": password_url}))
    assert call(down, "GET", f"/v2/{PROJECT}/sessions/{s}", headers=headers).status_code == 503

    text = json_logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    commands = [e for e in lines if e.get("via") == "http"]
    start = next(e for e in commands if e["kind"] == "start")
    assert start["level"] == "INFO"
    assert start["logger"] == "session_worker.api"
    assert start["session"] == s
    assert start["job"] == "a"
    assert start["outcome"] == "success"
    assert start["tag"] == 1
    assert start["request_id"] == "start-" + s
    assert isinstance(start["latency_ms"], float) and start["latency_ms"] >= 0
    assert start["message"].startswith(f"kind=start session={s} job=a outcome=success tag=1")
    refused = next(e for e in commands if e["kind"] == "delete")
    assert (refused["outcome"], refused["tag"]) == ("error:unauthorized", None)
    assert any("connecting to redis://:***@127.0.0.1:" in e["message"] for e in lines)
    assert token not in text
    assert "wrong" not in text
    assert "hunter2" not in text


def test_the_queue_log_line_carries_the_same_fields(
    json_logs: io.StringIO, store: MeteredStore
) -> None:
    s = f"qlog-{new_id()[:8]}"
    create(store, s, ["a"])
    command(store, "start", request_id="qlog-" + s, session_id=s, job_id="a", current_tag=0)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    start = next(e for e in lines if e.get("kind") == "start")
    assert {k: start[k] for k in ("via", "session", "job", "outcome", "tag", "request_id")} == {
        "via": "queue",
        "session": s,
        "job": "a",
        "outcome": "success",
        "tag": 1,
        "request_id": "qlog-" + s,
    }
    assert start["logger"] == "session_worker.tasks"


def test_log_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, "xml")
    with pytest.raises(ValueError, match="SESSION_WORKER_LOG_FORMAT"):
        logs.formatter()
    monkeypatch.setenv(logs.FORMAT_ENV, "text")
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match="SESSION_WORKER_LOG_LEVEL"):
        logs.log_level()
    assert logs.mask_secrets("rediss://user:p%40ss@h:1/0 and redis://h:2") == (
        "rediss://user:***@h:1/0 and redis://h:2"
    )


# The whole stack --------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SESSION_WORKER_* settings, plus config/test.env and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WORKER_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for line in (ROOT / "config" / "test.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    env.update(extra)
    return env


PASSWORD = "s3cret-pw-" + uuid.uuid4().hex[:6]
TOKEN = "node-token-" + uuid.uuid4().hex[:6]


class Stack:
    def __init__(self, proc: subprocess.Popen[bytes], cwd: Path, url: str, port: int) -> None:
        self.proc, self.cwd, self.url, self.port = proc, cwd, url, port

    @property
    def log(self) -> str:
        return (self.cwd / "up.log").read_text(errors="replace")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`session-worker up` (2 workers, sweep, shim) on a Redis that wants a password."""
    cwd = tmp_path_factory.mktemp("ops-stack")
    with ServerProcess("valkey", cwd / "valkey") as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", PASSWORD)
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        port = free_port()
        env = clean_env(
            SESSION_WORKER_REDIS_URL=url,
            SESSION_WORKER_LOG_FORMAT="json",
            SESSION_WORKER_AUTH_TOKENS=json.dumps({TOKEN: {"project_id": PROJECT}}),
        )
        log = (cwd / "up.log").open("w")
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "session-worker"), "up", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        up = Stack(proc, cwd, url, port)
        try:
            deadline = time.monotonic() + 60
            while not ("ready: 2 worker(s)" in up.log and "Application startup" in up.log):
                assert proc.poll() is None, up.log
                assert time.monotonic() < deadline, up.log
                time.sleep(0.05)
            yield up
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                log.close()
            with redis.Redis.from_url(url) as admin:
                admin.config_set("requirepass", "")


@pytest.mark.integration
def test_the_stack_reports_what_simulate_did(stack: Stack) -> None:
    assert (stack.cwd / "var" / "metrics").is_dir()
    assert httpx.get(stack.base + "/healthz", timeout=10).status_code == 200
    ready = httpx.get(stack.base + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["workers"] >= 1

    settings = Settings(redis_url=stack.url, reply_timeout=30)
    cfg = SimConfig(nodes=3, sessions=1, rounds=2, hold_off=1, fail_share=0.5, seed=7, timeout=30)
    result = run_simulation(cfg, settings)
    assert result.ok, result.violations

    # One start over HTTP, with the token.
    s = f"web-{new_id()[:8]}"
    headers = {"X-Auth-Token": TOKEN}
    with httpx.Client(base_url=stack.base, headers=headers, timeout=10) as web:
        assert web.post(f"/v2/{PROJECT}/sessions/{s}", json={"jobs": {"a": {}}}).status_code == 201
        started = web.post(
            f"/v2/{PROJECT}/sessions/{s}/action", json={"start": {"job_id": "a", "current_tag": 0}}
        )
        assert started.status_code == 202
        values = scrape_values(web.get("/metrics").text)

    def count(kind: str, outcome: str, via: str = "queue") -> float:
        key = (
            "session_worker_commands_total",
            (("kind", kind), ("outcome", outcome), ("via", via)),
        )
        return values.get(key, 0.0)

    # Every command simulate sent was counted once by the worker that applied it.
    sent = Counter((c.kind, c.result or "ok") for c in result.commands)
    assert sent[("start", "hold-off")] == cfg.rounds  # the eager node, every round
    assert sent[("start", "out-of-sync")] == 1  # the late node, once
    assert sent[("add_job", "success")] == cfg.nodes * cfg.sessions
    for (kind, outcome), n in sent.items():
        assert count(kind, outcome) == n, (kind, outcome)
    queued = {
        labels: value
        for (name, labels), value in values.items()
        if name == "session_worker_commands_total" and ("via", "queue") in labels
    }
    assert sum(queued.values()) == len(result.commands)
    assert count("start", "success", "http") == 1
    assert count("replace", "success", "http") == 1  # POST .../sessions/{id}

    runs = [run for s_id in cfg.session_ids for run in result.store[s_id]["runs"]]
    by_result = Counter(run["result"] for run in runs if run["status"] == "completed")
    assert sum(by_result.values()) == cfg.rounds * cfg.sessions
    for outcome in ("success", "fail"):
        key = (
            "session_worker_runs_completed_total",
            (("closed", "completed"), ("result", outcome)),
        )
        assert values.get(key, 0.0) == by_result[outcome], outcome
    assert values[("session_worker_queue_depth", (("queue", "session_worker"),))] == 0
    assert values[
        ("session_worker_command_duration_seconds_count", (("kind", "start"), ("via", "queue")))
    ] == (sum(n for (kind, _), n in sent.items() if kind == "start"))


@pytest.mark.integration
def test_the_sweep_of_up_counts_an_expiry_on_the_shims_metrics(stack: Stack) -> None:
    s = f"exp-{new_id()[:8]}"
    headers = {"X-Auth-Token": TOKEN}
    with httpx.Client(base_url=stack.base, headers=headers, timeout=10) as web:
        before = scrape_values(web.get("/metrics").text)
        key = ("session_worker_deadline_expiries_total", ())
        doc = {"jobs": {"a": {}, "b": {}}, "run_timeout": 1}
        assert web.post(f"/v2/{PROJECT}/sessions/{s}", json=doc).status_code == 201
        start = {"start": {"job_id": "a", "current_tag": 0}}
        assert web.post(f"/v2/{PROJECT}/sessions/{s}/action", json=start).status_code == 202
        deadline = time.monotonic() + 15
        while True:
            values = scrape_values(web.get("/metrics").text)
            if values.get(key, 0.0) >= before.get(key, 0.0) + 1:
                break
            assert time.monotonic() < deadline, "the sweep never counted the expiry"
            time.sleep(0.2)
    assert values[key] == before.get(key, 0.0) + 1


@pytest.mark.integration
def test_the_stack_logs_json_and_never_a_secret(stack: Stack) -> None:
    # Runs after the two tests above (file order): their commands are in the log.
    assert PASSWORD not in stack.log
    assert TOKEN not in stack.log
    assert mask_url(stack.url) in stack.log  # the banner names the Redis, masked
    entries = []
    for line in stack.log.splitlines():
        _, bar, rest = line.partition("| ")
        if bar and rest.startswith("{"):
            entries.append(json.loads(rest))
    queued = [e for e in entries if e.get("via") == "queue" and e.get("kind") == "start"]
    served = [e for e in entries if e.get("via") == "http" and e.get("kind") == "start"]
    assert queued and served
    for entry in queued + served:
        assert set(entry) >= {
            "time",
            "level",
            "logger",
            "message",
            "kind",
            "session",
            "job",
            "outcome",
            "tag",
            "request_id",
            "latency_ms",
        }
    assert any(e["logger"] == "session_worker.sweep" for e in entries)
