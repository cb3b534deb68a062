"""``python -m ctxmiddleware``: the version, the optional integrations found, and
a short self-check (a deadline, a cancellation, one request through
ContextMiddleware in process). Exit status 0 if every check passed."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from typing import Any

import ctxmiddleware
from ctxmiddleware import (
    REQUEST_ID,
    Canceled,
    ContextMiddleware,
    DeadlineExceeded,
    background,
    current,
    with_cancel,
    with_timeout,
)

_EXTRAS = {
    "starlette": "starlette",
    "fastapi": "fastapi",
    "asyncpg": "asyncpg",
    "psycopg": "psycopg",
    "sqlalchemy": "sqlalchemy",
    "aiosqlite": "aiosqlite",
    "httpx": "httpx",
    "structlog": "structlog",
    "flask": "flask",
    "django": "django",
}


async def _one_request() -> tuple[int, dict[bytes, bytes], str | None]:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["rid"] = current().value(REQUEST_ID)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "path": "/", "headers": [(b"x-request-id", b"self-check")], "client": ("127.0.0.1", 1),
    }
    await ContextMiddleware(app)(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), seen.get("rid")


def _checks() -> list[tuple[str, bool]]:
    results = []
    ctx, cancel = with_timeout(background(), 0.01)
    time.sleep(0.02)
    results.append(("a deadline passes (with_timeout)", isinstance(ctx.err(), DeadlineExceeded)))
    cancel()
    ctx, cancel = with_cancel(background())
    cancel()
    results.append(("a cancel is seen (with_cancel)", isinstance(ctx.err(), Canceled)))
    status, headers, rid = asyncio.run(_one_request())
    results.append((
        "a request through ContextMiddleware (request id in and out)",
        status == 200 and rid == "self-check" and headers.get(b"x-request-id") == b"self-check",
    ))
    return results


def main() -> int:
    print(f"ctxmiddleware {ctxmiddleware.__version__} (Python {sys.version.split()[0]})")
    found = [name for name, module in _EXTRAS.items() if importlib.util.find_spec(module)]
    print("integrations available: " + (", ".join(found) or "none (the core needs none)"))
    ok = True
    for what, passed in _checks():
        ok = ok and passed
        print(f"  [{'ok' if passed else 'FAILED'}] {what}")
    print("self-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
