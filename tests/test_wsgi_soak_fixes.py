"""The WSGI defects the chaos soak (bench/chaos.py) found, on real servers over raw sockets.

1. A timeout answer after the app's ``start_response`` must replace the app's
   headers, never add to them (gunicorn appends the headers of a second
   ``start_response`` call): one header block, one Content-Length.
2. No ``WsgiRequest`` may outlive its request (mixed fates under gunicorn).
3. A client that resets the connection mid-upload is a disconnect (499), not
   an unhandled error with a traceback.

This module is also the app the servers run (``test_wsgi_soak_fixes:app``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from servers import RunningServer, raw_request, read_response
from wsgi_apps import EVENTS, record, state, wait_event
from wsgi_servers import WSGI_SERVERS, serve_wsgi

from ctxmiddleware import ContextError, WSGIContextMiddleware, current

pytestmark = pytest.mark.timeout(90)

APP = "test_wsgi_soak_fixes:app"
LOG = os.path.join(EVENTS, "soak-fixes.log")
_RID = re.compile(r"request_id=(\S+)")


# -- the app (runs in the server's process) --------------------------------------


class _FileLog(logging.Handler):
    """Every record of ours (and gunicorn's errors) as one JSON line in LOG."""

    def emit(self, rec: logging.LogRecord) -> None:
        message = rec.getMessage()
        found = _RID.search(message)
        line = json.dumps({
            "logger": rec.name,
            "level": rec.levelname,
            "message": message,
            "rid": found.group(1) if found else None,
            "traceback": rec.exc_info is not None,
        })
        with open(LOG, "a") as f:
            f.write(line + "\n")


def _install_log() -> None:
    handler = _FileLog(logging.INFO)
    ours = logging.getLogger("ctxmiddleware")
    if not any(isinstance(h, _FileLog) for h in ours.handlers):
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        gerr = logging.getLogger("gunicorn.error")
        gerr.addHandler(_FileLog(logging.ERROR))


_install_log()

BODY = b"too late body"  # 13 bytes: the timeout body is 15


def _start(start_response: Any, length: int = len(BODY)) -> Any:
    return start_response(
        "200 OK", [("Content-Type", "application/x-app"), ("Content-Length", str(length))]
    )


def inner(environ: dict[str, Any], start_response: Any) -> Any:
    ctx = current()
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    tag = query.get("tag", "-")
    action = environ["PATH_INFO"].rsplit("/", 1)[-1]
    if action == "late":  # headers, then the deadline passes before the body
        _start(start_response)
        time.sleep(float(query.get("sleep", 0.5)))
        return [BODY]
    if action == "raise":  # headers, then ctx.err() raised from the app's call
        _start(start_response)
        ctx.done().wait(5)
        ctx.check()
        return [BODY]
    if action == "gen":  # headers, then ctx.err() raised before the first chunk
        _start(start_response)

        def gen() -> Iterator[bytes]:
            ctx.done().wait(5)
            ctx.check()
            yield BODY

        return gen()
    if action == "handler500":  # a framework's error handler turning ctx.err() into a 500
        _start(start_response)
        try:
            ctx.done().wait(5)
            ctx.check()
        except ContextError:
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/html"), ("Content-Length", "5")],
                sys.exc_info(),
            )
            return [b"oops!"]
        return [BODY]
    if action == "ok":
        _start(start_response, 2)
        return [b"ok"]
    if action == "write":  # the write() callable
        write = _start(start_response, 2)
        write(b"o")
        return [b"k"]
    if action == "boom":
        raise RuntimeError("boom")
    if action == "slow":
        ctx.done().wait(float(query.get("seconds", 5)))
        ctx.check()
        _start(start_response, 2)
        return [b"ok"]
    if action == "stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks() -> Iterator[bytes]:
            for i in range(int(query.get("chunks", 50))):
                yield b"chunk %d\n" % i
                time.sleep(0.002)

        return chunks()
    if action == "upload":  # reads the body in pieces; no OSError handling
        digest = hashlib.sha256()
        stream = environ["wsgi.input"]
        left = int(environ.get("CONTENT_LENGTH") or 0)
        first = True
        while left > 0:
            chunk = stream.read(min(16384, left))
            if first:
                record(tag, "reading")
                first = False
            if not chunk:
                break
            left -= len(chunk)
            digest.update(chunk)
        body = digest.hexdigest().encode()
        _start(start_response, len(body))
        return [body]
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


_SHORT = WSGIContextMiddleware(inner, timeout=0.3)
_LONG = WSGIContextMiddleware(inner, timeout=10)


def _holders() -> list[str]:
    """Who holds each live WsgiRequest (gc.get_referrers, two levels)."""
    from ctxmiddleware._wsgi import WsgiRequest

    gc.collect()
    out = []
    for obj in gc.get_objects():
        if not isinstance(obj, WsgiRequest):
            continue
        names = []
        for r in gc.get_referrers(obj):
            if isinstance(r, list) and len(r) > 1000:
                continue
            desc = type(r).__name__
            if desc == "frame":
                desc += f"<{r.f_code.co_qualname}>"
            elif desc == "dict":
                desc += "<-" + ",".join(
                    type(g).__name__ for g in gc.get_referrers(r) if g is not r
                )[:200]
            names.append(desc)
        # A running frame's locals are no gc referrers: look at every thread's stack.
        threads = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            f: Any = frame
            while f is not None:
                if any(v is obj for v in f.f_locals.values()):
                    names.append(f"thread {threads.get(ident)} in {f.f_code.co_qualname}")
                f = f.f_back
        out.append(f"{obj.request_id}: {names}")
    return out


def app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/state":
        data = state()
        data["holders"] = _holders()
        body = json.dumps(data).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/t/"):
        return _SHORT(environ, start_response)
    return _LONG(environ, start_response)


# -- the client ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=WSGI_SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with serve_wsgi(request.param, APP) as running:
        yield running


def _send(server: RunningServer, path: str, headers: dict[str, str] | None = None,
          body: bytes = b"", method: str = "GET") -> bytes:
    with server.connect() as sock:
        sock.sendall(raw_request(method, path, {"Connection": "close", **(headers or {})}, body))
        return read_response(sock, 10)


def _header_lines(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        pairs.append((name.strip().lower(), value.strip()))
    return lines[0], pairs, body


def _log_lines(rid: str | None = None) -> list[dict[str, Any]]:
    try:
        with open(LOG) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [x for x in lines if rid is None or x["rid"] == rid]


def _server_state(server: RunningServer) -> dict[str, Any]:
    raw = _send(server, "/state")
    _, _, body = _header_lines(raw)
    return dict(json.loads(body))


# -- 1. one header block for a timeout answer after start_response ------------------


@pytest.mark.parametrize("action", ["late", "raise", "gen", "handler500"])
def test_timeout_after_start_response_sends_one_header_block(
    server: RunningServer, action: str
) -> None:
    rid = "hdr-" + uuid.uuid4().hex[:12]
    raw = _send(server, f"/t/{action}", {"x-request-id": rid})
    status_line, pairs, body = _header_lines(raw)
    names = [name for name, _ in pairs]
    assert status_line.split()[1] == "504", raw
    assert names.count("content-length") == 1, raw
    assert names.count("content-type") == 1, raw
    assert names.count("x-request-id") == 1, raw
    headers = dict(pairs)
    assert headers["content-length"] == "15", raw
    assert headers["content-type"] == "text/plain; charset=utf-8", raw
    assert headers["x-request-id"] == rid, raw
    assert body == b"Gateway Timeout", raw


@pytest.mark.parametrize("action", ["ok", "write"])
def test_deferred_start_response_still_serves(server: RunningServer, action: str) -> None:
    rid = "ok-" + uuid.uuid4().hex[:12]
    raw = _send(server, f"/w/{action}", {"x-request-id": rid})
    status_line, pairs, body = _header_lines(raw)
    names = [name for name, _ in pairs]
    assert status_line.split()[1] == "200", raw
    assert names.count("content-length") == 1, raw
    assert dict(pairs)["x-request-id"] == rid
    assert body == b"ok"


def test_head_and_empty_body(server: RunningServer) -> None:
    raw = _send(server, "/w/nothing")
    status_line, pairs, body = _header_lines(raw)
    assert status_line.split()[1] == "404", raw
    assert [n for n, _ in pairs].count("x-request-id") == 1
    assert body == b""


# -- 2. no WsgiRequest alive after mixed requests -----------------------------------


def _hang_up(server: RunningServer, path: str, after: float,
             headers: dict[str, str] | None = None, body: bytes = b"") -> None:
    sock = server.connect()
    try:
        sock.sendall(raw_request("POST" if body else "GET", path, headers, body))
        time.sleep(after)
    finally:
        sock.close()


def _mixed(server: RunningServer, rng: random.Random) -> None:
    fate = rng.choice(["ok", "boom", "stream", "budget", "hangup", "hangup_stream",
                       "upload", "timeout", "write"])
    if fate == "ok":
        _send(server, "/w/ok")
    elif fate == "write":
        _send(server, "/w/write")
    elif fate == "boom":
        _send(server, "/w/boom")
    elif fate == "stream":
        _send(server, "/w/stream?chunks=20")
    elif fate == "budget":
        _send(server, "/w/slow?seconds=1", {"x-request-timeout-ms": str(rng.randint(0, 40))})
    elif fate == "hangup":
        _hang_up(server, "/w/slow?seconds=2", rng.uniform(0.005, 0.05))
    elif fate == "hangup_stream":
        _hang_up(server, "/w/stream?chunks=200", rng.uniform(0.005, 0.05))
    elif fate == "upload":
        _send(server, "/w/upload", body=os.urandom(rng.choice([10, 70000, 200000])),
              method="POST")
    else:
        _send(server, f"/t/{rng.choice(['late', 'raise', 'gen'])}")


@pytest.mark.parametrize("kind", ["gunicorn-sync", "gunicorn-gthread"])
def test_no_request_alive_after_mixed_requests(kind: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with serve_wsgi(kind, APP) as running:
        for _ in range(80):
            _mixed(running, rng)
        # Twice: the last request may still be ending in the worker.
        end = time.monotonic() + 5
        while True:
            now = _server_state(running)
            if now["live_requests"] == 0 or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert now["live_requests"] == 0, (seed, now["holders"])


def test_no_request_alive_after_a_disconnect() -> None:
    """The watcher saw a client leave: nothing of that request stays alive."""
    with serve_wsgi("gunicorn-sync", APP) as running:
        _hang_up(running, "/w/slow?seconds=2", 0.05)
        time.sleep(0.3)
        now = _server_state(running)
        assert now["live_requests"] == 0, now["holders"]


# -- 3. a reset mid-upload is a disconnect ------------------------------------------


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


@pytest.mark.parametrize("kind", ["gunicorn-sync", "gunicorn-gthread"])
@pytest.mark.parametrize("size", [50_000, 1_000_000])
def test_reset_mid_upload_is_a_disconnect(kind: str, size: int) -> None:
    """Half the body, then RST: 499 logged with cause ClientDisconnected, no
    traceback (below EAGER_BODY_LIMIT the middleware reads the body ahead,
    above it the app reads)."""
    with serve_wsgi(kind, APP) as running:
        start = len(_log_lines())
        tag = uuid.uuid4().hex
        rid = "rst-" + tag[:12]
        sock = running.connect()
        head = raw_request("POST", f"/w/upload?tag={tag}", {"x-request-id": rid}, b"")
        head = head.replace(b"Content-Length: 0", f"Content-Length: {size}".encode())
        sock.sendall(head + os.urandom(size // 4))
        if size > 65536:
            wait_event(tag, "reading")
        else:
            time.sleep(0.2)  # the middleware is waiting for the rest of the body
        _reset(sock)
        end = time.monotonic() + 5
        ours: list[dict[str, Any]] = []
        while time.monotonic() < end:
            ours = _log_lines(rid)
            if ours:
                break
            time.sleep(0.02)
        time.sleep(0.3)  # anything else it logs
        lines = _log_lines()[start:]
        assert [x for x in lines if x["traceback"] or x["level"] == "ERROR"] == [], lines
        ours = [x for x in lines if x["rid"] == rid]
        assert len(ours) == 1, lines
        assert "499 client disconnected" in ours[0]["message"]
        assert _server_state(running)["live_requests"] == 0
