"""Budgets across hops: gRPC/Connect/Envoy budget headers, X-Request-Start queue
time from trusted proxies, the traceparent request-id fallback, through the
ASGI middleware (uvicorn) and the WSGI middleware (gunicorn, werkzeug).

The apps are in tests/hop_apps.py; the parsers are fuzzed in
tests/test_wire_fuzz.py.
"""

from __future__ import annotations

import pathlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hop_apps import make_asgi_app
from servers import RunningServer, serve
from wsgi_servers import serve_wsgi

pytestmark = pytest.mark.timeout(60)

ADAPTERS = ["asgi-uvicorn", "wsgi-gunicorn-gthread", "wsgi-werkzeug"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module", params=ADAPTERS)
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    kind = request.param
    if kind == "asgi-uvicorn":
        with serve(make_asgi_app(), "uvicorn-h11") as running:
            yield running
    else:
        with serve_wsgi(kind.removeprefix("wsgi-"), "hop_apps:wsgi_app") as running:
            yield running


def get(server: RunningServer, path: str, headers: list[tuple[str, str]]) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        return client.get(path, headers=headers)


def remaining(server: RunningServer, path: str, *headers: tuple[str, str]) -> float:
    response = get(server, path, list(headers))
    assert response.status_code == 200, response.text
    value = response.json()["remaining"]
    assert isinstance(value, float)
    return value


# (path, headers, the budget the context must get: at most this, and within 0.5 s of it)
BUDGET_CASES: list[tuple[str, list[tuple[str, str]], float]] = [
    ("/d/", [], 30),
    ("/d/", [("grpc-timeout", "2S")], 2),
    ("/d/", [("grpc-timeout", "1500m")], 1.5),
    ("/d/", [("grpc-timeout", "3000000u")], 3),
    ("/d/", [("grpc-timeout", "99999999n")], 0.1),
    ("/d/", [("grpc-timeout", "2500000000n")], 30),  # 10 digits: garbage
    ("/d/", [("grpc-timeout", "1M")], 30),  # shorten only: 60 s > 30 s
    ("/d/", [("grpc-timeout", "1H")], 30),
    ("/d/", [("connect-timeout-ms", "2000")], 2),
    ("/d/", [("x-envoy-expected-rq-timeout-ms", "2500")], 2.5),
    ("/d/", [("x-request-timeout-ms", "3000")], 3),
    # Several: the smallest wins, whatever the order.
    ("/d/", [("x-request-timeout-ms", "5000"), ("grpc-timeout", "1S"),
             ("connect-timeout-ms", "3000")], 1),
    ("/d/", [("connect-timeout-ms", "1200"), ("x-envoy-expected-rq-timeout-ms", "15000")], 1.2),
    # Garbage is ignored, never guessed at.
    ("/d/", [("grpc-timeout", "1s")], 30),
    ("/d/", [("grpc-timeout", "123456789S")], 30),  # 9 digits
    ("/d/", [("grpc-timeout", "-1S")], 30),
    ("/d/", [("grpc-timeout", "1.5S")], 30),
    ("/d/", [("grpc-timeout", "S")], 30),
    ("/d/", [("grpc-timeout", "2")], 30),
    ("/d/", [("connect-timeout-ms", "12345678901")], 30),  # 11 digits
    ("/d/", [("connect-timeout-ms", "1e3")], 30),
    ("/d/", [("x-envoy-expected-rq-timeout-ms", "-5")], 30),
    ("/d/", [("grpc-timeout", "soon"), ("connect-timeout-ms", "2000")], 2),
    # Renamed and disabled headers (budget_headers=).
    ("/x/", [("grpc-timeout", "1S")], 30),
    ("/x/", [("x-request-timeout-ms", "1000")], 30),
    ("/x/", [("x-deadline", "2S")], 2),
    ("/x/", [("connect-timeout-ms", "1500")], 1.5),  # the defaults not named stay
]


@pytest.mark.parametrize(
    ("path", "headers", "budget"), BUDGET_CASES, ids=[repr(c[1])[:60] for c in BUDGET_CASES]
)
def test_budget_headers(
    server: RunningServer, path: str, headers: list[tuple[str, str]], budget: float
) -> None:
    left = remaining(server, path, *headers)
    assert budget - 0.5 < left <= budget


@pytest.mark.parametrize("header", ["grpc-timeout", "connect-timeout-ms"])
def test_budget_spent_on_arrival_is_504(server: RunningServer, header: str) -> None:
    value = "0n" if header == "grpc-timeout" else "0"
    response = get(server, "/d/", [(header, value)])
    assert response.status_code == 504


# -- X-Request-Start ----------------------------------------------------------------


def _start(seconds_ago: float, unit: str) -> str:
    t = time.time() - seconds_ago
    if unit == "s":
        return f"t={t:.3f}"
    if unit == "ms":
        return f"t={int(t * 1000)}"
    if unit == "us":
        return f"t={int(t * 1_000_000)}"
    return str(int(t * 1000))  # Heroku: bare milliseconds


@pytest.mark.parametrize("unit", ["s", "ms", "us", "bare-ms"])
def test_queue_time_from_a_trusted_proxy_counts(server: RunningServer, unit: str) -> None:
    left = remaining(server, "/t/", ("x-request-start", _start(1.0, unit)))
    assert 3.5 < left <= 4.0  # timeout 5 s, 1 s spent in the queue


def test_queue_time_counts_against_the_callers_budget_too(server: RunningServer) -> None:
    left = remaining(
        server, "/t/", ("x-request-start", _start(1.0, "ms")), ("x-request-timeout-ms", "3000")
    )
    assert 1.5 < left <= 2.0


def test_queue_time_from_an_untrusted_peer_is_ignored(server: RunningServer) -> None:
    left = remaining(server, "/d/", ("x-request-start", _start(2.0, "ms")))
    assert left > 29.5


@pytest.mark.parametrize(
    "value", ["t=abc", "t=", "t=-1700000000", "t=12", "t=1.2.3", "soon", "future", "old"]
)
def test_garbage_or_future_request_start_is_ignored(server: RunningServer, value: str) -> None:
    if value == "future":  # the proxy's clock ahead of ours: no queue
        value = _start(-60, "ms")
    elif value == "old":  # more than an hour back: clock trouble, not a queue
        value = _start(7200, "ms")
    left = remaining(server, "/t/", ("x-request-start", value))
    assert 4.5 < left <= 5.0


@pytest.mark.parametrize("unit", ["s", "ms", "us"])
def test_budget_spent_in_the_queue_is_504_without_the_handler(
    server: RunningServer, unit: str, tmp_path: pathlib.Path
) -> None:
    mark = tmp_path / f"ran-{uuid.uuid4().hex}"
    response = get(
        server, "/t/", [("x-request-start", _start(10.0, unit)), ("x-mark", str(mark))]
    )
    assert response.status_code == 504
    assert not mark.exists()
    # The same request without the queue runs the handler.
    response = get(server, "/t/", [("x-mark", str(mark))])
    assert response.status_code == 200 and mark.exists()


# -- traceparent ----------------------------------------------------------------


def _info(server: RunningServer, path: str, *headers: tuple[str, str]) -> dict[str, Any]:
    response = get(server, path, list(headers))
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    assert response.headers["x-request-id"] == data["request_id"]
    return data


def test_traceparent_is_a_request_value(server: RunningServer) -> None:
    data = _info(server, "/d/", ("traceparent", TRACEPARENT))
    assert data["traceparent"] == TRACEPARENT
    assert data["request_id"] != TRACE_ID  # the fallback is off by default
    assert _info(server, "/d/")["traceparent"] is None


@pytest.mark.parametrize(
    "bad",
    [
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID}-0000000000000000-01",  # all-zero parent id
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",  # upper case
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",  # version 00 is exactly 55 chars
        f"00-{TRACE_ID}-00f067aa0ba902b7",
        "garbage",
    ],
)
def test_invalid_traceparent_is_ignored(server: RunningServer, bad: str) -> None:
    data = _info(server, "/p/", ("traceparent", bad))
    assert data["traceparent"] is None
    assert len(data["request_id"]) == 32 and data["request_id"] != TRACE_ID


def test_request_id_falls_back_to_the_trace_id(server: RunningServer) -> None:
    assert _info(server, "/p/", ("traceparent", TRACEPARENT))["request_id"] == TRACE_ID
    # A valid x-request-id wins; an invalid one falls back to the trace id.
    data = _info(server, "/p/", ("traceparent", TRACEPARENT), ("x-request-id", "mine-1"))
    assert data["request_id"] == "mine-1"
    data = _info(server, "/p/", ("traceparent", TRACEPARENT), ("x-request-id", "bad id"))
    assert data["request_id"] == TRACE_ID
    # A later version may carry more fields.
    later = f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-comes-next"
    assert _info(server, "/p/", ("traceparent", later))["request_id"] == TRACE_ID


def test_options_are_checked() -> None:
    from ctxmiddleware import ContextMiddleware, WSGIContextMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    for middleware in (ContextMiddleware, WSGIContextMiddleware):
        with pytest.raises(TypeError, match="budget_headers"):
            middleware(app, budget_headers=["grpc-timeout"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="budget_headers"):
            middleware(app, budget_headers={"grpc-timeout": "seconds"})
        with pytest.raises(ValueError, match="header name"):
            middleware(app, budget_headers={"bad name": "ms"})
        with pytest.raises(ValueError, match="already read"):
            middleware(app, budget_headers={"x-request-id": "ms"})
        with pytest.raises(ValueError, match="header name"):
            middleware(app, request_start_header="a b")
        with pytest.raises(TypeError, match="request_id_from_traceparent"):
            middleware(app, request_id_from_traceparent="yes")  # type: ignore[arg-type]
        # Nothing to read: every budget header off.
        middleware(
            app,
            budget_headers={
                "x-request-timeout-ms": None,
                "grpc-timeout": None,
                "connect-timeout-ms": None,
                "x-envoy-expected-rq-timeout-ms": None,
            },
        )


def test_the_readme_table_lists_every_header() -> None:
    from ctxmiddleware._request._config import DEFAULT_BUDGET_HEADERS

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Across services", 1)[1].split("\n## ", 1)[0]
    names = [
        "x-request-timeout-ms", *DEFAULT_BUDGET_HEADERS, "X-Request-Start", "x-request-id",
        "traceparent", "grpc-timeout", "x-envoy-upstream-rq-timeout-ms", "expires", "_expires",
    ]
    for name in names:
        assert f"| `{name}`" in section or f"`{name}`" in section, name
