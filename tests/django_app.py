"""A one-module Django project with ctxmiddleware.django, for tests/test_wsgi_django.py.

``application`` is Django's WSGI handler (served by gunicorn),
``asgi_application`` its ASGI handler (served by uvicorn).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading

import django
from django.conf import settings
from wsgi_apps import record

settings.configure(
    DEBUG=False,
    SECRET_KEY="test",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["ctxmiddleware.django.ContextMiddleware"],
    CTXMIDDLEWARE={"timeout": 5, "trusted_proxies": ["127.0.0.1"]},
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "127.0.0.1", "PORT": 5432, "USER": "postgres", "NAME": "test",
        },
        "lite": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(tempfile.gettempdir(), f"ctxtest-{os.getpid()}.sqlite3"),
        },
    },
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
)
django.setup()

from django.db import connections  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

import ctxmiddleware  # noqa: E402
from ctxmiddleware import REQUEST_ID, ContextError, cause, current  # noqa: E402


def info(request):  # type: ignore[no-untyped-def]
    ctx = request.ctx
    return JsonResponse(
        {
            "request_id": ctx.value(REQUEST_ID),
            "client_ip": ctx.value(ctxmiddleware.CLIENT_IP),
            "is_current": current() is ctx,
            "remaining": ctx.remaining(),
        }
    )


def slow(request):  # type: ignore[no-untyped-def]
    tag = request.GET["tag"]
    record(tag, "started", pid=os.getpid())
    done = request.ctx.done().wait(20)
    record(tag, "done", done=done, cause=repr(cause(request.ctx)))
    request.ctx.check()
    return HttpResponse("too late")


async def aslow(request):  # type: ignore[no-untyped-def]
    tag = request.GET["tag"]
    record(tag, "started", pid=os.getpid())
    ctx = request.ctx
    try:
        await asyncio.sleep(20)
    finally:
        # Django cancels this task on a disconnect before the middleware
        # hears of it: report once the context is done.
        def report() -> None:
            ctx.done().wait(5)
            record(tag, "done", cause=repr(cause(ctx)), err=repr(ctx.err()))

        threading.Thread(target=report).start()
    return HttpResponse("too late")


def orm_pg(request):  # type: ignore[no-untyped-def]
    tag = request.GET["tag"]
    with connections["default"].cursor() as cur:
        cur.execute("SELECT set_config('application_name', %s, false)", [tag])
        record(tag, "started", pid=os.getpid())
        try:
            cur.execute("SELECT pg_sleep(30)")
        except ContextError as exc:
            record(tag, "done", result=type(exc).__name__, cause=repr(cause(request.ctx)))
            raise
        finally:
            cur.execute("SELECT set_config('application_name', '', false)")
    return HttpResponse("too late")


def orm_timeout(request):  # type: ignore[no-untyped-def]
    with connections["default"].cursor() as cur:
        cur.execute("SELECT current_setting('statement_timeout')")
        return JsonResponse({"statement_timeout": cur.fetchone()[0]})


def orm_sqlite(request):  # type: ignore[no-untyped-def]
    tag = request.GET["tag"]
    record(tag, "started", pid=os.getpid())
    try:
        with connections["lite"].cursor() as cur:
            cur.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                "SELECT count(*) FROM c"
            )
    except ContextError as exc:
        record(tag, "done", result=type(exc).__name__, cause=repr(cause(request.ctx)))
        raise
    return HttpResponse("too late")


urlpatterns = [
    path("info", info),
    path("slow", slow),
    path("aslow", aslow),
    path("orm_pg", orm_pg),
    path("orm_timeout", orm_timeout),
    path("orm_sqlite", orm_sqlite),
]

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
asgi_application = get_asgi_application()
