"""How a request ended: decided in one place, logged in one place."""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from ._headers import escape_for_log

__all__ = ["Outcome", "WhatHappened", "decide_outcome", "log_outcome"]

log = logging.getLogger("ctxmiddleware")


class Outcome(enum.Enum):
    """Why a request ended. Every request has exactly one."""

    COMPLETED = "completed"
    """The response was sent in full (whatever its status)."""
    CLIENT_DISCONNECTED = "client_disconnected"
    """The client left before the response was complete (logged as 499)."""
    DEADLINE = "deadline"
    """The deadline passed: answered with the timeout status, or the response was aborted."""
    SERVER_SHUTDOWN = "server_shutdown"
    """The server cancelled the request from outside (shutdown)."""
    ERROR = "error"
    """The application raised an error of its own (a 500)."""


class WhatHappened(Protocol):
    """What an adapter recorded about a request (the request layer's Request)."""

    answered_timeout: bool
    """The middleware sent the timeout response."""
    complete: bool
    """The response was sent in full."""
    client_gone: bool
    """The client left (or the connection broke)."""
    cancelled_from_outside: bool
    """A ``CancelledError`` that is not ours ended the app."""
    failed: bool
    """The app raised an error that is not a consequence of the request's own
    cancellation."""

    def deadline_passed(self) -> bool:
        """The request's context ended with ``DeadlineExceeded``."""
        ...


def decide_outcome(request: WhatHappened) -> Outcome:
    """The one rule that says how a request ended (asking only what it needs:
    most requests are decided by the first two tests)."""
    if request.answered_timeout:
        return Outcome.DEADLINE
    if request.complete:
        return Outcome.COMPLETED
    if request.client_gone:
        return Outcome.CLIENT_DISCONNECTED
    if request.cancelled_from_outside:
        return Outcome.SERVER_SHUTDOWN
    if request.deadline_passed():
        return Outcome.DEADLINE
    if request.failed:
        return Outcome.ERROR
    return Outcome.COMPLETED


def log_outcome(
    outcome: Outcome, method: object, path: object, status: int, request_id: str
) -> None:
    """The middleware's own log line for a request it ended: 499 and deadlines.

    Completed requests and errors are the server's and the app's to log.
    Everything that came from the client is escaped: one record, one line.
    """
    if outcome is Outcome.CLIENT_DISCONNECTED:
        log.info(
            "%s %s 499 client disconnected request_id=%s",
            escape_for_log(method), escape_for_log(path), request_id,
        )
    elif outcome is Outcome.DEADLINE:
        log.warning(
            "%s %s %s deadline exceeded request_id=%s",
            escape_for_log(method), escape_for_log(path), status, request_id,
        )
