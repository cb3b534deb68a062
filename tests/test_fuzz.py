"""Hypothesis fuzzers (issue 13): every header parser, the middleware end to end
in process, and the public functions' arguments.

The properties, for any input:

* no unexpected exception (the parsers return a clean value or None; the
  public functions raise only TypeError or ValueError);
* no believed spoof: CLIENT_IP is the socket peer, or an address that trusted
  proxies vouch for hop by hop from the right, always in canonical form;
* no extended deadline: the request's remaining time never exceeds
  min(timeout, smallest valid budget header);
* no raw bad id echoed: the response's x-request-id is always sane;
* no token in logs, ``str()`` or ``repr()``.

Each fuzzer is bounded (``max_examples`` ~200, no per-example deadline): the
module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxmiddleware
from ctxmiddleware import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    ContextMiddleware,
    Key,
    Secret,
    after_func,
    background,
    cause,
    with_cancel,
    with_deadline,
    with_deadline_cause,
    with_timeout,
    with_timeout_cause,
    with_value,
)
from ctxmiddleware._core import parse_budget_ms
from ctxmiddleware._request import escape_for_log, sane_request_id
from ctxmiddleware._request._headers import (
    bearer_token,
    forwarded_for_hops,
    parse_ip,
    parse_networks,
    resolve_client_ip,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.0/8", "::1", "fd00::/8"])

bg = background()


def _trusted(addr: object) -> bool:
    return isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and any(
        addr in net for net in TRUSTED
    )


def _canonical(text: str) -> bool:
    """A plain IP address written the way ``ipaddress`` writes it."""
    if "%" in text:
        return False
    try:
        return str(ipaddress.ip_address(text)) == text
    except ValueError:
        return False


def _one_line(text: str) -> bool:
    return len(text.splitlines()) <= 1 and not any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in text
    )


# -- strategies ------------------------------------------------------------------------

trusted_v4 = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)))
loopback = st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "fd00::1", "fd12:3456::7"])
any_ip = st.ip_addresses().map(str)
ip_text = st.one_of(trusted_v4, loopback, any_ip)


@st.composite
def hop(draw: st.DrawFn) -> str:
    """One forwarding hop: an address, decorated the ways proxies (and attackers) write them."""
    addr = draw(ip_text)
    form = draw(st.integers(0, 9))
    if form == 0:
        return f"{addr}:{draw(st.integers(0, 70000))}" if ":" not in addr else f"[{addr}]:443"
    if form == 1:
        return f"{addr}%{draw(st.text(max_size=8))}"  # zone id: free text
    if form == 2:
        return f'"{addr}"'
    if form == 3:
        return f" {addr} "
    if form == 4:
        return f"[{addr}]"
    if form == 5:
        return draw(st.text(max_size=20))
    if form == 6:
        return f"::ffff:{addr}" if ":" not in addr else addr
    return addr


header_bytes = st.binary(max_size=64)
latin_text = st.text(st.characters(max_codepoint=255), max_size=64)


# -- the header parsers --------------------------------------------------------------


@FUZZ
@given(st.one_of(header_bytes, latin_text.map(lambda t: t.encode("latin-1"))))
def test_sane_request_id(raw: bytes) -> None:
    result = sane_request_id(raw)
    if result is not None:
        assert result == raw
        assert SANE_ID.fullmatch(result.decode("ascii"))
    else:
        assert not SANE_ID.fullmatch(raw.decode("latin-1"))


@st.composite
def authorization(draw: st.DrawFn) -> bytes:
    scheme = draw(st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b"", b"Bearer\t"]))
    sep = draw(st.sampled_from([b" ", b"  ", b"\t", b""]))
    token = draw(st.one_of(header_bytes, st.text(max_size=40).map(lambda t: t.encode("utf-8"))))
    return scheme + sep + token


@FUZZ
@given(authorization())
def test_bearer_token(raw: bytes) -> None:
    token = bearer_token(raw)
    if token is None:
        return
    assert isinstance(token, Secret)
    text = token.reveal()
    assert text and text.isascii() and text.isprintable()
    assert text == text.strip(" \t") and len(text) <= 8192
    assert text.encode("ascii") in raw
    assert raw[:6].lower() == b"bearer"
    for shown in (str(token), repr(token), f"{token}", f"{token!r}"):
        assert text not in shown or text in "Secret('**********')"


@FUZZ
@given(st.one_of(hop(), st.text(max_size=40)))
def test_parse_ip(text: str) -> None:
    addr = parse_ip(text)
    if addr is None:
        return
    assert isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address))
    assert _canonical(str(addr))
    # An IPv4-mapped IPv6 address is the IPv4 address it carries.
    assert not (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None)


@st.composite
def forwarding(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    rfc7239 = draw(st.booleans())
    values = []
    for _ in range(draw(st.integers(0, 3))):
        hops = draw(st.lists(hop(), max_size=5))
        if rfc7239:
            forms = st.sampled_from(["for={}", "For={};proto=https", "by=x;for={}", "{}"])
            parts = [draw(forms).format(h) for h in hops]
        else:
            parts = hops
        value = ",".join(parts)
        utf8 = draw(st.booleans())
        values.append(value.encode("utf-8") if utf8 else value.encode("latin-1", "replace"))
    if draw(st.booleans()):
        values.append(draw(header_bytes))
    return values, rfc7239


@FUZZ
@given(forwarding(), st.one_of(ip_text, st.text(max_size=10), st.none()))
def test_forwarding_chain_never_believes_a_spoof(
    fwd: tuple[list[bytes], bool], peer: str | None
) -> None:
    raw, rfc7239 = fwd
    hops = forwarded_for_hops(raw, rfc7239)
    assert all(isinstance(h, str) for h in hops)
    client = resolve_client_ip(peer, hops, TRUSTED)
    _check_client_ip(client, peer, hops)


def _check_client_ip(client: str | None, peer: str | None, hops: list[str]) -> None:
    """``client`` is the peer, or a hop vouched for by trusted reporters from the right."""
    if client == peer:
        return
    assert client is not None and peer is not None
    assert _canonical(client), client
    assert _trusted(parse_ip(peer)), (peer, client)
    # Some hop parses to client, and every hop to its right is a trusted proxy.
    for i in range(len(hops) - 1, -1, -1):
        addr = parse_ip(hops[i])
        if addr is None:
            break
        if str(addr) == client:
            return
        if not _trusted(addr):
            break
    raise AssertionError(f"client {client!r} not vouched for: peer {peer!r}, hops {hops!r}")


@FUZZ
@given(st.one_of(st.text(), st.binary().map(repr), st.integers(), st.floats(), st.none()))
def test_escape_for_log(value: object) -> None:
    out = escape_for_log(value)
    assert isinstance(out, str)
    assert _one_line(out)
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        assert out == text


@FUZZ
@given(st.one_of(st.none(), header_bytes, st.text(max_size=16), st.from_regex(r"\A[0-9]{1,12}\Z")))
def test_parse_budget_ms(raw: bytes | str | None) -> None:
    ms = parse_budget_ms(raw)
    if ms is None:
        return
    assert isinstance(ms, int) and 0 <= ms <= 9_999_999_999
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    assert isinstance(text, str) and 1 <= len(text) <= 10
    assert text.isascii() and text.isdigit() and int(text) == ms


# -- the middleware, end to end, in process --------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            self.lines.append(repr(record.exc_info[1]))


@pytest.fixture(scope="module")
def records() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("ctxmiddleware")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# A token with characters no request id may hold, so it cannot be echoed legitimately.
tokens = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=4, max_size=24
).map(lambda t: "Zq/" + t)


@st.composite
def request_headers(draw: st.DrawFn) -> dict[str, Any]:
    headers: list[tuple[bytes, bytes]] = []
    token = draw(st.one_of(st.none(), tokens))
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode("ascii")))
    for _ in range(draw(st.integers(0, 2))):
        headers.append((b"x-request-id", draw(st.one_of(
            header_bytes, st.from_regex(rb"\A[A-Za-z0-9._:-]{1,130}\Z")
        ))))
    budgets = draw(st.lists(st.one_of(
        header_bytes, st.integers(0, 10**11).map(lambda n: str(n).encode()),
    ), max_size=2))
    headers += [(b"x-request-timeout-ms", b) for b in budgets]
    fwd, rfc7239 = draw(forwarding())
    name = b"forwarded" if rfc7239 else b"x-forwarded-for"
    headers += [(name, v) for v in fwd]
    for _ in range(draw(st.integers(0, 2))):
        headers.append((draw(st.sampled_from(
            [b"content-length", b"transfer-encoding", b"x-junk", b"authorization", b"host"]
        )), draw(header_bytes)))
    headers = draw(st.permutations(headers))
    peer = draw(st.one_of(loopback, trusted_v4, any_ip))
    return {
        "headers": headers,
        "token": token,
        "budgets": budgets,
        "rfc7239": rfc7239,
        "peer": peer,
        "timeout": draw(st.sampled_from([None, 0.5, 30.0])),
    }


async def _serve_once(app: Any, headers: list[tuple[bytes, bytes]], peer: str) -> list[Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/fuzz",
        "raw_path": b"/fuzz",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": (peer, 40000),
        "server": ("testserver", 80),
    }
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    finished = asyncio.Event()

    async def receive() -> Any:
        if messages:
            return messages.pop(0)
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    return sent


@FUZZ
@given(request_headers())
def test_middleware_end_to_end(records: _Records, req: dict[str, Any]) -> None:
    seen: dict[str, Any] = {}
    app_log = logging.getLogger("ctxmiddleware.fuzzapp")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ctx = ctxmiddleware.current()
        seen["remaining"] = ctx.remaining()
        seen["request_id"] = ctx.value(REQUEST_ID)
        seen["client_ip"] = ctx.value(CLIENT_IP)
        token = ctx.value(AUTH_TOKEN)
        seen["token"] = token
        seen["shown"] = [str(ctx), repr(ctx), str(token), repr(token), f"{token}"]
        app_log.info("handling %s %r token=%s", ctx, ctx, token)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = ContextMiddleware(
        app,
        timeout=req["timeout"],
        trusted_proxies=[str(n) for n in TRUSTED],
        forwarded_header="forwarded" if req["rfc7239"] else "x-forwarded-for",
    )
    records.lines.clear()
    t0 = time.monotonic()
    sent = asyncio.run(_serve_once(mw, req["headers"], req["peer"]))
    elapsed = time.monotonic() - t0

    # A response, with exactly one sane x-request-id.
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    assert starts[0]["status"] in (200, 504), starts[0]
    ids = [v for k, v in starts[0].get("headers", []) if k.lower() == b"x-request-id"]
    assert len(ids) == 1, starts[0]
    assert SANE_ID.fullmatch(ids[0].decode("latin-1")), ids
    sent_ids = [v for k, v in req["headers"] if k == b"x-request-id"]
    if sent_ids and sane_request_id(sent_ids[0]) is not None:
        assert ids[0] == sent_ids[0]  # the caller's id, when it is sane
    else:
        assert re.fullmatch(rb"[0-9a-f]{32}", ids[0]), ids

    # The deadline: never later than the timeout or the smallest valid budget.
    valid = [ms for ms in (parse_budget_ms(b) for b in req["budgets"]) if ms is not None]
    limit = math.inf if req["timeout"] is None else req["timeout"]
    if valid:
        limit = min(limit, min(valid) / 1000.0)
    if limit == 0:
        assert starts[0]["status"] == 504 and not seen  # spent on arrival: app not run
    if seen:
        remaining = seen["remaining"]
        if limit == math.inf:
            assert remaining is None
        else:
            assert remaining is not None and remaining <= limit + 1e-6, (remaining, limit)
        assert seen["request_id"] == ids[0].decode("ascii")
        # Client IP: the peer, or vouched for by trusted proxies; canonical.
        fwd_name = b"forwarded" if req["rfc7239"] else b"x-forwarded-for"
        hops = forwarded_for_hops([v for k, v in req["headers"] if k == fwd_name], req["rfc7239"])
        client = seen["client_ip"]
        assert client == req["peer"] or _canonical(client)
        _check_client_ip(client, req["peer"], hops)
    del elapsed

    # The token: known to the handler, shown nowhere.
    token = req["token"]
    if token is not None:
        auth = [v for k, v in req["headers"] if k == b"authorization"]
        if seen and auth and auth[-1] == b"Bearer " + token.encode():  # (the last one counts)
            assert isinstance(seen["token"], Secret) and seen["token"].reveal() == token
        for text in [*seen.get("shown", []), *records.lines]:
            assert token not in text
    for line in records.lines:
        if not line.startswith("handling"):
            assert _one_line(line), line


# -- public functions' arguments ---------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**500),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.timedeltas(),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.just(object()),
    st.just(bg),
    st.just(Key("k")),
    st.just(print),
)
OK_ERRORS = (TypeError, ValueError)


def _only_clear_errors(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OK_ERRORS:
        return None


def _release(result: Any) -> None:
    if isinstance(result, tuple) and len(result) == 2:
        ctx, cancel = result
        assert isinstance(ctx, ctxmiddleware.Context)
        cancel()
        str(ctx), repr(ctx), ctx.err(), ctx.deadline(), ctx.remaining()
        assert ctx.err() is not None


@FUZZ
@given(junk, junk)
def test_timeouts_and_deadlines_take_junk(timeout: Any, parent: Any) -> None:
    parents = [bg, with_cancel(bg)[0], parent]
    for p in parents:
        for fn, args in (
            (with_timeout, (p, timeout)),
            (with_timeout_cause, (p, timeout, RuntimeError("why"))),
            (with_deadline, (p, timeout)),
            (with_deadline_cause, (p, timeout, None)),
        ):
            result = _only_clear_errors(fn, *args)
            _release(result)
            if result is not None and isinstance(result[0].deadline(), float):
                deadline = result[0].deadline()
                assert deadline == deadline  # never NaN


@FUZZ
@given(junk, junk, junk)
def test_values_keys_after_func_cause_take_junk(key: Any, value: Any, fn: Any) -> None:
    ctx, cancel = with_cancel(bg)
    k = _only_clear_errors(Key, key)
    if k is not None:
        repr(k)
        child = with_value(ctx, k, value)
        assert child.value(k) is value
        str(child), repr(child)
    child = _only_clear_errors(with_value, ctx, key, value)
    if child is not None:
        str(child), repr(child)
        child.value(key)
    _only_clear_errors(with_value, key, Key("k"), value)
    stop = _only_clear_errors(after_func, ctx, fn if fn is not print else (lambda: None))
    if stop is not None:
        stop()
    _only_clear_errors(after_func, key, lambda: None)
    _only_clear_errors(cause, key)
    cancel()
    # On a done context wait() returns at once for any accepted timeout.
    result = _only_clear_errors(ctx.done().wait, value)
    assert result in (True, None)
