"""Flask: a request Context per request, cancelled on disconnect and deadline.

::

    from flask import Flask, g
    from ctxmiddleware.flask import ContextExtension

    app = Flask(__name__)
    app.config["CTXMIDDLEWARE_TIMEOUT"] = 30
    ContextExtension(app)            # or ext = ContextExtension(); ext.init_app(app)

    @app.get("/report")
    def report():
        with ctxmiddleware.psycopg_transaction_sync(pool) as conn:   # stops with the request
            return conn.execute("SELECT ...").fetchall()

The context is ``flask.g.ctx`` (read-only; and ``ctxmiddleware.current()``). Options are
``WSGIContextMiddleware``'s, read from ``app.config`` as ``CTXMIDDLEWARE_<NAME>``
(``CTXMIDDLEWARE_TIMEOUT``, ``CTXMIDDLEWARE_TRUSTED_PROXIES``, ...); keyword
arguments to the extension are the defaults.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request

from ._core import ContextError, root_of
from ._wsgi import ENVIRON_KEY, WSGIContextMiddleware

__all__ = ["OPTIONS", "ContextExtension"]

OPTIONS = (
    "timeout",
    "trusted_proxies",
    "forwarded_header",
    "request_id_header",
    "timeout_header",
    "timeout_status",
    "timeout_body",
    "values",
    "base",
    "disconnect_grace",
    "budget_headers",
    "request_start_header",
    "request_id_from_traceparent",
)


class ContextExtension:
    """The Flask extension: wraps ``app.wsgi_app`` in :class:`WSGIContextMiddleware`."""

    def __init__(self, app: Flask | None = None, **defaults: Any) -> None:
        unknown = set(defaults) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown ctxmiddleware options: {sorted(unknown)}")
        self.defaults = defaults
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        options = dict(self.defaults)
        for name in OPTIONS:
            key = f"CTXMIDDLEWARE_{name.upper()}"
            if key in app.config:
                options[name] = app.config[key]
        middleware = WSGIContextMiddleware(app.wsgi_app, **options)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions["ctxmiddleware"] = middleware
        # g.ctx costs nothing until read: a property of the app's g class
        # (a before_request hook would cost every request ~1% of a hello world).
        base = app.app_ctx_globals_class
        if not issubclass(base, _CtxGlobals):
            app.app_ctx_globals_class = type("CtxGlobals", (_CtxGlobals, base), {})  # type: ignore[assignment]
        app.register_error_handler(ContextError, _context_error)


class _CtxGlobals:
    """Mixed into ``flask.g``'s class: ``g.ctx`` is the request's context."""

    @property
    def ctx(self) -> Any:
        return request.environ.get(ENVIRON_KEY)


def _context_error(exc: ContextError) -> Response:
    # The request's own cancellation (a deadline, a disconnect) reached Flask:
    # a 500 the middleware answers as the timeout status (or nothing, for a
    # client that left), without Flask's traceback in the log. Any other
    # context's error is an ordinary error of the app.
    ctx = request.environ.get(ENVIRON_KEY)
    root = root_of(ctx) if ctx is not None else None
    if root is None or root.err() is None:
        from flask import current_app

        current_app.log_exception((type(exc), exc, exc.__traceback__))  # type: ignore[arg-type]
    return Response(b"Internal Server Error", status=500)
