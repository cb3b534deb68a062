"""Test what your app does when the client goes away, the budget runs out, or both.

``httpx.ASGITransport`` and Starlette's ``TestClient`` cannot hang up halfway
through a request. This module runs your app under a real server on an
ephemeral port, in a thread of the test process, and talks to it over a raw
socket that closes exactly when the test says::

    from ctxmiddleware import ClientDisconnected
    from ctxmiddleware.testing import Probe, serve_app

    probe = Probe()

    async def report(request):
        probe.started()                       # the handler runs: mark its context
        await asyncio.sleep(60)

    with serve_app(app, server="uvicorn-h11") as running:
        running.request("GET", "/report", probe=probe, disconnect="mid_handler")
        probe.wait_cancelled(ClientDisconnected)    # the request's context saw it

Disconnect phases (``disconnect=``): ``"before_body_end"`` (the head and part
of the body are sent), ``"mid_handler"`` (once the handler called
``probe.started()``), ``"mid_stream"`` (once the first chunk of the response
body arrived), ``"after_response"`` (right after the last byte of the
response). ``wait_query_gone(dsn, text)`` polls PostgreSQL until no backend
runs a query containing ``text``.

As a pytest plugin (loaded automatically once ``ctxmiddleware`` is installed,
through its ``pytest11`` entry point; or ``pytest_plugins =
["ctxmiddleware.testing"]``) it provides the fixtures ``ctx_probe`` (a fresh
:class:`Probe`) and ``ctx_serve`` (``ctx_serve(app, server=...)`` starts a
server stopped at the end of the test).

The servers (uvicorn, hypercorn), psycopg and pytest are imported only when
used. The app runs on the server thread's event loop: share ``threading``
objects with it (a :class:`Probe` is one), never asyncio ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import REQUEST_ID, Context, after_func, cause, current

__all__ = [
    "PHASES",
    "SERVERS",
    "Mark",
    "Probe",
    "Response",
    "RunningApp",
    "serve_app",
    "wait_query_gone",
    "wait_query_running",
]

SERVERS = ("uvicorn-h11", "uvicorn-httptools", "hypercorn")
PHASES = ("before_body_end", "mid_handler", "mid_stream", "after_response")

WAIT = 5.0  # the default bound for anything waited on; reached only on failure


# -- the probe: the app marks its request's context, the test waits on it ------


class Mark:
    """One request's context, marked by the app with :meth:`Probe.started`."""

    def __init__(self, ctx: Context, data: dict[str, Any]) -> None:
        self.ctx = ctx
        self.data = data
        request_id = ctx.value(REQUEST_ID)
        self.request_id: str | None = None if request_id is None else str(request_id)
        self.started_at = time.monotonic()
        self.done_at: float | None = None
        self.err: BaseException | None = None
        self.cause: BaseException | None = None
        self._done = threading.Event()

    def _fire(self) -> None:
        # after_func runs this in a thread of its own once the context is done.
        self.err = self.ctx.err()
        self.cause = cause(self.ctx)
        self.done_at = time.monotonic()
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self, timeout: float = WAIT) -> BaseException:
        """Wait until the context is done; return its cause."""
        if not self._done.wait(timeout):
            raise AssertionError(
                f"the context of request {self.request_id} is still live after {timeout} s"
            )
        assert self.cause is not None
        return self.cause

    def wait_cancelled(
        self, cause: type[BaseException] | tuple[type[BaseException], ...], timeout: float = WAIT
    ) -> BaseException:
        """Wait until the context is done and check that its cause is a ``cause``."""
        got = self.wait_done(timeout)
        if not isinstance(got, cause):
            raise AssertionError(
                f"the context of request {self.request_id} ended with cause "
                f"{type(got).__name__} ({got!r}), not {_names(cause)}"
                + (" (the request ended normally)" if type(got).__name__ == "Canceled" else "")
            )
        return got


def _names(types: type[BaseException] | tuple[type[BaseException], ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


class Probe:
    """Shared by the app (which calls :meth:`started`) and the test (which waits).

    Thread-safe: the app runs on the server's thread (or in a worker thread
    for a sync endpoint), the test on its own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._marks: list[Mark] = []
        self._taken = 0

    def started(self, ctx: Context | None = None, **data: Any) -> Mark:
        """In the app: the handler runs under ``ctx`` (default ``current()``).

        Keyword arguments are kept in ``mark.data`` for the test.
        """
        mark = Mark(current() if ctx is None else ctx, data)
        after_func(mark.ctx, mark._fire)
        with self._cond:
            self._marks.append(mark)
            self._cond.notify_all()
        return mark

    @property
    def marks(self) -> list[Mark]:
        with self._cond:
            return list(self._marks)

    def wait_started(self, timeout: float = WAIT, *, request_id: str | None = None) -> Mark:
        """Wait for the handler of ``request_id``, or else for the next mark not
        yet returned by this method."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if request_id is not None:
                    for mark in self._marks:
                        if mark.request_id == request_id:
                            return mark
                elif self._taken < len(self._marks):
                    self._taken += 1
                    return self._marks[self._taken - 1]
                left = end - time.monotonic()
                if left <= 0:
                    what = f"request {request_id}" if request_id else "a request"
                    raise AssertionError(
                        f"the handler of {what} did not call probe.started() within {timeout} s"
                    )
                self._cond.wait(left)

    def last(self, timeout: float = WAIT) -> Mark:
        """The latest mark (waiting for a first one)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._marks:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no handler called probe.started() within {timeout} s")
                self._cond.wait(left)
            return self._marks[-1]

    def wait_cancelled(
        self,
        cause: type[BaseException] | tuple[type[BaseException], ...],
        timeout: float = WAIT,
        *,
        request_id: str | None = None,
    ) -> BaseException:
        """The request's context (``request_id``'s, or the latest marked) ended
        with a cause that is a ``cause`` (``ClientDisconnected``,
        ``DeadlineExceeded``...); returns it."""
        end = time.monotonic() + timeout
        mark = (
            self.last(timeout)
            if request_id is None
            else self.wait_started(timeout, request_id=request_id)
        )
        return mark.wait_cancelled(cause, max(0.0, end - time.monotonic()))


# -- the server ------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """What came back. ``complete`` is False for a response cut off on purpose
    (``disconnect="mid_stream"``) or by the server."""

    status: int
    headers: dict[str, str]  # lower-case names; a repeated header's values joined by ", "
    body: bytes
    complete: bool = True

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class RunningApp:
    """A served app: ``url``, and :meth:`request` over a raw socket."""

    server: str
    host: str
    port: int
    _stop: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self, timeout: float = WAIT) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        budget_ms: int | str | None = None,
        request_id: str | None = None,
        disconnect: str | None = None,
        probe: Probe | None = None,
        sent_fraction: float = 0.5,
        reset: bool = False,
        timeout: float = WAIT,
    ) -> Response | None:
        """Send one HTTP/1.1 request on a new connection; hang up at ``disconnect``.

        ``budget_ms`` is sent as ``x-request-timeout-ms`` (the caller's budget);
        ``request_id`` (default: a fresh one) as ``x-request-id``, so a
        :class:`Probe` finds the handler's mark. ``disconnect``: None (read the
        whole response), or one of :data:`PHASES`:

        * ``"before_body_end"``: send the head and ``sent_fraction`` of ``body``,
          wait for the handler's ``probe.started()`` if a probe is given, close;
        * ``"mid_handler"``: send everything, wait for ``probe.started()``
          (a probe is required), close;
        * ``"mid_stream"``: close once the head and the first body bytes arrived;
          returns them (``complete=False``);
        * ``"after_response"``: close right after the whole response arrived.

        ``reset=True`` closes with a TCP RST instead of a FIN. Returns the
        response, or None when the client hung up before one arrived.
        """
        if disconnect is not None and disconnect not in PHASES:
            raise ValueError(f"disconnect must be None or one of {PHASES}, not {disconnect!r}")
        if disconnect == "mid_handler" and probe is None:
            raise ValueError("disconnect='mid_handler' needs the probe the handler marks")
        if disconnect == "before_body_end" and not body:
            raise ValueError("disconnect='before_body_end' needs a body")
        if not 0 <= sent_fraction < 1:
            raise ValueError("sent_fraction must be in [0, 1)")
        request_id = uuid.uuid4().hex if request_id is None else request_id
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        names = {name.lower() for name, _ in items}
        if "x-request-id" not in names:
            items.append(("x-request-id", request_id))
        if budget_ms is not None:
            items.append(("x-request-timeout-ms", str(budget_ms)))
        raw = http_request(method, path, items, body, host=f"{self.host}:{self.port}")
        head_len = len(raw) - len(body)
        sock = self.connect(timeout)
        try:
            if disconnect == "before_body_end":
                sock.sendall(raw[: head_len + int(len(body) * sent_fraction)])
                if probe is not None:
                    probe.wait_started(timeout, request_id=request_id)
                return None
            sock.sendall(raw)
            if disconnect == "mid_handler":
                assert probe is not None
                probe.wait_started(timeout, request_id=request_id)
                return None
            return read_response(sock, timeout, first_chunk=disconnect == "mid_stream")
        finally:
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            sock.close()


def http_request(
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    host: str = "test",
) -> bytes:
    """An HTTP/1.1 request as bytes (Host, and Content-Length unless a framing
    header is given)."""
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {path} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if (body or method in ("POST", "PUT", "PATCH")) and not names & {
        "content-length",
        "transfer-encoding",
    }:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_response(
    sock: socket.socket, timeout: float = WAIT, *, first_chunk: bool = False
) -> Response:
    """Read one response (Content-Length, chunked, or up to the close).

    ``first_chunk``: return as soon as the head and some body bytes are in
    (``complete=False`` unless the whole body happened to be there).
    """
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the connection closed before a response head; got {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    no_body = status in (204, 304) or 100 <= status < 200
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if no_body:
        return Response(status, headers, b"")
    length = None if chunked else headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ValueError(f"malformed response: Content-Length {length!r}; head {head!r}")
    while True:
        if chunked:
            body, done = _dechunk(rest)
        elif length is not None:
            body, done = rest[: int(length)], len(rest) >= int(length)
        else:
            body, done = rest, False
        if done or (first_chunk and body):
            return Response(status, headers, body, complete=done)
        chunk = sock.recv(65536)
        if not chunk:
            if length is None and not chunked:
                return Response(status, headers, body)  # delimited by the close
            return Response(status, headers, body, complete=False)
        rest += chunk


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body decoded so far from chunked ``data``, and whether it ended."""
    body = b""
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return body, False
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return body, True
        start = end + 2
        piece = data[start : start + size]
        body += piece
        if len(piece) < size or len(data) < start + size + 2:
            return body, False
        pos = start + size + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_app(app: Any, server: str = "uvicorn-h11", **options: Any) -> Iterator[RunningApp]:
    """Serve ``app`` on 127.0.0.1 (an ephemeral port) in a thread until the block exits.

    ``server``: one of :data:`SERVERS`. ``options`` go to ``uvicorn.Config`` or
    to hypercorn's ``Config`` attributes. uvicorn runs with
    ``proxy_headers=False`` (the middleware decides whom to trust), no access
    log and no lifespan unless ``options`` say otherwise.
    """
    if server not in SERVERS:
        raise ValueError(f"server must be one of {SERVERS}, not {server!r}")
    port = _free_port()
    started = threading.Event()
    stop: list[Callable[[], None]] = []
    errors: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(_serve(app, server, port, options, started, stop, loop))
        except BaseException as exc:  # reported to the test
            errors.append(exc)
        finally:
            started.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=f"ctxmiddleware-testing-{server}", daemon=True)
    thread.start()
    if not started.wait(20) or errors or not stop:
        if stop:
            stop[0]()
        thread.join(10)
        if errors:
            raise errors[0]
        raise RuntimeError(f"{server} did not start")

    def stop_server() -> None:
        stop[0]()
        thread.join(10)

    try:
        yield RunningApp(server, "127.0.0.1", port, stop_server)
    finally:
        stop_server()
        if errors:
            raise errors[0]


async def _serve(
    app: Any,
    server: str,
    port: int,
    options: dict[str, Any],
    started: threading.Event,
    stop: list[Callable[[], None]],
    loop: asyncio.AbstractEventLoop,
) -> None:
    if server.startswith("uvicorn"):
        import uvicorn

        config = uvicorn.Config(
            app,
            **{
                "host": "127.0.0.1",
                "port": port,
                "http": "h11" if server == "uvicorn-h11" else "httptools",
                "loop": "asyncio",
                "log_level": "warning",
                "access_log": False,
                "proxy_headers": False,
                "lifespan": "off",
                **options,
            },
        )
        userver = uvicorn.Server(config)

        def stop_uvicorn() -> None:
            userver.should_exit = True

        stop.append(stop_uvicorn)
        task = asyncio.create_task(userver.serve())
        while not userver.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.005)
        started.set()
        await task
        return

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    hconfig = Config()
    hconfig.bind = [f"127.0.0.1:{port}"]
    hconfig.loglevel = "WARNING"
    hconfig.graceful_timeout = 0.5
    for key, value in options.items():
        setattr(hconfig, key, value)
    shutdown = asyncio.Event()

    def stop_hypercorn() -> None:
        loop.call_soon_threadsafe(shutdown.set)

    stop.append(stop_hypercorn)
    htask = asyncio.create_task(serve(app, hconfig, shutdown_trigger=shutdown.wait))
    end = time.monotonic() + 15
    while time.monotonic() < end and not htask.done():
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        break
    started.set()
    await htask


# -- PostgreSQL: is the query still running? -------------------------------------

_ACTIVITY = (
    "SELECT pid, state FROM pg_stat_activity"
    " WHERE pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'"
    " AND strpos(query, %s) > 0"
)


def _backends(conn: Any, text: str) -> list[tuple[int, str]]:
    return [(int(pid), str(state)) for pid, state in conn.execute(_ACTIVITY, [text]).fetchall()]


def wait_query_running(dsn: str, text: str, timeout: float = WAIT, poll: float = 0.005) -> int:
    """Wait until a backend is running a query containing ``text``; return its pid."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        end = time.monotonic() + timeout
        while True:
            for pid, state in _backends(conn, text):
                if state == "active":
                    return pid
            if time.monotonic() > end:
                raise AssertionError(
                    f"no backend ran a query containing {text!r} within {timeout} s"
                )
            time.sleep(poll)


def wait_query_gone(dsn: str, text: str, timeout: float = WAIT, poll: float = 0.005) -> float:
    """Wait until no backend runs a query containing ``text``, nor sits in the
    transaction that ran it (``idle in transaction``); return the seconds waited.

    Raises AssertionError, listing the backends, if one is still there after
    ``timeout``.
    """
    import psycopg

    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            left = _backends(conn, text)
            if not left:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"a query containing {text!r} is still on the server after {timeout} s: "
                    + ", ".join(f"pid {pid} {state}" for pid, state in left)
                )
            time.sleep(poll)


# -- the pytest plugin -------------------------------------------------------------

try:
    import pytest
except ImportError:  # helpers only, outside pytest
    pass
else:

    @pytest.fixture
    def ctx_probe() -> Probe:
        """A fresh :class:`Probe` for the test's app to mark."""
        return Probe()

    @pytest.fixture
    def ctx_serve() -> Iterator[Callable[..., RunningApp]]:
        """``ctx_serve(app, server="uvicorn-h11", **options)``: a served app,
        stopped when the test ends."""
        with contextlib.ExitStack() as stack:

            def start(app: Any, server: str = "uvicorn-h11", **options: Any) -> RunningApp:
                return stack.enter_context(serve_app(app, server, **options))

            yield start
