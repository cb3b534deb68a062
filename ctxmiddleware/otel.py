"""OpenTelemetry: mark the server span with how the request ended (the ``otel``
extra: ``opentelemetry-api``).

::

    import ctxmiddleware.otel
    ctxmiddleware.otel.instrument()   # once, at start-up

OpenTelemetry's ASGI and WSGI instrumentations record exceptions only: a
request cancelled because its client left ends with the span status unset
and no ``error.type``. With :func:`instrument`, when a request ends with an
outcome other than ``completed``, the active span (the server span of the
instrumentation around the middleware) gets:

* ``error.type``: ``client_disconnected``, ``deadline_exceeded`` or
  ``server_shutdown`` (an ``error`` keeps what the instrumentation recorded);
* the span status ``ERROR``, with the outcome as its description;
* ``ctxmiddleware.outcome``: the outcome (``client_disconnected``, ...);
* ``ctxmiddleware.deadline.budget_ms``: the request's whole budget (its
  deadline minus its arrival), if it had a deadline;
* ``ctxmiddleware.deadline.remaining_ms``: the budget left when it ended
  (0 for a deadline);
* ``ctxmiddleware.cancel.cause``: why its context was cancelled, as the
  cause's class name (``ClientDisconnected``, ``DeadlineExceeded``, ...).

Requests that complete are not touched. Turning this on turns the statistics
on (``ctxmiddleware.enable_stats()``): the span is marked from the request
layer's one hook at the end of every request.
"""

from __future__ import annotations

import math

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._core import DeadlineExceeded
from ._request import Outcome, Request, active_recorder, cause_name, enable_stats

__all__ = ["ERROR_TYPES", "instrument", "uninstrument"]

_SINK = "otel"

ERROR_TYPES = {
    Outcome.CLIENT_DISCONNECTED: "client_disconnected",
    Outcome.DEADLINE: "deadline_exceeded",
    Outcome.SERVER_SHUTDOWN: "server_shutdown",
}
"""The ``error.type`` each cancelled outcome sets."""


def _mark(
    request: Request, outcome: Outcome, method: str, route: str, remaining: float | None
) -> None:
    if outcome is Outcome.COMPLETED:
        return
    span = trace.get_current_span()
    if span.is_recording():
        _mark_span(span, request, outcome, remaining)


def _watch_end(request: Request) -> None:
    """At the request's start: the server span may end before the request
    does (the instrumentation ends it on the last body message, so a timeout
    response we send ends it): mark it then, if the deadline is why."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    end = span.end

    def end_marked(end_time: int | None = None) -> None:
        try:
            if request.outcome is None:  # (the request has not ended yet)
                root = getattr(request, "root", None)
                if root is not None and isinstance(root.err(), DeadlineExceeded):
                    _mark_span(span, request, Outcome.DEADLINE, 0.0)
        finally:
            vars(span).pop("end", None)  # (no cycle left behind)
            end(end_time)

    vars(span)["end"] = end_marked  # (an attribute of this span only)


def _mark_span(
    span: trace.Span, request: Request, outcome: Outcome, remaining: float | None
) -> None:
    span.set_attribute("ctxmiddleware.outcome", outcome.value)
    deadline = request.deadline_at
    if deadline != math.inf:
        span.set_attribute(
            "ctxmiddleware.deadline.budget_ms", round((deadline - request.arrival) * 1000.0, 1)
        )
    if remaining is not None:
        span.set_attribute("ctxmiddleware.deadline.remaining_ms", round(remaining * 1000.0, 1))
    why = cause_name(request)
    if why is not None:
        span.set_attribute("ctxmiddleware.cancel.cause", why)
    error_type = ERROR_TYPES.get(outcome)
    if error_type is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, error_type))
    else:  # Outcome.ERROR: the instrumentation recorded the exception
        span.set_status(Status(StatusCode.ERROR, outcome.value))


def instrument() -> None:
    """Mark the active span of every request that does not complete (idempotent)."""
    enable_stats().add_sink(_SINK, _mark, _watch_end)


def uninstrument() -> None:
    rec = active_recorder()
    if rec is not None:
        rec.add_sink(_SINK, None, None)
