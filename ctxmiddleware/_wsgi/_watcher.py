"""One disconnect watcher thread per process for every WSGI request.

Requests register their client socket (or waitress's ``client_disconnected``
callable) once their body is read, and unregister when they end. The thread
sleeps in ``epoll_wait`` (``EPOLLRDHUP``: the kernel reports the client's FIN
at once, even with unread bytes of a pipelined request in the buffer; no
``EPOLLIN``, so keep-alive and pipelined bytes never wake it) and polls
waitress's callables every :data:`PROBE_EVERY` seconds while any is
registered. Elsewhere than Linux, ``poll()`` replaces epoll: it sees a
hang-up, and a FIN only when no unread bytes are in the way.

Registering costs the request thread one ``epoll_ctl`` call (no wake-up of
the watcher); unregistering another. The thread never blocks on a request.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["PROBE_EVERY", "Watched", "Watcher", "watcher"]

PROBE_EVERY = 0.002
"""How often waitress's ``client_disconnected()`` is asked (seconds)."""

_EPOLL = getattr(select, "epoll", None)
_RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_HANGUP = select.POLLHUP | select.POLLERR | _POLLRDHUP


class Watched(Protocol):
    """What the watcher tells a request (the WSGI request)."""

    arrival: float
    finished: bool

    def client_left(self) -> None: ...

    def grace_over(self) -> None: ...


def _hung_up(fd: int) -> bool:
    """The socket ``fd`` reports a FIN, hang-up or error right now."""
    p = select.poll()
    p.register(fd, _HANGUP | (0 if _POLLRDHUP else select.POLLIN))
    for _fd, events in p.poll(0):
        if events & _HANGUP:
            return True
        if events & select.POLLIN and not _POLLRDHUP:  # no POLLRDHUP: peek for EOF
            try:
                with socket.socket(fileno=os.dup(fd)) as s:
                    return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True
    return False


class Watcher:
    """The process's watcher: :func:`watcher` returns it (a new one after a fork)."""

    def __init__(self, use_epoll: bool = True) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self.by_fd: dict[int, Watched] = {}
        self.probes: dict[Watched, Callable[[], bool]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll = _EPOLL() if use_epoll and _EPOLL is not None else None
        if self._epoll is not None:
            self._epoll.register(self._wake_r, select.EPOLLIN)
        self._poll_changed = True
        # Requests in their grace period, oldest first (see note()).
        self.fresh: deque[Watched] = deque()
        self.grace = 0.001
        self._fresh_noted = False
        self.thread = threading.Thread(
            target=self._run, name="ctxmiddleware-wsgi-watcher", daemon=True
        )
        self.thread.start()

    # -- the request threads' side -------------------------------------------

    def watch_fd(self, fd: int, request: Watched) -> bool:
        """Watch the client socket ``fd`` for ``request``; False if it cannot be."""
        self.by_fd[fd] = request
        ep = self._epoll
        if ep is not None:
            # One-shot: a hung-up socket reports once, not at every wait.
            mask = _RDHUP | select.EPOLLONESHOT
            try:
                ep.register(fd, mask)
            except FileExistsError:  # a request on this connection never ended
                ep.modify(fd, mask)
            except OSError:
                self.by_fd.pop(fd, None)
                return False
        else:
            self._changed()
        return True

    def unwatch_fd(self, fd: int, request: Watched) -> None:
        if self.by_fd.get(fd) is not request:
            return
        del self.by_fd[fd]
        ep = self._epoll
        if ep is not None:
            try:  # noqa: SIM105  (per request: cheaper than contextlib.suppress)
                ep.unregister(fd)
            except (OSError, ValueError):  # closed already (epoll dropped it)
                pass
        else:
            self._changed()

    def note(self, request: Watched) -> None:
        """``request`` started: call its ``grace_over()`` from this thread once
        ``grace`` seconds have passed, if it has not finished by then (most
        requests have: they never pay for a deadline timer)."""
        self.fresh.append(request)
        if not self._fresh_noted:
            self._fresh_noted = True
            self._wake()

    def watch_probe(self, probe: Callable[[], bool], request: Watched) -> None:
        """Ask ``probe()`` every PROBE_EVERY seconds for ``request`` (waitress)."""
        with self._lock:
            self.probes[request] = probe
            first = len(self.probes) == 1
        if first:
            self._wake()

    def unwatch_probe(self, request: Watched) -> None:
        with self._lock:
            self.probes.pop(request, None)

    def _changed(self) -> None:
        self._poll_changed = True
        self._wake()

    def _wake(self) -> None:
        try:  # noqa: SIM105
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread will wake anyway
            pass

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        wake_r = self._wake_r
        ep = self._epoll
        poller: select.poll | None = None
        fresh = self.fresh
        while True:
            timeout = PROBE_EVERY if self.probes else None
            if fresh:
                wait = fresh[0].arrival + self.grace - time.monotonic()
                wait = wait if wait > 0 else 0
                if timeout is None or wait < timeout:
                    timeout = wait
            if ep is not None:
                events = ep.poll(-1 if timeout is None else timeout)
            else:
                if poller is None or self._poll_changed:
                    self._poll_changed = False
                    poller = select.poll()
                    poller.register(wake_r, select.POLLIN)
                    for fd in list(self.by_fd):
                        poller.register(fd, _HANGUP | (0 if _POLLRDHUP else select.POLLIN))
                events = poller.poll(None if timeout is None else timeout * 1000)
            # (In methods, not here: a local of this loop would keep the last
            # request it named alive while the thread sleeps.)
            if events:
                self._events(events, wake_r)
            if fresh:
                self._grace(fresh)
            if self.probes:
                self._ask_probes()

    def _events(self, events: list[tuple[int, int]], wake_r: int) -> None:
        for fd, _mask in events:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            request = self.by_fd.get(fd)
            # The event may be stale (the request ended, and a new request
            # got the same fd number): confirm it on the socket itself.
            if request is not None and _hung_up(fd):
                self._gone(fd, request)
            elif self._epoll is None and request is not None:
                # poll() without POLLRDHUP woke for bytes (pipelined):
                # stop polling this fd, or it would spin.
                self.by_fd.pop(fd, None)
                self._poll_changed = True

    def _ask_probes(self) -> None:
        with self._lock:
            probes = list(self.probes.items())
        for request, probe in probes:
            try:
                gone = probe()
            except Exception:
                gone = False
            if gone:
                with self._lock:
                    self.probes.pop(request, None)
                _tell(request)

    def _grace(self, fresh: deque[Watched]) -> None:
        limit = time.monotonic() - self.grace
        while fresh:
            request = fresh[0]
            if request.finished:
                fresh.popleft()
            elif request.arrival <= limit:
                fresh.popleft()
                try:
                    request.grace_over()
                except Exception:
                    logging.getLogger("ctxmiddleware").exception("ctxmiddleware: grace_over")
            else:
                return
        # Empty: the next note() wakes us. (Checked again after clearing the
        # flag: a request noted in between saw it still set and did not wake us.)
        self._fresh_noted = False
        if fresh:
            self._fresh_noted = True

    def _gone(self, fd: int, request: Watched) -> None:
        if self.by_fd.get(fd) is request:
            del self.by_fd[fd]
            if self._epoll is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EBADF):
                        raise
            else:
                self._poll_changed = True
        _tell(request)

    def watching(self) -> int:
        """Sockets and probes registered now (tests read it)."""
        return len(self.by_fd) + len(self.probes)


def _tell(request: Watched) -> None:
    try:
        request.client_left()
    except Exception:  # never kill the watcher
        logging.getLogger("ctxmiddleware").exception("ctxmiddleware: disconnect callback failed")


_watcher: Watcher | None = None
_create_lock = threading.Lock()
USE_EPOLL = True


def watcher() -> Watcher:
    """The process's watcher, started on first use."""
    w = _watcher
    if w is not None:
        return w
    return _start()


def _start() -> Watcher:
    global _watcher
    with _create_lock:
        if _watcher is None:
            _watcher = Watcher(USE_EPOLL)
        return _watcher


def _after_fork() -> None:
    # The thread does not survive a fork (gunicorn's workers): the child
    # starts its own on first use. The parent's epoll fd is left to the child.
    global _watcher, _create_lock
    _watcher = None
    _create_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
