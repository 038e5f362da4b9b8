"""The auto-pipelined client of the shim's hot path (session_worker/pipelined.py), on real
servers: answers matched to their calls, script reloads, timeouts, cut connections, AUTH and
SELECT, and which redis-py clients it can stand in for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from redis import exceptions as redis_errors

from session_worker.connection import is_transient
from session_worker.pipelined import SCRIPT_LOADS, PipelinedRedis
from session_worker.redis_server import ServerProcess, free_port

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture(params=["redis_server", "valkey_server"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    found: ServerProcess | None = request.getfixturevalue(request.param)
    if found is None:
        pytest.skip("redis-server is not installed")
    redis.Redis.from_url(found.url).flushall()
    return found


def pipelined(server: ServerProcess, timeout: float = 2.0, **kwargs: Any) -> PipelinedRedis:
    client = PipelinedRedis.like(
        redis.Redis.from_url(server.url),
        timeout=timeout,
        connect_timeout=1.0,
        scripts={"echo": ECHO},
        **kwargs,
    )
    assert client is not None
    return client


def test_concurrent_calls_get_their_own_answers_in_one_write(server: ServerProcess) -> None:
    client = pipelined(server)
    writes = 0

    async def go() -> list[Any]:
        nonlocal writes
        await client.evalsha("echo", ["k"], [0])  # connected, the script loaded
        conn = client._conn
        assert conn is not None and conn.transport is not None
        write = conn.transport.write

        def counting(data: bytes) -> None:
            nonlocal writes
            writes += 1
            write(data)

        conn.transport.write = counting  # type: ignore[method-assign]
        calls = [client.evalsha("echo", [f"k{i}"], [i]) for i in range(200)]
        calls += [client.execute("INCR", "n") for _ in range(50)]
        answers = await asyncio.gather(*calls)
        await client.aclose()
        return answers

    answers = asyncio.run(go())
    assert answers[:200] == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
    assert sorted(answers[200:]) == list(range(1, 51))
    assert writes == 1  # every call of the loop round went out together


def test_a_flushed_script_is_loaded_again(server: ServerProcess) -> None:
    client = pipelined(server)
    admin = redis.Redis.from_url(server.url)

    async def go() -> tuple[Any, Any]:
        first = await client.evalsha("echo", ["a"], ["1"])
        admin.script_flush()
        admin.config_resetstat()
        second = await asyncio.gather(*(client.evalsha("echo", ["b"], [i]) for i in range(5)))
        await client.aclose()
        return first, second

    first, second = asyncio.run(go())
    assert first == [b"a", b"1"]
    assert second == [[b"b", str(i).encode()] for i in range(5)]
    # The five calls that found the script missing loaded it once.
    assert admin.info("commandstats")["cmdstat_script|load"]["calls"] == 1


def test_error_replies_raise_what_redis_py_raises(server: ServerProcess) -> None:
    client = pipelined(server)

    async def go() -> None:
        await client.execute("SET", "s", "x")
        with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
            await client.execute("LPUSH", "s", "y")
        # The connection stays usable after an error reply.
        assert await client.execute("GET", "s") == b"x"
        await client.aclose()

    asyncio.run(go())
    oom = redis_errors.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    assert is_transient(oom)


def test_a_cut_connection_fails_the_calls_in_flight_and_a_resend_goes_through(
    server: ServerProcess,
) -> None:
    client = pipelined(server)
    admin = redis.Redis.from_url(server.url)

    async def go() -> None:
        # A call still waiting for its answer (a blocking pop, to be sure) when its
        # connection is killed from elsewhere.
        task = asyncio.ensure_future(client.execute("BLPOP", "nothing", 5))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(admin.client_kill_filter, _type="normal", skipme=True)
        with pytest.raises(redis_errors.ConnectionError):
            await task
        # The next call connects again by itself.
        assert await client.execute("PING") == b"PONG"
        # resend=True: a call whose connection is cut goes once more on a new connection.
        assert await client.execute("INCR", "r", resend=True) == 1
        await client.aclose()

    asyncio.run(go())


def test_resend_only_when_asked(server: ServerProcess) -> None:
    """A call without resend is sent at most once, even when its connection was already
    dead when it was made (the cut is found when the answer is due)."""
    client = pipelined(server)
    admin = redis.Redis.from_url(server.url)

    async def go() -> tuple[int, int]:
        await client.execute("PING")
        admin.client_kill_filter(_type="normal", skipme=True)
        sent_once = 0
        try:
            await client.execute("INCR", "once")
        except redis_errors.ConnectionError:
            sent_once = -1
        resent = await client.execute("INCR", "twice", resend=True)
        await client.aclose()
        return sent_once, resent

    sent_once, resent = asyncio.run(go())
    assert resent == 1
    # Either the cut was noticed first (nothing sent, an error) or the call went out on a
    # new connection; never twice.
    assert int(redis.Redis.from_url(server.url).get("once") or 0) == (0 if sent_once else 1)


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(silent_port: int) -> None:
    client = PipelinedRedis(port=silent_port, timeout=0.2, connect_timeout=0.5)

    async def go() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(redis_errors.TimeoutError):
            await client.execute("PING")
        took = loop.time() - started
        assert client._conn is not None and client._conn.lost is not None
        await client.aclose()
        return took

    assert 0.2 <= asyncio.run(go()) < 1.0


def test_a_refused_connection_says_connecting() -> None:
    client = PipelinedRedis(port=free_port(), timeout=0.5, connect_timeout=0.5)

    async def go() -> None:
        with pytest.raises(redis_errors.ConnectionError, match=" connecting to "):
            await client.execute("PING", resend=True)

    asyncio.run(go())


def test_auth_and_database_come_from_the_client_it_stands_in_for(tmp_path: Path) -> None:
    with ServerProcess("valkey", tmp_path) as server:
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        client = PipelinedRedis.like(redis.Redis.from_url(url), timeout=1.0, connect_timeout=1.0)
        assert client is not None

        async def go() -> None:
            await client.execute("SET", "where", "db3")
            await client.aclose()

        asyncio.run(go())
        assert redis.Redis.from_url(url).get("where") == b"db3"
        assert redis.Redis.from_url(url.replace("/3", "/0")).get("where") is None

        wrong = PipelinedRedis.like(
            redis.Redis.from_url(url.replace("s3cret", "wrong")), timeout=1.0, connect_timeout=1.0
        )
        assert wrong is not None

        async def refused() -> None:
            with pytest.raises(redis_errors.ConnectionError, match=" connecting to "):
                await wrong.execute("PING")

        asyncio.run(refused())


def test_it_stands_in_only_for_one_plain_server() -> None:
    kwargs: dict[str, Any] = {"timeout": 1.0, "connect_timeout": 1.0}
    assert PipelinedRedis.like(fakeredis.FakeRedis(), **kwargs) is None
    assert PipelinedRedis.like(object(), **kwargs) is None
    tls = PipelinedRedis.like(
        redis.Redis.from_url("rediss://127.0.0.1:1/0?ssl_cert_reqs=none"), **kwargs
    )
    assert tls is not None and tls._tls is not None and not tls._tls.check_hostname
    unix = PipelinedRedis.like(redis.Redis.from_url("unix:///tmp/none.sock?db=2"), **kwargs)
    assert unix is not None and unix.where == "/tmp/none.sock"


def test_a_new_event_loop_gets_a_new_connection(server: ServerProcess) -> None:
    client = pipelined(server)

    async def ping() -> tuple[Any, int]:
        answer = await client.execute("PING")
        assert client._conn is not None
        port = client._conn.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        await client.aclose()
        return answer, port

    first, first_port = asyncio.run(ping())
    second, second_port = asyncio.run(ping())
    assert first == second == b"PONG"
    assert first_port != second_port


def test_a_script_flushed_again_and_again_is_loaded_until_it_runs(server: ServerProcess) -> None:
    """A SCRIPT FLUSH landing between the load and the call: the call loads it again (a
    NOSCRIPT means nothing ran), up to SCRIPT_LOADS times; past that the NOSCRIPT goes to the
    caller, which counts as Redis being unavailable for now (a 503, never a 500)."""
    admin = redis.Redis.from_url(server.url)

    def flushing_after_loads(client: PipelinedRedis, flushes: int) -> None:
        load = client._load

        async def load_then_flush(name: str) -> None:
            nonlocal flushes
            await load(name)
            if flushes > 0:
                flushes -= 1
                admin.script_flush()

        client._load = load_then_flush  # type: ignore[method-assign]

    async def go(flushes: int) -> Any:
        admin.script_flush()
        client = pipelined(server)
        flushing_after_loads(client, flushes)
        try:
            return await client.evalsha("echo", ["k"], ["v"])
        finally:
            await client.aclose()

    assert asyncio.run(go(SCRIPT_LOADS - 1)) == [b"k", b"v"]
    with pytest.raises(redis_errors.NoScriptError) as refused:
        asyncio.run(go(SCRIPT_LOADS))
    assert is_transient(refused.value)


def _connected_to(port: int) -> int:
    """Established TCP connections of this machine to 127.0.0.1:`port` (/proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    remote = f"0100007F:{port:04X}"
    return sum(1 for line in lines if line.split()[2] == remote and line.split()[3] == "01")


def test_a_connection_set_up_that_times_out_leaves_no_socket_behind(silent_port: int) -> None:
    """AUTH (or SELECT) that gets no answer: the connection made for it is closed."""
    client = PipelinedRedis(port=silent_port, password="pw", db=3, timeout=0.2, connect_timeout=0.2)

    async def go() -> int:
        for _ in range(5):
            with pytest.raises(redis_errors.ConnectionError, match=" connecting to "):
                await client.execute("PING")
        await asyncio.sleep(0.05)  # let the loop finish closing them
        return _connected_to(silent_port)

    assert asyncio.run(go()) == 0


def test_a_busy_event_loop_is_no_timeout(server: ServerProcess) -> None:
    """The answer arrived while this process's event loop was held up past the timeout:
    the call gets it; Redis was never the slow one."""
    client = pipelined(server, timeout=0.2)

    async def go() -> tuple[Any, bool]:
        await client.execute("PING")
        conn = client._conn
        call = asyncio.ensure_future(client.execute("INCR", "busy"))
        await asyncio.sleep(0)  # sent
        time.sleep(0.5)  # the loop is held (a large request parsed on it, say)
        answer = await call
        same = client._conn is conn and conn is not None and conn.lost is None
        await client.aclose()
        return answer, same

    assert asyncio.run(go()) == (1, True)


def test_answers_still_coming_are_no_timeout(server: ServerProcess) -> None:
    """Redis working through a long backlog answers as it goes: a call at the end of it
    waits past the timeout, because the connection shows Redis alive; only silence times
    out."""
    client = pipelined(server, timeout=0.3)
    spin = "for i = 1, tonumber(ARGV[1]) do end return 1"
    padding = "x" * 4096  # few commands per read: Redis answers every few milliseconds

    async def go() -> tuple[list[Any], float]:
        loop = asyncio.get_running_loop()
        await client.execute("PING")
        started = loop.time()
        answers = await asyncio.gather(
            *(client.execute("EVAL", spin, 0, 150000, padding) for _ in range(800))
        )
        took = loop.time() - started
        await client.aclose()
        return answers, took

    answers, took = asyncio.run(go())
    assert answers == [1] * 800
    assert took > 0.3  # the backlog outlasted one timeout: proof the test tests something
