"""The one translation of a driver's error into ``ctx.err()`` (``_core/_driver_errors.py``).

``raise_if_done``, ``errors_as_ctx_err`` and ``async_errors_as_ctx_err`` are
what every integration (and the ASGI adapter) uses to report "the driver
failed because the context was done" as ``ctx.err()``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType

import httpx
import pytest

from ctxmiddleware._core import (
    Canceled,
    Context,
    DeadlineExceeded,
    async_errors_as_ctx_err,
    background,
    errors_as_ctx_err,
    raise_if_done,
    with_cancel,
    with_timeout,
)


class DriverError(Exception):
    """What a driver raises when the context's cancel reaches it."""


def _frames(tb: TracebackType | None) -> int:
    return len(traceback.extract_tb(tb))


def _cancelled() -> Context:
    ctx, cancel = with_cancel(background())
    cancel()
    return ctx


def _expired() -> Context:
    ctx, _cancel = with_timeout(background(), 0.001)
    time.sleep(0.01)
    assert isinstance(ctx.err(), DeadlineExceeded)
    return ctx


def _via_function(ctx: Context, exc: Exception) -> None:
    try:
        raise exc
    except DriverError as caught:
        raise_if_done(ctx, caught)
        raise


def _via_sync_cm(ctx: Context, exc: Exception) -> None:
    with errors_as_ctx_err(ctx):
        raise exc


def _via_async_cm(ctx: Context, exc: Exception) -> None:
    async def run() -> None:
        async with async_errors_as_ctx_err(ctx):
            await asyncio.sleep(0)
            raise exc

    asyncio.run(run())


WAYS = pytest.mark.parametrize(
    "translate",
    [_via_function, _via_sync_cm, _via_async_cm],
    ids=["raise_if_done", "errors_as_ctx_err", "async_errors_as_ctx_err"],
)


@WAYS
@pytest.mark.parametrize("make_ctx", [_cancelled, _expired], ids=["canceled", "deadline"])
def test_done_context_raises_its_err_chained_to_the_driver_error(
    translate: Callable[[Context, Exception], None], make_ctx: Callable[[], Context]
) -> None:
    ctx = make_ctx()
    err = ctx.err()
    assert err is not None
    driver_error = DriverError("canceling statement due to user request")
    with pytest.raises(type(err)) as info:
        translate(ctx, driver_error)
    assert info.value is err
    assert info.value.__cause__ is driver_error
    assert info.value.__suppress_context__


@WAYS
def test_traceback_of_the_shared_err_does_not_grow(
    translate: Callable[[Context, Exception], None],
) -> None:
    # err() is one instance per context: raised without a fresh traceback, each
    # raise would append its frames to the previous raise's traceback.
    ctx = _cancelled()
    sizes = []
    for i in range(50):
        with pytest.raises(Canceled) as info:
            translate(ctx, DriverError(i))
        assert info.value is ctx.err()
        assert info.value.__cause__ is not None and info.value.__cause__.args == (i,)
        sizes.append(_frames(info.value.__traceback__))
    assert max(sizes) <= 20, sizes
    assert sizes[-1] == sizes[0], sizes


@WAYS
def test_not_done_leaves_the_exception_untouched(
    translate: Callable[[Context, Exception], None],
) -> None:
    ctx, cancel = with_cancel(background())
    driver_error = DriverError("connection reset")
    with pytest.raises(DriverError) as info:
        translate(ctx, driver_error)
    assert info.value is driver_error
    assert info.value.__cause__ is None
    cancel()


def test_raise_if_done_returns_when_not_done() -> None:
    ctx, cancel = with_cancel(background())
    raise_if_done(ctx, DriverError())  # returns: the caller re-raises
    raise_if_done(background(), DriverError())
    cancel()


def _via_function_catching_oserror(ctx: Context, exc: Exception) -> None:
    try:
        raise exc
    except OSError as caught:  # what the httpx integration catches
        raise_if_done(ctx, caught)
        raise


@pytest.mark.parametrize(
    "translate",
    [_via_function_catching_oserror, _via_sync_cm, _via_async_cm],
    ids=["raise_if_done", "errors_as_ctx_err", "async_errors_as_ctx_err"],
)
def test_the_contexts_own_error_is_not_chained_to_itself(
    translate: Callable[[Context, Exception], None],
) -> None:
    # DeadlineExceeded is an OSError (TimeoutError): an ``except OSError`` in a
    # driver integration catches the context's own error too.
    ctx = _expired()
    err = ctx.err()
    assert err is not None
    with pytest.raises(DeadlineExceeded) as info:
        translate(ctx, err)
    assert info.value is err
    assert info.value.__cause__ is None


def test_raise_if_done_passes_the_same_kind_of_error_through() -> None:
    ctx = _cancelled()
    other = Canceled("a child's cancellation")
    raise_if_done(ctx, other)  # returns: ``other`` already says "canceled"
    assert other.__cause__ is None
    raise_if_done(ctx, ctx.err())  # type: ignore[arg-type]


def test_check_inside_the_block_passes_through_unchanged() -> None:
    ctx = _cancelled()
    with pytest.raises(Canceled) as info, errors_as_ctx_err(ctx):
        ctx.check()
    assert info.value is ctx.err()
    assert info.value.__cause__ is None


def test_context_done_during_the_block_counts() -> None:
    ctx, cancel = with_cancel(background())
    driver_error = DriverError("server closed the connection")
    with pytest.raises(Canceled) as info, errors_as_ctx_err(ctx):
        cancel()
        raise driver_error
    assert info.value.__cause__ is driver_error


@pytest.mark.parametrize(
    "base_exc", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError]
)
def test_sync_cm_does_not_convert_a_base_exception(base_exc: type[BaseException]) -> None:
    ctx = _cancelled()
    raised = base_exc()
    with pytest.raises(base_exc) as info, errors_as_ctx_err(ctx):
        raise raised
    assert info.value is raised
    assert info.value.__cause__ is None


def test_async_cm_does_not_convert_a_cancellation() -> None:
    """A CancelledError is somebody's cancellation (the server shutting down...)."""
    ctx = _cancelled()

    async def body() -> None:
        async with async_errors_as_ctx_err(ctx):
            await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())


def test_no_exception_no_effect() -> None:
    ctx = _cancelled()
    with errors_as_ctx_err(ctx):
        pass

    async def run() -> int:
        async with async_errors_as_ctx_err(ctx):
            return 1

    assert asyncio.run(run()) == 1


def test_context_managers_are_typed_as_such() -> None:
    ctx = background()
    assert isinstance(errors_as_ctx_err(ctx), AbstractContextManager)


# -- the integrations that once raised err() without a fresh traceback ----------


class _FailingStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        raise httpx.ReadError("connection shut down")


def test_httpx_sync_stream_raises_err_with_a_fresh_traceback() -> None:
    from ctxmiddleware._integrations._httpx import _InFlight, _SyncContextStream

    ctx = _cancelled()
    sizes = []
    for _ in range(50):
        stream = _SyncContextStream(_FailingStream(), ctx, _InFlight(), lambda: None)
        with pytest.raises(Canceled) as info:
            b"".join(stream)
        assert isinstance(info.value.__cause__, httpx.ReadError)
        sizes.append(_frames(info.value.__traceback__))
    assert sizes[-1] == sizes[0], sizes


def test_httpx_sync_transport_reports_a_shut_down_request_as_err() -> None:
    from ctxmiddleware._integrations._httpx import SyncContextTransport

    ctx, cancel = with_cancel(background())

    def handler(request: httpx.Request) -> httpx.Response:
        cancel()  # the context is done mid-request: its abort resets the socket
        raise httpx.ReadError("connection reset by peer")

    transport = SyncContextTransport(httpx.MockTransport(handler))
    with httpx.Client(transport=transport) as client, pytest.raises(Canceled) as info:
        client.get("http://test/", extensions={"ctx": ctx})
    assert info.value is ctx.err()
    assert isinstance(info.value.__cause__, httpx.ReadError)


def test_sqlite_converts_only_the_interrupt() -> None:
    from ctxmiddleware._integrations._sqlite import sqlite_interruptible

    conn = sqlite3.connect(":memory:")
    ctx, cancel = with_cancel(background())
    with pytest.raises(Canceled) as info, sqlite_interruptible(conn, ctx):
        cancel()
        raise sqlite3.OperationalError("interrupted")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)

    ctx, cancel = with_cancel(background())
    locked = sqlite3.OperationalError("database is locked")
    with pytest.raises(sqlite3.OperationalError) as info2, sqlite_interruptible(conn, ctx):
        cancel()
        raise locked
    assert info2.value is locked
    conn.close()
