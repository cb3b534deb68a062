"""Request id and client IP in every log record, from the current context."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from .._core import CLIENT_IP, REQUEST_ID, current

__all__ = ["RequestContextFilter", "add_request_context"]


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``client_ip`` attributes to every record.

    Outside a request (or in code not bound to its context) both are
    ``default`` (``"-"``), so a format string using them never fails. Values
    already on the record (``extra=``, or set by this filter on a
    ``QueueHandler`` in the request) are kept::

        handler.addFilter(RequestContextFilter())
        logging.Formatter("%(asctime)s %(request_id)s %(client_ip)s %(message)s")
    """

    def __init__(self, name: str = "", default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        # Values already on the record win: ``extra=``, or an earlier run of this
        # filter in the request's own thread (a QueueHandler's, say) when the
        # record is handled again elsewhere, outside the request.
        attrs = record.__dict__
        if "request_id" not in attrs or "client_ip" not in attrs:
            ctx = current()
            if "request_id" not in attrs:
                record.request_id = (
                    ctx.value(REQUEST_ID) or _failed_request_id(record) or self.default
                )
            if "client_ip" not in attrs:
                record.client_ip = ctx.value(CLIENT_IP) or self.default
        return True


def _failed_request_id(record: logging.LogRecord) -> str | None:
    """The request id ContextMiddleware put on the exception a request failed
    with: its traceback is logged (by the server) after the request's context
    is gone."""
    exc_info = record.exc_info
    if not exc_info or exc_info[1] is None:
        return None
    rid = getattr(exc_info[1], "ctxmiddleware_request_id", None)
    return rid if isinstance(rid, str) else None


def add_request_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor adding ``request_id`` and ``client_ip`` when in a request."""
    ctx = current()
    request_id = ctx.value(REQUEST_ID)
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
        client_ip = ctx.value(CLIENT_IP)
        if client_ip is not None:
            event_dict.setdefault("client_ip", client_ip)
    return event_dict
