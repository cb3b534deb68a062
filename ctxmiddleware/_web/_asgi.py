"""ContextMiddleware: a root Context per ASGI request, cancelled on disconnect and deadline."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any, TypeVar

from .._core._context import (
    Context,
    Key,
    _current,
    _new_request_root,
    _TimerCtx,
    _ValueCtx,
    background,
    cause,
)
from .._core._errors import ContextError, DeadlineExceeded
from .._core._scope import CancelScope
from ._values import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    ClientDisconnected,
    bearer_token,
    forwarded_for_hops,
    new_request_id,
    parse_networks,
    parse_timeout_ms,
    resolve_client_ip,
    sane_request_id,
)

__all__ = ["ContextMiddleware", "route_timeout"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ValuesHook = Callable[[Scope], Iterable[tuple[Key[Any], object]]]

_log = logging.getLogger("ctxmiddleware")
_monotonic = time.monotonic
_INF = math.inf

# Bodies up to this size are read ahead by the disconnect watcher (so a
# disconnect is seen even if the app never reads the body); larger ones are
# left to the app, which keeps the server's backpressure.
_EAGER_BODY_LIMIT = 64 * 1024

_active_request: ContextVar[_HttpRequest | None] = ContextVar(
    "ctxmiddleware.request", default=None
)


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
    * at the deadline: ``timeout`` seconds after arrival (``None``: none),
      shortened (never extended) by the caller's ``x-request-timeout-ms``. The
      app is cancelled and the client gets a 504, or, if the response had
      already started, the response is aborted;
    * when the app returns (``Canceled``), like Go's ``ServeHTTP``. Work that
      must outlive the request takes ``without_cancel(ctx)``.

    After the response is complete the app is no longer interrupted (so
    ``BackgroundTasks`` run), but the context still expires at its deadline.

    ``trusted_proxies`` lists the IPs or CIDRs whose forwarding header
    (``forwarded_header``: ``"x-forwarded-for"`` or ``"forwarded"``) is
    believed, hop by hop from the right. Run uvicorn with ``--no-proxy-headers``
    (or ``--forwarded-allow-ips`` set to nothing) so that this middleware, not
    the server, decides whom to trust. ``values`` is a hook returning extra
    ``(key, value)`` pairs to bind for each request.

    Add it last (outermost) or wrap the whole app, ``ContextMiddleware(app)``,
    so it is the only reader of the server's ``receive()`` and so 500
    responses carry the request id.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float | None = 30.0,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
        request_id_header: str = "x-request-id",
        timeout_header: str = "x-request-timeout-ms",
        timeout_status: int = 504,
        timeout_body: bytes = b"Gateway Timeout",
        values: ValuesHook | None = None,
        base: Context | None = None,
        disconnect_grace: float = 0.001,
    ) -> None:
        self.app = app
        if timeout is not None:
            timeout = float(timeout)
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(
                    f"timeout must be a positive number of seconds or None, not {timeout!r}"
                )
        self.timeout = timeout
        self.trusted_proxies = parse_networks(trusted_proxies)
        fwd = forwarded_header.lower()
        if fwd not in ("x-forwarded-for", "forwarded"):
            raise ValueError('forwarded_header must be "x-forwarded-for" or "forwarded"')
        self._fwd_name: bytes | None = fwd.encode() if self.trusted_proxies else None
        self._fwd_rfc7239 = fwd == "forwarded"
        self._rid_name = request_id_header.lower().encode("latin-1")
        self._tmo_name = timeout_header.lower().encode("latin-1")
        if not 100 <= timeout_status <= 599:
            raise ValueError("timeout_status must be an HTTP status code")
        self._timeout_status = timeout_status
        self._timeout_body = bytes(timeout_body)
        self._values = values
        self._base = base if base is not None else background()
        if not (0 <= disconnect_grace <= 0.005):
            # A longer grace would push disconnect-to-cancel latency past a few ms.
            raise ValueError("disconnect_grace must be between 0 and 0.005 seconds")
        self._grace = float(disconnect_grace)
        self._ticker: _GraceTicker | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _HttpRequest(self, scope, receive, send).run()
        elif kind == "websocket":
            await _run_websocket(self, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- shared per-request set-up ------------------------------------------

    def _ticker_for(self, loop: asyncio.AbstractEventLoop) -> _GraceTicker:
        ticker = self._ticker
        if ticker is None or ticker.loop is not loop:
            ticker = self._ticker = _GraceTicker(loop, self._grace)
        return ticker

    def _request_values(
        self, scope: Scope, rid: bytes | None, auth: bytes | None, fwd: list[bytes] | None
    ) -> tuple[Context, str]:
        request_id = (sane_request_id(rid) if rid is not None else None) or new_request_id()
        ctx: Context = _ValueCtx(self._base, REQUEST_ID, request_id)
        client = scope.get("client")
        peer = client[0] if client else None
        if fwd is not None:
            peer = resolve_client_ip(
                peer, forwarded_for_hops(fwd, self._fwd_rfc7239), self.trusted_proxies
            )
        if peer is not None:
            ctx = _ValueCtx(ctx, CLIENT_IP, peer)
        if auth is not None:
            token = bearer_token(auth)
            if token is not None:
                ctx = _ValueCtx(ctx, AUTH_TOKEN, token)
        if self._values is not None:
            for key, value in self._values(scope):
                ctx = _ValueCtx(ctx, key, value)
        return ctx, request_id


class _GraceTicker:
    """Starts the disconnect watchers of requests older than the grace period.

    Most requests finish in well under a millisecond; giving each one a timer
    of its own would cost more than the rest of the middleware. One timer per
    loop walks the in-flight requests, oldest first.
    """

    __slots__ = ("grace", "handle", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self.loop = loop
        self.grace = grace
        self.pending: dict[_HttpRequest, None] = {}
        self.handle: asyncio.TimerHandle | None = None

    def add(self, request: _HttpRequest) -> None:
        self.pending[request] = None
        if self.handle is None:
            self.handle = self.loop.call_at(self.loop.time() + self.grace, self.tick)

    def tick(self) -> None:
        self.handle = None
        pending = self.pending
        now = _monotonic()
        limit = now - self.grace
        due = []
        for request in pending:
            if request.arrival > limit:
                break
            due.append(request)
        for request in due:
            del pending[request]
            request._grace_over()
        if pending:
            oldest = next(iter(pending)).arrival
            delay = max(0.0, oldest + self.grace - now)
            self.handle = self.loop.call_at(self.loop.time() + delay, self.tick)


class _HttpRequest:
    """One HTTP request going through the middleware."""

    __slots__ = (
        "__weakref__",
        "app_reading",
        "arrival",
        "body_done",
        "buffered",
        "cancel_scope",
        "complete",
        "disconnect",
        "eager_ok",
        "grace_over",
        "header_when",
        "loop",
        "mw",
        "request_id",
        "root",
        "scope",
        "server_receive",
        "server_send",
        "started",
        "status",
        "ticker",
        "trailers",
        "waiters",
        "watcher",
        "replacing",
    )

    def __init__(self, mw: ContextMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.server_receive = receive
        self.server_send = send
        self.arrival = _monotonic()
        self.started = False
        self.complete = False
        self.trailers = False
        self.status = 0
        self.body_done = False
        self.eager_ok = True
        self.app_reading = 0
        self.grace_over = False
        self.watcher: asyncio.Task[None] | None = None
        self.buffered: deque[Message] | None = None
        self.disconnect: Message | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        self.cancel_scope: CancelScope | None = None
        self.replacing = False

    async def run(self) -> None:
        mw = self.mw
        scope = self.scope
        rid = tmo = auth = None
        fwd: list[bytes] | None = None
        rid_name, tmo_name, fwd_name = mw._rid_name, mw._tmo_name, mw._fwd_name
        for name, value in scope["headers"]:
            if name == rid_name:
                if rid is None:
                    rid = value
            elif name == tmo_name:
                ms = parse_timeout_ms(value)
                if ms is not None and (tmo is None or ms < tmo):
                    tmo = ms
            elif name == b"authorization":
                auth = value
            elif name == b"content-length":
                try:
                    self.eager_ok = int(value) <= _EAGER_BODY_LIMIT
                except ValueError:
                    self.eager_ok = False
            elif name == b"transfer-encoding":
                self.eager_ok = False
            elif name == fwd_name:
                if fwd is None:
                    fwd = []
                fwd.append(value)
        values, self.request_id = mw._request_values(scope, rid, auth, fwd)

        when = _INF if mw.timeout is None else self.arrival + mw.timeout
        self.header_when = _INF
        if tmo is not None:
            self.header_when = self.arrival + tmo / 1000.0
            if self.header_when < when:
                when = self.header_when
        root = self.root = _new_request_root(values, when)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["ctx"] = root

        if tmo == 0:
            # The caller's budget is already spent: don't run the handler.
            root._expire()
            await self._send_timeout()
            bound = _current.set(root)  # log filters see the request id
            self._log_end()
            _current.reset(bound)
            return

        loop = self.loop = asyncio.get_running_loop()
        if when - self.arrival <= mw._grace:
            root._arm()
        ticker = self.ticker = mw._ticker_for(loop)
        ticker.add(self)
        inside_starlette = "app" in scope  # set by Starlette before its middleware run
        cancel_scope = self.cancel_scope = CancelScope(root)
        token = _current.set(root)
        request_token = _active_request.set(self)
        try:
            cancel_scope._enter()
            try:
                await mw.app(scope, self.receive, self.send)
            except BaseException as exc:
                cancel_scope._exit(type(exc), exc)  # raises err() if we cancelled
                raise
            cancel_scope._exit(None, None)
            err = root.err()
            if err is not None and not self.started:
                # The app swallowed our cancellation and returned empty-handed.
                await self._on_context_done(err)
        except ContextError:
            err = root.err()
            if err is None:
                raise  # someone else's context
            await self._on_context_done(err)
        except Exception:
            err = root.err()
            if err is not None and (
                cancel_scope.cancel_called or isinstance(cause(root), ClientDisconnected)
            ):
                # What the app raised while being cancelled (a driver's own
                # error, say) is a consequence of the cancellation. So is what
                # it raised on learning of a disconnect before our cancellation
                # landed (Starlette's ClientDisconnect, an OSError from send).
                _log.debug("ctxmiddleware: error while cancelling the app", exc_info=True)
                await self._on_context_done(err)
                return
            if not self.started and not inside_starlette:
                # We wrap the whole app: nothing outside us will answer but
                # the server, whose 500 would lack the request id. (Inside a
                # Starlette app, scope["app"] is set before we run: there its
                # error middleware and the user's 500 handler answer.)
                await self._send_plain(500, b"Internal Server Error")
            raise
        finally:
            ticker.pending.pop(self, None)
            watcher = self.watcher
            if watcher is not None and not watcher.done():
                watcher.cancel()
            root._cancel_func()
            self._log_end()  # still bound: log filters see the request id
            _active_request.reset(request_token)
            _current.reset(token)

    # -- outcomes --------------------------------------------------------

    async def _on_context_done(self, err: ContextError) -> None:
        why = cause(self.root)
        if isinstance(why, ClientDisconnected):
            return  # nobody to answer
        if isinstance(err, DeadlineExceeded) and not self.started:
            await self._send_timeout()
        # Otherwise the response had started: returning without completing it
        # makes the server abort the connection, so the client sees a broken
        # response rather than a truncated one that looks whole.

    async def _send_timeout(self) -> None:
        await self._send_plain(self.mw._timeout_status, self.mw._timeout_body)

    async def _send_plain(self, status: int, body: bytes) -> None:
        if self.started or self.disconnect is not None:
            return
        try:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await self.send({"type": "http.response.body", "body": body})
        except OSError:
            pass

    def _log_end(self) -> None:
        root = self.root
        if not self.complete and self.disconnect is not None:
            _log.info(
                '%s %s 499 client disconnected request_id=%s',
                self.scope.get("method"), self.scope.get("path"), self.request_id,
            )
        elif isinstance(root._err, DeadlineExceeded) and (
            not self.complete or self.status == self.mw._timeout_status
        ):
            _log.warning(
                "%s %s %s deadline exceeded request_id=%s",
                self.scope.get("method"), self.scope.get("path"),
                self.status if self.started and self.status != self.mw._timeout_status
                else self.mw._timeout_status,
                self.request_id,
            )

    # -- send -------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.replacing:
            return  # the rest of a 500 we answered in place of
        kind = message["type"]
        if kind == "http.response.start":
            if not self.started:
                if message["status"] == 500 and self._cancelled_by_us():
                    # ctx.err() escaped the handler and the app's error
                    # middleware made it a 500: answer as if it reached us.
                    if isinstance(self.root._err, DeadlineExceeded):
                        await self._send_timeout()
                    self.replacing = True
                    return
                self.started = True
                self.status = message["status"]
                self.trailers = bool(message.get("trailers", False))
                message = dict(message)
                rid_name = self.mw._rid_name
                # Exactly one request id, the one the logs carry: drop the app's.
                n = len(rid_name)
                message["headers"] = [
                    *(
                        h
                        for h in message.get("headers", ())
                        if len(h[0]) != n or h[0].lower() != rid_name
                    ),
                    (rid_name, self.request_id.encode("ascii")),
                ]
        elif kind == "http.response.body":
            if not message.get("more_body", False) and not self.trailers:
                self._response_complete()
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                self._response_complete()
        elif kind == "http.response.pathsend":
            self._response_complete()
        try:
            await self.server_send(message)
        except OSError:
            # ASGI 2.4: a send on a closed connection raises OSError.
            self._client_gone()
            raise

    def _cancelled_by_us(self) -> bool:
        scope = self.cancel_scope
        return self.root._err is not None and scope is not None and scope.cancel_called

    def _response_complete(self) -> None:
        # Before the final send is awaited: uvicorn reports http.disconnect
        # from inside that call, and that one is not an abort.
        self.complete = True
        if self.cancel_scope is not None:
            self.cancel_scope._disarm()

    # -- receive and the disconnect watcher -------------------------------

    async def receive(self) -> Message:
        if self.watcher is None:
            if self.disconnect is not None:
                # Seen already: hypercorn reports it only once, and a second
                # receive() from it would hang.
                return self.disconnect
            # The app reads the server directly until the watcher exists:
            # body chunks pass through untouched and in order.
            self.app_reading += 1
            try:
                message = await self.server_receive()
            finally:
                self.app_reading -= 1
            kind = message["type"]
            if kind == "http.request":
                if not message.get("more_body", False):
                    self.body_done = True
                    if self.grace_over:
                        self._start_watcher()
            elif kind == "http.disconnect":
                self._client_gone()
            return message
        while True:
            buffered = self.buffered
            if buffered:
                return buffered.popleft()
            if self.disconnect is not None:
                return self.disconnect  # replayed to every later call
            future = self.loop.create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(future)
            try:
                await future
            finally:
                if future in self.waiters:
                    self.waiters.remove(future)

    def _grace_over(self) -> None:
        self.grace_over = True
        self.root._arm()
        if self.body_done or self.eager_ok:
            self._start_watcher()

    def _start_watcher(self) -> None:
        if self.watcher is not None or self.app_reading or self.disconnect is not None:
            return
        self.watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        """The only reader of the server's receive() once it runs."""
        receive = self.server_receive
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken server channel means a broken connection
                message = {"type": "http.disconnect"}
            if message["type"] == "http.request":
                if self.buffered is None:
                    self.buffered = deque()
                self.buffered.append(message)
                if not message.get("more_body", False):
                    self.body_done = True
                self._wake_readers()
                continue
            self._client_gone()
            return

    def _client_gone(self) -> None:
        if self.disconnect is None:
            self.disconnect = {"type": "http.disconnect"}
            self._wake_readers()
        if not self.complete:
            self.root._cancel_cause_func(ClientDisconnected())

    def _wake_readers(self) -> None:
        waiters = self.waiters
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    # -- per-route timeouts ---------------------------------------------

    def _set_timeout(self, seconds: float | None) -> None:
        when = _INF if seconds is None else self.arrival + seconds
        when = min(when, self.header_when)  # the caller's budget still caps it
        root = self.root
        root._move_deadline(when)
        if self.grace_over or when - _monotonic() <= self.mw._grace:
            root._arm()


async def _run_websocket(mw: ContextMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """A context per websocket connection, cancelled when the client disconnects."""
    rid = auth = None
    fwd: list[bytes] | None = None
    for name, value in scope["headers"]:
        if name == mw._rid_name:
            if rid is None:
                rid = value
        elif name == b"authorization":
            auth = value
        elif name == mw._fwd_name:
            if fwd is None:
                fwd = []
            fwd.append(value)
    values, request_id = mw._request_values(scope, rid, auth, fwd)
    root: _TimerCtx = _new_request_root(values, _INF)
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state["ctx"] = root

    async def receive_watching() -> Message:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            root._cancel_cause_func(ClientDisconnected())
        return message

    async def send_with_id(message: Message) -> None:
        if message["type"] == "websocket.accept":
            # The handshake response carries the request id, like HTTP responses.
            message = dict(message)
            message["headers"] = [
                *(h for h in message.get("headers", ()) if h[0].lower() != mw._rid_name),
                (mw._rid_name, request_id.encode("ascii")),
            ]
        await send(message)

    token = _current.set(root)
    try:
        await mw.app(scope, receive_watching, send_with_id)
    finally:
        _current.reset(token)
        root._cancel_func()


F = TypeVar("F", bound=Callable[..., Any])


def route_timeout(seconds: float | None) -> Callable[[F], F]:
    """Give one endpoint its own timeout instead of the middleware's.

    ::

        @route_timeout(120)
        async def report(request): ...

    It may be longer or shorter than the middleware's ``timeout`` (``None``:
    no deadline) and counts from the request's arrival; the caller's
    ``x-request-timeout-ms`` still caps it. Works on ``async def`` and ``def``
    endpoints and keeps their signature (FastAPI sees the same parameters).
    """
    if seconds is not None:
        seconds = float(seconds)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError("route_timeout takes a positive number of seconds or None")

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_endpoint(*args: Any, **kwargs: Any) -> Any:
                set_request_timeout(seconds)
                return await fn(*args, **kwargs)

            return async_endpoint  # type: ignore[return-value]

        @functools.wraps(fn)
        def endpoint(*args: Any, **kwargs: Any) -> Any:
            set_request_timeout(seconds)
            return fn(*args, **kwargs)

        return endpoint  # type: ignore[return-value]

    return decorate


def set_request_timeout(seconds: float | None) -> None:
    """Move the current request's deadline to ``seconds`` after its arrival.

    Raises ``RuntimeError`` outside a request handled by :class:`ContextMiddleware`.
    """
    request = _active_request.get()
    if request is None:
        raise RuntimeError("set_request_timeout() needs a request served by ContextMiddleware")
    request._set_timeout(seconds)

