"""ctxmiddleware.flask under gunicorn (sync worker): g.ctx, options from
app.config, disconnect stopping a PostgreSQL query, the deadline's 504."""

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

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve_wsgi("gunicorn-sync", "flask_app:app") as running:
        yield running


def get(server: RunningServer, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    with server.connect() as sock:
        sock.sendall(raw_request("GET", path, {"Connection": "close", **(headers or {})}))
        return parse(read_response(sock, 10))


def test_g_ctx_is_the_request_context(server: RunningServer) -> None:
    status, headers, body = get(
        server, "/info", {"x-request-id": "flask-1", "X-Forwarded-For": "1.2.3.4"}
    )
    data = json.loads(body)
    assert status == 200 and headers["x-request-id"] == "flask-1"
    assert data["request_id"] == "flask-1" and data["is_current"] is True
    assert data["client_ip"] == "1.2.3.4"  # CTXMIDDLEWARE_TRUSTED_PROXIES from app.config
    assert 4 < data["remaining"] <= 5  # CTXMIDDLEWARE_TIMEOUT


def test_deadline_is_a_504_with_the_request_id(server: RunningServer) -> None:
    t = uuid.uuid4().hex
    start = time.monotonic()
    status, headers, body = get(
        server, f"/slow?tag={t}", {"x-request-timeout-ms": "200", "x-request-id": "late"}
    )
    assert (status, body) == (504, b"Gateway Timeout")
    assert headers["x-request-id"] == "late"
    assert time.monotonic() - start < 2


def test_other_context_errors_stay_500(server: RunningServer) -> None:
    status, headers, _ = get(server, "/other_ctx_error")
    assert status == 500 and headers["x-request-id"]


def test_disconnect_stops_the_query(server: RunningServer) -> None:
    pytest.importorskip("psycopg")
    t = uuid.uuid4().hex
    sock = server.connect()
    sock.sendall(raw_request("GET", f"/pg?tag={t}"))
    wait_event(t, "started")
    _wait_pg(t, 1)
    sock.close()
    _wait_pg(t, 0, 5)
    done = wait_event(t, "done")
    assert done["result"] == "Canceled" and "ClientDisconnected" in done["cause"]


def test_disconnect_wakes_a_waiting_view(server: RunningServer) -> None:
    t = uuid.uuid4().hex
    sock = server.connect()
    sock.sendall(raw_request("GET", f"/slow?tag={t}"))
    wait_event(t, "started")
    sock.close()
    assert "ClientDisconnected" in wait_event(t, "done", 5)["cause"]
