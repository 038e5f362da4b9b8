"""``session-worker simulate``: a fleet of freezer-like nodes against the real queue.

Every node is a process of its own that owns one job in every simulated session. The
coordinator (this process) creates the sessions through the queue, each node adds its jobs
through the queue, and then, round after round, the coordinator names a moment at which
every node starts all its jobs at once, as freezer schedulers whose jobs share a schedule do.
Each job sends ``start`` with the tag its node holds, runs its "backup" (a short random
sleep; a share of them fail), sends ``end`` and keeps the tag from the reply.

Roles make every rule of SPEC §3 happen, deterministically:

- on time: nodes that start at the moment; they race, one of them bumps the tag, the rest
  join the new run;
- eager (node 0): sends its start a second time right after it was accepted, as a scheduler
  that retries would, and must get ``hold-off`` (same tag, inside the window);
- slow (about a quarter of the nodes): start between 1/4 and 1/2 of the hold-off after the
  moment, so they join the run inside the hold-off window;
- late (the last node, in one round): starts more than a second past the hold-off window and
  must get ``out-of-sync``; like a freezer scheduler it skips its backup, takes the tag from
  the reply and is back in step in the next round.

Timing: the window test in the scripts compares whole seconds of Redis ``TIME``, so a start
``d`` seconds after the run began sees a difference of at most ``ceil(d)`` and at least
``floor(d)``. A slow node is at most ``hold_off/2`` late: inside the window, even when its
start is applied up to ``hold_off/2`` s later than the first one. The late node is
``hold_off + 2`` s late: outside, even when the first start took a second longer to apply
than its own. A round begins ``hold_off + 1.25`` s after the first reply to a start of the
previous round was received (the run began before that reply): outside the previous window,
so it starts a new run however slow the queue was.

Paths (``--via``): every node sends its starts and ends through the queue (``queue``),
through an HTTP shim (``http``: the freezer v2 action route, one Idempotency-Key per command,
repeated with the same key after a connection error or a 503), or some nodes one way and some
the other (``mixed``: node ``n`` takes path ``n mod (1 + shims)`` of queue, shim 1, shim 2...).
Several shim URLs are taken round-robin. Sessions are created and jobs added through the queue
whatever the path, and the invariants checked at the end are the same for every path.

At the end the coordinator reads every session and its run history back (SessionClient.get
and .runs) and checks the invariants against what the nodes reported
(:func:`check_invariants`, a pure function, so a test can feed it a doctored history).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import random
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import httpx

from .client import SessionClient
from .connection import make_redis
from .errors import ReplyTimeout
from .keys import KeyBuilder
from .models import Reply
from .settings import Settings
from .stack import mask_url

EAGER_NODE = 0
LATE_MARGIN = 2.0  # the late node starts this long after the end of the hold-off window
ROUND_GAP = 1.25  # a round begins hold_off + this after the previous round's first answer
LEAD = 0.3  # the coordinator names a moment at least this far ahead
BACKUP_SECONDS = (0.05, 0.3)  # how long a simulated backup takes (uniform)

QUEUE = "queue"  # the path of a node that sends through the queue (else: its shim's URL)
VIAS = ("queue", "http", "mixed")
HTTP_CONNECT_TIMEOUT = 3.0  # seconds to open a connection to a shim (within the reply timeout)
HTTP_RETRY_DELAY = (0.05, 1.0)  # first and largest pause before repeating an HTTP command


# Configuration and roles ------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """One simulation: the fleet, its sessions and rounds (``simulate --help``).

    Every node owns one job in every session; session ids carry ``run_id`` (random unless
    given), so runs never share sessions. Nodes draw delays, backup times and failures from
    ``random.Random(f"{seed}:{node}")``.
    """

    nodes: int = 8
    sessions: int = 3
    rounds: int = 5
    fail_share: float = 0.1
    hold_off: int = 2
    seed: int = 0
    project_id: str = "default"
    timeout: float = 10.0
    run_id: str = ""
    via: str = "queue"  # queue | http | mixed
    http_urls: tuple[str, ...] = ()  # the shims' base URLs (http, mixed)

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError("--nodes must be at least 2 (an eager node and a late node)")
        if self.sessions < 1 or self.rounds < 1:
            raise ValueError("--sessions and --rounds must be at least 1")
        if not 0.0 <= self.fail_share <= 1.0:
            raise ValueError("--fail-share must be between 0 and 1")
        if self.hold_off < 1:
            raise ValueError("--hold-off must be at least 1 s (the window is in whole seconds)")
        if self.via not in VIAS:
            raise ValueError(f"--via must be one of {', '.join(VIAS)}, got {self.via!r}")
        urls = tuple(url.rstrip("/") for url in self.http_urls)
        if self.via == "queue" and urls:
            raise ValueError("--http URLs are for --via http or mixed, not --via queue")
        if self.via != "queue" and not urls:
            raise ValueError(f"--via {self.via} needs at least one --http URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--http must be an http:// or https:// URL, got {url!r}")
        object.__setattr__(self, "http_urls", urls)
        if not self.run_id:
            object.__setattr__(self, "run_id", uuid.uuid4().hex[:8])

    @property
    def session_ids(self) -> list[str]:
        return [f"sim-{self.run_id}-{i}" for i in range(1, self.sessions + 1)]

    def job_id(self, session_id: str, node: int) -> str:
        return f"{session_id}-n{node}"

    @property
    def late_node(self) -> int:
        return self.nodes - 1

    @property
    def late_round(self) -> int:
        """The one round the late node misses (the middle one)."""
        return max(1, (self.rounds + 1) // 2)

    @property
    def slow_nodes(self) -> list[int]:
        if self.nodes < 3:
            return []
        count = max(1, self.nodes // 4)
        return list(range(self.late_node - count, self.late_node))

    @property
    def paths(self) -> list[str]:
        """Every path some node takes, in order: "queue" first, then the shims' URLs."""
        return list(dict.fromkeys(self.path(n) for n in range(self.nodes)))

    def path(self, node: int) -> str:
        """How `node` sends its starts and ends: "queue", or the base URL of its shim."""
        if self.via == "queue":
            return QUEUE
        if self.via == "http":
            return self.http_urls[node % len(self.http_urls)]
        targets = (QUEUE, *self.http_urls)
        return targets[node % len(targets)]

    def role(self, node: int, rnd: int) -> str:
        if node == self.late_node and rnd == self.late_round:
            return "late"
        if node in self.slow_nodes:
            return "slow"
        if node == EAGER_NODE:
            return "eager"
        return "on-time"


# What the nodes report ---------------------------------------------------------------------


@dataclass
class CommandRecord:
    """One command a node (or the coordinator) sent, and what came back."""

    node: int
    kind: str
    session_id: str
    request_id: str
    reply_key: str
    sent_at: float  # wall clock (time.time())
    latency: float | None = None  # seconds until the reply; None: no reply in time
    replies: list[str] = field(default_factory=list)  # request ids of the replies received
    ok: bool | None = None
    result: str | None = None
    session_tag: int | None = None
    error: str | None = None  # "<code>: <description>"
    via: str = QUEUE  # "queue", or the URL of the shim it went through
    attempts: int = 1  # times it was sent (HTTP: repeated with the same key)


@dataclass
class JobReport:
    """One job in one round, as its node saw it."""

    session_id: str
    round: int
    node: int
    job_id: str
    role: str
    delay: float
    start: str = ""  # reply result, "error" or "timeout"
    start_tag: int | None = None
    repeat: str | None = None  # the eager node's second start
    backup: str | None = None  # "success" / "fail", None when the backup did not run
    end: str | None = None
    end_tag: int | None = None
    tag_after: int = 0
    error: str | None = None  # what went wrong in the node itself (an exception)


class CommandSender:
    """Sends commands through one SessionClient and records each (thread-confined)."""

    def __init__(self, client: SessionClient, node: int, timeout: float) -> None:
        self.client = client
        self.node = node
        self.timeout = timeout
        self.records: list[CommandRecord] = []

    def __call__(self, kind: str, session_id: str, **fields: Any) -> Reply | None:
        sent_at = time.time()
        began = time.perf_counter()
        if kind != "create":  # a create names its session in its document
            fields["session_id"] = session_id
        request_id, reply_key = self.client.send(kind, **fields)
        record = CommandRecord(self.node, kind, session_id, request_id, reply_key, sent_at)
        self.records.append(record)
        try:
            reply = self.client.wait(reply_key, self.timeout)
        except ReplyTimeout:
            return None
        _note_reply(record, reply, time.perf_counter() - began)
        return reply


def _note_reply(record: CommandRecord, reply: Reply, latency: float) -> None:
    record.latency = latency
    record.replies.append(reply.request_id)
    record.ok = reply.ok
    record.result = reply.result
    record.session_tag = reply.session_tag
    if reply.error is not None:
        record.error = f"{reply.error.code}: {reply.error.description}"


class HttpCommandSender:
    """Sends start and end through one HTTP shim and records each (thread-confined).

    ``POST {base_url}/v2/{project}/sessions/{id}/action`` with ``{"start": {...}}`` or
    ``{"end": {...}}`` and a new Idempotency-Key per command. After a connection error, a
    timeout or a 503 the same request goes again with the same key (the shim applies it once)
    until `timeout` seconds have passed since the first attempt; then None, like a queue
    command without a reply. A 202 is the reply; any other status an error reply.
    """

    KINDS = ("start", "end")

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        project_id: str,
        node: int,
        timeout: float,
        keys: KeyBuilder,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.project_id = project_id
        self.node = node
        self.timeout = timeout
        self.keys = keys
        self.records: list[CommandRecord] = []

    def __call__(self, kind: str, session_id: str, **fields: Any) -> Reply | None:
        if kind not in self.KINDS:
            raise ValueError(f"{kind} does not go through the shim here (only start, end)")
        request_id = uuid.uuid4().hex
        # The key a queue command would have been answered on: nothing may ever land there.
        reply_key = self.keys.reply(self.project_id, session_id, request_id)
        record = CommandRecord(
            self.node, kind, session_id, request_id, reply_key, time.time(), via=self.base_url
        )
        record.attempts = 0
        self.records.append(record)
        url = f"{self.base_url}/v2/{self.project_id}/sessions/{session_id}/action"
        began = time.perf_counter()
        deadline = began + self.timeout
        pause = HTTP_RETRY_DELAY[0]
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            record.attempts += 1
            try:
                response = self.http.post(
                    url,
                    json={kind: fields},
                    headers={"Idempotency-Key": request_id},
                    timeout=httpx.Timeout(remaining, connect=min(remaining, HTTP_CONNECT_TIMEOUT)),
                )
            except httpx.TransportError as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                wait = pause
            else:
                if response.status_code != 503:
                    break
                record.error = f"503: {_describe(response)}"
                wait = max(pause, _retry_after(response))
            time.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
            pause = min(2 * pause, HTTP_RETRY_DELAY[1])
        record.error = None
        if response.status_code == 202:
            body = response.json()
            reply = Reply(
                request_id=request_id,
                session_id=session_id,
                ok=True,
                result=body.get("result"),
                session_tag=body.get("session_tag"),
            )
        else:
            code = f"http_{response.status_code}"
            reply = Reply.failure(request_id, session_id, code, _describe(response))
        _note_reply(record, reply, time.perf_counter() - began)
        return reply


def _describe(response: httpx.Response) -> str:
    """An error response's "title: description" (the shim's JSON body), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "title" in body:
        return f"{body.get('title')}: {body.get('description', '')}"
    return str(body)[:200]


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 503 asks us to wait (Retry-After in seconds), at most the largest pause."""
    try:
        return min(float(response.headers.get("retry-after", "0")), HTTP_RETRY_DELAY[1])
    except ValueError:
        return 0.0


def _reply_word(reply: Reply | None) -> str:
    if reply is None:
        return "timeout"
    if not reply.ok:
        return "error"
    return reply.result or "success"


# Node processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _JobPlan:
    delay: float
    backup_seconds: float
    backup_ok: bool


Sender = CommandSender | HttpCommandSender


def _run_job(
    send: Sender,
    report: JobReport,
    plan: _JobPlan,
    moment: float,
    tag: int,
) -> None:
    report.tag_after = tag
    try:
        _start_backup_end(send, report, plan, moment, tag)
    except Exception as exc:  # reported, and counted as a lost command by the checker
        report.error = f"{type(exc).__name__}: {exc}"


def _start_backup_end(
    send: Sender, report: JobReport, plan: _JobPlan, moment: float, tag: int
) -> None:
    time.sleep(max(0.0, moment + plan.delay - time.time()))
    reply = send("start", report.session_id, job_id=report.job_id, current_tag=tag)
    report.start = _reply_word(reply)
    if reply is None or not reply.ok:
        return
    report.start_tag = reply.session_tag
    report.tag_after = reply.session_tag if reply.session_tag is not None else tag
    if reply.result != "success":
        # out-of-sync: the run is gone; take its tag, join the next one. hold-off: skip.
        return
    tag = report.tag_after
    if report.node == EAGER_NODE:
        again = send("start", report.session_id, job_id=report.job_id, current_tag=tag)
        report.repeat = _reply_word(again)
    time.sleep(plan.backup_seconds)
    report.backup = "success" if plan.backup_ok else "fail"
    end = send(
        "end", report.session_id, job_id=report.job_id, current_tag=tag, result=report.backup
    )
    report.end = _reply_word(end)
    if end is not None and end.ok:
        report.end_tag = end.session_tag
        if end.session_tag is not None:
            report.tag_after = end.session_tag


def node_main(
    cfg: SimConfig,
    node: int,
    settings: Settings,
    inbox: mp.Queue[Any],
    outbox: mp.Queue[Any],
    token: str | None = None,
) -> None:
    """One node: add its jobs, then run every round it is told to, reporting each.

    `settings` are the coordinator's (Redis URL, queue, key prefix), handed over as they are;
    `token` goes out as X-Auth-Token when the node sends through a shim.
    """
    try:
        rng = random.Random(f"{cfg.seed}:{node}")
        sessions = cfg.session_ids
        clients = {
            s: SessionClient(project_id=cfg.project_id, settings=settings, timeout=cfg.timeout)
            for s in sessions
        }
        setup = {s: CommandSender(clients[s], node, cfg.timeout) for s in sessions}
        senders: dict[str, Sender] = dict(setup)
        https: list[httpx.Client] = []
        path = cfg.path(node)
        if path != QUEUE:
            keys = KeyBuilder(settings.key_prefix)
            headers = {"X-Auth-Token": token} if token else {}
            for s in sessions:  # a client per session: each session's jobs run in a thread
                http = httpx.Client(headers=headers, timeout=cfg.timeout)
                https.append(http)
                senders[s] = HttpCommandSender(http, path, cfg.project_id, node, cfg.timeout, keys)
        for s in sessions:
            reply = setup[s]("add_job", s, job_id=cfg.job_id(s, node), client_id=f"node{node}")
            if reply is None or not reply.ok:
                raise RuntimeError(f"add_job in {s}: {_reply_word(reply)} {reply}")
        outbox.put(("ready", node, _drain(setup.values())))
        tags = dict.fromkeys(sessions, 0)
        while True:
            message = inbox.get()
            if message[0] == "stop":
                break
            _, rnd, moment = message
            role = cfg.role(node, rnd)
            if role == "slow":
                delay = rng.uniform(0.25, 0.5) * cfg.hold_off
            elif role == "late":
                delay = cfg.hold_off + LATE_MARGIN
            else:
                delay = 0.0
            plans = {
                s: _JobPlan(delay, rng.uniform(*BACKUP_SECONDS), rng.random() >= cfg.fail_share)
                for s in sessions
            }
            reports = {
                s: JobReport(s, rnd, node, cfg.job_id(s, node), role, round(delay, 3))
                for s in sessions
            }
            threads = [
                threading.Thread(
                    target=_run_job,
                    args=(senders[s], reports[s], plans[s], moment, tags[s]),
                    name=f"node{node}-{s}",
                )
                for s in sessions
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for s in sessions:
                tags[s] = reports[s].tag_after
            outbox.put(
                ("round", node, [asdict(r) for r in reports.values()], _drain(senders.values()))
            )
        for client in clients.values():
            client.close()
        for http in https:
            http.close()
    except BaseException:
        outbox.put(("crash", node, traceback.format_exc()))


def _drain(senders: Iterable[Sender]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for sender in senders:
        records += [asdict(r) for r in sender.records]
        sender.records.clear()
    return records


# Invariants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


INVARIANTS = (
    "one-bump-per-round",
    "job-result-in-right-run",
    "run-result",
    "nothing-lost",
    "scenario",
)


def check_invariants(
    cfg: SimConfig,
    jobs: Sequence[JobReport],
    commands: Sequence[CommandRecord],
    store: Mapping[str, Mapping[str, Any]],
    leftover_replies: Mapping[str, int] | None = None,
) -> list[Violation]:
    """Every way the store's history disagrees with the rules or with what the nodes saw.

    `store` maps each session id to ``{"doc": <document or None>, "runs": <run list or
    None>}`` as read back at the end; `leftover_replies` maps reply keys to the replies still
    queued on them (a command answered twice leaves one behind).
    """
    found: list[Violation] = []

    def fail(invariant: str, detail: str) -> None:
        found.append(Violation(invariant, detail))

    by_session: dict[str, list[JobReport]] = defaultdict(list)
    for job in jobs:
        by_session[job.session_id].append(job)
    all_jobs = {s: {cfg.job_id(s, n) for n in range(cfg.nodes)} for s in cfg.session_ids}

    for s in cfg.session_ids:
        state = store.get(s) or {}
        doc = state.get("doc")
        runs = state.get("runs")
        if doc is None or runs is None:
            fail("nothing-lost", f"{s}: session missing from the store")
            continue
        runs_by_tag = {run["session_tag"]: run for run in runs}

        # One bump per round: tags 1..rounds, one run each, every reply of round r says r.
        tags = [run["session_tag"] for run in runs]
        expected_tags = list(range(1, cfg.rounds + 1))
        if doc.get("session_tag") != cfg.rounds:
            fail(
                "one-bump-per-round",
                f"{s}: session_tag is {doc.get('session_tag')}, want {cfg.rounds} "
                f"after {cfg.rounds} rounds",
            )
        if tags != expected_tags:
            fail("one-bump-per-round", f"{s}: runs in history {tags}, want {expected_tags}")
        for job in by_session[s]:
            for what, tag in (("start", job.start_tag), ("end", job.end_tag)):
                if tag is not None and tag != job.round:
                    fail(
                        "one-bump-per-round",
                        f"{s} round {job.round}: {job.job_id} {what} reply says tag {tag}",
                    )

        # Each job's result recorded in its run, as its node reported it.
        for job in by_session[s]:
            run = runs_by_tag.get(job.round)
            if run is None:
                continue  # reported above
            entry = run["jobs"].get(job.job_id)
            want = _expected_job_result(job)
            if want is None:
                continue
            if entry is None:
                fail("job-result-in-right-run", f"{s} run {job.round}: {job.job_id} missing")
            elif (entry.get("status"), entry.get("result")) != ("completed", want):
                fail(
                    "job-result-in-right-run",
                    f"{s} run {job.round}: {job.job_id} is {entry.get('status')}/"
                    f"{entry.get('result') or '-'}, its node reported {want}",
                )
        for run in runs:
            members = set(run["jobs"])
            if members != all_jobs[s]:
                missing = sorted(all_jobs[s] - members)
                extra = sorted(members - all_jobs[s])
                fail(
                    "job-result-in-right-run",
                    f"{s} run {run['session_tag']}: members differ (missing {missing}, "
                    f"unexpected {extra})",
                )

        # A run succeeds exactly when all its member jobs succeeded.
        for run in runs:
            tag = run["session_tag"]
            if run.get("status") != "completed" or run.get("closed", "completed") != "completed":
                fail(
                    "run-result",
                    f"{s} run {tag}: {run.get('status')} (closed: {run.get('closed') or '-'}), "
                    "want completed by its jobs",
                )
            all_ok = all(j.get("result") == "success" for j in run["jobs"].values())
            reported = [j for j in by_session[s] if j.round == tag]
            nodes_ok = bool(reported) and all(
                _expected_job_result(j) == "success" for j in reported
            )
            want = "success" if all_ok else "fail"
            if run.get("result") != want:
                fail("run-result", f"{s} run {tag}: result {run.get('result')!r}, jobs say {want}")
            if reported and all_ok != nodes_ok:
                fail(
                    "run-result",
                    f"{s} run {tag}: store says all jobs "
                    f"{'succeeded' if all_ok else 'did not succeed'}, the nodes say otherwise",
                )
        if runs and (doc.get("status"), doc.get("result")) != (
            runs[-1].get("status"),
            runs[-1].get("result"),
        ):
            fail(
                "run-result",
                f"{s}: document says {doc.get('status')}/{doc.get('result')}, its last run "
                f"{runs[-1].get('status')}/{runs[-1].get('result')}",
            )

    # Nothing lost: every command got exactly one reply, its own; no error, no timeout.
    sent = Counter(c.request_id for c in commands)
    for request_id, count in sent.items():
        if count > 1:
            fail("nothing-lost", f"request id {request_id} sent {count} times")
    for c in commands:
        where = f"{c.kind} {c.session_id} (node {c.node}, request {c.request_id})"
        if not c.replies:
            fail("nothing-lost", f"{where}: no reply within the timeout")
        elif len(c.replies) > 1 or c.replies[0] != c.request_id:
            fail("nothing-lost", f"{where}: replies {c.replies}")
        elif c.ok is False:
            fail("nothing-lost", f"{where}: error reply {c.error}")
    for key, count in (leftover_replies or {}).items():
        if count:
            fail("nothing-lost", f"{count} extra repl{'y' if count == 1 else 'ies'} left on {key}")
    for job in jobs:
        if job.error is not None:
            fail(
                "nothing-lost",
                f"{job.session_id} round {job.round}: node {job.node} failed: {job.error}",
            )
    for s, reported in by_session.items():
        rounds = Counter(j.round for j in reported)
        for rnd in range(1, cfg.rounds + 1):
            if rounds[rnd] != cfg.nodes:
                fail(
                    "nothing-lost", f"{s} round {rnd}: {rounds[rnd]} node reports, want {cfg.nodes}"
                )

    # The scenario happened: slow nodes joined, the eager one was held off, the late one
    # was out of sync (and nobody else was).
    for job in jobs:
        where = f"{job.session_id} round {job.round}: node {job.node} ({job.role})"
        want_start = "out-of-sync" if job.role == "late" else "success"
        if job.start != want_start:
            fail("scenario", f"{where} start got {job.start}, want {want_start}")
        if job.role == "eager" and job.repeat is not None and job.repeat != "hold-off":
            fail("scenario", f"{where} repeated start got {job.repeat}, want hold-off")
        if job.backup is not None and job.end != "success":
            fail("scenario", f"{where} end got {job.end}, want success")
    return found


def _expected_job_result(job: JobReport) -> str | None:
    """The result the job's node expects in the store for this run (None: no opinion)."""
    if job.start == "out-of-sync":
        return "aborted"
    if job.start == "success" and job.backup is not None and job.end == "success":
        return job.backup
    return None


# Summary -----------------------------------------------------------------------------------


@dataclass
class RoundRow:
    session_id: str
    round: int
    tag: int | None
    status: str
    result: str
    jobs: int
    started: int
    joined: int
    hold_off: int
    out_of_sync: int
    ended: int
    failed: int


def round_rows(
    cfg: SimConfig, jobs: Sequence[JobReport], store: Mapping[str, Mapping[str, Any]]
) -> list[RoundRow]:
    rows: list[RoundRow] = []
    for s in cfg.session_ids:
        runs = {run["session_tag"]: run for run in (store.get(s, {}).get("runs") or [])}
        for rnd in range(1, cfg.rounds + 1):
            reported = [j for j in jobs if j.session_id == s and j.round == rnd]
            tags = {j.start_tag for j in reported if j.start_tag is not None}
            tag = tags.pop() if len(tags) == 1 else None
            run = runs.get(tag) if tag is not None else None
            rows.append(
                RoundRow(
                    session_id=s,
                    round=rnd,
                    tag=tag,
                    status=run["status"] if run else "?",
                    result=run["result"] if run else "?",
                    jobs=len(run["jobs"]) if run else 0,
                    started=sum(j.start == "success" for j in reported),
                    joined=sum(j.start == "success" and j.role == "slow" for j in reported),
                    hold_off=sum(j.start == "hold-off" for j in reported)
                    + sum(j.repeat == "hold-off" for j in reported),
                    out_of_sync=sum(j.start == "out-of-sync" for j in reported),
                    ended=sum(j.end == "success" for j in reported),
                    failed=sum(j.backup == "fail" for j in reported),
                )
            )
    return rows


@dataclass
class PathRow:
    """The starts and ends that went one way: through the queue or through one shim."""

    path: str  # "queue" or the shim's URL (its password masked)
    nodes: list[int]
    commands: int
    answered: int
    retried: int  # commands that needed more than one attempt (HTTP)
    p50_ms: float
    p99_ms: float


def path_rows(cfg: SimConfig, commands: Sequence[CommandRecord]) -> list[PathRow]:
    """One row per path a node took, counting the round commands (start, end) sent on it."""
    rows: list[PathRow] = []
    for path in cfg.paths:
        sent = [c for c in commands if c.kind in ("start", "end") and c.via == path]
        latencies = [c.latency for c in sent if c.latency is not None]
        rows.append(
            PathRow(
                path=path if path == QUEUE else mask_url(path),
                nodes=[n for n in range(cfg.nodes) if cfg.path(n) == path],
                commands=len(sent),
                answered=len(latencies),
                retried=sum(c.attempts > 1 for c in sent),
                p50_ms=percentile(latencies, 0.50) * 1000,
                p99_ms=percentile(latencies, 0.99) * 1000,
            )
        )
    return rows


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (share in 0..1) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def throughput(commands: Sequence[CommandRecord], wall: float) -> dict[str, float]:
    """Commands per second (overall and while any command was in flight), reply latency."""
    latencies = [c.latency for c in commands if c.latency is not None]
    spans = sorted((c.sent_at, c.sent_at + c.latency) for c in commands if c.latency is not None)
    busy = 0.0
    current_start, current_end = None, 0.0
    for begin, end in spans:
        if current_start is None or begin > current_end:
            if current_start is not None:
                busy += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    if current_start is not None:
        busy += current_end - current_start
    return {
        "commands": float(len(commands)),
        "seconds": wall,
        "per_second": len(commands) / wall if wall > 0 else 0.0,
        "busy_seconds": busy,
        "per_busy_second": len(latencies) / busy if busy > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
    }


# The coordinator ---------------------------------------------------------------------------


class SimulationError(RuntimeError):
    """The simulation could not run to the end (a node crashed, no reply, no workers)."""


@dataclass
class SimResult:
    config: SimConfig
    jobs: list[JobReport]
    commands: list[CommandRecord]
    store: dict[str, dict[str, Any]]
    leftover_replies: dict[str, int]
    violations: list[Violation]
    rows: list[RoundRow]
    throughput: dict[str, float]
    paths: list[PathRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["http_urls"] = [mask_url(url) for url in self.config.http_urls]
        return {
            "ok": self.ok,
            "config": config,
            "violations": [asdict(v) for v in self.violations],
            "rounds": [asdict(r) for r in self.rows],
            "paths": [asdict(p) for p in self.paths],
            "throughput": self.throughput,
        }


def run_simulation(
    cfg: SimConfig,
    settings: Settings,
    *,
    progress: TextIO | None = None,
    token: str | None = None,
) -> SimResult:
    """Run the fleet against the Redis of `settings` (workers must be consuming).

    With ``cfg.via`` http or mixed the shims at ``cfg.http_urls`` must serve the same Redis;
    `token` is sent to them as X-Auth-Token.
    """
    redis_url = settings.redis_url
    if not redis_url:
        raise SimulationError("no Redis URL")

    def say(line: str) -> None:
        if progress is not None:
            progress.write(line + "\n")
            progress.flush()

    client = SessionClient(
        redis_url, project_id=cfg.project_id, settings=settings, timeout=cfg.timeout
    )
    coordinator = CommandSender(client, -1, cfg.timeout)
    commands: list[CommandRecord] = []
    round_commands: list[CommandRecord] = []
    jobs: list[JobReport] = []
    ctx = mp.get_context("spawn")
    outbox: mp.Queue[Any] = ctx.Queue()
    inboxes: list[mp.Queue[Any]] = [ctx.Queue() for _ in range(cfg.nodes)]
    processes = [
        ctx.Process(
            target=node_main,
            args=(cfg, node, settings, inboxes[node], outbox, token),
            name=f"sim-node{node}",
            daemon=True,
        )
        for node in range(cfg.nodes)
    ]
    began = time.time()
    try:
        say(
            f"simulate {cfg.run_id}: {cfg.nodes} nodes, {cfg.sessions} sessions, "
            f"{cfg.rounds} rounds, hold-off {cfg.hold_off} s, seed {cfg.seed}"
        )
        for path in cfg.paths:
            nodes = [str(n) for n in range(cfg.nodes) if cfg.path(n) == path]
            shown = "the queue" if path == QUEUE else mask_url(path)
            say(f"  node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}: start/end via {shown}")
        for s in cfg.session_ids:
            document = {
                "session_id": s,
                "hold_off": cfg.hold_off,
                "description": f"session-worker simulate {cfg.run_id}",
            }
            reply = coordinator("create", s, document=document)
            if reply is None:
                raise SimulationError(
                    f"no reply to create in {cfg.timeout:g} s: are workers running? "
                    "(`session-worker up`)"
                )
            if not reply.ok:
                raise SimulationError(f"create {s}: {reply.error}")
        for process in processes:
            process.start()
        ready = _collect(outbox, "ready", cfg.nodes, cfg.timeout * cfg.sessions + 30, processes)
        for _, _, records in ready:
            commands += [CommandRecord(**r) for r in records]
        say(f"{cfg.nodes} nodes ready, {cfg.nodes * cfg.sessions} jobs added")

        earliest = 0.0
        rounds_began = time.time()
        for rnd in range(1, cfg.rounds + 1):
            moment = max(time.time() + LEAD, earliest)
            for inbox in inboxes:
                inbox.put(("round", rnd, moment))
            budget = moment - time.time() + cfg.hold_off + LATE_MARGIN + 4 * cfg.timeout + 5
            done = _collect(outbox, "round", cfg.nodes, budget, processes)
            reported = [JobReport(**j) for _, _, js, _ in done for j in js]
            records = [CommandRecord(**r) for _, _, _, rs in done for r in rs]
            jobs += reported
            commands += records
            round_commands += records
            say(_progress_line(cfg, rnd, moment, reported, records))
            answered = [
                r.sent_at + r.latency
                for r in records
                if r.kind == "start" and r.latency is not None
            ]
            earliest = min(answered, default=moment) + cfg.hold_off + ROUND_GAP
        wall = time.time() - rounds_began
        for inbox in inboxes:
            inbox.put(("stop",))
        for process in processes:
            process.join(timeout=10)
    except BaseException:
        client.close()
        raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    commands = coordinator.records + commands

    try:
        store: dict[str, dict[str, Any]] = {}
        for s in cfg.session_ids:
            store[s] = {"doc": client.get(s), "runs": client.runs(s)}
        leftover = _leftover_replies(settings, [c.reply_key for c in commands])
    finally:
        client.close()

    violations = check_invariants(cfg, jobs, commands, store, leftover)
    say(f"done in {time.time() - began:.1f} s")
    return SimResult(
        config=cfg,
        jobs=jobs,
        commands=commands,
        store=store,
        leftover_replies=leftover,
        violations=violations,
        rows=round_rows(cfg, jobs, store),
        throughput=throughput(round_commands, wall),
        paths=path_rows(cfg, round_commands),
    )


def _collect(
    outbox: mp.Queue[Any],
    kind: str,
    count: int,
    timeout: float,
    processes: Sequence[mp.process.BaseProcess],
) -> list[tuple[Any, ...]]:
    """`count` messages of `kind` from the nodes; a crash or silence is a SimulationError."""
    deadline = time.time() + timeout
    messages: list[tuple[Any, ...]] = []
    while len(messages) < count:
        try:
            message = outbox.get(timeout=max(0.1, min(1.0, deadline - time.time())))
        except queue.Empty:
            dead = [p.name for p in processes if not p.is_alive()]
            if dead:
                raise SimulationError(f"node process(es) died: {', '.join(dead)}") from None
            if time.time() > deadline:
                raise SimulationError(
                    f"{count - len(messages)} node(s) did not report '{kind}' in {timeout:.0f} s"
                ) from None
            continue
        if message[0] == "crash":
            raise SimulationError(f"node {message[1]} crashed:\n{message[2]}")
        if message[0] != kind:
            raise SimulationError(f"unexpected message from node {message[1]}: {message[0]}")
        messages.append(message)
    return messages


def _leftover_replies(settings: Settings, reply_keys: Iterable[str]) -> dict[str, int]:
    """Replies still queued on the reply keys (each should have been popped exactly once)."""
    keys = list(dict.fromkeys(reply_keys))
    client = make_redis(settings)
    try:
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            counts = pipe.execute()
    finally:
        client.close()
    return {key: int(n) for key, n in zip(keys, counts, strict=True) if n}


def _progress_line(
    cfg: SimConfig,
    rnd: int,
    moment: float,
    reported: Sequence[JobReport],
    records: Sequence[CommandRecord],
) -> str:
    starts = Counter(j.start for j in reported)
    joined = sum(j.start == "success" and j.role == "slow" for j in reported)
    held = sum(j.repeat == "hold-off" for j in reported) + starts["hold-off"]
    ends = sum(j.end == "success" for j in reported)
    failed = sum(j.backup == "fail" for j in reported)
    latencies = [r.latency for r in records if r.latency is not None]
    lost = sum(r.latency is None for r in records)
    span = max((r.sent_at + (r.latency or 0) for r in records), default=moment) - moment
    return (
        f"round {rnd}/{cfg.rounds}: {len(reported)} jobs started: {starts['success']} success "
        f"({joined} of them joining inside the hold-off), {starts['out-of-sync']} out-of-sync; "
        f"{held} starts told hold-off; "
        f"{ends} ends ({failed} failed), {len(records)} commands in {span:.2f} s, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms" + (f", {lost} NO REPLY" if lost else "")
    )


def format_report(result: SimResult) -> str:
    """The table per session and round, the throughput and the verdict, as printed."""
    from .cli import format_table

    headers = [
        "session",
        "round",
        "tag",
        "status",
        "result",
        "jobs",
        "started",
        "joined",
        "hold-off",
        "out-of-sync",
        "ended",
        "failed",
    ]
    rows = [
        [
            r.session_id,
            r.round,
            "?" if r.tag is None else r.tag,
            r.status,
            r.result or "-",
            r.jobs,
            r.started,
            r.joined,
            r.hold_off,
            r.out_of_sync,
            r.ended,
            r.failed,
        ]
        for r in result.rows
    ]
    t = result.throughput
    path_table = format_table(
        ["path", "nodes", "start/end", "answered", "retried", "p50 ms", "p99 ms"],
        [
            [
                p.path,
                ",".join(str(n) for n in p.nodes),
                p.commands,
                p.answered,
                p.retried,
                f"{p.p50_ms:.1f}",
                f"{p.p99_ms:.1f}",
            ]
            for p in result.paths
        ],
    )
    lines = [
        format_table(headers, rows),
        "(a run's result is fail when one of its jobs ended failed, or was aborted: an "
        "out-of-sync job missed the run's hold-off window and is recorded aborted in it)",
        "",
        path_table,
        "",
        f"commands: {int(t['commands'])} in {t['seconds']:.1f} s of rounds "
        f"({t['per_second']:.0f}/s paced by the schedule; {t['per_busy_second']:.0f}/s "
        f"while commands were in flight)",
        f"reply latency: p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms, "
        f"max {t['max_ms']:.1f} ms",
        "",
    ]
    checked = ", ".join(INVARIANTS)
    if result.ok:
        lines.append(f"invariants: all hold ({checked})")
    else:
        failed = sorted({v.invariant for v in result.violations})
        lines.append(f"invariants FAILED: {', '.join(failed)}")
        shown = result.violations[:50]
        lines += [f"  - {v}" for v in shown]
        if len(result.violations) > len(shown):
            lines.append(f"  ... and {len(result.violations) - len(shown)} more")
    return "\n".join(lines)


__all__ = [
    "CommandRecord",
    "HttpCommandSender",
    "JobReport",
    "PathRow",
    "SimConfig",
    "SimResult",
    "SimulationError",
    "Violation",
    "check_invariants",
    "format_report",
    "path_rows",
    "run_simulation",
]
