"""The Celery app, configured from Settings: `celery -A session_worker.celery_app worker`.

Delivery guarantees and their costs, in one place:

- JSON only. A pickled message is refused by the worker (kombu raises ContentDisallowed and
  the message is dropped), because unpickling runs code chosen by whoever can write to the
  broker.
- At least once, applied exactly once. ``task_acks_late`` acknowledges a message only after
  its command ran; a worker that dies before that never acknowledges it, so it is
  redelivered (after ``visibility_timeout``, below; with ``--pool prefork``,
  ``task_reject_on_worker_lost`` puts it back at once when only a pool process dies). A
  redelivered command is answered from its request record (SPEC §5), so running it twice
  is safe.
- ``visibility_timeout`` (``SESSION_WORKER_VISIBILITY_TIMEOUT``, seconds): a message taken by
  a worker that died without acknowledging it (machine lost, SIGKILL of the whole worker) is
  handed to another worker after this long. Every live worker sweeps for such messages every
  ``min(10, visibility_timeout / 3)`` seconds, so redelivery happens between
  ``visibility_timeout`` and about ``4/3 * visibility_timeout`` after the first delivery. It
  must exceed the longest time a message legitimately stays unacknowledged: a command runs
  for milliseconds, but a retry waits up to ``tasks.RETRY_BACKOFF_MAX`` seconds; a shorter
  timeout only costs duplicate deliveries, which the request records absorb.
- A queue entry that is not a message at all (not JSON, or JSON of another shape) is logged
  and dropped by the transport (broker.py) instead of ending the worker.
- No result backend: the command's script pushes its reply to the caller's reply list
  (replies.py), which is cheaper than a result backend and survives a late listener.
- Workers started while Redis is down keep trying to connect, and start consuming once it
  is up (``broker_connection_retry_on_startup``, ``broker_connection_max_retries=None``).
"""

from __future__ import annotations

import gc
import logging
import ssl
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown

from . import logs
from .connection import broker_url
from .settings import Settings, get_settings

TASK_PREFIX = "session_worker."
# How often (seconds, at most) a worker looks for messages whose worker died.
MAX_RESTORE_INTERVAL = 10.0


def task_name(kind: str) -> str:
    """The Celery task name of a command kind, e.g. ``session_worker.start``."""
    return TASK_PREFIX + kind


def broker_transport_options(settings: Settings) -> dict[str, object]:
    restore_interval = max(1.0, min(MAX_RESTORE_INTERVAL, settings.visibility_timeout / 3))
    return {
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for abandoned messages every `restore_interval` seconds (kombu otherwise
        # scans only every tenth sweep, i.e. every 100 s).
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": 1,
        # The lock a sweep holds while it restores such messages (a moment). kombu's 300 s
        # default let a lock left behind by a Redis killed mid-sweep hold up every
        # redelivery for five minutes.
        "unacked_mutex_expire": max(10, int(restore_interval * 3)),
        # A publish or an ack on a connection that died silently fails instead of hanging.
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
    }


def broker_ssl_options(url: str) -> dict[str, object] | None:
    """TLS options of the broker connection: certificate required for ``rediss://``."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if url.startswith("rediss://") else None


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app for workers and senders, configured from `settings`."""
    settings = settings or get_settings()
    app = Celery("session_worker", set_as_current=False)
    app.conf.update(
        broker_url=broker_url(settings),
        # kombu's Redis transport, refusing malformed queue entries instead of dying on them.
        broker_transport="session_worker.broker:Transport",
        # rediss://: verify the server's certificate, as the store's redis-py clients do.
        broker_use_ssl=broker_ssl_options(broker_url(settings)),
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Producer connections kept per process; a sender thread beyond this waits for one.
        broker_pool_limit=16,
        # Serialisation: JSON in and out, nothing else accepted.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
        # No result backend: replies travel on our reply lists.
        result_backend=None,
        task_ignore_result=True,
        # Delivery (see the module docstring).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task cut off by a lost broker connection is redelivered anyway; with acks_late
        # that is what Celery 6 will do by default.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Routing: every session_worker.* task on the configured queue.
        task_default_queue=settings.queue,
        task_routes={TASK_PREFIX + "*": {"queue": settings.queue}},
        # Operations.
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,  # Flower: tasks show from the moment they are sent
        worker_disable_rate_limits=True,
        include=["session_worker.tasks"],
    )
    # The Settings the tasks of this app use (tasks.py).
    app.session_worker_settings = settings
    return app


# Worker processes: our log format, and /metrics on SESSION_WORKER_METRICS_PORT (metrics.py).


@setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(loglevel: object = None, **_: Any) -> None:
    logs.configure(loglevel if isinstance(loglevel, int | str) and loglevel else logging.INFO)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _freeze_startup_objects(**_: Any) -> None:
    # Everything alive once the worker is up (Celery, kombu, the app, the models) stays for
    # the process's life: out of the collector's way, so a full collection in the middle of
    # a command does not walk it all (tens of milliseconds here).
    gc.collect()
    gc.freeze()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _serve_metrics(**_: Any) -> None:
    port = get_settings().metrics_port
    if port:
        from .metrics import serve_metrics

        serve_metrics(port)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _remove_metrics_dir(**_: Any) -> None:
    from .metrics import remove_owned_dir

    remove_owned_dir()


# What `celery -A session_worker.celery_app worker` runs: configured from the environment.
app = make_app()
app.set_current()
