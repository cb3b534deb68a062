"""Apps for tests/test_hops.py (budget headers, queue time, trace ids), ASGI and
WSGI, importable by servers in other processes (gunicorn).

The first path segment picks the middleware configuration (CONFIGS); every
endpoint answers what the request context says (remaining budget, request
id, traceparent) as JSON. ``x-mark: <path>`` makes the handler create that
file, so a test can tell whether the handler ran at all.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from ctxmiddleware import (
    REQUEST_ID,
    TRACEPARENT,
    ContextMiddleware,
    WSGIContextMiddleware,
    current,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "d": {"timeout": 30},
    # Trusted front proxy (the tests' client is 127.0.0.1): X-Request-Start believed.
    "t": {"timeout": 5, "trusted_proxies": ["127.0.0.1"]},
    # Custom budget headers: grpc-timeout and x-request-timeout-ms off, x-deadline on.
    "x": {
        "timeout": 30,
        "budget_headers": {
            "grpc-timeout": None,
            "x-request-timeout-ms": None,
            "x-deadline": "grpc",
        },
    },
    "p": {"timeout": 30, "request_id_from_traceparent": True},
}


def info(headers: dict[str, str]) -> bytes:
    ctx = current()
    mark = headers.get("x-mark")
    if mark:
        pathlib.Path(mark).touch()
    return json.dumps(
        {
            "remaining": ctx.remaining(),
            "request_id": ctx.value(REQUEST_ID),
            "traceparent": ctx.value(TRACEPARENT),
        }
    ).encode()


def _wsgi_inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    body = info(headers)
    start_response("200 OK", [("content-type", "application/json")])
    return [body]


async def _asgi_inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    body = info(headers)
    await send(
        {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def _segment(path: str) -> str:
    return path.lstrip("/").split("/", 1)[0]


_WSGI = {name: WSGIContextMiddleware(_wsgi_inner, **opts) for name, opts in CONFIGS.items()}


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    return _WSGI[_segment(environ.get("PATH_INFO", "/"))](environ, start_response)


def make_asgi_app() -> Any:
    apps = {name: ContextMiddleware(_asgi_inner, **opts) for name, opts in CONFIGS.items()}

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await apps[_segment(scope["path"])](scope, receive, send)

    return asgi_app
