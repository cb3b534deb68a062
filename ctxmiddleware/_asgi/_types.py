"""The ASGI callables, typed loosely (servers and frameworks differ in detail)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Message", "NOTHING", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Nothing:
    """An awaitable that completes at once (cheaper than a coroutine)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


NOTHING = _Nothing()
