"""Go's ``context.Context`` for Python: deadlines, cancellation and request values.

The core (this module's context functions) works in any asyncio or threaded
code; :class:`ContextMiddleware` gives every ASGI request its own context.
"""

from typing import TYPE_CHECKING, Any

from ._asgi import ContextMiddleware, route_timeout
from ._core import (
    AUTH_TOKEN,
    CAUSE_CHAIN,
    CLIENT_IP,
    REQUEST_ID,
    TRACEPARENT,
    CancelCauseFunc,
    Canceled,
    CancelFunc,
    CancelScope,
    ClientDisconnected,
    Context,
    ContextError,
    DeadlineExceeded,
    Done,
    Key,
    Secret,
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
from ._integrations._logging import RequestContextFilter, add_request_context
from ._request import (
    RequestOptions,
    Stats,
    disable_stats,
    enable_stats,
    request_id,
    set_request_context,
    set_request_timeout,
    set_route,
    stats,
    with_request_value,
)
from ._wsgi import WSGIContextMiddleware

__all__ = [
    "ContextTransport",
    "SyncContextTransport",
    "arq_abort_on_cancel",
    "arq_enqueue",
    "arq_job",
    "celery_revoke_on_cancel",
    "install_celery",
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
    "RequestOptions",
    "RouteTimeout",
    "add_request_context",
    "AUTH_TOKEN",
    "CLIENT_IP",
    "REQUEST_ID",
    "TRACEPARENT",
    "CAUSE_CHAIN",
    "ClientDisconnected",
    "ContextMiddleware",
    "WSGIContextMiddleware",
    "Secret",
    "route_timeout",
    "request_id",
    "set_request_context",
    "set_request_timeout",
    "with_request_value",
    "Stats",
    "disable_stats",
    "enable_stats",
    "set_route",
    "stats",
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
    from ._asgi._fastapi import RequestContext, RouteTimeout
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

# Optional integrations: their modules (and the drivers or frameworks they
# need) are imported only when one of these names is first used.
_LAZY = {
    "RequestContext": "._asgi._fastapi",
    "RouteTimeout": "._asgi._fastapi",
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
    "install_celery": "._integrations._celery",
    "celery_revoke_on_cancel": "._integrations._celery",
    "arq_abort_on_cancel": "._integrations._arq",
    "arq_enqueue": "._integrations._arq",
    "arq_job": "._integrations._arq",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ctxmiddleware' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # dir(ctxmiddleware) lists the lazily loaded names before their first use.
    return sorted({*globals(), *_LAZY})


try:  # the installed distribution's version (pyproject.toml's `version`)
    from importlib.metadata import version as _dist_version

    __version__: str = _dist_version("ctxmiddleware")
except ImportError:  # PackageNotFoundError: a source tree on sys.path, not installed
    __version__ = "0.1.0"  # keep equal to pyproject.toml's version
