"""ctxmiddleware.testing, the kit users test their apps with: every phase, on every server.

Each test serves a small Starlette app under ContextMiddleware with
``serve_app`` and checks what the kit reports against what really happened
(the handler's own view, recorded with threading events).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import Canceled, ClientDisconnected, ContextMiddleware, DeadlineExceeded
from ctxmiddleware.testing import (
    PHASES,
    SERVERS,
    Probe,
    RunningApp,
    http_request,
    read_response,
    serve_app,
    wait_query_gone,
    wait_query_running,
)

pytestmark = pytest.mark.timeout(60)

DSN = os.environ.get("CTXMIDDLEWARE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def make_app(probe: Probe, done: threading.Event | None = None) -> Any:
    async def slow(request: Request) -> Response:
        probe.started()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if done is not None:
                done.set()
            raise
        return PlainTextResponse("late")

    async def upload(request: Request) -> Response:
        probe.started()
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return PlainTextResponse(str(size))

    async def stream(request: Request) -> Response:
        probe.started()

        async def chunks() -> Any:
            yield b"first\n"
            await asyncio.sleep(30)
            yield b"never\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def quick(request: Request) -> Response:
        probe.started(seen=ctxmiddleware.current().value(ctxmiddleware.REQUEST_ID))
        return PlainTextResponse("ok")

    def sync_quick(request: Request) -> Response:
        probe.started()
        return PlainTextResponse("sync ok")

    app = Starlette(
        routes=[
            Route("/slow", slow, methods=["GET", "POST"]),
            Route("/upload", upload, methods=["POST"]),
            Route("/stream", stream),
            Route("/quick", quick),
            Route("/sync", sync_quick),
        ]
    )
    app.add_middleware(ContextMiddleware, timeout=30)
    return app


@pytest.mark.parametrize("server", SERVERS)
def test_every_phase_on_every_server(server: str) -> None:
    probe = Probe()
    cancelled = threading.Event()
    with serve_app(make_app(probe, cancelled), server) as running:
        assert running.request("GET", "/slow", probe=probe, disconnect="mid_handler") is None
        probe.wait_cancelled(ClientDisconnected)
        assert cancelled.wait(5)  # the handler itself was interrupted

        body = b"x" * (1024 * 1024)
        assert running.request("POST", "/upload", body=body, disconnect="before_body_end") is None
        probe.wait_cancelled(ClientDisconnected)

        partial = running.request("GET", "/stream", disconnect="mid_stream")
        assert partial is not None and partial.status == 200
        assert partial.body.startswith(b"first") and not partial.complete
        probe.wait_cancelled(ClientDisconnected)

        whole = running.request("GET", "/quick", disconnect="after_response")
        assert whole is not None
        assert (whole.status, whole.body, whole.complete) == (200, b"ok", True)
        assert probe.wait_cancelled(Canceled).__class__ is Canceled  # ended normally

        upload = running.request("POST", "/upload", body=body)
        assert upload is not None and upload.body == str(len(body)).encode()
    assert [m.done for m in probe.marks] == [True] * 5


@pytest.mark.parametrize("server", SERVERS)
def test_budget_header_gives_504_and_deadline_cause(server: str) -> None:
    probe = Probe()
    with serve_app(make_app(probe), server) as running:
        response = running.request("GET", "/slow", budget_ms=50, request_id="budget-1")
        assert response is not None and response.status == 504
        assert response.header("x-request-id") == "budget-1"
        cause = probe.wait_cancelled(DeadlineExceeded, request_id="budget-1")
        assert isinstance(cause, DeadlineExceeded)

        spent = running.request("GET", "/slow", budget_ms=0)
        assert spent is not None and spent.status == 504
        assert len(probe.marks) == 1  # a spent budget never runs the handler


def test_marks_are_found_by_request_id_and_carry_data() -> None:
    probe = Probe()
    with serve_app(make_app(probe)) as running:
        for rid in ("a-1", "b-2"):
            response = running.request("GET", "/quick", request_id=rid)
            assert response is not None and response.header("x-request-id") == rid
        assert probe.wait_started(request_id="b-2").data == {"seen": "b-2"}
        assert probe.wait_started().request_id == "a-1"  # in order, once each
        assert probe.wait_started().request_id == "b-2"
        # A sync endpoint (worker thread) marks the same way.
        assert running.request("GET", "/sync", disconnect="after_response") is not None
        assert probe.wait_started().request_id is not None


def test_wait_cancelled_reports_the_wrong_cause_and_a_live_context() -> None:
    probe = Probe()
    with serve_app(make_app(probe)) as running:
        running.request("GET", "/quick")
        with pytest.raises(AssertionError, match="ended normally"):
            probe.wait_cancelled(ClientDisconnected)
        probe.wait_started()
        with pytest.raises(AssertionError, match=r"did not call probe\.started"):
            probe.wait_started(timeout=0.05)
        with running.connect() as sock:
            sock.sendall(http_request("GET", "/slow"))
            mark = probe.wait_started()
            with pytest.raises(AssertionError, match="still live"):
                mark.wait_done(timeout=0.05)
        mark.wait_cancelled(ClientDisconnected)


def test_bad_arguments_are_refused_at_the_call() -> None:
    running = RunningApp("uvicorn-h11", "127.0.0.1", 9)
    with pytest.raises(ValueError, match="one of"):
        running.request(disconnect="mid-handler")
    with pytest.raises(ValueError, match="probe"):
        running.request(disconnect="mid_handler")
    with pytest.raises(ValueError, match="body"):
        running.request("POST", disconnect="before_body_end")
    with pytest.raises(ValueError, match="sent_fraction"):
        running.request("POST", body=b"x", disconnect="before_body_end", sent_fraction=1)
    with pytest.raises(ValueError, match="server"), serve_app(object(), "gunicorn"):
        pass
    assert set(PHASES) == {"before_body_end", "mid_handler", "mid_stream", "after_response"}


def test_read_response_framings() -> None:
    def parse(raw: bytes, **kw: Any) -> Any:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
            return read_response(b, 2, **kw)

    r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabcEXTRA")
    assert (r.status, r.body, r.complete, r.header("x-a")) == (200, b"abc", True, "1, 2")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    r = parse(chunked + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert (r.body, r.complete) == (b"abcde", True)
    r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5\r\nde")
    assert (r.body, r.complete) == (b"abcde", False)  # cut off mid-chunk
    r = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close")
    assert (r.body, r.complete) == (b"until the close", True)
    r = parse(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (r.status, r.body) == (204, b"")
    r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst", first_chunk=True)
    assert (r.body, r.complete) == (b"first", False)
    assert http_request("POST", "/p", [("a", "b")], b"xy") == (
        b"POST /p HTTP/1.1\r\nHost: test\r\na: b\r\nContent-Length: 2\r\n\r\nxy"
    )


# -- the pytest plugin: fixtures from the pytest11 entry point ----------------------


def test_fixtures_from_the_plugin(ctx_serve: Any, ctx_probe: Probe) -> None:
    running = ctx_serve(make_app(ctx_probe), "uvicorn-httptools")
    running.request("GET", "/slow", probe=ctx_probe, disconnect="mid_handler", reset=True)
    ctx_probe.wait_cancelled(ClientDisconnected)


# -- the DB query is gone ------------------------------------------------------------


def _postgres_or_skip() -> None:
    psycopg = pytest.importorskip("psycopg")
    pytest.importorskip("asyncpg")
    try:
        psycopg.connect(DSN, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL not reachable at {DSN}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {DSN}: {exc}")


@pytest.mark.parametrize("server", ["uvicorn-h11", "hypercorn"])
def test_wait_query_gone_after_a_disconnect(server: str) -> None:
    _postgres_or_skip()
    import asyncpg

    probe = Probe()
    marker = f"kit_probe_{os.getpid()}_{server.replace('-', '_')}"

    async def report(request: Request) -> Response:
        probe.started()
        conn = await asyncpg.connect(DSN)
        try:
            async with ctxmiddleware.asyncpg_transaction(conn) as tx:
                await tx.execute(f"SELECT pg_sleep(30) AS {marker}")
        finally:
            await conn.close()
        return PlainTextResponse("late")

    app = ContextMiddleware(Starlette(routes=[Route("/report", report)]), timeout=30)
    with serve_app(app, server) as running:
        with running.connect() as sock:
            sock.sendall(http_request("GET", "/report"))
            wait_query_running(DSN, marker)
        probe.wait_cancelled(ClientDisconnected)
        assert wait_query_gone(DSN, marker, timeout=5) < 5
    # A query that is not there is gone at once; one that stays is reported.
    assert wait_query_gone(DSN, marker + "_never") < 1
    with pytest.raises(AssertionError, match="no backend ran"):
        wait_query_running(DSN, marker + "_never", timeout=0.05)
