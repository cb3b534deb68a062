"""Go's ``context.Context`` for Python: deadlines, cancellation and request values.

The core (this module's context functions) works in any asyncio or threaded
code; :class:`ContextMiddleware` gives every ASGI request its own context.
"""

from typing import TYPE_CHECKING, Any

from ._core._context import (
    CancelCauseFunc,
    CancelFunc,
    Context,
    Done,
    Key,
    after_func,
    background,
    bind,
    cause,
    current,
    todo,
    with_cancel,
    with_cancel_cause,
    with_deadline,
    with_deadline_cause,
    with_timeout,
    with_timeout_cause,
    with_value,
    without_cancel,
)
from ._core._errors import Canceled, ContextError, DeadlineExceeded
from ._core._scope import CancelScope
from ._integrations._logging import RequestContextFilter, add_request_context
from ._web._asgi import ContextMiddleware, route_timeout, set_request_timeout
from ._web._values import AUTH_TOKEN, CLIENT_IP, REQUEST_ID, ClientDisconnected, Secret

__all__ = [
    "RequestContext",
    "RequestContextFilter",
    "RouteTimeout",
    "add_request_context",
    "AUTH_TOKEN",
    "CLIENT_IP",
    "REQUEST_ID",
    "ClientDisconnected",
    "ContextMiddleware",
    "Secret",
    "route_timeout",
    "set_request_timeout",
    "CancelCauseFunc",
    "CancelFunc",
    "CancelScope",
    "Canceled",
    "Context",
    "ContextError",
    "DeadlineExceeded",
    "Done",
    "Key",
    "after_func",
    "background",
    "bind",
    "cause",
    "current",
    "todo",
    "with_cancel",
    "with_cancel_cause",
    "with_deadline",
    "with_deadline_cause",
    "with_timeout",
    "with_timeout_cause",
    "with_value",
    "without_cancel",
]

if TYPE_CHECKING:
    from ._web._fastapi import RequestContext, RouteTimeout


def __getattr__(name: str) -> Any:
    # FastAPI is optional: import its helpers only when asked for.
    if name in ("RequestContext", "RouteTimeout"):
        from ._web import _fastapi

        return getattr(_fastapi, name)
    raise AttributeError(f"module 'ctxmiddleware' has no attribute {name!r}")
