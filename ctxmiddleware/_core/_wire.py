"""How a remaining budget travels between services (``x-request-timeout-ms``).

One parser for both directions: the request layer reads a caller's budget, and
the httpx integration reads the budget a caller set by hand on an outgoing
request.
"""

from __future__ import annotations

__all__ = ["MAX_BUDGET_DIGITS", "parse_budget_ms"]

MAX_BUDGET_DIGITS = 10
"""A budget header has 1 to 10 ASCII digits (about 115 days in ms); longer is garbage."""


def parse_budget_ms(raw: bytes | str | None) -> int | None:
    """A budget in whole milliseconds (1 to 10 ASCII digits, nothing else), else None.

    Anything else (white space, a sign, a fraction, a unit, more digits) is
    ignored, never guessed at: a garbled header must not move a deadline.
    (HTTP servers strip the white space around a header value already.)
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
