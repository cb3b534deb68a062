"""Issue 9, point 2: adding a value mid-request (the user, after authentication).

After ``ctxmiddleware.with_request_value(KEY, value)`` (or
``set_request_context(ctx)``), the three documented routes to the request's
context, ``request.state.ctx``, ``ctxmiddleware.current()`` and FastAPI's
``RequestContext``, all return the derived context for the rest of the
request: in async and sync (threadpool) endpoints, after an async or a sync
``yield`` dependency, and in plain Starlette.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import ctxmiddleware
from ctxmiddleware import ContextMiddleware, Key, RequestContext

USER: Key[str] = Key("user")


def _seen(request: Request, ctx: Any = None) -> dict[str, Any]:
    routes = {
        "state": request.state.ctx.value(USER),
        "current": ctxmiddleware.current().value(USER),
        "request_id": ctxmiddleware.request_id(),
    }
    if ctx is not None:
        routes["RequestContext"] = ctx.value(USER)
    return routes


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    async def auth_async() -> None:
        ctxmiddleware.with_request_value(USER, "ada")

    def auth_sync_yield() -> Iterator[None]:  # runs in a worker thread, enter and exit
        ctxmiddleware.with_request_value(USER, "bob")
        yield

    def auth_sync() -> None:
        ctxmiddleware.with_request_value(USER, "cy")

    @app.get("/async", dependencies=[Depends(auth_async)])
    async def a(request: Request, ctx: RequestContext) -> dict[str, Any]:
        inner = await asyncio.create_task(asyncio.sleep(0, ctxmiddleware.current().value(USER)))
        return {**_seen(request, ctx), "task": inner}

    @app.get("/sync-yield", dependencies=[Depends(auth_sync_yield)])
    def b(request: Request, ctx: RequestContext) -> dict[str, Any]:
        return _seen(request, ctx)

    @app.get("/sync", dependencies=[Depends(auth_sync)])
    async def c(request: Request, ctx: RequestContext) -> dict[str, Any]:
        return _seen(request, ctx)

    @app.get("/none")
    def d(request: Request, ctx: RequestContext) -> dict[str, Any]:
        return _seen(request, ctx)

    return app


def _starlette_app() -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        ctxmiddleware.with_request_value(USER, "dee")
        in_thread = await run_in_threadpool(lambda: ctxmiddleware.current().value(USER))
        return JSONResponse({**_seen(request), "thread": in_thread})

    return Starlette(routes=[Route("/", endpoint)])


def _get(app: Any, path: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.get(path, headers={"x-request-id": "rid-1"})
            assert r.status_code == 200, r.text
            data: dict[str, Any] = r.json()
            return data

    return asyncio.run(go())


@pytest.mark.parametrize("install", ["add_middleware", "wrap"])
@pytest.mark.parametrize(
    ("path", "user"), [("/async", "ada"), ("/sync-yield", "bob"), ("/sync", "cy")]
)
def test_fastapi_dependency_adds_a_value_every_route_sees(
    install: str, path: str, user: str
) -> None:
    app: Any = _fastapi_app()
    if install == "wrap":
        app = ContextMiddleware(app)
    else:
        app.add_middleware(ContextMiddleware)
    seen = _get(app, path)
    expected = {"state": user, "current": user, "RequestContext": user, "request_id": "rid-1"}
    if path == "/async":
        expected["task"] = user
    assert seen == expected


def test_fastapi_without_a_value() -> None:
    app = _fastapi_app()
    app.add_middleware(ContextMiddleware)
    assert _get(app, "/none") == {
        "state": None, "current": None, "RequestContext": None, "request_id": "rid-1"
    }


def test_starlette_endpoint_adds_a_value() -> None:
    seen = _get(ContextMiddleware(_starlette_app()), "/")
    assert seen == {"state": "dee", "current": "dee", "request_id": "rid-1", "thread": "dee"}


def test_set_request_context_needs_a_request_context() -> None:
    with pytest.raises(RuntimeError, match="ContextMiddleware"):
        ctxmiddleware.with_request_value(USER, "x")
    with pytest.raises(RuntimeError, match="ContextMiddleware"):
        ctxmiddleware.set_request_context(ctxmiddleware.background())
    with pytest.raises(TypeError, match="Context"):
        ctxmiddleware.set_request_context("ctx")  # type: ignore[arg-type]


def test_the_derived_context_is_cancelled_with_the_request() -> None:
    kept: list[Any] = []

    async def endpoint(request: Request) -> JSONResponse:
        kept.append(ctxmiddleware.with_request_value(USER, "e"))
        return JSONResponse({})

    _get(ContextMiddleware(Starlette(routes=[Route("/", endpoint)])), "/")
    assert isinstance(kept[0].err(), ctxmiddleware.Canceled)


def test_request_id_outside_a_request_is_none() -> None:
    assert ctxmiddleware.request_id() is None
