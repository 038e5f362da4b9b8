"""The broker transport: kombu's Redis transport, hardened against malformed messages.

kombu pops a message off the queue list and decodes its envelope (the JSON object that
carries the body, headers and delivery properties) inside the worker's event loop. An entry
that is not such an envelope (not JSON, or JSON of another shape), written to the list by
anything that can reach Redis, makes that decode raise, and Celery ends the whole worker
("Unrecoverable error"). This transport refuses such an entry instead: it is logged and
dropped (it has already left the list, and it is no task: there is nothing to redeliver),
and the worker goes on consuming. So is an envelope whose body Celery cannot even take
apart (JSON, but not a task's ``[args, kwargs, options]``): Celery raises out of its event
loop there too. Bodies that are not JSON, disallowed content types (pickle) and unknown
``session_worker.*`` task names are Celery's to refuse, and it does (the last with an error
reply). A well-formed message this service does not run is refused here as well: a task
outside ``session_worker.*`` (Celery's own built-ins, such as ``celery.chord_unlock``, would
otherwise run), a command that carries callbacks, errbacks, a chain or a chord (Celery
would send those on as new tasks after it), one with delivery headers Celery would choke on
in the worker's main loop (a time limit: commands take none; an eta that is no time or far
ahead), and one nested too deep to decode.

Used through ``broker_transport`` (celery_app.py); the broker URL stays ``redis://`` or
``rediss://``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The names of this service's tasks (celery_app.TASK_PREFIX; not imported, to keep the
# transport free of the app).
TASK_PREFIX = "session_worker."

logger = logging.getLogger(__name__)

# A call to the broker that failed with its connection.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# What decoding or delivering a malformed envelope raises (RecursionError: JSON nested
# deeper than the decoder goes).
MALFORMED_ENVELOPE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, RecursionError)
# The furthest in the future a command may be scheduled (its ``eta``): a worker's own retry
# waits at most tasks.RETRY_BACKOFF_MAX (30 s). A later one would sit unacknowledged in a
# worker, and come back after every visibility timeout.
MAX_ETA_SECONDS = 300


class RefusedMessage(TypeError):
    """A well-formed message this service does not run (see Transport._deliver)."""


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation, which keeps consuming after a failed ack.

    kombu forgets a delivered message only after removing it from the ``unacked`` set in
    Redis. When that call fails (its connection was cut), the message stays counted as
    delivered, the prefetch window (one message) stays full, and the worker never asks for
    another one: it is up, answers pings, and consumes nothing, for good. Here the message is
    forgotten locally either way. Left in the ``unacked`` set, it comes back after the
    visibility timeout, and its request record answers it without applying it again.
    """

    def ack(self, delivery_tag: Any) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS as exc:
            _unacknowledged(delivery_tag, exc)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)  # type: ignore[no-untyped-call]
            else:
                self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS as exc:
            _unacknowledged(delivery_tag, exc)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]


def _unacknowledged(delivery_tag: Any, exc: BaseException) -> None:
    logger.warning(
        "could not acknowledge message %s (%s: %s); it is redelivered after the visibility "
        "timeout and answered from its request record",
        delivery_tag,
        type(exc).__name__,
        exc,
    )


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except MALFORMED_ENVELOPE_ERRORS as exc:
            _refused(exc)
            return True

    def _get(self, queue: str, timeout: Any = None) -> Any:
        while True:
            try:
                return super()._get(queue)  # type: ignore[no-untyped-call]
            except MALFORMED_ENVELOPE_ERRORS as exc:
                _refused(exc)


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        if not _is_envelope(message):
            raise TypeError(f"not a kombu message envelope: {_shorten(message)}")
        # (Remote control messages, on the pidbox queues, are no tasks: Celery's own.)
        refusal = "" if queue.endswith(".pidbox") else _refusal(message)
        if refusal:
            raise RefusedMessage(refusal)
        try:
            super()._deliver(message, queue)  # type: ignore[no-untyped-call]
        except MALFORMED_ENVELOPE_ERRORS:
            # Celery gave up on it after kombu took it as unacknowledged: acknowledge it, or
            # it would hold the worker's only prefetch slot and come back every
            # visibility timeout.
            self._acknowledge(message["properties"]["delivery_tag"])
            raise

    def _acknowledge(self, delivery_tag: Any) -> None:
        for channel in self.channels:
            if delivery_tag in channel.qos._delivered:
                channel.qos.ack(delivery_tag)


def _is_envelope(message: Any) -> bool:
    """The shape kombu's virtual Message needs to be built at all."""
    if not isinstance(message, dict):
        return False
    properties = message.get("properties")
    return (
        isinstance(properties, dict)
        and isinstance(properties.get("delivery_info"), dict)
        and "delivery_tag" in properties
        and isinstance(message.get("headers", {}), dict)
    )


def _refusal(message: dict[str, Any]) -> str:
    """Why a message is not ours to run ("" when it is): a task outside session_worker (such
    as Celery's own celery.chord_unlock), or a command carrying callbacks, errbacks, a chain
    or a chord (the workers would send those on as new tasks). Only someone writing to the
    broker directly can send either; the commands SessionClient sends never are."""
    headers = message.get("headers", {})
    task = headers.get("task")
    if not isinstance(task, str) or not task.startswith(TASK_PREFIX):
        return f"a task outside {TASK_PREFIX}*: {_shorten(task)}"
    header_refusal = _header_refusal(task, headers)
    if header_refusal:
        return header_refusal
    body = message.get("body")
    if not isinstance(body, str) or message.get("content-type") != "application/json":
        return ""  # Celery refuses what it cannot decode, and logs it
    try:
        raw = base64.b64decode(body, validate=True) if _is_base64(message) else body
        decoded = json.loads(raw)
    except RecursionError:
        return f"{task} with a body nested too deep to decode"
    except (ValueError, TypeError):
        return ""
    embed = decoded[2] if isinstance(decoded, list) and len(decoded) == 3 else None
    if isinstance(embed, dict):
        canvas = [k for k in ("callbacks", "errbacks", "chain", "chord") if embed.get(k)]
        if canvas:
            return f"{task} carrying {', '.join(canvas)}"
    return ""


def _header_refusal(task: str, headers: dict[str, Any]) -> str:
    """Why the delivery headers are not a command's ("" when they are). Celery reads some of
    them in the worker's main loop, where a value of the wrong type ends the worker (a time
    limit that is not a number) or holds its one prefetch slot (a command scheduled far
    ahead). SessionClient sends none of them; a worker's retry sets a short eta."""
    timelimit = headers.get("timelimit")
    if timelimit is not None and (
        not isinstance(timelimit, list | tuple) or any(limit is not None for limit in timelimit)
    ):
        return f"{task} with a time limit ({_shorten(timelimit)}): commands take none"
    eta = headers.get("eta")
    if eta is not None:
        try:
            when = dt.datetime.fromisoformat(eta)
        except (TypeError, ValueError):
            return f"{task} with an eta that is no ISO 8601 time: {_shorten(eta)}"
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        if (when - dt.datetime.now(dt.UTC)).total_seconds() > MAX_ETA_SECONDS:
            return f"{task} scheduled more than {MAX_ETA_SECONDS} s ahead (eta {eta})"
    return ""


def _is_base64(message: dict[str, Any]) -> bool:
    return bool(message["properties"].get("body_encoding") == "base64")


def _refused(exc: BaseException) -> None:
    if isinstance(exc, RefusedMessage):
        logger.error("refused a message this service does not run (dropped): %s", exc)
        return
    reason = _shorten(f"{type(exc).__name__}: {exc}")
    logger.error("refused a malformed message on the queue (dropped): %s", reason)


def _shorten(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
