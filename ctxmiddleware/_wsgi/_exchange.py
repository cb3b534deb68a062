"""One WSGI request going through the middleware: the request layer's Request,
plus ``start_response``, the response iterable and the disconnect watch."""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any

from .._core import (
    CURRENT_CONTEXT,
    ClientDisconnected,
    ContextError,
    DeadlineExceeded,
    cause,
)
from .._request import EAGER_BODY_LIMIT, Request, RequestConfig
from . import _watcher as _watcher_mod
from ._environ import EnvironHeaders, client_probe
from ._watcher import ARM_AHEAD, Watcher, hung_up, watcher

__all__ = ["ENVIRON_KEY", "StartResponse", "WsgiRequest"]

_log = logging.getLogger("ctxmiddleware")

ENVIRON_KEY = "ctxmiddleware.context"
"""Where the request's context is in the environ."""

Environ = MutableMapping[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]

_STATUS_TEXT = {
    499: "Client Closed Request",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _status_line(status: int) -> str:
    return f"{status} {_STATUS_TEXT.get(status, 'Error')}"


def _discard(data: bytes) -> None:
    """The ``write`` of a response the middleware replaced."""


_END: Any = object()  # next()'s default: the app's iterable is exhausted
_INF = math.inf


class _BodyWatch:
    """``wsgi.input`` for a body too large to read ahead: starts the disconnect
    watch once the app has read the whole body (Go's rule)."""

    def __init__(self, raw: Any, left: int | None, request: WsgiRequest) -> None:
        self._raw = raw
        self._left = left  # None: chunked, until a read returns b""
        self._request: WsgiRequest | None = request

    def _got(self, data: bytes, asked: int | None) -> bytes:
        request = self._request
        if request is not None:
            if self._left is not None:
                self._left -= len(data)
                if self._left <= 0:
                    self._request = None
                    request.body_read()
            elif not data and asked != 0:
                self._request = None
                request.body_read()
        return data

    def _failed(self) -> None:
        """Reading raised OSError (the client reset the connection: gunicorn's
        ``ConnectionResetError``, ``NoMoreData``): the client is gone."""
        request = self._request
        if request is not None:
            self._request = None
            request.client_left()

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = self._raw.read() if size is None or size < 0 else self._raw.read(size)
        except OSError:
            self._failed()
            raise
        return self._got(data, None if size is None or size < 0 else size)

    def readline(self, size: int | None = -1) -> bytes:
        try:
            data = self._raw.readline() if size is None or size < 0 else self._raw.readline(size)
        except OSError:
            self._failed()
            raise
        return self._got(data, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        try:
            lines = self._raw.readlines(hint) if hint and hint > 0 else self._raw.readlines()
        except OSError:
            self._failed()
            raise
        for line in lines:
            self._got(line, -1)
        if hint is None or hint <= 0:
            self._got(b"", -1)
        return list(lines)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class WsgiRequest(Request):
    """One request under :class:`WSGIContextMiddleware` (also the response
    iterable the server gets: one object per request)."""

    fd = -1
    probe: Callable[[], bool] | None = None
    finished = False
    started = False
    replaced = False
    sent_body = False
    flushed = False  # the server's start_response was called (once, ever)
    ours = False  # the pending response is the middleware's answer
    expect: int = -1  # the response's Content-Length, -1 if none
    _pending: tuple[str, list[tuple[str, str]]] | None = None
    _server_write: Callable[[bytes], object] | None = None
    _it: Iterator[bytes] | None = None
    _inner: Any = None
    _answer: bytes | None = None
    _watcher: Watcher | None = None  # the client is watched (body read)
    _timed_by: Watcher | None = None  # the watcher arms the deadline timer
    server_start_response: StartResponse

    def __init__(
        self,
        config: RequestConfig,
        environ: Environ,
        headers: EnvironHeaders,
    ) -> None:
        # Most requests carry none of our headers: one test in C, not a
        # lookup per header in Python.
        pairs = [] if headers.names.isdisjoint(environ) else headers.pairs(environ)
        Request.__init__(self, config, environ.get("REMOTE_ADDR"), pairs, False, environ)
        self.environ: Environ | None = environ
        self.rid_name = headers.rid_name

    # -- watching ------------------------------------------------------------

    def begin(self, environ: Environ) -> None:
        """The app is about to run: have the deadline timer armed, watch the
        client once the body is read (short bodies are read ahead)."""
        when = self.deadline_at
        if when != _INF:
            if when - self.arrival > ARM_AHEAD:
                # The watcher thread arms the timer shortly before the
                # deadline, if the request still runs then (see _watcher.py):
                # most requests end long before and never arm it, which saves
                # them ~8k instructions (under valgrind) and wakes no thread.
                # (Until then err() and check() still compare the deadline
                # with the clock.) The watcher used to arm it 1 ms after the
                # start: a wake-up of that thread, and GIL hand-offs, for
                # every slower request.
                w = self._timed_by = _watcher_mod._watcher or watcher()
                w.watch_deadline(self)
            else:
                self.root.arm()
        sock = environ.get("gunicorn.socket")
        if sock is not None:  # (client_probe()'s first case written out)
            try:
                fd, probe = int(sock.fileno()), None
            except (OSError, ValueError, AttributeError):
                return
        else:
            fd, probe = client_probe(environ)
        if fd < 0 and probe is None:
            return
        self.fd = fd
        if probe is not None:
            self.probe = probe
        size = self.body_size()
        if size == 0:  # no body: watch now (body_read() written out: most requests)
            w = self._watcher = _watcher_mod._watcher or watcher()
            if fd >= 0:
                if not w.watch_fd(fd, self):
                    self.fd = -1
            elif probe is not None:
                w.watch_probe(probe, self)
            return
        if size is not None and size <= EAGER_BODY_LIMIT:
            # A short body is read ahead (the server has it, or will in a
            # moment), so that a client leaving while the app does not read
            # its body is seen.
            try:
                data = environ["wsgi.input"].read(size)
            except OSError:
                # The client reset the connection mid-body: it is gone (the
                # middleware answers 499 without the app).
                environ["wsgi.input"] = io.BytesIO(b"")
                self.client_left()
                return
            environ["wsgi.input"] = io.BytesIO(data)
            self.body_read()
            return
        left = size
        environ["wsgi.input"] = _BodyWatch(environ["wsgi.input"], left, self)

    def body_read(self) -> None:
        if self.finished or self._watcher is not None:
            return
        w = self._watcher = watcher()
        if self.fd >= 0:
            if not w.watch_fd(self.fd, self):
                self.fd = -1
        elif self.probe is not None:
            w.watch_probe(self.probe, self)

    def arm_deadline(self) -> None:
        """The deadline is near (the watcher's thread): arm the timer."""
        root = getattr(self, "root", None)
        if root is not None and not self.finished:
            root.arm()

    def deadline_moved(self) -> None:
        if self.finished:
            return
        when = self.deadline_at
        w = self._timed_by
        if when != _INF and when - time.monotonic() > ARM_AHEAD:
            if w is None:
                w = self._timed_by = _watcher_mod._watcher or watcher()
            w.watch_deadline(self)  # (again: it may be earlier)
            return
        if w is not None:
            self._timed_by = None
            w.unwatch_deadline(self)
        if when != _INF:
            self.root.arm()

    def client_left(self) -> None:
        """The watcher saw the client go (its thread)."""
        if self.complete or self.finished:
            return
        root = getattr(self, "root", None)
        if root is None:
            return
        self.client_gone = True
        root.cancel(ClientDisconnected())

    # -- the response --------------------------------------------------------

    # The app's status and headers are held (pending) until the first body
    # bytes, or the end of an empty body, are handed to the server: only then
    # is the server's start_response called, once. An answer of ours (the
    # timeout status, 499, 500) replaces a pending start: a server that
    # appends the headers of a second start_response call (gunicorn) never
    # sees one. Once the server has the headers, a replacement aborts.

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if self.replaced:
            return _discard
        if exc_info is not None and self.flushed:
            # Too late to replace the headers (PEP 3333: re-raise).
            try:
                raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        code = int(status[:3])
        if code == 500 and self.root.err() is not None and self._answer is None:
            # The app's error handler made a 500 of the request's own
            # cancellation (or a ctx.err() it raised): answer as if it had
            # reached us.
            self.replaced = True
            if exc_info is None:
                current_exc = sys.exc_info()[1]
                if current_exc is not None:
                    exc_info = (type(current_exc), current_exc, current_exc.__traceback__)
            self._answer = self.answer_done(exc_info)
            return _discard
        if exc_info is None and (self.started or self.flushed):
            raise AssertionError("start_response() called again without exc_info")
        rid = self.rid_name
        theirs = False
        for name, value in headers:
            name = name.lower()
            if name == "content-length":
                value = value.strip()
                self.expect = int(value) if value.isdigit() else -1
            elif name == rid:
                theirs = True
        # Ours replaces the app's (a copy: the app may reuse its list).
        out = [h for h in headers if h[0].lower() != rid] if theirs else list(headers)
        out.append((rid, self.request_id))
        self.status = code
        self.started = True
        environ = self.environ
        if self.expect == 0 or (environ is not None and environ.get("REQUEST_METHOD") == "HEAD"):
            self.complete = True  # nothing (more) to send after the headers
        self._pending = (status, out)
        if self.ours:  # (an answer of ours was pending: the app's replaces it)
            self.ours = False
        return self.write

    def flush(self) -> None:
        """Hand the pending status and headers to the server (the body follows)."""
        pending = self._pending
        if pending is None or self.flushed:
            return
        self._pending = None
        self.flushed = True
        self._server_write = self.server_start_response(pending[0], pending[1])

    def write(self, data: bytes) -> None:
        """The app's ``write`` callable (PEP 3333's imperative API)."""
        if self.ours:
            return  # we answered for the app
        if not self.flushed:
            self.flush()
        server_write = self._server_write
        if server_write is None:
            raise AssertionError("write() before start_response()")
        if data:
            self.sent_body = True
        server_write(data)

    def _replace(self, code: int, body: bytes, exc_info: ExcInfo | None) -> None:
        """Our answer replaces the pending start; abort if the server has the headers."""
        if self.flushed:
            if exc_info is not None:
                raise exc_info[1].with_traceback(exc_info[2])
            err = self.root.err()
            raise err if err is not None else RuntimeError("the response started")
        self.status = code
        rid = self.rid_name
        self._pending = (
            _status_line(code),
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                (rid, self.request_id),
            ],
        )
        self.ours = True

    def answer_done(self, exc_info: ExcInfo | None) -> bytes:
        """The root is done and the app gave up: the timeout status for a
        deadline, 499 after a disconnect (nobody reads it). Returns the body."""
        config = self.config
        if isinstance(self.root.err(), DeadlineExceeded) and not self.client_gone:
            code, body = config.timeout_status, config.timeout_body
            self.answered_timeout = True
        else:
            code, body = 499, b""
        self._replace(code, body, exc_info)
        return body

    def answer_now(self, exc_info: ExcInfo | None) -> list[bytes]:
        """:meth:`answer_done` as a whole response (a list, not our iterator)."""
        body = self.answer_done(exc_info)
        self.flush()
        return [body]

    def answer_plain(self, code: int, body: bytes, exc_info: ExcInfo | None) -> list[bytes]:
        self._replace(code, body, exc_info)
        self.flush()
        return [body]

    def app_raised(self, exc: BaseException) -> list[bytes]:
        """The app raised ``exc`` from its call: answer (and end the request), or
        re-raise it."""
        try:
            root = self.root
            err = root.err()
            if isinstance(exc, Exception):
                if err is not None and (
                    isinstance(exc, ContextError) or isinstance(cause(root), ClientDisconnected)
                ):
                    if not isinstance(exc, ContextError):
                        _log.debug("ctxmiddleware: error while cancelled", exc_info=True)
                    exc_info = (type(exc), exc, exc.__traceback__) if self.started else None
                    return self.answer_now(exc_info)
                self.failed = True
                if not self.started:
                    _log.error(
                        "ctxmiddleware: unhandled error request_id=%s",
                        self.request_id, exc_info=exc,
                    )
                    return self.answer_plain(500, b"Internal Server Error", None)
            else:
                self.cancelled_from_outside = True
            raise exc
        finally:
            self.finish()

    def respond(self, result: Iterable[bytes]) -> Iterable[bytes]:
        """The app returned ``result``: the iterable the server gets."""
        if self._answer is not None:
            # We answered for the app (its 500 for our cancellation).
            close = getattr(result, "close", None)
            if close is not None:
                close()
            body = self._answer
            self.flush()
            self.finish()
            return [body]
        self._inner = result
        self._it = iter(result)
        return self

    def __iter__(self) -> Iterator[bytes]:
        # A generator, not a __next__ method: no Python call per chunk, and
        # the end of the app's iterable ends the server's loop without a
        # StopIteration caught and raised again (next() with a default).
        it = self._it
        if it is None:  # (iterated again after it ended)
            body = self._answer
            self._answer = None
            self.flush()
            if body:
                yield body
            return
        root = self.root
        while True:
            # (Once the response is complete, a late deadline changes nothing.)
            if not self.complete and root.err() is not None:
                tail = self._stop_early()
                break
            token = CURRENT_CONTEXT.set(root)
            try:
                chunk = next(it, _END)
            except Exception as exc:
                if root.err() is not None and (
                    isinstance(exc, ContextError) or isinstance(cause(root), ClientDisconnected)
                ):
                    tail = self._stop_early(exc)
                    break
                self.failed = True
                raise
            finally:
                CURRENT_CONTEXT.reset(token)
            if chunk is _END:
                self.complete = True
                if not self.flushed:
                    self.flush()  # an empty body: the headers go now
                return
            if self.ours:
                # The app's error handler answered for our cancellation while
                # iterating (start_response with a 500): our answer, not its body.
                tail = self._stop_early()
                break
            if not self.flushed:  # the first chunk: the headers go first
                pending = self._pending
                if pending is not None:  # (flush() written out)
                    self._pending = None
                    self.flushed = True
                    self._server_write = self.server_start_response(*pending)
            if chunk:
                self.sent_body = True
                expect = self.expect
                if expect > 0:
                    expect -= len(chunk)
                    self.expect = expect
                    if expect <= 0:
                        # Mark it complete before the server sends the last bytes:
                        # a client that closes on reading them has not left early.
                        self.complete = True
            # (The root is not bound while the server has the chunk.)
            yield chunk
        if tail:
            yield tail

    def _stop_early(self, exc: BaseException | None = None) -> bytes:
        """The root is done while the response is under way: stop the app's
        iterable; answer the deadline if nothing was sent yet (the last chunk:
        b"" for none), else abort (raise)."""
        self._it = None
        self._close_inner()
        root = self.root
        err = root.err()
        if self.client_gone or isinstance(cause(root), ClientDisconnected):
            self.flush()
            return b""  # nobody to send to
        if self.ours and self._pending is not None:
            body = self._answer or b""  # answered already (the app's 500 handler)
            self._answer = None
            self.flush()
            return body
        if not self.flushed:
            info: ExcInfo | None = None
            if self.started:
                e = exc if exc is not None else err
                assert e is not None
                info = (type(e), e, e.__traceback__)
            body = self.answer_done(info)  # replaces the app's pending start
            self.flush()
            return body
        # The response started: abort it (never a response that looks whole).
        assert err is not None
        raise err

    def _close_inner(self) -> None:
        inner = self._inner
        self._inner = None
        close = getattr(inner, "close", None)
        if close is not None:
            root = self.root
            if CURRENT_CONTEXT.get() is root:
                close()
                return
            token = CURRENT_CONTEXT.set(root)
            try:
                close()
            finally:
                CURRENT_CONTEXT.reset(token)

    def close(self) -> None:
        """The server is done with the response (Go's ServeHTTP return)."""
        if self.finished:
            return
        if not self.complete and self.root.err() is None and self._client_gone_now():
            # The server stopped early because a send failed: the client left
            # before the watcher thread saw it go. The same disconnect.
            self.client_left()
        # The root bound once for the app's close() and our end(), not twice.
        token = CURRENT_CONTEXT.set(self.root)
        try:
            inner = self._inner
            self._inner = None
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        finally:
            try:
                self.finish()
            finally:
                CURRENT_CONTEXT.reset(token)

    def _client_gone_now(self) -> bool:
        if self.fd >= 0:
            return hung_up(self.fd)
        probe = self.probe
        if probe is None:
            return False
        try:
            return bool(probe())
        except Exception:  # the server's callable: never fail the close
            return False

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        w = self._timed_by
        if w is not None:
            w.unwatch_deadline(self)
        w = self._watcher
        if w is not None:
            if self.fd >= 0:
                w.unwatch_fd(self.fd, self)
            elif self.probe is not None:
                w.unwatch_probe(self)
        if self.probe is not None:
            self.probe = None
        self._it = None
        self._server_write = None
        environ = self.environ
        self.environ = None
        root = self.root
        err_before = root.err()
        method = path = None
        if environ is not None:
            method = environ.get("REQUEST_METHOD")
            path = environ.get("PATH_INFO")
        if CURRENT_CONTEXT.get() is root:  # close(), or within the app's call
            self.end(method, path)
        else:
            token = CURRENT_CONTEXT.set(root)
            try:
                self.end(method, path)
            finally:
                CURRENT_CONTEXT.reset(token)
        if err_before is not None:
            # Break the cycle error -> traceback -> frames -> request.
            err_before.__traceback__ = None
            err_before.__context__ = None
            err_before.__cause__ = None
