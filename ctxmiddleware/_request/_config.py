"""The middleware's options, validated and resolved once, shared by every adapter."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._core import Context, Key, background
from ._headers import IPNetwork, parse_networks

__all__ = ["HeaderRole", "RequestConfig", "ValuesHook", "positive_seconds"]

ValuesHook = Callable[[Any], Iterable[tuple[Key[Any], object]]]
"""``values(scope_or_environ)`` returns extra ``(key, value)`` pairs for one request."""

# An HTTP header name (RFC 9110 token): nothing that could split a header line.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class HeaderRole:
    """What the middleware reads from a request header (small ints: compared on the hot path)."""

    REQUEST_ID = 0
    BUDGET = 1
    AUTHORIZATION = 2
    CONTENT_LENGTH = 3
    TRANSFER_ENCODING = 4
    FORWARDED = 5


def positive_seconds(value: object, what: str) -> float:
    """``value`` (seconds, or a ``timedelta``) as a positive finite float; else a clear error."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{what} is too large: {value!r}") from None
    else:
        raise TypeError(
            f"{what} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{what} must be a positive number of seconds (finite), not {value!r}")
    return seconds


def _header_name(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    name = value.strip().lower().encode("latin-1", "replace")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{what} must be an HTTP header name, not {value!r}")
    return name


@dataclass(frozen=True, slots=True)
class RequestConfig:
    """Every option of the request middlewares, checked once at construction.

    Build it with :meth:`from_options`, which rejects bad values with a
    ``TypeError`` or ``ValueError`` naming the option: nothing fails later,
    per request.
    """

    timeout: float | None
    trusted_proxies: tuple[IPNetwork, ...]
    forwarded_rfc7239: bool
    request_id_header: bytes
    timeout_header: bytes
    timeout_status: int
    timeout_body: bytes
    values: ValuesHook | None
    base: Context
    disconnect_grace: float
    # Lower-case header name -> HeaderRole, for one dict lookup per header.
    header_roles: dict[bytes, int]
    # The same names, to tell in one C call whether a request has any of them.
    header_names: frozenset[bytes]
    # The timeout is shorter than the disconnect grace: watch every request at once.
    timeout_is_urgent: bool

    @classmethod
    def from_options(
        cls,
        *,
        timeout: float | datetime.timedelta | None = 30.0,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
        request_id_header: str = "x-request-id",
        timeout_header: str = "x-request-timeout-ms",
        timeout_status: int = 504,
        timeout_body: bytes = b"Gateway Timeout",
        values: ValuesHook | None = None,
        base: Context | None = None,
        disconnect_grace: float = 0.001,
    ) -> RequestConfig:
        seconds = None if timeout is None else positive_seconds(timeout, "timeout")
        networks = parse_networks(trusted_proxies)
        fwd = _header_name(forwarded_header, "forwarded_header")
        if fwd not in (b"x-forwarded-for", b"forwarded"):
            raise ValueError('forwarded_header must be "x-forwarded-for" or "forwarded"')
        rid_name = _header_name(request_id_header, "request_id_header")
        tmo_name = _header_name(timeout_header, "timeout_header")
        if isinstance(timeout_status, bool) or not isinstance(timeout_status, int):
            raise TypeError("timeout_status must be an int HTTP status code")
        if not 400 <= timeout_status <= 599:
            # A 2xx or 3xx would tell the caller its request succeeded.
            raise ValueError("timeout_status must be an HTTP status code for an error (400-599)")
        if not isinstance(timeout_body, (bytes, bytearray)):
            raise TypeError("timeout_body must be bytes")
        if values is not None and not callable(values):
            raise TypeError("values must be a callable returning (key, value) pairs, or None")
        if base is None:
            base = background()
        elif not isinstance(base, Context):
            raise TypeError(f"base must be a ctxmiddleware.Context, not {type(base).__name__}")
        if isinstance(disconnect_grace, bool) or not isinstance(disconnect_grace, (int, float)):
            raise TypeError("disconnect_grace must be a number of seconds")
        if not 0 <= disconnect_grace <= 0.005:
            # A longer grace would push disconnect-to-cancel latency past a few ms.
            raise ValueError("disconnect_grace must be between 0 and 0.005 seconds")
        roles = {
            rid_name: HeaderRole.REQUEST_ID,
            tmo_name: HeaderRole.BUDGET,
            b"authorization": HeaderRole.AUTHORIZATION,
            b"content-length": HeaderRole.CONTENT_LENGTH,
            b"transfer-encoding": HeaderRole.TRANSFER_ENCODING,
        }
        if len(roles) != 5:
            raise ValueError("request_id_header and timeout_header must be distinct headers")
        if networks:  # without trusted proxies the forwarding header is never read
            roles[fwd] = HeaderRole.FORWARDED
        return cls(
            timeout=seconds,
            trusted_proxies=networks,
            forwarded_rfc7239=fwd == b"forwarded",
            request_id_header=rid_name,
            timeout_header=tmo_name,
            timeout_status=timeout_status,
            timeout_body=bytes(timeout_body),
            values=values,
            base=base,
            disconnect_grace=float(disconnect_grace),
            header_roles=roles,
            header_names=frozenset(roles),
            timeout_is_urgent=seconds is not None and seconds <= disconnect_grace,
        )
