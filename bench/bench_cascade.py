"""Cascade: how long after a client leaves service A is service B's query gone?

    .venv/bin/python bench/bench_cascade.py                # 200 runs, table
    .venv/bin/python bench/bench_cascade.py --runs 500 --json bench/out/cascade.json

Setup (all on 127.0.0.1, real processes):

* service B: uvicorn (httptools, uvloop if installed) serving
  ``ContextMiddleware(app)``; ``/q?tag=N`` runs ``SELECT pg_sleep(30) -- N`` through
  ``asyncpg_transaction`` (PostgreSQL 127.0.0.1:5432, user postgres, db test);
* service A: the same server, ``ContextMiddleware(app)``; ``/a?tag=N`` calls B's
  ``/q?tag=N`` with ``ctxmiddleware.httpx_async_client()``;
* the client (this process) opens a socket to A, sends ``GET /a?tag=N``, waits
  until B's query shows as active in ``pg_stat_activity`` (polled), waits
  ``--settle`` ms, takes ``t_close = time.monotonic()`` and closes the socket;
  then polls ``pg_stat_activity`` until the query is no longer active:
  ``t_gone`` (polled every 0.5 ms). The latency is ``t_gone - t_close``.

Where the time goes (CLOCK_MONOTONIC is one clock for every process): A and B
append events to a shared file: ``a_done`` / ``b_done`` when their request
context is done (an ``after_func``), ``b_raised`` when B's handler sees the
helper raise (the query was cancelled and the transaction rolled back). The
stages: ``close -> a_done`` (A's disconnect detection), ``a_done -> b_done``
(the httpx abort and B's disconnect detection), ``b_done -> gone`` (B's cancel:
the task cancellation, asyncpg's CancelRequest, PostgreSQL ending the query,
and the polling granularity, ~0.2 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("CASCADE_PG", "postgresql://postgres@127.0.0.1:5432/test")

# -- the services ------------------------------------------------------------------


def _record(name: str, tag: str, **extra: Any) -> None:
    line = json.dumps({"e": name, "tag": tag, "t": time.monotonic(), **extra}) + "\n"
    os.write(_EVENTS_FD, line.encode())


_EVENTS_FD = -1


def make_b() -> Any:
    import asyncpg

    import ctxmiddleware
    from ctxmiddleware import ContextMiddleware, after_func, current

    if os.environ.get("CASCADE_NO_SIDE_CANCEL"):
        # The "before" of the fix: asyncpg's own CancelRequest only.
        from ctxmiddleware._integrations import _postgres

        _postgres._PoolSideCancel._start = lambda self: None  # type: ignore[method-assign]

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["pool"] = await asyncpg.create_pool(PG_DSN, min_size=4, max_size=20)
                await send({"type": "lifespan.startup.complete"})
            message = await receive()
            await state["pool"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        tag = scope["query_string"].decode().partition("=")[2]
        ctx = current()
        after_func(ctx, lambda: _record("b_done", tag))
        try:
            async with ctxmiddleware.asyncpg_transaction(state["pool"]) as conn:
                await conn.execute(f"SELECT pg_sleep(30) -- cascade-{tag}")
        except BaseException as exc:
            _record("b_raised", tag, exc=type(exc).__name__)
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    # (Wrapping the whole app: the lifespan goes through to it.)
    return ContextMiddleware(app, timeout=60)


def make_a(b_url: str) -> Any:
    import ctxmiddleware
    from ctxmiddleware import ContextMiddleware, after_func, current

    client = ctxmiddleware.httpx_async_client(timeout=None)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        tag = scope["query_string"].decode().partition("=")[2]
        ctx = current()
        after_func(ctx, lambda: _record("a_done", tag))
        response = await client.get(f"{b_url}/q?tag={tag}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": response.content})

    return ContextMiddleware(app, timeout=60)


def serve(role: str, port: int, b_url: str) -> None:
    global _EVENTS_FD
    import uvicorn

    _EVENTS_FD = os.open(os.environ["CASCADE_EVENTS"], os.O_WRONLY | os.O_APPEND)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    app = make_b() if role == "b" else make_a(b_url)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop=loop,
        log_level="error",
        access_log=False,
        proxy_headers=False,
        lifespan="on" if role == "b" else "off",
    )


# -- the client --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@contextlib.contextmanager
def _service(role: str, port: int, b_url: str, events: str, side_cancel: bool = True) -> Any:
    env = dict(os.environ, CASCADE_EVENTS=events, PYTHONPATH=str(ROOT))
    if not side_cancel:
        env["CASCADE_NO_SIDE_CANCEL"] = "1"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--port", str(port), "--b-url", b_url],
        env=env,
        start_new_session=True,
    )
    try:
        _wait_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _active(cur: Any, tag: str) -> bool:
    cur.execute(
        "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
        " AND pid <> pg_backend_pid()",
        [f"%-- cascade-{tag}"],
    )
    return cur.fetchone() is not None


POLL = 0.0005


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(runs: int, settle: float, side_cancel: bool = True) -> dict[str, Any]:
    import psycopg

    events = f"/tmp/cascade-events-{os.getpid()}.jsonl"
    Path(events).write_text("")
    a_port, b_port = _free_port(), _free_port()
    b_url = f"http://127.0.0.1:{b_port}"
    rows: list[dict[str, float]] = []
    with (
        _service("b", b_port, b_url, events, side_cancel),
        _service("a", a_port, b_url, events),
        psycopg.connect(PG_DSN, autocommit=True) as pg,
    ):
        cur = pg.cursor()
        run_id = os.getpid()
        for i in range(runs + 3):  # (the first 3: warm-up, not counted)
            tag = f"{run_id}x{i}"
            sock = socket.create_connection(("127.0.0.1", a_port))
            sock.sendall(f"GET /a?tag={tag} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            deadline = time.monotonic() + 10
            while not _active(cur, tag):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run {i}: B's query never started")
            time.sleep(settle)
            t_close = time.monotonic()
            sock.close()
            while _active(cur, tag):
                if time.monotonic() > t_close + 10:
                    raise RuntimeError(f"run {i}: B's query still running after 10 s")
                # (A poll costs PostgreSQL a backend's CPU: on a small machine a
                # tight loop would slow down what it measures.)
                time.sleep(POLL)
            t_gone = time.monotonic()
            if i >= 3:
                rows.append({"tag": tag, "close": t_close, "gone": t_gone})  # type: ignore[dict-item]
            time.sleep(0.02)
        time.sleep(0.2)
    seen: dict[str, dict[str, float]] = {}
    for line in Path(events).read_text().splitlines():
        event = json.loads(line)
        seen.setdefault(event["tag"], {}).setdefault(event["e"], event["t"])
    os.unlink(events)
    total, a_det, hop, b_cancel = [], [], [], []
    for row in rows:
        ev = seen.get(str(row["tag"]), {})
        total.append((row["gone"] - row["close"]) * 1000)
        if "a_done" in ev and "b_done" in ev:
            a_det.append((ev["a_done"] - row["close"]) * 1000)
            hop.append((ev["b_done"] - ev["a_done"]) * 1000)
            b_cancel.append((row["gone"] - ev["b_done"]) * 1000)

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(percentile(values, 50), 2),
            "p90": round(percentile(values, 90), 2),
            "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2),
            "mean": round(statistics.fmean(values), 2),
        }

    return {
        "variant": "pg_cancel_backend side cancel" if side_cancel else "asyncpg CancelRequest only",
        "runs": len(rows),
        "settle_ms": settle * 1000,
        "client close -> B's query gone (ms)": stats(total),
        "close -> A's context done (A's disconnect detection)": stats(a_det),
        "A done -> B's context done (httpx abort + B's disconnect detection)": stats(hop),
        "B done -> query gone (B's cancel + PG + polling)": stats(b_cancel),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--settle", type=float, default=0.02, help="seconds after query start")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument(
        "--compare", action="store_true",
        help="also run without the helper's pg_cancel_backend side cancel (the old behaviour)",
    )
    parser.add_argument("--role", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--b-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        serve(args.role, args.port, args.b_url)
        return
    results = []
    for side_cancel in ([False, True] if args.compare else [True]):
        result = run(args.runs, args.settle, side_cancel)
        results.append(result)
        print(
            f"{result['variant']}: {result['runs']} runs, client closes"
            f" {result['settle_ms']:.0f} ms after the query starts"
        )
        for key, value in result.items():
            if isinstance(value, dict):
                cells = "  ".join(f"{k} {v:7.2f}" for k, v in value.items())
                print(f"  {key:70s} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
