"""Run an ASGI app under a real server (uvicorn h11/httptools, hypercorn) on 127.0.0.1.

The server runs in a background thread with its own event loop, so tests talk
to it over real sockets while still being able to share in-process events with
the app (use ``threading.Event`` or the helpers below, never asyncio objects
across the two loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SERVERS = ["uvicorn-h11", "uvicorn-httptools", "hypercorn"]


@dataclass
class RunningServer:
    kind: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        return sock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any, kind: str = "uvicorn-h11", **options: Any) -> Iterator[RunningServer]:
    """Serve ``app`` until the block exits. ``kind`` is one of :data:`SERVERS`."""
    port = _free_port()
    started = threading.Event()
    stop: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            if kind.startswith("uvicorn"):
                import uvicorn

                config = uvicorn.Config(
                    app,
                    host="127.0.0.1",
                    port=port,
                    http="h11" if kind == "uvicorn-h11" else "httptools",
                    loop="asyncio",
                    log_level="warning",
                    access_log=False,
                    # The middleware, not the server, decides whom to trust.
                    proxy_headers=False,
                    **{"lifespan": "off", **options},
                )
                server = uvicorn.Server(config)
                stop["fn"] = lambda: setattr(server, "should_exit", True)

                async def main() -> None:
                    task = asyncio.create_task(server.serve())
                    while not server.started:
                        if task.done():
                            await task
                            return
                        await asyncio.sleep(0.005)
                    started.set()
                    await task

                loop.run_until_complete(main())
            elif kind == "hypercorn":
                from hypercorn.asyncio import serve as hserve
                from hypercorn.config import Config

                config = Config()
                config.bind = [f"127.0.0.1:{port}"]
                config.loglevel = "WARNING"
                config.graceful_timeout = 0.5
                for key, value in options.items():
                    setattr(config, key, value)
                shutdown = asyncio.Event()
                stop["fn"] = lambda: loop.call_soon_threadsafe(shutdown.set)

                async def hmain() -> None:
                    task = asyncio.create_task(
                        hserve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
                    )
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        with contextlib.suppress(OSError), socket.create_connection(
                            ("127.0.0.1", port), timeout=0.2
                        ):
                            break
                        await asyncio.sleep(0.01)
                    started.set()
                    await task

                loop.run_until_complete(hmain())
            else:
                raise ValueError(kind)
        except BaseException as exc:  # surfaced to the test
            errors.append(exc)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"server-{kind}", daemon=True)
    thread.start()
    if not started.wait(15):
        raise RuntimeError(f"{kind} did not start")
    if errors:
        raise errors[0]
    try:
        yield RunningServer(kind, "127.0.0.1", port)
    finally:
        stop["fn"]()
        thread.join(10)
        if errors:
            raise errors[0]


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
