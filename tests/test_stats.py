"""ctxmiddleware.stats(): outcomes counted right on real servers (issue 11, part 1).

Each outcome is produced for real: a client that hangs up, a deadline, an
error, uvicorn's and hypercorn's shutdown cancelling a request, gunicorn's
ASGI worker cancelling an app that outlived its disconnect grace period; and
the per-driver downstream cancel counters (SQLite interrupt, httpx).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import raw_request, read_response, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import ContextMiddleware, current
from ctxmiddleware._request import _request as request_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_stats() -> Iterator[None]:
    ctxmiddleware.disable_stats()
    ctxmiddleware.enable_stats()
    yield
    ctxmiddleware.disable_stats()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def make_app(entered: threading.Event | None = None, timeout: float = 5.0) -> Any:
    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"item {request.path_params['id']}")

    async def slow(request: Request) -> PlainTextResponse:
        if entered is not None:
            entered.set()
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    app = Starlette(routes=[
        Route("/items/{id}", item),
        Route("/slow", slow),
        Route("/boom", boom),
    ])
    app.add_middleware(ContextMiddleware, timeout=timeout)
    return app


def get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, timeout=10, **kw)


def test_off_by_default_and_off_costs_nothing() -> None:
    ctxmiddleware.disable_stats()
    assert request_module.recorder is None
    snap = ctxmiddleware.stats()
    assert snap.enabled is False and snap.in_flight == 0
    assert set(snap.outcomes) == {
        "completed", "client_disconnected", "deadline", "server_shutdown", "error"
    }
    with serve(make_app()) as server:
        assert get(server.url + "/items/1").status_code == 200
    assert ctxmiddleware.stats().outcomes["completed"] == 0


def test_completed_error_deadline_counted_per_route_template() -> None:
    rec = ctxmiddleware._request.active_recorder()
    assert rec is not None
    rec.set_detail()  # (latencies are recorded for the live page)
    with serve(make_app(timeout=0.3)) as server:
        for i in range(3):
            assert get(f"{server.url}/items/{i}").status_code == 200
        assert get(server.url + "/nope").status_code == 404
        assert get(server.url + "/boom").status_code == 500
        assert get(server.url + "/slow").status_code == 504
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(raw_request("BREW", "/items/9"))
            read_response(sock, timeout=2)
    snap = ctxmiddleware.stats()
    assert snap.routes[("completed", "GET", "/items/{id}")] == 3
    # Unmatched paths never become labels of their own (bounded cardinality).
    assert snap.routes[("completed", "GET", "unmatched")] == 1
    assert snap.routes[("error", "GET", "/boom")] == 1
    assert snap.routes[("deadline", "GET", "/slow")] == 1
    assert ("completed", "OTHER", "/items/{id}") in snap.routes
    assert not any(r.startswith("/items/0") for _, _, r in snap.routes)
    assert snap.outcomes["deadline"] == 1 and snap.outcomes["error"] == 1
    # The deadline is a cancellation with nothing left of the budget.
    assert snap.work_stopped.counts[0] == 1 and snap.work_stopped.sum == 0.0
    assert snap.in_flight == 0
    assert sum(snap.latency["completed"]) == snap.outcomes["completed"]
    data = json.loads(json.dumps(snap.as_dict()))
    assert data["outcomes"]["deadline"] == 1


def test_client_disconnect_in_flight_and_work_stopped() -> None:
    entered = threading.Event()
    detail = ctxmiddleware._request.active_recorder()
    assert detail is not None
    detail.set_detail()  # (the last finished requests are kept for the live page)
    with serve(make_app(entered, timeout=20.0)) as server:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(raw_request("GET", "/slow"))
        assert entered.wait(5)
        snap = ctxmiddleware.stats()
        assert snap.in_flight == 1
        rec = ctxmiddleware._request.active_recorder()
        assert rec is not None
        [(_, row)] = rec.in_flight()
        assert row.route == "/slow" and row.method == "GET"
        assert row.remaining is not None and 19 < row.remaining <= 20
        time.sleep(0.2)
        sock.close()
        wait_for(lambda: ctxmiddleware.stats().outcomes["client_disconnected"] == 1)
    snap = ctxmiddleware.stats()
    assert snap.in_flight == 0
    assert snap.routes[("client_disconnected", "GET", "/slow")] == 1
    hist = snap.work_stopped
    assert hist.count == 1 and hist.no_deadline == 0
    # About 19.7 s of the 20 s budget were spared: the (10, 30] bucket.
    assert hist.counts[hist.bounds.index(30.0)] == 1
    assert 19 < hist.sum < 20
    [finished] = rec.recent()[ctxmiddleware._request.Outcome.CLIENT_DISCONNECTED]
    assert finished.route == "/slow" and finished.remaining is not None


def test_disconnect_without_deadline_counted_apart() -> None:
    entered = threading.Event()
    app = make_app(entered)
    app.user_middleware.clear()
    app.add_middleware(ContextMiddleware, timeout=None)
    with serve(app) as server:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(raw_request("GET", "/slow"))
        assert entered.wait(5)
        sock.close()
        wait_for(lambda: ctxmiddleware.stats().outcomes["client_disconnected"] == 1)
    hist = ctxmiddleware.stats().work_stopped
    assert hist.no_deadline == 1 and hist.count == 0 and not math.isinf(hist.sum)


@pytest.mark.parametrize(
    "kind",
    [
        "uvicorn-h11",
        pytest.param(
            "hypercorn",
            marks=pytest.mark.skipif(
                sys.version_info >= (3, 12),
                reason="hypercorn on Python 3.12+ does not cancel an in-flight request at "
                "shutdown: it waits for the client to leave (then: client_disconnected)",
            ),
        ),
    ],
)
def test_server_shutdown_outcome(kind: str) -> None:
    entered = threading.Event()
    options: dict[str, Any] = (
        {"timeout_graceful_shutdown": 0.3} if kind.startswith("uvicorn")
        else {"graceful_timeout": 0.3}
    )
    with serve(make_app(entered, timeout=20.0), kind, **options) as server:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(raw_request("GET", "/slow"))
        assert entered.wait(5)
    # (Leaving the block shut the server down, the request still in flight.)
    try:
        snap = ctxmiddleware.stats()
        assert snap.outcomes["server_shutdown"] == 1, snap.outcomes
        assert snap.outcomes["client_disconnected"] == 0
        assert snap.routes[("server_shutdown", "GET", "/slow")] == 1
        assert snap.work_stopped.count == 1 and snap.work_stopped.sum > 15
    finally:
        sock.close()


GUNICORN_APP = textwrap.dedent('''
    import asyncio, json
    import ctxmiddleware
    from ctxmiddleware import ContextMiddleware

    ctxmiddleware.enable_stats()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/stats":
            body = json.dumps(ctxmiddleware.stats().as_dict()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        ctxmiddleware.set_route("/stubborn")
        # Swallows the middleware's cancellation (a shielded cleanup, say):
        # only gunicorn's cancel, after its disconnect grace period, ends it.
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(30)

    application = ContextMiddleware(app, timeout=20)
''')


def test_gunicorn_asgi_worker_cancel_after_grace_is_client_disconnected(tmp_path: Path) -> None:
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "asgi", "-w", "1", "-b", f"127.0.0.1:{port}",
         "--asgi-disconnect-grace-period", "1", "--log-level", "warning", "gapp:application"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                get(url + "/stats")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(raw_request("GET", "/x"))
        # (in_flight counts the /stats request too.)
        wait_for(lambda: get(url + "/stats").json()["in_flight"] == 2)
        sock.close()
        t0 = time.monotonic()

        def ended() -> bool:
            return get(url + "/stats").json()["in_flight"] == 1

        wait_for(ended, timeout=10)
        assert time.monotonic() - t0 > 0.8  # (it took gunicorn's grace period)
        data = get(url + "/stats").json()
        assert data["outcomes"]["client_disconnected"] == 1, data["outcomes"]
        assert data["outcomes"]["server_shutdown"] == 0
        assert {"outcome": "client_disconnected", "method": "GET", "route": "/stubborn",
                "count": 1} in data["routes"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_wsgi_flask_routes_counted() -> None:
    flask = pytest.importorskip("flask")
    from werkzeug.test import Client

    app = flask.Flask("t")

    @app.get("/users/<int:uid>")
    def user(uid: int) -> str:
        return f"user {uid}"

    client = Client(ctxmiddleware.WSGIContextMiddleware(app.wsgi_app, timeout=5))
    for i in range(2):
        with client.get(f"/users/{i}") as response:
            assert response.status_code == 200
    with client.get("/nothing") as response:
        assert response.status_code == 404
    snap = ctxmiddleware.stats()
    assert snap.routes[("completed", "GET", "/users/<int:uid>")] == 2
    assert snap.routes[("completed", "GET", "unmatched")] == 1
    assert snap.in_flight == 0


def test_downstream_cancels_counted_by_driver() -> None:
    before = ctxmiddleware.stats().downstream_cancels
    ctx, cancel = ctxmiddleware.with_cancel(ctxmiddleware.background())
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    threading.Timer(0.2, cancel).start()
    with pytest.raises(ctxmiddleware.ContextError), ctxmiddleware.sqlite_interruptible(conn, ctx):
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT count(*) FROM c"
        ).fetchall()
    after = ctxmiddleware.stats().downstream_cancels
    assert after.get("sqlite", 0) == before.get("sqlite", 0) + 1


def test_httpx_cancel_counted_and_waiting_noted() -> None:
    entered = threading.Event()
    backend_app = make_app(entered)
    backend_app.user_middleware.clear()  # (no budget of its own: only our cancel ends the call)
    detail = ctxmiddleware._request.active_recorder()
    assert detail is not None
    detail.set_detail()  # (waits are noted for the live page)
    with serve(backend_app) as backend:
        seen: list[str] = []

        async def call(request: Request) -> JSONResponse:
            rec = ctxmiddleware._request.active_recorder()
            assert rec is not None

            async def look() -> None:
                await asyncio.to_thread(entered.wait, 5)
                for _, row in rec.in_flight():
                    seen.extend(what for what, _ in row.waiting)

            looker = asyncio.create_task(look())
            async with ctxmiddleware.httpx_async_client() as client:
                try:
                    await client.get(backend.url + "/slow")
                finally:
                    await looker
            return JSONResponse({})

        app = Starlette(routes=[Route("/call", call)])
        app.add_middleware(ContextMiddleware, timeout=1.0)
        before = ctxmiddleware.stats().downstream_cancels.get("httpx", 0)
        with serve(app) as front:
            assert get(front.url + "/call").status_code == 504
        assert ctxmiddleware.stats().downstream_cancels.get("httpx", 0) == before + 1
        assert f"HTTP call to {backend.host}:{backend.port}" in seen


def test_set_route_outside_a_request_is_harmless() -> None:
    ctxmiddleware.set_route("/x")
    assert current() is not None
