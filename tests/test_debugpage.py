"""The live requests page (issue 11, part 4): in a real browser (headless
Chromium driven by Selenium through the system chromedriver), plus its
safety rules over plain HTTP and under WSGI."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import raw_request, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import ctxmiddleware
from ctxmiddleware import ContextMiddleware
from ctxmiddleware.debugpage import OperatorCancelled, RequestsPage

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "s3cr3t-bearer-token-do-not-show"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(autouse=True)
def fresh_stats() -> Iterator[None]:
    ctxmiddleware.disable_stats()
    yield
    ctxmiddleware.disable_stats()


def make_app(page: RequestsPage, entered: threading.Event, seen: dict[str, Any]) -> Any:
    async def report(request: Request) -> PlainTextResponse:
        seen["ctx"] = ctxmiddleware.current()
        entered.set()
        try:
            await asyncio.sleep(60)
        except BaseException:
            seen["cause"] = ctxmiddleware.cause(seen["ctx"])
            raise
        return PlainTextResponse("done")

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[
        Route("/reports/{name}", report),
        Route("/fast", fast),
        Mount("/debug/requests", page.asgi_app()),
    ])
    app.add_middleware(ContextMiddleware, timeout=30)
    return app


def slow_request(host: str, port: int, rid: str, query: str = "") -> socket.socket:
    sock = socket.create_connection((host, port))
    sock.sendall(raw_request("GET", f"/reports/q3{query}", {
        "x-request-id": rid, "authorization": f"Bearer {TOKEN}", "cookie": f"session={TOKEN}",
    }))
    return sock


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.skipif(
    not (os.path.exists(CHROMEDRIVER) and shutil.which("chromium")),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_in_a_real_browser() -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = RequestsPage(refresh=2)
    entered = threading.Event()
    seen: dict[str, Any] = {}
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        with serve(make_app(page, entered, seen)) as server:
            assert httpx.get(server.url + "/fast").status_code == 200
            sock = slow_request(server.host, server.port, "browser-rid-1", "?api_key=" + TOKEN)
            assert entered.wait(5)
            time.sleep(0.3)  # (a visible age and budget bar)
            url = server.url + "/debug/requests/"
            driver.get("about:blank")
            t0 = time.monotonic()  # from opening the page to finding the row: <= 1 s
            driver.get(url)
            row = None
            while time.monotonic() - t0 < 1.0:
                found = driver.find_elements(
                    By.CSS_SELECTOR, "#in-flight tr[data-request-id='browser-rid-1']"
                )
                if found:
                    row = found[0]
                    break
                time.sleep(0.05)
            assert row is not None, (
                f"the slow request's row did not show within 1 s: {driver.page_source[:3000]}"
            )
            assert "/reports/{name}" in row.text and "/reports/q3" in row.text
            source = driver.page_source
            assert TOKEN not in source  # not from Authorization, Cookie or the query
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "debug_requests_in_flight.png"))

            sock.close()  # the client leaves: the row goes, a client_disconnected row comes

            def moved() -> bool:
                driver.refresh()
                gone = not driver.find_elements(
                    By.CSS_SELECTOR, "#in-flight tr[data-request-id='browser-rid-1']"
                )
                finished = driver.find_elements(
                    By.CSS_SELECTOR,
                    "table.finished[data-outcome='client_disconnected'] "
                    "tr[data-request-id='browser-rid-1']",
                )
                return gone and bool(finished)

            wait_for(moved, timeout=5)
            assert "client_disconnected: 1" in driver.find_element(By.ID, "counts").text
            assert driver.find_elements(By.CSS_SELECTOR, "#latency-histogram rect")
            assert TOKEN not in driver.page_source
            driver.save_screenshot(str(ARTIFACTS / "debug_requests.png"))
            assert (ARTIFACTS / "debug_requests.png").stat().st_size > 10_000
            assert isinstance(seen["cause"], ctxmiddleware.ClientDisconnected)
    finally:
        driver.quit()


def test_loopback_only_and_no_forwarded_clients() -> None:
    page = RequestsPage()
    assert page.allowed("127.0.0.1", [])
    assert page.allowed("::1", [])
    assert not page.allowed("10.1.2.3", [])
    assert not page.allowed(None, [])
    # A reverse proxy on this host: the client is not who connects.
    assert not page.allowed("127.0.0.1", [(b"X-Forwarded-For", b"203.0.113.9")])
    assert not page.allowed("127.0.0.1", [(b"forwarded", b"for=203.0.113.9")])
    wide = RequestsPage(allow=["10.0.0.0/8"])
    assert wide.allowed("10.1.2.3", []) and not wide.allowed("192.168.1.1", [])
    entered = threading.Event()
    with serve(make_app(page, entered, {})) as server:
        r = httpx.get(server.url + "/debug/requests/", headers={"x-forwarded-for": "1.2.3.4"})
        assert r.status_code == 403
        r = httpx.get(server.url + "/debug/requests/")
        assert r.status_code == 200 and "<svg" in r.text and "<script" not in r.text
        assert "http-equiv=\"refresh\"" in r.text
        assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_query_shown_only_if_enabled_and_never_the_token() -> None:
    for show in (False, True):
        ctxmiddleware.disable_stats()
        page = RequestsPage(show_query=show)
        entered = threading.Event()
        with serve(make_app(page, entered, {})) as server:
            sock = slow_request(server.host, server.port, f"q-{show}", "?page=7")
            assert entered.wait(5)
            html = httpx.get(server.url + "/debug/requests/").text
            sock.close()
        assert f"data-request-id='q-{show}'" in html
        assert ("page=7" in html) is show
        assert TOKEN not in html


def test_cancel_button_off_by_default_then_post_with_csrf() -> None:
    page = RequestsPage()
    entered = threading.Event()
    with serve(make_app(page, entered, {})) as server:
        sock = slow_request(server.host, server.port, "c-1")
        assert entered.wait(5)
        html = httpx.get(server.url + "/debug/requests/").text
        assert "<form" not in html
        r = httpx.post(server.url + "/debug/requests/", data={"csrf": page.csrf, "rid": "c-1"})
        assert r.status_code == 405
        sock.close()

    ctxmiddleware.disable_stats()
    page = RequestsPage(cancel=True)
    entered = threading.Event()
    seen: dict[str, Any] = {}
    with serve(make_app(page, entered, seen)) as server:
        sock = slow_request(server.host, server.port, "c-2")
        assert entered.wait(5)
        html = httpx.get(server.url + "/debug/requests/").text
        assert "<form method='post'" in html and page.csrf in html
        url = server.url + "/debug/requests/"
        assert httpx.get(url, params={"rid": "c-2", "csrf": page.csrf}).status_code == 200
        assert httpx.post(url, data={"csrf": "wrong", "rid": "c-2"}).status_code == 403
        assert httpx.post(url, data={"csrf": page.csrf, "rid": "c-2"},
                          headers={"origin": "http://evil.example"}).status_code == 403
        assert "cause" not in seen  # none of these cancelled it
        r = httpx.post(url, data={"csrf": page.csrf, "rid": "c-2"})
        assert r.status_code == 303
        wait_for(lambda: "cause" in seen)
        assert isinstance(seen["cause"], OperatorCancelled)
        wait_for(lambda: ctxmiddleware.stats().outcomes["server_shutdown"] == 1)
        assert httpx.post(url, data={"csrf": page.csrf, "rid": "c-2"}).status_code == 404
        sock.close()


def test_waiting_on_shows_the_downstream_call() -> None:
    page = RequestsPage()
    entered = threading.Event()
    backend = Starlette(routes=[Route("/slow", _backend_slow(entered))])

    async def call(request: Request) -> PlainTextResponse:
        async with ctxmiddleware.httpx_async_client() as client:
            await client.get(request.app.state.backend + "/slow")
        return PlainTextResponse("ok")

    front = Starlette(routes=[Route("/call", call), Mount("/debug/requests", page.asgi_app())])
    front.add_middleware(ContextMiddleware, timeout=30)
    with serve(backend) as b, serve(front) as f:
        front.state.backend = b.url
        sock = socket.create_connection((f.host, f.port))
        sock.sendall(raw_request("GET", "/call", {"x-request-id": "w-1"}))
        assert entered.wait(5)
        time.sleep(0.2)
        html = httpx.get(f.url + "/debug/requests/").text
        sock.close()
    assert f"HTTP call to {b.host}:{b.port}" in html


def _backend_slow(entered: threading.Event) -> Any:
    async def slow(request: Request) -> PlainTextResponse:
        entered.set()
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    return slow


def test_wsgi_page() -> None:
    from werkzeug.test import Client

    page = RequestsPage()
    client = Client(page.wsgi_app())
    r = client.get("/", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert r.status_code == 200 and b"/debug/requests" in r.data
    r = client.get("/", environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert r.status_code == 403
    r = client.get("/", environ_base={"REMOTE_ADDR": "127.0.0.1"},
                   headers={"X-Forwarded-For": "192.0.2.1"})
    assert r.status_code == 403
    r = client.get("/?format=json", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert r.json["enabled"] is True


def test_the_demo_mounts_the_page_and_prints_its_url() -> None:
    from example_app.__main__ import banner
    from example_app.app import routes

    assert any(getattr(r, "path", "") == "/debug/requests" for r in routes)
    assert "http://localhost:8000/debug/requests/" in banner("127.0.0.1", 8000)
