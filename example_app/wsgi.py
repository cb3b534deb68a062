"""The demo's endpoints as a Flask app under gunicorn: ``python -m example_app --wsgi``.

Try it::

    curl -m 0.5 localhost:8000/report?seconds=10   # the log: 499, and "report: stopped"
    curl -i -H 'x-request-timeout-ms: 500' localhost:8000/slow   # 504 after 0.5 s
    curl -H 'Authorization: Bearer s3cret' localhost:8000/values

The report query is SQLite (embedded) or PostgreSQL with ``DATABASE_URL``
(psycopg 3); either way it stops in the database when the client leaves.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

from flask import Flask, g, jsonify, request

import ctxmiddleware
from ctxmiddleware import AUTH_TOKEN, CLIENT_IP, REQUEST_ID, ContextError, cause
from ctxmiddleware.flask import ContextExtension

log = logging.getLogger("example_app")

app = Flask(__name__)
app.config["CTXMIDDLEWARE_TIMEOUT"] = float(os.environ.get("REQUEST_TIMEOUT", "30"))
app.config["CTXMIDDLEWARE_TRUSTED_PROXIES"] = [
    p for p in os.environ.get("TRUSTED_PROXIES", "").split(",") if p
]
ContextExtension(app)

_SQLITE_SLOW = """
WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < ?)
SELECT count(*) FROM r
"""


@app.get("/slow")
def slow() -> Any:
    """Works for ``seconds`` (default 10) in 0.1 s steps, until the context is done."""
    ctx = g.ctx
    seconds = float(request.args.get("seconds", "10"))
    log.info("slow: working for %.1f s (deadline in %.1f s)", seconds, ctx.remaining() or -1)
    for _ in range(int(seconds * 10)):
        if ctx.done().wait(0.1):
            log.warning("slow: stopped: err=%r cause=%r", ctx.err(), cause(ctx))
            ctx.check()
    return f"worked {seconds} s\n"


@app.get("/report")
def report() -> Any:
    """A slow SQL query, stopped in the database when the request ends early."""
    seconds = float(request.args.get("seconds", "5"))
    url = os.environ.get("DATABASE_URL", "")
    try:
        if url.startswith(("postgres://", "postgresql://")):
            import psycopg

            with (
                psycopg.connect(url, autocommit=True) as conn,
                ctxmiddleware.psycopg_transaction_sync(conn) as tx,
            ):
                tx.execute("SELECT pg_sleep(%s)", [seconds])
        else:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            try:
                with ctxmiddleware.sqlite_interruptible(conn):
                    conn.execute(_SQLITE_SLOW, [int(seconds * 2_000_000)]).fetchall()
            finally:
                conn.close()
    except ContextError:
        log.warning("report: stopped in the database: cause=%r", cause(g.ctx))
        raise
    return f"report done ({seconds} s)\n"


@app.get("/values")
def values() -> Any:
    ctx = g.ctx
    return jsonify(
        request_id=ctx.value(REQUEST_ID),
        client_ip=ctx.value(CLIENT_IP),
        auth_token=str(ctx.value(AUTH_TOKEN)),
        context=str(ctx),
    )


@app.get("/healthz")
def healthz() -> Any:
    return "ok\n"


def serve(host: str, port: int) -> None:
    """gunicorn, gthread worker (a thread per request, one watcher thread)."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in {
                "bind": f"{host}:{port}", "workers": 1, "worker_class": "gthread",
                "threads": 8, "loglevel": "warning",
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return app

    Server().run()
