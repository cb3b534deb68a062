"""Celery: jobs enqueued inside a request inherit its request id and deadline.

::

    app = Celery("proj", broker="redis://127.0.0.1:6379/0")
    ctxmiddleware.install_celery(app)

Producer side (``before_task_publish``): a task sent under a context with a
request id or a deadline (``current()``: inside a request served by the
middleware) gets a ``ctxmiddleware`` message header (the request id and the
deadline as an epoch instant) and Celery's ``expires`` set to the deadline
(an earlier ``expires`` of the caller stands): a worker that picks the job up
after the deadline discards it unrun, as Celery does for expired tasks.

Worker side (``task_prerun`` / ``task_postrun``): the task body runs with
``current()`` a root context carrying that request id (so
:class:`~ctxmiddleware.RequestContextFilter` puts it in the worker's log
records) and that deadline: ``ctx.check()``, ``ctx.remaining()``, the
database helpers and the httpx clients see it. A task sent outside any
request is untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable
from typing import Any

from .._core import CURRENT_CONTEXT, Context, after_func, current
from ._jobs import STAMP_KEY, cut_short, job_context, stamp_of

__all__ = ["celery_revoke_on_cancel", "install_celery"]

_installed = False
_lock = threading.Lock()
_ATTR = "_ctxmiddleware_binding"


def install_celery(app: Any = None) -> None:
    """Connect the producer and worker signal handlers (once per process;
    Celery's signals are global, ``app`` is accepted for symmetry and checked)."""
    global _installed
    from celery import Celery, signals

    if app is not None and not isinstance(app, Celery):
        raise TypeError(f"install_celery() takes a Celery app, not {type(app).__name__}")
    with _lock:
        if _installed:
            return
        signals.before_task_publish.connect(_before_publish, weak=False)
        signals.task_prerun.connect(_prerun, weak=False)
        signals.task_postrun.connect(_postrun, weak=False)
        _installed = True


def _before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None or STAMP_KEY in headers:
        return
    stamp = stamp_of(current())
    if stamp is None:
        return
    headers[STAMP_KEY] = stamp
    deadline = stamp.get("deadline")
    if deadline is None:
        return
    expires = datetime.datetime.fromtimestamp(deadline, tz=datetime.UTC)
    mine = headers.get("expires")
    if isinstance(mine, str):
        try:
            theirs = datetime.datetime.fromisoformat(mine)
        except ValueError:
            theirs = None
        if theirs is not None and theirs.tzinfo is not None and theirs <= expires:
            return  # the caller's earlier expiry stands
    headers["expires"] = expires.isoformat()


def _prerun(task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    if request is None:
        return
    stamp = _stamp(request)
    if stamp is None:
        return
    ctx, cancel = job_context(stamp)
    token = CURRENT_CONTEXT.set(ctx)
    setattr(request, _ATTR, (token, cancel))


def _postrun(task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    binding = getattr(request, _ATTR, None)
    if binding is None:
        return
    setattr(request, _ATTR, None)
    token, cancel = binding
    cancel()
    with contextlib.suppress(ValueError):  # (set in another context: leave it)
        CURRENT_CONTEXT.reset(token)


def _stamp(request: Any) -> Any:
    stamp = getattr(request, STAMP_KEY, None)
    if stamp is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            stamp = headers.get(STAMP_KEY)
    return stamp if isinstance(stamp, dict) else None


def celery_revoke_on_cancel(result: Any, ctx: Context | None = None) -> Callable[[], bool]:
    """Make a sent task request-bound: revoke it if the request is cut short
    (the client leaves, the deadline passes); not when the request just ends.

    ``result`` is the ``AsyncResult`` that ``delay()`` / ``apply_async()``
    returned; ``ctx`` defaults to ``current()``. A job not started yet is then
    discarded by the worker; a running one is not interrupted (Celery's
    ``revoke`` without ``terminate``), it still ends at the deadline if it
    honours its context. Returns ``stop()`` (see :func:`~ctxmiddleware.after_func`).
    """
    ctx = current() if ctx is None else ctx
    revoke = result.revoke

    def fire() -> None:
        if cut_short(ctx):
            revoke()

    return after_func(ctx, fire)
