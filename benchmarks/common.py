"""What every benchmark family shares: the run context, timing, tables, processes."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from redis import Redis

from session_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BENCH_PROJECT = "bench"
SESSION_JOBS = 8  # jobs per session in the workloads: one cluster's nodes backed up together
FAR_HOLD_OFF = 86_400  # a run started in setup stays inside its hold-off window


# Timing -----------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile `q` (0..100) of values sorted ascending; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Sample:
    """Operations done in `seconds`; latencies (seconds) when each one was timed."""

    count: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    p50: float | None = None  # seconds; set directly when a tool reports percentiles
    p99: float | None = None

    def __post_init__(self) -> None:
        if self.latencies and self.p50 is None:
            ordered = sorted(self.latencies)
            self.p50 = percentile(ordered, 50)
            self.p99 = percentile(ordered, 99)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.count * 1e6 if self.count else 0.0


# Formatting -------------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10 * 1024 * 1024:
        return f"{value / 1024 / 1024:,.1f} MiB"
    if value >= 10 * 1024:
        return f"{value / 1024:,.1f} KiB"
    return f"{value:,.0f} B"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        cells = [self.headers, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]

        def line(row: Sequence[str]) -> str:
            out = []
            for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
                out.append(cell.ljust(width) if i == 0 else cell.rjust(width))
            return "  ".join(out).rstrip()

        rule = "  ".join("-" * w for w in widths)
        body = [line(self.headers), rule, *(line(r) for r in self.rows)]
        return "\n".join([self.title, *body])

    def markdown(self) -> str:
        align = ["---"] + ["---:"] * (len(self.headers) - 1)
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.headers) + " |",
            "| " + " | ".join(align) + " |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class Target:
    """One target of the issue: what was asked, what was measured, whether it was met."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass
class FamilyResult:
    name: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Rows whose requests were not all answered as expected: the run fails (a figure
    # measured on errors is no figure).
    faults: list[str] = field(default_factory=list)


# The run context ---------------------------------------------------------------------------


class Progress:
    """Progress lines on stderr, each with the time since the run began."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.began = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.began
        print(f"[{elapsed:6.1f} s] {message}", file=self.stream, flush=True)


@dataclass
class Context:
    """What a family needs: mode, the Redis server, where to put files, how to report."""

    quick: bool
    duration: float  # seconds per measured row
    redis_url: str
    settings: Settings
    workdir: Path
    progress: Callable[[str], None]
    loadgen: str = "auto"  # auto | wrk | python
    freezer: bool = True
    profile: bool = False
    rss: dict[str, int] = field(default_factory=dict)  # process kind -> RSS bytes after load
    versions: dict[str, str] = field(default_factory=dict)  # extra versions found on the way

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url, socket_timeout=30)

    def flush(self) -> None:
        client = self.redis()
        try:
            client.flushall()
            client.config_resetstat()
        finally:
            client.close()


# Processes --------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """The process ids under `pid` (children, grandchildren ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS of the process and of everything under it; also how many processes that is."""
    pids = [pid, *descendants(pid)]
    return sum(rss_bytes(p) for p in pids), len(pids)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `timeout`; reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)  # leftovers of the group (pool processes)


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a session-worker child: this Redis, the repo importable."""
    env = dict(os.environ)
    env["SESSION_WORKER_REDIS_URL"] = redis_url
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` leaves the elapsed seconds in ``t[0]``."""
    box = [0.0]
    began = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - began


# Machine and versions -----------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": platform.platform(),
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = [
        "session-worker",
        "celery",
        "kombu",
        "redis",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "orjson",
        "pydantic",
    ]
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name if name != "redis" else "redis-py"] = metadata.version(name)
    return found


def server_version(client: Redis) -> str:
    info: dict[str, Any] = client.info("server")
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info.get('redis_version', '?')}"
