"""The receive side of one ASGI request: the app's ``receive`` and the disconnect watcher."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .._request import EAGER_BODY_LIMIT
from ._types import Message, Receive

__all__ = ["ReceiveRelay"]


class ReceiveRelay:
    """Mixin of the ASGI request: the ``receive`` the app gets, and the watcher.

    Until the watcher runs, the app reads the server directly: body chunks
    pass through untouched and in order. The watcher (a task started once the
    request is watched, see ``WatchControl``) becomes the only reader of the
    server's ``receive()``: it hands body chunks to the app and turns
    ``http.disconnect`` into the request's cancellation. It reads ahead only
    a body known to be small (at most EAGER_BODY_LIMIT bytes), or once the app
    has read the body: a large or unframed upload (HTTP/2 streaming) is never
    buffered by us, so the server's backpressure holds.
    """

    body_done = False
    app_reading = 0
    watcher: asyncio.Task[None] | None = None
    buffered: deque[Message] | None = None
    buffered_bytes = 0
    disconnect: Message | None = None
    waiters: list[asyncio.Future[None]] | None = None
    # (From the other parts of the request.)
    server_receive: Receive
    body_known_small: bool
    watching: bool
    ended: bool
    loop: asyncio.AbstractEventLoop

    client_left: Callable[[], None]  # (WatchControl's)

    async def receive(self) -> Message:
        while True:
            buffered = self.buffered
            if buffered:
                message = buffered.popleft()
                self.buffered_bytes -= len(message.get("body", b""))
                return message
            if self.disconnect is not None:
                # Replayed to every later call: hypercorn reports it only
                # once, and a second receive() from it would hang.
                return self.disconnect
            watcher = self.watcher
            if watcher is None or watcher.done():
                return await self.receive_from_server()
            future = self.loop.create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(future)
            try:
                await future
            finally:
                if future in self.waiters:
                    self.waiters.remove(future)

    async def receive_from_server(self) -> Message:
        """The app reads the server itself (no watcher, or one that stopped reading ahead)."""
        self.watcher = None
        self.app_reading += 1
        try:
            message = await self.server_receive()
        finally:
            self.app_reading -= 1
        kind = message["type"]
        if kind == "http.request":
            if not message.get("more_body", False):
                self.body_done = True
                if self.watching:
                    self.start_watcher()
        elif kind == "http.disconnect":
            self.client_left()
        return message

    def may_watch_receive(self) -> bool:
        """Whether the watcher may read the server now without buffering much."""
        return self.body_done or self.body_known_small

    def start_watcher(self) -> None:
        if self.watcher is not None or self.app_reading or self.disconnect is not None:
            return
        if self.ended:
            return
        self.watcher = self.loop.create_task(self.watch_receive())

    def stop_watcher(self) -> None:
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            if not watcher.done():
                watcher.cancel()

    async def watch_receive(self) -> None:
        """The only reader of the server's receive() once it runs."""
        receive = self.server_receive
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken server channel means a broken connection
                message = {"type": "http.disconnect"}
            if message["type"] == "http.request":
                if self.buffered is None:
                    self.buffered = deque()
                self.buffered.append(message)
                self.buffered_bytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self.body_done = True
                self.wake_readers()
                if self.buffered_bytes > EAGER_BODY_LIMIT and not self.body_done:
                    # More than announced (or than is safe to hold): leave the
                    # rest to the app's own reads, which keep backpressure.
                    return
                continue
            self.client_left()
            return

    def wake_readers(self) -> None:
        waiters = self.waiters
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(None)
