"""Reading the request headers the middleware cares about, safely.

Every parser here takes bytes from the network and returns either a clean
value or ``None``: garbage is ignored, never guessed at, and never echoed.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
from collections.abc import Iterable, Sequence

from .._core import Secret

__all__ = [
    "ID_POOL",
    "MAX_REQUEST_ID",
    "IPNetwork",
    "bearer_token",
    "escape_for_log",
    "forwarded_for_hops",
    "new_request_id",
    "parse_ip",
    "parse_networks",
    "resolve_client_ip",
    "sane_request_id",
]

_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_REQUEST_ID = 128


def sane_request_id(raw: bytes) -> bytes | None:
    """``raw`` if it is 1-128 bytes of ``[A-Za-z0-9._:-]``, else None."""
    if 0 < len(raw) <= MAX_REQUEST_ID and _ID_CHARS.issuperset(raw):
        return raw
    return None


# Byte maps that set a uuid4's version (0100xxxx) and variant (10xxxxxx) bits.
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC4122 = bytes((b & 0x3F) | 0x80 for b in range(256))
_ids: list[bytes] = []
ID_POOL = _ids
"""Ids ready to hand out: ``ID_POOL.pop() if ID_POOL else new_request_id()``
saves a call per request (bench/RESULTS.md, "request id pool")."""


def _refill_ids() -> None:
    # One system call and a few C-level passes per 256 ids (bench/RESULTS.md:
    # "request id pool" row: uuid.uuid4().hex per request costs 3x more).
    block = bytearray(os.urandom(4096))
    block[6::16] = block[6::16].translate(_VERSION_4)
    block[8::16] = block[8::16].translate(_VARIANT_RFC4122)
    _ids.extend(binascii.hexlify(block, b" ", -16).split())


def new_request_id() -> bytes:
    """A random uuid4 as 32 hex digits, in ASCII (``os.urandom`` randomness, like
    ``uuid.uuid4()``). Bytes: the response header wants bytes, and most
    requests never need the id as a str."""
    try:
        return _ids.pop()
    except IndexError:  # (also if another thread took the last one)
        _refill_ids()
        return _ids.pop()


def bearer_token(raw: bytes) -> Secret | None:
    """The credential of ``Authorization: Bearer <token>``, else None."""
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip(b" \t")
    if not token or len(token) > 8192:
        return None
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    return Secret(text)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IPs and CIDRs ("10.0.0.0/8", "127.0.0.1", "::1") as networks; ValueError if invalid."""
    if isinstance(items, str):
        items = [items]
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"trusted_proxies holds strings, not {type(item).__name__}")
        networks.append(ipaddress.ip_network(item.strip(), strict=False))
    return tuple(networks)


def parse_ip(text: str) -> IPAddress | None:
    """An address from a forwarding header hop: plain, ``[v6]:port``, ``v4:port``, quoted.

    IPv6 zone ids (``fe80::1%eth0``) are refused: a zone is free text chosen
    by whoever wrote the header, and an address must be an address.
    """
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    if "%" in text:
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def forwarded_for_hops(raw: Sequence[bytes], forwarded_rfc7239: bool) -> list[str]:
    """The hops of X-Forwarded-For (or the ``for=`` of RFC 7239 Forwarded), left to right."""
    hops: list[str] = []
    for value in raw:
        text = value.decode("latin-1")
        for element in text.split(","):
            if not forwarded_rfc7239:
                hops.append(element)
                continue
            found = ""
            for pair in element.split(";"):
                name, _, val = pair.partition("=")
                if name.strip().lower() == "for":
                    found = val
            hops.append(found)
    return hops


def resolve_client_ip(
    peer: str | None,
    hops: list[str],
    trusted: tuple[IPNetwork, ...],
) -> str | None:
    """Walk the forwarding chain from the right, through trusted proxies only.

    The socket peer is believed; each hop it (or a later trusted hop) reports is
    believed only while the reporter is in ``trusted``. A malformed hop ends the
    walk at the last believed address, so a client cannot spoof its address.
    The result is a canonical address string (or the peer as the server gave it).
    """
    if peer is None or not trusted or not hops:
        return peer
    addr = parse_ip(peer)
    client = peer
    for hop in reversed(hops):
        if addr is None or not any(addr in net for net in trusted):
            break
        addr = parse_ip(hop)
        if addr is None:
            break
        client = str(addr)
    return client


_LOG_ESCAPES = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_for_log(text: object) -> str:
    """``text`` with control characters written as ``\\xNN``: one log record is
    one line, whatever a client put in its request line (CWE-117)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return s.translate(_LOG_ESCAPES)
