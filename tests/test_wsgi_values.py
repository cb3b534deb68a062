"""ONE table of request-value cases, run against both adapters.

Request id validation and echo (200, 500 and 504 included), trusted-proxy
client IP (and its spoofing), the bearer ``Secret``, the shorten-only budget
header and the per-route timeout must be identical under
``ContextMiddleware`` (ASGI, uvicorn) and ``WSGIContextMiddleware`` (WSGI,
gunicorn, waitress, werkzeug). The apps are in tests/wsgi_apps.py: one
middleware per configuration, selected by the first path segment.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from servers import RunningServer, read_response, serve
from wsgi_apps import CONFIGS, make_asgi_app
from wsgi_servers import serve_wsgi

pytestmark = pytest.mark.timeout(60)

HEX_UUID4 = re.compile(r"^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$")
FRESH = "<fresh uuid4>"
PEER = "127.0.0.1"
ID_128 = "a" * 128


@dataclass
class Case:
    name: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200
    request_id: str | None = None  # expected id (echoed and in the context); FRESH: a new one
    id_header: str = "x-request-id"
    client_ip: str | None = None
    token: str | None = "<unchecked>"
    max_remaining: float | None = None  # the context's remaining budget is at most this
    max_seconds: float | None = None  # the response came within this


CASES = [
    # -- request id --------------------------------------------------------
    Case("no id: a fresh uuid4", "/m/info", request_id=FRESH),
    Case("valid id kept and echoed", "/m/info", [("X-Request-ID", "abc-1.2_3:Z")],
         request_id="abc-1.2_3:Z"),
    Case("128 chars kept", "/m/info", [("x-request-id", ID_128)], request_id=ID_128),
    Case("129 chars replaced", "/m/info", [("x-request-id", ID_128 + "a")], request_id=FRESH),
    Case("space replaced", "/m/info", [("x-request-id", "bad id")], request_id=FRESH),
    Case("latin-1 replaced", "/m/info", [("x-request-id", "caf\xe9")], request_id=FRESH),
    Case("log injection replaced", "/m/info", [("x-request-id", "a%0d%0ab")], request_id=FRESH),
    Case("two ids: the first", "/m/info", [("x-request-id", "first"), ("x-request-id", "second")],
         request_id="first"),
    Case("custom id header", "/c/info",
         [("X-Correlation-ID", "corr-7"), ("x-request-id", "ignored")],
         request_id="corr-7", id_header="x-correlation-id"),
    Case("500 carries the id", "/m/boom", [("x-request-id", "boom-1")], status=500,
         request_id="boom-1"),
    # -- client ip -----------------------------------------------------------
    Case("peer by default", "/m/info", client_ip=PEER),
    Case("spoofed XFF ignored without trusted proxies", "/m/info",
         [("X-Forwarded-For", "6.6.6.6")], client_ip=PEER),
    Case("XFF from a trusted peer", "/p/info", [("X-Forwarded-For", "1.2.3.4")],
         client_ip="1.2.3.4"),
    Case("only the trusted hop is believed", "/p/info",
         [("X-Forwarded-For", "6.6.6.6, 1.2.3.4")], client_ip="1.2.3.4"),
    Case("two XFF headers are one chain", "/p/info",
         [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "1.2.3.4")], client_ip="1.2.3.4"),
    Case("untrusted peer: XFF ignored", "/u/info", [("X-Forwarded-For", "1.2.3.4")],
         client_ip=PEER),
    Case("chain of trusted proxies", "/ch/info",
         [("X-Forwarded-For", "5.6.7.8, 10.1.1.1")], client_ip="5.6.7.8"),
    Case("chain stops at an untrusted hop", "/ch/info",
         [("X-Forwarded-For", "5.6.7.8, 11.1.1.1")], client_ip="11.1.1.1"),
    Case("garbage hop ends the walk", "/ch/info",
         [("X-Forwarded-For", "garbage, 10.1.1.1")], client_ip="10.1.1.1"),
    Case("v4-mapped v6 normalised", "/p/info", [("X-Forwarded-For", "::ffff:1.2.3.4")],
         client_ip="1.2.3.4"),
    Case("RFC 7239 Forwarded", "/f/info", [("Forwarded", 'for="[2001:db8::1]:4711"')],
         client_ip="2001:db8::1"),
    Case("zone id refused", "/p/info", [("X-Forwarded-For", "fe80::1%eth0")], client_ip=PEER),
    # -- bearer token --------------------------------------------------------
    Case("bearer token", "/m/info", [("Authorization", "Bearer abc.def")], token="abc.def"),
    Case("scheme is case-insensitive", "/m/info", [("Authorization", "bearer  t0k3n-zz")],
         token="t0k3n-zz"),
    Case("basic is not a bearer token", "/m/info", [("Authorization", "Basic eHl6")],
         token=None),
    Case("empty bearer", "/m/info", [("Authorization", "Bearer ")], token=None),
    Case("no authorization", "/m/info", token=None),
    # -- deadline --------------------------------------------------------------
    Case("budget shortens", "/m/info", [("x-request-timeout-ms", "1500")], max_remaining=1.5),
    Case("budget cannot extend", "/m/info", [("x-request-timeout-ms", "60000")],
         max_remaining=5.0),
    Case("smallest of two budgets", "/m/info",
         [("x-request-timeout-ms", "3000"), ("x-request-timeout-ms", "1000")], max_remaining=1.0),
    Case("garbage budget ignored", "/m/info", [("x-request-timeout-ms", "1e3")],
         max_remaining=5.0),
    Case("budget over 10 digits ignored", "/m/info", [("x-request-timeout-ms", "12345678901")],
         max_remaining=5.0),
    Case("budget 0: 504 at once", "/m/slow", [("x-request-timeout-ms", "0"),
                                              ("x-request-id", "spent")],
         status=504, request_id="spent", max_seconds=1.0),
    Case("budget reached: 504 with the id", "/m/slow",
         [("x-request-timeout-ms", "150"), ("x-request-id", "late-1")],
         status=504, request_id="late-1", max_seconds=2.0),
    Case("middleware timeout: 504", "/t/slow", status=504, request_id=FRESH, max_seconds=2.0),
    Case("route timeout shorter", "/m/route?timeout=0.1", status=504, request_id=FRESH,
         max_seconds=2.0),
    Case("route timeout longer than the middleware's", "/t/route?timeout=0.5", status=504,
         request_id=FRESH, max_seconds=3.0),
    Case("route timeout capped by the budget", "/m/route?timeout=3",
         [("x-request-timeout-ms", "100")], status=504, request_id=FRESH, max_seconds=2.0),
]

ADAPTERS = ["asgi-uvicorn", "wsgi-gunicorn-sync", "wsgi-waitress", "wsgi-werkzeug"]


@pytest.fixture(scope="module", params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    kind = request.param
    if kind == "asgi-uvicorn":
        with serve(make_asgi_app(), "uvicorn-h11") as running:
            yield running
    else:
        with serve_wsgi(kind.removeprefix("wsgi-")) as running:
            yield running


def send(server: RunningServer, path: str, headers: list[tuple[str, str]]) -> tuple[
    int, dict[str, list[str]], bytes
]:
    lines = [f"GET {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    with server.connect() as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        raw = read_response(sock, 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    out: dict[str, list[str]] = {}
    for line in rest:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    if out.get("transfer-encoding") == ["chunked"]:
        size, _, rest_body = body.partition(b"\r\n")
        body = rest_body[: int(size, 16)]
    return int(first.split()[1]), out, body


def test_the_configurations_are_shared() -> None:
    assert set(CONFIGS) == {"m", "c", "p", "u", "ch", "f", "t"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shared_values_table(adapter: RunningServer, case: Case) -> None:
    start = time.monotonic()
    status, headers, body = send(adapter, case.path, case.headers)
    elapsed = time.monotonic() - start
    assert status == case.status, body
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds
    echoed = headers.get(case.id_header, [])
    assert len(echoed) == 1, headers  # exactly one id, the one the logs carry
    if case.request_id == FRESH:
        assert HEX_UUID4.match(echoed[0]), echoed
    elif case.request_id is not None:
        assert echoed[0] == case.request_id
    if status != 200:
        return
    seen: dict[str, Any] = json.loads(body)
    assert seen["request_id"] == echoed[0]
    assert seen["is_current"] is True
    if case.client_ip is not None:
        assert seen["client_ip"] == case.client_ip
    if case.token != "<unchecked>":
        assert seen["token"] == case.token
        assert seen["token_type"] == ("Secret" if case.token else "NoneType")
        if case.token:
            assert not any(case.token in r for r in seen["renderings"])
    if case.max_remaining is not None:
        assert 0 < seen["remaining"] <= case.max_remaining
    if case.path.startswith("/m/"):
        assert seen["my_key"] == case.path.partition("?")[0]
