"""Family 3, the HTTP path: the shim (``session-worker web``) next to freezer-api 19.0.0.

Both get the same logical work. Sessions of 8 jobs with a long hold-off. The start row sends
``POST .../sessions/{id}/action {"start": {"job_id", "current_tag": 0}}`` for every job of
every session: the first start of a session opens its run, the seven others join it (each
one a write in both systems). The end row then sends ``{"end": {"job_id", "current_tag": 1,
"result": "success"}}`` for the same jobs; the last end of a session completes its run.
Requests are ordered so that the connections in flight work on different sessions
(freezer-api's action is an unlocked read-modify-write). Every request carries the identity
headers freezer-api trusts without keystone; the shim runs without auth on loopback and
ignores them.

The shim runs as ``session-worker web`` with the configured number of processes; the
sessions are made through the Store beforehand (setup is not measured). freezer-api runs
from its own virtualenv on SQLite: under gunicorn (gthread, keep-alive) for every row, and
with its stock server for the one-connection rows of a full run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import orjson

from session_worker.redis_server import HOST, free_port
from session_worker.store import Store

from . import freezer, loadgen, profiling
from .common import (
    BENCH_PROJECT,
    FAR_HOLD_OFF,
    SESSION_JOBS,
    Context,
    FamilyResult,
    Table,
    Target,
    child_env,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    stop_process,
    tree_rss,
)
from .script_floor import ScriptCaller, bulk_sessions, pipelined

CONNECTIONS = (1, 16)
RATIO_TARGET = 40.0
P99_TARGET = 0.010  # seconds, at 16 connections
WARMUP_SECONDS = 0.3


@dataclass
class Row:
    system: str
    action: str
    connections: int
    result: loadgen.LoadResult


def _action_requests(
    sessions: list[str], action: str, group: int
) -> list[tuple[str, int, loadgen.Request]]:
    """(session, job index, request) for every job of every session once, `group` sessions
    interleaved per wave of jobs (so that the connections in flight use different sessions).
    """
    out: list[tuple[str, int, loadgen.Request]] = []
    for g in range(0, len(sessions), group):
        chunk = sessions[g : g + group]
        for k in range(SESSION_JOBS):
            for session_id in chunk:
                job = f"{session_id}-j{k}"
                if action == "start":
                    params: dict[str, object] = {"job_id": job, "current_tag": 0}
                else:
                    params = {"job_id": job, "current_tag": 1, "result": "success"}
                body = orjson.dumps({action: params})
                path = f"/v2/{BENCH_PROJECT}/sessions/{session_id}/action"
                out.append((session_id, k, loadgen.Request("POST", path, body)))
    return out


def _pool_size(warm_rate: float, ctx: Context) -> int:
    """Sessions for one row pair: twice what the warm-up rate would use, at least 16."""
    seconds = max(1.0, round(ctx.duration))
    return max(16, math.ceil(warm_rate * 2.0 * seconds / SESSION_JOBS))


# The shim ---------------------------------------------------------------------------------


class Shim:
    """``session-worker web`` on a free loopback port."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.workers = ctx.settings.http_workers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
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
            str(self.workers),
        ]
        log = (self.ctx.workdir / "shim.log").open("ab")
        self.proc = subprocess.Popen(
            argv,
            env=child_env(self.ctx.redis_url),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        url = f"{self.base_url}/v2/{BENCH_PROJECT}/sessions/absent"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the shim exited; see {self.ctx.workdir / 'shim.log'}")
            try:
                urllib.request.urlopen(url, timeout=1.0).close()
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the shim did not answer in 60 s")

    def worker_pids(self) -> list[int]:
        from .common import descendants

        if self.proc is None:
            return []
        kids = descendants(self.proc.pid)
        return kids or [self.proc.pid]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class ShimSystem:
    """The shim as a system under test: sessions made and runs opened straight in Redis."""

    name = "shim"

    def __init__(self, ctx: Context, shim: Shim) -> None:
        self.ctx = ctx
        self.base_url = shim.base_url
        self._prefix = f"h{uuid.uuid4().hex[:8]}"
        self._made = 0

    def make_sessions(self, count: int) -> list[str]:
        self._made += 1
        client = self.ctx.redis()
        try:
            prefix = f"{self._prefix}n{self._made}x"
            return bulk_sessions(client, self.ctx.settings, prefix, count, hold_off=FAR_HOLD_OFF)
        finally:
            client.close()

    def top_up(self, items: list[tuple[str, int, loadgen.Request]]) -> None:
        """Start the jobs the start row did not reach (pipelined scripts, not measured)."""
        client = self.ctx.redis()
        try:
            caller = ScriptCaller(Store(client, self.ctx.settings), BENCH_PROJECT)
            commands = [
                caller.command("start", session, [f"{session}-j{k}", 0]) for session, k, _ in items
            ]
            pipelined(client, commands, 256)
        finally:
            client.close()


class FreezerSystem:
    """freezer-api as a system under test: everything over its HTTP API."""

    def __init__(self, api: freezer.FreezerApi, name: str) -> None:
        self.api = api
        self.name = name
        self.base_url = api.base_url

    def make_sessions(self, count: int) -> list[str]:
        """`count` sessions with 8 jobs each (create, then PATCH the jobs in)."""
        headers = freezer.IDENTITY_HEADERS
        create = loadgen.Request(
            "POST",
            f"/v2/{BENCH_PROJECT}/sessions",
            orjson.dumps({"description": "bench", "schedule": {}, "hold_off": FAR_HOLD_OFF}),
        )
        made = loadgen.run_python(
            self.base_url,
            [create] * count,
            connections=4,
            duration=600,
            headers=headers,
            keep_bodies=True,
        )
        if made.not_ok or made.errors or made.sample.count != count:
            raise freezer.FreezerSetupError(f"freezer-api: create failed: {made.statuses}")
        ids = [orjson.loads(body)["session_id"] for body in made.bodies]
        patches = []
        for session_id in ids:
            entry = {"client_id": "bench", "status": "", "result": "", "time_started": -1}
            jobs = {f"{session_id}-j{k}": {**entry, "time_ended": -1} for k in range(SESSION_JOBS)}
            path = f"/v2/{BENCH_PROJECT}/sessions/{session_id}"
            patches.append(loadgen.Request("PATCH", path, orjson.dumps({"jobs": jobs})))
        patched = loadgen.run_python(
            self.base_url, patches, connections=4, duration=600, headers=headers
        )
        if patched.not_ok or patched.errors:
            raise freezer.FreezerSetupError(
                f"freezer-api: session patch failed: {patched.statuses}"
            )
        return ids

    def top_up(self, items: list[tuple[str, int, loadgen.Request]]) -> None:
        """Start the jobs the start row did not reach (over HTTP, not measured)."""
        loadgen.run_python(
            self.base_url,
            [request for _, _, request in items],
            connections=4,
            duration=600,
            headers=freezer.IDENTITY_HEADERS,
        )


System = ShimSystem | FreezerSystem


# Rows ---------------------------------------------------------------------------------------


def _warm_up(base_url: str, session_id: str, connections: int) -> float:
    """Repeated starts of one job (the first opens a run, the rest are hold-off answers) for
    a moment; the rate they reached."""
    body = orjson.dumps({"start": {"job_id": f"{session_id}-j0", "current_tag": 0}})
    req = loadgen.Request("POST", f"/v2/{BENCH_PROJECT}/sessions/{session_id}/action", body)
    result = loadgen.run_python(
        base_url,
        [req] * 1_000_000,
        connections=connections,
        duration=WARMUP_SECONDS,
        headers=freezer.IDENTITY_HEADERS,
    )
    return result.sample.rate


def _rows(ctx: Context, tool: str, system: System, connections: tuple[int, ...]) -> list[Row]:
    """The start row, then the end row, at each number of connections.

    The pool of sessions is sized from a warm-up; the jobs the start row did not reach are
    started afterwards (not measured), so that the end row has every job of the pool to end.
    """
    rows = []
    warm = system.make_sessions(1)[0]
    for conns in connections:
        warm_rate = _warm_up(system.base_url, warm, conns)
        sessions = system.make_sessions(_pool_size(warm_rate, ctx))
        ctx.progress(
            f"http: {system.name} c={conns}: warm-up {fmt_rate(warm_rate)} req/s, "
            f"{len(sessions)} sessions of {SESSION_JOBS} jobs"
        )
        for action in ("start", "end"):
            if action == "end":
                _warm_up(system.base_url, warm, conns)
            items = _action_requests(sessions, action, max(16, conns))
            result = loadgen.run(
                tool,
                system.base_url,
                [request for _, _, request in items],
                connections=conns,
                duration=ctx.duration,
                headers=freezer.IDENTITY_HEADERS,
                workdir=ctx.workdir / "wrk",
            )
            if action == "start" and result.sent < len(items):
                system.top_up(items[result.sent :])
            rows.append(Row(system.name, action, conns, result))
            s = result.sample
            extra = f", {result.wrapped} repeated" if result.wrapped else ""
            bad = f", {result.not_ok} non-2xx, {result.errors} errors"
            if result.first_bad:
                bad += f"; first non-2xx: {result.first_bad[:160]}"
            ctx.progress(
                f"http: {system.name} {action} c={conns}: {fmt_rate(s.rate)} req/s, p50 "
                f"{fmt_ms(s.p50)} ms, p99 {fmt_ms(s.p99)} ms ({s.count} requests{bad}{extra})"
            )
    return rows


def _profile_shim(ctx: Context, tool: str, shim: Shim, system: ShimSystem) -> list[str]:
    """A further start row at 16 connections with py-spy on the shim's processes."""
    warm = system.make_sessions(1)[0]
    sessions = system.make_sessions(_pool_size(_warm_up(shim.base_url, warm, 16), ctx))
    requests = [request for _, _, request in _action_requests(sessions, "start", 16)]
    sampler = profiling.Sampler("shim", shim.worker_pids(), ctx.duration, ctx.workdir / "profiles")
    if not sampler.available:
        return ["py-spy not found: no profile (see benchmarks/profiling.py)"]
    loadgen.run(
        tool,
        shim.base_url,
        requests,
        connections=16,
        duration=ctx.duration,
        headers=freezer.IDENTITY_HEADERS,
        workdir=ctx.workdir / "wrk",
    )
    lines = sampler.finish().lines()
    for line in lines:
        ctx.progress(line)
    return lines


def run(ctx: Context) -> FamilyResult:
    ctx.flush()
    tool = loadgen.choose(ctx.loadgen)
    if tool == "wrk":
        ctx.versions["wrk"] = loadgen.wrk_version()
    ctx.progress(f"http: load generator {tool}")
    connections = CONNECTIONS
    rows: list[Row] = []
    notes: list[str] = []
    profile_lines: list[str] = []

    # The shim.
    shim = Shim(ctx)
    shim.start()
    try:
        shim_system = ShimSystem(ctx, shim)
        rows += _rows(ctx, tool, shim_system, connections)
        rss, nproc = tree_rss(shim.proc.pid) if shim.proc else (0, 0)
        ctx.rss[f"shim (`session-worker web`, {nproc} processes)"] = rss
        if ctx.profile:
            profile_lines = _profile_shim(ctx, tool, shim, shim_system)
    finally:
        shim.stop()

    # freezer-api.
    freezer_versions: dict[str, str] = {}
    if ctx.freezer:
        venv = freezer.ensure_venv(ctx.workdir, ctx.workdir / "freezer-install.log")
        freezer_versions = freezer.versions(venv)
        ctx.versions.update({f"{k} (baseline)": v for k, v in freezer_versions.items()})
        servers: list[tuple[str, tuple[int, ...]]] = [("gunicorn", connections)]
        if not ctx.quick:
            servers.append(("stock", (1,)))
        for server, conns in servers:
            api = freezer.FreezerApi(venv, ctx.workdir / f"freezer-{server}", server=server)
            with api:
                name = "freezer-api" if server == "gunicorn" else "freezer-api (stock server)"
                ctx.progress(f"http: {api.description} up")
                rows += _rows(ctx, tool, FreezerSystem(api, name), conns)
                if server == "gunicorn":
                    rss, nproc = tree_rss(api.pids[0]) if api.pids else (0, 0)
                    ctx.rss[f"freezer-api (gunicorn, {nproc} processes)"] = rss
        notes.append(
            f"freezer-api {freezer_versions.get('freezer-api', '?')} under gunicorn "
            f"{freezer_versions.get('gunicorn', '?')} (2 workers x 8 threads, gthread), SQLite "
            "database, stock oslo.log settings (INFO, one line per request); the stock "
            "server is paste's HTTP/1.0 server (a new connection per request)."
        )
    else:
        notes.append("freezer-api not measured in this run (--freezer to include it).")

    return _result(ctx, tool, rows, notes, profile_lines)


def _result(
    ctx: Context, tool: str, rows: list[Row], notes: list[str], profile_lines: list[str]
) -> FamilyResult:
    table = Table(
        "HTTP path: the shim next to freezer-api 19.0.0 (same requests, same run)",
        ["system", "action", "conns", "req/s", "p50 ms", "p99 ms", "requests", "vs freezer-api"],
    )
    base = {(r.action, r.connections): r for r in rows if r.system == "freezer-api"}
    targets: list[Target] = []
    for row in rows:
        s = row.result.sample
        ref = base.get((row.action, row.connections))
        ratio = s.rate / ref.result.sample.rate if ref and row.system == "shim" else None
        flags = []
        if row.result.not_ok or row.result.errors:
            flags.append(f"{row.result.not_ok} non-2xx, {row.result.errors} errors")
        if row.result.wrapped:
            flags.append(f"{row.result.wrapped} repeated")
        if row.result.other_result:
            flags.append(f"{row.result.other_result} not success")
        count = f"{s.count:,}" + (f" ({'; '.join(flags)})" if flags else "")
        table.add(
            row.system,
            row.action,
            row.connections,
            fmt_rate(s.rate),
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            count,
            fmt_ratio(ratio),
        )
        if row.system == "shim" and row.connections == 16:
            if ref is not None:
                targets.append(
                    Target(
                        f"HTTP {row.action} vs freezer-api (16 conns)",
                        f">= {RATIO_TARGET:g}x",
                        f"{fmt_ratio(ratio)} ({fmt_rate(s.rate)} vs "
                        f"{fmt_rate(ref.result.sample.rate)} req/s)",
                        ratio is not None and ratio >= RATIO_TARGET,
                    )
                )
            targets.append(
                Target(
                    f"HTTP {row.action} p99 (16 conns)",
                    f"<= {P99_TARGET * 1000:g} ms",
                    f"{fmt_ms(s.p99)} ms",
                    s.p99 is not None and s.p99 <= P99_TARGET,
                )
            )
    table.notes += [
        f"Load generator: {tool} (one thread, keep-alive connections, closed loop); rows of "
        f"{ctx.duration:g} s after a {WARMUP_SECONDS:g} s warm-up; loopback only.",
        f"Sessions of {SESSION_JOBS} jobs, hold_off {FAR_HOLD_OFF} s: per session the start "
        "row has 1 new-run start and 7 joining starts, the end row 8 ends (the last completes "
        "the run). Every request is a write in both systems.",
        f"The shim: `session-worker web`, {ctx.settings.http_workers} processes (the "
        "configured `http_workers`), no auth on loopback, a new request id per request.",
        *notes,
    ]
    result = FamilyResult("http", tables=[table], targets=targets)
    result.faults += [
        f"{r.system} {r.action} c={r.connections}: {r.result.not_ok} non-2xx, "
        f"{r.result.errors} errors, {r.result.other_result} not success"
        for r in rows
        if r.result.not_ok or r.result.errors or r.result.other_result
    ]
    if profile_lines:
        result.notes += [
            "Profile of the shim processes during a start row at 16 connections (py-spy, 200 Hz):",
            "",
            "```",
            *profile_lines,
            "```",
        ]
    return result
