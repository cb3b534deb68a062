"""The errors a context reports from ``err()``."""

from __future__ import annotations

__all__ = ["Canceled", "ContextError", "DeadlineExceeded"]


class ContextError(Exception):
    """Base class of what ``Context.err()`` returns once a context is done.

    ``err()`` only ever returns a :class:`Canceled` or a :class:`DeadlineExceeded`;
    the reason a context was cancelled (its *cause*) is reported by
    :func:`ctxmiddleware.cause`, never by ``err()``.
    """

    # No __init__: these are created on every cancellation, and a Python-level
    # __init__ would triple the cost. The message comes from __str__.
    message = "context error"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class Canceled(ContextError):
    """The context was cancelled for a reason other than its deadline passing."""

    message = "context canceled"


class DeadlineExceeded(ContextError, TimeoutError):
    """The context's deadline passed.

    It is also a :class:`TimeoutError`, so code that already handles timeouts
    handles it too.
    """

    message = "context deadline exceeded"

    def __str__(self) -> str:
        # TimeoutError (an OSError) would otherwise format errno/strerror.
        return str(self.args[0]) if self.args else self.message
