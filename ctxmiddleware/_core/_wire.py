"""How a remaining budget, a queue time and a trace id travel between services.

One set of parsers for both directions: the request layer reads a caller's
budget headers (``x-request-timeout-ms``, ``grpc-timeout``,
``connect-timeout-ms``, ``x-envoy-expected-rq-timeout-ms``), a front proxy's
``X-Request-Start`` and a W3C ``traceparent``; the httpx integration reads
the budget a caller set by hand on an outgoing request and writes the
outgoing headers; the task-queue integrations stamp jobs with the budget.

Every parser takes ``bytes`` or ``str`` and returns ``None`` for anything it
does not fully understand: a garbled header must never move a deadline.
"""

from __future__ import annotations

import math

__all__ = [
    "BUDGET_FORMATS",
    "MAX_BUDGET_DIGITS",
    "MAX_GRPC_DIGITS",
    "format_grpc_timeout",
    "parse_budget",
    "parse_budget_ms",
    "parse_grpc_timeout",
    "parse_request_start",
    "parse_traceparent",
]

MAX_BUDGET_DIGITS = 10
"""A budget header has 1 to 10 ASCII digits (about 115 days in ms); longer is garbage."""

MAX_GRPC_DIGITS = 8
"""``grpc-timeout``: 1 to 8 ASCII digits and a unit (gRPC PROTOCOL-HTTP2.md)."""

# grpc-timeout units, in seconds.
_GRPC_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# Outbound: the finest unit whose count fits in 8 digits (as grpc-go does).
_GRPC_OUT = (
    ("n", 1_000_000_000),
    ("u", 1_000_000),
    ("m", 1_000),
    ("S", 1),
)
_GRPC_MAX = 10**MAX_GRPC_DIGITS

_HEX = frozenset(b"0123456789abcdef")


def _ascii(raw: bytes | str) -> bytes | None:
    if isinstance(raw, str):
        try:
            return raw.encode("ascii")
        except UnicodeEncodeError:
            return None
    return raw


def parse_budget_ms(raw: bytes | str | None) -> int | None:
    """A budget in whole milliseconds (1 to 10 ASCII digits, nothing else), else None.

    Anything else (white space, a sign, a fraction, a unit, more digits) is
    ignored, never guessed at: a garbled header must not move a deadline.
    (HTTP servers strip the white space around a header value already.)
    Used for ``x-request-timeout-ms``, ``connect-timeout-ms`` and
    ``x-envoy-expected-rq-timeout-ms``.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            return None
    if 0 < len(raw) <= MAX_BUDGET_DIGITS and raw.isdigit():
        return int(raw)
    return None


def parse_grpc_timeout(raw: bytes | str | None) -> float | None:
    """A ``grpc-timeout`` (1 to 8 ASCII digits and one unit of ``H M S m u n``)
    in seconds, else None."""
    if raw is None:
        return None
    data = _ascii(raw)
    if data is None or not 2 <= len(data) <= MAX_GRPC_DIGITS + 1:
        return None
    unit = _GRPC_UNITS.get(data[-1])
    digits = data[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def format_grpc_timeout(seconds: float) -> str:
    """``seconds`` as a ``grpc-timeout`` value, rounded down, in the finest unit
    that fits 8 digits (``"0n"`` for nothing left; hours past ~11 years are capped)."""
    if not seconds > 0:  # (NaN too)
        return "0n"
    if seconds >= 3600.0 * _GRPC_MAX:
        return f"{_GRPC_MAX - 1}H"
    for unit, per_second in _GRPC_OUT:
        count = math.floor(seconds * per_second)
        if count < _GRPC_MAX:
            return f"{count}{unit}"
    minutes = math.floor(seconds / 60)
    if minutes < _GRPC_MAX:
        return f"{minutes}M"
    return f"{min(math.floor(seconds / 3600), _GRPC_MAX - 1)}H"


def _parse_ms_seconds(raw: bytes | str | None) -> float | None:
    ms = parse_budget_ms(raw)
    return None if ms is None else ms / 1000.0


BUDGET_FORMATS = {
    "ms": _parse_ms_seconds,
    "grpc": parse_grpc_timeout,
}
"""The formats a budget header may have (``budget_headers=`` values): the
header's value -> the budget in seconds, or None."""


def parse_budget(fmt: str, raw: bytes | str | None) -> float | None:
    """A budget header in format ``fmt`` (a key of :data:`BUDGET_FORMATS`), in seconds."""
    return BUDGET_FORMATS[fmt](raw)


# X-Request-Start: epoch seconds (nginx ``t=${msec}``: "1700000000.123"),
# milliseconds (Heroku) or microseconds (Apache ``%t``/New Relic convention).
# Told apart by magnitude, like the APM agents do: anything before 2001 or
# after 2286 in every reading is garbage.
_S_MIN, _S_MAX = 1e9, 1e10


def parse_request_start(raw: bytes | str | None) -> float | None:
    """The epoch time (seconds) an ``X-Request-Start`` header gives, else None.

    Accepts ``t=<value>`` or a bare value; the value is seconds (with an
    optional fraction), milliseconds or microseconds since the epoch (told
    apart by magnitude).
    """
    if raw is None:
        return None
    data = _ascii(raw)
    if data is None or len(data) > 32:
        return None
    if data[:2] == b"t=":
        data = data[2:]
    whole, dot, frac = data.partition(b".")
    if not whole.isdigit() or len(whole) > 19 or (dot and not frac.isdigit()):
        return None
    value = int(whole)
    if dot:
        value_f = float(data)
        return value_f if _S_MIN <= value_f < _S_MAX else None
    for scale in (1.0, 1e3, 1e6):
        seconds = value / scale
        if _S_MIN <= seconds < _S_MAX:
            return seconds
    return None


def parse_traceparent(raw: bytes | str | None) -> str | None:
    """The trace id (32 lower-case hex digits) of a valid W3C ``traceparent``, else None.

    ``version-traceid-parentid-flags``: version 00 must be exactly 55
    characters; a later version may append ``-...`` (W3C trace context, 4.3);
    version ``ff``, an all-zero trace id or parent id are invalid.
    """
    if raw is None:
        return None
    data = _ascii(raw)
    if data is None or len(data) < 55 or len(data) > 512:
        return None
    if data[2:3] != b"-" or data[35:36] != b"-" or data[52:53] != b"-":
        return None
    version, trace_id, parent_id, flags = data[:2], data[3:35], data[36:52], data[53:55]
    if not (_HEX.issuperset(version) and _HEX.issuperset(trace_id)):
        return None
    if not (_HEX.issuperset(parent_id) and _HEX.issuperset(flags)):
        return None
    if version == b"ff" or (version == b"00" and len(data) != 55):
        return None
    if len(data) > 55 and data[55:56] != b"-":
        return None
    if trace_id == b"0" * 32 or parent_id == b"0" * 16:
        return None
    return trace_id.decode("ascii")
