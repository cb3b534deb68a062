"""What the integrations report, at the core level (they may import only the core).

* :func:`count_cancel`: a cancel was sent downstream (a PostgreSQL cancel
  request, a SQLite interrupt, an HTTP call cut short), counted per driver.
  Always on: it costs a dict update per cancel, and cancels are rare.
* :func:`note_wait`: what a request is waiting on right now ("PostgreSQL
  transaction", "HTTP call to backend:8001"), for the live requests page.
  Off (``WAIT_OBSERVER is None``) unless the page is mounted: then one
  global lookup per downstream call.
* :func:`downstream_call`: both, around one downstream call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ._context import Context

__all__ = [
    "WaitObserver",
    "cancel_counts",
    "count_cancel",
    "downstream_call",
    "note_wait",
    "set_cancel_listener",
    "set_wait_observer",
]

_log = logging.getLogger("ctxmiddleware")
_lock = threading.Lock()
_cancels: dict[str, int] = {}

WaitObserver = Callable[[Context, str], "Callable[[], None] | None"]
"""``observer(ctx, what)``: note that the work of ``ctx`` now waits on
``what``; returns what to call when the wait is over (or None)."""

_listeners: dict[str, Callable[[str], None]] = {}
_wait_observer: WaitObserver | None = None


def count_cancel(kind: str) -> None:
    """A cancel of kind ``kind`` (the driver: ``"asyncpg"``, ``"psycopg"``,
    ``"sqlite"``, ``"aiosqlite"``, ``"httpx"``) was sent downstream."""
    with _lock:
        _cancels[kind] = _cancels.get(kind, 0) + 1
        listeners = tuple(_listeners.values())
    for listener in listeners:
        try:
            listener(kind)
        except Exception:  # an exporter's failure must not break the cancel
            _log.exception("ctxmiddleware: a cancel listener failed")


def cancel_counts() -> dict[str, int]:
    """The downstream cancels sent by this process so far, per kind."""
    with _lock:
        return dict(_cancels)


def set_cancel_listener(name: str, listener: Callable[[str], None] | None) -> None:
    """Call ``listener(kind)`` on every downstream cancel (an exporter's
    counter); ``None`` removes the listener registered under ``name``."""
    with _lock:
        if listener is None:
            _listeners.pop(name, None)
        else:
            _listeners[name] = listener


def set_wait_observer(observer: WaitObserver | None) -> None:
    """Install (or, with None, remove) what :func:`note_wait` reports to."""
    global _wait_observer
    _wait_observer = observer


def note_wait(ctx: Context, what: str) -> Callable[[], None] | None:
    """The work of ``ctx`` now waits on ``what``; returns what to call when the
    wait is over, or None if nobody observes waits."""
    observer = _wait_observer
    if observer is None:
        return None
    try:
        return observer(ctx, what)
    except Exception:
        _log.exception("ctxmiddleware: the wait observer failed")
        return None


@contextmanager
def downstream_call(ctx: Context, kind: str, what: str) -> Iterator[None]:
    """Around one downstream call made under ``ctx``: note it as what the work
    waits on, and count a cancel of ``kind`` if it ends with an error while
    ``ctx`` is done (the call was cut short by the context)."""
    done = note_wait(ctx, what)
    try:
        yield
    except BaseException:
        if ctx.err() is not None:
            count_cancel(kind)
        raise
    finally:
        if done is not None:
            done()
