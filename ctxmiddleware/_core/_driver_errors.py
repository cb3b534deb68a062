"""Reporting a driver's error as ``ctx.err()`` when the context caused it.

When a context is done, the code it cancels fails in the driver's own words: a
database reports ``QueryCanceled`` or a closed connection, an HTTP client a
reset socket, sqlite "interrupted". The caller should see ``ctx.err()``
instead, with the driver's error kept as ``__cause__``. This is the one place
that translation is written:

* :func:`raise_if_done` translates one caught exception;
* :func:`errors_as_ctx_err` and :func:`async_errors_as_ctx_err` translate every
  :class:`Exception` that leaves a ``with`` / ``async with`` block.

``err()`` is one shared instance per context, so it is always raised with a
fresh traceback (``with_traceback(None)``): raised as it is, it would append
to the traceback of its previous raise, which would grow with every raise and
keep the frames of each alive.

What is never translated:

* anything raised while the context is not done;
* an exception that already is of the same kind as ``ctx.err()`` (the context's
  own ``check()``, or ``ctx.scope()`` reporting it): it passes through as raised
  (never chained to itself);
* a :class:`BaseException` that is not an :class:`Exception`
  (``asyncio.CancelledError``, ``KeyboardInterrupt``, ``GeneratorExit``...) with the
  context managers: a cancellation that is not the context's must propagate.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType

from ._context import Context

__all__ = ["async_errors_as_ctx_err", "errors_as_ctx_err", "raise_if_done"]


def raise_if_done(ctx: Context, exc: BaseException) -> None:
    """Raise ``ctx.err()`` from ``exc`` if ``ctx`` is done; else return.

    Call it in an ``except`` clause, before a bare ``raise``::

        except DriverError as exc:
            raise_if_done(ctx, exc)
            raise

    ``exc`` is left to propagate (the function returns) if the context is not
    done, or if ``exc`` is already of the same kind as ``ctx.err()``.
    """
    err = ctx.err()
    if err is None or isinstance(exc, type(err)):
        return
    raise err.with_traceback(None) from exc


class _ErrorsAsCtxErr:
    """Both context managers: leaving the block applies :func:`raise_if_done` to an Exception."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def __enter__(self) -> None:
        return None

    async def __aenter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            raise_if_done(self._ctx, exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def errors_as_ctx_err(ctx: Context) -> AbstractContextManager[None]:
    """Report an error raised while ``ctx`` is done as ``ctx.err()``::

        with errors_as_ctx_err(ctx):
            conn.execute(query)  # raises ctx.err() if ctx stopped it

    Any :class:`Exception` that leaves the block while ``ctx`` is done becomes
    ``ctx.err()``, chained to it (``__cause__``), unless it already is of
    ``ctx.err()``'s kind. Other exceptions, and a :class:`BaseException` such as
    ``CancelledError``, propagate untouched. The check happens when the
    exception leaves the block: a context done by then counts.
    """
    return _ErrorsAsCtxErr(ctx)


def async_errors_as_ctx_err(ctx: Context) -> AbstractAsyncContextManager[None]:
    """The same as :func:`errors_as_ctx_err`, for ``async with``::

        async with async_errors_as_ctx_err(ctx):
            rows = await conn.fetch(query)  # raises ctx.err() if ctx stopped it
    """
    return _ErrorsAsCtxErr(ctx)
