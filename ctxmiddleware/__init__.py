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
    "ContextTransport",
    "SyncContextTransport",
    "aiosqlite_interruptible",
    "asyncpg_transaction",
    "httpx_async_client",
    "httpx_client",
    "psycopg_transaction",
    "psycopg_transaction_sync",
    "sqlalchemy_session",
    "sqlite_interruptible",
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
    from ._integrations._httpx import (
        ContextTransport,
        SyncContextTransport,
        httpx_async_client,
        httpx_client,
    )
    from ._integrations._postgres import (
        asyncpg_transaction,
        psycopg_transaction,
        psycopg_transaction_sync,
        sqlalchemy_session,
    )
    from ._integrations._sqlite import aiosqlite_interruptible, sqlite_interruptible
    from ._web._fastapi import RequestContext, RouteTimeout

# Optional integrations: their modules (and the drivers or frameworks they
# need) are imported only when one of these names is first used.
_LAZY = {
    "RequestContext": "._web._fastapi",
    "RouteTimeout": "._web._fastapi",
    "ContextTransport": "._integrations._httpx",
    "SyncContextTransport": "._integrations._httpx",
    "httpx_async_client": "._integrations._httpx",
    "httpx_client": "._integrations._httpx",
    "asyncpg_transaction": "._integrations._postgres",
    "psycopg_transaction": "._integrations._postgres",
    "psycopg_transaction_sync": "._integrations._postgres",
    "sqlalchemy_session": "._integrations._postgres",
    "aiosqlite_interruptible": "._integrations._sqlite",
    "sqlite_interruptible": "._integrations._sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ctxmiddleware' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
