"""Request-scoped values the middleware binds into every request's context."""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence

from .._core._context import Key

__all__ = [
    "AUTH_TOKEN",
    "CLIENT_IP",
    "REQUEST_ID",
    "ClientDisconnected",
    "Secret",
]


class Secret:
    """A credential that never shows itself in ``str()``, ``repr()`` or logs.

    ``reveal()`` returns the raw value; comparisons run in constant time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
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


def _refill_ids() -> None:
    # One system call and a few C-level passes per 256 ids.
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


def parse_timeout_ms(raw: bytes) -> int | None:
    """A remaining budget in ms: 1 to 10 ASCII digits, else None (ignored)."""
    if 0 < len(raw) <= 10 and raw.isdigit():
        return int(raw)
    return None


def bearer_token(raw: bytes) -> Secret | None:
    """The credential of ``Authorization: Bearer <token>``, else None."""
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip(b" \t")
    if not token or len(token) > 8192:
        return None
    try:
        return Secret(token.decode("ascii"))
    except UnicodeDecodeError:
        return None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IPs and CIDRs ("10.0.0.0/8", "127.0.0.1", "::1") as networks; ValueError if invalid."""
    if isinstance(items, str):
        items = [items]
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


def parse_ip(text: str) -> IPAddress | None:
    """An address from a forwarding header hop: plain, ``[v6]:port``, ``v4:port``, quoted."""
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
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
