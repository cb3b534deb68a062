"""Django: a request Context per request, cancelled on disconnect and deadline.

::

    MIDDLEWARE = ["ctxmiddleware.django.ContextMiddleware", ...]   # first
    CTXMIDDLEWARE = {"timeout": 30, "trusted_proxies": ["10.0.0.0/8"]}

The context is ``request.ctx`` (and ``ctxmiddleware.current()``), under
Django's WSGI handler and its ASGI handler, in sync and async views. Under
WSGI the process's disconnect watcher cancels it when the client leaves
(gunicorn, werkzeug, uWSGI, waitress); under ASGI Django itself notices the
disconnect and cancels the view's task, and the context is then cancelled
with cause ``ClientDisconnected`` too. At the deadline an async view is
cancelled (a sync one cooperates through ``ctx.check()`` and the database)
and the client gets the timeout status (504), with the request id.

Queries the ORM runs for the request are cancelled on the server when the
context is done (PostgreSQL with psycopg 3: an out-of-band cancel; SQLite:
``interrupt()``), and PostgreSQL's ``statement_timeout`` follows the
remaining budget: see :func:`install_query_cancel` (installed by the
middleware unless ``CTXMIDDLEWARE = {"cancel_queries": False}``).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from ._core import (
    CURRENT_CONTEXT,
    ClientDisconnected,
    Context,
    ContextError,
    DeadlineExceeded,
    after_func,
    cause,
    current,
    root_of,
)
from ._request import Request, RequestConfig
from ._wsgi import ENVIRON_KEY, EnvironHeaders, WsgiRequest

__all__ = ["ContextMiddleware", "install_query_cancel"]

_HTTP1 = ("1.1", "1.0")


def _config() -> tuple[RequestConfig, bool]:
    options = dict(getattr(settings, "CTXMIDDLEWARE", None) or {})
    cancel_queries = bool(options.pop("cancel_queries", True))
    try:
        return RequestConfig.from_options(**options), cancel_queries
    except TypeError as exc:
        raise TypeError(f"settings.CTXMIDDLEWARE: {exc}") from None


def _answer(request: Request) -> HttpResponse:
    """The root is done and the view gave up: the timeout status for a
    deadline, 499 after a disconnect (nobody reads it)."""
    config = request.config
    if isinstance(request.root.err(), DeadlineExceeded) and not request.client_gone:
        request.answered_timeout = True
        response = HttpResponse(
            config.timeout_body, status=config.timeout_status,
            content_type="text/plain; charset=utf-8",
        )
    else:
        response = HttpResponse(
            b"", status=499, reason="Client Closed Request",
            content_type="text/plain; charset=utf-8",
        )
    # Our own log line says what happened (499, or the deadline with its
    # cause): not Django's "Gateway Timeout: /path" warning too.
    response._has_been_logged = True
    return response


class _DjangoWsgiRequest(WsgiRequest):
    """A WSGI request whose response is Django's (not a start_response)."""

    def begin_django(self, environ: Any) -> None:
        # Django has wrapped wsgi.input already (WSGIRequest's LimitedStream):
        # no read-ahead here. A request with a body is watched once the view
        # has returned; one without at once.
        self.root.arm()
        from ._wsgi import client_probe

        fd, probe = client_probe(environ)
        self.fd, self.probe = fd, probe
        if self.body_size() == 0:
            self.body_read()


class ContextMiddleware:
    """``"ctxmiddleware.django.ContextMiddleware"``: put it first in ``MIDDLEWARE``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.config, cancel_queries = _config()
        self.headers = EnvironHeaders(self.config)
        self.rid_header = self.config.request_id_header.decode("latin-1")
        if cancel_queries:
            install_query_cancel()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    # -- WSGI (and sync middleware chains) -------------------------------------

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        environ = getattr(request, "environ", None)
        if environ is None:
            return self.get_response(request)
        outer = environ.get(ENVIRON_KEY)
        if outer is not None:  # WSGIContextMiddleware wraps the whole app
            request.ctx = outer
            return self.get_response(request)
        req = _DjangoWsgiRequest(self.config, environ, self.headers)
        root = request.ctx = environ[ENVIRON_KEY] = req.root
        token = CURRENT_CONTEXT.set(root)
        try:
            if req.deadline_at <= req.arrival:
                root.err()
                response: HttpResponseBase = _answer(req)
            else:
                req.begin_django(environ)
                response = self.get_response(request)
        except BaseException:
            req.failed = True
            CURRENT_CONTEXT.reset(token)
            req.finish()
            raise
        CURRENT_CONTEXT.reset(token)
        self._finish_later(req, response)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        """A view raised the request's own ``ctx.err()`` (or failed because the
        request was cancelled): answer it, without Django's error log."""
        ctx = getattr(request, "ctx", None)
        root = root_of(ctx) if ctx is not None else None
        if root is None or root.err() is None:
            return None
        source = root.source
        if not isinstance(source, Request):
            return None
        if isinstance(exception, ContextError) or isinstance(cause(root), ClientDisconnected):
            return _answer(source)
        return None

    def _finish_later(self, req: Request, response: HttpResponseBase) -> None:
        """Tag the response; end the request when the server closes it."""
        response[self.rid_header] = req.request_id
        req.status = response.status_code
        if isinstance(response, StreamingHttpResponse) and not response.is_async:
            response.streaming_content = _stream(req, response.streaming_content)
        elif not req.answered_timeout and response.status_code != 499:
            req.complete = True
        if isinstance(req, _DjangoWsgiRequest):
            req.body_read()  # (a request with a body: watch while streaming)
            end: Callable[[], None] = req.finish
        else:
            end = _async_end(req)
        response._resource_closers.append(end)

    # -- ASGI ------------------------------------------------------------------

    async def __acall__(self, request: HttpRequest) -> Any:
        scope: Any = getattr(request, "scope", None)
        if scope is None:
            return await self.get_response(request)
        outer = (scope.get("state") or {}).get("ctx")
        if outer is not None:  # ContextMiddleware wraps the whole app
            request.ctx = outer
            return await self.get_response(request)
        client = scope.get("client")
        req = Request(
            self.config, client[0] if client else None, scope.get("headers", []),
            scope.get("http_version") not in _HTTP1, scope,
        )
        root = request.ctx = req.root
        token = CURRENT_CONTEXT.set(root)
        try:
            if req.deadline_at <= req.arrival:
                root.err()
                response = _answer(req)
            else:
                root.arm()
                try:
                    async with root.scope():
                        response = await self.get_response(request)
                except ContextError:
                    response = _answer(req)
        except asyncio.CancelledError:
            # Django's ASGI handler cancels the view's task when the client
            # disconnects (a server shutdown cancels it too; the client is
            # gone either way).
            req.client_gone = True
            root.cancel(ClientDisconnected())
            _async_end(req)()
            raise
        except BaseException:
            req.failed = True
            _async_end(req)()
            raise
        finally:
            CURRENT_CONTEXT.reset(token)
        self._finish_later(req, response)
        return response


def _async_end(req: Request) -> Callable[[], None]:
    """End ``req`` (once), its root bound so log filters see the request id."""

    def end() -> None:
        if req.outcome is not None:
            return
        root = getattr(req, "root", None)
        if root is None:
            return
        token = CURRENT_CONTEXT.set(root)
        try:
            req.end(None, None)
        finally:
            CURRENT_CONTEXT.reset(token)

    return end


def _stream(req: Request, content: Iterator[bytes]) -> Iterator[bytes]:
    """A streaming response's content: bound to the request's context, stopped
    (closed) when it is done."""
    root = req.root
    it = iter(content)
    try:
        while True:
            if root.err() is not None:
                if isinstance(root.err(), DeadlineExceeded) and not req.client_gone:
                    raise root.err()  # type: ignore[misc]  # abort: never a response that looks whole
                return
            token = CURRENT_CONTEXT.set(root)
            try:
                chunk = next(it)
            except StopIteration:
                req.complete = True
                return
            finally:
                CURRENT_CONTEXT.reset(token)
            yield chunk
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


# -- the ORM -------------------------------------------------------------------

_installed = False
_install_lock = threading.Lock()
_CANCEL_WAIT = 5.0


def install_query_cancel() -> None:
    """Cancel every ORM query on the server when ``current()`` is done, and
    keep PostgreSQL's ``statement_timeout`` within the remaining budget.

    Adds an execute wrapper to every database connection Django opens (and to
    those already open in this thread). Queries run outside a request, or
    under a context without deadline nor cancellation, pass through.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    from django.db import connections
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, weak=False)
    for conn in connections.all(initialized_only=True):
        _add_wrapper(conn)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    _add_wrapper(connection)


def _add_wrapper(connection: Any) -> None:
    if _query_wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, _query_wrapper)


def _cancel_for(connection: Any) -> Callable[[], object] | None:
    raw = connection.connection
    if raw is None:
        return None
    if connection.vendor == "postgresql":
        pgconn = getattr(raw, "pgconn", None)  # psycopg 3
        if pgconn is not None:
            return pgconn.get_cancel().cancel  # type: ignore[no-any-return]
        cancel = getattr(raw, "cancel", None)  # psycopg2
        return cancel if callable(cancel) else None
    if connection.vendor == "sqlite":
        return raw.interrupt  # type: ignore[no-any-return]
    return None


def _statement_timeout(connection: Any, ctx: Context) -> None:
    """PostgreSQL's statement_timeout within the remaining budget: set at the
    first query of each context on each (re)opened connection, again when the
    budget has shrunk by a fifth, reset for a context without a deadline."""
    raw = connection.connection
    remaining = ctx.remaining()
    have = getattr(connection, "_ctxmiddleware_timeout", None)  # (raw, ctx, ms)
    if have is not None and have[0] is not raw:
        have = None  # a new connection: the server's default applies
    if remaining is None:
        if have is not None and have[2] is not None:
            with raw.cursor() as cur:
                cur.execute("SET statement_timeout = DEFAULT")
            connection._ctxmiddleware_timeout = (raw, ctx, None)
        return
    ms = max(1, math.ceil(remaining * 1000))
    if have is None or have[1] is not ctx or have[2] is None or have[2] > ms * 1.25:
        with raw.cursor() as cur:
            cur.execute(f"SET statement_timeout = {int(ms)}")
        connection._ctxmiddleware_timeout = (raw, ctx, ms)


def _query_wrapper(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    ctx = current()
    if root_of(ctx) is None and ctx.deadline() is None:
        return execute(sql, params, many, context)  # not under a request
    ctx.check()
    connection = context["connection"]
    if connection.vendor == "postgresql" and not connection.needs_rollback:
        _statement_timeout(connection, ctx)
    cancel = _cancel_for(connection)
    if cancel is None:
        return execute(sql, params, many, context)
    finished = threading.Event()

    def run_cancel() -> None:
        try:
            cancel()
        finally:
            finished.set()

    stop = after_func(ctx, run_cancel)
    try:
        return execute(sql, params, many, context)
    except Exception as exc:
        err = ctx.err()
        if err is not None:
            raise err from exc
        raise
    finally:
        if not stop():
            finished.wait(_CANCEL_WAIT)  # a late cancel must not hit the next query
