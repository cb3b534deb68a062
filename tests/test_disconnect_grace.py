"""The ``disconnect_grace`` option: how long a request runs before the
middleware starts watching it (the cancellation hook, the deadline timer,
the receive() watcher). In process, raw ASGI: the server's receive() answers
the (empty) body, then ``http.disconnect`` at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import ctxmiddleware
from ctxmiddleware import Canceled, ClientDisconnected, ContextMiddleware

WAIT = 5.0  # upper bound for anything the test waits for; reached only on failure

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"t")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 80),
}


def run_once(grace: float) -> dict[str, Any]:
    """One request whose client is gone from the start: what the app saw."""
    seen: dict[str, Any] = {"steps": 0}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ctx = ctxmiddleware.current()
        seen["started"] = time.monotonic()
        try:
            for _ in range(100_000):  # loop iterations, until cancelled
                await asyncio.sleep(0)
                seen["steps"] += 1
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            seen["cancelled"] = time.monotonic()
            seen["err"], seen["cause"] = ctx.err(), ctxmiddleware.cause(ctx)
            raise

    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        seen.setdefault("disconnect_read", time.monotonic())
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        seen.setdefault("sent", []).append(message)

    middleware = ContextMiddleware(app, timeout=30, disconnect_grace=grace)

    async def main() -> None:
        seen["called"] = time.monotonic()
        await asyncio.wait_for(middleware(dict(SCOPE), receive, send), WAIT)

    asyncio.run(main())
    return seen


def test_grace_zero_watches_at_once() -> None:
    """``disconnect_grace=0``: a disconnect right after the handler starts
    cancels it within a few loop iterations, whatever the clock says."""
    seen = run_once(0)
    assert "cancelled" in seen, f"never cancelled ({seen['steps']} loop iterations)"
    assert seen["steps"] < 20, seen["steps"]
    assert isinstance(seen["err"], Canceled)
    assert isinstance(seen["cause"], ClientDisconnected)


@pytest.mark.parametrize("grace", [0.001, 0.005])
def test_grace_delays_watching(grace: float) -> None:
    """A longer grace: nobody reads receive() (so the disconnect is not seen,
    and the handler runs on) until ``grace`` seconds after the request
    arrived; then the handler is cancelled."""
    seen = run_once(grace)
    assert "cancelled" in seen, f"never cancelled ({seen['steps']} loop iterations)"
    assert seen["disconnect_read"] - seen["called"] >= grace, (
        seen["disconnect_read"] - seen["called"]
    )
    assert seen["cancelled"] - seen["called"] >= grace
    assert isinstance(seen["cause"], ClientDisconnected)
