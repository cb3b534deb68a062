"""Issue 9: what a new user hits in the first hour (points 3, 4, 5, 6 and 10).

Point 1 is tests/test_db_first_error.py, point 2 tests/test_request_value.py.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import ContextMiddleware, RequestContextFilter, background, with_cancel_cause

ROOT = Path(__file__).resolve().parent.parent


async def _asgi_get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path, headers=headers or {})


def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return asyncio.run(_asgi_get(app, path, headers))


# -- 3. route_timeout above the route decorator ------------------------------


def test_route_timeout_above_the_route_decorator_fails_at_import() -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match=r"below @app\.get"):

        @ctxmiddleware.route_timeout(0.1)
        @app.get("/a")
        async def a() -> int:
            return 1


def test_route_timeout_below_the_route_decorator_applies() -> None:
    app = FastAPI()

    @app.get("/b")
    @ctxmiddleware.route_timeout(0.1)
    async def b(ctx: ctxmiddleware.RequestContext) -> float:
        remaining = ctx.remaining()
        assert remaining is not None
        return remaining

    app.add_middleware(ContextMiddleware, timeout=30)
    assert float(get(app, "/b").text) <= 0.1


# -- 4. bad options fail at construction or call ------------------------------


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"values": 42}, TypeError),
        ({"base": "x"}, TypeError),
        ({"timeout_status": 200}, ValueError),
        ({"request_id_factory": "uuid7"}, TypeError),
        ({"request_id_validator": 1}, TypeError),
    ],
)
def test_bad_middleware_options_fail_at_construction(
    options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        ContextMiddleware(_asgi_app, **options)


def test_app_none_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="ASGI application"):
        ContextMiddleware(None)  # type: ignore[arg-type]


def test_timeout_as_timedelta_is_accepted() -> None:
    assert ContextMiddleware(_asgi_app, timeout=datetime.timedelta(seconds=5)).config.timeout == 5


@pytest.mark.parametrize(
    "helper", ["asyncpg_transaction", "psycopg_transaction", "sqlalchemy_session"]
)
def test_db_helper_given_a_dsn_raises_a_clear_type_error(helper: str) -> None:
    pytest.importorskip({"asyncpg_transaction": "asyncpg", "psycopg_transaction": "psycopg",
                         "sqlalchemy_session": "sqlalchemy"}[helper])

    async def go() -> None:
        async with getattr(ctxmiddleware, helper)("postgresql://localhost/db"):
            pass

    with pytest.raises(TypeError, match=rf"{helper}\(\) takes"):
        asyncio.run(go())


def test_sync_db_helper_given_a_dsn_raises_a_clear_type_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(TypeError, match="psycopg_transaction_sync"), \
            ctxmiddleware.psycopg_transaction_sync("postgresql://localhost/db"):
        pass


def test_base_option_cancels_every_request() -> None:
    """``base=``: every request derives from it; cancelling it cancels them."""
    base, cancel = with_cancel_cause(background())
    seen: list[Any] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        seen.append(request.state.ctx)
        return PlainTextResponse("ok")

    app = ContextMiddleware(Starlette(routes=[Route("/", endpoint)]), base=base)
    assert get(app, "/").status_code == 200
    cancel(RuntimeError("shutting down"))
    assert get(app, "/").status_code == 504 or isinstance(seen[-1].err(), ctxmiddleware.Canceled)
    assert isinstance(ctxmiddleware.cause(seen[-1]), RuntimeError)


# -- 5. typing: mypy --strict on user code ------------------------------------


def test_cancel_cause_rejects_a_non_exception() -> None:
    ctx, cancel = with_cancel_cause(background())
    with pytest.raises(TypeError, match="exception"):
        cancel("a str")  # type: ignore[arg-type]
    assert ctx.err() is None
    cancel(ValueError("why"))
    assert isinstance(ctxmiddleware.cause(ctx), ValueError)


MYPY_SNIPPET = '''import ctxmiddleware
from ctxmiddleware import Key, background, with_cancel_cause, with_value

N: Key[int] = Key("n")
ok = with_value(background(), N, 1)
other = with_value(background(), "plain key", "any value")
bad = with_value(background(), N, "a str")                  # line 7: error
ctx, cancel = with_cancel_cause(background())
cancel(ValueError("x"))
cancel(None)
cancel(cause=ValueError("x"))
cancel("a str")                                             # line 12: error
n: int | None = ok.value(N)
rid: str | None = ctxmiddleware.request_id()
'''


def test_mypy_strict_on_user_code(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    path = tmp_path / "mypy_snippet.py"
    path.write_text(MYPY_SNIPPET)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir=/dev/null",
         str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    where = sorted(int(line.split(":")[1]) for line in lines)
    assert where == [7, 12], result.stdout


# -- 6. the request id of a failed request ------------------------------------


def _failing_app() -> Starlette:
    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/", boom)])


def test_failed_request_exception_carries_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[BaseException] = []

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        try:
            await ContextMiddleware(_failing_app())(scope, receive, send)
        except RuntimeError as exc:
            seen.append(exc)
            logging.getLogger("server").error("Exception in ASGI application", exc_info=True)
            raise

    handler_filter = RequestContextFilter()
    with caplog.at_level(logging.ERROR, logger="server"):
        logging.getLogger("server").addFilter(handler_filter)
        try:
            r = get(outer, "/", {"x-request-id": "fail-1"})
        finally:
            logging.getLogger("server").removeFilter(handler_filter)
    assert r.status_code == 500 and r.headers["x-request-id"] == "fail-1"
    assert "ctxmiddleware: request_id=fail-1" in getattr(seen[0], "__notes__", [])
    record = next(r for r in caplog.records if r.name == "server")
    assert record.request_id == "fail-1"  # type: ignore[attr-defined]


def test_docstring_and_readme_agree_on_the_500() -> None:
    doc = ContextMiddleware.__doc__ or ""
    readme = (ROOT / "README.md").read_text()
    assert "whose 500 then lacks the request id" in doc
    assert "Added with\n`add_middleware`, it leaves those 500s to Starlette" in readme


# -- 10. conveniences ------------------------------------------------------------


def _rid_app() -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"rid": ctxmiddleware.request_id()})

    return Starlette(routes=[Route("/", endpoint)])


def test_request_id_shortcut() -> None:
    assert ctxmiddleware.request_id() is None
    r = get(ContextMiddleware(_rid_app()), "/", {"x-request-id": "abc"})
    assert r.json() == {"rid": "abc"} and r.headers["x-request-id"] == "abc"


def test_request_id_factory_and_validator() -> None:
    def from_traceparent(scope: Any) -> str:
        for name, value in scope["headers"]:
            if name == b"traceparent":
                return str(value.decode().split("-")[1])
        return uuid.uuid4().hex

    app = ContextMiddleware(
        _rid_app(),
        request_id_factory=from_traceparent,
        request_id_validator=lambda rid: len(rid) == 32,
    )
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = get(app, "/", {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert r.json() == {"rid": trace} and r.headers["x-request-id"] == trace
    r = get(app, "/", {"x-request-id": "short", "traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert r.json() == {"rid": trace}  # refused by the validator: a new id
    r = get(app, "/", {"x-request-id": "a" * 32})
    assert r.json() == {"rid": "a" * 32}  # kept
    bad = ContextMiddleware(_rid_app(), request_id_factory=lambda scope: "no spaces allowed")
    with pytest.raises(ValueError, match="request_id_factory"):
        asyncio.run(httpx.ASGITransport(app=bad).handle_async_request(httpx.Request("GET", "http://t/")))


def test_python_m_ctxmiddleware() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctxmiddleware"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ctxmiddleware {ctxmiddleware.__version__}")
    assert "self-check passed" in result.stdout
