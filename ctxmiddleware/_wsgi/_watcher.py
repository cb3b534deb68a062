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
the watcher); unregistering another. (A socket left registered would cost a
wake-up per request: gunicorn's sync worker closes a connection by a
half-close, then waits for the client's FIN, which epoll would report.)

The thread also arms the deadline timers (the core's timer thread fires them)
of the requests still running :data:`ARM_AHEAD` seconds before their deadline
(:meth:`Watcher.watch_deadline`): a request costs a set insertion and removal,
and wakes the thread only if it is due before the time the thread looks next
(not when every request has the same timeout: about once per timeout). Most
requests end long before their deadline and never arm a timer.

The thread never blocks on a request, and nothing wakes it but a client
leaving, waitress's probes and a deadline coming up: no work per request.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["ARM_AHEAD", "PROBE_EVERY", "Timed", "Watched", "Watcher", "hung_up", "watcher"]

PROBE_EVERY = 0.002
"""How often waitress's ``client_disconnected()`` is asked (seconds)."""

ARM_AHEAD = 1.0
"""How long before a watched deadline the thread arms its timer (seconds): far
more than the thread can be late waking up (GIL, load). A request with less
left than that arms its own timer at once."""

_EPOLL = getattr(select, "epoll", None)
_RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_HANGUP = select.POLLHUP | select.POLLERR | _POLLRDHUP
# One-shot: a hung-up socket reports once, not at every wait.
_WATCH = _RDHUP | getattr(select, "EPOLLONESHOT", 0x40000000)


class Watched(Protocol):
    """What the watcher tells a request (the WSGI request)."""

    def client_left(self) -> None: ...


class Timed(Protocol):
    """A request whose deadline timer the watcher arms (the WSGI request)."""

    deadline_at: float  # (time.monotonic(); read when the thread looks)

    def arm_deadline(self) -> None: ...


def hung_up(fd: int) -> bool:
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
        # Requests whose timer the thread arms ARM_AHEAD seconds before their
        # deadline; when it looks at them next (math.inf: none to look at;
        # -math.inf while it looks).
        self.timed: set[Timed] = set()
        self._arm_at = math.inf
        self._look = False  # watch_deadline() wants the thread to look now
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
            try:
                ep.register(fd, _WATCH)
            except FileExistsError:  # a request on this connection never ended
                ep.modify(fd, _WATCH)
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

    def watch_deadline(self, request: Timed) -> None:
        """Call ``request.arm_deadline()`` from the thread ``ARM_AHEAD``
        seconds before ``request.deadline_at`` (its value then), unless
        :meth:`unwatch_deadline` comes first. Call it again if the deadline
        moved earlier."""
        self.timed.add(request)
        # (Read after the insertion: see _arm_due().)
        if request.deadline_at - ARM_AHEAD < self._arm_at:
            self._look = True
            self._wake()

    def unwatch_deadline(self, request: Timed) -> None:
        self.timed.discard(request)

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
        while True:
            timeout = PROBE_EVERY if self.probes else None
            arm_at = self._arm_at
            if arm_at != math.inf:
                wait = arm_at - time.monotonic()
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
            if self._look or time.monotonic() >= self._arm_at:
                self._arm_due()
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
            if request is not None and hung_up(fd):
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

    def _arm_due(self) -> None:
        """Arm the timers due (ARM_AHEAD before their deadline); note when to
        look next."""
        timed = self.timed
        self._look = False
        # While it is -math.inf, watch_deadline() does not wake the thread: a
        # request it adds meanwhile is seen by the second look below (it is
        # added before watch_deadline() reads _arm_at).
        self._arm_at = -math.inf
        while True:
            now = time.monotonic()
            nxt = math.inf
            for request in list(timed):
                at = request.deadline_at - ARM_AHEAD
                if at <= now:
                    timed.discard(request)
                    try:
                        request.arm_deadline()
                    except Exception:
                        logging.getLogger("ctxmiddleware").exception(
                            "ctxmiddleware: arming a deadline failed"
                        )
                elif at < nxt:
                    nxt = at
            self._arm_at = nxt
            if all(request.deadline_at - ARM_AHEAD >= nxt for request in list(timed)):
                return
            self._arm_at = -math.inf

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
