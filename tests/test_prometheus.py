"""The Prometheus exporter (issue 11, part 2): names, labels, route templates,
and prometheus_client's multiprocess mode under 2 uvicorn workers."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from servers import raw_request

prometheus_client = pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parent.parent

APP = textwrap.dedent('''
    import asyncio, os
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from ctxmiddleware import ContextMiddleware
    from ctxmiddleware.prometheus import instrument, metrics_app

    instrument()

    async def item(request):
        return PlainTextResponse(str(os.getpid()))

    async def slow(request):
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    async def soon(request):
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    app = Starlette(routes=[
        Route("/items/{id}", item),
        Route("/slow", slow),
        Route("/soon", soon),
        Mount("/metrics", metrics_app()),
    ])
    app.add_middleware(ContextMiddleware, timeout=20)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text`` (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if line.startswith(name + " ") and labels:
            continue
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _start(
    tmp_path: Path, workers: int, multiproc: Path | None
) -> tuple[subprocess.Popen[bytes], str]:
    (tmp_path / "papp.py").write_text(APP)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiproc is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "papp:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning", "--no-access-log"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/metrics/", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _disconnect_one(url: str, path: str = "/slow") -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(raw_request("GET", path))
        time.sleep(0.3)


def test_metrics_names_labels_and_outcomes(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, 1, None)
    try:
        for i in range(3):
            assert httpx.get(f"{url}/items/{i}", timeout=5).status_code == 200
        _disconnect_one(url)
        time.sleep(0.5)
        text = httpx.get(url + "/metrics/", timeout=5).text
    finally:
        _stop(proc)
    assert _sample(text, "ctxmiddleware_requests_total",
                   outcome="completed", method="GET", route="/items/{id}") == 3
    assert _sample(text, "ctxmiddleware_requests_total",
                   outcome="client_disconnected", method="GET", route="/slow") == 1
    # Raw paths never become label values.
    assert 'route="/items/0"' not in text
    # 499, not 500: no error was counted for the disconnect.
    assert 'outcome="error"' not in text
    # The disconnected request had ~19.7 s of its 20 s budget left.
    assert _sample(text, "ctxmiddleware_cancel_remaining_budget_seconds_count") == 1
    assert _sample(text, "ctxmiddleware_cancel_remaining_budget_seconds_bucket", le="10.0") == 0
    assert _sample(text, "ctxmiddleware_cancel_remaining_budget_seconds_bucket", le="30.0") == 1
    assert 19 < _sample(text, "ctxmiddleware_cancel_remaining_budget_seconds_sum") < 20
    # (The scrape itself is in flight while it answers.)
    assert _sample(text, "ctxmiddleware_requests_in_flight") == 1
    assert "ctxmiddleware_downstream_cancels_total" in text


def test_multiprocess_two_uvicorn_workers_scrape_sums_both(tmp_path: Path) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    proc, url = _start(tmp_path, 2, multiproc)
    try:
        pids: dict[str, int] = {}
        sent = 0
        deadline = time.monotonic() + 30
        # New connections are spread over the workers by the kernel: go on
        # until both answered (and at least 20 requests).
        while (len(pids) < 2 or sent < 20) and time.monotonic() < deadline:
            with httpx.Client() as client:  # a connection of its own
                pid = client.get(f"{url}/items/{sent}", timeout=5).text
            pids[pid] = pids.get(pid, 0) + 1
            sent += 1
        assert len(pids) == 2, pids
        # In flight in both workers at once: the gauge sums them.
        host, port = url.removeprefix("http://").split(":")
        socks = []
        for _ in range(6):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(raw_request("GET", "/soon"))
            socks.append(sock)
        time.sleep(1.0)
        text = httpx.get(url + "/metrics/", timeout=5).text
        in_flight = _sample(text, "ctxmiddleware_requests_in_flight")
        for sock in socks:
            sock.close()
        time.sleep(1.0)
        after = httpx.get(url + "/metrics/", timeout=5).text
    finally:
        _stop(proc)
    assert len(list(multiproc.glob("*.db"))) >= 2  # each worker wrote its own file
    assert _sample(after, "ctxmiddleware_requests_total",
                   outcome="completed", method="GET", route="/items/{id}") == sent
    assert in_flight == 7  # 6 slow ones and the scrape, over both workers
    assert _sample(after, "ctxmiddleware_requests_total",
                   outcome="client_disconnected", method="GET", route="/soon") == 6
    assert _sample(after, "ctxmiddleware_cancel_remaining_budget_seconds_count") == 6


def test_grafana_dashboard_queries_only_our_metrics() -> None:
    import json

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    ours = {
        "ctxmiddleware_requests_total", "ctxmiddleware_requests_in_flight",
        "ctxmiddleware_cancel_remaining_budget_seconds_sum",
        "ctxmiddleware_cancel_remaining_budget_seconds_bucket",
        "ctxmiddleware_downstream_cancels_total",
    }
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    for expr in exprs:
        used = set(re.findall(r"ctxmiddleware_\w+", expr))
        assert used and used <= ours, expr
    readme = (ROOT / "README.md").read_text()
    assert "docs/grafana-dashboard.json" in readme
