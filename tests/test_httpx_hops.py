"""The httpx integration across hops: grpc-timeout and (optionally)
x-envoy-upstream-rq-timeout-ms go out with x-request-timeout-ms, rounded down;
the inbound traceparent is forwarded untouched. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import RunningServer, serve

import ctxmiddleware
from ctxmiddleware import ContextMiddleware, background, with_timeout
from ctxmiddleware._core import parse_grpc_timeout

pytestmark = pytest.mark.timeout(60)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the request headers it got, as JSON."""
    if scope["type"] != "http":
        return
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(headers).encode()})


@pytest.fixture(scope="module")
def downstream() -> Iterator[RunningServer]:
    with serve(echo) as running:
        yield running


def front_app(downstream_url: str, **client_options: Any) -> Any:
    """A service with ContextMiddleware that calls ``downstream`` and answers what it saw."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with ctxmiddleware.httpx_async_client(**client_options) as client:
            seen = (await client.get(downstream_url)).content
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": seen})

    return ContextMiddleware(app, timeout=30)


def sent_async(url: str, timeout: float | None, headers: Any = None, **options: Any) -> Any:
    async def main() -> Any:
        ctx = background()
        if timeout is not None:
            ctx, _cancel = with_timeout(ctx, timeout)
        async with ctxmiddleware.httpx_async_client(**options) as client:
            r = await client.get(url, headers=headers, extensions={"ctx": ctx})
        return r.json()

    return asyncio.run(main())


def sent_sync(url: str, timeout: float | None, headers: Any = None, **options: Any) -> Any:
    ctx = background()
    if timeout is not None:
        ctx, _cancel = with_timeout(ctx, timeout)
    with ctxmiddleware.httpx_client(**options) as client:
        return client.get(url, headers=headers, extensions={"ctx": ctx}).json()


SENDERS = {"async": sent_async, "sync": sent_sync}


@pytest.mark.parametrize("mode", SENDERS)
def test_grpc_timeout_goes_with_the_budget(downstream: RunningServer, mode: str) -> None:
    got = SENDERS[mode](downstream.url, 2.0)
    ms = int(got["x-request-timeout-ms"])
    grpc = parse_grpc_timeout(got["grpc-timeout"])
    assert 1500 < ms <= 1990
    assert grpc is not None and 1.5 < grpc <= 1.99
    # Rounded down, in the finest unit that fits 8 digits: microseconds for ~2 s.
    assert got["grpc-timeout"].endswith("u") and len(got["grpc-timeout"]) <= 9
    # The two say the same budget (measured at the same moment, to the ms).
    assert abs(grpc - ms / 1000) < 0.002
    assert "x-envoy-upstream-rq-timeout-ms" not in got


@pytest.mark.parametrize("mode", SENDERS)
def test_envoy_upstream_timeout_is_an_option(downstream: RunningServer, mode: str) -> None:
    got = SENDERS[mode](downstream.url, 2.0, envoy_upstream_timeout=True)
    assert 1500 < int(got["x-envoy-upstream-rq-timeout-ms"]) <= 1990
    got = SENDERS[mode](downstream.url, 2.0, grpc_timeout=False)
    assert "grpc-timeout" not in got and "x-request-timeout-ms" in got


@pytest.mark.parametrize("mode", SENDERS)
def test_a_shorter_caller_grpc_timeout_stands(downstream: RunningServer, mode: str) -> None:
    got = SENDERS[mode](
        downstream.url, 2.0, {"grpc-timeout": "100m", "x-envoy-upstream-rq-timeout-ms": "50"},
        envoy_upstream_timeout=True,
    )
    assert got["grpc-timeout"] == "100m"
    assert got["x-envoy-upstream-rq-timeout-ms"] == "50"
    got = SENDERS[mode](downstream.url, 2.0, {"grpc-timeout": "1H"})  # longer: replaced
    grpc = parse_grpc_timeout(got["grpc-timeout"])
    assert grpc is not None and grpc <= 2.0
    got = SENDERS[mode](downstream.url, 2.0, {"grpc-timeout": "garbage"})
    grpc = parse_grpc_timeout(got["grpc-timeout"])
    assert grpc is not None and grpc <= 2.0


@pytest.mark.parametrize("mode", SENDERS)
def test_no_deadline_no_budget_headers(downstream: RunningServer, mode: str) -> None:
    got = SENDERS[mode](downstream.url, None, envoy_upstream_timeout=True)
    assert not {"grpc-timeout", "x-request-timeout-ms", "x-envoy-upstream-rq-timeout-ms"} & set(got)
    assert "traceparent" not in got


def test_traceparent_and_budget_cross_a_service(downstream: RunningServer) -> None:
    with serve(front_app(downstream.url)) as front:
        got = httpx.get(
            front.url, headers={"traceparent": TRACEPARENT, "grpc-timeout": "3S"}, timeout=10
        ).json()
        assert got["traceparent"] == TRACEPARENT  # untouched
        grpc = parse_grpc_timeout(got["grpc-timeout"])
        assert grpc is not None and 2.5 < grpc <= 3.0  # the inbound gRPC budget, carried on
        assert 2500 < int(got["x-request-timeout-ms"]) <= 3000
        # No inbound traceparent (or an invalid one): none goes out.
        got = httpx.get(front.url, headers={"traceparent": "00-zz"}, timeout=10).json()
        assert "traceparent" not in got


def test_a_callers_own_traceparent_is_kept(downstream: RunningServer) -> None:
    mine = "00-11111111111111111111111111111111-2222222222222222-00"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with ctxmiddleware.httpx_async_client() as client:
            seen = (await client.get(downstream.url, headers={"traceparent": mine})).content
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": seen})

    with serve(ContextMiddleware(app)) as front:
        got = httpx.get(front.url, headers={"traceparent": TRACEPARENT}, timeout=10).json()
    assert got["traceparent"] == mine
