"""start and end for the shim's event loop: the Store's scripts, arguments and replies over
an auto-pipelined connection (pipelined.py) instead of a blocking redis-py call.

Nothing here decides anything: the KEYS/ARGV come from ``Store.command_args``, the script is
the same ``start.lua`` / ``end.lua`` the workers run, the reply is parsed by the same model
and passes the Store's ``returned`` hook (run metrics), and a new run's deadline goes into
the sweep's schedule as ``Store.start`` puts it there. A command with a request id may be
sent again after a lost connection (its request record answers the repeat); one without is
sent at most once. Where the pipelined client does not apply (a Redis Cluster, fakeredis),
the same calls go to the blocking store.
"""

from __future__ import annotations

from typing import Any

from .models import EndCommand, Reply, StartCommand
from .pipelined import PipelinedRedis
from .scripts import lua_source
from .settings import Settings
from .store import Store

HOT_SCRIPTS = ("start", "end")


class HotPath:
    """Async start and end over `store`'s layout: on one PipelinedRedis per event loop, or
    on `store` itself when `redis` is None."""

    def __init__(self, store: Store, redis: PipelinedRedis | None) -> None:
        self.store = store
        self.redis = redis

    @classmethod
    def like(cls, store: Store, client: object, settings: Settings) -> HotPath:
        """A hot path for `store` on the server `client` talks to, with the shim's Redis
        timeout (pipelined where PipelinedRedis.like can stand in for `client`)."""
        redis = PipelinedRedis.like(
            client,
            timeout=settings.http_redis_timeout,
            connect_timeout=min(settings.redis_connect_timeout, settings.http_redis_timeout),
            scripts={name: lua_source(name) for name in HOT_SCRIPTS},
        )
        return cls(store, redis)

    async def start(self, cmd: StartCommand, *, remember: bool = True) -> Reply:
        if self.redis is None:
            return self.store.start(cmd, remember=remember)
        reply = await self._command(self.redis, "start", cmd, Store.start_args(cmd), remember)
        entry = self.store.deadline_entry(cmd.project_id, cmd.session_id, reply)
        if entry is not None:
            key, member, score = entry
            await self.redis.execute("ZADD", key, score, member, resend=True)
        return reply

    async def end(self, cmd: EndCommand, *, remember: bool = True) -> Reply:
        if self.redis is None:
            return self.store.end(cmd, remember=remember)
        return await self._command(self.redis, "end", cmd, Store.end_args(cmd), remember)

    async def _command(
        self,
        redis: PipelinedRedis,
        kind: str,
        cmd: StartCommand | EndCommand,
        args: list[Any],
        remember: bool,
    ) -> Reply:
        prepared = self.store.command_args(kind, cmd, cmd.session_id, args, remember=remember)
        if isinstance(prepared, Reply):
            return prepared
        keys, argv = prepared
        raw = await redis.evalsha(kind, keys, argv, resend=remember)
        return Reply.model_validate_json(self.store.returned(raw))

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
