"""What the middleware reads from a WSGI environ: our headers, the client socket."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from .._request import RequestConfig

__all__ = ["EnvironHeaders", "client_probe"]

Environ = MutableMapping[str, Any]


class EnvironHeaders:
    """The environ keys of the headers the request layer reads, for one config.

    WSGI servers turn ``X-Request-Id`` into ``HTTP_X_REQUEST_ID`` (and
    ``Content-Length`` into ``CONTENT_LENGTH``) and join repeated headers with
    commas: :meth:`pairs` gives the request layer back (lower-case name, value)
    pairs, one per comma-separated element, so a repeated header means what it
    means under ASGI (first request id, smallest budget, every forwarding hop).
    """

    __slots__ = ("keys", "names", "rid_name")

    def __init__(self, config: RequestConfig) -> None:
        keys = []
        for name in config.header_roles:
            text = name.decode("latin-1").upper().replace("-", "_")
            if text not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                text = "HTTP_" + text
            keys.append((text, name))
        self.keys: tuple[tuple[str, bytes], ...] = tuple(keys)
        #: The environ keys: most requests carry none of our headers, which
        #: ``names.isdisjoint(environ)`` tells in C (WsgiRequest tests it).
        self.names = frozenset(key for key, _ in keys)
        #: The request id's response header (lower case), as WSGI wants it: a str.
        self.rid_name = config.request_id_header.decode("latin-1")

    def pairs(self, environ: Environ) -> list[tuple[bytes, bytes]]:
        pairs: list[tuple[bytes, bytes]] = []
        get = environ.get
        for key, name in self.keys:
            value = get(key)
            if not value:  # absent, or "" (werkzeug's CONTENT_LENGTH without a body)
                continue
            raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
            if b"," in raw:
                pairs.extend((name, part.strip(b" \t")) for part in raw.split(b","))
            else:
                pairs.append((name, raw))
        return pairs


def client_probe(environ: Environ) -> tuple[int, Callable[[], bool] | None]:
    """How to learn that the client left: ``(fd, None)`` for a client socket to
    watch (gunicorn, werkzeug, uWSGI), ``(-1, callable)`` for waitress's
    ``client_disconnected()``, ``(-1, None)`` when the server tells nothing."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is not None:
        try:
            return int(sock.fileno()), None
        except (OSError, ValueError, AttributeError):
            return -1, None
    probe = environ.get("waitress.client_disconnected")
    if probe is not None and callable(probe):
        return -1, probe
    if "uwsgi.version" in environ:
        try:
            import importlib

            uwsgi = importlib.import_module("uwsgi")  # (only inside a uWSGI worker)
            return int(uwsgi.connection_fd()), None
        except Exception:  # not inside a uWSGI worker after all
            return -1, None
    return -1, None
