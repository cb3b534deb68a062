"""Pluggable request ids: ``request_id_factory`` and ``request_id_validator``.

Used only by the requests of a middleware given one of the two options (the
adapter instantiates a subclass with this mixin): the default path, a pooled
uuid4 or the caller's sane id, costs nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._config import RequestConfig
from ._headers import new_request_id, sane_request_id
from ._request import Request

__all__ = ["CustomRequestId"]


class CustomRequestId(Request):
    """Request mixin: the caller's id must also pass ``request_id_validator``;
    new ids come from ``request_id_factory(scope_or_environ)``."""

    _sent_rid: bytes | None = None

    def __init__(
        self,
        config: RequestConfig,
        peer: str | None,
        headers: Iterable[tuple[bytes, bytes]],
        body_may_stream: bool,
        hook_arg: Any,
        timed: bool = True,
    ) -> None:
        super().__init__(config, peer, headers, body_may_stream, hook_arg, timed)
        sent = self._sent_rid
        if sent is not None and sane_request_id(sent) is not None:
            validator = config.request_id_validator
            if validator is None or validator(sent.decode("ascii")):
                return  # the caller's id, kept by Request
        factory = config.request_id_factory
        if factory is None:
            if sent is not None:
                self.rid = new_request_id()  # the validator refused the caller's
            return
        made = factory(hook_arg)
        rid = made.encode("ascii", "replace") if isinstance(made, str) else b""
        if sane_request_id(rid) is None:
            raise ValueError(
                f"request_id_factory returned {made!r}: a request id is 1-128 characters"
                " of [A-Za-z0-9._:-] (it goes into a response header and the logs)"
            )
        self.rid = rid

    def _read_headers(self, headers: Iterable[tuple[bytes, bytes]], timed: bool) -> bytes | None:
        rid = self._sent_rid = super()._read_headers(headers, timed)
        return rid
