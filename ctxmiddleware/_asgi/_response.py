"""The response side of one ASGI request: what was sent, and the request id on it."""

from __future__ import annotations

import operator
from collections.abc import Awaitable

from .._core import DeadlineExceeded, RootContext, TaskCancellation
from .._request import RequestConfig
from ._types import NOTHING, Message, Send

__all__ = ["ResponseState", "ResponseTracker"]


class ResponseState:
    """Where the response is. One state, moving forward only."""

    NOT_STARTED = 0
    STARTED = 1
    COMPLETE = 2
    REPLACED = 3
    """The app's 500 for our own cancellation is being answered as a timeout
    by the middleware: the rest of the app's response is dropped."""
    STARTED_TRAILERS = 4
    """Started, and trailers will follow the body: they complete the response."""


_NOT_STARTED = ResponseState.NOT_STARTED
_STARTED = ResponseState.STARTED
_COMPLETE = ResponseState.COMPLETE
_REPLACED = ResponseState.REPLACED
_STARTED_TRAILERS = ResponseState.STARTED_TRAILERS
_name_of = operator.itemgetter(0)


class ResponseTracker:
    """Mixin of the ASGI request: the ``send`` the app gets.

    It adds the request id header to the response start (exactly one: the one
    the logs carry), notices when the response is complete (from then on the
    app is no longer interrupted, so background tasks run), and answers the
    timeout status in place of a 500 made from our own cancellation.
    """

    response = _NOT_STARTED
    # (From the other parts of the request.)
    config: RequestConfig
    root: RootContext
    rid: bytes
    status: int
    complete: bool
    answered_timeout: bool
    client_gone: bool
    cancellation: TaskCancellation | None
    server_send: Send

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function returning the server's own awaitable: no extra
        # coroutine per message on the hot path.
        kind = message["type"]
        if kind == "http.response.body":
            response = self.response
            if response == _STARTED:
                if not message.get("more_body", False):
                    # (response_complete(), written out: every response ends here.)
                    self.response = _COMPLETE
                    self.complete = True
                    if self.cancellation is not None:
                        self.cancellation.disarm()
            elif response == _REPLACED:
                return NOTHING
        elif kind == "http.response.start":
            if self.response == _NOT_STARTED:
                return self.start_response(message)
            if self.response == _REPLACED:
                return NOTHING
        elif kind == "http.response.trailers":
            if self.response == _REPLACED:
                return NOTHING
            if not message.get("more_trailers", False):
                self.response_complete()
        elif kind == "http.response.pathsend":
            self.response_complete()
        return self.server_send(message)

    def start_response(self, message: Message) -> Awaitable[None]:
        status = message["status"]
        if status == 500 and self.root.err() is not None:
            # The app's error middleware made a 500 of the request's own
            # cancellation (or of a ctx.err() it raised before we cancelled
            # it): answer as if it had reached us.
            return self.replace_500()
        # With trailers, the last body message does not complete the response.
        self.response = _STARTED_TRAILERS if message.get("trailers", False) else _STARTED
        self.status = status
        # The start message is built for this one call (as Starlette does), so
        # it is updated in place, like other middlewares do. Exactly one
        # request id: the one the logs carry (names compared in C).
        rid_name = self.config.request_id_header
        headers = message.get("headers", ())
        if rid_name in map(bytes.lower, map(_name_of, headers)):
            headers = [h for h in headers if h[0].lower() != rid_name]
        message["headers"] = [*headers, (rid_name, self.rid)]
        return self.server_send(message)

    def response_complete(self) -> None:
        # Before the final send is awaited: uvicorn reports http.disconnect
        # from inside that call, and that one is not an abort.
        self.response = _COMPLETE
        self.complete = True
        cancellation = self.cancellation
        if cancellation is not None:
            cancellation.disarm()

    def cancelled_by_us(self) -> bool:
        cancellation = self.cancellation
        return cancellation is not None and cancellation.cancel_called

    async def replace_500(self) -> None:
        # ctx.err() escaped the handler and the app's error middleware made
        # it a 500: answer as if it had reached us.
        if isinstance(self.root.err(), DeadlineExceeded):
            await self.send_timeout()
        self.response = _REPLACED

    async def send_timeout(self) -> None:
        config = self.config
        if await self.send_plain(config.timeout_status, config.timeout_body):
            self.answered_timeout = True

    async def send_plain(self, status: int, body: bytes) -> bool:
        """Answer ``status`` with a plain-text ``body`` if nothing was sent yet."""
        if self.response != _NOT_STARTED or self.client_gone:
            return False
        try:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await self.send({"type": "http.response.body", "body": body})
        except OSError:
            return False
        return True
