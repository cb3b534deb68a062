"""The context core under asyncio and threads: awaiting Done, ctx.scope(),
current()/bind() flowing into tasks and threads, deadlines with and without a
loop, and cancellation races."""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pytest
from helpers import await_done

from ctxmiddleware import (
    Canceled,
    Context,
    DeadlineExceeded,
    Done,
    Key,
    after_func,
    background,
    bind,
    cause,
    current,
    with_cancel,
    with_cancel_cause,
    with_deadline,
    with_timeout,
    with_value,
    without_cancel,
)
from ctxmiddleware._core import _timer as timermod

T = TypeVar("T")

WAIT = 5.0  # upper bound for anything that must happen
NOT_YET = 0.02  # how long we watch to prove something does NOT happen
VERY_LONG = 1000 * 3600.0

bg = background()

pytestmark = pytest.mark.timeout(20)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def wait_done(ctx: Context, timeout: float = WAIT) -> None:
    await asyncio.wait_for(await_done(ctx.done()), timeout)


class LoopThread:
    """An event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


# -- await ctx.done() ----------------------------------------------------------


def test_await_done_on_several_loops_woken_from_another_thread() -> None:
    ctx, cancel = with_cancel(bg)
    loops = [LoopThread() for _ in range(3)]
    try:
        woke_on: list[int] = []
        lock = threading.Lock()

        async def waiter() -> int:
            await ctx.done()
            with lock:
                woke_on.append(threading.get_ident())
            return threading.get_ident()

        futs = [lt.submit(waiter()) for lt in loops]
        for f in futs:
            with pytest.raises(TimeoutError):
                f.result(NOT_YET)  # really waiting
        cancel()  # from the main thread, which runs no loop
        idents = [f.result(WAIT) for f in futs]
        # Each coroutine was woken on its own loop's thread.
        assert idents == [lt.thread.ident for lt in loops]
    finally:
        for lt in loops:
            lt.close()


def test_await_done_cancelled_from_worker_thread() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        loop_thread = threading.get_ident()
        threading.Timer(0.005, cancel).start()
        await wait_done(ctx)
        assert threading.get_ident() == loop_thread
        assert isinstance(ctx.err(), Canceled)

    run(main())


def test_await_done_already_done_and_never_done() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        cancel()
        await ctx.done()  # returns at once
        await with_value(ctx, "k", "v").done()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(await_done(bg.done()), NOT_YET)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(await_done(without_cancel(ctx).done()), NOT_YET)

    run(main())


def test_await_done_interrupted_leaves_no_listener() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        for _ in range(10):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(await_done(ctx.done()), 0.001)
        assert not ctx._children  # type: ignore[attr-defined]
        cancel()

    run(main())


# -- Done.wait -----------------------------------------------------------------


def test_done_wait_timeout() -> None:
    ctx, cancel = with_cancel(bg)
    t0 = time.monotonic()
    assert ctx.done().wait(NOT_YET) is False
    assert time.monotonic() - t0 >= NOT_YET * 0.9
    assert ctx.done().wait(0) is False
    assert ctx.done().wait(-1) is False
    threading.Timer(0.005, cancel).start()
    assert ctx.done().wait(WAIT) is True
    assert ctx.done().wait(0) is True
    assert ctx.done().wait() is True


def test_done_wait_without_timeout_woken_by_cancel() -> None:
    ctx, cancel = with_cancel(bg)
    threading.Timer(0.005, cancel).start()
    assert ctx.done().wait() is True


def test_done_wait_timeout_on_context_with_distant_deadline() -> None:
    """wait(timeout) returns at the timeout, not at the (distant) deadline."""
    for deadline in (VERY_LONG, 1e10, math.inf):
        ctx, cancel = with_timeout(bg, deadline)
        child, _c = with_cancel(ctx)
        t0 = time.monotonic()
        assert ctx.done().wait(0.01) is False
        assert child.done().wait(0.01) is False
        assert time.monotonic() - t0 < 1.0
        cancel()


def test_done_wait_timed_out_leaves_no_listener() -> None:
    ctx, cancel = with_cancel(bg)
    for _ in range(10):
        assert ctx.done().wait(0.001) is False
    assert not ctx._children  # type: ignore[attr-defined]
    tctx, tcancel = with_timeout(bg, VERY_LONG)
    for _ in range(10):
        assert tctx.done().wait(0.001) is False
    assert not tctx._children  # type: ignore[attr-defined]
    cancel()
    tcancel()


def test_done_wait_sees_deadline_even_if_timer_is_stuck() -> None:
    """Done.wait() does not rely on the timer alone: a blocked loop's timer is late."""
    lt = LoopThread()
    try:
        made = threading.Event()
        release = threading.Event()
        box: list[Context] = []

        async def make_and_block() -> None:
            ctx, _ = with_timeout(bg, 0.01)  # a loop timer, on this loop
            box.append(ctx)
            made.set()
            release.wait(WAIT)  # block the loop: its timer cannot fire

        fut = lt.submit(make_and_block())
        assert made.wait(WAIT)
        ctx = box[0]
        assert ctx._timer._loop is lt.loop  # type: ignore[attr-defined]
        t0 = time.monotonic()
        assert ctx.done().wait(WAIT) is True
        assert time.monotonic() - t0 < 1.0  # woke at the deadline, not at the timeout
        assert isinstance(ctx.err(), DeadlineExceeded)
        release.set()
        fut.result(WAIT)
    finally:
        release.set()
        lt.close()


# -- ctx.scope() ---------------------------------------------------------------


def test_scope_cancels_task_once_and_raises_err_chained_to_cause() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel_cause(bg)
        why = RuntimeError("client went away")
        task = asyncio.current_task()
        assert task is not None
        entry = task.cancelling()
        cancelled_inside = 0
        with pytest.raises(Canceled) as info:
            async with ctx.scope() as scoped:
                assert scoped is ctx
                asyncio.get_running_loop().call_later(0.005, cancel, why)
                try:
                    await asyncio.sleep(WAIT)
                except asyncio.CancelledError:
                    cancelled_inside += 1
                    # Edge-triggered: a cleanup await is not interrupted again.
                    await asyncio.sleep(0.005)
                    assert task.cancelling() == entry + 1
                    raise
        assert cancelled_inside == 1
        assert info.value is ctx.err()
        assert info.value.__cause__ is why
        assert task.cancelling() == entry
        await asyncio.sleep(0)  # no stray cancellation after the scope

    run(main())


def test_scope_plain_cancel_chains_cancelled_error() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        with pytest.raises(Canceled) as info:
            async with ctx.scope():
                asyncio.get_running_loop().call_soon(cancel)
                await asyncio.sleep(WAIT)
        assert info.value is ctx.err()
        assert isinstance(info.value.__cause__, asyncio.CancelledError)

    run(main())


def test_scope_raises_do_not_grow_the_shared_error() -> None:
    async def main() -> int:
        ctx, cancel = with_cancel(bg)
        cancel()
        for _ in range(100):
            with pytest.raises(Canceled):
                async with ctx.scope():
                    await asyncio.sleep(WAIT)
        err = ctx.err()
        assert err is not None
        n, tb = 0, err.__traceback__
        while tb is not None:
            n, tb = n + 1, tb.tb_next
        return n

    assert run(main()) < 10


def test_scope_cancel_from_another_thread() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        threading.Timer(0.005, cancel).start()
        with pytest.raises(Canceled):
            async with ctx.scope():
                await asyncio.sleep(WAIT)

    run(main())


def test_scope_deadline_raises_deadline_exceeded() -> None:
    async def main() -> None:
        ctx, _ = with_timeout(bg, 0.005)
        with pytest.raises(TimeoutError) as info:  # DeadlineExceeded is a TimeoutError
            async with ctx.scope():
                await asyncio.sleep(WAIT)
        assert isinstance(info.value, DeadlineExceeded)

    run(main())


def test_scope_outside_cancel_passes_through() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        entered = asyncio.Event()

        async def body() -> None:
            async with ctx.scope():
                entered.set()
                await asyncio.sleep(WAIT)

        task = asyncio.create_task(body())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ctx.err() is None
        assert not ctx._children  # type: ignore[attr-defined]  # the scope unsubscribed
        cancel()

    run(main())


def test_scope_both_cancellations_outside_one_wins() -> None:
    async def main() -> None:
        ctx, cancel = with_cancel(bg)
        entered = asyncio.Event()

        async def body() -> None:
            async with ctx.scope():
                entered.set()
                await asyncio.sleep(WAIT)

        task = asyncio.create_task(body())
        await entered.wait()
        cancel()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_scope_with_already_done_context() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        ctx, cancel = with_cancel(bg)
        cancel()
        with pytest.raises(Canceled):
            async with ctx.scope():
                await asyncio.sleep(WAIT)  # the first await is interrupted
        assert task.cancelling() == 0
        # A block with no await finishes; nothing leaks out of the scope.
        async with ctx.scope():
            pass
        await asyncio.sleep(0)
        assert task.cancelling() == 0

    run(main())


def test_scope_cancelled_by_own_task_without_await_leaves_no_stray_cancel() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        ctx, cancel = with_cancel(bg)
        async with ctx.scope():
            cancel()  # the task cancels its own context and leaves at once
        await asyncio.sleep(0.001)  # must not raise CancelledError
        assert task.cancelling() == 0

    run(main())


def test_scope_exited_before_cross_thread_cancel_lands() -> None:
    async def main() -> None:
        for _ in range(50):
            ctx, cancel = with_cancel(bg)
            t = threading.Thread(target=cancel)
            async with ctx.scope():
                t.start()
                t.join()  # the loop is blocked: the cancel is queued for later
            await asyncio.sleep(0)  # nothing leaks out

    run(main())


def test_scope_entered_twice_and_outside_task() -> None:
    async def main() -> None:
        scope = bg.scope()
        async with scope:
            pass
        with pytest.raises(RuntimeError):
            async with scope:
                pass

    run(main())


def test_scope_never_cancelable_context() -> None:
    """A scope over a context that can never be done (``background()``, a
    ``without_cancel`` child of a cancelled context) never cancels its task:
    the body runs to its end, no cancellation is left pending, and a
    cancellation from elsewhere passes through as a bare CancelledError."""

    async def sleeper(ctx: Context, entered: asyncio.Event) -> None:
        async with ctx.scope():
            entered.set()
            await asyncio.sleep(WAIT)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        parent, cancel = with_cancel(bg)
        detached = without_cancel(parent)
        for ctx in (bg, detached):
            scope = ctx.scope()
            steps = 0
            async with scope as got:
                assert got is ctx
                for _ in range(3):
                    await asyncio.sleep(0.001)
                    steps += 1
                cancel()  # the parent: must not reach the detached child
                for _ in range(3):
                    await asyncio.sleep(0)
                    steps += 1
            assert steps == 6
            assert not scope.cancel_called
            assert task.cancelling() == 0
            await asyncio.sleep(0.001)  # no stray cancel lands after the block
            assert ctx.err() is None

            entered = asyncio.Event()
            other = asyncio.create_task(sleeper(ctx, entered))
            await entered.wait()
            other.cancel("from elsewhere")
            with pytest.raises(asyncio.CancelledError):
                await other
            assert other.cancelled()  # not turned into an error of the scope's

    run(main())


# -- current() / bind() --------------------------------------------------------


def test_current_defaults_to_background_and_bind_restores() -> None:
    assert current() is bg
    a, _ = with_cancel(bg)
    b = with_value(a, "k", "v")
    with bind(a) as got:
        assert got is a
        assert current() is a
        with bind(b):
            assert current() is b
        assert current() is a
    assert current() is bg


def test_bind_flows_into_tasks_and_threads() -> None:
    ctx = with_value(bg, Key("req"), "r1")

    async def main() -> None:
        async def in_task() -> Context:
            return current()

        with bind(ctx):
            assert await asyncio.create_task(in_task()) is ctx
            assert await asyncio.to_thread(current) is ctx
            assert await anyio.to_thread.run_sync(current) is ctx
        assert current() is bg
        assert await asyncio.create_task(in_task()) is bg

        async def binds_in_child() -> None:
            with bind(ctx):
                await asyncio.sleep(0)
            bind(ctx).__enter__()  # never exited: confined to this task's context

        await asyncio.create_task(binds_in_child())
        assert current() is bg

    run(main())


def test_bind_in_thread_does_not_leak_to_others() -> None:
    ctx, _ = with_cancel(bg)
    seen: list[Context] = []
    with bind(ctx):
        t = threading.Thread(target=lambda: seen.append(current()))
        t.start()
        t.join()
    assert seen == [bg]  # plain threads start with a fresh contextvars context


# -- deadlines -----------------------------------------------------------------


def test_deadline_fires_without_loop_on_shared_timer_thread() -> None:
    ctx, _ = with_timeout(bg, 0.005)
    assert isinstance(ctx._timer, timermod._Entry)  # type: ignore[attr-defined]  # a thread timer
    fired_in: list[str] = []
    fired = threading.Event()

    def f() -> None:
        fired_in.append(threading.current_thread().name)
        fired.set()

    # Nobody calls err(): only the timer can make the after_func run.
    after_func(ctx, f)
    assert fired.wait(WAIT)
    assert ctx._err is not None  # type: ignore[attr-defined]
    assert isinstance(ctx.err(), DeadlineExceeded)
    assert timermod._thread_timers._thread is not None
    assert timermod._thread_timers._thread.name == "ctxmiddleware-timer"


def test_deadline_fires_on_running_loop() -> None:
    async def main() -> None:
        ctx, _ = with_timeout(bg, 0.005)
        assert ctx._timer._loop is asyncio.get_running_loop()  # type: ignore[attr-defined]
        child, _c = with_cancel(ctx)
        await wait_done(child)
        assert isinstance(child.err(), DeadlineExceeded)
        assert isinstance(ctx.err(), DeadlineExceeded)

    run(main())


def test_deadline_in_worker_thread_uses_timer_thread() -> None:
    async def main() -> None:
        def make() -> Context:
            ctx, _ = with_timeout(bg, 0.005)
            assert isinstance(ctx._timer, timermod._Entry)  # type: ignore[attr-defined]  # a thread timer
            return ctx

        ctx = await asyncio.to_thread(make)
        await wait_done(ctx)
        assert isinstance(ctx.err(), DeadlineExceeded)

    run(main())


def test_err_is_right_between_timer_ticks() -> None:
    async def main() -> None:
        ctx, _ = with_timeout(bg, 0.01)
        child = with_value(with_cancel(ctx)[0], "k", "v")
        assert ctx.err() is None
        time.sleep(0.03)  # block the loop past the deadline: the timer cannot run
        assert ctx._err is None  # type: ignore[attr-defined]  # the timer has not fired...
        assert isinstance(child.err(), DeadlineExceeded)  # ...but err() knows
        assert ctx.done().is_set()
        assert isinstance(ctx.err(), DeadlineExceeded)
        assert ctx.remaining() == 0.0
        await asyncio.sleep(0.001)  # the late timer then finds nothing to do

    run(main())


def test_remaining_never_negative() -> None:
    assert bg.remaining() is None
    ctx, cancel = with_timeout(bg, 10)
    r = ctx.remaining()
    assert r is not None and 9 < r <= 10
    cancel()
    past, _ = with_deadline(bg, time.monotonic() - 5)
    assert past.remaining() == 0.0
    short, _ = with_timeout(bg, 0.001)
    assert short.done().wait(WAIT)
    assert short.remaining() == 0.0
    assert with_value(short, "k", 1).remaining() == 0.0


def test_check() -> None:
    ctx, cancel = with_cancel_cause(bg)
    ctx.check()  # live: no raise
    bg.check()
    cancel(RuntimeError("why"))
    with pytest.raises(Canceled) as info:
        ctx.check()
    assert info.value is ctx.err()


def test_check_does_not_grow_the_shared_error() -> None:
    ctx, cancel = with_cancel(bg)
    cancel()

    def depth() -> int:
        err = ctx.err()
        assert err is not None
        n, tb = 0, err.__traceback__
        while tb is not None:
            n, tb = n + 1, tb.tb_next
        return n

    for _ in range(100):
        with pytest.raises(Canceled):
            ctx.check()
    assert depth() < 10


def test_with_timeout_accepts_timedelta() -> None:
    t0 = time.monotonic()
    ctx, cancel = with_timeout(bg, datetime.timedelta(seconds=30))
    d = ctx.deadline()
    assert d is not None and t0 + 30 <= d <= time.monotonic() + 30
    cancel()
    ctx, _ = with_timeout(bg, datetime.timedelta(milliseconds=1))
    assert ctx.done().wait(WAIT)
    assert isinstance(ctx.err(), DeadlineExceeded)
    ctx, _ = with_timeout(bg, datetime.timedelta(seconds=-1))
    assert ctx.done().is_set()


def test_nan_deadline_rejected() -> None:
    with pytest.raises(ValueError):
        with_deadline(bg, math.nan)
    with pytest.raises(ValueError):
        with_timeout(bg, math.nan)


def test_huge_deadlines_do_not_break_the_timer_thread() -> None:
    def in_thread() -> None:
        huge = [with_timeout(bg, d) for d in (math.inf, 1e12, VERY_LONG)]
        short, _ = with_timeout(bg, 0.002)
        assert short.done().wait(WAIT)
        # Let the timer thread reach the huge deadlines at the head of its heap.
        time.sleep(NOT_YET)
        timer_thread = timermod._thread_timers._thread
        assert timer_thread is not None and timer_thread.is_alive()
        for ctx, _c in huge:
            assert ctx.err() is None
        later, _ = with_timeout(bg, 0.002)
        fired = threading.Event()
        after_func(later, fired.set)
        assert fired.wait(WAIT)
        assert timermod._thread_timers._thread is timer_thread  # never restarted
        for _ctx, c in huge:
            c()

    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[arg-type]
    try:
        t = threading.Thread(target=in_thread)
        t.start()
        t.join(WAIT)
    finally:
        threading.excepthook = hook
    assert errors == []


def test_timer_thread_survives_a_huge_deadline_at_the_head_of_its_heap() -> None:
    timers = timermod._TimerThread()  # a private instance: its heap holds only ours
    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[arg-type]
    try:
        huge = [timers.add(when, lambda: None) for when in (math.inf, 1e12)]
        fired = threading.Event()
        timers.add(time.monotonic() + 0.002, fired.set)
        assert fired.wait(WAIT)
        time.sleep(NOT_YET)  # the thread now waits for the huge deadlines
        thread = timers._thread
        assert thread is not None and thread.is_alive()
        fired2 = threading.Event()
        timers.add(time.monotonic() + 0.002, fired2.set)
        assert fired2.wait(WAIT)
        assert timers._thread is thread  # never died, never restarted
        for entry in huge:
            entry.cancel()
    finally:
        threading.excepthook = hook
    assert errors == []


# -- after_func ----------------------------------------------------------------


def test_after_func_blocking_fn_does_not_block_cancel() -> None:
    ctx, cancel = with_cancel(bg)
    release = threading.Event()
    released: list[bool] = []
    both = threading.Barrier(3)

    def blocker() -> None:
        released.append(release.wait(WAIT))
        both.wait(WAIT)

    after_func(ctx, blocker)
    after_func(ctx, blocker)
    child, _ = with_cancel(ctx)
    try:
        t0 = time.monotonic()
        cancel()  # returns although both functions block
        assert time.monotonic() - t0 < 1.0
        assert child.done().is_set()
        release.set()
        both.wait(WAIT)
        assert released == [True, True]
    finally:
        release.set()


class _Signal(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.event.set()


def test_after_func_raising_fn_is_logged() -> None:
    handler = _Signal()
    log = logging.getLogger("ctxmiddleware")
    log.addHandler(handler)
    try:
        ctx, cancel = with_cancel(bg)
        ran = threading.Event()

        def boom() -> None:
            raise ZeroDivisionError("boom")

        after_func(ctx, boom)
        after_func(ctx, ran.set)
        cancel()
        assert handler.event.wait(WAIT)
        assert ran.wait(WAIT)  # the other registration is unaffected
        rec = handler.records[0]
        assert rec.levelno == logging.ERROR
        assert rec.exc_info is not None and rec.exc_info[0] is ZeroDivisionError
    finally:
        log.removeHandler(handler)


def test_raising_listener_is_logged_and_does_not_stop_cancel() -> None:
    """A custom parent's after_func stop() that raises is logged; the cancel completes."""

    class BadStop(Context):
        def __init__(self) -> None:
            self._inner, self.close = with_cancel(bg)

        def deadline(self) -> float | None:
            return None

        def done(self) -> Done:
            return self._inner.done()

        def err(self) -> Any:
            return self._inner.err()

        def value(self, key: Any) -> Any:
            return None

        def after_func(self, f: Callable[[], object]) -> Callable[[], bool]:
            def stop() -> bool:
                raise RuntimeError("bad stop")

            return stop

    handler = _Signal()
    log = logging.getLogger("ctxmiddleware")
    log.addHandler(handler)
    try:
        child, cancel = with_cancel(BadStop())
        grandchild, _ = with_cancel(child)
        cancel()
        assert grandchild.done().is_set()
        assert handler.event.is_set()
    finally:
        log.removeHandler(handler)


# -- races ---------------------------------------------------------------------


def test_simultaneous_cancels_with_async_waiters() -> None:
    """101 contexts cancelled at once from threads, watched by coroutines on a loop."""
    root, root_cancel = with_cancel(bg)
    ctxs: list[Context] = [root]
    cancels: list[Callable[[], None]] = [root_cancel]
    i = 0
    while len(ctxs) < 100:
        for _ in range(4):
            parent = ctxs[i]
            if len(ctxs) % 3 == 0:
                parent = with_value(parent, "k", len(ctxs))
            c, f = (
                with_timeout(parent, VERY_LONG) if len(ctxs) % 2 else with_cancel(parent)
            )
            ctxs.append(c)
            cancels.append(f)
        i += 1
    assert len(ctxs) == 101

    async def main() -> None:
        waiters = [asyncio.create_task(wait_done(c)) for c in ctxs]
        await asyncio.sleep(0)
        random.shuffle(cancels)
        barrier = threading.Barrier(len(cancels))

        def fire(f: Callable[[], None]) -> None:
            barrier.wait()
            f()

        threads = [threading.Thread(target=fire, args=(f,)) for f in cancels]
        for t in threads:
            t.start()
        await asyncio.gather(*waiters)
        for t in threads:
            await asyncio.to_thread(t.join, WAIT)
            assert not t.is_alive()

    run(main())
    for c in ctxs:
        assert isinstance(c.err(), Canceled)


def test_interlocked_cancels_from_listeners_and_waiters() -> None:
    for _ in range(20):
        parent, cancel_parent = with_cancel(bg)
        child, cancel_child = with_cancel(parent)
        # A listener that cancels the child while the parent's cancel is running.
        after_func(parent, cancel_child)
        t = threading.Thread(target=lambda p=parent, cc=cancel_child: (p.done().wait(WAIT), cc()))
        t.start()
        cancel_parent()
        assert child.done().wait(WAIT)
        t.join(WAIT)
        assert not t.is_alive()


@pytest.mark.parametrize("kind", ["with_cancel", "with_timeout", "via_value", "after_func"])
def test_cancel_racing_construction(kind: str) -> None:
    for _ in range(100):
        parent, pcancel = with_cancel_cause(bg)
        why = RuntimeError("race")
        go = threading.Event()

        def canceller(
            pc: Callable[..., None] = pcancel,
            w: BaseException = why,
            go: threading.Event = go,
        ) -> None:
            go.wait(WAIT)
            pc(w)

        t = threading.Thread(target=canceller)
        t.start()
        go.set()
        if kind == "after_func":
            ran = threading.Event()
            after_func(parent, ran.set)
            assert ran.wait(WAIT)
        else:
            if kind == "with_cancel":
                c, _ = with_cancel(parent)
            elif kind == "with_timeout":
                c, _ = with_timeout(parent, VERY_LONG)
            else:
                c, _ = with_cancel(with_value(parent, "k", "v"))
            assert c.done().wait(WAIT)
            assert isinstance(c.err(), Canceled)
            assert cause(c) is why
            assert getattr(c, "_timer", None) is None
        t.join(WAIT)


# -- no secrets in str/repr ----------------------------------------------------


def test_str_never_shows_values() -> None:
    secret = "hunter2-s3cr3t"
    token: Key[str] = Key("auth-token")
    ctx = with_value(bg, token, secret)
    ctx = with_value(ctx, "password", secret)
    ctx = with_value(ctx, 7, {"nested": secret})
    c, cancel = with_cancel(ctx)
    t, tcancel = with_timeout(with_value(c, Key("x"), secret), VERY_LONG)
    w = without_cancel(with_value(t, "api_key", secret))
    for x in (ctx, c, t, w, with_cancel_cause(w)[0]):
        assert secret not in str(x)
        assert secret not in repr(x)
        assert secret not in repr(x.done())
    assert str(ctx) == "background.with_value(auth-token).with_value(password).with_value(int)"
    assert repr(token) == "Key('auth-token')"
    cancel()
    tcancel()


# -- nested scopes woken by one cancellation ----------------------------------


def test_nested_scopes_on_one_context_the_inner_one_raises() -> None:
    """The middleware's scope and a helper's scope watch the same context:
    the innermost converts the cancellation, the task's counter is restored."""
    import ctxmiddleware as cm

    async def main() -> tuple[str, str, int]:
        ctx, _ = cm.with_timeout(cm.background(), 0.02)
        task = asyncio.current_task()
        assert task is not None
        inner = outer = ""
        try:
            async with ctx.scope():
                try:
                    async with ctx.scope():
                        await asyncio.sleep(5)
                except cm.DeadlineExceeded:
                    inner = "inner"
                    raise
        except cm.DeadlineExceeded:
            outer = "outer"
        return inner, outer, task.cancelling()

    assert asyncio.run(main()) == ("inner", "outer", 0)


def test_nested_scopes_inner_caller_may_swallow_and_continue() -> None:
    import ctxmiddleware as cm

    async def main() -> list[str]:
        seen: list[str] = []
        parent, cancel = cm.with_cancel(cm.background())
        child, cancel_child = cm.with_cancel(parent)
        asyncio.get_running_loop().call_later(0.01, cancel)
        async with parent.scope():
            try:
                async with child.scope():
                    await asyncio.sleep(5)
            except cm.Canceled:
                seen.append("inner")
            await asyncio.sleep(0)  # no second CancelledError arrives
            seen.append("continued")
        cancel_child()
        seen.append(str(asyncio.current_task().cancelling()))  # type: ignore[union-attr]
        return seen

    assert asyncio.run(main()) == ["inner", "continued", "0"]


def test_a_timer_firing_early_does_not_expire_the_context() -> None:
    """uvloop counts whole ms from a cached clock, so its timers may fire a
    little before the deadline: the context must wait for the real deadline."""
    import ctxmiddleware as cm

    async def main() -> tuple[object, bool, float]:
        deadline = time.monotonic() + 0.05
        ctx, cancel = cm.with_deadline(cm.background(), deadline)
        ctx._expire()  # type: ignore[attr-defined]  # what an early timer does
        early_err = ctx.err()
        rearmed = ctx._timer is not None  # type: ignore[attr-defined]
        await asyncio.wait_for(ctx.done(), 2)
        cancel()
        return early_err, rearmed, time.monotonic() - deadline

    early_err, rearmed, lateness = asyncio.run(main())
    assert early_err is None
    assert rearmed
    assert lateness >= 0
