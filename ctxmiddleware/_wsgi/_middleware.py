"""WSGIContextMiddleware: a root Context per WSGI request, cancelled on disconnect and deadline."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping

from .._core import CURRENT_CONTEXT, Context
from .._request import RequestConfig, ValuesHook
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

    def __init__(
        self,
        app: WSGIApp,
        *,
        timeout: float | datetime.timedelta | None = 30.0,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
        request_id_header: str = "x-request-id",
        timeout_header: str = "x-request-timeout-ms",
        timeout_status: int = 504,
        timeout_body: bytes = b"Gateway Timeout",
        values: ValuesHook | None = None,
        base: Context | None = None,
        disconnect_grace: float = 0.001,
        budget_headers: Mapping[str, str | None] | None = None,
        request_start_header: str | None = "x-request-start",
        request_id_from_traceparent: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application, not {type(app).__name__}")
        self.app = app
        self.config = RequestConfig.from_options(
            timeout=timeout,
            trusted_proxies=trusted_proxies,
            forwarded_header=forwarded_header,
            request_id_header=request_id_header,
            timeout_header=timeout_header,
            timeout_status=timeout_status,
            timeout_body=timeout_body,
            values=values,
            base=base,
            disconnect_grace=disconnect_grace,
            budget_headers=budget_headers,
            request_start_header=request_start_header,
            request_id_from_traceparent=request_id_from_traceparent,
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


