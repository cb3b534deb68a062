"""Go's ``context`` package, native to asyncio and threads.

A :class:`Context` carries a deadline, a cancellation signal and request-scoped
values across API boundaries. Contexts form a tree: each derived context has a
parent, and cancelling a context cancels every context derived from it, right
away (when ``cancel()`` returns, every descendant built by this module is done).
Cancellation never flows upwards.

Locking: one module-wide lock guards every cancellation tree. It is held only
for short, non-blocking bookkeeping; anything that may run user code or wake
other threads (listeners, ``after_func`` functions, foreign ``stop`` callables)
runs after it is released, so nothing can deadlock on it.

Memory: a parent refers to its children weakly, so a derived context whose
cancel function was forgotten is freed as soon as nobody uses it (Go keeps it
until the parent is cancelled). Pending timers and ``after_func`` registrations
hold their context strongly until they fire or are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import numbers
import threading
import time
import weakref
from collections.abc import Callable, Generator, Hashable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload

from ._errors import Canceled, ContextError, DeadlineExceeded
from ._scope import CancelScope
from ._timer import Timer, start_timer

__all__ = [
    "CancelCauseFunc",
    "CancelFunc",
    "Context",
    "Done",
    "Key",
    "after_func",
    "background",
    "bind",
    "cause",
    "current",
    "todo",
    "with_cancel",
    "with_cancel_cause",
    "with_deadline",
    "with_deadline_cause",
    "with_timeout",
    "with_timeout_cause",
    "with_value",
    "without_cancel",
]

T = TypeVar("T")

CancelFunc = Callable[[], None]


class CancelCauseFunc(Protocol):
    """The cancel function of :func:`with_cancel_cause`: ``cancel(cause=None)``,
    ``cause`` an exception (anything else raises ``TypeError``)."""

    def __call__(self, cause: BaseException | None = None) -> None: ...


_log = logging.getLogger("ctxmiddleware")
# One lock for every context: held only for a few attribute updates. On the
# hot paths it is taken with acquire()/release() in try/finally: a `with`
# statement on a lock costs about twice as much (measured on 3.11-3.13).
_lock = threading.Lock()
_monotonic = time.monotonic
_MAX_WAIT = 86400.0  # longest single blocking wait; longer ones loop
_WeakRef = weakref.ReferenceType

# Number of watchers started for parents this module cannot see through (a
# custom Context whose done() is not its ancestor's). Tests read it, the way
# Go's tests count goroutines.
_foreign_watchers = 0


class Key(Generic[T]):
    """A typed context key, compared by identity.

    Two ``Key("user")`` objects are different keys, so two libraries can never
    collide. ``ctx.value(key)`` is typed ``T | None``::

        USER: Key[str] = Key("user")
        ctx = with_value(parent, USER, "ada")
        name = ctx.value(USER)          # str | None
    """

    __slots__ = ("name",)

    if TYPE_CHECKING:
        # Hashable at run time (by identity), but not to a type checker: so
        # with_value(ctx, Key[int](...), "a str") matches no overload of
        # with_value (the fallback one takes other Hashable keys).
        __hash__: ClassVar[None]  # type: ignore[assignment]

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a Key's name is a str, not {type(name).__name__}")
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


# The private key that makes value() report the innermost cancellable context
# of this module (Go's &cancelCtxKey). Cause() relies on it.
_CANCEL_NODE: Key[_CancelCtx] = Key("cancel-node")


class Done:
    """The signal that a context is done. ``ctx.done()`` returns the same one each time.

    * ``is_set()`` tells without waiting;
    * ``wait(timeout)`` blocks the calling thread;
    * ``await ctx.done()`` suspends a coroutine, on any event loop; a
      cancellation from another thread wakes it on its own loop.

    A context that can never be cancelled returns a ``Done`` that never fires.
    """

    __slots__ = ("_owner",)

    def __init__(self) -> None:
        """Create a ``Done`` that never fires."""
        self._owner: _CancelCtx | None = None

    def is_set(self) -> bool:
        owner = self._owner
        return owner is not None and owner.err() is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the context is done or ``timeout`` seconds pass.

        Returns ``True`` if the context is done. ``timeout`` is any number
        of seconds, ``math.inf`` included (0 or less: just check); NaN or a
        non-number raises at once.
        """
        if timeout is not None:
            timeout = _wait_seconds(timeout)
        owner = self._owner
        if owner is None:
            if timeout is None or timeout == _INF:
                threading.Event().wait()
            else:
                until = _monotonic() + timeout
                step = timeout
                while step > 0:
                    # Bounded steps: Event.wait() overflows past TIMEOUT_MAX.
                    threading.Event().wait(step if step < _MAX_WAIT else _MAX_WAIT)
                    step = until - _monotonic()
            return False
        if owner.err() is not None:
            return True
        waiter = threading.Lock()
        waiter.acquire()
        # One bound method for add and remove: each attribute access makes a
        # new one, and listeners are registered and removed by identity.
        release = waiter.release
        if not owner._add_listener(release):
            return True
        end = None if timeout is None else _monotonic() + timeout
        try:
            while True:
                if end is None:
                    step = _MAX_WAIT
                else:
                    step = end - _monotonic()
                    if step <= 0:
                        return owner.err() is not None
                deadline = owner.deadline()
                if deadline is not None:
                    # Do not rely on the timer alone: its thread or loop may be
                    # busy or gone. Wake at the deadline and check.
                    to_deadline = max(0.0, deadline - _monotonic()) + 0.0005
                    if to_deadline < step:
                        step = to_deadline
                # Bounded steps: Lock.acquire() overflows past TIMEOUT_MAX.
                if step > _MAX_WAIT:
                    step = _MAX_WAIT
                if waiter.acquire(timeout=step):
                    return True
                if owner.err() is not None:
                    return True
        finally:
            owner._remove_listener(release)

    def __await__(self) -> Generator[Any, None, None]:
        owner = self._owner
        loop = asyncio.get_running_loop()
        if owner is None:
            yield from loop.create_future().__await__()
            return
        if owner.err() is not None:
            return
        waker = _AsyncWaker(loop)
        if not owner._add_listener(waker):
            return
        try:
            yield from waker.future.__await__()
        finally:
            owner._remove_listener(waker)

    def __repr__(self) -> str:
        return f"<Done is_set={self.is_set()}>"


_NEVER_DONE = Done()


class _AsyncWaker:
    """Resolves a future on its own loop when a context is done."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def __call__(self) -> None:
        if asyncio._get_running_loop() is self.loop:
            self._wake()
        else:
            # RuntimeError: loop closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Context:
    """A deadline, a cancellation signal and request-scoped values.

    Get one from :func:`background`, :func:`current` or the request
    (``request.state.ctx``) and derive others with :func:`with_cancel`,
    :func:`with_timeout`, :func:`with_value` and friends. Every method is safe
    to call from any thread.

    A subclass (for instance a wrapper that delegates to another context)
    implements only :meth:`deadline`, :meth:`done`, :meth:`err` and
    :meth:`value`, with ``def value(self, key: Any) -> Any``; this base class
    provides the rest.
    """

    __slots__ = ()

    def deadline(self) -> float | None:
        """The instant (on the ``time.monotonic()`` clock) work should stop, or ``None``."""
        raise NotImplementedError

    def done(self) -> Done:
        """The signal that fires when this context is done (the same object each call)."""
        raise NotImplementedError

    def err(self) -> ContextError | None:
        """``None`` until the context is done; then the same :class:`Canceled` or
        :class:`DeadlineExceeded` on every call. Never the cause."""
        raise NotImplementedError

    @overload
    def value(self, key: Key[T]) -> T | None: ...
    @overload
    def value(self, key: Hashable) -> Any: ...
    def value(self, key: Any) -> Any:
        """The value bound to ``key`` by the nearest :func:`with_value`, or ``None``."""
        raise NotImplementedError

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or ``None``."""
        d = self.deadline()
        if d is None:
            return None
        r = d - _monotonic()
        return r if r > 0.0 else 0.0

    def check(self) -> None:
        """Raise ``err()`` if the context is done: a cancellation point for sync loops."""
        e = self.err()
        if e is not None:
            # err() is one shared instance: drop the traceback of earlier
            # raises, or every check() would append to it (and keep frames).
            raise e.with_traceback(None)

    def scope(self) -> CancelScope:
        """``async with ctx.scope():`` cancels the enclosing task when ``ctx`` is done.

        The task is cancelled once (edge-triggered, like ``asyncio.timeout()``),
        and the block then raises ``ctx.err()``, chained to the cause. A
        cancellation that comes from elsewhere (server shutdown) passes through
        as ``CancelledError``, untouched.
        """
        return CancelScope(self)

    # -- core hooks (used by the scope module, which cannot import this one) --

    def _on_done(self, fn: Callable[[], object]) -> Callable[[], object] | None:
        """Call ``fn()`` once when this context is done (at once if it is).

        Returns a function that cancels the subscription, or ``None`` when
        ``fn`` ran already or the context can never be done."""
        return _subscribe(self, fn, pin=False)

    def _done_cause(self) -> BaseException | None:
        return cause(self)

    def __str__(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<Context {self}>"


class _EmptyCtx(Context):
    """``background()`` and ``todo()``: never cancelled, no deadline, no values."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def deadline(self) -> float | None:
        return None

    def done(self) -> Done:
        return _NEVER_DONE

    def err(self) -> ContextError | None:
        return None

    def value(self, key: Any) -> Any:
        return None

    def __str__(self) -> str:
        return self._name


_BACKGROUND = _EmptyCtx("background")
_TODO = _EmptyCtx("todo")


def background() -> Context:
    """The root of every context tree: never cancelled, no deadline, no values."""
    return _BACKGROUND


def todo() -> Context:
    """Like :func:`background`; marks code where the right context is not yet known."""
    return _TODO


class _CancelCtx(Context):
    """A cancellable context (Go's cancelCtx).

    ``_children`` maps ``id(x)`` to a weak reference to a child (the usual case),
    to the child itself (pinned, so a pending ``after_func`` below it survives),
    or to a listener: a callable run, outside the lock, when this context is done.
    """

    __slots__ = (
        "__weakref__",
        "_cause",
        "_children",
        "_dnode",
        "_done",
        "_err",
        "_link",
        "_parent",
        "_timer",
    )

    def __init__(self, parent: Context) -> None:
        self._parent = parent
        # What we are registered with: a _CancelCtx (seen-through parent), an
        # unlink callable (foreign parent), or None (parent never cancels).
        self._link: _CancelCtx | Callable[[], object] | None = None
        self._err: ContextError | None = None
        self._cause: BaseException | None = None
        self._children: dict[Any, Any] | None = None
        self._done: Done | None = None
        # The timer context whose deadline applies to us, if we can see it.
        # The nearest timer context above us, if we can see it (never self:
        # a self-reference would make every timer context a reference cycle).
        self._dnode: _TimerCtx | None = None
        # The pending deadline timer (timer contexts only).
        self._timer: Timer | None = None

    # -- Context ---------------------------------------------------------

    def deadline(self) -> float | None:
        dnode = self._dnode
        if dnode is not None:
            return dnode.deadline()
        return self._parent.deadline()

    def done(self) -> Done:
        d = self._done
        if d is None:
            with _lock:
                d = self._done
                if d is None:
                    d = self._done = Done()
                    d._owner = self
        return d

    def err(self) -> ContextError | None:
        e = self._err
        if e is None:
            dnode = self._dnode
            # The timer may not have fired yet (busy loop, between ticks): the
            # deadline itself is the truth, so expire now.
            if dnode is not None and _monotonic() >= dnode._when:
                dnode._expire()
                e = self._err
        return e

    def value(self, key: Any) -> Any:
        if key is _CANCEL_NODE:
            return self
        return _lookup(self._parent, key)

    def __str__(self) -> str:
        return f"{self._parent}.with_cancel"

    # -- cancellation ----------------------------------------------------

    def _cancel_func(self) -> None:
        self._cancel(True, Canceled(), None)

    def _cancel_cause_func(self, cause: BaseException | None = None) -> None:
        if cause is not None and not isinstance(cause, BaseException):
            # cause(ctx) is typed BaseException | None: a str would break it.
            raise TypeError(
                f"the cause must be an exception (or None), not {type(cause).__name__}"
            )
        self._cancel(True, Canceled(), cause)

    def _cancel(
        self, remove: bool, err: ContextError, cause: BaseException | None
    ) -> None:
        """Mark this context and every descendant done, then run listeners.

        The first cancellation wins, for both the error and the cause.
        """
        if cause is None:
            cause = err
        _lock.acquire()  # (not `with`: see _lock)
        try:
            if self._err is not None:
                return
            # cause before err: cause() reads them without the lock.
            self._cause = cause
            self._err = err
            link = self._link
            linked_node = isinstance(link, _CancelCtx)
            if remove and linked_node:
                siblings = link._children  # type: ignore[union-attr]
                if siblings is not None:
                    siblings.pop(_WeakRef(self), None)
            if (
                self._children is None
                and self._timer is None
                and (link is None or not remove or linked_node)
            ):
                return  # the common case: nothing else to do
            listeners, timers = self._mark_descendants(err, cause)
        finally:
            _lock.release()
        for timer in timers:
            timer.cancel()
        if remove and link is not None and not linked_node:
            _call_safely(link)  # type: ignore[arg-type]
        for listener in listeners:
            _call_safely(listener)

    def _mark_descendants(
        self, err: ContextError, cause: BaseException
    ) -> tuple[list[Callable[[], object]], list[Timer]]:
        """Mark every descendant done (lock held); return what to run after."""
        listeners: list[Callable[[], object]] = []
        timers: list[Timer] = []
        stack: list[_CancelCtx] = [self]
        while stack:
            node = stack.pop()
            timer = node._timer
            if timer is not None:
                timers.append(timer)
                node._timer = None
            children = node._children
            if not children:
                continue
            node._children = None
            for entry in children.values():
                if type(entry) is _WeakRef:
                    entry = entry()
                    if entry is None:
                        continue
                if isinstance(entry, _CancelCtx):
                    if entry._err is None:
                        entry._cause = cause
                        entry._err = err
                        stack.append(entry)
                else:
                    listeners.append(entry)
        return listeners, timers

    # -- registry --------------------------------------------------------

    def _add_listener(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` when this context is done. False if it already is."""
        with _lock:
            if self._err is not None:
                return False
            children = self._children
            if children is None:
                children = self._children = {}
            children[fn] = fn
            return True

    def _remove_listener(self, fn: Callable[[], object]) -> None:
        with _lock:
            children = self._children
            if children is not None and children.get(fn) is fn:
                del children[fn]

    def _pin(self) -> None:
        """Keep this context alive for as long as its ancestors can cancel it.

        Called with the lock held, for contexts that carry an ``after_func``.
        """
        node: _CancelCtx = self
        while True:
            link = node._link
            if not isinstance(link, _CancelCtx):
                return
            siblings = link._children
            if siblings is None:
                return
            ref = _WeakRef(node)
            if siblings.get(ref) is node:
                return
            siblings[ref] = node
            node = link


class _TimerCtx(_CancelCtx):
    """A cancellable context with its own deadline (Go's timerCtx)."""

    __slots__ = ("_deadline_cause", "_when")

    def __init__(
        self, parent: Context, when: float, deadline_cause: BaseException | None
    ) -> None:
        # _CancelCtx.__init__ written out: every request builds one of these.
        self._parent = parent
        self._link = None
        self._err = None
        self._cause = None
        self._children = None
        self._done = None
        self._dnode = None
        self._when = when
        self._timer: Timer | None = None
        self._deadline_cause = deadline_cause

    def _expire(self) -> None:
        if _monotonic() < self._when:
            # Early: uvloop's timers count whole ms from a cached clock.
            with _lock:
                if self._err is None:
                    self._timer = start_timer(self._when, self._expire)
            return
        self._cancel(True, DeadlineExceeded(), self._deadline_cause)

    def deadline(self) -> float | None:
        return self._when

    def err(self) -> ContextError | None:
        e = self._err
        if e is None:
            # As for _CancelCtx.err(): the deadlines themselves are the truth.
            now = _monotonic()
            if now >= self._when:
                self._expire()
                return self._err
            dnode = self._dnode
            if dnode is not None and now >= dnode._when:
                dnode._expire()
                e = self._err
        return e

    def __str__(self) -> str:
        left = self._when - _monotonic()
        return f"{self._parent}.with_deadline({self._when:.6f} [{left:.6f}s])"


class ValueSource(Protocol):
    """What a :class:`RootContext` asks first for a value: ``get(key, default)``,
    like a mapping (a ``dict`` is one). It may compute a value on first use."""

    def get(self, key: Any, default: Any, /) -> Any: ...


_MISSING: Any = object()
_INF = math.inf


class RootContext(_TimerCtx):
    """The root of one unit of work an adapter serves: a request, a job.

    Core-internal API for the adapters (not part of the public package API).
    It is a timer context whose deadline the adapter may still set after
    creating it, whose timer starts only when the adapter arms it, and which
    answers some values from a :class:`ValueSource` before its parent:

    * ``RootContext(parent, source, deadline)``: linked to ``parent`` if the
      parent can be cancelled; ``deadline`` (``None``: none of its own) is not
      armed yet.
    * :meth:`set_deadline`: replace the deadline (``None``: none of its own).
      Until :meth:`arm` runs, the deadline is enforced lazily: ``err()`` and
      ``check()`` compare it with the clock, which costs nothing for work
      that ends early (most requests).
    * :meth:`arm`: start the timer, so that waiters (``done()``, scopes) are
      woken at the deadline.
    * :meth:`cancel`: cancel with :class:`Canceled` and a cause.
    * :meth:`end`: the work is over (Go's ``ServeHTTP`` returning): cancel
      with :class:`Canceled`. Cheap when nothing was derived from the root.

    The deadline is never later than the parent's.
    """

    __slots__ = ("active", "source")

    def __init__(
        self, parent: Context, source: ValueSource | None = None, deadline: float | None = None
    ) -> None:
        _TimerCtx.__init__(self, parent, _INF if deadline is None else deadline, None)
        #: What answers values first (the adapter's request object, say).
        self.source = source
        #: The context the work uses in the root's place (``set_request_context``):
        #: what :func:`current` returns where the root is bound. Derives from the root.
        self.active: Context | None = None
        if type(parent) is not _EmptyCtx:
            _propagate(parent, self)

    def set_deadline(self, when: float | None) -> None:
        """Make ``when`` (a ``time.monotonic()`` instant) the deadline; re-arm
        the timer if it was armed. Does nothing once the root is done."""
        _lock.acquire()  # (not `with`: see _lock)
        try:
            if self._err is not None:
                return
            old = self._timer
            self._timer = None
            # math.inf: no deadline of its own (err()'s clock test never fires).
            self._when = _INF if when is None else when
        finally:
            _lock.release()
        if old is not None:
            old.cancel()
            self.arm()

    def arm(self) -> None:
        """Start the deadline timer (idempotent); expire now if it has passed."""
        _lock.acquire()  # (not `with`: see _lock)
        try:
            if self._err is not None or self._timer is not None or self._when == _INF:
                return
            if self._when > _monotonic():
                self._timer = start_timer(self._when, self._expire)
                return
        finally:
            _lock.release()
        self._expire()

    def cancel(self, cause: BaseException | None = None) -> None:
        """Cancel with :class:`Canceled`; ``cause(ctx)`` reports ``cause``."""
        self._cancel(True, Canceled(), cause)

    def end(self) -> None:
        """The unit of work is over: cancel with :class:`Canceled` (no cause)."""
        # (A fast path for roots nothing was derived from saved 600
        # instructions per request: not worth a second cancel path.)
        self._cancel(True, Canceled(), None)

    def deadline(self) -> float | None:
        when = self._when
        dnode = self._dnode
        inherited = dnode.deadline() if dnode is not None else self._parent.deadline()
        if inherited is not None and inherited < when:
            return inherited
        return None if when == _INF else when

    def value(self, key: Any) -> Any:
        if key is _CANCEL_NODE:
            return self
        source = self.source
        if source is not None:
            v = source.get(key, _MISSING)
            if v is not _MISSING:
                return v
        return _lookup(self._parent, key)

    def __str__(self) -> str:
        # The source's keys are shown, never their values (they may be secrets).
        names = getattr(self.source, "key_names", None)
        values = "".join(f".with_value({n})" for n in names()) if callable(names) else ""
        if self._when == _INF:
            return f"{self._parent}{values}.with_cancel"
        left = self._when - _monotonic()
        return f"{self._parent}{values}.with_deadline({self._when:.6f} [{left:.6f}s])"


def root_of(ctx: Context) -> RootContext | None:
    """The :class:`RootContext` ``ctx`` is, or derives from through cancellable
    links (with_cancel, with_timeout, with_value; not through without_cancel)."""
    node = ctx.value(_CANCEL_NODE)
    while isinstance(node, _CancelCtx):
        if isinstance(node, RootContext):
            return node
        link = node._link
        node = link if isinstance(link, _CancelCtx) else None
    return None




class _ValueCtx(Context):
    """A context that binds one key to one value and delegates the rest."""

    __slots__ = ("_key", "_parent", "_src", "_val")

    def __init__(self, parent: Context, key: object, val: object) -> None:
        self._parent = parent
        self._key = key
        self._val = val
        # Where done/err/deadline come from: the first ancestor that is not a
        # value context, so long chains answer in one step.
        self._src: Context = parent._src if type(parent) is _ValueCtx else parent

    def deadline(self) -> float | None:
        return self._src.deadline()

    def done(self) -> Done:
        return self._src.done()

    def err(self) -> ContextError | None:
        return self._src.err()

    # value() is _lookup itself, assigned below the function.

    def __str__(self) -> str:
        return f"{self._parent}.with_value({_key_name(self._key)})"


class _WithoutCancelCtx(Context):
    """Keeps the parent's values, never its cancellation or deadline."""

    __slots__ = ("_parent",)

    def __init__(self, parent: Context) -> None:
        self._parent = parent

    def deadline(self) -> float | None:
        return None

    def done(self) -> Done:
        return _NEVER_DONE

    def err(self) -> ContextError | None:
        return None

    def value(self, key: Any) -> Any:
        if key is _CANCEL_NODE:
            return None
        return _lookup(self._parent, key)

    def __str__(self) -> str:
        return f"{self._parent}.without_cancel"


def _lookup(c: Context, key: Any) -> Any:
    """Walk up the chain for ``key``; keys match on identity or on type and value."""
    key_type = type(key)
    # Keys (the common case) match on identity only: skip their slow == test.
    by_value = key_type is not Key
    while True:
        t = type(c)
        if t is _ValueCtx:
            k = c._key  # type: ignore[attr-defined]
            if k is key or (by_value and type(k) is key_type and k == key):
                return c._val  # type: ignore[attr-defined]
            c = c._parent  # type: ignore[attr-defined]
        elif t is _CancelCtx or t is _TimerCtx:
            if key is _CANCEL_NODE:
                return c
            c = c._parent  # type: ignore[attr-defined]
        elif t is _WithoutCancelCtx:
            if key is _CANCEL_NODE:
                return None
            c = c._parent  # type: ignore[attr-defined]
        elif t is _EmptyCtx:
            return None
        else:
            return c.value(key)


def _key_name(key: object) -> str:
    # Only the key is shown, never the value: values may be secrets.
    if isinstance(key, Key):
        return key.name
    if isinstance(key, str):
        return key
    return type(key).__qualname__


def _call_safely(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        _log.exception("ctxmiddleware: cancellation listener %r failed", fn)


def _check_parent(parent: object) -> Context:
    if parent is None:
        raise TypeError("cannot create context from None parent")
    if not isinstance(parent, Context):
        raise TypeError(
            f"parent must be a ctxmiddleware.Context, not {type(parent).__name__}"
        )
    return parent


def _propagate(parent: Context, child: _CancelCtx) -> None:
    """Link ``child`` to ``parent`` so that the parent's cancellation reaches it."""
    t = type(parent)
    if t is _ValueCtx:
        src = parent._src  # type: ignore[attr-defined]
        node = src if isinstance(src, _CancelCtx) else None
        if node is None and type(src) in (_EmptyCtx, _WithoutCancelCtx):
            return
    elif isinstance(parent, _CancelCtx):
        node = parent
    elif t is _EmptyCtx or t is _WithoutCancelCtx:
        return
    else:
        node = None
    if node is None:
        done = parent.done()
        owner = done._owner
        if owner is None:
            return  # the parent can never be cancelled
        if done.is_set():
            child._cancel(False, parent.err() or Canceled(), cause(parent))
            return
        seen = parent.value(_CANCEL_NODE)
        if seen is owner:
            node = owner  # a wrapper that only delegates: see through it
        else:
            _propagate_foreign(parent, child)
            return
    _lock.acquire()  # (not `with`: see _lock)
    try:
        if node._err is not None:
            child._cause = node._cause
            child._err = node._err
            return
        child._link = node
        child._dnode = node if isinstance(node, _TimerCtx) else node._dnode
        children = node._children
        if children is None:
            children = node._children = {}
        elif len(children) >= 64 and len(children) & (len(children) - 1) == 0:
            # Amortised sweep of children that were dropped without cancel.
            children = node._children = {
                k: v
                for k, v in children.items()
                if type(v) is not _WeakRef or v() is not None
            }
        ref = _WeakRef(child)
        children[ref] = ref
    finally:
        _lock.release()


def _propagate_foreign(parent: Context, child: _CancelCtx) -> None:
    """Link to a parent we cannot see through: its own after_func, else its Done."""
    global _foreign_watchers

    def on_parent_done() -> None:
        child._cancel(False, parent.err() or Canceled(), cause(parent))

    register = getattr(parent, "after_func", None)
    if callable(register):
        stop = register(on_parent_done)
        child._link = stop
        return
    owner = parent.done()._owner
    assert owner is not None
    with _lock:
        _foreign_watchers += 1
    if owner._add_listener(on_parent_done):
        child._link = lambda: owner._remove_listener(on_parent_done)
    else:
        on_parent_done()


def with_cancel(parent: Context) -> tuple[Context, CancelFunc]:
    """A child of ``parent`` with its own cancel function.

    The child is done when ``cancel()`` is called or when the parent is done,
    whichever happens first. Call ``cancel()`` as soon as the work is over: it
    releases what the child holds. Calling it again does nothing.
    """
    if type(parent) is _EmptyCtx:  # background()/todo(): nothing to link to
        child = _CancelCtx(parent)
        return child, child._cancel_func
    child = _CancelCtx(_check_parent(parent))
    _propagate(parent, child)
    return child, child._cancel_func


def with_cancel_cause(parent: Context) -> tuple[Context, CancelCauseFunc]:
    """Like :func:`with_cancel`, but ``cancel(cause)`` records why.

    ``err()`` is still :class:`Canceled`; :func:`cause` returns ``cause`` (or
    ``err()`` when cancelled with ``None``). Only the first cancellation counts.
    """
    child = _CancelCtx(_check_parent(parent))
    _propagate(parent, child)
    return child, child._cancel_cause_func


def with_deadline(parent: Context, deadline: float) -> tuple[Context, CancelFunc]:
    """A child that is done at ``deadline`` (a ``time.monotonic()`` instant) at the latest.

    If the parent's deadline is earlier, the child is a plain :func:`with_cancel`
    child that keeps the parent's deadline. A deadline now or in the past gives
    a child that is already done with :class:`DeadlineExceeded`.
    """
    return with_deadline_cause(parent, deadline, None)


def with_deadline_cause(
    parent: Context, deadline: float, cause: BaseException | None
) -> tuple[Context, CancelFunc]:
    """Like :func:`with_deadline`; ``cause`` is reported by :func:`cause` when the
    deadline passes. The returned cancel function does not set the cause.

    ``deadline`` is a ``time.monotonic()`` instant (``math.inf``: none). A
    finite one more than 10 years after ``time.monotonic()`` raises
    ``ValueError``: it is a wall-clock (``time.time()``) instant by mistake."""
    _check_parent(parent)
    deadline = _real(deadline, "deadline")
    if deadline != _INF:
        now = _monotonic()
        if deadline - now > _MAX_AHEAD:
            raise ValueError(
                f"deadline {deadline!r} is {deadline - now:.4g} s after time.monotonic()"
                f" ({now:.3f}): with_deadline() takes a time.monotonic() instant, not a"
                " time.time() one (for a relative time use with_timeout())"
            )
    return _with_deadline(parent, deadline, cause)


# A finite deadline further ahead than this is a wall-clock instant by mistake.
_MAX_AHEAD = 10 * 365.25 * 86400.0


def _real(value: object, what: str) -> float:
    """``value`` (an int, a float or another real number, not a bool) as a float
    that is not NaN; else a clear TypeError or ValueError."""
    t = type(value)
    if t is not float and t is not int and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{what} must be a number of seconds, not {t.__name__}")
    try:
        result = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{what} is too large to be a float ({t.__name__} over 1e308)") from None
    if result != result:
        raise ValueError(f"{what} must not be NaN")
    return result


def _wait_seconds(timeout: object) -> float:
    return _real(timeout, "timeout")


def _with_deadline(
    parent: Context, deadline: float, cause: BaseException | None
) -> tuple[Context, CancelFunc]:
    """with_deadline_cause() once ``deadline`` is checked."""
    _check_parent(parent)
    current_deadline = parent.deadline()
    if current_deadline is not None and current_deadline < deadline:
        return with_cancel(parent)
    child = _TimerCtx(parent, deadline, cause)
    _propagate(parent, child)
    if deadline <= _monotonic():
        child._cancel(True, DeadlineExceeded(), cause)
        return child, child._cancel_func
    with _lock:
        if child._err is None:
            child._timer = start_timer(deadline, child._expire)
    return child, child._cancel_func


def _seconds(timeout: float | datetime.timedelta) -> float:
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return _real(timeout, "timeout")


def with_timeout(
    parent: Context, timeout: float | datetime.timedelta
) -> tuple[Context, CancelFunc]:
    """``with_deadline(parent, time.monotonic() + timeout)``.

    ``timeout`` is in seconds or a :class:`datetime.timedelta`."""
    return _with_deadline(parent, _monotonic() + _seconds(timeout), None)


def with_timeout_cause(
    parent: Context, timeout: float | datetime.timedelta, cause: BaseException | None
) -> tuple[Context, CancelFunc]:
    """``with_deadline_cause(parent, time.monotonic() + timeout, cause)``."""
    return _with_deadline(parent, _monotonic() + _seconds(timeout), cause)


@overload
def with_value(parent: Context, key: Key[T], value: T) -> Context: ...
@overload
def with_value(parent: Context, key: Hashable, value: object) -> Context: ...
def with_value(parent: Context, key: Hashable | Key[Any], value: object) -> Context:
    """A child in which ``value(key)`` is ``value``; everything else comes from ``parent``.

    Prefer a :class:`Key` as ``key``. Keys match on identity, or when both their
    type and their value are equal (``1``, ``1.0`` and ``True`` are three keys).
    A ``None`` value hides the parent's value for the same key.
    """
    _check_parent(parent)
    if key is None:
        raise TypeError("nil key: a context key must not be None")
    try:
        hash(key)
    except TypeError:
        raise TypeError(
            f"key is not comparable: {type(key).__name__} is unhashable"
        ) from None
    return _ValueCtx(parent, key, value)


def without_cancel(parent: Context) -> Context:
    """A child that keeps ``parent``'s values but is never cancelled and has no deadline.

    Use it for work that must outlive the request (audit logs, cache fills),
    and give that work a timeout of its own.
    """
    return _WithoutCancelCtx(_check_parent(parent))


def cause(ctx: Context) -> BaseException | None:
    """Why ``ctx`` is done: the cause passed to its cancel function (or to
    ``with_*_cause``), else ``ctx.err()``. ``None`` while it is not done."""
    if not isinstance(ctx, Context):
        raise TypeError(f"cause() takes a ctxmiddleware.Context, not {type(ctx).__name__}")
    node = ctx.value(_CANCEL_NODE)
    if isinstance(node, _CancelCtx):
        c = node._cause
        if c is not None:
            return c
        err = ctx.err()
        if err is None:
            return None
        # A cancellation may have landed between the two reads; it stores the
        # cause before the error, so the cause is visible now.
        c = node._cause
        return c if c is not None else err
    return ctx.err()


class _AfterFunc:
    """One ``after_func`` registration: runs ``fn`` at most once, in its own thread."""

    __slots__ = ("__weakref__", "_fn", "_state", "_unlink")

    _PENDING, _STARTED, _STOPPED = 0, 1, 2

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._state = self._PENDING
        self._unlink: Callable[[], object] | None = None

    def __call__(self) -> None:
        with _lock:
            if self._state != self._PENDING:
                return
            self._state = self._STARTED
        threading.Thread(
            target=self._run, name="ctxmiddleware-after-func", daemon=True
        ).start()

    def _run(self) -> None:
        try:
            self._fn()
        except Exception:
            _log.exception("ctxmiddleware: after_func %r failed", self._fn)

    def stop(self) -> bool:
        with _lock:
            if self._state != self._PENDING:
                return False
            self._state = self._STOPPED
            unlink, self._unlink = self._unlink, None
        if unlink is not None:
            unlink()
        return True


def after_func(ctx: Context, fn: Callable[[], object]) -> Callable[[], bool]:
    """Run ``fn()`` in a new thread once ``ctx`` is done; return ``stop``.

    ``fn`` runs at most once and never inside the ``cancel()`` call that
    triggered it, so a slow or blocking ``fn`` delays nobody; an exception from
    it is logged. If ``ctx`` is already done, ``fn`` starts right away. ``stop()``
    returns ``True`` only if it prevented ``fn`` from running; it does not wait
    for a running ``fn``.
    """
    if not callable(fn):
        raise TypeError(f"after_func() needs a callable, not {type(fn).__name__}")
    registration = _AfterFunc(fn)
    _subscribe(_check_parent(ctx), registration, pin=True)
    return registration.stop


def _subscribe(
    ctx: Context, fn: _AfterFunc | Callable[[], object], pin: bool
) -> Callable[[], object] | None:
    """Call ``fn()`` once ``ctx`` is done (right away if it is).

    Returns a function that undoes the subscription, or None when ``fn`` ran
    already or ``ctx`` can never be done.
    """
    owner: _CancelCtx | None
    if isinstance(ctx, _CancelCtx):
        owner = ctx
    elif isinstance(ctx, _ValueCtx) and isinstance(ctx._src, _CancelCtx):
        owner = ctx._src
    else:
        # (Not for our own types above: a Done points back at its context, a
        # cycle only the cyclic GC frees, so it is made only when asked for.)
        owner = ctx.done()._owner
    if owner is None:
        return None
    if not isinstance(ctx, (_CancelCtx, _ValueCtx)):
        register = getattr(ctx, "after_func", None)
        if callable(register) and ctx.value(_CANCEL_NODE) is not owner:
            stop: Callable[[], object] = register(fn)
            if isinstance(fn, _AfterFunc):
                fn._unlink = stop
            return stop
    with _lock:
        if owner._err is None:
            children = owner._children
            if children is None:
                children = owner._children = {}
            children[fn] = fn
            if pin:
                owner._pin()

            def unlink() -> None:
                owner._remove_listener(fn)

            if isinstance(fn, _AfterFunc):
                fn._unlink = unlink
            return unlink
    fn()
    return None


# -- the context bound to the running task or thread -------------------------

_current: ContextVar[Context] = ContextVar("ctxmiddleware.current", default=_BACKGROUND)
# The same variable, for the adapters, which bind a request's root for the
# length of the request (cheaper than a bind() object on the hot path).
CURRENT_CONTEXT = _current


def current() -> Context:
    """The context bound to the running task or thread by :func:`bind`, else ``background()``.

    It follows ``contextvars``: tasks created with ``asyncio.create_task``,
    ``asyncio.to_thread`` and anyio/Starlette worker threads inherit it. Where
    a request's root is bound, it is the context the request made its own
    with ``set_request_context()`` (if it did), in every task and thread.
    """
    ctx = _current.get()
    if type(ctx) is RootContext and ctx.active is not None:
        return ctx.active
    return ctx


class bind:
    """``with bind(ctx):`` makes ``ctx`` what :func:`current` returns inside the block."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: Context) -> None:
        self._ctx = _check_parent(ctx)
        self._token: Token[Context] | None = None

    def __enter__(self) -> Context:
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


# value() of a value context is the lookup itself: one call less per lookup.
_ValueCtx.value = _lookup  # type: ignore[method-assign, assignment]
