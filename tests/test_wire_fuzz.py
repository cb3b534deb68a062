"""Fuzzing the wire parsers (ctxmiddleware/_core/_wire.py) and the deadline the
request layer derives from every budget header: garbage never moves a
deadline, the smallest valid budget wins, outbound values parse back."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from ctxmiddleware._core import (
    format_grpc_timeout,
    parse_budget_ms,
    parse_grpc_timeout,
    parse_request_start,
    parse_traceparent,
)
from ctxmiddleware._request import Request, RequestConfig

UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
raw = st.one_of(st.none(), st.binary(max_size=70), st.text(max_size=70))
grpc_valid = st.builds(
    lambda digits, unit: (digits, unit),
    st.text("0123456789", min_size=1, max_size=8),
    st.sampled_from(sorted(UNITS)),
)


@given(raw)
def test_parse_grpc_timeout_never_raises(value: bytes | str | None) -> None:
    seconds = parse_grpc_timeout(value)
    if seconds is not None:
        assert seconds >= 0
        text = value.decode() if isinstance(value, bytes) else value
        assert text is not None and text[-1] in UNITS and text[:-1].isdigit()
        assert len(text) <= 9 and text.isascii()


@given(grpc_valid)
def test_parse_grpc_timeout_valid(case: tuple[str, str]) -> None:
    digits, unit = case
    for value in (digits + unit, (digits + unit).encode()):
        assert parse_grpc_timeout(value) == int(digits) * UNITS[unit]


@given(grpc_valid, st.sampled_from([" ", "+", "-", ".", "0", "x", "\x00", "\u0663"]))
def test_parse_grpc_timeout_rejects_near_misses(case: tuple[str, str], junk: str) -> None:
    digits, unit = case
    assert parse_grpc_timeout(junk + digits + unit + " ") is None
    assert parse_grpc_timeout(digits + junk + unit) is None or junk == "0"
    assert parse_grpc_timeout(digits + unit + junk) is None
    assert parse_grpc_timeout("1" * 9 + unit) is None
    assert parse_grpc_timeout(digits + unit.lower() if unit in "HMS" else digits + "s") in (
        None,
        int(digits) * UNITS.get(unit.lower(), 0),
    )


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_format_grpc_timeout_rounds_down_and_parses_back(seconds: float) -> None:
    value = format_grpc_timeout(seconds)
    parsed = parse_grpc_timeout(value)
    assert parsed is not None
    assert parsed <= seconds * (1 + 1e-12) + 1e-12  # never more than what is left
    if 0 < seconds < 1e7:
        # The finest unit that fits 8 digits: loses less than one part in 10**5.
        assert seconds - parsed <= max(seconds * 1e-5, 1e-9) + 1e-12


def test_format_grpc_timeout_units() -> None:
    assert format_grpc_timeout(0) == "0n"
    assert format_grpc_timeout(-1) == "0n"
    assert format_grpc_timeout(float("nan")) == "0n"
    assert format_grpc_timeout(0.05) == "50000000n"
    assert format_grpc_timeout(2.5) == "2500000u"
    assert format_grpc_timeout(250.0) == "250000m"
    assert format_grpc_timeout(1e6) == "1000000S"
    assert format_grpc_timeout(1e9) == "16666666M"
    assert format_grpc_timeout(float("inf")) == "99999999H"


@given(raw)
def test_parse_budget_ms_never_raises(value: bytes | str | None) -> None:
    ms = parse_budget_ms(value)
    assert ms is None or 0 <= ms < 10**10


@given(raw)
def test_parse_request_start_never_raises(value: bytes | str | None) -> None:
    start = parse_request_start(value)
    assert start is None or 1e9 <= start < 1e10


@given(st.floats(min_value=1e9, max_value=9.9e9), st.sampled_from(["s", "ms", "us", "bare"]))
def test_parse_request_start_units(epoch: float, unit: str) -> None:
    if unit == "s":
        text, tolerance = f"t={epoch:.6f}", 1e-5
    elif unit == "ms":
        text, tolerance = f"t={int(epoch * 1e3)}", 1e-3
    elif unit == "us":
        text, tolerance = f"t={int(epoch * 1e6)}", 1e-3
    else:
        text, tolerance = str(int(epoch * 1e3)), 1e-3
    parsed = parse_request_start(text)
    assert parsed is not None and abs(parsed - epoch) <= tolerance
    assert parse_request_start(text.encode()) == parsed


@given(raw)
def test_parse_traceparent_never_raises(value: bytes | str | None) -> None:
    trace_id = parse_traceparent(value)
    if trace_id is not None:
        assert len(trace_id) == 32 and set(trace_id) <= set("0123456789abcdef")
        assert trace_id != "0" * 32


@given(
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.text("0123456789abcdef", min_size=16, max_size=16),
    st.text("0123456789abcdef", min_size=2, max_size=2),
)
def test_parse_traceparent_valid(trace_id: str, parent_id: str, flags: str) -> None:
    value = f"00-{trace_id}-{parent_id}-{flags}"
    expected = None if trace_id == "0" * 32 or parent_id == "0" * 16 else trace_id
    assert parse_traceparent(value) == expected
    assert parse_traceparent(value + "-x") is None  # version 00: exactly 55 chars
    assert parse_traceparent(value.upper()) is None or value == value.upper()


# -- the deadline the request layer derives --------------------------------------------

NAMES = [b"x-request-timeout-ms", b"grpc-timeout", b"connect-timeout-ms",
         b"x-envoy-expected-rq-timeout-ms"]
header_value = st.one_of(
    st.binary(max_size=12),
    st.text("0123456789", min_size=1, max_size=11).map(str.encode),
    grpc_valid.map(lambda c: (c[0] + c[1]).encode()),
)
CONFIG = RequestConfig.from_options(timeout=30)


def _expected(name: bytes, value: bytes) -> float | None:
    if name == b"grpc-timeout":
        return parse_grpc_timeout(value)
    ms = parse_budget_ms(value)
    return None if ms is None else ms / 1000


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(NAMES), header_value), max_size=6))
def test_deadline_is_the_minimum_of_every_valid_budget(headers: list[tuple[bytes, bytes]]) -> None:
    before = time.monotonic()
    request = Request(CONFIG, "127.0.0.1", headers, False, None)
    budgets = [b for b in (_expected(n, v) for n, v in headers) if b is not None]
    budget = min([30.0, *budgets])
    assert abs((request.deadline_at - request.arrival) - budget) < 1e-6
    assert request.arrival >= before
    request.end("GET", "/")


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.binary(max_size=12)), max_size=6))
def test_garbage_never_moves_a_deadline(headers: list[tuple[bytes, bytes]]) -> None:
    headers = [(n, v) for n, v in headers if _expected(n, v) is None]
    request = Request(CONFIG, "127.0.0.1", headers, False, None)
    assert abs((request.deadline_at - request.arrival) - 30.0) < 1e-6
    request.end("GET", "/")
