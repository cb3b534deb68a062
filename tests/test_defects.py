"""Regression tests for known defects of ContextMiddleware, over real servers.

Each test runs the app under uvicorn (h11, httptools) or hypercorn in a
background thread (``servers.py``) and talks to it over real sockets. The app
runs on the server's loop, so the test synchronises with it through
``threading.Event`` (and wakes it through :class:`Gate`); a bounded wait
appears only where a test must show that something does *not* happen.

1. A ``BackgroundTask`` runs after the response is complete: the request's
   deadline must not cancel it.
2. The 499/504 log lines carry the request path: control characters in it must
   be escaped (CWE-117, log injection).
3. ``CLIENT_IP`` from a trusted forwarding header must be a plain address, not
   an IPv6 address with an attacker-chosen zone id (``fe80::1%<script>``).
4. A request body of unknown length (HTTP/2 without ``content-length``) must
   not be read ahead without bound by the disconnect watcher.
5. A ``ContextError`` of the request's own context escaping a sync endpoint is
   a 504, not a 500, also when the middleware wraps the whole Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import Gate, Outer, Probe
from servers import SERVERS, raw_request, serve
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import ContextMiddleware

WAIT = 5.0  # upper bound for anything the test waits for; reached only on failure

pytestmark = pytest.mark.timeout(60)


# -- helpers -------------------------------------------------------------------


class LogCatcher(logging.Handler):
    """Collects the records of the ``ctxmiddleware`` logger (from the server's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.got = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.got.set()

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def catch_logs() -> Iterator[LogCatcher]:
    logger = logging.getLogger("ctxmiddleware")
    handler = LogCatcher()
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def parse_head(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def recv_response(sock: Any) -> tuple[int, dict[str, str], bytes]:
    """One complete response with a Content-Length, leaving the connection open."""
    sock.settimeout(WAIT)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head; got {data!r}"
        data += chunk
    status, headers, body = parse_head(data)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


# -- 1. a BackgroundTask outlives the request's deadline ------------------------


@pytest.mark.parametrize("deadline", ["header", "option"])
@pytest.mark.parametrize("kind", SERVERS)
def test_background_task_is_not_cancelled_at_the_deadline(kind: str, deadline: str) -> None:
    """The handler answers at once; its BackgroundTask sleeps 0.5 s, past the 0.2 s
    deadline (the caller's ``x-request-timeout-ms: 200``, or ``timeout=0.2``).

    The response is complete before the deadline, so the task must run to its
    end: the deadline only makes ``ctx.err()`` report it. The connection is kept
    alive (no disconnect plays a part) until the task has finished either way.
    """
    probe = Probe("bg_started", "bg_finished")

    async def work() -> None:
        t0 = time.monotonic()
        probe.set("bg_started")
        try:
            await asyncio.sleep(0.5)
        except BaseException as exc:
            probe.set("bg_finished", outcome=exc, after=time.monotonic() - t0)
            raise
        probe.set("bg_finished", outcome="done", after=time.monotonic() - t0)

    async def answer(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(work))

    if deadline == "header":
        options: dict[str, Any] = {"timeout": 30}
        headers = {"x-request-timeout-ms": "200"}
    else:
        options = {"timeout": 0.2}
        headers = {}
    app = Starlette(
        routes=[Route("/bg", answer)], middleware=[Middleware(ContextMiddleware, **options)]
    )
    with serve(app, kind) as server:
        sock = server.connect()
        try:
            sock.sendall(raw_request("GET", "/bg", headers))
            status, _, body = recv_response(sock)
            assert (status, body) == (200, b"ok")
            probe.wait("bg_started")
            probe.wait("bg_finished")
        finally:
            sock.close()

    outcome = probe["outcome"]
    assert outcome == "done", (
        f"the background task ended with {outcome!r} after {probe['after']:.3f} s"
    )


# -- 2. log injection through the request path ---------------------------------


def _hanging_app(probe: Probe) -> Any:
    """A raw ASGI app that never answers (until the middleware cancels it)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # (hypercorn's lifespan: no startup to wait for)
        probe.set("entered")
        await asyncio.sleep(60)

    return app


_FORGED_PATHS = {
    "lf": "/x%0AFORGED-LINE",
    "crlf-esc-nul": "/x%0D%0AFORGED-LINE%1B%00",
}


@pytest.mark.parametrize("path", list(_FORGED_PATHS), ids=list(_FORGED_PATHS))
@pytest.mark.parametrize("outcome", ["504", "499"])
@pytest.mark.parametrize("kind", SERVERS)
def test_logged_path_has_control_characters_escaped(kind: str, outcome: str, path: str) -> None:
    """``%0A`` in the request target is a newline in ``scope["path"]``: logged as
    is, it starts a forged log line. The 504 (caller's budget spent on arrival,
    ``x-request-timeout-ms: 0``) and 499 (client gone) lines must show it escaped.
    """
    target = _FORGED_PATHS[path]
    probe = Probe("entered", "mw_done")
    app = Outer(ContextMiddleware(_hanging_app(probe), timeout=30), probe)
    with catch_logs() as logs, serve(app, kind) as server:
        sock = server.connect()
        try:
            if outcome == "504":
                sock.sendall(raw_request("GET", target, {"x-request-timeout-ms": "0"}))
                status, _, _ = recv_response(sock)
                assert status == 504
            else:
                sock.sendall(raw_request("GET", target))
                probe.wait("entered")  # the app hangs; now go away
        finally:
            sock.close()
        probe.wait("mw_done")  # the middleware logs before it returns

    wanted = outcome + (" client disconnected" if outcome == "499" else " deadline exceeded")
    lines = [m for m in logs.messages() if wanted in m]
    assert len(lines) == 1, logs.messages()
    line = lines[0]
    bad = sorted({f"{ord(c):#04x}" for c in line if ord(c) < 0x20})
    assert not bad, f"control characters {bad} in log message {line!r}"
    # The forged text is still there, with something visible where the newline was.
    assert re.search(r"/x\S+FORGED-LINE", line), line


# -- 3. IPv6 zone ids in CLIENT_IP ----------------------------------------------


_ZONED_HOPS = {
    "xff-script": ("x-forwarded-for", "fe80::1%<script>"),
    "xff-bracketed-port": ("x-forwarded-for", "[fe80::1%eth0]:8080"),
    "xff-behind-proxy": ("x-forwarded-for", "fe80::1%<b>, 127.0.0.2"),
    "forwarded": ("forwarded", 'for="[fe80::1%<script>]:80"'),
}


@pytest.mark.parametrize("hop", list(_ZONED_HOPS), ids=list(_ZONED_HOPS))
def test_client_ip_never_carries_an_ipv6_zone_id(hop: str) -> None:
    """A trusted proxy (the peer 127.0.0.1) forwards a hop with a zone id, which
    ``ipaddress`` accepts and keeps in ``str()``: CLIENT_IP would carry
    attacker-chosen text into logs, rate-limit keys and HTML. It must be a plain
    canonical address (the zone dropped, or the hop refused: then the peer)."""
    header, value = _ZONED_HOPS[hop]

    async def whoami(request: Request) -> Response:
        return JSONResponse({"ip": ctxmiddleware.current().value(ctxmiddleware.CLIENT_IP)})

    app = Starlette(
        routes=[Route("/ip", whoami)],
        middleware=[
            Middleware(
                ContextMiddleware,
                trusted_proxies=["127.0.0.0/8"],
                forwarded_header=header,
            )
        ],
    )
    with serve(app, "uvicorn-h11") as server:
        response = httpx.get(f"{server.url}/ip", headers={header: value}, timeout=WAIT)

    assert response.status_code == 200
    ip = response.json()["ip"]
    assert isinstance(ip, str)
    assert "%" not in ip and "<" not in ip, ip
    assert str(ipaddress.ip_address(ip)) == ip, ip
    assert ip in ("fe80::1", "127.0.0.1", "127.0.0.2"), ip


# -- 4. bounded read-ahead of a body of unknown length ------------------------------


_UPLOAD = 20 * 1024 * 1024
_CHUNK = 64 * 1024
_READ_AHEAD_LIMIT = 1024 * 1024
_WINDOW = 2.0


class CountingServer:
    """Outside the middleware: counts the body bytes pulled from the server's receive().

    Until the app reads (it sleeps on a gate), every byte counted here was
    pulled by the middleware itself, on its own.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pulled = 0
        self.over_limit = threading.Event()
        self.done = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.pulled += len(message.get("body", b""))
                if self.pulled > _READ_AHEAD_LIMIT:
                    self.over_limit.set()
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.done.set()


def test_body_of_unknown_length_is_not_read_ahead_without_bound() -> None:
    """HTTP/2 cleartext (prior knowledge) on hypercorn: a 20 MiB upload streamed
    from a generator has neither Content-Length nor Transfer-Encoding.

    Design: the app does not read its body; it sleeps on a gate. A pure ASGI
    wrapper placed outside the middleware counts the ``http.request`` bytes
    pulled from the server: while the app sleeps, those are the middleware's
    read-ahead. With bounded read-ahead, HTTP/2 flow control (a 64 KiB window,
    replenished only as hypercorn hands chunks to the ASGI side through its
    10-message queue) stalls the client after a few hundred KiB, so the count
    never passes 1 MiB. Unbounded, it passes 1 MiB within milliseconds on
    loopback. The test waits (a bounded window of 2 s, used up in full only when
    the behaviour is right) for the count to pass 1 MiB; it must not. Then the
    gate opens, the app reads everything, and the body must arrive intact.
    """
    gate = Gate()
    entered = threading.Event()

    async def upload(request: Request) -> Response:
        entered.set()
        await gate.wait()
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return JSONResponse({"sha256": digest.hexdigest(), "size": size})

    counter = CountingServer(
        ContextMiddleware(Starlette(routes=[Route("/up", upload, methods=["POST"])]), timeout=30)
    )
    payload = os.urandom(_UPLOAD)
    expected = {"sha256": hashlib.sha256(payload).hexdigest(), "size": _UPLOAD}
    yielded = [0]
    result: dict[str, Any] = {}

    def body() -> Iterator[bytes]:
        for i in range(0, _UPLOAD, _CHUNK):
            yielded[0] += _CHUNK
            yield payload[i : i + _CHUNK]

    with serve(counter, "hypercorn") as server:

        def client() -> None:
            try:
                with httpx.Client(http1=False, http2=True, timeout=30) as c:
                    response = c.post(f"{server.url}/up", content=body())
                    result["version"] = response.http_version
                    result["status"] = response.status_code
                    result["json"] = response.json()
            except BaseException as exc:  # reported by the test thread
                result["error"] = exc

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            assert entered.wait(WAIT), result.get("error")
            over = counter.over_limit.wait(_WINDOW)
            pulled_while_asleep = counter.pulled
            client_sent_while_asleep = yielded[0]
        finally:
            gate.set()
            thread.join(30)
        assert counter.done.wait(WAIT)

    assert not over, (
        f"the middleware pulled {pulled_while_asleep} bytes off the server while the"
        f" app slept (client had yielded {client_sent_while_asleep})"
    )
    assert pulled_while_asleep <= _READ_AHEAD_LIMIT
    assert client_sent_while_asleep > 0  # the upload had begun: the window was not idle
    assert "error" not in result, result["error"]
    assert result["version"] == "HTTP/2"
    assert result["status"] == 200
    assert result["json"] == expected


# -- 5. ctx.err() escaping a sync endpoint -------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "add_middleware"])
@pytest.mark.parametrize("kind", SERVERS)
def test_context_error_from_a_sync_endpoint_is_a_504(kind: str, wrapped: bool) -> None:
    """``time.sleep(0.02); current().check()`` in a ``def`` endpoint (run in a
    worker thread) with a 10 ms budget raises DeadlineExceeded, which
    Starlette's error middleware would make a 500. The caller must get the 504,
    and the log one ``deadline exceeded`` warning, whether the middleware wraps
    the Starlette app or sits inside it (add_middleware)."""
    probe = Probe("mw_done")

    def check(request: Request) -> Response:
        time.sleep(0.02)
        ctxmiddleware.current().check()
        return PlainTextResponse("unreachable")

    routes = [Route("/check", check)]
    if wrapped:
        app: Any = Outer(ContextMiddleware(Starlette(routes=routes), timeout=30), probe)
    else:
        inner = Starlette(routes=routes)
        inner.add_middleware(ContextMiddleware, timeout=30)
        app = Outer(inner, probe)
    with catch_logs() as logs, serve(app, kind) as server:
        response = httpx.get(
            f"{server.url}/check",
            headers={"x-request-timeout-ms": "10", "x-request-id": "sync-1"},
            timeout=WAIT,
        )
        probe.wait("mw_done")

    assert response.status_code == 504, (response.status_code, response.text)
    assert response.text == "Gateway Timeout"
    assert response.headers.get_list("x-request-id") == ["sync-1"]
    warnings = [
        r
        for r in logs.records
        if r.levelno == logging.WARNING and "deadline exceeded" in r.getMessage()
    ]
    assert len(warnings) == 1, logs.messages()
    assert "sync-1" in warnings[0].getMessage()
