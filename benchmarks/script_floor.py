"""Family 1, the script floor: start.lua and end.lua called straight, next to HINCRBY.

The workload is what a session's round looks like: sessions of 8 jobs; per round, the first
job's start opens a new run and the 7 others join it, then all 8 end and the last end
completes the run. Calls go by EVALSHA with the KEYS/ARGV layout of ``lua/_prelude.lua``
(built by the Store's KeyBuilder), no reply push (as the HTTP shim calls them), a fresh
request id per call (so every call also stores its request record), and the Store's clock
override, so that each round starts a new run without waiting for the clock.

Sequential: one call per round trip. Pipelined: ``PIPELINE_DEPTH`` calls per round trip.
HINCRBY runs on the same client in the same two styles. "server µs" is Redis's own time per
call (``INFO commandstats``), i.e. the script without the network and the client.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from redis import Redis

from session_worker.keys import events_channel
from session_worker.models import scalar_defaults
from session_worker.settings import Settings
from session_worker.store import Store

from .common import (
    BENCH_PROJECT,
    SESSION_JOBS,
    Context,
    FamilyResult,
    Sample,
    Table,
    Target,
    fmt_rate,
    fmt_ratio,
    fmt_us,
)

SESSIONS = 64
PIPELINE_DEPTH = 128
PIPELINED_TARGET = 40_000  # commands/s, the target for pipelined scripts
_FINGERPRINT = "0" * 40


class ScriptCaller:
    """EVALSHA of the session scripts with the Store's KEYS/ARGV layout, minus the Store.

    `clock` gives ARGV[7]: the Store's clock override (an int), or "" for the server's TIME.
    """

    def __init__(
        self, store: Store, project_id: str, clock: Callable[[], int | str] = lambda: ""
    ) -> None:
        self.store = store
        self.project_id = project_id
        self.clock = clock
        self.sha = {name: store.scripts[name].sha for name in ("start", "end", "create")}
        self._static: dict[str, tuple[list[str], str]] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = 0

    def load(self, client: Redis) -> None:
        """Make sure the scripts are on the server (EVALSHA does not load them)."""
        for name in self.sha:
            client.script_load(self.store.scripts[name].script)

    def _keys(self, session_id: str, request_id: str) -> list[str]:
        static = self._static.get(session_id)
        if static is None:
            keys = list(self.store.keys.session(self.project_id, session_id))
            # All but the two keys of the request itself (its record and its reply list).
            static = (keys[:-2], events_channel(self.project_id, session_id))
            self._static[session_id] = static
        return [
            *static[0],
            self.store.keys.request(self.project_id, session_id, request_id),
            self.store.keys.reply(self.project_id, session_id, request_id),
        ]

    def command(self, script: str, session_id: str, args: list[Any]) -> tuple[Any, ...]:
        """The EVALSHA arguments of one call."""
        self._counter += 1
        request_id = f"{self._prefix}{self._counter}"
        settings = self.store.settings
        keys = self._keys(session_id, request_id)
        argv = [
            request_id,
            _FINGERPRINT,
            settings.request_ttl,
            0,  # no reply push: the caller reads the return value
            self._static[session_id][1],
            settings.history_limit,
            self.clock(),
            self.project_id,
            session_id,
            *args,
        ]
        return (self.sha[script], len(keys), *keys, *argv)


def bulk_sessions(
    client: Redis,
    settings: Settings,
    prefix: str,
    count: int,
    *,
    hold_off: int,
    clock: Callable[[], int | str] = lambda: "",
) -> list[str]:
    """`count` sessions of SESSION_JOBS jobs (``<session>-j<k>``) made by create.lua.

    The scripts are called directly and pipelined, as the Store would call them for a
    create, but without the Store's steps outside the session (job records, project index):
    start and end never read those, and setup stays fast.
    """
    caller = ScriptCaller(Store(client, settings), BENCH_PROJECT, clock)
    caller.load(client)
    scalars = orjson.dumps({**scalar_defaults(hold_off), "hold_off": hold_off}).decode()
    ids = [f"{prefix}{i}" for i in range(count)]
    commands = []
    for session_id in ids:
        jobs = orjson.dumps({f"{session_id}-j{k}": {} for k in range(SESSION_JOBS)}).decode()
        commands.append(caller.command("create", session_id, [scalars, "{}", jobs]))
    for raw in pipelined(client, commands, PIPELINE_DEPTH):
        if b'"ok":true' not in raw or b'"repeated"' in raw:
            raise RuntimeError(f"create.lua refused a benchmark session: {raw!r}")
    return ids


def _server_us(client: Redis, command: str) -> float | None:
    stats: dict[str, Any] = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return float(entry["usec_per_call"]) if entry else None


class _Rounds:
    """Rounds of start (1 new run + 7 joins per session) and end calls over the sessions."""

    def __init__(self, caller: ScriptCaller, sessions: list[str], clock_box: list[int]) -> None:
        self.caller = caller
        self.sessions = sessions
        self.clock_box = clock_box
        self.round = 0
        self.unexpected = 0

    def next_round(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        self.round += 1
        self.clock_box[0] += 1
        tag = self.round
        starts, ends = [], []
        for session_id in self.sessions:
            for k in range(SESSION_JOBS):
                job = f"{session_id}-j{k}"
                starts.append(self.caller.command("start", session_id, [job, tag - 1]))
                ends.append(self.caller.command("end", session_id, [job, tag, "success"]))
        return starts, ends

    def check(self, replies: list[Any]) -> None:
        for raw in replies:
            # (A fresh request answered as a repeat would mean a broken benchmark.)
            if b'"result":"success"' not in raw or b'"repeated"' in raw:
                self.unexpected += 1


def _run_sequential(client: Redis, rounds: _Rounds, duration: float) -> tuple[Sample, Sample]:
    start_n = end_n = 0
    start_t = end_t = 0.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        starts, ends = rounds.next_round()
        began = time.perf_counter()
        replies = [client.evalsha(*cmd) for cmd in starts]
        start_t += time.perf_counter() - began
        rounds.check(replies)
        began = time.perf_counter()
        replies = [client.evalsha(*cmd) for cmd in ends]
        end_t += time.perf_counter() - began
        rounds.check(replies)
        start_n += len(starts)
        end_n += len(ends)
    return Sample(start_n, start_t), Sample(end_n, end_t)


def pipelined(client: Redis, commands: list[tuple[Any, ...]], depth: int) -> list[Any]:
    replies: list[Any] = []
    for i in range(0, len(commands), depth):
        pipe = client.pipeline(transaction=False)
        for cmd in commands[i : i + depth]:
            pipe.evalsha(*cmd)
        replies += pipe.execute()
    return replies


def _runpipelined(client: Redis, rounds: _Rounds, duration: float) -> tuple[Sample, Sample]:
    start_n = end_n = 0
    start_t = end_t = 0.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        starts, ends = rounds.next_round()
        began = time.perf_counter()
        replies = pipelined(client, starts, PIPELINE_DEPTH)
        start_t += time.perf_counter() - began
        rounds.check(replies)
        began = time.perf_counter()
        replies = pipelined(client, ends, PIPELINE_DEPTH)
        end_t += time.perf_counter() - began
        rounds.check(replies)
        start_n += len(starts)
        end_n += len(ends)
    return Sample(start_n, start_t), Sample(end_n, end_t)


def _packed(client: Redis, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """The RESP bytes of each PIPELINE_DEPTH commands, packed before any clock runs."""
    conn = client.connection_pool.get_connection()
    try:
        chunks = [
            [("EVALSHA", *cmd) for cmd in commands[i : i + PIPELINE_DEPTH]]
            for i in range(0, len(commands), PIPELINE_DEPTH)
        ]
        return [b"".join(conn.pack_commands(chunk)) for chunk in chunks]  # type: ignore[no-untyped-call]
    finally:
        client.connection_pool.release(conn)


def _send_packed(client: Redis, chunks: list[bytes], count: int) -> list[Any]:
    conn = client.connection_pool.get_connection()
    replies: list[Any] = []
    try:
        left = count
        for chunk in chunks:
            n = min(PIPELINE_DEPTH, left)
            conn.send_packed_command([chunk])  # type: ignore[no-untyped-call]
            replies += [conn.read_response() for _ in range(n)]
            left -= n
    finally:
        client.connection_pool.release(conn)
    return replies


def _run_preencoded(client: Redis, rounds: _Rounds, duration: float) -> tuple[Sample, Sample]:
    """Pipelined as above, but every command packed into RESP before the clock starts: what
    Redis sustains running the scripts, without redis-py's cost of building commands."""
    start_n = end_n = 0
    start_t = end_t = 0.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        starts, ends = rounds.next_round()
        packed_starts, packed_ends = _packed(client, starts), _packed(client, ends)
        began = time.perf_counter()
        replies = _send_packed(client, packed_starts, len(starts))
        start_t += time.perf_counter() - began
        rounds.check(replies)
        began = time.perf_counter()
        replies = _send_packed(client, packed_ends, len(ends))
        end_t += time.perf_counter() - began
        rounds.check(replies)
        start_n += len(starts)
        end_n += len(ends)
    return Sample(start_n, start_t), Sample(end_n, end_t)


def _hincrby(client: Redis, duration: float, depth: int | None) -> Sample:
    key = "sw:{bench:hincrby}:h"
    count = 0
    elapsed = 0.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        began = time.perf_counter()
        if depth is None:
            for i in range(1024):
                client.hincrby(key, f"f{i % 64}", 1)
        else:
            for _ in range(1024 // depth or 1):
                pipe = client.pipeline(transaction=False)
                for i in range(depth):
                    pipe.hincrby(key, f"f{i % 64}", 1)
                pipe.execute()
        elapsed += time.perf_counter() - began
        count += 1024 if depth is None else (1024 // depth or 1) * depth
    return Sample(count, elapsed)


def run(ctx: Context) -> FamilyResult:
    ctx.flush()
    client = ctx.redis()
    clock_box = [int(time.time())]
    sessions = bulk_sessions(
        client, ctx.settings, "floor", SESSIONS, hold_off=0, clock=lambda: clock_box[0]
    )
    caller = ScriptCaller(Store(client, ctx.settings), BENCH_PROJECT, lambda: clock_box[0])
    rounds = _Rounds(caller, sessions, clock_box)
    starts, ends = rounds.next_round()  # warm-up round
    rounds.check([client.evalsha(*cmd) for cmd in [*starts, *ends]])

    results: dict[str, tuple[Sample, float | None]] = {}

    def measure(name: str, fn: Callable[[], Sample], command: str) -> None:
        client.config_resetstat()
        sample = fn()
        results[name] = (sample, _server_us(client, command))
        ctx.progress(f"script floor: {name}: {fmt_rate(sample.rate)} commands/s")

    Runner = Callable[[Redis, _Rounds, float], tuple[Sample, Sample]]

    def measure_scripts(style: str, runner: Runner) -> float | None:
        """Rows "start <style>" and "end <style>"; Redis's µs per EVALSHA over both."""
        client.config_resetstat()
        start, end = runner(client, rounds, ctx.duration)
        results[f"start {style}"] = (start, None)
        results[f"end {style}"] = (end, None)
        ctx.progress(
            f"script floor: start/end {style}: {fmt_rate(start.rate)} / "
            f"{fmt_rate(end.rate)} commands/s"
        )
        return _server_us(client, "evalsha")

    measure("HINCRBY sequential", lambda: _hincrby(client, ctx.duration, None), "hincrby")
    seq_server = measure_scripts("sequential", _run_sequential)
    measure("HINCRBY pipelined", lambda: _hincrby(client, ctx.duration, PIPELINE_DEPTH), "hincrby")
    pip_server = measure_scripts("pipelined", _runpipelined)
    pre_server = measure_scripts("pre-encoded", _run_preencoded)

    # Server time per call of start and end separately, measured on one more round each.
    per_script = _server_split(client, rounds)

    table = Table(
        "Script floor: start.lua / end.lua against HINCRBY (same server, same client)",
        ["command", "style", "commands/s", "µs/call (client)", "server µs/call", "vs HINCRBY"],
    )
    base = {
        "sequential": results["HINCRBY sequential"][0].rate,
        "pipelined": results["HINCRBY pipelined"][0].rate,
        "pre-encoded": results["HINCRBY pipelined"][0].rate,
    }
    styles = {
        "sequential": "sequential",
        "pipelined": f"pipelined ({PIPELINE_DEPTH})",
        "pre-encoded": f"pipelined ({PIPELINE_DEPTH}), pre-encoded",
    }
    for name in (
        "HINCRBY sequential",
        "start sequential",
        "end sequential",
        "HINCRBY pipelined",
        "start pipelined",
        "end pipelined",
        "start pre-encoded",
        "end pre-encoded",
    ):
        sample, server_us = results[name]
        command, style = name.split(" ")
        if command != "HINCRBY":
            server_us = per_script.get(command)
        ratio = sample.rate / base[style] if base[style] else None
        table.add(
            f"{command}.lua" if command != "HINCRBY" else command,
            styles[style],
            fmt_rate(sample.rate),
            fmt_us(sample.us_per_op),
            fmt_us(server_us),
            fmt_ratio(ratio),
        )
    table.notes += [
        f"Workload: {SESSIONS} sessions x {SESSION_JOBS} jobs; per round each session gets "
        f"1 new-run start + {SESSION_JOBS - 1} joining starts, then {SESSION_JOBS} ends "
        "(the last one completes the run). Every call stores its request record.",
        f"{rounds.round} rounds, {rounds.unexpected} replies other than success.",
        "server µs/call: Redis `INFO commandstats` (usec_per_call), measured on a separate "
        "round per script; EVALSHA over both scripts averaged "
        f"{fmt_us(seq_server)} µs (sequential rows), {fmt_us(pip_server)} µs "
        f"(pipelined rows) and {fmt_us(pre_server)} µs (pre-encoded rows).",
        "pre-encoded: the same pipelines with every command packed into RESP before the "
        "clock starts (redis-py, one connection): the rate Redis sustains running the "
        "scripts. The plain pipelined rows also pay redis-py's cost of building each "
        "19-argument EVALSHA in Python, which is then the limit.",
    ]
    slowest = min(results["start pre-encoded"][0].rate, results["end pre-encoded"][0].rate)
    target = Target(
        "Pipelined scripts (pre-encoded)",
        f">= {fmt_rate(PIPELINED_TARGET)} commands/s",
        f"start {fmt_rate(results['start pre-encoded'][0].rate)}, "
        f"end {fmt_rate(results['end pre-encoded'][0].rate)} commands/s "
        f"(redis-py pipelines: {fmt_rate(results['start pipelined'][0].rate)}, "
        f"{fmt_rate(results['end pipelined'][0].rate)})",
        slowest >= PIPELINED_TARGET,
    )
    client.close()
    result = FamilyResult("script", tables=[table], targets=[target])
    if rounds.unexpected:
        result.faults.append(f"{rounds.unexpected} replies other than success")
    return result


def _server_split(client: Redis, rounds: _Rounds) -> dict[str, float | None]:
    starts, ends = rounds.next_round()
    found: dict[str, float | None] = {}
    for name, commands in (("start", starts), ("end", ends)):
        client.config_resetstat()
        rounds.check(pipelined(client, commands, PIPELINE_DEPTH))
        found[name] = _server_us(client, "evalsha")
    return found
