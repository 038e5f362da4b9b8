"""`session-worker simulate`: a real (small) run passes; the checker catches broken histories."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from session_worker import cli, simulate
from session_worker.keys import KeyBuilder
from session_worker.redis_server import HOST, free_port
from session_worker.settings import Settings
from session_worker.simulate import (
    CommandRecord,
    HttpCommandSender,
    JobReport,
    SimConfig,
    SimResult,
    check_invariants,
    format_report,
    path_rows,
    percentile,
    round_rows,
    run_simulation,
    throughput,
)

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("session-worker")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SESSION_WORKER_* settings, plus config/test.env and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WORKER_")}
    for line in (ROOT / "config" / "test.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    env.update(extra)
    return env


# A fake history, consistent with the rules ----------------------------------------------


@dataclass
class History:
    jobs: list[JobReport]
    commands: list[CommandRecord]
    store: dict[str, dict[str, Any]]


def command(node: int, kind: str, session_id: str, result: str, tag: int) -> CommandRecord:
    request_id = uuid.uuid4().hex
    return CommandRecord(
        node=node,
        kind=kind,
        session_id=session_id,
        request_id=request_id,
        reply_key=f"sw:{{default:{session_id}}}:reply:{request_id}",
        sent_at=1000.0 + tag,
        latency=0.005,
        replies=[request_id],
        ok=True,
        result=result,
        session_tag=tag,
    )


def fake_history(cfg: SimConfig, failing: Collection[tuple[int, int]] = ()) -> History:
    """What a correct run of `cfg` looks like; (round, node) in `failing` fail their backup."""
    jobs: list[JobReport] = []
    commands: list[CommandRecord] = []
    store: dict[str, dict[str, Any]] = {}
    for s in cfg.session_ids:
        runs = []
        for rnd in range(1, cfg.rounds + 1):
            entries: dict[str, dict[str, Any]] = {}
            for node in range(cfg.nodes):
                role = cfg.role(node, rnd)
                job_id = cfg.job_id(s, node)
                report = JobReport(s, rnd, node, job_id, role, 0.0, start_tag=rnd, tag_after=rnd)
                if role == "late":
                    report.start = "out-of-sync"
                    commands.append(command(node, "start", s, "out-of-sync", rnd))
                    entries[job_id] = {"status": "completed", "result": "aborted"}
                else:
                    report.start = "success"
                    commands.append(command(node, "start", s, "success", rnd))
                    if role == "eager":
                        report.repeat = "hold-off"
                        commands.append(command(node, "start", s, "hold-off", rnd))
                    report.backup = "fail" if (rnd, node) in failing else "success"
                    report.end, report.end_tag = "success", rnd
                    commands.append(command(node, "end", s, "success", rnd))
                    entries[job_id] = {"status": "completed", "result": report.backup}
                jobs.append(report)
            result = (
                "success" if all(e["result"] == "success" for e in entries.values()) else "fail"
            )
            runs.append(
                {
                    "session_tag": rnd,
                    "status": "completed",
                    "result": result,
                    "closed": "completed",
                    "jobs": entries,
                }
            )
        doc = {"session_id": s, "session_tag": cfg.rounds, "status": "completed"}
        doc["result"] = runs[-1]["result"]
        store[s] = {"doc": doc, "runs": runs}
    return History(jobs, commands, store)


CFG = SimConfig(nodes=4, sessions=2, rounds=3, hold_off=1, seed=1, run_id="fake")


def violated(history: History, leftover: dict[str, int] | None = None) -> set[str]:
    return {
        v.invariant
        for v in check_invariants(CFG, history.jobs, history.commands, history.store, leftover)
    }


def test_roles_cover_every_rule() -> None:
    assert CFG.slow_nodes == [2]
    assert (CFG.late_node, CFG.late_round) == (3, 2)
    assert [CFG.role(n, 2) for n in range(4)] == ["eager", "on-time", "slow", "late"]
    assert CFG.role(3, 1) == CFG.role(3, 3) == "on-time"
    big = SimConfig(nodes=8, rounds=5)
    assert (big.slow_nodes, big.late_node, big.late_round) == ([5, 6], 7, 3)
    assert SimConfig(nodes=2).slow_nodes == []
    assert len(set(SimConfig().session_ids) & set(SimConfig().session_ids)) == 0


@pytest.mark.parametrize(
    "bad",
    [{"nodes": 1}, {"sessions": 0}, {"rounds": 0}, {"fail_share": 1.5}, {"hold_off": 0}],
)
def test_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**bad)


def test_paths_spread_nodes_over_the_queue_and_the_shims() -> None:
    a, b = "http://10.0.0.1:9090", "http://10.0.0.2:9090"
    assert [SimConfig(nodes=3).path(n) for n in range(3)] == ["queue"] * 3
    http = SimConfig(nodes=4, via="http", http_urls=(a + "/", b))
    assert [http.path(n) for n in range(4)] == [a, b, a, b]
    mixed = SimConfig(nodes=6, via="mixed", http_urls=(a, b))
    assert [mixed.path(n) for n in range(6)] == ["queue", a, b, "queue", a, b]
    assert mixed.paths == ["queue", a, b]
    # Every role is played on some path other than the queue too.
    assert (mixed.path(mixed.late_node), mixed.path(mixed.slow_nodes[0])) == (b, a)
    one = SimConfig(nodes=4, via="mixed", http_urls=(a,))
    assert [one.path(n) for n in range(4)] == ["queue", a, "queue", a]


@pytest.mark.parametrize(
    "bad",
    [
        {"via": "carrier-pigeon"},
        {"via": "http"},
        {"via": "mixed"},
        {"via": "queue", "http_urls": ("http://h:1",)},
        {"via": "http", "http_urls": ("h:1",)},
    ],
)
def test_paths_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**bad)


def http_sender(handler: Any, timeout: float = 5.0) -> HttpCommandSender:
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return HttpCommandSender(client, "http://shim:9090/", "acme", 3, timeout, KeyBuilder("sw"))


def test_http_commands_are_repeated_with_the_same_key_after_a_cut_or_a_503() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(seen) == 2:
            body = {"title": "Service unavailable", "description": "retry"}
            return httpx.Response(503, json=body, headers={"Retry-After": "0"})
        return httpx.Response(202, json={"result": "success", "session_tag": 4})

    send = http_sender(handler)
    reply = send("start", "s1", job_id="s1-n3", current_tag=3)
    assert reply is not None and reply.ok
    assert (reply.result, reply.session_tag) == ("success", 4)
    assert [r.url.path for r in seen] == ["/v2/acme/sessions/s1/action"] * 3
    assert {r.headers["idempotency-key"] for r in seen} == {send.records[0].request_id}
    assert all(
        json.loads(r.content) == {"start": {"job_id": "s1-n3", "current_tag": 3}} for r in seen
    )
    record = send.records[0]
    assert (record.via, record.attempts, record.ok, record.error) == (
        "http://shim:9090",
        3,
        True,
        None,
    )
    assert record.replies == [record.request_id]
    assert record.reply_key == f"sw:{{acme:s1}}:reply:{record.request_id}"


def test_http_error_statuses_are_error_replies_and_silence_is_no_reply() -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"title": "Not found", "description": "no session s1"})

    send = http_sender(not_found)
    reply = send("end", "s1", job_id="j", current_tag=1, result="success")
    assert reply is not None and not reply.ok
    assert send.records[0].error == "http_404: Not found: no session s1"
    assert send.records[0].attempts == 1

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    send = http_sender(down, timeout=0.3)
    assert send("start", "s1", job_id="j", current_tag=0) is None
    record = send.records[0]
    assert record.replies == [] and record.latency is None and record.attempts >= 2
    with pytest.raises(ValueError):
        send("add_job", "s1", job_id="j")


def test_a_correct_history_passes() -> None:
    history = fake_history(CFG, failing={(1, 1)})
    assert check_invariants(CFG, history.jobs, history.commands, history.store, {}) == []


def test_a_second_bump_in_a_round_is_caught() -> None:
    history = fake_history(CFG)
    s = CFG.session_ids[0]
    extra = copy.deepcopy(history.store[s]["runs"][-1])
    extra["session_tag"] = CFG.rounds + 1
    history.store[s]["runs"].append(extra)
    history.store[s]["doc"]["session_tag"] = CFG.rounds + 1
    assert violated(history) == {"one-bump-per-round"}


def test_a_reply_naming_another_tag_is_caught() -> None:
    history = fake_history(CFG)
    history.jobs[1].start_tag = 2  # round 1, node 1 was told tag 2
    assert violated(history) == {"one-bump-per-round"}


def test_a_result_recorded_in_the_wrong_run_is_caught() -> None:
    history = fake_history(CFG, failing={(1, 1)})
    s = CFG.session_ids[0]
    job = CFG.job_id(s, 1)
    runs = history.store[s]["runs"]
    # The fail of round 1 landed in run 3 (freezer-api's bug); run 1 shows success.
    runs[0]["jobs"][job]["result"], runs[2]["jobs"][job]["result"] = "success", "fail"
    runs[0]["result"], runs[2]["result"] = "success", "fail"
    history.store[s]["doc"]["result"] = "fail"
    assert "job-result-in-right-run" in violated(history)


def test_a_job_missing_from_a_run_is_caught() -> None:
    history = fake_history(CFG)
    s = CFG.session_ids[1]
    del history.store[s]["runs"][0]["jobs"][CFG.job_id(s, 2)]
    assert violated(history) == {"job-result-in-right-run"}


def test_a_run_reported_successful_with_a_failed_job_is_caught() -> None:
    history = fake_history(CFG, failing={(3, 0)})
    s = CFG.session_ids[0]
    history.store[s]["runs"][2]["result"] = "success"
    history.store[s]["doc"]["result"] = "success"
    assert violated(history) == {"run-result"}


def test_a_run_closed_by_a_newer_run_is_caught() -> None:
    history = fake_history(CFG)
    history.store[CFG.session_ids[0]]["runs"][0]["closed"] = "superseded"
    assert violated(history) == {"run-result"}


def test_store_and_nodes_disagreeing_on_a_job_is_caught() -> None:
    history = fake_history(CFG)
    s = CFG.session_ids[0]
    history.store[s]["runs"][0]["jobs"][CFG.job_id(s, 1)]["result"] = "fail"
    history.store[s]["runs"][0]["result"] = "fail"
    assert violated(history) >= {"job-result-in-right-run", "run-result"}


@pytest.mark.parametrize("damage", ["no-reply", "two-replies", "foreign-reply", "error"])
def test_a_lost_or_doubled_reply_is_caught(damage: str) -> None:
    history = fake_history(CFG)
    record = history.commands[5]
    if damage == "no-reply":
        record.replies, record.latency = [], None
    elif damage == "two-replies":
        record.replies.append(record.request_id)
    elif damage == "foreign-reply":
        record.replies = [uuid.uuid4().hex]
    else:
        record.ok, record.error = False, "not_found: session gone"
    assert violated(history) == {"nothing-lost"}


def test_a_reply_left_behind_is_caught() -> None:
    history = fake_history(CFG)
    key = history.commands[0].reply_key
    assert violated(history, {key: 1}) == {"nothing-lost"}


def test_a_missing_node_report_or_session_is_caught() -> None:
    history = fake_history(CFG)
    del history.jobs[0]
    assert "nothing-lost" in violated(history)
    history = fake_history(CFG)
    history.store[CFG.session_ids[1]]["runs"] = None
    assert violated(history) == {"nothing-lost"}


def test_a_scenario_that_did_not_happen_is_caught() -> None:
    history = fake_history(CFG)
    late = next(j for j in history.jobs if j.role == "late")
    late.start = "success"  # joined although it was far too late
    late.backup, late.end, late.end_tag = "success", "success", late.round
    history.store[late.session_id]["runs"][late.round - 1]["jobs"][late.job_id]["result"] = (
        "success"
    )
    assert "scenario" in violated(history)
    history = fake_history(CFG)
    eager = next(j for j in history.jobs if j.role == "eager")
    eager.repeat = "success"
    assert violated(history) == {"scenario"}


def test_report_names_the_failed_invariants() -> None:
    history = fake_history(CFG)
    history.commands[0].replies = []
    violations = check_invariants(CFG, history.jobs, history.commands, history.store, {})
    result = SimResult(
        CFG,
        history.jobs,
        history.commands,
        history.store,
        {},
        violations,
        round_rows(CFG, history.jobs, history.store),
        throughput(history.commands, 1.0),
    )
    text = format_report(result)
    assert "invariants FAILED: nothing-lost" in text
    assert "no reply within the timeout" in text
    rows = [line.split() for line in text.splitlines()[1:7]]
    assert rows[1][:6] == [CFG.session_ids[0], "2", "2", "completed", "fail", "4"]
    # started, joined, hold-off, out-of-sync, ended, failed in the late round
    assert rows[1][6:] == ["3", "1", "1", "1", "3", "0"]


def test_simulate_command_exits_1_naming_the_invariant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    history = fake_history(CFG)
    history.store[CFG.session_ids[0]]["runs"][0]["closed"] = "deadline"

    def fake_run(cfg: SimConfig, settings: Settings, **_: Any) -> SimResult:
        violations = check_invariants(CFG, history.jobs, history.commands, history.store, {})
        rows = round_rows(CFG, history.jobs, history.store)
        return SimResult(
            CFG,
            history.jobs,
            history.commands,
            history.store,
            {},
            violations,
            rows,
            throughput(history.commands, 1.0),
        )

    monkeypatch.setattr(simulate, "run_simulation", fake_run)
    assert cli.main(["simulate", "--seed", "3"]) == 1
    out, err = capsys.readouterr()
    assert "invariants FAILED: run-result" in out
    assert "simulate: invariants failed: run-result" in err


def test_path_rows_count_round_commands_per_path() -> None:
    cfg = SimConfig(nodes=3, sessions=1, rounds=1, via="mixed", http_urls=("http://a:1",))
    s = cfg.session_ids[0]
    records = [
        command(0, "add_job", s, "success", 0),
        command(0, "start", s, "success", 1),
        replace(command(1, "start", s, "success", 1), via="http://a:1", attempts=2),
        replace(command(1, "end", s, "success", 1), via="http://a:1", latency=None, replies=[]),
    ]
    rows = {r.path: r for r in path_rows(cfg, records)}
    assert list(rows) == ["queue", "http://a:1"]
    assert (rows["queue"].nodes, rows["queue"].commands) == ([0, 2], 1)
    http = rows["http://a:1"]
    assert (http.nodes, http.commands, http.answered, http.retried) == ([1], 2, 1, 1)


def test_percentile_and_throughput() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    records = [
        replace(command(0, "start", "s", "success", 1), sent_at=t, latency=0.5)
        for t in (10.0, 10.25, 20.0)
    ]
    figures = throughput(records, 20.0)
    assert figures["busy_seconds"] == pytest.approx(1.25)  # [10, 10.75] and [20, 20.5]
    assert figures["per_second"] == pytest.approx(3 / 20)
    assert figures["p50_ms"] == pytest.approx(500.0)


# Real runs ----------------------------------------------------------------------------


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Two workers (`session-worker up --no-web` on an external Redis) on a queue of our own."""
    queue = f"sim-{uuid.uuid4().hex[:8]}"
    env = clean_env(SESSION_WORKER_REDIS_URL=redis_url, SESSION_WORKER_QUEUE=queue)
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "up", "--no-web", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "ready: 2 worker(s)" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.05)
        yield Settings(redis_url=redis_url, queue=queue, reply_timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    assert not (tmp_path / "var" / "redis-url").exists()  # an external Redis: no URL file


@pytest.mark.integration
def test_a_small_simulation_passes_its_invariants(workers: Settings) -> None:
    cfg = SimConfig(nodes=4, sessions=2, rounds=3, hold_off=2, fail_share=0.3, seed=11, timeout=30)
    result = run_simulation(cfg, workers)
    assert result.violations == []
    assert result.ok
    assert [(r.round, r.tag, r.status) for r in result.rows[:3]] == [
        (1, 1, "completed"),
        (2, 2, "completed"),
        (3, 3, "completed"),
    ]
    # Every rule happened: joins inside the window, hold-off, out-of-sync in round 2.
    for row in result.rows:
        assert (row.joined, row.hold_off) == (1, 1)
        assert row.out_of_sync == (1 if row.round == cfg.late_round else 0)
        assert row.jobs == cfg.nodes
    # create x2, add_job x8, then per session and round: 4 starts, 1 repeat, and an end for
    # each start accepted (3 in the late round).
    assert len(result.commands) == 2 + 8 + 2 * (3 * 5 + 4 + 3 + 4)
    assert result.leftover_replies == {}
    assert "invariants: all hold" in format_report(result)


@pytest.mark.integration
def test_simulate_command_prints_json_and_exits_0(workers: Settings) -> None:
    env = clean_env(
        SESSION_WORKER_REDIS_URL=workers.redis_url or "", SESSION_WORKER_QUEUE=workers.queue
    )
    done = subprocess.run(
        [
            str(CONSOLE_SCRIPT),
            "simulate",
            "--nodes",
            "2",
            "--sessions",
            "1",
            "--rounds",
            "2",
            "--hold-off",
            "1",
            "--seed",
            "5",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["violations"] == []
    assert [r["tag"] for r in report["rounds"]] == [1, 2]
    assert "round 1/2:" in done.stderr
    assert "round 2/2:" in done.stderr


@pytest.mark.integration
def test_simulate_without_workers_fails_clearly(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSION_WORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSION_WORKER_QUEUE", f"nobody-{uuid.uuid4().hex[:8]}")
    assert cli.main(["simulate", "--timeout", "0.5"]) == 1
    _, err = capsys.readouterr()
    assert "no reply to create in 0.5 s: are workers running?" in err


@pytest.fixture
def scaled_out(redis_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """3 `session-worker worker` and 2 `session-worker web` processes, each on its own,
    sharing nothing but the Redis (and the queue's name); the environment for `simulate`
    and the two shims' URLs. The shims require a token of project "scale"."""
    token = uuid.uuid4().hex
    base = clean_env(
        SESSION_WORKER_REDIS_URL=redis_url, SESSION_WORKER_QUEUE=f"scale-{uuid.uuid4().hex[:8]}"
    )
    grants = json.dumps({token: {"project_id": "scale", "user_id": "sim"}})
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)
    children: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> None:
        home = tmp_path / name
        home.mkdir()
        with (home / "log").open("wb") as log:
            proc = subprocess.Popen(
                [str(CONSOLE_SCRIPT), *argv],
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        children.append((name, proc, home / "log"))

    try:
        for i in range(3):
            spawn(f"worker{i}", ["worker", "-n", f"scale{i}@%h"], base)
        for i, port in enumerate(ports):
            web = ["web", "--host", HOST, "--port", str(port), "--workers", "1"]
            spawn(f"web{i}", web, base | {"SESSION_WORKER_AUTH_TOKENS": grants})
        urls = [f"http://{HOST}:{port}" for port in ports]
        deadline = time.monotonic() + 30
        waiting = {name for name, _, _ in children}
        while waiting:
            for name, proc, log_path in children:
                log = log_path.read_text(errors="replace")
                assert proc.poll() is None, f"{name} exited:\n{log}"
                if name.startswith("worker") and " ready." in log:
                    waiting.discard(name)
                elif name.startswith("web"):
                    try:
                        url = urls[int(name[3:])]
                        if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                            waiting.discard(name)
                    except httpx.TransportError:
                        pass
            assert time.monotonic() < deadline, f"not ready: {sorted(waiting)}"
            time.sleep(0.1)
        yield base | {"SESSION_WORKER_TOKEN": token}, urls
    finally:
        for _, proc, _ in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            # Whatever is left in its group (a worker's pool process).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name, _, log_path in children:
            print(f"--- {name}\n{log_path.read_text(errors='replace')[-2000:]}")


@pytest.mark.integration
def test_simulate_through_two_shims_and_the_queue_with_three_workers(
    scaled_out: tuple[dict[str, str], list[str]], tmp_path: Path
) -> None:
    env, (url1, url2) = scaled_out
    argv = ["simulate", "--via", "mixed", "--http", url1, "--http", url2, "--project", "scale"]
    argv += ["--nodes", "6", "--sessions", "2", "--rounds", "3", "--hold-off", "1"]
    argv += ["--seed", "23", "--fail-share", "0.2", "--json"]
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    print(done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["violations"] == []
    assert report["config"]["via"] == "mixed"
    assert [r["tag"] for r in report["rounds"]] == [1, 2, 3] * 2
    paths = {p["path"]: p for p in report["paths"]}
    assert list(paths) == ["queue", url1, url2]
    assert [paths[p]["nodes"] for p in paths] == [[0, 3], [1, 4], [2, 5]]
    for path in paths.values():
        assert path["commands"] > 0
        assert path["answered"] == path["commands"]
    # The late node (5) goes through the second shim, the slow one (4) through the first.
    late = [r for r in report["rounds"] if r["round"] == 2]
    assert all(r["out_of_sync"] == 1 and r["joined"] == 1 for r in late)
    assert "start/end via the queue" in done.stderr
    assert f"start/end via {url2}" in done.stderr
    assert len(done.stdout) < 100_000
    assert env["SESSION_WORKER_TOKEN"] not in done.stdout + done.stderr
