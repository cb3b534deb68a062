"""Outbound HTTP under a context: httpx transports that carry deadlines downstream.

For every request made under a context (``extensions={"ctx": ctx}``, else
``current()``) the transport:

* fails fast with ``ctx.err()`` if the context is already done;
* clamps every httpx timeout to ``ctx.remaining()`` and enforces the total
  deadline (httpx timeouts apply per read, so a slow trickle could outlive it);
* sends ``x-request-timeout-ms`` (the remaining budget minus a safety margin) and
  ``x-request-id``, so the next service inherits the deadline and the id;
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
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from .._core._context import Context, after_func, current
from .._core._errors import DeadlineExceeded
from .._web._values import REQUEST_ID

__all__ = [
    "ContextTransport",
    "SyncContextTransport",
    "httpx_async_client",
    "httpx_client",
]

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


class _Propagation:
    """What both transports do to a request before sending it."""

    def __init__(self, margin: float, timeout_header: str, request_id_header: str) -> None:
        if not 0 <= margin < 10:
            raise ValueError("margin is in seconds, between 0 and 10")
        self.margin = margin
        self.timeout_header = timeout_header
        self.request_id_header = request_id_header

    def prepare(self, request: httpx.Request) -> Context:
        ctx = request.extensions.get("ctx")
        if not isinstance(ctx, Context):
            ctx = current()
        ctx.check()
        remaining = ctx.remaining()
        if remaining is not None:
            budget_ms = int((remaining - self.margin) * 1000)
            if budget_ms < 1:
                raise DeadlineExceeded("not enough time left before the deadline to send a request")
            request.headers[self.timeout_header] = str(budget_ms)
            timeouts = dict(request.extensions.get("timeout") or {})
            for key in _TIMEOUT_KEYS:
                value = timeouts.get(key)
                timeouts[key] = remaining if value is None else min(value, remaining)
            request.extensions["timeout"] = timeouts
        if self.request_id_header not in request.headers:
            request_id = ctx.value(REQUEST_ID)
            if request_id is not None:
                request.headers[self.request_id_header] = request_id
        return ctx


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
    ) -> None:
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._propagation = _Propagation(margin, timeout_header, request_id_header)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ctx = self._propagation.prepare(request)
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

_active_socket: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar(
    "ctxmiddleware.httpx_in_flight", default=None
)


class _InFlight:
    """The socket a sync request is using, so the context can shut it down."""

    __slots__ = ("aborted", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read at once


class _TrackingStream:
    """Wraps an httpcore network stream; reports its socket to the in-flight request."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _track(self) -> None:
        in_flight = _active_socket.get()
        if in_flight is not None and in_flight.sock is None:
            in_flight.sock = self._stream.get_extra_info("socket")
            if in_flight.aborted:
                in_flight.abort()

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
        transport: httpx.HTTPTransport | None = None,
        *,
        margin: float = 0.010,
        timeout_header: str = "x-request-timeout-ms",
        request_id_header: str = "x-request-id",
    ) -> None:
        self._transport = transport if transport is not None else httpx.HTTPTransport()
        pool = getattr(self._transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and not isinstance(backend, _TrackingBackend):
            pool._network_backend = _TrackingBackend(backend)  # type: ignore[union-attr]
        self._propagation = _Propagation(margin, timeout_header, request_id_header)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ctx = self._propagation.prepare(request)
        in_flight = _InFlight()
        token = _active_socket.set(in_flight)
        stop = after_func(ctx, in_flight.abort)
        try:
            response = self._transport.handle_request(request)
        except (httpx.TransportError, OSError) as exc:
            stop()
            err = ctx.err()
            if err is not None:
                raise err from exc
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
        except (httpx.TransportError, OSError) as exc:
            err = self._ctx.err()
            if err is not None:
                raise err from exc
            raise

    def close(self) -> None:
        self._stop()
        self._stream.close()


def httpx_async_client(**kwargs: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**kwargs)`` whose requests follow the current context."""
    transport = kwargs.pop("transport", None)
    return httpx.AsyncClient(transport=ContextTransport(transport), **kwargs)


def httpx_client(**kwargs: Any) -> httpx.Client:
    """``httpx.Client(**kwargs)`` whose requests follow the current context."""
    transport = kwargs.pop("transport", None)
    return httpx.Client(transport=SyncContextTransport(transport), **kwargs)
