"""Auto-pipelined Redis calls on an asyncio event loop: the shim's start and end.

One connection per event loop. Every call made while the loop runs one round of callbacks is
written in one go at the end of that round, and the answers come back in order on the same
connection, so sixteen concurrent starts cost one write and a read or two instead of sixteen
blocking round trips, and the loop serves other requests while Redis works. Commands are
packed by hiredis and answers parsed by it: a call costs a fraction of redis-py's client
time (benchmarks/RESULTS.md).

Failure semantics match the clients of connection.make_redis, so the shim's error handling
(503, the breaker) sees the same exceptions:

- a connection that cannot be made in time: ``ConnectionError("Error connecting to ...")``;
- no answer within ``timeout`` of the write, and no answer to anything else either (Redis
  stalled or gone): ``TimeoutError``; the connection is closed (answers still owed on it
  are dropped with it, so none can be matched to a later call). While answers keep coming,
  Redis is alive and a call waits its turn: a busy event loop or a backlog is no outage;
- a connection lost with calls in flight: ``ConnectionError`` for each of them. A call with
  ``resend=True`` (its command carries a request id, so a second application is answered
  from its request record) is sent once more on a new connection; one without is never
  resent: it may have been applied, and the caller answers 503;
- an error reply: the exception redis-py would raise for it (``NoScriptError`` is handled
  here: the script is loaded and the call made again, up to SCRIPT_LOADS times, which is
  safe because a script that was not found did not run).

It connects where a given redis-py client does (``PipelinedRedis.like``): one server over
TCP, TLS or a Unix socket, with its password, user and database. A Redis Cluster (or
fakeredis) keeps the blocking client.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, cast

import hiredis
from redis import Redis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection

# How many times a call loads its script again when the server keeps losing it (a SCRIPT
# FLUSH between the load and the call) before the NOSCRIPT goes to the caller (a 503).
SCRIPT_LOADS = 5


class _Protocol(asyncio.Protocol):
    """One connection: packed commands out, futures resolved in order as answers come in."""

    def __init__(self, where: str, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: redis_errors.ConnectionError | None = None
        self.answers = 0  # answers received so far: proof that Redis is alive
        self._out: list[bytes] = []
        self._sent: list[asyncio.Future[Any]] = []
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport, but have its methods)
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; it goes out with the others of this loop round."""
        if self.lost is not None:
            raise self.lost
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(packed)
        self._sent.append(future)
        self.waiting.append(future)
        return future

    def _flush(self) -> None:
        if self._out and self.transport is not None and self.lost is None:
            self.transport.write(b"".join(self._out))
            # The clock of these calls starts now that they are on their way.
            self.loop.call_later(self.timeout, self._watch, self._sent, self.answers)
        self._out, self._sent = [], []

    def _watch(self, sent: list[asyncio.Future[Any]], heard: int) -> None:
        """`timeout` after calls were written: any still without an answer? If Redis
        answered others meanwhile, it is alive and working through what is in flight (or
        this event loop was busy): their answers are on the way, look again later. If it
        said nothing at all, it is stalled or gone: those calls time out and the connection
        is closed (the answers still owed on it could no longer be matched)."""
        pending = [future for future in sent if not future.done()]
        if not pending or self.lost is not None:
            return
        if self.answers > heard:
            self.loop.call_later(self.timeout, self._watch, pending, self.answers)
            return
        error = f"Timeout reading from {self.where} ({self.timeout:g} s)"
        for future in pending:
            future.set_exception(redis_errors.TimeoutError(error))
        self.close(f"no answer from {self.where} within {self.timeout:g} s")

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (answer := self.reader.gets()) is not False:
                self.answers += 1
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(answer)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or an answer unasked
            self.close(f"unreadable answer from {self.where}: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(redis_errors.ConnectionError(f"connection to {self.where} lost{reason}"))

    def close(self, why: str) -> None:
        self._fail(redis_errors.ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: redis_errors.ConnectionError) -> None:
        if self.lost is None:
            self.lost = error
        self._out, self._sent = [], []
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedRedis:
    """Redis calls from one event loop over one auto-pipelined connection (module docstring).

    `scripts` maps a name to its Lua source; ``evalsha(name, ...)`` loads it when missing.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float,
        connect_timeout: float,
        scripts: dict[str, str] | None = None,
    ) -> None:
        self._host, self._port, self._path, self._tls = host, port, path, tls
        self.where = path or f"{host}:{port}"
        self._hello: list[tuple[Any, ...]] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sources = dict(scripts or {})
        self._shas = {
            name: hashlib.sha1(source.encode()).hexdigest()
            for name, source in self._sources.items()
        }
        self._loading: dict[str, asyncio.Future[Any]] = {}
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def like(cls, client: object, **kwargs: Any) -> PipelinedRedis | None:
        """A client to the server `client` (a redis-py client) talks to, with its address,
        credentials, database and TLS settings; None when that is not one plain server over
        TCP, TLS or a Unix socket (a Redis Cluster, fakeredis)."""
        if not isinstance(client, Redis):
            return None
        pool = client.connection_pool
        options = pool.connection_kwargs
        if pool.connection_class is SSLConnection:
            tls: ssl.SSLContext | None = _tls_context(options)
        elif pool.connection_class in (Connection, UnixDomainSocketConnection):
            tls = None
        else:
            return None
        if options.get("credential_provider") is not None:
            return None
        return cls(
            host=options.get("host", "127.0.0.1"),
            port=int(options.get("port", 6379)),
            path=options.get("path"),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            tls=tls,
            **kwargs,
        )

    # Calls --------------------------------------------------------------------------------

    async def execute(self, *args: Any, resend: bool = False) -> Any:
        """One command; its answer as hiredis parses it (bytes, int, list, None)."""
        packed = hiredis.pack_command(args)
        try:
            return await self._call(packed)
        except redis_errors.ConnectionError as exc:
            if not resend or " connecting to " in str(exc):
                raise
            return await self._call(packed)

    async def evalsha(
        self, name: str, keys: list[Any], args: list[Any], *, resend: bool = False
    ) -> Any:
        """EVALSHA of script `name`, loading it first when the server does not have it."""
        command = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        for _ in range(SCRIPT_LOADS):
            try:
                return await self.execute(*command, resend=resend)
            except redis_errors.NoScriptError:
                # Not run: load it and call again (a SCRIPT FLUSH may land in between).
                await self._load(name)
        return await self.execute(*command, resend=resend)

    async def _load(self, name: str) -> None:
        """SCRIPT LOAD `name`, once for all the calls that found it missing together."""
        loading = self._loading.get(name)
        if loading is None:
            loading = asyncio.ensure_future(self.execute("SCRIPT", "LOAD", self._sources[name]))
            self._loading[name] = loading
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(loading)

    async def _call(self, packed: bytes) -> Any:
        conn = await self._connection()
        answer = await conn.send(packed)
        if isinstance(answer, hiredis.ReplyError):
            raise BaseParser.parse_error(str(answer))  # type: ignore[no-untyped-call]
        return answer

    # The connection -----------------------------------------------------------------------

    async def _connection(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): the old connection is its own
            self._abandon()
            self._loop = loop
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        conn: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._path:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Protocol(self.where, self.timeout), self._path, ssl=self._tls
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Protocol(self.where, self.timeout),
                        self._host,
                        self._port,
                        ssl=self._tls,
                    )
                for command in self._hello:
                    answer = await conn.send(hiredis.pack_command(command))
                    if isinstance(answer, hiredis.ReplyError):
                        raise OSError(str(answer))
        except (OSError, TimeoutError, redis_errors.RedisError) as exc:
            if conn is not None:  # connected, but AUTH or SELECT failed or took too long
                conn.close("could not set up the connection")
            why = str(exc) or type(exc).__name__
            raise redis_errors.ConnectionError(f"Error connecting to {self.where}. {why}") from None
        self._conn = conn
        return conn

    def close(self) -> None:
        self._abandon()

    async def aclose(self) -> None:
        """Close the connection and let the loop finish closing it (before the loop ends);
        the next call opens a new one."""
        self._abandon()
        await asyncio.sleep(0)

    def _abandon(self) -> None:
        conn, self._conn, self._connecting = self._conn, None, None
        if conn is not None and self._loop is not None and not self._loop.is_closed():
            conn.close("client closed")


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """TLS as redis-py's SSLConnection sets it up (ssl_cert_reqs, ssl_ca_certs,
    ssl_certfile, ssl_keyfile, ssl_password, ssl_check_hostname)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(
            options["ssl_certfile"], options.get("ssl_keyfile"), options.get("ssl_password")
        )
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs is None or isinstance(reqs, str):
        reqs = {None: ssl.CERT_NONE, "none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
            reqs, ssl.CERT_REQUIRED
        )
    if reqs == ssl.CERT_NONE or not options.get("ssl_check_hostname", True):
        context.check_hostname = False
    context.verify_mode = reqs
    return context
