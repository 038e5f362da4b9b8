"""Logging for every process: text or JSON lines, one structured line per command.

``SESSION_WORKER_LOG_FORMAT`` is ``text`` (default: ``time level logger: message``) or
``json`` (one object per line: ``time``, ``level``, ``logger``, ``message`` and, for a
command, its fields); ``SESSION_WORKER_LOG_LEVEL`` is the root level (``INFO``). Both
formats mask the password of any ``redis://``/``rediss://`` URL in a line; tokens are never
put in a log record in the first place.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from typing import Any, Final

import orjson

FORMAT_ENV: Final = "SESSION_WORKER_LOG_FORMAT"
LEVEL_ENV: Final = "SESSION_WORKER_LOG_LEVEL"
FORMATS: Final = ("text", "json")

# scheme://user:password@  ->  scheme://user:***@
_URL_PASSWORD = re.compile(r"(?i)\b((?:rediss?|redis\+\w+|valkeys?|unix)://[^:@/\s]*):([^@\s]+)@")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The extra= key that carries a command's fields (the JSON format puts them at top level).
FIELDS: Final = "sw_fields"


def mask_secrets(text: str) -> str:
    """`text` with the password of every Redis URL in it replaced by ``***``."""
    if "@" not in text:
        return text
    return _URL_PASSWORD.sub(r"\1:***@", text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a command's fields (extra=``{FIELDS: {...}}``) at top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return mask_secrets(orjson.dumps(entry, default=str).decode())


def log_format() -> str:
    value = os.environ.get(FORMAT_ENV, "text").strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def log_level(default: int | str = logging.INFO) -> int | str:
    value = os.environ.get(LEVEL_ENV, "").strip().upper()
    if not value:
        return default
    if value.isdigit():
        return int(value)
    if value not in logging.getLevelNamesMapping():
        raise ValueError(f"{LEVEL_ENV} is not a log level: {value!r}")
    return value


def formatter() -> logging.Formatter:
    return JsonFormatter() if log_format() == "json" else TextFormatter()


def configure(default_level: int | str = logging.INFO) -> None:
    """Send the root logger to stderr in the configured format and level (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_session_worker", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    handler._session_worker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(log_level(default_level))


def _text(value: object) -> str:
    """A field for a log line: short, on one line, "-" when absent."""
    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else repr(value)
    return text[:80].replace("\n", " ")


def log_command(
    logger: logging.Logger,
    *,
    via: str,
    kind: str,
    session: object,
    job: object,
    outcome: str,
    tag: int | None,
    request_id: object,
    seconds: float,
) -> None:
    """The one INFO line of a handled command (key=value text; fields in JSON)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    latency_ms = round(seconds * 1000, 3)
    fields = {
        "kind": kind,
        "session": _text(session),
        "job": _text(job),
        "outcome": outcome,
        "tag": tag,
        "request_id": _text(request_id),
        "latency_ms": latency_ms,
        "via": via,
    }
    logger.info(
        "kind=%s session=%s job=%s outcome=%s tag=%s request=%s latency_ms=%.2f via=%s",
        kind,
        fields["session"],
        fields["job"],
        outcome,
        "-" if tag is None else tag,
        fields["request_id"],
        latency_ms,
        via,
        extra={FIELDS: fields},
    )
