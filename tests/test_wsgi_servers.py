"""WSGIContextMiddleware under real WSGI servers, over raw sockets.

gunicorn (sync and gthread workers) and uWSGI run in subprocesses, waitress
and werkzeug's dev server in threads; the app (tests/wsgi_apps.py) reports
through event files, so every wait is on an event with a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from servers import RunningServer, raw_request, read_response
from wsgi_apps import PG_DSN, has_event, wait_event
from wsgi_servers import WSGI_SERVERS, serve_wsgi, uwsgi_available

pytestmark = pytest.mark.timeout(60)

KEEPALIVE_SERVERS = ["gunicorn-gthread", "waitress"]


@pytest.fixture(scope="module", params=WSGI_SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with serve_wsgi(request.param) as running:
        yield running


def tag() -> str:
    return uuid.uuid4().hex


def get(server: RunningServer, path: str, headers: dict[str, str] | None = None,
        body: bytes = b"", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    with server.connect() as sock:
        sock.sendall(raw_request(method, path, {"Connection": "close", **(headers or {})}, body))
        return parse(read_response(sock, 10))


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def state(server: RunningServer) -> dict:
    status, _, body = get(server, "/state")
    assert status == 200
    return json.loads(body)


def open_request(server: RunningServer, path: str, headers: dict[str, str] | None = None
                 ) -> socket.socket:
    sock = server.connect()
    sock.sendall(raw_request("GET", path, headers))
    return sock


# -- disconnect --------------------------------------------------------------


def test_disconnect_cancels_the_context(server: RunningServer) -> None:
    t = tag()
    sock = open_request(server, f"/m/slow?tag={t}&seconds=20")
    wait_event(t, "started")
    closed = time.monotonic()
    sock.close()
    done = wait_event(t, "done", 5)
    assert done["done"] is True
    assert "ClientDisconnected" in done["cause"]
    assert time.monotonic() - closed < 2


def test_completed_request_is_not_cancelled(server: RunningServer) -> None:
    t = tag()
    status, headers, body = get(server, f"/m/slow?tag={t}&seconds=0.05")
    assert (status, body) == (200, b"too late")
    assert wait_event(t, "done")["done"] is False
    assert len(headers["x-request-id"]) == 32


def _pg_active(app_name: str) -> int:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active'", [app_name],
        ).fetchone()
        assert row is not None
        return int(row[0])


def _wait_pg(app_name: str, active: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while _pg_active(app_name) != active:
        assert time.monotonic() < end, f"backend {app_name} never reached {active} active"
        time.sleep(0.005)


def test_disconnect_stops_a_postgres_query(server: RunningServer) -> None:
    pytest.importorskip("psycopg")
    t = tag()
    sock = open_request(server, f"/m/pg?tag={t}")
    wait_event(t, "started")
    _wait_pg(t, 1)
    sock.close()
    _wait_pg(t, 0, 5)
    done = wait_event(t, "done")
    assert done["result"] == "Canceled"
    assert "ClientDisconnected" in done["cause"]


def test_disconnect_stops_a_sqlite_query(server: RunningServer) -> None:
    t = tag()
    sock = open_request(server, f"/m/sqlite?tag={t}")
    wait_event(t, "started")
    sock.close()
    done = wait_event(t, "done", 5)
    assert done["result"] == "Canceled"
    assert "ClientDisconnected" in done["cause"]


def test_deadline_answers_504_with_the_request_id(server: RunningServer) -> None:
    t = tag()
    start = time.monotonic()
    status, headers, body = get(
        server, f"/m/slow?tag={t}", {"x-request-timeout-ms": "200", "x-request-id": "rid-504"}
    )
    assert (status, body) == (504, b"Gateway Timeout")
    assert headers["x-request-id"] == "rid-504"
    assert 0.19 < time.monotonic() - start < 2
    assert "DeadlineExceeded" in wait_event(t, "done")["err"]


def test_deadline_stops_a_postgres_query(server: RunningServer) -> None:
    pytest.importorskip("psycopg")
    t = tag()
    status, headers, _ = get(server, f"/m/pg?tag={t}", {"x-request-timeout-ms": "300"})
    assert status == 504 and headers["x-request-id"]
    assert wait_event(t, "done")["result"] == "DeadlineExceeded"
    _wait_pg(t, 0, 2)


def test_deadline_in_a_streaming_generator_before_any_byte_is_a_504(
    server: RunningServer,
) -> None:
    status, headers, body = get(server, "/m/stream_ctxerr", {"x-request-timeout-ms": "100"})
    assert (status, body) == (504, b"Gateway Timeout")
    assert headers["x-request-id"]


def test_streaming_disconnect_closes_the_generator(server: RunningServer) -> None:
    t = tag()
    sock = open_request(server, f"/m/stream?tag={t}")
    wait_event(t, "started")
    assert sock.recv(10)  # the stream is flowing
    sock.close()
    closed = wait_event(t, "closed", 5)
    assert "ClientDisconnected" in closed["cause"]
    assert closed["is_current"] is True
    assert not has_event(t, "finished")


def test_context_flows_into_copied_threads(server: RunningServer) -> None:
    status, _, body = get(server, "/m/threads")
    assert status == 200 and json.loads(body) == {"same": True}


@pytest.mark.parametrize("size", [0, 60 * 1024, 5 * 1024 * 1024])
@pytest.mark.parametrize("action", ["echo", "echo_chunks"])
def test_body_integrity(server: RunningServer, size: int, action: str) -> None:
    import hashlib

    body = os.urandom(size)
    status, _, out = get(server, f"/m/{action}", body=body, method="POST")
    assert status == 200
    assert json.loads(out) == {"len": size, "sha": hashlib.sha256(body).hexdigest()}


# -- keep-alive and pipelining are not disconnects -------------------------------


@pytest.mark.parametrize("kind", KEEPALIVE_SERVERS)
def test_keepalive_and_pipelined_requests_are_not_disconnects(kind: str) -> None:
    with serve_wsgi(kind) as srv, srv.connect() as sock:
        t1, t2, t3 = tag(), tag(), tag()
        # Two requests on one connection, one after the other.
        sock.sendall(raw_request("GET", f"/m/slow?tag={t1}&seconds=0.1"))
        wait_event(t1, "done")
        # Then two pipelined in one write: the second one's bytes wait in the
        # socket while the first runs.
        sock.sendall(
            raw_request("GET", f"/m/slow?tag={t2}&seconds=0.2")
            + raw_request("GET", f"/m/slow?tag={t3}&seconds=0.05")
            + raw_request("GET", "/m/ok", {"Connection": "close"})
        )
        for t in (t1, t2, t3):
            assert wait_event(t, "done")["done"] is False, t
        data = read_response(sock, 10)
        assert data.count(b"HTTP/1.1 200") == 4 or data.count(b"200 OK") >= 3


# -- one watcher thread; nothing left behind ------------------------------------


def test_one_watcher_thread_under_50_concurrent_requests() -> None:
    with serve_wsgi("gunicorn-gthread", threads=64) as srv:
        tags = [tag() for _ in range(50)]
        socks = [open_request(srv, f"/m/slow?tag={t}&seconds=20") for t in tags]
        try:
            for t in tags:
                wait_event(t, "started")
            st = state(srv)
            assert st["watchers"] == 1
            assert st["watching"] == 50
        finally:
            for s in socks:
                s.close()
        for t in tags:
            assert "ClientDisconnected" in wait_event(t, "done")["cause"]


def test_no_thread_fd_or_context_left_after_1000_requests_with_random_disconnects() -> None:
    rng = random.Random(7)
    with serve_wsgi("gunicorn-gthread", threads=16) as srv:
        for _ in range(3):  # warm up: worker threads, watcher, timer thread
            get(srv, "/m/slow?seconds=0.001")
        before = state(srv)
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for _ in range(n):
                    choice = rng.random()
                    sock = srv.connect()
                    with contextlib.closing(sock):
                        if choice < 0.4:
                            sock.sendall(raw_request("GET", "/m/slow?seconds=0.002",
                                                     {"Connection": "close"}))
                            read_response(sock, 10)
                        elif choice < 0.7:
                            sock.sendall(raw_request("GET", "/m/stream?chunks=20",
                                                     {"Connection": "close"}))
                            sock.recv(1)
                        else:
                            sock.sendall(raw_request("GET", "/m/slow?seconds=5"))
                            time.sleep(rng.random() * 0.003)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(100,)) for _ in range(10)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(50)
        assert not errors
        # Waits for the server too: gunicorn closes a kept-alive connection whose client
        # left only when its poller next sees the EOF, so its fd may outlive the request
        # by a moment. A leak is an fd that never goes.
        end = time.monotonic() + 10
        while True:
            after = state(srv)
            if (after["watching"] == 0 and after["live_requests"] <= 1
                    and after["fds"] <= before["fds"] + 2):
                break
            assert time.monotonic() < end, (before, after)
            time.sleep(0.01)
        assert after["watchers"] == 1
        def ours(st: dict) -> list[str]:  # gunicorn's pool grows its threads lazily
            return sorted(n for n in st["thread_names"] if not n.startswith("ThreadPool"))

        assert ours(after) == ours(before), (before, after)


@pytest.mark.skipif(not uwsgi_available(), reason="uWSGI is not installed")
def test_uwsgi_disconnect_and_deadline() -> None:
    with serve_wsgi("uwsgi") as srv:
        t = tag()
        sock = open_request(srv, f"/m/slow?tag={t}&seconds=20")
        wait_event(t, "started")
        sock.close()
        assert "ClientDisconnected" in wait_event(t, "done", 5)["cause"]
        status, headers, _ = get(srv, "/m/slow", {"x-request-timeout-ms": "100"})
        assert status == 504 and headers["x-request-id"]
