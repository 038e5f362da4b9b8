"""The store on a local 3-master Redis Cluster, with sessions spread over every master.

Every command kind runs on sessions whose slots live on different masters; a script call whose
keys crossed slots would raise (in the client, or CROSSSLOT from the server), and the servers'
error counters must show no CROSSSLOT afterwards. Listing reads the project index (one slot)
and then each session (its own slot); a job moves between sessions on different masters. The
queue path runs too: a worker with a plain Redis broker and the store on the cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from clock import Clock
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot

from session_worker.celery_app import make_app
from session_worker.client import SessionClient
from session_worker.connection import broker_url, cluster_node_url, is_cluster_url, make_redis
from session_worker.keys import SessionKeys
from session_worker.models import (
    AddJobCommand,
    CreateCommand,
    DeleteCommand,
    EndCommand,
    JobEntry,
    RemoveJobCommand,
    ReplaceCommand,
    SessionFields,
    StartCommand,
    UpdateCommand,
)
from session_worker.redis_server import (
    CLUSTER_SLOTS,
    ClusterProcess,
    ServerKind,
    find_server_binary,
)
from session_worker.scripts import JOB_SCRIPTS, SESSION_SCRIPTS
from session_worker.settings import Settings
from session_worker.store import Store

PROJECT = "proj"
PER_MASTER = 2


def rid() -> str:
    return uuid.uuid4().hex


def node_of(client: RedisCluster, key: str) -> str:
    """The master ("host:port") that serves the slot of `key`."""
    return cast(str, client.get_node_from_key(key).name)


def spread_ids(client: RedisCluster, store: Store, per_master: int = PER_MASTER) -> list[str]:
    """Session ids, `per_master` on each master, in round-robin order of the masters."""
    masters = sorted(node.name for node in client.get_primaries())
    by_master: dict[str, list[str]] = {name: [] for name in masters}
    i = 0
    while any(len(ids) < per_master for ids in by_master.values()):
        session_id = f"s{i}"
        i += 1
        ids = by_master[node_of(client, store.keys.session(PROJECT, session_id).meta)]
        if len(ids) < per_master:
            ids.append(session_id)
    return [by_master[m][k] for k in range(per_master) for m in masters]


class RecordingScript:
    """Stands in for a registered Script: notes each call's keys, then makes the call."""

    def __init__(self, name: str, script: Script, calls: list[tuple[str, list[str]]]) -> None:
        self.name, self.script, self.calls = name, script, calls

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        self.calls.append((self.name, [str(k) for k in keys]))
        return self.script(keys=keys, args=args, client=client)


def recorded(store: Store) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    for name, script in list(store.scripts.by_name.items()):
        store.scripts.by_name[name] = cast(Script, RecordingScript(name, script, calls))
    return calls


def crossslot_errors(cluster: ClusterProcess) -> int:
    total = 0
    for url in cluster.node_urls:
        with redis.Redis.from_url(url) as node:
            stats = cast(dict[str, Any], node.info("errorstats"))
            total += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
    return total


def reset_stats(cluster: ClusterProcess) -> None:
    for url in cluster.node_urls:
        with redis.Redis.from_url(url) as node:
            node.config_resetstat()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(cluster_client: RedisCluster, clock: Clock, redis_cluster: ClusterProcess) -> Store:
    reset_stats(redis_cluster)
    return Store(cluster_client, Settings(default_hold_off=30), clock=clock)


def create(store: Store, clock: Clock, session_id: str, *jobs: str) -> None:
    clock.now += 1  # distinct creation times: the listing order is known
    doc = SessionFields(session_id=session_id, jobs={job: JobEntry() for job in jobs})
    cmd = CreateCommand(request_id=rid(), project_id=PROJECT, document=doc)
    store.create(cmd).raise_for_error()


def base(session_id: str) -> dict[str, Any]:
    return {"request_id": rid(), "project_id": PROJECT, "session_id": session_id}


# the cluster ----------------------------------------------------------------------------------


def test_the_cluster_has_three_masters_sharing_every_slot(
    redis_cluster: ClusterProcess, cluster_client: RedisCluster
) -> None:
    assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert len(cluster_client.get_primaries()) == 3
    owned = 0
    for url in redis_cluster.node_urls:
        with redis.Redis.from_url(url) as node:
            info = cast(dict[str, Any], node.cluster("INFO"))
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
            assert int(info["cluster_known_nodes"]) == 3
            myself = next(
                line
                for line in cast(bytes, node.execute_command("CLUSTER", "NODES"))
                .decode()
                .splitlines()  # type: ignore[no-untyped-call]
                if "myself" in line
            )
            assert "master" in myself
            for part in myself.split()[8:]:
                first, _, last = part.partition("-")
                owned += int(last or first) - int(first) + 1
    assert owned == CLUSTER_SLOTS


def test_a_cluster_formed_without_redis_cli_works_the_same(tmp_path: Path) -> None:
    kind: ServerKind = "redis" if find_server_binary("redis") else "valkey"
    with ClusterProcess(kind, tmp_path, cli="") as cluster:
        client = make_redis(Settings(redis_url=cluster.url))
        assert isinstance(client, RedisCluster)
        try:
            store = Store(client, Settings())
            ids = spread_ids(client, store, per_master=1)
            for session_id in ids:
                doc = SessionFields(session_id=session_id)
                cmd = CreateCommand(request_id=rid(), project_id=PROJECT, document=doc)
                store.create(cmd).raise_for_error()
            listed = store.list_sessions(PROJECT, limit=10)
            assert sorted(d["session_id"] for d in listed) == sorted(ids)
        finally:
            client.close()
    assert not cluster.running


def test_session_ids_spread_over_every_master(
    store: Store, clock: Clock, cluster_client: RedisCluster
) -> None:
    ids = spread_ids(cluster_client, store)
    for session_id in ids:
        create(store, clock, session_id)
    for node in cluster_client.get_primaries():
        held = {
            k.decode()
            for k in cast(list[bytes], cluster_client.keys("sw:{proj:*}:meta", target_nodes=node))
        }
        mine = {
            store.keys.session(PROJECT, s).meta
            for s in ids
            if node_of(cluster_client, store.keys.session(PROJECT, s).meta) == node.name
        }
        assert held == mine and len(held) == PER_MASTER


# every command, every slot --------------------------------------------------------------------


def test_every_command_on_sessions_over_all_masters_without_crossslot(
    store: Store, clock: Clock, cluster_client: RedisCluster, redis_cluster: ClusterProcess
) -> None:
    calls = recorded(store)
    ids = spread_ids(cluster_client, store)
    for session_id in ids:  # job ids are the project's: one session holds a job
        create(store, clock, session_id, f"{session_id}-a", f"{session_id}-b")
    for session_id in ids:
        store.update(UpdateCommand(**base(session_id), patch=SessionFields(run_timeout=60)))
        a, b, c, d = (f"{session_id}-{name}" for name in "abcd")
        assert store.add_job(AddJobCommand(**base(session_id), job_id=c)).added
        reply = store.start(StartCommand(**base(session_id), job_id=a, current_tag=0))
        assert (reply.result, reply.session_tag) == ("success", 1), reply.error
        for job in (a, b):
            assert store.end(EndCommand(**base(session_id), job_id=job, result="success")).ok
        assert store.remove_job(RemoveJobCommand(**base(session_id), job_id=c)).removed
        doc = store.get(PROJECT, session_id)
        assert doc is not None and doc["status"] == "completed" and doc["result"] == "success"
        runs = store.runs(PROJECT, session_id)
        assert runs is not None and [r["session_tag"] for r in runs] == [1]
        replaced = SessionFields(jobs={a: JobEntry(), d: JobEntry()}, run_timeout=60)
        assert store.replace(ReplaceCommand(**base(session_id), document=replaced)).ok
        assert sorted((store.get(PROJECT, session_id) or {})["jobs"]) == [a, d]
        job_record = store.job_record(PROJECT, d)
        assert job_record is not None and job_record.session_id == session_id
    # A run with a deadline on every master, closed by the sweep (one slot: the schedule).
    for session_id in ids:
        store.start(StartCommand(**base(session_id), job_id=f"{session_id}-a", current_tag=1))
    clock.now += 61
    assert store.sweep_deadlines() == len(ids)
    for session_id in ids:
        assert (store.get(PROJECT, session_id) or {})["status"] == "completed"
    for session_id in ids:
        assert store.delete(DeleteCommand(**base(session_id))).ok
        assert store.get(PROJECT, session_id) is None
    assert store.list_sessions(PROJECT) == []
    assert cluster_client.zcard(store.keys.project_index(PROJECT)) == 0

    assert {name for name, _ in calls} == {*SESSION_SCRIPTS, *JOB_SCRIPTS}
    for name, keys in calls:
        assert len(keys) == declared_keys(name), (name, keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1, (name, keys)
    assert crossslot_errors(redis_cluster) == 0


def test_listing_reads_sessions_on_every_master_in_creation_order(
    store: Store, clock: Clock, cluster_client: RedisCluster
) -> None:
    ids = spread_ids(cluster_client, store)
    for session_id in ids:
        create(store, clock, session_id)
    listed = [d["session_id"] for d in store.list_sessions(PROJECT, limit=100)]
    assert listed == ids
    assert [d["session_id"] for d in store.list_sessions(PROJECT, limit=2, offset=3)] == ids[3:5]
    store.update(UpdateCommand(**base(ids[4]), patch=SessionFields(description="x")))
    matched = store.list_sessions(PROJECT, match=[{"description": "x"}])
    assert [d["session_id"] for d in matched] == [ids[4]]


def test_a_job_moves_between_sessions_on_different_masters(
    store: Store, clock: Clock, cluster_client: RedisCluster, redis_cluster: ClusterProcess
) -> None:
    first, second = spread_ids(cluster_client, store, per_master=1)[:2]
    meta = store.keys.session
    assert node_of(cluster_client, meta(PROJECT, first).meta) != node_of(
        cluster_client, meta(PROJECT, second).meta
    )
    create(store, clock, first, "j")
    create(store, clock, second)
    assert store.add_job(AddJobCommand(**base(second), job_id="j")).ok
    assert "j" not in (store.get(PROJECT, first) or {})["jobs"]
    assert "j" in (store.get(PROJECT, second) or {})["jobs"]
    record = store.job_record(PROJECT, "j")
    assert record is not None and record.session_id == second
    assert store.delete(DeleteCommand(**base(second))).ok
    record = store.job_record(PROJECT, "j")
    assert record is not None and record.session_id == ""
    assert [d["session_id"] for d in store.list_sessions(PROJECT)] == [first]
    assert crossslot_errors(redis_cluster) == 0


def test_scripts_survive_script_flush_on_every_master(
    store: Store, clock: Clock, cluster_client: RedisCluster
) -> None:
    ids = spread_ids(cluster_client, store, per_master=1)
    for session_id in ids:
        create(store, clock, session_id, f"{session_id}-a")
    cluster_client.script_flush()  # sent to every master
    for session_id in ids:
        job = f"{session_id}-a"
        reply = store.start(StartCommand(**base(session_id), job_id=job, current_tag=0))
        assert reply.result == "success"


# each script declares its keys ------------------------------------------------------------------


def header(name: str) -> str:
    text = (resources.files("session_worker") / "lua" / f"{name}.lua").read_text("utf-8")
    return "\n".join(line for line in text.splitlines() if line.startswith("--"))


def declared_keys(name: str) -> int:
    """How many KEYS the script's header declares (a session script: the prelude's)."""
    own = header(name)
    if name in SESSION_SCRIPTS:
        assert f"KEYS[1..{len(SessionKeys._fields)}], ARGV[1..9]: see _prelude.lua" in own
        own = header("_prelude")
    numbers = [int(n) for n in re.findall(r"^--\s+KEYS\[(\d+)\]", own, re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1)), name
    return len(numbers)


def test_each_script_header_declares_its_keys() -> None:
    assert declared_keys("_prelude") == len(SessionKeys._fields)
    for name in SESSION_SCRIPTS:
        assert declared_keys(name) == len(SessionKeys._fields)
    assert {name: declared_keys(name) for name in JOB_SCRIPTS} == {
        "attach_job": 2,
        "detach_job": 1,
    }


# connection settings ----------------------------------------------------------------------------


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:1/0")
    assert cluster_node_url("redis+cluster://:pw@h:7000/0") == "redis://:pw@h:7000"
    assert cluster_node_url("rediss+cluster://h:7000?ssl_cert_reqs=none") == (
        "rediss://h:7000?ssl_cert_reqs=none"
    )
    with pytest.raises(ValueError, match="database 0 only"):
        cluster_node_url("redis+cluster://h:7000/2")


def test_the_broker_needs_a_plain_redis_url_next_to_a_cluster() -> None:
    cluster = "redis+cluster://127.0.0.1:7000"
    with pytest.raises(ValueError, match="SESSION_WORKER_BROKER_URL"):
        broker_url(Settings(redis_url=cluster))
    plain = "redis://127.0.0.1:6379/1"
    settings = Settings(redis_url=cluster, broker_url=plain)
    assert broker_url(settings) == plain
    assert make_app(settings).conf.broker_url == plain
    assert broker_url(Settings(redis_url=plain)) == plain


# the queue path: broker on one Redis, store on the cluster --------------------------------------


@pytest.fixture
def cluster_settings(
    redis_cluster: ClusterProcess, cluster_client: RedisCluster, redis_url: str
) -> Settings:
    return Settings(
        redis_url=redis_cluster.url, broker_url=redis_url, queue=f"sw-cluster-{rid()[:12]}"
    )


@pytest.fixture
def worker(cluster_settings: Settings, tmp_path: Path) -> Iterator[Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WORKER_")}
    env |= {
        "SESSION_WORKER_REDIS_URL": cluster_settings.redis_url or "",
        "SESSION_WORKER_BROKER_URL": cluster_settings.broker_url or "",
        "SESSION_WORKER_QUEUE": cluster_settings.queue,
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "session_worker.celery_app", "worker"]
    command += ["--pool", "solo", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    command += ["-Q", cluster_settings.queue, "-n", f"cluster-{rid()[:8]}@%h", "-l", "INFO"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"\S+@\S+ ready\.", log_path.read_text(errors="replace")):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.05)
        yield log_path
    finally:
        proc.kill()
        proc.wait(10)


def test_commands_through_the_queue_with_the_store_on_the_cluster(
    worker: Path, cluster_settings: Settings, redis_cluster: ClusterProcess
) -> None:
    with SessionClient(settings=cluster_settings, project_id=PROJECT, timeout=30) as client:
        assert isinstance(client.store.client, RedisCluster)
        ids = spread_ids(client.store.client, client.store, per_master=1)
        for session_id in ids:
            job = f"{session_id}-a"
            client.create({"session_id": session_id, "jobs": {job: {}}}).raise_for_error()
            reply = client.start(session_id, job, current_tag=0).raise_for_error()
            assert (reply.result, reply.session_tag) == ("success", 1)
            client.end(session_id, job, result="success").raise_for_error()
        listed = client.store.list_sessions(PROJECT)
        assert sorted(d["session_id"] for d in listed) == sorted(ids)
        assert all(d["status"] == "completed" for d in listed)
    assert crossslot_errors(redis_cluster) == 0
