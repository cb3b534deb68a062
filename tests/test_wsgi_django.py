"""ctxmiddleware.django under gunicorn (Django's WSGI handler) and uvicorn (its
ASGI handler): request.ctx, settings.CTXMIDDLEWARE, disconnects and deadlines,
and ORM queries cancelled on the server (PostgreSQL, SQLite)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from servers import RunningServer, raw_request, read_response
from test_wsgi_servers import _wait_pg, parse
from wsgi_apps import wait_event
from wsgi_servers import serve_wsgi

pytest.importorskip("django")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", params=["gunicorn-sync", "uvicorn"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    app = "django_app:application" if request.param != "uvicorn" else "django_app:asgi_application"
    with serve_wsgi(request.param, app) as running:
        yield running


def get(server: RunningServer, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    with server.connect() as sock:
        sock.sendall(raw_request("GET", path, {"Connection": "close", **(headers or {})}))
        return parse(read_response(sock, 10))


def test_request_ctx(server: RunningServer) -> None:
    status, headers, body = get(
        server, "/info", {"x-request-id": "dj-1", "X-Forwarded-For": "1.2.3.4"}
    )
    assert status == 200, body
    data = json.loads(body)
    assert headers["x-request-id"] == "dj-1" == data["request_id"]
    assert data["is_current"] is True
    assert data["client_ip"] == "1.2.3.4"
    assert 4 < data["remaining"] <= 5


def test_deadline_504_in_a_sync_view(server: RunningServer) -> None:
    t = uuid.uuid4().hex
    start = time.monotonic()
    status, headers, body = get(
        server, f"/slow?tag={t}", {"x-request-timeout-ms": "200", "x-request-id": "dj-late"}
    )
    assert (status, body) == (504, b"Gateway Timeout")
    assert headers["x-request-id"] == "dj-late"
    assert time.monotonic() - start < 2


def test_deadline_504_in_an_async_view(server: RunningServer) -> None:
    if server.server != "uvicorn":
        pytest.skip("under WSGI an async view runs in asgiref's own loop: it awaits ctx.done()")
    t = uuid.uuid4().hex
    status, headers, body = get(server, f"/aslow?tag={t}", {"x-request-timeout-ms": "200"})
    assert (status, body) == (504, b"Gateway Timeout")
    assert headers["x-request-id"]
    assert "DeadlineExceeded" in wait_event(t, "done")["err"]


@pytest.mark.parametrize("view", ["slow", "aslow"])
def test_disconnect_cancels_the_context(server: RunningServer, view: str) -> None:
    if view == "aslow" and server.server != "uvicorn":
        pytest.skip("under WSGI an async view runs in asgiref's own loop: it awaits ctx.done()")
    t = uuid.uuid4().hex
    sock = server.connect()
    sock.sendall(raw_request("GET", f"/{view}?tag={t}"))
    wait_event(t, "started")
    sock.close()
    assert "ClientDisconnected" in wait_event(t, "done", 5)["cause"]


def test_disconnect_stops_an_orm_query_on_postgres(server: RunningServer) -> None:
    pytest.importorskip("psycopg")
    t = uuid.uuid4().hex
    sock = server.connect()
    sock.sendall(raw_request("GET", f"/orm_pg?tag={t}"))
    wait_event(t, "started")
    _wait_pg(t, 1)
    sock.close()
    _wait_pg(t, 0, 5)
    done = wait_event(t, "done")
    assert done["result"] == "Canceled" and "ClientDisconnected" in done["cause"]


def test_deadline_stops_an_orm_query_on_sqlite(server: RunningServer) -> None:
    t = uuid.uuid4().hex
    status, _, _ = get(server, f"/orm_sqlite?tag={t}", {"x-request-timeout-ms": "200"})
    assert status == 504
    assert wait_event(t, "done")["result"] == "DeadlineExceeded"


def test_statement_timeout_follows_the_budget(server: RunningServer) -> None:
    pytest.importorskip("psycopg")
    status, _, body = get(server, "/orm_timeout", {"x-request-timeout-ms": "1500"})
    assert status == 200
    value = json.loads(body)["statement_timeout"]
    assert value.endswith("ms") and 1000 < int(value[:-2]) <= 1500, value
    status, _, body = get(server, "/orm_timeout")
    value = json.loads(body)["statement_timeout"]
    assert value in ("5s",) or (value.endswith("ms") and 4000 < int(value[:-2]) <= 5000), value
