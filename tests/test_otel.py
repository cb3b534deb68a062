"""OpenTelemetry spans marked with the outcome (issue 11, part 3): the SDK's
in-memory exporter under opentelemetry-instrumentation-asgi on a real uvicorn."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from servers import raw_request, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.asgi")

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

import ctxmiddleware
import ctxmiddleware.otel
from ctxmiddleware import ContextMiddleware


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    ctxmiddleware.disable_stats()
    ctxmiddleware.otel.instrument()
    yield InMemorySpanExporter()
    ctxmiddleware.otel.uninstrument()
    ctxmiddleware.disable_stats()


def build(exporter: InMemorySpanExporter, entered: threading.Event, timeout: float) -> Any:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def slow(request: Request) -> PlainTextResponse:
        entered.set()
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    app = Starlette(routes=[Route("/ok", ok), Route("/slow", slow)])
    app.add_middleware(ContextMiddleware, timeout=timeout)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


def server_span(exporter: InMemorySpanExporter, path: str, timeout: float = 5.0) -> ReadableSpan:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if span.kind is SpanKind.SERVER and path in span.name:
                return span
        time.sleep(0.02)
    names = [s.name for s in exporter.get_finished_spans()]
    raise AssertionError(f"no server span for {path}: {names}")


def wait(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_client_disconnect_marks_the_server_span(exporter: InMemorySpanExporter) -> None:
    entered = threading.Event()
    with serve(build(exporter, entered, timeout=20.0)) as server:
        assert httpx.get(server.url + "/ok", timeout=5).status_code == 200
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(raw_request("GET", "/slow"))
        assert entered.wait(5)
        sock.close()
        span = server_span(exporter, "/slow")
        done = server_span(exporter, "/ok")
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "client_disconnected"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "client_disconnected"
    assert attrs["ctxmiddleware.outcome"] == "client_disconnected"
    assert attrs["ctxmiddleware.cancel.cause"] == "ClientDisconnected"
    assert attrs["ctxmiddleware.deadline.budget_ms"] == 20000.0
    assert 19000 < float(attrs["ctxmiddleware.deadline.remaining_ms"]) < 20000  # type: ignore[arg-type]
    # A completed request's span is left as the instrumentation made it.
    assert done.status.status_code is StatusCode.UNSET
    assert "error.type" not in (done.attributes or {})
    assert "ctxmiddleware.outcome" not in (done.attributes or {})


def test_deadline_marks_the_server_span(exporter: InMemorySpanExporter) -> None:
    entered = threading.Event()
    with serve(build(exporter, entered, timeout=0.3)) as server:
        assert httpx.get(server.url + "/slow", timeout=5).status_code == 504
        span = server_span(exporter, "/slow")
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "deadline_exceeded"
    assert span.status.status_code is StatusCode.ERROR
    assert attrs["ctxmiddleware.outcome"] == "deadline"
    assert attrs["ctxmiddleware.deadline.budget_ms"] == 300.0
    assert attrs["ctxmiddleware.deadline.remaining_ms"] == 0.0
    assert attrs["ctxmiddleware.cancel.cause"] == "DeadlineExceeded"


def test_without_instrument_the_span_status_stays_unset() -> None:
    """The gap this fills: the ASGI instrumentation alone leaves a disconnect unmarked."""
    ctxmiddleware.disable_stats()
    exporter = InMemorySpanExporter()
    entered = threading.Event()
    with serve(build(exporter, entered, timeout=20.0)) as server:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(raw_request("GET", "/slow"))
        assert entered.wait(5)
        sock.close()
        span = server_span(exporter, "/slow")
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in (span.attributes or {})
