"""Family 2, the queue path: commands through Celery, next to a bare Celery round trip.

Workers run as deployed: ``session-worker worker`` processes (Celery prefork, one pool
process each, ``--without-mingle --without-gossip --without-heartbeat``). Node clients are
threads of this process, each with its own ``SessionClient``. A client takes a fresh session
of 8 jobs and sends its round in order: 8 starts (the first opens the run, the others join
it), then 8 ends (the last completes the run), each waiting for its reply; then the next
session, until the row's time is up.

The baseline is the same Celery app (``make_app``: same broker, same settings) running an
empty task that answers with one RPUSH to the caller's reply list, started with the same
worker flags; its clients send with ``send_task`` (with the same cheap ``argsrepr`` /
``kwargsrepr`` as SessionClient) and BLPOP the reply. Both run in the same process, against
the same Redis, one after the other for each number of workers.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from session_worker.celery_app import make_app
from session_worker.cli import worker_argv
from session_worker.client import SessionClient
from session_worker.connection import make_redis

from . import noop_app, profiling
from .common import (
    BENCH_PROJECT,
    FAR_HOLD_OFF,
    SESSION_JOBS,
    Context,
    FamilyResult,
    Sample,
    Table,
    Target,
    child_env,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    stop_process,
    tree_rss,
)
from .script_floor import bulk_sessions

WORKERS = (1, 2)
CLIENTS = (1, 16)
RATIO_TARGET = 0.9
P99_TARGET = 0.050  # seconds, at 16 clients
WARMUP_SECONDS = 0.5
REPLY_TIMEOUT = 30.0
SESSIONS_PER_SECOND = 250  # sessions (16 commands each) prepared per second of a row
READY_MARKER = " ready."


@dataclass
class Row:
    system: str
    workers: int
    clients: int
    sample: Sample
    unexpected: int


class Workers:
    """N worker processes of one kind ("ours" or "bare"), each with its own log."""

    def __init__(self, ctx: Context, kind: str, count: int) -> None:
        self.ctx = ctx
        self.kind = kind
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def argv(self, index: int) -> list[str]:
        name = f"bench-{self.kind}{index}@%h"
        if self.kind == "ours":
            return [sys.executable, "-m", "session_worker.cli", "worker", "-n", name]
        argv = worker_argv(self.ctx.settings, ["-n", name])
        argv[argv.index("-A") + 1] = "benchmarks.noop_app"
        return argv

    def start(self, timeout: float = 60.0) -> None:
        logdir = self.ctx.workdir / "queue"
        logdir.mkdir(parents=True, exist_ok=True)
        for i in range(1, self.count + 1):
            log_path = logdir / f"worker-{self.kind}-{self.count}w-{i}.log"
            log_path.unlink(missing_ok=True)
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    self.argv(i),
                    env=child_env(self.ctx.redis_url),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.logs.append(log_path)
        deadline = time.monotonic() + timeout
        waiting = list(zip(self.procs, self.logs, strict=True))
        while waiting:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} workers not ready in {timeout:g} s")
            for proc, log_path in list(waiting):
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"a {self.kind} worker exited; see {log_path}")
                if READY_MARKER in log_path.read_text(errors="replace"):
                    waiting.remove((proc, log_path))
            time.sleep(0.05)

    def rss(self) -> tuple[int, int]:
        total = count = 0
        for proc in self.procs:
            rss, n = tree_rss(proc.pid)
            total += rss
            count += n
        return total, count

    def pids(self) -> list[int]:
        from .common import descendants

        return [p for proc in self.procs for p in (proc.pid, *descendants(proc.pid))]

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs = []


class _Sessions:
    """Fresh sessions handed to client threads, one at a time."""

    def __init__(self, ids: list[str]) -> None:
        self._ids: Iterator[str] = iter(ids)
        self._lock = threading.Lock()

    def take(self) -> str | None:
        with self._lock:
            return next(self._ids, None)


def _drive(
    clients: int, duration: float, work: Callable[[int, float, list[float]], int]
) -> tuple[Sample, int]:
    """Run `work(index, deadline, latencies)` in `clients` threads; the merged sample."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    unexpected = [0] * clients
    began = time.perf_counter()
    deadline = time.monotonic() + duration

    def target(i: int) -> None:
        unexpected[i] = work(i, deadline, latencies[i])

    threads = [threading.Thread(target=target, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    merged = list(itertools.chain.from_iterable(latencies))
    return Sample(len(merged), elapsed, merged), sum(unexpected)


def _ours(ctx: Context, clients: int, duration: float, sessions: _Sessions) -> tuple[Sample, int]:
    nodes = [
        SessionClient(project_id=BENCH_PROJECT, settings=ctx.settings, timeout=REPLY_TIMEOUT)
        for _ in range(clients)
    ]

    def work(i: int, deadline: float, latencies: list[float]) -> int:
        node = nodes[i]
        unexpected = 0
        while time.monotonic() < deadline:
            session_id = sessions.take()
            if session_id is None:
                break
            for k in range(SESSION_JOBS * 2):
                if time.monotonic() >= deadline:
                    break
                job = f"{session_id}-j{k % SESSION_JOBS}"
                began = time.perf_counter()
                if k < SESSION_JOBS:
                    reply = node.start(session_id, job, 0)
                else:
                    reply = node.end(session_id, job, "success", 1)
                latencies.append(time.perf_counter() - began)
                if not reply.ok or reply.result != "success":
                    unexpected += 1
        return unexpected

    try:
        return _drive(clients, duration, work)
    finally:
        for node in nodes:
            node.close()


def _bare(ctx: Context, clients: int, duration: float) -> tuple[Sample, int]:
    settings = ctx.settings
    apps: list[Celery] = [make_app(settings) for _ in range(clients)]
    waits = [make_redis(settings, wait_timeout=REPLY_TIMEOUT) for _ in range(clients)]
    prefix = f"{settings.key_prefix}:{{{BENCH_PROJECT}:noop}}:reply:"

    def work(i: int, deadline: float, latencies: list[float]) -> int:
        app, wait = apps[i], waits[i]
        unexpected = 0
        while time.monotonic() < deadline:
            reply_to = prefix + uuid.uuid4().hex
            kwargs = {"reply_to": reply_to}
            began = time.perf_counter()
            app.send_task(
                noop_app.TASK_NAME,
                kwargs=kwargs,
                queue=settings.queue,
                argsrepr="()",
                kwargsrepr=repr(kwargs),
            )
            popped = wait.blpop([reply_to], timeout=REPLY_TIMEOUT)
            latencies.append(time.perf_counter() - began)
            if popped is None:
                unexpected += 1
        return unexpected

    try:
        return _drive(clients, duration, work)
    finally:
        for app in apps:
            app.close()
        for client in waits:
            client.close()


def _measure(
    ctx: Context, kind: str, workers: int, sessions: _Sessions
) -> tuple[list[Row], list[str]]:
    pool = Workers(ctx, kind, workers)
    ctx.progress(f"queue: starting {workers} {kind} worker(s)")
    pool.start()
    rows: list[Row] = []
    profile: list[str] = []
    system = "session-worker" if kind == "ours" else "bare Celery"
    try:
        for clients in CLIENTS:
            run: Callable[[float], tuple[Sample, int]]
            if kind == "ours":

                def run(seconds: float, c: int = clients) -> tuple[Sample, int]:
                    return _ours(ctx, c, seconds, sessions)

            else:

                def run(seconds: float, c: int = clients) -> tuple[Sample, int]:
                    return _bare(ctx, c, seconds)

            run(WARMUP_SECONDS)
            sample, unexpected = run(ctx.duration)
            rows.append(Row(system, workers, clients, sample, unexpected))
            ctx.progress(
                f"queue: {system} {workers}w x {clients}c: {fmt_rate(sample.rate)} commands/s, "
                f"p50 {fmt_ms(sample.p50)} ms, p99 {fmt_ms(sample.p99)} ms "
                f"({sample.count} commands, {unexpected} unexpected replies)"
            )
        rss, nproc = pool.rss()
        if kind == "ours":
            ctx.rss[f"workers ({workers} x `session-worker worker`, {nproc} processes)"] = rss
        if ctx.profile and kind == "ours" and workers == max(WORKERS):
            sampler = profiling.Sampler(
                f"worker-{workers}w", pool.pids(), ctx.duration, ctx.workdir / "profiles"
            )
            if sampler.available:
                _ours(ctx, max(CLIENTS), ctx.duration, sessions)
                profile = sampler.finish().lines()
                for line in profile:
                    ctx.progress(line)
    finally:
        pool.stop()
    return rows, profile


def run(ctx: Context) -> FamilyResult:
    ctx.flush()
    per_row = SESSIONS_PER_SECOND * max(1.0, ctx.duration + WARMUP_SECONDS)
    rows_ours = len(WORKERS) * len(CLIENTS) + (1 if ctx.profile else 0)
    count = int(per_row * rows_ours)
    client = ctx.redis()
    try:
        ids = bulk_sessions(client, ctx.settings, "q", count, hold_off=FAR_HOLD_OFF)
    finally:
        client.close()
    ctx.progress(f"queue: made {len(ids)} sessions of {SESSION_JOBS} jobs")
    sessions = _Sessions(ids)
    rows: list[Row] = []
    profile: list[str] = []
    for workers in WORKERS:
        for kind in ("ours", "bare"):
            measured, lines = _measure(ctx, kind, workers, sessions)
            rows += measured
            profile += lines
    return _result(ctx, rows, profile)


def _result(ctx: Context, rows: list[Row], profile: list[str]) -> FamilyResult:
    table = Table(
        "Queue path: commands through Celery next to a bare Celery round trip (same run)",
        ["system", "workers", "clients", "commands/s", "p50 ms", "p99 ms", "commands", "ratio"],
    )
    bare = {(r.workers, r.clients): r for r in rows if r.system == "bare Celery"}
    targets: list[Target] = []
    for row in sorted(rows, key=lambda r: (r.workers, r.clients, r.system != "session-worker")):
        ref = bare.get((row.workers, row.clients))
        ratio = row.sample.rate / ref.sample.rate if ref and row.system != ref.system else None
        count = f"{row.sample.count:,}"
        if row.unexpected:
            count += f" ({row.unexpected} unexpected)"
        table.add(
            row.system,
            row.workers,
            row.clients,
            fmt_rate(row.sample.rate),
            fmt_ms(row.sample.p50),
            fmt_ms(row.sample.p99),
            count,
            fmt_ratio(ratio),
        )
        if row.system == "session-worker" and row.clients == max(CLIENTS) and ref is not None:
            targets.append(
                Target(
                    f"Queue vs bare Celery ({row.workers} worker(s), {row.clients} clients)",
                    f">= {RATIO_TARGET:g}x",
                    f"{fmt_ratio(ratio)} ({fmt_rate(row.sample.rate)} vs "
                    f"{fmt_rate(ref.sample.rate)} commands/s)",
                    ratio is not None and ratio >= RATIO_TARGET,
                )
            )
            targets.append(
                Target(
                    f"Queue p99 ({row.workers} worker(s), {row.clients} clients)",
                    f"<= {P99_TARGET * 1000:g} ms",
                    f"{fmt_ms(row.sample.p99)} ms",
                    row.sample.p99 is not None and row.sample.p99 <= P99_TARGET,
                )
            )
    table.notes += [
        "ratio: session-worker commands/s over bare Celery round trips/s, same workers and "
        "clients.",
        f"Each client: rounds of {SESSION_JOBS} starts then {SESSION_JOBS} ends on a fresh "
        "session (1 new run, 7 joins, 8 ends; the last completes the run), one command at a "
        "time, waiting for each reply (BLPOP on its reply list).",
        "Workers: `session-worker worker` (Celery's solo pool: one command at a time in the "
        "worker process, --without-mingle --without-gossip --without-heartbeat, log level "
        "INFO); the "
        "baseline runs the same command line on `benchmarks.noop_app`.",
        f"Clients are threads of the benchmark process; rows of {ctx.duration:g} s after a "
        f"{WARMUP_SECONDS:g} s warm-up.",
    ]
    result = FamilyResult("queue", tables=[table], targets=targets)
    result.faults += [
        f"{r.system} {r.workers}w x {r.clients}c: {r.unexpected} unexpected replies"
        for r in rows
        if r.unexpected
    ]
    if profile:
        result.notes += [
            "Profile of the worker processes (parent and pool process) during a 16-client "
            "row with 2 workers (py-spy, 200 Hz):",
            "",
            "```",
            *profile,
            "```",
        ]
    return result


__all__ = ["run"]
