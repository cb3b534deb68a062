"""Request values under real servers: request id, client IP, auth token, logging.

Every test talks to a real server (uvicorn h11/httptools, hypercorn) over a
real socket. One server per kind serves all the apps below, dispatched on the
first path segment, so the file starts each server once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from servers import SERVERS, RunningServer, raw_request, serve
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import ctxmiddleware
from ctxmiddleware import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    ClientDisconnected,
    Context,
    ContextMiddleware,
    Key,
    RequestContext,
    RequestContextFilter,
    RouteTimeout,
    Secret,
    add_request_context,
    cause,
    current,
)

pytestmark = pytest.mark.timeout(30)

TOKEN = "abc.def"
MY_KEY: Key[str] = Key("my_key")
log = logging.getLogger("tests.asgi_values")
log.setLevel(logging.DEBUG)
# Handlers attached by a test only (a QueueHandler, say); never the root's.
queued_log = logging.getLogger("tests.asgi_values.queued")
queued_log.propagate = False

HEX_UUID4 = re.compile(r"^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$")


# -- cross-thread bookkeeping (the app runs on the server's thread) ----------


class Board:
    """Values and events the app posts for the test, keyed by a per-test tag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._values: dict[str, dict[str, Any]] = {}

    def event(self, tag: str, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(f"{tag}/{name}", threading.Event())

    def put(self, tag: str, **values: Any) -> None:
        with self._lock:
            self._values.setdefault(tag, {}).update(values)

    def get(self, tag: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._values.get(tag, {}))


BOARD = Board()


def new_tag() -> str:
    return uuid.uuid4().hex


def structlog_events(event: str) -> list[dict[str, Any]]:
    """Run one structlog call through ``add_request_context``; return what it saw."""
    seen: list[dict[str, Any]] = []

    def capture(_logger: Any, _name: str, event_dict: Any) -> Any:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    slog = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[add_request_context, capture]
    )
    slog.info(event)
    return seen


def describe(ctx: Context, *, tag: str | None) -> dict[str, Any]:
    """What a handler sees; also logs, so the test can inspect log records."""
    secret = ctx.value(AUTH_TOKEN)
    log.info("handling tag=%s ctx=%s repr=%r secret=%s %r", tag, ctx, ctx, secret, secret)
    try:
        raise RuntimeError(f"in handler {ctx!r} {secret!r}")
    except RuntimeError:
        log.warning("with a traceback tag=%s", tag, exc_info=True)
    queued_log.info("queued tag=%s", tag)
    return {
        "request_id": ctx.value(REQUEST_ID),
        "client_ip": ctx.value(CLIENT_IP),
        "is_current": current() is ctx,
        "ctx_id": id(ctx),
        "current_id": id(current()),
        "current_request_id": current().value(REQUEST_ID),
        "token_type": type(secret).__name__,
        "token": secret.reveal() if isinstance(secret, Secret) else None,
        "renderings": [str(ctx), repr(ctx), str(secret), repr(secret), f"{secret}", f"{ctx}"],
        "my_key": ctx.value(MY_KEY),
        "structlog": structlog_events("in request"),
        "thread": threading.current_thread().name,
    }


# -- the apps ----------------------------------------------------------------


async def info(request: Request) -> Response:
    return JSONResponse(describe(request.state.ctx, tag=request.headers.get("x-test-tag")))


def sync_info(request: Request) -> Response:  # runs in the threadpool
    return JSONResponse(describe(request.state.ctx, tag=request.headers.get("x-test-tag")))


async def slow(request: Request) -> Response:
    await asyncio.sleep(5)
    return PlainTextResponse("too late")


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


def starlette_routes(prefix: str) -> list[Route]:
    return [
        Route(f"/{prefix}/info", info),
        Route(f"/{prefix}/sync", sync_info),
        Route(f"/{prefix}/slow", slow),
        Route(f"/{prefix}/boom", boom),
    ]


# /m: the middleware wraps the whole app, with a values hook.
main_app = ContextMiddleware(
    Starlette(routes=starlette_routes("m")),
    timeout=5,
    values=lambda scope: [(MY_KEY, scope["path"])],
)

# /a: added with add_middleware (so Starlette's ServerErrorMiddleware is outside it),
# with a user 500 handler that must still answer unhandled errors.
def custom_500(request: Request, exc: Exception) -> PlainTextResponse:
    return PlainTextResponse(f"custom 500 for {request.state.ctx.value(REQUEST_ID)}", 500)


added_app = Starlette(routes=starlette_routes("a"), exception_handlers={Exception: custom_500})
added_app.add_middleware(ContextMiddleware, timeout=5)

# /c: a custom request id header.
custom_app = ContextMiddleware(
    Starlette(routes=starlette_routes("c")), request_id_header="X-Correlation-ID"
)

# /p: one trusted proxy, the loopback peer.
proxy_app = ContextMiddleware(
    Starlette(routes=starlette_routes("p")), trusted_proxies=["127.0.0.1"]
)

# /u: trusted proxies configured, but the loopback peer is not one of them.
untrusted_app = ContextMiddleware(
    Starlette(routes=starlette_routes("u")), trusted_proxies=["10.0.0.0/8"]
)

# /ch: a chain of trusted proxies.
chain_app = ContextMiddleware(
    Starlette(routes=starlette_routes("ch")),
    trusted_proxies=["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"],
)

# /f: RFC 7239 Forwarded.
forwarded_app = ContextMiddleware(
    Starlette(routes=starlette_routes("f")),
    trusted_proxies=["127.0.0.1"],
    forwarded_header="forwarded",
)

# /fa: FastAPI.
fastapi_app = FastAPI()
fastapi_app.add_middleware(ContextMiddleware, timeout=5)


@fastapi_app.get("/fa/dep")
async def fa_dep(request: FastAPIRequest, ctx: RequestContext) -> dict[str, Any]:
    return {
        "same": ctx is request.state.ctx and ctx is current(),
        "request_id": ctx.value(REQUEST_ID),
    }


@fastapi_app.get("/fa/sync")
def fa_sync(request: FastAPIRequest, ctx: RequestContext) -> dict[str, Any]:
    return {
        "ctx_id": id(ctx),
        "state_id": id(request.state.ctx),
        "current_id": id(current()),
        "request_id": ctx.value(REQUEST_ID),
        "current_request_id": current().value(REQUEST_ID),
        "thread": threading.current_thread().name,
    }


@fastapi_app.get("/fa/route-timeout", dependencies=[RouteTimeout(0.2)])
async def fa_route_timeout() -> dict[str, Any]:
    await asyncio.sleep(3)
    return {"finished": True}


@fastapi_app.get("/fa/value-error")
async def fa_value_error() -> dict[str, Any]:
    raise ValueError("bad value")


@fastapi_app.exception_handler(ValueError)
async def on_value_error(request: FastAPIRequest, exc: ValueError) -> Response:
    ctx = request.state.ctx
    return JSONResponse(
        {
            "is_current": current() is ctx,
            "request_id": ctx.value(REQUEST_ID),
            "alive": ctx.err() is None,
            "error": str(exc),
        },
        status_code=422,
    )


@fastapi_app.websocket("/fa/ws")
async def fa_ws(websocket: WebSocket, ctx: RequestContext) -> None:
    await websocket.accept()
    await websocket.send_json(
        {"same": ctx is websocket.state.ctx and ctx is current(), "rid": ctx.value(REQUEST_ID)}
    )
    await websocket.close()


# /fw: a FastAPI app wrapped whole, with a catch-all exception handler: that
# handler (in Starlette's ServerErrorMiddleware) runs inside the middleware.
fastapi_wrapped = FastAPI()


@fastapi_wrapped.exception_handler(Exception)
async def on_any_error(request: FastAPIRequest, exc: Exception) -> Response:
    ctx = request.state.ctx
    return JSONResponse(
        {"custom": True, "is_current": current() is ctx, "rid": ctx.value(REQUEST_ID)},
        status_code=500,
    )


@fastapi_wrapped.get("/fw/boom")
async def fw_boom() -> None:
    raise RuntimeError("boom")


# /b: a BaseHTTPMiddleware inside ContextMiddleware.
class Stamp(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: Any) -> Response:
        ctx = request.state.ctx
        response: Response = await call_next(request)
        response.headers["x-stamp"] = "same" if current() is ctx else "different"
        return response


async def hang(request: Request) -> Response:
    tag = request.headers["x-test-tag"]
    ctx = request.state.ctx
    BOARD.put(tag, ctx=ctx, current_is_ctx=current() is ctx)
    BOARD.event(tag, "started").set()
    try:
        await asyncio.sleep(3)
        BOARD.put(tag, slept=True)
        return PlainTextResponse("woke up")
    finally:
        BOARD.put(tag, cause_at_exit=cause(ctx))
        BOARD.event(tag, "finished").set()


bhm_app = Starlette(
    routes=[Route("/b/info", info), Route("/b/hang", hang)],
    middleware=[Middleware(ContextMiddleware, timeout=5), Middleware(Stamp)],
)


# /ws: websockets.
async def ws_echo(websocket: WebSocket) -> None:
    tag = websocket.headers.get("x-test-tag", "")
    ctx = websocket.state.ctx
    BOARD.put(tag, ctx=ctx)
    await websocket.accept()
    secret = ctx.value(AUTH_TOKEN)
    await websocket.send_json(
        {
            "request_id": ctx.value(REQUEST_ID),
            "client_ip": ctx.value(CLIENT_IP),
            "is_current": current() is ctx,
            "token": secret.reveal() if isinstance(secret, Secret) else None,
        }
    )
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(text)
    except WebSocketDisconnect:
        BOARD.put(tag, done_at_disconnect=ctx.done().is_set(), cause=cause(ctx))
        raise
    finally:
        BOARD.event(tag, "finished").set()


ws_app = ContextMiddleware(Starlette(routes=[WebSocketRoute("/ws/echo", ws_echo)]))


async def raw_asgi(scope: Any, receive: Any, send: Any) -> None:
    """An app that sets a request id header of its own (in any letter case)."""
    names = {"/r/lower": [b"x-request-id"], "/r/mixed": [b"X-Request-ID", b"x-request-id"]}
    headers = [(name, b"set-by-app") for name in names.get(scope["path"], [])]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    rid = current().value(REQUEST_ID) or ""
    await send({"type": "http.response.body", "body": rid.encode()})


raw_app = ContextMiddleware(raw_asgi)

APPS: dict[str, Any] = {
    "m": main_app,
    "a": added_app,
    "c": custom_app,
    "p": proxy_app,
    "u": untrusted_app,
    "ch": chain_app,
    "f": forwarded_app,
    "fa": fastapi_app,
    "b": bhm_app,
    "ws": ws_app,
    "r": raw_app,
    "fw": ContextMiddleware(fastapi_wrapped),
}


async def dispatch(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # hypercorn always runs it
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await APPS[scope["path"].split("/")[1]](scope, receive, send)


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str], RunningServer]]:
    with contextlib.ExitStack() as stack:
        running: dict[str, RunningServer] = {}

        def get(kind: str) -> RunningServer:
            if kind not in running:
                running[kind] = stack.enter_context(serve(dispatch, kind))
            return running[kind]

        yield get


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, servers: Callable[[str], RunningServer]
) -> RunningServer:
    return servers(request.param)


@pytest.fixture(scope="module")
def h11(servers: Callable[[str], RunningServer]) -> RunningServer:
    return servers("uvicorn-h11")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def h11_client(h11: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=h11.url, timeout=10) as c:
        yield c


class Capture(logging.Handler):
    """Formats every record (with RequestContextFilter) as the app emits it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestContextFilter())
        self.setFormatter(
            logging.Formatter(
                "%(levelname)s %(name)s rid=%(request_id)s ip=%(client_ip)s %(message)s"
            )
        )
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lock_:
            self.lines.append(line)
            self.records.append(record)

    def for_tag(self, tag: str) -> list[logging.LogRecord]:
        with self._lock_:
            return [r for r in self.records if f"tag={tag}" in r.getMessage()]


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    mw_logger = logging.getLogger("ctxmiddleware")
    old_level = mw_logger.level
    mw_logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        mw_logger.setLevel(old_level)


# -- helpers -----------------------------------------------------------------


def assert_fresh_id(value: str | None) -> None:
    assert value is not None
    assert HEX_UUID4.match(value), value


def send_raw(server: RunningServer, data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request on its own connection; the response's status, headers and body."""
    with server.connect() as sock:
        sock.sendall(data)
        buf = b""
        sock.settimeout(5)
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in lines[1:])
        ]
        length = int(dict(headers).get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


# == 1. request id ===========================================================

SANE_IDS = ["abc", "0", "req-123_abc.def:ghi", "A" * 128, "0123456789abcdef" * 2]


@pytest.mark.parametrize("rid", SANE_IDS)
def test_sane_request_id_is_kept_and_echoed(h11_client: httpx.Client, rid: str) -> None:
    r = h11_client.get("/m/info", headers={"x-request-id": rid})
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == [rid]
    assert r.json()["request_id"] == rid


INVALID_IDS: list[bytes] = [
    b"A" * 129,
    b"has space",
    "caf\u00e9".encode(),
    "\u30ea\u30af\u30a8\u30b9\u30c8".encode(),
    b"<script>alert(1)</script>",
    b"",
    b"x" * 10_000,
    b"a/b",
    b"a;b",
    b"%41",
]


@pytest.mark.parametrize("rid", INVALID_IDS, ids=lambda b: repr(b[:20]))
def test_invalid_request_id_is_replaced_and_not_echoed(
    h11_client: httpx.Client, rid: bytes
) -> None:
    r = h11_client.get("/m/info", headers={"x-request-id": rid})
    assert r.status_code == 200
    echoed = r.headers.get_list("x-request-id")
    assert len(echoed) == 1
    assert_fresh_id(echoed[0])
    assert r.json()["request_id"] == echoed[0]
    if rid:
        assert rid not in r.content
        for _, value in r.headers.raw:
            assert rid not in value


def test_concurrent_requests_keep_their_own_values(client: httpx.Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[str, ...]:
        path = ("/m/info", "/m/sync", "/b/info", "/a/info")[i % 4]
        r = client.get(path, headers={"x-request-id": f"par-{i}"})
        body = r.json()
        return (
            f"par-{i}",
            r.headers["x-request-id"],
            body["request_id"],
            body["current_request_id"],
        )

    with ThreadPoolExecutor(16) as pool:
        for sent, echoed, in_ctx, in_current in pool.map(one, range(48)):
            assert sent == echoed == in_ctx == in_current


def test_fresh_ids_are_distinct(h11_client: httpx.Client) -> None:
    ids = {h11_client.get("/m/info").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20
    for rid in ids:
        assert_fresh_id(rid)


def test_first_request_id_header_wins(h11: RunningServer) -> None:
    status, headers, body = send_raw(
        h11,
        raw_request(
            "GET",
            "/m/info",
            [("x-request-id", "first"), ("x-request-id", "second"), ("Connection", "close")],
        ),
    )
    assert status == 200
    assert header_values(headers, "x-request-id") == ["first"]
    assert json.loads(body)["request_id"] == "first"


def test_request_id_echoed_on_200_and_matches_ctx(client: httpx.Client) -> None:
    r = client.get("/m/info")
    assert r.status_code == 200
    assert_fresh_id(r.headers["x-request-id"])
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["current_request_id"] == body["request_id"]
    assert body["is_current"]


@pytest.mark.parametrize("prefix", ["m", "a"])
def test_request_id_echoed_on_504(client: httpx.Client, prefix: str) -> None:
    t0 = time.monotonic()
    r = client.get(
        f"/{prefix}/slow", headers={"x-request-id": "slow-1", "x-request-timeout-ms": "150"}
    )
    elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert r.headers.get_list("x-request-id") == ["slow-1"]
    assert 0.1 <= elapsed < 2.5


def test_request_id_echoed_on_unhandled_500(server: RunningServer) -> None:
    # Wrapping the whole app: Starlette's 500 goes through the middleware.
    # A new connection each time: the server closes one whose app raised.
    url = f"{server.url}/m/boom"
    r = httpx.get(url, headers={"x-request-id": "boom-1"}, timeout=10)
    assert r.status_code == 500
    assert r.headers.get_list("x-request-id") == ["boom-1"]
    r = httpx.get(url, timeout=10)
    assert r.status_code == 500
    assert_fresh_id(r.headers.get("x-request-id"))


def test_user_500_handler_answers_when_added_with_add_middleware(server: RunningServer) -> None:
    # Inside Starlette the middleware must not pre-empt the app's own 500
    # handler (which still sees the request context).
    r = httpx.get(f"{server.url}/a/boom", headers={"x-request-id": "boom-2"}, timeout=10)
    assert r.status_code == 500
    assert r.text == "custom 500 for boom-2"


@pytest.mark.parametrize("path", ["/r/none", "/r/lower", "/r/mixed"])
def test_exactly_one_request_id_even_if_the_app_sets_one(client: httpx.Client, path: str) -> None:
    # The response carries the id the logs carry, once, not the app's as well.
    r = client.get(path, headers={"x-request-id": "mine-1"})
    assert r.status_code == 200
    assert r.text == "mine-1"
    assert [v for k, v in r.headers.raw if k.lower() == b"x-request-id"] == [b"mine-1"]


def test_middleware_log_records_carry_the_request_id(
    h11_client: httpx.Client, captured: Capture
) -> None:
    for budget in ("100", "0"):
        rid = f"mwlog-{budget}-{new_tag()}"
        r = h11_client.get("/m/slow", headers={"x-request-id": rid, "x-request-timeout-ms": budget})
        assert r.status_code == 504
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            records = [rec for rec in captured.records if rid in rec.getMessage()]
            if records:
                break
            time.sleep(0.01)
        (record,) = records
        assert record.name == "ctxmiddleware"
        assert record.request_id == rid, budget  # type: ignore[attr-defined]
        assert record.client_ip == "127.0.0.1"  # type: ignore[attr-defined]


def test_custom_request_id_header(h11_client: httpx.Client) -> None:
    r = h11_client.get("/c/info", headers={"X-Correlation-ID": "corr-42"})
    assert r.status_code == 200
    assert r.headers.get_list("x-correlation-id") == ["corr-42"]
    assert "x-request-id" not in r.headers
    assert r.json()["request_id"] == "corr-42"

    # The default header name means nothing to this app.
    r = h11_client.get("/c/info", headers={"x-request-id": "ignored-1"})
    assert "x-request-id" not in r.headers
    assert_fresh_id(r.headers["x-correlation-id"])
    assert r.json()["request_id"] == r.headers["x-correlation-id"]

    r = h11_client.get("/c/info", headers={"X-Correlation-ID": "not valid!"})
    assert_fresh_id(r.headers["x-correlation-id"])


# == 2. client IP ============================================================


def test_client_ip_is_the_peer_by_default(client: httpx.Client) -> None:
    r = client.get("/m/info")
    assert r.json()["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize("prefix", ["m", "u"], ids=["no-trusted-proxies", "peer-not-trusted"])
@pytest.mark.parametrize(
    "headers",
    [
        {"x-forwarded-for": "203.0.113.7"},
        {"x-forwarded-for": "203.0.113.7, 10.0.0.1"},
        {"forwarded": "for=203.0.113.7"},
        {"x-real-ip": "203.0.113.7"},
    ],
)
def test_spoofed_forwarding_from_untrusted_peer_is_ignored(
    client: httpx.Client, prefix: str, headers: dict[str, str]
) -> None:
    r = client.get(f"/{prefix}/info", headers=headers)
    assert r.status_code == 200
    assert r.json()["client_ip"] == "127.0.0.1"


def test_untrusted_peer_address_is_its_own(server: RunningServer) -> None:
    # Connect from 127.0.0.2: not the trusted 127.0.0.1, so its XFF is ignored.
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here (macOS)")
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=server.url, transport=transport, timeout=10) as c:
        r = c.get("/p/info", headers={"x-forwarded-for": "203.0.113.7"})
    assert r.json()["client_ip"] == "127.0.0.2"


def ip_via(client: httpx.Client, prefix: str, headers: list[tuple[str, str]]) -> str:
    r = client.get(f"/{prefix}/info", headers=headers)
    assert r.status_code == 200
    result: str = r.json()["client_ip"]
    return result


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ([], "127.0.0.1"),
        (["203.0.113.7"], "203.0.113.7"),
        # Rightmost untrusted hop; the client-supplied leftmost one is never used.
        (["6.6.6.6, 203.0.113.7"], "203.0.113.7"),
        (["6.6.6.6, 203.0.113.7, 127.0.0.1"], "203.0.113.7"),
        (["6.6.6.6,203.0.113.7"], "203.0.113.7"),
        # Malformed hops stop the walk at the last believed address.
        (["garbage"], "127.0.0.1"),
        (["6.6.6.6, garbage"], "127.0.0.1"),
        (["garbage, 203.0.113.7"], "203.0.113.7"),
        ([""], "127.0.0.1"),
        (["203.0.113.7,"], "127.0.0.1"),
        ([", ,"], "127.0.0.1"),
        (["1.2.3.4.5"], "127.0.0.1"),
        (["6.6.6.6, 1.2.3.4.5"], "127.0.0.1"),
        (["256.1.1.1"], "127.0.0.1"),
        (["unknown"], "127.0.0.1"),
        (["[2001:db8::1"], "127.0.0.1"),
        (["2001:db8::1]:80"], "127.0.0.1"),
        (["1.2.3.4:80:90"], "127.0.0.1"),
        ([",,,,"], "127.0.0.1"),
        # Ports and IPv6.
        (["203.0.113.7:8080"], "203.0.113.7"),
        (["2001:db8::1"], "2001:db8::1"),
        (["[2001:db8::1]:443"], "2001:db8::1"),
        (["[2001:db8::1]"], "2001:db8::1"),
        (["2001:DB8:0:0::0001"], "2001:db8::1"),
        (["::ffff:203.0.113.9"], "203.0.113.9"),
        (["6.6.6.6, [2001:db8::1]:443"], "2001:db8::1"),
        # Several header lines form one list, in order.
        (["6.6.6.6", "203.0.113.7"], "203.0.113.7"),
        (["203.0.113.7", "127.0.0.1"], "203.0.113.7"),
        (["6.6.6.6, 5.5.5.5", "203.0.113.7, 127.0.0.1"], "203.0.113.7"),
    ],
)
def test_x_forwarded_for_with_one_trusted_proxy(
    h11_client: httpx.Client, xff: list[str], expected: str
) -> None:
    assert ip_via(h11_client, "p", [("x-forwarded-for", v) for v in xff]) == expected


def test_x_forwarded_for_across_servers(client: httpx.Client) -> None:
    headers = [("x-forwarded-for", "6.6.6.6, 203.0.113.7"), ("x-forwarded-for", "127.0.0.1")]
    assert ip_via(client, "p", headers) == "203.0.113.7"
    assert ip_via(client, "p", [("x-forwarded-for", "[2001:db8::1]:443")]) == "2001:db8::1"


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        ("203.0.113.7, 10.1.2.3, 10.4.5.6", "203.0.113.7"),
        ("6.6.6.6, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        # A "trusted-looking" hop left of an untrusted one is client-supplied.
        ("6.6.6.6, 10.9.9.9, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        ("10.9.9.9, 203.0.113.7", "203.0.113.7"),
        ("203.0.113.7, 127.0.0.1, 10.1.2.3", "203.0.113.7"),
        # All hops trusted: the leftmost one is as far as we can see.
        ("10.1.2.3, 10.4.5.6", "10.1.2.3"),
        # Malformed hops end the walk at the last believed (trusted) address.
        ("203.0.113.7, garbage, 10.1.2.3", "10.1.2.3"),
        ("203.0.113.7, 1.2.3.4.5, 10.1.2.3", "10.1.2.3"),
        ("203.0.113.7, , 10.1.2.3", "10.1.2.3"),
        ("garbage, 10.1.2.3", "10.1.2.3"),
        # IPv6 proxies in CIDR.
        ("198.51.100.1, [2001:db8::5]:1234", "198.51.100.1"),
        ("198.51.100.1, 2001:db8::5, 10.0.0.1", "198.51.100.1"),
        ("2001:db9::1, 2001:db8::5", "2001:db9::1"),
    ],
)
def test_x_forwarded_for_through_trusted_chain(
    h11_client: httpx.Client, xff: str, expected: str
) -> None:
    assert ip_via(h11_client, "ch", [("x-forwarded-for", xff)]) == expected


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (["for=203.0.113.7"], "203.0.113.7"),
        (["for=192.0.2.60;proto=http;by=203.0.113.43"], "192.0.2.60"),
        (["proto=http;For=192.0.2.60"], "192.0.2.60"),
        (['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        (['for="203.0.113.7:8080"'], "203.0.113.7"),
        (["for=6.6.6.6, for=203.0.113.7"], "203.0.113.7"),
        (["for=6.6.6.6", "for=203.0.113.7"], "203.0.113.7"),
        (["for=_hidden, for=203.0.113.7"], "203.0.113.7"),
        (["for=unknown"], "127.0.0.1"),
        (["for=203.0.113.7, for=unknown"], "127.0.0.1"),
        (["proto=https"], "127.0.0.1"),
        (["for="], "127.0.0.1"),
        (["garbage;;;,,=="], "127.0.0.1"),
    ],
)
def test_rfc7239_forwarded(h11_client: httpx.Client, forwarded: list[str], expected: str) -> None:
    assert ip_via(h11_client, "f", [("forwarded", v) for v in forwarded]) == expected


def test_forwarding_header_kinds_are_not_mixed(h11_client: httpx.Client) -> None:
    # An app configured for Forwarded ignores X-Forwarded-For, and vice versa.
    assert ip_via(h11_client, "f", [("x-forwarded-for", "203.0.113.7")]) == "127.0.0.1"
    assert ip_via(h11_client, "p", [("forwarded", "for=203.0.113.7")]) == "127.0.0.1"


def test_long_forwarding_chain(h11_client: httpx.Client) -> None:
    hops = ", ".join(["6.6.6.6"] + [f"10.0.{i // 250}.{i % 250}" for i in range(1000)])
    assert ip_via(h11_client, "ch", [("x-forwarded-for", hops)]) == "6.6.6.6"


# == 3. auth token ===========================================================


def test_bearer_token_is_a_secret_never_rendered(server: RunningServer, captured: Capture) -> None:
    tag = new_tag()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.get("/m/info", headers={"authorization": f"Bearer {TOKEN}", "x-test-tag": tag})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "Secret"
    assert body["token"] == TOKEN
    for text in body["renderings"]:
        assert TOKEN not in text
    assert "**" in body["renderings"][2]
    # Nothing the request logged shows it, whatever was passed to the logger.
    records = captured.for_tag(tag)
    assert len(records) == 2
    for line in captured.lines:
        assert TOKEN not in line
    for event in body["structlog"]:
        assert TOKEN not in repr(event)


def test_bearer_scheme_is_case_insensitive(h11_client: httpx.Client) -> None:
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = h11_client.get("/m/info", headers={"authorization": f"{scheme}  {TOKEN}"})
        assert r.json()["token"] == TOKEN


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"Basic dXNlcjpwYXNz",
        b"Bearer",
        b"Bearer\tabc.def",
        b"Token abc.def",
        b"Bearerabc.def",
        b"",
        "Bearer caf\u00e9".encode(),
        b"Bearer \xff\xfe\xfd",
        b"Bearer " + b"a" * 9000,
        b"\xff\xfe Bearer",
    ],
    ids=repr,
)
def test_no_usable_bearer_token(h11_client: httpx.Client, value: bytes | None) -> None:
    headers = {} if value is None else {"authorization": value}
    r = h11_client.get("/m/info", headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "NoneType"
    assert body["token"] is None


def test_secret_in_process() -> None:
    secret = Secret(TOKEN)
    assert secret.reveal() == TOKEN
    for text in (str(secret), repr(secret), f"{secret}", f"{secret!r}", format(secret)):
        assert TOKEN not in text
    assert secret == Secret(TOKEN)
    assert secret != Secret("other")
    ctx = ctxmiddleware.with_value(ctxmiddleware.background(), AUTH_TOKEN, secret)
    assert TOKEN not in str(ctx) and TOKEN not in repr(ctx)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


# == 4. values hook ==========================================================


def test_values_hook_is_visible_in_the_handler(client: httpx.Client) -> None:
    assert client.get("/m/info").json()["my_key"] == "/m/info"
    assert client.get("/m/sync").json()["my_key"] == "/m/sync"
    # Apps without the hook do not see it.
    assert client.get("/p/info").json()["my_key"] is None


# == 5. logging ==============================================================


@pytest.mark.parametrize("path", ["/m/info", "/m/sync"], ids=["async", "sync-threadpool"])
def test_logging_filter_in_a_request(server: RunningServer, captured: Capture, path: str) -> None:
    tag = new_tag()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.get(path, headers={"x-request-id": f"log-{tag}", "x-test-tag": tag})
    assert r.status_code == 200
    records = captured.for_tag(tag)
    assert len(records) == 2
    for record in records:
        assert record.request_id == f"log-{tag}"  # type: ignore[attr-defined]
        assert record.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
    lines = [line for line in captured.lines if f"tag={tag}" in line]
    assert lines and all(f"rid=log-{tag} ip=127.0.0.1" in line for line in lines)
    if path.endswith("sync"):
        assert not r.json()["thread"].startswith("server-")  # ran in a worker thread


def test_logging_filter_outside_a_request(captured: Capture) -> None:
    log.info("outside tag=outside")
    (record,) = captured.for_tag("outside")
    assert record.request_id == "-"  # type: ignore[attr-defined]
    assert record.client_ip == "-"  # type: ignore[attr-defined]

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RequestContextFilter(default="n/a").filter(record)
    assert record.request_id == "n/a"  # type: ignore[attr-defined]


def test_logging_filter_keeps_explicit_values(captured: Capture) -> None:
    # extra= wins over the context, as with the structlog processor.
    log.info("explicit tag=explicit-out", extra={"request_id": "job-7", "client_ip": "10.0.0.9"})
    ctx = ctxmiddleware.with_value(ctxmiddleware.background(), REQUEST_ID, "from-ctx")
    with ctxmiddleware.bind(ctx):
        log.info("explicit tag=explicit-in", extra={"request_id": "job-8"})
    (out,) = captured.for_tag("explicit-out")
    assert (out.request_id, out.client_ip) == ("job-7", "10.0.0.9")  # type: ignore[attr-defined]
    (inside,) = captured.for_tag("explicit-in")
    assert (inside.request_id, inside.client_ip) == ("job-8", "-")  # type: ignore[attr-defined]


def test_logging_filter_through_a_queue_listener(h11_client: httpx.Client) -> None:
    # The usual non-blocking set-up: the filter runs on the QueueHandler, in the
    # request; the listener's handler (with the filter too, for its format
    # string) runs in another thread, outside any request, and must keep them.
    import queue
    from logging.handlers import QueueHandler, QueueListener

    q: queue.Queue[logging.LogRecord] = queue.Queue()
    queue_handler = QueueHandler(q)
    queue_handler.addFilter(RequestContextFilter())
    final = Capture()
    listener = QueueListener(q, final)
    queued_log.addHandler(queue_handler)
    queued_log.setLevel(logging.INFO)
    listener.start()
    try:
        tag = new_tag()
        r = h11_client.get("/m/info", headers={"x-request-id": f"q-{tag}", "x-test-tag": tag})
        assert r.status_code == 200
    finally:
        queued_log.removeHandler(queue_handler)
        listener.stop()
    (record,) = final.for_tag(tag)
    assert record.request_id == f"q-{tag}"  # type: ignore[attr-defined]
    assert record.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
    assert f"rid=q-{tag} ip=127.0.0.1" in final.lines[0]


@pytest.mark.parametrize("path", ["/m/info", "/m/sync"], ids=["async", "sync-threadpool"])
def test_structlog_processor(h11_client: httpx.Client, path: str) -> None:
    r = h11_client.get(path, headers={"x-request-id": "slog-1"})
    (event,) = r.json()["structlog"]
    assert event["request_id"] == "slog-1"
    assert event["client_ip"] == "127.0.0.1"
    assert event["event"] == "in request"

    (outside,) = structlog_events("outside")
    assert "request_id" not in outside
    assert "client_ip" not in outside


def test_structlog_processor_keeps_explicit_values() -> None:
    ctx = ctxmiddleware.with_value(ctxmiddleware.background(), REQUEST_ID, "from-ctx")
    with ctxmiddleware.bind(ctx):
        out = add_request_context(None, "info", {"event": "e", "request_id": "explicit"})
    assert out["request_id"] == "explicit"


# == 6. sync endpoints =======================================================


@pytest.mark.parametrize("prefix", ["m", "a"])
def test_sync_starlette_endpoint_sees_the_request_ctx(client: httpx.Client, prefix: str) -> None:
    r = client.get(f"/{prefix}/sync", headers={"x-request-id": "sync-1"})
    body = r.json()
    assert body["is_current"]
    assert body["ctx_id"] == body["current_id"]
    assert body["request_id"] == body["current_request_id"] == "sync-1"
    assert r.headers["x-request-id"] == "sync-1"


def test_sync_fastapi_endpoint_sees_the_request_ctx(client: httpx.Client) -> None:
    r = client.get("/fa/sync", headers={"x-request-id": "fa-sync-1"})
    assert r.status_code == 200
    body = r.json()
    assert body["ctx_id"] == body["state_id"] == body["current_id"]
    assert body["request_id"] == body["current_request_id"] == "fa-sync-1"
    assert r.headers["x-request-id"] == "fa-sync-1"


# == 7. FastAPI ==============================================================


def test_fastapi_request_context_dependency(client: httpx.Client) -> None:
    r = client.get("/fa/dep", headers={"x-request-id": "fa-1"})
    assert r.status_code == 200
    assert r.json() == {"same": True, "request_id": "fa-1"}
    assert r.headers["x-request-id"] == "fa-1"


def test_fastapi_route_timeout(client: httpx.Client) -> None:
    t0 = time.monotonic()
    r = client.get("/fa/route-timeout", headers={"x-request-id": "fa-rt"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert r.headers["x-request-id"] == "fa-rt"
    assert 0.15 <= elapsed < 1.5, elapsed


def test_fastapi_exception_handler_sees_ctx(client: httpx.Client) -> None:
    r = client.get("/fa/value-error", headers={"x-request-id": "fa-err"})
    assert r.status_code == 422
    assert r.json() == {
        "is_current": True,
        "request_id": "fa-err",
        "alive": True,
        "error": "bad value",
    }
    assert r.headers.get_list("x-request-id") == ["fa-err"]


def test_fastapi_catch_all_handler_when_wrapped_whole(server: RunningServer) -> None:
    r = httpx.get(f"{server.url}/fw/boom", headers={"x-request-id": "fw-1"}, timeout=10)
    assert r.status_code == 500
    assert r.json() == {"custom": True, "is_current": True, "rid": "fw-1"}
    assert r.headers.get_list("x-request-id") == ["fw-1"]


def test_fastapi_request_context_in_a_websocket(h11: RunningServer) -> None:
    from websockets.sync.client import connect

    url = f"ws://{h11.host}:{h11.port}/fa/ws"
    with connect(url, additional_headers={"x-request-id": "fa-ws"}, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"same": True, "rid": "fa-ws"}


def test_request_context_without_middleware_is_an_error() -> None:
    from starlette.requests import HTTPConnection

    from ctxmiddleware._asgi._fastapi import request_context

    conn = HTTPConnection({"type": "http", "headers": [], "state": {}})
    with pytest.raises(RuntimeError, match="ContextMiddleware"):
        request_context(conn)


# == 8. BaseHTTPMiddleware inside the stack ==================================


def test_base_http_middleware_normal_request(client: httpx.Client) -> None:
    r = client.get("/b/info", headers={"x-request-id": "bhm-1"})
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == ["bhm-1"]
    assert r.headers["x-stamp"] == "same"
    body = r.json()
    assert body["request_id"] == "bhm-1"
    assert body["is_current"]


def test_base_http_middleware_disconnect_cancels_ctx(
    server: RunningServer, captured: Capture
) -> None:
    tag = new_tag()
    sock = server.connect()
    try:
        sock.sendall(
            raw_request("GET", "/b/hang", {"x-test-tag": tag, "x-request-id": f"gone-{tag}"})
        )
        assert BOARD.event(tag, "started").wait(5)
    finally:
        sock.close()
    ctx = BOARD.get(tag)["ctx"]
    assert BOARD.get(tag)["current_is_ctx"]
    t0 = time.monotonic()
    assert ctx.done().wait(2.5), "the client's disconnect did not cancel the ctx"
    assert time.monotonic() - t0 < 2.0
    assert isinstance(cause(ctx), ClientDisconnected)
    assert isinstance(ctx.err(), ctxmiddleware.Canceled)
    assert BOARD.event(tag, "finished").wait(5)
    values = BOARD.get(tag)
    assert "slept" not in values
    assert isinstance(values["cause_at_exit"], ClientDisconnected)
    # The middleware's 499 line is bound to the request too.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        gone = [r for r in captured.records if f"gone-{tag}" in r.getMessage()]
        if gone:
            break
        time.sleep(0.01)
    (record,) = gone
    assert " 499 " in record.getMessage()
    assert record.request_id == f"gone-{tag}"  # type: ignore[attr-defined]


# == 9. websockets and lifespan ==============================================


def test_websocket_ctx_per_connection(server: RunningServer) -> None:
    from websockets.sync.client import connect

    tags = [new_tag(), new_tag()]
    url = f"ws://{server.host}:{server.port}/ws/echo"
    infos = []
    for i, tag in enumerate(tags):
        headers = {"x-test-tag": tag, "x-request-id": f"ws-{i}"}
        if i == 0:
            headers["authorization"] = f"Bearer {TOKEN}"
        with connect(url, additional_headers=headers, open_timeout=5) as ws:
            # The handshake response carries the request id.
            assert ws.response is not None
            assert ws.response.headers.get_all("x-request-id") == [f"ws-{i}"]
            infos.append(json.loads(ws.recv(timeout=5)))
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
            ctx = BOARD.get(tag)["ctx"]
            assert not ctx.done().is_set()
        # The client closed: the handler's receive_text() saw the disconnect.
        assert BOARD.event(tag, "finished").wait(5)
        assert ctx.done().wait(2)
        values = BOARD.get(tag)
        assert values["done_at_disconnect"]
        assert isinstance(values["cause"], ClientDisconnected)
        assert isinstance(cause(ctx), ClientDisconnected)

    assert [info["request_id"] for info in infos] == ["ws-0", "ws-1"]
    assert all(info["client_ip"] == "127.0.0.1" and info["is_current"] for info in infos)
    assert infos[0]["token"] == TOKEN and infos[1]["token"] is None
    assert BOARD.get(tags[0])["ctx"] is not BOARD.get(tags[1])["ctx"]


def test_websocket_invalid_request_id_is_replaced(h11: RunningServer) -> None:
    from websockets.sync.client import connect

    url = f"ws://{h11.host}:{h11.port}/ws/echo"
    with connect(url, additional_headers={"x-request-id": "<bad id>"}, open_timeout=5) as ws:
        info = json.loads(ws.recv(timeout=5))
    assert_fresh_id(info["request_id"])


@pytest.mark.parametrize("kind", SERVERS)
def test_lifespan_passes_through(kind: str, captured: Capture) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        events.append("startup")
        log.info("lifespan tag=lifespan-%s", kind)
        yield {"thing": 42}
        events.append("shutdown")

    async def endpoint(request: Request) -> Response:
        ctx = request.state.ctx
        return JSONResponse(
            {
                "thing": request.state.thing,
                "request_id": ctx.value(REQUEST_ID),
                "is_current": current() is ctx,
            }
        )

    app = ContextMiddleware(Starlette(routes=[Route("/", endpoint)], lifespan=lifespan))
    options = {"lifespan": "on"} if kind.startswith("uvicorn") else {}
    with serve(app, kind, **options) as running:
        assert events == ["startup"]
        for _ in range(2):
            r = httpx.get(running.url + "/", headers={"x-request-id": "life-1"}, timeout=10)
            assert r.status_code == 200
            assert r.json() == {"thing": 42, "request_id": "life-1", "is_current": True}
            assert r.headers["x-request-id"] == "life-1"
    assert events == ["startup", "shutdown"]
    (record,) = captured.for_tag(f"lifespan-{kind}")
    assert record.request_id == "-"  # type: ignore[attr-defined]


# == 10. bad input ===========================================================


def test_non_latin_bytes_in_header_values(server: RunningServer) -> None:
    for prefix in ("m", "p", "f", "ch"):
        status, headers, body = send_raw(
            server,
            b"GET /" + prefix.encode() + b"/info HTTP/1.1\r\n"
            b"Host: test\r\n"
            b"Connection: close\r\n"
            b"x-request-id: \xc3\xa9\xff\xfe-abc\r\n"
            b"authorization: Bearer \xc3\xa9t\xff\r\n"
            b"x-forwarded-for: \xff\xfe, 203.0.113.7\xc3\xa9\r\n"
            b'forwarded: for="\xff\xfe"\r\n'
            b"x-request-timeout-ms: \xd9\xa3\xd9\xa3\r\n"
            b"x-other: \x80\x81\x82\r\n"
            b"\r\n",
        )
        assert status == 200, (prefix, body)
        (rid,) = header_values(headers, "x-request-id")
        assert_fresh_id(rid)
        info = json.loads(body)
        assert info["request_id"] == rid
        assert info["token"] is None
        assert info["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize(
    "value",
    ["abc", "-1", "1.5", "1e3", "99999999999", "", "1 2", "0x10", "+100", "\u0663"],
)
def test_garbage_timeout_header_is_ignored(h11_client: httpx.Client, value: str) -> None:
    r = h11_client.get("/m/info", headers={"x-request-timeout-ms": value.encode()})
    assert r.status_code == 200


def test_many_and_huge_headers(client: httpx.Client) -> None:
    headers = [(f"x-junk-{i}", "j" * 100) for i in range(60)]
    headers += [
        ("x-request-id", "r" * 2000),
        ("x-request-timeout-ms", "9" * 2000),
        ("authorization", "Bearer " + "t" * 2000),
        ("x-forwarded-for", ", ".join(["1.2.3.4"] * 200)),
        ("forwarded", "for=" + "x" * 1000),
    ]
    r = client.get("/m/info", headers=headers)
    assert r.status_code == 200
    assert_fresh_id(r.headers["x-request-id"])
    assert r.json()["client_ip"] == "127.0.0.1"
    r = client.get("/p/info", headers=headers)
    assert r.status_code == 200
    assert r.json()["client_ip"] == "1.2.3.4"


def test_oversized_headers_get_a_server_error_not_a_hang(server: RunningServer) -> None:
    # Past the server's limits: whatever it answers (431/400/200), it answers.
    data = raw_request("GET", "/m/info", [("x-request-id", "x" * 70_000), ("Connection", "close")])
    with server.connect() as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        sock.settimeout(5)
        try:
            first = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            first = b""
    assert first == b"" or first.startswith(b"HTTP/1.1 ")
    # The server is still fine.
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/m/info").status_code == 200


def test_spoofed_headers_everywhere(client: httpx.Client) -> None:
    spoof = {
        "x-forwarded-for": "1.1.1.1",
        "x-real-ip": "1.1.1.1",
        "forwarded": "for=1.1.1.1",
        "x-forwarded-host": "evil.example",
        "x-forwarded-proto": "https",
        "x-request-id": "spoof-ok",
        "authorization": "Bearer spoofed",
    }
    for prefix in ("m", "a", "c", "p", "u", "ch", "f", "b"):
        r = client.get(f"/{prefix}/info", headers=spoof)
        assert r.status_code == 200, prefix
        body = r.json()
        expected_ip = "1.1.1.1" if prefix in ("p", "ch", "f") else "127.0.0.1"
        assert body["client_ip"] == expected_ip, prefix


def test_request_without_client_address_and_bad_socket_data(h11: RunningServer) -> None:
    # Garbage that is not HTTP at all: the server answers or closes, nothing hangs.
    with h11.connect() as sock:
        sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)))
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError, TimeoutError, socket.timeout):
            sock.recv(65536)
    with httpx.Client(base_url=h11.url, timeout=10) as c:
        assert c.get("/m/info").status_code == 200


# -- bad configuration: a clear error at construction, not at the first request --


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": -1}, "timeout must be a positive number"),
        ({"timeout": float("nan")}, "timeout must be a positive number"),
        ({"timeout": float("inf")}, "timeout must be a positive number"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "10.0.0.0/33"),
        ({"trusted_proxies": ["not-an-ip"]}, "not-an-ip"),
        ({"forwarded_header": "x-real-ip"}, "forwarded_header must be"),
        ({"request_id_header": ""}, "request_id_header must not be empty"),
        ({"timeout_status": 42}, "timeout_status must be an HTTP status code"),
        ({"timeout_status": 600}, "timeout_status must be an HTTP status code"),
        ({"disconnect_grace": 0.5}, "disconnect_grace must be between"),
        ({"disconnect_grace": -0.001}, "disconnect_grace must be between"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ContextMiddleware(_noop_app, **options)


def test_good_options_are_kept() -> None:
    mw = ContextMiddleware(
        _noop_app,
        timeout=2,
        trusted_proxies=["10.0.0.0/8", "::1"],
        forwarded_header="Forwarded",
        request_id_header="X-Correlation-ID",
        timeout_status=503,
        disconnect_grace=0,
    )
    config = mw.config
    assert config.timeout == 2.0
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert config.request_id_header == b"x-correlation-id" and config.forwarded_rfc7239
    assert config.timeout_status == 503 and config.disconnect_grace == 0
