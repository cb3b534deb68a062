"""Both adapters take one set of options, defined once (RequestOptions) and checked once
(RequestConfig.from_options)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import ctxmiddleware
from ctxmiddleware import ContextMiddleware, RequestOptions
from ctxmiddleware._request import RequestConfig


def test_the_options_typed_dict_and_the_checks_name_the_same_options() -> None:
    checked = {
        name
        for name, p in inspect.signature(RequestConfig.from_options).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(RequestOptions.__annotations__) == checked


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    pass


def _wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    return []


def test_both_adapters_check_the_same_options_the_same_way() -> None:
    from ctxmiddleware._wsgi import WSGIContextMiddleware

    for bad in ({"timeout": 0}, {"timeout_status": 200}, {"request_id_header": "x\r\ny"}):
        with pytest.raises(ValueError) as asgi_error:
            ContextMiddleware(_asgi_app, **bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError) as wsgi_error:
            WSGIContextMiddleware(_wsgi_app, **bad)  # type: ignore[arg-type]
        assert str(asgi_error.value) == str(wsgi_error.value)
    good = {"timeout": 2, "trusted_proxies": ["10.0.0.0/8"], "request_id_header": "X-Trace"}
    assert (
        ContextMiddleware(_asgi_app, **good).config  # type: ignore[arg-type]
        == WSGIContextMiddleware(_wsgi_app, **good).config  # type: ignore[arg-type]
    )


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="bogus"):
        ContextMiddleware(_asgi_app, bogus=1)  # type: ignore[call-arg]


def test_wsgi_refuses_the_request_id_options_it_does_not_support_yet() -> None:
    from ctxmiddleware._wsgi import WSGIContextMiddleware

    with pytest.raises(ValueError, match="not supported by WSGIContextMiddleware"):
        WSGIContextMiddleware(_wsgi_app, request_id_factory=lambda scope: "x")


def test_request_options_is_public() -> None:
    assert "RequestOptions" in ctxmiddleware.__all__
