"""Go's ``context.Context`` for Python: deadlines, cancellation and request values.

The core (this module's context functions) works in any asyncio or threaded
code; :class:`ContextMiddleware` gives every ASGI request its own context.
"""

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

__all__ = [
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
