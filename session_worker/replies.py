"""The reply channel: one Redis list per request, with a TTL.

A command's script pushes its reply itself (lua/_prelude.lua, ``push_reply``), in the same
atomic call that applies the command. This module covers the rest: the error reply a worker
pushes for a command it cannot run (invalid, unknown task), and the caller's wait. A list
rather than pub/sub, so a caller that starts waiting after the reply was pushed still gets
it; the TTL, so a caller that gave up leaves nothing behind for long.
"""

from __future__ import annotations

import logging
import re
import time
from functools import cache
from typing import NamedTuple, cast

from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import RedisClient
from .errors import ReplyTimeout
from .models import ID_PATTERN, Reply

logger = logging.getLogger(__name__)

# A BLPOP timeout under 1 ms would be rounded to 0, which means "block forever".
_MIN_BLOCK = 0.01
# After a cut connection, before waiting again (Redis may be restarting).
_RECONNECT_PAUSE = 0.05
_ID = ID_PATTERN.removeprefix("^").removesuffix("$")


class ReplyKey(NamedTuple):
    """The parts of a well-formed reply key ``<prefix>:{<project>:<session>}:reply:<request>``."""

    project_id: str
    session_id: str
    request_id: str


@cache
def _reply_key_re(prefix: str) -> re.Pattern[str]:
    return re.compile(
        rf"{re.escape(prefix)}:\{{(?P<project>{_ID}):(?P<session>{_ID})\}}:reply:(?P<request>{_ID})"
    )


def parse_reply_key(prefix: str, key: object) -> ReplyKey | None:
    """The parts of `key` when it is a reply key under `prefix` (keys.py), else None."""
    if not isinstance(key, str):
        return None
    match = _reply_key_re(prefix).fullmatch(key)
    if match is None:
        return None
    return ReplyKey(match["project"], match["session"], match["request"])


def push_reply(client: RedisClient, reply_key: str, reply: Reply, ttl: int) -> None:
    """Append `reply` to the list `reply_key` and (re)set its TTL, atomically."""
    body = reply.model_dump_json(exclude_none=True)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(reply_key, body)
        pipe.expire(reply_key, ttl)
        pipe.execute()


def wait_reply(
    client: RedisClient, reply_key: str, timeout: float, *, max_block: float | None = None
) -> Reply:
    """Pop the reply from `reply_key`, waiting up to `timeout` seconds for it.

    `client` must have a socket timeout longer than one blocking wait, and no retries of its
    own (``connection.make_redis(wait_timeout=...)``): that wait is `timeout`, or `max_block`
    when given (the wait is then split into BLPOPs of at most that long). A cut connection
    is waited on again, within the same deadline. Raises errors.ReplyTimeout when nothing
    arrives in time. BLPOP removes the key once empty.
    """
    deadline = time.monotonic() + timeout
    remaining = timeout
    request_id = reply_key.rpartition(":reply:")[2]
    while True:
        try:
            raw = _pop(client, reply_key, remaining, max_block)
        except (RedisConnectionError, RedisTimeoutError):
            # A cut connection: wait again on a new one, for what is left of the timeout only
            # (a retry inside redis-py would block for the whole original wait once more).
            time.sleep(min(_RECONNECT_PAUSE, max(0.0, deadline - time.monotonic())))
            raw = None
        if raw is not None:
            reply = _reply_to(request_id, raw)
            if reply is not None:
                return reply
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplyTimeout(_timeout_message(reply_key, timeout))


def _reply_to(request_id: str, raw: bytes) -> Reply | None:
    """`raw` as the reply to `request_id`; None (logged, skipped) when it is not one: only
    someone writing to Redis directly can put anything else on a reply list."""
    try:
        reply = Reply.model_validate_json(raw)
    except ValidationError:
        logger.warning("skipped an entry of reply list %s that is no reply", request_id)
        return None
    if reply.request_id != request_id:
        logger.warning(
            "skipped a reply to request %s found on the reply list of %s",
            reply.request_id,
            request_id,
        )
        return None
    return reply


def _pop(
    client: RedisClient, reply_key: str, remaining: float, max_block: float | None
) -> bytes | None:
    if remaining < _MIN_BLOCK:
        return cast("bytes | None", client.lpop(reply_key))
    block = remaining if max_block is None else max(_MIN_BLOCK, min(remaining, max_block))
    # A float timeout: Redis >= 6 blocks with millisecond precision.
    popped = cast("list[bytes] | None", client.blpop([reply_key], timeout=block))
    return popped[1] if popped else None


def _timeout_message(reply_key: str, timeout: float) -> str:
    request = reply_key.rpartition(":reply:")[2] or reply_key
    return (
        f"no reply to request {request} within {timeout:g} s (reply key {reply_key}): "
        "are the workers running and consuming the queue, and is Redis reachable? "
        "Sending the command again with the same request id is safe."
    )
