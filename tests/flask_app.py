"""A Flask app with ctxmiddleware.flask, for tests/test_wsgi_flask.py (served by gunicorn)."""

from __future__ import annotations

import os

from flask import Flask, g, jsonify, request
from wsgi_apps import PG_DSN, record

import ctxmiddleware
from ctxmiddleware import REQUEST_ID, cause, current
from ctxmiddleware.flask import ContextExtension

app = Flask(__name__)
app.config["CTXMIDDLEWARE_TIMEOUT"] = 5
app.config["CTXMIDDLEWARE_TRUSTED_PROXIES"] = ["127.0.0.1"]
ContextExtension(app)


@app.get("/info")
def info():  # type: ignore[no-untyped-def]
    ctx = g.ctx
    return jsonify(
        request_id=ctx.value(REQUEST_ID),
        client_ip=ctx.value(ctxmiddleware.CLIENT_IP),
        is_current=current() is ctx,
        remaining=ctx.remaining(),
    )


@app.get("/slow")
def slow():  # type: ignore[no-untyped-def]
    tag = request.args["tag"]
    record(tag, "started", pid=os.getpid())
    done = g.ctx.done().wait(20)
    record(tag, "done", done=done, cause=repr(cause(g.ctx)))
    g.ctx.check()  # raises ctx.err(): Flask hands it to the extension
    return "too late"


@app.get("/pg")
def pg():  # type: ignore[no-untyped-def]
    import psycopg

    tag = request.args["tag"]
    record(tag, "started", pid=os.getpid())
    try:
        with (
            psycopg.connect(PG_DSN, application_name=tag, autocommit=True) as conn,
            ctxmiddleware.psycopg_transaction_sync(conn) as c,
        ):
            c.execute("SELECT pg_sleep(30)")
    except ctxmiddleware.ContextError as exc:
        record(tag, "done", result=type(exc).__name__, cause=repr(cause(g.ctx)))
        raise
    return "too late"


@app.get("/other_ctx_error")
def other_ctx_error():  # type: ignore[no-untyped-def]
    # A ContextError of a context of its own (not the request's): a plain 500.
    ctx, cancel = ctxmiddleware.with_cancel(ctxmiddleware.background())
    cancel()
    ctx.check()
    return "unreachable"
