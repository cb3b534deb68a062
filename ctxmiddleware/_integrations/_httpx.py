"""Outbound HTTP under a context: httpx transports that carry deadlines downstream.

For every request made under a context (``extensions={"ctx": ctx}``, else
``current()``) the transport:

* fails fast with ``ctx.err()`` if the context is already done;
* clamps every httpx timeout to ``ctx.remaining()`` and enforces the total
  deadline (httpx timeouts apply per read, so a slow trickle could outlive it);
* sends ``x-request-timeout-ms`` and ``grpc-timeout`` (the remaining budget
  minus a safety margin, rounded down, measured again just before the headers
  go out, after any wait for a pooled connection and the connection set-up),
  optionally ``x-envoy-upstream-rq-timeout-ms`` (for calls that leave through
  an Envoy sidecar), ``x-request-id`` and the inbound ``traceparent``
  (untouched), so the next service inherits the deadline, the id and the
  trace; a caller's own, shorter budget headers and own ``x-request-id`` and
  ``traceparent`` are kept;
* aborts the in-flight request when the context is done, closing the HTTP/1.1
  connection, so the downstream service sees a disconnect and cancels too.

HTTP/2 caveat: httpx sends no RST_STREAM when a request is abandoned, so a
downstream server reached over HTTP/2 is not told (encode/httpcore#943); the
deadline header still bounds its work.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx

from .._core import (
    REQUEST_ID,
    TRACEPARENT,
    Context,
    DeadlineExceeded,
    after_func,
    current,
    downstream_call,
    format_grpc_timeout,
    parse_budget_ms,
    parse_grpc_timeout,
    raise_if_done,
)

__all__ = [
    "ContextTransport",
    "SyncContextTransport",
    "httpx_async_client",
    "httpx_client",
]

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


# httpcore calls the "trace" extension at each step of a request, with the
# request it is about to send; "<http11|http2>.send_request_headers.started"
# comes after the pool wait and the connection set-up, right before the headers
# are written, so the budget header is refreshed there.
_SEND_HEADERS = ".send_request_headers.started"
_USER_TRACE = "_ctxmiddleware_user_trace"


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def _ms_seconds(raw: bytes | str | None) -> float | None:
    ms = parse_budget_ms(raw)
    return None if ms is None else ms / 1000.0


GRPC_TIMEOUT = "grpc-timeout"
ENVOY_UPSTREAM_TIMEOUT = "x-envoy-upstream-rq-timeout-ms"


class _Propagation:
    """What both transports do to a request before sending it."""

    def __init__(
        self,
        margin: float,
        timeout_header: str,
        request_id_header: str,
        grpc_timeout: bool = True,
        envoy_upstream_timeout: bool = False,
    ) -> None:
        if not 0 <= margin < 10:
            raise ValueError("margin is in seconds, between 0 and 10")
        self.margin = margin
        self.timeout_header = timeout_header
        self.timeout_name = timeout_header.lower().encode("latin-1")
        self.request_id_header = request_id_header
        # The budget headers sent: (name, lower-case name, format seconds, parse to seconds).
        out = [(timeout_header, _ms, _ms_seconds)]
        if grpc_timeout:
            out.append((GRPC_TIMEOUT, format_grpc_timeout, parse_grpc_timeout))
        if envoy_upstream_timeout:
            out.append((ENVOY_UPSTREAM_TIMEOUT, _ms, _ms_seconds))
        self.budget_headers = [
            (name, name.lower().encode("latin-1"), fmt, parse) for name, fmt, parse in out
        ]

    def budget_seconds(self, remaining: float) -> float:
        seconds = remaining - self.margin
        if seconds < 0.001:
            raise DeadlineExceeded("not enough time left before the deadline to send a request")
        return seconds

    def budget_ms(self, remaining: float) -> int:
        return int(self.budget_seconds(remaining) * 1000)

    def prepare(self, request: httpx.Request, is_async: bool) -> Context:
        ctx = request.extensions.get("ctx")
        if not isinstance(ctx, Context):
            ctx = current()
        ctx.check()
        remaining = ctx.remaining()
        if remaining is not None:
            seconds = self.budget_seconds(remaining)
            for name, _, fmt, parse in self.budget_headers:
                # A shorter budget set by the caller stands; never a longer one.
                explicit = parse(request.headers.get(name))
                if explicit is None or seconds < explicit:
                    request.headers[name] = fmt(seconds)
            timeouts = dict(request.extensions.get("timeout") or {})
            for key in _TIMEOUT_KEYS:
                value = timeouts.get(key)
                timeouts[key] = remaining if value is None else min(value, remaining)
            request.extensions["timeout"] = timeouts
            user_trace = request.extensions.get("trace")
            request.extensions["trace"] = self._trace(ctx, user_trace, is_async)
        if self.request_id_header not in request.headers:
            request_id = ctx.value(REQUEST_ID)
            if request_id is not None:
                request.headers[self.request_id_header] = request_id
        if "traceparent" not in request.headers:
            traceparent = ctx.value(TRACEPARENT)
            if traceparent is not None:
                request.headers["traceparent"] = traceparent  # untouched
        return ctx

    def refresh(self, ctx: Context, info: dict[str, Any]) -> None:
        """Lower the budget header of the request about to be sent to what is left now."""
        remaining = ctx.remaining()
        headers = getattr(info.get("request"), "headers", None)
        if remaining is None or not isinstance(headers, list):
            return
        seconds = self.budget_seconds(remaining)
        for i, (key, value) in enumerate(headers):
            lower = key.lower()
            for _, name, fmt, parse in self.budget_headers:
                if lower == name:
                    new = fmt(seconds)
                    sent = parse(value)
                    if sent is None or (parse(new) or 0.0) < sent:
                        headers[i] = (key, new.encode("ascii"))

    def _trace(self, ctx: Context, user_trace: Any, is_async: bool) -> Any:
        # A redirect reuses the extensions: chain to the caller's trace, not ours.
        user_trace = getattr(user_trace, _USER_TRACE, user_trace)
        trace: Any
        if is_async:
            user_async: Callable[[str, dict[str, Any]], Awaitable[None]] | None = user_trace

            async def async_trace(event: str, info: dict[str, Any]) -> None:
                if event.endswith(_SEND_HEADERS):
                    self.refresh(ctx, info)
                if user_async is not None:
                    await user_async(event, info)

            trace = async_trace
        else:
            user_sync: Callable[[str, dict[str, Any]], None] | None = user_trace

            def sync_trace(event: str, info: dict[str, Any]) -> None:
                if event.endswith(_SEND_HEADERS):
                    self.refresh(ctx, info)
                if user_sync is not None:
                    user_sync(event, info)

            trace = sync_trace
        setattr(trace, _USER_TRACE, user_trace)
        return trace


class ContextTransport(httpx.AsyncBaseTransport):
    """An async httpx transport that binds every request to a context.

    ::

        client = httpx.AsyncClient(transport=ContextTransport())
        r = await client.get(url)                      # under current()
        r = await client.get(url, extensions={"ctx": ctx})
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        margin: float = 0.010,
        timeout_header: str = "x-request-timeout-ms",
        request_id_header: str = "x-request-id",
        grpc_timeout: bool = True,
        envoy_upstream_timeout: bool = False,
    ) -> None:
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._propagation = _Propagation(
            margin, timeout_header, request_id_header, grpc_timeout, envoy_upstream_timeout
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ctx = self._propagation.prepare(request, is_async=True)
        with downstream_call(ctx, "httpx", f"HTTP call to {request.url.netloc.decode()}"):
            async with ctx.scope():
                response = await self._transport.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_AsyncContextStream(response.stream, ctx),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


class _AsyncContextStream(httpx.AsyncByteStream):
    """Reads the body under the context: the deadline covers the whole download."""

    def __init__(self, stream: httpx.AsyncByteStream, ctx: Context) -> None:
        self._stream = stream
        self._ctx = ctx

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._stream.__aiter__()
        while True:
            # One scope per read, never across a yield: the consumer's code
            # between chunks must not be cancelled on our behalf.
            async with self._ctx.scope():
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


# -- sync --------------------------------------------------------------------

# What a request shut down by the context raises (a closed socket, a reset connection).
_ABORTED = (httpx.TransportError, OSError)

_active_socket: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar(
    "ctxmiddleware.httpx_in_flight", default=None
)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read at once


class _InFlight:
    """The socket a sync request is using, so the context can shut it down.

    Once the request is over (:meth:`finish`, before its connection goes back
    to the pool) an abort does nothing: the ``after_func`` thread may start
    late, and the connection may be carrying another request by then.
    """

    __slots__ = ("_lock", "aborted", "finished", "sock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.aborted = False
        self.finished = False

    def abort(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.aborted = True
            if self.sock is not None:
                _shutdown(self.sock)

    def track(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.sock is not None or self.finished or sock is None:
                return
            self.sock = sock
            if self.aborted:
                _shutdown(sock)

    def finish(self) -> None:
        with self._lock:
            self.finished = True


class _TrackingStream:
    """Wraps an httpcore network stream; reports its socket to the in-flight request."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _track(self) -> None:
        in_flight = _active_socket.get()
        if in_flight is not None and in_flight.sock is None:
            in_flight.track(self._stream.get_extra_info("socket"))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._track()
        return self._stream.read(max_bytes, timeout)  # type: ignore[no-any-return]

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._track()
        self._stream.write(buffer, timeout)

    def start_tls(self, *args: Any, **kwargs: Any) -> _TrackingStream:
        return _TrackingStream(self._stream.start_tls(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _TrackingBackend:
    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _TrackingStream:
        return _TrackingStream(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _TrackingStream:
        return _TrackingStream(self._backend.connect_unix_socket(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class SyncContextTransport(httpx.BaseTransport):
    """The sync counterpart of :class:`ContextTransport`.

    A thread cannot be cancelled, so when the context is done the transport
    shuts the request's socket down from another thread: the blocked call
    raises and the server sees the connection close.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        margin: float = 0.010,
        timeout_header: str = "x-request-timeout-ms",
        request_id_header: str = "x-request-id",
        grpc_timeout: bool = True,
        envoy_upstream_timeout: bool = False,
    ) -> None:
        self._transport = transport if transport is not None else httpx.HTTPTransport()
        pool = getattr(self._transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and not isinstance(backend, _TrackingBackend):
            pool._network_backend = _TrackingBackend(backend)  # type: ignore[union-attr]
        self._propagation = _Propagation(
            margin, timeout_header, request_id_header, grpc_timeout, envoy_upstream_timeout
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ctx = self._propagation.prepare(request, is_async=False)
        in_flight = _InFlight()
        token = _active_socket.set(in_flight)
        stop = after_func(ctx, in_flight.abort)
        try:
            with downstream_call(ctx, "httpx", f"HTTP call to {request.url.netloc.decode()}"):
                response = self._transport.handle_request(request)
        except BaseException as exc:
            # Whatever went wrong, the socket must not be shut down later:
            # the pool may hand it to another request.
            stop()
            in_flight.finish()
            if isinstance(exc, _ABORTED):
                raise_if_done(ctx, exc)
            raise
        finally:
            _active_socket.reset(token)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_SyncContextStream(response.stream, ctx, in_flight, stop),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._transport.close()


class _SyncContextStream(httpx.SyncByteStream):
    def __init__(
        self, stream: httpx.SyncByteStream, ctx: Context, in_flight: _InFlight, stop: Any
    ) -> None:
        self._stream = stream
        self._ctx = ctx
        self._in_flight = in_flight
        self._stop = stop

    def __iter__(self) -> Iterator[bytes]:
        # The socket was found while the headers were read; the after_func
        # registered then still aborts this body read.
        try:
            for chunk in self._stream:
                self._ctx.check()
                yield chunk
        except _ABORTED as exc:
            raise_if_done(self._ctx, exc)
            raise

    def close(self) -> None:
        self._stop()
        self._in_flight.finish()  # before the connection can go back to the pool
        self._stream.close()


def _bind_client(
    client: Any, wrap: type[ContextTransport | SyncContextTransport], **options: Any
) -> None:
    """Put every transport of ``client`` under the context: the default one and
    each mount, the proxies (``proxy=``, ``HTTP_PROXY``...) included, which
    httpx builds itself from the client's options."""
    try:
        transport = client._transport
        mounts = client._mounts
    except AttributeError:  # pragma: no cover - a future httpx
        raise RuntimeError(
            f"ctxmiddleware cannot bind this httpx version ({httpx.__version__}) to a context"
        ) from None

    def bound(t: Any) -> Any:
        return t if t is None or isinstance(t, wrap) else wrap(t, **options)

    client._transport = bound(transport)
    client._mounts = {pattern: bound(t) for pattern, t in mounts.items()}


def httpx_async_client(
    *, grpc_timeout: bool = True, envoy_upstream_timeout: bool = False, **kwargs: Any
) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**kwargs)`` whose requests follow the current context.

    Every option means what it means to httpx (``limits``, ``http2``,
    ``verify``, ``proxy``, ``mounts``, ``trust_env``...); every transport the
    client uses, proxies included, is wrapped in :class:`ContextTransport`.
    ``grpc_timeout``: also send the budget as ``grpc-timeout``;
    ``envoy_upstream_timeout``: also as ``x-envoy-upstream-rq-timeout-ms``
    (for calls that leave through an Envoy sidecar: Envoy then times the call
    out at the deadline too).
    """
    client = httpx.AsyncClient(**kwargs)
    _bind_client(
        client,
        ContextTransport,
        grpc_timeout=grpc_timeout,
        envoy_upstream_timeout=envoy_upstream_timeout,
    )
    return client


def httpx_client(
    *, grpc_timeout: bool = True, envoy_upstream_timeout: bool = False, **kwargs: Any
) -> httpx.Client:
    """``httpx.Client(**kwargs)`` whose requests follow the current context.

    Every transport the client uses is wrapped in :class:`SyncContextTransport`;
    ``grpc_timeout`` and ``envoy_upstream_timeout`` as for :func:`httpx_async_client`.
    """
    client = httpx.Client(**kwargs)
    _bind_client(
        client,
        SyncContextTransport,
        grpc_timeout=grpc_timeout,
        envoy_upstream_timeout=envoy_upstream_timeout,
    )
    return client
