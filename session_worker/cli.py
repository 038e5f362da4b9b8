"""The ``session-worker`` command: run the stack, and act as a node from a shell.

    session-worker up [--workers N] [--port P] [--host H] [--no-web]   everything, foreground
    session-worker worker [celery worker options]                      one Celery worker
    session-worker web [--host H] [--port P] [--workers N]             the HTTP shim
    session-worker sweep [--interval S]                                the run-deadline sweep
    session-worker simulate [--nodes N --sessions S --rounds R ...]    a fleet of nodes
                            [--via queue|http|mixed] [--http URL ...]   (through shims too)
    session-worker bench [--quick | --full] [--only FAMILIES]          the benchmarks
    session-worker create | show | list | add-job | remove-job | start | end | runs | delete

Where the Redis is, for every command (first found wins):

1. ``SESSION_WORKER_REDIS_URL`` in the environment;
2. the file ``<data_dir>/redis-url`` (``SESSION_WORKER_DATA_DIR``, default ``var``), written
   by ``session-worker up`` while it runs its embedded server, so a second terminal in the
   same directory needs no setting;
3. ``redis://127.0.0.1:6379/0``.

Node commands go through the queue exactly as a node's would (SessionClient) and wait for
the reply. Exit status: 0 on an ok reply, 2 on an error reply (not found, bad request, ...),
1 when no reply came in time or Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, NoReturn

import orjson
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from redis.exceptions import RedisError

from .connection import DEFAULT_URL
from .errors import ReplyTimeout, SessionWorkerError
from .models import Reply
from .settings import Settings
from .stack import PARENT_PID_ENV, ensure_multiprocess_dir, mask_url, redis_url_file

EXIT_OK = 0
EXIT_NO_REPLY = 1  # timeout, Redis unreachable, simulate invariant failed
EXIT_ERROR_REPLY = 2  # the command was answered with an error
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (128 + SIGPIPE, as a shell reports it)

URL_ENV = "SESSION_WORKER_REDIS_URL"
METRICS_PORT_ENV = "SESSION_WORKER_METRICS_PORT"
TOKEN_ENV = "SESSION_WORKER_TOKEN"  # the X-Auth-Token `simulate` sends to shims


# Settings and the Redis URL ----------------------------------------------------------------


def resolve_redis_url(settings: Settings) -> tuple[str, str]:
    """The Redis URL to use and where it came from (see the module docstring)."""
    if settings.redis_url:
        return settings.redis_url, URL_ENV
    path = redis_url_file(settings)
    try:
        url = path.read_text().strip()
    except OSError:
        url = ""
    if url:
        return url, str(path)
    return DEFAULT_URL, f"the default: no {URL_ENV}, and no {path} (no `session-worker up` here)"


def load_settings(**overrides: Any) -> tuple[Settings, str]:
    """Settings from the environment with the Redis URL resolved; also its source."""
    settings = Settings()
    url, source = resolve_redis_url(settings)
    return settings.model_copy(update={"redis_url": url, **overrides}), source


def _configure_logging(level: int = logging.INFO) -> None:
    """Root logging in SESSION_WORKER_LOG_FORMAT / _LOG_LEVEL (logs.py)."""
    from .logs import configure

    configure(level)


def _follow_parent() -> None:
    """Under ``up``: exit with the supervisor even if it is killed outright (Linux only)."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(parent):
        sys.exit("session-worker: the supervisor is gone")


# Output ------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, a header line first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _when(value: object) -> str:
    """An epoch time (seconds) as UTC ISO-8601; -1 / missing as "-"."""
    if not isinstance(value, int) or value < 0:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _print_json(value: Any) -> None:
    print(_dumps(value))


def _fail(message: str, code: int) -> int:
    print(f"session-worker: {message}", file=sys.stderr)
    return code


# Node commands ------------------------------------------------------------------------------


def _reply_lines(reply: Reply) -> list[str]:
    fields = reply.model_dump(exclude_none=True, exclude={"ok", "error"})
    return [
        format_table(["field", "value"], [[k, _compact(v)] for k, v in fields.items()]),
    ]


def _compact(value: Any) -> str:
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _finish(args: argparse.Namespace, reply: Reply, headline: str) -> int:
    """Print a command's reply; the exit status for it."""
    if args.json:
        _print_json(reply.model_dump(exclude_none=True))
    if not reply.ok:
        error = reply.error
        what = f"{error.code}: {error.description}" if error else "error reply"
        return _fail(what, EXIT_ERROR_REPLY)
    if not args.json:
        print(headline)
        print("\n".join(_reply_lines(reply)))
    return EXIT_OK


def _cmd_create(args: argparse.Namespace, client: Any) -> int:
    document: dict[str, Any] = {}
    if args.hold_off is not None:
        document["hold_off"] = args.hold_off
    if args.run_timeout is not None:
        document["run_timeout"] = args.run_timeout
    if args.description is not None:
        document["description"] = args.description
    if args.job:
        document["jobs"] = {job: {} for job in args.job}
    reply = client.create(document, session_id=args.session_id, timeout=args.timeout)
    return _finish(args, reply, f"created session {reply.session_id}")


def _cmd_add_job(args: argparse.Namespace, client: Any) -> int:
    reply = client.add_job(args.session, args.job, args.client_id, timeout=args.timeout)
    verb = "added to" if reply.added is not False else "already in"
    return _finish(args, reply, f"job {args.job} {verb} session {args.session}")


def _cmd_remove_job(args: argparse.Namespace, client: Any) -> int:
    reply = client.remove_job(args.session, args.job, timeout=args.timeout)
    verb = "removed from" if reply.removed is not False else "was not in"
    return _finish(args, reply, f"job {args.job} {verb} session {args.session}")


def _cmd_start(args: argparse.Namespace, client: Any) -> int:
    reply = client.start(args.session, args.job, args.tag, timeout=args.timeout)
    headline = f"start {args.session} {args.job}: {reply.result} (session_tag {reply.session_tag})"
    return _finish(args, reply, headline)


def _cmd_end(args: argparse.Namespace, client: Any) -> int:
    reply = client.end(args.session, args.job, args.result, args.tag, timeout=args.timeout)
    headline = (
        f"end {args.session} {args.job} ({args.result}): {reply.result} "
        f"(session_tag {reply.session_tag})"
    )
    return _finish(args, reply, headline)


def _cmd_delete(args: argparse.Namespace, client: Any) -> int:
    reply = client.delete(args.session, timeout=args.timeout)
    return _finish(args, reply, f"deleted session {args.session}")


def _not_found(args: argparse.Namespace, session_id: str) -> int:
    description = f"session {session_id} does not exist in project {args.project}"
    if args.json:
        _print_json({"ok": False, "error": {"code": "not_found", "description": description}})
    return _fail(f"not_found: {description}", EXIT_ERROR_REPLY)


def _cmd_show(args: argparse.Namespace, client: Any) -> int:
    doc = client.get(args.session)
    if doc is None:
        return _not_found(args, args.session)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    rows: list[list[object]] = [
        ["session_id", doc.get("session_id", args.session)],
        ["project_id", doc.get("project_id", args.project)],
        ["description", doc.get("description") or "-"],
        ["user_id", doc.get("user_id") or "-"],
        ["session_tag", doc.get("session_tag")],
        ["status", doc.get("status") or "-"],
        ["result", doc.get("result") or "-"],
        ["hold_off", f"{doc.get('hold_off')} s"],
        ["run_timeout", f"{doc.get('run_timeout')} s" if doc.get("run_timeout") else "none"],
        ["time_start", _when(doc.get("time_start"))],
        ["time_end", _when(doc.get("time_end"))],
        ["time_started", _when(doc.get("time_started"))],
        ["time_ended", _when(doc.get("time_ended"))],
        ["schedule", _compact(doc.get("schedule") or {})],
        ["_version", doc.get("_version")],
    ]
    print(format_table(["field", "value"], rows))
    jobs = doc.get("jobs") or {}
    print()
    if not jobs:
        print("no jobs")
        return EXIT_OK
    job_rows = [
        [
            job_id,
            entry.get("client_id") or "-",
            entry.get("status") or "-",
            entry.get("result") or "-",
            _when(entry.get("time_started")),
            _when(entry.get("time_ended")),
            {True: "yes", False: "no"}.get(entry.get("member"), "-"),
        ]
        for job_id, entry in sorted(jobs.items())
    ]
    headers = ["job", "client", "status", "result", "started", "ended", "member"]
    print(format_table(headers, job_rows))
    return EXIT_OK


def _cmd_runs(args: argparse.Namespace, client: Any) -> int:
    runs = client.runs(args.session, args.tag)
    if runs is None:
        return _not_found(args, args.session)
    if args.tag is not None and not runs:
        description = f"session {args.session} has no run {args.tag} in its history"
        if args.json:
            _print_json({"ok": False, "error": {"code": "not_found", "description": description}})
        return _fail(f"not_found: {description}", EXIT_ERROR_REPLY)
    if args.json:
        _print_json({"runs": runs})
        return EXIT_OK
    if not runs:
        print(f"session {args.session} has not run yet")
        return EXIT_OK
    rows = []
    for run in runs:
        jobs = run.get("jobs") or {}
        summary = " ".join(
            f"{job_id}={entry.get('result') or entry.get('status')}"
            for job_id, entry in sorted(jobs.items())
        )
        rows.append(
            [
                run.get("session_tag"),
                run.get("status") or "-",
                run.get("result") or "-",
                run.get("closed") or "-",
                _when(run.get("time_start")),
                _when(run.get("time_end")),
                summary or "-",
            ]
        )
    headers = ["tag", "status", "result", "closed", "time_start", "time_end", "jobs"]
    print(format_table(headers, rows))
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, client: Any) -> int:
    sessions = client.list(args.limit, args.offset, args.match or None, args.match_not or None)
    if args.json:
        _print_json({"sessions": sessions})
        return EXIT_OK
    if not sessions:
        print(f"no sessions in project {args.project}")
        return EXIT_OK
    rows = [
        [
            doc.get("session_id"),
            doc.get("session_tag"),
            doc.get("status") or "-",
            doc.get("result") or "-",
            len(doc.get("jobs") or {}),
            doc.get("hold_off"),
            doc.get("description") or "",
        ]
        for doc in sessions
    ]
    headers = ["session", "tag", "status", "result", "jobs", "hold_off", "description"]
    print(format_table(headers, rows))
    return EXIT_OK


NODE_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "create": _cmd_create,
    "show": _cmd_show,
    "list": _cmd_list,
    "add-job": _cmd_add_job,
    "remove-job": _cmd_remove_job,
    "start": _cmd_start,
    "end": _cmd_end,
    "runs": _cmd_runs,
    "delete": _cmd_delete,
}


def _run_node_command(args: argparse.Namespace) -> int:
    from .client import SessionClient

    settings, source = load_settings()
    url = settings.redis_url or DEFAULT_URL
    timeout = settings.reply_timeout if args.timeout is None else args.timeout
    args.timeout = timeout
    try:
        client = SessionClient(url, project_id=args.project, settings=settings, timeout=timeout)
    except SessionWorkerError as exc:
        return _fail(f"{exc.code}: {exc.description}", EXIT_ERROR_REPLY)
    try:
        return NODE_COMMANDS[args.command](args, client)
    except ReplyTimeout:
        return _fail(
            f"no reply in {timeout:g} s: are workers running? `session-worker up` "
            f"(Redis {mask_url(url)}, from {source})",
            EXIT_NO_REPLY,
        )
    except SessionWorkerError as exc:
        return _fail(f"{exc.code}: {exc.description}", EXIT_ERROR_REPLY)
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): not a Redis problem.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (RedisError, OSError, KombuOperationalError) as exc:
        # (KombuOperationalError: the command could not be put on the queue.)
        hint = "start the stack with `session-worker up` or set " + URL_ENV
        return _fail(
            f"cannot reach Redis at {mask_url(url)} (from {source}): {exc}; {hint}", EXIT_NO_REPLY
        )
    finally:
        client.close()


# Process commands ---------------------------------------------------------------------------


def worker_argv(settings: Settings, extra: Sequence[str] = ()) -> list[str]:
    """The Celery worker command line (options in `extra` override the defaults).

    One command at a time in the worker's own process (the solo pool): a command is a few
    milliseconds of CPU, and handing each one to a prefork pool process and its result back
    cost more than the command itself (the solo pool served about 1.6x the commands per
    second of a one-process prefork pool here, benchmarks/RESULTS.md). A warm stop waits for
    the command at hand only. Scale with more workers; ``--pool prefork -c N`` still works.
    """
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "session_worker.celery_app",
        "worker",
        "--pool",
        "solo",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "-Q",
        settings.queue,
        "--loglevel",
        "INFO",
        *extra,
    ]


def _cmd_worker(args: argparse.Namespace, extra: Sequence[str]) -> NoReturn:
    settings, _ = load_settings()
    _follow_parent()
    env = dict(os.environ)
    env[URL_ENV] = settings.redis_url or DEFAULT_URL
    # The pool's processes write their metrics to one directory; the worker's main process
    # serves them on --metrics-port (celery_app.py), or `up`'s shim adds them to its own.
    ensure_multiprocess_dir(env)
    if args.metrics_port is not None:
        env[METRICS_PORT_ENV] = str(args.metrics_port)
    argv = worker_argv(settings, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _cmd_web(args: argparse.Namespace) -> int:
    ensure_multiprocess_dir()  # before the shim (and prometheus-client) is imported
    from .api import serve
    from .metrics import remove_owned_dir

    _configure_logging()
    overrides: dict[str, Any] = {}
    if args.insecure_no_auth:
        overrides["insecure_no_auth"] = True
    settings, _ = load_settings(**overrides)
    _follow_parent()
    try:
        serve(settings, args.host, args.port, args.workers)
    finally:
        remove_owned_dir()
    return EXIT_OK


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _cmd_sweep(args: argparse.Namespace) -> int:
    ensure_multiprocess_dir()  # before prometheus-client is imported
    from .metrics import remove_owned_dir, serve_metrics
    from .sweep import run_sweep

    _configure_logging()
    overrides = {} if args.metrics_port is None else {"metrics_port": args.metrics_port}
    settings, _ = load_settings(**overrides)
    _follow_parent()
    try:
        if settings.metrics_port:
            serve_metrics(settings.metrics_port)
        run_sweep(settings, interval=args.interval, stop=_stop_on_signals())
    finally:
        remove_owned_dir()
    return EXIT_OK


def _cmd_up(args: argparse.Namespace) -> int:
    from .stack import Stack, shim_available

    settings = Settings()  # no URL lookup: without one in the environment, `up` starts its own
    web = not args.no_web
    if web and not shim_available():
        print(
            "up: the HTTP shim (session_worker.api) is not installed; running without it",
            file=sys.stderr,
        )
        web = False
    stack = Stack(
        settings,
        workers=args.workers,
        host=args.host or settings.http_host,
        port=settings.http_port if args.port is None else args.port,
        web=web,
        stop_timeout=args.stop_timeout,
    )
    return stack.run()


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import SimConfig, SimulationError, format_report, run_simulation

    settings, source = load_settings()
    timeout = settings.reply_timeout if args.timeout is None else args.timeout
    seed = random.randrange(1_000_000) if args.seed is None else args.seed
    via = args.via or ("http" if args.http else "queue")
    http_urls = list(args.http or [])
    if via != "queue" and not http_urls:  # the shim `up` runs
        http_urls = [f"http://{settings.http_host}:{settings.http_port}"]
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        cfg = SimConfig(
            nodes=args.nodes,
            sessions=args.sessions,
            rounds=args.rounds,
            fail_share=args.fail_share,
            hold_off=args.hold_off,
            seed=seed,
            project_id=args.project,
            timeout=timeout,
            via=via,
            http_urls=tuple(http_urls),
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_ERROR_REPLY)
    url = mask_url(settings.redis_url or DEFAULT_URL)
    print(f"simulate: Redis {url} (from {source})", file=sys.stderr)
    try:
        result = run_simulation(cfg, settings, progress=sys.stderr, token=token)
    except SimulationError as exc:
        return _fail(f"simulate: {exc}", EXIT_NO_REPLY)
    except (RedisError, OSError) as exc:
        return _fail(f"simulate: cannot reach Redis at {url} (from {source}): {exc}", EXIT_NO_REPLY)
    if args.json:
        _print_json(result.as_json())
    else:
        print(format_report(result))
    if not result.ok:
        names = ", ".join(sorted({v.invariant for v in result.violations}))
        return _fail(f"simulate: invariants failed: {names}", EXIT_NO_REPLY)
    return EXIT_OK


# Argument parsing ----------------------------------------------------------------------------


def _match(text: str) -> dict[str, Any]:
    """FIELD=VALUE; VALUE is JSON when it parses (3, true, "x"), else the text itself."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return {name: value}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="session-worker",
        description="Atomic coordination of backup sessions over Redis (queue, workers, shim).",
        epilog=(
            f"Redis: ${URL_ENV}, else the URL `up` wrote to <data_dir>/redis-url "
            f"({redis_url_file(defaults)}), else {DEFAULT_URL}."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--project",
        default=defaults.default_project,
        help="project (tenant) of the sessions (default: %(default)s)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for each reply (default: {defaults.reply_timeout:g})",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")

    up = commands.add_parser("up", help="the whole stack in the foreground (Ctrl-C stops it)")
    up.add_argument("--workers", type=_positive_int, default=2, help="worker processes (2)")
    up.add_argument("--host", default=None, help=f"shim address ({defaults.http_host})")
    up.add_argument("--port", type=int, default=None, help=f"shim port ({defaults.http_port})")
    up.add_argument("--no-web", action="store_true", help="do not start the HTTP shim")
    up.add_argument(
        "--stop-timeout",
        type=float,
        default=10.0,
        help="seconds a child may take to stop before it is killed (10)",
    )

    worker = commands.add_parser(
        "worker",
        help="one Celery worker on the queue (other options go to `celery worker`)",
        description="One Celery worker consuming the command queue. Options not listed here "
        "are passed to `celery worker` and override the defaults (e.g. --loglevel DEBUG).",
    )
    worker.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help=f"serve /metrics of the worker on this port (default: {METRICS_PORT_ENV}, else none)",
    )

    web = commands.add_parser("web", help="the HTTP shim (freezer-api compatible)")
    web.add_argument("--host", default=None, help=f"address ({defaults.http_host})")
    web.add_argument("--port", type=int, default=None, help=f"port ({defaults.http_port})")
    web.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help=f"HTTP processes ({defaults.http_workers})",
    )
    web.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without tokens on a non-loopback address",
    )

    sweep = commands.add_parser("sweep", help="close runs whose run_timeout has passed")
    sweep.add_argument(
        "--interval",
        type=float,
        default=None,
        help=f"seconds between sweeps ({defaults.deadline_sweep_interval:g})",
    )
    sweep.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help=f"serve /metrics on this port (default: {METRICS_PORT_ENV}, else none)",
    )

    sim = commands.add_parser(
        "simulate", parents=[common], help="a fleet of nodes racing through rounds"
    )
    sim.add_argument("--nodes", type=int, default=8, help="node processes (8)")
    sim.add_argument("--sessions", type=int, default=3, help="sessions (3)")
    sim.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    sim.add_argument(
        "--fail-share", type=_share, default=0.1, help="share of backups that fail (0.1)"
    )
    sim.add_argument("--hold-off", type=int, default=2, help="sessions' hold_off, seconds (2)")
    sim.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    sim.add_argument(
        "--via",
        choices=["queue", "http", "mixed"],
        default=None,
        help="how nodes send start and end: the queue, HTTP shims, or some nodes each way "
        "(default: http when --http is given, else queue)",
    )
    sim.add_argument(
        "--http",
        action="append",
        metavar="URL",
        help="a shim's base URL, e.g. http://10.0.0.5:9090 (repeat for several: nodes take "
        "them in turn; default with --via http/mixed: "
        f"http://{defaults.http_host}:{defaults.http_port})",
    )
    sim.add_argument(
        "--token",
        default=None,
        help=f"X-Auth-Token for the shims (default: ${TOKEN_ENV}, else none)",
    )

    commands.add_parser(
        "bench",
        help="benchmarks: --quick (smoke) or --full (writes benchmarks/RESULTS.md)",
        description="Run the benchmarks of a source checkout.",
        add_help=False,  # --help goes to the benchmarks' own parser
    )

    create = commands.add_parser("create", parents=[common], help="create a session")
    create.add_argument("--session-id", default=None, help="default: derived from the request")
    create.add_argument("--hold-off", type=int, default=None, help="seconds")
    create.add_argument("--run-timeout", type=int, default=None, help="seconds (0: none)")
    create.add_argument("--description", default=None)
    create.add_argument("--job", nargs="+", action="extend", metavar="JOB", help="job ids")

    show = commands.add_parser("show", parents=[common], help="a session's document")
    show.add_argument("session")

    lst = commands.add_parser("list", parents=[common], help="the project's sessions")
    lst.add_argument("--limit", type=int, default=10)
    lst.add_argument("--offset", type=int, default=0)
    lst.add_argument("--match", type=_match, action="append", metavar="FIELD=VALUE")
    lst.add_argument("--match-not", type=_match, action="append", metavar="FIELD=VALUE")

    add_job = commands.add_parser("add-job", parents=[common], help="put a job in a session")
    add_job.add_argument("session")
    add_job.add_argument("job")
    add_job.add_argument("--client-id", default="")

    remove_job = commands.add_parser(
        "remove-job", parents=[common], help="take a job out of a session"
    )
    remove_job.add_argument("session")
    remove_job.add_argument("job")

    start = commands.add_parser("start", parents=[common], help="start a job's part of a run")
    start.add_argument("session")
    start.add_argument("job")
    start.add_argument("--tag", type=int, required=True, help="the session_tag the node holds")

    end = commands.add_parser("end", parents=[common], help="report a job's result")
    end.add_argument("session")
    end.add_argument("job")
    end.add_argument("--result", required=True, choices=["success", "fail", "aborted"])
    end.add_argument("--tag", type=int, default=None, help="the run's tag (default: current)")

    runs = commands.add_parser("runs", parents=[common], help="a session's run history")
    runs.add_argument("session")
    runs.add_argument("--tag", type=int, default=None, help="only this run")

    delete = commands.add_parser("delete", parents=[common], help="delete a session")
    delete.add_argument("session")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
    except ValidationError as exc:
        return _fail(f"invalid configuration (SESSION_WORKER_* variables):\n{exc}", 2)
    args, extra = parser.parse_known_args(argv)
    if args.command == "worker":
        _cmd_worker(args, extra)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "up":
        return _cmd_up(args)
    if args.command == "web":
        return _cmd_web(args)
    if args.command == "sweep":
        return _cmd_sweep(args)
    if args.command == "simulate":
        return _cmd_simulate(args)
    return _run_node_command(args)


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()

__all__ = ["build_parser", "format_table", "load_settings", "main", "resolve_redis_url"]
