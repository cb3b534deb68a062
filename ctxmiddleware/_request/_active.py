"""The request's context, as the app sees it: ``set_request_context``,
``with_request_value`` and ``request_id``."""

from __future__ import annotations

from typing import TypeVar, overload

from .._core import REQUEST_ID, Context, Key, current, root_of, with_value
from ._request import request_of

__all__ = ["request_id", "set_request_context", "with_request_value"]

T = TypeVar("T")


def set_request_context(ctx: Context) -> None:
    """Make ``ctx`` the request's context for the rest of the request.

    ``ctx`` must derive from the request's context (``with_value``,
    ``with_timeout``, ``with_cancel`` of ``current()``; not
    ``without_cancel``). Afterwards ``ctxmiddleware.current()`` (in the
    request's task, the tasks it creates and its worker threads, sync
    endpoints and dependencies included), ``request.state.ctx`` and FastAPI's
    ``RequestContext`` all return ``ctx``. Call it from a middleware, an
    endpoint or a dependency (async or sync, ``yield`` or not): unlike
    ``with bind(ctx):`` it sets no ``ContextVar``, so nothing needs resetting
    in the same thread or task. Raises ``RuntimeError`` outside a request
    served by the middleware.
    """
    if not isinstance(ctx, Context):
        raise TypeError(f"set_request_context() takes a Context, not {type(ctx).__name__}")
    request = request_of(ctx)
    root = root_of(ctx)
    if request is None or root is None:
        raise RuntimeError(
            "set_request_context() needs a context derived from a request served by "
            "ContextMiddleware (current(), request.state.ctx or RequestContext)"
        )
    root.active = None if ctx is root else ctx
    request.context_swapped(ctx)


@overload
def with_request_value(key: Key[T], value: T) -> Context: ...
@overload
def with_request_value(key: object, value: object) -> Context: ...
def with_request_value(key: object, value: object) -> Context:
    """Add ``key`` -> ``value`` to the request's context for the rest of the
    request, and return the new context::

        user = await authenticate(request)
        ctxmiddleware.with_request_value(USER, user)  # current(), request.state.ctx, ...: ctx

    Shorthand for ``set_request_context(with_value(current(), key, value))``.
    """
    ctx = with_value(current(), key, value)
    set_request_context(ctx)
    return ctx


def request_id() -> str | None:
    """The current request's id (``REQUEST_ID``), or None outside a request."""
    rid = current().value(REQUEST_ID)
    return rid if isinstance(rid, str) else None
