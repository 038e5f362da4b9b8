"""Family 4, growth: script cost and memory against the number of jobs in a session.

For each size, one session gets its jobs one ``Store.add_job`` at a time (the add_job
script plus the job's own record, as in production). Then, with the Store's clock override
so that every run can start at once: new-run starts (each closes the previous run as
superseded), joining starts and ends, timed by Redis itself (``INFO commandstats``: the
script's own time, without network or client). A read (the whole document) is O(jobs) by
nature and shown for reference.

Memory is ``MEMORY USAGE <key> SAMPLES 0`` (exact) on every key of the session and on the
jobs' own records, and the resident memory of the shim and worker processes as measured
after the HTTP and queue rows of the same run.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from redis import Redis

from session_worker.models import AddJobCommand, CreateCommand, SessionFields
from session_worker.store import Store

from .common import (
    BENCH_PROJECT,
    Context,
    FamilyResult,
    Table,
    Target,
    fmt_bytes,
    fmt_us,
)
from .script_floor import ScriptCaller

SIZES = (10, 1_000, 10_000)
SAMPLE_CALLS = 200  # joining starts and ends timed per size
NEW_RUNS = 50
FLAT_TARGET_US = 1000.0  # per command at 10,000 jobs
CREATE_SIZES = (10, 100, 1_000)  # whole-document creates (full runs only)


def _server(client: Redis, command: str = "evalsha") -> tuple[int, float]:
    stats: dict[str, Any] = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}", {"calls": 0, "usec": 0})
    return int(entry["calls"]), float(entry["usec"])


def _per_call(client: Redis, calls: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Server µs and client µs per call of `calls` (EVALSHA argument tuples), sequentially."""
    client.config_resetstat()
    began = time.perf_counter()
    for cmd in calls:
        raw = client.evalsha(*cmd)
        if b'"ok":true' not in raw:
            raise RuntimeError(f"unexpected reply in the growth benchmark: {raw!r}")
    wall = time.perf_counter() - began
    n, usec = _server(client)
    return usec / max(n, 1), wall / len(calls) * 1e6


def _memory(client: Redis, keys: list[str]) -> int:
    total = 0
    for i in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        for key in keys[i : i + 500]:
            pipe.memory_usage(key, samples=0)
        total += sum(v or 0 for v in pipe.execute())
    return total


def _grow(ctx: Context, client: Redis, size: int) -> dict[str, float]:
    clock = [int(time.time())]
    store = Store(client, ctx.settings, clock=lambda: clock[0])
    session_id = f"grow{size}"
    doc = SessionFields.model_validate({"session_id": session_id, "hold_off": 0})
    store.create(
        CreateCommand(
            request_id=uuid.uuid4().hex, reply_to=None, project_id=BENCH_PROJECT, document=doc
        )
    ).raise_for_error()
    jobs = [f"{session_id}-j{k}" for k in range(size)]
    request_ids = [uuid.uuid4().hex for _ in jobs]
    client.config_resetstat()
    began = time.perf_counter()
    for job, request_id in zip(jobs, request_ids, strict=True):
        store.add_job(
            AddJobCommand(
                request_id=request_id,
                reply_to=None,
                project_id=BENCH_PROJECT,
                session_id=session_id,
                job_id=job,
            )
        ).raise_for_error()
    add_wall = (time.perf_counter() - began) / size * 1e6
    n, usec = _server(client)
    add_server = usec / max(n, 1) * 2  # add_job.lua + attach_job.lua per job

    caller = ScriptCaller(Store(client, ctx.settings), BENCH_PROJECT, lambda: clock[0])
    caller.load(client)
    sample = jobs[1 : 1 + min(SAMPLE_CALLS, size - 1)]
    client.config_resetstat()
    began = time.perf_counter()
    for tag in range(NEW_RUNS):  # each new run needs the clock to move first
        clock[0] += 1
        raw = client.evalsha(*caller.command("start", session_id, [jobs[0], tag]))
        if b'"result":"success"' not in raw:
            raise RuntimeError(f"growth: a new run did not start: {raw!r}")
    new_wall = (time.perf_counter() - began) / NEW_RUNS * 1e6
    n, usec = _server(client)
    start_new_us = usec / max(n, 1)
    tag = NEW_RUNS
    joins = [caller.command("start", session_id, [job, tag - 1]) for job in sample]
    join_us, join_wall = _per_call(client, joins)
    ends = [caller.command("end", session_id, [job, tag, "success"]) for job in [jobs[0], *sample]]
    end_us, end_wall = _per_call(client, ends)

    client.config_resetstat()
    began = time.perf_counter()
    reads = 5
    for _ in range(reads):
        store.get(BENCH_PROJECT, session_id)
    read_wall = (time.perf_counter() - began) / reads * 1e6
    n, usec = _server(client)
    read_us = usec / max(n, 1)

    keys = store.keys.session(BENCH_PROJECT, session_id)
    parts = {
        name: _memory(client, [key])
        for name, key in zip(keys._fields, keys, strict=True)
        if name not in ("reply", "request")
    }
    records = [store.keys.job_record(BENCH_PROJECT, job) for job in jobs]
    moves = [
        store.keys.job_move(BENCH_PROJECT, job, rid)
        for job, rid in zip(jobs, request_ids, strict=True)
    ]
    request_keys = [
        k.decode()
        for k in client.scan_iter(
            match=f"{store.keys.session_base(BENCH_PROJECT, session_id)}:request:*"
        )
    ]
    requests_stored = len(request_keys)
    run_entries = int(client.hlen(keys.run_jobs))
    return {
        "add_server": add_server,
        "add_wall": add_wall,
        "start_new": start_new_us,
        "start_new_wall": new_wall,
        "join": join_us,
        "join_wall": join_wall,
        "end": end_us,
        "end_wall": end_wall,
        "read": read_us,
        "read_wall": read_wall,
        "session_bytes": float(sum(parts.values())),
        "meta": float(parts["meta"]),
        "jobs_hash": float(parts["jobs"]),
        "requests_bytes": float(_memory(client, request_keys)),
        "requests_stored": float(requests_stored),
        "history_bytes": float(parts["runs"] + parts["run_jobs"] + parts["run_jobs_index"]),
        "run_entries": float(run_entries),
        "records": float(_memory(client, records)),
        "moves": float(_memory(client, moves)),
    }


def _create_cost(ctx: Context, client: Redis, size: int) -> float:
    """Seconds for one create whose document lists `size` jobs."""
    store = Store(client, ctx.settings)
    jobs: dict[str, dict[str, str]] = {f"c{size}-j{k}": {} for k in range(size)}
    doc = SessionFields.model_validate({"session_id": f"create{size}", "jobs": jobs})
    cmd = CreateCommand(
        request_id=uuid.uuid4().hex, reply_to=None, project_id=BENCH_PROJECT, document=doc
    )
    began = time.perf_counter()
    store.create(cmd).raise_for_error()
    return time.perf_counter() - began


def run(ctx: Context) -> FamilyResult:
    ctx.flush()
    client = ctx.redis()
    figures: dict[int, dict[str, float]] = {}
    try:
        for size in SIZES:
            ctx.progress(f"growth: a session with {size:,} jobs")
            figures[size] = _grow(ctx, client, size)
            f = figures[size]
            ctx.progress(
                f"growth: {size:,} jobs: new-run start {fmt_us(f['start_new'])} µs, join "
                f"{fmt_us(f['join'])} µs, end {fmt_us(f['end'])} µs (server time per call)"
            )
        creates: dict[int, float] = {}
        if not ctx.quick:
            for size in CREATE_SIZES:
                creates[size] = _create_cost(ctx, client, size)
                ctx.progress(f"growth: create with {size:,} jobs: {creates[size]:.3f} s")
    finally:
        client.close()
    return _result(ctx, figures, creates)


def _result(
    ctx: Context, figures: dict[int, dict[str, float]], creates: dict[int, float]
) -> FamilyResult:
    cost = Table(
        "Growth: script cost per call against jobs per session (server µs, client µs)",
        ["jobs", "add_job", "start (new run)", "start (join)", "end", "read (document)"],
    )
    for size, f in figures.items():
        cost.add(
            f"{size:,}",
            f"{fmt_us(f['add_server'])} / {fmt_us(f['add_wall'])}",
            f"{fmt_us(f['start_new'])} / {fmt_us(f['start_new_wall'])}",
            f"{fmt_us(f['join'])} / {fmt_us(f['join_wall'])}",
            f"{fmt_us(f['end'])} / {fmt_us(f['end_wall'])}",
            f"{fmt_us(f['read'])} / {fmt_us(f['read_wall'])}",
        )
    cost.notes += [
        "Each cell: Redis's own time per call (INFO commandstats) / the caller's wall time "
        "per call over loopback. add_job is the add_job script plus the job-record script "
        "(both counted); start (new run) also closes the previous run as superseded.",
        f"{NEW_RUNS} new runs, then {SAMPLE_CALLS} joining starts and {SAMPLE_CALLS + 1} ends "
        "per size; a read returns the whole document, so it grows with the jobs by design.",
    ]
    memory = Table(
        "Growth: memory (MEMORY USAGE, exact)",
        [
            "jobs",
            "session keys",
            "jobs hash / job",
            "job record / job",
            "move marker / job",
            "request record",
            "history entry",
        ],
    )
    for size, f in figures.items():
        memory.add(
            f"{size:,}",
            fmt_bytes(f["session_bytes"]),
            fmt_bytes(f["jobs_hash"] / size),
            fmt_bytes(f["records"] / size),
            fmt_bytes(f["moves"] / size),
            fmt_bytes(f["requests_bytes"] / max(f["requests_stored"], 1)),
            fmt_bytes(f["history_bytes"] / max(f["run_entries"], 1) if f["run_entries"] else None),
        )
    small = figures.get(min(figures)) if figures else None
    if small is not None:
        fixed = small["meta"]
        memory.notes.append(
            f"A session's own hash (scalars and counters) is {fmt_bytes(fixed)}; every job "
            "adds its entry in the jobs hash, its own record and, for a day, the marker of "
            "the add_job that moved it (request_ttl)."
        )
    memory.notes += [
        "request record: the stored reply of one command (a string key with a TTL), "
        "kept request_ttl (default 24 h) for de-duplication; history entry: one job's state "
        "in one run (run_jobs hash + index), kept for the last history_limit runs.",
    ]
    tables = [cost, memory]
    if ctx.rss:
        rss = Table("Resident memory of the processes after the load rows", ["process", "RSS"])
        for name, value in ctx.rss.items():
            rss.add(name, fmt_bytes(value))
        tables.append(rss)
    if creates:
        create = Table(
            "Growth: one create whose document lists N jobs (Store.create, wall time)",
            ["jobs", "seconds", "ms per job"],
        )
        for size, seconds in creates.items():
            create.add(f"{size:,}", f"{seconds:.3f}", f"{seconds / size * 1000:.2f}")
        tables.append(create)
    targets = []
    biggest = max(figures) if figures else None
    if biggest is not None:
        f = figures[biggest]
        worst = max(f["start_new"], f["join"], f["end"], f["add_server"])
        smallest = figures[min(figures)]
        base = max(smallest["start_new"], smallest["join"], smallest["end"])
        targets.append(
            Target(
                f"Script cost at {biggest:,} jobs",
                f"flat, <= {FLAT_TARGET_US:g} µs per command",
                f"worst {fmt_us(worst)} µs (at {min(figures):,} jobs: {fmt_us(base)} µs)",
                worst <= FLAT_TARGET_US,
            )
        )
    return FamilyResult("growth", tables=tables, targets=targets)
