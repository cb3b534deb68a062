"""The middleware's options, validated and resolved once, shared by every adapter."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from .._core import BUDGET_FORMATS, Context, Key, background
from ._headers import IPNetwork, parse_networks

__all__ = [
    "HeaderRole",
    "RequestConfig",
    "RequestOptions",
    "RequestIdFactory",
    "RequestIdValidator",
    "ValuesHook",
    "positive_seconds",
]

ValuesHook = Callable[[Any], Iterable[tuple[Key[Any], object]]]
"""``values(scope_or_environ)`` returns extra ``(key, value)`` pairs for one request."""

RequestIdFactory = Callable[[Any], str]
"""``request_id_factory(scope_or_environ)`` returns a new request id (a str)."""
RequestIdValidator = Callable[[str], bool]
"""``request_id_validator(incoming_id)``: keep the caller's request id?"""

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
    BUDGET_GRPC = 6
    REQUEST_START = 7
    TRACEPARENT = 8


# Budget headers recognised by default (name -> format, see BUDGET_FORMATS);
# the ``timeout_header`` option names the "ms" one we send ourselves.
DEFAULT_BUDGET_HEADERS: dict[str, str] = {
    "grpc-timeout": "grpc",
    "connect-timeout-ms": "ms",
    "x-envoy-expected-rq-timeout-ms": "ms",
}
_BUDGET_ROLES = {"ms": HeaderRole.BUDGET, "grpc": HeaderRole.BUDGET_GRPC}


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


class RequestOptions(TypedDict, total=False):
    """The options every request middleware takes (``ContextMiddleware``,
    ``WSGIContextMiddleware``), as keyword arguments; the defaults and the
    checks are :meth:`RequestConfig.from_options`'s."""

    timeout: float | datetime.timedelta | None
    trusted_proxies: Iterable[str]
    forwarded_header: str
    request_id_header: str
    timeout_header: str
    timeout_status: int
    timeout_body: bytes
    values: ValuesHook | None
    base: Context | None
    disconnect_grace: float
    request_id_factory: RequestIdFactory | None
    request_id_validator: RequestIdValidator | None
    budget_headers: Mapping[str, str | None] | None
    request_start_header: str | None
    request_id_from_traceparent: bool


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
    request_id_factory: RequestIdFactory | None = None
    request_id_validator: RequestIdValidator | None = None
    # Budget headers read (lower-case name -> format), for docs and tests.
    budget_headers: tuple[tuple[bytes, str], ...] = ()
    # No valid request id header: use the traceparent's trace id.
    request_id_from_traceparent: bool = False

    @property
    def custom_request_ids(self) -> bool:
        """Requests need the CustomRequestId mixin."""
        return self.request_id_factory is not None or self.request_id_validator is not None

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
        request_id_factory: RequestIdFactory | None = None,
        request_id_validator: RequestIdValidator | None = None,
        budget_headers: Mapping[str, str | None] | None = None,
        request_start_header: str | None = "x-request-start",
        request_id_from_traceparent: bool = False,
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
        for name, hook in (
            ("request_id_factory", request_id_factory),
            ("request_id_validator", request_id_validator),
        ):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be a callable or None, not {type(hook).__name__}")
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
        budgets = _budget_headers(budget_headers, tmo_name)
        for budget_name, budget_format in budgets:
            if roles.get(budget_name, HeaderRole.BUDGET) != HeaderRole.BUDGET:
                raise ValueError(f"budget_headers: {budget_name.decode()!r} is already read")
            roles[budget_name] = _BUDGET_ROLES[budget_format]
        if tmo_name not in dict(budgets):
            del roles[tmo_name]  # budget_headers={timeout_header: None}: not read
        if not isinstance(request_id_from_traceparent, bool):
            raise TypeError("request_id_from_traceparent must be a bool")
        if b"traceparent" in roles:
            raise ValueError("traceparent is read as the W3C trace context, not as another header")
        roles[b"traceparent"] = HeaderRole.TRACEPARENT
        if networks:  # without trusted proxies the forwarding header is never read
            if fwd in roles:
                raise ValueError(f"forwarded_header {fwd.decode()!r} is already read")
            roles[fwd] = HeaderRole.FORWARDED
            # Nor the front proxy's clock: X-Request-Start is believed from them only.
            if request_start_header is not None:
                start = _header_name(request_start_header, "request_start_header")
                if start in roles:
                    raise ValueError(f"request_start_header {start.decode()!r} is already read")
                roles[start] = HeaderRole.REQUEST_START
        elif request_start_header is not None:
            _header_name(request_start_header, "request_start_header")
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
            request_id_factory=request_id_factory,
            request_id_validator=request_id_validator,
            budget_headers=budgets,
            request_id_from_traceparent=request_id_from_traceparent,
        )


def _budget_headers(
    option: Mapping[str, str | None] | None, timeout_header: bytes
) -> tuple[tuple[bytes, str], ...]:
    """The budget headers to read: the defaults plus ``timeout_header`` ("ms"),
    updated by ``option`` (a name -> format, ``None`` to stop reading it)."""
    merged: dict[bytes, str | None] = {timeout_header: "ms"}
    for default_name, default_format in DEFAULT_BUDGET_HEADERS.items():
        merged[default_name.encode("ascii")] = default_format
    if option is not None:
        if not isinstance(option, Mapping):
            raise TypeError(
                "budget_headers must be a mapping of header name -> format"
                f" ({', '.join(map(repr, BUDGET_FORMATS))}) or None, not {type(option).__name__}"
            )
        for name, fmt in option.items():
            key = _header_name(name, "a budget_headers name")
            if fmt is not None and fmt not in BUDGET_FORMATS:
                raise ValueError(
                    f"budget_headers[{name!r}] must be one of"
                    f" {', '.join(map(repr, BUDGET_FORMATS))} or None, not {fmt!r}"
                )
            merged[key] = fmt
    return tuple((name, fmt) for name, fmt in merged.items() if fmt is not None)
