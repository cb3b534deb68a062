"""Helpers shared by the test modules (one copy of each).

* :class:`Probe`: named ``threading.Event`` flags plus data, set by an app
  on the server's loop, awaited by the test thread.
* :class:`Gate`: an event the test thread sets and a coroutine on the
  server's loop awaits.
* :class:`PgMonitor`: a separate autocommit connection that watches backends
  in ``pg_stat_activity``. Every instant it returns is ``time.perf_counter()``
  (one clock for every test that compares them).
* :func:`await_done`: ``await ctx.done()`` as a coroutine function (for
  ``asyncio.wait_for`` and ``run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from ctxmiddleware import Done

WAIT = 5.0  # upper bound for anything a test waits for; reached only on failure
POLL = 0.002  # PgMonitor's polling period

__all__ = ["POLL", "WAIT", "Gate", "PgMonitor", "Probe", "await_done"]


async def await_done(d: Done) -> None:
    await d


# -- synchronisation between the test thread and the server's loop ----------


class Probe:
    """Named ``threading.Event`` flags plus data, set by the app, awaited by the test."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.events = {name: threading.Event() for name in names}
        self.data: dict[str, Any] = {}

    def set(self, name: str, **data: Any) -> None:
        self.data.update(data)
        self.events[name].set()

    def wait(self, name: str, timeout: float = WAIT) -> None:
        assert self.events[name].wait(timeout), f"timed out waiting for {name!r}"

    def is_set(self, name: str) -> bool:
        return self.events[name].is_set()

    def reset(self) -> None:
        for event in self.events.values():
            event.clear()
        self.data.clear()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


class Outer:
    """Wraps the middleware: records what it raised and when it returned."""

    def __init__(self, app: Any, probe: Probe) -> None:
        self.app = app
        self.probe = probe

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exc: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            exc = e
            raise
        finally:
            self.probe.set("mw_done", mw_exc=exc, scope_ctx=scope.get("state", {}).get("ctx"))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """An event the test thread sets and a coroutine on the server's loop awaits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def set(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._open:
                return
            self._waiters.append((loop, future))
        await future


# -- watching the PostgreSQL server ------------------------------------------


class PgMonitor:
    """A separate autocommit connection that reads ``pg_stat_activity``.

    The instants it returns are ``time.perf_counter()`` values."""

    def __init__(self, dsn: str, application_name: str = "ctxmw-test-monitor") -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True, application_name=application_name)

    def close(self) -> None:
        self.conn.close()

    def state(self, pid: int) -> tuple[str | None, str]:
        """(state, query) of backend ``pid``; state None if it is gone."""
        row = self.conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        return (None, "") if row is None else (row[0], row[1] or "")

    def sleeping(self, pid: int, needle: str = "pg_sleep") -> bool:
        """Backend ``pid`` is running a query containing ``needle``."""
        state, query = self.state(pid)
        return state == "active" and needle in query

    def wait_until(self, pid: int, sleeping: bool, timeout: float = WAIT) -> float:
        """Poll until :meth:`sleeping` is ``sleeping``; the instant it was seen."""
        end = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if self.sleeping(pid) is sleeping:
                return now
            assert now < end, f"backend {pid}: still {self.state(pid)} after {timeout} s"
            time.sleep(POLL)

    def wait_active(self, pid: int, needle: str = "pg_sleep", timeout: float = WAIT) -> float:
        """Poll until ``pid`` runs a query containing ``needle``; the instant it was seen."""
        end = time.perf_counter() + timeout
        while True:
            state, query = self.state(pid)
            now = time.perf_counter()
            if state == "active" and needle in query:
                return now
            assert now < end, f"backend {pid} never ran {needle!r}: {state} {query!r}"
            time.sleep(POLL)

    def wait_not_active(self, pid: int, bound: float = 1.0) -> float:
        """Poll until ``pid`` is not ``active``; the instant it was seen."""
        end = time.perf_counter() + bound
        while True:
            state, query = self.state(pid)
            now = time.perf_counter()
            if state != "active":
                return now
            assert now < end, f"backend {pid} still active after {bound}s: {query!r}"
            time.sleep(POLL)

    def wait_gone(self, pid: int, timeout: float = WAIT) -> None:
        end = time.perf_counter() + timeout
        while self.state(pid)[0] is not None:
            assert time.perf_counter() < end, f"backend {pid} still there: {self.state(pid)}"
            time.sleep(POLL)

    def backends(self, app_name: str) -> list[tuple[int, str | None]]:
        return [
            (row[0], row[1])
            for row in self.conn.execute(
                "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
                [app_name],
            )
        ]

    def wait_clean(self, app_name: str, max_backends: int, timeout: float = WAIT) -> None:
        """No backend of ``app_name`` active or in a transaction, and none leaked."""
        end = time.perf_counter() + timeout
        while True:
            backends = self.backends(app_name)
            dirty = [b for b in backends if b[1] != "idle"]
            if not dirty and len(backends) <= max_backends:
                return
            assert time.perf_counter() < end, (
                f"{app_name}: backends not clean (max {max_backends}): {backends}"
            )
            time.sleep(POLL)
