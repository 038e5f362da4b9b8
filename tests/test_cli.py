"""The `session-worker` command against a real stack.

The stack is `session-worker up --no-web` run as a subprocess in a temporary directory with no
SESSION_WORKER_REDIS_URL: it starts the embedded valkey-server and real worker processes, so
these tests are also the proof that the embedded path works. Node commands then run through
`cli.main()` in this process (from that directory, so the URL comes from `var/redis-url`)
or as the installed console script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from session_worker import cli
from session_worker.keys import events_channel
from session_worker.models import CreateCommand, JobEntry, SessionFields, StartCommand
from session_worker.redis_server import ServerProcess, free_port
from session_worker.settings import Settings
from session_worker.stack import mask_url
from session_worker.store import Store
from session_worker.sweep import run_sweep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("session-worker")
START_TIMEOUT = 60.0


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


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Up:
    """A running `session-worker up` subprocess."""

    proc: subprocess.Popen[str]
    cwd: Path
    env: dict[str, str]
    log_path: Path
    banner: str

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def redis_url(self) -> str:
        return (self.cwd / "var" / "redis-url").read_text().strip()

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log)
            if match:
                return match.group(0)
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log of up:\n{self.log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def start_up(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Up:
    """`session-worker up ARGS` in `cwd`, once its banner is printed and its workers ready."""
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / "up.log"
    env = clean_env() if env is None else env
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "up", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    assert proc.stdout is not None
    banner = []
    for line in proc.stdout:
        banner.append(line)
        if line.startswith("Ctrl-C stops everything"):
            break
    up = Up(proc, cwd, env, log_path, "".join(banner))
    up.wait_for_log(r"ready: \d+ worker\(s\)")
    return up


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = start_up(tmp_path_factory.mktemp("stack"), "--no-web")
    yield up
    up.stop()


@pytest.fixture
def in_stack(stack: Up, monkeypatch: pytest.MonkeyPatch) -> Up:
    """Run cli.main() here as a second terminal in the stack's directory would."""
    for name in list(os.environ):
        if name.startswith("SESSION_WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SESSION_WORKER_REPLY_TIMEOUT", "30")
    monkeypatch.chdir(stack.cwd)
    return stack


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# The stack ------------------------------------------------------------------------------


def test_up_prints_the_redis_url_and_writes_it_for_other_terminals(stack: Up) -> None:
    url = stack.redis_url
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url)
    assert f"redis    {url}  (embedded valkey-server)" in stack.banner
    assert f"export SESSION_WORKER_REDIS_URL={url}" in stack.banner
    assert "web      off" in stack.banner
    with redis.Redis.from_url(url) as client:
        assert client.ping()
    assert (stack.cwd / "var" / "valkey").is_dir()


def console(stack: Up, *args: str) -> subprocess.CompletedProcess[str]:
    """`session-worker <args>` run as a new process in the stack's directory."""
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=stack.cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_script_finds_the_embedded_server_through_the_url_file(stack: Up) -> None:
    session = unique("script")
    done = console(stack, "create", "--session-id", session, "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is True
    assert reply["session_id"] == session


def test_a_reader_that_stops_early_is_not_reported_as_a_redis_failure(stack: Up) -> None:
    session = unique("pipe")
    jobs = [arg for n in range(3000) for arg in ("--job", f"{session}-job-{n:04d}")]
    created = console(stack, "create", "--session-id", session, *jobs, "--json")
    assert created.returncode == 0, created.stderr
    # `show ... | head -c 1`: the output (well over a pipe's buffer) meets a closed pipe.
    show = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "show", session, "--json"],
        cwd=stack.cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert show.stdout is not None and show.stderr is not None
    assert show.stdout.read(1) == b"{"
    show.stdout.close()
    assert show.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
    err = show.stderr.read()
    show.stderr.close()
    assert b"cannot reach Redis" not in err


# Node commands --------------------------------------------------------------------------


def test_a_session_through_its_life(in_stack: Up, capsys: pytest.CaptureFixture[str]) -> None:
    s = unique("life")
    code, out, _ = run(
        capsys,
        "create",
        "--session-id",
        s,
        "--hold-off",
        "5",
        "--description",
        "db",
        "--job",
        "j1",
        "j2",
    )
    assert code == 0
    assert f"created session {s}" in out

    code, out, _ = run(capsys, "add-job", s, "j3", "--client-id", "node3")
    assert (code, out.splitlines()[0]) == (0, f"job j3 added to session {s}")

    code, out, _ = run(capsys, "show", s)
    assert code == 0
    assert re.search(r"^hold_off\s+5 s$", out, re.M)
    assert re.search(r"^description\s+db$", out, re.M)
    assert re.search(r"^j3\s+node3\s+scheduled", out, re.M)

    code, out, _ = run(capsys, "start", s, "j1", "--tag", "0")
    assert (code, out.splitlines()[0]) == (0, f"start {s} j1: success (session_tag 1)")
    # Inside the hold-off window: j2 joins run 1, j1 asking again is held off.
    code, out, _ = run(capsys, "start", s, "j2", "--tag", "0")
    assert out.splitlines()[0] == f"start {s} j2: success (session_tag 1)"
    code, out, _ = run(capsys, "start", s, "j1", "--tag", "1")
    assert (code, out.splitlines()[0]) == (0, f"start {s} j1: hold-off (session_tag 1)")
    code, out, _ = run(capsys, "start", s, "j3", "--tag", "0")
    assert code == 0

    for job, result in (("j1", "success"), ("j2", "fail"), ("j3", "success")):
        code, out, _ = run(capsys, "end", s, job, "--result", result, "--tag", "1")
        assert (code, out.splitlines()[0]) == (
            0,
            f"end {s} {job} ({result}): success (session_tag 1)",
        )

    code, out, _ = run(capsys, "runs", s)
    assert code == 0
    row = out.splitlines()[1]
    assert re.match(r"1\s+completed\s+fail\s+completed\s", row)
    assert "j1=success j2=fail j3=success" in row

    code, out, _ = run(capsys, "runs", s, "--json")
    runs = json.loads(out)["runs"]
    assert [(r["session_tag"], r["status"], r["result"]) for r in runs] == [
        (1, "completed", "fail")
    ]
    assert runs[0]["jobs"]["j2"]["result"] == "fail"

    code, out, _ = run(capsys, "show", s, "--json")
    doc = json.loads(out)
    assert (doc["session_tag"], doc["status"], doc["result"]) == (1, "completed", "fail")

    code, out, _ = run(capsys, "list", "--json", "--limit", "100", "--match", f"session_id={s}")
    assert [d["session_id"] for d in json.loads(out)["sessions"]] == [s]
    code, out, _ = run(capsys, "list", "--limit", "100")
    assert code == 0
    assert re.search(rf"^{s}\s+1\s+completed\s+fail\s+3\s+5\s+db$", out, re.M)

    code, out, _ = run(capsys, "remove-job", s, "j3")
    assert (code, out.splitlines()[0]) == (0, f"job j3 removed from session {s}")

    code, out, _ = run(capsys, "delete", s)
    assert (code, out.splitlines()[0]) == (0, f"deleted session {s}")
    code, _, err = run(capsys, "show", s)
    assert code == cli.EXIT_ERROR_REPLY
    assert f"not_found: session {s} does not exist" in err


def test_json_reply_of_a_command(in_stack: Up, capsys: pytest.CaptureFixture[str]) -> None:
    s = unique("json")
    assert run(capsys, "create", "--session-id", s, "--job", "a")[0] == 0
    code, out, _ = run(capsys, "start", s, "a", "--tag", "0", "--json")
    reply = json.loads(out)
    assert code == 0
    assert reply["ok"] is True
    assert (reply["result"], reply["session_tag"], reply["session_id"]) == ("success", 1, s)
    assert re.fullmatch(r"[0-9a-f]{32}", reply["request_id"])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("start", "{s}", "nope", "--tag", "0"), "bad_request", "job nope is not in session"),
        (("start", "{s}", "a", "--tag", "7"), "bad_request", "tag too high"),
        (("end", "{s}", "nope", "--result", "fail"), "bad_request", "not in session"),
        (("start", "missing-{s}", "a", "--tag", "0"), "not_found", ""),
        (("add-job", "missing-{s}", "a"), "not_found", ""),
        (("runs", "missing-{s}"), "not_found", "does not exist"),
        (("runs", "{s}", "--tag", "9"), "not_found", "no run 9"),
        (("create", "--session-id", "{s}"), "conflict", ""),
    ],
)
def test_an_error_reply_exits_2(
    in_stack: Up,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: str,
    message: str,
) -> None:
    s = unique("err")
    assert run(capsys, "create", "--session-id", s, "--job", "a")[0] == 0
    status, _, err = run(capsys, *(a.format(s=s) for a in args))
    assert status == cli.EXIT_ERROR_REPLY
    assert f"session-worker: {code}: " in err
    assert message in err


def test_an_error_reply_with_json_prints_the_reply(
    in_stack: Up, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "start", unique("missing"), "a", "--tag", "0", "--json")
    assert code == cli.EXIT_ERROR_REPLY
    reply = json.loads(out)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "not_found"


def test_the_sweep_of_up_closes_an_expired_run_without_traffic(in_stack: Up) -> None:
    s = unique("deadline")
    client = redis.Redis.from_url(in_stack.redis_url)
    events = client.pubsub()  # type: ignore[no-untyped-call]
    events.subscribe(events_channel("default", s))
    assert cli.main(["create", "--session-id", s, "--run-timeout", "1", "--job", "a", "b"]) == 0
    assert cli.main(["start", s, "a", "--tag", "0"]) == 0
    deadline = time.monotonic() + 15
    closed = None
    while closed is None and time.monotonic() < deadline:
        message = events.get_message(timeout=1.0)
        if message and message["type"] == "message":
            event = json.loads(message["data"])
            if event["event"] == "run_completed":
                closed = event
    events.close()
    client.close()
    assert closed is not None, "no run_completed event: the sweep did not close the run"
    assert (closed["result"], closed["closed"]) == ("fail", "deadline")


# Without workers, without Redis -----------------------------------------------------------


def test_no_worker_means_a_timeout_with_a_clear_message(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSION_WORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSION_WORKER_QUEUE", unique("nobody-listens"))
    started = time.monotonic()
    code, out, err = run(capsys, "start", "s", "j", "--tag", "0", "--timeout", "0.5")
    assert code == cli.EXIT_NO_REPLY
    assert time.monotonic() - started < 10
    assert out == ""
    assert "no reply in 0.5 s: are workers running? `session-worker up`" in err


def test_unreachable_redis_exits_1_naming_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("SESSION_WORKER_REDIS_URL", url)
    monkeypatch.setenv("SESSION_WORKER_REDIS_CONNECT_TIMEOUT", "0.5")
    code, _, err = run(capsys, "show", "s")
    assert code == cli.EXIT_NO_REPLY
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("command", [("show", "s"), ("start", "s", "j", "--tag", "0")])
def test_a_stalled_redis_fails_once_its_timeout_has_passed(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    silent_port: int,
    command: tuple[str, ...],
) -> None:
    """A Redis that takes the connection and never answers costs one socket timeout, not
    one per retry; a command that cannot be queued says so in one line, no traceback."""
    monkeypatch.setenv("SESSION_WORKER_REDIS_URL", f"redis://127.0.0.1:{silent_port}/0")
    monkeypatch.setenv("SESSION_WORKER_REDIS_SOCKET_TIMEOUT", "0.5")
    started = time.monotonic()
    code, out, err = run(capsys, *command)
    assert time.monotonic() - started < 5
    assert code == cli.EXIT_NO_REPLY
    assert out == ""
    assert err.startswith("session-worker: cannot reach Redis at redis://127.0.0.1:")
    assert "Traceback" not in err


def test_redis_url_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSION_WORKER_REDIS_URL", raising=False)
    monkeypatch.setenv("SESSION_WORKER_DATA_DIR", str(tmp_path))
    url, source = cli.resolve_redis_url(Settings())
    assert url == "redis://127.0.0.1:6379/0" and source.startswith("the default: no ")
    (tmp_path / "redis-url").write_text("redis://127.0.0.1:7001/0\n")
    assert cli.resolve_redis_url(Settings()) == (
        "redis://127.0.0.1:7001/0",
        str(tmp_path / "redis-url"),
    )
    monkeypatch.setenv("SESSION_WORKER_REDIS_URL", "redis://10.0.0.1:6379/2")
    assert cli.resolve_redis_url(Settings()) == (
        "redis://10.0.0.1:6379/2",
        "SESSION_WORKER_REDIS_URL",
    )


def test_mask_url_hides_the_password() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("rediss://u:pw@h:1/0") == "rediss://u:***@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"


def test_worker_command_line_carries_the_documented_flags() -> None:
    argv = cli.worker_argv(Settings(queue="q1"), ["-c", "2"])
    assert argv[1:6] == ["-m", "celery", "-A", "session_worker.celery_app", "worker"]
    for flag in ("--without-mingle", "--without-gossip", "--without-heartbeat"):
        assert flag in argv
    assert argv[argv.index("-Q") + 1] == "q1"
    assert argv[-2:] == ["-c", "2"]  # given options come last, so they win


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["end", "s", "j", "--result", "maybe"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["show", "s", "--bogus"])
    assert exc.value.code == 2
    capsys.readouterr()


# Stopping and restarting up ---------------------------------------------------------------


def test_up_stops_cleanly_on_sigterm_and_a_restart_keeps_the_sessions(tmp_path: Path) -> None:
    port = free_port()
    up = start_up(tmp_path, "--port", str(port), "--workers", "2")
    try:
        assert f"web      http://127.0.0.1:{port}" in up.banner
        up.wait_for_log(r"Uvicorn running on|Application startup complete")
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 200
        url = up.redis_url
        with redis.Redis.from_url(url) as client:
            server_pid = int(client.info("server")["process_id"])
        session = unique("kept")
        created = subprocess.run(
            [str(CONSOLE_SCRIPT), "create", "--session-id", session, "--job", "j"],
            cwd=tmp_path,
            env=up.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        family = children_of(up.proc.pid)
        # The server, 2 workers, the sweep, the shim (and its processes): children of up.
        assert len(family) >= 5
    finally:
        code = up.stop()
    assert code == 0
    assert re.search(r"^up +\| \S+ stopped$", up.log, re.M)
    assert "Warm shutdown" in up.log
    assert [pid for pid in family if alive(pid)] == []
    assert not alive(server_pid)
    assert not (tmp_path / "var" / "redis-url").exists()

    again = start_up(tmp_path, "--no-web", "--workers", "1")
    try:
        shown = subprocess.run(
            [str(CONSOLE_SCRIPT), "show", session, "--json"],
            cwd=tmp_path,
            env=again.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert list(json.loads(shown.stdout)["jobs"]) == ["j"]
    finally:
        assert again.stop() == 0


def test_a_child_that_dies_stops_the_whole_stack(tmp_path: Path) -> None:
    up = start_up(tmp_path, "--no-web", "--workers", "2")
    try:
        worker_pid = int(up.wait_for_log(r"started worker-2 \(pid \d+\)").split()[-1][:-1])
        family = children_of(up.proc.pid)
        os.kill(worker_pid, signal.SIGKILL)
        code = up.proc.wait(30)
    finally:
        up.stop()
    assert code == 1
    assert f"worker-2 (pid {worker_pid}) exited with code -9" in up.log
    assert "stopping (worker-2 exited)" in up.log
    assert [pid for pid in family if alive(pid)] == []


def test_a_second_up_in_the_same_directory_is_refused(stack: Up) -> None:
    second = subprocess.run(
        [str(CONSOLE_SCRIPT), "up", "--no-web"],
        cwd=stack.cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"another `session-worker up` (pid {stack.proc.pid}) runs its server in" in (
        second.stderr
    )
    assert (stack.cwd / "var" / "redis-url").read_text().strip() == stack.redis_url


# The sweep ------------------------------------------------------------------------------


def test_sweep_survives_a_redis_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = ServerProcess("valkey", tmp_path / "valkey", appendonly=True)
    server.start()
    settings = Settings(redis_url=server.url, redis_socket_timeout=1, redis_connect_timeout=0.5)
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="session_worker.sweep")
    thread = threading.Thread(
        target=run_sweep, args=(settings,), kwargs={"interval": 0.1, "stop": stop}
    )
    thread.start()
    try:
        time.sleep(0.3)
        server.stop()
        time.sleep(1.0)
        assert thread.is_alive()
        server.start()
        with redis.Redis.from_url(server.url) as client:
            store = Store(client, settings)
            created = store.create(
                CreateCommand(
                    request_id="r1",
                    project_id="p",
                    document=SessionFields(session_id="s", run_timeout=1, jobs={"a": JobEntry()}),
                )
            )
            assert created.ok
            started = store.start(
                StartCommand(
                    request_id="r2", project_id="p", session_id="s", job_id="a", current_tag=0
                )
            )
            assert started.deadline is not None
            deadlines = store.keys.deadlines()
            assert client.zcard(deadlines) == 1
            give_up = time.monotonic() + 10  # the deadline (<= 2 s) plus the retry back-off
            while client.zcard(deadlines) and time.monotonic() < give_up:
                time.sleep(0.1)
            assert client.zcard(deadlines) == 0, "the sweep did not come back"
            runs = store.runs("p", "s")
            assert runs is not None
            assert (runs[0]["status"], runs[0]["result"], runs[0]["closed"]) == (
                "completed",
                "fail",
                "deadline",
            )
    finally:
        stop.set()
        thread.join(10)
        server.stop()
    assert not thread.is_alive()
    messages = [r.getMessage() for r in caplog.records]
    assert any("Redis unavailable" in m for m in messages)
    assert any("Redis reachable again" in m for m in messages)
