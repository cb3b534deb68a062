"""The disconnect watcher alone, over socket pairs: epoll and the poll() fallback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ctxmiddleware._wsgi import Watcher
from ctxmiddleware._wsgi._watcher import ARM_AHEAD

pytestmark = pytest.mark.timeout(30)


class Probe:
    def __init__(self) -> None:
        self.deadline_at = time.monotonic() + ARM_AHEAD + 0.05
        self.left = threading.Event()
        self.armed = threading.Event()

    def client_left(self) -> None:
        self.left.set()

    def arm_deadline(self) -> None:
        self.armed.set()


@pytest.fixture(params=[True, False], ids=["epoll", "poll"])
def watcher(request: pytest.FixtureRequest) -> Watcher:
    return Watcher(use_epoll=request.param)


def test_fin_is_a_disconnect(watcher: Watcher) -> None:
    server, client = socket.socketpair()
    probe = Probe()
    assert watcher.watch_fd(server.fileno(), probe)
    client.close()
    assert probe.left.wait(5)
    assert watcher.watching() == 0
    server.close()


def test_pending_bytes_are_not_a_disconnect_but_a_fin_behind_them_is(watcher: Watcher) -> None:
    server, client = socket.socketpair()
    probe = Probe()
    watcher.watch_fd(server.fileno(), probe)
    client.sendall(b"GET /next HTTP/1.1\r\n\r\n" * 100)  # pipelined, unread
    assert not probe.left.wait(0.1)
    client.close()
    assert probe.left.wait(5)
    watcher.unwatch_fd(server.fileno(), probe)
    server.close()


def test_unwatched_socket_is_not_reported(watcher: Watcher) -> None:
    server, client = socket.socketpair()
    probe = Probe()
    watcher.watch_fd(server.fileno(), probe)
    watcher.unwatch_fd(server.fileno(), probe)
    client.close()
    assert not probe.left.wait(0.1)
    server.close()


def test_probe_is_polled_until_it_reports(watcher: Watcher) -> None:
    gone = threading.Event()
    probe = Probe()
    watcher.watch_probe(gone.is_set, probe)
    assert not probe.left.wait(0.05)
    gone.set()
    assert probe.left.wait(5)
    assert watcher.watching() == 0


def test_deadline_armed_only_for_requests_still_running(watcher: Watcher) -> None:
    running, ended = Probe(), Probe()
    watcher.watch_deadline(ended)
    watcher.watch_deadline(running)
    watcher.unwatch_deadline(ended)  # it ended
    assert running.armed.wait(5)
    assert time.monotonic() >= running.deadline_at - ARM_AHEAD
    assert not ended.armed.is_set()
    assert watcher.timed == set()
