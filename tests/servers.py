"""Run an ASGI app under a real server (uvicorn h11/httptools, hypercorn) on 127.0.0.1.

The suite serves apps through the users' test kit, ``ctxmiddleware.testing``
(``serve_app``: a background thread with its own event loop), so the kit is
tested by every test that starts a server. Tests talk to the server over real
sockets while sharing in-process events with the app (use ``threading.Event``
or the kit's ``Probe``, never asyncio objects across the two loops).
"""

from __future__ import annotations

import contextlib
import socket

from ctxmiddleware.testing import SERVERS, RunningApp, serve_app

__all__ = ["SERVERS", "RunningServer", "free_port", "raw_request", "read_response", "serve"]

RunningServer = RunningApp
"""A served app: ``server`` (its kind), ``host``, ``port``, ``url``, ``connect()``."""

serve = serve_app
"""``serve(app, server="uvicorn-h11", **server_options)``: serve until the block exits."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers started in a subprocess)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_request(
    method: str,
    path: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request as bytes (Host and Content-Length added)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in items]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the server closes the connection or ``timeout`` passes."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)
