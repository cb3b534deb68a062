"""A port of Go's ``context`` test suite (x_test.go, context_test.go, afterfunc_test.go,
net_test.go and the examples) to ctxmiddleware.

Numbers in the docstrings refer to section 3 of the Go context spec. Translation:
``context.Background`` is ``background``; a panic is a ``TypeError``; Go's nil Done
channel is a ``Done`` that never fires; "Done immediately" is ``done().is_set()``
right after the call; "eventually" is ``done().wait(QUIESCENT)``; goroutine
counters are ``_foreign_watchers``; the internal registry is ``_CancelCtx._children``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import await_done

import ctxmiddleware as cm
from ctxmiddleware import (
    Canceled,
    Context,
    DeadlineExceeded,
    Done,
    Key,
    after_func,
    background,
    cause,
    todo,
    with_cancel,
    with_cancel_cause,
    with_deadline,
    with_deadline_cause,
    with_timeout,
    with_timeout_cause,
    with_value,
    without_cancel,
)
from ctxmiddleware._core import _context as ctxmod
from ctxmiddleware._core import _timer as timermod
from ctxmiddleware._core._context import _AfterFunc, _CancelCtx

SHORT = 0.001  # Go's shortDuration (1ms)
VERY_LONG = 1000 * 3600.0  # Go's veryLongDuration (1000h)
FOREVER = 1e6  # TestCause's forever
QUIESCENT = 5.0  # Go's quiescent(t): how long "eventually" may take
NOT_YET = 0.02  # how long we watch to prove something does NOT happen

bg = background()

pytestmark = pytest.mark.timeout(20)


# -- helpers -------------------------------------------------------------------


def is_done(ctx: Context) -> bool:
    """Go's non-blocking ``select { case <-ctx.Done(): ... default: }``."""
    return ctx.done().is_set()


def eventually_done(ctx: Context) -> bool:
    return ctx.done().wait(QUIESCENT)


def children_of(ctx: Context) -> dict[int, Any]:
    assert isinstance(ctx, _CancelCtx)
    return ctx._children or {}


def live_children(ctx: Context) -> list[object]:
    """The registry entries of ``ctx``, weak references resolved, dead ones skipped."""
    out: list[object] = []
    for entry in children_of(ctx).values():
        if isinstance(entry, ctxmod._WeakRef):
            entry = entry()
            if entry is None:
                continue
        out.append(entry)
    return out


def parent_cancel_ctx(child: Context) -> _CancelCtx | None:
    """Go's parentCancelCtx(child.Context): the standard context ``child`` is linked to."""
    assert isinstance(child, _CancelCtx)
    link = child._link
    return link if isinstance(link, _CancelCtx) else None


def watchers() -> int:
    return ctxmod._foreign_watchers


@contextlib.contextmanager
def frozen_core_clock() -> Iterator[None]:
    """The core's time.monotonic() stands still inside the block (a deadline
    timer firing meanwhile finds itself early and re-arms)."""
    now = time.monotonic()
    saved = ctxmod._monotonic
    ctxmod._monotonic = lambda: now
    try:
        yield
    finally:
        ctxmod._monotonic = saved


def live_thread_timers() -> int:
    timers = timermod._thread_timers
    with timers._cond:
        return sum(1 for e in timers._heap if e[2] is not None)


class Never(Exception):
    pass


# -- foreign contexts ----------------------------------------------------------


class OtherContext(Context):
    """Go's ``otherContext{Context}``: a foreign type that only delegates."""

    def __init__(self, inner: Context) -> None:
        self.inner = inner

    def deadline(self) -> float | None:
        return self.inner.deadline()

    def done(self) -> Done:
        return self.inner.done()

    def err(self) -> cm.ContextError | None:
        return self.inner.err()

    def value(self, key: Any) -> Any:
        return self.inner.value(key)


class MyCtx(OtherContext):
    """Go's ``myCtx{Context}``: embeds only, so it is seen through."""


class MyDoneCtx(OtherContext):
    """Go's ``myDoneCtx``: a new, never-closed Done on every call."""

    def done(self) -> Done:
        return with_cancel(background())[0].done()


class CustomDoneContext(OtherContext):
    """Go's ``customDoneContext``: delegates everything but Done."""

    def __init__(self, inner: Context, donec: Done) -> None:
        super().__init__(inner)
        self.donec = donec

    def done(self) -> Done:
        return self.donec


class CustomCauseContext(Context):
    """Go's ``customCauseContext``: fully custom, Value always None."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._inner, self._close = with_cancel(background())
        self._err: cm.ContextError | None = None
        self._cancel_child: Callable[[], None] | None = None

    def deadline(self) -> float | None:
        return None

    def done(self) -> Done:
        return self._inner.done()

    def err(self) -> cm.ContextError | None:
        with self._mu:
            return self._err

    def value(self, key: Any) -> Any:
        return None

    def cancel(self) -> None:
        with self._mu:
            self._err = Canceled()
            cancel_child = self._cancel_child
        # Outside the lock (unlike Go's close(done)): listeners of the internal
        # context, our children's watchers included, run inside this call.
        self._close()
        if cancel_child is not None:
            cancel_child()

    def set_cancel_child(self, fn: Callable[[], None]) -> None:
        self._cancel_child = fn


class AfterFuncContext(Context):
    """afterfunc_test.go's ``afterFuncContext``: propagates only through after_func."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._done: Done | None = None
        self._keep: Context | None = None
        self.after_funcs: dict[object, Callable[[], object]] | None = {}
        self._err: cm.ContextError | None = None

    def deadline(self) -> float | None:
        return None

    def done(self) -> Done:
        with self._mu:
            if self._done is None:
                # A Done that exists (not Go's nil) but is never closed.
                self._keep = with_cancel(background())[0]
                self._done = self._keep.done()
            return self._done

    def err(self) -> cm.ContextError | None:
        with self._mu:
            return self._err

    def value(self, key: Any) -> Any:
        return None

    def after_func(self, f: Callable[[], object]) -> Callable[[], bool]:
        with self._mu:
            k = object()
            assert self.after_funcs is not None
            self.after_funcs[k] = f

        def stop() -> bool:
            with self._mu:
                if self.after_funcs is None or k not in self.after_funcs:
                    return False
                del self.after_funcs[k]
                return True

        return stop

    def cancel(self, err: cm.ContextError) -> None:
        with self._mu:
            if self._err is not None:
                return
            self._err = err
            funcs = self.after_funcs or {}
            self.after_funcs = None
        for f in funcs.values():
            threading.Thread(target=f, daemon=True).start()

    def registrations(self) -> int:
        with self._mu:
            return len(self.after_funcs or {})


# == 3.2 context_test.go (internal tests) ======================================


def test_parent_finishes_child() -> None:
    """(1) XTestParentFinishesChild."""
    parent, cancel = with_cancel(bg)
    cancel_child, _cc = with_cancel(parent)
    value_child = with_value(parent, "key", "value")
    timer_child, _tc = with_timeout(value_child, VERY_LONG)
    after_stop = after_func(parent, lambda: None)

    for c in (parent, cancel_child, timer_child, value_child):
        assert not is_done(c), c
        assert c.err() is None

    entries = live_children(parent)
    assert len(children_of(parent)) == 3
    assert cancel_child in entries
    assert timer_child in entries  # registered directly, below the value context
    assert sum(isinstance(e, _AfterFunc) for e in entries) == 1
    assert parent_cancel_ctx(cancel_child) is parent
    assert parent_cancel_ctx(timer_child) is parent

    cancel()
    assert len(children_of(parent)) == 0
    for c in (parent, cancel_child, value_child, timer_child):
        assert is_done(c), c
        assert isinstance(c.err(), Canceled)
    late = with_value(parent, "key", "value")
    assert is_done(late)
    assert isinstance(late.err(), Canceled)
    assert after_stop() is False  # the cancel started it


@pytest.mark.parametrize("cancelable", [False, True], ids=["background", "with_cancel"])
def test_child_finishes_first(cancelable: bool) -> None:
    """(2) XTestChildFinishesFirst."""
    parent = with_cancel(bg)[0] if cancelable else bg
    child, cancel = with_cancel(parent)
    assert not is_done(parent)
    assert not is_done(child)
    pcc = parent_cancel_ctx(child)
    if cancelable:
        assert pcc is parent
        assert live_children(parent) == [child]
    else:
        assert pcc is None
        assert child._link is None  # type: ignore[attr-defined]

    cancel()
    if cancelable:
        assert len(children_of(parent)) == 0
    assert is_done(child)
    assert isinstance(child.err(), Canceled)
    assert not is_done(parent)
    assert parent.err() is None


def test_cancel_removes() -> None:
    """(3) XTestCancelRemoves."""
    ctx, _ = with_cancel(bg)
    assert len(children_of(ctx)) == 0
    _c, cancel = with_cancel(ctx)
    assert len(children_of(ctx)) == 1
    cancel()
    assert len(children_of(ctx)) == 0

    ctx, _ = with_cancel(bg)
    assert len(children_of(ctx)) == 0
    _c, cancel = with_timeout(ctx, 60 * 60.0)
    assert len(children_of(ctx)) == 1
    cancel()
    assert len(children_of(ctx)) == 0

    ctx, _ = with_cancel(bg)
    assert len(children_of(ctx)) == 0
    stop = after_func(ctx, lambda: None)
    assert len(children_of(ctx)) == 1
    assert stop() is True
    assert len(children_of(ctx)) == 0


def test_custom_context_goroutines() -> None:
    """(4) XTestCustomContextGoroutines: watchers only for contexts that override done()."""
    g = watchers()

    def check(want: int) -> None:
        nonlocal g
        assert watchers() - g == want
        g = watchers()

    _, cancel0 = with_cancel(MyDoneCtx(bg))
    cancel0()
    check(1)

    _, cancel0 = with_timeout(MyDoneCtx(bg), VERY_LONG)
    cancel0()
    check(1)

    check(0)
    try:
        ctx1, cancel1 = with_cancel(bg)
        check(0)

        ctx2 = MyCtx(ctx1)
        ctx3, cancel3 = with_cancel(ctx2)
        check(0)  # the wrapper only embeds: seen through

        _, cancel3b = with_cancel(MyDoneCtx(ctx2))
        check(1)  # ctx1 is not providing Done, must not be used

        ctx4, cancel4 = with_timeout(ctx3, VERY_LONG)
        check(0)

        ctx5, cancel5 = with_cancel(ctx4)
        check(0)

        cancel5()
        check(0)

        _, cancel6 = with_timeout(ctx5, VERY_LONG)
        check(0)  # born cancelled

        cancel6()
        cancel1()
        _, cancel7 = with_cancel(ctx5)
        check(0)
        for f in (cancel3, cancel3b, cancel4, cancel7):
            f()
    finally:
        check(0)


# == 3.1 x_test.go ================================================================


@pytest.mark.parametrize(("factory", "name"), [(background, "background"), (todo, "todo")])
def test_background_todo(factory: Callable[[], Context], name: str) -> None:
    """5. TestBackground, 6. TestTODO."""
    c = factory()
    assert c is not None
    assert factory() is c
    assert str(c) == name
    assert c.deadline() is None
    assert c.err() is None
    assert c.value("anything") is None
    d = c.done()
    assert isinstance(d, Done)
    assert not d.is_set()  # Go: <-c.Done() blocks (nil channel)
    assert d.wait(NOT_YET) is False
    assert d.wait(0) is False


def test_with_cancel() -> None:
    """7. TestWithCancel: propagation through a seen-through wrapper is synchronous."""
    c1, cancel = with_cancel(bg)
    assert str(c1) == "background.with_cancel"
    o = OtherContext(c1)
    c2, _c2 = with_cancel(o)
    contexts: list[Context] = [c1, o, c2]
    for c in contexts:
        assert c.done() is not None
        assert c.err() is None
        assert not is_done(c)
    cancel()
    for c in contexts:
        assert is_done(c), c
        err = c.err()
        assert isinstance(err, Canceled)
        assert c.err() is err  # the same error every time


def _test_deadline(c: Context) -> None:
    assert eventually_done(c), f"context not timed out after {QUIESCENT}s"
    assert isinstance(c.err(), DeadlineExceeded)


def test_deadline_a_plain() -> None:
    """8a. TestDeadline: with_deadline(bg, now+1ms)."""
    c, _ = with_deadline(bg, time.monotonic() + SHORT)
    assert str(c).startswith("background.with_deadline(")
    _test_deadline(c)


def test_deadline_b_wrapped() -> None:
    """8b. TestDeadline: wrapped in otherContext."""
    c, _ = with_deadline(bg, time.monotonic() + SHORT)
    _test_deadline(OtherContext(c))


def test_deadline_c_later_child_keeps_parent_deadline() -> None:
    """8c. TestDeadline: a later deadline below an earlier one degrades to with_cancel."""
    c, _ = with_deadline(bg, time.monotonic() + SHORT)
    o = OtherContext(c)
    c2, _c2 = with_deadline(o, time.monotonic() + VERY_LONG)
    assert c2.deadline() == c.deadline()
    assert str(c2).endswith(".with_cancel")
    _test_deadline(c2)


@pytest.mark.parametrize("offset", [-SHORT, 0.0], ids=["inthepast", "now"])
def test_deadline_de_past(offset: float) -> None:
    """8d/8e. TestDeadline: a deadline in the past or now is done at once."""
    c, cancel = with_deadline(bg, time.monotonic() + offset)
    assert is_done(c)  # spec 6.2: cancelled before the constructor returns
    _test_deadline(c)
    err = c.err()
    cancel()  # a no-op
    assert c.err() is err


def test_timeout_a() -> None:
    """9a. TestTimeout."""
    c, _ = with_timeout(bg, SHORT)
    assert str(c).startswith("background.with_deadline(")
    _test_deadline(c)


def test_timeout_b() -> None:
    """9b. TestTimeout: wrapped in otherContext."""
    c, _ = with_timeout(bg, SHORT)
    _test_deadline(OtherContext(c))


def test_timeout_c() -> None:
    """9c. TestTimeout: a 1000h timeout below a 1ms one."""
    c, _ = with_timeout(bg, SHORT)
    o = OtherContext(c)
    c2, _c2 = with_timeout(o, VERY_LONG)
    _test_deadline(c2)


def test_canceled_timeout() -> None:
    """10. TestCanceledTimeout."""
    c, _ = with_timeout(bg, 1.0)
    o = OtherContext(c)
    c2, cancel = with_timeout(o, VERY_LONG)
    assert str(c2).endswith(".with_cancel")  # degraded: the parent's deadline is earlier
    cancel()
    assert is_done(c2)
    assert isinstance(c2.err(), Canceled)
    assert not is_done(c)


class Key1(int):
    """Go's ``type key1 int``."""


class Key2(int):
    """Go's ``type key2 int`` (its String() is not used: keys print as type names)."""


def test_values() -> None:
    """11. TestValues."""
    k1, k2, k3 = Key1(1), Key2(1), Key2(3)
    assert int(k1) == int(k2)  # equal as Python ints, yet different keys

    def check(c: Context, nm: str, v1: str, v2: str, v3: str) -> None:
        for key, want in ((k1, v1), (k2, v2), (k3, v3)):
            got = c.value(key)
            got_s = got if isinstance(got, str) else ""
            assert got_s == want, f"{nm}.value({key!r}) = {got!r}, want {want!r}"

    c0 = background()
    check(c0, "c0", "", "", "")

    c1 = with_value(background(), k1, "c1k1")
    check(c1, "c1", "c1k1", "", "")
    assert str(c1) == "background.with_value(Key1)"

    c2 = with_value(c1, k2, "c2k2")
    check(c2, "c2", "c1k1", "c2k2", "")
    assert str(c2) == "background.with_value(Key1).with_value(Key2)"

    c3 = with_value(c2, k3, "c3k3")
    check(c3, "c3", "c1k1", "c2k2", "c3k3")

    c4 = with_value(c3, k1, None)
    check(c4, "c4", "", "c2k2", "c3k3")
    assert str(c4) == (
        "background.with_value(Key1).with_value(Key2).with_value(Key2).with_value(Key1)"
    )

    o0 = OtherContext(background())
    check(o0, "o0", "", "", "")

    o1 = OtherContext(with_value(background(), k1, "c1k1"))
    check(o1, "o1", "c1k1", "", "")

    o2 = with_value(o1, k2, "o2k2")
    check(o2, "o2", "c1k1", "o2k2", "")

    o3 = OtherContext(c4)
    check(o3, "o3", "", "c2k2", "c3k3")

    o4 = with_value(o3, k3, None)
    check(o4, "o4", "", "c2k2", "")


def test_value_key_equality() -> None:
    """11 (Python): keys match on type and value, or identity."""
    c = with_value(with_value(with_value(bg, 1, "int"), 1.0, "float"), True, "bool")
    assert c.value(1) == "int"
    assert c.value(1.0) == "float"
    assert c.value(True) == "bool"
    assert c.value(Key1(1)) is None

    a: Key[str] = Key("x")
    b: Key[str] = Key("x")
    c = with_value(bg, a, "a")
    assert c.value(a) == "a"
    assert c.value(b) is None  # Key objects compare by identity
    assert str(c) == "background.with_value(x)"

    c = with_value(bg, "k", "v")
    assert c.value("".join(["k"])) == "v"  # equal strings are the same key
    nan = float("nan")
    assert with_value(bg, nan, "nan").value(nan) == "nan"  # identity matches


def test_allocs_no_threads_no_timers() -> None:
    """12. TestAllocs, in spirit: standard contexts start no thread and leak no timer."""
    # Warm up the shared deadline thread (started once per process, on demand).
    warm, _ = with_timeout(bg, SHORT)
    assert eventually_done(warm)
    threads = set(threading.enumerate())
    timers = live_thread_timers()

    k1 = Key1(1)
    for _ in range(100):
        assert background() is background()

        c = with_value(bg, k1, None)
        assert c.value(k1) is None

        c, cancel = with_timeout(bg, 1e-9)
        assert c.done().wait(QUIESCENT)
        cancel()

        c, cancel = with_cancel(bg)
        cancel()
        assert c.done().wait(QUIESCENT)

        # The core's clock stands still from with_timeout to cancel (as if
        # both ran within 5 ms): cancel() wins however slow the machine is.
        with frozen_core_clock():
            c, cancel = with_timeout(bg, 0.005)
            cancel()
        assert c.done().wait(QUIESCENT)
        assert isinstance(c.err(), Canceled)

    assert set(threading.enumerate()) - threads == set()
    assert live_thread_timers() == timers


def _build_tree() -> tuple[list[Context], list[Callable[[], None]]]:
    root, cancel = with_cancel(bg)
    ctxs: list[Context] = [root]
    cancels: list[Callable[[], None]] = [cancel]
    i = 0
    while len(ctxs) < 100:
        for _ in range(4):
            c, f = with_cancel(ctxs[i])
            ctxs.append(c)
            cancels.append(f)
        i += 1
    return ctxs, cancels


def test_simultaneous_cancels() -> None:
    """13. TestSimultaneousCancels: 101 contexts cancelled at once from 101 threads."""
    ctxs, cancels = _build_tree()
    assert len(ctxs) == 101
    random.shuffle(cancels)
    start = threading.Barrier(len(cancels))

    def run(f: Callable[[], None]) -> None:
        start.wait()
        f()

    threads = [threading.Thread(target=run, args=(f,)) for f in cancels]
    for t in threads:
        t.start()
    for c in ctxs:
        assert c.done().wait(QUIESCENT), "timed out waiting for Done: deadlock?"
        assert isinstance(c.err(), Canceled)
    for t in threads:
        t.join(QUIESCENT)
        assert not t.is_alive(), "a cancel function did not return: deadlock?"
    assert not children_of(ctxs[0])


def test_interlocked_cancels() -> None:
    """14. TestInterlockedCancels."""
    parent, cancel_parent = with_cancel(bg)
    child, cancel_child = with_cancel(parent)

    def waiter() -> None:
        parent.done().wait(QUIESCENT)
        cancel_child()

    t = threading.Thread(target=waiter)
    t.start()
    cancel_parent()
    assert child.done().wait(QUIESCENT), "timed out waiting for child.done()"
    t.join(QUIESCENT)
    assert not t.is_alive()


def _test_layers(seed: int, with_timeouts: bool) -> None:
    rng = random.Random(seed)
    ctx: Context = bg
    vals: list[object] = []
    cancels: list[Callable[[], None]] = []
    num_timers = 0
    timeout = SHORT if with_timeouts else VERY_LONG
    i = 0
    while i < 30 or num_timers == 0 or len(cancels) == 0 or len(vals) == 0:
        kind = rng.randrange(3)
        if kind == 0:
            v = object()  # a fresh pointer, key and value at once
            ctx = with_value(ctx, v, v)
            vals.append(v)
        elif kind == 1:
            ctx, cancel = with_cancel(ctx)
            cancels.append(cancel)
        else:
            ctx, cancel = with_timeout(ctx, timeout)
            cancels.append(cancel)
            num_timers += 1
        i += 1

    def check_values(when: str) -> None:
        for key in vals:
            assert ctx.value(key) is key, f"{when}: value lost"

    if not with_timeouts:
        assert not is_done(ctx)
    assert str(ctx).startswith("background.")
    check_values("before cancel")
    if with_timeouts:
        assert ctx.done().wait(QUIESCENT)
        assert isinstance(ctx.err(), DeadlineExceeded)
    else:
        rng.choice(cancels)()
        assert is_done(ctx)  # synchronous through every layer
        assert isinstance(ctx.err(), Canceled)
    check_values("after cancel")
    for cancel in cancels:
        cancel()


@pytest.mark.parametrize("seed", range(5))
def test_layers_cancel(seed: int) -> None:
    """15. TestLayersCancel."""
    _test_layers(seed, with_timeouts=False)


@pytest.mark.parametrize("seed", range(5))
def test_layers_timeout(seed: int) -> None:
    """16. TestLayersTimeout."""
    _test_layers(seed, with_timeouts=True)


def test_with_cancel_canceled_parent() -> None:
    """17. TestWithCancelCanceledParent."""
    parent, pcancel = with_cancel_cause(bg)
    why = RuntimeError("Because!")
    pcancel(why)
    c, _ = with_cancel(parent)
    assert is_done(c)
    assert isinstance(c.err(), Canceled)
    assert cause(c) is why
    assert parent._children is None  # type: ignore[attr-defined]  # spec 6.5


def test_with_cancel_simultaneously_canceled_parent() -> None:
    """18. TestWithCancelSimultaneouslyCanceledParent: 100 rounds."""
    for _ in range(100):
        parent, pcancel = with_cancel_cause(bg)
        why = RuntimeError("simultaneous")
        t = threading.Thread(target=pcancel, args=(why,))
        t.start()
        c, _ = with_cancel(parent)
        assert c.done().wait(QUIESCENT)
        assert isinstance(c.err(), Canceled)
        assert cause(c) is why
        t.join()


def test_with_value_checks_key() -> None:
    """19. TestWithValueChecksKey."""
    with pytest.raises(TypeError):
        with_value(bg, bytearray(b"foo"), "bar")  # type: ignore[arg-type]  # unhashable
    with pytest.raises(TypeError, match="nil key"):
        with_value(bg, None, "bar")


@pytest.mark.parametrize(
    "make",
    [
        lambda: with_cancel(None),  # type: ignore[arg-type]
        lambda: with_cancel_cause(None),  # type: ignore[arg-type]
        lambda: with_deadline(None, time.monotonic() + SHORT),  # type: ignore[arg-type]
        lambda: with_deadline_cause(None, time.monotonic(), None),  # type: ignore[arg-type]
        lambda: with_timeout(None, SHORT),  # type: ignore[arg-type]
        lambda: with_timeout_cause(None, SHORT, None),  # type: ignore[arg-type]
        lambda: with_value(None, "foo", "bar"),  # type: ignore[arg-type]
        lambda: without_cancel(None),  # type: ignore[arg-type]
        lambda: after_func(None, lambda: None),  # type: ignore[arg-type]
        lambda: cm.bind(None),  # type: ignore[arg-type]
    ],
)
def test_invalid_derived_fail(make: Callable[[], object]) -> None:
    """20. TestInvalidDerivedFail (and the other constructors)."""
    with pytest.raises(TypeError, match="cannot create context from None parent"):
        make()


def test_invalid_parent_type() -> None:
    with pytest.raises(TypeError):
        with_cancel("not a context")  # type: ignore[arg-type]


def test_deadline_exceeded_supports_timeout() -> None:
    """21. TestDeadlineExceededSupportsTimeout, 38. TestDeadlineExceededIsNetError."""
    c, _ = with_timeout(bg, 0)
    err = c.err()
    assert isinstance(err, DeadlineExceeded)
    assert isinstance(err, TimeoutError)  # Go: Timeout() == true
    assert isinstance(err, OSError)  # Go: a net.Error
    assert isinstance(err, cm.ContextError)
    assert str(err) == "context deadline exceeded"
    assert str(Canceled()) == "context canceled"
    assert not isinstance(Canceled(), TimeoutError)


# -- 22. TestCause -------------------------------------------------------------

PARENT_CAUSE = RuntimeError("parentCause")
CHILD_CAUSE = RuntimeError("childCause")
TOO_SLOW = RuntimeError("tooSlow")
FINISHED_EARLY = RuntimeError("finishedEarly")
CANCELED, DEADLINE = "Canceled", "DeadlineExceeded"  # "the err itself" markers


def _row_with_cancel_cause(c: BaseException | None) -> Context:
    ctx, cancel = with_cancel_cause(bg)
    cancel(c)
    return ctx


def _row_tree(
    parent_cause_fn: bool, child_cause_fn: bool, parent_first: bool
) -> Context:
    cancel_p: Callable[..., None]
    cancel_c: Callable[..., None]
    if parent_cause_fn:
        p, cancel_p = with_cancel_cause(bg)
    else:
        p, cancel_p = with_cancel(bg)
    if child_cause_fn:
        c, cancel_c = with_cancel_cause(p)
    else:
        c, cancel_c = with_cancel(p)

    p_args: tuple[BaseException, ...] = (PARENT_CAUSE,) if parent_cause_fn else ()
    c_args: tuple[BaseException, ...] = (CHILD_CAUSE,) if child_cause_fn else ()

    def cp() -> None:
        cancel_p(*p_args)

    def cc() -> None:
        cancel_c(*c_args)

    if parent_first:
        cp()
        cc()
    else:
        cc()
        cp()
    return c


def _row_timeout(timeout: float, why: BaseException | None) -> Context:
    ctx, cancel = with_timeout_cause(bg, timeout, why) if why else with_timeout(bg, timeout)
    cancel()
    return ctx


def _row_stacked(timeout: float) -> Context:
    p, cancel_p = with_cancel_cause(bg)
    c, _ = with_timeout_cause(p, timeout, TOO_SLOW)
    cancel_p(FINISHED_EARLY)
    return c


def _row_without_cancel_canceled() -> Context:
    p, cancel_p = with_cancel_cause(bg)
    c = without_cancel(p)
    cancel_p(FINISHED_EARLY)
    return c


def _row_without_cancel_timeout() -> Context:
    p, cancel_p = with_timeout_cause(bg, 0, TOO_SLOW)
    c = without_cancel(p)
    cancel_p()
    return c


CAUSE_ROWS: list[tuple[str, Callable[[], Context], str | None, object]] = [
    ("Background", background, None, None),
    ("TODO", todo, None, None),
    ("WithCancel", lambda: (lambda c: (c[1](), c[0])[1])(with_cancel(bg)), CANCELED, CANCELED),
    ("WithCancelCause", lambda: _row_with_cancel_cause(PARENT_CAUSE), CANCELED, PARENT_CAUSE),
    ("WithCancelCause nil", lambda: _row_with_cancel_cause(None), CANCELED, CANCELED),
    ("parent cause before child", lambda: _row_tree(True, True, True), CANCELED, PARENT_CAUSE),
    ("parent cause after child", lambda: _row_tree(True, True, False), CANCELED, CHILD_CAUSE),
    ("parent cause before nil", lambda: _row_tree(True, False, True), CANCELED, PARENT_CAUSE),
    ("parent cause after nil", lambda: _row_tree(True, False, False), CANCELED, CANCELED),
    ("child cause after nil", lambda: _row_tree(False, True, True), CANCELED, CANCELED),
    ("child cause before nil", lambda: _row_tree(False, True, False), CANCELED, CHILD_CAUSE),
    ("WithTimeout", lambda: _row_timeout(0, None), DEADLINE, DEADLINE),
    ("WithTimeout canceled", lambda: _row_timeout(FOREVER, None), CANCELED, CANCELED),
    ("WithTimeoutCause", lambda: _row_timeout(0, TOO_SLOW), DEADLINE, TOO_SLOW),
    ("WithTimeoutCause canceled", lambda: _row_timeout(FOREVER, TOO_SLOW), CANCELED, CANCELED),
    ("WithTimeoutCause stacked", lambda: _row_stacked(0), DEADLINE, TOO_SLOW),
    ("WithTimeoutCause stacked canceled", lambda: _row_stacked(FOREVER), CANCELED, FINISHED_EARLY),
    ("WithoutCancel", lambda: without_cancel(bg), None, None),
    ("WithoutCancel canceled", _row_without_cancel_canceled, None, None),
    ("WithoutCancel timeout", _row_without_cancel_timeout, None, None),
]


@pytest.mark.parametrize(
    ("make", "want_err", "want_cause"),
    [pytest.param(m, e, c, id=n) for n, m, e, c in CAUSE_ROWS],
)
def test_cause(make: Callable[[], Context], want_err: str | None, want_cause: object) -> None:
    """22. TestCause: every row of the table."""
    ctx = make()
    err = ctx.err()
    if want_err is None:
        assert err is None
    elif want_err == CANCELED:
        assert type(err) is Canceled
    else:
        assert type(err) is DeadlineExceeded
    got = cause(ctx)
    if want_cause is None:
        assert got is None
    elif want_cause in (CANCELED, DEADLINE):
        assert got is err  # no cause given: Cause is Err, the very same object
    else:
        assert got is want_cause
    if err is not None:
        assert cause(ctx) is got  # stable


def test_cause_race() -> None:
    """23. TestCauseRace: cause() is only ever None or the final cause."""
    ctx, cancel = with_cancel_cause(bg)
    why = RuntimeError("TestCauseRace")
    t = threading.Thread(target=cancel, args=(why,))
    t.start()
    deadline = time.monotonic() + QUIESCENT
    while True:
        got = cause(ctx)
        if got is not None:
            assert got is why
            break
        assert time.monotonic() < deadline
        time.sleep(0)
    t.join()


def test_without_cancel() -> None:
    """24. TestWithoutCancel."""
    ctx = without_cancel(with_value(bg, "key", "value"))
    assert ctx.deadline() is None
    assert not ctx.done().is_set()
    assert ctx.done().wait(0) is False
    assert ctx.err() is None
    assert ctx.value("key") == "value"
    assert str(ctx) == "background.with_value(key).without_cancel"


def test_without_cancel_of_canceled_and_expired_parent() -> None:
    """1.10 / spec 6.8: without_cancel is never cancelled; its children are not linked."""
    p, cancel_p = with_timeout_cause(bg, VERY_LONG, TOO_SLOW)
    w = without_cancel(with_value(p, "k", "v"))
    c, cancel_c = with_cancel(w)
    assert c.deadline() is None
    assert not children_of(p)  # not linked to the original parent
    cancel_p()
    assert w.err() is None and cause(w) is None
    assert not is_done(c) and cause(c) is None
    cancel_c()
    assert isinstance(c.err(), Canceled)
    assert cause(c) is c.err()
    assert c.value("k") == "v"


def test_custom_context_propagation() -> None:
    """25. TestCustomContextPropagation: a wrapper that overrides done() (a watcher)."""
    why = RuntimeError("TestCustomContextPropagation")
    ctx1, cancel1 = with_cancel_cause(bg)
    donec_ctx, close_donec = with_cancel(bg)
    ctx2 = CustomDoneContext(ctx1, donec_ctx.done())
    before = watchers()
    ctx3, cancel3 = with_cancel(ctx2)
    assert watchers() == before + 1
    try:
        cancel1(why)
        close_donec()
        assert ctx3.done().wait(QUIESCENT)
        assert isinstance(ctx3.err(), Canceled)
        assert cause(ctx3) is why
    finally:
        cancel3()


def test_custom_context_cause() -> None:
    """26. TestCustomContextCause: three phases."""
    # Phase 1: cause falls back to err() for a fully custom context.
    ccc = CustomCauseContext()
    ccc.cancel()
    assert isinstance(ccc.err(), Canceled)
    assert cause(ccc) is ccc.err()

    # Phase 2: a child cancelled with a cause; the parent is unaffected.
    ccc = CustomCauseContext()
    why = RuntimeError("TestCustomContextCause")
    ctx, cause_func = with_cancel_cause(ccc)
    cause_func(why)
    assert isinstance(ctx.err(), Canceled)
    assert cause(ctx) is why
    assert ccc.err() is None
    assert cause(ccc) is None
    ccc.cancel()
    assert isinstance(ctx.err(), Canceled)
    assert cause(ctx) is why
    assert isinstance(ccc.err(), Canceled)
    assert cause(ccc) is ccc.err()

    # Phase 3: the custom context cancels its child itself.
    ccc = CustomCauseContext()
    ctx, cancel_func = with_cancel(ccc)
    ccc.set_cancel_child(cancel_func)
    ccc.cancel()
    assert isinstance(ctx.err(), Canceled)
    assert cause(ctx) is ctx.err()
    assert isinstance(ccc.err(), Canceled)
    assert cause(ccc) is ccc.err()


# -- 27-31 AfterFunc -----------------------------------------------------------------


def test_after_func_called_after_cancel() -> None:
    """27. TestAfterFuncCalledAfterCancel."""
    ctx, cancel = with_cancel(bg)
    donec = threading.Event()
    stop = after_func(ctx, donec.set)
    assert not donec.wait(NOT_YET), "AfterFunc called before context is done"
    cancel()
    assert donec.wait(QUIESCENT), "AfterFunc not called after context is canceled"
    assert stop() is False


def test_after_func_called_after_timeout() -> None:
    """28. TestAfterFuncCalledAfterTimeout."""
    ctx, _ = with_timeout(bg, SHORT)
    donec = threading.Event()
    after_func(ctx, donec.set)
    assert donec.wait(QUIESCENT), "AfterFunc not called after context times out"


def test_after_func_called_immediately() -> None:
    """29. TestAfterFuncCalledImmediately: still in a thread of its own."""
    ctx, cancel = with_cancel(bg)
    cancel()
    ran_in: list[threading.Thread] = []
    donec = threading.Event()

    def f() -> None:
        ran_in.append(threading.current_thread())
        donec.set()

    after_func(ctx, f)
    assert donec.wait(QUIESCENT)
    assert ran_in[0] is not threading.current_thread()


def test_after_func_not_called_after_stop() -> None:
    """30. TestAfterFuncNotCalledAfterStop."""
    ctx, cancel = with_cancel(bg)
    donec = threading.Event()
    stop = after_func(ctx, donec.set)
    assert stop() is True
    cancel()
    assert not donec.wait(NOT_YET), "AfterFunc called after stop"
    assert stop() is False


def test_after_func_called_asynchronously() -> None:
    """31. TestAfterFuncCalledAsynchronously: cancel() returns while f blocks."""
    ctx, cancel = with_cancel(bg)
    release = threading.Event()
    released: list[bool] = []
    finished = threading.Event()

    def f() -> None:
        released.append(release.wait(QUIESCENT))  # Go: an unbuffered send
        finished.set()

    stop = after_func(ctx, f)
    try:
        cancel()  # must return although f cannot finish until we release it
        release.set()
        assert finished.wait(QUIESCENT)
        assert released == [True], "cancel() waited for the after_func function"
    finally:
        release.set()
        stop()


def test_after_func_runs_once_and_stop_is_exclusive() -> None:
    """1.11: exactly one of "f started" or "stop() returned True", racing from threads."""
    for _ in range(50):
        ctx, cancel = with_cancel(bg)
        runs: list[int] = []
        ran = threading.Event()

        def f(runs: list[int] = runs, ran: threading.Event = ran) -> None:
            runs.append(1)
            ran.set()

        stop = after_func(ctx, f)
        results: list[bool] = []
        t = threading.Thread(target=lambda s=stop, r=results: r.append(s()))
        t.start()
        cancel()
        cancel()
        t.join()
        if results[0]:
            assert not ran.wait(NOT_YET / 4)
            assert runs == []
        else:
            assert ran.wait(QUIESCENT)
            assert runs == [1]


def test_after_func_on_never_cancelable() -> None:
    """Spec 6.6: f never runs; stop() is True once, then False."""
    for ctx in (bg, todo(), without_cancel(with_cancel(bg)[0]), with_value(bg, "k", "v")):
        donec = threading.Event()
        stop = after_func(ctx, donec.set)
        assert stop() is True
        assert stop() is False
        assert not donec.wait(NOT_YET / 4)


def test_after_func_independent_registrations() -> None:
    ctx, cancel = with_cancel(bg)
    a, b = threading.Event(), threading.Event()
    after_func(ctx, a.set)
    stop_b = after_func(ctx, b.set)
    assert stop_b() is True
    cancel()
    assert a.wait(QUIESCENT)
    assert not b.wait(NOT_YET)


# -- 32-37 afterfunc_test.go -------------------------------------------------------------


def test_custom_context_after_func_cancel() -> None:
    """32. TestCustomContextAfterFuncCancel."""
    ctx0 = AfterFuncContext()
    before = watchers()
    ctx1, cancel = with_cancel(ctx0)
    assert watchers() == before  # after_func path: no watcher
    try:
        ctx0.cancel(Canceled())
        assert ctx1.done().wait(QUIESCENT)
        assert isinstance(ctx1.err(), Canceled)
    finally:
        cancel()


def test_custom_context_after_func_timeout() -> None:
    """33. TestCustomContextAfterFuncTimeout."""
    ctx0 = AfterFuncContext()
    ctx1, cancel = with_timeout(ctx0, VERY_LONG)
    try:
        ctx0.cancel(Canceled())
        assert ctx1.done().wait(QUIESCENT)
        assert isinstance(ctx1.err(), Canceled)
    finally:
        cancel()


def test_custom_context_after_func_after_func() -> None:
    """34. TestCustomContextAfterFuncAfterFunc."""
    ctx0 = AfterFuncContext()
    donec = threading.Event()
    stop = after_func(ctx0, donec.set)
    try:
        ctx0.cancel(Canceled())
        assert donec.wait(QUIESCENT)
    finally:
        stop()


def test_custom_context_after_func_unregister_cancel() -> None:
    """35. TestCustomContextAfterFuncUnregisterCancel."""
    ctx0 = AfterFuncContext()
    _, cancel1 = with_cancel(ctx0)
    _, cancel2 = with_cancel(ctx0)
    assert ctx0.registrations() == 2
    cancel1()
    cancel2()
    assert ctx0.registrations() == 0


def test_custom_context_after_func_unregister_timeout() -> None:
    """36. TestCustomContextAfterFuncUnregisterTimeout."""
    ctx0 = AfterFuncContext()
    _, cancel = with_timeout(ctx0, VERY_LONG)
    assert ctx0.registrations() == 1
    cancel()
    assert ctx0.registrations() == 0


def test_custom_context_after_func_unregister_after_func() -> None:
    """37. TestCustomContextAfterFuncUnregisterAfterFunc."""
    ctx0 = AfterFuncContext()
    stop = after_func(ctx0, lambda: None)
    assert ctx0.registrations() == 1
    assert stop() is True
    assert ctx0.registrations() == 0


# == 6. Extra invariants ==================================================================


def test_done_is_stable() -> None:
    """6.1: done() is the same object every call, before and after cancel."""
    a, cancel_a = with_cancel(bg)
    d = a.done()
    cancel_a()
    assert a.done() is d and d.is_set()

    b, cancel_b = with_cancel(bg)
    cancel_b()  # Done never requested before the cancel
    d = b.done()
    assert d.is_set() and b.done() is d
    v = with_value(b, "k", 1)
    assert v.done() is d
    assert background().done() is background().done()


def test_deadline_propagation() -> None:
    """2.4.10 / 6.3: a child never has a later deadline than its parent."""
    p, cancel_p = with_timeout_cause(bg, 10.0, TOO_SLOW)
    d = p.deadline()
    assert d is not None
    later, _ = with_deadline_cause(p, d + 5, RuntimeError("dropped"))
    assert later.deadline() == d
    assert str(later).endswith(".with_cancel")
    equal, _e = with_deadline(p, d)  # equal is not earlier: a timer context of its own
    assert re.fullmatch(r"background\.with_deadline\([^)]*\)\.with_deadline\(.*\)", str(equal))
    earlier, _ = with_deadline(p, d - 5)
    assert earlier.deadline() == d - 5
    via_value, _v = with_cancel(with_value(p, "k", "v"))
    assert via_value.deadline() == d
    # The parent expiring gives the degraded child the parent's err and cause.
    p2, _p2 = with_timeout_cause(bg, SHORT, TOO_SLOW)
    c2, _c2 = with_timeout_cause(p2, VERY_LONG, RuntimeError("dropped"))
    assert c2.done().wait(QUIESCENT)
    assert isinstance(c2.err(), DeadlineExceeded)
    assert cause(c2) is TOO_SLOW
    cancel_p()


def test_timer_cancel_semantics() -> None:
    """2.5: a user cancel before expiry is Canceled even with a cause; parent cancel wins."""
    c, cancel = with_timeout_cause(bg, VERY_LONG, TOO_SLOW)
    cancel()
    assert type(c.err()) is Canceled
    assert cause(c) is c.err()

    p, cancel_p = with_cancel_cause(bg)
    c, _ = with_timeout_cause(p, VERY_LONG, TOO_SLOW)
    cancel_p(FINISHED_EARLY)
    assert type(c.err()) is Canceled
    assert cause(c) is FINISHED_EARLY


def test_cancel_is_idempotent_first_cause_wins() -> None:
    """1.4 / 2.4.2-3: only the first cancellation counts."""
    ctx, cancel = with_cancel_cause(bg)
    cancel(PARENT_CAUSE)
    err = ctx.err()
    cancel(CHILD_CAUSE)
    cancel(None)
    assert ctx.err() is err
    assert cause(ctx) is PARENT_CAUSE


def test_derived_from_canceled_parent_never_registers() -> None:
    """6.5: no registration with a cancelled parent, no watcher for a done foreign one."""
    p, cancel_p = with_cancel_cause(bg)
    cancel_p(PARENT_CAUSE)
    makers: list[Callable[[], Context]] = [
        lambda: with_cancel(p)[0],
        lambda: with_timeout(p, VERY_LONG)[0],
        lambda: with_cancel(with_value(p, "k", "v"))[0],
    ]
    for make in makers:
        c = make()
        assert is_done(c)
        assert cause(c) is PARENT_CAUSE
        assert p._children is None  # type: ignore[attr-defined]
        assert getattr(c, "_timer", None) is None  # no timer started
    donec_ctx, close = with_cancel(bg)
    close()
    before = watchers()
    foreign = CustomDoneContext(p, donec_ctx.done())
    c, _ = with_cancel(foreign)
    assert is_done(c)
    assert cause(c) is PARENT_CAUSE
    assert watchers() == before


def test_cause_through_value_layers() -> None:
    """6.7: value layers are transparent to cause()."""
    p, cancel_p = with_cancel_cause(bg)
    v = with_value(with_value(p, "a", 1), Key("b"), 2)
    assert cause(v) is None
    cancel_p(PARENT_CAUSE)
    assert cause(v) is PARENT_CAUSE
    assert isinstance(v.err(), Canceled)
    assert cause(OtherContext(v)) is PARENT_CAUSE


def test_str_of_value_context_shows_key_type_not_value() -> None:
    """6.9: a key that is neither a Key nor a str prints as its type name; values never."""
    c = with_value(bg, "k", 42)
    assert str(c) == "background.with_value(k)"
    c = with_value(bg, 42, "k")
    assert str(c) == "background.with_value(int)"
    c2, _ = with_cancel(c)
    assert str(without_cancel(c2)) == "background.with_value(int).with_cancel.without_cancel"
    assert str(with_cancel(OtherContext(bg))[0]) == "OtherContext.with_cancel"


# == 3.5 Examples ============================================================================


def test_example_with_cancel() -> None:
    """E1. ExampleWithCancel: a generator stops (does not leak) once the context is done."""

    async def main() -> list[int]:
        ctx, cancel = with_cancel(bg)
        out: asyncio.Queue[int] = asyncio.Queue(maxsize=1)

        async def gen() -> None:
            n = 1
            done = asyncio.ensure_future(await_done(ctx.done()))
            try:
                while True:
                    put = asyncio.ensure_future(out.put(n))
                    await asyncio.wait({put, done}, return_when=asyncio.FIRST_COMPLETED)
                    if done.done():
                        put.cancel()
                        return
                    n += 1
            finally:
                done.cancel()

        task = asyncio.create_task(gen())
        got: list[int] = []
        try:
            while True:
                got.append(await out.get())
                if got[-1] == 5:
                    break
        finally:
            cancel()
        await asyncio.wait_for(task, QUIESCENT)  # the generator returned
        return got

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_example_with_deadline() -> None:
    """E2. ExampleWithDeadline."""
    ctx, cancel = with_deadline(bg, time.monotonic() + SHORT)
    try:
        never = threading.Event()
        assert not never.is_set()
        assert ctx.done().wait(QUIESCENT)
        assert str(ctx.err()) == "context deadline exceeded"
    finally:
        cancel()


def test_example_with_timeout() -> None:
    """E3. ExampleWithTimeout, in async code (the deadline fires on the loop)."""

    async def main() -> str:
        ctx, cancel = with_timeout(bg, SHORT)
        try:
            overslept = asyncio.ensure_future(asyncio.sleep(QUIESCENT))
            done = asyncio.ensure_future(await_done(ctx.done()))
            finished, _ = await asyncio.wait(
                {overslept, done}, return_when=asyncio.FIRST_COMPLETED
            )
            overslept.cancel()
            assert done in finished
            return str(ctx.err())
        finally:
            cancel()

    assert asyncio.run(main()) == "context deadline exceeded"


class FavContextKey(str):
    """Go's ``type favContextKey string``."""


def test_example_with_value() -> None:
    """E4. ExampleWithValue."""

    def f(ctx: Context, k: FavContextKey) -> str:
        v = ctx.value(k)
        if v is not None:
            return f"found value: {v}"
        return f"key not found: {k}"

    k = FavContextKey("language")
    ctx = with_value(bg, k, "Go")
    assert f(ctx, k) == "found value: Go"
    assert f(ctx, FavContextKey("color")) == "key not found: color"
    assert ctx.value("language") is None  # a plain str is another key type


def test_example_after_func_cond() -> None:
    """E5. ExampleAfterFunc_cond: wake condition waiters when the context is done."""

    def wait_on_cond(ctx: Context, cond: threading.Condition, pred: Callable[[], bool]) -> (
        cm.ContextError | None
    ):
        def wake() -> None:
            with cond:
                cond.notify_all()

        stopf = after_func(ctx, wake)
        try:
            with cond:
                while not pred():
                    err = ctx.err()
                    if err is not None:
                        return err
                    cond.wait(QUIESCENT)
                return None
        finally:
            stopf()

    cond = threading.Condition()
    results: list[object] = []

    def worker() -> None:
        ctx, cancel = with_timeout(bg, SHORT)
        try:
            results.append(wait_on_cond(ctx, cond, lambda: False))
        finally:
            cancel()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(QUIESCENT)
        assert not t.is_alive()
    assert [str(r) for r in results] == ["context deadline exceeded"] * 4


def test_example_after_func_connection() -> None:
    """E6. ExampleAfterFunc_connection: interrupt a blocking read when the context ends."""
    conn, peer = socket.socketpair()
    wake_r, wake_w = os.pipe()
    try:

        def read_from_conn(ctx: Context) -> bytes | cm.ContextError | None:
            stopc = threading.Event()

            def interrupt() -> None:  # Go: conn.SetReadDeadline(time.Now())
                os.write(wake_w, b"x")
                stopc.set()

            stop = after_func(ctx, interrupt)
            ready, _, _ = select.select([conn.fileno(), wake_r], [], [], QUIESCENT)
            data = conn.recv(1024) if conn.fileno() in ready else None
            if not stop():
                # The interrupt ran: wait for it, then undo it.
                stopc.wait()
                os.read(wake_r, 1)
                return ctx.err()
            return data

        ctx, cancel = with_timeout(bg, SHORT)
        try:
            assert str(read_from_conn(ctx)) == "context deadline exceeded"
        finally:
            cancel()
        # The connection is usable afterwards.
        ctx, cancel = with_timeout(bg, VERY_LONG)
        try:
            peer.sendall(b"hi")
            assert read_from_conn(ctx) == b"hi"
        finally:
            cancel()
    finally:
        conn.close()
        peer.close()
        os.close(wake_r)
        os.close(wake_w)


def test_example_after_func_merge() -> None:
    """E7. ExampleAfterFunc_merge."""

    def merge_cancel(
        ctx: Context, cancel_ctx: Context
    ) -> tuple[Context, Callable[[], None]]:
        merged, cancel = with_cancel_cause(ctx)
        stop = after_func(cancel_ctx, lambda: cancel(cause(cancel_ctx)))

        def cancel_merged() -> None:
            stop()
            cancel(Canceled())

        return merged, cancel_merged

    ctx1, cancel1 = with_cancel_cause(bg)
    ctx2, cancel2 = with_cancel_cause(bg)
    why = RuntimeError("ctx2 canceled")
    ctx, cancel = merge_cancel(ctx1, ctx2)
    try:
        cancel2(why)
        assert ctx.done().wait(QUIESCENT)
        assert str(cause(ctx)) == "ctx2 canceled"
        assert cause(ctx) is why
    finally:
        cancel()
        cancel1(None)


@contextlib.contextmanager
def _no_new_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) - before == set()


def test_seen_through_and_foreign_parents_start_no_thread() -> None:
    """2.4.9: watchers for foreign parents are listeners, not threads."""
    warm, _ = with_timeout(bg, SHORT)
    assert eventually_done(warm)
    with _no_new_threads():
        p, cancel = with_cancel(bg)
        c1, c1c = with_cancel(MyCtx(p))
        c2, c2c = with_cancel(MyDoneCtx(p))
        c3, c3c = with_timeout(CustomDoneContext(bg, p.done()), VERY_LONG)
        cancel()
        assert is_done(c1)
        assert c3.done().wait(QUIESCENT)
        for f in (c1c, c2c, c3c):
            f()
        assert is_done(c2)
