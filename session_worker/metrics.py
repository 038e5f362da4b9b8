"""Every Prometheus metric of the service, and how a process exposes them.

Metrics are in-process counters (prometheus-client); updating one never touches Redis:

- ``session_worker_commands_total{kind, outcome, via}``: commands handled; ``outcome`` is
  ``success``, ``hold-off``, ``out-of-sync``, ``ok`` (commands without a result) or
  ``error:<code>`` (``error:not_found``, ``error:bad_request``, ``error:unauthorized``...);
  ``via`` is ``queue`` (a worker) or ``http`` (the shim);
- ``session_worker_command_duration_seconds{kind, via}``: a histogram of the same;
- ``session_worker_reply_timeouts_total``: SessionClient waits that ended without a reply
  (counted in the process that waited: a node, the CLI, ``simulate``);
- ``session_worker_queue_depth{queue}``: messages waiting in the Celery queue, read from the
  broker when /metrics is scraped (not counted anywhere else);
- ``session_worker_runs_completed_total{result, closed}``: runs closed, by result
  (``success``, ``fail``) and by what closed them (``completed``: every member ended;
  ``deadline``; ``superseded``: a newer run started); taken from the script's return value
  (``run_completed``, which the script adds only when that very call closed the run), so a
  repeated command is never counted twice and nothing extra is read from Redis;
- ``session_worker_deadline_expiries_total``: runs the deadline sweep closed.

Processes with several workers (the shim's uvicorn processes, Celery's prefork pool) use
prometheus-client's multiprocess mode: each process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape adds them up. The variable must be set before
prometheus-client is first imported, which ``session-worker web|worker|sweep`` do
(stack.ensure_multiprocess_dir); ``up`` sets one directory for all its children and empties
it at start, so the shim's /metrics shows the whole stack.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import Reply
from .store import Store

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set when the directory in MULTIPROC_ENV was made by this process tree (removed at exit).
OWNED_DIR_ENV = "_SESSION_WORKER_METRICS_TMP"  # stack.OWNED_METRICS_DIR_ENV

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A start or end is one script call: tens of microseconds to a few milliseconds.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

COMMANDS = Counter(
    "session_worker_commands",
    "Commands handled, by kind, outcome and path (queue: a worker; http: the shim)",
    ["kind", "outcome", "via"],
)
COMMAND_SECONDS = Histogram(
    "session_worker_command_duration_seconds",
    "Time to handle one command (validation, script call, reply), by kind and path",
    ["kind", "via"],
    buckets=_BUCKETS,
)
REPLY_TIMEOUTS = Counter(
    "session_worker_reply_timeouts",
    "SessionClient waits for a reply that ended without one",
)
RUNS_COMPLETED = Counter(
    "session_worker_runs_completed",
    "Runs closed, by result and by what closed them (completed, deadline, superseded)",
    ["result", "closed"],
)
DEADLINE_EXPIRIES = Counter(
    "session_worker_deadline_expiries",
    "Runs the deadline sweep closed because their run_timeout had passed",
)

# Label children by label values: labels() costs a lock and a dict build per call.
_command_children: dict[tuple[str, str, str], Any] = {}
_duration_children: dict[tuple[str, str], Any] = {}


def outcome_of(reply: Reply | None) -> str:
    """A reply's outcome as metrics and log lines name it."""
    if reply is None:
        return "dropped"
    if reply.error is not None:
        return f"error:{reply.error.code}"
    return reply.result or "ok"


def observe_command(kind: str, outcome: str, via: str, seconds: float) -> None:
    """Count one handled command and its duration."""
    counter = _command_children.get((kind, outcome, via))
    if counter is None:
        counter = _command_children[(kind, outcome, via)] = COMMANDS.labels(kind, outcome, via)
    counter.inc()
    histogram = _duration_children.get((kind, via))
    if histogram is None:
        histogram = _duration_children[(kind, via)] = COMMAND_SECONDS.labels(kind, via)
    histogram.observe(seconds)


def observe_run_completed(result: str, closed: str) -> None:
    RUNS_COMPLETED.labels(result or "fail", closed or "completed").inc()


_MARKER = b'"run_completed":'


def run_completed_in(raw: Any) -> dict[str, Any] | None:
    """The ``run_completed`` note of a script's return value, or None (cheap when absent)."""
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes) or _MARKER not in raw:
        return None
    try:
        note = orjson.loads(raw).get("run_completed")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return note if isinstance(note, dict) else None


class MeteredStore(Store):
    """A Store that counts the runs its script calls close (and, for the sweep, expiries)."""

    def __init__(self, *args: Any, sweep: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sweep = sweep

    def returned(self, raw: Any) -> Any:
        note = run_completed_in(raw)
        if note is not None:
            closed = str(note.get("closed", ""))
            observe_run_completed(str(note.get("result", "")), closed)
            if self._sweep and closed == "deadline":
                DEADLINE_EXPIRIES.inc()
        return raw


# Exposition -------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def remove_owned_dir() -> None:
    """Remove the temporary directory ensure_multiprocess_dir made, if this tree made one."""
    path = os.environ.get(OWNED_DIR_ENV)
    if path and path == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(path, ignore_errors=True)


class _FromCallable(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def collecting_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What a scrape reports: this process (or every process sharing the multiprocess
    directory) and `extra` collectors."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_FromCallable(REGISTRY.collect))
    for collector in extra:
        registry.register(collector)
    return registry


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition of every metric (see collecting_registry)."""
    return generate_latest(collecting_registry(extra))


def queue_depth_metric(queue: str, depth: int | None) -> Iterator[Metric]:
    """session_worker_queue_depth for one queue (nothing when the broker did not answer)."""
    if depth is None:
        return
    family = GaugeMetricFamily(
        "session_worker_queue_depth",
        "Messages waiting in the Celery queue (read from the broker at scrape time)",
        labels=["queue"],
    )
    family.add_metric([queue], float(depth))
    yield family


class QueueDepth(Collector):
    """Collects session_worker_queue_depth by calling `read` (the broker's count) per scrape."""

    def __init__(self, queue: str, read: Callable[[], int]) -> None:
        self.queue = queue
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            depth: int | None = self._read()
        except Exception as exc:  # the broker is away: the scrape still answers
            log.warning("queue depth unavailable: %s", type(exc).__name__)
            depth = None
        yield from queue_depth_metric(self.queue, depth)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics of this process tree on `port` (a thread; for worker and sweep)."""
    start_http_server(port, addr=host, registry=collecting_registry())
    log.info("metrics on http://%s:%d/metrics", host, port)


__all__ = [
    "COMMANDS",
    "COMMAND_SECONDS",
    "CONTENT_TYPE",
    "DEADLINE_EXPIRIES",
    "REPLY_TIMEOUTS",
    "RUNS_COMPLETED",
    "MeteredStore",
    "QueueDepth",
    "collecting_registry",
    "observe_command",
    "outcome_of",
    "render",
    "run_completed_in",
    "serve_metrics",
]
