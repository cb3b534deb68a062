"""Deadline accuracy of ContextMiddleware: when does the 504 arrive?

    python bench/bench_deadline.py              # plain table
    python bench/bench_deadline.py --markdown   # markdown table (for bench/RESULTS.md)

Runs in the venv ``bench/.venv-peers`` (see bench_overhead.py), against this checkout.

Method:

* The server (a separate process, pinned to CPU 0) serves a Starlette app
  wrapped in ``ContextMiddleware(timeout=0.2)`` whose ``/slow`` handler does
  ``await asyncio.sleep(30)``: every request ends with the middleware's 504.
* The client (this process, pinned to CPU 1) runs ``--concurrency`` threads,
  started ``budget / concurrency`` apart (so the deadlines do not all expire
  together), each sending requests one after the other on a raw socket (a new
  connection per request, opened before the clock starts): ``t_send = time.monotonic()``
  just before ``sendall()``, ``t_504`` when the status line arrived: the
  kernel's receive timestamp of that segment (``SO_TIMESTAMPNS``, converted
  to the monotonic clock), so a late wake-up of the client thread on the busy
  machine does not count. The
  lateness is ``t_504 - (t_send + budget)``, where the budget is 0.2 s, or
  0.1 s in the phase that sends ``x-request-timeout-ms: 100``. It includes the
  request's way in and the response's way out (tens of microseconds on
  loopback); a negative value would mean the 504 came early.
* Servers: uvicorn httptools (``--loop uvloop`` if installed), and, unless
  ``--servers`` says otherwise, uvicorn h11 and hypercorn (uvloop too).
* Each server runs a loop-lag monitor (a task sleeping 2 ms in a loop) that
  logs every stall over 10 ms with the thread CPU time spent during it: a
  stall mostly off CPU is the machine (the process was not running), one
  mostly on CPU is work inside the server (or the host preempting the VM: the
  guest reports no steal time). Garbage collections over 5 ms are logged too
  (``gc.callbacks``).
* The floor: a plain Starlette handler (no middleware) that sleeps for the
  budget and answers 200, measured the same way. What it shows (event loop
  timer granularity: libuv's are 1 ms; scheduling; loopback) is the part of
  the lateness the middleware cannot remove.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import (
    OUT,
    ROOT,
    SERVERS,
    ensure_venv,
    has_uvloop,
    percentile,
    render_table,
    run_server,
    server_process,
    versions,
)

TIMEOUT = 0.2


def build_app(kind: str) -> Any:
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def slow(request: Any) -> PlainTextResponse:
        await asyncio.sleep(30)
        return PlainTextResponse("too late")

    async def timed(request: Any) -> PlainTextResponse:
        # The floor: a plain handler that answers itself after the budget.
        ms = request.headers.get("x-request-timeout-ms")
        await asyncio.sleep(TIMEOUT if ms is None else int(ms) / 1000)
        return PlainTextResponse("slept")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(watch_stalls())
        yield
        task.cancel()

    if kind == "floor":
        return Starlette(routes=[Route("/slow", timed)], lifespan=lifespan)
    from ctxmiddleware import ContextMiddleware

    app = Starlette(routes=[Route("/slow", slow)], lifespan=lifespan)
    app.add_middleware(ContextMiddleware, timeout=TIMEOUT)
    return app


async def watch_stalls() -> None:
    """Log every stall of the server's event loop longer than 10 ms.

    With the thread CPU time spent during it: about none means the process was
    not running (the machine), about all of it means the loop was busy.
    """
    import asyncio
    import gc

    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            ms = (time.perf_counter() - started[0]) * 1000
            if ms > 5:
                print(f"GC gen{info['generation']} {ms:.1f} ms, collected {info['collected']}",
                      file=sys.stderr)

    gc.callbacks.append(on_gc)
    while True:
        t0, cpu0 = time.monotonic(), time.thread_time()
        await asyncio.sleep(0.002)
        lag = time.monotonic() - t0 - 0.002
        if lag > 0.010:
            cpu = time.thread_time() - cpu0
            print(f"STALL {lag * 1000:.1f} ms, on CPU {cpu * 1000:.1f} ms", file=sys.stderr)


def serve_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--serve", required=True, choices=SERVERS)
    p.add_argument("--app", choices=["ctx", "floor"], default="ctx")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    run_server(build_app(a.app), a.serve, a.port)


# Linux: the kernel stamps each received segment (CLOCK_REALTIME, ns), so the
# arrival time does not include the client thread's own wake-up delay.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)


def one_request(port: int, header_ms: int | None) -> tuple[int, float, float]:
    """(status, t_send, t_status_line), on the time.monotonic() clock."""
    extra = f"x-request-timeout-ms: {header_ms}\r\n" if header_ms is not None else ""
    raw = f"GET /slow HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if SO_TIMESTAMPNS is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        t_send = time.monotonic()
        sock.sendall(raw)
        buf = b""
        t_arrival = None
        while b"\r\n" not in buf:
            chunk, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
            if not chunk:
                raise ConnectionError("closed before the status line")
            t_user = time.monotonic()
            if t_arrival is None:
                t_arrival = t_user
                for level, kind, data in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", data[:16])
                        # REALTIME -> MONOTONIC; the offset is read right now.
                        t_arrival = sec + nsec / 1e9 - (time.time() - time.monotonic())
            buf += chunk
    assert t_arrival is not None
    status = int(buf.split(b" ", 2)[1])
    return status, t_send, t_arrival


def run_phase(
    server: str, requests: int, concurrency: int, header_ms: int | None, app: str = "ctx"
) -> dict[str, Any]:
    expect = 504 if app == "ctx" else 200
    budget = TIMEOUT if header_ms is None else min(TIMEOUT, header_ms / 1000)
    lateness: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    todo = list(range(requests))
    errors: list[BaseException] = []

    def worker(offset: float) -> None:
        time.sleep(offset)
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            try:
                status, t_send, t_arrival = one_request(port, header_ms)
            except OSError as exc:
                with lock:
                    errors.append(exc)
                continue
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == expect:
                    lateness.append((t_arrival - t_send - budget) * 1000)

    script = Path(__file__).resolve()
    with server_process(script, [server, "--app", app]) as (_, port, log_lines):
        for _ in range(3):  # warm-up
            one_request(port, header_ms)
        # Staggered starts, so that the deadlines do not all expire in the
        # same loop iteration (each thread then keeps its phase).
        threads = [
            threading.Thread(target=worker, args=(i * budget / concurrency,))
            for i in range(concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    label = "timeout=0.2" if header_ms is None else f"x-request-timeout-ms: {header_ms}"
    if app == "floor":
        label = f"floor: plain handler sleep({budget:g}) -> 200, no middleware"
    return {
        "server": server,
        "app": app,
        "label": label,
        "expect": expect,
        "log_lines": sum(not ln.startswith(("STALL", "GC gen")) for ln in log_lines),
        "gc_pauses": [ln for ln in log_lines if ln.startswith("GC gen")],
        "tracebacks": sum("Traceback" in ln for ln in log_lines),
        "stalls": [ln for ln in log_lines if ln.startswith("STALL")],
        "budget_s": budget,
        "n": requests,
        "statuses": statuses,
        "errors": len(errors),
        "lateness_ms": lateness,
        "p50": percentile(lateness, 50),
        "p90": percentile(lateness, 90),
        "p99": percentile(lateness, 99),
        "min": min(lateness, default=float("nan")),
        "max": max(lateness, default=float("nan")),
    }


def stall_summary(stalls: list[str], gc_pauses: list[str]) -> str:
    out = "0"
    if stalls:
        lags = [float(s.split()[1]) for s in stalls]
        on_cpu = [float(s.split()[5]) for s in stalls]
        out = (f"{len(stalls)}: up to {max(lags):.0f} ms, "
               f"{sum(on_cpu) / sum(lags):.0%} of it on CPU")
    if gc_pauses:
        worst = max(gc_pauses, key=lambda g: float(g.split()[2]))
        out += f"; GC pauses > 5 ms: {len(gc_pauses)} (worst: {worst})"
    return out


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["server", "deadline", "n", "statuses", "min ms", "p50 ms", "p90 ms", "p99 ms",
            "max ms", "server loop stalls > 10 ms", "server log lines (tracebacks)"]
    body = []
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        if r["errors"]:
            statuses += f", socket errors: {r['errors']}"
        p99 = f"{r['p99']:.3f}"
        body.append([
            r["server"], f"{r['label']} (budget {r['budget_s'] * 1000:.0f} ms)", str(r["n"]),
            statuses, f"{r['min']:.3f}", f"{r['p50']:.3f}", f"{r['p90']:.3f}",
            f"**{p99}**" if markdown and r["app"] == "ctx" else p99, f"{r['max']:.3f}",
            stall_summary(r["stalls"], r["gc_pauses"]),
            f"{r['log_lines']} ({r['tracebacks']})",
        ])
    return render_table(head, body, markdown)


def main() -> None:
    if "--serve" in sys.argv:
        serve_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--requests", type=int, default=400, help="per phase on uvicorn-httptools")
    p.add_argument("--other-requests", type=int, default=200, help="per phase elsewhere")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the no-middleware floor phase")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--servers", default=",".join(SERVERS))
    args = p.parse_args()
    ensure_venv()
    os.sched_setaffinity(0, {1})
    t0 = time.monotonic()
    rows = []
    for server in args.servers.split(","):
        n = args.requests if server == "uvicorn-httptools" else args.other_requests
        for header_ms in (None, 100):
            rows.append(run_phase(server, n, args.concurrency, header_ms))
        if args.floor:
            rows.append(run_phase(server, n, args.concurrency, None, "floor"))
        print(f"  {server}: done", file=sys.stderr, flush=True)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    OUT.mkdir(exist_ok=True)
    (OUT / "deadline.json").write_text(
        json.dumps({"date": date, "versions": versions(), "rows": rows}, indent=1)
    )
    cmd = "python bench/bench_deadline.py " + " ".join(sys.argv[1:])
    loop = "uvloop" if has_uvloop() else "asyncio"
    if args.markdown:
        print("### Deadline accuracy: 504 arrival - (send + budget)\n")
        print(f"`{cmd.strip()}`, {date}, uvicorn with {loop}, {args.concurrency} requests in "
              f"flight, {time.monotonic() - t0:.0f} s.\n")
    else:
        print(f"504 lateness (status-line arrival - send - budget), {date}, "
              f"uvicorn loop {loop}, concurrency {args.concurrency}")
    print(render(rows, args.markdown))
    ctx_rows = [r for r in rows if r["app"] == "ctx"]
    worst = max(r["p99"] for r in ctx_rows)
    all_504 = all(r["statuses"].get(504, 0) == r["n"] for r in ctx_rows)
    print()
    print(f"ContextMiddleware: worst p99 lateness {worst:.3f} ms "
          f"({'meets' if worst <= 10 else 'MISSES'} the <= 10 ms target); "
          f"{'every' if all_504 else 'NOT every'} request got its 504.")


if __name__ == "__main__":
    main()
