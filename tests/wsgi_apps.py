"""WSGI test apps, importable by servers in other processes (gunicorn, uWSGI).

The app reports what happened through files in ``$CTXTEST_EVENTS`` (one file
per event, written atomically), so a test can wait for an event whatever
process or thread the app runs in: :func:`wait_event`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import ctxmiddleware
from ctxmiddleware import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    ContextError,
    Key,
    Secret,
    WSGIContextMiddleware,
    cause,
    current,
)

EVENTS = os.environ.setdefault("CTXTEST_EVENTS", tempfile.mkdtemp(prefix="ctxtest-events-"))
PG_DSN = os.environ.get("CTXTEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")
MY_KEY: Key[str] = Key("my_key")


def record(tag: str, name: str, **data: Any) -> None:
    path = os.path.join(EVENTS, f"{tag}.{name}")
    tmp = path + f".tmp{threading.get_ident()}"
    data.setdefault("t", time.monotonic())  # (CLOCK_MONOTONIC: one clock for all processes)
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def wait_event(tag: str, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait for the app's event ``name`` of request ``tag`` (TimeoutError if it never comes)."""
    path = os.path.join(EVENTS, f"{tag}.{name}")
    end = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                return dict(json.load(f))
        except FileNotFoundError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"no event {name!r} for {tag}")
        time.sleep(0.002)


def has_event(tag: str, name: str) -> bool:
    return os.path.exists(os.path.join(EVENTS, f"{tag}.{name}"))


def describe(ctx: Any) -> dict[str, Any]:
    secret = ctx.value(AUTH_TOKEN)
    return {
        "request_id": ctx.value(REQUEST_ID),
        "client_ip": ctx.value(CLIENT_IP),
        "token": secret.reveal() if isinstance(secret, Secret) else None,
        "token_type": type(secret).__name__,
        "renderings": [str(ctx), repr(ctx), str(secret), repr(secret)],
        "my_key": ctx.value(MY_KEY),
        "is_current": current() is ctx,
        "remaining": ctx.remaining(),
    }


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def state() -> dict[str, Any]:
    import gc

    from ctxmiddleware._wsgi import WsgiRequest, watcher

    gc.collect()

    names = [t.name for t in threading.enumerate()]
    return {
        "pid": os.getpid(),
        "watchers": names.count("ctxmiddleware-wsgi-watcher"),
        "threads": len(names),
        "thread_names": names,
        "fds": fd_count(),
        "watching": watcher().watching(),
        "live_requests": sum(1 for o in gc.get_objects() if isinstance(o, WsgiRequest)),
    }


def _json(start_response: Any, data: Any, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _text(start_response: Any, text: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]


def _slow_sqlite(conn: sqlite3.Connection) -> None:
    conn.execute(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
        "SELECT count(*) FROM c"
    ).fetchall()


def inner_app(environ: dict[str, Any], start_response: Any) -> Any:
    """The app behind every middleware: dispatch on the last path segment."""
    ctx = current()
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    tag = query.get("tag", "-")
    action = environ["PATH_INFO"].rsplit("/", 1)[-1]
    if action == "info":
        data = describe(ctx)
        data["environ_ctx"] = environ.get("ctxmiddleware.context") is ctx
        return _json(start_response, data)
    if action == "state":
        return _json(start_response, state())
    if action == "slow":
        record(tag, "started", pid=os.getpid())
        done = ctx.done().wait(float(query.get("seconds", 5)))
        record(tag, "done", done=done, cause=repr(cause(ctx)), err=repr(ctx.err()))
        if done:
            ctx.check()
        return _text(start_response, b"too late")
    if action == "route":
        ctxmiddleware.set_request_timeout(float(query.get("timeout", 0.1)))
        ctx.done().wait(5)
        ctx.check()
        return _text(start_response, b"too late")
    if action == "boom":
        raise RuntimeError("boom")
    if action == "ok":
        return _text(start_response, b"ok")
    if action == "echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        return _json(start_response, {"len": len(body), "sha": hashlib.sha256(body).hexdigest()})
    if action == "echo_chunks":  # reads in small pieces
        h = hashlib.sha256()
        n = 0
        length = int(environ.get("CONTENT_LENGTH") or 0)
        stream = environ["wsgi.input"]
        while n < length:
            piece = stream.read(min(8192, length - n))
            if not piece:
                break
            h.update(piece)
            n += len(piece)
        return _json(start_response, {"len": n, "sha": h.hexdigest()})
    if action == "pg":
        import psycopg

        record(tag, "started", pid=os.getpid())
        try:
            with (
                psycopg.connect(PG_DSN, application_name=tag, autocommit=True) as conn,
                ctxmiddleware.psycopg_transaction_sync(conn) as c,
            ):
                c.execute("SELECT pg_sleep(30)")
            record(tag, "done", result="finished")
        except ContextError as exc:
            record(tag, "done", result=type(exc).__name__, cause=repr(cause(ctx)))
            raise
        return _text(start_response, b"too late")
    if action == "sqlite":
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        record(tag, "started", pid=os.getpid())
        try:
            with ctxmiddleware.sqlite_interruptible(conn):
                _slow_sqlite(conn)
            record(tag, "done", result="finished")
        except ContextError as exc:
            record(tag, "done", result=type(exc).__name__, cause=repr(cause(ctx)))
            raise
        finally:
            conn.close()
        return _text(start_response, b"too late")
    if action == "stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream(ctx, tag, int(query.get("chunks", 1000)))
    if action == "stream_ctxerr":  # a generator that raises ctx.err() at its first chunk
        start_response("200 OK", [("Content-Type", "text/plain")])

        def gen() -> Iterator[bytes]:
            ctx.done().wait(5)
            ctx.check()
            yield b"too late"

        return gen()
    if action == "threads":  # contextvars.copy_context() carries the context
        import contextvars

        seen: list[Any] = []
        cv = contextvars.copy_context()
        t = threading.Thread(target=cv.run, args=(lambda: seen.append(current() is ctx),))
        t.start()
        t.join()
        return _json(start_response, {"same": seen == [True]})
    return _text(start_response, b"not found", "404 Not Found")


def _stream(ctx: Any, tag: str, chunks: int) -> Iterator[bytes]:
    record(tag, "started", pid=os.getpid())
    try:
        for i in range(chunks):
            yield b"chunk %d\n" % i
            time.sleep(0.005)  # not watching ctx: the middleware must close us
        record(tag, "finished")
    finally:
        record(tag, "closed", cause=repr(cause(ctx)), is_current=current() is ctx)


def _values(environ: dict[str, Any]) -> list[tuple[Key[Any], object]]:
    return [(MY_KEY, environ["PATH_INFO"])]


# One middleware per configuration of the shared values table (see
# tests/test_wsgi_values.py), dispatched on the first path segment.
CONFIGS: dict[str, dict[str, Any]] = {
    "m": {"timeout": 5, "values": _values},
    "c": {"timeout": 5, "request_id_header": "X-Correlation-ID"},
    "p": {"timeout": 5, "trusted_proxies": ["127.0.0.1"]},
    "u": {"timeout": 5, "trusted_proxies": ["10.0.0.0/8"]},
    "ch": {"timeout": 5, "trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]},
    "f": {"timeout": 5, "trusted_proxies": ["127.0.0.1"], "forwarded_header": "forwarded"},
    "t": {"timeout": 0.3},
}

_WSGI_APPS = {name: WSGIContextMiddleware(inner_app, **opts) for name, opts in CONFIGS.items()}


def app(environ: dict[str, Any], start_response: Any) -> Any:
    """The WSGI app every server serves."""
    prefix = environ["PATH_INFO"].split("/", 2)[1]
    target = _WSGI_APPS.get(prefix)
    if target is None:
        return inner_app(environ, start_response)
    return target(environ, start_response)


# -- the same app over ASGI (for the shared values table) --------------------


async def inner_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    ctx = current()
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    action = scope["path"].rsplit("/", 1)[-1]
    status, body = 200, b"not found"
    if action == "info":
        body = json.dumps(describe(ctx)).encode()
    elif action == "slow":
        with contextlib.suppress(TimeoutError):
            import asyncio

            await asyncio.wait_for(ctx.done(), float(query.get("seconds", 5)))
        ctx.check()
        body = b"too late"
    elif action == "route":
        import asyncio

        ctxmiddleware.set_request_timeout(float(query.get("timeout", 0.1)))
        await asyncio.wait_for(ctx.done(), 5)
        ctx.check()
        body = b"too late"
    elif action == "boom":
        raise RuntimeError("boom")
    elif action == "ok":
        body = b"ok"
    else:
        status = 404
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _asgi_values(scope: dict[str, Any]) -> list[tuple[Key[Any], object]]:
    return [(MY_KEY, scope["path"])]


def make_asgi_app() -> Any:
    apps = {}
    for name, opts in CONFIGS.items():
        opts = dict(opts)
        if "values" in opts:
            opts["values"] = _asgi_values
        apps[name] = ctxmiddleware.ContextMiddleware(inner_asgi, **opts)

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await apps[scope["path"].split("/", 2)[1]](scope, receive, send)

    return asgi_app
