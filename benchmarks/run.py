"""``session-worker bench``: run the benchmark families, print the tables, write RESULTS.md.

    session-worker bench --quick          CI smoke: about a second per row, no freezer-api
    session-worker bench --full           every row, freezer-api included (the RESULTS.md run)
    session-worker bench --only http,queue --freezer

Families: ``script`` (the script floor), ``queue`` (through Celery, next to a bare Celery
round trip), ``http`` (the shim, next to freezer-api 19.0.0), ``growth`` (cost and memory
against the number of jobs). Each starts from an empty Redis of its own on a loopback port
(``redis-server`` when installed, else the embedded ``valkey-server``). Every target is
loopback; every row is bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from session_worker.redis_server import ServerKind, ServerProcess, find_server_binary
from session_worker.settings import Settings

from .common import (
    ROOT,
    Context,
    FamilyResult,
    Progress,
    Table,
    machine,
    package_versions,
    server_version,
)

FAMILIES = ("script", "queue", "http", "growth")
QUICK_SECONDS = 1.0
FULL_SECONDS = 4.0
DEFAULT_OUTPUT = ROOT / "benchmarks" / "RESULTS.md"
QUICK_OUTPUT = ROOT / "var" / "bench" / "RESULTS-quick.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-worker bench",
        description="Benchmarks: the script floor, the queue path next to bare Celery, the "
        "HTTP shim next to freezer-api 19.0.0, and growth with the number of jobs.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SECONDS:g} s per row, no freezer-api unless --freezer",
    )
    mode.add_argument(
        "--full", action="store_true", help=f"every row, {FULL_SECONDS:g} s each (the default)"
    )
    parser.add_argument(
        "--only",
        default=",".join(FAMILIES),
        help=f"comma-separated families to run (default: all of {', '.join(FAMILIES)})",
    )
    freezer = parser.add_mutually_exclusive_group()
    freezer.add_argument(
        "--freezer", dest="freezer", action="store_true", default=None, help="include freezer-api"
    )
    freezer.add_argument("--no-freezer", dest="freezer", action="store_false")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per measured row (overrides mode)"
    )
    parser.add_argument(
        "--server",
        choices=["redis", "valkey"],
        default=None,
        help="Redis server to start (default: redis-server when installed, else valkey)",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="HTTP load generator: wrk when installed (auto), or the asyncio one",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the shim and worker processes with py-spy during the busiest rows",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"Markdown report (default: {DEFAULT_OUTPUT.relative_to(ROOT)} for --full, "
        f"{QUICK_OUTPUT.relative_to(ROOT)} for --quick)",
    )
    return parser


def _family_runner(name: str) -> Callable[[Context], FamilyResult]:
    if name == "script":
        from . import script_floor

        return script_floor.run
    if name == "queue":
        from . import queue_path

        return queue_path.run
    if name == "http":
        from . import http_path

        return http_path.run
    from . import growth

    return growth.run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    quick = bool(args.quick)
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"bench: unknown families: {', '.join(unknown)}", file=sys.stderr)
        return 2
    seconds = args.seconds or (QUICK_SECONDS if quick else FULL_SECONDS)
    freezer = (not quick) if args.freezer is None else args.freezer
    output = args.output or (QUICK_OUTPUT if quick else DEFAULT_OUTPUT)
    kind: ServerKind = args.server or ("redis" if find_server_binary("redis") else "valkey")
    workdir = ROOT / "var" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    command = "session-worker bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    progress = Progress()
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    progress(
        f"bench: {'quick' if quick else 'full'} run, {seconds:g} s per row, families "
        f"{', '.join(families)}; load average {load_before[0]:.2f}"
    )
    results: list[FamilyResult] = []
    failures: list[str] = []
    server_dir = workdir / "redis"
    shutil.rmtree(server_dir, ignore_errors=True)
    with ServerProcess(kind, server_dir) as server:
        settings = Settings(redis_url=server.url)
        ctx = Context(
            quick=quick,
            duration=seconds,
            redis_url=server.url,
            settings=settings,
            workdir=workdir,
            progress=progress,
            loadgen=args.loadgen,
            freezer=freezer,
            profile=args.profile,
        )
        client = ctx.redis()
        redis_version = server_version(client)
        client.close()
        progress(f"bench: {redis_version} on {server.url}")
        for name in FAMILIES:
            if name not in families:
                continue
            began = time.monotonic()
            try:
                result = _family_runner(name)(ctx)
                results.append(result)
                failures.extend(f"{name}: {fault}" for fault in result.faults)
            except Exception as exc:
                traceback.print_exc()
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                progress(f"bench: {name} failed: {exc}")
            progress(f"bench: {name} done in {time.monotonic() - began:.1f} s")
    load_after = os.getloadavg()
    versions = {**package_versions(), "server": redis_version, **ctx.versions}
    report = _report(
        results,
        failures,
        command=command,
        started=started,
        seconds=seconds,
        versions=versions,
        load=(load_before, load_after),
        quick=quick,
    )
    for result in results:
        for table in result.tables:
            print()
            print(table.text())
            for note in table.notes:
                print(f"  - {note}")
    print()
    print(_targets_table(results).text())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report + _kept_section(output))
    progress(f"bench: wrote {output}")
    return 1 if failures else 0


KEPT_HEADING = "## Before and after"


def _kept_section(output: Path) -> str:
    """The hand-written "Before and after" section of the existing report, if any: a run
    rewrites the measured tables and keeps the history of what changed them."""
    try:
        old = output.read_text()
    except OSError:
        return ""
    at = old.find(KEPT_HEADING)
    return "" if at < 0 else "\n" + old[at:]


def _targets_table(results: list[FamilyResult]) -> Table:
    table = Table("Targets", ["target", "goal", "measured", "met"])
    for result in results:
        for target in result.targets:
            met = {True: "yes", False: "**no**", None: "-"}[target.met]
            table.add(target.name, target.goal, target.measured, met)
    return table


def _report(
    results: list[FamilyResult],
    failures: list[str],
    *,
    command: str,
    started: dt.datetime,
    seconds: float,
    versions: dict[str, str],
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    quick: bool,
) -> str:
    box = machine()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {started.strftime('%Y-%m-%d %H:%M UTC')} "
        f"({'quick' if quick else 'full'} run, {seconds:g} s per measured row).",
        "",
        "## Machine and versions",
        "",
        f"- Machine: {box['cpu']}, {box['cores']} cores, {box['ram']} RAM; {box['os']}",
        f"- Load average (1 min) before / after the run: {load[0][0]:.2f} / {load[1][0]:.2f}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    targets = _targets_table(results)
    if targets.rows:
        lines += ["## Targets", "", targets.markdown().split("\n", 2)[2], ""]
    for result in results:
        for table in result.tables:
            lines += [table.markdown(), ""]
        lines += [*result.notes, ""] if result.notes else []
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["FAMILIES", "build_parser", "main"]
