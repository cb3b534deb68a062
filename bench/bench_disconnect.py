"""Disconnect-to-cancel latency of ContextMiddleware on real servers.

    python bench/bench_disconnect.py              # plain table
    python bench/bench_disconnect.py --markdown   # markdown table (for bench/RESULTS.md)

Runs in the venv ``bench/.venv-peers`` (see bench_overhead.py), against this checkout.

Method:

* The server (a separate process, pinned to CPU 0) serves a Starlette app
  wrapped in ``ContextMiddleware(timeout=30)`` whose ``/slow`` handler does
  ``await asyncio.sleep(30)``. The handler writes ``start <id> <t>`` when it
  begins and ``cancelled <id> <t>`` in ``except asyncio.CancelledError`` (or
  ``completed <id> <t>``) to a pipe shared with the client, where
  ``t = time.monotonic()``: CLOCK_MONOTONIC is the same clock in every process.
* The client (this process, pinned to CPU 1) opens a raw socket, sends
  ``GET /slow?id=N``, waits for the handler's ``start N`` line (plus
  ``--delay`` for the "start + 50 ms" phase), takes ``t_close =
  time.monotonic()`` and calls ``close()`` (a FIN, the common case). The latency
  is the handler's ``cancelled`` time minus ``t_close``.
* Closing right after ``start`` is the worst case for the middleware: it
  watches for disconnects only once a request is older than its 1 ms grace
  period, so that latency includes what is left of the grace. The 50 ms phase
  shows the steady state.
* Baseline: the same handler (sleeping 1 s) in a plain Starlette app without
  middleware is never cancelled: it completes after the client has gone.
* Servers: uvicorn with httptools and with h11 (``--loop uvloop`` if installed,
  ``--no-access-log --log-level warning --no-proxy-headers``), and hypercorn.
  Tracebacks in the server's stderr are counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import socket
import sys
import time
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

# -- server side --------------------------------------------------------------------


def build_app(kind: str, events_fd: int, sleep: float) -> Any:
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def emit(event: str, rid: str) -> None:
        os.write(events_fd, f"{event} {rid} {time.monotonic():.9f}\n".encode())

    async def slow(request: Any) -> PlainTextResponse:
        rid = request.query_params["id"]
        emit("start", rid)
        try:
            await asyncio.sleep(sleep)
        except asyncio.CancelledError:
            emit("cancelled", rid)
            raise
        emit("completed", rid)
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/slow", slow)])
    if kind == "ctx":
        from ctxmiddleware import ContextMiddleware

        app.add_middleware(ContextMiddleware, timeout=30)
    return app


def serve_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--serve", required=True, choices=SERVERS)
    p.add_argument("--app", required=True, choices=["ctx", "bare"])
    p.add_argument("--events-fd", type=int, required=True)
    p.add_argument("--sleep", type=float, default=30.0)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    run_server(build_app(a.app, a.events_fd, a.sleep), a.serve, a.port)


# -- client side --------------------------------------------------------------------


class Events:
    """Lines ``event id t`` from the server's pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.seen: dict[tuple[str, str], float] = {}

    def wait(self, events: tuple[str, ...], rid: str, timeout: float) -> tuple[str, float] | None:
        end = time.monotonic() + timeout
        while True:
            for event in events:
                t = self.seen.pop((event, rid), None)
                if t is not None:
                    return event, t
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                for line in lines:
                    event, r, t = line.decode().split()
                    self.seen[(event, r)] = float(t)


def run_phase(
    server: str, app: str, runs: int, delay: float, sleep: float, label: str
) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    args = [server, "--app", app, "--events-fd", str(write_fd), "--sleep", str(sleep)]
    events = Events(read_fd)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    completed_after: list[float] = []
    script = Path(__file__).resolve()
    try:
        with server_process(script, args, pass_fds=(write_fd,)) as (_, port, log):
            os.close(write_fd)
            write_fd = -1
            time.sleep(0.3)
            for i in range(runs + 3):  # the first 3 are warm-up
                rid = f"{i}"
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(f"GET /slow?id={rid} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                if events.wait(("start",), rid, 5.0) is None:
                    raise RuntimeError(f"{server}: handler {rid} never started")
                if delay:
                    time.sleep(delay)
                t_close = time.monotonic()
                sock.close()
                end = events.wait(("cancelled", "completed"), rid, sleep + 2.0)
                if i < 3:
                    continue
                outcome = "lost" if end is None else end[0]
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if end is not None and end[0] == "cancelled":
                    latencies.append((end[1] - t_close) * 1000)
                elif end is not None:
                    completed_after.append(end[1] - t_close)
                time.sleep(0.005)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    row: dict[str, Any] = {
        "server": server,
        "label": label,
        "app": app,
        "n": runs,
        "outcomes": outcomes,
        "log_lines": len(log),
        "tracebacks": sum("Traceback" in ln for ln in log),
        "latencies_ms": latencies,
        "completed_after_s": completed_after,
        "p50": None,
        "p99": None,
        "max": None,
    }
    if latencies:
        row.update(
            p50=percentile(latencies, 50),
            p90=percentile(latencies, 90),
            p99=percentile(latencies, 99),
            max=max(latencies),
            min=min(latencies),
        )
    return row


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["server", "app / phase", "n", "outcome", "p50 ms", "p90 ms", "p99 ms", "max ms",
            "server tracebacks"]
    body = []
    for r in rows:
        outcome = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
        if r["p50"] is None:
            after = r["completed_after_s"]
            detail = (
                f" (not cancelled: completed {min(after):.3f}-{max(after):.3f} s after close)"
                if after else ""
            )
            body.append([r["server"], r["label"], str(r["n"]), outcome + detail,
                         "-", "-", "-", "-", str(r["tracebacks"])])
            continue
        p99 = f"{r['p99']:.3f}"
        body.append([
            r["server"], r["label"], str(r["n"]), outcome,
            f"{r['p50']:.3f}", f"{r['p90']:.3f}", f"**{p99}**" if markdown else p99,
            f"{r['max']:.3f}", str(r["tracebacks"]),
        ])
    return render_table(head, body, markdown)


def main() -> None:
    if "--serve" in sys.argv:
        serve_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--runs", type=int, default=300, help="runs on uvicorn-httptools")
    p.add_argument("--other-runs", type=int, default=150, help="runs on uvicorn-h11, hypercorn")
    p.add_argument("--delayed-runs", type=int, default=200,
                   help="runs of the 'start + 50 ms' phase (uvicorn-httptools)")
    p.add_argument("--baseline-runs", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS))
    args = p.parse_args()
    ensure_venv()
    os.sched_setaffinity(0, {1})
    t0 = time.monotonic()
    servers = args.servers.split(",")
    rows = []
    for server in servers:
        n = args.runs if server == "uvicorn-httptools" else args.other_runs
        rows.append(run_phase(server, "ctx", n, 0.0, 30.0, "ContextMiddleware, close at start"))
        print(f"  {server}: done", file=sys.stderr, flush=True)
    if args.delayed_runs and "uvicorn-httptools" in servers:
        rows.append(run_phase("uvicorn-httptools", "ctx", args.delayed_runs, 0.05, 30.0,
                              "ContextMiddleware, close at start + 50 ms"))
    if args.baseline_runs:
        rows.append(run_phase(servers[0], "bare", args.baseline_runs, 0.0, 1.0,
                              "plain Starlette, no middleware (sleep 1 s)"))
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    info = versions()
    OUT.mkdir(exist_ok=True)
    (OUT / "disconnect.json").write_text(
        json.dumps({"date": date, "versions": info, "rows": rows}, indent=1)
    )
    cmd = "python bench/bench_disconnect.py " + " ".join(sys.argv[1:])
    loop = "uvloop" if has_uvloop() else "asyncio"
    if args.markdown:
        print("### Client disconnect → CancelledError in the handler\n")
        print(f"`{cmd.strip()}`, {date}, uvicorn with {loop}, {time.monotonic() - t0:.0f} s. "
              "Latency = handler's `except CancelledError` time - client's `close()` time.\n")
    else:
        print(f"disconnect → cancel latency, {date}, uvicorn loop {loop}")
    print(render(rows, args.markdown))
    ok = [r for r in rows if r["app"] == "ctx"]
    worst = max((r["p99"] for r in ok if r["p99"] is not None), default=float("nan"))
    all_cancelled = all(r["outcomes"].get("cancelled", 0) == r["n"] for r in ok)
    print()
    print(f"ContextMiddleware: worst p99 {worst:.3f} ms "
          f"({'meets' if worst <= 5 else 'MISSES'} the <= 5 ms target); "
          f"{'every' if all_cancelled else 'NOT every'} request cancelled.")


if __name__ == "__main__":
    main()
