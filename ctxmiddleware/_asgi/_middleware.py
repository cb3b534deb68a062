"""ContextMiddleware: a root Context per ASGI request, cancelled on disconnect and deadline."""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, Unpack

from .._core import CURRENT_CONTEXT, ClientDisconnected
from .._request import (
    CustomRequestId,
    Request,
    RequestConfig,
    RequestOptions,
    positive_seconds,
    set_request_timeout,
)
from ._exchange import SENDS_RAISE, AsgiRequest, sends_raise
from ._types import ASGIApp, Message, Receive, Scope, Send
from ._watch import Watchdog

__all__ = ["ContextMiddleware", "route_timeout"]

_HTTP1 = ("1.1", "1.0")
_NO_ASGI: dict[str, object] = {}


class ContextMiddleware:
    """Give every request a root :class:`~ctxmiddleware.Context`.

    ::

        app.add_middleware(ContextMiddleware, timeout=30)

    The context is ``request.state.ctx`` and ``ctxmiddleware.current()`` inside
    the request. It carries :data:`REQUEST_ID`, :data:`CLIENT_IP` and, if the
    request has a bearer token, :data:`AUTH_TOKEN`; it is cancelled:

    * when the client disconnects before the response is complete: the app
      is cancelled, ``cause(ctx)`` is :class:`ClientDisconnected`, nothing more
      is sent, and the request is logged as 499;
    * at the deadline: ``timeout`` seconds (or a ``timedelta``) after arrival
      (``None``: none), shortened (never extended) by the caller's
      ``x-request-timeout-ms``, ``grpc-timeout``, ``connect-timeout-ms`` or
      ``x-envoy-expected-rq-timeout-ms`` (``budget_headers`` maps header names
      to formats, ``"ms"`` or ``"grpc"``, or ``None`` to stop reading one), and
      by the time spent queued behind a trusted proxy (``request_start_header``,
      ``X-Request-Start``; a request whose budget was spent in the queue gets
      the 504 without running the app). The app is cancelled and the client gets a 504,
      or, if the response had already started, the response is aborted;
    * when the app returns (``Canceled``), like Go's ``ServeHTTP``. Work that
      must outlive the request takes ``without_cancel(ctx)``.

    After the response is complete the app is no longer interrupted (so
    ``BackgroundTasks`` run), but the context still expires at its deadline.

    ``trusted_proxies`` lists the IPs or CIDRs whose forwarding header
    (``forwarded_header``: ``"x-forwarded-for"`` or ``"forwarded"``) is
    believed, hop by hop from the right. Run uvicorn with ``--no-proxy-headers``
    so that this middleware, not the server, decides whom to trust. ``values``
    is a hook returning extra ``(key, value)`` pairs to bind for each request;
    ``base`` is the context every request derives from (cancel it to cancel
    them all). ``request_id_factory(scope)`` makes new request ids and
    ``request_id_validator(incoming)`` decides whether to keep the caller's
    (used only when given); ``request_id_from_traceparent=True`` takes the W3C
    ``traceparent`` trace id as the request id when there is no valid one.
    Every option is checked here: a bad one raises ``TypeError`` or
    ``ValueError`` at construction, never per request.

    Add it with ``app.add_middleware`` (inside Starlette's error middleware,
    whose 500 then lacks the request id) or wrap the whole app,
    ``ContextMiddleware(app)``, so that it is the only reader of the server's
    ``receive()`` and its own 500 for an app error carries the request id.
    """

    def __init__(self, app: ASGIApp, **options: Unpack[RequestOptions]) -> None:
        """``options``: see :class:`~ctxmiddleware.RequestOptions` (``timeout=30.0``,
        ``trusted_proxies=()``, ``forwarded_header="x-forwarded-for"``,
        ``request_id_header="x-request-id"``, ``timeout_header="x-request-timeout-ms"``,
        ``timeout_status=504``, ``timeout_body=b"Gateway Timeout"``, ``values=None``,
        ``base=None``, ``disconnect_grace=0.001``, ``request_id_factory=None``,
        ``request_id_validator=None``, ``budget_headers=None``,
        ``request_start_header="x-request-start"``, ``request_id_from_traceparent=False``)."""
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        self.app = app
        self.config = RequestConfig.from_options(**options)
        self.watchdog: Watchdog | None = None
        # (The options' requests only: the default path is unchanged.)
        self.request_type: type[AsgiRequest] = (
            _AsgiRequestCustomId if self.config.custom_request_ids else AsgiRequest
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (async def: servers tell ASGI 3 apps from ASGI 2 ones by it.)
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        client = scope.get("client")
        request = self.request_type(
            self.config,
            client[0] if client else None,
            scope["headers"],
            scope.get("http_version") not in _HTTP1,  # (HTTP/2 bodies may stream unframed)
            scope,
        )
        request.server_receive = receive
        request.server_send = send
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        root = state["ctx"] = request.root
        request.scope_state = state  # (for set_request_context; let go at the end)
        token = CURRENT_CONTEXT.set(root)
        try:
            if request.deadline_at <= request.arrival:
                await request.answer_spent()  # the caller's budget was spent on arrival
                return
            loop = asyncio.get_running_loop()
            watchdog = self.watchdog
            if watchdog is None or watchdog.loop is not loop:
                watchdog = self.watchdog = Watchdog(loop, self.config.disconnect_grace)
            request.begin(watchdog)
            spec = scope.get("asgi", _NO_ASGI).get("spec_version")
            raises = SENDS_RAISE.get(spec)
            if raises is None:
                raises = sends_raise(spec)
            try:
                await self.app(
                    scope, request.receive, request.send_checked if raises else request.send
                )
            except BaseException as exc:
                request.app_raised(exc)  # raises ctx.err() if we cancelled the app
                raise
            if (request.watching or not request.complete) and request.app_returned():
                await request.answer_context_done()
        except Exception as exc:
            if not await request.settle(exc, scope):
                raise
        finally:
            request.finish(scope)  # still bound: log filters see the request id
            CURRENT_CONTEXT.reset(token)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A context per websocket connection, cancelled when the client disconnects."""
        client = scope.get("client")
        request = Request(
            self.config, client[0] if client else None, scope["headers"], True, scope, timed=False
        )
        root = request.root
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["ctx"] = root
        rid_name = self.config.request_id_header

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                request.client_gone = True
                root.cancel(ClientDisconnected())
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "websocket.accept":
                # The handshake response carries the request id, like HTTP responses.
                message = dict(message)
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != rid_name),
                    (rid_name, request.rid),
                ]
            await send(message)

        token = CURRENT_CONTEXT.set(root)
        try:
            await self.app(scope, receive_watching, send_with_id)
        finally:
            CURRENT_CONTEXT.reset(token)
            request.complete = not request.client_gone
            root.end()


class _AsgiRequestCustomId(CustomRequestId, AsgiRequest):
    """An ASGI request of a middleware with ``request_id_factory`` or ``request_id_validator``."""


F = TypeVar("F", bound=Callable[..., Any])


def route_timeout(seconds: float | datetime.timedelta | None) -> Callable[[F], F]:
    """Give one endpoint its own timeout instead of the middleware's.

    ::

        @app.get("/report")
        @route_timeout(120)
        async def report(request: Request): ...

    It may be longer or shorter than the middleware's ``timeout`` (``None``:
    no deadline) and counts from the request's arrival; the caller's
    ``x-request-timeout-ms`` still caps it. Works on ``async def`` and ``def``
    endpoints and keeps their signature (FastAPI sees the same parameters).
    Put it below the route decorator: a route decorator registers the function
    it is given, so anything above it is never called. Above a Starlette or
    FastAPI route decorator it raises ``TypeError`` at import time.
    """
    checked = None if seconds is None else positive_seconds(seconds, "route_timeout")

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError("route_timeout decorates an endpoint function")
        if _registered_as_route(fn):
            raise TypeError(
                f"@route_timeout is above the route decorator of {fn.__qualname__}: the route"
                " already holds the undecorated function, so the timeout would never apply."
                " Put @route_timeout(...) below @app.get(...) (or use"
                " dependencies=[RouteTimeout(...)] in FastAPI)"
            )
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_endpoint(*args: Any, **kwargs: Any) -> Any:
                set_request_timeout(checked)
                return await fn(*args, **kwargs)

            return async_endpoint  # type: ignore[return-value]

        @functools.wraps(fn)
        def endpoint(*args: Any, **kwargs: Any) -> Any:
            set_request_timeout(checked)
            return fn(*args, **kwargs)

        return endpoint  # type: ignore[return-value]

    return decorate


def _registered_as_route(fn: Callable[..., Any]) -> bool:
    """``fn`` is already the endpoint of a Starlette or FastAPI route (whose
    decorator returned it unchanged): a decorator above it would never run."""
    import gc

    for ref in gc.get_referrers(fn):
        if not isinstance(ref, dict):
            try:
                ref = vars(ref)
            except TypeError:
                continue
        if ref.get("endpoint") is fn and "path" in ref:
            return True
    return False
