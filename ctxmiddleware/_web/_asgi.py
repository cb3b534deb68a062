"""ContextMiddleware: a root Context per ASGI request, cancelled on disconnect and deadline."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, MutableMapping
from typing import Any, TypeVar

from .._core._context import (
    _CANCEL_NODE,
    Context,
    Key,
    _CancelCtx,
    _current,
    _lookup,
    _propagate,
    _TimerCtx,
    _ValueCtx,
    background,
    cause,
    current,
)
from .._core._errors import Canceled, ContextError, DeadlineExceeded
from .._core._scope import CancelScope
from ._values import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    ClientDisconnected,
    Secret,
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

class _Nothing:
    """An awaitable that completes at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_NOTHING = _Nothing()

# What the middleware reads from the request headers.
(
    _H_REQUEST_ID,
    _H_TIMEOUT,
    _H_AUTHORIZATION,
    _H_CONTENT_LENGTH,
    _H_TRANSFER_ENCODING,
    _H_FORWARDED,
) = range(6)

_current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if sys.version_info >= (3, 12):
    _current_task = asyncio.current_task
else:  # 3.11's asyncio.current_task() is Python code; its registry is a dict
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    _current_task = _current_tasks.get


_UNSET: Any = object()


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
        if not self._rid_name:
            raise ValueError("request_id_header must not be empty")
        self._rid_len = len(self._rid_name)
        self._rid_first = self._rid_name[0] | 0x20
        self._tmo_name = timeout_header.lower().encode("latin-1")
        if not 100 <= timeout_status <= 599:
            raise ValueError("timeout_status must be an HTTP status code")
        self._timeout_status = timeout_status
        self._timeout_body = bytes(timeout_body)
        self._values = values
        self._base = base if base is not None else background()
        self._base_cancels = self._base is not background()
        if not (0 <= disconnect_grace <= 0.005):
            # A longer grace would push disconnect-to-cancel latency past a few ms.
            raise ValueError("disconnect_grace must be between 0 and 0.005 seconds")
        self._grace = float(disconnect_grace)
        self._ticker: _GraceTicker | None = None
        wanted = {
            self._rid_name: _H_REQUEST_ID,
            self._tmo_name: _H_TIMEOUT,
            b"authorization": _H_AUTHORIZATION,
            b"content-length": _H_CONTENT_LENGTH,
            b"transfer-encoding": _H_TRANSFER_ENCODING,
        }
        if self._fwd_name is not None:
            wanted[self._fwd_name] = _H_FORWARDED
        self._wanted_headers = wanted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (async def: servers tell ASGI 3 apps from ASGI 2 ones by it.)
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await _run_websocket(self, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # The request runs in this frame, not in a coroutine of its own: this
        # is the hot path, and most requests are over within one loop step.
        # The request is also its root context: request.state.ctx, current().
        request = _HttpRequest(self, scope, receive, send)
        if request._err is not None:
            await request._answer_spent(scope)
            return
        inside_starlette = "app" in scope  # set by Starlette before its middleware run
        token = _current.set(request)
        try:
            try:
                await self.app(scope, request.receive, request.send)
            except BaseException as exc:
                if request.cancel_scope is not None:
                    request.cancel_scope._exit(type(exc), exc)  # raises err() if we cancelled
                raise
            if request.cancel_scope is not None:
                request.cancel_scope._exit(None, None)
            if not request.started:
                err = request.err()
                if err is not None:
                    # The app swallowed our cancellation and returned empty-handed.
                    await request._on_context_done(err)
        except ContextError:
            err = request.err()
            if err is None:
                raise  # someone else's context
            await request._on_context_done(err)
        except Exception:
            err = request.err()
            if err is not None and (
                request._cancelled_by_us() or isinstance(cause(request), ClientDisconnected)
            ):
                # What the app raised while being cancelled (a driver's own
                # error, say) is a consequence of the cancellation. So is what
                # it raised on learning of a disconnect before our cancellation
                # landed (Starlette's ClientDisconnect, an OSError from send).
                _log.debug("ctxmiddleware: error while cancelling the app", exc_info=True)
                await request._on_context_done(err)
                return
            if not request.started and not inside_starlette:
                # We wrap the whole app: nothing outside us will answer but
                # the server, whose 500 would lack the request id. (Inside a
                # Starlette app, scope["app"] is set before we run: there its
                # error middleware and the user's 500 handler answer.)
                await request._send_plain(500, b"Internal Server Error")
            raise
        finally:
            request._end(scope)  # still bound: log filters see the request id
            _current.reset(token)


class _Request(_TimerCtx):
    """The root context of one request, which also carries its values.

    It answers REQUEST_ID, CLIENT_IP and AUTH_TOKEN itself (one object per
    request, not a chain of three); the client address and the token are
    worked out when first asked for: most requests never ask. (No
    ``__slots__`` of its own: the class-level defaults below cost nothing per
    request.)
    """

    _client_ip: str | None = _UNSET
    _token: Secret | None = _UNSET
    _request_id: str | None = None
    _auth: bytes | None = None
    _fwd: list[bytes] | None = None
    # From the request headers (see _scan_headers).
    budget_ms: int | None = None
    eager_ok = True

    def __init__(self, mw: ContextMiddleware, scope: Scope) -> None:
        """A websocket connection's root (no deadline); _HttpRequest has its own."""
        self.mw = mw
        # Not the scope itself: scope["state"]["ctx"] is this object.
        self._client = scope.get("client")
        rid = self._scan_headers(scope["headers"])
        self.rid = (rid is not None and sane_request_id(rid)) or new_request_id()
        self._init_root(scope, _INF)

    def _init_root(self, scope: Scope, when: float) -> None:
        """The context part: parent (the base, under the ``values`` hook's
        values), deadline ``when``, link to a cancellable base."""
        mw = self.mw
        parent: Context = mw._base
        hook = mw._values
        if hook is not None:
            for key, value in hook(scope):
                parent = _ValueCtx(parent, key, value)
        _TimerCtx.__init__(self, parent, when, None)
        if mw._base_cancels:
            _propagate(mw._base, self)

    @property
    def request_id(self) -> str:
        """The request id (REQUEST_ID), as a str."""
        rid = self._request_id
        if rid is None:
            rid = self._request_id = self.rid.decode("ascii")
        return rid

    def _scan_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
        """Note what the middleware reads from the request headers; return the request id."""
        rid = None
        wanted = self.mw._wanted_headers.get
        for name, value in headers:
            # One dict lookup per header: most headers are none of ours.
            which = wanted(name)
            if which is None:
                continue
            if which == _H_REQUEST_ID:
                if rid is None:
                    rid = value
            elif which == _H_TIMEOUT:
                ms = parse_timeout_ms(value)
                if ms is not None and (self.budget_ms is None or ms < self.budget_ms):
                    self.budget_ms = ms  # several: the smallest budget wins
            elif which == _H_AUTHORIZATION:
                self._auth = value
            elif which == _H_CONTENT_LENGTH:
                try:
                    self.eager_ok = int(value) <= _EAGER_BODY_LIMIT
                except ValueError:
                    self.eager_ok = False
            elif which == _H_TRANSFER_ENCODING:
                self.eager_ok = False
            else:  # the forwarding header
                if self._fwd is None:
                    self._fwd = []
                self._fwd.append(value)
        return rid

    # -- Context -----------------------------------------------------------

    def value(self, key: Any) -> Any:
        if key is _CANCEL_NODE:
            return self
        if key is REQUEST_ID:
            return self.request_id
        if key is CLIENT_IP:
            return self.client_ip()
        if key is AUTH_TOKEN:
            return self.token()
        return _lookup(self._parent, key)

    def client_ip(self) -> str | None:
        ip = self._client_ip
        if ip is _UNSET:
            client = self._client
            ip = client[0] if client else None
            if self._fwd is not None:
                mw = self.mw
                hops = forwarded_for_hops(self._fwd, mw._fwd_rfc7239)
                ip = resolve_client_ip(ip, hops, mw.trusted_proxies)
            self._client_ip = ip
        return ip

    def token(self) -> Secret | None:
        token = self._token
        if token is _UNSET:
            token = self._token = None if self._auth is None else bearer_token(self._auth)
        return token

    def __str__(self) -> str:
        # The keys present, never their values.
        names = ["request_id"]
        if self.client_ip() is not None:
            names.append("client_ip")
        if self.token() is not None:
            names.append("auth_token")
        values = "".join(f".with_value({name})" for name in names)
        if self._when == _INF:
            return f"{self._parent}{values}.with_cancel"
        left = self._when - _monotonic()
        return f"{self._parent}{values}.with_deadline({self._when:.6f} [{left:.6f}s])"


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

    def schedule(self) -> None:
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


class _HttpRequest(_Request):
    """One HTTP request going through the middleware, and its root context."""

    # Class-level defaults: most requests never change most of these, and
    # __init__ runs for every request.
    started = False
    complete = False
    ended = False
    trailers = False
    status = 0
    body_done = False
    app_reading = 0
    grace_over = False
    watcher: asyncio.Task[None] | None = None
    buffered: deque[Message] | None = None
    disconnect: Message | None = None
    waiters: list[asyncio.Future[None]] | None = None
    cancel_scope: CancelScope | None = None
    replacing = False
    header_when = _INF
    send_checked = False
    task: asyncio.Task[Any]
    cancelling = 0
    ticker: _GraceTicker

    def __init__(self, mw: ContextMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = self.arrival = _monotonic()
        # _Request.__init__, written out: one call less per request.
        self.mw = mw
        self._client = scope.get("client")
        rid = self._scan_headers(scope["headers"])
        self.rid = (rid is not None and sane_request_id(rid)) or new_request_id()
        self.server_receive = receive
        self.server_send = send

        when = _INF if mw.timeout is None else arrival + mw.timeout
        tmo = self.budget_ms
        if tmo is not None:
            self.header_when = arrival + tmo / 1000.0
            if self.header_when < when:
                when = self.header_when
        self._init_root(scope, when)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["ctx"] = self
        if tmo == 0:
            self._expire()  # the caller's budget is already spent
            return

        loop = asyncio.get_running_loop()
        task = _current_task(loop)
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()
        asgi = scope.get("asgi")
        if asgi is not None and asgi.get("spec_version", "2.0") >= "2.4":
            # ASGI 2.4 servers raise OSError from send() on a closed connection.
            self.send_checked = True
        ticker = mw._ticker
        if ticker is None or ticker.loop is not loop:
            ticker = mw._ticker = _GraceTicker(loop, mw._grace)
        self.ticker = ticker
        ticker.pending[self] = None
        if ticker.handle is None:
            ticker.schedule()
        if when - arrival <= mw._grace:
            self._start_watching()  # the deadline comes before the grace is over

    async def _answer_spent(self, scope: Scope) -> None:
        """Answer a request whose caller's budget was spent on arrival; don't run the app."""
        await self._send_timeout()
        token = _current.set(self)  # log filters see the request id
        try:
            self._log_end(scope)
        finally:
            _current.reset(token)
        self._let_go()

    def _end(self, scope: Scope) -> None:
        """The app has returned (or raised): cancel the root, stop everything."""
        if not self.grace_over:
            del self.ticker.pending[self]
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            if not watcher.done():
                watcher.cancel()
        done_before = self._err is not None
        self._cancel(True, Canceled(), None)  # (what cancel() does, one call less)
        if done_before:
            self._log_end(scope)
            self._drop_tracebacks()
        self._let_go()

    def _let_go(self) -> None:
        # The app may keep this root context (without_cancel(ctx) in a
        # background job): let go of the server's channels, so that the
        # connection does not outlive the request through it, and so that no
        # cycle (scope -> state -> here -> server -> scope) is left to the
        # cyclic GC.
        self.ended = True
        self.server_receive = _receive_after_end
        self.server_send = _send_after_end
        if self.cancel_scope is not None:
            self.cancel_scope = None

    def _start_watching(self) -> None:
        """Start interrupting the app when the context is done, and the deadline timer.

        Deferred to the end of the grace period: most requests are over by
        then and never pay for either.
        """
        if self.cancel_scope is None and not self.ended:
            scope = self.cancel_scope = CancelScope(self)
            scope._enter_task(self.task, self.cancelling)
        self._arm()

    def _drop_tracebacks(self) -> None:
        # The error and its chain hold this request's frames, which hold the
        # context, which holds the error: a cycle only the cyclic GC would free.
        err = self._err
        if err is not None:
            err.__traceback__ = None
            err.__context__ = None
            err.__cause__ = None

    # -- outcomes --------------------------------------------------------

    async def _on_context_done(self, err: ContextError) -> None:
        why = cause(self)
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

    def _log_end(self, scope: Scope) -> None:
        if not self.complete and self.disconnect is not None:
            _log.info(
                '%s %s 499 client disconnected request_id=%s',
                scope.get("method"), scope.get("path"), self.request_id,
            )
        elif isinstance(self._err, DeadlineExceeded) and (
            not self.complete or self.status == self.mw._timeout_status
        ):
            _log.warning(
                "%s %s %s deadline exceeded request_id=%s",
                scope.get("method"), scope.get("path"),
                self.status if self.started and self.status != self.mw._timeout_status
                else self.mw._timeout_status,
                self.request_id,
            )

    # -- send -------------------------------------------------------------

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function returning the server's own awaitable: no extra
        # coroutine per message on the hot path.
        if self.replacing:
            return _NOTHING  # the rest of a 500 we answered in place of
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False) and not self.trailers:
                # _response_complete(), written out: this is every response's end.
                self.complete = True
                if self.cancel_scope is not None:
                    self.cancel_scope._disarm()
        elif kind == "http.response.start":
            if not self.started:
                status = message["status"]
                if status == 500 and self._cancelled_by_us():
                    return self._replace_500()
                self.started = True
                self.status = status
                if message.get("trailers", False):
                    self.trailers = True
                # The start message is built for this one call (as Starlette
                # does), so it is updated in place, like other middlewares do.
                mw = self.mw
                rid_name = mw._rid_name
                headers = message.get("headers", ())
                for name, _ in headers:
                    # (Cheap tests first: lower() only for a likely match.)
                    if len(name) == mw._rid_len and name[0] | 0x20 == mw._rid_first and (
                        name.lower() == rid_name
                    ):
                        # Exactly one request id, the one the logs carry.
                        headers = [h for h in headers if h[0].lower() != rid_name]
                        break
                message["headers"] = [*headers, (rid_name, self.rid)]
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                self._response_complete()
        elif kind == "http.response.pathsend":
            self._response_complete()
        if self.send_checked:
            return self._send_checked(message)
        return self.server_send(message)

    async def _send_checked(self, message: Message) -> None:
        try:
            await self.server_send(message)
        except OSError:
            # ASGI 2.4: a send on a closed connection raises OSError.
            self._client_gone()
            raise

    async def _replace_500(self) -> None:
        # ctx.err() escaped the handler and the app's error middleware made
        # it a 500: answer as if it had reached us.
        if isinstance(self._err, DeadlineExceeded):
            await self._send_timeout()
        self.replacing = True

    def _cancelled_by_us(self) -> bool:
        scope = self.cancel_scope
        return self._err is not None and scope is not None and scope.cancel_called

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
            future = self.ticker.loop.create_future()
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
        self._start_watching()
        if self.body_done or self.eager_ok:
            self._start_watcher()

    def _start_watcher(self) -> None:
        if self.watcher is not None or self.app_reading or self.disconnect is not None:
            return
        if self.ended:
            return
        self.watcher = self.ticker.loop.create_task(self._watch())

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
            self._cancel_cause_func(ClientDisconnected())
            if self.cancel_scope is None and not self.replacing:
                self._start_watching()  # within the grace period: cancel the app now

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
        self._move_deadline(when)
        if self.grace_over or when - _monotonic() <= self.mw._grace:
            self._start_watching()


async def _receive_after_end() -> Message:
    return {"type": "http.disconnect"}


async def _send_after_end(message: Message) -> None:
    raise RuntimeError(f"{message.get('type')!r} sent after the request ended")


async def _run_websocket(mw: ContextMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """A context per websocket connection, cancelled when the client disconnects."""
    root = _Request(mw, scope)
    request_id = root.rid
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
                (mw._rid_name, request_id),
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
    request = _request_of(current())
    if request is None:
        raise RuntimeError("set_request_timeout() needs a request served by ContextMiddleware")
    request._set_timeout(seconds)


def _request_of(ctx: Context) -> _HttpRequest | None:
    """The request in flight whose root context ``ctx`` is, or derives from
    (through with_cancel/with_timeout, not through without_cancel)."""
    node = ctx.value(_CANCEL_NODE)
    while isinstance(node, _CancelCtx):
        if isinstance(node, _HttpRequest):
            return None if node.ended else node
        link = node._link
        node = link if isinstance(link, _CancelCtx) else None
    return None
