"""Issue 13, defect 6: bad arguments fail at the call, with a clear TypeError or
ValueError, never later (in a thread, at request time) or oddly (AttributeError,
OverflowError, a NaN deadline)."""

from __future__ import annotations

import asyncio
import datetime
import math
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import PlainTextResponse

import ctxmiddleware
from ctxmiddleware import (
    ContextMiddleware,
    DeadlineExceeded,
    RouteTimeout,
    after_func,
    background,
    cause,
    set_request_timeout,
    with_cancel,
    with_deadline,
    with_deadline_cause,
    with_timeout,
    with_timeout_cause,
)

bg = background()


# -- RouteTimeout ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (math.nan, ValueError),
        (-1, ValueError),
        (0, ValueError),
        (0.0, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (10**400, ValueError),
        (datetime.timedelta(0), ValueError),
        (datetime.timedelta(seconds=-5), ValueError),
        ("abc", TypeError),
        ("5", TypeError),
        (True, TypeError),
        ([5], TypeError),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_route_timeout_rejects_at_construction(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="RouteTimeout"):
        RouteTimeout(value)
    with pytest.raises(error, match="route_timeout"):
        ctxmiddleware.route_timeout(value)


def test_route_timeout_good_values_apply() -> None:
    """Good values are kept: the route's own deadline is the one the handler sees."""
    app = FastAPI()
    seen: dict[str, float | None] = {}

    @app.get("/long", dependencies=[RouteTimeout(120)])
    async def long() -> PlainTextResponse:
        seen["long"] = ctxmiddleware.current().remaining()
        return PlainTextResponse("ok")

    @app.get("/short", dependencies=[RouteTimeout(datetime.timedelta(milliseconds=50))])
    async def short() -> PlainTextResponse:
        await asyncio.sleep(1)
        return PlainTextResponse("late")

    @app.get("/none", dependencies=[RouteTimeout(None)])
    async def none() -> PlainTextResponse:
        seen["none"] = ctxmiddleware.current().remaining()
        return PlainTextResponse("ok")

    async def main() -> None:
        transport = httpx.ASGITransport(app=ContextMiddleware(app, timeout=5))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/long")).status_code == 200
            assert (await client.get("/short")).status_code == 504
            assert (await client.get("/none")).status_code == 200

    asyncio.run(main())
    long_left = seen["long"]
    assert long_left is not None and 100 < long_left <= 120
    assert seen["none"] is None


# -- set_request_timeout -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, ValueError), (-1, ValueError), (0, ValueError), (math.inf, ValueError),
     ("5", TypeError), (True, TypeError), (10**400, ValueError)],
    ids=lambda v: repr(v)[:24],
)
def test_set_request_timeout_rejects_before_looking_for_the_request(
    value: Any, error: type[Exception]
) -> None:
    # Outside a request a good value raises RuntimeError: the bad one is
    # rejected first, for what it is.
    with pytest.raises(error, match="timeout"):
        set_request_timeout(value)


def test_set_request_timeout_nan_inside_a_request_keeps_the_deadline() -> None:
    errors: list[BaseException] = []
    deadlines: list[float | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            set_request_timeout(math.nan)
        except ValueError as exc:
            errors.append(exc)
        deadlines.append(ctxmiddleware.current().deadline())
        await PlainTextResponse("ok")(scope, receive, send)

    async def main() -> None:
        transport = httpx.ASGITransport(app=ContextMiddleware(app, timeout=5))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).status_code == 200

    asyncio.run(main())
    assert len(errors) == 1
    deadline = deadlines[0]
    assert deadline is not None and math.isfinite(deadline)


# -- after_func, cause ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [None, 42, "print"], ids=repr)
def test_after_func_needs_a_callable(fn: Any) -> None:
    ctx, cancel = with_cancel(bg)
    with pytest.raises(TypeError, match="callable"):
        after_func(ctx, fn)
    cancel()


@pytest.mark.parametrize("ctx", [None, 42, "ctx", object()], ids=repr)
def test_after_func_needs_a_context(ctx: Any) -> None:
    with pytest.raises(TypeError):
        after_func(ctx, lambda: None)


@pytest.mark.parametrize("ctx", [None, 42, "ctx", object()], ids=repr)
def test_cause_needs_a_context(ctx: Any) -> None:
    with pytest.raises(TypeError, match="Context"):
        cause(ctx)


# -- Done.wait -------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [1e10, math.inf, 10**30])
def test_wait_accepts_any_long_timeout_on_background(timeout: float) -> None:
    """background().done() never fires: the wait blocks (no OverflowError)."""
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            bg.done().wait(timeout)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(0.1)
    assert raised == []
    assert thread.is_alive()  # still waiting, as it should (a daemon: left behind)


@pytest.mark.parametrize("timeout", [1e10, math.inf, 10**30])
def test_wait_accepts_any_long_timeout_on_a_live_context(timeout: float) -> None:
    ctx, cancel = with_cancel(bg)
    threading.Timer(0.02, cancel).start()
    assert ctx.done().wait(timeout) is True


@pytest.mark.parametrize("done", [False, True])
def test_wait_short_timeouts_both_kinds(done: bool) -> None:
    ctx, cancel = with_cancel(bg)
    if done:
        cancel()
    for c in (bg, ctx):
        expected = done and c is ctx
        assert c.done().wait(0) is expected
        assert c.done().wait(-1) is expected  # like threading.Event.wait: just check
        assert c.done().wait(0.001) is expected
    cancel()


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(math.nan, ValueError), ("1", TypeError), (b"1", TypeError), (True, TypeError),
     ([1], TypeError), (10**400, ValueError)],
    ids=lambda v: repr(v)[:24],
)
def test_wait_rejects_bad_timeouts_on_both_kinds(timeout: Any, error: type[Exception]) -> None:
    ctx, cancel = with_cancel(bg)
    for c in (bg, ctx):
        t0 = time.monotonic()
        with pytest.raises(error, match="timeout"):
            c.done().wait(timeout)
        assert time.monotonic() - t0 < 0.5
    cancel()


# -- with_timeout / with_deadline --------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "error"),
    [("5", TypeError), (b"5", TypeError), (None, TypeError), (True, TypeError),
     ([5], TypeError), (10**400, ValueError), (-(10**400), ValueError), (math.nan, ValueError)],
    ids=lambda v: repr(v)[:24],
)
def test_with_timeout_rejects(timeout: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout"):
        with_timeout(bg, timeout)
    with pytest.raises(error, match="timeout"):
        with_timeout_cause(bg, timeout, RuntimeError("why"))


def test_with_timeout_good_values() -> None:
    for timeout in (5, 5.0, datetime.timedelta(seconds=5), math.inf, 10**9, 1e300):
        ctx, cancel = with_timeout(bg, timeout)
        assert ctx.err() is None
        cancel()
    ctx, cancel = with_timeout(bg, -1)  # already expired, as in Go
    assert isinstance(ctx.err(), DeadlineExceeded)
    cancel()
    # Twenty years is a long timeout, not a clock mistake: only absolute
    # deadlines are checked against the clock.
    ctx, cancel = with_timeout(bg, 20 * 365 * 86400)
    assert ctx.err() is None
    cancel()


def test_with_deadline_rejects_a_wall_clock_instant() -> None:
    for fn in (
        lambda: with_deadline(bg, time.time() + 5),
        lambda: with_deadline_cause(bg, time.time() + 5, RuntimeError("why")),
    ):
        with pytest.raises(ValueError, match=r"time\.monotonic\(\)") as info:
            fn()
        assert "time.time()" in str(info.value)


def test_with_deadline_good_and_bad_values() -> None:
    now = time.monotonic()
    for when in (now + 5, now + 9 * 365 * 86400, math.inf, now - 1, -math.inf):
        _, cancel = with_deadline(bg, when)
        cancel()
    for bad, error in (("5", TypeError), (None, TypeError), (math.nan, ValueError),
                       (10**400, ValueError), (now + 11 * 365.25 * 86400, ValueError)):
        with pytest.raises(error, match="deadline"):
            with_deadline(bg, bad)


# -- the middleware's options (RequestConfig) ---------------------------------------------


@pytest.mark.parametrize(
    "name", ["x\r\ny", "x\ny", "x y", "x:y", "", "  ", "x\x00y", "é"], ids=repr
)
def test_request_id_header_must_be_a_header_name(name: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="request_id_header"):
        ContextMiddleware(app, request_id_header=name)
    with pytest.raises(ValueError, match="timeout_header"):
        ContextMiddleware(app, timeout_header=name)


def test_request_id_header_not_a_str() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="request_id_header"):
        ContextMiddleware(app, request_id_header=b"x-id")  # type: ignore[arg-type]
