"""The values every request context carries, and what they are made of.

They live in the core, not in a web adapter, so that integrations (logging,
httpx, task queues) can read them without depending on any web framework.
"""

from __future__ import annotations

import hmac

from ._context import Key

__all__ = [
    "AUTH_TOKEN",
    "CAUSE_CHAIN",
    "CLIENT_IP",
    "REQUEST_ID",
    "TRACEPARENT",
    "ClientDisconnected",
    "Secret",
]


class Secret:
    """A credential that never shows itself in ``str()``, ``repr()`` or logs.

    ``reveal()`` returns the raw value; comparisons run in constant time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret itself. Don't log it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, len(self._value)))

    def __reduce__(self) -> str:  # pickling would copy the secret around
        raise TypeError("a Secret cannot be pickled")


class ClientDisconnected(Exception):
    """The cause of a request context cancelled because the client went away.

    ``ctx.err()`` is a plain :class:`~ctxmiddleware.Canceled`;
    ``ctxmiddleware.cause(ctx)`` is an instance of this class.
    """

    def __init__(self, message: str = "client disconnected") -> None:
        super().__init__(message)


REQUEST_ID: Key[str] = Key("request_id")
"""The request id: the caller's ``x-request-id`` if it is sane, else a fresh uuid4 hex."""

CLIENT_IP: Key[str] = Key("client_ip")
"""The client address: the socket peer, or the forwarded address that trusted proxies vouch for."""

AUTH_TOKEN: Key[Secret] = Key("auth_token")
"""The ``Authorization: Bearer`` credential, as a :class:`Secret`; absent without one."""

CAUSE_CHAIN: Key[tuple[str, ...]] = Key("cause_chain")
"""In a background job: the ids of the requests and jobs that led to it, oldest first
(the request that enqueued it last). Absent in a request served directly."""

TRACEPARENT: Key[str] = Key("traceparent")
"""The caller's W3C ``traceparent`` header, as sent (only if valid); absent without one.
The httpx integration forwards it untouched."""
