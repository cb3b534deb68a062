"""ContextMiddleware cancellation over real servers: disconnects, deadlines, bodies.

Each server test runs uvicorn (h11, httptools) or hypercorn in a background
thread (see ``servers.py``) and talks to it over real sockets: raw ``socket``
where the test must control exactly when the connection goes away, httpx for
ordinary calls. The app runs on the server's loop, so the test synchronises
with it through ``threading.Event`` (:class:`Probe`) and wakes it through
:class:`Gate`; sleeps appear only to show that something does *not* happen.

The in-process tests at the end drive the middleware as a plain ASGI app on a
test loop with a fake ``receive``/``send``, where the test needs to own the
task running the app (outside cancellation, leftover tasks, ``send`` errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import Gate, Outer, Probe
from servers import SERVERS, RunningServer, raw_request, read_response, serve
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import (
    Canceled,
    ClientDisconnected,
    ContextMiddleware,
    DeadlineExceeded,
    route_timeout,
)
from ctxmiddleware import _request as request_layer
from ctxmiddleware.testing import Probe as KitProbe
from ctxmiddleware.testing import serve_app

WAIT = 5.0  # upper bound for anything the test waits for; reached only on failure

pytestmark = pytest.mark.timeout(60)


# -- synchronisation between the test thread and the server's loop ----------


def wrap(routes: list[Route], probe: Probe, **options: Any) -> Outer:
    return Outer(ContextMiddleware(Starlette(routes=routes), **options), probe)


def by_prefix(apps: dict[str, Any]) -> Any:
    """A tiny router outside the middlewares: ``/<prefix>/...`` goes to ``apps[prefix]``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        prefix = scope["path"].split("/")[1]
        await apps[prefix](scope, receive, send)

    return app


# -- raw HTTP/1.1 over a socket ----------------------------------------------


def parse_head(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def recv_until(sock: socket.socket, marker: bytes, timeout: float = WAIT) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}; got {data!r}"
        data += chunk
    return data


def recv_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One complete response with a Content-Length, leaving the connection open."""
    data = recv_until(sock, b"\r\n\r\n")
    status, headers, body = parse_head(data)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


@contextlib.contextmanager
def connection(server: RunningServer) -> Iterator[socket.socket]:
    sock = server.connect()
    try:
        yield sock
    finally:
        sock.close()


def timed_get(
    server: RunningServer, path: str, headers: Any = None
) -> tuple[httpx.Response, float]:
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        t0 = time.monotonic()
        response = client.get(path, headers=headers)
        return response, time.monotonic() - t0


# -- 1. disconnect while the handler awaits -----------------------------------


@pytest.mark.parametrize("mode", ["get", "post-read-1mb", "post-unread-10kb"])
@pytest.mark.parametrize("kind", SERVERS)
def test_disconnect_mid_handler_cancels_handler_and_context(
    kind: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """get: no body. post-read-1mb: the app read a large body first, then waits.
    post-unread-10kb: the app never reads its small body (the watcher reads it)."""
    probe = Probe("entered", "cancelled", "child_woke", "mw_done")

    async def slow(request: Request) -> Response:
        ctx = request.state.ctx
        if mode == "post-read-1mb":
            assert len(await request.body()) == 1024 * 1024

        async def child() -> None:
            await ctx.done()
            probe.set(
                "child_woke", child_err=ctx.err(), child_cause=ctxmiddleware.cause(ctx)
            )

        task = asyncio.create_task(child())
        probe.set("entered", ctx=ctx, same_current=ctxmiddleware.current() is ctx)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            # The child wakes while the handler still runs: from the disconnect,
            # not from the middleware cancelling the context at the end.
            t_cancel = time.monotonic()
            done, _ = await asyncio.wait({task}, timeout=WAIT)
            probe.set(
                "cancelled",
                t_cancel=t_cancel,
                err=ctx.err(),
                cause=ctxmiddleware.cause(ctx),
                child_done_first=task in done,
            )
            raise
        return PlainTextResponse("not reached")

    app = wrap([Route("/slow", slow, methods=["GET", "POST"])], probe, timeout=30)
    caplog.set_level(logging.INFO, logger="ctxmiddleware")
    method, size = {
        "get": ("GET", 0),
        "post-read-1mb": ("POST", 1024 * 1024),
        "post-unread-10kb": ("POST", 10 * 1024),
    }[mode]
    request = raw_request(method, "/slow", {"x-request-id": "gone-1"}, b"x" * size)
    with serve(app, kind) as server:
        with connection(server) as sock:
            sock.sendall(request)
            probe.wait("entered")
        t_closed = time.monotonic()
        probe.wait("cancelled")
        probe.wait("mw_done")

    assert probe["t_cancel"] - t_closed < 0.5  # about 1 ms on loopback
    assert probe["same_current"] is True
    assert probe["scope_ctx"] is probe["ctx"]
    assert type(probe["err"]) is Canceled
    assert isinstance(probe["cause"], ClientDisconnected)
    assert probe["child_done_first"] is True
    assert type(probe["child_err"]) is Canceled
    assert isinstance(probe["child_cause"], ClientDisconnected)
    assert probe["mw_exc"] is None  # a disconnect is no error for the server
    assert any(
        "499" in r.getMessage() and "gone-1" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


# -- 2. disconnect while a streaming response waits between chunks -------------


@pytest.mark.parametrize("kind", SERVERS)
def test_disconnect_mid_stream_stops_generator(kind: str) -> None:
    probe = Probe("first_sent", "stopped", "mw_done")

    async def stream(request: Request) -> Response:
        ctx = request.state.ctx

        async def chunks() -> Any:
            try:
                yield b"first\n"
                probe.set("first_sent")
                await asyncio.sleep(60)
                yield b"second\n"
            except BaseException as exc:  # GeneratorExit or CancelledError
                probe.set("stopped", exc=exc, err=ctx.err(), cause=ctxmiddleware.cause(ctx))
                raise

        return StreamingResponse(chunks(), media_type="text/plain")

    # (Written with the user test kit, ctxmiddleware.testing.)
    app = wrap([Route("/stream", stream)], probe, timeout=30)
    with serve_app(app, kind) as running:
        partial = running.request("GET", "/stream", disconnect="mid_stream")
        assert partial is not None and partial.status == 200
        assert partial.body.startswith(b"first\n")
        probe.wait("first_sent")
        probe.wait("stopped")
        probe.wait("mw_done")

    assert isinstance(probe["exc"], (GeneratorExit, asyncio.CancelledError))
    assert type(probe["err"]) is Canceled
    assert isinstance(probe["cause"], ClientDisconnected)
    assert probe["mw_exc"] is None


# -- 3. disconnect before the request body is complete --------------------------


@pytest.mark.parametrize("mode", ["body", "stream"])
@pytest.mark.parametrize("kind", SERVERS)
def test_disconnect_mid_upload(kind: str, mode: str) -> None:
    probe = Probe("entered", "got_chunk", "interrupted", "read_all", "mw_done")
    kit = KitProbe()

    async def upload(request: Request) -> Response:
        ctx = request.state.ctx
        probe.set("entered")
        try:
            if mode == "body":
                kit.started()
                await request.body()
            else:
                async for chunk in request.stream():
                    if chunk and not probe.is_set("got_chunk"):
                        probe.set("got_chunk")
                        kit.started()  # the app is mid-body: the client may leave
        except BaseException as exc:
            probe.set("interrupted", exc=exc, err=ctx.err(), cause=ctxmiddleware.cause(ctx))
            raise
        probe.set("read_all")
        return PlainTextResponse("not reached")

    # (Written with the user test kit, ctxmiddleware.testing: the handler
    # marks its context with kit.started(); the kit's client sends the head
    # and 256 KB of 1 MB, waits for that mark, and hangs up.)
    app = wrap([Route("/upload", upload, methods=["POST"])], probe, timeout=30)
    with serve_app(app, kind) as running:
        sent = running.request(
            "POST",
            "/upload",
            body=b"\0" * (1024 * 1024),
            sent_fraction=0.25,
            disconnect="before_body_end",
            probe=kit,
        )
        assert sent is None
        if mode == "stream":
            probe.wait("got_chunk")  # the app was mid-body
        probe.wait("interrupted")
        probe.wait("mw_done")
        kit.wait_cancelled(ClientDisconnected)

    assert not probe.is_set("read_all")
    # Starlette turns http.disconnect into ClientDisconnect; a cancellation is
    # fine too. Either way the context knows why.
    exc = probe["exc"]
    assert isinstance(exc, asyncio.CancelledError) or type(exc).__name__ == "ClientDisconnect"
    assert type(probe["err"]) is Canceled
    assert isinstance(probe["cause"], ClientDisconnected)
    # An error that only reports the disconnect is not passed on to the server.
    assert probe["mw_exc"] is None


@pytest.mark.parametrize("kind", SERVERS)
def test_deadline_mid_upload_does_not_hang(kind: str) -> None:
    """The client stalls mid-body: the deadline still ends the request with a 504."""
    probe = Probe("entered", "interrupted", "read_all", "mw_done")

    async def upload(request: Request) -> Response:
        ctx = request.state.ctx
        probe.set("entered")
        try:
            await request.body()
        except BaseException as exc:
            probe.set("interrupted", exc=exc, err=ctx.err())
            raise
        probe.set("read_all")
        return PlainTextResponse("not reached")

    app = wrap([Route("/upload", upload, methods=["POST"])], probe, timeout=0.3)
    size = 1024 * 1024
    request = raw_request("POST", "/upload", body=b"\0" * size)
    with serve(app, kind) as server, connection(server) as sock:
        t0 = time.monotonic()
        sock.sendall(request[: len(request) - size + 100 * 1024])
        data = recv_until(sock, b"Gateway Timeout")
        elapsed = time.monotonic() - t0
        probe.wait("mw_done")

    assert parse_head(data)[0] == 504
    assert 0.25 < elapsed < 1.0, elapsed
    assert isinstance(probe["exc"], asyncio.CancelledError)
    assert isinstance(probe["err"], DeadlineExceeded)
    assert not probe.is_set("read_all")
    assert probe["mw_exc"] is None


# -- 4. request bodies arrive intact --------------------------------------------


def _echo_routes(gate_delay: float) -> list[Route]:
    async def wait_a_little() -> None:
        # Read only after the 1 ms grace: the watcher may be running by then,
        # so the body has to come through its hand-off intact.
        if gate_delay:
            event = asyncio.Event()
            asyncio.get_running_loop().call_later(gate_delay, event.set)
            await event.wait()

    async def body(request: Request) -> Response:
        await wait_a_little()
        data = await request.body()
        return JSONResponse({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})

    async def stream(request: Request) -> Response:
        await wait_a_little()
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return JSONResponse({"sha256": digest.hexdigest(), "size": size})

    return [Route("/body", body, methods=["POST"]), Route("/stream", stream, methods=["POST"])]


@pytest.mark.parametrize("kind", SERVERS)
def test_body_integrity(kind: str) -> None:
    probe = Probe("mw_done")
    app = by_prefix(
        {
            "now": wrap([Route("/now" + r.path, r.endpoint, methods=["POST"])
                         for r in _echo_routes(0)], probe, timeout=30),
            "late": wrap([Route("/late" + r.path, r.endpoint, methods=["POST"])
                          for r in _echo_routes(0.02)], probe, timeout=30),
        }
    )
    rng = os.urandom
    payloads = {"0B": b"", "60KB": rng(60 * 1024), "5MB": rng(5 * 1024 * 1024)}

    def chunked(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 7000):
            yield data[i : i + 7000]

    with serve(app, kind) as server, httpx.Client(base_url=server.url, timeout=WAIT) as client:
        for when in ("now", "late"):
            for name, data in payloads.items():
                expected = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                for route in ("body", "stream"):
                    response = client.post(f"/{when}/{route}", content=data)
                    assert response.status_code == 200, (when, name, route)
                    assert response.json() == expected, (when, name, route)
                # Transfer-Encoding: chunked (no Content-Length).
                response = client.post(f"/{when}/stream", content=chunked(data))
                assert response.status_code == 200, (when, name, "chunked")
                assert response.json() == expected, (when, name, "chunked")


# -- 5. BackgroundTasks outlive the response -----------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_background_task_survives_client_close(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe("bg_started", "bg_interrupted", "bg_done", "mw_done")
    gate = Gate()

    async def with_background(request: Request) -> Response:
        ctx = request.state.ctx

        async def work() -> None:
            probe.set("bg_started")
            try:
                await gate.wait()
            except BaseException as exc:
                probe.set("bg_interrupted", exc=exc)
                raise
            probe.set(
                "bg_done",
                err=ctx.err(),
                same_current=ctxmiddleware.current() is ctx,
                ctx=ctx,
            )

        return PlainTextResponse("ok", background=BackgroundTask(work))

    app = wrap([Route("/bg", with_background)], probe, timeout=30)
    caplog.set_level(logging.INFO, logger="ctxmiddleware")
    with serve(app, kind) as server:
        with connection(server) as sock:
            sock.sendall(raw_request("GET", "/bg"))
            status, _, body = recv_response(sock)
            assert (status, body) == (200, b"ok")
            probe.wait("bg_started")
        # The client is gone; the task must not notice.
        time.sleep(0.1)
        assert not probe.is_set("bg_interrupted")
        assert not probe.is_set("mw_done")
        gate.set()
        probe.wait("bg_done")
        probe.wait("mw_done")

    assert not probe.is_set("bg_interrupted")
    assert probe["err"] is None
    assert probe["same_current"] is True
    assert probe["mw_exc"] is None
    # The request context still ends when the app returns, like Go's ServeHTTP.
    assert type(probe["ctx"].err()) is Canceled
    assert not any("499" in r.getMessage() for r in caplog.records)


# -- 6. the middleware's deadline ---------------------------------------------------


def _slow_route(probe: Probe, path: str = "/slow", **kwargs: Any) -> Route:
    async def slow(request: Request) -> Response:
        ctx = request.state.ctx
        probe.set("entered", remaining=ctx.remaining())
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            probe.set("cancelled", err=ctx.err(), cause=ctxmiddleware.cause(ctx))
            raise
        return PlainTextResponse("not reached")

    return Route(path, slow, **kwargs)


@pytest.mark.parametrize("kind", SERVERS)
def test_deadline_gives_504(kind: str) -> None:
    probe = Probe("entered", "cancelled", "mw_done")
    app = wrap([_slow_route(probe)], probe, timeout=0.3)
    with serve(app, kind) as server:
        response, elapsed = timed_get(server, "/slow", {"x-request-id": "slow-1"})
        probe.wait("cancelled")
        probe.wait("mw_done")

    assert response.status_code == 504
    assert response.content == b"Gateway Timeout"
    assert response.headers["x-request-id"] == "slow-1"
    assert 0.25 < elapsed < 1.0, elapsed
    assert isinstance(probe["err"], DeadlineExceeded)
    assert isinstance(probe["cause"], DeadlineExceeded)
    assert probe["mw_exc"] is None


@pytest.mark.parametrize("kind", SERVERS)
def test_deadline_status_and_body_are_configurable(kind: str) -> None:
    probe = Probe("entered", "cancelled", "mw_done")
    app = wrap(
        [_slow_route(probe)], probe, timeout=0.3, timeout_status=503, timeout_body=b"try later"
    )
    with serve(app, kind) as server:
        response, elapsed = timed_get(server, "/slow")
        probe.wait("mw_done")

    assert response.status_code == 503
    assert response.content == b"try later"
    assert response.headers["content-length"] == "9"
    assert len(response.headers["x-request-id"]) == 32
    assert 0.25 < elapsed < 1.0, elapsed
    assert isinstance(probe["err"], DeadlineExceeded)


@pytest.mark.parametrize("kind", SERVERS)
def test_deadline_after_response_started_aborts_connection(kind: str) -> None:
    probe = Probe("first_sent", "stopped", "mw_done")

    async def stream(request: Request) -> Response:
        ctx = request.state.ctx

        async def chunks() -> Any:
            try:
                yield b"first\n"
                probe.set("first_sent")
                await asyncio.sleep(60)
                yield b"second\n"
            except BaseException as exc:
                probe.set("stopped", exc=exc, err=ctx.err())
                raise

        return StreamingResponse(chunks(), media_type="text/plain")

    app = wrap([Route("/stream", stream)], probe, timeout=0.3)
    with serve(app, kind) as server, connection(server) as sock:
        t0 = time.monotonic()
        sock.sendall(raw_request("GET", "/stream"))
        data = read_response(sock, timeout=WAIT)  # until the server closes
        elapsed = time.monotonic() - t0
        probe.wait("mw_done")

    assert 0.25 < elapsed < 2.0, elapsed
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"HTTP/1.1") == 1, data  # never a second response start
    assert b"first\n" in data
    assert b"second" not in data
    assert not data.endswith(b"0\r\n\r\n"), data  # no clean end of the chunked body
    assert isinstance(probe["err"], DeadlineExceeded)
    assert probe["mw_exc"] is None


# -- 7. x-request-timeout-ms -----------------------------------------------------------


def _info_route(probe: Probe) -> Route:
    async def info(request: Request) -> Response:
        ctx = request.state.ctx
        return JSONResponse(
            {"remaining": ctx.remaining(), "deadline_is_none": ctx.deadline() is None}
        )

    return Route("/info", info)


@pytest.mark.parametrize("kind", SERVERS)
def test_timeout_header(kind: str) -> None:
    probe = Probe("entered", "cancelled", "never_entered", "mw_done")

    async def never(request: Request) -> Response:
        probe.set("never_entered")
        return PlainTextResponse("ran")

    def routes(prefix: str) -> list[Route]:
        return [
            _slow_route(probe, f"/{prefix}/slow"),
            Route(f"/{prefix}/info", _info_route(probe).endpoint),
            Route(f"/{prefix}/never", never),
        ]

    app = by_prefix(
        {
            "t5": wrap(routes("t5"), probe, timeout=5),
            "t03": wrap(routes("t03"), probe, timeout=0.3),
            "none": wrap(routes("none"), probe, timeout=None),
        }
    )
    hdr = "x-request-timeout-ms"
    with serve(app, kind) as server:
        # Shortens the middleware's timeout.
        response, elapsed = timed_get(server, "/t5/slow", {hdr: "200"})
        assert response.status_code == 504
        assert 0.15 < elapsed < 0.9, elapsed
        probe.wait("cancelled")
        assert isinstance(probe["err"], DeadlineExceeded)

        # Never extends it.
        probe.reset()
        response, elapsed = timed_get(server, "/t03/slow", {hdr: "10000"})
        assert response.status_code == 504
        assert 0.25 < elapsed < 1.0, elapsed

        # Several headers: the smallest budget wins.
        response, elapsed = timed_get(server, "/t5/slow", [(hdr, "10000"), (hdr, "200")])
        assert response.status_code == 504
        assert 0.15 < elapsed < 0.9, elapsed

        # 0: the budget is spent, the handler never runs.
        probe.reset()
        response, elapsed = timed_get(server, "/t5/never", {hdr: "0", "x-request-id": "z-0"})
        assert response.status_code == 504
        assert response.headers["x-request-id"] == "z-0"
        assert elapsed < 0.25, elapsed
        probe.wait("mw_done")
        assert not probe.is_set("never_entered")
        assert isinstance(probe["scope_ctx"].err(), DeadlineExceeded)

        # A budget shorter than the disconnect grace still cancels the handler.
        probe.reset()
        response, elapsed = timed_get(server, "/t5/slow", {hdr: "1"})
        assert response.status_code == 504
        assert elapsed < 0.25, elapsed
        probe.wait("mw_done")
        assert isinstance(probe["scope_ctx"].err(), DeadlineExceeded)

        # Garbage is ignored: the middleware's own timeout applies.
        for value in ["-5", "1.5", "10; drop", "abc", "99999999999", "", "5ms", "0x10"]:
            response, _ = timed_get(server, "/t5/info", {hdr: value})
            assert response.status_code == 200, value
            remaining = response.json()["remaining"]
            assert 4.0 < remaining <= 5.0, (value, remaining)

        # Without a middleware timeout the header alone sets the deadline...
        response, _ = timed_get(server, "/none/info", {hdr: "2000"})
        info = response.json()
        assert not info["deadline_is_none"]
        assert 1.0 < info["remaining"] <= 2.0, info
        response, elapsed = timed_get(server, "/none/slow", {hdr: "200"})
        assert response.status_code == 504
        assert 0.15 < elapsed < 0.9, elapsed

        # ... and without either there is none.
        response, _ = timed_get(server, "/none/info")
        assert response.json() == {"remaining": None, "deadline_is_none": True}


def test_timeout_header_raw_values_in_process() -> None:
    """Values a real server would normalise away (surrounding blanks) are garbage too."""

    async def main() -> None:
        seen: list[float | None] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(ctxmiddleware.current().remaining())
            await _respond(send, 200, b"ok")

        mw = ContextMiddleware(app, timeout=5)
        raw_values = [b" 5", b"5 ", b"+5", b"\t5", b"\xd9\xa5", b"1_0", b"\xef\xbc\x95"]
        for raw in raw_values:
            server = FakeServer()
            await mw(http_scope(headers=[(b"x-request-timeout-ms", raw)]), server.receive,
                     server.send)
            assert server.status == 200, raw
        assert len(seen) == len(raw_values)
        for raw, remaining in zip(raw_values, seen, strict=True):
            assert remaining is not None and 4.0 < remaining <= 5.0, (raw, remaining)
        # 10 digits is still a budget.
        server = FakeServer()
        await mw(http_scope(headers=[(b"x-request-timeout-ms", b"0000000200")]),
                 server.receive, server.send)
        assert seen[-1] is not None and 0.1 < seen[-1] <= 0.2

    asyncio.run(main())


# -- 8. per-route timeouts ----------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_route_timeout(kind: str) -> None:
    probe = Probe("entered", "cancelled", "mw_done")

    @route_timeout(0.2)
    async def short(request: Request) -> Response:
        ctx = request.state.ctx
        probe.set("entered", remaining=ctx.remaining())
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            probe.set("cancelled", err=ctx.err())
            raise
        return PlainTextResponse("not reached")

    @route_timeout(2)
    async def long(request: Request) -> Response:
        await asyncio.sleep(0.5)
        return PlainTextResponse("done", headers={"x-err": repr(request.state.ctx.err())})

    @route_timeout(2)
    def long_sync(request: Request) -> Response:
        time.sleep(0.5)  # in Starlette's threadpool
        return PlainTextResponse("done")

    app = by_prefix(
        {
            "t5": wrap([Route("/t5/short", short)], probe, timeout=5),
            "t03": wrap(
                [Route("/t03/long", long), Route("/t03/long_sync", long_sync)],
                probe,
                timeout=0.3,
            ),
        }
    )
    with serve(app, kind) as server:
        # Shorter than the middleware's.
        response, elapsed = timed_get(server, "/t5/short")
        assert response.status_code == 504
        assert 0.15 < elapsed < 0.9, elapsed
        probe.wait("cancelled")
        assert isinstance(probe["err"], DeadlineExceeded)
        assert 0.1 < probe["remaining"] <= 0.2

        # Longer than the middleware's, async and sync endpoints alike.
        for path in ("/t03/long", "/t03/long_sync"):
            response, elapsed = timed_get(server, path)
            assert response.status_code == 200, (path, response.text)
            assert response.text == "done"
            assert 0.45 < elapsed < 1.5, elapsed
        assert response.headers.get("x-err", "None") == "None"

        # The caller's budget still caps it: 504 at 0.4 s, after the
        # middleware's 0.3 s but before the handler's 0.5 s.
        response, elapsed = timed_get(server, "/t03/long", {"x-request-timeout-ms": "400"})
        assert response.status_code == 504
        assert 0.35 < elapsed < 1.0, elapsed


# -- 9. a cancellation from elsewhere is not ours -------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_foreign_cancellation_propagates_over_server(kind: str) -> None:
    probe = Probe("cancelled", "mw_done")

    async def self_cancel(request: Request) -> Response:
        ctx = request.state.ctx
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            probe.set("cancelled", err=ctx.err())
            raise
        return PlainTextResponse("not reached")

    app = wrap([Route("/self", self_cancel)], probe, timeout=30)
    with serve(app, kind) as server, connection(server) as sock:
        sock.sendall(raw_request("GET", "/self"))
        probe.wait("cancelled")
        probe.wait("mw_done")
        data = read_response(sock, timeout=WAIT)

    assert probe["err"] is None  # the handler's context was not what cancelled it
    assert isinstance(probe["mw_exc"], asyncio.CancelledError)
    assert type(probe["scope_ctx"].err()) is Canceled
    assert not isinstance(ctxmiddleware.cause(probe["scope_ctx"]), ClientDisconnected)
    # Whatever the server makes of it, it is not the middleware's 504.
    assert b" 504" not in data.split(b"\r\n", 1)[0]


# -- in-process: the middleware on a test loop with a fake server -------------------------


def http_scope(
    method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, spec: str = "2.3"
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": list(headers or []),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class FakeServer:
    """One request's receive/send, hypercorn-style: a queue, one disconnect at the end."""

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        chunks = chunks if chunks is not None else [b""]
        for i, chunk in enumerate(chunks):
            self.queue.put_nowait(
                {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            )
        self.sent: list[dict[str, Any]] = []
        self.send_error: OSError | None = None
        self.closed = False

    async def receive(self) -> dict[str, Any]:
        return await self.queue.get()

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise OSError("connection closed")
        if self.send_error is not None and message["type"] == "http.response.body":
            self.closed = True
            raise self.send_error
        self.sent.append(message)
        await asyncio.sleep(0)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.queue.put_nowait({"type": "http.disconnect"})

    def disconnect(self) -> None:
        self.closed = True
        self.queue.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None


async def _respond(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def settle() -> None:
    """A few loop iterations: cancelled tasks get to run their cancellation."""
    for _ in range(5):
        await asyncio.sleep(0)


def assert_no_leftovers(mw: ContextMiddleware) -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert not others, others
    watchdog = mw.watchdog
    assert watchdog is None or not watchdog.pending


def test_outside_cancellation_propagates_in_process() -> None:
    async def main() -> None:
        entered = asyncio.Event()
        seen: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen["ctx"] = ctxmiddleware.current()
            await receive()
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen["handler_cancelled"] = True
                raise

        mw = ContextMiddleware(app, timeout=5)
        server = FakeServer()
        task = asyncio.create_task(mw(http_scope(), server.receive, server.send))
        await asyncio.wait_for(entered.wait(), WAIT)
        await asyncio.sleep(0.01)  # past the grace: the watcher runs too
        assert mw.watchdog is not None and not mw.watchdog.pending
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ctx = seen["ctx"]
        assert seen["handler_cancelled"]
        assert type(ctx.err()) is Canceled
        assert type(ctxmiddleware.cause(ctx)) is Canceled  # not a disconnect, not a deadline
        assert server.sent == []  # no 504, no 500
        await settle()
        assert_no_leftovers(mw)

    asyncio.run(main())


def test_outside_cancellation_after_deadline_passed_still_propagates() -> None:
    """Our deadline fired, but the task was also cancelled from outside: not ours alone."""

    async def main() -> None:
        seen: dict[str, Any] = {}
        outer: asyncio.Task[None] | None = None

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ctxmiddleware.current()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen["err"] = ctx.err()
                assert outer is not None
                outer.cancel()  # e.g. the server shutting down at the same moment
                raise

        mw = ContextMiddleware(app, timeout=0.05)
        server = FakeServer()
        outer = asyncio.create_task(mw(http_scope(), server.receive, server.send))
        await asyncio.wait({outer}, timeout=WAIT)
        assert outer.cancelled()
        assert isinstance(seen["err"], DeadlineExceeded)
        assert server.status is None  # no 504 for a task being torn down
        await settle()
        assert_no_leftovers(mw)

    asyncio.run(main())


def test_no_leftover_tasks_or_threads_in_process() -> None:
    """After every kind of ending: no watcher task, no pending grace entry, no threads."""

    async def main() -> None:
        threads = set(threading.enumerate())
        refs: list[weakref.ref[Any]] = []

        def remember() -> None:
            request = request_layer.request_of(ctxmiddleware.current())
            assert request is not None
            refs.append(weakref.ref(request))

        async def quick(scope: Any, receive: Any, send: Any) -> None:
            remember()
            await receive()
            await _respond(send, 200, b"ok")

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            remember()
            body = b""
            while True:
                message = await receive()
                body += message["body"]
                if not message.get("more_body"):
                    break
                await asyncio.sleep(0.003)  # the grace ends mid-body
            assert body == b"a" * 100 + b"b" * 100
            await asyncio.sleep(0.02)  # past the grace: the watcher runs
            await _respond(send, 200, b"ok")

        async def hang(scope: Any, receive: Any, send: Any) -> None:
            remember()
            await receive()
            await asyncio.sleep(60)

        async def fails(scope: Any, receive: Any, send: Any) -> None:
            remember()
            await asyncio.sleep(0.01)
            raise RuntimeError("boom")


        scenarios = [
            ("quick", quick, {}, None),
            ("slow", slow, {}, None),
            ("deadline", hang, {"timeout": 0.05}, None),
            ("disconnect", hang, {}, "disconnect"),
            ("fails", fails, {}, RuntimeError),
        ]
        for name, app, options, how in scenarios:
            server = FakeServer([b"a" * 100, b"b" * 100, b""])
            mw = ContextMiddleware(app, **options)
            call = mw(http_scope("POST"), server.receive, server.send)
            if how == "disconnect":
                asyncio.get_running_loop().call_later(0.02, server.disconnect)
            if how is RuntimeError:
                with pytest.raises(RuntimeError):
                    await call
                assert server.status == 500, name
            else:
                await call
            await settle()
            assert_no_leftovers(mw)
            assert set(threading.enumerate()) <= threads, name
        gc.collect()
        assert [ref() for ref in refs] == [None] * len(scenarios)

    asyncio.run(main())


@pytest.mark.parametrize("kind", SERVERS)
def test_threads_back_to_baseline(kind: str) -> None:
    probe = Probe("entered", "cancelled", "mw_done")

    async def ok(request: Request) -> Response:
        await request.body()
        return PlainTextResponse("ok")

    app = wrap([Route("/ok", ok, methods=["GET", "POST"]), _slow_route(probe)], probe,
               timeout=0.3)
    with serve(app, kind) as server:
        with httpx.Client(base_url=server.url, timeout=WAIT) as client:
            assert client.get("/ok").status_code == 200  # warm-up
            baseline = set(threading.enumerate())

            def no_new_threads() -> None:
                assert set(threading.enumerate()) <= baseline

            for _ in range(3):
                probe.reset()
                assert client.post("/ok", content=b"x" * 100_000).status_code == 200
                probe.wait("mw_done")
                no_new_threads()
                probe.reset()
                assert client.get("/slow").status_code == 504
                probe.wait("mw_done")
                no_new_threads()
        probe.reset()
        with connection(server) as sock:
            sock.sendall(raw_request("GET", "/slow"))
            probe.wait("entered")
        probe.wait("mw_done")
        no_new_threads()


# -- 11. send() raising OSError (ASGI 2.4) --------------------------------------------------


def test_send_oserror_is_a_disconnect_app_carries_on() -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ctxmiddleware.current()
            seen["ctx"] = ctx
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            try:
                await send({"type": "http.response.body", "body": b"a", "more_body": True})
            except OSError as exc:
                seen["send_exc"] = exc
                seen["err"] = ctx.err()
            try:
                await asyncio.sleep(60)  # the app does not look: it is cancelled anyway
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise

        mw = ContextMiddleware(app, timeout=5)
        server = FakeServer()
        server.send_error = ConnectionResetError("peer gone")
        await asyncio.wait_for(mw(http_scope(spec="2.4"), server.receive, server.send), WAIT)
        ctx = seen["ctx"]
        assert isinstance(seen["send_exc"], ConnectionResetError)
        assert type(seen["err"]) is Canceled
        assert seen["cancelled"]
        assert isinstance(ctxmiddleware.cause(ctx), ClientDisconnected)
        assert [m["type"] for m in server.sent] == ["http.response.start"]  # no 500, no 504
        await settle()
        assert_no_leftovers(mw)

    asyncio.run(main())


@pytest.mark.parametrize("raised", ["oserror", "starlette"])
def test_send_oserror_raised_through_is_not_an_app_error(raised: str) -> None:
    """An app that lets the send error out (as Starlette does) ends like a disconnect."""

    async def main() -> None:
        seen: dict[str, Any] = {}

        async def raw_app(scope: Any, receive: Any, send: Any) -> None:
            seen["ctx"] = ctxmiddleware.current()
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"a", "more_body": True})

        async def stream(request: Request) -> Response:
            seen["ctx"] = request.state.ctx

            async def chunks() -> Any:
                yield b"a"
                yield b"b"

            return StreamingResponse(chunks())

        app = raw_app if raised == "oserror" else Starlette(routes=[Route("/", stream)])
        mw = ContextMiddleware(app, timeout=5)
        server = FakeServer()
        server.send_error = BrokenPipeError("peer gone")
        await asyncio.wait_for(mw(http_scope(spec="2.4"), server.receive, server.send), WAIT)
        ctx = seen["ctx"]
        assert type(ctx.err()) is Canceled
        assert isinstance(ctxmiddleware.cause(ctx), ClientDisconnected)
        assert [m["type"] for m in server.sent] == ["http.response.start"]
        await settle()
        assert_no_leftovers(mw)

    asyncio.run(main())


# -- receive() after the disconnect, and a swallowed cancellation --------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_receive_after_disconnect_answers_from_state(kind: str) -> None:
    """hypercorn delivers http.disconnect once; the middleware must repeat it, not hang.

    The app answers without reading its (large) body, so no watcher runs and the
    app reads the server directly; the client goes away mid-body, and the app
    reads on past the disconnect.
    """
    probe = Probe("read", "mw_done")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _respond(send, 200, b"ok")
        kinds = []
        while not kinds or kinds[-1] != "http.disconnect":
            kinds.append((await asyncio.wait_for(receive(), WAIT))["type"])
        try:
            again = [(await asyncio.wait_for(receive(), 1.0))["type"] for _ in range(2)]
        except TimeoutError:
            again = ["hang"]
        probe.set("read", kinds=kinds, again=again)

    size = 200 * 1024
    with serve(Outer(ContextMiddleware(app), probe), kind) as server, connection(server) as sock:
        request = raw_request("POST", "/", body=b"x" * size)
        sock.sendall(request[: len(request) - size // 2])
        assert recv_response(sock)[0] == 200
        sock.close()
        probe.wait("read")
        probe.wait("mw_done")

    assert probe["again"] == ["http.disconnect", "http.disconnect"]
    assert probe["mw_exc"] is None


def test_app_swallowing_deadline_without_response_gets_504() -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ctxmiddleware.current()
            await receive()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen["err"] = ctx.err()
            # returns without a response

        mw = ContextMiddleware(app, timeout=0.05)
        server = FakeServer()
        await asyncio.wait_for(
            mw(http_scope(headers=[(b"x-request-id", b"r-1")]), server.receive, server.send),
            WAIT,
        )
        assert isinstance(seen["err"], DeadlineExceeded)
        assert server.status == 504
        start = server.sent[0]
        assert (b"x-request-id", b"r-1") in start["headers"]
        assert server.sent[1]["body"] == b"Gateway Timeout"
        await settle()
        assert_no_leftovers(mw)

    asyncio.run(main())


# -- ctx.err() escaping the handler through Starlette's error middleware ------


def _inner_scope_app(wrapped: bool) -> Any:
    async def deadline(request: Request) -> Response:
        # An inner scope on the request context claims the cancellation and
        # raises DeadlineExceeded, an Exception Starlette would make a 500.
        async with request.state.ctx.scope():
            await asyncio.sleep(5)
        return PlainTextResponse("unreachable")

    async def fallback(request: Request) -> Response:
        try:
            async with request.state.ctx.scope():
                await asyncio.sleep(5)
        except ctxmiddleware.DeadlineExceeded:
            return PlainTextResponse("fallback")
        return PlainTextResponse("unreachable")

    routes = [Route("/deadline", deadline), Route("/fallback", fallback)]
    if wrapped:
        return ctxmiddleware.ContextMiddleware(Starlette(routes=routes), timeout=0.2)
    app = Starlette(routes=routes)
    app.add_middleware(ctxmiddleware.ContextMiddleware, timeout=0.2)
    return app


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "add_middleware"])
def test_uncaught_ctx_error_from_an_inner_scope_is_a_504_not_a_500(wrapped: bool) -> None:
    with serve(_inner_scope_app(wrapped), "uvicorn-h11") as srv:
        started = time.monotonic()
        r = httpx.get(f"{srv.url}/deadline", headers={"x-request-id": "inner-1"}, timeout=5)
        elapsed = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.headers.get_list("x-request-id") == ["inner-1"]
        assert 0.15 < elapsed < 1.5
        # A handler may also catch it and answer itself.
        r = httpx.get(f"{srv.url}/fallback", timeout=5)
        assert (r.status_code, r.text) == (200, "fallback")


# -- garbage: a request must not leave work for the cyclic GC -----------------


def test_quick_requests_leave_no_cyclic_garbage() -> None:
    """Reference cycles per request (scope -> state -> ctx -> ... -> scope) make
    every request wait for the cyclic GC: full collections under load showed as
    20-30 ms p99 stalls."""
    import gc

    async def hello(request: Request) -> Response:
        ctx = request.state.ctx
        assert ctx.value(ctxmiddleware.REQUEST_ID) and ctx.value(ctxmiddleware.CLIENT_IP)
        return PlainTextResponse("ok")

    app = ContextMiddleware(Starlette(routes=[Route("/", hello)]), timeout=5)

    async def main() -> int:
        async def run_one() -> None:
            server = FakeServer()
            headers = [(b"authorization", b"Bearer t0ken"), (b"x-request-id", b"abc")]
            await app(http_scope(headers=headers), server.receive, server.send)
            assert server.sent[0]["status"] == 200

        for _ in range(20):
            await run_one()
        gc.collect()
        gc.disable()
        try:
            for _ in range(200):
                await run_one()
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(main()) == 0


# -- after the request: what the root context and its channels still do ---------


def test_after_the_request_the_context_is_cancelled_and_the_channels_are_closed() -> None:
    """Work that outlives the request (a task it spawned) sees a cancelled context
    with its values, a receive() that reports the disconnect, a send() that fails,
    and set_request_timeout() refusing; children derived from the root were linked
    to it as to any cancellable context (no Done created for them)."""

    async def main() -> None:
        seen: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ctxmiddleware.current()
            child, _ = ctxmiddleware.with_timeout(ctx, 5)
            seen.update(ctx=ctx, child=child, receive=receive, send=send)
            await receive()
            await _respond(send, 200, b"ok")

        mw = ContextMiddleware(app, timeout=5)
        server = FakeServer()
        await mw(http_scope(headers=[(b"x-request-id", b"after-1")]), server.receive, server.send)
        ctx, child = seen["ctx"], seen["child"]
        assert type(ctx.err()) is Canceled and type(child.err()) is Canceled
        assert ctx.done().is_set() and child.done().is_set()
        assert ctx.value(ctxmiddleware.REQUEST_ID) == "after-1"
        assert await seen["receive"]() == {"type": "http.disconnect"}
        with pytest.raises(RuntimeError, match="after the request ended"):
            await seen["send"]({"type": "http.response.body", "body": b"late"})
        with ctxmiddleware.bind(ctx), pytest.raises(RuntimeError):
            ctxmiddleware.set_request_timeout(10)
        assert server.sent[0]["status"] == 200 and len(server.sent) == 2
        assert_no_leftovers(mw)

    asyncio.run(main())


def test_request_root_is_linked_like_a_core_context() -> None:
    """The request's root is a subclass of the core's timer context: deriving from
    it registers the child directly (no Done, no listener), and cancelling it
    reaches the child at once."""

    async def main() -> None:
        seen: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ctxmiddleware.current()
            child, _ = ctxmiddleware.with_cancel(ctx)
            seen["done_before"] = ctx._done  # None: nothing asked for the root's Done
            seen["children"] = len(ctx._children or {})
            seen["child"] = child
            await _respond(send, 200, b"ok")

        mw = ContextMiddleware(app, timeout=5)
        server = FakeServer()
        await mw(http_scope(), server.receive, server.send)
        assert seen["done_before"] is None
        assert seen["children"] == 1
        assert type(seen["child"].err()) is Canceled

    asyncio.run(main())


def test_slow_timed_out_and_abandoned_requests_leave_no_cyclic_garbage() -> None:
    """Past the grace period (cancel scope, watcher task, armed timer), at the
    deadline (504) and on a disconnect: nothing is left for the cyclic GC."""
    import gc

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(0.004 if scope["path"] == "/slow" else 60)
        await _respond(send, 200, b"ok")

    mw = ContextMiddleware(app, timeout=0.02)

    async def main() -> dict[str, int]:
        async def slow() -> None:
            server = FakeServer()
            await mw(dict(http_scope(), path="/slow"), server.receive, server.send)
            assert server.sent[0]["status"] == 200

        async def deadline() -> None:
            server = FakeServer()
            await mw(http_scope(), server.receive, server.send)
            assert server.sent[0]["status"] == 504

        async def disconnect() -> None:
            server = FakeServer()
            task = asyncio.create_task(mw(http_scope(), server.receive, server.send))
            await asyncio.sleep(0.005)
            server.disconnect()
            await asyncio.wait_for(task, WAIT)
            assert server.sent == []

        found = {}
        for kind in (slow, deadline, disconnect):
            await kind()
            await settle()
            gc.collect()
            gc.disable()
            try:
                for _ in range(10):
                    await kind()
                await settle()
                found[kind.__name__] = gc.collect()
            finally:
                gc.enable()
        return found

    assert asyncio.run(main()) == {"slow": 0, "deadline": 0, "disconnect": 0}
