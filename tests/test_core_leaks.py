"""Memory: what the context core keeps alive, and what it lets go.

A parent refers to its children weakly, so children dropped without cancel are
freed (Go keeps them until the parent is cancelled); pending timers and
after_func registrations keep their context alive until they fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import await_done

from ctxmiddleware import (
    Context,
    Done,
    after_func,
    background,
    with_cancel,
    with_cancel_cause,
    with_timeout,
    with_value,
)
from ctxmiddleware._core import _timer as timermod

WAIT = 5.0
VERY_LONG = 1000 * 3600.0
N = 100_000
MAX_GROWTH = 300_000  # bytes: "near baseline" after 100,000 children
MAX_CHILDREN = 128  # the registry is swept whenever it doubles past 64

bg = background()

pytestmark = pytest.mark.timeout(60)


@contextmanager
def traced() -> Iterator[list[int]]:
    """Yields a list that receives the growth of traced memory, after gc.collect().

    The collector is paused inside the block (tracing makes it slow); the final
    full collection still frees anything that only a cycle kept alive.
    """
    out: list[int] = []
    gc.collect()
    tracemalloc.start()
    gc.disable()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield out
        gc.enable()
        gc.collect()
        out.append(tracemalloc.get_traced_memory()[0] - base)
    finally:
        gc.enable()
        tracemalloc.stop()


@contextmanager
def counted_blocks() -> Iterator[list[int]]:
    """Like traced(), in allocated memory blocks (cheap enough for 100,000 x 4 cases)."""
    out: list[int] = []
    gc.collect()
    base = sys.getallocatedblocks()
    yield out
    gc.collect()
    out.append(sys.getallocatedblocks() - base)


def registry(ctx: Context) -> dict[int, Any]:
    children: dict[int, Any] | None = ctx._children  # type: ignore[attr-defined]
    return children or {}


def eventually_freed(ref: weakref.ref[Any]) -> bool:
    """True once ``ref`` is dead (a timer thread may still hold it for an instant)."""
    done = threading.Event()
    for _ in range(500):
        gc.collect()
        if ref() is None:
            return True
        done.wait(0.01)
    return False


# -- dropped children ----------------------------------------------------------


def _cause(parent: Context) -> None:
    with_cancel_cause(parent)


def _through_value(parent: Context) -> None:
    with_cancel(with_value(parent, "k", "v"))


def _grandchild(parent: Context) -> None:
    with_cancel(with_cancel(parent)[0])


def test_dropped_children_of_long_lived_parent_are_freed() -> None:
    """100,000 with_cancel children never cancelled: memory stays near baseline."""
    parent, cancel = with_cancel(bg)
    keep, keep_cancel = with_cancel(parent)  # a live sibling must survive the sweeps
    for _ in range(1000):  # warm up: registry dict, free lists
        with_cancel(parent)
    with traced() as growth:
        for _ in range(N):
            with_cancel(parent)
    assert growth[0] < MAX_GROWTH, f"{growth[0]} bytes kept by {N} dropped children"
    assert len(registry(parent)) <= MAX_CHILDREN
    assert keep in [r() for r in registry(parent).values()]
    cancel()
    assert keep.done().is_set()
    keep_cancel()


@pytest.mark.parametrize("make", [_cause, _through_value, _grandchild])
def test_dropped_children_variants_are_freed(make: Callable[[Context], None]) -> None:
    parent, cancel = with_cancel(bg)
    for _ in range(1000):
        make(parent)
    with counted_blocks() as growth:
        for _ in range(N // 2):
            make(parent)
    assert growth[0] < 2000, f"{growth[0]} blocks kept by {N // 2} dropped children"
    assert len(registry(parent)) <= MAX_CHILDREN
    cancel()


@pytest.mark.parametrize("make", [with_cancel, with_cancel_cause])
def test_dropped_child_is_freed_at_once(make: Callable[[Context], tuple[Context, Any]]) -> None:
    """A child and its cancel function, dropped, are freed by reference
    counting alone: no reference cycle. The garbage collector is off for the
    check (a gc.collect() before it would free a cycle too)."""
    parent, cancel = with_cancel(bg)
    gc.collect()
    gc.disable()
    try:
        child, child_cancel = make(parent)
        ref = weakref.ref(child)
        del child, child_cancel
        assert ref() is None, "the dropped child is kept alive by a reference cycle"
    finally:
        gc.enable()
    cancel()  # a dead entry is skipped


def test_cancelled_children_leave_the_registry() -> None:
    parent, cancel = with_cancel(bg)
    with counted_blocks() as growth:
        for _ in range(N // 5):
            _c, c = with_cancel(parent)
            c()
    assert growth[0] < 2000
    assert len(registry(parent)) == 0
    cancel()


# -- timers --------------------------------------------------------------------


def _heap_size() -> tuple[int, int]:
    timers = timermod._thread_timers
    with timers._cond:
        return len(timers._heap), sum(1 for e in timers._heap if e[2] is not None)


def test_cancelled_timeout_children_free_their_timers() -> None:
    parent, cancel = with_cancel(bg)
    for _ in range(100):
        with_timeout(parent, VERY_LONG)[1]()
    size0, live0 = _heap_size()
    with counted_blocks() as growth:
        for _ in range(10_000):
            _c, c = with_timeout(parent, VERY_LONG)
            c()
    size, live = _heap_size()
    assert live == live0  # no timer left pending
    assert size <= max(size0, 2 * live0 + 130)  # cancelled entries are purged
    assert growth[0] < 2000
    assert len(registry(parent)) == 0

    child, c = with_timeout(parent, VERY_LONG)
    ref = weakref.ref(child)
    c()
    del child, c
    gc.collect()
    assert ref() is None  # the cancelled timer dropped its reference
    cancel()


def test_pending_timer_holds_its_context_until_it_fires() -> None:
    parent, cancel = with_cancel(bg)
    child, _ = with_timeout(parent, 0.01)
    fired = threading.Event()
    after_func(child, fired.set)
    ref = weakref.ref(child)
    del child, _
    gc.collect()
    assert ref() is not None  # held by its timer
    assert fired.wait(WAIT)  # and it does fire, though nobody holds it
    assert eventually_freed(ref)
    assert len(registry(parent)) == 0
    cancel()


def test_loop_timers_release_cancelled_and_fired_contexts() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        parent, cancel = with_cancel(bg)
        child, c = with_timeout(parent, VERY_LONG)
        assert child._timer._loop is loop  # type: ignore[attr-defined]
        ref = weakref.ref(child)
        c()
        del child, c
        gc.collect()
        assert ref() is None

        child, _ = with_timeout(parent, 0.005)
        fired = asyncio.Event()
        after_func(child, lambda: loop.call_soon_threadsafe(fired.set))
        ref = weakref.ref(child)
        del child, _
        gc.collect()
        assert ref() is not None  # the pending loop timer holds it
        await asyncio.wait_for(fired.wait(), WAIT)
        assert eventually_freed(ref)
        scheduled = loop._scheduled  # type: ignore[attr-defined,unused-ignore]
        pending = [h for h in scheduled if not h.cancelled()]
        assert pending == []
        cancel()

    asyncio.run(main())


# -- after_func keeps its context alive ----------------------------------------


def _register(parent: Context, fired: threading.Event, depth: int) -> weakref.ref[Context]:
    ctx: Context = parent
    for i in range(depth):
        ctx = with_value(with_cancel(ctx)[0], "layer", i)
    after_func(ctx, fired.set)
    node = ctx._src  # type: ignore[attr-defined]  # the cancellable context under the values
    return weakref.ref(node)


@pytest.mark.parametrize("depth", [1, 3])
def test_pending_after_func_keeps_dropped_context_alive(depth: int) -> None:
    parent, cancel = with_cancel(bg)
    fired = threading.Event()
    ref = _register(parent, fired, depth)  # the user drops every context and cancel func
    gc.collect()
    assert ref() is not None, "a context with a pending after_func was freed"
    assert not fired.is_set()
    cancel()  # an ancestor is cancelled: the dropped context still runs its after_func
    assert fired.wait(WAIT)
    assert eventually_freed(ref)  # fired: nothing holds it any more
    assert len(registry(parent)) == 0


def test_after_func_fn_and_stop_do_not_outlive_cancel() -> None:
    """After the cancel, the registry lets go of fn (and what it refers to)."""
    parent, cancel = with_cancel(bg)

    class Payload:
        pass

    payload = Payload()
    ran = threading.Event()
    def fn(p: Payload = payload) -> None:
        ran.set()

    stop = after_func(parent, fn)
    ref = weakref.ref(payload)
    del payload
    cancel()
    assert ran.wait(WAIT)
    assert stop() is False
    assert len(registry(parent)) == 0
    del stop, fn  # only the stop function still led to fn; the thread that ran it let go
    assert eventually_freed(ref)


# -- listeners are removed -----------------------------------------------------


def test_waits_scopes_and_stops_leave_no_listeners() -> None:
    ctx, cancel = with_cancel(bg)
    for _ in range(1000):
        assert ctx.done().wait(0) is False
        after_func(ctx, lambda: None)()

    async def main() -> None:
        for _ in range(1000):
            async with ctx.scope():
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(await_done(ctx.done()), 0)

    asyncio.run(main())
    assert len(registry(ctx)) == 0
    cancel()


class _ForeignDone(Context):
    """A parent that overrides done(): its children are watched by a listener."""

    def __init__(self, done_from: Context) -> None:
        self._d = done_from

    def deadline(self) -> float | None:
        return None

    def done(self) -> Done:
        return self._d.done()

    def err(self) -> Any:
        return self._d.err()

    def value(self, key: Any) -> Any:
        return None


def test_foreign_parent_watchers_are_removed_on_cancel() -> None:
    src, cancel = with_cancel(bg)
    foreign = _ForeignDone(src)
    for _ in range(1000):
        with_cancel(foreign)[1]()
        with_timeout(foreign, VERY_LONG)[1]()
    assert len(registry(src)) == 0
    cancel()
