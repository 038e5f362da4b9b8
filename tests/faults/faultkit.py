"""What the fault-injection suite breaks things with, and how it counts what survived.

- :class:`Worker`: one ``session-worker worker`` command line (``cli.worker_argv``, the one
  ``up`` runs) as a process group of its own, to SIGTERM or SIGKILL.
- :class:`ShimProcess`: the HTTP shim under a real uvicorn (``session-worker web``).
- :class:`TcpProxy`: a loopback proxy in front of Redis that cuts a connection right after
  forwarding a chosen request, before its answer comes back.
- :class:`Ledger`: every request id a test sent, what its sender got back, and the check that
  each one took effect exactly once (by the session's ``_version``, the request records and the
  versions the replies carry).
- :func:`figures`: one summary line per scenario, printed at the end of the run.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from session_worker.cli import worker_argv
from session_worker.client import SessionClient
from session_worker.errors import ReplyTimeout
from session_worker.models import CreateCommand, SessionFields
from session_worker.redis_server import HOST, free_port
from session_worker.settings import Settings
from session_worker.store import Store

PROJECT = "faults"
READY_TIMEOUT = 30.0

T = TypeVar("T")

# The summary lines of this run, printed by conftest.pytest_terminal_summary.
FIGURES: list[str] = []


def figures(scenario: str, **values: object) -> str:
    """Record (and print, for ``-s``) one summary line: ``scenario: key=value ...``."""
    parts = []
    for key, value in values.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    line = f"{scenario}: {' '.join(parts)}"
    FIGURES.append(line)
    print(f"\n[faults] {line}")
    return line


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker or shim process: this test's settings, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WORKER_")}
    env |= {
        "SESSION_WORKER_REDIS_URL": settings.redis_url or "",
        "SESSION_WORKER_QUEUE": settings.queue,
        "SESSION_WORKER_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
        "SESSION_WORKER_REDIS_SOCKET_TIMEOUT": str(settings.redis_socket_timeout),
        "SESSION_WORKER_REDIS_CONNECT_TIMEOUT": str(settings.redis_connect_timeout),
        "PYTHONUNBUFFERED": "1",
    }
    return env | (extra or {})


# Worker processes -------------------------------------------------------------------------


class Worker:
    """One Celery worker process (and its pool) in a process group of its own."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> list[str]:
        """Wait until `pattern` (a regex) matched `count` times in the log; the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m.group(0) for m in re.finditer(pattern, self.log())]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log of {self.name}:\n{self.log()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        self.wait_for_log(r"\S+@\S+ ready\.", timeout=timeout)

    def terminate(self, timeout: float = 20.0) -> float:
        """SIGTERM (Celery's warm shutdown: finish the task at hand); seconds it took."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.kill()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout:g} s") from exc
        self._signal_group(signal.SIGKILL)  # a pool process left behind, if any
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool) at once: no goodbye, no ack."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def start_worker(
    settings: Settings,
    log_path: Path,
    *,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
) -> Worker:
    """A worker on `settings`' Redis and queue, started like ``session-worker worker``."""
    name = f"{log_path.stem}-{uuid.uuid4().hex[:6]}"
    argv = worker_argv(settings, ["-c", str(concurrency), "-n", f"{name}@%h"])
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(settings, env),
            start_new_session=True,
        )
    return Worker(proc, log_path, name)


_DELIVERY_LINE = re.compile(r"kind=\w+ .*request=(\S+) latency_ms=")


def delivery_counts(workers: list[Worker]) -> collections.Counter[str]:
    """How many times the workers ran each command, by request id (their one log line each).

    The logs are read once, so counting thousands of request ids stays linear.
    """
    counts: collections.Counter[str] = collections.Counter()
    for worker in workers:
        counts.update(_DELIVERY_LINE.findall(worker.log()))
    return counts


def deliveries(workers: list[Worker], request_id: str) -> int:
    """How many times the workers ran the command `request_id`."""
    return delivery_counts(workers)[request_id]


# The HTTP shim ----------------------------------------------------------------------------


class ShimProcess:
    """``session-worker web`` (uvicorn, one process) on a free loopback port."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        argv = [
            sys.executable,
            "-m",
            "session_worker.cli",
            "web",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(settings),
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the shim exited ({self.proc.returncode}):\n{self.log()}")
            with socket.socket() as sock:
                return sock.connect_ex((HOST, self.port)) == 0

        wait_until(listening, timeout, "the shim listens")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# A proxy that cuts connections ------------------------------------------------------------


class _Link:
    """One proxied connection: the client's socket and ours to Redis."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.swallow = False  # drop the connection at the next answer instead of relaying it

    def close(self) -> None:
        for sock in (self.downstream, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """A loopback TCP proxy in front of a Redis port.

    ``cut_after(*markers)`` arms it once: the next request whose bytes contain every marker is
    forwarded to Redis, and the connection it came on is closed (both sides) when Redis's
    answer arrives, before a byte of that answer reaches the client. So the command ran, and
    its sender saw the connection die.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._markers: tuple[bytes, ...] = ()
        self.cut = threading.Event()
        self.cuts = 0
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def cut_after(self, *markers: bytes) -> threading.Event:
        with self._lock:
            self._markers = markers
            self.cut.clear()
        return self.cut

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            link = _Link(downstream, upstream)
            with self._lock:
                if self._closed:
                    link.close()
                    return
                self._links.append(link)
            self._spawn(self._requests, link)
            self._spawn(self._answers, link)

    def _requests(self, link: _Link) -> None:
        while True:
            try:
                data = link.downstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                link.close()
                return
            with self._lock:
                if self._markers and all(m in data for m in self._markers):
                    self._markers = ()
                    link.swallow = True
            try:
                link.upstream.sendall(data)
            except OSError:
                link.close()
                return

    def _answers(self, link: _Link) -> None:
        while True:
            try:
                data = link.upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                link.close()
                return
            if link.swallow:
                link.close()
                with self._lock:
                    self.cuts += 1
                self.cut.set()
                return
            try:
                link.downstream.sendall(data)
            except OSError:
                link.close()
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
        self._listener.close()
        for link in links:
            link.close()
        for thread in self._threads:
            thread.join(5)


# Counting effects by request id -----------------------------------------------------------


def job_id(session_id: str, n: int = 0) -> str:
    return f"{session_id}-j{n}"


def make_sessions(store: Store, count: int, prefix: str, jobs: int = 1) -> dict[str, int]:
    """Create `count` sessions (hold-off one hour) with jobs ``<session>-j<n>`` (a job id
    names one job of the project, in one session); their ids and `_version` after creation."""
    versions: dict[str, int] = {}
    for i in range(count):
        session_id = f"{prefix}{i}"
        doc = SessionFields.model_validate(
            {
                "session_id": session_id,
                "hold_off": 3600,
                "jobs": {job_id(session_id, n): {} for n in range(jobs)},
            }
        )
        reply = store.create(
            CreateCommand(request_id=uuid.uuid4().hex, project_id=PROJECT, document=doc)
        )
        assert reply.ok and reply.version is not None, reply
        versions[session_id] = reply.version
    return versions


@dataclass
class Outcome:
    """What the sender of one request id got: the version its reply carries, or nothing."""

    session_id: str
    version: int | None = None
    attempts: int = 0
    error: str = ""
    seconds: float = 0.0


@dataclass
class Tally:
    sent: int
    answered: int
    applied: int
    duplicated: int
    lost: int
    resent: int
    slowest: float

    def line(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "applied": self.applied,
            "duplicated": self.duplicated,
            "lost": self.lost,
            "answered": self.answered,
            "resent": self.resent,
            "slowest_reply_s": self.slowest,
        }


@dataclass
class Ledger:
    """Every request id sent to the sessions of `base` (session id -> `_version` before).

    Each request is a command that bumps the session's `_version` by exactly one when it is
    applied (an ``update``), so after the storm, per session: applied = final version - base;
    every request id has its record; the versions the replies carry are exactly
    base+1 .. final, each once.
    """

    base: dict[str, int]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, session_id: str) -> str:
        request_id = uuid.uuid4().hex
        with self._lock:
            self.outcomes[request_id] = Outcome(session_id)
        return request_id

    def answered(self, request_id: str, version: int | None, attempts: int, seconds: float) -> None:
        with self._lock:
            outcome = self.outcomes[request_id]
            outcome.version, outcome.attempts, outcome.seconds = version, attempts, seconds

    def failed(self, request_id: str, error: str, attempts: int) -> None:
        with self._lock:
            outcome = self.outcomes[request_id]
            outcome.error, outcome.attempts = error, attempts

    def tally(self, store: Store) -> Tally:
        applied = duplicated = lost = 0
        by_session: dict[str, list[str]] = {}
        for request_id, outcome in self.outcomes.items():
            by_session.setdefault(outcome.session_id, []).append(request_id)
        problems: list[str] = []
        for session_id, base in self.base.items():
            ids = by_session.get(session_id, [])
            doc = store.get(PROJECT, session_id)
            assert doc is not None, session_id
            final = int(doc["_version"])
            keys = [store.keys.request(PROJECT, session_id, i) for i in ids]
            records = store.client.mget(keys) if ids else []
            recorded = sum(1 for r in records if r is not None)
            applied += final - base
            lost += len(ids) - recorded
            duplicated += max(0, final - base - recorded)
            versions = sorted(v for i in ids if (v := self.outcomes[i].version) is not None)
            if len(set(versions)) != len(versions) or any(v <= base or v > final for v in versions):
                problems.append(f"{session_id}: reply versions {versions} for {base}..{final}")
        answered = [o for o in self.outcomes.values() if o.version is not None]
        assert not problems, problems[:5]
        return Tally(
            sent=len(self.outcomes),
            answered=len(answered),
            applied=applied,
            duplicated=duplicated,
            lost=lost,
            resent=sum(max(0, o.attempts - 1) for o in self.outcomes.values()),
            slowest=max((o.seconds for o in answered), default=0.0),
        )

    def unanswered(self) -> list[tuple[str, Outcome]]:
        return [(i, o) for i, o in self.outcomes.items() if o.version is None]


def update_via_queue(
    client: SessionClient,
    ledger: Ledger,
    session_id: str,
    *,
    timeout: float,
    attempts: int = 1,
    request_id: str | None = None,
) -> None:
    """One ``update`` through the queue, sent again with the same request id after a timeout
    (or a failed send) up to `attempts` times: what a node does (SessionClient's contract)."""
    request_id = request_id or ledger.new(session_id)
    started = time.monotonic()
    error = ""
    for attempt in range(1, attempts + 1):
        try:
            _, reply_key = client.send(
                "update",
                request_id=request_id,
                session_id=session_id,
                patch={"description": f"update {request_id}"},
            )
            reply = client.wait(reply_key, timeout)
        except ReplyTimeout as exc:
            error = str(exc)
            continue
        except Exception as exc:  # the broker is out of reach: the send failed
            error = f"{type(exc).__name__}: {exc}"
            time.sleep(min(timeout, 0.5))
            continue
        assert reply.ok, reply
        ledger.answered(request_id, reply.version, attempt, time.monotonic() - started)
        return
    ledger.failed(request_id, error, attempts)


def update_via_http(
    http: httpx.Client,
    ledger: Ledger,
    session_id: str,
    *,
    attempts: int = 1,
    request_id: str | None = None,
) -> list[int]:
    """One PATCH with an Idempotency-Key, repeated (same key) after a 503 or a transport
    error up to `attempts` times; the statuses seen."""
    request_id = request_id or ledger.new(session_id)
    started = time.monotonic()
    statuses: list[int] = []
    error = ""
    for attempt in range(1, attempts + 1):
        try:
            response = http.patch(
                f"/v2/{PROJECT}/sessions/{session_id}",
                json={"description": f"patch {request_id}"},
                headers={"Idempotency-Key": request_id},
            )
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            statuses.append(0)
            time.sleep(0.2)
            continue
        statuses.append(response.status_code)
        if response.status_code == 200:
            version = int(response.json()["version"])
            ledger.answered(request_id, version, attempt, time.monotonic() - started)
            return statuses
        assert response.status_code == 503, (response.status_code, response.text)
        assert response.headers.get("retry-after"), response.headers
        error = response.text
        time.sleep(0.2)
    ledger.failed(request_id, error, attempts)
    return statuses


class Load:
    """Sender threads, each sending commands one after another until stopped."""

    def __init__(self, threads: int, send: Callable[[int, int], None]) -> None:
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i, send), daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int, send: Callable[[int, int], None]) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                send(index, n)
            except BaseException as exc:
                self.errors.append(exc)
                return
            n += 1
            with self._lock:
                self.sent += 1

    def wait_for(self, count: int, timeout: float) -> None:
        wait_until(lambda: self.sent >= count or self.errors, timeout, f"{count} commands sent")

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a sender hangs"
        assert not self.errors, self.errors[:3]


# Broker state -----------------------------------------------------------------------------


def unacked(client: redis.Redis) -> tuple[int, int]:
    """Sizes of kombu's `unacked` hash and `unacked_index` zset (messages taken, not acked)."""
    return int(client.hlen("unacked")), int(client.zcard("unacked_index"))


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    ended: list[float] = []
    yield lambda: (ended[0] if ended else time.monotonic()) - started
    ended.append(time.monotonic())


class Fleet:
    """The worker and shim processes of one test; all of them ended by :meth:`close`."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self.shims: list[ShimProcess] = []

    def worker(
        self,
        *,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        wait: bool = True,
        settings: Settings | None = None,
    ) -> Worker:
        log_path = self.log_dir / f"worker{len(self.workers)}.log"
        worker = start_worker(settings or self.settings, log_path, concurrency=concurrency, env=env)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def shim(self, *, wait: bool = True, settings: Settings | None = None) -> ShimProcess:
        process = ShimProcess(
            settings or self.settings, self.log_dir / f"shim{len(self.shims)}.log"
        )
        self.shims.append(process)
        if wait:
            process.wait_ready()
        return process

    def deliveries(self, request_id: str) -> int:
        return deliveries(self.workers, request_id)

    def delivery_counts(self) -> collections.Counter[str]:
        return delivery_counts(self.workers)

    def close(self) -> None:
        for shim in self.shims:
            shim.stop()
        for worker in self.workers:
            worker.kill()
