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
from ._keys import (
    AUTH_TOKEN,
    CAUSE_CHAIN,
    CLIENT_IP,
    REQUEST_ID,
    TRACEPARENT,
    ClientDisconnected,
    Secret,
)
from ._scope import (
    CancelScope,
    TaskCancellation,
    cancellation_as_ctx_err,
    redeliver_cancellation,
)
from ._stats import (
    cancel_counts,
    count_cancel,
    downstream_call,
    note_wait,
    set_cancel_listener,
    set_wait_observer,
)
from ._wire import (
    BUDGET_FORMATS,
    format_grpc_timeout,
    parse_budget,
    parse_budget_ms,
    parse_grpc_timeout,
    parse_request_start,
    parse_traceparent,
)

__all__ = [
    "AUTH_TOKEN",
    "BUDGET_FORMATS",
    "CAUSE_CHAIN",
    "CLIENT_IP",
    "CURRENT_CONTEXT",
    "REQUEST_ID",
    "TRACEPARENT",
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
    "cancellation_as_ctx_err",
    "cause",
    "current",
    "errors_as_ctx_err",
    "format_grpc_timeout",
    "parse_budget",
    "parse_budget_ms",
    "parse_grpc_timeout",
    "parse_request_start",
    "parse_traceparent",
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

# What the integrations report (issue 11: stats, the live requests page).
__all__ += [
    "cancel_counts",
    "count_cancel",
    "downstream_call",
    "note_wait",
    "set_cancel_listener",
    "set_wait_observer",
]
