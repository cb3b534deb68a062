"""WSGIContextMiddleware: a root Context per WSGI request, cancelled on disconnect and deadline."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Unpack

from .._core import CURRENT_CONTEXT
from .._request import RequestConfig, RequestOptions
from ._environ import EnvironHeaders
from ._exchange import ENVIRON_KEY, Environ, StartResponse, WsgiRequest

__all__ = ["WSGIContextMiddleware"]

WSGIApp = Callable[..., Iterable[bytes]]  # (environ, start_response)


class WSGIContextMiddleware:
    """Give every WSGI request a root :class:`~ctxmiddleware.Context`::

        app.wsgi_app = WSGIContextMiddleware(app.wsgi_app, timeout=30)

    The same options, values and rules as :class:`ContextMiddleware`. The
    context is ``environ["ctxmiddleware.context"]`` and ``current()`` in the
    request's thread (and in threads started with ``contextvars.copy_context()``).
    It is cancelled:

    * when the client disconnects before the response is complete, once the
      body has been read (cause :class:`ClientDisconnected`; logged as 499),
      where the server exposes the client socket (gunicorn, werkzeug, uWSGI)
      or ``waitress.client_disconnected`` (waitress with
      ``channel_request_lookahead`` > 0): one watcher thread per process;
    * at the deadline (the shared timer thread): a ``ContextError`` escaping
      the app before the response starts becomes the timeout status (504);
      after it, the response is aborted;
    * when the server closes the response iterable (Go's ``ServeHTTP`` return).

    A streaming response is stopped (its iterable closed) at a disconnect or
    the deadline. The app must cooperate: ``ctx.check()``,
    ``ctx.done().wait()``, the sync database helpers and the sync httpx client.
    """

    def __init__(self, app: WSGIApp, **options: Unpack[RequestOptions]) -> None:
        """``options``: those of :class:`ContextMiddleware` (see
        :class:`~ctxmiddleware.RequestOptions`), but ``request_id_factory`` and
        ``request_id_validator``, not supported here yet (a ``ValueError``)."""
        if not callable(app):
            raise TypeError(f"app must be a WSGI application, not {type(app).__name__}")
        self.app = app
        self.config = RequestConfig.from_options(**options)
        if self.config.custom_request_ids:
            raise ValueError(
                "request_id_factory and request_id_validator are not supported by "
                "WSGIContextMiddleware yet"
            )
        self.headers = EnvironHeaders(self.config)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request = WsgiRequest(self.config, environ, self.headers)
        request.server_start_response = start_response
        root = environ[ENVIRON_KEY] = request.root
        token = CURRENT_CONTEXT.set(root)
        try:
            if request.deadline_at <= request.arrival:
                # The caller's budget was spent on arrival: 504 without the app.
                root.err()
                answer = request.answer_now(None)
                request.finish()
                return answer
            request.begin(environ)
            if request.client_gone:
                # The client reset the connection while its body was read ahead.
                answer = request.answer_now(None)
                request.finish()
                return answer
            try:
                result = self.app(environ, request.start_response)
            except BaseException as exc:
                return request.app_raised(exc)
            return request.respond(result)
        finally:
            CURRENT_CONTEXT.reset(token)


