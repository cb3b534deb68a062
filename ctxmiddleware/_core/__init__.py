"""The core: Go's context package for asyncio and threads. It imports no web framework.

The other layers of the package (the request layer, the ASGI/WSGI adapters,
the integrations) import from here only, never from the core's modules:
this list is the core's internal API.
"""

from ._context import (
    CURRENT_CONTEXT,
    CancelCauseFunc,
    CancelFunc,
    Context,
    Done,
    Key,
    RootContext,
    ValueSource,
    after_func,
    background,
    bind,
    cause,
    current,
    root_of,
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
from ._driver_errors import async_errors_as_ctx_err, errors_as_ctx_err, raise_if_done
from ._errors import Canceled, ContextError, DeadlineExceeded
from ._keys import AUTH_TOKEN, CLIENT_IP, REQUEST_ID, ClientDisconnected, Secret
from ._scope import CancelScope, TaskCancellation, redeliver_cancellation
from ._wire import parse_budget_ms

__all__ = [
    "AUTH_TOKEN",
    "CLIENT_IP",
    "CURRENT_CONTEXT",
    "REQUEST_ID",
    "CancelCauseFunc",
    "CancelFunc",
    "CancelScope",
    "Canceled",
    "ClientDisconnected",
    "Context",
    "ContextError",
    "DeadlineExceeded",
    "Done",
    "Key",
    "RootContext",
    "Secret",
    "TaskCancellation",
    "ValueSource",
    "after_func",
    "async_errors_as_ctx_err",
    "background",
    "bind",
    "cause",
    "current",
    "errors_as_ctx_err",
    "parse_budget_ms",
    "raise_if_done",
    "redeliver_cancellation",
    "root_of",
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
