"""One error root and the domain errors; each knows its HTTP status and reply code."""

from __future__ import annotations


class SessionWorkerError(Exception):
    """Root of every error this package raises on purpose."""

    code = "error"
    status = 500
    title = "Internal error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class BadRequest(SessionWorkerError):
    code, status, title = "bad_request", 400, "Bad request"


class NotFound(SessionWorkerError):
    code, status, title = "not_found", 404, "Not found"


class Conflict(SessionWorkerError):
    code, status, title = "conflict", 409, "Conflict"


class IdempotencyMismatch(SessionWorkerError):
    code, status, title = "idempotency_mismatch", 422, "Request id reused"


class Unavailable(SessionWorkerError):
    code, status, title = "unavailable", 503, "Service unavailable"


class ReplyTimeout(SessionWorkerError):
    code, status, title = "timeout", 504, "No reply in time"


ERRORS_BY_CODE: dict[str, type[SessionWorkerError]] = {
    cls.code: cls
    for cls in (BadRequest, NotFound, Conflict, IdempotencyMismatch, Unavailable, ReplyTimeout)
}


def error_from_code(code: str, description: str) -> SessionWorkerError:
    return ERRORS_BY_CODE.get(code, SessionWorkerError)(description)
